//! Per-channel reductions with a shape-fixed order.

use rayon::prelude::*;

use super::inner::Scratch;
use super::{rows_dot, rows_dot_relu, rows_moments, rows_per_task, run_moments, seg_dot};
use crate::element::Element;
use crate::layout::Geometry;
use crate::parallel::Parallelism;
use crate::stats::Moments;

/// Scratch space for the reductions, reusable across calls so that a training step does
/// not allocate once it has warmed up.
#[derive(Debug, Default, Clone)]
pub struct Workspace {
    moments: Vec<Moments>,
    pairs: Vec<(f64, f64)>,
    pub(crate) tmp: Vec<Moments>,
    pub(crate) tmp_pairs: Vec<(f64, f64)>,
    pub(crate) coef: Vec<f64>,
    /// The statistics a forward step fills before it can fail; they replace the caller's
    /// [`Saved`](crate::expert::Saved) only when the step succeeds.
    pub(crate) next_saved: crate::forward::Saved,
}

/// Rows per segment and number of segments (per channel for channels-first, in total for
/// channels-last). Depends on the shape only.
pub(crate) fn segments(g: Geometry) -> (usize, usize) {
    let rps = if g.inner == 1 {
        // Channels-last: about 256K values per segment, so that wide rows (C = 1024: 256
        // rows) still give few per-channel merges; still one segment per thread or more
        // for any batch of a few MB.
        (CL_SEGMENT / g.channels.max(1)).max(1)
    } else {
        rows_per_task(g.inner)
    };
    (rps, g.outer.div_ceil(rps))
}

/// Values per channels-last reduction segment. Fixed: it shapes the reduction order.
const CL_SEGMENT: usize = 1 << 18;

/// Moments of one segment of one channel (channels-first): rows in order.
fn segment_moments_cf<T: Element>(
    g: Geometry,
    x: &[T],
    ch: usize,
    s: usize,
    rps: usize,
) -> Moments {
    let mut acc = Moments::default();
    for n in s * rps..((s + 1) * rps).min(g.outer) {
        let start = (n * g.channels + ch) * g.inner;
        acc = acc.merge(run_moments(&x[start..start + g.inner], &[]));
    }
    acc
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
    ws.moments.clear();
    ws.moments.resize(nseg * c, Moments::default());
    if g.inner == 1 {
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
        let task = |(t, o): (usize, &mut Moments)| {
            *o = segment_moments_cf(g, x, t / nseg, t % nseg, rps);
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
    dot_impl(g, x, None, dy, center, out, ws, par)
}

/// Per-channel `(Σdz, Σdz·(x − center))` with `dz = dy·[y > 0]` (backward through a ReLU
/// whose output was `y`), over the same segments as [`dot`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn dot_relu<T: Element>(
    g: Geometry,
    x: &[T],
    y: &[T],
    dy: &[T],
    center: &[f64],
    out: &mut [(f64, f64)],
    ws: &mut Workspace,
    par: Parallelism,
) {
    dot_impl(g, x, Some(y), dy, center, out, ws, par)
}

#[allow(clippy::too_many_arguments)]
fn dot_impl<T: Element>(
    g: Geometry,
    x: &[T],
    y: Option<&[T]>,
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
            let (xs, ds) = (&x[range.clone()], &dy[range.clone()]);
            let mut ab = Scratch::<f64>::take(2 * c);
            let (a, b) = ab.split_at_mut(c);
            match y {
                None => rows_dot(xs, ds, c, center, a, b),
                Some(y) => rows_dot_relu(xs, &y[range], ds, c, center, a, b),
            }
            for (p, (av, bv)) in part.iter_mut().zip(a.iter().zip(b.iter())) {
                *p = (*av, *bv);
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
            let (n0, n1) = (s * rps, ((s + 1) * rps).min(g.outer));
            let (start, stride, m) = ((n0 * c + ch) * g.inner, c * g.inner, center[ch]);
            *o = seg_dot(x, y.unwrap_or(&[]), dy, start, stride, n1 - n0, g.inner, m);
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
