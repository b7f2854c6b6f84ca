//! Masked batch normalization (Keras 3's `mask`): the layer and the functional API against
//! the float64 reference (written as an element-by-element chain rule), finite
//! differences, invariants and refusals. Keras's own outputs are replayed by the
//! conformance cases keras_masked_nlc and keras_masked_ncl.
#![allow(clippy::needless_range_loop)]

mod common;

use bnorm::config::{Ghost, Renorm, SingleValuePolicy, Variant};
use bnorm::expert::{
    backward_into, forward_into, Epilogue, Grads, Options, Parallelism, Saved, Workspace,
};
use bnorm::sync::ThreadComm;
use bnorm::{reference, Config, Error, Layout, Mode, Params, RunningState};
use common::{assert_close, Rng};

fn params(c: usize, rng: &mut Rng) -> Params {
    Params {
        weight: Some(rng.vec(c, 1.0, 0.4)),
        bias: Some(rng.vec(c, 0.0, 0.5)),
    }
}

fn state(c: usize, rng: &mut Rng, cfg: &Config) -> RunningState {
    let mut s = RunningState::init(cfg).unwrap();
    s.mean = rng.vec(c, 0.0, 1.0);
    s.var = (0..c).map(|_| 0.5 + rng.uniform()).collect();
    s.updates = 3;
    s
}

/// Layouts, shapes and the length of the mask (x's shape without its last axis).
fn cases() -> Vec<(Layout, Vec<usize>)> {
    vec![
        (Layout::NLC, vec![3, 5, 2]),
        (Layout::NCL, vec![4, 3, 5]),
        (Layout::NHWC, vec![2, 3, 2, 3]),
        (Layout::NC, vec![7, 3]),
        (Layout::NCHW, vec![2, 2, 3, 2]),
    ]
}

fn random_mask(n: usize, rng: &mut Rng) -> Vec<bool> {
    loop {
        let m: Vec<bool> = (0..n).map(|_| rng.uniform() < 0.6).collect();
        if m.iter().filter(|&&b| b).count() >= 2 {
            return m;
        }
    }
}

#[test]
fn the_layer_matches_the_reference_in_every_layout() {
    let mut rng = Rng(11);
    for cfg in [Config::keras(1), Config::torch(1)] {
        for (layout, shape) in cases() {
            let c = shape[layout.channel_axis()];
            let cfg = cfg.clone().channels(c);
            let len: usize = shape.iter().product();
            let rows = len / shape[shape.len() - 1];
            let p = params(c, &mut rng);
            let s0 = state(c, &mut rng, &cfg);
            for _ in 0..4 {
                let mask = random_mask(rows, &mut rng);
                let x = rng.vec(len, 0.5, 2.0);
                let dy = rng.vec(len, 0.0, 1.0);
                let r = reference::forward_masked(
                    &cfg,
                    layout,
                    &shape,
                    &x,
                    &mask,
                    &p,
                    Some(&s0),
                    Mode::Train,
                );
                let mut bn = cfg.clone().build().unwrap();
                bn.set_params(p.clone()).unwrap();
                bn.set_running_state(s0.clone()).unwrap();
                let got = bn.forward_masked(&x, &mask, &shape, layout, Mode::Train);
                let r = match (r, got) {
                    (Err(a), Err(b)) => {
                        // a channel with fewer selected values than the policy allows
                        assert_eq!(a, b);
                        assert_eq!(bn.running_state(), Some(&s0), "refused: unchanged");
                        continue;
                    }
                    (Ok(r), Ok((y, _))) => {
                        assert_close("y", &y, &r.y, 1e-12, 1e-10);
                        r
                    }
                    (r, got) => panic!("{layout:?}: reference {r:?}, layer {got:?}"),
                };
                let (s, rs) = (bn.running_state().unwrap(), r.state.as_ref().unwrap());
                assert_close("running mean", &s.mean, &rs.mean, 1e-14, 1e-12);
                assert_close("running var", &s.var, &rs.var, 1e-14, 1e-12);
                let b = bn.backward(&x, &dy, &shape, layout).unwrap();
                let rb = reference::backward_masked(&cfg, layout, &shape, &x, &dy, &mask, &p, &r)
                    .unwrap();
                assert_close("dx", &b.dx, &rb.dx, 1e-12, 1e-9);
                assert_close("dgamma", &b.dweight.unwrap(), &rb.dweight, 1e-12, 1e-10);
                assert_close("dbeta", &b.dbias.unwrap(), &rb.dbias, 1e-12, 1e-10);
                // f32 storage agrees to f32 accuracy
                let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
                let mut bn32 = cfg.clone().build().unwrap();
                bn32.set_params(p.clone()).unwrap();
                bn32.set_running_state(s0.clone()).unwrap();
                let (y32, _) = bn32
                    .forward_masked(&xf, &mask, &shape, layout, Mode::Train)
                    .unwrap();
                let y32: Vec<f64> = y32.iter().map(|&v| v as f64).collect();
                assert_close("y f32", &y32, &r.y, 1e-5, 1e-5);
            }
        }
    }
}

