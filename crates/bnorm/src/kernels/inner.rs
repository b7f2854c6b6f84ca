//! The inner loops, written once for every element type and instruction set. Each keeps
//! `LANES` independent f64 accumulators (or works across channels), so the compiler
//! vectorizes it at whatever width the enclosing `#[target_feature]` allows, and the
//! lanes are combined in a fixed order: every level gives the same bits.

use super::BLOCK;
use crate::element::Element;
use crate::stats::Moments;

thread_local! {
    /// Per-thread scratch for the channels-last reductions (C values per pass), kept
    /// between calls so a warmed-up step does not allocate.
    static SCRATCH: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with `n` zeroed f64 of this thread's scratch (a fresh buffer if the scratch
/// is already in use further up the stack).
pub(crate) fn with_scratch<R>(n: usize, f: impl FnOnce(&mut [f64]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            v.clear();
            v.resize(n, 0.0);
            f(&mut v)
        }
        Err(_) => f(&mut vec![0.0; n]),
    })
}

/// Independent accumulators of a single reduction (enough to hide the latency of an f64
/// add: 4 AVX-512 or 8 AVX2 registers).
const LANES: usize = 128;

/// Independent accumulators of each of two simultaneous reductions.
const LANES2: usize = 64;

/// Sums lanes by halving (lane i with lane i + n/2, ...): a fixed order.
#[inline(always)]
fn fold<const N: usize>(mut a: [f64; N]) -> f64 {
    let mut n = N;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            a[i] += a[i + n];
        }
    }
    a[0]
}

#[inline(always)]
fn sum<T: Element>(xs: &[T]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let (body, _) = xs.as_chunks::<LANES>();
    for ch in body {
        for l in 0..LANES {
            acc[l] += ch[l].to_f64();
        }
    }
    let rest = &xs[body.len() * LANES..];
    let (mid, last) = rest.as_chunks::<8>();
    let mut acc8 = [0.0f64; 8];
    for ch in mid {
        for l in 0..8 {
            acc8[l] += ch[l].to_f64();
        }
    }
    let mut tail = 0.0;
    for v in last {
        tail += v.to_f64();
    }
    fold(acc) + (fold(acc8) + tail)
}

#[inline(always)]
fn sum_sq_dev<T: Element>(xs: &[T], m: f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let (body, rest) = xs.as_chunks::<LANES>();
    for ch in body {
        for l in 0..LANES {
            let d = ch[l].to_f64() - m;
            acc[l] += d * d;
        }
    }
    let (mid, last) = rest.as_chunks::<8>();
    let mut acc8 = [0.0f64; 8];
    for ch in mid {
        for l in 0..8 {
            let d = ch[l].to_f64() - m;
            acc8[l] += d * d;
        }
    }
    let mut tail = 0.0;
    for v in last {
        let d = v.to_f64() - m;
        tail += d * d;
    }
    fold(acc) + (fold(acc8) + tail)
}

/// Moments of a contiguous run: blocks of `BLOCK` reduced by two passes while in L1,
/// merged in order.
#[inline(always)]
pub(crate) fn run_moments<T: Element>(xs: &[T]) -> Moments {
    let mut acc = Moments::default();
    for block in xs.chunks(BLOCK) {
        let n = block.len() as f64;
        let mean = sum(block) / n;
        let m2 = sum_sq_dev(block, mean);
        acc = acc.merge(Moments { count: n, mean, m2 });
    }
    acc
}

/// (Σdy, Σdy·(x − m)) over a contiguous run.
#[inline(always)]
pub(crate) fn run_dot<T: Element>(xs: &[T], ds: &[T], m: f64) -> (f64, f64) {
    let mut a = [0.0f64; LANES2];
    let mut b = [0.0f64; LANES2];
    let mut xc = xs.chunks_exact(LANES2);
    let mut dc = ds.chunks_exact(LANES2);
    for (xl, dl) in (&mut xc).zip(&mut dc) {
        for l in 0..LANES2 {
            let d = dl[l].to_f64();
            a[l] += d;
            b[l] += d * (xl[l].to_f64() - m);
        }
    }
    let (mut ta, mut tb) = (0.0, 0.0);
    for (xv, dv) in xc.remainder().iter().zip(dc.remainder()) {
        let d = dv.to_f64();
        ta += d;
        tb += d * (xv.to_f64() - m);
    }
    (fold(a) + ta, fold(b) + tb)
}

