//! The PyTorch drop-in on CUDA tensors: `bnorm-cuda`'s layer run in place on torch's
//! device memory, ordered with torch's current stream.
//!
//! A [`CudaKernel`] holds one [`GpuBatchNorm`] (configuration, its f64 copies of the
//! parameters and running statistics, its workspace). Each call takes the module's
//! float32 parameters and buffers by device address, widens them into the layer, runs the
//! step, and after a training step rounds the new running statistics back into the
//! module's buffers — all queued on bnorm's stream between a wait for torch's stream and
//! a release to it ([`GpuBatchNorm::wait_for_stream`],
//! [`GpuBatchNorm::release_to_stream`]); the host never
//! waits for the device. The kernels are compiled by NVRTC when a process first uses a
//! GPU ([`gpu`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use bnorm::element::{bf16, f16, DType};
use bnorm::{Layout, Mode, Params, RunningState};
use bnorm_cuda::{CudaError, ForeignTensor, Gpu, GpuBatchNorm, GpuElement, GpuSaved, Pair};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{error_of_kind, raise};
use crate::settings;

/// The opened GPUs by ordinal (each compiles the kernels once).
static GPUS: OnceLock<Mutex<HashMap<usize, Gpu>>> = OnceLock::new();

/// GPU `ordinal`, opened (and its kernels compiled, without the GIL) on first use.
pub fn gpu(py: Python<'_>, ordinal: usize) -> PyResult<Gpu> {
    let gpus = GPUS.get_or_init(|| Mutex::new(HashMap::new()));
    py.detach(|| {
        let mut gpus = gpus.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = gpus.get(&ordinal) {
            return Ok(g.clone());
        }
        let g = Gpu::new(ordinal)?;
        gpus.insert(ordinal, g.clone());
        Ok(g)
    })
    .map_err(cuda_error)
}

/// A `bnorm.Error` for a GPU error: a core error keeps its kind; the others are
/// `"CudaUnavailable"`, `"CudaDriver"`, `"CudaCompile"`, `"Unsupported"`, `"TooLarge"`,
/// `"WrongDevice"`, `"Foreign"`.
pub fn cuda_error(e: CudaError) -> PyErr {
    let kind = match &e {
        CudaError::Core(_) => {
            let CudaError::Core(core) = e else {
                unreachable!()
            };
            return raise(core);
        }
        CudaError::Unavailable { .. } => "CudaUnavailable",
        CudaError::Driver { .. } => "CudaDriver",
        CudaError::Compile { .. } => "CudaCompile",
        CudaError::Unsupported { .. } => "Unsupported",
        CudaError::TooLarge { .. } => "TooLarge",
        CudaError::WrongDevice => "WrongDevice",
        CudaError::Foreign { .. } => "Foreign",
    };
    error_of_kind(kind, e.to_string())
}

/// One drop-in configuration on one GPU.
#[pyclass(module = "bnorm._bnorm")]
pub struct CudaKernel {
    gpu: Gpu,
    layer: Mutex<Layer>,
    pool: Pool,
}

/// Statistics buffers of steps whose backward ran or will never run, for the next steps
/// (each holds 7·C values on the device; allocating and freeing them per step cost
/// driver calls that showed in a step's time). Reuse is safe: every use is on bnorm's
/// stream, in order.
#[derive(Clone, Default)]
struct Pool(Arc<Mutex<Vec<GpuSaved>>>);

impl Pool {
    /// At most this many buffers wait in the pool (a graph keeps a step alive per
    /// application of the module; beyond this they are freed).
    const KEEP: usize = 16;

    fn take(&self) -> GpuSaved {
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        pool.pop().unwrap_or_default()
    }

    fn give(&self, saved: GpuSaved) {
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < Self::KEEP {
            pool.push(saved);
        }
    }
}

/// The layer and the statistics buffers of the steps whose backward never comes (a
/// forward under `torch.no_grad()`), reused instead of allocated per call.
struct Layer {
    bn: GpuBatchNorm,
    spare: GpuSaved,
}

/// What one forward step on the GPU saved for its backward (device memory of bnorm's,
/// returned to its kernel's pool when the step is dropped).
#[pyclass(module = "bnorm._bnorm")]
pub struct CudaStep {
    saved: Option<GpuSaved>,
    pool: Pool,
    dtype: DType,
    layout: Layout,
    shape: Vec<usize>,
}

