//! The user's evaluator: a command template and the score read back from its stdout or a
//! score file. How it is run is the [`launch`](super::launch) module's business.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::text::shell_quote;

/// The placeholders a template may use.
pub const NAMES: [&str; 5] = ["alpha", "output", "workdir", "slot", "trial"];

/// Largest stdout or score file read as a JSON document.
const MAX_JSON_BYTES: u64 = 64 << 20;

/// How much older than its trial a score file may look (the clocks of a network file
/// system's server and of this machine may differ a little).
pub const STALE_MARGIN: Duration = Duration::from_secs(2);

/// How much of the end of stdout is searched for the last line.
const TAIL_BYTES: u64 = 64 << 10;

/// What is wrong with a command template.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TemplateError {
    #[error("{flag} `{template}`: unknown placeholder {{{name}}}; the placeholders are {{alpha}} {{output}} {{workdir}} {{slot}} {{trial}} (write {{{{ and }}}} for literal braces)")]
    Unknown {
        flag: &'static str,
        template: String,
        name: String,
    },
    #[error("{flag} `{template}`: a `{brace}` that opens or closes no placeholder; write {brace}{brace} for a literal one")]
    Stray {
        flag: &'static str,
        template: String,
        brace: char,
    },
    #[error("{flag} is empty")]
    Empty { flag: &'static str },
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(Vec<u8>),
    /// A placeholder, and the shell quoting it stands in.
    Var(usize, Quote),
}

/// The shell quoting a placeholder stands in, so that its value is quoted for it: bare
/// (`{output}`), inside double quotes (`"{output}"`) or inside single quotes (`'{output}'`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Quote {
    Bare,
    Double,
    Single,
}

impl Quote {
    /// The quoting after the literal byte `c` (with `escaped`: `c` follows a backslash).
    fn after(self, c: u8, escaped: bool) -> Quote {
        match (self, c) {
            (_, _) if escaped => self,
            (Quote::Bare, b'\'') => Quote::Single,
            (Quote::Bare, b'"') => Quote::Double,
            (Quote::Double, b'"') | (Quote::Single, b'\'') => Quote::Bare,
            _ => self,
        }
    }

    /// `value` quoted for this context: one shell word with exactly these bytes.
    fn quote(self, value: &[u8]) -> Vec<u8> {
        match self {
            Quote::Bare => shell_quote(value),
            Quote::Double => {
                let mut out = Vec::with_capacity(value.len() + 2);
                for &b in value {
                    if matches!(b, b'"' | b'\\' | b'$' | b'`') {
                        out.push(b'\\');
                    }
                    out.push(b);
                }
                out
            }
            Quote::Single => {
                let mut out = Vec::with_capacity(value.len() + 2);
                for &b in value {
                    if b == b'\'' {
                        out.extend_from_slice(b"'\\''");
                    } else {
                        out.push(b);
                    }
                }
                out
            }
        }
    }
}

/// A parsed `{name}` template (`--eval`, `--score-file`).
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub spelling: String,
    parts: Vec<Part>,
}

/// The values substituted into a template for one trial.
#[derive(Debug, Clone)]
pub struct Values {
    pub alpha: String,
    pub output: PathBuf,
    pub workdir: PathBuf,
    pub slot: usize,
    pub trial: u64,
}

impl Values {
    fn get(&self, var: usize) -> OsString {
        match var {
            0 => OsString::from(&self.alpha),
            1 => self.output.clone().into_os_string(),
            2 => self.workdir.clone().into_os_string(),
            3 => OsString::from(self.slot.to_string()),
            _ => OsString::from(self.trial.to_string()),
        }
    }
}

