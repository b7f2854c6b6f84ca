//! `bnorm inspect`, `bnorm fold`, `bnorm convert`: batch-norm layers in checkpoints of
//! every format `bnorm_interop::read` reads (written back as safetensors).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bnorm::{Momentum, VarianceEstimator};
use bnorm_interop::read::{read_path, FileFormat};
use bnorm_interop::{
    fold_into_following, fold_into_preceding, inspect as health, BnAffine, Checkpoint,
    ConvertOptions, Format, Layer, LinearKind, Note, Source, Tensor,
};
use clap::Args;
use serde_json::json;

use crate::convention;

/// The exit status of `inspect` when the file cannot be read (0: healthy, 1: problems).
pub const UNREADABLE_STATUS: u8 = 2;

/// eps and momentum given on the command line (files often do not store them).
#[derive(Args, Debug, Default)]
pub struct ConventionArgs {
    /// eps of layers whose file does not store it (state dicts, Keras and Flax weights do
    /// not): `E` for every such layer, `LAYER=E` for one, recorded or not (repeat or
    /// comma-separate; per-layer values win). Without it the format's default is assumed
    /// and said so.
    #[arg(long, value_delimiter = ',', value_parser = parse_eps)]
    pub eps: Vec<(Option<String>, f64)>,
    /// Momentum of layers whose file does not store it, in the layer's framework's own
    /// meaning (PyTorch: the new batch's weight, `none` for momentum=None; Keras, Flax:
    /// the decay): `M` for every such layer, `LAYER=M` for one (as --eps).
    #[arg(long, value_delimiter = ',', value_parser = parse_momentum)]
    pub momentum: Vec<(Option<String>, Option<f64>)>,
}

/// Arguments of `bnorm inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The checkpoint (safetensors, PyTorch, Keras, TensorFlow, Flax or ONNX; recognized by
    /// its content).
    pub file: PathBuf,
    /// Print a JSON array, one object per layer (name, channels, problems, explanations,
    /// ...).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conventions: ConventionArgs,
}

/// Arguments of `bnorm fold`.
#[derive(Args, Debug)]
pub struct FoldArgs {
    /// The input checkpoint (PyTorch names and weight layouts for the folded layers).
    pub input: PathBuf,
    /// Where to write the folded checkpoint (safetensors, atomically).
    pub output: PathBuf,
    /// Comma-separated pairs. `LAYER:BN`: batch norm BN directly after LAYER
    /// (`<LAYER>.weight`, optional `<LAYER>.bias`), a linear or convolution layer; append
    /// `:transposed=G` for a transposed convolution with G groups (`:transposed` for one).
    /// `BN:LAYER`: BN directly before LAYER, folded into it: a linear layer, or a
    /// convolution without zero padding, said with `:unpadded` (the padding is not in the
    /// checkpoint). Each batch norm and each layer at most once.
    #[arg(long, value_delimiter = ',', required = true)]
    pub pairs: Vec<String>,
    #[command(flatten)]
    pub conventions: ConventionArgs,
}

/// Arguments of `bnorm convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The input checkpoint (any format bnorm reads).
    pub input: PathBuf,
    /// Where to write the converted checkpoint (safetensors, atomically).
    pub output: PathBuf,
    /// Target convention (the names `demo --convention` and the conformance files use;
    /// `tf`, TensorFlow's low-level recipe, has no checkpoint names of its own).
    #[arg(long, ignore_case = true, value_parser = convention::format_parser())]
    pub to: Format,
    /// Values per channel in a training batch (N for (N, C) input, N*H*W for images):
    /// needed to convert between biased and unbiased running variances. `N` applies to
    /// every layer, `LAYER=N` to one (repeat or comma-separate; per-layer values win).
    #[arg(long, value_delimiter = ',', value_parser = parse_batch_size)]
    pub batch_size: Vec<(Option<String>, usize)>,
    /// Keep running-variance values unchanged when the estimators differ (inference
    /// outputs stay identical; further training mixes estimators).
    #[arg(long, conflicts_with = "batch_size")]
    pub keep_variance: bool,
    /// Rename tensors: `OLD=NEW` replaces the name prefix OLD by NEW in every tensor name
    /// (and layer) that starts with it, after conversion (`--rename model.=` drops a
    /// prefix, `--rename backbone.=features/` maps one). Repeat for several; the first
    /// that matches a name applies.
    #[arg(long, value_parser = parse_rename)]
    pub rename: Vec<(String, String)>,
    #[command(flatten)]
    pub conventions: ConventionArgs,
}

