//! What the reader tests share: where each format's fixtures are, and reading what the
//! framework reported when it wrote them (`expected.json` beside them).
#![allow(dead_code)]

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
