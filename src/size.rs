//! Parsing sizes such as `5GB`, `500MB`, `2GiB` or plain byte counts.

/// Parses a size: a whole or decimal number with an optional unit. `KB`, `MB`, `GB`, `TB`
/// are powers of 1000 (as Hugging Face's `max_shard_size`), `KiB` … `TiB` powers of 1024,
/// `B` or nothing means bytes. Units are case-insensitive.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.trim();
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "tb" | "t" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "unknown unit `{unit}` (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    if number.is_empty() {
        return Err("expected a number, e.g. 5GB".into());
    }
    let bytes = if let Some((whole, frac)) = number.split_once('.') {
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole
                .parse()
                .map_err(|_| format!("`{number}` is not a number"))?
        };
        if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("`{number}` is not a number"));
        }
        let scale = 10u64.pow(frac.len() as u32);
        let frac: u64 = frac
            .parse()
            .map_err(|_| format!("`{number}` is not a number"))?;
        whole
            .checked_mul(multiplier)
            .and_then(|w| w.checked_add((frac as u128 * multiplier as u128 / scale as u128) as u64))
    } else {
        number
            .parse::<u64>()
            .map_err(|_| format!("`{number}` is not a number"))?
            .checked_mul(multiplier)
    };
    match bytes {
        None => Err("size too large".into()),
        Some(0) => Err("size must be greater than zero".into()),
        Some(b) => Ok(b),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn units() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_size("123"), Ok(123));
        assert_eq!(parse_size("10 kib"), Ok(10_240));
        assert!(parse_size("0").is_err());
        assert!(parse_size("GB").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("1.2.3GB").is_err());
        assert!(parse_size("99999999999TB").is_err());
    }
}
