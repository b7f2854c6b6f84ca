//! Median and best time of one training forward, inference forward or backward on a
//! benchmark shape (f32, or bf16/f16 with `DTYPE=bf16|f16`; both threads, 100 calls): a quick probe to compare two builds
//! side by side in the same minutes, which on a noisy machine says more than two
//! separate `bnorm bench` runs.
//!
//! Run: `cargo run --release -p bnorm --example step_time -- S1 train` (shapes S1, S2, S3,
//! S4, S5, or any as `LAYOUT:AxBx…`, e.g. `NCHW:32x256x14x14`; operations `train`, `infer`, `bwd`, `bwdrelu`: the backward through a ReLU). Shapes `C3` = NC (64, 1024) and
//! `C4` = NHWC (4, 16, 16, 64) are small enough to stay in L2 and run on one thread
//! (2000 calls): the arithmetic's cost without the memory's. With `HUGE=1` in the
//! environment every buffer comes from `bnorm::tuning::zeroed_buffer` (huge pages); with
//! `BWD=f32` the backward map runs in f32 (`BackwardArithmetic::F32`); with `DX_PAST_X=48`
//! dx starts 48 bytes past x modulo 4 KiB (the 4K-aliasing case of heap-adjacent tensors),
//! and with `DY_PAST_X=16` dy 16 bytes past x. With `COLD=1` a plain copy of as many
//! bytes as the operation moves runs (untimed) before each call, as in the paired ratio
//! of `bnorm bench`: the operation starts with its data out of the caches. With `ALLOC=1`
//! each call goes through the allocating tier instead (`BatchNorm::forward` /
//! `BatchNorm::backward`: a fresh output per call, dropped inside the timed interval), as
//! `bench/peers.py --alternate` compares it with PyTorch, which allocates its outputs too.

use bnorm::config::BackwardArithmetic;
use bnorm::element::Element;
use bnorm::expert::{backward_into, forward_into, Grads, Parallelism, Saved, Workspace};
use bnorm::{Config, Layout, Mode, Params, RunningState};
fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: step_time S1|S2|S3|S4|S5|C3|C4 train|infer|bwd|bwdrelu");
        std::process::exit(2);
    }
    let (layout, shape): (Layout, Vec<usize>) = match args[1].as_str() {
        "S4" => (Layout::NHWC, vec![32, 56, 56, 64]),
        "S3" => (Layout::NC, vec![4096, 1024]),
        "S1" => (Layout::NCHW, vec![32, 64, 56, 56]),
        "S2" => (Layout::NCHW, vec![32, 256, 14, 14]),
        "C3" => (Layout::NC, vec![64, 1024]),
        "C4" => (Layout::NHWC, vec![4, 16, 16, 64]),
        "S5" => (Layout::NCHW, vec![64, 128, 56, 56]),
        other => custom_shape(other).unwrap_or_else(|| {
            eprintln!(
                "unknown shape {other}: S1-S5, C3, C4 or LAYOUT:AxBx… (e.g. NCHW:32x256x14x14)"
            );
            std::process::exit(2)
        }),
    };
    let op = args[2].clone();
    // DTYPE=bf16|f16: 16-bit storage (f32 otherwise).
    match std::env::var("DTYPE").as_deref() {
        Ok("bf16") => run::<bnorm::element::bf16>(&args[1], layout, &shape, &op),
        Ok("f16") => run::<bnorm::element::f16>(&args[1], layout, &shape, &op),
        _ => run::<f32>(&args[1], layout, &shape, &op),
    }
}

