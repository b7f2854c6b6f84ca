//! Backward steps of the expert tier (`backward_into`, plain and through a ReLU) on the
//! shapes of `bnorm bench`, f32, caller buffers and a reused workspace, from the saved
//! statistics of one training forward. Throughput counts each input read and dx written
//! once (backward: x, dy, dx; through the ReLU also y).

mod common;

use bnorm::Mode;
use common::{run, Case, Shape, SAMPLES, SHAPES};
use divan::Bencher;

fn main() {
    divan::main();
}

/// Backward of the training forward.
#[divan::bench(args = SHAPES, sample_count = SAMPLES, sample_size = 1)]
fn backward(bencher: Bencher, shape: &Shape) {
    let mut case = Case::new(shape);
    case.forward(Mode::Train);
    run(bencher, case, 3, Case::backward);
}

/// Backward through the fused ReLU (its mask from the forward's output y).
#[divan::bench(args = SHAPES, sample_count = SAMPLES, sample_size = 1)]
fn backward_relu(bencher: Bencher, shape: &Shape) {
    let mut case = Case::new(shape);
    case.forward_relu();
    run(bencher, case, 4, Case::backward_relu);
}
