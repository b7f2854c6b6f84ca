//! Recalibration, deferred updates, the cold-statistics guard, renorm schedules and ghost
//! update policies, each against an independent float64 computation.
#![allow(clippy::needless_range_loop)]

mod common;

use bnorm::config::{
    ColdPolicy, Ghost, GhostGrouping, GhostRemainder, GhostUpdate, Renorm, RenormSchedule, Variant,
};
use bnorm::expert::{forward_into, Parallelism, Saved, Workspace};
use bnorm::{Config, Error, Layout, Mode, Momentum, Params, Recalibration, RunningState};
use common::Rng;
use proptest::prelude::*;

/// Population mean and biased variance per channel of NC data, the textbook way.
fn population(x: &[f64], c: usize) -> (Vec<f64>, Vec<f64>) {
    let n = x.len() / c;
    let mean: Vec<f64> = (0..c)
        .map(|k| (0..n).map(|i| x[i * c + k]).sum::<f64>() / n as f64)
        .collect();
    let var = (0..c)
        .map(|k| {
            (0..n)
                .map(|i| (x[i * c + k] - mean[k]).powi(2))
                .sum::<f64>()
                / n as f64
        })
        .collect();
    (mean, var)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any split of a data set into batches recalibrates to the statistics of the whole.
    #[test]
    fn any_split_recalibrates_to_the_same_statistics(
        rows in 2usize..60,
        c in 1usize..5,
        cuts in prop::collection::vec(0usize..60, 0..6),
        seed in any::<u64>(),
        offset in -1e4f64..1e4,
    ) {
        let mut rng = Rng(seed);
        let x = rng.vec(rows * c, offset, 2.0);
        let mut cuts: Vec<usize> = cuts.into_iter().map(|k| k % rows).collect();
        cuts.extend([0, rows]);
        cuts.sort_unstable();
        cuts.dedup();
        let mut recal = Recalibration::new(c);
        for w in cuts.windows(2) {
            let part = &x[w[0] * c..w[1] * c];
            recal.add(Layout::NC.geometry(&[w[1] - w[0], c]).unwrap(), part).unwrap();
        }
        let (mean, var) = population(&x, c);
        for k in 0..c {
            let m = recal.moments()[k];
            prop_assert_eq!(m.count, rows as f64);
            prop_assert!((m.mean - mean[k]).abs() <= 1e-12 * (1.0 + mean[k].abs()));
            prop_assert!((m.variance_biased() - var[k]).abs() <= 1e-9 * var[k].max(1e-300) + 1e-12);
        }
        for (cfg, unbiased) in [(Config::torch(c), true), (Config::keras(c), false)] {
            let mut s = RunningState::init(&cfg).unwrap();
            if rows >= 2 {
                recal.apply(&cfg, &mut s).unwrap();
                for k in 0..c {
                    let want = if unbiased { var[k] * rows as f64 / (rows - 1) as f64 } else { var[k] };
                    prop_assert!((s.var[k] - want).abs() <= 1e-9 * want + 1e-12);
                    prop_assert!((s.mean[k] - mean[k]).abs() <= 1e-12 * (1.0 + mean[k].abs()));
                }
                prop_assert_eq!(s.updates, 1);
            }
        }
    }
}

#[test]
fn recalibration_refuses_and_changes_nothing_on_bad_input() {
    let cfg = Config::torch(2);
    let mut s = RunningState::init(&cfg).unwrap();
    let before = s.clone();
    let mut r = Recalibration::new(2);
    r.add(Layout::NC.geometry(&[1, 2]).unwrap(), &[1.0f32, 2.0])
        .unwrap();
    assert_eq!(
        r.apply(&cfg, &mut s),
        Err(Error::BatchTooSmall { channel_values: 1 })
    );
    assert_eq!(s, before);
    assert!(r
        .add(Layout::NC.geometry(&[2, 3]).unwrap(), &[0.0f32; 6])
        .is_err());
    r.add(
        Layout::NC.geometry(&[2, 2]).unwrap(),
        &[f32::NAN, 1.0, 2.0, 3.0],
    )
    .unwrap();
    assert!(matches!(
        r.apply(&cfg, &mut s),
        Err(Error::NonFiniteStatistics { .. })
    ));
    assert_eq!(s, before);
}

