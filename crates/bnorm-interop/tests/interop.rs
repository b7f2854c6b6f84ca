//! Interop: checkpoints of each format, a real PyTorch checkpoint, conversion, folding,
//! inspection, hostile files, atomic writes.

mod common;

use std::path::{Path, PathBuf};

use bnorm::element::DType;
use bnorm::expert::RenormState;
use bnorm::{Config, Layout, Mode, Momentum, Params, VarianceEstimator};
use bnorm_interop::{
    fold_into_following, fold_into_preceding, inspect, read_layers, write_atomic, BnAffine,
    Checkpoint, ConvertOptions, Format, InteropError, Layer, LinearKind, Problem, Tensor,
};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Deterministic values in [lo, hi).
fn values(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            lo + (hi - lo) * ((s >> 11) as f64 / (1u64 << 53) as f64)
        })
        .collect()
}

fn io_tensor(io: &Checkpoint, name: &str) -> (Vec<usize>, Vec<f64>) {
    let t = &io.tensors[name];
    (t.shape.clone(), t.to_f64(name).unwrap())
}

// ---------------------------------------------------------------- the PyTorch checkpoint

#[test]
fn real_pytorch_checkpoint_reproduces_pytorch_eval_outputs() {
    let ckpt = Checkpoint::read(&data("torch_bn.safetensors")).unwrap();
    let io = Checkpoint::read(&data("torch_bn_io.safetensors")).unwrap();
    let layers = ckpt.layers().unwrap();
    let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
    // bn2 has track_running_stats=False: only weight and bias, not found by names.
    assert_eq!(names, ["bn1", "bn3", "bn4"]);
    for l in &layers {
        assert_eq!(l.format, Format::Torch);
        assert_eq!(l.dtype, DType::F32);
        assert_eq!(
            l.num_batches_tracked,
            Some(5),
            "{}: five training steps",
            l.name
        );
        assert!(inspect(l).is_empty(), "{}: {:?}", l.name, inspect(l));
    }
    assert_eq!(layers[0].channels, 4);
    assert!(layers[1].weight.is_none() && layers[1].bias.is_none()); // affine=False
    assert_eq!(layers[2].channels, 5);

    let mut bn2 = ckpt.layer("bn2", Format::Torch).unwrap();
    assert!(bn2.running_mean.is_none());
    assert_eq!(inspect(&bn2), vec![Problem::NoRunningStatistics]);
    bn2.eps = 1e-5;

    let mut bn3 = layers[1].clone();
    bn3.momentum = Momentum::NewWeight(0.3); // not stored by PyTorch; irrelevant in eval
    let mut bn4 = layers[2].clone();
    bn4.eps = 1e-3; // PyTorch does not store eps: the model was built with eps=1e-3

    let cases = [
        (layers[0].clone(), "bn1", Layout::NCHW),
        (bn2, "bn2", Layout::NCHW),
        (bn3, "bn3", Layout::NCHW),
        (bn4.clone(), "bn4", Layout::NC),
    ];
    for (layer, name, layout) in cases {
        let (shape, x) = io_tensor(&io, &format!("{name}.x"));
        let (_, want) = io_tensor(&io, &format!("{name}.y"));
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let mut bn = layer.to_batchnorm().unwrap();
        let (y, _) = bn.forward(&x32, &shape, layout, Mode::Inference).unwrap();
        let worst = y
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (a as f64 - b).abs() / b.abs().max(1.0))
            .fold(0.0, f64::max);
        assert!(worst < 5e-6, "{name}: worst relative error {worst}");
    }

    // With PyTorch's default eps assumed, bn4 drifts visibly: eps must be carried.
    let mut wrong = bn4;
    wrong.eps = 1e-5;
    let (shape, x) = io_tensor(&io, "bn4.x");
    let (_, want) = io_tensor(&io, "bn4.y");
    let (y, _) = wrong
        .to_batchnorm()
        .unwrap()
        .forward(&x, &shape, Layout::NC, Mode::Inference)
        .unwrap();
    let worst = y
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        worst > 1e-4,
        "eps 1e-5 vs 1e-3 should be visible, got {worst}"
    );
}

#[test]
fn folding_the_real_conv_bn_pair_matches_pytorch_fusion() {
    let ckpt = Checkpoint::read(&data("torch_bn.safetensors")).unwrap();
    let io = Checkpoint::read(&data("torch_bn_io.safetensors")).unwrap();
    let bn1 = ckpt.layer("bn1", Format::Torch).unwrap();
    let w = &ckpt.tensors["conv1.weight"];
    let b = ckpt.tensors["conv1.bias"].to_f64("conv1.bias").unwrap();
    let folded = fold_into_preceding(
        &w.to_f64("conv1.weight").unwrap(),
        &w.shape,
        Some(&b),
        LinearKind::Conv { groups: 1 },
        &BnAffine::from_layer(&bn1).unwrap(),
        DType::F32,
    )
    .unwrap();
    let (_, tw) = io_tensor(&io, "fused1.weight");
    let (_, tb) = io_tensor(&io, "fused1.bias");
    for (got, want) in folded
        .weight
        .iter()
        .zip(&tw)
        .chain(folded.bias.iter().zip(&tb))
    {
        assert!(
            (got - want).abs() <= 2.0 * f32::EPSILON as f64 * want.abs().max(1e-3),
            "{got} vs torch {want}"
        );
    }
    assert!(folded.max_error < 1e-5 * folded.max_output.max(1.0));
}

