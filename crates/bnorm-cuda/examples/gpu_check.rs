//! The prepared GPU check: verifies every kernel against bnorm's CPU path on fresh random
//! inputs (all layouts, f32/f16/bf16, odd sizes and every vector width, NaN-poisoned
//! outputs, x and dy with mean 0 and 1000), then times the cuDNN anchor's cases
//! (`cudnn_anchor.py`: same labels, shapes and metric) with the device-to-device copy
//! rate measured in the same run.
//!
//! ```text
//! gpu_check [--verify-only | --bench-only] [--json FILE] [--iters N] [--seed S]
//!           [--case S1|S2|S3|S5|L1|L3] [--layout NCHW|NHWC|NC] [--dtype f32|bf16|f16]
//! ```
//!
//! Exit status: 0 all verified, 1 a check failed, 2 CUDA unavailable (skipped).
//! Build on any machine (`cargo build --release -p bnorm-cuda --examples`) and carry
//! `target/release/examples/gpu_check` to the GPU machine; see `bench/gpu/run.sh`.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use bnorm::config::NonFinitePolicy;
use bnorm::element::{bf16, f16, Element};
use bnorm::expert::{backward_into, forward_into, Grads, Parallelism, Saved, Workspace};
use bnorm::{Config, Layout, Mode, Params, RunningState};
use bnorm_cuda::{CudaError, DeviceTensor, Gpu, GpuBatchNorm, GpuElement, GpuSaved};
use cudarc::driver::sys::CUevent_flags;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unif(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Approximately normal (sum of 4 uniforms, variance 1).
    fn normal(&mut self) -> f64 {
        (0..4)
            .map(|_| self.unif())
            .sum::<f64>()
            .mul_add(3f64.sqrt(), -2.0 * 3f64.sqrt())
    }
}

struct Tally {
    passed: usize,
    failed: usize,
    lines: Vec<String>,
}

impl Tally {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
            let w = what();
            if self.lines.len() < 40 {
                println!("FAIL {w}");
            }
            self.lines.push(w);
        }
    }
}

/// Worst violation of |gpu − cpu| ≤ tol·(1 + |cpu|); NaN in the GPU output where the
/// CPU has a number (an unwritten, poisoned element) is a violation.
fn compare<T: Element>(gpu: &[T], cpu: &[T], tol: f64) -> Option<String> {
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        let (g, c) = (g.to_f64(), c.to_f64());
        if c.is_nan() && g.is_nan() {
            continue;
        }
        let within = (g - c).abs() <= tol * (1.0 + c.abs());
        if !within {
            return Some(format!("element {i}: gpu {g} cpu {c} (tol {tol:e})"));
        }
    }
    (gpu.len() != cpu.len()).then(|| "length differs".to_string())
}

fn close_f64(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
}

fn shapes() -> Vec<(Layout, Vec<usize>)> {
    vec![
        (Layout::NC, vec![37, 5]),
        (Layout::NC, vec![4099, 67]),
        (Layout::NCL, vec![3, 7, 11]),
        (Layout::NCL, vec![5, 3, 1]),
        (Layout::NCHW, vec![5, 3, 7, 9]),
        (Layout::NCHW, vec![16, 33, 31, 29]),
        (Layout::NCHW, vec![2, 2, 181, 181]),
        (Layout::NCDHW, vec![2, 3, 3, 5, 7]),
        (Layout::NLC, vec![3, 11, 7]),
        (Layout::NHWC, vec![5, 7, 9, 3]),
        (Layout::NHWC, vec![16, 31, 29, 67]),
        (Layout::NDHWC, vec![2, 3, 5, 7, 3]),
        // vector paths: inner (channels-first) or C (channels-last) divisible by 4 or 2
        (Layout::NC, vec![1000, 64]),
        (Layout::NC, vec![33, 6]),
        (Layout::NCL, vec![3, 4, 4096]),
        (Layout::NCHW, vec![4, 6, 14, 14]),
        (Layout::NCHW, vec![3, 5, 9, 2]),
        (Layout::NCHW, vec![32, 8, 56, 56]),
        (Layout::NHWC, vec![4, 9, 11, 12]),
        (Layout::NHWC, vec![16, 28, 28, 40]),
        // the columns path (inner 2..31 reduced by rows of C·inner): channels straddling
        // tiles of 32·N columns, with vector widths 4 and 1
        (Layout::NCL, vec![33, 64, 3]),
        (Layout::NCHW, vec![7, 41, 5, 5]),
    ]
}

