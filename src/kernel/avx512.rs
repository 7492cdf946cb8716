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
//! All give the same bits as the portable code; the kernel tests compare them on every
//! format, on values next to rounding ties and on arbitrary bit patterns, NaNs included.

use std::arch::x86_64::*;

/// Elements per iteration: one 512-bit vector of f32 lanes.
const LANES: usize = 16;

/// Widens 16 f32 lanes to two vectors of 8 f64 lanes.
#[inline(always)]
unsafe fn widen(x: __m512) -> (__m512d, __m512d) {
    (
        _mm512_cvtps_pd(_mm512_castps512_ps256(x)),
        _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(x)),
    )
}

/// Partial sums of squares, Σ(θ1 − θ0)² and Σθ0², one per f64 lane.
struct Sums {
    dd: __m512d,
    bb: __m512d,
}

impl Sums {
    #[inline(always)]
    unsafe fn new() -> Sums {
        Sums {
            dd: _mm512_setzero_pd(),
            bb: _mm512_setzero_pd(),
        }
    }

    /// Adds the accumulators, then the lanes pairwise, as the portable loop's `sum_lanes`
    /// does (the sums differ from the portable ones in the last bits).
    #[inline(always)]
    unsafe fn total<const N: usize>(sums: &[Sums; N], field: impl Fn(&Sums) -> __m512d) -> f64 {
        let mut v = _mm512_setzero_pd();
        for s in sums {
            v = _mm512_add_pd(v, field(s));
        }
        let mut a = [0f64; 8];
        _mm512_storeu_pd(a.as_mut_ptr(), v);
        super::sum_lanes(a)
    }
}

/// θ1 + α(θ1 − θ0) on 8 f64 lanes (subtract, multiply, add), adding to the sums.
#[inline(always)]
unsafe fn extrapolate_lanes(alpha: __m512d, t0: __m512d, t1: __m512d, sums: &mut Sums) -> __m512d {
    let delta = _mm512_sub_pd(t1, t0);
    // The statistics may use fused multiply-adds (they are not part of the output, whose
    // arithmetic is exactly subtract, multiply, add).
    sums.dd = _mm512_fmadd_pd(delta, delta, sums.dd);
    sums.bb = _mm512_fmadd_pd(t0, t0, sums.bb);
    _mm512_add_pd(t1, _mm512_mul_pd(alpha, delta))
}

/// θ1 + α(θ1 − θ0) on 8 f64 lanes, rounded to f32 with round-to-odd.
#[inline(always)]
unsafe fn extrapolate_round_odd(
    alpha: __m512d,
    t0: __m512d,
    t1: __m512d,
    sums: &mut Sums,
) -> (__m256, __mmask8) {
    let y = extrapolate_lanes(alpha, t0, t1, sums);
    let r = _mm512_cvt_roundpd_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
    // Inexact (or NaN, which compares unordered): force the last bit to 1.
    let inexact = _mm512_cmp_pd_mask::<_CMP_NEQ_UQ>(_mm512_cvtps_pd(r), y);
    (r, inexact)
}

/// θ1 + α(θ1 − θ0) on 8 f64 lanes, rounded to f32 with round-to-odd **where the f32
/// result is normal** (or zero, infinite or NaN): the sticky bit — whether any of the 29
/// bits below an f32 significand is set — is ORed into the last bit an f32 keeps, and the
/// conversion truncates. Where the result is an f32 subnormal the last kept bit is higher
/// up and the result may be wrong; callers check for that and redo those lanes.
#[inline(always)]
unsafe fn extrapolate_round_odd_normal(
    alpha: __m512d,
    t0: __m512d,
    t1: __m512d,
    sums: &mut Sums,
) -> __m256 {
    let y = _mm512_castpd_si512(extrapolate_lanes(alpha, t0, t1, sums));
    let below = _mm512_set1_epi64(0x1fff_ffff);
    // (y & below) + below carries into bit 29 exactly when some bit below it is set.
    let carry = _mm512_add_epi64(_mm512_and_si512(y, below), below);
    // y | (carry & bit 29)
    let sticky = _mm512_ternarylogic_epi64::<0xf8>(y, carry, _mm512_set1_epi64(1 << 29));
    _mm512_cvt_roundpd_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(_mm512_castsi512_pd(sticky))
}

