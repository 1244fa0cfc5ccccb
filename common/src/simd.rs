//! The instruction sets the CPU kernels are compiled for, chosen once at run time.
//!
//! The release binaries target baseline x86-64 (SSE2), so that they run on any x86-64 machine.
//! The kernels that matter (the models' elementwise passes, im2col, pooling, the optimiser,
//! the finiteness check) are compiled three times: for AVX-512 (F, BW, DQ, VL), for AVX2
//! with FMA, and for the baseline, and [`Isa::current`] picks the best one the CPU has (on
//! other architectures only the portable one exists). The matrix products are `gemm`'s,
//! which makes the same choice itself.
//!
//! Every copy runs the same operations in the same order: Rust never fuses a multiply and an
//! add, and the kernels keep reductions in a fixed order, so all of them give the same bits.
//! That is what lets ring members on different CPUs apply the same update to the same
//! parameters and stay identical; each kernel's tests compare every path the machine has
//! against the portable one, exactly.
//!
//! `LOCKSTEP_SIMD=avx2` (or `portable`) caps the choice, to measure or test a lesser path on a
//! better CPU; a value above what the CPU has changes nothing.

use std::sync::OnceLock;

/// The environment variable that caps the instruction set the kernels use.
pub const SIMD_ENV: &str = "LOCKSTEP_SIMD";

/// An instruction set the kernels have a compiled copy for, from the least to the best.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Whatever the target compiles for without extra features (SSE2 on x86-64, NEON on
    /// aarch64).
    Portable,
    /// AVX2 and FMA (x86-64-v3).
    Avx2,
    /// AVX-512 F, BW, DQ and VL (x86-64-v4).
    Avx512,
}

impl Isa {
    /// Every instruction set, from the least to the best.
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

    /// The name used by [`SIMD_ENV`] and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the copies compiled for `self`.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_supported()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every instruction set this CPU supports, from the least to the best: what tests compare.
    pub fn supported() -> Vec<Isa> {
        Isa::ALL
            .into_iter()
            .filter(|isa| isa.is_supported())
            .collect()
    }

    /// The instruction set the kernels use in this process: the best the CPU supports, capped by
    /// [`SIMD_ENV`]. Decided on the first call.
    pub fn current() -> Isa {
        static CURRENT: OnceLock<Isa> = OnceLock::new();
        *CURRENT.get_or_init(|| {
            let cap = std::env::var(SIMD_ENV)
                .ok()
                .and_then(|value| Isa::ALL.into_iter().find(|isa| isa.name() == value))
                .unwrap_or(Isa::Avx512);
            Isa::ALL
                .into_iter()
                .rev()
                .find(|isa| *isa <= cap && isa.is_supported())
                .unwrap_or(Isa::Portable)
        })
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Defines `fn NAME(isa: Isa, ARGS) -> RET` that runs `BODY` compiled for `isa`: the body is
/// written once, as a plain loop the compiler vectorises, and inlined into one copy per
/// instruction set. `isa` must be supported by the CPU (see [`Isa::is_supported`]); callers
/// pass [`Isa::current`], tests every supported one.
///
/// ```ignore
/// multiversion! {
///     /// Doubles every element.
///     pub(crate) fn double(xs: &mut [f32]) {
///         for x in xs { *x *= 2.0 }
///     }
/// }
/// ```
macro_rules! multiversion {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$meta])*
        $vis fn $name(isa: $crate::simd::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            fn avx512($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            match isa {
                #[cfg(target_arch = "x86_64")]
                $crate::simd::Isa::Avx512 => {
                    debug_assert!(isa.is_supported());
                    // SAFETY: callers pass only instruction sets the CPU supports.
                    unsafe { avx512($($arg),*) }
                }
                #[cfg(target_arch = "x86_64")]
                $crate::simd::Isa::Avx2 => {
                    debug_assert!(isa.is_supported());
                    // SAFETY: as above.
                    unsafe { avx2($($arg),*) }
                }
                _ => body($($arg),*),
            }
        }
    };
}

pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_set_is_supported_and_portable_always_is() {
        assert!(Isa::current().is_supported());
        assert!(Isa::Portable.is_supported());
        assert_eq!(Isa::supported()[0], Isa::Portable);
        // The sets nest: a CPU with AVX-512 has AVX2.
        let supported = Isa::supported();
        assert!(supported.iter().zip(Isa::ALL).all(|(a, b)| *a == b));
    }

    multiversion! {
        /// A reduction in a fixed order: every copy must give the same bits.
        fn dot(xs: &[f32], ys: &[f32]) -> f32 {
            xs.iter().zip(ys).fold(0.0, |acc, (x, y)| acc + x * y)
        }
    }

    #[test]
    fn every_copy_gives_the_same_bits() {
        let xs: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.37).sin()).collect();
        let ys: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.11).cos()).collect();
        let portable = dot(Isa::Portable, &xs, &ys).to_bits();
        for isa in Isa::supported() {
            assert_eq!(dot(isa, &xs, &ys).to_bits(), portable, "{isa}");
        }
    }
}
