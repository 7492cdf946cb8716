//! Atomic output: everything is written into a temporary sibling directory, synced, and
//! renamed into place only when complete. On any error the temporary directory is removed
//! and the output path is left as it was.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Prefix of the temporary directories expo creates beside the output.
pub const STAGING_PREFIX: &str = ".expo-tmp-";

/// A file inside every staging directory, so that only directories expo made are ever
/// removed as stale.
pub const STAGING_MARKER: &str = ".expo-staging";

/// What is at the output path before the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    Nothing,
    EmptyDir,
    /// A non-empty directory: replaced only with `--force`.
    Dir,
}

/// The validated output location.
#[derive(Debug, Clone)]
pub struct OutputTarget {
    /// The path as given.
    pub path: PathBuf,
    /// Its parent directory (which must exist).
    pub parent: PathBuf,
    /// Its last component.
    pub name: String,
    pub existing: Existing,
}

/// Errors about the output location.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("--output {path} already exists and is not empty; choose a new directory or pass --force to replace it")]
    Exists { path: PathBuf },
    #[error("--output {path} exists and is not a directory; expo will not replace it")]
    NotADirectory { path: PathBuf },
    #[error("--output {path}: its parent directory {parent} does not exist; create it first")]
    NoParent { path: PathBuf, parent: PathBuf },
    #[error("--output {path}: its parent {parent} is not a directory")]
    ParentNotADirectory { path: PathBuf, parent: PathBuf },
    #[error("--output {path}: cannot create expo's temporary directory in {parent}: {source}")]
    Unwritable {
        path: PathBuf,
        parent: PathBuf,
        source: io::Error,
    },
    #[error("--output {path} is not a usable directory name")]
    BadName { path: PathBuf },
    #[error("{path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
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

impl OutputTarget {
    /// Checks the output path: its parent must exist, and it must be absent, an empty
    /// directory, or (with `force`) a directory.
    pub fn check(path: &Path, force: bool) -> Result<OutputTarget, OutputError> {
        let name = match path.file_name() {
            Some(n) => n.to_string_lossy().into_owned(),
            None => {
                return Err(OutputError::BadName {
                    path: path.to_path_buf(),
                })
            }
        };
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(if parent.exists() {
                OutputError::ParentNotADirectory {
                    path: path.to_path_buf(),
                    parent,
                }
            } else {
                OutputError::NoParent {
                    path: path.to_path_buf(),
                    parent,
                }
            });
        }
        let existing = match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Existing::Nothing,
            Err(e) => return Err(io_err(path, "stat")(e)),
            Ok(m) if m.is_dir() => {
                let mut entries = fs::read_dir(path).map_err(io_err(path, "read"))?;
                if entries.next().is_none() {
                    Existing::EmptyDir
                } else if force {
                    Existing::Dir
                } else {
                    return Err(OutputError::Exists {
                        path: path.to_path_buf(),
                    });
                }
            }
            Ok(_) => {
                return Err(OutputError::NotADirectory {
                    path: path.to_path_buf(),
                })
            }
        };
        Ok(OutputTarget {
            path: path.to_path_buf(),
            parent,
            name,
            existing,
        })
    }
}

/// The staging directories currently in use, so that a second interrupt can remove them.
static ACTIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn active() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    ACTIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes the active staging directories, if any (called on a forced exit).
pub fn remove_active_staging() {
    for path in std::mem::take(&mut *active()) {
        let _ = fs::remove_dir_all(path);
    }
}

/// A temporary directory beside the output; removed on drop unless committed.
#[derive(Debug)]
pub struct StagingDir {
    path: PathBuf,
    committed: bool,
}

impl StagingDir {
    /// Creates `.expo-tmp-<name>-<pid>` in the output's parent directory, with a marker
    /// file that identifies it as expo's.
    pub fn create(target: &OutputTarget) -> Result<StagingDir, OutputError> {
        let path = target.parent.join(format!(
            "{STAGING_PREFIX}{}-{}",
            target.name,
            std::process::id()
        ));
        fs::create_dir(&path).map_err(|source| OutputError::Unwritable {
            path: target.path.clone(),
            parent: target.parent.clone(),
            source,
        })?;
        active().push(path.clone());
        let staging = StagingDir {
            path,
            committed: false,
        };
        let marker = staging.path.join(STAGING_MARKER);
        fs::write(&marker, format!("{}\n", std::process::id()))
            .map_err(io_err(&marker, "create"))?;
        Ok(staging)
    }