/// Runs the portable loop on the elements from `done` on (fewer than a vector's worth) and
/// adds what the vector loop counted and summed.
#[inline(always)]
fn finish<const N: usize>(
    format: crate::dtype::FloatDtype,
    alpha: f64,
    (sft, aligned, out): (&[u8], &[u8], &mut [u8]),
    done: usize,
    nonfinite: u64,
    sums: &[Sums; N],
) -> super::ChunkStats {
    let size = format.size();
    let n = out.len() / size;
    let tail = super::portable::extrapolate(
        super::KernelSpec::same(format),
        alpha,
        &sft[size * done..size * n],
        &aligned[size * done..size * n],
        &mut out[size * done..size * n],
    );
    // SAFETY: only reached from the kernels below, whose callers guarantee the CPU
    // features (`total` reads registers with AVX-512 stores).
    let (dd, bb) = unsafe { (Sums::total(sums, |s| s.dd), Sums::total(sums, |s| s.bb)) };
    super::ChunkStats {
        nonfinite_out: nonfinite + tail.nonfinite_out,
        delta_sq: dd + tail.delta_sq,
        base_sq: bb + tail.base_sq,
    }
}

/// Computes 16 lanes and returns the f32 results, rounded to odd.
#[inline(always)]
unsafe fn block(alpha: __m512d, t0: __m512, t1: __m512, sums: &mut [Sums; 2]) -> __m512i {
    let (a_lo, a_hi) = widen(t0);
    let (b_lo, b_hi) = widen(t1);
    // Two sets of accumulators: each add waits only for its own previous one.
    let (r_lo, m_lo) = extrapolate_round_odd(alpha, a_lo, b_lo, &mut sums[0]);
    let (r_hi, m_hi) = extrapolate_round_odd(alpha, a_hi, b_hi, &mut sums[1]);
    let r = _mm512_castps_si512(_mm512_insertf32x8::<1>(_mm512_castps256_ps512(r_lo), r_hi));
    let inexact = (m_lo as __mmask16) | ((m_hi as __mmask16) << 8);
    _mm512_mask_or_epi32(r, inexact, r, _mm512_set1_epi32(1))
}

/// f32 → bf16 with round to nearest even, in the low half of each 32-bit lane (the high
/// half is zero); NaN keeps its top payload bits and gets quiet.
#[inline(always)]
unsafe fn bf16_lanes(r: __m512i) -> __m512i {
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

/// bf16 elements 2k and 2k + 1 of 32 as two vectors of 16 f32 lanes, without a shuffle:
/// each 32-bit lane holds an even element in its low half and an odd one in its high half.
#[inline(always)]
unsafe fn split_bf16(x: __m512i) -> (__m512, __m512) {
    (
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(x)),
        _mm512_castsi512_ps(_mm512_and_si512(
            x,
            _mm512_set1_epi32(0xffff_0000_u32 as i32),
        )),
    )
}

/// 16 lanes of [`extrapolate_round_odd_normal`].
#[inline(always)]
unsafe fn block_normal(alpha: __m512d, t0: __m512, t1: __m512, sums: &mut [Sums; 2]) -> __m512 {
    let (a_lo, a_hi) = widen(t0);
    let (b_lo, b_hi) = widen(t1);
    let r_lo = extrapolate_round_odd_normal(alpha, a_lo, b_lo, &mut sums[0]);
    let r_hi = extrapolate_round_odd_normal(alpha, a_hi, b_hi, &mut sums[1]);
    _mm512_insertf32x8::<1>(_mm512_castps256_ps512(r_lo), r_hi)
}

