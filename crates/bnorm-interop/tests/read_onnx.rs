//! The ONNX reader against models built by the onnx package and exported by PyTorch
//! (`tests/data/onnx/make_onnx.py`) and the values those reported
//! (`tests/data/onnx/expected.json`), and against hostile files.

mod common;

use common::floats;

use bnorm::{Momentum, VarianceEstimator};
use bnorm_interop::read::{read_bytes, FileFormat};
use bnorm_interop::{BnAffine, Checkpoint, Format, InteropError, Layer};
use safetensors::Dtype;
use serde_json::Value;

fn fixture(name: &str) -> Vec<u8> {
    common::fixture_bytes("onnx", name)
}

fn expected() -> Value {
    common::expected_json("onnx")
}

fn read(file: &str) -> Checkpoint {
    let loaded = read_bytes(&fixture(file)).unwrap();
    assert_eq!(loaded.file_format, FileFormat::Onnx);
    loaded.checkpoint
}

/// Every BatchNormalization node the onnx package reported is a layer under `prefix(node)`
/// with the node's values (bit for bit), eps and momentum (as the f32 attribute), and the
/// expected variance estimator; there is no other layer.
fn check_nodes(
    ckpt: &Checkpoint,
    nodes: &Value,
    prefix: impl Fn(&Value) -> String,
    variance: VarianceEstimator,
) -> Vec<Layer> {
    let layers = ckpt.layers().unwrap();
    let nodes = nodes.as_array().unwrap();
    assert_eq!(layers.len(), nodes.len());
    for n in nodes {
        let p = prefix(n);
        let l = layers
            .iter()
            .find(|l| l.name == p)
            .unwrap_or_else(|| panic!("no layer {p}"));
        assert_eq!(l.format, Format::Torch);
        assert_eq!(l.weight, Some(floats(&n["scale"])), "{p}");
        assert_eq!(l.bias, Some(floats(&n["B"])), "{p}");
        assert_eq!(l.running_mean, Some(floats(&n["input_mean"])), "{p}");
        assert_eq!(l.running_var, Some(floats(&n["input_var"])), "{p}");
        assert_eq!(l.channels, floats(&n["scale"]).len());
        // The attribute is a float32: the recorded value is its shortest decimal.
        let eps = n["epsilon"].as_f64().unwrap();
        assert_eq!(l.eps as f32, eps as f32, "{p}");
        let m = n["momentum"].as_f64().unwrap();
        match l.momentum {
            Momentum::Decay(d) => assert_eq!(d as f32, m as f32, "{p}"),
            other => panic!("{p}: {other:?}"),
        }
        assert!(l.conventions_recorded);
        assert_eq!(l.variance, variance);
        assert_eq!(l.num_batches_tracked, None);
        let training = ckpt
            .metadata
            .get(&format!("bnorm.layer.{p}.onnx_training_mode"))
            .map(String::as_str);
        let want = (n["training_mode"].as_i64() == Some(1)).then_some("1");
        assert_eq!(training, want, "{p}");
        l.to_batchnorm().unwrap();
        BnAffine::from_layer(l).unwrap();
    }
    layers
}

#[test]
fn helper_model_matches_onnx() {
    let exp = expected();
    let ckpt = read("helper_bn.onnx");
    let layers = check_nodes(
        &ckpt,
        &exp["helper_bn.onnx"]["nodes"],
        |n| {
            let name = n["name"].as_str().unwrap();
            if name.is_empty() {
                // Unnamed: the scale initializer's name less `.weight`.
                n["inputs"][1]
                    .as_str()
                    .unwrap()
                    .strip_suffix(".weight")
                    .unwrap()
                    .to_string()
            } else {
                name.to_string()
            }
        },
        VarianceEstimator::Biased,
    );
    let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        ["blk.norm", "bn_a", "bn_b", "bn_const", "bn_f64", "bn_train"]
    );
    let f64_layer = layers.iter().find(|l| l.name == "bn_f64").unwrap();
    assert_eq!(f64_layer.dtype, bnorm::element::DType::F64);
    // Defaults of the ONNX specification when the attributes are absent.
    let b = layers.iter().find(|l| l.name == "bn_b").unwrap();
    assert_eq!((b.eps, b.momentum), (1e-5, Momentum::Decay(0.9)));
    // The Conv weight is kept; batch-norm initializers only under the layer's names.
    let w = &ckpt.tensors["conv.weight"];
    assert_eq!((w.dtype, w.shape.clone()), (Dtype::F32, vec![3, 2, 3, 3]));
    assert!(!ckpt.tensors.contains_key("a.weight"));
    assert!(!ckpt.tensors.contains_key("a.mean"));
    assert!(ckpt.tensors.contains_key("bn_a.running_var"));
    assert!(!ckpt
        .tensors
        .keys()
        .any(|k| k.ends_with("num_batches_tracked")));
}

