//! Hand-written AVX-512 kernels for the two formats whose exact rounding is expensive when
//! left to the compiler: bf16 and f16 in and out.
//!
//! They compute exactly what the portable loop computes — widen exactly, subtract, multiply,
//! add in f64, round once — with two shortcuts the instruction set offers: the f64 → f32
//! round-to-odd step uses a conversion with embedded round-toward-zero (`{rz-sae}`) instead
//! of round-to-nearest plus a correction, and f16 conversions use the F16C instructions.
//! Both give the same bits as the portable code; the kernel tests compare them on every
//! format and on arbitrary bit patterns, NaNs included.

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

    /// Adds the lanes in the same pairwise order as the portable loop's `sum_lanes`.
    #[inline(always)]
    unsafe fn total(v: __m512d) -> f64 {
        let mut a = [0f64; 8];
        _mm512_storeu_pd(a.as_mut_ptr(), v);
        super::sum_lanes(a)
    }
}

/// θ1 + α(θ1 − θ0) on 8 f64 lanes, rounded to f32 with round-to-odd.
#[inline(always)]
unsafe fn extrapolate_round_odd(
    alpha: __m512d,
    t0: __m512d,
    t1: __m512d,
    sums: &mut Sums,
) -> (__m256, __mmask8) {
    let delta = _mm512_sub_pd(t1, t0);
    sums.dd = _mm512_add_pd(sums.dd, _mm512_mul_pd(delta, delta));
    sums.bb = _mm512_add_pd(sums.bb, _mm512_mul_pd(t0, t0));
    let y = _mm512_add_pd(t1, _mm512_mul_pd(alpha, delta));
    let r = _mm512_cvt_roundpd_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
    // Inexact (or NaN, which compares unordered): force the last bit to 1.
    let inexact = _mm512_cmp_pd_mask::<_CMP_NEQ_UQ>(_mm512_cvtps_pd(r), y);
    (r, inexact)
}

/// Computes 16 lanes and returns the f32 results, rounded to odd.
#[inline(always)]
unsafe fn block(alpha: __m512d, t0: __m512, t1: __m512, sums: &mut Sums) -> __m512i {
    let (a_lo, a_hi) = widen(t0);
    let (b_lo, b_hi) = widen(t1);
    let (r_lo, m_lo) = extrapolate_round_odd(alpha, a_lo, b_lo, sums);
    let (r_hi, m_hi) = extrapolate_round_odd(alpha, a_hi, b_hi, sums);
    let r = _mm512_castps_si512(_mm512_insertf32x8::<1>(_mm512_castps256_ps512(r_lo), r_hi));
    let inexact = (m_lo as __mmask16) | ((m_hi as __mmask16) << 8);
    _mm512_mask_or_epi32(r, inexact, r, _mm512_set1_epi32(1))
}

/// bf16, bf16 → bf16.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ; `sft`, `aligned` and `out` must hold the
/// same number of 2-byte elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub unsafe fn bf16(alpha: f64, sft: &[u8], aligned: &[u8], out: &mut [u8]) -> super::ChunkStats {
    let n = out.len() / 2;
    debug_assert!(sft.len() >= 2 * n && aligned.len() >= 2 * n);
    let va = _mm512_set1_pd(alpha);
    let mut sums = Sums::new();
    let mut nonfinite = 0u64;
    let mut i = 0;
    while i + LANES <= n {
        // SAFETY (all pointer arithmetic below): i + 16 <= n, so bytes [2i, 2i + 32) are in
        // bounds of all three slices; the loads and stores are unaligned variants.
        let a = _mm256_loadu_si256(sft.as_ptr().add(2 * i) as *const __m256i);
        let b = _mm256_loadu_si256(aligned.as_ptr().add(2 * i) as *const __m256i);
        let t0 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(a)));
        let t1 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(b)));
        let r = block(va, t0, t1, &mut sums);
        // f32 → bf16, round to nearest even; NaN keeps its top payload bits and gets quiet.
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(r), _mm512_set1_epi32(1));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(
            r,
            _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb),
        ));
        let abs = _mm512_and_si512(r, _mm512_set1_epi32(0x7fff_ffff));
        let is_nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7f80_0000));
        let nan = _mm512_or_si512(_mm512_srli_epi32::<16>(r), _mm512_set1_epi32(0x40));
        let h = _mm512_mask_blend_epi32(is_nan, rounded, nan);
        let exp = _mm512_and_si512(h, _mm512_set1_epi32(0x7f80));
        nonfinite += _mm512_cmpeq_epi32_mask(exp, _mm512_set1_epi32(0x7f80)).count_ones() as u64;
        _mm256_storeu_si256(
            out.as_mut_ptr().add(2 * i) as *mut __m256i,
            _mm512_cvtepi32_epi16(h),
        );
        i += LANES;
    }
    let tail = super::portable::extrapolate(
        super::KernelSpec::same(crate::dtype::FloatDtype::BF16),
        alpha,
        &sft[2 * i..2 * n],
        &aligned[2 * i..2 * n],
        &mut out[2 * i..2 * n],
    );
    super::ChunkStats {
        nonfinite_out: nonfinite + tail.nonfinite_out,
        delta_sq: Sums::total(sums.dd) + tail.delta_sq,
        base_sq: Sums::total(sums.bb) + tail.base_sq,
    }
}

/// f16, f16 → f16.
///
/// # Safety
/// As [`bf16`], and the CPU must support F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c")]
pub unsafe fn f16(alpha: f64, sft: &[u8], aligned: &[u8], out: &mut [u8]) -> super::ChunkStats {
    let n = out.len() / 2;
    debug_assert!(sft.len() >= 2 * n && aligned.len() >= 2 * n);
    let va = _mm512_set1_pd(alpha);
    let mut sums = Sums::new();
    let mut nonfinite = 0u64;
    let mut i = 0;
    while i + LANES <= n {
        // SAFETY: as in `bf16`.
        let a = _mm256_loadu_si256(sft.as_ptr().add(2 * i) as *const __m256i);
        let b = _mm256_loadu_si256(aligned.as_ptr().add(2 * i) as *const __m256i);
        let r = block(va, _mm512_cvtph_ps(a), _mm512_cvtph_ps(b), &mut sums);
        // f32 → f16 with round to nearest even (subnormals, overflow and NaN per IEEE).
        let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_castsi512_ps(r),
        );
        let exp = _mm256_and_si256(h, _mm256_set1_epi16(0x7c00));
        nonfinite += _mm256_cmpeq_epi16_mask(exp, _mm256_set1_epi16(0x7c00)).count_ones() as u64;
        _mm256_storeu_si256(out.as_mut_ptr().add(2 * i) as *mut __m256i, h);
        i += LANES;
    }
    let tail = super::portable::extrapolate(
        super::KernelSpec::same(crate::dtype::FloatDtype::F16),
        alpha,
        &sft[2 * i..2 * n],
        &aligned[2 * i..2 * n],
        &mut out[2 * i..2 * n],
    );
    super::ChunkStats {
        nonfinite_out: nonfinite + tail.nonfinite_out,
        delta_sq: Sums::total(sums.dd) + tail.delta_sq,
        base_sq: Sums::total(sums.bb) + tail.base_sq,
    }
}
