//! `bnorm inspect`, `bnorm fold`, `bnorm convert`: batch-norm layers in safetensors
//! checkpoints.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bnorm::{Momentum, VarianceEstimator};
use bnorm_interop::{
    fold_into_preceding, inspect as health, BnAffine, Checkpoint, ConvertOptions, Format, Layer,
    LinearKind, Tensor,
};
use clap::Args;
use serde_json::json;

use crate::convention;

/// Arguments of `bnorm inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The safetensors checkpoint.
    pub file: PathBuf,
    /// Print a JSON array, one object per layer (name, channels, problems, ...).
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `bnorm fold`.
#[derive(Args, Debug)]
pub struct FoldArgs {
    /// The input checkpoint (PyTorch names and weight layouts).
    pub input: PathBuf,
    /// Where to write the folded checkpoint (atomically).
    pub output: PathBuf,
    /// Comma-separated `LAYER:BN` pairs, batch norm BN directly after LAYER (`<LAYER>.weight`,
    /// optional `<LAYER>.bias`): a linear or convolution layer; append `:transposed=G` for
    /// a transposed convolution with G groups (`:transposed` for one group).
    #[arg(long, value_delimiter = ',', required = true)]
    pub pairs: Vec<String>,
}

/// Arguments of `bnorm convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The input checkpoint.
    pub input: PathBuf,
    /// Where to write the converted checkpoint (atomically).
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
}

fn parse_batch_size(s: &str) -> std::result::Result<(Option<String>, usize), String> {
    let (layer, n) = match s.rsplit_once('=') {
        Some((l, n)) => (Some(l.to_string()), n),
        None => (None, s),
    };
    let n: usize = n
        .parse()
        .map_err(|_| format!("bad batch size {s:?}: expected N or LAYER=N"))?;
    Ok((layer, n))
}

fn read(path: &Path) -> Result<Checkpoint> {
    Checkpoint::read(path).with_context(|| format!("reading {}", path.display()))
}