impl Template {
    /// Parses `text`; `{{` and `}}` are literal braces.
    pub fn parse(flag: &'static str, text: &str) -> Result<Template, TemplateError> {
        if text.trim().is_empty() {
            return Err(TemplateError::Empty { flag });
        }
        let mut parts = Vec::new();
        let mut lit = Vec::new();
        let b = text.as_bytes();
        let mut i = 0;
        // The shell quoting at this point of the command (for --eval; a path ignores it).
        let mut quote = Quote::Bare;
        let mut escaped = false;
        while i < b.len() {
            match b[i] {
                b'{' if b.get(i + 1) == Some(&b'{') => {
                    lit.push(b'{');
                    escaped = false;
                    i += 2;
                }
                b'}' if b.get(i + 1) == Some(&b'}') => {
                    lit.push(b'}');
                    escaped = false;
                    i += 2;
                }
                b'{' => {
                    let Some(end) = text[i + 1..].find('}') else {
                        return Err(TemplateError::Stray {
                            flag,
                            template: text.into(),
                            brace: '{',
                        });
                    };
                    let name = &text[i + 1..i + 1 + end];
                    let Some(var) = NAMES.iter().position(|n| *n == name) else {
                        return Err(TemplateError::Unknown {
                            flag,
                            template: text.into(),
                            name: name.into(),
                        });
                    };
                    if !lit.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Var(var, quote));
                    escaped = false;
                    i += end + 2;
                }
                b'}' => {
                    return Err(TemplateError::Stray {
                        flag,
                        template: text.into(),
                        brace: '}',
                    })
                }
                c => {
                    lit.push(c);
                    quote = quote.after(c, escaped);
                    escaped = c == b'\\' && !escaped && quote != Quote::Single;
                    i += 1;
                }
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Text(lit));
        }
        Ok(Template {
            spelling: text.into(),
            parts,
        })
    }

    /// The shell command: every value shell-quoted.
    pub fn command(&self, v: &Values) -> OsString {
        self.render(v, true)
    }

    /// A path: values substituted as they are.
    pub fn path(&self, v: &Values) -> PathBuf {
        PathBuf::from(self.render(v, false))
    }

    fn render(&self, v: &Values, quote: bool) -> OsString {
        let mut out = Vec::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.extend_from_slice(t),
                Part::Var(k, context) => {
                    let value = v.get(*k);
                    if quote {
                        out.extend_from_slice(&context.quote(value.as_bytes()));
                    } else {
                        out.extend_from_slice(value.as_bytes());
                    }
                }
            }
        }
        OsString::from_vec(out)
    }
}

/// How the score is read.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreSpec {
    /// `--score-json POINTER`.
    pub pointer: Option<String>,
    /// `--score-file TEMPLATE`.
    pub file: Option<Template>,
    /// How long a score file that does not exist yet is waited for after its evaluator
    /// ended: a network file system can show a file written on a compute node seconds later
    /// ([`SCORE_FILE_WAIT`] with `--slurm`; zero for local evaluators).
    pub wait: Duration,
}

/// How long a `--slurm` search waits for a score file to appear on the shared file system.
pub const SCORE_FILE_WAIT: Duration = Duration::from_secs(10);

/// Opens the score file at `path` as [`open_regular`] does; while it does not exist, tries
/// again for up to `wait`.
fn open_score_file(path: &Path, wait: Duration) -> Result<(File, u64), ScoreError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match open_regular(path) {
            Err(ScoreError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// Why no score could be read.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error("{what} has no non-empty line")]
    NoLine { what: String },
    #[error("the last non-empty line of {what} is `{line}`, not one number")]
    NotANumber { what: String, line: String },
    #[error("{what} is not one JSON document: {reason}")]
    NotJson { what: String, reason: String },
    #[error("{what}: the JSON pointer {pointer} finds nothing")]
    Missing { what: String, pointer: String },
    #[error("{what}: the value at {pointer} is {value}, not a finite number")]
    NotNumeric {
        what: String,
        pointer: String,
        value: String,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {limit} bytes")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{path} is not a regular file ({kind}); a score is read from a regular file only")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("the score file {path} was last modified before the trial started (a leftover, not this trial's score)")]
    Stale { path: PathBuf },
}

