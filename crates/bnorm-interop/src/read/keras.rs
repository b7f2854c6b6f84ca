//! Keras 3 `.keras` and `.weights.h5`, tf_keras / Keras 2 `.h5`.
//!
//! * **Keras 3 `.keras`** (a zip of `config.json`, `metadata.json`, `model.weights.h5`):
//!   the weights file keeps a layer's variables positionally (`layers/<path>/vars/0..n`,
//!   nested models under `layers/<model>/layers/…`), its path built from the snake-cased
//!   class name (`batch_normalization_1`), not the layer's name. The layers of
//!   `config.json` are walked in order to rebuild those paths (checked against the `name`
//!   attribute recent Keras versions write on each `vars` group), and each
//!   BatchNormalization's `center`/`scale`/`renorm` say which variables exist (in the
//!   order gamma, beta, moving_mean, moving_variance, then moving_stddev, renorm_mean,
//!   renorm_stddev). Tensors are named `<layer name>/gamma`, … (`<model>/<layer>/…` inside
//!   a nested model); `epsilon`, `momentum` (the decay) and `axis` go to the metadata.
//!   Other layers' variables are kept as `<layer name>/vars/<i>`. A custom (subclassed)
//!   layer keeps its sublayers under their Python attribute names and config.json does
//!   not describe them: their variables are kept (`<layer>/<sublayer>/vars/<i>`), but a
//!   batch norm among them is recognized only when its path says so.
//! * **Keras 3 `.weights.h5`** alone has no configuration: a layer is recognized as batch
//!   normalization by its path (`batch_normalization…`), named by the `name` attribute of
//!   its `vars` group (or its path when absent), and its variables mapped by their count.
//!   Four (or seven, with renorm) are unambiguous; three or two are not, and the
//!   assumption made is written to `bnorm.layer.<p>.assumed`.
//! * **tf_keras `.h5`** (whole model: `model_config` attribute and `model_weights` group;
//!   weights only: `layer_names`/`weight_names` attributes) names every weight
//!   (`bn/gamma:0`); the model configuration, when present, gives epsilon, momentum, axis
//!   and whether the layer was *fused*: tf_keras fuses a BatchNormalization on 4-D/5-D
//!   input (axis 1 or last) unless renorm or virtual batches are used, and its fused
//!   kernel keeps the Bessel-corrected (unbiased) moving variance, the non-fused one the
//!   biased variance; that is written to `bnorm.layer.<p>.variance`. tf_keras does not
//!   save the `fused` argument itself, so a layer that would be fused by default is
//!   recorded as unbiased with a note in `bnorm.layer.<p>.assumed` (an explicit
//!   `fused=False` cannot be seen); where the input rank is not in the configuration,
//!   nothing is recorded but that note. A weights-only file records no conventions.
//!
//! The HDF5 files are read by a small bounds-checked parser (the private `hdf5` module)
//! of what h5py writes by default (`libver="earliest"`); files written with
//! `libver="latest"` (superblock 2/3, version-2 object headers) and filtered
//! (compressed) datasets are refused with a message saying so. Nothing in the file is
//! executed.

use std::collections::BTreeMap;
use std::io::{Read, Seek};

use safetensors::Dtype;
use serde_json::Value;

use super::{unreadable, FileFormat};
use crate::{Checkpoint, Result, Tensor};

mod hdf5;

use hdf5::{DataType, File, Object};

/// Deepest nesting of models this reader follows (in `config.json` and in the HDF5
/// groups).
const MAX_DEPTH: usize = 16;
/// Largest `config.json` accepted (bytes).
const MAX_CONFIG: u64 = 64 << 20;

/// Reads a Keras 3 `.keras` archive.
pub(crate) fn read_keras<R: Read + Seek>(archive: &mut zip::ZipArchive<R>) -> Result<Checkpoint> {
    let fmt = FileFormat::Keras;
    let config = zip_entry(archive, "config.json", MAX_CONFIG)?;
    let config: Value = serde_json::from_slice(&config).map_err(|e| {
        unreadable(
            fmt,
            format!(
                "config.json is not valid JSON ({e}); the archive is corrupt: re-save the model"
            ),
        )
    })?;
    let names: Vec<String> = archive
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .collect();
    let h5_name = names
        .iter()
        .find(|n| *n == "model.weights.h5")
        .or_else(|| names.iter().find(|n| n.ends_with(".h5")))
        .cloned()
        .ok_or_else(|| unreadable(fmt, "the archive has no model.weights.h5"))?;
    let weights = zip_entry(archive, &h5_name, u64::MAX)?;
    let file = File::open(&weights).map_err(|e| h5_error(fmt, e))?;
    let root = file.object(file.root()).map_err(|e| h5_error(fmt, e))?;
    let mut ckpt = Checkpoint::default();
    let layers = config
        .get("config")
        .and_then(|c| c.get("layers"))
        .and_then(Value::as_array);
    match layers {
        Some(layers) => {
            let mut entries = Vec::new();
            keras3_walk_config(layers, "layers", "", 0, &mut entries)?;
            for e in &entries {
                keras3_entry(&file, &root, e, &mut ckpt).map_err(|e| h5_error(fmt, e))?;
            }
        }
        // A subclassed model: config.json does not list its layers; read the weights
        // file alone.
        None => keras3_bare(&file, &root, &mut ckpt).map_err(|e| h5_error(fmt, e))?,
    }
    if let Some(v) = config
        .get("config")
        .and_then(|c| c.get("name"))
        .and_then(Value::as_str)
    {
        ckpt.metadata.insert("keras.model".into(), v.to_string());
    }
    Ok(ckpt)
}

