//! Time of a synchronized training step (forward + backward) on S1 = NCHW
//! (32, 64, 56, 56) f32 split across the ranks, and the part spent in communication.
//!
//! ```sh
//! cargo build --release -p bnorm-mpi --examples
//! RAYON_NUM_THREADS=2 target/release/examples/sync_bench            # 1 rank
//! mpirun -np 2 -x RAYON_NUM_THREADS=1 target/release/examples/sync_bench
//! mpirun -np 4 -x RAYON_NUM_THREADS=1 target/release/examples/sync_bench   # oversubscribed on 2 cores
//! ```
//!
//! Reported on rank 0, medians over the iterations, the slowest rank's:
//! * `step`: synchronized forward + backward of this rank's slice;
//! * `in collectives`: time inside the all-gathers during the step (the exchange itself
//!   plus waiting for the slowest rank to arrive);
//! * `aligned exchange`: the same four all-gathers right after a barrier, i.e. the cost
//!   of the communication itself;
//! * `local step`: forward + backward of the same slice without synchronization.

use std::cell::Cell;
use std::time::{Duration, Instant};

use bnorm::expert::{backward_into, forward_into, Grads, Parallelism, Saved, Workspace};
use bnorm::sync::Communicator;
use bnorm::{Config, Layout, Mode, Params, RunningState};
use bnorm_mpi::MpiComm;
use mpi::traits::CommunicatorCollectives as _;

/// A communicator that adds up the time spent in its collectives.
struct Timed<'a> {
    inner: &'a MpiComm,
    spent: Cell<Duration>,
}

impl Communicator for Timed<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_gather_f64(&self, local: &[f64], out: &mut Vec<f64>) -> bnorm::Result<()> {
        let t = Instant::now();
        let r = self.inner.all_gather_f64(local, out);
        self.spent.set(self.spent.get() + t.elapsed());
        r
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let universe = mpi::initialize().ok_or("MPI was already initialized")?;
    let comm = MpiComm::world(&universe);
    let (rank, size) = (comm.rank(), comm.size());
    let iters: usize = std::env::var("SYNC_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let (n, c, h, w) = (32usize, 64usize, 56usize, 56usize);
    // Even split, the first ranks taking one more sample when it does not divide.
    let mine = n / size + usize::from(rank < n % size);
    let cfg = Config::torch(c);
    let g = Layout::NCHW.geometry(&[mine, c, h, w])?;
    let x: Vec<f32> = (0..g.len())
        .map(|i| ((i * 7919 + rank * 104_729) % 1000) as f32 * 0.01)
        .collect();
    let dy: Vec<f32> = (0..g.len())
        .map(|i| ((i * 31 + 17) % 200) as f32 * 0.005 - 0.5)
        .collect();
    let p = Params::init(&cfg);
    let mut st = RunningState::init(&cfg);
    let (mut y, mut dx) = (vec![0.0f32; g.len()], vec![0.0f32; g.len()]);
    let (mut saved, mut grads, mut ws) = (Saved::default(), Grads::default(), Workspace::default());
    let timed = Timed {
        inner: &comm,
        spent: Cell::new(Duration::ZERO),
    };
    let par = Parallelism::Rayon;
    let (mut step, mut coll, mut aligned, mut local) = (vec![], vec![], vec![], vec![]);
    for it in 0..iters + 2 {
        // Synchronized step.
        comm.inner().barrier();
        timed.spent.set(Duration::ZERO);
        let t = Instant::now();
        bnorm::expert::forward_into(
            &cfg,
            g,
            &x,
            &p,
            st.as_mut(),
            Mode::Train,
            &mut y,
            &mut saved,
            &mut ws,
            bnorm::expert::Options::from(par).synchronized(&timed),
        )?;
        bnorm::expert::backward_into(
            &cfg,
            g,
            &x,
            &dy,
            &p,
            &saved,
            &mut dx,
            &mut grads,
            &mut ws,
            bnorm::expert::BackwardOptions::from(par).synchronized(&timed),
        )?;
        let s = t.elapsed().as_secs_f64();
        let cs = timed.spent.get().as_secs_f64();
        // The same exchanges, aligned by a barrier: the cost of communication itself.
        comm.inner().barrier();
        let mut out = Vec::new();
        let t = Instant::now();
        for len in [12, 3 * c, 12, 2 * c] {
            comm.all_gather_f64(&vec![1.0; len], &mut out)?;
        }
        let a = t.elapsed().as_secs_f64();
        // The local step, for comparison.
        comm.inner().barrier();
        let t = Instant::now();
        forward_into(
            &cfg,
            g,
            &x,
            &p,
            st.as_mut(),
            Mode::Train,
            &mut y,
            &mut saved,
            &mut ws,
            par,
        )?;
        backward_into(
            &cfg, g, &x, &dy, &p, &saved, &mut dx, &mut grads, &mut ws, par,
        )?;
        let l = t.elapsed().as_secs_f64();
        if it >= 2 {
            step.push(s);
            coll.push(cs);
            aligned.push(a);
            local.push(l);
        }
    }
    let mine_stats = [
        median(&mut step),
        median(&mut coll),
        median(&mut aligned),
        median(&mut local),
    ];
    let mut all = Vec::new();
    comm.all_gather_f64(&mine_stats, &mut all)?;
    if rank == 0 {
        let worst = |k: usize| all.chunks_exact(4).map(|r| r[k]).fold(0.0, f64::max) * 1e3;
        let (s, cs, a, l) = (worst(0), worst(1), worst(2), worst(3));
        println!(
            "sync_bench: S1 NCHW [{n}, {c}, {h}, {w}] f32, {size} rank(s) x {} thread(s), \
             {mine} samples on rank 0: step {s:.2} ms, in collectives {cs:.3} ms ({:.2}%), \
             aligned exchange {a:.3} ms ({:.3}%), local step without sync {l:.2} ms \
             (medians of {iters}, slowest rank)",
            rayon::current_num_threads(),
            100.0 * cs / s,
            100.0 * a / s,
        );
    }
    Ok(())
}
