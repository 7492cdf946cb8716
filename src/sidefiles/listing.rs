//! Listing and opening θ1's side files: which files are copied, each opened and checked
//! when the inputs are validated; θ1's model card read; `config.json` prepared for
//! `--dtype`; the output's file names checked for collisions.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::{card, config_dtype, io_err, CardMetadata, SideFileError};
use super::{CONFIG_NAME, MODEL_CARD_NAME, PROVENANCE_NAME};
use crate::checkpoint::{Checkpoint, FOREIGN_WEIGHT_EXTENSIONS};
use crate::dtype::FloatDtype;
use crate::plan::DtypeChoice;
use crate::sys::FileVersion;

/// Deepest directory nesting followed when copying.
const MAX_DEPTH: usize = 16;
/// Side files whose handle is kept open from validation to copy; beyond that (a directory
/// of thousands of files must not exhaust the open-files limit) a file is reopened for the
/// copy and must still be the very file that was checked (device, inode, size, mtime).
const MAX_HELD: usize = 64;
/// A `config.json` larger than this is copied without its dtype updated.
const MAX_CONFIG_EDIT: u64 = 16 << 20;

/// Identity, size and modification time of a file, as checked at validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    pub(super) version: FileVersion,
    pub(super) len: u64,
}

impl Stamp {
    pub(super) fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            version: FileVersion::of(meta),
            len: meta.len(),
        }
    }

    /// How `now` differs from `self`, for [`SideFileError::Changed`].
    pub(super) fn change(&self, now: &Stamp) -> Option<&'static str> {
        if now.version.id != self.version.id {
            Some("was replaced by another file")
        } else if now.len != self.len {
            Some("changed size")
        } else if now.version != self.version {
            Some("was modified")
        } else {
            None
        }
    }
}

/// One side file, opened and checked at validation.
#[derive(Debug)]
pub(super) struct Opened {
    pub(super) full: PathBuf,
    /// The handle opened at validation (`None` past [`MAX_HELD`]: reopened and checked).
    pub(super) file: Option<File>,
    pub(super) stamp: Stamp,
    /// The bytes to write instead of the file's (config.json with `--dtype`).
    pub(super) edited: Option<Vec<u8>>,
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
    pub(super) notes: Vec<String>,
    /// Parallel to `copy`.
    pub(super) opened: Vec<Opened>,
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
pub(super) fn open_regular(path: &Path) -> Result<(File, fs::Metadata), SideFileError> {
    let file = crate::sys::open_nonblocking(path).map_err(io_err(path, "open"))?;
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
    for (file_name, is_link) in sorted_entries(&root.join(rel))? {
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
        if is_side_file(&name, &rel_path, depth == 0, used, out) {
            out.open_file(full, rel_path, &meta)?;
        }
    }
    Ok(())
}

/// The entries of `dir` (name, and whether it is a symbolic link), sorted by name.
fn sorted_entries(dir: &Path) -> Result<Vec<(OsString, bool)>, SideFileError> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir, "read directory"))? {
        let entry = entry.map_err(io_err(dir, "read directory"))?;
        let is_link = entry
            .file_type()
            .map_err(io_err(&entry.path(), "stat"))?
            .is_symlink();
        entries.push((entry.file_name(), is_link));
    }
    entries.sort();
    Ok(entries)
}

/// True when the file `name` at `rel_path` (`top`: in θ1's directory itself) is a side
/// file to copy: not a weight file expo read, not θ1's README.md or `expo.json`, not
/// weights of another format. Safetensors weights that are not part of the checkpoint
/// are listed in `out.skipped_weights`.
fn is_side_file(
    name: &str,
    rel_path: &Path,
    top: bool,
    used: &[String],
    out: &mut SideFiles,
) -> bool {
    let rel_str = rel_path.to_string_lossy();
    if used.iter().any(|u| *u == rel_str) {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    if top && (lower == "readme.md" || name == PROVENANCE_NAME) {
        return false;
    }
    let ext = Path::new(&lower)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("");
    if lower.ends_with(".safetensors") || crate::checkpoint::is_index_name(&lower) {
        out.skipped_weights.push(rel_path.to_path_buf());
        return false;
    }
    !(FOREIGN_WEIGHT_EXTENSIONS.contains(&ext) || lower.ends_with(".bin.index.json"))
}

impl SideFiles {
    /// Opens the side file at `full` (`rel_path` in θ1's directory; `meta` from `stat`)
    /// and records it to copy: its handle (up to [`MAX_HELD`] of them) and its stamp.
    fn open_file(
        &mut self,
        full: PathBuf,
        rel_path: PathBuf,
        meta: &fs::Metadata,
    ) -> Result<(), SideFileError> {
        // Refused before opening when already known to be special (opening some devices
        // has effects), and checked again after opening (it may have been swapped).
        if !meta.is_file() {
            return Err(SideFileError::NotRegular {
                path: full,
                kind: kind_of(meta.file_type()),
            });
        }
        let (file, meta) = open_regular(&full)?;
        let held = self.opened.len() < MAX_HELD;
        self.opened.push(Opened {
            full,
            file: held.then_some(file),
            stamp: Stamp::of(&meta),
            edited: None,
        });
        self.copy.push(rel_path);
        Ok(())
    }
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
                "not reading θ1's model card: {:#}; its license and other metadata are not carried over",
                anyhow::Error::new(e)
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
    pub fn check_plan(&self, plan: &crate::plan::OutputPlan) -> Result<(), SideFileError> {
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
}

/// Copy buffer.
const CHUNK: usize = 1 << 20;

/// Reopens a side file whose handle was not kept, checking it is the file validated.
pub(super) fn reopen(opened: &Opened) -> Result<File, SideFileError> {
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
pub(super) fn read_validated(opened: &Opened) -> Result<Vec<u8>, SideFileError> {
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
pub(super) fn copy_range(
    file: &File,
    opened: &Opened,
    out: &mut impl std::io::Write,
    dst: &Path,
) -> Result<(), SideFileError> {
    let len = opened.stamp.len;
    let mut buf = vec![0u8; usize::try_from(len).map_or(CHUNK, |l| l.min(CHUNK)).max(1)];
    let mut off = 0u64;
    while off < len {
        crate::interrupt::check()?;
        let want = usize::try_from(len - off).map_or(buf.len(), |r| r.min(buf.len()));
        let n = match std::os::unix::fs::FileExt::read_at(file, &mut buf[..want], off) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
