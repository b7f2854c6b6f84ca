//! Small steps through every kernel family, sized for Miri: `.ci/run` runs this file
//! under `cargo +nightly miri test -p bnorm --test miri`, which checks the crate's unsafe
//! code on the paths a step takes (the fused channels-first passes' row writes through
//! raw pointers, the recycled `Scratch` buffers, the spare statistics swapped in after a
//! step) for undefined behaviour. Miri reports no SIMD extension, so every kernel runs
//! its scalar loops — the same generic source the SIMD levels compile. Each step is also
//! checked against the float64 reference, so on stable Rust this is one more test of the
//! small shapes.

use bnorm::config::{Ghost, Variant};
use bnorm::element::Element;
use bnorm::expert::{
    backward_into, forward_into, BackwardEpilogue, BackwardOptions, Epilogue, ForwardPlan, Grads,
    Options, Parallelism, Saved, Workspace,
};
use bnorm::{reference, Config, Layout, Mode, Params, RunningState};

/// A deterministic input with a channel-dependent offset.
fn data(n: usize, salt: u64) -> Vec<f64> {
    (0..n as u64)
        .map(|i| {
            let h = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt).wrapping_mul(0xBF58_476D);
            ((h >> 40) as f64 / (1u64 << 24) as f64) * 4.0 - 2.0 + (i % 3) as f64
        })
        .collect()
}

/// One forward and backward step in `T`, with or without a ReLU, against the reference.
fn check<T: Element>(cfg: &Config, layout: Layout, shape: &[usize], mode: Mode, relu: bool) {
    let g = layout.geometry(shape).unwrap();
    let c = cfg.get_channels();
    let n: usize = shape.iter().product();
    let x64 = data(n, 1);
    let dy64 = data(n, 2);
    let x: Vec<T> = x64.iter().map(|&v| T::from_f64(v)).collect();
    let dy: Vec<T> = dy64.iter().map(|&v| T::from_f64(v)).collect();
    // The inputs as stored, for the reference.
    let (x64, dy64): (Vec<f64>, Vec<f64>) = (
        x.iter().map(|v| v.to_f64()).collect(),
        dy.iter().map(|v| v.to_f64()).collect(),
    );
    let p = Params {
        weight: Some((0..c).map(|k| 0.5 + 0.25 * k as f64).collect()),
        bias: Some((0..c).map(|k| 0.1 * k as f64).collect()),
    };
    let mut state = RunningState::init(cfg);
    if let Some(s) = state.as_mut() {
        s.mean = (0..c).map(|k| 0.2 * k as f64).collect();
        s.var = (0..c).map(|k| 1.0 + 0.5 * k as f64).collect();
        s.updates = 3;
    }
    let before = state.clone();
    let zero = T::from_f64(0.0);
    let (mut y, mut dx) = (vec![zero; n], vec![zero; n]);
    let (mut saved, mut ws, mut grads) = (Saved::default(), Workspace::default(), Grads::default());
    let ep = if relu { Epilogue::Relu } else { Epilogue::None };
    let opts = Options::from(Parallelism::Sequential).epilogue(ep);
    forward_into(
        cfg,
        g,
        &x,
        &p,
        state.as_mut(),
        mode,
        &mut y,
        &mut saved,
        &mut ws,
        opts,
    )
    .unwrap();
    let bopts = BackwardOptions::from(Parallelism::Sequential).epilogue(if relu {
        BackwardEpilogue::Relu { y: &y }
    } else {
        BackwardEpilogue::None
    });
    backward_into(
        cfg, g, &x, &dy, &p, &saved, &mut dx, &mut grads, &mut ws, bopts,
    )
    .unwrap();

    let want = reference::forward(cfg, layout, shape, &x64, &p, before.as_ref(), mode).unwrap();
    let tol = if T::DTYPE == bnorm::element::DType::F64 {
        1e-12
    } else {
        1e-5
    };
    let close = |a: f64, b: f64| (a - b).abs() <= tol * (1.0 + b.abs());
    let ref_y: Vec<f64> = want
        .y
        .iter()
        .map(|&v| if relu { v.max(0.0) } else { v })
        .collect();
    for (i, (got, w)) in y.iter().zip(&ref_y).enumerate() {
        assert!(close(got.to_f64(), *w), "y[{i}] {} vs {w}", got.to_f64());
    }
    // Through the ReLU the reference sees the masked gradient.
    let dz: Vec<f64> = dy64
        .iter()
        .zip(&y)
        .map(|(&d, yv)| if !relu || yv.to_f64() > 0.0 { d } else { 0.0 })
        .collect();
    let want_b = reference::backward(cfg, layout, shape, &x64, &dz, &p, &want).unwrap();
    for (i, (got, w)) in dx.iter().zip(&want_b.dx).enumerate() {
        assert!(close(got.to_f64(), *w), "dx[{i}] {} vs {w}", got.to_f64());
    }
    for k in 0..c {
        assert!(close(grads.dweight[k], want_b.dweight[k]), "dweight[{k}]");
        assert!(close(grads.dbias[k], want_b.dbias[k]), "dbias[{k}]");
    }
    if let (Some(got), Some(w)) = (state.as_ref(), want.state.as_ref()) {
        for k in 0..c {
            assert!((got.mean[k] - w.mean[k]).abs() <= 1e-9 * (1.0 + w.mean[k].abs()));
            assert!((got.var[k] - w.var[k]).abs() <= 1e-9 * (1.0 + w.var[k].abs()));
        }
    }
}

