//! Telling the user what is happening: warnings and the summary on stderr, a progress bar
//! when stderr is a terminal, JSON on stdout.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub mod adapter;
pub mod diff;
pub mod extrapolate;
pub mod inspect;
pub mod search;

/// Set once a command started printing its JSON result on stdout.
static JSON_PRINTED: AtomicBool = AtomicBool::new(false);

/// Where human output goes, and how much of it.
#[derive(Debug, Clone)]
pub struct Reporter {
    quiet: bool,
    warnings: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Reporter {
    /// A reporter; `quiet` drops the progress bar and the summary.
    pub fn new(quiet: bool) -> Reporter {
        Reporter {
            quiet,
            warnings: Default::default(),
        }
    }

    /// Prints `warning: …` on stderr (even when quiet) and remembers it for `--json`.
    pub fn warn(&self, message: impl Into<String>) {
        let message = message.into();
        let _ = writeln!(std::io::stderr(), "warning: {message}");
        self.warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(message);
    }

    /// The warnings printed so far.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Prints an informational line on stderr unless quiet.
    pub fn info(&self, message: impl AsRef<str>) {
        if !self.quiet {
            let _ = writeln!(std::io::stderr(), "{}", message.as_ref());
        }
    }

    /// A byte progress bar on stderr, hidden unless stderr is a terminal and not quiet.
    pub fn progress(&self, total_bytes: u64) -> ProgressBar {
        if self.quiet || !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, ETA {eta})",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }
}

/// Formats a byte count for people (binary units).
pub fn bytes(n: u64) -> String {
    HumanBytes(n).to_string()
}

pub use crate::text::number;

/// Writes one JSON value and a newline to stdout.
pub fn print_json(value: &serde_json::Value) -> std::io::Result<()> {
    mark_json_printed();
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    out.flush()
}

/// Writes a command's text result to stdout.
pub fn print_text(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Records that the command's JSON result is going to stdout: a command that streams its
/// JSON itself (instead of calling [`print_json`]) calls this before its first byte, so
/// that a failure after it does not print a second object.
pub fn mark_json_printed() {
    JSON_PRINTED.store(true, Ordering::Relaxed);
}

/// True once [`print_json`] or [`mark_json_printed`] was called: the command's JSON object is on stdout (or was
/// attempted), so a failure must not print a second one.
pub fn json_printed() -> bool {
    JSON_PRINTED.load(Ordering::Relaxed)
}

/// The one JSON object `--json` prints when a command fails before printing its own:
/// `{"ok": false, "error": "…"}`, the error with its whole chain of causes, as on stderr.
pub fn failure_json(err: &anyhow::Error) -> serde_json::Value {
    serde_json::json!({"ok": false, "error": format!("{err:#}")})
}
