//! The backward map with streaming stores (x86-64, AVX2 and AVX-512), channels-first
//! runs ([`map2_any`]) and channels-last rows ([`rows_any`], in blocks of rows that share
//! each coefficient vector): exactly the operations of the ordinary map, in f64 or in
//! f32. Each loop is written once: the arithmetic ([`Map2`]: f64 or f32) and the level
//! ([`Step`]: its vector step) are type parameters, and the ReLU's presence a constant.

use std::arch::x86_64::*;

use crate::kernels::coefs::x86::{Coef, F32s, Source, Table};
use crate::kernels::frame::x86::{
    ask_l2, blocked, descending, rows_in, split, stream_one, BlockBody, Steps,
};
use crate::kernels::simd::{Isa, SimdLevel};
use crate::kernels::Out;

/// The f64 backward map `(a·dz + b·(x − m)) + k` on one vector (`_mm256`: 4 lanes,
/// `_mm512`: 8): written once, so every kernel, flat or row-blocked, performs exactly
/// these operations in this order.
macro_rules! map2_f64 {
    (_mm256, $x:expr, $d:expr, $m:expr, $a:expr, $b:expr, $k:expr) => {
        _mm256_add_pd(
            _mm256_add_pd(
                _mm256_mul_pd($a, $d),
                _mm256_mul_pd($b, _mm256_sub_pd($x, $m)),
            ),
            $k,
        )
    };
    (_mm512, $x:expr, $d:expr, $m:expr, $a:expr, $b:expr, $k:expr) => {
        _mm512_add_pd(
            _mm512_add_pd(
                _mm512_mul_pd($a, $d),
                _mm512_mul_pd($b, _mm512_sub_pd($x, $m)),
            ),
            $k,
        )
    };
}

/// The arithmetic of a backward map: f64, `o = (c₁·dz + c₃·(x − c₀)) + c₄` (column 2,
/// zero in f64, unused), or f32, `o = (c₁·(dz − c₂) + c₃·(x − c₀)) + c₄` (the layouts of
/// [`affine2_coefs`](super::affine2_coefs)), rounded to f32 once.
pub(super) trait Map2: Coef {
    /// The vector step on AVX2.
    type Avx2: Step<A = Self>;
    /// The vector step on AVX-512.
    type Avx512: Step<A = Self>;
    /// The scalar form for heads and tails (and `dres` for every element): exactly the
    /// ordinary map's operations. Returns `(dx, dz)`.
    fn one<S: Source<Self>, const RELU: bool>(
        src: &S,
        o: usize,
        x: f32,
        y: f32,
        d: f32,
    ) -> (f32, f32);
}

impl Map2 for f64 {
    type Avx2 = __m256d;
    type Avx512 = __m512d;
    #[inline(always)]
    fn one<S: Source<f64>, const RELU: bool>(
        src: &S,
        o: usize,
        x: f32,
        y: f32,
        d: f32,
    ) -> (f32, f32) {
        let dz = if !RELU || y > 0.0 { d } else { 0.0 };
        let v = src.at(1, o) * dz as f64 + src.at(3, o) * (x as f64 - src.at(0, o)) + src.at(4, o);
        (v as f32, dz)
    }
}

impl Map2 for f32 {
    type Avx2 = __m256;
    type Avx512 = __m512;
    #[inline(always)]
    fn one<S: Source<f32>, const RELU: bool>(
        src: &S,
        o: usize,
        x: f32,
        y: f32,
        d: f32,
    ) -> (f32, f32) {
        let dz = if !RELU || y > 0.0 { d } else { 0.0 };
        let v =
            src.at(1, o) * (dz - src.at(2, o)) + src.at(3, o) * (x - src.at(0, o)) + src.at(4, o);
        (v, dz)
    }
}

