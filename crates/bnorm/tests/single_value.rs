//! One value per channel (or per ghost group) in a training step, per preset: PyTorch
//! refuses, Keras, tf_keras and TensorFlow normalize it to `y = β` with `dx = 0` and move
//! the moving variance toward 0 (checked against PyTorch 2.15, Keras 3.15, tf_keras 2.21 and
//! TensorFlow 2.21 on 2026-12-03; the cases in conformance/cases replay their outputs).
//! Every test here fails if a preset's choice is flipped.

#![allow(clippy::needless_range_loop)]

mod common;

use bnorm::config::{Ghost, GhostGrouping, GhostRemainder, GhostUpdate, SingleValuePolicy};
use bnorm::config::{Renorm, Variant};
use bnorm::expert::{forward_into, Options, Parallelism, Saved, Workspace};
use bnorm::sync::ThreadComm;
use bnorm::{reference, Config, Error, Layout, Mode, Params, RunningState, VarianceEstimator};
use common::Rng;

const C: usize = 3;

/// gamma 2, 0.5, -1.5; beta 0.25, -1, 3; running mean 0.5 and variance 2 after one update.
fn layer(cfg: Config) -> bnorm::BatchNorm {
    let mut bn = cfg.build().unwrap();
    if bn.config().get_scale() || bn.config().get_center() {
        let p = Params {
            weight: bn.config().get_scale().then(|| vec![2.0, 0.5, -1.5]),
            bias: bn.config().get_center().then(|| vec![0.25, -1.0, 3.0]),
        };
        bn.set_params(p).unwrap();
    }
    if let Some(s) = bn.running_state().cloned() {
        let mut s = s;
        s.mean = vec![0.5; C];
        s.var = vec![2.0; C];
        s.updates = 1;
        bn.set_running_state(s).unwrap();
    }
    bn
}

fn beta(bn: &bnorm::BatchNorm, k: usize) -> f64 {
    bn.params().beta(k)
}

/// The shapes of one value per channel in each layout family.
fn single_shapes() -> Vec<(Vec<usize>, Layout)> {
    vec![
        (vec![1, C], Layout::NC),
        (vec![1, C, 1, 1], Layout::NCHW),
        (vec![1, 1, 1, C], Layout::NHWC),
        (vec![1, 1, C], Layout::NLC),
    ]
}

#[test]
fn torch_refuses_one_value_and_changes_nothing() {
    let mut bn = layer(Config::torch(C));
    let before = bn.running_state().cloned();
    for (shape, layout) in single_shapes() {
        let mut y = [7.0f32; C];
        let e = bn
            .forward_into(&[1.5f32, -2.0, 0.3], &shape, layout, Mode::Train, &mut y)
            .unwrap_err();
        assert_eq!(e, Error::BatchTooSmall { channel_values: 1 });
        assert_eq!(y, [7.0; C]);
        assert_eq!(bn.running_state().cloned(), before);
    }
    let r = reference::forward(
        &Config::torch(C),
        Layout::NC,
        &[1, C],
        &[1.5, -2.0, 0.3],
        bn.params(),
        before.as_ref(),
        Mode::Train,
    );
    assert!(matches!(r, Err(Error::BatchTooSmall { channel_values: 1 })));
}

