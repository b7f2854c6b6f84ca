//! The classic question, answered: train a batch-norm layer for a few steps (batch
//! statistics, running statistics updated), then switch to inference (running statistics,
//! nothing updated) and normalize a single example.
//!
//! Run: `cargo run --release -p bnorm --example train_then_infer`

use bnorm::{Config, Layout, Mode};

fn main() -> Result<(), bnorm::Error> {
    // Four channels, channels-first images, PyTorch semantics (momentum 0.1, unbiased).
    let mut bn = Config::torch(4).build()?;
    let shape = [16, 4, 3, 3]; // N, C, H, W
    let len: usize = shape.iter().product();

    // Training: each batch has channel means 10, 20, 30, 40 and spread 2.
    let mut seed = 1u64;
    let mut noise = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 2.0 * 3f64.sqrt() * 2.0
    };
    for step in 1..=50 {
        let x: Vec<f32> = (0..len)
            .map(|i| (10.0 * ((i / 9) % 4 + 1) as f64 + noise()) as f32)
            .collect();
        let (_, report) = bn.forward(&x, &shape, Layout::NCHW, Mode::Train)?;
        if step % 10 == 0 {
            let s = bn.running_state().expect("tracked");
            println!(
                "step {step:>2}: running mean {:?}  running var {:?}  (updated: {})",
                round(&s.mean),
                round(&s.var),
                report.updated
            );
        }
    }

    // Inference on a single example: only possible with running statistics.
    let one: Vec<f32> = [10.0f32, 20.0, 30.0, 44.0]
        .iter()
        .flat_map(|&v| [v; 9])
        .collect();
    let before = bn.running_state().cloned();
    let (y, _) = bn.forward(&one, &[1, 4, 3, 3], Layout::NCHW, Mode::Inference)?;
    assert_eq!(
        bn.running_state().cloned(),
        before,
        "inference never updates"
    );
    println!(
        "inference on one example (channel means 10, 20, 30, 44): y = {:?}",
        [y[0], y[9], y[18], y[27]]
    );
    // The wrong way: training mode normalizes the example against itself.
    let (y, _) = bn.forward(&one, &[1, 4, 3, 3], Layout::NCHW, Mode::Train)?;
    println!(
        "training mode on that example: y = {:?} (normalized against itself: the signal is gone)",
        [y[0], y[9], y[18], y[27]]
    );
    // And with one value per channel there are no batch statistics at all.
    let flat = [10.0f32, 20.0, 30.0, 44.0];
    if let Err(e) = bn.forward(&flat, &[1, 4], Layout::NC, Mode::Train) {
        println!("training mode on one (N, C) row is refused: {e}");
    }
    Ok(())
}

fn round(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| (x * 100.0).round() / 100.0).collect()
}
