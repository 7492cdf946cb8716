//! The local launcher: `sh -c COMMAND` on this machine, one process group per trial.
//!
//! - A simple command runs with `exec` ([`super::with_exec`]): the evaluator is the group's
//!   leader and gets expo's signals itself.
//! - Stopping a trial (timeout, Ctrl-C, `--max-failures`) sends SIGTERM to its group and
//!   SIGKILL `--kill-after` later; the grace belongs to the group, not to its leader: a
//!   leader that dies at SIGTERM (a `sh -c` wrapper) does not cut its workers' clean-up
//!   short. A trial has ended only when no process of it is left; an evaluator that exits
//!   leaving workers behind gets the same SIGTERM, grace, SIGKILL.
//! - expo is a child subreaper (`PR_SET_CHILD_SUBREAPER`): a worker that leaves the group
//!   (`setsid`, a daemonising double fork) is reparented to expo when its parent exits, and
//!   is found there, attributed to its trial by the `EXPO_SEARCH`/`EXPO_TRIAL` of its
//!   environment, and stopped with its trial. What escapes: a process reparented elsewhere
//!   (started through a daemon, e.g. `docker run`, whose container belongs to the container
//!   runtime), and, while its parent still runs, a worker in a session of its own (it is
//!   found once its parent is gone, which stopping the group brings about).
//! - The direct child has `PR_SET_PDEATHSIG` = SIGTERM: when expo is killed (kill -9) the
//!   evaluator gets SIGTERM. Its workers do not; the ledger's `job` event records the group
//!   and its leader's start time, and `--resume` stops what is left ([`Local::recover`]).

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Exit, JobSpec, LaunchError, Launcher};
use crate::reporter::Reporter;
use crate::search::groups::{register_group, unregister_group};

/// How often `/proc` is scanned for reparented workers while nothing is being stopped.
const SCAN_EVERY: Duration = Duration::from_millis(250);

/// Sends `sig` to the whole process group `pgid`.
pub fn signal_group(pgid: i32, sig: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) with a negative pid signals a process group; no memory is shared.
        unsafe {
            libc::kill(-pgid, sig);
        }
    }
}

fn signal_pid(pid: i32, sig: i32) {
    if pid > 1 {
        // SAFETY: kill(2) on one process; no memory is shared.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// One line of `/proc/PID/stat`.
#[derive(Debug, Clone, Copy)]
pub struct Proc {
    pub pid: i32,
    pub state: u8,
    pub ppid: i32,
    pub pgrp: i32,
    /// Field 22: clock ticks after boot when the process started.
    pub start_time: u64,
}

impl Proc {
    fn live(&self) -> bool {
        self.state != b'Z' && self.state != b'X'
    }
}

/// `/proc/PID/stat`, parsed.
pub fn stat(pid: i32) -> Option<Proc> {
    let text = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    let close = text.iter().rposition(|&b| b == b')')?;
    let rest = String::from_utf8_lossy(&text[close + 1..]).into_owned();
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // f[0] is field 3 (state).
    Some(Proc {
        pid,
        state: *f.first()?.as_bytes().first()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        start_time: f.get(19)?.parse().ok()?,
    })
}

/// Every process of the machine (that `/proc` shows).
fn scan() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(stat)
        .collect()
}

/// `EXPO_SEARCH` and `EXPO_TRIAL` from a process's environment.
fn tags(pid: i32) -> (Option<String>, Option<u64>) {
    let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return (None, None);
    };
    let mut search = None;
    let mut trial = None;
    for var in env.split(|&b| b == 0) {
        if let Some(v) = var.strip_prefix(b"EXPO_SEARCH=") {
            search = Some(String::from_utf8_lossy(v).into_owned());
        } else if let Some(v) = var.strip_prefix(b"EXPO_TRIAL=") {
            trial = std::str::from_utf8(v).ok().and_then(|t| t.parse().ok());
        }
    }
    (search, trial)
}

