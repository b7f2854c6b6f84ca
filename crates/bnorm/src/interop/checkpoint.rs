//! Safetensors checkpoints: a defensive reader, the batch-norm names of each framework,
//! conversion between conventions, and atomic writing.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use super::error::InteropError;
use super::Result;
use crate::config::{Config, Momentum, VarianceEstimator};
use crate::element::DType;
use crate::element::{bf16, f16};
use crate::layer::BatchNorm;
use crate::state::{Params, RenormState, RunningState};

/// Largest header this reader accepts (the safetensors crate's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// The naming convention of a checkpoint's batch-norm tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// PyTorch state_dict: `<p>.weight`, `<p>.bias`, `<p>.running_mean`, `<p>.running_var`,
    /// `<p>.num_batches_tracked`; momentum is the new weight (0.1), eps 1e-5, the running
    /// variance unbiased.
    Torch,
    /// Keras 3 / tf_keras: `<p>/gamma`, `<p>/beta`, `<p>/moving_mean`,
    /// `<p>/moving_variance` (and `renorm_mean`, `renorm_stddev`, `moving_stddev` with
    /// renorm); momentum is the decay (0.99), eps 1e-3, the variance biased.
    Keras,
    /// Flax linen: `params/<p>/scale`, `params/<p>/bias`, `batch_stats/<p>/mean`,
    /// `batch_stats/<p>/var`; momentum is the decay (0.99), eps 1e-5, the variance biased.
    Flax,
}

impl Format {
    /// Every format.
    pub const ALL: [Format; 3] = [Format::Torch, Format::Keras, Format::Flax];

    /// Parses `torch` (`pytorch`), `keras` (`tf_keras`), `flax`.
    ///
    /// ```
    /// use bnorm::interop::Format;
    /// assert_eq!(Format::parse("pytorch"), Some(Format::Torch));
    /// assert_eq!(Format::parse("onnx"), None);
    /// ```
    pub fn parse(s: &str) -> Option<Format> {
        match s.to_ascii_lowercase().as_str() {
            "torch" | "pytorch" => Some(Format::Torch),
            "keras" | "tf_keras" => Some(Format::Keras),
            "flax" => Some(Format::Flax),
            _ => None,
        }
    }

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Torch => "torch",
            Format::Keras => "keras",
            Format::Flax => "flax",
        }
    }

    /// The framework's default eps.
    pub fn default_eps(self) -> f64 {
        match self {
            Format::Torch | Format::Flax => 1e-5,
            Format::Keras => 1e-3,
        }
    }

    /// The framework's default momentum, in its convention.
    pub fn default_momentum(self) -> Momentum {
        match self {
            Format::Torch => Momentum::NewWeight(0.1),
            Format::Keras | Format::Flax => Momentum::Decay(0.99),
        }
    }

    /// Which variance the framework's running variance accumulates.
    pub fn variance_estimator(self) -> VarianceEstimator {
        match self {
            Format::Torch => VarianceEstimator::Unbiased,
            Format::Keras | Format::Flax => VarianceEstimator::Biased,
        }
    }

    /// The leaf name of each role, in this format.
    fn leaf(self, role: Role) -> Option<&'static str> {
        use Role::*;
        Some(match (self, role) {
            (Format::Torch, Weight) => "weight",
            (Format::Torch, Bias) => "bias",
            (Format::Torch, Mean) => "running_mean",
            (Format::Torch, Var) => "running_var",
            (Format::Torch, Count) => "num_batches_tracked",
            (Format::Keras, Weight) => "gamma",
            (Format::Keras, Bias) => "beta",
            (Format::Keras, Mean) => "moving_mean",
            (Format::Keras, Var) => "moving_variance",
            (Format::Keras, RenormMean) => "renorm_mean",
            (Format::Keras, RenormStddev) => "renorm_stddev",
            (Format::Keras, MovingStddev) => "moving_stddev",
            (Format::Flax, Weight) => "scale",
            (Format::Flax, Bias) => "bias",
            (Format::Flax, Mean) => "mean",
            (Format::Flax, Var) => "var",
            _ => return None,
        })
    }

    /// The Flax collection of a role.
    fn collection(self, role: Role) -> Option<&'static str> {
        match (self, role) {
            (Format::Flax, Role::Weight | Role::Bias) => Some("params"),
            (Format::Flax, _) => Some("batch_stats"),
            _ => None,
        }
    }

    /// The full tensor name this crate writes for a role.
    fn tensor_name(self, prefix: &str, role: Role) -> Option<String> {
        let leaf = self.leaf(role)?;
        Some(match self {
            Format::Torch => format!("{prefix}.{leaf}"),
            Format::Keras => format!("{prefix}/{leaf}"),
            Format::Flax => format!("{}/{prefix}/{leaf}", self.collection(role)?),
        })
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Weight,
    Bias,
    Mean,
    Var,
    Count,
    RenormMean,
    RenormStddev,
    MovingStddev,
}