impl Drop for CudaStep {
    fn drop(&mut self) {
        if let Some(saved) = self.saved.take() {
            self.pool.give(saved);
        }
    }
}

/// A batch of torch's at `address`, in place.
///
/// # Safety
/// `address` holds the batch (`shape` in `layout`, elements of `T`) on `gpu`'s device,
/// allocated while the work queued on it runs (ordered by the streams).
unsafe fn view<T: GpuElement>(
    gpu: &Gpu,
    address: u64,
    shape: &[usize],
    layout: Layout,
) -> Result<ForeignTensor<T>, CudaError> {
    // SAFETY: the caller's contract.
    unsafe { ForeignTensor::new(gpu, address, shape, layout) }
}

/// The step's addresses and shape.
struct Batch<'a> {
    x: u64,
    out: u64,
    shape: &'a [usize],
    layout: Layout,
}

fn forward_typed<T: GpuElement>(
    gpu: &Gpu,
    bn: &mut GpuBatchNorm,
    b: &Batch<'_>,
    mode: Mode,
    saved: &mut GpuSaved,
) -> Result<bnorm::StepReport, CudaError> {
    // SAFETY: the Python caller passes the data_ptr() of live tensors of these shapes and
    // dtypes on this device; the streams order every later use of that memory.
    let (x, mut y) = unsafe {
        (
            view::<T>(gpu, b.x, b.shape, b.layout)?,
            view::<T>(gpu, b.out, b.shape, b.layout)?,
        )
    };
    bn.forward_into(&x, mode, &mut y, saved)
}

fn backward_typed<T: GpuElement>(
    gpu: &Gpu,
    bn: &mut GpuBatchNorm,
    b: &Batch<'_>,
    dy: u64,
    saved: &GpuSaved,
) -> Result<(), CudaError> {
    // SAFETY: as in `forward_typed`.
    let (x, dy, mut dx) = unsafe {
        (
            view::<T>(gpu, b.x, b.shape, b.layout)?,
            view::<T>(gpu, dy, b.shape, b.layout)?,
            view::<T>(gpu, b.out, b.shape, b.layout)?,
        )
    };
    bn.backward_into(&x, &dy, saved, &mut dx)
}

/// Runs `work` on `bn` between a wait for torch's `stream` and a release to it (the
/// release also after an error: what was queued may read the caller's memory), leaving
/// the thread's current context as torch had it.
fn ordered<R>(
    gpu: &Gpu,
    bn: &mut GpuBatchNorm,
    stream: u64,
    work: impl FnOnce(&mut GpuBatchNorm) -> Result<R, CudaError>,
) -> Result<R, CudaError> {
    gpu.restoring_context(|| {
        // SAFETY: `stream` is torch.cuda.current_stream().cuda_stream of this device.
        unsafe { bn.wait_for_stream(stream)? };
        let result = work(bn);
        // SAFETY: as above.
        let released = unsafe { bn.release_to_stream(stream) };
        let r = result?;
        released?;
        Ok(r)
    })?
}

#[pymethods]
impl CudaKernel {
    /// A layer for `channels` channels on GPU `device` (as the CPU `Kernel`'s settings).
    #[new]
    #[pyo3(signature = (device, channels, convention, settings=None))]
    fn new(
        py: Python<'_>,
        device: usize,
        channels: usize,
        convention: &str,
        settings: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let cfg = settings::config(channels, convention, settings)?;
        let gpu = gpu(py, device)?;
        let (params, state) = (Params::init(&cfg), RunningState::init(&cfg));
        let bn = GpuBatchNorm::new(&gpu, cfg, params, state).map_err(cuda_error)?;
        Ok(CudaKernel {
            gpu,
            layer: Mutex::new(Layer {
                bn,
                spare: GpuSaved::new(),
            }),
            pool: Pool::default(),
        })
    }

