//! Per-channel reductions with a shape-fixed order.

use rayon::prelude::*;

use super::{rows_per_task, BLOCK};
use crate::element::Element;
use crate::layout::Geometry;
use crate::parallel::Parallelism;
use crate::stats::Moments;

/// Independent accumulators per reduction loop (one AVX-512 register of f64, two AVX2).
const LANES: usize = 8;

/// Channels handled together in a channels-last block (stack arrays, no allocation).
const CHANNEL_GROUP: usize = 64;

/// Σx over a contiguous slice with `LANES` independent accumulators.
#[inline(always)]
fn sum<T: Element>(xs: &[T]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for ch in &mut chunks {
        for l in 0..LANES {
            acc[l] += ch[l].to_f64();
        }
    }
    let mut tail = 0.0;
    for v in chunks.remainder() {
        tail += v.to_f64();
    }
    pairwise(acc) + tail
}

/// Σ(x − m)² over a contiguous slice.
#[inline(always)]
fn sum_sq_dev<T: Element>(xs: &[T], m: f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for ch in &mut chunks {
        for l in 0..LANES {
            let d = ch[l].to_f64() - m;
            acc[l] += d * d;
        }
    }
    let mut tail = 0.0;
    for v in chunks.remainder() {
        let d = v.to_f64() - m;
        tail += d * d;
    }
    pairwise(acc) + tail
}

