//! The one writer: every output of a run (one per α) written in one pass over the inputs,
//! whatever the kind of `--aligned`.
//!
//! A front-end (the pairing of two checkpoints in [`crate::engine`], the adapter over a base
//! in [`crate::adapter`]) gives the output layout (shards with their headers, the same for
//! every output), the work cut into [`Task`]s in file order, and a [`ChunkSource`] that
//! turns one task into the bytes of every output. The writer owns the rest: output files
//! created at their final size (a full disk fails before any work), the open-files gate,
//! task hand-out from one atomic counter (every core busy, inputs read roughly
//! sequentially), early write-back, an fsync per shard by the worker that finishes it,
//! reopening each file by identity, progress, interrupts and damaged inputs.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::error::EngineError;
use crate::maps::MappedCheckpoint;

/// One output file: which tensors, in which order, at which offsets.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    pub file_name: String,
    /// Indices into the plan's tensors (`plan::OutputPlan::tensors`), in data order.
    pub tensors: Vec<usize>,
    /// Offset of each tensor's data relative to the data section, parallel to `tensors`.
    pub offsets: Vec<u64>,
    /// The encoded header, including the 8-byte length prefix.
    pub header: Vec<u8>,
    /// Bytes of tensor data.
    pub data_len: u64,
}

impl ShardPlan {
    /// Size of the whole file.
    pub fn file_len(&self) -> u64 {
        self.header.len() as u64 + self.data_len
    }
}

/// Elements per chunk of float work.
pub const CHUNK_ELEMENTS: u64 = 1 << 20;
/// Bytes per chunk of copy work.
pub const COPY_CHUNK_BYTES: u64 = 4 << 20;

/// One unit of work: a run `[start, end)` of one output tensor (elements, rows or bytes, as
/// its front-end cuts it).
#[derive(Debug, Clone, Copy)]
pub struct Task {
    pub shard: usize,
    /// The tensor, as an index into the front-end's list.
    pub tensor: usize,
    pub start: u64,
    pub end: u64,
    /// Absolute offset of this chunk's output in the shard file.
    pub out_offset: u64,
}

/// Cuts the tensors of `shards` into tasks in file order. `cut(tensor)` gives the tensor's
/// length and step (in units) and the output bytes per unit.
pub fn cut_tasks(shards: &[ShardPlan], cut: impl Fn(usize) -> (u64, u64, u64)) -> Vec<Task> {
    let mut tasks = Vec::new();
    for (s, shard) in shards.iter().enumerate() {
        let data_start = shard.header.len() as u64;
        for (&i, &offset) in shard.tensors.iter().zip(&shard.offsets) {
            let (total, step, unit) = cut(i);
            let mut start = 0;
            while start < total {
                let end = (start + step).min(total);
                tasks.push(Task {
                    shard: s,
                    tensor: i,
                    start,
                    end,
                    out_offset: data_start + offset + start * unit,
                });
                start = end;
            }
        }
    }
    tasks
}

/// Where one output goes: its shards (the same layout for every output of a run) in `dir`.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub shards: &'a [ShardPlan],
    pub dir: &'a Path,
}

/// What one output's chunk is: its bytes, or why this output cannot be written.
pub type Chunk<'b> = Result<&'b [u8], EngineError>;

/// Turns tasks into output bytes.
pub trait ChunkSource: Sync {
    /// What one worker reuses from task to task.
    type Scratch: Default;

    /// Computes task `index` for every output `j` with `live[j]`, handing each output's
    /// chunk to `sink(j, chunk)`, which returns whether it was written.
    fn run(
        &self,
        index: usize,
        task: &Task,
        live: &[bool],
        scratch: &mut Self::Scratch,
        sink: &mut dyn FnMut(usize, Chunk<'_>) -> bool,
    );

    /// After every output's chunk of `task` was written: drops the input pages it read.
    fn release(&self, task: &Task);

    /// The mapped inputs, checked for damage during and after the run.
    fn inputs(&self) -> &[&MappedCheckpoint];
}

/// How the run is driven: its workers, its cancel flag and its progress.
pub struct Run<'a> {
    pub pool: &'a rayon::ThreadPool,
    /// Set to stop at the next chunk; every output then reports [`EngineError::Interrupted`].
    pub cancel: &'a AtomicBool,
    /// Called with the number of output bytes of each chunk written.
    pub on_progress: &'a (dyn Fn(u64) + Sync),
}

