//! ExPO on PEFT LoRA adapters.
//!
//! When --aligned is a LoRA adapter trained on --sft, θ1 = θ0 + ΔW on every adapted module,
//! so θ2 = θ1 + α(θ1 − θ0) = θ0 + (1+α)·ΔW. `--as adapter` writes that as an adapter (the B
//! factors scaled by 1+α), `--as model` as a full checkpoint laid out like --sft.

pub mod config;
pub mod inspect;
pub mod layout;
pub mod lora;
pub mod names;
pub mod rows;
pub mod source;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::json;

use crate::alpha;
use crate::checkpoint::Checkpoint;
use crate::engine::{EngineError, MappedCheckpoint};
use crate::error::UsageError;
use crate::hub::{self, CacheEnv, ResolvedInput};
use crate::interrupt;
use crate::output::{OutputTarget, StagingDir};
use crate::pairing::DtypeChoice;
use crate::plan::AlphaRule;
use crate::reporter::{Progress, Reporter};
use crate::settings::{AsKind, Settings};
use crate::sidefiles::{self, provenance, InputRecord, SideFiles};
use crate::writer::{Run, Target};

use self::config::{AdapterConfig, CONFIG_NAME, WEIGHTS_NAME};
use self::lora::{AdapterPlan, BaseFacts};
use self::source::LoraSource;
use crate::plan::OutputPlan;

/// True when `dir` is a PEFT adapter directory (it holds `adapter_config.json`).
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.is_dir() && dir.join(CONFIG_NAME).is_file()
}