/// `y = (x − m)·s + b` over a contiguous run.
#[inline(always)]
pub(crate) fn run_affine<T: Element>(xs: &[T], ys: &mut [T], m: f64, s: f64, b: f64) {
    if T::NARROW {
        // 16-bit storage: f32 arithmetic (twice the lanes), the mean split in two f32 so a
        // large mean costs nothing; its error (~1e-7) is far below the storage's (≥ 5e-4).
        let (mh, ml, s32, b32) = split(m, s, b);
        for (y, x) in ys.iter_mut().zip(xs) {
            *y = T::from_f32((x.to_f32() - mh - ml) * s32 + b32);
        }
        return;
    }
    for (y, x) in ys.iter_mut().zip(xs) {
        *y = T::from_f64((x.to_f64() - m) * s + b);
    }
}

/// The f32 coefficients of the narrow-type maps: the center as a high and a low part.
#[inline(always)]
fn split(m: f64, s: f64, b: f64) -> (f32, f32, f32, f32) {
    let mh = m as f32;
    (mh, (m - mh as f64) as f32, s as f32, b as f32)
}

/// `o = a·dy + b·(x − m) + k` over a contiguous run.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_affine2<T: Element>(
    xs: &[T],
    ds: &[T],
    os: &mut [T],
    m: f64,
    a: f64,
    b: f64,
    k: f64,
) {
    for ((o, x), d) in os.iter_mut().zip(xs).zip(ds) {
        *o = T::from_f64(a * d.to_f64() + b * (x.to_f64() - m) + k);
    }
}

/// Channels-last rows with few channels are processed as runs of `lanes_for(c)` elements
/// (whole rows, at least 32 values), so the loops vectorize whatever C is; per-channel
/// parameters are repeated to that length. From 32 channels on, a run is one row.
#[inline(always)]
fn lanes_for(c: usize) -> usize {
    if c >= 32 {
        c
    } else {
        c * 32usize.div_ceil(c)
    }
}

/// `p` (one value per channel) repeated to `lanes_for(c)` values.
#[inline(always)]
fn expand<'a>(p: &'a [f64], c: usize, buf: &'a mut [f64; 64]) -> &'a [f64] {
    if c >= 32 {
        &p[..c]
    } else {
        let l = lanes_for(c);
        for (i, v) in buf[..l].iter_mut().enumerate() {
            *v = p[i % c];
        }
        &buf[..l]
    }
}

/// Folds lanes of a small-C run back to channels: `out[ch] = Σ_k acc[k·c + ch]`.
#[inline(always)]
fn fold_lanes(acc: &[f64; 64], c: usize, out: &mut [f64; 64]) {
    let l = lanes_for(c);
    for v in out[..c].iter_mut() {
        *v = 0.0;
    }
    for (i, a) in acc[..l].iter().enumerate() {
        out[i % c] += a;
    }
}

/// Merges the per-channel moments of channels-last rows (`rows.len()` a multiple of `c`)
/// into `out`, block by block (each block's rows reduced by two passes in L1).
#[inline(always)]
pub(crate) fn rows_moments<T: Element>(rows: &[T], c: usize, out: &mut [Moments]) {
    if c < 32 {
        return rows_moments_small(rows, c, out);
    }
    // Blocks of about 16K values (at least 32 rows), so the per-channel merges are rare
    // and both passes over a block come from L1/L2. Each pass streams whole rows, the
    // inner loop running across the channels.
    let br = (16_384 / c).max(32);
    with_scratch(3 * c, |scratch| {
        let (s, rest) = scratch.split_at_mut(c);
        let (mean, q) = rest.split_at_mut(c);
        for block in rows.chunks(br * c) {
            let n = (block.len() / c) as f64;
            s.fill(0.0);
            for r in block.chunks_exact(c) {
                for (acc, v) in s.iter_mut().zip(r) {
                    *acc += v.to_f64();
                }
            }
            for (m, acc) in mean.iter_mut().zip(s.iter()) {
                *m = acc / n;
            }
            q.fill(0.0);
            for r in block.chunks_exact(c) {
                for ((acc, v), m) in q.iter_mut().zip(r).zip(mean.iter()) {
                    let d = v.to_f64() - m;
                    *acc += d * d;
                }
            }
            for ch in 0..c {
                out[ch] = out[ch].merge(Moments {
                    count: n,
                    mean: mean[ch],
                    m2: q[ch],
                });
            }
        }
    })
}

