//! The validated configuration of a batch-norm layer: conventions as enums, presets for
//! each framework, chainable setters, and one `validate`.

use crate::error::{Error, Result};

/// How running statistics move toward the batch statistics in a training step.
///
/// The frameworks disagree on what "momentum" means; each convention is its own variant so
/// a number is never read the wrong way round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Momentum {
    /// PyTorch: `a` is the weight of the new batch, `r ← (1 − a)·r + a·batch`
    /// (PyTorch's default 0.1).
    NewWeight(f64),
    /// PyTorch `momentum=None`: the cumulative average, `a = 1/t` at the t-th training step.
    Cumulative,
    /// Keras / TensorFlow: `d` is the decay of the old value, `r ← d·r + (1 − d)·batch`
    /// (Keras's default 0.99).
    Decay(f64),
    /// TensorFlow's `assign_moving_average(..., zero_debias=True)`: a hidden biased
    /// average `b ← d·b + (1 − d)·batch` starting at 0, published as `b / (1 − dᵗ)`.
    ///
    /// The published value alone is the whole state: it is the blend
    /// `r ← (1 − a)·r + a·batch` with the new-batch weight `a = (1 − d)/(1 − dᵗ)` at the
    /// t-th step (1 at the first), so a layer restored from its published statistics and
    /// update count continues exactly as one that never stopped.
    DebiasedDecay(f64),
    /// TensorFlow's `tf.train.ExponentialMovingAverage(decay, num_updates=n)`: a plain
    /// decay capped early in training, `r ← e·r + (1 − e)·batch` with the effective decay
    /// `e = min(d, (1 + n)/(10 + n))`, where `n` counts the updates *before* this one (the
    /// running state's [`updates`](crate::RunningState::updates), loadable like PyTorch's
    /// `num_batches_tracked`). The first update (n = 0) weighs the batch 0.9; from
    /// `n ≥ (10d − 1)/(1 − d)` on it is [`Decay`](Momentum::Decay)`(d)`. A TensorFlow loop
    /// that increments its counter *before* the average (`ema.apply` under the control
    /// dependencies of `minimize(global_step=…)`) reads n one higher: start `updates` one
    /// higher.
    ///
    /// TensorFlow evaluates `(1 + n)/(10 + n)` and `1 − e` in float32; bnorm in float64.
    WarmupDecay(f64),
}

impl Momentum {
    /// The weight of the new batch at training step `t` (1-based):
    /// `r ← (1 − a)·r + a·batch` for every convention.
    ///
    /// ```
    /// use bnorm::Momentum;
    /// assert_eq!(Momentum::NewWeight(0.1).new_weight(7), 0.1);
    /// assert!((Momentum::Decay(0.99).new_weight(1) - 0.01).abs() < 1e-15);
    /// assert_eq!(Momentum::Cumulative.new_weight(4), 0.25);
    /// // zero-debiased: the first step takes the batch, later ones less and less
    /// assert_eq!(Momentum::DebiasedDecay(0.9).new_weight(1), 1.0);
    /// assert!((Momentum::DebiasedDecay(0.9).new_weight(2) - 0.1 / 0.19).abs() < 1e-15);
    /// // num_updates: step t follows n = t - 1 updates, decay min(d, t/(9 + t))
    /// assert!((Momentum::WarmupDecay(0.99).new_weight(1) - 0.9).abs() < 1e-15);
    /// assert!((Momentum::WarmupDecay(0.875).new_weight(7) - (1.0 - 7.0 / 16.0)).abs() < 1e-15);
    /// assert!((Momentum::WarmupDecay(0.875).new_weight(100) - 0.125).abs() < 1e-15);
    /// ```
    pub fn new_weight(self, t: u64) -> f64 {
        match self {
            Momentum::NewWeight(a) => a,
            Momentum::Cumulative => 1.0 / t.max(1) as f64,
            Momentum::Decay(d) => 1.0 - d,
            Momentum::DebiasedDecay(d) => {
                let t = t.clamp(1, i32::MAX as u64) as i32;
                (1.0 - d) / (1.0 - d.powi(t))
            }
            Momentum::WarmupDecay(d) => {
                let n = t.max(1) as f64 - 1.0;
                1.0 - d.min((1.0 + n) / (10.0 + n))
            }
        }
    }
}