/// Times `op` on `shape` in storage type `T` and prints the median and best call.
fn run<T: Element>(name: &str, layout: Layout, shape: &[usize], op: &str) {
    let g = layout.geometry(shape).unwrap();
    let n = g.len();
    // BWD=f32: the backward map in f32 (`BackwardArithmetic::F32`).
    let mut cfg = Config::torch(g.channels);
    if std::env::var("BWD").as_deref() == Ok("f32") {
        cfg = cfg.backward_arithmetic(BackwardArithmetic::F32);
    }
    let p = Params::init(&cfg);
    // HUGE=1: every buffer from `zeroed_buffer` (huge pages where the OS allows).
    let huge = std::env::var_os("HUGE").is_some();
    let buf = |n: usize| {
        if huge {
            bnorm::tuning::zeroed_buffer::<T>(n)
        } else {
            vec![T::from_f64(0.0); n]
        }
    };
    let (mut x, mut dy_buf) = (buf(n), buf(n + 1024));
    // DY_PAST_X=b: dy starts b bytes past x modulo 4 KiB (as DX_PAST_X below).
    let dy_at = past_x(&x, &dy_buf, "DY_PAST_X");
    let dy = &mut dy_buf[dy_at..dy_at + n];
    for (i, (xv, dv)) in x.iter_mut().zip(dy.iter_mut()).enumerate() {
        *xv = T::from_f32((i % 97) as f32 * 0.1 + 3.0);
        *dv = T::from_f32((i % 13) as f32 * 0.2 - 1.0);
    }
    let mut s = RunningState::init(&cfg);
    let (mut y, mut dx_buf) = (buf(n), buf(n + 1024));
    // DX_PAST_X=b: dx starts b bytes (a multiple of 4) past x modulo 4 KiB, as tensors
    // allocated one after another from a heap do (a few bytes apart): the streaming
    // kernels' 4K-aliasing case. Unset: 4 KiB-aligned offsets as fresh mappings give.
    let dx_at = past_x(&x, &dx_buf, "DX_PAST_X");
    let dx = &mut dx_buf[dx_at..dx_at + n];
    let (mut saved, mut ws, mut grads) = (Saved::default(), Workspace::default(), Grads::default());
    let in_cache = name.starts_with('C');
    let par = if in_cache {
        Parallelism::Sequential
    } else {
        Parallelism::Rayon
    };
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
        par,
    )
    .unwrap();
    let reps = if in_cache { 2000 } else { 100 };
    let mut ts = vec![];
    // COLD=1: the copy that evicts the operation's data before each call.
    let cold = std::env::var("COLD").is_ok_and(|v| v == "1");
    let k = if op.starts_with("bwd") { 3 } else { 2 };
    let (csrc, mut cdst) = if cold {
        (vec![1f32; n * k / 2], vec![0f32; n * k / 2])
    } else {
        (vec![], vec![])
    };
    // ALLOC=1: the allocating tier, through a layer that keeps its workspace.
    let alloc = std::env::var("ALLOC").is_ok_and(|v| v == "1");
    let mut layer = cfg.clone().build().unwrap();
    layer.set_parallelism(par);
    if alloc {
        layer.forward(&x, shape, layout, Mode::Train).unwrap();
    }
    for _ in 0..reps {
        if cold {
            use rayon::prelude::*;
            cdst.par_chunks_mut(1 << 15)
                .zip(csrc.par_chunks(1 << 15))
                .for_each(|(d, s)| d.copy_from_slice(s));
        }
        let t = std::time::Instant::now();
        if alloc {
            match op {
                "bwd" => drop(layer.backward(&x, dy, shape, layout).unwrap()),
                "bwdrelu" => drop(
                    layer
                        .backward_relu(&x, &y, dy, shape, layout, false)
                        .unwrap(),
                ),
                "train" => drop(layer.forward(&x, shape, layout, Mode::Train).unwrap()),
                _ => drop(layer.forward(&x, shape, layout, Mode::Inference).unwrap()),
            }
        } else if op == "bwd" {
            backward_into(&cfg, g, &x, dy, &p, &saved, dx, &mut grads, &mut ws, par).unwrap();
        } else if op == "bwdrelu" {
            // Through a ReLU whose output was y (the training forward's output above:
            // about half of it positive).
            bnorm::expert::backward_into(
                &cfg,
                g,
                &x,
                dy,
                &p,
                &saved,
                dx,
                &mut grads,
                &mut ws,
                bnorm::expert::BackwardOptions::from(par)
                    .epilogue(bnorm::expert::BackwardEpilogue::Relu { y: &y }),
            )
            .unwrap();
        } else {
            forward_into(
                &cfg,
                g,
                &x,
                &p,
                s.as_mut(),
                if op == "train" {
                    Mode::Train
                } else {
                    Mode::Inference
                },
                &mut y,
                &mut saved,
                &mut ws,
                par,
            )
            .unwrap();
        }
        ts.push(t.elapsed().as_secs_f64());
    }
    ts.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{} {} median {:.3} ms min {:.3} ms",
        name,
        op,
        ts[reps / 2] * 1e3,
        ts[0] * 1e3
    );
}

/// A shape given as `LAYOUT:AxBx…`, e.g. `NCHW:32x256x14x14` (the layouts by their
/// names: NC, NCL, NLC, NCHW, NHWC, NCDHW, NDHWC).
fn custom_shape(spec: &str) -> Option<(Layout, Vec<usize>)> {
    let (layout, dims) = spec.split_once(':')?;
    let layout = match layout {
        "NC" => Layout::NC,
        "NCL" => Layout::NCL,
        "NLC" => Layout::NLC,
        "NCHW" => Layout::NCHW,
        "NHWC" => Layout::NHWC,
        "NCDHW" => Layout::NCDHW,
        "NDHWC" => Layout::NDHWC,
        _ => return None,
    };
    let dims = dims
        .split('x')
        .map(|d| d.parse().ok())
        .collect::<Option<Vec<usize>>>()?;
    Some((layout, dims))
}

/// The index in `buf` (1024 values longer than needed) at which a tensor starts the
/// number of bytes past `x` modulo 4 KiB that the environment variable `var` gives (a
/// multiple of 4); 0 when it is unset.
fn past_x<T>(x: &[T], buf: &[T], var: &str) -> usize {
    match std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(b) => {
            let want = (x.as_ptr() as usize + b) % 4096;
            ((want + 4096 - buf.as_ptr() as usize % 4096) % 4096) / std::mem::size_of::<T>()
        }
        None => 0,
    }
}