/// Keras 3 and tf_keras (momentum 0.9): y = β, moving mean 0.9·m + 0.1·x, moving variance
/// 0.9·v (toward 0), dx = 0, dγ = 0, dβ = dy — for f32 and f64, every layout family, and
/// the reference agrees.
#[test]
fn keras_and_tensorflow_accept_one_value() {
    let x = [1.5f64, -2.0, 0.3];
    let dy = [0.7f64, -1.1, 2.0];
    let presets = [
        Config::keras(C).momentum(bnorm::Momentum::Decay(0.9)),
        Config::tensorflow(C).momentum(bnorm::Momentum::Decay(0.9)),
    ];
    for cfg in presets {
        assert_eq!(cfg.get_single_value(), SingleValuePolicy::Accept);
        for (shape, layout) in single_shapes() {
            let mut bn = layer(cfg.clone());
            let xs: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let (y, report) = bn.forward(&xs, &shape, layout, Mode::Train).unwrap();
            assert!(report.single_value && report.updated, "{report:?}");
            for k in 0..C {
                assert_eq!(y[k] as f64, beta(&bn, k) as f32 as f64, "{layout:?} ch {k}");
            }
            let s = bn.running_state().unwrap();
            for k in 0..C {
                assert!((s.mean[k] - (0.9 * 0.5 + 0.1 * x[k])).abs() < 1e-6);
                assert!((s.var[k] - 0.9 * 2.0).abs() < 1e-12, "{}", s.var[k]);
            }
            let dys: Vec<f32> = dy.iter().map(|&v| v as f32).collect();
            let b = bn.backward(&xs, &dys, &shape, layout).unwrap();
            assert_eq!(b.dx, [0.0f32; C], "dx is exactly 0");
            if let Some(dw) = b.dweight {
                assert_eq!(dw, [0.0; C]);
            }
            let db = b.dbias.unwrap();
            for k in 0..C {
                assert_eq!(db[k], dy[k] as f32 as f64);
            }
            // f64 and the reference
            let mut bn = layer(cfg.clone());
            let before = bn.running_state().cloned();
            let (y, _) = bn.forward(&x, &shape, layout, Mode::Train).unwrap();
            let r = reference::forward(
                &cfg,
                layout,
                &shape,
                &x,
                bn.params(),
                before.as_ref(),
                Mode::Train,
            )
            .unwrap();
            assert_eq!(y, r.y);
            assert_eq!(bn.running_state().unwrap().var, r.state.unwrap().var);
            let b = bn.backward(&x, &dy, &shape, layout).unwrap();
            let rb = reference::backward(
                &cfg,
                layout,
                &shape,
                &x,
                &dy,
                bn.params(),
                &r_fwd(&cfg, &shape, layout, &x, before.as_ref()),
            )
            .unwrap();
            assert_eq!(b.dx, rb.dx);
            assert_eq!(b.dx, [0.0; C]);
        }
    }
}

fn r_fwd(
    cfg: &Config,
    shape: &[usize],
    layout: Layout,
    x: &[f64],
    state: Option<&RunningState>,
) -> reference::RefForward {
    let bn = layer(cfg.clone());
    reference::forward(cfg, layout, shape, x, bn.params(), state, Mode::Train).unwrap()
}

/// Flipping either preset's policy flips the behaviour.
#[test]
fn the_policy_is_a_setting_that_flips_each_preset() {
    let x = [1.5f32, -2.0, 0.3];
    let mut keras_refusing = layer(Config::keras(C).single_value(SingleValuePolicy::Refuse));
    assert_eq!(
        keras_refusing
            .forward(&x, &[1, C], Layout::NC, Mode::Train)
            .unwrap_err(),
        Error::BatchTooSmall { channel_values: 1 }
    );
    // PyTorch's layer accepting: only with a biased running variance (the unbiased one
    // of one value is 0/0, so it stays refused), or where nothing is folded
    let accepting = Config::torch(C).single_value(SingleValuePolicy::Accept);
    let mut bn = layer(accepting.clone());
    assert_eq!(
        bn.forward(&x, &[1, C], Layout::NC, Mode::Train)
            .unwrap_err(),
        Error::BatchTooSmall { channel_values: 1 }
    );
    let mut bn = layer(
        accepting
            .clone()
            .running_variance(VarianceEstimator::Biased),
    );
    let (y, report) = bn.forward(&x, &[1, C], Layout::NC, Mode::Train).unwrap();
    assert!(report.single_value);
    assert_eq!(y, [0.25, -1.0, 3.0]);
    let mut untracked = layer(accepting.track_running_stats(false));
    let (y, report) = untracked
        .forward(&x, &[1, C], Layout::NC, Mode::Inference)
        .unwrap();
    assert!(report.single_value && !report.updated);
    assert_eq!(y, [0.25, -1.0, 3.0]);
    // two values per channel: nothing to report
    let mut keras = layer(Config::keras(C));
    let (_, report) = keras
        .forward(
            &[1.0f32, 2.0, 3.0, 4.0, 5.0, 7.0],
            &[2, C],
            Layout::NC,
            Mode::Train,
        )
        .unwrap();
    assert!(!report.single_value);
    // an empty batch is refused under every policy
    assert_eq!(
        keras
            .forward::<f32>(&[], &[0, C], Layout::NC, Mode::Train)
            .unwrap_err(),
        Error::BatchTooSmall { channel_values: 0 }
    );
}

