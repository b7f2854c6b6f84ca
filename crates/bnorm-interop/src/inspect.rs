//! Health checks of a batch-norm layer found in a checkpoint.

use std::fmt;

use super::format::Format;
use super::layer::Layer;
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
    /// The running statistics were never updated (`num_batches_tracked` is 0, or mean 0
    /// and variance 1 everywhere): inference would not normalize.
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
/// l.num_batches_tracked = Some(5);
/// l.running_mean = Some(vec![0.3, f64::NAN]);
/// l.running_var = Some(vec![0.0, 2.0]);
/// assert_eq!(inspect(&l), vec![Problem::NonFinite, Problem::NearZeroVariance]);
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
            if var.iter().any(|&v| (0.0..layer.eps).contains(&v)) {
                out.push(Problem::NearZeroVariance);
            }
            let untouched =
                !mean.is_empty() && mean.iter().all(|&m| m == 0.0) && var.iter().all(|&v| v == 1.0);
            if layer.num_batches_tracked == Some(0) || untouched {
                out.push(Problem::NeverUpdated);
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
