//! Measuring Δθ = θ1 − θ0 between checkpoints: per-tensor norms, cosine similarity and
//! changed elements, a whole-model summary, a per-layer roll-up, and the check of the
//! premise ExPO rests on (alignment training changes the weights only a little).
//!
//! # Accuracy
//!
//! Every element is widened to f64 exactly. Per tensor three sums are kept — Σ(θ1 − θ0)²,
//! Σθ0² and Σθ1² — each term rounded once (the cosine follows from them, see
//! [`DeltaSums::one_minus_cosine`]). Terms are added plainly in 8 independent
//! lanes over blocks of [`BLOCK`] elements (32 terms per lane), the lanes are combined
//! pairwise, and each block total is added into a Kahan–Babuška–Neumaier compensated sum.
//! For sums of squares (all terms ≥ 0) the relative error is therefore below about
//! 40·2⁻⁵³ ≈ 4.4e-15 whatever the tensor size. Results are right to ~1e-14 relative for
//! the largest models, well inside the 1e-9 to which they are tested against numpy.
//!
//! # Determinism
//!
//! Work is cut into chunks of [`CHUNK_ELEMENTS`] elements (as the extrapolation engine
//! does), handed out to the worker threads in file order, and the chunk results are
//! combined afterwards in chunk order. The chunking does not depend on the number of
//! threads, so neither do the results: they are bit-identical for any `--threads`.
//!
//! # Non-finite values
//!
//! An element where either side is ±inf or NaN is left out of the four sums (one such
//! value would make every norm of the model infinite or NaN) and counted in
//! [`DeltaSums::nonfinite`]. It still counts as changed unless both sides are equal (or
//! both NaN).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::checkpoint::{Checkpoint, TensorLoc};
use crate::dtype::{Dtype, FloatDtype};
use crate::engine::MappedCheckpoint;

mod sums;

/// Relative change ‖θ1 − θ0‖ / ‖θ0‖ of a whole model above which ExPO's premise — that
/// alignment moved the model only a little away from its SFT checkpoint — is doubtful.
///
/// Chosen from the paper's Table 1 (zephyr-7b): the mean normalized Frobenius norm
/// ‖Δ‖/√n is 6.3e-6 for θ_DPO − θ_SFT, where ExPO works, and 2.0e-4 for
/// θ_SFT − θ_pretrained, where it does not. Dividing by a typical per-element weight
/// magnitude (RMS) of 0.02 puts the two regimes at relative changes of about 3e-4 and 1e-2.
/// 2e-3 is close to their geometric mean (1.8e-3), a factor ~5.6 from each, and it
/// separates them for any typical weight RMS between 0.0032 and 0.1. See the README.
pub const DEFAULT_RELATIVE_CHANGE_WARNING: f64 = 2e-3;

/// True when a whole-model relative change ‖θ1 − θ0‖ / ‖θ0‖ is too large for ExPO's premise
/// to be trusted: above `threshold` (normally [`DEFAULT_RELATIVE_CHANGE_WARNING`]), or NaN
/// (nothing can be said, e.g. when the norms are undefined).
pub fn premise_doubtful(relative_change: f64, threshold: f64) -> bool {
    relative_change.is_nan() || relative_change > threshold
}

/// The warning given when [`premise_doubtful`] holds.
pub fn premise_warning(relative_change: f64, threshold: f64) -> String {
    format!(
        "‖θ1 − θ0‖/‖θ0‖ = {relative_change:.3e} is above {threshold:e}: alignment moved the model far from --sft, so the premise of extrapolation (a small step) is doubtful; evaluate the outputs with care, or check `expo diff` (threshold: --warn-relative-change)"
    )
}

/// Elements per chunk of work (the same granularity as the extrapolation engine).
pub const CHUNK_ELEMENTS: u64 = 1 << 20;
/// Bytes per chunk of work on non-float tensors.
pub const BYTE_CHUNK: u64 = 4 << 20;
pub use sums::BLOCK;

// ---------------------------------------------------------------------------------------
// Accumulators
// ---------------------------------------------------------------------------------------

/// A Kahan–Babuška–Neumaier compensated sum.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CompensatedSum {
    sum: f64,
    comp: f64,
}

