//! How the work of a kernel is split into tasks, and the memory the tasks reuse.
//!
//! Reductions are cut into segments fixed by the shape alone ([`segments`]), never by the
//! number of threads: each segment is reduced sequentially and the segments are merged
//! in order, so a result has the same bits with 1 thread or 64. The element-wise maps
//! take [`rows_per_task`] rows per task (about [`SEGMENT`] elements), which changes no
//! bit. [`Workspace`] keeps the per-segment partial results between calls and
//! [`Scratch`] each thread's temporary buffers, so that a warmed-up training step
//! allocates nothing; tasks that write disjoint rows of one output share it through a
//! [`SendPtr`].

use super::SEGMENT;
use crate::layout::Geometry;
use crate::stats::Moments;

/// Rows per task for the element-wise kernels: at least one row, about `SEGMENT`
/// elements.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (SEGMENT / row_len.max(1)).max(1)
}

/// Rows per segment and number of segments (per channel for channels-first, in total for
/// channels-last). Depends on the shape only.
pub(crate) fn segments(g: Geometry) -> (usize, usize) {
    let rps = if g.inner == 1 {
        // Channels-last: about 256K values per segment, so that wide rows (C = 1024: 256
        // rows) still give few per-channel merges; still one segment per thread or more
        // for any batch of a few MB.
        (CL_SEGMENT / g.channels.max(1)).max(1)
    } else {
        rows_per_task(g.inner)
    };
    (rps, g.outer.div_ceil(rps))
}

/// Values per channels-last reduction segment. Fixed: it shapes the reduction order.
const CL_SEGMENT: usize = 1 << 18;

/// Scratch space for the reductions, reusable across calls so that a training step does
/// not allocate once it has warmed up.
#[derive(Debug, Default, Clone)]
pub struct Workspace {
    pub(super) moments: Vec<Moments>,
    pub(super) pairs: Vec<(f64, f64)>,
    pub(crate) tmp: Vec<Moments>,
    pub(crate) tmp_pairs: Vec<(f64, f64)>,
    pub(crate) coef: Vec<f64>,
    /// The statistics a forward step fills before it can fail; they replace the caller's
    /// [`Saved`](crate::expert::Saved) only when the step succeeds.
    pub(crate) next_saved: crate::forward::Saved,
}

thread_local! {
    /// Per-thread buffers of [`Scratch`], one per value type.
    static SPARE64: std::cell::Cell<Vec<f64>> = const { std::cell::Cell::new(Vec::new()) };
    static SPARE32: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A value type with a per-thread spare buffer.
pub(crate) trait Spare: Copy + Default + 'static {
    fn spare() -> &'static std::thread::LocalKey<std::cell::Cell<Vec<Self>>>;
}

impl Spare for f64 {
    fn spare() -> &'static std::thread::LocalKey<std::cell::Cell<Vec<f64>>> {
        &SPARE64
    }
}

impl Spare for f32 {
    fn spare() -> &'static std::thread::LocalKey<std::cell::Cell<Vec<f32>>> {
        &SPARE32
    }
}

/// `n` zeroed values in this thread's spare buffer, taken for the life of the guard and
/// handed back on drop, so a warmed-up step allocates nothing (a kernel nested in another
/// finds the buffer taken and allocates its own). Unlike a closure-taking helper, the
/// guard keeps the kernel's loops inside the `#[target_feature]` function that runs them.
pub(crate) struct Scratch<A: Spare>(Vec<A>);

impl<A: Spare> Scratch<A> {
    #[inline(always)]
    pub(crate) fn take(n: usize) -> Scratch<A> {
        let mut v = A::spare().try_with(|c| c.take()).unwrap_or_default();
        v.clear();
        v.resize(n, A::default());
        Scratch(v)
    }
}

impl<A: Spare> Drop for Scratch<A> {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        // At thread exit the buffer is simply freed.
        let _ = A::spare().try_with(|c| c.set(v));
    }
}

impl<A: Spare> std::ops::Deref for Scratch<A> {
    type Target = [A];
    fn deref(&self) -> &[A] {
        &self.0
    }
}

impl<A: Spare> std::ops::DerefMut for Scratch<A> {
    fn deref_mut(&mut self) -> &mut [A] {
        &mut self.0
    }
}