fn step(cfg: &Config, x: &[f64], c: usize, state: &mut RunningState) {
    let g = Layout::NC.geometry(&[x.len() / c, c]).unwrap();
    let mut y = vec![0.0; x.len()];
    forward_into(
        cfg,
        g,
        x,
        &Params::init(cfg),
        Some(state),
        Mode::Train,
        &mut y,
        &mut Saved::default(),
        &mut Workspace::default(),
        Parallelism::Sequential,
    )
    .unwrap();
}

fn pending(
    cfg: &Config,
    x: &[f64],
    c: usize,
    state: &RunningState,
) -> bnorm::expert::PendingUpdate {
    let g = Layout::NC.geometry(&[x.len() / c, c]).unwrap();
    let mut y = vec![0.0; x.len()];
    let mut state = state.clone(); // deferred: only read
    let report = forward_into(
        cfg,
        g,
        x,
        &Params::init(cfg),
        Some(&mut state),
        Mode::Train,
        &mut y,
        &mut Saved::default(),
        &mut Workspace::default(),
        bnorm::expert::Options::from(Parallelism::Sequential).defer(),
    )
    .unwrap();
    report.pending.unwrap()
}

#[test]
fn deferred_updates_commit_like_training_steps_and_merge_like_concatenation() {
    let c = 3;
    let mut rng = Rng(9);
    let a = rng.vec(5 * c, 2.0, 1.0);
    let b = rng.vec(7 * c, -1.0, 3.0);
    let ab: Vec<f64> = a.iter().chain(&b).copied().collect();
    for cfg in [
        Config::torch(c),
        Config::torch(c).momentum(Momentum::Cumulative),
        Config::keras(c),
        Config::tensorflow(c),
    ] {
        let s0 = RunningState::init(&cfg).unwrap();
        // commit one by one == two training steps (bitwise)
        let mut direct = s0.clone();
        step(&cfg, &a, c, &mut direct);
        step(&cfg, &b, c, &mut direct);
        let mut deferred = s0.clone();
        let pa = pending(&cfg, &a, c, &deferred);
        assert_eq!(deferred, s0, "pending step changed the state");
        pa.commit(&cfg, &mut deferred).unwrap();
        pending(&cfg, &b, c, &deferred)
            .commit(&cfg, &mut deferred)
            .unwrap();
        assert_eq!(direct, deferred);
        // merge then commit == one step on the concatenation
        let mut merged = pending(&cfg, &a, c, &s0);
        merged.merge(&pending(&cfg, &b, c, &s0)).unwrap();
        let mut via_merge = s0.clone();
        merged.commit(&cfg, &mut via_merge).unwrap();
        let mut concat = s0.clone();
        step(&cfg, &ab, c, &mut concat);
        for k in 0..c {
            assert!((via_merge.mean[k] - concat.mean[k]).abs() < 1e-12);
            assert!((via_merge.var[k] - concat.var[k]).abs() < 1e-12);
        }
        assert_eq!(via_merge.updates, 1);
    }
    // ghost updates cannot be merged
    let cfg = Config::keras(c).variant(Variant::Ghost(Ghost::strided(2)));
    let s0 = RunningState::init(&cfg).unwrap();
    let x = rng.vec(4 * c, 0.0, 1.0);
    let mut p = pending(&cfg, &x, c, &s0);
    assert!(p.merge(&pending(&cfg, &x, c, &s0)).is_err());
}

