//! The forward map `y = (x − center)·scale + shift` with its epilogue ([`Ep`]: none,
//! ReLU, add + ReLU) in the same pass, for both layout families: channels-first runs
//! ([`run_affine`] and its epilogue variants, one channel's coefficients per run) and
//! channels-last rows ([`rows_affine`], [`rows_affine_relu`], a coefficient table per
//! call). In f64 for f64 storage, in f32 for the others (`by_arith!`).

use super::coefs::x86::{Broadcast, Table};
use super::coefs::{coef_table, columns, map_run, Affine, Arith};
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
    fn run_affine<T>(xs: &[T], ys: &mut Out<T>, m: f64, s: f64, b: f64);
    fn run_affine_relu<T>(xs: &[T], ys: &mut Out<T>, m: f64, s: f64, b: f64);
    fn run_affine_add_relu<T>(xs: &[T], rs: &[T], ys: &mut Out<T>, m: f64, s: f64, b: f64);
    fn rows_affine<T>(xs: &[T], ys: &mut Out<T>, map: Affine<'_>);
    fn rows_affine_relu<T>(xs: &[T], rs: &[T], ys: &mut Out<T>, map: Affine<'_>);
}

/// What follows the normalization in the same pass.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ep<'a, T> {
    /// Nothing: `y = bn(x)`.
    None,
    /// `y = relu(bn(x))`.
    Relu,
    /// `y = relu(bn(x) + r)`.
    AddRelu(&'a [T]),
}

impl<'a, T> Ep<'a, T> {
    /// The same epilogue restricted to `range` of the flat tensor.
    pub(crate) fn slice(&self, range: std::ops::Range<usize>) -> Ep<'a, T> {
        match *self {
            Ep::AddRelu(r) => Ep::AddRelu(&r[range]),
            Ep::None => Ep::None,
            Ep::Relu => Ep::Relu,
        }
    }
}

/// `y = (x − center[c])·scale[c] + shift[c]` for every element, followed by an epilogue
/// in the same pass.
pub(crate) fn affine_ep<T: Element>(
    g: Geometry,
    x: &[T],
    ep: Ep<'_, T>,
    map: Affine<'_>,
    y: &mut Out<T>,
    par: Parallelism,
) {
    debug_assert_eq!(x.len(), g.len());
    debug_assert_eq!(y.len(), g.len());
    let c = g.channels;
    if g.is_empty() {
        return;
    }
    let isa = Isa::of_call();
    let row = c * g.inner;
    let chunk = rows_per_task(row) * row;
    let nt = stream_wanted::<T>(y.len());
    // The channels-last streaming kernels' coefficient table, built once for all tasks.
    let table = (nt && g.inner == 1).then(|| affine_table_f32(map));
    let body = |(i, (xs, ys)): (usize, (&[T], &mut Out<T>))| {
        let ep = ep.slice(i * chunk..i * chunk + xs.len());
        if g.inner == 1 {
            if let Some(t) = &table {
                let (res, relu) = match ep {
                    Ep::None => (None, false),
                    Ep::Relu => (None, true),
                    Ep::AddRelu(r) => (Some(r), true),
                };
                if stream_rows_affine(isa, xs, res, ys, (&t.0, t.1), relu) {
                    stream_fence();
                    return;
                }
            }
            match ep {
                Ep::None => by_level::rows_affine(isa, xs, ys, map),
                Ep::Relu => by_level::rows_affine_relu(isa, xs, &[], ys, map),
                Ep::AddRelu(r) => by_level::rows_affine_relu(isa, xs, r, ys, map),
            }
        } else {
            for (j, (xr, yr)) in xs
                .chunks_exact(g.inner)
                .zip(ys.chunks_exact_mut(g.inner))
                .enumerate()
            {
                let ch = j % c;
                let e = ep.slice(j * g.inner..(j + 1) * g.inner);
                run_affine_ep(isa, xr, e, yr, map.at(ch), nt);
            }
            if nt {
                stream_fence();
            }
        }
    };
    parallel::chunks(par, g.len(), y, chunk, |i, ys| {
        body((i, (&x[i * chunk..i * chunk + ys.len()], ys)))
    });
}