#[test]
fn torch_export_matches_onnx_and_pytorch() {
    let exp = expected();
    let t = &exp["torch_bn.onnx"];
    assert_eq!(t["producer_name"], "pytorch");
    let ckpt = read("torch_bn.onnx");
    let layers = check_nodes(
        &ckpt,
        &t["nodes"],
        |n| n["name"].as_str().unwrap().to_string(),
        VarianceEstimator::Unbiased,
    );
    // Against PyTorch's own modules: the running statistics, eps, and momentum 1 - m.
    for (module, node) in [
        ("1", "/1/BatchNormalization"),
        ("4", "/4/BatchNormalization"),
    ] {
        let m = &t["torch_modules"][module];
        let l = layers.iter().find(|l| l.name == node).unwrap();
        assert_eq!(l.running_var, Some(floats(&m["running_var"])));
        assert_eq!(l.running_mean, Some(floats(&m["running_mean"])));
        assert_eq!(l.eps as f32, m["eps"].as_f64().unwrap() as f32);
        let torch_m = m["momentum"].as_f64().unwrap();
        assert_eq!(l.momentum, Momentum::Decay(1.0 - torch_m));
        // The Linear and Conv weights are kept under PyTorch's names.
        assert!(ckpt.tensors.contains_key("0.weight"));
        assert!(ckpt.tensors.contains_key("3.weight"));
    }
}

#[test]
fn torch_training_export_is_noted() {
    let exp = expected();
    let t = &exp["torch_bn.onnx"]["train_export"];
    let ckpt = read("torch_bn_train.onnx");
    check_nodes(
        &ckpt,
        &t["nodes"],
        |n| n["name"].as_str().unwrap().to_string(),
        VarianceEstimator::Unbiased,
    );
    assert_eq!(
        ckpt.metadata["bnorm.layer./1/BatchNormalization.onnx_training_mode"],
        "1"
    );
}

fn unreadable(bytes: &[u8]) -> String {
    match read_bytes(bytes) {
        Err(e @ InteropError::Unreadable { format, .. }) => {
            assert_eq!(format, "onnx");
            e.to_string()
        }
        other => panic!("expected an onnx refusal, got {other:?}"),
    }
}

#[test]
fn external_data_is_refused_clearly() {
    let e = unreadable(&fixture("external_bn.onnx"));
    assert!(e.contains("external data"), "{e}");
}

// --------------------------------------------------------------- hand-made protobuf

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

fn field(n: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = varint(u64::from(n) << 3 | 2);
    v.extend(varint(payload.len() as u64));
    v.extend(payload);
    v
}

fn field_varint(n: u32, x: u64) -> Vec<u8> {
    let mut v = varint(u64::from(n) << 3);
    v.extend(varint(x));
    v
}

fn field_f32(n: u32, x: f32) -> Vec<u8> {
    let mut v = varint(u64::from(n) << 3 | 5);
    v.extend(x.to_le_bytes());
    v
}

