//! The user's evaluator: a command template and the score read back from its stdout or a
//! score file. How it is run is the [`launch`](super::launch) module's business.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::text::shell_quote;

/// The placeholders a template may use.
pub const NAMES: [&str; 5] = ["alpha", "output", "workdir", "slot", "trial"];

/// Largest stdout or score file read as a JSON document.
const MAX_JSON_BYTES: u64 = 64 << 20;

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
    Var(usize),
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
        while i < b.len() {
            match b[i] {
                b'{' if b.get(i + 1) == Some(&b'{') => {
                    lit.push(b'{');
                    i += 2;
                }
                b'}' if b.get(i + 1) == Some(&b'}') => {
                    lit.push(b'}');
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
                    parts.push(Part::Var(var));
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
                Part::Var(k) => {
                    let value = v.get(*k);
                    if quote {
                        out.extend_from_slice(&shell_quote(value.as_bytes()));
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

/// The number at RFC 6901 `pointer` in the JSON document `text`.
pub fn score_from_json(
    text: &str,
    pointer: &str,
    what: &str,
) -> Result<(f64, serde_json::Value), ScoreError> {
    let doc: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(|e| ScoreError::NotJson {
            what: what.into(),
            reason: e.to_string(),
        })?;
    let value = doc.pointer(pointer).ok_or_else(|| ScoreError::Missing {
        what: what.into(),
        pointer: pointer.into(),
    })?;
    match value.as_f64() {
        Some(v) if v.is_finite() => Ok((v, doc)),
        _ => Err(ScoreError::NotNumeric {
            what: what.into(),
            pointer: pointer.into(),
            value: value.to_string().chars().take(200).collect(),
        }),
    }
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

fn read_capped(path: &Path, limit: u64) -> Result<String, ScoreError> {
    let read_err = |source| ScoreError::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(read_err)?;
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

fn read_tail(path: &Path, n: u64) -> Result<String, ScoreError> {
    let read_err = |source| ScoreError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let len = f.metadata().map_err(read_err)?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(n)))
        .map_err(read_err)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(read_err)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The last lines of a log file, for an error message.
pub fn tail_lines(path: &Path, lines: usize) -> String {
    let text = read_tail(path, 4096).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl ScoreSpec {
    /// Reads the score of a finished trial.
    pub fn read(&self, stdout: &Path, v: &Values) -> Result<Score, ScoreError> {
        let (path, what) = match &self.file {
            Some(t) => {
                let p = t.path(v);
                let what = format!("the score file {}", p.display());
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
                let json = read_capped(&path, 1 << 20)
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
}
