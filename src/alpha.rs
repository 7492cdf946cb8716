//! α values and per-module rules as the command line spells them.
//!
//! `--alpha` takes a list (`0.1,0.2,0.3`), an inclusive range (`0.1:0.5:0.1`) or both mixed.
//! Ranges are computed on decimal integers (0.1:0.5:0.1 is 1..=5 tenths), so every value
//! is the f64 nearest to its decimal spelling: 0.3 is 0.3, never 0.30000000000000004.

use std::path::{Path, PathBuf};

use crate::plan::{AlphaRule, RuleValue};

/// Most α values one run may produce (each is a whole checkpoint on disk).
pub const MAX_ALPHAS: usize = 64;

/// The placeholder in `--output` replaced by each α.
pub const PLACEHOLDER: &str = "{alpha}";

/// Parses `--alpha`: comma-separated numbers and `start:end:step` ranges, duplicates
/// removed, in the order given.
pub fn parse_alphas(text: &str) -> Result<Vec<f64>, String> {
    let mut out: Vec<f64> = Vec::new();
    for item in text.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(format!(
                "`{text}` has an empty item; write e.g. 0.1,0.2 or 0.1:0.5:0.1"
            ));
        }
        let values = if item.contains(':') {
            parse_range(item)?
        } else {
            vec![parse_number(item)?]
        };
        for v in values {
            // -0.0 == 0.0: one of them is enough.
            if !out.contains(&v) {
                out.push(v);
            }
            if out.len() > MAX_ALPHAS {
                return Err(format!(
                    "`{text}` gives more than {MAX_ALPHAS} values; each is a whole checkpoint, so split the sweep"
                ));
            }
        }
    }
    Ok(out)
}

fn parse_number(s: &str) -> Result<f64, String> {
    let a: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number (e.g. 0.3)"))?;
    if !a.is_finite() {
        return Err(format!("alpha must be a finite number, got `{s}`"));
    }
    // Normalise -0 to 0: the same tensor values, and a cleaner directory name.
    Ok(if a == 0.0 { 0.0 } else { a })
}

/// A plain decimal as an integer and its number of fractional digits.
fn parse_decimal(s: &str) -> Result<(i128, u32), String> {
    let bad = || format!("`{s}` in a range must be a plain decimal number such as 0.1 or -2");
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() && frac.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || whole.len() + frac.len() > 30
        || frac.len() > 15
    {
        return Err(bad());
    }
    let int: i128 = format!("{whole}{frac}").parse().map_err(|_| bad())?;
    Ok((if neg { -int } else { int }, frac.len() as u32))
}

fn parse_range(item: &str) -> Result<Vec<f64>, String> {
    let parts: Vec<&str> = item.split(':').map(str::trim).collect();
    let [start, end, step] = parts[..] else {
        return Err(format!(
            "`{item}`: a range is START:END:STEP, e.g. 0.1:0.5:0.1"
        ));
    };
    let (s, ds) = parse_decimal(start)?;
    let (e, de) = parse_decimal(end)?;
    let (t, dt) = parse_decimal(step)?;
    let d = ds.max(de).max(dt);
    let too_big = || format!("`{item}`: the numbers are too large or too precise");
    let scale = |v: i128, dv: u32| v.checked_mul(10i128.checked_pow(d - dv)?);
    let (Some(s), Some(e), Some(t)) = (scale(s, ds), scale(e, de), scale(t, dt)) else {
        return Err(too_big());
    };
    let Some(span) = e.checked_sub(s) else {
        return Err(too_big());
    };
    if t == 0 || span.signum() * t.signum() < 0 {
        return Err(format!(
            "`{item}`: the step must be non-zero and go from {start} towards {end}"
        ));
    }
    let count = span / t + 1;
    if count > MAX_ALPHAS as i128 {
        return Err(format!(
            "`{item}` gives {count} values; at most {MAX_ALPHAS} per run (each is a whole checkpoint)"
        ));
    }
    let denom = 10f64.powi(d as i32);
    Ok((0..count)
        .map(|k| {
            let v = (s + k * t) as f64 / denom;
            if v == 0.0 {
                0.0
            } else {
                v
            }
        })
        .collect())
}

/// The shortest decimal that reads back as `alpha` (`0.3`, `2.5`, `-0.5`, `8`).
pub fn format_alpha(alpha: f64) -> String {
    format!("{alpha}")
}

