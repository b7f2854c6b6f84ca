//! # bnorm-cuda — bnorm's batch normalization on NVIDIA GPUs
//!
//! Kernels for the training forward step (statistics, running update, normalization),
//! the inference/frozen forward step and the backward step, for every layout of the core
//! ([`bnorm::Layout`]: channels-first and channels-last) and for `f32`, [`bnorm::element::f16`] and
//! [`bnorm::element::bf16`] storage. The CUDA C source is compiled by NVRTC when a [`Gpu`] is
//! opened; the CUDA libraries are loaded at run time (cudarc's dynamic loading), so the
//! crate builds, links and tests on machines without CUDA: there, [`Gpu::new`] returns
//! [`CudaError::Unavailable`] instead of panicking.
//!
//! Semantics are the core's ([`bnorm::expert::forward_into`], [`bnorm::expert::backward_into`]) for plain
//! batch norm in every momentum convention; batch renormalization and ghost batches are
//! refused with [`CudaError::Unsupported`].
//!
//! ```no_run
//! use bnorm::{Config, Layout, Mode, Params, RunningState};
//! use bnorm_cuda::{DeviceTensor, Gpu, GpuBatchNorm};
//! let gpu = match Gpu::new(0) {
//!     Ok(gpu) => gpu,
//!     Err(e) => { eprintln!("no GPU: {e}"); return Ok(()); }
//! };
//! let cfg = Config::torch(3);
//! let mut bn = GpuBatchNorm::new(&gpu, cfg.clone(), Params::init(&cfg), RunningState::init(&cfg))?;
//! let x: Vec<f32> = (0..2 * 3 * 4 * 4).map(|i| i as f32).collect();
//! let x = DeviceTensor::upload(&gpu, &x, &[2, 3, 4, 4], Layout::NCHW)?;
//! let (y, saved, _report) = bn.forward(&x, Mode::Train)?;
//! let dy = DeviceTensor::filled(&gpu, 1.0f32, &[2, 3, 4, 4], Layout::NCHW)?;
//! let dx = bn.backward(&x, &dy, &saved)?;
//! let grads = bn.grads()?;
//! println!("{:?} {:?} {:?}", y.download()?.len(), dx.download()?.len(), grads.dbias);
//! # Ok::<(), bnorm_cuda::CudaError>(())
//! ```

#![deny(missing_docs)]

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;

pub mod compile;
mod foreign;
pub mod kernels;
mod layer;
pub mod plan;
mod tensor;

pub use foreign::{ForeignTensor, Pair, FOREIGN_ALIGN};
pub use layer::{GpuBatchNorm, GpuSaved, SavedStats};
pub use tensor::{DTypeTag, DeviceTensor, GpuElement};

/// Errors of this crate. No function panics on user input.
#[derive(Debug)]
pub enum CudaError {
    /// CUDA cannot be used here: no driver library, no NVRTC library, no device, or the
    /// driver refused to start. Tests and examples report this as a skip.
    Unavailable {
        /// What is missing, in words.
        reason: String,
    },
    /// A CUDA driver call failed.
    Driver {
        /// What the crate was doing.
        op: &'static str,
        /// The driver's error.
        message: String,
    },
    /// NVRTC could not compile the kernels.
    Compile {
        /// The compiler's error and log.
        log: String,
    },
    /// Invalid arguments, in the core's terms (shape, configuration, statistics).
    Core(bnorm::Error),
    /// A feature of the configuration that the GPU kernels do not implement.
    Unsupported {
        /// Which one.
        what: &'static str,
    },
    /// The batch exceeds the kernels' 32-bit indexing.
    TooLarge {
        /// Elements of the batch.
        elements: usize,
        /// The largest supported.
        limit: usize,
    },
    /// Two arguments live on different GPUs (or contexts).
    WrongDevice,
    /// Another library's memory that cannot be used as given (a null or misaligned
    /// address: [`ForeignTensor`]).
    Foreign {
        /// What is wrong, in words.
        reason: String,
    },
}

impl CudaError {
    pub(crate) fn driver(op: &'static str) -> impl Fn(DriverError) -> CudaError {
        move |e| CudaError::Driver {
            op,
            message: e.to_string(),
        }
    }
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaError::Unavailable { reason } => write!(f, "CUDA unavailable: {reason}"),
            CudaError::Driver { op, message } => write!(f, "CUDA driver error in {op}: {message}"),
            CudaError::Compile { log } => write!(f, "NVRTC compilation failed: {log}"),
            CudaError::Core(e) => write!(f, "{e}"),
            CudaError::Unsupported { what } => write!(f, "not supported on the GPU: {what}"),
            CudaError::TooLarge { elements, limit } => write!(
                f,
                "batch of {elements} elements exceeds the GPU kernels' limit of {limit}"
            ),
            CudaError::WrongDevice => write!(f, "arguments live on different GPUs"),
            CudaError::Foreign { reason } => write!(f, "unusable device memory: {reason}"),
        }
    }
}

