//! The arithmetic of the element-wise maps and the layout of their per-channel
//! coefficients: [`Arith`] (f64, or f32 with the center split in two parts) and the
//! tables of channels-last rows ([`coef_table`]), one column per coefficient, each
//! repeated to a run of whole rows.

use super::schedule::{Scratch, Spare};
use crate::element::Element;

/// The arithmetic of the element-wise maps. The forward maps run in f64 for f64 storage
/// and in f32 for every narrower type (twice the SIMD lanes, no conversions); the
/// backward maps run in f64 for f32 and f64 storage, because their three terms cancel by
/// design (dx sums to zero over a channel) and f32 would leave errors of the terms' size
/// in small gradients (f32 storage may ask for it: `BackwardArithmetic::F32`), and in f32
/// for the 16-bit types, whose own rounding is 2^13 times coarser. In f32 the center is
/// split into a high
/// part `hi` (the center rounded to f32) and the rest `lo`; the maps compute `x − hi`,
/// which is exact when x lies near the center (Sterbenz), and fold `−lo·scale` into the
/// shift in f64. So a channel mean of 1e4 with unit spread costs no accuracy, and the
/// result stays within a few f32 roundings of the f64 one. Statistics and reductions stay
/// in f64 whatever the storage. The maps use separate multiplies and adds, never a fused
/// multiply-add, so every instruction set gives the same bits.
pub(super) trait Arith:
    Spare
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
{
    const ZERO: Self;
    /// Whether this is f32 (the backward maps then center `dz` too).
    const NARROW: bool;
    fn load<T: Element>(v: T) -> Self;
    fn store<T: Element>(self) -> T;
    /// `(hi, lo)`: `hi` in this type, `lo = v − hi` in f64 (0 when `hi` is `v`).
    fn split(v: f64) -> (Self, f64);
    fn coef(v: f64) -> Self;
}

impl Arith for f64 {
    const ZERO: f64 = 0.0;
    const NARROW: bool = false;
    #[inline(always)]
    fn load<T: Element>(v: T) -> f64 {
        v.to_f64()
    }
    #[inline(always)]
    fn store<T: Element>(self) -> T {
        T::from_f64(self)
    }
    #[inline(always)]
    fn split(v: f64) -> (f64, f64) {
        (v, 0.0)
    }
    #[inline(always)]
    fn coef(v: f64) -> f64 {
        v
    }
}

impl Arith for f32 {
    const ZERO: f32 = 0.0;
    const NARROW: bool = true;
    #[inline(always)]
    fn load<T: Element>(v: T) -> f32 {
        v.to_f32()
    }
    #[inline(always)]
    fn store<T: Element>(self) -> T {
        T::from_f32(self)
    }
    #[inline(always)]
    fn split(v: f64) -> (f32, f64) {
        let hi = v as f32;
        let lo = if hi.is_finite() { v - hi as f64 } else { 0.0 };
        (hi, lo)
    }
    #[inline(always)]
    fn coef(v: f64) -> f32 {
        v as f32
    }
}

// ─── Channels-last coefficient tables ───────────────────────────────────────────────────

/// Values per run of the channels-last maps: whole rows, at least 512 values, so the
/// loop over a run is long enough to vectorize well whatever C is.
#[inline(always)]
pub(super) fn map_run(c: usize) -> usize {
    c * 512usize.div_ceil(c)
}

/// `K` per-channel coefficients of a channels-last map in the arithmetic `A`
/// (`coefs(channel)`), each repeated to a run of `map_run(c)` values; see [`columns`].
#[inline(always)]
pub(super) fn coef_table<A: Arith, const K: usize>(
    c: usize,
    coefs: impl Fn(usize) -> [A; K],
) -> Scratch<A> {
    let (l, stride) = (map_run(c), column_stride(c));
    let mut buf = Scratch::<A>::take(K * stride);
    for ch in 0..c {
        for (k, v) in coefs(ch).into_iter().enumerate() {
            buf[k * stride + ch] = v;
        }
    }
    for col in buf.chunks_exact_mut(stride) {
        for i in c..l + WRAP {
            col[i] = col[i - c];
        }
    }
    buf
}

/// Values past the end of each [`coef_table`] column that repeat its start (the period
/// `c` divides the run), so a vector of up to `WRAP` lanes may start anywhere in a run.
pub(crate) const WRAP: usize = 16;

/// Distance between the columns of a [`coef_table`]: the run plus 48 values (the `WRAP`
/// repeat, then padding so that columns do not fall on the same offsets modulo 4 KiB).
#[inline(always)]
pub(super) fn column_stride(c: usize) -> usize {
    map_run(c) + 48
}

/// The `K` columns of a [`coef_table`] for `c` channels.
#[inline(always)]
pub(super) fn columns<A: Arith, const K: usize>(t: &[A], c: usize) -> [&[A]; K] {
    let (l, stride) = (map_run(c), column_stride(c));
    std::array::from_fn(|k| &t[k * stride..k * stride + l])
}

