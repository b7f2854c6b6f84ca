//! One batch-norm layer of a checkpoint: its values and conventions, the layer it
//! builds, and conversion between frameworks' conventions.

use std::fmt;

use super::error::InteropError;
use super::format::Format;
use super::Result;
use bnorm::element::DType;
use bnorm::expert::RenormState;
use bnorm::BatchNorm;
use bnorm::{Config, Momentum, VarianceEstimator};
use bnorm::{Params, RunningState};

/// One batch-norm layer as found in a checkpoint, values widened to f64, with the
/// conventions it is read under. Values are not validated (a broken layer can still be
/// inspected); [`Layer::to_batchnorm`] validates.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// The prefix of its tensor names (`features.1`, `batch_normalization`, `BatchNorm_0`).
    pub name: String,
    /// The naming convention it was found in or will be written in.
    pub format: Format,
    /// Number of channels.
    pub channels: usize,
    /// Storage type of its floating-point tensors.
    pub dtype: DType,
    /// gamma (`weight`, `gamma`, `scale`), when the layer scales.
    pub weight: Option<Vec<f64>>,
    /// beta (`bias`, `beta`, `bias`), when the layer centers.
    pub bias: Option<Vec<f64>>,
    /// Running mean, when tracked.
    pub running_mean: Option<Vec<f64>>,
    /// Running variance, when tracked (estimator: [`Layer::variance`]).
    pub running_var: Option<Vec<f64>>,
    /// PyTorch's `num_batches_tracked`, when stored.
    pub num_batches_tracked: Option<u64>,
    /// tf_keras batch-renormalization statistics, when stored.
    pub renorm: Option<RenormState>,
    /// eps (recorded by this crate, or the format's default).
    pub eps: f64,
    /// Momentum in its convention (recorded, or the format's default).
    pub momentum: Momentum,
    /// Which variance `running_var` holds.
    pub variance: VarianceEstimator,
    /// Whether eps and momentum were read from this crate's metadata rather than assumed
    /// from the format's defaults (see [`Layer::provenance`] for each one).
    pub conventions_recorded: bool,
    /// Where eps, momentum and the variance estimator come from.
    pub provenance: Provenance,
}

/// Where one convention of a layer (eps, momentum, variance estimator) comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// Recorded in the file (bnorm's metadata, or what a format's reader found stored).
    Recorded,
    /// Not stored in the file: the format's default is assumed (state dicts and Keras /
    /// Flax weight files do not store eps or momentum).
    Assumed,
    /// Given by the user ([`Layer::set_eps`], [`Layer::set_momentum`]).
    Given,
}

impl Source {
    /// `recorded`, `assumed` or `given`.
    ///
    /// ```
    /// assert_eq!(bnorm_interop::Source::Assumed.name(), "assumed");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Source::Recorded => "recorded",
            Source::Assumed => "assumed",
            Source::Given => "given",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where each convention of a [`Layer`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Provenance {
    /// Of [`Layer::eps`].
    pub eps: Source,
    /// Of [`Layer::momentum`].
    pub momentum: Source,
    /// Of [`Layer::variance`].
    pub variance: Source,
}

impl Provenance {
    /// Every convention from the same source.
    pub fn all(source: Source) -> Provenance {
        Provenance {
            eps: source,
            momentum: source,
            variance: source,
        }
    }
}

/// A momentum in words, with the argument each framework takes for it: `decay 0.9 (Keras
/// / Flax momentum=0.9; PyTorch momentum=0.1)`.
///
/// ```
/// let m = bnorm_interop::momentum_in_words(bnorm::Momentum::NewWeight(0.1));
/// assert_eq!(m, "new-batch weight 0.1 (PyTorch momentum=0.1; Keras / Flax momentum=0.9)");
/// ```
pub fn momentum_in_words(m: Momentum) -> String {
    let flip = |x: f64| {
        let y = 1.0 - x;
        format!("{y:.12e}").parse::<f64>().unwrap_or(y)
    };
    match m {
        Momentum::NewWeight(a) => format!(
            "new-batch weight {a} (PyTorch momentum={a}; Keras / Flax momentum={})",
            flip(a)
        ),
        Momentum::Decay(d) => format!(
            "decay {d} (Keras / Flax momentum={d}; PyTorch momentum={})",
            flip(d)
        ),
        Momentum::Cumulative => "cumulative average (PyTorch momentum=None)".into(),
        Momentum::DebiasedDecay(d) => format!(
            "zero-debiased decay {d} (TensorFlow ExponentialMovingAverage(decay={d}, zero_debias=True))"
        ),
        Momentum::WarmupDecay(d) => format!(
            "decay min({d}, (1 + n)/(10 + n)) after n updates (TensorFlow ExponentialMovingAverage(decay={d}, num_updates=n))"
        ),
    }
}

/// Options of [`Layer::convert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConvertOptions {
    /// Values per channel in a training batch (N for (N, C) input, N·H·W for images):
    /// needed to change the running variance's estimator.
    pub batch_size: Option<usize>,
    /// Keep the running-variance values as they are when the estimators differ: inference
    /// outputs stay identical, further training mixes two estimators.
    pub keep_variance: bool,
}

/// Something a conversion did that the user should know about.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    /// The layer.
    pub layer: String,
    /// Whether the conversion of this aspect is exact.
    pub exact: bool,
    /// What was done and what to do about it.
    pub message: String,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = if self.exact { "note" } else { "inexact" };
        write!(f, "{tag}: {}: {}", self.layer, self.message)
    }
}