/// One vector step of a backward map's arithmetic at one level, named by the vector it
/// computes in: `V::LANES` outputs from `x` and `dz` (f32 vectors) with the coefficients
/// `C` of their run offset. f32 computes in the f32 vector itself (8 or 16 lanes); f64 in
/// two 4-lane halves on AVX2 (`__m256d`) or one 8-lane vector on AVX-512 (`__m512d`), 8
/// outputs a step either way.
///
/// # Safety
/// The methods need a CPU with the step's level and inline into a function that enables
/// it.
pub(super) trait Step {
    type A: Map2;
    /// The f32 vector of the inputs and outputs.
    type V: F32s;
    /// The coefficients of one step.
    type C: Copy;
    /// The coefficients of the step at run offset `o`.
    unsafe fn coefs<S: Source<Self::A>>(src: &S, o: usize) -> Self::C;
    /// The outputs.
    unsafe fn map(x: Self::V, dz: Self::V, c: Self::C) -> Self::V;
}

/// The f32 map, `(a·(dz − d) + b·(x − hi)) + k`.
impl<V: F32s> Step for V {
    type A = f32;
    type V = V;
    /// `(hi, a, d, b, k)`.
    type C = (V, V, V, V, V);
    #[inline(always)]
    unsafe fn coefs<S: Source<f32>>(src: &S, o: usize) -> Self::C {
        // SAFETY: the caller's contract.
        unsafe {
            (
                V::coef(src, 0, o),
                V::coef(src, 1, o),
                V::coef(src, 2, o),
                V::coef(src, 3, o),
                V::coef(src, 4, o),
            )
        }
    }
    #[inline(always)]
    unsafe fn map(x: V, dz: V, (hi, a, d, b, k): Self::C) -> V {
        // SAFETY: the caller's contract.
        unsafe {
            V::add(
                V::add(V::mul(a, V::sub(dz, d)), V::mul(b, V::sub(x, hi))),
                k,
            )
        }
    }
}

/// `(m, a, b, k)` of four lanes.
type Quad = (__m256d, __m256d, __m256d, __m256d);

/// The `(m, a, b, k)` of four lanes from run offset `o`.
///
/// # Safety
/// The CPU must support AVX.
#[inline(always)]
unsafe fn quad<S: Source<f64>>(src: &S, o: usize) -> Quad {
    // SAFETY: the caller's contract.
    unsafe { (src.vec(0, o), src.vec(1, o), src.vec(3, o), src.vec(4, o)) }
}

/// The f64 map on AVX2: eight outputs as two 4-lane halves.
impl Step for __m256d {
    type A = f64;
    type V = __m256;
    /// The halves' `(m, a, b, k)`, at `o` and `o + 4`.
    type C = (Quad, Quad);
    #[inline(always)]
    unsafe fn coefs<S: Source<f64>>(src: &S, o: usize) -> (Quad, Quad) {
        // SAFETY: the caller's contract (AVX2; `o + 4 < run + WRAP` for the table reads).
        unsafe { (quad(src, o), quad(src, o + 4)) }
    }
    #[inline(always)]
    unsafe fn map(x8: __m256, d8: __m256, (lo, hi): (Quad, Quad)) -> __m256 {
        // SAFETY: the caller's contract (AVX2).
        unsafe {
            let l = half(_mm256_castps256_ps128(x8), _mm256_castps256_ps128(d8), lo);
            let h = half(
                _mm256_extractf128_ps::<1>(x8),
                _mm256_extractf128_ps::<1>(d8),
                hi,
            );
            _mm256_set_m128(h, l)
        }
    }
}

/// Four outputs of the f64 map on AVX2 from four values of x and dz.
///
/// # Safety
/// The CPU must support AVX.
#[inline(always)]
unsafe fn half(x4: __m128, d4: __m128, (m, a, b, k): Quad) -> __m128 {
    // SAFETY: the caller's contract.
    unsafe {
        let (x, d) = (_mm256_cvtps_pd(x4), _mm256_cvtps_pd(d4));
        _mm256_cvtpd_ps(map2_f64!(_mm256, x, d, m, a, b, k))
    }
}

