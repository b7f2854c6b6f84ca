//! Health checks of a batch-norm layer found in a checkpoint.

use std::fmt;

use super::format::Format;
use super::layer::Layer;
use super::read::FileFormat;
use bnorm::element::DType;

/// A problem [`inspect`] found in a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Problem {
    /// A parameter or statistic is NaN or infinite.
    NonFinite,
    /// A running variance is negative.
    NegativeVariance,
    /// A running variance is below eps: eps, not the data, sets that channel's scale
    /// (often a dead channel).
    NearZeroVariance,
    /// The running statistics were never updated: still at their initial values (mean 0 and
    /// variance 1 everywhere, or variance 0 for TensorFlow's moving-average shadows), so
    /// inference would not normalize (or divide by sqrt(eps)). `num_batches_tracked` is
    /// not the signal: a converted layer has trained statistics and a count written as 0.
    NeverUpdated,
    /// A PyTorch layer has running statistics but no `num_batches_tracked`.
    MissingNumBatchesTracked,
    /// eps is below the resolution of the 16-bit storage type near 1, so `var + eps`
    /// rounds to `var` when computed in that type.
    EpsBelowDtypeResolution,
    /// The layer has no running statistics: inference uses batch statistics.
    NoRunningStatistics,
}

impl Problem {
    /// The stable machine-readable code (`non_finite`, `never_updated`, ...).
    ///
    /// ```
    /// assert_eq!(bnorm_interop::Problem::NearZeroVariance.code(), "near_zero_variance");
    /// ```
    pub fn code(self) -> &'static str {
        match self {
            Problem::NonFinite => "non_finite",
            Problem::NegativeVariance => "negative_variance",
            Problem::NearZeroVariance => "near_zero_variance",
            Problem::NeverUpdated => "never_updated",
            Problem::MissingNumBatchesTracked => "missing_num_batches_tracked",
            Problem::EpsBelowDtypeResolution => "eps_below_dtype_resolution",
            Problem::NoRunningStatistics => "no_running_statistics",
        }
    }

    /// What it means and what to do.
    pub fn explain(self) -> &'static str {
        match self {
            Problem::NonFinite => "NaN or infinity in a parameter or statistic: retrain or restore it",
            Problem::NegativeVariance => "negative running variance: the file is corrupt",
            Problem::NearZeroVariance => {
                "running variance below eps in some channel: eps sets its scale (dead channel?)"
            }
            Problem::NeverUpdated => {
                "running statistics never updated: inference would not normalize; train or recalibrate"
            }
            Problem::MissingNumBatchesTracked => {
                "num_batches_tracked missing: PyTorch loads it as 0 (wrong with momentum=None)"
            }
            Problem::EpsBelowDtypeResolution => {
                "eps is lost next to a variance near 1 in this 16-bit dtype: compute in f32 or raise eps"
            }
            Problem::NoRunningStatistics => {
                "no running statistics: inference normalizes with the batch's own statistics"
            }
        }
    }
}

/// The framework a file most likely comes from, for advice in its own words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Tf1,
    Keras,
    Torch,
    Flax,
}

fn origin(file: FileFormat, format: Format) -> Vec<Origin> {
    match file {
        FileFormat::Torch => vec![Origin::Torch],
        FileFormat::Keras | FileFormat::KerasWeights | FileFormat::TfKerasH5 => {
            vec![Origin::Keras]
        }
        FileFormat::Flax => vec![Origin::Flax],
        // A TensorFlow checkpoint: tf.compat.v1 graphs, or Keras layers saved by TF 2.
        FileFormat::TfCheckpoint => vec![Origin::Tf1, Origin::Keras],
        _ => vec![match format {
            Format::Torch => Origin::Torch,
            Format::Keras => Origin::Keras,
            Format::Flax => Origin::Flax,
        }],
    }
}

