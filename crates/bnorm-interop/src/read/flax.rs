//! Flax msgpack (`flax.serialization.to_bytes`): a msgpack document (one map) whose array
//! leaves are msgpack extension values — code 1 an ndarray, 3 a numpy scalar (both the
//! msgpack tuple `(shape, dtype name, buffer)`), 2 a Python complex — and whose arrays of
//! more than 2^30 bytes are split into `{'__msgpack_chunked_array__': True, 'shape',
//! 'chunks'}` dicts.
//!
//! The decoder here is written for hostile input: every length is checked against the
//! bytes that remain before anything is allocated (a map claiming 2^32 entries in a
//! ten-byte file is refused, not reserved), shape products are overflow-checked and must
//! equal the buffer's length, nesting is bounded ([`MAX_DEPTH`]) and nothing from the file
//! is executed (extension codes other than Flax's are skipped).
//!
//! Two layouts carry batch norm:
//!
//! * **linen** variables `{'params': {...}, 'batch_stats': {...}}`, at the top or nested
//!   (a TrainState-like `{'step', 'params', 'batch_stats', 'opt_state'}`, or under a key
//!   such as `{'state': ...}`): the shallowest dict holding `batch_stats` is the variables
//!   dict, and its tensors are named `params/<module path>/scale`,
//!   `batch_stats/<module path>/mean`, … — Flax names, which
//!   [`Checkpoint::layers`] finds (a boxed batch-norm variable, `{'value': array}` as
//!   `nn.Partitioned` saves it, is named as its leaf). Everything else keeps its full
//!   `/`-joined path.
//! * **NNX** state dicts (`nnx.to_pure_dict(nnx.state(model))`, or older ones whose
//!   variables are `{'value': array}` dicts): a module holding both `mean` and `var`
//!   is a batch norm; its tensors are renamed to the Flax names above under the module's
//!   path (`bn1`, `blocks/0`).
//!
//! Flax does not store eps or momentum (they are module attributes, not variables), so no
//! conventions are recorded: Flax's defaults (eps 1e-5, decay 0.99) apply unless the user
//! says otherwise.
//!
//! ```
//! use bnorm_interop::read::{read_bytes, FileFormat};
//! // {'params': {'bn': {'scale': 2.0}}}: a plain float leaf becomes a 0-d F64 tensor.
//! let bytes = b"\x81\xa6params\x81\xa2bn\x81\xa5scale\xcb\x40\0\0\0\0\0\0\0";
//! let loaded = read_bytes(bytes)?;
//! assert_eq!(loaded.file_format, FileFormat::Flax);
//! assert!(loaded.checkpoint.tensors.contains_key("params/bn/scale"));
//! // A map claiming 2^32 - 1 entries in a few bytes is refused, not reserved.
//! assert!(read_bytes(b"\xdf\xff\xff\xff\xff\x00").is_err());
//! # Ok::<(), bnorm_interop::InteropError>(())
//! ```

use std::collections::BTreeMap;

use safetensors::Dtype;

use super::{unreadable, FileFormat};
use crate::{Checkpoint, InteropError, Result, Tensor};

/// Deepest nesting of maps, arrays and extension payloads accepted (Flax trees are a few
/// levels deep; the limit only keeps hostile files from exhausting the stack).
pub const MAX_DEPTH: usize = 64;

fn err(reason: impl Into<String>) -> InteropError {
    unreadable(FileFormat::Flax, reason)
}

/// One decoded msgpack value, borrowing strings and binaries from the file.
#[derive(Debug, Clone, PartialEq)]
enum Value<'a> {
    Nil,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Array(Vec<Value<'a>>),
    Map(Vec<(Value<'a>, Value<'a>)>),
    Ext(i8, &'a [u8]),
}

/// A msgpack decoder over a byte slice.
struct Decoder<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// What is being decoded (for messages): "the file" or "an ndarray payload".
    what: &'static str,
}