/// The f64 map on AVX-512: eight outputs as one 8-lane vector.
impl Step for __m512d {
    type A = f64;
    type V = __m256;
    /// `(m, a, b, k)`.
    type C = (__m512d, __m512d, __m512d, __m512d);
    #[inline(always)]
    unsafe fn coefs<S: Source<f64>>(src: &S, o: usize) -> Self::C {
        // SAFETY: the caller's contract (AVX-512F).
        unsafe {
            (
                src.wide(0, o),
                src.wide(1, o),
                src.wide(3, o),
                src.wide(4, o),
            )
        }
    }
    #[inline(always)]
    unsafe fn map(x8: __m256, d8: __m256, (m, a, b, k): Self::C) -> __m256 {
        // SAFETY: the caller's contract (AVX-512F).
        unsafe {
            let (x, d) = (_mm512_cvtps_pd(x8), _mm512_cvtps_pd(d8));
            _mm512_cvtpd_ps(map2_f64!(_mm512, x, d, m, a, b, k))
        }
    }
}

/// The slices of a backward map as pointers, for its vector body.
#[derive(Clone, Copy)]
struct Ptrs {
    x: *const f32,
    y: *const f32,
    d: *const f32,
    o: *mut f32,
    r: *mut f32,
}

impl Ptrs {
    fn new(xs: &[f32], ys: &[f32], ds: &[f32], os: &mut Out<f32>, rs: &mut Out<f32>) -> Ptrs {
        Ptrs {
            x: xs.as_ptr(),
            y: ys.as_ptr(),
            d: ds.as_ptr(),
            o: os.as_mut_ptr().cast(),
            r: rs.as_mut_ptr().cast(),
        }
    }
}

/// `dz` of the vector step of `K` at `i`: dy, or with `RELU` masked through the ReLU
/// (dy where y > 0, else +0, NaN y included: as `masked`) and stored to `dres` when
/// `with_res`.
///
/// # Safety
/// `i + K::V::LANES` values lie within every slice used (y and dres only with `RELU` and
/// `with_res`); the CPU has `K`'s level, enabled in the function this inlines into.
#[inline(always)]
unsafe fn dz<K: Step, const RELU: bool>(p: &Ptrs, i: usize, with_res: bool) -> K::V {
    // SAFETY: the caller's contract.
    unsafe {
        let mut d = K::V::load(p.d.add(i));
        if RELU {
            d = K::V::masked(K::V::load(p.y.add(i)), d);
            if with_res {
                K::V::store(p.r.add(i), d);
            }
        }
        d
    }
}

/// The vector step of `K` at `i` with the coefficients `c`: [`dz`], then the outputs
/// from x and `dz`, streamed to the output.
///
/// # Safety
/// As [`dz`], and `p.o + i` is aligned to `K::V::BYTES`.
#[inline(always)]
unsafe fn put<K: Step, const RELU: bool>(p: &Ptrs, i: usize, c: K::C, with_res: bool) {
    // SAFETY: the caller's contract.
    unsafe {
        let d = dz::<K, RELU>(p, i, with_res);
        K::V::stream(p.o.add(i), K::map(K::V::load(p.x.add(i)), d, c));
    }
}

/// `n` for a backward map: every slice that is read or written.
fn len2<const RELU: bool>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    os: &Out<f32>,
    rs: &Out<f32>,
) -> usize {
    let mut n = xs.len().min(ds.len()).min(os.len());
    if RELU {
        n = n.min(ys.len());
        if !rs.is_empty() {
            n = n.min(rs.len());
        }
    }
    n
}

/// The scalar elements `idx` of a backward map (the heads and tails around its vector
/// body), in descending order when `rev`: `(dx, dz) = one(i mod run, x, y, dy)`, `dx`
/// streamed to `os` as the body is (see the forward map's `map1`: a run's boundary
/// lines are then filled by streaming stores alone), `dz` also stored to `rs` unless it
/// is empty (with `RELU`).
#[inline(always)]
fn scalar2<const RELU: bool>(
    idx: std::ops::Range<usize>,
    rev: bool,
    run: usize,
    (xs, ys, ds): (&[f32], &[f32], &[f32]),
    (os, rs): (&mut Out<f32>, &mut Out<f32>),
    one: impl Fn(usize, f32, f32, f32) -> (f32, f32),
) {
    let with_res = RELU && !rs.is_empty();
    let op = os.as_mut_ptr().cast::<f32>();
    let mut each = |i: usize| {
        let y = if RELU { ys[i] } else { 0.0 };
        let (v, dz) = one(i % run, xs[i], y, ds[i]);
        assert!(i < os.len());
        // SAFETY: `i < os.len()` (checked above): `op + i` lies within `os`.
        unsafe { stream_one(op.add(i), v) };
        if with_res {
            rs[i].write(dz);
        }
    };
    if rev {
        idx.rev().for_each(&mut each);
    } else {
        idx.for_each(&mut each);
    }
}

