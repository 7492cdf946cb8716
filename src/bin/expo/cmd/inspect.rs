//! `expo inspect`: list a checkpoint's tensors and totals per dtype, from the headers only.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Result;

use crate::cli::InspectArgs;
use crate::report::inspect as print;
use expo::hub::{self, CacheEnv};

/// Runs `expo inspect`: resolve the input, read its headers, print.
pub fn run(args: &InspectArgs) -> Result<ExitCode> {
    if let Some(info) = expo::adapter::inspect::inspect(&args.path)? {
        crate::report::print_text(&crate::report::adapter::inspect(&info, args.json)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let (ck, resolved) = hub::open_for("checkpoint", &args.path, &CacheEnv::from_process())?;
    let reporter = crate::report::Reporter::new(false);
    ck.warnings.iter().for_each(|w| reporter.warn(w.clone()));
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.json {
        print::write_json(&mut out, &ck, &resolved)?;
    } else {
        out.write_all(print::human(&ck, &resolved).as_bytes())?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