/// One contiguous run with its epilogue; with streaming stores when `stream` (and the
/// type and CPU allow them: same bits).
#[inline]
pub(super) fn run_affine_ep<T: Element>(
    isa: Isa,
    xs: &[T],
    ep: Ep<'_, T>,
    ys: &mut Out<T>,
    (m, s, b): (f64, f64, f64),
    stream: bool,
) {
    if stream {
        let (res, relu) = match ep {
            Ep::None => (None, false),
            Ep::Relu => (None, true),
            Ep::AddRelu(r) => (Some(r), true),
        };
        if stream_run_affine(isa, xs, res, ys, affine_coefs_f32(m, s, b), relu) {
            return;
        }
    }
    match ep {
        Ep::None => by_level::run_affine(isa, xs, ys, m, s, b),
        Ep::Relu => by_level::run_affine_relu(isa, xs, ys, m, s, b),
        Ep::AddRelu(r) => by_level::run_affine_add_relu(isa, xs, r, ys, m, s, b),
    }
}

// ─── Streaming stores ────────────────────────────────────────────────────────────────────

/// The f32 views of an optional slice of `T` (`Some(&[])` for an absent one): `None` when
/// `T` is not f32.
#[inline]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn opt32<T: Element>(v: Option<&[T]>) -> Option<&[f32]> {
    match v {
        Some(v) => T::as_f32s(v),
        None => Some(&[]),
    }
}

/// `xs`, the residual (empty when `None`) and `ys` as f32 slices, when `T` is f32 and a
/// call at `isa` has the streaming kernels (AVX2).
#[cfg(target_arch = "x86_64")]
#[inline]
fn stream_views<'a, T: Element>(
    isa: Isa,
    xs: &'a [T],
    res: Option<&'a [T]>,
    ys: &'a mut Out<T>,
) -> Option<(&'a [f32], &'a [f32], &'a mut Out<f32>)> {
    if !super::stream_available(isa) {
        return None;
    }
    Some((T::as_f32s(xs)?, opt32(res)?, T::as_f32s_out(ys)?))
}

/// Channels-first `y = (x − h)·s + b (+ r)`, then ReLU when `relu`, with streaming stores
/// (`r` the residual, added before the ReLU). Returns false, having written nothing, when
/// `T` is not f32 or the CPU lacks AVX2.
#[inline]
fn stream_run_affine<T: Element>(
    isa: Isa,
    xs: &[T],
    res: Option<&[T]>,
    ys: &mut Out<T>,
    coefs: [f32; 3],
    relu: bool,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if let Some((xs, rs, ys)) = stream_views(isa, xs, res, ys) {
        // SAFETY: `stream_views` checked that the CPU has AVX2.
        unsafe { x86::map1_any(isa, xs, rs, ys, &Broadcast(coefs), relu) };
        return true;
    }
    let _ = (isa, xs, res, ys, coefs, relu);
    false
}

/// Channels-last [`stream_run_affine`]: `xs`/`ys` (and `res`) start at a row, `table`
/// is an f32 coefficient table (`hi`, scale, shift) with run length `run` from
/// [`affine_table_f32`].
#[inline]
fn stream_rows_affine<T: Element>(
    isa: Isa,
    xs: &[T],
    res: Option<&[T]>,
    ys: &mut Out<T>,
    (table, run): (&Scratch<f32>, usize),
    relu: bool,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if let Some((xs, rs, ys)) = stream_views(isa, xs, res, ys) {
        // SAFETY: `stream_views` checked that the CPU has AVX2.
        unsafe { x86::map1_any(isa, xs, rs, ys, &Table::new(table, run, 3), relu) };
        return true;
    }
    let _ = (isa, xs, res, ys, table, run, relu);
    false
}

