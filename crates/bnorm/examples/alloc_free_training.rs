//! A training loop that allocates nothing once warmed up, two ways:
//!
//! 1. with layers: `forward_into`, `backward_into` into buffers you keep, and
//!    `update_params` for the optimizer step (gamma and beta change in place);
//! 2. with the expert tier: several batch-norm layers of a network share one
//!    [`Workspace`] (scratch space, used by one call at a time) while each keeps its own
//!    [`Saved`] (what its backward needs) and its own parameters and running statistics.
//!
//! `cargo run --release -p bnorm --example alloc_free_training`
//! (tests/no_alloc.rs counts the allocations of both loops.)

use bnorm::expert::{backward_into, forward_into, Grads, Parallelism, Saved, Workspace};
use bnorm::{Config, Layout, Mode, Params, RunningState};

fn main() -> Result<(), bnorm::Error> {
    let shape = [8, 4, 6, 6]; // N, C, H, W
    let n: usize = shape.iter().product();
    let batch = |step: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 + step * 13) % 29) as f32 * 0.1 - 1.0)
            .collect()
    };
    let lr = 0.05;

    // 1. The layer: buffers allocated once, reused every step.
    let mut bn = Config::torch(4).build()?;
    let (mut y, mut dx, mut grads) = (vec![0f32; n], vec![0f32; n], Grads::default());
    for step in 0..20 {
        let x = batch(step);
        bn.forward_into(&x, &shape, Layout::NCHW, Mode::Train, &mut y)?;
        // the loss ½Σy² has dy = y
        bn.backward_into(&x, &y, &shape, Layout::NCHW, &mut dx, &mut grads)?;
        bn.update_params(|w, b| {
            for (p, g) in w.into_iter().flatten().zip(&grads.dweight) {
                *p -= lr * g;
            }
            for (p, g) in b.into_iter().flatten().zip(&grads.dbias) {
                *p -= lr * g;
            }
        })?;
    }
    let s = bn.running_state().expect("tracked");
    println!(
        "layer: after {} steps, gamma {:?}, running mean {:.3?}",
        s.updates,
        bn.params().weight.as_deref().unwrap_or(&[]),
        s.mean
    );

    // 2. Two layers of one network, one shared workspace, one Saved each.
    let g = Layout::NCHW.geometry(&shape)?;
    let cfg = Config::torch(4);
    let mut params = [Params::init(&cfg), Params::init(&cfg)];
    let mut states = [RunningState::init(&cfg), RunningState::init(&cfg)];
    let mut saved = [Saved::default(), Saved::default()];
    let mut ws = Workspace::default();
    let par = Parallelism::Rayon;
    let (mut h, mut out) = (vec![0f32; n], vec![0f32; n]);
    let (mut dh, mut dx) = (vec![0f32; n], vec![0f32; n]);
    let mut grads = [Grads::default(), Grads::default()];
    for step in 0..20 {
        let x = batch(step);
        // forward: x → bn0 → h → bn1 → out
        forward_into(
            &cfg,
            g,
            &x,
            &params[0],
            states[0].as_mut(),
            Mode::Train,
            &mut h,
            &mut saved[0],
            &mut ws,
            par,
        )?;
        forward_into(
            &cfg,
            g,
            &h,
            &params[1],
            states[1].as_mut(),
            Mode::Train,
            &mut out,
            &mut saved[1],
            &mut ws,
            par,
        )?;
        // backward in reverse order, each layer with its own saved statistics
        backward_into(
            &cfg,
            g,
            &h,
            &out,
            &params[1],
            &saved[1],
            &mut dh,
            &mut grads[1],
            &mut ws,
            par,
        )?;
        backward_into(
            &cfg,
            g,
            &x,
            &dh,
            &params[0],
            &saved[0],
            &mut dx,
            &mut grads[0],
            &mut ws,
            par,
        )?;
        // the expert tier's parameters are yours: update them in place
        for (p, gr) in params.iter_mut().zip(&grads) {
            if let Some(w) = p.weight.as_mut() {
                w.iter_mut()
                    .zip(&gr.dweight)
                    .for_each(|(w, g)| *w -= lr * g);
            }
            if let Some(b) = p.bias.as_mut() {
                b.iter_mut().zip(&gr.dbias).for_each(|(b, g)| *b -= lr * g);
            }
        }
    }
    println!(
        "two layers, one workspace: running means {:.3?} and {:.3?}",
        states[0].as_ref().map(|s| &s.mean),
        states[1].as_ref().map(|s| &s.mean)
    );
    Ok(())
}