/// The exact bf16 results of 32 elements split as by [`split_bf16`], interleaved back:
/// for the rare blocks with an f32-subnormal intermediate, which the fast narrowings get
/// wrong. Adds nothing to the sums (the caller already has).
#[cold]
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
unsafe fn bf16_exact_block(
    alpha: __m512d,
    (t0_even, t0_odd): (__m512, __m512),
    (t1_even, t1_odd): (__m512, __m512),
) -> __m512i {
    let mut ignored = [Sums::new(), Sums::new()];
    let even = bf16_lanes(block(alpha, t0_even, t1_even, &mut ignored));
    let odd = bf16_lanes(block(alpha, t0_odd, t1_odd, &mut ignored));
    _mm512_or_si512(even, _mm512_slli_epi32::<16>(odd))
}

/// How the bf16 loop turns the even and odd elements' f32 results (rounded to odd, none
/// subnormal) into 32 bf16 values in element order.
trait PairNarrowing {
    /// Anything to compute once per call.
    type State: Copy;
    unsafe fn state() -> Self::State;
    unsafe fn narrow(state: Self::State, even: __m512, odd: __m512) -> __m512i;
}

/// Integer rounding on each half; the odd results shift into the high halves of the
/// lanes, which puts every element back in place.
struct IntegerNarrowing;

impl PairNarrowing for IntegerNarrowing {
    type State = ();

    #[inline(always)]
    unsafe fn state() {}

    #[inline(always)]
    unsafe fn narrow((): (), even: __m512, odd: __m512) -> __m512i {
        let even = bf16_lanes(_mm512_castps_si512(even));
        let odd = bf16_lanes(_mm512_castps_si512(odd));
        _mm512_or_si512(even, _mm512_slli_epi32::<16>(odd))
    }
}

/// `vcvtne2ps2bf16` (AVX512_BF16) on both halves at once — round to nearest even, NaNs
/// quieted as the integer code does, subnormal inputs flushed (none reach it) — then one
/// permute back into element order.
struct HardwareNarrowing;

impl PairNarrowing for HardwareNarrowing {
    /// The permute's indices.
    type State = __m512i;

    #[inline(always)]
    unsafe fn state() -> __m512i {
        // The conversion puts the even elements' results in 16-bit lanes 0..16 and the
        // odd ones' in 16..32: output lane 2k takes lane k, lane 2k + 1 takes 16 + k.
        let mut order = [0u16; 32];
        for (k, pair) in order.chunks_exact_mut(2).enumerate() {
            pair[0] = k as u16;
            pair[1] = (16 + k) as u16;
        }
        _mm512_loadu_si512(order.as_ptr() as *const __m512i)
    }

    #[inline(always)]
    unsafe fn narrow(interleave: __m512i, even: __m512, odd: __m512) -> __m512i {
        let packed = _mm512_cvtne2ps_pbh(odd, even);
        _mm512_permutexvar_epi16(interleave, std::mem::transmute::<__m512bh, __m512i>(packed))
    }
}

