//! Learned parameters, running statistics, and the mode of a call.

use crate::config::Config;
use crate::error::{Error, Result};

/// What a forward call does. Every call names its mode: there is no hidden global flag and
/// no mode inferred from a device or a context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Normalize with the batch's own statistics and fold them into the running statistics.
    Train,
    /// Normalize with the running statistics (or, for a layer that does not track them,
    /// the batch statistics, as PyTorch does). Nothing is updated.
    Inference,
    /// Normalize with the running statistics and never update them, while gradients still
    /// flow to the input and to gamma/beta: fine-tuning with frozen statistics. Requires
    /// running statistics.
    Frozen,
}

/// Learned per-channel parameters gamma (`weight`) and beta (`bias`), kept in f64.
/// An absent one acts as 1 (gamma) or 0 (beta).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Params {
    /// gamma, one per channel, when the layer scales.
    pub weight: Option<Vec<f64>>,
    /// beta, one per channel, when the layer centers.
    pub bias: Option<Vec<f64>>,
}

impl Params {
    /// gamma = 1 and beta = 0 for the parameters the configuration has.
    ///
    /// ```
    /// let p = bnorm::Params::init(&bnorm::Config::torch(3).scale(false));
    /// assert!(p.weight.is_none());
    /// assert_eq!(p.bias, Some(vec![0.0; 3]));
    /// ```
    pub fn init(cfg: &Config) -> Params {
        let c = cfg.get_channels();
        Params {
            weight: cfg.get_scale().then(|| vec![1.0; c]),
            bias: cfg.get_center().then(|| vec![0.0; c]),
        }
    }

    /// gamma of channel `c` (1 when absent).
    #[inline]
    pub fn gamma(&self, c: usize) -> f64 {
        self.weight.as_ref().map_or(1.0, |w| w[c])
    }

    /// beta of channel `c` (0 when absent).
    #[inline]
    pub fn beta(&self, c: usize) -> f64 {
        self.bias.as_ref().map_or(0.0, |b| b[c])
    }

    /// Checks presence against the configuration, lengths and finiteness.
    pub fn validate(&self, cfg: &Config) -> Result<()> {
        let c = cfg.get_channels();
        check_vec("weight", self.weight.as_deref(), cfg.get_scale(), c, false)?;
        check_vec("bias", self.bias.as_deref(), cfg.get_center(), c, false)
    }
}

pub(crate) fn check_vec(
    what: &'static str,
    v: Option<&[f64]>,
    required: bool,
    c: usize,
    non_negative: bool,
) -> Result<()> {
    match v {
        None if required => Err(Error::MissingParameter { what }),
        Some(_) if !required => Err(Error::UnexpectedParameter { what }),
        Some(v) if v.len() != c => Err(Error::ShapeMismatch {
            what,
            expected: vec![c],
            got: vec![v.len()],
        }),
        Some(v) => {
            if let Some(channel) = v.iter().position(|x| !x.is_finite()) {
                return Err(Error::NonFiniteParameter { what, channel });
            }
            match v.iter().position(|x| non_negative && *x < 0.0) {
                Some(channel) => Err(Error::NegativeVariance { what, channel }),
                None => Ok(()),
            }
        }
        None => Ok(()),
    }
}

/// Batch renormalization's extra statistics (tf_keras names).
#[derive(Debug, Clone, PartialEq)]
pub struct RenormState {
    /// `renorm_mean`, the mean that `d` corrects toward.
    pub mean: Vec<f64>,
    /// `renorm_stddev`, the standard deviation that `r` corrects toward.
    pub stddev: Vec<f64>,
    /// `moving_stddev`, from which the running variance is published.
    pub moving_stddev: Vec<f64>,
}

/// Running (moving) statistics and their bookkeeping, kept in f64 whatever the data type.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningState {
    /// Running mean per channel.
    pub mean: Vec<f64>,
    /// Running variance per channel (biased or unbiased per the configuration).
    pub var: Vec<f64>,
    /// Training steps folded in so far (PyTorch's `num_batches_tracked`; it drives the
    /// cumulative average and the zero-debiasing, and tells never-updated statistics).
    pub updates: u64,
    /// Batch renormalization statistics, for
    /// [`Variant::Renorm`](crate::config::Variant::Renorm) and
    /// [`Variant::GhostRenorm`](crate::config::Variant::GhostRenorm).
    pub renorm: Option<RenormState>,
}