/// Which variance the running variance accumulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarianceEstimator {
    /// `Σ(x − mean)² / m` (Keras, TensorFlow, Flax).
    Biased,
    /// `Σ(x − mean)² / (m − 1)` (PyTorch). Normalization itself always uses the biased one.
    Unbiased,
}

/// What a training step does with a channel whose batch statistics are NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonFinitePolicy {
    /// Keep that channel's running statistics and report it in
    /// [`StepReport::skipped_channels`](crate::StepReport::skipped_channels); the output
    /// still carries the NaN, as arithmetic would.
    #[default]
    SkipChannel,
    /// Refuse the step with [`Error::NonFiniteStatistics`]; nothing is written.
    Error,
}

/// What a step that normalizes with batch statistics does with a channel (or a ghost
/// group) holding a single value (`m = 1`: one sample, no spatial extent).
///
/// The frameworks disagree: PyTorch refuses ("Expected more than 1 value per channel when
/// training"); Keras 3, tf_keras and TensorFlow (`tf.nn.moments`) accept it — the variance
/// is 0, so `x̂ = 0`, `y = β` (plus renorm's `γ·d`), the gradient with respect to `x` is 0,
/// and the moving variance moves toward 0. Checked with PyTorch 2.15, Keras 3.15, tf_keras
/// 2.21 and TensorFlow 2.21 on 2026-12-03.
///
/// A step that would fold the *unbiased* variance of one value (`0/0`) into the running
/// statistics is refused under either policy; no framework defines it.
///
/// ```
/// use bnorm::{Config, Layout, Mode};
/// use bnorm::config::SingleValuePolicy;
/// assert_eq!(Config::torch(2).get_single_value(), SingleValuePolicy::Refuse);
/// assert_eq!(Config::keras(2).get_single_value(), SingleValuePolicy::Accept);
/// let mut bn = Config::keras(2).build()?;
/// let y = bn.forward(&[1.5f32, -2.0], &[1, 2], Layout::NC, Mode::Train)?.0;
/// assert_eq!(y, [0.0, 0.0]); // β
/// assert!(Config::torch(2).build()?.forward(&[1.5f32, -2.0], &[1, 2], Layout::NC, Mode::Train).is_err());
/// # Ok::<(), bnorm::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SingleValuePolicy {
    /// Refuse the step with [`Error::BatchTooSmall`] (PyTorch).
    Refuse,
    /// Normalize it: variance 0, `y = β`, `dx = 0` (Keras 3, tf_keras, TensorFlow).
    Accept,
}

/// Batch renormalization (Ioffe 2017). Without a schedule the clipping is fixed, as
/// tf_keras does; with one, the limits relax over training as in the paper.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Renorm {
    /// Upper clip of `r` (≥ 1); the final value when scheduled.
    pub rmax: f64,
    /// Lower clip of `r` (in [0, 1]; 0 never binds, as Keras accepts it), independent of
    /// `rmax` (tf_keras uses `1 / rmax`); the final value when scheduled.
    pub rmin: f64,
    /// Clip of `|d|` (≥ 0); the final value when scheduled.
    pub dmax: f64,
    /// Decay of the renorm mean and standard deviation (tf_keras `renorm_momentum`).
    pub momentum: f64,
    /// Warm-up of the limits; `None` keeps them fixed.
    pub schedule: Option<RenormSchedule>,
}

/// The paper's warm-up: `rmax` grows linearly from 1 to its final value (and `rmin`
/// shrinks from 1 to its final value) over training steps `[r_start, r_end]`, and `dmax`
/// grows from 0 over `[d_start, d_end]` (the paper: r over 5k–40k steps, d over 5k–25k).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenormSchedule {
    /// Step at which `rmax`/`rmin` start to relax.
    pub r_start: u64,
    /// Step at which they reach their final values.
    pub r_end: u64,
    /// Step at which `dmax` starts to grow.
    pub d_start: u64,
    /// Step at which it reaches its final value.
    pub d_end: u64,
}

/// The clipping limits in force at one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenormLimits {
    /// Lower clip of r.
    pub rmin: f64,
    /// Upper clip of r.
    pub rmax: f64,
    /// Clip of |d|.
    pub dmax: f64,
}

