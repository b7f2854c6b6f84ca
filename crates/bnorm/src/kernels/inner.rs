//! The inner loops, written once for every element type and instruction set. Each keeps
//! `LANES` independent f64 accumulators (or works across channels), so the compiler
//! vectorizes it at whatever width the enclosing `#[target_feature]` allows, and the
//! lanes are combined in a fixed order: every level gives the same bits.

use super::BLOCK;
use crate::element::{DType, Element};
use crate::stats::Moments;

thread_local! {
    /// Per-thread buffers of [`Scratch`], one per value type.
    static SPARE64: std::cell::Cell<Vec<f64>> = const { std::cell::Cell::new(Vec::new()) };
    static SPARE32: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A value type with a per-thread spare buffer.
pub(crate) trait Spare: Copy + Default + 'static {
    fn spare() -> &'static std::thread::LocalKey<std::cell::Cell<Vec<Self>>>;
}

impl Spare for f64 {
    fn spare() -> &'static std::thread::LocalKey<std::cell::Cell<Vec<f64>>> {
        &SPARE64
    }
}

impl Spare for f32 {
    fn spare() -> &'static std::thread::LocalKey<std::cell::Cell<Vec<f32>>> {
        &SPARE32
    }
}

/// `n` zeroed values in this thread's spare buffer, taken for the life of the guard and
/// handed back on drop, so a warmed-up step allocates nothing (a kernel nested in another
/// finds the buffer taken and allocates its own). Unlike a closure-taking helper, the
/// guard keeps the kernel's loops inside the `#[target_feature]` function that runs them.
pub(crate) struct Scratch<A: Spare>(Vec<A>);

impl<A: Spare> Scratch<A> {
    #[inline(always)]
    pub(crate) fn take(n: usize) -> Scratch<A> {
        let mut v = A::spare().try_with(|c| c.take()).unwrap_or_default();
        v.clear();
        v.resize(n, A::default());
        Scratch(v)
    }
}

impl<A: Spare> Drop for Scratch<A> {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        // At thread exit the buffer is simply freed.
        let _ = A::spare().try_with(|c| c.set(v));
    }
}

impl<A: Spare> std::ops::Deref for Scratch<A> {
    type Target = [A];
    fn deref(&self) -> &[A] {
        &self.0
    }
}

impl<A: Spare> std::ops::DerefMut for Scratch<A> {
    fn deref_mut(&mut self) -> &mut [A] {
        &mut self.0
    }
}

/// Independent accumulators of a single reduction (enough to hide the latency of an f64
/// add: 4 AVX-512 or 8 AVX2 registers).
const LANES: usize = 128;

/// Independent accumulators of each of two simultaneous reductions.
const LANES2: usize = 64;

/// Sums lanes by halving (lane i with lane i + n/2, ...): a fixed order.
#[inline(always)]
fn fold<const N: usize>(mut a: [f64; N]) -> f64 {
    let mut n = N;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            a[i] += a[i + n];
        }
    }
    a[0]
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

