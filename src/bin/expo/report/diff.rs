//! What `expo diff` prints: the JSON document, streamed entry by entry, and the human
//! report and table.
//!
//! JSON objects are written with their keys in alphabetical order (the order serde_json's
//! own maps have), so that the document reads the same whatever writes it.

use std::fmt::Write as _;
use std::io;

use serde::ser::{SerializeSeq, Serializer};
use serde::Serialize;

use super::inspect::grouped;
use crate::report;
use expo::checkpoint::Checkpoint;
use expo::stats::{
    self, DeltaSums, LayerDelta, PairReport, TensorDelta, DEFAULT_RELATIVE_CHANGE_WARNING,
};

// ---------------------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------------------

/// Serializes the items of an iterator as a JSON array, one at a time.
struct Seq<F>(F);

impl<I, F> Serialize for Seq<F>
where
    F: Fn() -> I,
    I: Iterator,
    I::Item: Serialize,
{
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(None)?;
        for item in (self.0)() {
            seq.serialize_element(&item)?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct SummaryJson {
    base_norm: f64,
    changed_elements: u64,
    changed_fraction: f64,
    cosine: Option<f64>,
    delta_norm: f64,
    elements: u64,
    float_tensors: usize,
    identical_tensors: usize,
    mean_frobenius: Option<f64>,
    mean_normalized_frobenius: Option<f64>,
    non_float_tensors: usize,
    nonfinite_elements: u64,
    premise_doubtful: bool,
    relative_change: Option<f64>,
    relative_change_warning: f64,
    target_norm: f64,
    tensors: usize,
}

impl SummaryJson {
    fn new(r: &PairReport) -> SummaryJson {
        let t = &r.total;
        let rel = t.relative_change();
        SummaryJson {
            base_norm: t.base_norm(),
            changed_elements: t.changed,
            changed_fraction: t.changed_fraction(),
            cosine: t.cosine(),
            delta_norm: t.delta_norm(),
            elements: t.elements,
            float_tensors: r.tensors.len(),
            identical_tensors: r.identical_tensors(),
            mean_frobenius: r.mean_frobenius,
            mean_normalized_frobenius: r.mean_normalized_frobenius,
            non_float_tensors: r.other.len(),
            nonfinite_elements: t.nonfinite,
            premise_doubtful: doubtful(rel),
            relative_change: rel,
            relative_change_warning: DEFAULT_RELATIVE_CHANGE_WARNING,
            target_norm: t.target_norm(),
            tensors: r.tensors.len() + r.other.len(),
        }
    }
}

#[derive(Serialize)]
struct TensorJson<'a> {
    base_norm: f64,
    changed_elements: u64,
    changed_fraction: f64,
    cosine: Option<f64>,
    dtypes: [&'static str; 2],
    elements: u64,
    frobenius: f64,
    identical: bool,
    name: &'a str,
    nonfinite_elements: u64,
    normalized_frobenius: f64,
    relative_change: Option<f64>,
    shape: &'a [u64],
    target_norm: f64,
}

impl<'a> TensorJson<'a> {
    fn new(t: &'a TensorDelta) -> TensorJson<'a> {
        let s = &t.sums;
        TensorJson {
            base_norm: s.base_norm(),
            changed_elements: s.changed,
            changed_fraction: s.changed_fraction(),
            cosine: s.cosine(),
            dtypes: [t.dtypes.0.name(), t.dtypes.1.name()],
            elements: s.elements,
            frobenius: s.delta_norm(),
            identical: t.identical(),
            name: &t.name,
            nonfinite_elements: s.nonfinite,
            normalized_frobenius: s.normalized_delta_norm(),
            relative_change: s.relative_change(),
            shape: &t.shape,
            target_norm: s.target_norm(),
        }
    }
}

#[derive(Serialize)]
struct OtherJson<'a> {
    changed_elements: u64,
    changed_fraction: f64,
    dtype: &'static str,
    elements: u64,
    identical: bool,
    name: &'a str,
    shape: &'a [u64],
}

impl<'a> OtherJson<'a> {
    fn new(t: &'a TensorDelta) -> OtherJson<'a> {
        OtherJson {
            changed_elements: t.sums.changed,
            changed_fraction: t.sums.changed_fraction(),
            dtype: t.dtypes.1.name(),
            elements: t.sums.elements,
            identical: t.identical(),
            name: &t.name,
            shape: &t.shape,
        }
    }
}

#[derive(Serialize)]
struct LayerJson<'a> {
    base_norm: f64,
    changed_fraction: f64,
    cosine: Option<f64>,
    delta_norm: f64,
    elements: u64,
    identical_tensors: usize,
    layer: Option<u64>,
    name: Option<&'a str>,
    relative_change: Option<f64>,
    tensors: usize,
}

impl<'a> LayerJson<'a> {
    fn new(l: &'a LayerDelta) -> LayerJson<'a> {
        let s = &l.sums;
        LayerJson {
            base_norm: s.base_norm(),
            changed_fraction: s.changed_fraction(),
            cosine: s.cosine(),
            delta_norm: s.delta_norm(),
            elements: s.elements,
            identical_tensors: l.identical_tensors,
            layer: l.index,
            name: l.prefix.as_deref(),
            relative_change: s.relative_change(),
            tensors: l.tensors,
        }
    }
}

/// One pair; `from_index`/`to_index` only in the table of three or more checkpoints.
#[derive(Serialize)]
struct PairJson<'a, T, N, L, P> {
    from: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    from_index: Option<usize>,
    layers: L,
    non_float_tensors: N,
    summary: SummaryJson,
    tensors: T,
    to: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    to_index: Option<usize>,
    top: P,
}

/// Writes one pair's object through `s`.
fn serialize_pair<S: Serializer>(
    s: S,
    r: &PairReport,
    labels: (&str, &str),
    indices: Option<(usize, usize)>,
    top: usize,
) -> Result<S::Ok, S::Error> {
    PairJson {
        from: labels.0,
        from_index: indices.map(|i| i.0),
        layers: Seq(|| r.layers.iter().map(LayerJson::new)),
        non_float_tensors: Seq(|| r.other.iter().map(OtherJson::new)),
        summary: SummaryJson::new(r),
        tensors: Seq(|| r.tensors.iter().map(TensorJson::new)),
        to: labels.1,
        to_index: indices.map(|i| i.1),
        top: Seq(|| r.top(top).into_iter().map(|t| t.name.as_str())),
    }
    .serialize(s)
}

/// The pairs of a table of three or more checkpoints.
struct Pairs<'a> {
    reports: &'a [PairReport],
    pairs: &'a [(usize, usize)],
    labels: &'a [String],
    top: usize,
}

impl Serialize for Pairs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct One<'a>(&'a Pairs<'a>, usize);
        impl Serialize for One<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let (p, k) = (self.0, self.1);
                let (a, b) = p.pairs[k];
                let labels = (p.labels[a].as_str(), p.labels[b].as_str());
                serialize_pair(s, &p.reports[k], labels, Some((a, b)), p.top)
            }
        }
        let mut seq = s.serialize_seq(Some(self.reports.len()))?;
        for k in 0..self.reports.len() {
            seq.serialize_element(&One(self, k))?;
        }
        seq.end()
    }
}