/// Channels-first (fused passes with five channels on one thread, unfused with one),
/// channels-last and (N, C), training and inference, with and without the ReLU.
#[test]
fn every_kernel_family_on_small_shapes() {
    let cases: [(Layout, &[usize]); 4] = [
        (Layout::NC, &[5, 3]),
        (Layout::NCHW, &[2, 5, 2, 3]),
        (Layout::NCHW, &[3, 1, 2, 2]),
        (Layout::NHWC, &[2, 2, 3, 3]),
    ];
    // The five-channel shape takes the fused passes, the one-channel shape does not.
    let fused = |shape: &[usize]| {
        let g = Layout::NCHW.geometry(shape).unwrap();
        let cfg = Config::torch(g.channels);
        let (p, s) = (Params::init(&cfg), RunningState::init(&cfg));
        let opts = Options::<f32>::from(Parallelism::Sequential);
        ForwardPlan::new(&cfg, g, &p, s.as_ref(), Mode::Train, &opts)
            .unwrap()
            .fused
    };
    assert!(fused(cases[1].1) && !fused(cases[2].1));
    for (layout, shape) in cases {
        let c = layout.geometry(shape).unwrap().channels;
        let cfg = Config::torch(c);
        for mode in [Mode::Train, Mode::Inference] {
            for relu in [false, true] {
                check::<f32>(&cfg, layout, shape, mode, relu);
                check::<f64>(&cfg, layout, shape, mode, relu);
            }
        }
    }
}

/// Ghost batches: a step per group (the per-sample kernel calls) on a channels-first and
/// a channels-last shape.
#[test]
fn ghost_batches_on_small_shapes() {
    let ghost = Ghost::strided(2);
    for (layout, shape) in [
        (Layout::NCHW, &[4, 2, 1, 3][..]),
        (Layout::NHWC, &[4, 1, 3, 2][..]),
    ] {
        let c = layout.geometry(shape).unwrap().channels;
        let cfg = Config::torch(c).variant(Variant::Ghost(ghost));
        check::<f32>(&cfg, layout, shape, Mode::Train, false);
        check::<f32>(&cfg, layout, shape, Mode::Train, true);
    }
}