/// Asks the CPU to bring the cache lines of `next[i..i + n]` (as much of it as exists)
/// into L2, for every slice in `next`: a hint that changes no value.
///
/// The first pass of a channels-first kernel reads one row of a channel (x, dy) at a
/// time from memory, a few streams per core. Requesting the same offsets of the
/// channel's next row (megabytes away) while the current one is reduced doubles the
/// streams in flight: the S5 backward 3–5% and training forward 2.5–3.5% faster, S1 (in
/// part served by the L3) unchanged — measured on the 2-core development VM in one
/// process alternating with and without it (commit db6decf).
#[inline(always)]
fn ahead<T>(next: &[&[T]], i: usize, n: usize) {
    #[cfg(target_arch = "x86_64")]
    for s in next {
        let Some(part) = s.get(i..(i + n).min(s.len())) else {
            continue;
        };
        let (p, bytes) = (part.as_ptr().cast::<i8>(), std::mem::size_of_val(part));
        for o in (0..bytes).step_by(64) {
            // SAFETY: a prefetch neither faults nor reads or writes memory as far as the
            // program can observe; the address lies within `part` in any case (`o <
            // bytes`). SSE, which the instruction belongs to, is part of every x86-64.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.add(o))
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (next, i, n);
}

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

/// The lanes of one channel's `(Σdz, Σdz·(x − m))` over a channels-first segment, which
/// persist across its rows and are folded once ([`DotLanes::sums`]): each row adds its
/// 64-value chunks to 64 lanes, then its 8-value chunks to 8 lanes, then its last values
/// to one scalar each; the result is `(fold(64 lanes) + fold(8 lanes)) + scalar`.
/// (Folding per row cost as much as the row's arithmetic for short rows such as 14×14
/// maps.) The same bits whether the rows come in one call ([`seg_dot`]) or one at a time
/// ([`dot_row`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DotLanes {
    a: [f64; LANES2],
    b: [f64; LANES2],
    a8: [f64; 8],
    b8: [f64; 8],
    ta: f64,
    tb: f64,
}

impl DotLanes {
    /// No rows yet.
    pub(crate) const ZERO: DotLanes = DotLanes {
        a: [0.0; LANES2],
        b: [0.0; LANES2],
        a8: [0.0; 8],
        b8: [0.0; 8],
        ta: 0.0,
        tb: 0.0,
    };

    /// Adds one row (`ys` the ReLU output when `RELU`, else ignored), prefetching the
    /// slices of `next` alongside ([`ahead`]).
    #[inline(always)]
    fn add_row<T: Element, const RELU: bool>(
        &mut self,
        xs: &[T],
        ys: &[T],
        ds: &[T],
        m: f64,
        next: &[&[T]],
    ) {
        let (xs, ys, ds) = dot_operands::<T, RELU>(xs, ys, ds);
        let (xb, xr) = xs.as_chunks::<LANES2>();
        let (db, dr) = ds.as_chunks::<LANES2>();
        let (yb, yr) = ys.as_chunks::<LANES2>();
        for (k, ((xc, dc), yc)) in xb.iter().zip(db).zip(yb).enumerate() {
            ahead(next, k * LANES2, LANES2);
            for l in 0..LANES2 {
                let d = dz::<T, RELU>(yc[l], dc[l]);
                self.a[l] += d;
                self.b[l] += d * (xc[l].to_f64() - m);
            }
        }
        let (x8, xr) = xr.as_chunks::<8>();
        let (d8, dr) = dr.as_chunks::<8>();
        let (y8, yr) = yr.as_chunks::<8>();
        for ((xc, dc), yc) in x8.iter().zip(d8).zip(y8) {
            for l in 0..8 {
                let d = dz::<T, RELU>(yc[l], dc[l]);
                self.a8[l] += d;
                self.b8[l] += d * (xc[l].to_f64() - m);
            }
        }
        for ((xv, dv), yv) in xr.iter().zip(dr).zip(yr) {
            let d = dz::<T, RELU>(*yv, *dv);
            self.ta += d;
            self.tb += d * (xv.to_f64() - m);
        }
    }

    /// `(Σdz, Σdz·(x − m))` of the rows added.
    #[inline(always)]
    pub(crate) fn sums(&self) -> (f64, f64) {
        (
            (fold(self.a) + fold(self.a8)) + self.ta,
            (fold(self.b) + fold(self.b8)) + self.tb,
        )
    }
}

/// One channel's `(Σdz, Σdz·(x − m))` over a channels-first segment: `rows` rows of `len`
/// values, row `r` at `start + r·stride`, in the order of [`DotLanes`]; `dz = dy`, or
/// `dy·[y > 0]` through a ReLU whose output was `y` when `y` is not empty.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn seg_dot<T: Element>(
    x: &[T],
    y: &[T],
    dy: &[T],
    start: usize,
    stride: usize,
    rows: usize,
    len: usize,
    m: f64,
) -> (f64, f64) {
    let mut acc = DotLanes::ZERO;
    for r in 0..rows {
        let s = start + r * stride;
        let (xs, ds) = (&x[s..s + len], &dy[s..s + len]);
        if y.is_empty() {
            acc.add_row::<T, false>(xs, &[], ds, m, &[]);
        } else {
            acc.add_row::<T, true>(xs, &y[s..s + len], ds, m, &[]);
        }
    }
    acc.sums()
}

/// Adds one row of `(x, dy)` to `acc` (see [`DotLanes`]), through a ReLU whose output
/// was `ys` when `ys` is not empty; the slices of `next` (the channel's next rows of the
/// same arrays, or none) are prefetched alongside ([`ahead`]).
#[inline(always)]
pub(crate) fn dot_row<T: Element>(
    acc: &mut DotLanes,
    xs: &[T],
    ys: &[T],
    ds: &[T],
    m: f64,
    next: &[&[T]],
) {
    if ys.is_empty() {
        acc.add_row::<T, false>(xs, ys, ds, m, next)
    } else {
        acc.add_row::<T, true>(xs, ys, ds, m, next)
    }
}

/// Channels-last rows with few channels are processed as runs of `lanes_for(c)` elements
/// (whole rows, at least 32 values), so the loops vectorize whatever C is; per-channel
/// parameters are repeated to that length. From 32 channels on, a run is one row.
#[inline(always)]
fn lanes_for(c: usize) -> usize {
    if c >= 32 {
        c
    } else {
        c * 32usize.div_ceil(c)
    }
}

/// `p` (one value per channel) repeated to `lanes_for(c)` values.
#[inline(always)]
fn expand<'a>(p: &'a [f64], c: usize, buf: &'a mut [f64; 64]) -> &'a [f64] {
    if c >= 32 {
        &p[..c]
    } else {
        let l = lanes_for(c);
        for (i, v) in buf[..l].iter_mut().enumerate() {
            *v = p[i % c];
        }
        &buf[..l]
    }
}

/// Folds lanes of a small-C run back to channels: `out[ch] = Σ_k acc[k·c + ch]`.
#[inline(always)]
fn fold_lanes(acc: &[f64; 64], c: usize, out: &mut [f64; 64]) {
    let l = lanes_for(c);
    for v in out[..c].iter_mut() {
        *v = 0.0;
    }
    for (i, a) in acc[..l].iter().enumerate() {
        out[i % c] += a;
    }
}

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

