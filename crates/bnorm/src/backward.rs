//! The backward pass: `dx`, `dgamma`, `dbeta` from the input, the upstream gradient and
//! the statistics saved by the forward step.
//!
//! With batch statistics (training), per channel with `m` values, `x̂ = (x − μ)/σ`,
//! `g = γ·r` (`r = 1` unless renormalizing):
//!
//! ```text
//! dβ = Σdy,   dγ = r·Σdy·x̂ + d·Σdy,
//! dx = g/σ · (dy − Σdy/m − x̂·Σ(dy·x̂)/m)
//! ```
//!
//! With running statistics (inference or frozen), `dx = dy·γ/σ_running`, and `dγ`, `dβ`
//! as above with `x̂` from the running statistics. Each is two passes over memory: one
//! reduction (`Σdy`, `Σdy·(x − μ)`), one element-wise map.

use crate::config::BackwardArithmetic;
use crate::config::Config;
use crate::element::{DType, Element};
use crate::error::{Error, Result};
use crate::forward::{check_input, sample_geometry, Normalized, Saved};
use crate::kernels::{self, Workspace};
use crate::layout::Geometry;
use crate::parallel::Parallelism;
use crate::state::Params;

/// Parameter gradients of one backward step, f64, one per channel. Both are computed
/// whether or not the layer has the parameter (`dweight` is then the gradient a gamma
/// would get, `dbias` likewise).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Grads {
    /// dL/dgamma.
    pub dweight: Vec<f64>,
    /// dL/dbeta.
    pub dbias: Vec<f64>,
}

/// Output of the allocating [`backward`].
#[derive(Debug, Clone)]
pub struct Backward<T> {
    /// dL/dx, same shape and layout as x.
    pub dx: Vec<T>,
    /// dL/dgamma, when the layer has gamma.
    pub dweight: Option<Vec<f64>>,
    /// dL/dbeta, when the layer has beta.
    pub dbias: Option<Vec<f64>>,
}

/// Backward pass that allocates its outputs.
///
/// ```
/// use bnorm::{backward, forward, Config, Layout, Mode, Params, RunningState};
/// let cfg = Config::torch(1);
/// let g = Layout::NC.geometry(&[4, 1])?;
/// let x = [1.0f64, 2.0, 4.0, 8.0];
/// let p = Params::init(&cfg);
/// let f = forward(&cfg, g, &x, &p, RunningState::init(&cfg).as_ref(), Mode::Train)?;
/// let b = backward(&cfg, g, &x, &[1.0, 0.0, 0.0, 0.0], &p, &f.saved)?;
/// // the gradient through batch statistics sums to zero over a channel
/// assert!(b.dx.iter().sum::<f64>().abs() < 1e-12);
/// # Ok::<(), bnorm::Error>(())
/// ```
pub fn backward<T: Element>(
    cfg: &Config,
    g: Geometry,
    x: &[T],
    dy: &[T],
    params: &Params,
    saved: &Saved,
) -> Result<Backward<T>> {
    check_input(cfg, g, x.len(), "x")?;
    let mut dx = crate::buffer::output::<T>(x.len());
    let mut grads = Grads::default();
    let mut ws = Workspace::default();
    backward_into(
        cfg,
        g,
        x,
        dy,
        params,
        saved,
        &mut dx,
        &mut grads,
        &mut ws,
        Parallelism::Rayon,
    )?;
    Ok(Backward {
        dx,
        dweight: cfg.has_scale().then_some(grads.dweight),
        dbias: cfg.has_center().then_some(grads.dbias),
    })
}

/// Backward pass into caller buffers. On error nothing has been written.
#[allow(clippy::too_many_arguments)]
pub fn backward_into<T: Element>(
    cfg: &Config,
    g: Geometry,
    x: &[T],
    dy: &[T],
    params: &Params,
    saved: &Saved,
    dx: &mut [T],
    grads: &mut Grads,
    ws: &mut Workspace,
    par: Parallelism,
) -> Result<()> {
    backward_impl(cfg, g, x, dy, None, params, saved, dx, grads, ws, par)
}

/// Backward of [`forward_relu_into`](crate::forward_relu_into): through the ReLU (mask
/// taken from the output `y`, which is all it needs besides what plain backward needs),
/// then through batch norm. With a residual, its gradient (the gradient at the ReLU's
/// input) is written to `dresidual`. Two passes over memory, like plain backward.
#[allow(clippy::too_many_arguments)]
pub fn backward_relu_into<T: Element>(
    cfg: &Config,
    g: Geometry,
    x: &[T],
    y: &[T],
    dy: &[T],
    params: &Params,
    saved: &Saved,
    dx: &mut [T],
    dresidual: Option<&mut [T]>,
    grads: &mut Grads,
    ws: &mut Workspace,
    par: Parallelism,
) -> Result<()> {
    check_input(cfg, g, y.len(), "y")?;
    let dres = match dresidual {
        Some(r) => {
            check_input(cfg, g, r.len(), "dresidual")?;
            r
        }
        None => &mut [][..],
    };
    backward_impl(
        cfg,
        g,
        x,
        dy,
        Some((y, dres)),
        params,
        saved,
        dx,
        grads,
        ws,
        par,
    )
}

