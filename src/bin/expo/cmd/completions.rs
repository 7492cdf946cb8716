//! `expo completions SHELL`: a completion script generated from the clap definitions.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Result;
use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs};

/// The name the scripts complete.
pub const BIN_NAME: &str = "expo";

/// The completion script for `shell`.
pub fn script(shell: clap_complete::Shell) -> Vec<u8> {
    let mut cmd = Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, BIN_NAME, &mut buf);
    buf
}

/// Runs `expo completions`. The script is rendered in memory first, so that a closed pipe
/// is an ordinary I/O error rather than a panic inside the generator.
pub fn run(args: &CompletionsArgs) -> Result<ExitCode> {
    let script = script(args.shell);
    let mut out = std::io::stdout().lock();
    out.write_all(&script)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn every_shell_gets_a_script_naming_the_subcommands() {
        for shell in clap_complete::Shell::value_variants() {
            let text = String::from_utf8(script(*shell)).unwrap();
            assert!(text.contains("extrapolate"), "{shell}");
            assert!(text.contains("--aligned"), "{shell}");
        }
    }
}