impl<'a> Decoder<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Decoder {
            bytes,
            pos: 0,
            what,
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(err(format!(
                "{} is truncated: a value at byte {} needs {n} bytes but {} remain (the file \
                 is cut short or corrupt; write it again with flax.serialization.to_bytes)",
                self.what,
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn be(&mut self, n: usize) -> Result<u64> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |a, &b| (a << 8) | u64::from(b)))
    }

    /// A length read from the file, as usize.
    fn len(&mut self, n: usize) -> Result<usize> {
        let v = self.be(n)?;
        usize::try_from(v).map_err(|_| err(format!("a length of {v} does not fit in memory")))
    }

    /// A count of elements that each take at least one byte: refused when more are
    /// claimed than bytes remain (so nothing is reserved for them).
    fn count(&mut self, n: usize, per: usize) -> Result<usize> {
        let at = self.pos;
        let c = self.len(n)?;
        match c.checked_mul(per) {
            Some(b) if b <= self.remaining() => Ok(c),
            _ => Err(err(format!(
                "{}: a container at byte {at} claims {c} elements but only {} bytes follow \
                 (corrupt or truncated file)",
                self.what,
                self.remaining()
            ))),
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value<'a>> {
        if depth > MAX_DEPTH {
            return Err(err(format!(
                "{}: nesting deeper than {MAX_DEPTH} levels at byte {} (not a Flax state; \
                 a hostile or corrupt file)",
                self.what, self.pos
            )));
        }
        let at = self.pos;
        let tag = self.take(1)?[0];
        Ok(match tag {
            0x00..=0x7f => Value::Int(i128::from(tag)),
            0xe0..=0xff => Value::Int(i128::from(tag as i8)),
            0x80..=0x8f => self.map(usize::from(tag & 0x0f), depth)?,
            0x90..=0x9f => self.array(usize::from(tag & 0x0f), depth)?,
            0xa0..=0xbf => Value::Str(self.take(usize::from(tag & 0x1f))?),
            0xc0 => Value::Nil,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4..=0xc6 => {
                let n = self.len(1 << (tag - 0xc4))?;
                Value::Bin(self.take(n)?)
            }
            0xc7..=0xc9 => {
                let n = self.len(1 << (tag - 0xc7))?;
                let code = self.take(1)?[0] as i8;
                Value::Ext(code, self.take(n)?)
            }
            0xca => Value::Float(f64::from(f32::from_bits(self.be(4)? as u32))),
            0xcb => Value::Float(f64::from_bits(self.be(8)?)),
            0xcc..=0xcf => Value::Int(i128::from(self.be(1 << (tag - 0xcc))?)),
            0xd0..=0xd3 => {
                let n = 1usize << (tag - 0xd0);
                let v = self.be(n)?;
                let shift = 64 - 8 * n as u32;
                Value::Int(i128::from(((v << shift) as i64) >> shift))
            }
            0xd4..=0xd8 => {
                let code = self.take(1)?[0] as i8;
                Value::Ext(code, self.take(1 << (tag - 0xd4))?)
            }
            0xd9..=0xdb => {
                let n = self.len(1 << (tag - 0xd9))?;
                Value::Str(self.take(n)?)
            }
            0xdc | 0xdd => {
                let n = self.count(if tag == 0xdc { 2 } else { 4 }, 1)?;
                self.array(n, depth)?
            }
            0xde | 0xdf => {
                let n = self.count(if tag == 0xde { 2 } else { 4 }, 2)?;
                self.map(n, depth)?
            }
            0xc1 => {
                return Err(err(format!(
                    "{}: byte {at} is 0xc1, which msgpack never uses (not msgpack, or corrupt)",
                    self.what
                )))
            }
        })
    }

    fn array(&mut self, n: usize, depth: usize) -> Result<Value<'a>> {
        let mut v = Vec::with_capacity(n.min(self.remaining()));
        for _ in 0..n {
            v.push(self.value(depth + 1)?);
        }
        Ok(Value::Array(v))
    }

    fn map(&mut self, n: usize, depth: usize) -> Result<Value<'a>> {
        let mut v = Vec::with_capacity(n.min(self.remaining() / 2));
        for _ in 0..n {
            let k = self.value(depth + 1)?;
            let x = self.value(depth + 1)?;
            v.push((k, x));
        }
        Ok(Value::Map(v))
    }

    /// Decodes exactly one value spanning all the bytes.
    fn whole(mut self, depth: usize) -> Result<Value<'a>> {
        let v = self.value(depth)?;
        if self.remaining() != 0 {
            return Err(err(format!(
                "{} has {} bytes after its msgpack value (several files concatenated, or \
                 corrupt)",
                self.what,
                self.remaining()
            )));
        }
        Ok(v)
    }
}