/// Reads an HDF5 file written by Keras 3 (`.weights.h5`) or tf_keras (`.h5`).
pub(crate) fn read_h5(bytes: &[u8]) -> Result<(FileFormat, Checkpoint)> {
    let file = File::open(bytes).map_err(|e| h5_error(FileFormat::TfKerasH5, e))?;
    let root = file
        .object(file.root())
        .map_err(|e| h5_error(FileFormat::TfKerasH5, e))?;
    let tfk = |e| h5_error(FileFormat::TfKerasH5, e);
    let members = file.members(&root).map_err(tfk)?;
    let has = |n: &str| members.iter().any(|(m, _)| m == n);
    let model_config = strings_attr(&file, &root, "model_config").map_err(tfk)?;
    if model_config.is_some() || has("model_weights") {
        let config = match model_config {
            Some(s) => Some(serde_json::from_str::<Value>(&s.concat()).map_err(|e| {
                unreadable(
                    FileFormat::TfKerasH5,
                    format!("the model_config attribute is not valid JSON ({e})"),
                )
            })?),
            None => None,
        };
        let weights = file
            .find(&root, "model_weights")
            .map_err(tfk)?
            .ok_or_else(|| {
                unreadable(
                    FileFormat::TfKerasH5,
                    "a tf_keras model file without a model_weights group: it holds no weights",
                )
            })?;
        let ckpt = tf_keras(&file, &weights, config.as_ref()).map_err(tfk)?;
        return Ok((FileFormat::TfKerasH5, ckpt));
    }
    if strings_attr(&file, &root, "layer_names")
        .map_err(tfk)?
        .is_some()
    {
        let ckpt = tf_keras(&file, &root, None).map_err(tfk)?;
        return Ok((FileFormat::TfKerasH5, ckpt));
    }
    if has("layers") || has("vars") {
        let mut ckpt = Checkpoint::default();
        keras3_bare(&file, &root, &mut ckpt).map_err(|e| h5_error(FileFormat::KerasWeights, e))?;
        return Ok((FileFormat::KerasWeights, ckpt));
    }
    Err(unreadable(
        FileFormat::TfKerasH5,
        "an HDF5 file that is neither a Keras 3 .weights.h5 (no layers group) nor a tf_keras \
         .h5 (no model_config, model_weights or layer_names): not a Keras file",
    ))
}

fn h5_error(fmt: FileFormat, e: String) -> crate::InteropError {
    unreadable(
        fmt,
        format!("{e} (if the file is intact, re-save it with Keras)"),
    )
}

/// One member of a zip archive, refusing one that claims more bytes than its compressed
/// size can produce (deflate expands at most ~1032:1) or than `limit`.
fn zip_entry<R: Read + Seek>(
    archive: &mut zip::ZipArchive<R>,
    name: &str,
    limit: u64,
) -> Result<Vec<u8>> {
    let fmt = FileFormat::Keras;
    let entry = archive
        .by_name(name)
        .map_err(|e| unreadable(fmt, format!("cannot open {name} in the archive: {e}")))?;
    let cap = entry
        .compressed_size()
        .saturating_mul(1032)
        .saturating_add(1024)
        .min(limit);
    if entry.size() > cap {
        return Err(unreadable(
            fmt,
            format!(
                "{name} claims {} bytes, more than its {} compressed bytes can hold (or the \
                 limit of {limit})",
                entry.size(),
                entry.compressed_size()
            ),
        ));
    }
    // The declared sizes are claims: reserve little, let the data grow the buffer.
    let mut out = Vec::with_capacity(entry.size().min(1 << 20) as usize);
    entry
        .take(cap.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| unreadable(fmt, format!("cannot read {name}: {e}")))?;
    if out.len() as u64 > cap {
        return Err(unreadable(
            fmt,
            format!("{name} expands beyond its declared size"),
        ));
    }
    Ok(out)
}

