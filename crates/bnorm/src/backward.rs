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

use std::mem::MaybeUninit;

use crate::config::{BackwardArithmetic, Config};
use crate::element::{DType, Element};
use crate::error::Result;
use crate::forward::{check_input, sample_geometry, Normalized, Saved};
use crate::kernels::{self, Affine2, Affine2At, DotIn, Workspace};
use crate::layout::Geometry;
use crate::parallel::Parallelism;
use crate::plan::{BackwardEpilogue, BackwardOptions, BackwardPlan};
use crate::state::Params;
use crate::sync::Communicator;

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
/// use bnorm::{Config, Layout, Mode, Params, RunningState};
/// use bnorm::expert::{backward, forward};
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
    let mut grads = Grads::default();
    let mut ws = Workspace::default();
    let step = |dx: &mut [MaybeUninit<T>]| {
        let (grads, ws, par) = (&mut grads, &mut ws, Parallelism::Rayon);
        backward_out(cfg, g, x, dy, params, saved, dx, None, grads, ws, par, None)
    };
    // SAFETY: a backward step that returns `Ok` has written every element of `dx`
    // (`backward_out`'s contract).
    let (dx, ()) = unsafe { crate::buffer::filled(x.len(), step) }?;
    Ok(Backward {
        dx,
        dweight: cfg.get_scale().then_some(grads.dweight),
        dbias: cfg.get_center().then_some(grads.dbias),
    })
}

/// Backward pass into caller buffers. On error nothing has been written.
///
/// `opts` ([`BackwardOptions`], or just a [`Parallelism`]): the epilogue of the forward
/// step (through a ReLU the mask comes from its output `y`; with a residual, the
/// residual's gradient — the gradient at the ReLU's input — is written to `dresidual`),
/// threads, and synchronization over the ranks of the synchronized forward step.
///
/// ```
/// use bnorm::{Config, Layout, Mode, Params, RunningState};
/// use bnorm::expert::{backward_into, forward_into, BackwardEpilogue, BackwardOptions, Epilogue, Grads, Options, Saved, Workspace};
/// let cfg = Config::torch(1);
/// let g = Layout::NC.geometry(&[4, 1])?;
/// let (p, mut s) = (Params::init(&cfg), RunningState::init(&cfg));
/// let (x, mut y, mut saved, mut ws) = ([1.0, 2.0, 3.0, 4.0], vec![0.0f64; 4], Saved::default(), Workspace::default());
/// let opts = Options::default().epilogue(Epilogue::Relu);
/// forward_into(&cfg, g, &x, &p, s.as_mut(), Mode::Train, &mut y, &mut saved, &mut ws, opts)?;
/// let (mut dx, mut grads) = (vec![0.0; 4], Grads::default());
/// let opts = BackwardOptions::default().epilogue(BackwardEpilogue::Relu { y: &y });
/// backward_into(&cfg, g, &x, &[1.0; 4], &p, &saved, &mut dx, &mut grads, &mut ws, opts)?;
/// assert_eq!(grads.dbias, vec![2.0]); // only the two values the ReLU let through
/// # Ok::<(), bnorm::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn backward_into<'a, T: Element>(
    cfg: &Config,
    g: Geometry,
    x: &[T],
    dy: &[T],
    params: &Params,
    saved: &Saved,
    dx: &mut [T],
    grads: &mut Grads,
    ws: &mut Workspace,
    opts: impl Into<BackwardOptions<'a, T>>,
) -> Result<()> {
    let dx = crate::buffer::out(dx);
    backward_into_uninit(cfg, g, x, dy, params, saved, dx, grads, ws, opts)
}