/// The safetensors dtype and item size of a numpy dtype name, if bnorm keeps it.
fn dtype_of(name: &[u8]) -> Option<(Dtype, usize)> {
    Some(match name {
        b"float32" => (Dtype::F32, 4),
        b"float64" => (Dtype::F64, 8),
        b"float16" => (Dtype::F16, 2),
        b"bfloat16" => (Dtype::BF16, 2),
        b"int8" => (Dtype::I8, 1),
        b"int16" => (Dtype::I16, 2),
        b"int32" => (Dtype::I32, 4),
        b"int64" => (Dtype::I64, 8),
        b"uint8" => (Dtype::U8, 1),
        b"uint16" => (Dtype::U16, 2),
        b"uint32" => (Dtype::U32, 4),
        b"uint64" => (Dtype::U64, 8),
        b"bool" => (Dtype::BOOL, 1),
        b"complex64" => (Dtype::C64, 8),
        _ => return None,
    })
}

/// A decoded leaf: a tensor, or something bnorm does not keep (with why).
enum Leaf {
    Tensor(Tensor),
    Skipped(String),
}

fn key_string(k: &Value<'_>) -> Result<String> {
    match k {
        Value::Str(s) | Value::Bin(s) => std::str::from_utf8(s)
            .map(str::to_string)
            .map_err(|_| err("a dict key is not valid UTF-8 (corrupt file)")),
        Value::Int(i) => Ok(i.to_string()),
        other => Err(err(format!(
            "a dict key is {}, not a string (Flax state dicts have string keys; this is not \
             a flax.serialization.to_bytes file)",
            kind(other)
        ))),
    }
}

fn kind(v: &Value<'_>) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Bool(_) => "a boolean",
        Value::Int(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Str(_) => "a string",
        Value::Bin(_) => "binary data",
        Value::Array(_) => "an array",
        Value::Map(_) => "a map",
        Value::Ext(..) => "an extension value",
    }
}

/// Decodes Flax's ndarray payload `(shape, dtype name, buffer)`.
fn ndarray(data: &[u8], path: &str) -> Result<Leaf> {
    let bad = |what: String| err(format!("array {path}: {what} (corrupt file)"));
    let v = Decoder::new(data, "an ndarray payload").whole(MAX_DEPTH - 4)?;
    let Value::Array(parts) = v else {
        return Err(bad(format!(
            "the payload is {}, not (shape, dtype, buffer)",
            kind(&v)
        )));
    };
    let [shape, dtype, buffer] = parts.as_slice() else {
        return Err(bad(format!(
            "the payload has {} parts, not 3 (shape, dtype, buffer)",
            parts.len()
        )));
    };
    let Value::Array(dims) = shape else {
        return Err(bad(format!("the shape is {}, not an array", kind(shape))));
    };
    let mut shape = Vec::with_capacity(dims.len());
    for d in dims {
        match d {
            Value::Int(i) => shape
                .push(usize::try_from(*i).map_err(|_| bad(format!("dimension {i} is invalid")))?),
            other => return Err(bad(format!("a dimension is {}", kind(other)))),
        }
    }
    let (Value::Str(name) | Value::Bin(name)) = dtype else {
        return Err(bad(format!("the dtype is {}, not a name", kind(dtype))));
    };
    let (Value::Bin(buf) | Value::Str(buf)) = buffer else {
        return Err(bad(format!("the buffer is {}, not bytes", kind(buffer))));
    };
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    let Some((dtype, size)) = dtype_of(name) else {
        return Ok(Leaf::Skipped(format!(
            "dtype {:?} is not one bnorm keeps",
            String::from_utf8_lossy(name)
        )));
    };
    if numel.checked_mul(size) != Some(buf.len()) {
        return Err(bad(format!(
            "shape {shape:?} of {} needs {numel} x {size} bytes but the buffer has {}",
            String::from_utf8_lossy(name),
            buf.len()
        )));
    }
    Ok(Leaf::Tensor(Tensor {
        dtype,
        shape,
        bytes: buf.to_vec(),
    }))
}

