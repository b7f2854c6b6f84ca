//! Checks synchronized batch norm over MPI; run it under `mpirun -np N` (the crate's
//! tests do, with N = 4). Every rank holds an uneven shard of a global batch (with 3 or
//! more ranks, rank 1's shard is empty) with a channel of mean 1e4, runs synchronized
//! training, inference and frozen steps with backward, and compares with one process over
//! the concatenated batch (computed on every rank). Then inconsistent calls are made and
//! every rank must report an error. Rank 0 prints the summary; the exit status is
//! non-zero on any failure.

#[path = "../../examples/harness/mod.rs"]
mod harness;

use std::process::ExitCode;

use bnorm::config::{Renorm, Variant};
use bnorm::element::{DType, Element};
use bnorm::expert::{backward_into, forward_into, Grads, Parallelism, Saved, Workspace};
use bnorm::sync::Communicator;
use bnorm::{Config, Error, Layout, Mode, Momentum, Params, RunningState};
use bnorm_mpi::MpiComm;
use harness::{agree, hash, rel, starts, state_vecs, uneven, Rng};

/// A shape for `layout` with `n` samples, `c` channels, spatial extent 3 or 4.
fn shape(layout: Layout, n: usize, c: usize) -> Vec<usize> {
    let sp: Vec<usize> = (0..layout.rank() - 2).map(|i| 3 + i % 2).collect();
    let mut s = vec![n];
    if layout.is_channels_last() {
        s.extend(sp);
        s.push(c);
    } else {
        s.push(c);
        s.extend(sp);
    }
    s
}

struct Outcome {
    y: Vec<f64>,
    dx: Vec<f64>,
    stats: Vec<Vec<f64>>,
}

#[allow(clippy::too_many_arguments)]
fn step<T: Element>(
    comm: Option<&MpiComm>,
    cfg: &Config,
    g: bnorm::expert::Geometry,
    x: &[f64],
    dy: &[f64],
    p: &Params,
    state: &mut Option<RunningState>,
    mode: Mode,
    ws: &mut Workspace,
) -> bnorm::Result<Outcome> {
    let x: Vec<T> = x.iter().map(|&v| T::from_f64(v)).collect();
    let dy: Vec<T> = dy.iter().map(|&v| T::from_f64(v)).collect();
    let mut y = vec![T::from_f64(0.0); x.len()];
    let mut dx = y.clone();
    let (mut saved, mut grads) = (Saved::default(), Grads::default());
    let par = Parallelism::Rayon;
    match comm {
        Some(c) => {
            bnorm::expert::forward_into(
                cfg,
                g,
                &x,
                p,
                state.as_mut(),
                mode,
                &mut y,
                &mut saved,
                ws,
                bnorm::expert::Options::from(par).synchronized(c),
            )?;
            bnorm::expert::backward_into(
                cfg,
                g,
                &x,
                &dy,
                p,
                &saved,
                &mut dx,
                &mut grads,
                ws,
                bnorm::expert::BackwardOptions::from(par).synchronized(c),
            )?;
        }
        None => {
            forward_into(
                cfg,
                g,
                &x,
                p,
                state.as_mut(),
                mode,
                &mut y,
                &mut saved,
                ws,
                par,
            )?;
            backward_into(cfg, g, &x, &dy, p, &saved, &mut dx, &mut grads, ws, par)?;
        }
    }
    let mut stats = vec![
        saved.mean().to_vec(),
        saved.variance().to_vec(),
        saved.invstd().to_vec(),
        grads.dweight,
        grads.dbias,
    ];
    stats.extend(state_vecs(state.as_ref()));
    Ok(Outcome {
        y: y.iter().map(|v| v.to_f64()).collect(),
        dx: dx.iter().map(|v| v.to_f64()).collect(),
        stats,
    })
}

