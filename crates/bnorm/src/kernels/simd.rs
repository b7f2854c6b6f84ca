//! Run-time selection of the instruction set, once per process.
//!
//! The inner loops of each kernel file are written once, generically, with independent
//! lanes that the compiler vectorizes. [`dispatch!`] compiles each of them again inside
//! `#[target_feature]` wrappers for AVX2+FMA and AVX-512 (x86-64); the level is detected
//! once and cached. `BNORM_SIMD=scalar|avx2|avx512` caps it (never above what the CPU
//! has), so every path can be tested on a fast machine. All levels give bitwise identical
//! results: lanes are combined in a fixed order and no multiply-add is contracted.

use std::sync::OnceLock;

/// An instruction-set level of the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// The baseline build (SSE2 on x86-64, NEON on aarch64).
    Scalar,
    /// x86-64 AVX2 and FMA.
    Avx2,
    /// x86-64 AVX-512 (F, VL, BW, DQ).
    Avx512,
}

impl SimdLevel {
    /// The levels this CPU supports, lowest first.
    pub fn supported() -> Vec<SimdLevel> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut v = vec![SimdLevel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(SimdLevel::Avx2);
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512dq")
                {
                    v.push(SimdLevel::Avx512);
                }
            }
        }
        v
    }

    /// Name as accepted by `BNORM_SIMD`.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }
}

static LEVEL: OnceLock<SimdLevel> = OnceLock::new();

/// The level the kernels use: the best the CPU supports, capped by `BNORM_SIMD`.
///
/// ```
/// let level = bnorm::tuning::simd_level();
/// assert!(bnorm::tuning::SimdLevel::supported().contains(&level));
/// ```
pub fn simd_level() -> SimdLevel {
    *LEVEL.get_or_init(|| {
        let best = *SimdLevel::supported().last().unwrap_or(&SimdLevel::Scalar);
        match std::env::var("BNORM_SIMD").ok().as_deref() {
            Some("scalar") => SimdLevel::Scalar,
            Some("avx2") => best.min(SimdLevel::Avx2),
            _ => best,
        }
    })
}

thread_local! {
    static FORCED: std::cell::Cell<Option<SimdLevel>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with the kernel calls made on this thread forced to `level` (tests use it to
/// check every path against the reference); a kernel call resolves its level once, at
/// its entry, so the work it spreads over other threads runs at that level too. Levels
/// the CPU lacks fall back to the best it has.
pub fn with_simd_level<R>(level: SimdLevel, f: impl FnOnce() -> R) -> R {
    let level = if SimdLevel::supported().contains(&level) {
        level
    } else {
        simd_level()
    };
    let old = FORCED.with(|c| c.replace(Some(level)));
    let r = f();
    FORCED.with(|c| c.set(old));
    r
}

/// The instruction-set level of one kernel call: resolved once at the call's entry
/// ([`Isa::of_call`], the calling thread's level) and passed down to every inner loop and
/// streaming kernel of the call, on whatever thread they run. A value is proof that the
/// CPU supports its level: it is made only from [`current`], which never returns a level
/// the CPU lacks; the dispatch's `unsafe` calls rest on that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Isa(SimdLevel);

impl Isa {
    /// The level of a kernel call made on this thread.
    #[inline]
    pub(crate) fn of_call() -> Isa {
        Isa(current())
    }

    /// The level.
    #[inline]
    pub(crate) fn level(self) -> SimdLevel {
        self.0
    }
}

/// The level for a call on this thread.
#[inline]
fn current() -> SimdLevel {
    FORCED.with(|c| c.get()).unwrap_or_else(simd_level)
}

/// Compiles the generic inner loops of the calling file, listed with their signatures,
/// for each instruction-set level: `by_level::name(isa, …)`, in a child module of that
/// file, runs the file's `name` compiled for `isa`, the level the kernel call resolved
/// once at its entry ([`Isa::of_call`]). The kernels call the `by_level` wrappers; the
/// generic loops themselves only call one another, inlined into the wrapper's level.
macro_rules! dispatch {
    ($(fn $name:ident<$t:ident>($($arg:ident : $ty:ty),*) $(-> $ret:ty)?;)*) => {
        /// The inner loops of this file compiled for each instruction-set level; each
        /// wrapper runs the level it is given.
        pub(super) mod by_level {
            #[allow(unused_imports)]
            use super::*;
            #[cfg(target_arch = "x86_64")]
            mod avx2 {
                #[allow(unused_imports)]
                use super::*;
                $(
                    #[target_feature(enable = "avx2,fma")]
                    pub(super) unsafe fn $name<$t: Element>($($arg: $ty),*) $(-> $ret)? {
                        super::super::$name::<$t>($($arg),*)
                    }
                )*
            }
            #[cfg(target_arch = "x86_64")]
            mod avx512 {
                #[allow(unused_imports)]
                use super::*;
                $(
                    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                    pub(super) unsafe fn $name<$t: Element>($($arg: $ty),*) $(-> $ret)? {
                        super::super::$name::<$t>($($arg),*)
                    }
                )*
            }
            $(
                #[inline]
                pub(crate) fn $name<$t: Element>(
                    isa: $crate::kernels::simd::Isa,
                    $($arg: $ty),*
                ) $(-> $ret)? {
                    match isa.level() {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: an `Isa` of level Avx2 exists only when the CPU reports
                        // AVX2 and FMA.
                        $crate::kernels::simd::SimdLevel::Avx2 => unsafe { avx2::$name::<$t>($($arg),*) },
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: an `Isa` of level Avx512 exists only when the CPU reports
                        // AVX-512 F/VL/BW/DQ, AVX2 and FMA.
                        $crate::kernels::simd::SimdLevel::Avx512 => unsafe { avx512::$name::<$t>($($arg),*) },
                        _ => super::$name::<$t>($($arg),*),
                    }
                }
            )*
        }
    };
}

pub(crate) use dispatch;