#[test]
fn the_layer_commits_or_discards() {
    let mut bn = Config::keras(2).build().unwrap();
    let x = [1.0f32, 2.0, 3.0, 5.0];
    let (_, _, p) = bn.forward_pending(&x, &[2, 2], Layout::NC).unwrap();
    assert_eq!(
        bn.running_state().unwrap().updates,
        0,
        "nothing applied before commit"
    );
    drop(p); // discarded: a skipped mixed-precision step
    assert_eq!(bn.running_state().unwrap().updates, 0);
    let (_, _, p) = bn.forward_pending(&x, &[2, 2], Layout::NC).unwrap();
    bn.commit(&p.unwrap()).unwrap();
    assert_eq!(bn.running_state().unwrap().updates, 1);
    assert!((bn.running_state().unwrap().mean[0] - 0.02).abs() < 1e-12);
}

#[test]
fn cold_statistics_are_reported_or_refused() {
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let mut bn = Config::torch(2).build().unwrap();
    let (_, r) = bn
        .forward(&x, &[2, 2], Layout::NC, Mode::Inference)
        .unwrap();
    assert!(r.cold_statistics);
    bn.forward(&x, &[2, 2], Layout::NC, Mode::Train).unwrap();
    let (_, r) = bn
        .forward(&x, &[2, 2], Layout::NC, Mode::Inference)
        .unwrap();
    assert!(!r.cold_statistics);
    let mut strict = Config::torch(2)
        .cold_statistics(ColdPolicy::Error)
        .build()
        .unwrap();
    assert_eq!(
        strict
            .forward(&x, &[2, 2], Layout::NC, Mode::Frozen)
            .unwrap_err(),
        Error::ColdStatistics
    );
    // a checkpoint loaded with a zero counter is cold too, whatever its values
    let loaded = RunningState::from_values(strict.config(), vec![0.5; 2], vec![2.0; 2], 0).unwrap();
    strict.set_running_state(loaded).unwrap();
    assert_eq!(
        strict
            .forward(&x, &[2, 2], Layout::NC, Mode::Inference)
            .unwrap_err(),
        Error::ColdStatistics
    );
    let mut recal = Recalibration::new(2);
    recal
        .add(Layout::NC.geometry(&[2, 2]).unwrap(), &x)
        .unwrap();
    strict.recalibrate(&recal).unwrap();
    strict
        .forward(&x, &[2, 2], Layout::NC, Mode::Inference)
        .unwrap();
    let mut quiet = Config::torch(2)
        .cold_statistics(ColdPolicy::Allow)
        .build()
        .unwrap();
    assert!(
        !quiet
            .forward(&x, &[2, 2], Layout::NC, Mode::Inference)
            .unwrap()
            .1
            .cold_statistics
    );
}

#[test]
fn renorm_schedule_starts_as_plain_batch_norm_and_relaxes() {
    let c = 2;
    let sched = Renorm {
        rmax: 3.0,
        rmin: 0.2,
        dmax: 5.0,
        momentum: 0.99,
        schedule: Some(RenormSchedule {
            r_start: 2,
            r_end: 6,
            d_start: 2,
            d_end: 4,
        }),
    };
    let mut renorm = Config::keras(c)
        .variant(Variant::Renorm(sched))
        .build()
        .unwrap();
    let mut plain = Config::keras(c).build().unwrap();
    let mut rng = Rng(3);
    for t in 0..8u64 {
        // batches far from the running statistics, so the corrections would be clipped
        let x = rng.vec(8 * c, 10.0, 5.0);
        let (yr, _) = renorm
            .forward(&x, &[8, c], Layout::NC, Mode::Train)
            .unwrap();
        let (yp, _) = plain.forward(&x, &[8, c], Layout::NC, Mode::Train).unwrap();
        let lim = sched.limits(t);
        let (r, d) = (
            renorm.saved().renorm_r().to_vec(),
            renorm.saved().renorm_d().to_vec(),
        );
        for k in 0..c {
            assert!(
                r[k] >= lim.rmin - 1e-15 && r[k] <= lim.rmax + 1e-15,
                "step {t}: r {} outside {lim:?}",
                r[k]
            );
            assert!(d[k].abs() <= lim.dmax + 1e-15);
        }
        if t <= 2 {
            // r = 1, d = 0: exactly plain batch norm
            assert_eq!(
                lim,
                bnorm::config::RenormLimits {
                    rmin: 1.0,
                    rmax: 1.0,
                    dmax: 0.0
                }
            );
            for (a, b) in yr.iter().zip(&yp) {
                assert!((a - b).abs() < 1e-12);
            }
        }
    }
    let bad = Renorm {
        schedule: Some(RenormSchedule {
            r_start: 5,
            r_end: 1,
            d_start: 0,
            d_end: 0,
        }),
        ..Renorm::default()
    };
    assert!(Config::keras(2)
        .variant(Variant::Renorm(bad))
        .build()
        .is_err());
}

