//! Hand-written AVX-512 kernels for one format in and out (bf16, f16, f32, f64): the hot
//! cases. They also accumulate the sums of squares for the relative change in registers,
//! which the compiler will not do in the portable loop without giving up vectorization.
//!
//! They compute exactly what the portable loop computes — widen exactly, subtract, multiply,
//! add in f64, round once — with shortcuts the instruction set offers:
//! - f64 → f32 round to odd (the step that makes the final rounding to bf16/f16 exact):
//!   a conversion with embedded round-toward-zero (`{rz-sae}`), after ORing the sticky bit
//!   (any bit below the f32 significand set) into the last bit an f32 keeps. That is right
//!   wherever the f32 result is normal; where it is subnormal, bf16 redoes the block
//!   exactly (compare back and fix the last bit) and f16 does not need to (see [`f16`]).
//! - bf16 is processed as even and odd elements, split and merged with shifts rather than
//!   shuffles; its final rounding is integer arithmetic, or with AVX512_BF16
//!   ([`bf16_native`]) one `vcvtne2ps2bf16` per 32 elements.
//! - f16 conversions use the F16C instructions.
//!
//! All give the same bits and non-finite counts as the portable code; the kernel tests
//! compare them on every format, on arbitrary bit patterns (NaNs included) and, for bf16
//! and f16, on values next to rounding ties, subnormal ones included.

use std::arch::x86_64::*;

use super::{ChunkStats, Isa, KernelSpec, Level};
use crate::dtype::FloatDtype;

/// Elements per iteration: one 512-bit vector of f32 lanes.
const LANES: usize = 16;

/// Widens 16 f32 lanes to two vectors of 8 f64 lanes.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ.
#[inline(always)]
unsafe fn widen(x: __m512) -> (__m512d, __m512d) {
    // SAFETY: the intrinsics here only compute on registers (no memory is read or written),
    // and the caller guarantees the CPU has AVX-512 F, BW, VL and DQ (see # Safety)
    unsafe {
        (
            _mm512_cvtps_pd(_mm512_castps512_ps256(x)),
            _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(x)),
        )
    }
}

/// Partial sums of squares, Σ(θ1 − θ0)² and Σθ0², one per f64 lane.
struct Sums {
    dd: __m512d,
    bb: __m512d,
}

impl Sums {
    /// # Safety
    /// The CPU must support AVX-512 F, BW, VL and DQ.
    #[inline(always)]
    unsafe fn new() -> Sums {
        // SAFETY: the intrinsics here only compute on registers (no memory is read or
        // written), and the caller guarantees the CPU has AVX-512 F, BW, VL and DQ (see #
        // Safety)
        unsafe {
            Sums {
                dd: _mm512_setzero_pd(),
                bb: _mm512_setzero_pd(),
            }
        }
    }

    /// Adds the accumulators, then the lanes pairwise, as the portable loop's `sum_lanes`
    /// does (the sums differ from the portable ones in the last bits).
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, BW, VL and DQ.
    #[inline(always)]
    unsafe fn total(sums: &[Sums; 2], field: impl Fn(&Sums) -> __m512d) -> f64 {
        // SAFETY: the only memory access stores one vector of 8 f64 into `a`, a local array
        // of 8 f64; the other intrinsics compute on registers, and the caller guarantees
        // the CPU has AVX-512 F, BW, VL and DQ (see # Safety)
        unsafe {
            let mut v = _mm512_setzero_pd();
            for s in sums {
                v = _mm512_add_pd(v, field(s));
            }
            let mut a = [0f64; 8];
            _mm512_storeu_pd(a.as_mut_ptr(), v);
            super::sum_lanes(a)
        }
    }
}

/// θ1 + α(θ1 − θ0) on 8 f64 lanes (subtract, multiply, add), adding to the sums.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ.
#[inline(always)]
unsafe fn extrapolate_lanes(alpha: __m512d, t0: __m512d, t1: __m512d, sums: &mut Sums) -> __m512d {
    // SAFETY: the intrinsics here only compute on registers (no memory is read or written),
    // and the caller guarantees the CPU has AVX-512 F, BW, VL and DQ (see # Safety)
    unsafe {
        let delta = _mm512_sub_pd(t1, t0);
        // The statistics may use fused multiply-adds (they are not part of the output, whose
        // arithmetic is exactly subtract, multiply, add).
        sums.dd = _mm512_fmadd_pd(delta, delta, sums.dd);
        sums.bb = _mm512_fmadd_pd(t0, t0, sums.bb);
        _mm512_add_pd(t1, _mm512_mul_pd(alpha, delta))
    }
}

