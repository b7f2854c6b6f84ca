//! A small reader of the protocol buffers wire format: enough to walk the fields of a
//! message whose schema the caller knows, without generated code.
//!
//! It never allocates (every `Bytes` field borrows from the input), checks every length
//! against the bytes actually present, refuses varints longer than 10 bytes and the
//! deprecated group wire types, and has no recursion of its own: a caller that descends
//! into nested messages bounds its own depth.

use std::fmt;

/// What is wrong with a protobuf message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProtoError(pub(crate) String);

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub(crate) type ProtoResult<T> = std::result::Result<T, ProtoError>;

fn err<T>(msg: impl Into<String>) -> ProtoResult<T> {
    Err(ProtoError(msg.into()))
}

/// One field's value, by wire type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Value<'a> {
    /// Wire type 0.
    Varint(u64),
    /// Wire type 1 (little-endian).
    Fixed64(u64),
    /// Wire type 2: a string, bytes, nested message or packed repeated field.
    Bytes(&'a [u8]),
    /// Wire type 5 (little-endian).
    Fixed32(u32),
}

impl<'a> Value<'a> {
    /// The value of a varint field (`int32`, `int64`, `uint*`, `bool`, enums).
    pub(crate) fn varint(self, what: &str) -> ProtoResult<u64> {
        match self {
            Value::Varint(v) => Ok(v),
            _ => err(format!("{what} is not a varint")),
        }
    }

    /// The value of a length-delimited field.
    pub(crate) fn bytes(self, what: &str) -> ProtoResult<&'a [u8]> {
        match self {
            Value::Bytes(b) => Ok(b),
            _ => err(format!("{what} is not length-delimited")),
        }
    }

    /// The value of a `string` field (UTF-8 checked).
    pub(crate) fn string(self, what: &str) -> ProtoResult<&'a str> {
        std::str::from_utf8(self.bytes(what)?)
            .or_else(|_| err(format!("{what} is not valid UTF-8")))
    }

    /// The value of a `fixed32` field.
    pub(crate) fn fixed32(self, what: &str) -> ProtoResult<u32> {
        match self {
            Value::Fixed32(v) => Ok(v),
            _ => err(format!("{what} is not a fixed32")),
        }
    }

    /// An `int32` field: a varint that holds a value in `i32` range (negative `int32`s
    /// are sign-extended to 64 bits on the wire).
    pub(crate) fn int32(self, what: &str) -> ProtoResult<i32> {
        let v = self.varint(what)? as i64;
        i32::try_from(v).or_else(|_| err(format!("{what} ({v}) is out of int32 range")))
    }

    /// An `int64` field.
    pub(crate) fn int64(self, what: &str) -> ProtoResult<i64> {
        Ok(self.varint(what)? as i64)
    }
}

/// Reads a base-128 varint at `*pos`, advancing it.
pub(crate) fn read_varint(buf: &[u8], pos: &mut usize) -> ProtoResult<u64> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let Some(&b) = buf.get(*pos) else {
            return err("a varint runs past the end of the data");
        };
        *pos += 1;
        if i == 9 && b > 1 {
            return err("a varint overflows 64 bits");
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    err("a varint is longer than 10 bytes")
}

/// The fields of one message, in order (a field may repeat; the caller decides whether the
/// last one wins or each one counts).
pub(crate) struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    /// Walks the fields of the message `buf`.
    pub(crate) fn new(buf: &'a [u8]) -> Fields<'a> {
        Fields { buf, pos: 0 }
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = ProtoResult<(u32, Value<'a>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let r = self.field();
        if r.is_err() {
            // Stop after the first error.
            self.pos = self.buf.len();
        }
        Some(r)
    }
}

impl<'a> Fields<'a> {
    fn field(&mut self) -> ProtoResult<(u32, Value<'a>)> {
        let key = read_varint(self.buf, &mut self.pos)?;
        let number = key >> 3;
        if number == 0 || number > (1 << 29) - 1 {
            return err(format!("field number {number} is invalid"));
        }
        let number = number as u32;
        let take = |pos: &mut usize, n: usize| -> ProtoResult<&'a [u8]> {
            let end = pos
                .checked_add(n)
                .filter(|&e| e <= self.buf.len())
                .ok_or_else(|| {
                    ProtoError(format!(
                        "field {number} claims {n} bytes but {} remain",
                        self.buf.len() - *pos
                    ))
                })?;
            let s = &self.buf[*pos..end];
            *pos = end;
            Ok(s)
        };
        let value = match key & 7 {
            0 => Value::Varint(read_varint(self.buf, &mut self.pos)?),
            1 => {
                let b = take(&mut self.pos, 8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Value::Fixed64(u64::from_le_bytes(a))
            }
            2 => {
                let n = read_varint(self.buf, &mut self.pos)?;
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                Value::Bytes(take(&mut self.pos, n)?)
            }
            5 => {
                let b = take(&mut self.pos, 4)?;
                Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            w => {
                return err(format!(
                    "field {number} has wire type {w}, which is not supported"
                ))
            }
        };
        Ok((number, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_fields() {
        let mut pos = 0;
        assert_eq!(read_varint(&[0xac, 0x02], &mut pos), Ok(300));
        assert_eq!(pos, 2);
        let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(read_varint(&max, &mut 0), Ok(u64::MAX));
        let over = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(read_varint(&over, &mut 0).is_err());
        assert!(read_varint(&[0x80; 11], &mut 0).is_err());
        assert!(read_varint(&[0x80], &mut 0).is_err());

        // field 1 varint 150, field 2 "hi", field 3 fixed32 7, field 4 fixed64 9
        let msg = [
            0x08, 0x96, 0x01, 0x12, 2, b'h', b'i', 0x1d, 7, 0, 0, 0, 0x21, 9, 0, 0, 0, 0, 0, 0, 0,
        ];
        let f: Vec<_> = Fields::new(&msg).collect::<ProtoResult<_>>().unwrap();
        assert_eq!(
            f,
            vec![
                (1, Value::Varint(150)),
                (2, Value::Bytes(b"hi")),
                (3, Value::Fixed32(7)),
                (4, Value::Fixed64(9))
            ]
        );
        // A length past the end, a group, field number 0.
        assert!(Fields::new(&[0x12, 5, b'a']).any(|r| r.is_err()));
        assert!(Fields::new(&[0x0b]).any(|r| r.is_err()));
        assert!(Fields::new(&[0x00, 0x01]).any(|r| r.is_err()));
        // A huge claimed length neither allocates nor overflows.
        let huge = [
            0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ];
        assert!(Fields::new(&huge).any(|r| r.is_err()));
        assert_eq!(Value::Varint(u64::MAX).int32("x"), Ok(-1));
        assert!(Value::Varint(1 << 40).int32("x").is_err());
    }
}
