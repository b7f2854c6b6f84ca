//! The memory-bound kernels every batch-norm step is made of, for both loop shapes
//! (channels-first runs and channels-last rows):
//!
//! | kernel | computes | used by |
//! | --- | --- | --- |
//! | [`moments`] | per-channel `(count, mean, M2)` | training forward |
//! | [`affine_ep`] | `y = (x − center)·scale + shift`, then ReLU or add + ReLU | every forward |
//! | [`train_fused_cf`] | both, channel by channel, the second pass from cache | channels-first training forward |
//! | [`dot`] | per-channel `Σdy`, `Σdy·(x − center)` | backward |
//! | [`affine2`] | `dx = a·dy + b·(x − center) + k` | backward |
//! | [`backward_fused_cf`] | both backward passes, channel by channel, the second from cache | channels-first backward |
//! | [`dot_relu`], [`affine2_relu`] | the same through a ReLU (mask from its output) | fused backward |
//! | `stream` | the forward and backward maps with streaming stores (same bits) | f32 outputs of 16 MB and more |
//!
//! Reductions are cut into segments fixed by the shape alone (never by the number of
//! threads), each reduced sequentially, then merged in segment order: the result is
//! bitwise identical with 1 thread or 64, and the fused kernel follows the same order.
//! Reductions run in f64 for every storage type; the forward maps run in f64 for f64
//! storage and in f32 (the center split in two parts) for the others; the backward maps in
//! f64 for f32 and f64 storage, in f32 for f16 and bf16. The inner loops ([`inner`]) are compiled for
//! several instruction sets and picked at run time ([`simd`]).

mod inner;
mod reduce;
pub(crate) mod simd;
mod stream;

pub use reduce::Workspace;
pub(crate) use reduce::{dot, dot_relu, moments};
pub use simd::{simd_level, with_simd_level, SimdLevel};

use rayon::prelude::*;

use crate::element::Element;
use crate::layout::Geometry;
use crate::parallel::Parallelism;
use crate::stats::Moments;
use inner::DotLanes;

/// Elements per parallel task (and per reduction segment). Fixed: it shapes the
/// reduction order, so it must not depend on the machine.
pub(crate) const SEGMENT: usize = 1 << 15;

/// Elements per block reduced by two passes while in L1.
pub(crate) const BLOCK: usize = 2048;

simd::dispatch! {
    fn run_moments<T>(xs: &[T], next: &[T]) -> Moments;
    fn seg_dot<T>(x: &[T], y: &[T], dy: &[T], start: usize, stride: usize, rows: usize, len: usize, m: f64) -> (f64, f64);
    fn dot_row<T>(acc: &mut DotLanes, xs: &[T], ys: &[T], ds: &[T], m: f64, next: &[&[T]]);
    fn run_affine<T>(xs: &[T], ys: &mut [T], m: f64, s: f64, b: f64);
    fn run_affine2<T>(xs: &[T], ds: &[T], os: &mut [T], m: f64, a: f64, b: f64, k: f64, narrow: bool);
    fn rows_moments<T>(rows: &[T], c: usize, out: &mut [Moments]);
    fn rows_dot<T>(xs: &[T], ds: &[T], c: usize, center: &[f64], sa: &mut [f64], sb: &mut [f64]);
    fn rows_affine<T>(xs: &[T], ys: &mut [T], c: usize, center: &[f64], scale: &[f64], shift: &[f64]);
    fn rows_affine2<T>(xs: &[T], ds: &[T], os: &mut [T], c: usize, center: &[f64], a: &[f64], b: &[f64], k: &[f64], narrow: bool);
    fn run_affine_relu<T>(xs: &[T], ys: &mut [T], m: f64, s: f64, b: f64);
    fn run_affine_add_relu<T>(xs: &[T], rs: &[T], ys: &mut [T], m: f64, s: f64, b: f64);
    fn rows_affine_relu<T>(xs: &[T], rs: &[T], ys: &mut [T], c: usize, center: &[f64], scale: &[f64], shift: &[f64]);
    fn run_affine2_relu<T>(xs: &[T], ys: &[T], ds: &[T], os: &mut [T], rs: &mut [T], m: f64, a: f64, b: f64, k: f64, narrow: bool);
    fn rows_dot_relu<T>(xs: &[T], ys: &[T], ds: &[T], c: usize, center: &[f64], sa: &mut [f64], sb: &mut [f64]);
    fn rows_affine2_relu<T>(xs: &[T], ys: &[T], ds: &[T], os: &mut [T], rs: &mut [T], c: usize, center: &[f64], a: &[f64], b: &[f64], k: &[f64], narrow: bool);
}

