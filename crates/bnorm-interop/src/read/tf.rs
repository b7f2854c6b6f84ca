//! TensorFlow checkpoints (tensor bundles, the format of `tf.train.Saver` V2,
//! `tf.train.Checkpoint` and tf_keras `save_weights` without `.h5`).
//!
//! A checkpoint `<prefix>` is a `<prefix>.index` file and one or more
//! `<prefix>.data-NNNNN-of-NNNNN` shards. The index is a LevelDB-style SSTable (footer with
//! block handles, an index block, data blocks of prefix-compressed keys with restart
//! points, each block followed by a compression byte and a masked CRC32C, which this reader
//! verifies); its empty key holds the `BundleHeaderProto` (shard count, endianness,
//! version) and every other key a tensor's `BundleEntryProto` (dtype, shape, shard, offset,
//! size, masked CRC32C of the bytes, also verified). Only what is needed is read from the
//! shards, after checking that every range lies inside its shard.
//!
//! Names:
//!
//! * TF1 `Saver` checkpoints keep their variable names: `tf.compat.v1.layers` and Keras
//!   layers (`<scope>/batch_normalization/gamma`, `beta`, `moving_mean`, `moving_variance`)
//!   already follow the Keras convention. The classic recipe (`tf.nn.moments` +
//!   `tf.train.ExponentialMovingAverage` + `tf.nn.batch_normalization` under a scope)
//!   stores the moving statistics as EMA shadows of the batch moments,
//!   `<V>/<S>/moments/Squeeze/ExponentialMovingAverage` (mean) and
//!   `<V>/<S>/moments/Squeeze_1/ExponentialMovingAverage` (variance), where `<S>` is the
//!   scope holding `gamma`/`beta` and `<V>` the variable scope `ema.apply` ran in (often
//!   `<S>` again, or nothing); `Squeeze` is the mean and `Squeeze_1` the variance (the
//!   order `tf.nn.moments` creates them in, checked against TensorFlow 2.21's op names).
//!   A pair is renamed `<S>/moving_mean` and `<S>/moving_variance` when both shadows are
//!   there, exactly one scope with `gamma` or `beta` fits (`<S>` or `<S>/<S>` first, else
//!   a single scope ending the path), their shapes agree with it, no other pair claims it
//!   and it has no `moving_mean` of its own; otherwise the shadows keep their names (and
//!   make no layer).
//! * TF2 object-based checkpoints (`model/layer_with_weights-0/moving_mean/.ATTRIBUTES/
//!   VARIABLE_VALUE`) are named by the variable names the object graph
//!   (`_CHECKPOINTABLE_OBJECT_GRAPH`) records (`bn_a/moving_mean`, the Keras layer name)
//!   where the object graph gives one to a single variable (Keras 3 saves a Sequential
//!   model's `gamma` under `optimizer/_trainable_variables/2`: named `seq/bn/gamma` all the
//!   same), else by the key with `/.ATTRIBUTES/VARIABLE_VALUE` stripped. Optimizer slot
//!   variables (`/.OPTIMIZER_SLOT/`) and string tensors are left out.
//!
//! Every renamed tensor's key is kept in the metadata as `tensorflow.key.<new name>`.
//! Checkpoints store no batch-norm conventions (eps, momentum, the EMA decay of the
//! classic recipe), so no `bnorm.layer.*` metadata is set: the Keras defaults apply (the
//! recipe's `tf.nn.moments` variance is the biased one, as Keras's), and a user who knows
//! the real eps and momentum sets them. Refused: big-endian bundles, snappy-compressed
//! index blocks (TensorFlow never compresses bundle indexes), a newer bundle version. Left out:
//! partitioned variables (saved as slices), tensors of dtypes without a safetensors
//! counterpart (complex, quantized, resource, variant) and string tensors.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::protobuf::{read_varint, Fields, ProtoError};
use super::{unreadable, FileFormat};
use crate::{Checkpoint, InteropError, Result, Tensor};

/// The SSTable footer magic (`kTableMagicNumber`), stored little-endian in the last 8 bytes.
const MAGIC: u64 = 0xdb47_7524_8b80_fb57;
/// Footer: two block handles padded to 40 bytes, then the magic.
const FOOTER_LEN: usize = 48;
/// Compression byte and masked CRC32C after every block.
const TRAILER_LEN: usize = 5;
/// The tensor holding the serialized `TrackableObjectGraph` of a TF2 checkpoint.
const OBJECT_GRAPH_KEY: &str = "_CHECKPOINTABLE_OBJECT_GRAPH";
/// Longest key accepted (TensorFlow names are far shorter).
const MAX_KEY: usize = 1 << 16;
/// Most shards a header may claim.
const MAX_SHARDS: i32 = 1 << 20;
/// Largest `checkpoint` text file read.
const MAX_STATE_FILE: u64 = 1 << 20;
/// Largest `.index` file read.
const MAX_INDEX_FILE: u64 = 1 << 30;