/// θ1 + α(θ1 − θ0) on 8 f64 lanes, rounded to f32 with round-to-odd.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ.
#[inline(always)]
unsafe fn extrapolate_round_odd(
    alpha: __m512d,
    t0: __m512d,
    t1: __m512d,
    sums: &mut Sums,
) -> (__m256, __mmask8) {
    // SAFETY: the intrinsics here only compute on registers (no memory is read or written),
    // and the caller guarantees the CPU has AVX-512 F, BW, VL and DQ (see # Safety)
    unsafe { round_odd(extrapolate_lanes(alpha, t0, t1, sums)) }
}

/// 8 f64 lanes rounded to f32 with round-to-odd, exactly (the last bit of inexact results
/// forced): the f32 lanes and the mask of lanes whose last bit must be set.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ.
#[inline(always)]
unsafe fn round_odd(y: __m512d) -> (__m256, __mmask8) {
    // SAFETY: the intrinsics here only compute on registers (no memory is read or written),
    // and the caller guarantees the CPU has AVX-512 F, BW, VL and DQ (see # Safety)
    unsafe {
        let r = _mm512_cvt_roundpd_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
        // Inexact (or NaN, which compares unordered): force the last bit to 1.
        let inexact = _mm512_cmp_pd_mask::<_CMP_NEQ_UQ>(_mm512_cvtps_pd(r), y);
        (r, inexact)
    }
}

/// θ1 + α(θ1 − θ0) on 8 f64 lanes, rounded to f32 with round-to-odd **where the f32
/// result is normal** (or infinite or NaN, or y is zero): the sticky bit — whether any of
/// the 29 bits below an f32 significand is set — is ORed into the last bit an f32 keeps, and
/// the conversion truncates. Where the result is an f32 subnormal the last kept bit is
/// higher up and the result may be wrong: bf16 callers check for subnormal results and redo
/// those blocks. A nonzero |y| below 2⁻¹⁴⁹ truncates to ±0 where round to odd gives ±2⁻¹⁴⁹;
/// no check sees that (zero is not subnormal), and none is needed: bf16 (smallest
/// subnormal 2⁻¹³³) and f16 round both to the same ±0.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ.
#[inline(always)]
unsafe fn extrapolate_round_odd_normal(
    alpha: __m512d,
    t0: __m512d,
    t1: __m512d,
    sums: &mut Sums,
) -> __m256 {
    // SAFETY: the intrinsics here only compute on registers (no memory is read or written),
    // and the caller guarantees the CPU has AVX-512 F, BW, VL and DQ (see # Safety)
    unsafe { round_odd_normal(extrapolate_lanes(alpha, t0, t1, sums)) }
}

/// 8 f64 lanes rounded to f32 with round-to-odd where the f32 result is normal, as
/// [`extrapolate_round_odd_normal`] says.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ.
#[inline(always)]
unsafe fn round_odd_normal(y: __m512d) -> __m256 {
    // SAFETY: the intrinsics here only compute on registers (no memory is read or written),
    // and the caller guarantees the CPU has AVX-512 F, BW, VL and DQ (see # Safety)
    unsafe {
        let y = _mm512_castpd_si512(y);
        let below = _mm512_set1_epi64(0x1fff_ffff);
        // (y & below) + below carries into bit 29 exactly when some bit below it is set.
        let carry = _mm512_add_epi64(_mm512_and_si512(y, below), below);
        // y | (carry & bit 29)
        let sticky = _mm512_ternarylogic_epi64::<0xf8>(y, carry, _mm512_set1_epi64(1 << 29));
        _mm512_cvt_roundpd_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(_mm512_castsi512_pd(
            sticky,
        ))
    }
}

/// Computes 16 lanes and returns the f32 results rounded to odd, exactly everywhere (f32
/// subnormals included): compare back and force the last bit of inexact results.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ.
#[inline(always)]
unsafe fn block(alpha: __m512d, t0: __m512, t1: __m512, sums: &mut [Sums; 2]) -> __m512i {
    // SAFETY: the intrinsics here only compute on registers (no memory is read or written),
    // and the caller guarantees the CPU has AVX-512 F, BW, VL and DQ (see # Safety)
    unsafe {
        let (a_lo, a_hi) = widen(t0);
        let (b_lo, b_hi) = widen(t1);
        // Two sets of accumulators: each add waits only for its own previous one.
        let (r_lo, m_lo) = extrapolate_round_odd(alpha, a_lo, b_lo, &mut sums[0]);
        let (r_hi, m_hi) = extrapolate_round_odd(alpha, a_hi, b_hi, &mut sums[1]);
        let r = _mm512_castps_si512(_mm512_insertf32x8::<1>(_mm512_castps256_ps512(r_lo), r_hi));
        let inexact = (m_lo as __mmask16) | ((m_hi as __mmask16) << 8);
        _mm512_mask_or_epi32(r, inexact, r, _mm512_set1_epi32(1))
    }
}

