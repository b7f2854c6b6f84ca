//! A plain float64 reference implementation, written for clarity, not speed.
//!
//! It indexes every element from the shape directly (no shared geometry code), gathers
//! each channel's values into a vector, and computes mean and variance by the textbook
//! two-pass formulas. The fast paths are tested against it; it is public so users can
//! check their own integrations too.
//!
//! ```
//! use bnorm::{reference, Config, Layout, Mode, Params, RunningState};
//! let cfg = Config::torch(1);
//! let x = [1.0, 3.0];
//! let r = reference::forward(&cfg, Layout::NC, &[2, 1], &x, &Params::init(&cfg),
//!                            RunningState::init(&cfg).as_ref(), Mode::Train)?;
//! assert!((r.y[0] + 1.0).abs() < 1e-5 && (r.y[1] - 1.0).abs() < 1e-5);
//! # Ok::<(), bnorm::Error>(())
//! ```

use crate::config::{
    Config, GhostGrouping, Momentum, SingleValuePolicy, VarianceEstimator, Variant,
};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::state::{Mode, Params, RunningState};

/// Reference forward result.
#[derive(Debug, Clone)]
pub struct RefForward {
    /// Output.
    pub y: Vec<f64>,
    /// Running statistics after the step.
    pub state: Option<RunningState>,
    /// Per sample, the group it was normalized with (all 0 without ghost batches).
    pub group_of: Vec<usize>,
    /// Per (group, channel): mean used.
    pub mean: Vec<Vec<f64>>,
    /// Per (group, channel): biased variance used.
    pub var: Vec<Vec<f64>>,
    /// Whether the batch statistics were used.
    pub batch_stats: bool,
    /// Renorm r and d per channel (1 and 0 otherwise).
    pub r: Vec<f64>,
    /// Renorm d per channel.
    pub d: Vec<f64>,
}

/// Reference backward result.
#[derive(Debug, Clone)]
pub struct RefBackward {
    /// dL/dx.
    pub dx: Vec<f64>,
    /// dL/dgamma.
    pub dweight: Vec<f64>,
    /// dL/dbeta.
    pub dbias: Vec<f64>,
}

/// Channel and sample of every flat index.
fn index(layout: Layout, shape: &[usize]) -> Result<(usize, Vec<usize>, Vec<usize>)> {
    if shape.len() != layout.rank() {
        return Err(Error::RankMismatch {
            layout,
            shape: shape.to_vec(),
        });
    }
    let len: usize = shape.iter().product();
    let c = shape[layout.channel_axis()];
    let n = shape[0];
    let per_sample = len.checked_div(n).unwrap_or(0);
    let spatial: usize = shape[2..].iter().product();
    let mut ch = Vec::with_capacity(len);
    let mut sample = Vec::with_capacity(len);
    for i in 0..len {
        ch.push(if layout.is_channels_last() {
            i % c
        } else {
            (i / spatial) % c
        });
        sample.push(i / per_sample);
    }
    Ok((c, ch, sample))
}

fn mean_var(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64;
    (m, var)
}