/// [`rows_moments`] for fewer than 32 channels: runs of whole rows as lanes.
#[inline(always)]
fn rows_moments_small<T: Element>(rows: &[T], c: usize, out: &mut [Moments]) {
    let l = lanes_for(c);
    let br = (BLOCK / l).max(1) * l / c; // rows per block, a whole number of runs
    for block in rows.chunks(br * c) {
        let n = (block.len() / c) as f64;
        let mut acc = [0.0f64; 64];
        for run in block.chunks(l) {
            for (a, v) in acc[..run.len()].iter_mut().zip(run) {
                *a += v.to_f64();
            }
        }
        let mut sums = [0.0f64; 64];
        fold_lanes(&acc, c, &mut sums);
        let mut mean = [0.0f64; 64];
        for (m, s) in mean[..c].iter_mut().zip(&sums[..c]) {
            *m = s / n;
        }
        let mut mbuf = [0.0f64; 64];
        let me = expand(&mean, c, &mut mbuf);
        let mut q = [0.0f64; 64];
        for run in block.chunks(l) {
            for ((a, v), m) in q[..run.len()].iter_mut().zip(run).zip(me) {
                let d = v.to_f64() - m;
                *a += d * d;
            }
        }
        let mut m2 = [0.0f64; 64];
        fold_lanes(&q, c, &mut m2);
        for ch in 0..c {
            out[ch] = out[ch].merge(Moments {
                count: n,
                mean: mean[ch],
                m2: m2[ch],
            });
        }
    }
}

/// Adds per-channel (Σdy, Σdy·(x − center)) of channels-last rows into `sa`, `sb`.
#[inline(always)]
pub(crate) fn rows_dot<T: Element>(
    xs: &[T],
    ds: &[T],
    c: usize,
    center: &[f64],
    sa: &mut [f64],
    sb: &mut [f64],
) {
    if c < 32 {
        let l = lanes_for(c);
        let mut mbuf = [0.0f64; 64];
        let me = expand(center, c, &mut mbuf);
        let (mut a, mut b) = ([0.0f64; 64], [0.0f64; 64]);
        for (xr, dr) in xs.chunks(l).zip(ds.chunks(l)) {
            for ((((av, bv), x), d), m) in a.iter_mut().zip(b.iter_mut()).zip(xr).zip(dr).zip(me) {
                let dv = d.to_f64();
                *av += dv;
                *bv += dv * (x.to_f64() - m);
            }
        }
        let (mut fa, mut fb) = ([0.0f64; 64], [0.0f64; 64]);
        fold_lanes(&a, c, &mut fa);
        fold_lanes(&b, c, &mut fb);
        for ch in 0..c {
            sa[ch] += fa[ch];
            sb[ch] += fb[ch];
        }
        return;
    }
    for (xr, dr) in xs.chunks_exact(c).zip(ds.chunks_exact(c)) {
        for ((((a, b), x), d), m) in sa[..c]
            .iter_mut()
            .zip(sb[..c].iter_mut())
            .zip(xr)
            .zip(dr)
            .zip(&center[..c])
        {
            let dv = d.to_f64();
            *a += dv;
            *b += dv * (x.to_f64() - m);
        }
    }
}

/// `y = (x − center)·scale + shift` on channels-last rows.
#[inline(always)]
pub(crate) fn rows_affine<T: Element>(
    xs: &[T],
    ys: &mut [T],
    c: usize,
    center: &[f64],
    scale: &[f64],
    shift: &[f64],
) {
    let l = lanes_for(c);
    let (mut b1, mut b2, mut b3) = ([0.0f64; 64], [0.0f64; 64], [0.0f64; 64]);
    let (center, scale, shift) = (
        expand(center, c, &mut b1),
        expand(scale, c, &mut b2),
        expand(shift, c, &mut b3),
    );
    for (xr, yr) in xs.chunks(l).zip(ys.chunks_mut(l)) {
        for ((((y, x), m), s), b) in yr.iter_mut().zip(xr).zip(center).zip(scale).zip(shift) {
            *y = narrow_out((x.to_f64() - m) * s + b);
        }
    }
}

/// Rounds an f64 result to the storage type; for 16-bit storage through f32 (the cheap
/// conversion: the f32 rounding is far below the 16-bit one).
#[inline(always)]
fn narrow_out<T: Element>(v: f64) -> T {
    if T::NARROW {
        T::from_f32(v as f32)
    } else {
        T::from_f64(v)
    }
}