/// [`rows_dot`] (with `RELU`, [`rows_dot_relu`] through the ReLU output `ys`) where a
/// run is exactly `L` values (`lanes_for(c) == L`: C divides 32, or C = 64). The lanes
/// are fixed-size arrays, which the compiler keeps in registers for all the rows; with
/// per-channel sums in memory, loaded and stored every few rows, the S4 backward (C =
/// 64) took 10–13% longer (measured in one process alternating both on the 2-core
/// development VM, commit db6decf).
/// Runs are added one after another, a last partial one (whole rows) into the first
/// lanes; the lanes are folded to channels once. For C below 32 the same order as the
/// general small-C loop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_dot_lanes<T: Element, const L: usize, const RELU: bool>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    c: usize,
    center: &[f64],
    sa: &mut [f64],
    sb: &mut [f64],
) {
    let mut mbuf = [0.0f64; 64];
    let mut me = [0.0f64; L];
    me.copy_from_slice(&expand(center, c, &mut mbuf)[..L]);
    let (xs, ys, ds) = dot_operands::<T, RELU>(xs, ys, ds);
    let (mut a, mut b) = ([0.0f64; L], [0.0f64; L]);
    let (xb, xr) = xs.as_chunks::<L>();
    let (db, dr) = ds.as_chunks::<L>();
    let (yb, yr) = ys.as_chunks::<L>();
    for ((xc, dc), yc) in xb.iter().zip(db).zip(yb) {
        for l in 0..L {
            let d = dz::<T, RELU>(yc[l], dc[l]);
            a[l] += d;
            b[l] += d * (xc[l].to_f64() - me[l]);
        }
    }
    for (l, ((x, d), y)) in xr.iter().zip(dr).zip(yr).enumerate() {
        let d = dz::<T, RELU>(*y, *d);
        a[l] += d;
        b[l] += d * (x.to_f64() - me[l]);
    }
    let (mut a64, mut b64) = ([0.0f64; 64], [0.0f64; 64]);
    a64[..L].copy_from_slice(&a);
    b64[..L].copy_from_slice(&b);
    add_folded(&a64, &b64, c, sa, sb);
}

/// Folds two sets of run lanes to channels ([`fold_lanes`]) and adds them into `sa`, `sb`.
#[inline(always)]
fn add_folded(a: &[f64; 64], b: &[f64; 64], c: usize, sa: &mut [f64], sb: &mut [f64]) {
    let (mut fa, mut fb) = ([0.0f64; 64], [0.0f64; 64]);
    fold_lanes(a, c, &mut fa);
    fold_lanes(b, c, &mut fb);
    for ch in 0..c {
        sa[ch] += fa[ch];
        sb[ch] += fb[ch];
    }
}

/// [`rows_dot_lanes`] for the other C below 32, whose runs (`lanes_for(c)` values, whole
/// rows) are not a size known at compile time: the same order, the lanes in memory.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_dot_runs<T: Element, const RELU: bool>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    c: usize,
    center: &[f64],
    sa: &mut [f64],
    sb: &mut [f64],
) {
    let l = lanes_for(c);
    let mut mbuf = [0.0f64; 64];
    let me = expand(center, c, &mut mbuf);
    let (xs, ys, ds) = dot_operands::<T, RELU>(xs, ys, ds);
    let (mut a, mut b) = ([0.0f64; 64], [0.0f64; 64]);
    for ((xr, yr), dr) in xs.chunks(l).zip(ys.chunks(l)).zip(ds.chunks(l)) {
        for (((((av, bv), x), y), d), m) in a
            .iter_mut()
            .zip(b.iter_mut())
            .zip(xr)
            .zip(yr)
            .zip(dr)
            .zip(me)
        {
            let d = dz::<T, RELU>(*y, *d);
            *av += d;
            *bv += d * (x.to_f64() - m);
        }
    }
    add_folded(&a, &b, c, sa, sb);
}

