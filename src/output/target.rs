//! Locating and checking the output target: where the output goes, and whether what is
//! there may be replaced (`--force`).

use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::dirfd::{cpath, dir_names, is_dir_mode, is_file_mode, open_dir, open_dir_at, stat_at};
use super::remove::{too_deep, MAX_DEPTH};
use super::{io_err, OutputError, STAGING_PREFIX};
use crate::sys::FileId;

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
    pub(super) parent_id: FileId,
    /// The existing directory's identity, checked again when it is replaced: `--force`
    /// replaces only the very directory it validated.
    pub(super) existing_id: Option<FileId>,
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
    pub fn locate(given: &Path, force: bool) -> Result<OutputTarget, OutputError> {
        let (path, name) = usable_name(given)?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let parent_id = parent_identity(path, &parent)?;
        let (existing, existing_id) = what_is_at(given, path, force)?;
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

/// The output path as given without its trailing slashes, and its last component. Refused:
/// a path ending in `.` or `..`, one without a name, a name reserved for staging
/// directories.
fn usable_name(given: &Path) -> Result<(&Path, String), OutputError> {
    // `out/` is `out`; but `out/.` and `out/..` are refused: `.` and `..` cannot be
    // renamed, and what they name is not what the user sees.
    let mut bytes = given.as_os_str().as_bytes();
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
    Ok((path, name))
}

/// The identity of `parent`, the output `path`'s parent directory, which must exist.
fn parent_identity(path: &Path, parent: &Path) -> Result<FileId, OutputError> {
    match fs::metadata(parent) {
        Ok(m) if m.is_dir() => Ok(FileId::of(&m)),
        Ok(_) => Err(OutputError::ParentNotADirectory {
            path: path.to_path_buf(),
            parent: parent.to_path_buf(),
        }),
        // A dangling link, say.
        Err(_) if parent.symlink_metadata().is_ok() => Err(OutputError::ParentNotADirectory {
            path: path.to_path_buf(),
            parent: parent.to_path_buf(),
        }),
        Err(_) => Err(OutputError::NoParent {
            path: path.to_path_buf(),
            parent: parent.to_path_buf(),
        }),
    }
}

/// What is at the output `path` (`given` as typed): nothing, an empty directory, or (with
/// `force`) a non-empty one, with its identity. A link, a file or (without `force`) a
/// non-empty directory is refused.
fn what_is_at(
    given: &Path,
    path: &Path,
    force: bool,
) -> Result<(Existing, Option<FileId>), OutputError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((Existing::Nothing, None)),
        Err(e) => Err(io_err(path, "stat")(e)),
        Ok(m) if m.file_type().is_symlink() => Err(OutputError::Symlink {
            path: given.to_path_buf(),
            link_target: fs::read_link(path).ok(),
        }),
        Ok(m) if m.is_dir() => {
            let mut entries = fs::read_dir(path).map_err(io_err(path, "read"))?;
            let existing = if entries.next().is_none() {
                Existing::EmptyDir
            } else if force {
                Existing::Dir
            } else {
                return Err(OutputError::Exists {
                    path: path.to_path_buf(),
                });
            };
            Ok((existing, Some(FileId::of(&m))))
        }
        Ok(_) => Err(OutputError::NotADirectory {
            path: path.to_path_buf(),
        }),
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
pub(super) fn looks_like_checkpoint(dir: &File) -> io::Result<bool> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::test_support::target;

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
}