impl Renorm {
    /// The limits at training step `t` (the number of updates before this step).
    ///
    /// ```
    /// use bnorm::config::{Renorm, RenormSchedule};
    /// let rn = Renorm { schedule: Some(RenormSchedule { r_start: 10, r_end: 30, d_start: 10, d_end: 20 }),
    ///                   ..Renorm::default() };
    /// assert_eq!(rn.limits(0).rmax, 1.0);      // before the warm-up: plain batch norm
    /// assert_eq!(rn.limits(0).dmax, 0.0);
    /// assert_eq!(rn.limits(20).rmax, 2.0);     // halfway from 1 to 3
    /// assert_eq!(rn.limits(15).dmax, 2.5);     // halfway from 0 to 5
    /// assert_eq!(rn.limits(99).rmax, 3.0);
    /// ```
    pub fn limits(&self, t: u64) -> RenormLimits {
        let Some(s) = self.schedule else {
            return RenormLimits {
                rmin: self.rmin,
                rmax: self.rmax,
                dmax: self.dmax,
            };
        };
        let frac = |start: u64, end: u64| {
            if t <= start {
                0.0
            } else if t >= end {
                1.0
            } else {
                (t - start) as f64 / (end - start) as f64
            }
        };
        let fr = frac(s.r_start, s.r_end);
        RenormLimits {
            rmin: 1.0 + (self.rmin - 1.0) * fr,
            rmax: 1.0 + (self.rmax - 1.0) * fr,
            dmax: self.dmax * frac(s.d_start, s.d_end),
        }
    }
}

impl Default for Renorm {
    /// tf_keras's defaults when `renorm_clipping` is given as `rmax = 3, dmax = 5`.
    fn default() -> Self {
        Renorm {
            rmax: 3.0,
            rmin: 1.0 / 3.0,
            dmax: 5.0,
            momentum: 0.99,
            schedule: None,
        }
    }
}

/// What inference or frozen steps do with running statistics that no training step ever
/// updated (`updates == 0`: mean 0 and variance 1, or a checkpoint saved without them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColdPolicy {
    /// Use them silently.
    Allow,
    /// Use them and set [`StepReport::cold_statistics`](crate::StepReport::cold_statistics).
    #[default]
    Report,
    /// Refuse the step with [`Error::ColdStatistics`].
    Error,
}

/// The arithmetic of the backward's element-wise map `dx = a·dz + b·(x − μ) + k` for f32
/// storage (16-bit storage always maps in f32, f64 storage in f64). The gradient sums
/// (`Σdz`, `Σdz·(x − μ)`, hence `dγ`, `dβ`) are f64 either way.
///
/// ```
/// use bnorm::Config;
/// use bnorm::config::BackwardArithmetic;
/// assert_eq!(Config::torch(8).get_backward_arithmetic(), BackwardArithmetic::F64);
/// let fast = Config::torch(8).backward_arithmetic(BackwardArithmetic::F32);
/// assert_eq!(fast.get_backward_arithmetic(), BackwardArithmetic::F32);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackwardArithmetic {
    /// f64, rounded once to f32: every element of dx is its exact value rounded to f32
    /// (unless the terms cancel beyond 2^29). The default.
    #[default]
    F64,
    /// f32, like PyTorch's CPU kernels, as `(a·(dz − d) + b·(x − m')) + k'` with `d`, `m'`
    /// the map's centers rounded to f32: no conversions and twice the vector lanes (a
    /// backward whose data sits in cache runs 17–20% faster; from memory, on the 2-core
    /// development machine, 0–17%: commit c84ee82). Each element's
    /// error is then a few f32 units of the terms `|a·(dz − mean dz)|` and `|b·(x − μ)|`,
    /// not of dx itself: elements much smaller than the channel's typical gradient lose
    /// relative accuracy (as in PyTorch), while the gradient as a whole keeps f32 accuracy.
    F32,
}

/// How samples are assigned to ghost (virtual) batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GhostGrouping {
    /// Sample `n` belongs to group `n mod G`, `G = N / virtual_batch_size` (tf_keras).
    Strided,
    /// Consecutive runs of `virtual_batch_size` samples.
    Contiguous,
}

