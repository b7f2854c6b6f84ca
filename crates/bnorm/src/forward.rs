//! The functional forward pass: `(x, params, state, mode) → (y, new state, saved)`.
//!
//! Two tiers: [`forward`] allocates its outputs and leaves the caller's state untouched
//! (it returns the new one); [`forward_into`] writes into caller buffers, updates the
//! state in place, and reuses `saved` and the [`Workspace`] so a warmed-up training step
//! allocates nothing. Both validate everything before writing anything.

use std::mem::MaybeUninit;

use crate::config::Config;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::kernels::{self, Ep, Workspace};
use crate::layout::Geometry;
use crate::masked;
use crate::parallel::Parallelism;
use crate::plan::{Epilogue, ForwardPlan, Options, Update};
use crate::running::{self, BatchStats, PendingUpdate};
use crate::state::{Mode, Params, RunningState};
use crate::stats::Moments;
use crate::sync::{self, Communicator};

/// Which statistics a step normalized with; backward differs between the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Normalized {
    /// The batch's own statistics (gradients flow through them).
    #[default]
    Batch,
    /// The running statistics (constants for backward).
    Running,
}

/// What backward needs from a forward step: per channel (and per ghost group) the center
/// and inverse standard deviation used, and the renorm corrections.
#[derive(Debug, Clone, Default)]
pub struct Saved {
    pub(crate) normalized: Normalized,
    pub(crate) geometry: Option<Geometry>,
    pub(crate) groups: usize,
    pub(crate) group_of: Vec<usize>,
    pub(crate) count: Vec<f64>,
    pub(crate) mean: Vec<f64>,
    pub(crate) invstd: Vec<f64>,
    pub(crate) var: Vec<f64>,
    pub(crate) r: Vec<f64>,
    pub(crate) d: Vec<f64>,
    pub(crate) scale: Vec<f64>,
    pub(crate) shift: Vec<f64>,
    /// The mask of a masked training step (empty otherwise) and its broadcast length.
    pub(crate) mask: Vec<bool>,
    pub(crate) mask_stride: usize,
}

impl Saved {
    /// Which statistics the step normalized with.
    pub fn normalized(&self) -> Normalized {
        self.normalized
    }
    /// The mean used per channel (`groups × C`, group-major, for ghost batches).
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }
    /// The biased variance used per channel (`groups × C` for ghost batches).
    pub fn variance(&self) -> &[f64] {
        &self.var
    }
    /// `1 / sqrt(var + eps)` per channel (`groups × C` for ghost batches).
    pub fn invstd(&self) -> &[f64] {
        &self.invstd
    }
    /// Batch renormalization's `r` per channel (empty unless a renorm training step).
    pub fn renorm_r(&self) -> &[f64] {
        &self.r
    }
    /// Batch renormalization's `d` per channel (empty unless a renorm training step).
    pub fn renorm_d(&self) -> &[f64] {
        &self.d
    }
    /// Number of ghost groups (1 for plain batch norm).
    pub fn groups(&self) -> usize {
        self.groups
    }
    /// Values per channel (per group) the batch statistics were computed over.
    pub fn count(&self) -> &[f64] {
        &self.count
    }

    /// The forward map's coefficients of the channels `range` (one group's).
    pub(crate) fn affine(&self, range: std::ops::Range<usize>) -> kernels::Affine<'_> {
        kernels::Affine {
            center: &self.mean[range.clone()],
            scale: &self.scale[range.clone()],
            shift: &self.shift[range],
        }
    }

    /// The batch statistics of a training step, as the running-statistics update reads them.
    pub(crate) fn batch_stats(&self) -> BatchStats<'_> {
        BatchStats {
            groups: self.groups.max(1),
            count: &self.count,
            mean: &self.mean,
            var: &self.var,
        }
    }
}