/// Writes every output in one pass: each task is computed once for all outputs. Each
/// output's shards are fsynced when complete. An error in one output (e.g. overflow at a
/// large α) stops that output only. Returns one result per target, in order.
///
/// A shard's output files are reopened when its first chunk starts and closed when its
/// last chunk ends; shards are started only as far as the open-files limit allows (see
/// [`check_open_files`]), so the files open at once do not grow with the number of shards,
/// and with many outputs the run waits for a shard to finish rather than fail.
pub fn write_all<S: ChunkSource>(
    targets: &[Target<'_>],
    tasks: &[Task],
    source: &S,
    run: &Run<'_>,
) -> Vec<Result<(), EngineError>> {
    let Some(first) = targets.first() else {
        return Vec::new();
    };
    let shards = first.shards.len();
    let mut chunks_left: Vec<AtomicUsize> = (0..shards).map(|_| AtomicUsize::new(0)).collect();
    for t in tasks {
        *chunks_left[t.shard].get_mut() += 1;
    }
    // How many shards may be in progress at once: each keeps one file per output open.
    // (The outputs' directories exist by now: what they hold open is counted as open.)
    let files = OpenFiles::check(targets.len(), 1);
    if !files.fits() {
        return targets
            .iter()
            .map(|_| files.error().map_or(Ok(()), Err))
            .collect();
    }
    let spare = files
        .limit
        .saturating_sub(files.open.saturating_add(OPEN_FILES_MARGIN));
    let gate = ShardGate::new(
        shards,
        (spare / targets.len() as u64).min(shards as u64) as usize,
    );
    let mut states: Vec<OutputState> = targets.iter().map(|&t| OutputState::new(t)).collect();
    for state in &mut states {
        if let Err(e) = state.create_files(&chunks_left) {
            state.fail(e);
        }
    }
    let pass = Pass {
        tasks,
        source,
        run,
        states,
        chunks_left,
        gate,
        next: AtomicUsize::new(0),
    };
    run.pool.broadcast(|_| pass.work());
    pass.results()
}

/// One pass over the tasks, shared by the workers.
struct Pass<'a, S> {
    tasks: &'a [Task],
    source: &'a S,
    run: &'a Run<'a>,
    states: Vec<OutputState<'a>>,
    /// Chunks not yet finished, per shard.
    chunks_left: Vec<AtomicUsize>,
    gate: ShardGate,
    next: AtomicUsize,
}

impl<S: ChunkSource> Pass<'_, S> {
    /// True when the workers should stop: cancelled, every output failed, or an input
    /// damaged.
    fn stop(&self) -> bool {
        self.run.cancel.load(Ordering::Relaxed)
            || self.states.iter().all(OutputState::failed)
            || self.source.inputs().iter().any(|m| m.damaged())
    }

    /// One worker: tasks from the shared counter, in file order, until none is left.
    fn work(&self) {
        let mut scratch = S::Scratch::default();
        loop {
            if self.stop() {
                return;
            }
            let ti = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(task) = self.tasks.get(ti) else {
                return;
            };
            if !self.gate.admit(task.shard, &|| self.stop()) {
                return;
            }
            let live: Vec<bool> = self.states.iter().map(|s| !s.failed()).collect();
            self.source
                .run(ti, task, &live, &mut scratch, &mut |j, chunk| {
                    self.sink(j, task, chunk)
                });
            self.source.release(task);
            if self.chunks_left[task.shard].fetch_sub(1, Ordering::AcqRel) == 1 {
                for state in &self.states {
                    state.finish_shard(task.shard);
                }
                self.gate.release();
            }
        }
    }

    /// Writes output `j`'s chunk of `task`, or records why it failed.
    fn sink(&self, j: usize, task: &Task, chunk: Chunk<'_>) -> bool {
        let state = &self.states[j];
        match chunk.and_then(|bytes| {
            state.write(task.shard, bytes, task.out_offset)?;
            Ok(bytes.len() as u64)
        }) {
            Ok(n) => {
                (self.run.on_progress)(n);
                true
            }
            Err(e) => {
                state.fail(e);
                false
            }
        }
    }

    /// Each output's result: a damaged input, its own failure, or an interrupt.
    fn results(self) -> Vec<Result<(), EngineError>> {
        let interrupted = self.run.cancel.load(Ordering::Relaxed);
        // An input that changed under the maps makes every output worthless.
        let intact: Result<(), EngineError> = self
            .source
            .inputs()
            .iter()
            .try_for_each(|m| m.check_intact());
        self.states
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
                Ok(())
            })
            .collect()
    }
}

