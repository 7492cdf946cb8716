//! What `expo extrapolate` prints when --aligned is a LoRA adapter: warnings about the run,
//! the `--dry-run` plan (text or JSON), one line per output written, and the summary on
//! stderr and the `--json` object on stdout.

use std::fmt::Write as _;

use serde_json::json;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;

use crate::report::{self, Reporter};
use expo::adapter::inspect::{AdapterDiff, AdapterInfo};
use expo::adapter::{adapter_json, kind_name, Prepared};
use expo::alpha;
use expo::build::AsKind;
use expo::sidefiles::InputRecord;

/// What an output is, in words.
fn written_as(kind: AsKind) -> &'static str {
    match kind {
        AsKind::Adapter => "an adapter",
        AsKind::Model => "a full checkpoint",
    }
}

/// The summary once every output is written: the time on stderr, and with `--json` the
/// object on stdout (one output's fields are also at the top level).
pub fn print_done(
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
        .map(|o| json!({"output": expo::text::path_json(&o.target.path), "alpha": o.alpha, "ok": true}))
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
pub fn print_plan(json: bool, p: &Prepared, reporter: &Reporter) -> std::io::Result<()> {
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
        "outputs": p.outputs.iter().map(|o| json!({"output": expo::text::path_json(&o.target.path), "alpha": o.alpha})).collect::<Vec<_>>(),
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
        let (changed, copied, added) = l.adapter_counts();
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

/// What `expo inspect` prints on an adapter: text, or with `json` one object.
pub fn inspect(info: &AdapterInfo, json: bool) -> Result<String> {
    if json {
        let mut s = serde_json::to_string_pretty(&inspect_json(info))?;
        s.push('\n');
        Ok(s)
    } else {
        Ok(inspect_text(info))
    }
}

/// `expo inspect --json` on an adapter: one object.
fn inspect_json(info: &AdapterInfo) -> serde_json::Value {
    let AdapterInfo {
        adapter,
        config,
        modules,
        full,
        problems,
        vllm_rank,
    } = info;
    json!({
        "path": adapter.given,
        "kind": "lora_adapter",
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "lora_bias": config.lora_bias,
        "init_lora_weights": config.init_lora_weights,
        "target_modules": config.target_modules,
        "base_model_name_or_path": config.base_model_name_or_path,
        "rank_pattern": config.rank_pattern.iter().map(|p| (p.key.clone(), p.value)).collect::<BTreeMap<_, _>>(),
        "alpha_pattern": config.alpha_pattern.iter().map(|p| (p.key.clone(), p.value)).collect::<BTreeMap<_, _>>(),
        "modules": modules.iter().map(|m| json!({
            "module": m.path,
            "kind": if m.embedding { "embedding" } else { "linear" },
            "r": m.rank,
            "lora_alpha": m.lora_alpha,
            "scaling": m.scaling,
            "dora": m.dora,
            "bias": m.bias,
            "dtype": m.dtype,
        })).collect::<Vec<_>>(),
        "full_tensors": full,
        "tensors": adapter.len(),
        "bytes": adapter.data_bytes(),
        "vllm": {
            "servable": problems.is_empty(),
            "problems": problems,
            "max_lora_rank": *vllm_rank,
        },
    })
}

/// `expo inspect` on an adapter, for people: its configuration, its modules, and whether
/// vLLM can serve it.
fn inspect_text(info: &AdapterInfo) -> String {
    let AdapterInfo {
        adapter,
        config,
        modules,
        full,
        ..
    } = info;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}: LoRA adapter, {} modules, {} tensors, {}",
        adapter.given.display(),
        modules.len(),
        adapter.len(),
        expo::text::bytes(adapter.data_bytes())
    );
    let _ = writeln!(
        s,
        "  r = {}, lora_alpha = {}, scaling {}{}{}{}",
        config.r,
        config.lora_alpha,
        if config.use_rslora {
            "lora_alpha/√r (rsLoRA)"
        } else {
            "lora_alpha/r"
        },
        if config.use_dora { ", DoRA" } else { "" },
        if config.lora_bias { ", lora_bias" } else { "" },
        match &config.base_model_name_or_path {
            Some(b) => format!(", base {b}"),
            None => String::new(),
        }
    );
    for p in &config.rank_pattern {
        let _ = writeln!(s, "  rank_pattern  {} → {}", p.key, p.value);
    }
    for p in &config.alpha_pattern {
        let _ = writeln!(s, "  alpha_pattern {} → {}", p.key, p.value);
    }
    for m in modules {
        let _ = writeln!(
            s,
            "    {:<9} r={:<4} s={:<10} {:<4} {}{}{}",
            if m.embedding { "embedding" } else { "linear" },
            m.rank.map_or("?".into(), |r| r.to_string()),
            m.scaling.map_or("?".into(), |x| format!("{x}")),
            m.dtype,
            m.path,
            if m.dora { " (DoRA)" } else { "" },
            if m.bias { " (+bias)" } else { "" }
        );
    }
    for f in full {
        let _ = writeln!(s, "    full      {f}");
    }
    vllm_text(&mut s, info);
    s
}

