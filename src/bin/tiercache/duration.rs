//! Durations on the command line and in the config file: a whole number and a unit, e.g. `0s`,
//! `500ms`, `30s`, `10m`, `2h`, `7d`.

use std::time::Duration;

/// Parses `<n><unit>` with unit `ms`, `s`, `m`, `h` or `d`.
///
/// # Errors
/// A message naming what is wrong, for clap and the config file to show.
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let bad = |why: &str| {
        format!("{text:?} is not a duration ({why}); write a whole number and a unit: 500ms, 30s, 10m, 2h, 7d")
    };
    if number.is_empty() {
        return Err(bad("no number"));
    }
    let n: u64 = number.parse().map_err(|_| bad("the number is too large"))?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "" => return Err(bad("no unit")),
        _ => return Err(bad("unknown unit")),
    };
    n.checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| bad("too long"))
}

/// A short human form: `850ms`, `12s`, `3m 20s`, `5h 2m`, `2d 3h`.
pub(crate) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    let s = ms / 1000;
    match s {
        _ if ms < 1000 => format!("{ms}ms"),
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        let ok = |t: &str, ms: u64| assert_eq!(parse(t), Ok(Duration::from_millis(ms)), "{t}");
        ok("0s", 0);
        ok("500ms", 500);
        ok("30s", 30_000);
        ok("10m", 600_000);
        ok("2h", 7_200_000);
        ok("7d", 604_800_000);
        ok(" 5s ", 5_000);
    }

    #[test]
    fn garbage() {
        for t in [
            "",
            "s",
            "10",
            "10x",
            "1.5s",
            "-1s",
            "10 s",
            "5sec",
            "99999999999999999999s",
            "18446744073709551615d",
        ] {
            assert!(parse(t).is_err(), "{t:?} parsed");
        }
    }

    #[test]
    fn human_forms() {
        assert_eq!(human(Duration::from_millis(850)), "850ms");
        assert_eq!(human(Duration::from_secs(200)), "3m 20s");
        assert_eq!(human(Duration::from_secs(2 * 86_400 + 3 * 3600)), "2d 3h");
    }
}
