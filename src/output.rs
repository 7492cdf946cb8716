//! Atomic output: everything is written into a temporary sibling directory, synced, and
//! renamed into place only when complete. On any error the temporary directory is removed
//! and the output path is left as it was.
//!
//! # Temporary directories and stale cleanup
//!
//! A run's temporary ("staging") directory is `.expo-tmp-<name>-<pid>-<random>` beside the
//! output, `<name>` being the output's name cut to its first [`STAGING_NAME_PART`] bytes (so
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

use std::ffi::{CStr, CString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// Output names expo never creates or replaces by itself, even with `--force`: the files
/// that make a directory recognisable as a model checkpoint.
const CHECKPOINT_FILES: [&str; 3] = ["expo.json", "config.json", "model.safetensors.index.json"];

/// What is at the output path before the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    Nothing,
    EmptyDir,
    /// A non-empty directory: replaced only with `--force`.
    Dir,
}

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

/// What a file is, whatever its name: its device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(m: &fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

/// The validated output location.
#[derive(Debug, Clone)]
pub struct OutputTarget {
    /// The path as given, without trailing slashes.
    pub path: PathBuf,
    /// Its parent directory (which must exist).
    pub parent: PathBuf,
    /// Its last component.
    pub name: String,
    pub existing: Existing,
    /// The parent directory's identity: two targets with the same parent identity and name
    /// are the same location, however they are spelled.
    parent_id: FileId,
    /// The existing directory's identity, checked again when it is replaced: `--force`
    /// replaces only the very directory it validated.
    existing_id: Option<FileId>,
}

impl OutputTarget {
    /// Checks the output path: its parent must exist, and it must be absent, an empty
    /// directory, or (with `force`) a directory that looks like a model checkpoint; and it
    /// must not be `/`, the home directory or the current directory (or contain them).
    /// Equivalent to [`OutputTarget::locate`] followed by
    /// [`OutputTarget::check_replaceable`].
    pub fn check(path: &Path, force: bool) -> Result<OutputTarget, OutputError> {
        let target = OutputTarget::locate(path, force)?;
        target.check_replaceable()?;
        Ok(target)
    }

    /// The first half of [`OutputTarget::check`]: the parent must exist, the name must be
    /// usable (not ending in `.` or `..`), the path must not be a symbolic link (also when
    /// written `link/`), and it must be absent, an empty directory, or (with `force`) a
    /// non-empty directory. Does not look at what a non-empty directory holds: call
    /// [`OutputTarget::check_replaceable`] before writing anything (a caller may check
    /// other things in between, so that their errors take precedence).
    pub fn locate(path: &Path, force: bool) -> Result<OutputTarget, OutputError> {
        let given = path;
        // `out/` is `out`; but `out/.` and `out/..` are refused: `.` and `..` cannot be
        // renamed, and what they name is not what the user sees.
        let mut bytes = path.as_os_str().as_bytes();
        while bytes.len() > 1 && bytes.ends_with(b"/") {
            bytes = &bytes[..bytes.len() - 1];
        }
        let last = bytes.rsplit(|&b| b == b'/').next().unwrap_or(bytes);
        if last == b"." || last == b".." {
            return Err(OutputError::DotName {
                path: given.to_path_buf(),
                tail: if last == b"." { "." } else { ".." },
            });
        }
        let path = Path::new(std::ffi::OsStr::from_bytes(bytes));
        let name = match path.file_name() {
            Some(n) => n.to_string_lossy().into_owned(),
            None => {
                return Err(OutputError::BadName {
                    path: given.to_path_buf(),
                })
            }
        };
        if name.starts_with(STAGING_PREFIX) {
            return Err(OutputError::ReservedName {
                path: path.to_path_buf(),
            });
        }
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let parent_id = match fs::metadata(&parent) {
            Ok(m) if m.is_dir() => FileId::of(&m),
            Ok(_) => {
                return Err(OutputError::ParentNotADirectory {
                    path: path.to_path_buf(),
                    parent,
                })
            }
            // A dangling link, say.
            Err(_) if parent.symlink_metadata().is_ok() => {
                return Err(OutputError::ParentNotADirectory {
                    path: path.to_path_buf(),
                    parent,
                })
            }
            Err(_) => {
                return Err(OutputError::NoParent {
                    path: path.to_path_buf(),
                    parent,
                })
            }
        };
        let mut existing_id = None;
        let existing = match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Existing::Nothing,
            Err(e) => return Err(io_err(path, "stat")(e)),
            Ok(m) if m.file_type().is_symlink() => {
                return Err(OutputError::Symlink {
                    path: given.to_path_buf(),
                    link_target: fs::read_link(path).ok(),
                })
            }
            Ok(m) if m.is_dir() => {
                existing_id = Some(FileId::of(&m));
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
            parent_id,
            existing_id,
        })
    }

    /// The second half of [`OutputTarget::check`]. Expo must be able to create its
    /// temporary directory in the parent, and to rename there. An existing directory is
    /// refused, even with `--force`, when it is `/`, the home directory (`$HOME`), the
    /// current directory, or one of their ancestors (compared after resolving symlinks); a
    /// non-empty one also when it does not look like a model checkpoint: none of
    /// `expo.json`, `config.json`, `model.safetensors.index.json`, a
    /// `*.safetensors.index.json` or a `*.safetensors` file at its top level. So a mistyped
    /// `--output ~/project --force` deletes nothing. A non-empty one is also refused when
    /// its old content could not be moved aside or deleted once the new output is complete
    /// (a read-only directory in it, a sticky parent it does not belong to): that is found
    /// now, before the computation, not after it.
    pub fn check_replaceable(&self) -> Result<(), OutputError> {
        if let Err(source) = access(&self.parent, libc::W_OK | libc::X_OK) {
            return Err(OutputError::Unwritable {
                path: self.path.clone(),
                parent: self.parent.clone(),
                source,
            });
        }
        if self.existing == Existing::Nothing {
            return Ok(());
        }
        let out = fs::canonicalize(&self.path).map_err(io_err(&self.path, "resolve"))?;
        if let Some(why) = protected(&out) {
            return Err(OutputError::Protected {
                path: self.path.clone(),
                why,
            });
        }
        if self.existing != Existing::Dir {
            return Ok(());
        }
        let dir = open_dir(&self.path).map_err(io_err(&self.path, "open"))?;
        if !looks_like_checkpoint(&dir).map_err(io_err(&self.path, "read"))? {
            return Err(OutputError::NotACheckpoint {
                path: self.path.clone(),
            });
        }
        let cannot = |why: String| OutputError::CannotReplace {
            path: self.path.clone(),
            why,
        };
        if let Some(why) = sticky_refusal(&self.parent, &dir) {
            return Err(cannot(why));
        }
        if let Some((sub, e)) = first_undeletable(&dir, &self.path, 0) {
            return Err(cannot(format!(
                "{} is not writable ({e}), so its old content could not be deleted after the new output is in place; make it writable (`chmod -R u+w {}`) or remove it by hand",
                sub.display(),
                self.path.display()
            )));
        }
        Ok(())
    }

    /// True when both name the same directory entry: the same name in the same parent
    /// directory, compared by device and inode, so that `d/0.1/../out` and `d/0.2/../out`,
    /// or parents reached through different symlinks, are the same location.
    pub fn same_location(&self, other: &OutputTarget) -> bool {
        self.parent_id == other.parent_id && self.name == other.name
    }
}

