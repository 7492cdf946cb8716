//! Models straight from the local Hugging Face cache, resolved offline.
//!
//! A checkpoint argument that is not an existing local path but looks like a Hub id
//! (`org/name`, optionally `org/name@REV`) is looked up in the cache that `huggingface_hub`
//! maintains, laid out as
//!
//! ```text
//! <cache>/models--org--name/
//!     refs/main                      # a file holding the commit hash a branch/tag points at
//!     refs/refs/pr/1                 # refs may contain slashes
//!     snapshots/<commit>/config.json -> ../../blobs/<sha>
//!     blobs/<sha>
//! ```
//!
//! The cache is `HF_HUB_CACHE` (or the older `HUGGINGFACE_HUB_CACHE`), else `HF_HOME/hub`,
//! else `XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`, as in
//! `huggingface_hub`. Nothing here touches the network.

use std::ffi::OsString;
use std::fs;
use std::path::{Component, Path, PathBuf};

use crate::checkpoint::{Checkpoint, CheckpointError};

/// The revision used when none is given.
pub const DEFAULT_REVISION: &str = "main";

/// Longest Hub repo id, as `huggingface_hub` validates it.
const MAX_REPO_ID_LEN: usize = 96;

/// Largest `refs/` file read, in bytes: a ref holds one 40-digit commit hash (and maybe a
/// newline); anything much longer is not a ref, and is neither read whole nor printed.
pub const MAX_REF_LEN: u64 = 1024;

/// Where a Hub input came from: the id, the revision asked for and the commit it resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    /// `org/name`.
    pub repo_id: String,
    /// The revision as given (`main` when none was), a branch, tag or commit hash.
    pub revision: String,
    /// The full commit hash of the snapshot used.
    pub commit: String,
}

/// A checkpoint argument resolved to a local path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedInput {
    /// What the user typed.
    pub given: PathBuf,
    /// The local path to read: `given` itself, or a snapshot directory of the cache.
    pub path: PathBuf,
    /// Set when the input came from the Hugging Face cache.
    pub hub: Option<HubRef>,
    /// The cache's `models--org--name` directory, when the input came from the cache.
    pub repo_dir: Option<PathBuf>,
}

impl ResolvedInput {
    fn local(given: &Path) -> ResolvedInput {
        ResolvedInput {
            given: given.to_path_buf(),
            path: given.to_path_buf(),
            hub: None,
            repo_dir: None,
        }
    }
}

