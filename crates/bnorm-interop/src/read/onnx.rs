//! ONNX models (`ModelProto`), read with a small protobuf reader of its own: the
//! graph's initializers and `Constant` nodes give tensors, and every `BatchNormalization`
//! node of the main graph becomes a layer under PyTorch names —
//! `<prefix>.weight`, `.bias`, `.running_mean`, `.running_var` (no
//! `num_batches_tracked`: ONNX has none) — where the prefix is the node's name (or, for an
//! unnamed node, its scale initializer's name less `.weight`, else its output's name).
//!
//! Conventions recorded for each layer (`bnorm.layer.<prefix>.*`): `format` = `torch`;
//! `eps` = the node's `epsilon` (the ONNX default 1e-5 when absent); `momentum` =
//! `decay:<m>` with `m` the node's `momentum` (default 0.9: ONNX updates
//! `running = running * m + batch * (1 - m)`); `variance`: the ONNX specification
//! defines the update with the population (biased) variance, but a model exported by
//! PyTorch (`producer_name` "pytorch") carries PyTorch's running variance, which is
//! updated with the unbiased one — so `unbiased` for PyTorch exports, `biased` otherwise.
//! A node with `training_mode=1` is noted as `bnorm.layer.<prefix>.onnx_training_mode` =
//! `1`. Other initializers (and unused `Constant` values) are kept under their own names.
//!
//! Refused with a clear error: batch-norm tensors stored as external data (the values are
//! in another file; other external tensors are left out), batch-norm inputs that are
//! neither initializers nor `Constant` outputs (graph inputs, computed values), the
//! pre-opset-9 non-spatial mode (`spatial=0`), epsilon or momentum out of range. Nodes
//! inside subgraphs (`If`/`Loop` bodies) and functions are not read; tensors of types
//! bnorm does not keep (strings, complex, 8-bit floats) are left out unless a batch norm
//! needs them (then refused).
//!
//! ```
//! use bnorm_interop::{read::read_bytes, InteropError};
//! // ir_version 7 and a producer name, but no graph.
//! let e = read_bytes(b"\x08\x07\x12\x04test").unwrap_err();
//! assert!(matches!(e, InteropError::Unreadable { format: "onnx", .. }));
//! assert!(e.to_string().contains("no graph"));
//! ```

use std::collections::{BTreeMap, BTreeSet};

use safetensors::Dtype;

use crate::{Checkpoint, Result, Tensor};

mod proto;

use proto::{bytes, each, err, string, varint, wrong, Wire};

/// Whether `bytes` look like an ONNX `ModelProto`: field 1 (`ir_version`, a varint from 1
/// to 64) first, as every ONNX writer puts it, then the key of a known `ModelProto` field
/// with its wire type (a truncated model is still recognized, and then refused by
/// [`read`] with the reason). Reads at most a dozen bytes.
pub(crate) fn looks_like(bytes: &[u8]) -> bool {
    proto::model_start(bytes)
}

/// The ONNX `TensorProto.DataType` codes bnorm keeps, as safetensors dtypes.
fn dtype_of(code: u64) -> Option<Dtype> {
    Some(match code {
        1 => Dtype::F32,
        2 => Dtype::U8,
        3 => Dtype::I8,
        4 => Dtype::U16,
        5 => Dtype::I16,
        6 => Dtype::I32,
        7 => Dtype::I64,
        9 => Dtype::BOOL,
        10 => Dtype::F16,
        11 => Dtype::F64,
        12 => Dtype::U32,
        13 => Dtype::U64,
        16 => Dtype::BF16,
        _ => return None,
    })
}

/// A decoded `TensorProto`.
enum Decoded {
    Tensor(Tensor),
    /// Stored in another file.
    External,
    /// A dtype bnorm does not keep (strings, complex, 8-bit floats …): its code.
    Unsupported(u64),
}