impl std::error::Error for CudaError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CudaError::Core(e) => Some(e),
            _ => None,
        }
    }
}

impl From<bnorm::Error> for CudaError {
    fn from(e: bnorm::Error) -> Self {
        CudaError::Core(e)
    }
}

/// `Result` with [`CudaError`].
pub type Result<T, E = CudaError> = std::result::Result<T, E>;

/// Checks, without calling into CUDA, that the driver and NVRTC libraries can be loaded
/// (NVRTC from the loader path or from `BNORM_NVRTC`, see [`compile::nvrtc_available`]).
/// cudarc panics on the first call into a library it cannot load; every entry point of
/// this crate probes first.
///
/// ```
/// match bnorm_cuda::probe() {
///     Ok(()) => println!("CUDA libraries present"),
///     Err(e) => println!("SKIPPED: {e}"),
/// }
/// ```
pub fn probe() -> Result<()> {
    // SAFETY: `is_culib_present` only tries to open candidate library names with
    // `dlopen`; it calls no CUDA function.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    if !driver {
        return Err(CudaError::Unavailable {
            reason: "the CUDA driver library (libcuda.so) cannot be loaded: no NVIDIA driver"
                .into(),
        });
    }
    compile::nvrtc_available()
}

/// Runs `f`, turning a panic inside cudarc (a missing symbol in an old driver, say) into
/// [`CudaError::Unavailable`].
fn guarded<R>(what: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        Err(CudaError::Unavailable {
            reason: format!("{what}: {msg}"),
        })
    })
}

struct Inner {
    ctx: Arc<CudaContext>,
    functions: HashMap<String, (CudaFunction, u32)>,
    name: String,
    sms: usize,
    compute_capability: (i32, i32),
    compile_ms: f64,
    target: compile::Target,
}

/// One GPU: its context, its stream, and the kernels compiled for it (once, when opened;
/// clones share them).
#[derive(Clone)]
pub struct Gpu {
    inner: Arc<Inner>,
    pub(crate) stream: Arc<CudaStream>,
}

impl fmt::Debug for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gpu")
            .field("name", &self.inner.name)
            .field("ordinal", &self.inner.ctx.ordinal())
            .finish()
    }
}

