//! Per-channel statistics: the moments `(count, mean, M2)` of every channel, for both
//! layout families.
//!
//! * Channels-first (`inner > 1`): each channel's runs, segment by segment
//!   ([`segments`]); a run is reduced in blocks of [`BLOCK`] values, each in a single
//!   pass shifted by its first value ([`block_moments`]) with an exact two-pass fallback;
//!   runs shorter than a block are summed a segment at a time ([`ShortRuns`]).
//! * Channels-last (`inner == 1`): rows of `c` values, all channels at once
//!   ([`rows_moments`]): one shifted pass over the segment's rows for 32 channels or
//!   more, blocks of whole rows as lanes for fewer.
//!
//! The segments are merged in order: the result depends on the shape alone.

use super::frame::{ahead, expand, fold, fold_lanes, lanes_for, PairLanes, LANES, LANES2};
use super::schedule::{segments, Scratch, Workspace};
use super::simd::{self, Isa};
use super::BLOCK;
use crate::element::Element;
use crate::layout::Geometry;
use crate::parallel::{self, Parallelism};
use crate::stats::Moments;

simd::dispatch! {
    fn run_moments<T>(xs: &[T], next: &[T]) -> Moments;
    fn run_into<T>(xs: &[T], next: &[T], acc: &mut ShortRuns);
    fn rows_moments<T>(rows: &[T], c: usize, out: &mut [Moments]);
}

/// Per-channel moments of `x` into `out` (length C).
pub(crate) fn moments<T: Element>(
    g: Geometry,
    x: &[T],
    out: &mut [Moments],
    ws: &mut Workspace,
    par: Parallelism,
) {
    let c = g.channels;
    let isa = Isa::of_call();
    let (rps, nseg) = segments(g);
    ws.moments.clear();
    ws.moments.resize(nseg * c, Moments::default());
    if g.inner == 1 {
        let task = |(s, part): (usize, &mut [Moments])| {
            let rows = &x[s * rps * c..((s + 1) * rps).min(g.outer) * c];
            by_level::rows_moments(isa, rows, c, part);
        };
        parallel::chunks(par, g.len(), &mut ws.moments, c, |s, p| task((s, p)));
        for (ch, o) in out.iter_mut().enumerate() {
            *o = (0..nseg).fold(Moments::default(), |acc, s| {
                acc.merge(ws.moments[s * c + ch])
            });
        }
    } else {
        let task = |(t, o): (usize, &mut Moments)| {
            *o = segment_moments_cf(isa, g, x, (t / nseg, t % nseg), rps);
        };
        parallel::chunks(par, g.len(), &mut ws.moments, 1, |t, o| {
            task((t, &mut o[0]))
        });
        for (ch, o) in out.iter_mut().enumerate() {
            *o = ws.moments[ch * nseg..(ch + 1) * nseg]
                .iter()
                .fold(Moments::default(), |acc, m| acc.merge(*m));
        }
    }
}

/// Moments of one segment of one channel (channels-first): rows in order — short rows
/// ([`short_runs`]) summed together in one shifted pass, longer ones (or short ones whose
/// shift cancels too much) block by block and merged.
fn segment_moments_cf<T: Element>(
    isa: Isa,
    g: Geometry,
    x: &[T],
    (ch, s): (usize, usize),
    rps: usize,
) -> Moments {
    let rows = s * rps..((s + 1) * rps).min(g.outer);
    let start = |n: usize| (n * g.channels + ch) * g.inner;
    if short_runs(g) && !rows.is_empty() {
        let mut acc = ShortRuns::new(x[start(rows.start)].to_f64());
        for n in rows.clone() {
            by_level::run_into(isa, &x[start(n)..start(n) + g.inner], &[], &mut acc);
        }
        if let Some(m) = acc.moments() {
            return m;
        }
    }
    let mut acc = Moments::default();
    for n in rows {
        acc = acc.merge(by_level::run_moments(
            isa,
            &x[start(n)..start(n) + g.inner],
            &[],
        ));
    }
    acc
}

// ─── Short channels-first runs ──────────────────────────────────────────────────────────

/// Whether a channels-first batch's runs are short enough to be summed a segment at a
/// time ([`ShortRuns`]) rather than each reduced to moments and merged: shorter than a
/// block. On 14×14 runs the per-run conversion to moments and the merge — a chain of
/// divisions, one per run — took as long as the sums themselves.
#[inline]
pub(crate) fn short_runs(g: Geometry) -> bool {
    g.inner < BLOCK
}

/// The shifted sums of a segment's short runs of one channel, `Σ(x − s)` and
/// `Σ(x − s)²` with `s` the segment's first value, in [`PairLanes`] kept across the runs.
#[derive(Debug, Clone)]
pub(crate) struct ShortRuns {
    shift: f64,
    count: usize,
    lanes: PairLanes,
}