/// Checks the arguments of a backward step against each other and the saved statistics.
pub(crate) fn check_backward<T: Element>(
    cfg: &Config,
    g: Geometry,
    x: &[T],
    dy: &[T],
    params: &Params,
    saved: &Saved,
    dx: &[T],
) -> Result<()> {
    params.validate(cfg)?;
    check_input(cfg, g, x.len(), "x")?;
    check_input(cfg, g, dy.len(), "dy")?;
    check_input(cfg, g, dx.len(), "dx")?;
    if saved.geometry != Some(g) {
        return Err(Error::SavedMismatch {
            reason: "the forward step saw another shape (or no forward step ran)",
        });
    }
    let n = saved.groups.max(1) * g.channels;
    if saved.mean.len() != n || saved.invstd.len() != n || saved.count.len() != n {
        return Err(Error::SavedMismatch {
            reason: "saved statistics have another channel count",
        });
    }
    Ok(())
}

/// From per (group, channel) sums `(Σdz, Σdz·(x − μ))`: accumulates `dγ`, `dβ` into
/// `grads` (zeroed first) and fills `coef` with `[a | b | k]`, the coefficients of
/// `dx = a·dz + b·(x − μ) + k` (b = k = 0 for steps normalized with running statistics).
pub(crate) fn coefficients(
    g: Geometry,
    params: &Params,
    saved: &Saved,
    sums: &[(f64, f64)],
    grads: &mut Grads,
    coef: &mut Vec<f64>,
) {
    let c = g.channels;
    let n = sums.len();
    grads.dweight.clear();
    grads.dweight.resize(c, 0.0);
    grads.dbias.clear();
    grads.dbias.resize(c, 0.0);
    coef.clear();
    coef.resize(3 * n, 0.0);
    let (a, rest) = coef.split_at_mut(n);
    let (b, k) = rest.split_at_mut(n);
    for i in 0..n {
        let ch = i % c;
        let one = channel_coefficients(g, params, saved, i, sums[i]);
        grads.dbias[ch] += one.dbias;
        grads.dweight[ch] += one.dweight;
        (a[i], b[i], k[i]) = (one.a, one.b, one.k);
    }
}

/// What one (group, channel) contributes: its share of `dγ`, `dβ` and the coefficients of
/// `dx = a·dz + b·(x − μ) + k`.
pub(crate) struct ChannelCoefficients {
    pub dweight: f64,
    pub dbias: f64,
    pub a: f64,
    pub b: f64,
    pub k: f64,
}

/// The backward formulas for (group, channel) `i` from its sums `(Σdz, Σdz·(x − μ))`.
#[inline]
pub(crate) fn channel_coefficients(
    g: Geometry,
    params: &Params,
    saved: &Saved,
    i: usize,
    (sdy, sdyxc): (f64, f64),
) -> ChannelCoefficients {
    let ch = i % g.channels;
    let (r, d) = if saved.r.is_empty() {
        (1.0, 0.0)
    } else {
        (saved.r[ch], saved.d[ch])
    };
    let invstd = saved.invstd[i];
    let dot_xhat = sdyxc * invstd;
    let gain = params.gamma(ch) * r;
    let (mut b, mut k) = (0.0, 0.0);
    if saved.normalized == Normalized::Batch {
        let m = if saved.count[i] > 0.0 {
            saved.count[i]
        } else {
            g.per_channel() as f64
        };
        b = -gain * invstd * invstd * dot_xhat / m;
        k = -gain * invstd * sdy / m;
    }
    ChannelCoefficients {
        dweight: r * dot_xhat + d * sdy,
        dbias: sdy,
        a: gain * invstd,
        b,
        k,
    }
}

/// Whether the element-wise map of `dx` runs in f32 for storage `T`: f32 storage with
/// [`BackwardArithmetic::F32`] (16-bit storage always maps in f32, f64 in f64).
pub(crate) fn f32_map<T: Element>(cfg: &Config) -> bool {
    T::DTYPE == DType::F32 && cfg.backward_arithmetic_kind() == BackwardArithmetic::F32
}

