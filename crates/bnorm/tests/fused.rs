//! Fused epilogues (batch norm + ReLU, batch norm + residual add + ReLU) against the
//! unfused composition, forward and backward, every layout, mode, dtype and SIMD level.
#![allow(clippy::too_many_arguments)]

mod common;

use bnorm::element::{bf16, Element};
use bnorm::expert::{backward_into, forward_into, Grads, Parallelism, Saved, Workspace};
use bnorm::tuning::{fused_channels, with_simd_level, SimdLevel};
use bnorm::{Config, Layout, Mode, Params, RunningState};
use common::{shape, Rng};

struct Out<T> {
    y: Vec<T>,
    dx: Vec<T>,
    dres: Vec<T>,
    grads: Grads,
    state: Option<RunningState>,
}

fn fused<T: Element>(
    cfg: &Config,
    layout: Layout,
    shp: &[usize],
    x: &[T],
    res: Option<&[T]>,
    dy: &[T],
    mode: Mode,
    par: Parallelism,
) -> Out<T> {
    let g = layout.geometry(shp).unwrap();
    let p = Params {
        weight: Some(
            (0..cfg.get_channels())
                .map(|c| 0.5 + c as f64 * 0.25)
                .collect(),
        ),
        bias: Some(vec![0.1; cfg.get_channels()]),
    };
    let mut state = RunningState::init(cfg);
    let n = x.len();
    let zero = T::from_f64(0.0);
    let (mut y, mut dx, mut dres) = (vec![zero; n], vec![zero; n], vec![zero; n]);
    let (mut saved, mut ws, mut grads) = (Saved::default(), Workspace::default(), Grads::default());
    bnorm::expert::forward_into(
        cfg,
        g,
        x,
        &p,
        state.as_mut(),
        mode,
        &mut y,
        &mut saved,
        &mut ws,
        bnorm::expert::Options::from(par).epilogue(res.map_or(
            bnorm::expert::Epilogue::Relu,
            bnorm::expert::Epilogue::AddRelu,
        )),
    )
    .unwrap();
    let dr = res.map(|_| &mut dres[..]);
    bnorm::expert::backward_into(
        cfg,
        g,
        x,
        dy,
        &p,
        &saved,
        &mut dx,
        &mut grads,
        &mut ws,
        bnorm::expert::BackwardOptions::from(par).epilogue(match dr {
            Some(dresidual) => bnorm::expert::BackwardEpilogue::AddRelu { y: &y, dresidual },
            None => bnorm::expert::BackwardEpilogue::Relu { y: &y },
        }),
    )
    .unwrap();
    Out {
        y,
        dx,
        dres,
        grads,
        state,
    }
}

/// The composition: plain batch norm, then (add,) ReLU; backward masks dy by hand.
/// `mask_y` decides the ReLU mask (the fused output, so that a value that the
/// composition's extra rounding moves across zero does not flip a mask).
fn composed<T: Element>(
    cfg: &Config,
    layout: Layout,
    shp: &[usize],
    x: &[T],
    res: Option<&[T]>,
    dy: &[T],
    mode: Mode,
    mask_y: &[T],
) -> Out<T> {
    let g = layout.geometry(shp).unwrap();
    let p = Params {
        weight: Some(
            (0..cfg.get_channels())
                .map(|c| 0.5 + c as f64 * 0.25)
                .collect(),
        ),
        bias: Some(vec![0.1; cfg.get_channels()]),
    };
    let mut state = RunningState::init(cfg);
    let n = x.len();
    let zero = T::from_f64(0.0);
    let mut z = vec![zero; n];
    let (mut saved, mut ws, mut grads) = (Saved::default(), Workspace::default(), Grads::default());
    forward_into(
        cfg,
        g,
        x,
        &p,
        state.as_mut(),
        mode,
        &mut z,
        &mut saved,
        &mut ws,
        Parallelism::Sequential,
    )
    .unwrap();
    // add and ReLU in f64 on the unrounded normalization would differ by one rounding of z;
    // compose from the stored z as a user would
    let y: Vec<T> = (0..n)
        .map(|i| {
            let v = z[i].to_f64() + res.map_or(0.0, |r| r[i].to_f64());
            T::from_f64(if v < 0.0 { 0.0 } else { v })
        })
        .collect();
    let dz: Vec<T> = (0..n)
        .map(|i| {
            if mask_y[i].to_f64() > 0.0 {
                dy[i]
            } else {
                zero
            }
        })
        .collect();
    let mut dx = vec![zero; n];
    backward_into(
        cfg,
        g,
        x,
        &dz,
        &p,
        &saved,
        &mut dx,
        &mut grads,
        &mut ws,
        Parallelism::Sequential,
    )
    .unwrap();
    let dres = if res.is_some() { dz } else { vec![zero; n] };
    Out {
        y,
        dx,
        dres,
        grads,
        state,
    }
}

