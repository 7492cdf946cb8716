//! `expo extrapolate`: validate both checkpoints, plan the output, write it atomically.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;

use crate::alpha;
use crate::checkpoint::Checkpoint;
use crate::cli::ExtrapolateArgs;
use crate::engine::{self, MappedCheckpoint, OutputJob};
use crate::hub::{self, CacheEnv, ResolvedInput};
use crate::interrupt;
use crate::output::{self, OutputTarget, StagingDir};
use crate::plan::{build_plan, AlphaRule, Plan, PlanOptions, Treatment};
use crate::report::{self, Reporter};
use crate::sidefiles::{self, InputRecord, Provenance, RuleRecord, SideFiles, TensorCounts};
use crate::stats;

/// A usage error found after parsing (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// One output of the run: its α, its validated location and its plan.
struct Output {
    alpha: f64,
    target: OutputTarget,
    plan: Plan,
}

/// Runs `expo extrapolate`.
pub fn run(args: &ExtrapolateArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let reporter = Reporter::new(args.quiet);
    let alphas = &args.alpha.0;
    let templated = alpha::has_placeholder(&args.output);
    if alphas.len() > 1 && !templated {
        return Err(UsageError(format!(
            "--alpha gives {} values, so --output must contain {} to name each output, e.g. --output '{}-{}'",
            alphas.len(),
            alpha::PLACEHOLDER,
            args.output.display(),
            alpha::PLACEHOLDER
        ))
        .into());
    }
    // --skip rules come first: a skipped tensor stays θ1's whatever --alpha-for says.
    let rules: Vec<_> = args.skip.iter().chain(&args.alpha_for).cloned().collect();

    let cache_env = CacheEnv::from_process();
    let (sft, sft_in) = hub::open_for("--sft checkpoint", &args.sft, &cache_env)?;
    let (aligned, aligned_in) = hub::open_for("--aligned checkpoint", &args.aligned, &cache_env)?;
    let inputs = [
        ("--sft", &sft, &sft_in),
        ("--aligned", &aligned, &aligned_in),
    ];

    let mut outputs: Vec<Output> = Vec::with_capacity(alphas.len());
    for &a in alphas {
        let path = alpha::expand_output(&args.output, a);
        if outputs.iter().any(|o| o.target.path == path) {
            return Err(UsageError(format!(
                "--output {} names the same directory for two alpha values",
                args.output.display()
            ))
            .into());
        }
        let target = OutputTarget::locate(&path, args.force)?;
        // An overlap with an input is a usage error (2), reported before the refusal to
        // replace a directory that is not a checkpoint (1).
        check_paths(&target, &inputs)?;
        target.check_replaceable()?;
        let opts = PlanOptions {
            alpha: a,
            dtype: args.dtype.choice(),
            max_shard_size: args.max_shard_size,
            rules: rules.clone(),
        };
        let plan = build_plan(&sft, &aligned, &opts).with_context(|| {
            format!(
                "pairing --sft {} with --aligned {}",
                args.sft.display(),
                args.aligned.display()
            )
        })?;
        outputs.push(Output {
            alpha: a,
            target,
            plan,
        });
    }
    warn_about_inputs(&reporter, alphas, &sft_in, &aligned_in);
    let matches = rule_matches(&outputs[0].plan, rules.len());
    for (rule, n) in rules.iter().zip(&matches) {
        if *n == 0 {
            reporter.warn(format!("{} matches no tensor", rule.spelling));
        }
    }

    let side = sidefiles::list_side_files(&aligned)?;
    for skipped in &side.skipped_weights {
        reporter.warn(format!(
            "not copying {} from --aligned: it holds weights that are not part of the checkpoint expo read",
            skipped.display()
        ));
    }
    if !aligned.is_dir {
        reporter
            .warn("--aligned is a single file, so no config.json or tokenizer files are copied");
    }

    // Guarded: an input truncated during the run is an error (the temporary directory is
    // removed as after any other), not a SIGBUS.
    let sft_maps = MappedCheckpoint::map_guarded(&sft).context("mapping --sft")?;
    let aligned_maps = MappedCheckpoint::map_guarded(&aligned).context("mapping --aligned")?;
    engine::verify_exact_tensors(
        &outputs[0].plan,
        (&sft, &sft_maps),
        (&aligned, &aligned_maps),
    )
    .context("comparing the non-float tensors")?;

    engine::check_open_files(outputs.len())?;
    if args.dry_run {
        print_plan(args, &outputs, &rules, &matches, &inputs, &side, &reporter)?;
        return Ok(ExitCode::SUCCESS);
    }

    interrupt::install();
    interrupt::install_sigbus_handler();
    let pool = super::worker_pool(args.threads, &reporter)?;

    for o in &outputs {
        let found = output::clean_stale_staging(&o.target.parent);
        for stale in found.removed {
            reporter.warn(format!(
                "removed {}, left behind by an expo run that was killed",
                stale.display()
            ));
        }
        for (aside, home) in found.moved_aside {
            reporter.warn(format!(
                "{} is the previous content of {}, moved aside by an expo --force run that was killed; move it back by hand",
                aside.display(),
                home.display()
            ));
        }
    }
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
    let jobs: Vec<OutputJob> = outputs
        .iter()
        .zip(&stagings)
        .map(|(o, s)| OutputJob {
            plan: &o.plan,
            dir: s.path(),
        })
        .collect();
    let total: u64 = outputs.iter().map(|o| o.plan.data_bytes()).sum();
    let bar = reporter.progress(total);
    let report = engine::write_outputs(
        &jobs,
        (&sft, &sft_maps),
        (&aligned, &aligned_maps),
        &pool,
        interrupt::flag(),
        &|n| bar.inc(n),
    );
    bar.finish_and_clear();
    drop((sft_maps, aligned_maps));
    if report
        .outputs
        .iter()
        .any(|r| matches!(r, Err(engine::EngineError::Interrupted)))
    {
        return Err(interrupt::Interrupted.into());
    }
    // Not finite when an input holds inf or NaN: no meaningful figure then (`expo diff`
    // measures such checkpoints leaving those elements out).
    let relative_change = (report.base_sq > 0.0)
        .then(|| report.delta_sq.sqrt() / report.base_sq.sqrt())
        .filter(|rc| rc.is_finite());
    let doubtful =
        relative_change.is_some_and(|rc| stats::premise_doubtful(rc, args.warn_relative_change));
    if let (true, Some(rc)) = (doubtful, relative_change) {
        reporter.warn(format!(
            "‖θ1 − θ0‖/‖θ0‖ = {rc:.3e} is above {:e}: alignment moved the model far from --sft, so the premise of extrapolation (a small step) is doubtful; evaluate the outputs with care, or check `expo diff` (threshold: --warn-relative-change)",
            args.warn_relative_change
        ));
    }

    let mut failures = Vec::new();
    let mut summaries = Vec::new();
    for ((o, staging), result) in outputs.iter().zip(stagings).zip(report.outputs) {
        let finished = result
            .map_err(anyhow::Error::new)
            .and_then(|stats| {
                for (tensor, count) in &stats.inherited_nonfinite {
                    reporter.warn(format!(
                        "{}: tensor `{tensor}`: {count} values are infinite or NaN in --sft or --aligned; --aligned's values were kept there",
                        o.target.path.display()
                    ));
                }
                let run = OutputRun {
                    rules: &rules,
                    matches: &matches,
                    relative_change,
                    inputs: &inputs,
                    side: &side,
                };
                finish_output(args, o, &run, staging, &reporter)
            });
        match finished {
            Ok(()) => summaries.push(o),
            Err(e) => failures.push(e.context(format!("writing {}", o.target.path.display()))),
        }
    }

    let seconds = started.elapsed().as_secs_f64();
    for o in &summaries {
        let (extrapolated, cast, copied) = o.plan.counts();
        let data = o.plan.data_bytes();
        reporter.info(format!(
            "expo: wrote {} with alpha = {}: {} tensors ({} extrapolated{}, {} copied) in {} file{}, {}",
            o.target.path.display(),
            alpha::format_alpha(o.alpha),
            o.plan.pairs.len(),
            extrapolated,
            if cast > 0 { format!(", {cast} converted") } else { String::new() },
            copied,
            o.plan.shards.len(),
            if o.plan.shards.len() == 1 { "" } else { "s" },
            report::bytes(data),
        ));
    }
    if let Some(rc) = relative_change {
        reporter.info(format!(
            "expo: ‖θ1 − θ0‖/‖θ0‖ = {rc:.3e} over the extrapolated tensors; {} written in {seconds:.1}s ({}/s)",
            report::bytes(total),
            report::bytes((total as f64 / seconds.max(1e-9)) as u64),
        ));
    }
    if args.json {
        let per_output: Vec<serde_json::Value> = outputs
            .iter()
            .map(|o| {
                let ok = summaries.iter().any(|s| std::ptr::eq(*s, o));
                json!({
                    "output": o.target.path,
                    "alpha": o.alpha,
                    "ok": ok,
                    "tensors": counts(&o.plan),
                    "rules": rule_records(&rules, &matches, o.alpha),
                    "shards": shards_json(&o.plan),
                    "index": o.plan.index.as_ref().map(|(n, _)| n),
                    "tensor_bytes": o.plan.data_bytes(),
                    "output_bytes": o.plan.output_bytes(),
                })
            })
            .collect();
        let mut doc = json!({
            "dry_run": false,
            "alphas": alphas,
            "relative_change": relative_change,
            "premise_doubtful": doubtful,
            "side_files": side.copy,
            "seconds": seconds,
            "warnings": reporter.warnings(),
            "errors": failures.iter().map(|e| format!("{e:#}")).collect::<Vec<_>>(),
            "outputs": per_output,
        });
        lift_single_output(&mut doc);
        // Failed outputs are reported even when stdout is gone (`| head`).
        let printed = report::print_json(&doc);
        if failures.is_empty() {
            printed?;
        }
    }
    if interrupt::check().is_err() {
        return Err(interrupt::Interrupted.into());
    }
    match failures.len() {
        0 => Ok(ExitCode::SUCCESS),
        1 if outputs.len() == 1 => Err(failures.remove(0)),
        n => {
            let mut msg = format!("{n} of {} outputs failed", outputs.len());
            for e in &failures {
                msg.push_str(&format!("\n  {e:#}"));
            }
            if !summaries.is_empty() {
                msg.push_str("\n  (the other outputs were written completely)");
            }
            Err(anyhow::anyhow!(msg))
        }
    }
}

