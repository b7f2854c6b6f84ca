//! Safetensors checkpoints: a defensive reader and writer of the file, the batch-norm
//! layers found in it by their names, and atomic writing.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use super::error::InteropError;
use super::format::{split_leaf, split_name, Format, Role, ROLES};
use super::layer::{Layer, Provenance, Source};
use super::Result;
use bnorm::element::DType;
use bnorm::element::{bf16, f16};
use bnorm::expert::RenormState;
use bnorm::{Momentum, VarianceEstimator};

/// Largest header this reader accepts (the safetensors crate's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

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
    /// use bnorm_interop::Tensor;
    /// let t = Tensor::from_f64(&[1.0, 0.1], vec![2], bnorm::element::DType::F16);
    /// assert_eq!(t.bytes.len(), 4);
    /// assert_eq!(t.to_f64("t")?[1], bnorm::element::f16::from_f64(0.1).to_f64());
    /// # Ok::<(), bnorm_interop::InteropError>(())
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

/// A tensor of a parsed header: name, dtype, shape and byte range within the data.
type Entry = (String, Dtype, Vec<usize>, (usize, usize));

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
    /// use bnorm_interop::{Checkpoint, InteropError};
    /// assert!(matches!(Checkpoint::from_bytes(b"\x10\0\0"), Err(InteropError::Malformed { .. })));
    /// let huge = b"\xff\xff\xff\xff\xff\xff\xff\x7f{}";
    /// assert!(Checkpoint::from_bytes(huge).is_err());
    /// ```
    pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint> {
        let (data_start, entries, metadata) = Self::parse_header(bytes)?;
        let tensors = entries
            .into_iter()
            .map(|(name, dtype, shape, (s, e))| {
                // Checked by parse_header to lie in the file.
                let bytes = bytes[data_start + s..data_start + e].to_vec();
                (
                    name,
                    Tensor {
                        dtype,
                        shape,
                        bytes,
                    },
                )
            })
            .collect();
        Ok(Checkpoint { tensors, metadata })
    }

    /// [`Checkpoint::from_bytes`] on a file's bytes it owns: each tensor's bytes are moved
    /// out from the end of the buffer, which shrinks as it goes, so the file is not held
    /// twice in memory.
    ///
    /// ```
    /// let mut ckpt = bnorm_interop::Checkpoint::default();
    /// ckpt.insert_layer(&bnorm_interop::Layer::new("bn", bnorm_interop::Format::Torch, 2),
    ///                   bnorm::element::DType::F32)?;
    /// let bytes = ckpt.to_bytes()?;
    /// assert_eq!(bnorm_interop::Checkpoint::from_vec(bytes)?, ckpt);
    /// # Ok::<(), bnorm_interop::InteropError>(())
    /// ```
    pub fn from_vec(mut bytes: Vec<u8>) -> Result<Checkpoint> {
        let (data_start, mut entries, metadata) = Self::parse_header(&bytes)?;
        // Last tensor first: its bytes are copied out, then the buffer is cut before them.
        entries.sort_by_key(|e| std::cmp::Reverse(e.3));
        let mut tensors = BTreeMap::new();
        for (name, dtype, shape, (s, e)) in entries {
            // The ranges tile the data (checked), so each lies before the cut.
            let tensor_bytes = bytes
                .get(data_start + s..data_start + e)
                .ok_or_else(|| malformed(format!("{name}: data range {s}..{e} overlaps another")))?
                .to_vec();
            if data_start + s < bytes.len() {
                bytes.truncate(data_start + s);
                // Give the cut-off part back as it goes (a large buffer shrinks in place).
                if bytes.capacity() - bytes.len() >= 1 << 20 {
                    bytes.shrink_to_fit();
                }
            }
            tensors.insert(
                name,
                Tensor {
                    dtype,
                    shape,
                    bytes: tensor_bytes,
                },
            );
        }
        Ok(Checkpoint { tensors, metadata })
    }

    /// The header of a safetensors file, checked: where the data starts, each tensor's
    /// name, dtype, shape and byte range within the data, and the metadata.
    fn parse_header(bytes: &[u8]) -> Result<(usize, Vec<Entry>, BTreeMap<String, String>)> {
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
        let mut entries = Vec::new();
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
            if data.get(s..e).is_none() {
                return Err(malformed(format!(
                    "{name}: data range {s}..{e} is past the end"
                )));
            }
            entries.push((name, info.dtype, info.shape.clone(), (s, e)));
        }
        let metadata = meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        Ok((8 + n_read, entries, metadata))
    }

    /// Reads and parses a file (see [`Checkpoint::from_vec`]).
    pub fn read(path: &Path) -> Result<Checkpoint> {
        let bytes = std::fs::read(path).map_err(|source| InteropError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Checkpoint::from_vec(bytes)
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
        NameIndex::new(self, Some(prefix)).locate(prefix, format)
    }

    /// Every batch-norm layer, found by names: a prefix with running statistics
    /// (`running_mean`/`running_var`/`num_batches_tracked`, `moving_mean`/`moving_variance`,
    /// or Flax `batch_stats` `mean`/`var`), or one that this crate marked when writing it
    /// (a PyTorch layer without running statistics is otherwise indistinguishable from a
    /// LayerNorm; load it with [`Checkpoint::layer`]). Sorted by name. A lone module's
    /// state dict (`running_mean`, `weight`, ... without a prefix) is the layer named `""`.
    ///
    /// ```
    /// use bnorm_interop::{Checkpoint, Tensor};
    /// let mut ckpt = Checkpoint::default();
    /// for n in ["running_mean", "params.bn.running_mean"] {
    ///     let t = Tensor::from_f64(&[0.5], vec![1], bnorm::element::DType::F32);
    ///     ckpt.tensors.insert(n.into(), t.clone());
    ///     ckpt.tensors.insert(n.replace("mean", "var"), t);
    /// }
    /// let names: Vec<String> = ckpt.layers()?.into_iter().map(|l| l.name).collect();
    /// assert_eq!(names, ["", "params.bn"]);
    /// # Ok::<(), bnorm_interop::InteropError>(())
    /// ```
    pub fn layers(&self) -> Result<Vec<Layer>> {
        let mut found: BTreeSet<(String, Format)> = BTreeSet::new();
        for name in self.tensors.keys() {
            let (full, leaf) = split_leaf(name);
            let (prefix, format) = match leaf {
                "running_mean" | "running_var" | "num_batches_tracked" => (full, Format::Torch),
                "moving_mean" | "moving_variance" => (full, Format::Keras),
                "mean" | "var" => match split_name(name) {
                    (Some("batch_stats"), p, _) => (p, Format::Flax),
                    _ => continue,
                },
                _ => continue,
            };
            found.insert((prefix.to_string(), format));
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
        // One index for all layers: looking each layer up by scanning every name made
        // this quadratic in the number of layers.
        let index = NameIndex::new(self, None);
        found
            .into_iter()
            .map(|(p, f)| self.layer_named(&p, f, index.locate(&p, f)))
            .collect()
    }

    /// The batch-norm layer `prefix` in `format`, its conventions taken from this crate's
    /// metadata when present and otherwise the format's defaults.
    pub fn layer(&self, prefix: &str, format: Format) -> Result<Layer> {
        self.layer_named(prefix, format, self.locate(prefix, format))
    }

    /// [`Checkpoint::layer`] with the layer's tensor names already located.
    fn layer_named(
        &self,
        prefix: &str,
        format: Format,
        names: BTreeMap<Role, String>,
    ) -> Result<Layer> {
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
            provenance: Provenance {
                eps: source(meta("eps").is_some()),
                momentum: source(meta("momentum").is_some()),
                variance: source(meta("variance").is_some()),
            },
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
    /// layer with running statistics gets `num_batches_tracked` (0 when unknown: PyTorch's
    /// strict `load_state_dict` needs it, and [`inspect`](crate::inspect) does not read a
    /// zero count as never updated).
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

fn source(recorded: bool) -> Source {
    if recorded {
        Source::Recorded
    } else {
        Source::Assumed
    }
}

fn momentum_string(m: Momentum) -> String {
    match m {
        Momentum::NewWeight(a) => format!("new_weight:{a:e}"),
        Momentum::Cumulative => "cumulative".into(),
        Momentum::Decay(d) => format!("decay:{d:e}"),
        Momentum::DebiasedDecay(d) => format!("debiased_decay:{d:e}"),
        Momentum::WarmupDecay(d) => format!("warmup_decay:{d:e}"),
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
        "warmup_decay" => Some(Momentum::WarmupDecay(v)),
        _ => None,
    }
}

/// Parses a checkpoint and returns its batch-norm layers (see [`Checkpoint::layers`]).
///
/// ```
/// assert!(bnorm_interop::read_layers(b"not safetensors").is_err());
/// ```
pub fn read_layers(bytes: &[u8]) -> Result<Vec<Layer>> {
    Checkpoint::from_bytes(bytes)?.layers()
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory is written,
/// flushed to disk and renamed over `path`, so readers see the old file or the new one,
/// never a partial one. The temporary file is removed on failure. A file replaced keeps
/// its permissions; a symbolic link is written through (its target is replaced, the link
/// stays); the temporary name is short, so any valid file name can be written.
///
/// ```
/// let dir = std::env::temp_dir().join(format!("bnorm-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("x.bin");
/// bnorm_interop::write_atomic(&path, b"hello")?;
/// assert_eq!(std::fs::read(&path).unwrap(), b"hello");
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), bnorm_interop::InteropError>(())
/// ```
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |p: &Path, source| InteropError::Io {
        path: p.to_path_buf(),
        source,
    };
    let target = resolve_links(path).map_err(|e| io(path, e))?;
    if target.file_name().is_none() {
        return Err(io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"),
        ));
    }
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // The permissions of the file replaced (a 0600 file stays 0600).
    let permissions = std::fs::metadata(&target).ok().map(|m| m.permissions());
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Short whatever the target's name (a name of 255 bytes is valid; one longer is not).
    let tmp = dir.join(format!(".bnorm-{}-{n}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if let Some(p) = permissions {
            f.set_permissions(p)?;
        }
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &target)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path, e));
    }
    Ok(())
}

