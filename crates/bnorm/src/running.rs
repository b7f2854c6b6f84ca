//! Running-statistics update rules, one per momentum convention, and deferred
//! (transactional) updates.
//!
//! Called only after a training step has computed valid batch statistics; channels listed
//! in `skipped` (non-finite batch statistics) keep their values.

use crate::config::{Config, GhostUpdate, VarianceEstimator};
use crate::error::{Error, Result};
use crate::state::RunningState;
use crate::stats::Moments;

/// Per (group, channel) batch statistics of a training step (group-major).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchStats<'a> {
    pub groups: usize,
    pub count: &'a [f64],
    pub mean: &'a [f64],
    pub var: &'a [f64],
}

impl BatchStats<'_> {
    /// Channel `ch`'s `(count, mean, biased variance)` averaged over the groups (the
    /// statistics themselves without ghost batches): what the running update and
    /// batch renormalization use (tf_keras averages ghost groups so).
    pub(crate) fn averaged(&self, ch: usize) -> (f64, f64, f64) {
        let groups = self.groups.max(1);
        let c = self.mean.len() / groups;
        let (mut count, mut mean, mut var) = (0.0, 0.0, 0.0);
        for gi in 0..groups {
            count += self.count[gi * c + ch];
            mean += self.mean[gi * c + ch];
            var += self.var[gi * c + ch];
        }
        let k = groups as f64;
        (count / k, mean / k, var / k)
    }
}

/// Blends `old` toward `new` with new-batch weight `a`: `(1 − a)·old + a·new`.
#[inline]
fn blend(old: f64, new: f64, a: f64) -> f64 {
    if a == 1.0 {
        new
    } else {
        (1.0 - a) * old + a * new
    }
}

/// Folds the batch statistics into `state`: once, with the average over ghost groups (as
/// tf_keras does), or once per group in order ([`GhostUpdate::PerGroup`]).
pub(crate) fn update(
    cfg: &Config,
    state: &mut RunningState,
    st: BatchStats<'_>,
    skipped: &[usize],
) {
    // (never with renorm: `Config::validate` refuses per-group updates of renormalized
    // ghost batches)
    let per_group = cfg
        .get_variant()
        .ghost()
        .is_some_and(|g| g.update == GhostUpdate::PerGroup);
    if per_group && st.groups > 1 {
        let c = state.mean.len();
        for gi in 0..st.groups {
            let r = gi * c..(gi + 1) * c;
            let one = BatchStats {
                groups: 1,
                count: &st.count[r.clone()],
                mean: &st.mean[r.clone()],
                var: &st.var[r],
            };
            update_once(cfg, state, one, skipped);
        }
    } else {
        update_once(cfg, state, st, skipped);
    }
}

fn update_once(cfg: &Config, state: &mut RunningState, st: BatchStats<'_>, skipped: &[usize]) {
    let c = state.mean.len();
    state.updates += 1;
    let a = cfg.get_momentum().new_weight(state.updates);
    for ch in 0..c {
        if skipped.contains(&ch) {
            continue;
        }
        let (m, mean, biased) = st.averaged(ch);
        let var = match cfg.get_running_variance() {
            VarianceEstimator::Biased => biased,
            VarianceEstimator::Unbiased => biased * m / (m - 1.0),
        };
        if let Some(rs) = state.renorm.as_mut() {
            // tf_keras: renorm mean/stddev and moving stddev move first, then the running
            // variance is published from the moving stddev.
            let eps = cfg.get_eps();
            let ra = cfg.get_variant().renorm().map_or(a, |r| 1.0 - r.momentum);
            let s_batch = (biased + eps).sqrt();
            rs.mean[ch] = blend(rs.mean[ch], mean, ra);
            rs.stddev[ch] = blend(rs.stddev[ch], s_batch, ra);
            rs.moving_stddev[ch] = blend(rs.moving_stddev[ch], (var + eps).sqrt(), a);
            state.mean[ch] = blend(state.mean[ch], mean, a);
            state.var[ch] = (rs.moving_stddev[ch] * rs.moving_stddev[ch] - eps).max(0.0);
            continue;
        }
        state.mean[ch] = blend(state.mean[ch], mean, a);
        state.var[ch] = blend(state.var[ch], var, a);
    }
}

