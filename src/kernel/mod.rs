//! The fused extrapolation kernel: θ2 = θ1 + α·(θ1 − θ0), element by element.
//!
//! Every element is widened to f64 (exact), computed as subtract, multiply, add — Rust
//! never contracts these into a fused multiply-add — and rounded once to the output format
//! (see [`convert`]). The loops are generic over the three element formats and are compiled
//! several times: portable, and with AVX2/F16C or AVX-512 enabled, chosen at run time. All
//! versions run the same IEEE operations in the same order, so they produce the same bits;
//! the tests check that on every machine they run on.
//!
//! All of the crate's instruction-set-specific code lives under this module, split by what
//! it is rather than by instruction set:
//! - `isa.rs`: the one dispatch. [`Isa`] names a level, [`Level`] proves this CPU runs it
//!   (detected once), and its `per_level!` macro compiles a portable loop for each level
//!   and calls the copy for a given `Level`. It holds the only CPU detection and the only
//!   `#[target_feature]` attributes for portable code.
//! - `avx512.rs`: hand-written AVX-512 intrinsics (the one-format extrapolation kernels and
//!   the LoRA row epilogues), reached only through safe functions that take a [`Level`].
//! - `lora.rs`: the LoRA row epilogue, its portable reference and its hand-written versions
//!   (`lora::FastEpilogue`).
//! - [`convert`]: the exact conversions every level shares.
//!
//! Loops whose rules belong elsewhere stay there and reach the levels through `per_level!`:
//! the `expo diff` sums (`stats/sums.rs`) and the LoRA row products (`adapter/rows.rs`). Files
//! are per purpose, not per instruction set, because the portable loops are one source
//! compiled for every level; only the hand-written kernels are per instruction set, and
//! only AVX-512 has any.
//!
//! Non-finite inputs: where θ0 or θ1 is ±inf or NaN, the output element is θ1's, as a copy
//! or a conversion gives it — θ1's bits unchanged when the output has θ1's format (a NaN's
//! payload included), else θ1 converted as `--dtype` converts it (a NaN stays a NaN of the
//! same sign with the leading bits of its payload, made quiet). Such an element always
//! computes to a non-finite value first, so the fast loops run unchanged and a chunk whose
//! output holds a non-finite value is fixed afterwards by one shared loop
//! ([`portable::keep_nonfinite_inputs`]); every instruction set runs that same code.
//!
//! Buffers are raw little-endian bytes and need not be aligned: tensors in a safetensors
//! file sit at arbitrary byte offsets.

#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod convert;
mod isa;
pub(crate) mod lora;
mod lora_ref;
#[cfg(test)]
pub(crate) mod testing;

pub(crate) use isa::per_level;
pub use isa::{Isa, Level};

use crate::dtype::FloatDtype;

/// One element format: how to read it as f64 and how to round an f64 into it.
pub(crate) trait Elem {
    const DTYPE: FloatDtype;
    const SIZE: usize;
    /// Significand bits stored (without the implicit one).
    const MANTISSA: u32;
    fn load(b: &[u8]) -> f64;
    fn store(x: f64, b: &mut [u8]) -> bool;

    /// The element's bits.
    #[inline(always)]
    fn bits(b: &[u8]) -> u64 {
        let mut w = [0u8; 8];
        w[..Self::SIZE].copy_from_slice(&b[..Self::SIZE]);
        u64::from_le_bytes(w)
    }

    /// Stores a NaN given by its sign and its payload aligned at the top of 52 bits (the
    /// f64 layout): the payload's leading bits that fit, made quiet. Done on the bits, not
    /// with float conversions, whose NaN payloads the compiler does not promise.
    #[inline(always)]
    fn store_nan(negative: bool, payload: u64, b: &mut [u8]) {
        let width = 8 * Self::SIZE as u32;
        let exponent = ((1u64 << (width - 1 - Self::MANTISSA)) - 1) << Self::MANTISSA;
        let mantissa = (payload >> (52 - Self::MANTISSA)) | (1 << (Self::MANTISSA - 1));
        let bits = ((negative as u64) << (width - 1)) | exponent | mantissa;
        b.copy_from_slice(&bits.to_le_bytes()[..Self::SIZE]);
    }

    /// A NaN element's sign and payload, aligned as [`Elem::store_nan`] takes them.
    #[inline(always)]
    fn nan_parts(b: &[u8]) -> (bool, u64) {
        let bits = Self::bits(b);
        let negative = bits >> (8 * Self::SIZE - 1) & 1 == 1;
        let payload = (bits & ((1 << Self::MANTISSA) - 1)) << (52 - Self::MANTISSA);
        (negative, payload)
    }
}

pub(crate) struct Bf16;
pub(crate) struct F16;
pub(crate) struct F32;
pub(crate) struct F64;

impl Elem for Bf16 {
    const DTYPE: FloatDtype = FloatDtype::BF16;
    const SIZE: usize = 2;
    const MANTISSA: u32 = 7;
    #[inline(always)]
    fn load(b: &[u8]) -> f64 {
        convert::bf16_to_f64(u16::from_le_bytes([b[0], b[1]]))
    }
    /// Stores the rounded value; returns true when it is ±inf or NaN.
    #[inline(always)]
    fn store(x: f64, b: &mut [u8]) -> bool {
        let h = convert::f64_to_bf16(x);
        b.copy_from_slice(&h.to_le_bytes());
        h & 0x7f80 == 0x7f80
    }
}

impl Elem for F16 {
    const DTYPE: FloatDtype = FloatDtype::F16;
    const SIZE: usize = 2;
    const MANTISSA: u32 = 10;
    #[inline(always)]
    fn load(b: &[u8]) -> f64 {
        convert::f16_to_f64(u16::from_le_bytes([b[0], b[1]]))
    }
    #[inline(always)]
    fn store(x: f64, b: &mut [u8]) -> bool {
        let h = convert::f64_to_f16(x);
        b.copy_from_slice(&h.to_le_bytes());
        h & 0x7c00 == 0x7c00
    }
}

impl Elem for F32 {
    const DTYPE: FloatDtype = FloatDtype::F32;
    const SIZE: usize = 4;
    const MANTISSA: u32 = 23;
    #[inline(always)]
    fn load(b: &[u8]) -> f64 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64
    }
    #[inline(always)]
    fn store(x: f64, b: &mut [u8]) -> bool {
        let h = convert::f64_to_f32(x);
        b.copy_from_slice(&h.to_le_bytes());
        h & 0x7f80_0000 == 0x7f80_0000
    }
}