/// `o = a·dy + b·(x − center) + k` on channels-last rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_affine2<T: Element>(
    xs: &[T],
    ds: &[T],
    os: &mut [T],
    c: usize,
    center: &[f64],
    a: &[f64],
    b: &[f64],
    k: &[f64],
) {
    let l = lanes_for(c);
    let (mut b1, mut b2, mut b3, mut b4) = ([0.0f64; 64], [0.0f64; 64], [0.0f64; 64], [0.0f64; 64]);
    let (center, a, b, k) = (
        expand(center, c, &mut b1),
        expand(a, c, &mut b2),
        expand(b, c, &mut b3),
        expand(k, c, &mut b4),
    );
    for ((xr, dr), or) in xs.chunks(l).zip(ds.chunks(l)).zip(os.chunks_mut(l)) {
        for (((((o, x), d), m), av), (bv, kv)) in or
            .iter_mut()
            .zip(xr)
            .zip(dr)
            .zip(center)
            .zip(a)
            .zip(b.iter().zip(k))
        {
            *o = narrow_out(av * d.to_f64() + bv * (x.to_f64() - m) + kv);
        }
    }
}

/// ReLU that keeps NaN (as PyTorch's does): `z < 0 → 0`, otherwise `z`.
#[inline(always)]
fn relu(z: f64) -> f64 {
    if z < 0.0 {
        0.0
    } else {
        z
    }
}

/// `y = relu((x − m)·s + b)` over a contiguous run.
#[inline(always)]
pub(crate) fn run_affine_relu<T: Element>(xs: &[T], ys: &mut [T], m: f64, s: f64, b: f64) {
    for (y, x) in ys.iter_mut().zip(xs) {
        *y = T::from_f64(relu((x.to_f64() - m) * s + b));
    }
}

/// `y = relu((x − m)·s + b + r)` over a contiguous run.
#[inline(always)]
pub(crate) fn run_affine_add_relu<T: Element>(
    xs: &[T],
    rs: &[T],
    ys: &mut [T],
    m: f64,
    s: f64,
    b: f64,
) {
    for ((y, x), r) in ys.iter_mut().zip(xs).zip(rs) {
        *y = T::from_f64(relu((x.to_f64() - m) * s + b + r.to_f64()));
    }
}

/// Channels-last `y = relu((x − center)·scale + shift [+ r])`.
#[inline(always)]
pub(crate) fn rows_affine_relu<T: Element>(
    xs: &[T],
    rs: &[T],
    ys: &mut [T],
    c: usize,
    center: &[f64],
    scale: &[f64],
    shift: &[f64],
) {
    let l = lanes_for(c);
    let (mut b1, mut b2, mut b3) = ([0.0f64; 64], [0.0f64; 64], [0.0f64; 64]);
    let (center, scale, shift) = (
        expand(center, c, &mut b1),
        expand(scale, c, &mut b2),
        expand(shift, c, &mut b3),
    );
    if rs.is_empty() {
        for (xr, yr) in xs.chunks(l).zip(ys.chunks_mut(l)) {
            for ((((y, x), m), s), b) in yr.iter_mut().zip(xr).zip(center).zip(scale).zip(shift) {
                *y = narrow_out(relu((x.to_f64() - m) * s + b));
            }
        }
    } else {
        for ((xr, rr), yr) in xs.chunks(l).zip(rs.chunks(l)).zip(ys.chunks_mut(l)) {
            for (((((y, x), r), m), s), b) in yr
                .iter_mut()
                .zip(xr)
                .zip(rr)
                .zip(center)
                .zip(scale)
                .zip(shift)
            {
                *y = narrow_out(relu((x.to_f64() - m) * s + b + r.to_f64()));
            }
        }
    }
}

/// The upstream gradient through a ReLU whose output is `y`: `dy` where `y > 0`, else 0.
#[inline(always)]
fn through_relu<T: Element>(y: T, dy: T) -> f64 {
    if y.to_f64() > 0.0 {
        dy.to_f64()
    } else {
        0.0
    }
}

/// (Σdz, Σdz·(x − m)) with `dz` the gradient through the ReLU of output `ys`.
#[inline(always)]
pub(crate) fn run_dot_relu<T: Element>(xs: &[T], ys: &[T], ds: &[T], m: f64) -> (f64, f64) {
    let mut a = [0.0f64; LANES2];
    let mut b = [0.0f64; LANES2];
    let mut xc = xs.chunks_exact(LANES2);
    let mut yc = ys.chunks_exact(LANES2);
    let mut dc = ds.chunks_exact(LANES2);
    for ((xl, yl), dl) in (&mut xc).zip(&mut yc).zip(&mut dc) {
        for l in 0..LANES2 {
            let d = through_relu(yl[l], dl[l]);
            a[l] += d;
            b[l] += d * (xl[l].to_f64() - m);
        }
    }
    let (mut ta, mut tb) = (0.0, 0.0);
    for ((xv, yv), dv) in xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .zip(dc.remainder())
    {
        let d = through_relu(*yv, *dv);
        ta += d;
        tb += d * (xv.to_f64() - m);
    }
    (fold(a) + ta, fold(b) + tb)
}

