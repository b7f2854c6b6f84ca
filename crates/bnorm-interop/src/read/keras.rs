//! Keras 3 `.keras` and `.weights.h5`, tf_keras `.h5`. (Placeholder: being written.)

use std::io::{Read, Seek};

use super::{unreadable, FileFormat};
use crate::{Checkpoint, Result};

/// Reads a Keras 3 `.keras` archive.
pub(crate) fn read_keras<R: Read + Seek>(_archive: &mut zip::ZipArchive<R>) -> Result<Checkpoint> {
    Err(unreadable(FileFormat::Keras, "not implemented yet"))
}

/// Reads an HDF5 file written by Keras 3 (`.weights.h5`) or tf_keras (`.h5`).
pub(crate) fn read_h5(_bytes: &[u8]) -> Result<(FileFormat, Checkpoint)> {
    Err(unreadable(FileFormat::TfKerasH5, "not implemented yet"))
}
