//! Every instruction-set path of the kernels, directly against the float64 reference and
//! against each other, on sizes that hit every tail: per-channel runs from 1 to several
//! vector widths and blocks, channel counts across the channel-group width, odd shapes.
#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

mod common;

use bnorm::config::BackwardArithmetic;
use bnorm::element::{bf16, f16, Element};
use bnorm::expert::{backward_into, forward_into, Grads, Parallelism, Saved, Workspace};
use bnorm::tuning::{with_simd_level, SimdLevel};
use bnorm::{reference, Config, Layout, Mode, Params, RunningState};
use common::{assert_close, Rng};

/// One training step and its backward, sequentially on this thread at `level`.
fn step<T: Element>(
    level: SimdLevel,
    cfg: &Config,
    layout: Layout,
    shape: &[usize],
    x: &[T],
    dy: &[T],
) -> (Vec<T>, Vec<T>, Grads, RunningState) {
    with_simd_level(level, || {
        let g = layout.geometry(shape).unwrap();
        let p = Params::init(cfg);
        let mut s = RunningState::init(cfg);
        let (mut y, mut dx) = (
            vec![T::from_f64(0.0); x.len()],
            vec![T::from_f64(0.0); x.len()],
        );
        let (mut saved, mut ws, mut grads) =
            (Saved::default(), Workspace::default(), Grads::default());
        forward_into(
            cfg,
            g,
            x,
            &p,
            s.as_mut(),
            Mode::Train,
            &mut y,
            &mut saved,
            &mut ws,
            Parallelism::Sequential,
        )
        .unwrap();
        backward_into(
            cfg,
            g,
            x,
            dy,
            &p,
            &saved,
            &mut dx,
            &mut grads,
            &mut ws,
            Parallelism::Sequential,
        )
        .unwrap();
        (y, dx, grads, s.unwrap())
    })
}

fn sweep<T: Element>(tol: f64) {
    let levels = common::simd_levels();
    let mut ran = Vec::new();
    let mut shapes: Vec<(Layout, Vec<usize>)> = Vec::new();
    for inner in [
        1usize, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 2047, 2049,
    ] {
        shapes.push((Layout::NCL, vec![2, 3, inner]));
    }
    for c in [1usize, 2, 3, 7, 8, 9, 15, 16, 17, 32, 33, 63, 64, 65, 129] {
        shapes.push((Layout::NC, vec![5, c]));
        shapes.push((Layout::NLC, vec![2, 3, c]));
    }
    // Channels-last over 32 channels or more (not 64): 19 rows are two 8-row groups of
    // the statistics and three rows after them, nine row pairs of the sums through a
    // ReLU and one after them.
    for c in [33usize, 65, 129] {
        shapes.push((Layout::NC, vec![19, c]));
    }
    shapes.push((Layout::NCHW, vec![3, 5, 7, 9]));
    shapes.push((Layout::NDHWC, vec![2, 3, 5, 7, 11]));
    let cases = shapes
        .iter()
        .enumerate()
        .flat_map(|s| [BackwardArithmetic::F64, BackwardArithmetic::F32].map(move |a| (s, a)));
    for ((i, (layout, shape)), arith) in cases {
        let c = shape[layout.channel_axis()];
        let cfg = Config::torch(c).backward_arithmetic(arith);
        let n: usize = shape.iter().product();
        let mut rng = Rng(i as u64 + 1);
        let x: Vec<T> = rng.stored(n, 50.0, 3.0);
        let dy: Vec<T> = rng.stored(n, 0.0, 1.0);
        let xw: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
        let dyw: Vec<f64> = dy.iter().map(|v| v.to_f64()).collect();
        let p = Params::init(&cfg);
        let r = reference::forward(
            &cfg,
            *layout,
            shape,
            &xw,
            &p,
            RunningState::init(&cfg).as_ref(),
            Mode::Train,
        )
        .unwrap();
        let rb = reference::backward(&cfg, *layout, shape, &xw, &dyw, &p, &r).unwrap();
        let base = step(SimdLevel::Scalar, &cfg, *layout, shape, &x, &dy);
        for &level in &levels {
            ran.push(level);
            let (y, dx, grads, s) = step(level, &cfg, *layout, shape, &x, &dy);
            let ctx = format!("{} {layout} {shape:?} {level:?} {arith:?}", T::DTYPE);
            let w = |v: &[T]| v.iter().map(|e| e.to_f64()).collect::<Vec<_>>();
            assert_close(&format!("{ctx} y"), &w(&y), &r.y, tol, tol);
            let mut scale = rb.dx.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            if arith == BackwardArithmetic::F32 {
                // The f32 map's errors scale with its terms, |γ|/σ·|dy| (and as much
                // again from the x̂ term), not with dx.
                let max_dy = dyw.iter().fold(0.0f64, |a, v| a.max(v.abs()));
                for ch in 0..c {
                    let sd = (r.var[0][ch] + cfg.get_eps()).sqrt();
                    scale = scale.max(2.0 * p.gamma(ch).abs() / sd * max_dy);
                }
            }
            assert_close(&format!("{ctx} dx"), &w(&dx), &rb.dx, tol * scale, tol);
            assert_close(
                &format!("{ctx} dweight"),
                &grads.dweight,
                &rb.dweight,
                1e-9 * n as f64,
                1e-9,
            );
            assert_close(
                &format!("{ctx} running_var"),
                &s.var,
                &r.state.as_ref().unwrap().var,
                1e-12,
                1e-10,
            );
            // and bitwise equal to the scalar path
            assert!(
                y == base.0 && dx == base.1 && grads == base.2 && s == base.3,
                "{ctx}: differs from the scalar path"
            );
        }
    }
    common::simd_ran(&format!("simd_paths {}", T::DTYPE), &ran);
}

