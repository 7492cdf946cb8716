//! The row epilogue of merging a LoRA adapter (`--as model`): θ2 = w + c·(s·d) for θ0's
//! elements `w` and their rank-r sums `d` (f64), rounded once to θ0's format, and the
//! rule for θ0's non-finite elements.
//!
//! [`epilogue`] (in `kernel/lora_ref.rs`) is the portable reference. [`FastEpilogue`] is a hand-written version for
//! one format and level (AVX-512 for bf16 and f16, in [`super::avx512`]), chosen from a
//! [`Level`] so that holding one proves the CPU runs it. The products before the epilogue
//! and the row blocking are `adapter/rows.rs`'s, compiled per level by `per_level!`
//! (`kernel/isa.rs`).

use super::Level;
use crate::dtype::FloatDtype;

pub(crate) use super::lora_ref::{epilogue, keep_nonfinite_base};

/// A hand-written row epilogue: `out[j] = round(w[j] + c·(s·d[j]))` in θ0's format;
/// returns how many outputs are ±inf or NaN.
#[cfg(target_arch = "x86_64")]
type Kernel = unsafe fn(c: f64, s: f64, w: &[u8], d: &[f64], out: &mut [u8]) -> u64;

/// A hand-written [`epilogue`] this CPU runs, for one format: made only by
/// [`FastEpilogue::new`] from a [`Level`], so code holding one may call it.
#[derive(Clone, Copy)]
pub(crate) struct FastEpilogue(#[cfg(target_arch = "x86_64")] Kernel);

impl FastEpilogue {
    /// The hand-written epilogue for θ0's format `dtype` on `level`, if there is one (bf16
    /// and f16 on the AVX-512 levels; the portable loop vectorizes well for f32 and f64).
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn new(level: Level, dtype: FloatDtype) -> Option<FastEpilogue> {
        use super::{avx512, Isa};
        if !level.has_avx512() {
            return None;
        }
        let kernel: Kernel = match (dtype, level.isa()) {
            (FloatDtype::BF16, Isa::Avx512Bf16) => avx512::lora_bf16_native,
            (FloatDtype::BF16, _) => avx512::lora_bf16,
            (FloatDtype::F16, _) => avx512::lora_f16,
            _ => return None,
        };
        Some(FastEpilogue(kernel))
    }

    /// No hand-written epilogues for this architecture.
    #[cfg(not(target_arch = "x86_64"))]
    pub(crate) fn new(_level: Level, _dtype: FloatDtype) -> Option<FastEpilogue> {
        None
    }

    /// Runs the epilogue on one row (see [`epilogue`]).
    #[inline(always)]
    pub(crate) fn run(self, c: f64, s: f64, w: &[u8], d: &[f64], out: &mut [u8]) -> u64 {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: a FastEpilogue is only made by `new`, which picks an AVX-512
            // function only for a Level proving AVX-512 (F, BW, VL, DQ, F16C, POPCNT), and
            // the AVX512_BF16 one only for Avx512Bf16: every feature the function enables.
            // The functions take slices and stay within them.
            unsafe { (self.0)(c, s, w, d, out) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (c, s, w, d, out);
            unreachable!("no FastEpilogue is made on this architecture")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::{Bf16, Elem, F16};

    use crate::kernel::testing::{some_bits, Rng};

    /// The value added to θ0 for `w`: often exactly half a unit in θ0's last place
    /// (a tie) or just beside it, often tiny (f32-subnormal results), sometimes huge,
    /// infinite or NaN.
    fn some_delta(rng: &mut Rng, w: f64, mantissa: u32, min_exponent: i32) -> f64 {
        // Half the spacing of θ0's format at w (subnormals have the smallest spacing).
        let exponent = if w.is_finite() && w != 0.0 {
            w.abs().log2().floor() as i32
        } else {
            min_exponent
        };
        let half_ulp = 2f64.powi(exponent.max(min_exponent) - mantissa as i32 - 1);
        let sign = if rng.below(2) == 0 { 1.0 } else { -1.0 };
        match rng.below(9) {
            0 | 1 => sign * half_ulp,
            2 => sign * half_ulp * (1.0 + 2f64.powi(-40)),
            3 => sign * half_ulp * (1.0 - 2f64.powi(-40)),
            4 => sign * 2f64.powi(-(rng.below(30) as i32) - 120) * (1.0 + rng.below(1000) as f64),
            5 => sign * 2f64.powi(rng.below(300) as i32),
            6 => [f64::INFINITY, f64::NEG_INFINITY, f64::NAN][rng.below(3) as usize],
            _ => sign * f64::from_bits(0x3c00_0000_0000_0000 | (rng.next() >> 12)),
        }
    }

    fn load(d: FloatDtype, b: &[u8]) -> f64 {
        match d {
            FloatDtype::BF16 => Bf16::load(b),
            _ => F16::load(b),
        }
    }

    /// Every hand-written epilogue gives the portable loop's bits and non-finite count,
    /// on ties, near-ties, f32-subnormal results, overflow and non-finite inputs, at every
    /// length (the tails included). The epilogues are the ones [`FastEpilogue::new`] picks
    /// on each level this CPU runs.
    #[test]
    fn fast_epilogues_match_the_portable_loop() {
        let mut fast: Vec<(FloatDtype, String, FastEpilogue)> = Vec::new();
        for level in Level::available() {
            for d in [FloatDtype::BF16, FloatDtype::F16] {
                if let Some(f) = FastEpilogue::new(level, d) {
                    fast.push((d, format!("{} {d}", level.name()), f));
                }
            }
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for (d, name, f) in fast {
            // Significand bits and the smallest normal exponent of the format.
            let (mantissa, min_exponent) = if d == FloatDtype::BF16 {
                (7, -126)
            } else {
                (10, -14)
            };
            for round in 0..400 {
                let n = if round < 40 {
                    round
                } else {
                    16 * 64 + round % 17
                };
                let mut w = vec![0u8; n * 2];
                let mut delta = vec![0.0; n];
                for j in 0..n {
                    let bits = some_bits(&mut rng, d) as u16;
                    w[2 * j..2 * j + 2].copy_from_slice(&bits.to_le_bytes());
                    delta[j] = some_delta(
                        &mut rng,
                        load(d, &w[2 * j..2 * j + 2]),
                        mantissa,
                        min_exponent,
                    );
                }
                // c·(s·d) = d exactly for the ties; other rounds scale it.
                let (c, s) = if round % 2 == 0 {
                    (1.0, 1.0)
                } else {
                    (1.3, 0.37)
                };
                let (mut want, mut got) = (vec![0u8; n * 2], vec![0u8; n * 2]);
                let want_nf = match d {
                    FloatDtype::BF16 => epilogue::<Bf16>(c, s, &w, &delta, &mut want),
                    _ => epilogue::<F16>(c, s, &w, &delta, &mut want),
                };
                let got_nf = f.run(c, s, &w, &delta, &mut got);
                assert_eq!(got_nf, want_nf, "{name}: non-finite count, n = {n}");
                // Where θ0 is NaN and so is d, the NaN's payload is not defined; the
                // fix-up every version shares gives θ0's bits there.
                let (want_new, got_new) = match d {
                    FloatDtype::BF16 => (
                        keep_nonfinite_base::<Bf16>(&w, &mut want),
                        keep_nonfinite_base::<Bf16>(&w, &mut got),
                    ),
                    _ => (
                        keep_nonfinite_base::<F16>(&w, &mut want),
                        keep_nonfinite_base::<F16>(&w, &mut got),
                    ),
                };
                assert_eq!(got_new, want_new);
                for j in 0..n {
                    assert_eq!(
                        got[2 * j..2 * j + 2],
                        want[2 * j..2 * j + 2],
                        "{name}: element {j} of {n}: w = {:?}, d = {:e}",
                        &w[2 * j..2 * j + 2],
                        delta[j]
                    );
                }
            }
        }
    }

    /// The portable epilogue rounds exactly: a tie goes to the even neighbour, a value
    /// just beside it to the nearer one (checked against neighbours found by bits).
    #[test]
    fn portable_epilogue_rounds_ties_to_even() {
        // 1 + 2⁻⁸ lies halfway between bf16 1 (even) and 1 + 2⁻⁷ (odd).
        let one = 0x3f80u16.to_le_bytes();
        for (delta, want) in [
            (2f64.powi(-8), 0x3f80u16),
            (2f64.powi(-8) * (1.0 + 1e-12), 0x3f81),
            (3.0 * 2f64.powi(-8), 0x3f82), // 1 + 3·2⁻⁸: halfway between 0x3f81 and 0x3f82
            (-(2f64.powi(-9)), 0x3f80),    // 1 − 2⁻⁹: halfway below 1, to the even 1
        ] {
            let mut out = [0u8; 2];
            assert_eq!(epilogue::<Bf16>(1.0, 1.0, &one, &[delta], &mut out), 0);
            assert_eq!(u16::from_le_bytes(out), want, "1 + {delta:e}");
        }
    }
}