/// f32 → bf16 with round to nearest even, in the low half of each 32-bit lane (the high
/// half is zero); NaN keeps its top payload bits and gets quiet.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ.
#[inline(always)]
unsafe fn bf16_lanes(r: __m512i) -> __m512i {
    // SAFETY: the intrinsics here only compute on registers (no memory is read or written),
    // and the caller guarantees the CPU has AVX-512 F, BW, VL and DQ (see # Safety)
    unsafe {
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(r), _mm512_set1_epi32(1));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(
            r,
            _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb),
        ));
        let abs = _mm512_and_si512(r, _mm512_set1_epi32(0x7fff_ffff));
        let is_nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7f80_0000));
        let nan = _mm512_or_si512(_mm512_srli_epi32::<16>(r), _mm512_set1_epi32(0x40));
        _mm512_mask_blend_epi32(is_nan, rounded, nan)
    }
}

/// bf16 elements 2k and 2k + 1 of 32 as two vectors of 16 f32 lanes, without a shuffle:
/// each 32-bit lane holds an even element in its low half and an odd one in its high half.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ.
#[inline(always)]
unsafe fn split_bf16(x: __m512i) -> (__m512, __m512) {
    // SAFETY: the intrinsics here only compute on registers (no memory is read or written),
    // and the caller guarantees the CPU has AVX-512 F, BW, VL and DQ (see # Safety)
    unsafe {
        (
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(x)),
            _mm512_castsi512_ps(_mm512_and_si512(
                x,
                _mm512_set1_epi32(0xffff_0000_u32 as i32),
            )),
        )
    }
}

/// 16 lanes of [`extrapolate_round_odd_normal`].
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ.
#[inline(always)]
unsafe fn block_normal(alpha: __m512d, t0: __m512, t1: __m512, sums: &mut [Sums; 2]) -> __m512 {
    // SAFETY: the intrinsics here only compute on registers (no memory is read or written),
    // and the caller guarantees the CPU has AVX-512 F, BW, VL and DQ (see # Safety)
    unsafe {
        let (a_lo, a_hi) = widen(t0);
        let (b_lo, b_hi) = widen(t1);
        let r_lo = extrapolate_round_odd_normal(alpha, a_lo, b_lo, &mut sums[0]);
        let r_hi = extrapolate_round_odd_normal(alpha, a_hi, b_hi, &mut sums[1]);
        _mm512_insertf32x8::<1>(_mm512_castps256_ps512(r_lo), r_hi)
    }
}

/// The exact bf16 results of 32 elements split as by [`split_bf16`], interleaved back:
/// for the rare blocks with an f32-subnormal intermediate, which the fast narrowings get
/// wrong. Adds nothing to the sums (the caller already has).
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ and FMA.
#[cold]
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
unsafe fn bf16_exact_block(
    alpha: __m512d,
    (t0_even, t0_odd): (__m512, __m512),
    (t1_even, t1_odd): (__m512, __m512),
) -> __m512i {
    // SAFETY: the helpers need AVX-512 F, BW, VL and DQ, which this function enables
    // (its caller guaranteed the CPU has them); they only compute on registers.
    unsafe {
        let mut ignored = [Sums::new(), Sums::new()];
        let even = bf16_lanes(block(alpha, t0_even, t1_even, &mut ignored));
        let odd = bf16_lanes(block(alpha, t0_odd, t1_odd, &mut ignored));
        _mm512_or_si512(even, _mm512_slli_epi32::<16>(odd))
    }
}

/// How the bf16 loop turns the even and odd elements' f32 results (rounded to odd, none
/// subnormal) into 32 bf16 values in element order.
trait PairNarrowing {
    /// # Safety
    /// The CPU must support AVX-512 F, BW, VL and DQ, and what the implementation
    /// names.
    unsafe fn narrow(even: __m512, odd: __m512) -> __m512i;
}

/// Integer rounding on each half; the odd results shift into the high halves of the
/// lanes, which puts every element back in place.
struct IntegerNarrowing;

impl PairNarrowing for IntegerNarrowing {
    #[inline(always)]
    unsafe fn narrow(even: __m512, odd: __m512) -> __m512i {
        // SAFETY: register-only AVX-512 F intrinsics, which the caller guarantees.
        unsafe {
            let even = bf16_lanes(_mm512_castps_si512(even));
            let odd = bf16_lanes(_mm512_castps_si512(odd));
            _mm512_or_si512(even, _mm512_slli_epi32::<16>(odd))
        }
    }
}