fn bad(reason: impl Into<String>) -> InteropError {
    unreadable(FileFormat::TfCheckpoint, reason)
}

fn proto(what: &str) -> impl Fn(ProtoError) -> InteropError + '_ {
    move |e| {
        bad(format!(
            "{what}: {e} (the .index file is corrupt; re-save the checkpoint)"
        ))
    }
}

/// The `.index` file of the TensorFlow checkpoint `path` names, if it names one: a prefix
/// whose `.index` exists (`model.ckpt-1000`), the `.index` file itself, one of its
/// `.data-NNNNN-of-NNNNN` shards, or a directory holding a `checkpoint` file whose
/// `model_checkpoint_path` names the prefix.
pub(crate) fn index_path(path: &Path) -> Option<PathBuf> {
    if path.is_dir() {
        let state = path.join("checkpoint");
        let file = File::open(&state).ok()?;
        let mut text = String::new();
        file.take(MAX_STATE_FILE).read_to_string(&mut text).ok()?;
        let prefix = model_checkpoint_path(&text)?;
        let prefix = Path::new(&prefix);
        let prefix = if prefix.is_absolute() {
            prefix.to_path_buf()
        } else {
            path.join(prefix)
        };
        return Some(with_suffix(&prefix, ".index"));
    }
    let name = path.file_name()?.to_str()?;
    if name.ends_with(".index") {
        return path.is_file().then(|| path.to_path_buf());
    }
    if let Some(prefix) = shard_prefix(name) {
        let index = path.with_file_name(format!("{prefix}.index"));
        return index.is_file().then_some(index);
    }
    let index = with_suffix(path, ".index");
    index.is_file().then_some(index)
}

/// `name` without a `.data-NNNNN-of-NNNNN` suffix, if it has one.
fn shard_prefix(name: &str) -> Option<&str> {
    let (prefix, rest) = name.rsplit_once(".data-")?;
    let (a, b) = rest.split_once("-of-")?;
    let digits = |s: &str| s.len() >= 5 && s.bytes().all(|c| c.is_ascii_digit());
    (digits(a) && digits(b) && !prefix.is_empty()).then_some(prefix)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// The `model_checkpoint_path` of a `checkpoint` file (a `CheckpointState` text proto).
fn model_checkpoint_path(text: &str) -> Option<String> {
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("model_checkpoint_path:") else {
            continue;
        };
        let rest = rest.trim().strip_prefix('"')?.strip_suffix('"')?;
        let mut out = String::new();
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next()? {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    c @ ('\\' | '"' | '\'') => out.push(c),
                    _ => return None,
                }
            } else {
                out.push(c);
            }
        }
        return (!out.is_empty()).then_some(out);
    }
    None
}

/// Whether `bytes` are a tensor bundle's `.index` file (an SSTable: its last 8 bytes are
/// the table magic).
pub(crate) fn is_index(bytes: &[u8]) -> bool {
    bytes.len() >= FOOTER_LEN && bytes[bytes.len() - 8..] == MAGIC.to_le_bytes()
}

/// Reads the checkpoint whose `.index` file is `index`; its shards are the
/// `.data-NNNNN-of-NNNNN` files beside it, read only where entries point.
pub(crate) fn read(index: &Path) -> Result<Checkpoint> {
    let io = |p: &Path, source| InteropError::Io {
        path: p.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(index).map_err(|e| io(index, e))?;
    if meta.len() > MAX_INDEX_FILE {
        return Err(bad(format!(
            "{} has {} bytes, more than an index file of {MAX_INDEX_FILE} bytes this reader \
             accepts",
            index.display(),
            meta.len()
        )));
    }
    let bytes = std::fs::read(index).map_err(|e| io(index, e))?;
    let name = index.as_os_str().to_string_lossy();
    let prefix = PathBuf::from(name.strip_suffix(".index").unwrap_or(&name));
    let mut shards = FileShards {
        prefix,
        open: HashMap::new(),
    };
    read_with(&bytes, &mut shards)
}

/// Reads a checkpoint held in memory: the `.index` file's bytes and its shards' bytes in
/// order (`shards[0]` is `.data-00000-of-NNNNN`). Every check of [`read_path`] applies.
///
/// [`read_path`]: super::read_path
///
/// ```
/// use bnorm_interop::read::tf::read_bundle;
/// // Neither an SSTable nor a bundle: a typed error, never a panic.
/// assert!(read_bundle(b"not an index", &[]).is_err());
/// ```
pub fn read_bundle(index: &[u8], shards: &[&[u8]]) -> Result<Checkpoint> {
    read_with(index, &mut MemShards(shards))
}

/// Where the tensor bytes come from.
trait Shards {
    /// The length of shard `id` of `count`.
    fn len(&mut self, id: u32, count: u32) -> Result<u64>;
    /// `len` bytes at `offset` of shard `id` (already checked to lie inside it).
    fn bytes(&mut self, id: u32, count: u32, offset: u64, len: usize) -> Result<Vec<u8>>;
}

struct MemShards<'a>(&'a [&'a [u8]]);

impl Shards for MemShards<'_> {
    fn len(&mut self, id: u32, count: u32) -> Result<u64> {
        self.0
            .get(id as usize)
            .map(|s| s.len() as u64)
            .ok_or_else(|| bad(format!("shard {id} of {count} was not given")))
    }

    fn bytes(&mut self, id: u32, _count: u32, offset: u64, len: usize) -> Result<Vec<u8>> {
        let s = self.0.get(id as usize).copied().unwrap_or_default();
        usize::try_from(offset)
            .ok()
            .and_then(|o| s.get(o..o.checked_add(len)?))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| bad(format!("range past the end of shard {id}")))
    }
}

