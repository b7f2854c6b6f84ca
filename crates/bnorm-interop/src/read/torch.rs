//! PyTorch `torch.save` files. (Placeholder: being written.)

use std::io::{Read, Seek};

use super::{unreadable, FileFormat};
use crate::{Checkpoint, Result};

/// Reads the state dict of a zip-format `torch.save` file.
pub(crate) fn read_zip<R: Read + Seek>(_archive: &mut zip::ZipArchive<R>) -> Result<Checkpoint> {
    Err(unreadable(FileFormat::Torch, "not implemented yet"))
}

/// A pickle at the start of the file: PyTorch's legacy (pre-1.6) format, or a bare pickle.
pub(crate) fn read_legacy(_bytes: &[u8]) -> Result<Checkpoint> {
    Err(unreadable(FileFormat::Torch, "not implemented yet"))
}
