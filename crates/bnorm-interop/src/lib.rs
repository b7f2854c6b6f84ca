//! Moving batch-norm layers between frameworks and into deployment.
//!
//! Most silent failures of a ported model happen here: momentum that means the new weight
//! in PyTorch and the decay in Keras, a different default eps, an unbiased running variance
//! read as a biased one, a missing `num_batches_tracked`, statistics folded into a
//! convolution in half precision. This module makes each of those explicit:
//!
//! * [`Checkpoint`] reads and writes safetensors files and refuses corrupt, truncated or
//!   hostile ones with a clear [`InteropError`] (length checks, overflow-safe shape
//!   products, dtype checks). [`Checkpoint::layers`] finds every batch-norm layer by its
//!   names in each [`Format`]: PyTorch state_dict (`<prefix>.weight`, `.bias`,
//!   `.running_mean`, `.running_var`, `.num_batches_tracked`), Keras / tf_keras
//!   (`<prefix>/gamma`, `beta`, `moving_mean`, `moving_variance`, and the renorm
//!   variables), Flax (`params/<prefix>/scale`, `bias`, `batch_stats/<prefix>/mean`,
//!   `var`).
//! * [`Layer::convert`] moves a layer to another convention: momentum is translated, eps is
//!   kept (and recorded), and what cannot be converted exactly is either refused (a change
//!   of variance estimator without the batch size) or reported as a [`Note`].
//! * [`fold_into_preceding`] / [`fold_into_following`] fold inference-mode batch norm into
//!   the neighbouring linear or convolution layer, in f64 with one final cast, and report
//!   the largest error against the unfolded pair on a probe input.
//! * [`inspect`] checks a layer's health ([`Problem`]).
//! * [`write_atomic`] writes a file through a temporary file and a rename.
//!
//! ```
//! use bnorm_interop::{Checkpoint, Format, Layer, ConvertOptions};
//! // A PyTorch BatchNorm1d(2) as it would sit in a state_dict.
//! let mut layer = Layer::new("bn1", Format::Torch, 2);
//! layer.running_mean = Some(vec![0.5, -1.0]);
//! layer.running_var = Some(vec![2.0, 0.25]);
//! layer.num_batches_tracked = Some(10);
//! let mut ckpt = Checkpoint::default();
//! ckpt.insert_layer(&layer, bnorm::element::DType::F32)?;
//! let bytes = ckpt.to_bytes()?;
//!
//! let back = Checkpoint::from_bytes(&bytes)?.layers()?;
//! assert_eq!(back.len(), 1);
//! assert_eq!(back[0].name, "bn1");
//! assert_eq!(back[0].num_batches_tracked, Some(10));
//!
//! // To Keras: the unbiased variance needs the batch size (values per channel) ...
//! assert!(back[0].convert(Format::Keras, &ConvertOptions::default()).is_err());
//! // ... and with it the momentum 0.1 (new weight) becomes decay 0.9.
//! let (keras, _notes) = back[0].convert(Format::Keras,
//!     &ConvertOptions { batch_size: Some(8), ..Default::default() })?;
//! assert_eq!(keras.momentum, bnorm::Momentum::Decay(0.9));
//! assert!((keras.running_var.as_ref().unwrap()[0] - 2.0 * 7.0 / 8.0).abs() < 1e-12);
//! # Ok::<(), bnorm_interop::InteropError>(())
//! ```

mod checkpoint;
mod error;
mod fold;
mod format;
mod inspect;
mod layer;
pub mod read;

pub use checkpoint::{read_layers, write_atomic, Checkpoint, Tensor};
pub use error::InteropError;
pub use fold::{fold_into_following, fold_into_preceding, BnAffine, Folded, LinearKind};
pub use format::Format;
pub use inspect::{inspect, Problem};
pub use layer::{momentum_in_words, ConvertOptions, Layer, Note, Provenance, Source};

/// Shorthand for results of this module.
pub type Result<T> = std::result::Result<T, InteropError>;