struct FileShards {
    prefix: PathBuf,
    open: HashMap<u32, (PathBuf, File, u64)>,
}

impl FileShards {
    fn file(&mut self, id: u32, count: u32) -> Result<&mut (PathBuf, File, u64)> {
        if !self.open.contains_key(&id) {
            let path = with_suffix(&self.prefix, &format!(".data-{id:05}-of-{count:05}"));
            let io = |source| InteropError::Io {
                path: path.clone(),
                source,
            };
            let file = File::open(&path).map_err(io)?;
            let len = file.metadata().map_err(io)?.len();
            self.open.insert(id, (path, file, len));
        }
        Ok(self.open.get_mut(&id).expect("inserted above"))
    }
}

impl Shards for FileShards {
    fn len(&mut self, id: u32, count: u32) -> Result<u64> {
        Ok(self.file(id, count)?.2)
    }

    fn bytes(&mut self, id: u32, count: u32, offset: u64, len: usize) -> Result<Vec<u8>> {
        let (path, file, _) = self.file(id, count)?;
        let mut buf = vec![0u8; len];
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut buf))
            .map_err(|source| InteropError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(buf)
    }
}

// ------------------------------------------------------------------------------ CRC32C

fn crc32c_table() -> &'static [u32; 256] {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    })
}