impl Elem for F64 {
    const DTYPE: FloatDtype = FloatDtype::F64;
    const SIZE: usize = 8;
    const MANTISSA: u32 = 52;
    #[inline(always)]
    fn load(b: &[u8]) -> f64 {
        f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }
    #[inline(always)]
    fn store(x: f64, b: &mut [u8]) -> bool {
        let h = x.to_bits();
        b.copy_from_slice(&h.to_le_bytes());
        h & 0x7ff0_0000_0000_0000 == 0x7ff0_0000_0000_0000
    }
}

/// The formats of one kernel call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSpec {
    /// θ0's element format.
    pub sft: FloatDtype,
    /// θ1's element format.
    pub aligned: FloatDtype,
    /// The output's element format.
    pub out: FloatDtype,
}

impl KernelSpec {
    /// The same format for both inputs and the output.
    pub fn same(d: FloatDtype) -> KernelSpec {
        KernelSpec {
            sft: d,
            aligned: d,
            out: d,
        }
    }
}

/// What a kernel call saw.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ChunkStats {
    /// Output elements that are ±inf or NaN.
    pub nonfinite_out: u64,
    /// Elements where θ0 or θ1 is ±inf or NaN, whose output is θ1's element (for a
    /// conversion: where θ1 is).
    pub nonfinite_in: u64,
    /// Σ(θ1 − θ0)² over the chunk (extrapolation only), for the whole-model relative change.
    pub delta_sq: f64,
    /// Σθ0² over the chunk (extrapolation only).
    pub base_sq: f64,
}

/// Lanes of the partial sums of squares: the sums vectorize, in a fixed order per
/// instruction set.
const SUM_LANES: usize = 8;

/// Adds eight partial sums pairwise.
#[inline(always)]
fn sum_lanes(v: [f64; SUM_LANES]) -> f64 {
    ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]))
}

#[inline(always)]
fn extrapolate_body<A: Elem, B: Elem, O: Elem>(
    alpha: f64,
    sft: &[u8],
    aligned: &[u8],
    out: &mut [u8],
) -> ChunkStats {
    let n = out.len() / O::SIZE;
    let (sft, aligned, out) = (
        &sft[..n * A::SIZE],
        &aligned[..n * B::SIZE],
        &mut out[..n * O::SIZE],
    );
    let mut nonfinite = 0u64;
    for i in 0..n {
        let t0 = A::load(&sft[i * A::SIZE..i * A::SIZE + A::SIZE]);
        let t1 = B::load(&aligned[i * B::SIZE..i * B::SIZE + B::SIZE]);
        let delta = t1 - t0;
        let y = t1 + alpha * delta;
        nonfinite += O::store(y, &mut out[i * O::SIZE..i * O::SIZE + O::SIZE]) as u64;
    }
    // Accumulating the sums inside the loop above stops it from vectorizing, so they are
    // a second loop over the chunk, which is still in cache.
    let (delta_sq, base_sq) = sums_of_squares::<A, B>(sft, aligned);
    ChunkStats {
        nonfinite_out: nonfinite,
        nonfinite_in: 0,
        delta_sq,
        base_sq,
    }
}

/// (Σ(θ1 − θ0)², Σθ0²) with one partial sum per lane, so that the loop vectorizes.
#[inline(always)]
fn sums_of_squares<A: Elem, B: Elem>(sft: &[u8], aligned: &[u8]) -> (f64, f64) {
    let n = aligned.len() / B::SIZE;
    let mut dd = [0f64; SUM_LANES];
    let mut bb = [0f64; SUM_LANES];
    let full = n / SUM_LANES * SUM_LANES;
    for blk in 0..full / SUM_LANES {
        for lane in 0..SUM_LANES {
            let i = blk * SUM_LANES + lane;
            let t0 = A::load(&sft[i * A::SIZE..i * A::SIZE + A::SIZE]);
            let t1 = B::load(&aligned[i * B::SIZE..i * B::SIZE + B::SIZE]);
            let d = t1 - t0;
            dd[lane] += d * d;
            bb[lane] += t0 * t0;
        }
    }
    for (lane, i) in (full..n).enumerate() {
        let t0 = A::load(&sft[i * A::SIZE..i * A::SIZE + A::SIZE]);
        let t1 = B::load(&aligned[i * B::SIZE..i * B::SIZE + B::SIZE]);
        let d = t1 - t0;
        dd[lane] += d * d;
        bb[lane] += t0 * t0;
    }
    (sum_lanes(dd), sum_lanes(bb))
}

#[inline(always)]
fn cast_body<B: Elem, O: Elem>(aligned: &[u8], out: &mut [u8]) -> ChunkStats {
    let n = out.len() / O::SIZE;
    let (aligned, out) = (&aligned[..n * B::SIZE], &mut out[..n * O::SIZE]);
    let mut nonfinite = 0u64;
    for i in 0..n {
        let t1 = B::load(&aligned[i * B::SIZE..i * B::SIZE + B::SIZE]);
        nonfinite += O::store(t1, &mut out[i * O::SIZE..i * O::SIZE + O::SIZE]) as u64;
    }
    ChunkStats {
        nonfinite_out: nonfinite,
        ..ChunkStats::default()
    }
}

/// Expands to a `match` over every (θ0, θ1, output) format combination.
macro_rules! by_formats {
    ($spec:expr, $body:ident, $($arg:expr),*) => {{
        use FloatDtype as D;
        macro_rules! out {
            ($a:ty, $b:ty) => {
                match $spec.out {
                    D::BF16 => $body::<$a, $b, Bf16>($($arg),*),
                    D::F16 => $body::<$a, $b, F16>($($arg),*),
                    D::F32 => $body::<$a, $b, F32>($($arg),*),
                    D::F64 => $body::<$a, $b, F64>($($arg),*),
                }
            };
        }
        macro_rules! aligned {
            ($a:ty) => {
                match $spec.aligned {
                    D::BF16 => out!($a, Bf16),
                    D::F16 => out!($a, F16),
                    D::F32 => out!($a, F32),
                    D::F64 => out!($a, F64),
                }
            };
        }
        match $spec.sft {
            D::BF16 => aligned!(Bf16),
            D::F16 => aligned!(F16),
            D::F32 => aligned!(F32),
            D::F64 => aligned!(F64),
        }
    }};
}

