//! Batch renormalization of ghost batches (`Variant::GhostRenorm`, tf_keras's
//! `BatchNormalization(renorm=True, virtual_batch_size=v)`): the engine against the
//! float64 reference over several steps in every layout and in f32 and f64, the backward
//! against finite differences of the reference, and evidence that the combination is
//! neither renorm alone nor ghost batches alone.
#![allow(clippy::needless_range_loop)]

mod common;

use bnorm::config::{Ghost, GhostUpdate, Renorm, Variant};
use bnorm::element::Element;
use bnorm::expert::{backward, forward};
use bnorm::{reference, BatchNorm, Config, Error, Layout, Mode, Momentum, Params, RunningState};
use common::{assert_close, shape, Rng};

const RN: Renorm = Renorm {
    rmax: 1.25,
    rmin: 0.8,
    dmax: 0.3,
    momentum: 0.75,
    schedule: None,
};

fn ghost_renorm(c: usize) -> Config {
    Config::keras(c)
        .momentum(Momentum::Decay(0.875))
        .variant(Variant::GhostRenorm {
            ghost: Ghost::strided(2),
            renorm: RN,
        })
}

/// The running statistics a layer of `cfg` starts from: variances well below the batch's
/// (so `r` clips at `rmax` at first) and means away from the batch's (so `d` clips).
fn start_state(cfg: &Config, rng: &mut Rng) -> RunningState {
    let c = cfg.get_channels();
    let var = rng.vec(c, 0.8, 0.1).iter().map(|v| v.abs()).collect();
    RunningState::from_values(cfg, rng.vec(c, -0.5, 0.2), var, 0).unwrap()
}

fn params(c: usize, rng: &mut Rng) -> Params {
    Params {
        weight: Some(rng.vec(c, 1.0, 0.3)),
        bias: Some(rng.vec(c, 0.0, 0.5)),
    }
}

/// Whether r or d sits at one of its limits in some channel, and whether r sits strictly
/// inside its limits in some channel.
fn clipping(r: &[f64], d: &[f64]) -> (bool, bool) {
    let at =
        r.iter().any(|&v| v == RN.rmax || v == RN.rmin) || d.iter().any(|&v| v.abs() == RN.dmax);
    let inside = r.iter().any(|&v| v > RN.rmin && v < RN.rmax);
    (at, inside)
}

