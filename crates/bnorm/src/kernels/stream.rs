//! Non-temporal ("streaming") stores for large f32 outputs. A normal store first reads
//! the destination line into cache (a read for ownership), so writing an output costs
//! twice its size in memory traffic and evicts the input that a fused kernel is about to
//! read again; a streaming store writes whole lines straight to memory. Used only where
//! the output is larger than the last-level cache could keep anyway
//! ([`STREAM_MIN_BYTES`]), only for f32 storage, and with exactly the arithmetic of the
//! ordinary maps of [`super::forward_map`] and [`super::backward_map`] (forward `(x − hi)·s + b` in f32, backward
//! `(a·dy + b·(x − m)) + k` in f64, or `(a·(dy − d) + b·(x − hi)) + k` in f32 with
//! `BackwardArithmetic::F32`; separate multiplies and adds, one rounding to f32 at the
//! end): the same bits either way, tested. The order of the work never changes a bit,
//! so it is chosen for speed: the channels-last backward maps take rows in blocks that
//! share each coefficient vector they load, and every kernel runs downwards when an
//! output lies just past one of its inputs modulo 4 KiB (`descending`: an upward loop
//! would keep loading where it just stored). Elsewhere than x86-64 there are no streaming
//! kernels: every entry point returns false and the ordinary path runs.
// The helpers below serve the x86-64 kernels only.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use super::schedule::Scratch;
use crate::element::Element;

/// Outputs from this size on (bytes) are written with streaming stores.
pub(crate) const STREAM_MIN_BYTES: usize = 16 << 20;

/// Whether an output of `len` elements of `T` is written with streaming stores (also
/// needs f32 storage and AVX2, checked by each kernel).
#[inline]
pub(crate) fn wanted<T: Element>(len: usize) -> bool {
    T::as_f32s(&[]).is_some() && len * std::mem::size_of::<T>() >= STREAM_MIN_BYTES
}

/// Whether the current SIMD level has the streaming kernels.
#[inline]
fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::simd::current() >= super::simd::SimdLevel::Avx2
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Makes this thread's streaming stores globally visible; called before a task that
/// used them ends (streaming stores are weakly ordered).
#[inline]
pub(crate) fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `sfence` is part of SSE, which every x86-64 CPU has; it has no operands.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

/// The f32 views of an optional slice of `T` (`Some(&[])` for an absent one): `None` when
/// `T` is not f32.
#[inline]
fn opt32<T: Element>(v: Option<&[T]>) -> Option<&[f32]> {
    match v {
        Some(v) => T::as_f32s(v),
        None => Some(&[]),
    }
}

/// Channels-first `y = (x − h)·s + b (+ r)`, then ReLU when `relu`, with streaming stores
/// (`r` the residual, added before the ReLU). Returns false, having written nothing, when
/// `T` is not f32 or the CPU lacks AVX2.
#[inline]
pub(crate) fn affine<T: Element>(
    xs: &[T],
    res: Option<&[T]>,
    ys: &mut [T],
    coefs: [f32; 3],
    relu: bool,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if let (Some(xs), Some(rs), Some(ys), true) =
        (T::as_f32s(xs), opt32(res), T::as_f32s_mut(ys), available())
    {
        // SAFETY: `available()` checked that the CPU has AVX2.
        unsafe { x86::map1_any(xs, rs, ys, &x86::Broadcast(coefs), relu) };
        return true;
    }
    let _ = (xs, res, ys, coefs, relu);
    false
}

/// Channels-last [`affine`]: `xs`/`ys` (and `res`) start at a row, `table` is an f32
/// coefficient table (`hi`, scale, shift) with run length `run` from
/// `inner::affine_table_f32`.
#[inline]
pub(crate) fn rows_affine<T: Element>(
    xs: &[T],
    res: Option<&[T]>,
    ys: &mut [T],
    (table, run): (&Scratch<f32>, usize),
    relu: bool,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if let (Some(xs), Some(rs), Some(ys), true) =
        (T::as_f32s(xs), opt32(res), T::as_f32s_mut(ys), available())
    {
        // SAFETY: `available()` checked that the CPU has AVX2.
        unsafe { x86::map1_any(xs, rs, ys, &x86::Table::new(table, run, 3), relu) };
        return true;
    }
    let _ = (xs, res, ys, table, run, relu);
    false
}

/// The coefficients of a channels-first backward map, in the layout of
/// `inner::affine2_coefs` (`[m, a, d, b, k]`): f64 (`d` zero) or f32.
pub(crate) enum Coefs2 {
    F64([f64; 5]),
    F32([f32; 5]),
}

