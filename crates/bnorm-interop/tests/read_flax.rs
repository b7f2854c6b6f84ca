//! The Flax msgpack reader against files written by Flax itself
//! (`tests/data/flax/make_flax.py`) and the values Flax reported for them
//! (`tests/data/flax/expected.json`), and against hostile files.

mod common;

use common::floats;

use bnorm::Momentum;
use bnorm_interop::read::{read_bytes, FileFormat};
use bnorm_interop::{BnAffine, Format, InteropError, Layer};
use safetensors::Dtype;
use serde_json::Value;

fn fixture(name: &str) -> Vec<u8> {
    common::fixture_bytes("flax", name)
}

fn expected() -> Value {
    common::expected_json("flax")
}

fn layers_of(file: &str) -> Vec<Layer> {
    let loaded = read_bytes(&fixture(file)).unwrap();
    assert_eq!(loaded.file_format, FileFormat::Flax);
    assert!(
        loaded.checkpoint.metadata.is_empty(),
        "Flax stores no conventions"
    );
    loaded.checkpoint.layers().unwrap()
}

/// Every layer Flax reported, with its values (bit for bit: float32 values printed as
/// doubles), no other layer, and Flax's default conventions (nothing is recorded).
fn check_against_flax(file: &str) {
    let exp = expected();
    let want = exp[file]["layers"].as_object().unwrap();
    let layers = layers_of(file);
    let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
    let mut want_names: Vec<&str> = want.keys().map(String::as_str).collect();
    want_names.sort();
    assert_eq!(names, want_names, "{file}");
    for l in &layers {
        let w = &want[&l.name];
        assert_eq!(l.format, Format::Flax);
        assert_eq!(l.channels, floats(&w["mean"]).len());
        assert_eq!(
            l.running_mean.as_ref(),
            Some(&floats(&w["mean"])),
            "{}",
            l.name
        );
        assert_eq!(
            l.running_var.as_ref(),
            Some(&floats(&w["var"])),
            "{}",
            l.name
        );
        assert_eq!(l.weight, w.get("scale").map(floats), "{} scale", l.name);
        assert_eq!(l.bias, w.get("bias").map(floats), "{} bias", l.name);
        assert_eq!(l.eps, 1e-5);
        assert_eq!(l.momentum, Momentum::Decay(0.99));
        assert!(!l.conventions_recorded);
        assert_eq!(l.dtype, bnorm::element::DType::F32);
        l.to_batchnorm().unwrap();
        BnAffine::from_layer(l).unwrap();
    }
}

#[test]
fn linen_init_matches_flax() {
    check_against_flax("linen_init.msgpack");
    let layers = layers_of("linen_init.msgpack");
    // use_scale=False and use_bias=False.
    let bn1 = layers
        .iter()
        .find(|l| l.name == "Block_0/BatchNorm_1")
        .unwrap();
    assert!(bn1.weight.is_none() && bn1.bias.is_some());
    let head = layers.iter().find(|l| l.name == "head_bn").unwrap();
    assert!(head.weight.is_some() && head.bias.is_none());
}

#[test]
fn linen_trained_train_state_matches_flax() {
    check_against_flax("linen_trained.msgpack");
    let ckpt = read_bytes(&fixture("linen_trained.msgpack"))
        .unwrap()
        .checkpoint;
    // Tensors that are not batch norm are kept: the variables under Flax names, the rest
    // of the TrainState under its full path.
    let k = &ckpt.tensors["params/Dense_0/kernel"];
    assert_eq!((k.dtype, k.shape.clone()), (Dtype::F32, vec![50, 4]));
    let step = &ckpt.tensors["state/step"];
    assert_eq!(step.dtype, Dtype::I64);
    assert!(step.shape.is_empty());
    assert_eq!(step.bytes, 3i64.to_le_bytes());
    assert!(!ckpt.tensors.keys().any(|n| n.starts_with("state/params")));
}

#[test]
fn linen_partitioned_matches_flax() {
    check_against_flax("linen_partitioned.msgpack");
    let ckpt = read_bytes(&fixture("linen_partitioned.msgpack"))
        .unwrap()
        .checkpoint;
    assert!(ckpt.tensors.contains_key("params/bn/scale"));
    assert!(ckpt.tensors.contains_key("params/bn/bias"));
}

#[test]
fn nnx_pure_dict_matches_flax() {
    check_against_flax("nnx_pure.msgpack");
    let ckpt = read_bytes(&fixture("nnx_pure.msgpack")).unwrap().checkpoint;
    assert!(ckpt.tensors.contains_key("conv/kernel"));
    assert!(ckpt.tensors.contains_key("params/bn1/scale"));
    assert!(ckpt.tensors.contains_key("batch_stats/blocks/0/var"));
}

#[test]
fn nnx_value_leaves_match_flax() {
    check_against_flax("nnx_value_leaves.msgpack");
    let ckpt = read_bytes(&fixture("nnx_value_leaves.msgpack"))
        .unwrap()
        .checkpoint;
    assert!(ckpt.tensors.contains_key("conv/kernel"));
}

