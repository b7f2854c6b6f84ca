//! Running-statistics update rules, one per momentum convention.
//!
//! Called only after a training step has computed valid batch statistics; channels listed
//! in `skipped` (non-finite batch statistics) keep their values.

use crate::config::{Config, Momentum, VarianceEstimator};
use crate::forward::Saved;
use crate::state::RunningState;

/// Blends `old` toward `new` with new-batch weight `a`: `(1 − a)·old + a·new`.
#[inline]
fn blend(old: f64, new: f64, a: f64) -> f64 {
    if a == 1.0 {
        new
    } else {
        (1.0 - a) * old + a * new
    }
}

/// Folds the batch statistics in `saved` (per ghost group: the average over groups, as
/// tf_keras does) into `state`.
pub(crate) fn update(cfg: &Config, state: &mut RunningState, saved: &Saved, skipped: &[usize]) {
    let c = state.mean.len();
    let groups = saved.groups.max(1);
    state.updates += 1;
    let t = state.updates;
    for ch in 0..c {
        if skipped.contains(&ch) {
            continue;
        }
        let (mut mean, mut var, mut count) = (0.0, 0.0, 0.0);
        for gi in 0..groups {
            mean += saved.mean[gi * c + ch];
            var += saved.var[gi * c + ch];
            count += saved.count[gi * c + ch];
        }
        let (mean, biased) = (mean / groups as f64, var / groups as f64);
        let m = count / groups as f64;
        let var = match cfg.running_variance_estimator() {
            VarianceEstimator::Biased => biased,
            VarianceEstimator::Unbiased => biased * m / (m - 1.0),
        };
        if let Some(rs) = state.renorm.as_mut() {
            // tf_keras: renorm mean/stddev and moving stddev move first, then the running
            // variance is published from the moving stddev.
            let a = cfg.momentum_convention().new_weight(t).unwrap_or(0.0);
            let eps = cfg.epsilon();
            let rm = match cfg.variant_kind() {
                crate::config::Variant::Renorm(r) => 1.0 - r.momentum,
                _ => a,
            };
            let s_batch = (biased + eps).sqrt();
            rs.mean[ch] = blend(rs.mean[ch], mean, rm);
            rs.stddev[ch] = blend(rs.stddev[ch], s_batch, rm);
            rs.moving_stddev[ch] = blend(rs.moving_stddev[ch], (var + eps).sqrt(), a);
            state.mean[ch] = blend(state.mean[ch], mean, a);
            state.var[ch] = (rs.moving_stddev[ch] * rs.moving_stddev[ch] - eps).max(0.0);
            continue;
        }
        match cfg.momentum_convention() {
            Momentum::DebiasedDecay(d) => {
                if let Some(db) = state.debias.as_mut() {
                    db.mean[ch] = d * db.mean[ch] + (1.0 - d) * mean;
                    db.var[ch] = d * db.var[ch] + (1.0 - d) * var;
                    let denom = 1.0 - d.powi(t.min(i32::MAX as u64) as i32);
                    state.mean[ch] = db.mean[ch] / denom;
                    state.var[ch] = db.var[ch] / denom;
                }
            }
            other => {
                let a = other.new_weight(t).unwrap_or(0.0);
                state.mean[ch] = blend(state.mean[ch], mean, a);
                state.var[ch] = blend(state.var[ch], var, a);
            }
        }
    }
}
