//! PyTorch `torch.save` files (`.pt`, `.pth`, `.bin`): the zip format of torch >= 1.6.
//!
//! The zip holds `<archive>/data.pkl` (a pickle of the saved object whose tensors name
//! their storages by persistent id), `<archive>/data/<key>` (each storage's raw bytes),
//! `<archive>/byteorder` (`little` or `big`; absent in files of older torch, which are
//! little-endian) and `<archive>/version`. The pickle is run by a small interpreter
//! (`read/pickle.rs`) that calls nothing and knows only what a tensor state dict needs.
//!
//! The state dict is found at the top level (`torch.save(model.state_dict())`) or under
//! one of the keys training scripts use (`state_dict`, `model_state_dict`, `model`, `net`,
//! `network`, `module`, `ema`, …); otherwise every tensor of the nested dicts is kept,
//! named by joining the keys with `.`. An optimizer's state dict (a dict with `state` and
//! `param_groups`) is never taken for layers, and non-tensor leaves (`epoch`, `lr`) are
//! skipped. A `module.` (DataParallel / DistributedDataParallel) or `_orig_mod.`
//! (`torch.compile`) prefix that every name carries is removed.
//!
//! A state dict does not store a batch norm's eps or momentum (they are constructor
//! arguments, in the model's code): no convention metadata is recorded, and the PyTorch
//! defaults apply unless the user says otherwise.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek};

use safetensors::Dtype;

use super::pickle::{self, describe, Obj, Program, StorageRef, TensorRef, Value};
use super::{unreadable, FileFormat};
use crate::{Checkpoint, InteropError, Result, Tensor};

/// Largest `data.pkl` read (a state dict of thousands of tensors is well under 1 MiB).
const MAX_PICKLE: u64 = 64 << 20;
/// Most a compressed record may expand (torch.save writes them stored, uncompressed).
const MAX_EXPANSION: u64 = 64;
/// Deepest dict nesting followed when looking for tensors.
const MAX_DEPTH: usize = 32;
/// Most dict entries visited when looking for tensors (shared sub-dicts count each time);
/// also at most one a byte of the pickle, which is what an unshared entry costs.
const MAX_VISITS: usize = 1 << 22;
/// Most times over the tensors may copy the storages they view (tied weights: 2).
const MAX_SHARING: usize = 4;
/// Longest tensor name (joined keys).
const MAX_NAME: usize = 4096;

/// Keys under which training scripts store the model's state dict, most specific first.
const STATE_DICT_KEYS: [&str; 12] = [
    "state_dict",
    "model_state_dict",
    "model_state",
    "model",
    "net",
    "network",
    "module",
    "model_ema",
    "ema",
    "state_dict_ema",
    "ema_state_dict",
    "weights",
];

/// Prefixes that wrappers add to every name: DataParallel / DDP and `torch.compile`.
const WRAPPER_PREFIXES: [&str; 2] = ["module.", "_orig_mod."];

fn refuse(reason: impl Into<String>) -> InteropError {
    unreadable(FileFormat::Torch, reason)
}

fn zip_error(e: zip::result::ZipError) -> InteropError {
    refuse(format!("the zip archive is damaged: {e}"))
}

/// Reads the state dict of a zip-format `torch.save` file.
pub(crate) fn read_zip<R: Read + Seek>(archive: &mut zip::ZipArchive<R>) -> Result<Checkpoint> {
    let prefix = archive_prefix(archive)?;
    let code = read_record(
        archive,
        &format!("{prefix}data.pkl"),
        MAX_PICKLE,
        "the most bnorm reads for a pickle",
    )?
    .ok_or_else(|| refuse("data.pkl is missing"))?;
    let big_endian = match read_record(
        archive,
        &format!("{prefix}byteorder"),
        16,
        "a byteorder word",
    )? {
        None => false,
        Some(b) => match b.as_slice() {
            b"little" => false,
            b"big" => true,
            other => {
                return Err(refuse(format!(
                    "the byteorder record says {:?}, neither \"little\" nor \"big\"",
                    String::from_utf8_lossy(other)
                )))
            }
        },
    };
    let (root, prog) = pickle::run(&code).map_err(refuse)?;
    let selected = select(&prog, &root, code.len())?;
    let mut storages: HashMap<usize, Vec<u8>> = HashMap::new();
    let mut tensors = BTreeMap::new();
    let (mut stored, mut out) = (0usize, 0usize);
    for (name, t) in selected {
        let view = &prog.tensors[t];
        let s = &prog.storages[view.storage];
        let fresh = !storages.contains_key(&view.storage);
        let bytes = match storages.entry(view.storage) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(load_storage(archive, &prefix, s, &name)?),
        };
        let tensor = materialize(&name, view, s, bytes, big_endian)?;
        // Views may share a storage (tied weights); many views of one storage must not
        // turn a small file into a huge allocation.
        stored = stored.saturating_add(if fresh { bytes.len() } else { 0 });
        out = out.saturating_add(tensor.bytes.len());
        if out > stored.saturating_mul(MAX_SHARING).saturating_add(1 << 16) {
            return Err(refuse(format!(
                "the tensors view their storages {MAX_SHARING} times over or more ({out} bytes \
                 from {stored} stored); a state dict does not, and bnorm does not copy them"
            )));
        }
        tensors.insert(name, tensor);
    }
    Ok(Checkpoint {
        tensors,
        metadata: BTreeMap::new(),
    })
}