/// What follows the normalization in the same pass.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ep<'a, T> {
    /// Nothing: `y = bn(x)`.
    None,
    /// `y = relu(bn(x))`.
    Relu,
    /// `y = relu(bn(x) + r)`.
    AddRelu(&'a [T]),
}

impl<'a, T> Ep<'a, T> {
    /// The same epilogue restricted to `range` of the flat tensor.
    pub(crate) fn slice(&self, range: std::ops::Range<usize>) -> Ep<'a, T> {
        match *self {
            Ep::AddRelu(r) => Ep::AddRelu(&r[range]),
            Ep::None => Ep::None,
            Ep::Relu => Ep::Relu,
        }
    }
}

/// One contiguous run with its epilogue; with streaming stores when `stream` (and the
/// type and CPU allow them: same bits).
#[inline]
fn run_affine_ep<T: Element>(
    xs: &[T],
    ep: Ep<'_, T>,
    ys: &mut [T],
    (m, s, b): (f64, f64, f64),
    stream: bool,
) {
    if stream {
        let (res, relu) = match ep {
            Ep::None => (None, false),
            Ep::Relu => (None, true),
            Ep::AddRelu(r) => (Some(r), true),
        };
        if stream::affine(xs, res, ys, inner::affine_coefs_f32(m, s, b), relu) {
            return;
        }
    }
    match ep {
        Ep::None => run_affine(xs, ys, m, s, b),
        Ep::Relu => run_affine_relu(xs, ys, m, s, b),
        Ep::AddRelu(r) => run_affine_add_relu(xs, r, ys, m, s, b),
    }
}

/// [`run_affine2`], with streaming stores when `stream` (same bits).
#[inline]
fn run_affine2_nt<T: Element>(
    xs: &[T],
    ds: &[T],
    os: &mut [T],
    (m, a, b, k): (f64, f64, f64, f64),
    narrow: bool,
    stream: bool,
) {
    if !(stream && stream::affine2(xs, None, ds, os, coefs2(m, a, b, k, narrow))) {
        run_affine2(xs, ds, os, m, a, b, k, narrow);
    }
}

/// The coefficients of one channel's backward map for the streaming kernels, in the
/// arithmetic the ordinary map would use.
fn coefs2(m: f64, a: f64, b: f64, k: f64, narrow: bool) -> stream::Coefs2 {
    if narrow {
        stream::Coefs2::F32(inner::affine2_coefs_f32(m, a, b, k))
    } else {
        stream::Coefs2::F64(inner::affine2_coefs_f64(m, a, b, k))
    }
}

/// [`run_affine2_relu`], with streaming stores when `stream` (same bits).
#[inline]
#[allow(clippy::too_many_arguments)]
fn run_affine2_relu_nt<T: Element>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    os: &mut [T],
    rs: &mut [T],
    (m, a, b, k): (f64, f64, f64, f64),
    narrow: bool,
    stream: bool,
) {
    let coefs = || coefs2(m, a, b, k, narrow);
    if !(stream && stream::affine2(xs, Some((ys, &mut *rs)), ds, os, coefs())) {
        run_affine2_relu(xs, ys, ds, os, rs, m, a, b, k, narrow);
    }
}

/// Rows per task for the element-wise kernels: at least one row, about `SEGMENT`
/// elements.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (SEGMENT / row_len.max(1)).max(1)
}