impl CompensatedSum {
    /// Adds one value.
    #[inline]
    pub fn add(&mut self, x: f64) {
        let t = self.sum + x;
        if self.sum.abs() >= x.abs() {
            self.comp += (self.sum - t) + x;
        } else {
            self.comp += (x - t) + self.sum;
        }
        self.sum = t;
    }

    /// Adds another compensated sum.
    pub fn merge(&mut self, other: &CompensatedSum) {
        self.add(other.sum);
        self.comp += other.comp;
    }

    /// The sum.
    pub fn value(&self) -> f64 {
        if self.sum.is_finite() {
            self.sum + self.comp
        } else {
            self.sum
        }
    }
}

impl FromIterator<f64> for CompensatedSum {
    fn from_iter<I: IntoIterator<Item = f64>>(iter: I) -> Self {
        let mut s = CompensatedSum::default();
        for x in iter {
            s.add(x);
        }
        s
    }
}

/// The sums that describe the difference of two equally long runs of values θ0 and θ1.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DeltaSums {
    /// Σ (θ1 − θ0)² over the elements where both sides are finite.
    pub delta_sq: CompensatedSum,
    /// Σ θ0² over the same elements.
    pub base_sq: CompensatedSum,
    /// Σ θ1² over the same elements.
    pub target_sq: CompensatedSum,
    /// Number of elements seen.
    pub elements: u64,
    /// Elements whose value differs (two NaNs count as equal, −0 equals +0).
    pub changed: u64,
    /// Elements where θ0 or θ1 is ±inf or NaN (left out of the sums).
    pub nonfinite: u64,
}

impl DeltaSums {
    /// Adds the element pairs (a\[i\], b\[i\]), θ0 = a and θ1 = b.
    ///
    /// # Panics
    /// If the slices differ in length.
    pub fn accumulate(&mut self, a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len(), "θ0 and θ1 runs differ in length");
        sums::accumulate_values(self, a, b);
    }

    /// Adds the element pairs of two runs of little-endian floats: θ0 = `a` in format
    /// `da`, θ1 = `b` in format `db`. The same sums, to the bit, as widening both runs
    /// with [`widen`] and calling [`accumulate`](Self::accumulate).
    ///
    /// # Panics
    /// If the runs do not hold the same number of elements.
    pub fn accumulate_bytes(&mut self, da: FloatDtype, a: &[u8], db: FloatDtype, b: &[u8]) {
        assert!(
            a.len().is_multiple_of(da.size())
                && b.len().is_multiple_of(db.size())
                && a.len() / da.size() == b.len() / db.size(),
            "θ0 and θ1 runs differ in length"
        );
        sums::accumulate_bytes(self, da, a, db, b);
    }

    /// Adds the sums of another run (call in a fixed order for reproducible results).
    pub fn merge(&mut self, other: &DeltaSums) {
        self.delta_sq.merge(&other.delta_sq);
        self.base_sq.merge(&other.base_sq);
        self.target_sq.merge(&other.target_sq);
        self.elements += other.elements;
        self.changed += other.changed;
        self.nonfinite += other.nonfinite;
    }

    /// ‖θ1 − θ0‖ (Frobenius norm of the difference).
    pub fn delta_norm(&self) -> f64 {
        self.delta_sq.value().sqrt()
    }

    /// ‖θ0‖.
    pub fn base_norm(&self) -> f64 {
        self.base_sq.value().sqrt()
    }

    /// ‖θ1‖.
    pub fn target_norm(&self) -> f64 {
        self.target_sq.value().sqrt()
    }

    /// ‖θ1 − θ0‖ / √n, the root mean square change per element (0 for no elements).
    pub fn normalized_delta_norm(&self) -> f64 {
        if self.elements == 0 {
            0.0
        } else {
            self.delta_norm() / (self.elements as f64).sqrt()
        }
    }

    /// ‖θ1 − θ0‖ / ‖θ0‖: 0 when nothing changed, `None` when θ0 is zero but θ1 is not.
    pub fn relative_change(&self) -> Option<f64> {
        let (d, b) = (self.delta_norm(), self.base_norm());
        if d == 0.0 {
            Some(0.0)
        } else if b > 0.0 {
            Some(d / b)
        } else {
            None
        }
    }

    /// 1 − cos(θ0, θ1), computed without cancellation as
    /// (‖Δ‖² − (‖θ1‖ − ‖θ0‖)²) / (2‖θ0‖‖θ1‖), with ‖θ1‖ − ‖θ0‖ = (‖θ1‖² − ‖θ0‖²)/(‖θ1‖ + ‖θ0‖):
    /// accurate to many digits even when θ1 is very close to θ0, and exactly 0 when they are
    /// equal. `None` when either norm is zero (or not finite).
    pub fn one_minus_cosine(&self) -> Option<f64> {
        let (a, b) = (self.base_norm(), self.target_norm());
        if !(a > 0.0 && b > 0.0 && a.is_finite() && b.is_finite()) {
            return None;
        }
        let norm_gap = (self.target_sq.value() - self.base_sq.value()) / (a + b);
        let x = (self.delta_sq.value() - norm_gap * norm_gap) / (2.0 * a * b);
        Some(x.clamp(0.0, 2.0))
    }

    /// cos(θ0, θ1) = θ0·θ1 / (‖θ0‖‖θ1‖), as 1 − [`one_minus_cosine`](Self::one_minus_cosine);
    /// `None` when either norm is zero.
    pub fn cosine(&self) -> Option<f64> {
        self.one_minus_cosine().map(|x| 1.0 - x)
    }

    /// Fraction of elements whose value changed (0 for no elements).
    pub fn changed_fraction(&self) -> f64 {
        if self.elements == 0 {
            0.0
        } else {
            self.changed as f64 / self.elements as f64
        }
    }
}

