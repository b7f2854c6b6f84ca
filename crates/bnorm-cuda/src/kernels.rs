//! The CUDA C source of every kernel, compiled by NVRTC at run time, and the names the
//! Rust side launches.
//!
//! The source needs no header (f16 and bf16 are handled as 16-bit patterns with PTX
//! conversions), so NVRTC compiles it without an include path. Element-type kernels are
//! C++ templates; [`source`] appends one `extern "C"` wrapper per (kernel, dtype) so each
//! entry point appears under its literal name (`bn_stats_cf_bf16`, ...).
//!
//! Numerics: statistics accumulate per thread, in f64, the values shifted by the channel's
//! first element (`Σ(x − K)`, `Σ(x − K)²`); threads, warps and blocks are summed in an
//! order fixed by the launch configuration, so results are deterministic on a given
//! device. Element-wise kernels compute in f32 with the centre split into two floats
//! (`(x − hi) − lo`), so a large mean costs no accuracy.

use crate::tensor::DTypeTag;

/// Kernels instantiated once per element type (suffixed `_f32`, `_f16`, `_bf16`).
pub(crate) const TYPED: [&str; 6] = [
    "bn_stats_cf",
    "bn_stats_cl",
    "bn_norm",
    "bn_bwd_reduce_cf",
    "bn_bwd_reduce_cl",
    "bn_bwd_dx",
];

/// Kernels on per-channel f64 data only.
pub(crate) const UNTYPED: [&str; 4] = [
    "bn_finalize_train",
    "bn_coef_running",
    "bn_running_update",
    "bn_bwd_finalize",
];

/// Threads per block of the one-dimensional kernels.
pub(crate) const BLOCK: u32 = 256;
/// Channels per block (x) and rows per block (y) of the channels-last reductions.
pub(crate) const CL_TILE: (u32, u32) = (32, 8);

/// The full name of a typed kernel for one dtype.
pub(crate) fn typed_name(base: &str, dtype: DTypeTag) -> String {
    format!("{base}_{}", dtype.suffix())
}

/// Every entry point the Rust side may launch (what [`source`] defines and
/// [`Gpu::new`](crate::Gpu::new) loads).
///
/// ```
/// assert!(bnorm_cuda::kernels::entry_points().iter().any(|k| k == "bn_norm_bf16"));
/// ```
pub fn entry_points() -> Vec<String> {
    let mut v: Vec<String> = UNTYPED.iter().map(|s| s.to_string()).collect();
    for d in DTypeTag::ALL {
        v.extend(TYPED.iter().map(|b| typed_name(b, d)));
    }
    v
}

const COMMON: &str = r#"
typedef unsigned int u32;
typedef unsigned long long u64;
struct h16 { unsigned short v; };
struct b16 { unsigned short v; };

__device__ __forceinline__ float ld(const float* __restrict__ p, u64 i) { return p[i]; }
__device__ __forceinline__ float ld(const h16* __restrict__ p, u64 i) {
    unsigned short b = p[i].v; float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
    return f;
}
__device__ __forceinline__ float ld(const b16* __restrict__ p, u64 i) {
    return __uint_as_float(((u32)p[i].v) << 16);
}
__device__ __forceinline__ void st(float* __restrict__ p, u64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(h16* __restrict__ p, u64 i, float v) {
    unsigned short b;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(v));
    p[i].v = b;
}
__device__ __forceinline__ void st(b16* __restrict__ p, u64 i, float v) {
    u32 u = __float_as_uint(v);
    unsigned short b;
    if ((u & 0x7fffffffu) > 0x7f800000u) b = (unsigned short)((u >> 16) | 0x40u);
    else b = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    p[i].v = b;
}

// n / d for n < 2^31 with (m, s) from the host (round-up method, m < 2^32).
__device__ __forceinline__ u32 fdiv(u32 n, u32 m, u32 s) {
    return (u32)(((u64)n * (u64)m) >> s);
}