/// A score and, when the evaluator printed one, its whole JSON document.
#[derive(Debug, Clone)]
pub struct Score {
    pub value: f64,
    pub json: Option<serde_json::Value>,
}

/// The score of the last non-empty line of `text`, which must be one number.
pub fn score_from_line(text: &str, what: &str) -> Result<f64, ScoreError> {
    let Some(line) = text.lines().map(str::trim).rev().find(|l| !l.is_empty()) else {
        return Err(ScoreError::NoLine { what: what.into() });
    };
    match line.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(ScoreError::NotANumber {
            what: what.into(),
            line: line.chars().take(200).collect(),
        }),
    }
}

/// The largest evaluator JSON document kept whole in the ledger; of a larger one only the
/// pointer's value is kept, with a note.
pub const MAX_KEPT_JSON_BYTES: usize = 64 << 10;

/// The number at RFC 6901 `pointer` in the JSON document `text`, and what the ledger keeps
/// of the document (see [`kept_json`]).
///
/// Memory stays close to the document's size: the document is checked as one JSON value
/// without being built (`RawValue`), and only the objects and arrays on the pointer's path
/// are split, one level at a time, into their keys and raw members.
pub fn score_from_json(
    text: &str,
    pointer: &str,
    what: &str,
) -> Result<(f64, serde_json::Value), ScoreError> {
    use serde_json::value::RawValue;
    let not_json = |e: serde_json::Error| ScoreError::NotJson {
        what: what.into(),
        reason: e.to_string(),
    };
    let doc: &RawValue = serde_json::from_str(text.trim()).map_err(not_json)?;
    let missing = || ScoreError::Missing {
        what: what.into(),
        pointer: pointer.into(),
    };
    let mut cur = doc;
    for token in pointer.split('/').skip(1) {
        let token = token.replace("~1", "/").replace("~0", "~");
        let raw = cur.get().trim_start();
        if raw.starts_with('{') {
            let map: std::collections::HashMap<String, &RawValue> =
                serde_json::from_str(cur.get()).map_err(not_json)?;
            cur = map.get(&token).copied().ok_or_else(missing)?;
        } else if raw.starts_with('[') {
            let items: Vec<&RawValue> = serde_json::from_str(cur.get()).map_err(not_json)?;
            let canonical = token == "0" || (!token.starts_with('0') && !token.is_empty());
            let k = token
                .parse::<usize>()
                .ok()
                .filter(|_| canonical && token.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(missing)?;
            cur = items.get(k).copied().ok_or_else(missing)?;
        } else {
            return Err(missing());
        }
    }
    let raw = cur.get().trim();
    let value = if raw.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        serde_json::from_str::<f64>(raw).ok()
    } else {
        None
    };
    match value {
        Some(v) if v.is_finite() => Ok((v, kept_json(text, pointer, v))),
        _ => Err(ScoreError::NotNumeric {
            what: what.into(),
            pointer: pointer.into(),
            value: raw.chars().take(200).collect(),
        }),
    }
}

/// What the ledger keeps of an evaluator's JSON document: the whole document when it has at
/// most [`MAX_KEPT_JSON_BYTES`], else the pointer's value and a note.
fn kept_json(text: &str, pointer: &str, value: f64) -> serde_json::Value {
    let text = text.trim();
    if text.len() <= MAX_KEPT_JSON_BYTES {
        if let Ok(doc) = serde_json::from_str(text) {
            return doc;
        }
    }
    serde_json::json!({
        "expo_note": format!(
            "the evaluator's JSON document has {} bytes, more than the {} kept; only the score is kept",
            text.len(),
            MAX_KEPT_JSON_BYTES
        ),
        "bytes": text.len(),
        "pointer": pointer,
        "value": value,
    })
}

/// Checks `--score-json POINTER` (empty, or starting with `/`).
pub fn parse_pointer(s: &str) -> Result<String, String> {
    if s.is_empty() || s.starts_with('/') {
        Ok(s.to_string())
    } else {
        Err(format!(
            "`{s}` is not a JSON pointer: it must start with `/`, e.g. '/results/TASK/acc,none'"
        ))
    }
}