/// Whether vLLM can serve the adapter, and if not why.
fn vllm_text(s: &mut String, info: &AdapterInfo) {
    if info.problems.is_empty() {
        let _ = writeln!(
            s,
            "vLLM: can serve it{}",
            match info.vllm_rank {
                Some(r) if r > 16 => format!(" with --max-lora-rank {r}"),
                _ => String::new(),
            }
        );
    } else {
        let _ = writeln!(s, "vLLM: cannot serve it as is:");
        for p in &info.problems {
            let _ = writeln!(s, "  - {p}");
        }
    }
}

/// What `expo diff` prints on an adapter over its base: text (the `top` modules), or with
/// `json` one object.
pub fn diff(d: &AdapterDiff, sft: &Path, aligned: &Path, json: bool, top: usize) -> Result<String> {
    if json {
        let doc: serde_json::Value = json!({
            "sft": sft,
            "aligned": aligned,
            "kind": "lora_adapter",
            "summary": {
                "modules": d.modules,
                "delta_norm": d.delta_norm,
                "base_norm": d.base_norm,
                "relative_change": d.relative_change,
                "premise_doubtful": d.doubtful,
            },
            "modules": d.rows.iter().map(|m| json!({
                "tensor": m.tensor, "r": m.rank, "scaling": m.scaling, "delta_norm": m.delta_norm, "base_norm": m.base_norm,
                "relative_change": if m.base_norm > 0.0 { Some(m.delta_norm / m.base_norm) } else { None },
                "dora": m.dora,
            })).collect::<Vec<_>>(),
        });
        let mut s = serde_json::to_string_pretty(&doc)?;
        s.push('\n');
        Ok(s)
    } else {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "ΔW = s·B·A of {} modules, from r×r Gram matrices (ΔW is not materialised)",
            d.modules
        );
        let _ = writeln!(
            s,
            "  ‖ΔW‖ = {:.4e}, ‖θ0‖ = {:.4e} over the adapted tensors, ‖ΔW‖/‖θ0‖ = {}",
            d.delta_norm,
            d.base_norm,
            d.relative_change
                .map_or("n/a".into(), |r| format!("{r:.3e}"))
        );
        let _ = writeln!(
            s,
            "  premise (a small step): {}",
            if d.doubtful {
                "doubtful: alignment moved the adapted tensors far from --sft"
            } else {
                "ok"
            }
        );
        let top = top.min(d.rows.len());
        let _ = writeln!(s, "top {top} modules by ‖ΔW‖/‖θ0‖:");
        for m in d.rows.iter().take(top) {
            let _ = writeln!(
                s,
                "  {:.3e}  ‖ΔW‖={:.3e}  r={} s={}  {}{}",
                if m.base_norm > 0.0 {
                    m.delta_norm / m.base_norm
                } else {
                    f64::NAN
                },
                m.delta_norm,
                m.rank,
                m.scaling,
                m.tensor,
                if m.dora {
                    " (DoRA: direction only)"
                } else {
                    ""
                }
            );
        }
        Ok(s)
    }
}
