//! The error type of the interop module.

use std::fmt;
use std::path::PathBuf;

/// Everything that can go wrong while reading, converting, folding or writing batch-norm
/// checkpoints. Each variant is structured and its `Display` says what to do.
#[derive(Debug)]
#[non_exhaustive]
pub enum InteropError {
    /// A file could not be read or written.
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The bytes are not a valid safetensors file (corrupt, truncated or hostile).
    Malformed {
        /// What check failed.
        reason: String,
    },
    /// The file is of a known format but cannot be read: corrupt, truncated, hostile, or
    /// using a part of the format this reader refuses (a pickle that is more than a tensor
    /// state dict, an HDF5 filter it does not know).
    Unreadable {
        /// The format ([`FileFormat::name`](crate::read::FileFormat::name), or `zip`).
        format: &'static str,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The file is of no format this crate reads.
    UnknownFormat {
        /// What it looks like.
        reason: String,
    },
    /// A tensor has a dtype this role does not accept.
    UnsupportedDtype {
        /// The tensor name.
        tensor: String,
        /// The dtype found.
        dtype: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// A tensor has a shape this role does not accept.
    BadShape {
        /// The tensor name.
        tensor: String,
        /// The shape found.
        shape: Vec<usize>,
        /// What is accepted.
        expected: String,
    },
    /// A tensor that is needed is not in the checkpoint.
    MissingTensor {
        /// The tensor name.
        tensor: String,
    },
    /// No batch-norm layer with this prefix was found.
    NoSuchLayer {
        /// The prefix looked for.
        name: String,
    },
    /// The running variance would have to change estimator (biased / unbiased) and the
    /// number of values per channel in a training batch is not known.
    NeedBatchSize {
        /// The layer.
        layer: String,
        /// The estimator the stored variance uses.
        from: &'static str,
        /// The estimator the target convention uses.
        to: &'static str,
    },
    /// A value cannot be represented in the target convention.
    Inexpressible {
        /// The layer.
        layer: String,
        /// What cannot be converted.
        what: String,
    },
    /// Folding is not exact for this layer arrangement and was refused.
    FoldNotExact {
        /// Why.
        reason: &'static str,
    },
    /// A layer's values are invalid for the requested operation (non-finite, negative
    /// variance, missing running statistics).
    InvalidLayer {
        /// The layer.
        layer: String,
        /// What is wrong.
        reason: String,
    },
    /// Serializing the output failed.
    Serialize {
        /// The serializer's message.
        reason: String,
    },
    /// An error of the core crate.
    Core(bnorm::Error),
}

impl fmt::Display for InteropError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InteropError::Io { path, source } => {
                write!(f, "cannot access {}: {source}", path.display())
            }
            InteropError::Malformed { reason } => write!(
                f,
                "not a valid safetensors file: {reason} (the file is corrupt, truncated or not \
                 safetensors; re-export it)"
            ),
            InteropError::Unreadable { format, reason } => {
                write!(f, "cannot read this {format} file: {reason}")
            }
            InteropError::UnknownFormat { reason } => {
                write!(f, "not a checkpoint bnorm can read: {reason}")
            }
            InteropError::UnsupportedDtype {
                tensor,
                dtype,
                expected,
            } => write!(
                f,
                "tensor {tensor} has dtype {dtype}, expected {expected} (convert it before \
                 loading)"
            ),
            InteropError::BadShape {
                tensor,
                shape,
                expected,
            } => write!(
                f,
                "tensor {tensor} has shape {shape:?}, expected {expected} (check that the names \
                 belong to a batch-norm layer and its neighbour)"
            ),
            InteropError::MissingTensor { tensor } => {
                write!(
                    f,
                    "tensor {tensor} is not in the checkpoint (check the name)"
                )
            }
            InteropError::NoSuchLayer { name } => write!(
                f,
                "no batch-norm layer named {name:?} (run `bnorm inspect FILE` to list them)"
            ),
            InteropError::NeedBatchSize { layer, from, to } => write!(
                f,
                "layer {layer}: the running variance is {from} and the target convention keeps \
                 it {to}; converting needs the number of values per channel in a training batch \
                 (N for (N, C) input, N*H*W for images): give the batch size (--batch-size), or \
                 keep the values unchanged (--keep-variance) to preserve inference outputs"
            ),
            InteropError::Inexpressible { layer, what } => {
                write!(
                    f,
                    "layer {layer}: {what} cannot be expressed in the target convention"
                )
            }
            InteropError::FoldNotExact { reason } => {
                write!(f, "folding refused because it would not be exact: {reason}")
            }
            InteropError::InvalidLayer { layer, reason } => {
                write!(
                    f,
                    "layer {layer}: {reason} (fix or retrain the layer first)"
                )
            }
            InteropError::Serialize { reason } => write!(f, "cannot serialize: {reason}"),
            InteropError::Core(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for InteropError {
    // The message of `Io` already ends with its cause and `Core` prints the core error:
    // neither repeats it as a source (a printed chain would say it twice).
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            InteropError::Core(e) => e.source(),
            _ => None,
        }
    }
}

impl From<bnorm::Error> for InteropError {
    fn from(e: bnorm::Error) -> Self {
        InteropError::Core(e)
    }
}