/// Extends a CRC32C (Castagnoli) with `data`.
fn crc32c_extend(crc: u32, data: &[u8]) -> u32 {
    let t = crc32c_table();
    let mut c = !crc;
    for &b in data {
        c = t[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// LevelDB's masked CRC (stored CRCs are masked so that a CRC of CRCs stays meaningful).
fn mask(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

// ------------------------------------------------------------------------------ SSTable

#[derive(Debug, Clone, Copy)]
struct Handle {
    offset: u64,
    size: u64,
}

fn handle(buf: &[u8], pos: &mut usize, what: &str) -> Result<Handle> {
    let offset = read_varint(buf, pos).map_err(proto(what))?;
    let size = read_varint(buf, pos).map_err(proto(what))?;
    Ok(Handle { offset, size })
}

/// The contents of the block `h` points to, its trailer checked.
fn block<'a>(file: &'a [u8], h: Handle, what: &str) -> Result<&'a [u8]> {
    let range = usize::try_from(h.offset).ok().and_then(|o| {
        let size = usize::try_from(h.size).ok()?;
        let end = o.checked_add(size)?;
        (end.checked_add(TRAILER_LEN)? <= file.len()).then_some(o..end)
    });
    let Some(range) = range else {
        return Err(bad(format!(
            "the {what} block ({} bytes at offset {}) lies past the end of the {}-byte index \
             file (truncated or corrupt; re-save the checkpoint)",
            h.size,
            h.offset,
            file.len()
        )));
    };
    let end = range.end;
    let contents = &file[range];
    let kind = file[end];
    let stored = u32::from_le_bytes([file[end + 1], file[end + 2], file[end + 3], file[end + 4]]);
    let actual = mask(crc32c_extend(crc32c_extend(0, contents), &[kind]));
    if stored != actual {
        return Err(bad(format!(
            "the {what} block's checksum does not match (stored {stored:#010x}, computed \
             {actual:#010x}): the index file is corrupt; re-save the checkpoint"
        )));
    }
    match kind {
        0 => Ok(contents),
        1 => Err(bad(format!(
            "the {what} block is snappy-compressed, which this reader does not decode \
             (TensorFlow writes bundle indexes uncompressed; re-save the checkpoint with \
             tf.train.Checkpoint or tf.compat.v1.train.Saver)"
        ))),
        k => Err(bad(format!(
            "the {what} block has compression type {k}, which is unknown"
        ))),
    }
}

/// The (key, value) entries of a block, in order. `key_budget` bounds the bytes of all
/// keys built (prefix compression lets a small block describe long keys).
fn entries<'a>(
    b: &'a [u8],
    what: &str,
    key_budget: &mut usize,
) -> Result<Vec<(Vec<u8>, &'a [u8])>> {
    let corrupt = |why: &str| {
        bad(format!(
            "the {what} block is corrupt ({why}); re-save the checkpoint"
        ))
    };
    if b.len() < 4 {
        return Err(corrupt("shorter than its restart count"));
    }
    let n = u32::from_le_bytes([
        b[b.len() - 4],
        b[b.len() - 3],
        b[b.len() - 2],
        b[b.len() - 1],
    ]);
    let restarts = (n as usize)
        .checked_mul(4)
        .and_then(|r| r.checked_add(4))
        .filter(|&r| r <= b.len())
        .ok_or_else(|| corrupt(&format!("{n} restart points do not fit")))?;
    let data = &b[..b.len() - restarts];
    if n == 0 && !data.is_empty() {
        return Err(corrupt("entries without a restart point"));
    }
    let mut out: Vec<(Vec<u8>, &[u8])> = Vec::new();
    let mut pos = 0;
    let mut last: Vec<u8> = Vec::new();
    while pos < data.len() {
        let mut v = || read_varint(data, &mut pos).map_err(proto(what));
        let (shared, non_shared, value_len) = (v()?, v()?, v()?);
        if shared > last.len() as u64 {
            return Err(corrupt(&format!(
                "an entry shares {shared} bytes with a {}-byte key",
                last.len()
            )));
        }
        let take = |pos: &mut usize, n: u64| -> Result<&'a [u8]> {
            let end = usize::try_from(n)
                .ok()
                .and_then(|n| pos.checked_add(n))
                .filter(|&e| e <= data.len())
                .ok_or_else(|| corrupt(&format!("an entry claims {n} bytes past the end")))?;
            let s = &data[*pos..end];
            *pos = end;
            Ok(s)
        };
        let delta = take(&mut pos, non_shared)?;
        let value = take(&mut pos, value_len)?;
        let key_len = shared as usize + delta.len();
        if key_len > MAX_KEY {
            return Err(corrupt(&format!("a key of {key_len} bytes")));
        }
        *key_budget = key_budget
            .checked_sub(key_len)
            .ok_or_else(|| corrupt("its keys add up to far more bytes than the file holds"))?;
        let mut key = Vec::with_capacity(key_len);
        key.extend_from_slice(&last[..shared as usize]);
        key.extend_from_slice(delta);
        if !out.is_empty() && key <= last {
            return Err(corrupt("keys out of order"));
        }
        last.clone_from(&key);
        out.push((key, value));
    }
    Ok(out)
}

/// Every (key, value) of the table, in key order.
fn table(file: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    if !is_index(file) {
        return Err(bad(format!(
            "the index file ({} bytes) does not end with the SSTable footer magic: it is \
             truncated or not the .index file of a TensorFlow checkpoint",
            file.len()
        )));
    }
    let footer = &file[file.len() - FOOTER_LEN..file.len() - 8];
    let mut pos = 0;
    let metaindex = handle(footer, &mut pos, "footer")?;
    let index = handle(footer, &mut pos, "footer")?;
    // Unused (bundles have no filters), but checked like every block.
    block(file, metaindex, "metaindex")?;
    // Keys never need more bytes than a generous multiple of the file.
    let mut budget = file.len().saturating_mul(16).saturating_add(1 << 16);
    let index_entries = entries(block(file, index, "index")?, "index", &mut budget)?;
    let mut out = Vec::new();
    let mut next_free = 0u64;
    for (_, value) in index_entries {
        let mut p = 0;
        let h = handle(value, &mut p, "index entry")?;
        // Data blocks are written one after the other: refusing overlaps bounds the work
        // by the file's size.
        if h.offset < next_free {
            return Err(bad(
                "the index block points at overlapping data blocks: the index file is \
                 corrupt; re-save the checkpoint",
            ));
        }
        next_free = h
            .offset
            .saturating_add(h.size)
            .saturating_add(TRAILER_LEN as u64);
        for (k, v) in entries(block(file, h, "data")?, "data", &mut budget)? {
            if let Some((last, _)) = out.last() {
                if &k <= last {
                    return Err(bad(
                        "the index file's keys are out of order across blocks: it is corrupt; \
                         re-save the checkpoint",
                    ));
                }
            }
            out.push((k, v.to_vec()));
        }
    }
    Ok(out)
}

