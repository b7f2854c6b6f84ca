//! Launch planning, pure host logic: fast division constants, how each reduction splits
//! the work, and grid sizes. Everything here is unit-tested without a GPU.

use bnorm::expert::Geometry;

use crate::kernels::{BLOCK, CL_TILE, VECS};
use crate::CudaError;

/// Largest 32-bit index the kernels use (fast division valid below 2^31): vectors per
/// channel (channels-first), rows and columns (by rows); see [`check_size`].
pub const MAX_VECTORS: usize = (1 << 31) - 1;

/// Largest number of splits per channel (grid y dimension).
const MAX_SPLITS: usize = 65_535;
/// Minimum vectors a channels-first reduction block handles (per thread: 4, one round of
/// the kernels' accesses in flight).
const MIN_CF_CHUNK: usize = BLOCK as usize * UNROLL;
/// Minimum rows a channels-last reduction block handles.
const MIN_CL_ROWS: usize = CL_TILE.1 as usize * UNROLL;
/// Independent accesses per thread and round in the streaming kernels (`UNROLL` in the
/// CUDA source).
pub const UNROLL: usize = 4;

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
    /// Channels-first: grid `(C, splits)`; split `s` takes the channel's vectors
    /// `j ∈ [s·chunk, min((s+1)·chunk, per_channel/vec))`, `j = o·(inner/vec) + i`.
    ChannelsFirst {
        /// Blocks per channel.
        splits: u32,
        /// Vectors per block.
        chunk: u32,
        /// Elements per vector (divides inner).
        vec: u32,
    },
    /// By rows of `W = C·inner` columns (channels-last, inner = 1, a column is a channel;
    /// or the columns path of a channels-first batch with a small inner, column `w` in
    /// channel `w / inner`): grid `(ceil(W/(32·vec)), splits)`, block (32, 8); split `s`
    /// takes rows `[s·rows, min((s+1)·rows, outer))`.
    ChannelsLast {
        /// Blocks along the rows.
        splits: u32,
        /// Rows per block.
        rows: u32,
        /// Columns per thread (divides W).
        vec: u32,
        /// Columns per channel: 1 for channels-last layouts, the inner size in the
        /// columns path.
        inner: u32,
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
            Split::ChannelsLast {
                splits, vec, inner, ..
            } => (
                (channels as u32 * inner).div_ceil(CL_TILE.0 * vec),
                splits,
                1,
            ),
        }
    }

    /// Elements per vector access.
    pub fn vec(self) -> u32 {
        match self {
            Split::ChannelsFirst { vec, .. } | Split::ChannelsLast { vec, .. } => vec,
        }
    }

    /// Partials per split: one per channel, or per column in the columns path.
    pub fn columns(self, channels: usize) -> usize {
        match self {
            Split::ChannelsFirst { .. } => channels,
            Split::ChannelsLast { inner, .. } => channels * inner as usize,
        }
    }

    /// Blocks launched.
    pub fn blocks(self, channels: usize) -> usize {
        let (x, y, _) = self.grid(channels);
        x as usize * y as usize
    }

    /// Block dimensions of the reduction kernel.
    pub fn block(self) -> (u32, u32, u32) {
        match self {
            Split::ChannelsFirst { .. } => (BLOCK, 1, 1),
            Split::ChannelsLast { .. } => (CL_TILE.0, CL_TILE.1, 1),
        }
    }
}

