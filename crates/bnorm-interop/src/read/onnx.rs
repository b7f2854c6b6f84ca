//! ONNX models. (Placeholder: being written.)

use super::{unreadable, FileFormat};
use crate::{Checkpoint, Result};

/// Whether `bytes` look like an ONNX `ModelProto`.
pub(crate) fn looks_like(_bytes: &[u8]) -> bool {
    false
}

/// Reads the batch-norm nodes of an ONNX model.
pub(crate) fn read(_bytes: &[u8]) -> Result<Checkpoint> {
    Err(unreadable(FileFormat::Onnx, "not implemented yet"))
}
