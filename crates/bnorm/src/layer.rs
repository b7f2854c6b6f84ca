//! The stateful layer: configuration, parameters, running statistics and the saved
//! statistics of the last forward step, over the functional core.

use std::mem::MaybeUninit;

use crate::backward::{backward_into, Backward, Grads, ReluOut};
use crate::config::Config;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::forward::{Saved, StepReport};
use crate::kernels::Workspace;
use crate::layout::Layout;
use crate::parallel::Parallelism;
use crate::plan::{BackwardOptions, Epilogue, Options};
use crate::running::PendingUpdate;
use crate::state::{Mode, Params, RunningState};

/// A batch-normalization layer. Each forward call names its [`Mode`]; the layer keeps
/// what the last forward step saved, so `backward` can follow it.
///
/// **`backward` differentiates whichever forward ran last**, in the mode it ran: after a
/// [`Mode::Train`] step the gradient flows through the batch statistics; after
/// [`Mode::Inference`] or [`Mode::Frozen`] the running statistics are constants (the
/// gradient of frozen-statistics fine-tuning). Run the forward you want to differentiate
/// last — an evaluation forward in between replaces what backward uses. A forward call
/// that fails leaves everything as it was, the statistics saved for backward included.
///
/// Porting a layer: [`BatchNorm::from_torch`] takes PyTorch's five tensors; the
/// `bnorm-interop` crate builds a layer from any framework's checkpoint.
///
/// ```
/// use bnorm::{BatchNorm, Config, Layout, Mode};
/// let mut bn = Config::torch(3).build()?;
/// let x: Vec<f32> = (0..24).map(|i| i as f32).collect();
/// let (y, _) = bn.forward(&x, &[2, 3, 2, 2], Layout::NCHW, Mode::Train)?;
/// assert_eq!(y.len(), x.len());
/// assert_eq!(bn.running_state().unwrap().updates, 1);
/// let (y_eval, _) = bn.forward(&x, &[2, 3, 2, 2], Layout::NCHW, Mode::Inference)?;
/// assert_ne!(y, y_eval); // inference uses the running statistics
/// # Ok::<(), bnorm::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct BatchNorm {
    cfg: Config,
    params: Params,
    /// The values before the last [`update_params`](BatchNorm::update_params), kept to
    /// undo a step that diverged without allocating.
    params_before: Params,
    state: Option<RunningState>,
    saved: Saved,
    ws: Workspace,
    par: Parallelism,
}

impl Config {
    /// Validates the configuration and builds a layer with gamma = 1, beta = 0, running
    /// mean 0 and running variance 1.
    pub fn build(self) -> Result<BatchNorm> {
        BatchNorm::new(self)
    }
}

