//! The Keras reader against files written by the real frameworks
//! (`tests/data/keras/make_keras.py`: keras 3.15.1, tf_keras 2.21.0, tensorflow 2.21.0)
//! and what those frameworks reported when writing them (`expected.json`), plus hostile
//! files: truncations, bit flips, huge claimed sizes, deep nesting, wrong types.

mod common;

use common::floats;
use std::io::Write;
use std::path::{Path, PathBuf};

use bnorm::{Momentum, VarianceEstimator};
use bnorm_interop::read::{read_bytes, read_path, FileFormat};
use bnorm_interop::{inspect, BnAffine, InteropError, Layer};
use serde_json::Value;

fn dir() -> PathBuf {
    common::data_dir("keras")
}

fn expected() -> Value {
    common::expected_json("keras")
}

/// The leaf of a framework weight name (`bn/gamma:0` → `gamma`).
fn leaf(name: &str) -> &str {
    let name = name.split(':').next().unwrap();
    name.rsplit('/').next().unwrap()
}

/// The reader's value of one variable of a layer.
fn role<'a>(layer: &'a Layer, leaf: &str) -> Option<&'a Vec<f64>> {
    match leaf {
        "gamma" => layer.weight.as_ref(),
        "beta" => layer.bias.as_ref(),
        "moving_mean" => layer.running_mean.as_ref(),
        "moving_variance" => layer.running_var.as_ref(),
        "moving_stddev" => layer.renorm.as_ref().map(|r| &r.moving_stddev),
        "renorm_mean" => layer.renorm.as_ref().map(|r| &r.mean),
        "renorm_stddev" => layer.renorm.as_ref().map(|r| &r.stddev),
        other => panic!("unknown variable {other}"),
    }
}

