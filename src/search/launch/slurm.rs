//! The Slurm launcher: each trial is one batch job (`expo search --slurm 'SBATCH OPTIONS'`).
//!
//! - The job script is written in the trial's work dir (`job.sh`): the job name
//!   `expo-ID-N`, stdout and stderr to the trial's logs, the `EXPO_*` variables, a check that
//!   the candidate is visible on the compute node, then the evaluator command (with `exec`
//!   when it is a simple command). It is submitted with `sbatch --parsable OPTIONS job.sh`
//!   (the options are parsed by `sh`, as typed); the job id goes to the ledger.
//! - One `squeue -h -t all -j ID,ID… -o '%i %T %r'` per poll (at most one a second) follows
//!   every job; a job's exit code is read once, at its end, from `scontrol show job -o ID`.
//! - `--timeout` counts from when the job is first seen RUNNING; queue time is bounded by
//!   `--queue-timeout` alone, which stops the search (a queue that does not move is not
//!   α's fault).
//! - Stopping a job: `scancel --full --signal=TERM ID` (`--full`: the batch shell and its
//!   children, which a plain `--signal` does not reach), then `scancel ID` after
//!   `--kill-after`; a pending job is simply removed. A job has ended when it has left the
//!   queue (a final state in `squeue -t all`), so no candidate is deleted under it.
//! - NODE_FAIL, PREEMPTED, BOOT_FAIL, a cancellation by someone else: the cluster's failure,
//!   not α's ([`Exit::cluster`]). A job Slurm requeues keeps its id and is followed on.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Exit, JobSpec, LaunchError, Launcher, Phase};
use crate::reporter::Reporter;
use crate::text::shell_quote;

/// How often the queue is asked.
const POLL: Duration = Duration::from_secs(1);

/// Job ids a second Ctrl-C cancels before expo exits.
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn live_add(id: &str) {
    crate::interrupt::on_forced_exit("slurm jobs", cancel_live);
    LIVE.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(id.to_string());
}

fn live_remove(id: &str) {
    LIVE.lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|j| j != id);
}

/// `scancel` every job still live (the second interrupt).
fn cancel_live() {
    let ids = LIVE.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if !ids.is_empty() {
        let _ = Command::new("scancel")
            .args(&ids)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[derive(Debug)]
struct Job {
    trial: u64,
    id: String,
    submitted: Instant,
    running_since: Option<Instant>,
    state: String,
    reason: String,
    term_sent: Option<Instant>,
    hard: bool,
    timed_out: bool,
}

/// Evaluators as Slurm batch jobs.
#[derive(Debug)]
pub struct Slurm {
    options: String,
    search: String,
    queue_timeout: Option<Duration>,
    jobs: Vec<Job>,
    last: Option<Instant>,
}

/// A Slurm command's output, or its error message.
fn run(mut cmd: Command) -> Result<String, String> {
    let what = format!("{:?}", cmd.get_program());
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {what}: {e} (is Slurm installed and on PATH?)"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(if err.is_empty() {
            format!("{what} failed ({})", out.status)
        } else {
            err
        })
    }
}

fn scancel(args: &[&str], ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    let mut cmd = Command::new("scancel");
    cmd.args(args)
        .args(ids)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _ = run(cmd);
}

/// `squeue -t all` for `ids`: id → (state, reason). Ids Slurm no longer knows are absent.
fn squeue(ids: &[String]) -> std::io::Result<Vec<(String, String, String)>> {
    let mut cmd = Command::new("squeue");
    cmd.args(["-h", "-t", "all", "-o", "%i %T %r", "-j"])
        .arg(ids.join(","));
    match run(cmd) {
        Ok(text) => Ok(parse_squeue(&text)),
        // One unknown id makes squeue fail: ask again one by one (rare: a resumed run).
        Err(e) if e.contains("Invalid job id") && ids.len() > 1 => {
            let mut all = Vec::new();
            for id in ids {
                all.extend(squeue(std::slice::from_ref(id))?);
            }
            Ok(all)
        }
        Err(e) if e.contains("Invalid job id") => Ok(Vec::new()),
        Err(e) => Err(std::io::Error::other(format!("squeue: {e}"))),
    }
}

