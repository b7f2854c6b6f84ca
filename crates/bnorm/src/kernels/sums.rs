//! The per-channel sums of the backward pass: `(Σdz, Σdz·(x − center))` with `dz = dy`
//! or, through a ReLU whose output was `y`, `dz = dy·[y > 0]` ([`dot`] of [`DotIn`]),
//! over the segments of [`segments`] merged in order, for both layout families:
//!
//! * Channels-first: each channel's runs, the lanes of a segment kept across its rows
//!   ([`PairLanes`]; [`seg_dot`] for a whole segment, [`dot_row`] row by row for the fused
//!   backward).
//! * Channels-last: rows of `c` values ([`rows_dot`], [`rows_dot_relu`]): whole rows as
//!   lanes for small `c`, several rows at a time across the channels for large.

use super::frame::{ahead, expand, fold_lanes, lanes_for, PairLanes, LANES2};
use super::schedule::{segments, Scratch, Workspace};
use super::simd::{self, Isa};
use crate::element::Element;
use crate::layout::Geometry;
use crate::parallel::{self, Parallelism};

simd::dispatch! {
    fn seg_dot<T>(x: &[T], y: &[T], dy: &[T], seg: Seg, m: f64) -> (f64, f64);
    fn dot_row<T>(acc: &mut PairLanes, xs: &[T], ys: &[T], ds: &[T], m: f64, next: &[&[T]]);
    fn rows_dot<T>(xs: &[T], ds: &[T], c: usize, center: &[f64], acc: Acc<'_>);
    fn rows_dot_relu<T>(xs: &[T], ys: &[T], ds: &[T], c: usize, center: &[f64], acc: Acc<'_>);
}

/// The operands of the backward sums: `x`, the upstream gradient `dy`, and the forward's
/// output `y` when the step ended in a ReLU (`dz = dy·[y > 0]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DotIn<'a, T> {
    pub(crate) x: &'a [T],
    pub(crate) dy: &'a [T],
    pub(crate) relu_y: Option<&'a [T]>,
}

impl<'a, T> DotIn<'a, T> {
    /// The same operands restricted to `range` of the flat tensor.
    pub(crate) fn slice(&self, range: std::ops::Range<usize>) -> DotIn<'a, T> {
        DotIn {
            x: &self.x[range.clone()],
            dy: &self.dy[range.clone()],
            relu_y: self.relu_y.map(|y| &y[range]),
        }
    }
}

/// Per-channel accumulators `(Σdz, Σdz·(x − center))` that channels-last rows add into.
type Acc<'a> = (&'a mut [f64], &'a mut [f64]);

/// A channels-first segment of one channel: `rows` rows of `len` values, row `r` at
/// `start + r·stride`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seg {
    pub(crate) start: usize,
    pub(crate) stride: usize,
    pub(crate) rows: usize,
    pub(crate) len: usize,
}

