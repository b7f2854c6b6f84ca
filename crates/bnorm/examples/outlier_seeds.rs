//! How far the single-pass statistics' mean strays with an outlier for a shift: the case
//! of `tests/against_reference.rs` (`outlier_first_values_keep_statistics_exact`,
//! NC (3000, 40), values 1e4 ± 1 with every 512th value at 1e6, the first row among them)
//! over seeds 1–39 instead of its one seed, against the float64 reference. Prints each
//! seed's largest relative error of the mean over the channels, and how many seeds pass
//! 1e-14 of |mean| (the test's tolerance before commit 95206be) and 1e-14 of
//! |outlier − mean| (its tolerance since). Its figures are quoted in commit 7fbb241
//! (`git show 7fbb241:bench/RESULTS.md`); the four-row order before commit 95206be is
//! measured by building this example with
//! `git show 9083b99:crates/bnorm/src/kernels/inner.rs` in place of that file.
//!
//! Run: `cargo run --release -p bnorm --example outlier_seeds`

use bnorm::{reference, Config, Layout, Mode, Momentum, Params, RunningState};

/// The test's generator (splitmix64; roughly normal as a sum of six uniforms).
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        (0..6).map(|_| self.uniform()).sum::<f64>() - 3.0
    }
}

fn main() {
    let (layout, shp) = (Layout::NC, vec![3000usize, 40]);
    let g = layout.geometry(&shp).unwrap();
    let (len, c) = (g.len(), g.channels);
    let (mut worst, mut over_mean, mut over_reach) = (Vec::new(), 0, 0);
    for seed in 1..40u64 {
        let mut rng = Rng(seed);
        // As in the test: the case without an outlier first draws its values, then the
        // case measured here.
        for _ in 0..len {
            rng.normal();
        }
        let outlier = 1e6;
        let xw: Vec<f64> = (0..len)
            .map(|i| {
                if i % 512 == 0 {
                    outlier
                } else {
                    1e4 + rng.normal()
                }
            })
            .collect();
        let cfg = Config::torch(c).momentum(Momentum::NewWeight(1.0));
        let mut bn = cfg.clone().build().unwrap();
        bn.forward(&xw, &shp, layout, Mode::Train).unwrap();
        let r = reference::forward(
            &cfg,
            layout,
            &shp,
            &xw,
            &Params::init(&cfg),
            RunningState::init(&cfg).as_ref(),
            Mode::Train,
        )
        .unwrap();
        let (got, want) = (&bn.running_state().unwrap().mean, &r.state.unwrap().mean);
        let rel = got
            .iter()
            .zip(want)
            .fold(0.0f64, |a, (g, w)| a.max((g - w).abs() / w.abs()));
        let reach = want
            .iter()
            .fold(1.0f64, |a, m| a.max((outlier - m).abs() / m.abs()));
        over_mean += (rel > 1e-14) as usize;
        over_reach += (rel > 1e-14 * reach) as usize;
        println!(
            "seed {seed:2}: mean off by {rel:.2e} of itself (1e-14 x reach = {:.2e})",
            1e-14 * reach
        );
        worst.push(rel);
    }
    worst.sort_by(|a, b| a.total_cmp(b));
    println!(
        "39 seeds: {:.2e} to {:.2e}; above 1e-14 of |mean|: {over_mean}; above 1e-14 of |outlier - mean|: {over_reach}",
        worst[0],
        worst[worst.len() - 1]
    );
}