/// `vcvtne2ps2bf16` (AVX512_BF16) on both halves at once — round to nearest even, NaNs
/// quieted as the integer code does, subnormal inputs flushed (none reach it) — then one
/// permute back into element order. Its `narrow` functions need AVX512_BF16 too.
struct HardwareNarrowing;

/// The permute that follows the conversion: it puts the even elements' results in 16-bit
/// lanes 0..16 and the odd ones' in 16..32, so output lane 2k takes lane k and lane 2k + 1
/// takes lane 16 + k.
const INTERLEAVE: [u16; 32] = {
    let mut order = [0u16; 32];
    let mut k = 0;
    while k < 16 {
        order[2 * k] = k as u16;
        order[2 * k + 1] = 16 + k as u16;
        k += 1;
    }
    order
};

impl PairNarrowing for HardwareNarrowing {
    #[inline(always)]
    unsafe fn narrow(even: __m512, odd: __m512) -> __m512i {
        // SAFETY: the caller guarantees AVX-512 F and BW and AVX512_BF16 (see
        // `HardwareNarrowing`). The load reads INTERLEAVE, 32 u16 = one 512-bit vector,
        // unaligned; the transmute is between two 512-bit vector types, any bits valid.
        unsafe {
            let packed = _mm512_cvtne2ps_pbh(odd, even);
            let order = _mm512_loadu_si512(INTERLEAVE.as_ptr() as *const __m512i);
            _mm512_permutexvar_epi16(order, std::mem::transmute::<__m512bh, __m512i>(packed))
        }
    }
}

/// One AVX-512 kernel: the format, how many elements a step takes, and the step.
trait Step {
    const FORMAT: FloatDtype;
    /// Elements per step.
    const ELEMENTS: usize;
    /// Computes `ELEMENTS` elements, stores them, adds to the sums and returns how many of
    /// them are ±inf or NaN.
    ///
    /// # Safety
    /// `ELEMENTS` elements of the format are readable at `sft` and `aligned` and writable
    /// at `out` (no alignment needed); the CPU supports AVX-512 F, BW, VL and DQ, and what
    /// the format needs besides (F16C for f16, AVX512_BF16 for [`HardwareNarrowing`]).
    unsafe fn step(
        alpha: __m512d,
        sft: *const u8,
        aligned: *const u8,
        out: *mut u8,
        sums: &mut [Sums; 2],
    ) -> u64;
}

/// The loop every AVX-512 kernel runs: whole steps, then the tail, then the totals.
///
/// # Safety
/// The CPU must support what `S::step` needs (see [`Step::step`]); `sft` and `aligned`
/// must hold at least as many elements of `S::FORMAT` as `out`.
#[inline(always)]
unsafe fn run<S: Step>(alpha: f64, sft: &[u8], aligned: &[u8], out: &mut [u8]) -> ChunkStats {
    let size = S::FORMAT.size();
    let n = out.len() / size;
    debug_assert!(sft.len() >= size * n && aligned.len() >= size * n);
    // SAFETY: the CPU has the features the step needs (this function's caller guarantees
    // them), and `Sums::new` needs a subset of them.
    let (va, mut sums) = unsafe { (_mm512_set1_pd(alpha), [Sums::new(), Sums::new()]) };
    let mut nonfinite = 0u64;
    let mut i = 0;
    while i + S::ELEMENTS <= n {
        // SAFETY: i + ELEMENTS <= n, and all three slices hold at least n elements (the
        // caller guarantees it for `sft` and `aligned`), so the step's bytes
        // [size·i, size·(i + ELEMENTS)) are in bounds of each; the CPU features as above.
        nonfinite += unsafe {
            S::step(
                va,
                sft.as_ptr().add(size * i),
                aligned.as_ptr().add(size * i),
                out.as_mut_ptr().add(size * i),
                &mut sums,
            )
        };
        i += S::ELEMENTS;
    }
    // The tail (fewer elements than a step) in the portable loop.
    let tail = super::portable::extrapolate(
        KernelSpec::same(S::FORMAT),
        alpha,
        &sft[size * i..size * n],
        &aligned[size * i..size * n],
        &mut out[size * i..size * n],
    );
    // SAFETY: `total` needs AVX-512 F, which the caller guarantees; it only writes to a
    // local array.
    let (delta_sq, base_sq) =
        unsafe { (Sums::total(&sums, |s| s.dd), Sums::total(&sums, |s| s.bb)) };
    ChunkStats {
        nonfinite_out: nonfinite + tail.nonfinite_out,
        nonfinite_in: 0,
        delta_sq: delta_sq + tail.delta_sq,
        base_sq: base_sq + tail.base_sq,
    }
}