const ROLES: [Role; 8] = [
    Role::Weight,
    Role::Bias,
    Role::Mean,
    Role::Var,
    Role::Count,
    Role::RenormMean,
    Role::RenormStddev,
    Role::MovingStddev,
];

/// Splits a tensor name into (collection, prefix, leaf): the leaf follows the last `.` or
/// `/`, a TensorFlow `:0` suffix is dropped, and a leading Flax collection (`params`,
/// `batch_stats`) is taken off the prefix.
fn split_name(name: &str) -> Option<(Option<&str>, &str, &str)> {
    let name = name.strip_suffix(":0").unwrap_or(name);
    let idx = name.rfind(['.', '/'])?;
    let (prefix, leaf) = (&name[..idx], &name[idx + 1..]);
    for coll in ["params", "batch_stats"] {
        if let Some(rest) = prefix.strip_prefix(coll) {
            if let Some(rest) = rest.strip_prefix(['.', '/']) {
                return Some((Some(coll), rest, leaf));
            }
        }
    }
    Some((None, prefix, leaf))
}

/// One tensor as stored: its dtype, shape and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The safetensors dtype.
    pub dtype: Dtype,
    /// The shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// The raw little-endian bytes, row-major.
    pub bytes: Vec<u8>,
}

impl Tensor {
    /// A floating-point tensor holding `values` rounded once to `dtype`.
    ///
    /// ```
    /// use bnorm::interop::Tensor;
    /// let t = Tensor::from_f64(&[1.0, 0.1], vec![2], bnorm::element::DType::F16);
    /// assert_eq!(t.bytes.len(), 4);
    /// assert_eq!(t.to_f64("t")?[1], bnorm::element::f16::from_f64(0.1).to_f64());
    /// # Ok::<(), bnorm::interop::InteropError>(())
    /// ```
    pub fn from_f64(values: &[f64], shape: Vec<usize>, dtype: DType) -> Tensor {
        let mut bytes = Vec::with_capacity(values.len() * dtype.size());
        for &v in values {
            match dtype {
                DType::F32 => bytes.extend((v as f32).to_le_bytes()),
                DType::F64 => bytes.extend(v.to_le_bytes()),
                DType::F16 => bytes.extend(f16::from_f64(v).to_le_bytes()),
                DType::BF16 => bytes.extend(bf16::from_f64(v).to_le_bytes()),
            }
        }
        Tensor {
            dtype: st_dtype(dtype),
            shape,
            bytes,
        }
    }

    /// A 0-dimensional I64 tensor (PyTorch's `num_batches_tracked`).
    pub fn scalar_i64(v: i64) -> Tensor {
        Tensor {
            dtype: Dtype::I64,
            shape: vec![],
            bytes: v.to_le_bytes().to_vec(),
        }
    }

