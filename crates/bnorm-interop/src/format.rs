//! The batch-norm tensor names of each framework (PyTorch, Keras / tf_keras, Flax) and
//! their default conventions.

use std::fmt;

use bnorm::{Momentum, VarianceEstimator};

/// The naming convention of a checkpoint's batch-norm tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// PyTorch state_dict: `<p>.weight`, `<p>.bias`, `<p>.running_mean`, `<p>.running_var`,
    /// `<p>.num_batches_tracked`; momentum is the new weight (0.1), eps 1e-5, the running
    /// variance unbiased.
    Torch,
    /// Keras 3 / tf_keras: `<p>/gamma`, `<p>/beta`, `<p>/moving_mean`,
    /// `<p>/moving_variance` (and `renorm_mean`, `renorm_stddev`, `moving_stddev` with
    /// renorm); momentum is the decay (0.99), eps 1e-3, the variance biased.
    Keras,
    /// Flax linen: `params/<p>/scale`, `params/<p>/bias`, `batch_stats/<p>/mean`,
    /// `batch_stats/<p>/var`; momentum is the decay (0.99), eps 1e-5, the variance biased.
    Flax,
}

impl Format {
    /// Every format.
    pub const ALL: [Format; 3] = [Format::Torch, Format::Keras, Format::Flax];

    /// Parses `torch` (`pytorch`), `keras` (`tf_keras`), `flax`.
    ///
    /// ```
    /// use bnorm_interop::Format;
    /// assert_eq!(Format::parse("pytorch"), Some(Format::Torch));
    /// assert_eq!(Format::parse("onnx"), None);
    /// ```
    pub fn parse(s: &str) -> Option<Format> {
        match s.to_ascii_lowercase().as_str() {
            "torch" | "pytorch" => Some(Format::Torch),
            "keras" | "tf_keras" => Some(Format::Keras),
            "flax" => Some(Format::Flax),
            _ => None,
        }
    }

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Torch => "torch",
            Format::Keras => "keras",
            Format::Flax => "flax",
        }
    }

    /// The framework's default eps.
    pub fn default_eps(self) -> f64 {
        match self {
            Format::Torch | Format::Flax => 1e-5,
            Format::Keras => 1e-3,
        }
    }

    /// The framework's default momentum, in its convention.
    pub fn default_momentum(self) -> Momentum {
        match self {
            Format::Torch => Momentum::NewWeight(0.1),
            Format::Keras | Format::Flax => Momentum::Decay(0.99),
        }
    }

    /// Which variance the framework's running variance accumulates.
    pub fn variance_estimator(self) -> VarianceEstimator {
        match self {
            Format::Torch => VarianceEstimator::Unbiased,
            Format::Keras | Format::Flax => VarianceEstimator::Biased,
        }
    }

    /// The leaf name of each role, in this format.
    pub(super) fn leaf(self, role: Role) -> Option<&'static str> {
        use Role::*;
        Some(match (self, role) {
            (Format::Torch, Weight) => "weight",
            (Format::Torch, Bias) => "bias",
            (Format::Torch, Mean) => "running_mean",
            (Format::Torch, Var) => "running_var",
            (Format::Torch, Count) => "num_batches_tracked",
            (Format::Keras, Weight) => "gamma",
            (Format::Keras, Bias) => "beta",
            (Format::Keras, Mean) => "moving_mean",
            (Format::Keras, Var) => "moving_variance",
            (Format::Keras, RenormMean) => "renorm_mean",
            (Format::Keras, RenormStddev) => "renorm_stddev",
            (Format::Keras, MovingStddev) => "moving_stddev",
            (Format::Flax, Weight) => "scale",
            (Format::Flax, Bias) => "bias",
            (Format::Flax, Mean) => "mean",
            (Format::Flax, Var) => "var",
            _ => return None,
        })
    }

    /// The Flax collection of a role.
    pub(super) fn collection(self, role: Role) -> Option<&'static str> {
        match (self, role) {
            (Format::Flax, Role::Weight | Role::Bias) => Some("params"),
            (Format::Flax, _) => Some("batch_stats"),
            _ => None,
        }
    }

    /// The full tensor name this crate writes for a role.
    pub(super) fn tensor_name(self, prefix: &str, role: Role) -> Option<String> {
        let leaf = self.leaf(role)?;
        // A lone module (empty prefix) has bare names: `running_mean`, `params/scale`.
        Some(match (self, prefix.is_empty()) {
            (Format::Torch | Format::Keras, true) => leaf.to_string(),
            (Format::Torch, false) => format!("{prefix}.{leaf}"),
            (Format::Keras, false) => format!("{prefix}/{leaf}"),
            (Format::Flax, true) => format!("{}/{leaf}", self.collection(role)?),
            (Format::Flax, false) => format!("{}/{prefix}/{leaf}", self.collection(role)?),
        })
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Role {
    Weight,
    Bias,
    Mean,
    Var,
    Count,
    RenormMean,
    RenormStddev,
    MovingStddev,
}

pub(super) const ROLES: [Role; 8] = [
    Role::Weight,
    Role::Bias,
    Role::Mean,
    Role::Var,
    Role::Count,
    Role::RenormMean,
    Role::RenormStddev,
    Role::MovingStddev,
];

/// Splits a tensor name into (prefix, leaf): the leaf follows the last `.` or `/`, a
/// TensorFlow `:0` suffix is dropped, and a name without separator (a lone module's
/// state dict: `running_mean`) has the empty prefix.
pub(super) fn split_leaf(name: &str) -> (&str, &str) {
    let name = name.strip_suffix(":0").unwrap_or(name);
    match name.rfind(['.', '/']) {
        Some(idx) => (&name[..idx], &name[idx + 1..]),
        None => ("", name),
    }
}

/// Splits a tensor name into (collection, prefix, leaf) as [`split_leaf`] does, a leading
/// Flax collection (`params`, `batch_stats`) taken off the prefix. Only Flax names are
/// read this way: a PyTorch submodule or a Keras layer may be called `params` too.
pub(super) fn split_name(name: &str) -> (Option<&str>, &str, &str) {
    let (prefix, leaf) = split_leaf(name);
    for coll in ["params", "batch_stats"] {
        if prefix == coll {
            return (Some(coll), "", leaf);
        }
        if let Some(rest) = prefix.strip_prefix(coll) {
            if let Some(rest) = rest.strip_prefix(['.', '/']) {
                return (Some(coll), rest, leaf);
            }
        }
    }
    (None, prefix, leaf)
}
