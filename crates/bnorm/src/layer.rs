//! The stateful layer: configuration, parameters, running statistics and the saved
//! statistics of the last forward step, over the functional core.

use crate::backward::{backward_into, Backward, Grads};
use crate::config::Config;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::forward::{forward_into, Saved, StepReport};
use crate::kernels::Workspace;
use crate::layout::Layout;
use crate::parallel::Parallelism;
use crate::running::PendingUpdate;
use crate::state::{Mode, Params, RunningState};

/// A batch-normalization layer. Each forward call names its [`Mode`]; the layer keeps
/// what the last forward step saved, so `backward` can follow it.
///
/// ```
/// use bnorm::{BatchNorm, Config, Layout, Mode};
/// let mut bn = Config::torch(3).build()?;
/// let x: Vec<f32> = (0..24).map(|i| i as f32).collect();
/// let (y, _) = bn.forward(&x, &[2, 3, 2, 2], Layout::NCHW, Mode::Train)?;
/// assert_eq!(y.len(), x.len());
/// assert_eq!(bn.running().unwrap().updates, 1);
/// let (y_eval, _) = bn.forward(&x, &[2, 3, 2, 2], Layout::NCHW, Mode::Inference)?;
/// assert_ne!(y, y_eval); // inference uses the running statistics
/// # Ok::<(), bnorm::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct BatchNorm {
    cfg: Config,
    params: Params,
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

    /// The running statistics (`None` when not tracked).
    pub fn running(&self) -> Option<&RunningState> {
        self.state.as_ref()
    }

    /// Replaces the running statistics after validation; on error the layer is unchanged.
    pub fn set_running(&mut self, state: RunningState) -> Result<()> {
        if !self.cfg.tracks_running_stats() {
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
        let mut y = crate::buffer::output::<T>(x.len());
        let report = self.forward_into(x, shape, layout, mode, &mut y)?;
        Ok((y, report))
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
        let g = layout.geometry(shape)?;
        forward_into(
            &self.cfg,
            g,
            x,
            &self.params,
            self.state.as_mut(),
            mode,
            y,
            &mut self.saved,
            &mut self.ws,
            self.par,
        )
    }

    /// Fused `y = relu(bn(x) [+ residual])` (see [`forward_relu_into`](crate::forward_relu_into)).
    pub fn forward_relu<T: Element>(
        &mut self,
        x: &[T],
        residual: Option<&[T]>,
        shape: &[usize],
        layout: Layout,
        mode: Mode,
    ) -> Result<(Vec<T>, StepReport)> {
        let g = layout.geometry(shape)?;
        let mut y = crate::buffer::output::<T>(x.len());
        let report = crate::forward::forward_relu_into(
            &self.cfg,
            g,
            x,
            residual,
            &self.params,
            self.state.as_mut(),
            mode,
            &mut y,
            &mut self.saved,
            &mut self.ws,
            self.par,
        )?;
        Ok((y, report))
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
        let g = layout.geometry(shape)?;
        let mut dx = crate::buffer::output::<T>(x.len());
        let mut dres = with_residual.then(|| crate::buffer::output::<T>(x.len()));
        let mut grads = Grads::default();
        crate::backward::backward_relu_into(
            &self.cfg,
            g,
            x,
            y,
            dy,
            &self.params,
            &self.saved,
            &mut dx,
            dres.as_deref_mut(),
            &mut grads,
            &mut self.ws,
            self.par,
        )?;
        let b = Backward {
            dx,
            dweight: self.cfg.has_scale().then_some(grads.dweight),
            dbias: self.cfg.has_center().then_some(grads.dbias),
        };
        Ok((b, dres))
    }

    /// Training step whose running-statistics update is returned, not applied (see
    /// [`forward_pending_into`](crate::forward_pending_into)); apply it with
    /// [`commit`](BatchNorm::commit).
    pub fn forward_pending<T: Element>(
        &mut self,
        x: &[T],
        shape: &[usize],
        layout: Layout,
    ) -> Result<(Vec<T>, StepReport, Option<PendingUpdate>)> {
        let g = layout.geometry(shape)?;
        let mut y = crate::buffer::output::<T>(x.len());
        let (report, pending) = crate::forward::forward_pending_into(
            &self.cfg,
            g,
            x,
            &self.params,
            self.state.as_ref(),
            &mut y,
            &mut self.saved,
            &mut self.ws,
            self.par,
        )?;
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

    /// Backward of the last forward step (same `x`, shape and layout).
    pub fn backward<T: Element>(
        &mut self,
        x: &[T],
        dy: &[T],
        shape: &[usize],
        layout: Layout,
    ) -> Result<Backward<T>> {
        let mut dx = crate::buffer::output::<T>(x.len());
        let mut grads = Grads::default();
        self.backward_into(x, dy, shape, layout, &mut dx, &mut grads)?;
        Ok(Backward {
            dx,
            dweight: self.cfg.has_scale().then_some(grads.dweight),
            dbias: self.cfg.has_center().then_some(grads.dbias),
        })
    }

    /// Backward of the last forward step into caller buffers.
    pub fn backward_into<T: Element>(
        &mut self,
        x: &[T],
        dy: &[T],
        shape: &[usize],
        layout: Layout,
        dx: &mut [T],
        grads: &mut Grads,
    ) -> Result<()> {
        let g = layout.geometry(shape)?;
        backward_into(
            &self.cfg,
            g,
            x,
            dy,
            &self.params,
            &self.saved,
            dx,
            grads,
            &mut self.ws,
            self.par,
        )
    }
}
