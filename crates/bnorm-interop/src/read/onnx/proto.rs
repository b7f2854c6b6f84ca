//! The ONNX reader's view of the shared protobuf wire reader ([`protobuf`]): its errors
//! as ONNX errors, typed field values, and the packed repeated fields ONNX tensors use.

use super::super::protobuf::{self, read_varint, ProtoError};
use super::super::{unreadable, FileFormat};
use crate::{InteropError, Result};

/// One field's payload.
pub(super) use protobuf::Value as Wire;

pub(super) fn err(reason: impl Into<String>) -> InteropError {
    unreadable(FileFormat::Onnx, reason)
}

/// A wire-format error inside the message `what`, as an ONNX error.
fn corrupt(e: ProtoError, what: &str) -> InteropError {
    err(format!(
        "a {what} message is truncated or corrupt: {e} (the file is cut short or not ONNX; \
         export the model again)"
    ))
}

/// Whether `bytes` start like a `ModelProto`: field 1 (`ir_version`, a varint from 1 to
/// 64), then the key of a field a model has (reading only the key).
pub(super) fn model_start(bytes: &[u8]) -> bool {
    let mut pos = 0;
    if read_varint(bytes, &mut pos) != Ok(0x08) {
        return false;
    }
    if !matches!(read_varint(bytes, &mut pos), Ok(1..=64)) {
        return false;
    }
    match read_varint(bytes, &mut pos) {
        Ok(key) => matches!(
            (key >> 3, key & 7),
            (2..=4 | 6..=8 | 14 | 20 | 25, 2) | (5, 0)
        ),
        Err(_) => false,
    }
}

/// Calls `f` on every field of the message `what`.
pub(super) fn each<'a>(
    buf: &'a [u8],
    what: &'static str,
    mut f: impl FnMut(u32, Wire<'a>) -> Result<()>,
) -> Result<()> {
    for field in protobuf::Fields::new(buf) {
        let (n, w) = field.map_err(|e| corrupt(e, what))?;
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
    w.varint(what).map_err(|_| wrong(what))
}

/// An embedded message or bytes field.
pub(super) fn bytes<'a>(w: Wire<'a>, what: &str) -> Result<&'a [u8]> {
    w.bytes(what).map_err(|_| wrong(what))
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

/// Decodes a packed run of varints.
pub(super) fn packed_varints(b: &[u8], what: &'static str) -> Result<Vec<u64>> {
    let mut out = Vec::with_capacity(packed_varint_count(b, what)?);
    let mut pos = 0;
    while pos < b.len() {
        out.push(read_varint(b, &mut pos).map_err(|e| corrupt(e, what))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_decode_and_bad_input_is_refused() {
        let mut seen = Vec::new();
        each(
            b"\x08\x96\x01\x12\x02hi\x25\x00\x00\x80\x3f",
            "t",
            |n, w| {
                seen.push((n, w));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (1, Wire::Varint(150)),
                (2, Wire::Bytes(b"hi")),
                (4, Wire::Fixed32(1f32.to_bits()))
            ]
        );
        for bad in [
            &b"\x12\xff\xff\xff\xff\x0f"[..],
            b"\x0b",
            b"\x00\x01",
            b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f",
            b"\x08",
        ] {
            assert!(each(bad, "t", |_, _| Ok(())).is_err(), "{bad:?}");
        }
        assert_eq!(packed_varints(b"\x01\x96\x01", "t").unwrap(), vec![1, 150]);
        assert!(packed_varints(b"\x01\x96", "t").is_err());
    }
}
