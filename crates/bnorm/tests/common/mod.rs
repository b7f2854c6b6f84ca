//! Helpers shared by the integration tests.
#![allow(dead_code)]

use bnorm::config::{
    Ghost, GhostGrouping, GhostRemainder, GhostUpdate, Renorm, RenormSchedule, Variant,
};
use bnorm::tuning::SimdLevel;
use bnorm::{Config, Layout, Momentum};
use std::io::Write;

/// A small deterministic generator (SplitMix64), so tests need no extra crate.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Roughly normal (sum of uniforms).
    pub fn normal(&mut self) -> f64 {
        (0..6).map(|_| self.uniform()).sum::<f64>() - 3.0
    }
    pub fn vec(&mut self, n: usize, mean: f64, sd: f64) -> Vec<f64> {
        (0..n).map(|_| mean + sd * self.normal()).collect()
    }
    /// [`Rng::vec`] rounded to storage type `T` (the values a test then widens back, so
    /// both sides of a comparison see the same stored numbers).
    pub fn stored<T: bnorm::element::Element>(&mut self, n: usize, mean: f64, sd: f64) -> Vec<T> {
        self.vec(n, mean, sd).into_iter().map(T::from_f64).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A shape for `layout` with `n` samples, `c` channels and spatial extent `s` per axis.
pub fn shape(layout: Layout, n: usize, c: usize, spatial: &[usize]) -> Vec<usize> {
    let k = layout.rank() - 2;
    let sp: Vec<usize> = (0..k).map(|i| spatial[i % spatial.len()]).collect();
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

/// Same data moved from a channels-first to a channels-last layout (or back).
pub fn transpose(x: &[f64], from: Layout, shape: &[usize]) -> (Vec<f64>, Vec<usize>) {
    let g = from.geometry(shape).unwrap();
    let spatial = if from.is_channels_last() {
        g.outer / g.batch.max(1)
    } else {
        g.inner
    };
    let c = g.channels;
    let mut out = vec![0.0; x.len()];
    for n in 0..g.batch {
        for ch in 0..c {
            for s in 0..spatial {
                let cf = (n * c + ch) * spatial + s;
                let cl = (n * spatial + s) * c + ch;
                if from.is_channels_last() {
                    out[cf] = x[cl];
                } else {
                    out[cl] = x[cf];
                }
            }
        }
    }
    let to = from.transposed();
    let new_shape = if from.is_channels_last() {
        let mut s = vec![shape[0], c];
        s.extend_from_slice(&shape[1..shape.len() - 1]);
        s
    } else {
        let mut s = vec![shape[0]];
        s.extend_from_slice(&shape[2..]);
        s.push(c);
        s
    };
    let _ = to;
    (out, new_shape)
}

/// Every convention the crate offers, as configurations for `c` channels.
pub fn conventions(c: usize) -> Vec<(&'static str, Config)> {
    vec![
        ("torch", Config::torch(c)),
        (
            "torch-cumulative",
            Config::torch(c).momentum(Momentum::Cumulative),
        ),
        ("keras", Config::keras(c)),
        ("tf-debiased", Config::tensorflow(c)),
        ("tf-plain", Config::keras(c).momentum(Momentum::Decay(0.9))),
        (
            "renorm",
            Config::keras(c).variant(Variant::Renorm(Renorm {
                rmax: 1.5,
                rmin: 0.8,
                dmax: 0.5,
                momentum: 0.9,
                schedule: None,
            })),
        ),
        (
            "ghost-strided",
            Config::keras(c).variant(Variant::Ghost(Ghost::strided(2))),
        ),
        (
            "ghost-contiguous",
            Config::torch(c).variant(Variant::Ghost(Ghost {
                virtual_batch_size: 3,
                grouping: GhostGrouping::Contiguous,
                remainder: GhostRemainder::SmallerLastGroup,
                update: GhostUpdate::PerGroup,
            })),
        ),
        ("no-affine", Config::torch(c).affine(false)),
        ("untracked", Config::torch(c).track_running_stats(false)),
        (
            "renorm-scheduled",
            Config::torch(c).variant(Variant::Renorm(Renorm {
                rmax: 2.0,
                rmin: 0.7,
                dmax: 1.0,
                momentum: 0.8,
                schedule: Some(RenormSchedule {
                    r_start: 0,
                    r_end: 3,
                    d_start: 1,
                    d_end: 2,
                }),
            })),
        ),
        (
            "tf-num-updates",
            Config::keras(c).momentum(Momentum::WarmupDecay(0.9)),
        ),
        (
            "ghost-renorm",
            Config::keras(c).variant(Variant::GhostRenorm {
                ghost: Ghost::strided(2),
                renorm: Renorm {
                    rmax: 1.5,
                    rmin: 0.8,
                    dmax: 0.5,
                    momentum: 0.9,
                    schedule: None,
                },
            }),
        ),
    ]
}

/// `|a − b| <= atol + rtol·|b|` elementwise, with a message naming the worst element.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = atol + rtol * w.abs();
        assert!(
            (g - w).abs() <= tol || (g.is_nan() && w.is_nan()),
            "{what}[{i}]: got {g}, want {w} (tol {tol})"
        );
    }
}

