//! Where a BN-only training step through candle autograd spends its time (bnorm issue
//! #20: "163 ms for about 5 ms of kernel time"), on S1 (NCHW 32x64x56x56, f32).
//!
//! Each part is timed on its own, median of `RUNS` calls after a warm-up:
//!
//! * `kernel` — bnorm's forward and backward alone, caller buffers (the floor);
//! * `bnorm-candle forward` — the layer's `forward_t(x, true)` (custom op, running-statistics
//!   variables);
//! * `loss` — candle's `(y * dy).sum_all()` on that output;
//! * `backward` — `loss.backward()`: candle's gradients of the loss ops, then the layer's;
//! * `step` — all three, as `bnorm bench` times it;
//! * the same step with candle-nn's layer, and with no layer at all (`y = x`), which is
//!   candle's own cost of the loss and its gradients; the difference is the layer's share.
//!
//! In a training step candle keeps its tensors alive until the step ends, so every
//! output lands in memory the process has not touched before (page faults), unlike the
//! loops of the kernel rows, where glibc hands the freed buffer of the previous call
//! back.
//!
//! `cargo run --release -p bnorm-candle --example step_parts`
use std::hint::black_box;
use std::time::Instant;

use bnorm::{Config, Layout, Mode};
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

const RUNS: usize = 15;

fn median(mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..RUNS)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[RUNS / 2] * 1e3
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}

fn main() -> candle_core::Result<()> {
    let dims = [32usize, 64, 56, 56];
    let n: usize = dims.iter().product();
    let c = dims[1];
    let dev = Device::Cpu;
    let (xv, dyv) = (data(n, 1), data(n, 2));
    let x = Var::from_tensor(&Tensor::from_vec(xv.clone(), &dims, &dev)?)?;
    let dy = Tensor::from_vec(dyv.clone(), &dims, &dev)?;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let ours = bnorm_candle::BatchNorm::new(Config::torch(c), Layout::NCHW, vb.pp("ours"))?;
    let theirs = candle_nn::batch_norm(c, candle_nn::BatchNormConfig::default(), vb.pp("theirs"))?;

    // bnorm alone, caller buffers.
    let mut layer = Config::torch(c).build().map_err(candle_core::Error::wrap)?;
    let (mut y, mut dx) = (vec![0f32; n], vec![0f32; n]);
    let mut grads = bnorm::expert::Grads::default();
    let kernel = median(|| {
        layer
            .forward_into(&xv, &dims, Layout::NCHW, Mode::Train, &mut y)
            .expect("forward");
        layer
            .backward_into(&xv, &dyv, &dims, Layout::NCHW, &mut dx, &mut grads)
            .expect("backward");
        black_box(&dx);
    });
    println!("kernel (bnorm forward + backward, caller buffers): {kernel:.2} ms");
    // The backward alone into the same dx every call, then into a fresh output per call
    // while the earlier outputs stay alive (as in a candle step): a plain `vec!`,
    // `zeroed_buffer` (huge pages from 4 MB on), and the allocating tier.
    let bwd_into = median(|| {
        layer
            .backward_into(&xv, &dyv, &dims, Layout::NCHW, &mut dx, &mut grads)
            .expect("backward");
        black_box(&dx);
    });
    let mut kept: Vec<Vec<f32>> = Vec::new();
    let mut fresh = |alloc: &dyn Fn() -> Vec<f32>| {
        let t = median(|| {
            let mut d = alloc();
            layer
                .backward_into(&xv, &dyv, &dims, Layout::NCHW, &mut d, &mut grads)
                .expect("backward");
            kept.push(d);
        });
        kept.clear();
        t
    };
    let bwd_vec = fresh(&|| vec![0f32; n]);
    let bwd_huge = fresh(&|| bnorm::tuning::zeroed_buffer::<f32>(n));
    // The allocating tier's way (the layer's op since commit ce1c272): the backward writes
    // a fresh allocation's spare capacity, not zeroed (`empty_buffer`: huge pages too).
    let bwd_uninit = median(|| {
        let d = layer
            .backward(&xv, &dyv, &dims, Layout::NCHW)
            .expect("backward");
        kept.push(d.dx);
    });
    kept.clear();
    println!(
        "backward: into the same dx {bwd_into:.2} ms; into fresh memory: vec! {bwd_vec:.2} ms, \
         zeroed_buffer {bwd_huge:.2} ms, BatchNorm::backward (unzeroed) {bwd_uninit:.2} ms"
    );

    let parts = |name: &str, m: Option<&dyn ModuleT>| -> candle_core::Result<f64> {
        let fwd = |m: Option<&dyn ModuleT>| match m {
            Some(m) => m.forward_t(x.as_tensor(), true).expect("forward"),
            None => x.as_tensor().clone(),
        };
        let t_fwd = median(|| {
            black_box(fwd(m));
        });
        let y = fwd(m);
        let t_loss = median(|| {
            black_box((&y * &dy).and_then(|p| p.sum_all()).expect("loss"));
        });
        let t_bwd = median(|| {
            let loss = (fwd(m) * &dy).and_then(|p| p.sum_all()).expect("loss");
            black_box(loss.backward().expect("backward"));
        }) - t_fwd
            - t_loss;
        let t_step = median(|| {
            let loss = (fwd(m) * &dy).and_then(|p| p.sum_all()).expect("loss");
            black_box(loss.backward().expect("backward"));
        });
        println!(
            "{name:<14} step {t_step:7.2} ms = forward {t_fwd:6.2} + loss {t_loss:6.2} + backward {t_bwd:6.2} (step minus the two)"
        );
        Ok(t_step)
    };
    // candle's own pieces of those backward passes, on tensors of x's size: the
    // gradient of `sum_all` times `dy` (a broadcast multiply), the accumulation of one
    // gradient into the map of gradients (zeros, then add), and `ones_like` (the seed of
    // `y.backward()`).
    let one = Tensor::new(1f32, &dev)?;
    let t_bmul = median(|| {
        black_box((one.broadcast_as(&dims).expect("broadcast") * &dy).expect("mul"));
    });
    let t_acc = median(|| {
        black_box(dy.zeros_like().and_then(|z| z.add(&dy)).expect("add"));
    });
    let t_ones = median(|| {
        black_box(dy.ones_like().expect("ones"));
    });
    println!(
        "candle pieces: broadcast multiply {t_bmul:.2} ms, one gradient accumulation {t_acc:.2} ms, ones_like {t_ones:.2} ms"
    );
    // The layer's backward with the least of candle around it: `y.backward()` (seed
    // ones_like, the layer's op, x's gradient accumulated).
    let y = ours.forward_t(x.as_tensor(), true)?;
    let t_ybwd = median(|| {
        black_box(y.backward().expect("backward"));
    });
    println!(
        "bnorm-candle y.backward(): {t_ybwd:.2} ms (of which candle's seed and accumulation about {:.2} ms)",
        t_ones + t_acc
    );
    let t_ours = parts("bnorm-candle", Some(&ours))?;
    let t_theirs = parts("candle-nn", Some(&theirs))?;
    let t_none = parts("no layer", None)?;
    println!(
        "the layer's share of a step (step minus the step without a layer): bnorm-candle {:.2} ms, candle-nn {:.2} ms",
        t_ours - t_none,
        t_theirs - t_none
    );
    Ok(())
}
