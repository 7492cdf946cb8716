//! `expo extrapolate`: the build step of the library ([`expo::build`], or [`expo::adapter`]
//! when --aligned is a LoRA adapter), then the summary and exit status.
//!
//! 1. prepare: resolve the inputs, plan every output, check the output locations, list the
//!    side files. Nothing is written; `--dry-run` prints the result and stops here.
//! 2. produce: write every output in one pass over the inputs, finish and commit each one.
//! 3. conclude: the summary and `--json` (printed by [`crate::report::extrapolate`]) and the
//!    exit status.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};

use expo::build::{self, Prepared, Produced, Settings};
use expo::interrupt;

use crate::cli::ExtrapolateArgs;
use crate::report::{self, Reporter};

/// Runs `expo extrapolate`.
pub fn run(args: &ExtrapolateArgs) -> Result<ExitCode> {
    let settings = crate::settings::extrapolate(args);
    if expo::adapter::is_adapter_run(&settings)? {
        return run_adapter(args, &settings);
    }
    let started = Instant::now();
    let reporter = Reporter::new(args.quiet);
    let mut prepared = build::prepare(&settings, &reporter)?;
    if args.dry_run {
        report::extrapolate::print_plan(args.json, &prepared, &reporter)?;
        return Ok(ExitCode::SUCCESS);
    }
    let produced = build::produce(&mut prepared, &reporter)?;
    conclude(args.json, &prepared, produced, started, &reporter)
}

/// The adapter path: prepare, then the `--dry-run` plan, or produce and the summary
/// (printed by [`crate::report::adapter`]).
fn run_adapter(args: &ExtrapolateArgs, settings: &Settings) -> Result<ExitCode> {
    let started = Instant::now();
    let reporter = Reporter::new(args.quiet);
    let prepared = expo::adapter::prepare(settings, &reporter)?;
    if args.dry_run {
        report::adapter::print_plan(args.json, &prepared, &reporter)?;
        return Ok(ExitCode::SUCCESS);
    }
    let results = expo::adapter::produce(&prepared, &reporter)?;
    expo::finish::outcome(results, prepared.outputs.len())?;
    let seconds = started.elapsed().as_secs_f64();
    report::adapter::print_done(args.json, &prepared, seconds, &reporter)?;
    Ok(ExitCode::SUCCESS)
}

/// Step 3: reports what was done and turns the results into the exit status.
fn conclude(
    json: bool,
    p: &Prepared,
    produced: Produced,
    started: Instant,
    reporter: &Reporter,
) -> Result<ExitCode> {
    let seconds = started.elapsed().as_secs_f64();
    report::extrapolate::print_summary(p, &produced, seconds, reporter);
    if json {
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
    produced.into_result(&p.outputs)?;
    Ok(ExitCode::SUCCESS)
}
