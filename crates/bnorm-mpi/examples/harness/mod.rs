//! Shared by the `sync_train` example and the `bnorm-mpi-selftest` binary: deterministic
//! data, shard sizes, the relative difference, and the cross-rank agreement report.
#![allow(dead_code)]

use bnorm::sync::Communicator;
use bnorm::RunningState;

/// SplitMix64: every rank generates the same global batch from the same seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Roughly normal (sum of six uniforms).
    pub fn normal(&mut self) -> f64 {
        (0..6)
            .map(|_| (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
            .sum::<f64>()
            - 3.0
    }
}

/// Uneven shard sizes summing to `n`; with 3 or more ranks, rank 1's shard is empty.
pub fn uneven(p: usize, n: usize) -> Vec<usize> {
    if p == 1 {
        return vec![n];
    }
    let weights: Vec<usize> = (0..p)
        .map(|r| if r == 1 && p >= 3 { 0 } else { r + 1 })
        .collect();
    let total: usize = weights.iter().sum();
    let mut sizes: Vec<usize> = weights.iter().map(|w| w * n / total).collect();
    sizes[0] += n - sizes.iter().sum::<usize>();
    sizes
}

/// First sample of each rank's shard.
pub fn starts(sizes: &[usize]) -> Vec<usize> {
    let mut s = 0;
    sizes
        .iter()
        .map(|&n| {
            let a = s;
            s += n;
            a
        })
        .collect()
}

/// max |a − b| / max(|b|, 1e-3 · rms(b)): relative, and relative to the tensor's scale
/// for values near zero.
pub fn rel(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let rms = (b.iter().map(|v| v * v).sum::<f64>() / b.len().max(1) as f64).sqrt();
    let floor = (1e-3 * rms).max(1e-300);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(floor))
        .fold(0.0, f64::max)
}

/// The running statistics as vectors (mean, var, updates, renorm).
pub fn state_vecs(s: Option<&RunningState>) -> Vec<Vec<f64>> {
    let Some(s) = s else { return vec![] };
    let mut v = vec![s.mean.clone(), s.var.clone(), vec![s.updates as f64]];
    if let Some(r) = &s.renorm {
        v.extend([r.mean.clone(), r.stddev.clone(), r.moving_stddev.clone()]);
    }
    v
}

/// FNV-1a of the bits of some f64 vectors.
pub fn hash(vs: &[&[f64]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for v in vs {
        for x in v.iter() {
            for b in x.to_bits().to_le_bytes() {
                h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }
    h
}

/// Gathers each rank's largest difference and hash: (max difference, whether every
/// rank's hash equals rank 0's).
pub fn agree<C: Communicator>(comm: &C, d: f64, h: u64) -> bnorm::Result<(f64, bool)> {
    let mut out = Vec::new();
    let local = [d, (h & 0xffff_ffff) as f64, (h >> 32) as f64];
    comm.all_gather_f64(&local, &mut out)?;
    let max = out.chunks_exact(3).map(|r| r[0]).fold(0.0, f64::max);
    let same = out
        .chunks_exact(3)
        .all(|r| r[1] == out[1] && r[2] == out[2]);
    Ok((max, same))
}
