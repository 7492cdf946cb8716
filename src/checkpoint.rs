//! Finding a checkpoint's weight files and validating all of their headers.
//!
//! A checkpoint is a directory in Hugging Face layout, a single `.safetensors` file, or an
//! index file. In a directory, expo reads what transformers' `from_pretrained` reads:
//! `model.safetensors` when it is there, else the index (including transformers' variant
//! names, `model.safetensors.index.<variant>.json`), else the one `*.safetensors` file. Only
//! headers are read here; tensor data is mapped later, by the engine.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::header::{read_header, Header, HeaderError, TensorInfo};
use crate::sys::FileVersion;

/// Largest `*.safetensors.index.json` accepted, in bytes.
pub const MAX_INDEX_LEN: u64 = 256 * 1024 * 1024;

/// The single-file name transformers reads first.
pub const SINGLE_NAME: &str = "model.safetensors";

/// Weight formats expo does not read; their presence explains a missing safetensors file.
pub const FOREIGN_WEIGHT_EXTENSIONS: [&str; 8] =
    ["bin", "pt", "pth", "ckpt", "h5", "msgpack", "gguf", "onnx"];

/// How the weights of a checkpoint are laid out.
#[derive(Debug, Clone)]
pub enum Layout {
    /// A `*.safetensors.index.json` naming the shards.
    Indexed {
        /// File name of the index, relative to the checkpoint root.
        index_name: String,
        /// The index's `metadata` object, kept to mirror it in the output.
        metadata: serde_json::Map<String, serde_json::Value>,
    },
    /// One safetensors file.
    Single,
}

/// One weight file of a checkpoint.
#[derive(Debug, Clone)]
pub struct Shard {
    /// File name relative to the checkpoint root (as the index names it).
    pub name: String,
    /// Full path of the file.
    pub path: PathBuf,
    /// Its validated header.
    pub header: Header,
    /// Device, inode and modification time of the file whose header was validated, so
    /// that a file replaced before it is mapped is noticed.
    pub identity: Option<FileVersion>,
}

/// Device, inode and modification time of a file.
pub fn file_identity(meta: &fs::Metadata) -> FileVersion {
    FileVersion::of(meta)
}

/// Where a tensor lives: shard number and position in that shard's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorLoc {
    pub shard: usize,
    pub index: usize,
}

/// A checkpoint whose headers have all been read and cross-checked.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The path the user gave.
    pub given: PathBuf,
    /// The directory holding the weight files (the file's parent for a single-file input).
    pub root: PathBuf,
    /// True when the user named a directory (so side files can be copied from it).
    pub is_dir: bool,
    pub layout: Layout,
    /// Weight files, sorted by name.
    pub shards: Vec<Shard>,
    /// Things the user should know about how the checkpoint was read (e.g. an index that
    /// was ignored); the command prints them as warnings.
    pub warnings: Vec<String>,
    by_name: HashMap<String, TensorLoc>,
}