/// `y = (x − center[c])·scale[c] + shift[c]` for every element, followed by an epilogue
/// in the same pass.
#[allow(clippy::too_many_arguments)]
pub(crate) fn affine_ep<T: Element>(
    g: Geometry,
    x: &[T],
    ep: Ep<'_, T>,
    center: &[f64],
    scale: &[f64],
    shift: &[f64],
    y: &mut [T],
    par: Parallelism,
) {
    debug_assert_eq!(x.len(), g.len());
    debug_assert_eq!(y.len(), g.len());
    let c = g.channels;
    if g.is_empty() {
        return;
    }
    let row = c * g.inner;
    let chunk = rows_per_task(row) * row;
    let nt = stream::wanted::<T>(y.len());
    // The channels-last streaming kernels' coefficient table, built once for all tasks.
    let table = (nt && g.inner == 1).then(|| inner::affine_table_f32(c, center, scale, shift));
    let body = |(i, (xs, ys)): (usize, (&[T], &mut [T]))| {
        let ep = ep.slice(i * chunk..i * chunk + xs.len());
        if g.inner == 1 {
            if let Some(t) = &table {
                let (res, relu) = match ep {
                    Ep::None => (None, false),
                    Ep::Relu => (None, true),
                    Ep::AddRelu(r) => (Some(r), true),
                };
                if stream::rows_affine(xs, res, ys, (&t.0, t.1), relu) {
                    stream::fence();
                    return;
                }
            }
            match ep {
                Ep::None => rows_affine(xs, ys, c, center, scale, shift),
                Ep::Relu => rows_affine_relu(xs, &[], ys, c, center, scale, shift),
                Ep::AddRelu(r) => rows_affine_relu(xs, r, ys, c, center, scale, shift),
            }
        } else {
            for (j, (xr, yr)) in xs
                .chunks_exact(g.inner)
                .zip(ys.chunks_exact_mut(g.inner))
                .enumerate()
            {
                let ch = j % c;
                let e = ep.slice(j * g.inner..(j + 1) * g.inner);
                run_affine_ep(xr, e, yr, (center[ch], scale[ch], shift[ch]), nt);
            }
            if nt {
                stream::fence();
            }
        }
    };
    if par.is_parallel(g.len()) {
        x.par_chunks(chunk)
            .zip(y.par_chunks_mut(chunk))
            .enumerate()
            .for_each(body);
    } else {
        x.chunks(chunk)
            .zip(y.chunks_mut(chunk))
            .enumerate()
            .for_each(body);
    }
}

/// One task's slices of x, y, dy and dx.
type Chunk4<'a, T> = (((&'a [T], &'a [T]), &'a [T]), &'a mut [T]);