/// The operands of a backward map through an optional ReLU: `(y, dres, relu)`, and
/// `n`, the values every slice holds.
fn operands<'a>(
    xs: &[f32],
    mask: &'a mut Option<(&[f32], &mut Out<f32>)>,
    ds: &[f32],
    os: &Out<f32>,
) -> (&'a [f32], &'a mut Out<f32>, bool, usize) {
    let (ys, rs, relu): (&[f32], &mut Out<f32>, bool) = match mask {
        Some((y, r)) => (y, r, true),
        None => (&[], &mut [], false),
    };
    let n = if relu {
        len2::<true>(xs, ys, ds, os, rs)
    } else {
        len2::<false>(xs, ys, ds, os, rs)
    };
    (ys, rs, relu, n)
}

// ─── Channels-first runs ────────────────────────────────────────────────────────────────

/// The backward map in the arithmetic `A` (its coefficients `src`: a [`Broadcast`] of
/// one channel's) through an optional ReLU (`mask = Some((y, dres))`), on AVX-512 when
/// the call's level `isa` has it (same operations, same bits).
///
/// [`Broadcast`]: crate::kernels::coefs::x86::Broadcast
///
/// # Safety
/// The CPU must support AVX2; `y` (and `dres` unless empty) as long as `xs`.
pub(super) unsafe fn map2_any<A: Map2, S: Source<A>>(
    isa: Isa,
    xs: &[f32],
    mask: Option<(&[f32], &mut Out<f32>)>,
    ds: &[f32],
    os: &mut Out<f32>,
    src: &S,
) {
    let wide = isa.level() == SimdLevel::Avx512;
    let (ys, rs, relu): (&[f32], &mut Out<f32>, bool) = match mask {
        Some((y, r)) => (y, r, true),
        None => (&[], &mut [], false),
    };
    // SAFETY (all arms): the Avx512 level is only chosen when the CPU reports AVX-512F;
    // the caller guarantees AVX2 and the lengths.
    unsafe {
        match (wide, relu) {
            (true, false) => map2_avx512::<A, S, false>(xs, ys, ds, os, rs, src),
            (true, true) => map2_avx512::<A, S, true>(xs, ys, ds, os, rs, src),
            (false, false) => map2_avx2::<A, S, false>(xs, ys, ds, os, rs, src),
            (false, true) => map2_avx2::<A, S, true>(xs, ys, ds, os, rs, src),
        }
    }
}

/// [`map2`] on AVX2.
///
/// # Safety
/// The CPU must support AVX2; `ys` (and `rs` unless empty) as long as `xs` with `RELU`.
#[target_feature(enable = "avx2")]
unsafe fn map2_avx2<A: Map2, S: Source<A>, const RELU: bool>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    os: &mut Out<f32>,
    rs: &mut Out<f32>,
    src: &S,
) {
    // SAFETY: AVX2 is enabled here; the caller's contract.
    unsafe { map2::<A::Avx2, S, RELU>(xs, ys, ds, os, rs, src) }
}

/// [`map2`] on AVX-512.
///
/// # Safety
/// The CPU must support AVX-512F and AVX2; as [`map2_avx2`].
#[target_feature(enable = "avx512f,avx2")]
unsafe fn map2_avx512<A: Map2, S: Source<A>, const RELU: bool>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    os: &mut Out<f32>,
    rs: &mut Out<f32>,
    src: &S,
) {
    // SAFETY: AVX-512F and AVX2 are enabled here; the caller's contract.
    unsafe { map2::<A::Avx512, S, RELU>(xs, ys, ds, os, rs, src) }
}