/// A process reparented to expo (it left its trial's group, or its parent died).
#[derive(Debug)]
struct Orphan {
    pid: i32,
    pgrp: i32,
    trial: Option<u64>,
    /// The strongest signal sent to it so far (0: none).
    sent: i32,
}

impl Orphan {
    fn signal(&self, sig: i32) {
        if self.pgrp == self.pid {
            signal_group(self.pgrp, sig);
        } else {
            signal_pid(self.pid, sig);
        }
    }
}

#[derive(Debug)]
struct Job {
    trial: u64,
    child: Child,
    pgid: i32,
    started: Instant,
    term_sent: Option<Instant>,
    killed: bool,
    timed_out: bool,
    leader: Option<std::process::ExitStatus>,
}

/// Evaluators as process groups on this machine.
#[derive(Debug)]
pub struct Local {
    search: String,
    me: i32,
    jobs: Vec<Job>,
    orphans: Vec<Orphan>,
    last_scan: Option<Instant>,
}

impl Local {
    /// A launcher for the search `search` (its id); makes expo a child subreaper.
    pub fn new(search: &str) -> Local {
        // SAFETY: prctl(2) with PR_SET_CHILD_SUBREAPER takes an integer flag; no memory.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
        Local {
            search: search.to_string(),
            me: std::process::id() as i32,
            jobs: Vec::new(),
            orphans: Vec::new(),
            last_scan: None,
        }
    }

    /// Finds processes reparented to expo, reaps the dead ones, and attributes the live
    /// ones to their trials. Returns the scan.
    fn rescan(&mut self) -> Vec<Proc> {
        let procs = scan();
        self.last_scan = Some(Instant::now());
        let leaders: Vec<i32> = self.jobs.iter().map(|j| j.pgid).collect();
        let mut seen = Vec::new();
        for p in procs
            .iter()
            .filter(|p| p.ppid == self.me && !leaders.contains(&p.pid))
        {
            if !p.live() {
                let mut status = 0;
                // SAFETY: waitpid(2) on a zombie child of expo that no `Child` handle owns
                // (it was reparented to expo); WNOHANG never blocks.
                unsafe {
                    libc::waitpid(p.pid, &mut status, libc::WNOHANG);
                }
                continue;
            }
            seen.push(p.pid);
            if self.orphans.iter().any(|o| o.pid == p.pid) {
                continue;
            }
            let (search, trial) = tags(p.pid);
            let trial = if search.as_deref() == Some(self.search.as_str()) {
                trial
            } else {
                None
            };
            register_group(p.pgrp);
            self.orphans.push(Orphan {
                pid: p.pid,
                pgrp: p.pgrp,
                trial,
                sent: 0,
            });
        }
        self.orphans.retain(|o| seen.contains(&o.pid));
        procs
    }

    fn signal_job(&mut self, k: usize, sig: i32) {
        let trial = self.jobs[k].trial;
        signal_group(self.jobs[k].pgid, sig);
        for o in self.orphans.iter_mut().filter(|o| o.trial == Some(trial)) {
            o.signal(sig);
            o.sent = sig;
        }
    }

    /// Workers of a trial being stopped found since its last signal get it too.
    fn sweep_orphans(&mut self, k: usize) {
        let j = &self.jobs[k];
        let sig = if j.killed {
            libc::SIGKILL
        } else if j.term_sent.is_some() {
            libc::SIGTERM
        } else {
            return;
        };
        let trial = j.trial;
        for o in self.orphans.iter_mut().filter(|o| o.trial == Some(trial)) {
            if o.sent != sig {
                o.signal(sig);
                o.sent = sig;
            }
        }
    }
}

