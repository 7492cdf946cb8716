//! Launchers: how a trial's evaluator is started, followed and stopped.
//!
//! A [`Launcher`] owns every running evaluator of a search. The search loop calls
//! [`Launcher::poll`] once per iteration; it refreshes what it knows of all jobs at once (one
//! scan of `/proc` for the local launcher, one `squeue` for Slurm), applies the timeout
//! (counted from when a job *runs*, never from when it was queued), escalates a SIGTERM to a
//! hard kill after `--kill-after`, and returns the jobs that ended. [`Launcher::start`]
//! returns what the ledger records to find a job again after expo itself was killed
//! ([`Launcher::recover`] on `--resume`).
//!
//! - [`local::Local`]: `sh -c COMMAND` in its own process group on this machine;
//! - [`slurm::Slurm`]: one `sbatch` job per trial.

pub mod local;
pub mod slurm;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::reporter::Reporter;

/// What a trial's evaluator is.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub trial: u64,
    /// The shell command, placeholders filled.
    pub command: OsString,
    /// Added to the environment (EXPO_ALPHA …).
    pub env: Vec<(String, OsString)>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// The trial's work directory (the Slurm job script is written there).
    pub workdir: PathBuf,
    /// A name tagged with the search's id and the trial (`expo-ID-N`).
    pub name: String,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    /// The exit code, or `None` when killed by a signal.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Running time (queue time excluded).
    pub seconds: f64,
    pub timed_out: bool,
    /// The cluster, not the evaluator, ended the job (node failure, preemption, a
    /// cancellation by someone else, queue wait over its bound): not a failure of α.
    pub cluster: Option<String>,
    /// The cluster's failure stops the search (a queue wait over `--queue-timeout`).
    pub fatal: bool,
}

/// Where a job is.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Waiting in a queue, with the scheduler's reason.
    Queued(String),
    Running,
}

