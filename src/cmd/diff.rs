//! `expo diff`: measure Δθ = θ1 − θ0 between checkpoints (the ExPO paper's Table 1) and
//! check the premise ExPO rests on.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::checkpoint::Checkpoint;
use crate::cli::DiffArgs;
use crate::cmd::inspect::grouped;
use crate::engine::MappedCheckpoint;
use crate::hub::{self, CacheEnv};
use crate::report::{self, Reporter};
use crate::stats::{
    self, DeltaSums, Input, LayerDelta, PairReport, TensorDelta, DEFAULT_RELATIVE_CHANGE_WARNING,
};

/// Runs `expo diff`.
pub fn run(args: &DiffArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let reporter = Reporter::new(args.quiet);
    let paths = args.inputs();
    let labels: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();

    let env = CacheEnv::from_process();
    let checkpoints = paths
        .iter()
        .map(|p| hub::open_for("checkpoint", p, &env).map(|(ck, _)| ck))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&Checkpoint> = checkpoints.iter().collect();
    let entries = stats::match_tensors(&refs, &labels).context("comparing the checkpoints")?;
    let maps = checkpoints
        .iter()
        .map(|ck| {
            MappedCheckpoint::map_guarded(ck)
                .with_context(|| format!("mapping {}", ck.given.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let inputs: Vec<Input> = checkpoints
        .iter()
        .zip(&maps)
        .map(|(checkpoint, maps)| Input { checkpoint, maps })
        .collect();
    let pairs = pairs_for(paths.len());

    let pool = super::worker_pool(args.threads, &reporter)?;
    let total_bytes: u64 = checkpoints.iter().map(Checkpoint::data_bytes).sum();
    let bar = reporter.progress(total_bytes);
    let sums = stats::compare(&inputs, &entries, &pairs, &pool, &|n| bar.inc(n));
    bar.finish_and_clear();
    // A truncated input reads as zeros under the guard: fail rather than report on them.
    for m in &maps {
        m.check_intact()?;
    }
    drop(maps);

    let reports: Vec<PairReport> = pairs
        .iter()
        .zip(&sums)
        .map(|(&(a, b), s)| PairReport::new(&entries, s, a, b))
        .collect();
    if args.json {
        let value = if let [only] = reports.as_slice() {
            pair_json(only, &labels[0], &labels[1], args.top)
        } else {
            let pairs_json: Vec<Value> = pairs
                .iter()
                .zip(&reports)
                .map(|(&(a, b), r)| {
                    let mut v = pair_json(r, &labels[a], &labels[b], args.top);
                    v["from_index"] = json!(a);
                    v["to_index"] = json!(b);
                    v
                })
                .collect();
            json!({"checkpoints": labels, "pairs": pairs_json})
        };
        report::print_json(&value)?;
    } else {
        let text = if let [only] = reports.as_slice() {
            human_pair(only, &checkpoints, args.top)
        } else {
            human_table(&reports, &pairs, &checkpoints)
        };
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()?;
    }
    // Warnings after the result, so that they are the last thing a user sees.
    for (&(a, b), r) in pairs.iter().zip(&reports) {
        warn_nonfinite(&reporter, r, &labels[a], &labels[b]);
    }
    if let [only] = reports.as_slice() {
        if let Some(message) = premise_warning(only) {
            reporter.warn(message);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    reporter.info(format!(
        "expo: compared {} checkpoints ({}) in {:.1}s ({}/s)",
        checkpoints.len(),
        report::bytes(total_bytes),
        seconds,
        report::bytes((total_bytes as f64 / seconds.max(1e-9)) as u64),
    ));
    Ok(ExitCode::SUCCESS)
}

/// The pairs compared: the one pair for two checkpoints; otherwise each consecutive pair
/// and the first with the last.
pub fn pairs_for(n: usize) -> Vec<(usize, usize)> {
    let mut pairs: Vec<(usize, usize)> = (1..n).map(|i| (i - 1, i)).collect();
    if n > 2 {
        pairs.push((0, n - 1));
    }
    pairs
}

/// The warning printed when a pair's relative change is above the default threshold.
fn premise_warning(r: &PairReport) -> Option<String> {
    let rel = r.total.relative_change().unwrap_or(f64::NAN);
    stats::premise_doubtful(rel, DEFAULT_RELATIVE_CHANGE_WARNING).then(|| {
        format!(
            "‖θ1 − θ0‖/‖θ0‖ = {} is above {:e}: the checkpoints are further apart than \
             alignment training usually moves a model, so ExPO's premise (a small Δθ) is \
             doubtful; is θ0 really the checkpoint θ1 was trained from?",
            opt(Some(rel)),
            DEFAULT_RELATIVE_CHANGE_WARNING
        )
    })
}

fn warn_nonfinite(reporter: &Reporter, r: &PairReport, from: &str, to: &str) {
    let with: Vec<&TensorDelta> = r.tensors.iter().filter(|t| t.sums.nonfinite > 0).collect();
    if let Some(first) = with.first() {
        reporter.warn(format!(
            "{from} → {to}: {} elements in {} tensor{} (e.g. `{}`) are infinite or NaN on \
             either side; they are left out of the norms",
            r.total.nonfinite,
            with.len(),
            if with.len() == 1 { "" } else { "s" },
            first.name
        ));
    }
}

// ---------------------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------------------

fn summary_json(r: &PairReport) -> Value {
    let t = &r.total;
    let rel = t.relative_change();
    json!({
        "tensors": r.tensors.len() + r.other.len(),
        "float_tensors": r.tensors.len(),
        "non_float_tensors": r.other.len(),
        "identical_tensors": r.identical_tensors(),
        "elements": t.elements,
        "changed_elements": t.changed,
        "changed_fraction": t.changed_fraction(),
        "nonfinite_elements": t.nonfinite,
        "mean_frobenius": r.mean_frobenius,
        "mean_normalized_frobenius": r.mean_normalized_frobenius,
        "delta_norm": t.delta_norm(),
        "base_norm": t.base_norm(),
        "target_norm": t.target_norm(),
        "relative_change": rel,
        "cosine": t.cosine(),
        "relative_change_warning": DEFAULT_RELATIVE_CHANGE_WARNING,
        "premise_doubtful": stats::premise_doubtful(rel.unwrap_or(f64::NAN), DEFAULT_RELATIVE_CHANGE_WARNING),
    })
}

fn tensor_json(t: &TensorDelta) -> Value {
    let s = &t.sums;
    json!({
        "name": t.name,
        "dtypes": [t.dtypes.0.name(), t.dtypes.1.name()],
        "shape": t.shape,
        "elements": s.elements,
        "frobenius": s.delta_norm(),
        "normalized_frobenius": s.normalized_delta_norm(),
        "relative_change": s.relative_change(),
        "cosine": s.cosine(),
        "changed_fraction": s.changed_fraction(),
        "changed_elements": s.changed,
        "identical": t.identical(),
        "base_norm": s.base_norm(),
        "target_norm": s.target_norm(),
        "nonfinite_elements": s.nonfinite,
    })
}

fn other_json(t: &TensorDelta) -> Value {
    json!({
        "name": t.name,
        "dtype": t.dtypes.1.name(),
        "shape": t.shape,
        "elements": t.sums.elements,
        "changed_elements": t.sums.changed,
        "changed_fraction": t.sums.changed_fraction(),
        "identical": t.identical(),
    })
}

fn layer_json(l: &LayerDelta) -> Value {
    let s = &l.sums;
    json!({
        "name": l.prefix,
        "layer": l.index,
        "tensors": l.tensors,
        "identical_tensors": l.identical_tensors,
        "elements": s.elements,
        "delta_norm": s.delta_norm(),
        "base_norm": s.base_norm(),
        "relative_change": s.relative_change(),
        "cosine": s.cosine(),
        "changed_fraction": s.changed_fraction(),
    })
}

fn pair_json(r: &PairReport, from: &str, to: &str, top: usize) -> Value {
    json!({
        "from": from,
        "to": to,
        "summary": summary_json(r),
        "tensors": r.tensors.iter().map(tensor_json).collect::<Vec<_>>(),
        "non_float_tensors": r.other.iter().map(other_json).collect::<Vec<_>>(),
        "layers": r.layers.iter().map(layer_json).collect::<Vec<_>>(),
        "top": r.top(top).iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
    })
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

fn human_pair(r: &PairReport, checkpoints: &[Checkpoint], top: usize) -> String {
    let mut s = String::new();
    let t = &r.total;
    let _ = writeln!(s, "θ0  {}", describe(&checkpoints[0]));
    let _ = writeln!(s, "θ1  {}", describe(&checkpoints[1]));
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Δ = θ1 − θ0 over {} float tensors ({} elements)",
        r.tensors.len(),
        grouped(t.elements)
    );
    let rel = t.relative_change();
    let rows: [(&str, String); 9] = [
        ("mean ‖Δ‖ per tensor", opt(r.mean_frobenius)),
        ("mean ‖Δ‖/√n per tensor", opt(r.mean_normalized_frobenius)),
        ("‖Δ‖ whole model", sci(t.delta_norm())),
        ("‖θ0‖ whole model", sci(t.base_norm())),
        ("‖Δ‖/‖θ0‖", opt(rel)),
        ("cos(θ0, θ1)", cosine(t.cosine())),
        (
            "elements changed",
            format!(
                "{} ({} of {})",
                percent(t),
                grouped(t.changed),
                grouped(t.elements)
            ),
        ),
        (
            "identical tensors",
            format!(
                "{} of {}",
                r.identical_tensors(),
                r.tensors.len() + r.other.len()
            ),
        ),
        (
            "ExPO premise",
            if stats::premise_doubtful(rel.unwrap_or(f64::NAN), DEFAULT_RELATIVE_CHANGE_WARNING) {
                format!(
                    "doubtful (‖Δ‖/‖θ0‖ > {:e})",
                    DEFAULT_RELATIVE_CHANGE_WARNING
                )
            } else {
                format!("ok (‖Δ‖/‖θ0‖ ≤ {:e})", DEFAULT_RELATIVE_CHANGE_WARNING)
            },
        ),
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

    let top = r.top(top);
    if !top.is_empty() {
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

    if !r.layers.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(s, "Per layer");
        let names: Vec<String> = r
            .layers
            .iter()
            .map(|l| {
                l.prefix
                    .clone()
                    .unwrap_or_else(|| "(not in a layer)".into())
            })
            .collect();
        let w = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
        let _ = writeln!(
            s,
            "  {:<w$}  {:>7}  {:>10}  {:>10}  {:>10}  {:>11}  {:>8}",
            "layer", "tensors", "‖Δ‖", "‖θ0‖", "‖Δ‖/‖θ0‖", "cosine", "changed"
        );
        for (l, name) in r.layers.iter().zip(&names) {
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

    if !r.other.is_empty() {
        let _ = writeln!(s);
        let changed: Vec<&TensorDelta> = r.other.iter().filter(|t| !t.identical()).collect();
        let _ = writeln!(
            s,
            "Non-float tensors (compared on their bytes, not in the norms): {}, {} identical",
            r.other.len(),
            r.other.len() - changed.len()
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
    s
}

/// A short name for the k-th checkpoint of a table: A, B, …, Z, then #27, #28, …
fn letter(k: usize) -> String {
    if k < 26 {
        char::from(b'A' + k as u8).to_string()
    } else {
        format!("#{}", k + 1)
    }
}

fn human_table(
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
        let doubtful =
            stats::premise_doubtful(rel.unwrap_or(f64::NAN), DEFAULT_RELATIVE_CHANGE_WARNING);
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
            if doubtful { "doubtful" } else { "ok" }
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

    #[test]
    fn pairs_like_table_1() {
        assert_eq!(pairs_for(2), vec![(0, 1)]);
        assert_eq!(pairs_for(3), vec![(0, 1), (1, 2), (0, 2)]);
        assert_eq!(pairs_for(4), vec![(0, 1), (1, 2), (2, 3), (0, 3)]);
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
