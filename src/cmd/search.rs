//! `expo search`: check the command line, then run the search (src/search/).

use std::process::ExitCode;

use anyhow::Result;

use crate::alpha;
use crate::cli::SearchArgs;
use crate::cmd::extrapolate::UsageError;
use crate::search::{self, evaluator, Config};

/// Runs `expo search`.
pub fn run(args: &SearchArgs) -> Result<ExitCode> {
    let usage = |e: evaluator::TemplateError| UsageError(e.to_string());
    let eval = evaluator::Template::parse("--eval", &args.eval).map_err(usage)?;
    let score_file = args
        .score_file
        .as_deref()
        .map(|t| evaluator::Template::parse("--score-file", t))
        .transpose()
        .map_err(usage)?;
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| args.run.join(format!("alpha-{}", alpha::PLACEHOLDER)));
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
    let cfg = Config {
        sft: args.theta.sft.clone(),
        aligned: args.theta.aligned.clone(),
        skip: args.theta.skip.clone(),
        alpha_for: args.theta.alpha_for.clone(),
        dtype: args.theta.dtype,
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
        },
        jobs: usize::from(args.jobs),
        timeout: args.timeout,
        kill_after: args.kill_after,
        output,
        keep: args.keep.0,
        run: args.run.clone(),
        resume: args.resume,
        json: args.json,
        dry_run: args.dry_run,
    };
    search::run(&cfg)
}