// ------------------------------------------------------------------------ round trips

fn sample_layer(name: &str, format: Format, c: usize, seed: u64) -> Layer {
    let mut l = Layer::new(name, format, c);
    l.weight = Some(values(seed, c, 0.5, 2.0));
    l.bias = Some(values(seed + 1, c, -1.0, 1.0));
    l.running_mean = Some(values(seed + 2, c, -3.0, 3.0));
    l.running_var = Some(values(seed + 3, c, 0.1, 4.0));
    if format == Format::Torch {
        l.num_batches_tracked = Some(1234);
    }
    l.eps = 2e-4;
    l.momentum = match format {
        Format::Torch => Momentum::NewWeight(0.05),
        _ => Momentum::Decay(0.9),
    };
    l.conventions_recorded = true;
    l.provenance = bnorm_interop::Provenance::all(bnorm_interop::Source::Recorded);
    l
}

#[test]
fn every_format_round_trips_exactly_in_f64() {
    for format in Format::ALL {
        let mut a = sample_layer("block.0.bn", format, 6, 11);
        let mut b = sample_layer("head_bn", format, 3, 17);
        b.weight = None; // scale=False
        if format == Format::Keras {
            a.renorm = Some(RenormState {
                mean: values(5, 6, -1.0, 1.0),
                stddev: values(6, 6, 0.5, 1.5),
                moving_stddev: values(7, 6, 0.5, 1.5),
            });
        }
        a.dtype = DType::F64;
        b.dtype = DType::F64;
        let mut ckpt = Checkpoint::default();
        ckpt.insert_layer(&a, DType::F64).unwrap();
        ckpt.insert_layer(&b, DType::F64).unwrap();
        ckpt.tensors.insert(
            "other.weight".into(),
            Tensor::from_f64(&[1.0, 2.0], vec![1, 2], DType::F32),
        );
        let back = read_layers(&ckpt.to_bytes().unwrap()).unwrap();
        assert_eq!(back, vec![a.clone(), b.clone()], "{format}");
        // Non-batch-norm tensors survive byte for byte.
        let again = Checkpoint::from_bytes(&ckpt.to_bytes().unwrap()).unwrap();
        assert_eq!(again, ckpt);
    }
}

#[test]
fn each_format_uses_its_framework_names() {
    let expect: [(Format, &[&str]); 3] = [
        (
            Format::Torch,
            &[
                "bn.bias",
                "bn.num_batches_tracked",
                "bn.running_mean",
                "bn.running_var",
                "bn.weight",
            ],
        ),
        (
            Format::Keras,
            &[
                "bn/beta",
                "bn/gamma",
                "bn/moving_mean",
                "bn/moving_variance",
            ],
        ),
        (
            Format::Flax,
            &[
                "batch_stats/bn/mean",
                "batch_stats/bn/var",
                "params/bn/bias",
                "params/bn/scale",
            ],
        ),
    ];
    for (format, names) in expect {
        let mut ckpt = Checkpoint::default();
        ckpt.insert_layer(&Layer::new("bn", format, 2), DType::F32)
            .unwrap();
        let got: Vec<&str> = ckpt.tensors.keys().map(String::as_str).collect();
        assert_eq!(got, names, "{format}");
    }
    // A PyTorch num_batches_tracked is a 0-d int64, as torch saves it.
    let mut ckpt = Checkpoint::default();
    ckpt.insert_layer(&Layer::new("bn", Format::Torch, 2), DType::F32)
        .unwrap();
    let t = &ckpt.tensors["bn.num_batches_tracked"];
    assert_eq!((t.dtype, t.shape.len()), (safetensors::Dtype::I64, 0));
}

#[test]
fn f16_and_bf16_storage_round_once() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let l = sample_layer("bn", Format::Flax, 5, 3);
        let mut ckpt = Checkpoint::default();
        ckpt.insert_layer(&l, dtype).unwrap();
        let back = read_layers(&ckpt.to_bytes().unwrap()).unwrap().remove(0);
        assert_eq!(back.dtype, dtype);
        let round = |v: f64| match dtype {
            DType::F32 => v as f32 as f64,
            DType::F16 => bnorm::element::f16::from_f64(v).to_f64(),
            _ => bnorm::element::bf16::from_f64(v).to_f64(),
        };
        let want: Vec<f64> = l.running_var.unwrap().into_iter().map(round).collect();
        assert_eq!(back.running_var.unwrap(), want);
    }
}

#[test]
fn foreign_spellings_are_found() {
    let t = |v: &[f64]| Tensor::from_f64(v, vec![v.len()], DType::F32);
    let mut ckpt = Checkpoint::default();
    // TensorFlow variable names with :0, and Flax flattened with dots.
    ckpt.tensors
        .insert("model/bn/gamma:0".into(), t(&[1.0, 2.0]));
    ckpt.tensors
        .insert("model/bn/moving_mean:0".into(), t(&[0.5, 0.5]));
    ckpt.tensors
        .insert("model/bn/moving_variance:0".into(), t(&[2.0, 3.0]));
    ckpt.tensors
        .insert("params.BatchNorm_0.scale".into(), t(&[1.0]));
    ckpt.tensors
        .insert("batch_stats.BatchNorm_0.mean".into(), t(&[0.0]));
    ckpt.tensors
        .insert("batch_stats.BatchNorm_0.var".into(), t(&[0.25]));
    let layers = ckpt.layers().unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(
        (layers[0].name.as_str(), layers[0].format),
        ("BatchNorm_0", Format::Flax)
    );
    assert_eq!(layers[0].running_var, Some(vec![0.25]));
    assert_eq!(
        (layers[1].name.as_str(), layers[1].format),
        ("model/bn", Format::Keras)
    );
    assert_eq!(layers[1].weight, Some(vec![1.0, 2.0]));
    assert_eq!(layers[1].bias, None);
    assert_eq!(layers[1].eps, 1e-3); // Keras default assumed
}