/// One case: returns (largest relative difference on this rank, hash of its statistics).
fn case<T: Element>(
    comm: &MpiComm,
    cfg: &Config,
    layout: Layout,
    seed: u64,
) -> bnorm::Result<(f64, u64, f64)> {
    let (rank, size) = (comm.rank(), comm.size());
    let c = cfg.get_channels();
    let full = shape(layout, 3 * size + 2, c);
    let fg = layout.geometry(&full)?;
    let sizes = uneven(size, full[0]);
    let per_sample = fg.per_sample();
    let start = starts(&sizes)[rank] * per_sample;
    let mut local = full.clone();
    local[0] = sizes[rank];
    let lg = layout.geometry(&local)?;
    let range = start..start + sizes[rank] * per_sample;

    let mut rng = Rng(seed);
    let p = Params {
        weight: cfg
            .get_scale()
            .then(|| (0..c).map(|_| 1.0 + 0.3 * rng.normal()).collect()),
        bias: cfg
            .get_center()
            .then(|| (0..c).map(|_| 0.3 * rng.normal()).collect()),
    };
    let (mut st_sync, mut st_ref) = (RunningState::init(cfg), RunningState::init(cfg));
    let (mut ws1, mut ws2) = (Workspace::default(), Workspace::default());
    let modes: &[Mode] = if cfg.get_track_running_stats() {
        &[Mode::Train, Mode::Train, Mode::Inference, Mode::Frozen]
    } else {
        &[Mode::Train, Mode::Inference]
    };
    let (mut worst, mut h) = (0.0f64, 0u64);
    let tol_out = (4.0 * T::DTYPE.unit_roundoff()).max(1e-6);
    for &mode in modes {
        let mut x: Vec<f64> = (0..fg.len()).map(|_| 0.5 + 2.0 * rng.normal()).collect();
        for (i, v) in x.iter_mut().enumerate() {
            if (i / fg.inner) % c == 1 {
                *v = 1e4 + *v / 4.0; // a channel with mean 1e4
            }
        }
        let dy: Vec<f64> = (0..fg.len()).map(|_| 0.1 + rng.normal()).collect();
        let s = step::<T>(
            Some(comm),
            cfg,
            lg,
            &x[range.clone()],
            &dy[range.clone()],
            &p,
            &mut st_sync,
            mode,
            &mut ws1,
        )?;
        let r = step::<T>(None, cfg, fg, &x, &dy, &p, &mut st_ref, mode, &mut ws2)?;
        // Outputs relative to the output tolerance of the dtype, statistics (f64) to 1e-6.
        worst = worst.max(rel(&s.y, &r.y[range.clone()]) * 1e-6 / tol_out);
        worst = worst.max(rel(&s.dx, &r.dx[range.clone()]) * 1e-6 / tol_out);
        for (a, b) in s.stats.iter().zip(&r.stats) {
            worst = worst.max(rel(a, b));
        }
        let refs: Vec<&[f64]> = s.stats.iter().map(|v| v.as_slice()).collect();
        h = h.wrapping_mul(31).wrapping_add(hash(&refs));
    }
    Ok((worst, h, sizes[rank] as f64))
}

/// The error every rank gets when `rank_bad` makes a different call.
fn inconsistent(comm: &MpiComm, what: &str) -> bnorm::Result<bool> {
    let (rank, size) = (comm.rank(), comm.size());
    let bad = size - 1;
    let mut c = 3;
    let mut mode = Mode::Train;
    let mut y_extra = 0;
    match what {
        "channels" if rank == bad => c = 4,
        "mode" if rank == bad => mode = Mode::Inference,
        "local" if rank == bad => y_extra = 1,
        _ => {}
    }
    let cfg = Config::torch(c);
    let g = Layout::NCHW.geometry(&[2, c, 2, 2])?;
    let x = vec![1.0f32; g.len()];
    let mut y = vec![0.0f32; g.len() + y_extra];
    let mut st = RunningState::init(&cfg);
    let r = bnorm::expert::forward_into(
        &cfg,
        g,
        &x,
        &Params::init(&cfg),
        st.as_mut(),
        mode,
        &mut y,
        &mut Saved::default(),
        &mut Workspace::default(),
        bnorm::expert::Options::from(Parallelism::Rayon).synchronized(comm),
    );
    let ok = match (what, &r) {
        ("local", Err(Error::LengthMismatch { what: "y", .. })) => rank == bad,
        (_, Err(Error::SyncMismatch { rank: r, .. })) => {
            *r == bad && (what != "local" || rank != bad)
        }
        _ => false,
    };
    if !ok {
        eprintln!("rank {rank}: inconsistent '{what}' gave {r:?}");
    }
    Ok(ok && st.is_some_and(|s| s.updates == 0))
}

