//! The build step: one `expo extrapolate` run as a library call. [`prepare`] resolves and
//! validates everything and plans every output (nothing is written); [`produce`] writes every
//! output in one pass over the inputs, then finishes and commits each one atomically.
//!
//! A caller that wants a batch of candidates for several α (a search) builds one
//! [`Settings`] with every α and gets one result per output back.

use std::path::Path;

use anyhow::{Context, Result};

use crate::alpha;
use crate::checkpoint::Checkpoint;
use crate::engine::{self, EngineError, MappedCheckpoint, OutputJob, RunReport, WriteStats};
use crate::error::UsageError;
use crate::hub::{self, CacheEnv, ResolvedInput};
use crate::interrupt;
use crate::output::{self, OutputTarget, StagingDir};
use crate::plan::{self, AlphaRule, OutTensor, OutputPlan, PlanError, PlanOptions};
use crate::reporter::{Progress, Reporter};
pub use crate::settings::{AsKind, Settings};
use crate::sidefiles::{self, InputRecord, Provenance, RuleRecord, SideFiles, TensorCounts};
use crate::stats;

/// One input checkpoint: its flag, the opened checkpoint and where it was resolved to.
#[derive(Debug)]
pub struct Input {
    pub flag: &'static str,
    pub checkpoint: Checkpoint,
    pub resolved: ResolvedInput,
}

/// One output of the run: its α, its validated location and its plan.
#[derive(Debug)]
pub struct Output {
    pub alpha: f64,
    pub target: OutputTarget,
    /// Each tensor of the run's plan's α in this output.
    pub alphas: Vec<f64>,
}

/// Everything validated before any work ([`prepare`]'s result).
pub struct Prepared<'a> {
    pub settings: &'a Settings,
    /// `--sft` and `--aligned`.
    pub inputs: [Input; 2],
    /// `--skip` rules, then `--alpha-for` rules: the first that matches sets a tensor's α.
    pub rules: Vec<AlphaRule>,
    /// How many tensors each rule set the α of.
    pub matches: Vec<usize>,
    /// One per α, in the order given. All share one layout; only α differs.
    /// The output plan, the same for every output.
    pub plan: OutputPlan,
    pub outputs: Vec<Output>,
    pub side: SideFiles,
    /// The inputs' data, mapped; released once the outputs are written.
    pub(crate) maps: Option<[MappedCheckpoint; 2]>,
}

impl Prepared<'_> {
    /// `--aligned`: θ1.
    pub fn aligned(&self) -> &Checkpoint {
        &self.inputs[1].checkpoint
    }

    /// The rules with the α each gives in an output with `alpha`, and how many tensors
    /// each matched.
    pub fn rule_records(&self, alpha: f64) -> Vec<RuleRecord> {
        self.rules
            .iter()
            .zip(&self.matches)
            .map(|(r, &tensors)| RuleRecord {
                rule: r.spelling.clone(),
                alpha: r.alpha(alpha),
                tensors,
            })
            .collect()
    }
}

/// What [`produce`] did.
#[derive(Debug)]
pub struct Produced {
    /// One result per output, in order: `Ok` once the output is committed in place.
    pub results: Vec<Result<()>>,
    /// ‖θ1 − θ0‖/‖θ0‖ over the extrapolated tensors; `None` when not finite (an input holds
    /// inf or NaN) or when the read failed.
    pub relative_change: Option<f64>,
    /// The relative change is above `--warn-relative-change`.
    pub doubtful: bool,
}

impl Produced {
    /// The run as one result: `Ok` when every output was written; the one error of a
    /// single output; or one error listing every failed output of several.
    pub fn into_result(self, outputs: &[Output]) -> Result<()> {
        crate::finish::outcome(self.results, outputs.len())
    }
}

use crate::finish::{check_output_template, clean_stale_staging, commit, create_stagings};
use crate::finish::{write_finish, Finish};

/// The whole build step for a caller that prints nothing of its own (a search): every
/// output of `settings` written and committed, from a checkpoint or an adapter as
/// --aligned. Fails when any output failed.
pub fn build(settings: &Settings, reporter: &dyn Reporter) -> Result<()> {
    if crate::adapter::is_adapter_run(settings)? {
        let prepared = crate::adapter::prepare(settings, reporter)?;
        let results = crate::adapter::produce(&prepared, reporter)?;
        interrupt::check()?;
        return crate::finish::outcome(results, prepared.outputs.len());
    }
    let mut prepared = prepare(settings, reporter)?;
    let produced = produce(&mut prepared, reporter)?;
    interrupt::check()?;
    produced.into_result(&prepared.outputs)
}

