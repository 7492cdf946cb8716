//! Numbers and sizes in messages, printed for people.

/// A byte count for people, in binary units (`1.50 GiB`).
pub fn bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
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
}
