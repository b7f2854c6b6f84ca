//! The fused channels-first passes: the training forward ([`train_fused_cf`]: a
//! channel's moments, then its normalization while its rows are still in cache) and the
//! backward ([`backward_fused_cf`]: a channel's sums, then its map), a few channels per
//! task ([`fused_channels`]). Each channel's reduction keeps exactly the order of the
//! unfused kernel ([`moments`](super::moments), [`dot`](super::dot)), so fusing never
//! changes a bit.

use super::backward_map::{run_affine2_nt, run_affine2_relu_nt};
use super::coefs::Affine2At;
use super::forward_map::{run_affine_ep, Ep};
use super::frame::PairLanes;
use super::schedule::segments;
use super::simd::Isa;
use super::stats::by_level::{run_into, run_moments};
use super::stats::{short_runs, ShortRuns};
use super::sums::by_level::{dot_row, seg_dot};
use super::sums::{DotIn, Seg};
use super::Out;
use super::{stream_fence, stream_wanted};
use crate::element::Element;
use crate::layout::Geometry;
use crate::parallel::{self, Parallelism, SendPtr};
use crate::stats::Moments;

/// Channels-first training forward, one channel per task: the channel's moments (same
/// segments and merge order as [`moments`], so the same bits), then its normalization
/// with `coef(channel, moments) = (center, scale, shift)` while the channel's rows are
/// still in cache. Writes every element of `y` and the moments of every channel to `out`.
///
/// [`moments`]: super::moments
pub(crate) fn train_fused_cf<T: Element, F>(
    g: Geometry,
    x: &[T],
    ep: Ep<'_, T>,
    y: &mut Out<T>,
    out: &mut [Moments],
    par: Parallelism,
    coef: F,
) where
    F: Fn(usize, Moments) -> (f64, f64, f64) + Sync,
{
    assert!(g.inner > 1 && x.len() == g.len() && y.len() == g.len() && out.len() == g.channels);
    let c = g.channels;
    let inner = g.inner;
    let isa = Isa::of_call();
    let nt = stream_wanted::<T>(y.len());
    let group = fused_channels::<T>(g, 1);
    let y_ptr = SendPtr(y.as_mut_ptr());
    // A task takes a few neighbouring channels, so that each sample's rows of the group
    // are one contiguous stretch of memory for both passes; each channel's moments are
    // still merged in the canonical order of [`moments`] (rows, then segments).
    let task = |(gi, outs): (usize, &mut [Moments])| {
        let c0 = gi * group;
        let w = outs.len();
        let (rps, nseg) = segments(g);
        let mut acc = [Moments::default(); FUSE_GROUP];
        for s in 0..nseg {
            let rows = s * rps..((s + 1) * rps).min(g.outer);
            let seg = segment_moments(isa, g, x, (c0, w), rows);
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
                run_affine_ep(
                    isa,
                    &x[start..start + inner],
                    e,
                    yr,
                    (center, scale, shift),
                    nt,
                );
            }
        }
        if nt {
            stream_fence();
        }
    };
    parallel::chunks(par, g.len(), out, group, |i, o| task((i, o)));
}

/// The moments of one segment (`rows`) of the `w` channels from `c0`, in the order and
/// with the arithmetic of the unfused `segment_moments_cf` for each channel (same bits):
/// short runs summed a segment at a time ([`ShortRuns`]; block by block again for a
/// channel whose shift cancels too much), longer ones block by block and merged. The
/// samples are walked in order with the group's rows of each (one contiguous stretch).
fn segment_moments<T: Element>(
    isa: Isa,
    g: Geometry,
    x: &[T],
    (c0, w): (usize, usize),
    rows: std::ops::Range<usize>,
) -> [Moments; FUSE_GROUP] {
    let (c, inner) = (g.channels, g.inner);
    let start = |n: usize, j: usize| (n * c + c0 + j) * inner;
    // The channel's row of the next sample, prefetched alongside.
    let next = |st: usize| x.get(st + c * inner..st + (c + 1) * inner).unwrap_or(&[]);
    let mut seg = [Moments::default(); FUSE_GROUP];
    let mut redo = [!short_runs(g) || rows.is_empty(); FUSE_GROUP];
    if !redo[0] {
        let mut sums: [ShortRuns; FUSE_GROUP] = std::array::from_fn(|j| {
            ShortRuns::new(if j < w {
                x[start(rows.start, j)].to_f64()
            } else {
                0.0
            })
        });
        for n in rows.clone() {
            for (j, acc) in sums[..w].iter_mut().enumerate() {
                let st = start(n, j);
                run_into(isa, &x[st..st + inner], next(st), acc);
            }
        }
        for j in 0..w {
            match sums[j].moments() {
                Some(m) => seg[j] = m,
                None => redo[j] = true,
            }
        }
    }
    for n in rows {
        for j in (0..w).filter(|&j| redo[j]) {
            let st = start(n, j);
            seg[j] = seg[j].merge(run_moments(isa, &x[st..st + inner], next(st)));
        }
    }
    seg
}

