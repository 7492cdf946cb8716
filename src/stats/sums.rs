//! The hot loop of `expo diff`: the sums of [`DeltaSums`] over runs of element pairs,
//! straight from the checkpoints' bytes.
//!
//! One generic loop widens both sides to f64 and adds the terms in [`LANES`] lanes per
//! block of [`BLOCK`] elements (see the accuracy notes of [`super`]). The loop is portable
//! Rust; the kernel's one dispatch (`per_level!` in `kernel/isa.rs`) compiles it for each
//! instruction-set level and runs it on the best [`Level`] of the machine. The lanes
//! map onto vector registers, and every version runs the same IEEE operations in the same
//! order (Rust never contracts a multiply and an add into an FMA), so all produce the same
//! bits; `every_isa_and_format_pair_gives_the_reference_bits` checks it.
//!
//! Widening: for a pair of equal formats (the usual case) the loop widens each element in
//! registers with [`crate::kernel::convert`]'s branch-free conversions. Pairs of different
//! formats (say an f32 θ0 and a bf16 θ1) are widened a run at a time into f64 buffers with
//! the `half` crate's exact conversions, then summed by the same loop. `half` is not used
//! for equal formats because it is slower there (measured on one AVX-512 machine, CPU time
//! per element pair including the sums: bf16 0.60 ns with expo's conversion, 0.75 ns with
//! `half::bf16::to_f32`; f16 0.80 ns with expo's, 0.93 ns with `half`'s F16C slice
//! conversion, 2.9 ns with `half::f16::to_f64` per element, which checks the CPU features
//! on every call and so does not vectorize).
//!
//! Narrowing stays expo's own ([`crate::kernel::convert`], rounded once): `half`'s
//! `from_f64` does not round once. For bf16 (and its software f16 path) it drops the low 32
//! bits of the f64 before rounding, so a value just above a halfway point rounds as a tie;
//! its F16C path rounds to f32 first, then to f16. `half_narrowing_rounds_twice` shows it.

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use super::DeltaSums;
use crate::dtype::FloatDtype;
use crate::kernel::convert::{bf16_to_f64, f16_to_f64};
use crate::kernel::{per_level, Level};

/// Elements added plainly (in [`LANES`] lanes) before one compensated addition.
pub const BLOCK: usize = 256;
/// Independent accumulators inside a block.
pub(super) const LANES: usize = 8;
/// Elements widened at a time on the mixed-format path (a multiple of [`BLOCK`], so that
/// blocks start where they would in one pass).
const WIDEN_RUN: usize = 4 * BLOCK;

/// Plain per-lane sums of one block.
#[derive(Default)]
struct Lanes {
    dd: [f64; LANES],
    aa: [f64; LANES],
    bb: [f64; LANES],
    changed: [u64; LANES],
    nonfinite: [u64; LANES],
}

impl Lanes {
    #[inline(always)]
    fn step(&mut self, l: usize, x: f64, y: f64) {
        let finite = x.is_finite() & y.is_finite();
        let (x0, y0) = if finite { (x, y) } else { (0.0, 0.0) };
        let d = y0 - x0;
        // Separate multiply and add: Rust never fuses them, so every term is rounded once
        // exactly as numpy's `(b - a) ** 2` is.
        self.dd[l] += d * d;
        self.aa[l] += x0 * x0;
        self.bb[l] += y0 * y0;
        let same = (x == y) | (x.is_nan() & y.is_nan());
        self.changed[l] += u64::from(!same);
        self.nonfinite[l] += u64::from(!finite);
    }

    /// Adds the block's lanes into `s`: pairwise, then compensated.
    #[inline(always)]
    fn finish(&self, s: &mut DeltaSums) {
        s.delta_sq.add(tree(&self.dd));
        s.base_sq.add(tree(&self.aa));
        s.target_sq.add(tree(&self.bb));
        s.changed += self.changed.iter().sum::<u64>();
        s.nonfinite += self.nonfinite.iter().sum::<u64>();
    }
}