/// What a forward step reports besides its output.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepReport {
    /// Whether the running statistics were updated.
    pub updated: bool,
    /// Channels whose batch statistics were not finite and whose running statistics were
    /// therefore left unchanged ([`NonFinitePolicy::SkipChannel`](crate::config::NonFinitePolicy::SkipChannel)).
    pub skipped_channels: Vec<usize>,
    /// The step normalized with running statistics that no training step ever updated
    /// (`updates == 0`): a model evaluated before training, or a checkpoint without its
    /// statistics ([`ColdPolicy::Report`](crate::config::ColdPolicy::Report)).
    pub cold_statistics: bool,
    /// The step normalized some channel (or ghost group) with a single value, as
    /// [`SingleValuePolicy::Accept`](crate::config::SingleValuePolicy::Accept) allows:
    /// its output is `β` and its gradient with respect to `x` is 0.
    pub single_value: bool,
    /// The training step's update of the running statistics, when it was deferred
    /// ([`Update::Defer`]): commit it, merge it, or drop it.
    pub pending: Option<PendingUpdate>,
}

/// Output of the allocating [`forward`].
#[derive(Debug, Clone)]
pub struct Forward<T> {
    /// The normalized batch, same shape and layout as the input.
    pub y: Vec<T>,
    /// The running statistics after the step (`None` when not tracked).
    pub state: Option<RunningState>,
    /// What backward needs.
    pub saved: Saved,
    /// Skipped channels and whether the state changed.
    pub report: StepReport,
}

/// The data's channel axis holds the layer's channels.
pub(crate) fn check_channels(cfg: &Config, g: Geometry) -> Result<()> {
    if g.channels != cfg.get_channels() {
        return Err(Error::ChannelMismatch {
            expected: cfg.get_channels(),
            got: g.channels,
        });
    }
    Ok(())
}

/// Checks the common arguments of every call.
pub(crate) fn check_input(cfg: &Config, g: Geometry, len: usize, what: &'static str) -> Result<()> {
    check_channels(cfg, g)?;
    if len != g.len() {
        return Err(Error::LengthMismatch {
            what,
            expected: g.len(),
            got: len,
        });
    }
    Ok(())
}

/// Forward pass that allocates its output and returns the new state, leaving `state`
/// untouched.
///
/// ```
/// use bnorm::{Config, Layout, Mode, Params, RunningState};
/// use bnorm::expert::forward;
/// let cfg = Config::torch(2);
/// let g = Layout::NC.geometry(&[3, 2])?;
/// let x = [1.0f32, 10.0, 2.0, 20.0, 3.0, 30.0];
/// let state = RunningState::init(&cfg);
/// let out = forward(&cfg, g, &x, &Params::init(&cfg), state.as_ref(), Mode::Train)?;
/// // each channel of y has mean 0 after a training step
/// assert!((out.y[0] + out.y[2] + out.y[4]).abs() < 1e-6);
/// // PyTorch convention: running mean moved 10% of the way toward the batch mean
/// assert!((out.state.unwrap().mean[1] - 2.0).abs() < 1e-12);
/// # Ok::<(), bnorm::Error>(())
/// ```
pub fn forward<T: Element>(
    cfg: &Config,
    g: Geometry,
    x: &[T],
    params: &Params,
    state: Option<&RunningState>,
    mode: Mode,
) -> Result<Forward<T>> {
    check_input(cfg, g, x.len(), "x")?;
    let mut new_state = state.cloned();
    let mut saved = Saved::default();
    let mut ws = Workspace::default();
    let step = |y: &mut [MaybeUninit<T>]| {
        let st = new_state.as_mut();
        let opts = Options::from(Parallelism::Rayon);
        forward_out(cfg, g, x, params, st, mode, y, &mut saved, &mut ws, opts)
    };
    // SAFETY: a forward step that returns `Ok` has written every element of `y`
    // (`forward_out`'s contract).
    let (y, report) = unsafe { crate::buffer::filled(x.len(), step) }?;
    Ok(Forward {
        y,
        state: new_state,
        saved,
        report,
    })
}

