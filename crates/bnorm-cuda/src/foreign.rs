//! Another library's device memory and streams (PyTorch's, for `bnorm.torch`): batches
//! borrowed by address ([`ForeignTensor`]), per-channel float32 vectors widened into a
//! layer and rounded back out of it, and the ordering of bnorm's stream with the other
//! library's.
//!
//! bnorm keeps its own stream. A step on foreign memory first makes that stream wait for
//! what the other library queued so far on its stream
//! ([`GpuBatchNorm::wait_for_stream`]), and afterwards makes the other stream wait for
//! bnorm's ([`GpuBatchNorm::release_to_stream`]): what the other library queues next — a
//! kernel reading `y`, or memory its allocator hands out again — runs after bnorm's
//! kernels, and the host waits for neither. The layer records two events of its own for
//! this, again on every step (a recorded event can be recorded anew once a wait for it is
//! queued).
//!
//! Every function here takes raw device addresses and is `unsafe`: the caller vouches that
//! they point to live memory of this GPU's context, of the size the call reads or writes.

use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};

use cudarc::driver::{sys, CudaEvent, PushKernelArg};

use bnorm::Layout;

use crate::kernels::BLOCK;
use crate::plan::channel_grid;
use crate::{CudaError, DeviceTensor, Gpu, GpuBatchNorm, GpuElement, Result};

/// The alignment a borrowed batch must have: the kernels' widest vector access (4 × f32).
pub const FOREIGN_ALIGN: u64 = 16;

/// A batch in another library's device memory, used in place. Dereferences to a
/// [`DeviceTensor`]; dropping it leaves the memory to its owner.
///
/// ```no_run
/// use bnorm::Layout;
/// use bnorm_cuda::{DeviceTensor, ForeignTensor, Gpu};
/// let gpu = Gpu::new(0)?;
/// let owned = DeviceTensor::upload(&gpu, &[1.0f32, 2.0, 3.0, 4.0], &[2, 2], Layout::NC)?;
/// let address = owned.device_address();
/// // SAFETY: `owned` holds 4 f32 values at that address and outlives the view.
/// let view = unsafe { ForeignTensor::<f32>::new(&gpu, address, &[2, 2], Layout::NC)? };
/// assert_eq!(view.download()?, vec![1.0, 2.0, 3.0, 4.0]);
/// # Ok::<(), bnorm_cuda::CudaError>(())
/// ```
pub struct ForeignTensor<T: GpuElement> {
    tensor: ManuallyDrop<DeviceTensor<T>>,
}

impl<T: GpuElement> ForeignTensor<T> {
    /// A view of `shape` (in `layout`) elements of `T` at device address `address`.
    /// Refuses a null address for a non-empty batch and one not aligned to
    /// [`FOREIGN_ALIGN`] bytes ([`CudaError::Foreign`]).
    ///
    /// # Safety
    /// `address` must be the start of memory of `gpu`'s context holding the batch's
    /// elements, valid for reads and writes, and stay allocated while this view and any
    /// work queued on it lives (ordered by [`GpuBatchNorm::release_to_stream`] for the
    /// owner's stream).
    pub unsafe fn new(gpu: &Gpu, address: u64, shape: &[usize], layout: Layout) -> Result<Self> {
        let g = DeviceTensor::<T>::checked(shape, layout)?;
        if address == 0 && !g.is_empty() {
            return Err(CudaError::Foreign {
                reason: "a null device address for a non-empty batch".into(),
            });
        }
        if !address.is_multiple_of(FOREIGN_ALIGN) {
            return Err(CudaError::Foreign {
                reason: format!(
                    "device address {address:#x} is not aligned to {FOREIGN_ALIGN} bytes"
                ),
            });
        }
        // SAFETY: the caller's contract: `address` holds `g.len()` elements of `T` in
        // this context; the slice is leaked, never freed, when the view drops.
        let buf = unsafe { gpu.stream.upgrade_device_ptr::<T::Raw>(address, g.len()) };
        Ok(ForeignTensor {
            tensor: ManuallyDrop::new(DeviceTensor::from_parts(buf, gpu, shape, layout, g)),
        })
    }
}

impl<T: GpuElement> Deref for ForeignTensor<T> {
    type Target = DeviceTensor<T>;
    fn deref(&self) -> &DeviceTensor<T> {
        &self.tensor
    }
}

impl<T: GpuElement> DerefMut for ForeignTensor<T> {
    fn deref_mut(&mut self) -> &mut DeviceTensor<T> {
        &mut self.tensor
    }
}

impl<T: GpuElement> Drop for ForeignTensor<T> {
    fn drop(&mut self) {
        // SAFETY: `tensor` is taken once, here, and not used after.
        let tensor = unsafe { ManuallyDrop::take(&mut self.tensor) };
        // the memory is the owner's: give up the slice without freeing it
        let _ = tensor.buf.leak();
    }
}