/// What every output of a run shares, for [`finish_output`].
struct OutputRun<'a> {
    rules: &'a [AlphaRule],
    matches: &'a [usize],
    relative_change: Option<f64>,
    inputs: &'a [Input<'a>; 2],
    side: &'a SideFiles,
}

/// Copies side files, writes the index, model card and provenance, and commits one output.
fn finish_output(
    args: &ExtrapolateArgs,
    o: &Output,
    run: &OutputRun,
    staging: StagingDir,
    reporter: &Reporter,
) -> Result<()> {
    let OutputRun {
        rules,
        matches,
        relative_change,
        inputs,
        side,
    } = *run;
    interrupt::check()?;
    let aligned = inputs[1].1;
    sidefiles::copy_side_files(&aligned.root, &side.copy, staging.path())?;
    if let Some((name, bytes)) = &o.plan.index {
        sidefiles::write_file(staging.path(), name, bytes)?;
    }
    let mut provenance = provenance(args, &o.plan, inputs, side);
    provenance.rules = rule_records(rules, matches, o.alpha);
    provenance.relative_change = relative_change;
    let card = provenance.model_card(sidefiles::aligned_license(aligned).as_deref());
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

fn rule_records(rules: &[AlphaRule], matches: &[usize], alpha: f64) -> Vec<RuleRecord> {
    rules
        .iter()
        .zip(matches)
        .map(|(r, &tensors)| RuleRecord {
            rule: r.spelling.clone(),
            alpha: r.alpha(alpha),
            tensors,
        })
        .collect()
}

/// A checkpoint argument: the flag, the opened checkpoint and where it was resolved to.
type Input<'a> = (&'static str, &'a Checkpoint, &'a ResolvedInput);

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Refuses an output that is, contains, or lies inside either input, that contains the
/// data behind a symlinked weight file, or that lies in a Hub input's cache entry.
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
    }
    Ok(())
}