/// When several outputs are written in one run (a sweep): the message for `target` naming
/// the same location as one of `earlier`, if it does (a usage error: only one could
/// survive).
pub fn location_clash<'a>(
    earlier: impl IntoIterator<Item = &'a OutputTarget>,
    target: &OutputTarget,
) -> Option<String> {
    let first = earlier.into_iter().find(|o| o.same_location(target))?;
    let resolved = fs::canonicalize(&target.parent)
        .map(|p| p.join(&target.name))
        .unwrap_or_else(|_| target.path.clone());
    Some(format!(
        "--output names the same directory twice: {} and {} are both {}; give each alpha value its own output directory",
        first.path.display(),
        target.path.display(),
        resolved.display()
    ))
}

/// `access(2)` with the effective ids: can this process `mode` (`W_OK | X_OK`…) `path`?
fn access(path: &Path, mode: libc::c_int) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), mode, libc::AT_EACCESS) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Why a directory in a sticky parent (such as `/tmp`) cannot be renamed by this process,
/// if it cannot: only its owner, the parent's owner or root may.
fn sticky_refusal(parent: &Path, dir: &File) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let p = fs::metadata(parent).ok()?;
    let d = dir.metadata().ok()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    sticky_forbids_rename(p.mode(), p.uid(), d.uid(), euid).then(|| {
            format!(
                "its parent {} is sticky and the directory belongs to another user, so expo could not move it aside",
                parent.display()
            )
        })
}

/// True when a sticky parent (mode bit 0o1000, as `/tmp`) forbids user `euid` to rename an
/// entry that belongs to `entry_uid` (only the entry's owner, the parent's owner and root
/// may).
fn sticky_forbids_rename(parent_mode: u32, parent_uid: u32, entry_uid: u32, euid: u32) -> bool {
    parent_mode & 0o1000 != 0 && euid != 0 && euid != entry_uid && euid != parent_uid
}

/// The first directory in the tree of `dir` (itself included) in which this process cannot
/// delete entries, with the reason. Links are not followed.
fn first_undeletable(dir: &File, path: &Path, depth: usize) -> Option<(PathBuf, io::Error)> {
    // SAFETY: a valid descriptor and a NUL-terminated path that outlive the call.
    let rc = unsafe {
        libc::faccessat(
            dir.as_raw_fd(),
            c".".as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        )
    };
    if rc != 0 {
        return Some((path.to_path_buf(), io::Error::last_os_error()));
    }
    for name in dir_names(dir).ok()? {
        let is_dir = stat_at(dir, &name, false).is_ok_and(|st| is_dir_mode(st.st_mode));
        if !is_dir {
            continue;
        }
        let sub_path = path.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        // As deep as the deletion goes, and no deeper.
        if depth >= MAX_DEPTH {
            return Some((sub_path, too_deep()));
        }
        match open_dir_at(dir, &name) {
            Ok(sub) => {
                if let Some(found) = first_undeletable(&sub, &sub_path, depth + 1) {
                    return Some(found);
                }
            }
            Err(e) => return Some((sub_path, e)),
        }
    }
    None
}

/// Why a resolved output directory must never be replaced, if it must not.
fn protected(out: &Path) -> Option<String> {
    if out.parent().is_none() {
        return Some("the root directory".into());
    }
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        let home = fs::canonicalize(&home).unwrap_or_else(|_| PathBuf::from(&home));
        if home == out {
            return Some("your home directory ($HOME)".into());
        }
        if home.starts_with(out) {
            return Some(format!(
                "a parent of your home directory {}",
                home.display()
            ));
        }
    }
    if let Ok(cwd) = std::env::current_dir().and_then(fs::canonicalize) {
        if cwd == out {
            return Some("the current directory".into());
        }
        if cwd.starts_with(out) {
            return Some(format!(
                "a parent of the current directory {}",
                cwd.display()
            ));
        }
    }
    None
}

/// True when `dir` holds, at its top level, a regular file (or a link to one) that a model
/// checkpoint (or an expo output) has.
fn looks_like_checkpoint(dir: &File) -> io::Result<bool> {
    for name in dir_names(dir)? {
        let text = String::from_utf8_lossy(name.to_bytes());
        let known = CHECKPOINT_FILES.contains(&text.as_ref())
            || text.ends_with(".safetensors")
            || crate::checkpoint::is_index_name(&text);
        if known && stat_at(dir, &name, true).is_ok_and(|st| is_file_mode(st.st_mode)) {
            return Ok(true);
        }
    }
    Ok(false)
}

// ---------------------------------------------------------------------------------------
// Directory handles: every step below the directory first opened is relative to an open
// descriptor and refuses links, so a path swapped during the run never leads elsewhere.
// ---------------------------------------------------------------------------------------

/// Deepest directory level expo walks inside an output (checkpoints are shallow).
const MAX_DEPTH: usize = 64;

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn is_dir_mode(mode: libc::mode_t) -> bool {
    mode & libc::S_IFMT == libc::S_IFDIR
}

fn is_file_mode(mode: libc::mode_t) -> bool {
    mode & libc::S_IFMT == libc::S_IFREG
}

/// Opens a directory, refusing a symbolic link in the last component.
fn open_dir(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Opens the directory `name` inside `dir`, refusing a symbolic link.
fn open_dir_at(dir: &File, name: &CStr) -> io::Result<File> {
    // SAFETY: a valid descriptor and a NUL-terminated name that outlive the call.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// `fstatat(2)` of `name` in `dir`, following a final link only when `follow`.
fn stat_at(dir: &File, name: &CStr, follow: bool) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    let flags = if follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
    // SAFETY: a valid descriptor, a NUL-terminated name and a buffer of the right type.
    let rc = unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), flags) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatat succeeded, so it filled the buffer.
    Ok(unsafe { st.assume_init() })
}

/// `unlinkat(2)`: removes `name` in `dir` (an empty directory with `AT_REMOVEDIR`).
fn unlink_at(dir: &File, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid descriptor and a NUL-terminated name that outlive the call.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The entry names of an open directory (without `.` and `..`).
fn dir_names(dir: &File) -> io::Result<Vec<CString>> {
    // SAFETY: duplicating a valid descriptor; the copy is owned by the stream below.
    let fd = unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a directory descriptor we own; on success the stream owns it.
    let stream = unsafe { libc::fdopendir(fd) };
    if stream.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: `fd` is still ours (fdopendir failed) and closed once.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    // The copy shares its offset with `dir`: start from the beginning.
    // SAFETY: a valid stream.
    unsafe { libc::rewinddir(stream) };
    let mut names = Vec::new();
    loop {
        // SAFETY: a valid stream; the entry stays valid until the next call on it.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            break;
        }
        // SAFETY: `d_name` is a NUL-terminated string inside the entry.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    // SAFETY: closes the stream (and its descriptor) exactly once.
    unsafe { libc::closedir(stream) };
    Ok(names)
}

/// Removes everything inside the open directory `dir` except the entry `keep`: files and
/// links are unlinked (a link is never followed), subdirectories opened relative to their
/// parent without following links and emptied the same way. Never leaves the tree, however
/// its paths are renamed or swapped meanwhile. Goes on after an error; returns the first.
fn remove_contents(dir: &File, keep: Option<&CStr>, depth: usize) -> io::Result<()> {
    let mut first_error = None;
    for name in dir_names(dir)? {
        if Some(name.as_c_str()) == keep {
            continue;
        }
        if let Err(e) = remove_entry_at(dir, &name, depth) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn too_deep() -> io::Error {
    io::Error::other(format!("more than {MAX_DEPTH} nested directories"))
}

fn remove_entry_at(dir: &File, name: &CStr, depth: usize) -> io::Result<()> {
    let st = match stat_at(dir, name, false) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        r => r?,
    };
    if !is_dir_mode(st.st_mode) {
        return unlink_at(dir, name, 0);
    }
    if depth >= MAX_DEPTH {
        return Err(too_deep());
    }
    // O_NOFOLLOW: a directory swapped for a link since the stat is refused, not followed.
    let sub = open_dir_at(dir, name)?;
    remove_contents(&sub, None, depth + 1)?;
    unlink_at(dir, name, libc::AT_REMOVEDIR)
}

/// Removes the entry at `path` if it still is the directory `id` (an empty one, once its
/// content is gone): a directory renamed away, or replaced by anything else, is not.
fn remove_dir_if(path: &Path, id: FileId) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() && FileId::of(&m) == id => fs::remove_dir(path),
        Ok(_) => Err(io::Error::other(
            "it was moved or replaced during the run; its content was deleted",
        )),
        Err(e) => Err(e),
    }
}

