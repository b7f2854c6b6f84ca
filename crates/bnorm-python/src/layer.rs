//! The NumPy API's layer: [`bnorm::BatchNorm`] behind a Python class (`bnorm.BatchNorm`
//! is a thin Python wrapper that allocates outputs with NumPy and remembers the last
//! forward's input for `backward`).

use bnorm::expert::{BackwardOptions, Grads, Options, RenormState};
use bnorm::{BatchNorm, Params, RunningState};
use numpy::{PyArray1, PyReadonlyArray1, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::IntoPy;
use crate::{array, dispatch, settings, threads};

/// A stateful batch-norm layer over NumPy buffers.
#[pyclass(module = "bnorm._bnorm")]
pub struct Layer {
    bn: BatchNorm,
}

fn vector<'py>(py: Python<'py>, v: Option<&[f64]>) -> Option<Bound<'py, PyArray1<f64>>> {
    v.map(|v| PyArray1::from_slice(py, v))
}

#[pymethods]
impl Layer {
    /// A fresh layer: `channels`, a convention (`"torch"`, `"keras"`, `"tensorflow"`) and
    /// settings by setter name.
    #[new]
    #[pyo3(signature = (channels, convention, settings=None))]
    fn new(
        channels: usize,
        convention: &str,
        settings: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let cfg = settings::config(channels, convention, settings)?;
        Ok(Layer {
            bn: cfg.build().py_err()?,
        })
    }