/// Writes the `--json` document of `expo diff` (pretty, then a newline) to `out`, one
/// tensor at a time: memory does not grow with the size of the document.
pub fn write_json(
    out: &mut impl io::Write,
    reports: &[PairReport],
    pairs: &[(usize, usize)],
    labels: &[String],
    top: usize,
) -> io::Result<()> {
    super::mark_json_printed();
    let mut ser = serde_json::Serializer::pretty(&mut *out);
    if let ([only], [(a, b)]) = (reports, pairs) {
        let labels = (labels[*a].as_str(), labels[*b].as_str());
        serialize_pair(&mut ser, only, labels, None, top)?;
    } else {
        #[derive(Serialize)]
        struct Table<'a> {
            checkpoints: &'a [String],
            pairs: Pairs<'a>,
        }
        Table {
            checkpoints: labels,
            pairs: Pairs {
                reports,
                pairs,
                labels,
                top,
            },
        }
        .serialize(&mut ser)?;
    }
    writeln!(out)
}

// ---------------------------------------------------------------------------------------
// Warnings
// ---------------------------------------------------------------------------------------

fn doubtful(rel: Option<f64>) -> bool {
    stats::premise_doubtful(rel.unwrap_or(f64::NAN), DEFAULT_RELATIVE_CHANGE_WARNING)
}