    /// The floating-point storage type, if the tensor has one this crate computes with.
    pub fn float_dtype(&self) -> Option<DType> {
        match self.dtype {
            Dtype::F32 => Some(DType::F32),
            Dtype::F64 => Some(DType::F64),
            Dtype::F16 => Some(DType::F16),
            Dtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    /// The values widened to f64 (exact); `name` is used in the error of a non-float dtype.
    pub fn to_f64(&self, name: &str) -> Result<Vec<f64>> {
        let b = &self.bytes;
        let dtype = self
            .float_dtype()
            .ok_or_else(|| InteropError::UnsupportedDtype {
                tensor: name.to_string(),
                dtype: format!("{:?}", self.dtype),
                expected: "F32, F64, F16 or BF16",
            })?;
        Ok(match dtype {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            DType::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
        })
    }

    /// The single integer of a one-element I64 or I32 tensor.
    fn to_count(&self, name: &str) -> Result<i64> {
        if self.shape.iter().product::<usize>() != 1 {
            return Err(InteropError::BadShape {
                tensor: name.to_string(),
                shape: self.shape.clone(),
                expected: "a single value".into(),
            });
        }
        match (self.dtype, self.bytes.as_slice()) {
            (Dtype::I64, &[a, b, c, d, e, f, g, h]) => {
                Ok(i64::from_le_bytes([a, b, c, d, e, f, g, h]))
            }
            (Dtype::I32, &[a, b, c, d]) => Ok(i32::from_le_bytes([a, b, c, d]) as i64),
            _ => Err(InteropError::UnsupportedDtype {
                tensor: name.to_string(),
                dtype: format!("{:?}", self.dtype),
                expected: "I64 (or I32)",
            }),
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
    }
}

impl safetensors::View for &Tensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// A whole safetensors file: every tensor (batch norm or not, kept byte for byte) and the
/// header's metadata.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Checkpoint {
    /// Tensors by name.
    pub tensors: BTreeMap<String, Tensor>,
    /// The `__metadata__` strings of the header.
    pub metadata: BTreeMap<String, String>,
}

fn malformed(reason: impl Into<String>) -> InteropError {
    InteropError::Malformed {
        reason: reason.into(),
    }
}

impl Checkpoint {
    /// Parses a safetensors file, refusing anything corrupt, truncated or hostile: the
    /// header length must fit the file, every shape product and byte count is computed with
    /// overflow checks and must match the tensor's data range exactly, ranges must lie in
    /// the file and tile the data, and the dtype must be a known one.
    ///
    /// ```
    /// use bnorm::interop::{Checkpoint, InteropError};
    /// assert!(matches!(Checkpoint::from_bytes(b"\x10\0\0"), Err(InteropError::Malformed { .. })));
    /// let huge = b"\xff\xff\xff\xff\xff\xff\xff\x7f{}";
    /// assert!(Checkpoint::from_bytes(huge).is_err());
    /// ```
    pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint> {
        let Some((len_bytes, rest)) = bytes.split_first_chunk::<8>() else {
            return Err(malformed(format!(
                "the file has {} bytes, fewer than the 8-byte header length",
                bytes.len()
            )));
        };
        let n = u64::from_le_bytes(*len_bytes);
        if n > rest.len() as u64 || n > MAX_HEADER {
            return Err(malformed(format!(
                "the header claims {n} bytes but {} follow (limit {MAX_HEADER})",
                rest.len()
            )));
        }
        let (n_read, meta) =
            SafeTensors::read_metadata(bytes).map_err(|e| malformed(e.to_string()))?;
        let data = rest
            .get(n_read..)
            .ok_or_else(|| malformed("header overruns the file"))?;
        let mut tensors = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let numel = info
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| malformed(format!("shape of {name} overflows: {:?}", info.shape)))?;
            let bits = numel
                .checked_mul(info.dtype.bitsize())
                .ok_or_else(|| malformed(format!("byte size of {name} overflows")))?;
            if bits % 8 != 0 {
                return Err(malformed(format!("{name} does not fill whole bytes")));
            }
            let (s, e) = info.data_offsets;
            if e < s || e - s != bits / 8 {
                return Err(malformed(format!(
                    "{name}: data range {s}..{e} does not hold {numel} {:?} values",
                    info.dtype
                )));
            }
            let slice = data
                .get(s..e)
                .ok_or_else(|| malformed(format!("{name}: data range {s}..{e} is past the end")))?;
            tensors.insert(
                name,
                Tensor {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    bytes: slice.to_vec(),
                },
            );
        }
        let metadata = meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        Ok(Checkpoint { tensors, metadata })
    }

    /// Reads and parses a file (see [`Checkpoint::from_bytes`]).
    pub fn read(path: &Path) -> Result<Checkpoint> {
        let bytes = std::fs::read(path).map_err(|source| InteropError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Checkpoint::from_bytes(&bytes)
    }

    /// Serializes to safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let meta: HashMap<String, String> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let meta = (!meta.is_empty()).then_some(meta);
        safetensors::serialize(self.tensors.iter(), meta).map_err(|e| InteropError::Serialize {
            reason: e.to_string(),
        })
    }

