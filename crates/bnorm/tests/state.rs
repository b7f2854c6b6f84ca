//! State survives reload, resume and failure, for every way state enters or leaves a
//! layer (the layer, the expert tier, deferred updates, recalibration, synchronized steps,
//! checkpoints):
//! * what is loaded is what is used;
//! * resuming from saved statistics equals never stopping, bit for bit;
//! * a failed call changes nothing — not the running statistics, not the statistics saved
//!   for backward, not the output buffer.

mod common;

use bnorm::config::{ColdPolicy, Ghost, NonFinitePolicy, Variant};
use bnorm::element::DType;
use bnorm::expert::{backward_into, forward_into, Grads, Parallelism, Saved, Workspace};
use bnorm::sync::ThreadComm;
use bnorm::{
    BatchNorm, Config, Error, Layout, Mode, Momentum, Params, Recalibration, RunningState,
};
use bnorm_interop::{Checkpoint, Layer};
use common::{assert_close, conventions, Rng};

const SHAPE: [usize; 4] = [6, 3, 2, 2];
const SEQ: Parallelism = Parallelism::Sequential;

/// A batch of `SHAPE` whose statistics differ from step to step.
fn batch(step: u64) -> Vec<f64> {
    let mut rng = Rng(1000 + step);
    let n: usize = SHAPE.iter().product();
    let (shift, scale) = (step as f64 * 0.7 - 2.0, 1.0 + 0.3 * step as f64);
    (0..n).map(|_| shift + scale * rng.normal()).collect()
}

fn trained_params(cfg: &Config) -> Params {
    let mut rng = Rng(5);
    let c = cfg.get_channels();
    Params {
        weight: cfg.get_scale().then(|| rng.vec(c, 1.0, 0.3)),
        bias: cfg.get_center().then(|| rng.vec(c, 0.0, 0.3)),
    }
}

fn layer(cfg: &Config) -> BatchNorm {
    let mut bn = cfg.clone().build().unwrap();
    bn.set_params(trained_params(cfg)).unwrap();
    bn.set_parallelism(SEQ);
    bn
}

/// `steps` training steps (and their backward) from `first`; the outputs, in bits.
fn train(bn: &mut BatchNorm, first: u64, steps: u64) -> Vec<Vec<u64>> {
    let mut out = Vec::new();
    for s in first..first + steps {
        let x = batch(s);
        let (y, _) = bn.forward(&x, &SHAPE, Layout::NCHW, Mode::Train).unwrap();
        let b = bn.backward(&x, &y, &SHAPE, Layout::NCHW).unwrap();
        out.push(y.iter().chain(&b.dx).map(|v| v.to_bits()).collect());
    }
    out
}

#[test]
fn resuming_from_published_statistics_equals_never_stopping() {
    for (name, cfg) in conventions(3) {
        if !cfg.get_track_running_stats() || cfg.get_variant().renorm().is_some() {
            continue; // renormalization keeps more state: the next test
        }
        for t in [1u64, 7] {
            let mut a = layer(&cfg);
            train(&mut a, 0, t);
            // b starts where a stopped, from a's published mean, variance and step count
            let s = a.running_state().unwrap();
            let restored =
                RunningState::from_values(&cfg, s.mean.clone(), s.var.clone(), s.updates).unwrap();
            assert_eq!(
                &restored, s,
                "{name}: the published values are the whole state"
            );
            let mut b = layer(&cfg);
            b.set_running_state(restored).unwrap();
            assert_eq!(
                train(&mut a, t, 5),
                train(&mut b, t, 5),
                "{name}, t = {t}: outputs"
            );
            assert_eq!(
                a.running_state(),
                b.running_state(),
                "{name}, t = {t}: running statistics"
            );
        }
    }
}

#[test]
fn renormalization_resumes_exactly_from_its_whole_state_and_closely_from_published_values() {
    for (name, cfg) in conventions(3) {
        if cfg.get_variant().renorm().is_none() {
            continue;
        }
        let mut a = layer(&cfg);
        train(&mut a, 0, 6);
        let whole = a.running_state().unwrap().clone();
        let published =
            RunningState::from_values(&cfg, whole.mean.clone(), whole.var.clone(), whole.updates)
                .unwrap();
        let (mut b, mut c) = (layer(&cfg), layer(&cfg));
        b.set_running_state(whole).unwrap();
        c.set_running_state(published).unwrap();
        let ya = train(&mut a, 6, 3);
        assert_eq!(ya, train(&mut b, 6, 3), "{name}: whole state");
        train(&mut c, 6, 3);
        let (sa, sc) = (a.running_state().unwrap(), c.running_state().unwrap());
        assert_close(&format!("{name} mean"), &sc.mean, &sa.mean, 1e-12, 1e-9);
        // the moving standard deviation is recovered from the published variance
        assert_close(&format!("{name} var"), &sc.var, &sa.var, 1e-12, 1e-9);
    }
}

