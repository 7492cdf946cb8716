//! `expo search --dry-run`: the space a search may need and its first evaluator commands.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::evaluator::Values;
use super::rule::{self, Lat};
use super::{alpha_path, Config, Observer};

/// What `expo search --dry-run` found.
pub struct DryRun {
    /// The size of one candidate.
    pub candidate_bytes: u64,
    /// The space the search may need.
    pub need: u64,
    /// The space free where the candidates go.
    pub free: u64,
    /// The existing directory the candidates go in.
    pub out_parent: PathBuf,
    pub jobs: usize,
    /// `--keep` (`None`: all).
    pub keep: Option<usize>,
    pub run: PathBuf,
    /// The existing directory the run directory goes in.
    pub run_parent: PathBuf,
    /// The first batch: trial number, α and the evaluator's command line.
    pub commands: Vec<(usize, Lat, String)>,
}

pub(super) fn dry_run(
    cfg: &Config,
    candidate_bytes: u64,
    aligned: &Path,
    observer: &dyn Observer,
) -> Result<std::process::ExitCode> {
    // The run directory: an existing directory, or one whose parent exists.
    let run_parent = existing_ancestor(&cfg.run);
    if cfg.run.exists() && !cfg.run.is_dir() {
        anyhow::bail!("--run {} exists and is not a directory", cfg.run.display());
    }
    let probe = alpha_path(&cfg.output, Lat(rule::UNITS));
    let out_parent = existing_ancestor(&probe);
    let need = candidate_bytes
        .saturating_mul((cfg.jobs + cfg.keep.unwrap_or(cfg.settings.max_evals)) as u64);
    let free = free_bytes(&out_parent)
        .with_context(|| format!("checking free space in {}", out_parent.display()))?;
    let plan = DryRun {
        candidate_bytes,
        need,
        free,
        out_parent: out_parent.clone(),
        jobs: cfg.jobs,
        keep: cfg.keep,
        run: cfg.run.clone(),
        run_parent,
        commands: first_commands(cfg, aligned),
    };
    observer.dry_run(&plan)?;
    if free < need {
        anyhow::bail!(
            "{} has {} free but the search may need {} ({} jobs + {} kept candidates of {}); free space, lower --jobs/--keep, or put candidates elsewhere with --output",
            out_parent.display(),
            crate::text::bytes(free),
            crate::text::bytes(need),
            cfg.jobs,
            cfg.keep.map_or("all".into(), |k| k.to_string()),
            crate::text::bytes(candidate_bytes)
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The evaluator commands of the first batch: trial number, α, command line.
fn first_commands(cfg: &Config, aligned: &Path) -> Vec<(usize, Lat, String)> {
    let mut commands = Vec::new();
    for (k, &a) in cfg.settings.first.iter().enumerate() {
        let output = if a.0 == 0 {
            aligned.to_path_buf()
        } else {
            alpha_path(&cfg.output, a)
        };
        let v = Values {
            alpha: a.to_string(),
            output,
            workdir: cfg.run.join("trials").join((k + 1).to_string()),
            slot: k % cfg.jobs,
            trial: k as u64 + 1,
        };
        let c = cfg.eval.command(&v);
        commands.push((k + 1, a, c.to_string_lossy().into_owned()));
    }
    commands
}

fn existing_ancestor(p: &Path) -> PathBuf {
    let mut cur = if p.is_absolute() {
        p.to_path_buf()
    } else {
        Path::new(".").join(p)
    };
    while !cur.exists() {
        if !cur.pop() {
            return PathBuf::from(".");
        }
    }
    cur
}

/// Free bytes for an unprivileged user on the file system holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs is plain old data, for which all-zero bytes are a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `st` is a valid,
    // writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}