/// Widens little-endian float elements to f64 (exact).
///
/// # Panics
/// If `bytes` does not hold exactly `out.len()` elements of `dtype`.
pub fn widen(dtype: FloatDtype, bytes: &[u8], out: &mut [f64]) {
    assert_eq!(bytes.len(), out.len() * dtype.size(), "length mismatch");
    sums::widen(dtype, bytes, out);
}

// ---------------------------------------------------------------------------------------
// Tensors paired across checkpoints (the rules are in `crate::pairing`)
// ---------------------------------------------------------------------------------------

pub use crate::pairing::{Entry, EntryKind};

/// Units of work of an entry whose data is `bytes_len` bytes on the first side, and how
/// many make a chunk: elements for float tensors, bytes otherwise.
fn units(entry: &Entry, bytes_len: u64) -> (u64, u64) {
    match &entry.kind {
        EntryKind::Float(_) => (entry.elements(), CHUNK_ELEMENTS),
        EntryKind::Bytes(d) => {
            let elem = if d.bits() % 8 == 0 { d.bits() / 8 } else { 1 };
            (bytes_len, (BYTE_CHUNK / elem).max(1) * elem)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Streaming the comparison
// ---------------------------------------------------------------------------------------

/// A checkpoint with its data mapped.
#[derive(Clone, Copy)]
pub struct Input<'a> {
    pub checkpoint: &'a Checkpoint,
    pub maps: &'a MappedCheckpoint,
}

impl<'a> Input<'a> {
    fn tensor(&self, loc: TensorLoc) -> &'a [u8] {
        self.maps.tensor(self.checkpoint, loc)
    }
}

/// One unit of work: a run of one tensor's elements (bytes, for non-float tensors).
#[derive(Debug, Clone, Copy)]
struct Task {
    entry: usize,
    start: u64,
    end: u64,
}

fn make_tasks(entries: &[Entry], inputs: &[Input]) -> Vec<Task> {
    let mut tasks = Vec::new();
    for (e, entry) in entries.iter().enumerate() {
        let len = inputs[0].tensor(entry.locs[0]).len() as u64;
        let (total, step) = units(entry, len);
        let mut start = 0;
        while start < total {
            let end = (start + step).min(total);
            tasks.push(Task {
                entry: e,
                start,
                end,
            });
            start = end;
        }
    }
    tasks
}

/// Compares the checkpoints in one streaming pass, for every pair `(from, to)` of input
/// indices in `pairs`: each checkpoint's data is read once however many pairs use it.
///
/// Returns, for each pair, one [`DeltaSums`] per entry (for non-float entries only
/// `elements` and `changed` are set). `on_progress` is called with the input bytes each
/// finished chunk read. Input pages are dropped from the process once their chunk is done,
/// so resident memory stays bounded.
pub fn compare(
    inputs: &[Input],
    entries: &[Entry],
    pairs: &[(usize, usize)],
    pool: &rayon::ThreadPool,
    on_progress: &(dyn Fn(u64) + Sync),
) -> Vec<Vec<DeltaSums>> {
    let tasks = make_tasks(entries, inputs);
    let results: Vec<OnceLock<Vec<DeltaSums>>> = tasks.iter().map(|_| OnceLock::new()).collect();
    let next = AtomicUsize::new(0);
    let worker = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(task) = tasks.get(i) else { return };
        let (sums, read) = run_task(inputs, &entries[task.entry], pairs, task);
        on_progress(read);
        let _ = results[i].set(sums);
    };
    pool.broadcast(|_| worker());

    let mut out = vec![vec![DeltaSums::default(); entries.len()]; pairs.len()];
    for (task, result) in tasks.iter().zip(results) {
        let sums = result
            .into_inner()
            .expect("every task ran: workers only stop when none is left");
        for (p, s) in sums.iter().enumerate() {
            out[p][task.entry].merge(s);
        }
    }
    out
}

