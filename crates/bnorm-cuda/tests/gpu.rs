//! Tests that need a GPU are `#[ignore]`d (shown as ignored by `cargo test`, never as
//! passed) unless `BNORM_REQUIRE_GPU=1` was set when building (build.rs); they then run,
//! and a missing GPU is a failure. `cargo test -p bnorm-cuda -- --ignored` runs them too.

use bnorm::expert::{backward_into, forward_into, Grads, Parallelism, Saved, Workspace};
use bnorm::{Config, Layout, Mode, Params, RunningState};
use bnorm_cuda::{CudaError, DeviceTensor, Gpu, GpuBatchNorm, GpuSaved};

/// The GPU, opened (and its kernels compiled) once for all tests; a test that asks for
/// one fails without it.
fn gpu() -> Gpu {
    static GPU: std::sync::OnceLock<Result<Gpu, String>> = std::sync::OnceLock::new();
    GPU.get_or_init(|| Gpu::new(0).map_err(|e| e.to_string()))
        .clone()
        .unwrap_or_else(|e| panic!("this test needs a GPU: {e}"))
}

#[test]
fn opening_without_cuda_is_a_typed_error_not_a_panic() {
    match bnorm_cuda::probe() {
        Ok(()) => println!("CUDA libraries present; Gpu::new is exercised by the other tests"),
        Err(CudaError::Unavailable { reason }) => {
            assert!(!reason.is_empty());
            match Gpu::new(0) {
                Err(CudaError::Unavailable { .. }) => {}
                other => panic!("expected Unavailable, got {other:?}"),
            }
            println!("no CUDA here ({reason}): Gpu::new returned Unavailable");
        }
        Err(e) => panic!("probe returned {e}"),
    }
}

fn data(n: usize, seed: u64, mean: f64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (mean + ((s >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0) as f32
        })
        .collect()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|x| *x as f32).collect()
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (*g as f64, *w as f64);
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: gpu {g} cpu {w}"
        );
    }
}

#[test]
#[cfg_attr(
    not(bnorm_gpu_tests),
    ignore = "needs an NVIDIA GPU: BNORM_REQUIRE_GPU=1 cargo test -p bnorm-cuda"
)]
fn forward_and_backward_match_the_cpu() {
    let gpu = gpu();
    for (layout, shape) in [
        (Layout::NCHW, vec![3usize, 5, 7, 9]),
        (Layout::NHWC, vec![3, 7, 9, 5]),
        (Layout::NC, vec![101, 5]),
    ] {
        let cfg = Config::torch(5);
        let g = layout.geometry(&shape).unwrap();
        let x = data(g.len(), 1, 1000.0);
        // dy with a large mean: the backward map must be centred on dy (review defect 1)
        let dyh = data(
            g.len(),
            2,
            if layout == Layout::NHWC { 1000.0 } else { 0.0 },
        );
        let params = Params {
            weight: Some(vec![0.5, 1.0, 1.5, 2.0, -1.0]),
            bias: Some(vec![0.1, 0.2, 0.3, 0.4, 0.5]),
        };
        for mode in [Mode::Train, Mode::Inference] {
            let mut state = RunningState::init(&cfg);
            if mode == Mode::Inference {
                let s = state.as_mut().unwrap();
                s.mean = vec![999.0, 1000.0, 1001.0, 1000.5, 998.0];
                s.var = vec![1.0, 2.0, 0.5, 1.5, 3.0];
                s.updates = 3;
            }
            let mut bn =
                GpuBatchNorm::new(&gpu, cfg.clone(), params.clone(), state.clone()).unwrap();
            let dx_ = DeviceTensor::upload(&gpu, &x, &shape, layout).unwrap();
            let mut y = DeviceTensor::filled(&gpu, f32::NAN, &shape, layout).unwrap();
            let mut saved = GpuSaved::new();
            bn.forward_into(&dx_, mode, &mut y, &mut saved).unwrap();
            let (mut yc, mut sv, mut ws) = (
                vec![0.0f32; g.len()],
                Saved::default(),
                Workspace::default(),
            );
            forward_into(
                &cfg,
                g,
                &x,
                &params,
                state.as_mut(),
                mode,
                &mut yc,
                &mut sv,
                &mut ws,
                Parallelism::Sequential,
            )
            .unwrap();
            close("y", &y.download().unwrap(), &yc, 1e-5);
            let st = bn.running_state().unwrap().unwrap();
            let sc = state.unwrap();
            for c in 0..5 {
                assert!((st.mean[c] - sc.mean[c]).abs() <= 1e-9 * (1.0 + sc.mean[c].abs()));
                assert!((st.var[c] - sc.var[c]).abs() <= 1e-9 * (1.0 + sc.var[c].abs()));
            }
            let dy = DeviceTensor::upload(&gpu, &dyh, &shape, layout).unwrap();
            let mut dx = DeviceTensor::filled(&gpu, f32::NAN, &shape, layout).unwrap();
            bn.backward_into(&dx_, &dy, &saved, &mut dx).unwrap();
            let (mut dxc, mut gr) = (vec![0.0f32; g.len()], Grads::default());
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
            )
            .unwrap();
            close("dx", &dx.download().unwrap(), &dxc, 1e-4);
            let gg = bn.grads().unwrap();
            for c in 0..5 {
                assert!((gg.dbias[c] - gr.dbias[c]).abs() <= 1e-6 * (1.0 + gr.dbias[c].abs()));
                assert!(
                    (gg.dweight[c] - gr.dweight[c]).abs() <= 1e-6 * (1.0 + gr.dweight[c].abs())
                );
            }
        }
    }
}

