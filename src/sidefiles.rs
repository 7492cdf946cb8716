//! Files beside the weights: θ1's configuration and tokenizer files copied byte for byte,
//! and the model card and provenance record expo writes itself.
//!
//! Side files are opened and checked when the inputs are validated ([`open_side_files`]):
//! only regular files are accepted (opened without blocking, checked with `fstat` after
//! opening, so a FIFO or a link to `/dev/zero` is refused by name, never read), and each
//! file's device, inode, size and modification time are recorded. The copy at the end
//! ([`SideFiles::copy_into`]) reads from the handle opened then, and fails if the file
//! changed in between (rewritten in place, renamed over, removed), like a changed weight file.

pub mod card;
pub mod config_dtype;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::checkpoint::{Checkpoint, FOREIGN_WEIGHT_EXTENSIONS};
use crate::dtype::FloatDtype;
use crate::hub::ResolvedInput;
use crate::plan::DtypeChoice;

pub use card::CardMetadata;

/// Name of the provenance record written into the output.
pub const PROVENANCE_NAME: &str = "expo.json";
/// Name of the model card written into the output.
pub const MODEL_CARD_NAME: &str = "README.md";
/// Name of the configuration whose dtype `--dtype` updates.
pub const CONFIG_NAME: &str = "config.json";
/// Deepest directory nesting followed when copying.
const MAX_DEPTH: usize = 16;
/// Side files whose handle is kept open from validation to copy; beyond that (a directory
/// of thousands of files must not exhaust the open-files limit) a file is reopened for the
/// copy and must still be the very file that was checked (device, inode, size, mtime).
const MAX_HELD: usize = 64;
/// A `config.json` larger than this is copied without its dtype updated.
const MAX_CONFIG_EDIT: u64 = 16 << 20;
/// Copy buffer.
const CHUNK: usize = 1 << 20;

/// Errors about side files. Each names the file; the cause is printed once.
#[derive(Debug, thiserror::Error)]
pub enum SideFileError {
    #[error("{}: cannot {op}: {cause}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        cause: io::Error,
    },
    #[error(
        "{} is {kind}, not a regular file; expo copies only regular files from --aligned: remove it from the checkpoint directory, or replace it with the file it stands for",
        path.display()
    )]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "{} {what} after expo checked it; side files must not change while expo runs (is another program writing --aligned?); run again once it is complete",
        path.display()
    )]
    Changed { path: PathBuf, what: &'static str },
    #[error(
        "{first} and {second} would both be written to {name} in the output; rename the file in --aligned (and its entry in the index)"
    )]
    Collision {
        name: String,
        first: String,
        second: String,
    },
    #[error(transparent)]
    Interrupted(#[from] crate::interrupt::Interrupted),
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> SideFileError + 'a {
    move |cause| SideFileError::Io {
        path: path.to_path_buf(),
        op,
        cause,
    }
}

/// Size, modification time and identity of a file, as checked at validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }

    /// How `now` differs from `self`, for [`SideFileError::Changed`].
    fn change(&self, now: &Stamp) -> Option<&'static str> {
        if (now.dev, now.ino) != (self.dev, self.ino) {
            Some("was replaced by another file")
        } else if now.len != self.len {
            Some("changed size")
        } else if (now.mtime, now.mtime_nsec) != (self.mtime, self.mtime_nsec) {
            Some("was modified")
        } else {
            None
        }
    }
}

/// One side file, opened and checked at validation.
#[derive(Debug)]
struct Opened {
    full: PathBuf,
    /// The handle opened at validation (`None` past [`MAX_HELD`]: reopened and checked).
    file: Option<File>,
    stamp: Stamp,
    /// The bytes to write instead of the file's (config.json with `--dtype`).
    edited: Option<Vec<u8>>,
}