fn momentum(m: Momentum) -> String {
    match m {
        Momentum::NewWeight(a) => format!("new_weight {a}"),
        Momentum::Cumulative => "cumulative".into(),
        Momentum::Decay(d) => format!("decay {d}"),
        Momentum::DebiasedDecay(d) => format!("debiased_decay {d}"),
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

/// `bnorm inspect FILE [--json]`.
pub fn inspect(args: &InspectArgs) -> Result<ExitCode> {
    let ckpt = read(&args.file)?;
    let mut layers = ckpt
        .layers()
        .with_context(|| format!("reading the batch-norm layers of {}", args.file.display()))?;
    let guessed = weight_and_bias_only(&ckpt, &layers);
    let is_guessed = |l: &Layer| guessed.iter().any(|g| g.name == l.name);
    layers.extend(guessed.iter().cloned());
    layers.sort_by(|a, b| a.name.cmp(&b.name));
    if args.json {
        let out: Vec<_> = layers
            .iter()
            .map(|l| {
                let tracked = l.running_mean.is_some();
                json!({
                    "name": l.name,
                    "format": l.format.name(),
                    "channels": l.channels,
                    "dtype": l.dtype.name(),
                    "eps": l.eps,
                    "running_statistics": tracked,
                    "momentum": tracked.then(|| momentum(l.momentum)),
                    "running_variance": tracked.then(|| variance(l.variance)),
                    "conventions": if l.conventions_recorded { "recorded" } else { "assumed from format defaults" },
                    "affine": { "scale": l.weight.is_some(), "center": l.bias.is_some() },
                    "num_batches_tracked": l.num_batches_tracked,
                    "found_by": if is_guessed(l) { "weight_and_bias_only" } else { "names" },
                    "problems": health(l).iter().map(|p| p.code()).collect::<Vec<_>>(),
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&out)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut unhealthy = 0;
    for l in &layers {
        let problems = health(l);
        let conv = if l.conventions_recorded {
            "recorded"
        } else {
            "guessed from names"
        };
        let details = if l.running_mean.is_none() {
            format!(
                "no running statistics: normalizes with batch statistics even at inference; \
                 eps {:e}",
                l.eps
            )
        } else {
            let count = l
                .num_batches_tracked
                .map_or(String::new(), |n| format!(", {n} updates"));
            format!(
                "{conv}: eps {:e}, momentum {}, {} variance{count}",
                l.eps,
                momentum(l.momentum),
                variance(l.variance)
            )
        };
        outln!(
            "{:<32} {:>5} ch  {:<4} {} ({details})  {}",
            l.name,
            l.channels,
            l.dtype.name(),
            l.format,
            if problems.is_empty() {
                "ok"
            } else {
                "PROBLEMS"
            }
        )?;
        for p in &problems {
            outln!("    {:<28} {}", p.code(), p.explain())?;
        }
        if is_guessed(l) {
            outln!("    ({WEIGHT_AND_BIAS_ONLY})")?;
        }
        unhealthy += usize::from(!problems.is_empty());
    }
    let without = layers.iter().filter(|l| l.running_mean.is_none()).count();
    outln!(
        "{} batch-norm layer(s), {unhealthy} with problems{}",
        layers.len(),
        if without > 0 {
            format!(", {without} without running statistics")
        } else {
            String::new()
        }
    )?;
    Ok(ExitCode::SUCCESS)
}

fn parse_pair(spec: &str) -> Result<(String, String, LinearKind)> {
    let parts: Vec<&str> = spec.split(':').collect();
    let kind = match parts.get(2).copied() {
        None => None,
        Some("transposed") => Some(LinearKind::ConvTranspose { groups: 1 }),
        Some(t) => match t.strip_prefix("transposed=").map(str::parse::<usize>) {
            Some(Ok(g)) if g >= 1 => Some(LinearKind::ConvTranspose { groups: g }),
            _ => bail!("bad pair {spec:?}: the third part must be `transposed` or `transposed=G`"),
        },
    };
    match parts.as_slice() {
        [layer, bn, ..] if parts.len() <= 3 && !layer.is_empty() && !bn.is_empty() => {
            let kind = kind.unwrap_or(LinearKind::Conv { groups: 1 });
            Ok((layer.to_string(), bn.to_string(), kind))
        }
        _ => bail!("bad pair {spec:?}: expected LAYER:BN or LAYER:BN:transposed=G"),
    }
}

fn find_layer(layers: &[Layer], ckpt: &Checkpoint, name: &str) -> Result<Layer> {
    if let Some(l) = layers.iter().find(|l| l.name == name) {
        return Ok(l.clone());
    }
    Ok(ckpt.layer(name, Format::Torch)?)
}

/// `bnorm fold IN OUT --pairs conv1:bn1,...`.
pub fn fold(args: &FoldArgs) -> Result<ExitCode> {
    let mut ckpt = read(&args.input)?;
    let layers = ckpt.layers()?;
    let mut report = Vec::new();
    for spec in &args.pairs {
        let (name, bn_name, kind) = parse_pair(spec)?;
        let bn = find_layer(&layers, &ckpt, &bn_name)?;
        let affine = BnAffine::from_layer(&bn).with_context(|| format!("folding {bn_name}"))?;
        let wname = format!("{name}.weight");
        let bname = format!("{name}.bias");
        let w = ckpt
            .tensors
            .get(&wname)
            .with_context(|| format!("no tensor {wname} (fold expects PyTorch names)"))?;
        let dtype = w
            .float_dtype()
            .with_context(|| format!("{wname} is not a floating-point tensor"))?;
        let kind = match kind {
            LinearKind::Conv { .. } if w.shape.len() == 2 => LinearKind::Linear,
            k => k,
        };
        let shape = w.shape.clone();
        let weight = w.to_f64(&wname)?;
        let bias = ckpt
            .tensors
            .get(&bname)
            .map(|t| t.to_f64(&bname))
            .transpose()?;
        let folded = fold_into_preceding(&weight, &shape, bias.as_deref(), kind, &affine, dtype)
            .with_context(|| format!("folding {bn_name} into {name}"))?;
        ckpt.remove_layer(&bn.name, bn.format);
        let out_ch = folded.bias.len();
        ckpt.tensors
            .insert(wname, Tensor::from_f64(&folded.weight, shape, dtype));
        ckpt.tensors
            .insert(bname, Tensor::from_f64(&folded.bias, vec![out_ch], dtype));
        report.push(format!(
            "folded {bn_name} into {name} ({dtype}): max error {:.3e} on a probe (max |output| {:.3e})",
            folded.max_error, folded.max_output
        ));
    }
    ckpt.write(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    // Printed once the file is written, so that a closed stdout cannot leave it unwritten.
    for line in report {
        outln!("{line}")?;
    }
    outln!("wrote {}", args.output.display())?;
    Ok(ExitCode::SUCCESS)
}

/// `bnorm convert IN OUT --to keras|torch|flax [--batch-size N | --keep-variance]`.
pub fn convert(args: &ConvertArgs) -> Result<ExitCode> {
    let mut ckpt = read(&args.input)?;
    let layers = ckpt.layers()?;
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
        report.extend(notes.iter().map(ToString::to_string));
    }
    if args.to != Format::Torch {
        for l in &left {
            report.push(format!(
                "note: {}: left under its PyTorch names, not converted: {WEIGHT_AND_BIAS_ONLY}",
                l.name
            ));
        }
    }
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
    Ok(ExitCode::SUCCESS)
}