/// `BNORM_REQUIRE_SIMD` turns a level the CPU lacks, or an unknown name, into an error.
#[test]
fn require_simd_refuses_missing_and_unknown_levels() {
    use common::required_simd_levels as req;
    let avx2_cpu = [SimdLevel::Scalar, SimdLevel::Avx2];
    assert_eq!(req("", &avx2_cpu), Ok(vec![]));
    assert_eq!(
        req(" avx2 ,scalar,", &avx2_cpu),
        Ok(vec![SimdLevel::Avx2, SimdLevel::Scalar])
    );
    let e = req("avx2,avx512", &avx2_cpu).unwrap_err();
    assert!(
        e.contains("requires SIMD level avx512") && e.contains("only scalar, avx2"),
        "{e}"
    );
    let e = req("avx2,avx3", &avx2_cpu).unwrap_err();
    assert!(e.contains("unknown SIMD level \"avx3\""), "{e}");
}

#[test]
fn every_simd_level_matches_the_reference_f32() {
    sweep::<f32>(2e-6);
}

#[test]
fn every_simd_level_matches_the_reference_f64() {
    sweep::<f64>(1e-12);
}

#[test]
fn every_simd_level_matches_the_reference_16_bit() {
    sweep::<bf16>(2e-2);
    sweep::<f16>(2e-3);
}

/// The fused channels-first training forward and backward (chosen with few threads per
/// channel group) and the two-pass ones (chosen with many) give the same bits, and both
/// match the float64 reference — with a last group smaller than the others.
#[test]
fn fused_and_unfused_training_steps_agree_bitwise() {
    for c in [8usize, 18] {
        let shape = [6, c, 30, 35];
        let n: usize = shape.iter().product();
        let mut rng = Rng(5 + c as u64);
        let x: Vec<f32> = rng.vec(n, 1e4, 1.0).iter().map(|&v| v as f32).collect();
        let dy: Vec<f32> = rng.vec(n, 0.0, 1.0).iter().map(|&v| v as f32).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut bn = Config::keras(c).build().unwrap();
                let (y, _) = bn.forward(&x, &shape, Layout::NCHW, Mode::Train).unwrap();
                let b = bn.backward(&x, &dy, &shape, Layout::NCHW).unwrap();
                (
                    y,
                    b.dx,
                    b.dweight,
                    b.dbias,
                    bn.running_state().unwrap().clone(),
                )
            })
        };
        let fused = run(1); // c/4 groups >= 2 × 1 thread: fused forward and backward
        let unfused = run(16); // fewer groups than 2 × 16 threads: two passes
        assert!(fused == unfused, "C = {c}: fused and two-pass steps differ");
        let cfg = Config::keras(c);
        let xw: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let dyw: Vec<f64> = dy.iter().map(|&v| v as f64).collect();
        let p = Params::init(&cfg);
        let r = reference::forward(
            &cfg,
            Layout::NCHW,
            &shape,
            &xw,
            &p,
            RunningState::init(&cfg).as_ref(),
            Mode::Train,
        )
        .unwrap();
        let rb = reference::backward(&cfg, Layout::NCHW, &shape, &xw, &dyw, &p, &r).unwrap();
        let w = |v: &[f32]| v.iter().map(|&e| e as f64).collect::<Vec<_>>();
        assert_close("y", &w(&fused.0), &r.y, 2e-6, 2e-6);
        let scale = rb.dx.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        assert_close("dx", &w(&fused.1), &rb.dx, 2e-6 * scale, 2e-6);
        assert_close(
            "dweight",
            fused.2.as_ref().unwrap(),
            &rb.dweight,
            1e-6,
            1e-9,
        );
        assert_close("dbias", fused.3.as_ref().unwrap(), &rb.dbias, 1e-6, 1e-9);
    }
}
