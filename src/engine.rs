//! Streaming the output: input shards are memory-mapped, output shards are created at
//! their final size, and workers fill them chunk by chunk with positioned writes.
//!
//! Work is cut into chunks of about a million elements, handed out in file order from one
//! atomic counter, so every core is busy even when a shard holds a single huge tensor, the
//! inputs are read roughly sequentially, and the memory expo owns is one chunk buffer per
//! worker. Input pages are dropped from the process's mappings as soon as their chunk is
//! done, so resident memory does not grow with the model. A shard is fsynced by the worker
//! that finishes its last chunk, overlapping the flush with work on later shards.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use memmap2::{Mmap, UncheckedAdvice};

use crate::checkpoint::{Checkpoint, TensorLoc};
use crate::dtype::{DtypeClass, FloatDtype};
use crate::kernel::{self, KernelSpec};
use crate::plan::{Plan, TensorPair, Treatment};

/// Elements per chunk of float work.
pub const CHUNK_ELEMENTS: u64 = 1 << 20;
/// Bytes per chunk of copy work.
pub const COPY_CHUNK_BYTES: u64 = 4 << 20;

/// Errors while reading inputs or writing the output.
///
/// The I/O error of [`EngineError::Io`] is its `source()`, not part of its message, so that
/// `{:#}` prints it once.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {op} failed")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    NoSpace { path: PathBuf, reason: String },
    #[error(
        "{path} changed since its header was read (it is now {actual} bytes, expected {expected}, or it was replaced or modified); inputs must not be modified during a run"
    )]
    InputChanged {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path} {what} while expo was reading it; inputs must not be modified during a run")]
    InputModified { path: PathBuf, what: &'static str },
    #[error("tensor `{tensor}` ({dtype}) is not float, so it must be identical in both checkpoints, but it differs (first at byte {offset}); are these two checkpoints of the same model?")]
    ExactTensorDiffers {
        tensor: String,
        dtype: crate::dtype::Dtype,
        offset: u64,
    },
    #[error("tensor `{tensor}`: {count} of {elements} values become infinite or NaN in {dtype} at alpha = {alpha} although --aligned's are finite; use a smaller --alpha or a wider --dtype (e.g. f32)", alpha = short_number(*alpha))]
    Overflow {
        tensor: String,
        count: u64,
        elements: u64,
        dtype: crate::dtype::FloatDtype,
        alpha: f64,
    },
    #[error("tensor `{tensor}`: {count} of {elements} values do not fit in {dtype} (they become infinite) although --aligned's are finite; choose a wider --dtype")]
    CastOverflow {
        tensor: String,
        count: u64,
        elements: u64,
        dtype: crate::dtype::FloatDtype,
    },
    #[error("writing {outputs} outputs at once keeps at least {needed} files open, but the open-files limit is {limit} (`ulimit -n`; {open} are open already); raise the limit (e.g. `ulimit -n {suggest}`) or write fewer outputs per run (at most {fit})")]
    TooManyOpenFiles {
        outputs: usize,
        needed: u64,
        limit: u64,
        open: u64,
        suggest: u64,
        fit: u64,
    },
    #[error("{path} was replaced or removed while expo was writing it; another process is changing expo's temporary directory")]
    OutputReplaced { path: PathBuf },
    #[error("interrupted")]
    Interrupted,
}

/// A number for a message: as written when short, else in scientific notation (`1e300`,
/// not three hundred digits).
pub fn short_number(x: f64) -> String {
    if x == 0.0 || !x.is_finite() || (1e-5..1e16).contains(&x.abs()) {
        format!("{x}")
    } else {
        format!("{x:e}")
    }
}

/// Read-only maps of every shard of a checkpoint.
pub struct MappedCheckpoint {
    /// Registrations with the SIGBUS handler, parallel to `maps`; declared first so they
    /// are dropped before the memory is unmapped.
    guards: Vec<Option<crate::interrupt::MapGuard>>,
    maps: Vec<Mmap>,
    /// What each file was when it was mapped, to notice changes made during the run.
    stamps: Vec<(PathBuf, FileStamp)>,
}

/// The identity, size and modification time of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }
}

impl MappedCheckpoint {
    /// Maps every shard, checking that none changed size since its header was read.
    ///
    /// Reading a part of a file that another process truncated after this point makes
    /// expo exit with status 1 and a message (see
    /// [`crate::interrupt::install_sigbus_handler`]); [`MappedCheckpoint::map_guarded`]
    /// turns it into an error instead.
    pub fn map(ck: &Checkpoint) -> Result<MappedCheckpoint, EngineError> {
        Self::map_with(ck, false)
    }

    /// Like [`MappedCheckpoint::map`], but a read of a part of a file that was truncated
    /// after mapping does not stop the process: it sees zeros, and the map is marked
    /// damaged. The caller must check [`MappedCheckpoint::check_intact`] after reading and
    /// before using any result ([`write_outputs`] and [`verify_exact_tensors`] do).
    pub fn map_guarded(ck: &Checkpoint) -> Result<MappedCheckpoint, EngineError> {
        Self::map_with(ck, true)
    }