/// [`backward_into`] into a `dx` that may be uninitialized, such as the spare capacity of
/// a `Vec`: the kernels write each element once and never read it. A step that returns
/// `Ok` has initialized every element of `dx` (and of the residual's gradient); one that
/// returns `Err` may have written any of them, or none.
///
/// ```
/// use bnorm::{Config, Layout, Mode, Params, RunningState};
/// use bnorm::expert::{backward_into_uninit, forward, Grads, Parallelism, Workspace};
/// let cfg = Config::torch(1);
/// let g = Layout::NC.geometry(&[4, 1])?;
/// let (x, p) = ([1.0f64, 2.0, 4.0, 8.0], Params::init(&cfg));
/// let f = forward(&cfg, g, &x, &p, RunningState::init(&cfg).as_ref(), Mode::Train)?;
/// let mut dx: Vec<f64> = Vec::with_capacity(4);
/// backward_into_uninit(&cfg, g, &x, &[1.0, 0.0, 0.0, 0.0], &p, &f.saved,
///                      &mut dx.spare_capacity_mut()[..4], &mut Grads::default(),
///                      &mut Workspace::default(), Parallelism::Sequential)?;
/// // SAFETY: the step returned `Ok`, so it initialized all four elements.
/// unsafe { dx.set_len(4) };
/// assert!(dx.iter().sum::<f64>().abs() < 1e-12);
/// # Ok::<(), bnorm::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn backward_into_uninit<'a, T: Element>(
    cfg: &Config,
    g: Geometry,
    x: &[T],
    dy: &[T],
    params: &Params,
    saved: &Saved,
    dx: &mut [MaybeUninit<T>],
    grads: &mut Grads,
    ws: &mut Workspace,
    opts: impl Into<BackwardOptions<'a, T>>,
) -> Result<()> {
    let BackwardOptions {
        epilogue,
        parallelism,
        sync,
    } = opts.into();
    let relu = match epilogue {
        BackwardEpilogue::None => None,
        BackwardEpilogue::Relu { y } => Some((y, None)),
        BackwardEpilogue::AddRelu { y, dresidual } => {
            Some((y, Some(crate::buffer::out(dresidual))))
        }
    };
    backward_out(
        cfg,
        g,
        x,
        dy,
        params,
        saved,
        dx,
        relu,
        grads,
        ws,
        parallelism,
        sync,
    )
}

/// The operands of a backward step through a ReLU: the forward step's output `y` and,
/// after `relu(bn(x) + residual)`, the output slice for the residual's gradient.
pub(crate) type ReluOut<'a, T> = Option<(&'a [T], Option<&'a mut [MaybeUninit<T>]>)>;

/// [`backward_into`] with `dx` (and the residual's gradient) as output slices, possibly
/// uninitialized: a step that returns `Ok` has written every element of `dx` and of the
/// residual's gradient (the masked map, the fused pass and the two-pass map each write
/// the whole of both); one that returns `Err` may have written any of them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_out<T: Element>(
    cfg: &Config,
    g: Geometry,
    x: &[T],
    dy: &[T],
    params: &Params,
    saved: &Saved,
    dx: &mut [MaybeUninit<T>],
    relu: ReluOut<'_, T>,
    grads: &mut Grads,
    ws: &mut Workspace,
    par: Parallelism,
    sync: Option<&dyn Communicator>,
) -> Result<()> {
    let planned =
        BackwardPlan::decide::<T>(cfg, g, params, saved, relu.is_some(), sync.is_some(), par);
    let (relu, dres, residual): (Option<&[T]>, &mut [MaybeUninit<T>], bool) = match relu {
        None => (None, &mut [], false),
        Some((y, None)) => (Some(y), &mut [], false),
        Some((y, Some(d))) => (Some(y), d, true),
    };
    let planned = planned.and_then(|p| {
        check_input(cfg, g, x.len(), "x")?;
        check_input(cfg, g, dy.len(), "dy")?;
        check_input(cfg, g, dx.len(), "dx")?;
        if let Some(y) = relu {
            check_input(cfg, g, y.len(), "y")?;
        }
        if residual {
            check_input(cfg, g, dres.len(), "dresidual")?;
        }
        Ok(p)
    });
    if let Some(comm) = sync {
        let local = planned.as_ref().map(|_| ()).map_err(Clone::clone);
        crate::sync::agree_backward::<T>(comm, cfg, g, saved, local)?;
    }
    let plan = planned?;
    if !saved.mask.is_empty() && saved.normalized == Normalized::Batch {
        // Masked (Keras 3), at reference speed; the plan refused epilogues and ranks.
        let c = g.channels;
        let stats = (&saved.count[..c], &saved.mean[..c], &saved.invstd[..c]);
        let (mask, k) = (&saved.mask[..], saved.mask_stride);
        let (dw, db) = (&mut grads.dweight, &mut grads.dbias);
        crate::masked::backward(g, x, dy, mask, k, params, stats, dx, dw, db);
        return Ok(());
    }
    let relu = relu.map(|y| (y, dres));
    backward_impl(&plan, x, dy, relu, params, saved, dx, grads, ws, sync)
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
        // one value (SingleValuePolicy::Accept): dot_xhat = 0 and k = −a·dy exactly, so
        // dx = a·dy + k = 0 exactly in the maps (no fused multiply-add), as y = β
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
    T::DTYPE == DType::F32 && cfg.get_backward_arithmetic() == BackwardArithmetic::F32
}