/// `LAYER=VALUE` or `VALUE` (the layer name may be empty: a lone module's state dict).
fn split_layer(s: &str) -> (Option<String>, &str) {
    match s.rsplit_once('=') {
        Some((l, v)) => (Some(l.to_string()), v),
        None => (None, s),
    }
}

fn parse_batch_size(s: &str) -> std::result::Result<(Option<String>, usize), String> {
    let (layer, n) = split_layer(s);
    let n: usize = n
        .parse()
        .map_err(|_| format!("bad batch size {s:?}: expected N or LAYER=N"))?;
    Ok((layer, n))
}

fn parse_eps(s: &str) -> std::result::Result<(Option<String>, f64), String> {
    let (layer, v) = split_layer(s);
    match v.parse::<f64>() {
        Ok(e) if e.is_finite() && e > 0.0 => Ok((layer, e)),
        _ => Err(format!(
            "bad eps {s:?}: expected E or LAYER=E with E finite and positive (1e-3)"
        )),
    }
}

fn parse_momentum(s: &str) -> std::result::Result<(Option<String>, Option<f64>), String> {
    let (layer, v) = split_layer(s);
    if v.eq_ignore_ascii_case("none") {
        return Ok((layer, None));
    }
    match v.parse::<f64>() {
        Ok(m) if (0.0..=1.0).contains(&m) => Ok((layer, Some(m))),
        _ => Err(format!(
            "bad momentum {s:?}: expected M or LAYER=M with M in [0, 1] (or none: PyTorch's \
             momentum=None)"
        )),
    }
}

fn parse_rename(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((old, new)) if !old.is_empty() => Ok((old.to_string(), new.to_string())),
        _ => Err(format!(
            "bad rename {s:?}: expected OLD=NEW (a name prefix and its replacement)"
        )),
    }
}

/// A file read in any format, with what it was.
fn read(path: &Path) -> Result<(FileFormat, Checkpoint)> {
    let loaded = read_path(path).with_context(|| format!("reading {}", path.display()))?;
    Ok((loaded.file_format, loaded.checkpoint))
}

/// How a layer name is shown: a lone module's state dict has the empty prefix.
fn shown(name: &str) -> &str {
    if name.is_empty() {
        "(top level)"
    } else {
        name
    }
}

fn note_text(n: &Note) -> String {
    let tag = if n.exact { "note" } else { "inexact" };
    format!("{tag}: {}: {}", shown(&n.layer), n.message)
}

/// Applies `--eps` and `--momentum`: a per-layer value always, a global one where the file
/// does not record the value. Refuses a layer name that is not among `layers`.
fn apply_conventions(layers: &mut [Layer], args: &ConventionArgs) -> Result<()> {
    let names: Vec<&Option<String>> = args
        .eps
        .iter()
        .map(|e| &e.0)
        .chain(args.momentum.iter().map(|m| &m.0))
        .collect();
    for name in names.into_iter().flatten() {
        if !layers.iter().any(|l| &l.name == name) {
            bail!(
                "--eps/--momentum name {name:?}, which is not a batch-norm layer of the file \
                 (`bnorm inspect FILE` lists them)"
            );
        }
    }
    for l in layers.iter_mut() {
        let own_eps = args
            .eps
            .iter()
            .rev()
            .find(|e| e.0.as_deref() == Some(&l.name));
        let all_eps = args.eps.iter().rev().find(|e| e.0.is_none());
        match (own_eps, all_eps) {
            (Some((_, e)), _) => l.set_eps(*e)?,
            (None, Some((_, e))) if l.provenance.eps == Source::Assumed => l.set_eps(*e)?,
            _ => {}
        }
        let own_m = args
            .momentum
            .iter()
            .rev()
            .find(|m| m.0.as_deref() == Some(&l.name));
        let all_m = args.momentum.iter().rev().find(|m| m.0.is_none());
        match (own_m, all_m) {
            (Some((_, m)), _) => l.set_momentum(*m)?,
            (None, Some((_, m))) if l.provenance.momentum == Source::Assumed => {
                l.set_momentum(*m)?
            }
            _ => {}
        }
    }
    Ok(())
}