impl ShortRuns {
    /// Empty sums shifted by `shift`.
    pub(crate) fn new(shift: f64) -> ShortRuns {
        ShortRuns {
            shift,
            count: 0,
            lanes: PairLanes::ZERO,
        }
    }

    /// The moments of every value added, or `None` when the shift cancels more than a
    /// single pass may (then the caller reduces the runs block by block).
    pub(crate) fn moments(&self) -> Option<Moments> {
        let (s1, s2) = self.lanes.sums();
        let n = self.count as f64;
        from_shifted(self.shift, n, s1, s2).map(|(mean, m2)| Moments { count: n, mean, m2 })
    }
}

/// Adds one run to `acc` ([`ShortRuns`]) in the order of [`PairLanes`], prefetching
/// `next` alongside.
#[inline(always)]
pub(crate) fn run_into<T: Element>(xs: &[T], next: &[T], acc: &mut ShortRuns) {
    acc.lanes.add_shifted_row(xs, acc.shift, next);
    acc.count += xs.len();
}

impl PairLanes {
    /// Adds one row's `(x − s, (x − s)²)`, prefetching `next` alongside ([`ahead`]).
    #[inline(always)]
    fn add_shifted_row<T: Element>(&mut self, xs: &[T], s: f64, next: &[T]) {
        let (body, rest) = xs.as_chunks::<LANES2>();
        for (k, ch) in body.iter().enumerate() {
            ahead(&[next], k * LANES2, LANES2);
            for (l, v) in ch.iter().enumerate() {
                let d = v.to_f64() - s;
                self.a[l] += d;
                self.b[l] += d * d;
            }
        }
        let (mid, last) = rest.as_chunks::<8>();
        for ch in mid {
            for (l, v) in ch.iter().enumerate() {
                let d = v.to_f64() - s;
                self.a8[l] += d;
                self.b8[l] += d * d;
            }
        }
        for v in last {
            let d = v.to_f64() - s;
            self.ta += d;
            self.tb += d * d;
        }
    }
}

// ─── Channels-first runs ────────────────────────────────────────────────────────────────

/// Moments of a contiguous run: blocks of `BLOCK` reduced while in L1, merged in order.
/// `next` (empty, or the channel's next row) is prefetched alongside ([`ahead`]).
#[inline(always)]
pub(crate) fn run_moments<T: Element>(xs: &[T], next: &[T]) -> Moments {
    let mut acc = Moments::default();
    for (i, block) in xs.chunks(BLOCK).enumerate() {
        let next = next.get(i * BLOCK..).unwrap_or(&[]);
        acc = acc.merge(block_moments(block, next));
    }
    acc
}

/// Largest accepted cancellation of a shifted single pass, `Σ(x − s)² / M2`: beyond it
/// (the block's first value more than ~32 standard deviations from its mean, or
/// non-finite values), the block is reduced again by two passes.
const MAX_CANCEL: f64 = 1024.0;

/// `(mean, M2)` from the shifted sums `s1 = Σ(x − s)`, `s2 = Σ(x − s)²` of `n` values,
/// or `None` when the subtraction would cancel more than `MAX_CANCEL` allows. Accepted,
/// M2 carries at most `MAX_CANCEL` times the rounding error of `s2`: ~1e-13 relative.
#[inline(always)]
fn from_shifted(shift: f64, n: f64, s1: f64, s2: f64) -> Option<(f64, f64)> {
    let m2 = s2 - s1 * (s1 / n);
    // Also false for NaN: non-finite data take the two-pass route.
    if m2 * MAX_CANCEL >= s2 && s2.is_finite() {
        Some((shift + s1 / n, m2))
    } else {
        None
    }
}

/// Moments of one block in a single pass over the values shifted by the first one
/// (`Σ(x − x₀)`, `Σ(x − x₀)²` in f64), with the exact two-pass reduction as the fallback
/// when the shift cancels too much.
#[inline(always)]
fn block_moments<T: Element>(block: &[T], next: &[T]) -> Moments {
    let n = block.len() as f64;
    let Some(first) = block.first() else {
        return Moments::default();
    };
    let shift = first.to_f64();
    let (s1, s2) = shifted_sums(block, shift, next);
    let (mean, m2) = from_shifted(shift, n, s1, s2).unwrap_or_else(|| {
        let mean = sum(block) / n;
        (mean, sum_sq_dev(block, mean))
    });
    Moments { count: n, mean, m2 }
}