fn configs(c: usize) -> Vec<(&'static str, Config)> {
    vec![
        ("torch", Config::torch(c)),
        ("keras", Config::keras(c)),
        ("tensorflow", Config::tensorflow(c)),
        ("torch-nostats", Config::torch(c).track_running_stats(false)),
        (
            "torch-cumulative",
            Config::torch(c).momentum(bnorm::Momentum::Cumulative),
        ),
    ]
}

fn verify_dtype<T: GpuElement>(gpu: &Gpu, rng: &mut Rng, t: &mut Tally) -> Result<(), CudaError> {
    let u = T::DTYPE.unit_roundoff();
    let name = T::DTYPE.name();
    for (layout, shape) in shapes() {
        let g = layout.geometry(&shape)?;
        let c = g.channels;
        for big_mean in [0.0, 1000.0] {
            let host = |rng: &mut Rng, off: f64| -> Vec<T> {
                (0..g.len())
                    .map(|_| T::from_f64(off + 1.5 * rng.normal()))
                    .collect()
            };
            let x: Vec<T> = host(rng, big_mean);
            // dy with the same large mean: the backward map must be centred on dy
            let dyh: Vec<T> = host(rng, big_mean);
            for (cname, cfg) in configs(c) {
                let mut params = Params::init(&cfg);
                if let Some(w) = params.weight.as_mut() {
                    w.iter_mut().for_each(|v| *v = 0.5 + rng.unif());
                }
                if let Some(b) = params.bias.as_mut() {
                    b.iter_mut().for_each(|v| *v = rng.unif() - 0.5);
                }
                let mut cpu_state = RunningState::init(&cfg);
                let mut bn =
                    GpuBatchNorm::new(gpu, cfg.clone(), params.clone(), cpu_state.clone())?;
                let xd = DeviceTensor::upload(gpu, &x, &shape, layout)?;
                let dyd = DeviceTensor::upload(gpu, &dyh, &shape, layout)?;
                let mut ws = Workspace::default();
                let modes: &[Mode] = if cfg.get_track_running_stats() {
                    &[Mode::Train, Mode::Train, Mode::Inference, Mode::Frozen]
                } else {
                    &[Mode::Train, Mode::Inference]
                };
                for (step, &mode) in modes.iter().enumerate() {
                    let ctx = format!(
                        "{name} {layout}{shape:?} x, dy mean {big_mean} {cname} step {step} {mode:?}"
                    );
                    let nan = T::from_f64(f64::NAN);
                    let mut y = DeviceTensor::filled(gpu, nan, &shape, layout)?;
                    let mut saved = GpuSaved::new();
                    let rep = bn.forward_into(&xd, mode, &mut y, &mut saved)?;
                    let (mut yc, mut sv) = (vec![T::from_f64(0.0); g.len()], Saved::default());
                    let crep = forward_into(
                        &cfg,
                        g,
                        &x,
                        &params,
                        cpu_state.as_mut(),
                        mode,
                        &mut yc,
                        &mut sv,
                        &mut ws,
                        Parallelism::Sequential,
                    )?;
                    t.check(
                        rep.updated == crep.updated && rep.cold_statistics == crep.cold_statistics,
                        || format!("{ctx}: report {rep:?} vs cpu {crep:?}"),
                    );
                    let yg = y.download()?;
                    let bad = compare(&yg, &yc, 16.0 * u);
                    t.check(bad.is_none(), || {
                        format!("{ctx}: forward y {}", bad.clone().unwrap_or_default())
                    });
                    let st = saved.download()?.expect("forward ran");
                    t.check(
                        close_f64(&st.mean, sv.mean(), 1e-9)
                            && close_f64(&st.var, sv.variance(), 1e-9)
                            && close_f64(&st.invstd, sv.invstd(), 1e-9),
                        || {
                            format!(
                                "{ctx}: saved statistics gpu {:?}/{:?} cpu {:?}/{:?}",
                                &st.mean[..c.min(3)],
                                &st.var[..c.min(3)],
                                &sv.mean()[..c.min(3)],
                                &sv.variance()[..c.min(3)]
                            )
                        },
                    );
                    let rs = bn.running_state()?;
                    let ok = match (&rs, &cpu_state) {
                        (None, None) => true,
                        (Some(a), Some(b)) => {
                            a.updates == b.updates
                                && close_f64(&a.mean, &b.mean, 1e-9)
                                && close_f64(&a.var, &b.var, 1e-9)
                        }
                        _ => false,
                    };
                    t.check(ok, || {
                        format!("{ctx}: running state {rs:?} vs cpu {cpu_state:?}")
                    });
                    // backward
                    let mut dx = DeviceTensor::filled(gpu, nan, &shape, layout)?;
                    bn.backward_into(&xd, &dyd, &saved, &mut dx)?;
                    let (mut dxc, mut gr) = (vec![T::from_f64(0.0); g.len()], Grads::default());
                    backward_into(
                        &cfg,
                        g,
                        &x,
                        &dyh,
                        &params,
                        &sv,
                        &mut dxc,
                        &mut gr,
                        &mut ws,
                        Parallelism::Sequential,
                    )?;
                    let bad = compare(&dx.download()?, &dxc, 64.0 * u);
                    t.check(bad.is_none(), || {
                        format!("{ctx}: backward dx {}", bad.clone().unwrap_or_default())
                    });
                    let gg = bn.grads()?;
                    // dγ = Σdy·(x − μ)·invstd is as sensitive to μ as Σdy is large: each
                    // side uses its own f64 mean (compared above), and with dy's mean 1000
                    // a difference of one rounding in μ ≈ 1000 moves dγ by |Σdy|·δμ·invstd,
                    // far beyond 1e-7 of dγ itself. Allowed: that, plus 1e-7 relative.
                    let (gm, cm, ci) = (&st.mean, sv.mean(), sv.invstd());
                    let dweight_ok = gg.dweight.len() == gr.dweight.len()
                        && (0..gr.dweight.len()).all(|ch| {
                            let moved = 2.0 * gr.dbias[ch].abs() * (gm[ch] - cm[ch]).abs() * ci[ch];
                            (gg.dweight[ch] - gr.dweight[ch]).abs()
                                <= 1e-7 * (1.0 + gr.dweight[ch].abs()) + moved
                        });
                    t.check(
                        dweight_ok && close_f64(&gg.dbias, &gr.dbias, 1e-7),
                        || {
                            format!(
                                "{ctx}: grads gpu dγ {:?} dβ {:?}, cpu dγ {:?} dβ {:?}, means gpu {:?} cpu {:?}",
                                &gg.dweight[..c.min(3)],
                                &gg.dbias[..c.min(3)],
                                &gr.dweight[..c.min(3)],
                                &gr.dbias[..c.min(3)],
                                &gm[..c.min(3)],
                                &cm[..c.min(3)]
                            )
                        },
                    );
                }
            }
        }
    }
    Ok(())
}

