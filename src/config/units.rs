//! Human units in the configuration file: durations (`"30s"`, `"12h"`) and sizes (`"10MiB"`).

use std::time::Duration;

/// Parses a human duration such as `"250ms"`, `"30s"`, `"12h"` or `"1h 30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("is empty; write a duration such as \"30s\" or \"12h\"".into());
    }
    humantime::parse_duration(trimmed).map_err(|_| {
        format!("{text:?} is not a duration; write e.g. \"500ms\", \"30s\", \"10m\" or \"12h\"")
    })
}

/// Parses a size such as `"10MiB"`, `"64KiB"`, `"1GB"` or a plain byte count `"4096"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let bad = || format!("{text:?} is not a size; write e.g. \"64KiB\", \"10MiB\" or \"1GiB\"");
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    number.checked_mul(factor).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("ten").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
