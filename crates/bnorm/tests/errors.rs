//! Bad input gets a typed error and changes nothing.
#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

mod common;

use bnorm::config::{Ghost, NonFinitePolicy, SingleValuePolicy, Variant};
use bnorm::{Config, Error, Layout, Mode, Momentum, Params, RunningState};
use common::Rng;

fn trained_layer(cfg: Config) -> bnorm::BatchNorm {
    let mut bn = cfg.build().unwrap();
    let mut rng = Rng(1);
    bn.forward(
        &rng.vec(24, 1.0, 1.0),
        &[2, 3, 2, 2],
        Layout::NCHW,
        Mode::Train,
    )
    .unwrap();
    bn
}

#[test]
fn invalid_settings_are_refused_when_the_layer_is_built() {
    let bad = [
        Config::torch(4).eps(0.0),
        Config::torch(4).eps(-1.0),
        Config::torch(4).eps(f64::NAN),
        Config::torch(4).eps(f64::INFINITY),
        Config::torch(4).momentum(Momentum::NewWeight(1.5)),
        Config::torch(4).momentum(Momentum::NewWeight(-0.1)),
        Config::keras(4).momentum(Momentum::Decay(f64::NAN)),
        Config::tensorflow(4).momentum(Momentum::DebiasedDecay(1.0)),
        Config::torch(0),
        Config::keras(4).variant(Variant::Ghost(Ghost::strided(0))),
    ];
    for cfg in bad {
        let e = cfg.clone().build().unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{cfg:?}: {e}");
    }
    for ok in [
        Config::torch(4).momentum(Momentum::NewWeight(0.0)),
        Config::torch(4).momentum(Momentum::NewWeight(1.0)),
        Config::keras(4).momentum(Momentum::Decay(1.0)),
    ] {
        ok.build().unwrap();
    }
}

#[test]
fn one_value_per_channel_is_batch_too_small_and_updates_nothing() {
    let mut bn = trained_layer(Config::torch(3));
    let before = bn.running_state().unwrap().clone();
    let x = [1.0f32, 2.0, 3.0];
    for (shape, layout) in [
        (vec![1, 3], Layout::NC),
        (vec![1, 3, 1, 1], Layout::NCHW),
        (vec![1, 1, 3], Layout::NLC),
    ] {
        let mut y = [7.0f32; 3];
        let e = bn
            .forward_into(&x, &shape, layout, Mode::Train, &mut y)
            .unwrap_err();
        assert_eq!(e, Error::BatchTooSmall { channel_values: 1 });
        assert_eq!(y, [7.0; 3], "output written on error");
        assert_eq!(bn.running_state().unwrap(), &before);
    }
    // Inference with running statistics is fine with one value per channel.
    bn.forward(&x, &[1, 3], Layout::NC, Mode::Inference)
        .unwrap();
    // Without running statistics, inference needs batch statistics too.
    let mut untracked = Config::torch(3).track_running_stats(false).build().unwrap();
    let e = untracked
        .forward(&x, &[1, 3], Layout::NC, Mode::Inference)
        .unwrap_err();
    assert!(matches!(e, Error::BatchTooSmall { .. }));
    let e = untracked
        .forward(&x, &[1, 3], Layout::NC, Mode::Frozen)
        .unwrap_err();
    assert_eq!(e, Error::NoRunningStatistics);
    // An empty batch too.
    let e = bn
        .forward::<f32>(&[], &[0, 3], Layout::NC, Mode::Train)
        .unwrap_err();
    assert_eq!(e, Error::BatchTooSmall { channel_values: 0 });
}

