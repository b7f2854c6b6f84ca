//! `bnorm inspect`, `bnorm fold`, `bnorm convert`: batch-norm layers in safetensors
//! checkpoints.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bnorm::interop::{
    fold_into_preceding, inspect as health, BnAffine, Checkpoint, ConvertOptions, Format, Layer,
    LinearKind, Tensor,
};
use bnorm::{Momentum, VarianceEstimator};
use clap::Args;
use serde_json::json;

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
    /// Target convention: torch, keras or flax.
    #[arg(long, value_parser = parse_format)]
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

fn parse_format(s: &str) -> std::result::Result<Format, String> {
    Format::parse(s).ok_or_else(|| format!("unknown format {s:?}: use torch, keras or flax"))
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

/// `bnorm inspect FILE [--json]`.
pub fn inspect(args: &InspectArgs) -> Result<ExitCode> {
    let ckpt = read(&args.file)?;
    let layers = ckpt
        .layers()
        .with_context(|| format!("reading the batch-norm layers of {}", args.file.display()))?;
    if args.json {
        let out: Vec<_> = layers
            .iter()
            .map(|l| {
                json!({
                    "name": l.name,
                    "format": l.format.name(),
                    "channels": l.channels,
                    "dtype": l.dtype.name(),
                    "eps": l.eps,
                    "momentum": momentum(l.momentum),
                    "running_variance": variance(l.variance),
                    "conventions": if l.conventions_recorded { "recorded" } else { "assumed from format defaults" },
                    "affine": { "scale": l.weight.is_some(), "center": l.bias.is_some() },
                    "num_batches_tracked": l.num_batches_tracked,
                    "problems": health(l).iter().map(|p| p.code()).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
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
        let count = l
            .num_batches_tracked
            .map_or(String::new(), |n| format!(", {n} updates"));
        println!(
            "{:<32} {:>5} ch  {:<4} {} ({conv}: eps {:e}, momentum {}, {} variance{count})  {}",
            l.name,
            l.channels,
            l.dtype.name(),
            l.format,
            l.eps,
            momentum(l.momentum),
            variance(l.variance),
            if problems.is_empty() {
                "ok"
            } else {
                "PROBLEMS"
            }
        );
        for p in &problems {
            println!("    {:<28} {}", p.code(), p.explain());
        }
        unhealthy += usize::from(!problems.is_empty());
    }
    println!(
        "{} batch-norm layer(s), {unhealthy} with problems",
        layers.len()
    );
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
        println!(
            "folded {bn_name} into {name} ({dtype}): max error {:.3e} on a probe (max |output| {:.3e})",
            folded.max_error, folded.max_output
        );
    }
    ckpt.write(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!("wrote {}", args.output.display());
    Ok(ExitCode::SUCCESS)
}

/// `bnorm convert IN OUT --to keras|torch|flax [--batch-size N | --keep-variance]`.
pub fn convert(args: &ConvertArgs) -> Result<ExitCode> {
    let mut ckpt = read(&args.input)?;
    let layers = ckpt.layers()?;
    if layers.is_empty() {
        bail!("no batch-norm layer found in {}", args.input.display());
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
        for n in notes {
            println!("{n}");
        }
    }
    ckpt.write(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!(
        "converted {} layer(s) to {}; wrote {}",
        layers.len(),
        args.to,
        args.output.display()
    );
    Ok(ExitCode::SUCCESS)
}
