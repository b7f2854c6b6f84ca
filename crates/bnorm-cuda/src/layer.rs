//! The GPU layer: configuration, parameters and running statistics on the device, and the
//! forward and backward steps as kernel sequences.

use cudarc::driver::{CudaSlice, CudaStream, LaunchArgs, LaunchConfig, PushKernelArg};

use bnorm::config::Variant;
use bnorm::expert::{ForwardPlan, Geometry, Grads, Moments, Normalized, Options, StateSummary};
use bnorm::{Config, Mode, Params, RunningState, StepReport, VarianceEstimator};

use crate::kernels::{typed_name, BLOCK};
use crate::plan::{
    channel_grid, plan_split, reduces_by_rows, reduction_width, tree_counters, tree_slots, FastDiv,
    Split,
};
use crate::{CudaError, DeviceTensor, Gpu, GpuElement, Result};

/// What backward needs from a forward step, on the device: per channel the centre and
/// inverse standard deviation used (f64) and the element-wise coefficients (f32).
#[derive(Default)]
pub struct GpuSaved {
    gpu: Option<Gpu>,
    normalized: Normalized,
    geometry: Option<Geometry>,
    count: f64,
    stats: Option<CudaSlice<f64>>,
    coef: Option<CudaSlice<f32>>,
}

impl std::fmt::Debug for GpuSaved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuSaved")
            .field("normalized", &self.normalized)
            .field("geometry", &self.geometry)
            .finish()
    }
}

/// The statistics of a forward step, downloaded ([`GpuSaved::download`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SavedStats {
    /// Which statistics the step normalized with.
    pub normalized: Normalized,
    /// Values per channel (of the batch; 0 for running statistics).
    pub count: f64,
    /// Mean used, per channel.
    pub mean: Vec<f64>,
    /// Biased variance used, per channel.
    pub var: Vec<f64>,
    /// `1 / sqrt(var + eps)` per channel.
    pub invstd: Vec<f64>,
}

impl GpuSaved {
    /// Empty; filled by a forward step.
    pub fn new() -> GpuSaved {
        GpuSaved::default()
    }

    /// Which statistics the step normalized with.
    pub fn normalized(&self) -> Normalized {
        self.normalized
    }

    /// Copies the per-channel statistics to the host (`None` before any forward step).
    pub fn download(&self) -> Result<Option<SavedStats>> {
        let (Some(gpu), Some(stats), Some(g)) = (&self.gpu, &self.stats, self.geometry) else {
            return Ok(None);
        };
        let s = gpu
            .stream
            .clone_dtoh(stats)
            .map_err(CudaError::driver("download statistics"))?;
        let c = g.channels;
        Ok(Some(SavedStats {
            normalized: self.normalized,
            count: self.count,
            mean: s[..c].to_vec(),
            var: s[c..2 * c].to_vec(),
            invstd: s[2 * c..3 * c].to_vec(),
        }))
    }
}

/// A batch-norm layer on one GPU: configuration, parameters (f64) and running statistics
/// (f64, on the device), with the core's semantics for plain batch norm in every momentum
/// convention, non-finite policy and cold policy.
///
/// Running statistics are updated on the device by a kernel that mirrors the core's
/// update rules; nothing is downloaded during a step (except with
/// [`NonFinitePolicy::Error`](bnorm::config::NonFinitePolicy::Error), which must see the statistics before writing `y`).
/// Skipped channels are therefore not in the returned [`StepReport`]: ask
/// [`skipped_channels`](GpuBatchNorm::skipped_channels).
///
/// ```no_run
/// use bnorm::{Config, Layout, Mode, Params, RunningState};
/// use bnorm_cuda::{DeviceTensor, Gpu, GpuBatchNorm, GpuSaved};
/// let gpu = Gpu::new(0)?;
/// let cfg = Config::keras(4);
/// let mut bn = GpuBatchNorm::new(&gpu, cfg.clone(), Params::init(&cfg), RunningState::init(&cfg))?;
/// let x = DeviceTensor::upload(&gpu, &vec![0.5f32; 8 * 4], &[8, 4], Layout::NC)?;
/// let mut y = DeviceTensor::zeros(&gpu, &[8, 4], Layout::NC)?;
/// let mut saved = GpuSaved::new();
/// bn.forward_into(&x, Mode::Train, &mut y, &mut saved)?;
/// let state = bn.running_state()?.unwrap();
/// assert_eq!(state.updates, 1);
/// # Ok::<(), bnorm_cuda::CudaError>(())
/// ```
pub struct GpuBatchNorm {
    pub(crate) gpu: Gpu,
    pub(crate) stream: std::sync::Arc<CudaStream>,
    pub(crate) cfg: Config,
    params: Params,
    pub(crate) tracked: bool,
    pub(crate) updates: u64,
    pub(crate) gamma: CudaSlice<f64>,
    pub(crate) beta: CudaSlice<f64>,
    pub(crate) rmean: CudaSlice<f64>,
    pub(crate) rvar: CudaSlice<f64>,
    skipped: CudaSlice<i32>,
    pub(crate) flags_valid: bool,
    /// Per-(split, channel) partials of the reductions: 4 values (n, K, d, M2) for the
    /// statistics, 2 for the backward sums.
    part: CudaSlice<f64>,
    pub(crate) grads: CudaSlice<f64>,
    pub(crate) grads_valid: bool,
    bcoef: CudaSlice<f32>,
    /// Arrival counters of the reductions' second stages (one per channel group, reset
    /// to 0 by the last block of each launch).
    counter: CudaSlice<u32>,
    /// What a forward step fills before it can fail; it replaces the caller's
    /// [`GpuSaved`] only when the step succeeds.
    next_saved: GpuSaved,
    /// The two events that order bnorm's stream with another library's (created on first
    /// use: `foreign.rs`).
    pub(crate) link: Option<[cudarc::driver::CudaEvent; 2]>,
}