impl Layer {
    /// A fresh layer in a format's conventions: gamma 1, beta 0, running mean 0, variance 1,
    /// f32 storage, `num_batches_tracked` 0 for PyTorch.
    ///
    /// ```
    /// let l = bnorm_interop::Layer::new("bn", bnorm_interop::Format::Keras, 3);
    /// assert_eq!(l.eps, 1e-3);
    /// assert_eq!(l.num_batches_tracked, None);
    /// ```
    pub fn new(name: &str, format: Format, channels: usize) -> Layer {
        Layer {
            name: name.to_string(),
            format,
            channels,
            dtype: DType::F32,
            weight: Some(vec![1.0; channels]),
            bias: Some(vec![0.0; channels]),
            running_mean: Some(vec![0.0; channels]),
            running_var: Some(vec![1.0; channels]),
            num_batches_tracked: (format == Format::Torch).then_some(0),
            renorm: None,
            eps: format.default_eps(),
            momentum: format.default_momentum(),
            variance: format.variance_estimator(),
            conventions_recorded: false,
            provenance: Provenance::all(Source::Assumed),
        }
    }

    /// Sets eps as given by the user (finite and positive).
    ///
    /// ```
    /// let mut l = bnorm_interop::Layer::new("bn4", bnorm_interop::Format::Torch, 5);
    /// l.set_eps(1e-3)?;
    /// assert_eq!((l.eps, l.provenance.eps), (1e-3, bnorm_interop::Source::Given));
    /// assert!(l.set_eps(0.0).is_err());
    /// # Ok::<(), bnorm_interop::InteropError>(())
    /// ```
    pub fn set_eps(&mut self, eps: f64) -> Result<()> {
        if !(eps.is_finite() && eps > 0.0) {
            return Err(InteropError::InvalidLayer {
                layer: self.name.clone(),
                reason: format!("eps {eps} is not finite and positive"),
            });
        }
        self.eps = eps;
        self.provenance.eps = Source::Given;
        Ok(())
    }