/// What can be wrong with a checkpoint as a whole. Each cause is printed once by `{:#}`:
/// the I/O error of [`CheckpointError::Io`] is its `source()`, not repeated in its message;
/// every other message is complete on its own.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path} does not exist")]
    NotFound { path: PathBuf },
    #[error("{path}: reading it failed")]
    Io {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("{path} is not a safetensors index (an index is named like model.safetensors.index.json or model.safetensors.index.<variant>.json); give the checkpoint directory, its index or a .safetensors file")]
    NotAnIndex { path: PathBuf },
    #[error("{dir} holds several safetensors indexes ({}); point at the one to use, e.g. {}", found.join(", "), dir.join(&found[0]).display())]
    AmbiguousIndex { dir: PathBuf, found: Vec<String> },
    #[error("{dir} holds several safetensors files and no index ({}); point at the one to use, e.g. {}", found.join(", "), dir.join(&found[0]).display())]
    AmbiguousWeights { dir: PathBuf, found: Vec<String> },
    #[error("{dir} holds only PyTorch/other weights ({}); expo reads safetensors only: convert the checkpoint first (e.g. load it in transformers and save_pretrained(..., safe_serialization=True))", found.join(", "))]
    ForeignWeights { dir: PathBuf, found: Vec<String> },
    #[error("{path} is a {kind} file; expo reads safetensors only: convert the checkpoint first (e.g. load it in transformers and save_pretrained(..., safe_serialization=True))")]
    ForeignFile { path: PathBuf, kind: String },
    #[error("{dir} holds no safetensors weights (no *.safetensors.index.json, model.safetensors or *.safetensors)")]
    NoWeights { dir: PathBuf },
    #[error("{path}: invalid index: {reason}")]
    InvalidIndex { path: PathBuf, reason: String },
    #[error("{index}: tensor `{tensor}` points at `{shard}`, which is not a plain relative file name inside the checkpoint")]
    UnsafeShardPath {
        index: PathBuf,
        tensor: String,
        shard: String,
    },
    #[error("{index} names shard `{shard}` (for {tensors} tensors, e.g. `{example}`), but {path} does not exist (incomplete download?)")]
    MissingShard {
        index: PathBuf,
        shard: String,
        path: PathBuf,
        tensors: usize,
        example: String,
    },
    #[error("{index} places tensor `{tensor}` in {shard}, but that file has no such tensor")]
    TensorNotInShard {
        index: PathBuf,
        tensor: String,
        shard: PathBuf,
    },
    #[error("{shard} holds tensor `{tensor}`, which {index} does not list")]
    TensorNotInIndex {
        index: PathBuf,
        tensor: String,
        shard: PathBuf,
    },
    #[error("{index} maps tensor `{tensor}` to both `{first}` and `{second}`")]
    TensorInTwoShards {
        index: PathBuf,
        tensor: String,
        first: String,
        second: String,
    },
    #[error("{path}: {error}{}", header_hint(error))]
    Header { path: PathBuf, error: HeaderError },
    /// The file could not be read: the I/O error is the source (printed once by `{:#}`).
    #[error("{path}: reading the header")]
    HeaderUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What to do about a header error: a damaged file is downloaded or saved again.
fn header_hint(error: &HeaderError) -> &'static str {
    match error {
        HeaderError::Io { .. } | HeaderError::NotAFile => "",
        _ => "; the file is damaged or was not written as safetensors: download or save it again",
    }
}

impl Checkpoint {
    /// Finds the weights at `given` and validates every header.
    pub fn open(given: &Path) -> Result<Checkpoint, CheckpointError> {
        let meta = fs::metadata(given).map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => CheckpointError::NotFound {
                path: given.to_path_buf(),
            },
            _ => CheckpointError::Io {
                path: given.to_path_buf(),
                error,
            },
        })?;
        if meta.is_dir() {
            let found = discover(given)?;
            let mut ck = match found.pick {
                Found::Index(name) => open_indexed(given, given, &name, true),
                Found::Single(name) => open_single(given, given, &name, true),
            }?;
            ck.warnings = found.warnings;
            Ok(ck)
        } else {
            let file_name = given
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let root = match given.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if is_index_name(&file_name) {
                open_indexed(given, &root, &file_name, false)
            } else if file_name.to_ascii_lowercase().ends_with(".json") {
                Err(CheckpointError::NotAnIndex {
                    path: given.to_path_buf(),
                })
            } else if let Some(ext) = foreign_extension(&file_name) {
                Err(CheckpointError::ForeignFile {
                    path: given.to_path_buf(),
                    kind: format!(".{ext}"),
                })
            } else {
                open_single(given, &root, &file_name, false)
            }
        }
    }

    /// Looks a tensor up by name.
    pub fn get(&self, name: &str) -> Option<(TensorLoc, &TensorInfo)> {
        let loc = *self.by_name.get(name)?;
        Some((loc, &self.shards[loc.shard].header.tensors[loc.index]))
    }

    /// Every tensor in checkpoint order: shards by name, then data order within a shard.
    pub fn tensors(&self) -> impl Iterator<Item = (TensorLoc, &TensorInfo)> {
        self.shards.iter().enumerate().flat_map(|(s, shard)| {
            shard
                .header
                .tensors
                .iter()
                .enumerate()
                .map(move |(i, t)| (TensorLoc { shard: s, index: i }, t))
        })
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// True when the checkpoint holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.header.data_len).sum()
    }

    /// File names of the weight files (and the index) that make up this checkpoint.
    pub fn weight_file_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.shards.iter().map(|s| s.name.clone()).collect();
        if let Layout::Indexed { index_name, .. } = &self.layout {
            names.push(index_name.clone());
        }
        names
    }
}

enum Found {
    Index(String),
    Single(String),
}

