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

// ─── The per-channel coefficients of the maps ───────────────────────────────────────────

/// The per-channel coefficients of the forward map `y = (x − center)·scale + shift`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Affine<'a> {
    pub(crate) center: &'a [f64],
    pub(crate) scale: &'a [f64],
    pub(crate) shift: &'a [f64],
}

impl<'a> Affine<'a> {
    /// The number of channels.
    #[inline(always)]
    pub(crate) fn channels(&self) -> usize {
        self.center.len()
    }

    /// Channel `ch`'s `(center, scale, shift)`.
    #[inline(always)]
    pub(crate) fn at(&self, ch: usize) -> (f64, f64, f64) {
        (self.center[ch], self.scale[ch], self.shift[ch])
    }
}

/// The per-channel coefficients of the backward map `dx = a·dz + b·(x − center) + k`
/// and its arithmetic: f32 for f32 storage when `narrow` (see `by_backward_arith!`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Affine2<'a> {
    pub(crate) center: &'a [f64],
    pub(crate) a: &'a [f64],
    pub(crate) b: &'a [f64],
    pub(crate) k: &'a [f64],
    pub(crate) narrow: bool,
}

impl<'a> Affine2<'a> {
    /// The number of channels.
    #[inline(always)]
    pub(crate) fn channels(&self) -> usize {
        self.center.len()
    }

    /// Channel `ch`'s coefficients.
    #[inline(always)]
    pub(crate) fn at(&self, ch: usize) -> Affine2At {
        Affine2At {
            m: self.center[ch],
            a: self.a[ch],
            b: self.b[ch],
            k: self.k[ch],
            narrow: self.narrow,
        }
    }
}

