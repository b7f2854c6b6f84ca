//! Python names to core values: the convention presets and the `Config` setters by name,
//! layouts, modes and dtypes.

use bnorm::config::{Ghost, Renorm, SingleValuePolicy, Variant};
use bnorm::element::DType;
use bnorm::{Config, Error, Layout, Mode, Momentum, VarianceEstimator};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::raise;

/// The conventions of `bnorm.BatchNorm(convention=...)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convention {
    /// [`Config::torch`]; a float momentum is the new batch's weight.
    Torch,
    /// [`Config::keras`]; a float momentum is the decay of the old value.
    Keras,
    /// [`Config::tensorflow`]; a float momentum is the zero-debiased decay.
    Tensorflow,
}

fn invalid(setting: &'static str, value: String, expected: &'static str) -> PyErr {
    raise(Error::InvalidConfig {
        setting,
        value,
        expected,
    })
}

impl Convention {
    /// Parses `"torch"`, `"keras"`, `"tensorflow"`.
    pub fn parse(name: &str) -> PyResult<Convention> {
        match name {
            "torch" => Ok(Convention::Torch),
            "keras" => Ok(Convention::Keras),
            "tensorflow" => Ok(Convention::Tensorflow),
            _ => Err(invalid(
                "convention",
                name.into(),
                "\"torch\", \"keras\" or \"tensorflow\"",
            )),
        }
    }

    fn preset(self, channels: usize) -> Config {
        match self {
            Convention::Torch => Config::torch(channels),
            Convention::Keras => Config::keras(channels),
            Convention::Tensorflow => Config::tensorflow(channels),
        }
    }

    fn momentum(self, m: Option<f64>) -> Momentum {
        match (self, m) {
            (_, None) => Momentum::Cumulative,
            (Convention::Torch, Some(m)) => Momentum::NewWeight(m),
            (Convention::Keras, Some(m)) => Momentum::Decay(m),
            (Convention::Tensorflow, Some(m)) => Momentum::DebiasedDecay(m),
        }
    }
}

/// A validated configuration from a convention's preset and settings by setter name
/// (`eps`, `momentum` — `None` is the cumulative average —, `affine`, `scale`, `center`,
/// `track_running_stats`, `running_variance`, `non_finite`, `cold_statistics`,
/// `single_value` — `"refuse"` or `"accept"` one value per channel, default the
/// convention's: torch refuses, keras and tensorflow accept —, `ema_num_updates` — with
/// the keras convention, the decay capped at `(1 + n)/(10 + n)`, `n` the updates so far,
/// as `tf.train.ExponentialMovingAverage(decay, num_updates=n)` —; the
/// variants: `virtual_batch_size` — tf_keras's strided ghost batches — and `renorm`).
pub fn config(
    channels: usize,
    convention: &str,
    settings: Option<&Bound<'_, PyDict>>,
) -> PyResult<Config> {
    let convention = Convention::parse(convention)?;
    let mut cfg = convention.preset(channels);
    let mut num_updates_cap = false;
    for (name, value) in settings.into_iter().flat_map(|d| d.iter()) {
        let name: String = name.extract()?;
        cfg = match name.as_str() {
            "eps" => cfg.eps(value.extract()?),
            "momentum" => cfg.momentum(convention.momentum(value.extract()?)),
            "affine" => cfg.affine(value.extract()?),
            "scale" => cfg.scale(value.extract()?),
            "center" => cfg.center(value.extract()?),
            "track_running_stats" => cfg.track_running_stats(value.extract()?),
            "running_variance" => {
                let v: String = value.extract()?;
                cfg.running_variance(match v.as_str() {
                    "biased" => VarianceEstimator::Biased,
                    "unbiased" => VarianceEstimator::Unbiased,
                    _ => return Err(invalid("running_variance", v, "\"biased\" or \"unbiased\"")),
                })
            }
            "non_finite" => {
                let v: String = value.extract()?;
                cfg.non_finite(match v.as_str() {
                    "skip_channel" => bnorm::config::NonFinitePolicy::SkipChannel,
                    "error" => bnorm::config::NonFinitePolicy::Error,
                    _ => return Err(invalid("non_finite", v, "\"skip_channel\" or \"error\"")),
                })
            }
            "cold_statistics" => {
                let v: String = value.extract()?;
                cfg.cold_statistics(match v.as_str() {
                    "allow" => bnorm::config::ColdPolicy::Allow,
                    "report" => bnorm::config::ColdPolicy::Report,
                    "error" => bnorm::config::ColdPolicy::Error,
                    _ => {
                        return Err(invalid(
                            "cold_statistics",
                            v,
                            "\"allow\", \"report\" or \"error\"",
                        ))
                    }
                })
            }
            "single_value" => {
                let v: String = value.extract()?;
                cfg.single_value(match v.as_str() {
                    "refuse" => SingleValuePolicy::Refuse,
                    "accept" => SingleValuePolicy::Accept,
                    _ => return Err(invalid("single_value", v, "\"refuse\" or \"accept\"")),
                })
            }
            "ema_num_updates" => {
                num_updates_cap = value.extract()?;
                cfg
            }
            // both together: renorm of ghost batches, as tf_keras's
            // `BatchNormalization(renorm=True, virtual_batch_size=v)`
            "virtual_batch_size" => {
                let ghost = Ghost::strided(value.extract()?);
                let variant = match cfg.get_variant().renorm() {
                    Some(renorm) => Variant::GhostRenorm { ghost, renorm },
                    None => Variant::Ghost(ghost),
                };
                cfg.variant(variant)
            }
            "renorm" => {
                let renorm = renorm(&value)?;
                let variant = match cfg.get_variant().ghost() {
                    Some(ghost) => Variant::GhostRenorm { ghost, renorm },
                    None => Variant::Renorm(renorm),
                };
                cfg.variant(variant)
            }
            other => {
                return Err(PyTypeError::new_err(format!(
                    "unknown bnorm setting {other:?} (settings: eps, momentum, affine, scale, \
                     center, track_running_stats, running_variance, non_finite, \
                     cold_statistics, single_value, ema_num_updates, virtual_batch_size, \
                     renorm)"
                )))
            }
        };
    }
    if num_updates_cap {
        // tf.train.ExponentialMovingAverage(decay, num_updates=…): the keras convention's
        // decay, capped at (1 + n)/(10 + n) while few updates are counted
        cfg = match (convention, cfg.get_momentum()) {
            (Convention::Keras, Momentum::Decay(d)) => cfg.momentum(Momentum::WarmupDecay(d)),
            _ => {
                return Err(invalid(
                    "ema_num_updates",
                    "True".into(),
                    "the keras convention with a float momentum (the decay that \
                     ExponentialMovingAverage(num_updates=…) caps)",
                ))
            }
        };
    }
    cfg.validate().map_err(raise)?;
    Ok(cfg)
}