/// Reassembles a `{'__msgpack_chunked_array__': True, 'shape': {...}, 'chunks': {...}}`.
fn unchunk<'a>(entries: &[(Value<'a>, Value<'a>)], path: &str) -> Result<Leaf> {
    let bad = |what: &str| err(format!("chunked array {path}: {what} (corrupt file)"));
    let get = |key: &[u8]| {
        entries
            .iter()
            .find(|(k, _)| matches!(k, Value::Str(s) | Value::Bin(s) if *s == key))
            .map(|(_, v)| v)
    };
    // Flax writes tuples as {'0': …, '1': …}: the values in key order 0, 1, 2, …
    let tuple = |v: Option<&Value<'a>>, what: &str| -> Result<Vec<Value<'a>>> {
        let Some(Value::Map(m)) = v else {
            return Err(bad(&format!("no {what} dict")));
        };
        let mut out = Vec::with_capacity(m.len());
        for (i, (k, x)) in m.iter().enumerate() {
            if key_string(k)? != i.to_string() {
                return Err(bad(&format!("{what} keys are not 0, 1, 2, …")));
            }
            out.push(x.clone());
        }
        Ok(out)
    };
    let shape: Vec<usize> = tuple(get(b"shape"), "shape")?
        .iter()
        .map(|d| match d {
            Value::Int(i) => usize::try_from(*i).map_err(|_| bad("a dimension is invalid")),
            _ => Err(bad("a dimension is not an integer")),
        })
        .collect::<Result<_>>()?;
    let mut dtype = None;
    let mut bytes = Vec::new();
    for chunk in tuple(get(b"chunks"), "chunks")? {
        let Value::Ext(1, data) = chunk else {
            return Err(bad("a chunk is not an ndarray"));
        };
        match ndarray(data, path)? {
            Leaf::Tensor(t) => {
                if *dtype.get_or_insert(t.dtype) != t.dtype || t.shape.len() != 1 {
                    return Err(bad("chunks differ in dtype or are not flat"));
                }
                bytes.extend_from_slice(&t.bytes);
            }
            Leaf::Skipped(why) => return Ok(Leaf::Skipped(why)),
        }
    }
    let dtype = dtype.ok_or_else(|| bad("no chunks"))?;
    let size = dtype.bitsize() / 8;
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("the shape overflows"))?;
    if numel.checked_mul(size) != Some(bytes.len()) {
        return Err(bad("the chunks do not hold the shape's elements"));
    }
    Ok(Leaf::Tensor(Tensor {
        dtype,
        shape,
        bytes,
    }))
}

/// One leaf of the tree: its path (keys from the root) and whether it was the only
/// entry of a `{'value': …}` dict (an NNX variable of older state dicts), in which case
/// the path's last key is that `value`.
struct Flat {
    path: Vec<String>,
    wrapped: bool,
    leaf: Leaf,
}

/// Walks the document without building it: only keys, scalars, extension payloads and
/// (small) chunked-array dicts become [`Value`]s, so memory follows the leaves kept, and
/// the `/`-joined names of those are held to a budget proportional to the file.
struct Walk<'a> {
    dec: Decoder<'a>,
    out: Vec<Flat>,
    name_bytes: usize,
    name_budget: usize,
}

impl<'a> Walk<'a> {
    fn push(&mut self, path: &[String], leaf: Leaf) -> Result<()> {
        if let Leaf::Skipped(_) = &leaf {
            // Only a skipped batch-norm leaf matters (it is refused later).
            if !path.last().is_some_and(|k| BN_LEAVES.contains(&k.as_str())) {
                return Ok(());
            }
        }
        self.name_bytes = path
            .iter()
            .fold(self.name_bytes, |a, k| a.saturating_add(k.len() + 1));
        if self.name_bytes > self.name_budget {
            return Err(err(format!(
                "the names of its arrays add up to more than {} bytes (keys repeated under                  long or deep paths), far beyond any Flax state of this size: a hostile or                  corrupt file",
                self.name_budget
            )));
        }
        self.out.push(Flat {
            path: path.to_vec(),
            wrapped: false,
            leaf,
        });
        Ok(())
    }

