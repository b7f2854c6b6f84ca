//! One vocabulary for framework conventions, shared by every subcommand: `demo
//! --convention`, `convert --to`, the conformance files' `convention` field and the
//! conventions `inspect` prints all use these names (older spellings are aliases).

use bnorm::{Config, Momentum};
use bnorm_interop::Format;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};

/// A framework's batch-norm conventions (momentum meaning, default eps, running-variance
/// estimator) under the name every subcommand accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convention {
    /// PyTorch.
    Torch,
    /// Keras 3 / tf_keras (TensorFlow 2's `BatchNormalization`).
    Keras,
    /// Flax linen.
    Flax,
    /// TensorFlow's low-level recipe.
    Tf,
}

impl Convention {
    /// Every convention, in the order help texts list them.
    pub const ALL: [Convention; 4] = [
        Convention::Torch,
        Convention::Keras,
        Convention::Flax,
        Convention::Tf,
    ];

    /// The name every subcommand accepts and prints.
    pub fn name(self) -> &'static str {
        match self {
            Convention::Torch => "torch",
            Convention::Keras => "keras",
            Convention::Flax => "flax",
            Convention::Tf => "tf",
        }
    }

    /// Other spellings accepted for the same convention.
    pub fn aliases(self) -> &'static [&'static str] {
        match self {
            Convention::Torch => &["pytorch"],
            Convention::Keras => &["tf_keras", "tf.keras"],
            Convention::Flax => &[],
            Convention::Tf => &["tensorflow"],
        }
    }

    /// One line on what the convention is.
    pub fn describe(self) -> &'static str {
        match self {
            Convention::Torch => {
                "PyTorch: momentum is the new-batch weight (0.1), eps 1e-5, unbiased running variance"
            }
            Convention::Keras => {
                "Keras 3 / tf_keras (TensorFlow 2's BatchNormalization): momentum is the decay (0.99), \
                 eps 1e-3, biased running variance"
            }
            Convention::Flax => {
                "Flax linen: momentum is the decay (0.99), eps 1e-5, biased running variance"
            }
            Convention::Tf => {
                "TensorFlow's low-level recipe (tf.nn.batch_normalization, zero-debiased moving \
                 averages): decay 0.999, eps 1e-3, beta but no gamma; no checkpoint names of its own"
            }
        }
    }

    /// The checkpoint naming of the convention (`None` for `tf`, whose variables are saved
    /// under Keras names by TensorFlow 2).
    pub fn format(self) -> Option<Format> {
        match self {
            Convention::Torch => Some(Format::Torch),
            Convention::Keras => Some(Format::Keras),
            Convention::Flax => Some(Format::Flax),
            Convention::Tf => None,
        }
    }

    /// The convention named `s` (a name or an alias, any case).
    pub fn parse(s: &str) -> Option<Convention> {
        let s = s.to_ascii_lowercase();
        Convention::ALL
            .into_iter()
            .find(|c| c.name() == s || c.aliases().contains(&s.as_str()))
    }

    /// The layer configuration for `c` channels, with an optional momentum override read in
    /// the convention's own meaning (torch: new-batch weight; keras, flax: decay; tf:
    /// zero-debiased decay).
    #[cfg_attr(not(feature = "demo"), allow(dead_code))] // the demo's; built without it too
    pub fn config(self, c: usize, momentum: Option<f64>) -> Config {
        let (cfg, m): (Config, fn(f64) -> Momentum) = match self {
            Convention::Torch => (Config::torch(c), Momentum::NewWeight),
            Convention::Keras => (Config::keras(c), Momentum::Decay),
            Convention::Flax => (Config::keras(c).eps(1e-5), Momentum::Decay),
            Convention::Tf => (Config::tensorflow(c), Momentum::DebiasedDecay),
        };
        match momentum {
            Some(v) => cfg.momentum(m(v)),
            None => cfg,
        }
    }

    /// The value as clap lists it: the name, its aliases, and its description (which
    /// names the aliases, as clap's help does not show them).
    fn possible_value(self) -> PossibleValue {
        let also = match self.aliases() {
            [] => String::new(),
            a => format!(" (also accepted: {})", a.join(", ")),
        };
        PossibleValue::new(self.name())
            .aliases(self.aliases().iter().copied())
            .help(format!("{}{also}", self.describe()))
    }
}

impl std::fmt::Display for Convention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl clap::ValueEnum for Convention {
    fn value_variants<'a>() -> &'a [Self] {
        &Convention::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(self.possible_value())
    }
}

/// The parser of an argument naming a checkpoint convention (`convert --to`): the
/// conventions with a [`Format`], listed with their descriptions in the help; `tf` is
/// accepted by the parser but refused with a pointer to `keras`.
pub fn format_parser() -> impl TypedValueParser<Value = Format> {
    let values = Convention::ALL
        .into_iter()
        .map(|c| c.possible_value().hide(c.format().is_none()));
    PossibleValuesParser::new(values).try_map(|name: String| {
        Convention::parse(&name)
            .and_then(Convention::format)
            .ok_or_else(|| {
                format!(
                    "{name} (TensorFlow's low-level recipe) has no checkpoint names of its own; \
                     TensorFlow 2 saves batch-norm layers under Keras names: use keras"
                )
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases_parse_to_one_convention() {
        for c in Convention::ALL {
            assert_eq!(Convention::parse(c.name()), Some(c));
            for a in c.aliases() {
                assert_eq!(Convention::parse(a), Some(c));
            }
            if let Some(f) = c.format() {
                assert_eq!(f.name(), c.name(), "the library's name for {f:?}");
            }
        }
        assert_eq!(Convention::parse("PyTorch"), Some(Convention::Torch));
        assert_eq!(Convention::parse("onnx"), None);
    }

    #[test]
    fn configs_follow_the_framework_defaults() {
        let flax = Convention::Flax.config(3, None);
        assert_eq!(flax.get_eps(), 1e-5);
        assert_eq!(flax.get_momentum(), Momentum::Decay(0.99));
        assert_eq!(
            Convention::Tf.config(3, Some(0.9)).get_momentum(),
            Momentum::DebiasedDecay(0.9)
        );
    }
}