/// Adds per-channel (Σdy, Σdy·(x − center)) of channels-last rows into `sa`, `sb`.
#[inline(always)]
pub(crate) fn rows_dot<T: Element>(
    xs: &[T],
    ds: &[T],
    c: usize,
    center: &[f64],
    sa: &mut [f64],
    sb: &mut [f64],
) {
    match lanes_for(c) {
        32 => return rows_dot_lanes::<T, 32, false>(xs, &[], ds, c, center, sa, sb),
        64 => return rows_dot_lanes::<T, 64, false>(xs, &[], ds, c, center, sa, sb),
        _ => {}
    }
    if c < 32 {
        return rows_dot_runs::<T, false>(xs, &[], ds, c, center, sa, sb);
    }
    // Four rows at a time: a quarter of the accumulator traffic, and two tensors' four
    // rows are eight streams of reads in flight (two rows: 2–5% slower on S3 in an
    // in-process A/B, eight rows slower still in a C probe; both in commit 5b84ab7).
    let (sa, sb, center) = (&mut sa[..c], &mut sb[..c], &center[..c]);
    let mut xq = xs.chunks_exact(4 * c);
    let mut dq = ds.chunks_exact(4 * c);
    for (xq, dq) in (&mut xq).zip(&mut dq) {
        let (x0, x1, x2, x3) = (
            &xq[..c],
            &xq[c..2 * c],
            &xq[2 * c..3 * c],
            &xq[3 * c..4 * c],
        );
        let (d0, d1, d2, d3) = (
            &dq[..c],
            &dq[c..2 * c],
            &dq[2 * c..3 * c],
            &dq[3 * c..4 * c],
        );
        for ch in 0..c {
            let m = center[ch];
            let (e0, e1, e2, e3) = (
                d0[ch].to_f64(),
                d1[ch].to_f64(),
                d2[ch].to_f64(),
                d3[ch].to_f64(),
            );
            sa[ch] += (e0 + e1) + (e2 + e3);
            sb[ch] += (e0 * (x0[ch].to_f64() - m) + e1 * (x1[ch].to_f64() - m))
                + (e2 * (x2[ch].to_f64() - m) + e3 * (x3[ch].to_f64() - m));
        }
    }
    for (xr, dr) in xq
        .remainder()
        .chunks_exact(c)
        .zip(dq.remainder().chunks_exact(c))
    {
        for ((((a, b), x), d), m) in sa.iter_mut().zip(sb.iter_mut()).zip(xr).zip(dr).zip(center) {
            let dv = d.to_f64();
            *a += dv;
            *b += dv * (x.to_f64() - m);
        }
    }
}

/// The upstream gradient through a ReLU whose output is `y`: `dy` where `y > 0`, else 0.
#[inline(always)]
fn through_relu<T: Element>(y: T, dy: T) -> f64 {
    if y.to_f64() > 0.0 {
        dy.to_f64()
    } else {
        0.0
    }
}

/// The gradient summed by the backward reductions: `dy`, or with `RELU`
/// [`through_relu`]`(y, dy)`.
#[inline(always)]
fn dz<T: Element, const RELU: bool>(y: T, dy: T) -> f64 {
    if RELU {
        through_relu(y, dy)
    } else {
        dy.to_f64()
    }
}

/// `(x, y, dy)` cut to a common length for a backward reduction; without a ReLU `y` is
/// `dy` (unused by [`dz`]): the same chunking, no extra slice.
#[inline(always)]
fn dot_operands<'a, T, const RELU: bool>(
    xs: &'a [T],
    ys: &'a [T],
    ds: &'a [T],
) -> (&'a [T], &'a [T], &'a [T]) {
    let n = xs.len().min(ds.len());
    let (xs, ds) = (&xs[..n], &ds[..n]);
    (xs, if RELU { &ys[..n] } else { ds }, ds)
}

/// Channels-last per-channel sums through the ReLU, added into `sa`, `sb`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_dot_relu<T: Element>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    c: usize,
    center: &[f64],
    sa: &mut [f64],
    sb: &mut [f64],
) {
    match lanes_for(c) {
        32 => return rows_dot_lanes::<T, 32, true>(xs, ys, ds, c, center, sa, sb),
        64 => return rows_dot_lanes::<T, 64, true>(xs, ys, ds, c, center, sa, sb),
        _ => {}
    }
    if c < 32 {
        return rows_dot_runs::<T, true>(xs, ys, ds, c, center, sa, sb);
    }
    rows_dot_pairs(xs, ys, ds, c, center, sa, sb);
}

/// [`rows_dot_relu`] for 32 channels or more (not 64 or a divisor of 32): two rows at a
/// time across the channels, then the last row. Two rows of x, y and dy are six streams
/// of reads in flight; in one process alternating the variants on S3 (C = 1024), one row
/// at a time (the code before commit 95206be) took 13–17% longer and four rows (twelve
/// streams) 4% longer (2-core development VM, commit 5b84ab7).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_dot_pairs<T: Element>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    c: usize,
    center: &[f64],
    sa: &mut [f64],
    sb: &mut [f64],
) {
    let (sa, sb, center) = (&mut sa[..c], &mut sb[..c], &center[..c]);
    let (xs, ys, ds) = dot_operands::<T, true>(xs, ys, ds);
    let mut xq = xs.chunks_exact(2 * c);
    let mut yq = ys.chunks_exact(2 * c);
    let mut dq = ds.chunks_exact(2 * c);
    for ((xq, yq), dq) in (&mut xq).zip(&mut yq).zip(&mut dq) {
        let (x0, x1) = (&xq[..c], &xq[c..2 * c]);
        let (y0, y1) = (&yq[..c], &yq[c..2 * c]);
        let (d0, d1) = (&dq[..c], &dq[c..2 * c]);
        for ch in 0..c {
            let m = center[ch];
            let (e0, e1) = (through_relu(y0[ch], d0[ch]), through_relu(y1[ch], d1[ch]));
            sa[ch] += e0 + e1;
            sb[ch] += e0 * (x0[ch].to_f64() - m) + e1 * (x1[ch].to_f64() - m);
        }
    }
    for ((xr, yr), dr) in xq
        .remainder()
        .chunks_exact(c)
        .zip(yq.remainder().chunks_exact(c))
        .zip(dq.remainder().chunks_exact(c))
    {
        for (((((a, b), x), y), d), m) in sa
            .iter_mut()
            .zip(sb.iter_mut())
            .zip(xr)
            .zip(yr)
            .zip(dr)
            .zip(center)
        {
            let e = through_relu(*y, *d);
            *a += e;
            *b += e * (x.to_f64() - m);
        }
    }
}

