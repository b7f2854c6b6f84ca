//! The backward map `dx = a·dz + b·(x − center) + k` with `dz = dy` ([`affine2`]) or,
//! through a ReLU whose output was `y`, `dz = dy·[y > 0]` ([`affine2_relu`], which also
//! writes `dz` for an added residual), for both layout families: channels-first runs
//! ([`run_affine2`], [`run_affine2_relu`]) and channels-last rows ([`rows_affine2`],
//! [`rows_affine2_relu`], a coefficient table per call). In f64 for f32 and f64 storage
//! (or f32 for f32 when asked), in f32 for the 16-bit types (`by_backward_arith!`).

use super::coefs::x86::{Broadcast, Table};
use super::coefs::{coef_table, columns, map_run, Affine2, Affine2At, Arith};
use super::schedule::{rows_per_task, Scratch};
use super::simd::{self, Isa};
#[cfg(target_arch = "x86_64")]
use super::Out;
use super::{stream_fence, stream_wanted};
use crate::element::{DType, Element};
use crate::layout::Geometry;
use crate::parallel::{self, Parallelism};

#[cfg(target_arch = "x86_64")]
mod x86;

simd::dispatch! {
    fn run_affine2<T>(xs: &[T], ds: &[T], os: &mut Out<T>, at: Affine2At);
    fn rows_affine2<T>(xs: &[T], ds: &[T], os: &mut Out<T>, map: Affine2<'_>);
    fn run_affine2_relu<T>(xs: &[T], ys: &[T], ds: &[T], os: &mut Out<T>, rs: &mut Out<T>, at: Affine2At);
    fn rows_affine2_relu<T>(xs: &[T], ys: &[T], ds: &[T], os: &mut Out<T>, rs: &mut Out<T>, map: Affine2<'_>);
}

/// The operands of a backward step through a ReLU: the forward's output `y`, and `dres`,
/// which receives the masked gradient `dz` for an added residual (empty: not wanted).
pub(crate) type Relu<'a, T> = Option<(&'a [T], &'a mut Out<T>)>;

/// `dx = a[c]·dz + b[c]·(x − center[c]) + k[c]` for every element, with `dz = dy`, or
/// through a ReLU whose output was `y` when `relu = Some((y, dres))`: `dz = dy·[y > 0]`,
/// also written to `dres` unless it is empty.
pub(crate) fn affine2<T: Element>(
    g: Geometry,
    x: &[T],
    dy: &[T],
    relu: Relu<'_, T>,
    map: Affine2<'_>,
    dx: &mut Out<T>,
    par: Parallelism,
) {
    if g.is_empty() {
        return;
    }
    match relu {
        None => affine2_plain(g, x, dy, map, dx, par),
        Some(relu) => affine2_masked(g, x, relu, dy, map, dx, par),
    }
}

/// [`affine2`] without a ReLU.
fn affine2_plain<T: Element>(
    g: Geometry,
    x: &[T],
    dy: &[T],
    map: Affine2<'_>,
    dx: &mut Out<T>,
    par: Parallelism,
) {
    let isa = Isa::of_call();
    let c = g.channels;
    let row = c * g.inner;
    let chunk = rows_per_task(row) * row;
    let nt = stream_wanted::<T>(dx.len());
    let table = (nt && g.inner == 1).then(|| Table2::new(map));
    let body = |((xs, ds), os): ((&[T], &[T]), &mut Out<T>)| {
        if g.inner == 1 {
            if let Some(t) = &table {
                if stream_rows_affine2(isa, xs, None, ds, os, t) {
                    stream_fence();
                    return;
                }
            }
            by_level::rows_affine2(isa, xs, ds, os, map);
        } else {
            for (j, ((xr, dr), or)) in xs
                .chunks_exact(g.inner)
                .zip(ds.chunks_exact(g.inner))
                .zip(os.chunks_exact_mut(g.inner))
                .enumerate()
            {
                run_affine2_nt(isa, xr, dr, or, map.at(j % c), nt);
            }
            if nt {
                stream_fence();
            }
        }
    };
    parallel::chunks(par, g.len(), dx, chunk, |i, os| {
        let r = i * chunk..i * chunk + os.len();
        body(((&x[r.clone()], &dy[r]), os))
    });
}

/// One task's slices of x, y, dy and dx.
type Chunk4<'a, T> = (((&'a [T], &'a [T]), &'a [T]), &'a mut Out<T>);

/// [`affine2`] through a ReLU.
fn affine2_masked<T: Element>(
    g: Geometry,
    x: &[T],
    (y, dres): (&[T], &mut Out<T>),
    dy: &[T],
    map: Affine2<'_>,
    dx: &mut Out<T>,
    par: Parallelism,
) {
    let isa = Isa::of_call();
    let c = g.channels;
    let row = c * g.inner;
    let chunk = rows_per_task(row) * row;
    let with_res = !dres.is_empty();
    let nt = stream_wanted::<T>(dx.len());
    let table = (nt && g.inner == 1).then(|| Table2::new(map));
    let body = |(((xs, ys), ds), os): Chunk4<'_, T>, rs: &mut Out<T>| {
        if g.inner == 1 {
            if let Some(t) = &table {
                if stream_rows_affine2(isa, xs, Some((ys, &mut *rs)), ds, os, t) {
                    stream_fence();
                    return;
                }
            }
            by_level::rows_affine2_relu(isa, xs, ys, ds, os, rs, map);
        } else {
            let n = xs.len() / g.inner;
            for j in 0..n {
                let r = j * g.inner..(j + 1) * g.inner;
                let rr = if with_res {
                    &mut rs[r.clone()]
                } else {
                    &mut [][..]
                };
                let (xs, ys, ds) = (&xs[r.clone()], &ys[r.clone()], &ds[r.clone()]);
                run_affine2_relu_nt(isa, xs, (ys, rr), ds, &mut os[r], map.at(j % c), nt);
            }
            if nt {
                stream_fence();
            }
        }
    };
    parallel::chunks2(par, g.len(), (dx, dres), chunk, |i, os, rs| {
        let r = i * chunk..i * chunk + os.len();
        body((((&x[r.clone()], &y[r.clone()]), &dy[r]), os), rs)
    });
}