/// The side files of θ1 to copy, and what was left out.
#[derive(Debug, Default)]
pub struct SideFiles {
    /// Paths relative to θ1's directory, in sorted order.
    pub copy: Vec<PathBuf>,
    /// Weight files that are not part of the checkpoint expo read (e.g. a
    /// `consolidated.safetensors` beside the sharded weights): not copied, since they would
    /// hold θ1's unextrapolated values.
    pub skipped_weights: Vec<PathBuf>,
    /// Entries not copied although they are not weights, with the reason (a symlinked
    /// directory, a directory too deep, a dangling symlink).
    pub not_copied: Vec<(PathBuf, &'static str)>,
    /// What θ1's model card says that still holds for the output.
    pub card: CardMetadata,
    /// `config.json`'s dtype values updated for `--dtype`, as (key path, old value, new).
    pub config_edits: Vec<(String, String, &'static str)>,
    /// Other notes for the user (e.g. θ1's card could not be read).
    notes: Vec<String>,
    /// Parallel to `copy`.
    opened: Vec<Opened>,
}

/// Lists and opens the files of θ1's directory to copy: everything except hidden entries,
/// weights (safetensors and other formats), θ1's README.md (read for its card metadata) and
/// an earlier `expo.json`. Anything else that is not a regular file is an error.
pub fn list_side_files(aligned: &Checkpoint) -> Result<SideFiles, SideFileError> {
    open_side_files(aligned, DtypeChoice::Auto)
}

/// [`list_side_files`], with `config.json`'s dtype prepared for `dtype` (see
/// [`config_dtype`]).
pub fn open_side_files(
    aligned: &Checkpoint,
    dtype: DtypeChoice,
) -> Result<SideFiles, SideFileError> {
    let mut out = SideFiles::default();
    if !aligned.is_dir {
        return Ok(out);
    }
    let used = aligned.weight_file_names();
    walk(&aligned.root, Path::new(""), 0, &used, &mut out)?;
    // Sorted by path, with the handles kept in step.
    let mut pairs: Vec<(PathBuf, Opened)> = out.copy.drain(..).zip(out.opened.drain(..)).collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    (out.copy, out.opened) = pairs.into_iter().unzip();
    out.skipped_weights.sort();
    out.not_copied.sort();
    out.read_card(&aligned.root.join(MODEL_CARD_NAME));
    if let DtypeChoice::Fixed(d) = dtype {
        out.prepare_config(d)?;
    }
    Ok(out)
}

/// What a file type is, for messages.
fn kind_of(ft: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        "a FIFO (named pipe)"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_dir() {
        "a directory"
    } else {
        "a special file"
    }
}

/// Opens `path` for reading without blocking (a FIFO opens at once; no controlling
/// terminal is acquired), and checks after opening that it is a regular file.
fn open_regular(path: &Path) -> Result<(File, fs::Metadata), SideFileError> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io_err(path, "open"))?;
    let meta = file.metadata().map_err(io_err(path, "stat"))?;
    if !meta.is_file() {
        return Err(SideFileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(meta.file_type()),
        });
    }
    Ok((file, meta))
}

fn walk(
    root: &Path,
    rel: &Path,
    depth: usize,
    used: &[String],
    out: &mut SideFiles,
) -> Result<(), SideFileError> {
    let dir = root.join(rel);
    let mut entries = Vec::new();
    for entry in fs::read_dir(&dir).map_err(io_err(&dir, "read directory"))? {
        let entry = entry.map_err(io_err(&dir, "read directory"))?;
        let is_link = entry
            .file_type()
            .map_err(io_err(&entry.path(), "stat"))?
            .is_symlink();
        entries.push((entry.file_name(), is_link));
    }
    entries.sort();
    for (file_name, is_link) in entries {
        // The lossy form is only compared with ASCII names; paths keep the real bytes.
        let name = file_name.to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let rel_path = rel.join(&file_name);
        let full = root.join(&rel_path);
        // Symlinked files are followed (the Hugging Face cache links every file into
        // blobs/); a symlinked directory is not (it could loop, or pull in a whole other
        // tree), and neither is a dangling link: both are named in a warning.
        let meta = match fs::metadata(&full) {
            Ok(m) => m,
            Err(e) if is_link && e.kind() == io::ErrorKind::NotFound => {
                out.not_copied
                    .push((rel_path, "it is a symlink whose target does not exist"));
                continue;
            }
            Err(e) => return Err(io_err(&full, "stat")(e)),
        };
        if meta.is_dir() {
            if is_link {
                out.not_copied.push((
                    rel_path,
                    "it is a symlink to a directory, which expo does not follow; copy it into the output by hand if the model needs it",
                ));
            } else if depth + 1 >= MAX_DEPTH {
                out.not_copied.push((
                    rel_path,
                    "it is nested deeper than 16 directory levels; copy it into the output by hand if the model needs it",
                ));
            } else {
                walk(root, &rel_path, depth + 1, used, out)?;
            }
            continue;
        }
        let top = depth == 0;
        let rel_str = rel_path.to_string_lossy();
        if used.iter().any(|u| *u == rel_str) {
            continue;
        }
        let lower = name.to_ascii_lowercase();
        if top && (lower == "readme.md" || name == PROVENANCE_NAME) {
            continue;
        }
        let ext = Path::new(&lower)
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("");
        if lower.ends_with(".safetensors") || crate::checkpoint::is_index_name(&lower) {
            out.skipped_weights.push(rel_path);
            continue;
        }
        if FOREIGN_WEIGHT_EXTENSIONS.contains(&ext) || lower.ends_with(".bin.index.json") {
            continue;
        }
        // Refused before opening when already known to be special (opening some devices
        // has effects), and checked again after opening (it may have been swapped).
        if !meta.is_file() {
            return Err(SideFileError::NotRegular {
                path: full,
                kind: kind_of(meta.file_type()),
            });
        }
        let (file, meta) = open_regular(&full)?;
        let held = out.opened.len() < MAX_HELD;
        out.opened.push(Opened {
            full,
            file: held.then_some(file),
            stamp: Stamp::of(&meta),
            edited: None,
        });
        out.copy.push(rel_path);
    }
    Ok(())
}