    /// Writes the checkpoint atomically (see [`write_atomic`]).
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_bytes()?)
    }

    /// The actual tensor names of each role of a layer, whatever separators were used.
    fn locate(&self, prefix: &str, format: Format) -> BTreeMap<Role, String> {
        let mut found = BTreeMap::new();
        for name in self.tensors.keys() {
            let Some((coll, p, leaf)) = split_name(name) else {
                continue;
            };
            if p != prefix {
                continue;
            }
            for role in ROLES {
                if format.leaf(role) == Some(leaf) && coll == format.collection(role) {
                    found.entry(role).or_insert_with(|| name.clone());
                }
            }
        }
        found
    }

    /// Every batch-norm layer, found by names: a prefix with running statistics
    /// (`running_mean`/`running_var`/`num_batches_tracked`, `moving_mean`/`moving_variance`,
    /// or Flax `batch_stats` `mean`/`var`), or one that this crate marked when writing it
    /// (a PyTorch layer without running statistics is otherwise indistinguishable from a
    /// LayerNorm; load it with [`Checkpoint::layer`]). Sorted by name.
    pub fn layers(&self) -> Result<Vec<Layer>> {
        let mut found: BTreeSet<(String, Format)> = BTreeSet::new();
        for name in self.tensors.keys() {
            let Some((coll, p, leaf)) = split_name(name) else {
                continue;
            };
            let format = match (coll, leaf) {
                (None, "running_mean" | "running_var" | "num_batches_tracked") => Format::Torch,
                (None, "moving_mean" | "moving_variance") => Format::Keras,
                (Some("batch_stats"), "mean" | "var") => Format::Flax,
                _ => continue,
            };
            found.insert((p.to_string(), format));
        }
        for (k, v) in &self.metadata {
            if let (Some(p), Some(f)) = (
                k.strip_prefix("bnorm.layer.")
                    .and_then(|r| r.strip_suffix(".format")),
                Format::parse(v),
            ) {
                found.insert((p.to_string(), f));
            }
        }
        found.into_iter().map(|(p, f)| self.layer(&p, f)).collect()
    }

    /// The batch-norm layer `prefix` in `format`, its conventions taken from this crate's
    /// metadata when present and otherwise the format's defaults.
    pub fn layer(&self, prefix: &str, format: Format) -> Result<Layer> {
        let names = self.locate(prefix, format);
        if names.is_empty() {
            return Err(InteropError::NoSuchLayer {
                name: prefix.to_string(),
            });
        }
        let mut floats: BTreeMap<Role, Vec<f64>> = BTreeMap::new();
        let mut dtype = None;
        let mut channels: Option<(usize, &str)> = None;
        for (&role, name) in &names {
            if role == Role::Count {
                continue;
            }
            let t = &self.tensors[name];
            let values = t.to_f64(name)?;
            if t.shape.len() != 1 {
                return Err(InteropError::BadShape {
                    tensor: name.clone(),
                    shape: t.shape.clone(),
                    expected: "one dimension (channels)".into(),
                });
            }
            match channels {
                None => channels = Some((values.len(), name)),
                Some((c, first)) if c != values.len() => {
                    return Err(InteropError::BadShape {
                        tensor: name.clone(),
                        shape: t.shape.clone(),
                        expected: format!("[{c}] like {first}"),
                    })
                }
                _ => {}
            }
            if matches!(role, Role::Mean | Role::Var) || dtype.is_none() {
                dtype = t.float_dtype();
            }
            floats.insert(role, values);
        }
        let count = match names.get(&Role::Count) {
            Some(name) => {
                let v = self.tensors[name].to_count(name)?;
                Some(u64::try_from(v).map_err(|_| InteropError::InvalidLayer {
                    layer: prefix.to_string(),
                    reason: format!("{name} is negative ({v})"),
                })?)
            }
            None => None,
        };
        let (mean, var) = (floats.remove(&Role::Mean), floats.remove(&Role::Var));
        let missing = |role: Role| InteropError::MissingTensor {
            tensor: format.tensor_name(prefix, role).unwrap_or_default(),
        };
        match (&mean, &var) {
            (Some(_), None) => return Err(missing(Role::Var)),
            (None, Some(_)) => return Err(missing(Role::Mean)),
            _ => {}
        }
        let renorm = match (
            floats.remove(&Role::RenormMean),
            floats.remove(&Role::RenormStddev),
            floats.remove(&Role::MovingStddev),
        ) {
            (Some(mean), Some(stddev), Some(moving_stddev)) => Some(RenormState {
                mean,
                stddev,
                moving_stddev,
            }),
            _ => None,
        };
        let meta = |key: &str| self.metadata.get(&format!("bnorm.layer.{prefix}.{key}"));
        let bad_meta = |key: &str, v: &String| InteropError::InvalidLayer {
            layer: prefix.to_string(),
            reason: format!("metadata bnorm.layer.{prefix}.{key} = {v:?} is not understood"),
        };
        let eps = match meta("eps") {
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|e| e.is_finite() && *e > 0.0)
                .ok_or_else(|| bad_meta("eps", v))?,
            None => format.default_eps(),
        };
        let momentum = match meta("momentum") {
            Some(v) => parse_momentum(v).ok_or_else(|| bad_meta("momentum", v))?,
            None => format.default_momentum(),
        };
        let variance = match meta("variance").map(String::as_str) {
            Some("biased") => VarianceEstimator::Biased,
            Some("unbiased") => VarianceEstimator::Unbiased,
            Some(_) => {
                return Err(bad_meta(
                    "variance",
                    meta("variance").unwrap_or(&String::new()),
                ))
            }
            None => format.variance_estimator(),
        };
        Ok(Layer {
            name: prefix.to_string(),
            format,
            channels: channels.map_or(0, |c| c.0),
            dtype: dtype.unwrap_or(DType::F32),
            weight: floats.remove(&Role::Weight),
            bias: floats.remove(&Role::Bias),
            running_mean: mean,
            running_var: var,
            num_batches_tracked: count,
            renorm,
            eps,
            momentum,
            variance,
            conventions_recorded: meta("eps").is_some() || meta("momentum").is_some(),
        })
    }

    /// Removes every tensor and metadata entry of a layer; returns the names removed.
    pub fn remove_layer(&mut self, prefix: &str, format: Format) -> Vec<String> {
        let names: Vec<String> = self.locate(prefix, format).into_values().collect();
        for n in &names {
            self.tensors.remove(n);
        }
        let key = format!("bnorm.layer.{prefix}.");
        self.metadata.retain(|k, _| !k.starts_with(&key));
        names
    }

    /// Writes a layer under its format's names, floats rounded once to `dtype`, with its
    /// conventions (eps, momentum, variance estimator) recorded in the metadata. A PyTorch
    /// layer with running statistics gets `num_batches_tracked` (0 when unknown).
    pub fn insert_layer(&mut self, layer: &Layer, dtype: DType) -> Result<()> {
        layer.check_lengths()?;
        let f = layer.format;
        let c = layer.channels;
        let mut put = |role: Role, values: Option<&Vec<f64>>| {
            if let (Some(v), Some(name)) = (values, f.tensor_name(&layer.name, role)) {
                self.tensors
                    .insert(name, Tensor::from_f64(v, vec![c], dtype));
            }
        };
        put(Role::Weight, layer.weight.as_ref());
        put(Role::Bias, layer.bias.as_ref());
        put(Role::Mean, layer.running_mean.as_ref());
        put(Role::Var, layer.running_var.as_ref());
        if let Some(r) = &layer.renorm {
            put(Role::RenormMean, Some(&r.mean));
            put(Role::RenormStddev, Some(&r.stddev));
            put(Role::MovingStddev, Some(&r.moving_stddev));
        }
        if f == Format::Torch && layer.running_mean.is_some() {
            let n = i64::try_from(layer.num_batches_tracked.unwrap_or(0)).map_err(|_| {
                InteropError::Inexpressible {
                    layer: layer.name.clone(),
                    what: "num_batches_tracked above i64::MAX".into(),
                }
            })?;
            if let Some(name) = f.tensor_name(&layer.name, Role::Count) {
                self.tensors.insert(name, Tensor::scalar_i64(n));
            }
        }
        let key = |k: &str| format!("bnorm.layer.{}.{k}", layer.name);
        self.metadata.insert(key("format"), f.name().into());
        self.metadata.insert(key("eps"), format!("{:e}", layer.eps));
        self.metadata
            .insert(key("momentum"), momentum_string(layer.momentum));
        let var = match layer.variance {
            VarianceEstimator::Biased => "biased",
            VarianceEstimator::Unbiased => "unbiased",
        };
        self.metadata.insert(key("variance"), var.into());
        Ok(())
    }
}