fn warn_about_inputs(
    reporter: &Reporter,
    alphas: &[f64],
    sft: &ResolvedInput,
    aligned: &ResolvedInput,
) {
    let same = match (
        std::fs::canonicalize(&sft.path),
        std::fs::canonicalize(&aligned.path),
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

fn counts(plan: &Plan) -> serde_json::Value {
    let (extrapolated, cast, copied) = plan.counts();
    json!({"total": plan.pairs.len(), "extrapolated": extrapolated, "cast": cast, "copied": copied})
}

fn shards_json(plan: &Plan) -> serde_json::Value {
    plan.shards
        .iter()
        .map(|s| json!({"file": s.file_name, "tensors": s.tensors.len(), "bytes": s.file_len()}))
        .collect()
}

fn treatment_name(t: Treatment) -> &'static str {
    match t {
        Treatment::Extrapolate(_) => "extrapolate",
        Treatment::Cast(_) => "convert",
        Treatment::Copy => "copy",
    }
}

fn provenance(
    args: &ExtrapolateArgs,
    plan: &Plan,
    inputs: &[Input; 2],
    side: &SideFiles,
) -> Provenance {
    let [(_, sft, sft_in), (_, aligned, aligned_in)] = *inputs;
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
        dtype: args.dtype.name().to_string(),
        max_shard_size: args.max_shard_size,
        relative_change: None,
        sft: InputRecord::resolved(sft, sft_in),
        aligned: InputRecord::resolved(aligned, aligned_in),
        tensors: TensorCounts {
            total: plan.pairs.len(),
            extrapolated,
            cast,
            copied,
        },
        tensor_bytes: plan.data_bytes(),
        shards: plan.shards.iter().map(|s| s.file_name.clone()).collect(),
        side_files: side.copy.iter().map(|p| p.display().to_string()).collect(),
        command: std::env::args_os()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
    }
}