/// bf16 with the narrowing `N`. Per 32 elements: split into even and odd elements (no
/// shuffles), compute both halves in f64 and round them to odd f32 with the sticky-bit
/// trick, then narrow. A block with an f32-subnormal intermediate, which the sticky-bit
/// trick does not round correctly (nor the hardware conversion, which flushes it), is
/// redone by [`bf16_exact_block`].
struct Bf16<N>(std::marker::PhantomData<N>);

impl<N: PairNarrowing> Step for Bf16<N> {
    const FORMAT: FloatDtype = FloatDtype::BF16;
    const ELEMENTS: usize = 32;
    #[inline(always)]
    unsafe fn step(
        alpha: __m512d,
        sft: *const u8,
        aligned: *const u8,
        out: *mut u8,
        sums: &mut [Sums; 2],
    ) -> u64 {
        // SAFETY: the caller guarantees 32 bf16 (64 bytes, one 512-bit vector) readable at
        // `sft` and `aligned` and writable at `out`, which is what the two loads and the
        // store touch, unaligned; and the CPU features of `Step::step`, which the helpers,
        // `N` and `bf16_exact_block` need.
        unsafe {
            const SUBNORMAL: i32 = 0x20;
            let t0 = split_bf16(_mm512_loadu_si512(sft as *const __m512i));
            let t1 = split_bf16(_mm512_loadu_si512(aligned as *const __m512i));
            let even = block_normal(alpha, t0.0, t1.0, sums);
            let odd = block_normal(alpha, t0.1, t1.1, sums);
            let h = if _mm512_fpclass_ps_mask::<SUBNORMAL>(even)
                | _mm512_fpclass_ps_mask::<SUBNORMAL>(odd)
                == 0
            {
                N::narrow(even, odd)
            } else {
                bf16_exact_block(alpha, t0, t1)
            };
            _mm512_storeu_si512(out as *mut __m512i, h);
            let exp = _mm512_and_si512(h, _mm512_set1_epi16(0x7f80));
            _mm512_cmpeq_epi16_mask(exp, _mm512_set1_epi16(0x7f80)).count_ones() as u64
        }
    }
}

/// f16. The round to odd uses the sticky-bit trick with no check: it is wrong only where
/// the f32 result is subnormal, below 2⁻¹²⁶ in magnitude, and every such f32 narrows to
/// the same ±0 in f16 (whose smallest subnormal is 2⁻²⁴) as the exact value does. The
/// F16C conversion then rounds to nearest even, with f16 subnormals, overflow and NaN per
/// IEEE.
struct F16;

impl Step for F16 {
    const FORMAT: FloatDtype = FloatDtype::F16;
    const ELEMENTS: usize = LANES;
    #[inline(always)]
    unsafe fn step(
        alpha: __m512d,
        sft: *const u8,
        aligned: *const u8,
        out: *mut u8,
        sums: &mut [Sums; 2],
    ) -> u64 {
        // SAFETY: the caller guarantees 16 f16 (32 bytes, one 256-bit vector) readable at
        // `sft` and `aligned` and writable at `out`, which is what the loads and the store
        // touch, unaligned; and AVX-512 with F16C (see `Step::step`), which the conversions
        // and helpers need.
        unsafe {
            let a = _mm512_cvtph_ps(_mm256_loadu_si256(sft as *const __m256i));
            let b = _mm512_cvtph_ps(_mm256_loadu_si256(aligned as *const __m256i));
            let r = block_normal(alpha, a, b, sums);
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(r);
            _mm256_storeu_si256(out as *mut __m256i, h);
            let exp = _mm256_and_si256(h, _mm256_set1_epi16(0x7c00));
            _mm256_cmpeq_epi16_mask(exp, _mm256_set1_epi16(0x7c00)).count_ones() as u64
        }
    }
}

/// f32, rounded once from f64 with the default round to nearest even, as the portable
/// loop's `as f32`.
struct F32;

impl Step for F32 {
    const FORMAT: FloatDtype = FloatDtype::F32;
    const ELEMENTS: usize = LANES;
    #[inline(always)]
    unsafe fn step(
        alpha: __m512d,
        sft: *const u8,
        aligned: *const u8,
        out: *mut u8,
        sums: &mut [Sums; 2],
    ) -> u64 {
        // SAFETY: the caller guarantees 16 f32 (one 512-bit vector) readable at `sft` and
        // `aligned` and writable at `out`, which is what the loads and the store touch,
        // unaligned; and the AVX-512 features the helpers need (see `Step::step`).
        unsafe {
            let (a_lo, a_hi) = widen(_mm512_loadu_ps(sft as *const f32));
            let (b_lo, b_hi) = widen(_mm512_loadu_ps(aligned as *const f32));
            let y_lo = _mm512_cvtpd_ps(extrapolate_lanes(alpha, a_lo, b_lo, &mut sums[0]));
            let y_hi = _mm512_cvtpd_ps(extrapolate_lanes(alpha, a_hi, b_hi, &mut sums[1]));
            let r = _mm512_insertf32x8::<1>(_mm512_castps256_ps512(y_lo), y_hi);
            _mm512_storeu_ps(out as *mut f32, r);
            let exp = _mm512_and_si512(_mm512_castps_si512(r), _mm512_set1_epi32(0x7f80_0000));
            _mm512_cmpeq_epi32_mask(exp, _mm512_set1_epi32(0x7f80_0000)).count_ones() as u64
        }
    }
}