    fn map_with(ck: &Checkpoint, guarded: bool) -> Result<MappedCheckpoint, EngineError> {
        crate::interrupt::install_sigbus_handler();
        let mut maps = Vec::with_capacity(ck.shards.len());
        let mut guards = Vec::with_capacity(ck.shards.len());
        let mut stamps = Vec::with_capacity(ck.shards.len());
        for shard in &ck.shards {
            let io = |op, source| EngineError::Io {
                path: shard.path.clone(),
                op,
                source,
            };
            let file = crate::header::open_regular(&shard.path)
                .map_err(|e| io("open", e))?
                .ok_or_else(|| {
                    io(
                        "open",
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            "no longer a regular file",
                        ),
                    )
                })?;
            let expected = shard.header.data_start + shard.header.data_len;
            let meta = file.metadata().map_err(|e| io("stat", e))?;
            let actual = meta.len();
            // A different file (renamed over the validated one) or one modified since its
            // header was read: the validated offsets would not describe it.
            let replaced = shard
                .identity
                .is_some_and(|id| id != crate::checkpoint::file_identity(&meta));
            if actual != expected || replaced {
                return Err(EngineError::InputChanged {
                    path: shard.path.clone(),
                    expected,
                    actual,
                });
            }
            // SAFETY: the map is read-only (PROT_READ; memmap2 maps it shared, and expo never
            // writes through it). Another process could still truncate or rewrite the file
            // while it is mapped, which would change what the slices read: expo never
            // writes to its inputs, a truncation is caught by the SIGBUS guard, and any
            // change of size or modification time fails the run (`check_intact`); the
            // README documents that inputs must not be modified during a run.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| io("mmap", e))?;
            let _ = map.advise(memmap2::Advice::Sequential);
            guards.push(if guarded {
                crate::interrupt::guard_map(map.as_ptr(), map.len())
            } else {
                None
            });
            maps.push(map);
            stamps.push((shard.path.clone(), FileStamp::of(&meta)));
        }
        Ok(MappedCheckpoint {
            guards,
            maps,
            stamps,
        })
    }

    /// True once a read hit a part of a file that was truncated after it was mapped.
    pub fn damaged(&self) -> bool {
        self.guards.iter().flatten().any(|g| g.damaged())
    }

    /// Fails if a file was truncated while it was read, or changed size or modification
    /// time since it was mapped. A file that was deleted or replaced by another one (a
    /// rename over it) is fine: the map still holds the original contents.
    pub fn check_intact(&self) -> Result<(), EngineError> {
        for (guard, (path, stamp)) in self.guards.iter().zip(&self.stamps) {
            if guard.as_ref().is_some_and(|g| g.damaged()) {
                return Err(EngineError::InputModified {
                    path: path.clone(),
                    what: "was truncated",
                });
            }
            let Ok(meta) = std::fs::metadata(path) else {
                continue;
            };
            let now = FileStamp::of(&meta);
            if (now.dev, now.ino) == (stamp.dev, stamp.ino) && now != *stamp {
                return Err(EngineError::InputModified {
                    path: path.clone(),
                    what: if now.len != stamp.len {
                        "changed size"
                    } else {
                        "was modified"
                    },
                });
            }
        }
        Ok(())
    }

    /// The bytes of one tensor.
    pub fn tensor<'a>(&'a self, ck: &Checkpoint, loc: TensorLoc) -> &'a [u8] {
        let shard = &ck.shards[loc.shard];
        let t = &shard.header.tensors[loc.index];
        let base = shard.header.data_start as usize;
        &self.maps[loc.shard][base + t.start as usize..base + t.end as usize]
    }

    /// Drops from this process's page tables the whole pages within [`RELEASE_MARGIN`] of
    /// `bytes` (a sub-slice of one of these maps); the page cache keeps them.
    ///
    /// The margin matters: the kernel maps a page-cache fault together with its neighbours
    /// ("fault-around", 64 KiB by default), so a worker reading near the edge of its chunk
    /// re-maps pages of the neighbouring chunk that another worker already released, and
    /// pages straddling two chunks belong wholly to neither. Releasing a little past both
    /// edges lets whichever neighbour finishes last drop them, so resident memory stays
    /// flat with any number of threads.
    pub fn release(&self, bytes: &[u8]) {
        let Some(map) = self
            .maps
            .iter()
            .find(|m| m.as_ptr_range().contains(&bytes.as_ptr()))
        else {
            return;
        };
        let page = crate::sys::page_size();
        let offset = bytes.as_ptr() as usize - map.as_ptr() as usize;
        let from = offset.saturating_sub(RELEASE_MARGIN);
        let to = (offset + bytes.len() + RELEASE_MARGIN).min(map.len());
        let start = from.div_ceil(page) * page;
        let end = to / page * page;
        if end > start {
            // SAFETY: the range lies inside a read-only, file-backed mapping (no dirty pages) that
            // no one writes, so MADV_DONTNEED only drops page-table entries: a later access
            // (also by another worker still reading there) faults the same file contents
            // back in. The range is page-aligned as madvise requires.
            unsafe {
                let _ = map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start);
            }
        }
    }
}

