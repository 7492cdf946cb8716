//! The run directory: a new search or a resumed one, its ledger opened and replayed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::Value;

use super::ledger::{self, Ledger, State, Trial};
use super::Config;
use crate::error::UsageError;
use crate::reporter::Reporter;
use crate::sys::FileId;

/// `--run` holds a search exactly when `--resume` is given.
pub(super) fn check_run_dir(cfg: &Config) -> Result<()> {
    let ledger_path = cfg.run.join(ledger::NAME);
    let exists = ledger_path.exists();
    if exists && !cfg.resume {
        return Err(UsageError(format!(
            "{} already holds a search; add --resume to continue it, or choose another --run",
            cfg.run.display()
        ))
        .into());
    }
    if !exists && !cfg.resume {
        refuse_foreign_dir(&cfg.run)?;
    }
    if !exists && cfg.resume {
        return Err(UsageError(format!(
            "--resume: {} holds no search ({} is missing)",
            cfg.run.display(),
            ledger_path.display()
        ))
        .into());
    }
    Ok(())
}

/// A new search writes only into a new or empty directory: a non-empty one without a
/// ledger holds the user's files, which expo's names (`summary.json`, `search.svg`,
/// `trials/`, the candidates …) could replace or remove.
fn refuse_foreign_dir(run: &std::path::Path) -> Result<()> {
    let meta = match std::fs::metadata(run) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("--run {}", run.display()))),
    };
    if !meta.is_dir() {
        return Err(UsageError(format!(
            "--run {} exists and is not a directory; choose a new or empty directory",
            run.display()
        ))
        .into());
    }
    let mut entries = std::fs::read_dir(run)
        .with_context(|| format!("reading the run directory {}", run.display()))?;
    if entries.next().is_some() {
        return Err(UsageError(format!(
            "--run {} is not empty and holds no search (no {}); expo writes its ledger, summary.json, search.svg, trials/ and candidates there, so it needs a new or empty directory: choose another --run",
            run.display(),
            ledger::NAME
        ))
        .into());
    }
    Ok(())
}

/// What a search continues from: the ledger, opened and replayed.
pub(super) struct Resumed {
    pub(super) ledger: Ledger,
    /// The finished trials (interrupted ones run again).
    pub(super) trials: Vec<Trial>,
    /// Candidates expo built and has not deleted.
    pub(super) created: BTreeSet<PathBuf>,
    /// The identity of each candidate built and not deleted.
    pub(super) built: BTreeMap<PathBuf, FileId>,
    /// Candidates whose deletion started and did not finish.
    pub(super) incomplete: BTreeSet<PathBuf>,
    pub(super) next_trial: u64,
    /// Candidates a trial started to build, not recorded as built, with something at their
    /// place: the search refuses to go on once the earlier run's evaluators are stopped.
    pub(super) unrecorded: Vec<PathBuf>,
    /// Each `job` event (how to find an earlier run's evaluators again), by trial.
    pub(super) jobs: Vec<(u64, Value)>,
}

impl Resumed {
    /// Refuses to go on when something sits where an unrecorded candidate was being built:
    /// it cannot be told from something the user put there, so it is neither used nor
    /// deleted; the user decides.
    pub(super) fn check_unrecorded(&self) -> Result<()> {
        if let Some(p) = self.unrecorded.first() {
            anyhow::bail!(
                "{} is where this search was building a candidate when it was stopped, but the ledger does not record it as built, so expo cannot tell it from something you put there and will neither use nor delete it; remove or move it (`rm -r` it if it is the interrupted candidate), then --resume again",
                p.display()
            );
        }
        Ok(())
    }
}

/// Opens the ledger in `--run` (made if missing), checks a resumed search's header against
/// `header`, appends it, and replays what the ledger holds.
pub(super) fn resume(cfg: &Config, header: &Value, reporter: &dyn Reporter) -> Result<Resumed> {
    std::fs::create_dir_all(&cfg.run)
        .with_context(|| format!("creating the run directory {}", cfg.run.display()))?;
    let mut ledger = Ledger::open(&cfg.run)?;
    let replay = ledger.replay()?;
    if replay.torn_tail {
        reporter.warn(format!(
            "{}: ignored its last line, cut short when expo was killed",
            ledger.path.display()
        ));
        // The next event goes right after the last complete line.
        ledger.drop_torn_tail()?;
    }
    for line in &replay.damaged {
        reporter.warn(format!(
            "{}: ignored line {line}, which is not a complete event (cut short by a failed write); the events after it are used",
            ledger.path.display()
        ));
    }
    if let Some(was) = &replay.header {
        ledger::check_header(&ledger.path, was, header).map_err(|e| UsageError(e.to_string()))?;
    }
    ledger.append(header)?;
    // Expo's candidates: the ones it recorded as built (with their identity) and not
    // deleted, and the ones whose deletion it started.
    let built: BTreeMap<PathBuf, FileId> = replay.built.iter().cloned().collect();
    // A candidate started but not recorded as built (expo was killed during its build).
    let unrecorded: Vec<PathBuf> = replay
        .unconfirmed
        .iter()
        .filter(|p| std::fs::symlink_metadata(p).is_ok())
        .cloned()
        .collect();
    let incomplete: BTreeSet<PathBuf> = replay.deleting.iter().cloned().collect();
    let created: BTreeSet<PathBuf> = built.keys().chain(&incomplete).cloned().collect();
    // Trial numbers go on after every trial the ledger knows, interrupted ones included.
    let next_trial = replay.trials.iter().map(|t| t.trial).max().unwrap_or(0) + 1;
    // Finished trials stay; started-but-unfinished and interrupted ones run again.
    let trials: Vec<Trial> = replay
        .trials
        .into_iter()
        .filter(|t| {
            t.end
                .as_ref()
                .is_some_and(|e| e.state != State::Interrupted)
        })
        .collect();
    Ok(Resumed {
        ledger,
        trials,
        created,
        built,
        incomplete,
        next_trial,
        unrecorded,
        jobs: replay.jobs,
    })
}

/// Makes the trial's work directory `workdir` new and empty: anything already there (left
/// by an earlier search whose ledger lost its trials) is moved aside to `N.old-K`, so that
/// no file in it is read as this trial's.
pub(super) fn fresh_workdir(workdir: &std::path::Path) -> Result<()> {
    if let Some(parent) = workdir.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    if std::fs::symlink_metadata(workdir).is_ok() {
        let name = workdir.file_name().unwrap_or_default().to_string_lossy();
        let aside = (1..)
            .map(|k| workdir.with_file_name(format!("{name}.old-{k}")))
            .find(|p| std::fs::symlink_metadata(p).is_err())
            .unwrap_or_default();
        std::fs::rename(workdir, &aside).with_context(|| {
            format!(
                "moving the old work directory {} aside to {}",
                workdir.display(),
                aside.display()
            )
        })?;
    }
    std::fs::create_dir(workdir).with_context(|| format!("creating {}", workdir.display()))
}
