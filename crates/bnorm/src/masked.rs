//! Masked batch normalization, as Keras 3 defines it
//! (`BatchNormalization(...)(x, training=True, mask=m)`): the batch statistics, the
//! running update and the gradient through the statistics cover only the values the mask
//! selects; every value is normalized with them.
//!
//! The mask has the shape of `x` without its last axis and broadcasts along that axis
//! (Keras's `expand_dims(mask, -1)`): for channels-last data (`NLC`, `NHWC`, ...) one flag
//! per position, for channels-first sequences (`NCL`) one flag per (sample, channel); in
//! general element `i` of `x` uses `mask[i / k]`, `k` the length of the last axis. Per
//! channel, with `n` selected values and Keras's `δ = 1e-7` (`keras.backend.epsilon()`):
//!
//! `mean = Σ_sel x / (n + δ)`, `var = Σ_sel (x − mean)² / (n + δ)`,
//! `y = γ·(x − mean)/sqrt(var + eps) + β` for every value.
//!
//! Unlike Keras, a channel with no selected value is refused
//! ([`Error::BatchTooSmall`] with 0 values: Keras normalizes it with mean 0 and variance 0),
//! and one selected value follows the [`SingleValuePolicy`](crate::config::SingleValuePolicy).
//! Only plain batch norm (no renorm, ghost batches, epilogue or synchronization).
//!
//! This path runs at reference speed: one scalar f64 pass for the statistics (the output
//! map is the fast kernel's) and one scalar pass for the gradient.

use std::mem::MaybeUninit;

use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::Geometry;
use crate::state::Params;

/// Keras's `backend.epsilon()`, added to the count of selected values in the divisions.
pub const MASK_EPSILON: f64 = 1e-7;

/// The length `k` of the axis the mask broadcasts along, checked against the geometry:
/// `C` for channels-last data, a divisor of the spatial size for channels-first data.
pub(crate) fn stride(g: Geometry, mask_len: usize) -> Result<usize> {
    let len = g.len();
    let bad = || Error::LengthMismatch {
        what: "mask",
        expected: if g.inner == 1 {
            g.outer
        } else {
            g.outer * g.channels
        },
        got: mask_len,
    };
    if mask_len == 0 || !len.is_multiple_of(mask_len) {
        return Err(bad());
    }
    let k = len / mask_len;
    let fits = (g.inner == 1 && k == g.channels) || g.inner.is_multiple_of(k);
    if !fits {
        return Err(bad());
    }
    Ok(k)
}

/// The channel of element `i`.
#[inline]
fn channel(g: Geometry, i: usize) -> usize {
    (i / g.inner.max(1)) % g.channels
}

/// Per channel `(n, mean, var)` over the selected values, Keras's way.
pub(crate) fn moments<T: Element>(
    g: Geometry,
    x: &[T],
    mask: &[bool],
    k: usize,
) -> Vec<(f64, f64, f64)> {
    let c = g.channels;
    let (mut n, mut s1) = (vec![0.0; c], vec![0.0; c]);
    for (i, v) in x.iter().enumerate() {
        if mask[i / k] {
            let ch = channel(g, i);
            n[ch] += 1.0;
            s1[ch] += v.to_f64();
        }
    }
    let mean: Vec<f64> = (0..c).map(|ch| s1[ch] / (n[ch] + MASK_EPSILON)).collect();
    let mut s2 = vec![0.0; c];
    for (i, v) in x.iter().enumerate() {
        if mask[i / k] {
            let ch = channel(g, i);
            let d = v.to_f64() - mean[ch];
            s2[ch] += d * d;
        }
    }
    (0..c)
        .map(|ch| (n[ch], mean[ch], s2[ch] / (n[ch] + MASK_EPSILON)))
        .collect()
}

/// The gradient of a masked training step: `dγ`, `dβ` and `dx`, the derivative of the
/// whole map above (the statistics depend on the selected values only, every output on
/// the statistics).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Element>(
    g: Geometry,
    x: &[T],
    dy: &[T],
    mask: &[bool],
    k: usize,
    params: &Params,
    (count, mean, invstd): (&[f64], &[f64], &[f64]),
    dx: &mut [MaybeUninit<T>],
    dweight: &mut Vec<f64>,
    dbias: &mut Vec<f64>,
) {
    let c = g.channels;
    let (mut sdy, mut sdyxc) = (vec![0.0; c], vec![0.0; c]);
    for i in 0..x.len() {
        let ch = channel(g, i);
        let d = dy[i].to_f64();
        sdy[ch] += d;
        sdyxc[ch] += d * (x[i].to_f64() - mean[ch]);
    }
    dweight.clear();
    dbias.clear();
    // dx_i = γ·invstd·dy_i + w_i·(p + q·(x_i − mean)) per channel
    let mut pq = Vec::with_capacity(c);
    for ch in 0..c {
        dweight.push(sdyxc[ch] * invstd[ch]);
        dbias.push(sdy[ch]);
        let gamma = params.gamma(ch);
        let den = count[ch] + MASK_EPSILON;
        let dvar = -0.5 * gamma * invstd[ch].powi(3) * sdyxc[ch];
        // var depends on mean through Σ_sel (x − mean) = mean·δ (not 0: n + δ ≠ n)
        let dvar_dmean = -2.0 * mean[ch] * MASK_EPSILON / den;
        let dmean = -gamma * invstd[ch] * sdy[ch] + dvar * dvar_dmean;
        pq.push((dmean / den, 2.0 * dvar / den, gamma * invstd[ch]));
    }
    for i in 0..x.len() {
        let ch = channel(g, i);
        let (p, q, a) = pq[ch];
        let mut v = a * dy[i].to_f64();
        if mask[i / k] {
            v += p + q * (x[i].to_f64() - mean[ch]);
        }
        dx[i].write(T::from_f64(v));
    }
}