/// Per-channel `(Σdz, Σdz·(x − center))` into `out` (length C), with `dz = dy`, or
/// `dz = dy·[y > 0]` through a ReLU whose output was `y` (`inp.relu_y`).
pub(crate) fn dot<T: Element>(
    g: Geometry,
    inp: DotIn<'_, T>,
    center: &[f64],
    out: &mut [(f64, f64)],
    ws: &mut Workspace,
    par: Parallelism,
) {
    let DotIn { x, dy, relu_y: y } = inp;
    let isa = Isa::of_call();
    let c = g.channels;
    let (rps, nseg) = segments(g);
    ws.pairs.clear();
    ws.pairs.resize(nseg * c, (0.0, 0.0));
    if g.inner == 1 {
        let task = |(s, part): (usize, &mut [(f64, f64)])| {
            let range = s * rps * c..((s + 1) * rps).min(g.outer) * c;
            let (xs, ds) = (&x[range.clone()], &dy[range.clone()]);
            let mut ab = Scratch::<f64>::take(2 * c);
            let (a, b) = ab.split_at_mut(c);
            match y {
                None => by_level::rows_dot(isa, xs, ds, c, center, (a, b)),
                Some(y) => by_level::rows_dot_relu(isa, xs, &y[range], ds, c, center, (a, b)),
            }
            for (p, (av, bv)) in part.iter_mut().zip(a.iter().zip(b.iter())) {
                *p = (*av, *bv);
            }
        };
        parallel::chunks(par, g.len(), &mut ws.pairs, c, |s, p| task((s, p)));
        for (ch, o) in out.iter_mut().enumerate() {
            *o = (0..nseg).fold((0.0, 0.0), |acc, s| {
                let p = ws.pairs[s * c + ch];
                (acc.0 + p.0, acc.1 + p.1)
            });
        }
    } else {
        let task = |(t, o): (usize, &mut (f64, f64))| {
            let (ch, s) = (t / nseg, t % nseg);
            let (n0, n1) = (s * rps, ((s + 1) * rps).min(g.outer));
            let seg = Seg {
                start: (n0 * c + ch) * g.inner,
                stride: c * g.inner,
                rows: n1 - n0,
                len: g.inner,
            };
            *o = by_level::seg_dot(isa, x, y.unwrap_or(&[]), dy, seg, center[ch]);
        };
        parallel::chunks(par, g.len(), &mut ws.pairs, 1, |t, o| task((t, &mut o[0])));
        for (ch, o) in out.iter_mut().enumerate() {
            *o = ws.pairs[ch * nseg..(ch + 1) * nseg]
                .iter()
                .fold((0.0, 0.0), |acc, p| (acc.0 + p.0, acc.1 + p.1));
        }
    }
}

// ─── Channels-first runs ────────────────────────────────────────────────────────────────

/// One channel's `(Σdz, Σdz·(x − m))` over a channels-first segment accumulate in
/// [`PairLanes`] (the same bits whether the rows come in one call, [`seg_dot`], or one at a
/// time, [`dot_row`]).
impl PairLanes {
    /// Adds one row (`ys` the ReLU output when `RELU`, else ignored), prefetching the
    /// slices of `next` alongside ([`ahead`]).
    #[inline(always)]
    fn add_dot_row<T: Element, const RELU: bool>(
        &mut self,
        xs: &[T],
        ys: &[T],
        ds: &[T],
        m: f64,
        next: &[&[T]],
    ) {
        let (xs, ys, ds) = dot_operands::<T, RELU>(xs, ys, ds);
        let (xb, xr) = xs.as_chunks::<LANES2>();
        let (db, dr) = ds.as_chunks::<LANES2>();
        let (yb, yr) = ys.as_chunks::<LANES2>();
        for (k, ((xc, dc), yc)) in xb.iter().zip(db).zip(yb).enumerate() {
            ahead(next, k * LANES2, LANES2);
            for l in 0..LANES2 {
                let d = dz::<T, RELU>(yc[l], dc[l]);
                self.a[l] += d;
                self.b[l] += d * (xc[l].to_f64() - m);
            }
        }
        let (x8, xr) = xr.as_chunks::<8>();
        let (d8, dr) = dr.as_chunks::<8>();
        let (y8, yr) = yr.as_chunks::<8>();
        for ((xc, dc), yc) in x8.iter().zip(d8).zip(y8) {
            for l in 0..8 {
                let d = dz::<T, RELU>(yc[l], dc[l]);
                self.a8[l] += d;
                self.b8[l] += d * (xc[l].to_f64() - m);
            }
        }
        for ((xv, dv), yv) in xr.iter().zip(dr).zip(yr) {
            let d = dz::<T, RELU>(*yv, *dv);
            self.ta += d;
            self.tb += d * (xv.to_f64() - m);
        }
    }
}