/// Checks that a geometry fits the kernels' indexing: every kernel runs on a reduction
/// plan and forms element addresses in 64 bits from 32-bit indices that stay below 2^31
/// (fast division): per channel, at most [`MAX_VECTORS`] vectors of [`reduction_width`]
/// elements in each channel; by rows, at most [`MAX_VECTORS`] rows of at most
/// [`MAX_VECTORS`] columns; channels below 2^31. The batch as a whole has no 32-bit limit
/// (review defect 9). The error's `limit` is the largest batch of this row or channel
/// layout.
pub fn check_size(g: Geometry) -> Result<(), CudaError> {
    let vec = reduction_width(g) as usize;
    let (fits, limit) = if reduces_by_rows(g) {
        let w = g.channels * g.inner.max(1);
        (
            g.outer <= MAX_VECTORS && w <= MAX_VECTORS,
            MAX_VECTORS.saturating_mul(w.min(MAX_VECTORS)),
        )
    } else {
        (
            g.per_channel() / vec <= MAX_VECTORS,
            MAX_VECTORS.saturating_mul(vec).saturating_mul(g.channels),
        )
    };
    if !fits || g.channels > MAX_VECTORS {
        return Err(CudaError::TooLarge {
            elements: g.len(),
            limit,
        });
    }
    Ok(())
}

/// Largest inner size reduced by rows of `C·inner` columns (the columns path) rather than
/// per channel: with a smaller inner, a channel's contiguous runs are shorter than a few
/// 32-byte sectors, so a per-channel block over-fetches (review defect 11).
pub const COLUMNS_MAX_INNER: usize = 31;

/// Whether the reductions take `g` by rows (the channels-last kernels): channels-last
/// layouts, and channels-first batches with `1 < inner ≤` [`COLUMNS_MAX_INNER`] whose rows
/// of `C·inner` columns fit 32-bit column indices.
pub fn reduces_by_rows(g: Geometry) -> bool {
    g.inner <= 1 || (g.inner <= COLUMNS_MAX_INNER && g.channels * g.inner <= MAX_VECTORS)
}

/// Elements per vector access of the reductions (and of the steps on their plan): by rows,
/// the widest of [`VECS`] dividing the row of `C·inner` columns; per channel,
/// [`vector_width`].
pub fn reduction_width(g: Geometry) -> u32 {
    if reduces_by_rows(g) {
        widest_dividing(g.channels * g.inner.max(1))
    } else {
        vector_width(g)
    }
}

/// Elements per vector access of the per-channel reduction (and the size limit's unit):
/// the widest of [`VECS`] that divides the contiguous run of one channel (inner,
/// channels-first) or of one row (C, channels-last), so no vector straddles a channel or
/// a row. The reduction by rows uses [`reduction_width`].
pub fn vector_width(g: Geometry) -> u32 {
    widest_dividing(if g.inner > 1 { g.inner } else { g.channels })
}

/// The widest of [`VECS`] dividing `run`.
fn widest_dividing(run: usize) -> u32 {
    VECS.iter()
        .rev()
        .copied()
        .find(|&n| run.is_multiple_of(n as usize))
        .unwrap_or(1)
}

/// Plans the reduction of a batch (by rows when [`reduces_by_rows`], else per channel)
/// for a device with `sms` multiprocessors holding `resident` reduction blocks each (the
/// driver's occupancy query). The splits are floored so that the grid fills at most one wave of resident
/// blocks whenever the channels allow (a partial second wave would take as long as the
/// first); every split is non-empty and the splits cover each channel's values exactly
/// once. `g` must have passed [`check_size`] and hold at least one value.
pub fn plan_split(g: Geometry, sms: usize, resident: usize) -> Split {
    let wave = resident.max(1) * sms.max(1);
    let vec = reduction_width(g);
    if !reduces_by_rows(g) {
        let pv = (g.per_channel() / vec as usize).max(1);
        let by_work = pv.div_ceil(MIN_CF_CHUNK);
        let wanted = (wave / g.channels.max(1)).max(1);
        let splits = wanted.min(by_work).clamp(1, MAX_SPLITS);
        let chunk = pv.div_ceil(splits);
        Split::ChannelsFirst {
            splits: pv.div_ceil(chunk) as u32,
            chunk: chunk as u32,
            vec,
        }
    } else {
        let o = g.outer.max(1);
        let inner = g.inner.max(1);
        let cb = (g.channels * inner)
            .max(1)
            .div_ceil((CL_TILE.0 * vec) as usize);
        let by_work = o.div_ceil(MIN_CL_ROWS);
        let wanted = (wave / cb).max(1);
        let splits = wanted.min(by_work).clamp(1, MAX_SPLITS);
        let rows = o.div_ceil(splits);
        Split::ChannelsLast {
            splits: o.div_ceil(rows) as u32,
            rows: rows as u32,
            vec,
            inner: inner as u32,
        }
    }
}