// ------------------------------------------------------------------------------ bundle

/// A `BundleEntryProto`.
#[derive(Debug, Default)]
struct Entry {
    dtype: u64,
    shape: Vec<i64>,
    unknown_rank: bool,
    shard_id: i32,
    offset: i64,
    size: i64,
    crc32c: u32,
    sliced: bool,
}

fn entry(bytes: &[u8], name: &str) -> Result<Entry> {
    let what = format!("the entry of {name}");
    let pe = proto(&what);
    let mut e = Entry::default();
    for f in Fields::new(bytes) {
        let (n, v) = f.map_err(&pe)?;
        match n {
            1 => e.dtype = v.varint("dtype").map_err(&pe)?,
            2 => {
                e.shape.clear();
                for f in Fields::new(v.bytes("shape").map_err(&pe)?) {
                    let (n, v) = f.map_err(&pe)?;
                    match n {
                        2 => {
                            let mut size = 0;
                            for f in Fields::new(v.bytes("dim").map_err(&pe)?) {
                                let (n, v) = f.map_err(&pe)?;
                                if n == 1 {
                                    size = v.int64("dim size").map_err(&pe)?;
                                }
                            }
                            e.shape.push(size);
                        }
                        3 => e.unknown_rank = v.varint("unknown_rank").map_err(&pe)? != 0,
                        _ => {}
                    }
                }
            }
            3 => e.shard_id = v.int32("shard_id").map_err(&pe)?,
            4 => e.offset = v.int64("offset").map_err(&pe)?,
            5 => e.size = v.int64("size").map_err(&pe)?,
            6 => e.crc32c = v.fixed32("crc32c").map_err(&pe)?,
            7 => e.sliced = true,
            _ => {}
        }
    }
    Ok(e)
}

/// The safetensors dtype and element size of a TensorFlow `DataType` (DT_STRING is 7).
fn dtype(dt: u64) -> Option<(Dtype, usize)> {
    Some(match dt {
        1 => (Dtype::F32, 4),
        2 => (Dtype::F64, 8),
        3 => (Dtype::I32, 4),
        4 => (Dtype::U8, 1),
        5 => (Dtype::I16, 2),
        6 => (Dtype::I8, 1),
        9 => (Dtype::I64, 8),
        10 => (Dtype::BOOL, 1),
        14 => (Dtype::BF16, 2),
        17 => (Dtype::U16, 2),
        19 => (Dtype::F16, 2),
        22 => (Dtype::U32, 4),
        23 => (Dtype::U64, 8),
        _ => return None,
    })
}

const DT_STRING: u64 = 7;

