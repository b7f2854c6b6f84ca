//! Synchronized batch norm over in-process ranks (threads): equal to one process over the
//! concatenated batch, bit-identical across ranks, and consistent errors instead of hangs.

mod common;

use bnorm::config::{BackwardArithmetic, Ghost, Variant};
use bnorm::element::{DType, Element};
use bnorm::expert::{
    backward_into, forward_into, BackwardEpilogue, BackwardOptions, Epilogue, Grads, Options,
    Parallelism, Saved, Workspace,
};
use bnorm::sync::{Communicator, ThreadComm};
use bnorm::{Config, Error, Layout, Mode, Params, RunningState};
use common::{conventions, shape, Rng};

/// What one rank (or the reference) produced in one step.
#[derive(Debug, Clone)]
struct Step {
    y: Vec<f64>,
    dx: Vec<f64>,
    mean: Vec<f64>,
    var: Vec<f64>,
    invstd: Vec<f64>,
    state: Option<RunningState>,
    grads: Grads,
    skipped: Vec<usize>,
}

/// Inputs of one step over the global batch.
struct Data {
    x: Vec<f64>,
    dy: Vec<f64>,
    mode: Mode,
}

fn params(cfg: &Config, seed: u64) -> Params {
    let mut rng = Rng(seed);
    let c = cfg.get_channels();
    Params {
        weight: cfg.get_scale().then(|| rng.vec(c, 1.0, 0.3)),
        bias: cfg.get_center().then(|| rng.vec(c, 0.0, 0.3)),
    }
}

/// Steps with the plain core over the whole batch.
fn reference<T: Element>(
    cfg: &Config,
    layout: Layout,
    full: &[usize],
    steps: &[Data],
) -> Vec<Step> {
    let g = layout.geometry(full).unwrap();
    let p = params(cfg, 7);
    let mut state = RunningState::init(cfg);
    let mut ws = Workspace::default();
    let mut out = Vec::new();
    for d in steps {
        let x: Vec<T> = d.x.iter().map(|&v| T::from_f64(v)).collect();
        let dy: Vec<T> = d.dy.iter().map(|&v| T::from_f64(v)).collect();
        let mut y = vec![T::from_f64(0.0); x.len()];
        let mut dx = y.clone();
        let mut saved = Saved::default();
        let rep = forward_into(
            cfg,
            g,
            &x,
            &p,
            state.as_mut(),
            d.mode,
            &mut y,
            &mut saved,
            &mut ws,
            Parallelism::Sequential,
        )
        .unwrap();
        let mut grads = Grads::default();
        backward_into(
            cfg,
            g,
            &x,
            &dy,
            &p,
            &saved,
            &mut dx,
            &mut grads,
            &mut ws,
            Parallelism::Sequential,
        )
        .unwrap();
        out.push(Step {
            y: y.iter().map(|v| v.to_f64()).collect(),
            dx: dx.iter().map(|v| v.to_f64()).collect(),
            mean: saved.mean().to_vec(),
            var: saved.variance().to_vec(),
            invstd: saved.invstd().to_vec(),
            state: state.clone(),
            grads,
            skipped: rep.skipped_channels,
        });
    }
    out
}

