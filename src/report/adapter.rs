//! What `expo extrapolate` prints when --aligned is a LoRA adapter: warnings about the run,
//! the `--dry-run` plan (text or JSON), one line per output written, and the summary on
//! stderr and the `--json` object on stdout.

use std::fmt::Write as _;

use serde_json::json;

use crate::adapter::{adapter_json, kind_name, Output, Prepared};
use crate::alpha;
use crate::cli::AsKind;
use crate::plan::AlphaRule;
use crate::report::{self, Reporter};
use crate::sidefiles::InputRecord;

/// Warns that a --skip or --alpha-for rule matches no tensor the adapter changes.
pub fn warn_unmatched_rule(reporter: &Reporter, rule: &AlphaRule) {
    reporter.warn(format!(
        "{} matches no tensor the adapter changes",
        rule.spelling
    ));
}

/// Warns that α ≤ −1 moves past θ0.
pub fn warn_alpha_past_theta0(reporter: &Reporter, alpha: f64) {
    reporter.warn(format!(
        "alpha = {alpha} moves past θ0, away from the aligned model; did you swap --sft and --aligned?"
    ));
}

/// What an output is, in words.
fn written_as(kind: AsKind) -> &'static str {
    match kind {
        AsKind::Adapter => "an adapter",
        AsKind::Model => "a full checkpoint",
    }
}

/// The line on stderr for an output put in place.
pub(crate) fn print_written(reporter: &Reporter, kind: AsKind, o: &Output) {
    reporter.info(format!(
        "expo: wrote {} ({}) with alpha = {}",
        o.target.path.display(),
        written_as(kind),
        alpha::format_alpha(o.alpha)
    ));
}

/// The summary once every output is written: the time on stderr, and with `--json` the
/// object on stdout (one output's fields are also at the top level).
pub(crate) fn print_done(
    json: bool,
    p: &Prepared,
    seconds: f64,
    reporter: &Reporter,
) -> std::io::Result<()> {
    reporter.info(format!("expo: done in {seconds:.1}s"));
    if !json {
        return Ok(());
    }
    let summaries: Vec<_> = p
        .outputs
        .iter()
        .map(|o| json!({"output": o.target.path, "alpha": o.alpha, "ok": true}))
        .collect();
    let mut doc = json!({
        "dry_run": false,
        "as": kind_name(p.kind),
        "alphas": p.outputs.iter().map(|o| o.alpha).collect::<Vec<_>>(),
        "adapter": adapter_json(&p.inputs),
        "side_files": p.side.names(),
        "seconds": seconds,
        "warnings": reporter.warnings(),
        "outputs": summaries,
    });
    if let [only] = summaries.as_slice() {
        if let (Some(obj), Some(fields)) = (doc.as_object_mut(), only.as_object()) {
            for (k, v) in fields {
                obj.entry(k.clone()).or_insert(v.clone());
            }
        }
    }
    report::print_json(&doc)
}

/// The `--dry-run` plan: JSON on stdout with `--json`, else text on stdout.
pub(crate) fn print_plan(json: bool, p: &Prepared, reporter: &Reporter) -> std::io::Result<()> {
    if json {
        report::print_json(&plan_json(p, reporter))
    } else {
        report::print_text(&plan_text(p))
    }
}

/// The `--dry-run --json` object.
fn plan_json(p: &Prepared, reporter: &Reporter) -> serde_json::Value {
    let inputs = &p.inputs;
    let modules: Vec<_> = inputs
        .plan
        .modules
        .iter()
        .map(|m| {
            json!({
                "module": m.path,
                "base": m.targets,
                "kind": m.orientation.name(),
                "r": m.rank,
                "lora_alpha": m.lora_alpha,
                "scaling": m.scaling,
                "dora": m.magnitude.is_some(),
                "bias": m.base_bias,
                "alphas": p.outputs.iter().map(|o| p.alpha_for(o.alpha, &m.targets[0])).collect::<Vec<_>>(),
            })
        })
        .collect();
    let full: Vec<_> = inputs
        .plan
        .full
        .iter()
        .map(|f| json!({"tensor": f.key, "base": f.base}))
        .collect();
    json!({
        "dry_run": true,
        "as": kind_name(p.kind),
        "alphas": p.outputs.iter().map(|o| o.alpha).collect::<Vec<_>>(),
        "outputs": p.outputs.iter().map(|o| json!({"output": o.target.path, "alpha": o.alpha})).collect::<Vec<_>>(),
        "sft": InputRecord::resolved(&inputs.base, &inputs.base_in),
        "aligned": InputRecord::resolved(&inputs.adapter, &inputs.adapter_in),
        "adapter": adapter_json(inputs),
        "modules": modules,
        "full_tensors": full,
        "files": p.layout.as_ref().map(|l| l.shards.iter().map(|s| &s.file_name).collect::<Vec<_>>()),
        "side_files": p.side.names(),
        "warnings": reporter.warnings(),
    })
}

/// The `--dry-run` plan as text: inputs, outputs, modules and full tensors, totals.
fn plan_text(p: &Prepared) -> String {
    let inputs = &p.inputs;
    let config = &inputs.config;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "plan: θ0 + (1+α)·ΔW from a LoRA adapter, written as {}",
        written_as(p.kind)
    );
    let _ = writeln!(s, "  --sft      {}", inputs.base.given.display());
    let _ = writeln!(
        s,
        "  --aligned  {} (LoRA r = {}, lora_alpha = {}{}{})",
        inputs.adapter.given.display(),
        config.r,
        config.lora_alpha,
        if config.use_rslora { ", rsLoRA" } else { "" },
        if config.use_dora { ", DoRA" } else { "" }
    );
    for o in &p.outputs {
        let _ = writeln!(
            s,
            "  α = {:<6} → {}",
            alpha::format_alpha(o.alpha),
            o.target.path.display()
        );
    }
    plan_tensors_text(&mut s, p);
    let names = p.side.names();
    let _ = writeln!(
        s,
        "  side files: {}",
        if names.is_empty() {
            "none".to_string()
        } else {
            names
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let _ = writeln!(s, "nothing written (--dry-run)");
    s
}

/// The plan's lines per module and full tensor, and the totals of `--as model`.
fn plan_tensors_text(s: &mut String, p: &Prepared) {
    for m in &p.inputs.plan.modules {
        let _ = writeln!(
            s,
            "    {:<9} r={:<3} s={:<8} {}{}",
            m.orientation.name(),
            m.rank,
            m.scaling,
            m.targets.join(" + "),
            if m.magnitude.is_some() { " (DoRA)" } else { "" }
        );
    }
    for f in &p.inputs.plan.full {
        let _ = writeln!(
            s,
            "    full      {}",
            match &f.base {
                Some(b) => format!("{} (θ0: {b})", f.key),
                None => format!("{} (no θ0: copied, --skip)", f.key),
            }
        );
    }
    if let Some(l) = &p.layout {
        let (changed, copied, added) = l.counts();
        let _ = writeln!(
            s,
            "  {} tensors changed, {} copied from --sft, {} added; {} in {} file{}",
            changed,
            copied,
            added,
            report::bytes(l.data_bytes()),
            l.shards.len(),
            if l.shards.len() == 1 { "" } else { "s" }
        );
    }
}
