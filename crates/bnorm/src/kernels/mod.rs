//! The memory-bound kernels every batch-norm step is made of, for both loop shapes
//! (channels-first runs and channels-last rows):
//!
//! | kernel | computes | used by |
//! | --- | --- | --- |
//! | [`moments`] | per-channel `(count, mean, M2)` | training forward |
//! | [`affine_ep`] | `y = (x − center)·scale + shift`, then ReLU or add + ReLU | every forward |
//! | [`train_fused_cf`] | both, channel by channel, the second pass from cache | channels-first training forward |
//! | [`dot`] | per-channel `Σdy`, `Σdy·(x − center)` | backward |
//! | [`affine2`] | `dx = a·dy + b·(x − center) + k` | backward |
//! | [`backward_fused_cf`] | both backward passes, channel by channel, the second from cache | channels-first backward |
//! | [`dot_relu`], [`affine2_relu`] | the same through a ReLU (mask from its output) | fused backward |
//!
//! # Where things are
//!
//! One file per operation, each with its driver (the split over tasks) and its inner
//! loops for both layout families:
//!
//! | file | holds |
//! | --- | --- |
//! | `stats.rs` | [`moments`]: the statistics pass |
//! | `sums.rs` | [`dot`], [`dot_relu`]: the backward's per-channel sums |
//! | `forward_map.rs` | [`affine_ep`] and its epilogues ([`Ep`]); `forward_map/x86.rs` its streaming-store kernel |
//! | `backward_map.rs` | [`affine2`], [`affine2_relu`]; `backward_map/x86.rs` their streaming-store kernels |
//! | `fused.rs` | [`train_fused_cf`], [`backward_fused_cf`], [`fused_channels`] |
//!
//! and what they share:
//!
//! | file | holds |
//! | --- | --- |
//! | `schedule.rs` | the split of work into tasks and segments, [`Workspace`], per-thread scratch |
//! | `frame.rs` | lanes and their fixed folding order, short rows as lanes, cache requests ahead; the framing of the streaming loops (heads, aligned body, tails, direction, blocks of rows) |
//! | `coefs.rs` | the maps' arithmetic (f64, or f32 with a split center), coefficient tables, and the vectors the streaming kernels read them into and compute in |
//! | `simd.rs` | instruction-set detection and the per-level compilation of the inner loops |
//!
//! # Order and arithmetic
//!
//! Reductions are cut into segments fixed by the shape alone (never by the number of
//! threads), each reduced sequentially, then merged in segment order: the result is
//! bitwise identical with 1 thread or 64, and the fused kernel follows the same order.
//! Reductions run in f64 for every storage type; the forward maps run in f64 for f64
//! storage and in f32 (the center split in two parts) for the others; the backward maps in
//! f64 for f32 and f64 storage, in f32 for f16 and bf16. The inner loops are written once,
//! generically, and compiled for several instruction sets, picked at run time ([`simd`]):
//! every level gives the same bits.
//!
//! # Outputs
//!
//! Every kernel takes its outputs (`y`, `dx`, the residual's gradient) as
//! `&mut [MaybeUninit<T>]`: it writes each element exactly once and never reads one back,
//! so an output may start uninitialized. The allocating tier hands the kernels fresh,
//! unzeroed memory this way (zeroing it first would be one more pass over the output);
//! caller buffers are passed as the same view of initialized memory (`crate::buffer`).
//! The SIMD loops store through raw pointers into the same slices.
//!
//! # Streaming stores
//!
//! Non-temporal ("streaming") stores for large f32 outputs. A normal store first reads
//! the destination line into cache (a read for ownership), so writing an output costs
//! twice its size in memory traffic and evicts the input that a fused kernel is about to
//! read again; a streaming store writes whole lines straight to memory. Used only where
//! the output is larger than the last-level cache could keep anyway
//! ([`STREAM_MIN_BYTES`]), only for f32 storage, and with exactly the arithmetic of the
//! ordinary maps (forward `(x − hi)·s + b` in f32, backward `(a·dy + b·(x − m)) + k` in
//! f64, or `(a·(dy − d) + b·(x − hi)) + k` in f32 with `BackwardArithmetic::F32`;
//! separate multiplies and adds, one rounding to f32 at the end): the same bits either
//! way, tested. The order of the work never changes a bit, so it is chosen for speed: the
//! channels-last backward maps take rows in blocks that share each coefficient vector
//! they load, and every kernel runs downwards when an output lies just past one of its
//! inputs modulo 4 KiB (`descending`: an upward loop would keep loading where it just
//! stored). The kernels are with the maps they are variants of (`forward_map/x86.rs`,
//! `backward_map/x86.rs`), their framing (heads, aligned body, tails, direction) in
//! `frame.rs`, their coefficient vectors in `coefs.rs`. Elsewhere than x86-64 there are
//! no streaming kernels: every entry point returns false and the ordinary path runs.

/// An output slice: every element written exactly once, none read (see "Outputs").
pub(crate) type Out<T> = [std::mem::MaybeUninit<T>];

mod backward_map;
mod coefs;
mod forward_map;
mod frame;
mod fused;
mod schedule;
pub(crate) mod simd;
mod stats;
mod sums;

pub(crate) use backward_map::affine2;
pub(crate) use coefs::{Affine, Affine2, Affine2At};
pub(crate) use forward_map::{affine_ep, Ep};
pub use fused::fused_channels;
pub(crate) use fused::{backward_fused_cf, train_fused_cf};
pub use schedule::Workspace;
pub use simd::{simd_level, with_simd_level, SimdLevel};
pub(crate) use stats::moments;
pub(crate) use sums::{dot, DotIn};

use crate::element::Element;

/// Elements per parallel task (and per reduction segment). Fixed: it shapes the
/// reduction order, so it must not depend on the machine.
pub(crate) const SEGMENT: usize = 1 << 15;

/// Elements per block reduced by two passes while in L1.
pub(crate) const BLOCK: usize = 2048;

// ─── Streaming stores ───────────────────────────────────────────────────────────────────

/// Outputs from this size on (bytes) are written with streaming stores.
pub(crate) const STREAM_MIN_BYTES: usize = 16 << 20;

/// Whether an output of `len` elements of `T` is written with streaming stores (also
/// needs f32 storage and AVX2, checked by each kernel).
#[inline]
fn stream_wanted<T: Element>(len: usize) -> bool {
    T::as_f32s(&[]).is_some() && len * std::mem::size_of::<T>() >= STREAM_MIN_BYTES
}

/// Whether a call at level `isa` has the streaming kernels.
#[inline]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn stream_available(isa: simd::Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa.level() >= simd::SimdLevel::Avx2
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}

/// Makes this thread's streaming stores globally visible; called before a task that
/// used them ends (streaming stores are weakly ordered).
#[inline]
fn stream_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `sfence` is part of SSE, which every x86-64 CPU has; it has no operands.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}