// ─── Element-wise maps ─────────────────────────────────────────────────────────────────

/// The arithmetic of the element-wise maps. The forward maps run in f64 for f64 storage
/// and in f32 for every narrower type (twice the SIMD lanes, no conversions); the
/// backward maps run in f64 for f32 and f64 storage, because their three terms cancel by
/// design (dx sums to zero over a channel) and f32 would leave errors of the terms' size
/// in small gradients (f32 storage may ask for it: `BackwardArithmetic::F32`), and in f32
/// for the 16-bit types, whose own rounding is 2^13 times coarser. In f32 the center is
/// split into a high
/// part `hi` (the center rounded to f32) and the rest `lo`; the maps compute `x − hi`,
/// which is exact when x lies near the center (Sterbenz), and fold `−lo·scale` into the
/// shift in f64. So a channel mean of 1e4 with unit spread costs no accuracy, and the
/// result stays within a few f32 roundings of the f64 one. Statistics and reductions stay
/// in f64 whatever the storage. The maps use separate multiplies and adds, never a fused
/// multiply-add, so every instruction set gives the same bits.
trait Arith:
    Spare
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
{
    const ZERO: Self;
    /// Whether this is f32 (the backward maps then center `dz` too).
    const NARROW: bool;
    fn load<T: Element>(v: T) -> Self;
    fn store<T: Element>(self) -> T;
    /// `(hi, lo)`: `hi` in this type, `lo = v − hi` in f64 (0 when `hi` is `v`).
    fn split(v: f64) -> (Self, f64);
    fn coef(v: f64) -> Self;
}

impl Arith for f64 {
    const ZERO: f64 = 0.0;
    const NARROW: bool = false;
    #[inline(always)]
    fn load<T: Element>(v: T) -> f64 {
        v.to_f64()
    }
    #[inline(always)]
    fn store<T: Element>(self) -> T {
        T::from_f64(self)
    }
    #[inline(always)]
    fn split(v: f64) -> (f64, f64) {
        (v, 0.0)
    }
    #[inline(always)]
    fn coef(v: f64) -> f64 {
        v
    }
}

impl Arith for f32 {
    const ZERO: f32 = 0.0;
    const NARROW: bool = true;
    #[inline(always)]
    fn load<T: Element>(v: T) -> f32 {
        v.to_f32()
    }
    #[inline(always)]
    fn store<T: Element>(self) -> T {
        T::from_f32(self)
    }
    #[inline(always)]
    fn split(v: f64) -> (f32, f64) {
        let hi = v as f32;
        let lo = if hi.is_finite() { v - hi as f64 } else { 0.0 };
        (hi, lo)
    }
    #[inline(always)]
    fn coef(v: f64) -> f32 {
        v as f32
    }
}

/// Whether `T`'s maps run in f64 (f64 storage only).
#[inline(always)]
fn wide<T: Element>() -> bool {
    T::DTYPE == DType::F64
}

/// Calls `$f::<T, f64>` or `$f::<T, f32>` by the storage type.
macro_rules! by_arith {
    ($f:ident::<$t:ident>($($arg:expr),* $(,)?)) => {
        if wide::<$t>() {
            $f::<$t, f64>($($arg),*)
        } else {
            $f::<$t, f32>($($arg),*)
        }
    };
}

/// Calls `$f::<T, f32>` for 16-bit storage, and for f32 storage when `$narrow` (the
/// caller's `BackwardArithmetic::F32`), `$f::<T, f64>` otherwise: the backward maps'
/// arithmetic. Their terms cancel by design, so by default f32 storage gets f64 (each
/// element rounded once from a value far more accurate than f32); for f16 and bf16 (at
/// most 11 significant bits) f32 arithmetic stays far below the storage's rounding unless
/// the terms cancel to 1/8000 of their size.
macro_rules! by_backward_arith {
    ($narrow:expr, $f:ident::<$t:ident>($($arg:expr),* $(,)?)) => {
        if $t::NARROW || ($narrow && $t::DTYPE == DType::F32) {
            $f::<$t, f32>($($arg),*)
        } else {
            $f::<$t, f64>($($arg),*)
        }
    };
}

/// `(hi, s, b')` with `y = (x − hi)·s + b'` the map `y = (x − m)·s + b` in `A`.
#[inline(always)]
fn affine_coefs<A: Arith>(m: f64, s: f64, b: f64) -> [A; 3] {
    let (hi, lo) = A::split(m);
    let b = if lo != 0.0 { b - lo * s } else { b };
    [hi, A::coef(s), A::coef(b)]
}

/// [`affine_coefs`] in f32, for the streaming kernels.
#[inline]
pub(crate) fn affine_coefs_f32(m: f64, s: f64, b: f64) -> [f32; 3] {
    affine_coefs::<f32>(m, s, b)
}

