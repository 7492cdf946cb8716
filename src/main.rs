//! The `expo` binary: parse the command line, run one subcommand, report errors.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use expo::cli::{Cli, Command};

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(err) => {
            // A closed pipe (e.g. `expo … --json | head -1`) is not an error.
            if err
                .chain()
                .filter_map(|e| e.downcast_ref::<std::io::Error>())
                .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            let _ = writeln!(std::io::stderr(), "expo: error: {err:#}");
            ExitCode::from(exit_code(&err))
        }
    }
}

/// Exit codes: 1 failure, 2 usage error, 130 interrupted.
fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<expo::interrupt::Interrupted>().is_some() {
        expo::interrupt::EXIT_INTERRUPTED
    } else if err
        .downcast_ref::<expo::cmd::extrapolate::UsageError>()
        .is_some()
    {
        2
    } else {
        1
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match &cli.command {
        Command::Extrapolate(args) => expo::cmd::extrapolate::run(args),
        Command::Diff(args) => expo::cmd::diff::run(args),
        Command::Inspect(args) => expo::cmd::inspect::run(args),
        Command::Completions(args) => expo::cmd::completions::run(args),
        Command::Man(args) => expo::cmd::man::run(args),
    }
}
