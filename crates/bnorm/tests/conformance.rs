//! The recorded framework cases, replayed from `cargo test`.
#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

use std::path::Path;

#[test]
fn every_bundled_case_passes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conformance/cases");
    let results = bnorm::conformance::run_dir(&dir).expect("case directory readable");
    assert!(
        results.len() >= 42,
        "expected the 42 bundled cases, found {}",
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

fn bundled(name: &str) -> bnorm::conformance::Case {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../conformance/cases")
        .join(format!("{name}.safetensors"));
    bnorm::conformance::Case::load(&src).unwrap()
}

/// The recorded framework behaviour on single values is the preset's: flipping the policy
/// in a case makes it fail.
#[test]
fn flipping_the_single_value_policy_fails_the_framework_cases() {
    for (name, flipped) in [
        ("keras_single_value", "refuse"),
        ("tf_recipe_single_value", "refuse"),
        ("ghost_groups_of_one", "refuse"),
        ("error_single_value_per_channel", "accept"),
        ("error_torch_single_value_after_a_step", "accept"),
    ] {
        let mut case = bundled(name);
        assert!(bnorm::conformance::replay(&case).passed, "{name}");
        case.meta.insert("single_value".into(), flipped.into());
        let r = bnorm::conformance::replay(&case);
        // a torch case that accepts still refuses the unbiased variance of one value: the
        // flipped policy is tried on its biased twin as well
        if name.starts_with("error_") {
            case.meta.insert("convention".into(), "keras".into());
            case.meta.insert("momentum".into(), "0.9".into());
            let r = bnorm::conformance::replay(&case);
            assert!(
                !r.passed,
                "{name} with keras semantics passed: {}",
                r.detail
            );
        } else {
            assert!(
                !r.passed,
                "{name} with single_value={flipped} passed: {}",
                r.detail
            );
        }
    }
}

/// Format 2's additions are read and change the result: a loaded update count, loaded
/// renorm state, parameters changed between steps, and an error case's earlier steps are
/// compared.
#[test]
fn format_two_additions_are_replayed() {
    let mut case = bundled("torch_loaded_num_batches_tracked");
    assert_eq!(case.initial_updates().unwrap(), 5);
    case.meta.remove("num_batches_tracked");
    assert!(
        !bnorm::conformance::replay(&case).passed,
        "the count is used"
    );

    let mut case = bundled("renorm_loaded_state");
    case.tensors.remove("init.renorm_mean");
    let r = bnorm::conformance::replay(&case);
    assert!(
        !r.passed && r.detail.contains("all or none"),
        "{}",
        r.detail
    );
    let mut case = bundled("renorm_loaded_state");
    for t in [
        "init.renorm_mean",
        "init.renorm_stddev",
        "init.moving_stddev",
    ] {
        case.tensors.remove(t);
    }
    assert!(
        !bnorm::conformance::replay(&case).passed,
        "the renorm state is used"
    );

    let mut case = bundled("torch_params_change");
    case.tensors.remove("step2.weight");
    let r = bnorm::conformance::replay(&case);
    assert!(!r.passed && r.detail.contains("step2"), "{}", r.detail);

    let mut case = bundled("error_torch_single_value_after_a_step");
    case.tensors.get_mut("step0.y").unwrap().data[0] += 1e-3;
    let r = bnorm::conformance::replay(&case);
    assert!(!r.passed, "the step before the refused one is compared");
    let mut case = bundled("error_torch_single_value_after_a_step");
    let y = case.tensors["step0.y"].clone();
    case.tensors.insert("step1.y".into(), y);
    let r = bnorm::conformance::replay(&case);
    assert!(
        !r.passed && r.detail.contains("records an output"),
        "{}",
        r.detail
    );

    let case = bundled("torch_mixed_f16");
    use bnorm::element::DType;
    assert_eq!((case.dtype, case.param_dtype), (DType::F16, DType::F32));
}

/// TensorFlow's `ExponentialMovingAverage(num_updates=…)` as recorded: a plain decay, the
/// counter ignored, an off-by-one counter (n counted after the update) or the cap left out
/// each fail a case.
#[test]
fn the_num_updates_decay_is_replayed() {
    for name in ["tf_ema_num_updates", "tf_ema_num_updates_cap"] {
        let case = bundled(name);
        let r = bnorm::conformance::replay(&case);
        assert!(r.passed, "{name}: {}", r.detail);
        let mut plain = case.clone();
        plain.meta.remove("ema_num_updates");
        assert!(
            !bnorm::conformance::replay(&plain).passed,
            "{name} passes with a plain decay"
        );
        let start = case.initial_updates().unwrap();
        let mut shifted = case.clone();
        shifted
            .meta
            .insert("num_batches_tracked".into(), (start + 1).to_string());
        assert!(
            !bnorm::conformance::replay(&shifted).passed,
            "{name} passes with n counted one later"
        );
    }
    // from 60 updates on, the cap binds at the last training step (n = 63): a decay that
    // keeps ramping is off there
    let case = bundled("tf_ema_num_updates_cap");
    assert_eq!(case.initial_updates().unwrap(), 60);
    let mut ramp = case.clone();
    ramp.meta.insert("momentum".into(), "0.9".into());
    let r = bnorm::conformance::replay(&ramp);
    assert!(!r.passed, "the cap is ignored: {}", r.detail);
    // ... and only there: the first three steps (n = 60, 61, 62) still agree
    ramp.steps.truncate(3);
    ramp.tensors
        .retain(|k, _| !k.starts_with("step3.") && !k.starts_with("step4."));
    let r = bnorm::conformance::replay(&ramp);
    assert!(
        r.passed,
        "the ramp differs before the cap binds: {}",
        r.detail
    );
    // a zero-debiased num_updates decay is not a bnorm convention: refused while loading
    let mut both = case;
    both.meta.insert("zero_debias".into(), "true".into());
    let r = bnorm::conformance::replay(&both);
    assert!(
        !r.passed && r.detail.contains("ema_num_updates"),
        "{}",
        r.detail
    );
}

/// Renorm of ghost batches is `variant = ghost_renorm`: a ghost case carrying a renorm
/// setting, or a renorm case carrying a ghost setting, is refused while loading, naming
/// the setting.
#[test]
fn a_ghost_case_with_renorm_settings_is_refused() {
    let mut case = bundled("ghost_nc");
    assert!(bnorm::conformance::replay(&case).passed);
    case.meta.insert("rmax".into(), "1.5".into());
    let err = case.config().unwrap_err();
    assert!(err.to_string().contains("rmax"), "{err}");
    assert!(!bnorm::conformance::replay(&case).passed);
    let mut case = bundled("renorm_nhwc");
    assert!(bnorm::conformance::replay(&case).passed);
    case.meta.insert("virtual_batch_size".into(), "2".into());
    let err = case.config().unwrap_err();
    assert!(err.to_string().contains("virtual_batch_size"), "{err}");
}

/// tf_keras's renorm of ghost batches (`ghost_renorm_nhwc`) is reproduced only by the
/// combination: the same case read as renorm alone (whole-batch statistics) or as ghost
/// batches alone (no correction) fails.
#[test]
fn the_ghost_renorm_case_needs_both_parts() {
    let case = bundled("ghost_renorm_nhwc");
    assert_eq!(
        case.config()
            .unwrap()
            .get_variant()
            .ghost()
            .map(|g| g.virtual_batch_size),
        Some(2)
    );
    assert!(case.config().unwrap().get_variant().renorm().is_some());
    let r = bnorm::conformance::replay(&case);
    assert!(r.passed && r.compared > 0, "{}", r.detail);
    let mut renorm_alone = case.clone();
    renorm_alone
        .meta
        .insert("variant".into(), "batch_renorm".into());
    renorm_alone.meta.remove("virtual_batch_size");
    renorm_alone.meta.remove("ghost_grouping");
    let r = bnorm::conformance::replay(&renorm_alone);
    assert!(!r.passed, "read as renorm alone it passed: {}", r.detail);
    let mut ghost_alone = case.clone();
    ghost_alone.meta.insert("variant".into(), "ghost".into());
    for key in ["rmax", "rmin", "dmax", "renorm_momentum"] {
        ghost_alone.meta.remove(key);
    }
    for name in [
        "init.renorm_mean",
        "init.renorm_stddev",
        "init.moving_stddev",
    ] {
        ghost_alone.tensors.remove(name);
    }
    let r = bnorm::conformance::replay(&ghost_alone);
    assert!(
        !r.passed,
        "read as ghost batches alone it passed: {}",
        r.detail
    );
}
