//! A stateless step for the PyTorch drop-in: the configuration and a reusable workspace
//! live in a [`Kernel`]; the parameters and running statistics come from the module's own
//! parameters and buffers on every call; what backward needs travels in a [`Step`]
//! (saved on the autograd context, so a module applied twice in one graph differentiates
//! each application with its own statistics).

use bnorm::element::DType;
use bnorm::expert::{
    backward_into, forward_into, BackwardOptions, Grads, Options, Saved, Workspace,
};
use bnorm::{Config, Mode, Params, RunningState};
use numpy::{PyArray1, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{error_of_kind, IntoPy};
use crate::{array, dispatch, settings, threads};

/// Configuration and workspace of one drop-in module.
#[pyclass(module = "bnorm._bnorm")]
pub struct Kernel {
    cfg: Config,
    ws: Workspace,
}

/// What one forward step saved for its backward.
#[pyclass(module = "bnorm._bnorm")]
pub struct Step {
    params: Params,
    saved: Saved,
    dtype: DType,
    layout: bnorm::Layout,
}

type Vector<'py> = Bound<'py, PyArray1<f64>>;

fn to_vec(v: Option<PyReadonlyArray1<'_, f64>>) -> Option<Vec<f64>> {
    v.map(|v| v.as_array().to_vec())
}

#[pymethods]
impl Kernel {
    /// A kernel for `channels` channels of a convention with settings by setter name.
    #[new]
    #[pyo3(signature = (channels, convention, settings=None))]
    fn new(
        channels: usize,
        convention: &str,
        settings: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let cfg = settings::config(channels, convention, settings)?;
        Ok(Kernel {
            cfg,
            ws: Workspace::default(),
        })
    }

    /// Forward step of `x` into `y` with the given parameters and running statistics
    /// (float64 vectors; `None` for those the module does not have). Returns the
    /// [`Step`] and, after a training step that updated running statistics, the new
    /// `(running_mean, running_var, num_batches_tracked)`; the given vectors are not
    /// changed (on error nothing is returned and nothing written).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    #[pyo3(signature = (x, y, layout, mode, dtype, weight, bias, running_mean, running_var, num_batches_tracked))]
    fn forward<'py>(
        &mut self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        y: &Bound<'py, PyAny>,
        layout: &str,
        mode: &str,
        dtype: &str,
        weight: Option<PyReadonlyArray1<'py, f64>>,
        bias: Option<PyReadonlyArray1<'py, f64>>,
        running_mean: Option<PyReadonlyArray1<'py, f64>>,
        running_var: Option<PyReadonlyArray1<'py, f64>>,
        num_batches_tracked: u64,
    ) -> PyResult<(Step, Option<(Vector<'py>, Vector<'py>, u64)>)> {
        let (layout, mode, dtype) = (
            settings::layout(layout)?,
            settings::mode(mode)?,
            settings::dtype(dtype)?,
        );
        let params = Params {
            weight: to_vec(weight),
            bias: to_vec(bias),
        };
        let mut state = match (to_vec(running_mean), to_vec(running_var)) {
            (Some(m), Some(v)) => {
                Some(RunningState::from_values(&self.cfg, m, v, num_batches_tracked).py_err()?)
            }
            (None, None) => None,
            _ => {
                return Err(error_of_kind(
                    "MissingParameter",
                    "running_mean and running_var go together".into(),
                ))
            }
        };
        let mut saved = Saved::default();
        let (cfg, ws) = (&self.cfg, &mut self.ws);
        dispatch!(dtype, |T, S| {
            let xa = array::read::<S>(x, "x")?;
            let mut ya = array::write::<S>(y, "y")?;
            let g = layout.geometry(xa.shape()).py_err()?;
            let xs: &[T] = array::slice(&xa, "x")?;
            let ys: &mut [T] = array::slice_mut(&mut ya, "y")?;
            let (p, st, sv) = (&params, state.as_mut(), &mut saved);
            let report = threads::run(py, xs.len(), |par| {
                let opts = Options::<T>::from(par);
                forward_into(cfg, g, xs, p, st, mode, ys, sv, ws, opts)
            })?
            .py_err()?;
            crate::errors::warn_skipped(py, &report)?;
        });
        let updated = match (mode, state) {
            (Mode::Train, Some(s)) => Some((
                PyArray1::from_vec(py, s.mean),
                PyArray1::from_vec(py, s.var),
                s.updates,
            )),
            _ => None,
        };
        let step = Step {
            params,
            saved,
            dtype,
            layout,
        };
        Ok((step, updated))
    }

    /// Backward of `step` (same `x`): writes `dx` and returns `(dweight, dbias)` (float64,
    /// `None` for a parameter the module does not have).
    #[allow(clippy::type_complexity)]
    fn backward<'py>(
        &mut self,
        py: Python<'py>,
        step: &Step,
        x: &Bound<'py, PyAny>,
        dy: &Bound<'py, PyAny>,
        dx: &Bound<'py, PyAny>,
    ) -> PyResult<(Option<Vector<'py>>, Option<Vector<'py>>)> {
        let mut grads = Grads::default();
        let (cfg, ws) = (&self.cfg, &mut self.ws);
        dispatch!(step.dtype, |T, S| {
            let xa = array::read::<S>(x, "x")?;
            let dya = array::read::<S>(dy, "dy")?;
            let mut dxa = array::write::<S>(dx, "dx")?;
            let g = step.layout.geometry(xa.shape()).py_err()?;
            let xs: &[T] = array::slice(&xa, "x")?;
            let dys: &[T] = array::slice(&dya, "dy")?;
            let dxs: &mut [T] = array::slice_mut(&mut dxa, "dx")?;
            let (p, sv, gr) = (&step.params, &step.saved, &mut grads);
            threads::run(py, xs.len(), |par| {
                let opts = BackwardOptions::<T>::from(par);
                backward_into(cfg, g, xs, dys, p, sv, dxs, gr, ws, opts)
            })?
            .py_err()?;
        });
        Ok((
            cfg.get_scale()
                .then(|| PyArray1::from_vec(py, grads.dweight)),
            cfg.get_center()
                .then(|| PyArray1::from_vec(py, grads.dbias)),
        ))
    }
}