/// Backward through batch norm and a ReLU whose output was `y` (and an added residual,
/// whose gradient `dres` receives when not empty): `dz = dy·[y > 0]`,
/// `dx = a·dz + b·(x − center) + k`; f32 storage in f32 arithmetic when `narrow`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn affine2_relu<T: Element>(
    g: Geometry,
    x: &[T],
    y: &[T],
    dy: &[T],
    center: &[f64],
    a: &[f64],
    b: &[f64],
    k: &[f64],
    dx: &mut [T],
    dres: &mut [T],
    narrow: bool,
    par: Parallelism,
) {
    let c = g.channels;
    if g.is_empty() {
        return;
    }
    let row = c * g.inner;
    let chunk = rows_per_task(row) * row;
    let with_res = !dres.is_empty();
    let nt = stream::wanted::<T>(dx.len());
    let table = (nt && g.inner == 1).then(|| stream::Table2::new(c, center, a, b, k, narrow));
    let body = |(((xs, ys), ds), os): Chunk4<'_, T>, rs: &mut [T]| {
        if g.inner == 1 {
            if let Some(t) = &table {
                if stream::rows_affine2(xs, Some((ys, &mut *rs)), ds, os, t) {
                    stream::fence();
                    return;
                }
            }
            rows_affine2_relu(xs, ys, ds, os, rs, c, center, a, b, k, narrow);
        } else {
            let n = xs.len() / g.inner;
            for j in 0..n {
                let ch = j % c;
                let r = j * g.inner..(j + 1) * g.inner;
                let rr = if with_res {
                    &mut rs[r.clone()]
                } else {
                    &mut [][..]
                };
                let (xs, ys, ds) = (&xs[r.clone()], &ys[r.clone()], &ds[r.clone()]);
                let coefs = (center[ch], a[ch], b[ch], k[ch]);
                run_affine2_relu_nt(xs, ys, ds, &mut os[r], rr, coefs, narrow, nt);
            }
            if nt {
                stream::fence();
            }
        }
    };
    let parallel = par.is_parallel(g.len());
    let it = x.chunks(chunk).zip(y.chunks(chunk)).zip(dy.chunks(chunk));
    match (parallel, with_res) {
        (true, true) => x
            .par_chunks(chunk)
            .zip(y.par_chunks(chunk))
            .zip(dy.par_chunks(chunk))
            .zip(dx.par_chunks_mut(chunk))
            .zip(dres.par_chunks_mut(chunk))
            .for_each(|(t, rs)| body(t, rs)),
        (true, false) => x
            .par_chunks(chunk)
            .zip(y.par_chunks(chunk))
            .zip(dy.par_chunks(chunk))
            .zip(dx.par_chunks_mut(chunk))
            .for_each(|t| body(t, &mut [])),
        (false, true) => it
            .zip(dx.chunks_mut(chunk))
            .zip(dres.chunks_mut(chunk))
            .for_each(|(t, rs)| body(t, rs)),
        (false, false) => it.zip(dx.chunks_mut(chunk)).for_each(|t| body(t, &mut [])),
    }
}

/// `dx = a[c]·dy + b[c]·(x − center[c]) + k[c]` for every element; f32 storage in f32
/// arithmetic when `narrow`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn affine2<T: Element>(
    g: Geometry,
    x: &[T],
    dy: &[T],
    center: &[f64],
    a: &[f64],
    b: &[f64],
    k: &[f64],
    dx: &mut [T],
    narrow: bool,
    par: Parallelism,
) {
    let c = g.channels;
    if g.is_empty() {
        return;
    }
    let row = c * g.inner;
    let chunk = rows_per_task(row) * row;
    let nt = stream::wanted::<T>(dx.len());
    let table = (nt && g.inner == 1).then(|| stream::Table2::new(c, center, a, b, k, narrow));
    let body = |((xs, ds), os): ((&[T], &[T]), &mut [T])| {
        if g.inner == 1 {
            if let Some(t) = &table {
                if stream::rows_affine2(xs, None, ds, os, t) {
                    stream::fence();
                    return;
                }
            }
            rows_affine2(xs, ds, os, c, center, a, b, k, narrow);
        } else {
            for (j, ((xr, dr), or)) in xs
                .chunks_exact(g.inner)
                .zip(ds.chunks_exact(g.inner))
                .zip(os.chunks_exact_mut(g.inner))
                .enumerate()
            {
                let ch = j % c;
                run_affine2_nt(xr, dr, or, (center[ch], a[ch], b[ch], k[ch]), narrow, nt);
            }
            if nt {
                stream::fence();
            }
        }
    };
    if par.is_parallel(g.len()) {
        x.par_chunks(chunk)
            .zip(dy.par_chunks(chunk))
            .zip(dx.par_chunks_mut(chunk))
            .for_each(body);
    } else {
        x.chunks(chunk)
            .zip(dy.chunks(chunk))
            .zip(dx.chunks_mut(chunk))
            .for_each(body);
    }
}