/// The coefficients as vectors, for the streaming kernels: one value per column for a
/// whole channels-first run ([`Broadcast`](x86::Broadcast)) or the columns of a
/// [`coef_table`] ([`Table`](x86::Table)).
#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use super::WRAP;

    /// A coefficient type: f32 (forward) or f64 (backward), with its AVX vector.
    pub(crate) trait Coef: Copy {
        type V: Copy;
        /// `LANES` values from `p`.
        ///
        /// # Safety
        /// `p` must be valid for `LANES` reads and the CPU must support AVX.
        unsafe fn load(p: *const Self) -> Self::V;
        /// The value in every lane.
        ///
        /// # Safety
        /// The CPU must support AVX.
        unsafe fn splat(v: Self) -> Self::V;
        const LANES: usize;
    }

    impl Coef for f32 {
        type V = __m256;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            // SAFETY: the caller's contract.
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> __m256 {
            // SAFETY: the caller's contract (AVX).
            unsafe { _mm256_set1_ps(v) }
        }
        const LANES: usize = 8;
    }

    impl Coef for f64 {
        type V = __m256d;
        #[inline(always)]
        unsafe fn load(p: *const f64) -> __m256d {
            // SAFETY: the caller's contract.
            unsafe { _mm256_loadu_pd(p) }
        }
        #[inline(always)]
        unsafe fn splat(v: f64) -> __m256d {
            // SAFETY: the caller's contract (AVX).
            unsafe { _mm256_set1_pd(v) }
        }
        const LANES: usize = 4;
    }

    /// Sixteen f32 coefficients for the AVX-512 path.
    pub(crate) trait Source16: Source<f32> {
        /// Column `k` from run offset `o` (`o < run`).
        ///
        /// # Safety
        /// The CPU must support AVX-512F.
        unsafe fn vec16(&self, k: usize, o: usize) -> __m512;
    }

    impl<const K: usize> Source16 for Broadcast<f32, K> {
        #[inline(always)]
        unsafe fn vec16(&self, k: usize, _: usize) -> __m512 {
            // SAFETY: the caller guarantees AVX-512F.
            unsafe { _mm512_set1_ps(self.0[k]) }
        }
    }

    impl Source16 for Table<'_, f32> {
        #[inline(always)]
        unsafe fn vec16(&self, k: usize, o: usize) -> __m512 {
            let i = k * self.stride + o;
            assert!(i + 16 <= self.t.len());
            // SAFETY: `i + 16 <= t.len()` (asserted; `o < run` and `run + WRAP <= stride`
            // with `WRAP >= 16`), and the caller guarantees AVX-512F.
            unsafe { _mm512_loadu_ps(self.t.as_ptr().add(i)) }
        }
    }

    /// Eight f64 coefficients for the AVX-512 path.
    pub(crate) trait Source8: Source<f64> {
        /// Column `k` from run offset `o` (`o < run`).
        ///
        /// # Safety
        /// The CPU must support AVX-512F.
        unsafe fn vec8(&self, k: usize, o: usize) -> __m512d;
    }

    impl<const K: usize> Source8 for Broadcast<f64, K> {
        #[inline(always)]
        unsafe fn vec8(&self, k: usize, _: usize) -> __m512d {
            // SAFETY: the caller guarantees AVX-512F.
            unsafe { _mm512_set1_pd(self.0[k]) }
        }
    }

    impl Source8 for Table<'_, f64> {
        #[inline(always)]
        unsafe fn vec8(&self, k: usize, o: usize) -> __m512d {
            let i = k * self.stride + o;
            assert!(i + 8 <= self.t.len());
            // SAFETY: `i + 8 <= t.len()` (asserted; `o < run` and `run + WRAP <= stride`
            // with `WRAP >= 8`), and the caller guarantees AVX-512F.
            unsafe { _mm512_loadu_pd(self.t.as_ptr().add(i)) }
        }
    }

    /// Per-element coefficients: column `k` at run offset `o`.
    pub(crate) trait Source<E: Coef> {
        /// The run length (offsets wrap at it).
        fn run(&self) -> usize;
        fn at(&self, k: usize, o: usize) -> E;
        /// `E::LANES` coefficients of column `k` from run offset `o` (the vector may run
        /// past `run` into the table's `WRAP` repeat; implementations assert the bound).
        ///
        /// # Safety
        /// The CPU must support AVX.
        unsafe fn vec(&self, k: usize, o: usize) -> E::V;
    }

    /// One value per column for the whole run (channels-first rows).
    pub(crate) struct Broadcast<E, const K: usize>(pub(crate) [E; K]);

    impl<E: Coef, const K: usize> Source<E> for Broadcast<E, K> {
        fn run(&self) -> usize {
            usize::MAX
        }
        #[inline(always)]
        fn at(&self, k: usize, _: usize) -> E {
            self.0[k]
        }
        #[inline(always)]
        unsafe fn vec(&self, k: usize, _: usize) -> E::V {
            // SAFETY: the caller guarantees AVX.
            unsafe { E::splat(self.0[k]) }
        }
    }

    /// Columns of a channels-last coefficient table.
    pub(crate) struct Table<'a, E> {
        t: &'a [E],
        run: usize,
        stride: usize,
    }

    impl<'a, E> Table<'a, E> {
        pub(crate) fn new(t: &'a [E], run: usize, columns: usize) -> Table<'a, E> {
            let stride = t.len() / columns;
            assert!(
                run > 0 && run + WRAP <= stride,
                "coefficient table too short"
            );
            Table { t, run, stride }
        }
    }

    impl<E: Coef> Source<E> for Table<'_, E> {
        fn run(&self) -> usize {
            self.run
        }
        #[inline(always)]
        fn at(&self, k: usize, o: usize) -> E {
            self.t[k * self.stride + o]
        }
        #[inline(always)]
        unsafe fn vec(&self, k: usize, o: usize) -> E::V {
            let i = k * self.stride + o;
            assert!(i + E::LANES <= self.t.len());
            // SAFETY: `i + LANES <= t.len()` (asserted; `o < run + 4` and
            // `run + WRAP <= stride` make it hold for every column), and the caller
            // guarantees AVX.
            unsafe { E::load(self.t.as_ptr().add(i)) }
        }
    }
}