// ------------------------------------------------------------------------ conversion

#[test]
fn conversion_refuses_a_variance_change_without_the_batch_size() {
    let torch = sample_layer("bn", Format::Torch, 3, 1);
    let err = torch
        .convert(Format::Keras, &ConvertOptions::default())
        .unwrap_err();
    assert!(matches!(err, InteropError::NeedBatchSize { .. }));
    assert!(err.to_string().contains("--batch-size"));
    let keras = sample_layer("bn", Format::Keras, 3, 1);
    assert!(matches!(
        keras.convert(Format::Torch, &ConvertOptions::default()),
        Err(InteropError::NeedBatchSize {
            from: "biased",
            to: "unbiased",
            ..
        })
    ));
    // Keras and Flax share the biased estimator: no batch size needed.
    let (flax, _) = keras
        .convert(Format::Flax, &ConvertOptions::default())
        .unwrap();
    assert_eq!(flax.running_var, keras.running_var);
}

#[test]
fn conversion_translates_momentum_keeps_eps_and_rescales_variance() {
    let torch = sample_layer("bn", Format::Torch, 4, 2);
    let opts = ConvertOptions {
        batch_size: Some(10),
        keep_variance: false,
    };
    let (keras, notes) = torch.convert(Format::Keras, &opts).unwrap();
    assert_eq!(keras.momentum, Momentum::Decay(0.95));
    assert_eq!(keras.eps, 2e-4);
    assert_eq!(keras.variance, VarianceEstimator::Biased);
    assert_eq!(keras.num_batches_tracked, None);
    for (k, t) in keras
        .running_var
        .as_ref()
        .unwrap()
        .iter()
        .zip(torch.running_var.as_ref().unwrap())
    {
        assert!((k - t * 0.9).abs() <= 1e-15 * t);
    }
    assert!(notes.iter().any(|n| n.message.contains("eps")));
    let (back, _) = keras.convert(Format::Torch, &opts).unwrap();
    assert_eq!(back.momentum, Momentum::NewWeight(0.05));
    for (b, t) in back
        .running_var
        .unwrap()
        .iter()
        .zip(torch.running_var.as_ref().unwrap())
    {
        assert!((b - t).abs() <= 1e-14 * t);
    }
    assert_eq!(back.num_batches_tracked, Some(0)); // unknown after Keras: noted, written 0
}

/// The rescaled variance is what the target framework would have accumulated: a PyTorch
/// layer and its Keras conversion, trained on the same batches of m values per channel,
/// keep `keras = torch · (m − 1)/m` step after step.
#[test]
fn converted_statistics_keep_training_consistently() {
    let (n, c) = (6usize, 3usize);
    let mut torch_bn = Config::torch(c)
        .momentum(Momentum::NewWeight(0.2))
        .build()
        .unwrap();
    for step in 0..3 {
        let x = values(100 + step, n * c, -2.0, 5.0);
        torch_bn
            .forward(&x, &[n, c], Layout::NC, Mode::Train)
            .unwrap();
    }
    let layer = Layer::from_batchnorm("bn", Format::Torch, &torch_bn);
    let opts = ConvertOptions {
        batch_size: Some(n),
        keep_variance: false,
    };
    let (keras, _) = layer.convert(Format::Keras, &opts).unwrap();
    let mut keras_bn = keras.to_batchnorm().unwrap();
    assert_eq!(
        keras_bn.config().get_running_variance(),
        VarianceEstimator::Biased
    );
    for step in 3..8 {
        let x = values(100 + step, n * c, -2.0, 5.0);
        torch_bn
            .forward(&x, &[n, c], Layout::NC, Mode::Train)
            .unwrap();
        keras_bn
            .forward(&x, &[n, c], Layout::NC, Mode::Train)
            .unwrap();
        let (t, k) = (
            torch_bn.running_state().unwrap(),
            keras_bn.running_state().unwrap(),
        );
        for ch in 0..c {
            let want = t.var[ch] * (n as f64 - 1.0) / n as f64;
            assert!((k.var[ch] - want).abs() <= 1e-12 * want, "step {step}");
            assert!((k.mean[ch] - t.mean[ch]).abs() <= 1e-12 * t.mean[ch].abs().max(1.0));
        }
    }
}

