//! `expo extrapolate`: validate both checkpoints, plan the output, write it atomically.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;

use crate::checkpoint::Checkpoint;
use crate::cli::ExtrapolateArgs;
use crate::engine::{self, MappedCheckpoint};
use crate::interrupt;
use crate::output::{OutputTarget, StagingDir};
use crate::plan::{build_plan, Plan, PlanOptions, Treatment};
use crate::report::{self, Reporter};
use crate::sidefiles::{self, InputRecord, Provenance, SideFiles, TensorCounts};

/// A usage error found after parsing (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Runs `expo extrapolate`.
pub fn run(args: &ExtrapolateArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let reporter = Reporter::new(args.quiet);
    let opts = PlanOptions {
        alpha: args.alpha,
        dtype: args.dtype.choice(),
        max_shard_size: args.max_shard_size,
    };

    let sft = Checkpoint::open(&args.sft)
        .with_context(|| format!("reading --sft checkpoint {}", args.sft.display()))?;
    let aligned = Checkpoint::open(&args.aligned)
        .with_context(|| format!("reading --aligned checkpoint {}", args.aligned.display()))?;
    let target = OutputTarget::check(&args.output, args.force)?;
    check_paths(&target, &sft, &aligned)?;
    warn_about_inputs(&reporter, args, &sft, &aligned);

    let plan = build_plan(&sft, &aligned, &opts).with_context(|| {
        format!(
            "pairing --sft {} with --aligned {}",
            args.sft.display(),
            args.aligned.display()
        )
    })?;
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

    let sft_maps = MappedCheckpoint::map(&sft).context("mapping --sft")?;
    let aligned_maps = MappedCheckpoint::map(&aligned).context("mapping --aligned")?;
    engine::verify_exact_tensors(&plan, (&sft, &sft_maps), (&aligned, &aligned_maps))
        .context("comparing the non-float tensors")?;

    if args.dry_run {
        print_plan(args, &plan, &sft, &aligned, &side, &target, &reporter)?;
        return Ok(ExitCode::SUCCESS);
    }

    interrupt::install();
    let threads = args
        .threads
        .map(usize::from)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("expo-worker-{i}"))
        .build()
        .context("starting worker threads")?;

    let staging = StagingDir::create(&target)?;
    let bar = reporter.progress(plan.data_bytes());
    let stats = engine::write_shards(
        &plan,
        (&sft, &sft_maps),
        (&aligned, &aligned_maps),
        staging.path(),
        &pool,
        interrupt::flag(),
        &|n| bar.inc(n),
    );
    bar.finish_and_clear();
    let stats = match stats {
        Err(engine::EngineError::Interrupted) => return Err(interrupt::Interrupted.into()),
        other => other.with_context(|| format!("writing {}", target.path.display()))?,
    };
    drop((sft_maps, aligned_maps));
    for (tensor, count) in &stats.inherited_nonfinite {
        reporter.warn(format!(
            "tensor `{tensor}`: {count} output values are infinite or NaN because the inputs already were"
        ));
    }

    interrupt::check()?;
    sidefiles::copy_side_files(&aligned.root, &side.copy, staging.path())?;
    if let Some((name, bytes)) = &plan.index {
        sidefiles::write_file(staging.path(), name, bytes)?;
    }
    let provenance = provenance(args, &plan, &sft, &aligned, &side);
    let card = provenance.model_card(sidefiles::aligned_license(&aligned).as_deref());
    sidefiles::write_file(staging.path(), sidefiles::MODEL_CARD_NAME, card.as_bytes())?;
    sidefiles::write_file(
        staging.path(),
        sidefiles::PROVENANCE_NAME,
        &provenance.to_json(),
    )?;
    interrupt::check()?;
    staging.commit(&target)?;

    let seconds = started.elapsed().as_secs_f64();
    let (extrapolated, cast, copied) = plan.counts();
    let data = plan.data_bytes();
    reporter.info(format!(
        "expo: wrote {} with alpha = {}: {} tensors ({} extrapolated{}, {} copied) in {} file{}, {} in {:.1}s ({}/s)",
        target.path.display(),
        plan.alpha,
        plan.pairs.len(),
        extrapolated,
        if cast > 0 { format!(", {cast} converted") } else { String::new() },
        copied,
        plan.shards.len(),
        if plan.shards.len() == 1 { "" } else { "s" },
        report::bytes(data),
        seconds,
        report::bytes((data as f64 / seconds.max(1e-9)) as u64),
    ));
    if args.json {
        report::print_json(&json!({
            "output": target.path,
            "alpha": plan.alpha,
            "dry_run": false,
            "tensors": counts(&plan),
            "shards": shards_json(&plan),
            "index": plan.index.as_ref().map(|(n, _)| n),
            "tensor_bytes": data,
            "output_bytes": plan.output_bytes(),
            "side_files": side.copy,
            "seconds": seconds,
            "warnings": reporter.warnings(),
        }))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses an output that is, contains, or lies inside either input.
fn check_paths(target: &OutputTarget, sft: &Checkpoint, aligned: &Checkpoint) -> Result<()> {
    let parent = std::fs::canonicalize(&target.parent)
        .with_context(|| format!("resolving {}", target.parent.display()))?;
    let out = parent.join(&target.name);
    for (flag, ck) in [("--sft", sft), ("--aligned", aligned)] {
        let input = std::fs::canonicalize(&ck.given).unwrap_or_else(|_| ck.given.clone());
        let root = std::fs::canonicalize(&ck.root).unwrap_or_else(|_| ck.root.clone());
        let clash = out == input
            || out.starts_with(&root) && ck.is_dir
            || out.starts_with(&input)
            || input.starts_with(&out);
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
    args: &ExtrapolateArgs,
    sft: &Checkpoint,
    aligned: &Checkpoint,
) {
    let same = match (
        std::fs::canonicalize(&sft.given),
        std::fs::canonicalize(&aligned.given),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        reporter.warn("--sft and --aligned are the same checkpoint: θ1 − θ0 is zero, so the output equals the input");
    }
    if args.alpha <= -1.0 {
        reporter.warn(format!(
            "alpha = {} moves past θ0, away from the aligned model; did you swap --sft and --aligned?",
            args.alpha
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
    sft: &Checkpoint,
    aligned: &Checkpoint,
    side: &SideFiles,
) -> Provenance {
    let (extrapolated, cast, copied) = plan.counts();
    Provenance {
        tool: "expo",
        version: env!("CARGO_PKG_VERSION"),
        method: "model extrapolation (ExPO)",
        formula: sidefiles::FORMULA,
        arithmetic: "float64: subtract, multiply, add (no FMA); rounded once to the output dtype, to nearest even",
        paper: sidefiles::PAPER_URL,
        alpha: plan.alpha,
        dtype: args.dtype.name().to_string(),
        max_shard_size: args.max_shard_size,
        sft: InputRecord::new(sft),
        aligned: InputRecord::new(aligned),
        tensors: TensorCounts {
            total: plan.pairs.len(),
            extrapolated,
            cast,
            copied,
        },
        tensor_bytes: plan.data_bytes(),
        shards: plan.shards.iter().map(|s| s.file_name.clone()).collect(),
        side_files: side.copy.iter().map(|p| p.display().to_string()).collect(),
        command: std::env::args().collect(),
    }
}

fn print_plan(
    args: &ExtrapolateArgs,
    plan: &Plan,
    sft: &Checkpoint,
    aligned: &Checkpoint,
    side: &SideFiles,
    target: &OutputTarget,
    reporter: &Reporter,
) -> Result<()> {
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
                            "bytes": p.out_len,
                        })
                    })
                    .collect();
                json!({"file": s.file_name, "bytes": s.file_len(), "tensors": tensors})
            })
            .collect();
        report::print_json(&json!({
            "output": target.path,
            "alpha": plan.alpha,
            "dry_run": true,
            "sft": InputRecord::new(sft),
            "aligned": InputRecord::new(aligned),
            "tensors": counts(plan),
            "shards": shards,
            "index": plan.index.as_ref().map(|(n, _)| n),
            "tensor_bytes": plan.data_bytes(),
            "output_bytes": plan.output_bytes(),
            "side_files": side.copy,
            "warnings": reporter.warnings(),
        }))?;
        return Ok(());
    }
    let (extrapolated, cast, copied) = plan.counts();
    let mut s = String::new();
    let describe = |ck: &Checkpoint| {
        format!(
            "{} ({} file{}, {} tensors, {})",
            ck.given.display(),
            ck.shards.len(),
            if ck.shards.len() == 1 { "" } else { "s" },
            ck.len(),
            report::bytes(ck.data_bytes())
        )
    };
    let _ = writeln!(
        s,
        "plan: θ1 + {}·(θ1 − θ0) into {}",
        plan.alpha,
        target.path.display()
    );
    let _ = writeln!(s, "  --sft      {}", describe(sft));
    let _ = writeln!(s, "  --aligned  {}", describe(aligned));
    let _ = writeln!(
        s,
        "  tensors    {} extrapolated, {} converted, {} copied",
        extrapolated, cast, copied
    );
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
            let _ = writeln!(
                s,
                "    {:<11} {:<5} {:<16} {:>10}  {}",
                treatment_name(p.treatment),
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
        "total: {} in {} file{}; nothing written (--dry-run)",
        report::bytes(plan.output_bytes()),
        plan.shards.len(),
        if plan.shards.len() == 1 { "" } else { "s" }
    );
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())?;
    out.flush()?;
    Ok(())
}