fn run_task(
    inputs: &[Input],
    entry: &Entry,
    pairs: &[(usize, usize)],
    task: &Task,
) -> (Vec<DeltaSums>, u64) {
    let mut sums = vec![DeltaSums::default(); pairs.len()];
    let (s, e) = (task.start as usize, task.end as usize);
    let mut read = 0u64;
    match &entry.kind {
        EntryKind::Float(dtypes) => {
            let slices: Vec<&[u8]> = inputs
                .iter()
                .zip(&entry.locs)
                .zip(dtypes)
                .map(|((input, &loc), d)| &input.tensor(loc)[s * d.size()..e * d.size()])
                .collect();
            // Each pair reads its two runs afresh: they are still in cache for the next.
            for (sum, &(a, b)) in sums.iter_mut().zip(pairs) {
                sum.accumulate_bytes(dtypes[a], slices[a], dtypes[b], slices[b]);
            }
            for (input, bytes) in inputs.iter().zip(slices) {
                read += bytes.len() as u64;
                input.maps.release(bytes);
            }
        }
        EntryKind::Bytes(dtype) => {
            let elem = if dtype.bits() % 8 == 0 {
                (dtype.bits() / 8) as usize
            } else {
                1
            };
            let slices: Vec<&[u8]> = inputs
                .iter()
                .zip(&entry.locs)
                .map(|(input, &loc)| &input.tensor(loc)[s..e])
                .collect();
            for (sum, &(a, b)) in sums.iter_mut().zip(pairs) {
                let (x, y) = (slices[a], slices[b]);
                sum.elements += ((e - s) / elem) as u64;
                sum.changed += x
                    .chunks(elem)
                    .zip(y.chunks(elem))
                    .filter(|(p, q)| p != q)
                    .count() as u64;
            }
            for (input, bytes) in inputs.iter().zip(slices) {
                read += bytes.len() as u64;
                input.maps.release(bytes);
            }
        }
    }
    (sums, read)
}

// ---------------------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------------------

/// One tensor's comparison between two checkpoints.
#[derive(Debug, Clone)]
pub struct TensorDelta {
    pub name: String,
    pub shape: Vec<u64>,
    /// Dtypes on the θ0 and θ1 sides.
    pub dtypes: (Dtype, Dtype),
    /// False for non-float tensors, whose sums hold only element counts.
    pub is_float: bool,
    pub sums: DeltaSums,
}

impl TensorDelta {
    /// No element changed.
    pub fn identical(&self) -> bool {
        self.sums.changed == 0
    }
}

/// Compares names so that runs of digits compare as numbers: `layers.2` < `layers.10`.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn runs(s: &str) -> impl Iterator<Item = &str> {
        let mut rest = s;
        std::iter::from_fn(move || {
            let first = rest.chars().next()?;
            let digit = first.is_ascii_digit();
            let end = rest
                .find(|c: char| c.is_ascii_digit() != digit)
                .unwrap_or(rest.len());
            let (run, tail) = rest.split_at(end);
            rest = tail;
            Some(run)
        })
    }
    let mut x = runs(a);
    let mut y = runs(b);
    loop {
        let ord = match (x.next(), y.next()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(p), Some(q)) => {
                if p.as_bytes()[0].is_ascii_digit() && q.as_bytes()[0].is_ascii_digit() {
                    let (p0, q0) = (p.trim_start_matches('0'), q.trim_start_matches('0'));
                    p0.len().cmp(&q0.len()).then_with(|| p0.cmp(q0))
                } else {
                    p.cmp(q)
                }
            }
        };
        if ord.is_ne() {
            return ord;
        }
    }
}

