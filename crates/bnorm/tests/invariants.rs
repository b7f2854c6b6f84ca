//! Invariants that hold whatever the data: normalized channels, zero-sum gradients,
//! inference as an affine map, layout independence, thread-count independence.
#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

mod common;

use bnorm::expert::{backward, forward, forward_into, Parallelism, Saved, Workspace};
use bnorm::{BatchNorm, Config, Layout, Mode, Params, RunningState};
use common::{shape, transpose, Rng};

#[test]
fn training_output_has_zero_mean_unit_variance_per_channel() {
    for layout in Layout::ALL {
        let shp = shape(layout, 5, 4, &[3, 4, 2]);
        let g = layout.geometry(&shp).unwrap();
        let mut rng = Rng(3);
        let x = rng.vec(g.len(), 7.0, 3.0);
        let cfg = Config::torch(4).affine(false).eps(1e-12);
        let f = forward(
            &cfg,
            g,
            &x,
            &Params::init(&cfg),
            RunningState::init(&cfg).as_ref(),
            Mode::Train,
        )
        .unwrap();
        for ch in 0..4 {
            let vals: Vec<f64> = (0..g.len())
                .filter(|i| (i / g.inner) % 4 == ch)
                .map(|i| f.y[i])
                .collect();
            let m = vals.iter().sum::<f64>() / vals.len() as f64;
            let v = vals.iter().map(|a| (a - m).powi(2)).sum::<f64>() / vals.len() as f64;
            assert!(m.abs() < 1e-12, "{layout} channel {ch} mean {m}");
            assert!((v - 1.0).abs() < 1e-9, "{layout} channel {ch} variance {v}");
        }
        let dy = rng.vec(g.len(), 0.5, 1.0);
        let b = backward(&cfg, g, &x, &dy, &Params::init(&cfg), &f.saved).unwrap();
        for ch in 0..4 {
            let s: f64 = (0..g.len())
                .filter(|i| (i / g.inner) % 4 == ch)
                .map(|i| b.dx[i])
                .sum();
            assert!(s.abs() < 1e-10, "{layout}: Σdx over channel {ch} = {s}");
            // and Σ dx·x̂ = 0 too
            let sx: f64 = (0..g.len())
                .filter(|i| (i / g.inner) % 4 == ch)
                .map(|i| b.dx[i] * f.y[i])
                .sum();
            assert!(sx.abs() < 1e-9, "{layout}: Σdx·x̂ over channel {ch} = {sx}");
        }
    }
}

#[test]
fn inference_is_an_affine_map_and_changes_nothing() {
    let cfg = Config::keras(3);
    let mut bn = cfg.clone().build().unwrap();
    let mut rng = Rng(4);
    let shp = [4, 3, 2, 2];
    for _ in 0..3 {
        bn.forward(&rng.vec(48, 2.0, 1.0), &shp, Layout::NCHW, Mode::Train)
            .unwrap();
    }
    let before = bn.running_state().unwrap().clone();
    let x = rng.vec(48, 0.0, 1.0);
    let (y1, r) = bn.forward(&x, &shp, Layout::NCHW, Mode::Inference).unwrap();
    assert!(!r.updated);
    assert_eq!(bn.running_state().unwrap(), &before);
    // f(a·x1 + (1-a)·x2) = a·f(x1) + (1-a)·f(x2) for an affine f
    let x2 = rng.vec(48, 5.0, 2.0);
    let (y2, _) = bn
        .forward(&x2, &shp, Layout::NCHW, Mode::Inference)
        .unwrap();
    let mix: Vec<f64> = x.iter().zip(&x2).map(|(a, b)| 0.3 * a + 0.7 * b).collect();
    let (ym, _) = bn
        .forward(&mix, &shp, Layout::NCHW, Mode::Inference)
        .unwrap();
    for i in 0..48 {
        assert!((ym[i] - (0.3 * y1[i] + 0.7 * y2[i])).abs() < 1e-12);
    }
    // Frozen: same output, also no update.
    let (yf, _) = bn.forward(&x, &shp, Layout::NCHW, Mode::Frozen).unwrap();
    assert_eq!(yf, y1);
    assert_eq!(bn.running_state().unwrap(), &before);
}