/// Removes an open marked directory, found at `path`: its content, the marker last (so
/// that what a failure or a kill leaves is still recognisable), then the directory itself
/// if `path` still names it.
fn remove_marked_dir(dir: &File, path: &Path) -> io::Result<()> {
    let id = FileId::of(&dir.metadata()?);
    remove_contents(dir, Some(MARKER_C), 0)?;
    match unlink_at(dir, MARKER_C, 0) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    remove_dir_if(path, id)
}

/// Removes the marked directory at `path` (not through a link), when it is `expected`
/// (or whatever directory is there, when `None`).
fn remove_marked_tree(path: &Path, expected: Option<FileId>) -> io::Result<()> {
    let dir = open_dir(path)?;
    if expected.is_some_and(|id| dir.metadata().is_ok_and(|m| FileId::of(&m) != id)) {
        return Err(io::Error::other("it is not the directory expo made"));
    }
    remove_marked_dir(&dir, path)
}

/// [`STAGING_MARKER`] for the `*at` calls.
const MARKER_C: &CStr = c".expo-staging";

/// The staging directories currently in use, with their identities, so that a second
/// interrupt can remove them. [`StagingDir::commit`] holds this lock while it renames, so
/// that the removal never races a rename into place.
static ACTIVE: Mutex<Vec<(PathBuf, FileId)>> = Mutex::new(Vec::new());

fn active() -> std::sync::MutexGuard<'static, Vec<(PathBuf, FileId)>> {
    ACTIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes the active staging directories, if any (called on a forced exit): each only if
/// its path still names the directory expo made.
pub fn remove_active_staging() {
    for (path, id) in std::mem::take(&mut *active()) {
        let _ = remove_marked_tree(&path, Some(id));
    }
}

/// Refuses (usage error) an output that is, contains, or lies inside the input given with
/// `flag`, holds the data behind a symlinked weight file, or lies in a Hub input's cache
/// entry. Shared with the adapter path.
pub fn check_overlap(
    target: &OutputTarget,
    flag: &str,
    ck: &crate::checkpoint::Checkpoint,
    resolved: &crate::hub::ResolvedInput,
) -> anyhow::Result<()> {
    let parent = std::fs::canonicalize(&target.parent).map_err(|e| {
        anyhow::Error::new(e).context(format!("resolving {}", target.parent.display()))
    })?;
    let out = parent.join(&target.name);
    let input = canonical_or_given(&resolved.path);
    let root = canonical_or_given(&ck.root);
    let mut clash = out == input
        || out.starts_with(&root) && ck.is_dir
        || out.starts_with(&input)
        || input.starts_with(&out);
    // Weight files may be symlinks (the Hugging Face cache links them into blobs/).
    clash |= ck
        .shards
        .iter()
        .any(|s| canonical_or_given(&s.path).starts_with(&out));
    if let Some(repo_dir) = &resolved.repo_dir {
        let repo_dir = canonical_or_given(repo_dir);
        clash |= out.starts_with(&repo_dir) || repo_dir.starts_with(&out);
    }
    if clash {
        return Err(crate::error::UsageError(format!(
            "--output {} overlaps {flag} {}; write the result somewhere else",
            target.path.display(),
            ck.given.display()
        ))
        .into());
    }
    Ok(())
}

/// The canonical form of `path`, or `path` itself when it cannot be resolved.
fn canonical_or_given(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// What a successful [`StagingDir::commit`] could not finish. The new output is in place
/// either way; these are for warnings, not errors.
#[derive(Debug, Default)]
pub struct CommitOutcome {
    /// Under `--force`: the previous output, which could not be (completely) deleted, where
    /// it now is, and why. It is marked, so a later run in the same directory removes it.
    pub leftover: Option<(PathBuf, io::Error)>,
    /// The parent directory, whose fsync after the rename failed: the new output is in
    /// place but may not survive a power loss.
    pub unsynced: Option<(PathBuf, io::Error)>,
}

impl CommitOutcome {
    /// One line per problem, for `warning: …`.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if let Some((path, e)) = &self.leftover {
            w.push(format!(
                "the previous output could not be deleted completely ({e}); what is left of it is {}: remove it by hand (the next expo run in that directory will also try)",
                path.display()
            ));
        }
        if let Some((path, e)) = &self.unsynced {
            w.push(format!(
                "fsync of {} failed after the output was renamed into place ({e}); the output may not survive a power loss",
                path.display()
            ));
        }
        w
    }
}

/// Longest part of the output's name that goes into a staging directory's name, so that
/// the staging name (`.expo-tmp-` + this + `-<pid>-<random>-old`) fits every file system's
/// name limit whatever the output's name. The whole name is in the marker.
const STAGING_NAME_PART: usize = 48;

