//! Synchronized batch normalization: the statistics of the *global* batch of several
//! data-parallel ranks, exactly.
//!
//! In data-parallel training each rank (a thread, a process, a machine) holds a slice of
//! the batch. [`sync_forward_into`] and [`sync_backward_into`] are [`forward_into`] and
//! [`backward_into`] over the concatenation of every rank's slice, with each rank reading
//! and writing only its own slice:
//!
//! * forward: every rank computes per-channel [`Moments`] `(count, mean, M2)` of its slice,
//!   they are all-gathered as f64, and every rank merges them **in rank order** with
//!   Chan's formula. Counts weight the merge (uneven slices are exact), an empty slice is
//!   neutral, and every rank computes bit-identical statistics and running statistics.
//!   Nothing like `E[x²] − E[x]²` or an inverse standard deviation is ever exchanged.
//! * backward: per channel `(Σdy, Σdy·(x − μ))` is all-gathered and summed in rank order,
//!   so `dx` is the gradient through the global statistics and `dγ`, `dβ` are the
//!   gradients over the global batch, bit-identical on every rank.
//!
//! Each step first all-gathers a fixed-size header (operation, mode, channel count,
//! dtype, a fingerprint of the configuration, the running-statistics step count, whether
//! the rank's own checks passed). A rank called inconsistently — another channel count,
//! inference while the others train, a wrong buffer length — makes **every** rank return
//! an error for that step ([`Error::SyncMismatch`] on the others, its own error on
//! itself) instead of hanging or crashing in the communication library. Then one
//! collective carries the statistics (`3·C` f64 forward, `2·C` backward).
//!
//! The communication is abstracted by [`Communicator`]: [`ThreadComm`] runs ranks as
//! threads of one process (tests, data parallelism on one machine); the `bnorm-mpi` crate
//! implements it over MPI for processes and machines.
//!
//! Conventions: every layout, dtype, momentum convention and [`Variant::Renorm`] are
//! supported; [`Variant::Ghost`] is refused ([`Error::InvalidConfig`]) because ghost
//! batches are by definition per-device statistics. Inference and frozen steps that use
//! running statistics need no statistics collective (only the header); a layer without
//! running statistics normalizes with the global batch in inference too, as PyTorch's
//! `SyncBatchNorm` does.
//!
//! Gradient scaling: `dy` on each rank must be the gradient of the *global* loss with
//! respect to that rank's output (for a mean over the global batch, divide by the global
//! batch size). `dγ` and `dβ` returned are already global: do not sum them again over
//! ranks (averaging identical values is harmless).
//!
//! ```
//! use bnorm::sync::{sync_backward_into, sync_forward_into, Communicator, ThreadComm};
//! use bnorm::{Config, Grads, Layout, Mode, Parallelism, Params, RunningState, Saved, Workspace};
//! let cfg = Config::torch(2);
//! let x = [1.0f32, 10.0, 2.0, 20.0, 3.0, 30.0, 4.0, 40.0, 5.0, 50.0]; // NC, 5 samples
//! let shards = [&x[..2], &x[2..]]; // uneven: 1 and 4 samples
//! let results: Vec<_> = std::thread::scope(|s| {
//!     let handles: Vec<_> = ThreadComm::group(2).into_iter().map(|comm| {
//!         let (cfg, xs) = (&cfg, shards[comm.rank()]);
//!         s.spawn(move || -> bnorm::Result<_> {
//!             let g = Layout::NC.geometry(&[xs.len() / 2, 2])?;
//!             let (p, mut st) = (Params::init(cfg), RunningState::init(cfg));
//!             let (mut y, mut saved, mut ws) = (vec![0.0f32; xs.len()], Saved::default(), Workspace::default());
//!             sync_forward_into(&comm, cfg, g, xs, &p, st.as_mut(), Mode::Train, &mut y,
//!                               &mut saved, &mut ws, Parallelism::Sequential)?;
//!             let (mut dx, mut grads) = (vec![0.0f32; xs.len()], Grads::default());
//!             sync_backward_into(&comm, cfg, g, xs, &y, &p, &saved, &mut dx, &mut grads,
//!                                &mut ws, Parallelism::Sequential)?;
//!             Ok((saved.mean().to_vec(), st.unwrap(), grads))
//!         })
//!     }).collect();
//!     handles.into_iter().map(|h| h.join().unwrap()).collect()
//! });
//! let (mean0, state0, grads0) = results[0].clone()?;
//! assert_eq!(mean0, vec![3.0, 30.0]); // the mean of the global batch
//! let (mean1, state1, grads1) = results[1].clone()?;
//! assert_eq!((mean0, state0, grads0), (mean1, state1, grads1)); // bit-identical on every rank
//! # Ok::<(), bnorm::Error>(())
//! ```
//!
//! [`forward_into`]: crate::forward_into
//! [`backward_into`]: crate::backward_into
//! [`Variant::Renorm`]: crate::Variant::Renorm
//! [`Variant::Ghost`]: crate::Variant::Ghost