/// The string values of an attribute, joined from its chunks `name0`, `name1`, … when
/// tf_keras split a large one.
fn strings_attr(file: &File, obj: &Object, name: &str) -> hdf5::H5Result<Option<Vec<String>>> {
    if let Some(v) = file.attr_strings(obj, name)? {
        return Ok(Some(v));
    }
    let mut all = Vec::new();
    let mut i = 0;
    while let Some(v) = file.attr_strings(obj, &format!("{name}{i}"))? {
        all.extend(v);
        i += 1;
    }
    Ok((i > 0).then_some(all))
}

// ------------------------------------------------------------------------------ Keras 3

/// A BatchNormalization's configuration.
#[derive(Debug, Default)]
struct BnConfig {
    center: bool,
    scale: bool,
    renorm: bool,
    eps: Option<f64>,
    momentum: Option<f64>,
    axis: Option<String>,
}

impl BnConfig {
    fn from_json(cfg: &Value) -> BnConfig {
        let flag = |k: &str, default: bool| cfg.get(k).and_then(Value::as_bool).unwrap_or(default);
        BnConfig {
            center: flag("center", true),
            scale: flag("scale", true),
            renorm: flag("renorm", false),
            eps: cfg.get("epsilon").and_then(Value::as_f64),
            momentum: cfg.get("momentum").and_then(Value::as_f64),
            axis: cfg.get("axis").map(Value::to_string),
        }
    }

    /// The variables a layer with this configuration has, in Keras's order.
    fn roles(&self) -> Vec<&'static str> {
        let mut r = Vec::new();
        if self.scale {
            r.push("gamma");
        }
        if self.center {
            r.push("beta");
        }
        r.extend(["moving_mean", "moving_variance"]);
        if self.renorm {
            r.extend(["moving_stddev", "renorm_mean", "renorm_stddev"]);
        }
        r
    }

    /// Writes the conventions the configuration records.
    fn record(&self, prefix: &str, ckpt: &mut Checkpoint) {
        let mut put = |k: &str, v: String| {
            ckpt.metadata.insert(format!("bnorm.layer.{prefix}.{k}"), v);
        };
        put("format", "keras".into());
        if let Some(e) = self.eps.filter(|e| e.is_finite() && *e > 0.0) {
            put("eps", format!("{e:e}"));
        }
        if let Some(m) = self.momentum.filter(|m| (0.0..=1.0).contains(m)) {
            put("momentum", format!("decay:{m:e}"));
        }
        if let Some(a) = &self.axis {
            put("axis", a.clone());
        }
    }
}

fn is_bn_class(class: &str) -> bool {
    matches!(
        class,
        "BatchNormalization" | "BatchNormalizationV1" | "BatchNormalizationV2"
    )
}

/// A layer found in `config.json`: its name for the user, where its variables are in the
/// weights file, and its configuration when it is a BatchNormalization.
struct Entry {
    name: String,
    container: String,
    segment: String,
    bn: Option<BnConfig>,
}

/// Keras's `naming.to_snake_case` for class names (`BatchNormalization` →
/// `batch_normalization`, `Conv2D` → `conv2d`).
fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    // re.sub("(.)([A-Z][a-z]+)", r"\1_\2") then re.sub("([a-z])([A-Z])", r"\1_\2").
    let mut first = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if i > 0
            && c.is_ascii_uppercase()
            && chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase())
        {
            first.push('_');
        }
        first.push(c);
        i += 1;
    }
    let f: Vec<char> = first.chars().collect();
    let mut out = String::new();
    for (i, &c) in f.iter().enumerate() {
        if i > 0 && c.is_ascii_uppercase() && f[i - 1].is_ascii_lowercase() {
            out.push('_');
        }
        out.push(c);
    }
    out.to_lowercase()
}

fn keras3_walk_config(
    layers: &[Value],
    container: &str,
    name_prefix: &str,
    depth: usize,
    out: &mut Vec<Entry>,
) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(unreadable(
            FileFormat::Keras,
            format!("config.json nests models more than {MAX_DEPTH} deep"),
        ));
    }
    let mut used: BTreeMap<String, usize> = BTreeMap::new();
    for layer in layers {
        let class = layer
            .get("class_name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let cfg = layer.get("config").unwrap_or(&Value::Null);
        let name = cfg
            .get("name")
            .or_else(|| layer.get("name"))
            .and_then(Value::as_str)
            .unwrap_or(class)
            .to_string();
        let base = snake_case(class);
        let segment = match used.get_mut(&base) {
            Some(n) => {
                *n += 1;
                format!("{base}_{n}")
            }
            None => {
                used.insert(base.clone(), 0);
                base
            }
        };
        if let Some(inner) = cfg.get("layers").and_then(Value::as_array) {
            keras3_walk_config(
                inner,
                &format!("{container}/{segment}/layers"),
                &format!("{name_prefix}{name}/"),
                depth + 1,
                out,
            )?;
            continue;
        }
        out.push(Entry {
            name: format!("{name_prefix}{name}"),
            container: container.to_string(),
            segment,
            bn: is_bn_class(class).then(|| BnConfig::from_json(cfg)),
        });
    }
    Ok(())
}

