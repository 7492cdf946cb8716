//! RUN/ledger.jsonl: the search as an append-only log of JSON lines (`header`, `start`,
//! `built`, `job`, `end`, `deleting`, `delete`, `done`), each fsynced, written by one process
//! at a time (flock), never after a torn line. Resuming a search is replaying it. Paths are
//! written as [`crate::text::path_string`] does (`\xNN` for bytes that are not UTF-8).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::rule::Lat;
use crate::sys::FileId;
use crate::text::{path_from_json, path_json};

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
    #[error("{path} holds {len} bytes, more than a search ledger ever does ({limit}); it is not expo's, or it was damaged: choose another --run")]
    TooLarge { path: PathBuf, len: u64, limit: u64 },
    #[error("{path}: an earlier write failed and its partial line could not be removed, so nothing more is written; free space, then --resume")]
    Unwritable { path: PathBuf },
    #[error(
        "{path}: line {line} is not a ledger event ({reason}); the file was edited or damaged"
    )]
    Corrupt {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("--resume: {file} of {flag} changed since the search recorded in {path} started; a search must not mix candidates of both versions: restore it, or start a new search with another --run")]
    FileChanged {
        path: PathBuf,
        flag: &'static str,
        file: String,
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

impl End {
    /// The end of a trial that did not run to its end (expo stopped it, or it never
    /// started): it runs again on `--resume`.
    pub fn interrupted() -> End {
        End {
            state: State::Interrupted,
            score: None,
            exit: None,
            seconds: 0.0,
            json: None,
        }
    }
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
    /// Candidates built, with the identity of the directory expo made (`built` events).
    pub built: Vec<(PathBuf, FileId)>,
    /// Candidates whose deletion started (`deleting` events; a `delete` event ends it).
    pub deleting: Vec<PathBuf>,
    /// Candidates a trial started to build (`start` with `created`) with no later `built`,
    /// `deleting` or `delete` event: expo was killed between building and recording them.
    pub unconfirmed: Vec<PathBuf>,
    /// A last line cut short by a crash, ignored.
    pub torn_tail: bool,
    /// Damaged lines (not JSON) followed by valid events, ignored: their line numbers.
    pub damaged: Vec<usize>,
    /// Each `job` event (how to find a trial's evaluator again), by trial.
    pub jobs: Vec<(u64, Value)>,
}

/// The open ledger, locked for this process.
#[derive(Debug)]
pub struct Ledger {
    file: File,
    pub path: PathBuf,
    /// The length of the file up to its last complete line: where the next event goes.
    good_len: u64,
    /// A failed append left a partial line that could not be cut: nothing more is written.
    broken: bool,
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
        let text = read_all(&file, &path)?;
        let good_len = text.iter().rposition(|b| *b == b'\n').map_or(0, |k| k + 1) as u64;
        Ok(Ledger {
            file,
            path,
            good_len,
            broken: false,
        })
    }

    /// Appends one event and syncs it to disk.
    pub fn append(&mut self, event: &Value) -> Result<(), LedgerError> {
        let mut line = event.to_string();
        line.push('\n');
        self.append_with(line.as_bytes(), |f, b| f.write_all(b))
    }

    /// Appends `bytes` (whole lines) with `write`. When it fails (a full disk), the file is
    /// cut back to its last complete line, so that no later event ever follows a torn one;
    /// if even that fails, nothing more is appended.
    fn append_with(
        &mut self,
        bytes: &[u8],
        write: impl FnOnce(&mut File, &[u8]) -> std::io::Result<()>,
    ) -> Result<(), LedgerError> {
        if self.broken {
            return Err(LedgerError::Unwritable {
                path: self.path.clone(),
            });
        }
        match write(&mut self.file, bytes).and_then(|()| self.file.sync_data()) {
            Ok(()) => {
                self.good_len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                let cut = self
                    .file
                    .set_len(self.good_len)
                    .and_then(|()| self.file.sync_data());
                if cut.is_err() {
                    self.broken = true;
                }
                Err(io(&self.path)(e))
            }
        }
    }

    /// Removes a last line cut short by a crash, so that the next event starts a line of
    /// its own right after the last complete one.
    pub fn drop_torn_tail(&mut self) -> Result<(), LedgerError> {
        self.file
            .set_len(self.good_len)
            .and_then(|()| self.file.sync_data())
            .map_err(io(&self.path))
    }

    /// Reads back every event.
    pub fn replay(&self) -> Result<Replay, LedgerError> {
        let text = read_all(&self.file, &self.path)?;
        parse(&self.path, &text)
    }
}