/// The warning printed when a pair's relative change is above the default threshold.
pub fn premise_warning(r: &PairReport) -> Option<String> {
    let rel = r.total.relative_change();
    doubtful(rel).then(|| {
        format!(
            "‖θ1 − θ0‖/‖θ0‖ = {} is above {:e}: the checkpoints are further apart than \
             alignment training usually moves a model, so ExPO's premise (a small Δθ) is \
             doubtful; is θ0 really the checkpoint θ1 was trained from?",
            opt(Some(rel.unwrap_or(f64::NAN))),
            DEFAULT_RELATIVE_CHANGE_WARNING
        )
    })
}

/// The warning about elements left out of the norms because either side is not finite.
pub fn nonfinite_warning(r: &PairReport, from: &str, to: &str) -> Option<String> {
    let mut with = r.tensors.iter().filter(|t| t.sums.nonfinite > 0);
    let first = with.next()?;
    let count = 1 + with.count();
    Some(format!(
        "{from} → {to}: {} elements in {count} tensor{} (e.g. `{}`) are infinite or NaN on \
         either side; they are left out of the norms",
        r.total.nonfinite,
        if count == 1 { "" } else { "s" },
        first.name
    ))
}

// ---------------------------------------------------------------------------------------
// Human output
// ---------------------------------------------------------------------------------------

/// A number in scientific notation with 4 significant digits; `0` for zero.
fn sci(x: f64) -> String {
    if x == 0.0 {
        "0".to_string()
    } else {
        format!("{x:.3e}")
    }
}

/// Like [`sci`]; `-` when undefined.
fn opt(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_string(), sci)
}

/// A cosine similarity; values very close to 1 as `1-ε`, so that they stay readable.
fn cosine(c: Option<f64>) -> String {
    match c {
        None => "-".to_string(),
        Some(c) if c >= 1.0 => "1".to_string(),
        Some(c) if c > 0.9999 => format!("1-{:.2e}", 1.0 - c),
        Some(c) => format!("{c:.6}"),
    }
}

/// A fraction of elements as a percentage that never rounds to 0% or 100% falsely.
fn percent(s: &DeltaSums) -> String {
    let (changed, n) = (s.changed, s.elements);
    if changed == 0 {
        return "0%".to_string();
    }
    if changed == n {
        return "100%".to_string();
    }
    let p = 100.0 * changed as f64 / n as f64;
    if p < 0.01 {
        "<0.01%".to_string()
    } else if p > 99.99 {
        ">99.99%".to_string()
    } else {
        format!("{p:.2}%")
    }
}

fn describe(ck: &Checkpoint) -> String {
    format!(
        "{} ({} file{}, {} tensors, {})",
        ck.given.display(),
        ck.shards.len(),
        if ck.shards.len() == 1 { "" } else { "s" },
        ck.len(),
        report::bytes(ck.data_bytes())
    )
}

/// The report of one pair: the summary, the `top` tensors that changed most, the layers,
/// and the non-float tensors.
pub fn human_pair(r: &PairReport, checkpoints: &[Checkpoint], top: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "θ0  {}", describe(&checkpoints[0]));
    let _ = writeln!(s, "θ1  {}", describe(&checkpoints[1]));
    let _ = writeln!(s);
    summary(&mut s, r);
    top_tensors(&mut s, &r.top(top));
    layers(&mut s, &r.layers);
    non_float(&mut s, &r.other);
    s
}

fn summary(s: &mut String, r: &PairReport) {
    let t = &r.total;
    let _ = writeln!(
        s,
        "Δ = θ1 − θ0 over {} float tensors ({} elements)",
        r.tensors.len(),
        grouped(t.elements)
    );
    let rel = t.relative_change();
    let premise = if doubtful(rel) {
        format!("doubtful (‖Δ‖/‖θ0‖ > {DEFAULT_RELATIVE_CHANGE_WARNING:e})")
    } else {
        format!("ok (‖Δ‖/‖θ0‖ ≤ {DEFAULT_RELATIVE_CHANGE_WARNING:e})")
    };
    let changed = format!(
        "{} ({} of {})",
        percent(t),
        grouped(t.changed),
        grouped(t.elements)
    );
    let identical = format!(
        "{} of {}",
        r.identical_tensors(),
        r.tensors.len() + r.other.len()
    );
    let rows: [(&str, String); 9] = [
        ("mean ‖Δ‖ per tensor", opt(r.mean_frobenius)),
        ("mean ‖Δ‖/√n per tensor", opt(r.mean_normalized_frobenius)),
        ("‖Δ‖ whole model", sci(t.delta_norm())),
        ("‖θ0‖ whole model", sci(t.base_norm())),
        ("‖Δ‖/‖θ0‖", opt(rel)),
        ("cos(θ0, θ1)", cosine(t.cosine())),
        ("elements changed", changed),
        ("identical tensors", identical),
        ("ExPO premise", premise),
    ];
    for (label, value) in rows {
        let _ = writeln!(s, "  {label:<24} {value}");
    }
    if t.nonfinite > 0 {
        let _ = writeln!(
            s,
            "  {:<24} {} (left out of the norms)",
            "non-finite elements", t.nonfinite
        );
    }
}