/// The datasets of a `vars` group, in their numeric order.
fn vars_tensors(file: &File, vars: &Object) -> hdf5::H5Result<Vec<Tensor>> {
    let mut members = file.members(vars)?;
    let mut numbered = Vec::new();
    for (name, addr) in members.drain(..) {
        let i: usize = name
            .parse()
            .map_err(|_| format!("a vars group holds {name:?}, not a numbered variable"))?;
        numbered.push((i, addr));
    }
    numbered.sort_unstable();
    for (k, (i, _)) in numbered.iter().enumerate() {
        if *i != k {
            return Err(format!(
                "a vars group's variables are not numbered 0..{}",
                numbered.len()
            ));
        }
    }
    numbered
        .into_iter()
        .map(|(_, addr)| tensor(file, &file.object(addr)?))
        .collect()
}

/// A dataset as a [`Tensor`].
fn tensor(file: &File, obj: &Object) -> hdf5::H5Result<Tensor> {
    if !File::is_dataset(obj) {
        return Err("a variable is a group, not a dataset".into());
    }
    let d = file.read(obj)?;
    let dtype = match d.dtype {
        DataType::Float { size: 2, .. } => Dtype::F16,
        DataType::Float { size: 4, .. } => Dtype::F32,
        DataType::Float { size: 8, .. } => Dtype::F64,
        DataType::Int {
            size: 1,
            signed: true,
            ..
        } => Dtype::I8,
        DataType::Int {
            size: 2,
            signed: true,
            ..
        } => Dtype::I16,
        DataType::Int {
            size: 4,
            signed: true,
            ..
        } => Dtype::I32,
        DataType::Int {
            size: 8,
            signed: true,
            ..
        } => Dtype::I64,
        DataType::Int { size: 1, .. } => Dtype::U8,
        DataType::Int { size: 2, .. } => Dtype::U16,
        DataType::Int { size: 4, .. } => Dtype::U32,
        DataType::Int { size: 8, .. } => Dtype::U64,
        other => return Err(format!("a variable has an unsupported type {other:?}")),
    };
    let shape = d
        .shape
        .iter()
        .map(|&s| usize::try_from(s).map_err(|_| "a dimension does not fit in memory".to_string()))
        .collect::<hdf5::H5Result<Vec<usize>>>()?;
    Ok(Tensor {
        dtype,
        shape,
        bytes: d.bytes,
    })
}

/// Reads one layer of a `.keras` file.
fn keras3_entry(
    file: &File,
    root: &Object,
    e: &Entry,
    ckpt: &mut Checkpoint,
) -> hdf5::H5Result<()> {
    let path = format!("{}/{}", e.container, e.segment);
    let mut group = file.find(root, &path)?;
    // Recent Keras versions write the layer's name on its vars group: check the mapping
    // and, when it disagrees, look for the layer by that name among its siblings.
    let named = |g: &Object| -> hdf5::H5Result<Option<String>> {
        Ok(match file.find(g, "vars")? {
            Some(v) => file
                .attr_strings(&v, "name")?
                .and_then(|s| s.into_iter().next()),
            None => None,
        })
    };
    let short = e.name.rsplit('/').next().unwrap_or(&e.name);
    let matches = match &group {
        Some(g) => named(g)?.is_none_or(|n| n == short),
        None => false,
    };
    if !matches {
        group = None;
        if let Some(container) = file.find(root, &e.container)? {
            for (_, addr) in file.members(&container)? {
                let g = file.object(addr)?;
                if named(&g)?.as_deref() == Some(short) {
                    group = Some(g);
                    break;
                }
            }
        }
    }
    let Some(group) = group else {
        if e.bn.is_some() {
            return Err(format!(
                "layer {:?} of config.json has no variables at {path}/vars in the weights file \
                 (config.json and model.weights.h5 disagree)",
                e.name
            ));
        }
        return Ok(());
    };
    // A custom (subclassed) layer keeps its sublayers under their Python attribute names
    // (`layers/block/bn/vars`); config.json does not describe them.
    keras3_children(file, &group, &e.name, 1, ckpt)?;
    let Some(vars) = file.find(&group, "vars")? else {
        return Ok(());
    };
    let tensors = vars_tensors(file, &vars)?;
    match &e.bn {
        Some(cfg) => {
            let roles = cfg.roles();
            if roles.len() != tensors.len() {
                return Err(format!(
                    "BatchNormalization {:?} has {} variables but its configuration \
                     (center={}, scale={}, renorm={}) means {}",
                    e.name,
                    tensors.len(),
                    cfg.center,
                    cfg.scale,
                    cfg.renorm,
                    roles.len()
                ));
            }
            for (role, t) in roles.into_iter().zip(tensors) {
                ckpt.tensors.insert(format!("{}/{role}", e.name), t);
            }
            cfg.record(&e.name, ckpt);
        }
        None => {
            for (i, t) in tensors.into_iter().enumerate() {
                ckpt.tensors.insert(format!("{}/vars/{i}", e.name), t);
            }
        }
    }
    Ok(())
}

