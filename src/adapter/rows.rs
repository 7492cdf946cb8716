//! The hot loop of `--as model`: rows of θ0 + (1+α)·(s·(leftᵀ·right)), computed in f64
//! with the rank-r sum in order (k = 0..r, no FMA) and rounded once.
//!
//! Two steps per block of rows. The products: rows eight at a time and columns eight at a
//! time, so each load of `right` feeds eight accumulators held in registers. The epilogue:
//! one pass over each row that reads θ0, adds (1+α)·(s·d) and rounds into the output. The
//! body is portable Rust, compiled for each instruction-set level by the kernel's one
//! dispatch (`per_level!` in `kernel/isa.rs`, run on the best [`Level`] of the machine); on
//! AVX-512 the epilogue for bf16 and f16 is hand-written
//! (`kernel::lora::FastEpilogue`). Every version gives the same bits, which the
//! tests check on each level the machine has.

use crate::dtype::FloatDtype;
use crate::kernel::lora::{epilogue, keep_nonfinite_base, FastEpilogue};
use crate::kernel::{per_level, Bf16, Elem, Level, F16, F32, F64};

use super::lora::{Factors, Orientation};

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
}

/// Writes the rows into `out` (θ0's dtype). Returns how many finite θ0 values became
/// non-finite.
pub fn weight_rows(job: &Rows, out: &mut [u8], scratch: &mut Scratch) -> u64 {
    weight_rows_with(Level::best(), job, out, scratch)
}

/// The rows for several α at once: each block's products are computed once, then the
/// epilogue runs once per α (`job.alpha` is not used). Writes `outs[k]` for `alphas[k]`
/// and sets `counts[k]` to how many finite θ0 values became non-finite there; each output
/// has the bits [`weight_rows`] gives for its α.
pub fn weight_rows_multi(
    job: &Rows,
    alphas: &[f64],
    outs: &mut [&mut [u8]],
    counts: &mut [u64],
    scratch: &mut Scratch,
) {
    multi_with(
        Level::best(),
        job,
        &mut Alphas {
            alphas,
            outs,
            counts,
        },
        scratch,
    );
}

/// The α of one call and where each one's rows and count go.
struct Alphas<'a, 'o> {
    alphas: &'a [f64],
    outs: &'a mut [&'o mut [u8]],
    counts: &'a mut [u64],
}

/// [`weight_rows`] compiled for `level`, with its hand-written epilogue if it has one.
fn weight_rows_with(level: Level, job: &Rows, out: &mut [u8], scratch: &mut Scratch) -> u64 {
    let mut counts = [0];
    let outs: &mut [&mut [u8]] = &mut [out];
    let mut a = Alphas {
        alphas: &[job.alpha],
        outs,
        counts: &mut counts,
    };
    multi_with(level, job, &mut a, scratch);
    counts[0]
}

/// [`weight_rows_multi`] compiled for `level`, with its hand-written epilogue if it has one.
fn multi_with(level: Level, job: &Rows, out: &mut Alphas, scratch: &mut Scratch) {
    by_dtype_on(
        level,
        job,
        out,
        scratch,
        FastEpilogue::new(level, job.dtype),
    )
}

per_level! {
    /// [`by_dtype`] compiled for `level`.
    fn by_dtype_on(
        job: &Rows,
        out: &mut Alphas,
        scratch: &mut Scratch,
        fast: Option<FastEpilogue>,
    ) -> () = by_dtype;
}

/// One body per element format (and DoRA or not), so that every loop is straight-line
/// code the compiler can vectorize. `fast`, when given, is the row epilogue for θ0's
/// format without DoRA.
#[inline(always)]
fn by_dtype(job: &Rows, out: &mut Alphas, scratch: &mut Scratch, fast: Option<FastEpilogue>) {
    match (job.dtype, job.dora.is_some()) {
        (FloatDtype::BF16, false) => body_multi::<Bf16, false>(job, out, scratch, fast),
        (FloatDtype::BF16, true) => body_multi::<Bf16, true>(job, out, scratch, None),
        (FloatDtype::F16, false) => body_multi::<F16, false>(job, out, scratch, fast),
        (FloatDtype::F16, true) => body_multi::<F16, true>(job, out, scratch, None),
        (FloatDtype::F32, false) => body_multi::<F32, false>(job, out, scratch, fast),
        (FloatDtype::F32, true) => body_multi::<F32, true>(job, out, scratch, None),
        (FloatDtype::F64, false) => body_multi::<F64, false>(job, out, scratch, fast),
        (FloatDtype::F64, true) => body_multi::<F64, true>(job, out, scratch, None),
    }
}

