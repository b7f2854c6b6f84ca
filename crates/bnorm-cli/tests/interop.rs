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
    assert_eq!(out.status.code(), Some(1), "problems found: {}", text(&out));
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
    assert_eq!(plain.status.code(), Some(1));
    let t = text(&plain);
    assert!(t.contains("features.4") && t.contains("non_finite"), "{t}");
    assert!(t.contains("3 batch-norm layer(s), 2 with problems"), "{t}");
}

#[test]
fn inspect_reads_the_real_pytorch_checkpoint() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../bnorm-interop/tests/data/torch_bn.safetensors");
    let out = bnorm(&["inspect", s(&file), "--json"]);
    // bn2's missing running statistics are a problem: exit status 1.
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
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
    assert_eq!(plain.status.code(), Some(1), "{}", text(&plain));
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
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
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
    assert_eq!(out.status.code(), Some(2), "unreadable");
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

// ---- issue #18, parts 3 and 4: what `inspect` tells the user, and the interop defects ----

fn json_of(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

fn real_torch_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bnorm-interop/tests/data/torch_bn.safetensors")
}

/// A checkpoint holding `layers` under their names only, without bnorm's metadata (as
/// a framework's own export has them).
fn without_metadata(layers: &[Layer]) -> Checkpoint {
    let mut ckpt = Checkpoint::default();
    for l in layers {
        ckpt.insert_layer(l, DType::F32).unwrap();
    }
    ckpt.metadata.clear();
    ckpt
}

#[test]
fn inspect_exit_status_is_a_linters() {
    let dir = TempDir::new("exit-status");
    let healthy = dir.path("healthy.safetensors");
    without_metadata(&[trained("bn", Format::Torch, 3)])
        .write(&healthy)
        .unwrap();
    let fresh = dir.path("fresh.safetensors");
    without_metadata(&[Layer::new("bn", Format::Torch, 3)])
        .write(&fresh)
        .unwrap();
    let garbage = dir.path("garbage.bin");
    std::fs::write(&garbage, b"this is no checkpoint at all").unwrap();
    for json in [false, true] {
        let run = |p: &Path| {
            let mut args = vec!["inspect", s(p)];
            if json {
                args.push("--json");
            }
            bnorm(&args)
        };
        let o = run(&healthy);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        let o = run(&fresh);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let o = run(&garbage);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(
            text(&o).contains("not a checkpoint bnorm can read"),
            "{}",
            text(&o)
        );
        let o = run(&dir.path("missing.safetensors"));
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    }
}

