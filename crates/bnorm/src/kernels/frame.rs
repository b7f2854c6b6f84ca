//! How the inner loops cut a run or a row into pieces: independent lanes folded in a
//! fixed order, whole rows as lanes when a channels-last row is short, and requests to
//! the cache ahead of the values a loop reads; for the streaming kernels (x86-64), a
//! scalar head, an aligned vector body and a scalar tail, the direction of the body and
//! blocks of rows ([`x86`]). None of it changes a bit: the order of every sum is fixed
//! by these shapes, the same on every instruction set.

// ─── Lanes ──────────────────────────────────────────────────────────────────────────────

/// Independent accumulators of a single reduction (enough to hide the latency of an f64
/// add: 4 AVX-512 or 8 AVX2 registers).
pub(super) const LANES: usize = 128;

/// Independent accumulators of each of two simultaneous reductions.
pub(super) const LANES2: usize = 64;

/// Sums lanes by halving (lane i with lane i + n/2, ...): a fixed order.
#[inline(always)]
pub(super) fn fold<const N: usize>(mut a: [f64; N]) -> f64 {
    let mut n = N;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            a[i] += a[i + n];
        }
    }
    a[0]
}

/// Two sums over a channel's channels-first rows, in lanes that persist across the rows
/// and are folded once ([`PairLanes::sums`]): each row adds its 64-value chunks to 64
/// lanes, then its 8-value chunks to 8 lanes, then its last values to one scalar each;
/// the result is `(fold(64 lanes) + fold(8 lanes)) + scalar`, the same bits however the
/// rows are delivered (a whole segment in one call, or one row at a time between other
/// channels' rows). Folding per row cost as much as the row's arithmetic for short rows
/// such as 14×14 maps. The backward's sums `(Σdz, Σdz·(x − m))` (`sums.rs`) and the short
/// runs' shifted statistics `(Σ(x − s), Σ(x − s)²)` (`stats.rs`) accumulate in it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PairLanes {
    pub(super) a: [f64; LANES2],
    pub(super) b: [f64; LANES2],
    pub(super) a8: [f64; 8],
    pub(super) b8: [f64; 8],
    pub(super) ta: f64,
    pub(super) tb: f64,
}

impl PairLanes {
    /// No rows yet.
    pub(crate) const ZERO: PairLanes = PairLanes {
        a: [0.0; LANES2],
        b: [0.0; LANES2],
        a8: [0.0; 8],
        b8: [0.0; 8],
        ta: 0.0,
        tb: 0.0,
    };

    /// The two sums of the rows added.
    #[inline(always)]
    pub(crate) fn sums(&self) -> (f64, f64) {
        (
            (fold(self.a) + fold(self.a8)) + self.ta,
            (fold(self.b) + fold(self.b8)) + self.tb,
        )
    }
}

// ─── Short channels-last rows as lanes ───────────────────────────────────────────────────

/// Channels-last rows with few channels are processed as runs of `lanes_for(c)` elements
/// (whole rows, at least 32 values), so the loops vectorize whatever C is; per-channel
/// parameters are repeated to that length. From 32 channels on, a run is one row.
#[inline(always)]
pub(super) fn lanes_for(c: usize) -> usize {
    if c >= 32 {
        c
    } else {
        c * 32usize.div_ceil(c)
    }
}