// ─── The inner loops ────────────────────────────────────────────────────────────────────

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
pub(crate) fn affine_table_f32(map: Affine<'_>) -> (Scratch<f32>, usize) {
    let c = map.channels();
    let t = coef_table(c, |ch| {
        let (m, s, b) = map.at(ch);
        affine_coefs::<f32>(m, s, b)
    });
    (t, map_run(c))
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

/// `y = (x − m)·s + b` over a contiguous run.
#[inline(always)]
pub(crate) fn run_affine<T: Element>(xs: &[T], ys: &mut Out<T>, m: f64, s: f64, b: f64) {
    by_arith!(run_affine_in::<T>(xs, &[], ys, (m, s, b), false))
}

/// `y = relu((x − m)·s + b)` over a contiguous run.
#[inline(always)]
pub(crate) fn run_affine_relu<T: Element>(xs: &[T], ys: &mut Out<T>, m: f64, s: f64, b: f64) {
    by_arith!(run_affine_in::<T>(xs, &[], ys, (m, s, b), true))
}

/// `y = relu((x − m)·s + b + r)` over a contiguous run.
#[inline(always)]
pub(crate) fn run_affine_add_relu<T: Element>(
    xs: &[T],
    rs: &[T],
    ys: &mut Out<T>,
    m: f64,
    s: f64,
    b: f64,
) {
    by_arith!(run_affine_in::<T>(xs, rs, ys, (m, s, b), true))
}

/// The three run maps: `(x − m)·s + b`, plus `r` when `rs` is not empty, then ReLU when
/// `with_relu` (a constant at every call site, so each keeps its own loop).
#[inline(always)]
fn run_affine_in<T: Element, A: Arith>(
    xs: &[T],
    rs: &[T],
    ys: &mut Out<T>,
    (m, s, b): (f64, f64, f64),
    with_relu: bool,
) {
    let [h, s, b] = affine_coefs::<A>(m, s, b);
    let z = |x: T| (A::load(x) - h) * s + b;
    if !rs.is_empty() {
        for ((y, x), r) in ys.iter_mut().zip(xs).zip(rs) {
            y.write(relu(z(*x) + A::load(*r)).store());
        }
    } else if with_relu {
        for (y, x) in ys.iter_mut().zip(xs) {
            y.write(relu(z(*x)).store());
        }
    } else {
        for (y, x) in ys.iter_mut().zip(xs) {
            y.write(z(*x).store());
        }
    }
}

/// `y = (x − center)·scale + shift` on channels-last rows.
#[inline(always)]
pub(crate) fn rows_affine<T: Element>(xs: &[T], ys: &mut Out<T>, map: Affine<'_>) {
    by_arith!(rows_affine_in::<T>(xs, &[], ys, map, false))
}

/// Channels-last `y = relu((x − center)·scale + shift [+ r])`.
#[inline(always)]
pub(crate) fn rows_affine_relu<T: Element>(xs: &[T], rs: &[T], ys: &mut Out<T>, map: Affine<'_>) {
    by_arith!(rows_affine_in::<T>(xs, rs, ys, map, true))
}

#[inline(always)]
fn rows_affine_in<T: Element, A: Arith>(
    xs: &[T],
    rs: &[T],
    ys: &mut Out<T>,
    map: Affine<'_>,
    with_relu: bool,
) {
    let c = map.channels();
    let table = coef_table(c, |ch| {
        let (m, s, b) = map.at(ch);
        affine_coefs::<A>(m, s, b)
    });
    let [hi, sc, sh] = columns(&table, c);
    {
        let l = hi.len();
        let co = |x: T, (h, (s, b)): (&A, (&A, &A))| (A::load(x) - *h) * *s + *b;
        let cz = || hi.iter().zip(sc.iter().zip(sh));
        if !with_relu {
            for (xr, yr) in xs.chunks(l).zip(ys.chunks_mut(l)) {
                for ((y, x), k) in yr.iter_mut().zip(xr).zip(cz()) {
                    y.write(co(*x, k).store());
                }
            }
        } else if rs.is_empty() {
            for (xr, yr) in xs.chunks(l).zip(ys.chunks_mut(l)) {
                for ((y, x), k) in yr.iter_mut().zip(xr).zip(cz()) {
                    y.write(relu(co(*x, k)).store());
                }
            }
        } else {
            for ((xr, rr), yr) in xs.chunks(l).zip(rs.chunks(l)).zip(ys.chunks_mut(l)) {
                for (((y, x), r), k) in yr.iter_mut().zip(xr).zip(rr).zip(cz()) {
                    y.write(relu(co(*x, k) + A::load(*r)).store());
                }
            }
        }
    }
}