/// The same steps with `sizes.len()` ranks, rank r holding `sizes[r]` consecutive samples.
fn synchronized<T: Element>(
    cfg: &Config,
    layout: Layout,
    full: &[usize],
    sizes: &[usize],
    steps: &[Data],
    par: Parallelism,
) -> Vec<Result<Vec<Step>, Error>> {
    assert_eq!(sizes.iter().sum::<usize>(), full[0]);
    let per_sample: usize = full[1..].iter().product();
    let starts: Vec<usize> = sizes
        .iter()
        .scan(0, |s, &n| {
            let a = *s;
            *s += n;
            Some(a)
        })
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = ThreadComm::group(sizes.len())
            .into_iter()
            .map(|comm| {
                let r = comm.rank();
                let (n, start) = (sizes[r], starts[r] * per_sample);
                let mut shp = full.to_vec();
                shp[0] = n;
                s.spawn(move || -> Result<Vec<Step>, Error> {
                    let g = layout.geometry(&shp)?;
                    let range = start..start + n * per_sample;
                    let p = params(cfg, 7);
                    let mut state = RunningState::init(cfg);
                    let mut ws = Workspace::default();
                    let mut out = Vec::new();
                    for d in steps {
                        let x: Vec<T> =
                            d.x[range.clone()].iter().map(|&v| T::from_f64(v)).collect();
                        let dy: Vec<T> = d.dy[range.clone()]
                            .iter()
                            .map(|&v| T::from_f64(v))
                            .collect();
                        let mut y = vec![T::from_f64(0.0); x.len()];
                        let mut dx = y.clone();
                        let mut saved = Saved::default();
                        let rep = bnorm::expert::forward_into(
                            cfg,
                            g,
                            &x,
                            &p,
                            state.as_mut(),
                            d.mode,
                            &mut y,
                            &mut saved,
                            &mut ws,
                            bnorm::expert::Options::from(par).synchronized(&comm),
                        )?;
                        let mut grads = Grads::default();
                        bnorm::expert::backward_into(
                            cfg,
                            g,
                            &x,
                            &dy,
                            &p,
                            &saved,
                            &mut dx,
                            &mut grads,
                            &mut ws,
                            bnorm::expert::BackwardOptions::from(par).synchronized(&comm),
                        )?;
                        out.push(Step {
                            y: y.iter().map(|v| v.to_f64()).collect(),
                            dx: dx.iter().map(|v| v.to_f64()).collect(),
                            mean: saved.mean().to_vec(),
                            var: saved.variance().to_vec(),
                            invstd: saved.invstd().to_vec(),
                            state: state.clone(),
                            grads,
                            skipped: rep.skipped_channels,
                        });
                    }
                    Ok(out)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// max |a − b| / max(|b|, floor), floor = 1e-3 · rms(b) (relative to the tensor's scale
/// for values near zero).
fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let rms = (b.iter().map(|v| v * v).sum::<f64>() / b.len().max(1) as f64).sqrt();
    let floor = (1e-3 * rms).max(1e-300);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(floor))
        .fold(0.0, f64::max)
}

fn state_vecs(s: &Option<RunningState>) -> Vec<Vec<f64>> {
    let Some(s) = s else { return vec![] };
    let mut v = vec![s.mean.clone(), s.var.clone(), vec![s.updates as f64]];
    if let Some(r) = &s.renorm {
        v.push(r.mean.clone());
        v.push(r.stddev.clone());
        v.push(r.moving_stddev.clone());
    }
    v
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs both and checks: outputs and gradients within `tol_out` (relative), statistics
/// within `tol_stats`, and every rank's statistics, state and parameter gradients
/// bit-identical to rank 0's. Returns the largest relative difference seen.
#[allow(clippy::too_many_arguments)]
fn check<T: Element>(
    name: &str,
    cfg: &Config,
    layout: Layout,
    full: &[usize],
    sizes: &[usize],
    steps: &[Data],
    tol_out: f64,
    tol_stats: f64,
) -> f64 {
    let want = reference::<T>(cfg, layout, full, steps);
    let got = synchronized::<T>(cfg, layout, full, sizes, steps, Parallelism::Rayon);
    let got: Vec<Vec<Step>> = got
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{name}: {e}")))
        .collect();
    let mut worst = 0.0f64;
    for (si, w) in want.iter().enumerate() {
        let r0 = &got[0][si];
        let y: Vec<f64> = got.iter().flat_map(|r| r[si].y.clone()).collect();
        let dx: Vec<f64> = got.iter().flat_map(|r| r[si].dx.clone()).collect();
        let outs = [rel(&y, &w.y), rel(&dx, &w.dx)];
        let mut stats = vec![
            rel(&r0.mean, &w.mean),
            rel(&r0.var, &w.var),
            rel(&r0.invstd, &w.invstd),
            rel(&r0.grads.dweight, &w.grads.dweight),
            rel(&r0.grads.dbias, &w.grads.dbias),
        ];
        for (a, b) in state_vecs(&r0.state).iter().zip(state_vecs(&w.state)) {
            stats.push(rel(a, &b));
        }
        assert_eq!(r0.skipped, w.skipped, "{name}");
        let o = outs.iter().cloned().fold(0.0, f64::max);
        let st = stats.iter().cloned().fold(0.0, f64::max);
        assert!(
            o <= tol_out,
            "{name} step {si}: outputs differ by {outs:?} (tolerance {tol_out})"
        );
        assert!(
            st <= tol_stats,
            "{name} step {si}: statistics differ by {stats:?} (tolerance {tol_stats})"
        );
        worst = worst.max(o).max(st);
        for (r, rank) in got.iter().enumerate() {
            let s = &rank[si];
            assert_eq!(bits(&s.mean), bits(&r0.mean), "{name}: rank {r} mean");
            assert_eq!(bits(&s.var), bits(&r0.var), "{name}: rank {r} var");
            assert_eq!(bits(&s.invstd), bits(&r0.invstd), "{name}: rank {r} invstd");
            assert_eq!(
                bits(&s.grads.dweight),
                bits(&r0.grads.dweight),
                "{name}: rank {r}"
            );
            assert_eq!(
                bits(&s.grads.dbias),
                bits(&r0.grads.dbias),
                "{name}: rank {r}"
            );
            let (a, b) = (state_vecs(&s.state), state_vecs(&r0.state));
            assert_eq!(a.len(), b.len());
            for (u, v) in a.iter().zip(&b) {
                assert_eq!(bits(u), bits(v), "{name}: rank {r} running state");
            }
        }
    }
    worst
}

/// Data for `steps` steps; channel 1 (when it exists) has mean 1e4 and unit spread.
fn data(full: &[usize], layout: Layout, modes: &[Mode], seed: u64) -> Vec<Data> {
    let g = layout.geometry(full).unwrap();
    let mut rng = Rng(seed);
    modes
        .iter()
        .map(|&mode| {
            let mut x = rng.vec(g.len(), 0.5, 2.0);
            for (i, v) in x.iter_mut().enumerate() {
                let ch = (i / g.inner) % g.channels;
                if ch == 1 {
                    *v = 1e4 + (*v - 0.5) / 2.0;
                }
            }
            Data {
                x,
                dy: rng.vec(g.len(), 0.1, 1.0),
                mode,
            }
        })
        .collect()
}

/// Uneven shard sizes for `p` ranks summing to `n`, with rank 1 empty when p ≥ 2.
fn uneven(p: usize, n: usize) -> Vec<usize> {
    if p == 1 {
        return vec![n];
    }
    let weights: Vec<usize> = (0..p).map(|r| if r == 1 { 0 } else { r + 1 }).collect();
    let total: usize = weights.iter().sum();
    let mut sizes: Vec<usize> = weights.iter().map(|w| w * n / total).collect();
    let rest = n - sizes.iter().sum::<usize>();
    sizes[0] += rest;
    sizes
}

const TRAIN3: [Mode; 3] = [Mode::Train, Mode::Train, Mode::Train];

#[test]
fn one_to_eight_ranks_equal_one_process_over_the_concatenated_batch() {
    for p in 1..=8usize {
        for (i, layout) in Layout::ALL.into_iter().enumerate() {
            let full = shape(layout, 2 * p + 3, 3, &[3, 2]);
            let sizes = uneven(p, full[0]);
            let cfg = Config::torch(3);
            let steps = data(&full, layout, &TRAIN3, (p * 10 + i) as u64);
            let name = format!("{p} ranks {layout} {sizes:?}");
            check::<f32>(&name, &cfg, layout, &full, &sizes, &steps, 1e-6, 1e-6);
        }
    }
}

#[test]
fn even_shards_and_every_rank_holding_everything_but_one() {
    let layout = Layout::NCHW;
    let full = shape(layout, 8, 4, &[5, 3]);
    let steps = data(&full, layout, &TRAIN3, 3);
    for sizes in [vec![2, 2, 2, 2], vec![0, 0, 8, 0], vec![7, 1], vec![1; 8]] {
        let name = format!("{sizes:?}");
        check::<f32>(
            &name,
            &Config::torch(4),
            layout,
            &full,
            &sizes,
            &steps,
            1e-6,
            1e-6,
        );
    }
}

#[test]
fn every_layout_dtype_and_convention() {
    let modes = [Mode::Train, Mode::Train, Mode::Inference, Mode::Frozen];
    for layout in Layout::ALL {
        let full = shape(layout, 6, 3, &[4, 3]);
        let sizes = [2, 0, 3, 1];
        for (name, cfg) in conventions(3) {
            if cfg.get_variant().ghost().is_some() {
                continue;
            }
            let modes: Vec<Mode> = if cfg.get_track_running_stats() {
                modes.to_vec()
            } else {
                vec![Mode::Train, Mode::Inference]
            };
            let steps = data(&full, layout, &modes, 11);
            for dtype in DType::ALL {
                let n = format!("{name} {layout} {dtype:?}");
                // 16-bit outputs may round differently by one unit in the last place.
                let u = dtype.unit_roundoff();
                let tol = (4.0 * u).max(1e-6);
                match dtype {
                    DType::F32 => check::<f32>(&n, &cfg, layout, &full, &sizes, &steps, tol, 1e-9),
                    DType::F64 => check::<f64>(&n, &cfg, layout, &full, &sizes, &steps, tol, 1e-9),
                    DType::F16 => check::<bnorm::element::f16>(
                        &n, &cfg, layout, &full, &sizes, &steps, tol, 1e-9,
                    ),
                    DType::BF16 => check::<bnorm::element::bf16>(
                        &n, &cfg, layout, &full, &sizes, &steps, tol, 1e-9,
                    ),
                };
            }
        }
    }
}

#[test]
fn a_channel_with_mean_1e4_keeps_its_variance_in_f32() {
    // 4 ranks, uneven, one empty; variance 1e-4 under mean 1e4 (eps 1e-5 far above it
    // in PyTorch's inverse-std exchange would lose it; here it is exact).
    let layout = Layout::NCHW;
    let full = shape(layout, 10, 2, &[6, 6]);
    let g = layout.geometry(&full).unwrap();
    let mut rng = Rng(5);
    let x: Vec<f64> = (0..g.len())
        .map(|i| {
            if (i / g.inner) % 2 == 1 {
                1e4 + 0.01 * rng.normal()
            } else {
                rng.normal()
            }
        })
        .collect();
    let steps = vec![Data {
        dy: rng.vec(g.len(), 0.0, 1.0),
        x,
        mode: Mode::Train,
    }];
    let worst = check::<f32>(
        "mean 1e4",
        &Config::torch(2).eps(1e-3),
        layout,
        &full,
        &[4, 0, 5, 1],
        &steps,
        1e-6,
        1e-9,
    );
    assert!(worst <= 1e-6);
}

#[test]
fn one_rank_is_bitwise_forward_into_and_backward_into() {
    let configs = [
        Config::keras(3),
        Config::keras(3).backward_arithmetic(BackwardArithmetic::F32),
    ];
    for (layout, cfg) in [Layout::NCHW, Layout::NHWC]
        .into_iter()
        .flat_map(|l| configs.iter().map(move |c| (l, c)))
    {
        let full = shape(layout, 5, 3, &[4, 3]);
        let steps = data(&full, layout, &TRAIN3, 2);
        let want = reference::<f32>(cfg, layout, &full, &steps);
        let got = synchronized::<f32>(cfg, layout, &full, &[5], &steps, Parallelism::Sequential);
        let got = got[0].as_ref().unwrap();
        for (w, g) in want.iter().zip(got) {
            assert_eq!(bits(&w.y), bits(&g.y));
            assert_eq!(bits(&w.dx), bits(&g.dx));
            assert_eq!(bits(&w.mean), bits(&g.mean));
            assert_eq!(bits(&w.grads.dweight), bits(&g.grads.dweight));
            assert_eq!(w.state, g.state);
        }
    }
}

#[test]
fn results_do_not_depend_on_thread_parallelism() {
    let layout = Layout::NCHW;
    let full = shape(layout, 6, 3, &[64, 64]);
    let steps = data(&full, layout, &[Mode::Train], 9);
    let cfg = Config::torch(3);
    let a = synchronized::<f32>(&cfg, layout, &full, &[3, 0, 3], &steps, Parallelism::Rayon);
    let b = synchronized::<f32>(
        &cfg,
        layout,
        &full,
        &[3, 0, 3],
        &steps,
        Parallelism::Sequential,
    );
    for (ra, rb) in a.iter().zip(&b) {
        let (ra, rb) = (ra.as_ref().unwrap(), rb.as_ref().unwrap());
        assert_eq!(bits(&ra[0].y), bits(&rb[0].y));
        assert_eq!(bits(&ra[0].dx), bits(&rb[0].dx));
        assert_eq!(bits(&ra[0].grads.dweight), bits(&rb[0].grads.dweight));
    }
}

// ---------------------------------------------------------------------------------------
// Inconsistent use: every rank returns an error, none hangs.

/// Runs one forward step per rank with per-rank configuration, shape and mode.
fn forward_each(calls: Vec<(Config, Vec<usize>, Mode)>) -> Vec<Result<(), Error>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = ThreadComm::group(calls.len())
            .into_iter()
            .zip(calls)
            .map(|(comm, (cfg, shp, mode))| {
                s.spawn(move || -> Result<(), Error> {
                    let g = Layout::NCHW.geometry(&shp)?;
                    let x = vec![1.5f32; g.len()];
                    let mut y = vec![0.0f32; g.len()];
                    let mut st = RunningState::init(&cfg);
                    let (mut saved, mut ws) = (Saved::default(), Workspace::default());
                    let p = Params::init(&cfg);
                    bnorm::expert::forward_into(
                        &cfg,
                        g,
                        &x,
                        &p,
                        st.as_mut(),
                        mode,
                        &mut y,
                        &mut saved,
                        &mut ws,
                        bnorm::expert::Options::from(Parallelism::Sequential).synchronized(&comm),
                    )?;
                    Ok(())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn different_channel_counts_fail_on_every_rank() {
    let r = forward_each(vec![
        (Config::torch(3), vec![2, 3, 2, 2], Mode::Train),
        (Config::torch(3), vec![2, 3, 2, 2], Mode::Train),
        (Config::torch(4), vec![2, 4, 2, 2], Mode::Train),
    ]);
    for e in &r {
        assert_eq!(
            e,
            &Err(Error::SyncMismatch {
                rank: 2,
                what: "channel count"
            })
        );
    }
}

#[test]
fn a_rank_in_inference_while_the_others_train_fails_everywhere() {
    let r = forward_each(vec![
        (Config::torch(3), vec![2, 3, 2, 2], Mode::Train),
        (Config::torch(3), vec![2, 3, 2, 2], Mode::Inference),
        (Config::torch(3), vec![2, 3, 2, 2], Mode::Train),
        (Config::torch(3), vec![0, 3, 2, 2], Mode::Train),
    ]);
    for e in &r {
        assert!(
            matches!(e, Err(Error::SyncMismatch { rank: 1, what }) if what.starts_with("mode")),
            "{e:?}"
        );
    }
}

#[test]
fn another_configuration_fails_everywhere() {
    // Another eps, or only another backward arithmetic (dx would differ between ranks).
    let f32_map = Config::torch(3).backward_arithmetic(BackwardArithmetic::F32);
    for other in [Config::torch(3).eps(1e-3), f32_map] {
        let r = forward_each(vec![
            (Config::torch(3), vec![2, 3, 2, 2], Mode::Train),
            (other, vec![2, 3, 2, 2], Mode::Train),
        ]);
        for e in &r {
            assert!(
                matches!(e, Err(Error::SyncMismatch { rank: 1, what }) if what.starts_with("config")),
                "{e:?}"
            );
        }
    }
}

#[test]
fn a_rank_failing_its_own_checks_fails_everyone() {
    // rank 1 declares 3 channels in its shape but its layer has 4... as does everyone,
    // except that rank 1's x has the wrong channel axis: its own ShapeMismatch, the
    // others SyncMismatch naming rank 1.
    let r = forward_each(vec![
        (Config::torch(4), vec![2, 4, 2, 2], Mode::Train),
        (Config::torch(4), vec![2, 3, 2, 2], Mode::Train),
        (Config::torch(4), vec![2, 4, 2, 2], Mode::Train),
    ]);
    assert!(
        matches!(r[1], Err(Error::ChannelMismatch { .. })),
        "{:?}",
        r[1]
    );
    for e in [&r[0], &r[2]] {
        assert!(
            matches!(e, Err(Error::SyncMismatch { rank: 1, .. })),
            "{e:?}"
        );
    }
}

#[test]
fn ghost_batches_are_refused_on_every_rank() {
    let cfg = Config::keras(3).variant(Variant::Ghost(Ghost::strided(2)));
    let r = forward_each(vec![
        (cfg.clone(), vec![2, 3, 2, 2], Mode::Train),
        (cfg, vec![2, 3, 2, 2], Mode::Train),
    ]);
    // Every rank fails its own check, with its own (identical) error.
    for e in &r {
        let ok = matches!(e, Err(Error::InvalidConfig { setting, .. }) if *setting == "variant");
        assert!(ok, "{e:?}");
    }
}

#[test]
fn a_global_batch_of_one_value_is_too_small_everywhere() {
    let r = forward_each(vec![
        (Config::torch(2), vec![0, 2, 1, 1], Mode::Train),
        (Config::torch(2), vec![1, 2, 1, 1], Mode::Train),
        (Config::torch(2), vec![0, 2, 1, 1], Mode::Train),
    ]);
    for e in &r {
        assert_eq!(e, &Err(Error::BatchTooSmall { channel_values: 1 }));
    }
    // ... while one value on each of two ranks is a batch of two.
    let r = forward_each(vec![
        (Config::torch(2), vec![1, 2, 1, 1], Mode::Train),
        (Config::torch(2), vec![1, 2, 1, 1], Mode::Train),
    ]);
    assert!(r.iter().all(|e| e.is_ok()), "{r:?}");
}

#[test]
fn backward_with_unsynchronized_saved_statistics_fails_everywhere() {
    let r: Vec<Result<(), Error>> = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadComm::group(2)
            .into_iter()
            .map(|comm| {
                s.spawn(move || -> Result<(), Error> {
                    let cfg = Config::torch(2).track_running_stats(false);
                    let g = Layout::NC.geometry(&[3, 2])?;
                    let x: Vec<f64> = (0..6).map(|i| (i * (comm.rank() + 1)) as f64).collect();
                    let p = Params::init(&cfg);
                    let (mut y, mut saved, mut ws) =
                        (vec![0.0; 6], Saved::default(), Workspace::default());
                    // A local (non-synchronized) forward step ...
                    forward_into(
                        &cfg,
                        g,
                        &x,
                        &p,
                        None,
                        Mode::Train,
                        &mut y,
                        &mut saved,
                        &mut ws,
                        Parallelism::Sequential,
                    )?;
                    // ... then a synchronized backward.
                    let (mut dx, mut grads) = (vec![0.0; 6], Grads::default());
                    bnorm::expert::backward_into(
                        &cfg,
                        g,
                        &x,
                        &y,
                        &p,
                        &saved,
                        &mut dx,
                        &mut grads,
                        &mut ws,
                        bnorm::expert::BackwardOptions::from(Parallelism::Sequential)
                            .synchronized(&comm),
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in &r {
        assert!(
            matches!(e, Err(Error::SyncMismatch { what, .. }) if what.starts_with("saved")),
            "{e:?}"
        );
    }
}

#[test]
fn thread_comm_reports_buffers_of_different_lengths() {
    let r: Vec<Result<Vec<f64>, Error>> = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadComm::group(3)
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let mut out = Vec::new();
                    c.all_gather_f64(&vec![1.0; 2 + (c.rank() == 2) as usize], &mut out)
                        .map(|()| out)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(r
        .iter()
        .all(|e| matches!(e, Err(Error::Communication { .. }))));
    // The group is still usable afterwards.
    let comms = ThreadComm::group(1);
    let mut out = Vec::new();
    comms[0].all_gather_f64(&[3.0], &mut out).unwrap();
    assert_eq!(out, vec![3.0]);
}

/// What one step with an epilogue and a deferred update produced on one rank.
type EpStep = (Vec<f64>, Vec<f64>, Vec<f64>, Grads, Vec<f64>, RunningState);

/// A synchronized step is the local plan with a combine step, so every option combines
/// with it: `relu(bn(x) + residual)` and a deferred update, over uneven slices, equal one
/// process over the concatenated batch; committing the deferred update equals applying it.
#[test]
fn synchronized_steps_take_every_option() {
    let cfg = Config::torch(3);
    let full = [7usize, 3, 2, 2];
    let per: usize = full[1..].iter().product();
    let n: usize = full.iter().product();
    let mut rng = Rng(77);
    let (x, r, dy) = (
        rng.vec(n, 1.0, 2.0),
        rng.vec(n, 0.0, 1.0),
        rng.vec(n, 0.0, 1.0),
    );
    let p = params(&cfg, 3);
    let step = |comm: Option<&ThreadComm>, lo: usize, hi: usize| -> EpStep {
        let mut shp = full;
        shp[0] = hi - lo;
        let g = Layout::NCHW.geometry(&shp).unwrap();
        let range = lo * per..hi * per;
        let (xs, rs, ds) = (&x[range.clone()], &r[range.clone()], &dy[range]);
        let mut state = RunningState::init(&cfg).unwrap();
        let (mut y, mut dx, mut dres) = (
            vec![0.0; xs.len()],
            vec![0.0; xs.len()],
            vec![0.0; xs.len()],
        );
        let (mut saved, mut ws, mut grads) =
            (Saved::default(), Workspace::default(), Grads::default());
        let mut opts = Options::from(Parallelism::Sequential)
            .epilogue(Epilogue::AddRelu(rs))
            .defer();
        if let Some(c) = comm {
            opts = opts.synchronized(c);
        }
        let report = forward_into(
            &cfg,
            g,
            xs,
            &p,
            Some(&mut state),
            Mode::Train,
            &mut y,
            &mut saved,
            &mut ws,
            opts,
        )
        .unwrap();
        assert_eq!(state.updates, 0, "deferred: the state is only read");
        let pending = report.pending.expect("a deferred update");
        let mut bopts =
            BackwardOptions::from(Parallelism::Sequential).epilogue(BackwardEpilogue::AddRelu {
                y: &y,
                dresidual: &mut dres,
            });
        if let Some(c) = comm {
            bopts = bopts.synchronized(c);
        }
        backward_into(
            &cfg, g, xs, ds, &p, &saved, &mut dx, &mut grads, &mut ws, bopts,
        )
        .unwrap();
        pending.commit(&cfg, &mut state).unwrap();
        (y, dx, dres, grads, pending.mean().to_vec(), state)
    };
    let whole = step(None, 0, full[0]);
    let bounds = [(0, 1), (1, 5), (5, 7)];
    let ranks: Vec<EpStep> = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadComm::group(3)
            .into_iter()
            .map(|comm| {
                let (lo, hi) = bounds[comm.rank()];
                let step = &step;
                s.spawn(move || step(Some(&comm), lo, hi))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let cat = |f: &dyn Fn(&EpStep) -> &Vec<f64>| -> Vec<f64> {
        ranks.iter().flat_map(|r| f(r).iter().copied()).collect()
    };
    assert!(rel(&cat(&|r| &r.0), &whole.0) < 1e-12, "y");
    assert!(rel(&cat(&|r| &r.1), &whole.1) < 1e-12, "dx");
    assert!(rel(&cat(&|r| &r.2), &whole.2) < 1e-12, "dresidual");
    for r in &ranks {
        assert!(rel(&r.3.dweight, &whole.3.dweight) < 1e-12, "dgamma");
        assert!(rel(&r.3.dbias, &whole.3.dbias) < 1e-12, "dbeta");
        assert!(rel(&r.4, &whole.4) < 1e-12, "pending mean");
        assert_eq!(
            r.5, ranks[0].5,
            "committed state bit-identical on every rank"
        );
        assert!(
            rel(&r.5.var, &whole.5.var) < 1e-12,
            "committed running variance"
        );
    }
    // the ReLU cut something, so the epilogue was really applied
    assert!(whole.0.contains(&0.0));
}
