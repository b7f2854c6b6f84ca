//! Flax msgpack (`flax.serialization.to_bytes`). (Placeholder: being written.)

use super::{unreadable, FileFormat};
use crate::{Checkpoint, Result};

/// Reads a msgpack state.
pub(crate) fn read(_bytes: &[u8]) -> Result<Checkpoint> {
    Err(unreadable(FileFormat::Flax, "not implemented yet"))
}