/// Pairwise sum of the lanes, in a fixed order.
#[inline(always)]
fn tree(v: &[f64; LANES]) -> f64 {
    ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]))
}

/// One element format as stored: its raw form and its exact value.
trait Wide {
    type Raw: Copy;
    fn load(r: Self::Raw) -> f64;
}

struct Bf16;
struct F16;
struct F32;
struct F64;
/// Elements already widened.
struct Value;

impl Wide for Bf16 {
    type Raw = [u8; 2];
    #[inline(always)]
    fn load(r: [u8; 2]) -> f64 {
        bf16_to_f64(u16::from_le_bytes(r))
    }
}

impl Wide for F16 {
    type Raw = [u8; 2];
    #[inline(always)]
    fn load(r: [u8; 2]) -> f64 {
        f16_to_f64(u16::from_le_bytes(r))
    }
}

impl Wide for F32 {
    type Raw = [u8; 4];
    #[inline(always)]
    fn load(r: [u8; 4]) -> f64 {
        f32::from_le_bytes(r) as f64
    }
}

impl Wide for F64 {
    type Raw = [u8; 8];
    #[inline(always)]
    fn load(r: [u8; 8]) -> f64 {
        f64::from_le_bytes(r)
    }
}

impl Wide for Value {
    type Raw = f64;
    #[inline(always)]
    fn load(r: f64) -> f64 {
        r
    }
}

/// Adds the pairs (a\[i\], b\[i\]) block by block; blocks start at index 0.
#[inline(always)]
fn pairs<A: Wide, B: Wide>(s: &mut DeltaSums, a: &[A::Raw], b: &[B::Raw]) {
    for (a, b) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        let mut lanes = Lanes::default();
        let (a8, a_rest) = a.as_chunks::<LANES>();
        let (b8, b_rest) = b.as_chunks::<LANES>();
        for (x, y) in a8.iter().zip(b8) {
            for l in 0..LANES {
                lanes.step(l, A::load(x[l]), B::load(y[l]));
            }
        }
        for (l, (&x, &y)) in a_rest.iter().zip(b_rest).enumerate() {
            lanes.step(l, A::load(x), B::load(y));
        }
        lanes.finish(s);
    }
    s.elements += a.len().min(b.len()) as u64;
}

/// Widens `out.len()` (at most [`WIDEN_RUN`]) little-endian float elements to f64 with
/// `half` (bf16, f16) or `as` (f32); all exact. (`half::bf16::to_f64` is exact too, but
/// branches on the value and does not vectorize; its `to_f32` is a select.)
#[inline(always)]
fn widen_into(dtype: FloatDtype, bytes: &[u8], out: &mut [f64]) {
    match dtype {
        FloatDtype::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.as_chunks::<2>().0) {
                *o = half::bf16::from_bits(u16::from_le_bytes(*b)).to_f32() as f64;
            }
        }
        FloatDtype::F16 => {
            // `half`'s slice conversion uses the F16C instructions when the CPU has them.
            let mut buf = [0u16; WIDEN_RUN];
            let bits = &mut buf[..out.len()];
            for (h, b) in bits.iter_mut().zip(bytes.as_chunks::<2>().0) {
                *h = u16::from_le_bytes(*b);
            }
            bits.reinterpret_cast::<half::f16>()
                .convert_to_f64_slice(out);
        }
        FloatDtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.as_chunks::<4>().0) {
                *o = f32::from_le_bytes(*b) as f64;
            }
        }
        FloatDtype::F64 => {
            for (o, b) in out.iter_mut().zip(bytes.as_chunks::<8>().0) {
                *o = f64::from_le_bytes(*b);
            }
        }
    }
}

/// Widens `out.len()` elements (at most [`WIDEN_RUN`] at a time for f16).
pub(super) fn widen(dtype: FloatDtype, bytes: &[u8], out: &mut [f64]) {
    for (k, o) in out.chunks_mut(WIDEN_RUN).enumerate() {
        let at = k * WIDEN_RUN * dtype.size();
        widen_into(dtype, &bytes[at..at + o.len() * dtype.size()], o);
    }
}