fn sync_file(path: &Path, file: &File) -> Result<(), EngineError> {
    file.sync_all().map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        op: "fsync",
        source,
    })
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

/// The files of one output and whether it failed.
struct OutputState<'a> {
    target: Target<'a>,
    /// One per shard of the layout.
    files: Vec<Mutex<ShardFile>>,
    failure: Mutex<Option<EngineError>>,
    failed: AtomicBool,
}

impl<'a> OutputState<'a> {
    fn new(target: Target<'a>) -> OutputState<'a> {
        OutputState {
            target,
            files: target
                .shards
                .iter()
                .map(|_| Mutex::new(ShardFile::Absent))
                .collect(),
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

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    fn path(&self, shard: usize) -> PathBuf {
        self.target.dir.join(&self.target.shards[shard].file_name)
    }

    /// Writes `bytes` at `offset` of shard `shard`'s file.
    fn write(&self, shard: usize, bytes: &[u8], offset: u64) -> Result<(), EngineError> {
        let file = self.file(shard)?;
        crate::sys::write_out(&file, bytes, offset)
            .map_err(|source| map_write_error(&self.path(shard), source))
    }

    /// Creates every file of the output at its final size with its header, one at a time,
    /// closing each; a shard without chunks is complete then and is fsynced.
    fn create_files(&mut self, chunks: &[AtomicUsize]) -> Result<(), EngineError> {
        use std::os::unix::fs::MetadataExt;
        for (s, shard) in self.target.shards.iter().enumerate() {
            let path = self.target.dir.join(&shard.file_name);
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

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A source of f32 tensors `x·(1+α)` for x = the element's index, computed in f64 and
    /// rounded once; one output fails (overflow) on tensors whose α is above 1e37.
    struct Scaled {
        /// Elements of each tensor.
        lens: Vec<u64>,
        /// Per output, per tensor.
        alphas: Vec<Vec<f64>>,
    }

    impl ChunkSource for Scaled {
        type Scratch = Vec<u8>;

        fn run(
            &self,
            _index: usize,
            task: &Task,
            live: &[bool],
            buf: &mut Vec<u8>,
            sink: &mut dyn FnMut(usize, Chunk<'_>) -> bool,
        ) {
            for j in (0..live.len()).filter(|&j| live[j]) {
                let alpha = self.alphas[j][task.tensor];
                buf.clear();
                let mut overflow = false;
                for i in task.start..task.end {
                    let v = (i as f64 * (1.0 + alpha)) as f32;
                    overflow |= v.is_infinite();
                    buf.extend_from_slice(&v.to_le_bytes());
                }
                if overflow {
                    sink(j, Err(EngineError::Interrupted));
                } else {
                    sink(j, Ok(buf));
                }
            }
        }

        fn release(&self, _task: &Task) {}

        fn inputs(&self) -> &[&MappedCheckpoint] {
            &[]
        }
    }

    /// Two files: tensors 0 and 1 in the first (tensor 1 larger than one task), tensor 2
    /// alone in the second.
    fn layout(lens: &[u64]) -> Vec<ShardPlan> {
        let names: Vec<String> = (0..lens.len()).map(|i| format!("t{i}")).collect();
        let shapes: Vec<[u64; 1]> = lens.iter().map(|&n| [n]).collect();
        let shard = |file: &str, tensors: Vec<usize>| {
            crate::plan::lay_out_shard(file.to_string(), None, tensors, |i| {
                let dtype = crate::dtype::Dtype::F32;
                (names[i].as_str(), dtype, &shapes[i][..], lens[i] * 4)
            })
        };
        vec![
            shard("a.safetensors", vec![0, 1]),
            shard("b.safetensors", vec![2]),
        ]
    }

    fn write(
        lens: &[u64],
        alphas: Vec<Vec<f64>>,
    ) -> (tempfile::TempDir, Vec<Result<(), EngineError>>) {
        let dir = tempfile::tempdir().unwrap();
        let shards = layout(lens);
        let dirs: Vec<PathBuf> = (0..alphas.len())
            .map(|j| dir.path().join(format!("out{j}")))
            .collect();
        dirs.iter().for_each(|d| std::fs::create_dir(d).unwrap());
        let targets: Vec<Target> = dirs
            .iter()
            .map(|d| Target {
                shards: &shards,
                dir: d,
            })
            .collect();
        let tasks = cut_tasks(&shards, |i| (lens[i], CHUNK_ELEMENTS, 4));
        let source = Scaled {
            lens: lens.to_vec(),
            alphas,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let written = AtomicUsize::new(0);
        let results = write_all(
            &targets,
            &tasks,
            &source,
            &Run {
                pool: &pool,
                cancel: &AtomicBool::new(false),
                on_progress: &|n| {
                    written.fetch_add(n as usize, Ordering::Relaxed);
                },
            },
        );
        let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
        let expected: u64 = source.lens.iter().map(|n| n * 4).sum::<u64>() * ok;
        assert!(written.load(Ordering::Relaxed) as u64 >= expected);
        (dir, results)
    }

    /// What output `j` of [`write`] must hold in file `name`: the header, then each
    /// tensor's x·(1+α) rounded once from f64.
    fn expected(lens: &[u64], alphas: &[f64], shard: &ShardPlan) -> Vec<u8> {
        let mut want = shard.header.clone();
        for &t in &shard.tensors {
            for i in 0..lens[t] {
                let v = (i as f64 * (1.0 + alphas[t])) as f32;
                want.extend_from_slice(&v.to_le_bytes());
            }
        }
        want
    }

    #[test]
    fn every_output_of_one_pass_holds_its_own_alpha_and_tensors_span_tasks() {
        let lens = [3, CHUNK_ELEMENTS * 2 + 5, 7];
        let alphas = vec![
            vec![0.5, 0.5, 0.5],
            vec![0.0, 2.0, -0.25],
            vec![1.5, 0.3, 0.0],
        ];
        let (dir, results) = write(&lens, alphas.clone());
        assert!(results.iter().all(Result::is_ok));
        let shards = layout(&lens);
        for (j, a) in alphas.iter().enumerate() {
            for shard in &shards {
                let got = std::fs::read(dir.path().join(format!("out{j}")).join(&shard.file_name));
                assert!(
                    got.unwrap() == expected(&lens, a, shard),
                    "output {j} {}",
                    shard.file_name
                );
            }
        }
        // The same outputs written one α per pass are byte-identical.
        for (j, a) in alphas.iter().enumerate() {
            let (single, results) = write(&lens, vec![a.clone()]);
            assert!(results.iter().all(Result::is_ok));
            for shard in &shards {
                let one = std::fs::read(single.path().join("out0").join(&shard.file_name));
                let many = std::fs::read(dir.path().join(format!("out{j}")).join(&shard.file_name));
                assert_eq!(one.unwrap(), many.unwrap());
            }
        }
    }

    #[test]
    fn a_failing_output_stops_only_itself() {
        let lens = [3, CHUNK_ELEMENTS + 1, 7];
        let (dir, results) = write(&lens, vec![vec![1e300, 1.0, 1.0], vec![1.0, 1.0, 1.0]]);
        assert!(matches!(results[0], Err(EngineError::Interrupted)));
        assert!(results[1].is_ok());
        let shards = layout(&lens);
        for shard in &shards {
            let got = std::fs::read(dir.path().join("out1").join(&shard.file_name)).unwrap();
            assert!(got == expected(&lens, &[1.0, 1.0, 1.0], shard));
        }
    }
}