/// The output's name as it appears in staging names: at most [`STAGING_NAME_PART`] bytes,
/// cut at a character boundary.
fn staging_stem(name: &str) -> &str {
    let mut end = name.len().min(STAGING_NAME_PART);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// A temporary directory beside the output; removed on drop unless committed.
#[derive(Debug)]
pub struct StagingDir {
    path: PathBuf,
    /// The directory's identity: only this directory is ever removed under its name.
    id: FileId,
    /// The marker, open and `flock`ed for the life of the value: while it is held, no other
    /// run takes this directory for a dead run's.
    _lock: File,
    committed: bool,
}

/// The previous output after a `--force` swap: where it is, open, with its marker's lock.
struct OldOutput {
    path: PathBuf,
    dir: File,
    _lock: Option<File>,
}

impl StagingDir {
    /// Creates `.expo-tmp-<name>-<pid>-<random>` in the output's parent directory (the
    /// name cut to [`STAGING_NAME_PART`] bytes), with a locked marker file that identifies
    /// it as a live run's.
    pub fn create(target: &OutputTarget) -> Result<StagingDir, OutputError> {
        let pid = std::process::id();
        let stem = staging_stem(&target.name);
        let mut attempts = 0;
        let path = loop {
            let path = target
                .parent
                .join(format!("{STAGING_PREFIX}{stem}-{pid}-{}", random_token()));
            match fs::create_dir(&path) {
                Ok(()) => break path,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 8 => attempts += 1,
                Err(source) => {
                    return Err(OutputError::Unwritable {
                        path: target.path.clone(),
                        parent: target.parent.clone(),
                        source,
                    })
                }
            }
        };
        let dir = match open_dir(&path) {
            Ok(dir) => dir,
            Err(e) => return Err(io_err(&path, "open")(e)),
        };
        let made = dir.metadata().map(|m| FileId::of(&m));
        let marked = made.map_err(io_err(&path, "stat")).and_then(|id| {
            Ok((
                id,
                create_marker(&dir, &path, MARK_STAGING, &target.name, true)?,
            ))
        });
        let (id, lock) = match marked {
            Ok(v) => v,
            Err(e) => {
                let _ = remove_marked_dir(&dir, &path);
                return Err(e);
            }
        };
        active().push((path.clone(), id));
        crate::interrupt::on_forced_exit("staging directories", remove_active_staging);
        Ok(StagingDir {
            path,
            id,
            _lock: lock,
            committed: false,
        })
    }

    /// The directory to write into.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Syncs the staging directory, removes the marker and moves the directory to the
    /// output path, replacing what was there; then syncs the parent so the rename is
    /// durable. An error means the output path is as it was (see
    /// [`OutputError::LeftAside`] and [`OutputError::ChangedLeftAside`] for the
    /// exceptions). Once the new output is in place the result is `Ok`, with what could not
    /// be finished in the [`CommitOutcome`].
    ///
    /// Under `--force` the previous output is replaced only if it still is the very
    /// directory [`OutputTarget::locate`] validated (same device and inode, not a link) and
    /// still looks like a checkpoint, checked on what was actually moved aside; otherwise
    /// it is put back untouched and the commit fails with [`OutputError::Changed`]. It is
    /// then deleted through directory handles, never following a link and never leaving
    /// its tree.
    pub fn commit(mut self, target: &OutputTarget) -> Result<CommitOutcome, OutputError> {
        sync_tree(&self.path)?;
        let marker = self.path.join(STAGING_MARKER);
        fs::remove_file(&marker).map_err(io_err(&marker, "remove"))?;
        // A kill from here to the rename leaves a complete but unmarked staging directory,
        // which no run removes (a window of one unlink, one fsync and one rename).
        sync_dir(&self.path)?;
        let mut outcome = CommitOutcome::default();
        let old = match target.existing {
            Existing::Nothing | Existing::EmptyDir => {
                let mut active = active();
                // rename(2) replaces an empty directory atomically; it fails on anything
                // else (a non-empty directory, a file, a link) that appeared meanwhile.
                fs::rename(&self.path, &target.path)
                    .map_err(io_err(&target.path, "rename into place"))?;
                self.committed = true;
                active.retain(|(p, _)| p != &self.path);
                None
            }
            Existing::Dir => Some(self.swap(target)?),
        };
        if let Err(OutputError::Io { path, source, .. }) = sync_dir(&target.parent) {
            outcome.unsynced = Some((path, source));
        }
        if let Some(old) = old {
            crate::failpoint::pause("output-remove-old");
            // The marker goes last, so that what a failure or a kill leaves is still marked.
            if let Err(e) = remove_marked_dir(&old.dir, &old.path) {
                outcome.leftover = Some((old.path, e));
            }
        }
        Ok(outcome)
    }

    /// Puts the staging directory at the output path in place of the previous output (a
    /// non-empty directory). Returns the previous output, moved aside, open, marked
    /// `expo-old`, with its locked marker, for deletion.
    ///
    /// The previous output is opened (not through a link) and checked: the directory
    /// validated at the start, still looking like a checkpoint. It is marked (a locked
    /// `.expo-staging` written into it through its handle). With
    /// `renameat2(RENAME_EXCHANGE)` the two directories then swap atomically: the old
    /// output moves to the staging name, a kill at any point leaves either the old output
    /// in place (with the marker file, which is harmless there) or the new one, and a
    /// marked old tree that the next run removes. What was moved aside is checked again
    /// (`lstat`: the same device and inode; still a checkpoint): if another directory or a
    /// link was swapped in at the output path meanwhile, it is swapped back, untouched.
    ///
    /// Without it (not Linux, or a file system that cannot exchange): (1) the old output
    /// is renamed aside to `<staging name>-old`, marked `expo-aside`, and checked the same
    /// way (renamed back if it is not the validated directory); (2) the staging directory
    /// is renamed into place; (3) the marker becomes `expo-old`. If (2) fails, the old
    /// output is renamed back. A kill between (1) and (3) leaves the output path absent and
    /// the `expo-aside` directory, which no run removes: the next run reports it and where
    /// it belongs (see [`clean_stale_staging`]). After (3) it is removed like an exchanged
    /// old tree.
    fn swap(&mut self, target: &OutputTarget) -> Result<OldOutput, OutputError> {
        let changed = || OutputError::Changed {
            path: target.path.clone(),
        };
        let dir = match open_dir(&target.path) {
            Ok(dir) => dir,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ELOOP | libc::ENOTDIR | libc::ENOENT)
                ) =>
            {
                return Err(changed())
            }
            Err(e) => return Err(io_err(&target.path, "open")(e)),
        };
        let expected = target.existing_id;
        let validated = |d: &File| {
            d.metadata().is_ok_and(|m| Some(FileId::of(&m)) == expected)
                && looks_like_checkpoint(d).unwrap_or(false)
        };
        if !validated(&dir) {
            return Err(changed());
        }
        // If the old output cannot be marked (say it has a directory of that name), it is
        // still replaced; only a kill during its deletion then leaves it for good.
        let lock = create_marker(&dir, &target.path, MARK_OLD, &target.name, false).ok();
        let unmark = || {
            if lock.is_some() {
                let _ = unlink_at(&dir, MARKER_C, 0);
            }
        };
        // What is at `at` now: the directory opened above, still a checkpoint?
        let is_old = |at: &Path| {
            fs::symlink_metadata(at).is_ok_and(|m| m.is_dir() && Some(FileId::of(&m)) == expected)
                && validated(&dir)
        };
        crate::failpoint::pause("output-exchange");
        #[cfg(test)]
        if let Some(hook) = BEFORE_EXCHANGE.with(|h| h.borrow_mut().take()) {
            hook();
        }
        let mut active = active();
        let old = if exchange_enabled() && exchange(&self.path, &target.path).is_ok() {
            if !is_old(&self.path) {
                // Not what was validated: swap it back, untouched.
                let back = exchange(&self.path, &target.path);
                drop(active);
                unmark();
                if back.is_err() {
                    // The new output is in place and the stranger at the staging name:
                    // neither is ever removed.
                    self.committed = true;
                    return Err(OutputError::ChangedLeftAside {
                        path: target.path.clone(),
                        aside: self.path.clone(),
                    });
                }
                return Err(changed());
            }
            self.path.clone()
        } else {
            let aside = PathBuf::from(format!("{}{ASIDE_SUFFIX}", self.path.display()));
            if let Some(f) = &lock {
                let _ = rewrite_marker(f, MARK_ASIDE, &target.name);
            }
            if let Err(e) = fs::rename(&target.path, &aside) {
                drop(active);
                unmark();
                return Err(io_err(&target.path, "move the previous output aside")(e));
            }
            if !is_old(&aside) {
                let back = fs::rename(&aside, &target.path);
                drop(active);
                unmark();
                return match back {
                    Ok(()) => Err(changed()),
                    Err(source) => Err(OutputError::LeftAside {
                        path: target.path.clone(),
                        aside,
                        source,
                    }),
                };
            }
            if let Err(e) = fs::rename(&self.path, &target.path) {
                let back = fs::rename(&aside, &target.path);
                drop(active);
                return match back {
                    Ok(()) => {
                        unmark();
                        Err(io_err(&target.path, "rename into place")(e))
                    }
                    Err(_) => Err(OutputError::LeftAside {
                        path: target.path.clone(),
                        aside,
                        source: e,
                    }),
                };
            }
            if let Some(f) = &lock {
                let _ = rewrite_marker(f, MARK_OLD, &target.name);
            }
            aside
        };
        self.committed = true;
        active.retain(|(p, _)| p != &self.path);
        Ok(OldOutput {
            path: old,
            dir,
            _lock: lock,
        })
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let mut active = active();
            let _ = remove_marked_tree(&self.path, Some(self.id));
            active.retain(|(p, _)| p != &self.path);
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Tests of the path without `RENAME_EXCHANGE` turn it off for their thread.
    static NO_EXCHANGE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Run at the `output-exchange` point, so that unit tests can swap paths there.
    static BEFORE_EXCHANGE: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
        const { std::cell::RefCell::new(None) };
}

