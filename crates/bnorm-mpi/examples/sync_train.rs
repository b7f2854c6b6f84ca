//! Data-parallel training with synchronized batch norm over MPI.
//!
//! ```sh
//! cargo build --release -p bnorm-mpi --examples
//! mpirun -np 4 target/release/examples/sync_train
//! ```
//!
//! Every rank holds an uneven slice of each global batch (with 4 ranks: 4, 0, 11 and 15
//! of 30 samples; rank 1 has none), NCHW f32 with 8 channels, one of them at mean 1e4.
//! Gamma and beta are trained by SGD on `0.5 · mean((y − target)²)` over the global batch
//! for 5 steps with synchronized forward and backward. Every rank also trains the same
//! layer in one process over the concatenated batch and compares: the batch statistics,
//! running statistics, gradients, trained parameters, and its slice of y and dx. Rank 0
//! prints
//!
//! ```text
//! sync check: max relative difference D over N ranks
//! ```
//!
//! and the exit status is non-zero when D exceeds 1e-6 or the ranks' statistics are not
//! bit-identical.

mod harness;

use std::process::ExitCode;

use bnorm::expert::{backward_into, forward_into, Grads, Parallelism, Saved, Workspace};
use bnorm::sync::Communicator;
use bnorm::{Config, Layout, Mode, Params, RunningState};
use bnorm_mpi::MpiComm;
use harness::{agree, hash, rel, starts, state_vecs, uneven, Rng};

const N: usize = 30;
const C: usize = 8;
const HW: usize = 6;
const STEPS: usize = 5;
const LR: f64 = 0.5;

/// One layer being trained: parameters, running statistics, buffers.
struct Trainer {
    p: Params,
    state: Option<RunningState>,
    ws: Workspace,
    saved: Saved,
    grads: Grads,
    y: Vec<f32>,
    dx: Vec<f32>,
}

impl Trainer {
    fn new(cfg: &Config, len: usize) -> Trainer {
        Trainer {
            p: Params::init(cfg),
            state: RunningState::init(cfg),
            ws: Workspace::default(),
            saved: Saved::default(),
            grads: Grads::default(),
            y: vec![0.0; len],
            dx: vec![0.0; len],
        }
    }

    /// One SGD step; `comm` None is the single-process reference.
    fn step(
        &mut self,
        comm: Option<&MpiComm>,
        cfg: &Config,
        g: bnorm::expert::Geometry,
        x: &[f32],
        target: &[f32],
    ) -> bnorm::Result<()> {
        let par = Parallelism::Rayon;
        let (p, st, ws) = (&self.p, self.state.as_mut(), &mut self.ws);
        match comm {
            Some(c) => bnorm::expert::forward_into(
                cfg,
                g,
                x,
                p,
                st,
                Mode::Train,
                &mut self.y,
                &mut self.saved,
                ws,
                bnorm::expert::Options::from(par).synchronized(c),
            )?,
            None => forward_into(
                cfg,
                g,
                x,
                p,
                st,
                Mode::Train,
                &mut self.y,
                &mut self.saved,
                ws,
                par,
            )?,
        };
        // d(0.5·mean over the global batch of (y − t)²)/dy.
        let global = (N * C * HW * HW) as f32;
        let dy: Vec<f32> = self
            .y
            .iter()
            .zip(target)
            .map(|(y, t)| (y - t) / global)
            .collect();
        let (s, ws) = (&self.saved, &mut self.ws);
        match comm {
            Some(c) => bnorm::expert::backward_into(
                cfg,
                g,
                x,
                &dy,
                p,
                s,
                &mut self.dx,
                &mut self.grads,
                ws,
                bnorm::expert::BackwardOptions::from(par).synchronized(c),
            )?,
            None => backward_into(cfg, g, x, &dy, p, s, &mut self.dx, &mut self.grads, ws, par)?,
        }
        // The gradients are already those of the global batch: no further all-reduce.
        for (w, d) in self.p.weight.iter_mut().flatten().zip(&self.grads.dweight) {
            *w -= LR * d;
        }
        for (b, d) in self.p.bias.iter_mut().flatten().zip(&self.grads.dbias) {
            *b -= LR * d;
        }
        Ok(())
    }

    fn vectors(&self) -> Vec<Vec<f64>> {
        let mut v = vec![
            self.saved.mean().to_vec(),
            self.saved.variance().to_vec(),
            self.grads.dweight.clone(),
            self.grads.dbias.clone(),
            self.p.weight.clone().unwrap_or_default(),
            self.p.bias.clone().unwrap_or_default(),
        ];
        v.extend(state_vecs(self.state.as_ref()));
        v
    }
}

fn run(comm: &MpiComm) -> bnorm::Result<(f64, bool)> {
    let (rank, size) = (comm.rank(), comm.size());
    let cfg = Config::torch(C);
    let sizes = uneven(size, N);
    let per_sample = C * HW * HW;
    let range =
        starts(&sizes)[rank] * per_sample..(starts(&sizes)[rank] + sizes[rank]) * per_sample;
    let full = Layout::NCHW.geometry(&[N, C, HW, HW])?;
    let local = Layout::NCHW.geometry(&[sizes[rank], C, HW, HW])?;
    let mut sync = Trainer::new(&cfg, local.len());
    let mut single = Trainer::new(&cfg, full.len());
    let mut rng = Rng(2024);
    let mut worst = 0.0f64;
    let mut h = 0u64;
    for _ in 0..STEPS {
        // The same global batch on every rank; each takes its slice.
        let x: Vec<f32> = (0..full.len())
            .map(|i| {
                let ch = (i / (HW * HW)) % C;
                let v = rng.normal();
                if ch == 1 {
                    (1e4 + v) as f32
                } else {
                    (ch as f64 + (1.0 + ch as f64) * v) as f32
                }
            })
            .collect();
        let target: Vec<f32> = (0..full.len()).map(|_| rng.normal() as f32).collect();
        sync.step(
            Some(comm),
            &cfg,
            local,
            &x[range.clone()],
            &target[range.clone()],
        )?;
        single.step(None, &cfg, full, &x, &target)?;
        let f = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        worst = worst.max(rel(&f(&sync.y), &f(&single.y[range.clone()])));
        worst = worst.max(rel(&f(&sync.dx), &f(&single.dx[range.clone()])));
        let (a, b) = (sync.vectors(), single.vectors());
        for (u, v) in a.iter().zip(&b) {
            worst = worst.max(rel(u, v));
        }
        let refs: Vec<&[f64]> = a.iter().map(|v| v.as_slice()).collect();
        h = h.wrapping_mul(31).wrapping_add(hash(&refs));
    }
    if rank == 0 {
        println!("shards (samples per rank): {sizes:?} of {N}");
        let st = sync.state.as_ref();
        println!(
            "running mean of channel 1 (mean 1e4) after {STEPS} steps: {:.6}",
            st.map_or(f64::NAN, |s| s.mean[1])
        );
    }
    agree(comm, worst, h)
}

fn main() -> ExitCode {
    let Some(universe) = mpi::initialize() else {
        eprintln!("MPI was already initialized");
        return ExitCode::FAILURE;
    };
    let comm = MpiComm::world(&universe);
    match run(&comm) {
        Ok((d, identical)) => {
            if comm.rank() == 0 {
                if !identical {
                    println!("ranks' statistics are NOT bit-identical");
                }
                println!(
                    "sync check: max relative difference {d:.3e} over {} ranks",
                    comm.size()
                );
            }
            if d <= 1e-6 && identical {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("rank {}: {e}", comm.rank());
            ExitCode::FAILURE
        }
    }
}