fn top_tensors(s: &mut String, top: &[&TensorDelta]) {
    if top.is_empty() {
        return;
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "Top {} tensors by ‖Δ‖/‖θ0‖", top.len());
    let _ = writeln!(
        s,
        "  {:>10}  {:>10}  {:>10}  {:>11}  {:>8}  tensor",
        "‖Δ‖/‖θ0‖", "‖Δ‖", "‖Δ‖/√n", "cosine", "changed"
    );
    for t in top {
        let x = &t.sums;
        let _ = writeln!(
            s,
            "  {:>10}  {:>10}  {:>10}  {:>11}  {:>8}  {}",
            opt(x.relative_change()),
            sci(x.delta_norm()),
            sci(x.normalized_delta_norm()),
            cosine(x.cosine()),
            percent(x),
            t.name
        );
    }
}

fn layers(s: &mut String, layers: &[LayerDelta]) {
    if layers.is_empty() {
        return;
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "Per layer");
    let names: Vec<&str> = layers
        .iter()
        .map(|l| l.prefix.as_deref().unwrap_or("(not in a layer)"))
        .collect();
    let w = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    let _ = writeln!(
        s,
        "  {:<w$}  {:>7}  {:>10}  {:>10}  {:>10}  {:>11}  {:>8}",
        "layer", "tensors", "‖Δ‖", "‖θ0‖", "‖Δ‖/‖θ0‖", "cosine", "changed"
    );
    for (l, name) in layers.iter().zip(&names) {
        let x = &l.sums;
        let _ = writeln!(
            s,
            "  {:<w$}  {:>7}  {:>10}  {:>10}  {:>10}  {:>11}  {:>8}",
            name,
            l.tensors,
            sci(x.delta_norm()),
            sci(x.base_norm()),
            opt(x.relative_change()),
            cosine(x.cosine()),
            percent(x)
        );
    }
}

fn non_float(s: &mut String, other: &[TensorDelta]) {
    if other.is_empty() {
        return;
    }
    let _ = writeln!(s);
    let changed: Vec<&TensorDelta> = other.iter().filter(|t| !t.identical()).collect();
    let _ = writeln!(
        s,
        "Non-float tensors (compared on their bytes, not in the norms): {}, {} identical",
        other.len(),
        other.len() - changed.len()
    );
    for t in changed {
        let _ = writeln!(
            s,
            "  changed: {} ({}, {} of {} elements)",
            t.name,
            t.dtypes.1,
            grouped(t.sums.changed),
            grouped(t.sums.elements)
        );
    }
}

/// A short name for the k-th checkpoint of a table: A, B, …, Z, then #27, #28, …
fn letter(k: usize) -> String {
    if k < 26 {
        char::from(b'A' + k as u8).to_string()
    } else {
        format!("#{}", k + 1)
    }
}