fn resize(v: &mut Vec<f64>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

/// Forward pass into caller buffers: writes `y`, updates `state` in place (training
/// steps), fills `saved` for backward. On error nothing has been written: not `y`, not the
/// state, not `saved`.
///
/// `opts` ([`Options`], or just a [`Parallelism`]) adds what the plain step lacks, in any
/// combination: an [`Epilogue`](crate::expert::Epilogue) (`relu(bn(x))`, `relu(bn(x) +
/// residual)`, in the same pass over memory), a deferred update
/// ([`Update::Defer`](crate::expert::Update::Defer): the step's update of the running statistics
/// comes back in [`StepReport::pending`] instead of changing `state`), and synchronized
/// statistics over the ranks of a [`Communicator`](crate::sync::Communicator) (see
/// [`mod@crate::sync`]: collective, every rank makes the same call; a failure on any rank is
/// an error on every rank).
///
/// ```
/// use bnorm::{Config, Layout, Mode, Params, RunningState};
/// use bnorm::expert::{forward_into, Parallelism, Saved, Workspace};
/// let cfg = Config::keras(1);
/// let g = Layout::NC.geometry(&[4, 1])?;
/// let (params, mut state) = (Params::init(&cfg), RunningState::init(&cfg));
/// let (mut y, mut saved, mut ws) = (vec![0.0f64; 4], Saved::default(), Workspace::default());
/// let x = [1.0, 2.0, 3.0, 4.0];
/// forward_into(&cfg, g, &x, &params, state.as_mut(), Mode::Train, &mut y, &mut saved,
///              &mut ws, Parallelism::Sequential)?;
/// assert!((state.as_ref().unwrap().mean[0] - 0.025).abs() < 1e-12); // 0.99·0 + 0.01·2.5
/// # Ok::<(), bnorm::Error>(())
/// ```
///
/// With a ReLU epilogue and the update deferred:
///
/// ```
/// use bnorm::{Config, Layout, Mode, Params, RunningState};
/// use bnorm::expert::{forward_into, Epilogue, Options, Saved, Workspace};
/// let cfg = Config::torch(1);
/// let g = Layout::NC.geometry(&[4, 1])?;
/// let (p, mut s) = (Params::init(&cfg), RunningState::init(&cfg));
/// let mut y = vec![0.0f64; 4];
/// let opts = Options::default().epilogue(Epilogue::Relu).defer();
/// let report = forward_into(&cfg, g, &[1.0, 2.0, 3.0, 4.0], &p, s.as_mut(), Mode::Train, &mut y,
///                           &mut Saved::default(), &mut Workspace::default(), opts)?;
/// assert_eq!(&y[..2], &[0.0, 0.0]); // the two values below the mean are cut
/// assert_eq!(s.as_ref().unwrap().updates, 0); // deferred: nothing applied yet
/// report.pending.unwrap().commit(&cfg, s.as_mut().unwrap())?;
/// assert!((s.unwrap().mean[0] - 0.25).abs() < 1e-12);
/// # Ok::<(), bnorm::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn forward_into<'a, T: Element>(
    cfg: &Config,
    g: Geometry,
    x: &[T],
    params: &Params,
    state: Option<&mut RunningState>,
    mode: Mode,
    y: &mut [T],
    saved: &mut Saved,
    ws: &mut Workspace,
    opts: impl Into<Options<'a, T>>,
) -> Result<StepReport> {
    let y = crate::buffer::out(y);
    forward_out(cfg, g, x, params, state, mode, y, saved, ws, opts.into())
}

/// [`forward_into`] into an output that may be uninitialized, such as the spare capacity
/// of a `Vec` (`Vec::spare_capacity_mut`): the kernels write each element of `y` once
/// and never read it, so the output needs no zeroing first. A step that returns `Ok` has
/// initialized every element of `y`; one that returns `Err` may have written any of
/// them, or none (every plan ends in the output map or the fused pass, each of which
/// writes the whole output).
///
/// ```
/// use std::mem::MaybeUninit;
/// use bnorm::{Config, Layout, Mode, Params, RunningState};
/// use bnorm::expert::{forward_into_uninit, Parallelism, Saved, Workspace};
/// let cfg = Config::torch(1);
/// let g = Layout::NC.geometry(&[4, 1])?;
/// let (p, mut s) = (Params::init(&cfg), RunningState::init(&cfg));
/// let x = [1.0f32, 2.0, 3.0, 4.0];
/// let mut y: Vec<f32> = Vec::with_capacity(x.len());
/// let out: &mut [MaybeUninit<f32>] = &mut y.spare_capacity_mut()[..x.len()];
/// forward_into_uninit(&cfg, g, &x, &p, s.as_mut(), Mode::Train, out, &mut Saved::default(),
///                     &mut Workspace::default(), Parallelism::Sequential)?;
/// // SAFETY: the step returned `Ok`, so it initialized all `x.len()` elements.
/// unsafe { y.set_len(x.len()) };
/// assert!(y.iter().sum::<f32>().abs() < 1e-6);
/// # Ok::<(), bnorm::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn forward_into_uninit<'a, T: Element>(
    cfg: &Config,
    g: Geometry,
    x: &[T],
    params: &Params,
    state: Option<&mut RunningState>,
    mode: Mode,
    y: &mut [MaybeUninit<T>],
    saved: &mut Saved,
    ws: &mut Workspace,
    opts: impl Into<Options<'a, T>>,
) -> Result<StepReport> {
    forward_out(cfg, g, x, params, state, mode, y, saved, ws, opts.into())
}