/// One channel's `(Σdz, Σdz·(x − m))` over a channels-first segment, in the order of
/// [`PairLanes`]; `dz = dy`, or `dy·[y > 0]` through a ReLU whose output was `y` when `y`
/// is not empty.
#[inline(always)]
pub(crate) fn seg_dot<T: Element>(x: &[T], y: &[T], dy: &[T], seg: Seg, m: f64) -> (f64, f64) {
    let Seg {
        start,
        stride,
        rows,
        len,
    } = seg;
    let mut acc = PairLanes::ZERO;
    for r in 0..rows {
        let s = start + r * stride;
        let (xs, ds) = (&x[s..s + len], &dy[s..s + len]);
        if y.is_empty() {
            acc.add_dot_row::<T, false>(xs, &[], ds, m, &[]);
        } else {
            acc.add_dot_row::<T, true>(xs, &y[s..s + len], ds, m, &[]);
        }
    }
    acc.sums()
}

/// Adds one row of `(x, dy)` to `acc` (see [`PairLanes`]), through a ReLU whose output
/// was `ys` when `ys` is not empty; the slices of `next` (the channel's next rows of the
/// same arrays, or none) are prefetched alongside ([`ahead`]).
#[inline(always)]
pub(crate) fn dot_row<T: Element>(
    acc: &mut PairLanes,
    xs: &[T],
    ys: &[T],
    ds: &[T],
    m: f64,
    next: &[&[T]],
) {
    if ys.is_empty() {
        acc.add_dot_row::<T, false>(xs, ys, ds, m, next)
    } else {
        acc.add_dot_row::<T, true>(xs, ys, ds, m, next)
    }
}

// ─── Channels-last rows ─────────────────────────────────────────────────────────────────

/// Adds per-channel (Σdy, Σdy·(x − center)) of channels-last rows into `sa`, `sb`.
#[inline(always)]
pub(crate) fn rows_dot<T: Element>(xs: &[T], ds: &[T], c: usize, center: &[f64], acc: Acc<'_>) {
    match lanes_for(c) {
        32 => return rows_dot_lanes::<T, 32, false>(xs, &[], ds, c, center, acc),
        64 => return rows_dot_lanes::<T, 64, false>(xs, &[], ds, c, center, acc),
        _ => {}
    }
    if c < 32 {
        return rows_dot_runs::<T, false>(xs, &[], ds, c, center, acc);
    }
    let (sa, sb) = acc;
    // Four rows at a time: a quarter of the accumulator traffic, and two tensors' four
    // rows are eight streams of reads in flight (two rows: 2–5% slower on S3 in an
    // in-process A/B, eight rows slower still in a C probe; both in commit 5b84ab7).
    let (sa, sb, center) = (&mut sa[..c], &mut sb[..c], &center[..c]);
    let mut xq = xs.chunks_exact(4 * c);
    let mut dq = ds.chunks_exact(4 * c);
    for (xq, dq) in (&mut xq).zip(&mut dq) {
        let (x0, x1, x2, x3) = (
            &xq[..c],
            &xq[c..2 * c],
            &xq[2 * c..3 * c],
            &xq[3 * c..4 * c],
        );
        let (d0, d1, d2, d3) = (
            &dq[..c],
            &dq[c..2 * c],
            &dq[2 * c..3 * c],
            &dq[3 * c..4 * c],
        );
        for ch in 0..c {
            let m = center[ch];
            let (e0, e1, e2, e3) = (
                d0[ch].to_f64(),
                d1[ch].to_f64(),
                d2[ch].to_f64(),
                d3[ch].to_f64(),
            );
            sa[ch] += (e0 + e1) + (e2 + e3);
            sb[ch] += (e0 * (x0[ch].to_f64() - m) + e1 * (x1[ch].to_f64() - m))
                + (e2 * (x2[ch].to_f64() - m) + e3 * (x3[ch].to_f64() - m));
        }
    }
    for (xr, dr) in xq
        .remainder()
        .chunks_exact(c)
        .zip(dq.remainder().chunks_exact(c))
    {
        for ((((a, b), x), d), m) in sa.iter_mut().zip(sb.iter_mut()).zip(xr).zip(dr).zip(center) {
            let dv = d.to_f64();
            *a += dv;
            *b += dv * (x.to_f64() - m);
        }
    }
}