/// The layer a tensor belongs to: the first purely numeric component of its name and the
/// name up to it, e.g. `("model.layers.12", 12)` for `model.layers.12.mlp.up_proj.weight`.
pub fn layer_of(name: &str) -> Option<(&str, u64)> {
    let mut offset = 0;
    for part in name.split('.') {
        if offset > 0 && !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(index) = part.parse() {
                return Some((&name[..offset + part.len()], index));
            }
        }
        offset += part.len() + 1;
    }
    None
}

/// The float tensors of one layer (or of no layer), summed.
#[derive(Debug, Clone)]
pub struct LayerDelta {
    /// The name prefix, e.g. `model.layers.12`; `None` for tensors outside any layer.
    pub prefix: Option<String>,
    pub index: Option<u64>,
    pub tensors: usize,
    pub identical_tensors: usize,
    pub sums: DeltaSums,
}

/// Everything about one pair of checkpoints.
#[derive(Debug, Clone)]
pub struct PairReport {
    /// Float tensors, in natural name order.
    pub tensors: Vec<TensorDelta>,
    /// Non-float tensors (compared on the bytes, not in the norms), in natural name order.
    pub other: Vec<TensorDelta>,
    /// All float tensors, summed in order.
    pub total: DeltaSums,
    /// Mean over float tensors with at least one element of ‖Δ‖; `None` when there are none.
    pub mean_frobenius: Option<f64>,
    /// Mean over the same tensors of ‖Δ‖/√n.
    pub mean_normalized_frobenius: Option<f64>,
    /// Per-layer roll-up: layers sorted by prefix stem and index, then tensors outside
    /// any layer.
    pub layers: Vec<LayerDelta>,
}

impl PairReport {
    /// Builds the report of pair `(from, to)` from the per-entry sums [`compare`] returned.
    ///
    /// Tensors are listed, and summed, in natural name order (`layers.2` before
    /// `layers.10`), so that the report does not depend on how either side is sharded or on
    /// which other checkpoints were compared in the same run.
    pub fn new(entries: &[Entry], sums: &[DeltaSums], from: usize, to: usize) -> PairReport {
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by(|&i, &j| natural_cmp(&entries[i].name, &entries[j].name));
        let mut tensors = Vec::new();
        let mut other = Vec::new();
        for (e, s) in order.iter().map(|&i| (&entries[i], &sums[i])) {
            let t = TensorDelta {
                name: e.name.clone(),
                shape: e.shape.clone(),
                dtypes: (e.dtypes[from], e.dtypes[to]),
                is_float: matches!(e.kind, EntryKind::Float(_)),
                sums: *s,
            };
            if t.is_float {
                tensors.push(t);
            } else {
                other.push(t);
            }
        }
        let mut total = DeltaSums::default();
        for t in &tensors {
            total.merge(&t.sums);
        }
        let counted: Vec<&TensorDelta> = tensors.iter().filter(|t| t.sums.elements > 0).collect();
        let mean = |f: &dyn Fn(&TensorDelta) -> f64| {
            (!counted.is_empty()).then(|| {
                let s: CompensatedSum = counted.iter().map(|t| f(t)).collect();
                s.value() / counted.len() as f64
            })
        };
        let mean_frobenius = mean(&|t| t.sums.delta_norm());
        let mean_normalized_frobenius = mean(&|t| t.sums.normalized_delta_norm());

        // (stem, index) → layer; `None` sorts first, so it is moved to the end below.
        let mut by_layer: BTreeMap<Option<(String, u64)>, LayerDelta> = BTreeMap::new();
        for t in &tensors {
            let key = layer_of(&t.name).map(|(prefix, index)| (prefix.to_string(), index));
            let stem_key = key.as_ref().map(|(p, i)| {
                let stem = p.rsplit_once('.').map_or(p.as_str(), |(stem, _)| stem);
                (stem.to_string(), *i)
            });
            let layer = by_layer.entry(stem_key).or_insert_with(|| LayerDelta {
                prefix: key.as_ref().map(|(p, _)| p.clone()),
                index: key.as_ref().map(|(_, i)| *i),
                tensors: 0,
                identical_tensors: 0,
                sums: DeltaSums::default(),
            });
            layer.tensors += 1;
            layer.identical_tensors += usize::from(t.identical());
            layer.sums.merge(&t.sums);
        }
        let mut layers: Vec<LayerDelta> = by_layer.into_values().collect();
        if layers.first().is_some_and(|l| l.prefix.is_none()) {
            let outside = layers.remove(0);
            layers.push(outside);
        }
        PairReport {
            tensors,
            other,
            total,
            mean_frobenius,
            mean_normalized_frobenius,
            layers,
        }
    }

