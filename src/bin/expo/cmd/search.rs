//! `expo search`: the search configuration from the flags, then the search (src/search/),
//! its live table and verdict printed by [`crate::report::search`].

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::SearchArgs;
use crate::report::search::Terminal;

/// Runs `expo search`.
pub fn run(args: &SearchArgs) -> Result<ExitCode> {
    let cfg = crate::settings::search(args)?;
    expo::search::run(&cfg, &Terminal::new(args.json))
}