/// Runs `modes` on a fresh layer and on the reference, comparing every output and the
/// whole running state (renorm state included). Returns whether the clipping bound and
/// whether r moved inside the limits in some training step.
fn check<T: Element>(
    layout: Layout,
    shp: &[usize],
    modes: &[Mode],
    seed: u64,
    tol: f64,
) -> (bool, bool) {
    let mut rng = Rng(seed);
    let c = shp[layout.channel_axis()];
    let cfg = ghost_renorm(c);
    let len: usize = shp.iter().product();
    let p = params(c, &mut rng);
    let mut state = start_state(&cfg, &mut rng);
    let mut layer = BatchNorm::new(cfg.clone()).unwrap();
    layer.set_params(p.clone()).unwrap();
    layer.set_running_state(state.clone()).unwrap();
    let (mut bound, mut inside) = (false, false);
    for (k, &mode) in modes.iter().enumerate() {
        let ctx = format!("{:?} {layout} {shp:?} step {k} {mode:?}", T::DTYPE);
        let x: Vec<T> = rng.stored(len, 0.5, 2.0);
        let dy: Vec<T> = rng.stored(len, 0.0, 1.0);
        let xw: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
        let dyw: Vec<f64> = dy.iter().map(|v| v.to_f64()).collect();
        let r = reference::forward(&cfg, layout, shp, &xw, &p, Some(&state), mode).unwrap();
        let (y, _) = layer.forward(&x, shp, layout, mode).unwrap();
        let round = T::DTYPE.unit_roundoff() * 2.0;
        let yw: Vec<f64> = y.iter().map(|v| v.to_f64()).collect();
        assert_close(&format!("{ctx} y"), &yw, &r.y, tol, tol.max(round));
        if mode == Mode::Train {
            assert!(r.mean.len() > 1, "{ctx}: ghost groups");
            assert_close(
                &format!("{ctx} r"),
                layer.saved().renorm_r(),
                &r.r,
                1e-12,
                1e-12,
            );
            assert_close(
                &format!("{ctx} d"),
                layer.saved().renorm_d(),
                &r.d,
                1e-12,
                1e-12,
            );
            let (b, i) = clipping(&r.r, &r.d);
            bound |= b;
            inside |= i;
        } else {
            assert!(layer.saved().renorm_r().is_empty(), "{ctx}: no correction");
        }
        state = r.state.clone().unwrap();
        let got = layer.running_state().unwrap();
        assert_eq!(got.updates, state.updates, "{ctx}: updates");
        assert_close(
            &format!("{ctx} running_mean"),
            &got.mean,
            &state.mean,
            1e-12,
            1e-10,
        );
        assert_close(
            &format!("{ctx} running_var"),
            &got.var,
            &state.var,
            1e-12,
            1e-10,
        );
        let (gr, wr) = (got.renorm.as_ref().unwrap(), state.renorm.as_ref().unwrap());
        assert_close(
            &format!("{ctx} renorm_mean"),
            &gr.mean,
            &wr.mean,
            1e-12,
            1e-10,
        );
        assert_close(
            &format!("{ctx} renorm_stddev"),
            &gr.stddev,
            &wr.stddev,
            1e-12,
            1e-10,
        );
        let (gm, wm) = (&gr.moving_stddev, &wr.moving_stddev);
        assert_close(&format!("{ctx} moving_stddev"), gm, wm, 1e-12, 1e-10);

        let b = layer.backward(&x, &dy, shp, layout).unwrap();
        let rb = reference::backward(&cfg, layout, shp, &xw, &dyw, &p, &r).unwrap();
        let dxw: Vec<f64> = b.dx.iter().map(|v| v.to_f64()).collect();
        // dx cancels by design: its rounding scales with the terms |γ·r/σ·dy|
        let max_dy = dyw.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        let mut term = 0.0f64;
        for (gm, gv) in r.mean.iter().zip(&r.var) {
            for ch in 0..gm.len() {
                let sd = (gv[ch] + cfg.get_eps()).sqrt();
                term = term.max(p.gamma(ch).abs() * r.r[ch] / sd * max_dy);
            }
        }
        assert_close(
            &format!("{ctx} dx"),
            &dxw,
            &rb.dx,
            tol * term,
            tol.max(round),
        );
        let m = ((len / c) as f64).sqrt();
        let dw = b.dweight.as_ref().unwrap();
        assert_close(&format!("{ctx} dweight"), dw, &rb.dweight, tol * m, tol);
        let db = b.dbias.as_ref().unwrap();
        assert_close(&format!("{ctx} dbias"), db, &rb.dbias, tol * m, tol);
    }
    (bound, inside)
}

#[test]
fn engine_matches_the_reference_in_every_layout_f32_and_f64_over_several_steps() {
    use Mode::{Frozen, Inference, Train};
    let modes = [Train, Train, Train, Inference, Train, Frozen, Train];
    for (i, layout) in Layout::ALL.into_iter().enumerate() {
        for (n, spatial) in [(6, &[3, 2][..]), (8, &[1][..]), (4, &[5][..])] {
            let shp = shape(layout, n, 3, spatial);
            let seed = 40 + i as u64;
            let (bound, inside) = check::<f64>(layout, &shp, &modes, seed, 1e-10);
            assert!(
                bound && inside,
                "f64 {layout} {shp:?}: clipping bound {bound}, r inside {inside}"
            );
            let (bound, inside) = check::<f32>(layout, &shp, &modes, seed, 3e-6);
            assert!(
                bound && inside,
                "f32 {layout} {shp:?}: clipping bound {bound}, r inside {inside}"
            );
        }
    }
}