impl SideFiles {
    /// Warnings about what is not copied, for the user.
    pub fn warnings(&self) -> Vec<String> {
        let mut w: Vec<String> = self
            .skipped_weights
            .iter()
            .map(|p| {
                format!(
                    "not copying {} from --aligned: it holds weights that are not part of the checkpoint expo read",
                    p.display()
                )
            })
            .collect();
        for (p, why) in &self.not_copied {
            w.push(format!("not copying {} from --aligned: {why}", p.display()));
        }
        w.extend(self.notes.iter().cloned());
        w
    }

    /// Reads θ1's card metadata (at most [`card::MAX_CARD_BYTES`], from a regular file).
    fn read_card(&mut self, path: &Path) {
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            _ => {}
        }
        let text = open_regular(path).and_then(|(file, _)| {
            let mut bytes = Vec::new();
            file.take(card::MAX_CARD_BYTES)
                .read_to_end(&mut bytes)
                .map_err(io_err(path, "read"))?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        });
        match text {
            Ok(text) => self.card = CardMetadata::parse(&text),
            Err(e) => self.notes.push(format!(
                "not reading θ1's model card: {e}; its license and other metadata are not carried over"
            )),
        }
    }

    /// Prepares `config.json` with `dtype` named in it (see [`config_dtype`]).
    fn prepare_config(&mut self, dtype: FloatDtype) -> Result<(), SideFileError> {
        let Some(i) = self.copy.iter().position(|p| p == Path::new(CONFIG_NAME)) else {
            return Ok(());
        };
        let opened = &mut self.opened[i];
        if opened.stamp.len > MAX_CONFIG_EDIT {
            self.notes.push(format!(
                "{} is larger than {}, so the dtype it names was not updated to {}",
                opened.full.display(),
                crate::text::bytes(MAX_CONFIG_EDIT),
                config_dtype::torch_name(dtype)
            ));
            return Ok(());
        }
        let bytes = read_validated(opened)?;
        match config_dtype::set_dtype(&bytes, dtype) {
            Ok(Some((text, edits))) => {
                self.config_edits = edits
                    .into_iter()
                    .map(|e| (e.path, e.old, config_dtype::torch_name(dtype)))
                    .collect();
                opened.edited = Some(text);
            }
            Ok(None) => {}
            Err(e) => self.notes.push(format!(
                "{}: {e}, so the dtype it names was not updated to {}",
                opened.full.display(),
                config_dtype::torch_name(dtype)
            )),
        }
        Ok(())
    }

    /// [`SideFiles::check_output_names`] for the weight files and index of `plan`.
    pub fn check_plan(&self, plan: &crate::plan::Plan) -> Result<(), SideFileError> {
        self.check_output_names(
            plan.shards
                .iter()
                .map(|s| s.file_name.as_str())
                .chain(plan.index.as_ref().map(|(n, _)| n.as_str())),
        )
    }

    /// Checks that no two files of the output share a name: the weight files and index of
    /// the plan (`weight_names`), the model card and provenance expo writes, and the side
    /// files. A name that is another's directory (`weights` and `weights/a.safetensors`)
    /// collides too. expo's own names are compared ignoring ASCII case (they would clash on
    /// a case-insensitive file system).
    pub fn check_output_names<'a>(
        &self,
        weight_names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), SideFileError> {
        // Keyed by the name (expo's own names and what matches them: lowercased).
        let mut seen: HashMap<String, String> = HashMap::new();
        let mut add = |key: String, name: &str, what: String| -> Result<(), SideFileError> {
            if let Some(first) = seen.get(&key) {
                return Err(SideFileError::Collision {
                    name: name.to_string(),
                    first: first.clone(),
                    second: what,
                });
            }
            seen.insert(key, what);
            Ok(())
        };
        let reserved = [
            (MODEL_CARD_NAME, "the model card expo writes"),
            (PROVENANCE_NAME, "the provenance record expo writes"),
        ];
        for (name, what) in reserved {
            add(name.to_ascii_lowercase(), name, what.to_string())?;
        }
        let mut names: Vec<(String, String)> = weight_names
            .into_iter()
            .map(|n| (n.to_string(), format!("θ1's weight file {n}")))
            .collect();
        names.extend(self.copy.iter().map(|p| {
            let n = p.to_string_lossy().into_owned();
            (n.clone(), format!("θ1's side file {n}"))
        }));
        for (name, what) in &names {
            let lower = name.to_ascii_lowercase();
            let key = if reserved
                .iter()
                .any(|(r, _)| r.to_ascii_lowercase() == lower)
            {
                lower
            } else {
                name.clone()
            };
            add(key, name, what.clone())?;
        }
        // A file whose name is a directory another file needs.
        for (name, what) in &names {
            let mut dir = Path::new(name.as_str()).parent();
            while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
                let ds = d.to_string_lossy().into_owned();
                if let Some(first) = seen.get(&ds).or_else(|| seen.get(&ds.to_ascii_lowercase())) {
                    return Err(SideFileError::Collision {
                        name: ds,
                        first: first.clone(),
                        second: format!("the directory of {what}"),
                    });
                }
                dir = d.parent();
            }
        }
        Ok(())
    }

    /// Keeps only the files for which `keep` (given the path relative to the checkpoint
    /// directory) is true, e.g. when another directory supplies some of the files.
    pub fn retain(&mut self, mut keep: impl FnMut(&Path) -> bool) {
        let pairs: Vec<(PathBuf, Opened)> =
            self.copy.drain(..).zip(self.opened.drain(..)).collect();
        (self.copy, self.opened) = pairs.into_iter().filter(|(p, _)| keep(p)).unzip();
    }

    /// Copies the side files into `dest` (creating subdirectories), from the handles opened
    /// at validation, and fsyncs each. Fails, naming the file, if one changed since it was
    /// checked. New files get the usual permissions (0666 less the umask).
    pub fn copy_into(&self, dest: &Path) -> Result<(), SideFileError> {
        crate::failpoint::pause("side-files-copy");
        for (rel, opened) in self.copy.iter().zip(&self.opened) {
            crate::interrupt::check()?;
            let dst = dest.join(rel);
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent).map_err(io_err(parent, "create directory"))?;
            }
            let mut output = create_new(&dst)?;
            if let Some(edited) = &opened.edited {
                output.write_all(edited).map_err(io_err(&dst, "write"))?;
                verify(opened, None)?;
            } else {
                let reopened;
                let file = match &opened.file {
                    Some(f) => f,
                    None => {
                        reopened = reopen(opened)?;
                        &reopened
                    }
                };
                copy_range(file, opened, &mut output, &dst)?;
                verify(opened, Some(file))?;
            }
            output.sync_all().map_err(io_err(&dst, "fsync"))?;
        }
        Ok(())
    }
}
/// Reopens a side file whose handle was not kept, checking it is the file validated.
fn reopen(opened: &Opened) -> Result<File, SideFileError> {
    let (file, meta) = open_regular(&opened.full)?;
    if let Some(what) = opened.stamp.change(&Stamp::of(&meta)) {
        return Err(SideFileError::Changed {
            path: opened.full.clone(),
            what,
        });
    }
    Ok(file)
}

