//! How a search ends: the best α, the summary (`--json`, RUN/summary.json, RUN/search.svg),
//! the rebuild command, the warnings and errors of its verdict.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::ledger::State;
use super::plot;
use super::rule::{self, Lat, Settings, Status};
use super::{alpha_path, Search};
use crate::pairing::DtypeChoice;
use crate::reporter::Reporter;
use crate::text::path_json;

/// How a search ended.
pub struct Verdict {
    pub status: Status,
    /// The best α, its score, and where its candidate is, in words.
    pub best: Option<(Lat, f64, String)>,
    pub evaluations: usize,
    /// RUN/summary.json's content.
    pub summary: Value,
}

/// Warns about a verdict that needs the user's attention (flat, edge, no gain, budget).
pub fn status_warning(reporter: &dyn Reporter, status: Status, settings: &Settings) {
    match status {
        Status::Flat => reporter.warn(format!(
            "the scores around the best alpha are within --tie {} of it (flat): the evaluator cannot tell these α apart; a larger dev set or a less noisy score would",
            settings.tie
        )),
        Status::Edge => reporter.warn(format!(
            "the best alpha is at the edge of the search range {}:{}; widen it with --bounds",
            settings.lower, settings.upper
        )),
        Status::NoGain => reporter.warn(
            "no candidate scored better than the --aligned model itself (alpha = 0): extrapolation does not help this model on this evaluator".into(),
        ),
        Status::Budget => reporter.warn(format!(
            "stopped after --max-evals {} evaluations before the best alpha was bracketed; resume with a larger --max-evals",
            settings.max_evals
        )),
        _ => {}
    }
}

