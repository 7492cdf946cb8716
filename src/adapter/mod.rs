//! ExPO on PEFT LoRA adapters.
//!
//! When --aligned is a LoRA adapter trained on --sft, θ1 = θ0 + ΔW on every adapted module,
//! so θ2 = θ1 + α(θ1 − θ0) = θ0 + (1+α)·ΔW. `--as adapter` writes that as an adapter (the B
//! factors scaled by 1+α), `--as model` as a full checkpoint laid out like --sft.

pub mod config;
pub mod inspect;
pub mod lora;
pub mod names;
pub mod rows;
pub mod write;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;

use crate::alpha;
use crate::checkpoint::Checkpoint;
use crate::cli::{AsKind, DtypeArg, ExtrapolateArgs};
use crate::cmd::extrapolate::UsageError;
use crate::engine::MappedCheckpoint;
use crate::hub::{self, CacheEnv, ResolvedInput};
use crate::interrupt;
use crate::output::{self, OutputTarget, StagingDir};
use crate::plan::AlphaRule;
use crate::report::{self, Reporter};
use crate::sidefiles::{self, InputRecord, SideFiles};

use self::config::{AdapterConfig, CONFIG_NAME, WEIGHTS_NAME};
use self::lora::{AdapterPlan, BaseFacts};
use self::write::ModelLayout;

/// True when `dir` is a PEFT adapter directory (it holds `adapter_config.json`).
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.is_dir() && dir.join(CONFIG_NAME).is_file()
}

/// The early branch of `expo extrapolate`: runs the adapter path when --aligned is an
/// adapter (or `--as adapter` asks for one) and returns its exit code; `None` otherwise.
pub fn maybe_extrapolate(args: &ExtrapolateArgs) -> Result<Option<ExitCode>> {
    let env = CacheEnv::from_process();
    // Only a path that resolves is inspected; errors are left to the checkpoint path.
    let resolved = hub::resolve_path(&args.aligned, &env).ok();
    let is_adapter = resolved.as_ref().is_some_and(|r| is_adapter_dir(&r.path));
    if !is_adapter {
        if args.as_kind == Some(AsKind::Adapter) {
            return Err(UsageError(format!(
                "--as adapter needs a LoRA adapter as --aligned (a directory with {CONFIG_NAME} and {WEIGHTS_NAME}), but {} is not one",
                args.aligned.display()
            ))
            .into());
        }
        return Ok(None);
    }
    run(args, &env).map(Some)
}

/// For `expo search`: checks the adapter at `aligned` against `sft` as `extrapolate` does,
/// and returns the size of one adapter candidate.
pub fn check_for_search(sft: &Path, aligned: &Path, skip: &[AlphaRule]) -> Result<u64> {
    let env = CacheEnv::from_process();
    let (base, _) = hub::open_for("--sft checkpoint", sft, &env)?;
    let (adapter, _, config) = open_adapter("--aligned adapter", aligned, &env)?;
    let facts = BaseFacts::read(&base);
    let skipped = |name: &str| skip.iter().any(|r| r.pattern.is_match(name));
    let plan = lora::analyze(&adapter, &config, &base, &facts, &skipped).with_context(|| {
        format!(
            "applying adapter {} to --sft {}",
            aligned.display(),
            sft.display()
        )
    })?;
    if let Some(m) = plan.modules.iter().find(|m| m.magnitude.is_some()) {
        anyhow::bail!(
            "--aligned {} is a DoRA adapter (module `{}`), which cannot be written as an adapter candidate",
            aligned.display(),
            m.path
        );
    }
    Ok(adapter
        .shards
        .iter()
        .map(|s| s.header.data_start + s.header.data_len)
        .sum())
}

/// The α of a tensor named `name` under the rules (first match wins) in a run with `alpha`.
fn alpha_for(rules: &[AlphaRule], alpha: f64, name: &str) -> f64 {
    rules
        .iter()
        .find(|r| r.pattern.is_match(name))
        .map_or(alpha, |r| r.alpha(alpha))
}

/// Everything read before anything is written.
struct Inputs {
    base: Checkpoint,
    base_in: ResolvedInput,
    adapter: Checkpoint,
    adapter_in: ResolvedInput,
    config: AdapterConfig,
    plan: AdapterPlan,
}