/// The table of three or more checkpoints: one row per pair.
pub fn human_table(
    reports: &[PairReport],
    pairs: &[(usize, usize)],
    checkpoints: &[Checkpoint],
) -> String {
    let mut s = String::new();
    for (k, ck) in checkpoints.iter().enumerate() {
        let _ = writeln!(s, "{:<3} {}", letter(k), describe(ck));
    }
    let _ = writeln!(s);
    let labels: Vec<String> = pairs
        .iter()
        .map(|&(a, b)| format!("{} → {}", letter(a), letter(b)))
        .collect();
    let w = labels
        .iter()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(0)
        .max(4);
    let _ = writeln!(
        s,
        "{:<w$}  {:>10}  {:>12}  {:>10}  {:>10}  {:>10}  {:>11}  {:>8}  {:>9}  ExPO premise",
        "pair",
        "mean ‖Δ‖",
        "mean ‖Δ‖/√n",
        "‖Δ‖",
        "‖θ0‖",
        "‖Δ‖/‖θ0‖",
        "cosine",
        "changed",
        "identical"
    );
    for (r, label) in reports.iter().zip(&labels) {
        let t = &r.total;
        let rel = t.relative_change();
        let _ = writeln!(
            s,
            "{:<w$}  {:>10}  {:>12}  {:>10}  {:>10}  {:>10}  {:>11}  {:>8}  {:>9}  {}",
            label,
            opt(r.mean_frobenius),
            opt(r.mean_normalized_frobenius),
            sci(t.delta_norm()),
            sci(t.base_norm()),
            opt(rel),
            cosine(t.cosine()),
            percent(t),
            format!(
                "{}/{}",
                r.identical_tensors(),
                r.tensors.len() + r.other.len()
            ),
            if doubtful(rel) { "doubtful" } else { "ok" }
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "mean ‖Δ‖ and mean ‖Δ‖/√n are per-tensor means (the paper's Table 1); ‖Δ‖, ‖θ0‖ and \
         cosine are whole-model; ExPO premise: ok when ‖Δ‖/‖θ0‖ ≤ {:e}.",
        DEFAULT_RELATIVE_CHANGE_WARNING
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use expo::dtype::Dtype;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// The system allocator, counting the bytes each thread holds (for the unit tests of
    /// this crate only), so that a test can see how much memory a step needed at most.
    struct Counting;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn track(delta: isize) {
        let _ = LIVE.try_with(|live| {
            let now = live.get() + delta;
            live.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }

    // SAFETY: every call is passed to the system allocator unchanged; the counting only
    // touches const-initialized thread-locals, which never allocate.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: the caller's contract is System's.
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                track(layout.size() as isize);
            }
            p
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: as above.
            unsafe { System.dealloc(ptr, layout) };
            track(-(layout.size() as isize));
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: as above.
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                track(new_size as isize - layout.size() as isize);
            }
            p
        }
    }

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;

    /// Counts what is written.
    struct Sink(usize);
    impl io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_memory_does_not_grow_with_the_document() {
        // 20k tensors: a document of several MB, which a tree of JSON values would hold
        // whole (about 1 KB per tensor).
        let tensors: Vec<TensorDelta> = (0..20_000)
            .map(|i| TensorDelta {
                name: format!("model.layers.{}.mlp.t{}.weight", i / 10, i % 10),
                shape: vec![4, 2],
                dtypes: (Dtype::BF16, Dtype::BF16),
                is_float: true,
                sums: DeltaSums {
                    elements: 8,
                    changed: 1,
                    ..Default::default()
                },
            })
            .collect();
        let report = PairReport {
            tensors,
            other: Vec::new(),
            total: DeltaSums::default(),
            mean_frobenius: Some(0.5),
            mean_normalized_frobenius: Some(0.25),
            layers: Vec::new(),
        };
        let labels = ["a".to_string(), "b".to_string()];
        let mut out = Sink(0);
        let before = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(before));
        write_json(
            &mut out,
            std::slice::from_ref(&report),
            &[(0, 1)],
            &labels,
            3,
        )
        .unwrap();
        let needed = PEAK.with(Cell::get) - before;
        assert!(out.0 > 5_000_000, "{} bytes written", out.0);
        // The ranking behind `top` holds a reference per tensor; nothing else grows.
        assert!(
            needed < 32 * 20_000,
            "writing the JSON needed {needed} bytes"
        );
    }

    #[test]
    fn formatting() {
        assert_eq!(sci(0.0), "0");
        assert_eq!(sci(6.3e-6), "6.300e-6");
        assert_eq!(opt(None), "-");
        assert_eq!(cosine(Some(1.0)), "1");
        assert_eq!(cosine(Some(0.5)), "0.500000");
        assert_eq!(cosine(Some(1.0 - 2.5e-7)), "1-2.50e-7");
        assert_eq!(letter(0), "A");
        assert_eq!(letter(26), "#27");
        let s = |changed, elements| DeltaSums {
            changed,
            elements,
            ..Default::default()
        };
        assert_eq!(percent(&s(0, 10)), "0%");
        assert_eq!(percent(&s(10, 10)), "100%");
        assert_eq!(percent(&s(1, 1_000_000)), "<0.01%");
        assert_eq!(percent(&s(999_999, 1_000_000)), ">99.99%");
        assert_eq!(percent(&s(1, 4)), "25.00%");
    }
}