/// TensorFlow's zero-debiased moving average, as TensorFlow computes it: a hidden biased
/// average starting at 0, published divided by `1 − dᵗ`.
#[test]
fn zero_debiasing_is_tensorflows_hidden_average_and_survives_a_restore() {
    let d = 0.9;
    let cfg = Config::tensorflow(3).momentum(Momentum::DebiasedDecay(d));
    let mut bn = layer(&cfg);
    let (mut hidden_mean, mut hidden_var) = (vec![0.0; 3], vec![0.0; 3]);
    for t in 1..=60 {
        let x = batch(t);
        bn.forward(&x, &SHAPE, Layout::NCHW, Mode::Train).unwrap();
        let saved = bn.saved();
        for ch in 0..3 {
            hidden_mean[ch] = d * hidden_mean[ch] + (1.0 - d) * saved.mean()[ch];
            hidden_var[ch] = d * hidden_var[ch] + (1.0 - d) * saved.variance()[ch];
        }
        let denom = 1.0 - d.powi(t as i32);
        let want_mean: Vec<f64> = hidden_mean.iter().map(|b| b / denom).collect();
        let want_var: Vec<f64> = hidden_var.iter().map(|b| b / denom).collect();
        let s = bn.running_state().unwrap();
        assert_close(&format!("step {t} mean"), &s.mean, &want_mean, 1e-13, 1e-12);
        assert_close(&format!("step {t} var"), &s.var, &want_var, 1e-13, 1e-12);
    }

    // A layer restored with mean 5, variance 2 after 1000 updates, trained on a batch of
    // that mean and variance, keeps them (it collapsed to mean 0.0079 when the hidden
    // averages restarted at 0).
    let cfg = Config::tensorflow(1);
    let mut bn = cfg.clone().build().unwrap();
    bn.set_running_state(RunningState::from_values(&cfg, vec![5.0], vec![2.0], 1000).unwrap())
        .unwrap();
    let x = [5.0 - 2f64.sqrt(), 5.0 + 2f64.sqrt()];
    bn.forward(&x, &[2, 1], Layout::NC, Mode::Train).unwrap();
    let s = bn.running_state().unwrap();
    assert!((s.mean[0] - 5.0).abs() < 1e-12, "mean {}", s.mean[0]);
    assert!((s.var[0] - 2.0).abs() < 1e-12, "var {}", s.var[0]);
}

/// A call that fails, given a layer that just ran a good training step on `SHAPE`.
struct FailCall {
    name: &'static str,
    cfg: Config,
    shape: Vec<usize>,
    layout: Layout,
    mode: Mode,
    fill: f64,
}

fn failing_calls() -> Vec<FailCall> {
    let call = |name, cfg, shape: &[usize], layout, mode, fill| FailCall {
        name,
        cfg,
        shape: shape.to_vec(),
        layout,
        mode,
        fill,
    };
    let nchw = Layout::NCHW;
    vec![
        call(
            "batch of one",
            Config::torch(3),
            &[1, 3],
            Layout::NC,
            Mode::Train,
            0.5,
        ),
        call(
            "non-finite statistics refused",
            Config::torch(3).non_finite(NonFinitePolicy::Error),
            &SHAPE,
            nchw,
            Mode::Train,
            f64::NAN,
        ),
        call(
            "ghost batch does not divide",
            Config::keras(3).variant(Variant::Ghost(Ghost::strided(2))),
            &[5, 3, 2, 2],
            nchw,
            Mode::Train,
            0.5,
        ),
        call(
            "channel axis",
            Config::torch(3),
            &[6, 4, 2, 2],
            nchw,
            Mode::Train,
            0.5,
        ),
        call(
            "frozen without running statistics",
            Config::torch(3).track_running_stats(false),
            &SHAPE,
            nchw,
            Mode::Frozen,
            0.5,
        ),
    ]
}