fn close<T: Element>(what: &str, a: &[T], b: &[T], tol: f64) {
    for (i, (p, q)) in a.iter().zip(b).enumerate() {
        let (p, q) = (p.to_f64(), q.to_f64());
        assert!(
            (p - q).abs() <= tol * (1.0 + q.abs()),
            "{what}[{i}]: {p} vs {q}"
        );
    }
}

fn check<T: Element>(tol: f64) {
    let levels = common::simd_levels();
    let mut ran = Vec::new();
    // 5 channels, the channel counts whose channels-last sums keep their lanes in
    // registers (8 and 32: runs of 32 values; 64), and 40 (sums in memory, two rows at a
    // time through the ReLU).
    for (layout, ch) in Layout::ALL
        .into_iter()
        .flat_map(|l| [5usize, 8, 32, 40, 64].map(move |c| (l, c)))
    {
        for (k, mode) in [Mode::Train, Mode::Inference].into_iter().enumerate() {
            for with_res in [false, true] {
                let shp = shape(layout, 4, ch, &[3, 4, 2]);
                let n: usize = shp.iter().product();
                let mut rng = Rng(k as u64 * 7 + with_res as u64);
                let x: Vec<T> = rng.stored(n, 0.5, 1.0);
                let res: Vec<T> = rng.stored(n, 0.0, 1.0);
                let dy: Vec<T> = rng.stored(n, 0.0, 1.0);
                let r = with_res.then_some(&res[..]);
                let cfg = Config::torch(ch);
                let scalar = with_simd_level(SimdLevel::Scalar, || {
                    fused(
                        &cfg,
                        layout,
                        &shp,
                        &x,
                        r,
                        &dy,
                        mode,
                        Parallelism::Sequential,
                    )
                });
                let want = composed(&cfg, layout, &shp, &x, r, &dy, mode, &scalar.y);
                for &level in &levels {
                    ran.push(level);
                    let got = with_simd_level(level, || {
                        fused(
                            &cfg,
                            layout,
                            &shp,
                            &x,
                            r,
                            &dy,
                            mode,
                            Parallelism::Sequential,
                        )
                    });
                    let ctx = format!(
                        "{} {layout} C={ch} {mode:?} res={with_res} {level:?}",
                        T::DTYPE
                    );
                    assert!(
                        got.y == scalar.y && got.dx == scalar.dx && got.dres == scalar.dres,
                        "{ctx}: differs from the scalar path"
                    );
                    close(&format!("{ctx} y"), &got.y, &want.y, tol);
                    close(&format!("{ctx} dx"), &got.dx, &want.dx, tol);
                    close(&format!("{ctx} dres"), &got.dres, &want.dres, tol);
                    for c in 0..ch {
                        assert!(
                            (got.grads.dweight[c] - want.grads.dweight[c]).abs() <= tol * n as f64,
                            "{ctx} dweight"
                        );
                        assert!(
                            (got.grads.dbias[c] - want.grads.dbias[c]).abs() <= tol * n as f64,
                            "{ctx} dbias"
                        );
                    }
                    assert_eq!(got.state, want.state, "{ctx}: running statistics");
                }
            }
        }
    }
    common::simd_ran(&format!("fused {}", T::DTYPE), &ran);
}

#[test]
fn fused_relu_equals_the_composition_f64() {
    check::<f64>(1e-12);
}

#[test]
fn fused_relu_equals_the_composition_f32() {
    // y may differ by one rounding (the fused path rounds once, the composition twice)
    check::<f32>(1e-6);
}

#[test]
fn fused_relu_equals_the_composition_bf16() {
    check::<bf16>(1e-2);
}

#[test]
fn fused_relu_threaded_and_large_agrees_with_sequential() {
    let shp = [4, 16, 40, 40];
    let n: usize = shp.iter().product();
    let mut rng = Rng(1);
    let x: Vec<f32> = rng.vec(n, 0.0, 1.0).iter().map(|&v| v as f32).collect();
    let res: Vec<f32> = rng.vec(n, 0.0, 1.0).iter().map(|&v| v as f32).collect();
    let dy: Vec<f32> = rng.vec(n, 0.0, 1.0).iter().map(|&v| v as f32).collect();
    let cfg = Config::keras(16);
    let a = fused(
        &cfg,
        Layout::NCHW,
        &shp,
        &x,
        Some(&res),
        &dy,
        Mode::Train,
        Parallelism::Sequential,
    );
    let b = fused(
        &cfg,
        Layout::NCHW,
        &shp,
        &x,
        Some(&res),
        &dy,
        Mode::Train,
        Parallelism::Rayon,
    );
    assert!(a.y == b.y && a.dx == b.dx && a.dres == b.dres && a.grads == b.grads);
}

