//! Human durations for flags and documents: `90s`, `10m`, `1h30m`, `24h`, `7d`.

use std::time::Duration;

/// Parses `1h`, `10m`, `1h30m`, `45s`, `500ms`, `2d`. A bare number is seconds.
pub fn parse(s: &str) -> Result<Duration, String> {
    let input = s.trim();
    if input.is_empty() {
        return Err("empty duration; use e.g. 30s, 10m, 1h".into());
    }
    if let Ok(secs) = input.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = input;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "invalid duration {s:?}: expected a number before the unit"
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            u => {
                return Err(format!(
                    "invalid duration {s:?}: unknown unit {u:?} (use ms, s, m, h or d)"
                ));
            }
        };
        total = total.saturating_add(part);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// Formats a duration the way [`parse`] reads it, coarsest units first.
pub fn format(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse("45").unwrap(), Duration::from_secs(45));
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("2d").unwrap(), Duration::from_secs(172800));
    }

    #[test]
    fn rejects_garbage_with_a_hint() {
        assert!(parse("").unwrap_err().contains("30s"));
        assert!(parse("1y").unwrap_err().contains("unknown unit"));
        assert!(parse("h").unwrap_err().contains("number"));
    }

    #[test]
    fn format_round_trips() {
        for s in ["1h", "1h30m", "10m", "2d", "1d1h1m1s"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
    }
}