impl BatchNorm {
    /// A fresh layer (see [`Config::build`]).
    pub fn new(cfg: Config) -> Result<BatchNorm> {
        cfg.validate()?;
        Ok(BatchNorm {
            params: Params::init(&cfg),
            params_before: Params::default(),
            state: RunningState::init(&cfg),
            cfg,
            saved: Saved::default(),
            ws: Workspace::default(),
            par: Parallelism::Rayon,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// gamma and beta.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Replaces gamma and beta after checking presence, length and finiteness; on error the
    /// layer is unchanged.
    pub fn set_params(&mut self, params: Params) -> Result<()> {
        params.validate(&self.cfg)?;
        self.params = params;
        Ok(())
    }

    /// Updates gamma and beta in place — an optimizer step without allocating: `f` gets
    /// gamma and beta (`None` for one the configuration does not have) and may change
    /// their values. If a value comes out NaN or infinite, the old values are put back and
    /// the call fails with [`Error::NonFiniteParameter`]. Returns what `f` returns.
    ///
    /// ```
    /// use bnorm::{Config, Layout, Mode};
    /// let mut bn = Config::torch(2).build()?;
    /// let x = [1.0f32, 10.0, 2.0, 20.0, 4.0, 40.0];
    /// let (y, _) = bn.forward(&x, &[3, 2], Layout::NC, Mode::Train)?;
    /// let g = bn.backward(&x, &y, &[3, 2], Layout::NC)?; // dy = y: loss ½Σy²
    /// let (dw, db) = (g.dweight.unwrap(), g.dbias.unwrap());
    /// let lr = 0.1;
    /// bn.update_params(|w, b| {
    ///     w.unwrap().iter_mut().zip(&dw).for_each(|(p, g)| *p -= lr * g);
    ///     b.unwrap().iter_mut().zip(&db).for_each(|(p, g)| *p -= lr * g);
    /// })?;
    /// assert!(bn.params().weight.as_ref().unwrap()[0] < 1.0);
    /// // a step that diverges is refused and changes nothing
    /// let before = bn.params().clone();
    /// assert!(bn.update_params(|w, _| w.unwrap()[1] = f64::NAN).is_err());
    /// assert_eq!(bn.params(), &before);
    /// # Ok::<(), bnorm::Error>(())
    /// ```
    pub fn update_params<R>(
        &mut self,
        f: impl FnOnce(Option<&mut [f64]>, Option<&mut [f64]>) -> R,
    ) -> Result<R> {
        // field by field: a derived `clone_from` would allocate new vectors
        let (before, now) = (&mut self.params_before, &self.params);
        before.weight.clone_from(&now.weight);
        before.bias.clone_from(&now.bias);
        let r = f(
            self.params.weight.as_deref_mut(),
            self.params.bias.as_deref_mut(),
        );
        if let Err(e) = self.params.validate(&self.cfg) {
            std::mem::swap(&mut self.params, &mut self.params_before);
            return Err(e);
        }
        Ok(r)
    }

    /// A layer with PyTorch's semantics from a `torch.nn.BatchNorm*d`'s five tensors —
    /// `weight`, `bias`, `running_mean`, `running_var` (`None` for `affine=False` or
    /// `track_running_stats=False`), `num_batches_tracked` — and its `eps` and `momentum`
    /// (`None` is PyTorch's `momentum=None`, the cumulative average). Values are checked
    /// (lengths, finiteness, non-negative variances) and used as given.
    ///
    /// ```
    /// use bnorm::{BatchNorm, Layout, Mode};
    /// let (w, b) = (vec![1.5f32, 0.5], vec![0.1f32, -0.1]);
    /// let (rm, rv) = (vec![2.0f32, -1.0], vec![4.0f32, 0.25]);
    /// let mut bn = BatchNorm::from_torch(Some(&w), Some(&b), Some(&rm), Some(&rv), 100, 1e-5, Some(0.1))?;
    /// let (y, _) = bn.forward(&[2.0f32, -1.0], &[1, 2], Layout::NC, Mode::Inference)?;
    /// assert_eq!(y, vec![0.1, -0.1]); // the running mean maps to beta
    /// # Ok::<(), bnorm::Error>(())
    /// ```
    pub fn from_torch<T: Element>(
        weight: Option<&[T]>,
        bias: Option<&[T]>,
        running_mean: Option<&[T]>,
        running_var: Option<&[T]>,
        num_batches_tracked: u64,
        eps: f64,
        momentum: Option<f64>,
    ) -> Result<BatchNorm> {
        let widen = |v: Option<&[T]>| v.map(|v| v.iter().map(|x| x.to_f64()).collect::<Vec<_>>());
        let (weight, bias) = (widen(weight), widen(bias));
        let (mean, var) = (widen(running_mean), widen(running_var));
        let channels = [&weight, &bias, &mean, &var]
            .iter()
            .find_map(|v| v.as_ref().map(Vec::len))
            .ok_or(Error::MissingParameter {
                what: "weight, bias or running statistics (the channel count)",
            })?;
        let cfg = crate::Config::torch(channels)
            .eps(eps)
            .momentum(momentum.map_or(crate::Momentum::Cumulative, crate::Momentum::NewWeight))
            .scale(weight.is_some())
            .center(bias.is_some())
            .track_running_stats(mean.is_some() || var.is_some());
        let mut bn = cfg.build()?;
        bn.set_params(Params { weight, bias })?;
        if bn.cfg.get_track_running_stats() {
            let mean = mean.ok_or(Error::MissingParameter {
                what: "running_mean",
            })?;
            let var = var.ok_or(Error::MissingParameter {
                what: "running_var",
            })?;
            let state = RunningState::from_values(&bn.cfg, mean, var, num_batches_tracked)?;
            bn.set_running_state(state)?;
        }
        Ok(bn)
    }

    /// The running statistics (`None` when not tracked).
    pub fn running_state(&self) -> Option<&RunningState> {
        self.state.as_ref()
    }

    /// Replaces the running statistics after validation; on error the layer is unchanged.
    pub fn set_running_state(&mut self, state: RunningState) -> Result<()> {
        if !self.cfg.get_track_running_stats() {
            return Err(Error::NoRunningStatistics);
        }
        state.validate(&self.cfg)?;
        self.state = Some(state);
        Ok(())
    }

    /// Statistics saved by the last forward step.
    pub fn saved(&self) -> &Saved {
        &self.saved
    }

    /// Sets how calls may use threads (default: the caller's rayon pool).
    pub fn set_parallelism(&mut self, par: Parallelism) {
        self.par = par;
    }

    /// Forward step that allocates its output.
    pub fn forward<T: Element>(
        &mut self,
        x: &[T],
        shape: &[usize],
        layout: Layout,
        mode: Mode,
    ) -> Result<(Vec<T>, StepReport)> {
        let opts = Options::from(self.par);
        self.forward_alloc(x, shape, layout, mode, opts)
    }

    /// Masked forward step (Keras 3's `mask`, see [`mod@crate::masked`]), allocating its
    /// output: `mask` has the shape of `x` without its last axis. The statistics, the
    /// running update and the gradient of the following [`backward`](BatchNorm::backward)
    /// cover the selected values only.
    ///
    /// ```
    /// use bnorm::{Config, Layout, Mode};
    /// let mut bn = Config::keras(1).build()?;
    /// // two sequences of three steps (NLC), the second padded after one step
    /// let x = [1.0f64, 2.0, 3.0, 5.0, 0.0, 0.0];
    /// let mask = [true, true, true, true, false, false];
    /// let (y, _) = bn.forward_masked(&x, &mask, &[2, 3, 1], Layout::NLC, Mode::Train)?;
    /// // statistics of 1, 2, 3, 5: mean 2.75
    /// assert!((bn.running_state().unwrap().mean[0] - 0.0275).abs() < 1e-8);
    /// assert!(y[4] < y[0]); // padding is normalized too (and ignored by the statistics)
    /// # Ok::<(), bnorm::Error>(())
    /// ```
    pub fn forward_masked<T: Element>(
        &mut self,
        x: &[T],
        mask: &[bool],
        shape: &[usize],
        layout: Layout,
        mode: Mode,
    ) -> Result<(Vec<T>, StepReport)> {
        let rows: usize = shape[..shape.len().saturating_sub(1)].iter().product();
        if shape.is_empty() || mask.len() != rows {
            return Err(Error::LengthMismatch {
                what: "mask",
                expected: rows,
                got: mask.len(),
            });
        }
        let opts = Options::from(self.par).masked(mask);
        self.forward_alloc(x, shape, layout, mode, opts)
    }

    /// Forward step into a caller buffer (no allocation once warmed up).
    pub fn forward_into<T: Element>(
        &mut self,
        x: &[T],
        shape: &[usize],
        layout: Layout,
        mode: Mode,
        y: &mut [T],
    ) -> Result<StepReport> {
        let opts = Options::from(self.par);
        self.forward_with(x, shape, layout, mode, y, opts)
    }

    /// Forward step into a caller buffer with [`Options`]: an epilogue, a deferred update
    /// (returned in [`StepReport::pending`]), threads (the options' replace the layer's),
    /// synchronization over ranks — in any combination.
    ///
    /// ```
    /// use bnorm::{Config, Layout, Mode};
    /// use bnorm::expert::{Epilogue, Options};
    /// let mut bn = Config::torch(1).build()?;
    /// let mut y = vec![0.0f64; 4];
    /// let opts = Options::default().epilogue(Epilogue::Relu).defer();
    /// let report = bn.forward_with(&[1.0, 2.0, 3.0, 4.0], &[4, 1], Layout::NC, Mode::Train, &mut y, opts)?;
    /// assert_eq!(&y[..2], &[0.0, 0.0]);
    /// assert_eq!(bn.running_state().unwrap().updates, 0); // deferred
    /// bn.commit(&report.pending.unwrap())?;
    /// assert_eq!(bn.running_state().unwrap().updates, 1);
    /// # Ok::<(), bnorm::Error>(())
    /// ```
    pub fn forward_with<'a, T: Element>(
        &mut self,
        x: &[T],
        shape: &[usize],
        layout: Layout,
        mode: Mode,
        y: &mut [T],
        opts: Options<'a, T>,
    ) -> Result<StepReport> {
        self.forward_out(x, shape, layout, mode, crate::buffer::out(y), opts)
    }

    /// [`forward_with`](BatchNorm::forward_with) into an output slice, possibly
    /// uninitialized: every element written when it returns `Ok`.
    fn forward_out<T: Element>(
        &mut self,
        x: &[T],
        shape: &[usize],
        layout: Layout,
        mode: Mode,
        y: &mut [MaybeUninit<T>],
        opts: Options<'_, T>,
    ) -> Result<StepReport> {
        let g = layout.geometry(shape)?;
        let (state, saved, ws) = (self.state.as_mut(), &mut self.saved, &mut self.ws);
        let (cfg, params) = (&self.cfg, &self.params);
        crate::forward::forward_out(cfg, g, x, params, state, mode, y, saved, ws, opts)
    }

    /// [`forward_with`](BatchNorm::forward_with) into a fresh output, allocated without
    /// zeroing (the kernels write each element once).
    fn forward_alloc<T: Element>(
        &mut self,
        x: &[T],
        shape: &[usize],
        layout: Layout,
        mode: Mode,
        opts: Options<'_, T>,
    ) -> Result<(Vec<T>, StepReport)> {
        let step = |y: &mut [MaybeUninit<T>]| self.forward_out(x, shape, layout, mode, y, opts);
        // SAFETY: a forward step that returns `Ok` has written every element of `y`
        // (`forward::forward_out`'s contract).
        unsafe { crate::buffer::filled(x.len(), step) }
    }

    /// Fused `y = relu(bn(x) [+ residual])` (see [`Epilogue`]), allocating its output.
    pub fn forward_relu<T: Element>(
        &mut self,
        x: &[T],
        residual: Option<&[T]>,
        shape: &[usize],
        layout: Layout,
        mode: Mode,
    ) -> Result<(Vec<T>, StepReport)> {
        let ep = residual.map_or(Epilogue::Relu, Epilogue::AddRelu);
        let opts = Options::from(self.par).epilogue(ep);
        self.forward_alloc(x, shape, layout, mode, opts)
    }

    /// Backward of [`forward_relu`](BatchNorm::forward_relu) from its output `y`; returns the
    /// gradients and, when `with_residual`, the residual's gradient.
    pub fn backward_relu<T: Element>(
        &mut self,
        x: &[T],
        y: &[T],
        dy: &[T],
        shape: &[usize],
        layout: Layout,
        with_residual: bool,
    ) -> Result<(Backward<T>, Option<Vec<T>>)> {
        let (n, mut all) = (x.len(), Grads::default());
        let grads = &mut all;
        let (dx, dres) = if with_residual {
            let step = |dr: &mut [MaybeUninit<T>]| {
                let step = |dx: &mut [MaybeUninit<T>]| {
                    self.backward_out(x, dy, shape, layout, dx, Some((y, Some(dr))), grads)
                };
                // SAFETY: a backward step that returns `Ok` has written every element of
                // `dx` and of the residual's gradient (`backward::backward_out`'s contract).
                unsafe { crate::buffer::filled(n, step) }
            };
            // SAFETY: as above, for the residual's gradient.
            let (dres, (dx, ())) = unsafe { crate::buffer::filled(n, step) }?;
            (dx, Some(dres))
        } else {
            let step = |dx: &mut [MaybeUninit<T>]| {
                self.backward_out(x, dy, shape, layout, dx, Some((y, None)), grads)
            };
            // SAFETY: as above.
            let (dx, ()) = unsafe { crate::buffer::filled(n, step) }?;
            (dx, None)
        };
        let b = Backward {
            dx,
            dweight: self.cfg.get_scale().then_some(all.dweight),
            dbias: self.cfg.get_center().then_some(all.dbias),
        };
        Ok((b, dres))
    }

    /// Training step whose running-statistics update is returned, not applied
    /// ([`Update::Defer`](crate::expert::Update::Defer)); apply it with
    /// [`commit`](BatchNorm::commit).
    pub fn forward_pending<T: Element>(
        &mut self,
        x: &[T],
        shape: &[usize],
        layout: Layout,
    ) -> Result<(Vec<T>, StepReport, Option<PendingUpdate>)> {
        let opts = Options::from(self.par).defer();
        let (y, mut report) = self.forward_alloc(x, shape, layout, Mode::Train, opts)?;
        let pending = report.pending.take();
        Ok((y, report, pending))
    }

    /// Applies a pending update to this layer's running statistics.
    pub fn commit(&mut self, pending: &PendingUpdate) -> Result<()> {
        let state = self.state.as_mut().ok_or(Error::NoRunningStatistics)?;
        let mut next = state.clone();
        pending.commit(&self.cfg, &mut next)?;
        *state = next;
        Ok(())
    }

    /// Replaces the running statistics with a recalibration's population statistics.
    pub fn recalibrate(&mut self, recal: &crate::Recalibration) -> Result<()> {
        let state = self.state.as_mut().ok_or(Error::NoRunningStatistics)?;
        let mut next = state.clone();
        recal.apply(&self.cfg, &mut next)?;
        *state = next;
        Ok(())
    }

    /// Backward of the last forward step (same `x`, shape and layout), in the mode it ran
    /// (see the [type's documentation](BatchNorm)).
    pub fn backward<T: Element>(
        &mut self,
        x: &[T],
        dy: &[T],
        shape: &[usize],
        layout: Layout,
    ) -> Result<Backward<T>> {
        let mut grads = Grads::default();
        let step = |dx: &mut [MaybeUninit<T>]| {
            self.backward_out(x, dy, shape, layout, dx, None, &mut grads)
        };
        // SAFETY: a backward step that returns `Ok` has written every element of `dx`
        // (`backward::backward_out`'s contract).
        let (dx, ()) = unsafe { crate::buffer::filled(x.len(), step) }?;
        Ok(Backward {
            dx,
            dweight: self.cfg.get_scale().then_some(grads.dweight),
            dbias: self.cfg.get_center().then_some(grads.dbias),
        })
    }

    /// Backward of the last forward step into caller buffers (no allocation once warmed
    /// up; see the `alloc_free_training` example).
    pub fn backward_into<T: Element>(
        &mut self,
        x: &[T],
        dy: &[T],
        shape: &[usize],
        layout: Layout,
        dx: &mut [T],
        grads: &mut Grads,
    ) -> Result<()> {
        let opts = BackwardOptions::from(self.par);
        self.backward_with(x, dy, shape, layout, dx, grads, opts)
    }

    /// Backward of the last forward step with [`BackwardOptions`] (the forward step's
    /// epilogue, threads, synchronization).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_with<'a, T: Element>(
        &mut self,
        x: &[T],
        dy: &[T],
        shape: &[usize],
        layout: Layout,
        dx: &mut [T],
        grads: &mut Grads,
        opts: BackwardOptions<'a, T>,
    ) -> Result<()> {
        let g = layout.geometry(shape)?;
        let (cfg, params, saved) = (&self.cfg, &self.params, &self.saved);
        backward_into(cfg, g, x, dy, params, saved, dx, grads, &mut self.ws, opts)
    }

    /// The layer's backward step (its threads, not synchronized) into output slices,
    /// possibly uninitialized: every element of `dx` and of the residual's gradient
    /// written when it returns `Ok`.
    #[allow(clippy::too_many_arguments)]
    fn backward_out<T: Element>(
        &mut self,
        x: &[T],
        dy: &[T],
        shape: &[usize],
        layout: Layout,
        dx: &mut [MaybeUninit<T>],
        relu: ReluOut<'_, T>,
        grads: &mut Grads,
    ) -> Result<()> {
        let g = layout.geometry(shape)?;
        let (cfg, params, saved, ws) = (&self.cfg, &self.params, &self.saved, &mut self.ws);
        let par = self.par;
        crate::backward::backward_out(cfg, g, x, dy, params, saved, dx, relu, grads, ws, par, None)
    }
}