/// [`forward_into_uninit`] with its options given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_out<T: Element>(
    cfg: &Config,
    g: Geometry,
    x: &[T],
    params: &Params,
    state: Option<&mut RunningState>,
    mode: Mode,
    y: &mut [MaybeUninit<T>],
    saved: &mut Saved,
    ws: &mut Workspace,
    opts: Options<'_, T>,
) -> Result<StepReport> {
    let planned = ForwardPlan::new(cfg, g, params, state.as_deref(), mode, &opts).and_then(|p| {
        check_input(cfg, g, x.len(), "x")?;
        check_input(cfg, g, y.len(), "y")?;
        if let Epilogue::AddRelu(r) = opts.epilogue {
            check_input(cfg, g, r.len(), "residual")?;
        }
        if let Some(mask) = opts.mask {
            masked::stride(g, mask.len())?;
        }
        Ok(p)
    });
    if let Some(comm) = opts.sync {
        // Every rank learns whether every rank can go on before anything is written.
        let local = planned.as_ref().map(|_| ()).map_err(Clone::clone);
        sync::agree_forward::<T>(comm, cfg, g, state.as_deref(), mode, local)?;
    }
    let plan = planned?;
    let mut next = std::mem::take(&mut ws.next_saved);
    let ep = opts.epilogue.kernel();
    let result = execute(
        cfg,
        &plan,
        x,
        ep,
        params,
        state.as_deref(),
        y,
        &mut next,
        ws,
        opts.sync,
        opts.mask,
    );
    if result.is_ok() {
        std::mem::swap(saved, &mut next);
    }
    ws.next_saved = next;
    let mut report = result?;
    match (plan.update, state) {
        (Some(Update::Apply), Some(s)) => {
            running::update(cfg, s, saved.batch_stats(), &report.skipped_channels);
            report.updated = true;
        }
        (Some(Update::Defer), Some(_)) => {
            report.pending = Some(PendingUpdate::from_stats(
                saved.batch_stats(),
                &report.skipped_channels,
            ));
        }
        _ => {}
    }
    Ok(report)
}

