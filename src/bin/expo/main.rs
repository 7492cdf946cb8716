//! The `expo` binary: parse the command line, run one subcommand, report errors.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

mod cli;
mod cmd;
mod report;
mod settings;

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
    match run(&cli) {
        Ok(code) => code,
        Err(err) => fail(&err, wants_json(&cli)),
    }
}

/// Whether the command was asked for JSON on stdout.
fn wants_json(cli: &Cli) -> bool {
    match &cli.command {
        Command::Extrapolate(args) => args.json,
        Command::Diff(args) => args.json,
        Command::Inspect(args) => args.json,
        Command::Search(args) => args.json,
        Command::Completions(_) | Command::Man(_) => false,
    }
}

/// Reports a failed command: the error once on stderr, and with `--json` one JSON object
/// on stdout unless the command already printed its own.
fn fail(err: &anyhow::Error, json: bool) -> ExitCode {
    // A closed pipe (e.g. `expo … --json | head -1`) is not an error.
    if err
        .chain()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    {
        return ExitCode::SUCCESS;
    }
    let _ = writeln!(std::io::stderr(), "expo: error: {err:#}");
    if json && !report::json_printed() {
        let _ = report::print_json(&report::failure_json(err));
    }
    ExitCode::from(exit_code(err))
}

/// A command line clap refused (exit 2), or `--help`/`--version` (exit 0). With `--json`
/// among the arguments, a refusal also prints the failure object on stdout.
fn usage_error(err: clap::Error) -> ExitCode {
    let refused = err.use_stderr();
    let json = std::env::args_os().skip(1).any(|a| a == "--json");
    let _ = err.print();
    if refused && json {
        let message = err.render().to_string();
        let message = message.trim_start_matches("error: ").trim_end();
        let _ = report::print_json(&report::failure_json(&anyhow::anyhow!("{message}")));
    }
    ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(2))
}

/// Exit codes: 1 failure, 2 usage error, 130 interrupted.
fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<expo::interrupt::Interrupted>().is_some() {
        expo::interrupt::EXIT_INTERRUPTED
    } else if err.downcast_ref::<expo::error::UsageError>().is_some() {
        2
    } else {
        1
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Extrapolate(args) => cmd::extrapolate::run(args),
        Command::Diff(args) => cmd::diff::run(args),
        Command::Search(args) => cmd::search::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Completions(args) => cmd::completions::run(args),
        Command::Man(args) => cmd::man::run(args),
    }
}