/// `p` (one value per channel) repeated to `lanes_for(c)` values.
#[inline(always)]
pub(super) fn expand<'a>(p: &'a [f64], c: usize, buf: &'a mut [f64; 64]) -> &'a [f64] {
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
pub(super) fn fold_lanes(acc: &[f64; 64], c: usize, out: &mut [f64; 64]) {
    let l = lanes_for(c);
    for v in out[..c].iter_mut() {
        *v = 0.0;
    }
    for (i, a) in acc[..l].iter().enumerate() {
        out[i % c] += a;
    }
}

// ─── Requests ahead ─────────────────────────────────────────────────────────────────────

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
pub(super) fn ahead<T>(next: &[&[T]], i: usize, n: usize) {
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

/// The framing of the streaming kernels' loops: a scalar head up to the store alignment,
/// an aligned vector body, a scalar tail ([`split`](x86::split)); the direction of the
/// body ([`descending`](x86::descending)) and its steps ([`Steps`](x86::Steps)); blocks
/// of rows that share coefficient vectors ([`blocked`](x86::blocked)); requests to the L2
/// ahead of the loads ([`ask_l2`](x86::ask_l2)).
#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    /// Bytes within which a store and a later load whose addresses agree in their low 12
    /// bits falsely depend on each other ("4K aliasing": the load waits for the store).
    /// Measured on the development VM (`step_time S3 bwd` with dx placed 16–48 bytes
    /// past x modulo 4 KiB: 3.3–3.7 ms, against 2.0–2.7 ms from 128 bytes on).
    const ALIAS_WINDOW: usize = 512;

    /// Whether a streaming loop should run downwards: when an output lies a little
    /// (up to [`ALIAS_WINDOW`] bytes, modulo 4 KiB) past an input, an upward loop's loads
    /// keep meeting the addresses of its recent stores, and a downward loop's never do —
    /// unless another input lies a little past the output, where the upward loop is the
    /// safe one. Buffers allocated one after another (a heap hands them out 16 bytes
    /// apart modulo 4 KiB) are the common case. Empty slices take no part.
    pub(crate) fn descending(stores: &[&crate::kernels::Out<f32>], loads: &[&[f32]]) -> bool {
        let (mut up_bad, mut down_bad) = (false, false);
        for s in stores.iter().filter(|v| !v.is_empty()) {
            for l in loads.iter().filter(|v| !v.is_empty()) {
                let d = (s.as_ptr() as usize).wrapping_sub(l.as_ptr() as usize) & 4095;
                up_bad |= d != 0 && d <= ALIAS_WINDOW;
                down_bad |= d != 0 && 4096 - d <= ALIAS_WINDOW;
            }
        }
        up_bad && !down_bad
    }

    /// The vector steps `(i, o)`, `i = head, head + v, …` below `end` (`end − head` a
    /// multiple of `v`, `v <= run`) with `o = i mod run`, upwards or, when `desc`,
    /// downwards. Each step's arithmetic is independent of the order: same bits either
    /// way. (An iterator, not a closure taking the loop body: the body stays in the
    /// function that enables the target features, where its intrinsics inline.)
    pub(crate) struct Steps {
        i: usize,
        o: usize,
        head: usize,
        end: usize,
        v: usize,
        run: usize,
        desc: bool,
    }

    impl Steps {
        #[inline(always)]
        pub(crate) fn new(head: usize, end: usize, v: usize, run: usize, desc: bool) -> Steps {
            let i = if desc { end } else { head };
            Steps {
                i,
                o: i % run,
                head,
                end,
                v,
                run,
                desc,
            }
        }
    }

    impl Iterator for Steps {
        type Item = (usize, usize);
        #[inline(always)]
        fn next(&mut self) -> Option<(usize, usize)> {
            if self.desc {
                if self.i <= self.head {
                    return None;
                }
                self.i -= self.v;
                self.o = if self.o >= self.v {
                    self.o - self.v
                } else {
                    self.o + self.run - self.v
                };
                Some((self.i, self.o))
            } else {
                if self.i >= self.end {
                    return None;
                }
                let item = (self.i, self.o);
                self.i += self.v;
                self.o += self.v;
                if self.o >= self.run {
                    self.o -= self.run;
                }
                Some(item)
            }
        }
    }

    /// Writes one f32 with a streaming store (`movnti`): the heads and tails of the
    /// streaming kernels, so that their output is one stream of streaming stores.
    ///
    /// # Safety
    /// `p` must be valid for a 4-byte write (SSE2, which every x86-64 CPU has).
    #[inline(always)]
    pub(crate) unsafe fn stream_one(p: *mut f32, v: f32) {
        // SAFETY: the caller's contract; `_mm_stream_si32` writes the 4 bytes at `p`.
        unsafe { std::arch::x86_64::_mm_stream_si32(p.cast::<i32>(), v.to_bits() as i32) }
    }

    /// `(head, end)`: the scalar elements before the first `align`-byte boundary of `p`
    /// (the store alignment), and the end of the vector body after it, a whole number of
    /// `lanes`-value steps.
    #[inline(always)]
    pub(crate) fn split(p: *const f32, n: usize, align: usize, lanes: usize) -> (usize, usize) {
        let head = p.align_offset(align).min(n);
        (head, head + (n - head) / lanes * lanes)
    }

    /// Rows per block of the row-blocked backward maps: each coefficient vector loaded
    /// once serves this many rows.
    pub(crate) const BLOCK_ROWS: usize = 2;

    /// The loop bodies of [`blocked`]: methods rather than closures, so that a body
    /// written in a generic kernel inlines into the function that enables its target
    /// features (a closure defined outside such a function does not inherit them, and
    /// its intrinsics would stay calls).
    pub(crate) trait BlockBody {
        /// The block of `rows` rows whose first values start at index `i`, channel
        /// offset `o`.
        fn block(&mut self, i: usize, o: usize, rows: usize);
        /// One 8-value step of the rest of the body, at index `i`, channel offset `o`.
        fn step(&mut self, i: usize, o: usize);
    }

    /// The element order of the row-blocked maps over the vector body `head..end` (the
    /// output aligned at `head` to the store width): blocks of `BLOCK_ROWS` (shifted)
    /// rows of `c` values, in each the `W`-value steps at one channel offset for every
    /// row in turn ([`block`](BlockBody::block)), then the rest of the body 8 values at
    /// a time ([`step`](BlockBody::step)).
    #[inline(always)]
    pub(crate) fn blocked<const W: usize>(
        head: usize,
        end: usize,
        c: usize,
        desc: bool,
        body: &mut impl BlockBody,
    ) {
        let rows = (end - head) / c;
        let tail = head + rows * c;
        if desc {
            for (i, o) in Steps::new(tail, end, 8, c, true) {
                body.step(i, o);
            }
            let mut r1 = rows;
            while r1 > 0 {
                let nr = BLOCK_ROWS.min(r1);
                let r0 = r1 - nr;
                for j in (0..c).step_by(W).rev() {
                    body.block(head + r0 * c + j, (head + j) % c, nr);
                }
                r1 = r0;
            }
        } else {
            let mut r0 = 0;
            while r0 < rows {
                let nr = BLOCK_ROWS.min(rows - r0);
                for j in (0..c).step_by(W) {
                    body.block(head + r0 * c + j, (head + j) % c, nr);
                }
                r0 += nr;
            }
            for (i, o) in Steps::new(tail, end, 8, c, false) {
                body.step(i, o);
            }
        }
    }

    /// `0..nr`, downwards when `desc`.
    #[inline(always)]
    pub(crate) fn rows_in(nr: usize, desc: bool) -> impl Iterator<Item = usize> {
        (0..nr).map(move |r| if desc { nr - 1 - r } else { r })
    }

    /// How far ahead of the values it maps (16 KiB of f32) a channels-last map asks the
    /// L2 for its inputs ([`ask_l2`]).
    const AHEAD: usize = 4096;

    /// Asks the L2 for the cache line `AHEAD` values past `at` (before it when `desc`)
    /// of the first `k` inputs in `ps`, where that lies within `0..n`.
    #[inline(always)]
    pub(crate) fn ask_l2(ps: &[*const f32; 3], k: usize, at: usize, n: usize, desc: bool) {
        let to = if desc {
            at.checked_sub(AHEAD)
        } else {
            Some(at + AHEAD).filter(|&t| t < n)
        };
        let Some(to) = to else {
            return;
        };
        // SAFETY: `to < n`, and the first `k` inputs hold `n` values (the callers'
        // contract), so each address lies within its input; a prefetch neither faults nor
        // changes what the program can observe. SSE, which the instruction belongs to, is
        // part of every x86-64.
        unsafe {
            _mm_prefetch::<_MM_HINT_T1>(ps[0].add(to).cast::<i8>());
            if k > 1 {
                _mm_prefetch::<_MM_HINT_T1>(ps[1].add(to).cast::<i8>());
            }
            if k > 2 {
                _mm_prefetch::<_MM_HINT_T1>(ps[2].add(to).cast::<i8>());
            }
        }
    }
}