/// `(Σ(x − s), Σ(x − s)²)` over a contiguous run, prefetching `next` alongside.
#[inline(always)]
fn shifted_sums<T: Element>(xs: &[T], s: f64, next: &[T]) -> (f64, f64) {
    let mut a = [0.0f64; LANES2];
    let mut b = [0.0f64; LANES2];
    let (body, rest) = xs.as_chunks::<LANES2>();
    for (k, ch) in body.iter().enumerate() {
        ahead(&[next], k * LANES2, LANES2);
        for l in 0..LANES2 {
            let d = ch[l].to_f64() - s;
            a[l] += d;
            b[l] += d * d;
        }
    }
    let (mut ta, mut tb) = (0.0, 0.0);
    for v in rest {
        let d = v.to_f64() - s;
        ta += d;
        tb += d * d;
    }
    (fold(a) + ta, fold(b) + tb)
}

#[inline(always)]
fn sum<T: Element>(xs: &[T]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let (body, _) = xs.as_chunks::<LANES>();
    for ch in body {
        for l in 0..LANES {
            acc[l] += ch[l].to_f64();
        }
    }
    let rest = &xs[body.len() * LANES..];
    let (mid, last) = rest.as_chunks::<8>();
    let mut acc8 = [0.0f64; 8];
    for ch in mid {
        for l in 0..8 {
            acc8[l] += ch[l].to_f64();
        }
    }
    let mut tail = 0.0;
    for v in last {
        tail += v.to_f64();
    }
    fold(acc) + (fold(acc8) + tail)
}

#[inline(always)]
fn sum_sq_dev<T: Element>(xs: &[T], m: f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let (body, rest) = xs.as_chunks::<LANES>();
    for ch in body {
        for l in 0..LANES {
            let d = ch[l].to_f64() - m;
            acc[l] += d * d;
        }
    }
    let (mid, last) = rest.as_chunks::<8>();
    let mut acc8 = [0.0f64; 8];
    for ch in mid {
        for l in 0..8 {
            let d = ch[l].to_f64() - m;
            acc8[l] += d * d;
        }
    }
    let mut tail = 0.0;
    for v in last {
        let d = v.to_f64() - m;
        tail += d * d;
    }
    fold(acc) + (fold(acc8) + tail)
}

// ─── Channels-last rows ─────────────────────────────────────────────────────────────────

/// Merges the per-channel moments of channels-last rows (`rows.len()` a multiple of `c`)
/// into `out`, block by block (each block's rows reduced by two passes in L1).
#[inline(always)]
pub(crate) fn rows_moments<T: Element>(rows: &[T], c: usize, out: &mut [Moments]) {
    if c < 32 {
        return rows_moments_small(rows, c, out);
    }
    // One pass over all rows, shifted per channel by the first row (|Σ(x − s)²| is at
    // most (n + 1)·M2 when the shift is one of the values, so the subtraction below costs
    // at most log2(n + 1) bits of f64) — for 32 or 64 channels row by row with the sums
    // in registers, else `GROUP_ROWS` rows at a time across the channels; one conversion to
    // moments per channel, no merges. A channel whose sums are not finite
    // or cancel more than `MAX_CANCEL` is reduced again by two strided passes.
    let n = rows.len() / c;
    if n == 0 {
        return;
    }
    let mut scratch = Scratch::<f64>::take(3 * c);
    let (shift, rest) = scratch.split_at_mut(c);
    let (s1, s2) = rest.split_at_mut(c);
    for (sh, v) in shift.iter_mut().zip(&rows[..c]) {
        *sh = v.to_f64();
    }
    let shift: &[f64] = shift;
    let (s1, s2) = (&mut s1[..c], &mut s2[..c]);
    match c {
        32 => shifted_rows::<T, 32>(rows, shift, s1, s2),
        64 => shifted_rows::<T, 64>(rows, shift, s1, s2),
        _ => shifted_groups(rows, c, shift, s1, s2),
    }
    let nf = n as f64;
    for ch in 0..c {
        let (mean, m2) = from_shifted(shift[ch], nf, s1[ch], s2[ch]).unwrap_or_else(|| {
            let mean = rows
                .iter()
                .skip(ch)
                .step_by(c)
                .map(|v| v.to_f64())
                .sum::<f64>()
                / nf;
            let m2 = rows
                .iter()
                .skip(ch)
                .step_by(c)
                .map(|v| (v.to_f64() - mean) * (v.to_f64() - mean))
                .sum::<f64>();
            (mean, m2)
        });
        out[ch] = out[ch].merge(Moments {
            count: nf,
            mean,
            m2,
        });
    }
}

/// Rows per group in the channels-last statistics over many channels
/// ([`shifted_groups`]): each group's values are added across its rows in registers,
/// then once into the per-channel sums in memory. Eight, not four: eight rows are eight
/// streams of reads in flight, and for C = 1024 half the loads and stores of sums (16 KB)
/// and shift (8 KB) that do not stay in L1 beside the rows — the S3 training forward 0–3%
/// faster from cold, the statistics pass alone 20–27% in a C probe (2-core development
/// VM; the probe and the in-process A/B are in commit 5b84ab7). The backward sums
/// read two tensors and stay at four rows (eight streams): eight rows of both, sixteen
/// streams, were slower there.
const GROUP_ROWS: usize = 8;

