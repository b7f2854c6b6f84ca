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
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadwriteArray1, PyUntypedArrayMethods};
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

/// A per-channel vector as the module holds it: float32 or float64, read without a copy
/// on the Python side (widened here, where the core's `Vec<f64>` is built anyway).
enum Floats<'py> {
    F64(PyReadonlyArray1<'py, f64>),
    F32(PyReadonlyArray1<'py, f32>),
}

/// A running-statistics buffer of the module, float32 or float64, written in place after
/// a training step (as PyTorch's own kernel writes its buffers).
enum FloatsMut<'py> {
    F64(PyReadwriteArray1<'py, f64>),
    F32(PyReadwriteArray1<'py, f32>),
}

/// `v` as a one-dimensional float32 or float64 array, by type checks (a failed extraction
/// would build a Python exception per rejected type: tens of microseconds on the drop-in's
/// small calls).
enum FloatArray<'a, 'py> {
    F64(&'a Bound<'py, PyArray1<f64>>),
    F32(&'a Bound<'py, PyArray1<f32>>),
}

impl<'a, 'py> FloatArray<'a, 'py> {
    fn of(v: &'a Bound<'py, PyAny>, name: &str) -> PyResult<Self> {
        if let Ok(a) = v.cast::<PyArray1<f32>>() {
            return Ok(FloatArray::F32(a));
        }
        if let Ok(a) = v.cast::<PyArray1<f64>>() {
            return Ok(FloatArray::F64(a));
        }
        Err(error_of_kind(
            "DType",
            format!("{name}: a one-dimensional float32 or float64 array"),
        ))
    }
}

fn borrowed(name: &str) -> PyErr {
    error_of_kind("Borrowed", format!("{name} is borrowed elsewhere"))
}

fn widen<T: Copy + Into<f64>>(v: numpy::ndarray::ArrayView1<'_, T>) -> Vec<f64> {
    v.iter().map(|x| (*x).into()).collect()
}

impl<'py> Floats<'py> {
    fn of(v: Option<&Bound<'py, PyAny>>, name: &str) -> PyResult<Option<Self>> {
        let Some(v) = v else { return Ok(None) };
        let b = |_| borrowed(name);
        Ok(Some(match FloatArray::of(v, name)? {
            FloatArray::F64(a) => Floats::F64(a.try_readonly().map_err(b)?),
            FloatArray::F32(a) => Floats::F32(a.try_readonly().map_err(b)?),
        }))
    }

    fn to_vec(&self) -> Vec<f64> {
        match self {
            Floats::F64(v) => widen(v.as_array()),
            Floats::F32(v) => widen(v.as_array()),
        }
    }
}

impl<'py> FloatsMut<'py> {
    fn of(v: Option<&Bound<'py, PyAny>>, name: &str) -> PyResult<Option<Self>> {
        let Some(v) = v else { return Ok(None) };
        let b = |_| borrowed(name);
        Ok(Some(match FloatArray::of(v, name)? {
            FloatArray::F64(a) => FloatsMut::F64(a.try_readwrite().map_err(b)?),
            FloatArray::F32(a) => FloatsMut::F32(a.try_readwrite().map_err(b)?),
        }))
    }

    fn to_vec(&self) -> Vec<f64> {
        match self {
            FloatsMut::F64(v) => widen(v.as_array()),
            FloatsMut::F32(v) => widen(v.as_array()),
        }
    }

    /// Overwrites the buffer with `values` (same length: read from it), rounded to its type.
    fn store(&mut self, values: &[f64]) {
        match self {
            FloatsMut::F64(v) => v
                .as_array_mut()
                .iter_mut()
                .zip(values)
                .for_each(|(d, s)| *d = *s),
            FloatsMut::F32(v) => v
                .as_array_mut()
                .iter_mut()
                .zip(values)
                .for_each(|(d, s)| *d = *s as f32),
        }
    }
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
    /// (float32 or float64 vectors, the module's own parameters and buffers viewed without a
    /// copy; `None` for those the module does not have). Returns the [`Step`] and, after a
    /// training step that updated the running statistics — written into `running_mean` and
    /// `running_var` in place, rounded to their type — the new `num_batches_tracked`. On
    /// error nothing is written.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (x, y, layout, mode, dtype, weight, bias, running_mean, running_var, num_batches_tracked))]
    fn forward<'py>(
        &mut self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        y: &Bound<'py, PyAny>,
        layout: &str,
        mode: &str,
        dtype: &str,
        weight: Option<&Bound<'py, PyAny>>,
        bias: Option<&Bound<'py, PyAny>>,
        running_mean: Option<&Bound<'py, PyAny>>,
        running_var: Option<&Bound<'py, PyAny>>,
        num_batches_tracked: u64,
    ) -> PyResult<(Step, Option<u64>)> {
        let (layout, mode, dtype) = (
            settings::layout(layout)?,
            settings::mode(mode)?,
            settings::dtype(dtype)?,
        );
        let (weight, bias) = (Floats::of(weight, "weight")?, Floats::of(bias, "bias")?);
        let mut running_mean = FloatsMut::of(running_mean, "running_mean")?;
        let mut running_var = FloatsMut::of(running_var, "running_var")?;
        let params = Params {
            weight: weight.as_ref().map(Floats::to_vec),
            bias: bias.as_ref().map(Floats::to_vec),
        };
        let mut state = match (&running_mean, &running_var) {
            (Some(m), Some(v)) => Some(
                RunningState::from_values(&self.cfg, m.to_vec(), v.to_vec(), num_batches_tracked)
                    .py_err()?,
            ),
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
        let updated = match (mode, state, &mut running_mean, &mut running_var) {
            (Mode::Train, Some(s), Some(m), Some(v)) => {
                m.store(&s.mean);
                v.store(&s.var);
                Some(s.updates)
            }
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
