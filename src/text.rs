//! Numbers, sizes and command lines in messages, printed for people.

/// A byte count for people, in binary units (`1.50 GiB`).
pub fn bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

/// A number for a message: as written when short, else in scientific notation (`1e300`,
/// not three hundred digits).
pub fn short_number(x: f64) -> String {
    if x == 0.0 || !x.is_finite() || (1e-5..1e16).contains(&x.abs()) {
        format!("{x}")
    } else {
        format!("{x:e}")
    }
}

/// Seconds for people: `12.3s`, `4.5m`, `1.2h`.
pub fn seconds(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{:.1}m", s / 60.0)
    } else {
        format!("{:.1}h", s / 3600.0)
    }
}

/// A number for a message: the shortest decimal that reads back as `x` (`0.3`, `-2.5`,
/// `100`), unless scientific notation is much shorter (`1e10`, `1e-300`,
/// `1.7976931348623157e308`), so that no message prints hundreds of digits.
pub fn number(x: f64) -> String {
    let plain = format!("{x}");
    let sci = format!("{x:e}");
    if plain.len() <= sci.len() + 4 {
        plain
    } else {
        sci
    }
}

/// `s` as one shell word: unchanged when it holds only characters no shell expands
/// (letters, digits and `-_./:@%+=,`), else in single quotes (a `'` becomes `'\''`).
pub fn shell_quote(s: &[u8]) -> Vec<u8> {
    let safe = !s.is_empty()
        && s.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_-./,:=+@%".contains(c));
    if safe {
        return s.to_vec();
    }
    single_quoted(s)
}

/// `s` in single quotes, where a shell expands nothing; a `'` is written `'\''`.
fn single_quoted(s: &[u8]) -> Vec<u8> {
    let mut out = vec![b'\''];
    for &c in s {
        if c == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(c);
        }
    }
    out.push(b'\'');
    out
}

/// Quotes arguments for bash (and any POSIX shell), leaving plain ones bare, so that the
/// line re-runs with the same arguments. Bare words hold only characters no shell
/// expands: letters, digits and `-_./:@%+=,` (no `{}`: `{a,b}` is brace expansion; no `~`,
/// `*`, `?`, `[`, `!`, `$`, `#`, quotes or spaces). Everything else is single-quoted, where
/// bash expands nothing (`!` included, also with history expansion on); a `'` is written
/// `'\''`. An `=` in the first word would make it an assignment, so that word is quoted.
pub fn shell_join(args: &[String]) -> String {
    let words: Vec<Vec<u8>> = args
        .iter()
        .enumerate()
        .map(|(i, a)| {
            if i == 0 && a.contains('=') {
                single_quoted(a.as_bytes())
            } else {
                shell_quote(a.as_bytes())
            }
        })
        .collect();
    // Quoting adds only ASCII bytes, so UTF-8 words stay UTF-8.
    String::from_utf8_lossy(&words.join(&b' ')).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_short() {
        assert_eq!(number(0.3), "0.3");
        assert_eq!(number(-2.5), "-2.5");
        assert_eq!(number(100.0), "100");
        assert_eq!(number(1e10), "1e10");
        assert_eq!(number(1e-7), "1e-7");
        assert_eq!(number(1e300), "1e300");
        assert_eq!(number(1e-300), "1e-300");
        assert_eq!(number(f64::MAX), "1.7976931348623157e308");
        assert_eq!(number(0.30000000000000004), "0.30000000000000004");
        assert_eq!(number(f64::INFINITY), "inf");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote(b"a/b-0.3"), b"a/b-0.3");
        assert_eq!(shell_quote(b""), b"''");
        assert_eq!(shell_quote(b"a b"), b"'a b'");
        assert_eq!(shell_quote(b"$(rm)"), b"'$(rm)'");
    }

    #[test]
    fn shell_quoting() {
        let args = ["expo", "--alpha", "0.3", "--output", "my dir", "it's"].map(String::from);
        assert_eq!(
            shell_join(&args),
            r"expo --alpha 0.3 --output 'my dir' 'it'\''s'"
        );
    }

    /// What bash makes of a line: its words, through `printf '%s\0'`.
    fn bash_words(line: &str, flags: &[&str]) -> Vec<String> {
        let script = format!("printf '%s\\0' {line}");
        let out = std::process::Command::new("bash")
            .args(flags)
            .arg("-c")
            .arg(&script)
            .env("HOME", "/home/expo-test")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("running bash");
        assert!(out.status.success(), "bash failed on {script}");
        let text = String::from_utf8(out.stdout).expect("UTF-8");
        text.split_terminator('\0').map(String::from).collect()
    }

    #[test]
    fn shell_join_re_runs_in_bash() {
        let args: Vec<String> = [
            "--output",
            "runs/{a,b}",
            "{0.1,0.2}",
            "a,b",
            "*",
            "src/*.rs",
            "~",
            "~/x",
            "a=~/x",
            "!",
            "!!",
            "a!b",
            "$HOME",
            "`id`",
            "$(id)",
            "it's",
            "'",
            "",
            "#not-a-comment",
            "a b",
            "tab\there",
            "new\nline",
            "\"q\"",
            "back\\slash",
            ";",
            "&",
            "|",
            "<x>",
            "(x)",
            "?",
            "[ab]",
            "--alpha-for",
            "self_attn=x0.5",
            "^(embed|lm_head)$",
            "é ü",
            "-0.5",
            "%1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let line = shell_join(&args);
        assert_eq!(bash_words(&line, &[]), args, "{line}");
        // Also with history expansion on, as in an interactive shell.
        assert_eq!(bash_words(&line, &["-H"]), args, "{line}");
        // An `=` in the first word is quoted: it would otherwise be an assignment.
        assert!(shell_join(&["A=b".to_string()]).starts_with('\''));
    }
}

