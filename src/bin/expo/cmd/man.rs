//! `expo man`: man pages generated from the clap definitions.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::cli::{Cli, ManArgs};
use expo::error::UsageError;

/// The fully built command tree, without clap's `help` subcommand (it has no page).
fn command() -> clap::Command {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

fn man(cmd: clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(cmd)
        .source(concat!("expo ", env!("CARGO_PKG_VERSION")))
        .manual("expo manual")
}

/// The roff source of expo(1), or of expo-SUBCOMMAND(1).
pub fn page(subcommand: Option<&str>) -> Result<Vec<u8>> {
    let cmd = command();
    let cmd = match subcommand {
        None => cmd,
        Some(name) => match cmd.find_subcommand(name) {
            Some(sub) => sub.clone(),
            None => {
                let names: Vec<&str> = cmd.get_subcommands().map(|s| s.get_name()).collect();
                return Err(UsageError(format!(
                    "no subcommand `{name}`; expo has: {}",
                    names.join(", ")
                ))
                .into());
            }
        },
    };
    let mut buf = Vec::new();
    man(cmd).render(&mut buf)?;
    Ok(buf)
}

/// Writes expo.1 and expo-SUBCOMMAND.1 for every subcommand into `dir`; returns the files.
pub fn write_all(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let cmd = command();
    let mut written = Vec::new();
    let mut pages = vec![cmd.clone()];
    pages.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    for page in pages {
        let path = man(page)
            .generate_to(dir)
            .with_context(|| format!("writing a man page into {}", dir.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Runs `expo man`.
pub fn run(args: &ManArgs) -> Result<ExitCode> {
    if let Some(dir) = &args.dir {
        if !dir.is_dir() {
            return Err(UsageError(format!(
                "--dir {} is not a directory; create it first",
                dir.display()
            ))
            .into());
        }
        for path in write_all(dir)? {
            eprintln!("expo: wrote {}", path.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let page = page(args.subcommand.as_deref())?;
    let mut out = std::io::stdout().lock();
    out.write_all(&page)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_render() {
        let top = String::from_utf8(page(None).unwrap()).unwrap();
        assert!(
            top.starts_with(".ie") || top.contains(".TH expo 1"),
            "{top}"
        );
        assert!(top.contains("expo\\-extrapolate(1)"), "{top}");
        let sub = String::from_utf8(page(Some("extrapolate")).unwrap()).unwrap();
        assert!(sub.contains(".TH expo-extrapolate 1"), "{sub}");
        assert!(sub.contains("\\-\\-aligned"), "{sub}");
        assert!(page(Some("nope")).is_err());
    }
}