/// Decodes a `TensorProto`, checking the element count against the data present.
fn tensor(buf: &[u8], name_hint: &str) -> Result<(String, Decoded)> {
    let mut name = String::new();
    let mut dims: Vec<u64> = Vec::new();
    let mut data_type = 0u64;
    let mut raw: Option<&[u8]> = None;
    let mut external = false;
    // Typed data: (field number, payload pieces) in order.
    let mut typed: Vec<(u32, Wire<'_>)> = Vec::new();
    each(buf, "TensorProto", |n, w| {
        match n {
            1 => match w {
                Wire::Varint(v) => dims.push(v),
                Wire::Bytes(b) => dims.extend(proto::packed_varints(b, "TensorProto.dims")?),
                _ => return Err(wrong("TensorProto.dims")),
            },
            2 => data_type = varint(w, "TensorProto.data_type")?,
            8 => name = string(w, "TensorProto.name")?.to_string(),
            9 => raw = Some(bytes(w, "TensorProto.raw_data")?),
            13 => external = true,
            14 => external |= varint(w, "TensorProto.data_location")? == 1,
            4 | 5 | 7 | 10 | 11 => typed.push((n, w)),
            _ => {}
        }
        Ok(())
    })?;
    let label = if name.is_empty() { name_hint } else { &name };
    if external {
        return Ok((name, Decoded::External));
    }
    let Some(dtype) = dtype_of(data_type) else {
        return Ok((name, Decoded::Unsupported(data_type)));
    };
    let mut shape = Vec::with_capacity(dims.len());
    for d in dims {
        shape.push(
            usize::try_from(d)
                .ok()
                .filter(|&d| d < 1 << 62)
                .ok_or_else(|| {
                    err(format!(
                        "tensor {label}: dimension {} is invalid (corrupt file)",
                        d as i64
                    ))
                })?,
        );
    }
    let size = dtype.bitsize() / 8;
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let nbytes = numel.and_then(|n| n.checked_mul(size));
    let (Some(numel), Some(nbytes)) = (numel, nbytes) else {
        return Err(err(format!(
            "tensor {label}: shape {shape:?} overflows (corrupt file)"
        )));
    };
    let short = |have: usize| {
        err(format!(
            "tensor {label}: shape {shape:?} needs {numel} values but the file holds {have} \
             (corrupt or truncated file)"
        ))
    };
    let out: Vec<u8> =
        if let Some(raw) = raw {
            if raw.len() != nbytes {
                return Err(short(raw.len() / size.max(1)));
            }
            raw.to_vec()
        } else {
            // The typed field this dtype uses, packed or not.
            let field = match dtype {
                Dtype::F32 => 4,
                Dtype::F64 => 10,
                Dtype::I64 => 7,
                Dtype::U32 | Dtype::U64 => 11,
                _ => 5,
            };
            let pieces: Vec<Wire<'_>> = typed
                .iter()
                .filter(|(n, _)| *n == field)
                .map(|(_, w)| *w)
                .collect();
            let fixed = match field {
                4 => Some(4),
                10 => Some(8),
                _ => None,
            };
            // Count the values before allocating anything for them.
            let mut count = 0usize;
            for w in &pieces {
                count += match (w, fixed) {
                    (Wire::Bytes(b), Some(k)) if b.len() % k == 0 => b.len() / k,
                    (Wire::Bytes(b), None) => proto::packed_varint_count(b, "TensorProto data")?,
                    (Wire::Fixed32(_), Some(4)) | (Wire::Fixed64(_), Some(8)) => 1,
                    (Wire::Varint(_), None) => 1,
                    _ => return Err(wrong("TensorProto data")),
                };
            }
            if count != numel {
                return Err(short(count));
            }
            let mut values: Vec<u64> = Vec::with_capacity(numel);
            for w in pieces {
                match (w, fixed) {
                    (Wire::Bytes(b), Some(4)) => values.extend(
                        b.chunks_exact(4)
                            .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
                    ),
                    (Wire::Bytes(b), Some(_)) => values.extend(b.chunks_exact(8).map(|c| {
                        u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                    })),
                    (Wire::Bytes(b), None) => {
                        values.extend(proto::packed_varints(b, "TensorProto data")?)
                    }
                    (Wire::Fixed32(v), _) => values.push(u64::from(v)),
                    (Wire::Fixed64(v) | Wire::Varint(v), _) => values.push(v),
                }
            }
            let mut out = Vec::with_capacity(nbytes);
            for v in values {
                // Each value's low `size` bytes, little-endian: int32_data holds 8/16-bit
                // integers, bool, float16 and bfloat16 bits; int64_data / uint64_data their
                // 64-bit values (a negative int32 is sign-extended to 64 bits, and its low
                // bytes are its two's complement).
                out.extend_from_slice(&v.to_le_bytes()[..size]);
            }
            out
        };
    Ok((
        name,
        Decoded::Tensor(Tensor {
            dtype,
            shape,
            bytes: out,
        }),
    ))
}

/// A node of the graph, as much as this reader needs.
#[derive(Default)]
struct Node<'a> {
    /// Its position in the graph.
    index: usize,
    name: &'a str,
    op_type: &'a str,
    domain: &'a str,
    inputs: Vec<&'a str>,
    outputs: Vec<&'a str>,
    /// Attributes by name: the raw `AttributeProto` fields.
    attrs: Vec<Attr<'a>>,
}