#[test]
fn shape_errors_are_typed_and_change_nothing() {
    let mut bn = trained_layer(Config::torch(3));
    let before = bn.running_state().unwrap().clone();
    let x = vec![0.5f64; 24];
    // channel mismatch
    let e = bn
        .forward(&x, &[2, 4, 3, 1], Layout::NCHW, Mode::Train)
        .unwrap_err();
    assert_eq!(
        e,
        Error::ChannelMismatch {
            expected: 3,
            got: 4
        }
    );
    assert!(e.to_string().contains("channel axis"), "{e}");
    // data length does not match shape
    let e = bn
        .forward(&x[..20], &[2, 3, 2, 2], Layout::NCHW, Mode::Train)
        .unwrap_err();
    assert_eq!(
        e,
        Error::LengthMismatch {
            what: "x",
            expected: 24,
            got: 20
        }
    );
    // rank does not match layout
    let e = bn
        .forward(&x, &[2, 3, 4], Layout::NCHW, Mode::Train)
        .unwrap_err();
    assert!(matches!(e, Error::RankMismatch { .. }), "{e}");
    // overflowing shape product
    let e = bn
        .forward(&x, &[usize::MAX, 3, 2, 2], Layout::NCHW, Mode::Train)
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert_eq!(bn.running_state().unwrap(), &before);
    // backward with another shape than the forward step
    bn.forward(&x, &[2, 3, 2, 2], Layout::NCHW, Mode::Train)
        .unwrap();
    let e = bn
        .backward(&x, &x, &[2, 2, 2, 3], Layout::NHWC)
        .unwrap_err();
    assert!(matches!(e, Error::SavedMismatch { .. }), "{e}");
    let e = bn
        .backward(&x, &x[..12], &[2, 3, 2, 2], Layout::NCHW)
        .unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { what: "dy", .. }), "{e}");
}

#[test]
fn bad_parameters_and_statistics_are_refused() {
    let cfg = Config::torch(3);
    let mut bn = cfg.clone().build().unwrap();
    let good = bn.params().clone();
    // each cause its own error: a wrong length, a NaN, a missing and an unexpected one
    for (p, want) in [
        (
            Params {
                weight: Some(vec![1.0; 2]),
                bias: Some(vec![0.0; 3]),
            },
            Error::ShapeMismatch {
                what: "weight",
                expected: vec![3],
                got: vec![2],
            },
        ),
        (
            Params {
                weight: Some(vec![1.0, f64::NAN, 1.0]),
                bias: Some(vec![0.0; 3]),
            },
            Error::NonFiniteParameter {
                what: "weight",
                channel: 1,
            },
        ),
        (
            Params {
                weight: None,
                bias: Some(vec![0.0; 3]),
            },
            Error::MissingParameter { what: "weight" },
        ),
        (
            Params {
                weight: Some(vec![1.0; 3]),
                bias: Some(vec![f64::INFINITY; 3]),
            },
            Error::NonFiniteParameter {
                what: "bias",
                channel: 0,
            },
        ),
    ] {
        assert_eq!(bn.set_params(p).unwrap_err(), want);
        assert_eq!(bn.params(), &good);
    }
    let mut no_scale = Config::torch(3).scale(false).build().unwrap();
    let e = no_scale.set_params(good.clone()).unwrap_err();
    assert_eq!(e, Error::UnexpectedParameter { what: "weight" });
    // a NaN in gamma is not called a negative variance, nor the other way round
    let nan_gamma = Params {
        weight: Some(vec![f64::NAN; 3]),
        bias: Some(vec![0.0; 3]),
    };
    assert!(!bn
        .set_params(nan_gamma)
        .unwrap_err()
        .to_string()
        .contains("negative"));
    let e = RunningState::from_values(&cfg, vec![0.0; 3], vec![1.0, -1.0, 1.0], 0).unwrap_err();
    assert_eq!(
        e,
        Error::NegativeVariance {
            what: "running_var",
            channel: 1
        }
    );
    assert!(e.to_string().contains("negative variance"), "{e}");
    // a renorm standard deviation is not called a variance
    let e = Error::NegativeVariance {
        what: "renorm_stddev",
        channel: 0,
    };
    assert!(e.to_string().contains("negative standard deviation"), "{e}");
    assert!(!e.to_string().contains("variance"), "{e}");
    let e = RunningState::from_values(&cfg, vec![0.0; 4], vec![1.0; 3], 0).unwrap_err();
    assert!(matches!(
        e,
        Error::ShapeMismatch {
            what: "running_mean",
            ..
        }
    ));
    let e = RunningState::from_values(&cfg, vec![f64::NAN, 0.0, 0.0], vec![1.0; 3], 0).unwrap_err();
    assert!(matches!(e, Error::NonFiniteParameter { .. }));
}

