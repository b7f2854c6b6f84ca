//! Outputs of 16 MB and more are written with streaming (non-temporal) stores where the
//! CPU has them. They must give exactly the bits of the ordinary path: every layout
//! family (channels-first runs, channels-last rows with a coefficient period that does
//! not divide the vector width, wide rows), misaligned outputs, training, inference,
//! ReLU and backward (with the backward map in f64 and in f32), sequential and threaded,
//! against the scalar level (which never streams).

mod common;

use bnorm::config::BackwardArithmetic;
use bnorm::expert::{backward_into, forward_into, Grads, Parallelism, Saved, Workspace};
use bnorm::tuning::{simd_level, with_simd_level, SimdLevel};
use bnorm::{Config, Layout, Mode, Params, RunningState};

/// Where the outputs go.
#[derive(Clone, Copy, Debug)]
enum Place {
    /// This many elements into a fresh buffer (misaligned when odd).
    Offset(usize),
    /// This many bytes past `x` modulo 4 KiB: outputs just past their inputs make the
    /// streaming kernels run downwards (away from 4K aliasing).
    PastX(usize),
}

/// The index in `buf` whose address is `addr` modulo 4 KiB (`addr` a multiple of 4).
fn start_at(buf: &[f32], addr: usize) -> usize {
    let have = buf.as_ptr() as usize % 4096;
    ((addr % 4096 + 4096 - have) % 4096) / 4
}

/// (train y, inference y, train+ReLU y, dx, train add+ReLU y, dx and d_residual through
/// it, dx through the plain ReLU), each written where `place` says.
fn run(
    layout: Layout,
    shp: &[usize],
    x: &[f32],
    dy: &[f32],
    place: Place,
    par: Parallelism,
    arith: BackwardArithmetic,
) -> [Vec<f32>; 8] {
    let g = layout.geometry(shp).unwrap();
    let n = g.len();
    let cfg = Config::torch(g.channels).backward_arithmetic(arith);
    let p = Params {
        weight: Some((0..g.channels).map(|c| 0.75 + 0.01 * c as f64).collect()),
        bias: Some((0..g.channels).map(|c| 0.1 - 0.02 * c as f64).collect()),
    };
    let mut state = RunningState::init(&cfg);
    let (mut saved, mut ws, mut grads) = (Saved::default(), Workspace::default(), Grads::default());
    let out = |f: &mut dyn FnMut(&mut [f32])| {
        let mut buf = vec![0f32; n + 1024];
        let k = match place {
            Place::Offset(k) => k,
            Place::PastX(b) => start_at(&buf, x.as_ptr() as usize + b),
        };
        f(&mut buf[k..k + n]);
        buf.drain(..k);
        buf.truncate(n);
        buf
    };
    let relu = out(&mut |y| {
        bnorm::expert::forward_into(
            &cfg,
            g,
            x,
            &p,
            state.as_mut(),
            Mode::Train,
            y,
            &mut saved,
            &mut ws,
            bnorm::expert::Options::from(par).epilogue(bnorm::expert::Epilogue::Relu),
        )
        .unwrap();
    });
    let infer = out(&mut |y| {
        forward_into(
            &cfg,
            g,
            x,
            &p,
            state.as_mut(),
            Mode::Inference,
            y,
            &mut saved,
            &mut ws,
            par,
        )
        .unwrap();
    });
    let train = out(&mut |y| {
        forward_into(
            &cfg,
            g,
            x,
            &p,
            state.as_mut(),
            Mode::Train,
            y,
            &mut saved,
            &mut ws,
            par,
        )
        .unwrap();
    });
    let dx = out(&mut |dx| {
        backward_into(&cfg, g, x, dy, &p, &saved, dx, &mut grads, &mut ws, par).unwrap();
    });
    // Through the ReLU: the residual is dy reversed, so it differs from x and dy.
    let res: Vec<f32> = dy.iter().rev().copied().collect();
    let add_relu = out(&mut |y| {
        bnorm::expert::forward_into(
            &cfg,
            g,
            x,
            &p,
            state.as_mut(),
            Mode::Train,
            y,
            &mut saved,
            &mut ws,
            bnorm::expert::Options::from(par).epilogue(bnorm::expert::Epilogue::AddRelu(&res)),
        )
        .unwrap();
    });
    let mut dres = vec![0f32; n];
    let dx_add = out(&mut |dx| {
        bnorm::expert::backward_into(
            &cfg,
            g,
            x,
            dy,
            &p,
            &saved,
            dx,
            &mut grads,
            &mut ws,
            bnorm::expert::BackwardOptions::from(par).epilogue(
                bnorm::expert::BackwardEpilogue::AddRelu {
                    y: &add_relu,
                    dresidual: &mut dres,
                },
            ),
        )
        .unwrap();
    });
    let dx_relu = out(&mut |dx| {
        bnorm::expert::backward_into(
            &cfg,
            g,
            x,
            dy,
            &p,
            &saved,
            dx,
            &mut grads,
            &mut ws,
            bnorm::expert::BackwardOptions::from(par)
                .epilogue(bnorm::expert::BackwardEpilogue::Relu { y: &add_relu }),
        )
        .unwrap();
    });
    [train, infer, relu, dx, add_relu, dx_add, dres, dx_relu]
}

fn check(layout: Layout, shp: &[usize], offset: usize) {
    let (x, dy) = inputs(shp);
    check_with(layout, shp, &x, &dy, Place::Offset(offset));
}

/// x and dy for `shp`: distinct, varied values.
fn inputs(shp: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let n: usize = shp.iter().product();
    assert!(
        n * 4 >= 16 << 20,
        "the output must be large enough to stream"
    );
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1009) as f32) * 0.01 - 3.0 + (i % 13) as f32)
        .collect();
    let dy: Vec<f32> = (0..n)
        .map(|i| ((i * 104_729 % 997) as f32) * 0.002 - 1.0)
        .collect();
    (x, dy)
}