/// A path as a JSON string. A path that is valid UTF-8 is written as it is. Otherwise each
/// byte that is not part of valid UTF-8 is written as the four characters `\xNN` (two
/// lowercase hex digits, as Python's `backslashreplace` does), and the rest as it is; so
/// no path makes a JSON document fail half-way or panic. [`path_from_json`] reads it back.
pub fn path_string(p: &std::path::Path) -> String {
    use std::fmt::Write;
    use std::os::unix::ffi::OsStrExt;
    let bytes = p.as_os_str().as_bytes();
    if let Ok(s) = std::str::from_utf8(bytes) {
        return s.to_string();
    }
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// [`path_string`] as a JSON value.
pub fn path_json(p: &std::path::Path) -> serde_json::Value {
    serde_json::Value::String(path_string(p))
}

/// Serializes a path field as [`path_string`] does (for `#[serde(serialize_with)]`).
pub fn serialize_path<P: AsRef<std::path::Path>, S: serde::Serializer>(
    p: &P,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&path_string(p.as_ref()))
}

/// The path that [`path_string`] wrote as `s`: `\xNN` escapes are bytes again when they
/// make a path that is not UTF-8 (a UTF-8 path is written as it is).
pub fn path_from_json(s: &str) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStringExt;
    if !s.contains("\\x") {
        return std::path::PathBuf::from(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') {
            if let (Some(h), Some(l)) = (
                b.get(i + 2).copied().and_then(hex),
                b.get(i + 3).copied().and_then(hex),
            ) {
                out.push((h * 16 + l) as u8);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    if std::str::from_utf8(&out).is_ok() {
        return std::path::PathBuf::from(s);
    }
    std::path::PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod path_tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    #[test]
    fn non_utf8_paths_round_trip_through_backslash_x_escapes() {
        let p = Path::new(OsStr::from_bytes(b"/tmp/caf\xe9/\xff\xfex-{alpha}"));
        let s = path_string(p);
        assert_eq!(s, "/tmp/caf\\xe9/\\xff\\xfex-{alpha}");
        assert_eq!(path_from_json(&s), p);
        assert_eq!(path_string(Path::new("/a/é")), "/a/é");
        assert_eq!(path_from_json("/a/\\x41"), Path::new("/a/\\x41"));
    }
}

/// A score for people: six significant digits, scientific notation outside 1e-4 … 1e7
/// (`0.734512`, `1.5e-7`, `2.13457e8`, `1e308`), never `-0`; at most 13 characters.
pub fn significant(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    if !x.is_finite() {
        return format!("{x}");
    }
    let a = x.abs();
    if (1e-4..1e7).contains(&a) {
        let digits = (5 - a.log10().floor() as i32).max(0) as usize;
        let s = format!("{x:.digits$}");
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        };
        if s == "-0" {
            "0".into()
        } else {
            s
        }
    } else {
        let s = format!("{x:.5e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let m = if m.contains('.') {
            m.trim_end_matches('0').trim_end_matches('.')
        } else {
            m
        };
        format!("{m}e{e}")
    }
}

/// The difference `a − b` for people, signed, as [`significant`] prints it; computed
/// without overflowing for scores near the largest floats.
pub fn difference(a: f64, b: f64) -> String {
    let d = a - b;
    let d = if d.is_finite() {
        d
    } else {
        (a / 2.0 - b / 2.0) * 2.0
    };
    let s = significant(d);
    if d > 0.0 {
        format!("+{s}")
    } else {
        s
    }
}

#[cfg(test)]
mod significant_tests {
    use super::*;

    #[test]
    fn six_significant_digits_in_at_most_13_characters() {
        assert_eq!(significant(0.7345123), "0.734512");
        assert_eq!(significant(1.5e-7), "1.5e-7");
        assert_eq!(significant(-1.234567e-7), "-1.23457e-7");
        assert_eq!(significant(212345678.9), "2.12346e8");
        assert_eq!(significant(1e308), "1e308");
        assert_eq!(significant(-0.0), "0");
        assert_eq!(significant(42.0), "42");
        assert_eq!(difference(1e308, -1e308), "+inf");
        for x in [
            -1.234567e-308,
            -0.000123456789,
            -123456.7,
            9999999.0,
            -1.7e308,
        ] {
            assert!(significant(x).len() <= 13, "{x}: {}", significant(x));
        }
    }
}