    /// Number of tensors, float or not, in which no element changed.
    pub fn identical_tensors(&self) -> usize {
        self.tensors
            .iter()
            .chain(&self.other)
            .filter(|t| t.identical())
            .count()
    }

    /// The float tensors by decreasing relative change (an infinite relative change —
    /// θ0 zero, θ1 not — first; ties by name), at most `k` of them.
    pub fn top(&self, k: usize) -> Vec<&TensorDelta> {
        let mut v: Vec<&TensorDelta> = self.tensors.iter().collect();
        let key = |t: &TensorDelta| t.sums.relative_change().unwrap_or(f64::INFINITY);
        v.sort_by(|a, b| key(b).total_cmp(&key(a)).then_with(|| a.name.cmp(&b.name)));
        v.truncate(k);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64, for test data.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    /// Values k·2^-e with |k| < 2^10 and 0 ≤ e < 30, returned with the exact integer
    /// K = k·2^(30−e), so that x = K·2^-30 and every square and product is an exact integer
    /// multiple of 2^-60 (at most 2^80 of them).
    fn scaled(rng: &mut Rng) -> (f64, i128) {
        let k = (rng.next() % 2047) as i64 - 1023;
        let e = (rng.next() % 30) as i32;
        let x = k as f64 * 2f64.powi(-e);
        (x, (k as i128) << (30 - e))
    }

    fn rel(a: f64, b: f64) -> f64 {
        if a == b {
            0.0
        } else {
            (a - b).abs() / b.abs()
        }
    }

    #[test]
    fn sums_match_exact_integer_arithmetic() {
        // 3 Mi elements spanning 2^40 in magnitude: the exact sums, computed in i128 and
        // rounded once to f64, are the reference.
        let mut rng = Rng(7);
        let n = 3 << 20;
        let (mut a, mut b) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut dd, mut aa, mut bb, mut ab) = (0i128, 0i128, 0i128, 0i128);
        for _ in 0..n {
            let (x, kx) = scaled(&mut rng);
            let (y, ky) = scaled(&mut rng);
            a.push(x);
            b.push(y);
            dd += (ky - kx) * (ky - kx);
            aa += kx * kx;
            bb += ky * ky;
            ab += kx * ky;
        }
        let exact = |s: i128| s as f64 * 2f64.powi(-60);
        let mut sums = DeltaSums::default();
        // Uneven pieces, as chunks and sub-blocks cut them.
        for (ca, cb) in a.chunks(100_003).zip(b.chunks(100_003)) {
            let mut part = DeltaSums::default();
            part.accumulate(ca, cb);
            sums.merge(&part);
        }
        assert_eq!(sums.elements, n as u64);
        for (got, want) in [
            (sums.delta_sq.value(), exact(dd)),
            (sums.base_sq.value(), exact(aa)),
            (sums.target_sq.value(), exact(bb)),
        ] {
            assert!(rel(got, want) < 1e-14, "{got:e} vs {want:e}");
        }
        // The cosine, from the three sums, against the exact dot product.
        let cos = exact(ab) / (exact(aa).sqrt() * exact(bb).sqrt());
        assert!((sums.cosine().unwrap() - cos).abs() < 1e-14, "{cos}");
    }