/// Step 1: resolves and validates everything, and plans every output. Writes nothing.
pub fn prepare<'a>(settings: &'a Settings, reporter: &dyn Reporter) -> Result<Prepared<'a>> {
    check_output_template(settings)?;
    let rules = settings.rules();
    let inputs = open_inputs(settings)?;
    for w in inputs.iter().flat_map(|i| &i.checkpoint.warnings) {
        reporter.warn(w.clone());
    }
    let (plan, outputs) = plan_outputs(settings, &rules, &inputs)?;
    warn_about_inputs(reporter, &settings.alphas, &inputs);
    let matches = rule_matches(&plan, &rules);
    for (rule, n) in rules.iter().zip(&matches) {
        if *n == 0 {
            reporter.warn(format!("{} matches no tensor", rule.spelling));
        }
    }
    let side = list_side_files(settings, &inputs[1].checkpoint, &plan, reporter)?;
    let maps = map_and_verify(&inputs, &plan, &outputs)?;
    // Every output's files of one shard are open at once: refuse a sweep that cannot fit
    // under the open-files limit now, not after hours of work (also in --dry-run).
    engine::check_open_files(outputs.len())?;
    Ok(Prepared {
        settings,
        inputs,
        rules,
        matches,
        plan,
        outputs,
        side,
        maps: Some(maps),
    })
}

/// Step 2: writes every output in one pass over the inputs and commits each one. An
/// output that fails does not stop the others; an interrupt stops everything.
///
/// # Errors
/// Besides interrupts and failures to start: when called twice for one preparation.
pub fn produce(p: &mut Prepared, reporter: &dyn Reporter) -> Result<Produced> {
    interrupt::install();
    interrupt::install_sigbus_handler();
    let pool = crate::pool::worker_pool(p.settings.threads, reporter)?;
    let maps = p
        .maps
        .take()
        .context("the outputs of one preparation can be produced only once")?;
    let targets: Vec<&OutputTarget> = p.outputs.iter().map(|o| &o.target).collect();
    clean_stale_staging(&targets, reporter);
    let stagings = create_stagings(&targets, &p.plan.shards)?;
    let report = write_data(p, maps, &stagings, &pool, reporter);
    if report
        .outputs
        .iter()
        .any(|r| matches!(r, Err(EngineError::Interrupted)))
    {
        return Err(interrupt::Interrupted.into());
    }
    let relative_change = relative_change(&report);
    let doubtful = relative_change
        .is_some_and(|rc| stats::premise_doubtful(rc, p.settings.warn_relative_change));
    if let (true, Some(rc)) = (doubtful, relative_change) {
        reporter.warn(stats::premise_warning(rc, p.settings.warn_relative_change));
    }
    let results = p
        .outputs
        .iter()
        .zip(stagings)
        .zip(report.outputs)
        .map(|((o, staging), written)| {
            written
                .map_err(anyhow::Error::new)
                .and_then(|stats| {
                    warn_inherited_nonfinite(reporter, o, &stats);
                    finish_output(p, o, relative_change, staging, reporter)
                })
                .with_context(|| format!("writing {}", o.target.path.display()))
        })
        .collect();
    Ok(Produced {
        results,
        relative_change,
        doubtful,
    })
}

// ---------------------------------------------------------------------------------------
// Preparing
// ---------------------------------------------------------------------------------------

fn open_inputs(settings: &Settings) -> Result<[Input; 2]> {
    let env = CacheEnv::from_process();
    let open = |flag: &'static str, what: &str, path: &Path| -> Result<Input> {
        let (checkpoint, resolved) = hub::open_for(what, path, &env)?;
        Ok(Input {
            flag,
            checkpoint,
            resolved,
        })
    };
    Ok([
        open("--sft", "--sft checkpoint", &settings.sft)?,
        open("--aligned", "--aligned checkpoint", &settings.aligned)?,
    ])
}

