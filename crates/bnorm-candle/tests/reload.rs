//! The candle layer's state survives the usual reload (build the model, then
//! `varmap.load(path)`), resumes exactly, refuses invalid loaded values without changing
//! anything, and keeps bnorm's typed errors.

use bnorm::{Config, Layout, Mode};
use bnorm_candle::{bnorm_error, BatchNorm};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

fn model(cfg: &Config, dtype: DType) -> (VarMap, BatchNorm) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
    let bn = BatchNorm::new(cfg.clone(), Layout::NCHW, vb.pp("bn")).unwrap();
    (vm, bn)
}

fn batch(seed: u64, dtype: DType) -> Tensor {
    let mut s = seed;
    let v: Vec<f64> = (0..2 * 3 * 4 * 4)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64 * 3.0 + (i % 3) as f64 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, (2, 3, 4, 4), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn save(vm: &VarMap, name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("bnorm-candle-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    vm.save(&path).unwrap();
    path
}

#[test]
fn a_model_reloaded_with_varmap_load_infers_and_trains_as_the_saved_one() {
    for cfg in [Config::torch(3), Config::keras(3), Config::tensorflow(3)] {
        let (vm, trained) = model(&cfg, DType::F64);
        for s in 0..4 {
            trained
                .forward_mode(&batch(s, DType::F64), Mode::Train)
                .unwrap();
        }
        let path = save(&vm, "f64.safetensors");

        // The usual reload: build the model first, then load the file into its VarMap.
        let (mut vm2, reloaded) = model(&cfg, DType::F64);
        vm2.load(&path).unwrap();
        assert_eq!(
            reloaded.running_state().unwrap(),
            trained.running_state().unwrap(),
            "{cfg:?}: loaded statistics"
        );
        assert!(!reloaded.is_cold().unwrap());
        let x = batch(9, DType::F64);
        let want = values(&trained.forward_mode(&x, Mode::Inference).unwrap());
        let got = values(&reloaded.forward_mode(&x, Mode::Inference).unwrap());
        assert_eq!(got, want, "{cfg:?}: inference after VarMap::load");

        // Training on continues from the loaded values exactly.
        for s in 10..12 {
            trained
                .forward_mode(&batch(s, DType::F64), Mode::Train)
                .unwrap();
            reloaded
                .forward_mode(&batch(s, DType::F64), Mode::Train)
                .unwrap();
        }
        assert_eq!(
            reloaded.running_state().unwrap(),
            trained.running_state().unwrap(),
            "{cfg:?}: resumed training"
        );
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn an_f32_model_reloaded_infers_within_f32_rounding() {
    let cfg = Config::torch(3);
    let (vm, trained) = model(&cfg, DType::F32);
    for s in 0..4 {
        trained
            .forward_mode(&batch(s, DType::F32), Mode::Train)
            .unwrap();
    }
    let path = save(&vm, "f32.safetensors");
    let (mut vm2, reloaded) = model(&cfg, DType::F32);
    let x = batch(9, DType::F32);
    let fresh = values(&reloaded.forward_mode(&x, Mode::Inference).unwrap());
    vm2.load(&path).unwrap();
    let want = values(&trained.forward_mode(&x, Mode::Inference).unwrap());
    let got = values(&reloaded.forward_mode(&x, Mode::Inference).unwrap());
    let err = |a: &[f64]| {
        a.iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
    };
    assert!(err(&got) < 1e-5, "reloaded: off by {}", err(&got));
    assert!(
        err(&fresh) > 0.1,
        "the check can fail: a fresh model is off by {}",
        err(&fresh)
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn invalid_values_loaded_into_the_variables_are_refused_and_change_nothing() {
    let cfg = Config::torch(3);
    let (vm, bn) = model(&cfg, DType::F64);
    bn.forward_mode(&batch(0, DType::F64), Mode::Train).unwrap();
    let before = bn.running_state().unwrap();
    let rv = vm.data().lock().unwrap()["bn.running_var"].clone();
    let good = rv.as_tensor().copy().unwrap();
    rv.set(&Tensor::new(&[1.0f64, -1.0, 1.0], &Device::Cpu).unwrap())
        .unwrap();
    let err = bn
        .forward_mode(&batch(1, DType::F64), Mode::Train)
        .unwrap_err();
    assert_eq!(
        bnorm_error(&err),
        Some(&bnorm::Error::NegativeVariance {
            what: "running_var",
            channel: 1
        }),
        "{err}"
    );
    assert!(bn.running_state().is_err());
    // put the good values back: the layer is as before the bad load
    rv.set(&good).unwrap();
    assert_eq!(bn.running_state().unwrap(), before);
}

#[test]
fn bnorm_errors_keep_their_type_through_the_layer() {
    let (_vm, bn) = model(&Config::torch(3), DType::F32);
    let four_channels = Tensor::zeros((2, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let err = bn.forward_mode(&four_channels, Mode::Train).unwrap_err();
    assert_eq!(
        bnorm_error(&err),
        Some(&bnorm::Error::ChannelMismatch {
            expected: 3,
            got: 4
        })
    );
    assert!(err.to_string().contains("channel axis"), "{err}");
    let other = candle_core::Error::msg("not ours");
    assert_eq!(bnorm_error(&other), None);
}