/// The whole content of a validated side file (at most its validated size).
fn read_validated(opened: &Opened) -> Result<Vec<u8>, SideFileError> {
    let reopened;
    let file = match &opened.file {
        Some(f) => f,
        None => {
            reopened = reopen(opened)?;
            &reopened
        }
    };
    let mut bytes = Vec::new();
    copy_range(file, opened, &mut bytes, &opened.full)?;
    Ok(bytes)
}

/// Copies the validated size of `file` from offset 0 (positional reads, so one handle
/// serves every output of a sweep), checking for an interrupt between chunks.
fn copy_range(
    file: &File,
    opened: &Opened,
    out: &mut impl Write,
    dst: &Path,
) -> Result<(), SideFileError> {
    let len = opened.stamp.len;
    let mut buf = vec![0u8; usize::try_from(len).map_or(CHUNK, |l| l.min(CHUNK)).max(1)];
    let mut off = 0u64;
    while off < len {
        crate::interrupt::check()?;
        let want = usize::try_from(len - off).map_or(buf.len(), |r| r.min(buf.len()));
        let n = match file.read_at(&mut buf[..want], off) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(&opened.full, "read")(e)),
        };
        if n == 0 {
            return Err(SideFileError::Changed {
                path: opened.full.clone(),
                what: "changed size",
            });
        }
        out.write_all(&buf[..n]).map_err(io_err(dst, "write"))?;
        off += n as u64;
    }
    Ok(())
}