/// The run's plan and its outputs, one per α (each checked in turn: its target, then the
/// α rules and the pairing at that α).
fn plan_outputs(
    settings: &Settings,
    rules: &[AlphaRule],
    inputs: &[Input; 2],
) -> Result<(OutputPlan, Vec<Output>)> {
    let mut targets: Vec<(f64, OutputTarget)> = Vec::with_capacity(settings.alphas.len());
    let mut tensors = None;
    for &a in &settings.alphas {
        let path = alpha::expand_output(&settings.output, a);
        if targets.iter().any(|(_, t)| t.path == path) {
            return Err(UsageError(format!(
                "--output {} names the same directory for two alpha values",
                settings.output.display()
            ))
            .into());
        }
        let target = OutputTarget::locate(&path, settings.force)?;
        if let Some(clash) = output::location_clash(targets.iter().map(|(_, t)| t), &target) {
            return Err(UsageError(clash).into());
        }
        check_paths(&target, inputs)?;
        target.check_replaceable()?;
        let paired = pair_at(settings, rules, inputs, a)?;
        tensors.get_or_insert(paired);
        targets.push((a, target));
    }
    let aligned = &inputs[1].checkpoint;
    let plan = plan::lay_out_pairs(
        aligned,
        settings.max_shard_size,
        tensors.unwrap_or_default(),
    );
    let outputs = targets
        .into_iter()
        .map(|(alpha, target)| Output {
            alpha,
            target,
            alphas: plan.alphas(&|name| plan::alpha_of(rules, alpha, name).0),
        })
        .collect();
    Ok((plan, outputs))
}

/// The tensors of the plan, paired at `alpha` (the same at every α that pairs).
fn pair_at(
    settings: &Settings,
    rules: &[AlphaRule],
    inputs: &[Input; 2],
    alpha: f64,
) -> Result<Vec<OutTensor>> {
    let opts = PlanOptions {
        alpha,
        dtype: settings.dtype,
        max_shard_size: settings.max_shard_size,
        rules: rules.to_vec(),
    };
    match plan::pair_for_output(&inputs[0].checkpoint, &inputs[1].checkpoint, &opts) {
        Ok(tensors) => Ok(tensors),
        Err(PlanError::Alpha(e)) => Err(UsageError(e.to_string()).into()),
        Err(e) => Err(e).with_context(|| {
            format!(
                "pairing --sft {} with --aligned {}",
                settings.sft.display(),
                settings.aligned.display()
            )
        }),
    }
}

/// The side files of θ1 to copy, opened and checked, with a warning for what is not copied;
/// fails if two output files would share a name.
fn list_side_files(
    settings: &Settings,
    aligned: &Checkpoint,
    plan: &OutputPlan,
    reporter: &dyn Reporter,
) -> Result<SideFiles> {
    let side = sidefiles::open_side_files(aligned, settings.dtype)?;
    side.check_plan(plan)?;
    side.warnings().into_iter().for_each(|w| reporter.warn(w));
    if !aligned.is_dir {
        reporter.warn(
            "--aligned is a single file, so no config.json or tokenizer files are copied".into(),
        );
    }
    Ok(side)
}

/// Maps both inputs and checks the tensors that must be identical on both sides.
fn map_and_verify(
    inputs: &[Input; 2],
    plan: &OutputPlan,
    outputs: &[Output],
) -> Result<[MappedCheckpoint; 2]> {
    let [sft, aligned] = inputs.each_ref().map(|i| &i.checkpoint);
    // Guarded: an input truncated during the run is an error (the temporary directory is
    // removed as after any other), not a SIGBUS.
    let sft_maps = MappedCheckpoint::map_guarded(sft).context("mapping --sft")?;
    let aligned_maps = MappedCheckpoint::map_guarded(aligned).context("mapping --aligned")?;
    for j in plan::outputs_to_verify(plan, outputs.iter().map(|o| &o.alphas[..])) {
        let alphas = &outputs[j].alphas;
        engine::verify_exact_tensors(plan, alphas, (sft, &sft_maps), (aligned, &aligned_maps))
            .context("comparing the non-float tensors")?;
    }
    Ok([sft_maps, aligned_maps])
}

/// How many tensors each rule set the α of.
fn rule_matches(plan: &OutputPlan, rules: &[AlphaRule]) -> Vec<usize> {
    let mut n = vec![0; rules.len()];
    for t in &plan.tensors {
        if let Some(r) = plan::alpha_of(rules, 0.0, &t.name).1 {
            n[r] += 1;
        }
    }
    n
}

/// Refuses an output that is, contains, or lies inside either input, that contains the
/// data behind a symlinked weight file, or that lies in a Hub input's cache entry.
fn check_paths(target: &OutputTarget, inputs: &[Input]) -> Result<()> {
    inputs
        .iter()
        .try_for_each(|i| output::check_overlap(target, i.flag, &i.checkpoint, &i.resolved))
}

fn warn_about_inputs(reporter: &dyn Reporter, alphas: &[f64], inputs: &[Input; 2]) {
    let same = match (
        std::fs::canonicalize(&inputs[0].resolved.path),
        std::fs::canonicalize(&inputs[1].resolved.path),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        reporter.warn("--sft and --aligned are the same checkpoint: θ1 − θ0 is zero, so the output equals the input".into());
    }
    for &a in alphas.iter().filter(|&&a| a <= -1.0) {
        reporter.warn(format!(
            "alpha = {a} moves past θ0, away from the aligned model; did you swap --sft and --aligned?"
        ));
    }
}

