//! The one interface through which the library tells its caller what is happening.
//!
//! The library never prints. Warnings, notes and byte progress go to a [`Reporter`] the
//! caller passes in; the command line implements it for the terminal (stderr, a progress
//! bar), a search passes its own, tests collect. Results are returned, not reported.

use std::sync::Mutex;

/// Receives what a long step wants the user to know while it runs.
///
/// Calls may come from worker threads at once (progress), hence `Sync`.
pub trait Reporter: Sync {
    /// A warning: something the user should know that does not stop the step.
    fn warn(&self, message: String);

    /// A note about what is being done (e.g. what a run will write). Default: dropped.
    fn note(&self, _message: &str) {}

    /// A step that moves `total_bytes` starts; [`Reporter::advance`] follows as it goes.
    fn start(&self, _total_bytes: u64) {}

    /// `bytes` more of the step's total were done.
    fn advance(&self, _bytes: u64) {}

    /// The step that [`Reporter::start`] began is over (finished or failed).
    fn finish(&self) {}
}

/// A reporter that keeps the warnings and drops everything else: for callers that report
/// on their own terms (a search's candidates) and for tests.
#[derive(Debug, Default)]
pub struct Collect {
    warnings: Mutex<Vec<String>>,
}

impl Collect {
    /// The warnings received so far, in order.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Reporter for Collect {
    fn warn(&self, message: String) {
        self.warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(message);
    }
}

/// Another reporter's warnings only: for work done on a caller's behalf whose notes and
/// progress would interleave with the caller's own (a search's candidate builds).
pub struct Quiet<'a>(pub &'a dyn Reporter);

impl Reporter for Quiet<'_> {
    fn warn(&self, message: String) {
        self.0.warn(message);
    }
}

/// A byte count in progress: [`Reporter::start`] on creation, [`Reporter::finish`] on drop,
/// so that a step that fails half-way still clears the bar.
pub struct Progress<'a> {
    reporter: &'a dyn Reporter,
}

impl<'a> Progress<'a> {
    /// Starts a step of `total_bytes` on `reporter`.
    pub fn start(reporter: &'a dyn Reporter, total_bytes: u64) -> Progress<'a> {
        reporter.start(total_bytes);
        Progress { reporter }
    }

    /// `bytes` more were done.
    pub fn advance(&self, bytes: u64) {
        self.reporter.advance(bytes);
    }
}

impl Drop for Progress<'_> {
    fn drop(&mut self) {
        self.reporter.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collect_keeps_warnings_in_order() {
        let c = Collect::default();
        c.warn("a".into());
        c.warn("b".into());
        assert_eq!(c.warnings(), ["a", "b"]);
    }
}