/// Central differences of `L = Σ dy·y` through the masked statistics.
#[test]
fn the_gradient_is_the_derivative_of_the_masked_map() {
    let mut rng = Rng(12);
    let cfg = Config::keras(2).track_running_stats(false);
    let (layout, shape) = (Layout::NLC, [3usize, 4, 2]);
    let mask = [
        true, true, false, true, false, false, true, true, true, true, false, true,
    ];
    let p = params(2, &mut rng);
    let x = rng.vec(24, 0.0, 1.5);
    let dy = rng.vec(24, 0.0, 1.0);
    let loss = |x: &[f64]| -> f64 {
        let mut bn = cfg.clone().build().unwrap();
        bn.set_params(p.clone()).unwrap();
        let (y, _) = bn
            .forward_masked(x, &mask, &shape, layout, Mode::Train)
            .unwrap();
        y.iter().zip(&dy).map(|(a, b)| a * b).sum()
    };
    let mut bn = cfg.clone().build().unwrap();
    bn.set_params(p.clone()).unwrap();
    bn.forward_masked(&x, &mask, &shape, layout, Mode::Train)
        .unwrap();
    let b = bn.backward(&x, &dy, &shape, layout).unwrap();
    for i in 0..x.len() {
        let h = 1e-6;
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += h;
        xm[i] -= h;
        let fd = (loss(&xp) - loss(&xm)) / (2.0 * h);
        assert!(
            (fd - b.dx[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
            "dx[{i}]: {} vs finite difference {fd}",
            b.dx[i]
        );
    }
    // unselected positions still get the direct term γ·invstd·dy, selected ones more
    assert!(b.dx[4] != 0.0);
}

#[test]
fn an_all_true_mask_is_batch_norm_up_to_keras_epsilon_and_inference_ignores_it() {
    let mut rng = Rng(13);
    let cfg = Config::keras(3);
    let shape = [4usize, 5, 3];
    let x = rng.vec(60, 1.0, 2.0);
    let mut a = cfg.clone().build().unwrap();
    let mut b = cfg.clone().build().unwrap();
    let (ya, _) = a
        .forward_masked(&x, &[true; 20], &shape, Layout::NLC, Mode::Train)
        .unwrap();
    let (yb, _) = b.forward(&x, &shape, Layout::NLC, Mode::Train).unwrap();
    // the statistics divide by n + 1e-7 instead of n: a relative 1e-7 / 20
    assert_close("y", &ya, &yb, 1e-7, 1e-7);
    assert!(ya != yb, "Keras's epsilon is applied");
    let mask = random_mask(20, &mut rng);
    let (yi, _) = a
        .forward_masked(&x, &mask, &shape, Layout::NLC, Mode::Inference)
        .unwrap();
    let (yj, _) = a.forward(&x, &shape, Layout::NLC, Mode::Inference).unwrap();
    assert_eq!(yi, yj, "inference with running statistics ignores the mask");
}

#[test]
fn bad_masks_are_refused_and_change_nothing() {
    let mut rng = Rng(14);
    let x = rng.vec(12, 0.0, 1.0);
    let shape = [2usize, 3, 2];
    let mut bn = Config::keras(2).build().unwrap();
    let before = bn.running_state().cloned();
    // the wrong length
    let e = bn
        .forward_masked(&x, &[true; 5], &shape, Layout::NLC, Mode::Train)
        .unwrap_err();
    assert!(
        matches!(e, Error::LengthMismatch { what: "mask", .. }),
        "{e}"
    );
    // a channel with nothing selected (Keras would normalize it with mean 0, variance 0)
    let e = bn
        .forward_masked(&x, &[false; 6], &shape, Layout::NLC, Mode::Train)
        .unwrap_err();
    assert_eq!(e, Error::BatchTooSmall { channel_values: 0 });
    assert_eq!(bn.running_state().cloned(), before);
    // one selected value: the single-value policy decides
    let one = [true, false, false, false, false, false];
    let (y, report) = bn
        .forward_masked(&x, &one, &shape, Layout::NLC, Mode::Train)
        .unwrap();
    assert!(report.single_value);
    // β up to Keras's epsilon: the mean is x/(1 + 1e-7), so y = γ·x·1e-7/sqrt(eps) + β
    assert!(
        y[0].abs() < 1e-5 * (1.0 + x[0].abs()),
        "maps to β: {}",
        y[0]
    );
    let mut refusing = Config::keras(2)
        .single_value(SingleValuePolicy::Refuse)
        .build()
        .unwrap();
    assert_eq!(
        refusing
            .forward_masked(&x, &one, &shape, Layout::NLC, Mode::Train)
            .unwrap_err(),
        Error::BatchTooSmall { channel_values: 1 }
    );
    // what masked batch norm is not defined with
    for cfg in [
        Config::keras(2).variant(Variant::Renorm(Renorm::default())),
        Config::keras(2).variant(Variant::Ghost(Ghost::strided(1))),
    ] {
        let mut bn = cfg.build().unwrap();
        let e = bn
            .forward_masked(&x, &[true; 6], &shape, Layout::NLC, Mode::Train)
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidConfig {
                    setting: "mask",
                    ..
                }
            ),
            "{e}"
        );
    }
    let cfg = Config::keras(2);
    let g = Layout::NLC.geometry(&shape).unwrap();
    let p = Params::init(&cfg);
    let mask = [true; 6];
    let mut y = vec![0.0; 12];
    let run = |opts: Options<'_, f64>, y: &mut [f64]| {
        let mut s = RunningState::init(&cfg);
        let (mut saved, mut ws) = (Saved::default(), Workspace::default());
        forward_into(
            &cfg,
            g,
            &x,
            &p,
            s.as_mut(),
            Mode::Train,
            y,
            &mut saved,
            &mut ws,
            opts,
        )
    };
    let relu = Options::default().masked(&mask).epilogue(Epilogue::Relu);
    assert!(matches!(
        run(relu, &mut y),
        Err(Error::InvalidConfig {
            setting: "mask",
            ..
        })
    ));
    let comms = ThreadComm::group(1);
    let synced = Options::default().masked(&mask).synchronized(&comms[0]);
    assert!(run(synced, &mut y).is_err());
    // channels-first: the mask is per (sample, channel) row, or per shorter row of the
    // last axis; anything else is refused
    let g = Layout::NCL.geometry(&[2, 2, 3]).unwrap();
    let mut s = RunningState::init(&cfg);
    let (mut saved, mut ws) = (Saved::default(), Workspace::default());
    for (len, ok) in [(4, true), (12, true), (3, false), (2, false)] {
        let mask = vec![true; len];
        let r = forward_into(
            &cfg,
            g,
            &x,
            &p,
            s.as_mut(),
            Mode::Train,
            &mut y,
            &mut saved,
            &mut ws,
            Options::from(Parallelism::Sequential).masked(&mask),
        );
        assert_eq!(r.is_ok(), ok, "mask of {len}: {r:?}");
    }
}

