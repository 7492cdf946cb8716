//! A search's settings: [`Config`], and the small parsers and checks that build it from the
//! command line's values.

use std::path::PathBuf;
use std::time::Duration;

use super::evaluator::{ScoreSpec, Template};
use super::rule::{self, Lat, Settings};
use crate::error::UsageError;
use crate::pairing::DtypeChoice;
use crate::plan::AlphaRule;

/// Everything a search needs, checked.
#[derive(Debug)]
pub struct Config {
    pub sft: PathBuf,
    pub aligned: PathBuf,
    pub skip: Vec<AlphaRule>,
    pub alpha_for: Vec<AlphaRule>,
    pub dtype: DtypeChoice,
    pub max_shard_size: Option<u64>,
    pub threads: Option<u16>,
    pub settings: Settings,
    /// The first batch as given (without the baseline), for the ledger.
    pub first_batch: Vec<Lat>,
    pub baseline: bool,
    pub minimize: bool,
    pub eval: Template,
    pub score: ScoreSpec,
    pub jobs: usize,
    pub timeout: Option<Duration>,
    pub kill_after: Duration,
    /// `--slurm 'SBATCH OPTIONS'`: each trial is a Slurm job.
    pub slurm: Option<String>,
    /// `--queue-timeout`: the longest a Slurm job may wait in the queue.
    pub queue_timeout: Option<Duration>,
    /// Candidate template, holding `{alpha}`.
    pub output: PathBuf,
    /// How many candidates stay on disk (`None`: all).
    pub keep: Option<usize>,
    pub run: PathBuf,
    pub resume: bool,
    pub json: bool,
    pub dry_run: bool,
    /// The command line, recorded in each candidate's provenance.
    pub command: Vec<String>,
}

/// `path` made absolute and resolved: its longest existing ancestor with links resolved
/// (`canonicalize`), the rest appended with `.` dropped and `..` applied. `--run` and
/// `--output` are resolved once, so that a search records, compares on resume and deletes
/// the same directories whatever the working directory and spelling (`./run` is `run`).
pub fn resolve_path(path: &std::path::Path) -> std::io::Result<PathBuf> {
    use std::path::Component;
    let abs = std::path::absolute(path)?;
    let comps: Vec<Component> = abs.components().collect();
    let mut base = PathBuf::from("/");
    let mut rest = 0;
    for i in (1..=comps.len()).rev() {
        let prefix: PathBuf = comps[..i].iter().collect();
        if let Ok(c) = prefix.canonicalize() {
            base = c;
            rest = i;
            break;
        }
    }
    for c in &comps[rest..] {
        match c {
            Component::ParentDir => {
                base.pop();
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            Component::Normal(n) => base.push(n),
        }
    }
    Ok(base)
}

/// Parses a duration: `90`, `90s`, `5m`, `1.5h`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 && v * mult < 1e9 => {
            Ok(Duration::from_secs_f64(v * mult))
        }
        _ => Err(format!("`{s}` is not a duration (e.g. 90s, 30m, 2h)")),
    }
}

/// `--keep K|all`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Keep(pub Option<usize>);

/// Parses `--keep N|all` (how many candidates stay on disk).
pub fn parse_keep(s: &str) -> Result<Keep, String> {
    if s.trim().eq_ignore_ascii_case("all") {
        return Ok(Keep(None));
    }
    match s.trim().parse::<usize>() {
        Ok(k) => Ok(Keep(Some(k))),
        _ => Err(format!("`{s}` is not a count (e.g. 1) or `all`")),
    }
}

/// `--resolution auto|X`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolution(pub Option<f64>);

/// Parses `--resolution auto|X`: `auto`, or a positive lattice step.
pub fn parse_resolution(s: &str) -> Result<Resolution, String> {
    if s.trim().eq_ignore_ascii_case("auto") {
        return Ok(Resolution(None));
    }
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && Lat::from_f64(v).is_some_and(|l| l.0 > 0) => Ok(Resolution(Some(v))),
        _ => Err(format!(
            "`{s}` is not `auto` or a positive step with at most 12 decimals (e.g. 0.05)"
        )),
    }
}

/// `--bounds MIN:MAX`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds(pub f64, pub f64);

