//! The rayon pool every kernel call of the extension runs in (`bnorm.set_num_threads`),
//! so that bnorm can be given the same number of threads as PyTorch.

use std::sync::{Arc, Mutex};

use bnorm::tuning::PARALLEL_THRESHOLD;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

static POOL: Mutex<Option<Arc<rayon::ThreadPool>>> = Mutex::new(None);

fn build(threads: usize) -> PyResult<Arc<rayon::ThreadPool>> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("bnorm-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start bnorm's threads: {e}")))
}

/// The pool (built on first use with rayon's default size: `RAYON_NUM_THREADS` or the
/// number of CPUs).
pub fn pool() -> PyResult<Arc<rayon::ThreadPool>> {
    let mut slot = POOL.lock().unwrap_or_else(|p| p.into_inner());
    match slot.as_ref() {
        Some(p) => Ok(p.clone()),
        None => {
            let p = build(0)?;
            *slot = Some(p.clone());
            Ok(p)
        }
    }
}

/// Sets the number of threads bnorm's kernels use (like `torch.set_num_threads`); 0 means
/// rayon's default.
#[pyfunction]
pub fn set_num_threads(threads: usize) -> PyResult<()> {
    let p = build(threads)?;
    *POOL.lock().unwrap_or_else(|p| p.into_inner()) = Some(p);
    Ok(())
}

/// The number of threads bnorm's kernels use.
#[pyfunction]
pub fn get_num_threads() -> PyResult<usize> {
    Ok(pool()?.current_num_threads())
}

/// Runs `f`, a kernel call over `len` elements, with the GIL released: in the pool, or on
/// the calling thread below [`PARALLEL_THRESHOLD`] elements, where the kernels run
/// sequentially anyway and handing the call to a pool thread would only add its latency.
pub fn run<R: Send>(py: Python<'_>, len: usize, f: impl FnOnce() -> R + Send) -> PyResult<R> {
    if len < PARALLEL_THRESHOLD {
        return Ok(py.detach(f));
    }
    let pool = pool()?;
    Ok(py.detach(|| pool.install(f)))
}