/// The magic number PyTorch's legacy format pickles first, as LONG1's 10 bytes.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// A pickle at the start of the file: PyTorch's legacy (pre-1.6) format, or a bare pickle.
/// Neither is read: the legacy format is refused with what to do, any other pickle as
/// not a PyTorch file.
pub(crate) fn read_legacy(bytes: &[u8]) -> Result<Checkpoint> {
    // PROTO n, an optional FRAME (protocol 4+), then LONG1 of the 10-byte magic number.
    let mut rest = bytes.get(2..).unwrap_or_default();
    if let [0x95, tail @ ..] = rest {
        rest = tail.get(8..).unwrap_or_default();
    }
    if rest.len() >= 12 && rest[0] == 0x8a && rest[1] == 10 && rest[2..12] == LEGACY_MAGIC {
        return Err(refuse(
            "legacy PyTorch serialization; re-save with torch.save in torch >= 1.6 (the \
             default zip format)",
        ));
    }
    Err(InteropError::UnknownFormat {
        reason: "a bare Python pickle, not a PyTorch file: bnorm reads torch.save files (a \
                 zip holding data.pkl) and never runs a pickle on its own"
            .into(),
    })
}

/// `<archive>/`: the folder of the one `data.pkl` record.
fn archive_prefix<R: Read + Seek>(archive: &zip::ZipArchive<R>) -> Result<String> {
    let mut found: Option<String> = None;
    for name in archive.file_names() {
        let name = name.map_err(zip_error)?;
        let Some(dir) = name.strip_suffix("data.pkl") else {
            continue;
        };
        if !(dir.is_empty() || dir.ends_with('/')) || dir.matches('/').count() > 1 {
            continue;
        }
        if let Some(other) = &found {
            if other != dir {
                return Err(refuse(format!(
                    "the zip holds two pickles ({other}data.pkl and {dir}data.pkl); a torch.save \
                     file holds one"
                )));
            }
        }
        found = Some(dir.to_string());
    }
    found.ok_or_else(|| refuse("no <archive>/data.pkl record (not a torch.save file)"))
}

/// The bytes of a record, at most `limit` of them (`None` if there is no such record); a
/// record that claims more is refused, `limit_is` saying what the limit is.
fn read_record<R: Read + Seek>(
    archive: &mut zip::ZipArchive<R>,
    name: &str,
    limit: u64,
    limit_is: &str,
) -> Result<Option<Vec<u8>>> {
    let mut f = match archive.by_name(name) {
        Ok(f) => f,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(zip_error(e)),
    };
    if f.size() > limit {
        return Err(refuse(format!(
            "record {name} claims {} bytes, more than {limit} ({limit_is})",
            f.size()
        )));
    }
    // torch.save stores records uncompressed; a re-packed file may deflate them, but a
    // record that expands beyond what tensor data plausibly does is a zip bomb.
    if f.size() > f.compressed_size().saturating_mul(MAX_EXPANSION) + 4096 {
        return Err(refuse(format!(
            "record {name} expands {} compressed bytes to {}, more than {MAX_EXPANSION} times \
             over (torch.save stores records uncompressed: re-save the file with torch.save)",
            f.compressed_size(),
            f.size()
        )));
    }
    let mut out = Vec::new();
    // The claimed size is not trusted for allocation: the buffer grows with the bytes
    // that actually arrive, and no more than the claim (checked above) are read.
    let claimed = f.size();
    (&mut f)
        .take(claimed)
        .read_to_end(&mut out)
        .map_err(|e| refuse(format!("record {name} cannot be read: {e}")))?;
    Ok(Some(out))
}