fn tensor(name: &str, dims: &[u64], raw: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    for &d in dims {
        t.extend(field_varint(1, d));
    }
    t.extend(field_varint(2, 1));
    t.extend(field(8, name.as_bytes()));
    t.extend(field(9, raw));
    t
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bn_node(name: &str, inputs: &[&str], attrs: &[Vec<u8>]) -> Vec<u8> {
    let mut n = Vec::new();
    for i in inputs {
        n.extend(field(1, i.as_bytes()));
    }
    n.extend(field(2, b"y"));
    n.extend(field(3, name.as_bytes()));
    n.extend(field(4, b"BatchNormalization"));
    for a in attrs {
        n.extend(field(5, a));
    }
    n
}

fn model(graph: &[u8]) -> Vec<u8> {
    let mut m = field_varint(1, 8);
    m.extend(field(2, b"test"));
    m.extend(field(7, graph));
    m
}

/// A model with one BatchNormalization node "bn" over initializers s, b, m, v (2
/// channels), its var initializer replaced by `var`, and extra node attributes.
fn bn_model(var: Vec<u8>, attrs: &[Vec<u8>]) -> Vec<u8> {
    let mut g = field(1, &bn_node("bn", &["x", "s", "b", "m", "v"], attrs));
    for (name, vals) in [("s", [1.0, 2.0]), ("b", [0.0, 0.5]), ("m", [0.5, -0.5])] {
        g.extend(field(5, &tensor(name, &[2], &f32s(&vals))));
    }
    g.extend(field(5, &var));
    model(&g)
}

fn attr_f(name: &str, f: f32) -> Vec<u8> {
    let mut a = field(1, name.as_bytes());
    a.extend(field_f32(2, f));
    a
}

fn attr_i(name: &str, i: u64) -> Vec<u8> {
    let mut a = field(1, name.as_bytes());
    a.extend(field_varint(3, i));
    a
}

#[test]
fn hand_made_model_reads() {
    let bytes = bn_model(
        tensor("v", &[2], &f32s(&[4.0, 0.25])),
        &[attr_f("epsilon", 1e-3)],
    );
    let ckpt = read_bytes(&bytes).unwrap().checkpoint;
    let layers = ckpt.layers().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0].running_var, Some(vec![4.0, 0.25]));
    assert_eq!(layers[0].eps, 1e-3);
    assert_eq!(layers[0].variance, VarianceEstimator::Biased);
}

#[test]
fn typed_float_data_reads() {
    // float_data (packed, field 4) instead of raw_data.
    let mut t = field_varint(1, 2);
    t.extend(field_varint(2, 1));
    t.extend(field(8, b"v"));
    t.extend(field(4, &f32s(&[4.0, 0.25])));
    let layers = read_bytes(&bn_model(t, &[]))
        .unwrap()
        .checkpoint
        .layers()
        .unwrap();
    assert_eq!(layers[0].running_var, Some(vec![4.0, 0.25]));
}

#[test]
fn hostile_tensors_and_nodes_are_refused() {
    // Dimensions whose product overflows, or claims more than the data holds.
    let e = unreadable(&bn_model(tensor("v", &[u64::MAX / 2, 4], &[0; 8]), &[]));
    assert!(e.contains("invalid") || e.contains("overflows"), "{e}");
    let e = unreadable(&bn_model(tensor("v", &[1 << 40], &[0; 8]), &[]));
    assert!(e.contains("needs"), "{e}");
    // A negative dimension (int64 -1).
    let e = unreadable(&bn_model(tensor("v", &[u64::MAX], &[0; 8]), &[]));
    assert!(e.contains("dimension"), "{e}");
    // Typed data whose count does not match the shape.
    let mut t = field_varint(1, 1000);
    t.extend(field_varint(2, 1));
    t.extend(field(8, b"v"));
    t.extend(field(4, &f32s(&[4.0])));
    unreadable(&bn_model(t, &[]));
    // Attributes out of range; the non-spatial mode.
    let v = || tensor("v", &[2], &f32s(&[4.0, 0.25]));
    let e = unreadable(&bn_model(v(), &[attr_f("epsilon", -1.0)]));
    assert!(e.contains("epsilon"), "{e}");
    let e = unreadable(&bn_model(v(), &[attr_f("momentum", f32::NAN)]));
    assert!(e.contains("momentum"), "{e}");
    let e = unreadable(&bn_model(v(), &[attr_i("spatial", 0)]));
    assert!(e.contains("spatial"), "{e}");
    // An input that is not stored.
    let e = unreadable(&bn_model(tensor("other", &[2], &f32s(&[1.0, 1.0])), &[]));
    assert!(e.contains("not a stored value"), "{e}");
    // A required input left empty.
    let g = field(1, &bn_node("bn", &["x", "", "b", "m", "v"], &[]));
    let e = unreadable(&model(&g));
    assert!(e.contains("missing"), "{e}");
    // Too few inputs.
    let g = field(1, &bn_node("bn", &["x", "s"], &[]));
    let e = unreadable(&model(&g));
    assert!(e.contains("inputs"), "{e}");
    // Two initializers of one name.
    let mut g = field(5, &tensor("s", &[1], &f32s(&[1.0])));
    g.extend(field(5, &tensor("s", &[1], &f32s(&[1.0]))));
    unreadable(&model(&g));
    // No graph; a graph claiming more bytes than the file has; wrong wire types.
    unreadable(&[0x08, 0x07, 0x12, 0x00]);
    unreadable(&[0x08, 0x07, 0x3a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0]);
    unreadable(&[0x08, 0x07, 0x12, 0x00, 0x38, 0x01]);
    unreadable(&model(&[0x0b]));
}