/// Reference forward step (see the crate docs for the semantics).
pub fn forward(
    cfg: &Config,
    layout: Layout,
    shape: &[usize],
    x: &[f64],
    params: &Params,
    state: Option<&RunningState>,
    mode: Mode,
) -> Result<RefForward> {
    cfg.validate()?;
    params.validate(cfg)?;
    let (c, ch, sample) = index(layout, shape)?;
    if c != cfg.get_channels() || x.len() != ch.len() {
        return Err(Error::ShapeMismatch {
            what: "x",
            expected: vec![cfg.get_channels()],
            got: shape.to_vec(),
        });
    }
    let n = shape[0];
    let batch_stats = match mode {
        Mode::Train => true,
        Mode::Inference => state.is_none(),
        Mode::Frozen => {
            if state.is_none() {
                return Err(Error::NoRunningStatistics);
            }
            false
        }
    };
    let mut new_state = state.cloned();
    let ghost = match cfg.get_variant() {
        Variant::Ghost(g) | Variant::GhostRenorm { ghost: g, .. } => Some(g),
        Variant::BatchNorm | Variant::Renorm(_) => None,
    };
    let renorm = match cfg.get_variant() {
        Variant::Renorm(rn) | Variant::GhostRenorm { renorm: rn, .. } => Some(rn),
        Variant::BatchNorm | Variant::Ghost(_) => None,
    };
    let (group_of, groups) = match (ghost, batch_stats) {
        (Some(g), true) => {
            let v = g.virtual_batch_size;
            match g.grouping {
                GhostGrouping::Strided if n.is_multiple_of(v) => {
                    ((0..n).map(|s| s % (n / v)).collect(), n / v)
                }
                GhostGrouping::Contiguous
                    if n.is_multiple_of(v)
                        || g.remainder == crate::config::GhostRemainder::SmallerLastGroup =>
                {
                    ((0..n).map(|s| s / v).collect(), n.div_ceil(v))
                }
                _ => {
                    return Err(Error::GhostBatchIndivisible {
                        batch: n,
                        virtual_batch_size: v,
                    })
                }
            }
        }
        _ => (vec![0; n], 1),
    };
    // One value per channel (per group): its variance is 0 and its output β, where the
    // policy accepts it and the step does not need its unbiased variance (0/0).
    let train_update = mode == Mode::Train && state.is_some();
    let unbiased_update = train_update && cfg.get_running_variance() == VarianceEstimator::Unbiased;
    let fewest = match cfg.get_single_value() {
        SingleValuePolicy::Accept if !unbiased_update => 1,
        _ => 2,
    };
    let mut mean = vec![vec![0.0; c]; groups];
    let mut var = vec![vec![0.0; c]; groups];
    let mut count = vec![vec![0usize; c]; groups];
    if batch_stats {
        for gi in 0..groups {
            for k in 0..c {
                let vals: Vec<f64> = (0..x.len())
                    .filter(|&i| ch[i] == k && group_of[sample[i]] == gi)
                    .map(|i| x[i])
                    .collect();
                if vals.len() < fewest {
                    return Err(Error::BatchTooSmall {
                        channel_values: vals.len(),
                    });
                }
                let (m, v) = mean_var(&vals);
                mean[gi][k] = m;
                var[gi][k] = v;
                count[gi][k] = vals.len();
            }
        }
    } else if let Some(s) = state {
        mean[0] = s.mean.clone();
        var[0] = s.var.clone();
    }
    let eps = cfg.get_eps();
    let (mut r, mut d) = (vec![1.0; c], vec![0.0; c]);
    if let (Some(rn), true, Some(s)) = (renorm, train_update, state) {
        let rs = s.renorm.as_ref().ok_or(Error::NoRunningStatistics)?;
        let lim = rn.limits(s.updates);
        for k in 0..c {
            // with ghost batches, from the averages over groups (tf_keras)
            let bm = (0..groups).map(|gi| mean[gi][k]).sum::<f64>() / groups as f64;
            let bv = (0..groups).map(|gi| var[gi][k]).sum::<f64>() / groups as f64;
            let sd = (bv + eps).sqrt();
            let sr = rs.stddev[k].max(eps.sqrt());
            r[k] = (sd / sr).clamp(lim.rmin, lim.rmax);
            d[k] = ((bm - rs.mean[k]) / sr).clamp(-lim.dmax, lim.dmax);
        }
    }
    let y = (0..x.len())
        .map(|i| {
            let (k, gi) = (ch[i], group_of[sample[i]]);
            let xhat = (x[i] - mean[gi][k]) / (var[gi][k] + eps).sqrt();
            params.gamma(k) * (xhat * r[k] + d[k]) + params.beta(k)
        })
        .collect();
    let per_group = ghost.is_some_and(|g| g.update == crate::config::GhostUpdate::PerGroup);
    // Each update folds the average over `sets` of groups: all groups at once (tf_keras),
    // or one group at a time in order.
    let sets: Vec<Vec<usize>> = if per_group {
        (0..groups).map(|g| vec![g]).collect()
    } else {
        vec![(0..groups).collect()]
    };
    for set in &sets {
        if let (true, Some(s)) = (train_update, new_state.as_mut()) {
            s.updates += 1;
            let t = s.updates;
            for k in 0..c {
                let ng = set.len() as f64;
                let bm = set.iter().map(|&gi| mean[gi][k]).sum::<f64>() / ng;
                let bv = set.iter().map(|&gi| var[gi][k]).sum::<f64>() / ng;
                if !(bm.is_finite() && bv.is_finite()) {
                    continue;
                }
                let m = set.iter().map(|&gi| count[gi][k] as f64).sum::<f64>() / ng;
                let rv = match cfg.get_running_variance() {
                    VarianceEstimator::Biased => bv,
                    VarianceEstimator::Unbiased => bv * m / (m - 1.0),
                };
                let a = match cfg.get_momentum() {
                    Momentum::NewWeight(a) => a,
                    Momentum::Cumulative => 1.0 / t as f64,
                    Momentum::Decay(dd) => 1.0 - dd,
                    // TensorFlow publishes b / (1 − dᵗ) of a hidden b ← d·b + (1 − d)·batch
                    // starting at 0: as a blend of the published value, the new batch
                    // weighs (1 − d) / (1 − dᵗ).
                    Momentum::DebiasedDecay(dd) => (1.0 - dd) / (1.0 - dd.powi(t as i32)),
                    // ExponentialMovingAverage(num_updates=n): n = t − 1 updates came before
                    Momentum::WarmupDecay(dd) => {
                        let n = (t - 1) as f64;
                        1.0 - if (1.0 + n) / (10.0 + n) < dd {
                            (1.0 + n) / (10.0 + n)
                        } else {
                            dd
                        }
                    }
                };
                if let (Some(rn), Some(rs)) = (renorm, s.renorm.as_mut()) {
                    let ra = 1.0 - rn.momentum;
                    rs.mean[k] += ra * (bm - rs.mean[k]);
                    rs.stddev[k] += ra * ((bv + eps).sqrt() - rs.stddev[k]);
                    rs.moving_stddev[k] += a * ((rv + eps).sqrt() - rs.moving_stddev[k]);
                    s.mean[k] += a * (bm - s.mean[k]);
                    s.var[k] = (rs.moving_stddev[k].powi(2) - eps).max(0.0);
                } else {
                    s.mean[k] += a * (bm - s.mean[k]);
                    s.var[k] += a * (rv - s.var[k]);
                }
            }
        }
    }
    Ok(RefForward {
        y,
        state: new_state,
        group_of,
        mean,
        var,
        batch_stats,
        r,
        d,
    })
}

