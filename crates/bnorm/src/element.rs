//! Element types: f32, f64, f16 and bf16 storage. Statistics and gradient sums always
//! accumulate in f64, so a large channel mean or a long channel costs no accuracy; the
//! element-wise maps run in f32 for every type but f64 (see `kernels`).

use std::fmt;
use std::mem::MaybeUninit;

/// Re-export of the `half` crate's 16-bit float types used as storage.
pub use half::{bf16, f16};

/// Names of the storage types, as in the conformance files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary64.
    F64,
    /// IEEE binary16.
    F16,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16,
}

impl DType {
    /// Every dtype.
    pub const ALL: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];

    /// Parses `"f32"`, `"f64"`, `"f16"`, `"bf16"`.
    ///
    /// ```
    /// assert_eq!(bnorm::element::DType::parse("bf16"), Some(bnorm::element::DType::BF16));
    /// ```
    pub fn parse(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Unit roundoff of the storage type (half the distance from 1 to the next value).
    pub fn unit_roundoff(self) -> f64 {
        match self {
            DType::F32 => f32::EPSILON as f64 / 2.0,
            DType::F64 => f64::EPSILON / 2.0,
            DType::F16 => 2f64.powi(-11),
            DType::BF16 => 2f64.powi(-8),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A storage element. Conversions to and from f64 are exact widening / correctly rounded
/// narrowing.
pub trait Element: Copy + Send + Sync + PartialEq + fmt::Debug + 'static {
    /// The dtype tag.
    const DTYPE: DType;
    /// Widens to f64 (exact).
    fn to_f64(self) -> f64;
    /// Rounds an f64 to this type (round to nearest even).
    fn from_f64(v: f64) -> Self;
    /// Whether the type has at most 11 significand bits (f16, bf16): element-wise maps
    /// then run in f32, whose rounding error is far below the storage's.
    const NARROW: bool = false;
    /// Widens to f32 (exact for the narrow types; rounds f64).
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self.to_f64() as f32
    }
    /// Rounds an f32 to this type (round to nearest even).
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        Self::from_f64(v as f64)
    }
    /// The slice as f32 values when this type is f32 (lets kernels take f32-only paths
    /// without casts).
    #[doc(hidden)]
    #[inline(always)]
    fn as_f32s(_: &[Self]) -> Option<&[f32]> {
        None
    }
    /// The output slice (see the kernels' outputs: written, never read, possibly
    /// uninitialized) as f32 values when this type is f32.
    #[doc(hidden)]
    #[inline(always)]
    fn as_f32s_out(_: &mut [MaybeUninit<Self>]) -> Option<&mut [MaybeUninit<f32>]> {
        None
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn as_f32s(xs: &[f32]) -> Option<&[f32]> {
        Some(xs)
    }
    #[inline(always)]
    fn as_f32s_out(xs: &mut [MaybeUninit<f32>]) -> Option<&mut [MaybeUninit<f32>]> {
        Some(xs)
    }
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// Rounds an f64 to f32 with *round to odd*: truncate toward zero, then set the last bit
/// if anything was lost. A second rounding from this f32 to any format with at least two
/// fewer significand bits (f16: 11, bf16: 8 against f32's 24) is then correctly rounded
/// (Boldo & Melquiond), so f64 → f16/bf16 costs two cheap, branch-free, vectorizable
/// steps instead of a software rounding.
#[inline(always)]
pub(crate) fn f32_round_to_odd(v: f64) -> f32 {
    let f = v as f32;
    let back = f as f64;
    let inexact = (back != v) as u32;
    let away = (back.abs() > v.abs()) as u32;
    f32::from_bits((f.to_bits() - away) | inexact)
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    const NARROW: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f16::to_f32(self) as f64
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        f16::from_f32(f32_round_to_odd(v))
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    const NARROW: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        if v.is_nan() {
            return bf16::NAN;
        }
        let b = v.to_bits();
        bf16::from_bits(((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f32::from_bits((self.to_bits() as u32) << 16) as f64
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        if v.is_nan() {
            return bf16::NAN;
        }
        // Round to nearest even on the f32 bits (round-to-odd input: correctly rounded).
        let b = f32_round_to_odd(v).to_bits();
        bf16::from_bits(((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The correctly rounded (nearest, ties to even) value of `v` among the finite values
    /// `to_f64(bits)` of a 16-bit format, found by checking the neighbours of a candidate;
    /// `None` when `v` is beyond the largest finite value (the caller checks infinity).
    fn nearest(v: f64, start: u16, to_f64: impl Fn(u16) -> f64, max_finite: u16) -> Option<u16> {
        let sign = start & 0x8000;
        let top = to_f64(max_finite);
        let half_ulp = (top - to_f64(max_finite - 1)) / 2.0;
        if v.abs() >= top + half_ulp {
            return None; // ties at the top round to even, which is infinity
        }
        let mag = (start & 0x7FFF).min(max_finite);
        let mut best: Option<(u16, f64)> = None;
        for m in mag.saturating_sub(2)..=(mag + 2).min(max_finite) {
            let c = to_f64(sign | m);
            let d = (c - v).abs(); // exact: c and v are within a factor of two or tiny
            let better = match best {
                None => true,
                Some((b, bd)) => d < bd || (d == bd && (m & 1) == 0 && (b & 1) == 1),
            };
            if better {
                best = Some((sign | m, d));
            }
        }
        best.map(|(b, _)| b)
    }

    /// Round-to-odd then round-to-nearest is correctly rounded: checked against an exact
    /// nearest-value search on random values, exact ties, their neighbours, and the edges.
    #[test]
    fn sixteen_bit_rounding_is_correct() {
        let mut s = 12345u64;
        let mut vals = vec![
            0.0,
            1.0,
            65504.0,
            65519.9,
            65520.0,
            1e-8,
            6e-8,
            3.0e38,
            3.39e38,
            3.4e38,
            1e300,
            f64::MIN_POSITIVE,
            1e-45,
            1e-40,
        ];
        for _ in 0..200_000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let e = ((s >> 58) as i32) - 40;
            let m = (s >> 11) as f64 / (1u64 << 53) as f64 + 0.5;
            vals.push(m * 2f64.powi(e));
        }
        for k in 1..2000u32 {
            let t = f32::from_bits(0x3F80_0000 + (k << 15)) as f64; // bf16 ties
            vals.extend([
                t,
                f64::from_bits(t.to_bits() + 1),
                f64::from_bits(t.to_bits() - 1),
            ]);
            let t = f32::from_bits(0x3F80_0000 + (k << 12)) as f64; // f16 ties
            vals.extend([
                t,
                f64::from_bits(t.to_bits() + 1),
                f64::from_bits(t.to_bits() - 1),
            ]);
        }
        let negated: Vec<f64> = vals.iter().map(|v| -v).collect();
        vals.extend(negated);
        for v in vals {
            let got = <bf16 as Element>::from_f64(v).to_bits();
            match nearest(
                v,
                bf16::from_f64(v).to_bits(),
                |b| bf16::from_bits(b).to_f64(),
                0x7F7F,
            ) {
                Some(want) => assert_eq!(got, want, "bf16 {v:e}"),
                None => assert!(
                    bf16::from_bits(got).is_infinite(),
                    "bf16 {v:e} should overflow"
                ),
            }
            let got = <f16 as Element>::from_f64(v).to_bits();
            match nearest(
                v,
                f16::from_f64(v).to_bits(),
                |b| f16::from_bits(b).to_f64(),
                0x7BFF,
            ) {
                Some(want) => assert_eq!(got, want, "f16 {v:e}"),
                None => assert!(
                    f16::from_bits(got).is_infinite(),
                    "f16 {v:e} should overflow"
                ),
            }
        }
        for v in [f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(<bf16 as Element>::from_f64(v).to_f64(), v);
            assert_eq!(<f16 as Element>::from_f64(v).to_f64(), v);
        }
        assert!(<bf16 as Element>::from_f64(f64::NAN).is_nan());
        assert!(<f16 as Element>::from_f64(f64::NAN).is_nan());
        for b in 0..=u16::MAX {
            let h = bf16::from_bits(b);
            if !h.is_nan() {
                assert_eq!(<bf16 as Element>::to_f64(h), h.to_f64());
            }
        }
    }
}