    /// Forward step of `x` into `y` (both C-contiguous, of storage `dtype`); with `mask`
    /// (C-contiguous bools, `x`'s shape without its last axis) a masked step (Keras 3's
    /// `mask`): the statistics, the running update and the next backward cover the
    /// selected values only.
    #[pyo3(signature = (x, y, layout, mode, dtype, mask=None))]
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        y: &Bound<'_, PyAny>,
        layout: &str,
        mode: &str,
        dtype: &str,
        mask: Option<PyReadonlyArrayDyn<'_, bool>>,
    ) -> PyResult<()> {
        let (layout, mode) = (settings::layout(layout)?, settings::mode(mode)?);
        let mask: Option<&[bool]> = match &mask {
            Some(m) => Some(m.as_slice().map_err(|_| {
                crate::errors::error_of_kind(
                    "NotContiguous",
                    "mask must be C-contiguous (bnorm does not copy it)".into(),
                )
            })?),
            None => None,
        };
        let bn = &mut self.bn;
        dispatch!(settings::dtype(dtype)?, |T, S| {
            let xa = array::read::<S>(x, "x")?;
            let mut ya = array::write::<S>(y, "y")?;
            let shape = xa.shape().to_vec();
            let xs: &[T] = array::slice(&xa, "x")?;
            let ys: &mut [T] = array::slice_mut(&mut ya, "y")?;
            let report = threads::run(py, xs.len(), |par| {
                // the core's masked step (what `BatchNorm::forward_masked` runs) into `y`
                let opts = Options::<T>::from(par);
                let opts = match mask {
                    Some(m) => opts.masked(m),
                    None => opts,
                };
                bn.forward_with(xs, &shape, layout, mode, ys, opts)
            })?
            .py_err()?;
            crate::errors::warn_skipped(py, &report)?;
        });
        Ok(())
    }

    /// Backward of the last forward step: writes `dx` and returns `(dweight, dbias)`
    /// (float64; `None` for a parameter the layer does not have).
    #[allow(clippy::type_complexity)]
    fn backward<'py>(
        &mut self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        dy: &Bound<'py, PyAny>,
        dx: &Bound<'py, PyAny>,
        layout: &str,
        dtype: &str,
    ) -> PyResult<(
        Option<Bound<'py, PyArray1<f64>>>,
        Option<Bound<'py, PyArray1<f64>>>,
    )> {
        let layout = settings::layout(layout)?;
        let bn = &mut self.bn;
        let mut grads = Grads::default();
        dispatch!(settings::dtype(dtype)?, |T, S| {
            let xa = array::read::<S>(x, "x")?;
            let dya = array::read::<S>(dy, "dy")?;
            let mut dxa = array::write::<S>(dx, "dx")?;
            let shape = xa.shape().to_vec();
            let xs: &[T] = array::slice(&xa, "x")?;
            let dys: &[T] = array::slice(&dya, "dy")?;
            let dxs: &mut [T] = array::slice_mut(&mut dxa, "dx")?;
            let g = &mut grads;
            threads::run(py, xs.len(), |par| {
                let opts = BackwardOptions::<T>::from(par);
                bn.backward_with(xs, dys, &shape, layout, dxs, g, opts)
            })?
            .py_err()?;
        });
        let cfg = self.bn.config();
        Ok((
            vector(py, cfg.get_scale().then_some(&grads.dweight[..])),
            vector(py, cfg.get_center().then_some(&grads.dbias[..])),
        ))
    }

    /// gamma (float64), `None` without scale.
    #[getter]
    fn weight<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyArray1<f64>>> {
        vector(py, self.bn.params().weight.as_deref())
    }

    /// beta (float64), `None` without center.
    #[getter]
    fn bias<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyArray1<f64>>> {
        vector(py, self.bn.params().bias.as_deref())
    }

    /// Replaces gamma and beta (validated; on error nothing changes).
    #[pyo3(signature = (weight, bias))]
    fn set_params(
        &mut self,
        weight: Option<PyReadonlyArray1<'_, f64>>,
        bias: Option<PyReadonlyArray1<'_, f64>>,
    ) -> PyResult<()> {
        let params = Params {
            weight: weight.map(|w| w.as_array().to_vec()),
            bias: bias.map(|b| b.as_array().to_vec()),
        };
        self.bn.set_params(params).py_err()
    }

    /// The running mean (float64), `None` when not tracked.
    #[getter]
    fn running_mean<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyArray1<f64>>> {
        vector(py, self.bn.running_state().map(|s| &s.mean[..]))
    }

    /// The running variance (float64), `None` when not tracked.
    #[getter]
    fn running_var<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyArray1<f64>>> {
        vector(py, self.bn.running_state().map(|s| &s.var[..]))
    }

    /// Training steps folded into the running statistics (`num_batches_tracked`).
    #[getter]
    fn num_batches_tracked(&self) -> Option<u64> {
        self.bn.running_state().map(|s| s.updates)
    }

    /// Replaces the running statistics (validated; on error nothing changes).
    fn set_running(
        &mut self,
        mean: PyReadonlyArray1<'_, f64>,
        var: PyReadonlyArray1<'_, f64>,
        num_batches_tracked: u64,
    ) -> PyResult<()> {
        let cfg = self.bn.config();
        let state = RunningState::from_values(
            cfg,
            mean.as_array().to_vec(),
            var.as_array().to_vec(),
            num_batches_tracked,
        )
        .py_err()?;
        self.bn.set_running_state(state).py_err()
    }

    /// Batch renormalization's state `(renorm_mean, renorm_stddev, moving_stddev)`
    /// (float64), `None` without renorm or running statistics.
    #[getter]
    #[allow(clippy::type_complexity)]
    fn renorm_state<'py>(
        &self,
        py: Python<'py>,
    ) -> Option<(
        Bound<'py, PyArray1<f64>>,
        Bound<'py, PyArray1<f64>>,
        Bound<'py, PyArray1<f64>>,
    )> {
        let r = self.bn.running_state()?.renorm.as_ref()?;
        Some((
            PyArray1::from_slice(py, &r.mean),
            PyArray1::from_slice(py, &r.stddev),
            PyArray1::from_slice(py, &r.moving_stddev),
        ))
    }

    /// Replaces batch renormalization's state, keeping the running statistics (validated;
    /// on error nothing changes).
    fn set_renorm_state(
        &mut self,
        mean: PyReadonlyArray1<'_, f64>,
        stddev: PyReadonlyArray1<'_, f64>,
        moving_stddev: PyReadonlyArray1<'_, f64>,
    ) -> PyResult<()> {
        let mut state = self
            .bn
            .running_state()
            .cloned()
            .ok_or(bnorm::Error::NoRunningStatistics)
            .py_err()?;
        state.renorm = Some(RenormState {
            mean: mean.as_array().to_vec(),
            stddev: stddev.as_array().to_vec(),
            moving_stddev: moving_stddev.as_array().to_vec(),
        });
        self.bn.set_running_state(state).py_err()
    }

    /// The configuration, printed.
    fn config(&self) -> String {
        format!("{:?}", self.bn.config())
    }
}
