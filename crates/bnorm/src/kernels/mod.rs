//! The four memory-bound kernels every batch-norm step is made of, for both loop shapes
//! (channels-first runs and channels-last rows):
//!
//! | kernel | computes | used by |
//! | --- | --- | --- |
//! | [`moments`] | per-channel `(count, mean, M2)` | training forward |
//! | [`affine`] | `y = (x − center)·scale + shift` | every forward |
//! | [`dot`] | per-channel `Σdy`, `Σdy·(x − center)` | backward |
//! | [`affine2`] | `dx = a·dy + b·(x − center) + k` | backward |
//!
//! Reductions are cut into segments fixed by the shape alone (never by the number of
//! threads), each reduced sequentially, then merged in segment order: the result is
//! bitwise identical with 1 thread or 64. Arithmetic is f64 for every storage type.

mod reduce;

pub use reduce::Workspace;
pub(crate) use reduce::{dot, moments};

use rayon::prelude::*;

use crate::element::Element;
use crate::layout::Geometry;
use crate::parallel::Parallelism;

/// Elements per parallel task (and per reduction segment). Fixed: it shapes the
/// reduction order, so it must not depend on the machine.
pub(crate) const SEGMENT: usize = 1 << 15;

/// Elements per block reduced by two passes while in L1.
pub(crate) const BLOCK: usize = 2048;

/// Rows per task for the element-wise kernels: at least one row, about `SEGMENT`
/// elements.
fn rows_per_task(row_len: usize) -> usize {
    (SEGMENT / row_len.max(1)).max(1)
}

/// `y = (x − center[c])·scale[c] + shift[c]` for every element.
pub(crate) fn affine<T: Element>(
    g: Geometry,
    x: &[T],
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
    let rows = rows_per_task(row);
    let body = |(xs, ys): (&[T], &mut [T])| {
        if g.inner == 1 {
            for (xr, yr) in xs.chunks_exact(c).zip(ys.chunks_exact_mut(c)) {
                for ch in 0..c {
                    yr[ch] = T::from_f64((xr[ch].to_f64() - center[ch]) * scale[ch] + shift[ch]);
                }
            }
        } else {
            for (j, (xr, yr)) in xs
                .chunks_exact(g.inner)
                .zip(ys.chunks_exact_mut(g.inner))
                .enumerate()
            {
                let ch = j % c;
                let (m, s, b) = (center[ch], scale[ch], shift[ch]);
                for (xv, yv) in xr.iter().zip(yr.iter_mut()) {
                    *yv = T::from_f64((xv.to_f64() - m) * s + b);
                }
            }
        }
    };
    let chunk = rows * row;
    if par.is_parallel(g.len()) {
        x.par_chunks(chunk)
            .zip(y.par_chunks_mut(chunk))
            .for_each(body);
    } else {
        x.chunks(chunk).zip(y.chunks_mut(chunk)).for_each(body);
    }
}

/// `dx = a[c]·dy + b[c]·(x − center[c]) + k[c]` for every element.
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
    par: Parallelism,
) {
    let c = g.channels;
    if g.is_empty() {
        return;
    }
    let row = c * g.inner;
    let chunk = rows_per_task(row) * row;
    let body = |((xs, ds), os): ((&[T], &[T]), &mut [T])| {
        if g.inner == 1 {
            for ((xr, dr), or) in xs
                .chunks_exact(c)
                .zip(ds.chunks_exact(c))
                .zip(os.chunks_exact_mut(c))
            {
                for ch in 0..c {
                    or[ch] = T::from_f64(
                        a[ch] * dr[ch].to_f64() + b[ch] * (xr[ch].to_f64() - center[ch]) + k[ch],
                    );
                }
            }
        } else {
            for (j, ((xr, dr), or)) in xs
                .chunks_exact(g.inner)
                .zip(ds.chunks_exact(g.inner))
                .zip(os.chunks_exact_mut(g.inner))
                .enumerate()
            {
                let ch = j % c;
                let (m, av, bv, kv) = (center[ch], a[ch], b[ch], k[ch]);
                for ((xv, dv), ov) in xr.iter().zip(dr).zip(or.iter_mut()) {
                    *ov = T::from_f64(av * dv.to_f64() + bv * (xv.to_f64() - m) + kv);
                }
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
