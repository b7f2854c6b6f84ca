//! A minimal protobuf wire-format reader: enough for the ONNX messages the ONNX reader
//! walks. Every length is checked against the bytes that remain; varints longer than ten
//! bytes, field number 0, groups and unknown wire types are refused.

use super::super::{unreadable, FileFormat};
use crate::{InteropError, Result};

pub(super) fn err(reason: impl Into<String>) -> InteropError {
    unreadable(FileFormat::Onnx, reason)
}

/// One field's payload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Iterates over the fields of one message.
pub(super) struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    /// The message's name (for errors).
    what: &'static str,
}

impl<'a> Fields<'a> {
    pub(super) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Fields { buf, pos: 0, what }
    }

    fn truncated(&self) -> InteropError {
        err(format!(
            "a {} message is truncated or corrupt at byte {} of {} (the file is cut short \
             or not ONNX; export the model again)",
            self.what,
            self.pos,
            self.buf.len()
        ))
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = *self.buf.get(self.pos).ok_or_else(|| self.truncated())?;
            self.pos += 1;
            if i == 9 && b > 1 {
                return Err(self.truncated());
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.truncated())
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let n = usize::try_from(n).map_err(|_| self.truncated())?;
        if n > self.buf.len() - self.pos {
            return Err(self.truncated());
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// The next field's number and wire type (its key), reading nothing more.
    pub(super) fn key(&mut self) -> Result<(u32, u64)> {
        let key = self.varint()?;
        let number = u32::try_from(key >> 3)
            .ok()
            .filter(|&n| n != 0)
            .ok_or_else(|| self.truncated())?;
        Ok((number, key & 7))
    }

    /// The next field (number, payload), or `None` at the end of the message.
    pub(super) fn next_field(&mut self) -> Result<Option<(u32, Wire<'a>)>> {
        if self.pos == self.buf.len() {
            return Ok(None);
        }
        let (number, wire_type) = self.key()?;
        let wire = match wire_type {
            0 => Wire::Varint(self.varint()?),
            1 => {
                let b = self.take(8)?;
                Wire::Fixed64(u64::from_le_bytes(b.try_into().expect("8 bytes")))
            }
            2 => {
                let n = self.varint()?;
                Wire::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Wire::Fixed32(u32::from_le_bytes(b.try_into().expect("4 bytes")))
            }
            _ => return Err(self.truncated()),
        };
        Ok(Some((number, wire)))
    }
}

/// Calls `f` on every field of a message.
pub(super) fn each<'a>(
    buf: &'a [u8],
    what: &'static str,
    mut f: impl FnMut(u32, Wire<'a>) -> Result<()>,
) -> Result<()> {
    let mut fields = Fields::new(buf, what);
    while let Some((n, w)) = fields.next_field()? {
        f(n, w)?;
    }
    Ok(())
}

/// A string field.
pub(super) fn string<'a>(w: Wire<'a>, what: &str) -> Result<&'a str> {
    match w {
        Wire::Bytes(b) => std::str::from_utf8(b)
            .map_err(|_| err(format!("{what} is not valid UTF-8 (corrupt file)"))),
        _ => Err(wrong(what)),
    }
}

/// A varint field.
pub(super) fn varint(w: Wire<'_>, what: &str) -> Result<u64> {
    match w {
        Wire::Varint(v) => Ok(v),
        _ => Err(wrong(what)),
    }
}

/// An embedded message or bytes field.
pub(super) fn bytes<'a>(w: Wire<'a>, what: &str) -> Result<&'a [u8]> {
    match w {
        Wire::Bytes(b) => Ok(b),
        _ => Err(wrong(what)),
    }
}

pub(super) fn wrong(what: &str) -> InteropError {
    err(format!(
        "{what} has the wrong wire type (not an ONNX model, or corrupt)"
    ))
}

/// Number of varints in a packed run (each ends with a byte below 0x80), checking that the
/// run ends on a complete varint.
pub(super) fn packed_varint_count(b: &[u8], what: &str) -> Result<usize> {
    if b.last().is_some_and(|&x| x & 0x80 != 0) {
        return Err(err(format!(
            "{what}: a packed varint is cut short (corrupt file)"
        )));
    }
    Ok(b.iter().filter(|&&x| x & 0x80 == 0).count())
}

/// Decodes a packed run of varints (call [`packed_varint_count`] first to size buffers).
pub(super) fn packed_varints(b: &[u8], what: &'static str) -> Result<Vec<u64>> {
    let mut out = Vec::with_capacity(packed_varint_count(b, what)?);
    let mut f = Fields::new(b, what);
    while f.pos < b.len() {
        out.push(f.varint()?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_decode_and_bad_input_is_refused() {
        let mut f = Fields::new(b"\x08\x96\x01\x12\x02hi\x25\x00\x00\x80\x3f", "t");
        assert_eq!(f.next_field().unwrap(), Some((1, Wire::Varint(150))));
        assert_eq!(f.next_field().unwrap(), Some((2, Wire::Bytes(b"hi"))));
        assert_eq!(
            f.next_field().unwrap(),
            Some((4, Wire::Fixed32(1f32.to_bits())))
        );
        assert_eq!(f.next_field().unwrap(), None);
        for bad in [
            &b"\x12\xff\xff\xff\xff\x0f"[..],
            b"\x0b",
            b"\x00\x01",
            b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f",
            b"\x08",
        ] {
            assert!(Fields::new(bad, "t").next_field().is_err(), "{bad:?}");
        }
        assert_eq!(packed_varints(b"\x01\x96\x01", "t").unwrap(), vec![1, 150]);
        assert!(packed_varints(b"\x01\x96", "t").is_err());
    }
}
