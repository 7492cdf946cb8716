//! The marker file in every staging directory and old output: created, locked, rewritten,
//! and opened by a cleaner (see the module documentation of `output`).

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Seek, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::{io_err, OutputError, STAGING_MARKER};

/// [`STAGING_MARKER`] for the `*at` calls.
pub(super) const MARKER_C: &CStr = c".expo-staging";

/// Creates (or, unless `new`, truncates) the marker file in the open directory `dir`
/// (found at `dir_path`, for messages), locks it, and writes `kind`, the pid and the
/// output's name into it. The content is written only once the lock is held: a marker
/// that a cleaner can lock but finds empty belongs to a run in the middle of creating it.
pub(super) fn create_marker(
    dir: &File,
    dir_path: &Path,
    kind: &str,
    name: &str,
    new: bool,
) -> Result<File, OutputError> {
    let path = dir_path.join(STAGING_MARKER);
    let mut flags = libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_CREAT;
    flags |= if new { libc::O_EXCL } else { libc::O_TRUNC };
    // SAFETY: a valid descriptor and a NUL-terminated name; the mode is an integer.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            MARKER_C.as_ptr(),
            flags,
            0o644 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io_err(&path, "create")(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    lock_exclusive(&file);
    rewrite_marker(&file, kind, name).map_err(io_err(&path, "write"))?;
    Ok(file)
}

/// Replaces a marker's content with `<kind> <pid>` and, on the second line, the output's
/// name (staging names hold only its first [`STAGING_NAME_PART`] bytes), and syncs it.
pub(super) fn rewrite_marker(mut file: &File, kind: &str, name: &str) -> io::Result<()> {
    file.set_len(0)?;
    file.rewind()?;
    file.write_all(format!("{kind} {}\n{name}\n", std::process::id()).as_bytes())?;
    file.sync_data()
}

/// Takes an exclusive `flock` on a file, waiting if needed. Failure (a file system without
/// `flock`) is ignored: a cleaner cannot lock such a marker either, so it never takes the
/// directory for a dead run's.
fn lock_exclusive(file: &File) {
    loop {
        // SAFETY: flock on a file descriptor we own, for as long as `file` lives.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// Takes an exclusive `flock` without waiting: true when no other open file holds one.
pub(super) fn try_lock(file: &File) -> bool {
    // SAFETY: flock on a file descriptor we own; the lock goes with it when it is closed.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Opens the marker in `dir` for locking and reading: a regular file, not through a link,
/// without blocking (a FIFO planted there is not waited on).
pub(super) fn open_marker(dir: &File) -> Option<File> {
    // SAFETY: a valid descriptor and a NUL-terminated name that outlive the call.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            MARKER_C.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.metadata().ok()?.is_file().then_some(file)
}