/// A training step's running-statistics update, held back ([`Update::Defer`](crate::expert::Update::Defer):
/// it comes back in [`StepReport::pending`](crate::StepReport::pending)). Commit it, merge
/// several into one, or drop it to discard.
///
/// * Committing pending updates one by one equals running those training steps in that
///   order (for the exponential conventions that is *not* the update of their
///   concatenation: each commit weighs its batch by the momentum).
/// * [`merge`](PendingUpdate::merge) combines the exact moments of two batches by count,
///   so merging micro-batches and committing once equals one training step on the
///   concatenated batch, in every convention (ghost batches excepted: their statistics
///   are per group and cannot be merged).
#[derive(Debug, Clone, PartialEq)]
pub struct PendingUpdate {
    groups: usize,
    count: Vec<f64>,
    mean: Vec<f64>,
    var: Vec<f64>,
    skipped: Vec<usize>,
}

impl PendingUpdate {
    pub(crate) fn from_stats(st: BatchStats<'_>, skipped: &[usize]) -> PendingUpdate {
        PendingUpdate {
            groups: st.groups,
            count: st.count.to_vec(),
            mean: st.mean.to_vec(),
            var: st.var.to_vec(),
            skipped: skipped.to_vec(),
        }
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.mean.len() / self.groups.max(1)
    }

    /// The batch mean per channel (per group for ghost batches).
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }

    /// Values per channel the statistics cover.
    pub fn count(&self) -> &[f64] {
        &self.count
    }

    /// Merges `other` (a later micro-batch) into this update: afterwards it is the update
    /// of the two batches concatenated (exact, counts weighted). A channel skipped in
    /// either stays skipped.
    ///
    /// ```
    /// use bnorm::{Config, Layout, Mode, Params, RunningState};
    /// use bnorm::expert::{forward_into, Options, Saved, Workspace};
    /// let cfg = Config::torch(1);
    /// let p = Params::init(&cfg);
    /// let mut state = RunningState::init(&cfg);
    /// let mut pending = |x: &[f64]| {
    ///     let g = Layout::NC.geometry(&[x.len(), 1]).unwrap();
    ///     let mut y = vec![0.0; x.len()];
    ///     forward_into(&cfg, g, x, &p, state.as_mut(), Mode::Train, &mut y, &mut Saved::default(),
    ///         &mut Workspace::default(), Options::default().defer()).unwrap().pending.unwrap()
    /// };
    /// let mut a = pending(&[1.0, 2.0]);
    /// a.merge(&pending(&[3.0, 4.0, 5.0]))?;
    /// assert_eq!(a, pending(&[1.0, 2.0, 3.0, 4.0, 5.0]));
    /// # Ok::<(), bnorm::Error>(())
    /// ```
    pub fn merge(&mut self, other: &PendingUpdate) -> Result<()> {
        if self.groups > 1 || other.groups > 1 {
            return Err(Error::StateMismatch {
                reason: "ghost-batch updates are per group and cannot be merged",
            });
        }
        if self.mean.len() != other.mean.len() {
            return Err(Error::ShapeMismatch {
                what: "pending update",
                expected: vec![self.mean.len()],
                got: vec![other.mean.len()],
            });
        }
        for ch in 0..self.mean.len() {
            let a = Moments {
                count: self.count[ch],
                mean: self.mean[ch],
                m2: self.var[ch] * self.count[ch],
            };
            let b = Moments {
                count: other.count[ch],
                mean: other.mean[ch],
                m2: other.var[ch] * other.count[ch],
            };
            let m = a.merge(b);
            self.count[ch] = m.count;
            self.mean[ch] = m.mean;
            self.var[ch] = m.variance_biased();
        }
        for &ch in &other.skipped {
            if !self.skipped.contains(&ch) {
                self.skipped.push(ch);
            }
        }
        self.skipped.sort_unstable();
        Ok(())
    }

    /// Applies the update to `state` as a training step would have.
    pub fn commit(&self, cfg: &Config, state: &mut RunningState) -> Result<()> {
        state.validate(cfg)?;
        if self.mean.len() != self.groups.max(1) * cfg.get_channels() {
            return Err(Error::ShapeMismatch {
                what: "pending update",
                expected: vec![cfg.get_channels()],
                got: vec![self.channels()],
            });
        }
        let unbiased = cfg.get_running_variance() == VarianceEstimator::Unbiased;
        if let Some(&few) = self
            .count
            .iter()
            .find(|&&n| n < 1.0 || (unbiased && n < 2.0))
        {
            // the unbiased variance of one value is 0/0
            return Err(Error::BatchTooSmall {
                channel_values: few as usize,
            });
        }
        let st = BatchStats {
            groups: self.groups.max(1),
            count: &self.count,
            mean: &self.mean,
            var: &self.var,
        };
        update(cfg, state, st, &self.skipped);
        Ok(())
    }
}