/// Executes a plan into a scratch `saved` (left in any state on error): statistics (local
/// or combined over the ranks), coefficients, output.
#[allow(clippy::too_many_arguments)]
fn execute<T: Element>(
    cfg: &Config,
    plan: &ForwardPlan,
    x: &[T],
    ep: Ep<'_, T>,
    params: &Params,
    state: Option<&RunningState>,
    y: &mut [MaybeUninit<T>],
    saved: &mut Saved,
    ws: &mut Workspace,
    comm: Option<&dyn Communicator>,
    mask: Option<&[bool]>,
) -> Result<StepReport> {
    let g = plan.geometry;
    let (c, eps, par) = (g.channels, cfg.get_eps(), plan.parallelism);
    saved.normalized = plan.normalized;
    saved.geometry = Some(g);
    saved.r.clear();
    saved.d.clear();
    saved.mask.clear();
    saved.mask_stride = 0;
    let mut report = StepReport {
        cold_statistics: plan.cold_statistics,
        single_value: plan.single_value,
        ..StepReport::default()
    };

    if plan.normalized == Normalized::Running {
        let s = state.ok_or(Error::NoRunningStatistics)?;
        saved.groups = 1;
        saved.group_of.clear();
        resize(&mut saved.count, c);
        saved.mean.clear();
        saved.mean.extend_from_slice(&s.mean);
        saved.var.clear();
        saved.var.extend_from_slice(&s.var);
        resize(&mut saved.invstd, c);
        for ch in 0..c {
            saved.invstd[ch] = 1.0 / (s.var[ch] + eps).sqrt();
        }
        set_coefficients(g, params, saved);
        write_output(g, x, ep, saved, y, par);
        return Ok(report);
    }

    // Batch statistics, per ghost group.
    let groups = plan.groups;
    let ghost = !plan.group_of.is_empty();
    saved.groups = groups;
    saved.group_of.clone_from(&plan.group_of);
    resize(&mut saved.count, groups * c);
    resize(&mut saved.mean, groups * c);
    resize(&mut saved.var, groups * c);
    resize(&mut saved.invstd, groups * c);
    let renorm = plan.renorm.zip(state.and_then(|s| s.renorm.as_ref()));
    let mut m = std::mem::take(&mut ws.tmp);
    m.clear();
    m.resize(c, Moments::default());
    if let Some(mask) = mask {
        // Masked (Keras 3): the statistics of the selected values, at reference speed.
        let k = masked::stride(g, mask.len())?;
        for (ch, &(n, mean, var)) in masked::moments(g, x, mask, k).iter().enumerate() {
            if n < 1.0 || (n == 1.0 && !plan.accept_single_value) {
                return Err(Error::BatchTooSmall {
                    channel_values: n as usize,
                });
            }
            report.single_value |= n == 1.0;
            saved.count[ch] = n;
            saved.mean[ch] = mean;
            saved.var[ch] = var;
        }
        saved.mask.extend_from_slice(mask);
        saved.mask_stride = k;
    } else if plan.fused {
        let coef = |ch: usize, mo: Moments| {
            let var = mo.variance_biased();
            let invstd = 1.0 / (var + eps).sqrt();
            let (r, d) = renorm.map_or((1.0, 0.0), |(rn, rs)| {
                renorm_rd(rn, rs, ch, mo.mean, var, eps)
            });
            let gamma = params.gamma(ch);
            (mo.mean, gamma * invstd * r, params.beta(ch) + gamma * d)
        };
        kernels::train_fused_cf(g, x, ep, y, &mut m, par, coef);
    } else if !ghost {
        kernels::moments(g, x, &mut m, ws, par);
    }
    let combined = match comm {
        Some(comm) if !ghost => sync::combine_moments(comm, &mut m),
        _ => Ok(()),
    };
    if mask.is_some() {
        ws.tmp = m; // the statistics were set above
    } else if ghost {
        ws.tmp = m;
        ghost_moments(g, x, saved, ws, plan.accept_single_value)?;
    } else {
        for (ch, mo) in m.iter().enumerate() {
            saved.count[ch] = mo.count;
            saved.mean[ch] = mo.mean;
            saved.var[ch] = mo.variance_biased();
        }
        let global = m.first().map_or(0.0, |mo| mo.count);
        ws.tmp = m;
        combined?;
        if global < 1.0 || (global == 1.0 && !plan.accept_single_value) {
            return Err(Error::BatchTooSmall {
                channel_values: global as usize,
            });
        }
        report.single_value = global == 1.0;
    }
    for i in 0..groups * c {
        saved.invstd[i] = 1.0 / (saved.var[i] + eps).sqrt();
    }
    if plan.update.is_some() {
        for ch in 0..c {
            let finite = (0..groups).all(|gi| {
                saved.mean[gi * c + ch].is_finite() && saved.var[gi * c + ch].is_finite()
            });
            if !finite {
                report.skipped_channels.push(ch);
            }
        }
        if !report.skipped_channels.is_empty() && plan.refuse_non_finite {
            return Err(Error::NonFiniteStatistics {
                channels: std::mem::take(&mut report.skipped_channels),
            });
        }
    }
    if let Some((rn, rs)) = renorm {
        // One r and d per channel, from the batch statistics or, with ghost batches, from
        // the average over groups of the group means and biased variances (tf_keras).
        resize(&mut saved.r, c);
        resize(&mut saved.d, c);
        for ch in 0..c {
            let (_, mean, var) = saved.batch_stats().averaged(ch);
            let (r, d) = renorm_rd(rn, rs, ch, mean, var, eps);
            saved.r[ch] = r;
            saved.d[ch] = d;
        }
    }
    set_coefficients(g, params, saved);
    if !plan.fused {
        write_output(g, x, ep, saved, y, par);
    }
    Ok(report)
}