fn momentum_string(m: Momentum) -> String {
    match m {
        Momentum::NewWeight(a) => format!("new_weight:{a:e}"),
        Momentum::Cumulative => "cumulative".into(),
        Momentum::Decay(d) => format!("decay:{d:e}"),
        Momentum::DebiasedDecay(d) => format!("debiased_decay:{d:e}"),
    }
}

fn parse_momentum(s: &str) -> Option<Momentum> {
    if s == "cumulative" {
        return Some(Momentum::Cumulative);
    }
    let (kind, v) = s.split_once(':')?;
    let v: f64 = v.parse().ok().filter(|v: &f64| (0.0..=1.0).contains(v))?;
    match kind {
        "new_weight" => Some(Momentum::NewWeight(v)),
        "decay" => Some(Momentum::Decay(v)),
        "debiased_decay" => Some(Momentum::DebiasedDecay(v)),
        _ => None,
    }
}

/// Parses a checkpoint and returns its batch-norm layers (see [`Checkpoint::layers`]).
///
/// ```
/// assert!(bnorm::interop::read_layers(b"not safetensors").is_err());
/// ```
pub fn read_layers(bytes: &[u8]) -> Result<Vec<Layer>> {
    Checkpoint::from_bytes(bytes)?.layers()
}

/// One batch-norm layer as found in a checkpoint, values widened to f64, with the
/// conventions it is read under. Values are not validated (a broken layer can still be
/// inspected); [`Layer::to_batchnorm`] validates.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// The prefix of its tensor names (`features.1`, `batch_normalization`, `BatchNorm_0`).
    pub name: String,
    /// The naming convention it was found in or will be written in.
    pub format: Format,
    /// Number of channels.
    pub channels: usize,
    /// Storage type of its floating-point tensors.
    pub dtype: DType,
    /// gamma (`weight`, `gamma`, `scale`), when the layer scales.
    pub weight: Option<Vec<f64>>,
    /// beta (`bias`, `beta`, `bias`), when the layer centers.
    pub bias: Option<Vec<f64>>,
    /// Running mean, when tracked.
    pub running_mean: Option<Vec<f64>>,
    /// Running variance, when tracked (estimator: [`Layer::variance`]).
    pub running_var: Option<Vec<f64>>,
    /// PyTorch's `num_batches_tracked`, when stored.
    pub num_batches_tracked: Option<u64>,
    /// tf_keras batch-renormalization statistics, when stored.
    pub renorm: Option<RenormState>,
    /// eps (recorded by this crate, or the format's default).
    pub eps: f64,
    /// Momentum in its convention (recorded, or the format's default).
    pub momentum: Momentum,
    /// Which variance `running_var` holds.
    pub variance: VarianceEstimator,
    /// Whether eps and momentum were read from this crate's metadata rather than assumed
    /// from the format's defaults.
    pub conventions_recorded: bool,
}