__device__ __forceinline__ double warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Sums (a, b) over a one-dimensional block; the result is in thread 0. Fixed order.
__device__ __forceinline__ void block_sum2(double& a, double& b) {
    __shared__ double sa[32];
    __shared__ double sb[32];
    a = warp_sum(a);
    b = warp_sum(b);
    u32 w = threadIdx.x >> 5, l = threadIdx.x & 31u;
    if (l == 0) { sa[w] = a; sb[w] = b; }
    __syncthreads();
    if (threadIdx.x == 0) {
        double ta = 0.0, tb = 0.0;
        u32 nw = (blockDim.x + 31u) >> 5;
        for (u32 i = 0; i < nw; ++i) { ta += sa[i]; tb += sb[i]; }
        a = ta; b = tb;
    }
}

// Sums (a, b) over the y axis of a (32, 8) block; result valid in threads with y == 0.
__device__ __forceinline__ void tile_sum2(double& a, double& b) {
    __shared__ double sa[8][33];
    __shared__ double sb[8][33];
    sa[threadIdx.y][threadIdx.x] = a;
    sb[threadIdx.y][threadIdx.x] = b;
    __syncthreads();
    if (threadIdx.y == 0) {
        double ta = 0.0, tb = 0.0;
        for (u32 k = 0; k < blockDim.y; ++k) { ta += sa[k][threadIdx.x]; tb += sb[k][threadIdx.x]; }
        a = ta; b = tb;
    }
}

// ---- statistics: partial (Σ(x−K), Σ(x−K)²) per (split, channel), K = channel's first value
// channels-first: grid (C, S); split s covers j in [s·chunk, (s+1)·chunk) of the channel's
// PC = outer·inner values, j = o·inner + i.
template <typename T>
__device__ void stats_cf(const T* __restrict__ x, u32 C, u32 I, u32 mI, u32 sI, u32 PC,
                         u32 chunk, double* __restrict__ part, double* __restrict__ shift) {
    u32 c = blockIdx.x, s = blockIdx.y;
    double K = (double)ld(x, (u64)c * I);
    u32 j0 = s * chunk;
    u32 j1 = min(PC, j0 + chunk);
    double s1 = 0.0, s2 = 0.0;
#pragma unroll 4
    for (u32 j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
        u32 o = fdiv(j, mI, sI);
        u32 i = j - o * I;
        double v = (double)ld(x, ((u64)o * C + c) * I + i) - K;
        s1 += v;
        s2 = fma(v, v, s2);
    }
    block_sum2(s1, s2);
    if (threadIdx.x == 0) {
        u64 p = ((u64)s * C + c) * 2u;
        part[p] = s1;
        part[p + 1] = s2;
        if (s == 0) shift[c] = K;
    }
}

// channels-last: grid (ceil(C/32), S), block (32, 8); split s covers rows [s·rows, ...).
template <typename T>
__device__ void stats_cl(const T* __restrict__ x, u32 O, u32 C, u32 rows,
                         double* __restrict__ part, double* __restrict__ shift) {
    u32 c = blockIdx.x * blockDim.x + threadIdx.x, s = blockIdx.y;
    u32 r0 = s * rows;
    u32 r1 = min(O, r0 + rows);
    double s1 = 0.0, s2 = 0.0, K = 0.0;
    if (c < C) {
        K = (double)ld(x, (u64)c);
#pragma unroll 4
        for (u32 r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
            double v = (double)ld(x, (u64)r * C + c) - K;
            s1 += v;
            s2 = fma(v, v, s2);
        }
    }
    tile_sum2(s1, s2);
    if (threadIdx.y == 0 && c < C) {
        u64 p = ((u64)s * C + c) * 2u;
        part[p] = s1;
        part[p + 1] = s2;
        if (s == 0) shift[c] = K;
    }
}

