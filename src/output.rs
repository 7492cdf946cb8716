//! Atomic output: everything is written into a temporary sibling directory, synced, and
//! renamed into place only when complete. On any error the temporary directory is removed
//! and the output path is left as it was.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Prefix of the temporary directories expo creates beside the output.
pub const STAGING_PREFIX: &str = ".expo-tmp-";

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
            return Err(OutputError::NoParent {
                path: path.to_path_buf(),
                parent,
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

/// The staging directory currently in use, so that a second interrupt can remove it.
static ACTIVE: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Removes the active staging directory, if any (called on a forced exit).
pub fn remove_active_staging() {
    let active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(path) = active {
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
    /// Creates `.expo-tmp-<name>-<pid>` in the output's parent directory.
    pub fn create(target: &OutputTarget) -> Result<StagingDir, OutputError> {
        let path = target.parent.join(format!(
            "{STAGING_PREFIX}{}-{}",
            target.name,
            std::process::id()
        ));
        fs::create_dir(&path).map_err(io_err(&path, "create directory"))?;
        *ACTIVE.lock().unwrap_or_else(|p| p.into_inner()) = Some(path.clone());
        Ok(StagingDir {
            path,
            committed: false,
        })
    }

    /// The directory to write into.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Syncs the staging directory and moves it to the output path, replacing what was
    /// there; then syncs the parent so the rename is durable.
    pub fn commit(mut self, target: &OutputTarget) -> Result<(), OutputError> {
        sync_dir(&self.path)?;
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
                fs::remove_dir_all(&self.path).map_err(io_err(&self.path, "remove old output"))?;
            }
        }
        self.committed = true;
        ACTIVE.lock().unwrap_or_else(|p| p.into_inner()).take();
        sync_dir(&target.parent)
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.path);
            ACTIVE.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
    }
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

/// fsyncs a directory so that the entries created in it are durable.
pub fn sync_dir(path: &Path) -> Result<(), OutputError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err(path, "fsync directory"))
}