    /// Sets the momentum as given by the user, in the layer's framework's own meaning:
    /// `Some(v)` is PyTorch's `momentum=v` (the new batch's weight) for a PyTorch layer and
    /// Keras' / Flax' `momentum=v` (the decay) otherwise; `None` is PyTorch's
    /// `momentum=None` (a cumulative average).
    ///
    /// ```
    /// let mut l = bnorm_interop::Layer::new("bn", bnorm_interop::Format::Keras, 5);
    /// l.set_momentum(Some(0.9))?;
    /// assert_eq!(l.momentum, bnorm::Momentum::Decay(0.9));
    /// # Ok::<(), bnorm_interop::InteropError>(())
    /// ```
    pub fn set_momentum(&mut self, momentum: Option<f64>) -> Result<()> {
        let bad = |reason: String| InteropError::InvalidLayer {
            layer: self.name.clone(),
            reason,
        };
        self.momentum = match (momentum, self.format) {
            (Some(v), _) if !(0.0..=1.0).contains(&v) => {
                return Err(bad(format!("momentum {v} is not in [0, 1]")))
            }
            (Some(v), Format::Torch) => Momentum::NewWeight(v),
            (Some(v), _) => Momentum::Decay(v),
            (None, Format::Torch) => Momentum::Cumulative,
            (None, f) => {
                return Err(bad(format!(
                    "a cumulative average (momentum=None) is PyTorch's; {f} takes a decay"
                )))
            }
        };
        self.provenance.momentum = Source::Given;
        Ok(())
    }

    pub(super) fn check_lengths(&self) -> Result<()> {
        let c = self.channels;
        let mut all: Vec<(&str, &Vec<f64>)> = Vec::new();
        let opts = [
            ("weight", &self.weight),
            ("bias", &self.bias),
            ("running_mean", &self.running_mean),
            ("running_var", &self.running_var),
        ];
        for (n, v) in opts {
            if let Some(v) = v {
                all.push((n, v));
            }
        }
        if let Some(r) = &self.renorm {
            all.extend([
                ("renorm_mean", &r.mean),
                ("renorm_stddev", &r.stddev),
                ("moving_stddev", &r.moving_stddev),
            ]);
        }
        match all.iter().find(|(_, v)| v.len() != c) {
            Some((n, v)) => Err(InteropError::BadShape {
                tensor: format!("{}.{n}", self.name),
                shape: vec![v.len()],
                expected: format!("[{c}]"),
            }),
            None => Ok(()),
        }
    }

    /// gamma and beta as [`Params`].
    pub fn params(&self) -> Params {
        Params {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
        }
    }

    /// The layer configuration: the layer's eps, momentum and estimator; affine parts and
    /// running statistics as present.
    pub fn config(&self) -> Config {
        Config::torch(self.channels)
            .eps(self.eps)
            .momentum(self.momentum)
            .running_variance(self.variance)
            .scale(self.weight.is_some())
            .center(self.bias.is_some())
            .track_running_stats(self.running_mean.is_some())
    }

    /// A [`BatchNorm`] layer holding these values (validated: lengths, finiteness,
    /// non-negative variances).
    ///
    /// ```
    /// use bnorm::{Layout, Mode};
    /// let mut l = bnorm_interop::Layer::new("bn", bnorm_interop::Format::Torch, 1);
    /// l.running_mean = Some(vec![2.0]);
    /// l.running_var = Some(vec![4.0]);
    /// let mut bn = l.to_batchnorm()?;
    /// let (y, _) = bn.forward(&[4.0f64], &[1, 1], Layout::NC, Mode::Inference)?;
    /// assert!((y[0] - 2.0 / (4.0f64 + 1e-5).sqrt()).abs() < 1e-12);
    /// # Ok::<(), bnorm_interop::InteropError>(())
    /// ```
    pub fn to_batchnorm(&self) -> Result<BatchNorm> {
        self.check_lengths()?;
        let cfg = self.config();
        let mut bn = cfg.clone().build()?;
        bn.set_params(self.params())?;
        if let (Some(m), Some(v)) = (&self.running_mean, &self.running_var) {
            let state = RunningState::from_values(
                &cfg,
                m.clone(),
                v.clone(),
                self.num_batches_tracked.unwrap_or(0),
            )?;
            bn.set_running_state(state)?;
        }
        Ok(bn)
    }

    /// A layer holding the statistics of a trained [`BatchNorm`], in `format`'s names.
    pub fn from_batchnorm(name: &str, format: Format, bn: &BatchNorm) -> Layer {
        let cfg = bn.config();
        let running = bn.running_state();
        Layer {
            name: name.to_string(),
            format,
            channels: cfg.get_channels(),
            dtype: DType::F32,
            weight: bn.params().weight.clone(),
            bias: bn.params().bias.clone(),
            running_mean: running.map(|r| r.mean.clone()),
            running_var: running.map(|r| r.var.clone()),
            num_batches_tracked: running.map(|r| r.updates),
            renorm: running.and_then(|r| r.renorm.clone()),
            eps: cfg.get_eps(),
            momentum: cfg.get_momentum(),
            variance: cfg.get_running_variance(),
            conventions_recorded: true,
            provenance: Provenance::all(Source::Recorded),
        }
    }