/// How far past a finished chunk's edges [`MappedCheckpoint::release`] drops pages.
pub const RELEASE_MARGIN: usize = 256 << 10;

/// Checks that the tensors that must be byte-identical in both checkpoints are (integer and
/// bool tensors whose α is not 0, see [`TensorPair::must_be_identical`]).
pub fn verify_exact_tensors(
    plan: &Plan,
    sft: (&Checkpoint, &MappedCheckpoint),
    aligned: (&Checkpoint, &MappedCheckpoint),
) -> Result<(), EngineError> {
    for p in &plan.pairs {
        if !p.must_be_identical() {
            continue;
        }
        let a = sft.1.tensor(sft.0, p.sft);
        let b = aligned.1.tensor(aligned.0, p.aligned);
        if let Some(offset) = a.iter().zip(b).position(|(x, y)| x != y) {
            // A difference read from a damaged map means nothing.
            sft.1.check_intact()?;
            aligned.1.check_intact()?;
            return Err(EngineError::ExactTensorDiffers {
                tensor: p.name.clone(),
                dtype: p.out_dtype,
                offset: offset as u64,
            });
        }
    }
    sft.1.check_intact()?;
    aligned.1.check_intact()
}

/// One unit of work: a run of one tensor's elements (or bytes, for non-float tensors).
#[derive(Debug, Clone, Copy)]
struct Task {
    shard: usize,
    pair: usize,
    /// Element range for float tensors, byte range for the others.
    start: u64,
    end: u64,
    /// Absolute offset of this chunk's output in the shard file.
    out_offset: u64,
}

/// Cuts every tensor of the (shared) output layout into chunks, in file order.
fn make_tasks(plan: &Plan, aligned: &Checkpoint) -> Vec<Task> {
    let mut tasks = Vec::new();
    for (s, shard) in plan.shards.iter().enumerate() {
        let data_start = shard.header.len() as u64;
        for (&i, &offset) in shard.tensors.iter().zip(&shard.offsets) {
            let p = &plan.pairs[i];
            let (total, step, out_unit) = match float_in(aligned, p) {
                Some(_) => (p.elements(), CHUNK_ELEMENTS, p.out_dtype.bits() / 8),
                None => (p.out_len, COPY_CHUNK_BYTES, 1),
            };
            let mut start = 0;
            while start < total {
                let end = (start + step).min(total);
                tasks.push(Task {
                    shard: s,
                    pair: i,
                    start,
                    end,
                    out_offset: data_start + offset + start * out_unit,
                });
                start = end;
            }
        }
    }
    tasks
}

/// θ1's float format for a float output tensor (chunked by elements), else `None`.
fn float_in(aligned: &Checkpoint, p: &TensorPair) -> Option<FloatDtype> {
    let t1 = aligned.get(&p.name)?.1;
    match (t1.dtype.class(), p.out_dtype.class()) {
        (DtypeClass::Float(d), DtypeClass::Float(_)) => Some(d),
        _ => None,
    }
}

/// What a finished output reports.
#[derive(Debug, Clone, Default)]
pub struct WriteStats {
    /// Tensors whose inputs already held non-finite values, with the count of non-finite
    /// output values in each.
    pub inherited_nonfinite: Vec<(String, u64)>,
}

/// One output of a run: its plan and the directory its files go to. All outputs of a run
/// share one layout (same files, tensors, dtypes and offsets); only α differs.
#[derive(Debug, Clone, Copy)]
pub struct OutputJob<'a> {
    pub plan: &'a Plan,
    pub dir: &'a Path,
}

/// The result of [`write_outputs`].
#[derive(Debug)]
pub struct RunReport {
    /// One result per output, in the order given.
    pub outputs: Vec<Result<WriteStats, EngineError>>,
    /// Σ(θ1 − θ0)² over the float tensors that some output extrapolates.
    pub delta_sq: f64,
    /// Σθ0² over the same tensors.
    pub base_sq: f64,
}

