//! The TensorFlow checkpoint reader against checkpoints TensorFlow 2.21 wrote
//! (`tests/data/tf/make_tf.py`) and what TensorFlow reported about them
//! (`tests/data/tf/expected.json`: `tf.train.list_variables` / `tf.train.load_variable`,
//! and the object graph parsed by TensorFlow's own proto class), plus hostile files.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bnorm_interop::read::tf::read_bundle;
use bnorm_interop::read::{read_bytes, read_path, FileFormat};
use bnorm_interop::{inspect, BnAffine, Checkpoint, Format, InteropError, Problem};
use serde_json::Value;

fn dir() -> PathBuf {
    common::data_dir("tf")
}

fn expected() -> Value {
    common::expected_json("tf")
}

fn fixture(name: &str) -> (PathBuf, Value) {
    let e = expected();
    let f = e["fixtures"][name].clone();
    (dir().join(f["prefix"].as_str().unwrap()), f)
}

/// The index and shard bytes of a fixture.
fn bytes_of(prefix: &Path) -> (Vec<u8>, Vec<u8>) {
    let p = prefix.as_os_str().to_string_lossy().to_string();
    (
        std::fs::read(format!("{p}.index")).unwrap(),
        std::fs::read(format!("{p}.data-00000-of-00001")).unwrap(),
    )
}

