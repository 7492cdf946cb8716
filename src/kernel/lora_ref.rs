//! The portable reference of the LoRA row epilogue and the rule for θ0's non-finite
//! elements: what every hand-written version (`kernel/avx512.rs`) must match bit for bit,
//! and what they use for their tails.

use super::Elem;

/// The row epilogue of merging a LoRA adapter (`--as model`), portable: `out[j] =
/// round(w[j] + c·(s·d[j]))` in `E`, with θ0's elements `w` and their rank-r sums `d`
/// (multiply, multiply, add in f64, rounded once). Returns how many outputs are ±inf or
/// NaN. The hand-written versions ([`FastEpilogue`]) give the same bits and use this for
/// their tails.
#[inline(always)]
pub(crate) fn epilogue<E: Elem>(c: f64, s: f64, w: &[u8], d: &[f64], out: &mut [u8]) -> u64 {
    let mut nonfinite = 0;
    for ((&d, w), o) in d
        .iter()
        .zip(w.chunks_exact(E::SIZE))
        .zip(out.chunks_exact_mut(E::SIZE))
    {
        nonfinite += E::store(E::load(w) + c * (s * d), o) as u64;
    }
    nonfinite
}

/// Where θ0's element is ±inf or NaN the output keeps θ0's bits: θ1 = θ0 + ΔW is not
/// finite there either, and the payload a NaN gets through arithmetic is not defined (it
/// may come from either operand). Returns how many outputs are ±inf or NaN where θ0 is
/// finite. Runs only on rows with a non-finite output, so every version shares it.
pub(crate) fn keep_nonfinite_base<E: Elem>(src: &[u8], dst: &mut [u8]) -> u64 {
    let mut new_nonfinite = 0;
    for (w, o) in src.chunks_exact(E::SIZE).zip(dst.chunks_exact_mut(E::SIZE)) {
        if !E::load(w).is_finite() {
            o.copy_from_slice(w);
        } else if !E::load(o).is_finite() {
            new_nonfinite += 1;
        }
    }
    new_nonfinite
}
