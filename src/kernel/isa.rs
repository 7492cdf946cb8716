//! The one dispatch: which instruction sets this CPU runs, detected once, and the only
//! code that turns that knowledge into calls of functions compiled for them.
//!
//! [`Isa`] names a level (portable, AVX2/F16C, AVX-512, AVX-512 with BF16); it is only a
//! name, anyone can write one. [`Level`] is the proof: a level this CPU was checked to run,
//! made only by the detection here, so code holding a `Level` may call what was compiled for
//! it without checking again. Every ISA-specific entry point of the crate takes a `Level`:
//! the extrapolation kernel, the `expo diff` sums (`stats/sums.rs`), the LoRA row products
//! and epilogues (`adapter/rows.rs`, `kernel/lora.rs`).
//!
//! Portable loops, in `kernel/` or outside it, are compiled for a level by the
//! `per_level!` macro defined here: given an `#[inline(always)]` body it writes the
//! function that takes a `Level` and calls that body compiled with the level's features,
//! so the whole loop is inlined there and vectorized for it. The loop's arithmetic stays
//! where its rules are (blocking, order of operations); the feature list of each level is
//! written only here. Hand-written intrinsics, with their own `#[target_feature]`s, are in
//! `kernel/avx512.rs`, reached only through safe functions that take a `Level`.

use std::sync::OnceLock;

/// An instruction-set level kernels can be compiled for: a name, not a proof that the CPU
/// has it (see [`Level`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, whatever the build targets.
    Portable,
    /// AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 F, BW, VL and DQ, with AVX2, F16C, FMA and POPCNT.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX-512 with the BF16 conversions (only the bf16 kernels differ).
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16,
}

impl Isa {
    /// Every level this build knows, best last.
    #[cfg(target_arch = "x86_64")]
    const ALL: [Isa; 4] = [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16];
    #[cfg(not(target_arch = "x86_64"))]
    const ALL: [Isa; 1] = [Isa::Portable];

    /// True when this CPU runs code compiled for `self`.
    pub fn supported(self) -> bool {
        Level::of(self).is_some()
    }

    /// A short name for messages and benchmarks.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => "avx512-bf16",
        }
    }

    /// Asks the CPU. The only place that does; [`Level::available`] keeps the answer.
    fn detect(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.detect()
                    && std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512dq")
                    && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("popcnt")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => Isa::Avx512.detect() && std::is_x86_feature_detected!("avx512bf16"),
        }
    }
}

/// A level this CPU runs: the proof token every ISA-specific function takes. The field is
/// private and the only constructors consult the detection, so holding one means the CPU
/// has every feature its [`Isa`] stands for (the `SAFETY` comments that call
/// `#[target_feature]` code rely on exactly that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level(Isa);

impl Level {
    /// Every level this CPU runs, best last (detected on first use).
    pub fn available() -> Vec<Level> {
        Level::detected().to_vec()
    }

    /// The best level of this CPU.
    pub fn best() -> Level {
        *Level::detected()
            .last()
            .expect("portable is always available")
    }

    /// Plain Rust: runs everywhere, the reference the other levels must match bit for bit.
    pub fn portable() -> Level {
        Level(Isa::Portable)
    }

    /// `isa` if this CPU runs it.
    pub fn of(isa: Isa) -> Option<Level> {
        Level::detected().iter().copied().find(|l| l.0 == isa)
    }

    /// Which level this is.
    pub fn isa(self) -> Isa {
        self.0
    }

    /// A short name for messages and benchmarks.
    pub fn name(self) -> &'static str {
        self.0.name()
    }

    fn detected() -> &'static [Level] {
        static LEVELS: OnceLock<Vec<Level>> = OnceLock::new();
        LEVELS.get_or_init(|| {
            Isa::ALL
                .into_iter()
                .filter(|i| i.detect())
                .map(Level)
                .collect()
        })
    }

    /// True for the AVX-512 levels, whose hand-written kernels (`kernel/avx512.rs`) this
    /// CPU therefore runs.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn has_avx512(self) -> bool {
        matches!(self.0, Isa::Avx512 | Isa::Avx512Bf16)
    }
}

/// Defines `fn NAME(level: Level, ARGS…) -> RET` that runs the portable function `BODY`
/// (which should be `#[inline(always)]`) compiled for `level`: it expands one copy of
/// `BODY` per level, each in a function built with that level's features, and calls the
/// one for `level`. AVX-512 with BF16 runs the AVX-512 copy (the conversions it adds are
/// only used by hand-written kernels).
///
/// The features per level are written here and nowhere else, and match what
/// [`Isa::detect`] checks. The copies call `BODY` by name rather than through a generic
/// parameter, so that the compiler inlines it into each copy before optimizing, and the
/// loops are unrolled and vectorized for the level (called through a trait method, the
/// `expo diff` loop lost its vectorization: 3–5 times slower on AVX-512).
///
/// ```ignore
/// per_level! {
///     /// Docs of the dispatching function.
///     fn sums_with(s: &mut DeltaSums, a: &[f64], b: &[f64]) -> () = sums_body;
/// }
/// ```
macro_rules! per_level {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty = $body:path;
    ) => {
        $(#[$meta])*
        $vis fn $name(level: $crate::kernel::Level, $($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            mod versions {
                #[allow(unused_imports)]
                use super::*;
                /// # Safety
                /// The CPU must support AVX2 and F16C.
                #[target_feature(enable = "avx2,f16c")]
                pub(super) unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                /// # Safety
                /// The CPU must support AVX-512 F, BW, VL and DQ, AVX2 and F16C.
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")]
                pub(super) unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
            }
            match level.isa() {
                $crate::kernel::Isa::Portable => $body($($arg),*),
                // SAFETY: a Level is only made from the detection, which found AVX2 and
                // F16C for Avx2 and every higher level (`Isa::detect`): the features
                // `avx2` enables.
                #[cfg(target_arch = "x86_64")]
                $crate::kernel::Isa::Avx2 => unsafe { versions::avx2($($arg),*) },
                // SAFETY: the AVX-512 levels were detected with AVX-512 F, BW, VL and DQ,
                // AVX2 and F16C: the features `avx512` enables.
                #[cfg(target_arch = "x86_64")]
                $crate::kernel::Isa::Avx512 | $crate::kernel::Isa::Avx512Bf16 => unsafe {
                    versions::avx512($($arg),*)
                },
            }
        }
    };
}

pub(crate) use per_level;