/// [`run_affine2`], with streaming stores when `stream` (same bits).
#[inline]
pub(super) fn run_affine2_nt<T: Element>(
    isa: Isa,
    xs: &[T],
    ds: &[T],
    os: &mut Out<T>,
    at: Affine2At,
    stream: bool,
) {
    if !(stream && stream_run_affine2(isa, xs, None, ds, os, coefs2(at))) {
        by_level::run_affine2(isa, xs, ds, os, at);
    }
}

/// The coefficients of one channel's backward map for the streaming kernels, in the
/// arithmetic the ordinary map would use.
fn coefs2(at: Affine2At) -> Coefs2 {
    let Affine2At { m, a, b, k, narrow } = at;
    if narrow {
        Coefs2::F32(affine2_coefs_f32(m, a, b, k))
    } else {
        Coefs2::F64(affine2_coefs_f64(m, a, b, k))
    }
}

/// [`run_affine2_relu`], with streaming stores when `stream` (same bits).
#[inline]
pub(super) fn run_affine2_relu_nt<T: Element>(
    isa: Isa,
    xs: &[T],
    (ys, rs): (&[T], &mut Out<T>),
    ds: &[T],
    os: &mut Out<T>,
    at: Affine2At,
    stream: bool,
) {
    if !(stream && stream_run_affine2(isa, xs, Some((ys, &mut *rs)), ds, os, coefs2(at))) {
        by_level::run_affine2_relu(isa, xs, ys, ds, os, rs, at);
    }
}

// ─── Streaming stores ────────────────────────────────────────────────────────────────────

/// The coefficients of a channels-first backward map, in the layout of
/// [`affine2_coefs`] (`[m, a, d, b, k]`): f64 (`d` zero) or f32.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) enum Coefs2 {
    F64([f64; 5]),
    F32([f32; 5]),
}