/// What happens when the virtual batch size does not divide the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GhostRemainder {
    /// Refuse the batch with [`Error::GhostBatchIndivisible`] (tf_keras refuses too).
    #[default]
    Error,
    /// With contiguous grouping, the last group is smaller. Strided grouping always
    /// refuses.
    SmallerLastGroup,
}

/// How ghost batches update the running statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GhostUpdate {
    /// Once per step with the average of the group means and variances (tf_keras).
    #[default]
    Averaged,
    /// Once per group, in group order (as if each ghost batch were a training step).
    PerGroup,
}

/// Ghost batch normalization: each virtual batch is normalized with its own statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ghost {
    /// Samples per virtual batch.
    pub virtual_batch_size: usize,
    /// How samples are grouped.
    pub grouping: GhostGrouping,
    /// What a batch that `virtual_batch_size` does not divide gets.
    pub remainder: GhostRemainder,
    /// How the running statistics are updated.
    pub update: GhostUpdate,
}

impl Ghost {
    /// tf_keras's ghost batches: strided groups, indivisible batches refused.
    pub fn strided(virtual_batch_size: usize) -> Ghost {
        Ghost {
            virtual_batch_size,
            grouping: GhostGrouping::Strided,
            remainder: GhostRemainder::Error,
            update: GhostUpdate::Averaged,
        }
    }

    /// The group of each of `batch` samples and the number of groups.
    ///
    /// ```
    /// use bnorm::config::{Ghost, GhostGrouping, GhostRemainder};
    /// let (groups, g) = Ghost::strided(2).assign(6)?;
    /// assert_eq!((groups, g), (vec![0, 1, 2, 0, 1, 2], 3));
    /// let contiguous = Ghost { grouping: GhostGrouping::Contiguous,
    ///     remainder: GhostRemainder::SmallerLastGroup, ..Ghost::strided(4) };
    /// assert_eq!(contiguous.assign(6)?, (vec![0, 0, 0, 0, 1, 1], 2));
    /// assert!(Ghost::strided(4).assign(6).is_err());
    /// # Ok::<(), bnorm::Error>(())
    /// ```
    pub fn assign(&self, batch: usize) -> Result<(Vec<usize>, usize)> {
        let v = self.virtual_batch_size.max(1);
        let divides = batch.is_multiple_of(v);
        let indivisible = Error::GhostBatchIndivisible {
            batch,
            virtual_batch_size: v,
        };
        match self.grouping {
            GhostGrouping::Strided => {
                if !divides {
                    return Err(indivisible);
                }
                let g = batch / v;
                Ok(((0..batch).map(|n| n % g.max(1)).collect(), g))
            }
            GhostGrouping::Contiguous => {
                if !divides && self.remainder == GhostRemainder::Error {
                    return Err(indivisible);
                }
                Ok(((0..batch).map(|n| n / v).collect(), batch.div_ceil(v)))
            }
        }
    }
}

/// Which normalization the layer performs in training steps.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Variant {
    /// Plain batch normalization.
    #[default]
    BatchNorm,
    /// Batch renormalization.
    Renorm(Renorm),
    /// Ghost (virtual) batches.
    Ghost(Ghost),
    /// Batch renormalization of ghost batches, as tf_keras does with
    /// `BatchNormalization(renorm=True, virtual_batch_size=v)`: each ghost group is
    /// normalized with its own mean and biased variance, while one `r` and one `d` per
    /// channel come from the average over groups of the group means and variances, so
    /// `y = γ·(x̂_group·r + d) + β`; the renorm and running statistics update once per
    /// step with those averages (the ghost update must be [`GhostUpdate::Averaged`]).
    ///
    /// ```
    /// use bnorm::config::{Ghost, GhostUpdate, Renorm, Variant};
    /// use bnorm::Config;
    /// let both = Variant::GhostRenorm { ghost: Ghost::strided(2), renorm: Renorm::default() };
    /// assert_eq!(both.ghost(), Some(Ghost::strided(2)));
    /// assert_eq!(both.renorm(), Some(Renorm::default()));
    /// Config::keras(4).variant(both).validate()?;
    /// // tf_keras updates once per step; a per-group update is refused
    /// let per_group = Ghost { update: GhostUpdate::PerGroup, ..Ghost::strided(2) };
    /// let refused = Variant::GhostRenorm { ghost: per_group, renorm: Renorm::default() };
    /// assert!(Config::keras(4).variant(refused).validate().is_err());
    /// # Ok::<(), bnorm::Error>(())
    /// ```
    GhostRenorm {
        /// The ghost batches.
        ghost: Ghost,
        /// The renormalization.
        renorm: Renorm,
    },
}