/// Fails if the file changed since validation: through its handle (size, mtime), and at
/// its path (removed, or replaced by another file).
fn verify(opened: &Opened, file: Option<&File>) -> Result<(), SideFileError> {
    let changed = |what| SideFileError::Changed {
        path: opened.full.clone(),
        what,
    };
    if let Some(file) = file {
        let meta = file.metadata().map_err(io_err(&opened.full, "stat"))?;
        if let Some(what) = opened.stamp.change(&Stamp::of(&meta)) {
            return Err(changed(what));
        }
    }
    match fs::metadata(&opened.full) {
        Ok(meta) => match opened.stamp.change(&Stamp::of(&meta)) {
            Some(what) => Err(changed(what)),
            None => Ok(()),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(changed("was removed")),
        Err(e) => Err(io_err(&opened.full, "stat")(e)),
    }
}

/// Creates a new file (never overwriting one: two output files with one name are a bug
/// caught here even if [`SideFiles::check_output_names`] was not called).
fn create_new(path: &Path) -> Result<File, SideFileError> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(path, "create"))
}

/// Writes `contents` to `dest/name` (a new file) and fsyncs it.
pub fn write_file(dest: &Path, name: &str, contents: &[u8]) -> Result<(), SideFileError> {
    let path = dest.join(name);
    let mut f = create_new(&path)?;
    f.write_all(contents).map_err(io_err(&path, "write"))?;
    f.sync_all().map_err(io_err(&path, "fsync"))
}

/// One input as recorded in the provenance.
#[derive(Debug, Clone, Serialize)]
pub struct InputRecord {
    /// The path as the user gave it.
    pub given: String,
    /// The resolved, absolute path.
    pub path: String,
    /// The weight files read, relative to `path`'s directory.
    pub files: Vec<String>,
    pub tensors: usize,
    pub bytes: u64,
    /// The Hub id (`org/name`), when the input came from the Hugging Face cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hub_id: Option<String>,
    /// The revision asked for (`main` unless `@REV` was given), for a Hub input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The commit of the cached snapshot read, for a Hub input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

impl InputRecord {
    /// Describes a checkpoint whose argument was resolved (possibly from the Hugging Face
    /// cache): `given` is what the user typed, `path` the local directory read.
    pub fn resolved(ck: &Checkpoint, input: &ResolvedInput) -> InputRecord {
        let mut record = Self::at(ck, &input.path);
        record.given = input.given.display().to_string();
        if let Some(hub) = &input.hub {
            record.hub_id = Some(hub.repo_id.clone());
            record.revision = Some(hub.revision.clone());
            record.commit = Some(hub.commit.clone());
        }
        record
    }