/// Every SIMD level there is, lowest first.
fn all_simd_levels() -> [SimdLevel; 3] {
    // Exhaustive on purpose: a new level stops this build until it is listed below.
    match SimdLevel::Scalar {
        SimdLevel::Scalar | SimdLevel::Avx2 | SimdLevel::Avx512 => {}
    }
    [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512]
}

fn simd_names(levels: &[SimdLevel]) -> String {
    let names: Vec<&str> = levels.iter().map(|l| l.name()).collect();
    names.join(", ")
}

/// The levels `required` (the value of `BNORM_REQUIRE_SIMD`: comma-separated level
/// names, empty for none) asks for, checked against the levels the CPU has
/// (`supported`): an error names an unknown level, or a required level the CPU lacks.
pub fn required_simd_levels(
    required: &str,
    supported: &[SimdLevel],
) -> Result<Vec<SimdLevel>, String> {
    let known = all_simd_levels();
    let mut out = Vec::new();
    for name in required.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let level = known
            .iter()
            .copied()
            .find(|l| l.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                format!(
                    "BNORM_REQUIRE_SIMD={required:?}: unknown SIMD level {name:?} (known: {})",
                    simd_names(&known)
                )
            })?;
        if !supported.contains(&level) {
            return Err(format!(
                "BNORM_REQUIRE_SIMD={required:?} requires SIMD level {}, but this CPU has only \
                 {} (SimdLevel::supported()): the tests would skip it",
                level.name(),
                simd_names(supported)
            ));
        }
        if !out.contains(&level) {
            out.push(level);
        }
    }
    Ok(out)
}

/// The levels `BNORM_REQUIRE_SIMD` requires; panics when it names an unknown level or
/// one this CPU lacks.
pub fn required_simd() -> Vec<SimdLevel> {
    let required = match std::env::var("BNORM_REQUIRE_SIMD") {
        Ok(v) => v,
        Err(std::env::VarError::NotPresent) => String::new(),
        Err(e) => panic!("BNORM_REQUIRE_SIMD: {e}"),
    };
    required_simd_levels(&required, &SimdLevel::supported()).unwrap_or_else(|e| panic!("{e}"))
}

/// The levels a test of every SIMD path runs: all this CPU supports, after checking
/// that they include every level `BNORM_REQUIRE_SIMD` requires (a panic otherwise, so
/// that a CI machine without the promised instructions fails instead of skipping them).
pub fn simd_levels() -> Vec<SimdLevel> {
    required_simd();
    SimdLevel::supported()
}

/// Reports the levels `test` ran (on stderr, past the test harness's capture, so that
/// the log shows them) and panics unless they include every required level.
pub fn simd_ran(test: &str, ran: &[SimdLevel]) {
    let mut ran = ran.to_vec();
    ran.sort();
    ran.dedup();
    let required = required_simd();
    let line = format!(
        "{test}: ran SIMD levels {} (BNORM_REQUIRE_SIMD: {})\n",
        simd_names(&ran),
        if required.is_empty() {
            "none".to_string()
        } else {
            simd_names(&required)
        }
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
    for level in required {
        assert!(
            ran.contains(&level),
            "{test}: BNORM_REQUIRE_SIMD requires SIMD level {}, but the test ran only {}",
            level.name(),
            simd_names(&ran)
        );
    }
}