/// DoRA's arithmetic for one element: θ0 `w`, its rank-r sum `d` and `g`, the factor of
/// the element's output feature. W1 = g·(W0 + ΔW) with g = m / ‖W0 + ΔW‖; θ2 = (1+α)·W1 −
/// α·W0. (Without DoRA an element is w + (1+α)·(s·d), see [`epilogue`].)
#[inline(always)]
fn dora(w: f64, d: f64, s: f64, alpha: f64, g: f64) -> f64 {
    let w1 = g * (w + s * d);
    (1.0 + alpha) * w1 - alpha * w
}

/// [`body_multi`] for the one α of `job`.
#[cfg(test)]
fn body<E: Elem, const DORA: bool>(
    job: &Rows,
    out: &mut [u8],
    scratch: &mut Scratch,
    fast: Option<FastEpilogue>,
) -> u64 {
    let mut counts = [0];
    let outs: &mut [&mut [u8]] = &mut [out];
    let mut a = Alphas {
        alphas: &[job.alpha],
        outs,
        counts: &mut counts,
    };
    body_multi::<E, DORA>(job, &mut a, scratch, fast);
    counts[0]
}

/// Per block of rows: the products once, then the epilogue for each α.
#[inline(always)]
fn body_multi<E: Elem, const DORA: bool>(
    job: &Rows,
    out: &mut Alphas,
    scratch: &mut Scratch,
    fast: Option<FastEpilogue>,
) {
    let f = job.factors;
    let cols = f.cols;
    let row_bytes = cols * E::SIZE;
    let n = job.w0.len() / row_bytes.max(1);
    scratch.acc.resize(RB * cols, 0.0);
    out.counts.iter_mut().for_each(|c| *c = 0);
    let mut i0 = 0;
    while i0 < n {
        let nb = RB.min(n - i0);
        products(f, job.first + i0, nb, &mut scratch.acc, &mut scratch.lk);
        for (k, &alpha) in out.alphas.iter().enumerate() {
            let block = Block {
                first: i0,
                nb,
                acc: &scratch.acc,
            };
            out.counts[k] += block_epilogue::<E, DORA>(job, alpha, &block, out.outs[k], fast);
        }
        i0 += nb;
    }
}

/// One block of rows and their products.
struct Block<'a> {
    /// The block's first row, counted from `job.first`.
    first: usize,
    nb: usize,
    acc: &'a [f64],
}

/// The epilogue of one block of rows for one α; returns how many finite θ0 values became
/// non-finite.
#[inline(always)]
fn block_epilogue<E: Elem, const DORA: bool>(
    job: &Rows,
    alpha: f64,
    block: &Block,
    out: &mut [u8],
    fast: Option<FastEpilogue>,
) -> u64 {
    let cols = job.factors.cols;
    let s = job.factors.scaling;
    let row_bytes = cols * E::SIZE;
    let i0 = block.first;
    let mut new_nonfinite = 0;
    for (i, acc) in block.acc.chunks_exact(cols).enumerate().take(block.nb) {
        let row = job.first + i0 + i;
        let at = (i0 + i) * row_bytes;
        let src = &job.w0[at..at + row_bytes];
        let dst = &mut out[at..at + row_bytes];
        // One pass over the row: read θ0, combine, round, count non-finite outputs.
        let mut nonfinite = 0u64;
        match job.dora {
            Some((g, orientation)) if DORA => {
                for (j, ((&d, w), o)) in acc
                    .iter()
                    .zip(src.chunks_exact(E::SIZE))
                    .zip(dst.chunks_exact_mut(E::SIZE))
                    .enumerate()
                {
                    let gj = match orientation {
                        Orientation::Conv1D => g[j],
                        _ => g[row],
                    };
                    let v = dora(E::load(w), d, s, alpha, gj);
                    nonfinite += E::store(v, o) as u64;
                }
            }
            _ if fast.is_some() => {
                if let Some(epilogue) = fast {
                    nonfinite = epilogue.run(1.0 + alpha, s, src, acc, dst);
                }
            }
            _ => nonfinite = epilogue::<E>(1.0 + alpha, s, src, acc, dst),
        }
        if nonfinite > 0 {
            new_nonfinite += keep_nonfinite_base::<E>(src, dst);
        }
    }
    new_nonfinite
}

