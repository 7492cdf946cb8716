//! Pairing checkpoints tensor by tensor: the one place the rules live.
//!
//! Every command that reads two or more checkpoints together — `extrapolate` (θ0, θ1),
//! `diff` (any number) — matches their tensors here, from the headers alone, so that every
//! mismatch is found before a byte of data is read or written. The rules:
//!
//! - **Names**: tensors are matched by name, so the sides may be sharded differently. A
//!   tensor present on one side only is a mismatch.
//! - **Shapes** must be equal.
//! - **Dtypes**: float tensors (F16, BF16, F32, F64) may differ in float dtype (both sides
//!   are widened exactly); any other tensor must have the same dtype on every side — except
//!   that a tensor taken unchanged from θ1 (its α is 0) may be of any dtype θ1 stores in a
//!   dtype expo cannot compute on (FP8, FP6, FP4, complex).
//! - **Treatment** (for `extrapolate`, see [`treatment`]): a float tensor is extrapolated
//!   when its α is not 0, copied from θ1 when it is (converted, with `--dtype`); every other
//!   tensor is copied from θ1. Integer and bool tensors with α ≠ 0 must be byte-identical on
//!   both sides ([`must_be_identical`]: θ1 + α·(θ1 − θ0) is θ1 only then); with α = 0 they
//!   are θ1's, as every other tensor with α = 0. FP8/FP6/FP4/complex tensors with α ≠ 0 are
//!   refused.
//!
//! Every problem is collected, in θ1's tensor order, and reported together by
//! [`PairingError`] (the first [`SHOWN_MISMATCHES`], then a count).

use std::fmt;

use crate::checkpoint::{Checkpoint, TensorLoc};
use crate::dtype::{Dtype, DtypeClass, FloatDtype};
use crate::header::TensorInfo;
use crate::kernel::KernelSpec;

/// How many mismatches a message lists before summarising the rest.
pub const SHOWN_MISMATCHES: usize = 10;

/// What a tensor is paired for: the dtype rules depend on it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Purpose {
    /// Measuring the difference (`expo diff`): float tensors in any float dtype, other
    /// tensors in the same dtype everywhere.
    Compare,
    /// Producing θ1 + α·(θ1 − θ0) with this tensor's α.
    Produce { alpha: f64 },
}

/// How the sides of a paired tensor relate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// Float on every side (the dtypes may differ): values are computed or compared in f64.
    Float(Vec<FloatDtype>),
    /// Not float; θ1's dtype, which every side shares — except a tensor `extrapolate` takes
    /// unchanged from θ1 whatever θ0 stores (α = 0, a dtype expo cannot compute on; never
    /// with [`Purpose::Compare`]). Compared on the bytes (element by element, byte by byte
    /// for sub-byte dtypes); copied from θ1 by `extrapolate`.
    Bytes(Dtype),
}

/// One tensor, present with the same shape in every checkpoint paired.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<u64>,
    /// Its dtype in each checkpoint.
    pub dtypes: Vec<Dtype>,
    /// Where it lives in each checkpoint.
    pub locs: Vec<TensorLoc>,
    /// Bytes of its data in the last checkpoint (θ1).
    pub len: u64,
    pub kind: EntryKind,
}

impl Entry {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// One reason the checkpoints cannot be paired. Sides are named by their labels (`--sft`,
/// a path, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// A tensor present in one checkpoint is missing from another.
    Missing {
        tensor: String,
        present_in: String,
        missing_from: String,
    },
    /// Shapes differ.
    Shape {
        tensor: String,
        a: (String, Vec<u64>),
        b: (String, Vec<u64>),
    },
    /// Dtypes differ and are not both float.
    Dtype {
        tensor: String,
        a: (String, Dtype),
        b: (String, Dtype),
    },
    /// A tensor expo cannot compute on, with an α that is not 0.
    Unsupported {
        tensor: String,
        dtype: Dtype,
        /// The side it can be copied from.
        from: String,
    },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Missing {
                tensor,
                present_in,
                missing_from,
            } => write!(f, "`{tensor}` is in {present_in} but not in {missing_from}"),
            Mismatch::Shape { tensor, a, b } => write!(
                f,
                "`{tensor}` has shape {:?} in {} but {:?} in {}",
                a.1, a.0, b.1, b.0
            ),
            Mismatch::Dtype { tensor, a, b } => write!(
                f,
                "`{tensor}` is {} in {} but {} in {} (only float tensors may differ in dtype)",
                a.1, a.0, b.1, b.0
            ),
            Mismatch::Unsupported {
                tensor,
                dtype,
                from,
            } => write!(
                f,
                "`{tensor}` is {dtype}, which expo cannot extrapolate (only F16, BF16, F32 and F64); copy it unchanged from {from} with --skip or an alpha of 0"
            ),
        }
    }
}

