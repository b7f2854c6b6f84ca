//! The forward map with streaming stores (x86-64, AVX2 and AVX-512): `y = (x − c₀)·c₁ + c₂`
//! with its epilogue, exactly the operations of the ordinary f32 map.

use std::arch::x86_64::*;

use crate::kernels::coefs::x86::{Source, Source16};
use crate::kernels::frame::x86::{ask_l2, descending, split, Steps};

/// [`map1`] for any epilogue (`rs`: the residual, empty for none), on AVX-512 when
/// the current level has it (16 lanes: same operations, same bits).
///
/// # Safety
/// The CPU must support AVX2.
pub(super) unsafe fn map1_any<S: Source16>(
    xs: &[f32],
    rs: &[f32],
    ys: &mut [f32],
    src: &S,
    relu: bool,
) {
    let wide = crate::kernels::simd::current() == crate::kernels::simd::SimdLevel::Avx512;
    // SAFETY (all arms): the Avx512 level is only chosen when the CPU reports
    // AVX-512F; the caller guarantees AVX2.
    unsafe {
        match (wide, relu, !rs.is_empty()) {
            (true, false, _) => map1_512::<S, false, false>(xs, rs, ys, src),
            (true, true, false) => map1_512::<S, true, false>(xs, rs, ys, src),
            (true, true, true) => map1_512::<S, true, true>(xs, rs, ys, src),
            (false, false, _) => map1::<S, false, false>(xs, rs, ys, src),
            (false, true, false) => map1::<S, true, false>(xs, rs, ys, src),
            (false, true, true) => map1::<S, true, true>(xs, rs, ys, src),
        }
    }
}

/// The scalar form of `map1`, for heads and tails: exactly the ordinary map's
/// operations.
#[inline(always)]
fn map1_one<S: Source<f32>, const RELU: bool, const ADD: bool>(
    src: &S,
    o: usize,
    x: f32,
    r: f32,
) -> f32 {
    let mut z = (x - src.at(0, o)) * src.at(1, o) + src.at(2, o);
    if ADD {
        z += r;
    }
    if RELU && z < 0.0 {
        0.0
    } else {
        z
    }
}

/// [`map1`] with 16-lane vectors and 64-byte streaming stores.
///
/// # Safety
/// The CPU must support AVX-512F and AVX2; with `ADD`, `rs` must be as long as `xs`.
#[target_feature(enable = "avx512f,avx2")]
unsafe fn map1_512<S: Source16, const RELU: bool, const ADD: bool>(
    xs: &[f32],
    rs: &[f32],
    ys: &mut [f32],
    src: &S,
) {
    let desc = descending(&[&*ys], &[xs, rs]);
    let n = if ADD {
        xs.len().min(ys.len()).min(rs.len())
    } else {
        xs.len().min(ys.len())
    };
    let run = src.run();
    let head = ys.as_ptr().align_offset(64).min(n);
    let body = head + (n - head) / 16 * 16;
    for i in (0..head).chain(body..n) {
        let r = if ADD { rs[i] } else { 0.0 };
        ys[i] = map1_one::<S, RELU, ADD>(src, i % run, xs[i], r);
    }
    let (xp, rp, yp) = (xs.as_ptr(), rs.as_ptr(), ys.as_mut_ptr());
    let zero = _mm512_setzero_ps();
    // Channels-last tables (not the broadcast of a channels-first run) ask ahead for
    // x (and the residual): in-process A/B on the 2-core development VM (commit
    // bec51f3), S3 inference 0–25% faster, S4 inference 0–7%, training −2–4%;
    // channels-first runs measured nothing.
    let (ahead, ps, k) = (run != usize::MAX, [xp, rp, xp], 1 + ADD as usize);
    for (i, o) in Steps::new(head, body, 16, run, desc) {
        if ahead {
            ask_l2(&ps, k, i, n, desc);
        }
        // SAFETY: `i + 16 <= body <= n` lies within the slices (`rs` too when `ADD`);
        // `yp + i` is 64-byte aligned (`head` aligned it, steps are 64 bytes) as the
        // streaming store requires; `o < run` for the table reads; AVX-512F is enabled.
        unsafe {
            let x = _mm512_loadu_ps(xp.add(i));
            let t = _mm512_mul_ps(_mm512_sub_ps(x, src.vec16(0, o)), src.vec16(1, o));
            let mut z = _mm512_add_ps(t, src.vec16(2, o));
            if ADD {
                z = _mm512_add_ps(z, _mm512_loadu_ps(rp.add(i)));
            }
            if RELU {
                // z < 0 → +0, anything else (NaN included) kept: as `relu`.
                let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(z, zero);
                z = _mm512_mask_mov_ps(z, neg, zero);
            }
            _mm512_stream_ps(yp.add(i), z);
        }
    }
}

/// `y = (x − c₀)·c₁ + c₂ (+ r when ADD)`, then ReLU when `RELU`.
///
/// # Safety
/// The CPU must support AVX2; with `ADD`, `rs` must be as long as `xs`.
#[target_feature(enable = "avx2")]
unsafe fn map1<S: Source<f32>, const RELU: bool, const ADD: bool>(
    xs: &[f32],
    rs: &[f32],
    ys: &mut [f32],
    src: &S,
) {
    let desc = descending(&[&*ys], &[xs, rs]);
    let n = if ADD {
        xs.len().min(ys.len()).min(rs.len())
    } else {
        xs.len().min(ys.len())
    };
    let run = src.run();
    let (head, body) = split(ys.as_ptr(), n);
    for i in (0..head).chain(body..n) {
        let r = if ADD { rs[i] } else { 0.0 };
        ys[i] = map1_one::<S, RELU, ADD>(src, i % run, xs[i], r);
    }
    let (xp, rp, yp) = (xs.as_ptr(), rs.as_ptr(), ys.as_mut_ptr());
    let zero = _mm256_setzero_ps();
    // No requests ahead here, unlike `map1_512`: on AVX2 they made the S3 inference
    // 4–14% slower (in-process A/B, bit 256 of the patch in commit bec51f3).
    for (i, o) in Steps::new(head, body, 8, run, desc) {
        // SAFETY: `i + 8 <= body <= n` lies within the slices (`rs` too when `ADD`);
        // `yp + i` is 32-byte aligned (`head` aligned it, steps are 32 bytes) as the
        // streaming store requires; `o < run` for the table reads; AVX2 is enabled.
        unsafe {
            let x = _mm256_loadu_ps(xp.add(i));
            let t = _mm256_mul_ps(_mm256_sub_ps(x, src.vec(0, o)), src.vec(1, o));
            let mut z = _mm256_add_ps(t, src.vec(2, o));
            if ADD {
                z = _mm256_add_ps(z, _mm256_loadu_ps(rp.add(i)));
            }
            if RELU {
                // z < 0 → +0, anything else (NaN included) kept: as `relu`.
                z = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(z, zero), z);
            }
            _mm256_stream_ps(yp.add(i), z);
        }
    }
}
