//! The forward map with streaming stores (x86-64, AVX2 and AVX-512): `y = (x − c₀)·c₁ + c₂`
//! with its epilogue, exactly the operations of the ordinary f32 map. One loop
//! ([`map1`]) for both levels, the epilogue and the vector width as parameters.

use std::arch::x86_64::*;

use crate::kernels::coefs::x86::{F32s, Source};
use crate::kernels::frame::x86::{ask_l2, descending, split, stream_one, Steps};
use crate::kernels::simd::{Isa, SimdLevel};
use crate::kernels::Out;

/// [`map1`] for any epilogue (`rs`: the residual, empty for none), on AVX-512 when
/// the call's level `isa` has it (16 lanes: same operations, same bits).
///
/// # Safety
/// The CPU must support AVX2.
pub(super) unsafe fn map1_any<S: Source<f32>>(
    isa: Isa,
    xs: &[f32],
    rs: &[f32],
    ys: &mut Out<f32>,
    src: &S,
    relu: bool,
) {
    let wide = isa.level() == SimdLevel::Avx512;
    // SAFETY (all arms): an `Isa` has the Avx512 level only when the CPU reports
    // AVX-512F; the caller guarantees AVX2.
    unsafe {
        match (wide, relu, !rs.is_empty()) {
            (true, false, _) => map1_avx512::<S, false, false>(xs, rs, ys, src),
            (true, true, false) => map1_avx512::<S, true, false>(xs, rs, ys, src),
            (true, true, true) => map1_avx512::<S, true, true>(xs, rs, ys, src),
            (false, false, _) => map1_avx2::<S, false, false>(xs, rs, ys, src),
            (false, true, false) => map1_avx2::<S, true, false>(xs, rs, ys, src),
            (false, true, true) => map1_avx2::<S, true, true>(xs, rs, ys, src),
        }
    }
}

/// [`map1`] with 8-lane vectors and 32-byte streaming stores. No requests ahead, unlike
/// [`map1_avx512`]: on AVX2 they made the S3 inference 4–14% slower (in-process A/B, bit
/// 256 of the patch in commit bec51f3).
///
/// # Safety
/// The CPU must support AVX2; with `ADD`, `rs` must be as long as `xs`.
#[target_feature(enable = "avx2")]
unsafe fn map1_avx2<S: Source<f32>, const RELU: bool, const ADD: bool>(
    xs: &[f32],
    rs: &[f32],
    ys: &mut Out<f32>,
    src: &S,
) {
    // SAFETY: AVX2 is enabled here; the caller's contract for `rs`.
    unsafe { map1::<__m256, S, RELU, ADD, false>(xs, rs, ys, src) }
}

/// [`map1`] with 16-lane vectors and 64-byte streaming stores. Channels-last tables (not
/// the broadcast of a channels-first run) ask ahead for x (and the residual): in-process
/// A/B on the 2-core development VM (commit bec51f3), S3 inference 0–25% faster, S4
/// inference 0–7%, training −2–4%; channels-first runs measured nothing.
///
/// # Safety
/// The CPU must support AVX-512F and AVX2; with `ADD`, `rs` must be as long as `xs`.
#[target_feature(enable = "avx512f,avx2")]
unsafe fn map1_avx512<S: Source<f32>, const RELU: bool, const ADD: bool>(
    xs: &[f32],
    rs: &[f32],
    ys: &mut Out<f32>,
    src: &S,
) {
    // SAFETY: AVX-512F and AVX2 are enabled here; the caller's contract for `rs`.
    unsafe { map1::<__m512, S, RELU, ADD, true>(xs, rs, ys, src) }
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

/// `y = (x − c₀)·c₁ + c₂ (+ r when ADD)`, then ReLU when `RELU`, `V::LANES` values at a
/// time with streaming stores; asking the L2 ahead for the inputs of channels-last
/// tables when `AHEAD`.
///
/// # Safety
/// The CPU must support `V`'s level, enabled in the function this inlines into; with
/// `ADD`, `rs` must be as long as `xs`.
#[inline(always)]
unsafe fn map1<V: F32s, S: Source<f32>, const RELU: bool, const ADD: bool, const AHEAD: bool>(
    xs: &[f32],
    rs: &[f32],
    ys: &mut Out<f32>,
    src: &S,
) {
    let desc = descending(&[&*ys], &[xs, rs]);
    let n = if ADD {
        xs.len().min(ys.len()).min(rs.len())
    } else {
        xs.len().min(ys.len())
    };
    let run = src.run();
    let (head, body) = split(ys.as_ptr().cast(), n, V::BYTES, V::LANES);
    let (xp, rp, yp) = (xs.as_ptr(), rs.as_ptr(), ys.as_mut_ptr().cast::<f32>());
    // The head and the tail are streamed too, and in address order with the body (the
    // head first going up, the tail first going down): consecutive calls on consecutive
    // runs (channels-first rows of any length) then write one ascending (or descending)
    // stream, and the cache line a run shares with the next is filled in the
    // write-combining buffers by the end of one and the start of the other. Written with
    // ordinary stores, that line was read from memory first, and the store waiting for it
    // held back every streaming store after it: a map on runs of 196 values (14×14
    // images) ran at a third of the speed of one on runs of 3136.
    let scalar = |i: usize| {
        let r = if ADD { rs[i] } else { 0.0 };
        let v = map1_one::<S, RELU, ADD>(src, i % run, xs[i], r);
        // SAFETY: `i < n <= ys.len()`: `yp + i` lies within `ys`.
        unsafe { stream_one(yp.add(i), v) };
    };
    if desc {
        (body..n).rev().for_each(scalar);
    } else {
        (0..head).for_each(scalar);
    }
    let (ahead, ps, k) = (AHEAD && run != usize::MAX, [xp, rp, xp], 1 + ADD as usize);
    for (i, o) in Steps::new(head, body, V::LANES, run, desc) {
        if ahead {
            ask_l2(&ps, k, i, n, desc);
        }
        // SAFETY: `i + LANES <= body <= n` lies within the slices (`rs` too when `ADD`);
        // `yp + i` is aligned to `V::BYTES` (`head` aligned it, steps are that long) as
        // the streaming store requires; `o < run` for the table reads; the caller
        // guarantees `V`'s level.
        unsafe {
            let x = V::load(xp.add(i));
            let t = V::mul(V::sub(x, V::coef(src, 0, o)), V::coef(src, 1, o));
            let mut z = V::add(t, V::coef(src, 2, o));
            if ADD {
                z = V::add(z, V::load(rp.add(i)));
            }
            if RELU {
                z = V::relu(z);
            }
            V::stream(yp.add(i), z);
        }
    }
    if desc {
        (0..head).rev().for_each(scalar);
    } else {
        (body..n).for_each(scalar);
    }
}
