//! The threads every kernel call of the extension runs on, with the GIL released: bnorm's
//! own rayon pool (`bnorm.set_num_threads`), or the OpenMP runtime already loaded in the
//! process (`bnorm.use_openmp`) — PyTorch's, whose workers otherwise keep spinning on the
//! cores bnorm's threads need after every PyTorch operation.

use std::sync::{Arc, Mutex};

use bnorm::expert::Parallelism;
use bnorm::tuning::PARALLEL_THRESHOLD;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// Where kernels run.
#[derive(Clone)]
enum Threads {
    /// bnorm's own pool.
    Own(Arc<rayon::ThreadPool>),
    /// The OpenMP runtime of the process (leaked: it lives as long as the process).
    #[cfg(target_os = "linux")]
    OpenMp(&'static openmp::OpenMp),
}

static THREADS: Mutex<Option<Threads>> = Mutex::new(None);

fn build(threads: usize) -> PyResult<Threads> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("bnorm-{i}"))
        .build()
        .map(|p| Threads::Own(Arc::new(p)))
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start bnorm's threads: {e}")))
}

/// The current choice (on first use bnorm's own pool with rayon's default size:
/// `RAYON_NUM_THREADS` or the number of CPUs).
fn current() -> PyResult<Threads> {
    let mut slot = THREADS.lock().unwrap_or_else(|p| p.into_inner());
    match slot.as_ref() {
        Some(t) => Ok(t.clone()),
        None => {
            let t = build(0)?;
            *slot = Some(t.clone());
            Ok(t)
        }
    }
}

/// Sets the number of threads bnorm's kernels use in bnorm's own pool (like
/// `torch.set_num_threads`); 0 means rayon's default. Stops using OpenMP's threads.
#[pyfunction]
pub fn set_num_threads(threads: usize) -> PyResult<()> {
    let t = build(threads)?;
    *THREADS.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
    Ok(())
}

/// The number of threads bnorm's kernels use.
#[pyfunction]
pub fn get_num_threads() -> PyResult<usize> {
    Ok(match current()? {
        Threads::Own(p) => p.current_num_threads(),
        #[cfg(target_os = "linux")]
        Threads::OpenMp(o) => bnorm::expert::Executor::threads(o),
    })
}

/// Runs kernels on the threads of the OpenMP runtime already loaded in this process (the
/// first shared object whose name contains `libgomp`, `libiomp` or `libomp`, or `library`,
/// a path or file name of a loaded one): its team of `omp_get_max_threads()` threads,
/// the calling thread among them. Returns the library's path. Raises `RuntimeError` when
/// no such runtime is loaded; nothing changes then.
#[pyfunction]
#[pyo3(signature = (library=None))]
pub fn use_openmp(library: Option<&str>) -> PyResult<String> {
    #[cfg(target_os = "linux")]
    {
        let omp = openmp::OpenMp::find(library).map_err(PyRuntimeError::new_err)?;
        let path = omp.path.clone();
        let omp: &'static openmp::OpenMp = Box::leak(Box::new(omp));
        *THREADS.lock().unwrap_or_else(|p| p.into_inner()) = Some(Threads::OpenMp(omp));
        Ok(path)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = library;
        Err(PyRuntimeError::new_err(
            "sharing OpenMP's threads is built for Linux only",
        ))
    }
}

/// Where kernels run: `"rayon"` (bnorm's own pool) or `"openmp:<path>"`.
#[pyfunction]
pub fn get_threading() -> PyResult<String> {
    Ok(match current()? {
        Threads::Own(_) => "rayon".to_string(),
        #[cfg(target_os = "linux")]
        Threads::OpenMp(o) => format!("openmp:{}", o.path),
    })
}

/// Runs `f(par)`, a kernel call over `len` elements, with the GIL released, `par` naming
/// the threads it may split its work over: OpenMP's team from the calling thread, or
/// bnorm's own pool; on the calling thread alone below [`PARALLEL_THRESHOLD`] elements,
/// where the kernels run sequentially anyway and handing the call to a pool thread would
/// only add its latency.
pub fn run<R: Send>(
    py: Python<'_>,
    len: usize,
    f: impl FnOnce(Parallelism) -> R + Send,
) -> PyResult<R> {
    if len < PARALLEL_THRESHOLD {
        return Ok(py.detach(|| f(Parallelism::Sequential)));
    }
    Ok(match current()? {
        Threads::Own(pool) => py.detach(|| pool.install(|| f(Parallelism::Rayon))),
        #[cfg(target_os = "linux")]
        Threads::OpenMp(o) => py.detach(|| f(Parallelism::Threads(o))),
    })
}

#[cfg(target_os = "linux")]
mod openmp {
    use std::any::Any;
    use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
    use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
    use std::sync::Mutex;

    use bnorm::expert::Executor;

    /// `GOMP_parallel(fn, data, num_threads, flags)`: runs `fn(data)` on every thread of a
    /// new team (0 threads: the `nthreads-var` ICV, what `omp_set_num_threads` and
    /// `OMP_NUM_THREADS` set) and returns after the team's closing barrier. GNU libgomp's
    /// entry point for `#pragma omp parallel`; Intel's and LLVM's runtimes export it too.
    type Parallel =
        unsafe extern "C" fn(unsafe extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);
    type MaxThreads = unsafe extern "C" fn() -> c_int;