/// Replaces every `{alpha}` in `template` with [`format_alpha`]`(alpha)`. A template
/// without the placeholder is returned unchanged, byte for byte (also when not UTF-8).
pub fn expand_output(template: &Path, alpha: f64) -> PathBuf {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let bytes = template.as_os_str().as_bytes();
    let needle = PLACEHOLDER.as_bytes();
    let value = format_alpha(alpha);
    let mut out = Vec::with_capacity(bytes.len() + 8);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(needle) {
            out.extend_from_slice(value.as_bytes());
            i += needle.len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// True when `template` contains `{alpha}`.
pub fn has_placeholder(template: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    template
        .as_os_str()
        .as_bytes()
        .windows(PLACEHOLDER.len())
        .any(|w| w == PLACEHOLDER.as_bytes())
}

/// Parses `--alpha-for REGEX=VALUE`, where VALUE is a number or `xF` (F times the run's α).
pub fn parse_rule(text: &str) -> Result<AlphaRule, String> {
    let Some((pattern, value)) = text.rsplit_once('=') else {
        return Err(format!(
            "`{text}`: expected REGEX=VALUE, e.g. 'self_attn=x0.5' or 'lm_head=0'"
        ));
    };
    let value = value.trim();
    let value = match value.strip_prefix(['x', 'X', '×', '*']) {
        Some(f) => RuleValue::Factor(parse_number(f.trim()).map_err(|e| format!("`{text}`: {e}"))?),
        None => RuleValue::Absolute(parse_number(value).map_err(|e| format!("`{text}`: {e}"))?),
    };
    Ok(AlphaRule {
        pattern: compile(pattern)?,
        value,
        spelling: format!("--alpha-for {text}"),
    })
}

/// Parses `--skip REGEX`: matching tensors get α = 0 (copied from θ1).
pub fn parse_skip(text: &str) -> Result<AlphaRule, String> {
    Ok(AlphaRule {
        pattern: compile(text)?,
        value: RuleValue::Absolute(0.0),
        spelling: format!("--skip {text}"),
    })
}

fn compile(pattern: &str) -> Result<regex::Regex, String> {
    if pattern.is_empty() {
        return Err("empty regular expression".into());
    }
    regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("invalid regular expression `{pattern}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_ranges_and_mixes() {
        assert_eq!(parse_alphas("0.3").unwrap(), vec![0.3]);
        assert_eq!(parse_alphas("0.1,0.2,0.3").unwrap(), vec![0.1, 0.2, 0.3]);
        assert_eq!(
            parse_alphas("0.1:0.5:0.1").unwrap(),
            vec![0.1, 0.2, 0.3, 0.4, 0.5]
        );
        assert_eq!(
            parse_alphas("0.1:0.5:0.1,2.5,0.3").unwrap(),
            vec![0.1, 0.2, 0.3, 0.4, 0.5, 2.5]
        );
        assert_eq!(
            parse_alphas("1:0:-0.25").unwrap(),
            vec![1.0, 0.75, 0.5, 0.25, 0.0]
        );
        assert_eq!(parse_alphas("-0.5,-0").unwrap(), vec![-0.5, 0.0]);
        assert_eq!(parse_alphas("0:1:0.3").unwrap(), vec![0.0, 0.3, 0.6, 0.9]);
        assert_eq!(parse_alphas("2:25:1").unwrap().len(), 24);
        assert_eq!(parse_alphas("-1:1:1").unwrap(), vec![-1.0, 0.0, 1.0]);
        assert_eq!(parse_alphas("+1:-1:-1").unwrap(), vec![1.0, 0.0, -1.0]);
    }

    #[test]
    fn range_values_are_the_nearest_doubles_to_their_decimals() {
        let v = parse_alphas("0.1:2.9:0.1").unwrap();
        for (k, a) in v.iter().enumerate() {
            let decimal = format!("{}.{}", (k + 1) / 10, (k + 1) % 10);
            assert_eq!(*a, decimal.parse::<f64>().unwrap(), "{decimal}");
        }
        // The naive accumulation drifts: 0.1 + 0.1 + 0.1 != 0.3.
        assert_ne!(0.1 + 0.1 + 0.1, 0.3);
        assert_eq!(format_alpha(v[2]), "0.3");
    }

    #[test]
    fn bad_alphas() {
        for bad in [
            "",
            "x",
            "0.1,",
            "nan",
            "inf",
            "0.1:0.5",
            "0.1:0.5:0",
            "0.5:0.1:0.1",
            "1e-3:1:1",
            "0:1000:1",
            "--1:2:1",
            "1:--2:1",
            "1:2:--1",
            "+-1:2:1",
            "-+1:2:1",
            "--1",
        ] {
            assert!(parse_alphas(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn range_limit_is_64_values() {
        assert_eq!(MAX_ALPHAS, 64);
        let v = parse_range("1:64:1").unwrap();
        assert_eq!(v.len(), 64);
        assert_eq!((v[0], v[63]), (1.0, 64.0));
        assert_eq!(parse_alphas("1:64:1").unwrap(), v);
        // The range itself refuses 65, before parse_alphas counts.
        let e = parse_range("1:65:1").unwrap_err();
        assert!(e.contains("gives 65 values; at most 64"), "{e}");
        assert!(parse_alphas("1:65:1").is_err());
        // 10^15 + 1 values: refused from the count alone; a Vec of that many f64 could not
        // be allocated, so this test aborts if the values are produced before the check.
        let e = parse_range("0:1:0.000000000000001").unwrap_err();
        assert!(e.contains("gives 1000000000000001 values"), "{e}");
        // A range and a list together: 64 distinct values are fine, 65 are not.
        assert_eq!(parse_alphas("1:63:1,100").unwrap().len(), 64);
        assert_eq!(parse_alphas("1:64:1,1,64").unwrap().len(), 64);
        let e = parse_alphas("1:64:1,100").unwrap_err();
        assert!(e.contains("more than 64 values"), "{e}");
    }

    #[test]
    fn range_numbers_are_capped_at_30_digits_and_15_decimals() {
        // 30 digits in all, 15 after the point: accepted.
        let thirty = format!("{}.{}", "0".repeat(15), "0".repeat(14) + "1");
        assert_eq!(thirty.len() - 1, 30);
        assert_eq!(
            parse_range(&format!("0:{thirty}:{thirty}")).unwrap().len(),
            2
        );
        let big = "0".repeat(29) + "1";
        assert_eq!(parse_range(&format!("{big}:{big}:1")).unwrap(), vec![1.0]);
        // 31 digits, or 16 decimals: refused as not a plain decimal.
        let big31 = "0".repeat(30) + "1";
        let e = parse_range(&format!("{big31}:{big31}:1")).unwrap_err();
        assert!(e.contains("must be a plain decimal number"), "{e}");
        let e = parse_range("0:1:0.0000000000000001").unwrap_err();
        assert!(e.contains("`0.0000000000000001` in a range"), "{e}");
        // 30 digits that overflow once scaled: too large, not a crash.
        let nines = "9".repeat(30);
        let e = parse_range(&format!("0:{nines}:0.000000000000001")).unwrap_err();
        assert!(e.contains("too large or too precise"), "{e}");
        let e = parse_range(&format!("-{nines}:{nines}:1")).unwrap_err();
        assert!(e.contains("gives"), "{e}");
    }

    #[test]
    fn formatting_is_shortest_round_trip() {
        for (a, s) in [
            (0.1, "0.1"),
            (0.3, "0.3"),
            (2.5, "2.5"),
            (-0.5, "-0.5"),
            (8.0, "8"),
            (0.30000000000000004, "0.30000000000000004"),
        ] {
            assert_eq!(format_alpha(a), s);
            assert_eq!(s.parse::<f64>().unwrap(), a);
        }
        assert_eq!(
            expand_output(Path::new("runs/zephyr-expo-{alpha}"), 0.3),
            PathBuf::from("runs/zephyr-expo-0.3")
        );
    }

    #[test]
    fn rules() {
        let r = parse_rule("self_attn=x0.5").unwrap();
        assert_eq!(r.value, RuleValue::Factor(0.5));
        assert_eq!(r.alpha(0.4), 0.2);
        assert!(r.pattern.is_match("model.layers.0.self_attn.q_proj.weight"));
        let r = parse_rule("lm_head|embed_tokens=0").unwrap();
        assert_eq!(r.alpha(0.4), 0.0);
        let r = parse_rule("a=b=1").unwrap();
        assert!(r.pattern.is_match("a=b"));
        assert!(parse_rule("attn").is_err());
        assert!(parse_rule("(=1").is_err());
        assert!(parse_rule("attn=x").is_err());
        assert!(parse_rule("=1").is_err());
        assert_eq!(parse_skip("bias$").unwrap().alpha(3.0), 0.0);
    }
}