fn elem_size(s: &StorageRef, tensor: &str) -> Result<(Dtype, usize)> {
    let dtype = s.dtype.ok_or_else(|| {
        refuse(format!(
            "tensor {tensor} is stored as {}, a dtype bnorm cannot hold",
            s.type_name
        ))
    })?;
    Ok((dtype, dtype.bitsize() / 8))
}

/// The bytes of storage `s` (exactly `numel` elements), from `<archive>/data/<key>`.
fn load_storage<R: Read + Seek>(
    archive: &mut zip::ZipArchive<R>,
    prefix: &str,
    s: &StorageRef,
    tensor: &str,
) -> Result<Vec<u8>> {
    let (_, size) = elem_size(s, tensor)?;
    let need = s.numel.checked_mul(size).ok_or_else(|| {
        refuse(format!(
            "storage {} claims {} elements, an overflowing byte count",
            s.key, s.numel
        ))
    })?;
    let name = format!("{prefix}data/{}", s.key);
    let limit_is = format!(
        "what the pickle says the storage holds: {} {} elements; the file is corrupt",
        s.numel, s.type_name
    );
    let bytes = read_record(archive, &name, need as u64, &limit_is)?.ok_or_else(|| {
        refuse(format!(
            "storage record {name} (of tensor {tensor}) is missing"
        ))
    })?;
    if bytes.len() != need {
        return Err(refuse(format!(
            "storage record {name} holds {} bytes, but the pickle says {} {} elements ({need} \
             bytes): the file is truncated or corrupt",
            bytes.len(),
            s.numel,
            s.type_name
        )));
    }
    Ok(bytes)
}

/// The tensor `view` of `storage`, row-major and little-endian.
fn materialize(
    name: &str,
    view: &TensorRef,
    s: &StorageRef,
    storage: &[u8],
    big_endian: bool,
) -> Result<Tensor> {
    let (dtype, size) = elem_size(s, name)?;
    // The pickle interpreter checked that the view stays inside `s.numel` elements and
    // holds at most that many; `storage` holds exactly `s.numel` elements.
    let numel: usize = view.size.iter().product();
    let mut bytes = Vec::with_capacity(numel * size);
    let contiguous = {
        let mut expect = 1usize;
        let mut ok = true;
        for (&d, &st) in view.size.iter().zip(&view.stride).rev() {
            if d > 1 && st != expect {
                ok = false;
            }
            expect = expect.saturating_mul(d);
        }
        ok
    };
    if numel == 0 {
    } else if contiguous {
        let start = view.offset * size;
        let src = storage
            .get(start..start + numel * size)
            .ok_or_else(|| refuse(format!("tensor {name} lies past the end of its storage")))?;
        bytes.extend_from_slice(src);
    } else {
        // Gather a strided view, one element at a time, in row-major order.
        let mut index = vec![0usize; view.size.len()];
        for _ in 0..numel {
            let at: usize = view.offset
                + index
                    .iter()
                    .zip(&view.stride)
                    .map(|(&i, &st)| i * st)
                    .sum::<usize>();
            let src = storage
                .get(at * size..(at + 1) * size)
                .ok_or_else(|| refuse(format!("tensor {name} lies past the end of its storage")))?;
            bytes.extend_from_slice(src);
            for k in (0..index.len()).rev() {
                index[k] += 1;
                if index[k] < view.size[k] {
                    break;
                }
                index[k] = 0;
            }
        }
    }
    if big_endian && size > 1 {
        for c in bytes.chunks_exact_mut(size) {
            c.reverse();
        }
    }
    Ok(Tensor {
        dtype,
        shape: view.size.clone(),
        bytes,
    })
}

// ------------------------------------------------------------ finding the state dict

/// The entries of a dict, the last value of a key set twice winning (Python's semantics),
/// with keys as names (strings, or ints written in decimal; other keys are skipped).
fn entries<'a>(prog: &'a Program, v: &Value) -> Option<Vec<(String, &'a Value)>> {
    let Value::Obj(i) = v else {
        return None;
    };
    let Obj::Dict(pairs) = &prog.objs[*i] else {
        return None;
    };
    let mut out: Vec<(String, &Value)> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    for (k, v) in pairs {
        let key = match k {
            Value::Str(s) => s.to_string(),
            Value::Int(n) => n.to_string(),
            _ => continue,
        };
        match at.get(&key) {
            Some(&j) => out[j].1 = v,
            None => {
                at.insert(key.clone(), out.len());
                out.push((key, v));
            }
        }
    }
    Some(out)
}