/// Batch renormalization from `True` (tf_keras's clipping `rmax = 3, dmax = 5`) or a dict
/// with any of `rmax`, `rmin`, `dmax`, `momentum` (the renorm momentum).
fn renorm(value: &Bound<'_, PyAny>) -> PyResult<Renorm> {
    let mut r = Renorm::default();
    if let Ok(on) = value.extract::<bool>() {
        return if on {
            Ok(r)
        } else {
            Err(invalid(
                "renorm",
                "False".into(),
                "True or a dict of rmax, rmin, dmax, momentum",
            ))
        };
    }
    let d = value.cast::<PyDict>()?;
    for (k, v) in d.iter() {
        let k: String = k.extract()?;
        let v: f64 = v.extract()?;
        match k.as_str() {
            "rmax" => r.rmax = v,
            "rmin" => r.rmin = v,
            "dmax" => r.dmax = v,
            "momentum" => r.momentum = v,
            _ => return Err(invalid("renorm", k, "keys rmax, rmin, dmax, momentum")),
        }
    }
    Ok(r)
}

/// Parses a layout name (`"NCHW"`, `"NHWC"`, ...).
pub fn layout(name: &str) -> PyResult<Layout> {
    Layout::parse(name).ok_or_else(|| {
        invalid(
            "layout",
            name.into(),
            "NC, NCL, NCHW, NCDHW, NLC, NHWC or NDHWC",
        )
    })
}

/// Parses `"train"`, `"inference"`, `"frozen"`.
pub fn mode(name: &str) -> PyResult<Mode> {
    match name {
        "train" => Ok(Mode::Train),
        "inference" => Ok(Mode::Inference),
        "frozen" => Ok(Mode::Frozen),
        _ => Err(invalid(
            "mode",
            name.into(),
            "\"train\", \"inference\" or \"frozen\"",
        )),
    }
}

/// Parses `"f32"`, `"f64"`, `"f16"`, `"bf16"`.
pub fn dtype(name: &str) -> PyResult<DType> {
    DType::parse(name).ok_or_else(|| invalid("dtype", name.into(), "f32, f64, f16 or bf16"))
}
