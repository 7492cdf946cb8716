//! What `expo search` prints: the live table of trials and the verdict on stderr, the
//! `--dry-run` plan, and the `--json` objects on stdout.

use std::io::Write as _;

use serde_json::json;

use expo::search::ledger::Trial;
use expo::search::rule::{Lat, Status};
use expo::search::{DryRun, Observer, Verdict};

use crate::report::{self, Reporter};

/// The terminal as a search's observer: warnings on stderr, the live table and the verdict
/// on stderr, and with `--json` the result on stdout.
pub struct Terminal {
    reporter: Reporter,
    json: bool,
}

impl Terminal {
    /// The observer of a search; `json`: print the verdict (or dry run) on stdout too.
    pub fn new(json: bool) -> Terminal {
        Terminal {
            reporter: Reporter::new(false),
            json,
        }
    }
}

impl expo::reporter::Reporter for Terminal {
    fn warn(&self, message: String) {
        self.reporter.warn(message);
    }
}

impl Observer for Terminal {
    fn dry_run(&self, plan: &DryRun) -> std::io::Result<()> {
        dry_run(plan, self.json)
    }

    fn table_header(&self) {
        table_header();
    }

    fn trial_ended(&self, trial: &Trial, baseline: Option<f64>) {
        trial_row(trial, baseline);
    }

    fn finished(&self, verdict: &Verdict) -> std::io::Result<()> {
        if let Some((a, s, where_)) = &verdict.best {
            best_line(*a, *s, verdict.status, verdict.evaluations, where_);
        }
        if self.json {
            report::print_json(&verdict.summary)?;
        }
        Ok(())
    }
}

/// The header of the live table of trials.
pub fn table_header() {
    let _ = writeln!(
        std::io::stderr(),
        "{:>5}  {:>8}  {:>13}  {:>13}  {:>8}  state",
        "trial",
        "alpha",
        "score",
        "Δ vs θ1",
        "time"
    );
}

/// One row of the live table: a trial that ended (nothing for one still running); the Δ
/// column is its score minus the `baseline` score (α = 0).
pub fn trial_row(t: &Trial, baseline: Option<f64>) {
    let Some(e) = &t.end else { return };
    let delta = match (e.score, baseline) {
        (Some(s), Some(b)) if t.alpha.0 != 0 => expo::text::difference(s, b),
        _ => "".into(),
    };
    let _ = writeln!(
        std::io::stderr(),
        "{:>5}  {:>8}  {:>13}  {:>13}  {:>8}  {}",
        t.trial,
        t.alpha.to_string(),
        e.score.map(fmt_score).unwrap_or_default(),
        delta,
        fmt_secs(e.seconds),
        e.state.name()
    );
}

/// The final line: the best α, its score, and where its candidate is (`where_`).
pub fn best_line(alpha: Lat, score: f64, status: Status, evaluations: usize, where_: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "expo: best alpha = {alpha} (score {}, {}) after {evaluations} evaluations; {where_}",
        fmt_score(score),
        status.name(),
    );
}

/// Prints the dry run: the space and directories on stderr with one line per command, and
/// with `json` the same as an object on stdout.
pub fn dry_run(d: &DryRun, json: bool) -> std::io::Result<()> {
    let mut err = std::io::stderr().lock();
    writeln!(
        err,
        "expo: dry run: candidates of {} each; {} for {} jobs + {} kept, {} free in {}",
        report::bytes(d.candidate_bytes),
        report::bytes(d.need),
        d.jobs,
        d.keep.map_or("all".to_string(), |k| k.to_string()),
        report::bytes(d.free),
        d.out_parent.display()
    )?;
    writeln!(
        err,
        "expo: run directory {} (in {})",
        d.run.display(),
        d.run_parent.display()
    )?;
    for (trial, a, command) in &d.commands {
        writeln!(err, "  trial {}  alpha {:<6} {}", trial, a, command)?;
    }
    if json {
        let commands: Vec<_> = d
            .commands
            .iter()
            .map(|(trial, a, c)| json!({"trial": trial, "alpha": a.to_f64(), "command": c}))
            .collect();
        report::print_json(&json!({
            "dry_run": true,
            "commands": commands,
            "candidate_bytes": d.candidate_bytes,
            "needed_bytes": d.need,
            "free_bytes": d.free,
        }))?;
    }
    Ok(())
}

/// A score for people: six significant digits (see [`expo::text::significant`]).
pub fn fmt_score(s: f64) -> String {
    expo::text::significant(s)
}

pub use expo::text::seconds as fmt_secs;
