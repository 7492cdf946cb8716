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
use std::sync::Mutex;

use memmap2::{Mmap, UncheckedAdvice};

use crate::checkpoint::{Checkpoint, TensorLoc};
use crate::dtype::DtypeClass;
use crate::kernel::{self, KernelSpec};
use crate::plan::{Plan, Treatment};

/// Elements per chunk of float work.
pub const CHUNK_ELEMENTS: u64 = 1 << 20;
/// Bytes per chunk of copy work.
pub const COPY_CHUNK_BYTES: u64 = 4 << 20;

/// Errors while reading inputs or writing the output.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("not enough space for {path}: it needs {needed} bytes")]
    NoSpace { path: PathBuf, needed: u64 },
    #[error(
        "{path} changed since its header was read: it is now {actual} bytes, expected {expected}"
    )]
    InputChanged {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("tensor `{tensor}` ({dtype}) is not float, so it must be identical in both checkpoints, but it differs (first at byte {offset}); are these two checkpoints of the same model?")]
    ExactTensorDiffers {
        tensor: String,
        dtype: crate::dtype::Dtype,
        offset: u64,
    },
    #[error("tensor `{tensor}`: {count} of {elements} values become infinite or NaN in {dtype} at alpha = {alpha} although both inputs are finite; use a smaller --alpha or a wider --dtype (e.g. f32)")]
    Overflow {
        tensor: String,
        count: u64,
        elements: u64,
        dtype: crate::dtype::FloatDtype,
        alpha: f64,
    },
    #[error("interrupted")]
    Interrupted,
}

/// Read-only maps of every shard of a checkpoint.
pub struct MappedCheckpoint {
    maps: Vec<Mmap>,
}

impl MappedCheckpoint {
    /// Maps every shard, checking that none changed size since its header was read.
    pub fn map(ck: &Checkpoint) -> Result<MappedCheckpoint, EngineError> {
        let mut maps = Vec::with_capacity(ck.shards.len());
        for shard in &ck.shards {
            let io = |op, source| EngineError::Io {
                path: shard.path.clone(),
                op,
                source,
            };
            let file = File::open(&shard.path).map_err(|e| io("open", e))?;
            let expected = shard.header.data_start + shard.header.data_len;
            let actual = file.metadata().map_err(|e| io("stat", e))?.len();
            if actual != expected {
                return Err(EngineError::InputChanged {
                    path: shard.path.clone(),
                    expected,
                    actual,
                });
            }
            // SAFETY: the map is read-only and private to this process. Another process
            // could still truncate or rewrite the file while it is mapped; expo never
            // writes to its inputs, and the README documents that inputs must not be
            // modified during a run.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| io("mmap", e))?;
            let _ = map.advise(memmap2::Advice::Sequential);
            maps.push(map);
        }
        Ok(MappedCheckpoint { maps })
    }