/// Creates a file at its final size, reserving the space when the filesystem can.
fn create_sized(path: &Path, len: u64) -> Result<File, EngineError> {
    let io = |op, source| EngineError::Io {
        path: path.to_path_buf(),
        op,
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io("create", e))?;
    if len > 0 {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for writing for the duration of the call.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if let Some(problem) = space_problem(&err) {
                return Err(EngineError::NoSpace {
                    path: path.to_path_buf(),
                    reason: format!("{problem}: the file needs {}", crate::text::bytes(len)),
                });
            }
            match err.raw_os_error() {
                // Not supported here: a plain size change is the best we can do.
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                    file.set_len(len).map_err(|e| match space_problem(&e) {
                        Some(problem) => EngineError::NoSpace {
                            path: path.to_path_buf(),
                            reason: format!(
                                "{problem}: the file needs {}",
                                crate::text::bytes(len)
                            ),
                        },
                        None => io("resize", e),
                    })?
                }
                _ => return Err(io("reserve space for", err)),
            }
        }
    }
    Ok(file)
}

/// One output file. All are created at the start (at their final size, so that a disk too
/// small fails the run before any work) and closed again; a file is reopened when the first
/// chunk of its shard starts and closed (after an fsync) when the last one ends, so the
/// files open at once do not grow with the number of shards.
enum ShardFile {
    /// Not created (yet, or because creating an earlier one failed).
    Absent,
    /// Created and closed; the device and inode it has.
    Created(u64, u64),
    Open(Arc<File>),
    /// Complete: fsynced and closed.
    Closed,
}

/// The files of one output and what its chunks found.
struct OutputState<'a> {
    job: OutputJob<'a>,
    /// One per shard of the plan.
    files: Vec<Mutex<ShardFile>>,
    inherited: Vec<AtomicU64>,
    failure: Mutex<Option<EngineError>>,
    failed: AtomicBool,
}

impl<'a> OutputState<'a> {
    fn new(job: OutputJob<'a>) -> OutputState<'a> {
        OutputState {
            job,
            files: job
                .plan
                .shards
                .iter()
                .map(|_| Mutex::new(ShardFile::Absent))
                .collect(),
            inherited: job.plan.pairs.iter().map(|_| AtomicU64::new(0)).collect(),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
        }
    }

    fn fail(&self, e: EngineError) {
        let mut slot = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.failed.store(true, Ordering::Relaxed);
    }

    fn path(&self, shard: usize) -> PathBuf {
        self.job.dir.join(&self.job.plan.shards[shard].file_name)
    }

    /// Creates every file of the output at its final size with its header, one at a time,
    /// closing each; a shard without chunks is complete then and is fsynced.
    fn create_files(&mut self, chunks: &[AtomicUsize]) -> Result<(), EngineError> {
        use std::os::unix::fs::MetadataExt;
        for (s, shard) in self.job.plan.shards.iter().enumerate() {
            let path = self.job.dir.join(&shard.file_name);
            let file = create_sized(&path, shard.file_len())?;
            file.write_all_at(&shard.header, 0)
                .map_err(|source| map_write_error(&path, source))?;
            let slot = self.files[s].get_mut().unwrap_or_else(|p| p.into_inner());
            *slot = if chunks[s].load(Ordering::Relaxed) == 0 {
                sync_file(&path, &file)?;
                ShardFile::Closed
            } else {
                let meta = file.metadata().map_err(|source| EngineError::Io {
                    path: path.clone(),
                    op: "stat",
                    source,
                })?;
                ShardFile::Created(meta.dev(), meta.ino())
            };
        }
        Ok(())
    }

    /// Shard `shard`'s file, reopened when its first chunk starts. The file must be the one
    /// created at the start.
    fn file(&self, shard: usize) -> Result<Arc<File>, EngineError> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let mut slot = self.files[shard].lock().unwrap_or_else(|p| p.into_inner());
        let path = || self.path(shard);
        let (dev, ino) = match &*slot {
            ShardFile::Open(file) => return Ok(Arc::clone(file)),
            ShardFile::Created(dev, ino) => (*dev, *ino),
            ShardFile::Absent | ShardFile::Closed => {
                return Err(EngineError::OutputReplaced { path: path() })
            }
        };
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path())
            .map_err(|source| EngineError::Io {
                path: path(),
                op: "reopen",
                source,
            })?;
        let meta = file.metadata().map_err(|source| EngineError::Io {
            path: path(),
            op: "stat",
            source,
        })?;
        if (meta.dev(), meta.ino()) != (dev, ino) {
            return Err(EngineError::OutputReplaced { path: path() });
        }
        let file = Arc::new(file);
        *slot = ShardFile::Open(Arc::clone(&file));
        Ok(file)
    }

    /// After the last chunk of `shard`: fsyncs its file (unless this output failed) and
    /// closes it.
    fn finish_shard(&self, shard: usize) {
        let file = std::mem::replace(
            &mut *self.files[shard].lock().unwrap_or_else(|p| p.into_inner()),
            ShardFile::Closed,
        );
        if let ShardFile::Open(file) = file {
            if !self.failed.load(Ordering::Relaxed) {
                if let Err(e) = sync_file(&self.path(shard), &file) {
                    self.fail(e);
                }
            }
        }
    }
}

