//! The hot loop of `--as model`: rows of θ0 + (1+α)·s·(left ᵀ·right), computed in f64
//! with the rank-r sum in order (k = 0..r, no FMA) and rounded once.
//!
//! Rows are taken four at a time and columns eight at a time, so each load of `right`
//! feeds eight accumulators held in registers; the body is compiled once per instruction
//! set (portable, AVX2, AVX-512) and chosen at run time, like the extrapolation kernels.

use crate::dtype::FloatDtype;
use crate::kernel::Isa;

use super::lora::{decode_into, encode_into, Factors, Orientation};

/// Rows per register block.
const RB: usize = 8;
/// Columns per register block.
const CB: usize = 8;

/// What one block of rows of one weight tensor needs.
pub struct Rows<'a> {
    pub factors: &'a Factors,
    /// θ0's bytes for rows `first..first + n`.
    pub w0: &'a [u8],
    pub dtype: FloatDtype,
    pub first: usize,
    pub alpha: f64,
    /// DoRA: m / ‖W0 + ΔW‖ per output feature, and how features lie in storage.
    pub dora: Option<(&'a [f64], Orientation)>,
}

/// Scratch space one worker reuses.
#[derive(Default)]
pub struct Scratch {
    acc: Vec<f64>,
    lk: Vec<f64>,
    w: Vec<f64>,
    v: Vec<f64>,
}