/// The backward map of a run, `dz = dy` or, with `RELU`, `dy·[y > 0]` (written to `rs`
/// unless it is empty): scalar head and tail, then the vector steps of `K`, streamed to
/// the aligned `os`.
///
/// # Safety
/// The CPU must support `K`'s level, enabled in the function this inlines into.
#[inline(always)]
unsafe fn map2<K: Step, S: Source<K::A>, const RELU: bool>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    os: &mut Out<f32>,
    rs: &mut Out<f32>,
    src: &S,
) {
    let desc = descending(&[&*os, &*rs], &[xs, ds, ys]);
    let n = len2::<RELU>(xs, ys, ds, os, rs);
    let with_res = RELU && !rs.is_empty();
    let run = src.run();
    let lanes = K::V::LANES;
    let (head, end) = split(os.as_ptr().cast(), n, K::V::BYTES, lanes);
    // head, body, tail in address order (descending: tail, body, head), as `map1`
    let (first, last) = if desc {
        (end..n, 0..head)
    } else {
        (0..head, end..n)
    };
    let one = |o, x, y, d| K::A::one::<S, RELU>(src, o, x, y, d);
    scalar2::<RELU>(first, desc, run, (xs, ys, ds), (&mut *os, &mut *rs), one);
    let p = Ptrs::new(xs, ys, ds, os, rs);
    for (i, o) in Steps::new(head, end, lanes, run, desc) {
        // SAFETY: `i + lanes <= end <= n` lies within every slice used (`ys`, `rs` only
        // when `RELU` / `with_res`, whose lengths `len2` included); `p.o + i` is aligned
        // to `K::V::BYTES` (`head` aligned it, steps are that long) as the streaming
        // store requires; `o < run` for the table reads; the caller guarantees the level.
        unsafe {
            let d = dz::<K, RELU>(&p, i, with_res);
            let x = K::V::load(p.x.add(i));
            K::V::stream(p.o.add(i), K::map(x, d, K::coefs(src, o)));
        }
    }
    scalar2::<RELU>(last, desc, run, (xs, ys, ds), (os, rs), one);
}

// ─── Channels-last rows ─────────────────────────────────────────────────────────────────

/// The block width of the row-blocked maps for `c` channels, `None` where they do not
/// apply: 16 on the AVX-512 level when `c` is a multiple of 16, else 8 on AVX2 (or
/// AVX-512) when `c` is a multiple of 8 — so that the coefficient offsets of aligned
/// blocks repeat every `c` values.
fn rows_width(isa: Isa, c: usize) -> Option<usize> {
    let level = isa.level();
    if c == 0 {
        None
    } else if level == SimdLevel::Avx512 && c.is_multiple_of(16) {
        Some(16)
    } else if level >= SimdLevel::Avx2 && c.is_multiple_of(8) {
        Some(8)
    } else {
        None
    }
}

/// The fewest channels (2 KiB rows of f32) for which the channels-last backward maps
/// ask the L2 ahead ([`ask_l2`]): they take two rows at a time, and with rows this
/// long (a 4 KiB page each for S3) the hardware prefetchers, which do not cross page
/// boundaries, apparently fall behind. In one process, alternating call by call with
/// the maps that do not (2-core development VM, commit 0f9d77a), NC (4096, 1024)
/// ran 2–5% faster with the f64 map, 4–7% with the f32 and AVX2 maps; NHWC (32, 56,
/// 56, 64) with requests too measured 1–5% slower, hence the threshold. (The
/// forward's channels-last map, one row at a time, asks ahead for every C.)
const AHEAD_MIN_C: usize = 512;

