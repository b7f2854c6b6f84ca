//! Launch planning, pure host logic: fast division constants, how each reduction splits
//! the work, and grid sizes. Everything here is unit-tested without a GPU.

use bnorm::expert::Geometry;

use crate::kernels::{BLOCK, CL_TILE};
use crate::CudaError;

/// Largest element count the kernels index (32-bit indices, fast division valid below
/// 2^31).
pub const MAX_ELEMENTS: usize = (1 << 31) - 1;

/// Largest number of splits per channel (grid y dimension).
const MAX_SPLITS: usize = 65_535;
/// Minimum values a channels-first reduction block handles (per thread: 16).
const MIN_CF_CHUNK: usize = BLOCK as usize * 16;
/// Minimum rows a channels-last reduction block handles.
const MIN_CL_ROWS: usize = CL_TILE.1 as usize * 16;
/// Blocks per SM a reduction aims for.
const BLOCKS_PER_SM: usize = 8;

/// Constants for `n / d = (n · m) >> s`, exact for every `n < 2^31`
/// (Granlund–Montgomery, round-up method with 31-bit numerators: `m < 2^32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastDiv {
    /// The divisor.
    pub d: u32,
    /// Multiplier.
    pub m: u32,
    /// Shift.
    pub s: u32,
}

impl FastDiv {
    /// Constants for divisor `d`, clamped to `[1, 2^31 − 1]` (callers pass checked sizes).
    pub fn new(d: u32) -> FastDiv {
        let d = d.clamp(1, (1 << 31) - 1);
        // l = ceil(log2 d)
        let l = 32 - (d - 1).leading_zeros();
        let s = 31 + l;
        let m = (1u64 << s).div_ceil(d as u64);
        debug_assert!(m < (1u64 << 32));
        FastDiv { d, m: m as u32, s }
    }

    /// `n / d` as the kernels compute it.
    pub fn quotient(self, n: u32) -> u32 {
        ((n as u64 * self.m as u64) >> self.s) as u32
    }
}

/// How a reduction splits each channel's values into blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Channels-first: grid `(C, splits)`; split `s` takes the channel's values
    /// `j ∈ [s·chunk, min((s+1)·chunk, per_channel))`, `j = o·inner + i`.
    ChannelsFirst {
        /// Blocks per channel.
        splits: u32,
        /// Values per block.
        chunk: u32,
    },
    /// Channels-last (inner = 1): grid `(ceil(C/32), splits)`, block (32, 8); split `s`
    /// takes rows `[s·rows, min((s+1)·rows, outer))`.
    ChannelsLast {
        /// Blocks along the rows.
        splits: u32,
        /// Rows per block.
        rows: u32,
    },
}

impl Split {
    /// Number of splits (partials per channel).
    pub fn splits(self) -> u32 {
        match self {
            Split::ChannelsFirst { splits, .. } | Split::ChannelsLast { splits, .. } => splits,
        }
    }

    /// Grid dimensions of the reduction kernel.
    pub fn grid(self, channels: usize) -> (u32, u32, u32) {
        match self {
            Split::ChannelsFirst { splits, .. } => (channels as u32, splits, 1),
            Split::ChannelsLast { splits, .. } => {
                ((channels as u32).div_ceil(CL_TILE.0), splits, 1)
            }
        }
    }

    /// Block dimensions of the reduction kernel.
    pub fn block(self) -> (u32, u32, u32) {
        match self {
            Split::ChannelsFirst { .. } => (BLOCK, 1, 1),
            Split::ChannelsLast { .. } => (CL_TILE.0, CL_TILE.1, 1),
        }
    }
}

/// Checks that a geometry fits the kernels' 32-bit indexing.
pub fn check_size(g: Geometry) -> Result<(), CudaError> {
    if g.len() > MAX_ELEMENTS || g.channels > MAX_ELEMENTS {
        return Err(CudaError::TooLarge {
            elements: g.len(),
            limit: MAX_ELEMENTS,
        });
    }
    Ok(())
}

/// Plans the reduction of a batch (channels-first when `inner > 1`) for a device with
/// `sms` multiprocessors. Every split is non-empty and the splits cover each channel's
/// values exactly once. `g` must have passed [`check_size`] and hold at least one value.
pub fn plan_split(g: Geometry, sms: usize) -> Split {
    let target = BLOCKS_PER_SM * sms.max(1);
    if g.inner > 1 {
        let pc = g.per_channel().max(1);
        let by_work = pc.div_ceil(MIN_CF_CHUNK);
        let wanted = target.div_ceil(g.channels.max(1));
        let splits = wanted.min(by_work).clamp(1, MAX_SPLITS);
        let chunk = pc.div_ceil(splits);
        Split::ChannelsFirst {
            splits: pc.div_ceil(chunk) as u32,
            chunk: chunk as u32,
        }
    } else {
        let o = g.outer.max(1);
        let cb = g.channels.max(1).div_ceil(CL_TILE.0 as usize);
        let by_work = o.div_ceil(MIN_CL_ROWS);
        let wanted = target.div_ceil(cb);
        let splits = wanted.min(by_work).clamp(1, MAX_SPLITS);
        let rows = o.div_ceil(splits);
        Split::ChannelsLast {
            splits: o.div_ceil(rows) as u32,
            rows: rows as u32,
        }
    }
}

