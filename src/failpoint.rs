//! Test-only pause points that make races deterministic.
//!
//! A race test needs expo to stop at the racy step (after the output was validated, before
//! it is replaced; after side files were checked, before they are copied …) while the test
//! swaps a path, and then to go on. Sleeps make such tests slow and flaky; a handshake makes
//! them exact. With the `failpoints` feature (enabled only for `cargo test` through the
//! crate's dev-dependency on itself, so never in a release binary), [`pause`] reads two
//! environment variables:
//!
//! - `EXPO_FAILPOINT`: the name of the point to stop at (one name, or several separated by
//!   commas);
//! - `EXPO_FAILPOINT_DIR`: a directory for the handshake files.
//!
//! When the run reaches a named point it creates `DIR/NAME.reached`, then waits until the
//! test creates `DIR/NAME.continue` (or a signal asks expo to stop), and goes on. Without
//! the feature, [`pause`] is an empty inline function.

/// Stops at the point `name` when a test asked for it (see the module docs).
#[cfg(feature = "failpoints")]
pub fn pause(name: &str) {
    use std::time::Duration;
    let Ok(names) = std::env::var("EXPO_FAILPOINT") else {
        return;
    };
    if !names.split(',').any(|n| n == name) {
        return;
    }
    let Some(dir) = std::env::var_os("EXPO_FAILPOINT_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let _ = std::fs::write(dir.join(format!("{name}.reached")), b"");
    let go = dir.join(format!("{name}.continue"));
    // Bounded: a test that never answers does not hang CI forever.
    for _ in 0..60_000 {
        if go.exists() || crate::interrupt::check().is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Stops at the point `name` when a test asked for it (see the module docs).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn pause(_name: &str) {}