/// Options of [`Layer::convert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConvertOptions {
    /// Values per channel in a training batch (N for (N, C) input, N·H·W for images):
    /// needed to change the running variance's estimator.
    pub batch_size: Option<usize>,
    /// Keep the running-variance values as they are when the estimators differ: inference
    /// outputs stay identical, further training mixes two estimators.
    pub keep_variance: bool,
}

/// Something a conversion did that the user should know about.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    /// The layer.
    pub layer: String,
    /// Whether the conversion of this aspect is exact.
    pub exact: bool,
    /// What was done and what to do about it.
    pub message: String,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = if self.exact { "note" } else { "inexact" };
        write!(f, "{tag}: {}: {}", self.layer, self.message)
    }
}

impl Layer {
    /// A fresh layer in a format's conventions: gamma 1, beta 0, running mean 0, variance 1,
    /// f32 storage, `num_batches_tracked` 0 for PyTorch.
    ///
    /// ```
    /// let l = bnorm::interop::Layer::new("bn", bnorm::interop::Format::Keras, 3);
    /// assert_eq!(l.eps, 1e-3);
    /// assert_eq!(l.num_batches_tracked, None);
    /// ```
    pub fn new(name: &str, format: Format, channels: usize) -> Layer {
        Layer {
            name: name.to_string(),
            format,
            channels,
            dtype: DType::F32,
            weight: Some(vec![1.0; channels]),
            bias: Some(vec![0.0; channels]),
            running_mean: Some(vec![0.0; channels]),
            running_var: Some(vec![1.0; channels]),
            num_batches_tracked: (format == Format::Torch).then_some(0),
            renorm: None,
            eps: format.default_eps(),
            momentum: format.default_momentum(),
            variance: format.variance_estimator(),
            conventions_recorded: false,
        }
    }

    fn check_lengths(&self) -> Result<()> {
        let c = self.channels;
        let mut all: Vec<(&str, &Vec<f64>)> = Vec::new();
        let opts = [
            ("weight", &self.weight),
            ("bias", &self.bias),
            ("running_mean", &self.running_mean),
            ("running_var", &self.running_var),
        ];
        for (n, v) in opts {
            if let Some(v) = v {
                all.push((n, v));
            }
        }
        if let Some(r) = &self.renorm {
            all.extend([
                ("renorm_mean", &r.mean),
                ("renorm_stddev", &r.stddev),
                ("moving_stddev", &r.moving_stddev),
            ]);
        }
        match all.iter().find(|(_, v)| v.len() != c) {
            Some((n, v)) => Err(InteropError::BadShape {
                tensor: format!("{}.{n}", self.name),
                shape: vec![v.len()],
                expected: format!("[{c}]"),
            }),
            None => Ok(()),
        }
    }

    /// gamma and beta as [`Params`].
    pub fn params(&self) -> Params {
        Params {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
        }
    }

    /// The layer configuration: the layer's eps, momentum and estimator; affine parts and
    /// running statistics as present.
    pub fn config(&self) -> Config {
        Config::torch(self.channels)
            .eps(self.eps)
            .momentum(self.momentum)
            .running_variance(self.variance)
            .scale(self.weight.is_some())
            .center(self.bias.is_some())
            .track_running_stats(self.running_mean.is_some())
    }

