//! Memory layouts and the one geometry every kernel works on.
//!
//! Every supported layout is a row-major array whose elements can be addressed as
//! `(outer, channel, inner)` with flat index `(o · C + c) · inner + i`:
//!
//! | layout | shape | outer | inner |
//! | --- | --- | --- | --- |
//! | `NC` | (N, C) | N | 1 |
//! | `NCL`, `NCHW`, `NCDHW` | (N, C, spatial…) | N | product of spatial |
//! | `NLC`, `NHWC`, `NDHWC` | (N, spatial…, C) | N · product of spatial | 1 |
//!
//! So channels-first data has long contiguous runs of one channel, and channels-last data
//! (and `NC`) has rows of C interleaved channels. The kernels have one loop shape for each.

use std::fmt;

use crate::error::{Error, Result};

/// The physical order of a batch. `C` is the channel axis; `N` is the batch axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// (N, C): fully connected activations (`BatchNorm1d` on 2-D input).
    NC,
    /// (N, C, L): sequences, channels first (`BatchNorm1d` on 3-D input).
    NCL,
    /// (N, C, H, W): images, channels first (`BatchNorm2d`).
    NCHW,
    /// (N, C, D, H, W): volumes, channels first (`BatchNorm3d`).
    NCDHW,
    /// (N, L, C): sequences, channels last.
    NLC,
    /// (N, H, W, C): images, channels last (Keras and TensorFlow default).
    NHWC,
    /// (N, D, H, W, C): volumes, channels last.
    NDHWC,
}

impl Layout {
    /// Every layout, in a fixed order (handy for tests and sweeps).
    pub const ALL: [Layout; 7] = [
        Layout::NC,
        Layout::NCL,
        Layout::NCHW,
        Layout::NCDHW,
        Layout::NLC,
        Layout::NHWC,
        Layout::NDHWC,
    ];

    /// Number of dimensions of a tensor in this layout.
    ///
    /// ```
    /// assert_eq!(bnorm::Layout::NHWC.rank(), 4);
    /// ```
    pub fn rank(self) -> usize {
        match self {
            Layout::NC => 2,
            Layout::NCL | Layout::NLC => 3,
            Layout::NCHW | Layout::NHWC => 4,
            Layout::NCDHW | Layout::NDHWC => 5,
        }
    }

    /// Whether the channel axis is the last (fastest-varying) one.
    ///
    /// ```
    /// assert!(bnorm::Layout::NHWC.is_channels_last());
    /// assert!(!bnorm::Layout::NCHW.is_channels_last());
    /// ```
    pub fn is_channels_last(self) -> bool {
        matches!(
            self,
            Layout::NC | Layout::NLC | Layout::NHWC | Layout::NDHWC
        )
    }

    /// Index of the channel axis in the shape.
    pub fn channel_axis(self) -> usize {
        if self.is_channels_last() {
            self.rank() - 1
        } else {
            1
        }
    }

    /// The layout of the same data with the channel axis moved to the other end
    /// (`NCHW` ↔ `NHWC`, ...); `NC` maps to itself.
    pub fn transposed(self) -> Layout {
        match self {
            Layout::NC => Layout::NC,
            Layout::NCL => Layout::NLC,
            Layout::NLC => Layout::NCL,
            Layout::NCHW => Layout::NHWC,
            Layout::NHWC => Layout::NCHW,
            Layout::NCDHW => Layout::NDHWC,
            Layout::NDHWC => Layout::NCDHW,
        }
    }

    /// Parses the names used by the conformance files (`"NCHW"`, ...), case-insensitively.
    ///
    /// ```
    /// assert_eq!(bnorm::Layout::parse("nhwc"), Some(bnorm::Layout::NHWC));
    /// ```
    pub fn parse(name: &str) -> Option<Layout> {
        Layout::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(name))
    }

    /// The canonical name, as in the conformance files.
    pub fn name(self) -> &'static str {
        match self {
            Layout::NC => "NC",
            Layout::NCL => "NCL",
            Layout::NCHW => "NCHW",
            Layout::NCDHW => "NCDHW",
            Layout::NLC => "NLC",
            Layout::NHWC => "NHWC",
            Layout::NDHWC => "NDHWC",
        }
    }

    /// Checks `shape` against this layout and returns its [`Geometry`].
    ///
    /// ```
    /// use bnorm::Layout;
    /// let g = Layout::NCHW.geometry(&[8, 3, 4, 5])?;
    /// assert_eq!((g.outer, g.channels, g.inner, g.batch), (8, 3, 20, 8));
    /// let g = Layout::NHWC.geometry(&[8, 4, 5, 3])?;
    /// assert_eq!((g.outer, g.channels, g.inner, g.batch), (160, 3, 1, 8));
    /// # Ok::<(), bnorm::Error>(())
    /// ```
    pub fn geometry(self, shape: &[usize]) -> Result<Geometry> {
        if shape.len() != self.rank() {
            return Err(Error::RankMismatch {
                layout: self,
                shape: shape.to_vec(),
            });
        }
        let overflow = || Error::ShapeMismatch {
            what: "x",
            expected: vec![],
            got: shape.to_vec(),
        };
        let product = |dims: &[usize]| {
            dims.iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(overflow)
        };
        let batch = shape[0];
        let channels = shape[self.channel_axis()];
        let (outer, inner) = if self.is_channels_last() {
            (product(&shape[..shape.len() - 1])?, 1)
        } else {
            (batch, product(&shape[2..])?)
        };
        product(shape)?;
        Ok(Geometry {
            outer,
            channels,
            inner,
            batch,
        })
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A batch seen as `(outer, channels, inner)`, flat index `(o · channels + c) · inner + i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Number of outer rows (N for channels-first, N · spatial for channels-last).
    pub outer: usize,
    /// Number of channels C.
    pub channels: usize,
    /// Length of one contiguous run of a channel (spatial size for channels-first, 1 for
    /// channels-last).
    pub inner: usize,
    /// Number of samples N (the first axis).
    pub batch: usize,
}

impl Geometry {
    /// Total number of elements.
    pub fn len(&self) -> usize {
        self.outer * self.channels * self.inner
    }

    /// Whether the batch holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values per channel, `m = len / C`.
    pub fn per_channel(&self) -> usize {
        self.outer * self.inner
    }

    /// Elements that belong to one sample (all channels).
    pub fn per_sample(&self) -> usize {
        self.len().checked_div(self.batch).unwrap_or(0)
    }
}