#[test]
fn a_failed_forward_leaves_the_layer_as_it_was() {
    for bad in failing_calls() {
        let (name, cfg) = (bad.name, &bad.cfg);
        let x = batch(3);
        // forward, backward
        let mut a = layer(cfg);
        a.forward(&x, &SHAPE, Layout::NCHW, Mode::Train).unwrap();
        let want = a.backward(&x, &x, &SHAPE, Layout::NCHW).unwrap();
        // forward, failed forward, backward
        let mut b = layer(cfg);
        b.forward(&x, &SHAPE, Layout::NCHW, Mode::Train).unwrap();
        let state = b.running_state().cloned();
        let n: usize = bad.shape.iter().product();
        let xb = vec![bad.fill; n];
        let mut y = vec![-7.0; n];
        b.forward_into(&xb, &bad.shape, bad.layout, bad.mode, &mut y)
            .expect_err(name);
        assert!(y.iter().all(|&v| v == -7.0), "{name}: output written");
        assert_eq!(
            b.running_state().cloned(),
            state,
            "{name}: running statistics"
        );
        let got = b.backward(&x, &x, &SHAPE, Layout::NCHW).unwrap();
        assert_eq!(got.dx, want.dx, "{name}: dx");
        assert_eq!(got.dweight, want.dweight, "{name}: dgamma");
        assert_eq!(got.dbias, want.dbias, "{name}: dbeta");
    }
}

#[test]
fn a_failed_forward_of_the_expert_tier_leaves_saved_statistics_alone() {
    // Cold statistics refused, then the backward of the step before: unchanged. Also
    // through the deferred-update entry point.
    let cfg = Config::torch(3).cold_statistics(ColdPolicy::Error);
    let g = Layout::NCHW.geometry(&SHAPE).unwrap();
    let p = trained_params(&cfg);
    let cold = RunningState::init(&cfg).unwrap();
    let x = batch(1);
    let run = |fail: bool| {
        let (mut saved, mut ws) = (Saved::default(), Workspace::default());
        let mut y = vec![0.0; x.len()];
        let mut warm = cold.clone();
        forward_into(
            &cfg,
            g,
            &x,
            &p,
            Some(&mut warm),
            Mode::Train,
            &mut y,
            &mut saved,
            &mut ws,
            SEQ,
        )
        .unwrap();
        if fail {
            let mut c = cold.clone();
            let mut y2 = vec![-7.0; x.len()];
            let e = forward_into(
                &cfg,
                g,
                &x,
                &p,
                Some(&mut c),
                Mode::Inference,
                &mut y2,
                &mut saved,
                &mut ws,
                SEQ,
            )
            .unwrap_err();
            assert_eq!(e, Error::ColdStatistics);
            assert_eq!(c, cold);
            assert!(y2.iter().all(|&v| v == -7.0));
            let short = &x[..x.len() - 1];
            let mut w = warm.clone();
            let defer = bnorm::expert::Options::from(SEQ).defer();
            forward_into(
                &cfg,
                g,
                short,
                &p,
                Some(&mut w),
                Mode::Train,
                &mut y2,
                &mut saved,
                &mut ws,
                defer,
            )
            .unwrap_err();
        }
        let (mut dx, mut grads) = (vec![0.0; x.len()], Grads::default());
        backward_into(
            &cfg, g, &x, &x, &p, &saved, &mut dx, &mut grads, &mut ws, SEQ,
        )
        .unwrap();
        (dx, grads.dweight, grads.dbias)
    };
    assert_eq!(run(true), run(false));
}

#[test]
fn deferred_updates_and_recalibration_change_nothing_when_refused() {
    let cfg = Config::torch(3);
    let mut bn = layer(&cfg);
    train(&mut bn, 0, 2);
    let before = bn.running_state().unwrap().clone();
    // a pending update of another channel count
    let other = Config::torch(2);
    let mut small = layer(&other);
    let (_, _, pending) = small
        .forward_pending(&batch(0)[..48], &[6, 2, 2, 2], Layout::NCHW)
        .unwrap();
    assert!(bn.commit(&pending.unwrap()).is_err());
    assert_eq!(bn.running_state().unwrap(), &before);
    // a recalibration that saw one value per channel
    let mut recal = Recalibration::new(3);
    bn.set_parallelism(SEQ);
    let g = Layout::NC.geometry(&[1, 3]).unwrap();
    recal.add(g, &[1.0f64, 2.0, 3.0]).unwrap();
    assert!(matches!(
        bn.recalibrate(&recal),
        Err(Error::BatchTooSmall { .. })
    ));
    assert_eq!(bn.running_state().unwrap(), &before);
    // a pending update committed later equals the training step it held back
    let mut direct = bn.clone();
    let (_, _, pending) = bn.forward_pending(&batch(9), &SHAPE, Layout::NCHW).unwrap();
    bn.commit(&pending.unwrap()).unwrap();
    direct
        .forward(&batch(9), &SHAPE, Layout::NCHW, Mode::Train)
        .unwrap();
    assert_eq!(bn.running_state(), direct.running_state());
}

