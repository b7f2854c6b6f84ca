//! The recorded framework cases, replayed from `cargo test`.
#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

use std::path::Path;

#[test]
fn every_bundled_case_passes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conformance/cases");
    let results = bnorm::conformance::run_dir(&dir).expect("case directory readable");
    assert!(
        results.len() >= 28,
        "expected the 28 bundled cases, found {}",
        results.len()
    );
    let failed: Vec<_> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| format!("{}: {}", r.name, r.detail))
        .collect();
    assert!(failed.is_empty(), "failing cases:\n{}", failed.join("\n"));
    // Every non-error case compared real numbers.
    for r in &results {
        if !r.name.starts_with("error_") {
            assert!(r.compared > 0, "{} compared nothing", r.name);
        }
    }
}

#[test]
fn a_corrupt_case_file_is_refused_with_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("bnorm-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broken.safetensors");
    std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all").unwrap();
    let err = bnorm::conformance::Case::load(&path).unwrap_err();
    assert!(err.to_string().contains("not a valid safetensors"), "{err}");
    let results = bnorm::conformance::run_dir(&dir).unwrap();
    assert_eq!(results.len(), 1);
    assert!(!results[0].passed);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_tampered_case_fails_replay() {
    // Change one recorded output: the replay must notice.
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../conformance/cases/torch_nc_f32.safetensors");
    let mut case = bnorm::conformance::Case::load(&src).unwrap();
    let y = case.tensors.get_mut("step1.y").unwrap();
    y.data[7] += 1e-2;
    let r = bnorm::conformance::replay(&case);
    assert!(!r.passed, "tampered case passed: {}", r.detail);
    assert!(r.detail.contains("step1.y[7]"), "{}", r.detail);
}