/// The allocating tier writes into memory nobody initialized (`Vec` capacity, not
/// zeroed): under Miri, reading an element that a path forgot to write is an error. Each
/// allocating call is compared, bit for bit, with the same call into zeroed caller
/// buffers, over every path that writes an output: the row and run maps, the fused
/// passes, ghost batches, masks, the ReLU epilogues and the residual's gradient, the
/// running-statistics map, and 16-bit storage.
#[test]
fn the_allocating_tier_writes_every_element() {
    use bnorm::element::bf16;
    use bnorm::BatchNorm;
    fn run<T: Element + PartialEq + std::fmt::Debug>(cfg: Config, layout: Layout, shape: &[usize]) {
        let n: usize = shape.iter().product();
        let x: Vec<T> = data(n, 3).iter().map(|&v| T::from_f64(v)).collect();
        let dy: Vec<T> = data(n, 4).iter().map(|&v| T::from_f64(v)).collect();
        let r: Vec<T> = data(n, 5).iter().map(|&v| T::from_f64(v * 0.5)).collect();
        let layer = || {
            let mut bn: BatchNorm = cfg.clone().build().unwrap();
            bn.set_parallelism(Parallelism::Sequential);
            bn
        };
        let (mut a, mut b) = (layer(), layer());
        let zero = T::from_f64(0.0);
        for mode in [Mode::Train, Mode::Inference, Mode::Frozen] {
            // forward, backward
            let (y, _) = a.forward(&x, shape, layout, mode).unwrap();
            let mut y2 = vec![zero; n];
            b.forward_into(&x, shape, layout, mode, &mut y2).unwrap();
            assert_eq!(y, y2, "{layout:?} {mode:?} forward");
            let g = a.backward(&x, &dy, shape, layout).unwrap();
            let (mut dx2, mut grads) = (vec![zero; n], Grads::default());
            b.backward_into(&x, &dy, shape, layout, &mut dx2, &mut grads)
                .unwrap();
            assert_eq!(g.dx, dx2, "{layout:?} {mode:?} backward");
            // through a ReLU, with and without a residual and its gradient
            for res in [None, Some(&r[..])] {
                let (y, _) = a.forward_relu(&x, res, shape, layout, mode).unwrap();
                let ep = res.map_or(Epilogue::Relu, Epilogue::AddRelu);
                let opts = Options::from(Parallelism::Sequential).epilogue(ep);
                b.forward_with(&x, shape, layout, mode, &mut y2, opts)
                    .unwrap();
                assert_eq!(y, y2, "{layout:?} {mode:?} forward_relu");
                let (g, dres) = a
                    .backward_relu(&x, &y, &dy, shape, layout, res.is_some())
                    .unwrap();
                let mut dres2 = vec![zero; n];
                let ep = match res {
                    Some(_) => BackwardEpilogue::AddRelu {
                        y: &y2,
                        dresidual: &mut dres2,
                    },
                    None => BackwardEpilogue::Relu { y: &y2 },
                };
                let opts = BackwardOptions::from(Parallelism::Sequential).epilogue(ep);
                b.backward_with(&x, &dy, shape, layout, &mut dx2, &mut grads, opts)
                    .unwrap();
                assert_eq!(g.dx, dx2, "{layout:?} {mode:?} backward_relu");
                assert_eq!(dres.is_some(), res.is_some());
                if let Some(d) = dres {
                    assert_eq!(d, dres2, "{layout:?} {mode:?} residual gradient");
                }
            }
        }
        // The functional tier (its allocating functions use the rayon pool, whose
        // start-up Miri's Stacked Borrows rejects inside crossbeam-epoch: checked on
        // stable only; they share `forward_out` / `backward_out` with the layer above).
        if cfg!(miri) {
            return;
        }
        let g = layout.geometry(shape).unwrap();
        let p = a.params().clone();
        let f = bnorm::expert::forward(&cfg, g, &x, &p, a.running_state(), Mode::Train).unwrap();
        let mut y2 = vec![zero; n];
        let mut s2 = a.running_state().cloned();
        let (mut saved, mut ws) = (Saved::default(), Workspace::default());
        let opts = Options::from(Parallelism::Rayon);
        forward_into(
            &cfg,
            g,
            &x,
            &p,
            s2.as_mut(),
            Mode::Train,
            &mut y2,
            &mut saved,
            &mut ws,
            opts,
        )
        .unwrap();
        assert_eq!(f.y, y2, "{layout:?} expert::forward");
        let bw = bnorm::expert::backward(&cfg, g, &x, &dy, &p, &f.saved).unwrap();
        let (mut dx2, mut grads) = (vec![zero; n], Grads::default());
        let opts = BackwardOptions::from(Parallelism::Rayon);
        backward_into(
            &cfg, g, &x, &dy, &p, &saved, &mut dx2, &mut grads, &mut ws, opts,
        )
        .unwrap();
        assert_eq!(bw.dx, dx2, "{layout:?} expert::backward");
        // bad input: an error, nothing returned
        assert!(a.forward(&x[1..], shape, layout, Mode::Train).is_err());
        assert!(bnorm::expert::backward(&cfg, g, &x, &dy[1..], &p, &f.saved).is_err());
    }
    let cases: [(Layout, &[usize]); 4] = [
        (Layout::NC, &[5, 3]),
        (Layout::NCHW, &[2, 5, 2, 3]), // the fused passes
        (Layout::NCHW, &[3, 1, 2, 2]),
        (Layout::NHWC, &[2, 2, 3, 3]),
    ];
    for (layout, shape) in cases {
        let c = layout.geometry(shape).unwrap().channels;
        run::<f32>(Config::torch(c), layout, shape);
        run::<bf16>(Config::keras(c), layout, shape);
    }
    // ghost batches (per-sample kernel calls)
    let cfg = Config::torch(2).variant(Variant::Ghost(Ghost::strided(2)));
    run::<f32>(cfg, Layout::NCHW, &[4, 2, 1, 3]);
    // masks (the masked statistics and gradient, written by scalar code)
    let mut bn = Config::keras(2).build().unwrap();
    bn.set_parallelism(Parallelism::Sequential);
    let x: Vec<f64> = data(12, 6);
    let mask = [true, true, false, true, true, false];
    let (y, _) = bn
        .forward_masked(&x, &mask, &[2, 3, 2], Layout::NLC, Mode::Train)
        .unwrap();
    let g = bn
        .backward(&x, &data(12, 7), &[2, 3, 2], Layout::NLC)
        .unwrap();
    assert!(y.iter().chain(&g.dx).all(|v| v.is_finite()));
}