/// The `GROUP_ROWS` consecutive rows of `c` values that `q` holds.
#[inline(always)]
fn group_rows<T>(q: &[T], c: usize) -> [&[T]; GROUP_ROWS] {
    let (q, c) = (&q[..GROUP_ROWS * c], c);
    [
        &q[..c],
        &q[c..2 * c],
        &q[2 * c..3 * c],
        &q[3 * c..4 * c],
        &q[4 * c..5 * c],
        &q[5 * c..6 * c],
        &q[6 * c..7 * c],
        &q[7 * c..8 * c],
    ]
}

/// The sum of a group's eight terms in a fixed pairwise order.
#[inline(always)]
fn tree8(v: [f64; GROUP_ROWS]) -> f64 {
    ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]))
}

/// Adds the shifted sums `Σ(x − shift)`, `Σ(x − shift)²` of channels-last rows of `c`
/// channels into `s1`, `s2`: [`GROUP_ROWS`] rows at a time across the channels, then
/// the last rows one by one.
#[inline(always)]
fn shifted_groups<T: Element>(rows: &[T], c: usize, shift: &[f64], s1: &mut [f64], s2: &mut [f64]) {
    let (shift, s1, s2) = (&shift[..c], &mut s1[..c], &mut s2[..c]);
    let mut groups = rows.chunks_exact(GROUP_ROWS * c);
    for q in &mut groups {
        let r = group_rows(q, c);
        for ch in 0..c {
            let sh = shift[ch];
            let d: [f64; GROUP_ROWS] = std::array::from_fn(|k| r[k][ch].to_f64() - sh);
            s1[ch] += tree8(d);
            s2[ch] += tree8(d.map(|v| v * v));
        }
    }
    for r in groups.remainder().chunks_exact(c) {
        for ch in 0..c {
            let d = r[ch].to_f64() - shift[ch];
            s1[ch] += d;
            s2[ch] += d * d;
        }
    }
}

/// [`shifted_groups`] for exactly `C` channels, one row after another: the sums are
/// fixed-size arrays, which the compiler keeps in registers for all the rows (the S4
/// training forward, C = 64, took 8–12% longer with them in memory: in-process A/B on
/// the 2-core development VM, commit db6decf).
#[inline(always)]
fn shifted_rows<T: Element, const C: usize>(
    rows: &[T],
    shift: &[f64],
    s1: &mut [f64],
    s2: &mut [f64],
) {
    let mut sh = [0.0f64; C];
    sh.copy_from_slice(&shift[..C]);
    let (mut a, mut b) = ([0.0f64; C], [0.0f64; C]);
    for r in rows.as_chunks::<C>().0 {
        for ch in 0..C {
            let d = r[ch].to_f64() - sh[ch];
            a[ch] += d;
            b[ch] += d * d;
        }
    }
    for ch in 0..C {
        s1[ch] += a[ch];
        s2[ch] += b[ch];
    }
}

/// [`rows_moments`] for fewer than 32 channels: runs of whole rows as lanes.
#[inline(always)]
fn rows_moments_small<T: Element>(rows: &[T], c: usize, out: &mut [Moments]) {
    let l = lanes_for(c);
    let br = (BLOCK / l).max(1) * l / c; // rows per block, a whole number of runs
    for block in rows.chunks(br * c) {
        let n = (block.len() / c) as f64;
        let mut acc = [0.0f64; 64];
        for run in block.chunks(l) {
            for (a, v) in acc[..run.len()].iter_mut().zip(run) {
                *a += v.to_f64();
            }
        }
        let mut sums = [0.0f64; 64];
        fold_lanes(&acc, c, &mut sums);
        let mut mean = [0.0f64; 64];
        for (m, s) in mean[..c].iter_mut().zip(&sums[..c]) {
            *m = s / n;
        }
        let mut mbuf = [0.0f64; 64];
        let me = expand(&mean, c, &mut mbuf);
        let mut q = [0.0f64; 64];
        for run in block.chunks(l) {
            for ((a, v), m) in q[..run.len()].iter_mut().zip(run).zip(me) {
                let d = v.to_f64() - m;
                *a += d * d;
            }
        }
        let mut m2 = [0.0f64; 64];
        fold_lanes(&q, c, &mut m2);
        for ch in 0..c {
            out[ch] = out[ch].merge(Moments {
                count: n,
                mean: mean[ch],
                m2: m2[ch],
            });
        }
    }
}