// ---- y = ((x − hi) − lo)·scale + shift, coef = [hi, lo, scale, shift] per channel.
// Channel of flat index idx: (idx / inner) mod C, for every layout.
template <typename T>
__device__ void norm(const T* __restrict__ x, T* __restrict__ y, u32 len, u32 mI, u32 sI,
                     u32 C, u32 mC, u32 sC, const float* __restrict__ coef) {
    u32 stride = gridDim.x * blockDim.x;
    for (u32 idx = blockIdx.x * blockDim.x + threadIdx.x; idx < len; idx += stride) {
        u32 q = fdiv(idx, mI, sI);
        u32 c = q - fdiv(q, mC, sC) * C;
        const float* k = coef + 4u * c;
        float v = (ld(x, idx) - k[0]) - k[1];
        st(y, idx, fmaf(v, k[2], k[3]));
    }
}

// ---- backward: partial (Σdy, Σdy·(x − μ)) per (split, channel), μ = stats[c] (f64).
template <typename T>
__device__ void bwd_reduce_cf(const T* __restrict__ x, const T* __restrict__ dy,
                              const double* __restrict__ stats, u32 C, u32 I, u32 mI, u32 sI,
                              u32 PC, u32 chunk, double* __restrict__ part) {
    u32 c = blockIdx.x, s = blockIdx.y;
    double mu = stats[c];
    u32 j0 = s * chunk;
    u32 j1 = min(PC, j0 + chunk);
    double s1 = 0.0, s2 = 0.0;
#pragma unroll 4
    for (u32 j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
        u32 o = fdiv(j, mI, sI);
        u32 i = j - o * I;
        u64 a = ((u64)o * C + c) * I + i;
        double g = (double)ld(dy, a);
        s1 += g;
        s2 = fma(g, (double)ld(x, a) - mu, s2);
    }
    block_sum2(s1, s2);
    if (threadIdx.x == 0) {
        u64 p = ((u64)s * C + c) * 2u;
        part[p] = s1;
        part[p + 1] = s2;
    }
}

template <typename T>
__device__ void bwd_reduce_cl(const T* __restrict__ x, const T* __restrict__ dy,
                              const double* __restrict__ stats, u32 O, u32 C, u32 rows,
                              double* __restrict__ part) {
    u32 c = blockIdx.x * blockDim.x + threadIdx.x, s = blockIdx.y;
    u32 r0 = s * rows;
    u32 r1 = min(O, r0 + rows);
    double s1 = 0.0, s2 = 0.0;
    if (c < C) {
        double mu = stats[c];
#pragma unroll 4
        for (u32 r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
            u64 a = (u64)r * C + c;
            double g = (double)ld(dy, a);
            s1 += g;
            s2 = fma(g, (double)ld(x, a) - mu, s2);
        }
    }
    tile_sum2(s1, s2);
    if (threadIdx.y == 0 && c < C) {
        u64 p = ((u64)s * C + c) * 2u;
        part[p] = s1;
        part[p + 1] = s2;
    }
}

// dx = a·dy + b·(x − μ) + k, bcoef = [a, b, k, 0], centre from coef = [hi, lo, ...].
template <typename T>
__device__ void bwd_dx(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                       u32 len, u32 mI, u32 sI, u32 C, u32 mC, u32 sC,
                       const float* __restrict__ coef, const float* __restrict__ bcoef) {
    u32 stride = gridDim.x * blockDim.x;
    for (u32 idx = blockIdx.x * blockDim.x + threadIdx.x; idx < len; idx += stride) {
        u32 q = fdiv(idx, mI, sI);
        u32 c = q - fdiv(q, mC, sC) * C;
        const float* k = coef + 4u * c;
        const float* b = bcoef + 4u * c;
        float d = (ld(x, idx) - k[0]) - k[1];
        st(dx, idx, fmaf(b[0], ld(dy, idx), fmaf(b[1], d, b[2])));
    }
}