/// The most a ledger may hold: thousands of trials take a few megabytes; a larger file is
/// not one expo wrote, and is refused before it is read.
pub const MAX_LEDGER_BYTES: u64 = 256 << 20;
/// The longest line expo writes (an `end` event keeps at most a 64 KiB score document).
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// The highest evaluator slot a ledger may name (`--jobs` is a u16).
const MAX_SLOT: usize = u16::MAX as usize;

/// Reads the whole ledger through the locked descriptor, refusing one over
/// [`MAX_LEDGER_BYTES`].
fn read_all(file: &File, path: &Path) -> Result<Vec<u8>, LedgerError> {
    use std::io::{Read, Seek};
    let len = file.metadata().map_err(io(path))?.len();
    if len > MAX_LEDGER_BYTES {
        return Err(LedgerError::TooLarge {
            path: path.to_path_buf(),
            len,
            limit: MAX_LEDGER_BYTES,
        });
    }
    let mut f = file;
    f.seek(std::io::SeekFrom::Start(0)).map_err(io(path))?;
    let mut text = Vec::with_capacity(len as usize);
    f.take(MAX_LEDGER_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(io(path))?;
    if text.len() as u64 > MAX_LEDGER_BYTES {
        return Err(LedgerError::TooLarge {
            path: path.to_path_buf(),
            len: text.len() as u64,
            limit: MAX_LEDGER_BYTES,
        });
    }
    Ok(text)
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
        // The last line of a ledger whose writer was killed mid-line (expo writes each
        // event with its newline).
        if k + 1 == n && !complete {
            r.torn_tail = true;
            continue;
        }
        if raw.len() > MAX_LINE_BYTES {
            return Err(corrupt(
                path,
                lineno,
                format!(
                    "the line holds {} bytes, more than expo ever writes",
                    raw.len()
                ),
            ));
        }
        match serde_json::from_slice::<Value>(raw) {
            Ok(v) => apply(&mut r, path, lineno, v)?,
            // A line torn by a failed write, followed by later events (older versions
            // appended after it): ignored, and reported.
            Err(_) => r.damaged.push(lineno),
        }
    }
    Ok(r)
}

/// Applies one event to the replay.
fn apply(r: &mut Replay, path: &Path, lineno: usize, v: Value) -> Result<(), LedgerError> {
    match v["event"].as_str().unwrap_or("") {
        "header" => {
            if r.header.is_none() {
                r.header = Some(v);
            }
        }
        "start" => apply_start(r, path, lineno, &v)?,
        "end" => apply_end(r, path, lineno, &v)?,
        "delete" => {
            if let Some(p) = v["output"].as_str() {
                let p = path_from_json(p);
                r.unconfirmed.retain(|d| *d != p);
                r.deleting.retain(|d| *d != p);
                r.built.retain(|(b, _)| *b != p);
                r.deleted.push(p);
            }
        }
        "deleting" => {
            if let Some(p) = v["output"].as_str() {
                let p = path_from_json(p);
                r.unconfirmed.retain(|d| *d != p);
                r.deleting.push(p);
            }
        }
        "built" => apply_built(r, path, lineno, &v)?,
        "job" => {
            if let Some(trial) = v["trial"].as_u64() {
                r.jobs.push((trial, v));
            }
        }
        "done" => {}
        other => return Err(corrupt(path, lineno, format!("unknown event `{other}`"))),
    }
    Ok(())
}

/// A `start` event: a trial begins (again, if it was interrupted).
fn apply_start(r: &mut Replay, path: &Path, lineno: usize, v: &Value) -> Result<(), LedgerError> {
    let trial = v["trial"]
        .as_u64()
        .ok_or_else(|| corrupt(path, lineno, "no trial number"))?;
    let alpha = v["alpha"]
        .as_f64()
        .and_then(Lat::from_f64)
        .ok_or_else(|| corrupt(path, lineno, "no alpha"))?;
    let slot = match v["slot"].as_u64() {
        None => 0,
        Some(s) => usize::try_from(s)
            .ok()
            .filter(|&s| s <= MAX_SLOT)
            .ok_or_else(|| corrupt(path, lineno, format!("slot {s} is out of range")))?,
    };
    let output = path_from_json(v["output"].as_str().unwrap_or(""));
    let created = v["created"].as_bool().unwrap_or(false);
    if created {
        r.unconfirmed.retain(|p| *p != output);
        if !r.built.iter().any(|(b, _)| *b == output) {
            r.unconfirmed.push(output.clone());
        }
    }
    r.trials.retain(|t| t.trial != trial);
    r.trials.push(Trial {
        trial,
        alpha,
        slot,
        output,
        created,
        end: None,
    });
    Ok(())
}