#[test]
fn inspect_says_why_statistics_were_never_updated_and_what_to_do() {
    let dir = TempDir::new("never-updated");
    let cases = [
        (Format::Torch, "bn", ".train()"),
        (Format::Keras, "batch_normalization", "training=True"),
        (Format::Flax, "BatchNorm_0", "mutable"),
    ];
    for (format, name, cause) in cases {
        let file = dir.path(&format!("{format}.safetensors"));
        without_metadata(&[Layer::new(name, format, 2)])
            .write(&file)
            .unwrap();
        let o = bnorm(&["inspect", s(&file), "--json"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let v = json_of(&o);
        let l = &v[0];
        assert_eq!(l["name"], name);
        assert_eq!(l["problems"], serde_json::json!(["never_updated"]));
        assert_eq!(l["file_format"], "safetensors");
        let why = l["explanations"]["never_updated"].as_str().unwrap();
        assert!(why.contains(cause), "{format}: {why}");
        let o = bnorm(&["inspect", s(&file)]);
        assert!(text(&o).contains(cause), "{format}: {}", text(&o));
    }
}

#[test]
fn inspect_marks_assumed_eps_and_takes_the_real_one() {
    // bn4 is a BatchNorm1d(eps=1e-3); a state dict does not store eps.
    let file = real_torch_file();
    let o = bnorm(&["inspect", s(&file), "--json"]);
    let v = json_of(&o);
    let bn4 = v
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "bn4")
        .unwrap();
    assert_eq!(bn4["eps"], 1e-5);
    assert_eq!(bn4["provenance"]["eps"], "assumed");
    assert_eq!(bn4["provenance"]["momentum"], "assumed");
    let plain = text(&bnorm(&["inspect", s(&file)]));
    let line = plain.lines().find(|l| l.starts_with("bn4 ")).unwrap();
    assert!(line.contains("eps 1e-5 (assumed)"), "{plain}");

    let o = bnorm(&[
        "inspect",
        s(&file),
        "--json",
        "--eps",
        "bn4=1e-3",
        "--momentum",
        "0.3",
    ]);
    let v = json_of(&o);
    let bn4 = v
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "bn4")
        .unwrap();
    assert_eq!(bn4["eps"], 1e-3);
    assert_eq!(bn4["provenance"]["eps"], "given");
    assert_eq!(bn4["provenance"]["momentum"], "given");
    assert_eq!(bn4["momentum"], "new_weight 0.3");
    let bn1 = &v[0];
    assert_eq!(bn1["eps"], 1e-5);
    assert_eq!(bn1["provenance"]["eps"], "assumed");

    let o = bnorm(&["inspect", s(&file), "--eps", "bn9=1e-3"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("bn9"), "{}", text(&o));
}

#[test]
fn fold_uses_the_given_eps() {
    let dir = TempDir::new("fold-eps");
    let mut bn = trained("bn1", Format::Torch, 2);
    bn.running_var = Some(vec![1e-3, 2e-3]);
    let mut ckpt = without_metadata(std::slice::from_ref(&bn));
    ckpt.tensors.insert(
        "fc.weight".into(),
        Tensor::from_f64(&[1.0, 0.5, -0.5, 2.0], vec![2, 2], DType::F64),
    );
    let input = dir.path("in.safetensors");
    ckpt.write(&input).unwrap();
    let output = dir.path("out.safetensors");
    let o = bnorm(&[
        "fold",
        s(&input),
        s(&output),
        "--pairs",
        "fc:bn1",
        "--eps",
        "1e-3",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let b = Checkpoint::read(&output).unwrap().tensors["fc.bias"]
        .to_f64("b")
        .unwrap();
    for (c, got) in b.iter().enumerate() {
        let scale =
            bn.weight.as_ref().unwrap()[c] / (bn.running_var.as_ref().unwrap()[c] + 1e-3).sqrt();
        let want = bn.bias.as_ref().unwrap()[c] - bn.running_mean.as_ref().unwrap()[c] * scale;
        assert!(
            (got - want).abs() < 1e-5 * want.abs().max(1.0),
            "{c}: {got} {want}"
        );
    }
    // Without --eps, fold says it assumed one.
    let o = bnorm(&["fold", s(&input), s(&output), "--pairs", "fc:bn1"]);
    assert!(text(&o).contains("assumed"), "{}", text(&o));
}

#[test]
fn convert_honours_a_recorded_unbiased_variance_of_fused_keras_layers() {
    let dir = TempDir::new("fused");
    let mut l = trained("bn", Format::Keras, 3);
    l.variance = bnorm::VarianceEstimator::Unbiased;
    let mut ckpt = without_metadata(std::slice::from_ref(&l));
    // What the Keras reader records for a fused tf_keras layer.
    ckpt.metadata
        .insert("bnorm.layer.bn.variance".into(), "unbiased".into());
    let input = dir.path("keras.safetensors");
    ckpt.write(&input).unwrap();
    let o = bnorm(&["inspect", s(&input), "--json"]);
    assert_eq!(json_of(&o)[0]["running_variance"], "unbiased");
    let torch = dir.path("torch.safetensors");
    let o = bnorm(&[
        "convert",
        s(&input),
        s(&torch),
        "--to",
        "torch",
        "--batch-size",
        "288",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let t = Checkpoint::read(&torch).unwrap();
    let var = t.tensors["bn.running_var"].to_f64("v").unwrap();
    for (g, w) in var.iter().zip(l.running_var.as_ref().unwrap()) {
        assert!((g - w).abs() <= 1e-6 * w, "rescaled: {g} vs {w}");
    }
    let flax = dir.path("flax.safetensors");
    let o = bnorm(&[
        "convert",
        s(&input),
        s(&flax),
        "--to",
        "flax",
        "--batch-size",
        "288",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let f = Checkpoint::read(&flax).unwrap();
    let var = f.tensors["batch_stats/bn/var"].to_f64("v").unwrap();
    for (g, w) in var.iter().zip(l.running_var.as_ref().unwrap()) {
        assert!((g - w * 287.0 / 288.0).abs() <= 1e-6 * w, "{g} vs {w}");
    }
    // inspect says the estimator is recorded, not assumed.
    let o = bnorm(&["inspect", s(&input), "--json"]);
    assert_eq!(json_of(&o)[0]["provenance"]["running_variance"], "recorded");
}

#[test]
fn fold_refuses_a_batch_norm_or_layer_named_twice() {
    let dir = TempDir::new("fold-twice");
    let mut ckpt = without_metadata(&[trained("bn1", Format::Torch, 2)]);
    for n in ["conv1", "dw"] {
        ckpt.tensors.insert(
            format!("{n}.weight"),
            Tensor::from_f64(&[1.0; 8], vec![2, 1, 2, 2], DType::F32),
        );
    }
    let input = dir.path("in.safetensors");
    ckpt.write(&input).unwrap();
    for pairs in ["conv1:bn1,conv1:bn1", "conv1:bn1,dw:bn1"] {
        let out = dir.path("out.safetensors");
        let o = bnorm(&["fold", s(&input), s(&out), "--pairs", pairs]);
        assert!(!o.status.success(), "{pairs}: {}", text(&o));
        assert!(
            text(&o).contains("bn1") && text(&o).contains("more than once"),
            "{}",
            text(&o)
        );
        assert!(!out.exists());
    }
}

#[test]
fn converted_layers_load_in_pytorch_and_do_not_read_as_never_updated() {
    let dir = TempDir::new("to-torch");
    let mut keras = trained("bn", Format::Keras, 3);
    keras.bias = None; // Keras center=False
    let mut flax = trained("scale_free", Format::Flax, 2);
    flax.weight = None; // Flax use_scale=False
    let input = dir.path("in.safetensors");
    without_metadata(&[keras, flax]).write(&input).unwrap();
    let out = dir.path("torch.safetensors");
    let o = bnorm(&[
        "convert",
        s(&input),
        s(&out),
        "--to",
        "torch",
        "--keep-variance",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("bias"), "{}", text(&o));
    let t = Checkpoint::read(&out).unwrap();
    // PyTorch's affine BatchNorm has weight and bias; strict loading needs both and the count.
    for n in ["bn.weight", "bn.bias", "bn.num_batches_tracked"] {
        assert!(t.tensors.contains_key(n), "{n}");
    }
    assert_eq!(t.tensors["bn.bias"].to_f64("b").unwrap(), vec![0.0; 3]);
    assert_eq!(
        t.tensors["scale_free.weight"].to_f64("w").unwrap(),
        vec![1.0; 2]
    );
    let o = bnorm(&["inspect", s(&out), "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    for l in json_of(&o).as_array().unwrap() {
        assert_eq!(l["problems"], serde_json::json!([]), "{l}");
    }
}

#[test]
fn a_lone_module_and_a_submodule_named_params_are_found() {
    let dir = TempDir::new("lone");
    let lone = dir.path("lone.safetensors");
    let mut ckpt = without_metadata(&[trained("x", Format::Torch, 3)]);
    ckpt.tensors = std::mem::take(&mut ckpt.tensors)
        .into_iter()
        .map(|(k, v)| (k.trim_start_matches("x.").to_string(), v))
        .collect();
    ckpt.write(&lone).unwrap();
    let o = bnorm(&["inspect", s(&lone), "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v = json_of(&o);
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["name"], "");
    assert_eq!(v[0]["channels"], 3);
    let t = text(&bnorm(&["inspect", s(&lone)]));
    assert!(t.contains("1 batch-norm layer(s)"), "{t}");
}

#[test]
fn a_submodule_named_params_is_not_a_flax_collection() {
    let dir = TempDir::new("params");
    let nested = dir.path("params.safetensors");
    without_metadata(&[
        trained("params.bn", Format::Torch, 2),
        trained("params/kbn", Format::Keras, 2),
    ])
    .write(&nested)
    .unwrap();
    let o = bnorm(&["inspect", s(&nested), "--json"]);
    let v = json_of(&o);
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["params.bn", "params/kbn"], "{v}");
}

#[cfg(unix)]
#[test]
fn an_output_replacing_a_private_file_stays_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("atomic-mode");
    let input = dir.path("in.safetensors");
    without_metadata(&[trained("bn", Format::Torch, 2)])
        .write(&input)
        .unwrap();
    let private = dir.path("private.safetensors");
    std::fs::write(&private, b"old").unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = bnorm(&[
        "convert",
        s(&input),
        s(&private),
        "--to",
        "flax",
        "--keep-variance",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn an_output_may_have_a_250_byte_name() {
    let dir = TempDir::new("atomic-long");
    let input = dir.path("in.safetensors");
    without_metadata(&[trained("bn", Format::Torch, 2)])
        .write(&input)
        .unwrap();
    let long = dir.path(&format!("{}.safetensors", "m".repeat(238)));
    assert_eq!(long.file_name().unwrap().len(), 250);
    let o = bnorm(&[
        "convert",
        s(&input),
        s(&long),
        "--to",
        "flax",
        "--keep-variance",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(Checkpoint::read(&long).is_ok());
}

#[cfg(unix)]
#[test]
fn an_output_symlink_is_written_through() {
    let dir = TempDir::new("atomic-link");
    let input = dir.path("in.safetensors");
    without_metadata(&[trained("bn", Format::Torch, 2)])
        .write(&input)
        .unwrap();
    let target = dir.path("target.safetensors");
    std::fs::write(&target, b"old").unwrap();
    let link = dir.path("link.safetensors");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let o = bnorm(&[
        "convert",
        s(&input),
        s(&link),
        "--to",
        "flax",
        "--keep-variance",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(
        Checkpoint::read(&target).is_ok(),
        "written through the link"
    );
}

#[test]
fn notes_say_conventions_in_words() {
    let dir = TempDir::new("words");
    let mut l = trained("bn", Format::Torch, 2);
    l.momentum = bnorm::Momentum::NewWeight(0.3);
    let mut ckpt = Checkpoint::default();
    ckpt.insert_layer(&l, DType::F32).unwrap();
    let input = dir.path("in.safetensors");
    ckpt.write(&input).unwrap();
    let o = bnorm(&[
        "convert",
        s(&input),
        s(&dir.path("k.safetensors")),
        "--to",
        "keras",
        "--keep-variance",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(!t.contains("Decay(") && !t.contains("NewWeight("), "{t}");
    assert!(t.contains("momentum=0.7"), "{t}");
}

#[test]
fn fold_suggests_transposed_when_the_shape_fits_a_transposed_convolution() {
    let dir = TempDir::new("fold-transposed");
    let mut ckpt = without_metadata(&[trained("bn", Format::Torch, 4)]);
    // ConvTranspose2d(3, 4, 2): weight (in=3, out=4, 2, 2).
    ckpt.tensors.insert(
        "up.weight".into(),
        Tensor::from_f64(&[0.5; 48], vec![3, 4, 2, 2], DType::F32),
    );
    let input = dir.path("in.safetensors");
    ckpt.write(&input).unwrap();
    let out = dir.path("out.safetensors");
    let o = bnorm(&["fold", s(&input), s(&out), "--pairs", "up:bn"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("up:bn:transposed") && t.contains("[3, 4, 2, 2]"),
        "{t}"
    );
    let o = bnorm(&["fold", s(&input), s(&out), "--pairs", "up:bn:transposed"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn fold_into_the_following_layer() {
    let dir = TempDir::new("fold-following");
    let bn = trained("bn", Format::Torch, 2);
    let mut ckpt = without_metadata(std::slice::from_ref(&bn));
    ckpt.tensors.insert(
        "fc.weight".into(),
        Tensor::from_f64(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![3, 2], DType::F64),
    );
    ckpt.tensors.insert(
        "conv.weight".into(),
        Tensor::from_f64(&[1.0; 8], vec![1, 2, 2, 2], DType::F64),
    );
    let input = dir.path("in.safetensors");
    ckpt.write(&input).unwrap();
    let out = dir.path("out.safetensors");
    let o = bnorm(&["fold", s(&input), s(&out), "--pairs", "bn:fc"]);
    assert!(o.status.success(), "{}", text(&o));
    let f = Checkpoint::read(&out).unwrap();
    assert!(f.layers().unwrap().is_empty());
    let w = f.tensors["fc.weight"].to_f64("w").unwrap();
    let b = f.tensors["fc.bias"].to_f64("b").unwrap();
    let (g, be, m, v) = (
        bn.weight.as_ref().unwrap(),
        bn.bias.as_ref().unwrap(),
        bn.running_mean.as_ref().unwrap(),
        bn.running_var.as_ref().unwrap(),
    );
    let scale: Vec<f64> = (0..2).map(|c| g[c] / (v[c] + 1e-5).sqrt()).collect();
    let shift: Vec<f64> = (0..2).map(|c| be[c] - m[c] * scale[c]).collect();
    let w0 = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    for o in 0..3 {
        let want_b: f64 = (0..2).map(|c| w0[o * 2 + c] * shift[c]).sum();
        // The batch norm is stored in f32.
        assert!((b[o] - want_b).abs() < 1e-6 * want_b.abs().max(1.0), "{o}");
        for c in 0..2 {
            assert!((w[o * 2 + c] - w0[o * 2 + c] * scale[c]).abs() < 1e-6 * w0[o * 2 + c]);
        }
    }
    // A convolution's padding is not in the checkpoint: the user says it.
    let o = bnorm(&["fold", s(&input), s(&out), "--pairs", "bn:conv"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("bn:conv:unpadded"), "{}", text(&o));
    let o = bnorm(&["fold", s(&input), s(&out), "--pairs", "bn:conv:unpadded"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn convert_renames_prefixes() {
    let dir = TempDir::new("rename");
    let mut ckpt = without_metadata(&[trained("backbone.bn1", Format::Torch, 2)]);
    ckpt.tensors.insert(
        "backbone.conv1.weight".into(),
        Tensor::from_f64(&[1.0; 4], vec![2, 2], DType::F32),
    );
    let input = dir.path("in.safetensors");
    ckpt.write(&input).unwrap();
    let out = dir.path("out.safetensors");
    let o = bnorm(&[
        "convert",
        s(&input),
        s(&out),
        "--to",
        "keras",
        "--keep-variance",
        "--rename",
        "backbone.=features/",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let k = Checkpoint::read(&out).unwrap();
    assert!(
        k.tensors.contains_key("features/bn1/moving_mean"),
        "{:?}",
        k.tensors.keys()
    );
    assert!(
        k.tensors.contains_key("features/conv1.weight"),
        "{:?}",
        k.tensors.keys()
    );
    let layers = k.layers().unwrap();
    assert_eq!(layers[0].name, "features/bn1");
    assert_eq!(layers[0].momentum, bnorm::Momentum::Decay(0.9));
    let o = bnorm(&[
        "convert",
        s(&input),
        s(&out),
        "--to",
        "keras",
        "--rename",
        "nothing.=x.",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("nothing."), "{}", text(&o));
}

/// A fixture written by a framework (crates/bnorm-interop/tests/data/<format>/).
fn framework_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../bnorm-interop/tests/data")
        .join(rel)
}

/// `inspect` reads the files as each framework saved them and tells the classic bug — the
/// moving statistics never updated — in the words of that framework, with exit status 1;
/// the same models after training are healthy (exit 0).
#[test]
fn inspect_reads_every_framework_and_names_the_cause_of_never_updated_statistics() {
    let cases: [(&str, &str, &str); 4] = [
        ("torch/untrained.pt", "pytorch", ".train()"),
        ("tf/classic_norun", "tensorflow-checkpoint", "UPDATE_OPS"),
        ("keras/k3_fresh.keras", "keras", "training=True"),
        ("flax/linen_init.msgpack", "flax-msgpack", "mutable"),
    ];
    for (rel, file_format, cause) in cases {
        let o = bnorm(&["inspect", "--json", s(&framework_file(rel))]);
        assert_eq!(o.status.code(), Some(1), "{rel}: {}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let layers = v.as_array().unwrap();
        assert!(!layers.is_empty(), "{rel}");
        let never: Vec<_> = layers
            .iter()
            .filter(|l| {
                l["problems"]
                    .as_array()
                    .unwrap()
                    .contains(&serde_json::json!("never_updated"))
            })
            .collect();
        assert!(!never.is_empty(), "{rel}: {v}");
        for l in never {
            assert_eq!(l["file_format"], file_format, "{rel}");
            let why = l["explanations"]["never_updated"].as_str().unwrap();
            assert!(why.contains(cause), "{rel}: {why}");
        }
    }
    for rel in [
        "torch/trained.pt",
        "tf/classic_run",
        "keras/k3_trained.keras",
        "flax/linen_trained.msgpack",
    ] {
        let o = bnorm(&["inspect", "--json", s(&framework_file(rel))]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for l in v.as_array().unwrap() {
            let p = l["problems"].as_array().unwrap();
            assert!(
                !p.contains(&serde_json::json!("never_updated")),
                "{rel}: {l}"
            );
        }
    }
    // A pickle that calls something a state dict never needs is refused, not run: exit 2.
    let o = bnorm(&["inspect", s(&framework_file("torch/forbidden.pt"))]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("does not execute"), "{}", text(&o));
}
