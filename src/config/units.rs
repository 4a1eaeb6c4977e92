//! Durations (`"250ms"`, `"5s"`, `"1m"`) and sizes (`"10MiB"`) written as text.

use std::time::Duration;

/// The units a duration is written in, with their length in nanoseconds. The one definition of
/// the duration grammar: [`parse_duration`] reads it and [`duration_pattern`] (the JSON Schema's
/// pattern) is made from it, so `validate` and the schema accept the same texts.
pub const DURATION_UNITS: [(&str, u128); 7] = [
    ("ns", 1),
    ("us", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
    ("d", 86_400_000_000_000),
];

/// The grammar of [`parse_duration`] as an ECMA-262 regular expression, for the JSON Schema:
/// one or more whole numbers each followed by a unit of [`DURATION_UNITS`], spaces allowed
/// around them.
pub fn duration_pattern() -> String {
    let units: Vec<&str> = DURATION_UNITS.iter().map(|(u, _)| *u).collect();
    let term = format!("\\s*[0-9]+\\s*({})", units.join("|"));
    format!("^{term}({term})*\\s*$")
}

/// Parses a duration: one or more whole numbers, each with a unit of [`DURATION_UNITS`]
/// (`"250ms"`, `"5s"`, `"1m 30s"`). Nothing else: no fractions (`"1.5s"`), no spelled-out units
/// (`"5 seconds"`), as README documents and the JSON Schema checks.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if t.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "`{t}` has no unit; write e.g. \"{t}s\" or \"{t}ms\""
        ));
    }
    let bad = || {
        let units: Vec<&str> = DURATION_UNITS.iter().map(|(u, _)| *u).collect();
        format!(
            "`{t}` is not a duration: write whole numbers with a unit ({}), e.g. \"250ms\", \"5s\", \"1m\" or \"1m 30s\"",
            units.join(", ")
        )
    };
    let too_long = || format!("`{t}` is too long a duration");
    let mut nanos: u128 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u128 = rest[..digits].parse().map_err(|_| too_long())?;
        rest = rest[digits..].trim_start();
        let letters = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let Some((_, unit)) = DURATION_UNITS.iter().find(|(u, _)| *u == &rest[..letters]) else {
            return Err(bad());
        };
        nanos = n
            .checked_mul(*unit)
            .and_then(|v| nanos.checked_add(v))
            .ok_or_else(too_long)?;
        rest = rest[letters..].trim_start();
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| too_long())?;
    // The remainder is below 10^9: it fits.
    let sub = u32::try_from(nanos % 1_000_000_000).unwrap_or(0);
    Ok(Duration::new(secs, sub))
}

/// Parses a size in bytes: a number with an optional unit (`B`, `KB`, `MB`, `GB`, `KiB`, `MiB`, `GiB`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("`{t}` is not a size; write e.g. \"512KiB\" or \"10MiB\"");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{t}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration(" 2 h "), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1ns"), Ok(Duration::from_nanos(1)));
        assert!(parse_duration("99999999999999999999999999999999999999999d").is_err());
    }

    /// The parser and the schema's pattern accept exactly the same texts.
    #[test]
    fn the_duration_grammar_is_the_schema_pattern() {
        let pattern = regex::Regex::new(&duration_pattern()).unwrap();
        let cases = [
            "250ms",
            "5s",
            "1m",
            "1h",
            "2d",
            "10us",
            "7ns",
            "1m 30s",
            "1m30s",
            " 5 s ",
            "1h 2m 3s",
            "",
            " ",
            "5",
            "1.5s",
            "5sec",
            "5 seconds",
            "1y",
            "-1s",
            "s",
            "1m 30",
            "1 m s",
            "+5s",
            "5S",
            "1e3ms",
            "5s,",
            "0x10s",
        ];
        for c in cases {
            assert_eq!(
                parse_duration(c).is_ok(),
                pattern.is_match(c),
                "{c:?}: parser and schema disagree"
            );
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10MiB"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("1 KB"), Ok(1000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("10 MiBs").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }
}