/// A raw pointer that may cross threads; see the SAFETY notes where it is dereferenced.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: the pointer is only used to build disjoint sub-slices of one `&mut [T]`
// (rows of distinct channels) while that exclusive borrow is held by the caller.
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above; no two threads ever form overlapping slices.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// Channels-first training forward, one channel per task: the channel's moments (same
/// segments and merge order as [`moments`], so the same bits), then its normalization
/// with `coef(channel, moments) = (center, scale, shift)` while the channel's rows are
/// still in cache. Writes every element of `y` and the moments of every channel to `out`.
pub(crate) fn train_fused_cf<T: Element, F>(
    g: Geometry,
    x: &[T],
    ep: Ep<'_, T>,
    y: &mut [T],
    out: &mut [Moments],
    par: Parallelism,
    coef: F,
) where
    F: Fn(usize, Moments) -> (f64, f64, f64) + Sync,
{
    assert!(g.inner > 1 && x.len() == g.len() && y.len() == g.len() && out.len() == g.channels);
    let c = g.channels;
    let inner = g.inner;
    let nt = stream::wanted::<T>(y.len());
    let group = fused_channels::<T>(g, 1);
    let y_ptr = SendPtr(y.as_mut_ptr());
    // A task takes a few neighbouring channels, so that each sample's rows of the group
    // are one contiguous stretch of memory for both passes; each channel's moments are
    // still merged in the canonical order of [`moments`] (rows, then segments).
    let task = |(gi, outs): (usize, &mut [Moments])| {
        let c0 = gi * group;
        let w = outs.len();
        let (rps, nseg) = reduce::segments(g);
        let mut acc = [Moments::default(); FUSE_GROUP];
        for s in 0..nseg {
            let mut seg = [Moments::default(); FUSE_GROUP];
            for n in s * rps..((s + 1) * rps).min(g.outer) {
                for (j, m) in seg[..w].iter_mut().enumerate() {
                    let start = (n * c + c0 + j) * inner;
                    // The channel's row of the next sample, prefetched alongside.
                    let next = x.get(start + c * inner..start + (c + 1) * inner);
                    *m = m.merge(run_moments(&x[start..start + inner], next.unwrap_or(&[])));
                }
            }
            for (a, m) in acc[..w].iter_mut().zip(&seg[..w]) {
                *a = a.merge(*m);
            }
        }
        let mut coefs = [(0.0, 0.0, 0.0); FUSE_GROUP];
        for j in 0..w {
            outs[j] = acc[j];
            coefs[j] = coef(c0 + j, acc[j]);
        }
        let ptr = y_ptr;
        for n in 0..g.outer {
            for (j, &(center, scale, shift)) in coefs[..w].iter().enumerate() {
                let start = (n * c + c0 + j) * inner;
                // SAFETY: `start + inner <= g.len() == y.len()` (asserted above), and the
                // row `(n, c0 + j)` belongs to this task's channels alone: tasks of
                // different channel groups write disjoint rows of `y`, which the caller
                // borrows exclusively for this call.
                let yr = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(start), inner) };
                let e = ep.slice(start..start + inner);
                run_affine_ep(&x[start..start + inner], e, yr, (center, scale, shift), nt);
            }
        }
        if nt {
            stream::fence();
        }
    };
    if par.is_parallel(g.len()) {
        out.par_chunks_mut(group).enumerate().for_each(task);
    } else {
        out.chunks_mut(group).enumerate().for_each(task);
    }
}