/// Why a job could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The scheduler refused the submission (bad partition, impossible request): the search
    /// stops at once with its message.
    #[error("Slurm refused the job of trial {trial}: {message}")]
    Refused { trial: u64, message: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Starts, follows and stops a search's evaluators.
pub trait Launcher {
    /// Starts the evaluator of `spec.trial`; the fields the ledger records in its `job` event
    /// to find it again.
    fn start(&mut self, spec: &JobSpec) -> Result<Value, LaunchError>;

    /// One refresh of every job: applies `timeout` (running time) and `kill_after`, and
    /// returns the jobs that ended, by trial number. A job has ended only when nothing of it
    /// runs any more (no process of its group, no job in the queue).
    fn poll(
        &mut self,
        timeout: Option<Duration>,
        kill_after: Duration,
    ) -> std::io::Result<Vec<(u64, Exit)>>;

    /// Asks the job of `trial` to stop (SIGTERM, or `scancel --signal=TERM`); the next polls
    /// hard-kill it once `kill_after` has passed.
    fn terminate(&mut self, trial: u64);

    /// Hard-kills every job now (a second Ctrl-C, an error while stopping).
    fn kill_all(&mut self);

    /// Where the job of `trial` is, when the launcher knows more than "running".
    fn phase(&self, _trial: u64) -> Option<Phase> {
        None
    }

    /// How long to wait between polls.
    fn interval(&self) -> Duration {
        Duration::from_millis(20)
    }

    /// `--resume`: stops the jobs of an earlier run of this search that are still alive
    /// (found by the ledger's `job` records, or by the search's tag), and waits until they
    /// are gone, so that no candidate is deleted or rebuilt under them. An error names the
    /// ones that could not be stopped.
    fn recover(
        &mut self,
        records: &[(u64, Value)],
        kill_after: Duration,
        reporter: &dyn Reporter,
    ) -> anyhow::Result<()>;
}

/// A search's id: a short hash of its resolved run directory, so that a resumed run (from any
/// working directory) has the same one.
pub fn search_id(run: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let p = std::fs::canonicalize(run).unwrap_or_else(|_| run.to_path_buf());
    let mut h: u64 = 0xcbf29ce484222325;
    for b in p.as_os_str().as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{:08x}", (h >> 32) as u32 ^ h as u32)
}

/// The job name of a trial: `expo-ID-N`.
pub fn job_name(id: &str, trial: u64) -> String {
    format!("expo-{id}-{trial}")
}

/// `COMMAND` as the shell should run it: a simple command (words, quoted strings and leading
/// `NAME=value` assignments; no operator, redirection, expansion or compound command) gets
/// `exec`, so that the evaluator itself is the process expo started and receives its signals,
/// instead of a shell that dies at SIGTERM while the evaluator lives on.
pub fn with_exec(command: &[u8]) -> Option<Vec<u8>> {
    const NOT_EXTERNAL: [&str; 40] = [
        "!", "{", "}", "[[", "case", "do", "done", "elif", "else", "esac", "fi", "for", "function",
        "if", "in", "select", "then", "time", "until", "while", ".", ":", "alias", "break",
        "builtin", "cd", "command", "continue", "eval", "exec", "exit", "export", "local", "read",
        "readonly", "return", "set", "shift", "source", "trap",
    ];
    let mut words: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut cur: Option<(usize, Vec<u8>)> = None;
    let mut quote: Option<u8> = None;
    let mut escaped = false;
    for (i, &c) in command.iter().enumerate() {
        if escaped {
            escaped = false;
            cur.get_or_insert((i, Vec::new())).1.push(b'q');
            continue;
        }
        match quote {
            Some(b'\'') => {
                if c == b'\'' {
                    quote = None;
                }
                continue;
            }
            Some(_) => {
                match c {
                    b'"' => quote = None,
                    b'$' | b'`' | b'\\' => return None,
                    _ => {}
                }
                continue;
            }
            None => {}
        }
        match c {
            b' ' | b'\t' => {
                if let Some(w) = cur.take() {
                    words.push(w);
                }
            }
            b'\\' => {
                escaped = true;
                cur.get_or_insert((i, Vec::new())).1.push(b'q');
            }
            b'\'' | b'"' => {
                quote = Some(c);
                cur.get_or_insert((i, Vec::new())).1.push(b'q');
            }
            b';' | b'&' | b'|' | b'<' | b'>' | b'(' | b')' | b'$' | b'`' | b'\n' | b'#' | b'*'
            | b'?' | b'[' | b'~' | b'{' | b'}' => return None,
            _ => cur.get_or_insert((i, Vec::new())).1.push(c),
        }
    }
    if quote.is_some() || escaped {
        return None;
    }
    if let Some(w) = cur.take() {
        words.push(w);
    }
    let is_assignment = |w: &[u8]| {
        w.iter().position(|&b| b == b'=').is_some_and(|eq| {
            eq > 0
                && !w[0].is_ascii_digit()
                && w[..eq]
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'_')
        })
    };
    let (at, first) = words.iter().find(|(_, w)| !is_assignment(w))?;
    if NOT_EXTERNAL
        .iter()
        .any(|k| k.as_bytes() == first.as_slice())
    {
        return None;
    }
    let mut out = command[..*at].to_vec();
    out.extend_from_slice(b"exec ");
    out.extend_from_slice(&command[*at..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(s: &str) -> Option<String> {
        with_exec(s.as_bytes()).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn simple_commands_get_exec() {
        assert_eq!(
            ex("./eval.sh '/a b/c'").as_deref(),
            Some("exec ./eval.sh '/a b/c'")
        );
        assert_eq!(
            ex("CUDA_VISIBLE_DEVICES=1 python e.py 'it'\\''s'").as_deref(),
            Some("CUDA_VISIBLE_DEVICES=1 exec python e.py 'it'\\''s'")
        );
        assert_eq!(
            ex("CUDA_VISIBLE_DEVICES=1 python e.py --x=2").as_deref(),
            Some("CUDA_VISIBLE_DEVICES=1 exec python e.py --x=2")
        );
        assert_eq!(ex("a; b"), None);
        assert_eq!(ex("a && b"), None);
        assert_eq!(ex("a > f"), None);
        assert_eq!(ex("echo $HOME"), None);
        assert_eq!(ex("exit 3"), None);
        assert_eq!(ex("cd x"), None);
        assert_eq!(ex("A=1"), None);
        assert_eq!(ex("while :; do x; done"), None);
        assert_eq!(ex("x \"a $b\""), None);
        assert_eq!(ex("x \"a b\"").as_deref(), Some("exec x \"a b\""));
    }

    #[test]
    fn names_carry_the_search_and_the_trial() {
        let id = search_id(std::path::Path::new("/nonexistent/run"));
        assert_eq!(id.len(), 8);
        assert_eq!(job_name(&id, 7), format!("expo-{id}-7"));
    }
}
