//! What `expo extrapolate` prints: the `--dry-run` plan (text or JSON), warnings about the
//! run, the summary on stderr and the `--json` object on stdout.

use std::fmt::Write as _;

use serde_json::json;

use crate::report::{self, Reporter};
use expo::alpha;
use expo::build::{Input, Output, Prepared, Produced};
use expo::checkpoint::Checkpoint;
use expo::hub::ResolvedInput;
use expo::plan::{self, OutputPlan};
use expo::sidefiles::{self, InputRecord};

/// What an error says when the outputs are complete but printing `what` failed.
pub fn complete_but_unprinted(outputs: &[Output], what: &str) -> String {
    let paths: Vec<String> = outputs
        .iter()
        .map(|o| o.target.path.display().to_string())
        .collect();
    format!(
        "printing the {what} on stdout failed, but {} complete: {}",
        if outputs.len() == 1 {
            "the output is"
        } else {
            "every output is"
        },
        paths.join(", ")
    )
}

/// The summary on stderr: one line per output written, then the relative change.
///
/// Only outputs that were committed are listed, and the relative change only when the
/// read it comes from completed.
pub fn print_summary(p: &Prepared, produced: &Produced, seconds: f64, reporter: &Reporter) {
    let written: Vec<&Output> = p
        .outputs
        .iter()
        .zip(&produced.results)
        .filter(|(_, r)| r.is_ok())
        .map(|(o, _)| o)
        .collect();
    for o in &written {
        let (extrapolated, cast, copied) = p.plan.counts(&o.alphas);
        reporter.info(format!(
            "expo: wrote {} with alpha = {}: {} tensors ({} extrapolated{}, {} copied) in {} file{}, {}",
            o.target.path.display(),
            alpha::format_alpha(o.alpha),
            p.plan.tensors.len(),
            extrapolated,
            if cast > 0 { format!(", {cast} converted") } else { String::new() },
            copied,
            p.plan.shards.len(),
            plural(p.plan.shards.len()),
            report::bytes(p.plan.data_bytes()),
        ));
    }
    let total: u64 = p.plan.data_bytes() * written.len() as u64;
    if let (Some(rc), false) = (produced.relative_change, written.is_empty()) {
        reporter.info(format!(
            "expo: ‖θ1 − θ0‖/‖θ0‖ = {rc:.3e} over the extrapolated tensors; {} written in {seconds:.1}s ({}/s)",
            report::bytes(total),
            report::bytes((total as f64 / seconds.max(1e-9)) as u64),
        ));
    }
}

/// The `--json` object of a run, on stdout.
pub fn print_json(
    p: &Prepared,
    produced: &Produced,
    seconds: f64,
    reporter: &Reporter,
) -> std::io::Result<()> {
    let per_output: Vec<serde_json::Value> = p
        .outputs
        .iter()
        .zip(&produced.results)
        .map(|(o, result)| {
            json!({
                "output": expo::text::path_json(&o.target.path),
                "alpha": o.alpha,
                "ok": result.is_ok(),
                "tensors": counts(&p.plan, o),
                "rules": p.rule_records(o.alpha),
                "shards": shards_json(&p.plan),
                "index": p.plan.index.as_ref().map(|(n, _)| n),
                "tensor_bytes": p.plan.data_bytes(),
                "output_bytes": p.plan.output_bytes(),
            })
        })
        .collect();
    let errors: Vec<String> = produced
        .results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|e| format!("{e:#}"))
        .collect();
    let mut doc = json!({
        "dry_run": false,
        "alphas": p.settings.alphas,
        "relative_change": produced.relative_change,
        "premise_doubtful": produced.doubtful,
        "side_files": p.side.copy,
        "seconds": seconds,
        "warnings": reporter.warnings(),
        "errors": errors,
        "outputs": per_output,
    });
    lift_single_output(&mut doc);
    report::print_json(&doc)
}

/// `--dry-run`: the plan, as text or (`--json`) as one JSON object, on stdout.
pub fn print_plan(json: bool, p: &Prepared, reporter: &Reporter) -> std::io::Result<()> {
    if json {
        report::print_json(&plan_json(p, reporter))
    } else {
        report::print_text(&plan_text(p))
    }
}