__device__ __forceinline__ void write_coef(float* coef, u32 c, double mean, double scale,
                                           double shift) {
    float hi = (float)mean;
    float lo = (float)(mean - (double)hi);
    coef[4u * c] = hi;
    coef[4u * c + 1] = lo;
    coef[4u * c + 2] = (float)scale;
    coef[4u * c + 3] = (float)shift;
}

// ---- per-channel kernels (one thread per channel, splits merged in index order)
// stats = [mean | biased var | invstd], each C long.
extern "C" __global__ void bn_finalize_train(u32 C, u32 S, double N,
        const double* __restrict__ part, const double* __restrict__ shift,
        const double* __restrict__ gamma, const double* __restrict__ beta, double eps,
        double* __restrict__ stats, float* __restrict__ coef) {
    u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double s1 = 0.0, s2 = 0.0;
    for (u32 s = 0; s < S; ++s) {
        u64 p = ((u64)s * C + c) * 2u;
        s1 += part[p];
        s2 += part[p + 1];
    }
    double d = s1 / N;
    double mean = shift[c] + d;
    double m2 = s2 - s1 * d;
    if (m2 < 0.0) m2 = 0.0;
    double var = m2 / N;
    double invstd = 1.0 / sqrt(var + eps);
    stats[c] = mean;
    stats[C + c] = var;
    stats[2u * C + c] = invstd;
    write_coef(coef, c, mean, gamma[c] * invstd, beta[c]);
}

extern "C" __global__ void bn_coef_running(u32 C, const double* __restrict__ rmean,
        const double* __restrict__ rvar, const double* __restrict__ gamma,
        const double* __restrict__ beta, double eps, double* __restrict__ stats,
        float* __restrict__ coef) {
    u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double invstd = 1.0 / sqrt(rvar[c] + eps);
    stats[c] = rmean[c];
    stats[C + c] = rvar[c];
    stats[2u * C + c] = invstd;
    write_coef(coef, c, rmean[c], gamma[c] * invstd, beta[c]);
}

// Mirrors bnorm's running.rs for plain batch norm: blend with the new-batch weight a of
// the convention (Momentum::new_weight; the zero-debiased decay included). Non-finite
// channels are skipped and flagged.
extern "C" __global__ void bn_running_update(u32 C, double N, const double* __restrict__ stats,
        double* __restrict__ rmean, double* __restrict__ rvar, double a, int unbiased,
        int* __restrict__ skipped) {
    u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double mean = stats[c], biased = stats[C + c];
    // x − x is 0 exactly when x is finite (no header or math builtin needed)
    int finite = (mean - mean == 0.0) && (biased - biased == 0.0);
    skipped[c] = !finite;
    if (!finite) return;
    double var = unbiased ? biased * N / (N - 1.0) : biased;
    if (a == 1.0) {
        rmean[c] = mean;
        rvar[c] = var;
    } else {
        rmean[c] = (1.0 - a) * rmean[c] + a * mean;
        rvar[c] = (1.0 - a) * rvar[c] + a * var;
    }
}

// grads = [dweight | dbias]; bcoef = [a, b, k, 0] per channel (backward.rs::coefficients).
extern "C" __global__ void bn_bwd_finalize(u32 C, u32 S, double N,
        const double* __restrict__ part, const double* __restrict__ stats,
        const double* __restrict__ gamma, int batch, double* __restrict__ grads,
        float* __restrict__ bcoef) {
    u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double sdy = 0.0, sdyxc = 0.0;
    for (u32 s = 0; s < S; ++s) {
        u64 p = ((u64)s * C + c) * 2u;
        sdy += part[p];
        sdyxc += part[p + 1];
    }
    double invstd = stats[2u * C + c];
    double dot_xhat = sdyxc * invstd;
    grads[c] = dot_xhat;
    grads[C + c] = sdy;
    double gain = gamma[c];
    double a = gain * invstd, b = 0.0, k = 0.0;
    if (batch) {
        b = -gain * invstd * invstd * dot_xhat / N;
        k = -gain * invstd * sdy / N;
    }
    bcoef[4u * c] = (float)a;
    bcoef[4u * c + 1] = (float)b;
    bcoef[4u * c + 2] = (float)k;
    bcoef[4u * c + 3] = 0.0f;
}
"#;

