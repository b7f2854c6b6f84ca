//! Recalibration of running statistics ("precise batch norm").
//!
//! Exponential running averages lag behind the weights they summarize and weigh recent
//! batches most. After training, recalibration replaces them with the true population
//! statistics of the layer's input over K batches: each batch's exact `(count, mean, M2)`
//! merged by count ([`Moments::merge`]), so the result equals, within rounding, the
//! statistics of all K batches concatenated, whatever their sizes (a short last batch
//! counts for what it holds, not as a full one).
//!
//! ```
//! use bnorm::{Config, Layout, Recalibration};
//! let cfg = Config::torch(1);
//! let mut recal = Recalibration::new(1);
//! recal.add(Layout::NC.geometry(&[3, 1])?, &[1.0f32, 2.0, 3.0])?;
//! recal.add(Layout::NC.geometry(&[1, 1])?, &[10.0f32])?; // a short batch
//! let mut state = bnorm::RunningState::init(&cfg).unwrap();
//! recal.apply(&cfg, &mut state)?;
//! assert_eq!(state.mean[0], 4.0);                        // (1 + 2 + 3 + 10) / 4
//! assert!((state.var[0] - 50.0 / 3.0).abs() < 1e-12);    // unbiased (Σ(x − 4)² = 50), PyTorch convention
//! # Ok::<(), bnorm::Error>(())
//! ```

use crate::config::{Config, VarianceEstimator};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::kernels::{self, Workspace};
use crate::layout::Geometry;
use crate::parallel::Parallelism;
use crate::state::RunningState;
use crate::stats::Moments;

/// Accumulates exact per-channel moments over any number of batches.
#[derive(Debug, Clone, PartialEq)]
pub struct Recalibration {
    moments: Vec<Moments>,
    batches: u64,
    scratch: Vec<Moments>,
}

impl Recalibration {
    /// An empty accumulator for `channels` channels.
    pub fn new(channels: usize) -> Recalibration {
        Recalibration {
            moments: vec![Moments::default(); channels],
            batches: 0,
            scratch: Vec::new(),
        }
    }

    /// Adds one batch (any layout; its channel count must match).
    pub fn add<T: Element>(&mut self, g: Geometry, x: &[T]) -> Result<()> {
        if g.channels != self.moments.len() || x.len() != g.len() {
            return Err(Error::ShapeMismatch {
                what: "x",
                expected: vec![self.moments.len()],
                got: vec![g.channels],
            });
        }
        let mut m = std::mem::take(&mut self.scratch);
        m.clear();
        m.resize(g.channels, Moments::default());
        kernels::moments(g, x, &mut m, &mut Workspace::default(), Parallelism::Rayon);
        self.add_moments(&m)?;
        self.scratch = m;
        Ok(())
    }

    /// Adds per-channel moments computed elsewhere (for example from a forward step's
    /// [`Saved`](crate::expert::Saved) statistics, or from another process).
    pub fn add_moments(&mut self, m: &[Moments]) -> Result<()> {
        if m.len() != self.moments.len() {
            return Err(Error::ShapeMismatch {
                what: "moments",
                expected: vec![self.moments.len()],
                got: vec![m.len()],
            });
        }
        for (acc, b) in self.moments.iter_mut().zip(m) {
            *acc = acc.merge(*b);
        }
        self.batches += 1;
        Ok(())
    }

    /// The merged moments so far.
    pub fn moments(&self) -> &[Moments] {
        &self.moments
    }

    /// Batches added so far.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// Replaces the running mean and variance (biased or unbiased per the configuration)
    /// with the population statistics. Only the batch-norm state changes. The update
    /// counter becomes at least 1 (the statistics are no longer cold); the renorm
    /// statistics are set consistently with the new values. Refused (nothing
    /// changes) when a channel has fewer than two values or non-finite statistics.
    pub fn apply(&self, cfg: &Config, state: &mut RunningState) -> Result<()> {
        state.validate(cfg)?;
        if self.moments.len() != cfg.get_channels() {
            return Err(Error::ShapeMismatch {
                what: "recalibration",
                expected: vec![cfg.get_channels()],
                got: vec![self.moments.len()],
            });
        }
        let mut var = Vec::with_capacity(self.moments.len());
        for (ch, m) in self.moments.iter().enumerate() {
            if m.count < 2.0 {
                return Err(Error::BatchTooSmall {
                    channel_values: m.count as usize,
                });
            }
            let v = match cfg.get_running_variance() {
                VarianceEstimator::Biased => m.variance_biased(),
                VarianceEstimator::Unbiased => m.variance_unbiased(),
            };
            if !(v.is_finite() && m.mean.is_finite()) {
                return Err(Error::NonFiniteStatistics { channels: vec![ch] });
            }
            var.push(v);
        }
        state.updates = state.updates.max(1);
        let eps = cfg.get_eps();
        for (ch, m) in self.moments.iter().enumerate() {
            state.mean[ch] = m.mean;
            state.var[ch] = var[ch];
            if let Some(rs) = state.renorm.as_mut() {
                rs.mean[ch] = m.mean;
                rs.stddev[ch] = (m.variance_biased() + eps).sqrt();
                rs.moving_stddev[ch] = (var[ch] + eps).sqrt();
            }
        }
        Ok(())
    }
}