use std::sync::{Arc, Barrier, Mutex};

use crate::backward::Grads;
use crate::backward::{check_backward, coefficients};
use crate::config::{
    BackwardArithmetic, Config, Momentum, NonFinitePolicy, VarianceEstimator, Variant,
};
use crate::element::{DType, Element};
use crate::error::{Error, Result};
use crate::forward::{
    check_input, forward_into, renorm_rd, set_coefficients, Normalized, Saved, StepReport,
};
use crate::kernels::{self, Workspace};
use crate::layout::Geometry;
use crate::parallel::Parallelism;
use crate::running;
use crate::state::{Mode, Params, RunningState};
use crate::stats::Moments;

/// The collectives synchronized batch norm needs: rank, size, and an all-gather of f64
/// buffers. Implement it for another transport (NCCL, gloo, a test double) to use
/// [`sync_forward_into`] and [`sync_backward_into`] over it.
///
/// Every rank of the group must make the same sequence of calls. The synchronized steps
/// guarantee that the buffers they pass have the same length on every rank (they first
/// gather a fixed-size header that tells a mismatch), so an implementation may assume
/// equal lengths; [`ThreadComm`] checks them anyway.
///
/// ```
/// use bnorm::sync::{Communicator, ThreadComm};
/// let comms = ThreadComm::group(1);
/// let mut out = Vec::new();
/// comms[0].all_gather_f64(&[1.0, 2.0], &mut out)?;
/// assert_eq!((comms[0].rank(), comms[0].size(), out), (0, 1, vec![1.0, 2.0]));
/// # Ok::<(), bnorm::Error>(())
/// ```
pub trait Communicator {
    /// This rank's index, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// Gathers every rank's `local` (same length on every rank) into `out`, concatenated
    /// in rank order (`out.len() == size() · local.len()` on return). Collective: every
    /// rank must call it.
    fn all_gather_f64(&self, local: &[f64], out: &mut Vec<f64>) -> Result<()>;
}

impl<C: Communicator + ?Sized> Communicator for &C {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn size(&self) -> usize {
        (**self).size()
    }
    fn all_gather_f64(&self, local: &[f64], out: &mut Vec<f64>) -> Result<()> {
        (**self).all_gather_f64(local, out)
    }
}

/// One rank of an in-process group: ranks are threads of one process that meet at a
/// shared barrier ([`std::sync`] only). Move each communicator to its own thread.
///
/// A rank that panics or stops calling leaves the others waiting at the next collective,
/// as with any collective library; inconsistent *calls* are reported as errors.
///
/// ```
/// use bnorm::sync::{Communicator, ThreadComm};
/// let gathered: Vec<Vec<f64>> = std::thread::scope(|s| {
///     let hs: Vec<_> = ThreadComm::group(3).into_iter().map(|c| s.spawn(move || {
///         let mut out = Vec::new();
///         c.all_gather_f64(&[c.rank() as f64], &mut out).map(|_| out)
///     })).collect();
///     hs.into_iter().map(|h| h.join().unwrap()).collect::<bnorm::Result<_>>()
/// })?;
/// assert!(gathered.iter().all(|g| g == &[0.0, 1.0, 2.0]));
/// # Ok::<(), bnorm::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ThreadComm {
    rank: usize,
    group: Arc<Group>,
}

#[derive(Debug)]
struct Group {
    barrier: Barrier,
    slots: Vec<Mutex<Vec<f64>>>,
}