impl Search<'_> {
    pub(super) fn baseline_score(&self) -> Option<f64> {
        self.trials
            .iter()
            .filter(|t| t.alpha.0 == 0)
            .find_map(|t| t.end.as_ref().filter(|e| e.state == State::Ok)?.score)
    }

    fn best(&self) -> Option<(Lat, f64)> {
        let view = rule::View::new(&self.cfg.settings, &self.finished(), &[]);
        let (a, _) = view.best()?;
        let raw = self
            .trials
            .iter()
            .filter(|t| t.alpha == a)
            .find_map(|t| t.end.as_ref().filter(|e| e.state == State::Ok)?.score)?;
        Some((a, raw))
    }

    pub(super) fn evaluations(&self) -> usize {
        self.trials.len()
    }

    /// The summary object (`--json` and RUN/summary.json); `status` is `None` mid-search.
    fn summary(&self, status: Option<Status>) -> Value {
        let best = self.best();
        let trials: Vec<Value> = self
            .trials
            .iter()
            .map(|t| {
                let e = t.end.as_ref();
                json!({
                    "trial": t.trial,
                    "alpha": t.alpha.to_f64(),
                    "state": e.map(|e| e.state.name()),
                    "score": e.and_then(|e| e.score),
                    "seconds": e.map(|e| e.seconds),
                    "output": path_json(&t.output),
                    "exit": e.and_then(|e| e.exit),
                })
            })
            .collect();
        let best_output = best.map(|(a, _)| self.output_of(a));
        json!({
            "status": status.map(Status::name),
            "best": best.map(|(a, s)| json!({
                "alpha": a.to_f64(),
                "score": s,
                "output": best_output.as_deref().map(path_json),
                "kept": best_output.as_ref().is_some_and(|p| p.exists()),
            })),
            "baseline": self.baseline_score().map(|s| json!({"score": s, "output": path_json(&self.aligned_path)})),
            "evaluations": self.evaluations(),
            "minimize": self.cfg.minimize,
            "trials": trials,
            "kept": self
                .created
                .iter()
                .filter(|p| p.exists() && !self.leftovers.contains(*p))
                .map(|p| path_json(p))
                .collect::<Vec<_>>(),
            "left": self
                .leftovers
                .iter()
                .filter(|p| p.exists())
                .map(|p| path_json(p))
                .collect::<Vec<_>>(),
            "rebuild": best.filter(|(a, _)| a.0 != 0).map(|(a, _)| self.rebuild_command(a)),
            "rebuild_any": self.rebuild_command_template(),
            "run": path_json(&self.cfg.run),
            "seconds": self.started.elapsed().as_secs_f64(),
        })
    }

    fn output_of(&self, a: Lat) -> PathBuf {
        if a.0 == 0 {
            self.aligned_path.clone()
        } else {
            alpha_path(&self.cfg.output, a)
        }
    }

    /// `expo extrapolate …` that rebuilds the candidate of α bit for bit.
    fn rebuild_command(&self, a: Lat) -> String {
        self.rebuild_with(&a.to_string(), &alpha_path(&self.cfg.output, a))
    }

    fn rebuild_command_template(&self) -> String {
        self.rebuild_with("ALPHA", &self.cfg.output)
    }

    fn rebuild_with(&self, alpha: &str, output: &Path) -> String {
        use std::os::unix::ffi::OsStrExt;
        let q = |b: &[u8]| String::from_utf8_lossy(&crate::text::shell_quote(b)).into_owned();
        let mut c = format!(
            "expo extrapolate --sft {} --aligned {} --alpha {} --output {}",
            q(self.cfg.sft.as_os_str().as_bytes()),
            q(self.cfg.aligned.as_os_str().as_bytes()),
            alpha,
            q(output.as_os_str().as_bytes())
        );
        for r in &crate::plan::rule_chain(&self.cfg.skip, &self.cfg.alpha_for) {
            if let Some((flag, value)) = r.spelling.split_once(' ') {
                c.push_str(&format!(" {flag} {}", q(value.as_bytes())));
            }
        }
        if self.cfg.dtype != DtypeChoice::Auto {
            c.push_str(&format!(" --dtype {}", self.cfg.dtype.name()));
        }
        if let Some(n) = self.cfg.max_shard_size {
            c.push_str(&format!(" --max-shard-size {n}"));
        }
        c
    }

    /// Writes RUN/summary.json and RUN/search.svg (atomically).
    pub(super) fn write_outputs(&self, status: Option<Status>) -> Result<()> {
        let summary = self.summary(status);
        let mut text = serde_json::to_string_pretty(&summary)?;
        text.push('\n');
        write_atomic(&self.cfg.run.join("summary.json"), text.as_bytes())?;
        let points: Vec<plot::Point> = self
            .trials
            .iter()
            .filter_map(|t| {
                let e = t.end.as_ref()?;
                Some(plot::Point {
                    alpha: t.alpha.to_f64(),
                    score: if e.state == State::Ok { e.score } else { None },
                })
            })
            .collect();
        let svg = plot::svg(
            &points,
            self.baseline_score(),
            self.best().map(|(a, s)| (a.to_f64(), s)),
        );
        write_atomic(&self.cfg.run.join("search.svg"), svg.as_bytes())?;
        Ok(())
    }

    pub(super) fn finish(&mut self, status: Status) -> Result<std::process::ExitCode> {
        self.ledger.append(&json!({
            "event": "done",
            "status": status.name(),
            "evaluations": self.evaluations(),
        }))?;
        self.write_outputs(Some(status))?;
        self.check_scored(status)?;
        status_warning(self.reporter, status, &self.cfg.settings);
        let verdict = Verdict {
            status,
            best: self.best().map(|(a, s)| (a, s, self.where_is(a))),
            evaluations: self.evaluations(),
            summary: self.summary(Some(status)),
        };
        self.reporter.finished(&verdict)?;
        Ok(std::process::ExitCode::SUCCESS)
    }

    /// The error of a search that ended without a usable score.
    fn check_scored(&self, status: Status) -> Result<()> {
        match status {
            Status::Failures => {
                anyhow::bail!(
                    "{} trials failed even after {} retr{} (--max-failures {}); the logs are in {}",
                    self.trials
                        .iter()
                        .filter(|t| t.end.as_ref().is_some_and(|e| e.state == State::Failed))
                        .map(|t| t.alpha)
                        .collect::<BTreeSet<_>>()
                        .len(),
                    self.cfg.settings.retries,
                    if self.cfg.settings.retries == 1 {
                        "y"
                    } else {
                        "ies"
                    },
                    self.cfg.settings.max_failures,
                    self.cfg.run.join("trials").display()
                );
            }
            Status::NoScore => {
                anyhow::bail!(
                    "no candidate could be scored (every trial was unusable or failed); the logs are in {}",
                    self.cfg.run.join("trials").display()
                );
            }
            _ => Ok(()),
        }
    }

    /// Where the candidate of α is, for the final line.
    fn where_is(&self, a: Lat) -> String {
        let out = self.output_of(a);
        if a.0 == 0 {
            format!("the --aligned model {}", out.display())
        } else if out.exists() {
            format!("kept in {}", out.display())
        } else {
            format!("rebuild it with: {}", self.rebuild_command(a))
        }
    }
}

/// Writes `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