/// f64 (no rounding at all).
struct F64;

impl Step for F64 {
    const FORMAT: FloatDtype = FloatDtype::F64;
    const ELEMENTS: usize = 8;
    #[inline(always)]
    unsafe fn step(
        alpha: __m512d,
        sft: *const u8,
        aligned: *const u8,
        out: *mut u8,
        sums: &mut [Sums; 2],
    ) -> u64 {
        // SAFETY: the caller guarantees 8 f64 (one 512-bit vector) readable at `sft` and
        // `aligned` and writable at `out`, which is what the loads and the store touch,
        // unaligned; and the AVX-512 features (see `Step::step`).
        unsafe {
            let a = _mm512_loadu_pd(sft as *const f64);
            let b = _mm512_loadu_pd(aligned as *const f64);
            let y = extrapolate_lanes(alpha, a, b, &mut sums[0]);
            _mm512_storeu_pd(out as *mut f64, y);
            let exp = _mm512_and_si512(
                _mm512_castpd_si512(y),
                _mm512_set1_epi64(0x7ff0_0000_0000_0000),
            );
            _mm512_cmpeq_epi64_mask(exp, _mm512_set1_epi64(0x7ff0_0000_0000_0000)).count_ones()
                as u64
        }
    }
}

/// bf16, bf16 → bf16.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ, FMA and POPCNT; `sft`, `aligned` and
/// `out` must hold the same number of elements of the kernel's format.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,popcnt")]
pub unsafe fn bf16(alpha: f64, sft: &[u8], aligned: &[u8], out: &mut [u8]) -> ChunkStats {
    // SAFETY: this function enables the features the step needs (its caller guarantees
    // the CPU has them) and its caller guarantees the slices hold the same number of
    // elements, which is what `run` requires.
    unsafe { run::<Bf16<IntegerNarrowing>>(alpha, sft, aligned, out) }
}

/// bf16, bf16 → bf16 with the AVX512_BF16 conversion.
///
/// # Safety
/// As [`bf16`], and the CPU must support AVX512_BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,popcnt")]
pub unsafe fn bf16_native(alpha: f64, sft: &[u8], aligned: &[u8], out: &mut [u8]) -> ChunkStats {
    // SAFETY: this function enables the features the step needs (its caller guarantees
    // the CPU has them) and its caller guarantees the slices hold the same number of
    // elements, which is what `run` requires.
    unsafe { run::<Bf16<HardwareNarrowing>>(alpha, sft, aligned, out) }
}

/// f16, f16 → f16.
///
/// # Safety
/// As [`bf16`], and the CPU must support F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma,popcnt")]
pub unsafe fn f16(alpha: f64, sft: &[u8], aligned: &[u8], out: &mut [u8]) -> ChunkStats {
    // SAFETY: this function enables the features the step needs (its caller guarantees
    // the CPU has them) and its caller guarantees the slices hold the same number of
    // elements, which is what `run` requires.
    unsafe { run::<F16>(alpha, sft, aligned, out) }
}

/// f32, f32 → f32.
///
/// # Safety
/// As [`bf16`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,popcnt")]
pub unsafe fn f32(alpha: f64, sft: &[u8], aligned: &[u8], out: &mut [u8]) -> ChunkStats {
    // SAFETY: this function enables the features the step needs (its caller guarantees
    // the CPU has them) and its caller guarantees the slices hold the same number of
    // elements, which is what `run` requires.
    unsafe { run::<F32>(alpha, sft, aligned, out) }
}

/// f64, f64 → f64.
///
/// # Safety
/// As [`bf16`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,popcnt")]
pub unsafe fn f64(alpha: f64, sft: &[u8], aligned: &[u8], out: &mut [u8]) -> ChunkStats {
    // SAFETY: this function enables the features the step needs (its caller guarantees
    // the CPU has them) and its caller guarantees the slices hold the same number of
    // elements, which is what `run` requires.
    unsafe { run::<F64>(alpha, sft, aligned, out) }
}