    #[test]
    fn small_terms_after_a_large_one_are_not_lost() {
        // 1 followed by 4 Mi terms of 2^-54 (squares of 2^-27): plain left-to-right
        // summation returns exactly 1.0; the exact sum is 1 + 2^-32.
        let n = 4 << 20;
        let a = vec![0.0; n + 1];
        let mut b = vec![2f64.powi(-27); n + 1];
        b[0] = 1.0;
        let naive: f64 = b.iter().map(|y| y * y).fold(0.0, |s, t| s + t);
        assert_eq!(
            naive, 1.0,
            "the test needs a case plain summation gets wrong"
        );
        let mut sums = DeltaSums::default();
        sums.accumulate(&a, &b);
        // At most 31 terms are lost in the lane that holds the 1 (< 40·2^-53 relative).
        let exact = 1.0 + 2f64.powi(-32);
        assert!(rel(sums.target_sq.value(), exact) < 5e-15);
        assert!(rel(sums.delta_sq.value(), exact) < 5e-15);
    }

    #[test]
    fn compensated_sum_recovers_cancellation() {
        let s: CompensatedSum = [1e16, 1.0, -1e16, 1.0].into_iter().collect();
        assert_eq!(s.value(), 2.0);
        let mut x = CompensatedSum::default();
        x.merge(&s);
        x.merge(&[1e100, -1e100, 3.0].into_iter().collect());
        assert_eq!(x.value(), 5.0);
    }

    #[test]
    fn sums_do_not_depend_on_how_the_run_is_cut_beyond_blocks() {
        // Cutting at multiples of BLOCK gives the same bits as one call.
        let mut rng = Rng(3);
        let a: Vec<f64> = (0..10_000).map(|_| scaled(&mut rng).0).collect();
        let b: Vec<f64> = (0..10_000).map(|_| scaled(&mut rng).0).collect();
        let mut whole = DeltaSums::default();
        whole.accumulate(&a, &b);
        let mut cut = DeltaSums::default();
        for (x, y) in a.chunks(BLOCK * 3).zip(b.chunks(BLOCK * 3)) {
            cut.accumulate(x, y);
        }
        assert_eq!(whole, cut);
    }

    #[test]
    fn derived_quantities() {
        let a = [3.0, 0.0, 1.0, f64::NAN, 2.0];
        let b = [3.0, 4.0, -0.0, f64::NAN, f64::INFINITY];
        let mut s = DeltaSums::default();
        s.accumulate(&a[..3], &b[..3]);
        // Δ = (0, 4, -1): ‖Δ‖² = 17; ‖θ0‖² = 10; ‖θ1‖² = 25; θ0·θ1 = 9.
        assert_eq!(s.delta_sq.value(), 17.0);
        assert_eq!(s.base_sq.value(), 10.0);
        assert_eq!(s.target_sq.value(), 25.0);
        assert_eq!((s.elements, s.changed, s.nonfinite), (3, 2, 0));
        assert_eq!(s.relative_change(), Some(17f64.sqrt() / 10f64.sqrt()));
        let cos = s.cosine().unwrap();
        assert!((cos - 9.0 / (10f64.sqrt() * 5.0)).abs() < 1e-15, "{cos}");
        assert_eq!(s.normalized_delta_norm(), 17f64.sqrt() / 3f64.sqrt());
        assert_eq!(s.changed_fraction(), 2.0 / 3.0);
        // Non-finite elements: counted, left out of the sums; NaN = NaN is "unchanged".
        let mut t = DeltaSums::default();
        t.accumulate(&a, &b);
        assert_eq!((t.elements, t.changed, t.nonfinite), (5, 3, 2));
        assert_eq!(t.delta_sq.value(), 17.0);
        // Zero tensors.
        let mut z = DeltaSums::default();
        z.accumulate(&[0.0; 4], &[0.0; 4]);
        assert_eq!(z.relative_change(), Some(0.0));
        assert_eq!(z.cosine(), None);
        let mut y = DeltaSums::default();
        y.accumulate(&[0.0], &[1.0]);
        assert_eq!(y.relative_change(), None);
        let e = DeltaSums::default();
        assert_eq!(
            (e.normalized_delta_norm(), e.changed_fraction()),
            (0.0, 0.0)
        );
    }