    fn at(ck: &Checkpoint, path: &Path) -> InputRecord {
        let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        InputRecord {
            given: ck.given.display().to_string(),
            path: canonical.display().to_string(),
            files: ck.weight_file_names(),
            tensors: ck.len(),
            bytes: ck.data_bytes(),
            hub_id: None,
            revision: None,
            commit: None,
        }
    }

    /// How the model card names this input: the path as given, or for a Hub input the id
    /// with the revision and the commit it resolved to.
    pub fn describe(&self) -> String {
        match (&self.hub_id, &self.revision, &self.commit) {
            (Some(id), Some(rev), Some(commit)) if rev == commit => {
                format!("`{id}` at commit `{commit}`")
            }
            (Some(id), Some(rev), Some(commit)) => {
                format!("`{id}` at `{rev}` (commit `{commit}`)")
            }
            _ => format!("`{}`", self.given),
        }
    }
}

/// See [`Provenance::base_models`].
fn base_model_ids(sft: &InputRecord, aligned: &InputRecord, card: &CardMetadata) -> Vec<String> {
    let mut ids: Vec<String> = match &sft.hub_id {
        Some(id) => vec![id.clone()],
        None => card.base_models.clone(),
    };
    ids.extend(aligned.hub_id.clone());
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| card::is_hub_id(id) && seen.insert(id.clone()));
    ids
}

/// Tensor counts by treatment.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TensorCounts {
    pub total: usize,
    pub extrapolated: usize,
    /// Converted to another float format only (alpha 0 with --dtype).
    pub cast: usize,
    pub copied: usize,
}

/// The `expo.json` provenance record. Deterministic: no timestamps, no host names.
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub tool: &'static str,
    pub version: &'static str,
    pub method: &'static str,
    pub formula: &'static str,
    pub arithmetic: &'static str,
    pub paper: &'static str,
    pub alpha: f64,
    /// Per-module rules, in priority order, with what they matched.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleRecord>,
    pub dtype: String,
    pub max_shard_size: Option<u64>,
    /// Whole-model ‖θ1 − θ0‖ / ‖θ0‖ over the extrapolated tensors.
    pub relative_change: Option<f64>,
    pub sft: InputRecord,
    pub aligned: InputRecord,
    pub tensors: TensorCounts,
    /// Bytes of tensor data written.
    pub tensor_bytes: u64,
    pub shards: Vec<String>,
    pub side_files: Vec<String>,
    pub command: Vec<String>,
}

/// A per-module rule as recorded in the provenance and the model card.
#[derive(Debug, Clone, Serialize)]
pub struct RuleRecord {
    /// The rule as written on the command line.
    pub rule: String,
    /// The α it gave in this output.
    pub alpha: f64,
    /// How many tensors it matched.
    pub tensors: usize,
}

/// The paper this method comes from.
pub const PAPER_URL: &str = "https://arxiv.org/abs/2404.16792";
/// The formula, in ASCII.
pub const FORMULA: &str = "theta2 = theta1 + alpha * (theta1 - theta0)";