impl std::fmt::Debug for GpuBatchNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBatchNorm")
            .field("gpu", &self.gpu)
            .field("cfg", &self.cfg)
            .field("updates", &self.updates)
            .finish()
    }
}

fn launch_cfg(grid: (u32, u32, u32), block: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: 0,
    }
}

/// The statistics' second stage's kernel parameters (`STATS_OUT_PARAMS` in kernels.rs).
struct StatsOutArgs<'a> {
    n: f64,
    gamma: &'a CudaSlice<f64>,
    beta: &'a CudaSlice<f64>,
    eps: f64,
    stats: &'a mut CudaSlice<f64>,
    coef: &'a mut CudaSlice<f32>,
    update: i32,
    rmean: &'a mut CudaSlice<f64>,
    rvar: &'a mut CudaSlice<f64>,
    a: f64,
    unbiased: i32,
    skipped: &'a mut CudaSlice<i32>,
}

/// Pushes `STATS_OUT_PARAMS`, in their order.
fn push_stats_out<'a>(b: &mut LaunchArgs<'a>, o: &'a mut StatsOutArgs<'_>) {
    let StatsOutArgs {
        n,
        gamma,
        beta,
        eps,
        stats,
        coef,
        update,
        rmean,
        rvar,
        a,
        unbiased,
        skipped,
    } = o;
    b.arg(&*n)
        .arg(&**gamma)
        .arg(&**beta)
        .arg(&*eps)
        .arg(&mut **stats)
        .arg(&mut **coef)
        .arg(&*update)
        .arg(&mut **rmean)
        .arg(&mut **rvar)
        .arg(&*a)
        .arg(&*unbiased)
        .arg(&mut **skipped);
}

fn ensure<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &std::sync::Arc<CudaStream>,
    slot: &mut Option<CudaSlice<T>>,
    n: usize,
) -> Result<()> {
    if slot.as_ref().map(|s| s.len()) != Some(n) {
        *slot = Some(
            stream
                .alloc_zeros(n.max(1))
                .map_err(CudaError::driver("alloc"))?,
        );
    }
    Ok(())
}

fn check_channels(cfg: &Config, g: Geometry) -> Result<()> {
    if g.channels != cfg.get_channels() {
        return Err(bnorm::Error::ChannelMismatch {
            expected: cfg.get_channels(),
            got: g.channels,
        }
        .into());
    }
    Ok(())
}

fn check_same<T: GpuElement, U: GpuElement>(
    what: &'static str,
    a: &DeviceTensor<T>,
    b: &DeviceTensor<U>,
) -> Result<()> {
    a.gpu.same(&b.gpu)?;
    if a.shape() != b.shape() || a.layout() != b.layout() {
        return Err(bnorm::Error::ShapeMismatch {
            what,
            expected: a.shape().to_vec(),
            got: b.shape().to_vec(),
        }
        .into());
    }
    Ok(())
}