macro_rules! by_out_formats {
    ($aligned:expr, $out:expr, $body:ident, $($arg:expr),*) => {{
        use FloatDtype as D;
        macro_rules! out {
            ($b:ty) => {
                match $out {
                    D::BF16 => $body::<$b, Bf16>($($arg),*),
                    D::F16 => $body::<$b, F16>($($arg),*),
                    D::F32 => $body::<$b, F32>($($arg),*),
                    D::F64 => $body::<$b, F64>($($arg),*),
                }
            };
        }
        match $aligned {
            D::BF16 => out!(Bf16),
            D::F16 => out!(F16),
            D::F32 => out!(F32),
            D::F64 => out!(F64),
        }
    }};
}

/// The portable loops, called by name where no level is involved: the AVX-512 kernels'
/// tails, and the rule for non-finite inputs, which every level shares.
mod portable {
    use super::*;
    pub fn extrapolate(
        spec: KernelSpec,
        alpha: f64,
        sft: &[u8],
        aligned: &[u8],
        out: &mut [u8],
    ) -> ChunkStats {
        extrapolate_generic(spec, alpha, sft, aligned, out)
    }

    /// After an extrapolation whose output holds a non-finite value: replaces the output
    /// of every element whose θ0 or θ1 is ±inf or NaN by θ1's (see the module docs), and
    /// returns (such elements, non-finite outputs). One function, never inlined, so that
    /// every instruction set runs the very same code.
    #[inline(never)]
    pub fn keep_nonfinite_inputs(
        spec: KernelSpec,
        sft: &[u8],
        aligned: &[u8],
        out: &mut [u8],
    ) -> (u64, u64) {
        by_formats!(spec, keep_nonfinite_body, sft, aligned, out)
    }
}

#[inline(always)]
fn keep_nonfinite_body<A: Elem, B: Elem, O: Elem>(
    sft: &[u8],
    aligned: &[u8],
    out: &mut [u8],
) -> (u64, u64) {
    let n = out.len() / O::SIZE;
    let (mut kept, mut nonfinite) = (0u64, 0u64);
    for i in 0..n {
        let r0 = &sft[i * A::SIZE..(i + 1) * A::SIZE];
        let r1 = &aligned[i * B::SIZE..(i + 1) * B::SIZE];
        let o = &mut out[i * O::SIZE..(i + 1) * O::SIZE];
        let t1 = B::load(r1);
        if A::load(r0).is_finite() && t1.is_finite() {
            nonfinite += !O::load(o).is_finite() as u64;
            continue;
        }
        kept += 1;
        if B::DTYPE == O::DTYPE {
            o.copy_from_slice(r1);
            nonfinite += !t1.is_finite() as u64;
        } else if t1.is_nan() {
            let (negative, payload) = B::nan_parts(r1);
            O::store_nan(negative, payload, o);
            nonfinite += 1;
        } else {
            nonfinite += O::store(t1, o) as u64;
        }
    }
    (kept, nonfinite)
}

/// The generic extrapolation loop over every (θ0, θ1, output) format combination.
#[inline(always)]
fn extrapolate_generic(
    spec: KernelSpec,
    alpha: f64,
    sft: &[u8],
    aligned: &[u8],
    out: &mut [u8],
) -> ChunkStats {
    by_formats!(spec, extrapolate_body, alpha, sft, aligned, out)
}

/// The generic conversion loop over every (θ1, output) format combination.
#[inline(always)]
fn cast_generic(spec: KernelSpec, aligned: &[u8], out: &mut [u8]) -> ChunkStats {
    by_out_formats!(spec.aligned, spec.out, cast_body, aligned, out)
}

per_level! {
    /// [`extrapolate_generic`] compiled for a level.
    fn extrapolate_on(
        spec: KernelSpec,
        alpha: f64,
        sft: &[u8],
        aligned: &[u8],
        out: &mut [u8],
    ) -> ChunkStats = extrapolate_generic;
}

per_level! {
    /// [`cast_generic`] compiled for a level.
    fn cast_on(spec: KernelSpec, aligned: &[u8], out: &mut [u8]) -> ChunkStats = cast_generic;
}

/// Applies the rule for non-finite inputs (see the module docs) to a computed chunk.
fn keep_nonfinite_inputs(
    spec: KernelSpec,
    sft: &[u8],
    aligned: &[u8],
    out: &mut [u8],
    stats: ChunkStats,
) -> ChunkStats {
    // An element with a non-finite input computes to a non-finite value (α is not NaN), so
    // a chunk without non-finite outputs has no such element.
    if stats.nonfinite_out == 0 {
        return stats;
    }
    let (kept, nonfinite) = portable::keep_nonfinite_inputs(spec, sft, aligned, out);
    ChunkStats {
        nonfinite_out: nonfinite,
        nonfinite_in: kept,
        ..stats
    }
}

fn check_lengths(spec: KernelSpec, sft: Option<&[u8]>, aligned: &[u8], out: &[u8]) -> usize {
    let n = out.len() / spec.out.size();
    assert_eq!(
        out.len(),
        n * spec.out.size(),
        "output is not whole elements"
    );
    assert_eq!(
        aligned.len(),
        n * spec.aligned.size(),
        "θ1 length differs from output"
    );
    if let Some(sft) = sft {
        assert_eq!(
            sft.len(),
            n * spec.sft.size(),
            "θ0 length differs from output"
        );
    }
    n
}

/// Computes `out = round(θ1 + α·(θ1 − θ0))` with the given instruction set; where θ0 or θ1
/// is ±inf or NaN, `out` is θ1's element instead (see the module docs), counted in
/// [`ChunkStats::nonfinite_in`].
///
/// `alpha` must not be NaN: the command line only lets finite values through (a rule's
/// factor can make them infinite, which every instruction set handles alike), and with a
/// NaN α the NaN payload of the outputs would depend on the instruction set.
///
/// # Panics
/// If the three buffers do not hold the same number of elements.
pub fn extrapolate_with(
    level: Level,
    spec: KernelSpec,
    alpha: f64,
    sft: &[u8],
    aligned: &[u8],
    out: &mut [u8],
) -> ChunkStats {
    check_lengths(spec, Some(sft), aligned, out);
    let stats = extrapolate_fast(level, spec, alpha, sft, aligned, out);
    keep_nonfinite_inputs(spec, sft, aligned, out, stats)
}