/// tf_keras `virtual_batch_size=1` on NC input: every group holds one value per channel;
/// y = β, dx = 0, the moving mean moves toward the batch mean (the average of the group
/// means) and the moving variance toward 0 (the average of the group variances). Refused
/// where single values are refused.
#[test]
fn ghost_groups_of_one_value_follow_the_policy() {
    let n = 4;
    let mut rng = Rng(7);
    let x = rng.vec(n * C, 1.0, 2.0);
    let dy = rng.vec(n * C, 0.0, 1.0);
    for grouping in [GhostGrouping::Strided, GhostGrouping::Contiguous] {
        for update in [GhostUpdate::Averaged, GhostUpdate::PerGroup] {
            let ghost = Ghost {
                virtual_batch_size: 1,
                grouping,
                remainder: GhostRemainder::Error,
                update,
            };
            let cfg = Config::keras(C)
                .momentum(bnorm::Momentum::Decay(0.9))
                .variant(Variant::Ghost(ghost));
            let mut bn = layer(cfg.clone());
            let before = bn.running_state().cloned();
            let (y, report) = bn.forward(&x, &[n, C], Layout::NC, Mode::Train).unwrap();
            assert!(report.single_value);
            for i in 0..n * C {
                assert_eq!(y[i], beta(&bn, i % C));
            }
            let r = reference::forward(
                &cfg,
                Layout::NC,
                &[n, C],
                &x,
                bn.params(),
                before.as_ref(),
                Mode::Train,
            )
            .unwrap();
            assert_eq!(y, r.y);
            let s = bn.running_state().unwrap();
            let rs = r.state.as_ref().unwrap();
            for k in 0..C {
                assert!((s.mean[k] - rs.mean[k]).abs() < 1e-12);
                assert!((s.var[k] - rs.var[k]).abs() < 1e-12);
                if update == GhostUpdate::Averaged {
                    let bm = (0..n).map(|i| x[i * C + k]).sum::<f64>() / n as f64;
                    assert!((s.mean[k] - (0.9 * 0.5 + 0.1 * bm)).abs() < 1e-12);
                    assert!((s.var[k] - 0.9 * 2.0).abs() < 1e-12);
                }
            }
            let b = bn.backward(&x, &dy, &[n, C], Layout::NC).unwrap();
            assert!(b.dx.iter().all(|&v| v == 0.0), "{:?}", b.dx);
            let rb =
                reference::backward(&cfg, Layout::NC, &[n, C], &x, &dy, bn.params(), &r).unwrap();
            assert_eq!(b.dx, rb.dx);
            let refusing = layer(cfg.clone().single_value(SingleValuePolicy::Refuse));
            let mut refusing = refusing;
            assert_eq!(
                refusing
                    .forward(&x, &[n, C], Layout::NC, Mode::Train)
                    .unwrap_err(),
                Error::BatchTooSmall { channel_values: 1 }
            );
            let r = reference::forward(
                &cfg.clone().single_value(SingleValuePolicy::Refuse),
                Layout::NC,
                &[n, C],
                &x,
                bn.params(),
                before.as_ref(),
                Mode::Train,
            );
            assert!(matches!(r, Err(Error::BatchTooSmall { channel_values: 1 })));
        }
    }
    // tf_keras refuses a batch the virtual batch size does not divide (an
    // InvalidArgumentError from a reshape); bnorm's counterpart is typed
    let mut bn = layer(Config::keras(C).variant(Variant::Ghost(Ghost::strided(3))));
    assert_eq!(
        bn.forward(&x, &[n, C], Layout::NC, Mode::Train)
            .unwrap_err(),
        Error::GhostBatchIndivisible {
            batch: 4,
            virtual_batch_size: 3
        }
    );
}

