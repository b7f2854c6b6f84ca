//! Forward steps of the expert tier (`forward_into`, plain and with a ReLU epilogue) on the shapes
//! of `bnorm bench`, f32, caller buffers and a reused workspace. Throughput counts x read
//! and y written once.

mod common;

use bnorm::Mode;
use common::{run, Case, Shape, SAMPLES, SHAPES};
use divan::Bencher;

fn main() {
    divan::main();
}

/// Training forward: batch statistics, normalization, running-statistics update.
#[divan::bench(args = SHAPES, sample_count = SAMPLES, sample_size = 1)]
fn train(bencher: Bencher, shape: &Shape) {
    run(bencher, Case::new(shape), 2, |c| c.forward(Mode::Train));
}

/// Inference forward: normalization with the running statistics.
#[divan::bench(args = SHAPES, sample_count = SAMPLES, sample_size = 1)]
fn inference(bencher: Bencher, shape: &Shape) {
    run(bencher, Case::new(shape), 2, |c| c.forward(Mode::Inference));
}

/// Training forward fused with a ReLU.
#[divan::bench(args = SHAPES, sample_count = SAMPLES, sample_size = 1)]
fn train_relu(bencher: Bencher, shape: &Shape) {
    run(bencher, Case::new(shape), 2, Case::forward_relu);
}