/// Fan-in of the channels-last second stage's merge tree (`FAN` in the CUDA source: the
/// threads along y of a block, one child each).
///
/// ```
/// assert_eq!(bnorm_cuda::plan::TREE_FAN, 8);
/// ```
pub const TREE_FAN: usize = CL_TILE.1 as usize;

/// The node counts of the merge tree over `splits` partials, level by level, as
/// `finish_tree` walks it: `splits`, then `⌈n/8⌉` while more than 8 are left (the last
/// level listed is the one the root merges).
fn tree_levels(splits: usize) -> impl Iterator<Item = usize> {
    std::iter::successors(Some(splits.max(1)), |&n| {
        (n > TREE_FAN).then(|| n.div_ceil(TREE_FAN))
    })
}

/// Partial slots per column that the merge tree over `splits` partials needs: every level's
/// nodes, the splits' own included (the root's merge is written nowhere).
///
/// ```
/// use bnorm_cuda::plan::tree_slots;
/// // 396 splits, merged 8 at a time: 50 nodes, then 7, then the root
/// assert_eq!(tree_slots(396), 396 + 50 + 7);
/// assert_eq!(tree_slots(8), 8); // the root merges the splits themselves
/// ```
pub fn tree_slots(splits: usize) -> usize {
    tree_levels(splits).sum()
}