    #[test]
    fn cosine_of_nearly_equal_runs_keeps_its_digits() {
        // θ1 = θ0 + ε·v with v ⟂ θ0: 1 − cos = 1 − 1/√(1 + ε²‖v‖²/‖θ0‖²) ≈ ε²/2 here,
        // far below what θ0·θ1/(‖θ0‖‖θ1‖) resolves next to 1.
        let eps = 1e-6;
        let a = [1.0, 0.0, 1.0, 0.0];
        let b = [1.0, eps, 1.0, -eps];
        let mut s = DeltaSums::default();
        s.accumulate(&a, &b);
        let r2 = eps * eps; // ‖εv‖²/‖θ0‖² = 2ε²/2
                            // 1 − (1 + x)^(−1/2) = x/2 − 3x²/8 + O(x³) (evaluating it directly would cancel).
        let want = r2 / 2.0 - 3.0 * r2 * r2 / 8.0;
        let got = s.one_minus_cosine().unwrap();
        assert!(rel(got, want) < 1e-12, "{got:e} vs {want:e}");
        // Equal runs: exactly 1.
        let mut same = DeltaSums::default();
        same.accumulate(&a, &a);
        assert_eq!(same.cosine(), Some(1.0));
    }

    #[test]
    fn widening_is_exact() {
        let bf: Vec<u8> = [0x3f80u16, 0xbfc0, 0x0001, 0x7f80]
            .iter()
            .flat_map(|h| h.to_le_bytes())
            .collect();
        let mut out = [0.0; 4];
        widen(FloatDtype::BF16, &bf, &mut out);
        assert_eq!(out[..2], [1.0, -1.5]);
        assert_eq!(out[2], 2f64.powi(-133));
        assert_eq!(out[3], f64::INFINITY);
        let f16: Vec<u8> = [0x3c00u16, 0x0001]
            .iter()
            .flat_map(|h| h.to_le_bytes())
            .collect();
        widen(FloatDtype::F16, &f16, &mut out[..2]);
        assert_eq!(out[..2], [1.0, 2f64.powi(-24)]);
        let f32b: Vec<u8> = 0.1f32.to_le_bytes().to_vec();
        widen(FloatDtype::F32, &f32b, &mut out[..1]);
        assert_eq!(out[0], 0.1f32 as f64);
    }

    #[test]
    fn natural_order() {
        let mut v = vec![
            "model.layers.10.mlp",
            "model.layers.2.mlp",
            "lm_head.weight",
            "model.layers.2.attn",
            "model.layers.02.attn",
            "model.embed_tokens.weight",
            "model.layers.1.mlp",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            [
                "lm_head.weight",
                "model.embed_tokens.weight",
                "model.layers.1.mlp",
                "model.layers.02.attn",
                "model.layers.2.attn",
                "model.layers.2.mlp",
                "model.layers.10.mlp",
            ]
        );
    }

    #[test]
    fn layer_names() {
        assert_eq!(
            layer_of("model.layers.12.mlp.up_proj.weight"),
            Some(("model.layers.12", 12))
        );
        assert_eq!(
            layer_of("transformer.h.0.attn.c_attn.weight"),
            Some(("transformer.h.0", 0))
        );
        assert_eq!(layer_of("model.embed_tokens.weight"), None);
        assert_eq!(layer_of("lm_head.weight"), None);
        assert_eq!(
            layer_of("0.weight"),
            None,
            "a leading number is not a layer"
        );
        assert_eq!(
            layer_of("model.layers.3.mlp.experts.7.w1"),
            Some(("model.layers.3", 3))
        );
    }

    #[test]
    fn premise_threshold() {
        // The paper's regimes (Table 1, zephyr-7b), as relative changes for weights of RMS
        // 0.02: DPO − SFT passes, SFT − pre-trained does not.
        assert!(!premise_doubtful(
            6.3e-6 / 0.02,
            DEFAULT_RELATIVE_CHANGE_WARNING
        ));
        assert!(premise_doubtful(
            2.0e-4 / 0.02,
            DEFAULT_RELATIVE_CHANGE_WARNING
        ));
        assert!(!premise_doubtful(0.0, DEFAULT_RELATIVE_CHANGE_WARNING));
        assert!(!premise_doubtful(
            DEFAULT_RELATIVE_CHANGE_WARNING,
            DEFAULT_RELATIVE_CHANGE_WARNING
        ));
        assert!(premise_doubtful(f64::NAN, DEFAULT_RELATIVE_CHANGE_WARNING));
        assert!(premise_doubtful(
            f64::INFINITY,
            DEFAULT_RELATIVE_CHANGE_WARNING
        ));
    }
}