impl Problem {
    /// What it means and what to do, in the words of the framework the layer most likely
    /// comes from (by the file's format and the layer's naming convention): for
    /// [`Problem::NeverUpdated`] the likely cause in that framework.
    ///
    /// ```
    /// use bnorm_interop::{read::FileFormat, Format, Problem};
    /// let why = Problem::NeverUpdated.advice(FileFormat::Torch, Format::Torch);
    /// assert!(why.contains(".train()"));
    /// ```
    pub fn advice(self, file: FileFormat, format: Format) -> String {
        if self != Problem::NeverUpdated {
            return self.explain().to_string();
        }
        let causes: Vec<&str> = origin(file, format)
            .into_iter()
            .map(|o| match o {
                Origin::Tf1 => {
                    "TensorFlow 1 (tf.compat.v1): the moving-average update ops were not run; \
                     put the train op under tf.control_dependencies(tf.compat.v1.get_collection(\
                     tf.compat.v1.GraphKeys.UPDATE_OPS))"
                }
                Origin::Keras => {
                    "Keras: the layer was never called with training=True (or was frozen, \
                     trainable=False, during fit)"
                }
                Origin::Torch => {
                    "PyTorch: the module was never in .train() mode during training (or was \
                     built with track_running_stats=False or momentum=0)"
                }
                Origin::Flax => {
                    "Flax: batch_stats was not marked mutable (mutable=['batch_stats']) or \
                     use_running_average=True during training, or the updated batch_stats were \
                     not kept"
                }
            })
            .collect();
        format!(
            "running statistics still at their initial values (mean 0 and variance 1, or 0 for \
             a TensorFlow moving average): inference would not normalize. Likely cause: {}. \
             Retrain with the statistics updating, or recalibrate them on training data",
            causes.join("; or ")
        )
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Checks a layer's health; an empty list means healthy. Sorted, without duplicates.
///
/// ```
/// use bnorm_interop::{inspect, Format, Layer, Problem};
/// let mut l = Layer::new("bn", Format::Torch, 2);
/// assert_eq!(inspect(&l), vec![Problem::NeverUpdated]);
/// l.running_mean = Some(vec![0.3, -0.1]);
/// assert_eq!(inspect(&l), vec![], "a count of 0 alone is not the signal");
/// l.num_batches_tracked = Some(5);
/// l.running_mean = Some(vec![0.3, f64::NAN]);
/// l.running_var = Some(vec![0.0, 2.0]);
/// assert_eq!(inspect(&l), vec![Problem::NonFinite, Problem::NearZeroVariance]);
/// // TensorFlow's moving-average shadows start at mean 0, variance 0
/// l.running_mean = Some(vec![0.0, 0.0]);
/// l.running_var = Some(vec![0.0, 0.0]);
/// assert_eq!(inspect(&l), vec![Problem::NeverUpdated]);
/// ```
pub fn inspect(layer: &Layer) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut all = Vec::new();
    for v in [
        &layer.weight,
        &layer.bias,
        &layer.running_mean,
        &layer.running_var,
    ]
    .into_iter()
    .flatten()
    {
        all.extend_from_slice(v);
    }
    if let Some(r) = &layer.renorm {
        all.extend(r.mean.iter().chain(&r.stddev).chain(&r.moving_stddev));
    }
    if all.iter().any(|v| !v.is_finite()) {
        out.push(Problem::NonFinite);
    }
    match (&layer.running_mean, &layer.running_var) {
        (Some(mean), Some(var)) => {
            if var.iter().any(|&v| v < 0.0) {
                out.push(Problem::NegativeVariance);
            }
            // The initial values: mean 0 and variance 1 (every framework's layer), or mean
            // 0 and variance 0 (the shadows of TensorFlow's ExponentialMovingAverage, which
            // the classic tf.nn.moments recipe keeps as its moving statistics, start at 0).
            let zero_mean = !mean.is_empty() && mean.iter().all(|&m| m == 0.0);
            let initial_var = var.iter().all(|&v| v == 1.0) || var.iter().all(|&v| v == 0.0);
            if zero_mean && initial_var {
                out.push(Problem::NeverUpdated);
            } else if var.iter().any(|&v| (0.0..layer.eps).contains(&v)) {
                out.push(Problem::NearZeroVariance);
            }
            if layer.format == Format::Torch && layer.num_batches_tracked.is_none() {
                out.push(Problem::MissingNumBatchesTracked);
            }
        }
        _ => out.push(Problem::NoRunningStatistics),
    }
    if matches!(layer.dtype, DType::F16 | DType::BF16) && layer.eps < layer.dtype.unit_roundoff() {
        out.push(Problem::EpsBelowDtypeResolution);
    }
    out.sort();
    out.dedup();
    out
}