/// Files a run needs open besides one per output and shard in progress (standard streams,
/// directory handles, side files, the runtime's own).
const OPEN_FILES_MARGIN: u64 = 16;

/// The process's open-files limits (soft, hard); `RLIM_INFINITY` reads as `u64::MAX`.
fn open_files_limit() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return (1024, 1024);
    }
    (lim.rlim_cur, lim.rlim_max)
}

/// Raises the soft open-files limit to the hard one; returns the soft limit in force.
fn raise_open_files_limit() -> u64 {
    let (soft, hard) = open_files_limit();
    if soft >= hard {
        return soft;
    }
    let lim = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct it is given; raising the soft limit up to the hard
    // one needs no privilege and affects only this process (and its children).
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        hard
    } else {
        soft
    }
}

/// Descriptors this process has open now (a guess when `/proc` is not mounted).
fn files_open_now() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(OPEN_FILES_MARGIN, |d| d.count() as u64)
}

/// The open files a run writing `outputs` outputs needs, against the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OpenFiles {
    /// Outputs written at once.
    pub outputs: usize,
    /// Files each output needs open besides those already open.
    pub per_output: u64,
    /// Files open before the run starts writing.
    pub open: u64,
    /// The fewest files the run can work with: every output's file of the shard in
    /// progress (and, before the outputs' directories exist, a handle on each), plus
    /// `open` and a margin.
    pub needed: u64,
    /// The soft limit, after raising it to the hard one when `needed` is above it.
    pub limit: u64,
}

impl OpenFiles {
    /// Counts for a run writing `outputs` outputs that keeps `per_output` files open for
    /// each besides those already open, raising the soft open-files limit to the hard one
    /// when the run needs more than the soft limit.
    fn check(outputs: usize, per_output: u64) -> OpenFiles {
        let open = files_open_now();
        let needed = per_output
            .saturating_mul(outputs as u64)
            .saturating_add(open)
            .saturating_add(OPEN_FILES_MARGIN);
        let (soft, _) = open_files_limit();
        let limit = if needed > soft {
            raise_open_files_limit()
        } else {
            soft
        };
        OpenFiles {
            outputs,
            per_output,
            open,
            needed,
            limit,
        }
    }

    /// True when the run fits under the limit.
    fn fits(&self) -> bool {
        self.needed <= self.limit
    }

    /// The error to report when the run does not fit.
    fn error(&self) -> Option<EngineError> {
        (!self.fits()).then(|| EngineError::TooManyOpenFiles {
            outputs: self.outputs,
            needed: self.needed,
            limit: self.limit,
            open: self.open,
            suggest: self
                .needed
                .checked_next_power_of_two()
                .unwrap_or(self.needed)
                .max(1024),
            fit: self
                .limit
                .saturating_sub(self.open.saturating_add(OPEN_FILES_MARGIN))
                / self.per_output.max(1),
        })
    }
}

/// Checks, before any work, that writing `outputs` outputs at once fits under the
/// open-files limit, raising the soft limit to the hard one if that helps; the error says
/// how many outputs fit.
pub fn check_open_files(outputs: usize) -> Result<(), EngineError> {
    OpenFiles::check(outputs, 2).error().map_or(Ok(()), Err)
}

/// Admits shards into progress, at most `limit` at a time: a shard's files (one per
/// output) are open from when its first chunk starts until its last one ends.
struct ShardGate {
    state: Mutex<(usize, Vec<bool>)>,
    freed: Condvar,
    limit: usize,
}

impl ShardGate {
    fn new(shards: usize, limit: usize) -> ShardGate {
        ShardGate {
            state: Mutex::new((0, vec![false; shards])),
            freed: Condvar::new(),
            limit: limit.max(1),
        }
    }

    /// Waits until `shard` may be worked on; false when `stop` says to give up instead.
    fn admit(&self, shard: usize, stop: &dyn Fn() -> bool) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let (in_flight, admitted) = &mut *st;
            if admitted[shard] {
                return true;
            }
            if *in_flight < self.limit {
                *in_flight += 1;
                admitted[shard] = true;
                return true;
            }
            if stop() {
                return false;
            }
            // Woken when a shard finishes; the timeout only makes a stop request seen.
            st = self
                .freed
                .wait_timeout(st, std::time::Duration::from_millis(20))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn release(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = st.0.saturating_sub(1);
        drop(st);
        self.freed.notify_all();
    }
}