/// Opens --sft and the adapter at --aligned and analyses the adapter against the base.
fn open_inputs(args: &ExtrapolateArgs, env: &CacheEnv) -> Result<Inputs> {
    let (base, base_in) = hub::open_for("--sft checkpoint", &args.sft, env)?;
    let (adapter, adapter_in, config) = open_adapter("--aligned adapter", &args.aligned, env)?;
    let facts = BaseFacts::read(&base);
    let skipped = |name: &str| args.skip.iter().any(|r| r.pattern.is_match(name));
    let plan = lora::analyze(&adapter, &config, &base, &facts, &skipped).with_context(|| {
        format!(
            "applying adapter {} to --sft {}",
            args.aligned.display(),
            args.sft.display()
        )
    })?;
    Ok(Inputs {
        base,
        base_in,
        adapter,
        adapter_in,
        config,
        plan,
    })
}

/// Opens an adapter directory: its weight file and its config.
pub fn open_adapter(
    what: &str,
    given: &Path,
    env: &CacheEnv,
) -> Result<(Checkpoint, ResolvedInput, AdapterConfig)> {
    let (adapter, adapter_in) = hub::open_for(what, given, env)?;
    if adapter.shards.len() != 1 || adapter.shards[0].name != WEIGHTS_NAME {
        anyhow::bail!(
            "{what} {}: expected the weights in {WEIGHTS_NAME}, found {}",
            given.display(),
            adapter.weight_file_names().join(", ")
        );
    }
    let config_path = adapter.root.join(CONFIG_NAME);
    let config = AdapterConfig::read(&config_path)
        .with_context(|| format!("reading {what} {}", given.display()))?;
    Ok((adapter, adapter_in, config))
}

/// One output of the run.
struct Output {
    alpha: f64,
    target: OutputTarget,
}

