//! The staging directory: its name, its creation with a locked marker, the list of those in
//! use (removed on a forced exit), and its removal when it is dropped uncommitted.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::dirfd::open_dir;
use super::marker::create_marker;
use super::remove::{remove_marked_dir, remove_marked_tree};
use super::target::OutputTarget;
use super::{io_err, OutputError, MARK_STAGING, STAGING_PREFIX};
use crate::sys::FileId;

/// Longest part of the output's name that goes into a staging directory's name, so that
/// the staging name (`.expo-tmp-` + this + `-<pid>-<random>-old`) fits every file system's
/// name limit whatever the output's name. The whole name is in the marker.
const STAGING_NAME_PART: usize = 48;

/// The output's name as it appears in staging names: at most [`STAGING_NAME_PART`] bytes,
/// cut at a character boundary.
pub(super) fn staging_stem(name: &str) -> &str {
    let mut end = name.len().min(STAGING_NAME_PART);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// A temporary directory beside the output; removed on drop unless committed.
#[derive(Debug)]
pub struct StagingDir {
    pub(super) path: PathBuf,
    /// The directory's identity: only this directory is ever removed under its name.
    pub(super) id: FileId,
    /// The marker, open and `flock`ed for the life of the value: while it is held, no other
    /// run takes this directory for a dead run's.
    pub(super) _lock: File,
    pub(super) committed: bool,
}

/// The staging directories currently in use, with their identities, so that a second
/// interrupt can remove them. [`StagingDir::commit`] holds this lock while it renames, so
/// that the removal never races a rename into place.
static ACTIVE: Mutex<Vec<(PathBuf, FileId)>> = Mutex::new(Vec::new());

/// The lock on the list of active staging directories.
pub(super) type Active = std::sync::MutexGuard<'static, Vec<(PathBuf, FileId)>>;

pub(super) fn active() -> Active {
    ACTIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes the active staging directories, if any (called on a forced exit): each only if
/// its path still names the directory expo made.
pub fn remove_active_staging() {
    for (path, id) in std::mem::take(&mut *active()) {
        let _ = remove_marked_tree(&path, Some(id));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::stale::clean_stale_staging;
    use crate::output::test_support::{active_under, marked, target};
    use crate::output::{ASIDE_SUFFIX, STAGING_MARKER};

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
}