/// Channels-first `o = (a·dz + b·(x − m)) + k` in f64, or `(a·(dz − d) + b·(x − m)) + k`
/// in f32, per `coefs`, rounded to f32 and stored streaming, with `dz = dy`, or through a
/// ReLU whose output was `y` when `relu = Some((y, dres))` (`dz = dy·[y > 0]`, also
/// written to `dres` unless it is empty). False (nothing written) when `T` is not f32 or
/// the CPU lacks AVX2.
#[inline]
fn stream_run_affine2<T: Element>(
    isa: Isa,
    xs: &[T],
    relu: Relu<'_, T>,
    ds: &[T],
    os: &mut Out<T>,
    coefs: Coefs2,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if let Some(ok) = with_relu32(relu, |mask| {
        let Some((xs, ds, os)) = stream_views(isa, xs, ds, os) else {
            return false;
        };
        // SAFETY: `stream_views` checked that the CPU has AVX2.
        unsafe {
            match coefs {
                Coefs2::F64(c) => x86::map2_any(isa, xs, mask, ds, os, &Broadcast(c)),
                Coefs2::F32(c) => x86::map2_any(isa, xs, mask, ds, os, &Broadcast(c)),
            }
        };
        true
    }) {
        return ok;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = relu;
    let _ = (isa, xs, ds, os, coefs);
    false
}

/// `xs`, `ds` and `os` as f32 slices, when `T` is f32 and a call at `isa` has the
/// streaming kernels (AVX2).
#[cfg(target_arch = "x86_64")]
#[inline]
fn stream_views<'a, T: Element>(
    isa: Isa,
    xs: &'a [T],
    ds: &'a [T],
    os: &'a mut Out<T>,
) -> Option<(&'a [f32], &'a [f32], &'a mut Out<f32>)> {
    if !super::stream_available(isa) {
        return None;
    }
    Some((T::as_f32s(xs)?, T::as_f32s(ds)?, T::as_f32s_out(os)?))
}

/// The coefficient table of a channels-last backward map for `c` channels and its run
/// length, in the arithmetic the ordinary map would use: f64 from
/// [`affine2_table_f64`] or f32 from [`affine2_table_f32`] (five columns each).
/// Built once per call for all tasks.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) struct Table2 {
    c: usize,
    run: usize,
    t: Table2Data,
}

/// The columns of a [`Table2`] in their arithmetic.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Table2Data {
    F64(Scratch<f64>),
    F32(Scratch<f32>),
}

impl Table2 {
    /// The table of `map`, in f32 when it is narrow.
    fn new(map: Affine2<'_>) -> Table2 {
        let (t, run) = if map.narrow {
            let (t, run) = affine2_table_f32(map);
            (Table2Data::F32(t), run)
        } else {
            let (t, run) = affine2_table_f64(map);
            (Table2Data::F64(t), run)
        };
        Table2 {
            c: map.channels(),
            run,
            t,
        }
    }
}