/// Σ w ⊙ y of the reference's forward step.
fn ref_loss(
    cfg: &Config,
    layout: Layout,
    shp: &[usize],
    x: &[f64],
    p: &Params,
    s: &RunningState,
    w: &[f64],
) -> f64 {
    let f = reference::forward(cfg, layout, shp, x, p, Some(s), Mode::Train).unwrap();
    f.y.iter().zip(w).map(|(a, b)| a * b).sum()
}

/// Where every r and d sit at a limit, a small change of x leaves them there: the
/// reference itself is then the function whose derivative the backward computes (r and d
/// constants, as tf_keras's stop_gradient), and its finite differences check dx, dγ, dβ.
#[test]
fn backward_matches_finite_differences_of_the_reference_where_the_limits_hold() {
    for layout in [Layout::NC, Layout::NCHW, Layout::NHWC] {
        let mut rng = Rng(7);
        let c = 2;
        let cfg = ghost_renorm(c);
        let shp = shape(layout, 6, c, &[2, 3]);
        let len: usize = shp.iter().product();
        let x = rng.vec(len, 0.5, 2.0);
        let w = rng.vec(len, 0.0, 1.0);
        let p = params(c, &mut rng);
        // renorm stddev far below the groups' (r = rmax), renorm mean far below (d = dmax)
        let s = RunningState::from_values(&cfg, vec![-3.0, -4.0], vec![0.01, 0.02], 2).unwrap();
        let g = layout.geometry(&shp).unwrap();
        let f = forward(&cfg, g, &x, &p, Some(&s), Mode::Train).unwrap();
        assert_eq!(f.saved.renorm_r(), [RN.rmax; 2], "{layout}: r at rmax");
        assert_eq!(f.saved.renorm_d(), [RN.dmax; 2], "{layout}: d at dmax");
        let b = backward(&cfg, g, &x, &w, &p, &f.saved).unwrap();
        let h = 1e-6;
        let fd = |xp: &[f64], xm: &[f64], pp: &Params, pm: &Params| {
            (ref_loss(&cfg, layout, &shp, xp, pp, &s, &w)
                - ref_loss(&cfg, layout, &shp, xm, pm, &s, &w))
                / (2.0 * h)
        };
        for i in 0..len {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let num = fd(&xp, &xm, &p, &p);
            assert!(
                (num - b.dx[i]).abs() <= 1e-6 * (1.0 + num.abs()),
                "{layout} dx[{i}]: fd {num}, analytic {}",
                b.dx[i]
            );
        }
        for ch in 0..c {
            let bump = |weight: bool, d: f64| {
                let mut q = p.clone();
                let v = if weight {
                    q.weight.as_mut()
                } else {
                    q.bias.as_mut()
                };
                v.unwrap()[ch] += d;
                q
            };
            let num = fd(&x, &x, &bump(true, h), &bump(true, -h));
            let got = b.dweight.as_ref().unwrap()[ch];
            assert!(
                (num - got).abs() <= 1e-6 * (1.0 + num.abs()),
                "{layout} dweight[{ch}]: fd {num}, analytic {got}"
            );
            let num = fd(&x, &x, &bump(false, h), &bump(false, -h));
            let got = b.dbias.as_ref().unwrap()[ch];
            assert!(
                (num - got).abs() <= 1e-6 * (1.0 + num.abs()),
                "{layout} dbias[{ch}]: fd {num}, analytic {got}"
            );
        }
    }
}