#[test]
fn deep_or_repeated_structures_stay_bounded() {
    // The reader walks a fixed depth (model, graph, node, attribute, tensor) and never
    // descends into subgraphs, so nesting cannot exhaust the stack; many nodes of one
    // name read, the later ones with suffixes _1, _2, ….
    let mut g = Vec::new();
    for (name, vals) in [("s", [1.0, 2.0]), ("b", [0.0, 0.5]), ("m", [0.5, -0.5])] {
        g.extend(field(5, &tensor(name, &[2], &f32s(&vals))));
    }
    g.extend(field(5, &tensor("v", &[2], &f32s(&[1.0, 1.0]))));
    for _ in 0..500 {
        g.extend(field(1, &bn_node("bn", &["x", "s", "b", "m", "v"], &[])));
    }
    let ckpt = read_bytes(&model(&g)).unwrap().checkpoint;
    assert_eq!(ckpt.layers().unwrap().len(), 500);
    assert!(ckpt.tensors.contains_key("bn_499.running_var"));
}

#[test]
fn random_bytes_are_not_claimed() {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut claimed = 0;
    for _ in 0..20_000 {
        let bytes: Vec<u8> = (0..32)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect();
        if let Err(InteropError::Unreadable { format: "onnx", .. }) | Ok(_) = read_bytes(&bytes) {
            if bytes[0] == 0x08 {
                claimed += 1;
            }
        }
    }
    // Only files starting with field 1 as a varint can be claimed, and few of those.
    assert!(claimed < 20, "{claimed}");
}

#[test]
fn every_truncation_is_handled() {
    for file in [
        "helper_bn.onnx",
        "torch_bn.onnx",
        "torch_bn_train.onnx",
        "external_bn.onnx",
    ] {
        let bytes = fixture(file);
        let mut refused = 0;
        for n in 0..bytes.len() {
            match read_bytes(&bytes[..n]) {
                Err(InteropError::Unreadable { format: "onnx", .. })
                | Err(InteropError::UnknownFormat { .. }) => refused += 1,
                // A cut between two top-level fields after the graph leaves a valid model.
                Ok(loaded) => {
                    assert!(n > bytes.len() / 2, "{file}: prefix {n} read");
                    common::consume(&loaded.checkpoint);
                }
                Err(e) => panic!("{file}: prefix {n}: {e}"),
            }
        }
        assert!(refused > bytes.len() * 9 / 10, "{file}");
    }
}

#[test]
fn bit_flips_never_panic() {
    for file in ["helper_bn.onnx", "torch_bn.onnx"] {
        let bytes = fixture(file);
        for i in 0..bytes.len() {
            for mask in [0x01u8, 0x08, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] ^= mask;
                common::read_and_consume(&b);
            }
        }
    }
}

#[test]
fn fuzz_corpus_replays_without_panic() {
    for bytes in common::corpus("read_onnx", 8) {
        common::read_and_consume(&bytes);
    }
}