impl ThreadComm {
    /// A group of `size` ranks; element `r` of the result is rank `r`.
    ///
    /// ```
    /// let comms = bnorm::sync::ThreadComm::group(4);
    /// assert_eq!(comms.len(), 4);
    /// ```
    pub fn group(size: usize) -> Vec<ThreadComm> {
        let group = Arc::new(Group {
            barrier: Barrier::new(size.max(1)),
            slots: (0..size).map(|_| Mutex::new(Vec::new())).collect(),
        });
        (0..size)
            .map(|rank| ThreadComm {
                rank,
                group: Arc::clone(&group),
            })
            .collect()
    }
}

fn poisoned<T>(_: T) -> Error {
    Error::Communication {
        reason: "a rank of the in-process group panicked".to_string(),
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.slots.len()
    }

    fn all_gather_f64(&self, local: &[f64], out: &mut Vec<f64>) -> Result<()> {
        let g = &self.group;
        let written = g.slots[self.rank].lock().map(|mut slot| {
            slot.clear();
            slot.extend_from_slice(local);
        });
        // Every rank reaches both barriers whatever happened, so no rank is left waiting.
        g.barrier.wait();
        let read = written.map_err(poisoned).and_then(|()| {
            out.clear();
            for (r, slot) in g.slots.iter().enumerate() {
                let slot = slot.lock().map_err(poisoned)?;
                if slot.len() != local.len() {
                    return Err(Error::Communication {
                        reason: format!(
                            "rank {r} passed {} values to all_gather, rank {} passed {}",
                            slot.len(),
                            self.rank,
                            local.len()
                        ),
                    });
                }
                out.extend_from_slice(&slot);
            }
            Ok(())
        });
        g.barrier.wait();
        read
    }
}

// ---------------------------------------------------------------------------------------
// The consistency header.

/// Header fields, one f64 each.
const H_MAGIC: usize = 0;
const H_OP: usize = 1;
const H_MODE: usize = 2;
const H_CHANNELS: usize = 3;
const H_CFG_LO: usize = 4;
const H_CFG_HI: usize = 5;
const H_DTYPE: usize = 6;
const H_UPDATES: usize = 7;
const H_SAVED_LO: usize = 8;
const H_SAVED_HI: usize = 9;
const H_COUNT: usize = 10;
const H_STATUS: usize = 11;
const HEADER: usize = 12;

/// "bNo1": identifies the protocol (and its version) in the header.
const MAGIC: f64 = 0x624e_6f31_u32 as f64;
const OP_FORWARD: f64 = 1.0;
const OP_BACKWARD: f64 = 2.0;

/// Fields compared with rank 0, in the order they are reported.
const COMPARED: [(usize, &str); 8] = [
    (
        H_MAGIC,
        "protocol (another bnorm version, or another collective)",
    ),
    (H_OP, "operation (forward on one rank, backward on another)"),
    (
        H_MODE,
        "mode (Train / Inference / Frozen, or batch vs running statistics)",
    ),
    (H_CHANNELS, "channel count"),
    (
        H_CFG_LO,
        "configuration (eps, momentum, variant, affine, ...)",
    ),
    (
        H_CFG_HI,
        "configuration (eps, momentum, variant, affine, ...)",
    ),
    (H_DTYPE, "dtype"),
    (
        H_UPDATES,
        "running statistics (another number of training steps)",
    ),
];

/// FNV-1a over 64-bit words.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn word(&mut self, w: u64) {
        for b in w.to_le_bytes() {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn f(&mut self, v: f64) {
        self.word(v.to_bits());
    }
    fn put(self, h: &mut [f64; HEADER], lo: usize, hi: usize) {
        h[lo] = (self.0 & 0xffff_ffff) as f64;
        h[hi] = (self.0 >> 32) as f64;
    }
}

