//! `bnorm demo`: train a small convolutional network whose every normalization is a bnorm
//! layer, then answer the classic question by experiment — what happens to test accuracy
//! when batch norm uses the running statistics, per-example statistics, whole-test-set
//! statistics, or statistics that were never updated.

mod data;
mod model;
mod plot;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use bnorm::{Mode, RunningState};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

pub use crate::convention::Convention;
use model::Net;

/// Options of `bnorm demo` (also the default command).
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Training epochs.
    #[arg(long, default_value_t = 12)]
    pub epochs: usize,
    /// Training batch size (at least 2: batch statistics need two values per channel).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Batch-norm conventions (framework defaults) of every layer; the same names as
    /// `convert --to` and the conformance files.
    #[arg(long, value_enum, ignore_case = true, default_value_t = Convention::Torch)]
    pub convention: Convention,
    /// Momentum, in the convention's own meaning (torch: new-batch weight; keras, flax:
    /// decay; tf: zero-debiased decay).
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Seed of the weight initialization and the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Train on MNIST from the standard IDX files in DIR instead of the embedded digits.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Where to write the PNG plot.
    #[arg(long, default_value = "bnorm-demo.png")]
    pub plot: PathBuf,
    /// Write every printed number as JSON to FILE.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            epochs: 12,
            batch_size: 32,
            convention: Convention::Torch,
            momentum: None,
            seed: 0,
            threads: None,
            data: None,
            plot: PathBuf::from("bnorm-demo.png"),
            report: None,
        }
    }
}

/// Checks that a file can be created at `path` (its directory exists and is writable)
/// before spending time on training.
fn check_writable(path: &Path, what: &str) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    ensure!(
        dir.is_dir(),
        "{what} {}: directory {} does not exist",
        path.display(),
        dir.display()
    );
    let probe = dir.join(format!(".bnorm-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| {
        format!(
            "{what} {}: cannot write in {}",
            path.display(),
            dir.display()
        )
    })?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, then a
/// rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().context("output path has no file name")?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn images(d: &data::Dataset, idx: &[usize]) -> Result<(Tensor, Tensor)> {
    let s = d.select(idx);
    let x = Tensor::from_vec(s.pixels, (idx.len(), 1, d.height, d.width), &Device::Cpu)?;
    let y = Tensor::from_vec(
        s.labels.iter().map(|&l| l as u32).collect::<Vec<_>>(),
        idx.len(),
        &Device::Cpu,
    )?;
    Ok((x, y))
}

fn correct(logits: &Tensor, labels: &Tensor) -> Result<usize> {
    let pred = logits.argmax(D::Minus1)?;
    Ok(pred
        .eq(labels)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as usize)
}

/// Accuracy over `d` in `mode`, `chunk` examples per forward call; training-mode
/// evaluation leaves no trace in the running statistics.
fn accuracy(net: &Net, d: &data::Dataset, mode: Mode, chunk: usize) -> Result<f64> {
    let snap = net.snapshot()?;
    let mut ok = 0;
    let all: Vec<usize> = (0..d.len()).collect();
    let result = (|| -> Result<()> {
        for part in all.chunks(chunk.max(1)) {
            let (x, y) = images(d, part)?;
            ok += correct(&net.forward(&x, mode)?, &y)?;
        }
        Ok(())
    })();
    net.restore(&snap)?;
    result?;
    Ok(ok as f64 / d.len().max(1) as f64)
}

