//! `expo extrapolate`: validate both checkpoints, plan the output, write it atomically.
//!
//! The command is a pipeline of named steps:
//!
//! 1. [`prepare`]: resolve the inputs, plan every output (pairing and rules), check the
//!    output locations, list the side files, compare the tensors that must be identical.
//!    Nothing is written; `--dry-run` prints the result and stops here.
//! 2. [`produce`]: write every output in one pass over the inputs, then finish each one
//!    (side files, model card, provenance) and commit it atomically.
//! 3. [`conclude`]: the summary and `--json` (printed by [`crate::report::extrapolate`]) and
//!    the exit status.
//!
//! [`prepare`] and [`produce`] are library steps: a caller that wants a batch of
//! candidates for several α (e.g. a search) builds one [`ExtrapolateArgs`] with every α,
//! and gets one result per output back.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::alpha;
use crate::checkpoint::Checkpoint;
use crate::cli::ExtrapolateArgs;
use crate::engine::{self, EngineError, MappedCheckpoint, OutputJob, RunReport};
use crate::hub::{self, CacheEnv};
use crate::interrupt;
use crate::output::{self, OutputTarget, StagingDir};
use crate::plan::{self, build_plan, AlphaRule, Plan, PlanError, PlanOptions};
use crate::report::{self, Reporter};
use crate::sidefiles::{self, InputRecord, Provenance, SideFiles, TensorCounts};
use crate::stats;

/// A usage error found after parsing (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub use crate::extrapolation::{Input, Output, Prepared, Produced};

/// Runs `expo extrapolate`.
pub fn run(args: &ExtrapolateArgs) -> Result<ExitCode> {
    if let Some(code) = crate::adapter::maybe_extrapolate(args)? {
        return Ok(code);
    }
    let started = Instant::now();
    let reporter = Reporter::new(args.quiet);
    let mut prepared = prepare(args, &reporter)?;
    if args.dry_run {
        report::extrapolate::print_plan(&prepared, &reporter)?;
        return Ok(ExitCode::SUCCESS);
    }
    let produced = produce(&mut prepared, &reporter)?;
    conclude(&prepared, produced, started, &reporter)
}