fn check_with(layout: Layout, shp: &[usize], x: &[f32], dy: &[f32], place: Place) {
    let mut dx = vec![];
    let mut ran = vec![SimdLevel::Scalar];
    for arith in [BackwardArithmetic::F64, BackwardArithmetic::F32] {
        let want = with_simd_level(SimdLevel::Scalar, || {
            run(layout, shp, x, dy, place, Parallelism::Sequential, arith)
        });
        ran.extend(compare(layout, shp, x, dy, place, arith, &want));
        dx.push(want[3].clone());
    }
    // The two arithmetics are different paths (a few dx differ in the last bits).
    assert!(dx[0] != dx[1], "the f32 backward map was not used");
    common::simd_ran(&format!("streaming {layout} {shp:?} {place:?}"), &ran);
}

/// Every level above scalar the CPU has, forced, sequentially (AVX2 has its own
/// streaming kernels where the CPU also has AVX-512), then the process-wide level
/// threaded, against `want`. Returns the levels it ran.
fn compare(
    layout: Layout,
    shp: &[usize],
    x: &[f32],
    dy: &[f32],
    place: Place,
    arith: BackwardArithmetic,
    want: &[Vec<f32>; 8],
) -> Vec<SimdLevel> {
    let mut runs: Vec<(Option<SimdLevel>, Parallelism)> = common::simd_levels()
        .into_iter()
        .filter(|&l| l != SimdLevel::Scalar)
        .map(|l| (Some(l), Parallelism::Sequential))
        .collect();
    runs.push((None, Parallelism::Rayon));
    let mut ran = vec![];
    for (level, par) in runs {
        ran.push(level.unwrap_or_else(simd_level));
        let got = match level {
            Some(l) => with_simd_level(l, || run(layout, shp, x, dy, place, par, arith)),
            None => run(layout, shp, x, dy, place, par, arith),
        };
        let names = [
            "train y",
            "inference y",
            "relu y",
            "dx",
            "add+relu y",
            "dx through add+relu",
            "d_residual",
            "dx through relu",
        ];
        for (what, (g, w)) in names.iter().zip(got.iter().zip(want)) {
            let bad = g
                .iter()
                .zip(w)
                .position(|(a, b)| a.to_bits() != b.to_bits());
            assert_eq!(
                bad, None,
                "{layout} {shp:?} {place:?} {level:?} {par:?} {arith:?} {what}: differs from the scalar path"
            );
        }
    }
    ran
}

#[test]
fn streaming_channels_first_matches_scalar() {
    check(Layout::NCHW, &[3, 5, 700, 401], 1);
    // runs of 196 values (14×14), not a multiple of the vector width: every run has a
    // streamed head and tail, the line it shares with the next run filled by both
    check(Layout::NCHW, &[2700, 8, 14, 14], 3);
}

#[test]
fn streaming_channels_last_small_c_matches_scalar() {
    // C = 3: coefficient runs of 513 values, not a multiple of the vector width.
    check(Layout::NHWC, &[1, 1000, 1403, 3], 3);
}

#[test]
fn streaming_wide_rows_matches_scalar() {
    check(Layout::NC, &[4100, 1027], 0);
}

#[test]
fn streaming_row_blocked_channels_last_matches_scalar() {
    // C a multiple of 16: the AVX-512 backward maps take rows in blocks (coefficients
    // loaded once per block). C = 48 has a coefficient run of 528 values; the odd offset
    // shifts the rows against the 64-byte lines, so each task ends with a partial block
    // and 8-value steps before its scalar tail.
    check(Layout::NHWC, &[3, 997, 35, 48], 5);
}

#[test]
fn streaming_row_blocked_wide_rows_matches_scalar() {
    // C = 1040 (65 × 16, run = C): blocks whose second coefficient half reaches into the
    // table's wrap-around repeat, an odd row count, a misaligned output. C = 1032 (129 ×
    // 8, not a multiple of 16): the 8-channel blocks on every level, aligned output.
    // Both ask the L2 for the rows ahead in the backward maps (C >= 512), up to the end
    // of each task's rows.
    check(Layout::NC, &[4099, 1040], 7);
    check(Layout::NC, &[4099, 1032], 0);
}

#[test]
fn streaming_downwards_matches_scalar() {
    // x at the start of a 4 KiB page, dy 16 bytes past one, every output 48 bytes past
    // x: an upward loop would keep loading where it just stored (4K aliasing), so the
    // streaming kernels run downwards. Channels-first runs (one coefficient set),
    // channels-last rows in blocks (C = 48) with their tails, and rows of C = 1040, for
    // which the backward maps also ask the L2 for the rows ahead (below them here).
    for (layout, shp) in [
        (Layout::NCHW, &[3, 5, 700, 401][..]),
        (Layout::NCHW, &[2700, 8, 14, 14][..]),
        (Layout::NHWC, &[3, 997, 35, 48][..]),
        (Layout::NC, &[4099, 1040][..]),
    ] {
        let (x0, dy0) = inputs(shp);
        let n = x0.len();
        let mut xb = vec![0f32; n + 1024];
        let mut db = vec![0f32; n + 1024];
        let (kx, kd) = (start_at(&xb, 0), start_at(&db, 16));
        xb[kx..kx + n].copy_from_slice(&x0);
        db[kd..kd + n].copy_from_slice(&dy0);
        let (x, dy) = (&xb[kx..kx + n], &db[kd..kd + n]);
        check_with(layout, shp, x, dy, Place::PastX(48));
    }
}