/// Writes the rows into `out` (θ0's dtype). Returns how many finite θ0 values became
/// non-finite.
pub fn weight_rows(job: &Rows, out: &mut [u8], scratch: &mut Scratch) -> u64 {
    match Isa::best() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 => {
            // SAFETY: Isa::best() returns these only when the CPU supports every feature
            // the function enables.
            unsafe { weight_rows_avx512(job, out, scratch) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: as above, AVX2 and F16C are present.
            unsafe { weight_rows_avx2(job, out, scratch) }
        }
        _ => body(job, out, scratch),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")]
unsafe fn weight_rows_avx512(job: &Rows, out: &mut [u8], scratch: &mut Scratch) -> u64 {
    body(job, out, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn weight_rows_avx2(job: &Rows, out: &mut [u8], scratch: &mut Scratch) -> u64 {
    body(job, out, scratch)
}

#[inline(always)]
fn body(job: &Rows, out: &mut [u8], scratch: &mut Scratch) -> u64 {
    let f = job.factors;
    let cols = f.cols;
    let size = job.dtype.size();
    let n = job.w0.len() / (cols * size).max(1);
    scratch.acc.resize(RB * cols, 0.0);
    scratch.w.resize(cols, 0.0);
    scratch.v.resize(cols, 0.0);
    let c = 1.0 + job.alpha;
    let s = f.scaling;
    let mut new_nonfinite = 0;
    let mut i0 = 0;
    while i0 < n {
        let nb = RB.min(n - i0);
        products(f, job.first + i0, nb, &mut scratch.acc, &mut scratch.lk);
        for i in 0..nb {
            let row = job.first + i0 + i;
            let src = &job.w0[(i0 + i) * cols * size..(i0 + i + 1) * cols * size];
            let dst = &mut out[(i0 + i) * cols * size..(i0 + i + 1) * cols * size];
            decode_into(job.dtype, src, &mut scratch.w);
            let acc = &scratch.acc[i * cols..(i + 1) * cols];
            match job.dora {
                None => {
                    for ((v, &w), &d) in scratch.v.iter_mut().zip(&scratch.w).zip(acc) {
                        *v = w + c * (s * d);
                    }
                }
                Some((g, orientation)) => {
                    // W1 = g·(W0 + ΔW), g = m / ‖W0 + ΔW‖ per output feature;
                    // θ2 = (1+α)·W1 − α·W0.
                    for (j, ((v, &w), &d)) in
                        scratch.v.iter_mut().zip(&scratch.w).zip(acc).enumerate()
                    {
                        let gj = match orientation {
                            Orientation::Conv1D => g[j],
                            _ => g[row],
                        };
                        let w1 = gj * (w + s * d);
                        *v = c * w1 - job.alpha * w;
                    }
                }
            }
            encode_into(job.dtype, &scratch.v, dst);
            if any_nonfinite(job.dtype, dst) {
                new_nonfinite += count_new_nonfinite(job.dtype, &scratch.w, dst);
            }
        }
        i0 += nb;
    }
    new_nonfinite
}

/// acc[i·cols + c] = Σₖ left[k, row0 + i]·right[k, c] for i < nb, k in order.
///
/// A partial block (nb < RB) repeats its last row in the spare accumulators, whose
/// results are not used.
#[inline(always)]
fn products(f: &Factors, row0: usize, nb: usize, acc: &mut [f64], lk: &mut Vec<f64>) {
    let (rows, cols) = (f.rows, f.cols);
    // left[k, row0 + i] for k in order, RB at a time.
    lk.clear();
    for lrow in f.left.chunks_exact(rows).take(f.rank) {
        for i in 0..RB {
            lk.push(lrow[row0 + i.min(nb - 1)]);
        }
    }
    let mut c0 = 0;
    while c0 + CB <= cols {
        let mut a = [[0.0f64; CB]; RB];
        for (l, rrow) in lk.chunks_exact(RB).zip(f.right.chunks_exact(cols)) {
            let Ok(rr) = <&[f64; CB]>::try_from(&rrow[c0..c0 + CB]) else {
                continue;
            };
            for i in 0..RB {
                for x in 0..CB {
                    a[i][x] += l[i] * rr[x];
                }
            }
        }
        for (i, ai) in a.iter().enumerate().take(nb) {
            acc[i * cols + c0..i * cols + c0 + CB].copy_from_slice(ai);
        }
        c0 += CB;
    }
    for i in 0..nb {
        tail(f, row0 + i, c0, &mut acc[i * cols..(i + 1) * cols]);
    }
}

/// One row's products for columns `from..cols`, element by element.
#[inline(always)]
fn tail(f: &Factors, row: usize, from: usize, acc: &mut [f64]) {
    for (c, a) in acc.iter_mut().enumerate().skip(from) {
        let mut sum = 0.0;
        for k in 0..f.rank {
            sum += f.left[k * f.rows + row] * f.right[k * f.cols + c];
        }
        *a = sum;
    }
}

/// True when some encoded value is ±inf or NaN (all exponent bits set).
#[inline(always)]
fn any_nonfinite(d: FloatDtype, bytes: &[u8]) -> bool {
    match d {
        FloatDtype::BF16 => bytes.chunks_exact(2).fold(false, |a, c| {
            a | (u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80)
        }),
        FloatDtype::F16 => bytes.chunks_exact(2).fold(false, |a, c| {
            a | (u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00)
        }),
        FloatDtype::F32 => bytes.chunks_exact(4).fold(false, |a, c| {
            a | (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000)
        }),
        FloatDtype::F64 => bytes.chunks_exact(8).any(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            !f64::from_le_bytes(b).is_finite()
        }),
    }
}

/// Counts outputs that are non-finite where θ0 is finite.
fn count_new_nonfinite(d: FloatDtype, w0: &[f64], out: &[u8]) -> u64 {
    let mut back = vec![0.0; w0.len()];
    decode_into(d, out, &mut back);
    w0.iter()
        .zip(&back)
        .filter(|(w, b)| w.is_finite() && !b.is_finite())
        .count() as u64
}

/// Rounds `values` into `out` (exposed for the bias and scaling paths).
pub fn encode(d: FloatDtype, values: &[f64], out: &mut [u8]) {
    encode_into(d, values, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocked products equal the plain sum in order, for every row/column tail.
    #[test]
    fn blocked_products_match_the_plain_sum() {
        for (rows, cols, rank) in [(9, 19, 3), (4, 8, 1), (1, 5, 16), (13, 17, 5)] {
            let left: Vec<f64> = (0..rank * rows).map(|i| (i as f64 * 0.37).sin()).collect();
            let right: Vec<f64> = (0..rank * cols).map(|i| (i as f64 * 0.91).cos()).collect();
            let f = Factors {
                rank,
                rows,
                cols,
                left: left.clone(),
                right: right.clone(),
                scaling: 0.5,
            };
            let w0: Vec<f64> = (0..rows * cols).map(|i| i as f64 * 0.01).collect();
            let mut bytes = vec![0u8; rows * cols * 8];
            encode_into(FloatDtype::F64, &w0, &mut bytes);
            let job = Rows {
                factors: &f,
                w0: &bytes,
                dtype: FloatDtype::F64,
                first: 0,
                alpha: 0.25,
                dora: None,
            };
            let mut out = vec![0u8; bytes.len()];
            assert_eq!(body(&job, &mut out, &mut Scratch::default()), 0);
            let mut got = vec![0.0; rows * cols];
            decode_into(FloatDtype::F64, &out, &mut got);
            for r in 0..rows {
                for c in 0..cols {
                    let mut sum = 0.0;
                    for k in 0..rank {
                        sum += left[k * rows + r] * right[k * cols + c];
                    }
                    let e = w0[r * cols + c] + 1.25 * (0.5 * sum);
                    assert_eq!(
                        got[r * cols + c].to_bits(),
                        e.to_bits(),
                        "{rows}x{cols} r{rank} [{r},{c}]"
                    );
                }
            }
        }
    }
}
