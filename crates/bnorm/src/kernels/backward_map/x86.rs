//! The backward map with streaming stores (x86-64, AVX2 and AVX-512), channels-first
//! runs and channels-last rows (the latter in blocks of rows that share each coefficient
//! vector): exactly the operations of the ordinary map, in f64 or in f32.

use std::arch::x86_64::*;

use crate::kernels::coefs::x86::{Source, Source16, Source8, Table};
use crate::kernels::frame::x86::{ask_l2, blocked, descending, rows_in, split, Steps};

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

/// The f32 backward map `(a·(dz − d) + b·(x − hi)) + k` on one vector (`_mm256`: 8
/// lanes, `_mm512`: 16), written once as [`map2_f64`].
macro_rules! map2_f32 {
    (_mm256, $x:expr, $dz:expr, $hi:expr, $a:expr, $d:expr, $b:expr, $k:expr) => {
        _mm256_add_ps(
            _mm256_add_ps(
                _mm256_mul_ps($a, _mm256_sub_ps($dz, $d)),
                _mm256_mul_ps($b, _mm256_sub_ps($x, $hi)),
            ),
            $k,
        )
    };
    (_mm512, $x:expr, $dz:expr, $hi:expr, $a:expr, $d:expr, $b:expr, $k:expr) => {
        _mm512_add_ps(
            _mm512_add_ps(
                _mm512_mul_ps($a, _mm512_sub_ps($dz, $d)),
                _mm512_mul_ps($b, _mm512_sub_ps($x, $hi)),
            ),
            $k,
        )
    };
}

/// A backward map through an optional ReLU (`mask = Some((y, dres))`): the AVX-512
/// loop `$wide` when the current level has it, else the AVX2 loop `$narrow`, each
/// with the mask's presence as a constant. Expands to unsafe calls: the caller
/// guarantees AVX2 and that `y` (and `dres` unless empty) are as long as `xs`.
macro_rules! dispatch_map2 {
    ($wide:ident, $narrow:ident, $s:ty, $xs:expr, $mask:expr, $ds:expr, $os:expr, $src:expr) => {{
        let wide = crate::kernels::simd::current() == crate::kernels::simd::SimdLevel::Avx512;
        let (ys, rs, relu): (&[f32], &mut [f32], bool) = match $mask {
            Some((y, r)) => (y, r, true),
            None => (&[], &mut [], false),
        };
        // SAFETY (all arms): the Avx512 level is only chosen when the CPU reports
        // AVX-512F; the caller guarantees AVX2 and the lengths.
        unsafe {
            match (wide, relu) {
                (true, false) => $wide::<$s, false>($xs, ys, $ds, $os, rs, $src),
                (true, true) => $wide::<$s, true>($xs, ys, $ds, $os, rs, $src),
                (false, false) => $narrow::<$s, false>($xs, ys, $ds, $os, rs, $src),
                (false, true) => $narrow::<$s, true>($xs, ys, $ds, $os, rs, $src),
            }
        }
    }};
}

/// [`map2`] through an optional ReLU (`mask = Some((y, dres))`), on AVX-512 when the
/// current level has it (one 8-lane f64 vector per 8 outputs instead of two 4-lane
/// halves: same operations, same bits).
///
/// # Safety
/// The CPU must support AVX2; `y` (and `dres` unless empty) as long as `xs`.
pub(super) unsafe fn map2_any<S: Source8>(
    xs: &[f32],
    mask: Option<(&[f32], &mut [f32])>,
    ds: &[f32],
    os: &mut [f32],
    src: &S,
) {
    dispatch_map2!(map2_512, map2, S, xs, mask, ds, os, src)
}