/// Channels-last [`stream_run_affine2`] with a [`Table2`]: in f64, or in f32 as
/// `o = (a·(dz − d) + b·(x − hi)) + k` with an f32 table.
#[inline]
fn stream_rows_affine2<T: Element>(
    isa: Isa,
    xs: &[T],
    relu: Relu<'_, T>,
    ds: &[T],
    os: &mut Out<T>,
    table: &Table2,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if let Some(ok) = with_relu32(relu, |mut mask| {
        let Some((xs, ds, os)) = stream_views(isa, xs, ds, os) else {
            return false;
        };
        // SAFETY: `stream_views` checked that the CPU has AVX2.
        unsafe {
            let (c, run) = (table.c, table.run);
            match &table.t {
                Table2Data::F64(t) => {
                    let t = Table::new(t, run, 5);
                    if !x86::rows_any(isa, xs, &mut mask, ds, os, &t, c) {
                        x86::map2_any(isa, xs, mask, ds, os, &t)
                    }
                }
                Table2Data::F32(t) => {
                    let t = Table::new(t, run, 5);
                    if !x86::rows_any(isa, xs, &mut mask, ds, os, &t, c) {
                        x86::map2_any(isa, xs, mask, ds, os, &t)
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
    let _ = (isa, xs, ds, os, table);
    false
}

/// The ReLU operands of a backward map as f32 (`None` inside: no ReLU), passed to `f`;
/// `None` when `T` is not f32.
#[inline]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn with_relu32<T: Element, R>(
    relu: Relu<'_, T>,
    f: impl FnOnce(Option<(&[f32], &mut Out<f32>)>) -> R,
) -> Option<R> {
    match relu {
        None => Some(f(None)),
        Some((y, r)) => match (T::as_f32s(y), T::as_f32s_out(r)) {
            (Some(y), Some(r)) => Some(f(Some((y, r)))),
            _ => None,
        },
    }
}

// ─── The inner loops ────────────────────────────────────────────────────────────────────

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

/// The f64 [`coef_table`] of a channels-last backward map (see [`affine2_coefs`]: five
/// columns, the third zero), as
/// [`affine_table_f32`](super::forward_map::affine_table_f32).
pub(crate) fn affine2_table_f64(map: Affine2<'_>) -> (Scratch<f64>, usize) {
    let c = map.channels();
    (
        coef_table(c, |ch| affine2_coefs_at::<f64>(map.at(ch))),
        map_run(c),
    )
}

/// The f32 [`coef_table`] of a channels-last backward map (see [`affine2_coefs`]).
pub(crate) fn affine2_table_f32(map: Affine2<'_>) -> (Scratch<f32>, usize) {
    let c = map.channels();
    (
        coef_table(c, |ch| affine2_coefs_at::<f32>(map.at(ch))),
        map_run(c),
    )
}

/// [`affine2_coefs`] of one channel's map.
#[inline(always)]
fn affine2_coefs_at<A: Arith>(at: Affine2At) -> [A; 5] {
    affine2_coefs::<A>(at.m, at.a, at.b, at.k)
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

/// `o = a·dy + b·(x − m) + k` over a contiguous run.
#[inline(always)]
pub(crate) fn run_affine2<T: Element>(xs: &[T], ds: &[T], os: &mut Out<T>, at: Affine2At) {
    by_backward_arith!(at.narrow, run_affine2_in::<T>(xs, ds, os, at))
}

#[inline(always)]
fn run_affine2_in<T: Element, A: Arith>(xs: &[T], ds: &[T], os: &mut Out<T>, at: Affine2At) {
    let [h, a, d0, b, k] = affine2_coefs_at::<A>(at);
    for ((o, x), d) in os.iter_mut().zip(xs).zip(ds) {
        o.write((a * centered(A::load(*d), d0) + b * (A::load(*x) - h) + k).store());
    }
}

/// `dx = a·dz + b·(x − m) + k` with `dz = dy·[y > 0]`, and `dr = dz` when `rs` is not
/// empty.
#[inline(always)]
pub(crate) fn run_affine2_relu<T: Element>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    os: &mut Out<T>,
    rs: &mut Out<T>,
    at: Affine2At,
) {
    by_backward_arith!(at.narrow, run_affine2_relu_in::<T>(xs, ys, ds, os, rs, at))
}

#[inline(always)]
fn run_affine2_relu_in<T: Element, A: Arith>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    os: &mut Out<T>,
    rs: &mut Out<T>,
    at: Affine2At,
) {
    let [h, a, d0, b, k] = affine2_coefs_at::<A>(at);
    for (((o, x), y), d) in os.iter_mut().zip(xs).zip(ys).zip(ds) {
        let dz: A = masked(*y, *d);
        o.write((a * centered(dz, d0) + b * (A::load(*x) - h) + k).store());
    }
    for ((r, y), d) in rs.iter_mut().zip(ys).zip(ds) {
        r.write(masked_store(*y, *d));
    }
}

/// `o = a·dy + b·(x − center) + k` on channels-last rows, in the map's arithmetic.
#[inline(always)]
pub(crate) fn rows_affine2<T: Element>(xs: &[T], ds: &[T], os: &mut Out<T>, map: Affine2<'_>) {
    by_backward_arith!(
        map.narrow,
        rows_affine2_in::<T>(xs, &[], ds, os, &mut [], map, false)
    )
}

/// Channels-last `dx = a·dz + b·(x − center) + k` with `dz = dy·[y > 0]` (and `dr = dz`),
/// in the map's arithmetic.
#[inline(always)]
pub(crate) fn rows_affine2_relu<T: Element>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    os: &mut Out<T>,
    rs: &mut Out<T>,
    map: Affine2<'_>,
) {
    by_backward_arith!(
        map.narrow,
        rows_affine2_in::<T>(xs, ys, ds, os, rs, map, true)
    )
}

#[inline(always)]
fn rows_affine2_in<T: Element, A: Arith>(
    xs: &[T],
    ys: &[T],
    ds: &[T],
    os: &mut Out<T>,
    rs: &mut Out<T>,
    map: Affine2<'_>,
    with_relu: bool,
) {
    let c = map.channels();
    let table = coef_table(c, |ch| affine2_coefs_at::<A>(map.at(ch)));
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
                    o.write(co(*x, A::load(*d), k).store());
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
                    o.write(co(*x, masked(*y, *d), k).store());
                }
            }
        }
    }
    for ((r, y), d) in rs.iter_mut().zip(ys).zip(ds) {
        r.write(masked_store(*y, *d));
    }
}
