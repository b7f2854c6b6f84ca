//! Reading the checkpoints users have: every file format is recognized by its content,
//! parsed without executing anything from it, and turned into a [`Checkpoint`] whose
//! batch-norm tensors carry the names of one of the [`Format`](crate::Format)s (the name
//! the user knows: PyTorch module path, Keras layer name, TensorFlow variable scope, Flax
//! module path, ONNX node name) and whose metadata records the conventions (eps,
//! momentum, variance estimator) where the file stores them.
//!
//! One file a format: [`torch`] (zip + a pickle interpreter that knows only what a
//! tensor state dict needs), [`keras`] (Keras 3 `.keras` and `.weights.h5`, tf_keras
//! `.h5`), [`tf`] (TensorFlow tensor bundles: `.index` + `.data-*`), [`flax`] (msgpack)
//! and [`onnx`]; safetensors is [`Checkpoint::from_bytes`].

use std::fmt;
use std::io::Cursor;
use std::path::Path;

use crate::{Checkpoint, InteropError, Result};

pub mod flax;
pub mod keras;
pub mod onnx;
mod pickle;
mod protobuf;
pub mod tf;
pub mod torch;

/// The kind of file a checkpoint was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FileFormat {
    /// safetensors.
    Safetensors,
    /// PyTorch `torch.save` (zip of a pickle and tensor storages).
    Torch,
    /// Keras 3 `.keras` (zip of `config.json` and `model.weights.h5`).
    Keras,
    /// Keras 3 `.weights.h5`.
    KerasWeights,
    /// tf_keras / Keras 2 `.h5` (whole model or weights only).
    TfKerasH5,
    /// TensorFlow checkpoint (tensor bundle: `.index` and `.data-NNNNN-of-NNNNN`).
    TfCheckpoint,
    /// Flax `serialization.to_bytes` (msgpack).
    Flax,
    /// ONNX model.
    Onnx,
}

impl FileFormat {
    /// Short name (used by `--json`).
    ///
    /// ```
    /// assert_eq!(bnorm_interop::read::FileFormat::Torch.name(), "pytorch");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            FileFormat::Safetensors => "safetensors",
            FileFormat::Torch => "pytorch",
            FileFormat::Keras => "keras",
            FileFormat::KerasWeights => "keras-weights-h5",
            FileFormat::TfKerasH5 => "tf-keras-h5",
            FileFormat::TfCheckpoint => "tensorflow-checkpoint",
            FileFormat::Flax => "flax-msgpack",
            FileFormat::Onnx => "onnx",
        }
    }
}

impl fmt::Display for FileFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A checkpoint read from a file of any supported format.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// What the file was.
    pub file_format: FileFormat,
    /// Its tensors (batch-norm ones under a [`Format`](crate::Format)'s names) and the
    /// conventions it records.
    pub checkpoint: Checkpoint,
}

/// Reads a checkpoint file of any supported format, recognized by its content. A
/// TensorFlow checkpoint is named by its prefix (`model.ckpt-1000`), its `.index` file or
/// the directory holding its `checkpoint` file.
///
/// ```
/// let e = bnorm_interop::read::read_path(std::path::Path::new("/no/such/file.pt"));
/// assert!(e.is_err());
/// ```
pub fn read_path(path: &Path) -> Result<Loaded> {
    if let Some(index) = tf::index_path(path) {
        return Ok(Loaded {
            file_format: FileFormat::TfCheckpoint,
            checkpoint: tf::read(&index)?,
        });
    }
    let bytes = std::fs::read(path).map_err(|source| InteropError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if sniff(&bytes) == Sniffed::Safetensors {
        // The buffer is handed over, so the file is not held twice in memory.
        return Ok(Loaded {
            file_format: FileFormat::Safetensors,
            checkpoint: Checkpoint::from_vec(bytes)?,
        });
    }
    read_bytes(&bytes)
}

/// Reads a checkpoint held in memory, its format recognized by its content (a TensorFlow
/// checkpoint spans several files: use [`read_path`]).
///
/// ```
/// use bnorm_interop::{read::read_bytes, InteropError};
/// assert!(matches!(read_bytes(b"hello"), Err(InteropError::UnknownFormat { .. })));
/// ```
pub fn read_bytes(bytes: &[u8]) -> Result<Loaded> {
    let (file_format, checkpoint) = match sniff(bytes) {
        Sniffed::Safetensors => (FileFormat::Safetensors, Checkpoint::from_bytes(bytes)?),
        Sniffed::Zip => return read_zip(bytes),
        Sniffed::Hdf5 => keras::read_h5(bytes)?,
        Sniffed::Pickle => (FileFormat::Torch, torch::read_legacy(bytes)?),
        Sniffed::Msgpack => (FileFormat::Flax, flax::read(bytes)?),
        Sniffed::Onnx => (FileFormat::Onnx, onnx::read(bytes)?),
        Sniffed::TfIndex => {
            return Err(unreadable(
                FileFormat::TfCheckpoint,
                "this is the .index file of a TensorFlow checkpoint; its values are in the \
                 .data-* files beside it: give the file's path (or the checkpoint's prefix)",
            ))
        }
        Sniffed::Unknown => return Err(unknown(bytes)),
    };
    Ok(Loaded {
        file_format,
        checkpoint,
    })
}

/// What the first bytes of a file say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sniffed {
    Safetensors,
    Zip,
    Hdf5,
    Pickle,
    Msgpack,
    Onnx,
    TfIndex,
    Unknown,
}