fn parse_squeue(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.trim().splitn(3, ' ');
            let id = it.next()?.to_string();
            let state = it.next()?.to_string();
            let reason = it.next().unwrap_or("").trim().to_string();
            Some((id, state, reason))
        })
        .collect()
}

/// `ExitCode=C:S` of `scontrol show job -o ID`.
fn exit_code(id: &str) -> Option<(i32, i32)> {
    let mut cmd = Command::new("scontrol");
    cmd.args(["show", "job", "-o", id]);
    let text = run(cmd).ok()?;
    parse_exit_code(&text)
}

fn parse_exit_code(text: &str) -> Option<(i32, i32)> {
    let v = text
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("ExitCode="))?;
    let (c, s) = v.split_once(':')?;
    Some((c.parse().ok()?, s.parse().ok()?))
}

fn is_final(state: &str) -> bool {
    !matches!(
        state,
        "PENDING"
            | "RUNNING"
            | "COMPLETING"
            | "CONFIGURING"
            | "REQUEUED"
            | "REQUEUE_FED"
            | "REQUEUE_HOLD"
            | "RESIZING"
            | "SUSPENDED"
            | "STOPPED"
            | "SIGNALING"
            | "STAGE_OUT"
    )
}

/// The job script of a trial.
pub fn job_script(spec: &JobSpec, search: &str, output: Option<&std::path::Path>) -> Vec<u8> {
    let pct = |p: &std::path::Path| {
        // sbatch expands %j, %x … in -o/-e: a literal % is %%.
        let mut v = Vec::new();
        for &b in p.as_os_str().as_bytes() {
            if b == b'%' {
                v.push(b'%');
            }
            v.push(b);
        }
        v
    };
    let mut s: Vec<u8> = Vec::new();
    s.extend_from_slice(b"#!/bin/sh\n");
    s.extend_from_slice(format!("#SBATCH --job-name={}\n", spec.name).as_bytes());
    s.extend_from_slice(b"#SBATCH --output=");
    s.extend_from_slice(&pct(&spec.stdout));
    s.extend_from_slice(b"\n#SBATCH --error=");
    s.extend_from_slice(&pct(&spec.stderr));
    // The evaluator runs where expo runs, as a local one does: relative paths hold.
    if let Ok(cwd) = std::env::current_dir() {
        s.extend_from_slice(b"\n#SBATCH --chdir=");
        s.extend_from_slice(cwd.as_os_str().as_bytes());
    }
    s.extend_from_slice(format!("\n# expo search {search}, trial {}\n", spec.trial).as_bytes());
    for (k, v) in &spec.env {
        s.extend_from_slice(format!("export {k}=").as_bytes());
        s.extend_from_slice(&shell_quote(v.as_bytes()));
        s.push(b'\n');
    }
    s.extend_from_slice(format!("export EXPO_SEARCH={search}\n").as_bytes());
    if let Some(out) = output {
        let q = shell_quote(out.as_os_str().as_bytes());
        s.extend_from_slice(b"if [ ! -e ");
        s.extend_from_slice(&q);
        s.extend_from_slice(b" ]; then echo \"expo: the candidate ");
        s.extend_from_slice(&q);
        s.extend_from_slice(b" is not visible on $(hostname): the run and candidate directories must be on a file system the compute nodes share\" >&2; exit 126; fi\n");
    }
    let cmd = super::with_exec(spec.command.as_bytes())
        .unwrap_or_else(|| spec.command.as_bytes().to_vec());
    s.extend_from_slice(&cmd);
    s.push(b'\n');
    s
}