/// The scalar form of `map2` for heads and tails (and `dres` for every element):
/// exactly the ordinary map's operations. Returns `(dx, dz)`.
#[inline(always)]
fn map2_one<S: Source<f64>, const RELU: bool>(
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

/// `n` for a backward map: every slice that is read or written.
fn len2<const RELU: bool>(xs: &[f32], ys: &[f32], ds: &[f32], os: &[f32], rs: &[f32]) -> usize {
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
/// body): `(dx, dz) = one(i mod run, x, y, dy)`, `dz` also stored to `rs` unless it is
/// empty (with `RELU`).
#[inline(always)]
fn scalar2<const RELU: bool>(
    idx: impl Iterator<Item = usize>,
    run: usize,
    (xs, ys, ds): (&[f32], &[f32], &[f32]),
    (os, rs): (&mut [f32], &mut [f32]),
    one: impl Fn(usize, f32, f32, f32) -> (f32, f32),
) {
    let with_res = RELU && !rs.is_empty();
    for i in idx {
        let y = if RELU { ys[i] } else { 0.0 };
        let (v, dz) = one(i % run, xs[i], y, ds[i]);
        os[i] = v;
        if with_res {
            rs[i] = dz;
        }
    }
}

/// The loop shared by [`map2`] and [`map2_512`]: scalar head and tail, then 8 values
/// at a time, `dz` masked through the ReLU (and stored to `rs`), `body(x, dz, o)`
/// giving the 8 outputs, streamed to the 32-byte aligned `os`.
///
/// # Safety
/// The CPU must support AVX2 (`body` whatever it uses); inline into a function that
/// enables it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn map2_loop<const RELU: bool>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    os: &mut [f32],
    rs: &mut [f32],
    run: usize,
    one: impl Fn(usize, f32, f32, f32) -> (f32, f32),
    body: impl Fn(__m256, __m256, usize) -> __m256,
) {
    let desc = descending(&[&*os, &*rs], &[xs, ds, ys]);
    let n = len2::<RELU>(xs, ys, ds, os, rs);
    let with_res = RELU && !rs.is_empty();
    let (head, end) = split(os.as_ptr(), n);
    scalar2::<RELU>(
        (0..head).chain(end..n),
        run,
        (xs, ys, ds),
        (&mut *os, &mut *rs),
        &one,
    );
    let (xp, yp, dp, op, rp) = (
        xs.as_ptr(),
        ys.as_ptr(),
        ds.as_ptr(),
        os.as_mut_ptr(),
        rs.as_mut_ptr(),
    );
    for (i, o) in Steps::new(head, end, 8, run, desc) {
        // SAFETY: `i + 8 <= n` lies within every slice used (`ys`, `rs` only when
        // `RELU` / `with_res`, whose lengths `len2` included); `op + i` is 32-byte
        // aligned (`head` aligned it, steps are 32 bytes) as the streaming store
        // requires; `o < run`; the caller guarantees AVX2.
        unsafe {
            let mut d8 = _mm256_loadu_ps(dp.add(i));
            if RELU {
                // dy where y > 0, else +0 (NaN y included): as `masked`.
                let zero = _mm256_setzero_ps();
                let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_loadu_ps(yp.add(i)), zero);
                d8 = _mm256_and_ps(pos, d8);
                if with_res {
                    _mm256_storeu_ps(rp.add(i), d8);
                }
            }
            _mm256_stream_ps(op.add(i), body(_mm256_loadu_ps(xp.add(i)), d8, o));
        }
    }
}

/// [`map2`] with 8-lane f64 vectors.
///
/// # Safety
/// The CPU must support AVX-512F and AVX2.
#[target_feature(enable = "avx512f,avx2")]
unsafe fn map2_512<S: Source8, const RELU: bool>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    os: &mut [f32],
    rs: &mut [f32],
    src: &S,
) {
    // SAFETY: AVX-512F and AVX2 are enabled here; `o < run` for the table reads.
    unsafe {
        let one = |o, x, y, d| map2_one::<S, RELU>(src, o, x, y, d);
        map2_loop::<RELU>(xs, ys, ds, os, rs, src.run(), one, |x8, d8, o| {
            let (x, d) = (_mm512_cvtps_pd(x8), _mm512_cvtps_pd(d8));
            let (m, a, b, k) = (
                src.vec8(0, o),
                src.vec8(1, o),
                src.vec8(3, o),
                src.vec8(4, o),
            );
            _mm512_cvtpd_ps(map2_f64!(_mm512, x, d, m, a, b, k))
        })
    }
}