#[test]
fn non_finite_input_never_poisons_running_statistics() {
    let mut bn = trained_layer(Config::torch(3));
    let before = bn.running_state().unwrap().clone();
    let mut x = vec![1.0f32; 24];
    for (i, v) in x.iter_mut().enumerate() {
        *v = i as f32;
    }
    x[5] = f32::NAN; // sample 0, channel 1
    let (y, report) = bn
        .forward(&x, &[2, 3, 2, 2], Layout::NCHW, Mode::Train)
        .unwrap();
    assert_eq!(report.skipped_channels, vec![1]);
    assert!(report.updated);
    assert!(
        y[4..8].iter().all(|v| v.is_nan()),
        "NaN propagates to its channel's output"
    );
    assert!(y[0..4].iter().all(|v| v.is_finite()));
    let after = bn.running_state().unwrap();
    assert_eq!(after.mean[1], before.mean[1]);
    assert_eq!(after.var[1], before.var[1]);
    assert_ne!(after.mean[0], before.mean[0]);
    // With the Error policy, the step is refused and nothing changes.
    let mut strict = trained_layer(Config::torch(3).non_finite(NonFinitePolicy::Error));
    let before = strict.running_state().unwrap().clone();
    let mut y = vec![9.0f32; 24];
    let e = strict
        .forward_into(&x, &[2, 3, 2, 2], Layout::NCHW, Mode::Train, &mut y)
        .unwrap_err();
    assert_eq!(e, Error::NonFiniteStatistics { channels: vec![1] });
    assert_eq!(strict.running_state().unwrap(), &before);
    assert!(y.iter().all(|&v| v == 9.0));
    // Infinity too.
    x[5] = f32::INFINITY;
    let (_, report) = bn
        .forward(&x, &[2, 3, 2, 2], Layout::NCHW, Mode::Train)
        .unwrap();
    assert_eq!(report.skipped_channels, vec![1]);
}

#[test]
fn ghost_batches_that_do_not_divide_are_refused() {
    let mut bn = Config::keras(2)
        .variant(Variant::Ghost(Ghost::strided(4)))
        .build()
        .unwrap();
    let before = bn.running_state().unwrap().clone();
    let e = bn
        .forward(&[0.0f32; 12], &[6, 2], Layout::NC, Mode::Train)
        .unwrap_err();
    assert_eq!(
        e,
        Error::GhostBatchIndivisible {
            batch: 6,
            virtual_batch_size: 4
        }
    );
    assert_eq!(bn.running_state().unwrap(), &before);
    // A group with one value per channel is too small where single values are refused
    // (accepted under the Keras preset, as tf_keras does: tests/single_value.rs).
    let mut bn = Config::keras(2)
        .variant(Variant::Ghost(Ghost::strided(1)))
        .single_value(SingleValuePolicy::Refuse)
        .build()
        .unwrap();
    let e = bn
        .forward(&[0.0f32; 8], &[4, 2], Layout::NC, Mode::Train)
        .unwrap_err();
    assert_eq!(e, Error::BatchTooSmall { channel_values: 1 });
}

#[test]
fn errors_explain_what_to_do() {
    let msg = Error::BatchTooSmall { channel_values: 1 }.to_string();
    assert!(
        msg.contains("at least 2") && msg.contains("inference"),
        "{msg}"
    );
    let msg = Config::torch(2)
        .eps(-1.0)
        .validate()
        .unwrap_err()
        .to_string();
    assert!(msg.contains("eps") && msg.contains("> 0"), "{msg}");
}

/// A printed error chain names each cause once: a message that already ends with its
/// cause does not return it again as its source.
#[test]
fn error_chains_name_each_cause_once() {
    use std::error::Error as _;
    let e = bnorm_interop::Checkpoint::read(std::path::Path::new("/no/such/file.safetensors"))
        .unwrap_err();
    let mut chain = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        chain.push_str(&format!(": {c}"));
        cause = c.source();
    }
    assert_eq!(chain.matches("No such file").count(), 1, "{chain}");
    // a transport's error is kept as the source of a communication failure
    let io = std::io::Error::other("peer went away");
    let e = Error::communication("all_gather", Some(io));
    assert_eq!(
        e.source().map(|s| s.to_string()),
        Some("peer went away".into())
    );
    assert!(!e.to_string().contains("peer went away"));
}
