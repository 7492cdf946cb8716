//! Candidates: where each α's model is, building a batch of them in one pass, and deleting
//! the ones out of contention.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::json;

use super::ledger::{self, End, Trial};
use super::rule::{self, Lat, Outcome};
use super::{Abort, Search};
use crate::build::{self, Settings as BuildSettings};
use crate::interrupt;
use crate::output::NotRemoved;
use crate::reporter::Quiet;
use crate::sys::FileId;

/// The trials of a batch, recorded as started, and the α whose candidates to build.
pub(super) struct Planned {
    pub(super) trials: Vec<Trial>,
    pub(super) to_build: Vec<Lat>,
}

/// Where a trial's candidate is.
pub(super) struct Candidate {
    pub(super) output: PathBuf,
    /// Made by expo (not the `--aligned` model).
    pub(super) created: bool,
    /// Still to build.
    pub(super) build: bool,
}

impl Search<'_> {
    /// The candidate of α: the `--aligned` model for α = 0, else the `--output` directory,
    /// to build unless this search built it earlier. A directory expo did not make is an
    /// error.
    pub(super) fn candidate(&mut self, a: Lat) -> Result<Candidate, Abort> {
        if a.0 == 0 {
            return Ok(Candidate {
                output: self.aligned_path.clone(),
                created: false,
                build: false,
            });
        }
        let p = alpha_path(&self.cfg.output, a);
        let ours = self.created.contains(&p);
        // Built earlier in this search (an unfinished or retried trial), still the very
        // directory expo built, and complete.
        let built = ours && self.is_complete(&p);
        if !built && ours && p.exists() {
            // A candidate of this search whose deletion was cut short: finish it.
            self.delete(&p).map_err(Abort::Broken)?;
        }
        if !built && p.exists() && !is_empty_dir(&p) {
            return Err(Abort::Broken(anyhow::anyhow!(
                "{} already exists and was not made by this search; remove it, or choose another --output",
                p.display()
            )));
        }
        Ok(Candidate {
            output: p,
            created: true,
            build: !built,
        })
    }

    /// Builds the candidates of `planned` with the extrapolation engine, in one pass.
    pub(super) fn build_candidates(&mut self, planned: &Planned) -> Result<(), Abort> {
        for &a in &planned.to_build {
            if let Some(parent) = alpha_path(&self.cfg.output, a).parent() {
                if !parent.as_os_str().is_empty() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("creating {}", parent.display()))
                        .map_err(Abort::Broken)?;
                }
            }
        }
        let settings = self.build_settings(&planned.to_build);
        crate::failpoint::pause("search-build");
        match build::build(&settings, &Quiet(self.reporter)) {
            Ok(_) => {
                crate::failpoint::pause("search-built");
                for &a in &planned.to_build {
                    self.record_built(&alpha_path(&self.cfg.output, a))
                        .map_err(Abort::Broken)?;
                }
                Ok(())
            }
            Err(e) if e.downcast_ref::<interrupt::Interrupted>().is_some() => {
                // What the pass completed before it stopped is this search's.
                for &a in &planned.to_build {
                    let p = alpha_path(&self.cfg.output, a);
                    if p.join(crate::sidefiles::PROVENANCE_NAME).is_file() {
                        let _ = self.record_built(&p);
                    }
                }
                self.abandon(&planned.trials);
                Err(Abort::Interrupted)
            }
            Err(e) => Err(Abort::Broken(e.context(format!(
                "building the candidates for alpha {}",
                planned
                    .to_build
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))),
        }
    }

    /// Records `trials`, none of which started, as interrupted, and removes what was built.
    fn abandon(&mut self, trials: &[Trial]) {
        for trial in trials {
            let end = End::interrupted();
            let _ = self.ledger.append(&ledger::end_event(trial, &end));
            let needed = self.trials.iter().any(|t| t.output == trial.output);
            if trial.created && !needed && self.created.contains(&trial.output) {
                let _ = self.delete(&trial.output);
            }
        }
    }

    /// The build settings of the candidates of `alphas`: what `expo extrapolate` would be
    /// given for them.
    fn build_settings(&self, alphas: &[Lat]) -> BuildSettings {
        BuildSettings {
            sft: self.cfg.sft.clone(),
            aligned: self.cfg.aligned.clone(),
            alphas: alphas.iter().map(|a| a.to_f64()).collect(),
            alpha_for: self.cfg.alpha_for.clone(),
            skip: self.cfg.skip.clone(),
            output: self.cfg.output.clone(),
            max_shard_size: self.cfg.max_shard_size,
            dtype: self.cfg.dtype,
            force: false,
            threads: self.cfg.threads,
            warn_relative_change: f64::INFINITY,
            // An adapter as --aligned makes adapter candidates (the default kind).
            as_kind: None,
            command: self.cfg.command.clone(),
        }
    }

    /// Deletes the candidates out of contention (only ones expo built).
    pub(super) fn tidy(&mut self) -> Result<(), Abort> {
        let Some(keep) = self.cfg.keep else {
            return Ok(());
        };
        let finished = self.finished();
        let view = rule::View::new(&self.cfg.settings, &finished, &[]);
        let mut ranked: Vec<(Lat, f64)> = Vec::new();
        for (a, o) in &finished {
            if let Outcome::Ok(s) = o {
                if !ranked.iter().any(|(b, _)| b == a) {
                    ranked.push((*a, *s));
                }
            }
        }
        ranked.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
        let kept: Vec<Lat> = ranked.iter().take(keep).map(|(a, _)| *a).collect();
        let mut doomed = Vec::new();
        for t in &self.trials {
            if !self.created.contains(&t.output) || kept.contains(&t.alpha) {
                continue;
            }
            if !view.is_final(t.alpha) {
                continue;
            }
            doomed.push(t.output.clone());
        }
        doomed.sort();
        doomed.dedup();
        for p in doomed {
            self.delete(&p).map_err(Abort::Broken)?;
        }
        Ok(())
    }

    /// Records in the ledger that the candidate at `p` was built: the identity of the
    /// directory there, the only one [`Search::delete`] will remove.
    fn record_built(&mut self, p: &Path) -> Result<()> {
        let meta = std::fs::symlink_metadata(p)
            .with_context(|| format!("checking the candidate {}", p.display()))?;
        let id = FileId::of(&meta);
        self.ledger.append(&ledger::built_event(p, id))?;
        self.built.insert(p.to_path_buf(), id);
        self.incomplete.remove(p);
        Ok(())
    }

    /// A candidate this search built, still the very directory it built (not moved or
    /// swapped for another) and complete: its deletion never started, its provenance is there.
    fn is_complete(&self, p: &Path) -> bool {
        let Some(id) = self.built.get(p) else {
            return false;
        };
        !self.incomplete.contains(p)
            && std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir() && FileId::of(&m) == *id)
            && p.join(crate::sidefiles::PROVENANCE_NAME).is_file()
    }

    /// Deletes the candidate at `p` if it is the very directory this search built, through
    /// a directory handle. A candidate moved or replaced since is left alone, and one that
    /// could not be deleted is left (not kept), each with a warning; only a ledger that
    /// cannot be written is an error.
    pub(super) fn delete(&mut self, p: &Path) -> Result<()> {
        let Some(&id) = self.built.get(p) else {
            if p.exists() {
                self.reporter.warn(format!(
                    "left {} in place: the ledger does not record that this search built it",
                    p.display()
                ));
            }
            self.created.remove(p);
            return Ok(());
        };
        // Marked as not built before anything is removed: the ledger says the deletion
        // started, and the provenance goes first (synced), so that a deletion cut short
        // (a second Ctrl-C, kill -9) leaves a candidate that is never taken as complete.
        self.ledger
            .append(&json!({"event": "deleting", "output": crate::text::path_json(p)}))?;
        self.incomplete.insert(p.to_path_buf());
        let provenance = std::ffi::CString::new(crate::sidefiles::PROVENANCE_NAME)?;
        let outcome = crate::output::remove_identified(p, id, Some(&provenance), || {
            crate::failpoint::pause("search-delete")
        });
        match outcome {
            Ok(()) | Err(NotRemoved::Gone) => {}
            Err(NotRemoved::Replaced) => {
                self.reporter.warn(format!(
                    "left {} in place: it is no longer the directory this search built (moved, or a link on its path was swapped)",
                    p.display()
                ));
                self.created.remove(p);
                self.built.remove(p);
                return Ok(());
            }
            Err(NotRemoved::Io(e)) => {
                self.reporter.warn(format!(
                    "could not delete the candidate {} ({e}); it is left on disk, not kept",
                    p.display()
                ));
                // The search goes on: a candidate left on disk costs space, not results.
                self.leftovers.insert(p.to_path_buf());
                return Ok(());
            }
        }
        self.created.remove(p);
        self.built.remove(p);
        self.incomplete.remove(p);
        self.leftovers.remove(p);
        self.ledger
            .append(&json!({"event": "delete", "output": crate::text::path_json(p)}))?;
        Ok(())
    }
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_none())
}

/// The candidate directory of α.
pub fn alpha_path(template: &Path, a: Lat) -> PathBuf {
    crate::alpha::expand_output(template, a.to_f64())
}