#[test]
#[cfg_attr(
    not(bnorm_gpu_tests),
    ignore = "needs an NVIDIA GPU: BNORM_REQUIRE_GPU=1 cargo test -p bnorm-cuda"
)]
fn unsupported_variants_and_bad_shapes_are_typed_errors() {
    let gpu = gpu();
    let cfg = Config::keras(2).variant(bnorm::config::Variant::Ghost(
        bnorm::config::Ghost::strided(2),
    ));
    let r = GpuBatchNorm::new(
        &gpu,
        cfg.clone(),
        Params::init(&cfg),
        RunningState::init(&cfg),
    );
    assert!(matches!(r, Err(CudaError::Unsupported { .. })));
    let cfg = Config::torch(3);
    let mut bn = GpuBatchNorm::new(
        &gpu,
        cfg.clone(),
        Params::init(&cfg),
        RunningState::init(&cfg),
    )
    .unwrap();
    let x = DeviceTensor::upload(&gpu, &[1.0f32; 8], &[4, 2], Layout::NC).unwrap();
    assert!(matches!(
        bn.forward(&x, Mode::Train),
        Err(CudaError::Core(_))
    ));
    let x = DeviceTensor::upload(&gpu, &[1.0f32; 3], &[1, 3], Layout::NC).unwrap();
    assert!(matches!(
        bn.forward(&x, Mode::Train),
        Err(CudaError::Core(bnorm::Error::BatchTooSmall { .. }))
    ));
}