impl RunningState {
    /// Fresh statistics for a configuration: mean 0, variance 1, no update yet; `None`
    /// when the configuration does not track running statistics.
    ///
    /// ```
    /// let s = bnorm::RunningState::init(&bnorm::Config::torch(2)).unwrap();
    /// assert_eq!((s.mean, s.var, s.updates), (vec![0.0; 2], vec![1.0; 2], 0));
    /// ```
    pub fn init(cfg: &Config) -> Option<RunningState> {
        let c = cfg.get_channels();
        RunningState::from_values(cfg, vec![0.0; c], vec![1.0; c], 0).ok()
    }

    /// Running statistics loaded from a checkpoint (`updates` = its
    /// `num_batches_tracked`). Checks lengths, finiteness and non-negative variances.
    ///
    /// Mean, variance and update count are the whole state of every momentum convention
    /// (the zero-debiased one included, see [`Momentum::DebiasedDecay`](crate::Momentum::DebiasedDecay)): training on from
    /// here gives the same bits as training that never stopped.
    ///
    /// Batch renormalization keeps three more statistics; from published values they
    /// start as tf_keras starts them — `renorm_mean = mean`, `renorm_stddev =
    /// sqrt(var)`, and `moving_stddev = sqrt(var)` before the first update and
    /// `sqrt(var + eps)` after (the running variance is published as
    /// `moving_stddev² − eps`). To resume renormalization exactly, restore the whole
    /// [`RunningState`], [`renorm`](RunningState::renorm) included.
    ///
    /// ```
    /// use bnorm::{Config, Layout, Mode};
    /// let cfg = Config::tensorflow(1);
    /// let (mut a, mut b) = (cfg.clone().build()?, cfg.clone().build()?);
    /// let batch = |k: f64| [k, 2.0 * k, 4.0 * k];
    /// for k in 1..=3 {
    ///     a.forward(&batch(k as f64), &[3, 1], Layout::NC, Mode::Train)?;
    /// }
    /// // b resumes from a's published mean, variance and update count only
    /// let s = a.running_state().unwrap();
    /// b.set_running_state(bnorm::RunningState::from_values(&cfg, s.mean.clone(), s.var.clone(), s.updates)?)?;
    /// a.forward(&batch(4.0), &[3, 1], Layout::NC, Mode::Train)?;
    /// b.forward(&batch(4.0), &[3, 1], Layout::NC, Mode::Train)?;
    /// assert_eq!(a.running_state(), b.running_state());
    /// # Ok::<(), bnorm::Error>(())
    /// ```
    pub fn from_values(
        cfg: &Config,
        mean: Vec<f64>,
        var: Vec<f64>,
        updates: u64,
    ) -> Result<RunningState> {
        if !cfg.get_track_running_stats() {
            return Err(Error::NoRunningStatistics);
        }
        let c = cfg.get_channels();
        check_vec("running_mean", Some(&mean), true, c, false)?;
        check_vec("running_var", Some(&var), true, c, true)?;
        let renorm = cfg.get_variant().renorm().is_some().then(|| {
            let eps = if updates == 0 { 0.0 } else { cfg.get_eps() };
            RenormState {
                mean: mean.clone(),
                stddev: var.iter().map(|v| v.sqrt()).collect(),
                moving_stddev: var.iter().map(|v| (v + eps).sqrt()).collect(),
            }
        });
        Ok(RunningState {
            mean,
            var,
            updates,
            renorm,
        })
    }

    /// Checks this state against a configuration (lengths, finiteness, the extra state the
    /// convention needs).
    pub fn validate(&self, cfg: &Config) -> Result<()> {
        let c = cfg.get_channels();
        check_vec("running_mean", Some(&self.mean), true, c, false)?;
        check_vec("running_var", Some(&self.var), true, c, true)?;
        let renorm = cfg.get_variant().renorm().is_some();
        match (&self.renorm, renorm) {
            (Some(r), true) => {
                check_vec("renorm_mean", Some(&r.mean), true, c, false)?;
                check_vec("renorm_stddev", Some(&r.stddev), true, c, true)?;
                check_vec("moving_stddev", Some(&r.moving_stddev), true, c, true)
            }
            (None, false) => Ok(()),
            _ => Err(Error::StateMismatch {
                reason: "renorm state present without a renorm variant, or missing",
            }),
        }
    }
}
