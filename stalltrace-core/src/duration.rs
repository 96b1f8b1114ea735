//! Human durations: `500ms`, `5s`, `2m`, `1h30m`, `1.5s` on input; `750ms`, `4.2s`, `3m05s` on
//! output.
use std::{fmt, str::FromStr, time::Duration};

/// A duration given on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

#[derive(Debug, PartialEq, Eq)]
pub struct ParseDurationError(String);

impl fmt::Display for ParseDurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseDurationError {}

impl FromStr for HumanDuration {
    type Err = ParseDurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let invalid = |why: &str| {
            ParseDurationError(format!(
                "invalid duration `{input}`: {why} (examples: 500ms, 5s, 2m, 1h30m, 1.5s)"
            ))
        };
        let text = input.trim();
        if text.is_empty() {
            return Err(invalid("empty"));
        }
        let mut total_ns: u128 = 0;
        let mut rest = text;
        while !rest.is_empty() {
            let number_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| invalid("missing unit"))?;
            if number_len == 0 {
                return Err(invalid("expected a number"));
            }
            let (number, tail) = rest.split_at(number_len);
            // Not only ASCII letters: `µs` starts with the micro sign.
            let unit_len = tail
                .find(|c: char| !c.is_alphabetic())
                .unwrap_or(tail.len());
            let (unit, tail) = tail.split_at(unit_len);
            let unit_ns: u128 = match unit {
                "ns" => 1,
                "us" | "µs" | "μs" => 1_000,
                "ms" => 1_000_000,
                "s" | "sec" => 1_000_000_000,
                "m" | "min" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                "" => return Err(invalid("missing unit")),
                _ => return Err(invalid(&format!("unknown unit `{unit}`"))),
            };
            total_ns += scale(number, unit_ns).ok_or_else(|| invalid("bad number"))?;
            rest = tail;
        }
        let total_ns = u64::try_from(total_ns).map_err(|_| invalid("too large"))?;
        Ok(Self(Duration::from_nanos(total_ns)))
    }
}

/// `number` (decimal, optional fraction) times `unit_ns`, without floating point.
fn scale(number: &str, unit_ns: u128) -> Option<u128> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return None;
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut value = whole.checked_mul(unit_ns)?;
    let mut place = unit_ns;
    for digit in fraction.bytes().take(9) {
        place /= 10;
        value += u128::from(digit - b'0') * place;
    }
    Some(value)
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_millis(self.0.as_millis() as u64))
    }
}

/// Compact human form of a millisecond count: `0ms`, `750ms`, `4.2s`, `59.9s`, `3m05s`, `2h07m`.
pub fn format_millis(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{}.{}s", ms / 1_000, ms % 1_000 / 100),
        60_000..=3_599_999 => format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1_000),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Duration, ParseDurationError> {
        text.parse::<HumanDuration>().map(|d| d.0)
    }

    #[test]
    fn parses_single_units() {
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse(" 7s ").unwrap(), Duration::from_secs(7));
    }

    #[test]
    fn parses_microseconds_with_the_micro_sign() {
        // The micro sign (U+00B5) and the Greek mu (U+03BC) look alike; both are accepted.
        assert_eq!(parse("250µs").unwrap(), Duration::from_micros(250));
        assert_eq!(parse("250μs").unwrap(), Duration::from_micros(250));
        assert_eq!(parse("1ms500µs").unwrap(), Duration::from_micros(1500));
        assert_eq!(parse("1.5us").unwrap(), Duration::from_nanos(1500));
        let err = parse("5µ").unwrap_err().to_string();
        assert!(err.contains("unknown unit `µ`"), "{err}");
    }

    #[test]
    fn parses_fractions_and_compounds() {
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse(".25s").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("1m30s500ms").unwrap(), Duration::from_millis(90_500));
    }

    #[test]
    fn rejects_bad_input_with_examples() {
        for bad in ["", "5", "s", "5x", "1.2.3s", "-5s", "5 s", "."] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("examples"), "{bad:?} -> {err}");
        }
        assert!(parse("99999999999h").is_err());
    }

    #[test]
    fn formats_compactly() {
        assert_eq!(format_millis(0), "0ms");
        assert_eq!(format_millis(999), "999ms");
        assert_eq!(format_millis(4_250), "4.2s");
        assert_eq!(format_millis(185_000), "3m05s");
        assert_eq!(format_millis(7_620_000), "2h07m");
        assert_eq!(HumanDuration(Duration::from_secs(5)).to_string(), "5.0s");
    }
}