/// Parses `--bounds MIN:MAX`: two numbers on the search's decimal lattice, within the range
/// a search handles, MIN below MAX.
pub fn parse_bounds(s: &str) -> Result<Bounds, String> {
    let bad = || format!("`{s}` is not MIN:MAX, two numbers (e.g. 0:4)");
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    let a: f64 = a.trim().parse().map_err(|_| bad())?;
    let b: f64 = b.trim().parse().map_err(|_| bad())?;
    for v in [a, b] {
        if Lat::from_f64(v).is_some() {
            continue;
        }
        return Err(if !v.is_finite() || v.abs() > rule::MAX_ABS_ALPHA as f64 {
            format!(
                "`{s}`: {v} is out of range; a search handles |α| ≤ {}",
                rule::MAX_ABS_ALPHA
            )
        } else {
            format!("`{s}`: {v} is finer than a search's step; give at most 12 decimals")
        });
    }
    if a >= b {
        return Err(format!("`{s}`: MIN must be below MAX (e.g. 0:4)"));
    }
    Ok(Bounds(a, b))
}

/// `--timeout DUR`: a duration longer than zero (no `--timeout` means none).
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!(
            "`{s}`: a timeout must be longer than 0 (leave --timeout out for none)"
        ));
    }
    Ok(d)
}

/// Builds the rule's settings from the command line's values.
#[allow(clippy::too_many_arguments)]
pub fn settings(
    alphas: &[f64],
    baseline: bool,
    bounds: Option<Bounds>,
    resolution: Resolution,
    tie: f64,
    max_evals: usize,
    retries: usize,
    max_failures: usize,
) -> Result<(Settings, Vec<Lat>), UsageError> {
    let mut batch = Vec::new();
    for &a in alphas {
        let l = Lat::from_f64(a).ok_or_else(|| {
            UsageError(format!(
                "--alpha {a}: a search handles α with at most 12 decimals and |α| ≤ {}",
                rule::MAX_ABS_ALPHA
            ))
        })?;
        if !batch.contains(&l) {
            batch.push(l);
        }
    }
    let mut first = Vec::new();
    if baseline {
        first.push(Lat(0));
    }
    first.extend(batch.iter().copied().filter(|l| !(baseline && l.0 == 0)));
    let lo = first.iter().copied().min().unwrap_or(Lat(0));
    let hi = first.iter().copied().max().unwrap_or(Lat(0));
    let (lower, upper) = match bounds {
        Some(Bounds(a, b)) => (
            Lat::from_f64(a).unwrap_or(lo),
            Lat::from_f64(b).unwrap_or(hi),
        ),
        None => {
            let upper = if hi.0 > 0 {
                Lat(hi
                    .0
                    .saturating_mul(8)
                    .min(rule::MAX_ABS_ALPHA * rule::UNITS))
            } else {
                hi
            };
            (lo.min(Lat(0)), upper)
        }
    };
    if let Some(out) = first.iter().find(|a| **a < lower || **a > upper) {
        return Err(UsageError(format!(
            "--alpha {out} lies outside --bounds {lower}:{upper}; widen the bounds or change the first batch"
        )));
    }
    if lower >= upper {
        return Err(UsageError(format!(
            "the search range {lower}:{upper} is empty; give --bounds MIN:MAX"
        )));
    }
    Ok((
        Settings {
            first,
            lower,
            upper,
            resolution: resolution.0.and_then(Lat::from_f64).map(|l| l.0),
            tie,
            max_evals,
            retries,
            max_failures,
        },
        batch,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn default_settings() {
        let (s, batch) = settings(
            &[0.1, 0.2, 0.3, 0.4, 0.5],
            true,
            None,
            Resolution(None),
            0.0,
            20,
            1,
            3,
        )
        .unwrap();
        assert_eq!(batch.len(), 5);
        assert_eq!(s.first[0], Lat(0));
        assert_eq!(s.lower, Lat(0));
        assert_eq!(s.upper.to_f64(), 4.0);
        assert!(settings(
            &[0.3],
            true,
            Some(Bounds(0.5, 1.0)),
            Resolution(None),
            0.0,
            20,
            1,
            3
        )
        .is_err());
        assert!(parse_bounds("1:0").is_err());
        assert_eq!(parse_keep("all").unwrap(), Keep(None));
        assert_eq!(parse_resolution("0.05").unwrap(), Resolution(Some(0.05)));
        assert!(parse_resolution("0").is_err());
    }
}
