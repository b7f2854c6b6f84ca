//! How a call may use threads.

/// Batches smaller than this many elements always run on the calling thread: below it,
/// waking rayon workers costs more than the work.
pub const PARALLEL_THRESHOLD: usize = 1 << 16;

/// Whether a kernel may split its work over the current rayon pool.
///
/// Results never depend on this choice: reductions are cut into pieces fixed by the shape
/// and merged in a fixed order, so `Sequential` and `Rayon` give bitwise identical outputs.
/// `Rayon` runs in the pool of the caller (`pool.install(|| ...)` picks another pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Parallelism {
    /// Everything on the calling thread.
    Sequential,
    /// Split over the current rayon pool when the batch has at least
    /// [`PARALLEL_THRESHOLD`] elements.
    #[default]
    Rayon,
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
        matches!(self, Parallelism::Rayon) && len >= PARALLEL_THRESHOLD
    }
}