#[test]
fn linen_layers_are_flax_names() {
    let ckpt = read_bytes(&fixture("linen_init.msgpack"))
        .unwrap()
        .checkpoint;
    for name in [
        "params/Block_0/BatchNorm_0/scale",
        "params/Block_0/BatchNorm_0/bias",
        "batch_stats/Block_0/BatchNorm_0/mean",
        "batch_stats/Block_0/BatchNorm_0/var",
        "params/Block_0/Conv_0/kernel",
    ] {
        assert!(ckpt.tensors.contains_key(name), "{name}");
    }
}

// ------------------------------------------------------------------ hand-made msgpack

fn str_(s: &str) -> Vec<u8> {
    assert!(s.len() < 32);
    let mut v = vec![0xa0 | s.len() as u8];
    v.extend(s.as_bytes());
    v
}

fn map(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    assert!(entries.len() < 16);
    let mut v = vec![0x80 | entries.len() as u8];
    for (k, x) in entries {
        v.extend(str_(k));
        v.extend(x);
    }
    v
}

/// Flax's ndarray extension: ext 1 holding msgpack (shape, dtype, buffer).
fn ndarray(shape: &[u64], dtype: &str, buffer: &[u8]) -> Vec<u8> {
    let mut payload = vec![0x93, 0x90 | shape.len() as u8];
    for &d in shape {
        payload.push(0xcf);
        payload.extend(d.to_be_bytes());
    }
    payload.extend(str_(dtype));
    payload.push(0xc6);
    payload.extend((buffer.len() as u32).to_be_bytes());
    payload.extend(buffer);
    let mut v = vec![0xc9];
    v.extend((payload.len() as u32).to_be_bytes());
    v.push(1);
    v.extend(payload);
    v
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bn_file(var: Vec<u8>) -> Vec<u8> {
    map(&[
        (
            "params",
            map(&[(
                "bn",
                map(&[("scale", ndarray(&[2], "float32", &f32s(&[1.0, 2.0])))]),
            )]),
        ),
        (
            "batch_stats",
            map(&[(
                "bn",
                map(&[
                    ("mean", ndarray(&[2], "float32", &f32s(&[0.5, -0.5]))),
                    ("var", var),
                ]),
            )]),
        ),
    ])
}

fn unreadable(bytes: &[u8]) -> String {
    match read_bytes(bytes) {
        Err(e @ InteropError::Unreadable { format, .. }) => {
            assert_eq!(format, "flax-msgpack");
            e.to_string()
        }
        other => panic!("expected a flax-msgpack refusal, got {other:?}"),
    }
}

#[test]
fn hand_made_file_reads() {
    let bytes = bn_file(ndarray(&[2], "float32", &f32s(&[4.0, 0.25])));
    let layers = read_bytes(&bytes).unwrap().checkpoint.layers().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0].running_var, Some(vec![4.0, 0.25]));
    assert_eq!(layers[0].weight, Some(vec![1.0, 2.0]));
}

#[test]
fn boxed_linen_variables_are_unwrapped() {
    // nn.Partitioned-style boxes: {'value': array} in place of the array.
    let boxed = |v: &[f32]| map(&[("value", ndarray(&[2], "float32", &f32s(v)))]);
    let bytes = map(&[
        (
            "params",
            map(&[("bn", map(&[("scale", boxed(&[1.0, 2.0]))]))]),
        ),
        (
            "batch_stats",
            map(&[(
                "bn",
                map(&[("mean", boxed(&[0.5, -0.5])), ("var", boxed(&[4.0, 0.25]))]),
            )]),
        ),
    ]);
    let layers = read_bytes(&bytes).unwrap().checkpoint.layers().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0].name, "bn");
    assert_eq!(layers[0].weight, Some(vec![1.0, 2.0]));
    assert_eq!(layers[0].running_var, Some(vec![4.0, 0.25]));
}

#[test]
fn half_precision_arrays_read() {
    // BatchNorm(param_dtype=jnp.bfloat16) stores bfloat16 scale/bias; float16 statistics.
    let bf16 = |v: &[f32]| -> Vec<u8> {
        v.iter()
            .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
            .collect()
    };
    let f16_one_and_quarter: Vec<u8> = [0x3c00u16, 0x3400]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let bytes = map(&[
        (
            "params",
            map(&[(
                "bn",
                map(&[("scale", ndarray(&[2], "bfloat16", &bf16(&[1.0, 2.0])))]),
            )]),
        ),
        (
            "batch_stats",
            map(&[(
                "bn",
                map(&[
                    ("mean", ndarray(&[2], "float16", &f16_one_and_quarter)),
                    ("var", ndarray(&[2], "float16", &f16_one_and_quarter)),
                ]),
            )]),
        ),
    ]);
    let layers = read_bytes(&bytes).unwrap().checkpoint.layers().unwrap();
    assert_eq!(layers[0].weight, Some(vec![1.0, 2.0]));
    assert_eq!(layers[0].running_var, Some(vec![1.0, 0.25]));
    assert_eq!(layers[0].dtype, bnorm::element::DType::F16);
}