fn verify_extra(gpu: &Gpu, rng: &mut Rng, t: &mut Tally) -> Result<(), CudaError> {
    // Determinism: the same training step twice gives the same bits.
    let (layout, shape) = (Layout::NCHW, vec![8usize, 17, 33, 35]);
    let g = layout.geometry(&shape)?;
    let x: Vec<f32> = (0..g.len()).map(|_| rng.normal() as f32).collect();
    let cfg = Config::torch(17);
    let run = || -> Result<(Vec<f32>, RunningState), CudaError> {
        let mut bn = GpuBatchNorm::new(
            gpu,
            cfg.clone(),
            Params::init(&cfg),
            RunningState::init(&cfg),
        )?;
        let xd = DeviceTensor::upload(gpu, &x, &shape, layout)?;
        let (y, _, _) = bn.forward(&xd, Mode::Train)?;
        Ok((y.download()?, bn.running_state()?.expect("tracked")))
    };
    let (a, b) = (run()?, run()?);
    t.check(a.0 == b.0 && a.1 == b.1, || {
        "determinism: two identical training steps differ".into()
    });

    // Non-finite statistics: SkipChannel keeps the channel's state and reports it;
    // Error refuses the step and writes nothing.
    let (layout, shape) = (Layout::NC, vec![64usize, 3]);
    let mut x: Vec<f32> = (0..64 * 3).map(|_| rng.normal() as f32).collect();
    x[3] = f32::NAN; // row 1, channel 0
    for policy in [NonFinitePolicy::SkipChannel, NonFinitePolicy::Error] {
        let cfg = Config::torch(3).non_finite(policy);
        let state = RunningState::init(&cfg);
        let mut bn = GpuBatchNorm::new(gpu, cfg.clone(), Params::init(&cfg), state.clone())?;
        let xd = DeviceTensor::upload(gpu, &x, &shape, layout)?;
        let mut y = DeviceTensor::filled(gpu, f32::NAN, &shape, layout)?;
        let r = bn.forward_into(&xd, Mode::Train, &mut y, &mut GpuSaved::new());
        let rs = bn.running_state()?.expect("tracked");
        match policy {
            NonFinitePolicy::SkipChannel => {
                let skipped = bn.skipped_channels()?;
                t.check(
                    r.is_ok()
                        && skipped == [0]
                        && rs.mean[0] == 0.0
                        && rs.var[0] == 1.0
                        && rs.mean[1] != 0.0,
                    || format!("non-finite skip: {r:?} skipped {skipped:?} state {rs:?}"),
                );
            }
            NonFinitePolicy::Error => {
                let untouched = y.download()?.iter().all(|v| v.is_nan());
                t.check(matches!(r, Err(CudaError::Core(bnorm::Error::NonFiniteStatistics { ref channels })) if channels == &[0])
                    && Some(&rs) == state.as_ref() && untouched,
                    || format!("non-finite error: {r:?} state {rs:?} y untouched {untouched}"));
            }
        }
    }

    // Local moments equal the CPU's exact moments.
    let g = Layout::NHWC.geometry(&[4, 9, 11, 5])?;
    let x: Vec<bf16> = (0..g.len())
        .map(|_| bf16::from_f64(50.0 + rng.normal()))
        .collect();
    let cfg = Config::keras(5);
    let mut bn = GpuBatchNorm::new(
        gpu,
        cfg.clone(),
        Params::init(&cfg),
        RunningState::init(&cfg),
    )?;
    let m = bn.local_moments(&DeviceTensor::upload(
        gpu,
        &x,
        &[4, 9, 11, 5],
        Layout::NHWC,
    )?)?;
    let mut rc = bnorm::Recalibration::new(5);
    rc.add(g, &x)?;
    let ok = m.iter().zip(rc.moments()).all(|(a, b)| {
        a.count == b.count
            && (a.mean - b.mean).abs() <= 1e-9 * (1.0 + b.mean.abs())
            && (a.m2 - b.m2).abs() <= 1e-9 * (1.0 + b.m2.abs())
    });
    t.check(ok, || format!("local moments {m:?} vs {:?}", rc.moments()));

    // f64 reference (plain two-pass) on one f32 case, as a cross-check of the CPU path.
    let (layout, shape) = (Layout::NCDHW, vec![3usize, 4, 5, 6, 7]);
    let g = layout.geometry(&shape)?;
    let x: Vec<f32> = (0..g.len()).map(|_| (3.0 + rng.normal()) as f32).collect();
    let cfg = Config::torch(4);
    let p = Params::init(&cfg);
    let mut bn = GpuBatchNorm::new(gpu, cfg.clone(), p.clone(), RunningState::init(&cfg))?;
    let (y, _, _) = bn.forward(&DeviceTensor::upload(gpu, &x, &shape, layout)?, Mode::Train)?;
    let xr: Vec<f64> = x.iter().map(|v| *v as f64).collect();
    let r = bnorm::reference::forward(
        &cfg,
        layout,
        &shape,
        &xr,
        &p,
        RunningState::init(&cfg).as_ref(),
        Mode::Train,
    )?;
    let yg = y.download()?;
    let ok = yg
        .iter()
        .zip(&r.y)
        .all(|(a, b)| (*a as f64 - b).abs() <= 1e-6 * (1.0 + b.abs()));
    t.check(ok, || "f32 forward vs bnorm::reference (f64)".into());
    Ok(())
}