/// `path` with symbolic links followed to the file they name (which need not exist yet).
fn resolve_links(path: &Path) -> std::io::Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let link = std::fs::read_link(&p)?;
                p = match p.parent() {
                    Some(parent) if link.is_relative() => parent.join(link),
                    _ => link,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(std::io::Error::other(
        "too many levels of symbolic links (a loop?)",
    ))
}

/// The tensor names of a checkpoint by how a layer's names are parsed: `(prefix,
/// leaf)` for PyTorch and Keras names, `(collection, prefix, leaf)` for Flax names; the
/// first name in order wins where two parse alike (as a scan in order would find it).
struct NameIndex<'a> {
    plain: BTreeMap<(&'a str, &'a str), &'a String>,
    flax: BTreeMap<(Option<&'a str>, &'a str, &'a str), &'a String>,
}

impl<'a> NameIndex<'a> {
    /// The index of every name, or with `only` of the names of that prefix alone (one
    /// layer's lookup: a scan, no index of the whole checkpoint).
    fn new(ckpt: &'a Checkpoint, only: Option<&str>) -> NameIndex<'a> {
        let (mut plain, mut flax) = (BTreeMap::new(), BTreeMap::new());
        let wanted = |p: &str| only.is_none_or(|o| o == p);
        for name in ckpt.tensors.keys() {
            let key = split_leaf(name);
            if wanted(key.0) {
                plain.entry(key).or_insert(name);
            }
            let key = split_name(name);
            if wanted(key.1) {
                flax.entry(key).or_insert(name);
            }
        }
        NameIndex { plain, flax }
    }

    /// The actual tensor names of each role of layer `prefix` in `format`.
    fn locate(&self, prefix: &str, format: Format) -> BTreeMap<Role, String> {
        let mut found = BTreeMap::new();
        for role in ROLES {
            let Some(leaf) = format.leaf(role) else {
                continue;
            };
            // Only Flax names start with a collection; a PyTorch submodule or a Keras layer
            // called `params` is part of the prefix.
            let name = match format {
                Format::Flax => self.flax.get(&(format.collection(role), prefix, leaf)),
                _ if format.collection(role).is_none() => self.plain.get(&(prefix, leaf)),
                _ => None,
            };
            if let Some(name) = name {
                found.insert(role, (*name).clone());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index finds, for every layer and format, the names a scan of every tensor name
    /// in order finds (the definition the index replaces): ambiguous spellings, Flax
    /// collections, a PyTorch submodule called `params`, Keras `:0` suffixes.
    #[test]
    fn the_name_index_finds_what_a_scan_finds() {
        let names = [
            "bn.weight",
            "bn.running_mean",
            "bn.running_var",
            "bn.num_batches_tracked",
            "params.bn.weight",
            "params.bn.running_mean",
            "params.bn.running_var",
            "params/bn/scale",
            "batch_stats/bn/mean",
            "batch_stats/bn/var",
            "params/bn/bias",
            "k/bn/gamma:0",
            "k/bn/gamma",
            "k/bn/moving_mean:0",
            "k/bn/moving_variance:0",
            "k.bn.beta",
            "running_mean",
            "running_var",
            "weight",
            "other.conv.weight",
        ];
        let mut ckpt = Checkpoint::default();
        for n in names {
            let t = Tensor::from_f64(&[1.0], vec![1], DType::F32);
            ckpt.tensors.insert(n.to_string(), t);
        }
        let scan = |prefix: &str, format: Format| {
            let mut found = BTreeMap::new();
            for name in ckpt.tensors.keys() {
                let (coll, p, leaf) = match format {
                    Format::Flax => split_name(name),
                    _ => {
                        let (p, leaf) = split_leaf(name);
                        (None, p, leaf)
                    }
                };
                for role in ROLES {
                    if p == prefix
                        && format.leaf(role) == Some(leaf)
                        && coll == format.collection(role)
                    {
                        found.entry(role).or_insert_with(|| name.clone());
                    }
                }
            }
            found
        };
        let index = NameIndex::new(&ckpt, None);
        let mut nonempty = 0;
        for prefix in [
            "",
            "bn",
            "params.bn",
            "params/bn",
            "k/bn",
            "k.bn",
            "other.conv",
            "x",
        ] {
            for format in [Format::Torch, Format::Keras, Format::Flax] {
                let expected = scan(prefix, format);
                nonempty += usize::from(!expected.is_empty());
                assert_eq!(
                    index.locate(prefix, format),
                    expected,
                    "{prefix} {format:?}"
                );
                let alone = ckpt.locate(prefix, format);
                assert_eq!(alone, expected, "{prefix} {format:?}, one layer's lookup");
            }
        }
        assert!(nonempty >= 6, "the cases find layers ({nonempty})");
    }

    #[test]
    fn split_names() {
        assert_eq!(split_name("a.b.running_var"), (None, "a.b", "running_var"));
        assert_eq!(split_name("bn/gamma:0"), (None, "bn", "gamma"));
        assert_eq!(
            split_name("batch_stats.BatchNorm_0.mean"),
            (Some("batch_stats"), "BatchNorm_0", "mean")
        );
        assert_eq!(split_name("params/scale"), (Some("params"), "", "scale"));
        assert_eq!(split_name("plain"), (None, "", "plain"));
        assert_eq!(split_leaf("params.bn.weight"), ("params.bn", "weight"));
    }

    #[cfg(unix)]
    #[test]
    fn atomic_writes_keep_mode_take_long_names_and_follow_links() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("bnorm-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let private = dir.join("private");
        std::fs::write(&private, b"old").unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
        write_atomic(&private, b"new").unwrap();
        let mode = std::fs::metadata(&private).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let long = dir.join("n".repeat(250));
        write_atomic(&long, b"long").unwrap();
        assert_eq!(std::fs::read(&long).unwrap(), b"long");
        let target = dir.join("target");
        std::fs::write(&target, b"old").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink("target", &link).unwrap();
        write_atomic(&link, b"through").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"through");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn momentum_strings_round_trip() {
        for m in [
            Momentum::NewWeight(0.1),
            Momentum::Cumulative,
            Momentum::Decay(0.99),
            Momentum::DebiasedDecay(0.999),
            Momentum::WarmupDecay(0.9999),
        ] {
            assert_eq!(parse_momentum(&momentum_string(m)), Some(m));
        }
        assert_eq!(parse_momentum("decay:2"), None);
    }
}