/// (Σdy, Σdy·(x − m)) over contiguous slices.
#[inline(always)]
fn sum_dot<T: Element>(xs: &[T], ds: &[T], m: f64) -> (f64, f64) {
    let mut a = [0.0f64; LANES];
    let mut b = [0.0f64; LANES];
    let mut xc = xs.chunks_exact(LANES);
    let mut dc = ds.chunks_exact(LANES);
    for (xl, dl) in (&mut xc).zip(&mut dc) {
        for l in 0..LANES {
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
    (pairwise(a) + ta, pairwise(b) + tb)
}

#[inline(always)]
fn pairwise(a: [f64; LANES]) -> f64 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// Moments of one contiguous run, block by block.
#[inline(always)]
fn run_moments<T: Element>(xs: &[T]) -> Moments {
    let mut acc = Moments::default();
    for block in xs.chunks(BLOCK) {
        let n = block.len() as f64;
        let mean = sum(block) / n;
        let m2 = sum_sq_dev(block, mean);
        acc = acc.merge(Moments { count: n, mean, m2 });
    }
    acc
}

/// Scratch space for the reductions, reusable across calls so that a training step does
/// not allocate once it has warmed up.
#[derive(Debug, Default, Clone)]
pub struct Workspace {
    moments: Vec<Moments>,
    pairs: Vec<(f64, f64)>,
    pub(crate) tmp: Vec<Moments>,
    pub(crate) tmp_pairs: Vec<(f64, f64)>,
}

/// Number of segments per channel (channels-first) or in total (channels-last).
fn segments(g: Geometry) -> (usize, usize) {
    if g.inner == 1 {
        let rps = rows_per_task(g.channels);
        (rps, g.outer.div_ceil(rps))
    } else {
        let rps = rows_per_task(g.inner);
        (rps, g.outer.div_ceil(rps))
    }
}

/// Per-channel moments of `x` into `out` (length C).
pub(crate) fn moments<T: Element>(
    g: Geometry,
    x: &[T],
    out: &mut [Moments],
    ws: &mut Workspace,
    par: Parallelism,
) {
    let c = g.channels;
    let (rps, nseg) = segments(g);
    let parallel = par.is_parallel(g.len());
    if g.inner == 1 {
        ws.moments.clear();
        ws.moments.resize(nseg * c, Moments::default());
        let task = |(s, part): (usize, &mut [Moments])| {
            let rows = &x[s * rps * c..((s + 1) * rps).min(g.outer) * c];
            rows_moments(rows, c, part);
        };
        if parallel {
            ws.moments
                .par_chunks_mut(c.max(1))
                .enumerate()
                .for_each(task);
        } else {
            ws.moments.chunks_mut(c.max(1)).enumerate().for_each(task);
        }
        for (ch, o) in out.iter_mut().enumerate() {
            *o = (0..nseg).fold(Moments::default(), |acc, s| {
                acc.merge(ws.moments[s * c + ch])
            });
        }
    } else {
        ws.moments.clear();
        ws.moments.resize(nseg * c, Moments::default());
        let task = |(t, o): (usize, &mut Moments)| {
            let (ch, s) = (t / nseg, t % nseg);
            let mut acc = Moments::default();
            for n in s * rps..((s + 1) * rps).min(g.outer) {
                let start = (n * c + ch) * g.inner;
                acc = acc.merge(run_moments(&x[start..start + g.inner]));
            }
            *o = acc;
        };
        if parallel {
            ws.moments.par_iter_mut().enumerate().for_each(task);
        } else {
            ws.moments.iter_mut().enumerate().for_each(task);
        }
        for (ch, o) in out.iter_mut().enumerate() {
            *o = ws.moments[ch * nseg..(ch + 1) * nseg]
                .iter()
                .fold(Moments::default(), |acc, m| acc.merge(*m));
        }
    }
}

/// Per-channel moments of a run of channels-last rows (`rows.len()` a multiple of `c`).
fn rows_moments<T: Element>(rows: &[T], c: usize, out: &mut [Moments]) {
    let br = (BLOCK / c).max(1);
    for block in rows.chunks(br * c) {
        let n = (block.len() / c) as f64;
        for g0 in (0..c).step_by(CHANNEL_GROUP) {
            let w = CHANNEL_GROUP.min(c - g0);
            let mut s = [0.0f64; CHANNEL_GROUP];
            for r in block.chunks_exact(c) {
                for j in 0..w {
                    s[j] += r[g0 + j].to_f64();
                }
            }
            let mut mean = [0.0f64; CHANNEL_GROUP];
            for j in 0..w {
                mean[j] = s[j] / n;
            }
            let mut q = [0.0f64; CHANNEL_GROUP];
            for r in block.chunks_exact(c) {
                for j in 0..w {
                    let d = r[g0 + j].to_f64() - mean[j];
                    q[j] += d * d;
                }
            }
            for j in 0..w {
                out[g0 + j] = out[g0 + j].merge(Moments {
                    count: n,
                    mean: mean[j],
                    m2: q[j],
                });
            }
        }
    }
}

/// Per-channel `(Σdy, Σdy·(x − center))` into `out` (length C).
pub(crate) fn dot<T: Element>(
    g: Geometry,
    x: &[T],
    dy: &[T],
    center: &[f64],
    out: &mut [(f64, f64)],
    ws: &mut Workspace,
    par: Parallelism,
) {
    let c = g.channels;
    let (rps, nseg) = segments(g);
    let parallel = par.is_parallel(g.len());
    ws.pairs.clear();
    ws.pairs.resize(nseg * c, (0.0, 0.0));
    if g.inner == 1 {
        let task = |(s, part): (usize, &mut [(f64, f64)])| {
            let range = s * rps * c..((s + 1) * rps).min(g.outer) * c;
            for g0 in (0..c).step_by(CHANNEL_GROUP) {
                let w = CHANNEL_GROUP.min(c - g0);
                let mut a = [0.0f64; CHANNEL_GROUP];
                let mut b = [0.0f64; CHANNEL_GROUP];
                for (xr, dr) in x[range.clone()]
                    .chunks_exact(c)
                    .zip(dy[range.clone()].chunks_exact(c))
                {
                    for j in 0..w {
                        let d = dr[g0 + j].to_f64();
                        a[j] += d;
                        b[j] += d * (xr[g0 + j].to_f64() - center[g0 + j]);
                    }
                }
                for j in 0..w {
                    part[g0 + j] = (a[j], b[j]);
                }
            }
        };
        if parallel {
            ws.pairs.par_chunks_mut(c.max(1)).enumerate().for_each(task);
        } else {
            ws.pairs.chunks_mut(c.max(1)).enumerate().for_each(task);
        }
        for (ch, o) in out.iter_mut().enumerate() {
            *o = (0..nseg).fold((0.0, 0.0), |acc, s| {
                let p = ws.pairs[s * c + ch];
                (acc.0 + p.0, acc.1 + p.1)
            });
        }
    } else {
        let task = |(t, o): (usize, &mut (f64, f64))| {
            let (ch, s) = (t / nseg, t % nseg);
            let (mut a, mut b) = (0.0, 0.0);
            for n in s * rps..((s + 1) * rps).min(g.outer) {
                let start = (n * c + ch) * g.inner;
                let r = start..start + g.inner;
                let (pa, pb) = sum_dot(&x[r.clone()], &dy[r], center[ch]);
                a += pa;
                b += pb;
            }
            *o = (a, b);
        };
        if parallel {
            ws.pairs.par_iter_mut().enumerate().for_each(task);
        } else {
            ws.pairs.iter_mut().enumerate().for_each(task);
        }
        for (ch, o) in out.iter_mut().enumerate() {
            *o = ws.pairs[ch * nseg..(ch + 1) * nseg]
                .iter()
                .fold((0.0, 0.0), |acc, p| (acc.0 + p.0, acc.1 + p.1));
        }
    }
}