/// The checkpoints do not pair up; lists every problem found.
#[derive(Debug, Clone, thiserror::Error)]
pub struct PairingError {
    pub mismatches: Vec<Mismatch>,
    /// Who the closing question asks about: `--sft and --aligned`, `they`.
    pub who: String,
}

impl fmt::Display for PairingError {
    /// "the checkpoints do not match (N problems); are WHO the same architecture?", then the
    /// first [`SHOWN_MISMATCHES`] problems, one per line, then how many more there are.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.mismatches.len();
        write!(
            f,
            "the checkpoints do not match ({n} problem{}); are {} the same architecture?",
            if n == 1 { "" } else { "s" },
            self.who
        )?;
        for m in self.mismatches.iter().take(SHOWN_MISMATCHES) {
            write!(f, "\n  {m}")?;
        }
        if n > SHOWN_MISMATCHES {
            write!(f, "\n  … and {} more", n - SHOWN_MISMATCHES)?;
        }
        Ok(())
    }
}

/// One checkpoint to pair and how messages name it.
#[derive(Debug, Clone, Copy)]
pub struct Side<'a> {
    pub checkpoint: &'a Checkpoint,
    pub label: &'a str,
}

/// Whether a tensor stored as `other` on one side and `last` on the last side can be paired.
fn compatible(other: Dtype, last: Dtype, purpose: Purpose) -> bool {
    match (other.class(), last.class()) {
        (DtypeClass::Float(_), DtypeClass::Float(_)) => true,
        (_, DtypeClass::Opaque) if purpose == (Purpose::Produce { alpha: 0.0 }) => true,
        _ => other == last,
    }
}

/// What the sides of a tensor whose dtypes are all [`compatible`] amount to.
fn kind(dtypes: &[Dtype], last: Dtype) -> EntryKind {
    let floats: Option<Vec<FloatDtype>> = dtypes
        .iter()
        .map(|d| match d.class() {
            DtypeClass::Float(f) => Some(f),
            _ => None,
        })
        .collect();
    match floats {
        Some(f) => EntryKind::Float(f),
        None => EntryKind::Bytes(last),
    }
}

/// Pairs the tensors of every checkpoint by name, under the rules of the module docs;
/// `who` names the checkpoints in the error's closing question, `purpose` says what each
/// tensor (by name) is paired for.
///
/// The result is in the order of the last checkpoint (θ1's, for two). Mismatches are listed
/// in that order too: for each of its tensors, the other sides in order; then the tensors
/// the last checkpoint lacks.
///
/// # Panics
/// If `sides` is empty.
pub fn pair(
    sides: &[Side],
    who: &str,
    purpose: impl Fn(&str) -> Purpose,
) -> Result<Vec<Entry>, PairingError> {
    let (last, others) = sides.split_last().expect("at least one checkpoint to pair");
    let mut mismatches = Vec::new();
    let mut entries = Vec::with_capacity(last.checkpoint.len());
    for (loc, t) in last.checkpoint.tensors() {
        match pair_one(others, last, (loc, t), purpose(&t.name)) {
            Ok(entry) => entries.push(entry),
            Err(found) => mismatches.extend(found),
        }
    }
    for side in others {
        for (_, t) in side.checkpoint.tensors() {
            if last.checkpoint.get(&t.name).is_none() {
                mismatches.push(Mismatch::Missing {
                    tensor: t.name.clone(),
                    present_in: side.label.to_string(),
                    missing_from: last.label.to_string(),
                });
            }
        }
    }
    if mismatches.is_empty() {
        Ok(entries)
    } else {
        Err(PairingError {
            mismatches,
            who: who.to_string(),
        })
    }
}