/// The bf16 loop. Per 32 elements: split into even and odd elements (no shuffles),
/// compute both halves in f64 and round them to odd f32 with the sticky-bit trick, then
/// narrow. A block with an f32-subnormal intermediate, which the sticky-bit trick does not
/// round correctly (nor the hardware conversion, which flushes it), is redone by
/// [`bf16_exact_block`].
#[inline(always)]
unsafe fn bf16_loop<N: PairNarrowing>(
    alpha: f64,
    sft: &[u8],
    aligned: &[u8],
    out: &mut [u8],
) -> super::ChunkStats {
    const BLOCK: usize = 32;
    const SUBNORMAL: i32 = 0x20;
    let n = out.len() / 2;
    debug_assert!(sft.len() >= 2 * n && aligned.len() >= 2 * n);
    let va = _mm512_set1_pd(alpha);
    let state = N::state();
    let mut sums = [Sums::new(), Sums::new()];
    let mut nonfinite = 0u64;
    let mut i = 0;
    while i + BLOCK <= n {
        // SAFETY (all pointer arithmetic below): i + 32 <= n, so bytes [2i, 2i + 64) are in
        // bounds of all three slices; the loads and stores are unaligned variants.
        let t0 = split_bf16(_mm512_loadu_si512(sft.as_ptr().add(2 * i) as *const __m512i));
        let t1 = split_bf16(_mm512_loadu_si512(
            aligned.as_ptr().add(2 * i) as *const __m512i
        ));
        let even = block_normal(va, t0.0, t1.0, &mut sums);
        let odd = block_normal(va, t0.1, t1.1, &mut sums);
        let h = if _mm512_fpclass_ps_mask::<SUBNORMAL>(even)
            | _mm512_fpclass_ps_mask::<SUBNORMAL>(odd)
            == 0
        {
            N::narrow(state, even, odd)
        } else {
            bf16_exact_block(va, t0, t1)
        };
        let exp = _mm512_and_si512(h, _mm512_set1_epi16(0x7f80));
        nonfinite += _mm512_cmpeq_epi16_mask(exp, _mm512_set1_epi16(0x7f80)).count_ones() as u64;
        _mm512_storeu_si512(out.as_mut_ptr().add(2 * i) as *mut __m512i, h);
        i += BLOCK;
    }
    finish(
        crate::dtype::FloatDtype::BF16,
        alpha,
        (sft, aligned, out),
        i,
        nonfinite,
        &sums,
    )
}

/// bf16, bf16 → bf16.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ, FMA and POPCNT; `sft`, `aligned` and
/// `out` must hold the same number of 2-byte elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,popcnt")]
pub unsafe fn bf16(alpha: f64, sft: &[u8], aligned: &[u8], out: &mut [u8]) -> super::ChunkStats {
    bf16_loop::<IntegerNarrowing>(alpha, sft, aligned, out)
}

/// bf16, bf16 → bf16 with the AVX512_BF16 conversion.
///
/// # Safety
/// As [`bf16`], and the CPU must support AVX512_BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,popcnt")]
pub unsafe fn bf16_native(
    alpha: f64,
    sft: &[u8],
    aligned: &[u8],
    out: &mut [u8],
) -> super::ChunkStats {
    bf16_loop::<HardwareNarrowing>(alpha, sft, aligned, out)
}

/// f16, f16 → f16.
///
/// The round to odd uses the sticky-bit trick with no check: it is wrong only where the
/// f32 result is subnormal, below 2⁻¹²⁶ in magnitude, and every such f32 narrows to the
/// same ±0 in f16 (whose smallest subnormal is 2⁻²⁴) as the exact value does. The F16C
/// conversion then rounds to nearest even, with f16 subnormals, overflow and NaN per IEEE.
///
/// # Safety
/// As [`bf16`], and the CPU must support F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma,popcnt")]
pub unsafe fn f16(alpha: f64, sft: &[u8], aligned: &[u8], out: &mut [u8]) -> super::ChunkStats {
    let n = out.len() / 2;
    debug_assert!(sft.len() >= 2 * n && aligned.len() >= 2 * n);
    let va = _mm512_set1_pd(alpha);
    let mut sums = [Sums::new(), Sums::new()];
    let mut nonfinite = 0u64;
    let mut i = 0;
    while i + LANES <= n {
        // SAFETY (all pointer arithmetic below): i + 16 <= n, so bytes [2i, 2i + 32) are in
        // bounds of all three slices; the loads and stores are unaligned variants.
        let a = _mm512_cvtph_ps(_mm256_loadu_si256(sft.as_ptr().add(2 * i) as *const __m256i));
        let b = _mm512_cvtph_ps(_mm256_loadu_si256(
            aligned.as_ptr().add(2 * i) as *const __m256i
        ));
        let r = block_normal(va, a, b, &mut sums);
        let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(r);
        let exp = _mm256_and_si256(h, _mm256_set1_epi16(0x7c00));
        nonfinite += _mm256_cmpeq_epi16_mask(exp, _mm256_set1_epi16(0x7c00)).count_ones() as u64;
        _mm256_storeu_si256(out.as_mut_ptr().add(2 * i) as *mut __m256i, h);
        i += LANES;
    }
    finish(
        crate::dtype::FloatDtype::F16,
        alpha,
        (sft, aligned, out),
        i,
        nonfinite,
        &sums,
    )
}

