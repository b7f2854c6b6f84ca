//! # bnorm-candle — bnorm's batch normalization as a candle layer
//!
//! A drop-in replacement for `candle_nn::BatchNorm` that runs bnorm's own forward and
//! backward kernels (one custom op with a backward pass, not a composition of tensor ops),
//! offers bnorm's explicit modes and every convention, and loads and saves under
//! PyTorch's names (`weight`, `bias`, `running_mean`, `running_var`,
//! `num_batches_tracked`), so a PyTorch checkpoint's batch-norm layers load as they are.
//!
//! ```
//! use bnorm_candle::BatchNorm;
//! use bnorm::{Config, Layout, Mode};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let bn = BatchNorm::new(Config::torch(3), Layout::NCHW, vb.pp("bn"))?;
//! let x = Tensor::randn(0f32, 1.0, (4, 3, 5, 5), &Device::Cpu)?;
//! let y = bn.forward_mode(&x, Mode::Train)?;          // batch statistics, stats updated
//! assert_eq!(bn.running_state()?.unwrap().updates, 1);
//! let y_eval = bn.forward_mode(&x, Mode::Inference)?; // running statistics
//! assert_eq!(y.dims(), y_eval.dims());
//! # Ok::<(), candle_core::Error>(())
//! ```
//!
//! Running statistics are kept exactly (f64) inside the layer and mirrored into candle
//! variables after every training step, so saving the `VarMap` saves them. The variables
//! stay the source of truth: values put into them from outside — the usual reload,
//! `varmap.load(path)` after building the model — are what the next call uses.
//! Only training steps update them: `ModuleT::forward_t(x, true)` is [`Mode::Train`],
//! `false` is [`Mode::Inference`]; [`BatchNorm::forward_mode`] also takes
//! [`Mode::Frozen`].
//!
//! The layer runs on **CPU tensors only** (a GPU tensor is refused with an error). If a
//! trained model's accuracy in inference mode lags its accuracy in training mode, the
//! running statistics do not describe the data: [`recalibrate`] replaces them with exact
//! population statistics.
//!
//! Errors from bnorm keep their type inside `candle_core::Error`: [`bnorm_error`] gets
//! the [`bnorm::Error`] back.

#![deny(missing_docs)]

mod op;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bnorm::expert::Moments;
use bnorm::{Config, Layout, Mode, Recalibration, RunningState, StepReport};
use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{Init, ModuleT, VarBuilder};

use op::{wrap, BnOp, OpResult};

/// How many recent training batches' statistics a layer keeps for diagnostics.
pub const RECENT_BATCHES: usize = 16;

/// Batch statistics of one training step (per channel).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    /// Batch mean.
    pub mean: Vec<f64>,
    /// Batch variance (biased).
    pub var: Vec<f64>,
}

/// A saved copy of a layer's mutable state (see [`BatchNorm::snapshot`]).
#[derive(Debug, Clone)]
pub struct Snapshot {
    state: Option<RunningState>,
    recent: VecDeque<BatchStats>,
}

#[derive(Debug)]
struct Inner {
    recal: Option<Recalibration>,
    state: Option<RunningState>,
    /// What the candle variables held when `state` was last read from or written to them;
    /// other values there were put in from outside (a `VarMap::load`) and replace `state`.
    mirrored: Option<VarValues>,
    recent: VecDeque<BatchStats>,
    last_report: StepReport,
}

/// The running statistics as held by the candle variables (in their dtype, widened).
#[derive(Debug, Clone, PartialEq)]
struct VarValues {
    mean: Vec<f64>,
    var: Vec<f64>,
    updates: i64,
}

/// A batch-normalization layer for candle, running bnorm's kernels.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    cfg: Config,
    layout: Layout,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    running_mean: Option<Var>,
    running_var: Option<Var>,
    num_batches_tracked: Option<Var>,
    inner: Arc<Mutex<Inner>>,
}

fn lock(m: &Mutex<Inner>) -> Result<std::sync::MutexGuard<'_, Inner>> {
    m.lock()
        .map_err(|_| candle_core::Error::msg("bnorm layer state poisoned"))
}