#[test]
fn per_group_ghost_updates_equal_one_step_per_group() {
    let c = 2;
    let ghost = Ghost {
        virtual_batch_size: 3,
        grouping: GhostGrouping::Contiguous,
        remainder: GhostRemainder::SmallerLastGroup,
        update: GhostUpdate::PerGroup,
    };
    let mut g = Config::torch(c)
        .variant(Variant::Ghost(ghost))
        .build()
        .unwrap();
    let mut seq = Config::torch(c).build().unwrap();
    let mut rng = Rng(4);
    let x = rng.vec(8 * c, 1.0, 2.0); // groups of 3, 3, 2 samples
    g.forward(&x, &[8, c], Layout::NC, Mode::Train).unwrap();
    for (lo, hi) in [(0, 3), (3, 6), (6, 8)] {
        seq.forward(&x[lo * c..hi * c], &[hi - lo, c], Layout::NC, Mode::Train)
            .unwrap();
    }
    let (a, b) = (g.running_state().unwrap(), seq.running_state().unwrap());
    assert_eq!(a.updates, 3);
    for k in 0..c {
        assert!((a.mean[k] - b.mean[k]).abs() < 1e-12 && (a.var[k] - b.var[k]).abs() < 1e-12);
    }
}

/// `rmin = 0`, which Keras and tf_keras accept, is a lower bound that never binds: the
/// step is the one without a lower bound (the same bits as a positive bound below every
/// `r`), while a bound above `r` clips it (so the setting is live).
#[test]
fn renorm_rmin_zero_is_accepted_and_never_binds() {
    let c = 2;
    let with = |rmin: f64| Renorm {
        rmax: 3.0,
        rmin,
        dmax: 5.0,
        momentum: 0.99,
        schedule: None,
    };
    let run = |rmin: f64| {
        let mut bn = Config::keras(c)
            .variant(Variant::Renorm(with(rmin)))
            .build()
            .unwrap();
        let mut rng = Rng(11);
        let mut out = Vec::new();
        for _ in 0..4 {
            // a batch whose spread is a hundredth of the running statistics' (var 1):
            // r = σ/σ_r is about 0.01
            let x = rng.vec(8 * c, 0.0, 0.01);
            let (y, _) = bn.forward(&x, &[8, c], Layout::NC, Mode::Train).unwrap();
            out.push((y, bn.saved().renorm_r().to_vec()));
        }
        out
    };
    assert!(Config::keras(c)
        .variant(Variant::Renorm(with(0.0)))
        .validate()
        .is_ok());
    assert!(Config::keras(c)
        .variant(Variant::Renorm(with(-0.1)))
        .validate()
        .is_err());
    let zero = run(0.0);
    let tiny = run(1e-300);
    let clipped = run(0.5);
    for ((z, t), cl) in zero.iter().zip(&tiny).zip(&clipped) {
        assert!(z.1.iter().all(|&r| r > 0.0 && r < 0.1), "r {:?}", z.1);
        assert_eq!(z.0, t.0);
        assert_eq!(z.1, t.1);
        assert!(cl.1.iter().all(|&r| r == 0.5), "r {:?}", cl.1);
    }
}