impl Provenance {
    /// Serializes the record as pretty JSON with a trailing newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("provenance always serializes");
        v.push(b'\n');
        v
    }

    /// The Hugging Face ids for the model card's `base_model`: θ0's Hub id, or, when θ0 is
    /// a local path, the ids θ1's own card lists as its `base_model` (θ1 was trained from
    /// θ0, so that is where θ0 came from); then θ1's Hub id. Local paths never appear
    /// there (the Hub would read `/abs/path` as an invalid id and `org/name` as an unrelated
    /// repo); the card's body and `expo.json` name them.
    pub fn base_models(&self, theta1_card: &CardMetadata) -> Vec<String> {
        base_model_ids(&self.sft, &self.aligned, theta1_card)
    }

    /// The model card: YAML front matter for the Hub (`base_model` ids, θ1's card metadata
    /// that still applies), then how the model was made.
    pub fn model_card(&self, theta1_card: &CardMetadata) -> String {
        let mut card = String::new();
        card.push_str("---\n");
        let ids = self.base_models(theta1_card);
        if !ids.is_empty() {
            card.push_str("base_model:\n");
            for id in &ids {
                card.push_str(&format!("- {}\n", serde_json::Value::String(id.clone())));
            }
        }
        // A merge lists what was merged; with fewer than two known ids the Hub infers.
        if ids.len() >= 2 {
            card.push_str("base_model_relation: merge\n");
        }
        card.push_str(&theta1_card.yaml());
        card.push_str("tags:\n- expo\n- model-extrapolation\n---\n\n");
        card.push_str("# Model extrapolation (ExPO)\n\n");
        card.push_str(
            "This model was made without training, by extrapolating from a supervised \
             fine-tuned checkpoint θ0 through an aligned (DPO/RLHF) checkpoint θ1:\n\n",
        );
        card.push_str(&format!(
            "    θ2 = θ1 + α·(θ1 − θ0),   α = {}\n\n",
            self.alpha
        ));
        if !self.rules.is_empty() {
            card.push_str("Per-module α (the first matching rule sets a tensor's α):\n\n");
            for r in &self.rules {
                card.push_str(&format!(
                    "- `{}`: α = {} for {} tensor{}\n",
                    r.rule,
                    r.alpha,
                    r.tensors,
                    if r.tensors == 1 { "" } else { "s" }
                ));
            }
            card.push('\n');
        }
        card.push_str("| | checkpoint |\n|---|---|\n");
        card.push_str(&format!("| θ0 (SFT) | {} |\n", self.sft.describe()));
        card.push_str(&format!(
            "| θ1 (aligned) | {} |\n\n",
            self.aligned.describe()
        ));
        card.push_str(&format!(
            "{} of {} tensors were extrapolated: each element computed in float64 \
             (subtract, multiply, add) and rounded once to the output dtype, to nearest even. \
             {} tensors were copied unchanged from θ1{}. The configuration, tokenizer and \
             generation settings are θ1's{}.\n\n",
            self.tensors.extrapolated,
            self.tensors.total,
            self.tensors.copied,
            if self.tensors.cast > 0 {
                format!(" and {} converted to another dtype", self.tensors.cast)
            } else {
                String::new()
            },
            if self.dtype == "auto" {
                ""
            } else {
                " (where config.json names a dtype, it names the output's)"
            }
        ));
        card.push_str("Made with expo ");
        card.push_str(self.version);
        card.push_str(":\n\n```sh\n");
        card.push_str(&shell_join(&self.command));
        card.push_str("\n```\n\n");
        card.push_str(&format!(
            "Method: Zheng et al., *Model Extrapolation Expedites Alignment* ({}). \
             `expo.json` records the exact inputs and settings.\n",
            self.paper
        ));
        card
    }
}