/// `o = (c₁·dz + c₃·(x − c₀)) + c₄` in f64 (column 2, zero in f64, unused), rounded
/// to f32, `dz = dy` or, with
/// `RELU`, `dy·[y > 0]` (written to `rs` unless it is empty).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn map2<S: Source<f64>, const RELU: bool>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    os: &mut [f32],
    rs: &mut [f32],
    src: &S,
) {
    // SAFETY: AVX2 is enabled here; `o + 4 < run + WRAP` for the table reads.
    unsafe {
        let one = |o, x, y, d| map2_one::<S, RELU>(src, o, x, y, d);
        map2_loop::<RELU>(xs, ys, ds, os, rs, src.run(), one, |x8, d8, o| {
            let half = |x4: __m128, d4: __m128, j: usize| {
                let (x, d) = (_mm256_cvtps_pd(x4), _mm256_cvtps_pd(d4));
                let (m, a) = (src.vec(0, o + j), src.vec(1, o + j));
                let (b, k) = (src.vec(3, o + j), src.vec(4, o + j));
                _mm256_cvtpd_ps(map2_f64!(_mm256, x, d, m, a, b, k))
            };
            let lo = half(_mm256_castps256_ps128(x8), _mm256_castps256_ps128(d8), 0);
            let hi = half(
                _mm256_extractf128_ps::<1>(x8),
                _mm256_extractf128_ps::<1>(d8),
                4,
            );
            _mm256_set_m128(hi, lo)
        })
    }
}

/// The f32 backward map `o = (c₁·(dz − c₂) + c₃·(x − c₀)) + c₄` (the layout of
/// `inner::affine2_coefs::<f32>`), `dz` as in [`map2_any`], on AVX-512 (16 lanes)
/// when the current level has it, else AVX2 (8 lanes): same operations, same bits.
///
/// # Safety
/// The CPU must support AVX2; `y` (and `dres` unless empty) as long as `xs`.
pub(super) unsafe fn map2f_any<S: Source16>(
    xs: &[f32],
    mask: Option<(&[f32], &mut [f32])>,
    ds: &[f32],
    os: &mut [f32],
    src: &S,
) {
    dispatch_map2!(map2f_512, map2f, S, xs, mask, ds, os, src)
}

/// The scalar form of the f32 backward map, for heads and tails: exactly the ordinary
/// map's operations. Returns `(dx, dz)`.
#[inline(always)]
fn map2f_one<S: Source<f32>, const RELU: bool>(
    src: &S,
    o: usize,
    x: f32,
    y: f32,
    d: f32,
) -> (f32, f32) {
    let dz = if !RELU || y > 0.0 { d } else { 0.0 };
    let v = src.at(1, o) * (dz - src.at(2, o)) + src.at(3, o) * (x - src.at(0, o)) + src.at(4, o);
    (v, dz)
}

/// [`map2f_any`] with 8 lanes.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn map2f<S: Source<f32>, const RELU: bool>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    os: &mut [f32],
    rs: &mut [f32],
    src: &S,
) {
    // SAFETY: AVX2 is enabled here; `o < run` for the table reads.
    unsafe {
        let one = |o, x, y, d| map2f_one::<S, RELU>(src, o, x, y, d);
        map2_loop::<RELU>(xs, ys, ds, os, rs, src.run(), one, |x, d, o| {
            let (hi, a, dd) = (src.vec(0, o), src.vec(1, o), src.vec(2, o));
            let (b, k) = (src.vec(3, o), src.vec(4, o));
            map2_f32!(_mm256, x, d, hi, a, dd, b, k)
        })
    }
}