/// The arithmetic of [`extrapolate_with`], before the rule for non-finite inputs: the
/// hand-written AVX-512 kernel for one format in and out where there is one, else the
/// generic loop compiled for `level`.
fn extrapolate_fast(
    level: Level,
    spec: KernelSpec,
    alpha: f64,
    sft: &[u8],
    aligned: &[u8],
    out: &mut [u8],
) -> ChunkStats {
    #[cfg(target_arch = "x86_64")]
    if let Some(stats) = avx512::extrapolate_same_format(level, spec, alpha, sft, aligned, out) {
        return stats;
    }
    extrapolate_on(level, spec, alpha, sft, aligned, out)
}

/// Computes `out = round(θ1)`: a change of format only (α = 0 with a different `--dtype`).
/// Non-finite elements are converted as [`extrapolate_with`] keeps them, and counted in
/// [`ChunkStats::nonfinite_in`].
///
/// # Panics
/// As [`extrapolate_with`].
pub fn cast_with(level: Level, spec: KernelSpec, aligned: &[u8], out: &mut [u8]) -> ChunkStats {
    check_lengths(spec, None, aligned, out);
    let stats = cast_fast(level, spec, aligned, out);
    // θ1's non-finite elements, converted as the extrapolation keeps them.
    let as_extrapolation = KernelSpec {
        sft: spec.aligned,
        ..spec
    };
    keep_nonfinite_inputs(as_extrapolation, aligned, aligned, out, stats)
}

/// The arithmetic of [`cast_with`], before the rule for non-finite values.
fn cast_fast(level: Level, spec: KernelSpec, aligned: &[u8], out: &mut [u8]) -> ChunkStats {
    cast_on(level, spec, aligned, out)
}

/// [`extrapolate_with`] on the best instruction set of this machine.
pub fn extrapolate(
    spec: KernelSpec,
    alpha: f64,
    sft: &[u8],
    aligned: &[u8],
    out: &mut [u8],
) -> ChunkStats {
    extrapolate_with(Level::best(), spec, alpha, sft, aligned, out)
}

/// [`cast_with`] on the best instruction set of this machine.
pub fn cast(spec: KernelSpec, aligned: &[u8], out: &mut [u8]) -> ChunkStats {
    cast_with(Level::best(), spec, aligned, out)
}