    /// A [`BatchNorm`] layer holding these values (validated: lengths, finiteness,
    /// non-negative variances).
    ///
    /// ```
    /// use bnorm::{Layout, Mode};
    /// let mut l = bnorm::interop::Layer::new("bn", bnorm::interop::Format::Torch, 1);
    /// l.running_mean = Some(vec![2.0]);
    /// l.running_var = Some(vec![4.0]);
    /// let mut bn = l.to_batchnorm()?;
    /// let (y, _) = bn.forward(&[4.0f64], &[1, 1], Layout::NC, Mode::Inference)?;
    /// assert!((y[0] - 2.0 / (4.0f64 + 1e-5).sqrt()).abs() < 1e-12);
    /// # Ok::<(), bnorm::interop::InteropError>(())
    /// ```
    pub fn to_batchnorm(&self) -> Result<BatchNorm> {
        self.check_lengths()?;
        let cfg = self.config();
        let mut bn = cfg.clone().build()?;
        bn.set_params(self.params())?;
        if let (Some(m), Some(v)) = (&self.running_mean, &self.running_var) {
            let state = RunningState::from_values(
                &cfg,
                m.clone(),
                v.clone(),
                self.num_batches_tracked.unwrap_or(0),
            )?;
            bn.set_running_state(state)?;
        }
        Ok(bn)
    }

    /// A layer holding the statistics of a trained [`BatchNorm`], in `format`'s names.
    pub fn from_batchnorm(name: &str, format: Format, bn: &BatchNorm) -> Layer {
        let cfg = bn.config();
        let running = bn.running_state();
        Layer {
            name: name.to_string(),
            format,
            channels: cfg.get_channels(),
            dtype: DType::F32,
            weight: bn.params().weight.clone(),
            bias: bn.params().bias.clone(),
            running_mean: running.map(|r| r.mean.clone()),
            running_var: running.map(|r| r.var.clone()),
            num_batches_tracked: running.map(|r| r.updates),
            renorm: running.and_then(|r| r.renorm.clone()),
            eps: cfg.get_eps(),
            momentum: cfg.get_momentum(),
            variance: cfg.get_running_variance(),
            conventions_recorded: true,
        }
    }