// ---------------------------------------------------------------- timing

struct Row {
    label: &'static str,
    layout: Layout,
    shape: String,
    dtype: &'static str,
    bytes: usize,
    copy_ms: f64,
    train_ms: f64,
    infer_ms: f64,
    bwd_ms: f64,
}

fn time_ms(
    gpu: &Gpu,
    iters: usize,
    mut f: impl FnMut() -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    // cudarc resolves the event functions on first use and panics if the driver lacks
    // one (cuEventElapsedTime_v2 needs R570+): a typed error instead.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let ctx = gpu.context();
        let drv = |e: cudarc::driver::DriverError| CudaError::Driver {
            op: "event",
            message: e.to_string(),
        };
        for _ in 0..3 {
            f()?;
        }
        let mut reps = Vec::new();
        for _ in 0..5 {
            let a = ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(drv)?;
            let b = ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(drv)?;
            a.record(gpu.stream()).map_err(drv)?;
            for _ in 0..iters {
                f()?;
            }
            b.record(gpu.stream()).map_err(drv)?;
            reps.push(a.elapsed_ms(&b).map_err(drv)? as f64 / iters as f64);
        }
        reps.sort_by(|x, y| x.total_cmp(y));
        Ok(reps[2])
    }))
    .unwrap_or_else(|_| {
        Err(CudaError::Driver {
            op: "timing with events",
            message: "the driver lacks an event function cudarc needs".into(),
        })
    })
}