fn run(args: &ExtrapolateArgs, env: &CacheEnv) -> Result<ExitCode> {
    let started = Instant::now();
    let reporter = Reporter::new(args.quiet);
    let kind = args.as_kind.unwrap_or(AsKind::Adapter);
    let alphas = &args.alpha.0;
    if alphas.len() > 1 && !alpha::has_placeholder(&args.output) {
        return Err(UsageError(format!(
            "--alpha gives {} values, so --output must contain {} to name each output, e.g. --output '{}-{}'",
            alphas.len(),
            alpha::PLACEHOLDER,
            args.output.display(),
            alpha::PLACEHOLDER
        ))
        .into());
    }
    if args.dtype != DtypeArg::Auto {
        return Err(UsageError(format!(
            "--dtype {} is not supported when --aligned is an adapter: the output keeps each tensor's own dtype",
            args.dtype.name()
        ))
        .into());
    }
    if args.max_shard_size.is_some() {
        return Err(UsageError(
            "--max-shard-size is not supported when --aligned is an adapter: the output mirrors --sft's files (--as model) or is one adapter file".into(),
        )
        .into());
    }
    let rules: Vec<AlphaRule> = args.skip.iter().chain(&args.alpha_for).cloned().collect();
    let inputs = open_inputs(args, env)?;
    if kind == AsKind::Adapter {
        if let Some(m) = inputs.plan.modules.iter().find(|m| m.magnitude.is_some()) {
            let key = m.magnitude.as_ref().map_or("", |f| f.key.as_str());
            anyhow::bail!(
                "--aligned {} is a DoRA adapter (tensor `{key}`): DoRA's magnitude does not scale with the update, so θ2 cannot be written as an adapter; use --as model to write the merged checkpoint",
                args.aligned.display()
            );
        }
    }

    let mut outputs = Vec::with_capacity(alphas.len());
    for &a in alphas {
        let path = alpha::expand_output(&args.output, a);
        if outputs.iter().any(|o: &Output| o.target.path == path) {
            return Err(UsageError(format!(
                "--output {} names the same directory for two alpha values",
                args.output.display()
            ))
            .into());
        }
        let target = OutputTarget::locate(&path, args.force)?;
        check_paths(
            &target,
            &[
                ("--sft", &inputs.base, &inputs.base_in),
                ("--aligned", &inputs.adapter, &inputs.adapter_in),
            ],
        )?;
        target.check_replaceable()?;
        outputs.push(Output { alpha: a, target });
    }
    for r in &rules {
        let hits = inputs
            .plan
            .modules
            .iter()
            .flat_map(|m| m.targets.iter().chain(m.base_bias.iter()))
            .chain(
                inputs
                    .plan
                    .full
                    .iter()
                    .map(|f| f.base.as_ref().unwrap_or(&f.name)),
            )
            .filter(|n| r.pattern.is_match(n))
            .count();
        if hits == 0 {
            reporter.warn(format!(
                "{} matches no tensor the adapter changes",
                r.spelling
            ));
        }
    }
    for &a in alphas.iter().filter(|&&a| a <= -1.0) {
        reporter.warn(format!(
            "alpha = {a} moves past θ0, away from the aligned model; did you swap --sft and --aligned?"
        ));
    }
    let layout = (kind == AsKind::Model)
        .then(|| ModelLayout::new(&inputs.base, &inputs.adapter, &inputs.plan));
    let side = side_files(kind, &inputs)?;
    for warning in side.warnings() {
        reporter.warn(warning);
    }

    if args.dry_run {
        print_plan(
            args,
            kind,
            &inputs,
            &outputs,
            layout.as_ref(),
            &side,
            &reporter,
        )?;
        return Ok(ExitCode::SUCCESS);
    }

    interrupt::install();
    interrupt::install_sigbus_handler();
    let pool = crate::cmd::worker_pool(args.threads)?;
    let base_maps = MappedCheckpoint::map_guarded(&inputs.base).context("mapping --sft")?;
    let adapter_maps =
        MappedCheckpoint::map_guarded(&inputs.adapter).context("mapping --aligned")?;
    let base = (&inputs.base, &base_maps);
    let adapter = (&inputs.adapter, &adapter_maps);

    let mut summaries = Vec::new();
    for o in &outputs {
        let found = output::clean_stale_staging(&o.target.parent);
        for stale in found.removed {
            reporter.warn(format!(
                "removed {}, left behind by an expo run that was killed",
                stale.display()
            ));
        }
        let staging = StagingDir::create(&o.target)?;
        let rule_alpha = |name: &str| alpha_for(&rules, o.alpha, name);
        let written = match &layout {
            None => {
                let alphas = write::adapter_alphas(&inputs.adapter, &inputs.plan, &rule_alpha);
                write::write_adapter(
                    staging.path(),
                    &inputs.plan,
                    &alphas,
                    adapter,
                    base,
                    interrupt::flag(),
                )
            }
            Some(layout) => {
                let alphas = write::model_alphas(layout, &rule_alpha);
                let bar = reporter.progress(layout.data_bytes());
                let r = write::write_model(
                    staging.path(),
                    layout,
                    &inputs.plan,
                    &alphas,
                    adapter,
                    base,
                    &pool,
                    interrupt::flag(),
                    &|n| bar.inc(n),
                );
                bar.finish_and_clear();
                r
            }
        };
        if let Err(e) = written {
            if matches!(e, write::WriteError::Interrupted) || interrupt::check().is_err() {
                return Err(interrupt::Interrupted.into());
            }
            return Err(
                anyhow::Error::new(e).context(format!("writing {}", o.target.path.display()))
            );
        }
        interrupt::check()?;
        finish(
            args,
            kind,
            &inputs,
            o,
            &rules,
            &side,
            layout.as_ref(),
            &staging,
        )
        .with_context(|| format!("writing {}", o.target.path.display()))?;
        for w in staging.commit(&o.target)?.warnings() {
            reporter.warn(w);
        }
        reporter.info(format!(
            "expo: wrote {} ({}) with alpha = {}",
            o.target.path.display(),
            match kind {
                AsKind::Adapter => "an adapter",
                AsKind::Model => "a full checkpoint",
            },
            alpha::format_alpha(o.alpha)
        ));
        summaries.push(json!({
            "output": o.target.path,
            "alpha": o.alpha,
            "ok": true,
        }));
    }
    let seconds = started.elapsed().as_secs_f64();
    reporter.info(format!("expo: done in {seconds:.1}s"));
    if args.json {
        let mut doc = json!({
            "dry_run": false,
            "as": kind_name(kind),
            "alphas": alphas,
            "adapter": adapter_json(&inputs),
            "side_files": side.names(),
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
        report::print_json(&doc)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn kind_name(kind: AsKind) -> &'static str {
    match kind {
        AsKind::Adapter => "adapter",
        AsKind::Model => "model",
    }
}

/// The side files of an adapter run, opened and checked when the inputs are validated and
/// copied from what was opened (see [`sidefiles`]): the adapter directory's files for
/// `--as adapter`; for `--as model`, θ0's files, except that the adapter directory's
/// tokenizer and chat-template files win (they belong to the aligned model), and no
/// `adapter_config.json` is copied (transformers would load the output as an adapter).
struct AdapterSide {
    parts: Vec<SideFiles>,
}

impl AdapterSide {
    /// The relative paths copied, sorted.
    fn names(&self) -> Vec<&Path> {
        let mut names: Vec<&Path> = self
            .parts
            .iter()
            .flat_map(|p| p.copy.iter().map(PathBuf::as_path))
            .collect();
        names.sort();
        names
    }

    fn copy_into(&self, dest: &Path) -> Result<(), sidefiles::SideFileError> {
        self.parts.iter().try_for_each(|p| p.copy_into(dest))
    }

    fn warnings(&self) -> Vec<String> {
        self.parts.iter().flat_map(|p| p.warnings()).collect()
    }
}

fn side_files(kind: AsKind, inputs: &Inputs) -> Result<AdapterSide> {
    let mut adapter_side = sidefiles::list_side_files(&inputs.adapter)?;
    match kind {
        AsKind::Adapter => Ok(AdapterSide {
            parts: vec![adapter_side],
        }),
        AsKind::Model => {
            let mut base_side = sidefiles::list_side_files(&inputs.base)?;
            let wins = |p: &Path| {
                p.parent() == Some(Path::new("")) && write::is_tokenizer_file(&p.to_string_lossy())
            };
            adapter_side.retain(wins);
            base_side.retain(|p| !wins(p) || !adapter_side.copy.iter().any(|a| a == p));
            base_side.retain(|p| p.as_os_str() != CONFIG_NAME);
            Ok(AdapterSide {
                parts: vec![base_side, adapter_side],
            })
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn finish(
    args: &ExtrapolateArgs,
    kind: AsKind,
    inputs: &Inputs,
    o: &Output,
    rules: &[AlphaRule],
    side: &AdapterSide,
    layout: Option<&ModelLayout>,
    staging: &StagingDir,
) -> Result<()> {
    side.copy_into(staging.path())?;
    let base_rec = InputRecord::resolved(&inputs.base, &inputs.base_in);
    let adapter_rec = InputRecord::resolved(&inputs.adapter, &inputs.adapter_in);
    let rule_records: Vec<_> = rules
        .iter()
        .map(|r| json!({"rule": r.spelling, "alpha": r.alpha(o.alpha)}))
        .collect();
    let provenance = json!({
        "tool": "expo",
        "version": env!("CARGO_PKG_VERSION"),
        "method": "model extrapolation (ExPO) of a LoRA adapter",
        "formula": "theta2 = theta0 + (1 + alpha) * delta_W, delta_W = s * B @ A",
        "arithmetic": match kind {
            AsKind::Adapter => "float64: lora_B (and lora_embedding_B, lora_B.bias) times (1 + alpha), rounded once to the tensor's dtype; full tensors theta1 + alpha * (theta1 - theta0)",
            AsKind::Model => "float64: theta0 + (1 + alpha) * s * sum_k B[i,k] * A[k,j] (k in order, no FMA), rounded once to theta0's dtype; DoRA: (1 + alpha) * W1 - alpha * W0",
        },
        "paper": sidefiles::PAPER_URL,
        "as": kind_name(kind),
        "alpha": o.alpha,
        "rules": rule_records,
        "sft": base_rec,
        "aligned": adapter_rec,
        "adapter": adapter_json(inputs),
        "tensors": layout.map(|l| {
            let (changed, copied, added) = l.counts();
            json!({"total": l.tensors.len(), "changed": changed, "copied": copied, "added": added})
        }),
        "side_files": side.names(),
        "command": std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>(),
    });
    let mut bytes = serde_json::to_vec_pretty(&provenance)?;
    bytes.push(b'\n');
    sidefiles::write_file(staging.path(), sidefiles::PROVENANCE_NAME, &bytes)?;
    let card = model_card(args, kind, inputs, o.alpha, &base_rec, &adapter_rec);
    sidefiles::write_file(staging.path(), sidefiles::MODEL_CARD_NAME, card.as_bytes())?;
    Ok(())
}

fn model_card(
    args: &ExtrapolateArgs,
    kind: AsKind,
    inputs: &Inputs,
    alpha: f64,
    base: &InputRecord,
    adapter: &InputRecord,
) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut c = String::new();
    // `base_model` holds Hugging Face ids only: θ0's Hub id, or the one the adapter's config
    // names; a local path is not an id (it stays in the card body and expo.json).
    let base_id = base.hub_id.clone().or_else(|| {
        inputs
            .config
            .base_model_name_or_path
            .clone()
            .filter(|id| sidefiles::card::is_hub_id(id))
    });
    let _ = writeln!(c, "---");
    if let Some(id) = base_id {
        let _ = writeln!(c, "base_model:\n- {}", q(&id));
    }
    if kind == AsKind::Adapter {
        let _ = writeln!(c, "library_name: peft");
        let _ = writeln!(c, "base_model_relation: adapter");
    } else {
        let _ = writeln!(c, "base_model_relation: merge");
    }
    let _ = writeln!(c, "tags:\n- expo\n- model-extrapolation\n- lora\n---\n");
    let _ = writeln!(c, "# Model extrapolation (ExPO) of a LoRA adapter\n");
    let _ = writeln!(
        c,
        "Made without training from the LoRA adapter {} (θ1 = θ0 + ΔW), trained on the base model {} (θ0):\n",
        adapter.describe(),
        base.describe()
    );
    let _ = writeln!(
        c,
        "    θ2 = θ1 + α·(θ1 − θ0) = θ0 + (1+α)·ΔW,   α = {alpha}\n"
    );
    match kind {
        AsKind::Adapter => {
            let _ = writeln!(
                c,
                "This directory is a PEFT LoRA adapter for {}: load it on that base model. Its lora_B factors are the input's times (1+α), computed in float64 and rounded once; lora_A and adapter_config.json are unchanged.\n",
                base.describe()
            );
        }
        AsKind::Model => {
            let _ = writeln!(
                c,
                "This directory is a full checkpoint: every element of an adapted tensor is computed in float64 and rounded once to the base's dtype; the other tensors are the base's bytes.\n"
            );
        }
    }
    if let Some(b) = &inputs.config.base_model_name_or_path {
        let _ = writeln!(c, "The adapter's config names its base as `{b}`.\n");
    }
    let _ = writeln!(
        c,
        "Made with expo {}:\n\n```sh\n{}\n```\n",
        env!("CARGO_PKG_VERSION"),
        sidefiles::shell_join(
            &std::env::args_os()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        )
    );
    let _ = writeln!(
        c,
        "Method: Zheng et al., *Model Extrapolation Expedites Alignment* ({}). `expo.json` records the exact inputs and settings.",
        sidefiles::PAPER_URL
    );
    let _ = args;
    c
}

/// A summary of the adapter for JSON output.
fn adapter_json(inputs: &Inputs) -> serde_json::Value {
    let c = &inputs.config;
    json!({
        "r": c.r,
        "lora_alpha": c.lora_alpha,
        "use_rslora": c.use_rslora,
        "use_dora": c.use_dora,
        "lora_bias": c.lora_bias,
        "modules": inputs.plan.modules.len(),
        "full_tensors": inputs.plan.full.len(),
        "tie_word_embeddings": inputs.plan.tied,
    })
}

/// A checkpoint argument: the flag, the opened checkpoint and where it was resolved to.
type Input<'a> = (&'static str, &'a Checkpoint, &'a ResolvedInput);

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Refuses an output that is, contains, or lies inside an input.
fn check_paths(target: &OutputTarget, inputs: &[Input]) -> Result<()> {
    let parent = std::fs::canonicalize(&target.parent)
        .with_context(|| format!("resolving {}", target.parent.display()))?;
    let out = parent.join(&target.name);
    for &(flag, ck, resolved) in inputs {
        let input = canonical(&resolved.path);
        let root = canonical(&ck.root);
        let mut clash = out == input
            || out.starts_with(&root) && ck.is_dir
            || out.starts_with(&input)
            || input.starts_with(&out);
        clash |= ck
            .shards
            .iter()
            .any(|s| canonical(&s.path).starts_with(&out));
        if let Some(repo_dir) = &resolved.repo_dir {
            let repo_dir = canonical(repo_dir);
            clash |= out.starts_with(&repo_dir) || repo_dir.starts_with(&out);
        }
        if clash {
            return Err(UsageError(format!(
                "--output {} overlaps {flag} {}; write the result somewhere else",
                target.path.display(),
                ck.given.display()
            ))
            .into());
        }
    }
    Ok(())
}

fn print_plan(
    args: &ExtrapolateArgs,
    kind: AsKind,
    inputs: &Inputs,
    outputs: &[Output],
    layout: Option<&ModelLayout>,
    side: &AdapterSide,
    reporter: &Reporter,
) -> Result<()> {
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
                "alphas": outputs.iter().map(|o| alpha_for_rules(args, o.alpha, &m.targets[0])).collect::<Vec<_>>(),
            })
        })
        .collect();
    let full: Vec<_> = inputs
        .plan
        .full
        .iter()
        .map(|f| json!({"tensor": f.key, "base": f.base}))
        .collect();
    if args.json {
        let doc = json!({
            "dry_run": true,
            "as": kind_name(kind),
            "alphas": outputs.iter().map(|o| o.alpha).collect::<Vec<_>>(),
            "outputs": outputs.iter().map(|o| json!({"output": o.target.path, "alpha": o.alpha})).collect::<Vec<_>>(),
            "sft": InputRecord::resolved(&inputs.base, &inputs.base_in),
            "aligned": InputRecord::resolved(&inputs.adapter, &inputs.adapter_in),
            "adapter": adapter_json(inputs),
            "modules": modules,
            "full_tensors": full,
            "files": layout.map(|l| l.shards.iter().map(|s| &s.file_name).collect::<Vec<_>>()),
            "side_files": side.names(),
            "warnings": reporter.warnings(),
        });
        report::print_json(&doc)?;
        return Ok(());
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "plan: θ0 + (1+α)·ΔW from a LoRA adapter, written as {}",
        match kind {
            AsKind::Adapter => "an adapter",
            AsKind::Model => "a full checkpoint",
        }
    );
    let _ = writeln!(s, "  --sft      {}", inputs.base.given.display());
    let _ = writeln!(
        s,
        "  --aligned  {} (LoRA r = {}, lora_alpha = {}{}{})",
        inputs.adapter.given.display(),
        inputs.config.r,
        inputs.config.lora_alpha,
        if inputs.config.use_rslora {
            ", rsLoRA"
        } else {
            ""
        },
        if inputs.config.use_dora { ", DoRA" } else { "" }
    );
    for o in outputs {
        let _ = writeln!(
            s,
            "  α = {:<6} → {}",
            alpha::format_alpha(o.alpha),
            o.target.path.display()
        );
    }
    for m in &inputs.plan.modules {
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
    for f in &inputs.plan.full {
        let _ = writeln!(
            s,
            "    full      {}",
            match &f.base {
                Some(b) => format!("{} (θ0: {b})", f.key),
                None => format!("{} (no θ0: copied, --skip)", f.key),
            }
        );
    }
    if let Some(l) = layout {
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
    let _ = writeln!(
        s,
        "  side files: {}",
        if side.names().is_empty() {
            "none".to_string()
        } else {
            side.names()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let _ = writeln!(s, "nothing written (--dry-run)");
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn alpha_for_rules(args: &ExtrapolateArgs, alpha: f64, name: &str) -> f64 {
    let rules: Vec<AlphaRule> = args.skip.iter().chain(&args.alpha_for).cloned().collect();
    alpha_for(&rules, alpha, name)
}
