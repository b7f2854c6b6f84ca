//! # bnorm — batch normalization, done completely
//!
//! Batch normalization behaves differently in training and in inference, and the
//! frameworks disagree in the details. This crate implements the semantics of PyTorch,
//! Keras and TensorFlow exactly, behind one explicit API, for every common layout and
//! floating-point storage type, forward and backward.
//!
//! It is **for** normalizing activations of a network you train or deploy, and for porting
//! layers between frameworks without silent drift. It is **not** a tensor library: it takes
//! flat slices plus a shape and a [`Layout`].
//!
//! ## The model
//!
//! Per channel `c`, over the `m` values of that channel in the batch:
//!
//! ```text
//! μ = Σx/m,   σ² = Σ(x − μ)²/m,   x̂ = (x − μ)/sqrt(σ² + eps),   y = γ·x̂ + β
//! ```
//!
//! * [`Mode::Train`] normalizes with the batch's μ, σ² and folds them into the running
//!   statistics with the configured [`Momentum`] convention (the running variance uses
//!   the [`VarianceEstimator`]: PyTorch keeps the unbiased `Σ(x − μ)²/(m − 1)`).
//! * [`Mode::Inference`] normalizes with the running statistics (a layer without them
//!   uses the batch, as PyTorch's `track_running_stats=False`).
//! * [`Mode::Frozen`] normalizes with the running statistics and never updates them, while
//!   gradients still reach x, γ and β.
//!
//! Statistics are computed in f64, per block in one pass over the values shifted by one
//! of them (two passes where that would cancel), with blocks merged by Chan's formula
//! ([`expert::Moments`]), never as `E[x²] − E[x]²`; the merge order is fixed by the shape, so
//! results are bitwise identical for any number of threads. The forward map of f32 and
//! 16-bit storage runs in f32 with the mean split in two parts; the backward map runs in
//! f64 (in f32 for the 16-bit types).
//!
//! ## Quick example: the classic question
//!
//! How do I switch batch norm between training and test, keeping the moving averages?
//! Name the mode on every call:
//!
//! ```
//! use bnorm::{Config, Layout, Mode};
//! let mut bn = Config::torch(2).build()?;
//! let shape = [4, 2];
//! for step in 0..3 {
//!     let x: Vec<f32> = (0..8).map(|i| (i * (step + 1)) as f32).collect();
//!     bn.forward(&x, &shape, Layout::NC, Mode::Train)?; // updates running stats
//! }
//! let before = bn.running_state().unwrap().clone();
//! let (y, _) = bn.forward(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], &shape,
//!                         Layout::NC, Mode::Inference)?;
//! assert_eq!(bn.running_state().unwrap(), &before); // inference changed nothing
//! # let _ = y;
//! # Ok::<(), bnorm::Error>(())
//! ```
//!
//! ## Layers of the API
//!
//! * The front door, at the crate root: [`BatchNorm`] — the stateful layer
//!   (configuration, parameters, running state) — with [`Config`], [`Mode`], [`Layout`],
//!   [`Momentum`], [`VarianceEstimator`], [`Params`], [`RunningState`], [`Error`].
//! * [`mod@config`] — every setting: variants (renorm, ghost batches), policies.
//! * [`expert`] — the functional core over caller buffers: [`expert::forward_into`] /
//!   [`expert::backward_into`] with [`expert::Options`] (epilogues, deferred updates,
//!   threads, synchronization) and the plan of a step ([`expert::ForwardPlan`]).
//! * [`element`] — the storage types (f32, f64, f16, bf16).
//! * [`tuning`] — speed knobs that never change results.
//! * [`mod@reference`] — a plain float64 implementation every fast path is tested against.
//! * [`conformance`] — reads and replays the recorded framework cases.
//! * [`mod@sync`] — synchronized batch norm: statistics of the global batch of several
//!   data-parallel ranks (threads here, processes and machines with `bnorm-mpi`).
//!
//! Checkpoints of other frameworks (reading, conversion, folding, inspection) are the
//! `bnorm-interop` crate's; `bnorm-candle`, `bnorm-mpi` and `bnorm-cuda` bring the layer to
//! candle, to MPI and to NVIDIA GPUs.

#![deny(missing_docs)]

mod backward;
mod buffer;
pub mod config;
pub mod conformance;
pub mod element;
mod error;
mod forward;
mod kernels;
mod layer;
mod layout;
pub mod masked;
mod parallel;
mod plan;
mod recalibrate;
pub mod reference;
mod running;
mod state;
mod stats;
pub mod sync;

pub use config::{Config, Momentum, VarianceEstimator};
pub use error::{Error, ErrorSource, Result};
pub use forward::StepReport;
pub use layer::BatchNorm;
pub use layout::Layout;
pub use recalibrate::Recalibration;
pub use state::{Mode, Params, RunningState};

pub mod expert {
    //! The expert tier: the functional core over caller buffers.
    //!
    //! [`forward_into`] and [`backward_into`] take the configuration, the parameters, the
    //! state and caller buffers explicitly, reuse a [`Workspace`], and take [`Options`]
    //! (an [`Epilogue`], a deferred [`Update`], [`Parallelism`], a communicator for
    //! synchronized batch norm) so that every combination exists. Each call builds a
    //! [`ForwardPlan`] or [`BackwardPlan`] — every decision of the step, validated before
    //! any data is touched — and executes it. [`forward`] and [`backward`] allocate their
    //! outputs (without zeroing them: the kernels write every element once);
    //! [`forward_into_uninit`] and [`backward_into_uninit`] write into outputs that may be
    //! uninitialized, for callers that allocate their own. A warmed-up training step of
    //! this tier allocates nothing (ghost batches excepted).
    pub use crate::backward::{backward, backward_into, backward_into_uninit, Backward, Grads};
    pub use crate::forward::{
        forward, forward_into, forward_into_uninit, Forward, Normalized, Saved, StepReport,
    };
    pub use crate::kernels::Workspace;
    pub use crate::layout::Geometry;
    pub use crate::parallel::{Executor, Parallelism};
    pub use crate::plan::{
        BackwardEpilogue, BackwardOptions, BackwardPlan, Epilogue, ForwardPlan, Options,
        StateSummary, Update,
    };
    pub use crate::running::PendingUpdate;
    pub use crate::state::RenormState;
    pub use crate::stats::Moments;
}

pub mod tuning {
    //! Knobs for speed that never change results: the instruction-set level, the
    //! parallelism threshold, channel grouping of the fused passes, huge-page buffers.
    pub use crate::buffer::{empty_buffer, zeroed_buffer};
    pub use crate::kernels::{fused_channels, simd_level, with_simd_level, SimdLevel};
    pub use crate::parallel::PARALLEL_THRESHOLD;
}