fn read_with(index: &[u8], shards: &mut dyn Shards) -> Result<Checkpoint> {
    let entries = table(index)?;
    let Some((first_key, header)) = entries.first() else {
        return Err(bad(
            "the index file has no entries (not even the bundle header); re-save the checkpoint",
        ));
    };
    if !first_key.is_empty() {
        return Err(bad(
            "the index file has no bundle header (empty key): it is not a tensor bundle (a \
             TensorFlow V1 checkpoint? re-save it with a current TensorFlow)",
        ));
    }
    let num_shards = bundle_header(header)?;
    let mut used: HashMap<u32, u64> = HashMap::new();
    let mut raw: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut object_graph: Option<Vec<u8>> = None;
    for (key, value) in &entries[1..] {
        // Slices of partitioned variables have binary keys (ordered codes).
        let Ok(name) = std::str::from_utf8(key) else {
            continue;
        };
        if name.starts_with('\0') {
            continue;
        }
        let e = entry(value, name)?;
        if e.sliced {
            continue;
        }
        let is_graph = name == OBJECT_GRAPH_KEY;
        let known = dtype(e.dtype);
        if known.is_none() && !(is_graph && e.dtype == DT_STRING) {
            continue;
        }
        let what = |why: String| bad(format!("{name}: {why}; the checkpoint is corrupt"));
        if e.unknown_rank {
            return Err(what("its shape has an unknown rank".into()));
        }
        let shape = e
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<Vec<usize>, _>>()
            .map_err(|_| what(format!("its shape {:?} has a negative dimension", e.shape)))?;
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| what(format!("its shape {shape:?} overflows")))?;
        let size =
            usize::try_from(e.size).map_err(|_| what(format!("its size {} is invalid", e.size)))?;
        if let Some((_, width)) = known {
            if numel.checked_mul(width) != Some(size) {
                return Err(what(format!(
                    "{size} bytes cannot hold the {numel} values of shape {shape:?}"
                )));
            }
        }
        let shard = u32::try_from(e.shard_id)
            .ok()
            .filter(|&s| s < num_shards)
            .ok_or_else(|| {
                what(format!(
                    "it is in shard {} of a checkpoint of {num_shards}",
                    e.shard_id
                ))
            })?;
        let offset = u64::try_from(e.offset)
            .map_err(|_| what(format!("its offset {} is negative", e.offset)))?;
        let shard_len = shards.len(shard, num_shards)?;
        if offset
            .checked_add(size as u64)
            .is_none_or(|end| end > shard_len)
        {
            return Err(what(format!(
                "its {size} bytes at offset {offset} lie past the end of shard {shard} \
                 ({shard_len} bytes; truncated?)"
            )));
        }
        // Entries do not overlap: all the bytes read are at most the shards' length.
        let total = used.entry(shard).or_insert(0);
        *total = total.saturating_add(size as u64);
        if *total > shard_len {
            return Err(what(format!(
                "the entries of shard {shard} claim more bytes than its {shard_len}"
            )));
        }
        if is_graph && numel != 1 {
            return Err(what(format!(
                "the object graph has shape {shape:?}, not a scalar"
            )));
        }
        let bytes = shards.bytes(shard, num_shards, offset, size)?;
        let crc = if is_graph {
            string_crc(&bytes, numel).map_err(|w| what(w.to_string()))?
        } else {
            crc32c_extend(0, &bytes)
        };
        if mask(crc) != e.crc32c {
            return Err(what(format!(
                "its bytes do not match their checksum (stored {:#010x}, computed {:#010x})",
                e.crc32c,
                mask(crc)
            )));
        }
        if is_graph {
            object_graph = Some(
                string_elements(&bytes, 1)
                    .map_err(what_proto(name))?
                    .remove(0),
            );
            continue;
        }
        let (dtype, _) = known.expect("checked above");
        raw.insert(
            name.to_string(),
            Tensor {
                dtype,
                shape,
                bytes,
            },
        );
    }
    let mut ckpt = Checkpoint::default();
    match object_graph {
        Some(g) => name_by_object_graph(raw, &g, &mut ckpt)?,
        None => name_tf1(raw, &mut ckpt),
    }
    Ok(ckpt)
}

fn what_proto(name: &str) -> impl Fn(ProtoError) -> InteropError + '_ {
    move |e| bad(format!("{name}: {e}; the checkpoint is corrupt"))
}

/// Reads the header; returns the number of shards.
fn bundle_header(bytes: &[u8]) -> Result<u32> {
    let what = "the bundle header";
    let mut num_shards = 0;
    let mut endianness = 0;
    let mut min_consumer = 0;
    for f in Fields::new(bytes) {
        let (n, v) = f.map_err(proto(what))?;
        match n {
            1 => num_shards = v.int32("num_shards").map_err(proto(what))?,
            2 => endianness = v.varint("endianness").map_err(proto(what))?,
            3 => {
                for f in Fields::new(v.bytes("version").map_err(proto(what))?) {
                    let (n, v) = f.map_err(proto(what))?;
                    if n == 2 {
                        min_consumer = v.int32("min_consumer").map_err(proto(what))?;
                    }
                }
            }
            _ => {}
        }
    }
    if endianness != 0 {
        return Err(bad(
            "the checkpoint was written big-endian, which this reader does not read (load \
             and re-save it on a little-endian machine)",
        ));
    }
    if min_consumer > 1 {
        return Err(bad(format!(
            "the bundle needs a reader of version {min_consumer} or later (this one reads \
             version 1): it was written by a newer TensorFlow"
        )));
    }
    if !(1..=MAX_SHARDS).contains(&num_shards) {
        return Err(bad(format!(
            "the header claims {num_shards} shards; the index file is corrupt"
        )));
    }
    Ok(num_shards as u32)
}

/// Splits a DT_STRING tensor's bytes: `count` varint64 lengths, a masked CRC32C of the
/// lengths, then the strings.
fn string_layout(bytes: &[u8], count: usize) -> std::result::Result<(Vec<u64>, usize), ProtoError> {
    let mut pos = 0;
    let mut lens = Vec::new();
    for _ in 0..count {
        // Each length takes at least one byte: `count` is bounded by the bytes present.
        lens.push(read_varint(bytes, &mut pos)?);
    }
    let end = pos
        .checked_add(4)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| ProtoError("string tensor truncated before its length checksum".into()))?;
    Ok((lens, end))
}

