//! Shared by the benchmarks: the shapes of `bnorm bench` (crates/bnorm-cli/src/bench.rs)
//! in f32, their buffers, and one helper per operation, the only place each benchmark
//! calls the expert-tier API (so a change of its signatures is made here).
#![allow(dead_code)]

use std::fmt;

use bnorm::expert::{
    backward_into, forward_into, BackwardEpilogue, BackwardOptions, Epilogue, Geometry, Grads,
    Options, Parallelism, Saved, Workspace,
};
use bnorm::{Config, Layout, Mode, Params, Recalibration, RunningState};
use divan::{counter::BytesCount, Bencher};

// `Shape` and `SHAPES` (S1–S5), shared with `bnorm bench`.
include!("shapes.rs");

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.dims.iter().map(|d| d.to_string()).collect();
        write!(f, "{} {} ({})", self.name, self.layout, dims.join(","))
    }
}

/// Timed calls per benchmark (one call per sample, after an untimed one): S5's tensors
/// are 100 MB each, and a whole `cargo bench -p bnorm` runs for well under a minute on
/// two cores. Override with `-- --sample-count N` (or `DIVAN_SAMPLE_COUNT=N`).
pub const SAMPLES: u32 = 30;

/// Times `op` on `case` (after one untimed call, which touches the output pages and
/// sizes the workspace), with the throughput of `arrays` tensors of its shape read or
/// written once each (the accounting of `bnorm bench`).
pub fn run(bencher: Bencher, mut case: Case, arrays: usize, mut op: impl FnMut(&mut Case)) {
    op(&mut case);
    let bytes = arrays * case.x.len() * std::mem::size_of::<f32>();
    bencher
        .counter(BytesCount::new(bytes))
        .bench_local(|| op(&mut case));
}

/// `n` pseudo-random values in [1, 5), as `bnorm bench` makes them.
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 40) as f64 / (1u64 << 24) as f64) * 4.0 + 1.0) as f32
        })
        .collect()
}

/// Everything one operation needs on one shape, allocated once: PyTorch's convention,
/// the inputs, the caller's output buffers and a reused workspace; the threads of rayon's
/// pool, as `bnorm bench` runs them.
pub struct Case {
    pub cfg: Config,
    pub g: Geometry,
    pub params: Params,
    pub state: Option<RunningState>,
    pub x: Vec<f32>,
    pub dy: Vec<f32>,
    pub y: Vec<f32>,
    pub dx: Vec<f32>,
    pub saved: Saved,
    pub grads: Grads,
    pub ws: Workspace,
    pub par: Parallelism,
}

impl Case {
    pub fn new(shape: &Shape) -> Case {
        let g = shape.layout.geometry(shape.dims).expect("a valid shape");
        let n = g.len();
        let cfg = Config::torch(g.channels);
        Case {
            params: Params::init(&cfg),
            state: RunningState::init(&cfg),
            cfg,
            g,
            x: data(n, 1),
            dy: data(n, 2),
            y: vec![0.0; n],
            dx: vec![0.0; n],
            saved: Saved::default(),
            grads: Grads::default(),
            ws: Workspace::default(),
            par: Parallelism::Rayon,
        }
    }

    /// `forward_into` in `mode` (training updates the running statistics): x → y.
    pub fn forward(&mut self, mode: Mode) {
        forward_into(
            &self.cfg,
            self.g,
            &self.x,
            &self.params,
            self.state.as_mut(),
            mode,
            &mut self.y,
            &mut self.saved,
            &mut self.ws,
            self.par,
        )
        .expect("valid input");
    }

    /// `forward_into` with a ReLU epilogue, training, without a residual: x → relu(bn(x)) in y.
    pub fn forward_relu(&mut self) {
        forward_into(
            &self.cfg,
            self.g,
            &self.x,
            &self.params,
            self.state.as_mut(),
            Mode::Train,
            &mut self.y,
            &mut self.saved,
            &mut self.ws,
            Options::from(self.par).epilogue(Epilogue::Relu),
        )
        .expect("valid input");
    }

    /// `backward_into` from the saved statistics of the last training forward: x, dy → dx.
    pub fn backward(&mut self) {
        backward_into(
            &self.cfg,
            self.g,
            &self.x,
            &self.dy,
            &self.params,
            &self.saved,
            &mut self.dx,
            &mut self.grads,
            &mut self.ws,
            self.par,
        )
        .expect("valid input");
    }

    /// `backward_into` through the ReLU after [`Case::forward_relu`], without a residual: x, y, dy → dx.
    pub fn backward_relu(&mut self) {
        backward_into(
            &self.cfg,
            self.g,
            &self.x,
            &self.dy,
            &self.params,
            &self.saved,
            &mut self.dx,
            &mut self.grads,
            &mut self.ws,
            BackwardOptions::from(self.par).epilogue(BackwardEpilogue::Relu { y: &self.y }),
        )
        .expect("valid input");
    }

    /// `Recalibration::add`: the exact per-channel moments of x, merged into `r`.
    pub fn recalibrate(&self, r: &mut Recalibration) {
        r.add(self.g, &self.x).expect("valid input");
    }
}
