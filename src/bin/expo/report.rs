//! Telling the user what is happening: warnings and the summary on stderr, a progress bar
//! when stderr is a terminal, JSON on stdout.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub mod adapter;
pub mod diff;
pub mod extrapolate;
pub mod inspect;
pub mod search;

/// Set once a command started printing its JSON result on stdout.
static JSON_PRINTED: AtomicBool = AtomicBool::new(false);

/// The terminal: warnings on stderr (even when quiet, and remembered for `--json`), notes
/// and a byte progress bar on stderr unless quiet (the bar only on a terminal).
#[derive(Debug)]
pub struct Reporter {
    quiet: bool,
    warnings: Mutex<Vec<String>>,
    bar: Mutex<Option<ProgressBar>>,
}

impl Reporter {
    /// A reporter; `quiet` drops the progress bar and the summary.
    pub fn new(quiet: bool) -> Reporter {
        Reporter {
            quiet,
            warnings: Mutex::default(),
            bar: Mutex::default(),
        }
    }

    /// Prints `warning: …` on stderr (even when quiet) and remembers it for `--json`.
    pub fn warn(&self, message: impl Into<String>) {
        expo::reporter::Reporter::warn(self, message.into());
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
    fn progress(&self, total_bytes: u64) -> ProgressBar {
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

    fn bar(&self) -> std::sync::MutexGuard<'_, Option<ProgressBar>> {
        self.bar.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl expo::reporter::Reporter for Reporter {
    fn warn(&self, message: String) {
        let _ = writeln!(std::io::stderr(), "warning: {message}");
        self.warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(message);
    }

    fn note(&self, message: &str) {
        self.info(message);
    }

    fn start(&self, total_bytes: u64) {
        *self.bar() = Some(self.progress(total_bytes));
    }

    fn advance(&self, bytes: u64) {
        if let Some(bar) = &*self.bar() {
            bar.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.bar().take() {
            bar.finish_and_clear();
        }
    }
}

pub use expo::text::bytes;

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