#[inline(always)]
fn body(s: &mut DeltaSums, da: FloatDtype, a: &[u8], db: FloatDtype, b: &[u8]) {
    use FloatDtype as D;
    match (da, db) {
        (D::BF16, D::BF16) => pairs::<Bf16, Bf16>(s, a.as_chunks().0, b.as_chunks().0),
        (D::F16, D::F16) => pairs::<F16, F16>(s, a.as_chunks().0, b.as_chunks().0),
        (D::F32, D::F32) => pairs::<F32, F32>(s, a.as_chunks().0, b.as_chunks().0),
        (D::F64, D::F64) => pairs::<F64, F64>(s, a.as_chunks().0, b.as_chunks().0),
        _ => {
            let n = (a.len() / da.size()).min(b.len() / db.size());
            let (mut x, mut y) = ([0f64; WIDEN_RUN], [0f64; WIDEN_RUN]);
            let mut at = 0;
            while at < n {
                let m = WIDEN_RUN.min(n - at);
                widen_into(da, &a[at * da.size()..(at + m) * da.size()], &mut x[..m]);
                widen_into(db, &b[at * db.size()..(at + m) * db.size()], &mut y[..m]);
                pairs::<Value, Value>(s, &x[..m], &y[..m]);
                at += m;
            }
        }
    }
}

#[inline(always)]
fn values_body(s: &mut DeltaSums, a: &[f64], b: &[f64]) {
    pairs::<Value, Value>(s, a, b);
}

per_level! {
    /// [`accumulate_bytes`] compiled for `level`.
    fn bytes_with(
        s: &mut DeltaSums,
        da: FloatDtype,
        a: &[u8],
        db: FloatDtype,
        b: &[u8],
    ) -> () = body;
}

per_level! {
    /// [`accumulate_values`] compiled for `level`.
    fn values_with(s: &mut DeltaSums, a: &[f64], b: &[f64]) -> () = values_body;
}

/// Adds the element pairs of two little-endian runs, θ0 = `a` (format `da`) and
/// θ1 = `b` (format `db`), with the best instruction set of this CPU.
pub(super) fn accumulate_bytes(
    s: &mut DeltaSums,
    da: FloatDtype,
    a: &[u8],
    db: FloatDtype,
    b: &[u8],
) {
    bytes_with(Level::best(), s, da, a, db, b);
}

