//! `expo inspect` and `expo diff` on a LoRA adapter.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::checkpoint::Checkpoint;
use crate::cli::{DiffArgs, InspectArgs};
use crate::dtype::DtypeClass;
use crate::engine::MappedCheckpoint;
use crate::hub::{self, CacheEnv};
use crate::report;

use super::config::AdapterConfig;
use super::lora::{self, decode, BaseFacts};
use super::names::{self, Key, Part};

/// Ranks vLLM accepts for `--max-lora-rank` (its default is 16).
pub const VLLM_RANKS: [u64; 9] = [1, 8, 16, 32, 64, 128, 256, 320, 512];

/// One module as the adapter alone describes it.
#[derive(Debug, Clone)]
pub struct ModuleInfo {
    pub path: String,
    pub embedding: bool,
    pub rank: Option<u64>,
    pub lora_alpha: f64,
    pub scaling: Option<f64>,
    pub dora: bool,
    pub bias: bool,
    pub dtype: String,
}

/// Modules and full tensors of an adapter, from its keys and config (no base needed).
pub fn describe(
    adapter: &Checkpoint,
    config: &AdapterConfig,
) -> Result<(Vec<ModuleInfo>, Vec<String>)> {
    let mut modules: BTreeMap<String, ModuleInfo> = BTreeMap::new();
    let mut full = Vec::new();
    for (_, t) in adapter.tensors() {
        match names::classify(&t.name)? {
            Key::Full { .. } => full.push(t.name.clone()),
            Key::Lora { module, part } => {
                let (_, a) = config.rank_and_alpha(&module);
                let m = modules.entry(module.clone()).or_insert(ModuleInfo {
                    path: module,
                    embedding: false,
                    rank: None,
                    lora_alpha: a,
                    scaling: None,
                    dora: false,
                    bias: false,
                    dtype: t.dtype.name().to_string(),
                });
                match part {
                    Part::A | Part::EmbA => {
                        m.embedding |= part == Part::EmbA;
                        m.rank = t.shape.first().copied();
                        m.scaling = m.rank.map(|rk| config.scaling(rk, a));
                    }
                    Part::Magnitude => m.dora = true,
                    Part::BBias => m.bias = true,
                    Part::B | Part::EmbB => m.embedding |= part == Part::EmbB,
                }
            }
        }
    }
    Ok((modules.into_values().collect(), full))
}

/// Why vLLM could not serve the adapter as written (empty: it can).
pub fn vllm_problems(
    config: &AdapterConfig,
    modules: &[ModuleInfo],
    full: &[String],
) -> Vec<String> {
    let mut why = Vec::new();
    if config.use_dora || modules.iter().any(|m| m.dora) {
        why.push("DoRA adapters are rejected by vLLM".to_string());
    }
    if config.has_patterns() {
        why.push(
            "vLLM ignores rank_pattern/alpha_pattern, so it would apply the wrong scaling"
                .to_string(),
        );
    }
    if !full.is_empty() || !config.modules_to_save.is_empty() {
        why.push(format!(
            "vLLM rejects adapters with modules_to_save or other full tensors ({})",
            if full.is_empty() {
                config.modules_to_save.join(", ")
            } else {
                full.join(", ")
            }
        ));
    }
    if config.lora_bias || modules.iter().any(|m| m.bias) {
        why.push("vLLM rejects trained LoRA biases (lora_bias)".to_string());
    }
    let max_rank = modules
        .iter()
        .filter_map(|m| m.rank)
        .max()
        .unwrap_or(config.r);
    if max_rank > 512 {
        why.push(format!(
            "rank {max_rank} is above vLLM's largest --max-lora-rank (512)"
        ));
    }
    why
}