/// f32, f32 → f32 (rounded once from f64 with the default round-to-nearest-even, as the
/// portable loop's `as f32`).
///
/// # Safety
/// As [`bf16`], with 4-byte elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,popcnt")]
pub unsafe fn f32(alpha: f64, sft: &[u8], aligned: &[u8], out: &mut [u8]) -> super::ChunkStats {
    let n = out.len() / 4;
    debug_assert!(sft.len() >= 4 * n && aligned.len() >= 4 * n);
    let va = _mm512_set1_pd(alpha);
    let mut sums = [Sums::new(), Sums::new()];
    let mut nonfinite = 0u64;
    let mut i = 0;
    while i + LANES <= n {
        // SAFETY: i + 16 <= n, so bytes [4i, 4i + 64) are in bounds of all three slices;
        // the loads and stores are unaligned variants.
        let a = _mm512_loadu_ps(sft.as_ptr().add(4 * i) as *const f32);
        let b = _mm512_loadu_ps(aligned.as_ptr().add(4 * i) as *const f32);
        let (a_lo, a_hi) = widen(a);
        let (b_lo, b_hi) = widen(b);
        let y_lo = _mm512_cvtpd_ps(extrapolate_lanes(va, a_lo, b_lo, &mut sums[0]));
        let y_hi = _mm512_cvtpd_ps(extrapolate_lanes(va, a_hi, b_hi, &mut sums[1]));
        let r = _mm512_insertf32x8::<1>(_mm512_castps256_ps512(y_lo), y_hi);
        let exp = _mm512_and_si512(_mm512_castps_si512(r), _mm512_set1_epi32(0x7f80_0000));
        nonfinite +=
            _mm512_cmpeq_epi32_mask(exp, _mm512_set1_epi32(0x7f80_0000)).count_ones() as u64;
        _mm512_storeu_ps(out.as_mut_ptr().add(4 * i) as *mut f32, r);
        i += LANES;
    }
    finish(
        crate::dtype::FloatDtype::F32,
        alpha,
        (sft, aligned, out),
        i,
        nonfinite,
        &sums,
    )
}

/// f64, f64 → f64 (no rounding at all).
///
/// # Safety
/// As [`bf16`], with 8-byte elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,popcnt")]
pub unsafe fn f64(alpha: f64, sft: &[u8], aligned: &[u8], out: &mut [u8]) -> super::ChunkStats {
    let n = out.len() / 8;
    debug_assert!(sft.len() >= 8 * n && aligned.len() >= 8 * n);
    let va = _mm512_set1_pd(alpha);
    let mut sums = [Sums::new()];
    let mut nonfinite = 0u64;
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, so bytes [8i, 8i + 64) are in bounds of all three slices;
        // the loads and stores are unaligned variants.
        let a = _mm512_loadu_pd(sft.as_ptr().add(8 * i) as *const f64);
        let b = _mm512_loadu_pd(aligned.as_ptr().add(8 * i) as *const f64);
        let y = extrapolate_lanes(va, a, b, &mut sums[0]);
        let exp = _mm512_and_si512(
            _mm512_castpd_si512(y),
            _mm512_set1_epi64(0x7ff0_0000_0000_0000),
        );
        nonfinite += _mm512_cmpeq_epi64_mask(exp, _mm512_set1_epi64(0x7ff0_0000_0000_0000))
            .count_ones() as u64;
        _mm512_storeu_pd(out.as_mut_ptr().add(8 * i) as *mut f64, y);
        i += 8;
    }
    finish(
        crate::dtype::FloatDtype::F64,
        alpha,
        (sft, aligned, out),
        i,
        nonfinite,
        &sums,
    )
}
