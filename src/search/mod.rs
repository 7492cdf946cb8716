//! `expo search`: find the best α by running the user's own evaluator.
//!
//! The loop: ask the [`rule`] what to evaluate next (one α per free evaluator slot), build
//! those candidates with the extrapolation engine in one pass, start the evaluator on each
//! in its own process group, and record every start and end in the [`ledger`]. A slot is
//! refilled as soon as it frees: there is no barrier between rounds.

pub mod evaluator;
pub mod launch;
pub mod ledger;
pub mod plot;
pub mod rule;

mod candidates;
mod config;
mod dry_run;
mod groups;
mod inputs;
mod run_dir;
mod trials;
mod verdict;

pub use candidates::alpha_path;
pub use config::{
    parse_bounds, parse_duration, parse_keep, parse_resolution, parse_timeout, resolve_path,
    settings, Bounds, Config, Keep, Resolution,
};
pub use dry_run::DryRun;
pub use groups::kill_all_groups;
pub use verdict::{status_warning, Verdict};

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

use crate::reporter::Reporter;
use crate::sys::FileId;

use ledger::{Ledger, Trial};

/// What a search tells its caller as it goes; the command line prints it. Warnings and
/// the progress of candidate builds go through the [`Reporter`] it extends.
pub trait Observer: Reporter {
    /// `--dry-run`: what the search would do.
    fn dry_run(&self, plan: &DryRun) -> std::io::Result<()>;
    /// The search starts its live table of trials.
    fn table_header(&self) {}
    /// A trial ended (or was replayed from the ledger); `baseline` is the α = 0 score.
    fn trial_ended(&self, _trial: &Trial, _baseline: Option<f64>) {}
    /// The search is over with a verdict.
    fn finished(&self, verdict: &Verdict) -> std::io::Result<()>;
}

/// A search under way: its settings, ledger and finished trials.
struct Search<'a> {
    cfg: &'a Config,
    reporter: &'a dyn Observer,
    ledger: Ledger,
    trials: Vec<Trial>,
    /// Candidates expo built and has not deleted.
    created: BTreeSet<PathBuf>,
    /// The identity of each candidate directory expo built, recorded when it was built:
    /// only that very directory is ever deleted.
    built: BTreeMap<PathBuf, FileId>,
    /// Candidates whose deletion started and did not finish: never reused.
    incomplete: BTreeSet<PathBuf>,
    /// Candidates whose deletion failed: left on disk, not kept.
    leftovers: BTreeSet<PathBuf>,
    aligned_path: PathBuf,
    next_trial: u64,
    started: Instant,
    /// Starts, follows and stops the evaluators.
    launcher: Box<dyn launch::Launcher>,
    /// Jobs the cluster (not the evaluator) ended so far.
    cluster_failures: u32,
    /// The search's id ([`launch::search_id`]), in job names and `EXPO_SEARCH`.
    id: String,
}

/// Why the loop stopped early.
enum Abort {
    Interrupted,
    Broken(anyhow::Error),
}

/// Runs a search; the exit code when it completed.
pub fn run(cfg: &Config, reporter: &dyn Observer) -> Result<std::process::ExitCode> {
    let inputs = inputs::open_inputs(cfg)?;
    let header = inputs::header_event(cfg, &inputs);
    run_dir::check_run_dir(cfg)?;
    if cfg.dry_run {
        return dry_run::dry_run(cfg, inputs.candidate_bytes, &inputs.aligned_path, reporter);
    }
    let resumed = run_dir::resume(cfg, &header, reporter)?;
    let id = launch::search_id(&cfg.run);
    let mut launcher: Box<dyn launch::Launcher> = match &cfg.slurm {
        Some(options) => Box::new(launch::slurm::Slurm::new(options, &id, cfg.queue_timeout)),
        None => Box::new(launch::local::Local::new(&id)),
    };
    if cfg.resume {
        // Nothing is evaluated, built or deleted while an evaluator of the earlier run may
        // still read a candidate.
        launcher.recover(&resumed.jobs, cfg.kill_after, reporter)?;
    }
    resumed.check_unrecorded()?;
    let mut search = Search {
        cfg,
        reporter,
        ledger: resumed.ledger,
        trials: resumed.trials,
        created: resumed.created,
        built: resumed.built,
        incomplete: resumed.incomplete,
        leftovers: BTreeSet::new(),
        aligned_path: inputs.aligned_path.clone(),
        next_trial: resumed.next_trial,
        started: Instant::now(),
        launcher,
        cluster_failures: 0,
        id,
    };
    drop(inputs);
    search.go()
}