/// Renorm with one value: y = γ·d + β (x̂ = 0), as the reference computes it.
#[test]
fn renorm_with_one_value_matches_the_reference() {
    let cfg = Config::keras(C).variant(Variant::Renorm(Renorm::default()));
    let x = [1.5f64, -2.0, 0.3];
    let mut bn = layer(cfg.clone());
    let before = bn.running_state().cloned();
    let (y, report) = bn.forward(&x, &[1, C], Layout::NC, Mode::Train).unwrap();
    assert!(report.single_value);
    let r = reference::forward(
        &cfg,
        Layout::NC,
        &[1, C],
        &x,
        bn.params(),
        before.as_ref(),
        Mode::Train,
    )
    .unwrap();
    for k in 0..C {
        assert!((y[k] - r.y[k]).abs() < 1e-12, "{} vs {}", y[k], r.y[k]);
        let want = bn.params().gamma(k) * r.d[k] + bn.params().beta(k);
        assert!((y[k] - want).abs() < 1e-12);
    }
    let s = bn.running_state().unwrap();
    let rs = r.state.unwrap();
    for k in 0..C {
        assert!((s.var[k] - rs.var[k]).abs() < 1e-12);
        assert!((s.mean[k] - rs.mean[k]).abs() < 1e-12);
    }
}

/// Synchronized: one value on the only rank is a global batch of one, accepted under
/// Keras's preset and reported, refused under PyTorch's.
#[test]
fn a_synchronized_global_batch_of_one_follows_the_policy() {
    for (cfg, accept) in [(Config::keras(C), true), (Config::torch(C), false)] {
        let comms = ThreadComm::group(1);
        let g = Layout::NC.geometry(&[1, C]).unwrap();
        let mut st = RunningState::init(&cfg);
        let (mut saved, mut ws) = (Saved::default(), Workspace::default());
        let p = Params::init(&cfg);
        let mut y = [9.0f32; C];
        let r = forward_into(
            &cfg,
            g,
            &[1.5f32, -2.0, 0.3],
            &p,
            st.as_mut(),
            Mode::Train,
            &mut y,
            &mut saved,
            &mut ws,
            Options::from(Parallelism::Sequential).synchronized(&comms[0]),
        );
        if accept {
            assert!(r.unwrap().single_value);
            assert_eq!(y, [0.0; C]);
        } else {
            assert_eq!(r.unwrap_err(), Error::BatchTooSmall { channel_values: 1 });
        }
    }
}

/// A deferred update of one value per channel commits under a biased running variance and
/// is refused (changing nothing) under an unbiased one, where it would be 0/0.
#[test]
fn a_pending_single_value_update_never_folds_an_unbiased_variance() {
    let mut keras = layer(Config::keras(C));
    let (_, _, pending) = keras
        .forward_pending(&[1.5f64, -2.0, 0.3], &[1, C], Layout::NC)
        .unwrap();
    let pending = pending.unwrap();
    assert_eq!(pending.count(), &[1.0; C]);
    let mut direct = layer(Config::keras(C));
    direct
        .forward(&[1.5f64, -2.0, 0.3], &[1, C], Layout::NC, Mode::Train)
        .unwrap();
    keras.commit(&pending).unwrap();
    assert_eq!(keras.running_state(), direct.running_state());
    let torch_cfg = Config::torch(C).single_value(SingleValuePolicy::Accept);
    let mut s = RunningState::init(&torch_cfg).unwrap();
    let before = s.clone();
    assert_eq!(
        pending.commit(&torch_cfg, &mut s),
        Err(Error::BatchTooSmall { channel_values: 1 })
    );
    assert_eq!(s, before);
}
