//! `expo inspect` and `expo diff` on a LoRA adapter.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

use crate::checkpoint::Checkpoint;
use crate::dtype::DtypeClass;
use crate::engine::MappedCheckpoint;
use crate::hub::{self, CacheEnv};

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

/// What `expo inspect` reports on an adapter directory.
pub struct AdapterInfo {
    pub adapter: Checkpoint,
    pub config: AdapterConfig,
    pub modules: Vec<ModuleInfo>,
    /// Tensors the adapter stores whole (`modules_to_save`, saved embeddings).
    pub full: Vec<String>,
    /// Why vLLM cannot serve the adapter as is (empty: it can).
    pub problems: Vec<String>,
    /// The smallest `--max-lora-rank` vLLM accepts for it.
    pub vllm_rank: Option<u64>,
}

/// The adapter at `path` described for `expo inspect`; `None` when `path` is no adapter
/// directory (it is then inspected as a checkpoint).
pub fn inspect(path: &Path) -> Result<Option<AdapterInfo>> {
    let env = CacheEnv::from_process();
    let Some(resolved) = hub::resolve_path(path, &env).ok() else {
        return Ok(None);
    };
    if !super::is_adapter_dir(&resolved.path) {
        return Ok(None);
    }
    let (adapter, _, config) = super::open_adapter("adapter", path, &env)?;
    let (modules, full) = describe(&adapter, &config)?;
    let problems = vllm_problems(&config, &modules, &full);
    let max_rank = modules
        .iter()
        .filter_map(|m| m.rank)
        .max()
        .unwrap_or(config.r);
    let vllm_rank = VLLM_RANKS.iter().copied().find(|&r| r >= max_rank);
    Ok(Some(AdapterInfo {
        adapter,
        config,
        modules,
        full,
        problems,
        vllm_rank,
    }))
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

/// One adapted module's change, for `expo diff`.
pub struct ModuleChange {
    /// The base tensor it changes.
    pub tensor: String,
    pub rank: u64,
    pub scaling: f64,
    /// ‖ΔW‖ and ‖θ0‖ of the tensor.
    pub delta_norm: f64,
    pub base_norm: f64,
    pub dora: bool,
}

/// What `expo diff` reports on an adapter over its base.
pub struct AdapterDiff {
    pub modules: usize,
    pub delta_norm: f64,
    pub base_norm: f64,
    /// ‖ΔW‖/‖θ0‖ over the adapted tensors (DoRA modules left out).
    pub relative_change: Option<f64>,
    pub doubtful: bool,
    /// Largest relative change first.
    pub rows: Vec<ModuleChange>,
}

/// `expo diff --sft BASE --aligned ADAPTER`: ΔW of each module from the factors, never
/// materialised; `None` when `aligned` is no adapter directory.
pub fn diff(sft: &Path, aligned: &Path) -> Result<Option<AdapterDiff>> {
    let env = CacheEnv::from_process();
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
        rows.push(ModuleChange {
            tensor: m.targets[0].clone(),
            rank: m.rank,
            scaling: m.scaling,
            delta_norm: dsq.sqrt(),
            base_norm: bsq.sqrt(),
            dora: m.magnitude.is_some(),
        });
    }
    base_maps.check_intact()?;
    amaps.check_intact()?;
    rows.sort_by(|x, y| (y.delta_norm / y.base_norm).total_cmp(&(x.delta_norm / x.base_norm)));
    let rc = (base_total > 0.0).then(|| delta_total.sqrt() / base_total.sqrt());
    let doubtful = rc.is_some_and(|r| {
        crate::stats::premise_doubtful(r, crate::stats::DEFAULT_RELATIVE_CHANGE_WARNING)
    });
    Ok(Some(AdapterDiff {
        modules: plan.modules.len(),
        delta_norm: delta_total.sqrt(),
        base_norm: base_total.sqrt(),
        relative_change: rc,
        doubtful,
        rows,
    }))
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