    /// Converts the layer to another framework's convention. Momentum is translated
    /// (new weight `a` ↔ decay `1 − a`); eps is kept as a value (a [`Note`] says when it
    /// differs from the target's default, so the target layer must be built with it); the
    /// running variance is rescaled between the biased and unbiased estimators with the
    /// batch size, or kept with [`ConvertOptions::keep_variance`], and otherwise refused
    /// with [`InteropError::NeedBatchSize`]. What cannot be carried exactly (a cumulative
    /// average, renorm statistics, an unknown `num_batches_tracked`) is reported as an
    /// inexact note.
    pub fn convert(&self, to: Format, opts: &ConvertOptions) -> Result<(Layer, Vec<Note>)> {
        let mut out = self.clone();
        let mut notes = Vec::new();
        let mut note = |exact: bool, message: String| {
            notes.push(Note {
                layer: self.name.clone(),
                exact,
                message,
            })
        };
        out.format = to;
        out.conventions_recorded = true;
        let t = self.num_batches_tracked.unwrap_or(0);
        // 1 − x, with the rounding noise of the subtraction removed (1 − 0.9 is 0.1, not
        // 0.09999999999999998), so a converted default reads as the default.
        let flip = |x: f64| {
            let y = 1.0 - x;
            format!("{y:.12e}").parse::<f64>().unwrap_or(y)
        };
        out.momentum = match (self.momentum, to) {
            (Momentum::NewWeight(a), Format::Torch) => Momentum::NewWeight(a),
            (Momentum::NewWeight(a), _) => Momentum::Decay(flip(a)),
            (Momentum::Decay(d), Format::Torch) => Momentum::NewWeight(flip(d)),
            (Momentum::Decay(d), _) => Momentum::Decay(d),
            (Momentum::Cumulative, Format::Torch) => Momentum::Cumulative,
            (Momentum::Cumulative, _) => {
                let d = 1.0 - 1.0 / (t as f64 + 1.0);
                note(
                    false,
                    format!(
                        "momentum=None (cumulative average) has no fixed decay in {to}; \
                         decay {d} (that of the next step after {t}) is used"
                    ),
                );
                Momentum::Decay(d)
            }
            (Momentum::WarmupDecay(d), _) => {
                let n = t as f64;
                let e = d.min((1.0 + n) / (10.0 + n));
                note(
                    e == d,
                    format!(
                        "the num_updates decay min(d, (1 + n)/(10 + n)) becomes a fixed one \
                         in {to}: {e}, that of the next step after n = {t} (the same from \
                         then on once the cap d binds)"
                    ),
                );
                if to == Format::Torch {
                    Momentum::NewWeight(flip(e))
                } else {
                    Momentum::Decay(e)
                }
            }
            (Momentum::DebiasedDecay(d), _) => {
                note(
                    d.powi(t.min(i32::MAX as u64) as i32) < 1e-12,
                    format!(
                        "zero-debiased moving averages become plain ones in {to}: the \
                         published values are kept; the next batch weighs {} instead of \
                         (1 - d)/(1 - d^t) (the same once d^t is negligible; t = {t})",
                        1.0 - d
                    ),
                );
                if to == Format::Torch {
                    Momentum::NewWeight(flip(d))
                } else {
                    Momentum::Decay(d)
                }
            }
        };
        if self.provenance.momentum == Source::Assumed {
            note(
                true,
                format!(
                    "momentum {} is assumed ({}'s default; the file does not store it): \
                     give --momentum if the layer was built with another",
                    momentum_in_words(self.momentum),
                    self.format
                ),
            );
        }
        if self.provenance.eps == Source::Assumed {
            note(
                true,
                format!(
                    "eps {:e} is assumed ({}'s default; the file does not store it): give \
                     --eps if the layer was built with another",
                    self.eps, self.format
                ),
            );
        }
        if out.momentum != to.default_momentum() {
            note(
                true,
                format!(
                    "momentum is {}, not {to}'s default {}: set it when building the layer",
                    momentum_in_words(out.momentum),
                    momentum_in_words(to.default_momentum())
                ),
            );
        }
        if self.eps != to.default_eps() {
            note(
                true,
                format!(
                    "eps {:e} kept; {to}'s default is {:e}: build the layer with eps={:e}",
                    self.eps,
                    to.default_eps(),
                    self.eps
                ),
            );
        }
        let target = to.variance_estimator();
        if let (Some(var), true) = (&self.running_var, target != self.variance) {
            let name = |e: VarianceEstimator| match e {
                VarianceEstimator::Biased => "biased",
                VarianceEstimator::Unbiased => "unbiased",
            };
            if opts.keep_variance {
                note(
                    false,
                    format!(
                        "running variance kept as {} values in a {} convention: inference \
                         outputs are identical, further training mixes the two estimators",
                        name(self.variance),
                        name(target)
                    ),
                );
            } else {
                let m = opts.batch_size.ok_or_else(|| InteropError::NeedBatchSize {
                    layer: self.name.clone(),
                    from: name(self.variance),
                    to: name(target),
                })?;
                if m < 2 {
                    return Err(InteropError::Inexpressible {
                        layer: self.name.clone(),
                        what: format!(
                            "an unbiased variance with {m} value(s) per channel (needs at least 2)"
                        ),
                    });
                }
                let m = m as f64;
                let factor = match target {
                    VarianceEstimator::Unbiased => m / (m - 1.0),
                    VarianceEstimator::Biased => (m - 1.0) / m,
                };
                out.running_var = Some(var.iter().map(|v| v * factor).collect());
                if self.provenance.variance == Source::Assumed {
                    note(
                        true,
                        format!(
                            "the running variance is assumed {} ({}'s default; the file does \
                             not record it){}",
                            name(self.variance),
                            self.format,
                            if self.format == Format::Keras {
                                ": a fused tf_keras layer keeps the unbiased one, which must not \
                                 be rescaled"
                            } else {
                                ""
                            }
                        ),
                    );
                }
                note(
                    true,
                    format!(
                        "running variance rescaled by {factor} from {} to {} (exact when every \
                         training batch had {m} values per channel); inference outputs change \
                         accordingly",
                        name(self.variance),
                        name(target)
                    ),
                );
            }
            out.variance = if opts.keep_variance {
                self.variance
            } else {
                target
            };
        }
        if self.renorm.is_some() && to != Format::Keras {
            out.renorm = None;
            note(
                false,
                format!("batch-renormalization statistics have no place in {to}; dropped (inference does not use them)"),
            );
        }
        // PyTorch's affine BatchNorm has both weight and bias (strict load_state_dict
        // needs both): the missing half is its identity.
        if to == Format::Torch {
            match (&self.weight, &self.bias) {
                (Some(_), None) => {
                    out.bias = Some(vec![0.0; self.channels]);
                    note(
                        true,
                        "the layer has no beta (center=False): PyTorch's affine BatchNorm has \
                         a bias, written as zeros (the same outputs)"
                            .into(),
                    );
                }
                (None, Some(_)) => {
                    out.weight = Some(vec![1.0; self.channels]);
                    note(
                        true,
                        "the layer has no gamma (scale=False): PyTorch's affine BatchNorm has \
                         a weight, written as ones (the same outputs)"
                            .into(),
                    );
                }
                _ => {}
            }
        }
        match to {
            Format::Torch if self.running_mean.is_some() && self.num_batches_tracked.is_none() => {
                out.num_batches_tracked = Some(0);
                note(
                    true,
                    "num_batches_tracked is unknown and written as 0 (PyTorch's strict loading \
                     needs it; it matters only with momentum=None)"
                        .into(),
                );
            }
            Format::Torch => {}
            _ => out.num_batches_tracked = None,
        }
        Ok((out, notes))
    }
}
