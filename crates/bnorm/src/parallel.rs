//! How a call may use threads: not at all, rayon's pool, or threads the caller already has
//! (an [`Executor`], e.g. the OpenMP workers of a process that runs PyTorch), and the one
//! place where kernels split their work over them.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

/// Batches smaller than this many elements always run on the calling thread: below it,
/// waking rayon workers costs more than the work.
pub const PARALLEL_THRESHOLD: usize = 1 << 16;

/// Whether a kernel may split its work over threads, and over which.
///
/// Results never depend on this choice: reductions are cut into pieces fixed by the shape
/// and merged in a fixed order, so `Sequential`, `Rayon` and `Threads` give bitwise
/// identical outputs. `Rayon` runs in the pool of the caller (`pool.install(|| ...)` picks
/// another pool).
#[derive(Clone, Copy, Default)]
pub enum Parallelism {
    /// Everything on the calling thread.
    Sequential,
    /// Split over the current rayon pool when the batch has at least
    /// [`PARALLEL_THRESHOLD`] elements.
    #[default]
    Rayon,
    /// Split over the threads of an [`Executor`] when the batch has at least
    /// [`PARALLEL_THRESHOLD`] elements.
    Threads(&'static dyn Executor),
}

impl Parallelism {
    /// Whether a batch of `len` elements is split over threads.
    ///
    /// ```
    /// use bnorm::expert::Parallelism;
    /// assert!(!Parallelism::Rayon.is_parallel(10));
    /// assert!(!Parallelism::Sequential.is_parallel(1 << 30));
    /// ```
    pub fn is_parallel(self, len: usize) -> bool {
        !matches!(self, Parallelism::Sequential) && len >= PARALLEL_THRESHOLD
    }

    /// How many threads a split may use (1 for `Sequential`).
    ///
    /// ```
    /// use bnorm::expert::Parallelism;
    /// assert_eq!(Parallelism::Sequential.threads(), 1);
    /// assert_eq!(Parallelism::Rayon.threads(), rayon::current_num_threads());
    /// ```
    pub fn threads(self) -> usize {
        match self {
            Parallelism::Sequential => 1,
            Parallelism::Rayon => rayon::current_num_threads(),
            Parallelism::Threads(e) => e.threads().max(1),
        }
    }
}

impl fmt::Debug for Parallelism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Parallelism::Sequential => f.write_str("Sequential"),
            Parallelism::Rayon => f.write_str("Rayon"),
            Parallelism::Threads(e) => f.debug_tuple("Threads").field(&e.name()).finish(),
        }
    }
}

/// The same choice; two `Threads` are equal when they name the same executor object.
impl PartialEq for Parallelism {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Parallelism::Sequential, Parallelism::Sequential)
            | (Parallelism::Rayon, Parallelism::Rayon) => true,
            (Parallelism::Threads(a), Parallelism::Threads(b)) => {
                std::ptr::addr_eq(*a as *const dyn Executor, *b as *const dyn Executor)
            }
            _ => false,
        }
    }
}

impl Eq for Parallelism {}

/// Threads that someone else owns, lent to bnorm's kernels.
///
/// [`run`](Executor::run) calls `worker` once on each of (up to) [`threads`]
/// threads, the calling thread among them, and returns when every call has returned.
/// Each call takes pieces of the kernel's work until none is left; the calling thread then
/// does whatever no call took, so an executor that runs `worker` on fewer threads (or not
/// at all) only makes the kernel slower, never wrong, and results are bitwise the same
/// whatever the executor does. This is how bnorm shares a process's threads instead of
/// competing with them: the Python package runs its kernels on PyTorch's OpenMP workers.
///
/// [`threads`]: Executor::threads
///
/// ```
/// use bnorm::expert::{Executor, Parallelism};
///
/// /// Scoped standard-library threads, started per call (an example, not a fast one).
/// struct Scoped(usize);
/// impl Executor for Scoped {
///     fn threads(&self) -> usize {
///         self.0
///     }
///     fn run(&self, worker: &(dyn Fn() + Sync)) {
///         std::thread::scope(|s| {
///             for _ in 1..self.0 {
///                 s.spawn(worker);
///             }
///             worker();
///         });
///     }
/// }
/// static FOUR: Scoped = Scoped(4);
///
/// use bnorm::{Config, Layout, Mode};
/// let x: Vec<f32> = (0..8 * 4 * 64 * 64).map(|i| (i % 97) as f32).collect();
/// let shape = [8, 4, 64, 64];
/// let mut own = Config::torch(4).build()?;
/// let mut lent = Config::torch(4).build()?;
/// lent.set_parallelism(Parallelism::Threads(&FOUR));
/// let (a, _) = own.forward(&x, &shape, Layout::NCHW, Mode::Train)?;
/// let (b, _) = lent.forward(&x, &shape, Layout::NCHW, Mode::Train)?;
/// assert_eq!(a, b); // bit for bit
/// # Ok::<(), bnorm::Error>(())
/// ```
pub trait Executor: Sync {
    /// How many threads [`run`](Executor::run) uses, the calling thread included.
    fn threads(&self) -> usize;
    /// Calls `worker` on each thread; returns when every call has returned.
    fn run(&self, worker: &(dyn Fn() + Sync));
    /// A name for messages and `Debug`.
    fn name(&self) -> &str {
        "executor"
    }
}