/// The HDF5 signature (at offset 0; HDF5 also allows 512, 1024, … for files with a user
/// block, which Keras never writes).
const HDF5_MAGIC: &[u8; 8] = b"\x89HDF\r\n\x1a\n";

fn sniff(bytes: &[u8]) -> Sniffed {
    // safetensors: a little-endian u64 header length, then `{`. A msgpack map (Flax) can
    // have `{` as its ninth byte too; its first eight bytes then claim a header far beyond
    // the file. A length that does not fit is otherwise still safetensors (truncated or
    // hostile: its reader says which).
    if let Some((n, rest)) = bytes.split_first_chunk::<8>() {
        let fits = u64::from_le_bytes(*n) <= rest.len() as u64;
        if rest.first() == Some(&b'{') && (fits || !is_msgpack_map(bytes[0])) {
            return Sniffed::Safetensors;
        }
    }
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        return Sniffed::Zip;
    }
    if bytes.starts_with(HDF5_MAGIC) {
        return Sniffed::Hdf5;
    }
    // Pickle protocol 2+ starts with PROTO (0x80) and its version; an empty msgpack map
    // is the single byte 0x80.
    if bytes.len() >= 2 && bytes[0] == 0x80 && (2..=5).contains(&bytes[1]) {
        return Sniffed::Pickle;
    }
    if tf::is_index(bytes) {
        return Sniffed::TfIndex;
    }
    match bytes.first() {
        Some(&b) if is_msgpack_map(b) => Sniffed::Msgpack,
        Some(_) if onnx::looks_like(bytes) => Sniffed::Onnx,
        _ => Sniffed::Unknown,
    }
}

/// Whether `b` starts a msgpack map (fixmap, map 16, map 32): Flax's state dicts.
fn is_msgpack_map(b: u8) -> bool {
    matches!(b, 0x80..=0x8f | 0xde | 0xdf)
}

fn read_zip(bytes: &[u8]) -> Result<Loaded> {
    let zip_error = |e: zip::result::ZipError| InteropError::Unreadable {
        format: "zip",
        reason: e.to_string(),
    };
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(zip_error)?;
    let names: Vec<String> = archive
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<std::result::Result<_, _>>()
        .map_err(zip_error)?;
    if names.iter().any(|n| n.ends_with("data.pkl")) {
        return Ok(Loaded {
            file_format: FileFormat::Torch,
            checkpoint: torch::read_zip(&mut archive)?,
        });
    }
    if names.iter().any(|n| n == "config.json") && names.iter().any(|n| n.ends_with(".h5")) {
        return Ok(Loaded {
            file_format: FileFormat::Keras,
            checkpoint: keras::read_keras(&mut archive)?,
        });
    }
    Err(InteropError::UnknownFormat {
        reason: format!(
            "a zip archive that is neither a PyTorch file (no data.pkl) nor a Keras 3 .keras \
             file (no config.json beside a .h5); it holds: {}",
            names.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
        ),
    })
}

/// An [`InteropError::Unreadable`] for `format`.
pub(crate) fn unreadable(format: FileFormat, reason: impl Into<String>) -> InteropError {
    InteropError::Unreadable {
        format: format.name(),
        reason: reason.into(),
    }
}

fn unknown(bytes: &[u8]) -> InteropError {
    let head: String = bytes
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ");
    InteropError::UnknownFormat {
        reason: format!(
            "its first bytes ({head}) are none of safetensors, PyTorch (.pt/.pth), Keras \
             (.keras, .h5), a TensorFlow checkpoint, Flax msgpack or ONNX"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_recognized_by_their_first_bytes() {
        let mut st = 2u64.to_le_bytes().to_vec();
        st.extend(b"{}");
        assert_eq!(sniff(&st), Sniffed::Safetensors);
        // A msgpack map whose ninth byte happens to be `{` is not safetensors: its first
        // eight bytes read as a header length far beyond the file.
        assert_eq!(sniff(b"\x81\xa6params\x7b\x00"), Sniffed::Msgpack);
        assert_eq!(sniff(b"PK\x03\x04rest"), Sniffed::Zip);
        assert_eq!(sniff(b"\x89HDF\r\n\x1a\n...."), Sniffed::Hdf5);
        assert_eq!(sniff(b"\x80\x02\x8a\x0al"), Sniffed::Pickle);
        assert_eq!(sniff(b"\x82\xa6params"), Sniffed::Msgpack);
        assert_eq!(sniff(b"\x80"), Sniffed::Msgpack);
        assert_eq!(sniff(b"plain text"), Sniffed::Unknown);
        assert_eq!(sniff(b""), Sniffed::Unknown);
    }
}