/// The hand-written kernel for `spec` if it has one format in and out, run on `level` if
/// that is an AVX-512 level; `None` otherwise (the caller runs the generic loop).
pub(super) fn extrapolate_same_format(
    level: Level,
    spec: KernelSpec,
    alpha: f64,
    sft: &[u8],
    aligned: &[u8],
    out: &mut [u8],
) -> Option<ChunkStats> {
    if !level.has_avx512() {
        return None;
    }
    let same = |d| spec == KernelSpec::same(d);
    // SAFETY: `level` is an AVX-512 level, so the CPU was found to have AVX-512 F, BW, VL
    // and DQ, F16C, FMA and POPCNT (`Isa::detect`), every feature these kernels enable,
    // and AVX512_BF16 where `bf16_native` is called; the caller checked that the three
    // slices hold the same number of elements of the format.
    let stats = unsafe {
        if same(FloatDtype::BF16) && level.isa() == Isa::Avx512Bf16 {
            bf16_native(alpha, sft, aligned, out)
        } else if same(FloatDtype::BF16) {
            bf16(alpha, sft, aligned, out)
        } else if same(FloatDtype::F16) {
            f16(alpha, sft, aligned, out)
        } else if same(FloatDtype::F32) {
            f32(alpha, sft, aligned, out)
        } else if same(FloatDtype::F64) {
            f64(alpha, sft, aligned, out)
        } else {
            return None;
        }
    };
    Some(stats)
}

// ---------------------------------------------------------------------------------------
// The row epilogue of merging a LoRA adapter (`--as model`): θ2 = w + c·(s·d) for θ0's
// elements `w` and their rank-r sums `d` (f64), rounded once to θ0's format. The same
// arithmetic and rounding as the portable loop (`adapter::rows`), which the tests there
// compare bit for bit on every instruction set.

/// w + c·(s·d) on 8 f64 lanes: multiply, multiply, add (no fused multiply-add).
///
/// # Safety
/// 8 f64 must be readable at `d`; the CPU must support AVX-512 F.
#[inline(always)]
unsafe fn lora_lanes(c: __m512d, s: __m512d, w: __m512d, d: *const f64) -> __m512d {
    // SAFETY: the caller guarantees 8 readable f64 at `d` and AVX-512 F (see # Safety); the
    // load is unaligned, as `d` may be
    unsafe { _mm512_add_pd(w, _mm512_mul_pd(c, _mm512_mul_pd(s, _mm512_loadu_pd(d)))) }
}

/// bf16 rows, 16 elements a step, in order: widen, compute two halves, round to odd f32
/// with the sticky-bit trick, narrow with `N`; a step with an f32-subnormal intermediate
/// is redone one element at a time.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ, POPCNT, and what `N` uses.
#[inline(always)]
unsafe fn lora_bf16_with<N: Narrow16>(c: f64, s: f64, w: &[u8], d: &[f64], out: &mut [u8]) -> u64 {
    const SUBNORMAL: i32 = 0x20;
    let n = d.len().min(w.len() / 2).min(out.len() / 2);
    // SAFETY: register-only; AVX-512 F is guaranteed by the caller.
    let (vc, vs) = unsafe { (_mm512_set1_pd(c), _mm512_set1_pd(s)) };
    let mut nonfinite = 0u64;
    let mut i = 0;
    while i + LANES <= n {
        // SAFETY: i + LANES <= n, and n is at most the element count of `w`, `d` and `out`,
        // so the 16 bf16 loaded from `w` (32 bytes), the 16 f64 read from `d` (two loads
        // of 8) and the 16 bf16 stored to `out` are in bounds (unaligned accesses). The
        // helpers and `N` need the features the caller guarantees.
        unsafe {
            let h = _mm256_loadu_si256(w.as_ptr().add(2 * i) as *const __m256i);
            let x = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
            let (lo, hi) = widen(x);
            let r_lo = round_odd_normal(lora_lanes(vc, vs, lo, d.as_ptr().add(i)));
            let r_hi = round_odd_normal(lora_lanes(vc, vs, hi, d.as_ptr().add(i + 8)));
            let r = _mm512_insertf32x8::<1>(_mm512_castps256_ps512(r_lo), r_hi);
            let dst = out.as_mut_ptr().add(2 * i);
            if _mm512_fpclass_ps_mask::<SUBNORMAL>(r) == 0 {
                let b = N::narrow(r);
                _mm256_storeu_si256(dst as *mut __m256i, b);
                let exp = _mm256_and_si256(b, _mm256_set1_epi16(0x7f80));
                nonfinite +=
                    _mm256_cmpeq_epi16_mask(exp, _mm256_set1_epi16(0x7f80)).count_ones() as u64;
            } else {
                nonfinite += super::lora_ref::epilogue::<super::Bf16>(
                    c,
                    s,
                    &w[2 * i..2 * (i + LANES)],
                    &d[i..i + LANES],
                    &mut out[2 * i..2 * (i + LANES)],
                );
            }
        }
        i += LANES;
    }
    nonfinite
        + super::lora_ref::epilogue::<super::Bf16>(
            c,
            s,
            &w[2 * i..2 * n],
            &d[i..n],
            &mut out[2 * i..2 * n],
        )
}