/// An `end` event: how a started trial ended.
fn apply_end(r: &mut Replay, path: &Path, lineno: usize, v: &Value) -> Result<(), LedgerError> {
    let trial = v["trial"]
        .as_u64()
        .ok_or_else(|| corrupt(path, lineno, "no trial number"))?;
    let state = v["state"]
        .as_str()
        .and_then(State::parse)
        .ok_or_else(|| corrupt(path, lineno, "no state"))?;
    let exit = match v["exit"].as_i64() {
        None => None,
        Some(c) => Some(
            i32::try_from(c)
                .map_err(|_| corrupt(path, lineno, format!("exit code {c} is out of range")))?,
        ),
    };
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
        exit,
        seconds: v["seconds"].as_f64().unwrap_or(0.0),
        json: v.get("json").cloned().filter(|j| !j.is_null()),
    });
    Ok(())
}

/// A `built` event: a candidate this search built, with the identity of its directory.
fn apply_built(r: &mut Replay, path: &Path, lineno: usize, v: &Value) -> Result<(), LedgerError> {
    let (Some(p), Some(dev), Some(ino)) =
        (v["output"].as_str(), v["dev"].as_u64(), v["ino"].as_u64())
    else {
        return Err(corrupt(
            path,
            lineno,
            "a built event without output, dev, ino",
        ));
    };
    let p = path_from_json(p);
    r.unconfirmed.retain(|d| *d != p);
    r.built.retain(|(b, _)| *b != p);
    r.deleting.retain(|d| *d != p);
    r.built.push((p, FileId { dev, ino }));
    Ok(())
}

/// Refuses a resumed search whose fixed settings differ from the recorded header.
pub fn check_header(path: &Path, was: &Value, now: &Value) -> Result<(), LedgerError> {
    for (key, flag) in [("sft", "--sft"), ("aligned", "--aligned")] {
        let (a, b) = (&was[key]["files"], &now[key]["files"]);
        // A ledger of an older expo has no `files`.
        if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
            for (file, hash) in a {
                if b.get(file) != Some(hash) {
                    return Err(LedgerError::FileChanged {
                        path: path.to_path_buf(),
                        flag,
                        file: file.clone(),
                    });
                }
            }
        }
    }
    for (key, flag) in FIXED {
        let (mut a, mut b) = (was[key].clone(), now[key].clone());
        if let (Some(a), Some(b)) = (a.as_object_mut(), b.as_object_mut()) {
            a.remove("files");
            b.remove("files");
        }
        let (a, b) = (&a, &b);
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
        "output": path_json(&t.output),
        "created": t.created,
    })
}

/// A `built` event: the candidate at `output` is the directory `id`.
pub fn built_event(output: &Path, id: FileId) -> Value {
    json!({"event": "built", "output": path_json(output), "dev": id.dev, "ino": id.ino})
}

/// An `end` event.
pub fn end_event(t: &Trial, e: &End) -> Value {
    json!({
        "event": "end",
        "trial": t.trial,
        "alpha": t.alpha.to_f64(),
        "slot": t.slot,
        "output": path_json(&t.output),
        "state": e.state.name(),
        "score": e.score,
        "exit": e.exit,
        "seconds": e.seconds,
        "json": e.json,
    })
}

/// The small files that define a model besides its weights: a change in any of them makes
/// other candidates (an adapter's `lora_alpha`, a model's `config.json`).
pub const DEFINING_FILES: [&str; 2] = ["config.json", "adapter_config.json"];

/// Largest defining file hashed (larger ones are recorded by size only).
const MAX_DEFINING_BYTES: u64 = 16 << 20;

