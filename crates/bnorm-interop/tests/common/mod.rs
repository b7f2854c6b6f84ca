//! What the reader tests share: where each format's fixtures are, reading what the
//! framework reported when it wrote them (`expected.json` beside them), and the fuzz
//! targets' consumer with their corpora, to replay on stable Rust.
#![allow(dead_code)]

/// What every fuzz target does with a checkpoint a reader accepted (the same file).
#[path = "../../fuzz/fuzz_targets/consume.rs"]
mod consume;
pub use consume::consume;

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The fixture folder of `format` (`tests/data/<format>`).
pub fn data_dir(format: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(format)
}

/// The bytes of one fixture of `format`.
pub fn fixture_bytes(format: &str, name: &str) -> Vec<u8> {
    let path = data_dir(format).join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What the framework reported for the fixtures of `format`.
pub fn expected_json(format: &str) -> Value {
    serde_json::from_slice(&fixture_bytes(format, "expected.json")).unwrap()
}

/// A JSON array of numbers as f64.
pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// The committed corpus of the fuzz target `target` (at least `min` inputs).
pub fn corpus(target: &str, min: usize) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(
        inputs.len() >= min,
        "{target}: corpus has {} files",
        inputs.len()
    );
    inputs
}

/// Reads `bytes` as the command line would and consumes what is read; errors are fine,
/// panics not. Whether it was read.
pub fn read_and_consume(bytes: &[u8]) -> bool {
    match bnorm_interop::read::read_bytes(bytes) {
        Ok(loaded) => {
            consume(&loaded.checkpoint);
            true
        }
        Err(_) => false,
    }
}