impl Slurm {
    /// A launcher submitting with `options` (shell syntax, as typed after `--slurm`).
    pub fn new(options: &str, search: &str, queue_timeout: Option<Duration>) -> Slurm {
        Slurm {
            options: options.to_string(),
            search: search.to_string(),
            queue_timeout,
            jobs: Vec::new(),
            last: None,
        }
    }

    fn cancel_term(&self, job: &Job) {
        let ids = [job.id.clone()];
        if job.state == "PENDING" || job.running_since.is_none() {
            scancel(&[], &ids);
        } else {
            scancel(&["--full", "--signal=TERM"], &ids);
        }
    }

    /// Jobs of this search in the queue, by name: (id, state).
    fn queued_by_name(&self) -> Vec<(String, String)> {
        let mut cmd = Command::new("squeue");
        cmd.args(["-h", "-o", "%i %T %j"]);
        let prefix = format!("expo-{}-", self.search);
        run(cmd)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut it = l.split_ascii_whitespace();
                let (id, st, name) = (it.next()?, it.next()?, it.next()?);
                name.starts_with(&prefix)
                    .then(|| (id.to_string(), st.to_string()))
            })
            .collect()
    }
}

impl Launcher for Slurm {
    fn start(&mut self, spec: &JobSpec) -> Result<Value, LaunchError> {
        let output = spec
            .env
            .iter()
            .find(|(k, _)| k == "EXPO_OUTPUT")
            .map(|(_, v)| PathBuf::from(v));
        let script = spec.workdir.join("job.sh");
        std::fs::write(&script, job_script(spec, &self.search, output.as_deref())).map_err(
            |source| LaunchError::Io {
                what: format!("writing {}", script.display()),
                source,
            },
        )?;
        // The user's options are shell words: sh splits them.
        let line = format!("exec sbatch --parsable {} \"$0\"", self.options);
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(line)
            .arg(OsString::from_vec(script.as_os_str().as_bytes().to_vec()));
        let out = run(cmd).map_err(|message| LaunchError::Refused {
            trial: spec.trial,
            message,
        })?;
        let id = out
            .lines()
            .next()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit() || b == b'_') {
            return Err(LaunchError::Refused {
                trial: spec.trial,
                message: format!("sbatch --parsable printed `{}`, not a job id", out.trim()),
            });
        }
        live_add(&id);
        self.jobs.push(Job {
            trial: spec.trial,
            id: id.clone(),
            submitted: Instant::now(),
            running_since: None,
            state: "PENDING".into(),
            reason: String::new(),
            term_sent: None,
            hard: false,
            timed_out: false,
        });
        // Ask the queue at once next time: a quick job is seen quickly.
        Ok(json!({"launcher": "slurm", "job_id": id, "name": spec.name}))
    }

    fn poll(
        &mut self,
        timeout: Option<Duration>,
        kill_after: Duration,
    ) -> std::io::Result<Vec<(u64, Exit)>> {
        if self.jobs.is_empty() || self.last.is_some_and(|t| t.elapsed() < POLL) {
            return Ok(Vec::new());
        }
        self.last = Some(Instant::now());
        let ids: Vec<String> = self.jobs.iter().map(|j| j.id.clone()).collect();
        let rows = squeue(&ids)?;
        let mut ended = Vec::new();
        let mut k = 0;
        while k < self.jobs.len() {
            let row = rows.iter().find(|r| r.0 == self.jobs[k].id);
            let (state, reason) = match row {
                Some((_, s, r)) => (s.clone(), r.clone()),
                // Slurm forgot it: ended, outcome unknown.
                None => ("UNKNOWN".to_string(), String::new()),
            };
            let j = &mut self.jobs[k];
            if state == "RUNNING" && j.running_since.is_none() {
                j.running_since = Some(Instant::now());
            }
            if state == "PENDING" && j.running_since.is_some() {
                // Requeued by Slurm (node failure, preemption): it starts again.
                j.running_since = None;
            }
            j.state = state.clone();
            j.reason = reason.clone();
            if !is_final(&state) {
                let over =
                    timeout.is_some_and(|t| j.running_since.is_some_and(|s| s.elapsed() >= t));
                if over && j.term_sent.is_none() {
                    j.timed_out = true;
                }
                let queued_too_long = j.running_since.is_none()
                    && j.term_sent.is_none()
                    && self
                        .queue_timeout
                        .is_some_and(|q| j.submitted.elapsed() >= q);
                if queued_too_long {
                    let j = self.jobs.remove(k);
                    scancel(&[], std::slice::from_ref(&j.id));
                    live_remove(&j.id);
                    ended.push((j.trial, queued_too_long_exit(&j)));
                    continue;
                }
                if self.jobs[k].timed_out && self.jobs[k].term_sent.is_none() {
                    let trial = self.jobs[k].trial;
                    self.terminate(trial);
                }
                let j = &mut self.jobs[k];
                if !j.hard && j.term_sent.is_some_and(|t| t.elapsed() >= kill_after) {
                    j.hard = true;
                    scancel(&[], std::slice::from_ref(&j.id));
                }
                k += 1;
                continue;
            }
            let j = self.jobs.remove(k);
            live_remove(&j.id);
            ended.push((j.trial, final_exit(&j, &state)));
        }
        Ok(ended)
    }

    fn terminate(&mut self, trial: u64) {
        if let Some(k) = self.jobs.iter().position(|j| j.trial == trial) {
            if self.jobs[k].term_sent.is_none() {
                self.cancel_term(&self.jobs[k]);
                self.jobs[k].term_sent = Some(Instant::now());
                // See the effect at the next poll.
                self.last = None;
            }
        }
    }

    fn kill_all(&mut self) {
        let ids: Vec<String> = self.jobs.iter().map(|j| j.id.clone()).collect();
        scancel(&[], &ids);
        for j in &mut self.jobs {
            j.hard = true;
            j.term_sent.get_or_insert_with(Instant::now);
        }
    }

    fn phase(&self, trial: u64) -> Option<Phase> {
        let j = self.jobs.iter().find(|j| j.trial == trial)?;
        Some(if j.running_since.is_some() {
            Phase::Running
        } else {
            Phase::Queued(j.reason.clone())
        })
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(100)
    }

    fn recover(
        &mut self,
        records: &[(u64, Value)],
        kill_after: Duration,
        reporter: &dyn Reporter,
    ) -> anyhow::Result<()> {
        let mut ids: Vec<String> = records
            .iter()
            .filter(|(_, r)| r["launcher"] == "slurm")
            .filter_map(|(_, r)| r["job_id"].as_str().map(str::to_string))
            .collect();
        for (id, _) in self.queued_by_name() {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        let alive = |ids: &[String]| -> anyhow::Result<Vec<String>> {
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            Ok(squeue(ids)?
                .into_iter()
                .filter(|(_, s, _)| !is_final(s))
                .map(|(id, _, _)| id)
                .collect())
        };
        let live = alive(&ids)?;
        if live.is_empty() {
            return Ok(());
        }
        reporter.warn(format!(
            "jobs of the earlier run of this search are still in Slurm's queue: {}; cancelling them (not adopting them) and waiting until they have left the queue before anything is evaluated, built or deleted",
            live.join(", ")
        ));
        scancel(&["--full", "--signal=TERM"], &live);
        // Pending ones are simply removed.
        scancel(&["--state=PENDING"], &live);
        let t0 = Instant::now();
        let mut hard = false;
        loop {
            let left = alive(&live)?;
            if left.is_empty() {
                return Ok(());
            }
            if !hard && t0.elapsed() >= kill_after {
                scancel(&[], &left);
                hard = true;
            }
            if t0.elapsed() >= kill_after + Duration::from_secs(120) {
                anyhow::bail!(
                    "--resume: Slurm jobs of the earlier run of this search are still in the queue after scancel: {}; nothing was started; resume again once they have left it",
                    left.join(", ")
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

/// The end of a job that waited in the queue longer than `--queue-timeout` (cancelled):
/// fatal for the search, whose cluster cannot run it.
fn queued_too_long_exit(j: &Job) -> Exit {
    Exit {
        code: None,
        signal: None,
        seconds: 0.0,
        timed_out: false,
        cluster: Some(format!(
            "job {} waited in the queue for {} (PENDING, reason: {}), longer than --queue-timeout",
            j.id,
            crate::text::seconds(j.submitted.elapsed().as_secs_f64()),
            if j.reason.is_empty() {
                "none"
            } else {
                &j.reason
            }
        )),
        fatal: true,
    }
}

/// How a job that left the queue in `state` ended: its exit code (from `scontrol`), and
/// whether the cluster, not the evaluator, ended it (cancelled by someone else, a node
/// failure, forgotten by Slurm).
fn final_exit(j: &Job, state: &str) -> Exit {
    let seconds = j.running_since.map_or(0.0, |s| s.elapsed().as_secs_f64());
    let ours = j.term_sent.is_some();
    let (code, signal) = match exit_code(&j.id) {
        Some((c, 0)) => (Some(c), None),
        Some((_, s)) => (None, Some(s)),
        None => (None, None),
    };
    let cluster = match state {
        "COMPLETED" | "FAILED" | "OUT_OF_MEMORY" => None,
        "CANCELLED" if ours => None,
        "TIMEOUT" => None,
        "CANCELLED" => Some(format!("job {} was cancelled by someone else", j.id)),
        "UNKNOWN" => Some(format!(
            "job {} is no longer known to Slurm; its end was not seen",
            j.id
        )),
        other => Some(format!("job {} ended {other}", j.id)),
    };
    let timeout = state == "TIMEOUT";
    Exit {
        code: if timeout { None } else { code },
        signal: if timeout { Some(libc::SIGKILL) } else { signal },
        seconds,
        timed_out: j.timed_out,
        cluster,
        fatal: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_rows_and_exit_codes_parse() {
        let rows =
            parse_squeue("12 RUNNING None\n13 PENDING ReqNodeNotAvail, UnavailableNodes:n1\n");
        assert_eq!(rows[1].2, "ReqNodeNotAvail, UnavailableNodes:n1");
        assert_eq!(
            parse_exit_code(
                "JobId=7 JobName=x JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0 RunTime=1"
            ),
            Some((3, 0))
        );
        assert_eq!(parse_exit_code("ExitCode=0:15"), Some((0, 15)));
        assert!(is_final("COMPLETED") && is_final("NODE_FAIL") && !is_final("COMPLETING"));
    }

    #[test]
    fn the_job_script_names_the_trial_and_escapes_percent() {
        let spec = JobSpec {
            trial: 3,
            command: "./eval.sh '/c/alpha-0.3'".into(),
            env: vec![("EXPO_ALPHA".into(), "0.3".into())],
            stdout: "/r/50%/trials/3/stdout.log".into(),
            stderr: "/r/trials/3/stderr.log".into(),
            workdir: "/r/trials/3".into(),
            name: "expo-abc-3".into(),
        };
        let s = String::from_utf8(job_script(
            &spec,
            "abc",
            Some(std::path::Path::new("/c/alpha-0.3")),
        ))
        .unwrap();
        assert!(s.contains("#SBATCH --job-name=expo-abc-3\n"), "{s}");
        assert!(s.contains("--output=/r/50%%/trials/3/stdout.log"), "{s}");
        assert!(s.contains("export EXPO_ALPHA=0.3\n"), "{s}");
        assert!(s.contains("not visible on"), "{s}");
        assert!(s.ends_with("exec ./eval.sh '/c/alpha-0.3'\n"), "{s}");
    }
}
