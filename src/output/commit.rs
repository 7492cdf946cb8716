//! Putting a complete staging directory in place: sync, rename, and under `--force` the
//! exchange with the previous output (checked, marked, then deleted through handles).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use super::dirfd::{open_dir, unlink_at};
use super::marker::{create_marker, rewrite_marker, MARKER_C};
use super::remove::remove_marked_dir;
use super::staging::{active, Active, StagingDir};
use super::target::{looks_like_checkpoint, Existing, OutputTarget};
use super::{io_err, OutputError, ASIDE_SUFFIX, MARK_ASIDE, MARK_OLD, STAGING_MARKER};
use crate::sys::FileId;

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

/// The previous output after a `--force` swap: where it is, open, with its marker's lock.
struct OldOutput {
    path: PathBuf,
    dir: File,
    _lock: Option<File>,
}

impl StagingDir {
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
        let previous = Previous::open(target)?;
        crate::failpoint::pause("output-exchange");
        #[cfg(test)]
        if let Some(hook) = BEFORE_EXCHANGE.with(|h| h.borrow_mut().take()) {
            hook();
        }
        let active = active();
        let (old, mut active) = if exchange_enabled() && exchange(&self.path, &target.path).is_ok()
        {
            self.check_exchanged(&previous, active)?
        } else {
            self.replace_by_renames(&previous, active)?
        };
        self.committed = true;
        active.retain(|(p, _)| p != &self.path);
        Ok(OldOutput {
            path: old,
            dir: previous.dir,
            _lock: previous.lock,
        })
    }

    /// After `RENAME_EXCHANGE`: the previous output should now be at the staging name. If
    /// what was swapped out is not the validated directory, it is swapped back, untouched.
    /// Returns where the previous output is, and the `active` lock still held.
    fn check_exchanged(
        &mut self,
        previous: &Previous,
        active: Active,
    ) -> Result<(PathBuf, Active), OutputError> {
        if previous.is_at(&self.path) {
            return Ok((self.path.clone(), active));
        }
        // Not what was validated: swap it back, untouched.
        let back = exchange(&self.path, &previous.target.path);
        drop(active);
        previous.unmark();
        if back.is_err() {
            // The new output is in place and the stranger at the staging name:
            // neither is ever removed.
            self.committed = true;
            return Err(OutputError::ChangedLeftAside {
                path: previous.target.path.clone(),
                aside: self.path.clone(),
            });
        }
        Err(previous.changed())
    }

    /// Without `RENAME_EXCHANGE`: the previous output is renamed aside (marked
    /// `expo-aside`) and checked, the staging directory renamed into place, and the marker
    /// becomes `expo-old`; each failure puts the previous output back if it can. Returns
    /// where the previous output is, and the `active` lock still held.
    fn replace_by_renames(
        &self,
        previous: &Previous,
        active: Active,
    ) -> Result<(PathBuf, Active), OutputError> {
        let target = previous.target;
        let aside = PathBuf::from(format!("{}{ASIDE_SUFFIX}", self.path.display()));
        previous.remark(MARK_ASIDE);
        if let Err(e) = fs::rename(&target.path, &aside) {
            drop(active);
            previous.unmark();
            return Err(io_err(&target.path, "move the previous output aside")(e));
        }
        if !previous.is_at(&aside) {
            let back = fs::rename(&aside, &target.path);
            drop(active);
            previous.unmark();
            return match back {
                Ok(()) => Err(previous.changed()),
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
                    previous.unmark();
                    Err(io_err(&target.path, "rename into place")(e))
                }
                Err(_) => Err(OutputError::LeftAside {
                    path: target.path.clone(),
                    aside,
                    source: e,
                }),
            };
        }
        previous.remark(MARK_OLD);
        Ok((aside, active))
    }
}

/// The previous output under `--force`, opened (not through a link), checked to be the
/// directory validated at the start, and marked `expo-old` (its locked marker in `lock`, if
/// it could be marked).
struct Previous<'a> {
    target: &'a OutputTarget,
    dir: File,
    lock: Option<File>,
}

impl<'a> Previous<'a> {
    fn open(target: &'a OutputTarget) -> Result<Previous<'a>, OutputError> {
        let dir = match open_dir(&target.path) {
            Ok(dir) => dir,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ELOOP | libc::ENOTDIR | libc::ENOENT)
                ) =>
            {
                return Err(OutputError::Changed {
                    path: target.path.clone(),
                })
            }
            Err(e) => return Err(io_err(&target.path, "open")(e)),
        };
        let previous = Previous {
            target,
            dir,
            lock: None,
        };
        if !previous.validated() {
            return Err(previous.changed());
        }
        // If the old output cannot be marked (say it has a directory of that name), it is
        // still replaced; only a kill during its deletion then leaves it for good.
        let lock = create_marker(&previous.dir, &target.path, MARK_OLD, &target.name, false).ok();
        Ok(Previous { lock, ..previous })
    }

    /// The error for an output path that is no longer what was validated.
    fn changed(&self) -> OutputError {
        OutputError::Changed {
            path: self.target.path.clone(),
        }
    }

    /// The open directory is still the one validated, and still looks like a checkpoint.
    fn validated(&self) -> bool {
        self.dir
            .metadata()
            .is_ok_and(|m| Some(FileId::of(&m)) == self.target.existing_id)
            && looks_like_checkpoint(&self.dir).unwrap_or(false)
    }

    /// What is at `at` now: the directory opened, still a checkpoint?
    fn is_at(&self, at: &Path) -> bool {
        fs::symlink_metadata(at)
            .is_ok_and(|m| m.is_dir() && Some(FileId::of(&m)) == self.target.existing_id)
            && self.validated()
    }

    /// Removes the marker written into it (when it is left in place, untouched).
    fn unmark(&self) {
        if self.lock.is_some() {
            let _ = unlink_at(&self.dir, MARKER_C, 0);
        }
    }

    /// Rewrites its marker's kind, if it has a marker.
    fn remark(&self, kind: &str) {
        if let Some(f) = &self.lock {
            let _ = rewrite_marker(f, kind, &self.target.name);
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
    use crate::output::remove::MAX_DEPTH;
    use crate::output::stale::clean_stale_staging;
    use crate::output::test_support::{active_under, names, target};
    use crate::output::StagingDir;

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