/// Channels-first backward, a few channels per task: the per-channel sums
/// `(Σdy, Σdy·(x − center))` in exactly the order of [`dot`], then
/// `dx = a·dy + b·(x − center) + k` with `coef(channel, sums) = (a, b, k)` while the
/// group's rows of x and dy are still in cache. With `relu = Some((y, dres))` the same
/// through a ReLU whose output was `y` (`dy·[y > 0]` in place of `dy`, as [`dot_relu`]
/// and [`affine2_relu`]; `dres`, when not empty, receives that masked gradient). The map
/// in f32 for f32 storage when `narrow`. Writes every element of `dx` and the sums of
/// every channel to `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_fused_cf<T: Element, F>(
    g: Geometry,
    x: &[T],
    dy: &[T],
    relu: Option<(&[T], &mut [T])>,
    center: &[f64],
    out: &mut [(f64, f64)],
    dx: &mut [T],
    narrow: bool,
    par: Parallelism,
    coef: F,
) where
    F: Fn(usize, (f64, f64)) -> (f64, f64, f64) + Sync,
{
    assert!(
        g.inner > 1
            && x.len() == g.len()
            && dy.len() == g.len()
            && dx.len() == g.len()
            && out.len() == g.channels
            && center.len() >= g.channels
    );
    let c = g.channels;
    let inner = g.inner;
    let (y, dres) = match relu {
        Some((y, dres)) => {
            assert!(y.len() == g.len() && (dres.is_empty() || dres.len() == g.len()));
            (Some(y), dres)
        }
        None => (None, &mut [][..]),
    };
    let with_res = !dres.is_empty();
    let nt = stream::wanted::<T>(dx.len());
    let group = fused_channels::<T>(g, if y.is_some() { 3 } else { 2 });
    let dx_ptr = SendPtr(dx.as_mut_ptr());
    let dres_ptr = SendPtr(dres.as_mut_ptr());
    let task = |(gi, outs): (usize, &mut [(f64, f64)])| {
        let c0 = gi * group;
        let w = outs.len();
        let (rps, nseg) = reduce::segments(g);
        let mut tot = [(0.0f64, 0.0f64); FUSE_GROUP];
        for s in 0..nseg {
            let (n0, n1) = (s * rps, ((s + 1) * rps).min(g.outer));
            if inner >= INTERLEAVE_ROWS {
                // Long rows: the group's rows in memory order (sample by sample), each
                // channel's lanes kept in memory between its rows.
                let mut lanes = [DotLanes::ZERO; FUSE_GROUP];
                for n in n0..n1 {
                    for (j, l) in lanes[..w].iter_mut().enumerate() {
                        let start = (n * c + c0 + j) * inner;
                        let r = start..start + inner;
                        let m = center[c0 + j];
                        let ys = y.map_or(&[][..], |y| &y[r.clone()]);
                        // The channel's rows of the next sample, prefetched alongside.
                        let nr = start + c * inner..start + (c + 1) * inner;
                        let next = match (x.get(nr.clone()), dy.get(nr.clone()), y) {
                            (Some(xn), Some(dn), Some(y)) => [xn, dn, &y[nr]],
                            (Some(xn), Some(dn), None) => [xn, dn, &[]],
                            _ => [&[][..]; 3],
                        };
                        dot_row(l, &x[r.clone()], ys, &dy[r], m, &next);
                    }
                }
                for (t, l) in tot[..w].iter_mut().zip(&lanes[..w]) {
                    let (pa, pb) = l.sums();
                    *t = (t.0 + pa, t.1 + pb);
                }
            } else {
                // Short rows: channel by channel, the lanes in registers.
                for (j, t) in tot[..w].iter_mut().enumerate() {
                    let (start, m) = ((n0 * c + c0 + j) * inner, center[c0 + j]);
                    let ys = y.unwrap_or(&[]);
                    let (pa, pb) = seg_dot(x, ys, dy, start, c * inner, n1 - n0, inner, m);
                    *t = (t.0 + pa, t.1 + pb);
                }
            }
        }
        let mut coefs = [(0.0, 0.0, 0.0); FUSE_GROUP];
        for j in 0..w {
            outs[j] = tot[j];
            coefs[j] = coef(c0 + j, tot[j]);
        }
        let (ptr, rptr) = (dx_ptr, dres_ptr);
        for n in 0..g.outer {
            for (j, &(a, b, k)) in coefs[..w].iter().enumerate() {
                let start = (n * c + c0 + j) * inner;
                let r = start..start + inner;
                // SAFETY: `start + inner <= g.len() == dx.len()` (asserted above), and the
                // row `(n, c0 + j)` belongs to this task's channels alone: tasks of
                // different channel groups write disjoint rows of `dx`, which the caller
                // borrows exclusively for this call.
                let dr = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(start), inner) };
                let m = center[c0 + j];
                match y {
                    None => run_affine2_nt(&x[r.clone()], &dy[r], dr, (m, a, b, k), narrow, nt),
                    Some(y) => {
                        let rr: &mut [T] = if with_res {
                            // SAFETY: as for `dr`: `dres` has the length of `dx` (asserted
                            // above when not empty) and the row belongs to this task.
                            unsafe { std::slice::from_raw_parts_mut(rptr.0.add(start), inner) }
                        } else {
                            &mut []
                        };
                        let (xs, ys) = (&x[r.clone()], &y[r.clone()]);
                        run_affine2_relu_nt(xs, ys, &dy[r], dr, rr, (m, a, b, k), narrow, nt);
                    }
                }
            }
        }
        if nt {
            stream::fence();
        }
    };
    if par.is_parallel(g.len()) {
        out.par_chunks_mut(group).enumerate().for_each(task);
    } else {
        out.chunks_mut(group).enumerate().for_each(task);
    }
}

