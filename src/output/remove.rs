//! Removing a marked tree (a staging directory, a replaced output) through directory
//! handles: never following a link, never leaving the tree, the marker last.

use std::ffi::CStr;
use std::fs::{self, File};
use std::io;
use std::path::Path;

use super::dirfd::{dir_names, is_dir_mode, open_dir, open_dir_at, stat_at, unlink_at};
use super::marker::MARKER_C;
use crate::sys::FileId;

/// Deepest directory level expo walks inside an output (checkpoints are shallow).
pub(super) const MAX_DEPTH: usize = 64;

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

pub(super) fn too_deep() -> io::Error {
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
pub(super) fn remove_marked_dir(dir: &File, path: &Path) -> io::Result<()> {
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
pub(super) fn remove_marked_tree(path: &Path, expected: Option<FileId>) -> io::Result<()> {
    let dir = open_dir(path)?;
    if expected.is_some_and(|id| dir.metadata().is_ok_and(|m| FileId::of(&m) != id)) {
        return Err(io::Error::other("it is not the directory expo made"));
    }
    remove_marked_dir(&dir, path)
}

/// Why [`remove_identified`] left a directory alone.
#[derive(Debug)]
pub enum NotRemoved {
    /// Nothing is at the path any more.
    Gone,
    /// What the path names now is not the directory recorded (moved, or a link swapped in).
    Replaced,
    /// Removing failed part-way.
    Io(io::Error),
}

/// Removes the directory at `path` only if it still is the directory `id` (the path is
/// opened without following a final link, and any link on the way leads to another
/// directory, whose identity differs): `first` inside it is removed before anything else and
/// the directory synced, so that a removal cut short is recognisably incomplete; then
/// `between` runs (a test's pause point), then the rest is removed through directory handles
/// and the directory itself.
pub fn remove_identified(
    path: &Path,
    id: FileId,
    first: Option<&CStr>,
    between: impl FnOnce(),
) -> Result<(), NotRemoved> {
    let dir = match open_dir(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(NotRemoved::Gone),
        // ELOOP/ENOTDIR: a link or a file where the directory was.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
            return Err(NotRemoved::Replaced)
        }
        Err(e) => return Err(NotRemoved::Io(e)),
    };
    let meta = dir.metadata().map_err(NotRemoved::Io)?;
    if FileId::of(&meta) != id {
        return Err(NotRemoved::Replaced);
    }
    if let Some(name) = first {
        match unlink_at(&dir, name, 0) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(NotRemoved::Io(e)),
            _ => {}
        }
        dir.sync_all().map_err(NotRemoved::Io)?;
    }
    between();
    remove_contents(&dir, None, 0).map_err(NotRemoved::Io)?;
    remove_dir_if(path, id).map_err(NotRemoved::Io)
}