/// Arrival counters the merge tree needs for `tiles` tiles: one per parent node of every
/// level, the root included.
///
/// ```
/// use bnorm_cuda::plan::tree_counters;
/// assert_eq!(tree_counters(396, 2), 2 * (50 + 7 + 1));
/// ```
pub fn tree_counters(splits: usize, tiles: usize) -> usize {
    tiles
        * tree_levels(splits)
            .map(|n| n.div_ceil(TREE_FAN))
            .sum::<usize>()
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

    /// The merge tree's sizes, counted by hand: 396 splits → 50 → 7 → root.
    #[test]
    fn merge_tree_sizes() {
        assert_eq!(tree_slots(1), 1);
        assert_eq!(tree_counters(1, 3), 3);
        assert_eq!(tree_slots(8), 8);
        assert_eq!(tree_counters(8, 1), 1);
        assert_eq!(tree_slots(9), 9 + 2);
        assert_eq!(tree_counters(9, 1), 2 + 1);
        assert_eq!(tree_slots(396), 396 + 50 + 7);
        assert_eq!(tree_counters(396, 2), 2 * (50 + 7 + 1));
        assert_eq!(tree_slots(65_535), 65_535 + 8_192 + 1_024 + 128 + 16 + 2);
    }

    fn covers_exactly(g: Geometry, sms: usize, resident: usize) {
        let plan = plan_split(g, sms, resident);
        let s = plan.splits() as usize;
        assert!((1..=MAX_SPLITS).contains(&s));
        match plan {
            Split::ChannelsFirst { chunk, vec, .. } => {
                assert!(!reduces_by_rows(g));
                assert_eq!(g.inner % vec as usize, 0, "{g:?} {plan:?}");
                let pv = g.per_channel() / vec as usize;
                let chunk = chunk as usize;
                // non-empty splits, covering [0, pv) exactly once
                assert!((s - 1) * chunk < pv && s * chunk >= pv, "{g:?} {plan:?}");
            }
            Split::ChannelsLast {
                rows, vec, inner, ..
            } => {
                assert!(reduces_by_rows(g) && inner as usize == g.inner.max(1));
                assert_eq!((g.channels * g.inner) % vec as usize, 0, "{g:?} {plan:?}");
                let rows = rows as usize;
                assert!(
                    (s - 1) * rows < g.outer && s * rows >= g.outer,
                    "{g:?} {plan:?}"
                );
            }
        }
        let (gx, gy, _) = plan.grid(g.channels);
        assert_eq!(gy as usize, s);
        let (per_thread, columns) = match plan {
            Split::ChannelsFirst { .. } => (1, g.channels),
            Split::ChannelsLast { vec, .. } => (vec as usize, g.channels * g.inner),
        };
        assert_eq!(plan.columns(g.channels), columns);
        assert!(gx as usize * plan.block().0 as usize * per_thread >= columns);
        // at most one wave of resident blocks, unless the channels alone need more
        let wave = sms * resident;
        let minimum = plan.blocks(g.channels) / s;
        assert!(
            plan.blocks(g.channels) <= wave.max(minimum),
            "{g:?} {plan:?}: {} blocks, wave {wave}",
            plan.blocks(g.channels)
        );
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
                for resident in [1, 7, 8] {
                    covers_exactly(g, sms, resident);
                }
            }
        }
    }

    /// The review's wave-quantization case (defect 4): on 132 SMs × 8 resident blocks the
    /// old ceiling gave 1.03–1.09 waves on these shapes; now each fills ≥ 90 % of exactly
    /// one wave, also when the occupancy query says 7.
    #[test]
    fn large_shapes_fill_one_wave_without_a_tail() {
        for (layout, shape) in [
            (Layout::NCHW, &[64usize, 128, 56, 56][..]),
            (Layout::NCHW, &[256, 64, 112, 112]),
            (Layout::NHWC, &[256, 112, 112, 64]),
            (Layout::NC, &[65536, 4096]),
            (Layout::NCHW, &[32, 64, 56, 56]),
        ] {
            let g = layout.geometry(shape).unwrap();
            for resident in [7, 8] {
                let wave = 132 * resident;
                let p = plan_split(g, 132, resident);
                let blocks = p.blocks(g.channels);
                assert!(
                    blocks <= wave && blocks * 10 >= wave * 9,
                    "{layout}{shape:?} resident {resident}: {blocks} blocks, wave {wave}, {p:?}"
                );
            }
        }
    }

    #[test]
    fn vector_width_divides_the_contiguous_run() {
        let w = |l: Layout, s: &[usize]| vector_width(l.geometry(s).unwrap());
        assert_eq!(w(Layout::NCHW, &[2, 3, 56, 56]), 4);
        assert_eq!(w(Layout::NCHW, &[2, 3, 14, 14]), 4);
        assert_eq!(w(Layout::NCHW, &[2, 3, 7, 9]), 1);
        assert_eq!(w(Layout::NCL, &[2, 3, 6]), 2);
        assert_eq!(w(Layout::NHWC, &[2, 5, 5, 64]), 4);
        assert_eq!(w(Layout::NC, &[3, 6]), 2);
        assert_eq!(w(Layout::NC, &[3, 5]), 1);
    }

    /// Review defect 9: the limits are per channel (channels-first) or per row and column
    /// (by rows), not per batch: batches far beyond 2^31 elements fit, also with vector
    /// width 1; beyond the per-channel or per-row limit the error is typed. For every
    /// accepted geometry the plan's 32-bit intermediates stay below 2^32 and every index
    /// the fast division sees below 2^31.
    #[test]
    fn too_large_is_a_typed_error() {
        let ok = |l: Layout, s: &[usize]| {
            let g = l.geometry(s).unwrap();
            assert!(check_size(g).is_ok(), "{l}{s:?}");
            for (sms, resident) in [(1, 1), (132, 8)] {
                match plan_split(g, sms, resident) {
                    Split::ChannelsFirst { splits, chunk, vec } => {
                        let pv = g.per_channel() / vec as usize;
                        assert!(pv <= MAX_VECTORS && g.inner / (vec as usize) <= MAX_VECTORS);
                        // j0 + chunk and the loop's j + UNROLL·256 in u32
                        let (splits, chunk) = (splits as usize, chunk as usize);
                        assert!(splits * chunk + chunk < 1 << 32);
                        assert!(pv + UNROLL * (BLOCK as usize) < 1 << 32);
                    }
                    Split::ChannelsLast {
                        splits,
                        rows,
                        inner,
                        ..
                    } => {
                        assert!(g.outer <= MAX_VECTORS);
                        assert!(g.channels * inner as usize <= MAX_VECTORS);
                        let (splits, rows) = (splits as usize, rows as usize);
                        assert!(splits * rows + rows < 1 << 32);
                    }
                }
            }
            g
        };
        let too_large = |l: Layout, s: &[usize], limit: usize| {
            let g = l.geometry(s).unwrap();
            assert!(
                matches!(check_size(g), Err(CudaError::TooLarge { limit: got, .. }) if got == limit),
                "{l}{s:?}: {:?}",
                check_size(g)
            );
        };
        // 2^33 elements (32 GiB of f32), formerly refused
        ok(Layout::NC, &[1 << 21, 1 << 12]);
        let g = ok(Layout::NCHW, &[21_000, 64, 56, 36]);
        assert!(g.len() > 2_700_000_000);
        // odd rows and channels (vector width 1): 3·(2^31 − 1) elements, formerly 2^31 − 1
        let g = ok(Layout::NC, &[(1 << 31) - 1, 3]);
        assert!(g.len() > 6_000_000_000);
        let g = ok(Layout::NCHW, &[2048, 3, 1001, 1001]);
        assert!(g.len() > 6_000_000_000);
        too_large(Layout::NCHW, &[2200, 3, 1001, 1001], MAX_VECTORS * 3);
        // the columns path: 2^31 − 1 rows of C·inner columns
        ok(Layout::NCL, &[(1 << 31) - 1, 3, 5]);
        // beyond: rows, columns, vectors per channel
        too_large(Layout::NC, &[1 << 31, 3], MAX_VECTORS * 3);
        too_large(Layout::NCL, &[1 << 31, 3, 5], MAX_VECTORS * 15);
        ok(Layout::NCL, &[3, 1, 1 << 31]);
        too_large(Layout::NCL, &[5, 1, 1 << 31], MAX_VECTORS * 4);
        too_large(Layout::NCHW, &[5, 2, 1 << 16, 1 << 15], MAX_VECTORS * 4 * 2);
        ok(Layout::NCHW, &[3, 2, 1 << 16, 1 << 15]);
    }

    #[test]
    fn grids() {
        assert_eq!(channel_grid(1), 1);
        assert_eq!(channel_grid(257), 2);
    }

    /// Host replay of the kernels' index maps (the loops of stats_cf/bwd_reduce_cf,
    /// stats_cl/bwd_reduce_cl, norm_back_cf/cl and dx_back_cf/cl (same maps) in
    /// kernels.rs, thread by thread, with the plans and fast-division constants the layer
    /// passes): every element is visited exactly once, in its own channel, by an aligned
    /// vector access.
    fn replay_kernel_maps(g: Geometry, sms: usize, resident: usize) {
        let len = g.len();
        let chan = |e: usize| (e / g.inner) % g.channels;
        let mut seen = vec![0u8; len];
        let visit = |e: usize, c: usize, seen: &mut Vec<u8>| {
            assert!(e < len, "{g:?}: element {e} out of bounds");
            assert_eq!(chan(e), c, "{g:?}: element {e} reduced into channel {c}");
            seen[e] += 1;
        };
        let block = BLOCK as usize;
        match plan_split(g, sms, resident) {
            Split::ChannelsFirst { splits, chunk, vec } => {
                let (vec, chunk) = (vec as usize, chunk as usize);
                let iv = g.inner / vec;
                let f = FastDiv::new(iv as u32);
                let pv = g.per_channel() / vec;
                for c in 0..g.channels {
                    for s in 0..splits as usize {
                        let (j0, j1) = (s * chunk, pv.min(s * chunk + chunk));
                        for t in 0..block {
                            let mut j = j0 + t;
                            while j < j1 {
                                for u in 0..UNROLL {
                                    let jj = j + u * block;
                                    if jj < j1 {
                                        let o = f.quotient(jj as u32) as usize;
                                        let a = ((o * g.channels + c) * iv + (jj - o * iv)) * vec;
                                        assert_eq!(a % vec, 0);
                                        for q in 0..vec {
                                            visit(a + q, c, &mut seen);
                                        }
                                    }
                                }
                                j += UNROLL * block;
                            }
                        }
                    }
                }
            }
            Split::ChannelsLast {
                splits,
                rows,
                vec,
                inner,
            } => {
                let (vec, rows, inner) = (vec as usize, rows as usize, inner as usize);
                let w = g.channels * inner;
                let (tx, ty) = (CL_TILE.0 as usize, CL_TILE.1 as usize);
                let gx = w.div_ceil(tx * vec);
                for bx in 0..gx {
                    for s in 0..splits as usize {
                        let (r0, r1) = (s * rows, g.outer.min(s * rows + rows));
                        for x in 0..tx {
                            let c0 = (bx * tx + x) * vec;
                            if c0 >= w {
                                continue;
                            }
                            for y in 0..ty {
                                let mut r = r0 + y;
                                while r < r1 {
                                    for u in 0..UNROLL {
                                        let rr = r + u * ty;
                                        if rr < r1 {
                                            let a = rr * w + c0;
                                            assert_eq!(a % vec, 0);
                                            for q in 0..vec {
                                                visit(a + q, (c0 + q) / inner, &mut seen);
                                            }
                                        }
                                    }
                                    r += UNROLL * ty;
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "{g:?}: reduction coverage");
        // The second stage (kernels.rs column_channel_done / last_of_group): each channel
        // receives exactly `members` arrivals, so exactly one block (the last) finalizes
        // it, and only after every block holding one of its values has arrived.
        if let Split::ChannelsLast {
            splits, vec, inner, ..
        } = plan_split(g, sms, resident)
        {
            if inner > 1 {
                let tw = CL_TILE.0 * vec;
                let w = g.channels as u32 * inner;
                let mut arrivals = vec![0u32; g.channels];
                let mut holders = vec![0u32; g.channels];
                for bx in 0..w.div_ceil(tw) {
                    let (first, last) = (bx * tw, w.min(bx * tw + tw) - 1);
                    for ch in first / inner..=last / inner {
                        arrivals[ch as usize] += splits;
                    }
                    for col in first..=last {
                        holders[(col / inner) as usize] |= 1 << (bx % 32);
                    }
                }
                for ch in 0..g.channels as u32 {
                    let tiles = (ch * inner + inner - 1) / tw - (ch * inner) / tw + 1;
                    assert_eq!(arrivals[ch as usize], tiles * splits, "{g:?}: channel {ch}");
                    assert_eq!(
                        holders[ch as usize].count_ones(),
                        tiles,
                        "{g:?}: channel {ch}"
                    );
                }
            }
        }
        // norm_back_cf / norm_back_cl: the reduction's blocks, each chunk walked backwards
        let mut seen = vec![0u8; len];
        // by rows: which threads write the statistics from the running statistics
        // (channels-first: thread 0 of block (c, split 0), one per channel by construction)
        let mut writers = vec![0u32; g.channels];
        match plan_split(g, sms, resident) {
            Split::ChannelsFirst { splits, chunk, vec } => {
                let (vec, chunk) = (vec as usize, chunk as usize);
                let iv = g.inner / vec;
                let f = FastDiv::new(iv as u32);
                let pv = g.per_channel() / vec;
                for c in 0..g.channels {
                    for s in 0..splits as usize {
                        let (j0, j1) = (s * chunk, pv.min(s * chunk + chunk));
                        let n = j1.saturating_sub(j0);
                        for t0 in 0..block {
                            let mut t = t0;
                            while t < n {
                                for u in 0..UNROLL {
                                    let tt = t + u * block;
                                    if tt < n {
                                        let jj = j1 - 1 - tt;
                                        let o = f.quotient(jj as u32) as usize;
                                        let a = ((o * g.channels + c) * iv + (jj - o * iv)) * vec;
                                        for q in 0..vec {
                                            visit(a + q, c, &mut seen);
                                        }
                                    }
                                }
                                t += UNROLL * block;
                            }
                        }
                    }
                }
            }
            Split::ChannelsLast {
                splits,
                rows,
                vec,
                inner,
            } => {
                let (vec, rows, inner) = (vec as usize, rows as usize, inner as usize);
                let w = g.channels * inner;
                let (tx, ty) = (CL_TILE.0 as usize, CL_TILE.1 as usize);
                for bx in 0..w.div_ceil(tx * vec) {
                    for s in 0..splits as usize {
                        let (r0, r1) = (s * rows, g.outer.min(s * rows + rows));
                        let n = r1.saturating_sub(r0);
                        for x in 0..tx {
                            let c0 = (bx * tx + x) * vec;
                            if c0 >= w {
                                continue;
                            }
                            // from the running statistics (inference), the thread (y = 0,
                            // first split) holding a channel's first column writes its
                            // statistics: once per channel
                            if s == 0 {
                                for q in 0..vec {
                                    if (c0 + q) % inner == 0 {
                                        writers[(c0 + q) / inner] += 1;
                                    }
                                }
                            }
                            for y in 0..ty {
                                let mut t = y;
                                while t < n {
                                    for u in 0..UNROLL {
                                        let tt = t + u * ty;
                                        if tt < n {
                                            let a = (r1 - 1 - tt) * w + c0;
                                            for q in 0..vec {
                                                visit(a + q, (c0 + q) / inner, &mut seen);
                                            }
                                        }
                                    }
                                    t += UNROLL * ty;
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "{g:?}: norm_back coverage");
        if reduces_by_rows(g) {
            assert!(
                writers.iter().all(|&n| n == 1),
                "{g:?}: running coefficients written {writers:?} times"
            );
        }
    }

    #[test]
    fn kernel_index_maps_cover_every_element_once_in_its_channel() {
        let shapes: &[(Layout, &[usize])] = &[
            (Layout::NC, &[37, 5]),
            (Layout::NC, &[1000, 64]),
            (Layout::NC, &[33, 6]),
            (Layout::NC, &[3, 1]),
            (Layout::NCL, &[3, 7, 11]),
            (Layout::NCL, &[5, 3, 1]),
            (Layout::NCL, &[3, 4, 4096]),
            (Layout::NCHW, &[5, 3, 7, 9]),
            (Layout::NCHW, &[4, 6, 14, 14]),
            (Layout::NCHW, &[3, 5, 9, 2]),
            (Layout::NCHW, &[8, 8, 56, 56]),
            (Layout::NCDHW, &[2, 3, 3, 5, 7]),
            (Layout::NLC, &[3, 11, 7]),
            (Layout::NHWC, &[5, 7, 9, 3]),
            (Layout::NHWC, &[4, 9, 11, 12]),
            (Layout::NHWC, &[16, 28, 28, 40]),
            (Layout::NDHWC, &[2, 3, 5, 7, 3]),
            // the columns path (review defect 11): small inner, channels straddling tiles
            (Layout::NCL, &[7, 5, 2]),
            (Layout::NCL, &[9, 43, 3]),
            (Layout::NCHW, &[6, 19, 1, 7]),
            (Layout::NCHW, &[5, 200, 5, 5]),
            (Layout::NCHW, &[3, 64, 4, 4]),
            (Layout::NCHW, &[4, 3, 1, 31]),
            (Layout::NCHW, &[2, 9, 8, 4]),
        ];
        for &(layout, shape) in shapes {
            let g = layout.geometry(shape).unwrap();
            for (sms, resident) in [(1, 1), (3, 7), (132, 8)] {
                replay_kernel_maps(g, sms, resident);
            }
        }
    }
}