/// The CRC32C of a string tensor's lengths as TensorFlow computes it: each length as a
/// little-endian u32 when it fits (older checkpoints used u32), else as a u64.
fn lengths_crc(lens: &[u64]) -> u32 {
    lens.iter().fold(0, |crc, &l| match u32::try_from(l) {
        Ok(l32) => crc32c_extend(crc, &l32.to_le_bytes()),
        Err(_) => crc32c_extend(crc, &l.to_le_bytes()),
    })
}

/// The CRC32C TensorFlow records for a string tensor: the lengths (see [`lengths_crc`]),
/// the stored length checksum, then the string bytes.
fn string_crc(bytes: &[u8], count: usize) -> std::result::Result<u32, ProtoError> {
    let (lens, start) = string_layout(bytes, count)?;
    let crc = crc32c_extend(lengths_crc(&lens), &bytes[start - 4..start]);
    Ok(crc32c_extend(crc, &bytes[start..]))
}

fn string_elements(bytes: &[u8], count: usize) -> std::result::Result<Vec<Vec<u8>>, ProtoError> {
    let (lens, mut pos) = string_layout(bytes, count)?;
    let stored = u32::from_le_bytes([
        bytes[pos - 4],
        bytes[pos - 3],
        bytes[pos - 2],
        bytes[pos - 1],
    ]);
    if mask(lengths_crc(&lens)) != stored {
        return Err(ProtoError(
            "string lengths do not match their checksum".into(),
        ));
    }
    let mut out = Vec::new();
    for l in lens {
        let end = usize::try_from(l)
            .ok()
            .and_then(|l| pos.checked_add(l))
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| ProtoError(format!("a string of {l} bytes runs past the end")))?;
        out.push(bytes[pos..end].to_vec());
        pos = end;
    }
    Ok(out)
}

// ------------------------------------------------------------------------------ names

/// Suffix of a TF2 variable's key.
const VARIABLE_VALUE: &str = "/.ATTRIBUTES/VARIABLE_VALUE";

/// checkpoint_key → full_name of every attribute in a serialized `TrackableObjectGraph`.
fn object_graph_names(graph: &[u8]) -> Result<HashMap<String, String>> {
    let what = "the object graph (_CHECKPOINTABLE_OBJECT_GRAPH)";
    let p = proto(what);
    let mut out = HashMap::new();
    for node in Fields::new(graph) {
        let (n, v) = node.map_err(&p)?;
        if n != 1 {
            continue;
        }
        for f in Fields::new(v.bytes("node").map_err(&p)?) {
            let (n, v) = f.map_err(&p)?;
            if n != 2 {
                continue;
            }
            let (mut full_name, mut key) = (None, None);
            for f in Fields::new(v.bytes("attribute").map_err(&p)?) {
                let (n, v) = f.map_err(&p)?;
                match n {
                    2 => full_name = Some(v.string("full_name").map_err(&p)?),
                    3 => key = Some(v.string("checkpoint_key").map_err(&p)?),
                    _ => {}
                }
            }
            if let (Some(f), Some(k)) = (full_name, key) {
                out.insert(k.to_string(), f.to_string());
            }
        }
    }
    Ok(out)
}

fn name_by_object_graph(
    raw: BTreeMap<String, Tensor>,
    graph: &[u8],
    ckpt: &mut Checkpoint,
) -> Result<()> {
    let full_names = object_graph_names(graph)?;
    // Variable names, kept only where one key has them.
    let mut candidates: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut kept = Vec::new();
    for (key, tensor) in raw {
        if key.contains("/.OPTIMIZER_SLOT/") {
            continue;
        }
        let path = key.strip_suffix(VARIABLE_VALUE).unwrap_or(&key).to_string();
        if let Some(full) = full_names.get(&key) {
            let full = full.strip_suffix(":0").unwrap_or(full);
            if key.ends_with(VARIABLE_VALUE) && !full.is_empty() {
                candidates
                    .entry(full.to_string())
                    .or_default()
                    .push(key.clone());
            }
        }
        kept.push((key, path, tensor));
    }
    let mut used: BTreeSet<String> = BTreeSet::new();
    let renamed: HashMap<String, String> = candidates
        .into_iter()
        .filter(|(_, keys)| keys.len() == 1)
        .map(|(full, mut keys)| (keys.remove(0), full))
        .collect();
    for (_, new) in renamed.iter() {
        used.insert(new.clone());
    }
    for (key, path, tensor) in kept {
        let name = match renamed.get(&key) {
            Some(n) => n.clone(),
            // A path that collides with another name keeps its whole key.
            None if used.contains(&path) || ckpt.tensors.contains_key(&path) => key.clone(),
            None => path,
        };
        if ckpt.tensors.contains_key(&name) {
            return Err(bad(format!(
                "two tensors would both be named {name}: the object graph contradicts the \
                 keys; the checkpoint is corrupt"
            )));
        }
        if name != key {
            ckpt.metadata
                .insert(format!("tensorflow.key.{name}"), key.clone());
        }
        ckpt.tensors.insert(name, tensor);
    }
    Ok(())
}

