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

/// What a file is, whatever its name: its device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(meta: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// Which file, and which version of it: its identity and modification time, recorded when
/// it is checked and compared when it is used, so that a file replaced or rewritten in
/// between is noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileVersion {
    pub id: FileId,
    pub mtime: i64,
    pub mtime_nsec: i64,
}

impl FileVersion {
    pub fn of(meta: &std::fs::Metadata) -> FileVersion {
        use std::os::unix::fs::MetadataExt;
        FileVersion {
            id: FileId::of(meta),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }
}

/// Opens `path` for reading without blocking (a FIFO opens at once) and without acquiring
/// a controlling terminal. What was opened may be anything: the caller checks it (`fstat`)
/// before reading, so that a FIFO or a device named by a hostile input never makes expo
/// block or read forever.
pub fn open_nonblocking(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

/// Writes `bytes` at `offset` of an output file and starts their write-back (see
/// [`start_writeback`]): how every chunk of an output is written.
pub fn write_out(file: &std::fs::File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(bytes, offset)?;
    start_writeback(file, offset, bytes.len() as u64);
    Ok(())
}

/// Asks the kernel to start writing `len` bytes of `file` at `offset` to the disk, without
/// waiting for it.
///
/// Outputs are fsynced once they are complete. Left alone, their dirty pages stay in memory
/// until then (a checkpoint is usually below the kernel's background write-back threshold),
/// so the disk idles while the chunks are computed and the whole file is written during the
/// final fsync. Started chunk by chunk, the disk works while the CPU computes and the final
/// fsync waits only for the last chunks. Errors are left to that fsync, which reports them.
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (
            libc::off64_t::try_from(offset),
            libc::off64_t::try_from(len),
        ) else {
            return;
        };
        // SAFETY: sync_file_range only reads its arguments; the descriptor is open for the
        // duration of the call.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}
