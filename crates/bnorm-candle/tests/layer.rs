//! The candle layer: gradients, agreement with candle-nn, modes, PyTorch names.

use bnorm::{Config, Layout, Mode, Momentum};
use bnorm_candle::BatchNorm;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};

fn layer(cfg: Config, layout: Layout) -> (VarMap, BatchNorm) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    let bn = BatchNorm::new(cfg, layout, vb.pp("bn")).unwrap();
    (vm, bn)
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed;
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn gradients_equal_finite_differences() {
    for (layout, shape) in [
        (Layout::NCHW, vec![3, 2, 3, 2]),
        (Layout::NHWC, vec![3, 2, 2, 2]),
        (Layout::NC, vec![5, 2]),
    ] {
        for mode in [Mode::Train, Mode::Frozen] {
            let (vm, bn) = layer(Config::torch(2), layout);
            // non-trivial gamma/beta
            for (name, v) in [("bn.weight", [1.5, 0.5]), ("bn.bias", [0.2, -0.3])] {
                vm.data().lock().unwrap()[name]
                    .set(&Tensor::new(&v, &Device::Cpu).unwrap())
                    .unwrap();
            }
            let x = Var::from_tensor(&randn(&shape, 1)).unwrap();
            let w = randn(&shape, 2);
            let loss = |t: &Tensor| -> f64 {
                bn.forward_mode(t, mode)
                    .unwrap()
                    .mul(&w)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let y = bn.forward_mode(x.as_tensor(), mode).unwrap();
            let grads = y.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = grads
                .get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let xv = x
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let h = 1e-6;
            for i in 0..xv.len() {
                let mut p = xv.clone();
                let mut m = xv.clone();
                p[i] += h;
                m[i] -= h;
                let tp = Tensor::from_vec(p, shape.as_slice(), &Device::Cpu).unwrap();
                let tm = Tensor::from_vec(m, shape.as_slice(), &Device::Cpu).unwrap();
                let num = (loss(&tp) - loss(&tm)) / (2.0 * h);
                assert!(
                    (num - dx[i]).abs() < 1e-6 * (1.0 + num.abs()),
                    "{layout} {mode:?} dx[{i}]: {num} vs {}",
                    dx[i]
                );
            }
            let vars = vm.data().lock().unwrap().clone();
            let dw = grads
                .get(vars["bn.weight"].as_tensor())
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let db = grads
                .get(vars["bn.bias"].as_tensor())
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for ch in 0..2 {
                for (name, analytic) in [("bn.weight", dw[ch]), ("bn.bias", db[ch])] {
                    let var = &vars[name];
                    let orig = var.as_tensor().to_vec1::<f64>().unwrap();
                    let bump = |d: f64| {
                        let mut v = orig.clone();
                        v[ch] += d;
                        var.set(&Tensor::new(v.as_slice(), &Device::Cpu).unwrap())
                            .unwrap();
                        let l = loss(x.as_tensor());
                        var.set(&Tensor::new(orig.as_slice(), &Device::Cpu).unwrap())
                            .unwrap();
                        l
                    };
                    let num = (bump(h) - bump(-h)) / (2.0 * h);
                    assert!(
                        (num - analytic).abs() < 1e-6 * (1.0 + num.abs()),
                        "{layout} {mode:?} {name}[{ch}]: {num} vs {analytic}"
                    );
                }
            }
        }
    }
}

#[test]
fn agrees_with_candle_nn_on_the_pytorch_convention() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let ours = BatchNorm::new(Config::torch(4), Layout::NCHW, vb.pp("ours")).unwrap();
    let theirs =
        candle_nn::batch_norm(4, candle_nn::BatchNormConfig::default(), vb.pp("theirs")).unwrap();
    for step in 0..4 {
        let x = (randn(&[6, 4, 5, 5], step).to_dtype(DType::F32).unwrap() * 3.0).unwrap();
        let a = ours.forward_t(&x, true).unwrap();
        let b = theirs.forward_t(&x, true).unwrap();
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "train step {step}: max |diff| {diff}");
        let rm_a = ours.running_state().unwrap().unwrap().mean;
        let rm_b = theirs.running_mean().to_vec1::<f32>().unwrap();
        let rv_a = ours.running_state().unwrap().unwrap().var;
        let rv_b = theirs.running_var().to_vec1::<f32>().unwrap();
        for c in 0..4 {
            assert!((rm_a[c] - rm_b[c] as f64).abs() < 1e-5);
            assert!((rv_a[c] - rv_b[c] as f64).abs() < 1e-5);
        }
    }
    let x = randn(&[2, 4, 5, 5], 77).to_dtype(DType::F32).unwrap();
    let a = ours.forward_t(&x, false).unwrap();
    let b = theirs.forward_t(&x, false).unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "inference: max |diff| {diff}");
}