/// The backward map of channels-last rows in the arithmetic `A` with its coefficient
/// loads hoisted out of `BLOCK_ROWS` rows (see [`blocked`]): the flat loop reloads the
/// table's vectors for every step, from L2 when C is large. Per element exactly the
/// operations of [`map2`]: same bits. Blocks of 16 channels on the AVX-512 level, of 8
/// on AVX2 ([`rows_width`]); returns false, having written nothing, where it gives no
/// width.
///
/// # Safety
/// The CPU must support AVX2; `y` (and `dres` unless empty) as long as `xs`; `xs`
/// starts at channel 0 of a row and `src` is the table of `c` channels.
pub(super) unsafe fn rows_any<A: Map2>(
    isa: Isa,
    xs: &[f32],
    mask: &mut Option<(&[f32], &mut Out<f32>)>,
    ds: &[f32],
    os: &mut Out<f32>,
    src: &Table<'_, A>,
    c: usize,
) -> bool {
    let Some(w) = rows_width(isa, c).filter(|_| c <= src.run()) else {
        return false;
    };
    let (ys, rs, relu, n) = operands(xs, mask, ds, os);
    // SAFETY: `rows_width` gives 16 only on the AVX-512 level (chosen only when the CPU
    // reports AVX-512F), 8 on AVX2 or above, with `c` a multiple of it; `n` bounds every
    // slice used.
    unsafe {
        match (w, relu) {
            (16, true) => rows_avx512::<A, true>(xs, ys, ds, os, rs, src, (c, n)),
            (16, false) => rows_avx512::<A, false>(xs, ys, ds, os, rs, src, (c, n)),
            (_, true) => rows_avx2::<A, true>(xs, ys, ds, os, rs, src, (c, n)),
            (_, false) => rows_avx2::<A, false>(xs, ys, ds, os, rs, src, (c, n)),
        }
    }
    true
}

/// [`rows`] on AVX2: blocks of 8 channels.
///
/// # Safety
/// The CPU must support AVX2; every slice used holds `n` values (`cn = (c, n)`); `c % 8 == 0`,
/// `0 < c <= src.run()`.
#[target_feature(enable = "avx2")]
unsafe fn rows_avx2<A: Map2, const RELU: bool>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    os: &mut Out<f32>,
    rs: &mut Out<f32>,
    src: &Table<'_, A>,
    cn: (usize, usize),
) {
    // SAFETY: AVX2 is enabled here; the caller's contract.
    unsafe { rows::<A::Avx2, 8, RELU>(xs, ys, ds, os, rs, src, cn) }
}

/// [`rows`] on AVX-512: blocks of 16 channels.
///
/// # Safety
/// The CPU must support AVX-512F and AVX2; every slice used holds `n` values;
/// `c % 16 == 0`, `0 < c <= src.run()`.
#[target_feature(enable = "avx512f,avx2")]
unsafe fn rows_avx512<A: Map2, const RELU: bool>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    os: &mut Out<f32>,
    rs: &mut Out<f32>,
    src: &Table<'_, A>,
    cn: (usize, usize),
) {
    // SAFETY: AVX-512F and AVX2 are enabled here; the caller's contract.
    unsafe { rows::<A::Avx512, 16, RELU>(xs, ys, ds, os, rs, src, cn) }
}

/// The row-blocked loop: blocks of `W` channels of `BLOCK_ROWS` rows ([`blocked`]), the
/// outputs aligned to a block's width; each block row is one vector step of `K`, or two
/// (the f64 map on AVX-512: 8-value steps in 16-value blocks, stored in the loop's
/// direction), their coefficients loaded once per block.
///
/// # Safety
/// The CPU must support `K`'s level, enabled in the function this inlines into; every
/// slice used holds `n` values; `c % W == 0`, `0 < c <= src.run()`; `W` is 8 or 16, a
/// multiple of `K::V::LANES`.
#[inline(always)]
unsafe fn rows<K: Step, const W: usize, const RELU: bool>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    os: &mut Out<f32>,
    rs: &mut Out<f32>,
    src: &Table<'_, K::A>,
    (c, n): (usize, usize),
) {
    let desc = descending(&[&*os, &*rs], &[xs, ds, ys]);
    let with_res = RELU && !rs.is_empty();
    let run = src.run();
    let lanes = K::V::LANES;
    // Blocks start at a multiple of `W` values past the aligned `head`; the body ends
    // after whole vector steps (a last 8 values of a 16-lane map go scalar).
    let (head, end) = split(os.as_ptr().cast(), n, 4 * W, lanes);
    let one = |o, x, y, d| K::A::one::<_, RELU>(src, o, x, y, d);
    scalar2::<RELU>(0..head, false, run, (xs, ys, ds), (&mut *os, &mut *rs), one);
    scalar2::<RELU>(end..n, false, run, (xs, ys, ds), (&mut *os, &mut *rs), one);
    let p = Ptrs::new(xs, ys, ds, os, rs);
    let mut body = RowsBody::<K, W, RELU> {
        p,
        src,
        ps: [p.x, p.d, p.y],
        head,
        c,
        n,
        desc,
        with_res,
        ahead: c >= AHEAD_MIN_C,
    };
    blocked::<W>(head, end, c, desc, &mut body);
}