/// The f32 [`coef_table`] of a channels-last forward map (`hi`, scale, shift) and its
/// run length, for the streaming kernels; column `k` with its wrap is
/// `t[k·stride..k·stride + run + WRAP]`, `stride = t.len() / 3`.
pub(crate) fn affine_table_f32(
    c: usize,
    center: &[f64],
    scale: &[f64],
    shift: &[f64],
) -> (Scratch<f32>, usize) {
    let t = coef_table(c, |ch| {
        affine_coefs::<f32>(center[ch], scale[ch], shift[ch])
    });
    (t, map_run(c))
}

/// The f64 [`coef_table`] of a channels-last backward map (see [`affine2_coefs`]: five
/// columns, the third zero), as [`affine_table_f32`].
pub(crate) fn affine2_table_f64(
    c: usize,
    center: &[f64],
    a: &[f64],
    b: &[f64],
    k: &[f64],
) -> (Scratch<f64>, usize) {
    let t = coef_table(c, |ch| {
        affine2_coefs::<f64>(center[ch], a[ch], b[ch], k[ch])
    });
    (t, map_run(c))
}

/// The f32 [`coef_table`] of a channels-last backward map (see [`affine2_coefs`]).
pub(crate) fn affine2_table_f32(
    c: usize,
    center: &[f64],
    a: &[f64],
    b: &[f64],
    k: &[f64],
) -> (Scratch<f32>, usize) {
    let t = coef_table(c, |ch| {
        affine2_coefs::<f32>(center[ch], a[ch], b[ch], k[ch])
    });
    (t, map_run(c))
}

/// [`affine2_coefs`] in f64 and f32, for the streaming kernels.
#[inline]
pub(crate) fn affine2_coefs_f64(m: f64, a: f64, b: f64, k: f64) -> [f64; 5] {
    affine2_coefs::<f64>(m, a, b, k)
}

/// See [`affine2_coefs_f64`].
#[inline]
pub(crate) fn affine2_coefs_f32(m: f64, a: f64, b: f64, k: f64) -> [f32; 5] {
    affine2_coefs::<f32>(m, a, b, k)
}

/// `[hi, a, d, b, k']` with `o = (a·(dz − d) + b·(x − hi)) + k'` the map
/// `o = a·dz + b·(x − m) + k` in `A`. In f32, `d` is the map's own center of `dz`
/// (`−k/a`, the mean of `dz` after a batch-statistics step) rounded to f32, so that
/// `dz − d`, like `x − hi`, is exact near the center and the large terms `a·dz` and `k`
/// never meet; the rounding residues of both centers are folded into `k'` in f64. In
/// f64, `d = 0` and the map is the one given, term for term (`dz − 0` is not computed).
#[inline(always)]
fn affine2_coefs<A: Arith>(m: f64, a: f64, b: f64, k: f64) -> [A; 5] {
    let (hi, lo) = A::split(m);
    let mut k = if lo != 0.0 { k - b * lo } else { k };
    let mut d = A::ZERO;
    if A::NARROW && a != 0.0 {
        let (dh, _) = A::split(-k / a);
        let dv: f64 = dh.store();
        if dv.is_finite() {
            d = dh;
            k += a * dv;
        }
    }
    [hi, A::coef(a), d, A::coef(b), A::coef(k)]
}

/// `dz − d` in f32 (see [`affine2_coefs`]); `dz` itself in f64, where `d` is zero.
#[inline(always)]
fn centered<A: Arith>(dz: A, d: A) -> A {
    if A::NARROW {
        dz - d
    } else {
        dz
    }
}

/// ReLU that keeps NaN (as PyTorch's does): `z < 0 → 0`, otherwise `z`.
#[inline(always)]
fn relu<A: Arith>(z: A) -> A {
    if z < A::ZERO {
        A::ZERO
    } else {
        z
    }
}

/// `dy` where the ReLU output `y` is positive, else 0, in the maps' arithmetic.
#[inline(always)]
fn masked<T: Element, A: Arith>(y: T, dy: T) -> A {
    if A::load(y) > A::ZERO {
        A::load(dy)
    } else {
        A::ZERO
    }
}

/// `dy` where the ReLU output `y` is positive, else 0, in the storage type.
#[inline(always)]
fn masked_store<T: Element>(y: T, dy: T) -> T {
    if y.to_f64() > 0.0 {
        dy
    } else {
        T::from_f64(0.0)
    }
}

/// `y = (x − m)·s + b` over a contiguous run.
#[inline(always)]
pub(crate) fn run_affine<T: Element>(xs: &[T], ys: &mut [T], m: f64, s: f64, b: f64) {
    by_arith!(run_affine_in::<T>(xs, &[], ys, m, s, b, false))
}

/// `y = relu((x − m)·s + b)` over a contiguous run.
#[inline(always)]
pub(crate) fn run_affine_relu<T: Element>(xs: &[T], ys: &mut [T], m: f64, s: f64, b: f64) {
    by_arith!(run_affine_in::<T>(xs, &[], ys, m, s, b, true))
}

/// `y = relu((x − m)·s + b + r)` over a contiguous run.
#[inline(always)]
pub(crate) fn run_affine_add_relu<T: Element>(
    xs: &[T],
    rs: &[T],
    ys: &mut [T],
    m: f64,
    s: f64,
    b: f64,
) {
    by_arith!(run_affine_in::<T>(xs, rs, ys, m, s, b, true))
}

