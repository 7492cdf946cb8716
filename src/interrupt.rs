//! Ctrl-C and SIGTERM: the first signal asks the run to stop and clean up; a second one
//! removes the temporary output directory at once and exits.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set when the user asked expo to stop.
static CANCEL: AtomicBool = AtomicBool::new(false);

/// Exit code after an interrupt (128 + SIGINT, the shell convention).
pub const EXIT_INTERRUPTED: u8 = 130;

/// The run was interrupted by a signal.
#[derive(Debug, thiserror::Error)]
#[error("interrupted; the output was not written")]
pub struct Interrupted;

/// Installs the handler for SIGINT, SIGTERM and SIGHUP. Safe to call more than once.
pub fn install() {
    // A second installation fails harmlessly (in tests, or if a caller already has one).
    let _ = ctrlc::set_handler(|| {
        if CANCEL.swap(true, Ordering::SeqCst) {
            crate::output::remove_active_staging();
            std::process::exit(EXIT_INTERRUPTED as i32);
        }
    });
}

/// The flag workers poll.
pub fn flag() -> &'static AtomicBool {
    &CANCEL
}

/// Fails with [`Interrupted`] once a signal arrived.
pub fn check() -> Result<(), Interrupted> {
    if CANCEL.load(Ordering::Relaxed) {
        Err(Interrupted)
    } else {
        Ok(())
    }
}