impl Gpu {
    /// Opens GPU `ordinal` and compiles the kernels for its architecture with NVRTC.
    /// Without a driver, NVRTC or device: [`CudaError::Unavailable`].
    ///
    /// ```
    /// match bnorm_cuda::Gpu::new(0) {
    ///     Ok(gpu) => println!("{} ({} SMs)", gpu.name(), gpu.sm_count()),
    ///     Err(bnorm_cuda::CudaError::Unavailable { reason }) => println!("SKIPPED: {reason}"),
    ///     Err(e) => panic!("{e}"),
    /// }
    /// ```
    pub fn new(ordinal: usize) -> Result<Gpu> {
        probe()?;
        guarded("opening the CUDA device", || {
            let count = CudaContext::device_count().map_err(|e| CudaError::Unavailable {
                reason: format!("the CUDA driver reports no usable device ({e})"),
            })?;
            if ordinal >= count.max(0) as usize {
                return Err(CudaError::Unavailable {
                    reason: format!("no CUDA device {ordinal} ({count} present)"),
                });
            }
            let ctx = CudaContext::new(ordinal).map_err(CudaError::driver("context"))?;
            // SAFETY: every buffer of this crate is allocated, used and freed on the GPU's
            // one stream, whose order is all the synchronization they need, and another
            // library's memory is ordered with its stream explicitly (foreign.rs);
            // cudarc's per-buffer events would add driver calls to every launch, copy,
            // borrowed view and free (measured through bnorm.torch: most of a call's time).
            unsafe { ctx.disable_event_tracking() };
            let name = ctx.name().map_err(CudaError::driver("device name"))?;
            let cc = ctx
                .compute_capability()
                .map_err(CudaError::driver("compute capability"))?;
            let sms = ctx
                .attribute(
                    cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                )
                .map_err(CudaError::driver("SM count"))?;
            // One program per element type, compiled in parallel (NVRTC compiles distinct
            // programs concurrently); the per-channel kernels come from the f32 one.
            let t = std::time::Instant::now();
            let parts: Vec<Result<compile::Compiled>> = std::thread::scope(|scope| {
                let handles: Vec<_> = DTypeTag::ALL
                    .iter()
                    .map(|&d| {
                        scope.spawn(move || {
                            compile::compile_for_device(&kernels::source_for(&[d]), cc)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(CudaError::Compile {
                                log: "an NVRTC compilation thread panicked".into(),
                            })
                        })
                    })
                    .collect()
            });
            let compile_ms = t.elapsed().as_secs_f64() * 1e3;
            let mut functions = HashMap::new();
            let mut target = compile::Target::Cubin;
            for (d, part) in DTypeTag::ALL.into_iter().zip(parts) {
                let compiled = part?;
                if compiled.target == compile::Target::Ptx {
                    target = compile::Target::Ptx;
                }
                let module = ctx
                    .load_module(Ptx::from_binary(compiled.image))
                    .map_err(CudaError::driver("load module"))?;
                let mut names = kernels::typed_entry_points(d);
                if d == DTypeTag::F32 {
                    names.extend(kernels::UNTYPED.iter().map(|s| s.to_string()));
                }
                for name in names {
                    let f = module
                        .load_function(&name)
                        .map_err(CudaError::driver("load function"))?;
                    // Resident blocks per SM at the crate's block size, from the driver's
                    // occupancy calculator (registers and shared memory of this build).
                    let resident = f
                        .occupancy_max_active_blocks_per_multiprocessor(kernels::BLOCK, 0, None)
                        .map_err(CudaError::driver("occupancy"))?;
                    functions.insert(name, (f, resident.max(1)));
                }
            }
            // A non-blocking stream of our own: the legacy NULL stream would serialize
            // with every other blocking stream of the process (PyTorch's included).
            let stream = ctx.new_stream().map_err(CudaError::driver("stream"))?;
            Ok(Gpu {
                inner: Arc::new(Inner {
                    ctx,
                    functions,
                    name,
                    sms: sms.max(1) as usize,
                    compute_capability: cc,
                    compile_ms,
                    target,
                }),
                stream,
            })
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Number of streaming multiprocessors (drives the launch plans).
    pub fn sm_count(&self) -> usize {
        self.inner.sms
    }

    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.inner.compute_capability
    }

    /// Milliseconds NVRTC took to compile the kernels.
    pub fn compile_ms(&self) -> f64 {
        self.inner.compile_ms
    }

    /// What the loaded module was compiled to: a cubin for the device's architecture, or
    /// PTX when this NVRTC does not know it.
    pub fn compiled_to(&self) -> compile::Target {
        self.inner.target
    }

    /// The driver's CUDA version as `major·1000 + minor·10` (`cuDriverGetVersion`: 13000
    /// for CUDA 13.0).
    pub fn driver_version(&self) -> Result<i32> {
        let mut v = 0;
        // SAFETY: the driver library is loaded (a Gpu exists); the pointer is valid.
        let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
        if r == cudarc::driver::sys::CUresult::CUDA_SUCCESS {
            Ok(v)
        } else {
            Err(CudaError::Driver {
                op: "cuDriverGetVersion",
                message: format!("{r:?}"),
            })
        }
    }

    /// The cudarc context (for timing with events, say).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }

    /// The stream every kernel of this GPU runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits until all work queued on the stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(CudaError::driver("synchronize"))
    }

    pub(crate) fn function(&self, name: &str) -> Result<CudaFunction> {
        self.inner
            .functions
            .get(name)
            .map(|(f, _)| f.clone())
            .ok_or(CudaError::Unsupported {
                what: "a kernel missing from the compiled module",
            })
    }

    /// Blocks of [`kernels::BLOCK`] threads of kernel `name` resident per SM (the
    /// driver's occupancy query at [`Gpu::new`]).
    pub(crate) fn resident_blocks(&self, name: &str) -> Result<u32> {
        self.inner
            .functions
            .get(name)
            .map(|(_, r)| *r)
            .ok_or(CudaError::Unsupported {
                what: "a kernel missing from the compiled module",
            })
    }

    pub(crate) fn same(&self, other: &Gpu) -> Result<()> {
        if Arc::ptr_eq(&self.inner, &other.inner) {
            Ok(())
        } else {
            Err(CudaError::WrongDevice)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_display() {
        let e = CudaError::Unavailable {
            reason: "no driver".into(),
        };
        assert_eq!(e.to_string(), "CUDA unavailable: no driver");
        let e: CudaError = bnorm::Error::NoRunningStatistics.into();
        assert!(matches!(e, CudaError::Core(_)));
        assert!(std::error::Error::source(&e).is_some());
        let e = CudaError::Foreign {
            reason: "a null device address".into(),
        };
        assert_eq!(
            e.to_string(),
            "unusable device memory: a null device address"
        );
    }

    #[test]
    fn guarded_turns_panics_into_unavailable() {
        let r: Result<()> = guarded("test", || panic!("symbol cuFoo not found"));
        match r {
            Err(CudaError::Unavailable { reason }) => assert!(reason.contains("cuFoo")),
            other => panic!("{other:?}"),
        }
    }
}