/// Channels-first backward, a few channels per task: the per-channel sums
/// `(Σdz, Σdz·(x − center))` in exactly the order of [`dot`], then the map
/// `dx = a·dz + b·(x − m) + k` given by `coef(channel, sums)` (its center `m`, normally
/// `center`'s, and arithmetic included) while the group's rows of x and dy are still in
/// cache. `dz = dy`, or `dy·[y > 0]` through a ReLU whose output was `y` (`inp.relu_y`, as
/// [`dot`] and [`affine2`]); `dres`, when not empty, receives that masked gradient.
/// Writes every element of `dx` and the sums of every channel to `out`.
///
/// [`dot`]: super::dot
/// [`affine2`]: super::affine2
pub(crate) fn backward_fused_cf<T: Element, F>(
    g: Geometry,
    inp: DotIn<'_, T>,
    center: &[f64],
    out: &mut [(f64, f64)],
    (dx, dres): (&mut Out<T>, &mut Out<T>),
    par: Parallelism,
    coef: F,
) where
    F: Fn(usize, (f64, f64)) -> Affine2At + Sync,
{
    let DotIn { x, dy, relu_y: y } = inp;
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
    let isa = Isa::of_call();
    assert!(y.is_none_or(|y| y.len() == g.len()) && (dres.is_empty() || dres.len() == g.len()));
    assert!(y.is_some() || dres.is_empty());
    let with_res = !dres.is_empty();
    let nt = stream_wanted::<T>(dx.len());
    let group = fused_channels::<T>(g, if y.is_some() { 3 } else { 2 });
    let dx_ptr = SendPtr(dx.as_mut_ptr());
    let dres_ptr = SendPtr(dres.as_mut_ptr());
    let task = |(gi, outs): (usize, &mut [(f64, f64)])| {
        let c0 = gi * group;
        let w = outs.len();
        let (rps, nseg) = segments(g);
        let mut tot = [(0.0f64, 0.0f64); FUSE_GROUP];
        for s in 0..nseg {
            let (n0, n1) = (s * rps, ((s + 1) * rps).min(g.outer));
            if inner >= INTERLEAVE_ROWS {
                // Long rows: the group's rows in memory order (sample by sample), each
                // channel's lanes kept in memory between its rows.
                let mut lanes = [PairLanes::ZERO; FUSE_GROUP];
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
                        dot_row(isa, l, &x[r.clone()], ys, &dy[r], m, &next);
                    }
                }
                for (t, l) in tot[..w].iter_mut().zip(&lanes[..w]) {
                    let (pa, pb) = l.sums();
                    *t = (t.0 + pa, t.1 + pb);
                }
            } else {
                // Short rows: channel by channel, the lanes in registers.
                for (j, t) in tot[..w].iter_mut().enumerate() {
                    let seg = Seg {
                        start: (n0 * c + c0 + j) * inner,
                        stride: c * inner,
                        rows: n1 - n0,
                        len: inner,
                    };
                    let ys = y.unwrap_or(&[]);
                    let (pa, pb) = seg_dot(isa, x, ys, dy, seg, center[c0 + j]);
                    *t = (t.0 + pa, t.1 + pb);
                }
            }
        }
        let mut coefs = [Affine2At::default(); FUSE_GROUP];
        for j in 0..w {
            outs[j] = tot[j];
            coefs[j] = coef(c0 + j, tot[j]);
        }
        let (ptr, rptr) = (dx_ptr, dres_ptr);
        for n in 0..g.outer {
            for (j, &at) in coefs[..w].iter().enumerate() {
                let start = (n * c + c0 + j) * inner;
                let r = start..start + inner;
                // SAFETY: `start + inner <= g.len() == dx.len()` (asserted above), and the
                // row `(n, c0 + j)` belongs to this task's channels alone: tasks of
                // different channel groups write disjoint rows of `dx`, which the caller
                // borrows exclusively for this call.
                let dr = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(start), inner) };
                match y {
                    None => run_affine2_nt(isa, &x[r.clone()], &dy[r], dr, at, nt),
                    Some(y) => {
                        let rr: &mut Out<T> = if with_res {
                            // SAFETY: as for `dr`: `dres` has the length of `dx` (asserted
                            // above when not empty) and the row belongs to this task.
                            unsafe { std::slice::from_raw_parts_mut(rptr.0.add(start), inner) }
                        } else {
                            &mut []
                        };
                        let (xs, ys) = (&x[r.clone()], &y[r.clone()]);
                        run_affine2_relu_nt(isa, xs, (ys, rr), &dy[r], dr, at, nt);
                    }
                }
            }
        }
        if nt {
            stream_fence();
        }
    };
    parallel::chunks(par, g.len(), out, group, |i, o| task((i, o)));
}

/// Row length from which the fused backward reads a group's rows in memory order (the
/// lanes of its channels' sums in memory between rows) rather than channel by channel
/// (the lanes in registers): same bits either way ([`PairLanes`]). Measured on the
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