/// One channel's backward map `dx = a·dz + b·(x − m) + k` and its arithmetic.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Affine2At {
    pub(crate) m: f64,
    pub(crate) a: f64,
    pub(crate) b: f64,
    pub(crate) k: f64,
    pub(crate) narrow: bool,
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
/// [`coef_table`] ([`Table`](x86::Table)), read at the width of either x86 level; and the
/// f32 vectors of both levels ([`F32s`](x86::F32s)), so that each kernel is written once.
#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use super::WRAP;

    /// A coefficient type, f32 or f64, with its vectors: `V` on AVX2 (`__m256`, `__m256d`)
    /// and `W` on AVX-512 (`__m512`, `__m512d`).
    pub(crate) trait Coef: Copy {
        type V: Copy;
        type W: Copy;
        /// Values per `V`.
        const LANES: usize;
        /// Values per `W`.
        const WIDE_LANES: usize;
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
        /// `WIDE_LANES` values from `p`.
        ///
        /// # Safety
        /// `p` must be valid for `WIDE_LANES` reads and the CPU must support AVX-512F.
        unsafe fn load_wide(p: *const Self) -> Self::W;
        /// The value in every lane of a `W`.
        ///
        /// # Safety
        /// The CPU must support AVX-512F.
        unsafe fn splat_wide(v: Self) -> Self::W;
    }

    impl Coef for f32 {
        type V = __m256;
        type W = __m512;
        const LANES: usize = 8;
        const WIDE_LANES: usize = 16;
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
        #[inline(always)]
        unsafe fn load_wide(p: *const f32) -> __m512 {
            // SAFETY: the caller's contract.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn splat_wide(v: f32) -> __m512 {
            // SAFETY: the caller's contract (AVX-512F).
            unsafe { _mm512_set1_ps(v) }
        }
    }

    impl Coef for f64 {
        type V = __m256d;
        type W = __m512d;
        const LANES: usize = 4;
        const WIDE_LANES: usize = 8;
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
        #[inline(always)]
        unsafe fn load_wide(p: *const f64) -> __m512d {
            // SAFETY: the caller's contract.
            unsafe { _mm512_loadu_pd(p) }
        }
        #[inline(always)]
        unsafe fn splat_wide(v: f64) -> __m512d {
            // SAFETY: the caller's contract (AVX-512F).
            unsafe { _mm512_set1_pd(v) }
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
        /// `E::WIDE_LANES` coefficients of column `k` from run offset `o`, as [`vec`](Source::vec).
        ///
        /// # Safety
        /// The CPU must support AVX-512F.
        unsafe fn wide(&self, k: usize, o: usize) -> E::W;
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
        #[inline(always)]
        unsafe fn wide(&self, k: usize, _: usize) -> E::W {
            // SAFETY: the caller guarantees AVX-512F.
            unsafe { E::splat_wide(self.0[k]) }
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
        #[inline(always)]
        unsafe fn wide(&self, k: usize, o: usize) -> E::W {
            let i = k * self.stride + o;
            assert!(i + E::WIDE_LANES <= self.t.len());
            // SAFETY: `i + WIDE_LANES <= t.len()` (asserted; the callers keep
            // `o + WIDE_LANES <= run + WRAP`, and `run + WRAP <= stride` makes it hold for
            // every column), and the caller guarantees AVX-512F.
            unsafe { E::load_wide(self.t.as_ptr().add(i)) }
        }
    }

    /// The f32 vector of one x86 level, so that a streaming kernel is written once for
    /// both: `__m256` on AVX2 (8 lanes, 32-byte streaming stores) and `__m512` on
    /// AVX-512 (16 lanes, 64 bytes), each operation the instruction that level's kernel
    /// used. The arithmetic is separate multiplies and adds, never fused: every level
    /// gives the bits of the ordinary maps.
    ///
    /// # Safety
    /// Every method needs a CPU with the vector's level (AVX2, or AVX-512F) and is meant
    /// to inline into a function that enables it; a pointer must be valid for `LANES`
    /// values (and aligned to `BYTES` for [`stream`](F32s::stream)).
    pub(crate) trait F32s: Copy {
        /// Values per vector.
        const LANES: usize;
        /// Bytes per vector: the alignment of a streaming store.
        const BYTES: usize;
        unsafe fn load(p: *const f32) -> Self;
        unsafe fn store(p: *mut f32, v: Self);
        /// A streaming store.
        unsafe fn stream(p: *mut f32, v: Self);
        /// `LANES` coefficients of column `k` of `src` from run offset `o`.
        unsafe fn coef<S: Source<f32>>(src: &S, k: usize, o: usize) -> Self;
        unsafe fn add(a: Self, b: Self) -> Self;
        unsafe fn sub(a: Self, b: Self) -> Self;
        unsafe fn mul(a: Self, b: Self) -> Self;
        /// `z < 0 → +0`, anything else (NaN included) kept: as the ordinary maps' `relu`.
        unsafe fn relu(z: Self) -> Self;
        /// `d` where `y > 0`, else +0 (NaN `y` included): as the ordinary maps' `masked`.
        unsafe fn masked(y: Self, d: Self) -> Self;
    }

    impl F32s for __m256 {
        const LANES: usize = 8;
        const BYTES: usize = 32;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            // SAFETY: the caller's contract.
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            // SAFETY: the caller's contract.
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn stream(p: *mut f32, v: __m256) {
            // SAFETY: the caller's contract (`p` 32-byte aligned).
            unsafe { _mm256_stream_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn coef<S: Source<f32>>(src: &S, k: usize, o: usize) -> __m256 {
            // SAFETY: the caller's contract (AVX2).
            unsafe { src.vec(k, o) }
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            // SAFETY: the caller's contract (AVX2).
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            // SAFETY: the caller's contract (AVX2).
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            // SAFETY: the caller's contract (AVX2).
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn relu(z: __m256) -> __m256 {
            // SAFETY: the caller's contract (AVX2).
            unsafe { _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(z, _mm256_setzero_ps()), z) }
        }
        #[inline(always)]
        unsafe fn masked(y: __m256, d: __m256) -> __m256 {
            // SAFETY: the caller's contract (AVX2).
            unsafe { _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(y, _mm256_setzero_ps()), d) }
        }
    }

    impl F32s for __m512 {
        const LANES: usize = 16;
        const BYTES: usize = 64;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            // SAFETY: the caller's contract.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            // SAFETY: the caller's contract.
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn stream(p: *mut f32, v: __m512) {
            // SAFETY: the caller's contract (`p` 64-byte aligned).
            unsafe { _mm512_stream_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn coef<S: Source<f32>>(src: &S, k: usize, o: usize) -> __m512 {
            // SAFETY: the caller's contract (AVX-512F).
            unsafe { src.wide(k, o) }
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            // SAFETY: the caller's contract (AVX-512F).
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            // SAFETY: the caller's contract (AVX-512F).
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            // SAFETY: the caller's contract (AVX-512F).
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn relu(z: __m512) -> __m512 {
            // SAFETY: the caller's contract (AVX-512F).
            unsafe {
                let zero = _mm512_setzero_ps();
                _mm512_mask_mov_ps(z, _mm512_cmp_ps_mask::<_CMP_LT_OQ>(z, zero), zero)
            }
        }
        #[inline(always)]
        unsafe fn masked(y: __m512, d: __m512) -> __m512 {
            // SAFETY: the caller's contract (AVX-512F).
            unsafe {
                let pos = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(y, _mm512_setzero_ps());
                _mm512_maskz_mov_ps(pos, d)
            }
        }
    }
}
