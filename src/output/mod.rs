//! Atomic output: everything is written into a temporary sibling directory, synced, and
//! renamed into place only when complete. On any error the temporary directory is removed
//! and the output path is left as it was.
//!
//! # Temporary directories and stale cleanup
//!
//! A run's temporary ("staging") directory is `.expo-tmp-<name>-<pid>-<random>` beside the
//! output, `<name>` being the output's name cut to its first `STAGING_NAME_PART` bytes (so
//! the staging name fits the file system's name limit whatever the output's name). The
//! random part (64 bits from `/dev/urandom`) makes the name unique even when
//! pids repeat, as they do across containers (every container's first process is pid 1)
//! and across pid namespaces sharing a volume. The pid is only informative.
//!
//! Each staging directory holds a marker file, [`STAGING_MARKER`], that the run keeps open
//! with an exclusive `flock(2)` for its whole life. A later run treats a directory as left
//! behind by a killed run only if it is a real directory (not a symlink) named
//! `.expo-tmp-*`, holds the marker as a regular file with expo's content, and
//! `flock(LOCK_EX | LOCK_NB)` on that marker succeeds: the kernel drops a dead process's
//! locks, whatever its pid or namespace, and keeps a live one's (on NFS through the lock
//! manager). Nothing else is ever removed. Where `flock` is unsupported nothing is removed.
//! The marker's first line says what the directory holds (its second line is the output's
//! whole name):
//!
//! - `expo-staging <pid>`: a run's temporary directory (removed when stale);
//! - `expo-old <pid>`: a previous output that `--force` has replaced (removed when stale);
//! - `expo-aside <pid>`: a previous output moved aside by `--force` on a file system that
//!   cannot swap directories, before the new one was in place. Never removed: a stale one
//!   is reported, with where it belongs, so that it can be moved back.
//!
//! Under `--force`, the previous output is replaced only if it is still the directory
//! validated at the start (device and inode, not a link) and still looks like a checkpoint,
//! checked on what was actually moved aside; it, and any staging directory, is deleted
//! through directory handles (`openat`/`unlinkat` with `O_NOFOLLOW`), so that a path
//! swapped for a link during the run never leads expo outside the tree it made or checked.
//!
//! Directories from expo versions before the random suffix (`.expo-tmp-<name>-<pid>`, the
//! marker holding just the pid) are removed only when, in addition, their pid is this
//! process's own or names no process.

mod commit;
mod dirfd;
mod marker;
mod remove;
mod staging;
mod stale;
mod target;
#[cfg(test)]
mod test_support;

pub use commit::{sync_dir, CommitOutcome};
pub use remove::{remove_identified, NotRemoved};
pub use staging::{remove_active_staging, StagingDir};
pub use stale::{clean_stale_staging, StaleCleanup};
pub use target::{check_overlap, location_clash, Existing, OutputTarget};

use std::io;
use std::path::{Path, PathBuf};

/// Prefix of the temporary directories expo creates beside the output.
pub const STAGING_PREFIX: &str = ".expo-tmp-";

/// A file inside every staging directory (and every old output being deleted), held
/// locked by the run that made it, so that only directories expo made, and whose run is
/// gone, are ever removed as stale.
pub const STAGING_MARKER: &str = ".expo-staging";

/// Suffix of the name a previous output is moved to under `--force` when the file system
/// cannot swap two directories atomically: `.expo-tmp-<name>-<pid>-<random>-old`.
pub const ASIDE_SUFFIX: &str = "-old";

/// Marker contents (followed by a space and the pid).
const MARK_STAGING: &str = "expo-staging";
const MARK_OLD: &str = "expo-old";
const MARK_ASIDE: &str = "expo-aside";

/// Errors about the output location.
///
/// A variant that carries an I/O error returns it as its `source()` and does not repeat it
/// in its message: `{:#}` prints the chain, so every cause appears once.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("--output {path} already exists and is not empty; choose a new directory or pass --force to replace it")]
    Exists { path: PathBuf },
    #[error("--output {path} exists and is not a directory; expo will not replace it")]
    NotADirectory { path: PathBuf },
    #[error("--output {path} is a symbolic link; expo neither replaces a link nor writes through one: give the directory itself{}", link_target.as_ref().map(|t| format!(" ({})", t.display())).unwrap_or_default())]
    Symlink {
        path: PathBuf,
        link_target: Option<PathBuf>,
    },
    #[error("--output {path} does not look like a model checkpoint (it has no expo.json, config.json, model.safetensors.index.json or *.safetensors file at its top level), so expo will not replace it, even with --force; choose a new directory, or remove this one by hand first if it really is to be replaced")]
    NotACheckpoint { path: PathBuf },
    #[error("--output {path} is {why}, so expo will not replace it, even with --force; choose a new directory, or remove this one by hand first if it really is to be replaced")]
    Protected { path: PathBuf, why: String },
    #[error("--output {path} cannot be replaced: {why}; nothing was written")]
    CannotReplace { path: PathBuf, why: String },
    #[error("--output {path} changed while expo ran: it is no longer the checkpoint directory expo checked at the start (it was replaced, or its content no longer looks like a checkpoint), so expo left it untouched and wrote nothing; check what is there and run again")]
    Changed { path: PathBuf },
    #[error("--output {path} changed while expo ran (it is no longer the directory expo checked at the start), and it could not be put back: the new output is at {path} and what had been put there is now at {aside}; check both by hand")]
    ChangedLeftAside { path: PathBuf, aside: PathBuf },
    #[error("--output {path}: its parent directory {parent} does not exist; create it first")]
    NoParent { path: PathBuf, parent: PathBuf },
    #[error("--output {path}: its parent {parent} is not a directory")]
    ParentNotADirectory { path: PathBuf, parent: PathBuf },
    #[error("--output {path}: cannot create expo's temporary directory in {parent}")]
    Unwritable {
        path: PathBuf,
        parent: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--output {path} is not a usable directory name")]
    BadName { path: PathBuf },
    #[error("--output {path} ends in `{tail}`; write the output directory's own name instead (expo creates or replaces the directory that the last component names)")]
    DotName { path: PathBuf, tail: &'static str },
    #[error("--output {path}: names starting with `{STAGING_PREFIX}` are reserved for expo's temporary directories")]
    ReservedName { path: PathBuf },
    #[error("{path}: rename into place failed, and its previous content could not be moved back: it is now at {aside}; move it back by hand (`mv {aside} {path}`)")]
    LeftAside {
        path: PathBuf,
        aside: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {op} failed")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> OutputError + 'a {
    move |source| OutputError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_causes_are_chained_not_repeated() {
        let e = io_err(Path::new("/x"), "rename into place")(io::Error::from_raw_os_error(
            libc::EACCES,
        ));
        let shown = format!("{:#}", anyhow::Error::new(e));
        assert_eq!(shown.matches("Permission denied").count(), 1, "{shown}");
        let e = OutputError::Unwritable {
            path: "/p/out".into(),
            parent: "/p".into(),
            source: io::Error::from_raw_os_error(libc::EROFS),
        };
        let shown = format!("{:#}", anyhow::Error::new(e));
        assert_eq!(shown.matches("Read-only file system").count(), 1, "{shown}");
    }
}