    /// The bytes of one tensor.
    pub fn tensor<'a>(&'a self, ck: &Checkpoint, loc: TensorLoc) -> &'a [u8] {
        let shard = &ck.shards[loc.shard];
        let t = &shard.header.tensors[loc.index];
        let base = shard.header.data_start as usize;
        &self.maps[loc.shard][base + t.start as usize..base + t.end as usize]
    }

    /// Drops the whole pages inside `bytes` (a sub-slice of one of our maps) from this
    /// process's page tables; the page cache keeps them.
    fn release(&self, bytes: &[u8]) {
        let Some(map) = self
            .maps
            .iter()
            .find(|m| m.as_ptr_range().contains(&bytes.as_ptr()))
        else {
            return;
        };
        let page = page_size();
        let offset = bytes.as_ptr() as usize - map.as_ptr() as usize;
        let start = offset.div_ceil(page) * page;
        let end = (offset + bytes.len()) / page * page;
        if end > start {
            // SAFETY: the map is a read-only, file-backed mapping, so MADV_DONTNEED only
            // drops page-table entries: a later access faults the same file contents back
            // in. No slice into this range is used after the chunk that covered it.
            unsafe {
                let _ = map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start);
            }
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// Checks that non-float tensors are byte-identical in both checkpoints.
pub fn verify_exact_tensors(
    plan: &Plan,
    sft: (&Checkpoint, &MappedCheckpoint),
    aligned: (&Checkpoint, &MappedCheckpoint),
) -> Result<(), EngineError> {
    for p in &plan.pairs {
        if p.treatment != Treatment::Copy || p.out_dtype.class() != DtypeClass::Exact {
            continue;
        }
        let a = sft.1.tensor(sft.0, p.sft);
        let b = aligned.1.tensor(aligned.0, p.aligned);
        if let Some(offset) = a.iter().zip(b).position(|(x, y)| x != y) {
            return Err(EngineError::ExactTensorDiffers {
                tensor: p.name.clone(),
                dtype: p.out_dtype,
                offset: offset as u64,
            });
        }
    }
    Ok(())
}

/// One unit of work: a run of one tensor's elements (or bytes, for copies).
#[derive(Debug, Clone, Copy)]
struct Task {
    shard: usize,
    pair: usize,
    /// Element range for float work, byte range for copies.
    start: u64,
    end: u64,
    /// Absolute offset of this chunk's output in the shard file.
    out_offset: u64,
}

fn make_tasks(plan: &Plan) -> Vec<Task> {
    let mut tasks = Vec::new();
    for (s, shard) in plan.shards.iter().enumerate() {
        let data_start = shard.header.len() as u64;
        for (&i, &offset) in shard.tensors.iter().zip(&shard.offsets) {
            let p = &plan.pairs[i];
            let (total, step, out_unit) = match p.treatment {
                Treatment::Copy => (p.out_len, COPY_CHUNK_BYTES, 1),
                Treatment::Extrapolate(spec) | Treatment::Cast(spec) => {
                    (p.elements(), CHUNK_ELEMENTS, spec.out.size() as u64)
                }
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

/// What a finished write reports.
#[derive(Debug, Clone, Default)]
pub struct WriteStats {
    /// Tensors whose inputs already held non-finite values, with the count of non-finite
    /// output values in each.
    pub inherited_nonfinite: Vec<(String, u64)>,
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
            match err.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                    return Err(EngineError::NoSpace {
                        path: path.to_path_buf(),
                        needed: len,
                    })
                }
                // Not supported here: a plain size change is the best we can do.
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                    file.set_len(len).map_err(|e| io("resize", e))?
                }
                _ => return Err(io("reserve space for", err)),
            }
        }
    }
    Ok(file)
}

/// Writes every output shard of `plan` into `dir`, fsyncing each when complete.
///
/// `on_progress` is called with the number of output bytes each finished chunk wrote.
/// Setting `cancel` makes the workers stop at the next chunk with [`EngineError::Interrupted`].
pub fn write_shards(
    plan: &Plan,
    sft: (&Checkpoint, &MappedCheckpoint),
    aligned: (&Checkpoint, &MappedCheckpoint),
    dir: &Path,
    pool: &rayon::ThreadPool,
    cancel: &AtomicBool,
    on_progress: &(dyn Fn(u64) + Sync),
) -> Result<WriteStats, EngineError> {
    let mut files = Vec::with_capacity(plan.shards.len());
    for shard in &plan.shards {
        let path = dir.join(&shard.file_name);
        let file = create_sized(&path, shard.file_len())?;
        file.write_all_at(&shard.header, 0)
            .map_err(|source| EngineError::Io {
                path: path.clone(),
                op: "write",
                source,
            })?;
        files.push((path, file));
    }

    let tasks = make_tasks(plan);
    let mut remaining: Vec<AtomicUsize> = plan.shards.iter().map(|_| AtomicUsize::new(0)).collect();
    for t in &tasks {
        *remaining[t.shard].get_mut() += 1;
    }
    // Shards without tensors are complete as soon as their header is written.
    for (s, left) in remaining.iter_mut().enumerate() {
        if *left.get_mut() == 0 {
            sync_file(&files[s].0, &files[s].1)?;
        }
    }
    let inherited: Vec<AtomicU64> = plan.pairs.iter().map(|_| AtomicU64::new(0)).collect();
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<EngineError>> = Mutex::new(None);
    let max_chunk = (CHUNK_ELEMENTS * 8) as usize;

    let worker = || {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            if cancel.load(Ordering::Relaxed) {
                return;
            }
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(task) = tasks.get(i) else { return };
            let result = run_task(
                plan, sft, aligned, task, &files, &mut buf, max_chunk, &inherited,
            )
            .and_then(|written| {
                on_progress(written);
                if remaining[task.shard].fetch_sub(1, Ordering::AcqRel) == 1 {
                    let (path, file) = &files[task.shard];
                    sync_file(path, file)?;
                }
                Ok(())
            });
            if let Err(e) = result {
                let mut slot = failure.lock().unwrap_or_else(|p| p.into_inner());
                if slot.is_none() {
                    *slot = Some(e);
                }
                cancel.store(true, Ordering::Relaxed);
                return;
            }
        }
    };
    pool.broadcast(|_| worker());

    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(EngineError::Interrupted);
    }
    let inherited_nonfinite = plan
        .pairs
        .iter()
        .zip(&inherited)
        .filter_map(|(p, n)| {
            let n = n.load(Ordering::Relaxed);
            (n > 0).then(|| (p.name.clone(), n))
        })
        .collect();
    Ok(WriteStats {
        inherited_nonfinite,
    })
}