/// A raw pointer that may cross threads; see the SAFETY notes where it is dereferenced.
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: the pointer is only used to build disjoint sub-slices of one `&mut [T]` (the
// chunk a task claimed, or rows of distinct channels in the fused kernels) while that
// exclusive borrow is held by the caller; `T: Send`.
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above; no two threads ever form overlapping slices.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// The range of chunk `i` (of `size` elements) in a slice of `len`: empty past the end.
fn chunk_range(i: usize, size: usize, len: usize) -> std::ops::Range<usize> {
    let start = (i * size).min(len);
    start..(start + size).min(len)
}

/// Runs `task(i)` for `i` in `0..n` on `executor`'s threads: every index exactly once,
/// all done when this returns.
fn claim_all(executor: &dyn Executor, n: usize, task: &(dyn Fn(usize) + Sync)) {
    let next = AtomicUsize::new(0);
    let worker = || loop {
        // Each index is handed out once: `fetch_add` is one atomic step, whatever the
        // ordering (the results travel by the executor's own join, and by program order
        // for the calling thread below).
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        task(i);
    };
    executor.run(&worker);
    // Whatever the executor left undone (it may run `worker` on fewer threads than it
    // says, or never): every index is claimed before this returns.
    worker();
}

/// Runs `task(i, chunk_i)` over the chunks of `size` elements of `out` (the last one may
/// be shorter), split over `par`'s threads when `work` elements make that worthwhile.
pub(crate) fn chunks<U, F>(par: Parallelism, work: usize, out: &mut [U], size: usize, task: F)
where
    U: Send,
    F: Fn(usize, &mut [U]) + Sync + Send,
{
    let size = size.max(1);
    if !par.is_parallel(work) {
        out.chunks_mut(size)
            .enumerate()
            .for_each(|(i, c)| task(i, c));
        return;
    }
    match par {
        Parallelism::Threads(e) => {
            let len = out.len();
            let base = SendPtr(out.as_mut_ptr());
            claim_all(e, len.div_ceil(size), &|i| {
                let r = chunk_range(i, size, len);
                let p = base;
                // SAFETY: `r` lies within `out` (`chunk_range` clamps it to `len`), the
                // chunks of distinct indices are disjoint, `claim_all` hands each index to
                // one call only, and `out` stays exclusively borrowed until every call has
                // returned (`claim_all` returns after them).
                let c = unsafe { std::slice::from_raw_parts_mut(p.0.add(r.start), r.len()) };
                task(i, c);
            });
        }
        _ => out
            .par_chunks_mut(size)
            .enumerate()
            .for_each(|(i, c)| task(i, c)),
    }
}

/// [`chunks`] over two outputs cut alike (chunk `i` of each; `b` may be empty, then every
/// chunk of it is).
pub(crate) fn chunks2<U, V, F>(
    par: Parallelism,
    work: usize,
    (a, b): (&mut [U], &mut [V]),
    size: usize,
    task: F,
) where
    U: Send,
    V: Send,
    F: Fn(usize, &mut [U], &mut [V]) + Sync + Send,
{
    if b.is_empty() {
        return chunks(par, work, a, size, |i, c| task(i, c, &mut []));
    }
    debug_assert_eq!(a.len(), b.len());
    let size = size.max(1);
    if !par.is_parallel(work) {
        a.chunks_mut(size)
            .zip(b.chunks_mut(size))
            .enumerate()
            .for_each(|(i, (ca, cb))| task(i, ca, cb));
        return;
    }
    match par {
        Parallelism::Threads(e) => {
            let (la, lb) = (a.len(), b.len());
            let (pa, pb) = (SendPtr(a.as_mut_ptr()), SendPtr(b.as_mut_ptr()));
            claim_all(e, la.div_ceil(size), &|i| {
                let (ra, rb) = (chunk_range(i, size, la), chunk_range(i, size, lb));
                let (pa, pb) = (pa, pb);
                // SAFETY: as in `chunks`, for each of the two slices.
                let ca = unsafe { std::slice::from_raw_parts_mut(pa.0.add(ra.start), ra.len()) };
                // SAFETY: as in `chunks`.
                let cb = unsafe { std::slice::from_raw_parts_mut(pb.0.add(rb.start), rb.len()) };
                task(i, ca, cb);
            });
        }
        _ => a
            .par_chunks_mut(size)
            .zip(b.par_chunks_mut(size))
            .enumerate()
            .for_each(|(i, (ca, cb))| task(i, ca, cb)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Runs the worker on `n` scoped threads, or on none at all (`lazy`).
    struct Scoped {
        n: usize,
        lazy: bool,
        calls: AtomicUsize,
    }
    impl Executor for Scoped {
        fn threads(&self) -> usize {
            self.n
        }
        fn run(&self, worker: &(dyn Fn() + Sync)) {
            if self.lazy {
                return;
            }
            std::thread::scope(|s| {
                for _ in 0..self.n {
                    s.spawn(|| {
                        self.calls.fetch_add(1, Ordering::Relaxed);
                        worker()
                    });
                }
            });
        }
    }

    const fn scoped(n: usize, lazy: bool) -> Scoped {
        Scoped {
            n,
            lazy,
            calls: AtomicUsize::new(0),
        }
    }
    static THREE: Scoped = scoped(3, false);
    static ONE: Scoped = scoped(1, false);
    static LAZY: Scoped = scoped(4, true);
    static TWO: Scoped = scoped(2, false);
    static OTHER: Scoped = scoped(2, false);
    static NONE: Scoped = scoped(0, false);

    #[test]
    fn every_chunk_is_visited_once_whatever_the_executor_does() {
        for e in [&THREE, &ONE, &LAZY] {
            let (n, lazy) = (e.n, e.lazy);
            let par = Parallelism::Threads(e);
            for (len, size) in [(1000, 7), (1000, 1000), (5, 100), (0, 3), (64, 8)] {
                let mut out = vec![0u32; len];
                let mut res = vec![0u32; len];
                chunks(par, PARALLEL_THRESHOLD, &mut out, size, |i, c| {
                    for (k, v) in c.iter_mut().enumerate() {
                        *v += (i * size + k) as u32 + 1;
                    }
                });
                chunks2(
                    par,
                    PARALLEL_THRESHOLD,
                    (&mut res, &mut out),
                    size,
                    |i, a, b| {
                        assert_eq!(a.len(), b.len());
                        for (k, (x, y)) in a.iter_mut().zip(b.iter_mut()).enumerate() {
                            *x += (i * size + k) as u32 + 1;
                            *y += 1;
                        }
                    },
                );
                let want: Vec<u32> = (1..=len as u32).collect();
                assert_eq!(res, want, "{n} threads, lazy {lazy}, {len}/{size}");
                let want: Vec<u32> = (2..=len as u32 + 1).collect();
                assert_eq!(out, want, "{n} threads, lazy {lazy}, {len}/{size}");
            }
            if !lazy {
                assert!(e.calls.load(Ordering::Relaxed) > 0);
            }
        }
    }

    #[test]
    fn an_empty_second_output_gives_empty_chunks() {
        let par = Parallelism::Threads(&TWO);
        let mut a = vec![0u8; 100];
        let mut b: Vec<u8> = Vec::new();
        chunks2(
            par,
            PARALLEL_THRESHOLD,
            (&mut a, &mut b),
            10,
            |_, ca, cb| {
                assert!(cb.is_empty());
                ca.fill(1);
            },
        );
        assert!(a.iter().all(|&v| v == 1));
    }

    #[test]
    fn equality_and_debug_name_the_executor() {
        let (e, f): (&'static Scoped, &'static Scoped) = (&TWO, &OTHER);
        assert_eq!(Parallelism::Threads(e), Parallelism::Threads(e));
        assert_ne!(Parallelism::Threads(e), Parallelism::Threads(f));
        assert_ne!(Parallelism::Threads(e), Parallelism::Rayon);
        assert_eq!(
            format!("{:?}", Parallelism::Threads(e)),
            "Threads(\"executor\")"
        );
        assert_eq!(Parallelism::Threads(&NONE).threads(), 1);
    }
}
