//! Files beside the weights: θ1's configuration and tokenizer files copied byte for byte,
//! and the model card and provenance record expo writes itself.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::checkpoint::{Checkpoint, FOREIGN_WEIGHT_EXTENSIONS};
use crate::hub::ResolvedInput;

/// Name of the provenance record written into the output.
pub const PROVENANCE_NAME: &str = "expo.json";
/// Name of the model card written into the output.
pub const MODEL_CARD_NAME: &str = "README.md";
/// Deepest directory nesting followed when copying (guards against symlink loops).
const MAX_DEPTH: usize = 16;

/// The side files of θ1 to copy, and what was left out on purpose.
#[derive(Debug, Clone, Default)]
pub struct SideFiles {
    /// Paths relative to θ1's directory, in sorted order.
    pub copy: Vec<PathBuf>,
    /// Weight files that are not part of the checkpoint expo read (e.g. a
    /// `consolidated.safetensors` beside the sharded weights): not copied, since they would
    /// hold θ1's unextrapolated values.
    pub skipped_weights: Vec<PathBuf>,
}

/// Errors while copying side files.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {op} failed: {source}")]
pub struct SideFileError {
    pub path: PathBuf,
    pub op: &'static str,
    pub source: io::Error,
}

fn err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> SideFileError + 'a {
    move |source| SideFileError {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Lists the files of θ1's directory to copy: everything except hidden entries, weights
/// (safetensors and other formats), θ1's README.md and an earlier `expo.json`.
pub fn list_side_files(aligned: &Checkpoint) -> Result<SideFiles, SideFileError> {
    let mut out = SideFiles::default();
    if !aligned.is_dir {
        return Ok(out);
    }
    let used = aligned.weight_file_names();
    walk(&aligned.root, Path::new(""), 0, &used, &mut out)?;
    out.copy.sort();
    out.skipped_weights.sort();
    Ok(out)
}

fn walk(
    root: &Path,
    rel: &Path,
    depth: usize,
    used: &[String],
    out: &mut SideFiles,
) -> Result<(), SideFileError> {
    let dir = root.join(rel);
    for entry in fs::read_dir(&dir).map_err(err(&dir, "read directory"))? {
        let entry = entry.map_err(err(&dir, "read directory"))?;
        let file_name = entry.file_name();
        // The lossy form is only compared with ASCII names; paths keep the real bytes.
        let name = file_name.to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let rel_path = rel.join(&file_name);
        let full = root.join(&rel_path);
        // Follow symlinked files (the Hugging Face cache links every file into blobs/), but
        // never a symlinked directory: it could loop, or pull in a whole other tree.
        let is_link = entry.file_type().map(|t| t.is_symlink()).unwrap_or(false);
        let Ok(meta) = fs::metadata(&full) else {
            continue; // a dangling link: nothing to copy
        };
        if meta.is_dir() {
            if !is_link && depth + 1 < MAX_DEPTH {
                walk(root, &rel_path, depth + 1, used, out)?;
            }
            continue;
        }
        if !meta.is_file() {
            continue; // a FIFO, socket or device: reading it could block or never end
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
        if lower.ends_with(".safetensors") || lower.ends_with(".safetensors.index.json") {
            out.skipped_weights.push(rel_path);
            continue;
        }
        if FOREIGN_WEIGHT_EXTENSIONS.contains(&ext) || lower.ends_with(".bin.index.json") {
            continue;
        }
        out.copy.push(rel_path);
    }
    Ok(())
}

/// Copies the listed files from `src_root` into `dest`, creating subdirectories, and
/// fsyncs each file. New files get the usual permissions (0666 less the umask).
pub fn copy_side_files(
    src_root: &Path,
    files: &[PathBuf],
    dest: &Path,
) -> Result<u64, SideFileError> {
    let mut bytes = 0;
    for rel in files {
        if crate::interrupt::check().is_err() {
            return Err(SideFileError {
                path: src_root.join(rel),
                op: "copy",
                source: io::Error::new(io::ErrorKind::Interrupted, "interrupted"),
            });
        }
        let src = src_root.join(rel);
        let dst = dest.join(rel);
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(err(parent, "create directory"))?;
        }
        let mut input = File::open(&src).map_err(err(&src, "open"))?;
        let mut output = File::create(&dst).map_err(err(&dst, "create"))?;
        bytes += io::copy(&mut input, &mut output).map_err(err(&dst, "copy"))?;
        output.sync_all().map_err(err(&dst, "fsync"))?;
    }
    Ok(bytes)
}

/// Writes `contents` to `dest/name` and fsyncs it.
pub fn write_file(dest: &Path, name: &str, contents: &[u8]) -> Result<(), SideFileError> {
    use std::io::Write;
    let path = dest.join(name);
    let mut f = File::create(&path).map_err(err(&path, "create"))?;
    f.write_all(contents).map_err(err(&path, "write"))?;
    f.sync_all().map_err(err(&path, "fsync"))
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

    /// The name for the model card's `base_model`: the Hub id when known (what the Hub
    /// expects there), else the path as given.
    pub fn base_model(&self) -> &str {
        self.hub_id.as_deref().unwrap_or(&self.given)
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

    /// The model card: YAML front matter for the Hub, then how the model was made.
    pub fn model_card(&self, license: Option<&str>) -> String {
        let q = |s: &str| serde_json::to_string(s).expect("strings always serialize");
        let mut card = String::new();
        card.push_str("---\nbase_model:\n");
        card.push_str(&format!(
            "- {}\n- {}\n",
            q(self.sft.base_model()),
            q(self.aligned.base_model())
        ));
        card.push_str("base_model_relation: merge\n");
        if let Some(license) = license {
            card.push_str(&format!("license: {license}\n"));
        }
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
             generation settings are θ1's.\n\n",
            self.tensors.extrapolated,
            self.tensors.total,
            self.tensors.copied,
            if self.tensors.cast > 0 {
                format!(" and {} converted to another dtype", self.tensors.cast)
            } else {
                String::new()
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

/// Quotes arguments for a POSIX shell, leaving plain ones bare.
pub fn shell_join(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+{}".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `license:` of θ1's model card front matter, if it is a plain one-line value.
pub fn aligned_license(aligned: &Checkpoint) -> Option<String> {
    if !aligned.is_dir {
        return None;
    }
    // Only the front matter matters: read at most 1 MiB, and only from a regular file (a
    // FIFO would block forever).
    let file = crate::header::open_regular(&aligned.root.join("README.md")).ok()??;
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(file, 1 << 20), &mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let front = text.strip_prefix("---")?;
    let end = front.find("\n---")?;
    front[..end].lines().find_map(|line| {
        let value = line.strip_prefix("license:")?.trim();
        let plain = !value.is_empty()
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        plain.then(|| value.to_string())
    })
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
}