#[test]
fn only_training_steps_update_running_statistics() {
    let (_, bn) = layer(Config::keras(3), Layout::NHWC);
    let x = randn(&[4, 2, 2, 3], 3);
    bn.forward_mode(&x, Mode::Train).unwrap();
    let after_train = bn.running_state().unwrap().unwrap();
    assert_eq!(after_train.updates, 1);
    assert_eq!(bn.recent_batch_stats().len(), 1);
    for mode in [Mode::Inference, Mode::Frozen] {
        bn.forward_mode(&x, mode).unwrap();
        assert_eq!(
            bn.running_state().unwrap().unwrap(),
            after_train,
            "{mode:?} changed the state"
        );
    }
    // A refused step changes nothing either (an empty batch: the Keras preset accepts one
    // value per channel, as Keras does).
    let empty = Tensor::zeros((0, 1, 1, 3), DType::F64, &Device::Cpu).unwrap();
    assert!(bn.forward_mode(&empty, Mode::Train).is_err());
    assert_eq!(bn.running_state().unwrap().unwrap(), after_train);
}

#[test]
fn saves_and_loads_under_pytorch_names() {
    let dev = Device::Cpu;
    let (vm, bn) = layer(
        Config::torch(3).momentum(Momentum::NewWeight(0.3)),
        Layout::NCHW,
    );
    for s in 0..3 {
        bn.forward_mode(&randn(&[4, 3, 2, 2], s), Mode::Train)
            .unwrap();
    }
    let dir = std::env::temp_dir().join(format!("bnorm-candle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bn.safetensors");
    vm.save(&path).unwrap();
    let loaded = candle_core::safetensors::load(&path, &dev).unwrap();
    for name in [
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    ] {
        assert!(
            loaded.contains_key(name),
            "{name} missing from {:?}",
            loaded.keys()
        );
    }
    assert_eq!(loaded["bn.num_batches_tracked"].dtype(), DType::I64);
    assert_eq!(
        loaded["bn.num_batches_tracked"].to_scalar::<i64>().unwrap(),
        3
    );
    let bytes = std::fs::read(&path).unwrap();
    let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F64, &dev).unwrap();
    let again = BatchNorm::new(
        Config::torch(3).momentum(Momentum::NewWeight(0.3)),
        Layout::NCHW,
        vb.pp("bn"),
    )
    .unwrap();
    let (a, b) = (
        bn.running_state().unwrap().unwrap(),
        again.running_state().unwrap().unwrap(),
    );
    assert_eq!(a.updates, b.updates);
    for c in 0..3 {
        assert!((a.mean[c] - b.mean[c]).abs() < 1e-12 && (a.var[c] - b.var[c]).abs() < 1e-12);
    }
    let x = randn(&[2, 3, 2, 2], 9);
    let ya = bn.forward_mode(&x, Mode::Inference).unwrap();
    let yb = again.forward_mode(&x, Mode::Inference).unwrap();
    let d = (ya - yb)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(d < 1e-12);

    // An older checkpoint without num_batches_tracked loads with a zero counter.
    let mut t = std::collections::HashMap::new();
    t.insert(
        "weight".to_string(),
        Tensor::new(&[1.0f32, 2.0, 3.0], &dev).unwrap(),
    );
    t.insert(
        "bias".to_string(),
        Tensor::new(&[0.0f32, 0.0, 0.0], &dev).unwrap(),
    );
    t.insert(
        "running_mean".to_string(),
        Tensor::new(&[0.5f32, 0.5, 0.5], &dev).unwrap(),
    );
    t.insert(
        "running_var".to_string(),
        Tensor::new(&[2.0f32, 2.0, 2.0], &dev).unwrap(),
    );
    let vb = VarBuilder::from_tensors(t.clone(), DType::F32, &dev);
    let old = BatchNorm::new(Config::torch(3), Layout::NCHW, vb).unwrap();
    assert_eq!(old.running_state().unwrap().unwrap().updates, 0);
    assert!(
        old.is_cold().unwrap(),
        "a checkpoint without a counter is reported as cold"
    );
    let xc = randn(&[2, 3, 2, 2], 5).to_dtype(DType::F32).unwrap();
    old.forward_mode(&xc, Mode::Inference).unwrap();
    assert!(old.last_report().cold_statistics);
    assert!(!bn.is_cold().unwrap());
    assert_eq!(old.running_state().unwrap().unwrap().var, vec![2.0; 3]);

    // Corrupt checkpoints are refused with a clear error.
    let mut bad = t.clone();
    bad.insert(
        "running_var".to_string(),
        Tensor::new(&[1.0f32, -1.0, 1.0], &dev).unwrap(),
    );
    let err = BatchNorm::new(
        Config::torch(3),
        Layout::NCHW,
        VarBuilder::from_tensors(bad, DType::F32, &dev),
    )
    .unwrap_err();
    assert!(err.to_string().contains("running_var"), "{err}");
    let mut bad = t;
    bad.insert(
        "weight".to_string(),
        Tensor::new(&[1.0f32, f32::NAN, 1.0], &dev).unwrap(),
    );
    assert!(BatchNorm::new(
        Config::torch(3),
        Layout::NCHW,
        VarBuilder::from_tensors(bad, DType::F32, &dev)
    )
    .is_err());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn recalibration_sets_population_statistics_of_every_layer() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
    let bn1 = BatchNorm::new(Config::torch(3), Layout::NC, vb.pp("bn1")).unwrap();
    let bn2 = BatchNorm::new(Config::keras(3), Layout::NC, vb.pp("bn2")).unwrap();
    let w = Tensor::new(
        &[[1.0f64, 0.5, 0.0], [0.0, 2.0, -1.0], [0.3, 0.0, 1.0]],
        &dev,
    )
    .unwrap();
    let forward = |x: &Tensor| -> candle_core::Result<Tensor> {
        let h = bn1.forward_mode(x, Mode::Inference)?.matmul(&w)?;
        bn2.forward_mode(&h, Mode::Inference)
    };
    // batches of uneven size, far from the initial statistics
    let batches: Vec<Tensor> = [5usize, 7, 2]
        .iter()
        .enumerate()
        .map(|(i, &n)| ((randn(&[n, 3], 10 + i as u64) * 3.0).unwrap() + 7.0).unwrap())
        .collect();
    // the inputs bn2 sees: bn1 normalizing each batch by its own statistics
    let mut h_all = Vec::new();
    for b in &batches {
        let (vm2, probe) = layer(Config::torch(3), Layout::NC);
        drop(vm2);
        let h = probe
            .forward_mode(b, Mode::Train)
            .unwrap()
            .matmul(&w)
            .unwrap();
        h_all.push(h);
    }
    bnorm_candle::recalibrate(&[&bn1, &bn2], batches.iter(), forward).unwrap();
    let pop = |ts: &[Tensor]| -> (Vec<f64>, Vec<f64>) {
        let all = Tensor::cat(ts, 0).unwrap().to_vec2::<f64>().unwrap();
        let n = all.len() as f64;
        let mean: Vec<f64> = (0..3)
            .map(|k| all.iter().map(|r| r[k]).sum::<f64>() / n)
            .collect();
        let var = (0..3)
            .map(|k| all.iter().map(|r| (r[k] - mean[k]).powi(2)).sum::<f64>() / n)
            .collect();
        (mean, var)
    };
    let (m1, v1) = pop(&batches);
    let (m2, v2) = pop(&h_all);
    let (s1, s2) = (
        bn1.running_state().unwrap().unwrap(),
        bn2.running_state().unwrap().unwrap(),
    );
    for k in 0..3 {
        assert!((s1.mean[k] - m1[k]).abs() < 1e-10);
        assert!(
            (s1.var[k] - v1[k] * 14.0 / 13.0).abs() < 1e-9,
            "torch: unbiased"
        );
        assert!((s2.mean[k] - m2[k]).abs() < 1e-10);
        assert!((s2.var[k] - v2[k]).abs() < 1e-9, "keras: biased");
    }
    // and the candle variables mirror them, for saving
    let rm = vm.data().lock().unwrap()["bn1.running_mean"]
        .as_tensor()
        .to_vec1::<f64>()
        .unwrap();
    assert!((rm[0] - m1[0]).abs() < 1e-10);
    assert!(
        bn1.recent_batch_stats().is_empty(),
        "recalibration is not training"
    );
}