fn momentum(m: Momentum) -> String {
    match m {
        Momentum::NewWeight(a) => format!("new_weight {a}"),
        Momentum::Cumulative => "cumulative".into(),
        Momentum::Decay(d) => format!("decay {d}"),
        Momentum::DebiasedDecay(d) => format!("debiased_decay {d}"),
        Momentum::WarmupDecay(d) => format!("warmup_decay {d}"),
    }
}

fn variance(v: VarianceEstimator) -> &'static str {
    match v {
        VarianceEstimator::Biased => "biased",
        VarianceEstimator::Unbiased => "unbiased",
    }
}

/// Whether the last part of `prefix` names a LayerNorm, GroupNorm, InstanceNorm or RMSNorm
/// (`ln_f`, `ln1`, `gn`, `LayerNorm`, `layer_norm`, `input_layernorm`), normalizations
/// whose PyTorch tensors have batch norm's names without running statistics.
fn names_another_norm(prefix: &str) -> bool {
    let last = prefix.rsplit(['.', '/']).next().unwrap_or(prefix);
    let last = last.to_ascii_lowercase();
    let joined: String = last.chars().filter(|c| !matches!(c, '_' | '-')).collect();
    ["layernorm", "groupnorm", "instancenorm", "rmsnorm"]
        .iter()
        .any(|n| joined.contains(n))
        || last
            .split(['_', '-'])
            .map(|t| t.trim_end_matches(|c: char| c.is_ascii_digit()))
            .any(|t| t == "ln" || t == "gn")
}

/// PyTorch batch-norm layers saved with `track_running_stats=False`, which
/// [`Checkpoint::layers`] does not find (it finds layers by their running statistics or by
/// bnorm's metadata): prefixes `P` whose only tensors `P.*` are a 1-D floating-point
/// `P.weight` and `P.bias` of one length, not among `known` and not named like another
/// normalization ([`names_another_norm`]). A LayerNorm over one dimension, a GroupNorm or
/// an affine InstanceNorm has the same names: callers say so. A prefix the library cannot
/// read as a PyTorch layer is not one of them.
fn weight_and_bias_only(ckpt: &Checkpoint, known: &[Layer]) -> Vec<Layer> {
    let mut leaves: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for name in ckpt.tensors.keys() {
        if let Some((prefix, leaf)) = name.rsplit_once('.') {
            leaves.entry(prefix).or_default().push(leaf);
        }
    }
    let mut out = Vec::new();
    for (prefix, mut l) in leaves {
        l.sort_unstable();
        if l != ["bias", "weight"]
            || known.iter().any(|k| k.name == prefix)
            || names_another_norm(prefix)
        {
            continue;
        }
        let (w, b) = (
            &ckpt.tensors[&format!("{prefix}.weight")],
            &ckpt.tensors[&format!("{prefix}.bias")],
        );
        let one_dim = |t: &Tensor| t.shape.len() == 1 && t.float_dtype().is_some();
        if !(one_dim(w) && one_dim(b) && w.shape == b.shape && w.shape[0] > 0) {
            continue;
        }
        match ckpt.layer(prefix, Format::Torch) {
            Ok(layer) if layer.running_mean.is_none() => out.push(layer),
            _ => {}
        }
    }
    out
}

/// What `inspect` and `convert` say of a layer found by [`weight_and_bias_only`].
const WEIGHT_AND_BIAS_ONLY: &str = "found by its weight and bias alone, as PyTorch saves a \
     BatchNorm with track_running_stats=False; a LayerNorm, GroupNorm or InstanceNorm has the \
     same names";