    /// Converts the layer to another framework's convention. Momentum is translated
    /// (new weight `a` ↔ decay `1 − a`); eps is kept as a value (a [`Note`] says when it
    /// differs from the target's default, so the target layer must be built with it); the
    /// running variance is rescaled between the biased and unbiased estimators with the
    /// batch size, or kept with [`ConvertOptions::keep_variance`], and otherwise refused
    /// with [`InteropError::NeedBatchSize`]. What cannot be carried exactly (a cumulative
    /// average, renorm statistics, an unknown `num_batches_tracked`) is reported as an
    /// inexact note.
    pub fn convert(&self, to: Format, opts: &ConvertOptions) -> Result<(Layer, Vec<Note>)> {
        let mut out = self.clone();
        let mut notes = Vec::new();
        let mut note = |exact: bool, message: String| {
            notes.push(Note {
                layer: self.name.clone(),
                exact,
                message,
            })
        };
        out.format = to;
        out.conventions_recorded = true;
        let t = self.num_batches_tracked.unwrap_or(0);
        // 1 − x, with the rounding noise of the subtraction removed (1 − 0.9 is 0.1, not
        // 0.09999999999999998), so a converted default reads as the default.
        let flip = |x: f64| {
            let y = 1.0 - x;
            format!("{y:.12e}").parse::<f64>().unwrap_or(y)
        };
        out.momentum = match (self.momentum, to) {
            (Momentum::NewWeight(a), Format::Torch) => Momentum::NewWeight(a),
            (Momentum::NewWeight(a), _) => Momentum::Decay(flip(a)),
            (Momentum::Decay(d), Format::Torch) => Momentum::NewWeight(flip(d)),
            (Momentum::Decay(d), _) => Momentum::Decay(d),
            (Momentum::Cumulative, Format::Torch) => Momentum::Cumulative,
            (Momentum::Cumulative, _) => {
                let d = 1.0 - 1.0 / (t as f64 + 1.0);
                note(
                    false,
                    format!(
                        "momentum=None (cumulative average) has no fixed decay in {to}; \
                         decay {d} (that of the next step after {t}) is used"
                    ),
                );
                Momentum::Decay(d)
            }
            (Momentum::DebiasedDecay(d), _) => {
                note(
                    d.powi(t.min(i32::MAX as u64) as i32) < 1e-12,
                    format!(
                        "zero-debiased moving averages become plain ones in {to}: the \
                         published values are kept; the next batch weighs {} instead of \
                         (1 - d)/(1 - d^t) (the same once d^t is negligible; t = {t})",
                        1.0 - d
                    ),
                );
                if to == Format::Torch {
                    Momentum::NewWeight(flip(d))
                } else {
                    Momentum::Decay(d)
                }
            }
        };
        if out.momentum != to.default_momentum() {
            note(
                true,
                format!(
                    "momentum is {:?}, not {to}'s default {:?}: set it when building the layer",
                    out.momentum,
                    to.default_momentum()
                ),
            );
        }
        if self.eps != to.default_eps() {
            note(
                true,
                format!(
                    "eps {:e} kept; {to}'s default is {:e}: build the layer with eps={:e}",
                    self.eps,
                    to.default_eps(),
                    self.eps
                ),
            );
        }
        let target = to.variance_estimator();
        if let (Some(var), true) = (&self.running_var, target != self.variance) {
            let name = |e: VarianceEstimator| match e {
                VarianceEstimator::Biased => "biased",
                VarianceEstimator::Unbiased => "unbiased",
            };
            if opts.keep_variance {
                note(
                    false,
                    format!(
                        "running variance kept as {} values in a {} convention: inference \
                         outputs are identical, further training mixes the two estimators",
                        name(self.variance),
                        name(target)
                    ),
                );
            } else {
                let m = opts.batch_size.ok_or_else(|| InteropError::NeedBatchSize {
                    layer: self.name.clone(),
                    from: name(self.variance),
                    to: name(target),
                })?;
                if m < 2 {
                    return Err(InteropError::Inexpressible {
                        layer: self.name.clone(),
                        what: format!(
                            "an unbiased variance with {m} value(s) per channel (needs at least 2)"
                        ),
                    });
                }
                let m = m as f64;
                let factor = match target {
                    VarianceEstimator::Unbiased => m / (m - 1.0),
                    VarianceEstimator::Biased => (m - 1.0) / m,
                };
                out.running_var = Some(var.iter().map(|v| v * factor).collect());
                note(
                    true,
                    format!(
                        "running variance rescaled by {factor} from {} to {} (exact when every \
                         training batch had {m} values per channel); inference outputs change \
                         accordingly",
                        name(self.variance),
                        name(target)
                    ),
                );
            }
            out.variance = if opts.keep_variance {
                self.variance
            } else {
                target
            };
        }
        if self.renorm.is_some() && to != Format::Keras {
            out.renorm = None;
            note(
                false,
                format!("batch-renormalization statistics have no place in {to}; dropped (inference does not use them)"),
            );
        }
        match to {
            Format::Torch if self.running_mean.is_some() && self.num_batches_tracked.is_none() => {
                out.num_batches_tracked = Some(0);
                note(
                    true,
                    "num_batches_tracked is unknown and written as 0 (it matters only with \
                     momentum=None)"
                        .into(),
                );
            }
            Format::Torch => {}
            _ => out.num_batches_tracked = None,
        }
        Ok((out, notes))
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory is written,
/// flushed to disk and renamed over `path`, so readers see the old file or the new one,
/// never a partial one. The temporary file is removed on failure.
///
/// ```
/// let dir = std::env::temp_dir().join(format!("bnorm-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("x.bin");
/// bnorm::interop::write_atomic(&path, b"hello")?;
/// assert_eq!(std::fs::read(&path).unwrap(), b"hello");
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), bnorm::interop::InteropError>(())
/// ```
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |p: &Path, source| InteropError::Io {
        path: p.to_path_buf(),
        source,
    };
    let file_name = path.file_name().ok_or_else(|| {
        io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"),
        )
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.{}-{n}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names() {
        assert_eq!(
            split_name("a.b.running_var"),
            Some((None, "a.b", "running_var"))
        );
        assert_eq!(split_name("bn/gamma:0"), Some((None, "bn", "gamma")));
        assert_eq!(
            split_name("batch_stats.BatchNorm_0.mean"),
            Some((Some("batch_stats"), "BatchNorm_0", "mean"))
        );
        assert_eq!(split_name("plain"), None);
    }

    #[test]
    fn momentum_strings_round_trip() {
        for m in [
            Momentum::NewWeight(0.1),
            Momentum::Cumulative,
            Momentum::Decay(0.99),
            Momentum::DebiasedDecay(0.999),
        ] {
            assert_eq!(parse_momentum(&momentum_string(m)), Some(m));
        }
        assert_eq!(parse_momentum("decay:2"), None);
    }
}
