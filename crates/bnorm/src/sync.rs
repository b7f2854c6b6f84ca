//! Synchronized batch normalization: the statistics of the *global* batch of several
//! data-parallel ranks, exactly.
//!
//! In data-parallel training each rank (a thread, a process, a machine) holds a slice of
//! the batch. [`forward_into`] and [`backward_into`] with options
//! [`synchronized`](crate::expert::Options::synchronized) over a [`Communicator`] compute the step
//! over the concatenation of every rank's slice, with each rank reading and writing only
//! its own slice — the same plan as a local step with a statistics-combine step, so every
//! option (epilogues, deferred updates) combines with it:
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
//! supported; [`Variant::Ghost`] and [`Variant::GhostRenorm`] are refused
//! ([`Error::InvalidConfig`]) because ghost
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
//! use bnorm::sync::{Communicator, ThreadComm};
//! use bnorm::{Config, Layout, Mode, Params, RunningState};
//! use bnorm::expert::{backward_into, forward_into, BackwardOptions, Grads, Options, Parallelism, Saved, Workspace};
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
//!             let opts = Options::from(Parallelism::Sequential).synchronized(&comm);
//!             forward_into(cfg, g, xs, &p, st.as_mut(), Mode::Train, &mut y, &mut saved,
//!                          &mut ws, opts)?;
//!             let (mut dx, mut grads) = (vec![0.0f32; xs.len()], Grads::default());
//!             let opts = BackwardOptions::from(Parallelism::Sequential).synchronized(&comm);
//!             backward_into(cfg, g, xs, &y, &p, &saved, &mut dx, &mut grads, &mut ws, opts)?;
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
//! [`forward_into`]: crate::expert::forward_into
//! [`backward_into`]: crate::expert::backward_into
//! [`Variant::Renorm`]: crate::config::Variant::Renorm
//! [`Variant::Ghost`]: crate::config::Variant::Ghost
//! [`Variant::GhostRenorm`]: crate::config::Variant::GhostRenorm

use std::sync::{Arc, Barrier, Mutex};

use crate::config::{
    BackwardArithmetic, Config, Momentum, NonFinitePolicy, SingleValuePolicy, VarianceEstimator,
    Variant,
};
use crate::element::{DType, Element};
use crate::error::{Error, Result};
use crate::forward::{Normalized, Saved};
use crate::layout::Geometry;
use crate::state::{Mode, RunningState};
use crate::stats::Moments;

