//! Exact conversions between the float formats, on the bits.
//!
//! Widening (bf16/f16/f32 → f64) is exact. Narrowing from f64 rounds once, to nearest with
//! ties to even, keeping subnormals, overflowing to ±inf and keeping NaN a NaN. f64 → bf16
//! and f64 → f16 go through f32 with *round-to-odd*: an f32 result that is inexact gets its
//! last bit forced to 1, so the second rounding (to bf16 or f16, which have at least two
//! fewer significand bits everywhere in their range) can never land on a false tie. This is
//! the classic way to avoid double rounding (Boldo & Melquiond, "When double rounding is
//! odd"), and every step is branch-free so the hot loops vectorize.

/// f64 → f32, round to nearest even (the IEEE conversion Rust's `as` performs).
#[inline(always)]
pub fn f64_to_f32(x: f64) -> u32 {
    (x as f32).to_bits()
}

/// f64 → f32 with round-to-odd: truncate toward zero, then set the last bit if inexact.
#[inline(always)]
pub fn f64_to_f32_round_odd(x: f64) -> u32 {
    let r = x as f32;
    let back = r as f64;
    // RNE rounded away from zero: step one ulp back toward zero (sign-magnitude bits).
    let away = (back.abs() > x.abs()) as u32;
    // NaN compares unequal to itself, so its bits get |1 and it stays a NaN.
    let inexact = (back != x) as u32;
    (r.to_bits().wrapping_sub(away)) | inexact
}

/// f32 bits → bf16 bits, round to nearest even; NaN stays a (quiet) NaN.
#[inline(always)]
pub fn f32_bits_to_bf16(bits: u32) -> u16 {
    let is_nan = (bits & 0x7fff_ffff) > 0x7f80_0000;
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let nan = (bits >> 16) | 0x0040;
    (if is_nan { nan } else { rounded }) as u16
}

/// f32 bits → f16 bits, round to nearest even; NaN stays a (quiet) NaN.
#[inline(always)]
pub fn f32_bits_to_f16(bits: u32) -> u16 {
    const F32_INF: u32 = 0xff << 23;
    // 2^16: the smallest f32 that is at or beyond f16's overflow threshold after rounding
    // is handled by the normal path; from 2^16 up everything is infinite.
    const F16_OVERFLOW: u32 = (127 + 16) << 23;
    // Below 2^-14 the result is subnormal (or zero) in f16.
    const F16_MIN_NORMAL: u32 = 113 << 23;
    // Adding 0.5 moves the value's bits so that the hardware's RNE does the rounding.
    const DENORM_MAGIC: u32 = ((127 - 15) + (23 - 10) + 1) << 23;

    let sign = (bits >> 16) & 0x8000;
    let abs = bits & 0x7fff_ffff;

    let special = if abs > F32_INF {
        0x7e00 | ((abs >> 13) & 0x1ff)
    } else {
        0x7c00
    };
    let sub = (f32::from_bits(abs) + f32::from_bits(DENORM_MAGIC))
        .to_bits()
        .wrapping_sub(DENORM_MAGIC);
    let mant_odd = (abs >> 13) & 1;
    let normal = abs
        .wrapping_add(((15u32.wrapping_sub(127)) << 23).wrapping_add(0xfff))
        .wrapping_add(mant_odd)
        >> 13;
    let out = if abs >= F16_OVERFLOW {
        special
    } else if abs < F16_MIN_NORMAL {
        sub
    } else {
        normal
    };
    (out | sign) as u16
}

/// f64 → bf16, rounded once to nearest even.
#[inline(always)]
pub fn f64_to_bf16(x: f64) -> u16 {
    f32_bits_to_bf16(f64_to_f32_round_odd(x))
}

/// f64 → f16, rounded once to nearest even.
#[inline(always)]
pub fn f64_to_f16(x: f64) -> u16 {
    f32_bits_to_f16(f64_to_f32_round_odd(x))
}

/// bf16 bits → f64, exact.
#[inline(always)]
pub fn bf16_to_f64(h: u16) -> f64 {
    f32::from_bits((h as u32) << 16) as f64
}