/// Pairs tensor `t` of the last side with the same tensor of every other side.
fn pair_one(
    others: &[Side],
    last: &Side,
    (last_loc, t): (TensorLoc, &TensorInfo),
    purpose: Purpose,
) -> Result<Entry, Vec<Mismatch>> {
    let mut mismatches = Vec::new();
    let mut dtypes = Vec::with_capacity(others.len() + 1);
    let mut locs = Vec::with_capacity(others.len() + 1);
    let tensor = || t.name.clone();
    for side in others {
        let label = side.label.to_string();
        match side.checkpoint.get(&t.name) {
            None => mismatches.push(Mismatch::Missing {
                tensor: tensor(),
                present_in: last.label.to_string(),
                missing_from: label,
            }),
            Some((_, other)) if other.shape != t.shape => mismatches.push(Mismatch::Shape {
                tensor: tensor(),
                a: (label, other.shape.clone()),
                b: (last.label.to_string(), t.shape.clone()),
            }),
            Some((_, other)) if !compatible(other.dtype, t.dtype, purpose) => {
                mismatches.push(Mismatch::Dtype {
                    tensor: tensor(),
                    a: (label, other.dtype),
                    b: (last.label.to_string(), t.dtype),
                })
            }
            Some((loc, other)) => {
                dtypes.push(other.dtype);
                locs.push(loc);
            }
        }
    }
    if !mismatches.is_empty() {
        return Err(mismatches);
    }
    dtypes.push(t.dtype);
    locs.push(last_loc);
    let kind = kind(&dtypes, t.dtype);
    if let (Purpose::Produce { alpha }, EntryKind::Bytes(d)) = (purpose, &kind) {
        // Only reached with equal dtypes: a differing one was compatible at α = 0 only.
        if alpha != 0.0 && d.class() == DtypeClass::Opaque {
            return Err(vec![Mismatch::Unsupported {
                tensor: tensor(),
                dtype: *d,
                from: last.label.to_string(),
            }]);
        }
    }
    Ok(Entry {
        name: tensor(),
        shape: t.shape.clone(),
        dtypes,
        locs,
        len: t.len(),
        kind,
    })
}

/// Pairs checkpoints to measure their differences ([`Purpose::Compare`]); `labels` name them
/// in messages.
pub fn pair_to_compare(
    checkpoints: &[&Checkpoint],
    labels: &[String],
) -> Result<Vec<Entry>, PairingError> {
    let sides: Vec<Side> = checkpoints
        .iter()
        .zip(labels)
        .map(|(&checkpoint, label)| Side { checkpoint, label })
        .collect();
    pair(&sides, "they", |_| Purpose::Compare)
}

/// What `--dtype` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtypeChoice {
    /// Each float tensor keeps θ1's dtype.
    Auto,
    /// Every float tensor is written in this dtype.
    Fixed(FloatDtype),
}

impl DtypeChoice {
    /// The choice as `--dtype` spells it (and provenance records it).
    pub fn name(self) -> &'static str {
        match self {
            DtypeChoice::Auto => "auto",
            DtypeChoice::Fixed(FloatDtype::BF16) => "bf16",
            DtypeChoice::Fixed(FloatDtype::F16) => "f16",
            DtypeChoice::Fixed(FloatDtype::F32) => "f32",
            DtypeChoice::Fixed(FloatDtype::F64) => "f64",
        }
    }
}

/// How one output tensor is produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    /// θ1 + α(θ1 − θ0), computed in f64 and rounded once.
    Extrapolate(KernelSpec),
    /// θ1 rounded to another float format (α = 0 with `--dtype`).
    Cast(KernelSpec),
    /// θ1's bytes unchanged (non-float tensors, and α = 0).
    Copy,
}

impl Treatment {
    /// How `--dry-run` names it.
    pub fn name(self) -> &'static str {
        match self {
            Treatment::Extrapolate(_) => "extrapolate",
            Treatment::Cast(_) => "convert",
            Treatment::Copy => "copy",
        }
    }
}

/// How a tensor paired θ0 → θ1 (two sides, [`Purpose::Produce`]) is produced with `alpha`,
/// and its output dtype.
pub fn treatment(entry: &Entry, alpha: f64, dtype: DtypeChoice) -> (Treatment, Dtype) {
    let (spec, out) = output_of(entry, dtype);
    (treatment_at(spec, alpha), out)
}

/// A paired tensor's output dtype, and the formats of its kernel calls when it is a float
/// tensor (`None`: its bytes are θ1's).
pub fn output_of(entry: &Entry, dtype: DtypeChoice) -> (Option<KernelSpec>, Dtype) {
    match &entry.kind {
        EntryKind::Float(f) => {
            let (a, b) = (f[0], f[f.len() - 1]);
            let out = match dtype {
                DtypeChoice::Auto => b,
                DtypeChoice::Fixed(d) => d,
            };
            let spec = KernelSpec {
                sft: a,
                aligned: b,
                out,
            };
            (Some(spec), out.dtype())
        }
        EntryKind::Bytes(d) => (None, *d),
    }
}