#[allow(clippy::too_many_arguments)]
fn backward_impl<T: Element>(
    plan: &BackwardPlan,
    x: &[T],
    dy: &[T],
    relu: Option<(&[T], &mut [MaybeUninit<T>])>,
    params: &Params,
    saved: &Saved,
    dx: &mut [MaybeUninit<T>],
    grads: &mut Grads,
    ws: &mut Workspace,
    comm: Option<&dyn Communicator>,
) -> Result<()> {
    let g = plan.geometry;
    let (par, narrow) = (plan.parallelism, plan.f32_map);
    let c = g.channels;
    let groups = plan.groups;
    let mut sums = std::mem::take(&mut ws.tmp_pairs);
    sums.clear();
    sums.resize(groups * c, (0.0, 0.0));
    let ghost = groups > 1 || !saved.group_of.is_empty();
    let (y, dres): (Option<&[T]>, &mut [MaybeUninit<T>]) = match relu {
        Some((y, d)) => (Some(y), d),
        None => (None, &mut []),
    };
    let inp = DotIn { x, dy, relu_y: y };
    // Channels-first backward (plain or through the ReLU): sums and dx per group of
    // channels, the second pass from cache (same sums, in the same order, as the two-pass
    // path).
    if plan.fused {
        let center = &saved.mean[..c];
        let coef = |ch: usize, sums: (f64, f64)| {
            let one = channel_coefficients(g, params, saved, ch, sums);
            Affine2At {
                m: center[ch],
                a: one.a,
                b: one.b,
                k: one.k,
                narrow,
            }
        };
        kernels::backward_fused_cf(g, inp, center, &mut sums, (dx, dres), par, coef);
        let mut coef = std::mem::take(&mut ws.coef);
        coefficients(g, params, saved, &sums, grads, &mut coef);
        ws.coef = coef;
        ws.tmp_pairs = sums;
        return Ok(());
    }
    if !ghost {
        kernels::dot(g, inp, &saved.mean[..c], &mut sums, ws, par);
        if let Some(comm) = comm {
            if let Err(e) = crate::sync::combine_sums(comm, &mut sums) {
                ws.tmp_pairs = sums;
                return Err(e);
            }
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
            kernels::dot(sub, inp.slice(r), center, &mut s, ws, seq);
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
    // The map of ghost group `o / c` (the whole batch's without ghost batches).
    let map = |o: usize| Affine2 {
        center: &saved.mean[o..o + c],
        a: &a[o..o + c],
        b: &b[o..o + c],
        k: &k[o..o + c],
        narrow,
    };
    if !ghost {
        let relu = y.map(|y| (y, dres));
        kernels::affine2(g, x, dy, relu, map(0), dx, par);
    } else {
        let sub = sample_geometry(g);
        let per = sub.len();
        let seq = Parallelism::Sequential;
        for nidx in 0..g.batch {
            let o = saved.group_of[nidx] * c;
            let r = nidx * per..(nidx + 1) * per;
            let (xs, ds) = (&x[r.clone()], &dy[r.clone()]);
            let relu = y.map(|y| {
                let dr: &mut [MaybeUninit<T>] = if dres.is_empty() {
                    &mut []
                } else {
                    &mut dres[r.clone()]
                };
                (&y[r.clone()], dr)
            });
            kernels::affine2(sub, xs, ds, relu, map(o), &mut dx[r], seq);
        }
    }
    ws.coef = coef;
    Ok(())
}