/// Per-(group, channel) moments for ghost batches: each sample's moments, merged in sample
/// order into its group.
fn ghost_moments<T: Element>(
    g: Geometry,
    x: &[T],
    saved: &mut Saved,
    ws: &mut Workspace,
    accept_single_value: bool,
) -> Result<()> {
    let c = g.channels;
    let sub = sample_geometry(g);
    let per = sub.len();
    let mut acc = vec![Moments::default(); saved.groups * c];
    let mut m = vec![Moments::default(); c];
    for n in 0..g.batch {
        kernels::moments(
            sub,
            &x[n * per..(n + 1) * per],
            &mut m,
            ws,
            Parallelism::Sequential,
        );
        let gi = saved.group_of[n];
        for ch in 0..c {
            acc[gi * c + ch] = acc[gi * c + ch].merge(m[ch]);
        }
    }
    for (i, mo) in acc.iter().enumerate() {
        if mo.count < 1.0 || (mo.count == 1.0 && !accept_single_value) {
            return Err(Error::BatchTooSmall {
                channel_values: mo.count as usize,
            });
        }
        saved.count[i] = mo.count;
        saved.mean[i] = mo.mean;
        saved.var[i] = mo.variance_biased();
    }
    Ok(())
}

/// The geometry of one sample of a batch.
pub(crate) fn sample_geometry(g: Geometry) -> Geometry {
    Geometry {
        outer: g.outer.checked_div(g.batch).unwrap_or(0),
        channels: g.channels,
        inner: g.inner,
        batch: 1,
    }
}

/// Batch renormalization's corrections `r = clip(σ/σ_r, rmin, rmax)` and
/// `d = clip((μ − μ_r)/σ_r, −dmax, dmax)` with `σ_r = max(renorm_stddev, sqrt(eps))`.
pub(crate) fn renorm_rd(
    rn: crate::config::RenormLimits,
    rs: &crate::state::RenormState,
    ch: usize,
    mean: f64,
    var: f64,
    eps: f64,
) -> (f64, f64) {
    let sd = (var + eps).sqrt();
    let sr = rs.stddev[ch].max(eps.sqrt());
    (
        (sd / sr).clamp(rn.rmin, rn.rmax),
        ((mean - rs.mean[ch]) / sr).clamp(-rn.dmax, rn.dmax),
    )
}

/// Per (group, channel) `scale = γ·invstd·r`, `shift = β + γ·d` from the saved statistics.
pub(crate) fn set_coefficients(g: Geometry, params: &Params, saved: &mut Saved) {
    let c = g.channels;
    let n = saved.groups.max(1) * c;
    resize(&mut saved.scale, n);
    resize(&mut saved.shift, n);
    for i in 0..n {
        let ch = i % c;
        let (r, d) = if saved.r.is_empty() {
            (1.0, 0.0)
        } else {
            (saved.r[ch], saved.d[ch])
        };
        saved.scale[i] = params.gamma(ch) * saved.invstd[i] * r;
        saved.shift[i] = params.beta(ch) + params.gamma(ch) * d;
    }
}

/// `y = gamma·(x̂·r + d) + beta` with the saved statistics and coefficients.
fn write_output<T: Element>(
    g: Geometry,
    x: &[T],
    ep: Ep<'_, T>,
    saved: &Saved,
    y: &mut [MaybeUninit<T>],
    par: Parallelism,
) {
    let c = g.channels;
    if saved.groups <= 1 || saved.group_of.is_empty() {
        kernels::affine_ep(g, x, ep, saved.affine(0..c), y, par);
    } else {
        let sub = sample_geometry(g);
        let per = sub.len();
        for nidx in 0..g.batch {
            let o = saved.group_of[nidx] * c;
            kernels::affine_ep(
                sub,
                &x[nidx * per..(nidx + 1) * per],
                ep.slice(nidx * per..(nidx + 1) * per),
                saved.affine(o..o + c),
                &mut y[nidx * per..(nidx + 1) * per],
                Parallelism::Sequential,
            );
        }
    }
}