/// The three run maps: `(x − m)·s + b`, plus `r` when `rs` is not empty, then ReLU when
/// `with_relu` (a constant at every call site, so each keeps its own loop).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn run_affine_in<T: Element, A: Arith>(
    xs: &[T],
    rs: &[T],
    ys: &mut [T],
    m: f64,
    s: f64,
    b: f64,
    with_relu: bool,
) {
    let [h, s, b] = affine_coefs::<A>(m, s, b);
    let z = |x: T| (A::load(x) - h) * s + b;
    if !rs.is_empty() {
        for ((y, x), r) in ys.iter_mut().zip(xs).zip(rs) {
            *y = relu(z(*x) + A::load(*r)).store();
        }
    } else if with_relu {
        for (y, x) in ys.iter_mut().zip(xs) {
            *y = relu(z(*x)).store();
        }
    } else {
        for (y, x) in ys.iter_mut().zip(xs) {
            *y = z(*x).store();
        }
    }
}

/// `o = a·dy + b·(x − m) + k` over a contiguous run.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_affine2<T: Element>(
    xs: &[T],
    ds: &[T],
    os: &mut [T],
    m: f64,
    a: f64,
    b: f64,
    k: f64,
    narrow: bool,
) {
    by_backward_arith!(narrow, run_affine2_in::<T>(xs, ds, os, m, a, b, k))
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn run_affine2_in<T: Element, A: Arith>(
    xs: &[T],
    ds: &[T],
    os: &mut [T],
    m: f64,
    a: f64,
    b: f64,
    k: f64,
) {
    let [h, a, d0, b, k] = affine2_coefs::<A>(m, a, b, k);
    for ((o, x), d) in os.iter_mut().zip(xs).zip(ds) {
        *o = (a * centered(A::load(*d), d0) + b * (A::load(*x) - h) + k).store();
    }
}

/// `dx = a·dz + b·(x − m) + k` with `dz = dy·[y > 0]`, and `dr = dz` when `rs` is not
/// empty.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_affine2_relu<T: Element>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    os: &mut [T],
    rs: &mut [T],
    m: f64,
    a: f64,
    b: f64,
    k: f64,
    narrow: bool,
) {
    by_backward_arith!(
        narrow,
        run_affine2_relu_in::<T>(xs, ys, ds, os, rs, m, a, b, k)
    )
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn run_affine2_relu_in<T: Element, A: Arith>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    os: &mut [T],
    rs: &mut [T],
    m: f64,
    a: f64,
    b: f64,
    k: f64,
) {
    let [h, a, d0, b, k] = affine2_coefs::<A>(m, a, b, k);
    for (((o, x), y), d) in os.iter_mut().zip(xs).zip(ys).zip(ds) {
        let dz: A = masked(*y, *d);
        *o = (a * centered(dz, d0) + b * (A::load(*x) - h) + k).store();
    }
    for ((r, y), d) in rs.iter_mut().zip(ys).zip(ds) {
        *r = masked_store(*y, *d);
    }
}

/// Values per run of the channels-last maps: whole rows, at least 512 values, so the
/// loop over a run is long enough to vectorize well whatever C is.
#[inline(always)]
fn map_run(c: usize) -> usize {
    c * 512usize.div_ceil(c)
}

/// `K` per-channel coefficients of a channels-last map in the arithmetic `A`
/// (`coefs(channel)`), each repeated to a run of `map_run(c)` values; see [`columns`].
#[inline(always)]
fn coef_table<A: Arith, const K: usize>(c: usize, coefs: impl Fn(usize) -> [A; K]) -> Scratch<A> {
    let (l, stride) = (map_run(c), column_stride(c));
    let mut buf = Scratch::<A>::take(K * stride);
    for ch in 0..c {
        for (k, v) in coefs(ch).into_iter().enumerate() {
            buf[k * stride + ch] = v;
        }
    }
    for col in buf.chunks_exact_mut(stride) {
        for i in c..l + WRAP {
            col[i] = col[i - c];
        }
    }
    buf
}

/// Values past the end of each [`coef_table`] column that repeat its start (the period
/// `c` divides the run), so a vector of up to `WRAP` lanes may start anywhere in a run.
pub(crate) const WRAP: usize = 16;

/// Distance between the columns of a [`coef_table`]: the run plus 48 values (the `WRAP`
/// repeat, then padding so that columns do not fall on the same offsets modulo 4 KiB).
#[inline(always)]
fn column_stride(c: usize) -> usize {
    map_run(c) + 48
}

/// The `K` columns of a [`coef_table`] for `c` channels.
#[inline(always)]
fn columns<A: Arith, const K: usize>(t: &[A], c: usize) -> [&[A]; K] {
    let (l, stride) = (map_run(c), column_stride(c));
    std::array::from_fn(|k| &t[k * stride..k * stride + l])
}