/// The (`<V>/<S>/moments` path, whether the variance) of a classic-recipe EMA shadow name.
fn ema_shadow(name: &str) -> Option<(&str, bool)> {
    let rest = name.strip_suffix("/ExponentialMovingAverage")?;
    let (moments, is_var) = match rest.strip_suffix("/Squeeze_1") {
        Some(r) => (r, true),
        None => (rest.strip_suffix("/Squeeze")?, false),
    };
    let last = moments.rsplit('/').next().unwrap_or(moments);
    let n = last.strip_prefix("moments")?;
    let numbered = n.is_empty()
        || n.strip_prefix('_')
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()));
    numbered.then_some((moments, is_var))
}

fn name_tf1(mut raw: BTreeMap<String, Tensor>, ckpt: &mut Checkpoint) {
    // Scopes holding the affine parameters of a hand-made batch norm.
    let mut affine: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (name, t) in &raw {
        if let Some(s) = name
            .strip_suffix("/gamma")
            .or_else(|| name.strip_suffix("/beta"))
        {
            affine.insert(s.to_string(), t.shape.clone());
        }
    }
    // (moments scope) → (mean key, variance key).
    let mut pairs: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    for name in raw.keys() {
        if let Some((moments, is_var)) = ema_shadow(name) {
            let p = pairs.entry(moments.to_string()).or_default();
            if is_var {
                p.1 = Some(name.clone());
            } else {
                p.0 = Some(name.clone());
            }
        }
    }
    // layer scope → the pairs that claim it.
    let mut claims: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (moments, pair) in pairs {
        let (Some(mean), Some(var)) = pair else {
            continue;
        };
        let scope = moments.rsplit_once('/').map_or("", |m| m.0);
        // `ema.apply` in the layer's own variable scope (`<S>/<S>`) or in none (`<S>`) first;
        // else any variable scope before it, if only one layer fits.
        let exact: Vec<&String> = affine
            .keys()
            .filter(|s| scope == s.as_str() || scope == format!("{s}/{s}"))
            .collect();
        let matching: Vec<&String> = if exact.is_empty() {
            affine
                .keys()
                .filter(|s| scope.ends_with(&format!("/{s}")))
                .collect()
        } else {
            exact
        };
        if let [s] = matching.as_slice() {
            claims.entry((*s).clone()).or_default().push((mean, var));
        }
    }
    for (scope, list) in claims {
        let [(mean, var)] = list.as_slice() else {
            continue;
        };
        let (m_name, v_name) = (
            format!("{scope}/moving_mean"),
            format!("{scope}/moving_variance"),
        );
        let shape_ok = |k: &String| {
            raw.get(k)
                .is_some_and(|t| t.shape.len() == 1 && Some(&t.shape) == affine.get(&scope))
        };
        if raw.contains_key(&m_name)
            || raw.contains_key(&v_name)
            || !shape_ok(mean)
            || !shape_ok(var)
        {
            continue;
        }
        for (old, new) in [(mean, m_name), (var, v_name)] {
            if let Some(t) = raw.remove(old) {
                ckpt.metadata
                    .insert(format!("tensorflow.key.{new}"), old.clone());
                raw.insert(new, t);
            }
        }
    }
    ckpt.tensors = raw;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c_extend(0, b"123456789"), 0xe306_9283);
        assert_eq!(
            crc32c_extend(crc32c_extend(0, b"1234"), b"56789"),
            0xe306_9283
        );
    }

    #[test]
    fn names() {
        assert_eq!(
            shard_prefix("m.ckpt-3.data-00000-of-00001"),
            Some("m.ckpt-3")
        );
        assert_eq!(shard_prefix("m.data-0-of-1"), None);
        assert_eq!(
            model_checkpoint_path("model_checkpoint_path: \"a\\\"b\"\nall: \"x\""),
            Some("a\"b".into())
        );
        assert_eq!(model_checkpoint_path("nothing"), None);
        assert_eq!(
            ema_shadow("bn/bn/moments/Squeeze_1/ExponentialMovingAverage"),
            Some(("bn/bn/moments", true))
        );
        assert_eq!(
            ema_shadow("a/moments_2/Squeeze/ExponentialMovingAverage"),
            Some(("a/moments_2", false))
        );
        assert_eq!(
            ema_shadow("a/momentsx/Squeeze/ExponentialMovingAverage"),
            None
        );
        assert_eq!(
            ema_shadow("a/moments/Squeeze_2/ExponentialMovingAverage"),
            None
        );
    }
}