impl Launcher for Local {
    fn start(&mut self, spec: &JobSpec) -> Result<Value, LaunchError> {
        let io = |what: &str| {
            let what = format!("{what} for trial {}", spec.trial);
            move |source| LaunchError::Io { what, source }
        };
        let out = File::create(&spec.stdout).map_err(io("creating stdout.log"))?;
        let err = File::create(&spec.stderr).map_err(io("creating stderr.log"))?;
        let command = super::with_exec(spec.command.as_bytes())
            .map(OsString::from_vec)
            .unwrap_or_else(|| spec.command.clone());
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        cmd.env("EXPO_SEARCH", &self.search);
        let parent = self.me;
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // prctl(2) and getppid(2), which are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
                if libc::getppid() != parent {
                    // expo died before the request took effect.
                    return Err(std::io::Error::other("expo exited"));
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(io("starting the evaluator (sh -c)"))?;
        let pgid = child.id() as i32;
        register_group(pgid);
        let start_time = stat(pgid).map_or(0, |p| p.start_time);
        self.jobs.push(Job {
            trial: spec.trial,
            child,
            pgid,
            started: Instant::now(),
            term_sent: None,
            killed: false,
            timed_out: false,
            leader: None,
        });
        Ok(json!({"launcher": "local", "pgid": pgid, "start_time": start_time}))
    }

    fn poll(
        &mut self,
        timeout: Option<Duration>,
        kill_after: Duration,
    ) -> std::io::Result<Vec<(u64, Exit)>> {
        for j in &mut self.jobs {
            if j.leader.is_none() {
                j.leader = j.child.try_wait()?;
            }
        }
        for k in 0..self.jobs.len() {
            let j = &self.jobs[k];
            if let Some(t) = timeout {
                if j.term_sent.is_none() && j.leader.is_none() && j.started.elapsed() >= t {
                    self.jobs[k].timed_out = true;
                    self.terminate(self.jobs[k].trial);
                }
            }
        }
        let busy = self
            .jobs
            .iter()
            .any(|j| j.leader.is_some() || j.term_sent.is_some());
        if !busy && self.last_scan.is_some_and(|t| t.elapsed() < SCAN_EVERY) {
            return Ok(Vec::new());
        }
        let procs = self.rescan();
        let mut ended = Vec::new();
        let mut k = 0;
        while k < self.jobs.len() {
            let trial = self.jobs[k].trial;
            let pgid = self.jobs[k].pgid;
            let in_group = procs
                .iter()
                .any(|p| p.pgrp == pgid && p.live() && p.pid != pgid);
            let orphans = self.orphans.iter().any(|o| o.trial == Some(trial));
            let Some(status) = self.jobs[k].leader else {
                self.sweep_orphans(k);
                self.escalate(k, kill_after);
                k += 1;
                continue;
            };
            if in_group || orphans {
                // The leader is gone, workers are not: they get SIGTERM and the grace.
                if self.jobs[k].term_sent.is_none() {
                    self.jobs[k].term_sent = Some(Instant::now());
                    signal_group(pgid, libc::SIGTERM);
                }
                self.sweep_orphans(k);
                self.escalate(k, kill_after);
                k += 1;
                continue;
            }
            let j = self.jobs.remove(k);
            unregister_group(j.pgid);
            ended.push((
                trial,
                Exit {
                    code: status.code(),
                    signal: status.signal(),
                    seconds: j.started.elapsed().as_secs_f64(),
                    timed_out: j.timed_out,
                    cluster: None,
                    fatal: false,
                },
            ));
        }
        Ok(ended)
    }

    fn terminate(&mut self, trial: u64) {
        if let Some(k) = self.jobs.iter().position(|j| j.trial == trial) {
            if self.jobs[k].term_sent.is_none() {
                self.signal_job(k, libc::SIGTERM);
                self.jobs[k].term_sent = Some(Instant::now());
            }
        }
    }

    fn kill_all(&mut self) {
        for k in 0..self.jobs.len() {
            self.signal_job(k, libc::SIGKILL);
            self.jobs[k].killed = true;
            if self.jobs[k].term_sent.is_none() {
                self.jobs[k].term_sent = Some(Instant::now());
            }
        }
    }

    fn recover(
        &mut self,
        records: &[(u64, Value)],
        kill_after: Duration,
        reporter: &dyn Reporter,
    ) -> anyhow::Result<()> {
        let procs = scan();
        // What is still alive of an earlier run: recorded groups whose leader is gone or is
        // the very process recorded (same start time), and any process tagged with this
        // search (a worker that left its group and was reparented to init).
        let mut groups: Vec<(u64, i32)> = Vec::new();
        for (trial, r) in records {
            if r["launcher"] != "local" {
                continue;
            }
            let (Some(pgid), Some(start)) = (r["pgid"].as_i64(), r["start_time"].as_u64()) else {
                continue;
            };
            let pgid = pgid as i32;
            let alive = procs.iter().any(|p| p.pgrp == pgid && p.live());
            let same = match procs.iter().find(|p| p.pid == pgid) {
                Some(leader) => leader.start_time == start,
                // A pid is not reused while a group of that number exists.
                None => true,
            };
            if alive && same && !groups.iter().any(|(_, g)| *g == pgid) {
                groups.push((*trial, pgid));
            }
        }
        let mut tagged: Vec<(Option<u64>, i32)> = Vec::new();
        for p in procs.iter().filter(|p| p.live() && p.pid != self.me) {
            if groups.iter().any(|(_, g)| *g == p.pgrp) {
                continue;
            }
            let (search, trial) = tags(p.pid);
            if search.as_deref() == Some(self.search.as_str()) {
                tagged.push((trial, p.pid));
            }
        }
        if groups.is_empty() && tagged.is_empty() {
            return Ok(());
        }
        let mut names: Vec<String> = groups
            .iter()
            .map(|(t, g)| format!("trial {t} (process group {g})"))
            .collect();
        names.extend(tagged.iter().map(|(t, p)| match t {
            Some(t) => format!("trial {t} (process {p})"),
            None => format!("process {p}"),
        }));
        reporter.warn(format!(
            "evaluators of the earlier run of this search are still running: {}; stopping them (SIGTERM, SIGKILL after --kill-after) before anything is evaluated, built or deleted",
            names.join(", ")
        ));
        let send = |sig: i32| {
            for (_, g) in &groups {
                signal_group(*g, sig);
            }
            for (_, p) in &tagged {
                signal_pid(*p, sig);
            }
        };
        let gone = || {
            let procs = scan();
            !procs.iter().any(|p| {
                p.live()
                    && (groups.iter().any(|(_, g)| *g == p.pgrp)
                        || tagged.iter().any(|(_, t)| *t == p.pid))
            })
        };
        send(libc::SIGTERM);
        let t0 = Instant::now();
        while !gone() && t0.elapsed() < kill_after {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !gone() {
            send(libc::SIGKILL);
            let t1 = Instant::now();
            while !gone() && t1.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if !gone() {
            anyhow::bail!(
                "--resume: evaluators of the earlier run of this search survive SIGKILL: {}; their candidates may still be read, so nothing was started; wait for them to end and resume again",
                names.join(", ")
            );
        }
        Ok(())
    }
}

impl Local {
    fn escalate(&mut self, k: usize, kill_after: Duration) {
        let j = &self.jobs[k];
        if !j.killed && j.term_sent.is_some_and(|t| t.elapsed() >= kill_after) {
            self.signal_job(k, libc::SIGKILL);
            self.jobs[k].killed = true;
        }
    }
}

impl Drop for Local {
    /// Nothing outlives the search: whatever is left is killed.
    fn drop(&mut self) {
        for j in &self.jobs {
            signal_group(j.pgid, libc::SIGKILL);
            unregister_group(j.pgid);
        }
        for o in &self.orphans {
            o.signal(libc::SIGKILL);
        }
    }
}