/// State on the GPU: what is loaded is what is used, resuming from downloaded statistics
/// equals never stopping (bit for bit), and a failed forward changes nothing — not the
/// running statistics, not `saved`, not `y`.
#[test]
#[cfg_attr(
    not(bnorm_gpu_tests),
    ignore = "needs an NVIDIA GPU: BNORM_REQUIRE_GPU=1 cargo test -p bnorm-cuda"
)]
fn gpu_state_survives_reload_resume_and_failure() {
    let gpu = gpu();
    let shape = [6usize, 3, 4, 4];
    let n: usize = shape.iter().product();
    for cfg in [Config::torch(3), Config::keras(3), Config::tensorflow(3)] {
        let p = Params::init(&cfg);
        let upload = |s: u64| DeviceTensor::upload(&gpu, &data(n, s, 1.0), &shape, Layout::NCHW);
        let mut a =
            GpuBatchNorm::new(&gpu, cfg.clone(), p.clone(), RunningState::init(&cfg)).unwrap();
        let mut y = DeviceTensor::zeros(&gpu, &shape, Layout::NCHW).unwrap();
        let mut saved = GpuSaved::new();
        for s in 0..4 {
            a.forward_into(&upload(s).unwrap(), Mode::Train, &mut y, &mut saved)
                .unwrap();
        }
        // resume: a second layer loaded with the first one's downloaded state
        let state = a.running_state().unwrap();
        let mut b = GpuBatchNorm::new(&gpu, cfg.clone(), p.clone(), state.clone()).unwrap();
        assert_eq!(b.running_state().unwrap(), state, "{cfg:?}: loaded state");
        let mut yb = DeviceTensor::zeros(&gpu, &shape, Layout::NCHW).unwrap();
        let mut saved_b = GpuSaved::new();
        for s in 4..6 {
            let x = upload(s).unwrap();
            a.forward_into(&x, Mode::Train, &mut y, &mut saved).unwrap();
            b.forward_into(&x, Mode::Train, &mut yb, &mut saved_b)
                .unwrap();
            assert_eq!(y.download().unwrap(), yb.download().unwrap(), "{cfg:?}: y");
        }
        assert_eq!(
            a.running_state().unwrap(),
            b.running_state().unwrap(),
            "{cfg:?}"
        );

        // failure: a batch of one value per channel, after a good step, where the preset
        // refuses it (PyTorch); Keras and TensorFlow accept it (FORMAT.md, "Single values"):
        // then the GPU gives what the CPU gives, y = β and the running state's update
        let x = upload(9).unwrap();
        a.forward_into(&x, Mode::Train, &mut y, &mut saved).unwrap();
        let (before_state, before_saved) = (a.running_state().unwrap(), saved.download().unwrap());
        let one = DeviceTensor::upload(&gpu, &[1.0f32; 3], &[1, 3], Layout::NC).unwrap();
        let mut y1 = DeviceTensor::upload(&gpu, &[-7.0f32; 3], &[1, 3], Layout::NC).unwrap();
        let r = a.forward_into(&one, Mode::Train, &mut y1, &mut saved);
        if cfg.get_single_value() == bnorm::config::SingleValuePolicy::Refuse {
            assert!(r.is_err(), "{cfg:?}: {r:?}");
            assert_eq!(y1.download().unwrap(), vec![-7.0f32; 3]);
            assert_eq!(a.running_state().unwrap(), before_state);
            assert_eq!(saved.download().unwrap(), before_saved);
        } else {
            assert!(r.is_ok(), "{cfg:?}: {r:?}");
            let g = Layout::NC.geometry(&[1, 3]).unwrap();
            let mut cpu_state = before_state.clone();
            let (mut yc, mut sv, mut ws) =
                (vec![0.0f32; 3], Saved::default(), Workspace::default());
            forward_into(
                &cfg,
                g,
                &[1.0f32; 3],
                &p,
                cpu_state.as_mut(),
                Mode::Train,
                &mut yc,
                &mut sv,
                &mut ws,
                Parallelism::Sequential,
            )
            .unwrap();
            assert_eq!(
                yc,
                p.bias
                    .clone()
                    .unwrap()
                    .iter()
                    .map(|b| *b as f32)
                    .collect::<Vec<_>>()
            );
            assert_eq!(y1.download().unwrap(), yc, "{cfg:?}: y = β");
            let (gs, cs) = (a.running_state().unwrap().unwrap(), cpu_state.unwrap());
            assert_eq!(gs.updates, cs.updates);
            close("running mean", &f32s(&gs.mean), &f32s(&cs.mean), 1e-6);
            close("running var", &f32s(&gs.var), &f32s(&cs.var), 1e-6);
        }

        // failure after the statistics were computed: NaN refused by the policy
        let strict = cfg
            .clone()
            .non_finite(bnorm::config::NonFinitePolicy::Error);
        let mut c =
            GpuBatchNorm::new(&gpu, strict.clone(), p.clone(), before_state.clone()).unwrap();
        c.forward_into(&x, Mode::Train, &mut y, &mut saved).unwrap();
        let (state_c, saved_c) = (c.running_state().unwrap(), saved.download().unwrap());
        let mut nan = data(n, 3, 0.0);
        nan[5] = f32::NAN;
        let xn = DeviceTensor::upload(&gpu, &nan, &shape, Layout::NCHW).unwrap();
        assert!(c
            .forward_into(&xn, Mode::Train, &mut y, &mut saved)
            .is_err());
        assert_eq!(c.running_state().unwrap(), state_c);
        assert_eq!(saved.download().unwrap(), saved_c);
    }
}