/// Adds the pairs of two runs of f64 values.
pub(super) fn accumulate_values(s: &mut DeltaSums, a: &[f64], b: &[f64]) {
    values_with(Level::best(), s, a, b);
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernel::testing::Rng;

    const FORMATS: [FloatDtype; 4] = [
        FloatDtype::BF16,
        FloatDtype::F16,
        FloatDtype::F32,
        FloatDtype::F64,
    ];

    /// `n` elements of `dtype`: mostly values near 1 (sharing their high bits with `base`
    /// when given, so that some are equal), with ±0, ±inf, NaNs and subnormals mixed in.
    fn run(rng: &mut Rng, dtype: FloatDtype, n: usize, base: Option<&[f64]>) -> Vec<u8> {
        let mut out = Vec::with_capacity(n * dtype.size());
        for i in 0..n {
            let r = rng.next();
            let x = match r % 64 {
                0 => f64::NAN,
                1 => f64::INFINITY,
                2 => f64::NEG_INFINITY,
                3 => -0.0,
                4 => 0.0,
                5 => 2f64.powi(-140),
                6 => 2f64.powi(-20),
                _ => match base {
                    Some(b) if r.is_multiple_of(3) => b[i],
                    _ => ((r >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 4.0,
                },
            };
            match dtype {
                FloatDtype::BF16 => {
                    out.extend(crate::kernel::convert::f64_to_bf16(x).to_le_bytes())
                }
                FloatDtype::F16 => out.extend(crate::kernel::convert::f64_to_f16(x).to_le_bytes()),
                FloatDtype::F32 => out.extend((x as f32).to_le_bytes()),
                FloatDtype::F64 => out.extend(x.to_le_bytes()),
            }
        }
        out
    }

    /// The reference: widening element by element with the kernel's conversions, then
    /// the plain f64 loop compiled for no particular instruction set.
    fn reference(da: FloatDtype, a: &[u8], db: FloatDtype, b: &[u8]) -> DeltaSums {
        let value = |d: FloatDtype, bytes: &[u8]| -> Vec<f64> {
            bytes
                .chunks(d.size())
                .map(|c| match d {
                    FloatDtype::BF16 => bf16_to_f64(u16::from_le_bytes([c[0], c[1]])),
                    FloatDtype::F16 => f16_to_f64(u16::from_le_bytes([c[0], c[1]])),
                    FloatDtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64,
                    FloatDtype::F64 => f64::from_le_bytes(c.try_into().unwrap()),
                })
                .collect()
        };
        let mut s = DeltaSums::default();
        values_with(Level::portable(), &mut s, &value(da, a), &value(db, b));
        s
    }

    #[test]
    fn every_isa_and_format_pair_gives_the_reference_bits() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // Lengths around block and lane edges, and one longer than a widening run.
        for n in [0, 1, 7, 8, 9, 255, 256, 257, 1000, 3 * WIDEN_RUN + 13] {
            for da in FORMATS {
                for db in FORMATS {
                    let a = run(&mut rng, da, n, None);
                    let base: Vec<f64> = {
                        let mut w = vec![0.0; n];
                        widen(da, &a, &mut w);
                        w
                    };
                    let b = run(&mut rng, db, n, Some(&base));
                    let want = reference(da, &a, db, &b);
                    assert!(n < 64 || (want.changed < want.elements && want.nonfinite > 0));
                    for isa in Level::available() {
                        let mut got = DeltaSums::default();
                        bytes_with(isa, &mut got, da, &a, db, &b);
                        assert_eq!(got, want, "{da:?} vs {db:?}, n = {n}, {}", isa.name());
                        let mut values = DeltaSums::default();
                        let (mut x, mut y) = (vec![0.0; n], vec![0.0; n]);
                        widen(da, &a, &mut x);
                        widen(db, &b, &mut y);
                        values_with(isa, &mut values, &x, &y);
                        assert_eq!(values, want, "{da:?} vs {db:?}, n = {n}, {}", isa.name());
                    }
                }
            }
        }
    }

    #[test]
    fn half_widening_is_exact() {
        // Every bf16 and f16 value, widened by `half` and by the kernel's conversion.
        let bits: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
        let mut out = vec![0.0; 1 << 16];
        for (dtype, exact) in [
            (FloatDtype::BF16, bf16_to_f64 as fn(u16) -> f64),
            (FloatDtype::F16, f16_to_f64),
        ] {
            widen(dtype, &bits, &mut out);
            for (h, x) in (0..=u16::MAX).zip(&out) {
                let want = exact(h);
                assert!(
                    x.to_bits() == want.to_bits() || (x.is_nan() && want.is_nan()),
                    "{dtype:?} {h:#06x}: {x:e} vs {want:e}"
                );
            }
        }
    }

    #[test]
    fn half_narrowing_rounds_twice() {
        use crate::kernel::convert::{f64_to_bf16, f64_to_f16};
        // Just above the midpoint between 1 and the next bf16 (1 + 2^-7): the nearest is
        // 1 + 2^-7. `half` drops the 2^-40 and sees a tie, which goes to even (1).
        let x = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(f64_to_bf16(x), 0x3f81);
        assert_eq!(half::bf16::from_f64(x).to_bits(), 0x3f80);
        // The same for f16 (10 fraction bits), whichever path `half` takes.
        let y = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(f64_to_f16(y), 0x3c01);
        assert_eq!(half::f16::from_f64(y).to_bits(), 0x3c00);
    }
}