/// `dx = a·dz + b·(x − m) + k`, and `dr = dz` when `rs` is not empty.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_affine2_relu<T: Element>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    os: &mut [T],
    rs: &mut [T],
    m: f64,
    a: f64,
    b: f64,
    k: f64,
) {
    if rs.is_empty() {
        for (((o, x), y), d) in os.iter_mut().zip(xs).zip(ys).zip(ds) {
            *o = T::from_f64(a * through_relu(*y, *d) + b * (x.to_f64() - m) + k);
        }
    } else {
        for ((((o, r), x), y), d) in os.iter_mut().zip(rs.iter_mut()).zip(xs).zip(ys).zip(ds) {
            let dz = through_relu(*y, *d);
            *o = T::from_f64(a * dz + b * (x.to_f64() - m) + k);
            *r = T::from_f64(dz);
        }
    }
}

/// Channels-last per-channel sums through the ReLU, added into `sa`, `sb`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_dot_relu<T: Element>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    c: usize,
    center: &[f64],
    sa: &mut [f64],
    sb: &mut [f64],
) {
    if c < 32 {
        let l = lanes_for(c);
        let mut mbuf = [0.0f64; 64];
        let me = expand(center, c, &mut mbuf);
        let (mut a, mut b) = ([0.0f64; 64], [0.0f64; 64]);
        for ((xr, yr), dr) in xs.chunks(l).zip(ys.chunks(l)).zip(ds.chunks(l)) {
            for (((((av, bv), x), y), d), m) in a
                .iter_mut()
                .zip(b.iter_mut())
                .zip(xr)
                .zip(yr)
                .zip(dr)
                .zip(me)
            {
                let dz = through_relu(*y, *d);
                *av += dz;
                *bv += dz * (x.to_f64() - m);
            }
        }
        let (mut fa, mut fb) = ([0.0f64; 64], [0.0f64; 64]);
        fold_lanes(&a, c, &mut fa);
        fold_lanes(&b, c, &mut fb);
        for ch in 0..c {
            sa[ch] += fa[ch];
            sb[ch] += fb[ch];
        }
        return;
    }
    for ((xr, yr), dr) in xs
        .chunks_exact(c)
        .zip(ys.chunks_exact(c))
        .zip(ds.chunks_exact(c))
    {
        for (((((a, b), x), y), d), m) in sa[..c]
            .iter_mut()
            .zip(sb[..c].iter_mut())
            .zip(xr)
            .zip(yr)
            .zip(dr)
            .zip(&center[..c])
        {
            let dz = through_relu(*y, *d);
            *a += dz;
            *b += dz * (x.to_f64() - m);
        }
    }
}

/// Channels-last `dx = a·dz + b·(x − center) + k` (and `dr = dz`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_affine2_relu<T: Element>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    os: &mut [T],
    rs: &mut [T],
    c: usize,
    center: &[f64],
    a: &[f64],
    b: &[f64],
    k: &[f64],
) {
    let l = lanes_for(c);
    let (mut b1, mut b2, mut b3, mut b4) = ([0.0f64; 64], [0.0f64; 64], [0.0f64; 64], [0.0f64; 64]);
    let (center, a, b, k) = (
        expand(center, c, &mut b1),
        expand(a, c, &mut b2),
        expand(b, c, &mut b3),
        expand(k, c, &mut b4),
    );
    for (((xr, yr), dr), or) in xs
        .chunks(l)
        .zip(ys.chunks(l))
        .zip(ds.chunks(l))
        .zip(os.chunks_mut(l))
    {
        for ((((((o, x), y), d), m), av), (bv, kv)) in or
            .iter_mut()
            .zip(xr)
            .zip(yr)
            .zip(dr)
            .zip(center)
            .zip(a)
            .zip(b.iter().zip(k))
        {
            *o = T::from_f64(av * through_relu(*y, *d) + bv * (x.to_f64() - m) + kv);
        }
    }
    if !rs.is_empty() {
        for ((r, y), d) in rs.iter_mut().zip(ys).zip(ds) {
            *r = T::from_f64(through_relu(*y, *d));
        }
    }
}