/// `y = (x − center)·scale + shift` on channels-last rows.
#[inline(always)]
pub(crate) fn rows_affine<T: Element>(
    xs: &[T],
    ys: &mut [T],
    c: usize,
    center: &[f64],
    scale: &[f64],
    shift: &[f64],
) {
    by_arith!(rows_affine_in::<T>(
        xs,
        &[],
        ys,
        c,
        center,
        scale,
        shift,
        false
    ))
}

/// Channels-last `y = relu((x − center)·scale + shift [+ r])`.
#[inline(always)]
pub(crate) fn rows_affine_relu<T: Element>(
    xs: &[T],
    rs: &[T],
    ys: &mut [T],
    c: usize,
    center: &[f64],
    scale: &[f64],
    shift: &[f64],
) {
    by_arith!(rows_affine_in::<T>(
        xs, rs, ys, c, center, scale, shift, true
    ))
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_affine_in<T: Element, A: Arith>(
    xs: &[T],
    rs: &[T],
    ys: &mut [T],
    c: usize,
    center: &[f64],
    scale: &[f64],
    shift: &[f64],
    with_relu: bool,
) {
    let table = coef_table(c, |ch| affine_coefs::<A>(center[ch], scale[ch], shift[ch]));
    let [hi, sc, sh] = columns(&table, c);
    {
        let l = hi.len();
        let co = |x: T, (h, (s, b)): (&A, (&A, &A))| (A::load(x) - *h) * *s + *b;
        let cz = || hi.iter().zip(sc.iter().zip(sh));
        if !with_relu {
            for (xr, yr) in xs.chunks(l).zip(ys.chunks_mut(l)) {
                for ((y, x), k) in yr.iter_mut().zip(xr).zip(cz()) {
                    *y = co(*x, k).store();
                }
            }
        } else if rs.is_empty() {
            for (xr, yr) in xs.chunks(l).zip(ys.chunks_mut(l)) {
                for ((y, x), k) in yr.iter_mut().zip(xr).zip(cz()) {
                    *y = relu(co(*x, k)).store();
                }
            }
        } else {
            for ((xr, rr), yr) in xs.chunks(l).zip(rs.chunks(l)).zip(ys.chunks_mut(l)) {
                for (((y, x), r), k) in yr.iter_mut().zip(xr).zip(rr).zip(cz()) {
                    *y = relu(co(*x, k) + A::load(*r)).store();
                }
            }
        }
    }
}

/// `o = a·dy + b·(x − center) + k` on channels-last rows, in f32 arithmetic for f32
/// storage when `narrow` (see `by_backward_arith!`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_affine2<T: Element>(
    xs: &[T],
    ds: &[T],
    os: &mut [T],
    c: usize,
    center: &[f64],
    a: &[f64],
    b: &[f64],
    k: &[f64],
    narrow: bool,
) {
    by_backward_arith!(
        narrow,
        rows_affine2_in::<T>(xs, &[], ds, os, &mut [], c, center, a, b, k, false)
    )
}

/// Channels-last `dx = a·dz + b·(x − center) + k` with `dz = dy·[y > 0]` (and `dr = dz`),
/// in f32 arithmetic for f32 storage when `narrow`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_affine2_relu<T: Element>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    os: &mut [T],
    rs: &mut [T],
    c: usize,
    center: &[f64],
    a: &[f64],
    b: &[f64],
    k: &[f64],
    narrow: bool,
) {
    by_backward_arith!(
        narrow,
        rows_affine2_in::<T>(xs, ys, ds, os, rs, c, center, a, b, k, true)
    )
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_affine2_in<T: Element, A: Arith>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    os: &mut [T],
    rs: &mut [T],
    c: usize,
    center: &[f64],
    a: &[f64],
    b: &[f64],
    k: &[f64],
    with_relu: bool,
) {
    let table = coef_table(c, |ch| affine2_coefs::<A>(center[ch], a[ch], b[ch], k[ch]));
    let [hi, ca, cd, cb, ck] = columns(&table, c);
    {
        let l = hi.len();
        type K5<'a, A> = (((&'a A, &'a A), &'a A), (&'a A, &'a A));
        let co = |x: T, dz: A, (((h, a), d), (b, k)): K5<'_, A>| {
            *a * centered(dz, *d) + *b * (A::load(x) - *h) + *k
        };
        let cz = || hi.iter().zip(ca).zip(cd).zip(cb.iter().zip(ck));
        if !with_relu {
            for ((xr, dr), or) in xs.chunks(l).zip(ds.chunks(l)).zip(os.chunks_mut(l)) {
                for (((o, x), d), k) in or.iter_mut().zip(xr).zip(dr).zip(cz()) {
                    *o = co(*x, A::load(*d), k).store();
                }
            }
        } else {
            for (((xr, yr), dr), or) in xs
                .chunks(l)
                .zip(ys.chunks(l))
                .zip(ds.chunks(l))
                .zip(os.chunks_mut(l))
            {
                for ((((o, x), y), d), k) in or.iter_mut().zip(xr).zip(yr).zip(dr).zip(cz()) {
                    *o = co(*x, masked(*y, *d), k).store();
                }
            }
        }
    }
    for ((r, y), d) in rs.iter_mut().zip(ys).zip(ds) {
        *r = masked_store(*y, *d);
    }
}