fn values(v: &Value) -> Vec<f64> {
    v["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn shape(v: &Value) -> Vec<usize> {
    v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// Checks every tensor `renamed` maps (TensorFlow's name → the reader's) against
/// TensorFlow's report: same shape, same values (f32 widened exactly, so equality).
fn check_values(ckpt: &Checkpoint, f: &Value, renamed: &BTreeMap<String, String>) {
    for (tf_name, ours) in renamed {
        let v = &f["variables"][tf_name];
        assert!(v.is_object(), "TensorFlow reported no {tf_name}");
        let t = ckpt
            .tensors
            .get(ours)
            .unwrap_or_else(|| panic!("{ours} (TensorFlow's {tf_name}) missing"));
        assert_eq!(t.shape, shape(v), "{ours}");
        match v["dtype"].as_str().unwrap() {
            // serde_json's float parsing is not exact: compare as the f32s TensorFlow held.
            "float32" => assert_eq!(f32s(&t.to_f64(ours).unwrap()), f32s(&values(v)), "{ours}"),
            "int64" => {
                let want: Vec<i64> = v["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap())
                    .collect();
                let got: Vec<i64> = t
                    .bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                assert_eq!(got, want, "{ours}");
            }
            d => panic!("{tf_name}: dtype {d} not expected in the fixtures"),
        }
    }
}

fn identity(f: &Value) -> BTreeMap<String, String> {
    f["variables"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| (k.clone(), k.clone()))
        .collect()
}

fn no_invented_conventions(ckpt: &Checkpoint) {
    assert!(
        ckpt.metadata.keys().all(|k| !k.starts_with("bnorm.layer.")),
        "{:?}",
        ckpt.metadata
    );
}

// ------------------------------------------------------------------------ TF1 classic recipe

fn classic(name: &str) -> (Checkpoint, Value) {
    let (prefix, f) = fixture(name);
    let loaded = read_path(&prefix).unwrap();
    assert_eq!(loaded.file_format, FileFormat::TfCheckpoint);
    let ckpt = loaded.checkpoint;
    let shadows = &f["facts"]["ema_shadow_names"];
    let strip = |s: &Value| s.as_str().unwrap().strip_suffix(":0").unwrap().to_string();
    let (mean, var) = (strip(&shadows["mean"]), strip(&shadows["variance"]));
    // TensorFlow's own names of the shadows, as the issue describes them.
    assert_eq!(mean, "bn/bn/moments/Squeeze/ExponentialMovingAverage");
    assert_eq!(var, "bn/bn/moments/Squeeze_1/ExponentialMovingAverage");
    assert_eq!(shadows["mean_op"], "bn/moments/Squeeze");
    assert_eq!(shadows["variance_op"], "bn/moments/Squeeze_1");
    let renamed = BTreeMap::from([
        ("bn/beta".to_string(), "bn/beta".to_string()),
        ("bn/gamma".to_string(), "bn/gamma".to_string()),
        (mean.clone(), "bn/moving_mean".to_string()),
        (var.clone(), "bn/moving_variance".to_string()),
    ]);
    check_values(&ckpt, &f, &renamed);
    assert_eq!(ckpt.tensors.len(), 4, "{:?}", ckpt.tensors.keys());
    assert_eq!(ckpt.metadata["tensorflow.key.bn/moving_mean"], mean);
    assert_eq!(ckpt.metadata["tensorflow.key.bn/moving_variance"], var);
    no_invented_conventions(&ckpt);
    let layers = ckpt.layers().unwrap();
    assert_eq!(layers.len(), 1);
    let l = &layers[0];
    assert_eq!(
        (l.name.as_str(), l.format, l.channels),
        ("bn", Format::Keras, 3)
    );
    assert_eq!(
        f32s(l.weight.as_ref().unwrap()),
        f32s(&values(&f["variables"]["bn/gamma"]))
    );
    assert_eq!(
        f32s(l.bias.as_ref().unwrap()),
        f32s(&values(&f["variables"]["bn/beta"]))
    );
    assert_eq!(
        f32s(l.running_mean.as_ref().unwrap()),
        f32s(&values(&f["variables"][&mean]))
    );
    assert_eq!(
        f32s(l.running_var.as_ref().unwrap()),
        f32s(&values(&f["variables"][&var]))
    );
    // Not stored in the checkpoint: the Keras defaults, not the recipe's eps 1e-3 / decay 0.9
    // by coincidence of knowledge.
    assert!(!l.conventions_recorded);
    (ckpt, f)
}

#[test]
fn classic_recipe_with_updates_run() {
    let (_, f) = classic("classic_run");
    assert_eq!(f["facts"]["moving_statistics_at_initial_values"], false);
    assert_eq!(f["facts"]["update_ops_run"], 3);
}

#[test]
fn classic_recipe_never_updated_keeps_zero_statistics() {
    let (ckpt, f) = classic("classic_norun");
    // The classic bug, as TensorFlow reported it: the shadows never left their initial
    // zeros (a zero variance, not Keras's 1).
    assert_eq!(f["facts"]["moving_statistics_at_initial_values"], true);
    assert_eq!(f["facts"]["update_ops_run"], 0);
    let l = &ckpt.layers().unwrap()[0];
    assert_eq!(l.running_mean.as_deref(), Some(&[0.0; 3][..]));
    assert_eq!(l.running_var.as_deref(), Some(&[0.0; 3][..]));
    // ... which inspection recognizes as the initial values, not as a dead channel.
    assert_eq!(inspect(l), vec![Problem::NeverUpdated]);
    // After three updates the same graph's statistics are healthy.
    let (ran, _) = classic("classic_run");
    assert_eq!(inspect(&ran.layers().unwrap()[0]), vec![]);
}

#[test]
fn classic_recipe_with_the_ema_inside_and_outside_the_variable_scope() {
    let (prefix, f) = fixture("classic_two");
    let ckpt = read_path(&prefix).unwrap().checkpoint;
    let mut renamed = identity(&f);
    for (scope, names) in f["facts"]["ema_shadow_names"].as_object().unwrap() {
        for (which, leaf) in [("mean", "moving_mean"), ("variance", "moving_variance")] {
            let tf_name = names[which].as_str().unwrap().strip_suffix(":0").unwrap();
            renamed.insert(tf_name.to_string(), format!("{scope}/{leaf}"));
        }
    }
    assert_eq!(
        renamed["bn2/moments/Squeeze_1/ExponentialMovingAverage"],
        "bn2/moving_variance"
    );
    assert_eq!(
        renamed["block/bn/block/bn/moments/Squeeze/ExponentialMovingAverage"],
        "block/bn/moving_mean"
    );
    check_values(&ckpt, &f, &renamed);
    assert_eq!(ckpt.tensors.len(), 8);
    let names: Vec<String> = ckpt.layers().unwrap().into_iter().map(|l| l.name).collect();
    assert_eq!(names, ["block/bn", "bn2"]);
}

#[test]
fn ema_shadows_are_renamed_only_when_the_pairing_is_unambiguous() {
    let data = f32_bytes(&[1.0, 2.0]);
    let crc = mask(crc32c(&data));
    let names = |keys: &[&str]| -> Vec<String> {
        let mut keys: Vec<&str> = keys.to_vec();
        keys.sort();
        // All entries share the same bytes: give each its own copy.
        let mut data = Vec::new();
        let mut entries = Vec::new();
        for (i, _) in keys.iter().enumerate() {
            data.extend(f32_bytes(&[1.0, 2.0]));
            entries.push(entry(1, &[2], 8 * i as u64, 8, crc));
        }
        let list: Vec<(&[u8], Vec<u8>)> = keys
            .iter()
            .zip(entries)
            .map(|(k, e)| (k.as_bytes(), e))
            .collect();
        let c = read_bundle(&index_file(header(1), &list), &[&data]).unwrap();
        c.tensors.keys().cloned().collect()
    };
    let m = "/moments/Squeeze/ExponentialMovingAverage";
    let v = "/moments/Squeeze_1/ExponentialMovingAverage";
    // Only the mean: kept as is.
    let only_mean = names(&["a/gamma", &format!("a/a{m}")]);
    assert!(only_mean.contains(&format!("a/a{m}")), "{only_mean:?}");
    // Two pairs for one layer (moments and moments_1): kept as they are.
    let two = names(&[
        "a/gamma",
        &format!("a{m}"),
        &format!("a{v}"),
        "a/moments_1/Squeeze/ExponentialMovingAverage",
        "a/moments_1/Squeeze_1/ExponentialMovingAverage",
    ]);
    assert!(!two.contains(&"a/moving_mean".to_string()), "{two:?}");
    // No affine parameters to say which scope: kept.
    let none = names(&[&format!("q{m}"), &format!("q{v}")]);
    assert!(!none.contains(&"q/moving_mean".to_string()), "{none:?}");
    // An outer variable scope: the one layer whose scope ends the path.
    let outer = names(&[
        "x/bn/beta",
        &format!("outer/x/bn{m}"),
        &format!("outer/x/bn{v}"),
    ]);
    assert!(
        outer.contains(&"x/bn/moving_variance".to_string()),
        "{outer:?}"
    );
    // Two layers fit the suffix (`bn` and `x/bn` for `y/x/bn`): kept.
    let amb = names(&[
        "bn/beta",
        "x/bn/beta",
        &format!("y/x/bn{m}"),
        &format!("y/x/bn{v}"),
    ]);
    assert!(!amb.iter().any(|n| n.ends_with("moving_mean")), "{amb:?}");
    // An existing moving_mean is never overwritten.
    let clash = names(&[
        "a/gamma",
        "a/moving_mean",
        &format!("a{m}"),
        &format!("a{v}"),
    ]);
    assert!(clash.contains(&format!("a{m}")), "{clash:?}");
}

#[test]
fn every_way_of_naming_a_checkpoint_reads_the_same() {
    let (prefix, _) = fixture("classic_run");
    let p = prefix.as_os_str().to_string_lossy().to_string();
    let want = read_path(&prefix).unwrap();
    for path in [
        PathBuf::from(format!("{p}.index")),
        PathBuf::from(format!("{p}.data-00000-of-00001")),
        prefix.parent().unwrap().to_path_buf(),
    ] {
        assert_eq!(read_path(&path).unwrap(), want, "{}", path.display());
    }
    // The .index bytes alone: told to give the path.
    let (index, data) = bytes_of(&prefix);
    let e = read_bytes(&index).unwrap_err();
    assert!(matches!(e, InteropError::Unreadable { .. }), "{e}");
    assert!(e.to_string().contains(".data"), "{e}");
    // In memory.
    assert_eq!(read_bundle(&index, &[&data]).unwrap(), want.checkpoint);
}

#[test]
fn checkpoint_state_files_absolute_missing_or_broken() {
    let (prefix, _) = fixture("layers_v1");
    let want = read_path(&prefix).unwrap();
    let tmp = std::env::temp_dir().join(format!("bnorm-read-tf-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let state = tmp.join("checkpoint");
    // An absolute path (what Saver writes without save_relative_paths).
    std::fs::write(
        &state,
        format!("model_checkpoint_path: \"{}\"\n", prefix.display()),
    )
    .unwrap();
    assert_eq!(read_path(&tmp).unwrap(), want);
    // A prefix whose .index is missing: an I/O error naming it.
    std::fs::write(&state, "model_checkpoint_path: \"gone.ckpt-9\"\n").unwrap();
    match read_path(&tmp) {
        Err(InteropError::Io { path, .. }) => assert!(path.ends_with("gone.ckpt-9.index")),
        other => panic!("{other:?}"),
    }
    // A state file without the field: not taken for a checkpoint directory.
    std::fs::write(&state, "garbage").unwrap();
    assert!(read_path(&tmp).is_err());
    // A missing shard: an I/O error naming it.
    std::fs::remove_file(&state).unwrap();
    let index = tmp.join("m.index");
    std::fs::copy(format!("{}.index", prefix.display()), &index).unwrap();
    match read_path(&tmp.join("m")) {
        Err(InteropError::Io { path, .. }) => {
            assert!(
                path.ends_with("m.data-00000-of-00001"),
                "{}",
                path.display()
            )
        }
        other => panic!("{other:?}"),
    }
    // A shard shorter than its entries claim.
    std::fs::write(tmp.join("m.data-00000-of-00001"), [0u8; 10]).unwrap();
    let e = read_path(&index).unwrap_err();
    assert!(e.to_string().contains("past the end of shard 0"), "{e}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

// ------------------------------------------------------------------------ tf.compat.v1.layers

#[test]
fn v1_layers_batch_normalization() {
    let (prefix, f) = fixture("layers_v1");
    let ckpt = read_path(&prefix).unwrap().checkpoint;
    let all = identity(&f);
    assert_eq!(all.len(), 6);
    check_values(&ckpt, &f, &all);
    assert_eq!(ckpt.tensors.len(), 6);
    assert!(ckpt.metadata.is_empty(), "{:?}", ckpt.metadata);
    let layers = ckpt.layers().unwrap();
    assert_eq!(layers.len(), 1);
    let l = &layers[0];
    assert_eq!(l.name, "net/batch_normalization");
    assert_eq!((l.format, l.channels), (Format::Keras, 4));
    let v = &f["variables"];
    assert_eq!(
        f32s(l.running_mean.as_ref().unwrap()),
        f32s(&values(&v["net/batch_normalization/moving_mean"]))
    );
    assert_eq!(
        f32s(l.running_var.as_ref().unwrap()),
        f32s(&values(&v["net/batch_normalization/moving_variance"]))
    );
    assert!(l.to_batchnorm().is_ok());
    assert!(BnAffine::from_layer(l).is_ok());
}

// ------------------------------------------------------------------------ TF2 object-based

/// Reads a TF2 fixture; `facts` names the fixture whose `facts.layers` lists Keras's own
/// variables of each batch-norm layer, `want` the layers and their channels.
fn tf2(name: &str, facts: &str, want: &[(&str, usize)]) -> Checkpoint {
    let (prefix, f) = fixture(name);
    let ckpt = read_path(&prefix).unwrap().checkpoint;
    let graph = f["object_graph"].as_object().unwrap();
    // What the reader must call each of TensorFlow's keys: the variable's name from the
    // object graph when only one variable has it, else the key without the attribute
    // suffix; slots and the graph itself are left out.
    let mut renamed = BTreeMap::new();
    for key in f["variables"].as_object().unwrap().keys() {
        if key == "_CHECKPOINTABLE_OBJECT_GRAPH" || key.contains("/.OPTIMIZER_SLOT/") {
            continue;
        }
        let path = key.strip_suffix("/.ATTRIBUTES/VARIABLE_VALUE").unwrap();
        let unique = |full: &str| graph.values().filter(|v| *v == full).count() == 1;
        let ours = match graph.get(key).and_then(Value::as_str) {
            Some(full) if unique(full) => full,
            _ => path,
        };
        renamed.insert(key.clone(), ours.to_string());
    }
    check_values(&ckpt, &f, &renamed);
    assert_eq!(
        ckpt.tensors.len(),
        renamed.len(),
        "{:?}",
        ckpt.tensors.keys()
    );
    assert!(ckpt.tensors.keys().all(|k| !k.contains("OPTIMIZER_SLOT")));
    no_invented_conventions(&ckpt);
    let layers = ckpt.layers().unwrap();
    let got: Vec<(&str, usize)> = layers
        .iter()
        .map(|l| (l.name.as_str(), l.channels))
        .collect();
    assert_eq!(got, want);
    let e = expected();
    for l in &layers {
        // Keras's own list of the layer's variables: every one of them was found.
        let keras_name = l.name.rsplit('/').next().unwrap();
        let vars = &e["fixtures"][facts]["facts"]["layers"][keras_name]["variables"];
        let vars: Vec<&str> = vars
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().trim_end_matches(":0"))
            .collect();
        assert_eq!(vars.len(), 4, "{vars:?}");
        for v in vars {
            assert!(ckpt.tensors.contains_key(v), "{v} missing");
        }
        assert_eq!(l.format, Format::Keras);
        assert!(l.weight.is_some() && l.bias.is_some());
        assert!(l.to_batchnorm().is_ok());
    }
    ckpt
}

#[test]
fn tf2_checkpoint_names_layers_by_their_keras_names() {
    let ckpt = tf2(
        "tf2_checkpoint",
        "tf2_checkpoint",
        &[("bn_a", 3), ("bn_b", 2)],
    );
    assert_eq!(
        ckpt.metadata["tensorflow.key.bn_a/moving_mean"],
        "model/layer_with_weights-1/moving_mean/.ATTRIBUTES/VARIABLE_VALUE"
    );
    assert!(ckpt.tensors.contains_key("save_counter"));
    // The optimizer's step counter, named by the object graph (`Adam/iter`).
    let e = expected();
    let graph = &e["fixtures"]["tf2_checkpoint"]["object_graph"];
    let iter = graph["optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE"]
        .as_str()
        .unwrap();
    assert!(ckpt.tensors.contains_key(iter), "{iter}");
}

#[test]
fn tf_keras_save_weights_checkpoint() {
    tf2(
        "keras_weights",
        "tf2_checkpoint",
        &[("bn_a", 3), ("bn_b", 2)],
    );
}

#[test]
fn keras3_checkpoint() {
    let ckpt = tf2("keras3_checkpoint", "keras3_checkpoint", &[("bn_k", 2)]);
    assert!(ckpt.tensors.contains_key("fc/kernel"));
}

#[test]
fn keras3_sequential_checkpoint_finds_gamma_under_the_optimizer() {
    let ckpt = tf2("keras3_sequential", "keras3_sequential", &[("seq/bn_s", 2)]);
    assert_eq!(
        ckpt.metadata["tensorflow.key.seq/bn_s/gamma"],
        "model/optimizer/_trainable_variables/2/.ATTRIBUTES/VARIABLE_VALUE"
    );
}

// ------------------------------------------------------------------------ hostile files

fn all_fixtures() -> Vec<(Vec<u8>, Vec<u8>)> {
    ["classic_run", "layers_v1", "tf2_checkpoint"]
        .iter()
        .map(|n| bytes_of(&fixture(n).0))
        .collect()
}

#[test]
fn truncated_index_at_every_length_is_refused() {
    for (index, data) in all_fixtures() {
        for n in 0..index.len() {
            let e = read_bundle(&index[..n], &[&data]);
            assert!(
                matches!(e, Err(InteropError::Unreadable { .. })),
                "prefix {n}: {e:?}"
            );
        }
    }
}

#[test]
fn truncated_data_is_refused() {
    for (index, data) in all_fixtures() {
        for n in (0..data.len()).step_by(7) {
            let e = read_bundle(&index, &[&data[..n]]);
            assert!(
                matches!(e, Err(InteropError::Unreadable { .. })),
                "prefix {n}: {e:?}"
            );
        }
        assert!(read_bundle(&index, &[]).is_err());
    }
}

#[test]
fn bit_flips_never_panic_and_checksums_catch_them() {
    for (index, data) in all_fixtures() {
        let mut accepted = 0;
        for i in 0..index.len() * 8 {
            let mut b = index.clone();
            b[i / 8] ^= 1 << (i % 8);
            if let Ok(c) = read_bundle(&b, &[&data]) {
                // Only the footer's padding and unused metaindex handle are unchecked.
                assert!(i / 8 >= index.len() - 48, "bit {i} accepted");
                let _ = c.layers();
                accepted += 1;
            }
        }
        assert!(accepted < 48 * 8);
        // Every byte of the data file is covered by an entry's checksum.
        for i in (0..data.len() * 8).step_by(3) {
            let mut d = data.clone();
            d[i / 8] ^= 1 << (i % 8);
            let e = read_bundle(&index, &[&d]);
            assert!(
                matches!(e, Err(InteropError::Unreadable { .. })),
                "data bit {i}: {e:?}"
            );
        }
    }
}

// A small writer of bundles, for files TensorFlow would never write.

fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn mask(c: u32) -> u32 {
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_varint(n: u32, v: u64, out: &mut Vec<u8>) {
    varint(u64::from(n) << 3, out);
    varint(v, out);
}

fn field_bytes(n: u32, b: &[u8], out: &mut Vec<u8>) {
    varint(u64::from(n) << 3 | 2, out);
    varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

/// A block of (key, value) entries without prefix compression, one restart point.
fn block(entries: &[(&[u8], Vec<u8>)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (k, v) in entries {
        varint(0, &mut b);
        varint(k.len() as u64, &mut b);
        varint(v.len() as u64, &mut b);
        b.extend_from_slice(k);
        b.extend_from_slice(v);
    }
    b.extend(0u32.to_le_bytes());
    b.extend(1u32.to_le_bytes());
    b
}

fn push_block(file: &mut Vec<u8>, contents: &[u8]) -> (u64, u64) {
    let h = (file.len() as u64, contents.len() as u64);
    file.extend_from_slice(contents);
    let mut c = contents.to_vec();
    c.push(0);
    file.push(0);
    file.extend(mask(crc32c(&c)).to_le_bytes());
    h
}

/// An index file holding one data block with `entries` (sorted keys), a header first.
fn index_file(header: Vec<u8>, entries: &[(&[u8], Vec<u8>)]) -> Vec<u8> {
    let mut all: Vec<(&[u8], Vec<u8>)> = vec![(b"", header)];
    all.extend(entries.iter().cloned());
    let mut file = Vec::new();
    let data = push_block(&mut file, &block(&all));
    let meta = push_block(&mut file, &block(&[]));
    let mut handle = Vec::new();
    varint(data.0, &mut handle);
    varint(data.1, &mut handle);
    let index = push_block(&mut file, &block(&[(b"\xff", handle)]));
    let mut footer = Vec::new();
    for v in [meta.0, meta.1, index.0, index.1] {
        varint(v, &mut footer);
    }
    footer.resize(40, 0);
    footer.extend(0xdb47_7524_8b80_fb57u64.to_le_bytes());
    file.extend(footer);
    file
}

fn header(shards: u64) -> Vec<u8> {
    let mut h = Vec::new();
    field_varint(1, shards, &mut h);
    h
}

fn entry(dtype: u64, dims: &[u64], offset: u64, size: u64, crc: u32) -> Vec<u8> {
    let mut shape = Vec::new();
    for &d in dims {
        let mut dim = Vec::new();
        field_varint(1, d, &mut dim);
        field_bytes(2, &dim, &mut shape);
    }
    let mut e = Vec::new();
    field_varint(1, dtype, &mut e);
    field_bytes(2, &shape, &mut e);
    field_varint(4, offset, &mut e);
    field_varint(5, size, &mut e);
    e.push(6 << 3 | 5);
    e.extend(crc.to_le_bytes());
    e
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn the_test_writer_makes_readable_bundles() {
    let data = f32_bytes(&[1.0, 2.0, 0.5, 4.0]);
    let crc = mask(crc32c(&data[..8]));
    let crc2 = mask(crc32c(&data[8..]));
    let index = index_file(
        header(1),
        &[
            (b"s/moving_mean", entry(1, &[2], 0, 8, crc)),
            (b"s/moving_variance", entry(1, &[2], 8, 8, crc2)),
        ],
    );
    let c = read_bundle(&index, &[&data]).unwrap();
    let l = c.layers().unwrap();
    assert_eq!(l[0].running_var.as_deref(), Some(&[0.5, 4.0][..]));
}

fn refused(index: &[u8], data: &[u8], needle: &str) {
    match read_bundle(index, &[data]) {
        Err(e @ InteropError::Unreadable { .. }) => {
            assert!(e.to_string().contains(needle), "{e} lacks {needle:?}")
        }
        other => panic!("expected a refusal mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn lies_about_sizes_shapes_and_types_are_refused() {
    let data = f32_bytes(&[1.0, 2.0]);
    let crc = mask(crc32c(&data));
    let one = |e: Vec<u8>| index_file(header(1), &[(b"x/moving_mean", e)]);
    // A size past the shard, a huge size, an offset past the shard.
    refused(&one(entry(1, &[2], 0, 1 << 40, crc)), &data, "cannot hold");
    refused(
        &one(entry(1, &[1 << 38], 0, 1 << 40, crc)),
        &data,
        "past the end",
    );
    refused(&one(entry(1, &[2], 4, 8, crc)), &data, "past the end");
    refused(&one(entry(1, &[2], u64::MAX, 8, crc)), &data, "negative");
    // A shape whose product overflows, a negative dimension.
    refused(
        &one(entry(1, &[1 << 62, 1 << 62], 0, 8, crc)),
        &data,
        "overflows",
    );
    refused(&one(entry(1, &[u64::MAX, 2], 0, 8, crc)), &data, "negative");
    // A wrong checksum.
    refused(&one(entry(1, &[2], 0, 8, crc ^ 1)), &data, "checksum");
    // A shard that does not exist.
    let mut e = entry(1, &[2], 0, 8, crc);
    field_varint(3, 7, &mut e);
    refused(&one(e), &data, "shard 7");
    // Wrong wire types: dtype as bytes, shape as a varint, a group.
    let mut e = Vec::new();
    field_bytes(1, b"float", &mut e);
    refused(&one(e), &data, "dtype");
    let mut e = Vec::new();
    field_varint(2, 3, &mut e);
    refused(&one(e), &data, "shape");
    refused(&one(vec![0x0b, 0x0c]), &data, "wire type");
    // A header: zero or absurd shards, big-endian, a newer version, missing.
    let one_h = |h: Vec<u8>| index_file(h, &[(b"x/moving_mean", entry(1, &[2], 0, 8, crc))]);
    refused(&one_h(header(0)), &data, "shards");
    refused(&one_h(header(1 << 40)), &data, "int32");
    let mut h = header(1);
    field_varint(2, 1, &mut h);
    refused(&one_h(h), &data, "big-endian");
    let mut h = header(1);
    let mut ver = Vec::new();
    field_varint(2, 5, &mut ver);
    field_bytes(3, &ver, &mut h);
    refused(&one_h(h), &data, "newer");
}

#[test]
fn hostile_tables_are_refused() {
    let data = f32_bytes(&[1.0, 2.0]);
    let good = index_file(header(1), &[]);
    assert!(read_bundle(&good, &[&data]).unwrap().tensors.is_empty());
    // A block claimed to be enormous.
    let mut f = good.clone();
    let n = f.len();
    let mut footer = Vec::new();
    for v in [0, u64::MAX / 2, 0, u64::MAX / 2] {
        varint(v, &mut footer);
    }
    footer.resize(40, 0);
    f[n - 48..n - 8].copy_from_slice(&footer);
    refused(&f, &data, "past the end");
    // Restart counts that do not fit, keys sharing more than exists, out of order.
    for contents in [
        {
            let mut b = vec![0u8; 4];
            b.extend(u32::MAX.to_le_bytes());
            b
        },
        {
            let mut b = vec![5, 1, 0, b'a'];
            b.extend(0u32.to_le_bytes());
            b.extend(1u32.to_le_bytes());
            b
        },
        block(&[(b"b", vec![]), (b"a", vec![])]),
    ] {
        refused(&table_with(&contents, 0), &data, "corrupt");
    }
    // Prefix compression claiming ever longer keys: each entry is 4 bytes and one longer
    // key; building them all would take ~200 MB: refused by the key budget.
    let mut b = Vec::new();
    b.extend([0]);
    varint(200, &mut b);
    b.extend([0]);
    b.extend([b'k'; 200]);
    for len in 200..20_200u64 {
        varint(len, &mut b);
        b.extend([1, 0, b'k']);
    }
    b.extend(0u32.to_le_bytes());
    b.extend(1u32.to_le_bytes());
    refused(&table_with(&b, 0), &data, "far more bytes");
    // A snappy block.
    refused(&table_with(&block(&[(b"", header(1))]), 1), &data, "snappy");
}

/// An index file whose one data block is `contents` with compression byte `kind`.
fn table_with(contents: &[u8], kind: u8) -> Vec<u8> {
    let mut file = contents.to_vec();
    let mut c = contents.to_vec();
    c.push(kind);
    file.push(kind);
    file.extend(mask(crc32c(&c)).to_le_bytes());
    let mut handle = Vec::new();
    varint(0, &mut handle);
    varint(contents.len() as u64, &mut handle);
    let i = push_block(&mut file, &block(&[(b"\xff", handle)]));
    let m = push_block(&mut file, &block(&[]));
    let mut footer = Vec::new();
    for v in [m.0, m.1, i.0, i.1] {
        varint(v, &mut footer);
    }
    footer.resize(40, 0);
    footer.extend(0xdb47_7524_8b80_fb57u64.to_le_bytes());
    file.extend(footer);
    file
}

#[test]
fn overlapping_entries_cannot_multiply_allocation() {
    // Many entries pointing at the same bytes: refused once they claim more than the shard.
    let data = f32_bytes(&[1.0; 64]);
    let crc = mask(crc32c(&data));
    let keys: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
    let entries: Vec<(&[u8], Vec<u8>)> = keys
        .iter()
        .map(|k| (k.as_bytes(), entry(1, &[64], 0, 256, crc)))
        .collect();
    refused(&index_file(header(1), &entries), &data, "more bytes");
}

#[test]
fn a_corrupt_object_graph_is_refused() {
    // A DT_STRING object graph whose proto lies about a length.
    let graph = {
        let mut node = Vec::new();
        field_bytes(2, &[0x12, 0x7f, b'a'], &mut node); // attribute with a short string
        let mut g = Vec::new();
        field_bytes(1, &node, &mut g);
        g
    };
    let (data, e) = graph_tensor(&graph);
    refused(
        &index_file(header(1), &[(b"_CHECKPOINTABLE_OBJECT_GRAPH", e)]),
        &data,
        "object graph",
    );
}

/// A DT_STRING scalar holding `graph` as TensorFlow lays it out, and its entry.
fn graph_tensor(graph: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut data = Vec::new();
    varint(graph.len() as u64, &mut data);
    let lc = mask(crc32c(&(graph.len() as u32).to_le_bytes())).to_le_bytes();
    data.extend(lc);
    data.extend(graph);
    let mut covered = (graph.len() as u32).to_le_bytes().to_vec();
    covered.extend(lc);
    covered.extend(graph);
    let e = entry(7, &[], 0, data.len() as u64, mask(crc32c(&covered)));
    (data, e)
}

#[test]
fn a_deeply_nested_object_graph_neither_recurses_nor_fails() {
    // 5,000 levels (protobuf itself stops at 100) of nested messages in a field the reader
    // does not descend into, beside one real attribute naming the variable.
    let mut nested = Vec::new();
    for _ in 0..5_000 {
        let mut outer = Vec::new();
        field_bytes(9, &nested, &mut outer);
        nested = outer;
    }
    let mut attr = Vec::new();
    field_bytes(2, b"bn/moving_mean", &mut attr);
    field_bytes(3, b"m/.ATTRIBUTES/VARIABLE_VALUE", &mut attr);
    let mut node = Vec::new();
    field_bytes(2, &attr, &mut node);
    field_bytes(9, &nested, &mut node);
    let mut graph = Vec::new();
    field_bytes(1, &node, &mut graph);
    let (mut data, ge) = graph_tensor(&graph);
    let off = data.len() as u64;
    data.extend(f32_bytes(&[0.5, 1.5]));
    let crc = mask(crc32c(&f32_bytes(&[0.5, 1.5])));
    let index = index_file(
        header(1),
        &[
            (b"_CHECKPOINTABLE_OBJECT_GRAPH", ge),
            (b"m/.ATTRIBUTES/VARIABLE_VALUE", entry(1, &[2], off, 8, crc)),
        ],
    );
    let c = read_bundle(&index, &[&data]).unwrap();
    assert_eq!(c.tensors.keys().collect::<Vec<_>>(), ["bn/moving_mean"]);
}

// ------------------------------------------------------------------------ fuzz corpus

/// The fuzz target's input: a 4-byte little-endian index length, the index, the shard.
fn split(input: &[u8]) -> Option<(&[u8], &[u8])> {
    let (n, rest) = input.split_first_chunk::<4>()?;
    let n = u32::from_le_bytes(*n) as usize;
    (n <= rest.len()).then(|| rest.split_at(n))
}

#[test]
fn fuzz_corpus_replays_without_panic() {
    let mut ok = 0;
    for bytes in common::corpus("read_tf", 10) {
        if let Some((index, data)) = split(&bytes) {
            if let Ok(ckpt) = read_bundle(index, &[data]) {
                ok += 1;
                common::consume(&ckpt);
            }
        }
        common::read_and_consume(&bytes);
    }
    assert!(ok >= 3, "only {ok} corpus files read");
}

// ------------------------------------------------------------------------ random mutations

mod mutations {
    use super::*;
    use proptest::prelude::*;

    fn read_varint(b: &[u8], pos: &mut usize) -> u64 {
        let mut v = 0u64;
        for i in 0..10 {
            let x = b[*pos];
            *pos += 1;
            v |= u64::from(x & 0x7f) << (7 * i);
            if x < 0x80 {
                break;
            }
        }
        v
    }

    /// The (offset, size) of every block of a well-formed index file `orig`.
    fn blocks(orig: &[u8]) -> Vec<(usize, usize)> {
        let n = orig.len();
        let mut pos = n - 48;
        let mut out = Vec::new();
        for _ in 0..2 {
            let o = read_varint(orig, &mut pos) as usize;
            out.push((o, read_varint(orig, &mut pos) as usize));
        }
        // Data blocks, from the index block's values (entries with restarts at the end).
        let (io, is) = out[1];
        let b = &orig[io..io + is];
        let restarts = u32::from_le_bytes(b[is - 4..].try_into().unwrap()) as usize;
        let end = is - 4 - 4 * restarts;
        let mut p = 0;
        while p < end {
            let _shared = read_varint(b, &mut p);
            let non_shared = read_varint(b, &mut p) as usize;
            let value_len = read_varint(b, &mut p) as usize;
            p += non_shared;
            let mut q = p;
            let o = read_varint(b, &mut q) as usize;
            out.push((o, read_varint(b, &mut q) as usize));
            p += value_len;
        }
        out
    }

    /// Recomputes every block trailer's checksum, so that edits reach the parser behind it.
    fn refresh_block_crcs(index: &mut [u8], orig: &[u8]) {
        for (o, size) in blocks(orig) {
            let mut c = index[o..o + size].to_vec();
            c.push(index[o + size]);
            let crc = mask(crc32c(&c)).to_le_bytes();
            index[o + size + 1..o + size + 5].copy_from_slice(&crc);
        }
    }

    #[test]
    fn refreshed_checksums_keep_a_fixture_readable() {
        for (index, data) in all_fixtures() {
            let mut copy = index.clone();
            refresh_block_crcs(&mut copy, &index);
            assert_eq!(copy, index);
            assert!(read_bundle(&copy, &[&data]).is_ok());
            assert!(blocks(&index).len() >= 3);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

        /// Random byte edits of a fixture's index and shard (a stable-Rust stand-in for the
        /// fuzz target): never a panic, and whatever parses goes on to layers and
        /// inspection without one.
        #[test]
        fn mutated_bundles_never_panic(
            which in 0usize..3,
            edits in proptest::collection::vec((any::<bool>(), any::<usize>(), any::<u8>()), 1..6),
            cut in proptest::option::of(any::<usize>()),
            fix_crcs in any::<bool>(),
        ) {
            static FIXTURES: std::sync::OnceLock<Vec<(Vec<u8>, Vec<u8>)>> =
                std::sync::OnceLock::new();
            let (mut index, mut data) = FIXTURES.get_or_init(all_fixtures)[which].clone();
            for (in_index, pos, x) in edits {
                let buf = if in_index { &mut index } else { &mut data };
                if !buf.is_empty() {
                    let p = pos % buf.len();
                    buf[p] ^= x.max(1);
                }
            }
            if fix_crcs {
                refresh_block_crcs(&mut index, &FIXTURES.get_or_init(all_fixtures)[which].0);
            }
            if let Some(c) = cut {
                let n = c % (index.len() + 1);
                index.truncate(n);
            }
            if let Ok(ckpt) = read_bundle(&index, &[&data]) {
                if let Ok(layers) = ckpt.layers() {
                    for l in layers {
                        let _ = inspect(&l);
                        let _ = l.to_batchnorm();
                    }
                }
            }
        }
    }
}