/// Empty batches (review defect 15): an inference step and a backward step on a batch with
/// no values queue nothing, write nothing and give zero parameter gradients.
#[test]
#[cfg_attr(
    not(bnorm_gpu_tests),
    ignore = "needs an NVIDIA GPU: BNORM_REQUIRE_GPU=1 cargo test -p bnorm-cuda"
)]
fn empty_batches_are_no_ops() {
    let gpu = gpu();
    let cfg = Config::torch(3);
    let mut bn = GpuBatchNorm::new(
        &gpu,
        cfg.clone(),
        Params::init(&cfg),
        RunningState::init(&cfg),
    )
    .unwrap();
    let x = DeviceTensor::<f32>::upload(&gpu, &[], &[0, 3], Layout::NC).unwrap();
    let (y, saved, _) = bn.forward(&x, Mode::Inference).unwrap();
    assert!(y.download().unwrap().is_empty());
    let dx = bn.backward(&x, &y, &saved).unwrap();
    assert!(dx.download().unwrap().is_empty());
    let g = bn.grads().unwrap();
    assert_eq!((g.dweight, g.dbias), (vec![0.0; 3], vec![0.0; 3]));
}

/// Another library's memory (`ForeignTensor`, the f32 per-channel loads and stores, the
/// stream ordering that `bnorm.torch` uses on CUDA tensors): a step on borrowed buffers,
/// with parameters and running statistics taken from f32 device vectors and written back
/// to them, equals the same step through owned tensors and host-set state; the views
/// leave the memory to its owner; null and misaligned addresses are typed errors.
#[test]
#[cfg_attr(
    not(bnorm_gpu_tests),
    ignore = "needs an NVIDIA GPU: BNORM_REQUIRE_GPU=1 cargo test -p bnorm-cuda"
)]
fn foreign_memory_steps_equal_owned_ones() {
    use bnorm_cuda::{ForeignTensor, FOREIGN_ALIGN};
    let gpu = gpu();
    let c = 5;
    let cfg = Config::torch(c);
    let gamma: Vec<f64> = (0..c).map(|k| 0.5 + k as f64 * 0.25).collect();
    let beta: Vec<f64> = (0..c).map(|k| k as f64 - 2.0).collect();
    let params = Params {
        weight: Some(f32s(&gamma).iter().map(|v| *v as f64).collect()),
        bias: Some(f32s(&beta).iter().map(|v| *v as f64).collect()),
    };
    let (rm, rv) = (vec![0.25f32; c], vec![1.5f32; c]);
    let state = RunningState::from_values(
        &cfg,
        rm.iter().map(|v| *v as f64).collect(),
        rv.iter().map(|v| *v as f64).collect(),
        4,
    )
    .unwrap();
    for (layout, shape, counted) in [
        (Layout::NCHW, [6usize, c, 7, 3], true),
        (Layout::NHWC, [6, 7, 3, c], false),
    ] {
        // an i64 counter (num_batches_tracked) in the bytes of two f32 zeros
        let count = DeviceTensor::<f32>::zeros(&gpu, &[1, 2], Layout::NC).unwrap();
        let xs = data(shape.iter().product(), 11, 3.0);
        let dys = data(xs.len(), 12, 0.0);
        // the reference: owned tensors, state set from the host
        let mut owned =
            GpuBatchNorm::new(&gpu, cfg.clone(), params.clone(), Some(state.clone())).unwrap();
        let x = DeviceTensor::upload(&gpu, &xs, &shape, layout).unwrap();
        let dy = DeviceTensor::upload(&gpu, &dys, &shape, layout).unwrap();
        let (y_ref, saved_ref, _) = owned.forward(&x, Mode::Train).unwrap();
        let dx_ref = owned.backward(&x, &dy, &saved_ref).unwrap();
        let want_state = owned.running_state().unwrap().unwrap();
        let want_grads = owned.grads().unwrap();
        // the same step on "foreign" memory: device buffers addressed by number
        let mut bn = GpuBatchNorm::new(
            &gpu,
            cfg.clone(),
            Params::init(&cfg),
            RunningState::init(&cfg),
        )
        .unwrap();
        let w = DeviceTensor::upload(&gpu, &f32s(&gamma), &[1, c], Layout::NC).unwrap();
        let b = DeviceTensor::upload(&gpu, &f32s(&beta), &[1, c], Layout::NC).unwrap();
        let m = DeviceTensor::upload(&gpu, &rm, &[1, c], Layout::NC).unwrap();
        let v = DeviceTensor::upload(&gpu, &rv, &[1, c], Layout::NC).unwrap();
        let dg = DeviceTensor::<f32>::zeros(&gpu, &[1, c], Layout::NC).unwrap();
        let db = DeviceTensor::<f32>::zeros(&gpu, &[1, c], Layout::NC).unwrap();
        let y = DeviceTensor::<f32>::filled(&gpu, f32::NAN, &shape, layout).unwrap();
        let dx = DeviceTensor::<f32>::filled(&gpu, f32::NAN, &shape, layout).unwrap();
        let a = |t: &DeviceTensor<f32>| t.device_address();
        // SAFETY: every address is an owned tensor above of the size the call uses, alive
        // until the end of the test; stream 0 is the legacy default stream.
        unsafe {
            bn.wait_for_stream(0).unwrap();
            bn.load_f32(Some((a(&w), a(&b))), Some(((a(&m), a(&v)), 4)))
                .unwrap();
            let xv = ForeignTensor::<f32>::new(&gpu, a(&x), &shape, layout).unwrap();
            let mut yv = ForeignTensor::<f32>::new(&gpu, a(&y), &shape, layout).unwrap();
            let mut saved = GpuSaved::new();
            let report = bn
                .forward_into(&xv, Mode::Train, &mut yv, &mut saved)
                .unwrap();
            assert!(report.updated);
            bn.store_running_f32((a(&m), a(&v)), counted.then(|| a(&count)))
                .unwrap();
            let dyv = ForeignTensor::<f32>::new(&gpu, a(&dy), &shape, layout).unwrap();
            let mut dxv = ForeignTensor::<f32>::new(&gpu, a(&dx), &shape, layout).unwrap();
            bn.backward_into(&xv, &dyv, &saved, &mut dxv).unwrap();
            bn.store_grads_f32((a(&dg), a(&db))).unwrap();
            bn.release_to_stream(0).unwrap();
        }
        gpu.synchronize().unwrap();
        // the views dropped without freeing: the owned tensors still read back
        let down = |t: &DeviceTensor<f32>| t.download().unwrap();
        for (what, got, want) in [
            ("y", down(&y), down(&y_ref)),
            ("dx", down(&dx), down(&dx_ref)),
            ("running mean", down(&m), f32s(&want_state.mean)),
            ("running var", down(&v), f32s(&want_state.var)),
            ("dgamma", down(&dg), f32s(&want_grads.dweight)),
            ("dbeta", down(&db), f32s(&want_grads.dbias)),
        ] {
            close(what, &got, &want, 0.0);
        }
        assert_eq!(bn.running_state().unwrap().unwrap().updates, 5);
        let words = count.download().unwrap();
        let counter = words[0].to_bits() as u64 | (words[1].to_bits() as u64) << 32;
        assert_eq!(
            counter,
            u64::from(counted),
            "the counter moves exactly when given"
        );
    }
    // addresses that cannot be used
    let x = DeviceTensor::<f32>::zeros(&gpu, &[4, 4], Layout::NC).unwrap();
    for (address, what) in [(0, "null"), (x.device_address() + 4, "aligned")] {
        // SAFETY: refused before any use of the address.
        match unsafe { ForeignTensor::<f32>::new(&gpu, address, &[4, 4], Layout::NC) } {
            Err(CudaError::Foreign { reason }) => assert!(reason.contains(what), "{reason}"),
            other => panic!("expected Foreign, got {:?}", other.map(|_| ())),
        }
    }
    assert_eq!(FOREIGN_ALIGN, 16);
}

/// `Gpu::restoring_context` leaves the calling thread's current context as it found it
/// (none, or the one that was current), whatever bnorm's calls bound in between.
#[test]
#[cfg_attr(
    not(bnorm_gpu_tests),
    ignore = "needs an NVIDIA GPU: BNORM_REQUIRE_GPU=1 cargo test -p bnorm-cuda"
)]
fn the_callers_context_is_restored() {
    use cudarc::driver::result::ctx;
    let gpu = gpu();
    std::thread::spawn(move || {
        // a fresh thread has no current context
        let none = ctx::get_current().unwrap();
        assert!(none.is_none());
        gpu.restoring_context(|| gpu.synchronize().unwrap())
            .unwrap();
        assert_eq!(ctx::get_current().unwrap(), none, "left unbound, as found");
        gpu.synchronize().unwrap();
        let ours = ctx::get_current().unwrap();
        assert!(ours.is_some());
        gpu.restoring_context(|| gpu.synchronize().unwrap())
            .unwrap();
        assert_eq!(
            ctx::get_current().unwrap(),
            ours,
            "the context that was current"
        );
    })
    .join()
    .unwrap();
}
