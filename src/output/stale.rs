//! Clean-up of stale staging directories: what killed runs left beside an output.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::dirfd::open_dir;
use super::marker::{open_marker, try_lock};
use super::remove::remove_marked_dir;
use super::{ASIDE_SUFFIX, MARK_ASIDE, MARK_OLD, MARK_STAGING, STAGING_PREFIX};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::marker::try_lock;
    use crate::output::remove::MAX_DEPTH;
    use crate::output::test_support::marked;
    use crate::output::STAGING_MARKER;
    use std::fs::File;

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
}