/// [`map2f_any`] with 16 lanes and 64-byte streaming stores.
///
/// # Safety
/// The CPU must support AVX-512F and AVX2.
#[target_feature(enable = "avx512f,avx2")]
unsafe fn map2f_512<S: Source16, const RELU: bool>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    os: &mut [f32],
    rs: &mut [f32],
    src: &S,
) {
    let desc = descending(&[&*os, &*rs], &[xs, ds, ys]);
    let n = len2::<RELU>(xs, ys, ds, os, rs);
    let with_res = RELU && !rs.is_empty();
    let run = src.run();
    let head = os.as_ptr().align_offset(64).min(n);
    let end = head + (n - head) / 16 * 16;
    scalar2::<RELU>(
        (0..head).chain(end..n),
        run,
        (xs, ys, ds),
        (&mut *os, &mut *rs),
        |o, x, y, d| map2f_one::<S, RELU>(src, o, x, y, d),
    );
    let (xp, yp, dp, op, rp) = (
        xs.as_ptr(),
        ys.as_ptr(),
        ds.as_ptr(),
        os.as_mut_ptr(),
        rs.as_mut_ptr(),
    );
    let zero = _mm512_setzero_ps();
    for (i, o) in Steps::new(head, end, 16, run, desc) {
        // SAFETY: `i + 16 <= end <= n` lies within every slice used (`ys`, `rs` only
        // when `RELU` / `with_res`, whose lengths `len2` included); `op + i` is
        // 64-byte aligned (`head` aligned it, steps are 64 bytes) as the streaming
        // store requires; `o < run` for the table reads; AVX-512F is enabled.
        unsafe {
            let mut d = _mm512_loadu_ps(dp.add(i));
            if RELU {
                // dy where y > 0, else +0 (NaN y included): as `masked`.
                let pos = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_loadu_ps(yp.add(i)), zero);
                d = _mm512_maskz_mov_ps(pos, d);
                if with_res {
                    _mm512_storeu_ps(rp.add(i), d);
                }
            }
            let x = _mm512_loadu_ps(xp.add(i));
            let (hi, a, dd) = (src.vec16(0, o), src.vec16(1, o), src.vec16(2, o));
            let (b, k) = (src.vec16(3, o), src.vec16(4, o));
            _mm512_stream_ps(op.add(i), map2_f32!(_mm512, x, d, hi, a, dd, b, k));
        }
    }
}