    /// Forward step of the batch at device address `x` (`shape` in `layout`, `dtype`) into
    /// `y`, queued after the work on torch's `stream`: `params` the addresses of the
    /// module's float32 weight and bias (`None` without them), `running` those of its
    /// float32 running mean and variance (`None` without them; overwritten after a
    /// training step), `num_batches_tracked` the updates so far and `counter` the address
    /// of the module's int64 `num_batches_tracked` (incremented on the device after an
    /// update; `None` to leave it). Returns the step (`None` unless `keep`: nothing will
    /// call backward) and whether the running statistics were updated. Errors are raised
    /// before any output or buffer is written.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (x, y, shape, layout, dtype, stream, mode, params, running, num_batches_tracked, counter, keep))]
    fn forward(
        &self,
        py: Python<'_>,
        x: u64,
        y: u64,
        shape: Vec<usize>,
        layout: &str,
        dtype: &str,
        stream: u64,
        mode: &str,
        params: Option<Pair>,
        running: Option<Pair>,
        num_batches_tracked: u64,
        counter: Option<u64>,
        keep: bool,
    ) -> PyResult<(Option<CudaStep>, bool)> {
        let (layout, mode, dtype) = (
            settings::layout(layout)?,
            settings::mode(mode)?,
            settings::dtype(dtype)?,
        );
        let batch = Batch {
            x,
            out: y,
            shape: &shape,
            layout,
        };
        let gpu = &self.gpu;
        let (saved, updated) = py
            .detach(|| {
                let mut layer = self.layer.lock().unwrap_or_else(|e| e.into_inner());
                let Layer { bn, spare } = &mut *layer;
                ordered(gpu, bn, stream, |bn| {
                    // SAFETY: the addresses are the module's C-element float32 tensors on
                    // this device (checked by the Python caller), ordered by the streams.
                    unsafe { bn.load_f32(params, running.map(|r| (r, num_batches_tracked)))? };
                    let mut fresh = if keep {
                        self.pool.take()
                    } else {
                        GpuSaved::new()
                    };
                    let saved = if keep { &mut fresh } else { spare };
                    let report = match dtype {
                        DType::F32 => forward_typed::<f32>(gpu, bn, &batch, mode, saved),
                        DType::F16 => forward_typed::<f16>(gpu, bn, &batch, mode, saved),
                        DType::BF16 => forward_typed::<bf16>(gpu, bn, &batch, mode, saved),
                        DType::F64 => Err(CudaError::Unsupported {
                            what: "float64 batches (the GPU kernels take float32, float16 \
                                   and bfloat16)",
                        }),
                    }?;
                    if let (true, Some(r)) = (report.updated, running) {
                        // SAFETY: as above; `counter` is the module's int64 counter.
                        unsafe { bn.store_running_f32(r, counter)? };
                    }
                    Ok((keep.then_some(fresh), report.updated))
                })
            })
            .map_err(cuda_error)?;
        let step = saved.map(|saved| CudaStep {
            saved: Some(saved),
            pool: self.pool.clone(),
            dtype,
            layout,
            shape,
        });
        Ok((step, updated))
    }

    /// Backward of `step` (same `x`) into `dx`, queued after the work on torch's
    /// `stream`; with `grads`, dweight and dbias rounded into the two float32 vectors at
    /// those addresses.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (step, x, dy, dx, stream, grads))]
    fn backward(
        &self,
        py: Python<'_>,
        step: &CudaStep,
        x: u64,
        dy: u64,
        dx: u64,
        stream: u64,
        grads: Option<Pair>,
    ) -> PyResult<()> {
        let batch = Batch {
            x,
            out: dx,
            shape: &step.shape,
            layout: step.layout,
        };
        let Some(saved) = step.saved.as_ref() else {
            return Err(error_of_kind(
                "SavedMismatch",
                "the step's statistics were released".into(),
            ));
        };
        let gpu = &self.gpu;
        py.detach(|| {
            let mut layer = self.layer.lock().unwrap_or_else(|e| e.into_inner());
            ordered(gpu, &mut layer.bn, stream, |bn| {
                match step.dtype {
                    DType::F32 => backward_typed::<f32>(gpu, bn, &batch, dy, saved),
                    DType::F16 => backward_typed::<f16>(gpu, bn, &batch, dy, saved),
                    DType::BF16 => backward_typed::<bf16>(gpu, bn, &batch, dy, saved),
                    DType::F64 => Err(CudaError::Unsupported {
                        what: "float64 batches",
                    }),
                }?;
                if let Some(g) = grads {
                    // SAFETY: the module's C-element float32 gradient tensors on this device.
                    unsafe { bn.store_grads_f32(g)? };
                }
                Ok(())
            })
        })
        .map_err(cuda_error)
    }
}