/// acc[i·cols + c] = Σₖ left[k, row0 + i]·right[k, c] for i < nb, k in order (no fused
/// multiply-add).
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
    // Columns past the last whole block, element by element, k in order.
    for i in 0..nb {
        let row = row0 + i;
        for (c, a) in acc[i * cols..(i + 1) * cols]
            .iter_mut()
            .enumerate()
            .skip(c0)
        {
            let mut sum = 0.0;
            for k in 0..f.rank {
                sum += f.left[k * rows + row] * f.right[k * cols + c];
            }
            *a = sum;
        }
    }
}

/// θ0 + (1+α)·(s·d) for `d` given in f64 (a `lora_B.bias` times its scaling), with the
/// rounding and the non-finite rule of the weight rows. Returns how many outputs are ±inf
/// or NaN where θ0 is finite.
pub fn add_scaled(
    dtype: FloatDtype,
    alpha: f64,
    s: f64,
    w0: &[u8],
    d: &[f64],
    out: &mut [u8],
) -> u64 {
    fn run<E: Elem>(alpha: f64, s: f64, w0: &[u8], d: &[f64], out: &mut [u8]) -> u64 {
        match epilogue::<E>(1.0 + alpha, s, w0, d, out) {
            0 => 0,
            _ => keep_nonfinite_base::<E>(w0, out),
        }
    }
    match dtype {
        FloatDtype::BF16 => run::<Bf16>(alpha, s, w0, d, out),
        FloatDtype::F16 => run::<F16>(alpha, s, w0, d, out),
        FloatDtype::F32 => run::<F32>(alpha, s, w0, d, out),
        FloatDtype::F64 => run::<F64>(alpha, s, w0, d, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernel::testing::{some_bits, Rng};

    /// Whole rows on every instruction set give the portable bits, for every format, with
    /// and without DoRA, for block and column tails.
    #[test]
    fn every_isa_gives_the_portable_bits() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for d in [
            FloatDtype::BF16,
            FloatDtype::F16,
            FloatDtype::F32,
            FloatDtype::F64,
        ] {
            for (rows, cols, rank) in [(9, 37, 3), (16, 64, 16), (3, 8, 1), (11, 130, 5)] {
                let left: Vec<f64> = (0..rank * rows)
                    .map(|_| f64::from_bits(0x3f00_0000_0000_0000 | (rng.next() >> 12)))
                    .collect();
                let right: Vec<f64> = (0..rank * cols)
                    .map(|_| f64::from_bits(0x3f00_0000_0000_0000 | (rng.next() >> 12)))
                    .collect();
                let f = Factors {
                    rank,
                    rows,
                    cols,
                    left,
                    right,
                    scaling: 2.0,
                };
                let mut w0 = vec![0u8; rows * cols * d.size()];
                for c in w0.chunks_exact_mut(d.size()) {
                    c.copy_from_slice(&some_bits(&mut rng, d).to_le_bytes()[..d.size()]);
                }
                let g: Vec<f64> = (0..rows.max(cols)).map(|i| 0.5 + i as f64 / 7.0).collect();
                for dora in [
                    None,
                    Some((&g[..], Orientation::Linear)),
                    Some((&g[..], Orientation::Conv1D)),
                ] {
                    let job = Rows {
                        factors: &f,
                        w0: &w0,
                        dtype: d,
                        first: 0,
                        alpha: 0.3,
                        dora,
                    };
                    let mut want = vec![0u8; w0.len()];
                    let want_nf = weight_rows_with(
                        Level::portable(),
                        &job,
                        &mut want,
                        &mut Scratch::default(),
                    );
                    for isa in Level::available() {
                        let mut got = vec![0u8; w0.len()];
                        let nf = weight_rows_with(isa, &job, &mut got, &mut Scratch::default());
                        assert!(
                            got == want,
                            "{} {d:?} {rows}x{cols} r{rank} dora {}",
                            isa.name(),
                            dora.is_some()
                        );
                        assert_eq!(nf, want_nf);
                    }
                }
            }
        }
    }

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
            super::super::lora::encode_into(FloatDtype::F64, &w0, &mut bytes);
            let job = Rows {
                factors: &f,
                w0: &bytes,
                dtype: FloatDtype::F64,
                first: 0,
                alpha: 0.25,
                dora: None,
            };
            let mut out = vec![0u8; bytes.len()];
            assert_eq!(
                body::<F64, false>(&job, &mut out, &mut Scratch::default(), None),
                0
            );
            let mut got = vec![0.0; rows * cols];
            super::super::lora::decode_into(FloatDtype::F64, &out, &mut got);
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