/// What discovery picked in a directory, and what the user should be told about it.
struct Discovered {
    pick: Found,
    warnings: Vec<String>,
}

/// True for the name of a safetensors index: `*.safetensors.index.json`, or transformers'
/// variant form `*.safetensors.index.<variant>.json` (`model.safetensors.index.fp16.json`,
/// whose shards are `model.fp16-00001-of-00002.safetensors`).
pub fn is_index_name(name: &str) -> bool {
    if name.ends_with(".safetensors.index.json") {
        return true;
    }
    let Some(stem) = name.strip_suffix(".json") else {
        return false;
    };
    match stem.split_once(".safetensors.index.") {
        Some((base, variant)) => !base.is_empty() && !variant.is_empty() && !variant.contains('/'),
        None => false,
    }
}

fn foreign_extension(name: &str) -> Option<&'static str> {
    let ext = Path::new(name).extension()?.to_str()?;
    FOREIGN_WEIGHT_EXTENSIONS
        .into_iter()
        .find(|e| e.eq_ignore_ascii_case(ext))
}

/// Applies the discovery order of transformers' `from_pretrained`: `model.safetensors`,
/// else the one index, else the one `*.safetensors`. An index beside `model.safetensors`
/// is ignored with a warning, as transformers ignores it.
fn discover(dir: &Path) -> Result<Discovered, CheckpointError> {
    let io_err = |error| CheckpointError::Io {
        path: dir.to_path_buf(),
        error,
    };
    let mut indexes = Vec::new();
    let mut weights = Vec::new();
    let mut foreign = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Follow symlinks (the Hugging Face cache links snapshots to blobs).
        let is_file = fs::metadata(entry.path())
            .map(|m| m.is_file())
            .unwrap_or(false);
        if !is_file || name.starts_with('.') {
            continue;
        }
        if is_index_name(&name) {
            indexes.push(name);
        } else if name.ends_with(".safetensors") {
            weights.push(name);
        } else if foreign_extension(&name).is_some() {
            foreign.push(name);
        }
    }
    indexes.sort();
    weights.sort();
    foreign.sort();
    let found = |pick| Discovered {
        pick,
        warnings: Vec::new(),
    };
    if weights.iter().any(|w| w == SINGLE_NAME) {
        let warnings = indexes
            .iter()
            .map(|index| {
                format!(
                    "{} holds both {SINGLE_NAME} and {index}; reading {SINGLE_NAME}, as transformers does (give {} to read the shards it names instead)",
                    dir.display(),
                    dir.join(index).display()
                )
            })
            .collect();
        return Ok(Discovered {
            pick: Found::Single(SINGLE_NAME.to_string()),
            warnings,
        });
    }
    match indexes.len() {
        1 => return Ok(found(Found::Index(indexes.remove(0)))),
        0 => {}
        _ => {
            return Err(CheckpointError::AmbiguousIndex {
                dir: dir.to_path_buf(),
                found: indexes,
            })
        }
    }
    match weights.len() {
        1 => Ok(found(Found::Single(weights.remove(0)))),
        0 if !foreign.is_empty() => Err(CheckpointError::ForeignWeights {
            dir: dir.to_path_buf(),
            found: foreign,
        }),
        0 => Err(CheckpointError::NoWeights {
            dir: dir.to_path_buf(),
        }),
        _ => Err(CheckpointError::AmbiguousWeights {
            dir: dir.to_path_buf(),
            found: weights,
        }),
    }
}

fn read_shard(root: &Path, name: &str) -> Result<Shard, CheckpointError> {
    let path = root.join(name);
    let header = read_header(&path).map_err(|error| match error {
        HeaderError::Io { source } if source.kind() == std::io::ErrorKind::NotFound => {
            CheckpointError::NotFound { path: path.clone() }
        }
        HeaderError::Io { source } => CheckpointError::HeaderUnreadable {
            path: path.clone(),
            source,
        },
        error => CheckpointError::Header {
            path: path.clone(),
            error,
        },
    })?;
    let identity = fs::metadata(&path).ok().map(|m| file_identity(&m));
    Ok(Shard {
        name: name.to_string(),
        path,
        header,
        identity,
    })
}

