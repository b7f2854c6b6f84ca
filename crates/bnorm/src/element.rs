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

/// The f32 value of the binary16 bits `h`: exact, and free of calls and data-dependent
/// control flow (the selects below compile to blends), so that the kernels' loops
/// vectorize. The `half` crate converts element by element through a run-time check for
/// the F16C instructions, which made every f16 kernel 6–10 times slower than its bf16
/// twin; with this conversion 1.8–2.8 times (2-core AMD EPYC VM, `DTYPE=f16` vs `bf16`
/// of the `step_time` example on S1, commit `371da71`, 2026-12-04): the conversions'
/// integer work, where the hardware's F16C instructions would take one each (not used:
/// they need kernels written with intrinsics). Normal numbers get their exponent rebiased, infinities and NaNs
/// (payload kept, made quiet) the all-ones exponent, zeros and subnormals `m·2⁻²⁴` through one exact
/// f32 subtraction.
#[inline(always)]
pub(crate) fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = (h & 0x7fff) << 13; // exponent and mantissa at their f32 positions
    let exp = em & (0x1f << 23);
    // 2⁻¹⁴·(1 + m/1024) − 2⁻¹⁴ = m·2⁻²⁴, exact
    let magic = 113 << 23;
    let sub = (f32::from_bits(em + magic) - f32::from_bits(magic)).to_bits();
    // NaNs come out quiet (payload kept), as the `half` crate's and the hardware's
    let quiet = (((h & 0x3ff) != 0) as u32) << 22;
    let bits = if exp == 0x1f << 23 {
        (em + ((255 - 31) << 23)) | quiet
    } else if exp == 0 {
        sub
    } else {
        em + ((127 - 15) << 23)
    };
    f32::from_bits(bits | sign)
}

/// The binary16 bits nearest to `v` (ties to even; overflow to infinity; NaN to a quiet
/// NaN with the payload's top bits, as the `half` crate), vectorizable as
/// [`f16_bits_to_f32`]. Normal results round by adding the bias `0xfff` plus the
/// kept mantissa's last bit before the shift; subnormal ones by one f32 addition that
/// aligns the ten kept bits at the bottom of the significand (the hardware's rounding to
/// nearest even does the rest); a carry out of the largest normal gives infinity.
#[inline(always)]
pub(crate) fn f32_to_f16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let a = x & 0x7fff_ffff;
    let nan = 0x7e00 | ((a >> 13) & 0x3ff) as u16;
    // |v| < 2⁻¹⁴: v + 0.5 holds v's bits from 2⁻²⁴ on, rounded to nearest even
    let half_magic = 126 << 23;
    let sub = (f32::from_bits(a) + f32::from_bits(half_magic)).to_bits() - half_magic;
    let normal = a
        .wrapping_sub((127 - 15) << 23)
        .wrapping_add(0xfff + ((a >> 13) & 1))
        >> 13;
    let bits = if a > 0x7f80_0000 {
        nan
    } else if a >= 143 << 23 {
        0x7c00 // 2¹⁶ and above (and infinity); 65520 ≤ |v| < 2¹⁶ carries there below
    } else if a < 113 << 23 {
        sub as u16
    } else {
        normal as u16
    };
    bits | sign
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    const NARROW: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_bits_to_f32(self.to_bits())
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_bits(f32_to_f16_bits(v))
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f16_bits_to_f32(self.to_bits()) as f64
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        f16::from_bits(f32_to_f16_bits(f32_round_to_odd(v)))
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

    /// The branch-free f16 → f32 conversion against the `half` crate's, on every one of
    /// the 65 536 bit patterns (bit for bit, NaN payloads included).
    #[test]
    fn f16_to_f32_is_exact_for_every_value() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            let got = f16_bits_to_f32(h);
            assert_eq!(got.to_bits(), want.to_bits(), "{h:#06x}");
        }
    }

    /// The branch-free f32 → f16 rounding against the `half` crate's (nearest, ties to
    /// even): every f16 value, the midpoints between neighbours and the f32 values next to
    /// them (the ties and their neighbours), the overflow and underflow boundaries, and a
    /// million pseudo-random f32 bit patterns; NaNs stay NaN with the same sign.
    #[test]
    fn f32_to_f16_rounds_like_half() {
        let check = |v: f32| {
            let want = f16::from_f32(v);
            let got = f16::from_bits(f32_to_f16_bits(v));
            if v.is_nan() {
                assert!(got.is_nan() && got.is_sign_negative() == v.is_sign_negative());
            } else {
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{v:e} ({:#010x})",
                    v.to_bits()
                );
            }
        };
        for h in 0..=u16::MAX {
            let a = f16::from_bits(h).to_f32();
            let b = f16::from_bits(h.wrapping_add(1)).to_f32();
            check(a);
            if a.is_finite() && b.is_finite() && (h & 0x7fff) != 0x7bff {
                let mid = ((a as f64 + b as f64) / 2.0) as f32; // exact in f32
                for m in [
                    mid,
                    f32::from_bits(mid.to_bits() - 1),
                    f32::from_bits(mid.to_bits() + 1),
                ] {
                    check(m);
                }
            }
        }
        for v in [
            65504.0f32,
            65519.99,
            65520.0,
            65536.0,
            1e9,
            f32::MAX,
            f32::INFINITY,
            5.96e-8,
            2.98e-8,
            2.9802322e-8,
            1e-10,
            0.0,
            f32::MIN_POSITIVE,
            6.1035156e-5,
        ] {
            check(v);
            check(-v);
        }
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..1_000_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            check(f32::from_bits(s as u32));
        }
    }

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