/// A hash of each of [`DEFINING_FILES`] in `dir` (`null` when absent), by name.
pub fn defining_files(dir: &Path) -> Value {
    let mut files = serde_json::Map::new();
    for name in DEFINING_FILES {
        let p = dir.join(name);
        let v = match std::fs::metadata(&p) {
            Ok(m) if m.is_file() && m.len() <= MAX_DEFINING_BYTES => match std::fs::read(&p) {
                Ok(bytes) => Value::String(format!("fnv1a64:{:016x}", fnv1a(&bytes))),
                Err(_) => Value::String("unreadable".into()),
            },
            Ok(m) => Value::String(format!("size:{}", m.len())),
            Err(_) => Value::Null,
        };
        files.insert(name.to_string(), v);
    }
    Value::Object(files)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_feed(0xcbf29ce484222325, bytes)
}

/// FNV-1a over `bytes`, continuing from the hash `h`.
fn fnv1a_feed(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// A fingerprint of a checkpoint's weight files: names, sizes and modification times.
pub fn fingerprint(ck: &crate::checkpoint::Checkpoint) -> String {
    use std::os::unix::fs::MetadataExt;
    let mut h: u64 = 0xcbf29ce484222325;
    let mut feed = |bytes: &[u8]| h = fnv1a_feed(h, bytes);
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
    fn a_damaged_middle_line_is_reported_and_an_unknown_end_is_an_error() {
        let text = b"{\"event\":\"header\"}\nxx\n{\"event\":\"done\"}\n";
        assert_eq!(parse(Path::new("l"), text).unwrap().damaged, [2]);
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
    fn a_failed_append_is_cut_back_so_that_no_event_follows_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(dir.path()).unwrap();
        l.append(&json!({"event": "header"})).unwrap();
        let full = l.append_with(b"{\"event\":\"done\"}\n", |f, b| {
            f.write_all(&b[..5])?;
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
        });
        assert!(full.is_err());
        l.append(&json!({"event": "delete", "output": "x"}))
            .unwrap();
        let text = std::fs::read_to_string(&l.path).unwrap();
        assert_eq!(
            text,
            "{\"event\":\"header\"}\n{\"event\":\"delete\",\"output\":\"x\"}\n"
        );
        // A torn tail found when opening is cut the same way.
        drop(l);
        std::fs::write(dir.path().join(NAME), "{\"event\":\"header\"}\n{\"ev").unwrap();
        let mut l = Ledger::open(dir.path()).unwrap();
        assert!(l.replay().unwrap().torn_tail);
        l.drop_torn_tail().unwrap();
        l.append(&json!({"event": "done"})).unwrap();
        let r = l.replay().unwrap();
        assert!(!r.torn_tail && r.damaged.is_empty());
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

    #[test]
    fn a_ledger_larger_than_any_expo_writes_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        // Sparse: no disk used, and expo must refuse it before reading.
        let f = File::create(dir.path().join(NAME)).unwrap();
        f.set_len(MAX_LEDGER_BYTES + 1).unwrap();
        drop(f);
        let err = Ledger::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, LedgerError::TooLarge { len, .. } if len == MAX_LEDGER_BYTES + 1),
            "{err}"
        );
        assert!(err.to_string().contains("choose another --run"), "{err}");
    }

    #[test]
    fn overlong_lines_and_out_of_range_numbers_are_named_corrupt() {
        let p = Path::new("RUN/ledger.jsonl");
        let long = format!(
            "{{\"event\":\"done\",\"x\":\"{}\"}}\n",
            "a".repeat(MAX_LINE_BYTES)
        );
        assert!(matches!(
            parse(p, long.as_bytes()),
            Err(LedgerError::Corrupt { line: 1, .. })
        ));
        let slot = b"{\"event\":\"start\",\"trial\":1,\"alpha\":0.1,\"slot\":99999999999}\n";
        let err = parse(p, slot).unwrap_err();
        assert!(
            err.to_string().contains("slot 99999999999 is out of range"),
            "{err}"
        );
        let exit = b"{\"event\":\"start\",\"trial\":1,\"alpha\":0.1}\n{\"event\":\"end\",\"trial\":1,\"state\":\"failed\",\"exit\":4294967296}\n";
        let err = parse(p, exit).unwrap_err();
        assert!(
            err.to_string().contains("line 2") && err.to_string().contains("exit code"),
            "{err}"
        );
    }

    #[test]
    fn every_end_state_reads_back_as_written() {
        for state in [
            State::Ok,
            State::Unusable,
            State::Failed,
            State::Interrupted,
        ] {
            assert_eq!(State::parse(state.name()), Some(state));
        }
        assert_eq!(State::parse("done"), None);
    }
}