impl GpuBatchNorm {
    /// A layer on `gpu`. Checks everything the core checks; refuses batch
    /// renormalization and ghost batches ([`CudaError::Unsupported`]).
    pub fn new(
        gpu: &Gpu,
        cfg: Config,
        params: Params,
        state: Option<RunningState>,
    ) -> Result<GpuBatchNorm> {
        cfg.validate()?;
        match cfg.get_variant() {
            Variant::BatchNorm => {}
            Variant::Renorm(_) => {
                return Err(CudaError::Unsupported {
                    what: "batch renormalization",
                })
            }
            Variant::Ghost(_) => {
                return Err(CudaError::Unsupported {
                    what: "ghost batches",
                })
            }
            Variant::GhostRenorm { .. } => {
                return Err(CudaError::Unsupported {
                    what: "batch renormalization of ghost batches",
                })
            }
        }
        params.validate(&cfg)?;
        let c = cfg.get_channels();
        let stream = gpu.stream.clone();
        let zeros = |n: usize| -> Result<CudaSlice<f64>> {
            stream
                .alloc_zeros(n.max(1))
                .map_err(CudaError::driver("alloc"))
        };
        let mut bn = GpuBatchNorm {
            gpu: gpu.clone(),
            stream: stream.clone(),
            tracked: cfg.get_track_running_stats(),
            updates: 0,
            gamma: zeros(c)?,
            beta: zeros(c)?,
            rmean: zeros(c)?,
            rvar: zeros(c)?,
            skipped: stream
                .alloc_zeros(c.max(1))
                .map_err(CudaError::driver("alloc"))?,
            flags_valid: false,
            next_saved: GpuSaved::new(),
            part: zeros(1)?,
            grads: zeros(2 * c)?,
            grads_valid: false,
            bcoef: stream
                .alloc_zeros(4 * c.max(1))
                .map_err(CudaError::driver("alloc"))?,
            counter: stream
                .alloc_zeros(c.max(1))
                .map_err(CudaError::driver("alloc"))?,
            params: Params::default(),
            cfg,
            link: None,
        };
        bn.set_params(params)?;
        bn.set_running_state(state)?;
        Ok(bn)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The parameters (host copy; the device holds the same values).
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Replaces gamma and beta (checked against the configuration).
    pub fn set_params(&mut self, params: Params) -> Result<()> {
        params.validate(&self.cfg)?;
        let c = self.cfg.get_channels();
        let gamma: Vec<f64> = (0..c).map(|ch| params.gamma(ch)).collect();
        let beta: Vec<f64> = (0..c).map(|ch| params.beta(ch)).collect();
        self.stream
            .memcpy_htod(&gamma, &mut self.gamma)
            .map_err(CudaError::driver("upload gamma"))?;
        self.stream
            .memcpy_htod(&beta, &mut self.beta)
            .map_err(CudaError::driver("upload beta"))?;
        self.params = params;
        Ok(())
    }

    /// Replaces the running statistics (`None` exactly when the configuration does not
    /// track them).
    pub fn set_running_state(&mut self, state: Option<RunningState>) -> Result<()> {
        match (state, self.tracked) {
            (None, false) => Ok(()),
            (None, true) => Err(bnorm::Error::NoRunningStatistics.into()),
            (Some(_), false) => Err(bnorm::Error::StateMismatch {
                reason: "running statistics given to a layer that does not track them",
            }
            .into()),
            (Some(s), true) => {
                s.validate(&self.cfg)?;
                let up = |v: &[f64], d: &mut CudaSlice<f64>| {
                    self.stream
                        .memcpy_htod(v, d)
                        .map_err(CudaError::driver("upload running statistics"))
                };
                up(&s.mean, &mut self.rmean)?;
                up(&s.var, &mut self.rvar)?;
                self.updates = s.updates;
                self.flags_valid = false;
                Ok(())
            }
        }
    }

    /// Downloads the running statistics (`None` when not tracked).
    pub fn running_state(&self) -> Result<Option<RunningState>> {
        if !self.tracked {
            return Ok(None);
        }
        let down = |d: &CudaSlice<f64>| {
            self.stream
                .clone_dtoh(d)
                .map_err(CudaError::driver("download running statistics"))
        };
        let s = RunningState::from_values(
            &self.cfg,
            down(&self.rmean)?,
            down(&self.rvar)?,
            self.updates,
        )?;
        Ok(Some(s))
    }

    /// Channels whose batch statistics were not finite in the last training step, and
    /// whose running statistics were therefore kept (downloads C flags).
    pub fn skipped_channels(&self) -> Result<Vec<usize>> {
        if !self.flags_valid {
            return Ok(Vec::new());
        }
        let flags = self
            .stream
            .clone_dtoh(&self.skipped)
            .map_err(CudaError::driver("download flags"))?;
        Ok(flags
            .iter()
            .take(self.cfg.get_channels())
            .enumerate()
            .filter(|(_, &f)| f != 0)
            .map(|(c, _)| c)
            .collect())
    }

    /// Parameter gradients of the last backward step (downloads 2·C values).
    pub fn grads(&self) -> Result<Grads> {
        if !self.grads_valid {
            return Err(bnorm::Error::SavedMismatch {
                reason: "no backward step ran",
            }
            .into());
        }
        let g = self
            .stream
            .clone_dtoh(&self.grads)
            .map_err(CudaError::driver("download gradients"))?;
        let c = self.cfg.get_channels();
        Ok(Grads {
            dweight: g[..c].to_vec(),
            dbias: g[c..2 * c].to_vec(),
        })
    }

    /// Forward step that allocates its output and its saved statistics.
    pub fn forward<T: GpuElement>(
        &mut self,
        x: &DeviceTensor<T>,
        mode: Mode,
    ) -> Result<(DeviceTensor<T>, GpuSaved, StepReport)> {
        let mut y = DeviceTensor::zeros(&x.gpu, x.shape(), x.layout())?;
        let mut saved = GpuSaved::new();
        let report = self.forward_into(x, mode, &mut y, &mut saved)?;
        Ok((y, saved, report))
    }

    /// Forward step into `y` (same shape and layout as `x`): writes `y`, updates the
    /// running statistics on a training step, fills `saved`. Asynchronous: returns once
    /// the kernels are queued. On error nothing has been written: not `y`, not the
    /// running statistics, not `saved` (the step fills a spare that replaces it on
    /// success).
    pub fn forward_into<T: GpuElement>(
        &mut self,
        x: &DeviceTensor<T>,
        mode: Mode,
        y: &mut DeviceTensor<T>,
        saved: &mut GpuSaved,
    ) -> Result<StepReport> {
        let mut next = std::mem::take(&mut self.next_saved);
        let result = self.forward_step(x, mode, y, &mut next);
        if result.is_ok() {
            std::mem::swap(saved, &mut next);
        }
        self.next_saved = next;
        result
    }

    /// [`forward_into`](GpuBatchNorm::forward_into) into a scratch `saved`, left in any
    /// state on error.
    fn forward_step<T: GpuElement>(
        &mut self,
        x: &DeviceTensor<T>,
        mode: Mode,
        y: &mut DeviceTensor<T>,
        saved: &mut GpuSaved,
    ) -> Result<StepReport> {
        self.gpu.same(&x.gpu)?;
        check_same("y", x, y)?;
        let g = x.geometry();
        // The core's plan makes every semantic decision (statistics used, cold statistics,
        // batch size, whether the running statistics update and may refuse); the values
        // it would check live on the device and were checked when they were set.
        let state = self.tracked.then_some(StateSummary {
            updates: self.updates,
            renorm: false,
        });
        let opts = Options::<f32>::default();
        let plan = ForwardPlan::decide(&self.cfg, g, state, mode, &opts)?;
        let c = g.channels;
        let normalized = plan.normalized;
        let mut report = StepReport {
            cold_statistics: plan.cold_statistics,
            single_value: plan.single_value,
            ..StepReport::default()
        };
        let stream = self.stream.clone();
        ensure(&stream, &mut saved.stats, 3 * c)?;
        ensure(&stream, &mut saved.coef, 4 * c)?;
        saved.gpu = Some(self.gpu.clone());
        saved.geometry = Some(g);
        saved.normalized = normalized;
        let (Some(stats), Some(coef)) = (saved.stats.as_mut(), saved.coef.as_mut()) else {
            unreachable!("ensured above")
        };
        let c32 = c as u32;
        let eps = self.cfg.get_eps();
        let cgrid = launch_cfg((channel_grid(c), 1, 1), (BLOCK, 1, 1));
        let mut batch_split = None;
        if normalized == Normalized::Running && !g.is_empty() {
            // one launch: the normalization on the reduction's plan computes the
            // coefficients from the running statistics and writes them with `stats`
            saved.count = 0.0;
            let cf = !reduces_by_rows(g);
            let (split, _) = self.plan::<T>(
                if cf {
                    "bn_norm_back_cf"
                } else {
                    "bn_norm_back_cl"
                },
                None,
                g,
            )?;
            self.launch_norm_back(x, y, &mut *stats, &mut *coef, split, true)?;
        } else if normalized == Normalized::Running {
            // an empty batch: nothing to normalize, the statistics for the backward only
            saved.count = 0.0;
            let f = self.gpu.function("bn_coef_running")?;
            let mut b = stream.launch_builder(&f);
            b.arg(&c32)
                .arg(&self.rmean)
                .arg(&self.rvar)
                .arg(&self.gamma)
                .arg(&self.beta)
                .arg(&eps)
                .arg(&mut *stats)
                .arg(&mut *coef);
            // SAFETY: arguments match bn_coef_running's signature; every buffer holds at
            // least C (stats 3·C, coef 4·C) elements and the grid covers C threads.
            unsafe { b.launch(cgrid) }.map_err(CudaError::driver("bn_coef_running"))?;
        } else {
            let n = g.per_channel() as f64;
            saved.count = n;
            let t = self.updates + 1;
            let a = self.cfg.get_momentum().new_weight(t);
            let unbiased =
                i32::from(self.cfg.get_running_variance() == VarianceEstimator::Unbiased);
            // The running update runs in the reduction's second stage, unless the policy
            // must see the statistics first.
            let fused_update = plan.update.is_some() && !plan.refuse_non_finite;
            let split = self.reduce_stats(
                x,
                g,
                &mut *stats,
                &mut *coef,
                fused_update.then_some((a, unbiased)),
            )?;
            batch_split = Some(split);
            if fused_update {
                // counted once the update is queued (a failed launch changes nothing)
                self.updates = t;
                self.flags_valid = true;
                report.updated = true;
            }
            if plan.update.is_some() && !fused_update {
                // NonFinitePolicy::Error: refuse before anything is written
                let s = stream
                    .clone_dtoh(&*stats)
                    .map_err(CudaError::driver("download statistics"))?;
                let bad: Vec<usize> = (0..c)
                    .filter(|&ch| !(s[ch].is_finite() && s[c + ch].is_finite()))
                    .collect();
                if !bad.is_empty() {
                    return Err(bnorm::Error::NonFiniteStatistics { channels: bad }.into());
                }
                let f = self.gpu.function("bn_running_update")?;
                let mut b = stream.launch_builder(&f);
                b.arg(&c32)
                    .arg(&n)
                    .arg(&*stats)
                    .arg(&mut self.rmean)
                    .arg(&mut self.rvar)
                    .arg(&a)
                    .arg(&unbiased)
                    .arg(&mut self.skipped);
                // SAFETY: arguments match bn_running_update; every buffer holds ≥ C values.
                unsafe { b.launch(cgrid) }.map_err(CudaError::driver("bn_running_update"))?;
                // counted once the update is queued (a failed launch changes nothing)
                self.updates = t;
                self.flags_valid = true;
                report.updated = true;
            }
        }
        if let Some(split) = batch_split {
            // on the reduction's blocks, backwards: the tail of x still in L2 is read first
            self.launch_norm_back(x, y, &mut *stats, &mut *coef, split, false)?;
        }
        Ok(report)
    }

    /// Per-channel moments of a batch (the local half of synchronized batch norm, or a
    /// recalibration batch): `(count, mean, M2)` computed on the device, downloaded.
    pub fn local_moments<T: GpuElement>(&mut self, x: &DeviceTensor<T>) -> Result<Vec<Moments>> {
        self.gpu.same(&x.gpu)?;
        let g = x.geometry();
        check_channels(&self.cfg, g)?;
        if g.per_channel() == 0 {
            return Ok(vec![Moments::default(); g.channels]);
        }
        let stream = self.stream.clone();
        let c = g.channels;
        let (mut stats, mut coef) = (None, None);
        ensure(&stream, &mut stats, 3 * c)?;
        ensure::<f32>(&stream, &mut coef, 4 * c)?;
        let (Some(mut stats), Some(mut coef)) = (stats, coef) else {
            unreachable!("ensured above")
        };
        let n = g.per_channel() as f64;
        self.reduce_stats(x, g, &mut stats, &mut coef, None)?;
        let s = stream
            .clone_dtoh(&stats)
            .map_err(CudaError::driver("download statistics"))?;
        Ok((0..c)
            .map(|ch| Moments {
                count: n,
                mean: s[ch],
                m2: s[c + ch] * n,
            })
            .collect())
    }

    /// Backward step that allocates `dx`. Parameter gradients: [`grads`](Self::grads).
    pub fn backward<T: GpuElement>(
        &mut self,
        x: &DeviceTensor<T>,
        dy: &DeviceTensor<T>,
        saved: &GpuSaved,
    ) -> Result<DeviceTensor<T>> {
        let mut dx = DeviceTensor::zeros(&x.gpu, x.shape(), x.layout())?;
        self.backward_into(x, dy, saved, &mut dx)?;
        Ok(dx)
    }

    /// Backward step into `dx`: `dx = a·dy + b·(x − μ) + k` per channel (b = k = 0 after
    /// a step normalized with running statistics); dγ and dβ stay on the device until
    /// [`grads`](Self::grads). Asynchronous. On error nothing has been written.
    pub fn backward_into<T: GpuElement>(
        &mut self,
        x: &DeviceTensor<T>,
        dy: &DeviceTensor<T>,
        saved: &GpuSaved,
        dx: &mut DeviceTensor<T>,
    ) -> Result<()> {
        self.gpu.same(&x.gpu)?;
        check_same("dy", x, dy)?;
        check_same("dx", x, dx)?;
        let g = x.geometry();
        check_channels(&self.cfg, g)?;
        let (Some(sgpu), Some(stats), Some(coef)) = (&saved.gpu, &saved.stats, &saved.coef) else {
            return Err(bnorm::Error::SavedMismatch {
                reason: "the forward step saw another shape (or no forward step ran)",
            }
            .into());
        };
        self.gpu.same(sgpu)?;
        if saved.geometry != Some(g) {
            return Err(bnorm::Error::SavedMismatch {
                reason: "the forward step saw another shape (or no forward step ran)",
            }
            .into());
        }
        let c = g.channels;
        let stream = self.stream.clone();
        if g.is_empty() {
            // No values: dγ = dβ = 0 and dx is empty; nothing to launch.
            stream
                .memcpy_htod(&vec![0.0f64; 2 * c], &mut self.grads)
                .map_err(CudaError::driver("zero gradients"))?;
            self.grads_valid = true;
            return Ok(());
        }
        let n = if saved.count > 0.0 {
            saved.count
        } else {
            g.per_channel() as f64
        };
        let batch = i32::from(saved.normalized == Normalized::Batch);
        let cf = !reduces_by_rows(g);
        let (split, name) = self.plan::<T>(
            if cf {
                "bn_bwd_reduce_cf"
            } else {
                "bn_bwd_reduce_cl"
            },
            Some(if cf { "bn_dx_back_cf" } else { "bn_dx_back_cl" }),
            g,
        )?;
        self.ensure_part(split, c)?;
        let rcfg = launch_cfg(split.grid(c), split.block());
        let c32 = c as u32;
        let f = self.gpu.function(&name)?;
        match split {
            Split::ChannelsFirst { chunk, vec, .. } => {
                let iv = (g.inner / vec as usize) as u32;
                let fi = FastDiv::new(iv);
                let pv = (g.per_channel() / vec as usize) as u32;
                let mut b = stream.launch_builder(&f);
                b.arg(&x.buf)
                    .arg(&dy.buf)
                    .arg(stats)
                    .arg(&c32)
                    .arg(&iv)
                    .arg(&fi.m)
                    .arg(&fi.s)
                    .arg(&pv)
                    .arg(&chunk)
                    .arg(&mut self.part)
                    .arg(&mut self.counter)
                    .arg(&n)
                    .arg(&self.gamma)
                    .arg(&batch)
                    .arg(&mut self.grads)
                    .arg(&mut self.bcoef);
                // SAFETY: arguments match bn_bwd_reduce_cf_* (with BWD_OUT_PARAMS); the plan
                // covers each channel's vectors exactly once within x and dy (same geometry,
                // vec divides inner); part holds 2·S·C values, counter ≥ C, stats 3·C,
                // grads 2·C, bcoef 4·C.
                unsafe { b.launch(rcfg) }.map_err(CudaError::driver("bn_bwd_reduce_cf"))?;
            }
            Split::ChannelsLast { rows, inner, .. } => {
                let o = g.outer as u32;
                let mut b = stream.launch_builder(&f);
                b.arg(&x.buf)
                    .arg(&dy.buf)
                    .arg(stats)
                    .arg(&o)
                    .arg(&c32)
                    .arg(&inner)
                    .arg(&rows)
                    .arg(&mut self.part)
                    .arg(&mut self.counter)
                    .arg(&n)
                    .arg(&self.gamma)
                    .arg(&batch)
                    .arg(&mut self.grads)
                    .arg(&mut self.bcoef);
                // SAFETY: as above, by-rows plan (rows × 32·vec-column tiles of W = C·inner
                // columns, vec divides W, column w in channel w / inner < C); part holds
                // 2·tree_slots(S)·W values and counter max(C, tree_counters) (ensure_part),
                // what the merge tree of finish_by_rows indexes.
                unsafe { b.launch(rcfg) }.map_err(CudaError::driver("bn_bwd_reduce_cl"))?;
            }
        }
        self.grads_valid = true;
        // dx on the reduction's blocks, backwards: the tails of x and dy still in L2 first
        let rcfg = launch_cfg(split.grid(c), split.block());
        match split {
            Split::ChannelsFirst { chunk, vec, .. } => {
                let f = self
                    .gpu
                    .function(&typed_name("bn_dx_back_cf", T::TAG, vec))?;
                let iv = (g.inner / vec as usize) as u32;
                let fi = FastDiv::new(iv);
                let pv = (g.per_channel() / vec as usize) as u32;
                let mut b = stream.launch_builder(&f);
                b.arg(&x.buf)
                    .arg(&dy.buf)
                    .arg(&mut dx.buf)
                    .arg(&c32)
                    .arg(&iv)
                    .arg(&fi.m)
                    .arg(&fi.s)
                    .arg(&pv)
                    .arg(&chunk)
                    .arg(coef)
                    .arg(&self.bcoef)
                    .arg(&batch);
                // SAFETY: arguments match bn_dx_back_cf_*; the reduction's plan covers each
                // channel's vectors exactly once inside x, dy and dx (same checked shape, vec
                // divides inner); coef and bcoef hold C float4; x is not read when batch = 0.
                unsafe { b.launch(rcfg) }.map_err(CudaError::driver("bn_dx_back_cf"))?;
            }
            Split::ChannelsLast {
                rows, vec, inner, ..
            } => {
                let f = self
                    .gpu
                    .function(&typed_name("bn_dx_back_cl", T::TAG, vec))?;
                let o = g.outer as u32;
                let mut b = stream.launch_builder(&f);
                b.arg(&x.buf)
                    .arg(&dy.buf)
                    .arg(&mut dx.buf)
                    .arg(&o)
                    .arg(&c32)
                    .arg(&inner)
                    .arg(&rows)
                    .arg(coef)
                    .arg(&self.bcoef)
                    .arg(&batch);
                // SAFETY: arguments match bn_dx_back_cl_*; rows × 32·vec-column tiles inside
                // x, dy and dx (vec divides W = C·inner; threads past W return; column w in
                // channel w / inner < C); coef and bcoef hold C
                // float4; x is not read when batch = 0.
                unsafe { b.launch(rcfg) }.map_err(CudaError::driver("bn_dx_back_cl"))?;
            }
        }
        Ok(())
    }

    fn ensure_part(&mut self, split: Split, c: usize) -> Result<()> {
        // 4 values per (split, channel) for the statistics' moments, 2 for the backward;
        // channels-last, the merge tree's levels after the splits' own, and its counters
        let s = split.splits() as usize;
        let (slots, counters) = match split {
            Split::ChannelsLast { inner: 1, .. } => {
                let tiles = split.grid(c).0 as usize;
                (tree_slots(s), tree_counters(s, tiles).max(c))
            }
            _ => (s, c),
        };
        let need = 4 * slots * split.columns(c);
        if self.part.len() < need {
            self.part = self
                .stream
                .alloc_zeros(need)
                .map_err(CudaError::driver("alloc"))?;
        }
        if self.counter.len() < counters {
            // zeroed: every counter is reset by the block that completes it
            self.counter = self
                .stream
                .alloc_zeros(counters)
                .map_err(CudaError::driver("alloc"))?;
        }
        Ok(())
    }

    /// The reduction plan for `g`: the vector width, then the splits for the resident
    /// blocks per SM of the kernel `base` at that width.
    /// `also` names a kernel launched on the same plan afterwards (`bn_norm_back_*`,
    /// `bn_dx_back_*`): the wave is the smaller of the two kernels' resident blocks.
    fn plan<T: GpuElement>(
        &self,
        base: &str,
        also: Option<&str>,
        g: Geometry,
    ) -> Result<(Split, String)> {
        let vec = reduction_width(g);
        let name = typed_name(base, T::TAG, vec);
        let mut resident = self.gpu.resident_blocks(&name)? as usize;
        if let Some(other) = also {
            let other = self.gpu.resident_blocks(&typed_name(other, T::TAG, vec))?;
            resident = resident.min(other as usize);
        }
        Ok((plan_split(g, self.gpu.sm_count(), resident), name))
    }

    /// Queues the statistics reduction of `x` (partial moments in `self.part`) and
    /// its second stage in the last block of each channel group: `stats` (3·C) and `coef`
    /// (4·C), and with `update = Some((a, unbiased))` the running statistics.
    fn reduce_stats<T: GpuElement>(
        &mut self,
        x: &DeviceTensor<T>,
        g: Geometry,
        stats: &mut CudaSlice<f64>,
        coef: &mut CudaSlice<f32>,
        update: Option<(f64, i32)>,
    ) -> Result<Split> {
        let c = g.channels;
        let cf = !reduces_by_rows(g);
        let (split, name) = if cf {
            self.plan::<T>("bn_stats_cf", Some("bn_norm_back_cf"), g)?
        } else {
            self.plan::<T>("bn_stats_cl", Some("bn_norm_back_cl"), g)?
        };
        self.ensure_part(split, c)?;
        let stream = self.stream.clone();
        let rcfg = launch_cfg(split.grid(c), split.block());
        let c32 = c as u32;
        let f = self.gpu.function(&name)?;
        let (a, unbiased) = update.unwrap_or((0.0, 0));
        let mut out = StatsOutArgs {
            n: g.per_channel() as f64,
            gamma: &self.gamma,
            beta: &self.beta,
            eps: self.cfg.get_eps(),
            stats,
            coef,
            update: i32::from(update.is_some()),
            rmean: &mut self.rmean,
            rvar: &mut self.rvar,
            a,
            unbiased,
            skipped: &mut self.skipped,
        };
        match split {
            Split::ChannelsFirst { chunk, vec, .. } => {
                let iv = (g.inner / vec as usize) as u32;
                let fi = FastDiv::new(iv);
                let pv = (g.per_channel() / vec as usize) as u32;
                let mut b = stream.launch_builder(&f);
                b.arg(&x.buf)
                    .arg(&c32)
                    .arg(&iv)
                    .arg(&fi.m)
                    .arg(&fi.s)
                    .arg(&pv)
                    .arg(&chunk)
                    .arg(&mut self.part)
                    .arg(&mut self.counter);
                push_stats_out(&mut b, &mut out);
                // SAFETY: arguments match bn_stats_cf_*; vec divides inner, so every vector
                // lies inside one row of x and is aligned (256-byte aligned allocation); the
                // plan keeps every index inside x (checked geometry < 2^31 vectors); part
                // holds 4·S·C values.
                unsafe { b.launch(rcfg) }.map_err(CudaError::driver("bn_stats_cf"))?;
            }
            Split::ChannelsLast { rows, inner, .. } => {
                let o = g.outer as u32;
                let mut b = stream.launch_builder(&f);
                b.arg(&x.buf)
                    .arg(&o)
                    .arg(&c32)
                    .arg(&inner)
                    .arg(&rows)
                    .arg(&mut self.part)
                    .arg(&mut self.counter);
                push_stats_out(&mut b, &mut out);
                // SAFETY: arguments match bn_stats_cl_*; vec divides W = C·inner, threads whose
                // first column is ≥ W load nothing; part holds 4·tree_slots(S)·W values and
                // counter max(C, tree_counters) (ensure_part), what the merge tree indexes.
                unsafe { b.launch(rcfg) }.map_err(CudaError::driver("bn_stats_cl"))?;
            }
        }
        Ok(split)
    }

    /// The forward's normalization on a reduction plan (`bn_norm_back_*`): with the batch
    /// statistics' `coef` (training), or `from_running`, computing the coefficients from
    /// the running statistics in the kernel and writing them to `stats` (3·C) and `coef`.
    fn launch_norm_back<T: GpuElement>(
        &self,
        x: &DeviceTensor<T>,
        y: &mut DeviceTensor<T>,
        stats: &mut CudaSlice<f64>,
        coef: &mut CudaSlice<f32>,
        split: Split,
        from_running: bool,
    ) -> Result<()> {
        let g = x.geometry();
        let c = g.channels;
        let cfg = launch_cfg(split.grid(c), split.block());
        let c32 = c as u32;
        let run = i32::from(from_running);
        let eps = self.cfg.get_eps();
        match split {
            Split::ChannelsFirst { chunk, vec, .. } => {
                let f = self
                    .gpu
                    .function(&typed_name("bn_norm_back_cf", T::TAG, vec))?;
                let iv = (g.inner / vec as usize) as u32;
                let fi = FastDiv::new(iv);
                let pv = (g.per_channel() / vec as usize) as u32;
                let mut b = self.stream.launch_builder(&f);
                b.arg(&x.buf)
                    .arg(&mut y.buf)
                    .arg(&c32)
                    .arg(&iv)
                    .arg(&fi.m)
                    .arg(&fi.s)
                    .arg(&pv)
                    .arg(&chunk)
                    .arg(coef)
                    .arg(&run)
                    .arg(&self.rmean)
                    .arg(&self.rvar)
                    .arg(&self.gamma)
                    .arg(&self.beta)
                    .arg(&eps)
                    .arg(stats);
                // SAFETY: arguments match bn_norm_back_cf_* (with RUNNING_IN_PARAMS); the
                // reduction plan covers each channel's vectors exactly once inside x and y
                // (same checked shape, vec divides inner); coef holds C float4, stats 3·C,
                // the running statistics and parameters C values each.
                unsafe { b.launch(cfg) }.map_err(CudaError::driver("bn_norm_back_cf"))?;
            }
            Split::ChannelsLast {
                rows, vec, inner, ..
            } => {
                let f = self
                    .gpu
                    .function(&typed_name("bn_norm_back_cl", T::TAG, vec))?;
                let o = g.outer as u32;
                let mut b = self.stream.launch_builder(&f);
                b.arg(&x.buf)
                    .arg(&mut y.buf)
                    .arg(&o)
                    .arg(&c32)
                    .arg(&inner)
                    .arg(&rows)
                    .arg(coef)
                    .arg(&run)
                    .arg(&self.rmean)
                    .arg(&self.rvar)
                    .arg(&self.gamma)
                    .arg(&self.beta)
                    .arg(&eps)
                    .arg(stats);
                // SAFETY: arguments match bn_norm_back_cl_* (with RUNNING_IN_PARAMS); rows ×
                // 32·vec-column tiles inside x and y (vec divides W = C·inner; threads past W
                // return; column w in channel w / inner < C); coef holds C float4, stats
                // 3·C, the running statistics and parameters C values each.
                unsafe { b.launch(cfg) }.map_err(CudaError::driver("bn_norm_back_cl"))?;
            }
        }
        Ok(())
    }
}