/// How a paired tensor (`spec` from [`output_of`]) is produced at `alpha`: extrapolated
/// when α is not 0; else copied, or cast when its output dtype is not θ1's.
pub fn treatment_at(spec: Option<KernelSpec>, alpha: f64) -> Treatment {
    match spec {
        Some(spec) if alpha != 0.0 => Treatment::Extrapolate(spec),
        Some(spec) if spec.out != spec.aligned => Treatment::Cast(spec),
        _ => Treatment::Copy,
    }
}

/// Whether a tensor copied from θ1 must be byte-identical in θ0: integer and bool tensors
/// whose α is not 0 (θ1 + α·(θ1 − θ0) is θ1 only when θ0 = θ1; with α = 0 it is θ1 whatever
/// θ0 holds).
pub fn must_be_identical(treatment: Treatment, out_dtype: Dtype, alpha: f64) -> bool {
    treatment == Treatment::Copy && out_dtype.class() == DtypeClass::Exact && alpha != 0.0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::header::encode_header;

    /// Writes a single-file checkpoint with the given (name, dtype, shape) tensors, all
    /// zeros, and opens it.
    pub(crate) fn checkpoint(
        dir: &std::path::Path,
        tensors: &[(&str, Dtype, &[u64])],
    ) -> Checkpoint {
        std::fs::create_dir_all(dir).unwrap();
        let mut entries = Vec::new();
        let mut cursor = 0;
        for (name, dtype, shape) in tensors {
            let len = shape.iter().product::<u64>() * dtype.bits() / 8;
            entries.push((*name, *dtype, *shape, cursor, cursor + len));
            cursor += len;
        }
        let mut bytes = encode_header(None, &entries);
        bytes.resize(bytes.len() + cursor as usize, 0);
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        Checkpoint::open(dir).unwrap()
    }

    fn sides<'a>(cks: &'a [Checkpoint], labels: &'a [&'a str]) -> Vec<Side<'a>> {
        cks.iter()
            .zip(labels)
            .map(|(checkpoint, label)| Side { checkpoint, label })
            .collect()
    }

    #[test]
    fn dtype_rules_depend_on_the_purpose() {
        let dir = tempfile::tempdir().unwrap();
        let a = checkpoint(
            &dir.path().join("a"),
            &[
                ("f", Dtype::F32, &[2]),
                ("i", Dtype::I64, &[2]),
                ("q", Dtype::F8E4M3, &[2]),
                ("m", Dtype::F32, &[2]),
            ],
        );
        let b = checkpoint(
            &dir.path().join("b"),
            &[
                ("f", Dtype::BF16, &[2]),
                ("i", Dtype::I64, &[2]),
                ("q", Dtype::F8E4M3, &[2]),
                ("m", Dtype::F8E5M2, &[2]),
            ],
        );
        let cks = [a, b];
        let s = sides(&cks, &["A", "B"]);
        // Comparing: floats in any float dtype, the rest equal.
        let err = pair(&s, "they", |_| Purpose::Compare).unwrap_err();
        assert_eq!(
            err.mismatches,
            vec![Mismatch::Dtype {
                tensor: "m".into(),
                a: ("A".into(), Dtype::F32),
                b: ("B".into(), Dtype::F8E5M2),
            }]
        );
        // Producing with α = 0: θ1's FP8 is taken whatever θ0 holds.
        let e = pair(&s, "they", |_| Purpose::Produce { alpha: 0.0 }).unwrap();
        let kinds: Vec<_> = e.iter().map(|e| e.kind.clone()).collect();
        assert_eq!(
            kinds,
            vec![
                EntryKind::Float(vec![FloatDtype::F32, FloatDtype::BF16]),
                EntryKind::Bytes(Dtype::I64),
                EntryKind::Bytes(Dtype::F8E4M3),
                EntryKind::Bytes(Dtype::F8E5M2),
            ]
        );
        for e in &e {
            let (t, _) = treatment(e, 0.0, DtypeChoice::Auto);
            assert_eq!(t, Treatment::Copy, "{}", e.name);
        }
        // Producing with α ≠ 0: FP8 is refused, the mixed pair is a dtype mismatch.
        let err = pair(&s, "they", |_| Purpose::Produce { alpha: 0.5 }).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.mismatches.len(), 2, "{text}");
        assert!(
            text.contains("`q` is F8_E4M3, which expo cannot extrapolate"),
            "{text}"
        );
        assert!(text.contains("copy it unchanged from B"), "{text}");
        assert!(text.contains("`m` is F32 in A but F8_E5M2 in B"), "{text}");
    }

    #[test]
    fn treatments() {
        let dir = tempfile::tempdir().unwrap();
        let a = checkpoint(
            &dir.path().join("a"),
            &[("f", Dtype::F32, &[2]), ("i", Dtype::I8, &[2])],
        );
        let b = checkpoint(
            &dir.path().join("b"),
            &[("f", Dtype::BF16, &[2]), ("i", Dtype::I8, &[2])],
        );
        let cks = [a, b];
        let e = pair(&sides(&cks, &["A", "B"]), "they", |_| Purpose::Compare).unwrap();
        let spec = |out| KernelSpec {
            sft: FloatDtype::F32,
            aligned: FloatDtype::BF16,
            out,
        };
        let f32 = DtypeChoice::Fixed(FloatDtype::F32);
        assert_eq!(
            treatment(&e[0], 0.3, DtypeChoice::Auto),
            (Treatment::Extrapolate(spec(FloatDtype::BF16)), Dtype::BF16)
        );
        assert_eq!(
            treatment(&e[0], 0.0, f32),
            (Treatment::Cast(spec(FloatDtype::F32)), Dtype::F32)
        );
        assert_eq!(
            treatment(&e[0], 0.0, DtypeChoice::Fixed(FloatDtype::BF16)),
            (Treatment::Copy, Dtype::BF16)
        );
        assert_eq!(treatment(&e[1], 0.3, f32), (Treatment::Copy, Dtype::I8));
        assert_eq!(e[1].len, 2);
        // Integers must match unless their α is 0; floats and FP8 never.
        assert!(must_be_identical(Treatment::Copy, Dtype::I8, 0.3));
        assert!(must_be_identical(Treatment::Copy, Dtype::Bool, -1.0));
        assert!(!must_be_identical(Treatment::Copy, Dtype::I8, 0.0));
        assert!(!must_be_identical(Treatment::Copy, Dtype::BF16, 0.3));
        assert!(!must_be_identical(Treatment::Copy, Dtype::F8E4M3, 0.3));
    }

    #[test]
    fn n_way_lists_every_problem_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = checkpoint(
            &dir.path().join("a"),
            &[("x", Dtype::F32, &[2]), ("gone", Dtype::F32, &[1])],
        );
        let b = checkpoint(&dir.path().join("b"), &[("x", Dtype::I32, &[2])]);
        let c = checkpoint(
            &dir.path().join("c"),
            &[("x", Dtype::F32, &[2]), ("new", Dtype::F32, &[1])],
        );
        let cks = [a, b, c];
        let err = pair(&sides(&cks, &["A", "B", "C"]), "they", |_| Purpose::Compare).unwrap_err();
        let lines: Vec<String> = err.mismatches.iter().map(|m| m.to_string()).collect();
        assert_eq!(
            lines,
            [
                "`x` is I32 in B but F32 in C (only float tensors may differ in dtype)",
                "`new` is in C but not in A",
                "`new` is in C but not in B",
                "`gone` is in A but not in C",
            ]
        );
        assert!(err.to_string().starts_with(
            "the checkpoints do not match (4 problems); are they the same architecture?\n  `x`"
        ));
    }

    #[test]
    fn long_lists_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..12).map(|i| format!("t{i}")).collect();
        let tensors: Vec<(&str, Dtype, &[u64])> = names
            .iter()
            .map(|n| (n.as_str(), Dtype::F32, &[1u64][..]))
            .collect();
        let a = checkpoint(&dir.path().join("a"), &tensors);
        let b = checkpoint(&dir.path().join("b"), &[("t0", Dtype::F32, &[1])]);
        let cks = [a, b];
        let err = pair(
            &sides(&cks, &["--sft", "--aligned"]),
            "--sft and --aligned",
            |_| Purpose::Compare,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("the checkpoints do not match (11 problems); are --sft and --aligned the same architecture?"));
        assert_eq!(text.lines().count(), 1 + SHOWN_MISMATCHES + 1, "{text}");
        assert!(text.ends_with("\n  … and 1 more"), "{text}");
    }
}