/// Reads a Keras 3 weights file without its configuration.
fn keras3_bare(file: &File, root: &Object, ckpt: &mut Checkpoint) -> hdf5::H5Result<()> {
    if let Some(layers) = file.find(root, "layers")? {
        keras3_bare_walk(file, &layers, "", 0, ckpt)?;
    }
    Ok(())
}

fn keras3_bare_walk(
    file: &File,
    layers: &Object,
    name_prefix: &str,
    depth: usize,
    ckpt: &mut Checkpoint,
) -> hdf5::H5Result<()> {
    if depth > MAX_DEPTH {
        return Err(format!("models are nested more than {MAX_DEPTH} deep"));
    }
    for (segment, addr) in file.members(layers)? {
        if segment == "vars" {
            continue;
        }
        let group = file.object(addr)?;
        if File::is_dataset(&group) {
            continue;
        }
        let vars = file.find(&group, "vars")?;
        let name = match &vars {
            Some(v) => file
                .attr_strings(v, "name")?
                .and_then(|s| s.into_iter().next()),
            None => None,
        }
        .unwrap_or_else(|| segment.clone());
        let full = format!("{name_prefix}{name}");
        if let Some(inner) = file.find(&group, "layers")? {
            keras3_bare_walk(file, &inner, &format!("{full}/"), depth + 1, ckpt)?;
            continue;
        }
        keras3_children(file, &group, &full, depth + 1, ckpt)?;
        let Some(vars) = vars else { continue };
        let tensors = vars_tensors(file, &vars)?;
        if !segment.starts_with("batch_normalization") {
            for (i, t) in tensors.into_iter().enumerate() {
                ckpt.tensors.insert(format!("{full}/vars/{i}"), t);
            }
            continue;
        }
        let (roles, assumed): (&[&str], Option<&str>) = match tensors.len() {
            4 => (&["gamma", "beta", "moving_mean", "moving_variance"], None),
            7 => (
                &[
                    "gamma",
                    "beta",
                    "moving_mean",
                    "moving_variance",
                    "moving_stddev",
                    "renorm_mean",
                    "renorm_stddev",
                ],
                None,
            ),
            3 => (
                &["beta", "moving_mean", "moving_variance"],
                Some(
                    "3 variables read as beta, moving_mean, moving_variance (scale=False); \
                     the weights file does not say whether the layer was center=False \
                     (gamma, moving_mean, moving_variance) instead: read the .keras file for \
                     certainty",
                ),
            ),
            2 => (
                &["moving_mean", "moving_variance"],
                Some(
                    "2 variables read as moving_mean, moving_variance (center=False, \
                     scale=False); the weights file has no configuration",
                ),
            ),
            n => {
                return Err(format!(
                    "BatchNormalization {full:?} has {n} variables; without its configuration \
                     they cannot be mapped: read the .keras file instead"
                ))
            }
        };
        for (role, t) in roles.iter().zip(tensors) {
            ckpt.tensors.insert(format!("{full}/{role}"), t);
        }
        ckpt.metadata
            .insert(format!("bnorm.layer.{full}.format"), "keras".into());
        if let Some(a) = assumed {
            ckpt.metadata
                .insert(format!("bnorm.layer.{full}.assumed"), a.into());
        }
    }
    Ok(())
}

/// The sublayers of a custom layer (groups beside its `vars`), read like a bare weights
/// file: their tensors are kept under `<layer>/<sublayer>/vars/<i>`; one is recognized as
/// batch normalization only when its path says so (`batch_normalization…`), since
/// neither the file nor config.json records a sublayer's class.
fn keras3_children(
    file: &File,
    group: &Object,
    name: &str,
    depth: usize,
    ckpt: &mut Checkpoint,
) -> hdf5::H5Result<()> {
    let members = file.members(group)?;
    if members.iter().all(|(n, _)| n == "vars" || n == "layers") {
        return Ok(());
    }
    keras3_bare_walk(file, group, &format!("{name}/"), depth, ckpt)
}

// ----------------------------------------------------------------------------- tf_keras