/// Reference backward of a step computed by [`forward`].
pub fn backward(
    cfg: &Config,
    layout: Layout,
    shape: &[usize],
    x: &[f64],
    dy: &[f64],
    params: &Params,
    fwd: &RefForward,
) -> Result<RefBackward> {
    let (c, ch, sample) = index(layout, shape)?;
    let eps = cfg.get_eps();
    let groups = fwd.mean.len();
    let mut dweight = vec![0.0; c];
    let mut dbias = vec![0.0; c];
    let mut dx = vec![0.0; x.len()];
    for gi in 0..groups {
        for k in 0..c {
            let idx: Vec<usize> = (0..x.len())
                .filter(|&i| ch[i] == k && fwd.group_of[sample[i]] == gi)
                .collect();
            let sd = (fwd.var[gi][k] + eps).sqrt();
            let xhat: Vec<f64> = idx.iter().map(|&i| (x[i] - fwd.mean[gi][k]) / sd).collect();
            let sdy: f64 = idx.iter().map(|&i| dy[i]).sum();
            let sdyx: f64 = idx.iter().zip(&xhat).map(|(&i, h)| dy[i] * h).sum();
            dbias[k] += sdy;
            dweight[k] += fwd.r[k] * sdyx + fwd.d[k] * sdy;
            let gain = params.gamma(k) * fwd.r[k];
            let m = idx.len() as f64;
            for (j, &i) in idx.iter().enumerate() {
                dx[i] = if fwd.batch_stats {
                    gain / sd * (dy[i] - sdy / m - xhat[j] * sdyx / m)
                } else {
                    gain / sd * dy[i]
                };
            }
        }
    }
    Ok(RefBackward { dx, dweight, dbias })
}

