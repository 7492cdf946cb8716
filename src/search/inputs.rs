//! The checkpoints a search starts from, and the ledger header they make.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::ledger;
use super::rule::Lat;
use super::Config;
use crate::checkpoint::Checkpoint;
use crate::error::UsageError;
use crate::plan::AlphaRule;
use crate::text::path_json;

/// The checkpoints a search starts from, opened and paired.
pub(super) struct Inputs {
    pub(super) sft: Checkpoint,
    pub(super) aligned: Checkpoint,
    /// Where `--aligned` resolved to (the candidate of α = 0).
    pub(super) aligned_path: PathBuf,
    /// Where `--sft` resolved to.
    pub(super) sft_path: PathBuf,
    /// The `--skip` and `--alpha-for` rules, in that order.
    pub(super) rules: Vec<AlphaRule>,
    /// The size of one candidate.
    pub(super) candidate_bytes: u64,
}

/// Opens `--sft` and `--aligned` and checks that they pair (as extrapolate checks them).
pub(super) fn open_inputs(cfg: &Config) -> Result<Inputs> {
    let cache_env = crate::hub::CacheEnv::from_process();
    let (sft, sft_in) = crate::hub::open_for("--sft checkpoint", &cfg.sft, &cache_env)?;
    let (aligned, aligned_in) =
        crate::hub::open_for("--aligned checkpoint", &cfg.aligned, &cache_env)?;
    let rules = crate::plan::rule_chain(&cfg.skip, &cfg.alpha_for);
    // An adapter as --aligned makes adapter candidates (checked as extrapolate checks them).
    refuse_run_inside(
        cfg,
        &[("--sft", &sft_in.path), ("--aligned", &aligned_in.path)],
    )?;
    let candidate_bytes = if crate::adapter::is_adapter_dir(&aligned_in.path) {
        refuse_adapter_flags(cfg)?;
        crate::adapter::check_for_search(&cfg.sft, &cfg.aligned, &cfg.skip)?
    } else {
        let options = crate::plan::PlanOptions {
            alpha: cfg
                .settings
                .first
                .iter()
                .copied()
                .max()
                .unwrap_or(Lat(0))
                .to_f64(),
            dtype: cfg.dtype,
            max_shard_size: cfg.max_shard_size,
            rules: rules.clone(),
        };
        crate::plan::build_plan(&sft, &aligned, &options)
            .with_context(|| {
                format!(
                    "pairing --sft {} with --aligned {}",
                    cfg.sft.display(),
                    cfg.aligned.display()
                )
            })?
            .output_bytes()
    };
    Ok(Inputs {
        sft,
        aligned,
        aligned_path: aligned_in.path,
        sft_path: sft_in.path,
        rules,
        candidate_bytes,
    })
}

/// Refuses `--run` inside a model directory: a run directory inside `--aligned` would be
/// copied into every candidate as a side directory, and the search fail after the
/// baseline was evaluated.
fn refuse_run_inside(cfg: &Config, models: &[(&str, &std::path::Path)]) -> Result<()> {
    for (flag, dir) in models {
        let Ok(dir) = super::resolve_path(dir) else {
            continue;
        };
        if cfg.run.starts_with(&dir) {
            return Err(UsageError(format!(
                "--run {} is inside {flag} {}; put the run directory outside the models",
                cfg.run.display(),
                dir.display()
            ))
            .into());
        }
    }
    Ok(())
}

/// Refuses, before anything is evaluated, the flags that adapter candidates do not support
/// (as `expo extrapolate` refuses them for an adapter).
fn refuse_adapter_flags(cfg: &Config) -> Result<()> {
    if cfg.dtype != crate::pairing::DtypeChoice::Auto {
        return Err(UsageError(format!(
            "--dtype {} is not supported when --aligned is an adapter: the candidates keep each tensor's own dtype",
            cfg.dtype.name()
        ))
        .into());
    }
    if cfg.max_shard_size.is_some() {
        return Err(UsageError(
            "--max-shard-size is not supported when --aligned is an adapter: each candidate is one adapter file".into(),
        )
        .into());
    }
    Ok(())
}

/// The ledger's header event: what a resumed search must not change.
pub(super) fn header_event(cfg: &Config, inputs: &Inputs) -> Value {
    json!({
        "event": "header",
        "version": 1,
        "expo": env!("CARGO_PKG_VERSION"),
        "sft": {
            "path": path_json(&cfg.sft),
            "fingerprint": ledger::fingerprint(&inputs.sft),
            "files": ledger::defining_files(&inputs.sft_path),
        },
        "aligned": {
            "path": path_json(&cfg.aligned),
            "fingerprint": ledger::fingerprint(&inputs.aligned),
            "files": ledger::defining_files(&inputs.aligned_path),
        },
        "rules": inputs.rules.iter().map(|r| r.spelling.clone()).collect::<Vec<_>>(),
        "dtype": cfg.dtype.name(),
        "max_shard_size": cfg.max_shard_size,
        "eval": cfg.eval.spelling,
        "score_json": cfg.score.pointer,
        "score_file": cfg.score.file.as_ref().map(|t| t.spelling.clone()),
        "minimize": cfg.minimize,
        "tie": cfg.settings.tie,
        "alpha": cfg.settings.first.iter().map(|a| a.to_f64()).collect::<Vec<_>>(),
        "resolution": cfg.settings.resolution.map(|r| Lat(r).to_f64()),
        "output": path_json(&cfg.output),
        "jobs": cfg.jobs,
        "timeout": cfg.timeout.map(|t| t.as_secs_f64()),
        "max_evals": cfg.settings.max_evals,
        "bounds": [cfg.settings.lower.to_f64(), cfg.settings.upper.to_f64()],
    })
}