/// Quotes arguments for bash (and any POSIX shell), leaving plain ones bare, so that the
/// line re-runs with the same arguments. Bare words hold only characters no shell
/// expands: letters, digits and `-_./:@%+=,` (no `{}`: `{a,b}` is brace expansion; no `~`,
/// `*`, `?`, `[`, `!`, `$`, `#`, quotes or spaces). Everything else is single-quoted, where
/// bash expands nothing (`!` included, also with history expansion on); a `'` is written
/// `'\''`. An `=` in the first word would make it an assignment, so that word is quoted.
pub fn shell_join(args: &[String]) -> String {
    args.iter()
        .enumerate()
        .map(|(i, a)| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c))
                && !(i == 0 && a.contains('='));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        let args = ["expo", "--alpha", "0.3", "--output", "my dir", "it's"].map(String::from);
        assert_eq!(
            shell_join(&args),
            r"expo --alpha 0.3 --output 'my dir' 'it'\''s'"
        );
    }

    fn side(copy: &[&str]) -> SideFiles {
        SideFiles {
            copy: copy.iter().map(PathBuf::from).collect(),
            ..SideFiles::default()
        }
    }

    #[test]
    fn output_name_collisions() {
        let ok = side(&["config.json", "tokenizer/vocab.txt"]);
        ok.check_output_names(["model-00001-of-00002.safetensors", "weights/b.safetensors"])
            .unwrap();
        let msg = |r: Result<(), SideFileError>| r.unwrap_err().to_string();
        assert_eq!(
            msg(side(&[]).check_output_names(["readme.MD"])),
            "the model card expo writes and θ1's weight file readme.MD would both be written \
             to readme.MD in the output; rename the file in --aligned (and its entry in the index)"
        );
        assert!(msg(side(&[]).check_output_names(["expo.json"])).contains("provenance"));
        assert!(msg(side(&["a.json"]).check_output_names(["a.json"])).contains("a.json"));
        // A file where the output needs a directory.
        let m = msg(side(&["weights"]).check_output_names(["weights/a.safetensors"]));
        assert!(
            m.starts_with("θ1's side file weights and the directory of θ1's weight file weights/a.safetensors"),
            "{m}"
        );
        // Side files are compared exactly (a case-sensitive file system holds both).
        side(&["Vocab.txt", "vocab.txt"])
            .check_output_names(["model.safetensors"])
            .unwrap();
    }

    fn record(given: &str, hub_id: Option<&str>) -> InputRecord {
        InputRecord {
            given: given.into(),
            path: given.into(),
            files: Vec::new(),
            tensors: 0,
            bytes: 0,
            hub_id: hub_id.map(String::from),
            revision: None,
            commit: None,
        }
    }

    #[test]
    fn base_model_holds_hub_ids_only() {
        let card = CardMetadata {
            base_models: vec!["org/sft".into(), "org/older".into()],
            ..CardMetadata::default()
        };
        let none = CardMetadata::default();
        let local_sft = record("/data/sft", None);
        let local_dpo = record("dpo", None);
        let hub_sft = record("org/sft", Some("org/sft"));
        let hub_dpo = record("org/dpo", Some("org/dpo"));
        // θ0's Hub id wins over θ1's card; θ1's id last; duplicates once.
        assert_eq!(
            base_model_ids(&hub_sft, &hub_dpo, &card),
            ["org/sft", "org/dpo"]
        );
        assert_eq!(
            base_model_ids(&local_sft, &hub_dpo, &card),
            ["org/sft", "org/older", "org/dpo"]
        );
        assert_eq!(
            base_model_ids(&local_sft, &local_dpo, &card),
            ["org/sft", "org/older"]
        );
        assert_eq!(base_model_ids(&hub_sft, &local_dpo, &none), ["org/sft"]);
        assert!(base_model_ids(&local_sft, &local_dpo, &none).is_empty());
    }

    /// What bash makes of a line: its words, through `printf '%s\0'`.
    fn bash_words(line: &str, flags: &[&str]) -> Vec<String> {
        let script = format!("printf '%s\\0' {line}");
        let out = std::process::Command::new("bash")
            .args(flags)
            .arg("-c")
            .arg(&script)
            .env("HOME", "/home/expo-test")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("running bash");
        assert!(out.status.success(), "bash failed on {script}");
        let text = String::from_utf8(out.stdout).expect("UTF-8");
        text.split_terminator('\0').map(String::from).collect()
    }

    #[test]
    fn shell_join_re_runs_in_bash() {
        let args: Vec<String> = [
            "--output",
            "runs/{a,b}",
            "{0.1,0.2}",
            "a,b",
            "*",
            "src/*.rs",
            "~",
            "~/x",
            "a=~/x",
            "!",
            "!!",
            "a!b",
            "$HOME",
            "`id`",
            "$(id)",
            "it's",
            "'",
            "",
            "#not-a-comment",
            "a b",
            "tab\there",
            "new\nline",
            "\"q\"",
            "back\\slash",
            ";",
            "&",
            "|",
            "<x>",
            "(x)",
            "?",
            "[ab]",
            "--alpha-for",
            "self_attn=x0.5",
            "^(embed|lm_head)$",
            "é ü",
            "-0.5",
            "%1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let line = shell_join(&args);
        assert_eq!(bash_words(&line, &[]), args, "{line}");
        // Also with history expansion on, as in an interactive shell.
        assert_eq!(bash_words(&line, &["-H"]), args, "{line}");
        // An `=` in the first word is quoted: it would otherwise be an assignment.
        assert!(shell_join(&["A=b".to_string()]).starts_with('\''));
    }
}