/// The block width of the row-blocked maps for `c` channels, `None` where they do not
/// apply: 16 on the AVX-512 level when `c` is a multiple of 16, else 8 on AVX2 (or
/// AVX-512) when `c` is a multiple of 8 — so that the coefficient offsets of aligned
/// blocks repeat every `c` values.
fn rows_width(c: usize) -> Option<usize> {
    use crate::kernels::simd::{current, SimdLevel};
    let level = current();
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

/// The operands of a backward map through an optional ReLU: `(y, dres, relu)`, and
/// `n`, the values every slice holds.
fn operands<'a>(
    xs: &[f32],
    mask: &'a mut Option<(&[f32], &mut [f32])>,
    ds: &[f32],
    os: &[f32],
) -> (&'a [f32], &'a mut [f32], bool, usize) {
    let (ys, rs, relu): (&[f32], &mut [f32], bool) = match mask {
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

/// The row-blocked map for the width [`rows_width`] gives (`$wide` for 16, `$narrow`
/// for 8) with the ReLU's presence as a constant; false where it gives none. Expands
/// to unsafe calls: the caller guarantees AVX2 and the slices' lengths.
macro_rules! dispatch_rows {
    ($wide:ident, $narrow:ident, $xs:expr, $mask:expr, $ds:expr, $os:expr, $src:expr, $c:expr) => {{
        let Some(w) = rows_width($c).filter(|_| $c <= $src.run()) else {
            return false;
        };
        let (ys, rs, relu, n) = operands($xs, $mask, $ds, $os);
        // SAFETY: `rows_width` gives 16 only on the AVX-512 level (chosen only when
        // the CPU reports AVX-512F), 8 on AVX2 or above, with `c` a multiple of it;
        // `n` bounds every slice used.
        unsafe {
            match (w, relu) {
                (16, true) => $wide::<true>($xs, ys, $ds, $os, rs, $src, $c, n),
                (16, false) => $wide::<false>($xs, ys, $ds, $os, rs, $src, $c, n),
                (_, true) => $narrow::<true>($xs, ys, $ds, $os, rs, $src, $c, n),
                (_, false) => $narrow::<false>($xs, ys, $ds, $os, rs, $src, $c, n),
            }
        }
        true
    }};
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

/// The f64 backward map of [`map2_any`] with its coefficient loads hoisted out of
/// `BLOCK_ROWS` rows (see [`blocked`]): the flat loop reloads four table vectors per
/// 8 outputs, from L2 when C is large. Per element exactly the operations of
/// [`map2_512`]: same bits. Returns false, having written nothing, where
/// [`rows_width`] gives no width.
///
/// # Safety
/// The CPU must support AVX2; `y` (and `dres` unless empty) as long as `xs`; `xs`
/// starts at channel 0 of a row and `src` is the table of `c` channels.
pub(super) unsafe fn map2_rows_any(
    xs: &[f32],
    mask: &mut Option<(&[f32], &mut [f32])>,
    ds: &[f32],
    os: &mut [f32],
    src: &Table<'_, f64>,
    c: usize,
) -> bool {
    dispatch_rows!(map2_rows_512, map2_rows_avx2, xs, mask, ds, os, src, c)
}

/// See [`map2_rows_any`].
///
/// # Safety
/// The CPU must support AVX-512F and AVX2; every slice used holds `n` values;
/// `c % 16 == 0`, `0 < c <= src.run()`.
#[target_feature(enable = "avx512f,avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn map2_rows_512<const RELU: bool>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    os: &mut [f32],
    rs: &mut [f32],
    src: &Table<'_, f64>,
    c: usize,
    n: usize,
) {
    let desc = descending(&[&*os, &*rs], &[xs, ds, ys]);
    let with_res = RELU && !rs.is_empty();
    let run = src.run();
    let head = os.as_ptr().align_offset(64).min(n);
    let end = head + (n - head) / 8 * 8;
    scalar2::<RELU>(
        (0..head).chain(end..n),
        run,
        (xs, ys, ds),
        (&mut *os, &mut *rs),
        |o, x, y, d| map2_one::<_, RELU>(src, o, x, y, d),
    );
    let (xp, yp, dp, op, rp) = (
        xs.as_ptr(),
        ys.as_ptr(),
        ds.as_ptr(),
        os.as_mut_ptr(),
        rs.as_mut_ptr(),
    );
    // Eight outputs at `i` with the coefficients `(m, a, b, k)` (and their ReLU
    // gradient stored when `with_res`): a macro, not a closure, so that it is always
    // inlined (as a closure called from two others it was not, and its vectors went
    // through memory).
    // SAFETY (for every use below): `i + 8 <= end <= n`, within every slice used;
    // AVX-512F is enabled.
    macro_rules! eight {
        ($i:expr, $coefs:expr) => {{
            let (i, (m, a, b, k)): (usize, (__m512d, __m512d, __m512d, __m512d)) = ($i, $coefs);
            let mut d8 = _mm256_loadu_ps(dp.add(i));
            if RELU {
                // dy where y > 0, else +0 (NaN y included): as `masked`.
                let pos =
                    _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_loadu_ps(yp.add(i)), _mm256_setzero_ps());
                d8 = _mm256_and_ps(pos, d8);
                if with_res {
                    _mm256_storeu_ps(rp.add(i), d8);
                }
            }
            let x = _mm512_cvtps_pd(_mm256_loadu_ps(xp.add(i)));
            let d = _mm512_cvtps_pd(d8);
            _mm512_cvtpd_ps(map2_f64!(_mm512, x, d, m, a, b, k))
        }};
    }
    // SAFETY: `o < c + 8 <= run + 8` (the second half of a block starts 8 past an
    // offset below `c`), so the 8 values read end by `run + WRAP` and each `vec8` is
    // in bounds (it asserts so); past `run` the table repeats its first channels, so
    // offset `o` holds channel `o mod c`; AVX-512F is enabled.
    let coef = |o: usize| unsafe {
        (
            src.vec8(0, o),
            src.vec8(1, o),
            src.vec8(3, o),
            src.vec8(4, o),
        )
    };
    let ps = [xp, dp, yp];
    let ahead = c >= AHEAD_MIN_C;
    blocked::<16>(
        head,
        end,
        c,
        desc,
        |i, o, nr| {
            let (lo, hi) = (coef(o), coef(o + 8));
            for r in rows_in(nr, desc) {
                let i = i + r * c;
                if ahead {
                    ask_l2(&ps, 2 + RELU as usize, i, n, desc);
                }
                // SAFETY: as `eight!`, with `i + 16 <= end`; `op + i` is 32-byte
                // aligned (`head` is 64-byte aligned, blocks start a multiple of 16
                // values past it) as the streaming store requires.
                unsafe {
                    if desc {
                        _mm256_stream_ps(op.add(i + 8), eight!(i + 8, hi));
                        _mm256_stream_ps(op.add(i), eight!(i, lo));
                    } else {
                        _mm256_stream_ps(op.add(i), eight!(i, lo));
                        _mm256_stream_ps(op.add(i + 8), eight!(i + 8, hi));
                    }
                }
            }
        },
        // SAFETY: as `eight!`; `op + i` is 32-byte aligned (`head` is 64-byte
        // aligned, steps are multiples of 8 values) as the streaming store requires.
        |i, o| unsafe { _mm256_stream_ps(op.add(i), eight!(i, coef(o))) },
    );
}

/// The f32 backward map of [`map2f_any`] blocked as [`map2_rows_any`]: per element
/// exactly the operations of [`map2f_512`], same bits. Returns false, having written
/// nothing, where [`rows_width`] gives no width.
///
/// # Safety
/// As [`map2_rows_any`].
pub(super) unsafe fn map2f_rows_any(
    xs: &[f32],
    mask: &mut Option<(&[f32], &mut [f32])>,
    ds: &[f32],
    os: &mut [f32],
    src: &Table<'_, f32>,
    c: usize,
) -> bool {
    dispatch_rows!(map2f_rows_512, map2f_rows_avx2, xs, mask, ds, os, src, c)
}

/// See [`map2f_rows_any`].
///
/// # Safety
/// As [`map2_rows_512`].
#[target_feature(enable = "avx512f,avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn map2f_rows_512<const RELU: bool>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    os: &mut [f32],
    rs: &mut [f32],
    src: &Table<'_, f32>,
    c: usize,
    n: usize,
) {
    let desc = descending(&[&*os, &*rs], &[xs, ds, ys]);
    let with_res = RELU && !rs.is_empty();
    let run = src.run();
    let head = os.as_ptr().align_offset(64).min(n);
    // 16 values per vector step here: the last 8 of an 8-step tail go scalar.
    let end = head + (n - head) / 16 * 16;
    scalar2::<RELU>(
        (0..head).chain(end..n),
        run,
        (xs, ys, ds),
        (&mut *os, &mut *rs),
        |o, x, y, d| map2f_one::<_, RELU>(src, o, x, y, d),
    );
    let (xp, yp, dp, op, rp) = (
        xs.as_ptr(),
        ys.as_ptr(),
        ds.as_ptr(),
        os.as_mut_ptr(),
        rs.as_mut_ptr(),
    );
    type Coefs = (__m512, __m512, __m512, __m512, __m512);
    // Sixteen outputs at `i` with the coefficients `(hi, a, d, b, k)`.
    // SAFETY (for every call below): `i + 16 <= end <= n`, within every slice used;
    // `op + i` is 64-byte aligned (`head` is, steps are multiples of 16 values) as
    // the streaming store requires; AVX-512F is enabled.
    let sixteen = |i: usize, (hi, a, dd, b, k): Coefs| unsafe {
        let mut d = _mm512_loadu_ps(dp.add(i));
        if RELU {
            // dy where y > 0, else +0 (NaN y included): as `masked`.
            let pos =
                _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_loadu_ps(yp.add(i)), _mm512_setzero_ps());
            d = _mm512_maskz_mov_ps(pos, d);
            if with_res {
                _mm512_storeu_ps(rp.add(i), d);
            }
        }
        let x = _mm512_loadu_ps(xp.add(i));
        _mm512_stream_ps(op.add(i), map2_f32!(_mm512, x, d, hi, a, dd, b, k));
    };
    // SAFETY: `o < c <= run`, so `o + 16 <= run + WRAP` and each `vec16` is in
    // bounds (it asserts so); past `run` the table repeats its first channels, so
    // offset `o` holds channel `o mod c`; AVX-512F is enabled.
    let coef = |o: usize| unsafe {
        (
            src.vec16(0, o),
            src.vec16(1, o),
            src.vec16(2, o),
            src.vec16(3, o),
            src.vec16(4, o),
        )
    };
    // `end - head` is a multiple of 16 and so is `c`: the 8-value steps after the
    // blocks come in pairs (in either order), each pair one 16-value step at its
    // first value.
    let ps = [xp, dp, yp];
    let ahead = c >= AHEAD_MIN_C;
    blocked::<16>(
        head,
        end,
        c,
        desc,
        |i, o, nr| {
            let v = coef(o);
            for r in rows_in(nr, desc) {
                if ahead {
                    ask_l2(&ps, 2 + RELU as usize, i + r * c, n, desc);
                }
                sixteen(i + r * c, v);
            }
        },
        |i, o| {
            if (i - head).is_multiple_of(16) {
                sixteen(i, coef(o));
            }
        },
    );
}