impl Variant {
    /// The renormalization settings, if the variant renormalizes
    /// ([`Renorm`](Variant::Renorm) or [`GhostRenorm`](Variant::GhostRenorm)).
    ///
    /// ```
    /// use bnorm::config::{Ghost, Renorm, Variant};
    /// assert_eq!(Variant::Renorm(Renorm::default()).renorm(), Some(Renorm::default()));
    /// assert_eq!(Variant::Ghost(Ghost::strided(2)).renorm(), None);
    /// assert_eq!(Variant::BatchNorm.renorm(), None);
    /// ```
    pub fn renorm(&self) -> Option<Renorm> {
        match *self {
            Variant::Renorm(r) | Variant::GhostRenorm { renorm: r, .. } => Some(r),
            Variant::BatchNorm | Variant::Ghost(_) => None,
        }
    }

    /// The ghost batches, if the variant has them ([`Ghost`](Variant::Ghost) or
    /// [`GhostRenorm`](Variant::GhostRenorm)).
    ///
    /// ```
    /// use bnorm::config::{Ghost, Renorm, Variant};
    /// assert_eq!(Variant::Ghost(Ghost::strided(2)).ghost(), Some(Ghost::strided(2)));
    /// assert_eq!(Variant::Renorm(Renorm::default()).ghost(), None);
    /// ```
    pub fn ghost(&self) -> Option<Ghost> {
        match *self {
            Variant::Ghost(g) | Variant::GhostRenorm { ghost: g, .. } => Some(g),
            Variant::BatchNorm | Variant::Renorm(_) => None,
        }
    }
}

/// A batch-norm layer's configuration. Start from a framework preset, adjust with the
/// chainable setters, and [`validate`](Config::validate) (or build a layer, which
/// validates).
///
/// ```
/// use bnorm::{Config, Momentum, VarianceEstimator};
/// let cfg = Config::keras(64).eps(1e-5).momentum(Momentum::Decay(0.9));
/// cfg.validate()?;
/// assert_eq!(cfg.get_running_variance(), VarianceEstimator::Biased);
/// assert!(Config::torch(8).eps(0.0).validate().is_err());
/// # Ok::<(), bnorm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    channels: usize,
    eps: f64,
    momentum: Momentum,
    running_variance: VarianceEstimator,
    scale: bool,
    center: bool,
    track_running_stats: bool,
    non_finite: NonFinitePolicy,
    cold: ColdPolicy,
    variant: Variant,
    backward: BackwardArithmetic,
    single_value: SingleValuePolicy,
}

impl Config {
    /// PyTorch's `BatchNorm{1,2,3}d` defaults: momentum 0.1 (new-batch weight), eps 1e-5,
    /// unbiased running variance, affine, tracking running statistics.
    pub fn torch(channels: usize) -> Config {
        Config {
            channels,
            eps: 1e-5,
            momentum: Momentum::NewWeight(0.1),
            running_variance: VarianceEstimator::Unbiased,
            scale: true,
            center: true,
            track_running_stats: true,
            non_finite: NonFinitePolicy::SkipChannel,
            cold: ColdPolicy::Report,
            variant: Variant::BatchNorm,
            backward: BackwardArithmetic::F64,
            single_value: SingleValuePolicy::Refuse,
        }
    }

    /// Keras 3 / tf_keras `BatchNormalization` defaults: momentum 0.99 (decay), eps 1e-3,
    /// biased moving variance, gamma and beta, one value per channel accepted
    /// ([`SingleValuePolicy::Accept`]). Also `tf.compat.v1.layers.
    /// batch_normalization` (the same defaults) and Flax's `nn.BatchNorm` with
    /// `momentum=0.99, epsilon=1e-3` (Flax's own defaults are 0.99 and 1e-5: set
    /// [`eps`](Config::eps)).
    pub fn keras(channels: usize) -> Config {
        Config {
            eps: 1e-3,
            momentum: Momentum::Decay(0.99),
            running_variance: VarianceEstimator::Biased,
            single_value: SingleValuePolicy::Accept,
            ..Config::torch(channels)
        }
    }