/// Runs the demo; returns the report it printed.
pub fn run(args: &DemoArgs) -> Result<Value> {
    let start = Instant::now();
    ensure!(args.epochs >= 1, "--epochs must be at least 1");
    ensure!(
        args.batch_size >= 2,
        "--batch-size must be at least 2: batch statistics need two values per channel"
    );
    if let Some(t) = args.threads {
        ensure!(t >= 1, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .ok();
    }
    check_writable(&args.plot, "--plot")?;
    if let Some(r) = &args.report {
        check_writable(r, "--report")?;
    }
    let (train, test, source) = match &args.data {
        None => {
            let (a, b) = data::digits()?;
            (a, b, "UCI optical digits (8×8), embedded".to_string())
        }
        Some(dir) => {
            let (a, b) = data::mnist(dir)?;
            (a, b, format!("IDX files in {}", dir.display()))
        }
    };
    if args.batch_size > train.len() {
        bail!(
            "--batch-size {} is larger than the training set ({} examples)",
            args.batch_size,
            train.len()
        );
    }
    let cfg0 = args.convention.config(model::CHANNELS[0], args.momentum);
    cfg0.validate().context("--momentum")?;

    let vm = VarMap::new();
    let net = Net::new(
        &vm,
        args.convention,
        args.momentum,
        train.height,
        train.width,
        args.seed,
    )?;
    let mut opt = AdamW::new(
        vm.all_vars(),
        ParamsAdamW {
            lr: 3e-3,
            weight_decay: 1e-4,
            ..Default::default()
        },
    )?;

    outln!(
        "bnorm demo: {} | {} training / {} test images | convention {} | batch {} | {} epochs | seed {}",
        source, train.len(), test.len(), args.convention.name(), args.batch_size, args.epochs, args.seed
    )?;
    let tty = std::io::stderr().is_terminal();
    let mut epochs = Vec::new();
    for epoch in 1..=args.epochs {
        let mut order: Vec<usize> = (0..train.len()).collect();
        data::shuffle(
            &mut order,
            args.seed.wrapping_mul(1000).wrapping_add(epoch as u64),
        );
        // A last batch of one example has no batch statistics: it is dropped.
        let batches: Vec<&[usize]> = order
            .chunks(args.batch_size)
            .filter(|b| b.len() >= 2)
            .collect();
        let bar = if tty {
            ProgressBar::new(batches.len() as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix:>2} [{bar:30}] {pos}/{len} {msg}")
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .progress_chars("=> "),
        );
        bar.set_prefix(epoch.to_string());
        let (mut loss_sum, mut seen, mut ok) = (0.0, 0usize, 0usize);
        for batch in &batches {
            let (x, y) = images(&train, batch)?;
            let logits = net.forward(&x, Mode::Train)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            opt.backward_step(&loss)?;
            loss_sum += loss.to_scalar::<f32>()? as f64 * batch.len() as f64;
            seen += batch.len();
            ok += correct(&logits, &y)?;
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.4} acc {:.3}",
                loss_sum / seen as f64,
                ok as f64 / seen as f64
            ));
        }
        bar.finish_and_clear();
        let test_inference = accuracy(&net, &test, Mode::Inference, 256)?;
        let test_train = accuracy(&net, &test, Mode::Train, args.batch_size)?;
        let e = json!({
            "epoch": epoch,
            "loss": loss_sum / seen as f64,
            "train_accuracy": ok as f64 / seen as f64,
            "test_accuracy_inference": test_inference,
            "test_accuracy_train_mode": test_train,
        });
        outln!(
            "epoch {epoch:>2}: loss {:.4}  train acc {:.3}  test acc: inference mode {:.3}, training mode (batches of {}) {:.3}",
            loss_sum / seen as f64, ok as f64 / seen as f64, test_inference, args.batch_size, test_train
        )?;
        epochs.push(e);
    }

    // The experiment: one trained network, five ways to normalize at test time.
    let row = |mode: Mode, chunk: usize| -> (Value, String) {
        match accuracy(&net, &test, mode, chunk) {
            Ok(a) => (json!(a), format!("{:.1}%", a * 100.0)),
            Err(e) => (Value::Null, format!("refused: {e}")),
        }
    };
    let (running, running_s) = row(Mode::Inference, 256);
    let (batch1, batch1_s) = row(Mode::Train, 1);
    let (full, full_s) = row(Mode::Train, test.len());
    let snap = net.snapshot()?;
    for bn in &net.bns {
        if let Some(fresh) = RunningState::init(bn.config()) {
            bn.set_running_state(fresh)?;
        }
    }
    let (never, never_s) = row(Mode::Inference, 256);
    net.restore(&snap)?;
    // Drift between the last training batches' statistics and the running statistics,
    // measured before anything below touches the running statistics.
    let drift: Vec<Value> = net
        .bns
        .iter()
        .enumerate()
        .filter_map(|(i, bn)| {
            let recent = bn.recent_batch_stats();
            let s = bn.running_state().ok().flatten()?;
            let c = s.mean.len();
            let eps = bn.config().get_eps();
            let k = recent.len().max(1) as f64;
            let (mut sum_shift, mut max_shift, mut sum_ratio) = (0.0f64, 0.0f64, 0.0f64);
            for ch in 0..c {
                let bm = recent.iter().map(|r| r.mean[ch]).sum::<f64>() / k;
                let bv = recent.iter().map(|r| r.var[ch]).sum::<f64>() / k;
                let shift = (bm - s.mean[ch]).abs() / (s.var[ch] + eps).sqrt();
                sum_shift += shift;
                max_shift = max_shift.max(shift);
                sum_ratio += bv / (s.var[ch] + eps);
            }
            Some(
                json!({"layer": format!("bn{i}"), "channels": c, "batches": recent.len(),
                "mean_abs_mean_shift": sum_shift / c as f64, "max_abs_mean_shift": max_shift,
                "mean_variance_ratio": sum_ratio / c as f64}),
            )
        })
        .collect();
    // 5. Precise BN: replace the running averages by the population statistics of the
    // training set (exact count-weighted merges over its batches), then infer.
    let recal_batches: Vec<Tensor> = (0..train.len())
        .collect::<Vec<_>>()
        .chunks(args.batch_size)
        .filter(|b| b.len() >= 2)
        .map(|b| images(&train, b).map(|(x, _)| x))
        .collect::<Result<_>>()?;
    let layers: Vec<&bnorm_candle::BatchNorm> = net.bns.iter().collect();
    bnorm_candle::recalibrate(&layers, recal_batches.iter(), |x| {
        net.forward(x, Mode::Inference)
    })?;
    let (recal, recal_s) = row(Mode::Inference, 256);

    outln!()?;
    outln!("Test accuracy of the same trained network, by what batch norm normalizes with:")?;
    outln!(
        "  {:<58} {:>10}",
        "batch-norm statistics used at test time",
        "accuracy"
    )?;
    let rows = [
        ("1. running statistics (inference mode — the right way)", &running_s,
         "The running averages estimate the training population, so each example is normalized as in training, independently of its batch."),
        ("2. each test example alone, training mode (batch size 1)", &batch1_s,
         "Each channel is normalized over one image's own positions (2×2 in the last layer): its mean is forced to 0 before global pooling, so the features no longer say how strongly each pattern is present."),
        ("3. whole test set as one batch, training mode", &full_s,
         "A large batch from the same distribution has nearly the population statistics, so this comes close to row 1 — but only because the batch is big and i.i.d."),
        ("4. running statistics never updated (mean 0, variance 1)", &never_s,
         "Normalizing with 0 and 1 leaves activations unnormalized, so gamma and beta act on the wrong scale, as when a TF1 program forgets its update ops."),
        ("5. running statistics recalibrated on the training set", &recal_s,
         "Exact population statistics of each layer's input over all training batches replace the moving averages, which lag behind the last weights."),
    ];
    for (name, acc, why) in rows {
        outln!("  {name:<58} {acc:>10}")?;
        outln!("       {why}")?;
    }

    outln!()?;
    outln!(
        "Drift of the last training batches' statistics from the running statistics, per layer"
    )?;
    outln!("(measured before recalibration):")?;
    outln!(
        "  {:<6} {:>8} {:>22} {:>22} {:>18}",
        "layer",
        "channels",
        "mean |Δμ|/σ_running",
        "max |Δμ|/σ_running",
        "mean σ²_batch/σ²_run"
    )?;
    for d in &drift {
        outln!(
            "  {:<6} {:>8} {:>22.4} {:>22.4} {:>18.4}",
            d["layer"].as_str().unwrap_or(""),
            d["channels"].as_u64().unwrap_or(0),
            d["mean_abs_mean_shift"].as_f64().unwrap_or(f64::NAN),
            d["max_abs_mean_shift"].as_f64().unwrap_or(f64::NAN),
            d["mean_variance_ratio"].as_f64().unwrap_or(f64::NAN)
        )?;
    }
    outln!(
        "  (Δμ: average batch mean of the last {} training batches minus the running mean.)",
        bnorm_candle::RECENT_BATCHES
    )?;

    let accuracy = json!({
        "running": running,
        "batch1_train": batch1,
        "full_batch_train": full,
        "never_updated": never,
        "recalibrated": recal,
    });
    plot::write(&args.plot, &epochs, &plot::bars(&accuracy)?)?;
    outln!()?;
    outln!("plot written to {}", args.plot.display())?;
    let seconds = start.elapsed().as_secs_f64();
    let report = json!({
        "data": source,
        "convention": args.convention.name(),
        "batch_size": args.batch_size,
        "seed": args.seed,
        "accuracy": accuracy,
        "errors": {
            "running": running.is_null().then_some(&running_s),
            "batch1_train": batch1.is_null().then_some(&batch1_s),
            "full_batch_train": full.is_null().then_some(&full_s),
            "never_updated": never.is_null().then_some(&never_s),
            "recalibrated": recal.is_null().then_some(&recal_s),
        },
        "drift": drift,
        "epochs": epochs,
        "seconds": seconds,
    });
    if let Some(r) = &args.report {
        write_atomic(r, serde_json::to_string_pretty(&report)?.as_bytes())?;
        outln!("report written to {}", r.display())?;
    }
    outln!("finished in {seconds:.1} s")?;
    Ok(report)
}