fn sync_file(path: &Path, file: &File) -> Result<(), EngineError> {
    file.sync_all().map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        op: "fsync",
        source,
    })
}

#[allow(clippy::too_many_arguments)]
fn run_task(
    plan: &Plan,
    sft: (&Checkpoint, &MappedCheckpoint),
    aligned: (&Checkpoint, &MappedCheckpoint),
    task: &Task,
    files: &[(PathBuf, File)],
    buf: &mut Vec<u8>,
    max_chunk: usize,
    inherited: &[AtomicU64],
) -> Result<u64, EngineError> {
    let p = &plan.pairs[task.pair];
    let (path, file) = &files[task.shard];
    let write_err = |source| map_write_error(path, source);
    let t1 = aligned.1.tensor(aligned.0, p.aligned);
    match p.treatment {
        Treatment::Copy => {
            let src = &t1[task.start as usize..task.end as usize];
            file.write_all_at(src, task.out_offset).map_err(write_err)?;
            aligned.1.release(src);
            Ok(src.len() as u64)
        }
        Treatment::Extrapolate(spec) | Treatment::Cast(spec) => {
            let (s, e) = (task.start as usize, task.end as usize);
            let b = &t1[s * spec.aligned.size()..e * spec.aligned.size()];
            if buf.len() < max_chunk {
                buf.resize(max_chunk, 0);
            }
            let out = &mut buf[..(e - s) * spec.out.size()];
            let stats = match p.treatment {
                Treatment::Cast(_) => {
                    let stats = kernel::cast(spec, b, out);
                    let as_cast = KernelSpec {
                        sft: spec.aligned,
                        ..spec
                    };
                    if stats.nonfinite_out > 0
                        && kernel::count_new_nonfinite(as_cast, b, b, out) > 0
                    {
                        return Err(overflow_error(plan, p, spec, sft, aligned));
                    }
                    stats
                }
                _ => {
                    let t0 = sft.1.tensor(sft.0, p.sft);
                    let a = &t0[s * spec.sft.size()..e * spec.sft.size()];
                    let stats = kernel::extrapolate(spec, plan.alpha, a, b, out);
                    if stats.nonfinite_out > 0 {
                        let new = kernel::count_new_nonfinite(spec, a, b, out);
                        if new > 0 {
                            return Err(overflow_error(plan, p, spec, sft, aligned));
                        }
                    }
                    sft.1.release(a);
                    stats
                }
            };
            if stats.nonfinite_out > 0 {
                inherited[task.pair].fetch_add(stats.nonfinite_out, Ordering::Relaxed);
            }
            file.write_all_at(out, task.out_offset).map_err(write_err)?;
            aligned.1.release(b);
            Ok(out.len() as u64)
        }
    }
}

fn map_write_error(path: &Path, source: std::io::Error) -> EngineError {
    match source.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => EngineError::Io {
            path: path.to_path_buf(),
            op: "write (disk full or file too large)",
            source,
        },
        _ => EngineError::Io {
            path: path.to_path_buf(),
            op: "write",
            source,
        },
    }
}

/// Counts, over the whole tensor, the values that overflow although both inputs are finite.
fn overflow_error(
    plan: &Plan,
    p: &crate::plan::TensorPair,
    spec: KernelSpec,
    sft: (&Checkpoint, &MappedCheckpoint),
    aligned: (&Checkpoint, &MappedCheckpoint),
) -> EngineError {
    let t0 = sft.1.tensor(sft.0, p.sft);
    let t1 = aligned.1.tensor(aligned.0, p.aligned);
    let n = p.elements() as usize;
    let step = CHUNK_ELEMENTS as usize;
    let mut out = vec![0u8; step * spec.out.size()];
    let mut count = 0;
    let mut s = 0;
    while s < n {
        let e = (s + step).min(n);
        let a = &t0[s * spec.sft.size()..e * spec.sft.size()];
        let b = &t1[s * spec.aligned.size()..e * spec.aligned.size()];
        let o = &mut out[..(e - s) * spec.out.size()];
        if kernel::extrapolate(spec, plan.alpha, a, b, o).nonfinite_out > 0 {
            count += kernel::count_new_nonfinite(spec, a, b, o);
        }
        s = e;
    }
    EngineError::Overflow {
        tensor: p.name.clone(),
        count,
        elements: n as u64,
        dtype: spec.out,
        alpha: plan.alpha,
    }
}