/// The early branch of `expo inspect`: lists an adapter directory's modules.
pub fn maybe_inspect(args: &InspectArgs) -> Result<Option<ExitCode>> {
    let env = CacheEnv::from_process();
    let Some(resolved) = hub::resolve_path(&args.path, &env).ok() else {
        return Ok(None);
    };
    if !super::is_adapter_dir(&resolved.path) {
        return Ok(None);
    }
    let (adapter, _, config) = super::open_adapter("adapter", &args.path, &env)?;
    let (modules, full) = describe(&adapter, &config)?;
    let problems = vllm_problems(&config, &modules, &full);
    let max_rank = modules
        .iter()
        .filter_map(|m| m.rank)
        .max()
        .unwrap_or(config.r);
    let vllm_rank = VLLM_RANKS.iter().copied().find(|&r| r >= max_rank);
    let text = if args.json {
        let doc = json!({
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
                "max_lora_rank": vllm_rank,
            },
        });
        let mut s = serde_json::to_string_pretty(&doc)?;
        s.push('\n');
        s
    } else {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{}: LoRA adapter, {} modules, {} tensors, {}",
            adapter.given.display(),
            modules.len(),
            adapter.len(),
            report::bytes(adapter.data_bytes())
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
        for m in &modules {
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
        for f in &full {
            let _ = writeln!(s, "    full      {f}");
        }
        if problems.is_empty() {
            let _ = writeln!(
                s,
                "vLLM: can serve it{}",
                match vllm_rank {
                    Some(r) if r > 16 => format!(" with --max-lora-rank {r}"),
                    _ => String::new(),
                }
            );
        } else {
            let _ = writeln!(s, "vLLM: cannot serve it as is:");
            for p in &problems {
                let _ = writeln!(s, "  - {p}");
            }
        }
        s
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(Some(ExitCode::SUCCESS))
}

/// ‖B·A‖²_F from the two r×r Gram matrices: Σ (BᵀB) ∘ (A·Aᵀ). `a` is [r, n] row-major,
/// `b` is [m, r] row-major.
pub fn frobenius_sq_of_product(a: &[f64], b: &[f64], r: usize) -> f64 {
    let n = a.len() / r.max(1);
    let m = b.len() / r.max(1);
    let mut total = 0.0;
    for k in 0..r {
        for l in 0..r {
            let aa: f64 = (0..n).map(|j| a[k * n + j] * a[l * n + j]).sum();
            let bb: f64 = (0..m).map(|i| b[i * r + k] * b[i * r + l]).sum();
            total += aa * bb;
        }
    }
    total
}

/// The early branch of `expo diff --sft BASE --aligned ADAPTER`.
pub fn maybe_diff(args: &DiffArgs) -> Result<Option<ExitCode>> {
    let paths = args.inputs();
    let env = CacheEnv::from_process();
    let [sft, aligned] = paths.as_slice() else {
        return Ok(None);
    };
    let is_adapter = hub::resolve_path(aligned, &env)
        .ok()
        .is_some_and(|r| super::is_adapter_dir(&r.path));
    if !is_adapter {
        return Ok(None);
    }
    let (base, _) = hub::open_for("--sft checkpoint", sft, &env)?;
    let (adapter, _, config) = super::open_adapter("--aligned adapter", aligned, &env)?;
    let facts = BaseFacts::read(&base);
    let plan = lora::analyze(&adapter, &config, &base, &facts, &|_| true).with_context(|| {
        format!(
            "applying adapter {} to --sft {}",
            aligned.display(),
            sft.display()
        )
    })?;
    let base_maps = MappedCheckpoint::map_guarded(&base).context("mapping --sft")?;
    let amaps = MappedCheckpoint::map_guarded(&adapter).context("mapping --aligned")?;
    let sum_sq = |name: &str| -> f64 {
        let Some((loc, t)) = base.get(name) else {
            return 0.0;
        };
        let DtypeClass::Float(d) = t.dtype.class() else {
            return 0.0;
        };
        let bytes = base_maps.tensor(&base, loc);
        let mut total = 0.0;
        let mut vals = vec![0.0; (1 << 16).min(t.elements() as usize)];
        for chunk in bytes.chunks(vals.len().max(1) * d.size()) {
            let n = chunk.len() / d.size();
            lora::decode_into(d, chunk, &mut vals[..n]);
            total += vals[..n].iter().map(|v| v * v).sum::<f64>();
        }
        total
    };
    let mut rows = Vec::new();
    let (mut delta_total, mut base_total) = (0.0, 0.0);
    for m in &plan.modules {
        let a = decode(m.a.dtype, amaps.tensor(&adapter, m.a.loc));
        let b = decode(m.b.dtype, amaps.tensor(&adapter, m.b.loc));
        let dsq = m.scaling * m.scaling * frobenius_sq_of_product(&a, &b, m.rank as usize);
        let bsq = sum_sq(&m.targets[0]);
        if m.magnitude.is_none() {
            delta_total += dsq;
            base_total += bsq;
        }
        rows.push((
            m.targets[0].clone(),
            m.rank,
            m.scaling,
            dsq.sqrt(),
            bsq.sqrt(),
            m.magnitude.is_some(),
        ));
    }
    base_maps.check_intact()?;
    amaps.check_intact()?;
    rows.sort_by(|x, y| (y.3 / y.4).total_cmp(&(x.3 / x.4)));
    let rc = (base_total > 0.0).then(|| delta_total.sqrt() / base_total.sqrt());
    let doubtful = rc.is_some_and(|r| {
        crate::stats::premise_doubtful(r, crate::stats::DEFAULT_RELATIVE_CHANGE_WARNING)
    });
    let text = if args.json {
        let doc: Value = json!({
            "sft": sft,
            "aligned": aligned,
            "kind": "lora_adapter",
            "summary": {
                "modules": plan.modules.len(),
                "delta_norm": delta_total.sqrt(),
                "base_norm": base_total.sqrt(),
                "relative_change": rc,
                "premise_doubtful": doubtful,
            },
            "modules": rows.iter().map(|(n, r, s, d, b, dora)| json!({
                "tensor": n, "r": r, "scaling": s, "delta_norm": d, "base_norm": b,
                "relative_change": if *b > 0.0 { Some(d / b) } else { None },
                "dora": dora,
            })).collect::<Vec<_>>(),
        });
        let mut s = serde_json::to_string_pretty(&doc)?;
        s.push('\n');
        s
    } else {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "ΔW = s·B·A of {} modules, from r×r Gram matrices (ΔW is not materialised)",
            plan.modules.len()
        );
        let _ = writeln!(
            s,
            "  ‖ΔW‖ = {:.4e}, ‖θ0‖ = {:.4e} over the adapted tensors, ‖ΔW‖/‖θ0‖ = {}",
            delta_total.sqrt(),
            base_total.sqrt(),
            rc.map_or("n/a".into(), |r| format!("{r:.3e}"))
        );
        let _ = writeln!(
            s,
            "  premise (a small step): {}",
            if doubtful {
                "doubtful: alignment moved the adapted tensors far from --sft"
            } else {
                "ok"
            }
        );
        let top = args.top.min(rows.len());
        let _ = writeln!(s, "top {top} modules by ‖ΔW‖/‖θ0‖:");
        for (n, r, sc, d, b, dora) in rows.iter().take(top) {
            let _ = writeln!(
                s,
                "  {:.3e}  ‖ΔW‖={:.3e}  r={r} s={sc}  {n}{}",
                if *b > 0.0 { d / b } else { f64::NAN },
                d,
                if *dora { " (DoRA: direction only)" } else { "" }
            );
        }
        s
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(Some(ExitCode::SUCCESS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gram_matrices_give_the_frobenius_norm_of_the_product() {
        // B [3, 2], A [2, 4].
        let b = [1.0, 2.0, -3.0, 4.0, 0.5, -1.0];
        let a = [1.0, 0.5, 0.25, 2.0, -1.0, 3.0, 0.0, 1.0];
        let mut direct = 0.0;
        for i in 0..3 {
            for j in 0..4 {
                let p: f64 = (0..2).map(|k| b[i * 2 + k] * a[k * 4 + j]).sum();
                direct += p * p;
            }
        }
        let got = frobenius_sq_of_product(&a, &b, 2);
        assert!((got - direct).abs() <= 1e-12 * direct, "{got} vs {direct}");
    }
}