impl Gpu {
    /// Runs `f` and then makes the context that was current on the calling thread before
    /// current again (none, when none was). bnorm's driver calls make this GPU's context current; another
    /// library that reads the current context to know its current device (the CUDA
    /// runtime does, and PyTorch through it) must find its own afterwards, not the last
    /// GPU bnorm ran on.
    ///
    /// ```no_run
    /// let gpu = bnorm_cuda::Gpu::new(0)?;
    /// let name = gpu.restoring_context(|| gpu.name().to_string())?;
    /// # Ok::<(), bnorm_cuda::CudaError>(())
    /// ```
    pub fn restoring_context<R>(&self, f: impl FnOnce() -> R) -> Result<R> {
        use cudarc::driver::result::ctx;
        let before = ctx::get_current().map_err(CudaError::driver("read the current context"))?;
        let r = f();
        // SAFETY: `before` was current on this thread a moment ago: a live context (its
        // owner cannot have destroyed it while this thread ran `f`), or null, which unbinds.
        unsafe { ctx::set_current(before.unwrap_or(std::ptr::null_mut())) }
            .map_err(CudaError::driver("restore the current context"))?;
        Ok(r)
    }
}

/// Two per-channel vectors: `(a, b)` device addresses of C float32 values each.
pub type Pair = (u64, u64);

impl GpuBatchNorm {
    /// Makes bnorm's stream wait for the work queued so far on `stream`, a stream of
    /// another library in this GPU's context (0: the legacy default stream).
    ///
    /// # Safety
    /// `stream` must be a live CUDA stream of this GPU's context, or 0.
    pub unsafe fn wait_for_stream(&mut self, stream: u64) -> Result<()> {
        // SAFETY: the caller's contract; the wrapper does not destroy the stream.
        let other = unsafe {
            self.gpu
                .context()
                .wrap_borrowed_stream(stream as sys::CUstream)
        };
        let stream = self.stream.clone();
        let [into, _] = self.link()?;
        into.record(&other)
            .map_err(CudaError::driver("record an event on the caller's stream"))?;
        stream
            .wait(into)
            .map_err(CudaError::driver("wait for the caller's stream"))
    }

    /// Makes `stream` (another library's, in this GPU's context; 0: the legacy default
    /// stream) wait for the work queued so far on bnorm's stream.
    ///
    /// # Safety
    /// `stream` must be a live CUDA stream of this GPU's context, or 0.
    pub unsafe fn release_to_stream(&mut self, stream: u64) -> Result<()> {
        // SAFETY: the caller's contract; the wrapper does not destroy the stream.
        let other = unsafe {
            self.gpu
                .context()
                .wrap_borrowed_stream(stream as sys::CUstream)
        };
        let stream = self.stream.clone();
        let [_, out] = self.link()?;
        out.record(&stream)
            .map_err(CudaError::driver("record an event on bnorm's stream"))?;
        other
            .wait(out)
            .map_err(CudaError::driver("make the caller's stream wait"))
    }

    /// The layer's two ordering events, created on first use.
    fn link(&mut self) -> Result<&[CudaEvent; 2]> {
        if self.link.is_none() {
            let ctx = self.gpu.context();
            let event = || {
                ctx.new_event(None)
                    .map_err(CudaError::driver("create an event"))
            };
            self.link = Some([event()?, event()?]);
        }
        Ok(self.link.as_ref().expect("set above"))
    }

    /// Takes gamma and beta (`params`: a module's `weight` and `bias`) and the running mean
    /// and variance with the number of updates so far (`running`: its buffers and
    /// `num_batches_tracked`) from float32 vectors in device memory, widened to the
    /// layer's f64 in one launch on bnorm's stream. [`params`](Self::params) keeps the
    /// values last set from the host.
    ///
    /// # Safety
    /// Every address must hold C float32 values in this GPU's context, written by work
    /// that bnorm's stream waits for.
    pub unsafe fn load_f32(
        &mut self,
        params: Option<Pair>,
        running: Option<(Pair, u64)>,
    ) -> Result<()> {
        if params.is_some() && !(self.cfg.get_scale() && self.cfg.get_center()) {
            return Err(CudaError::Unsupported {
                what: "device parameters for a layer without both scale and center",
            });
        }
        if running.is_some() && !self.tracked {
            return Err(bnorm::Error::StateMismatch {
                reason: "running statistics given to a layer that does not track them",
            }
            .into());
        }
        let pair = |p: Option<Pair>| -> Result<Pair> {
            match p {
                Some((a, b)) => Ok((self.foreign_vec(a)?, self.foreign_vec(b)?)),
                None => Ok((0, 0)),
            }
        };
        let (w, b) = pair(params)?;
        let (m, v) = pair(running.map(|(p, _)| p))?;
        if w == 0 && m == 0 {
            return Ok(());
        }
        let f = self.gpu.function("bn_widen4")?;
        let (c, launch) = (self.cfg.get_channels() as u32, self.channel_launch());
        let mut l = self.stream.launch_builder(&f);
        l.arg(&c)
            .arg(&w)
            .arg(&b)
            .arg(&m)
            .arg(&v)
            .arg(&mut self.gamma)
            .arg(&mut self.beta)
            .arg(&mut self.rmean)
            .arg(&mut self.rvar);
        // SAFETY: bn_widen4(C, 4 × float*, 4 × double*): each non-null source pair holds
        // C values by the caller's contract (null pairs are skipped), the layer's four
        // vectors hold C each; the grid covers C.
        unsafe { l.launch(launch) }.map_err(CudaError::driver("bn_widen4"))?;
        if let Some((_, updates)) = running {
            self.updates = updates;
            self.flags_valid = false;
        }
        Ok(())
    }