/// Writes every output in one pass over the inputs: each chunk of θ0 and θ1 is read once
/// and turned into that chunk of every output. Each output's shards are fsynced when
/// complete. An error in one output (e.g. overflow at a large α) stops that output only.
///
/// A shard's output files are created when its first chunk starts and closed when its
/// last chunk ends; shards are started only as far as the open-files limit allows (see
/// [`check_open_files`]), so the files open at once do not grow with the number of
/// shards, and with many outputs the run waits for a shard to finish rather than fail.
///
/// `on_progress` is called with the number of output bytes each finished chunk wrote.
/// Setting `cancel` makes the workers stop at the next chunk; every output then reports
/// [`EngineError::Interrupted`].
pub fn write_outputs(
    jobs: &[OutputJob<'_>],
    sft: (&Checkpoint, &MappedCheckpoint),
    aligned: (&Checkpoint, &MappedCheckpoint),
    pool: &rayon::ThreadPool,
    cancel: &AtomicBool,
    on_progress: &(dyn Fn(u64) + Sync),
) -> RunReport {
    let Some(first) = jobs.first() else {
        return RunReport {
            outputs: Vec::new(),
            delta_sq: 0.0,
            base_sq: 0.0,
        };
    };
    debug_assert!(jobs
        .iter()
        .all(|j| j.plan.shards.len() == first.plan.shards.len()
            && j.plan
                .shards
                .iter()
                .zip(&first.plan.shards)
                .all(|(a, b)| a.header == b.header)));
    let tasks = make_tasks(first.plan, aligned.0);
    let mut states: Vec<OutputState> = jobs.iter().map(|&j| OutputState::new(j)).collect();
    let shards = first.plan.shards.len();
    let mut chunks_left: Vec<AtomicUsize> = (0..shards).map(|_| AtomicUsize::new(0)).collect();
    for t in &tasks {
        *chunks_left[t.shard].get_mut() += 1;
    }
    // How many shards may be in progress at once: each keeps one file per output open.
    // (The outputs' directories exist by now: what they hold open is counted as open.)
    let files = OpenFiles::check(jobs.len(), 1);
    if files.error().is_some() {
        return RunReport {
            outputs: jobs
                .iter()
                .map(|_| files.error().map_or(Ok(WriteStats::default()), Err))
                .collect(),
            delta_sq: 0.0,
            base_sq: 0.0,
        };
    }
    let spare = files
        .limit
        .saturating_sub(files.open.saturating_add(OPEN_FILES_MARGIN));
    let gate = ShardGate::new(
        shards,
        (spare / jobs.len() as u64).min(shards as u64) as usize,
    );
    for state in &mut states {
        if let Err(e) = state.create_files(&chunks_left) {
            state.fail(e);
        }
    }
    let states = states;

    // Which pairs some output extrapolates: only those need θ0, and they make the Δ stats.
    let extrapolated: Vec<Option<KernelSpec>> = (0..first.plan.pairs.len())
        .map(|i| {
            jobs.iter().find_map(|j| match j.plan.pairs[i].treatment {
                Treatment::Extrapolate(spec) => Some(spec),
                _ => None,
            })
        })
        .collect();
    let partials: Vec<(AtomicU64, AtomicU64)> = tasks
        .iter()
        .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
        .collect();
    let next = AtomicUsize::new(0);
    let stop = || {
        cancel.load(Ordering::Relaxed)
            || !states.iter().any(|st| !st.failed.load(Ordering::Relaxed))
            || sft.1.damaged()
            || aligned.1.damaged()
    };
    let max_chunk = (CHUNK_ELEMENTS * 8) as usize;

    let worker = || {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            if stop() {
                return;
            }
            let ti = next.fetch_add(1, Ordering::Relaxed);
            let Some(task) = tasks.get(ti) else { return };
            if !gate.admit(task.shard, &stop) {
                return;
            }
            let t1_all = aligned
                .1
                .tensor(aligned.0, first.plan.pairs[task.pair].aligned);
            let in1 = float_in(aligned.0, &first.plan.pairs[task.pair]);
            let t0_chunk = extrapolated[task.pair].map(|spec| {
                let t0 = sft.1.tensor(sft.0, first.plan.pairs[task.pair].sft);
                &t0[task.start as usize * spec.sft.size()..task.end as usize * spec.sft.size()]
            });
            // The sums of squares come from the first output that extrapolates the chunk.
            let mut summed = false;
            let unit = in1.map_or(1, |d| d.size());
            let b = &t1_all[task.start as usize * unit..task.end as usize * unit];
            for state in &states {
                if state.failed.load(Ordering::Relaxed) {
                    continue;
                }
                match run_task(sft, aligned, task, state, b, t0_chunk, &mut buf, max_chunk) {
                    Ok((written, sums)) => {
                        if let (Some((dd, bb)), false) = (sums, summed) {
                            partials[ti].0.store(dd.to_bits(), Ordering::Relaxed);
                            partials[ti].1.store(bb.to_bits(), Ordering::Relaxed);
                            summed = true;
                        }
                        on_progress(written);
                    }
                    Err(e) => state.fail(e),
                }
            }
            aligned.1.release(b);
            if let Some(a) = t0_chunk {
                sft.1.release(a);
            }
            if chunks_left[task.shard].fetch_sub(1, Ordering::AcqRel) == 1 {
                for state in &states {
                    state.finish_shard(task.shard);
                }
                gate.release();
            }
        }
    };
    pool.broadcast(|_| worker());

    let interrupted = cancel.load(Ordering::Relaxed);
    // An input that changed under the maps makes every output worthless.
    let intact = sft.1.check_intact().and(aligned.1.check_intact());
    let outputs = states
        .into_iter()
        .map(|state| {
            if let Err(EngineError::InputModified { path, what }) = &intact {
                return Err(EngineError::InputModified {
                    path: path.clone(),
                    what,
                });
            }
            if let Some(e) = state
                .failure
                .into_inner()
                .unwrap_or_else(|p| p.into_inner())
            {
                return Err(e);
            }
            if interrupted {
                return Err(EngineError::Interrupted);
            }
            let inherited_nonfinite = state
                .job
                .plan
                .pairs
                .iter()
                .zip(&state.inherited)
                .filter_map(|(p, n)| {
                    let n = n.load(Ordering::Relaxed);
                    (n > 0).then(|| (p.name.clone(), n))
                })
                .collect();
            Ok(WriteStats {
                inherited_nonfinite,
            })
        })
        .collect();
    // Summed in task order, so the result does not depend on the number of threads.
    let (mut delta_sq, mut base_sq) = (0.0, 0.0);
    for (dd, bb) in &partials {
        delta_sq += f64::from_bits(dd.load(Ordering::Relaxed));
        base_sq += f64::from_bits(bb.load(Ordering::Relaxed));
    }
    RunReport {
        outputs,
        delta_sq,
        base_sq,
    }
}