/// An optimizer's `state_dict()`: `{'state': …, 'param_groups': […]}`.
fn is_optimizer(e: &[(String, &Value)]) -> bool {
    e.iter().any(|(k, _)| k == "state") && e.iter().any(|(k, _)| k == "param_groups")
}

struct Walk<'a> {
    prog: &'a Program,
    visits: usize,
    limit: usize,
}

impl<'a> Walk<'a> {
    /// Every tensor under `v` (nested dicts, not optimizer state), named `prefix.key…`.
    fn collect(
        &mut self,
        v: &Value,
        prefix: &str,
        depth: usize,
        out: &mut Vec<(String, usize)>,
    ) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(refuse(format!(
                "dicts nested deeper than {MAX_DEPTH} levels (at {prefix:?}); a state dict is \
                 not that deep"
            )));
        }
        let Some(entries) = entries(self.prog, v) else {
            return Ok(());
        };
        if is_optimizer(&entries) {
            return Ok(());
        }
        for (key, value) in entries {
            self.visits += 1;
            if self.visits > self.limit {
                return Err(refuse(format!(
                    "the dicts of the pickle have more than {} entries (counting shared ones \
                     each time), more than its size allows",
                    self.limit
                )));
            }
            if prefix.len() + key.len() >= MAX_NAME {
                return Err(refuse(format!(
                    "a tensor name longer than {MAX_NAME} bytes (keys nested under {:?}…)",
                    prefix.chars().take(60).collect::<String>()
                )));
            }
            let name = if prefix.is_empty() {
                key
            } else {
                format!("{prefix}.{key}")
            };
            match value {
                Value::Tensor(t) => out.push((name, *t)),
                Value::Obj(_) => self.collect(value, &name, depth + 1, out)?,
                _ => {}
            }
        }
        Ok(())
    }
}

/// The tensors of the state dict in `root`, by name.
fn select(prog: &Program, root: &Value, code_len: usize) -> Result<Vec<(String, usize)>> {
    let Some(top) = entries(prog, root) else {
        return Err(refuse(format!(
            "the file holds {}, not a dict of tensors (a state dict)",
            match root {
                Value::Obj(_) => "a list or tuple".to_string(),
                other => describe(other),
            }
        )));
    };
    if is_optimizer(&top) {
        return Err(refuse(
            "the file holds an optimizer's state dict (state, param_groups), not a model's",
        ));
    }
    let mut walk = Walk {
        prog,
        visits: 0,
        limit: MAX_VISITS.min(code_len.saturating_add(16)),
    };
    let mut out = Vec::new();
    let direct = top.iter().any(|(_, v)| matches!(v, Value::Tensor(_)));
    let mut done = false;
    if !direct {
        for key in STATE_DICT_KEYS {
            if let Some((_, v)) = top.iter().find(|(k, _)| k == key) {
                walk.collect(v, "", 1, &mut out)?;
                if !out.is_empty() {
                    done = true;
                    break;
                }
            }
        }
    }
    if !done {
        walk.collect(root, "", 0, &mut out)?;
    }
    if out.is_empty() {
        let keys: Vec<&str> = top.iter().take(12).map(|(k, _)| k.as_str()).collect();
        return Err(refuse(format!(
            "no tensors found in the saved dict (its keys: {})",
            keys.join(", ")
        )));
    }
    // Wrapper prefixes carried by every name.
    while let Some(p) = WRAPPER_PREFIXES
        .iter()
        .find(|p| out.iter().all(|(n, _)| n.starts_with(**p)))
    {
        for (n, _) in &mut out {
            n.drain(..p.len());
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (n, _) in &out {
        if !seen.insert(n.as_str()) {
            return Err(refuse(format!(
                "two tensors are named {n:?} once the nested keys are joined with '.'"
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_magic_is_recognized() {
        let mut b = vec![0x80, 0x02, 0x8a, 0x0a];
        b.extend(LEGACY_MAGIC);
        b.push(b'.');
        let e = read_legacy(&b).unwrap_err().to_string();
        assert!(e.contains("legacy PyTorch serialization"), "{e}");
        let e = read_legacy(b"\x80\x02K\x01.").unwrap_err();
        assert!(matches!(e, InteropError::UnknownFormat { .. }), "{e}");
        assert!(read_legacy(b"\x80").is_err());
    }
}