/// f16 bits → f64, exact.
#[inline(always)]
pub fn f16_to_f64(h: u16) -> f64 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    // Reinterpreted with f32's bias the exponent is 112 too small; scaling by 2^112 fixes
    // it exactly, for subnormals as well (they become f32 normals).
    let scaled = (f32::from_bits(em << 13) * f32::from_bits((127 + 112) << 23)).to_bits();
    let special = (em << 13) | 0x7f80_0000;
    let bits = if em >= 0x7c00 { special } else { scaled };
    f32::from_bits(bits | sign) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slow, obviously-correct reference: the value of every finite target encoding,
    /// found by decoding its bits with integer arithmetic, and a nearest-even choice
    /// between the two neighbours of `x` made by exact comparisons with their midpoint
    /// (which f64 holds exactly for these small formats).
    struct Format {
        exp_bits: u32,
        man_bits: u32,
    }

    impl Format {
        const BF16: Format = Format {
            exp_bits: 8,
            man_bits: 7,
        };
        const F16: Format = Format {
            exp_bits: 5,
            man_bits: 10,
        };

        fn bias(&self) -> i32 {
            (1 << (self.exp_bits - 1)) - 1
        }
        fn inf_bits(&self) -> u16 {
            (((1u32 << self.exp_bits) - 1) << self.man_bits) as u16
        }
        /// Exact value of a non-negative finite encoding.
        fn value(&self, bits: u16) -> f64 {
            let e = (bits as u32 >> self.man_bits) as i32;
            let m = (bits as u32 & ((1 << self.man_bits) - 1)) as f64;
            let scale = |p: i32| 2f64.powi(p);
            if e == 0 {
                m * scale(1 - self.bias() - self.man_bits as i32)
            } else {
                (m + scale(self.man_bits as i32)) * scale(e - self.bias() - self.man_bits as i32)
            }
        }
        fn round(&self, x: f64) -> u16 {
            assert!(!x.is_nan());
            let sign = if x.is_sign_negative() { 0x8000u16 } else { 0 };
            let a = x.abs();
            let inf = self.inf_bits();
            // Binary search the largest finite encoding <= a.
            let (mut lo, mut hi) = (0u16, inf - 1);
            if a >= self.value(hi) {
                // Past the largest finite: the next "value" is infinity, with the midpoint
                // at max + ulp/2 (IEEE's overflow threshold); ties go to the even one, inf.
                let max = self.value(hi);
                let ulp = max - self.value(hi - 1);
                let mid = max + ulp / 2.0;
                return sign | if a < mid { hi } else { inf };
            }
            while hi - lo > 1 {
                let m = lo + (hi - lo) / 2;
                if self.value(m) <= a {
                    lo = m
                } else {
                    hi = m
                }
            }
            let (vl, vh) = (self.value(lo), self.value(hi));
            let mid = (vl + vh) / 2.0;
            let pick = if a < mid {
                lo
            } else if a > mid {
                hi
            } else if lo % 2 == 0 {
                lo
            } else {
                hi
            };
            sign | pick
        }
    }

    fn probes_between(lo: f64, hi: f64) -> Vec<f64> {
        let mid = (lo + hi) / 2.0;
        let up = |x: f64| f64::from_bits(x.to_bits() + 1);
        let down = |x: f64| f64::from_bits(x.to_bits() - 1);
        let mut v = vec![
            lo,
            mid,
            up(mid),
            down(mid),
            (lo + mid) / 2.0,
            (mid + hi) / 2.0,
        ];
        if lo > 0.0 {
            v.push(down(lo));
            v.push(up(lo));
        }
        v
    }

    fn check_exhaustive(fmt: &Format, narrow: fn(f64) -> u16, widen: fn(u16) -> f64) {
        let inf = fmt.inf_bits();
        let mut checked = 0u64;
        for bits in 0..inf {
            let lo = fmt.value(bits);
            let hi = if bits + 1 == inf {
                lo + (lo - fmt.value(bits - 1))
            } else {
                fmt.value(bits + 1)
            };
            // Widening is exact.
            assert_eq!(widen(bits), lo, "widen {bits:#06x}");
            assert_eq!(widen(bits | 0x8000), -lo, "widen {:#06x}", bits | 0x8000);
            for x in probes_between(lo, hi) {
                for x in [x, -x] {
                    let want = fmt.round(x);
                    let got = narrow(x);
                    assert_eq!(
                        got,
                        want,
                        "x = {x:e} ({:#018x}): got {got:#06x}, want {want:#06x}",
                        x.to_bits()
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 2 * 6 * inf as u64);
        // Specials.
        assert_eq!(narrow(f64::INFINITY), inf);
        assert_eq!(narrow(f64::NEG_INFINITY), inf | 0x8000);
        assert_eq!(narrow(f64::MAX), inf);
        assert_eq!(narrow(-f64::MAX), inf | 0x8000);
        assert_eq!(narrow(0.0), 0);
        assert_eq!(narrow(-0.0), 0x8000);
        assert_eq!(
            narrow(f64::from_bits(1)),
            0,
            "f64 subnormals underflow to +0"
        );
        assert_eq!(narrow(-f64::from_bits(1)), 0x8000);
        assert_eq!(narrow(f64::MIN_POSITIVE), 0);
        for nan in [
            f64::NAN,
            -f64::NAN,
            f64::from_bits(0x7ff0_0000_0000_0001),
            f64::from_bits(0xfff8_0000_0000_1234),
        ] {
            let h = narrow(nan);
            assert!(
                (h & 0x7fff) > inf,
                "NaN {:#x} narrowed to non-NaN {h:#06x}",
                nan.to_bits()
            );
            assert!(widen(h).is_nan());
        }
        assert!(widen(inf).is_infinite());
    }

    #[test]
    fn bf16_narrowing_is_exact_for_every_value() {
        check_exhaustive(&Format::BF16, f64_to_bf16, bf16_to_f64);
    }

    #[test]
    fn f16_narrowing_is_exact_for_every_value() {
        check_exhaustive(&Format::F16, f64_to_f16, f16_to_f64);
    }

    #[test]
    fn widening_agrees_with_the_half_crate() {
        for bits in 0..=u16::MAX {
            let a = bf16_to_f64(bits);
            let b = half::bf16::from_bits(bits).to_f64();
            assert!(a == b || (a.is_nan() && b.is_nan()), "bf16 {bits:#06x}");
            let a = f16_to_f64(bits);
            let b = half::f16::from_bits(bits).to_f64();
            assert!(a == b || (a.is_nan() && b.is_nan()), "f16 {bits:#06x}");
        }
    }

    #[test]
    fn double_rounding_is_avoided() {
        // 1 + 2^-8 + 2^-30: rounding to f32 first lands on the tie 1 + 2^-8, which RNE
        // sends down to 1.0; the exact answer is above the tie, so it rounds up.
        let x = 1.0 + 2f64.powi(-8) + 2f64.powi(-30);
        assert_eq!(
            f32_bits_to_bf16(f64_to_f32(x)),
            0x3f80,
            "the naive path double-rounds"
        );
        assert_eq!(f64_to_bf16(x), 0x3f81);
        let x = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(f64_to_f16(x), 0x3c01);
    }

    #[test]
    fn round_odd_matches_definition_on_samples() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let x = f64::from_bits(state);
            if x.is_nan() {
                continue;
            }
            let r = f32::from_bits(f64_to_f32_round_odd(x));
            let rf = r as f64;
            if rf == x {
                continue;
            }
            // Inexact: r is odd and x lies strictly between r's two (even) neighbours, so r
            // is the odd one of the two f32 values that enclose x.
            assert_eq!(r.to_bits() & 1, 1, "{x:e}");
            let prev = f32::from_bits(r.to_bits() - 1) as f64;
            let next = f32::from_bits(r.to_bits() + 1) as f64;
            assert!(prev.abs() < x.abs(), "{x:e} -> {r:e}");
            assert!(x.abs() < next.abs() || next.is_infinite(), "{x:e} -> {r:e}");
        }
    }
}
