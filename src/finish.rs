//! The steps every build shares around the writer, whatever the kind of `--aligned`: the
//! output template check, stale staging cleaned, staging directories made, each output
//! finished (side files, index, model card, provenance) and committed atomically. Used by
//! [`crate::build`] for checkpoints and by [`crate::adapter`] for adapters.

use std::path::Path;

use anyhow::{Context, Result};

use crate::alpha;
use crate::error::UsageError;
use crate::interrupt;
use crate::output::{self, OutputTarget, StagingDir};
use crate::plan::ShardPlan;
use crate::reporter::Reporter;
use crate::settings::Settings;
use crate::sidefiles;

/// Several α need `{alpha}` in `--output` to name each output.
pub fn check_output_template(settings: &Settings) -> Result<()> {
    let n = settings.alphas.len();
    if n > 1 && !alpha::has_placeholder(&settings.output) {
        return Err(UsageError(format!(
            "--alpha gives {n} values, so --output must contain {} to name each output, e.g. --output '{}-{}'",
            alpha::PLACEHOLDER,
            settings.output.display(),
            alpha::PLACEHOLDER
        ))
        .into());
    }
    Ok(())
}

/// Tidies what killed runs left beside each output, saying what was found.
pub fn clean_stale_staging(targets: &[&OutputTarget], reporter: &dyn Reporter) {
    for t in targets {
        for w in output::clean_stale_staging(&t.parent).warnings() {
            reporter.warn(w);
        }
    }
}

/// One staging directory per output, with the subdirectories its shards (the same layout
/// for every output) need.
pub fn create_stagings(targets: &[&OutputTarget], shards: &[ShardPlan]) -> Result<Vec<StagingDir>> {
    let stagings = targets
        .iter()
        .map(|t| StagingDir::create(t))
        .collect::<Result<Vec<_>, _>>()?;
    // An index may place shards in a subdirectory (`weights/model-00001-of-00002.safetensors`,
    // accepted on input); the mirrored output needs the same subdirectory.
    for s in &stagings {
        for shard in shards {
            if let Some(sub) = Path::new(&shard.file_name)
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
            {
                let dir = s.path().join(sub);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
        }
    }
    Ok(stagings)
}

/// What every output gets besides its tensor data.
pub struct Finish<'a> {
    /// The index file's name and bytes, when one is written.
    pub index: Option<&'a (String, Vec<u8>)>,
    /// The model card (README.md).
    pub card: String,
    /// `expo.json`.
    pub provenance: Vec<u8>,
}

/// Writes an output's side files (`side` copies them into the directory it is given), its
/// index, model card and provenance into `staging`.
pub fn write_finish(
    staging: &StagingDir,
    side: impl FnOnce(&Path) -> Result<(), sidefiles::SideFileError>,
    files: &Finish,
) -> Result<()> {
    side(staging.path())?;
    if let Some((name, bytes)) = files.index {
        sidefiles::write_file(staging.path(), name, bytes)?;
    }
    sidefiles::write_file(
        staging.path(),
        sidefiles::MODEL_CARD_NAME,
        files.card.as_bytes(),
    )?;
    sidefiles::write_file(
        staging.path(),
        sidefiles::PROVENANCE_NAME,
        &files.provenance,
    )?;
    Ok(())
}

/// Puts a finished output in place (unless interrupted first). Once committed, the new
/// output is in place: what is left to tidy is only a warning.
pub fn commit(staging: StagingDir, target: &OutputTarget, reporter: &dyn Reporter) -> Result<()> {
    interrupt::check()?;
    for w in staging.commit(target)?.warnings() {
        reporter.warn(w);
    }
    Ok(())
}

/// A run's outputs as one result: `Ok` when every output was written; the one error of a
/// single output; or one error listing every failed output of several (the others were
/// committed).
pub fn outcome(results: Vec<Result<()>>, outputs: usize) -> Result<()> {
    let written = results.iter().filter(|r| r.is_ok()).count();
    let mut failures: Vec<anyhow::Error> = results.into_iter().filter_map(Result::err).collect();
    match failures.len() {
        0 => Ok(()),
        1 if outputs == 1 => Err(failures.remove(0)),
        n => {
            let mut msg = format!("{n} of {outputs} outputs failed");
            for e in &failures {
                msg.push_str(&format!("\n  {e:#}"));
            }
            if written > 0 {
                msg.push_str("\n  (the other outputs were written completely)");
            }
            Err(anyhow::anyhow!(msg))
        }
    }
}