fn bench_one<T: GpuElement>(
    gpu: &Gpu,
    label: &'static str,
    layout: Layout,
    shape: &[usize],
    iters: usize,
    rng: &mut Rng,
) -> Result<Row, CudaError> {
    let g = layout.geometry(shape)?;
    // A random block repeated: timing does not depend on the values, and generating
    // hundreds of millions of random numbers on the host would dominate the run.
    let block: Vec<T> = (0..(1 << 20)).map(|_| T::from_f64(rng.normal())).collect();
    let host: Vec<T> = block.iter().copied().cycle().take(g.len()).collect();
    let x = DeviceTensor::upload(gpu, &host, shape, layout)?;
    let dy = DeviceTensor::upload(gpu, &host, shape, layout)?;
    drop(host);
    let mut y = DeviceTensor::<T>::zeros(gpu, shape, layout)?;
    let mut dx = DeviceTensor::<T>::zeros(gpu, shape, layout)?;
    let cfg = Config::torch(g.channels);
    let mut bn = GpuBatchNorm::new(
        gpu,
        cfg.clone(),
        Params::init(&cfg),
        RunningState::init(&cfg),
    )?;
    let mut saved = GpuSaved::new();
    let copy_ms = time_ms(gpu, iters, || y.copy_from(&x))?;
    let train_ms = time_ms(gpu, iters, || {
        bn.forward_into(&x, Mode::Train, &mut y, &mut saved)
            .map(|_| ())
    })?;
    let mut saved_inf = GpuSaved::new();
    let infer_ms = time_ms(gpu, iters, || {
        bn.forward_into(&x, Mode::Inference, &mut y, &mut saved_inf)
            .map(|_| ())
    })?;
    bn.forward_into(&x, Mode::Train, &mut y, &mut saved)?;
    let bwd_ms = time_ms(gpu, iters, || bn.backward_into(&x, &dy, &saved, &mut dx))?;
    Ok(Row {
        label,
        layout,
        shape: format!("{shape:?}").replace(' ', ""),
        dtype: T::DTYPE.name(),
        bytes: x.num_bytes(),
        copy_ms,
        train_ms,
        infer_ms,
        bwd_ms,
    })
}