/// Every setting of a configuration except the channel count (compared on its own).
fn config_fingerprint(cfg: &Config) -> Fnv {
    let mut h = Fnv::new();
    h.f(cfg.epsilon());
    match cfg.momentum_convention() {
        Momentum::NewWeight(a) => (h.word(1), h.f(a)),
        Momentum::Cumulative => (h.word(2), h.f(0.0)),
        Momentum::Decay(d) => (h.word(3), h.f(d)),
        Momentum::DebiasedDecay(d) => (h.word(4), h.f(d)),
    };
    h.word(match cfg.running_variance_estimator() {
        VarianceEstimator::Biased => 1,
        VarianceEstimator::Unbiased => 2,
    });
    h.word(cfg.has_scale() as u64);
    h.word(cfg.has_center() as u64);
    h.word(cfg.tracks_running_stats() as u64);
    h.word(match cfg.non_finite_policy() {
        NonFinitePolicy::SkipChannel => 1,
        NonFinitePolicy::Error => 2,
    });
    h.word(match cfg.backward_arithmetic_kind() {
        BackwardArithmetic::F64 => 1,
        BackwardArithmetic::F32 => 2,
    });
    match cfg.variant_kind() {
        Variant::BatchNorm => h.word(1),
        Variant::Renorm(r) => {
            h.word(2);
            for v in [r.rmax, r.rmin, r.dmax, r.momentum] {
                h.f(v);
            }
        }
        Variant::Ghost(g) => {
            h.word(3);
            h.word(g.virtual_batch_size as u64);
        }
    }
    h
}

fn dtype_code(d: DType) -> f64 {
    match d {
        DType::F32 => 1.0,
        DType::F64 => 2.0,
        DType::F16 => 3.0,
        DType::BF16 => 4.0,
    }
}