/// A tf_keras layer's configuration and the container it sits in (for the input rank).
struct TfkLayer<'v> {
    cfg: &'v Value,
    siblings: &'v [Value],
    index: usize,
    sequential: bool,
}

fn tfk_walk_config<'v>(
    model: &'v Value,
    prefix: &str,
    depth: usize,
    out: &mut BTreeMap<String, TfkLayer<'v>>,
) -> hdf5::H5Result<()> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "model_config nests models more than {MAX_DEPTH} deep"
        ));
    }
    let sequential = model.get("class_name").and_then(Value::as_str) == Some("Sequential");
    let Some(layers) = model
        .get("config")
        .and_then(|c| c.get("layers"))
        .and_then(Value::as_array)
    else {
        return Ok(());
    };
    for (index, layer) in layers.iter().enumerate() {
        let Some(name) = layer
            .get("config")
            .and_then(|c| c.get("name"))
            .or_else(|| layer.get("name"))
            .and_then(Value::as_str)
        else {
            continue;
        };
        if layer.get("config").and_then(|c| c.get("layers")).is_some() {
            tfk_walk_config(layer, &format!("{prefix}{name}/"), depth + 1, out)?;
        }
        out.insert(
            format!("{prefix}{name}"),
            TfkLayer {
                cfg: layer,
                siblings: layers,
                index,
                sequential,
            },
        );
    }
    Ok(())
}

/// The rank of a layer's output, as far as the configuration tells it.
fn output_rank(siblings: &[Value], index: usize, sequential: bool, depth: usize) -> Option<usize> {
    if depth > 64 {
        return None;
    }
    let layer = siblings.get(index)?;
    let class = layer.get("class_name")?.as_str()?;
    let cfg = layer.get("config")?;
    let shape_rank = ["batch_input_shape", "batch_shape"]
        .iter()
        .find_map(|k| cfg.get(*k).and_then(Value::as_array).map(Vec::len));
    if class == "InputLayer" {
        return shape_rank;
    }
    let own = match class {
        "Conv2D" | "DepthwiseConv2D" | "SeparableConv2D" | "Conv2DTranspose" | "MaxPooling2D"
        | "AveragePooling2D" | "ZeroPadding2D" | "UpSampling2D" | "Cropping2D" => Some(4),
        "Conv3D" | "Conv3DTranspose" | "MaxPooling3D" | "AveragePooling3D" | "ZeroPadding3D"
        | "UpSampling3D" | "Cropping3D" => Some(5),
        "Conv1D" | "SeparableConv1D" | "Conv1DTranspose" | "MaxPooling1D" | "AveragePooling1D"
        | "ZeroPadding1D" | "UpSampling1D" | "Cropping1D" => Some(3),
        "Flatten" => Some(2),
        "GlobalAveragePooling1D"
        | "GlobalAveragePooling2D"
        | "GlobalAveragePooling3D"
        | "GlobalMaxPooling1D"
        | "GlobalMaxPooling2D"
        | "GlobalMaxPooling3D" => {
            if cfg.get("keepdims").and_then(Value::as_bool) == Some(true) {
                None
            } else {
                Some(2)
            }
        }
        _ => None,
    };
    if own.is_some() {
        return own;
    }
    let preserving = matches!(
        class,
        "Dense"
            | "Activation"
            | "ReLU"
            | "LeakyReLU"
            | "PReLU"
            | "ELU"
            | "ThresholdedReLU"
            | "Softmax"
            | "Dropout"
            | "SpatialDropout1D"
            | "SpatialDropout2D"
            | "SpatialDropout3D"
            | "GaussianNoise"
            | "GaussianDropout"
            | "BatchNormalization"
            | "BatchNormalizationV1"
            | "BatchNormalizationV2"
            | "LayerNormalization"
            | "Add"
            | "Subtract"
            | "Multiply"
            | "Average"
            | "Maximum"
            | "Minimum"
            | "Concatenate"
    );
    if !preserving {
        return None;
    }
    if let Some(r) = shape_rank {
        // A first layer of a Sequential declares its input.
        return Some(r);
    }
    // The layer's input: the previous layer of a Sequential, or the first inbound node's
    // first layer in a functional model.
    let prev = if sequential {
        index.checked_sub(1)?
    } else {
        let inbound = layer
            .get("inbound_nodes")?
            .get(0)?
            .get(0)?
            .get(0)?
            .as_str()?;
        siblings.iter().position(|l| {
            l.get("config")
                .and_then(|c| c.get("name"))
                .and_then(Value::as_str)
                == Some(inbound)
                || l.get("name").and_then(Value::as_str) == Some(inbound)
        })?
    };
    output_rank(siblings, prev, sequential, depth + 1)
}