/// Why a Hub id could not be resolved from the cache.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("`{spec}` is not a local path, and the Hugging Face cache has no model `{repo_id}` (looked in {}); download it first, e.g. `{download}`, or set HF_HUB_CACHE/HF_HOME if your cache is elsewhere (expo never uses the network)", looked_in.display())]
    ModelNotCached {
        spec: String,
        repo_id: String,
        looked_in: PathBuf,
        /// A command that would download it.
        download: String,
    },
    #[error("`{repo_id}` is in the Hugging Face cache, but revision `{revision}` is not (looked in {}; cached: {}); download it first, e.g. `huggingface-cli download {repo_id} --revision {revision}` (expo never uses the network)", looked_in.display(), list_or_none(available))]
    RevisionNotCached {
        repo_id: String,
        revision: String,
        available: Vec<String>,
        looked_in: PathBuf,
    },
    #[error("`{repo_id}@{revision}`: {} points at commit {commit}, but {} does not exist (incomplete download?); download it again, e.g. `huggingface-cli download {repo_id} --revision {revision}`", ref_path.display(), snapshot.display())]
    SnapshotMissing {
        repo_id: String,
        revision: String,
        commit: String,
        ref_path: PathBuf,
        snapshot: PathBuf,
    },
    #[error("`{repo_id}@{revision}`: the commit hash prefix `{revision}` matches several cached snapshots ({}); give more digits", matches.join(", "))]
    AmbiguousRevision {
        repo_id: String,
        revision: String,
        matches: Vec<String>,
    },
    #[error("`{spec}`: `{revision}` is not a valid revision (a branch, tag or commit hash)")]
    InvalidRevision { spec: String, revision: String },
    #[error("{}: {reason}", path.display())]
    BadRef { path: PathBuf, reason: String },
    #[error("{}: reading it failed", path.display())]
    RefUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{spec}` is not a local path, and the Hugging Face cache cannot be located: none of HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME or HOME is set")]
    NoCacheDir { spec: String },
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

/// The environment variables that locate the cache, read once so that tests can supply
/// their own without touching the process environment. Empty values count as unset.
#[derive(Debug, Clone, Default)]
pub struct CacheEnv {
    pub hf_hub_cache: Option<OsString>,
    /// The older name of `HF_HUB_CACHE`, still honoured by `huggingface_hub`.
    pub huggingface_hub_cache: Option<OsString>,
    pub hf_home: Option<OsString>,
    pub xdg_cache_home: Option<OsString>,
    pub home: Option<OsString>,
}

impl CacheEnv {
    /// Reads the variables from the process environment.
    pub fn from_process() -> CacheEnv {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        CacheEnv {
            hf_hub_cache: var("HF_HUB_CACHE"),
            huggingface_hub_cache: var("HUGGINGFACE_HUB_CACHE"),
            hf_home: var("HF_HOME"),
            xdg_cache_home: var("XDG_CACHE_HOME"),
            home: var("HOME").or_else(|| var("USERPROFILE")),
        }
    }

    /// The hub cache directory, as `huggingface_hub` computes it (`~` expanded).
    pub fn cache_dir(&self) -> Option<PathBuf> {
        let set = |v: &Option<OsString>| v.as_ref().filter(|v| !v.is_empty()).cloned();
        if let Some(dir) = set(&self.hf_hub_cache).or_else(|| set(&self.huggingface_hub_cache)) {
            return Some(self.expand_home(dir));
        }
        if let Some(home) = set(&self.hf_home) {
            return Some(self.expand_home(home).join("hub"));
        }
        if let Some(xdg) = set(&self.xdg_cache_home) {
            return Some(self.expand_home(xdg).join("huggingface").join("hub"));
        }
        let home = set(&self.home)?;
        Some(
            PathBuf::from(home)
                .join(".cache")
                .join("huggingface")
                .join("hub"),
        )
    }

    fn expand_home(&self, value: OsString) -> PathBuf {
        let path = PathBuf::from(value);
        let mut parts = path.components();
        let home = self.home.as_ref().filter(|h| !h.is_empty());
        match (parts.next(), home) {
            (Some(Component::Normal(first)), Some(home)) if first == "~" => {
                PathBuf::from(home).join(parts.as_path())
            }
            _ => path,
        }
    }
}

/// A Hub id split from its optional revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    pub repo_id: String,
    /// `None` when no `@REV` was given.
    pub revision: Option<String>,
}

/// Parses `org/name` or `org/name@REV`; `None` when `spec` does not look like a Hub id
/// (then it can only be a local path). The revision is checked later, by [`resolve`].
pub fn parse_hub_id(spec: &str) -> Option<HubSpec> {
    let (repo_id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id, Some(rev.to_string())),
        None => (spec, None),
    };
    // Here an id has its organisation: a bare `name` is a local path.
    (repo_id.contains('/') && is_hub_id(repo_id)).then(|| HubSpec {
        repo_id: repo_id.to_string(),
        revision,
    })
}

/// True for a Hugging Face model id: `name` or `org/name`, each part of ASCII letters,
/// digits, `-`, `_`, `.`, not starting or ending with `-` or `.`, no `--` or `..`, at most 96
/// characters. Paths (`/abs`, `./rel`, `a/b/c`, `~/x`) are not ids.
pub fn is_hub_id(s: &str) -> bool {
    if s.is_empty() || s.len() > MAX_REPO_ID_LEN || s.contains("--") || s.contains("..") {
        return false;
    }
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && !p.ends_with(['.', '-'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    match s.split_once('/') {
        Some((org, name)) => part_ok(org) && part_ok(name),
        None => part_ok(s),
    }
}

/// A revision must be a relative path of plain components (refs may hold slashes, as in
/// `refs/pr/1`) so that it cannot point outside the cache entry.
fn revision_ok(rev: &str) -> bool {
    !rev.is_empty()
        && !rev.starts_with('/')
        && !rev.contains('\\')
        && !rev.chars().any(|c| c.is_control() || c.is_whitespace())
        && rev
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_full_commit(s: &str) -> bool {
    s.len() == 40 && is_hex(s)
}

/// The cache directory of a model repo: `models--org--name`.
pub fn repo_folder_name(repo_id: &str) -> String {
    format!("models--{}", repo_id.replace('/', "--"))
}

/// Resolves a checkpoint argument given as a path (non-UTF-8 paths are always local).
pub fn resolve_path(given: &Path, env: &CacheEnv) -> Result<ResolvedInput, HubError> {
    match given.to_str() {
        Some(spec) => resolve_with(spec, env),
        None => Ok(ResolvedInput::local(given)),
    }
}

/// Resolves a checkpoint argument: an existing local path wins; else a Hub id is looked up
/// in the cache; anything else is returned as a local path (whose opening then reports
/// that it does not exist).
pub fn resolve_with(spec: &str, env: &CacheEnv) -> Result<ResolvedInput, HubError> {
    let given = Path::new(spec);
    // symlink_metadata: a dangling local symlink is still the user's local path.
    if fs::symlink_metadata(given).is_ok() {
        return Ok(ResolvedInput::local(given));
    }
    let Some(hub) = parse_hub_id(spec) else {
        return Ok(ResolvedInput::local(given));
    };
    let cache = env.cache_dir().ok_or_else(|| HubError::NoCacheDir {
        spec: spec.to_string(),
    })?;
    let repo_dir = cache.join(repo_folder_name(&hub.repo_id));
    let revision = hub
        .revision
        .clone()
        .unwrap_or_else(|| DEFAULT_REVISION.to_string());
    if !revision_ok(&revision) {
        return Err(HubError::InvalidRevision {
            spec: spec.to_string(),
            revision,
        });
    }
    if !repo_dir.is_dir() {
        let download = match &hub.revision {
            Some(rev) => format!("huggingface-cli download {} --revision {rev}", hub.repo_id),
            None => format!("huggingface-cli download {}", hub.repo_id),
        };
        return Err(HubError::ModelNotCached {
            spec: spec.to_string(),
            repo_id: hub.repo_id,
            looked_in: repo_dir,
            download,
        });
    }
    let commit = find_commit(&repo_dir, &hub.repo_id, &revision)?;
    let path = repo_dir.join("snapshots").join(&commit);
    Ok(ResolvedInput {
        given: given.to_path_buf(),
        path,
        hub: Some(HubRef {
            repo_id: hub.repo_id,
            revision,
            commit,
        }),
        repo_dir: Some(repo_dir),
    })
}

/// The commit a revision stands for: a cached full commit hash, else `refs/<rev>`, else a
/// unique prefix (7+ hex digits) of a cached snapshot.
fn find_commit(repo_dir: &Path, repo_id: &str, revision: &str) -> Result<String, HubError> {
    let snapshots = repo_dir.join("snapshots");
    if is_full_commit(revision) && snapshots.join(revision).is_dir() {
        return Ok(revision.to_string());
    }
    let ref_path = repo_dir.join("refs").join(revision);
    if ref_path.is_file() {
        let text = read_ref(&ref_path)?;
        let commit = text.trim();
        if !is_full_commit(commit) {
            return Err(HubError::BadRef {
                path: ref_path,
                reason: format!(
                    "{} is not a commit hash (a ref holds the 40 hex digits of one); download the revision again",
                    short_quote(commit)
                ),
            });
        }
        let snapshot = snapshots.join(commit);
        if !snapshot.is_dir() {
            return Err(HubError::SnapshotMissing {
                repo_id: repo_id.to_string(),
                revision: revision.to_string(),
                commit: commit.to_string(),
                ref_path,
                snapshot,
            });
        }
        return Ok(commit.to_string());
    }
    let cached = list_snapshots(&snapshots);
    if (7..40).contains(&revision.len()) && is_hex(revision) {
        let lower = revision.to_ascii_lowercase();
        let matches: Vec<String> = cached
            .iter()
            .filter(|c| c.starts_with(&lower))
            .cloned()
            .collect();
        match matches.len() {
            0 => {}
            1 => return Ok(matches.into_iter().next().expect("one match")),
            _ => {
                return Err(HubError::AmbiguousRevision {
                    repo_id: repo_id.to_string(),
                    revision: revision.to_string(),
                    matches,
                })
            }
        }
    }
    let mut available = list_refs(&repo_dir.join("refs"));
    available.extend(cached);
    Err(HubError::RevisionNotCached {
        repo_id: repo_id.to_string(),
        revision: revision.to_string(),
        available,
        looked_in: repo_dir.to_path_buf(),
    })
}

/// Reads a `refs/` file, at most [`MAX_REF_LEN`] bytes of it, refusing anything that is
/// not a regular file (without blocking on a FIFO).
fn read_ref(path: &Path) -> Result<String, HubError> {
    use std::io::Read;
    let bad = |reason: String| HubError::BadRef {
        path: path.to_path_buf(),
        reason,
    };
    let unreadable = |source| HubError::RefUnreadable {
        path: path.to_path_buf(),
        source,
    };
    let file = crate::header::open_regular(path)
        .map_err(unreadable)?
        .ok_or_else(|| bad("not a regular file, so not a ref".into()))?;
    let mut bytes = Vec::new();
    file.take(MAX_REF_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_REF_LEN {
        return Err(bad(format!(
            "it is larger than {MAX_REF_LEN} bytes, so it is not a ref (a ref holds one 40-digit commit hash); download the revision again"
        )));
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `text` quoted for a message, cut to a few dozen characters.
fn short_quote(text: &str) -> String {
    const MAX: usize = 48;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}…", &text[..cut]),
        None => format!("{text:?}"),
    }
}

/// Commit hashes of the cached snapshots, sorted.
fn list_snapshots(snapshots: &Path) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(snapshots)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_full_commit(n))
        .collect();
    out.sort();
    out
}

/// Names of the refs (branches, tags, `refs/pr/N`), relative to `refs/`, sorted.
fn list_refs(refs: &Path) -> Vec<String> {
    fn walk(dir: &Path, prefix: &str, depth: usize, out: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let path = entry.path();
            if path.is_dir() {
                if depth < 8 {
                    walk(&path, &rel, depth + 1, out);
                }
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(refs, "", 0, &mut out);
    out.sort();
    out
}

/// Either step of opening a checkpoint argument can fail (boxed: errors are rare, results
/// are passed around).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Hub(Box<HubError>),
    #[error(transparent)]
    Checkpoint(Box<CheckpointError>),
}

impl From<HubError> for OpenError {
    fn from(e: HubError) -> OpenError {
        OpenError::Hub(Box::new(e))
    }
}

impl From<CheckpointError> for OpenError {
    fn from(e: CheckpointError) -> OpenError {
        OpenError::Checkpoint(Box::new(e))
    }
}

/// Resolves a checkpoint argument (local path or Hub id) and opens it. The checkpoint's
/// `given` stays what the user typed; the resolved location is returned beside it. Meant
/// for every command that reads checkpoints.
pub fn open_checkpoint(
    given: &Path,
    env: &CacheEnv,
) -> Result<(Checkpoint, ResolvedInput), OpenError> {
    let resolved = resolve_path(given, env)?;
    let mut ck = Checkpoint::open(&resolved.path)?;
    ck.given = resolved.given.clone();
    Ok((ck, resolved))
}

/// [`open_checkpoint`] for the commands: errors become `anyhow` errors that name the
/// argument (`what`, e.g. `--sft` or `checkpoint`) and what was typed.
pub fn open_for(
    what: &str,
    given: &Path,
    env: &CacheEnv,
) -> anyhow::Result<(Checkpoint, ResolvedInput)> {
    match open_checkpoint(given, env) {
        Ok(opened) => Ok(opened),
        Err(OpenError::Hub(e)) => {
            Err(anyhow::Error::new(*e).context(format!("{what} {}", given.display())))
        }
        Err(OpenError::Checkpoint(e)) => {
            Err(anyhow::Error::new(*e).context(format!("reading {what} {}", given.display())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_recognised() {
        let id = |s: &str| parse_hub_id(s).map(|h| (h.repo_id, h.revision));
        assert_eq!(
            id("HuggingFaceH4/zephyr-7b-beta"),
            Some(("HuggingFaceH4/zephyr-7b-beta".into(), None))
        );
        assert_eq!(
            id("org/name@v1.0"),
            Some(("org/name".into(), Some("v1.0".into())))
        );
        assert_eq!(
            id("org/name@refs/pr/1"),
            Some(("org/name".into(), Some("refs/pr/1".into())))
        );
        assert_eq!(id("org/name@"), Some(("org/name".into(), Some("".into()))));
        for not in [
            "name",
            "/abs/path",
            "./org/name",
            "../org/name",
            "~/models",
            "a/b/c",
            "org/",
            "/name",
            "org/na me",
            "org/-name",
            "org/name.",
            "org--x/name",
            "org/a..b",
            "out/model.safetensors/x",
        ] {
            assert_eq!(parse_hub_id(not), None, "{not}");
        }
        assert!(parse_hub_id(&format!("org/{}", "x".repeat(100))).is_none());
    }

    #[test]
    fn hub_ids() {
        for ok in [
            "gpt2",
            "org/name",
            "HuggingFaceH4/zephyr-7b-beta",
            "a.b/c_d-1",
        ] {
            assert!(is_hub_id(ok), "{ok}");
        }
        for bad in [
            "",
            "/abs/path",
            "./x",
            "a/b/c",
            "~/m",
            "org/-x",
            "a--b/c",
            "a/../b",
            "org/name@main",
            "C:\\m",
        ] {
            assert!(!is_hub_id(bad), "{bad}");
        }
    }

    #[test]
    fn revisions_stay_inside_the_cache() {
        assert!(revision_ok("main"));
        assert!(revision_ok("refs/pr/1"));
        assert!(revision_ok("v1.0"));
        for bad in ["", "/main", "../x", "a/../b", "a//b", "a/", "x y", "a\\b"] {
            assert!(!revision_ok(bad), "{bad}");
        }
    }

    #[test]
    fn cache_dir_follows_huggingface_hub() {
        let os = |s: &str| Some(OsString::from(s));
        let mut env = CacheEnv {
            home: os("/home/u"),
            ..CacheEnv::default()
        };
        assert_eq!(
            env.cache_dir(),
            Some(PathBuf::from("/home/u/.cache/huggingface/hub"))
        );
        env.xdg_cache_home = os("/xdg");
        assert_eq!(env.cache_dir(), Some(PathBuf::from("/xdg/huggingface/hub")));
        env.hf_home = os("~/hf");
        assert_eq!(env.cache_dir(), Some(PathBuf::from("/home/u/hf/hub")));
        env.huggingface_hub_cache = os("/legacy");
        assert_eq!(env.cache_dir(), Some(PathBuf::from("/legacy")));
        env.hf_hub_cache = os("/hub");
        assert_eq!(env.cache_dir(), Some(PathBuf::from("/hub")));
        env.hf_hub_cache = os("");
        assert_eq!(env.cache_dir(), Some(PathBuf::from("/legacy")));
        assert_eq!(CacheEnv::default().cache_dir(), None);
    }

    #[test]
    fn non_hub_specs_stay_local() {
        let env = CacheEnv::default();
        let r = resolve_with("/definitely/not/here/at/all", &env).unwrap();
        assert_eq!(r.path, PathBuf::from("/definitely/not/here/at/all"));
        assert!(r.hub.is_none());
        assert!(matches!(
            resolve_with("no-such-org-x/no-such-model-y", &env),
            Err(HubError::NoCacheDir { .. })
        ));
    }
}