/// [`map2_rows_any`] on AVX2: blocks of 8 channels (their coefficients in eight
/// 4-lane vectors), per element exactly the operations of [`map2`]: same bits.
///
/// # Safety
/// The CPU must support AVX2; every slice used holds `n` values; `c % 8 == 0`,
/// `0 < c <= src.run()`.
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn map2_rows_avx2<const RELU: bool>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    os: &mut [f32],
    rs: &mut [f32],
    src: &Table<'_, f64>,
    c: usize,
    n: usize,
) {
    let desc = descending(&[&*os, &*rs], &[xs, ds, ys]);
    let with_res = RELU && !rs.is_empty();
    let run = src.run();
    let (head, end) = split(os.as_ptr(), n);
    scalar2::<RELU>(
        (0..head).chain(end..n),
        run,
        (xs, ys, ds),
        (&mut *os, &mut *rs),
        |o, x, y, d| map2_one::<_, RELU>(src, o, x, y, d),
    );
    let (xp, yp, dp, op, rp) = (
        xs.as_ptr(),
        ys.as_ptr(),
        ds.as_ptr(),
        os.as_mut_ptr(),
        rs.as_mut_ptr(),
    );
    type Half = (__m256d, __m256d, __m256d, __m256d);
    // Eight outputs at `i`, each half with its coefficients `(m, a, b, k)`.
    // SAFETY (for every call below): `i + 8 <= end <= n`, within every slice used;
    // `op + i` is 32-byte aligned (`head` is, steps are multiples of 8 values) as the
    // streaming store requires; AVX2 is enabled.
    let eight = |i: usize, lo: Half, hi: Half| unsafe {
        let mut d8 = _mm256_loadu_ps(dp.add(i));
        if RELU {
            // dy where y > 0, else +0 (NaN y included): as `masked`.
            let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_loadu_ps(yp.add(i)), _mm256_setzero_ps());
            d8 = _mm256_and_ps(pos, d8);
            if with_res {
                _mm256_storeu_ps(rp.add(i), d8);
            }
        }
        let x8 = _mm256_loadu_ps(xp.add(i));
        let half = |x4: __m128, d4: __m128, (m, a, b, k): Half| {
            let (x, d) = (_mm256_cvtps_pd(x4), _mm256_cvtps_pd(d4));
            _mm256_cvtpd_ps(map2_f64!(_mm256, x, d, m, a, b, k))
        };
        let l = half(_mm256_castps256_ps128(x8), _mm256_castps256_ps128(d8), lo);
        let h = half(
            _mm256_extractf128_ps::<1>(x8),
            _mm256_extractf128_ps::<1>(d8),
            hi,
        );
        _mm256_stream_ps(op.add(i), _mm256_set_m128(h, l));
    };
    // SAFETY: `o < c + 4 <= run + 4` (a second half starts 4 past an offset below
    // `c`), so the 4 values read end by `run + WRAP` and each `vec` is in bounds (it
    // asserts so); past `run` the table repeats its first channels, so offset `o`
    // holds channel `o mod c`; AVX2 is enabled.
    let coef = |o: usize| unsafe { (src.vec(0, o), src.vec(1, o), src.vec(3, o), src.vec(4, o)) };
    let ps = [xp, dp, yp];
    let ahead = c >= AHEAD_MIN_C;
    blocked::<8>(
        head,
        end,
        c,
        desc,
        |i, o, nr| {
            let (lo, hi) = (coef(o), coef(o + 4));
            for r in rows_in(nr, desc) {
                // One request per 64-byte line: every other 8-value step.
                if ahead && (i - head).is_multiple_of(16) {
                    ask_l2(&ps, 2 + RELU as usize, i + r * c, n, desc);
                }
                eight(i + r * c, lo, hi);
            }
        },
        |i, o| eight(i, coef(o), coef(o + 4)),
    );
}

