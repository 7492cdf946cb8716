//! Reading the inputs: read-only maps of a checkpoint's shards, checked against the
//! headers that were validated, guarded against truncation while mapped (SIGBUS, see
//! [`crate::interrupt`]), and released page by page as work moves on.

use std::path::PathBuf;

use memmap2::{Mmap, UncheckedAdvice};

use crate::checkpoint::{Checkpoint, TensorLoc};
use crate::error::EngineError;

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