#[test]
fn keep_variance_preserves_inference_outputs() {
    let torch = sample_layer("bn", Format::Torch, 3, 9);
    let opts = ConvertOptions {
        batch_size: None,
        keep_variance: true,
    };
    let (flax, notes) = torch.convert(Format::Flax, &opts).unwrap();
    assert!(notes
        .iter()
        .any(|n| !n.exact && n.message.contains("variance")));
    let x = values(4, 4 * 3, -3.0, 3.0);
    let y0 = torch
        .to_batchnorm()
        .unwrap()
        .forward(&x, &[4, 3], Layout::NC, Mode::Inference)
        .unwrap()
        .0;
    let y1 = flax
        .to_batchnorm()
        .unwrap()
        .forward(&x, &[4, 3], Layout::NC, Mode::Inference)
        .unwrap()
        .0;
    assert_eq!(y0, y1);
}

#[test]
fn cumulative_momentum_is_reported_inexact() {
    let mut torch = sample_layer("bn", Format::Torch, 2, 4);
    torch.momentum = Momentum::Cumulative;
    torch.num_batches_tracked = Some(9);
    let opts = ConvertOptions {
        batch_size: Some(4),
        keep_variance: false,
    };
    let (keras, notes) = torch.convert(Format::Keras, &opts).unwrap();
    assert_eq!(keras.momentum, Momentum::Decay(0.9)); // 1 − 1/10
    assert!(notes
        .iter()
        .any(|n| !n.exact && n.message.contains("cumulative")));
}

// ------------------------------------------------------------------------ inspection

#[test]
fn inspection_reports_each_problem() {
    let healthy = sample_layer("bn", Format::Torch, 3, 5);
    assert!(inspect(&healthy).is_empty());
    let mut l = healthy.clone();
    l.running_var = Some(vec![1.0, -0.5, 1e-9]);
    assert_eq!(
        inspect(&l),
        vec![Problem::NegativeVariance, Problem::NearZeroVariance]
    );
    let mut l = healthy.clone();
    l.weight = Some(vec![1.0, f64::INFINITY, 1.0]);
    assert_eq!(inspect(&l), vec![Problem::NonFinite]);
    let mut l = healthy.clone();
    l.num_batches_tracked = None;
    assert_eq!(inspect(&l), vec![Problem::MissingNumBatchesTracked]);
    let fresh = Layer::new("bn", Format::Keras, 3);
    assert_eq!(inspect(&fresh), vec![Problem::NeverUpdated]);
    let mut l = healthy;
    l.dtype = DType::F16;
    l.eps = 1e-5;
    assert_eq!(inspect(&l), vec![Problem::EpsBelowDtypeResolution]);
    l.eps = 1e-3;
    assert!(inspect(&l).is_empty());
}

// ------------------------------------------------------------------------ folding

/// Reference 2-D convolution, PyTorch semantics: stride, zero padding, groups.
#[allow(clippy::too_many_arguments)]
fn conv2d(
    x: &[f64],
    (n, cin, h, w): (usize, usize, usize, usize),
    wt: &[f64],
    (cout, cpg, kh, kw): (usize, usize, usize, usize),
    bias: Option<&[f64]>,
    stride: usize,
    pad: usize,
    groups: usize,
) -> (Vec<f64>, [usize; 4]) {
    let oh = (h + 2 * pad - kh) / stride + 1;
    let ow = (w + 2 * pad - kw) / stride + 1;
    let mut y = vec![0.0; n * cout * oh * ow];
    let opg = cout / groups;
    for b in 0..n {
        for o in 0..cout {
            for i in 0..oh {
                for j in 0..ow {
                    let mut acc = bias.map_or(0.0, |bb| bb[o]);
                    for ci in 0..cpg {
                        let c = (o / opg) * cpg + ci;
                        for u in 0..kh {
                            for v in 0..kw {
                                let (yy, xx) = (i * stride + u, j * stride + v);
                                if yy < pad || xx < pad || yy - pad >= h || xx - pad >= w {
                                    continue;
                                }
                                acc += wt[((o * cpg + ci) * kh + u) * kw + v]
                                    * x[((b * cin + c) * h + yy - pad) * w + xx - pad];
                            }
                        }
                    }
                    y[((b * cout + o) * oh + i) * ow + j] = acc;
                }
            }
        }
    }
    (y, [n, cout, oh, ow])
}

/// Reference 2-D transposed convolution with stride, PyTorch weight layout
/// (in, out/groups, kh, kw), no padding.
fn conv_transpose2d(
    x: &[f64],
    (n, cin, h, w): (usize, usize, usize, usize),
    wt: &[f64],
    (opg, kh, kw): (usize, usize, usize),
    bias: Option<&[f64]>,
    stride: usize,
    groups: usize,
) -> (Vec<f64>, [usize; 4]) {
    let cout = opg * groups;
    let ipg = cin / groups;
    let (oh, ow) = ((h - 1) * stride + kh, (w - 1) * stride + kw);
    let mut y = vec![0.0; n * cout * oh * ow];
    for b in 0..n {
        for o in 0..cout {
            for p in 0..oh * ow {
                y[(b * cout + o) * oh * ow + p] = bias.map_or(0.0, |bb| bb[o]);
            }
        }
        for i in 0..cin {
            for yy in 0..h {
                for xx in 0..w {
                    let xv = x[((b * cin + i) * h + yy) * w + xx];
                    for j in 0..opg {
                        let o = (i / ipg) * opg + j;
                        for u in 0..kh {
                            for v in 0..kw {
                                let (r, s) = (yy * stride + u, xx * stride + v);
                                y[((b * cout + o) * oh + r) * ow + s] +=
                                    xv * wt[((i * opg + j) * kh + u) * kw + v];
                            }
                        }
                    }
                }
            }
        }
    }
    (y, [n, cout, oh, ow])
}