/// The channels-first backward through the ReLU runs channel group by channel group (the
/// second pass from cache) when there are enough groups for the threads, and as two
/// passes otherwise: both must give the same bits, with and without the residual.
#[test]
fn fused_channel_groups_match_the_two_pass_path() {
    // Rows of 99 values (lanes in registers, channel by channel) and of 1155 (the rows in
    // memory order, lanes in memory between them): 64-value chunks, 8-value chunks and
    // single values each.
    for shp in [[3, 16, 9, 11], [3, 16, 33, 35]] {
        groups_match_two_passes(&shp);
    }
}

fn groups_match_two_passes(shp: &[usize]) {
    let n: usize = shp.iter().product();
    let mut rng = Rng(11);
    let x: Vec<f32> = rng.vec(n, 0.3, 1.0).iter().map(|&v| v as f32).collect();
    let res: Vec<f32> = rng.vec(n, 0.0, 1.0).iter().map(|&v| v as f32).collect();
    let dy: Vec<f32> = rng.vec(n, 0.0, 1.0).iter().map(|&v| v as f32).collect();
    let cfg = Config::torch(16);
    for r in [None, Some(&res[..])] {
        // One thread: 4 groups of 4 channels >= 2 per thread, grouped. Sixteen threads:
        // too few groups, two passes.
        let run = |threads: usize| {
            in_pool(threads, || {
                let par = Parallelism::Rayon;
                fused(&cfg, Layout::NCHW, shp, &x, r, &dy, Mode::Train, par)
            })
        };
        let (a, b) = (run(1), run(16));
        assert!(a.y == b.y, "forward outputs differ");
        assert!(a.dx == b.dx, "dx differs (residual: {})", r.is_some());
        assert!(
            a.dres == b.dres && a.grads == b.grads,
            "dres or parameter gradients differ"
        );
    }
}

/// With large channels the fused kernels take fewer channels per task (two for the plain
/// backward, one through the ReLU, here): grouped and two-pass results must still agree
/// bit for bit, for the training forward, the plain backward and the ReLU backward.
#[test]
fn smaller_channel_groups_of_large_channels_match_the_two_pass_path() {
    let shp = [2, 8, 300, 150];
    let g = Layout::NCHW.geometry(&shp).unwrap();
    // The premise: 360 KB of f32 per channel and tensor (a 2 MB budget per task).
    assert_eq!(fused_channels::<f32>(g, 1), 4);
    assert_eq!(fused_channels::<f32>(g, 2), 2);
    assert_eq!(fused_channels::<f32>(g, 3), 1);
    let n = g.len();
    let mut rng = Rng(5);
    let x: Vec<f32> = rng.vec(n, 0.3, 1.0).iter().map(|&v| v as f32).collect();
    let dy: Vec<f32> = rng.vec(n, 0.0, 1.0).iter().map(|&v| v as f32).collect();
    let cfg = Config::torch(8);
    let p = Params::init(&cfg);
    // One thread: 4 or 8 groups >= 2 per thread, grouped. Sixteen threads: two passes.
    let run = |threads: usize| {
        in_pool(threads, || {
            let mut state = RunningState::init(&cfg);
            let (mut y, mut dx) = (vec![0f32; n], vec![0f32; n]);
            let (mut saved, mut ws, mut grads) =
                (Saved::default(), Workspace::default(), Grads::default());
            let par = Parallelism::Rayon;
            forward_into(
                &cfg,
                g,
                &x,
                &p,
                state.as_mut(),
                Mode::Train,
                &mut y,
                &mut saved,
                &mut ws,
                par,
            )
            .unwrap();
            backward_into(
                &cfg, g, &x, &dy, &p, &saved, &mut dx, &mut grads, &mut ws, par,
            )
            .unwrap();
            let plain = (y, dx, grads.clone());
            let mut dx = vec![0f32; n];
            bnorm::expert::backward_into(
                &cfg,
                g,
                &x,
                &dy,
                &p,
                &saved,
                &mut dx,
                &mut grads,
                &mut ws,
                bnorm::expert::BackwardOptions::from(par)
                    .epilogue(bnorm::expert::BackwardEpilogue::Relu { y: &plain.0 }),
            )
            .unwrap();
            (plain, dx, grads)
        })
    };
    let (a, b) = (run(1), run(16));
    assert!(a.0 .0 == b.0 .0, "training forward outputs differ");
    assert!(
        a.0 .1 == b.0 .1 && a.0 .2 == b.0 .2,
        "plain backward differs"
    );
    assert!(
        a.1 == b.1 && a.2 == b.2,
        "backward through the ReLU differs"
    );
}

/// `f` run inside a fresh rayon pool of `threads` threads.
fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}