/// Step 1: resolves and validates everything, and plans every output. Writes nothing.
pub fn prepare<'a>(args: &'a ExtrapolateArgs, reporter: &Reporter) -> Result<Prepared<'a>> {
    check_output_template(args)?;
    // --skip rules come first: a skipped tensor stays θ1's whatever --alpha-for says.
    let rules: Vec<AlphaRule> = args.skip.iter().chain(&args.alpha_for).cloned().collect();
    let inputs = open_inputs(args)?;
    for w in inputs.iter().flat_map(|i| &i.checkpoint.warnings) {
        reporter.warn(w);
    }
    let outputs = plan_outputs(args, &rules, &inputs)?;
    warn_about_inputs(reporter, &args.alpha.0, &inputs);
    let matches = rule_matches(&outputs[0].plan, rules.len());
    for (rule, n) in rules.iter().zip(&matches) {
        if *n == 0 {
            reporter.warn(format!("{} matches no tensor", rule.spelling));
        }
    }
    let side = list_side_files(args, &inputs[1].checkpoint, &outputs, reporter)?;
    let maps = map_and_verify(&inputs, &outputs)?;
    // Every output's files of one shard are open at once: refuse a sweep that cannot fit
    // under the open-files limit now, not after hours of work (also in --dry-run).
    engine::check_open_files(outputs.len())?;
    Ok(Prepared {
        args,
        inputs,
        rules,
        matches,
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
pub fn produce(p: &mut Prepared, reporter: &Reporter) -> Result<Produced> {
    interrupt::install();
    interrupt::install_sigbus_handler();
    let pool = super::worker_pool(p.args.threads, reporter)?;
    let maps = p
        .maps
        .take()
        .context("the outputs of one preparation can be produced only once")?;
    clean_stale_staging(&p.outputs, reporter);
    let stagings = create_stagings(&p.outputs)?;
    let report = write_data(p, maps, &stagings, &pool, reporter);
    if report
        .outputs
        .iter()
        .any(|r| matches!(r, Err(EngineError::Interrupted)))
    {
        return Err(interrupt::Interrupted.into());
    }
    let relative_change = relative_change(&report);
    let doubtful =
        relative_change.is_some_and(|rc| stats::premise_doubtful(rc, p.args.warn_relative_change));
    if let (true, Some(rc)) = (doubtful, relative_change) {
        reporter.warn(report::extrapolate::premise_warning(
            rc,
            p.args.warn_relative_change,
        ));
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
                    report::extrapolate::warn_inherited_nonfinite(reporter, o, &stats);
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

/// Step 3: reports what was done and turns the results into the exit status.
fn conclude(
    p: &Prepared,
    produced: Produced,
    started: Instant,
    reporter: &Reporter,
) -> Result<ExitCode> {
    let seconds = started.elapsed().as_secs_f64();
    report::extrapolate::print_summary(p, &produced, seconds, reporter);
    if p.args.json {
        // Failed outputs are reported even when stdout is gone (`| head`).
        let printed = report::extrapolate::print_json(p, &produced, seconds, reporter);
        if produced.results.iter().all(Result::is_ok) {
            printed.with_context(|| {
                report::extrapolate::complete_but_unprinted(&p.outputs, "--json summary")
            })?;
        }
    }
    if interrupt::check().is_err() {
        return Err(interrupt::Interrupted.into());
    }
    let written = produced.results.iter().filter(|r| r.is_ok()).count();
    let mut failures: Vec<anyhow::Error> = produced
        .results
        .into_iter()
        .filter_map(Result::err)
        .collect();
    match failures.len() {
        0 => Ok(ExitCode::SUCCESS),
        1 if p.outputs.len() == 1 => Err(failures.remove(0)),
        n => {
            let mut msg = format!("{n} of {} outputs failed", p.outputs.len());
            for e in &failures {
                msg.push_str(&format!("\n  {e:#}"));
            }
            if written > 0 {
                msg.push_str("\n  (the other outputs were written completely)");
            }
            Err(anyhow::anyhow!(msg))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Preparing
// ---------------------------------------------------------------------------------------

/// Several α need `{alpha}` in `--output` to name each output.
fn check_output_template(args: &ExtrapolateArgs) -> Result<()> {
    let n = args.alpha.0.len();
    if n > 1 && !alpha::has_placeholder(&args.output) {
        return Err(UsageError(format!(
            "--alpha gives {n} values, so --output must contain {} to name each output, e.g. --output '{}-{}'",
            alpha::PLACEHOLDER,
            args.output.display(),
            alpha::PLACEHOLDER
        ))
        .into());
    }
    Ok(())
}

fn open_inputs(args: &ExtrapolateArgs) -> Result<[Input; 2]> {
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
        open("--sft", "--sft checkpoint", &args.sft)?,
        open("--aligned", "--aligned checkpoint", &args.aligned)?,
    ])
}

/// Locates and plans the output of every α.
fn plan_outputs(
    args: &ExtrapolateArgs,
    rules: &[AlphaRule],
    inputs: &[Input; 2],
) -> Result<Vec<Output>> {
    let mut outputs: Vec<Output> = Vec::with_capacity(args.alpha.0.len());
    for &a in &args.alpha.0 {
        let path = alpha::expand_output(&args.output, a);
        if outputs.iter().any(|o| o.target.path == path) {
            return Err(UsageError(format!(
                "--output {} names the same directory for two alpha values",
                args.output.display()
            ))
            .into());
        }
        let target = OutputTarget::locate(&path, args.force)?;
        if let Some(clash) = output::location_clash(outputs.iter().map(|o| &o.target), &target) {
            return Err(UsageError(clash).into());
        }
        // An overlap with an input is a usage error (2), reported before the refusal to
        // replace a directory that is not a checkpoint (1).
        check_paths(&target, inputs)?;
        target.check_replaceable()?;
        let opts = PlanOptions {
            alpha: a,
            dtype: args.dtype.choice(),
            max_shard_size: args.max_shard_size,
            rules: rules.to_vec(),
        };
        let plan = match build_plan(&inputs[0].checkpoint, &inputs[1].checkpoint, &opts) {
            Ok(plan) => plan,
            Err(PlanError::Alpha(e)) => return Err(UsageError(e.to_string()).into()),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "pairing --sft {} with --aligned {}",
                        args.sft.display(),
                        args.aligned.display()
                    )
                })
            }
        };
        outputs.push(Output {
            alpha: a,
            target,
            plan,
        });
    }
    Ok(outputs)
}

/// The side files of θ1 to copy, opened and checked, with a warning for what is not copied;
/// fails if two output files would share a name.
fn list_side_files(
    args: &ExtrapolateArgs,
    aligned: &Checkpoint,
    outputs: &[Output],
    reporter: &Reporter,
) -> Result<SideFiles> {
    let side = sidefiles::open_side_files(aligned, args.dtype.choice())?;
    for o in outputs {
        side.check_plan(&o.plan)?;
    }
    side.warnings().into_iter().for_each(|w| reporter.warn(w));
    if !aligned.is_dir {
        reporter
            .warn("--aligned is a single file, so no config.json or tokenizer files are copied");
    }
    Ok(side)
}

/// Maps both inputs and checks the tensors that must be identical on both sides.
fn map_and_verify(inputs: &[Input; 2], outputs: &[Output]) -> Result<[MappedCheckpoint; 2]> {
    let [sft, aligned] = inputs.each_ref().map(|i| &i.checkpoint);
    // Guarded: an input truncated during the run is an error (the temporary directory is
    // removed as after any other), not a SIGBUS.
    let sft_maps = MappedCheckpoint::map_guarded(sft).context("mapping --sft")?;
    let aligned_maps = MappedCheckpoint::map_guarded(aligned).context("mapping --aligned")?;
    for plan in plan::plans_to_verify(outputs.iter().map(|o| &o.plan)) {
        engine::verify_exact_tensors(plan, (sft, &sft_maps), (aligned, &aligned_maps))
            .context("comparing the non-float tensors")?;
    }
    Ok([sft_maps, aligned_maps])
}

/// How many tensors each rule set the α of.
fn rule_matches(plan: &Plan, rules: usize) -> Vec<usize> {
    let mut n = vec![0; rules];
    for p in &plan.pairs {
        if let Some(r) = p.rule {
            n[r] += 1;
        }
    }
    n
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Refuses an output that is, contains, or lies inside either input, that contains the
/// data behind a symlinked weight file, or that lies in a Hub input's cache entry.
fn check_paths(target: &OutputTarget, inputs: &[Input]) -> Result<()> {
    inputs
        .iter()
        .try_for_each(|i| check_overlap(target, i.flag, &i.checkpoint, &i.resolved))
}

/// Refuses (usage error) an output that is, contains, or lies inside the input given with
/// `flag`, holds the data behind a symlinked weight file, or lies in a Hub input's cache
/// entry. Shared with the adapter path.
pub(crate) fn check_overlap(
    target: &OutputTarget,
    flag: &str,
    ck: &Checkpoint,
    resolved: &crate::hub::ResolvedInput,
) -> Result<()> {
    let parent = std::fs::canonicalize(&target.parent)
        .with_context(|| format!("resolving {}", target.parent.display()))?;
    let out = parent.join(&target.name);
    let input = canonical(&resolved.path);
    let root = canonical(&ck.root);
    let mut clash = out == input
        || out.starts_with(&root) && ck.is_dir
        || out.starts_with(&input)
        || input.starts_with(&out);
    // Weight files may be symlinks (the Hugging Face cache links them into blobs/).
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
    Ok(())
}

fn warn_about_inputs(reporter: &Reporter, alphas: &[f64], inputs: &[Input; 2]) {
    let same = match (
        std::fs::canonicalize(&inputs[0].resolved.path),
        std::fs::canonicalize(&inputs[1].resolved.path),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        reporter.warn("--sft and --aligned are the same checkpoint: θ1 − θ0 is zero, so the output equals the input");
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

/// Tidies what killed runs left beside each output, saying what was found.
fn clean_stale_staging(outputs: &[Output], reporter: &Reporter) {
    for o in outputs {
        for w in output::clean_stale_staging(&o.target.parent).warnings() {
            reporter.warn(w);
        }
    }
}

/// One staging directory per output, with the subdirectories its shards need.
fn create_stagings(outputs: &[Output]) -> Result<Vec<StagingDir>> {
    let stagings = outputs
        .iter()
        .map(|o| StagingDir::create(&o.target))
        .collect::<Result<Vec<_>, _>>()?;
    // An index may place shards in a subdirectory (`weights/model-00001-of-00002.safetensors`,
    // accepted on input); the mirrored output needs the same subdirectory.
    for (o, s) in outputs.iter().zip(&stagings) {
        for shard in &o.plan.shards {
            if let Some(sub) = Path::new(&shard.file_name)
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
            {
                let dir = s.path().join(sub);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
        }
    }
    Ok(stagings)
}

/// Writes the tensor data of every output in one pass, then releases the input maps.
fn write_data(
    p: &Prepared,
    maps: [MappedCheckpoint; 2],
    stagings: &[StagingDir],
    pool: &rayon::ThreadPool,
    reporter: &Reporter,
) -> RunReport {
    let jobs: Vec<OutputJob> = p
        .outputs
        .iter()
        .zip(stagings)
        .map(|(o, s)| OutputJob {
            plan: &o.plan,
            dir: s.path(),
        })
        .collect();
    let total: u64 = p.outputs.iter().map(|o| o.plan.data_bytes()).sum();
    let bar = reporter.progress(total);
    let [sft, aligned] = p.inputs.each_ref().map(|i| &i.checkpoint);
    let [sft_maps, aligned_maps] = &maps;
    let report = engine::write_outputs(
        &jobs,
        (sft, sft_maps),
        (aligned, aligned_maps),
        pool,
        interrupt::flag(),
        &|n| bar.inc(n),
    );
    bar.finish_and_clear();
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
    reporter: &Reporter,
) -> Result<()> {
    interrupt::check()?;
    p.side.copy_into(staging.path())?;
    if let Some((name, bytes)) = &o.plan.index {
        sidefiles::write_file(staging.path(), name, bytes)?;
    }
    let mut provenance = provenance(p, &o.plan);
    provenance.rules = p.rule_records(o.alpha);
    provenance.relative_change = relative_change;
    let card = provenance.model_card(&p.side.card);
    sidefiles::write_file(staging.path(), sidefiles::MODEL_CARD_NAME, card.as_bytes())?;
    sidefiles::write_file(
        staging.path(),
        sidefiles::PROVENANCE_NAME,
        &provenance.to_json(),
    )?;
    interrupt::check()?;
    // Once committed, the new output is in place: what is left to tidy is only a warning.
    for w in staging.commit(&o.target)?.warnings() {
        reporter.warn(w);
    }
    Ok(())
}

fn provenance(p: &Prepared, plan: &Plan) -> Provenance {
    let [sft, aligned] = &p.inputs;
    let (extrapolated, cast, copied) = plan.counts();
    Provenance {
        tool: "expo",
        version: env!("CARGO_PKG_VERSION"),
        method: "model extrapolation (ExPO)",
        formula: sidefiles::FORMULA,
        arithmetic: "float64: subtract, multiply, add (no FMA); rounded once to the output dtype, to nearest even",
        paper: sidefiles::PAPER_URL,
        alpha: plan.alpha,
        rules: Vec::new(),
        dtype: p.args.dtype.name().to_string(),
        max_shard_size: p.args.max_shard_size,
        relative_change: None,
        sft: InputRecord::resolved(&sft.checkpoint, &sft.resolved),
        aligned: InputRecord::resolved(&aligned.checkpoint, &aligned.resolved),
        tensors: TensorCounts {
            total: plan.pairs.len(),
            extrapolated,
            cast,
            copied,
        },
        tensor_bytes: plan.data_bytes(),
        shards: plan.shards.iter().map(|s| s.file_name.clone()).collect(),
        side_files: p.side.copy.iter().map(|p| p.display().to_string()).collect(),
        command: std::env::args_os()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
    }
}