/// 16 f32 lanes (rounded to odd, none subnormal) → 16 bf16 values in order.
trait Narrow16 {
    /// # Safety
    /// The CPU must support AVX-512 F, BW, VL and DQ, and AVX512_BF16 for
    /// [`HardwareNarrowing`].
    unsafe fn narrow(r: __m512) -> __m256i;
}

impl Narrow16 for IntegerNarrowing {
    #[inline(always)]
    unsafe fn narrow(r: __m512) -> __m256i {
        // SAFETY: register-only AVX-512 F and BW intrinsics, which the caller guarantees.
        unsafe { _mm512_cvtepi32_epi16(bf16_lanes(_mm512_castps_si512(r))) }
    }
}

impl Narrow16 for HardwareNarrowing {
    #[inline(always)]
    unsafe fn narrow(r: __m512) -> __m256i {
        // SAFETY: the caller guarantees AVX512_BF16; the conversion is register-only, and
        // the transmute is between two 256-bit vector types, any bits valid.
        unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(r)) }
    }
}

/// The row epilogue for bf16: `out[j] = bf16(w[j] + c·(s·d[j]))`; returns how many outputs
/// are ±inf or NaN.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ and POPCNT.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,popcnt")]
pub unsafe fn lora_bf16(c: f64, s: f64, w: &[u8], d: &[f64], out: &mut [u8]) -> u64 {
    // SAFETY: this function enables AVX-512 F, BW, VL and DQ, all the integer narrowing
    // needs (its caller guarantees the CPU has them).
    unsafe { lora_bf16_with::<IntegerNarrowing>(c, s, w, d, out) }
}

/// [`lora_bf16`] with the AVX512_BF16 conversion.
///
/// # Safety
/// As [`lora_bf16`], and the CPU must support AVX512_BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,popcnt")]
pub unsafe fn lora_bf16_native(c: f64, s: f64, w: &[u8], d: &[f64], out: &mut [u8]) -> u64 {
    // SAFETY: this function enables AVX-512 F, BW, VL and DQ and AVX512_BF16, all the
    // hardware narrowing needs (its caller guarantees the CPU has them).
    unsafe { lora_bf16_with::<HardwareNarrowing>(c, s, w, d, out) }
}

/// The row epilogue for f16, with F16C conversions; the round to odd needs no check (see
/// [`F16`]).
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ, F16C and POPCNT.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,popcnt")]
pub unsafe fn lora_f16(c: f64, s: f64, w: &[u8], d: &[f64], out: &mut [u8]) -> u64 {
    let n = d.len().min(w.len() / 2).min(out.len() / 2);
    let (vc, vs) = (_mm512_set1_pd(c), _mm512_set1_pd(s));
    let mut nonfinite = 0u64;
    let mut i = 0;
    while i + LANES <= n {
        // SAFETY: i + LANES <= n, and n is at most the element count of `w`, `d` and `out`,
        // so the 16 f16 loaded from `w` (32 bytes), the 16 f64 read from `d` (two loads
        // of 8) and the 16 f16 stored to `out` are in bounds (unaligned accesses). The
        // helpers need AVX-512 F, BW, VL and DQ, which this function enables.
        unsafe {
            let x = _mm512_cvtph_ps(_mm256_loadu_si256(w.as_ptr().add(2 * i) as *const __m256i));
            let (lo, hi) = widen(x);
            let r_lo = round_odd_normal(lora_lanes(vc, vs, lo, d.as_ptr().add(i)));
            let r_hi = round_odd_normal(lora_lanes(vc, vs, hi, d.as_ptr().add(i + 8)));
            let r = _mm512_insertf32x8::<1>(_mm512_castps256_ps512(r_lo), r_hi);
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(r);
            _mm256_storeu_si256(out.as_mut_ptr().add(2 * i) as *mut __m256i, h);
            let exp = _mm256_and_si256(h, _mm256_set1_epi16(0x7c00));
            nonfinite +=
                _mm256_cmpeq_epi16_mask(exp, _mm256_set1_epi16(0x7c00)).count_ones() as u64;
        }
        i += LANES;
    }
    nonfinite
        + super::lora_ref::epilogue::<super::F16>(
            c,
            s,
            &w[2 * i..2 * n],
            &d[i..n],
            &mut out[2 * i..2 * n],
        )
}