/// Whether tf_keras ran a BatchNormalization fused, as far as its saved configuration
/// tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fused {
    /// Not fused, whatever `fused` was (renorm, virtual batches, several axes, an input
    /// rank other than 4-D/5-D, or an axis the fused kernel does not take).
    No,
    /// Fused by default (4-D/5-D input, axis 1 or last); tf_keras does not save the
    /// `fused` argument, so an explicit `fused=False` cannot be seen.
    ByDefault,
    /// The input rank it depends on is not recorded.
    Unknown,
}

fn tfk_fused(layer: &TfkLayer) -> Fused {
    let Some(cfg) = layer.cfg.get("config") else {
        return Fused::Unknown;
    };
    if cfg.get("fused").and_then(Value::as_bool) == Some(false)
        || cfg.get("renorm").and_then(Value::as_bool) == Some(true)
        || cfg.get("virtual_batch_size").is_some_and(|v| !v.is_null())
    {
        return Fused::No;
    }
    let axis: Vec<i64> = match cfg.get("axis") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
        Some(v) => v.as_i64().into_iter().collect(),
        None => vec![-1],
    };
    if axis.len() != 1 {
        return Fused::No;
    }
    let Some(rank) = input_rank(layer) else {
        return Fused::Unknown;
    };
    if !(4..=5).contains(&rank) {
        return Fused::No;
    }
    let a = if axis[0] < 0 {
        axis[0] + rank as i64
    } else {
        axis[0]
    };
    if matches!((rank, a), (4, 1 | 3) | (5, 1 | 4)) {
        Fused::ByDefault
    } else {
        Fused::No
    }
}

/// The rank of a BatchNormalization's input.
fn input_rank(layer: &TfkLayer) -> Option<usize> {
    let cfg = layer.cfg.get("config")?;
    if let Some(r) = ["batch_input_shape", "batch_shape"]
        .iter()
        .find_map(|k| cfg.get(*k).and_then(Value::as_array).map(Vec::len))
    {
        return Some(r);
    }
    let prev = if layer.sequential {
        layer.index.checked_sub(1)?
    } else {
        let inbound = layer
            .cfg
            .get("inbound_nodes")?
            .get(0)?
            .get(0)?
            .get(0)?
            .as_str()?;
        layer.siblings.iter().position(|l| {
            l.get("config")
                .and_then(|c| c.get("name"))
                .and_then(Value::as_str)
                == Some(inbound)
                || l.get("name").and_then(Value::as_str) == Some(inbound)
        })?
    };
    output_rank(layer.siblings, prev, layer.sequential, 0)
}

