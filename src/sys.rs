//! Facts about the system that several modules need (kept here so that they do not import
//! one another for them).

/// The system's page size (4096 when it cannot be read).
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}