#[derive(Default)]
struct Attr<'a> {
    name: &'a str,
    f: Option<f32>,
    i: Option<i64>,
    t: Option<&'a [u8]>,
    floats: Vec<f32>,
    ints: Vec<i64>,
}

fn attribute(buf: &[u8]) -> Result<Attr<'_>> {
    let mut a = Attr::default();
    each(buf, "AttributeProto", |n, w| {
        match n {
            1 => a.name = string(w, "AttributeProto.name")?,
            2 => match w {
                Wire::Fixed32(v) => a.f = Some(f32::from_bits(v)),
                _ => return Err(wrong("AttributeProto.f")),
            },
            3 => a.i = Some(varint(w, "AttributeProto.i")? as i64),
            5 => a.t = Some(bytes(w, "AttributeProto.t")?),
            7 => match w {
                Wire::Fixed32(v) => a.floats.push(f32::from_bits(v)),
                Wire::Bytes(b) if b.len() % 4 == 0 => a.floats.extend(
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                ),
                _ => return Err(wrong("AttributeProto.floats")),
            },
            8 => match w {
                Wire::Varint(v) => a.ints.push(v as i64),
                Wire::Bytes(b) => a.ints.extend(
                    proto::packed_varints(b, "AttributeProto.ints")?
                        .into_iter()
                        .map(|v| v as i64),
                ),
                _ => return Err(wrong("AttributeProto.ints")),
            },
            _ => {}
        }
        Ok(())
    })?;
    Ok(a)
}

fn node(buf: &[u8]) -> Result<Node<'_>> {
    let mut nd = Node::default();
    each(buf, "NodeProto", |n, w| {
        match n {
            1 => nd.inputs.push(string(w, "NodeProto.input")?),
            2 => nd.outputs.push(string(w, "NodeProto.output")?),
            3 => nd.name = string(w, "NodeProto.name")?,
            4 => nd.op_type = string(w, "NodeProto.op_type")?,
            5 => nd.attrs.push(attribute(bytes(w, "NodeProto.attribute")?)?),
            7 => nd.domain = string(w, "NodeProto.domain")?,
            _ => {}
        }
        Ok(())
    })?;
    Ok(nd)
}

impl Node<'_> {
    fn attr(&self, name: &str) -> Option<&Attr<'_>> {
        self.attrs.iter().rev().find(|a| a.name == name)
    }
}