    /// TensorFlow's classic low-level recipe: `tf.nn.moments`, then
    /// `tf.compat.v1.train.assign_moving_average(var, value, 0.999)` — whose default
    /// `zero_debias=True` makes it [`Momentum::DebiasedDecay`] — then
    /// `tf.nn.batch_normalization` with eps 1e-3, beta but no gamma; one value per channel
    /// accepted (`tf.nn.moments` gives variance 0).
    ///
    /// `tf.contrib.layers.batch_norm` has the same decay, eps and parameters but does
    /// **not** zero-debias by default (`zero_debias_moving_mean=False`): for it use
    /// `Config::tensorflow(c).momentum(Momentum::Decay(0.999))`. The recipe that updates
    /// the averages by hand (`pop_mean * decay + batch_mean * (1 - decay)`) is that
    /// plain decay too.
    pub fn tensorflow(channels: usize) -> Config {
        Config {
            eps: 1e-3,
            momentum: Momentum::DebiasedDecay(0.999),
            running_variance: VarianceEstimator::Biased,
            scale: false,
            single_value: SingleValuePolicy::Accept,
            ..Config::torch(channels)
        }
    }

    /// Sets the number of channels.
    pub fn channels(mut self, channels: usize) -> Config {
        self.channels = channels;
        self
    }

    /// Sets eps, added to the variance before the square root (must be finite and > 0).
    pub fn eps(mut self, eps: f64) -> Config {
        self.eps = eps;
        self
    }

    /// Sets the momentum convention and value.
    pub fn momentum(mut self, momentum: Momentum) -> Config {
        self.momentum = momentum;
        self
    }

    /// Sets which variance the running variance accumulates.
    pub fn running_variance(mut self, estimator: VarianceEstimator) -> Config {
        self.running_variance = estimator;
        self
    }

    /// Whether the layer has a learned scale gamma (`weight`).
    pub fn scale(mut self, on: bool) -> Config {
        self.scale = on;
        self
    }

    /// Whether the layer has a learned shift beta (`bias`).
    pub fn center(mut self, on: bool) -> Config {
        self.center = on;
        self
    }

    /// Both gamma and beta on or off (PyTorch's `affine`).
    pub fn affine(self, on: bool) -> Config {
        self.scale(on).center(on)
    }

    /// Whether running statistics exist. Without them inference uses batch statistics
    /// (PyTorch `track_running_stats=False`).
    pub fn track_running_stats(mut self, on: bool) -> Config {
        self.track_running_stats = on;
        self
    }

    /// What a training step does with non-finite batch statistics.
    pub fn non_finite(mut self, policy: NonFinitePolicy) -> Config {
        self.non_finite = policy;
        self
    }

    /// What inference does with never-updated running statistics.
    pub fn cold_statistics(mut self, policy: ColdPolicy) -> Config {
        self.cold = policy;
        self
    }

    /// Plain batch norm, renorm, ghost batches, or renorm of ghost batches.
    pub fn variant(mut self, variant: Variant) -> Config {
        self.variant = variant;
        self
    }

    /// The arithmetic of the backward's element-wise map for f32 storage (default f64).
    pub fn backward_arithmetic(mut self, arithmetic: BackwardArithmetic) -> Config {
        self.backward = arithmetic;
        self
    }

    /// What a training step does with one value per channel (or per ghost group).
    pub fn single_value(mut self, policy: SingleValuePolicy) -> Config {
        self.single_value = policy;
        self
    }

    // Getters: the setter's name with `get_` (the std builder convention, as
    // `Command::get_args`).