    /// Writes the running mean and variance, rounded to float32, into two vectors in
    /// device memory (after a training step: the module's buffers) and, with `count`,
    /// adds one to the 64-bit integer at that address (its `num_batches_tracked`) in the
    /// same launch.
    ///
    /// # Safety
    /// Both addresses must hold C float32 values, and `count` one `i64`, in this GPU's
    /// context, not read or written by other work until bnorm's stream has finished (see
    /// [`GpuBatchNorm::release_to_stream`]).
    pub unsafe fn store_running_f32(
        &mut self,
        (mean, var): Pair,
        count: Option<u64>,
    ) -> Result<()> {
        if !self.tracked {
            return Err(bnorm::Error::NoRunningStatistics.into());
        }
        let (mean, var) = (self.foreign_vec(mean)?, self.foreign_vec(var)?);
        let f = self.gpu.function("bn_narrow2")?;
        let (c, launch) = (self.cfg.get_channels() as u32, self.channel_launch());
        let mut b = self.stream.launch_builder(&f);
        let count = match count {
            Some(a) => self.foreign_vec(a)?,
            None => 0,
        };
        b.arg(&c)
            .arg(&self.rmean)
            .arg(&self.rvar)
            .arg(&mean)
            .arg(&var)
            .arg(&count);
        // SAFETY: bn_narrow2(C, double*, double*, float*, float*, long long*): rmean and
        // rvar hold C values, the destinations C and the counter one (or null) by the
        // caller's contract; the grid covers C.
        unsafe { b.launch(launch) }.map_err(CudaError::driver("bn_narrow2"))?;
        Ok(())
    }

    /// Writes dγ and dβ of the last backward step, rounded to float32, into two vectors
    /// in device memory (the gradients of a module's `weight` and `bias`).
    ///
    /// # Safety
    /// As [`store_running_f32`](Self::store_running_f32).
    pub unsafe fn store_grads_f32(&mut self, (dgamma, dbeta): Pair) -> Result<()> {
        if !self.grads_valid {
            return Err(bnorm::Error::SavedMismatch {
                reason: "no backward step ran",
            }
            .into());
        }
        let (dgamma, dbeta) = (self.foreign_vec(dgamma)?, self.foreign_vec(dbeta)?);
        let c = self.cfg.get_channels();
        let f = self.gpu.function("bn_narrow2")?;
        let (dg, db) = (self.grads.slice(..c), self.grads.slice(c..2 * c));
        let (c32, launch) = (c as u32, self.channel_launch());
        let mut b = self.stream.launch_builder(&f);
        let no_counter = 0u64;
        b.arg(&c32)
            .arg(&dg)
            .arg(&db)
            .arg(&dgamma)
            .arg(&dbeta)
            .arg(&no_counter);
        // SAFETY: bn_narrow2(C, double*, double*, float*, float*, long long*), as in
        // `store_running_f32` with a null counter; grads holds 2·C values, dγ then dβ.
        unsafe { b.launch(launch) }.map_err(CudaError::driver("bn_narrow2"))?;
        Ok(())
    }

    fn channel_launch(&self) -> cudarc::driver::LaunchConfig {
        cudarc::driver::LaunchConfig {
            grid_dim: (channel_grid(self.cfg.get_channels()), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A per-channel vector (or counter) at `address` as a kernel argument: the address itself
    /// (a `CUdeviceptr` is passed by value), refused when null.
    fn foreign_vec(&self, address: u64) -> Result<u64> {
        if address == 0 {
            return Err(CudaError::Foreign {
                reason: "a null device address for a per-channel vector or counter".into(),
            });
        }
        Ok(address)
    }
}