/// Whether `expo extrapolate` with these settings takes the adapter path: --aligned is an
/// adapter. Fails when `--as adapter` asks for one and --aligned is not.
pub fn is_adapter_run(settings: &Settings) -> Result<bool> {
    let env = CacheEnv::from_process();
    // Only a path that resolves is inspected; errors are left to the checkpoint path.
    let resolved = hub::resolve_path(&settings.aligned, &env).ok();
    let is_adapter = resolved.as_ref().is_some_and(|r| is_adapter_dir(&r.path));
    if !is_adapter && settings.as_kind == Some(AsKind::Adapter) {
        return Err(UsageError(format!(
            "--as adapter needs a LoRA adapter as --aligned (a directory with {CONFIG_NAME} and {WEIGHTS_NAME}), but {} is not one",
            settings.aligned.display()
        ))
        .into());
    }
    Ok(is_adapter)
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

/// Everything read before anything is written.
pub struct Inputs {
    pub base: Checkpoint,
    pub base_in: ResolvedInput,
    pub adapter: Checkpoint,
    pub adapter_in: ResolvedInput,
    pub config: AdapterConfig,
    pub plan: AdapterPlan,
}

/// Opens --sft and the adapter at --aligned and analyses the adapter against the base.
fn open_inputs(args: &Settings, env: &CacheEnv) -> Result<Inputs> {
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
pub struct Output {
    pub alpha: f64,
    pub target: OutputTarget,
}

/// What [`prepare`] resolved and checked, before anything is written.
pub struct Prepared {
    pub kind: AsKind,
    /// The --skip rules, then the --alpha-for rules (first match wins).
    pub rules: Vec<AlphaRule>,
    pub inputs: Inputs,
    pub outputs: Vec<Output>,
    /// The files and tensors of the full checkpoint (`--as model`); `None` for `--as adapter`.
    pub layout: Option<OutputPlan>,
    pub side: AdapterSide,
    /// `--threads`.
    pub threads: Option<u16>,
    /// The command line recorded in each output's provenance.
    pub command: Vec<String>,
}

impl Prepared {
    /// The α of tensor `name` in the output with `alpha`.
    pub fn alpha_for(&self, alpha: f64, name: &str) -> f64 {
        crate::plan::alpha_of(&self.rules, alpha, name).0
    }
}

/// Checks the flags, opens and analyses the inputs, locates the outputs and lists the side
/// files, warning about what looks wrong; nothing is written.
pub fn prepare(args: &Settings, reporter: &dyn Reporter) -> Result<Prepared> {
    let env = &CacheEnv::from_process();
    check_flags(args)?;
    let kind = args.as_kind.unwrap_or(AsKind::Adapter);
    let rules = args.rules();
    let inputs = open_inputs(args, env)?;
    if kind == AsKind::Adapter {
        refuse_dora(&args.aligned, &inputs.plan)?;
    }
    let outputs = locate_outputs(args, &inputs)?;
    for r in &rules {
        if !changed_tensors(&inputs.plan).any(|n| r.pattern.is_match(n)) {
            reporter.warn(format!(
                "{} matches no tensor the adapter changes",
                r.spelling
            ));
        }
    }
    for &a in args.alphas.iter().filter(|&&a| a <= -1.0) {
        reporter.warn(format!(
            "alpha = {a} moves past θ0, away from the aligned model; did you swap --sft and --aligned?"
        ));
    }
    let layout = (kind == AsKind::Model)
        .then(|| OutputPlan::model(&inputs.base, &inputs.adapter, &inputs.plan));
    let side = side_files(kind, &inputs)?;
    for warning in side.warnings() {
        reporter.warn(warning);
    }
    // As for checkpoints: a sweep that cannot fit under the open-files limit is refused
    // now (also in --dry-run), not after the work.
    crate::writer::check_open_files(outputs.len())?;
    Ok(Prepared {
        kind,
        rules,
        inputs,
        outputs,
        layout,
        side,
        threads: args.threads,
        command: args.command.clone(),
    })
}

/// Refuses the flags that the adapter path does not support.
fn check_flags(args: &Settings) -> Result<()> {
    crate::finish::check_output_template(args)?;
    if args.dtype != DtypeChoice::Auto {
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
    Ok(())
}

/// Refuses a DoRA adapter for `--as adapter`.
fn refuse_dora(aligned: &Path, plan: &AdapterPlan) -> Result<()> {
    if let Some(m) = plan.modules.iter().find(|m| m.magnitude.is_some()) {
        let key = m.magnitude.as_ref().map_or("", |f| f.key.as_str());
        anyhow::bail!(
            "--aligned {} is a DoRA adapter (tensor `{key}`): DoRA's magnitude does not scale with the update, so θ2 cannot be written as an adapter; use --as model to write the merged checkpoint",
            aligned.display()
        );
    }
    Ok(())
}

/// One output per α, each checked against the inputs and replaceable.
fn locate_outputs(args: &Settings, inputs: &Inputs) -> Result<Vec<Output>> {
    let mut outputs = Vec::with_capacity(args.alphas.len());
    for &a in &args.alphas {
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
    Ok(outputs)
}

/// The θ0 names of the tensors the adapter changes (the names --skip and --alpha-for match).
fn changed_tensors(plan: &AdapterPlan) -> impl Iterator<Item = &String> + '_ {
    plan.modules
        .iter()
        .flat_map(|m| m.targets.iter().chain(m.base_bias.iter()))
        .chain(plan.full.iter().map(|f| f.base.as_ref().unwrap_or(&f.name)))
}

/// Maps the inputs, writes every output in one pass over them (see [`crate::writer`]),
/// then finishes and commits each output in order; the first that failed stops the run.
/// Writes every output in one pass and finishes and commits each one; an output that
/// fails does not stop the others (one result per output), an interrupt stops everything.
pub fn produce(p: &Prepared, reporter: &dyn Reporter) -> Result<Vec<Result<()>>> {
    interrupt::install();
    interrupt::install_sigbus_handler();
    let pool = crate::pool::worker_pool(p.threads, reporter)?;
    let base_maps = MappedCheckpoint::map_guarded(&p.inputs.base).context("mapping --sft")?;
    let adapter_maps =
        MappedCheckpoint::map_guarded(&p.inputs.adapter).context("mapping --aligned")?;
    let owned;
    let layout = match &p.layout {
        Some(l) => l,
        None => {
            owned = OutputPlan::adapter(&p.inputs.adapter, &p.inputs.plan, &p.inputs.base);
            &owned
        }
    };
    let targets: Vec<&OutputTarget> = p.outputs.iter().map(|o| &o.target).collect();
    crate::finish::clean_stale_staging(&targets, reporter);
    let stagings = crate::finish::create_stagings(&targets, &layout.shards)?;
    let inputs = (
        (&p.inputs.base, &base_maps),
        (&p.inputs.adapter, &adapter_maps),
    );
    let results = write_data(p, layout, inputs, &stagings, &pool, reporter);
    drop((base_maps, adapter_maps));
    if results
        .iter()
        .any(|r| matches!(r, Err(EngineError::Interrupted)))
        || interrupt::check().is_err()
    {
        return Err(interrupt::Interrupted.into());
    }
    let mut done = Vec::with_capacity(p.outputs.len());
    for ((o, staging), written) in p.outputs.iter().zip(stagings).zip(results) {
        let path = o.target.path.display();
        let result = written
            .map_err(|e| anyhow::Error::new(e).context(format!("writing {path}")))
            .and_then(|()| {
                interrupt::check()?;
                finish(p, o, layout, &staging).with_context(|| format!("writing {path}"))?;
                commit(p, o, staging, reporter)
            });
        if result.is_err() && interrupt::check().is_err() {
            return Err(interrupt::Interrupted.into());
        }
        done.push(result);
    }
    Ok(done)
}

/// Writes the tensor data of every output in one pass.
fn write_data(
    p: &Prepared,
    layout: &OutputPlan,
    inputs: (source::Mapped, source::Mapped),
    stagings: &[StagingDir],
    pool: &rayon::ThreadPool,
    reporter: &dyn Reporter,
) -> Vec<Result<(), EngineError>> {
    let alphas = p
        .outputs
        .iter()
        .map(|o| layout.alphas(&|name| p.alpha_for(o.alpha, name)))
        .collect();
    let tasks = layout.tasks(p.outputs.len());
    let source = LoraSource::new(layout, &p.inputs.plan, alphas, inputs, &tasks, pool);
    let targets: Vec<Target> = stagings
        .iter()
        .map(|s| Target {
            shards: &layout.shards,
            dir: s.path(),
        })
        .collect();
    let progress = Progress::start(reporter, layout.data_bytes() * p.outputs.len() as u64);
    let run = Run {
        pool,
        cancel: interrupt::flag(),
        on_progress: &|n| progress.advance(n),
    };
    let results = crate::writer::write_all(&targets, &tasks, &source, &run);
    drop(progress);
    results
}

/// Puts one finished output in place and says so.
fn commit(p: &Prepared, o: &Output, staging: StagingDir, reporter: &dyn Reporter) -> Result<()> {
    crate::finish::commit(staging, &o.target, reporter)?;
    reporter.note(&format!(
        "expo: wrote {} ({}) with alpha = {}",
        o.target.path.display(),
        match p.kind {
            AsKind::Adapter => "an adapter",
            AsKind::Model => "a full checkpoint",
        },
        alpha::format_alpha(o.alpha)
    ));
    Ok(())
}

/// What `--as` wrote, as recorded in `expo.json` and `--json` (`adapter` or `model`).
pub fn kind_name(kind: AsKind) -> &'static str {
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
pub struct AdapterSide {
    parts: Vec<SideFiles>,
}

impl AdapterSide {
    /// The relative paths copied, sorted.
    pub fn names(&self) -> Vec<&Path> {
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
                p.parent() == Some(Path::new("")) && is_tokenizer_file(&p.to_string_lossy())
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

/// The adapter files whose names mark them as tokenizer or chat-template files.
pub fn is_tokenizer_file(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("tokenizer")
        || lower.starts_with("chat_template")
        || lower.ends_with(".jinja")
        || matches!(
            lower.as_str(),
            "special_tokens_map.json"
                | "added_tokens.json"
                | "vocab.json"
                | "vocab.txt"
                | "merges.txt"
                | "spiece.model"
                | "sentencepiece.bpe.model"
        )
}

/// Writes the side files, the index, the model card and `expo.json` of one output into
/// `staging`.
fn finish(p: &Prepared, o: &Output, layout: &OutputPlan, staging: &StagingDir) -> Result<()> {
    let base_rec = InputRecord::resolved(&p.inputs.base, &p.inputs.base_in);
    let adapter_rec = InputRecord::resolved(&p.inputs.adapter, &p.inputs.adapter_in);
    let mut provenance = serde_json::to_vec_pretty(&provenance(p, o, &base_rec, &adapter_rec))?;
    provenance.push(b'\n');
    let card = model_card(
        p.kind,
        &p.inputs,
        o.alpha,
        (&base_rec, &adapter_rec),
        &p.command,
    );
    let files = crate::finish::Finish {
        index: layout.index.as_ref(),
        card,
        provenance,
    };
    crate::finish::write_finish(staging, |dest| p.side.copy_into(dest), &files)
}

/// The `expo.json` of one output.
fn provenance(
    p: &Prepared,
    o: &Output,
    base_rec: &InputRecord,
    adapter_rec: &InputRecord,
) -> serde_json::Value {
    let rule_records: Vec<_> = p
        .rules
        .iter()
        .map(|r| json!({"rule": r.spelling, "alpha": r.alpha(o.alpha)}))
        .collect();
    json!({
        "tool": provenance::TOOL,
        "version": provenance::VERSION,
        "method": "model extrapolation (ExPO) of a LoRA adapter",
        "formula": "theta2 = theta0 + (1 + alpha) * delta_W, delta_W = s * B @ A",
        "arithmetic": match p.kind {
            AsKind::Adapter => "float64: lora_B (and lora_embedding_B, lora_B.bias) times (1 + alpha), rounded once to the tensor's dtype; full tensors theta1 + alpha * (theta1 - theta0)",
            AsKind::Model => "float64: theta0 + (1 + alpha) * s * sum_k B[i,k] * A[k,j] (k in order, no FMA), rounded once to theta0's dtype; DoRA: (1 + alpha) * W1 - alpha * W0",
        },
        "paper": sidefiles::PAPER_URL,
        "as": kind_name(p.kind),
        "alpha": o.alpha,
        "rules": rule_records,
        "sft": base_rec,
        "aligned": adapter_rec,
        "adapter": adapter_json(&p.inputs),
        "tensors": p.layout.as_ref().map(|l| {
            let (changed, copied, added) = l.adapter_counts();
            json!({"total": l.tensors.len(), "changed": changed, "copied": copied, "added": added})
        }),
        "side_files": p.side.names(),
        "command": p.command,
    })
}

/// The README.md of one output: front matter for the Hub, then what it is and how it was made.
fn model_card(
    kind: AsKind,
    inputs: &Inputs,
    alpha: f64,
    (base, adapter): (&InputRecord, &InputRecord),
    command: &[String],
) -> String {
    let mut c = card_front_matter(kind, inputs, base);
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
    c.push_str(&provenance::card_footer(
        provenance::VERSION,
        command,
        sidefiles::PAPER_URL,
    ));
    c
}

/// The model card's YAML front matter (with the blank line after it).
fn card_front_matter(kind: AsKind, inputs: &Inputs, base: &InputRecord) -> String {
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
    c.push_str(&provenance::card_base_models(&Vec::from_iter(base_id)));
    if kind == AsKind::Adapter {
        let _ = writeln!(c, "library_name: peft");
        let _ = writeln!(c, "base_model_relation: adapter");
    } else {
        let _ = writeln!(c, "base_model_relation: merge");
    }
    c.push_str(&provenance::card_tags(&["lora"]));
    c
}

/// A summary of the adapter for JSON output.
pub fn adapter_json(inputs: &Inputs) -> serde_json::Value {
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

/// Refuses an output that is, contains, or lies inside an input.
fn check_paths(target: &OutputTarget, inputs: &[Input]) -> Result<()> {
    inputs.iter().try_for_each(|&(flag, ck, resolved)| {
        crate::output::check_overlap(target, flag, ck, resolved)
    })
}