    /// Number of channels.
    ///
    /// ```
    /// let cfg = bnorm::Config::keras(8).eps(1e-5);
    /// assert_eq!((cfg.get_channels(), cfg.get_eps()), (8, 1e-5));
    /// assert_eq!(cfg.get_momentum(), bnorm::Momentum::Decay(0.99));
    /// ```
    pub fn get_channels(&self) -> usize {
        self.channels
    }
    /// eps.
    pub fn get_eps(&self) -> f64 {
        self.eps
    }
    /// The momentum convention.
    pub fn get_momentum(&self) -> Momentum {
        self.momentum
    }
    /// The running-variance estimator.
    pub fn get_running_variance(&self) -> VarianceEstimator {
        self.running_variance
    }
    /// Whether gamma exists.
    pub fn get_scale(&self) -> bool {
        self.scale
    }
    /// Whether beta exists.
    pub fn get_center(&self) -> bool {
        self.center
    }
    /// Whether running statistics exist.
    pub fn get_track_running_stats(&self) -> bool {
        self.track_running_stats
    }
    /// The non-finite policy.
    pub fn get_non_finite(&self) -> NonFinitePolicy {
        self.non_finite
    }
    /// The cold-statistics policy.
    pub fn get_cold_statistics(&self) -> ColdPolicy {
        self.cold
    }
    /// The variant.
    pub fn get_variant(&self) -> Variant {
        self.variant
    }
    /// The backward map's arithmetic for f32 storage.
    pub fn get_backward_arithmetic(&self) -> BackwardArithmetic {
        self.backward
    }

    /// The single-value policy.
    pub fn get_single_value(&self) -> SingleValuePolicy {
        self.single_value
    }

    /// Checks every setting; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        fn bad(setting: &'static str, value: impl ToString, expected: &'static str) -> Error {
            Error::InvalidConfig {
                setting,
                value: value.to_string(),
                expected,
            }
        }
        let unit = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
        if self.channels == 0 {
            return Err(bad("channels", 0, "at least 1"));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(bad("eps", self.eps, "a finite number > 0"));
        }
        match self.momentum {
            Momentum::NewWeight(a) | Momentum::Decay(a) | Momentum::WarmupDecay(a) if !unit(a) => {
                return Err(bad("momentum", a, "a number in [0, 1]"));
            }
            Momentum::DebiasedDecay(d) if !(d.is_finite() && (0.0..1.0).contains(&d)) => {
                return Err(bad(
                    "momentum",
                    d,
                    "a decay in [0, 1) (zero-debiasing divides by 1 - decay^t)",
                ));
            }
            _ => {}
        }
        if let Some(r) = self.variant.renorm() {
            if !(r.rmax.is_finite() && r.rmax >= 1.0) {
                return Err(bad("rmax", r.rmax, "a finite number >= 1"));
            }
            // 0 is a bound that never binds (r = σ/σ_r is positive), as Keras and
            // tf_keras accept it.
            if !(r.rmin.is_finite() && (0.0..=1.0).contains(&r.rmin)) {
                return Err(bad("rmin", r.rmin, "a number in [0, 1]"));
            }
            if !(r.dmax.is_finite() && r.dmax >= 0.0) {
                return Err(bad("dmax", r.dmax, "a finite number >= 0"));
            }
            if let Some(s) = r.schedule {
                if s.r_end < s.r_start || s.d_end < s.d_start {
                    return Err(bad(
                        "renorm schedule",
                        format!("{s:?}"),
                        "end steps not before their start steps",
                    ));
                }
            }
            if !unit(r.momentum) {
                return Err(bad("renorm momentum", r.momentum, "a number in [0, 1]"));
            }
            if matches!(self.momentum, Momentum::DebiasedDecay(_)) {
                return Err(bad(
                    "momentum",
                    "DebiasedDecay",
                    "a plain convention with batch renormalization",
                ));
            }
            if !self.track_running_stats {
                return Err(bad(
                    "track_running_stats",
                    false,
                    "true: batch renormalization corrects toward running statistics",
                ));
            }
        }
        if let Some(g) = self.variant.ghost() {
            if g.virtual_batch_size == 0 {
                return Err(bad("virtual_batch_size", 0, "at least 1"));
            }
            if g.update == GhostUpdate::PerGroup && self.variant.renorm().is_some() {
                return Err(bad(
                    "ghost update",
                    "PerGroup",
                    "GhostUpdate::Averaged with batch renormalization (tf_keras corrects \
                     and updates once per step, with the average over groups)",
                ));
            }
        }
        Ok(())
    }
}