/// The value a `Constant` node gives its output.
fn constant(nd: &Node<'_>) -> Result<Option<Decoded>> {
    if let Some(t) = nd.attr("value").and_then(|a| a.t) {
        return Ok(Some(
            tensor(t, nd.outputs.first().copied().unwrap_or(""))?.1,
        ));
    }
    let f32s = |v: &[f32], shape: Vec<usize>| Tensor {
        dtype: Dtype::F32,
        shape,
        bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    let i64s = |v: &[i64], shape: Vec<usize>| Tensor {
        dtype: Dtype::I64,
        shape,
        bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    Ok(if let Some(f) = nd.attr("value_float").and_then(|a| a.f) {
        Some(Decoded::Tensor(f32s(&[f], vec![])))
    } else if let Some(a) = nd.attr("value_floats") {
        Some(Decoded::Tensor(f32s(&a.floats, vec![a.floats.len()])))
    } else if let Some(i) = nd.attr("value_int").and_then(|a| a.i) {
        Some(Decoded::Tensor(i64s(&[i], vec![])))
    } else {
        nd.attr("value_ints")
            .map(|a| Decoded::Tensor(i64s(&a.ints, vec![a.ints.len()])))
    })
}

/// Reads the batch-norm nodes (and the other initializers) of an ONNX model.
pub(crate) fn read(bytes: &[u8]) -> Result<Checkpoint> {
    let mut graph = None;
    let mut producer = "";
    each(bytes, "ModelProto", |n, w| {
        match n {
            2 => producer = string(w, "ModelProto.producer_name")?,
            7 => graph = Some(proto::bytes(w, "ModelProto.graph")?),
            _ => {}
        }
        Ok(())
    })?;
    let graph = graph.ok_or_else(|| {
        err("the model has no graph (an empty or partial ModelProto; export the model again)")
    })?;
    let mut nodes = Vec::new();
    let mut node_count = 0usize;
    // Values by name: initializers, then Constant outputs.
    let mut values: BTreeMap<String, Decoded> = BTreeMap::new();
    let mut graph_inputs: Vec<&str> = Vec::new();
    each(graph, "GraphProto", |n, w| {
        match n {
            1 => {
                // Only the nodes this reader uses are kept (memory follows what is read).
                let mut nd = node(proto::bytes(w, "GraphProto.node")?)?;
                nd.index = node_count;
                node_count += 1;
                if matches!(nd.op_type, "BatchNormalization" | "Constant") {
                    nodes.push(nd);
                }
            }
            5 => {
                let (name, t) = tensor(proto::bytes(w, "GraphProto.initializer")?, "")?;
                if values.insert(name.clone(), t).is_some() {
                    return Err(err(format!(
                        "two initializers are named {name:?} (an invalid model; check it \
                         with onnx.checker.check_model)"
                    )));
                }
            }
            11 => {
                let mut name = "";
                each(
                    proto::bytes(w, "GraphProto.input")?,
                    "ValueInfoProto",
                    |n, w| {
                        if n == 1 {
                            name = string(w, "ValueInfoProto.name")?;
                        }
                        Ok(())
                    },
                )?;
                graph_inputs.push(name);
            }
            _ => {}
        }
        Ok(())
    })?;

    // Constant outputs (initializers first: a name both has the initializer's value).
    for nd in &nodes {
        if nd.op_type == "Constant" && (nd.domain.is_empty() || nd.domain == "ai.onnx") {
            if let (Some(out), Some(v)) = (nd.outputs.first(), constant(nd)?) {
                values.entry(out.to_string()).or_insert(v);
            }
        }
    }

    let variance = if producer == "pytorch" {
        "unbiased"
    } else {
        "biased"
    };
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    let mut used: BTreeSet<&str> = BTreeSet::new();
    let mut next_suffix: BTreeMap<String, usize> = BTreeMap::new();
    for nd in &nodes {
        let index = nd.index;
        if nd.op_type != "BatchNormalization" || !(nd.domain.is_empty() || nd.domain == "ai.onnx") {
            continue;
        }
        let label = if nd.name.is_empty() {
            format!("#{index}")
        } else {
            format!("{:?}", nd.name)
        };
        if nd.inputs.len() < 5 {
            return Err(err(format!(
                "BatchNormalization node {label} has {} inputs, not 5 (X, scale, B, mean, var): \
                 an invalid model",
                nd.inputs.len()
            )));
        }
        if nd.attr("spatial").and_then(|a| a.i) == Some(0) {
            return Err(err(format!(
                "BatchNormalization node {label} uses spatial=0 (per-element statistics of \
                 opset < 9), which bnorm does not read; re-export with opset 9 or later"
            )));
        }
        let base = if !nd.name.is_empty() {
            nd.name.to_string()
        } else if let Some(p) = nd.inputs[1].strip_suffix(".weight") {
            p.to_string()
        } else if let Some(o) = nd.outputs.first().filter(|o| !o.is_empty()) {
            o.to_string()
        } else {
            format!("BatchNormalization_{index}")
        };
        // Two nodes of one name (ONNX asks for unique names but does not enforce it):
        // the later ones get `_1`, `_2`, ….
        let mut prefix = base.clone();
        let k = next_suffix.entry(base.clone()).or_insert(0);
        while metadata.contains_key(&format!("bnorm.layer.{prefix}.format")) {
            *k += 1;
            prefix = format!("{base}_{k}");
        }
        for (input, leaf) in
            nd.inputs[1..5]
                .iter()
                .zip(["weight", "bias", "running_mean", "running_var"])
        {
            let t = match values.get(*input) {
                Some(Decoded::Tensor(t)) => t.clone(),
                Some(Decoded::External) => {
                    return Err(err(format!(
                        "BatchNormalization node {label}: {input:?} is stored as external \
                         data (in another file); save the model with all tensors inside \
                         (onnx.save_model(model, path, save_as_external_data=False)) and read \
                         that"
                    )))
                }
                Some(Decoded::Unsupported(code)) => {
                    return Err(err(format!(
                        "BatchNormalization node {label}: {input:?} has ONNX data type {code}, \
                         which bnorm does not compute with (it reads float, double, float16, \
                         bfloat16)"
                    )))
                }
                None if input.is_empty() => {
                    return Err(err(format!(
                        "BatchNormalization node {label}: its {leaf} input is missing (an \
                         empty name; the input is required): an invalid model"
                    )))
                }
                None => {
                    let what = if graph_inputs.contains(input) {
                        "a graph input without an initializer"
                    } else {
                        "computed by the graph"
                    };
                    return Err(err(format!(
                        "BatchNormalization node {label}: its {leaf} input {input:?} is {what}, \
                         not a stored value; bnorm reads stored parameters (initializers or \
                         Constant nodes) only"
                    )));
                }
            };
            used.insert(input);
            tensors.insert(format!("{prefix}.{leaf}"), t);
        }
        let eps = match nd.attr("epsilon").and_then(|a| a.f) {
            Some(e) if e.is_finite() && e > 0.0 => e,
            None => 1e-5,
            Some(e) => {
                return Err(err(format!(
                    "BatchNormalization node {label}: epsilon {e} is not a positive number"
                )))
            }
        };
        let momentum = match nd.attr("momentum").and_then(|a| a.f) {
            Some(m) if (0.0..=1.0).contains(&m) => m,
            None => 0.9,
            Some(m) => {
                return Err(err(format!(
                    "BatchNormalization node {label}: momentum {m} is outside [0, 1]"
                )))
            }
        };
        let key = |k: &str| format!("bnorm.layer.{prefix}.{k}");
        metadata.insert(key("format"), "torch".to_string());
        metadata.insert(key("eps"), format!("{eps:e}"));
        metadata.insert(key("momentum"), format!("decay:{momentum:e}"));
        metadata.insert(key("variance"), variance.to_string());
        if let Some(mode) = nd.attr("training_mode").and_then(|a| a.i) {
            if mode != 0 {
                metadata.insert(key("onnx_training_mode"), mode.to_string());
            }
        }
    }
    for (name, v) in values {
        if let Decoded::Tensor(t) = v {
            if !used.contains(name.as_str()) && !tensors.contains_key(&name) {
                tensors.insert(name, t);
            }
        }
    }
    Ok(Checkpoint { tensors, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_wants_ir_version_then_a_model_field() {
        assert!(looks_like(b"\x08\x07\x12\x07pytorch"));
        assert!(looks_like(b"\x08\x0a\x3a\x00"));
        assert!(!looks_like(b"\x08\x07"));
        assert!(!looks_like(b"\x08\x00\x12\x00"));
        assert!(looks_like(b"\x08\x07\x12\x09pytorch"));
        assert!(!looks_like(b"\x08\x07\x10\x09"));
        assert!(!looks_like(b"\x08\x80\x01\x12\x00"));
        assert!(!looks_like(b"plain text"));
        assert!(!looks_like(b""));
    }
}
