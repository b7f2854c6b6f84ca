//! The one error type of the core crate.

use std::fmt;

use crate::layout::Layout;

/// Everything that can go wrong in the core crate. Every variant is structured, and its
/// `Display` says what to do about it. A call that returns an error has changed nothing:
/// no output buffer is written and no running statistic is updated.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of its domain (for example `eps <= 0`).
    InvalidConfig {
        /// The setting, as named by the builder method (`"eps"`, `"momentum"`, ...).
        setting: &'static str,
        /// The rejected value, printed.
        value: String,
        /// What the setting accepts.
        expected: &'static str,
    },
    /// The input's channel axis (as the layout places it) does not hold the layer's
    /// channel count.
    ChannelMismatch {
        /// Channels of the layer.
        expected: usize,
        /// Channels on the input's channel axis.
        got: usize,
    },
    /// A buffer does not hold as many values as its shape says.
    LengthMismatch {
        /// Which buffer (`"x"`, `"y"`, `"dy"`, `"dx"`, `"residual"`).
        what: &'static str,
        /// Values the shape needs.
        expected: usize,
        /// Values the buffer holds.
        got: usize,
    },
    /// A parameter or statistic the configuration has was not given.
    MissingParameter {
        /// Which (`"weight"`, `"bias"`, `"running_mean"`, ...).
        what: &'static str,
    },
    /// A parameter the configuration does not have was given (for example a `weight` for
    /// a layer built with `scale(false)`).
    UnexpectedParameter {
        /// Which.
        what: &'static str,
    },
    /// A tensor does not have the shape the call needs.
    ShapeMismatch {
        /// Which tensor (`"x"`, `"dy"`, `"weight"`, `"running_mean"`, ...).
        what: &'static str,
        /// The shape that was needed.
        expected: Vec<usize>,
        /// The shape that was given.
        got: Vec<usize>,
    },
    /// The shape has the wrong number of dimensions for the layout.
    RankMismatch {
        /// The layout the data was declared to have.
        layout: Layout,
        /// The shape that was given.
        shape: Vec<usize>,
    },
    /// Batch statistics are needed but a channel has at most one value (`m <= 1`), so the
    /// variance is undefined (PyTorch raises here too; silently writing NaN is worse).
    BatchTooSmall {
        /// Values per channel in the batch (or in one ghost batch).
        channel_values: usize,
    },
    /// A parameter or running statistic holds a value that is not finite (NaN or
    /// infinite).
    NonFiniteParameter {
        /// Which tensor.
        what: &'static str,
        /// The first offending channel.
        channel: usize,
    },
    /// A variance or a standard deviation (running or renorm statistics) is negative.
    NegativeVariance {
        /// Which tensor.
        what: &'static str,
        /// The first offending channel.
        channel: usize,
    },
    /// The batch statistics of some channels were not finite and the configuration's
    /// [`NonFinitePolicy`](crate::config::NonFinitePolicy) is `Error`.
    NonFiniteStatistics {
        /// Channels whose batch mean or variance was NaN or infinite.
        channels: Vec<usize>,
    },
    /// Running statistics are needed (frozen mode, or inference) but the layer does not
    /// track them.
    NoRunningStatistics,
    /// A ghost (virtual) batch size does not divide the batch and the policy forbids a
    /// smaller last group.
    GhostBatchIndivisible {
        /// Samples in the batch.
        batch: usize,
        /// The configured virtual batch size.
        virtual_batch_size: usize,
    },
    /// Inference on running statistics that no training step updated, refused by
    /// [`ColdPolicy::Error`](crate::config::ColdPolicy::Error).
    ColdStatistics,
    /// `backward` was given saved statistics of another shape or configuration.
    SavedMismatch {
        /// What differs.
        reason: &'static str,
    },
    /// Running statistics (or a pending update of them) do not fit the layer's
    /// configuration: given to a layer that does not track them, renorm statistics
    /// missing or extra, ghost-batch updates merged.
    StateMismatch {
        /// What differs.
        reason: &'static str,
    },
    /// The ranks of a synchronized step ([`mod@crate::sync`]) were not called consistently:
    /// a rank has another channel count, configuration, mode or dtype than rank 0, or a
    /// rank failed its own checks (that rank returns its own error, every other rank this
    /// one). Every rank returns an error for the same step; none has written anything.
    SyncMismatch {
        /// The first rank (in rank order) that differs from rank 0 or failed.
        rank: usize,
        /// What differs.
        what: &'static str,
    },
    /// The communicator of a synchronized step failed (a transport error, a poisoned
    /// in-process group, buffers of different lengths).
    Communication {
        /// What went wrong.
        reason: String,
        /// The transport's own error, when it has one
        /// ([`std::error::Error::source`] returns it).
        source: Option<ErrorSource>,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidConfig {
                setting,
                value,
                expected,
            } => write!(f, "invalid {setting} = {value}: expected {expected}"),
            Error::ChannelMismatch { expected, got } => write!(
                f,
                "the input has {got} channel(s) on its channel axis, the layer {expected}: \
                 check the layout (NC, NCL, NCHW, NCDHW put channels second; NLC, NHWC, \
                 NDHWC last) and the layer's channel count"
            ),
            Error::LengthMismatch {
                what,
                expected,
                got,
            } => write!(
                f,
                "{what} holds {got} value(s), its shape needs {expected}: pass the shape \
                 of this buffer"
            ),
            Error::MissingParameter { what } => write!(
                f,
                "{what} is missing, but the configuration has it: pass {what}, or configure \
                 the layer without it (scale, center, track_running_stats)"
            ),
            Error::UnexpectedParameter { what } => write!(
                f,
                "{what} was given, but the configuration has none: drop it, or configure \
                 the layer with it (scale, center, track_running_stats)"
            ),
            Error::ShapeMismatch {
                what,
                expected,
                got,
            } => write!(
                f,
                "shape mismatch for {what}: expected {expected:?}, got {got:?}"
            ),
            Error::RankMismatch { layout, shape } => write!(
                f,
                "layout {layout} needs {} dimensions, got shape {shape:?}",
                layout.rank()
            ),
            Error::BatchTooSmall { channel_values } => write!(
                f,
                "batch too small: {channel_values} value(s) per channel, batch statistics need \
                 at least 2 (use a larger batch, or inference/frozen mode with running statistics)"
            ),
            Error::NonFiniteParameter { what, channel } => write!(
                f,
                "{what}[{channel}] is NaN or infinite: load finite values (a NaN in gamma or \
                 beta usually means training diverged)"
            ),
            Error::NegativeVariance { what, channel } if what.contains("stddev") => write!(
                f,
                "{what}[{channel}] is a negative standard deviation: load the standard \
                 deviation itself, not a log or a difference"
            ),
            Error::NegativeVariance { what, channel } => write!(
                f,
                "{what}[{channel}] is a negative variance: load the variance, not a standard \
                 deviation or a log-variance"
            ),
            Error::NonFiniteStatistics { channels } => write!(
                f,
                "batch statistics are not finite in channel(s) {channels:?}: the input holds \
                 NaN or infinity; running statistics were left unchanged"
            ),
            Error::NoRunningStatistics => write!(
                f,
                "this layer does not track running statistics: use training mode, or build it \
                 with track_running_stats(true)"
            ),
            Error::GhostBatchIndivisible {
                batch,
                virtual_batch_size,
            } => write!(
                f,
                "virtual batch size {virtual_batch_size} does not divide the batch of {batch} \
                 samples: change the batch size or allow a smaller last group"
            ),
            Error::ColdStatistics => write!(
                f,
                "the running statistics were never updated (mean 0, variance 1 or a checkpoint \
                 without statistics): train first, load trained statistics, or recalibrate"
            ),
            Error::SavedMismatch { reason } => write!(
                f,
                "saved statistics do not belong to this backward call: {reason}"
            ),
            Error::StateMismatch { reason } => write!(
                f,
                "the running statistics do not fit this layer's configuration: {reason}"
            ),
            Error::SyncMismatch { rank, what } => write!(
                f,
                "synchronized batch norm: rank {rank} differs from rank 0 in {what}; every \
                 rank must make the same call (same configuration, channels, mode, dtype)"
            ),
            Error::Communication { reason, .. } => {
                write!(f, "synchronized batch norm: communication failed: {reason}")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Communication {
                source: Some(s), ..
            } => Some(&*s.0),
            _ => None,
        }
    }
}

impl Error {
    /// A communication failure of a [`Communicator`](crate::sync::Communicator)
    /// implementation, keeping the transport's error as its source.
    ///
    /// ```
    /// use std::error::Error as _;
    /// let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "peer 3 went away");
    /// let e = bnorm::Error::communication("all_gather over TCP", Some(io));
    /// assert_eq!(e.source().unwrap().to_string(), "peer 3 went away");
    /// ```
    pub fn communication<E: std::error::Error + Send + Sync + 'static>(
        reason: impl Into<String>,
        source: Option<E>,
    ) -> Error {
        Error::Communication {
            reason: reason.into(),
            source: source.map(|s| ErrorSource(std::sync::Arc::new(s))),
        }
    }
}

/// The underlying error of an [`Error::Communication`], shared so that [`Error`] stays
/// `Clone`; two are equal when they are the same error or print the same.
#[derive(Debug, Clone)]
pub struct ErrorSource(pub std::sync::Arc<dyn std::error::Error + Send + Sync>);

impl PartialEq for ErrorSource {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl fmt::Display for ErrorSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