const TYPED_WRAPPERS: &str = r#"
extern "C" __global__ void __launch_bounds__(256) bn_stats_cf_$S(const $T* x, u32 C, u32 I,
        u32 mI, u32 sI, u32 PC, u32 chunk, double* part, double* shift) {
    stats_cf<$T>(x, C, I, mI, sI, PC, chunk, part, shift);
}
extern "C" __global__ void __launch_bounds__(256) bn_stats_cl_$S(const $T* x, u32 O, u32 C,
        u32 rows, double* part, double* shift) {
    stats_cl<$T>(x, O, C, rows, part, shift);
}
extern "C" __global__ void __launch_bounds__(256) bn_norm_$S(const $T* x, $T* y, u32 len,
        u32 mI, u32 sI, u32 C, u32 mC, u32 sC, const float* coef) {
    norm<$T>(x, y, len, mI, sI, C, mC, sC, coef);
}
extern "C" __global__ void __launch_bounds__(256) bn_bwd_reduce_cf_$S(const $T* x,
        const $T* dy, const double* stats, u32 C, u32 I, u32 mI, u32 sI, u32 PC, u32 chunk,
        double* part) {
    bwd_reduce_cf<$T>(x, dy, stats, C, I, mI, sI, PC, chunk, part);
}
extern "C" __global__ void __launch_bounds__(256) bn_bwd_reduce_cl_$S(const $T* x,
        const $T* dy, const double* stats, u32 O, u32 C, u32 rows, double* part) {
    bwd_reduce_cl<$T>(x, dy, stats, O, C, rows, part);
}
extern "C" __global__ void __launch_bounds__(256) bn_bwd_dx_$S(const $T* x, const $T* dy,
        $T* dx, u32 len, u32 mI, u32 sI, u32 C, u32 mC, u32 sC, const float* coef,
        const float* bcoef) {
    bwd_dx<$T>(x, dy, dx, len, mI, sI, C, mC, sC, coef, bcoef);
}
"#;

/// The complete CUDA C source compiled by NVRTC: the common part and one set of wrappers
/// per element type.
pub fn source() -> String {
    let mut s = String::from(COMMON);
    for d in DTypeTag::ALL {
        s.push_str(
            &TYPED_WRAPPERS
                .replace("$T", d.c_type())
                .replace("$S", d.suffix()),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_defines_every_entry_point_the_rust_side_launches() {
        let src = source();
        for name in entry_points() {
            let decl = format!(" {name}(");
            let n = src.matches(&decl).count();
            assert_eq!(n, 1, "{name} declared {n} times");
            assert!(
                src.contains(&format!("__global__ void {name}("))
                    || src.contains(&format!("__launch_bounds__(256) {name}(")),
                "{name} is not a kernel"
            );
        }
        // The wrappers leave no placeholder behind.
        assert!(!src.contains("$T") && !src.contains("$S"));
        // Launch bounds match the block sizes the host uses.
        assert_eq!(BLOCK, 256);
        assert_eq!(CL_TILE.0 * CL_TILE.1, 256);
    }

    #[test]
    fn source_needs_no_header() {
        assert!(!source().contains("#include"));
    }

    #[test]
    fn braces_balance() {
        // Comments may hold interval notation like [a, b); count code only.
        let src: String = source()
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let open = src.matches('{').count();
        let close = src.matches('}').count();
        assert_eq!(open, close);
        assert_eq!(src.matches('(').count(), src.matches(')').count());
    }
}