/// Inference batch norm with bnorm's own layer (independent of the folding code).
fn bn_layer(c: usize, seed: u64) -> Layer {
    let mut l = sample_layer("bn", Format::Torch, c, seed);
    l.eps = 1e-5;
    l
}

fn run_bn(layer: &Layer, x: &[f64], shape: &[usize]) -> Vec<f64> {
    let layout = if shape.len() == 2 {
        Layout::NC
    } else {
        Layout::NCHW
    };
    layer
        .to_batchnorm()
        .unwrap()
        .forward(x, shape, layout, Mode::Inference)
        .unwrap()
        .0
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn folding_into_preceding_convolutions_matches_the_unfolded_pair() {
    // (cin, cout, groups): plain, grouped, depthwise; stride 2 and padding 1 included.
    for (cin, cout, groups) in [(3, 4, 1), (4, 6, 2), (5, 5, 5)] {
        let cpg = cin / groups;
        let wshape = [cout, cpg, 3, 3];
        let w = values(cout as u64, cout * cpg * 9, -1.0, 1.0);
        let b = values(7, cout, -0.5, 0.5);
        let bn = bn_layer(cout, groups as u64);
        let x = values(3, 2 * cin * 7 * 7, -2.0, 2.0);
        let (h, hs) = conv2d(
            &x,
            (2, cin, 7, 7),
            &w,
            (cout, cpg, 3, 3),
            Some(&b),
            2,
            1,
            groups,
        );
        let want = run_bn(&bn, &h, &hs);
        let f = fold_into_preceding(
            &w,
            &wshape,
            Some(&b),
            LinearKind::Conv { groups },
            &BnAffine::from_layer(&bn).unwrap(),
            DType::F64,
        )
        .unwrap();
        let (got, _) = conv2d(
            &x,
            (2, cin, 7, 7),
            &f.weight,
            (cout, cpg, 3, 3),
            Some(&f.bias),
            2,
            1,
            groups,
        );
        assert!(max_diff(&got, &want) < 1e-12, "groups {groups}");
        assert!(f.max_error < 1e-12);
    }
}

#[test]
fn folding_into_preceding_transposed_convolutions_matches_the_unfolded_pair() {
    for (cin, opg, groups) in [(3, 2, 1), (4, 3, 2), (4, 1, 4)] {
        let cout = opg * groups;
        let w = values(11, cin * opg * 4, -1.0, 1.0);
        let bn = bn_layer(cout, 2);
        let x = values(12, 2 * cin * 3 * 3, -2.0, 2.0);
        let (h, hs) = conv_transpose2d(&x, (2, cin, 3, 3), &w, (opg, 2, 2), None, 2, groups);
        let want = run_bn(&bn, &h, &hs);
        let f = fold_into_preceding(
            &w,
            &[cin, opg, 2, 2],
            None,
            LinearKind::ConvTranspose { groups },
            &BnAffine::from_layer(&bn).unwrap(),
            DType::F64,
        )
        .unwrap();
        let (got, _) = conv_transpose2d(
            &x,
            (2, cin, 3, 3),
            &f.weight,
            (opg, 2, 2),
            Some(&f.bias),
            2,
            groups,
        );
        assert!(max_diff(&got, &want) < 1e-12, "groups {groups}");
        assert!(f.max_error < 1e-12);
    }
}

#[test]
fn folding_into_linear_layers_before_and_after() {
    let (n, i, o) = (3, 4, 5);
    let w = values(1, o * i, -1.0, 1.0);
    let b = values(2, o, -1.0, 1.0);
    let x = values(3, n * i, -2.0, 2.0);
    let linear = |w: &[f64], b: &[f64], x: &[f64]| -> Vec<f64> {
        (0..n * o)
            .map(|k| {
                b[k % o]
                    + (0..i)
                        .map(|j| w[(k % o) * i + j] * x[(k / o) * i + j])
                        .sum::<f64>()
            })
            .collect()
    };
    // before: bn(linear(x))
    let bn_o = bn_layer(o, 4);
    let want = run_bn(&bn_o, &linear(&w, &b, &x), &[n, o]);
    let f = fold_into_preceding(
        &w,
        &[o, i],
        Some(&b),
        LinearKind::Linear,
        &BnAffine::from_layer(&bn_o).unwrap(),
        DType::F64,
    )
    .unwrap();
    assert!(max_diff(&linear(&f.weight, &f.bias, &x), &want) < 1e-12);
    // after: linear(bn(x))
    let bn_i = bn_layer(i, 5);
    let want = linear(&w, &b, &run_bn(&bn_i, &x, &[n, i]));
    let f = fold_into_following(
        &w,
        &[o, i],
        Some(&b),
        LinearKind::Linear,
        &BnAffine::from_layer(&bn_i).unwrap(),
        false,
        DType::F64,
    )
    .unwrap();
    assert!(max_diff(&linear(&f.weight, &f.bias, &x), &want) < 1e-12);
    assert!(f.max_error < 1e-12);
}

#[test]
fn folding_into_a_following_unpadded_conv_is_exact_and_padded_is_refused() {
    let (cin, cout, groups) = (4, 6, 2);
    let cpg = cin / groups;
    let w = values(21, cout * cpg * 9, -1.0, 1.0);
    let b = values(22, cout, -1.0, 1.0);
    let bn = bn_layer(cin, 23);
    let affine = BnAffine::from_layer(&bn).unwrap();
    let x = values(24, 2 * cin * 6 * 6, -2.0, 2.0);
    let (want, _) = conv2d(
        &run_bn(&bn, &x, &[2, cin, 6, 6]),
        (2, cin, 6, 6),
        &w,
        (cout, cpg, 3, 3),
        Some(&b),
        1,
        0,
        groups,
    );
    let f = fold_into_following(
        &w,
        &[cout, cpg, 3, 3],
        Some(&b),
        LinearKind::Conv { groups },
        &affine,
        false,
        DType::F64,
    )
    .unwrap();
    let (got, _) = conv2d(
        &x,
        (2, cin, 6, 6),
        &f.weight,
        (cout, cpg, 3, 3),
        Some(&f.bias),
        1,
        0,
        groups,
    );
    assert!(max_diff(&got, &want) < 1e-12);
    // With padding the border differs, which is why it is refused:
    let (want_p, _) = conv2d(
        &run_bn(&bn, &x, &[2, cin, 6, 6]),
        (2, cin, 6, 6),
        &w,
        (cout, cpg, 3, 3),
        Some(&b),
        1,
        1,
        groups,
    );
    let (got_p, _) = conv2d(
        &x,
        (2, cin, 6, 6),
        &f.weight,
        (cout, cpg, 3, 3),
        Some(&f.bias),
        1,
        1,
        groups,
    );
    assert!(max_diff(&got_p, &want_p) > 1e-3);
    let refused = fold_into_following(
        &w,
        &[cout, cpg, 3, 3],
        Some(&b),
        LinearKind::Conv { groups },
        &affine,
        true,
        DType::F64,
    );
    assert!(matches!(refused, Err(InteropError::FoldNotExact { .. })));
    let t = fold_into_following(
        &w,
        &[cin, cout / groups, 3, 3],
        None,
        LinearKind::ConvTranspose { groups },
        &affine,
        false,
        DType::F64,
    );
    assert!(matches!(t, Err(InteropError::FoldNotExact { .. })));
}

#[test]
fn half_precision_folds_round_once_and_report_the_error() {
    let w = values(31, 8 * 3 * 9, -1.0, 1.0);
    let mut bn = bn_layer(8, 32);
    bn.running_var = Some(values(33, 8, 1e-4, 1e-2)); // large scales: rounding shows
    let affine = BnAffine::from_layer(&bn).unwrap();
    let exact = fold_into_preceding(
        &w,
        &[8, 3, 3, 3],
        None,
        LinearKind::Conv { groups: 1 },
        &affine,
        DType::F64,
    )
    .unwrap();
    let half = fold_into_preceding(
        &w,
        &[8, 3, 3, 3],
        None,
        LinearKind::Conv { groups: 1 },
        &affine,
        DType::F16,
    )
    .unwrap();
    for (h, e) in half.weight.iter().zip(&exact.weight) {
        assert_eq!(*h, bnorm::element::f16::from_f64(*e).to_f64()); // one rounding of the f64 result
    }
    assert!(half.max_error > exact.max_error);
    assert!(half.max_error < 1e-2 * half.max_output);
}

#[test]
fn folding_refuses_mismatched_shapes_and_untracked_layers() {
    let affine = BnAffine::from_layer(&bn_layer(3, 1)).unwrap();
    let r = fold_into_preceding(
        &[1.0; 8],
        &[4, 2],
        None,
        LinearKind::Linear,
        &affine,
        DType::F32,
    );
    assert!(matches!(r, Err(InteropError::BadShape { .. })));
    let r = fold_into_preceding(
        &[1.0; 8],
        &[usize::MAX, 2],
        None,
        LinearKind::Linear,
        &affine,
        DType::F32,
    );
    assert!(matches!(r, Err(InteropError::BadShape { .. })));
    let mut untracked = bn_layer(3, 1);
    untracked.running_mean = None;
    untracked.running_var = None;
    assert!(BnAffine::from_layer(&untracked).is_err());
    let mut neg = bn_layer(3, 1);
    neg.running_var = Some(vec![1.0, -1.0, 1.0]);
    assert!(matches!(
        BnAffine::from_layer(&neg),
        Err(InteropError::InvalidLayer { .. })
    ));
    let _ = Params::default();
}

// ------------------------------------------------------------------------ hostile files

fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

#[test]
fn corrupt_truncated_and_hostile_files_are_refused() {
    let mut ckpt = Checkpoint::default();
    ckpt.insert_layer(&sample_layer("bn", Format::Torch, 3, 1), DType::F32)
        .unwrap();
    let good = ckpt.to_bytes().unwrap();
    for cut in [0, 4, 8, 20, good.len() - 1] {
        let r = read_layers(&good[..cut]);
        assert!(
            matches!(r, Err(InteropError::Malformed { .. })),
            "cut {cut}"
        );
    }
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        read_layers(&huge),
        Err(InteropError::Malformed { .. })
    ));
    let overflow = raw_file(
        r#"{"a.running_mean":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#,
        &[0; 4],
    );
    assert!(matches!(
        read_layers(&overflow),
        Err(InteropError::Malformed { .. })
    ));
    let past_end = raw_file(
        r#"{"a.running_mean":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        &[0; 4],
    );
    assert!(read_layers(&past_end).is_err());
    let ints = raw_file(
        r#"{"a.running_mean":{"dtype":"I32","shape":[1],"data_offsets":[0,4]},"a.running_var":{"dtype":"I32","shape":[1],"data_offsets":[4,8]}}"#,
        &[0; 8],
    );
    assert!(matches!(
        read_layers(&ints),
        Err(InteropError::UnsupportedDtype { .. })
    ));
    let two_d = raw_file(
        r#"{"a.running_mean":{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]},"a.running_var":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
        &[0; 8],
    );
    assert!(matches!(
        read_layers(&two_d),
        Err(InteropError::BadShape { .. })
    ));
    let lengths = raw_file(
        r#"{"a.running_mean":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a.running_var":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        &[0; 12],
    );
    assert!(matches!(
        read_layers(&lengths),
        Err(InteropError::BadShape { .. })
    ));
    let lone_mean = raw_file(
        r#"{"a.running_mean":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        &[0; 4],
    );
    assert!(matches!(
        read_layers(&lone_mean),
        Err(InteropError::MissingTensor { .. })
    ));
    let negative_count = raw_file(
        r#"{"a.num_batches_tracked":{"dtype":"I64","shape":[],"data_offsets":[0,8]}}"#,
        &(-3i64).to_le_bytes(),
    );
    assert!(matches!(
        read_layers(&negative_count),
        Err(InteropError::InvalidLayer { .. })
    ));
    assert!(read_layers(&raw_file("{not json", &[])).is_err());
}

