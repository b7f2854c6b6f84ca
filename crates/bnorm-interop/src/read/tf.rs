//! TensorFlow checkpoints (tensor bundles). (Placeholder: being written.)

use std::path::{Path, PathBuf};

use super::{unreadable, FileFormat};
use crate::{Checkpoint, Result};

/// The `.index` file of the TensorFlow checkpoint `path` names, if it names one.
pub(crate) fn index_path(_path: &Path) -> Option<PathBuf> {
    None
}

/// Whether `bytes` are a tensor bundle's `.index` file.
pub(crate) fn is_index(_bytes: &[u8]) -> bool {
    false
}

/// Reads the checkpoint whose `.index` file is `index`.
pub(crate) fn read(_index: &Path) -> Result<Checkpoint> {
    Err(unreadable(FileFormat::TfCheckpoint, "not implemented yet"))
}