/// Gathers the headers and decides, identically on every rank, whether the step goes on.
/// `local` is this rank's own check; on failure this rank returns its own error and every
/// other rank [`Error::SyncMismatch`].
fn agree<C: Communicator + ?Sized>(
    comm: &C,
    mut header: [f64; HEADER],
    local: Result<()>,
    gathered: &mut Vec<f64>,
) -> Result<()> {
    header[H_MAGIC] = MAGIC;
    header[H_STATUS] = if local.is_ok() { 0.0 } else { 1.0 };
    comm.all_gather_f64(&header, gathered)?;
    let size = comm.size();
    if gathered.len() != size * HEADER || size == 0 {
        return Err(Error::Communication {
            reason: format!(
                "all_gather returned {} values, expected {}",
                gathered.len(),
                size * HEADER
            ),
        });
    }
    let h0 = &gathered[..HEADER];
    let mut first: Option<(usize, &'static str)> = None;
    for (r, h) in gathered.chunks_exact(HEADER).enumerate() {
        if h[H_STATUS] != 0.0 {
            first = Some((r, "its own checks (that rank returns its own error)"));
            break;
        }
        // Compare bits, so that a NaN (never produced here) could not pass.
        if let Some(&(_, what)) = COMPARED
            .iter()
            .find(|&&(i, _)| h[i].to_bits() != h0[i].to_bits())
        {
            first = Some((r, what));
            break;
        }
    }
    local?;
    match first {
        Some((rank, what)) => Err(Error::SyncMismatch { rank, what }),
        None => Ok(()),
    }
}

fn resize(v: &mut Vec<f64>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

fn refuse_ghost(cfg: &Config) -> Result<()> {
    if let Variant::Ghost(_) = cfg.variant_kind() {
        return Err(Error::InvalidConfig {
            setting: "variant",
            value: "Ghost".to_string(),
            expected: "BatchNorm or Renorm: ghost batches are per-device statistics, \
                       synchronizing them is not defined",
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Forward.

/// The statistics a step normalizes with, or the error of this rank's own checks.
fn forward_checks<T: Element>(
    cfg: &Config,
    g: Geometry,
    x: &[T],
    params: &Params,
    state: Option<&RunningState>,
    mode: Mode,
    y: &[T],
) -> Result<Normalized> {
    cfg.validate()?;
    refuse_ghost(cfg)?;
    params.validate(cfg)?;
    check_input(cfg, g, x.len(), "x")?;
    check_input(cfg, g, y.len(), "y")?;
    match (state, cfg.tracks_running_stats()) {
        (Some(s), true) => s.validate(cfg)?,
        (None, false) => {}
        (None, true) => return Err(Error::NoRunningStatistics),
        (Some(_), false) => {
            return Err(Error::StateMismatch {
                reason: "running statistics given to a layer that does not track them",
            })
        }
    }
    match (mode, state.is_some()) {
        (Mode::Train, _) | (Mode::Inference, false) => Ok(Normalized::Batch),
        (Mode::Inference, true) | (Mode::Frozen, true) => Ok(Normalized::Running),
        (Mode::Frozen, false) => Err(Error::NoRunningStatistics),
    }
}

/// [`forward_into`] over the global batch of every rank of `comm`:
/// this rank passes its own slice `x` (any number of samples, zero included) and gets its
/// slice of the output in `y`; the statistics in `saved`, the running statistics and the
/// report are those of the concatenated batch and bit-identical on every rank.
///
/// Collective: every rank of `comm` must call it for the same step. If any rank's
/// arguments are invalid or inconsistent with rank 0's, every rank returns an error
/// (that rank its own, the others [`Error::SyncMismatch`]) and nothing is written.
/// [`Error::BatchTooSmall`] refers to the global batch. Ghost batches are refused.
///
/// ```
/// use bnorm::sync::{sync_forward_into, ThreadComm};
/// use bnorm::{Config, Layout, Mode, Parallelism, Params, RunningState, Saved, Workspace};
/// // One rank: exactly forward_into.
/// let comm = &ThreadComm::group(1)[0];
/// let cfg = Config::keras(1);
/// let g = Layout::NC.geometry(&[4, 1])?;
/// let (params, mut state) = (Params::init(&cfg), RunningState::init(&cfg));
/// let (mut y, mut saved, mut ws) = (vec![0.0f64; 4], Saved::default(), Workspace::default());
/// sync_forward_into(comm, &cfg, g, &[1.0, 2.0, 3.0, 4.0], &params, state.as_mut(), Mode::Train,
///                   &mut y, &mut saved, &mut ws, Parallelism::Sequential)?;
/// assert!((state.as_ref().unwrap().mean[0] - 0.025).abs() < 1e-12);
/// # Ok::<(), bnorm::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn sync_forward_into<T: Element, C: Communicator + ?Sized>(
    comm: &C,
    cfg: &Config,
    g: Geometry,
    x: &[T],
    params: &Params,
    state: Option<&mut RunningState>,
    mode: Mode,
    y: &mut [T],
    saved: &mut Saved,
    ws: &mut Workspace,
    par: Parallelism,
) -> Result<StepReport> {
    let checked = forward_checks(cfg, g, x, params, state.as_deref(), mode, y);
    let mut header = [0.0; HEADER];
    header[H_OP] = OP_FORWARD;
    header[H_MODE] = match mode {
        Mode::Train => 0.0,
        Mode::Inference => 1.0,
        Mode::Frozen => 2.0,
    };
    header[H_CHANNELS] = cfg.num_channels() as f64;
    config_fingerprint(cfg).put(&mut header, H_CFG_LO, H_CFG_HI);
    header[H_DTYPE] = dtype_code(T::DTYPE);
    header[H_UPDATES] = state.as_deref().map_or(-1.0, |s| s.updates as f64);
    header[H_COUNT] = g.per_channel() as f64;
    let mut gathered = Vec::new();
    let (local, normalized) = match checked {
        Ok(n) => (Ok(()), n),
        Err(e) => (Err(e), Normalized::Batch),
    };
    agree(comm, header, local, &mut gathered)?;

    if normalized == Normalized::Running {
        // Running statistics are the same on every rank (checked by the header's step
        // count): nothing to combine.
        return forward_into(cfg, g, x, params, state, mode, y, saved, ws, par);
    }

    // Local moments, gathered, merged in rank order.
    let c = g.channels;
    let mut m = std::mem::take(&mut ws.tmp);
    m.clear();
    m.resize(c, Moments::default());
    kernels::moments(g, x, &mut m, ws, par);
    let mut payload = Vec::with_capacity(3 * c);
    for mo in &m {
        payload.extend_from_slice(&[mo.count, mo.mean, mo.m2]);
    }
    let gathered_ok = comm.all_gather_f64(&payload, &mut gathered);
    if let Err(e) = gathered_ok {
        ws.tmp = m;
        return Err(e);
    }
    for (ch, mo) in m.iter_mut().enumerate() {
        *mo = gathered
            .chunks_exact(3 * c)
            .map(|r| Moments {
                count: r[3 * ch],
                mean: r[3 * ch + 1],
                m2: r[3 * ch + 2],
            })
            .fold(Moments::default(), Moments::merge);
    }
    let global = m.first().map_or(0.0, |mo| mo.count);
    if global <= 1.0 {
        ws.tmp = m;
        return Err(Error::BatchTooSmall {
            channel_values: global as usize,
        });
    }

    // From here on, exactly forward_into's steps with the global statistics.
    let mut report = StepReport::default();
    let update = mode == Mode::Train && state.is_some();
    if update {
        for (ch, mo) in m.iter().enumerate() {
            if !(mo.mean.is_finite() && mo.variance_biased().is_finite()) {
                report.skipped_channels.push(ch);
            }
        }
        if !report.skipped_channels.is_empty() && cfg.non_finite_policy() == NonFinitePolicy::Error
        {
            ws.tmp = m;
            return Err(Error::NonFiniteStatistics {
                channels: report.skipped_channels,
            });
        }
    }
    saved.normalized = Normalized::Batch;
    saved.geometry = Some(g);
    saved.groups = 1;
    saved.group_of.clear();
    saved.r.clear();
    saved.d.clear();
    resize(&mut saved.count, c);
    resize(&mut saved.mean, c);
    resize(&mut saved.var, c);
    resize(&mut saved.invstd, c);
    for (ch, mo) in m.iter().enumerate() {
        saved.count[ch] = mo.count;
        saved.mean[ch] = mo.mean;
        saved.var[ch] = mo.variance_biased();
        saved.invstd[ch] = 1.0 / (saved.var[ch] + cfg.epsilon()).sqrt();
    }
    ws.tmp = m;
    if let (Variant::Renorm(rn), true, Some(s)) = (cfg.variant_kind(), update, state.as_deref()) {
        if let Some(rs) = &s.renorm {
            let lim = rn.limits(s.updates);
            resize(&mut saved.r, c);
            resize(&mut saved.d, c);
            for ch in 0..c {
                let (r, d) = renorm_rd(lim, rs, ch, saved.mean[ch], saved.var[ch], cfg.epsilon());
                saved.r[ch] = r;
                saved.d[ch] = d;
            }
        }
    }
    set_coefficients(g, params, saved);
    kernels::affine_ep(
        g,
        x,
        kernels::Ep::None,
        &saved.mean,
        &saved.scale,
        &saved.shift,
        y,
        par,
    );
    if let (true, Some(s)) = (update, state) {
        running::update(cfg, s, saved.batch_stats(), &report.skipped_channels);
        report.updated = true;
    }
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// Backward.

fn saved_fingerprint(saved: &Saved) -> Fnv {
    let mut h = Fnv::new();
    for v in [&saved.count, &saved.mean, &saved.invstd, &saved.r, &saved.d] {
        h.word(v.len() as u64);
        for &x in v.iter() {
            h.f(x);
        }
    }
    h
}

#[allow(clippy::too_many_arguments)]
fn backward_checks<T: Element>(
    cfg: &Config,
    g: Geometry,
    x: &[T],
    dy: &[T],
    params: &Params,
    saved: &Saved,
    dx: &[T],
) -> Result<()> {
    refuse_ghost(cfg)?;
    check_backward(cfg, g, x, dy, params, saved, dx)?;
    if saved.groups > 1 || !saved.group_of.is_empty() {
        return Err(Error::SavedMismatch {
            reason: "saved statistics of ghost batches",
        });
    }
    Ok(())
}

/// [`backward_into`](crate::backward_into) over the global batch: this rank passes its
/// slices of `x` and `dy` (the gradient of the global loss with respect to its slice of
/// `y`) and the `saved` of its [`sync_forward_into`]; it gets its slice of `dx`, and
/// `grads` holds `dγ`, `dβ` over the global batch, bit-identical on every rank.
///
/// Collective, with the same error behaviour as [`sync_forward_into`]; `saved` must come
/// from the synchronized forward step of the same ranks (checked: the saved statistics
/// must agree on every rank and count the global batch).
///
/// ```
/// use bnorm::sync::{sync_backward_into, sync_forward_into, ThreadComm};
/// use bnorm::{Config, Grads, Layout, Mode, Parallelism, Params, RunningState, Saved, Workspace};
/// let comm = &ThreadComm::group(1)[0];
/// let cfg = Config::torch(1);
/// let g = Layout::NC.geometry(&[4, 1])?;
/// let (x, p, mut st) = ([1.0f64, 2.0, 4.0, 8.0], Params::init(&cfg), RunningState::init(&cfg));
/// let (mut y, mut saved, mut ws) = (vec![0.0; 4], Saved::default(), Workspace::default());
/// sync_forward_into(comm, &cfg, g, &x, &p, st.as_mut(), Mode::Train, &mut y, &mut saved,
///                   &mut ws, Parallelism::Sequential)?;
/// let (mut dx, mut grads) = (vec![0.0; 4], Grads::default());
/// sync_backward_into(comm, &cfg, g, &x, &[1.0, 0.0, 0.0, 0.0], &p, &saved, &mut dx,
///                    &mut grads, &mut ws, Parallelism::Sequential)?;
/// assert!(dx.iter().sum::<f64>().abs() < 1e-12);
/// assert_eq!(grads.dbias, vec![1.0]);
/// # Ok::<(), bnorm::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn sync_backward_into<T: Element, C: Communicator + ?Sized>(
    comm: &C,
    cfg: &Config,
    g: Geometry,
    x: &[T],
    dy: &[T],
    params: &Params,
    saved: &Saved,
    dx: &mut [T],
    grads: &mut Grads,
    ws: &mut Workspace,
    par: Parallelism,
) -> Result<()> {
    let checked = backward_checks(cfg, g, x, dy, params, saved, dx);
    let mut header = [0.0; HEADER];
    header[H_OP] = OP_BACKWARD;
    header[H_MODE] = match saved.normalized {
        Normalized::Batch => 0.0,
        Normalized::Running => 1.0,
    };
    header[H_CHANNELS] = cfg.num_channels() as f64;
    config_fingerprint(cfg).put(&mut header, H_CFG_LO, H_CFG_HI);
    header[H_DTYPE] = dtype_code(T::DTYPE);
    header[H_UPDATES] = -1.0;
    saved_fingerprint(saved).put(&mut header, H_SAVED_LO, H_SAVED_HI);
    header[H_COUNT] = g.per_channel() as f64;
    let mut gathered = Vec::new();
    agree(comm, header, checked, &mut gathered)?;
    // The saved statistics must be the same on every rank ...
    if let Some(r) = gathered.chunks_exact(HEADER).position(|h| {
        h[H_SAVED_LO].to_bits() != gathered[H_SAVED_LO].to_bits()
            || h[H_SAVED_HI].to_bits() != gathered[H_SAVED_HI].to_bits()
    }) {
        return Err(Error::SyncMismatch {
            rank: r,
            what: "saved statistics (another forward step, or one not synchronized)",
        });
    }
    // ... and, with batch statistics, count exactly the values of all ranks.
    let c = g.channels;
    if saved.normalized == Normalized::Batch {
        let total: f64 = gathered.chunks_exact(HEADER).map(|h| h[H_COUNT]).sum();
        if saved.count.first() != Some(&total) {
            return Err(Error::SyncMismatch {
                rank: 0,
                what: "saved statistics (the forward step was not synchronized over these ranks)",
            });
        }
    }

    let mut sums = std::mem::take(&mut ws.tmp_pairs);
    sums.clear();
    sums.resize(c, (0.0, 0.0));
    kernels::dot(g, x, dy, &saved.mean, &mut sums, ws, par);
    let mut payload = Vec::with_capacity(2 * c);
    for &(a, b) in &sums {
        payload.extend_from_slice(&[a, b]);
    }
    let gathered_ok = comm.all_gather_f64(&payload, &mut gathered);
    if let Err(e) = gathered_ok {
        ws.tmp_pairs = sums;
        return Err(e);
    }
    for (ch, s) in sums.iter_mut().enumerate() {
        let mut ranks = gathered.chunks_exact(2 * c);
        let Some(first) = ranks.next() else {
            continue;
        };
        *s = ranks.fold((first[2 * ch], first[2 * ch + 1]), |acc, r| {
            (acc.0 + r[2 * ch], acc.1 + r[2 * ch + 1])
        });
    }

    // dx = a·dy + b·(x − μ) + k with the global sums and the global count.
    let mut coef = std::mem::take(&mut ws.coef);
    coefficients(g, params, saved, &sums, grads, &mut coef);
    let (a, rest) = coef.split_at(c);
    let (b, k) = rest.split_at(c);
    let narrow = crate::backward::f32_map::<T>(cfg);
    kernels::affine2(g, x, dy, &saved.mean, a, b, k, dx, narrow, par);
    ws.tmp_pairs = sums;
    ws.coef = coef;
    Ok(())
}
