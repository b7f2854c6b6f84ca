//! End-to-end tests of `bnorm inspect`, `bnorm fold` and `bnorm convert` on files the tests
//! write.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bnorm::element::DType;
use bnorm_interop::{Checkpoint, Format, Layer, Tensor};

fn bnorm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bnorm"))
        .args(args)
        .output()
        .expect("runs the binary")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("bnorm-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn trained(name: &str, format: Format, c: usize) -> Layer {
    let mut l = Layer::new(name, format, c);
    l.weight = Some((0..c).map(|i| 0.5 + i as f64 * 0.25).collect());
    l.bias = Some((0..c).map(|i| i as f64 * 0.1 - 0.2).collect());
    l.running_mean = Some((0..c).map(|i| i as f64 - 1.0).collect());
    l.running_var = Some((0..c).map(|i| 0.5 + i as f64).collect());
    if format == Format::Torch {
        l.num_batches_tracked = Some(100);
    }
    l
}

#[test]
fn inspect_json_lists_layers_and_problems() {
    let dir = TempDir::new("inspect");
    let mut ckpt = Checkpoint::default();
    ckpt.insert_layer(&trained("features.1", Format::Torch, 3), DType::F32)
        .unwrap();
    let mut broken = trained("features.4", Format::Torch, 2);
    broken.running_mean = Some(vec![f64::NAN, 0.0]);
    broken.running_var = Some(vec![1.0, 0.0]);
    ckpt.insert_layer(&broken, DType::F32).unwrap();
    ckpt.insert_layer(&Layer::new("head/bn", Format::Keras, 4), DType::F32)
        .unwrap();
    let file = dir.path("model.safetensors");
    ckpt.write(&file).unwrap();

    let out = bnorm(&["inspect", s(&file), "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layers = v.as_array().unwrap();
    assert_eq!(layers.len(), 3);
    let by_name = |n: &str| layers.iter().find(|l| l["name"] == n).unwrap().clone();
    let healthy = by_name("features.1");
    assert_eq!(healthy["channels"], 3);
    assert_eq!(healthy["problems"], serde_json::json!([]));
    assert_eq!(healthy["format"], "torch");
    let b = by_name("features.4");
    assert_eq!(b["channels"], 2);
    let problems: Vec<&str> = b["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(problems.contains(&"non_finite"), "{problems:?}");
    assert!(problems.contains(&"near_zero_variance"), "{problems:?}");
    let fresh = by_name("head/bn");
    assert_eq!(fresh["channels"], 4);
    assert_eq!(fresh["problems"], serde_json::json!(["never_updated"]));

    let plain = bnorm(&["inspect", s(&file)]);
    assert!(plain.status.success());
    let t = text(&plain);
    assert!(t.contains("features.4") && t.contains("non_finite"), "{t}");
    assert!(t.contains("3 batch-norm layer(s), 2 with problems"), "{t}");
}

#[test]
fn inspect_reads_the_real_pytorch_checkpoint() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../bnorm-interop/tests/data/torch_bn.safetensors");
    let out = bnorm(&["inspect", s(&file), "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    // bn2 is a BatchNorm2d(track_running_stats=False): weight and bias only.
    assert_eq!(names, ["bn1", "bn2", "bn3", "bn4"]);
    for l in v.as_array().unwrap() {
        let stats_free = l["name"] == "bn2";
        let want: &[&str] = if stats_free {
            &["no_running_statistics"]
        } else {
            &[]
        };
        assert_eq!(l["problems"], serde_json::json!(want), "{l}");
        assert_eq!(l["running_statistics"], !stats_free, "{l}");
    }
    assert_eq!(v[0]["num_batches_tracked"], 5);
    let bn2 = &v[1];
    assert_eq!(bn2["channels"], 4);
    assert_eq!(bn2["found_by"], "weight_and_bias_only");
    assert_eq!(
        bn2["affine"],
        serde_json::json!({"scale": true, "center": true})
    );
    assert!(bn2["momentum"].is_null() && bn2["running_variance"].is_null());

    let plain = bnorm(&["inspect", s(&file)]);
    assert!(plain.status.success(), "{}", text(&plain));
    let t = text(&plain);
    let line = t
        .lines()
        .find(|l| l.starts_with("bn2 "))
        .expect("bn2 listed");
    assert!(
        line.contains("no running statistics")
            && line.contains("batch statistics even at inference"),
        "{t}"
    );
    assert!(t.contains("track_running_stats=False"), "{t}");
    assert!(
        t.contains("4 batch-norm layer(s), 1 with problems, 1 without running statistics"),
        "{t}"
    );
}

#[test]
fn inspect_lists_layers_without_running_statistics_but_not_other_norms() {
    let dir = TempDir::new("stats-free");
    let mut ckpt = Checkpoint::default();
    let f = |n: usize, k: f64| (0..n).map(|i| i as f64 * k + 0.5).collect::<Vec<f64>>();
    let put = |ckpt: &mut Checkpoint, name: &str, v: Vec<f64>, shape: Vec<usize>| {
        ckpt.tensors
            .insert(name.to_string(), Tensor::from_f64(&v, shape, DType::F32));
    };
    // A convolution, then a batch norm saved with track_running_stats=False.
    put(
        &mut ckpt,
        "stem.conv.weight",
        f(3 * 2 * 9, 0.01),
        vec![3, 2, 3, 3],
    );
    put(&mut ckpt, "stem.conv.bias", f(3, 0.1), vec![3]);
    put(&mut ckpt, "stem.bn.weight", f(3, 0.2), vec![3]);
    put(&mut ckpt, "stem.bn.bias", f(3, -0.1), vec![3]);
    // A trained batch norm, found by its running statistics.
    ckpt.insert_layer(&trained("head.bn", Format::Torch, 2), DType::F32)
        .unwrap();
    // Normalizations with the same names that are not batch norms, and a linear layer.
    for ln in [
        "encoder.ln_1",
        "encoder.LayerNorm",
        "blocks.0.gn",
        "norm.group_norm",
    ] {
        put(&mut ckpt, &format!("{ln}.weight"), f(3, 0.2), vec![3]);
        put(&mut ckpt, &format!("{ln}.bias"), f(3, 0.1), vec![3]);
    }
    put(&mut ckpt, "fc.weight", f(6, 0.1), vec![2, 3]);
    put(&mut ckpt, "fc.bias", f(2, 0.1), vec![2]);
    let file = dir.path("model.safetensors");
    ckpt.write(&file).unwrap();

    let out = bnorm(&["inspect", s(&file), "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["head.bn", "stem.bn"]);
    assert_eq!(v[1]["channels"], 3);
    assert_eq!(v[1]["running_statistics"], false);
    assert_eq!(
        v[1]["problems"],
        serde_json::json!(["no_running_statistics"])
    );
    assert_eq!(v[0]["running_statistics"], true);
    assert_eq!(v[0]["found_by"], "names");

    // convert moves the layers it can and says which one it left under PyTorch names.
    let keras = dir.path("keras.safetensors");
    let out = bnorm(&[
        "convert",
        s(&file),
        s(&keras),
        "--to",
        "keras",
        "--keep-variance",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("note: stem.bn: left under its PyTorch names"),
        "{t}"
    );
    let k = Checkpoint::read(&keras).unwrap();
    assert!(k.tensors.contains_key("head.bn/moving_variance"));
    assert!(k.tensors.contains_key("stem.bn.weight"));
}

#[test]
fn hostile_files_are_refused_with_a_clear_message() {
    let dir = TempDir::new("hostile");
    let file = dir.path("bad.safetensors");
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend(b"{}");
    std::fs::write(&file, bytes).unwrap();
    let out = bnorm(&["inspect", s(&file)]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("not a valid safetensors file"),
        "{}",
        text(&out)
    );
}

#[test]
fn fold_writes_folded_weights_and_removes_the_batch_norm() {
    let dir = TempDir::new("fold");
    let mut ckpt = Checkpoint::default();
    let (cout, cin) = (3usize, 2usize);
    let w: Vec<f64> = (0..cout * cin * 9)
        .map(|i| (i as f64 * 0.37).sin())
        .collect();
    ckpt.tensors.insert(
        "conv1.weight".into(),
        Tensor::from_f64(&w, vec![cout, cin, 3, 3], DType::F32),
    );
    let fw: Vec<f64> = (0..4 * cout).map(|i| (i as f64 * 0.11).cos()).collect();
    ckpt.tensors.insert(
        "fc.weight".into(),
        Tensor::from_f64(&fw, vec![4, cout], DType::F32),
    );
    ckpt.tensors.insert(
        "fc.bias".into(),
        Tensor::from_f64(&[0.5; 4], vec![4], DType::F32),
    );
    let bn1 = trained("bn1", Format::Torch, cout);
    let bn2 = trained("bn2", Format::Torch, 4);
    ckpt.insert_layer(&bn1, DType::F32).unwrap();
    ckpt.insert_layer(&bn2, DType::F32).unwrap();
    let input = dir.path("in.safetensors");
    let output = dir.path("out.safetensors");
    ckpt.write(&input).unwrap();

    let out = bnorm(&["fold", s(&input), s(&output), "--pairs", "conv1:bn1,fc:bn2"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("max error"));
    let folded = Checkpoint::read(&output).unwrap();
    assert!(folded.layers().unwrap().is_empty(), "batch norms removed");
    let names: Vec<&str> = folded.tensors.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["conv1.bias", "conv1.weight", "fc.bias", "fc.weight"]
    );
    // Independent expectation: scale = gamma / sqrt(var + eps), shift = beta - mean*scale.
    let gw = folded.tensors["conv1.weight"].to_f64("w").unwrap();
    let gb = folded.tensors["conv1.bias"].to_f64("b").unwrap();
    let (g, b, m, v) = (
        bn1.weight.unwrap(),
        bn1.bias.unwrap(),
        bn1.running_mean.unwrap(),
        bn1.running_var.unwrap(),
    );
    for o in 0..cout {
        let scale = g[o] / (v[o] + 1e-5).sqrt();
        for k in 0..cin * 9 {
            let want = (w[o * cin * 9 + k] as f32) as f64 * scale;
            assert!((gw[o * cin * 9 + k] - want).abs() <= 1e-6 * want.abs().max(1e-3));
        }
        let want_b = b[o] - m[o] * scale;
        assert!((gb[o] - want_b).abs() <= 1e-6 * want_b.abs().max(1e-3));
    }
    let fb = folded.tensors["fc.bias"].to_f64("b").unwrap();
    let (g2, b2, m2, v2) = (
        bn2.weight.unwrap(),
        bn2.bias.unwrap(),
        bn2.running_mean.unwrap(),
        bn2.running_var.unwrap(),
    );
    for o in 0..4 {
        let scale = g2[o] / (v2[o] + 1e-5).sqrt();
        let want = 0.5 * scale + b2[o] - m2[o] * scale;
        assert!((fb[o] - want).abs() <= 1e-6 * want.abs().max(1e-3));
    }

    let bad = bnorm(&[
        "fold",
        s(&input),
        s(&dir.path("x.safetensors")),
        "--pairs",
        "conv9:bn1",
    ]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("conv9.weight"), "{}", text(&bad));
    assert!(!dir.path("x.safetensors").exists());
}

#[test]
fn convert_needs_the_batch_size_and_round_trips_with_it() {
    let dir = TempDir::new("convert");
    let mut ckpt = Checkpoint::default();
    let bn = trained("block.bn", Format::Torch, 3);
    ckpt.insert_layer(&bn, DType::F64).unwrap();
    ckpt.tensors.insert(
        "block.conv.weight".into(),
        Tensor::from_f64(&[1.0; 6], vec![3, 2], DType::F32),
    );
    let input = dir.path("torch.safetensors");
    ckpt.write(&input).unwrap();
    let keras = dir.path("keras.safetensors");

    let refused = bnorm(&["convert", s(&input), s(&keras), "--to", "keras"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("--batch-size"),
        "{}",
        text(&refused)
    );
    assert!(!keras.exists(), "nothing written on refusal");

    let ok = bnorm(&[
        "convert",
        s(&input),
        s(&keras),
        "--to",
        "keras",
        "--batch-size",
        "8",
    ]);
    assert!(ok.status.success(), "{}", text(&ok));
    let k = Checkpoint::read(&keras).unwrap();
    assert!(k.tensors.contains_key("block.bn/moving_variance"));
    assert!(k.tensors.contains_key("block.bn/gamma"));
    assert!(k.tensors.contains_key("block.conv.weight"));
    let kv = k.tensors["block.bn/moving_variance"].to_f64("v").unwrap();
    for (got, var) in kv.iter().zip(bn.running_var.as_ref().unwrap()) {
        assert!((got - var * 7.0 / 8.0).abs() <= 1e-14 * var);
    }
    let kl = &k.layers().unwrap()[0];
    assert_eq!(kl.momentum, bnorm::Momentum::Decay(0.9));
    assert_eq!(kl.eps, 1e-5);

    let flax = dir.path("flax.safetensors");
    let ok = bnorm(&["convert", s(&keras), s(&flax), "--to", "flax"]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(Checkpoint::read(&flax)
        .unwrap()
        .tensors
        .contains_key("batch_stats/block.bn/var"));

    let back = dir.path("back.safetensors");
    let ok = bnorm(&[
        "convert",
        s(&flax),
        s(&back),
        "--to",
        "torch",
        "--batch-size",
        "8",
    ]);
    assert!(ok.status.success(), "{}", text(&ok));
    let t = Checkpoint::read(&back).unwrap().layers().unwrap().remove(0);
    assert_eq!(t.format, Format::Torch);
    assert_eq!(t.momentum, bnorm::Momentum::NewWeight(0.1));
    for (got, want) in t
        .running_var
        .unwrap()
        .iter()
        .zip(bn.running_var.as_ref().unwrap())
    {
        assert!((got - want).abs() <= 1e-14 * want);
    }
    assert_eq!(t.running_mean, bn.running_mean);
}

#[test]
fn convert_takes_a_batch_size_per_layer() {
    let dir = TempDir::new("convert-per-layer");
    let mut ckpt = Checkpoint::default();
    let conv_bn = trained("bn1", Format::Torch, 2); // BatchNorm2d: N*H*W values
    let fc_bn = trained("bn4", Format::Torch, 3); // BatchNorm1d: N values
    ckpt.insert_layer(&conv_bn, DType::F64).unwrap();
    ckpt.insert_layer(&fc_bn, DType::F64).unwrap();
    let input = dir.path("in.safetensors");
    let output = dir.path("out.safetensors");
    ckpt.write(&input).unwrap();
    let out = bnorm(&[
        "convert",
        s(&input),
        s(&output),
        "--to",
        "flax",
        "--batch-size",
        "288,bn4=8",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let layers = Checkpoint::read(&output).unwrap().layers().unwrap();
    for (got, orig, m) in [(&layers[0], &conv_bn, 288.0), (&layers[1], &fc_bn, 8.0)] {
        for (g, v) in got
            .running_var
            .as_ref()
            .unwrap()
            .iter()
            .zip(orig.running_var.as_ref().unwrap())
        {
            assert!((g - v * (m - 1.0) / m).abs() <= 1e-14 * v, "{}", got.name);
        }
    }
    let unknown = bnorm(&[
        "convert",
        s(&input),
        s(&dir.path("x.safetensors")),
        "--to",
        "flax",
        "--batch-size",
        "bn9=8",
    ]);
    assert!(!unknown.status.success());
    assert!(text(&unknown).contains("bn9"));
}