/// Masked batch norm through candle's autograd equals bnorm's float64 reference (output,
/// running statistics, and the gradients of x, gamma and beta), channels-last and
/// channels-first; a mask of the wrong shape is a typed error.
#[test]
fn masked_steps_match_the_reference_through_autograd() {
    for (layout, shape, mask) in [
        (
            Layout::NLC,
            [3usize, 4, 2],
            vec![1u8, 1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0],
        ),
        (Layout::NCL, [3, 2, 4], vec![1, 0, 1, 1, 0, 1]),
    ] {
        let c = shape[layout.channel_axis()];
        let cfg = Config::keras(c);
        let (vm, bn) = layer(cfg.clone(), layout);
        let x = Var::from_tensor(&randn(&shape, 3)).unwrap();
        let rows: Vec<usize> = shape[..2].to_vec();
        let m = Tensor::from_vec(mask.clone(), rows.as_slice(), &Device::Cpu).unwrap();
        let y = bn.forward_masked(x.as_tensor(), &m, Mode::Train).unwrap();
        let dy = randn(&shape, 4);
        let grads = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();

        let xs: Vec<f64> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let dys: Vec<f64> = dy.flatten_all().unwrap().to_vec1().unwrap();
        let flags: Vec<bool> = mask.iter().map(|&v| v != 0).collect();
        let p = bnorm::Params::init(&cfg);
        let s0 = bnorm::RunningState::init(&cfg);
        let r = bnorm::reference::forward_masked(
            &cfg,
            layout,
            &shape,
            &xs,
            &flags,
            &p,
            s0.as_ref(),
            Mode::Train,
        )
        .unwrap();
        let rb = bnorm::reference::backward_masked(&cfg, layout, &shape, &xs, &dys, &flags, &p, &r)
            .unwrap();
        let close = |what: &str, got: &[f64], want: &[f64]| {
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-10 * (1.0 + w.abs()),
                    "{what}[{i}]: {g} vs {w}"
                );
            }
        };
        let yv: Vec<f64> = y.flatten_all().unwrap().to_vec1().unwrap();
        close("y", &yv, &r.y);
        let dx: Vec<f64> = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        close("dx", &dx, &rb.dx);
        let vars = vm.data().lock().unwrap();
        let gamma = vars.get("bn.weight").unwrap();
        let dg: Vec<f64> = grads.get(gamma).unwrap().to_vec1().unwrap();
        close("dgamma", &dg, &rb.dweight);
        let beta = vars.get("bn.bias").unwrap();
        let db: Vec<f64> = grads.get(beta).unwrap().to_vec1().unwrap();
        close("dbeta", &db, &rb.dbias);
        drop(vars);
        let s = bn.running_state().unwrap().unwrap();
        close("running mean", &s.mean, &r.state.as_ref().unwrap().mean);
        close("running var", &s.var, &r.state.as_ref().unwrap().var);

        let wrong = Tensor::ones(shape[0], DType::U8, &Device::Cpu).unwrap();
        let e = bn
            .forward_masked(x.as_tensor(), &wrong, Mode::Train)
            .unwrap_err();
        assert!(matches!(
            bnorm_candle::bnorm_error(&e),
            Some(bnorm::Error::LengthMismatch { what: "mask", .. })
        ));
    }
}