#[test]
fn a_checkpoint_loads_what_was_saved_and_training_resumes_exactly() {
    for (name, cfg) in conventions(3) {
        if !cfg.get_track_running_stats() || !matches!(cfg.get_variant(), Variant::BatchNorm) {
            continue;
        }
        let mut a = layer(&cfg);
        train(&mut a, 0, 4);
        let mut l = Layer::from_batchnorm("bn", bnorm_interop::Format::Torch, &a);
        l.dtype = DType::F64; // exact values in the file
        let mut ck = Checkpoint::default();
        ck.insert_layer(&l, DType::F64).unwrap();
        let back = Checkpoint::from_bytes(&ck.to_bytes().unwrap()).unwrap();
        let loaded = back.layers().unwrap().remove(0);
        let mut b = loaded.to_batchnorm().unwrap();
        b.set_parallelism(SEQ);
        assert_eq!(
            b.running_state(),
            a.running_state(),
            "{name}: loaded statistics"
        );
        assert_eq!(b.params(), a.params(), "{name}: loaded parameters");
        let x = batch(11);
        let (ya, _) = a
            .forward(&x, &SHAPE, Layout::NCHW, Mode::Inference)
            .unwrap();
        let (yb, _) = b
            .forward(&x, &SHAPE, Layout::NCHW, Mode::Inference)
            .unwrap();
        assert_eq!(ya, yb, "{name}: inference with the loaded statistics");
        assert_eq!(
            train(&mut a, 4, 3),
            train(&mut b, 4, 3),
            "{name}: resumed training"
        );
        assert_eq!(a.running_state(), b.running_state(), "{name}");
    }
}

/// Two ranks, each with its own state: a good step, then a step that fails on every rank
/// (a global batch of one value per channel, refused by the policy), then the backward of
/// the good step.
#[test]
fn a_failed_synchronized_step_changes_nothing_on_any_rank() {
    let cfg = Config::tensorflow(3).single_value(bnorm::config::SingleValuePolicy::Refuse);
    let p = trained_params(&cfg);
    let run = |fail: bool| -> Vec<(Option<RunningState>, Vec<u64>)> {
        std::thread::scope(|s| {
            let hs: Vec<_> = ThreadComm::group(2)
                .into_iter()
                .map(|comm| {
                    let (cfg, p) = (cfg.clone(), p.clone());
                    s.spawn(move || {
                        let g = Layout::NCHW.geometry(&[3, 3, 2, 2]).unwrap();
                        let x: Vec<f64> = batch(5)[..g.len()].to_vec();
                        let mut state = RunningState::init(&cfg);
                        let (mut saved, mut ws) = (Saved::default(), Workspace::default());
                        let mut y = vec![0.0; g.len()];
                        let st = state.as_mut();
                        bnorm::expert::forward_into(
                            &cfg,
                            g,
                            &x,
                            &p,
                            st,
                            Mode::Train,
                            &mut y,
                            &mut saved,
                            &mut ws,
                            bnorm::expert::Options::from(SEQ).synchronized(&comm),
                        )
                        .unwrap();
                        if fail {
                            let one = Layout::NC.geometry(&[1, 3]).unwrap();
                            let (xs, mut ys) = (vec![1.0; 3], vec![-7.0; 3]);
                            let (x1, y1) = if comm_rank(&comm) == 0 {
                                (&xs[..], &mut ys[..])
                            } else {
                                (&xs[..0], &mut ys[..0])
                            };
                            let g1 = if comm_rank(&comm) == 0 {
                                one
                            } else {
                                Layout::NC.geometry(&[0, 3]).unwrap()
                            };
                            let before = state.clone();
                            let e = bnorm::expert::forward_into(
                                &cfg,
                                g1,
                                x1,
                                &p,
                                state.as_mut(),
                                Mode::Train,
                                y1,
                                &mut saved,
                                &mut ws,
                                bnorm::expert::Options::from(SEQ).synchronized(&comm),
                            );
                            assert!(e.is_err());
                            assert_eq!(state, before);
                            assert!(ys.iter().all(|&v| v == -7.0 || comm_rank(&comm) == 1));
                        }
                        let (mut dx, mut grads) = (vec![0.0; g.len()], Grads::default());
                        bnorm::expert::backward_into(
                            &cfg,
                            g,
                            &x,
                            &x,
                            &p,
                            &saved,
                            &mut dx,
                            &mut grads,
                            &mut ws,
                            bnorm::expert::BackwardOptions::from(SEQ).synchronized(&comm),
                        )
                        .unwrap();
                        let mut bits: Vec<u64> = dx.iter().map(|v| v.to_bits()).collect();
                        bits.extend(
                            grads
                                .dweight
                                .iter()
                                .chain(&grads.dbias)
                                .map(|v| v.to_bits()),
                        );
                        (state, bits)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    assert_eq!(run(true), run(false));
}

fn comm_rank(c: &ThreadComm) -> usize {
    use bnorm::sync::Communicator;
    c.rank()
}