    /// An OpenMP runtime loaded in the process.
    pub struct OpenMp {
        parallel: Parallel,
        max_threads: MaxThreads,
        /// The shared object's path.
        pub path: String,
    }

    /// What one team runs: the worker, and the first panic of any of its threads.
    struct Team<'a> {
        worker: &'a (dyn Fn() + Sync),
        panic: Mutex<Option<Box<dyn Any + Send>>>,
    }

    /// The function every thread of the team calls with the [`Team`].
    unsafe extern "C" fn call(data: *mut c_void) {
        // SAFETY: `data` is the `&Team` that `run` passed to `GOMP_parallel`, alive until
        // it returns, which is after every thread of the team has returned from here.
        let team = unsafe { &*(data as *const Team<'_>) };
        // A panic must not unwind into C; it is carried to the calling thread instead.
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| (team.worker)())) {
            let mut slot = team.panic.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert(p);
        }
    }

    impl Executor for OpenMp {
        fn threads(&self) -> usize {
            // SAFETY: `omp_get_max_threads` takes no arguments and only reads the calling
            // thread's ICVs; the symbol was resolved from a loaded OpenMP runtime.
            (unsafe { (self.max_threads)() }).max(1) as usize
        }

        fn run(&self, worker: &(dyn Fn() + Sync)) {
            let team = Team {
                worker,
                panic: Mutex::new(None),
            };
            let data = &team as *const Team<'_> as *mut c_void;
            // SAFETY: `call` matches the outlined-function type libgomp expects and only
            // reads `data` as the `Team` above, which outlives the call: GOMP_parallel
            // returns after its team's closing barrier, when every thread has left `call`.
            // `call` never unwinds (panics are caught). `worker` is `Sync`, so calling it
            // from the team's threads at once is sound.
            unsafe { (self.parallel)(call, data, 0, 0) };
            let panic = team.panic.into_inner().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = panic {
                resume_unwind(p);
            }
        }

        fn name(&self) -> &str {
            "openmp"
        }
    }

    /// The loaded shared objects' paths, in load order.
    fn loaded() -> Vec<String> {
        unsafe extern "C" fn each(
            info: *mut libc::dl_phdr_info,
            _: usize,
            data: *mut c_void,
        ) -> c_int {
            // SAFETY: `data` is the `Vec` passed below, used by this thread only during
            // `dl_iterate_phdr`; `info` is valid for this callback, its name a C string
            // or null.
            unsafe {
                let names = &mut *(data as *mut Vec<String>);
                let name = (*info).dlpi_name;
                if !name.is_null() {
                    names.push(CStr::from_ptr(name).to_string_lossy().into_owned());
                }
            }
            0
        }
        let mut names: Vec<String> = Vec::new();
        // SAFETY: `each` matches the callback type and only touches `names`, which lives
        // across the call.
        unsafe { libc::dl_iterate_phdr(Some(each), &mut names as *mut Vec<String> as *mut c_void) };
        names
    }

    impl OpenMp {
        /// The runtime named by `library` (a path or file name of a loaded shared object),
        /// or the first loaded one that looks like an OpenMP runtime.
        pub fn find(library: Option<&str>) -> Result<OpenMp, String> {
            let names = loaded();
            let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
            let path = match library {
                Some(l) => names.into_iter().find(|n| n == l || base(n) == l),
                None => names.into_iter().find(|n| {
                    let b = base(n);
                    b.starts_with("libgomp") || b.starts_with("libiomp") || b.starts_with("libomp")
                }),
            };
            let path = path.ok_or_else(|| match library {
                Some(l) => format!("no loaded shared object is called {l:?}"),
                None => "no OpenMP runtime (libgomp, libiomp, libomp) is loaded in this process \
                         (import torch first)"
                    .to_string(),
            })?;
            let c = CString::new(path.clone()).map_err(|e| e.to_string())?;
            // SAFETY: `c` is a C string; RTLD_NOLOAD only returns a handle to an object
            // already loaded (running no initializers), and keeps it loaded.
            let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
            if handle.is_null() {
                return Err(format!("{path} is not loaded"));
            }
            let symbol = |name: &CStr| {
                // SAFETY: `handle` is a live handle, `name` a C string.
                let p = unsafe { libc::dlsym(handle, name.as_ptr() as *const c_char) };
                (!p.is_null()).then_some(p)
            };
            let (Some(parallel), Some(max_threads)) =
                (symbol(c"GOMP_parallel"), symbol(c"omp_get_max_threads"))
            else {
                return Err(format!(
                    "{path} has no GOMP_parallel and omp_get_max_threads: not an OpenMP runtime"
                ));
            };
            // SAFETY: these are the runtime's own entry points with the documented C
            // signatures `Parallel` and `MaxThreads` (GNU libgomp's ABI, which Intel's and
            // LLVM's runtimes also export).
            let (parallel, max_threads) = unsafe {
                (
                    std::mem::transmute::<*mut c_void, Parallel>(parallel),
                    std::mem::transmute::<*mut c_void, MaxThreads>(max_threads),
                )
            };
            Ok(OpenMp {
                parallel,
                max_threads,
                path,
            })
        }
    }
}