#[allow(clippy::too_many_arguments)]
fn backward_impl<T: Element>(
    cfg: &Config,
    g: Geometry,
    x: &[T],
    dy: &[T],
    relu: Option<(&[T], &mut [T])>,
    params: &Params,
    saved: &Saved,
    dx: &mut [T],
    grads: &mut Grads,
    ws: &mut Workspace,
    par: Parallelism,
) -> Result<()> {
    check_backward(cfg, g, x, dy, params, saved, dx)?;
    let c = g.channels;
    let narrow = f32_map::<T>(cfg);
    let groups = saved.groups.max(1);
    let mut sums = std::mem::take(&mut ws.tmp_pairs);
    sums.clear();
    sums.resize(groups * c, (0.0, 0.0));
    let ghost = groups > 1 || !saved.group_of.is_empty();
    let (y, dres): (Option<&[T]>, &mut [T]) = match relu {
        Some((y, d)) => (Some(y), d),
        None => (None, &mut []),
    };
    // Channels-first backward (plain or through the ReLU): sums and dx per group of
    // channels, the second pass from cache (same sums, in the same order, as the two-pass
    // path).
    let fused = !ghost
        && g.inner > 1
        && g.channels.div_ceil(kernels::fused_channels::<T>(
            g,
            if y.is_some() { 3 } else { 2 },
        )) >= 2 * rayon::current_num_threads().min(64);
    if fused {
        let coef = |ch: usize, sums: (f64, f64)| {
            let one = channel_coefficients(g, params, saved, ch, sums);
            (one.a, one.b, one.k)
        };
        let relu = y.map(|y| (y, dres));
        let center = &saved.mean[..c];
        kernels::backward_fused_cf(g, x, dy, relu, center, &mut sums, dx, narrow, par, coef);
        let mut coef = std::mem::take(&mut ws.coef);
        coefficients(g, params, saved, &sums, grads, &mut coef);
        ws.coef = coef;
        ws.tmp_pairs = sums;
        return Ok(());
    }
    if !ghost {
        match y {
            None => kernels::dot(g, x, dy, &saved.mean[..c], &mut sums, ws, par),
            Some(y) => kernels::dot_relu(g, x, y, dy, &saved.mean[..c], &mut sums, ws, par),
        }
    } else {
        let sub = sample_geometry(g);
        let per = sub.len();
        let mut s = vec![(0.0, 0.0); c];
        for n in 0..g.batch {
            let o = saved.group_of[n] * c;
            let r = n * per..(n + 1) * per;
            let center = &saved.mean[o..o + c];
            let seq = Parallelism::Sequential;
            match y {
                None => kernels::dot(sub, &x[r.clone()], &dy[r], center, &mut s, ws, seq),
                Some(y) => kernels::dot_relu(
                    sub,
                    &x[r.clone()],
                    &y[r.clone()],
                    &dy[r],
                    center,
                    &mut s,
                    ws,
                    seq,
                ),
            }
            for ch in 0..c {
                sums[o + ch].0 += s[ch].0;
                sums[o + ch].1 += s[ch].1;
            }
        }
    }
    let mut coef = std::mem::take(&mut ws.coef);
    coefficients(g, params, saved, &sums, grads, &mut coef);
    let n = groups * c;
    let (a, rest) = coef.split_at(n);
    let (b, k) = rest.split_at(n);
    ws.tmp_pairs = sums;
    if !ghost {
        let center = &saved.mean[..c];
        match y {
            None => kernels::affine2(g, x, dy, center, a, b, k, dx, narrow, par),
            Some(y) => kernels::affine2_relu(g, x, y, dy, center, a, b, k, dx, dres, narrow, par),
        }
    } else {
        let sub = sample_geometry(g);
        let per = sub.len();
        let seq = Parallelism::Sequential;
        for nidx in 0..g.batch {
            let o = saved.group_of[nidx] * c;
            let r = nidx * per..(nidx + 1) * per;
            let center = &saved.mean[o..o + c];
            let (ga, gb, gk) = (&a[o..o + c], &b[o..o + c], &k[o..o + c]);
            let (xs, ds) = (&x[r.clone()], &dy[r.clone()]);
            match y {
                None => kernels::affine2(sub, xs, ds, center, ga, gb, gk, &mut dx[r], narrow, seq),
                Some(y) => {
                    let dr: &mut [T] = if dres.is_empty() {
                        &mut []
                    } else {
                        &mut dres[r.clone()]
                    };
                    let ys = &y[r.clone()];
                    let dx = &mut dx[r];
                    kernels::affine2_relu(sub, xs, ys, ds, center, ga, gb, gk, dx, dr, narrow, seq)
                }
            }
        }
    }
    ws.coef = coef;
    Ok(())
}