/// Where a value came from, as `inspect` prints it after the value.
fn tag(source: Source) -> &'static str {
    match source {
        Source::Recorded => "",
        Source::Assumed => " (assumed)",
        Source::Given => " (given)",
    }
}

/// `bnorm inspect FILE [--json] [--eps ...] [--momentum ...]`: exit status 0 when every
/// layer is healthy, 1 when a problem was found; an unreadable file is an error (`main`
/// exits with [`UNREADABLE_STATUS`]).
pub fn inspect(args: &InspectArgs) -> Result<u8> {
    let (file_format, ckpt) = read(&args.file)?;
    let mut layers = ckpt
        .layers()
        .with_context(|| format!("reading the batch-norm layers of {}", args.file.display()))?;
    let guessed = weight_and_bias_only(&ckpt, &layers);
    drop(ckpt);
    let is_guessed = |l: &Layer| guessed.iter().any(|g| g.name == l.name);
    layers.extend(guessed.iter().cloned());
    layers.sort_by(|a, b| a.name.cmp(&b.name));
    apply_conventions(&mut layers, &args.conventions)?;
    let checked: Vec<_> = layers.iter().map(|l| (l, health(l))).collect();
    let unhealthy = checked.iter().filter(|(_, p)| !p.is_empty()).count();
    let status = if unhealthy == 0 { 0 } else { 1 };
    if args.json {
        let out: Vec<_> = checked
            .iter()
            .map(|(l, problems)| {
                let tracked = l.running_mean.is_some();
                let p = l.provenance;
                let mut assumed = vec![];
                if p.eps == Source::Assumed {
                    assumed.push("eps");
                }
                if tracked && p.momentum == Source::Assumed {
                    assumed.push("momentum");
                }
                if tracked && p.variance == Source::Assumed {
                    assumed.push("running_variance");
                }
                let explanations: serde_json::Map<String, serde_json::Value> = problems
                    .iter()
                    .map(|p| (p.code().to_string(), p.advice(file_format, l.format).into()))
                    .collect();
                json!({
                    "name": l.name,
                    "format": l.format.name(),
                    "file_format": file_format.name(),
                    "channels": l.channels,
                    "dtype": l.dtype.name(),
                    "eps": l.eps,
                    "running_statistics": tracked,
                    "momentum": tracked.then(|| momentum(l.momentum)),
                    "running_variance": tracked.then(|| variance(l.variance)),
                    "conventions": if l.conventions_recorded { "recorded" } else { "assumed from format defaults" },
                    "provenance": {
                        "eps": p.eps.name(),
                        "momentum": p.momentum.name(),
                        "running_variance": p.variance.name(),
                        // Kept for readers of the first form of this field.
                        "variance": p.variance.name(),
                    },
                    "assumed": assumed,
                    "affine": { "scale": l.weight.is_some(), "center": l.bias.is_some() },
                    "num_batches_tracked": l.num_batches_tracked,
                    "found_by": if is_guessed(l) { "weight_and_bias_only" } else { "names" },
                    "problems": problems.iter().map(|p| p.code()).collect::<Vec<_>>(),
                    "explanations": explanations,
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&out)?)?;
        return Ok(status);
    }
    for (l, problems) in &checked {
        let p = l.provenance;
        let details = if l.running_mean.is_none() {
            format!(
                "no running statistics: normalizes with batch statistics even at inference; \
                 eps {:e}{}",
                l.eps,
                tag(p.eps)
            )
        } else {
            let count = l
                .num_batches_tracked
                .map_or(String::new(), |n| format!(", {n} updates"));
            format!(
                "eps {:e}{}, momentum {}{}, {} variance{}{count}",
                l.eps,
                tag(p.eps),
                momentum(l.momentum),
                tag(p.momentum),
                variance(l.variance),
                tag(p.variance),
            )
        };
        outln!(
            "{:<32} {:>5} ch  {:<4} {} ({details})  {}",
            shown(&l.name),
            l.channels,
            l.dtype.name(),
            l.format,
            if problems.is_empty() {
                "ok"
            } else {
                "PROBLEMS"
            }
        )?;
        for p in problems {
            outln!("    {:<28} {}", p.code(), p.advice(file_format, l.format))?;
        }
        if is_guessed(l) {
            outln!("    ({WEIGHT_AND_BIAS_ONLY})")?;
        }
    }
    let without = layers.iter().filter(|l| l.running_mean.is_none()).count();
    let assumed = layers
        .iter()
        .any(|l| l.provenance.eps == Source::Assumed || l.provenance.momentum == Source::Assumed);
    outln!(
        "{} batch-norm layer(s), {unhealthy} with problems{} (a {file_format} file)",
        layers.len(),
        if without > 0 {
            format!(", {without} without running statistics")
        } else {
            String::new()
        }
    )?;
    if assumed {
        outln!(
            "(assumed): the file does not store it; the format's default is shown: give the \
             real one with --eps / --momentum (LAYER=VALUE for one layer)"
        )?;
    }
    Ok(status)
}

/// What the third part of a pair says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PairOption {
    None,
    Transposed(usize),
    Unpadded,
    Padded,
}

fn parse_pair(spec: &str) -> Result<(String, String, PairOption)> {
    let parts: Vec<&str> = spec.split(':').collect();
    let option = match parts.get(2).copied() {
        None => PairOption::None,
        Some("transposed") => PairOption::Transposed(1),
        Some("unpadded") => PairOption::Unpadded,
        Some("padded") => PairOption::Padded,
        Some(t) => match t.strip_prefix("transposed=").map(str::parse::<usize>) {
            Some(Ok(g)) if g >= 1 => PairOption::Transposed(g),
            _ => bail!(
                "bad pair {spec:?}: the third part must be `transposed`, `transposed=G`, \
                 `unpadded` or `padded`"
            ),
        },
    };
    match parts.as_slice() {
        [a, b, ..] if parts.len() <= 3 && !a.is_empty() && !b.is_empty() => {
            Ok((a.to_string(), b.to_string(), option))
        }
        _ => bail!("bad pair {spec:?}: expected LAYER:BN, LAYER:BN:transposed=G or BN:LAYER"),
    }
}

fn find_layer(layers: &[Layer], ckpt: &Checkpoint, name: &str) -> Result<Layer> {
    if let Some(l) = layers.iter().find(|l| l.name == name) {
        return Ok(l.clone());
    }
    Ok(ckpt.layer(name, Format::Torch)?)
}

/// One fold the user asked for.
struct Pair {
    spec: String,
    layer: String,
    bn: Layer,
    following: bool,
    option: PairOption,
}

/// `bnorm fold IN OUT --pairs conv1:bn1,bn4:fc,...`.
pub fn fold(args: &FoldArgs) -> Result<u8> {
    let (_, mut ckpt) = read(&args.input)?;
    let mut layers = ckpt.layers()?;
    apply_conventions(&mut layers, &args.conventions)?;
    let mut pairs = Vec::new();
    let (mut bns, mut targets) = (BTreeSet::new(), BTreeSet::new());
    for spec in &args.pairs {
        let (a, b, option) = parse_pair(spec)?;
        let is_bn =
            |n: &str| layers.iter().any(|l| l.name == n) || ckpt.layer(n, Format::Torch).is_ok();
        // LAYER:BN folds into the preceding layer, BN:LAYER into the following one.
        let following = !is_bn(&b) && is_bn(&a);
        let (layer, bn_name) = if following { (b, a) } else { (a, b) };
        let bn = find_layer(&layers, &ckpt, &bn_name)?;
        if !bns.insert(bn_name.clone()) {
            bail!(
                "--pairs names the batch norm {bn_name} more than once: it folds once, into one \
                 layer (folding it twice would apply it twice)"
            );
        }
        if !targets.insert(layer.clone()) {
            bail!(
                "--pairs names the layer {layer} more than once: a layer takes at most one \
                 batch norm here (fold the next one in a second run)"
            );
        }
        pairs.push(Pair {
            spec: spec.clone(),
            layer,
            bn,
            following,
            option,
        });
    }
    let mut report = Vec::new();
    for pair in pairs {
        let (name, bn) = (&pair.layer, &pair.bn);
        let bn_name = shown(&bn.name).to_string();
        let affine = BnAffine::from_layer(bn).with_context(|| format!("folding {bn_name}"))?;
        let wname = format!("{name}.weight");
        let bname = format!("{name}.bias");
        let w = ckpt
            .tensors
            .get(&wname)
            .with_context(|| format!("no tensor {wname} (fold expects PyTorch names)"))?;
        let dtype = w
            .float_dtype()
            .with_context(|| format!("{wname} is not a floating-point tensor"))?;
        let shape = w.shape.clone();
        let kind = match (pair.option, shape.len()) {
            (PairOption::Transposed(g), _) => LinearKind::ConvTranspose { groups: g },
            (_, 2) => LinearKind::Linear,
            _ => LinearKind::Conv { groups: 1 },
        };
        let c = affine.channels();
        let weight = w.to_f64(&wname)?;
        let bias = ckpt
            .tensors
            .get(&bname)
            .map(|t| t.to_f64(&bname))
            .transpose()?;
        let folded = if pair.following {
            if matches!(kind, LinearKind::Conv { .. }) && pair.option == PairOption::None {
                bail!(
                    "folding {bn_name} into the following convolution {name} is exact only \
                     without zero padding, which the checkpoint does not say: write \
                     {bn_name}:{name}:unpadded if {name} has padding=0; otherwise fold \
                     {bn_name} into the layer before it"
                );
            }
            if let (LinearKind::Linear | LinearKind::Conv { .. }, Some(&inputs)) =
                (kind, shape.get(1))
            {
                if inputs != c {
                    bail!(
                        "{wname} has shape {shape:?}: {inputs} input channels, but {bn_name} has \
                         {c} channels (in {}, is {bn_name} directly before {name}?)",
                        pair.spec
                    );
                }
            }
            fold_into_following(
                &weight,
                &shape,
                bias.as_deref(),
                kind,
                &affine,
                pair.option == PairOption::Padded,
                dtype,
            )
        } else {
            let outputs = match kind {
                LinearKind::ConvTranspose { groups } => shape.get(1).map(|o| o * groups),
                _ => shape.first().copied(),
            };
            if outputs.is_some_and(|o| o != c) {
                let hint = if matches!(kind, LinearKind::Conv { .. }) && shape.get(1) == Some(&c) {
                    format!(
                        "; if {name} is a transposed convolution (weight (in, out/groups, k...)), \
                         write {name}:{bn_name}:transposed (or :transposed=G with G groups)"
                    )
                } else {
                    String::new()
                };
                bail!(
                    "{wname} has shape {shape:?}: {} output channels, but {bn_name} has {c} \
                     channels (in {}, is {bn_name} directly after {name}?){hint}",
                    outputs.unwrap_or(0),
                    pair.spec
                );
            }
            fold_into_preceding(&weight, &shape, bias.as_deref(), kind, &affine, dtype)
        }
        .with_context(|| format!("folding {bn_name} into {name}"))?;
        ckpt.remove_layer(&bn.name, bn.format);
        let out_ch = folded.bias.len();
        ckpt.tensors
            .insert(wname, Tensor::from_f64(&folded.weight, shape, dtype));
        ckpt.tensors
            .insert(bname, Tensor::from_f64(&folded.bias, vec![out_ch], dtype));
        report.push(format!(
            "folded {bn_name} into {name} ({}, {dtype}): max error {:.3e} on a probe (max |output| {:.3e})",
            if pair.following { "the layer after it" } else { "the layer before it" },
            folded.max_error, folded.max_output
        ));
        if bn.provenance.eps == Source::Assumed {
            report.push(format!(
                "note: {bn_name}: eps {:e} is assumed ({}'s default; the file does not store \
                 it) and the probe used it too: give --eps {}=E if the layer was built with \
                 another",
                bn.eps, bn.format, bn.name
            ));
        }
    }
    ckpt.write(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    // Printed once the file is written, so that a closed stdout cannot leave it unwritten.
    for line in report {
        outln!("{line}")?;
    }
    outln!("wrote {}", args.output.display())?;
    Ok(0)
}

/// Applies `--rename OLD=NEW` to every tensor name and layer metadata key; refuses a rule
/// that matches nothing and a rename onto an existing name.
fn rename(ckpt: &mut Checkpoint, rules: &[(String, String)]) -> Result<()> {
    if rules.is_empty() {
        return Ok(());
    }
    for (old, _) in rules {
        if !ckpt.tensors.keys().any(|k| k.starts_with(old.as_str())) {
            bail!(
                "--rename {old:?}: no converted tensor name starts with {old:?} (names are \
                 matched after conversion: Keras and Flax ones put `/` before the leaf)"
            );
        }
    }
    let map = |name: &str| -> String {
        for (old, new) in rules {
            if let Some(rest) = name.strip_prefix(old.as_str()) {
                return format!("{new}{rest}");
            }
        }
        name.to_string()
    };
    let mut tensors = std::collections::BTreeMap::new();
    for (name, t) in std::mem::take(&mut ckpt.tensors) {
        let renamed = map(&name);
        if renamed.is_empty() {
            bail!("--rename leaves {name:?} without a name");
        }
        if let Some(_clash) = tensors.insert(renamed.clone(), t) {
            bail!("--rename gives two tensors the name {renamed:?}");
        }
    }
    ckpt.tensors = tensors;
    ckpt.metadata = std::mem::take(&mut ckpt.metadata)
        .into_iter()
        .map(|(k, v)| match k.strip_prefix("bnorm.layer.") {
            Some(rest) => (format!("bnorm.layer.{}", map(rest)), v),
            None => (k, v),
        })
        .collect();
    Ok(())
}

/// `bnorm convert IN OUT --to keras|torch|flax [--batch-size N | --keep-variance]`.
pub fn convert(args: &ConvertArgs) -> Result<u8> {
    let (_, mut ckpt) = read(&args.input)?;
    let mut layers = ckpt.layers()?;
    let left = weight_and_bias_only(&ckpt, &layers);
    if layers.is_empty() {
        bail!(
            "no batch-norm layer with running statistics found in {}{}",
            args.input.display(),
            if left.is_empty() {
                ""
            } else {
                " (only layers with weight and bias alone: see `bnorm inspect`)"
            }
        );
    }
    for (old, _) in &args.rename {
        if !ckpt.tensors.keys().any(|k| k.starts_with(old.as_str())) {
            bail!("--rename {old:?}: no tensor name starts with {old:?}");
        }
    }
    apply_conventions(&mut layers, &args.conventions)?;
    for (name, _) in &args.batch_size {
        if let Some(name) = name {
            if !layers.iter().any(|l| &l.name == name) {
                bail!("--batch-size names {name:?}, which is not a batch-norm layer of the file");
            }
        }
    }
    let default = args
        .batch_size
        .iter()
        .find(|(l, _)| l.is_none())
        .map(|b| b.1);
    let mut report = Vec::new();
    for layer in &layers {
        let own = args
            .batch_size
            .iter()
            .find(|(l, _)| l.as_deref() == Some(layer.name.as_str()))
            .map(|b| b.1);
        let opts = ConvertOptions {
            batch_size: own.or(default),
            keep_variance: args.keep_variance,
        };
        let (converted, notes) = layer.convert(args.to, &opts)?;
        ckpt.remove_layer(&layer.name, layer.format);
        ckpt.insert_layer(&converted, layer.dtype)?;
        report.extend(notes.iter().map(note_text));
    }
    if args.to != Format::Torch {
        for l in &left {
            report.push(format!(
                "note: {}: left under its PyTorch names, not converted: {WEIGHT_AND_BIAS_ONLY}",
                l.name
            ));
        }
    }
    rename(&mut ckpt, &args.rename)?;
    ckpt.write(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    // Printed once the file is written, so that a closed stdout cannot leave it unwritten.
    for line in report {
        outln!("{line}")?;
    }
    outln!(
        "converted {} layer(s) to {}; wrote {}",
        layers.len(),
        args.to,
        args.output.display()
    )?;
    Ok(0)
}
