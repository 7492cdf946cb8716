//! `expo diff`: measure Δθ = θ1 − θ0 between checkpoints (the ExPO paper's Table 1) and
//! check the premise ExPO rests on.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::cli::DiffArgs;
use crate::report::{self, diff as print, Reporter};
use expo::checkpoint::Checkpoint;
use expo::engine::MappedCheckpoint;
use expo::hub::{self, CacheEnv};
use expo::stats::{self, Entry, Input, PairReport};

/// Runs `expo diff`: open the checkpoints → pair their tensors → read and sum every pair
/// → print → warn → summary line.
pub fn run(args: &DiffArgs) -> Result<ExitCode> {
    if let [sft, aligned] = args.inputs().as_slice() {
        if let Some(d) = expo::adapter::inspect::diff(sft, aligned)? {
            let text = report::adapter::diff(&d, sft, aligned, args.json, args.top)?;
            report::print_text(&text)?;
            return Ok(ExitCode::SUCCESS);
        }
    }
    let started = Instant::now();
    let reporter = Reporter::new(args.quiet);
    let paths = args.inputs();
    let labels: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let env = CacheEnv::from_process();
    let checkpoints = paths
        .iter()
        .map(|p| hub::open_for("checkpoint", p, &env).map(|(ck, _)| ck))
        .collect::<Result<Vec<_>>>()?;
    checkpoints
        .iter()
        .flat_map(|ck| &ck.warnings)
        .for_each(|w| reporter.warn(w.clone()));
    let refs: Vec<&Checkpoint> = checkpoints.iter().collect();
    let entries =
        expo::pairing::pair_to_compare(&refs, &labels).context("comparing the checkpoints")?;
    let pairs = pairs_for(paths.len());
    let reports = measure(args, &reporter, &checkpoints, &entries, &pairs)?;

    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.json {
        print::write_json(&mut out, &reports, &pairs, &labels, args.top)?;
    } else if let [only] = reports.as_slice() {
        out.write_all(print::human_pair(only, &checkpoints, args.top).as_bytes())?;
    } else {
        out.write_all(print::human_table(&reports, &pairs, &checkpoints).as_bytes())?;
    }
    out.flush()?;
    drop(out);

    // Warnings after the result, so that they are the last thing a user sees.
    for (&(a, b), r) in pairs.iter().zip(&reports) {
        if let Some(message) = print::nonfinite_warning(r, &labels[a], &labels[b]) {
            reporter.warn(message);
        }
    }
    if let [only] = reports.as_slice() {
        if let Some(message) = print::premise_warning(only) {
            reporter.warn(message);
        }
    }
    let total_bytes: u64 = checkpoints.iter().map(Checkpoint::data_bytes).sum();
    let seconds = started.elapsed().as_secs_f64();
    reporter.info(format!(
        "expo: compared {} checkpoints ({}) in {:.1}s ({}/s)",
        checkpoints.len(),
        report::bytes(total_bytes),
        seconds,
        report::bytes((total_bytes as f64 / seconds.max(1e-9)) as u64),
    ));
    Ok(ExitCode::SUCCESS)
}

/// Maps the checkpoints, reads them once in parallel, and builds one report per pair.
fn measure(
    args: &DiffArgs,
    reporter: &Reporter,
    checkpoints: &[Checkpoint],
    entries: &[Entry],
    pairs: &[(usize, usize)],
) -> Result<Vec<PairReport>> {
    let maps = checkpoints
        .iter()
        .map(|ck| {
            MappedCheckpoint::map_guarded(ck)
                .with_context(|| format!("mapping {}", ck.given.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let inputs: Vec<Input> = checkpoints
        .iter()
        .zip(&maps)
        .map(|(checkpoint, maps)| Input { checkpoint, maps })
        .collect();
    let pool = expo::pool::worker_pool(args.threads, reporter)?;
    let total_bytes: u64 = checkpoints.iter().map(Checkpoint::data_bytes).sum();
    let progress = expo::reporter::Progress::start(reporter, total_bytes);
    let sums = stats::compare(&inputs, entries, pairs, &pool, &|n| progress.advance(n));
    drop(progress);
    // A truncated input reads as zeros under the guard: fail rather than report on them.
    for m in &maps {
        m.check_intact()?;
    }
    Ok(pairs
        .iter()
        .zip(&sums)
        .map(|(&(a, b), s)| PairReport::new(entries, s, a, b))
        .collect())
}

/// The pairs compared: the one pair for two checkpoints; otherwise each consecutive pair
/// and the first with the last.
pub fn pairs_for(n: usize) -> Vec<(usize, usize)> {
    let mut pairs: Vec<(usize, usize)> = (1..n).map(|i| (i - 1, i)).collect();
    if n > 2 {
        pairs.push((0, n - 1));
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_like_table_1() {
        assert_eq!(pairs_for(2), vec![(0, 1)]);
        assert_eq!(pairs_for(3), vec![(0, 1), (1, 2), (0, 2)]);
        assert_eq!(pairs_for(4), vec![(0, 1), (1, 2), (2, 3), (0, 3)]);
    }
}