fn sync_file(path: &Path, file: &File) -> Result<(), EngineError> {
    file.sync_all().map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        op: "fsync",
        source,
    })
}

/// Writes one chunk of one output. `b` is θ1's chunk, `a` θ0's when some output needs it.
#[allow(clippy::too_many_arguments)]
fn run_task(
    sft: (&Checkpoint, &MappedCheckpoint),
    aligned: (&Checkpoint, &MappedCheckpoint),
    task: &Task,
    state: &OutputState,
    b: &[u8],
    a: Option<&[u8]>,
    buf: &mut Vec<u8>,
    max_chunk: usize,
) -> Result<(u64, Option<(f64, f64)>), EngineError> {
    let p = &state.job.plan.pairs[task.pair];
    let file = state.file(task.shard)?;
    let write_err = |source| map_write_error(&state.path(task.shard), source);
    let (inherited, out) = match p.treatment {
        Treatment::Copy => {
            crate::sys::write_out(&file, b, task.out_offset).map_err(write_err)?;
            return Ok((b.len() as u64, None));
        }
        Treatment::Cast(spec) => {
            let n = (task.end - task.start) as usize;
            if buf.len() < max_chunk {
                buf.resize(max_chunk, 0);
            }
            let out = &mut buf[..n * spec.out.size()];
            let stats = kernel::cast(spec, b, out);
            if stats.nonfinite_out > 0 && kernel::count_new_nonfinite(as_cast(spec), b, b, out) > 0
            {
                return Err(overflow_error(p, as_cast(spec), None, sft, aligned));
            }
            (stats.nonfinite_in, &*out)
        }
        Treatment::Extrapolate(spec) => {
            // θ0's chunk, read here if the caller did not (it always does).
            let a = a.unwrap_or_else(|| {
                &sft.1.tensor(sft.0, p.sft)
                    [task.start as usize * spec.sft.size()..task.end as usize * spec.sft.size()]
            });
            let n = (task.end - task.start) as usize;
            if buf.len() < max_chunk {
                buf.resize(max_chunk, 0);
            }
            let out = &mut buf[..n * spec.out.size()];
            let stats = kernel::extrapolate(spec, p.alpha, a, b, out);
            if stats.nonfinite_out > 0 && kernel::count_new_nonfinite(spec, a, b, out) > 0 {
                return Err(overflow_error(p, spec, Some(p.alpha), sft, aligned));
            }
            crate::sys::write_out(&file, out, task.out_offset).map_err(write_err)?;
            if stats.nonfinite_in > 0 {
                state.inherited[task.pair].fetch_add(stats.nonfinite_in, Ordering::Relaxed);
            }
            return Ok((out.len() as u64, Some((stats.delta_sq, stats.base_sq))));
        }
    };
    crate::sys::write_out(&file, out, task.out_offset).map_err(write_err)?;
    if inherited > 0 {
        state.inherited[task.pair].fetch_add(inherited, Ordering::Relaxed);
    }
    Ok((out.len() as u64, None))
}

fn map_write_error(path: &Path, source: std::io::Error) -> EngineError {
    match space_problem(&source) {
        Some(problem) => EngineError::NoSpace {
            path: path.to_path_buf(),
            reason: format!("{problem} while writing"),
        },
        None => EngineError::Io {
            path: path.to_path_buf(),
            op: "write",
            source,
        },
    }
}

