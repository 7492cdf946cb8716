//! What `expo search` prints: the live table of trials and the verdict on stderr, the
//! `--dry-run` plan, and the `--json` objects on stdout.

use std::io::Write as _;
use std::path::Path;

use serde_json::json;

use crate::report::{self, Reporter};
use crate::search::ledger::Trial;
use crate::search::rule::{Lat, Settings, Status};

/// The header of the live table of trials.
pub fn table_header() {
    let _ = writeln!(
        std::io::stderr(),
        "{:>5}  {:>8}  {:>12}  {:>10}  {:>8}  state",
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
        (Some(s), Some(b)) if t.alpha.0 != 0 => format!("{:+.4}", s - b),
        _ => "".into(),
    };
    let _ = writeln!(
        std::io::stderr(),
        "{:>5}  {:>8}  {:>12}  {:>10}  {:>8}  {}",
        t.trial,
        t.alpha.to_string(),
        e.score.map(fmt_score).unwrap_or_default(),
        delta,
        fmt_secs(e.seconds),
        e.state.name()
    );
}

/// Warns about a verdict that needs the user's attention (flat, edge, no gain, budget).
pub fn status_warning(reporter: &Reporter, status: Status, settings: &Settings) {
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
            "no candidate scored better than the --aligned model itself (alpha = 0): extrapolation does not help this model on this evaluator",
        ),
        Status::Budget => reporter.warn(format!(
            "stopped after --max-evals {} evaluations before the best alpha was bracketed; resume with a larger --max-evals",
            settings.max_evals
        )),
        _ => {}
    }
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

/// What `expo search --dry-run` found, to print.
pub struct DryRun<'a> {
    /// The size of one candidate.
    pub candidate_bytes: u64,
    /// The space the search may need.
    pub need: u64,
    /// The space free where the candidates go.
    pub free: u64,
    /// The existing directory the candidates go in.
    pub out_parent: &'a Path,
    pub jobs: usize,
    /// `--keep` (`None`: all).
    pub keep: Option<usize>,
    pub run: &'a Path,
    /// The existing directory the run directory goes in.
    pub run_parent: &'a Path,
    /// The first batch: trial number, α and the evaluator's command line.
    pub commands: Vec<(usize, Lat, String)>,
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

/// A score for people: at most 6 decimals, never `-0`.
pub fn fmt_score(s: f64) -> String {
    let r = (s * 1e6).round() / 1e6;
    // No `-0`.
    format!("{}", if r == 0.0 { 0.0 } else { r })
}

/// Seconds for people: `12.3s`, `4.5m`, `1.2h`.
pub fn fmt_secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{:.1}m", s / 60.0)
    } else {
        format!("{:.1}h", s / 3600.0)
    }
}