#[test]
fn channels_first_and_channels_last_agree() {
    for layout in [Layout::NCL, Layout::NCHW, Layout::NCDHW] {
        let shp = shape(layout, 3, 5, &[4, 3, 2]);
        let mut rng = Rng(8);
        let len: usize = shp.iter().product();
        let x = rng.vec(len, 1.0, 2.0);
        let dy = rng.vec(len, 0.0, 1.0);
        let (xl, shl) = transpose(&x, layout, &shp);
        let (dyl, _) = transpose(&dy, layout, &shp);
        let mut a = Config::torch(5).build().unwrap();
        let mut b = Config::torch(5).build().unwrap();
        for mode in [Mode::Train, Mode::Train, Mode::Inference] {
            let (ya, _) = a.forward(&x, &shp, layout, mode).unwrap();
            let (yb, _) = b.forward(&xl, &shl, layout.transposed(), mode).unwrap();
            let (ya_l, _) = transpose(&ya, layout, &shp);
            for (p, q) in ya_l.iter().zip(&yb) {
                assert!((p - q).abs() < 1e-12);
            }
            let ga = a.backward(&x, &dy, &shp, layout).unwrap();
            let gb = b.backward(&xl, &dyl, &shl, layout.transposed()).unwrap();
            let (dxa_l, _) = transpose(&ga.dx, layout, &shp);
            for (p, q) in dxa_l.iter().zip(&gb.dx) {
                assert!((p - q).abs() < 1e-12);
            }
            for (p, q) in ga.dweight.unwrap().iter().zip(gb.dweight.unwrap()) {
                assert!((p - q).abs() < 1e-10);
            }
            let (sa, sb) = (a.running_state().unwrap(), b.running_state().unwrap());
            for ch in 0..5 {
                assert!((sa.mean[ch] - sb.mean[ch]).abs() < 1e-13);
                assert!((sa.var[ch] - sb.var[ch]).abs() < 1e-13);
            }
        }
    }
}

/// Runs one training step and its backward in a pool of `threads` threads.
fn step_in_pool(
    threads: usize,
    layout: Layout,
    shp: &[usize],
    x: &[f32],
    dy: &[f32],
) -> (Vec<f32>, Vec<f64>, Vec<f32>, Vec<f64>) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let mut bn = Config::torch(shp[layout.channel_axis()]).build().unwrap();
        let (y, _) = bn.forward(x, shp, layout, Mode::Train).unwrap();
        let b = bn.backward(x, dy, shp, layout).unwrap();
        let s = bn.running_state().unwrap();
        let mut stats = s.mean.clone();
        stats.extend(&s.var);
        (y, stats, b.dx, b.dweight.unwrap())
    })
}

#[test]
fn results_are_bitwise_identical_for_any_thread_count() {
    for (layout, shp) in [
        (Layout::NCHW, vec![8, 3, 61, 67]),
        (Layout::NHWC, vec![8, 61, 67, 3]),
        (Layout::NC, vec![40_000, 5]),
        (Layout::NCL, vec![3, 2, 70_001]),
        // Wide channels-last rows over several reduction segments.
        (Layout::NHWC, vec![4, 41, 40, 64]),
        (Layout::NC, vec![3001, 130]),
    ] {
        let len: usize = shp.iter().product();
        let mut rng = Rng(21);
        let x: Vec<f32> = (0..len)
            .map(|_| (100.0 + 3.0 * rng.normal()) as f32)
            .collect();
        let dy: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
        let one = step_in_pool(1, layout, &shp, &x, &dy);
        for threads in [2, 3, 8] {
            let many = step_in_pool(threads, layout, &shp, &x, &dy);
            assert!(
                one == many,
                "{layout} {shp:?}: {threads} threads differ from 1"
            );
        }
        // Sequential and Rayon agree bitwise too.
        let cfg = Config::torch(shp[layout.channel_axis()]);
        let g = layout.geometry(&shp).unwrap();
        let p = Params::init(&cfg);
        let mut outs = Vec::new();
        for par in [Parallelism::Sequential, Parallelism::Rayon] {
            let mut s = RunningState::init(&cfg);
            let mut y = vec![0f32; len];
            forward_into(
                &cfg,
                g,
                &x,
                &p,
                s.as_mut(),
                Mode::Train,
                &mut y,
                &mut Saved::default(),
                &mut Workspace::default(),
                par,
            )
            .unwrap();
            outs.push((y, s));
        }
        assert!(outs[0] == outs[1], "{layout}: sequential and rayon differ");
    }
}

#[test]
fn the_layer_is_a_thin_wrapper_over_the_functional_core() {
    let cfg = Config::tensorflow(3);
    let mut bn = BatchNorm::new(cfg.clone()).unwrap();
    let mut state = RunningState::init(&cfg);
    let p = Params::init(&cfg);
    let g = Layout::NHWC.geometry(&[2, 3, 3, 3]).unwrap();
    let mut rng = Rng(12);
    for _ in 0..4 {
        let x = rng.vec(54, 1.0, 1.0);
        let f = forward(&cfg, g, &x, &p, state.as_ref(), Mode::Train).unwrap();
        let (y, _) = bn
            .forward(&x, &[2, 3, 3, 3], Layout::NHWC, Mode::Train)
            .unwrap();
        assert_eq!(f.y, y);
        state = f.state;
        assert_eq!(bn.running_state(), state.as_ref());
    }
}
