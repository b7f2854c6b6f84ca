//! Gradients against central finite differences in f64, for every layout and mode and
//! for the renorm and ghost variants.
#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

mod common;

use bnorm::expert::{backward, forward};
use bnorm::{Config, Layout, Mode, Params, RunningState};
use common::{conventions, shape, Rng};

/// Loss L = Σ w ⊙ y with fixed random weights w, so dL/dy = w.
fn loss(
    cfg: &Config,
    layout: Layout,
    shp: &[usize],
    x: &[f64],
    p: &Params,
    s: Option<&RunningState>,
    mode: Mode,
    w: &[f64],
) -> f64 {
    let g = layout.geometry(shp).unwrap();
    let f = forward(cfg, g, x, p, s, mode).unwrap();
    f.y.iter().zip(w).map(|(a, b)| a * b).sum()
}

fn check_gradients(name: &str, cfg: &Config, layout: Layout, mode: Mode, seed: u64) {
    let mut rng = Rng(seed);
    let c = cfg.get_channels();
    let shp = shape(layout, 6, c, &[3, 2]);
    let len: usize = shp.iter().product();
    let x = rng.vec(len, 0.3, 1.5);
    let w = rng.vec(len, 0.0, 1.0);
    let p = Params {
        weight: cfg.get_scale().then(|| rng.vec(c, 1.0, 0.4)),
        bias: cfg.get_center().then(|| rng.vec(c, 0.0, 0.4)),
    };
    let state = RunningState::init(cfg).map(|_| {
        RunningState::from_values(cfg, rng.vec(c, 0.2, 0.3), rng.vec(c, 1.3, 0.1), 3).unwrap()
    });
    if mode == Mode::Frozen && state.is_none() {
        return;
    }
    let g = layout.geometry(&shp).unwrap();
    let f = forward(cfg, g, &x, &p, state.as_ref(), mode).unwrap();
    let b = backward(cfg, g, &x, &w, &p, &f.saved).unwrap();
    let h = 1e-6;
    let ctx = format!("{name} {layout} {mode:?}");
    for i in (0..len).step_by(len / 13 + 1) {
        let mut xp = x.clone();
        let mut xm = x.clone();
        xp[i] += h;
        xm[i] -= h;
        // Renorm's r and d are constants in backward (tf_keras stop_gradient): hold the
        // state fixed, which is what the forward sees, but r/d still move with x in a
        // numerical derivative. Skip dx for renorm (checked against the reference, and
        // against finite differences with r, d frozen in tests/renorm_ghost.rs).
        if name.contains("renorm") {
            break;
        }
        let num = (loss(cfg, layout, &shp, &xp, &p, state.as_ref(), mode, &w)
            - loss(cfg, layout, &shp, &xm, &p, state.as_ref(), mode, &w))
            / (2.0 * h);
        assert!(
            (num - b.dx[i]).abs() <= 1e-6 * (1.0 + num.abs()),
            "{ctx} dx[{i}]: fd {num}, analytic {}",
            b.dx[i]
        );
    }
    for (which, analytic) in [("weight", &b.dweight), ("bias", &b.dbias)] {
        let Some(analytic) = analytic else { continue };
        for ch in 0..c {
            let bump = |d: f64| {
                let mut q = p.clone();
                let v = if which == "weight" {
                    q.weight.as_mut()
                } else {
                    q.bias.as_mut()
                };
                v.unwrap()[ch] += d;
                loss(cfg, layout, &shp, &x, &q, state.as_ref(), mode, &w)
            };
            let num = (bump(h) - bump(-h)) / (2.0 * h);
            assert!(
                (num - analytic[ch]).abs() <= 1e-6 * (1.0 + num.abs()),
                "{ctx} d{which}[{ch}]: fd {num}, analytic {}",
                analytic[ch]
            );
        }
    }
}

#[test]
fn finite_differences_every_layout_and_mode() {
    for layout in Layout::ALL {
        for mode in [Mode::Train, Mode::Inference, Mode::Frozen] {
            for (name, cfg) in conventions(3) {
                check_gradients(name, &cfg, layout, mode, 11);
            }
        }
    }
}

/// Renorm: with r and d held constant (as tf_keras's stop_gradient does), dx must equal
/// the finite difference of y = γ·(x̂·r + d) + β with r, d frozen at their values.
#[test]
fn renorm_dx_treats_r_and_d_as_constants() {
    let (_, cfg) = conventions(2).swap_remove(5);
    let layout = Layout::NCHW;
    let shp = [4, 2, 3, 3];
    let mut rng = Rng(5);
    let len = 72;
    let x = rng.vec(len, 2.0, 3.0);
    let w = rng.vec(len, 0.0, 1.0);
    let p = Params {
        weight: Some(vec![1.3, 0.7]),
        bias: Some(vec![0.1, -0.2]),
    };
    let s = RunningState::from_values(&cfg, vec![0.0, 1.0], vec![1.0, 4.0], 1).unwrap();
    let g = layout.geometry(&shp).unwrap();
    let f = forward(&cfg, g, &x, &p, Some(&s), Mode::Train).unwrap();
    let (r, d) = (f.saved.renorm_r().to_vec(), f.saved.renorm_d().to_vec());
    assert!(
        r.iter().any(|&v| v != 1.0),
        "test needs an active correction"
    );
    let b = backward(&cfg, g, &x, &w, &p, &f.saved).unwrap();
    // y with frozen r, d as a plain function of x (batch statistics still move).
    let y_of = |x: &[f64]| -> f64 {
        let mut total = 0.0;
        for ch in 0..2 {
            let idx: Vec<usize> = (0..len).filter(|i| (i / 9) % 2 == ch).collect();
            let m = idx.len() as f64;
            let mu = idx.iter().map(|&i| x[i]).sum::<f64>() / m;
            let var = idx.iter().map(|&i| (x[i] - mu).powi(2)).sum::<f64>() / m;
            for &i in &idx {
                let xh = (x[i] - mu) / (var + cfg.get_eps()).sqrt();
                total += w[i] * (p.gamma(ch) * (xh * r[ch] + d[ch]) + p.beta(ch));
            }
        }
        total
    };
    let h = 1e-6;
    for i in 0..len {
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += h;
        xm[i] -= h;
        let num = (y_of(&xp) - y_of(&xm)) / (2.0 * h);
        assert!(
            (num - b.dx[i]).abs() <= 1e-6 * (1.0 + num.abs()),
            "dx[{i}]: fd {num}, analytic {}",
            b.dx[i]
        );
    }
}
