//! RUN/ledger.jsonl: the search as an append-only log of JSON lines (`header`, `start`,
//! `job`, `end`, `delete`, `done`), each fsynced, written by one process at a time (flock).
//! Resuming a search is replaying it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::rule::Lat;

/// The ledger's file name in the run directory.
pub const NAME: &str = "ledger.jsonl";

/// Header fields a resumed search must keep (they decide which candidates are built, how
/// they are scored, or what the rule proposes), with the flag that sets each.
pub const FIXED: [(&str, &str); 13] = [
    ("sft", "--sft"),
    ("aligned", "--aligned"),
    ("rules", "--skip/--alpha-for"),
    ("dtype", "--dtype"),
    ("max_shard_size", "--max-shard-size"),
    ("eval", "--eval"),
    ("score_json", "--score-json"),
    ("score_file", "--score-file"),
    ("minimize", "--minimize"),
    ("tie", "--tie"),
    ("alpha", "--alpha"),
    ("resolution", "--resolution"),
    ("output", "--output"),
];

/// What can go wrong with the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is in use by another expo search (it is locked); wait for it or choose another --run")]
    Locked { path: PathBuf },
    #[error(
        "{path}: line {line} is not a ledger event ({reason}); the file was edited or damaged"
    )]
    Corrupt {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("--resume: {flag} differs from the search recorded in {path} (was {was}, now {now}); resume with the same value, or start a new search with another --run")]
    Changed {
        path: PathBuf,
        flag: &'static str,
        was: String,
        now: String,
    },
}

/// How a trial ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Ok,
    Unusable,
    Failed,
    Interrupted,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Ok => "ok",
            State::Unusable => "unusable",
            State::Failed => "failed",
            State::Interrupted => "interrupted",
        }
    }

    fn parse(s: &str) -> Option<State> {
        Some(match s {
            "ok" => State::Ok,
            "unusable" => State::Unusable,
            "failed" => State::Failed,
            "interrupted" => State::Interrupted,
            _ => return None,
        })
    }
}

/// The end of a trial.
#[derive(Debug, Clone)]
pub struct End {
    pub state: State,
    pub score: Option<f64>,
    pub exit: Option<i32>,
    pub seconds: f64,
    pub json: Option<Value>,
}

/// One trial as the ledger records it.
#[derive(Debug, Clone)]
pub struct Trial {
    pub trial: u64,
    pub alpha: Lat,
    pub slot: usize,
    pub output: PathBuf,
    /// The candidate was built by expo for this search (so expo may delete it).
    pub created: bool,
    pub end: Option<End>,
}

/// The replayed ledger.
#[derive(Debug, Default)]
pub struct Replay {
    pub header: Option<Value>,
    pub trials: Vec<Trial>,
    /// Candidates deleted so far.
    pub deleted: Vec<PathBuf>,
    /// A last line cut short by a crash, ignored.
    pub torn_tail: bool,
    /// Each `job` event (how to find a trial's evaluator again), by trial.
    pub jobs: Vec<(u64, Value)>,
}

/// The open ledger, locked for this process.
#[derive(Debug)]
pub struct Ledger {
    file: File,
    pub path: PathBuf,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> LedgerError + '_ {
    move |source| LedgerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Ledger {
    /// Opens (creating it if needed) and locks `RUN/ledger.jsonl`.
    pub fn open(run: &Path) -> Result<Ledger, LedgerError> {
        let path = run.join(NAME);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(io(&path))?;
        // SAFETY: flock(2) on a descriptor this File owns for its whole lifetime.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(LedgerError::Locked { path });
        }
        Ok(Ledger { file, path })
    }

    /// Appends one event and syncs it to disk.
    pub fn append(&mut self, event: &Value) -> Result<(), LedgerError> {
        let mut line = event.to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(io(&self.path))
    }

