//! `expo search`: find the best α by running the user's own evaluator.
//!
//! The loop: ask the [`rule`] what to evaluate next (one α per free evaluator slot), build
//! those candidates with the extrapolation engine in one pass, start the evaluator on each
//! in its own process group, and record every start and end in the [`ledger`]. A slot is
//! refilled as soon as it frees: there is no barrier between rounds.

pub mod evaluator;
pub mod ledger;
pub mod plot;
pub mod rule;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::build::{self, Settings as BuildSettings};
use crate::checkpoint::Checkpoint;
use crate::error::UsageError;
use crate::interrupt;
use crate::pairing::DtypeChoice;
use crate::plan::AlphaRule;
use crate::reporter::{Quiet, Reporter};

use evaluator::{Running, ScoreSpec, Template, Values};
use ledger::{End, Ledger, State, Trial};
use rule::{Decision, Lat, Outcome, Settings, Status};

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

// ---------------------------------------------------------------------------------------
// Evaluator process groups, so that a second Ctrl-C (which exits at once) kills them too.

const GROUP_SLOTS: usize = 256;
static GROUPS: [AtomicI32; GROUP_SLOTS] = [const { AtomicI32::new(0) }; GROUP_SLOTS];

pub(crate) fn register_group(pgid: i32) {
    interrupt::on_forced_exit("evaluator process groups", kill_all_groups);
    for g in &GROUPS {
        if g.compare_exchange(0, pgid, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
    }
}

pub(crate) fn unregister_group(pgid: i32) {
    for g in &GROUPS {
        let _ = g.compare_exchange(pgid, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// SIGKILLs every evaluator process group still running (the second interrupt).
pub fn kill_all_groups() {
    for g in &GROUPS {
        let pgid = g.swap(0, Ordering::AcqRel);
        evaluator::signal_group(pgid, libc::SIGKILL);
    }
}

// ---------------------------------------------------------------------------------------
// Small parsers for the command line.

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

pub fn parse_bounds(s: &str) -> Result<Bounds, String> {
    let bad = || format!("`{s}` is not MIN:MAX with MIN < MAX (e.g. 0:4)");
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    let a: f64 = a.trim().parse().map_err(|_| bad())?;
    let b: f64 = b.trim().parse().map_err(|_| bad())?;
    if Lat::from_f64(a).is_none() || Lat::from_f64(b).is_none() || a >= b {
        return Err(bad());
    }
    Ok(Bounds(a, b))
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

// ---------------------------------------------------------------------------------------
// The search.

/// A trial in flight.
/// What a search tells its caller as it goes; the command line prints it. Warnings and
/// the progress of candidate builds go through the [`Reporter`] it extends.
pub trait Observer: Reporter {
    /// `--dry-run`: what the search would do.
    fn dry_run(&self, plan: &DryRun) -> std::io::Result<()>;
    /// The search starts its live table of trials.
    fn table_header(&self) {}
    /// A trial ended (or was replayed from the ledger); `baseline` is the α = 0 score.
    fn trial_ended(&self, _trial: &Trial, _baseline: Option<f64>) {}
    /// The search is over with a verdict.
    fn finished(&self, verdict: &Verdict) -> std::io::Result<()>;
}

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

/// How a search ended.
pub struct Verdict {
    pub status: Status,
    /// The best α, its score, and where its candidate is, in words.
    pub best: Option<(Lat, f64, String)>,
    pub evaluations: usize,
    /// RUN/summary.json's content.
    pub summary: Value,
}

/// Warns about a verdict that needs the user's attention (flat, edge, no gain, budget).
pub fn status_warning(reporter: &dyn Reporter, status: Status, settings: &Settings) {
    match status {
        Status::Flat => reporter.warn(format!(
            "the scores around the best alpha are within --tie {} of it (flat): the evaluator cannot tell these α apart; a larger dev set or a less noisy score would",
            settings.tie
        )),
        Status::Edge => reporter.warn(format!(
            "the best alpha is at the edge of the search range {}:{}; widen it with --bounds",
            settings.lower, settings.upper
        )),
        Status::NoGain => reporter.warn(
            "no candidate scored better than the --aligned model itself (alpha = 0): extrapolation does not help this model on this evaluator".into(),
        ),
        Status::Budget => reporter.warn(format!(
            "stopped after --max-evals {} evaluations before the best alpha was bracketed; resume with a larger --max-evals",
            settings.max_evals
        )),
        _ => {}
    }
}

struct Active {
    trial: Trial,
    values: Values,
    proc: Running,
}

/// The trials of a batch, recorded as started, and the α whose candidates to build.
struct Planned {
    trials: Vec<Trial>,
    to_build: Vec<Lat>,
}

/// Where a trial's candidate is.
struct Candidate {
    output: PathBuf,
    /// Made by expo (not the `--aligned` model).
    created: bool,
    /// Still to build.
    build: bool,
}

struct Search<'a> {
    cfg: &'a Config,
    reporter: &'a dyn Observer,
    ledger: Ledger,
    trials: Vec<Trial>,
    /// Candidates expo built and has not deleted.
    created: BTreeSet<PathBuf>,
    aligned_path: PathBuf,
    next_trial: u64,
    started: Instant,
}

/// The checkpoints a search starts from, opened and paired.
struct Inputs {
    sft: Checkpoint,
    aligned: Checkpoint,
    /// Where `--aligned` resolved to (the candidate of α = 0).
    aligned_path: PathBuf,
    /// The `--skip` and `--alpha-for` rules, in that order.
    rules: Vec<AlphaRule>,
    /// The size of one candidate.
    candidate_bytes: u64,
}

/// What a search continues from: the ledger, opened and replayed.
struct Resumed {
    ledger: Ledger,
    /// The finished trials (interrupted ones run again).
    trials: Vec<Trial>,
    /// Candidates expo built and has not deleted.
    created: BTreeSet<PathBuf>,
    next_trial: u64,
}

/// Runs a search; the exit code when it completed.
pub fn run(cfg: &Config, reporter: &dyn Observer) -> Result<std::process::ExitCode> {
    let inputs = open_inputs(cfg)?;
    let header = header_event(cfg, &inputs);
    check_run_dir(cfg)?;
    if cfg.dry_run {
        return dry_run(cfg, inputs.candidate_bytes, &inputs.aligned_path, reporter);
    }
    let resumed = resume(cfg, &header, reporter)?;
    let mut search = Search {
        cfg,
        reporter,
        ledger: resumed.ledger,
        trials: resumed.trials,
        created: resumed.created,
        aligned_path: inputs.aligned_path.clone(),
        next_trial: resumed.next_trial,
        started: Instant::now(),
    };
    drop(inputs);
    search.go()
}

/// Opens `--sft` and `--aligned` and checks that they pair (as extrapolate checks them).
fn open_inputs(cfg: &Config) -> Result<Inputs> {
    let cache_env = crate::hub::CacheEnv::from_process();
    let (sft, _) = crate::hub::open_for("--sft checkpoint", &cfg.sft, &cache_env)?;
    let (aligned, aligned_in) =
        crate::hub::open_for("--aligned checkpoint", &cfg.aligned, &cache_env)?;
    let rules: Vec<AlphaRule> = cfg.skip.iter().chain(&cfg.alpha_for).cloned().collect();
    // An adapter as --aligned makes adapter candidates (checked as extrapolate checks them).
    let candidate_bytes = if crate::adapter::is_adapter_dir(&aligned_in.path) {
        crate::adapter::check_for_search(&cfg.sft, &cfg.aligned, &cfg.skip)?
    } else {
        let options = crate::plan::PlanOptions {
            alpha: cfg
                .settings
                .first
                .iter()
                .copied()
                .max()
                .unwrap_or(Lat(0))
                .to_f64(),
            dtype: cfg.dtype,
            max_shard_size: cfg.max_shard_size,
            rules: rules.clone(),
        };
        crate::plan::build_plan(&sft, &aligned, &options)
            .with_context(|| {
                format!(
                    "pairing --sft {} with --aligned {}",
                    cfg.sft.display(),
                    cfg.aligned.display()
                )
            })?
            .output_bytes()
    };
    Ok(Inputs {
        sft,
        aligned,
        aligned_path: aligned_in.path,
        rules,
        candidate_bytes,
    })
}

/// The ledger's header event: what a resumed search must not change.
fn header_event(cfg: &Config, inputs: &Inputs) -> Value {
    json!({
        "event": "header",
        "version": 1,
        "expo": env!("CARGO_PKG_VERSION"),
        "sft": {"path": cfg.sft, "fingerprint": ledger::fingerprint(&inputs.sft)},
        "aligned": {"path": cfg.aligned, "fingerprint": ledger::fingerprint(&inputs.aligned)},
        "rules": inputs.rules.iter().map(|r| r.spelling.clone()).collect::<Vec<_>>(),
        "dtype": cfg.dtype.name(),
        "max_shard_size": cfg.max_shard_size,
        "eval": cfg.eval.spelling,
        "score_json": cfg.score.pointer,
        "score_file": cfg.score.file.as_ref().map(|t| t.spelling.clone()),
        "minimize": cfg.minimize,
        "tie": cfg.settings.tie,
        "alpha": cfg.settings.first.iter().map(|a| a.to_f64()).collect::<Vec<_>>(),
        "resolution": cfg.settings.resolution.map(|r| Lat(r).to_f64()),
        "output": cfg.output,
        "jobs": cfg.jobs,
        "timeout": cfg.timeout.map(|t| t.as_secs_f64()),
        "max_evals": cfg.settings.max_evals,
        "bounds": [cfg.settings.lower.to_f64(), cfg.settings.upper.to_f64()],
    })
}

/// `--run` holds a search exactly when `--resume` is given.
fn check_run_dir(cfg: &Config) -> Result<()> {
    let ledger_path = cfg.run.join(ledger::NAME);
    let exists = ledger_path.exists();
    if exists && !cfg.resume {
        return Err(UsageError(format!(
            "{} already holds a search; add --resume to continue it, or choose another --run",
            cfg.run.display()
        ))
        .into());
    }
    if !exists && cfg.resume {
        return Err(UsageError(format!(
            "--resume: {} holds no search ({} is missing)",
            cfg.run.display(),
            ledger_path.display()
        ))
        .into());
    }
    Ok(())
}

/// Opens the ledger in `--run` (made if missing), checks a resumed search's header against
/// `header`, appends it, and replays what the ledger holds.
fn resume(cfg: &Config, header: &Value, reporter: &dyn Reporter) -> Result<Resumed> {
    std::fs::create_dir_all(&cfg.run)
        .with_context(|| format!("creating the run directory {}", cfg.run.display()))?;
    let mut ledger = Ledger::open(&cfg.run)?;
    let replay = ledger.replay()?;
    if replay.torn_tail {
        reporter.warn(format!(
            "{}: ignored its last line, cut short when expo was killed",
            ledger.path.display()
        ));
        // Start the next event on a line of its own.
        ledger.append_raw_newline()?;
    }
    if let Some(was) = &replay.header {
        ledger::check_header(&ledger.path, was, header).map_err(|e| UsageError(e.to_string()))?;
    }
    ledger.append(header)?;
    let mut created = BTreeSet::new();
    for t in &replay.trials {
        if t.created {
            created.insert(t.output.clone());
        }
    }
    for d in &replay.deleted {
        created.remove(d);
    }
    // Finished trials stay; started-but-unfinished and interrupted ones run again.
    let trials: Vec<Trial> = replay
        .trials
        .into_iter()
        .filter(|t| {
            t.end
                .as_ref()
                .is_some_and(|e| e.state != State::Interrupted)
        })
        .collect();
    let next_trial = trials.iter().map(|t| t.trial).max().unwrap_or(0) + 1;
    let next_trial = next_trial.max(
        ledger
            .replay()
            .map(|r| r.trials.iter().map(|t| t.trial).max().unwrap_or(0) + 1)
            .unwrap_or(1),
    );
    Ok(Resumed {
        ledger,
        trials,
        created,
        next_trial,
    })
}

fn dry_run(
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
    // SAFETY: statvfs is plain old data (integers only), for which all zero bytes are a
    // valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `st` is a valid,
    // writable statvfs the call fills.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// The candidate directory of α.
pub fn alpha_path(template: &Path, a: Lat) -> PathBuf {
    crate::alpha::expand_output(template, a.to_f64())
}

/// Why the loop stopped early.
enum Abort {
    Interrupted,
    Broken(anyhow::Error),
}

impl Search<'_> {
    fn finished(&self) -> Vec<(Lat, Outcome)> {
        self.trials
            .iter()
            .filter_map(|t| {
                let e = t.end.as_ref()?;
                let o = match e.state {
                    State::Ok => Outcome::Ok(self.oriented(e.score?)),
                    State::Unusable => Outcome::Unusable,
                    State::Failed => Outcome::Failed,
                    State::Interrupted => return None,
                };
                Some((t.alpha, o))
            })
            .collect()
    }

    fn oriented(&self, s: f64) -> f64 {
        if self.cfg.minimize {
            -s
        } else {
            s
        }
    }

    fn go(&mut self) -> Result<std::process::ExitCode> {
        interrupt::install();
        self.print_table_header();
        for t in self.trials.clone() {
            self.print_row(&t);
        }
        let mut active: Vec<Active> = Vec::new();
        let outcome = self.main_loop(&mut active);
        match outcome {
            Ok(status) => self.finish(status),
            Err(Abort::Interrupted) => {
                let running = active.len();
                self.stop_all(&mut active, State::Interrupted);
                let _ = self.write_outputs(None);
                Err(anyhow::Error::new(interrupt::Interrupted).context(format!(
                    "search stopped after {} evaluations ({running} running trial{} recorded as interrupted); continue it with the same command and --resume",
                    self.evaluations(),
                    if running == 1 { "" } else { "s" },
                )))
            }
            Err(Abort::Broken(e)) => {
                self.stop_all(&mut active, State::Interrupted);
                let _ = self.write_outputs(None);
                Err(e)
            }
        }
    }

    fn main_loop(&mut self, active: &mut Vec<Active>) -> Result<Status, Abort> {
        let broken = Abort::Broken;
        loop {
            if interrupt::check().is_err() {
                return Err(Abort::Interrupted);
            }
            // Reap finished evaluators.
            let mut k = 0;
            while k < active.len() {
                let exit = active[k]
                    .proc
                    .poll(self.cfg.timeout, self.cfg.kill_after)
                    .context("waiting for the evaluator")
                    .map_err(broken)?;
                match exit {
                    Some(exit) => {
                        let a = active.remove(k);
                        self.record_end(a, exit)?;
                    }
                    None => k += 1,
                }
            }
            let running: Vec<Lat> = active.iter().map(|a| a.trial.alpha).collect();
            let view = rule::View::new(&self.cfg.settings, &self.finished(), &running);
            let free = self.cfg.jobs.saturating_sub(active.len());
            match rule::decide(&self.cfg.settings, &view, free) {
                Decision::Propose(batch) => {
                    if interrupt::check().is_err() {
                        return Err(Abort::Interrupted);
                    }
                    self.launch(batch, active)?;
                }
                Decision::Wait => std::thread::sleep(Duration::from_millis(20)),
                Decision::Done(status) => return Ok(status),
            }
        }
    }

    fn free_slot(&self, active: &[Active]) -> usize {
        (0..self.cfg.jobs)
            .find(|s| !active.iter().any(|a| a.trial.slot == *s))
            .unwrap_or(0)
    }

    /// Builds the candidates of `batch` in one pass and starts their evaluators.
    fn launch(&mut self, batch: Vec<Lat>, active: &mut Vec<Active>) -> Result<(), Abort> {
        let planned = self.plan_trials(batch, active)?;
        if !planned.to_build.is_empty() {
            self.build_candidates(&planned)?;
        }
        for trial in planned.trials {
            active.push(self.start_evaluator(trial)?);
        }
        Ok(())
    }

    /// Gives each α of `batch` a trial number, a free slot and its candidate, and records
    /// its start in the ledger.
    fn plan_trials(&mut self, batch: Vec<Lat>, active: &[Active]) -> Result<Planned, Abort> {
        let mut planned = Planned {
            trials: Vec::new(),
            to_build: Vec::new(),
        };
        let mut taken: Vec<usize> = active.iter().map(|a| a.trial.slot).collect();
        for a in batch {
            let candidate = self.candidate(a)?;
            if candidate.build {
                planned.to_build.push(a);
            }
            let slot = (0..self.cfg.jobs)
                .find(|s| !taken.contains(s))
                .unwrap_or_else(|| self.free_slot(active));
            taken.push(slot);
            let trial = Trial {
                trial: self.next_trial,
                alpha: a,
                slot,
                output: candidate.output,
                created: candidate.created,
                end: None,
            };
            self.next_trial += 1;
            self.ledger
                .append(&ledger::start_event(&trial))
                .map_err(|e| Abort::Broken(e.into()))?;
            if trial.created {
                self.created.insert(trial.output.clone());
            }
            planned.trials.push(trial);
        }
        Ok(planned)
    }

    /// The candidate of α: the `--aligned` model for α = 0, else the `--output` directory,
    /// to build unless this search built it earlier. A directory expo did not make is an
    /// error.
    fn candidate(&self, a: Lat) -> Result<Candidate, Abort> {
        if a.0 == 0 {
            return Ok(Candidate {
                output: self.aligned_path.clone(),
                created: false,
                build: false,
            });
        }
        let p = alpha_path(&self.cfg.output, a);
        let ours = self.created.contains(&p);
        // Built earlier in this search (an unfinished or retried trial).
        let built = ours && p.join(crate::sidefiles::PROVENANCE_NAME).is_file();
        if !built && p.exists() && !is_empty_dir(&p) {
            return Err(Abort::Broken(anyhow::anyhow!(
                "{} already exists and was not made by this search; remove it, or choose another --output",
                p.display()
            )));
        }
        Ok(Candidate {
            output: p,
            created: true,
            build: !built,
        })
    }

    /// Builds the candidates of `planned` with the extrapolation engine, in one pass.
    fn build_candidates(&mut self, planned: &Planned) -> Result<(), Abort> {
        for &a in &planned.to_build {
            if let Some(parent) = alpha_path(&self.cfg.output, a).parent() {
                if !parent.as_os_str().is_empty() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("creating {}", parent.display()))
                        .map_err(Abort::Broken)?;
                }
            }
        }
        let settings = self.build_settings(&planned.to_build);
        crate::failpoint::pause("search-build");
        match build::build(&settings, &Quiet(self.reporter)) {
            Ok(_) => Ok(()),
            Err(e) if e.downcast_ref::<interrupt::Interrupted>().is_some() => {
                self.abandon(&planned.trials);
                Err(Abort::Interrupted)
            }
            Err(e) => Err(Abort::Broken(e.context(format!(
                "building the candidates for alpha {}",
                planned
                    .to_build
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))),
        }
    }

    /// Records `trials`, none of which started, as interrupted, and removes what was built.
    fn abandon(&mut self, trials: &[Trial]) {
        for trial in trials {
            let end = End {
                state: State::Interrupted,
                score: None,
                exit: None,
                seconds: 0.0,
                json: None,
            };
            let _ = self.ledger.append(&ledger::end_event(trial, &end));
            let needed = self.trials.iter().any(|t| t.output == trial.output);
            if trial.created && !needed && self.created.contains(&trial.output) {
                let _ = self.delete(&trial.output);
            }
        }
    }

    /// Starts the evaluator of `trial` in its own work directory.
    fn start_evaluator(&self, trial: Trial) -> Result<Active, Abort> {
        let workdir = self.cfg.run.join("trials").join(trial.trial.to_string());
        std::fs::create_dir_all(&workdir)
            .with_context(|| format!("creating {}", workdir.display()))
            .map_err(Abort::Broken)?;
        let values = Values {
            alpha: trial.alpha.to_string(),
            output: trial.output.clone(),
            workdir: workdir.clone(),
            slot: trial.slot,
            trial: trial.trial,
        };
        let command = self.cfg.eval.command(&values);
        let env: Vec<(&str, OsString)> = vec![
            ("EXPO_ALPHA", values.alpha.clone().into()),
            ("EXPO_OUTPUT", values.output.clone().into()),
            ("EXPO_WORKDIR", values.workdir.clone().into()),
            ("EXPO_SLOT", values.slot.to_string().into()),
            ("EXPO_TRIAL", values.trial.to_string().into()),
        ];
        let proc = evaluator::spawn(
            &command,
            &env,
            &workdir.join("stdout.log"),
            &workdir.join("stderr.log"),
        )
        .with_context(|| format!("starting the evaluator (sh -c) for trial {}", trial.trial))
        .map_err(Abort::Broken)?;
        Ok(Active {
            trial,
            values,
            proc,
        })
    }

    /// The build settings of the candidates of `alphas`: what `expo extrapolate` would be
    /// given for them.
    fn build_settings(&self, alphas: &[Lat]) -> BuildSettings {
        BuildSettings {
            sft: self.cfg.sft.clone(),
            aligned: self.cfg.aligned.clone(),
            alphas: alphas.iter().map(|a| a.to_f64()).collect(),
            alpha_for: self.cfg.alpha_for.clone(),
            skip: self.cfg.skip.clone(),
            output: self.cfg.output.clone(),
            max_shard_size: self.cfg.max_shard_size,
            dtype: self.cfg.dtype,
            force: false,
            threads: self.cfg.threads,
            warn_relative_change: f64::INFINITY,
            // An adapter as --aligned makes adapter candidates (the default kind).
            as_kind: None,
            command: self.cfg.command.clone(),
        }
    }

    fn record_end(&mut self, a: Active, exit: evaluator::Exit) -> Result<(), Abort> {
        let Active {
            trial,
            values,
            proc: _,
        } = a;
        if matches!(exit.code, Some(126) | Some(127)) {
            return Err(self.unrunnable(trial, &values, &exit));
        }
        let (end, note) = self.judge(&exit, &values);
        if let Some(n) = note {
            self.reporter.warn(format!(
                "trial {} (alpha {}): {n}; logs in {}",
                trial.trial,
                trial.alpha,
                values.workdir.display()
            ));
        }
        self.store_end(trial, end)?;
        self.tidy()?;
        self.write_outputs(None).map_err(Abort::Broken)?;
        Ok(())
    }

    /// How a trial that ran ended: scored, unusable (exit 125) or failed; and why it failed.
    fn judge(&self, exit: &evaluator::Exit, values: &Values) -> (End, Option<String>) {
        let stdout = values.workdir.join("stdout.log");
        let mut note = None;
        let (state, score, json) = match exit.code {
            Some(125) => (State::Unusable, None, None),
            Some(0) if !exit.timed_out => match self.cfg.score.read(&stdout, values) {
                Ok(s) => (State::Ok, Some(s.value), s.json),
                Err(e) => {
                    note = Some(e.to_string());
                    (State::Failed, None, None)
                }
            },
            _ => {
                note = Some(if exit.timed_out {
                    format!(
                        "timed out after {}",
                        crate::text::seconds(self.cfg.timeout.map_or(0.0, |t| t.as_secs_f64()))
                    )
                } else if let Some(sig) = exit.signal {
                    format!("killed by signal {sig}")
                } else {
                    format!("exit {}", exit.code.unwrap_or(-1))
                });
                (State::Failed, None, None)
            }
        };
        let end = End {
            state,
            score,
            exit: exit.code,
            seconds: exit.seconds,
            json,
        };
        (end, note)
    }

    /// Records a trial whose evaluator could not be run (exit 126 or 127) as failed; the
    /// error that stops the search.
    fn unrunnable(&mut self, trial: Trial, values: &Values, exit: &evaluator::Exit) -> Abort {
        let end = End {
            state: State::Failed,
            score: None,
            exit: exit.code,
            seconds: exit.seconds,
            json: None,
        };
        if let Err(e) = self.store_end(trial, end) {
            return e;
        }
        let stderr = values.workdir.join("stderr.log");
        let tail = evaluator::tail_lines(&stderr, 10);
        Abort::Broken(anyhow::anyhow!(
            "the evaluator could not be run (exit {}: {}), so the search stopped; fix --eval `{}`{}",
            exit.code.unwrap_or(0),
            if exit.code == Some(127) { "command not found" } else { "not executable" },
            self.cfg.eval.spelling,
            if tail.is_empty() { String::new() } else { format!("; its stderr ({}) ends with:\n{tail}", stderr.display()) }
        ))
    }

    fn store_end(&mut self, mut trial: Trial, end: End) -> Result<(), Abort> {
        self.ledger
            .append(&ledger::end_event(&trial, &end))
            .map_err(|e| Abort::Broken(e.into()))?;
        trial.end = Some(end);
        self.print_row(&trial);
        if trial
            .end
            .as_ref()
            .is_some_and(|e| e.state != State::Interrupted)
        {
            self.trials.push(trial);
        }
        Ok(())
    }

    /// Deletes the candidates out of contention (only ones expo built).
    fn tidy(&mut self) -> Result<(), Abort> {
        let Some(keep) = self.cfg.keep else {
            return Ok(());
        };
        let finished = self.finished();
        let view = rule::View::new(&self.cfg.settings, &finished, &[]);
        let mut ranked: Vec<(Lat, f64)> = Vec::new();
        for (a, o) in &finished {
            if let Outcome::Ok(s) = o {
                if !ranked.iter().any(|(b, _)| b == a) {
                    ranked.push((*a, *s));
                }
            }
        }
        ranked.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
        let kept: Vec<Lat> = ranked.iter().take(keep).map(|(a, _)| *a).collect();
        let mut doomed = Vec::new();
        for t in &self.trials {
            if !self.created.contains(&t.output) || kept.contains(&t.alpha) {
                continue;
            }
            if !view.is_final(t.alpha) {
                continue;
            }
            doomed.push(t.output.clone());
        }
        doomed.sort();
        doomed.dedup();
        for p in doomed {
            self.delete(&p).map_err(Abort::Broken)?;
        }
        Ok(())
    }

    fn delete(&mut self, p: &Path) -> Result<()> {
        if p.exists() {
            std::fs::remove_dir_all(p)
                .with_context(|| format!("deleting the candidate {}", p.display()))?;
        }
        self.created.remove(p);
        self.ledger
            .append(&json!({"event": "delete", "output": p}))?;
        Ok(())
    }

    /// Stops every running evaluator: SIGTERM to each group, SIGKILL after --kill-after;
    /// records them as `state` and removes their candidates.
    fn stop_all(&mut self, active: &mut Vec<Active>, state: State) {
        for a in active.iter_mut() {
            a.proc.terminate();
        }
        let mut exits = Vec::new();
        while !active.is_empty() {
            let mut k = 0;
            while k < active.len() {
                match active[k].proc.poll(None, self.cfg.kill_after) {
                    Ok(Some(e)) => exits.push((active.remove(k), e)),
                    Ok(None) => k += 1,
                    Err(_) => {
                        active[k].proc.kill_now();
                        let a = active.remove(k);
                        let e = evaluator::Exit {
                            code: None,
                            signal: Some(libc::SIGKILL),
                            seconds: a.proc.started.elapsed().as_secs_f64(),
                            timed_out: false,
                        };
                        exits.push((a, e));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for (a, e) in exits {
            let trial = a.trial.clone();
            let end = End {
                state,
                score: None,
                exit: e.code,
                seconds: e.seconds,
                json: None,
            };
            let _ = self.ledger.append(&ledger::end_event(&trial, &end));
            let mut shown = trial.clone();
            shown.end = Some(end);
            self.print_row(&shown);
            // Its candidate is removed unless a finished trial still needs it.
            let needed = self.trials.iter().any(|t| t.output == trial.output);
            if trial.created && !needed && self.created.contains(&trial.output) {
                let _ = self.delete(&trial.output);
            }
        }
    }

    fn baseline_score(&self) -> Option<f64> {
        self.trials
            .iter()
            .filter(|t| t.alpha.0 == 0)
            .find_map(|t| t.end.as_ref().filter(|e| e.state == State::Ok)?.score)
    }

    fn best(&self) -> Option<(Lat, f64)> {
        let view = rule::View::new(&self.cfg.settings, &self.finished(), &[]);
        let (a, _) = view.best()?;
        let raw = self
            .trials
            .iter()
            .filter(|t| t.alpha == a)
            .find_map(|t| t.end.as_ref().filter(|e| e.state == State::Ok)?.score)?;
        Some((a, raw))
    }

    fn evaluations(&self) -> usize {
        self.trials.len()
    }

    /// The summary object (`--json` and RUN/summary.json); `status` is `None` mid-search.
    fn summary(&self, status: Option<Status>) -> Value {
        let best = self.best();
        let trials: Vec<Value> = self
            .trials
            .iter()
            .map(|t| {
                let e = t.end.as_ref();
                json!({
                    "trial": t.trial,
                    "alpha": t.alpha.to_f64(),
                    "state": e.map(|e| e.state.name()),
                    "score": e.and_then(|e| e.score),
                    "seconds": e.map(|e| e.seconds),
                    "output": t.output,
                    "exit": e.and_then(|e| e.exit),
                })
            })
            .collect();
        let best_output = best.map(|(a, _)| self.output_of(a));
        json!({
            "status": status.map(Status::name),
            "best": best.map(|(a, s)| json!({
                "alpha": a.to_f64(),
                "score": s,
                "output": best_output,
                "kept": best_output.as_ref().is_some_and(|p| p.exists()),
            })),
            "baseline": self.baseline_score().map(|s| json!({"score": s, "output": self.aligned_path})),
            "evaluations": self.evaluations(),
            "minimize": self.cfg.minimize,
            "trials": trials,
            "kept": self.created.iter().filter(|p| p.exists()).collect::<Vec<_>>(),
            "rebuild": best.filter(|(a, _)| a.0 != 0).map(|(a, _)| self.rebuild_command(a)),
            "rebuild_any": self.rebuild_command_template(),
            "run": self.cfg.run,
            "seconds": self.started.elapsed().as_secs_f64(),
        })
    }

    fn output_of(&self, a: Lat) -> PathBuf {
        if a.0 == 0 {
            self.aligned_path.clone()
        } else {
            alpha_path(&self.cfg.output, a)
        }
    }

    /// `expo extrapolate …` that rebuilds the candidate of α bit for bit.
    fn rebuild_command(&self, a: Lat) -> String {
        self.rebuild_with(&a.to_string(), &alpha_path(&self.cfg.output, a))
    }

    fn rebuild_command_template(&self) -> String {
        self.rebuild_with("ALPHA", &self.cfg.output)
    }

    fn rebuild_with(&self, alpha: &str, output: &Path) -> String {
        use std::os::unix::ffi::OsStrExt;
        let q = |b: &[u8]| String::from_utf8_lossy(&evaluator::shell_quote(b)).into_owned();
        let mut c = format!(
            "expo extrapolate --sft {} --aligned {} --alpha {} --output {}",
            q(self.cfg.sft.as_os_str().as_bytes()),
            q(self.cfg.aligned.as_os_str().as_bytes()),
            alpha,
            q(output.as_os_str().as_bytes())
        );
        for r in self.cfg.skip.iter().chain(&self.cfg.alpha_for) {
            if let Some((flag, value)) = r.spelling.split_once(' ') {
                c.push_str(&format!(" {flag} {}", q(value.as_bytes())));
            }
        }
        if self.cfg.dtype != DtypeChoice::Auto {
            c.push_str(&format!(" --dtype {}", self.cfg.dtype.name()));
        }
        if let Some(n) = self.cfg.max_shard_size {
            c.push_str(&format!(" --max-shard-size {n}"));
        }
        c
    }

    /// Writes RUN/summary.json and RUN/search.svg (atomically).
    fn write_outputs(&self, status: Option<Status>) -> Result<()> {
        let summary = self.summary(status);
        let mut text = serde_json::to_string_pretty(&summary)?;
        text.push('\n');
        write_atomic(&self.cfg.run.join("summary.json"), text.as_bytes())?;
        let points: Vec<plot::Point> = self
            .trials
            .iter()
            .filter_map(|t| {
                let e = t.end.as_ref()?;
                Some(plot::Point {
                    alpha: t.alpha.to_f64(),
                    score: if e.state == State::Ok { e.score } else { None },
                })
            })
            .collect();
        let svg = plot::svg(
            &points,
            self.baseline_score(),
            self.best().map(|(a, s)| (a.to_f64(), s)),
        );
        write_atomic(&self.cfg.run.join("search.svg"), svg.as_bytes())?;
        Ok(())
    }

    fn finish(&mut self, status: Status) -> Result<std::process::ExitCode> {
        self.ledger.append(&json!({
            "event": "done",
            "status": status.name(),
            "evaluations": self.evaluations(),
        }))?;
        self.write_outputs(Some(status))?;
        self.check_scored(status)?;
        status_warning(self.reporter, status, &self.cfg.settings);
        let verdict = Verdict {
            status,
            best: self.best().map(|(a, s)| (a, s, self.where_is(a))),
            evaluations: self.evaluations(),
            summary: self.summary(Some(status)),
        };
        self.reporter.finished(&verdict)?;
        Ok(std::process::ExitCode::SUCCESS)
    }

    /// The error of a search that ended without a usable score.
    fn check_scored(&self, status: Status) -> Result<()> {
        match status {
            Status::Failures => {
                anyhow::bail!(
                    "{} trials failed even after {} retr{} (--max-failures {}); the logs are in {}",
                    self.trials
                        .iter()
                        .filter(|t| t.end.as_ref().is_some_and(|e| e.state == State::Failed))
                        .map(|t| t.alpha)
                        .collect::<BTreeSet<_>>()
                        .len(),
                    self.cfg.settings.retries,
                    if self.cfg.settings.retries == 1 {
                        "y"
                    } else {
                        "ies"
                    },
                    self.cfg.settings.max_failures,
                    self.cfg.run.join("trials").display()
                );
            }
            Status::NoScore => {
                anyhow::bail!(
                    "no candidate could be scored (every trial was unusable or failed); the logs are in {}",
                    self.cfg.run.join("trials").display()
                );
            }
            _ => Ok(()),
        }
    }

    /// Where the candidate of α is, for the final line.
    fn where_is(&self, a: Lat) -> String {
        let out = self.output_of(a);
        if a.0 == 0 {
            format!("the --aligned model {}", out.display())
        } else if out.exists() {
            format!("kept in {}", out.display())
        } else {
            format!("rebuild it with: {}", self.rebuild_command(a))
        }
    }

    fn print_table_header(&self) {
        self.reporter.table_header();
    }

    fn print_row(&self, t: &Trial) {
        self.reporter.trial_ended(t, self.baseline_score());
    }
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_none())
}

/// Writes `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
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