// ---------------------------------------------------------------------------------------
// Producing
// ---------------------------------------------------------------------------------------

/// Warns about the tensors of an output that are non-finite because the inputs were.
fn warn_inherited_nonfinite(reporter: &dyn Reporter, o: &Output, stats: &WriteStats) {
    for (tensor, count) in &stats.inherited_nonfinite {
        reporter.warn(format!(
            "{}: tensor `{tensor}`: {count} values are infinite or NaN in --sft or --aligned; --aligned's values were kept there",
            o.target.path.display()
        ));
    }
}

/// Writes the tensor data of every output in one pass, then releases the input maps.
fn write_data(
    p: &Prepared,
    maps: [MappedCheckpoint; 2],
    stagings: &[StagingDir],
    pool: &rayon::ThreadPool,
    reporter: &dyn Reporter,
) -> RunReport {
    let jobs: Vec<OutputJob> = p
        .outputs
        .iter()
        .zip(stagings)
        .map(|(o, s)| OutputJob {
            alphas: &o.alphas,
            dir: s.path(),
        })
        .collect();
    let total: u64 = p.plan.data_bytes() * p.outputs.len() as u64;
    let progress = Progress::start(reporter, total);
    let [sft, aligned] = p.inputs.each_ref().map(|i| &i.checkpoint);
    let [sft_maps, aligned_maps] = &maps;
    let report = engine::write_outputs(
        &p.plan,
        &jobs,
        (sft, sft_maps),
        (aligned, aligned_maps),
        pool,
        interrupt::flag(),
        &|n| progress.advance(n),
    );
    drop(progress);
    drop(maps);
    report
}

/// ‖θ1 − θ0‖/‖θ0‖ from the sums the engine kept; `None` when not finite (an input holds
/// inf or NaN: `expo diff` measures such checkpoints leaving those elements out) or when
/// an input changed during the read (the sums describe no real checkpoint then).
fn relative_change(report: &RunReport) -> Option<f64> {
    let read_failed = report.outputs.iter().any(|r| {
        matches!(
            r,
            Err(EngineError::InputModified { .. } | EngineError::InputChanged { .. })
        )
    });
    (report.base_sq > 0.0 && !read_failed)
        .then(|| report.delta_sq.sqrt() / report.base_sq.sqrt())
        .filter(|rc| rc.is_finite())
}

/// Copies side files, writes the index, model card and provenance, and commits one output.
fn finish_output(
    p: &Prepared,
    o: &Output,
    relative_change: Option<f64>,
    staging: StagingDir,
    reporter: &dyn Reporter,
) -> Result<()> {
    interrupt::check()?;
    let mut provenance = provenance(p, o);
    provenance.rules = p.rule_records(o.alpha);
    provenance.relative_change = relative_change;
    let files = Finish {
        index: p.plan.index.as_ref(),
        card: provenance.model_card(&p.side.card),
        provenance: provenance.to_json(),
    };
    write_finish(&staging, |dest| p.side.copy_into(dest), &files)?;
    commit(staging, &o.target, reporter)
}

fn provenance(p: &Prepared, o: &Output) -> Provenance {
    let [sft, aligned] = &p.inputs;
    let plan = &p.plan;
    let (extrapolated, cast, copied) = plan.counts(&o.alphas);
    Provenance {
        tool: sidefiles::provenance::TOOL,
        version: sidefiles::provenance::VERSION,
        method: "model extrapolation (ExPO)",
        formula: sidefiles::FORMULA,
        arithmetic: "float64: subtract, multiply, add (no FMA); rounded once to the output dtype, to nearest even",
        paper: sidefiles::PAPER_URL,
        alpha: o.alpha,
        rules: Vec::new(),
        dtype: p.settings.dtype.name().to_string(),
        max_shard_size: p.settings.max_shard_size,
        relative_change: None,
        sft: InputRecord::resolved(&sft.checkpoint, &sft.resolved),
        aligned: InputRecord::resolved(&aligned.checkpoint, &aligned.resolved),
        tensors: TensorCounts {
            total: plan.tensors.len(),
            extrapolated,
            cast,
            copied,
        },
        tensor_bytes: plan.data_bytes(),
        shards: plan.shards.iter().map(|s| s.file_name.clone()).collect(),
        side_files: p.side.copy.iter().map(|p| p.display().to_string()).collect(),
        command: p.settings.command.clone(),
    }
}
