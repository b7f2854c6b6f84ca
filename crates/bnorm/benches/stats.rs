//! Statistics through the public API: exact per-channel moments of a batch merged into a
//! `Recalibration` (`Recalibration::add`), on the shapes of `bnorm bench`, f32.
//! Throughput counts x read once.

mod common;

use bnorm::Recalibration;
use common::{run, Case, Shape, SAMPLES, SHAPES};
use divan::Bencher;

fn main() {
    divan::main();
}

/// `Recalibration::add`: one batch's moments, merged.
#[divan::bench(args = SHAPES, sample_count = SAMPLES, sample_size = 1)]
fn recalibration_add(bencher: Bencher, shape: &Shape) {
    let case = Case::new(shape);
    let mut r = Recalibration::new(case.g.channels);
    run(bencher, case, 1, |c| c.recalibrate(&mut r));
}