/// Channels-first `o = (a·dz + b·(x − m)) + k` in f64, or `(a·(dz − d) + b·(x − m)) + k`
/// in f32, per `coefs`, rounded to f32 and stored streaming, with `dz = dy`, or through a
/// ReLU whose output was `y` when `relu = Some((y, dres))` (`dz = dy·[y > 0]`, also
/// written to `dres` unless it is empty). False (nothing written) when `T` is not f32 or
/// the CPU lacks AVX2.
#[inline]
pub(crate) fn affine2<T: Element>(
    xs: &[T],
    relu: Option<(&[T], &mut [T])>,
    ds: &[T],
    os: &mut [T],
    coefs: Coefs2,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if let Some(ok) = with_relu32(relu, |mask| {
        let (Some(xs), Some(ds), Some(os), true) = (
            T::as_f32s(xs),
            T::as_f32s(ds),
            T::as_f32s_mut(os),
            available(),
        ) else {
            return false;
        };
        // SAFETY: `available()` checked that the CPU has AVX2.
        unsafe {
            match coefs {
                Coefs2::F64(c) => x86::map2_any(xs, mask, ds, os, &x86::Broadcast(c)),
                Coefs2::F32(c) => x86::map2f_any(xs, mask, ds, os, &x86::Broadcast(c)),
            }
        };
        true
    }) {
        return ok;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = relu;
    let _ = (xs, ds, os, coefs);
    false
}

/// The coefficient table of a channels-last backward map for `c` channels and its run
/// length, in the arithmetic the ordinary map would use: f64 from
/// `inner::affine2_table_f64` or f32 from `inner::affine2_table_f32` (five columns each).
/// Built once per call for all tasks.
pub(crate) struct Table2 {
    c: usize,
    run: usize,
    t: Table2Data,
}

/// The columns of a [`Table2`] in their arithmetic.
enum Table2Data {
    F64(Scratch<f64>),
    F32(Scratch<f32>),
}

impl Table2 {
    /// The table of `o = a·dz + b·(x − center) + k` for `c` channels, f32 when `narrow`.
    pub(crate) fn new(
        c: usize,
        center: &[f64],
        a: &[f64],
        b: &[f64],
        k: &[f64],
        narrow: bool,
    ) -> Table2 {
        let (t, run) = if narrow {
            let (t, run) = super::backward_map::affine2_table_f32(c, center, a, b, k);
            (Table2Data::F32(t), run)
        } else {
            let (t, run) = super::backward_map::affine2_table_f64(c, center, a, b, k);
            (Table2Data::F64(t), run)
        };
        Table2 { c, run, t }
    }
}

/// Channels-last [`affine2`] with a [`Table2`]: in f64, or in f32 as
/// `o = (a·(dz − d) + b·(x − hi)) + k` with an f32 table.
#[inline]
pub(crate) fn rows_affine2<T: Element>(
    xs: &[T],
    relu: Option<(&[T], &mut [T])>,
    ds: &[T],
    os: &mut [T],
    table: &Table2,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if let Some(ok) = with_relu32(relu, |mut mask| {
        let (Some(xs), Some(ds), Some(os), true) = (
            T::as_f32s(xs),
            T::as_f32s(ds),
            T::as_f32s_mut(os),
            available(),
        ) else {
            return false;
        };
        // SAFETY: `available()` checked that the CPU has AVX2.
        unsafe {
            let (c, run) = (table.c, table.run);
            match &table.t {
                Table2Data::F64(t) => {
                    let t = x86::Table::new(t, run, 5);
                    if !x86::map2_rows_any(xs, &mut mask, ds, os, &t, c) {
                        x86::map2_any(xs, mask, ds, os, &t)
                    }
                }
                Table2Data::F32(t) => {
                    let t = x86::Table::new(t, run, 5);
                    if !x86::map2f_rows_any(xs, &mut mask, ds, os, &t, c) {
                        x86::map2f_any(xs, mask, ds, os, &t)
                    }
                }
            }
        };
        true
    }) {
        return ok;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = relu;
    let _ = (xs, ds, os, table);
    false
}

/// The ReLU operands of a backward map as f32 (`None` inside: no ReLU), passed to `f`;
/// `None` when `T` is not f32.
#[inline]
fn with_relu32<T: Element, R>(
    relu: Option<(&[T], &mut [T])>,
    f: impl FnOnce(Option<(&[f32], &mut [f32])>) -> R,
) -> Option<R> {
    match relu {
        None => Some(f(None)),
        Some((y, r)) => match (T::as_f32s(y), T::as_f32s_mut(r)) {
            (Some(y), Some(r)) => Some(f(Some((y, r)))),
            _ => None,
        },
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::coefs::WRAP;

    /// The f64 backward map `(a·dz + b·(x − m)) + k` on one vector (`_mm256`: 4 lanes,
    /// `_mm512`: 8): written once, so every kernel, flat or row-blocked, performs exactly
    /// these operations in this order.
    macro_rules! map2_f64 {
        (_mm256, $x:expr, $d:expr, $m:expr, $a:expr, $b:expr, $k:expr) => {
            _mm256_add_pd(
                _mm256_add_pd(
                    _mm256_mul_pd($a, $d),
                    _mm256_mul_pd($b, _mm256_sub_pd($x, $m)),
                ),
                $k,
            )
        };
        (_mm512, $x:expr, $d:expr, $m:expr, $a:expr, $b:expr, $k:expr) => {
            _mm512_add_pd(
                _mm512_add_pd(
                    _mm512_mul_pd($a, $d),
                    _mm512_mul_pd($b, _mm512_sub_pd($x, $m)),
                ),
                $k,
            )
        };
    }

    /// The f32 backward map `(a·(dz − d) + b·(x − hi)) + k` on one vector (`_mm256`: 8
    /// lanes, `_mm512`: 16), written once as [`map2_f64`].
    macro_rules! map2_f32 {
        (_mm256, $x:expr, $dz:expr, $hi:expr, $a:expr, $d:expr, $b:expr, $k:expr) => {
            _mm256_add_ps(
                _mm256_add_ps(
                    _mm256_mul_ps($a, _mm256_sub_ps($dz, $d)),
                    _mm256_mul_ps($b, _mm256_sub_ps($x, $hi)),
                ),
                $k,
            )
        };
        (_mm512, $x:expr, $dz:expr, $hi:expr, $a:expr, $d:expr, $b:expr, $k:expr) => {
            _mm512_add_ps(
                _mm512_add_ps(
                    _mm512_mul_ps($a, _mm512_sub_ps($dz, $d)),
                    _mm512_mul_ps($b, _mm512_sub_ps($x, $hi)),
                ),
                $k,
            )
        };
    }

    /// A coefficient type: f32 (forward) or f64 (backward), with its AVX vector.
    pub(super) trait Coef: Copy {
        type V: Copy;
        /// `LANES` values from `p`.
        ///
        /// # Safety
        /// `p` must be valid for `LANES` reads and the CPU must support AVX.
        unsafe fn load(p: *const Self) -> Self::V;
        /// The value in every lane.
        ///
        /// # Safety
        /// The CPU must support AVX.
        unsafe fn splat(v: Self) -> Self::V;
        const LANES: usize;
    }

    impl Coef for f32 {
        type V = __m256;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            // SAFETY: the caller's contract.
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> __m256 {
            // SAFETY: the caller's contract (AVX).
            unsafe { _mm256_set1_ps(v) }
        }
        const LANES: usize = 8;
    }

    impl Coef for f64 {
        type V = __m256d;
        #[inline(always)]
        unsafe fn load(p: *const f64) -> __m256d {
            // SAFETY: the caller's contract.
            unsafe { _mm256_loadu_pd(p) }
        }
        #[inline(always)]
        unsafe fn splat(v: f64) -> __m256d {
            // SAFETY: the caller's contract (AVX).
            unsafe { _mm256_set1_pd(v) }
        }
        const LANES: usize = 4;
    }

    /// Sixteen f32 coefficients for the AVX-512 path.
    pub(super) trait Source16: Source<f32> {
        /// Column `k` from run offset `o` (`o < run`).
        ///
        /// # Safety
        /// The CPU must support AVX-512F.
        unsafe fn vec16(&self, k: usize, o: usize) -> __m512;
    }

    impl<const K: usize> Source16 for Broadcast<f32, K> {
        #[inline(always)]
        unsafe fn vec16(&self, k: usize, _: usize) -> __m512 {
            // SAFETY: the caller guarantees AVX-512F.
            unsafe { _mm512_set1_ps(self.0[k]) }
        }
    }

    impl Source16 for Table<'_, f32> {
        #[inline(always)]
        unsafe fn vec16(&self, k: usize, o: usize) -> __m512 {
            let i = k * self.stride + o;
            assert!(i + 16 <= self.t.len());
            // SAFETY: `i + 16 <= t.len()` (asserted; `o < run` and `run + WRAP <= stride`
            // with `WRAP >= 16`), and the caller guarantees AVX-512F.
            unsafe { _mm512_loadu_ps(self.t.as_ptr().add(i)) }
        }
    }

    /// Eight f64 coefficients for the AVX-512 path.
    pub(super) trait Source8: Source<f64> {
        /// Column `k` from run offset `o` (`o < run`).
        ///
        /// # Safety
        /// The CPU must support AVX-512F.
        unsafe fn vec8(&self, k: usize, o: usize) -> __m512d;
    }

    impl<const K: usize> Source8 for Broadcast<f64, K> {
        #[inline(always)]
        unsafe fn vec8(&self, k: usize, _: usize) -> __m512d {
            // SAFETY: the caller guarantees AVX-512F.
            unsafe { _mm512_set1_pd(self.0[k]) }
        }
    }

    impl Source8 for Table<'_, f64> {
        #[inline(always)]
        unsafe fn vec8(&self, k: usize, o: usize) -> __m512d {
            let i = k * self.stride + o;
            assert!(i + 8 <= self.t.len());
            // SAFETY: `i + 8 <= t.len()` (asserted; `o < run` and `run + WRAP <= stride`
            // with `WRAP >= 8`), and the caller guarantees AVX-512F.
            unsafe { _mm512_loadu_pd(self.t.as_ptr().add(i)) }
        }
    }

    /// Per-element coefficients: column `k` at run offset `o`.
    pub(super) trait Source<E: Coef> {
        /// The run length (offsets wrap at it).
        fn run(&self) -> usize;
        fn at(&self, k: usize, o: usize) -> E;
        /// `E::LANES` coefficients of column `k` from run offset `o` (the vector may run
        /// past `run` into the table's `WRAP` repeat; implementations assert the bound).
        ///
        /// # Safety
        /// The CPU must support AVX.
        unsafe fn vec(&self, k: usize, o: usize) -> E::V;
    }

    /// One value per column for the whole run (channels-first rows).
    pub(super) struct Broadcast<E, const K: usize>(pub(super) [E; K]);

    impl<E: Coef, const K: usize> Source<E> for Broadcast<E, K> {
        fn run(&self) -> usize {
            usize::MAX
        }
        #[inline(always)]
        fn at(&self, k: usize, _: usize) -> E {
            self.0[k]
        }
        #[inline(always)]
        unsafe fn vec(&self, k: usize, _: usize) -> E::V {
            // SAFETY: the caller guarantees AVX.
            unsafe { E::splat(self.0[k]) }
        }
    }

    /// Columns of a channels-last coefficient table.
    pub(super) struct Table<'a, E> {
        t: &'a [E],
        run: usize,
        stride: usize,
    }

    impl<'a, E> Table<'a, E> {
        pub(super) fn new(t: &'a [E], run: usize, columns: usize) -> Table<'a, E> {
            let stride = t.len() / columns;
            assert!(
                run > 0 && run + WRAP <= stride,
                "coefficient table too short"
            );
            Table { t, run, stride }
        }
    }

    impl<E: Coef> Source<E> for Table<'_, E> {
        fn run(&self) -> usize {
            self.run
        }
        #[inline(always)]
        fn at(&self, k: usize, o: usize) -> E {
            self.t[k * self.stride + o]
        }
        #[inline(always)]
        unsafe fn vec(&self, k: usize, o: usize) -> E::V {
            let i = k * self.stride + o;
            assert!(i + E::LANES <= self.t.len());
            // SAFETY: `i + LANES <= t.len()` (asserted; `o < run + 4` and
            // `run + WRAP <= stride` make it hold for every column), and the caller
            // guarantees AVX.
            unsafe { E::load(self.t.as_ptr().add(i)) }
        }
    }

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
    fn descending(stores: &[&[f32]], loads: &[&[f32]]) -> bool {
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
    struct Steps {
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
        fn new(head: usize, end: usize, v: usize, run: usize, desc: bool) -> Steps {
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

    /// `(head, body)`: scalar elements before the first 32-byte boundary of `p`, and
    /// the end of the vector body after it.
    fn split(p: *const f32, n: usize) -> (usize, usize) {
        let head = p.align_offset(32).min(n);
        (head, head + (n - head) / 8 * 8)
    }

    /// [`map1`] for any epilogue (`rs`: the residual, empty for none), on AVX-512 when
    /// the current level has it (16 lanes: same operations, same bits).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    pub(super) unsafe fn map1_any<S: Source16>(
        xs: &[f32],
        rs: &[f32],
        ys: &mut [f32],
        src: &S,
        relu: bool,
    ) {
        let wide = super::super::simd::current() == super::super::simd::SimdLevel::Avx512;
        // SAFETY (all arms): the Avx512 level is only chosen when the CPU reports
        // AVX-512F; the caller guarantees AVX2.
        unsafe {
            match (wide, relu, !rs.is_empty()) {
                (true, false, _) => map1_512::<S, false, false>(xs, rs, ys, src),
                (true, true, false) => map1_512::<S, true, false>(xs, rs, ys, src),
                (true, true, true) => map1_512::<S, true, true>(xs, rs, ys, src),
                (false, false, _) => map1::<S, false, false>(xs, rs, ys, src),
                (false, true, false) => map1::<S, true, false>(xs, rs, ys, src),
                (false, true, true) => map1::<S, true, true>(xs, rs, ys, src),
            }
        }
    }

    /// The scalar form of `map1`, for heads and tails: exactly the ordinary map's
    /// operations.
    #[inline(always)]
    fn map1_one<S: Source<f32>, const RELU: bool, const ADD: bool>(
        src: &S,
        o: usize,
        x: f32,
        r: f32,
    ) -> f32 {
        let mut z = (x - src.at(0, o)) * src.at(1, o) + src.at(2, o);
        if ADD {
            z += r;
        }
        if RELU && z < 0.0 {
            0.0
        } else {
            z
        }
    }

    /// [`map1`] with 16-lane vectors and 64-byte streaming stores.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX2; with `ADD`, `rs` must be as long as `xs`.
    #[target_feature(enable = "avx512f,avx2")]
    unsafe fn map1_512<S: Source16, const RELU: bool, const ADD: bool>(
        xs: &[f32],
        rs: &[f32],
        ys: &mut [f32],
        src: &S,
    ) {
        let desc = descending(&[&*ys], &[xs, rs]);
        let n = if ADD {
            xs.len().min(ys.len()).min(rs.len())
        } else {
            xs.len().min(ys.len())
        };
        let run = src.run();
        let head = ys.as_ptr().align_offset(64).min(n);
        let body = head + (n - head) / 16 * 16;
        for i in (0..head).chain(body..n) {
            let r = if ADD { rs[i] } else { 0.0 };
            ys[i] = map1_one::<S, RELU, ADD>(src, i % run, xs[i], r);
        }
        let (xp, rp, yp) = (xs.as_ptr(), rs.as_ptr(), ys.as_mut_ptr());
        let zero = _mm512_setzero_ps();
        // Channels-last tables (not the broadcast of a channels-first run) ask ahead for
        // x (and the residual): in-process A/B on the 2-core development VM (commit
        // bec51f3), S3 inference 0–25% faster, S4 inference 0–7%, training −2–4%;
        // channels-first runs measured nothing.
        let (ahead, ps, k) = (run != usize::MAX, [xp, rp, xp], 1 + ADD as usize);
        for (i, o) in Steps::new(head, body, 16, run, desc) {
            if ahead {
                ask_l2(&ps, k, i, n, desc);
            }
            // SAFETY: `i + 16 <= body <= n` lies within the slices (`rs` too when `ADD`);
            // `yp + i` is 64-byte aligned (`head` aligned it, steps are 64 bytes) as the
            // streaming store requires; `o < run` for the table reads; AVX-512F is enabled.
            unsafe {
                let x = _mm512_loadu_ps(xp.add(i));
                let t = _mm512_mul_ps(_mm512_sub_ps(x, src.vec16(0, o)), src.vec16(1, o));
                let mut z = _mm512_add_ps(t, src.vec16(2, o));
                if ADD {
                    z = _mm512_add_ps(z, _mm512_loadu_ps(rp.add(i)));
                }
                if RELU {
                    // z < 0 → +0, anything else (NaN included) kept: as `relu`.
                    let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(z, zero);
                    z = _mm512_mask_mov_ps(z, neg, zero);
                }
                _mm512_stream_ps(yp.add(i), z);
            }
        }
    }

    /// `y = (x − c₀)·c₁ + c₂ (+ r when ADD)`, then ReLU when `RELU`.
    ///
    /// # Safety
    /// The CPU must support AVX2; with `ADD`, `rs` must be as long as `xs`.
    #[target_feature(enable = "avx2")]
    unsafe fn map1<S: Source<f32>, const RELU: bool, const ADD: bool>(
        xs: &[f32],
        rs: &[f32],
        ys: &mut [f32],
        src: &S,
    ) {
        let desc = descending(&[&*ys], &[xs, rs]);
        let n = if ADD {
            xs.len().min(ys.len()).min(rs.len())
        } else {
            xs.len().min(ys.len())
        };
        let run = src.run();
        let (head, body) = split(ys.as_ptr(), n);
        for i in (0..head).chain(body..n) {
            let r = if ADD { rs[i] } else { 0.0 };
            ys[i] = map1_one::<S, RELU, ADD>(src, i % run, xs[i], r);
        }
        let (xp, rp, yp) = (xs.as_ptr(), rs.as_ptr(), ys.as_mut_ptr());
        let zero = _mm256_setzero_ps();
        // No requests ahead here, unlike `map1_512`: on AVX2 they made the S3 inference
        // 4–14% slower (in-process A/B, bit 256 of the patch in commit bec51f3).
        for (i, o) in Steps::new(head, body, 8, run, desc) {
            // SAFETY: `i + 8 <= body <= n` lies within the slices (`rs` too when `ADD`);
            // `yp + i` is 32-byte aligned (`head` aligned it, steps are 32 bytes) as the
            // streaming store requires; `o < run` for the table reads; AVX2 is enabled.
            unsafe {
                let x = _mm256_loadu_ps(xp.add(i));
                let t = _mm256_mul_ps(_mm256_sub_ps(x, src.vec(0, o)), src.vec(1, o));
                let mut z = _mm256_add_ps(t, src.vec(2, o));
                if ADD {
                    z = _mm256_add_ps(z, _mm256_loadu_ps(rp.add(i)));
                }
                if RELU {
                    // z < 0 → +0, anything else (NaN included) kept: as `relu`.
                    z = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(z, zero), z);
                }
                _mm256_stream_ps(yp.add(i), z);
            }
        }
    }

    /// A backward map through an optional ReLU (`mask = Some((y, dres))`): the AVX-512
    /// loop `$wide` when the current level has it, else the AVX2 loop `$narrow`, each
    /// with the mask's presence as a constant. Expands to unsafe calls: the caller
    /// guarantees AVX2 and that `y` (and `dres` unless empty) are as long as `xs`.
    macro_rules! dispatch_map2 {
        ($wide:ident, $narrow:ident, $s:ty, $xs:expr, $mask:expr, $ds:expr, $os:expr, $src:expr) => {{
            let wide = super::super::simd::current() == super::super::simd::SimdLevel::Avx512;
            let (ys, rs, relu): (&[f32], &mut [f32], bool) = match $mask {
                Some((y, r)) => (y, r, true),
                None => (&[], &mut [], false),
            };
            // SAFETY (all arms): the Avx512 level is only chosen when the CPU reports
            // AVX-512F; the caller guarantees AVX2 and the lengths.
            unsafe {
                match (wide, relu) {
                    (true, false) => $wide::<$s, false>($xs, ys, $ds, $os, rs, $src),
                    (true, true) => $wide::<$s, true>($xs, ys, $ds, $os, rs, $src),
                    (false, false) => $narrow::<$s, false>($xs, ys, $ds, $os, rs, $src),
                    (false, true) => $narrow::<$s, true>($xs, ys, $ds, $os, rs, $src),
                }
            }
        }};
    }

    /// [`map2`] through an optional ReLU (`mask = Some((y, dres))`), on AVX-512 when the
    /// current level has it (one 8-lane f64 vector per 8 outputs instead of two 4-lane
    /// halves: same operations, same bits).
    ///
    /// # Safety
    /// The CPU must support AVX2; `y` (and `dres` unless empty) as long as `xs`.
    pub(super) unsafe fn map2_any<S: Source8>(
        xs: &[f32],
        mask: Option<(&[f32], &mut [f32])>,
        ds: &[f32],
        os: &mut [f32],
        src: &S,
    ) {
        dispatch_map2!(map2_512, map2, S, xs, mask, ds, os, src)
    }

    /// The scalar form of `map2` for heads and tails (and `dres` for every element):
    /// exactly the ordinary map's operations. Returns `(dx, dz)`.
    #[inline(always)]
    fn map2_one<S: Source<f64>, const RELU: bool>(
        src: &S,
        o: usize,
        x: f32,
        y: f32,
        d: f32,
    ) -> (f32, f32) {
        let dz = if !RELU || y > 0.0 { d } else { 0.0 };
        let v = src.at(1, o) * dz as f64 + src.at(3, o) * (x as f64 - src.at(0, o)) + src.at(4, o);
        (v as f32, dz)
    }

    /// `n` for a backward map: every slice that is read or written.
    fn len2<const RELU: bool>(xs: &[f32], ys: &[f32], ds: &[f32], os: &[f32], rs: &[f32]) -> usize {
        let mut n = xs.len().min(ds.len()).min(os.len());
        if RELU {
            n = n.min(ys.len());
            if !rs.is_empty() {
                n = n.min(rs.len());
            }
        }
        n
    }

    /// The scalar elements `idx` of a backward map (the heads and tails around its vector
    /// body): `(dx, dz) = one(i mod run, x, y, dy)`, `dz` also stored to `rs` unless it is
    /// empty (with `RELU`).
    #[inline(always)]
    fn scalar2<const RELU: bool>(
        idx: impl Iterator<Item = usize>,
        run: usize,
        (xs, ys, ds): (&[f32], &[f32], &[f32]),
        (os, rs): (&mut [f32], &mut [f32]),
        one: impl Fn(usize, f32, f32, f32) -> (f32, f32),
    ) {
        let with_res = RELU && !rs.is_empty();
        for i in idx {
            let y = if RELU { ys[i] } else { 0.0 };
            let (v, dz) = one(i % run, xs[i], y, ds[i]);
            os[i] = v;
            if with_res {
                rs[i] = dz;
            }
        }
    }

    /// The loop shared by [`map2`] and [`map2_512`]: scalar head and tail, then 8 values
    /// at a time, `dz` masked through the ReLU (and stored to `rs`), `body(x, dz, o)`
    /// giving the 8 outputs, streamed to the 32-byte aligned `os`.
    ///
    /// # Safety
    /// The CPU must support AVX2 (`body` whatever it uses); inline into a function that
    /// enables it.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn map2_loop<const RELU: bool>(
        xs: &[f32],
        ys: &[f32],
        ds: &[f32],
        os: &mut [f32],
        rs: &mut [f32],
        run: usize,
        one: impl Fn(usize, f32, f32, f32) -> (f32, f32),
        body: impl Fn(__m256, __m256, usize) -> __m256,
    ) {
        let desc = descending(&[&*os, &*rs], &[xs, ds, ys]);
        let n = len2::<RELU>(xs, ys, ds, os, rs);
        let with_res = RELU && !rs.is_empty();
        let (head, end) = split(os.as_ptr(), n);
        scalar2::<RELU>(
            (0..head).chain(end..n),
            run,
            (xs, ys, ds),
            (&mut *os, &mut *rs),
            &one,
        );
        let (xp, yp, dp, op, rp) = (
            xs.as_ptr(),
            ys.as_ptr(),
            ds.as_ptr(),
            os.as_mut_ptr(),
            rs.as_mut_ptr(),
        );
        for (i, o) in Steps::new(head, end, 8, run, desc) {
            // SAFETY: `i + 8 <= n` lies within every slice used (`ys`, `rs` only when
            // `RELU` / `with_res`, whose lengths `len2` included); `op + i` is 32-byte
            // aligned (`head` aligned it, steps are 32 bytes) as the streaming store
            // requires; `o < run`; the caller guarantees AVX2.
            unsafe {
                let mut d8 = _mm256_loadu_ps(dp.add(i));
                if RELU {
                    // dy where y > 0, else +0 (NaN y included): as `masked`.
                    let zero = _mm256_setzero_ps();
                    let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_loadu_ps(yp.add(i)), zero);
                    d8 = _mm256_and_ps(pos, d8);
                    if with_res {
                        _mm256_storeu_ps(rp.add(i), d8);
                    }
                }
                _mm256_stream_ps(op.add(i), body(_mm256_loadu_ps(xp.add(i)), d8, o));
            }
        }
    }

    /// [`map2`] with 8-lane f64 vectors.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX2.
    #[target_feature(enable = "avx512f,avx2")]
    unsafe fn map2_512<S: Source8, const RELU: bool>(
        xs: &[f32],
        ys: &[f32],
        ds: &[f32],
        os: &mut [f32],
        rs: &mut [f32],
        src: &S,
    ) {
        // SAFETY: AVX-512F and AVX2 are enabled here; `o < run` for the table reads.
        unsafe {
            let one = |o, x, y, d| map2_one::<S, RELU>(src, o, x, y, d);
            map2_loop::<RELU>(xs, ys, ds, os, rs, src.run(), one, |x8, d8, o| {
                let (x, d) = (_mm512_cvtps_pd(x8), _mm512_cvtps_pd(d8));
                let (m, a, b, k) = (
                    src.vec8(0, o),
                    src.vec8(1, o),
                    src.vec8(3, o),
                    src.vec8(4, o),
                );
                _mm512_cvtpd_ps(map2_f64!(_mm512, x, d, m, a, b, k))
            })
        }
    }

    /// `o = (c₁·dz + c₃·(x − c₀)) + c₄` in f64 (column 2, zero in f64, unused), rounded
    /// to f32, `dz = dy` or, with
    /// `RELU`, `dy·[y > 0]` (written to `rs` unless it is empty).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn map2<S: Source<f64>, const RELU: bool>(
        xs: &[f32],
        ys: &[f32],
        ds: &[f32],
        os: &mut [f32],
        rs: &mut [f32],
        src: &S,
    ) {
        // SAFETY: AVX2 is enabled here; `o + 4 < run + WRAP` for the table reads.
        unsafe {
            let one = |o, x, y, d| map2_one::<S, RELU>(src, o, x, y, d);
            map2_loop::<RELU>(xs, ys, ds, os, rs, src.run(), one, |x8, d8, o| {
                let half = |x4: __m128, d4: __m128, j: usize| {
                    let (x, d) = (_mm256_cvtps_pd(x4), _mm256_cvtps_pd(d4));
                    let (m, a) = (src.vec(0, o + j), src.vec(1, o + j));
                    let (b, k) = (src.vec(3, o + j), src.vec(4, o + j));
                    _mm256_cvtpd_ps(map2_f64!(_mm256, x, d, m, a, b, k))
                };
                let lo = half(_mm256_castps256_ps128(x8), _mm256_castps256_ps128(d8), 0);
                let hi = half(
                    _mm256_extractf128_ps::<1>(x8),
                    _mm256_extractf128_ps::<1>(d8),
                    4,
                );
                _mm256_set_m128(hi, lo)
            })
        }
    }

    /// The f32 backward map `o = (c₁·(dz − c₂) + c₃·(x − c₀)) + c₄` (the layout of
    /// `inner::affine2_coefs::<f32>`), `dz` as in [`map2_any`], on AVX-512 (16 lanes)
    /// when the current level has it, else AVX2 (8 lanes): same operations, same bits.
    ///
    /// # Safety
    /// The CPU must support AVX2; `y` (and `dres` unless empty) as long as `xs`.
    pub(super) unsafe fn map2f_any<S: Source16>(
        xs: &[f32],
        mask: Option<(&[f32], &mut [f32])>,
        ds: &[f32],
        os: &mut [f32],
        src: &S,
    ) {
        dispatch_map2!(map2f_512, map2f, S, xs, mask, ds, os, src)
    }

    /// The scalar form of the f32 backward map, for heads and tails: exactly the ordinary
    /// map's operations. Returns `(dx, dz)`.
    #[inline(always)]
    fn map2f_one<S: Source<f32>, const RELU: bool>(
        src: &S,
        o: usize,
        x: f32,
        y: f32,
        d: f32,
    ) -> (f32, f32) {
        let dz = if !RELU || y > 0.0 { d } else { 0.0 };
        let v =
            src.at(1, o) * (dz - src.at(2, o)) + src.at(3, o) * (x - src.at(0, o)) + src.at(4, o);
        (v, dz)
    }

    /// [`map2f_any`] with 8 lanes.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn map2f<S: Source<f32>, const RELU: bool>(
        xs: &[f32],
        ys: &[f32],
        ds: &[f32],
        os: &mut [f32],
        rs: &mut [f32],
        src: &S,
    ) {
        // SAFETY: AVX2 is enabled here; `o < run` for the table reads.
        unsafe {
            let one = |o, x, y, d| map2f_one::<S, RELU>(src, o, x, y, d);
            map2_loop::<RELU>(xs, ys, ds, os, rs, src.run(), one, |x, d, o| {
                let (hi, a, dd) = (src.vec(0, o), src.vec(1, o), src.vec(2, o));
                let (b, k) = (src.vec(3, o), src.vec(4, o));
                map2_f32!(_mm256, x, d, hi, a, dd, b, k)
            })
        }
    }

    /// [`map2f_any`] with 16 lanes and 64-byte streaming stores.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX2.
    #[target_feature(enable = "avx512f,avx2")]
    unsafe fn map2f_512<S: Source16, const RELU: bool>(
        xs: &[f32],
        ys: &[f32],
        ds: &[f32],
        os: &mut [f32],
        rs: &mut [f32],
        src: &S,
    ) {
        let desc = descending(&[&*os, &*rs], &[xs, ds, ys]);
        let n = len2::<RELU>(xs, ys, ds, os, rs);
        let with_res = RELU && !rs.is_empty();
        let run = src.run();
        let head = os.as_ptr().align_offset(64).min(n);
        let end = head + (n - head) / 16 * 16;
        scalar2::<RELU>(
            (0..head).chain(end..n),
            run,
            (xs, ys, ds),
            (&mut *os, &mut *rs),
            |o, x, y, d| map2f_one::<S, RELU>(src, o, x, y, d),
        );
        let (xp, yp, dp, op, rp) = (
            xs.as_ptr(),
            ys.as_ptr(),
            ds.as_ptr(),
            os.as_mut_ptr(),
            rs.as_mut_ptr(),
        );
        let zero = _mm512_setzero_ps();
        for (i, o) in Steps::new(head, end, 16, run, desc) {
            // SAFETY: `i + 16 <= end <= n` lies within every slice used (`ys`, `rs` only
            // when `RELU` / `with_res`, whose lengths `len2` included); `op + i` is
            // 64-byte aligned (`head` aligned it, steps are 64 bytes) as the streaming
            // store requires; `o < run` for the table reads; AVX-512F is enabled.
            unsafe {
                let mut d = _mm512_loadu_ps(dp.add(i));
                if RELU {
                    // dy where y > 0, else +0 (NaN y included): as `masked`.
                    let pos = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_loadu_ps(yp.add(i)), zero);
                    d = _mm512_maskz_mov_ps(pos, d);
                    if with_res {
                        _mm512_storeu_ps(rp.add(i), d);
                    }
                }
                let x = _mm512_loadu_ps(xp.add(i));
                let (hi, a, dd) = (src.vec16(0, o), src.vec16(1, o), src.vec16(2, o));
                let (b, k) = (src.vec16(3, o), src.vec16(4, o));
                _mm512_stream_ps(op.add(i), map2_f32!(_mm512, x, d, hi, a, dd, b, k));
            }
        }
    }

    /// Rows per block of the row-blocked backward maps: each coefficient vector loaded
    /// once serves this many rows.
    const BLOCK_ROWS: usize = 2;

    /// The block width of the row-blocked maps for `c` channels, `None` where they do not
    /// apply: 16 on the AVX-512 level when `c` is a multiple of 16, else 8 on AVX2 (or
    /// AVX-512) when `c` is a multiple of 8 — so that the coefficient offsets of aligned
    /// blocks repeat every `c` values.
    fn rows_width(c: usize) -> Option<usize> {
        use super::super::simd::{current, SimdLevel};
        let level = current();
        if c == 0 {
            None
        } else if level == SimdLevel::Avx512 && c.is_multiple_of(16) {
            Some(16)
        } else if level >= SimdLevel::Avx2 && c.is_multiple_of(8) {
            Some(8)
        } else {
            None
        }
    }

    /// The operands of a backward map through an optional ReLU: `(y, dres, relu)`, and
    /// `n`, the values every slice holds.
    fn operands<'a>(
        xs: &[f32],
        mask: &'a mut Option<(&[f32], &mut [f32])>,
        ds: &[f32],
        os: &[f32],
    ) -> (&'a [f32], &'a mut [f32], bool, usize) {
        let (ys, rs, relu): (&[f32], &mut [f32], bool) = match mask {
            Some((y, r)) => (y, r, true),
            None => (&[], &mut [], false),
        };
        let n = if relu {
            len2::<true>(xs, ys, ds, os, rs)
        } else {
            len2::<false>(xs, ys, ds, os, rs)
        };
        (ys, rs, relu, n)
    }

    /// The element order of the row-blocked maps over the vector body `head..end` (the
    /// output aligned at `head` to the store width): blocks of `BLOCK_ROWS` (shifted)
    /// rows of `c` values, in each the `W`-value steps at one channel offset for every
    /// row in turn (`block(i, o, rows)`: first index, channel offset, rows in the block),
    /// then the rest of the body 8 values at a time (`step(i, o)`).
    #[inline(always)]
    fn blocked<const W: usize>(
        head: usize,
        end: usize,
        c: usize,
        desc: bool,
        mut block: impl FnMut(usize, usize, usize),
        mut step: impl FnMut(usize, usize),
    ) {
        let rows = (end - head) / c;
        let tail = head + rows * c;
        if desc {
            for (i, o) in Steps::new(tail, end, 8, c, true) {
                step(i, o);
            }
            let mut r1 = rows;
            while r1 > 0 {
                let nr = BLOCK_ROWS.min(r1);
                let r0 = r1 - nr;
                for j in (0..c).step_by(W).rev() {
                    block(head + r0 * c + j, (head + j) % c, nr);
                }
                r1 = r0;
            }
        } else {
            let mut r0 = 0;
            while r0 < rows {
                let nr = BLOCK_ROWS.min(rows - r0);
                for j in (0..c).step_by(W) {
                    block(head + r0 * c + j, (head + j) % c, nr);
                }
                r0 += nr;
            }
            for (i, o) in Steps::new(tail, end, 8, c, false) {
                step(i, o);
            }
        }
    }

    /// `0..nr`, downwards when `desc`.
    #[inline(always)]
    fn rows_in(nr: usize, desc: bool) -> impl Iterator<Item = usize> {
        (0..nr).map(move |r| if desc { nr - 1 - r } else { r })
    }

    /// The row-blocked map for the width [`rows_width`] gives (`$wide` for 16, `$narrow`
    /// for 8) with the ReLU's presence as a constant; false where it gives none. Expands
    /// to unsafe calls: the caller guarantees AVX2 and the slices' lengths.
    macro_rules! dispatch_rows {
        ($wide:ident, $narrow:ident, $xs:expr, $mask:expr, $ds:expr, $os:expr, $src:expr, $c:expr) => {{
            let Some(w) = rows_width($c).filter(|_| $c <= $src.run()) else {
                return false;
            };
            let (ys, rs, relu, n) = operands($xs, $mask, $ds, $os);
            // SAFETY: `rows_width` gives 16 only on the AVX-512 level (chosen only when
            // the CPU reports AVX-512F), 8 on AVX2 or above, with `c` a multiple of it;
            // `n` bounds every slice used.
            unsafe {
                match (w, relu) {
                    (16, true) => $wide::<true>($xs, ys, $ds, $os, rs, $src, $c, n),
                    (16, false) => $wide::<false>($xs, ys, $ds, $os, rs, $src, $c, n),
                    (_, true) => $narrow::<true>($xs, ys, $ds, $os, rs, $src, $c, n),
                    (_, false) => $narrow::<false>($xs, ys, $ds, $os, rs, $src, $c, n),
                }
            }
            true
        }};
    }

    /// How far ahead of the values it maps (16 KiB of f32) a channels-last map asks the
    /// L2 for its inputs ([`ask_l2`]).
    const AHEAD: usize = 4096;

    /// The fewest channels (2 KiB rows of f32) for which the channels-last backward maps
    /// ask the L2 ahead ([`ask_l2`]): they take two rows at a time, and with rows this
    /// long (a 4 KiB page each for S3) the hardware prefetchers, which do not cross page
    /// boundaries, apparently fall behind. In one process, alternating call by call with
    /// the maps that do not (2-core development VM, commit 0f9d77a), NC (4096, 1024)
    /// ran 2–5% faster with the f64 map, 4–7% with the f32 and AVX2 maps; NHWC (32, 56,
    /// 56, 64) with requests too measured 1–5% slower, hence the threshold. (The
    /// forward's channels-last map, one row at a time, asks ahead for every C.)
    const AHEAD_MIN_C: usize = 512;

    /// Asks the L2 for the cache line `AHEAD` values past `at` (before it when `desc`)
    /// of the first `k` inputs in `ps`, where that lies within `0..n`.
    #[inline(always)]
    fn ask_l2(ps: &[*const f32; 3], k: usize, at: usize, n: usize, desc: bool) {
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

    /// The f64 backward map of [`map2_any`] with its coefficient loads hoisted out of
    /// `BLOCK_ROWS` rows (see [`blocked`]): the flat loop reloads four table vectors per
    /// 8 outputs, from L2 when C is large. Per element exactly the operations of
    /// [`map2_512`]: same bits. Returns false, having written nothing, where
    /// [`rows_width`] gives no width.
    ///
    /// # Safety
    /// The CPU must support AVX2; `y` (and `dres` unless empty) as long as `xs`; `xs`
    /// starts at channel 0 of a row and `src` is the table of `c` channels.
    pub(super) unsafe fn map2_rows_any(
        xs: &[f32],
        mask: &mut Option<(&[f32], &mut [f32])>,
        ds: &[f32],
        os: &mut [f32],
        src: &Table<'_, f64>,
        c: usize,
    ) -> bool {
        dispatch_rows!(map2_rows_512, map2_rows_avx2, xs, mask, ds, os, src, c)
    }

    /// See [`map2_rows_any`].
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX2; every slice used holds `n` values;
    /// `c % 16 == 0`, `0 < c <= src.run()`.
    #[target_feature(enable = "avx512f,avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn map2_rows_512<const RELU: bool>(
        xs: &[f32],
        ys: &[f32],
        ds: &[f32],
        os: &mut [f32],
        rs: &mut [f32],
        src: &Table<'_, f64>,
        c: usize,
        n: usize,
    ) {
        let desc = descending(&[&*os, &*rs], &[xs, ds, ys]);
        let with_res = RELU && !rs.is_empty();
        let run = src.run();
        let head = os.as_ptr().align_offset(64).min(n);
        let end = head + (n - head) / 8 * 8;
        scalar2::<RELU>(
            (0..head).chain(end..n),
            run,
            (xs, ys, ds),
            (&mut *os, &mut *rs),
            |o, x, y, d| map2_one::<_, RELU>(src, o, x, y, d),
        );
        let (xp, yp, dp, op, rp) = (
            xs.as_ptr(),
            ys.as_ptr(),
            ds.as_ptr(),
            os.as_mut_ptr(),
            rs.as_mut_ptr(),
        );
        // Eight outputs at `i` with the coefficients `(m, a, b, k)` (and their ReLU
        // gradient stored when `with_res`): a macro, not a closure, so that it is always
        // inlined (as a closure called from two others it was not, and its vectors went
        // through memory).
        // SAFETY (for every use below): `i + 8 <= end <= n`, within every slice used;
        // AVX-512F is enabled.
        macro_rules! eight {
            ($i:expr, $coefs:expr) => {{
                let (i, (m, a, b, k)): (usize, (__m512d, __m512d, __m512d, __m512d)) = ($i, $coefs);
                let mut d8 = _mm256_loadu_ps(dp.add(i));
                if RELU {
                    // dy where y > 0, else +0 (NaN y included): as `masked`.
                    let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(
                        _mm256_loadu_ps(yp.add(i)),
                        _mm256_setzero_ps(),
                    );
                    d8 = _mm256_and_ps(pos, d8);
                    if with_res {
                        _mm256_storeu_ps(rp.add(i), d8);
                    }
                }
                let x = _mm512_cvtps_pd(_mm256_loadu_ps(xp.add(i)));
                let d = _mm512_cvtps_pd(d8);
                _mm512_cvtpd_ps(map2_f64!(_mm512, x, d, m, a, b, k))
            }};
        }
        // SAFETY: `o < c + 8 <= run + 8` (the second half of a block starts 8 past an
        // offset below `c`), so the 8 values read end by `run + WRAP` and each `vec8` is
        // in bounds (it asserts so); past `run` the table repeats its first channels, so
        // offset `o` holds channel `o mod c`; AVX-512F is enabled.
        let coef = |o: usize| unsafe {
            (
                src.vec8(0, o),
                src.vec8(1, o),
                src.vec8(3, o),
                src.vec8(4, o),
            )
        };
        let ps = [xp, dp, yp];
        let ahead = c >= AHEAD_MIN_C;
        blocked::<16>(
            head,
            end,
            c,
            desc,
            |i, o, nr| {
                let (lo, hi) = (coef(o), coef(o + 8));
                for r in rows_in(nr, desc) {
                    let i = i + r * c;
                    if ahead {
                        ask_l2(&ps, 2 + RELU as usize, i, n, desc);
                    }
                    // SAFETY: as `eight!`, with `i + 16 <= end`; `op + i` is 32-byte
                    // aligned (`head` is 64-byte aligned, blocks start a multiple of 16
                    // values past it) as the streaming store requires.
                    unsafe {
                        if desc {
                            _mm256_stream_ps(op.add(i + 8), eight!(i + 8, hi));
                            _mm256_stream_ps(op.add(i), eight!(i, lo));
                        } else {
                            _mm256_stream_ps(op.add(i), eight!(i, lo));
                            _mm256_stream_ps(op.add(i + 8), eight!(i + 8, hi));
                        }
                    }
                }
            },
            // SAFETY: as `eight!`; `op + i` is 32-byte aligned (`head` is 64-byte
            // aligned, steps are multiples of 8 values) as the streaming store requires.
            |i, o| unsafe { _mm256_stream_ps(op.add(i), eight!(i, coef(o))) },
        );
    }

    /// The f32 backward map of [`map2f_any`] blocked as [`map2_rows_any`]: per element
    /// exactly the operations of [`map2f_512`], same bits. Returns false, having written
    /// nothing, where [`rows_width`] gives no width.
    ///
    /// # Safety
    /// As [`map2_rows_any`].
    pub(super) unsafe fn map2f_rows_any(
        xs: &[f32],
        mask: &mut Option<(&[f32], &mut [f32])>,
        ds: &[f32],
        os: &mut [f32],
        src: &Table<'_, f32>,
        c: usize,
    ) -> bool {
        dispatch_rows!(map2f_rows_512, map2f_rows_avx2, xs, mask, ds, os, src, c)
    }

    /// See [`map2f_rows_any`].
    ///
    /// # Safety
    /// As [`map2_rows_512`].
    #[target_feature(enable = "avx512f,avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn map2f_rows_512<const RELU: bool>(
        xs: &[f32],
        ys: &[f32],
        ds: &[f32],
        os: &mut [f32],
        rs: &mut [f32],
        src: &Table<'_, f32>,
        c: usize,
        n: usize,
    ) {
        let desc = descending(&[&*os, &*rs], &[xs, ds, ys]);
        let with_res = RELU && !rs.is_empty();
        let run = src.run();
        let head = os.as_ptr().align_offset(64).min(n);
        // 16 values per vector step here: the last 8 of an 8-step tail go scalar.
        let end = head + (n - head) / 16 * 16;
        scalar2::<RELU>(
            (0..head).chain(end..n),
            run,
            (xs, ys, ds),
            (&mut *os, &mut *rs),
            |o, x, y, d| map2f_one::<_, RELU>(src, o, x, y, d),
        );
        let (xp, yp, dp, op, rp) = (
            xs.as_ptr(),
            ys.as_ptr(),
            ds.as_ptr(),
            os.as_mut_ptr(),
            rs.as_mut_ptr(),
        );
        type Coefs = (__m512, __m512, __m512, __m512, __m512);
        // Sixteen outputs at `i` with the coefficients `(hi, a, d, b, k)`.
        // SAFETY (for every call below): `i + 16 <= end <= n`, within every slice used;
        // `op + i` is 64-byte aligned (`head` is, steps are multiples of 16 values) as
        // the streaming store requires; AVX-512F is enabled.
        let sixteen = |i: usize, (hi, a, dd, b, k): Coefs| unsafe {
            let mut d = _mm512_loadu_ps(dp.add(i));
            if RELU {
                // dy where y > 0, else +0 (NaN y included): as `masked`.
                let pos = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(
                    _mm512_loadu_ps(yp.add(i)),
                    _mm512_setzero_ps(),
                );
                d = _mm512_maskz_mov_ps(pos, d);
                if with_res {
                    _mm512_storeu_ps(rp.add(i), d);
                }
            }
            let x = _mm512_loadu_ps(xp.add(i));
            _mm512_stream_ps(op.add(i), map2_f32!(_mm512, x, d, hi, a, dd, b, k));
        };
        // SAFETY: `o < c <= run`, so `o + 16 <= run + WRAP` and each `vec16` is in
        // bounds (it asserts so); past `run` the table repeats its first channels, so
        // offset `o` holds channel `o mod c`; AVX-512F is enabled.
        let coef = |o: usize| unsafe {
            (
                src.vec16(0, o),
                src.vec16(1, o),
                src.vec16(2, o),
                src.vec16(3, o),
                src.vec16(4, o),
            )
        };
        // `end - head` is a multiple of 16 and so is `c`: the 8-value steps after the
        // blocks come in pairs (in either order), each pair one 16-value step at its
        // first value.
        let ps = [xp, dp, yp];
        let ahead = c >= AHEAD_MIN_C;
        blocked::<16>(
            head,
            end,
            c,
            desc,
            |i, o, nr| {
                let v = coef(o);
                for r in rows_in(nr, desc) {
                    if ahead {
                        ask_l2(&ps, 2 + RELU as usize, i + r * c, n, desc);
                    }
                    sixteen(i + r * c, v);
                }
            },
            |i, o| {
                if (i - head).is_multiple_of(16) {
                    sixteen(i, coef(o));
                }
            },
        );
    }

    /// [`map2_rows_any`] on AVX2: blocks of 8 channels (their coefficients in eight
    /// 4-lane vectors), per element exactly the operations of [`map2`]: same bits.
    ///
    /// # Safety
    /// The CPU must support AVX2; every slice used holds `n` values; `c % 8 == 0`,
    /// `0 < c <= src.run()`.
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn map2_rows_avx2<const RELU: bool>(
        xs: &[f32],
        ys: &[f32],
        ds: &[f32],
        os: &mut [f32],
        rs: &mut [f32],
        src: &Table<'_, f64>,
        c: usize,
        n: usize,
    ) {
        let desc = descending(&[&*os, &*rs], &[xs, ds, ys]);
        let with_res = RELU && !rs.is_empty();
        let run = src.run();
        let (head, end) = split(os.as_ptr(), n);
        scalar2::<RELU>(
            (0..head).chain(end..n),
            run,
            (xs, ys, ds),
            (&mut *os, &mut *rs),
            |o, x, y, d| map2_one::<_, RELU>(src, o, x, y, d),
        );
        let (xp, yp, dp, op, rp) = (
            xs.as_ptr(),
            ys.as_ptr(),
            ds.as_ptr(),
            os.as_mut_ptr(),
            rs.as_mut_ptr(),
        );
        type Half = (__m256d, __m256d, __m256d, __m256d);
        // Eight outputs at `i`, each half with its coefficients `(m, a, b, k)`.
        // SAFETY (for every call below): `i + 8 <= end <= n`, within every slice used;
        // `op + i` is 32-byte aligned (`head` is, steps are multiples of 8 values) as the
        // streaming store requires; AVX2 is enabled.
        let eight = |i: usize, lo: Half, hi: Half| unsafe {
            let mut d8 = _mm256_loadu_ps(dp.add(i));
            if RELU {
                // dy where y > 0, else +0 (NaN y included): as `masked`.
                let pos =
                    _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_loadu_ps(yp.add(i)), _mm256_setzero_ps());
                d8 = _mm256_and_ps(pos, d8);
                if with_res {
                    _mm256_storeu_ps(rp.add(i), d8);
                }
            }
            let x8 = _mm256_loadu_ps(xp.add(i));
            let half = |x4: __m128, d4: __m128, (m, a, b, k): Half| {
                let (x, d) = (_mm256_cvtps_pd(x4), _mm256_cvtps_pd(d4));
                _mm256_cvtpd_ps(map2_f64!(_mm256, x, d, m, a, b, k))
            };
            let l = half(_mm256_castps256_ps128(x8), _mm256_castps256_ps128(d8), lo);
            let h = half(
                _mm256_extractf128_ps::<1>(x8),
                _mm256_extractf128_ps::<1>(d8),
                hi,
            );
            _mm256_stream_ps(op.add(i), _mm256_set_m128(h, l));
        };
        // SAFETY: `o < c + 4 <= run + 4` (a second half starts 4 past an offset below
        // `c`), so the 4 values read end by `run + WRAP` and each `vec` is in bounds (it
        // asserts so); past `run` the table repeats its first channels, so offset `o`
        // holds channel `o mod c`; AVX2 is enabled.
        let coef =
            |o: usize| unsafe { (src.vec(0, o), src.vec(1, o), src.vec(3, o), src.vec(4, o)) };
        let ps = [xp, dp, yp];
        let ahead = c >= AHEAD_MIN_C;
        blocked::<8>(
            head,
            end,
            c,
            desc,
            |i, o, nr| {
                let (lo, hi) = (coef(o), coef(o + 4));
                for r in rows_in(nr, desc) {
                    // One request per 64-byte line: every other 8-value step.
                    if ahead && (i - head).is_multiple_of(16) {
                        ask_l2(&ps, 2 + RELU as usize, i + r * c, n, desc);
                    }
                    eight(i + r * c, lo, hi);
                }
            },
            |i, o| eight(i, coef(o), coef(o + 4)),
        );
    }

    /// [`map2f_rows_any`] on AVX2: blocks of 8 channels, per element exactly the
    /// operations of [`map2f`]: same bits.
    ///
    /// # Safety
    /// As [`map2_rows_avx2`].
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn map2f_rows_avx2<const RELU: bool>(
        xs: &[f32],
        ys: &[f32],
        ds: &[f32],
        os: &mut [f32],
        rs: &mut [f32],
        src: &Table<'_, f32>,
        c: usize,
        n: usize,
    ) {
        let desc = descending(&[&*os, &*rs], &[xs, ds, ys]);
        let with_res = RELU && !rs.is_empty();
        let run = src.run();
        let (head, end) = split(os.as_ptr(), n);
        scalar2::<RELU>(
            (0..head).chain(end..n),
            run,
            (xs, ys, ds),
            (&mut *os, &mut *rs),
            |o, x, y, d| map2f_one::<_, RELU>(src, o, x, y, d),
        );
        let (xp, yp, dp, op, rp) = (
            xs.as_ptr(),
            ys.as_ptr(),
            ds.as_ptr(),
            os.as_mut_ptr(),
            rs.as_mut_ptr(),
        );
        type Coefs = (__m256, __m256, __m256, __m256, __m256);
        // Eight outputs at `i` with the coefficients `(hi, a, d, b, k)`.
        // SAFETY (for every call below): `i + 8 <= end <= n`, within every slice used;
        // `op + i` is 32-byte aligned (`head` is, steps are multiples of 8 values) as the
        // streaming store requires; AVX2 is enabled.
        let eight = |i: usize, (hi, a, dd, b, k): Coefs| unsafe {
            let mut d = _mm256_loadu_ps(dp.add(i));
            if RELU {
                // dy where y > 0, else +0 (NaN y included): as `masked`.
                let pos =
                    _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_loadu_ps(yp.add(i)), _mm256_setzero_ps());
                d = _mm256_and_ps(pos, d);
                if with_res {
                    _mm256_storeu_ps(rp.add(i), d);
                }
            }
            let x = _mm256_loadu_ps(xp.add(i));
            _mm256_stream_ps(op.add(i), map2_f32!(_mm256, x, d, hi, a, dd, b, k));
        };
        // SAFETY: `o < c <= run`, so `o + 8 <= run + WRAP` and each `vec` is in bounds (it
        // asserts so); past `run` the table repeats its first channels, so offset `o`
        // holds channel `o mod c`; AVX2 is enabled.
        let coef = |o: usize| unsafe {
            (
                src.vec(0, o),
                src.vec(1, o),
                src.vec(2, o),
                src.vec(3, o),
                src.vec(4, o),
            )
        };
        let ps = [xp, dp, yp];
        let ahead = c >= AHEAD_MIN_C;
        blocked::<8>(
            head,
            end,
            c,
            desc,
            |i, o, nr| {
                let v = coef(o);
                for r in rows_in(nr, desc) {
                    // One request per 64-byte line: every other 8-value step.
                    if ahead && (i - head).is_multiple_of(16) {
                        ask_l2(&ps, 2 + RELU as usize, i + r * c, n, desc);
                    }
                    eight(i + r * c, v);
                }
            },
            |i, o| eight(i, coef(o)),
        );
    }
}