/// With a single α, repeats that output's fields at the top level of the JSON document.
fn lift_single_output(doc: &mut serde_json::Value) {
    let single = match doc["outputs"].as_array().map(Vec::as_slice) {
        Some([only]) => only.as_object().cloned(),
        _ => None,
    };
    if let (Some(fields), Some(obj)) = (single, doc.as_object_mut()) {
        for (k, v) in fields {
            obj.entry(k).or_insert(v);
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn counts(plan: &OutputPlan, o: &Output) -> serde_json::Value {
    let (extrapolated, cast, copied) = plan.counts(&o.alphas);
    json!({"total": plan.tensors.len(), "extrapolated": extrapolated, "cast": cast, "copied": copied})
}

fn shards_json(plan: &OutputPlan) -> serde_json::Value {
    plan.shards
        .iter()
        .map(|s| json!({"file": s.file_name, "bytes": s.file_len(), "tensors": s.tensors.len()}))
        .collect()
}

/// The α of tensor `i` in each output.
fn tensor_alphas(outputs: &[Output], i: usize) -> Vec<f64> {
    outputs.iter().map(|o| o.alphas[i]).collect()
}

fn plan_json(p: &Prepared, reporter: &Reporter) -> serde_json::Value {
    let [sft, aligned] = &p.inputs;
    // Every output shares one layout; only the α of each tensor differs.
    let plan = &p.plan;
    let shards: Vec<_> = plan
        .shards
        .iter()
        .map(|s| {
            let tensors: Vec<_> = s
                .tensors
                .iter()
                .map(|&i| {
                    let t = &plan.tensors[i];
                    let rule = plan::alpha_of(&p.rules, 0.0, &t.name).1;
                    json!({
                        "name": t.name,
                        "dtype": t.dtype.name(),
                        "shape": t.shape,
                        "action": t.recipe.treatment(p.outputs[0].alphas[i]).name(),
                        "alphas": tensor_alphas(&p.outputs, i),
                        "rule": rule.map(|r| &p.rules[r].spelling),
                        "bytes": t.len,
                    })
                })
                .collect();
            json!({"file": s.file_name, "bytes": s.file_len(), "tensors": tensors})
        })
        .collect();
    let per_output: Vec<_> = p
        .outputs
        .iter()
        .map(|o| {
            json!({
                "output": expo::text::path_json(&o.target.path),
                "alpha": o.alpha,
                "tensors": counts(plan, o),
                "rules": p.rule_records(o.alpha),
                "tensor_bytes": plan.data_bytes(),
                "output_bytes": plan.output_bytes(),
            })
        })
        .collect();
    let mut doc = json!({
        "dry_run": true,
        "alphas": p.outputs.iter().map(|o| o.alpha).collect::<Vec<_>>(),
        "sft": InputRecord::resolved(&sft.checkpoint, &sft.resolved),
        "aligned": InputRecord::resolved(&aligned.checkpoint, &aligned.resolved),
        "shards": shards,
        "index": plan.index.as_ref().map(|(n, _)| n),
        "side_files": p.side.copy,
        "warnings": reporter.warnings(),
        "outputs": per_output,
    });
    lift_single_output(&mut doc);
    doc
}

/// An input as the plan's first lines describe it.
fn describe(input: &Input) -> String {
    let (ck, resolved): (&Checkpoint, &ResolvedInput) = (&input.checkpoint, &input.resolved);
    format!(
        "{} ({}{} file{}, {} tensors, {})",
        ck.given.display(),
        match &resolved.hub {
            Some(h) if h.revision == h.commit => format!("cached commit {}; ", h.commit),
            Some(h) => format!("cached {} = commit {}; ", h.revision, h.commit),
            None => String::new(),
        },
        ck.shards.len(),
        plural(ck.shards.len()),
        ck.len(),
        report::bytes(ck.data_bytes())
    )
}

fn plan_text(p: &Prepared) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "plan: θ1 + α·(θ1 − θ0)");
    let _ = writeln!(s, "  --sft      {}", describe(&p.inputs[0]));
    let _ = writeln!(s, "  --aligned  {}", describe(&p.inputs[1]));
    for o in &p.outputs {
        let (extrapolated, cast, copied) = p.plan.counts(&o.alphas);
        let _ = writeln!(
            s,
            "  α = {:<6} → {}  ({} extrapolated, {} converted, {} copied)",
            alpha::format_alpha(o.alpha),
            o.target.path.display(),
            extrapolated,
            cast,
            copied
        );
    }
    for (r, n) in p.rules.iter().zip(&p.matches) {
        let _ = writeln!(
            s,
            "  rule {}: {} tensor{}{}",
            r.spelling,
            n,
            plural(*n),
            if *n == 0 { " (matches nothing)" } else { "" }
        );
    }
    write_shards(&mut s, p);
    let plan = &p.plan;
    if let Some((name, _)) = &plan.index {
        let _ = writeln!(s, "  {name}");
    }
    let copied_names: Vec<String> = p
        .side
        .copy
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let _ = writeln!(
        s,
        "  side files from --aligned: {}",
        if copied_names.is_empty() {
            "none".to_string()
        } else {
            copied_names.join(", ")
        }
    );
    let _ = writeln!(
        s,
        "  written by expo: {}, {}",
        sidefiles::MODEL_CARD_NAME,
        sidefiles::PROVENANCE_NAME
    );
    let _ = writeln!(
        s,
        "total: {} in {} file{} per output, {} output{}; nothing written (--dry-run)",
        report::bytes(plan.output_bytes()),
        plan.shards.len(),
        plural(plan.shards.len()),
        p.outputs.len(),
        plural(p.outputs.len())
    );
    s
}

/// Each output file of the plan and every tensor in it (with its α per output when rules
/// make them differ).
fn write_shards(s: &mut String, p: &Prepared) {
    let plan = &p.plan;
    let show_alpha = !p.rules.is_empty();
    for shard in &plan.shards {
        let _ = writeln!(
            s,
            "  {}  ({} tensors, {})",
            shard.file_name,
            shard.tensors.len(),
            report::bytes(shard.file_len())
        );
        for &i in &shard.tensors {
            let t = &plan.tensors[i];
            let alpha_col = if show_alpha {
                let alphas: Vec<String> = tensor_alphas(&p.outputs, i)
                    .into_iter()
                    .map(alpha::format_alpha)
                    .collect();
                format!(" α={:<8}", alphas.join(","))
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "    {:<11}{} {:<5} {:<16} {:>10}  {}",
                t.recipe.treatment(p.outputs[0].alphas[i]).name(),
                alpha_col,
                t.dtype.name(),
                format!("{:?}", t.shape),
                report::bytes(t.len),
                t.name
            );
        }
    }
}