    fn walk(&mut self, path: &mut Vec<String>, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(err(format!(
                "nesting deeper than {MAX_DEPTH} levels at byte {} (not a Flax state; a \
                 hostile or corrupt file)",
                self.dec.pos
            )));
        }
        let start = self.dec.pos;
        let tag = self.dec.take(1)?[0];
        match tag {
            0x80..=0x8f | 0xde | 0xdf => {
                let n = match tag {
                    0xde => self.dec.count(2, 2)?,
                    0xdf => self.dec.count(4, 2)?,
                    _ => usize::from(tag & 0x0f),
                };
                let first_leaf = self.out.len();
                for _ in 0..n {
                    let key = key_string(&self.dec.value(depth + 1)?)?;
                    if key == "__msgpack_chunked_array__" {
                        // Flax's dict of chunks of one large array: decode it whole.
                        self.out.truncate(first_leaf);
                        self.dec.pos = start;
                        let Value::Map(entries) = self.dec.value(depth)? else {
                            return Err(err("a chunked array is not a dict (corrupt file)"));
                        };
                        let leaf = unchunk(&entries, &path.join("/"))?;
                        return self.push(path, leaf);
                    }
                    let wrapped = n == 1 && key == "value";
                    path.push(key);
                    let before = self.out.len();
                    self.walk(path, depth + 1)?;
                    if wrapped && self.out.len() == before + 1 {
                        self.out[before].wrapped = true;
                    }
                    path.pop();
                }
                Ok(())
            }
            0x90..=0x9f | 0xdc | 0xdd => {
                let n = match tag {
                    0xdc => self.dec.count(2, 1)?,
                    0xdd => self.dec.count(4, 1)?,
                    _ => usize::from(tag & 0x0f),
                };
                for i in 0..n {
                    path.push(i.to_string());
                    self.walk(path, depth + 1)?;
                    path.pop();
                }
                Ok(())
            }
            _ => {
                self.dec.pos = start;
                let v = self.dec.value(depth)?;
                let leaf = self.leaf(&v, path)?;
                self.push(path, leaf)
            }
        }
    }

    fn leaf(&self, v: &Value<'_>, path: &[String]) -> Result<Leaf> {
        let joined = || path.join("/");
        Ok(match v {
            Value::Ext(1, data) => ndarray(data, &joined())?,
            Value::Ext(3, data) => match ndarray(data, &joined())? {
                Leaf::Tensor(t) if !t.shape.is_empty() => {
                    return Err(err(format!(
                        "scalar {} has shape {:?} (corrupt file)",
                        joined(),
                        t.shape
                    )))
                }
                l => l,
            },
            Value::Ext(2, _) => Leaf::Skipped("a complex number".into()),
            Value::Ext(code, _) => Leaf::Skipped(format!("msgpack extension {code} (not Flax's)")),
            Value::Int(i) => match i64::try_from(*i) {
                Ok(i) => Leaf::Tensor(Tensor::scalar_i64(i)),
                Err(_) => Leaf::Skipped(format!("integer {i} beyond i64")),
            },
            Value::Float(f) => Leaf::Tensor(Tensor {
                dtype: Dtype::F64,
                shape: vec![],
                bytes: f.to_le_bytes().to_vec(),
            }),
            Value::Nil
            | Value::Bool(_)
            | Value::Str(_)
            | Value::Bin(_)
            | Value::Array(_)
            | Value::Map(_) => Leaf::Skipped(kind(v).into()),
        })
    }
}

/// The batch-norm leaves: a non-float one is refused rather than dropped.
const BN_LEAVES: [&str; 4] = ["scale", "bias", "mean", "var"];