/// Grid size of the element-wise kernels (grid-stride loops, block of `BLOCK` threads).
pub fn elementwise_grid(len: usize, sms: usize) -> u32 {
    let blocks = len.div_ceil(BLOCK as usize).max(1);
    blocks.min(sms.max(1) * 32) as u32
}

/// Grid size of the per-channel kernels (one thread per channel).
pub fn channel_grid(channels: usize) -> u32 {
    channels.div_ceil(BLOCK as usize).max(1) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use bnorm::Layout;

    #[test]
    fn fast_division_is_exact() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut divisors: Vec<u32> = (1..=300).collect();
        divisors.extend([
            3136,
            12544,
            1 << 20,
            (1 << 20) + 1,
            65535,
            65536,
            65537,
            4096,
            1_000_003,
        ]);
        divisors.extend([(1 << 30) - 1, 1 << 30, (1 << 30) + 1, (1u32 << 31) - 1]);
        for _ in 0..200 {
            divisors.push((next() % ((1u64 << 31) - 1)) as u32 + 1);
        }
        for &d in &divisors {
            let f = FastDiv::new(d);
            let top = (1u32 << 31) - 1;
            let mut ns = vec![0, 1, d - 1, d, d.saturating_add(1), top, top - 1];
            ns.extend((1..64u32).map(|k| (d as u64 * k as u64).min(top as u64) as u32));
            ns.extend((1..64u32).map(|k| (d as u64 * k as u64 - 1).min(top as u64) as u32));
            for _ in 0..2000 {
                ns.push((next() % (top as u64 + 1)) as u32);
            }
            for n in ns {
                assert_eq!(f.quotient(n), n / d, "n = {n}, d = {d}");
            }
        }
    }

    fn covers_exactly(g: Geometry, sms: usize) {
        let plan = plan_split(g, sms);
        let s = plan.splits() as usize;
        assert!((1..=MAX_SPLITS).contains(&s));
        match plan {
            Split::ChannelsFirst { chunk, .. } => {
                assert!(g.inner > 1);
                let pc = g.per_channel();
                let chunk = chunk as usize;
                // non-empty splits, covering [0, pc) exactly once
                assert!((s - 1) * chunk < pc && s * chunk >= pc, "{g:?} {plan:?}");
            }
            Split::ChannelsLast { rows, .. } => {
                assert_eq!(g.inner, 1);
                let rows = rows as usize;
                assert!(
                    (s - 1) * rows < g.outer && s * rows >= g.outer,
                    "{g:?} {plan:?}"
                );
            }
        }
        let (gx, gy, _) = plan.grid(g.channels);
        assert_eq!(gy as usize, s);
        assert!(gx as usize * plan.block().0 as usize >= g.channels);
    }

    #[test]
    fn splits_cover_every_value_once() {
        let shapes: &[(Layout, &[usize])] = &[
            (Layout::NCHW, &[64, 128, 56, 56]),
            (Layout::NCHW, &[256, 64, 112, 112]),
            (Layout::NHWC, &[256, 112, 112, 64]),
            (Layout::NC, &[65536, 4096]),
            (Layout::NCHW, &[32, 64, 56, 56]),
            (Layout::NCHW, &[32, 256, 14, 14]),
            (Layout::NC, &[4096, 1024]),
            (Layout::NC, &[2, 1]),
            (Layout::NC, &[37, 5]),
            (Layout::NCL, &[3, 7, 11]),
            (Layout::NCDHW, &[2, 3, 3, 5, 7]),
            (Layout::NDHWC, &[2, 3, 5, 7, 3]),
            (Layout::NCHW, &[1, 1, 4099, 4099]),
            (Layout::NLC, &[1, 1_000_003, 2]),
        ];
        for &(layout, shape) in shapes {
            let g = layout.geometry(shape).unwrap();
            check_size(g).unwrap();
            for sms in [1, 2, 80, 132, 1000] {
                covers_exactly(g, sms);
            }
        }
    }

    #[test]
    fn large_shapes_get_enough_blocks() {
        let g = Layout::NCHW.geometry(&[256, 64, 112, 112]).unwrap();
        let p = plan_split(g, 132);
        let blocks = p.grid(g.channels).0 as usize * p.splits() as usize;
        assert!(blocks >= 132 * 4, "{p:?}");
        let g = Layout::NC.geometry(&[65536, 4096]).unwrap();
        let p = plan_split(g, 132);
        let blocks = p.grid(g.channels).0 as usize * p.splits() as usize;
        assert!(blocks >= 132 * 4, "{p:?}");
    }

    #[test]
    fn too_large_is_a_typed_error() {
        let g = Layout::NC.geometry(&[1 << 20, 1 << 12]).unwrap();
        assert!(matches!(check_size(g), Err(CudaError::TooLarge { .. })));
        let g = Layout::NC.geometry(&[(1 << 19) - 1, 1 << 12]).unwrap();
        assert!(check_size(g).is_ok());
    }

    #[test]
    fn grids() {
        assert_eq!(elementwise_grid(0, 132), 1);
        assert_eq!(elementwise_grid(1000, 132), 4);
        assert_eq!(elementwise_grid(1 << 30, 132), 132 * 32);
        assert_eq!(channel_grid(1), 1);
        assert_eq!(channel_grid(257), 2);
    }
}