/// Reads the weights of a tf_keras file from `weights` (the `model_weights` group of a
/// whole-model file, the root of a weights-only file).
fn tf_keras(file: &File, weights: &Object, config: Option<&Value>) -> hdf5::H5Result<Checkpoint> {
    let mut ckpt = Checkpoint::default();
    let layer_names = strings_attr(file, weights, "layer_names")?
        .ok_or("the weights group has no layer_names attribute")?;
    for layer in &layer_names {
        let group = file
            .find(weights, layer)?
            .ok_or_else(|| format!("layer_names lists {layer:?} but there is no such group"))?;
        let weight_names = strings_attr(file, &group, "weight_names")?.unwrap_or_default();
        for wn in &weight_names {
            let ds = file
                .find(&group, wn)?
                .ok_or_else(|| format!("weight {wn:?} of layer {layer:?} is missing"))?;
            let t = tensor(file, &ds)?;
            let base = wn.rsplit_once(':').map_or(wn.as_str(), |(b, i)| {
                if i.chars().all(|c| c.is_ascii_digit()) {
                    b
                } else {
                    wn
                }
            });
            let name = if base.starts_with(&format!("{layer}/")) {
                base.to_string()
            } else {
                format!("{layer}/{base}")
            };
            ckpt.tensors.insert(name, t);
        }
    }
    let mut layers = BTreeMap::new();
    if let Some(config) = config {
        tfk_walk_config(config, "", 0, &mut layers)?;
    }
    let bn_prefixes: Vec<String> = ckpt
        .tensors
        .keys()
        .filter_map(|n| n.strip_suffix("/moving_mean").map(str::to_string))
        .collect();
    for prefix in bn_prefixes {
        ckpt.metadata
            .insert(format!("bnorm.layer.{prefix}.format"), "keras".into());
        let Some(layer) = layers.get(&prefix) else {
            continue;
        };
        let class = layer
            .cfg
            .get("class_name")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !is_bn_class(class) {
            continue;
        }
        let cfg = layer.cfg.get("config").unwrap_or(&Value::Null);
        BnConfig::from_json(cfg).record(&prefix, &mut ckpt);
        let key = format!("bnorm.layer.{prefix}.variance");
        let assumed = format!("bnorm.layer.{prefix}.assumed");
        match tfk_fused(layer) {
            Fused::ByDefault => {
                ckpt.metadata.insert(key, "unbiased".into());
                ckpt.metadata.insert(
                    assumed,
                    "variance: tf_keras fuses a BatchNormalization on 4-D/5-D input by \
                     default, and the fused kernel keeps the unbiased moving variance; \
                     tf_keras does not save the `fused` argument, so a layer built with \
                     fused=False (biased variance) cannot be told apart"
                        .into(),
                );
            }
            Fused::No => {
                ckpt.metadata.insert(key, "biased".into());
            }
            Fused::Unknown => {
                ckpt.metadata.insert(
                    assumed,
                    "variance: tf_keras fuses this layer (and then keeps the unbiased \
                     variance) only for 4-D or 5-D input, and the model configuration does \
                     not tell this layer's input rank; the Keras default (biased) applies"
                        .into(),
                );
            }
        }
    }
    Ok(ckpt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn class_names_snake_case_like_keras() {
        for (class, snake) in [
            ("BatchNormalization", "batch_normalization"),
            ("Conv2D", "conv2d"),
            ("GlobalAveragePooling2D", "global_average_pooling2d"),
            ("InputLayer", "input_layer"),
            ("Functional", "functional"),
            ("LSTMCell", "lstm_cell"),
            ("ReLU", "re_lu"),
        ] {
            assert_eq!(snake_case(class), snake, "{class}");
        }
    }

    /// tf_keras's fused decision from a saved configuration (the rule of
    /// `BatchNormalizationBase.build`: fused for 4-D input with axis 1 or 3 and 5-D input
    /// with axis 1 or 4, unless renorm / virtual batches; the input rank found from the
    /// layer before it).
    #[test]
    fn tf_keras_fused_decision() {
        let functional = |prev: &str, bn: Value| {
            json!({"class_name": "Functional", "config": {"layers": [
                {"class_name": "InputLayer", "config": {"name": "in",
                    "batch_input_shape": [null, 4, 4, 4, 2]}, "inbound_nodes": []},
                {"class_name": prev, "config": {"name": "prev"},
                    "inbound_nodes": [[["in", 0, 0, {}]]]},
                {"class_name": "Activation", "config": {"name": "act"},
                    "inbound_nodes": [[["prev", 0, 0, {}]]]},
                {"class_name": "BatchNormalization", "config": bn,
                    "inbound_nodes": [[["act", 0, 0, {}]]]},
            ]}})
        };
        let decide = |model: &Value| {
            let mut layers = BTreeMap::new();
            tfk_walk_config(model, "", 0, &mut layers).unwrap();
            tfk_fused(&layers["bn"])
        };
        let bn = |axis: Value| json!({"name": "bn", "axis": axis});
        assert_eq!(
            decide(&functional("Conv2D", bn(json!([3])))),
            Fused::ByDefault
        );
        assert_eq!(
            decide(&functional("Conv2D", bn(json!([1])))),
            Fused::ByDefault
        );
        assert_eq!(decide(&functional("Conv2D", bn(json!([2])))), Fused::No);
        assert_eq!(
            decide(&functional("Conv3D", bn(json!([4])))),
            Fused::ByDefault
        );
        assert_eq!(decide(&functional("Conv3D", bn(json!([2])))), Fused::No);
        assert_eq!(decide(&functional("Flatten", bn(json!([1])))), Fused::No);
        assert_eq!(decide(&functional("Conv1D", bn(json!([2])))), Fused::No);
        assert_eq!(decide(&functional("Conv2D", bn(json!([1, 3])))), Fused::No);
        // Dense keeps its input's rank: here the 5-D input.
        assert_eq!(
            decide(&functional("Dense", bn(json!([4])))),
            Fused::ByDefault
        );
        // A layer this reader does not know: the rank is unknown.
        assert_eq!(
            decide(&functional("MyLayer", bn(json!([3])))),
            Fused::Unknown
        );
        let renorm = json!({"name": "bn", "axis": [3], "renorm": true});
        assert_eq!(decide(&functional("Conv2D", renorm)), Fused::No);
        let virtual_batch = json!({"name": "bn", "axis": [3], "virtual_batch_size": 2});
        assert_eq!(decide(&functional("Conv2D", virtual_batch)), Fused::No);
        // Sequential: the previous layer declares a 2-D input.
        let seq = json!({"class_name": "Sequential", "config": {"layers": [
            {"class_name": "Dense", "config": {"name": "d", "batch_input_shape": [null, 3]}},
            {"class_name": "BatchNormalization", "config": {"name": "bn", "axis": [1]}},
        ]}});
        assert_eq!(decide(&seq), Fused::No);
    }
}