/// Row length from which the fused backward reads a group's rows in memory order (the
/// lanes of its channels' sums in memory between rows) rather than channel by channel
/// (the lanes in registers): same bits either way ([`inner::DotLanes`]). Measured on the
/// 2-core development VM (`step_time`, alternating builds; commit 6606f0f): folding the
/// lanes once per segment instead of once per row made 14×14 rows (S2) 25–30% faster; for
/// 56×56 rows (S1, S5), whose first pass comes from memory, channel by channel was slower
/// than memory order in 4 of 5 and 2 of 2 alternations.
const INTERLEAVE_ROWS: usize = 1024;

/// Most channels per task of the fused channels-first training forward and backward.
pub(crate) const FUSE_GROUP: usize = 4;

/// Bytes of the arrays a fused task reads twice (x for the training forward; x and dy, and
/// y through a ReLU, for the backward), at most: every thread's task must stay in the L3
/// of a small machine between the passes. Measured on the 2-core development VM: with
/// 6.4 MB per task (S5 backward, four channels) the backward reached 0.62–0.63 of the
/// copy rate, with 3.2 MB 0.83 (separate runs of commits 532963b and 11d289a, recorded in
/// c6e94d9). Alternated call by call in one process against 4 MB (commit 53b55ad, the A/B
/// patch in f9ae5b4), 2 MB made the S5 backward (one channel per task instead of two)
/// 6–7% faster, the S1 backward (two instead of four) 2–4% and through a ReLU 4–11%, and
/// left the training forwards unchanged (±3%); 1 MB measured the same as 2 MB.
const FUSE_BYTES: usize = 2 << 20;

/// Channels per task of the fused channels-first training forward and backward for `g`
/// with `arrays` tensors of `T` read twice (x for the training forward; x and dy for the
/// backward, and y through a ReLU): as many as keep those bytes within 2 MB per task, so
/// that every thread's working set stays in a small machine's L3 between the first and
/// the second visit, from 1 to 4. Depends on the shape only, and never changes a result (each
/// channel's sums have a fixed order); `bnorm bench` uses it to model the kernels'
/// memory-traffic floor.
///
/// ```
/// use bnorm::Layout;
/// use bnorm::tuning::fused_channels;
/// let g = Layout::NCHW.geometry(&[64, 128, 56, 56]).unwrap();
/// assert_eq!(fused_channels::<f32>(g, 1), 2); // 800 KB per channel of x
/// assert_eq!(fused_channels::<f32>(g, 2), 1); // x and dy: 1.6 MB
/// ```
pub fn fused_channels<T: Element>(g: Geometry, arrays: usize) -> usize {
    let per_channel = g.outer * g.inner * std::mem::size_of::<T>() * arrays.max(1);
    (FUSE_BYTES / per_channel.max(1)).clamp(1, FUSE_GROUP)
}