/// [`map2f_rows_any`] on AVX2: blocks of 8 channels, per element exactly the
/// operations of [`map2f`]: same bits.
///
/// # Safety
/// As [`map2_rows_avx2`].
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn map2f_rows_avx2<const RELU: bool>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    os: &mut [f32],
    rs: &mut [f32],
    src: &Table<'_, f32>,
    c: usize,
    n: usize,
) {
    let desc = descending(&[&*os, &*rs], &[xs, ds, ys]);
    let with_res = RELU && !rs.is_empty();
    let run = src.run();
    let (head, end) = split(os.as_ptr(), n);
    scalar2::<RELU>(
        (0..head).chain(end..n),
        run,
        (xs, ys, ds),
        (&mut *os, &mut *rs),
        |o, x, y, d| map2f_one::<_, RELU>(src, o, x, y, d),
    );
    let (xp, yp, dp, op, rp) = (
        xs.as_ptr(),
        ys.as_ptr(),
        ds.as_ptr(),
        os.as_mut_ptr(),
        rs.as_mut_ptr(),
    );
    type Coefs = (__m256, __m256, __m256, __m256, __m256);
    // Eight outputs at `i` with the coefficients `(hi, a, d, b, k)`.
    // SAFETY (for every call below): `i + 8 <= end <= n`, within every slice used;
    // `op + i` is 32-byte aligned (`head` is, steps are multiples of 8 values) as the
    // streaming store requires; AVX2 is enabled.
    let eight = |i: usize, (hi, a, dd, b, k): Coefs| unsafe {
        let mut d = _mm256_loadu_ps(dp.add(i));
        if RELU {
            // dy where y > 0, else +0 (NaN y included): as `masked`.
            let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_loadu_ps(yp.add(i)), _mm256_setzero_ps());
            d = _mm256_and_ps(pos, d);
            if with_res {
                _mm256_storeu_ps(rp.add(i), d);
            }
        }
        let x = _mm256_loadu_ps(xp.add(i));
        _mm256_stream_ps(op.add(i), map2_f32!(_mm256, x, d, hi, a, dd, b, k));
    };
    // SAFETY: `o < c <= run`, so `o + 8 <= run + WRAP` and each `vec` is in bounds (it
    // asserts so); past `run` the table repeats its first channels, so offset `o`
    // holds channel `o mod c`; AVX2 is enabled.
    let coef = |o: usize| unsafe {
        (
            src.vec(0, o),
            src.vec(1, o),
            src.vec(2, o),
            src.vec(3, o),
            src.vec(4, o),
        )
    };
    let ps = [xp, dp, yp];
    let ahead = c >= AHEAD_MIN_C;
    blocked::<8>(
        head,
        end,
        c,
        desc,
        |i, o, nr| {
            let v = coef(o);
            for r in rows_in(nr, desc) {
                // One request per 64-byte line: every other 8-value step.
                if ahead && (i - head).is_multiple_of(16) {
                    ask_l2(&ps, 2 + RELU as usize, i + r * c, n, desc);
                }
                eight(i + r * c, v);
            }
        },
        |i, o| eight(i, coef(o)),
    );
}