/// Every file's layers against the framework's report: names, channels, each
/// variable's values (exactly: the framework printed the stored f32 values widened to
/// f64) and, where the file stores them, eps and momentum.
#[test]
fn every_fixture_matches_what_the_framework_reported() {
    let exp = expected();
    let files = exp["files"].as_object().unwrap();
    assert_eq!(files.len(), 6);
    for (file, entry) in files {
        let loaded = read_path(&dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let kind = entry["kind"].as_str().unwrap();
        let want_format = match (kind, file.ends_with(".keras")) {
            ("keras3", true) => FileFormat::Keras,
            ("keras3", false) => FileFormat::KerasWeights,
            _ => FileFormat::TfKerasH5,
        };
        assert_eq!(loaded.file_format, want_format, "{file}");
        let layers = loaded.checkpoint.layers().unwrap();
        let want = entry["layers"].as_array().unwrap();
        assert_eq!(layers.len(), want.len(), "{file}: {layers:?}");
        let has_config =
            file.ends_with(".keras") || (kind == "tf_keras" && !file.contains("weights"));
        for w in want {
            let path = w["path"].as_str().unwrap();
            let layer = layers
                .iter()
                .find(|l| l.name == path)
                .unwrap_or_else(|| panic!("{file}: no layer {path}"));
            let names: Vec<&str> = w["weight_names"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| leaf(n.as_str().unwrap()))
                .collect();
            let values = w["weights"].as_array().unwrap();
            assert_eq!(layer.channels, floats(&values[0]).len(), "{file} {path}");
            let assumed = loaded
                .checkpoint
                .metadata
                .get(&format!("bnorm.layer.{path}.assumed"));
            // A bare Keras 3 weights file cannot tell center=False from scale=False; the
            // reader assumes scale=False and says so.
            let misread = !has_config && names.len() == 3 && names[0] == "gamma";
            for (leaf, v) in names.iter().zip(values) {
                let leaf = if misread && *leaf == "gamma" {
                    "beta"
                } else {
                    leaf
                };
                assert_eq!(role(layer, leaf), Some(&floats(v)), "{file} {path} {leaf}");
            }
            if kind == "keras3" && !has_config && names.len() <= 3 {
                assert!(
                    assumed.is_some_and(|a| a.contains("variables read as")),
                    "{file} {path}"
                );
            }
            if misread {
                assert!(layer.weight.is_none() && layer.bias.is_some());
            }
            if has_config {
                assert_eq!(layer.eps, w["epsilon"].as_f64().unwrap(), "{file} {path}");
                assert_eq!(
                    layer.momentum,
                    Momentum::Decay(w["momentum"].as_f64().unwrap()),
                    "{file} {path}"
                );
                assert!(layer.conventions_recorded);
            } else {
                // Nothing recorded: the Keras defaults apply.
                assert_eq!(layer.eps, 1e-3);
                assert_eq!(layer.momentum, Momentum::Decay(0.99));
                assert!(!layer.conventions_recorded);
            }
            assert_eq!(layer.renorm.is_some(), w["renorm"].as_bool().unwrap());
            // Every layer passes on to the rest of the crate.
            let _ = inspect(layer);
            layer.to_batchnorm().unwrap();
            BnAffine::from_layer(layer).unwrap();
        }
    }
}

/// tf_keras: a fused layer keeps the unbiased variance (the generator's evidence), and
/// the reader records it; non-fused layers (renorm, 2-D input) are biased. tf_keras does
/// not save `fused`, so a 4-D layer built with fused=False reads as the default (fused,
/// unbiased) and the reader says it assumed so.
#[test]
fn tf_keras_fused_layers_keep_the_unbiased_variance() {
    let exp = expected();
    let ev = &exp["fused_variance_evidence"];
    assert_eq!(ev["fused_True_moving_variance"], ev["unbiased_var"]);
    assert_eq!(ev["default_4d_moving_variance"], ev["unbiased_var"]);
    assert_eq!(ev["fused_False_moving_variance"], ev["biased_var"]);
    assert_eq!(ev["keras3_moving_variance"], ev["biased_var"]);
    assert_eq!(ev["fused_argument_in_get_config"], false);

    for file in ["tfk_fresh.h5", "tfk_trained.h5"] {
        let ckpt = read_path(&dir().join(file)).unwrap().checkpoint;
        let layers = ckpt.layers().unwrap();
        let get = |n: &str| layers.iter().find(|l| l.name == n).unwrap();
        let report = exp["files"][file]["layers"].as_array().unwrap();
        let fused = |n: &str| {
            report.iter().find(|l| l["name"] == n).unwrap()["fused"]
                .as_bool()
                .unwrap()
        };
        assert!(fused("bn_fused"));
        assert_eq!(get("bn_fused").variance, VarianceEstimator::Unbiased);
        assert!(!fused("bn_renorm") && !fused("bn_inner"));
        assert_eq!(get("bn_renorm").variance, VarianceEstimator::Biased);
        assert_eq!(get("inner/bn_inner").variance, VarianceEstimator::Biased);
        // Known limit: fused=False is not in the file.
        assert!(!fused("bn_unfused"));
        assert_eq!(get("bn_unfused").variance, VarianceEstimator::Unbiased);
        let note = &ckpt.metadata["bnorm.layer.bn_unfused.assumed"];
        assert!(note.contains("fused=False"), "{note}");
        assert_eq!(ckpt.metadata["bnorm.layer.bn_fused.axis"], "[3]");
    }
    // A weights-only file has no configuration: nothing is recorded.
    let ckpt = read_path(&dir().join("tfk_trained_weights.h5"))
        .unwrap()
        .checkpoint;
    assert!(!ckpt.metadata.keys().any(|k| k.ends_with(".variance")));
    for l in ckpt.layers().unwrap() {
        assert_eq!(l.variance, VarianceEstimator::Biased);
    }
}

/// A BatchNormalization inside a custom (subclassed) layer: Keras 3 stores it under its
/// Python attribute name and config.json does not describe it, so the reader keeps its
/// variables (with the framework's values) under `block/block_bn/vars/<i>` but does not
/// list it as a batch-norm layer (a known limit, stated in the module docs).
#[test]
fn custom_layer_sublayers_are_kept_but_not_recognized() {
    let exp = expected();
    let c = &exp["custom_layer"];
    let loaded = read_path(&dir().join(c["file"].as_str().unwrap())).unwrap();
    assert_eq!(loaded.file_format, FileFormat::Keras);
    assert!(loaded.checkpoint.layers().unwrap().is_empty());
    let prefix = c["layer"]["path"].as_str().unwrap();
    for (i, v) in c["layer"]["weights"].as_array().unwrap().iter().enumerate() {
        let t = &loaded.checkpoint.tensors[&format!("{prefix}/vars/{i}")];
        assert_eq!(t.to_f64("t").unwrap(), floats(v), "{prefix} {i}");
    }
}

/// Non-batch-norm tensors are kept under sensible names.
#[test]
fn other_tensors_are_kept() {
    let k3 = read_path(&dir().join("k3_trained.keras"))
        .unwrap()
        .checkpoint;
    assert_eq!(k3.tensors["conv/vars/0"].shape, vec![1, 1, 2, 3]);
    assert_eq!(k3.tensors["inner/inner_dense/vars/0"].shape, vec![3, 2]);
    assert_eq!(k3.metadata["keras.model"], "k3net");
    let tfk = read_path(&dir().join("tfk_trained.h5")).unwrap().checkpoint;
    assert_eq!(tfk.tensors["conv/kernel"].shape, vec![1, 1, 2, 3]);
    assert_eq!(tfk.tensors["inner/inner_dense/kernel"].shape, vec![3, 2]);
    assert!(!tfk.tensors.keys().any(|k| k.contains("SGD")));
}

/// HDF5 layouts h5py can write but Keras does not: chunked datasets read to the same
/// values; a libver="latest" file (superblock 3) is refused with advice.
#[test]
fn chunked_copy_reads_like_the_original_and_latest_is_refused() {
    let original = read_path(&dir().join("k3_trained.weights.h5")).unwrap();
    let chunked = read_path(&dir().join("k3_chunked.weights.h5")).unwrap();
    assert_eq!(chunked.file_format, FileFormat::KerasWeights);
    assert_eq!(chunked.checkpoint, original.checkpoint);
    let bytes = std::fs::read(dir().join("tfk_latest.h5")).unwrap();
    let msg = assert_refused(&bytes, "latest");
    assert!(
        msg.contains("libver") && msg.contains("superblock version 3"),
        "{msg}"
    );
}

// ------------------------------------------------------------------------------ hostile

fn fixtures() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".h5") || name.ends_with(".keras") {
            out.push((name, std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    assert_eq!(out.len(), 9);
    out
}

fn assert_refused(bytes: &[u8], what: &str) -> String {
    match read_bytes(bytes) {
        Err(e @ (InteropError::Unreadable { .. } | InteropError::UnknownFormat { .. })) => {
            e.to_string()
        }
        Err(e) => panic!("{what}: unexpected error kind {e:?}"),
        Ok(_) => panic!("{what}: accepted"),
    }
}

#[test]
fn truncated_files_are_refused() {
    for (name, bytes) in fixtures() {
        let step = (bytes.len() / 400).max(1);
        let mut lens: Vec<usize> = (0..bytes.len()).step_by(step).collect();
        lens.extend(0..600.min(bytes.len()));
        for n in lens {
            let cut = &bytes[..n];
            // Short prefixes are not even recognized; the rest are refused by the reader.
            if let Ok(l) = read_bytes(cut) {
                // A cut that leaves every structure the reader needs intact (the file's
                // tail is unused space) must give what the whole file gives.
                assert_eq!(
                    l.checkpoint,
                    read_bytes(&bytes).unwrap().checkpoint,
                    "{name} cut at {n}"
                );
            }
        }
        // Cut halfway: always refused.
        assert_refused(&bytes[..bytes.len() / 2], &name);
    }
}

#[test]
fn bit_flips_never_panic() {
    for (_, bytes) in fixtures() {
        let mut b = bytes.clone();
        // About 300 positions a file, spread over it (the fuzz target does the rest).
        for i in (0..b.len()).step_by((b.len() / 300).max(1)) {
            for mask in [0x01u8, 0x80, 0xff] {
                b[i] ^= mask;
                common::read_and_consume(&b);
                b[i] ^= mask;
            }
        }
    }
}

/// Positions of 1-D dataspace messages of `dim` elements (version 1, rank 1).
fn dataspaces(bytes: &[u8], dim: u64) -> Vec<usize> {
    (0..bytes.len().saturating_sub(24))
        .filter(|&p| {
            bytes[p..p + 2] == [1, 0]
                && bytes[p + 8] == 1
                && bytes[p + 9] == 1
                && bytes[p + 16..p + 24] == dim.to_le_bytes()
        })
        .collect()
}

#[test]
fn huge_claimed_sizes_are_refused_before_allocating() {
    let bytes = std::fs::read(dir().join("tfk_trained_weights.h5")).unwrap();
    let spots = dataspaces(&bytes, 3);
    assert!(!spots.is_empty());
    for huge in [1u64 << 40, u64::MAX / 2, u64::MAX] {
        let mut b = bytes.clone();
        for &p in &spots {
            b[p + 16..p + 24].copy_from_slice(&huge.to_le_bytes());
        }
        let msg = assert_refused(&b, "huge dataspace");
        assert!(msg.contains("bytes") || msg.contains("overflow"), "{msg}");
    }
    // A superblock whose offsets are neither 2, 4 nor 8 bytes.
    let mut b = bytes.clone();
    b[13] = 3;
    assert!(assert_refused(&b, "offset size").contains("offset/length size"));
    // A root object header far past the end.
    let mut b = bytes.clone();
    b[64..72].copy_from_slice(&(1u64 << 50).to_le_bytes());
    assert!(assert_refused(&b, "root").contains("past the end"));
    // Superblock version 2 (libver="latest") is refused with advice.
    let mut b = bytes;
    b[8] = 2;
    assert!(assert_refused(&b, "v2").contains("libver"));
}

/// A `.keras` archive built from parts.
fn keras_zip(config: &[u8], weights: &[u8]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    w.start_file("metadata.json", opts).unwrap();
    w.write_all(b"{}").unwrap();
    w.start_file("config.json", opts).unwrap();
    w.write_all(config).unwrap();
    w.start_file("model.weights.h5", opts).unwrap();
    w.write_all(weights).unwrap();
    w.finish().unwrap().into_inner()
}

fn fixture_parts() -> (Value, Vec<u8>) {
    let bytes = std::fs::read(dir().join("k3_trained.keras")).unwrap();
    let mut a = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut config = Vec::new();
    std::io::Read::read_to_end(&mut a.by_name("config.json").unwrap(), &mut config).unwrap();
    let mut weights = Vec::new();
    std::io::Read::read_to_end(&mut a.by_name("model.weights.h5").unwrap(), &mut weights).unwrap();
    (serde_json::from_slice(&config).unwrap(), weights)
}

#[test]
fn rebuilt_keras_archive_reads_like_the_original() {
    let (config, weights) = fixture_parts();
    let z = keras_zip(config.to_string().as_bytes(), &weights);
    assert_eq!(
        read_bytes(&z).unwrap().checkpoint,
        read_path(&dir().join("k3_trained.keras"))
            .unwrap()
            .checkpoint
    );
}

/// The variables' paths come from the class names in config order; recent Keras writes
/// each layer's name on its `vars` group, and the reader follows that name when the
/// order disagrees (here: config.json's layers listed backwards).
#[test]
fn layer_order_mismatch_is_resolved_by_the_stored_names() {
    let (mut config, weights) = fixture_parts();
    config["config"]["layers"].as_array_mut().unwrap().reverse();
    let z = keras_zip(config.to_string().as_bytes(), &weights);
    let mut got = read_bytes(&z).unwrap().checkpoint;
    let mut want = read_path(&dir().join("k3_trained.keras"))
        .unwrap()
        .checkpoint;
    got.metadata.remove("keras.model");
    want.metadata.remove("keras.model");
    assert_eq!(got, want);
}

/// A zip entry that claims far more bytes than its compressed size can produce is
/// refused before anything is allocated for it.
#[test]
fn zip_entry_claiming_a_huge_size_is_refused() {
    let (config, weights) = fixture_parts();
    let mut z = keras_zip(config.to_string().as_bytes(), &weights);
    let name = b"model.weights.h5";
    let mut patched = 0;
    for p in 0..z.len() - 46 {
        // Central directory header: sizes at +20 (compressed) and +24 (uncompressed),
        // the name at +46.
        if z[p..p + 4] == *b"PK\x01\x02" && z[p + 46..].starts_with(name) {
            z[p + 24..p + 28].copy_from_slice(&0x7fff_fff0u32.to_le_bytes());
            patched += 1;
        }
    }
    assert_eq!(patched, 1);
    let msg = assert_refused(&z, "zip size");
    assert!(msg.contains("model.weights.h5"), "{msg}");
}

#[test]
fn wrong_types_and_disagreeing_config_are_refused() {
    let (config, weights) = fixture_parts();
    // bn_plain (center=False, scale=False: 2 variables) claimed to have gamma and beta.
    let mut c = config.clone();
    for l in c["config"]["layers"].as_array_mut().unwrap() {
        if l["config"]["name"] == "bn_plain" {
            l["config"]["center"] = Value::Bool(true);
            l["config"]["scale"] = Value::String("yes".into()); // wrong type: default true
        }
    }
    let msg = assert_refused(&keras_zip(c.to_string().as_bytes(), &weights), "center");
    assert!(
        msg.contains("bn_plain") && msg.contains("2 variables"),
        "{msg}"
    );
    // config.json that is not JSON, or JSON of the wrong shape.
    assert!(assert_refused(&keras_zip(b"{not json", &weights), "json").contains("JSON"));
    let c = serde_json::json!({"config": {"layers": [{"class_name": "BatchNormalization",
        "config": {"name": "ghost"}}]}});
    let msg = assert_refused(&keras_zip(c.to_string().as_bytes(), &weights), "ghost");
    assert!(msg.contains("ghost"), "{msg}");
    let c = serde_json::json!({"config": {"layers": 7}});
    // Not a list of layers: read as a bare weights file (a subclassed model).
    let loaded = read_bytes(&keras_zip(c.to_string().as_bytes(), &weights)).unwrap();
    assert_eq!(loaded.checkpoint.layers().unwrap().len(), 4);
    // Weights that are not HDF5.
    let msg = assert_refused(&keras_zip(config.to_string().as_bytes(), b"nothing"), "h5");
    assert!(msg.contains("signature"), "{msg}");
}

#[test]
fn deep_nesting_is_refused() {
    let (_, weights) = fixture_parts();
    let mut layer =
        serde_json::json!({"class_name": "BatchNormalization", "config": {"name": "bn"}});
    for i in 0..20 {
        layer = serde_json::json!({"class_name": "Sequential",
            "config": {"name": format!("m{i}"), "layers": [layer]}});
    }
    let c = serde_json::json!({"config": {"layers": [layer]}});
    let msg = assert_refused(&keras_zip(c.to_string().as_bytes(), &weights), "deep");
    assert!(msg.contains("deep"), "{msg}");
    // Deeper than serde_json's own recursion limit: a JSON error, not a stack overflow.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(assert_refused(&keras_zip(deep.as_bytes(), &weights), "json").contains("JSON"));
}

#[test]
fn fuzz_corpus_replays_without_panic() {
    for bytes in common::corpus("read_keras", 10) {
        common::read_and_consume(&bytes);
    }
}

/// A stable-Rust stand-in for the fuzz target where cargo-fuzz is not installed: random
/// byte mutations (flips, overwrites with extreme values, truncations, splices) of the
/// corpus for `BNORM_KERAS_MUTATE_SECS` seconds (default 2). Run by hand:
///
/// ```text
/// BNORM_KERAS_MUTATE_SECS=120 cargo test -p bnorm-interop --test read_keras -- \
///     --ignored --nocapture
/// ```
#[test]
#[ignore]
fn random_mutations_never_panic() {
    let secs: u64 = std::env::var("BNORM_KERAS_MUTATE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/read_keras");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    seeds.sort();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let start = std::time::Instant::now();
    let (mut runs, mut accepted) = (0u64, 0u64);
    while start.elapsed().as_secs() < secs {
        let mut b = seeds[(rand() % seeds.len() as u64) as usize].clone();
        for _ in 0..1 + rand() % 8 {
            let len = b.len().max(1) as u64;
            let p = (rand() % len) as usize;
            match rand() % 5 {
                0 if !b.is_empty() => b[p] ^= 1 << (rand() % 8),
                1 if !b.is_empty() => b[p] = [0x00, 0xff, 0x7f, 0x80][(rand() % 4) as usize],
                2 if p + 8 <= b.len() => b[p..p + 8].copy_from_slice(&u64::MAX.to_le_bytes()),
                3 => b.truncate(p),
                _ if p + 16 <= b.len() => {
                    let q = (rand() % len) as usize;
                    if q + 16 <= b.len() {
                        let chunk = b[q..q + 16].to_vec();
                        b[p..p + 16].copy_from_slice(&chunk);
                    }
                }
                _ => {}
            }
        }
        accepted += u64::from(common::read_and_consume(&b));
        runs += 1;
    }
    println!("{runs} mutated inputs in {secs} s, {accepted} read without error, no panic");
}
