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

/// Installs a SIGBUS handler that reports an input changed under expo's memory map.
///
/// Reading a mapped file that another process truncated raises SIGBUS, which would
/// otherwise kill expo with no explanation. The handler can only do async-signal-safe
/// work: it prints a fixed message and exits with status 1. The temporary output
/// directory it leaves behind is recognised and removed by the next run.
pub fn install_sigbus_handler() {
    extern "C" fn on_sigbus(_: libc::c_int) {
        const MSG: &[u8] = b"expo: error: an input file was truncated or replaced while expo was reading it (SIGBUS); nothing was written at the output path\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is a static buffer.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(1);
        }
    }
    // SAFETY: the sigaction struct is zero-initialised (a valid value), its mask emptied,
    // and the handler is an `extern "C" fn(c_int)` as SA_SIGINFO is not set.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
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