/// Replays the fuzzing corpus (crates/bnorm-interop/fuzz/corpus/read_layers): no input panics.
#[test]
fn fuzz_corpus_replays_without_panic() {
    for bytes in common::corpus("read_layers", 10) {
        assert_eq!(
            Checkpoint::from_vec(bytes.clone()).ok(),
            Checkpoint::from_bytes(&bytes).ok()
        );
        if let Ok(ckpt) = Checkpoint::from_bytes(&bytes) {
            common::consume(&ckpt);
        }
    }
}

// ------------------------------------------------------------------------ atomic writes

#[test]
fn atomic_write_replaces_and_leaves_no_temporary() {
    let dir = std::env::temp_dir().join(format!("bnorm-interop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("out.safetensors");
    std::fs::write(&path, b"old").unwrap();
    let mut ckpt = Checkpoint::default();
    ckpt.insert_layer(&sample_layer("bn", Format::Keras, 2, 1), DType::F32)
        .unwrap();
    ckpt.write(&path).unwrap();
    assert_eq!(Checkpoint::read(&path).unwrap(), ckpt);
    let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(entries.len(), 1);
    let missing_dir = dir.join("no/such/dir/x.safetensors");
    assert!(matches!(
        write_atomic(&missing_dir, b"x"),
        Err(InteropError::Io { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- issue #18 part 3: defects of the interop core ----

#[test]
fn a_zero_count_with_trained_statistics_is_not_never_updated() {
    let mut l = Layer::new("bn", Format::Torch, 2);
    l.running_mean = Some(vec![0.25, -0.5]);
    l.running_var = Some(vec![0.5, 2.0]);
    l.num_batches_tracked = Some(0);
    assert_eq!(inspect(&l), vec![]);
    // Converted from Keras: trained statistics, the count written as 0.
    let mut k = Layer::new("bn", Format::Keras, 2);
    k.running_mean = Some(vec![0.25, -0.5]);
    k.running_var = Some(vec![0.5, 2.0]);
    let (t, _) = k
        .convert(
            Format::Torch,
            &ConvertOptions {
                keep_variance: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(t.num_batches_tracked, Some(0));
    assert_eq!(inspect(&t), vec![]);
}

#[test]
fn conversion_to_torch_completes_the_affine_pair() {
    let mut k = Layer::new("bn", Format::Keras, 3);
    k.bias = None;
    let opts = ConvertOptions {
        keep_variance: true,
        ..Default::default()
    };
    let (t, notes) = k.convert(Format::Torch, &opts).unwrap();
    assert_eq!(t.bias, Some(vec![0.0; 3]));
    assert!(notes.iter().any(|n| n.message.contains("center=False")));
    let mut f = Layer::new("bn", Format::Flax, 2);
    f.weight = None;
    let (t, _) = f.convert(Format::Torch, &opts).unwrap();
    assert_eq!(t.weight, Some(vec![1.0; 2]));
    // affine=False stays without either.
    let mut none = Layer::new("bn", Format::Keras, 2);
    none.weight = None;
    none.bias = None;
    let (t, _) = none.convert(Format::Torch, &opts).unwrap();
    assert!(t.weight.is_none() && t.bias.is_none());
}

#[test]
fn notes_say_momentum_in_words_and_what_was_assumed() {
    let l = Layer::new("bn", Format::Torch, 1);
    let (_, notes) = l
        .convert(
            Format::Keras,
            &ConvertOptions {
                keep_variance: true,
                ..Default::default()
            },
        )
        .unwrap();
    let all: Vec<String> = notes.iter().map(|n| n.message.clone()).collect();
    assert!(
        all.iter()
            .all(|m| !m.contains("Decay(") && !m.contains("NewWeight(")),
        "{all:?}"
    );
    assert!(
        all.iter().any(|m| m.contains("eps 1e-5 is assumed")),
        "{all:?}"
    );
    assert!(all.iter().any(|m| m.contains("momentum=0.9")), "{all:?}");
}

#[test]
fn lone_modules_and_submodules_named_params_are_layers() {
    let mut ckpt = Checkpoint::default();
    let mut l = Layer::new("", Format::Torch, 2);
    l.running_mean = Some(vec![0.5, 0.25]);
    ckpt.insert_layer(&l, DType::F32).unwrap();
    assert!(ckpt.tensors.contains_key("running_mean"));
    assert!(ckpt.tensors.contains_key("weight"));
    ckpt.metadata.clear();
    let found = ckpt.layers().unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].name, "");
    assert_eq!(found[0].running_mean, Some(vec![0.5, 0.25]));
    assert_eq!(found[0].weight, Some(vec![1.0; 2]));
    assert_eq!(found[0].num_batches_tracked, Some(0));

    let mut ckpt = Checkpoint::default();
    for (name, format) in [
        ("params.bn", Format::Torch),
        ("params/kbn", Format::Keras),
        ("BatchNorm_0", Format::Flax),
        ("", Format::Flax),
    ] {
        let mut l = Layer::new(name, format, 2);
        l.running_var = Some(vec![3.0, 4.0]);
        ckpt.insert_layer(&l, DType::F32).unwrap();
    }
    ckpt.metadata.clear();
    let found: Vec<(String, Format)> = ckpt
        .layers()
        .unwrap()
        .into_iter()
        .map(|l| {
            assert_eq!(l.running_var, Some(vec![3.0, 4.0]), "{}", l.name);
            assert_eq!(l.weight, Some(vec![1.0; 2]), "{}", l.name);
            (l.name, l.format)
        })
        .collect();
    assert_eq!(
        found,
        [
            (String::new(), Format::Flax),
            ("BatchNorm_0".into(), Format::Flax),
            ("params.bn".into(), Format::Torch),
            ("params/kbn".into(), Format::Keras),
        ]
    );
}

#[test]
fn provenance_says_what_the_file_records() {
    let mut ckpt = Checkpoint::default();
    ckpt.insert_layer(&Layer::new("bn", Format::Keras, 2), DType::F32)
        .unwrap();
    let recorded = &ckpt.layers().unwrap()[0];
    assert_eq!(
        recorded.provenance,
        bnorm_interop::Provenance::all(bnorm_interop::Source::Recorded)
    );
    ckpt.metadata.retain(|k, _| k.ends_with(".variance"));
    let mut l = ckpt.layers().unwrap().remove(0);
    assert_eq!(l.provenance.eps, bnorm_interop::Source::Assumed);
    assert_eq!(l.provenance.momentum, bnorm_interop::Source::Assumed);
    assert_eq!(l.provenance.variance, bnorm_interop::Source::Recorded);
    l.set_eps(1e-5).unwrap();
    l.set_momentum(Some(0.9)).unwrap();
    assert_eq!(l.provenance.eps, bnorm_interop::Source::Given);
    assert_eq!(l.momentum, Momentum::Decay(0.9));
    assert!(l.set_momentum(None).is_err(), "momentum=None is PyTorch's");
}

#[test]
fn owned_bytes_parse_like_borrowed_ones() {
    let mut ckpt = Checkpoint::default();
    for i in 0..5 {
        ckpt.insert_layer(
            &sample_layer(&format!("l{i}"), Format::Torch, 3 + i, i as u64),
            DType::F32,
        )
        .unwrap();
    }
    let bytes = ckpt.to_bytes().unwrap();
    assert_eq!(
        Checkpoint::from_vec(bytes.clone()).unwrap(),
        Checkpoint::from_bytes(&bytes).unwrap()
    );
    for cut in [0, 7, 8, 20, bytes.len() - 1] {
        assert!(Checkpoint::from_vec(bytes[..cut].to_vec()).is_err());
    }
}

/// `ExponentialMovingAverage(num_updates=…)` converts to the decay of the next step: the
/// capped ramp min(d, (1 + n)/(10 + n)) at n = num_batches_tracked, exact once the cap binds.
#[test]
fn the_num_updates_decay_converts_to_the_next_steps_decay() {
    let mut l = Layer::new("bn", Format::Keras, 2);
    l.momentum = Momentum::WarmupDecay(0.99);
    l.num_batches_tracked = Some(5);
    let opts = ConvertOptions {
        keep_variance: true,
        ..ConvertOptions::default()
    };
    let (t, notes) = l.convert(Format::Torch, &opts).unwrap();
    // n = 5: decay 6/15 = 0.4, new-batch weight 0.6
    match t.momentum {
        Momentum::NewWeight(a) => assert!((a - 0.6).abs() < 1e-12, "{a}"),
        m => panic!("{m:?}"),
    }
    assert!(notes
        .iter()
        .any(|n| !n.exact && n.message.contains("num_updates")));
    l.num_batches_tracked = Some(10_000);
    let (k, notes) = l.convert(Format::Keras, &opts).unwrap();
    assert_eq!(k.momentum, Momentum::Decay(0.99));
    assert!(notes
        .iter()
        .filter(|n| n.message.contains("num_updates"))
        .all(|n| n.exact));
}
