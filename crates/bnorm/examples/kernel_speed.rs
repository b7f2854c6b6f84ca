//! In-cache throughput of the kernels at every SIMD level (single thread, a 64 KB
//! channel-first input that stays in L2): separates arithmetic cost from memory traffic.
//!
//! Run: `cargo run --release -p bnorm --example kernel_speed`

use std::time::Instant;

use bnorm::expert::{backward_into, forward_into, Grads, Parallelism, Saved, Workspace};
use bnorm::tuning::{with_simd_level, SimdLevel};
use bnorm::{Config, Layout, Mode, Params, RunningState};

fn best_of<F: FnMut()>(runs: usize, mut f: F) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    for (layout, shape) in [
        (Layout::NCHW, [2usize, 4, 32, 64]),
        (Layout::NCHW, [2, 4, 64, 128]),
        (Layout::NHWC, [2, 32, 64, 4]),
        (Layout::NHWC, [2, 8, 16, 64]),
    ] {
        let g = layout.geometry(&shape).expect("valid shape");
        let n = g.len();
        let cfg = Config::torch(g.channels);
        let p = Params::init(&cfg);
        let x: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.1 + 3.0).collect();
        let dy: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 0.2 - 1.0).collect();
        for level in SimdLevel::supported() {
            with_simd_level(level, || {
                let mut s = RunningState::init(&cfg);
                let (mut y, mut dx) = (vec![0f32; n], vec![0f32; n]);
                let (mut saved, mut ws, mut grads) =
                    (Saved::default(), Workspace::default(), Grads::default());
                let seq = Parallelism::Sequential;
                let reps = 200;
                let mut run = |mode: Mode| {
                    best_of(reps, || {
                        forward_into(
                            &cfg,
                            g,
                            &x,
                            &p,
                            s.as_mut(),
                            mode,
                            &mut y,
                            &mut saved,
                            &mut ws,
                            seq,
                        )
                        .expect("valid");
                    })
                };
                let (tt, ti) = (run(Mode::Train), run(Mode::Inference));
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
                    seq,
                )
                .expect("valid");
                let tb = best_of(reps, || {
                    backward_into(
                        &cfg, g, &x, &dy, &p, &saved, &mut dx, &mut grads, &mut ws, seq,
                    )
                    .expect("valid");
                });
                let ge = |t: f64| n as f64 / t / 1e9;
                println!(
                    "{layout:<5} {:<7} train {:>6.2}  infer {:>6.2}  backward {:>6.2}  G elements/s",
                    level.name(),
                    ge(tt),
                    ge(ti),
                    ge(tb)
                );
            });
        }
    }
}