/// Reads a Flax msgpack state (see the module documentation for the layouts).
pub(crate) fn read(bytes: &[u8]) -> Result<Checkpoint> {
    if !matches!(bytes.first(), Some(0x80..=0x8f | 0xde | 0xdf)) {
        return Err(err(
            "the file does not hold a dict of variables (write a model's variables or state \
             dict with flax.serialization.to_bytes)",
        ));
    }
    let mut walk = Walk {
        dec: Decoder::new(bytes, "the file"),
        out: Vec::new(),
        name_bytes: 0,
        name_budget: bytes.len().saturating_mul(64).saturating_add(1 << 20),
    };
    walk.walk(&mut Vec::new(), 0)?;
    if walk.dec.remaining() != 0 {
        return Err(err(format!(
            "the file has {} bytes after its msgpack value (several files concatenated, or \
             corrupt)",
            walk.dec.remaining()
        )));
    }
    let flat = walk.out;

    // linen: the shallowest dict holding `batch_stats` is the variables dict.
    let linen_root = flat
        .iter()
        .filter_map(|f| f.path.iter().position(|k| k == "batch_stats"))
        .min();
    let names: Vec<String> = match linen_root {
        Some(depth) => {
            let root = flat
                .iter()
                .find(|f| f.path.iter().position(|k| k == "batch_stats") == Some(depth))
                .map(|f| f.path[..depth].to_vec())
                .unwrap_or_default();
            flat.iter()
                .map(|f| {
                    // A boxed variable (`nn.Partitioned` and kin are saved as
                    // {'value': array}) of a batch-norm leaf is named as the leaf.
                    let n = f.path.len();
                    let path = if f.wrapped && n >= 2 && BN_LEAVES.contains(&f.path[n - 2].as_str())
                    {
                        &f.path[..n - 1]
                    } else {
                        &f.path[..]
                    };
                    let inside = path.len() > depth
                        && path[..depth] == root[..]
                        && (path[depth] == "params" || path[depth] == "batch_stats");
                    if inside {
                        path[depth..].join("/")
                    } else {
                        path.join("/")
                    }
                })
                .collect()
        }
        None => nnx_names(&flat),
    };

    let mut tensors = BTreeMap::new();
    for (f, name) in flat.into_iter().zip(names) {
        match f.leaf {
            Leaf::Tensor(t) => {
                if tensors.insert(name.clone(), t).is_some() {
                    return Err(err(format!(
                        "two arrays are both named {name} (keys that differ only by a '/' \
                         or a wrapper dict); rename one before exporting"
                    )));
                }
            }
            Leaf::Skipped(why) => {
                let leaf = name.rsplit('/').next().unwrap_or_default();
                if BN_LEAVES.contains(&leaf) && name.contains("batch_stats/") {
                    return Err(err(format!(
                        "{name} is {why}; a batch-norm statistic must be a float array"
                    )));
                }
            }
        }
    }
    Ok(Checkpoint {
        tensors,
        metadata: BTreeMap::new(),
    })
}

/// NNX state dicts: a module whose variables include `mean` and `var` is a batch norm; its
/// `scale`/`bias` become `params/<path>/…` and `mean`/`var` `batch_stats/<path>/…`. Other
/// leaves keep their path (`{'value': x}` wrappers dropped).
fn nnx_names(flat: &[Flat]) -> Vec<String> {
    // Each leaf's path with a wrapping `value` key dropped.
    let paths: Vec<&[String]> = flat
        .iter()
        .map(|f| {
            if f.wrapped {
                &f.path[..f.path.len() - 1]
            } else {
                &f.path[..]
            }
        })
        .collect();
    let module_of = |p: &[String]| -> Option<(String, String)> {
        let (leaf, module) = p.split_last()?;
        Some((module.join("/"), leaf.clone()))
    };
    let mut has: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for (f, p) in flat.iter().zip(&paths) {
        if let (Some((m, leaf)), Leaf::Tensor(_)) = (module_of(p), &f.leaf) {
            let e = has.entry(m).or_default();
            match leaf.as_str() {
                "mean" => e.0 = true,
                "var" => e.1 = true,
                _ => {}
            }
        }
    }
    paths
        .iter()
        .map(|p| match module_of(p) {
            Some((m, leaf)) if has.get(&m) == Some(&(true, true)) && !m.is_empty() => {
                match leaf.as_str() {
                    "scale" | "bias" => format!("params/{m}/{leaf}"),
                    "mean" | "var" => format!("batch_stats/{m}/{leaf}"),
                    _ => p.join("/"),
                }
            }
            _ => p.join("/"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_and_containers_decode() {
        let v = Decoder::new(b"\x93\xff\xd0\x80\xcd\x01\x00", "t")
            .whole(0)
            .unwrap();
        assert_eq!(
            v,
            Value::Array(vec![Value::Int(-1), Value::Int(-128), Value::Int(256)])
        );
        let v = Decoder::new(b"\x81\xa1a\xc3", "t").whole(0).unwrap();
        assert_eq!(v, Value::Map(vec![(Value::Str(b"a"), Value::Bool(true))]));
    }

    #[test]
    fn huge_claims_are_refused_before_allocating() {
        for bytes in [
            &b"\xdf\xff\xff\xff\xff"[..],
            b"\xdd\xff\xff\xff\xff",
            b"\xc6\xff\xff\xff\xff",
            b"\xdb\xff\xff\xff\xff",
            b"\xc9\xff\xff\xff\xff\x01",
        ] {
            assert!(Decoder::new(bytes, "t").whole(0).is_err());
        }
    }

    #[test]
    fn deep_nesting_is_refused() {
        let bytes = vec![0x91u8; 10_000];
        let e = Decoder::new(&bytes, "t").whole(0).unwrap_err();
        assert!(e.to_string().contains("nesting"), "{e}");
    }
}