/// Names an out-of-space condition in words a user can act on.
fn space_problem(err: &std::io::Error) -> Option<&'static str> {
    match err.raw_os_error()? {
        libc::ENOSPC => Some("the disk is full (no space left on device)"),
        libc::EDQUOT => Some("the disk quota is exceeded"),
        libc::EFBIG => Some("the file-size limit is exceeded (see `ulimit -f`)"),
        _ => None,
    }
}

/// Counts, over the whole tensor, the values that overflow although θ1's are finite:
/// `alpha` for an extrapolation, `None` for a conversion (`spec` from [`as_cast`]).
fn overflow_error(
    p: &TensorPair,
    spec: KernelSpec,
    alpha: Option<f64>,
    sft: (&Checkpoint, &MappedCheckpoint),
    aligned: (&Checkpoint, &MappedCheckpoint),
) -> EngineError {
    let t0 = sft.1.tensor(sft.0, p.sft);
    let t1 = aligned.1.tensor(aligned.0, p.aligned);
    let n = p.elements() as usize;
    let step = CHUNK_ELEMENTS as usize;
    let mut out = vec![0u8; step.min(n) * spec.out.size()];
    let mut count = 0;
    let mut s = 0;
    while s < n {
        let e = (s + step).min(n);
        let b = &t1[s * spec.aligned.size()..e * spec.aligned.size()];
        let o = &mut out[..(e - s) * spec.out.size()];
        count += match alpha {
            None => match kernel::cast(spec, b, o).nonfinite_out {
                0 => 0,
                _ => kernel::count_new_nonfinite(spec, b, b, o),
            },
            Some(alpha) => {
                let a = &t0[s * spec.sft.size()..e * spec.sft.size()];
                match kernel::extrapolate(spec, alpha, a, b, o).nonfinite_out {
                    0 => 0,
                    _ => kernel::count_new_nonfinite(spec, a, b, o),
                }
            }
        };
        s = e;
    }
    match alpha {
        None => EngineError::CastOverflow {
            tensor: p.name.clone(),
            count,
            elements: n as u64,
            dtype: spec.out,
        },
        Some(alpha) => EngineError::Overflow {
            tensor: p.name.clone(),
            count,
            elements: n as u64,
            dtype: spec.out,
            alpha,
        },
    }
}

/// A conversion seen as an extrapolation whose θ0 is θ1 (for counting non-finite values).
fn as_cast(spec: KernelSpec) -> KernelSpec {
    KernelSpec {
        sft: spec.aligned,
        ..spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_print_their_cause_once() {
        let e = EngineError::Io {
            path: PathBuf::from("out/model.safetensors"),
            op: "write",
            source: std::io::Error::from_raw_os_error(libc::EIO),
        };
        let cause = std::io::Error::from_raw_os_error(libc::EIO).to_string();
        let text = format!("{:#}", anyhow::Error::new(e).context("writing out"));
        assert_eq!(text.matches(&cause).count(), 1, "{text}");
        assert!(
            text.contains("out/model.safetensors: write failed"),
            "{text}"
        );
    }

    #[test]
    fn numbers_in_messages_are_short() {
        assert_eq!(short_number(0.3), "0.3");
        assert_eq!(short_number(-2.5), "-2.5");
        assert_eq!(short_number(0.0), "0");
        assert_eq!(short_number(1e300), "1e300");
        assert_eq!(short_number(-3e-300), "-3e-300");
        assert_eq!(short_number(f64::INFINITY), "inf");
        let e = EngineError::Overflow {
            tensor: "w".into(),
            count: 3,
            elements: 4,
            dtype: FloatDtype::F16,
            alpha: 1e300,
        };
        let text = e.to_string();
        assert!(text.contains("alpha = 1e300 "), "{text}");
        assert!(text.len() < 250, "{text}");
        let e = EngineError::NoSpace {
            path: PathBuf::from("o"),
            reason: String::new(),
        };
        assert_eq!(e.to_string(), "o: ");
    }

    #[test]
    fn the_open_files_check_counts_every_output() {
        let (soft, hard) = open_files_limit();
        assert!(soft <= hard);
        let few = OpenFiles::check(1, 2);
        assert!(few.fits(), "{few:?}");
        assert!(few.error().is_none());
        let many = OpenFiles::check(usize::MAX / 4, 2);
        assert!(!many.fits());
        let text = many.error().map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains("open-files limit"), "{text}");
        assert!(check_open_files(usize::MAX / 4).is_err());
    }

    #[test]
    fn the_shard_gate_admits_at_most_its_limit() {
        let gate = ShardGate::new(3, 1);
        let never = || false;
        assert!(gate.admit(0, &never));
        // Shard 0 again: already admitted.
        assert!(gate.admit(0, &never));
        // Shard 1 waits for shard 0; told to stop, it gives up.
        assert!(!gate.admit(1, &|| true));
        gate.release();
        assert!(gate.admit(1, &never));
    }
}