/// Reference masked forward step (Keras 3's masked batch norm, see
/// [`mod@crate::masked`]): `mask` has one flag per row of the last axis of `x`. Plain batch
/// norm only. [`RefForward::var`] is the masked variance; the selected counts are not
/// kept (backward recounts them).
#[allow(clippy::too_many_arguments)]
pub fn forward_masked(
    cfg: &Config,
    layout: Layout,
    shape: &[usize],
    x: &[f64],
    mask: &[bool],
    params: &Params,
    state: Option<&RunningState>,
    mode: Mode,
) -> Result<RefForward> {
    cfg.validate()?;
    params.validate(cfg)?;
    let (c, ch, _) = index(layout, shape)?;
    let last = *shape.last().unwrap_or(&1);
    if c != cfg.get_channels() || x.len() != ch.len() || mask.len() * last != x.len() {
        return Err(Error::ShapeMismatch {
            what: "x or mask",
            expected: vec![cfg.get_channels()],
            got: shape.to_vec(),
        });
    }
    let batch_stats = mode == Mode::Train || state.is_none();
    let train_update = mode == Mode::Train && state.is_some();
    let (mut mean, mut var) = match state {
        Some(s) if !batch_stats => (s.mean.clone(), s.var.clone()),
        _ => (vec![0.0; c], vec![1.0; c]),
    };
    let mut count = vec![0.0; c];
    if batch_stats {
        for k in 0..c {
            let sel: Vec<f64> = (0..x.len())
                .filter(|&i| ch[i] == k && mask[i / last])
                .map(|i| x[i])
                .collect();
            let unbiased =
                train_update && cfg.get_running_variance() == VarianceEstimator::Unbiased;
            let fewest = match cfg.get_single_value() {
                SingleValuePolicy::Accept if !unbiased => 1,
                _ => 2,
            };
            if sel.len() < fewest {
                return Err(Error::BatchTooSmall {
                    channel_values: sel.len(),
                });
            }
            let den = sel.len() as f64 + crate::masked::MASK_EPSILON;
            mean[k] = sel.iter().sum::<f64>() / den;
            var[k] = sel.iter().map(|v| (v - mean[k]).powi(2)).sum::<f64>() / den;
            count[k] = sel.len() as f64;
        }
    }
    let eps = cfg.get_eps();
    let y = (0..x.len())
        .map(|i| {
            let k = ch[i];
            params.gamma(k) * (x[i] - mean[k]) / (var[k] + eps).sqrt() + params.beta(k)
        })
        .collect();
    let mut new_state = state.cloned();
    if let (true, Some(s)) = (train_update, new_state.as_mut()) {
        s.updates += 1;
        let a = cfg.get_momentum().new_weight(s.updates);
        for k in 0..c {
            let rv = match cfg.get_running_variance() {
                VarianceEstimator::Biased => var[k],
                VarianceEstimator::Unbiased => var[k] * count[k] / (count[k] - 1.0),
            };
            s.mean[k] = (1.0 - a) * s.mean[k] + a * mean[k];
            s.var[k] = (1.0 - a) * s.var[k] + a * rv;
        }
    }
    Ok(RefForward {
        y,
        state: new_state,
        group_of: vec![0; shape[0]],
        mean: vec![mean],
        var: vec![var],
        batch_stats,
        r: vec![1.0; c],
        d: vec![0.0; c],
    })
}

/// Reference backward of [`forward_masked`], by the chain rule written out element by
/// element: `dx_i = Σ_j dy_j ∂y_j/∂x_i` with `∂mean/∂x_i` and `∂var/∂x_i` of the masked
/// statistics (quadratic in the channel size: for tests).
#[allow(clippy::too_many_arguments)]
pub fn backward_masked(
    cfg: &Config,
    layout: Layout,
    shape: &[usize],
    x: &[f64],
    dy: &[f64],
    mask: &[bool],
    params: &Params,
    fwd: &RefForward,
) -> Result<RefBackward> {
    let (c, ch, _) = index(layout, shape)?;
    let last = *shape.last().unwrap_or(&1);
    let eps = cfg.get_eps();
    let (mut dweight, mut dbias, mut dx) = (vec![0.0; c], vec![0.0; c], vec![0.0; x.len()]);
    for k in 0..c {
        let idx: Vec<usize> = (0..x.len()).filter(|&i| ch[i] == k).collect();
        let (mean, var, g) = (fwd.mean[0][k], fwd.var[0][k], params.gamma(k));
        let sd = (var + eps).sqrt();
        let w = |i: usize| if mask[i / last] { 1.0 } else { 0.0 };
        let den = idx.iter().map(|&i| w(i)).sum::<f64>() + crate::masked::MASK_EPSILON;
        for &i in &idx {
            dbias[k] += dy[i];
            dweight[k] += dy[i] * (x[i] - mean) / sd;
        }
        for &i in &idx {
            if !fwd.batch_stats {
                dx[i] = g / sd * dy[i];
                continue;
            }
            let dmean = w(i) / den;
            // var = Σ_j w_j (x_j − mean)² / den
            let dvar = idx
                .iter()
                .map(|&j| {
                    let djx = if j == i { 1.0 } else { 0.0 };
                    w(j) * 2.0 * (x[j] - mean) * (djx - dmean)
                })
                .sum::<f64>()
                / den;
            dx[i] = idx
                .iter()
                .map(|&j| {
                    let djx = if j == i { 1.0 } else { 0.0 };
                    let dyj = g * ((djx - dmean) / sd - (x[j] - mean) * 0.5 / sd.powi(3) * dvar);
                    dy[j] * dyj
                })
                .sum();
        }
    }
    Ok(RefBackward { dx, dweight, dbias })
}
