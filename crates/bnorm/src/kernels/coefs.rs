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