/// The functional tier: forward_into with a mask, backward_into from what it saved, equal
/// to the layer's.
#[test]
fn the_functional_api_is_the_layer() {
    let mut rng = Rng(15);
    let cfg = Config::torch(3);
    let shape = [4usize, 3, 5];
    let g = Layout::NCL.geometry(&shape).unwrap();
    let x = rng.vec(60, 0.0, 1.0);
    let dy = rng.vec(60, 0.0, 1.0);
    let mask = random_mask(12, &mut rng);
    let p = params(3, &mut rng);
    let mut s = RunningState::init(&cfg);
    let (mut saved, mut ws) = (Saved::default(), Workspace::default());
    let mut y = vec![0.0; 60];
    forward_into(
        &cfg,
        g,
        &x,
        &p,
        s.as_mut(),
        Mode::Train,
        &mut y,
        &mut saved,
        &mut ws,
        Options::from(Parallelism::Sequential).masked(&mask),
    )
    .unwrap();
    let (mut dx, mut grads) = (vec![0.0; 60], Grads::default());
    backward_into(
        &cfg,
        g,
        &x,
        &dy,
        &p,
        &saved,
        &mut dx,
        &mut grads,
        &mut ws,
        Parallelism::Sequential,
    )
    .unwrap();
    let mut bn = cfg.build().unwrap();
    bn.set_params(p).unwrap();
    let (yl, _) = bn
        .forward_masked(&x, &mask, &shape, Layout::NCL, Mode::Train)
        .unwrap();
    let b = bn.backward(&x, &dy, &shape, Layout::NCL).unwrap();
    assert_eq!(y, yl);
    assert_eq!(dx, b.dx);
    assert_eq!(Some(&s.unwrap()), bn.running_state());
    // the saved counts are the selected values per channel
    let selected: Vec<f64> = (0..3)
        .map(|c| (0..4).filter(|&n| mask[n * 3 + c]).count() as f64 * 5.0)
        .collect();
    assert_eq!(saved.count(), &selected[..]);
}

/// The Keras cases fail without their masks.
#[test]
fn the_keras_mask_cases_need_the_mask() {
    for name in ["keras_masked_nlc", "keras_masked_ncl"] {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../conformance/cases")
            .join(format!("{name}.safetensors"));
        let mut case = bnorm::conformance::Case::load(&src).unwrap();
        assert!(bnorm::conformance::replay(&case).passed);
        case.tensors.retain(|k, _| !k.ends_with(".mask"));
        assert!(!bnorm::conformance::replay(&case).passed, "{name}");
    }
}