/// The collectives synchronized batch norm needs: rank, size, and an all-gather of f64
/// buffers. Implement it for another transport (NCCL, gloo, a test double) to use
/// [`forward_into`](crate::expert::forward_into) and [`backward_into`](crate::expert::backward_into) over it (options
/// [`synchronized`](crate::expert::Options::synchronized)).
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
        source: None,
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
                        source: None,
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
    h.f(cfg.get_eps());
    match cfg.get_momentum() {
        Momentum::NewWeight(a) => (h.word(1), h.f(a)),
        Momentum::Cumulative => (h.word(2), h.f(0.0)),
        Momentum::Decay(d) => (h.word(3), h.f(d)),
        Momentum::DebiasedDecay(d) => (h.word(4), h.f(d)),
        Momentum::WarmupDecay(d) => (h.word(5), h.f(d)),
    };
    h.word(match cfg.get_running_variance() {
        VarianceEstimator::Biased => 1,
        VarianceEstimator::Unbiased => 2,
    });
    h.word(cfg.get_scale() as u64);
    h.word(cfg.get_center() as u64);
    h.word(cfg.get_track_running_stats() as u64);
    h.word(match cfg.get_non_finite() {
        NonFinitePolicy::SkipChannel => 1,
        NonFinitePolicy::Error => 2,
    });
    h.word(match cfg.get_backward_arithmetic() {
        BackwardArithmetic::F64 => 1,
        BackwardArithmetic::F32 => 2,
    });
    h.word(match cfg.get_single_value() {
        SingleValuePolicy::Refuse => 1,
        SingleValuePolicy::Accept => 2,
    });
    match cfg.get_variant() {
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
        Variant::GhostRenorm { ghost, renorm } => {
            h.word(4);
            h.word(ghost.virtual_batch_size as u64);
            for v in [renorm.rmax, renorm.rmin, renorm.dmax, renorm.momentum] {
                h.f(v);
            }
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
            source: None,
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

/// The header of a forward step, agreed on every rank before anything is written:
/// `local` is this rank's own validation. The step goes on only where every rank's did.
pub(crate) fn agree_forward<T: Element>(
    comm: &dyn Communicator,
    cfg: &Config,
    g: Geometry,
    state: Option<&RunningState>,
    mode: Mode,
    local: Result<()>,
) -> Result<()> {
    let mut header = [0.0; HEADER];
    header[H_OP] = OP_FORWARD;
    header[H_MODE] = match mode {
        Mode::Train => 0.0,
        Mode::Inference => 1.0,
        Mode::Frozen => 2.0,
    };
    header[H_CHANNELS] = cfg.get_channels() as f64;
    config_fingerprint(cfg).put(&mut header, H_CFG_LO, H_CFG_HI);
    header[H_DTYPE] = dtype_code(T::DTYPE);
    header[H_UPDATES] = state.map_or(-1.0, |s| s.updates as f64);
    header[H_COUNT] = g.per_channel() as f64;
    agree(comm, header, local, &mut Vec::new())
}

/// Replaces each rank's per-channel moments by those of the global batch: all-gathered
/// as `(count, mean, M2)` and merged in rank order (bit-identical on every rank).
pub(crate) fn combine_moments(comm: &dyn Communicator, m: &mut [Moments]) -> Result<()> {
    let c = m.len();
    let mut payload = Vec::with_capacity(3 * c);
    for mo in m.iter() {
        payload.extend_from_slice(&[mo.count, mo.mean, mo.m2]);
    }
    let mut gathered = Vec::new();
    comm.all_gather_f64(&payload, &mut gathered)?;
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
    Ok(())
}

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

/// The header of a backward step, agreed on every rank: `local` is this rank's own
/// validation; the saved statistics must be the same on every rank and, with batch
/// statistics, count exactly the values of all ranks.
pub(crate) fn agree_backward<T: Element>(
    comm: &dyn Communicator,
    cfg: &Config,
    g: Geometry,
    saved: &Saved,
    local: Result<()>,
) -> Result<()> {
    let mut header = [0.0; HEADER];
    header[H_OP] = OP_BACKWARD;
    header[H_MODE] = match saved.normalized {
        Normalized::Batch => 0.0,
        Normalized::Running => 1.0,
    };
    header[H_CHANNELS] = cfg.get_channels() as f64;
    config_fingerprint(cfg).put(&mut header, H_CFG_LO, H_CFG_HI);
    header[H_DTYPE] = dtype_code(T::DTYPE);
    header[H_UPDATES] = -1.0;
    saved_fingerprint(saved).put(&mut header, H_SAVED_LO, H_SAVED_HI);
    header[H_COUNT] = g.per_channel() as f64;
    let mut gathered = Vec::new();
    agree(comm, header, local, &mut gathered)?;
    if let Some(r) = gathered.chunks_exact(HEADER).position(|h| {
        h[H_SAVED_LO].to_bits() != gathered[H_SAVED_LO].to_bits()
            || h[H_SAVED_HI].to_bits() != gathered[H_SAVED_HI].to_bits()
    }) {
        return Err(Error::SyncMismatch {
            rank: r,
            what: "saved statistics (another forward step, or one not synchronized)",
        });
    }
    if saved.normalized == Normalized::Batch {
        let total: f64 = gathered.chunks_exact(HEADER).map(|h| h[H_COUNT]).sum();
        if saved.count.first() != Some(&total) {
            return Err(Error::SyncMismatch {
                rank: 0,
                what: "saved statistics (the forward step was not synchronized over these ranks)",
            });
        }
    }
    Ok(())
}

/// Replaces each rank's per-channel gradient sums `(Σdy, Σdy·(x − μ))` by those of the
/// global batch, summed in rank order.
pub(crate) fn combine_sums(comm: &dyn Communicator, sums: &mut [(f64, f64)]) -> Result<()> {
    let c = sums.len();
    let mut payload = Vec::with_capacity(2 * c);
    for &(a, b) in sums.iter() {
        payload.extend_from_slice(&[a, b]);
    }
    let mut gathered = Vec::new();
    comm.all_gather_f64(&payload, &mut gathered)?;
    for (ch, s) in sums.iter_mut().enumerate() {
        let mut ranks = gathered.chunks_exact(2 * c);
        let Some(first) = ranks.next() else {
            continue;
        };
        *s = ranks.fold((first[2 * ch], first[2 * ch + 1]), |acc, r| {
            (acc.0 + r[2 * ch], acc.1 + r[2 * ch + 1])
        });
    }
    Ok(())
}