#[test]
fn chunked_arrays_are_reassembled() {
    // Flax splits arrays over 2^30 bytes into chunks; the same layout, small.
    let chunked = map(&[
        ("__msgpack_chunked_array__", vec![0xc3]),
        ("shape", map(&[("0", vec![2])])),
        (
            "chunks",
            map(&[
                ("0", ndarray(&[1], "float32", &f32s(&[4.0]))),
                ("1", ndarray(&[1], "float32", &f32s(&[0.25]))),
            ]),
        ),
    ]);
    let layers = read_bytes(&bn_file(chunked))
        .unwrap()
        .checkpoint
        .layers()
        .unwrap();
    assert_eq!(layers[0].running_var, Some(vec![4.0, 0.25]));
}

#[test]
fn hostile_arrays_are_refused() {
    // Shape product overflows.
    let e = unreadable(&bn_file(ndarray(&[u64::MAX, 2], "float32", &[0; 8])));
    assert!(e.contains("overflows"), "{e}");
    // Shape claims far more than the buffer holds.
    let e = unreadable(&bn_file(ndarray(&[1 << 40], "float32", &[0; 8])));
    assert!(e.contains("buffer"), "{e}");
    // A statistic of a dtype bnorm does not compute with.
    let e = unreadable(&bn_file(ndarray(&[2], "complex128", &[0; 32])));
    assert!(e.contains("float"), "{e}");
    // The payload is not a (shape, dtype, buffer) tuple.
    let e = unreadable(&bn_file(vec![0xd4, 1, 0x05]));
    assert!(e.contains("payload"), "{e}");
    // A scalar extension with a shape.
    let mut scalar = ndarray(&[2], "float32", &f32s(&[1.0, 2.0]));
    scalar[5] = 3;
    unreadable(&map(&[("x", scalar)]));
}

#[test]
fn hostile_containers_are_refused() {
    // Maps, arrays, strings and binaries claiming 2^32 - 1 elements or bytes.
    for head in [
        &[0xdf, 0xff, 0xff, 0xff, 0xff][..],
        &[0x81, 0xa1, b'a', 0xdd, 0xff, 0xff, 0xff, 0xff],
        &[0x81, 0xa1, b'a', 0xc6, 0xff, 0xff, 0xff, 0xff],
        &[0x81, 0xa1, b'a', 0xdb, 0xff, 0xff, 0xff, 0xff],
        &[0x81, 0xa1, b'a', 0xc9, 0xff, 0xff, 0xff, 0xff, 0x01],
        &[0xde, 0xff, 0xff],
    ] {
        let mut bytes = head.to_vec();
        bytes.extend([0u8; 16]);
        unreadable(&bytes);
    }
    // Deep nesting.
    let mut deep = vec![0x81, 0xa1, b'a'];
    deep.extend(std::iter::repeat_n(0x91, 100_000));
    deep.push(0x01);
    let e = unreadable(&deep);
    assert!(e.contains("nesting"), "{e}");
    let mut deep = Vec::new();
    for _ in 0..10_000 {
        deep.extend([0x81, 0xa1, b'a']);
    }
    deep.push(0xc0);
    unreadable(&deep);
    // Names that would repeat a long key for every leaf under it (quadratic memory).
    let mut wide = vec![0x81, 0xda, 0xea, 0x60];
    wide.extend(std::iter::repeat_n(b'k', 60_000));
    wide.extend([0xdc, 0xea, 0x60]);
    wide.extend(std::iter::repeat_n(0x01, 60_000));
    let e = unreadable(&wide);
    assert!(e.contains("names"), "{e}");
    // Wrong types: a non-string key, the reserved byte 0xc1, trailing bytes.
    let e = unreadable(&[0x81, 0xc0, 0x01]);
    assert!(e.contains("key"), "{e}");
    unreadable(&[0x81, 0xa1, b'a', 0xc1]);
    let e = unreadable(&[0x81, 0xa1, b'a', 0x01, 0x02]);
    assert!(e.contains("after"), "{e}");
}

#[test]
fn every_truncation_is_refused() {
    for file in [
        "linen_init.msgpack",
        "linen_trained.msgpack",
        "linen_partitioned.msgpack",
        "nnx_pure.msgpack",
        "nnx_value_leaves.msgpack",
    ] {
        let bytes = fixture(file);
        for n in 1..bytes.len() {
            unreadable(&bytes[..n]);
        }
    }
}

#[test]
fn bit_flips_never_panic() {
    for file in ["linen_trained.msgpack", "nnx_value_leaves.msgpack"] {
        let bytes = fixture(file);
        for i in 0..bytes.len() {
            for mask in [0x01u8, 0x10, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] ^= mask;
                common::read_and_consume(&b);
            }
        }
    }
}

/// Reads and uses a file the way the command line would; errors are fine, panics not.
#[test]
fn fuzz_corpus_replays_without_panic() {
    for bytes in common::corpus("read_flax", 8) {
        common::read_and_consume(&bytes);
    }
}