/// Counts, in a chunk whose output had non-finite values, the elements where the output is
/// not finite although θ1's element is finite: overflow caused by the extrapolation or by
/// the conversion to the output format (where θ0 is not finite the output is θ1's element,
/// which must fit too). For a conversion, pass θ1 as `sft`.
pub fn count_new_nonfinite(spec: KernelSpec, sft: &[u8], aligned: &[u8], out: &[u8]) -> u64 {
    fn load(d: FloatDtype, b: &[u8], i: usize) -> f64 {
        let s = d.size();
        let e = &b[i * s..(i + 1) * s];
        match d {
            FloatDtype::BF16 => Bf16::load(e),
            FloatDtype::F16 => F16::load(e),
            FloatDtype::F32 => F32::load(e),
            FloatDtype::F64 => F64::load(e),
        }
    }
    let n = check_lengths(spec, Some(sft), aligned, out);
    (0..n)
        .filter(|&i| {
            !load(spec.out, out, i).is_finite() && load(spec.aligned, aligned, i).is_finite()
        })
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: [FloatDtype; 4] = [
        FloatDtype::BF16,
        FloatDtype::F16,
        FloatDtype::F32,
        FloatDtype::F64,
    ];

    /// Independent decoding with the `half` crate, and rounding with a slow reference.
    fn decode(d: FloatDtype, b: &[u8]) -> Vec<f64> {
        b.chunks_exact(d.size())
            .map(|e| match d {
                FloatDtype::BF16 => half::bf16::from_le_bytes([e[0], e[1]]).to_f64(),
                FloatDtype::F16 => half::f16::from_le_bytes([e[0], e[1]]).to_f64(),
                FloatDtype::F32 => f32::from_le_bytes(e.try_into().unwrap()) as f64,
                FloatDtype::F64 => f64::from_le_bytes(e.try_into().unwrap()),
            })
            .collect()
    }

    /// Reference rounding: pick the nearer of the two neighbouring encodings by exact f64
    /// comparison with their midpoint, ties to even. Only for finite, in-range inputs.
    fn reference_round(d: FloatDtype, x: f64) -> Vec<u8> {
        match d {
            FloatDtype::F64 => x.to_le_bytes().to_vec(),
            FloatDtype::F32 => (x as f32).to_le_bytes().to_vec(), // IEEE conversion, RNE
            FloatDtype::BF16 | FloatDtype::F16 => {
                let widen = |h: u16| match d {
                    FloatDtype::BF16 => half::bf16::from_bits(h).to_f64(),
                    _ => half::f16::from_bits(h).to_f64(),
                };
                let inf: u16 = if d == FloatDtype::BF16 {
                    0x7f80
                } else {
                    0x7c00
                };
                let sign = if x.is_sign_negative() { 0x8000u16 } else { 0 };
                let a = x.abs();
                let (mut lo, mut hi) = (0u16, inf);
                // Invariant: widen(lo) <= a < widen(hi) (hi = inf stands for +infinity).
                let max = widen(inf - 1);
                let bits = if a >= max {
                    let mid = max + (max - widen(inf - 2)) / 2.0;
                    if a < mid {
                        inf - 1
                    } else {
                        inf
                    }
                } else {
                    while hi - lo > 1 {
                        let m = lo + (hi - lo) / 2;
                        if widen(m) <= a {
                            lo = m
                        } else {
                            hi = m
                        }
                    }
                    let mid = (widen(lo) + widen(hi)) / 2.0;
                    if a < mid || (a == mid && lo % 2 == 0) {
                        lo
                    } else {
                        hi
                    }
                };
                (sign | bits).to_le_bytes().to_vec()
            }
        }
    }

    fn encode(d: FloatDtype, xs: &[f64]) -> Vec<u8> {
        xs.iter().flat_map(|&x| reference_round(d, x)).collect()
    }

    fn check_all_isas(spec: KernelSpec, alpha: f64, sft: &[u8], aligned: &[u8]) -> Vec<u8> {
        check_all_isas_stats(spec, alpha, sft, aligned).0
    }

    /// Runs every instruction set, checks that they agree on the output bits and on both
    /// counts, and returns the output and the stats.
    fn check_all_isas_stats(
        spec: KernelSpec,
        alpha: f64,
        sft: &[u8],
        aligned: &[u8],
    ) -> (Vec<u8>, ChunkStats) {
        let n = aligned.len() / spec.aligned.size();
        let mut first: Option<(Vec<u8>, ChunkStats)> = None;
        for isa in Level::available() {
            let mut out = vec![0u8; n * spec.out.size()];
            let stats = extrapolate_with(isa, spec, alpha, sft, aligned, &mut out);
            match &first {
                None => first = Some((out, stats)),
                Some((f, st)) => {
                    assert_eq!(f, &out, "{} differs from portable for {spec:?}", isa.name());
                    assert_eq!(
                        (st.nonfinite_out, st.nonfinite_in),
                        (stats.nonfinite_out, stats.nonfinite_in),
                        "{} counts non-finite values differently for {spec:?}",
                        isa.name()
                    );
                }
            }
        }
        first.expect("portable is always available")
    }

    /// The special values of a format: +inf, −inf, a quiet NaN, a negative quiet NaN with a
    /// payload, a signalling NaN with a payload.
    fn specials(d: FloatDtype) -> [u64; 5] {
        match d {
            FloatDtype::BF16 => [0x7f80, 0xff80, 0x7fc0, 0xffc5, 0x7f81],
            FloatDtype::F16 => [0x7c00, 0xfc00, 0x7e00, 0xfe05, 0x7c01],
            FloatDtype::F32 => [
                0x7f80_0000,
                0xff80_0000,
                0x7fc0_0000,
                0xffc0_0005,
                0x7f80_0001,
            ],
            FloatDtype::F64 => [
                0x7ff0_0000_0000_0000,
                0xfff0_0000_0000_0000,
                0x7ff8_0000_0000_0000,
                0xfff8_0000_0000_0005,
                0x7ff0_0000_0000_0001,
            ],
        }
    }

    fn put(d: FloatDtype, bytes: &mut [u8], i: usize, bits: u64) {
        let s = d.size();
        bytes[i * s..(i + 1) * s].copy_from_slice(&bits.to_le_bytes()[..s]);
    }

    fn get(d: FloatDtype, bytes: &[u8], i: usize) -> u64 {
        let s = d.size();
        let mut b = [0u8; 8];
        b[..s].copy_from_slice(&bytes[i * s..(i + 1) * s]);
        u64::from_le_bytes(b)
    }

    /// Checks that output element `i` is θ1's element kept: its bits when the formats are
    /// the same; else θ1 converted (±inf exact, a finite value rounded once, a NaN a NaN of
    /// the same sign that is quiet and keeps the leading payload bits that fit).
    fn assert_kept(spec: KernelSpec, aligned: &[u8], out: &[u8], i: usize, ctx: &str) {
        let (b, o) = (spec.aligned, spec.out);
        let got = get(o, out, i);
        let raw = get(b, aligned, i);
        if b == o {
            assert_eq!(got, raw, "{ctx}: {spec:?} [{i}] not θ1's bits");
            return;
        }
        let x = decode(b, &aligned[i * b.size()..(i + 1) * b.size()])[0];
        let y = decode(o, &out[i * o.size()..(i + 1) * o.size()])[0];
        if x.is_nan() {
            assert!(y.is_nan(), "{ctx}: {spec:?} [{i}] NaN became {y}");
            assert_eq!(
                x.is_sign_negative(),
                y.is_sign_negative(),
                "{ctx}: NaN sign"
            );
            // The payload, aligned at its top bit (the quiet bit), as far as both hold it.
            let man = |d: FloatDtype| match d {
                FloatDtype::BF16 => 7,
                FloatDtype::F16 => 10,
                FloatDtype::F32 => 23,
                FloatDtype::F64 => 52,
            };
            let (mb, mo) = (man(b), man(o));
            let payload_in = raw & ((1u64 << mb) - 1);
            let payload_out = got & ((1u64 << mo) - 1);
            let keep = mb.min(mo);
            let top = |p: u64, m: u32| p >> (m - keep);
            let quiet = 1u64 << (keep - 1);
            assert_eq!(
                top(payload_out, mo),
                top(payload_in, mb) | quiet,
                "{ctx}: {spec:?} [{i}] NaN payload {raw:#x} -> {got:#x}"
            );
        } else {
            assert_eq!(
                out[i * o.size()..(i + 1) * o.size()],
                reference_round(o, x)[..],
                "{ctx}: {spec:?} [{i}] θ1 = {x} not converted"
            );
        }
    }

    /// Non-finite values in θ0, θ1 or both, at every position of a chunk that spans whole
    /// blocks of every AVX-512 kernel and a tail: every instruction set keeps θ1's element
    /// there, counts it, and computes every other element as usual.
    #[test]
    fn non_finite_inputs_keep_aligned_at_every_position() {
        const N: usize = 2 * 32 + 7;
        for &a in &ALL {
            for &b in &ALL {
                for &o in &ALL {
                    let spec = KernelSpec {
                        sft: a,
                        aligned: b,
                        out: o,
                    };
                    let t0 = sample_values(a, 11, N);
                    let t1: Vec<f64> = sample_values(b, 12, N)
                        .iter()
                        .zip(&t0)
                        .map(|(x, y)| decode(b, &encode(b, &[y + x * 1e-2]))[0])
                        .collect();
                    let (e0, e1) = (encode(a, &t0), encode(b, &t1));
                    let alpha = 0.3;
                    let want: Vec<f64> = t0
                        .iter()
                        .zip(&t1)
                        .map(|(&x0, &x1)| x1 + alpha * (x1 - x0))
                        .collect();
                    let want = encode(o, &want);
                    let (sa, sb) = (specials(a), specials(b));
                    // (θ0, θ1): a special on one side, the other, or both.
                    let mut cases: Vec<(Option<u64>, Option<u64>)> = Vec::new();
                    for k in 0..5 {
                        cases.push((Some(sa[k]), None));
                        cases.push((None, Some(sb[k])));
                        cases.push((Some(sa[k]), Some(sb[k])));
                        cases.push((Some(sa[(k + 1) % 5]), Some(sb[k])));
                    }
                    for pos in 0..N {
                        for &(s0, s1) in &cases {
                            let (mut x0, mut x1) = (e0.clone(), e1.clone());
                            if let Some(bits) = s0 {
                                put(a, &mut x0, pos, bits);
                            }
                            if let Some(bits) = s1 {
                                put(b, &mut x1, pos, bits);
                            }
                            let (got, stats) = check_all_isas_stats(spec, alpha, &x0, &x1);
                            let ctx = format!("θ0 {s0:x?}, θ1 {s1:x?} at {pos}");
                            assert_eq!(stats.nonfinite_in, 1, "{ctx}: {spec:?}");
                            assert_eq!(stats.nonfinite_out, s1.is_some() as u64, "{ctx}: {spec:?}");
                            assert_kept(spec, &x1, &got, pos, &ctx);
                            let os = o.size();
                            assert_eq!(got[..pos * os], want[..pos * os], "{ctx}: {spec:?}");
                            assert_eq!(
                                got[(pos + 1) * os..],
                                want[(pos + 1) * os..],
                                "{ctx}: {spec:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A conversion keeps θ1's non-finite values as the extrapolation does, on every
    /// instruction set, and counts them.
    #[test]
    fn cast_keeps_non_finite_values() {
        for &b in &ALL {
            for &o in &ALL {
                let spec = KernelSpec {
                    sft: b,
                    aligned: b,
                    out: o,
                };
                let n = 2 * 32 + 7;
                let mut t1 = encode(b, &sample_values(b, 9, n));
                let specials = specials(b);
                let at: Vec<usize> = (0..n).filter(|i| i % 6 == 1 || *i == n - 1).collect();
                for (k, &i) in at.iter().enumerate() {
                    put(b, &mut t1, i, specials[k % 5]);
                }
                let mut first: Option<Vec<u8>> = None;
                for isa in Level::available() {
                    let mut out = vec![0u8; n * o.size()];
                    let stats = cast_with(isa, spec, &t1, &mut out);
                    assert_eq!(stats.nonfinite_in, at.len() as u64, "{spec:?}");
                    assert_eq!(stats.nonfinite_out, at.len() as u64, "{spec:?}");
                    for &i in &at {
                        assert_kept(spec, &t1, &out, i, isa.name());
                    }
                    if let Some(f) = &first {
                        assert_eq!(f, &out, "{spec:?} {}", isa.name());
                    }
                    first = Some(out);
                }
            }
        }
    }

    /// ±inf on both sides, of the same sign or not, and α of any sign: θ1's infinity (the
    /// formula would give inf − inf = NaN, or the opposite infinity for α < −1).
    #[test]
    fn infinities_on_both_sides_keep_aligned() {
        for d in ALL {
            let [inf, neg_inf, ..] = specials(d);
            let mut t0 = vec![0u8; 4 * d.size()];
            let mut t1 = t0.clone();
            for (i, (x0, x1)) in [
                (inf, inf),
                (neg_inf, neg_inf),
                (inf, neg_inf),
                (neg_inf, inf),
            ]
            .into_iter()
            .enumerate()
            {
                put(d, &mut t0, i, x0);
                put(d, &mut t1, i, x1);
            }
            for alpha in [0.3, -0.5, -2.0, 8.0, 0.0, f64::INFINITY] {
                let (got, stats) = check_all_isas_stats(KernelSpec::same(d), alpha, &t0, &t1);
                assert_eq!(got, t1, "{d} alpha {alpha}");
                assert_eq!((stats.nonfinite_in, stats.nonfinite_out), (4, 4));
            }
        }
    }

    fn sample_values(d: FloatDtype, seed: u64, n: usize) -> Vec<f64> {
        let mut s = seed | 1;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let unit = (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                let scale = match i % 4 {
                    0 => 1.0,
                    1 => 1e-3,
                    2 => 30.0,
                    _ => 1e-6,
                };
                // Round the sample into the input format so it is representable.
                let x = unit * scale;
                decode(d, &encode(d, &[x]))[0]
            })
            .collect()
    }

    #[test]
    fn matches_the_f64_formula_for_every_format_combination() {
        for &a in &ALL {
            for &b in &ALL {
                for &o in &ALL {
                    let spec = KernelSpec {
                        sft: a,
                        aligned: b,
                        out: o,
                    };
                    let t0 = sample_values(a, 1, 3001);
                    let t1: Vec<f64> = sample_values(b, 2, 3001)
                        .iter()
                        .zip(&t0)
                        .map(|(x, y)| decode(b, &encode(b, &[y + x * 1e-2]))[0])
                        .collect();
                    for alpha in [0.3, 2.5, -0.5, 8.0, 1e-9] {
                        let got = check_all_isas(spec, alpha, &encode(a, &t0), &encode(b, &t1));
                        let want: Vec<f64> = t0
                            .iter()
                            .zip(&t1)
                            .map(|(&x0, &x1)| x1 + alpha * (x1 - x0))
                            .collect();
                        let want = encode(o, &want);
                        assert_eq!(got, want, "{spec:?} alpha {alpha}");
                    }
                }
            }
        }
    }

    #[test]
    fn special_values() {
        let spec = KernelSpec {
            sft: FloatDtype::F32,
            aligned: FloatDtype::F32,
            out: FloatDtype::BF16,
        };
        let t0 = [
            0.0f32,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NAN,
            1e-40,
            3.0e38,
            0.0,
        ];
        let t1 = [
            -0.0f32,
            0.0,
            1.0,
            f32::INFINITY,
            1.0,
            2e-40,
            -3.0e38,
            f32::from_bits(1),
        ];
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let out = check_all_isas(spec, 0.5, &bytes(&t0), &bytes(&t1));
        let got: Vec<u16> = out
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        // -0 + 0.5·(-0 - 0) = -0 + -0 = -0
        assert_eq!(got[0], 0x8000);
        // 0 + 0.5·(0 + 0) = +0
        assert_eq!(got[1], 0x0000);
        assert_eq!(got[2], 0x3f80);
        // an infinite input: θ1's element (inf), not inf − inf = NaN
        assert_eq!(got[3], 0x7f80);
        // a NaN θ0: θ1's element
        assert_eq!(got[4], 0x3f80);
        // subnormal: 2e-40 + 0.5·1e-40 = 2.5e-40, rounded once to bf16
        assert_eq!(
            got[5],
            u16::from_le_bytes(
                reference_round(
                    FloatDtype::BF16,
                    2e-40f32 as f64 + 0.5 * (2e-40f32 as f64 - 1e-40f32 as f64)
                )
                .try_into()
                .unwrap()
            )
        );
        // overflow to -inf
        assert_eq!(got[6], 0xff80);
        // the smallest f32 subnormal ×1.5 underflows to +0 in bf16
        assert_eq!(got[7], 0x0000);
        let mut out = vec![0u8; 16];
        let stats = extrapolate(spec, 0.5, &bytes(&t0), &bytes(&t1), &mut out);
        assert_eq!(stats.nonfinite_out, 2);
        assert_eq!(stats.nonfinite_in, 2);
        assert_eq!(
            count_new_nonfinite(spec, &bytes(&t0), &bytes(&t1), &out),
            1,
            "only the overflow is new"
        );
    }

    #[test]
    fn cast_rounds_once() {
        for &b in &ALL {
            for &o in &ALL {
                let spec = KernelSpec {
                    sft: b,
                    aligned: b,
                    out: o,
                };
                let t1 = sample_values(b, 7, 999);
                let mut first: Option<Vec<u8>> = None;
                for isa in Level::available() {
                    let mut out = vec![0u8; t1.len() * o.size()];
                    cast_with(isa, spec, &encode(b, &t1), &mut out);
                    assert_eq!(out, encode(o, &t1), "{spec:?} {}", isa.name());
                    if let Some(f) = &first {
                        assert_eq!(f, &out)
                    }
                    first = Some(out);
                }
            }
        }
    }

    #[test]
    fn sums_of_squares_match_a_plain_sum() {
        for (a, b) in [
            (FloatDtype::F32, FloatDtype::BF16),
            (FloatDtype::BF16, FloatDtype::BF16),
            (FloatDtype::F16, FloatDtype::F16),
        ] {
            let spec = KernelSpec {
                sft: a,
                aligned: b,
                out: b,
            };
            let t0 = sample_values(a, 3, 1003);
            let t1 = sample_values(b, 4, 1003);
            let want_dd: f64 = t0.iter().zip(&t1).map(|(x, y)| (y - x) * (y - x)).sum();
            let want_bb: f64 = t0.iter().map(|x| x * x).sum();
            for isa in Level::available() {
                let mut out = vec![0u8; 1003 * b.size()];
                let st =
                    extrapolate_with(isa, spec, 0.3, &encode(a, &t0), &encode(b, &t1), &mut out);
                assert!(
                    (st.delta_sq - want_dd).abs() <= 1e-12 * want_dd,
                    "{spec:?} {}: {} vs {want_dd}",
                    isa.name(),
                    st.delta_sq
                );
                assert!(
                    (st.base_sq - want_bb).abs() <= 1e-12 * want_bb,
                    "{spec:?} {}: {} vs {want_bb}",
                    isa.name(),
                    st.base_sq
                );
            }
        }
    }

    fn u16_bytes(bits: &[u16]) -> Vec<u8> {
        bits.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// The bf16 kernels work on blocks of 32 elements and redo a block whose f32
    /// intermediate is subnormal: one such element at any position of a block, in an even
    /// or odd lane, and the tail.
    #[test]
    fn bf16_block_with_one_subnormal_result() {
        let spec = KernelSpec::same(FloatDtype::BF16);
        let n = 2 * 32 + 7;
        let normal: Vec<u16> = (0..n as u16).map(|k| 0x3f80 + 3 * k).collect();
        // (θ0, θ1): θ1 + 0.3(θ1 − θ0) is an f32 (and bf16) subnormal, or just below the
        // smallest normal, or exactly the smallest normal.
        let cases = [
            (0x0005, 0x0005),
            (0x0003, 0x0041),
            (0x0081, 0x0080),
            (0x0080, 0x0080),
        ];
        for (t0_bits, t1_bits) in cases {
            for pos in 0..n {
                let mut t0 = normal.clone();
                let mut t1: Vec<u16> = normal.iter().map(|x| x + 1).collect();
                t0[pos] = t0_bits;
                t1[pos] = t1_bits;
                let got = check_all_isas(spec, 0.3, &u16_bytes(&t0), &u16_bytes(&t1));
                let x0 = decode(FloatDtype::BF16, &u16_bytes(&t0));
                let x1 = decode(FloatDtype::BF16, &u16_bytes(&t1));
                let want: Vec<f64> = x0.iter().zip(&x1).map(|(a, b)| b + 0.3 * (b - a)).collect();
                assert_eq!(
                    got,
                    encode(FloatDtype::BF16, &want),
                    "({t0_bits:#06x}, {t1_bits:#06x}) at {pos}"
                );
            }
        }
    }

    proptest! {
        /// Any bit patterns at all (NaNs, infinities, subnormals): every instruction set
        /// gives the same bits as the portable loop.
        #[test]
        fn isas_agree_on_arbitrary_bits(
            a in prop::collection::vec(any::<u16>(), 0..300),
            b_seed in any::<u64>(),
            alpha in prop_oneof![Just(0.3f64), Just(-0.5), Just(2.5), -10.0f64..10.0],
            out_idx in 0usize..4,
        ) {
            let mut s = b_seed | 1;
            let b: Vec<u16> = a.iter().map(|_| { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s as u16 }).collect();
            for d in [FloatDtype::BF16, FloatDtype::F16] {
                let spec = KernelSpec { sft: d, aligned: d, out: ALL[out_idx] };
                let ab: Vec<u8> = a.iter().flat_map(|x| x.to_le_bytes()).collect();
                let bb: Vec<u8> = b.iter().flat_map(|x| x.to_le_bytes()).collect();
                check_all_isas(spec, alpha, &ab, &bb);
            }
        }

        /// Non-finite values anywhere in θ0 and θ1: every instruction set agrees, and the
        /// elements kept from θ1 are the ones with a non-finite input.
        #[test]
        fn non_finite_inputs_anywhere(
            picks in prop::collection::vec((0u8..12, 0u8..12), 0..200),
            alpha in prop_oneof![Just(0.3f64), Just(-0.5), Just(-3.0), Just(0.0), -10.0f64..10.0],
            formats in (0usize..4, 0usize..4, 0usize..4),
        ) {
            let spec = KernelSpec { sft: ALL[formats.0], aligned: ALL[formats.1], out: ALL[formats.2] };
            let n = picks.len();
            let mut t0 = encode(spec.sft, &sample_values(spec.sft, 5, n));
            let mut t1 = encode(spec.aligned, &sample_values(spec.aligned, 6, n));
            let mut special = 0u64;
            for (i, &(p0, p1)) in picks.iter().enumerate() {
                // 0..5 a special value, else the finite sample.
                if p0 < 5 {
                    put(spec.sft, &mut t0, i, specials(spec.sft)[p0 as usize]);
                }
                if p1 < 5 {
                    put(spec.aligned, &mut t1, i, specials(spec.aligned)[p1 as usize]);
                }
                special += (p0 < 5 || p1 < 5) as u64;
            }
            let (got, stats) = check_all_isas_stats(spec, alpha, &t0, &t1);
            prop_assert_eq!(stats.nonfinite_in, special);
            for (i, &(p0, p1)) in picks.iter().enumerate() {
                if p0 < 5 || p1 < 5 {
                    assert_kept(spec, &t1, &got, i, "proptest");
                }
            }
        }

        /// The same for f32 and f64 inputs, whose AVX-512 kernels count non-finite
        /// outputs on their own.
        #[test]
        fn isas_agree_on_arbitrary_wide_bits(
            a in prop::collection::vec(any::<u64>(), 0..150),
            b_seed in any::<u64>(),
            alpha in prop_oneof![Just(0.3f64), Just(-0.5), Just(2.5), -10.0f64..10.0],
            out_idx in 0usize..4,
        ) {
            let mut s = b_seed | 1;
            let b: Vec<u64> = a.iter().map(|_| { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s }).collect();
            let f32_bytes = |v: &[u64]| v.iter().flat_map(|&x| (x as u32).to_le_bytes()).collect::<Vec<u8>>();
            let f64_bytes = |v: &[u64]| v.iter().flat_map(|&x| x.to_le_bytes()).collect::<Vec<u8>>();
            let out = ALL[out_idx];
            check_all_isas(KernelSpec { sft: FloatDtype::F32, aligned: FloatDtype::F32, out }, alpha, &f32_bytes(&a), &f32_bytes(&b));
            check_all_isas(KernelSpec { sft: FloatDtype::F64, aligned: FloatDtype::F64, out }, alpha, &f64_bytes(&a), &f64_bytes(&b));
        }

        /// bf16 results among the subnormals and the smallest normals, where the AVX-512
        /// kernels redo a block exactly: the redo must round once too, ties and near ties
        /// included.
        #[test]
        fn bf16_subnormal_results_round_once(
            t1 in prop::collection::vec(0x0000u16..0x0100, 0..200),
            steps in prop::collection::vec(-4i16..=4, 200),
            negative in any::<bool>(),
            alpha in prop_oneof![
                Just(0.5f64), Just(0.25), Just(-0.5), Just(0.3),
                Just(0.25 + 1e-9), Just(0.5 - 1e-9), Just(-0.25 + 1e-10),
                -8.0f64..8.0,
            ],
        ) {
            let sign = if negative { 0x8000 } else { 0 };
            let t0: Vec<u16> = t1.iter().zip(&steps).map(|(x, d)| x.saturating_add_signed(*d) | sign).collect();
            let t1: Vec<u16> = t1.iter().map(|x| x | sign).collect();
            let d = FloatDtype::BF16;
            let got = check_all_isas(KernelSpec::same(d), alpha, &u16_bytes(&t0), &u16_bytes(&t1));
            let x0 = decode(d, &u16_bytes(&t0));
            let x1 = decode(d, &u16_bytes(&t1));
            let want: Vec<f64> = x0.iter().zip(&x1).map(|(a, b)| b + alpha * (b - a)).collect();
            prop_assert_eq!(got, encode(d, &want));
        }

        /// bf16 and f16 results next to the halfway points between two values of the
        /// format, where a wrong sticky bit or a double rounding shows: θ0 a few units in
        /// the last place from θ1, α dyadic (exact ties) or not. Every instruction set
        /// equals the reference.
        #[test]
        fn half_formats_near_ties_round_once(
            magnitudes in prop::collection::vec(0.0f64..1.0, 0..200),
            steps in prop::collection::vec(-4i16..=4, 200),
            negative in any::<bool>(),
            alpha in prop_oneof![
                Just(0.5f64), Just(0.25), Just(1.5), Just(-0.5), Just(0.3), Just(3.0),
                // just off a tie: only the sticky bit tells the two roundings apart
                Just(0.5 + 1e-9), Just(0.5 - 1e-9), Just(1.5 + 1e-12), Just(-0.25 + 1e-10),
                Just(0.25 + 1e-9),
                -8.0f64..8.0,
            ],
        ) {
            let sign = if negative { 0x8000 } else { 0 };
            // Normal values of each format, short of the largest binades (no overflow).
            for (d, lowest, highest) in [(FloatDtype::BF16, 0x0080u16, 0x7f00u16), (FloatDtype::F16, 0x0400, 0x7800)] {
                let t1: Vec<u16> = magnitudes
                    .iter()
                    .map(|m| (lowest + (m * f64::from(highest - lowest)) as u16) | sign)
                    .collect();
                let t0: Vec<u16> = t1.iter().zip(&steps).map(|(x, d)| x.wrapping_add_signed(*d)).collect();
                let got = check_all_isas(KernelSpec::same(d), alpha, &u16_bytes(&t0), &u16_bytes(&t1));
                let x0 = decode(d, &u16_bytes(&t0));
                let x1 = decode(d, &u16_bytes(&t1));
                let want: Vec<f64> = x0.iter().zip(&x1).map(|(a, b)| b + alpha * (b - a)).collect();
                prop_assert_eq!(got, encode(d, &want), "{}", d);
            }
        }
    }
}