/// Inside the limits r and d move with x, but the backward treats them as constants: dx
/// is the derivative of `γ·(x̂_group·r + d) + β` with r, d frozen, i.e. of ghost batch norm
/// alone (the reference's) with scale `γ·r` and shift `β + γ·d`.
#[test]
fn backward_treats_r_and_d_as_constants_inside_the_limits() {
    for layout in [Layout::NC, Layout::NCHW, Layout::NHWC] {
        let mut rng = Rng(8);
        let c = 3;
        let cfg = ghost_renorm(c);
        let shp = shape(layout, 8, c, &[3]);
        let len: usize = shp.iter().product();
        let x = rng.vec(len, 0.5, 2.0);
        let w = rng.vec(len, 0.0, 1.0);
        let p = params(c, &mut rng);
        // renorm statistics near the groups' averages (from ghost batches alone): r ≈ 0.95,
        // d ≈ 0.1, both inside the limits
        let ghost = Config::keras(c).variant(Variant::Ghost(Ghost::strided(2)));
        let gs = RunningState::init(&ghost).unwrap();
        let alone =
            reference::forward(&ghost, layout, &shp, &x, &p, Some(&gs), Mode::Train).unwrap();
        let k = alone.mean.len() as f64;
        let avg = |v: &[Vec<f64>], ch: usize| v.iter().map(|g| g[ch]).sum::<f64>() / k;
        let rm = (0..c).map(|ch| avg(&alone.mean, ch) - 0.1 * avg(&alone.var, ch).sqrt());
        let rm = rm.collect();
        let rv = (0..c).map(|ch| 1.1 * avg(&alone.var, ch)).collect();
        let s = RunningState::from_values(&cfg, rm, rv, 2).unwrap();
        let g = layout.geometry(&shp).unwrap();
        let f = forward(&cfg, g, &x, &p, Some(&s), Mode::Train).unwrap();
        let (r, d) = (f.saved.renorm_r().to_vec(), f.saved.renorm_d().to_vec());
        assert!(
            r.iter().all(|&v| v > RN.rmin && v < RN.rmax && v != 1.0)
                && d.iter().all(|&v| v.abs() < RN.dmax && v != 0.0),
            "{layout}: the test needs corrections inside the limits: r {r:?}, d {d:?}"
        );
        let b = backward(&cfg, g, &x, &w, &p, &f.saved).unwrap();
        let frozen = Params {
            weight: Some((0..c).map(|k| p.gamma(k) * r[k]).collect()),
            bias: Some((0..c).map(|k| p.beta(k) + p.gamma(k) * d[k]).collect()),
        };
        let loss = |x: &[f64]| ref_loss(&ghost, layout, &shp, x, &frozen, &gs, &w);
        // the frozen map is the step's output
        let y0 = reference::forward(&ghost, layout, &shp, &x, &frozen, Some(&gs), Mode::Train)
            .unwrap()
            .y;
        assert_close(
            &format!("{layout} y, r and d frozen"),
            &f.y,
            &y0,
            1e-12,
            1e-12,
        );
        let h = 1e-6;
        for i in 0..len {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let num = (loss(&xp) - loss(&xm)) / (2.0 * h);
            assert!(
                (num - b.dx[i]).abs() <= 1e-6 * (1.0 + num.abs()),
                "{layout} dx[{i}]: fd {num}, analytic {}",
                b.dx[i]
            );
        }
    }
}