/// Channels-last per-channel sums through the ReLU, added into `sa`, `sb`.
#[inline(always)]
pub(crate) fn rows_dot_relu<T: Element>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    c: usize,
    center: &[f64],
    acc: Acc<'_>,
) {
    match lanes_for(c) {
        32 => return rows_dot_lanes::<T, 32, true>(xs, ys, ds, c, center, acc),
        64 => return rows_dot_lanes::<T, 64, true>(xs, ys, ds, c, center, acc),
        _ => {}
    }
    if c < 32 {
        return rows_dot_runs::<T, true>(xs, ys, ds, c, center, acc);
    }
    rows_dot_pairs(xs, ys, ds, c, center, acc);
}

/// [`rows_dot`] (with `RELU`, [`rows_dot_relu`] through the ReLU output `ys`) where a
/// run is exactly `L` values (`lanes_for(c) == L`: C divides 32, or C = 64). The lanes
/// are fixed-size arrays, which the compiler keeps in registers for all the rows; with
/// per-channel sums in memory, loaded and stored every few rows, the S4 backward (C =
/// 64) took 10–13% longer (measured in one process alternating both on the 2-core
/// development VM, commit db6decf).
/// Runs are added one after another, a last partial one (whole rows) into the first
/// lanes; the lanes are folded to channels once. For C below 32 the same order as the
/// general small-C loop.
#[inline(always)]
fn rows_dot_lanes<T: Element, const L: usize, const RELU: bool>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    c: usize,
    center: &[f64],
    (sa, sb): Acc<'_>,
) {
    let mut mbuf = [0.0f64; 64];
    let mut me = [0.0f64; L];
    me.copy_from_slice(&expand(center, c, &mut mbuf)[..L]);
    let (xs, ys, ds) = dot_operands::<T, RELU>(xs, ys, ds);
    let (mut a, mut b) = ([0.0f64; L], [0.0f64; L]);
    let (xb, xr) = xs.as_chunks::<L>();
    let (db, dr) = ds.as_chunks::<L>();
    let (yb, yr) = ys.as_chunks::<L>();
    for ((xc, dc), yc) in xb.iter().zip(db).zip(yb) {
        for l in 0..L {
            let d = dz::<T, RELU>(yc[l], dc[l]);
            a[l] += d;
            b[l] += d * (xc[l].to_f64() - me[l]);
        }
    }
    for (l, ((x, d), y)) in xr.iter().zip(dr).zip(yr).enumerate() {
        let d = dz::<T, RELU>(*y, *d);
        a[l] += d;
        b[l] += d * (x.to_f64() - me[l]);
    }
    let (mut a64, mut b64) = ([0.0f64; 64], [0.0f64; 64]);
    a64[..L].copy_from_slice(&a);
    b64[..L].copy_from_slice(&b);
    add_folded(&a64, &b64, c, sa, sb);
}

/// Folds two sets of run lanes to channels ([`fold_lanes`]) and adds them into `sa`, `sb`.
#[inline(always)]
fn add_folded(a: &[f64; 64], b: &[f64; 64], c: usize, sa: &mut [f64], sb: &mut [f64]) {
    let (mut fa, mut fb) = ([0.0f64; 64], [0.0f64; 64]);
    fold_lanes(a, c, &mut fa);
    fold_lanes(b, c, &mut fb);
    for ch in 0..c {
        sa[ch] += fa[ch];
        sb[ch] += fb[ch];
    }
}