fn print_plan(
    args: &ExtrapolateArgs,
    outputs: &[Output],
    rules: &[AlphaRule],
    matches: &[usize],
    inputs: &[Input; 2],
    side: &SideFiles,
    reporter: &Reporter,
) -> Result<()> {
    let [(_, sft, sft_in), (_, aligned, aligned_in)] = *inputs;
    // Every output shares one layout; only the α of each tensor differs.
    let plan = &outputs[0].plan;
    let tensor_alphas =
        |i: usize| -> Vec<f64> { outputs.iter().map(|o| o.plan.pairs[i].alpha).collect() };
    if args.json {
        let shards: Vec<_> = plan
            .shards
            .iter()
            .map(|s| {
                let tensors: Vec<_> = s
                    .tensors
                    .iter()
                    .map(|&i| {
                        let p = &plan.pairs[i];
                        json!({
                            "name": p.name,
                            "dtype": p.out_dtype.name(),
                            "shape": p.shape,
                            "action": treatment_name(p.treatment),
                            "alphas": tensor_alphas(i),
                            "rule": p.rule.map(|r| &rules[r].spelling),
                            "bytes": p.out_len,
                        })
                    })
                    .collect();
                json!({"file": s.file_name, "bytes": s.file_len(), "tensors": tensors})
            })
            .collect();
        let per_output: Vec<_> = outputs
            .iter()
            .map(|o| {
                json!({
                    "output": o.target.path,
                    "alpha": o.alpha,
                    "tensors": counts(&o.plan),
                    "rules": rule_records(rules, matches, o.alpha),
                    "tensor_bytes": o.plan.data_bytes(),
                    "output_bytes": o.plan.output_bytes(),
                })
            })
            .collect();
        let mut doc = json!({
            "dry_run": true,
            "alphas": outputs.iter().map(|o| o.alpha).collect::<Vec<_>>(),
            "sft": InputRecord::resolved(sft, sft_in),
            "aligned": InputRecord::resolved(aligned, aligned_in),
            "shards": shards,
            "index": plan.index.as_ref().map(|(n, _)| n),
            "side_files": side.copy,
            "warnings": reporter.warnings(),
            "outputs": per_output,
        });
        lift_single_output(&mut doc);
        report::print_json(&doc)?;
        return Ok(());
    }
    let mut s = String::new();
    let describe = |ck: &Checkpoint, input: &ResolvedInput| {
        format!(
            "{} ({}{} file{}, {} tensors, {})",
            ck.given.display(),
            match &input.hub {
                Some(h) if h.revision == h.commit => format!("cached commit {}; ", h.commit),
                Some(h) => format!("cached {} = commit {}; ", h.revision, h.commit),
                None => String::new(),
            },
            ck.shards.len(),
            if ck.shards.len() == 1 { "" } else { "s" },
            ck.len(),
            report::bytes(ck.data_bytes())
        )
    };
    let _ = writeln!(s, "plan: θ1 + α·(θ1 − θ0)");
    let _ = writeln!(s, "  --sft      {}", describe(sft, sft_in));
    let _ = writeln!(s, "  --aligned  {}", describe(aligned, aligned_in));
    for o in outputs {
        let (extrapolated, cast, copied) = o.plan.counts();
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
    for (r, n) in rules.iter().zip(matches) {
        let _ = writeln!(
            s,
            "  rule {}: {} tensor{}{}",
            r.spelling,
            n,
            if *n == 1 { "" } else { "s" },
            if *n == 0 { " (matches nothing)" } else { "" }
        );
    }
    let show_alpha = !rules.is_empty();
    for shard in &plan.shards {
        let _ = writeln!(
            s,
            "  {}  ({} tensors, {})",
            shard.file_name,
            shard.tensors.len(),
            report::bytes(shard.file_len())
        );
        for &i in &shard.tensors {
            let p = &plan.pairs[i];
            let alpha_col = if show_alpha {
                let alphas: Vec<String> = tensor_alphas(i)
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
                treatment_name(p.treatment),
                alpha_col,
                p.out_dtype.name(),
                format!("{:?}", p.shape),
                report::bytes(p.out_len),
                p.name
            );
        }
    }
    if let Some((name, _)) = &plan.index {
        let _ = writeln!(s, "  {name}");
    }
    let copied_names: Vec<String> = side.copy.iter().map(|p| p.display().to_string()).collect();
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
        if plan.shards.len() == 1 { "" } else { "s" },
        outputs.len(),
        if outputs.len() == 1 { "" } else { "s" }
    );
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())?;
    out.flush()?;
    Ok(())
}