/// The same data and state through renorm of ghost batches, renorm alone and ghost
/// batches alone: three different outputs. Renorm alone corrects with the whole batch's
/// variance (which holds the spread between groups), the combination with the average of
/// the group variances; ghost batches alone do not correct at all.
#[test]
fn renorm_of_ghost_batches_is_neither_renorm_nor_ghost_batches_alone() {
    let layout = Layout::NHWC;
    let c = 2;
    let shp = shape(layout, 4, c, &[2]);
    let len: usize = shp.iter().product();
    let mut rng = Rng(9);
    // groups {0, 2} and {1, 3} (strided) with different means
    let mut x = rng.vec(len, 0.0, 1.0);
    let per = len / 4;
    for (i, v) in x.iter_mut().enumerate() {
        if (i / per) % 2 == 1 {
            *v += 2.0;
        }
    }
    let p = params(c, &mut rng);
    let both = ghost_renorm(c);
    let renorm = both.clone().variant(Variant::Renorm(RN));
    let ghost = both.clone().variant(Variant::Ghost(Ghost::strided(2)));
    let run = |cfg: &Config| {
        let s = RunningState::from_values(cfg, vec![0.9, 1.1], vec![1.2, 1.4], 3).unwrap();
        let mut bn = BatchNorm::new(cfg.clone()).unwrap();
        bn.set_params(p.clone()).unwrap();
        bn.set_running_state(s).unwrap();
        let (y, _) = bn.forward(&x, &shp, layout, Mode::Train).unwrap();
        (
            y,
            bn.saved().renorm_r().to_vec(),
            bn.running_state().unwrap().clone(),
        )
    };
    let (y_both, r_both, s_both) = run(&both);
    let (y_renorm, r_renorm, s_renorm) = run(&renorm);
    let (y_ghost, _, _) = run(&ghost);
    let gap = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .fold(0.0f64, |m, (u, v)| m.max((u - v).abs()))
    };
    assert!(
        gap(&y_both, &y_renorm) > 0.05,
        "vs renorm alone: {}",
        gap(&y_both, &y_renorm)
    );
    assert!(
        gap(&y_both, &y_ghost) > 0.05,
        "vs ghost alone: {}",
        gap(&y_both, &y_ghost)
    );
    // the groups' average variance is below the batch's (the spread between groups)
    for ch in 0..c {
        assert!(
            r_both[ch] < r_renorm[ch],
            "ch {ch}: r {} vs renorm alone {}",
            r_both[ch],
            r_renorm[ch]
        );
    }
    // the averaged statistics update the renorm state: equal means, smaller stddev
    let (rb, rr) = (s_both.renorm.unwrap(), s_renorm.renorm.unwrap());
    assert_close("renorm_mean", &rb.mean, &rr.mean, 1e-12, 1e-12);
    for ch in 0..c {
        assert!(rb.stddev[ch] < rr.stddev[ch], "ch {ch}: renorm stddev");
    }
}

#[test]
fn per_group_updates_with_renorm_are_refused_and_the_getters_see_both_parts() {
    let per_group = Ghost {
        update: GhostUpdate::PerGroup,
        ..Ghost::strided(2)
    };
    let cfg = Config::keras(2).variant(Variant::GhostRenorm {
        ghost: per_group,
        renorm: RN,
    });
    match cfg.validate() {
        Err(Error::InvalidConfig { setting, .. }) => assert_eq!(setting, "ghost update"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    assert!(BatchNorm::new(cfg).is_err());
    // the renorm checks apply to the combination too
    let bad = Config::keras(2).variant(Variant::GhostRenorm {
        ghost: Ghost::strided(2),
        renorm: Renorm { rmax: 0.5, ..RN },
    });
    assert!(matches!(
        bad.validate(),
        Err(Error::InvalidConfig {
            setting: "rmax",
            ..
        })
    ));
    let zero = Config::keras(2).variant(Variant::GhostRenorm {
        ghost: Ghost::strided(0),
        renorm: RN,
    });
    assert!(matches!(
        zero.validate(),
        Err(Error::InvalidConfig {
            setting: "virtual_batch_size",
            ..
        })
    ));
    // the renorm state exists, as for renorm alone
    let s = RunningState::init(&ghost_renorm(2)).unwrap();
    assert!(s.renorm.is_some());
    s.validate(&ghost_renorm(2)).unwrap();
    assert!(s
        .validate(&Config::keras(2).variant(Variant::Ghost(Ghost::strided(2))))
        .is_err());
    // an indivisible batch is refused as with ghost batches alone
    let mut bn = BatchNorm::new(ghost_renorm(2)).unwrap();
    let err = bn
        .forward(&[0.0f64; 6], &[3, 2], Layout::NC, Mode::Train)
        .unwrap_err();
    assert!(
        matches!(err, Error::GhostBatchIndivisible { .. }),
        "{err:?}"
    );
}