/// [`rows_dot_lanes`] for the other C below 32, whose runs (`lanes_for(c)` values, whole
/// rows) are not a size known at compile time: the same order, the lanes in memory.
#[inline(always)]
fn rows_dot_runs<T: Element, const RELU: bool>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    c: usize,
    center: &[f64],
    (sa, sb): Acc<'_>,
) {
    let l = lanes_for(c);
    let mut mbuf = [0.0f64; 64];
    let me = expand(center, c, &mut mbuf);
    let (xs, ys, ds) = dot_operands::<T, RELU>(xs, ys, ds);
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
            let d = dz::<T, RELU>(*y, *d);
            *av += d;
            *bv += d * (x.to_f64() - m);
        }
    }
    add_folded(&a, &b, c, sa, sb);
}

/// [`rows_dot_relu`] for 32 channels or more (not 64 or a divisor of 32): two rows at a
/// time across the channels, then the last row. Two rows of x, y and dy are six streams
/// of reads in flight; in one process alternating the variants on S3 (C = 1024), one row
/// at a time (the code before commit 95206be) took 13–17% longer and four rows (twelve
/// streams) 4% longer (2-core development VM, commit 5b84ab7).
#[inline(always)]
fn rows_dot_pairs<T: Element>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    c: usize,
    center: &[f64],
    (sa, sb): Acc<'_>,
) {
    let (sa, sb, center) = (&mut sa[..c], &mut sb[..c], &center[..c]);
    let (xs, ys, ds) = dot_operands::<T, true>(xs, ys, ds);
    let mut xq = xs.chunks_exact(2 * c);
    let mut yq = ys.chunks_exact(2 * c);
    let mut dq = ds.chunks_exact(2 * c);
    for ((xq, yq), dq) in (&mut xq).zip(&mut yq).zip(&mut dq) {
        let (x0, x1) = (&xq[..c], &xq[c..2 * c]);
        let (y0, y1) = (&yq[..c], &yq[c..2 * c]);
        let (d0, d1) = (&dq[..c], &dq[c..2 * c]);
        for ch in 0..c {
            let m = center[ch];
            let (e0, e1) = (through_relu(y0[ch], d0[ch]), through_relu(y1[ch], d1[ch]));
            sa[ch] += e0 + e1;
            sb[ch] += e0 * (x0[ch].to_f64() - m) + e1 * (x1[ch].to_f64() - m);
        }
    }
    for ((xr, yr), dr) in xq
        .remainder()
        .chunks_exact(c)
        .zip(yq.remainder().chunks_exact(c))
        .zip(dq.remainder().chunks_exact(c))
    {
        for (((((a, b), x), y), d), m) in sa
            .iter_mut()
            .zip(sb.iter_mut())
            .zip(xr)
            .zip(yr)
            .zip(dr)
            .zip(center)
        {
            let e = through_relu(*y, *d);
            *a += e;
            *b += e * (x.to_f64() - m);
        }
    }
}

// ─── The gradient summed ────────────────────────────────────────────────────────────────

/// The upstream gradient through a ReLU whose output is `y`: `dy` where `y > 0`, else 0.
#[inline(always)]
fn through_relu<T: Element>(y: T, dy: T) -> f64 {
    if y.to_f64() > 0.0 {
        dy.to_f64()
    } else {
        0.0
    }
}

/// The gradient summed by the backward reductions: `dy`, or with `RELU`
/// [`through_relu`]`(y, dy)`.
#[inline(always)]
fn dz<T: Element, const RELU: bool>(y: T, dy: T) -> f64 {
    if RELU {
        through_relu(y, dy)
    } else {
        dy.to_f64()
    }
}

/// `(x, y, dy)` cut to a common length for a backward reduction; without a ReLU `y` is
/// `dy` (unused by [`dz`]): the same chunking, no extra slice.
#[inline(always)]
fn dot_operands<'a, T, const RELU: bool>(
    xs: &'a [T],
    ys: &'a [T],
    ds: &'a [T],
) -> (&'a [T], &'a [T], &'a [T]) {
    let n = xs.len().min(ds.len());
    let (xs, ds) = (&xs[..n], &ds[..n]);
    (xs, if RELU { &ys[..n] } else { ds }, ds)
}