impl BatchNorm {
    /// Builds the layer from `vb` under PyTorch's names. With a `VarMap`-backed builder
    /// the parameters are created (gamma 1, beta 0, running mean 0, variance 1); with a
    /// checkpoint-backed builder they are loaded and checked (lengths, finiteness,
    /// non-negative variances). A checkpoint without `num_batches_tracked` loads as 0.
    pub fn new(cfg: Config, layout: Layout, vb: VarBuilder) -> Result<BatchNorm> {
        cfg.validate().map_err(wrap)?;
        let c = cfg.get_channels();
        let weight = if cfg.get_scale() {
            Some(vb.get_with_hints(c, "weight", Init::Const(1.0))?)
        } else {
            None
        };
        let bias = if cfg.get_center() {
            Some(vb.get_with_hints(c, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        let (mut running_mean, mut running_var, mut num_batches_tracked, mut state) =
            (None, None, None, None);
        let mut mirrored = None;
        if cfg.get_track_running_stats() {
            let rm = vb.get_with_hints(c, "running_mean", Init::Const(0.0))?;
            let rv = vb.get_with_hints(c, "running_var", Init::Const(1.0))?;
            let nbt =
                vb.get_with_hints_dtype((), "num_batches_tracked", Init::Const(0.0), DType::I64);
            let nbt = match nbt {
                Ok(t) => t,
                Err(_) if !vb.contains_tensor("num_batches_tracked") => {
                    Tensor::zeros((), DType::I64, vb.device())?
                }
                Err(e) => return Err(e),
            };
            let values = var_values(&rm, &rv, &nbt)?;
            state = Some(values.to_state(&cfg)?);
            mirrored = Some(values);
            running_mean = Some(Var::from_tensor(&rm)?);
            running_var = Some(Var::from_tensor(&rv)?);
            num_batches_tracked = Some(Var::from_tensor(&nbt)?);
        }
        if let Some(w) = &weight {
            check_finite("weight", w)?;
        }
        if let Some(b) = &bias {
            check_finite("bias", b)?;
        }
        Ok(BatchNorm {
            cfg,
            layout,
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked,
            inner: Arc::new(Mutex::new(Inner {
                recal: None,
                state,
                mirrored,
                recent: VecDeque::new(),
                last_report: StepReport::default(),
            })),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The data layout this layer expects.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// gamma (`weight`), when the layer scales.
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    /// beta (`bias`), when the layer centers.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// A copy of the running statistics the next call uses (`None` when not tracked):
    /// the exact ones of the last training step, or what was loaded into the candle
    /// variables since. Fails when values loaded there are invalid (NaN, a negative
    /// variance, another length).
    pub fn running_state(&self) -> Result<Option<RunningState>> {
        Ok(self.synced()?.state.clone())
    }

    /// Whether the running statistics were never updated by a training step (a fresh
    /// layer, or a checkpoint loaded with `num_batches_tracked = 0` or without it):
    /// inference on them reports [`StepReport::cold_statistics`].
    pub fn is_cold(&self) -> Result<bool> {
        Ok(self.running_state()?.is_some_and(|s| s.updates == 0))
    }

    /// Replaces the running statistics (validated; on error nothing changes) and mirrors
    /// them into the candle variables.
    pub fn set_running_state(&self, state: RunningState) -> Result<()> {
        if !self.cfg.get_track_running_stats() {
            return Err(wrap(bnorm::Error::NoRunningStatistics));
        }
        state.validate(&self.cfg).map_err(wrap)?;
        let mut g = lock(&self.inner)?;
        self.mirror(&mut g, &state)?;
        g.state = Some(state);
        Ok(())
    }

    /// The layer's state after taking in whatever was loaded into the candle variables
    /// from outside since the layer last read or wrote them. On error nothing changes.
    fn synced(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        let mut g = lock(&self.inner)?;
        if let (Some(rm), Some(rv), Some(n)) = (
            &self.running_mean,
            &self.running_var,
            &self.num_batches_tracked,
        ) {
            let now = var_values(rm, rv, n)?;
            if g.mirrored.as_ref() != Some(&now) {
                g.state = Some(now.to_state(&self.cfg)?);
                g.mirrored = Some(now);
            }
        }
        Ok(g)
    }

    /// Statistics of the most recent training batches (oldest first, at most
    /// [`RECENT_BATCHES`]).
    pub fn recent_batch_stats(&self) -> Vec<BatchStats> {
        lock(&self.inner)
            .map(|g| g.recent.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// What the last forward step reported (skipped non-finite channels).
    pub fn last_report(&self) -> StepReport {
        lock(&self.inner)
            .map(|g| g.last_report.clone())
            .unwrap_or_default()
    }

    /// Everything a forward step can change (running statistics and the recent batch
    /// statistics), to evaluate in training mode without leaving a trace.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let g = self.synced()?;
        Ok(Snapshot {
            state: g.state.clone(),
            recent: g.recent.clone(),
        })
    }

    /// Puts back what [`snapshot`](BatchNorm::snapshot) took.
    pub fn restore(&self, snap: &Snapshot) -> Result<()> {
        let mut g = lock(&self.inner)?;
        if let Some(s) = &snap.state {
            self.mirror(&mut g, s)?;
        }
        g.state = snap.state.clone();
        g.recent = snap.recent.clone();
        Ok(())
    }

    /// Writes `s` into the candle variables and records what they now hold.
    fn mirror(&self, g: &mut Inner, s: &RunningState) -> Result<()> {
        if let (Some(rm), Some(rv), Some(n)) = (
            &self.running_mean,
            &self.running_var,
            &self.num_batches_tracked,
        ) {
            let dev = rm.device();
            let mean = Tensor::new(s.mean.as_slice(), dev)?.to_dtype(rm.dtype())?;
            let var = Tensor::new(s.var.as_slice(), dev)?.to_dtype(rv.dtype())?;
            let updates =
                Tensor::new(s.updates.min(i64::MAX as u64) as i64, dev)?.to_dtype(n.dtype())?;
            rm.set(&mean)?;
            rv.set(&var)?;
            n.set(&updates)?;
            g.mirrored = Some(var_values(rm, rv, n)?);
        }
        Ok(())
    }

    /// Starts recalibrating: until [`finish_recalibration`](BatchNorm::finish_recalibration),
    /// every forward normalizes with batch statistics (as in training), leaves the running
    /// statistics alone, and accumulates the exact population statistics of its input.
    pub fn start_recalibration(&self) -> Result<()> {
        lock(&self.inner)?.recal = Some(Recalibration::new(self.cfg.get_channels()));
        Ok(())
    }

    /// Ends recalibration and replaces the running statistics with the population
    /// statistics of every batch seen since [`start_recalibration`](BatchNorm::start_recalibration).
    pub fn finish_recalibration(&self) -> Result<()> {
        let mut g = self.synced()?;
        let recal = g
            .recal
            .take()
            .ok_or_else(|| candle_core::Error::msg("bnorm: no recalibration in progress"))?;
        let Some(state) = g.state.as_ref() else {
            return Err(wrap(bnorm::Error::NoRunningStatistics));
        };
        let mut next = state.clone();
        recal.apply(&self.cfg, &mut next).map_err(wrap)?;
        self.mirror(&mut g, &next)?;
        g.state = Some(next);
        Ok(())
    }

    /// Forward in an explicit mode. Only [`Mode::Train`] updates the running statistics
    /// (and, during a recalibration, nothing does).
    pub fn forward_mode(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_op(x, mode, None)
    }

    /// Masked forward (Keras 3's `mask`, see [`bnorm::masked`]): `mask` has the shape of
    /// `x` without its last axis (any dtype; nonzero selects). In a step normalized with
    /// batch statistics, the statistics, the running update and the gradient through
    /// them cover the selected values only. Runs at bnorm's reference speed.
    ///
    /// ```
    /// use bnorm_candle::BatchNorm;
    /// use bnorm::{Config, Layout, Mode};
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    /// let bn = BatchNorm::new(Config::keras(1), Layout::NLC, vb)?;
    /// let x = Tensor::new(&[[[1.0f64], [2.0], [3.0]], [[5.0], [0.0], [0.0]]], &Device::Cpu)?;
    /// let mask = Tensor::new(&[[1u8, 1, 1], [1, 0, 0]], &Device::Cpu)?;
    /// bn.forward_masked(&x, &mask, Mode::Train)?;
    /// let mean = bn.running_state()?.unwrap().mean[0]; // 0.01 · 2.75
    /// assert!((mean - 0.0275).abs() < 1e-8);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn forward_masked(&self, x: &Tensor, mask: &Tensor, mode: Mode) -> Result<Tensor> {
        let dims = x.dims();
        let rows = &dims[..dims.len().saturating_sub(1)];
        if dims.is_empty() || mask.dims() != rows {
            return Err(wrap(bnorm::Error::LengthMismatch {
                what: "mask",
                expected: rows.iter().product(),
                got: mask.elem_count(),
            }));
        }
        let flags = mask.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        self.forward_op(x, mode, Some(flags.iter().map(|&v| v != 0.0).collect()))
    }

    fn forward_op(&self, x: &Tensor, mode: Mode, mask: Option<Vec<bool>>) -> Result<Tensor> {
        let (state_in, recalibrating) = {
            let g = self.synced()?;
            (g.state.clone(), g.recal.is_some())
        };
        let mode = if recalibrating { Mode::Train } else { mode };
        let op = Arc::new(BnOp {
            cfg: self.cfg.clone(),
            layout: self.layout,
            mode,
            state_in,
            mask,
            result: Mutex::new(OpResult::default()),
        });
        let dev = x.device();
        let c = self.cfg.get_channels();
        let ones;
        let w = match &self.weight {
            Some(w) => w,
            None => {
                ones = Tensor::ones(c, x.dtype(), dev)?;
                &ones
            }
        };
        let zeros;
        let b = match &self.bias {
            Some(b) => b,
            None => {
                zeros = Tensor::zeros(c, x.dtype(), dev)?;
                &zeros
            }
        };
        let boxed: Box<dyn candle_core::CustomOp3 + Send + Sync> = Box::new(ArcOp(op.clone()));
        let y = x.apply_op3_arc(w, b, Arc::new(boxed))?;
        let result = op
            .result
            .lock()
            .map_err(|_| candle_core::Error::msg("bnorm op poisoned"))?;
        let mut inner = lock(&self.inner)?;
        inner.last_report = result.report.clone();
        if let Some(recal) = inner.recal.as_mut() {
            let saved = &result.saved;
            let groups = saved.groups().max(1);
            let m: Vec<Moments> = (0..c)
                .map(|ch| {
                    (0..groups).fold(Moments::default(), |acc, g| {
                        let i = g * c + ch;
                        acc.merge(Moments {
                            count: saved.count()[i],
                            mean: saved.mean()[i],
                            m2: saved.variance()[i] * saved.count()[i],
                        })
                    })
                })
                .collect();
            recal.add_moments(&m).map_err(wrap)?;
            return Ok(y);
        }
        if result.report.updated {
            if let Some(s) = &result.state {
                self.mirror(&mut inner, s)?;
                inner.state = Some(s.clone());
            }
            let saved = &result.saved;
            let groups = saved.groups().max(1);
            let avg = |v: &[f64]| -> Vec<f64> {
                (0..c)
                    .map(|ch| (0..groups).map(|g| v[g * c + ch]).sum::<f64>() / groups as f64)
                    .collect()
            };
            inner.recent.push_back(BatchStats {
                mean: avg(saved.mean()),
                var: avg(saved.variance()),
            });
            while inner.recent.len() > RECENT_BATCHES {
                inner.recent.pop_front();
            }
        }
        Ok(y)
    }
}

/// Recalibrates every layer in `layers` ("precise batch norm"): runs `forward` on each
/// batch with the layers normalizing by batch statistics and accumulating exact
/// population statistics, then replaces their running statistics. Only batch-norm state
/// changes; `forward` should run the model as at inference otherwise (no dropout).
/// On error, layers that have not finished are left with their old statistics.
pub fn recalibrate<'a, I, F>(layers: &[&BatchNorm], batches: I, mut forward: F) -> Result<()>
where
    I: IntoIterator<Item = &'a Tensor>,
    F: FnMut(&Tensor) -> Result<Tensor>,
{
    for l in layers {
        l.start_recalibration()?;
    }
    let run = (|| {
        for b in batches {
            forward(b)?;
        }
        Ok(())
    })();
    let mut result = run;
    for l in layers {
        let r = if result.is_ok() {
            l.finish_recalibration()
        } else {
            // abandon: drop the partial statistics, keep the old ones
            lock(&l.inner).map(|mut g| g.recal = None)
        };
        if result.is_ok() {
            result = r;
        }
    }
    result
}

/// Reads the running statistics out of the candle variables.
fn var_values(rm: &Tensor, rv: &Tensor, n: &Tensor) -> Result<VarValues> {
    Ok(VarValues {
        mean: rm.to_dtype(DType::F64)?.to_vec1::<f64>()?,
        var: rv.to_dtype(DType::F64)?.to_vec1::<f64>()?,
        updates: n.to_dtype(DType::I64)?.to_scalar::<i64>()?,
    })
}

impl VarValues {
    /// The running state these values describe (validated).
    fn to_state(&self, cfg: &Config) -> Result<RunningState> {
        if self.updates < 0 {
            return Err(wrap(bnorm::Error::InvalidConfig {
                setting: "num_batches_tracked",
                value: self.updates.to_string(),
                expected: "a count of training steps (0 or more)",
            }));
        }
        RunningState::from_values(
            cfg,
            self.mean.clone(),
            self.var.clone(),
            self.updates as u64,
        )
        .map_err(wrap)
    }
}

/// The [`bnorm::Error`] inside an error of this crate's layer (through candle's context,
/// path and backtrace wrappers), for code that handles a cause differently.
///
/// ```
/// use bnorm::{Config, Layout, Mode};
/// use bnorm_candle::{bnorm_error, BatchNorm};
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// let varmap = VarMap::new();
/// let bn = BatchNorm::new(Config::torch(3), Layout::NCHW,
///                         VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
/// let one = Tensor::zeros((1, 3, 1, 1), DType::F32, &Device::Cpu)?; // one value per channel
/// let err = bn.forward_mode(&one, Mode::Train).unwrap_err();
/// assert!(matches!(bnorm_error(&err), Some(bnorm::Error::BatchTooSmall { .. })));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn bnorm_error(e: &candle_core::Error) -> Option<&bnorm::Error> {
    use candle_core::Error as E;
    match e {
        E::WrappedContext { wrapped, .. } => wrapped.downcast_ref::<op::Typed>().map(|t| &t.0),
        E::Context { inner, .. } | E::WithPath { inner, .. } | E::WithBacktrace { inner, .. } => {
            bnorm_error(inner)
        }
        _ => None,
    }
}

fn check_finite(what: &'static str, t: &Tensor) -> Result<()> {
    let v = t.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    if let Some(channel) = v.iter().position(|x| !x.is_finite()) {
        return Err(wrap(bnorm::Error::NonFiniteParameter { what, channel }));
    }
    Ok(())
}

/// Shares one op between the graph (for backward) and the layer (to read its results).
struct ArcOp(Arc<BnOp>);

impl candle_core::CustomOp3 for ArcOp {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        self.0.cpu_fwd(s1, l1, s2, l2, s3, l3)
    }
    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.0.bwd(a1, a2, a3, res, grad)
    }
}

impl ModuleT for BatchNorm {
    /// `train = true` is [`Mode::Train`], `false` is [`Mode::Inference`].
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_mode(xs, if train { Mode::Train } else { Mode::Inference })
    }
}