/// The blocks and steps of [`rows`]: its operands and the facts of its contract.
#[derive(Clone, Copy)]
struct RowsBody<'a, K: Step, const W: usize, const RELU: bool> {
    p: Ptrs,
    src: &'a Table<'a, K::A>,
    /// The inputs asked for ahead: x, dy, y.
    ps: [*const f32; 3],
    head: usize,
    c: usize,
    n: usize,
    desc: bool,
    with_res: bool,
    ahead: bool,
}

impl<K: Step, const W: usize, const RELU: bool> BlockBody for RowsBody<'_, K, W, RELU> {
    #[inline(always)]
    fn block(&mut self, i: usize, o: usize, nr: usize) {
        // The fields as locals: invariant across the rows, whatever the stores alias.
        let RowsBody {
            p,
            src,
            ps,
            head,
            c,
            n,
            desc,
            with_res,
            ahead,
        } = *self;
        let lanes = K::V::LANES;
        // SAFETY: `o < c <= run`, so each step's table reads end by `run + WRAP` (a
        // second step starts 8 past an offset below `c`) and are in bounds (they assert
        // so); past `run` the table repeats its first channels, so offset `o` holds
        // channel `o mod c`; `rows`, which built this body, guarantees the level.
        let lo = unsafe { K::coefs(src, o) };
        let hi = if W > lanes {
            // SAFETY: as `lo`.
            unsafe { K::coefs(src, o + lanes) }
        } else {
            lo
        };
        for r in rows_in(nr, desc) {
            // One request per 64-byte line: every other block of 8 values.
            if ahead && (W == 16 || (i - head).is_multiple_of(16)) {
                ask_l2(&ps, 2 + RELU as usize, i + r * c, n, desc);
            }
            let i = i + r * c;
            // SAFETY: `i + W <= end <= n`, within every slice used (`rows`' contract);
            // `p.o + i` (and `p.o + i + lanes`) is aligned to the store's width (`head`
            // aligned it to `W` values, blocks and steps are multiples of the vector);
            // the level as above.
            unsafe {
                if W == lanes {
                    put::<K, RELU>(&p, i, lo, with_res);
                } else if desc {
                    put::<K, RELU>(&p, i + lanes, hi, with_res);
                    put::<K, RELU>(&p, i, lo, with_res);
                } else {
                    put::<K, RELU>(&p, i, lo, with_res);
                    put::<K, RELU>(&p, i + lanes, hi, with_res);
                }
            }
        }
    }

    #[inline(always)]
    fn step(&mut self, i: usize, o: usize) {
        let RowsBody {
            p,
            src,
            head,
            with_res,
            ..
        } = *self;
        // `blocked` ends with 8-value steps; a 16-lane step takes every other one
        // (`end − head` and `c` are then multiples of 16: they come in pairs, in either
        // order, each pair one step at its first value).
        if K::V::LANES == 8 || (i - head).is_multiple_of(16) {
            // SAFETY: as in the blocks, with `i + LANES <= end`.
            unsafe { put::<K, RELU>(&p, i, K::coefs(src, o), with_res) }
        }
    }
}