fn run(comm: &MpiComm) -> bnorm::Result<bool> {
    let (rank, size) = (comm.rank(), comm.size());
    let renorm = Renorm {
        rmax: 1.5,
        rmin: 0.8,
        dmax: 0.5,
        momentum: 0.9,
        schedule: None,
    };
    let configs = [
        ("torch", Config::torch(3)),
        (
            "torch-cumulative",
            Config::torch(3).momentum(Momentum::Cumulative),
        ),
        ("keras", Config::keras(3)),
        ("tensorflow", Config::tensorflow(3)),
        ("renorm", Config::keras(3).variant(Variant::Renorm(renorm))),
        ("untracked", Config::torch(3).track_running_stats(false)),
    ];
    let (mut worst, mut identical, mut cases) = (0.0f64, true, 0);
    let mut seed = 1;
    for layout in Layout::ALL {
        for (name, cfg) in &configs {
            for dtype in DType::ALL {
                seed += 1;
                let (d, h, _) = match dtype {
                    DType::F32 => case::<f32>(comm, cfg, layout, seed)?,
                    DType::F64 => case::<f64>(comm, cfg, layout, seed)?,
                    DType::F16 => case::<bnorm::element::f16>(comm, cfg, layout, seed)?,
                    DType::BF16 => case::<bnorm::element::bf16>(comm, cfg, layout, seed)?,
                };
                let (d, same) = agree(comm, d, h)?;
                if rank == 0 && (d > 1e-6 || !same) {
                    eprintln!("FAIL {name} {layout} {dtype:?}: difference {d:e}, identical {same}");
                }
                worst = worst.max(d);
                identical &= same;
                cases += 1;
            }
        }
    }
    let mut errors_ok = true;
    if size >= 2 {
        for what in ["channels", "mode", "local"] {
            let ok = inconsistent(comm, what)?;
            let (bad, _) = agree(comm, if ok { 0.0 } else { 1.0 }, 0)?;
            errors_ok &= bad == 0.0;
        }
    }
    // The group is still in step after the errors.
    let (d, h, _) = case::<f32>(comm, &Config::torch(3), Layout::NHWC, 99)?;
    let (d, same) = agree(comm, d, h)?;
    worst = worst.max(d);
    identical &= same;
    if rank == 0 {
        println!(
            "selftest: {cases} cases (7 layouts x 6 conventions x 4 dtypes) over {size} ranks, \
             shards {:?}: max relative difference {worst:.3e} (f16/bf16 outputs scaled so that 1e-6 = 4 units \
             of their roundoff), bitwise identical across ranks: {}",
            uneven(size, 3 * size + 2),
            if identical { "yes" } else { "NO" }
        );
        println!(
            "selftest: inconsistent calls (channels, mode, a local error) reported on every rank: {}",
            if size < 2 { "skipped (1 rank)" } else if errors_ok { "yes" } else { "NO" }
        );
    }
    Ok(worst <= 1e-6 && identical && errors_ok)
}

fn main() -> ExitCode {
    let Some(universe) = mpi::initialize() else {
        eprintln!("MPI was already initialized");
        return ExitCode::FAILURE;
    };
    let comm = MpiComm::world(&universe);
    match run(&comm) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("rank {}: {e}", comm.rank());
            ExitCode::FAILURE
        }
    }
}
