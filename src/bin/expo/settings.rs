//! The one conversion point from parsed flags (clap's structs in [`crate::cli`]) to the
//! library's typed settings. Nothing below the command line sees a flag struct.

use std::path::PathBuf;

use anyhow::Result;

use expo::alpha;
use expo::build::{self, AsKind};
use expo::error::UsageError;
use expo::search::{self, evaluator};

use crate::cli::{AsKindArg, ExtrapolateArgs, SearchArgs};

/// The command line as typed, recorded in provenance (`expo.json`, model cards).
fn command_line() -> Vec<String> {
    std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

/// `expo extrapolate`'s flags as build settings.
pub fn extrapolate(args: &ExtrapolateArgs) -> build::Settings {
    build::Settings {
        sft: args.sft.clone(),
        aligned: args.aligned.clone(),
        alphas: args.alpha.0.clone(),
        skip: args.skip.clone(),
        alpha_for: args.alpha_for.clone(),
        output: args.output.clone(),
        max_shard_size: args.max_shard_size,
        dtype: args.dtype.choice(),
        force: args.force,
        threads: args.threads,
        warn_relative_change: args.warn_relative_change,
        as_kind: args.as_kind.map(|k| match k {
            AsKindArg::Adapter => AsKind::Adapter,
            AsKindArg::Model => AsKind::Model,
        }),
        command: command_line(),
    }
}

/// `expo search`'s flags as a search configuration, checked.
pub fn search(args: &SearchArgs) -> Result<search::Config> {
    let usage = |e: evaluator::TemplateError| UsageError(e.to_string());
    let eval = evaluator::Template::parse("--eval", &args.eval).map_err(usage)?;
    let score_file = args
        .score_file
        .as_deref()
        .map(|t| evaluator::Template::parse("--score-file", t))
        .transpose()
        .map_err(usage)?;
    let output = candidate_template(args)?;
    let (settings, first_batch) = search::settings(
        &args.alpha.0,
        !args.no_baseline,
        args.bounds,
        args.resolution,
        args.tie,
        args.max_evals as usize,
        args.retries as usize,
        args.max_failures as usize,
    )?;
    Ok(search::Config {
        sft: args.theta.sft.clone(),
        aligned: args.theta.aligned.clone(),
        skip: args.theta.skip.clone(),
        alpha_for: args.theta.alpha_for.clone(),
        dtype: args.theta.dtype.choice(),
        max_shard_size: args.theta.max_shard_size,
        threads: args.theta.threads,
        settings,
        first_batch,
        baseline: !args.no_baseline,
        minimize: args.minimize,
        eval,
        score: evaluator::ScoreSpec {
            pointer: args.score_json.clone(),
            file: score_file,
            wait: if args.slurm.is_some() {
                evaluator::SCORE_FILE_WAIT
            } else {
                std::time::Duration::ZERO
            },
        },
        jobs: usize::from(args.jobs),
        timeout: args.timeout,
        kill_after: args.kill_after,
        slurm: args.slurm.clone(),
        queue_timeout: args.queue_timeout,
        output,
        keep: args.keep.0,
        run: search::resolve_path(&args.run)
            .map_err(|e| anyhow::Error::new(e).context(format!("--run {}", args.run.display())))?,
        resume: args.resume,
        json: args.json,
        dry_run: args.dry_run,
        command: command_line(),
    })
}

/// `--output` of a search (default RUN/alpha-{alpha}), which must hold `{alpha}`.
fn candidate_template(args: &SearchArgs) -> Result<PathBuf> {
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| args.run.join(format!("alpha-{}", alpha::PLACEHOLDER)));
    let output = search::resolve_path(&output)
        .map_err(|e| anyhow::Error::new(e).context(format!("--output {}", output.display())))?;
    if !alpha::has_placeholder(&output) {
        return Err(UsageError(format!(
            "--output {} must contain {} to name each candidate, e.g. --output '{}-{}'",
            output.display(),
            alpha::PLACEHOLDER,
            output.display(),
            alpha::PLACEHOLDER
        ))
        .into());
    }
    Ok(output)
}