    /// The directory to write into.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the marker, syncs the staging directory and moves it to the output path,
    /// replacing what was there; then syncs the parent so the rename is durable.
    pub fn commit(mut self, target: &OutputTarget) -> Result<(), OutputError> {
        let marker = self.path.join(STAGING_MARKER);
        fs::remove_file(&marker).map_err(io_err(&marker, "remove"))?;
        sync_tree(&self.path)?;
        match target.existing {
            Existing::Nothing | Existing::EmptyDir => {
                // rename(2) replaces an empty directory atomically.
                fs::rename(&self.path, &target.path)
                    .map_err(io_err(&target.path, "rename into place"))?;
            }
            Existing::Dir => {
                if exchange(&self.path, &target.path).is_ok() {
                    // The old output now sits at the staging path; drop it below.
                } else {
                    // No atomic exchange on this filesystem: move the old one aside first.
                    let aside = target.parent.join(format!(
                        "{STAGING_PREFIX}{}-{}-old",
                        target.name,
                        std::process::id()
                    ));
                    fs::rename(&target.path, &aside).map_err(io_err(&target.path, "move aside"))?;
                    if let Err(e) = fs::rename(&self.path, &target.path) {
                        let _ = fs::rename(&aside, &target.path);
                        return Err(io_err(&target.path, "rename into place")(e));
                    }
                    fs::rename(&aside, &self.path).map_err(io_err(&aside, "rename"))?;
                }
                // Mark the old output, now at the staging path, as ours: if expo is killed
                // while deleting it, the next run finishes the job.
                let _ = fs::write(&marker, format!("{}\n", std::process::id()));
                fs::remove_dir_all(&self.path).map_err(io_err(&self.path, "remove old output"))?;
            }
        }
        self.committed = true;
        active().retain(|p| p != &self.path);
        sync_dir(&target.parent)
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.path);
            active().retain(|p| p != &self.path);
        }
    }
}

/// Removes staging directories in `parent` left behind by expo runs that were killed
/// (SIGKILL, power loss): those named `.expo-tmp-*` that hold expo's marker file and whose
/// process is gone. Returns the directories removed.
pub fn remove_stale_staging(parent: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(parent) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(STAGING_PREFIX) else {
            continue;
        };
        let path = entry.path();
        // Never follow a link, never touch a directory without our marker.
        let is_dir = fs::symlink_metadata(&path)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        let Ok(marker) = fs::read_to_string(path.join(STAGING_MARKER)) else {
            continue;
        };
        let pid: Option<i32> = marker.trim().parse().ok();
        let named_pid = rest.rsplit('-').next().and_then(|p| p.parse::<i32>().ok());
        let (Some(pid), true) = (pid, is_dir) else {
            continue;
        };
        if named_pid != Some(pid) || pid as u32 == std::process::id() || process_alive(pid) {
            continue;
        }
        if fs::remove_dir_all(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// True when a process with this id exists.
fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return true; // not a real pid: leave it alone
    }
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Atomically swaps two directory entries (Linux `renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let ca = CString::new(a.as_os_str().as_bytes())?;
        let cb = CString::new(b.as_os_str().as_bytes())?;
        // SAFETY: both strings are valid NUL-terminated paths that outlive the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// fsyncs a directory and every directory below it (shard or side-file subdirectories), so
/// that all the entries created in them are durable. Links are not followed.
fn sync_tree(path: &Path) -> Result<(), OutputError> {
    for entry in fs::read_dir(path).map_err(io_err(path, "read directory"))? {
        let entry = entry.map_err(io_err(path, "read directory"))?;
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            sync_tree(&entry.path())?;
        }
    }
    sync_dir(path)
}

/// fsyncs a directory so that the entries created in it are durable.
pub fn sync_dir(path: &Path) -> Result<(), OutputError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err(path, "fsync directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dead_marked_staging_directories_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        // A dead process's staging directory (pid 0x7ffffffe does not exist).
        let dead = p.join(format!("{STAGING_PREFIX}out-2147483646"));
        fs::create_dir(&dead).unwrap();
        fs::write(dead.join(STAGING_MARKER), "2147483646\n").unwrap();
        fs::write(dead.join("model.safetensors"), b"partial").unwrap();
        // Ours (this process is alive).
        let alive = p.join(format!("{STAGING_PREFIX}out-{}", std::process::id()));
        fs::create_dir(&alive).unwrap();
        fs::write(
            alive.join(STAGING_MARKER),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        // Same name pattern but no marker: not ours.
        let foreign = p.join(format!("{STAGING_PREFIX}out-2147483645"));
        fs::create_dir(&foreign).unwrap();
        // A marker whose pid disagrees with the name.
        let odd = p.join(format!("{STAGING_PREFIX}x-2147483644"));
        fs::create_dir(&odd).unwrap();
        fs::write(odd.join(STAGING_MARKER), "12\n").unwrap();
        // Unrelated directory.
        fs::create_dir(p.join("keep")).unwrap();

        let removed = remove_stale_staging(p);
        assert_eq!(removed, vec![dead.clone()]);
        assert!(!dead.exists());
        assert!(alive.exists() && foreign.exists() && odd.exists() && p.join("keep").exists());
    }
}