    /// Ends a line cut short by a crash, so that the next event starts a line of its own.
    pub fn append_raw_newline(&mut self) -> Result<(), LedgerError> {
        self.file
            .write_all(b"\n")
            .and_then(|()| self.file.sync_data())
            .map_err(io(&self.path))
    }

    /// Reads back every event.
    pub fn replay(&self) -> Result<Replay, LedgerError> {
        let text = std::fs::read(&self.path).map_err(io(&self.path))?;
        parse(&self.path, &text)
    }
}

fn corrupt(path: &Path, line: usize, reason: impl Into<String>) -> LedgerError {
    LedgerError::Corrupt {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

/// Parses the ledger's bytes.
pub fn parse(path: &Path, text: &[u8]) -> Result<Replay, LedgerError> {
    let mut r = Replay::default();
    let complete = text.last().is_none_or(|b| *b == b'\n');
    let lines: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
    let n = lines.len();
    for (k, raw) in lines.into_iter().enumerate() {
        let lineno = k + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let v: Value = match serde_json::from_slice(raw) {
            Ok(v) => v,
            // The last line of a ledger whose writer was killed mid-line.
            Err(_) if k + 1 == n && !complete => {
                r.torn_tail = true;
                continue;
            }
            Err(e) => return Err(corrupt(path, lineno, e.to_string())),
        };
        let event = v["event"].as_str().unwrap_or("");
        match event {
            "header" => {
                if r.header.is_none() {
                    r.header = Some(v);
                }
            }
            "start" => {
                let trial = v["trial"]
                    .as_u64()
                    .ok_or_else(|| corrupt(path, lineno, "no trial number"))?;
                let alpha = v["alpha"]
                    .as_f64()
                    .and_then(Lat::from_f64)
                    .ok_or_else(|| corrupt(path, lineno, "no alpha"))?;
                let slot = v["slot"].as_u64().unwrap_or(0) as usize;
                let output = PathBuf::from(v["output"].as_str().unwrap_or(""));
                let created = v["created"].as_bool().unwrap_or(false);
                r.trials.retain(|t| t.trial != trial);
                r.trials.push(Trial {
                    trial,
                    alpha,
                    slot,
                    output,
                    created,
                    end: None,
                });
            }
            "end" => {
                let trial = v["trial"]
                    .as_u64()
                    .ok_or_else(|| corrupt(path, lineno, "no trial number"))?;
                let state = v["state"]
                    .as_str()
                    .and_then(State::parse)
                    .ok_or_else(|| corrupt(path, lineno, "no state"))?;
                let Some(t) = r.trials.iter_mut().find(|t| t.trial == trial) else {
                    return Err(corrupt(
                        path,
                        lineno,
                        format!("trial {trial} never started"),
                    ));
                };
                t.end = Some(End {
                    state,
                    score: v["score"].as_f64(),
                    exit: v["exit"].as_i64().map(|c| c as i32),
                    seconds: v["seconds"].as_f64().unwrap_or(0.0),
                    json: v.get("json").cloned().filter(|j| !j.is_null()),
                });
            }
            "delete" => {
                if let Some(p) = v["output"].as_str() {
                    r.deleted.push(PathBuf::from(p));
                }
            }
            "job" => {
                if let Some(trial) = v["trial"].as_u64() {
                    r.jobs.push((trial, v));
                }
            }
            "done" => {}
            other => return Err(corrupt(path, lineno, format!("unknown event `{other}`"))),
        }
    }
    Ok(r)
}

/// Refuses a resumed search whose fixed settings differ from the recorded header.
pub fn check_header(path: &Path, was: &Value, now: &Value) -> Result<(), LedgerError> {
    for (key, flag) in FIXED {
        let (a, b) = (&was[key], &now[key]);
        if a != b {
            return Err(LedgerError::Changed {
                path: path.to_path_buf(),
                flag,
                was: short(a),
                now: short(b),
            });
        }
    }
    Ok(())
}

fn short(v: &Value) -> String {
    let s = match v {
        Value::Null => "unset".to_string(),
        Value::String(s) => format!("`{s}`"),
        other => other.to_string(),
    };
    if s.chars().count() > 120 {
        format!("{}…", s.chars().take(120).collect::<String>())
    } else {
        s
    }
}

/// A `start` event.
pub fn start_event(t: &Trial) -> Value {
    json!({
        "event": "start",
        "trial": t.trial,
        "alpha": t.alpha.to_f64(),
        "slot": t.slot,
        "output": t.output,
        "created": t.created,
    })
}

/// An `end` event.
pub fn end_event(t: &Trial, e: &End) -> Value {
    json!({
        "event": "end",
        "trial": t.trial,
        "alpha": t.alpha.to_f64(),
        "slot": t.slot,
        "output": t.output,
        "state": e.state.name(),
        "score": e.score,
        "exit": e.exit,
        "seconds": e.seconds,
        "json": e.json,
    })
}

/// A fingerprint of a checkpoint's weight files: names, sizes and modification times.
pub fn fingerprint(ck: &crate::checkpoint::Checkpoint) -> String {
    use std::os::unix::fs::MetadataExt;
    let mut h: u64 = 0xcbf29ce484222325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100000001b3);
        }
    };
    for s in &ck.shards {
        feed(s.name.as_bytes());
        if let Ok(m) = std::fs::metadata(&s.path) {
            feed(&m.len().to_le_bytes());
            feed(&m.mtime().to_le_bytes());
            feed(&m.mtime_nsec().to_le_bytes());
        }
        feed(b"\n");
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_events_and_ignores_a_torn_tail() {
        let text = br#"{"event":"header","eval":"x"}
{"event":"start","trial":1,"alpha":0.3,"slot":0,"output":"r/alpha-0.3","created":true}
{"event":"end","trial":1,"state":"ok","score":0.5,"exit":0,"seconds":1.5}
{"event":"start","trial":2,"alpha":0.4,"slot":0,"output":"r/alpha-0.4","created":true}
{"event":"delete","output":"r/alpha-0.4"}
{"event":"end","tri"#;
        let r = parse(Path::new("l"), text).unwrap();
        assert!(r.torn_tail);
        assert_eq!(r.trials.len(), 2);
        assert_eq!(r.trials[0].end.as_ref().unwrap().score, Some(0.5));
        assert!(r.trials[1].end.is_none());
        assert_eq!(r.deleted, vec![PathBuf::from("r/alpha-0.4")]);
    }

    #[test]
    fn a_damaged_middle_line_is_an_error() {
        let text = b"{\"event\":\"header\"}\nxx\n{\"event\":\"done\"}\n";
        assert!(matches!(
            parse(Path::new("l"), text),
            Err(LedgerError::Corrupt { line: 2, .. })
        ));
        let text = b"{\"event\":\"end\",\"trial\":3,\"state\":\"ok\"}\n";
        assert!(parse(Path::new("l"), text).is_err());
    }

    #[test]
    fn changed_fields_are_named() {
        let was = json!({"eval": "a {alpha}", "jobs": 1});
        let now = json!({"eval": "b {alpha}", "jobs": 2});
        let err = check_header(Path::new("r/ledger.jsonl"), &was, &now).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("--eval") && msg.contains("`a {alpha}`"),
            "{msg}"
        );
        let now = json!({"eval": "a {alpha}", "jobs": 2});
        check_header(Path::new("l"), &was, &now).unwrap();
    }

    #[test]
    fn the_lock_excludes_a_second_writer() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Ledger::open(dir.path()).unwrap();
        assert!(matches!(
            Ledger::open(dir.path()),
            Err(LedgerError::Locked { .. })
        ));
        a.append(&json!({"event": "done"})).unwrap();
        assert!(a.replay().unwrap().trials.is_empty());
        drop(a);
        Ledger::open(dir.path()).unwrap();
    }
}