fn open_single(
    given: &Path,
    root: &Path,
    name: &str,
    is_dir: bool,
) -> Result<Checkpoint, CheckpointError> {
    let shard = read_shard(root, name)?;
    let by_name = shard
        .header
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), TensorLoc { shard: 0, index: i }))
        .collect();
    Ok(Checkpoint {
        given: given.to_path_buf(),
        root: root.to_path_buf(),
        is_dir,
        layout: Layout::Single,
        shards: vec![shard],
        warnings: Vec::new(),
        by_name,
    })
}

#[derive(Deserialize)]
struct RawIndex {
    #[serde(default)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    weight_map: crate::header::Entries<String>,
}

/// A shard name from an index, normalised (`./model-1.safetensors`, as some writers put it
/// and transformers loads, is `model-1.safetensors`); `None` for a name that could leave the
/// checkpoint directory (`..`, an absolute path) or names nothing.
fn normalize_shard_name(name: &str) -> Option<String> {
    let mut parts = Vec::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(part) => parts.push(part.to_str()?),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Reads all of `reader` as text, or `None` when it holds more than `cap` bytes (reading
/// at most `cap + 1` of them).
fn read_capped(reader: impl Read, cap: u64) -> io::Result<Option<String>> {
    let mut text = String::new();
    reader
        .take(cap.saturating_add(1))
        .read_to_string(&mut text)?;
    Ok((text.len() as u64 <= cap).then_some(text))
}

/// Opens the checkpoint whose index is `root/index_name`: the index read, then every shard
/// it names, each checked against it.
fn open_indexed(
    given: &Path,
    root: &Path,
    index_name: &str,
    is_dir: bool,
) -> Result<Checkpoint, CheckpointError> {
    let index_path = root.join(index_name);
    let raw = read_index(&index_path)?;
    let (wanted, shard_of) = assign_shards(&index_path, raw.weight_map.0)?;
    let (shards, by_name) = read_indexed_shards(root, &index_path, &wanted, &shard_of)?;
    Ok(Checkpoint {
        given: given.to_path_buf(),
        root: root.to_path_buf(),
        is_dir,
        layout: Layout::Indexed {
            index_name: index_name.to_string(),
            metadata: raw.metadata.unwrap_or_default(),
        },
        shards,
        warnings: Vec::new(),
        by_name,
    })
}

/// Reads and parses the index file (a regular file of at most [`MAX_INDEX_LEN`] bytes).
fn read_index(index_path: &Path) -> Result<RawIndex, CheckpointError> {
    let io_err = |error| CheckpointError::Io {
        path: index_path.to_path_buf(),
        error,
    };
    let file = crate::header::open_regular(index_path)
        .map_err(io_err)?
        .ok_or_else(|| CheckpointError::InvalidIndex {
            path: index_path.to_path_buf(),
            reason: "not a regular file".into(),
        })?;
    let Some(text) = read_capped(file, MAX_INDEX_LEN).map_err(io_err)? else {
        return Err(CheckpointError::InvalidIndex {
            path: index_path.to_path_buf(),
            reason: format!("larger than {MAX_INDEX_LEN} bytes"),
        });
    };
    serde_json::from_str(&text).map_err(|e| CheckpointError::InvalidIndex {
        path: index_path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Shard → its tensors (in the index's order), and tensor → its shard.
type ShardAssignment = (BTreeMap<String, Vec<String>>, HashMap<String, String>);

/// The index's weight map as shard → its tensors (in the index's order) and tensor → its
/// shard, refusing duplicates and shard names that escape the directory.
fn assign_shards(
    index_path: &Path,
    weight_map: Vec<(String, String)>,
) -> Result<ShardAssignment, CheckpointError> {
    let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut shard_of: HashMap<String, String> = HashMap::new();
    for (tensor, shard) in weight_map {
        let Some(shard) = normalize_shard_name(&shard) else {
            return Err(CheckpointError::UnsafeShardPath {
                index: index_path.to_path_buf(),
                tensor,
                shard,
            });
        };
        if let Some(first) = shard_of.get(&tensor) {
            return Err(CheckpointError::TensorInTwoShards {
                index: index_path.to_path_buf(),
                tensor,
                first: first.clone(),
                second: shard,
            });
        }
        shard_of.insert(tensor.clone(), shard.clone());
        wanted.entry(shard).or_default().push(tensor);
    }
    Ok((wanted, shard_of))
}

/// Reads the header of every shard the index names, in name order, and checks that each
/// holds exactly the tensors the index gives it. Returns the shards and where each tensor
/// is.
fn read_indexed_shards(
    root: &Path,
    index_path: &Path,
    wanted: &BTreeMap<String, Vec<String>>,
    shard_of: &HashMap<String, String>,
) -> Result<(Vec<Shard>, HashMap<String, TensorLoc>), CheckpointError> {
    let mut shards = Vec::with_capacity(wanted.len());
    let mut by_name = HashMap::with_capacity(shard_of.len());
    for (s, (shard_name, tensors)) in wanted.iter().enumerate() {
        let path = root.join(shard_name);
        if !path.exists() {
            return Err(CheckpointError::MissingShard {
                index: index_path.to_path_buf(),
                shard: shard_name.clone(),
                path,
                tensors: tensors.len(),
                example: tensors[0].clone(),
            });
        }
        let shard = read_shard(root, shard_name)?;
        for (i, t) in shard.header.tensors.iter().enumerate() {
            match shard_of.get(&t.name) {
                Some(owner) if owner == shard_name => {
                    by_name.insert(t.name.clone(), TensorLoc { shard: s, index: i });
                }
                Some(owner) => {
                    return Err(CheckpointError::TensorInTwoShards {
                        index: index_path.to_path_buf(),
                        tensor: t.name.clone(),
                        first: owner.clone(),
                        second: shard_name.clone(),
                    })
                }
                None => {
                    return Err(CheckpointError::TensorNotInIndex {
                        index: index_path.to_path_buf(),
                        tensor: t.name.clone(),
                        shard: shard.path,
                    })
                }
            }
        }
        for tensor in tensors {
            if !by_name.contains_key(tensor) {
                return Err(CheckpointError::TensorNotInShard {
                    index: index_path.to_path_buf(),
                    tensor: tensor.clone(),
                    shard: shard.path,
                });
            }
        }
        shards.push(shard);
    }
    Ok((shards, by_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_must_stay_inside() {
        let n = |s: &str| normalize_shard_name(s);
        assert_eq!(
            n("model-00001-of-00002.safetensors").as_deref(),
            Some("model-00001-of-00002.safetensors")
        );
        assert_eq!(
            n("sub/model.safetensors").as_deref(),
            Some("sub/model.safetensors")
        );
        assert_eq!(
            n("./model.safetensors").as_deref(),
            Some("model.safetensors")
        );
        assert_eq!(
            n("./sub/./a.safetensors").as_deref(),
            Some("sub/a.safetensors")
        );
        for bad in [
            "../model.safetensors",
            "/etc/passwd",
            "a/../../b",
            "./../a",
            "a/..",
            "",
            ".",
            "./",
        ] {
            assert_eq!(n(bad), None, "{bad}");
        }
    }

    #[test]
    fn index_files_are_read_up_to_their_cap_and_no_further() {
        let read = |text: &str, cap| read_capped(text.as_bytes(), cap).unwrap();
        assert_eq!(read("{}", 2).as_deref(), Some("{}"));
        assert_eq!(read("{} ", 2), None);
        assert_eq!(read("", 0).as_deref(), Some(""));
        // The cap bounds what is read, not only what is kept.
        let mut endless = std::io::repeat(b' ');
        assert_eq!(read_capped(&mut endless, 1 << 20).unwrap(), None);
        assert_eq!(MAX_INDEX_LEN, 256 << 20);
    }

    #[test]
    fn index_names_include_transformers_variants() {
        for yes in [
            "model.safetensors.index.json",
            "diffusion_pytorch_model.safetensors.index.json",
            "model.safetensors.index.fp16.json",
            "model.safetensors.index.ema.json",
        ] {
            assert!(is_index_name(yes), "{yes}");
        }
        for no in [
            "config.json",
            "model.safetensors",
            "model.safetensors.index..json",
            ".safetensors.index.fp16.json",
            "model.safetensors.json",
            "model.bin.index.json",
            "model.safetensors.index.fp16.json.bak",
        ] {
            assert!(!is_index_name(no), "{no}");
        }
    }

    #[test]
    fn foreign_extensions_are_recognised() {
        assert_eq!(foreign_extension("pytorch_model.bin"), Some("bin"));
        assert_eq!(foreign_extension("model.GGUF"), Some("gguf"));
        assert_eq!(foreign_extension("model.safetensors"), None);
        assert_eq!(foreign_extension("config.json"), None);
    }
}