/// Opens `path` for reading a score: without blocking (a FIFO would block the open and
/// every read) and only if it is a regular file (a device such as /dev/zero never ends).
fn open_regular(path: &Path) -> Result<(File, u64), ScoreError> {
    let read_err = |source| ScoreError::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = crate::sys::open_nonblocking(path).map_err(read_err)?;
    let meta = f.metadata().map_err(read_err)?;
    let ft = meta.file_type();
    if !ft.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else if ft.is_dir() {
            "a directory"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(ScoreError::NotRegular {
            path: path.to_path_buf(),
            kind,
        });
    }
    Ok((f, meta.len()))
}

fn read_capped(path: &Path, limit: u64) -> Result<String, ScoreError> {
    let read_err = |source| ScoreError::Read {
        path: path.to_path_buf(),
        source,
    };
    let (f, len) = open_regular(path)?;
    if len > limit {
        return Err(ScoreError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf).map_err(read_err)?;
    if buf.len() as u64 > limit {
        return Err(ScoreError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The last `n` bytes (at most) of the regular file `path`.
fn read_tail(path: &Path, n: u64) -> Result<String, ScoreError> {
    let read_err = |source| ScoreError::Read {
        path: path.to_path_buf(),
        source,
    };
    let (mut f, len) = open_regular(path)?;
    f.seek(SeekFrom::Start(len.saturating_sub(n)))
        .map_err(read_err)?;
    let mut buf = Vec::new();
    f.take(n).read_to_end(&mut buf).map_err(read_err)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The last lines of a log file, for an error message.
pub fn tail_lines(path: &Path, lines: usize) -> String {
    let text = read_tail(path, 4096).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl ScoreSpec {
    /// Reads the score of a finished trial that started at `started`. A score file last
    /// modified more than [`STALE_MARGIN`] before that is a leftover, not a score.
    pub fn read(
        &self,
        stdout: &Path,
        v: &Values,
        started: SystemTime,
    ) -> Result<Score, ScoreError> {
        let (path, what) = match &self.file {
            Some(t) => {
                let p = t.path(v);
                let what = format!("the score file {}", p.display());
                let (f, _) = open_score_file(&p, self.wait)?;
                let modified =
                    f.metadata()
                        .and_then(|m| m.modified())
                        .map_err(|source| ScoreError::Read {
                            path: p.clone(),
                            source,
                        })?;
                if modified
                    .checked_add(STALE_MARGIN)
                    .is_some_and(|m| m < started)
                {
                    return Err(ScoreError::Stale { path: p });
                }
                (p, what)
            }
            None => (stdout.to_path_buf(), "the evaluator's stdout".to_string()),
        };
        match &self.pointer {
            Some(ptr) => {
                let text = read_capped(&path, MAX_JSON_BYTES)?;
                let (value, doc) = score_from_json(&text, ptr, &what)?;
                Ok(Score {
                    value,
                    json: Some(doc),
                })
            }
            None => {
                let tail = read_tail(&path, TAIL_BYTES)?;
                let value = score_from_line(&tail, &what)?;
                // Keep the evaluator's JSON when its whole stdout is one document.
                let json = read_capped(&path, MAX_KEPT_JSON_BYTES as u64)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(t.trim()).ok())
                    .filter(|j| j.is_object());
                Ok(Score { value, json })
            }
        }
    }
}

pub use super::launch::Exit;

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> Values {
        Values {
            alpha: "0.3".into(),
            output: PathBuf::from("runs/it's here/alpha-0.3"),
            workdir: PathBuf::from("/tmp/w"),
            slot: 1,
            trial: 7,
        }
    }

    #[test]
    fn templates_substitute_quoted() {
        let t = Template::parse(
            "--eval",
            "run {alpha} {output} {workdir} {slot} {trial} {{x}}",
        )
        .unwrap();
        assert_eq!(
            t.command(&values()),
            OsString::from("run 0.3 'runs/it'\\''s here/alpha-0.3' /tmp/w 1 7 {x}")
        );
        // Inside double or single quotes, the value is quoted for them.
        let t = Template::parse("--eval", "run \"{output}/x\" '{output}' \\'{alpha}").unwrap();
        assert_eq!(
            t.command(&values()),
            OsString::from(
                "run \"runs/it's here/alpha-0.3/x\" 'runs/it'\\''s here/alpha-0.3' \\'0.3"
            )
        );
        let t = Template::parse("--score-file", "{workdir}/s {trial}.json").unwrap();
        assert_eq!(t.path(&values()), PathBuf::from("/tmp/w/s 7.json"));
    }

    #[test]
    fn bad_templates() {
        assert!(matches!(
            Template::parse("--eval", "x {alpa}"),
            Err(TemplateError::Unknown { name, .. }) if name == "alpa"
        ));
        assert!(matches!(
            Template::parse("--eval", "x {alpha"),
            Err(TemplateError::Stray { brace: '{', .. })
        ));
        assert!(matches!(
            Template::parse("--eval", "x }"),
            Err(TemplateError::Stray { brace: '}', .. })
        ));
        assert!(matches!(
            Template::parse("--eval", "  "),
            Err(TemplateError::Empty { .. })
        ));
    }

    #[test]
    fn last_line_scores() {
        assert_eq!(
            score_from_line("log 12:00\n0.75\n\n  \n", "x").unwrap(),
            0.75
        );
        assert_eq!(score_from_line("-1e-3", "x").unwrap(), -0.001);
        assert!(matches!(
            score_from_line("0.5 acc\n", "x"),
            Err(ScoreError::NotANumber { .. })
        ));
        assert!(matches!(
            score_from_line("0.5\ndone at 12:00", "x"),
            Err(ScoreError::NotANumber { .. })
        ));
        assert!(matches!(
            score_from_line("nan", "x"),
            Err(ScoreError::NotANumber { .. })
        ));
        assert!(matches!(
            score_from_line("\n \n", "x"),
            Err(ScoreError::NoLine { .. })
        ));
    }

    #[test]
    fn json_pointer_scores() {
        let doc = r#"{"results": {"gsm8k": {"acc,none": 0.5, "a/b": 2, "m~n": 3}}, "s": "1"}"#;
        let (v, _) = score_from_json(doc, "/results/gsm8k/acc,none", "x").unwrap();
        assert_eq!(v, 0.5);
        assert_eq!(
            score_from_json(doc, "/results/gsm8k/a~1b", "x").unwrap().0,
            2.0
        );
        assert_eq!(
            score_from_json(doc, "/results/gsm8k/m~0n", "x").unwrap().0,
            3.0
        );
        assert!(matches!(
            score_from_json(doc, "/results/x", "x"),
            Err(ScoreError::Missing { .. })
        ));
        assert!(matches!(
            score_from_json(doc, "/s", "x"),
            Err(ScoreError::NotNumeric { .. })
        ));
        assert!(matches!(
            score_from_json("{} {}", "/s", "x"),
            Err(ScoreError::NotJson { .. })
        ));
        assert!(parse_pointer("results/x").is_err());
        assert!(parse_pointer("").is_ok());
    }

    #[test]
    fn a_score_file_is_waited_for_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("score.txt");
        // Locally: a missing score file is an error at once.
        assert!(matches!(
            open_score_file(&p, Duration::ZERO),
            Err(ScoreError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound
        ));
        // With a wait (Slurm): a file that appears later (written on a compute node, seen
        // late through a network file system) is read.
        let q = p.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            // Whole at once, as a network file system shows a closed file.
            let tmp = q.with_extension("tmp");
            std::fs::write(&tmp, "0.5\n").unwrap();
            std::fs::rename(&tmp, &q).unwrap();
        });
        let (_, len) = open_score_file(&p, Duration::from_secs(60)).unwrap();
        writer.join().unwrap();
        assert_eq!(len, 4);
    }
}