/// Tensor passes each step must move, as the cuDNN anchor (`cudnn_anchor.py`) counts
/// them: training and inference forward read x and write y (2), backward reads x and dy
/// and writes dx (3).
const PASSES: (f64, f64, f64) = (2.0, 2.0, 3.0);

/// Share of the copy rate: the step's tensor passes per second over the device-to-device
/// copy's 2 passes per second (timed in the same run).
fn pct(passes: f64, ms: f64, copy_ms: f64) -> f64 {
    100.0 * (passes / ms) / (2.0 / copy_ms)
}

/// The anchor's cases (`cudnn_anchor.py`: labels and shapes), 4-d ones in both NCHW and
/// channels-last (NHWC, the same bytes as PyTorch's channels_last).
fn bench_cases() -> Vec<(&'static str, Layout, Vec<usize>)> {
    let mut v = Vec::new();
    for (label, shape) in [
        ("S1", vec![32usize, 64, 56, 56]),
        ("S2", vec![32, 256, 14, 14]),
        ("S3", vec![4096, 1024]),
        ("S5", vec![64, 128, 56, 56]),
        ("L1", vec![256, 64, 112, 112]),
        ("L3", vec![65536, 4096]),
    ] {
        if shape.len() == 4 {
            let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
            v.push((label, Layout::NCHW, shape.clone()));
            v.push((label, Layout::NHWC, vec![n, h, w, c]));
        } else {
            v.push((label, Layout::NC, shape));
        }
    }
    v
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let value = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let iters: usize = value("--iters").and_then(|v| v.parse().ok()).unwrap_or(20);
    let seed: u64 = value("--seed")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(CudaError::Unavailable { reason }) => {
            println!("SKIPPED: CUDA unavailable: {reason}");
            std::process::exit(2);
        }
        Err(e) => {
            println!("FAIL: opening the GPU: {e}");
            std::process::exit(1);
        }
    };
    let nvrtc = bnorm_cuda::compile::nvrtc_version()
        .map_or_else(|e| format!("? ({e})"), |v| format!("{}.{}", v.0, v.1));
    let driver = gpu.driver_version().map_or_else(
        |e| format!("? ({e})"),
        |v| format!("{}.{}", v / 1000, v % 1000 / 10),
    );
    println!(
        "device: {} (sm_{}{}, {} SMs); driver CUDA {driver}; NVRTC {nvrtc}, compiled to {:?} \
         in {:.1} ms; seed {seed}",
        gpu.name(),
        gpu.compute_capability().0,
        gpu.compute_capability().1,
        gpu.sm_count(),
        gpu.compiled_to(),
        gpu.compile_ms()
    );
    let mut rng = Rng(seed);
    let mut failed = false;
    if !flag("--bench-only") {
        let mut t = Tally {
            passed: 0,
            failed: 0,
            lines: Vec::new(),
        };
        let r = verify_dtype::<f32>(&gpu, &mut rng, &mut t)
            .and_then(|_| verify_dtype::<f16>(&gpu, &mut rng, &mut t))
            .and_then(|_| verify_dtype::<bf16>(&gpu, &mut rng, &mut t))
            .and_then(|_| verify_extra(&gpu, &mut rng, &mut t));
        if let Err(e) = r {
            println!("FAIL: verification aborted: {e}");
            t.failed += 1;
        }
        println!("VERIFY: {} checks passed, {} failed", t.passed, t.failed);
        failed = t.failed > 0;
    }
    if !flag("--verify-only") {
        let mut rows = Vec::new();
        // --case LABEL, --layout NAME, --dtype NAME: only the matching cases (e.g. one
        // shape under a profiler)
        let keep = |f: &str, v: &str| value(f).is_none_or(|w| w.eq_ignore_ascii_case(v));
        for (label, layout, shape) in bench_cases() {
            if !keep("--case", label) || !keep("--layout", &layout.to_string()) {
                continue;
            }
            // the anchor's dtypes: f32, bf16, f16
            for dtype in 0..3 {
                if !keep("--dtype", ["f32", "bf16", "f16"][dtype]) {
                    continue;
                }
                let r = match dtype {
                    0 => bench_one::<f32>(&gpu, label, layout, &shape, iters, &mut rng),
                    1 => bench_one::<bf16>(&gpu, label, layout, &shape, iters, &mut rng),
                    _ => bench_one::<f16>(&gpu, label, layout, &shape, iters, &mut rng),
                };
                match r {
                    Ok(r) => rows.push(r),
                    Err(e) => {
                        println!("FAIL: bench {label} {layout}{shape:?}: {e}");
                        failed = true;
                    }
                }
            }
        }
        println!(
            "\n{:<3} {:<5} {:<20} {:<5} {:>9} {:>10} {:>6} {:>10} {:>6} {:>10} {:>6}",
            "",
            "",
            "shape",
            "dtype",
            "copy GB/s",
            "train ms",
            "%copy",
            "infer ms",
            "%copy",
            "bwd ms",
            "%copy"
        );
        let mut json = String::from("[\n");
        for (i, r) in rows.iter().enumerate() {
            println!(
                "{:<3} {:<5} {:<20} {:<5} {:>9.0} {:>10.4} {:>5.0}% {:>10.4} {:>5.0}% {:>10.4} {:>5.0}%",
                r.label,
                r.layout.to_string(),
                r.shape,
                r.dtype,
                2.0 * r.bytes as f64 / r.copy_ms / 1e6,
                r.train_ms,
                pct(PASSES.0, r.train_ms, r.copy_ms),
                r.infer_ms,
                pct(PASSES.1, r.infer_ms, r.copy_ms),
                r.bwd_ms,
                pct(PASSES.2, r.bwd_ms, r.copy_ms)
            );
            let _ = writeln!(
                json,
                "  {{\"label\": \"{}\", \"layout\": \"{}\", \"shape\": \"{}\", \"dtype\": \"{}\", \
                \"bytes\": {}, \"copy_ms\": {}, \"train_ms\": {}, \"infer_ms\": {}, \"bwd_ms\": {}}}{}",
                r.label,
                r.layout,
                r.shape,
                r.dtype,
                r.bytes,
                r.copy_ms,
                r.train_ms,
                r.infer_ms,
                r.bwd_ms,
                if i + 1 < rows.len() { "," } else { "" }
            );
        }
        json.push(']');
        println!(
            "(%copy as the cuDNN anchor counts: tensor passes per second — training and \
             inference forward 2 (x read, y written), backward 3 (x, dy read, dx written) — \
             over the device-to-device copy's 2 per second, copy timed in the same run)"
        );
        if let Some(path) = value("--json") {
            if let Err(e) = std::fs::write(&path, json + "\n") {
                println!("FAIL: writing {path}: {e}");
                failed = true;
            }
        }
    }
    std::process::exit(i32::from(failed));
}