fn exchange_enabled() -> bool {
    #[cfg(test)]
    if NO_EXCHANGE.with(|c| c.get()) {
        return false;
    }
    true
}

/// 64 random bits in hex, for staging names.
fn random_token() -> String {
    let mut bytes = [0u8; 8];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok()
    {
        return format!("{:016x}", u64::from_le_bytes(bytes));
    }
    // No /dev/urandom (a minimal chroot): std's randomly keyed hasher, the time and a
    // counter.
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    format!("{:016x}", h.finish())
}

/// Creates (or, unless `new`, truncates) the marker file in the open directory `dir`
/// (found at `dir_path`, for messages), locks it, and writes `kind`, the pid and the
/// output's name into it. The content is written only once the lock is held: a marker
/// that a cleaner can lock but finds empty belongs to a run in the middle of creating it.
fn create_marker(
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
fn rewrite_marker(mut file: &File, kind: &str, name: &str) -> io::Result<()> {
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
fn try_lock(file: &File) -> bool {
    // SAFETY: flock on a file descriptor we own; the lock goes with it when it is closed.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// What [`clean_stale_staging`] did and found.
#[derive(Debug, Default)]
pub struct StaleCleanup {
    /// Directories removed: temporary directories of runs that were killed, and previous
    /// outputs that a killed `--force` run had already replaced.
    pub removed: Vec<PathBuf>,
    /// Previous outputs that a `--force` run moved aside and was killed before putting the
    /// new output in place: (where it is, the output path it belongs at). Never removed;
    /// the user should move it back.
    pub moved_aside: Vec<(PathBuf, PathBuf)>,
    /// Stale directories that could not be (completely) removed, and why: named every time,
    /// so that a large leftover is never silently kept.
    pub failed: Vec<(PathBuf, io::Error)>,
}

impl StaleCleanup {
    /// One line per directory, for `warning: …`.
    pub fn warnings(&self) -> Vec<String> {
        let mut w: Vec<String> = self
            .removed
            .iter()
            .map(|p| {
                format!(
                    "removed {}, left behind by an expo run that was killed",
                    p.display()
                )
            })
            .collect();
        for (aside, home) in &self.moved_aside {
            w.push(format!(
                "{} is the previous content of {}, moved aside by an expo --force run that was killed; move it back by hand",
                aside.display(),
                home.display()
            ));
        }
        for (path, e) in &self.failed {
            w.push(format!(
                "{} was left behind by an expo run that was killed, and cannot be removed ({e}); remove it by hand",
                path.display()
            ));
        }
        w
    }
}

/// Most bytes of a marker that are read (its content is untrusted).
const MARKER_CAP: u64 = 4096;

/// Removes the stale directories of killed runs in `parent` (see the module
/// documentation), and lists the previous outputs that a killed `--force` run left moved
/// aside, and the stale directories that could not be removed.
pub fn clean_stale_staging(parent: &Path) -> StaleCleanup {
    let mut found = StaleCleanup::default();
    let Ok(entries) = fs::read_dir(parent) else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(STAGING_PREFIX) else {
            continue;
        };
        let path = entry.path();
        // Never follow a link, never touch a directory without our marker.
        let Ok(dir) = open_dir(&path) else {
            continue;
        };
        let Some(marker) = open_marker(&dir) else {
            continue;
        };
        // Held by a live run (or flock unsupported): not stale.
        if !try_lock(&marker) {
            continue;
        }
        let mut content = Vec::new();
        if (&marker)
            .take(MARKER_CAP)
            .read_to_end(&mut content)
            .is_err()
        {
            continue;
        }
        let content = String::from_utf8_lossy(&content);
        let mut lines = content.splitn(2, '\n');
        let kind = lines
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or("");
        let marked_name = lines.next().map(|n| n.strip_suffix('\n').unwrap_or(n));
        let stale = match kind {
            MARK_STAGING | MARK_OLD => true,
            MARK_ASIDE => {
                let home = match marked_name.filter(|n| !n.is_empty() && !n.contains('/')) {
                    Some(n) => Some(parent.join(n)),
                    None => aside_home(parent, rest),
                };
                if let Some(home) = home {
                    found.moved_aside.push((path.clone(), home));
                }
                false
            }
            // An empty marker: a run is creating it right now.
            "" => false,
            legacy => legacy_stale(rest, legacy),
        };
        if stale {
            match remove_marked_dir(&dir, &path) {
                Ok(()) => found.removed.push(path),
                Err(e) => found.failed.push((path, e)),
            }
        }
    }
    found
}

/// Opens the marker in `dir` for locking and reading: a regular file, not through a link,
/// without blocking (a FIFO planted there is not waited on).
fn open_marker(dir: &File) -> Option<File> {
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

/// Where an `expo-aside` directory `.expo-tmp-<rest>` belongs: `rest` is
/// `<name>-<pid>-<random>-old`.
fn aside_home(parent: &Path, rest: &str) -> Option<PathBuf> {
    let stem = rest.strip_suffix(ASIDE_SUFFIX)?;
    let mut parts = stem.rsplitn(3, '-');
    let (_random, _pid, name) = (parts.next()?, parts.next()?, parts.next()?);
    (!name.is_empty()).then(|| parent.join(name))
}

/// The rule for directories of expo versions before the random suffix:
/// `.expo-tmp-<name>-<pid>` whose marker holds that pid, stale when the pid is this
/// process's own (the directory is then not ours: ours all have the random suffix) or names
/// no process.
fn legacy_stale(rest: &str, marker_pid: &str) -> bool {
    let Ok(pid) = marker_pid.parse::<i32>() else {
        return false;
    };
    let named = rest.rsplit('-').next().and_then(|p| p.parse::<i32>().ok());
    named == Some(pid) && (pid as u32 == std::process::id() || !process_alive(pid))
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

    /// A directory is taken for a checkpoint (and `--force` may replace it) when it holds
    /// a checkpoint file: shards, an index (transformers' variant names included), config or
    /// expo.json; anything else is not.
    #[test]
    fn checkpoints_are_recognised_by_their_files() {
        let root = tempfile::tempdir().unwrap();
        for (name, is) in [
            ("model.safetensors.index.fp16.json", true),
            ("model.safetensors.index.json", true),
            ("model-00001-of-00002.safetensors", true),
            ("config.json", true),
            ("expo.json", true),
            ("notes.json", false),
            ("model.safetensors.index.json.bak", false),
            ("weights.bin", false),
        ] {
            let dir = root.path().join(name.replace('.', "_"));
            fs::create_dir(&dir).unwrap();
            fs::write(dir.join(name), b"{}").unwrap();
            let handle = open_dir(&dir).unwrap();
            assert_eq!(looks_like_checkpoint(&handle).unwrap(), is, "{name}");
        }
    }

    fn marked(dir: &Path, content: &str) {
        fs::create_dir(dir).unwrap();
        fs::write(dir.join(STAGING_MARKER), content).unwrap();
        fs::write(dir.join("model.safetensors"), b"partial").unwrap();
    }

    fn target(parent: &Path, name: &str, force: bool) -> OutputTarget {
        OutputTarget::check(&parent.join(name), force).unwrap()
    }

    #[test]
    fn only_unlocked_marked_staging_directories_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        // A killed run's staging directory: marked, nobody holds the lock. Its pid is this
        // process's own, as after a restart in a container where expo is always pid 1.
        let dead = p.join(format!(
            "{STAGING_PREFIX}out-{}-0123456789abcdef",
            std::process::id()
        ));
        marked(&dead, &format!("expo-staging {}\n", std::process::id()));
        // A killed --force run's old output.
        let old = p.join(format!("{STAGING_PREFIX}out-1-00000000000000ff"));
        marked(&old, "expo-old 1\n");
        // A live run's (another namespace, say: its pid means nothing here).
        let live = p.join(format!("{STAGING_PREFIX}out-2147483646-fedcba9876543210"));
        marked(&live, "expo-staging 2147483646\n");
        let held = File::open(live.join(STAGING_MARKER)).unwrap();
        assert!(try_lock(&held));
        // Same name pattern but no marker: not ours.
        let foreign = p.join(format!("{STAGING_PREFIX}out-2147483645-0000000000000000"));
        fs::create_dir(&foreign).unwrap();
        // A marker being created (empty), a marker that is a link, a marker that is a
        // directory, a marker with foreign content.
        let creating = p.join(format!("{STAGING_PREFIX}c-1-0000000000000001"));
        marked(&creating, "");
        let linked = p.join(format!("{STAGING_PREFIX}l-1-0000000000000002"));
        fs::create_dir(&linked).unwrap();
        // The link points at a stale-looking marker that is never removed, so that
        // following it would make `linked` look stale whatever the order of the walk.
        let real_marker = p.join("real-marker");
        fs::write(&real_marker, "expo-staging 1\n").unwrap();
        std::os::unix::fs::symlink(&real_marker, linked.join(STAGING_MARKER)).unwrap();
        let dir_marker = p.join(format!("{STAGING_PREFIX}d-1-0000000000000003"));
        fs::create_dir_all(dir_marker.join(STAGING_MARKER)).unwrap();
        let odd = p.join(format!("{STAGING_PREFIX}o-1-0000000000000004"));
        marked(&odd, "hello\n");
        // A link to a marked directory.
        let target_dir = p.join("elsewhere");
        marked(&target_dir, "expo-staging 1\n");
        let link = p.join(format!("{STAGING_PREFIX}link-1-0000000000000005"));
        std::os::unix::fs::symlink(&target_dir, &link).unwrap();
        // Unrelated directory with a marker.
        let keep = p.join("keep");
        marked(&keep, "expo-staging 1\n");

        let mut removed = clean_stale_staging(p).removed;
        removed.sort();
        let mut want = vec![dead.clone(), old.clone()];
        want.sort();
        assert_eq!(removed, want);
        assert!(!dead.exists() && !old.exists());
        for kept in [
            &live,
            &foreign,
            &creating,
            &linked,
            &dir_marker,
            &odd,
            &target_dir,
            &keep,
        ] {
            assert!(kept.is_dir(), "{} was removed", kept.display());
        }
        assert!(link.exists());
        // Once the live run is gone, its directory is stale.
        drop(held);
        assert_eq!(clean_stale_staging(p).removed, vec![live]);
    }

    #[test]
    fn legacy_staging_directories_need_a_dead_pid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let dead = p.join(format!("{STAGING_PREFIX}out-2147483646"));
        marked(&dead, "2147483646\n");
        let alive = p.join(format!("{STAGING_PREFIX}out-1"));
        marked(&alive, "1\n");
        let mismatch = p.join(format!("{STAGING_PREFIX}x-2147483644"));
        marked(&mismatch, "12\n");
        assert_eq!(clean_stale_staging(p).removed, vec![dead]);
        assert!(alive.exists() && mismatch.exists());
    }

    #[test]
    fn moved_aside_outputs_are_reported_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let aside = p.join(format!(
            "{STAGING_PREFIX}my-model-7-0123456789abcdef{ASIDE_SUFFIX}"
        ));
        marked(&aside, "expo-aside 7\n");
        let found = clean_stale_staging(p);
        assert!(found.removed.is_empty());
        assert_eq!(found.moved_aside, vec![(aside.clone(), p.join("my-model"))]);
        assert!(aside.join("model.safetensors").is_file());
    }

    #[test]
    fn staging_names_are_unique_and_locked() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path(), "out", false);
        let a = StagingDir::create(&t).unwrap();
        let b = StagingDir::create(&t).unwrap();
        assert_ne!(a.path(), b.path());
        let name = a.path().file_name().unwrap().to_string_lossy().into_owned();
        let prefix = format!("{STAGING_PREFIX}out-{}-", std::process::id());
        let random = name.strip_prefix(&prefix).unwrap();
        assert!(random.len() == 16 && random.bytes().all(|c| c.is_ascii_hexdigit()));
        // Both are live: nothing is stale.
        assert!(clean_stale_staging(dir.path()).removed.is_empty());
        let (pa, pb) = (a.path().to_path_buf(), b.path().to_path_buf());
        drop(a);
        assert!(!pa.exists() && pb.exists());
        drop(b);
        assert!(fs::read_dir(dir.path()).unwrap().next().is_none());
    }

    #[test]
    fn commit_replaces_a_checkpoint_and_leaves_nothing_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        fs::create_dir_all(out.join("sub")).unwrap();
        fs::write(out.join("config.json"), "{}").unwrap();
        fs::write(out.join("sub/x"), "old").unwrap();
        let t = target(dir.path(), "out", true);
        assert_eq!(t.existing, Existing::Dir);
        let s = StagingDir::create(&t).unwrap();
        fs::write(s.path().join("model.safetensors"), "new").unwrap();
        let outcome = s.commit(&t).unwrap();
        assert!(outcome.leftover.is_none() && outcome.warnings().is_empty());
        let mut names: Vec<_> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["model.safetensors"]);
        let beside: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(beside, ["out"]);
    }

    #[test]
    fn force_refuses_directories_that_are_not_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let project = p.join("project");
        fs::create_dir_all(project.join("src")).unwrap();
        fs::write(project.join("Cargo.toml"), "").unwrap();
        // A directory named like a checkpoint file does not count.
        fs::create_dir(project.join("config.json")).unwrap();
        let err = OutputTarget::check(&project, true).unwrap_err();
        assert!(matches!(err, OutputError::NotACheckpoint { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&*project.to_string_lossy()) && msg.contains("by hand"),
            "{msg}"
        );
        // Without --force it is refused as non-empty, as before.
        assert!(matches!(
            OutputTarget::check(&project, false),
            Err(OutputError::Exists { .. })
        ));
        // `locate` alone accepts it.
        assert_eq!(
            OutputTarget::locate(&project, true).unwrap().existing,
            Existing::Dir
        );
        for file in [
            "expo.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
        ] {
            let ck = p.join(format!("ck-{file}"));
            fs::create_dir(&ck).unwrap();
            fs::write(ck.join(file), "x").unwrap();
            OutputTarget::check(&ck, true).unwrap();
        }
        // Reserved names.
        assert!(matches!(
            OutputTarget::check(&p.join(".expo-tmp-x"), false),
            Err(OutputError::ReservedName { .. })
        ));
    }

    #[test]
    fn protected_directories() {
        assert!(protected(Path::new("/")).is_some());
        let cwd = fs::canonicalize(std::env::current_dir().unwrap()).unwrap();
        assert!(protected(&cwd).is_some());
        if let Some(parent) = cwd.parent() {
            assert!(protected(parent).unwrap().contains("current directory"));
        }
        if let Some(home) = std::env::var_os("HOME") {
            if let Ok(home) = fs::canonicalize(home) {
                assert!(protected(&home).is_some());
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let inner = fs::canonicalize(dir.path()).unwrap().join("x");
        fs::create_dir(&inner).unwrap();
        if !cwd.starts_with(&inner) {
            assert_eq!(protected(&inner), None);
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn commit_without_exchange_moves_the_old_output_aside_then_deletes_it() {
        NO_EXCHANGE.with(|c| c.set(true));
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        fs::create_dir_all(out.join("sub")).unwrap();
        fs::write(out.join("model.safetensors"), "old").unwrap();
        fs::write(out.join("sub/x"), "old").unwrap();
        let t = target(dir.path(), "out", true);
        let s = StagingDir::create(&t).unwrap();
        fs::write(s.path().join("model.safetensors"), "new").unwrap();
        let outcome = s.commit(&t).unwrap();
        NO_EXCHANGE.with(|c| c.set(false));
        assert!(outcome.leftover.is_none(), "{outcome:?}");
        assert_eq!(names(&out), ["model.safetensors"]);
        assert_eq!(fs::read(out.join("model.safetensors")).unwrap(), b"new");
        assert_eq!(names(dir.path()), ["out"]);
    }

    /// A previous output that cannot be deleted (here: a mount point inside it) is a
    /// warning, not an error: the new output is in place, and what is left is marked so a
    /// later run removes it.
    #[test]
    fn an_undeletable_old_output_is_a_leftover_not_an_error() {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let mnt = out.join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        fs::write(out.join("config.json"), "{}").unwrap();
        let c = CString::new(mnt.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                c.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                c"size=1m".as_ptr().cast(),
            )
        };
        if rc != 0 {
            eprintln!("cannot mount a tmpfs: skipping");
            return;
        }
        let t = target(dir.path(), "out", true);
        let s = StagingDir::create(&t).unwrap();
        fs::write(s.path().join("model.safetensors"), "new").unwrap();
        let outcome = s.commit(&t);
        let (left, _) = outcome.as_ref().unwrap().leftover.as_ref().unwrap();
        let left = left.clone();
        let warnings = outcome.as_ref().unwrap().warnings();
        assert!(
            warnings[0].contains(&*left.to_string_lossy()),
            "{warnings:?}"
        );
        assert_eq!(names(&out), ["model.safetensors"]);
        // What is left: marked as a replaced output, not locked any more.
        let marker = fs::read_to_string(left.join(STAGING_MARKER)).unwrap();
        assert!(marker.starts_with("expo-old "), "{marker}");
        let c = CString::new(left.join("mnt").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path; MNT_DETACH never blocks.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        assert_eq!(clean_stale_staging(dir.path()).removed, vec![left]);
        assert_eq!(names(dir.path()), ["out"]);
    }

    /// Entries of the process-wide list of active staging directories under `dir`.
    fn active_under(dir: &Path) -> Vec<PathBuf> {
        active()
            .iter()
            .filter(|(p, _)| p.starts_with(dir))
            .map(|(p, _)| p.clone())
            .collect()
    }

    #[test]
    fn after_a_force_replace_the_other_staging_directory_stays_active() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        fs::write(out.join("config.json"), "{}").unwrap();
        let t = target(dir.path(), "out", true);
        let other_t = target(dir.path(), "other", false);
        let a = StagingDir::create(&t).unwrap();
        let b = StagingDir::create(&other_t).unwrap();
        let (pa, pb) = (a.path().to_path_buf(), b.path().to_path_buf());
        let mut both = active_under(dir.path());
        both.sort();
        let mut want = vec![pa.clone(), pb.clone()];
        want.sort();
        assert_eq!(both, want);
        fs::write(a.path().join("model.safetensors"), "new").unwrap();
        a.commit(&t).unwrap();
        // The committed one is gone from the list (its name now held the old output, which
        // is deleted); the other one is still there, so a second Ctrl-C removes it.
        assert_eq!(active_under(dir.path()), vec![pb.clone()]);
        assert!(pb.is_dir() && !pa.exists());
        drop(b);
        assert!(active_under(dir.path()).is_empty());
        assert_eq!(names(dir.path()), ["out"]);
    }

    #[test]
    fn output_paths_ending_in_dots_or_naming_links_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let ck = p.join("ck");
        fs::create_dir(&ck).unwrap();
        fs::write(ck.join("config.json"), "{}").unwrap();
        for (given, tail) in [
            (p.join("ck/."), "."),
            (p.join("ck/./"), "."),
            (p.join("ck/.."), ".."),
            (p.join("new/.."), ".."),
            (PathBuf::from("."), "."),
            (PathBuf::from(".."), ".."),
        ] {
            let err = OutputTarget::locate(&given, true).unwrap_err();
            assert!(
                matches!(err, OutputError::DotName { tail: t, .. } if t == tail),
                "{}: {err}",
                given.display()
            );
        }
        // A trailing slash names the directory itself.
        let t = OutputTarget::check(&p.join("ck//"), true).unwrap();
        assert_eq!((t.path.as_path(), t.name.as_str()), (ck.as_path(), "ck"));
        assert_eq!(t.existing, Existing::Dir);
        // A link, with or without a trailing slash, with or without --force.
        let link = p.join("link");
        std::os::unix::fs::symlink(&ck, &link).unwrap();
        for given in [link.clone(), p.join("link/")] {
            for force in [false, true] {
                let err = OutputTarget::locate(&given, force).unwrap_err();
                let msg = err.to_string();
                assert!(
                    matches!(err, OutputError::Symlink { .. })
                        && msg.contains("symbolic link")
                        && msg.contains(&*ck.to_string_lossy()),
                    "{msg}"
                );
            }
        }
        assert!(ck.join("config.json").is_file());
    }

    #[test]
    fn outputs_are_compared_by_resolved_location() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        fs::create_dir_all(p.join("d/0.1")).unwrap();
        fs::create_dir_all(p.join("d/0.2")).unwrap();
        std::os::unix::fs::symlink(p.join("d"), p.join("alias")).unwrap();
        let a = target(p, "d/0.1/../out", false);
        let b = target(p, "d/0.2/../out", false);
        let c = target(p, "alias/out", false);
        let d = target(p, "d/out2", false);
        assert!(a.same_location(&b) && a.same_location(&c) && !a.same_location(&d));
        let msg = location_clash([&d, &a], &b).unwrap();
        assert!(
            msg.contains(&*a.path.to_string_lossy())
                && msg.contains(&*b.path.to_string_lossy())
                && msg.contains("same directory"),
            "{msg}"
        );
        assert_eq!(location_clash([&d], &a), None);
    }

    #[test]
    fn deleting_the_old_output_unlinks_links_and_never_follows_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let victim = p.join("victim");
        fs::create_dir_all(victim.join("deep")).unwrap();
        fs::write(victim.join("deep/data"), "precious").unwrap();
        fs::write(p.join("file"), "precious").unwrap();
        let out = p.join("out");
        fs::create_dir_all(out.join("sub")).unwrap();
        fs::write(out.join("model.safetensors"), "old").unwrap();
        std::os::unix::fs::symlink(&victim, out.join("dirlink")).unwrap();
        std::os::unix::fs::symlink(&victim, out.join("sub/dirlink")).unwrap();
        std::os::unix::fs::symlink(p.join("file"), out.join("filelink")).unwrap();
        let t = target(p, "out", true);
        let s = StagingDir::create(&t).unwrap();
        fs::write(s.path().join("model.safetensors"), "new").unwrap();
        let outcome = s.commit(&t).unwrap();
        assert!(outcome.leftover.is_none(), "{outcome:?}");
        assert_eq!(names(&out), ["model.safetensors"]);
        assert_eq!(fs::read(victim.join("deep/data")).unwrap(), b"precious");
        assert_eq!(fs::read(p.join("file")).unwrap(), b"precious");
        assert_eq!(names(p), ["file", "out", "victim"]);
    }

    #[test]
    fn a_directory_that_is_no_longer_the_one_made_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let t = target(p, "out", false);
        let s = StagingDir::create(&t).unwrap();
        let staging = s.path().to_path_buf();
        // Someone moves the staging directory away and puts another one in its place.
        fs::rename(&staging, p.join("moved")).unwrap();
        marked(&staging, "expo-staging 1\n");
        drop(s);
        assert!(staging.join("model.safetensors").is_file());
        assert!(p.join("moved").is_dir());
        assert!(active_under(p).is_empty());
    }

    #[test]
    fn long_output_names_get_short_staging_names_and_keep_their_home() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        // The longest name most file systems allow, with multi-byte characters at the cut.
        let name = format!("{}{}", "é".repeat(20), "n".repeat(255 - 40));
        assert_eq!(name.len(), 255);
        let t = target(p, &name, false);
        let s = StagingDir::create(&t).unwrap();
        let staging = s.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(staging.starts_with(&format!("{STAGING_PREFIX}{}", "é".repeat(20))));
        assert!(staging.len() + ASIDE_SUFFIX.len() <= 255 - 100, "{staging}");
        let marker = fs::read_to_string(s.path().join(STAGING_MARKER)).unwrap();
        assert_eq!(
            marker,
            format!("expo-staging {}\n{name}\n", std::process::id())
        );
        drop(s);
        // A previous output moved aside under a cut name is reported under its whole name.
        let aside = p.join(format!(
            "{STAGING_PREFIX}{}-7-0123456789abcdef{ASIDE_SUFFIX}",
            staging_stem(&name)
        ));
        marked(&aside, &format!("expo-aside 7\n{name}\n"));
        let found = clean_stale_staging(p);
        assert_eq!(found.moved_aside, vec![(aside, p.join(&name))]);
    }

    #[test]
    fn a_stale_directory_that_cannot_be_removed_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let stale = p.join(format!("{STAGING_PREFIX}out-1-0123456789abcdef"));
        marked(&stale, "expo-staging 1\n");
        // Too deep to remove.
        let mut deep = stale.clone();
        for _ in 0..=MAX_DEPTH {
            deep.push("d");
        }
        fs::create_dir_all(&deep).unwrap();
        let found = clean_stale_staging(p);
        assert!(found.removed.is_empty());
        assert_eq!(found.failed.len(), 1);
        let w = found.warnings();
        assert!(
            w[0].contains(&*stale.to_string_lossy()) && w[0].contains("remove it by hand"),
            "{w:?}"
        );
        assert!(stale.join(STAGING_MARKER).is_file());
    }

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

    #[test]
    fn force_swaps_back_whatever_replaced_the_validated_directory() {
        for no_exchange in [false, true] {
            NO_EXCHANGE.with(|c| c.set(no_exchange));
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().to_path_buf();
            let victim = p.join("victim");
            fs::create_dir_all(victim.join("deep")).unwrap();
            fs::write(victim.join("config.json"), "{}").unwrap();
            fs::write(victim.join("deep/data"), "precious").unwrap();
            let out = p.join("out");
            fs::create_dir(&out).unwrap();
            fs::write(out.join("config.json"), "{}").unwrap();
            let t = target(&p, "out", true);
            // A link to a checkpoint-looking directory, a foreign directory, and the same
            // directory with its checkpoint file gone.
            for case in 0..3 {
                let s = StagingDir::create(&t).unwrap();
                fs::write(s.path().join("model.safetensors"), "new").unwrap();
                let (o, v, q) = (out.clone(), victim.clone(), p.clone());
                let hook: Box<dyn FnOnce()> = Box::new(move || match case {
                    0 => {
                        fs::rename(&o, q.join("real")).unwrap();
                        std::os::unix::fs::symlink(&v, &o).unwrap();
                    }
                    1 => {
                        fs::rename(&o, q.join("real")).unwrap();
                        fs::create_dir(&o).unwrap();
                        fs::write(o.join("config.json"), "{}").unwrap();
                        fs::write(o.join("thesis.tex"), "x").unwrap();
                    }
                    _ => {
                        fs::remove_file(o.join("config.json")).unwrap();
                        fs::write(o.join("thesis.tex"), "x").unwrap();
                    }
                });
                BEFORE_EXCHANGE.with(|h| *h.borrow_mut() = Some(hook));
                let err = s.commit(&t).unwrap_err();
                assert!(matches!(err, OutputError::Changed { .. }), "{case}: {err}");
                assert_eq!(names(&victim), ["config.json", "deep"]);
                assert_eq!(fs::read(victim.join("deep/data")).unwrap(), b"precious");
                match case {
                    0 => {
                        assert_eq!(fs::read_link(&out).unwrap(), victim);
                        assert_eq!(names(&p.join("real")), ["config.json"]);
                        fs::remove_file(&out).unwrap();
                    }
                    1 => {
                        assert_eq!(names(&out), ["config.json", "thesis.tex"]);
                        assert_eq!(names(&p.join("real")), ["config.json"]);
                        fs::remove_dir_all(&out).unwrap();
                    }
                    _ => assert_eq!(names(&out), ["thesis.tex"]),
                }
                if case < 2 {
                    fs::rename(p.join("real"), &out).unwrap();
                }
                assert_eq!(names(&p), ["out", "victim"], "{case}");
            }
            NO_EXCHANGE.with(|c| c.set(false));
        }
    }

    #[test]
    fn sticky_parents_forbid_renaming_other_users_directories() {
        // (parent mode, parent owner, entry owner, user) → forbidden?
        for (mode, parent, entry, user, forbidden) in [
            (0o41777, 0, 1000, 1001, true),
            (0o1777, 0, 1000, 1001, true),
            (0o40777, 0, 1000, 1001, false),
            (0o41777, 0, 1000, 1000, false),
            (0o41777, 1001, 1000, 1001, false),
            (0o41777, 5, 1000, 0, false),
            (0o40755, 1000, 1000, 1000, false),
        ] {
            assert_eq!(
                sticky_forbids_rename(mode, parent, entry, user),
                forbidden,
                "{mode:o} {parent} {entry} {user}"
            );
        }
    }

    #[test]
    fn old_outputs_are_checked_as_deep_as_they_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let nest = |name: &str, levels: usize| {
            let out = p.join(name);
            let mut deep = out.clone();
            for _ in 0..levels {
                deep.push("d");
            }
            fs::create_dir_all(&deep).unwrap();
            fs::write(deep.join("x"), "x").unwrap();
            fs::write(out.join("config.json"), "{}").unwrap();
            out
        };
        // As deep as the deletion goes: accepted, and deleted completely.
        nest("ok", MAX_DEPTH);
        let t = target(p, "ok", true);
        let s = StagingDir::create(&t).unwrap();
        fs::write(s.path().join("model.safetensors"), "new").unwrap();
        let outcome = s.commit(&t).unwrap();
        assert!(outcome.leftover.is_none(), "{outcome:?}");
        assert_eq!(names(&p.join("ok")), ["model.safetensors"]);
        // One level deeper could not be deleted: refused before anything is written.
        let deep = nest("deep", MAX_DEPTH + 1);
        let err = OutputTarget::check(&deep, true).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, OutputError::CannotReplace { .. }) && msg.contains("nested"),
            "{msg}"
        );
    }
}
