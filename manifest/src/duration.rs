//! Durations as a manifest writes them: whole numbers with units, largest
//! first (`500ms`, `5s`, `2m`, `1m30s`, `1h`). A bare number is an error
//! because its unit would be a guess.

const UNITS: [(&str, u64); 4] = [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

pub(crate) const FORMAT_HINT: &str = "a duration with a unit, like 500ms, 5s, 2m or 1m30s";

/// Milliseconds, or why the text is not a duration.
pub(crate) fn parse_ms(text: &str) -> Result<u64, String> {
    if text.is_empty() {
        return Err(format!("expected {FORMAT_HINT}, got an empty string"));
    }
    let bad = || format!("expected {FORMAT_HINT}, got {text:?}");
    let mut rest = text;
    let mut total: u64 = 0;
    // Index into UNITS of the last unit seen: units must strictly decrease.
    let mut last_unit: Option<usize> = None;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let (number, after) = rest.split_at(digits);
        if after.starts_with('.') {
            return Err(format!(
                "{text:?}: use whole numbers of a smaller unit (1500ms, not 1.5s)"
            ));
        }
        // "ms" before "m", or "5ms" would read as 5 minutes and a stray "s".
        let Some(unit) = [3, 0, 1, 2]
            .into_iter()
            .find(|&i| after.starts_with(UNITS[i].0))
        else {
            return Err(bad());
        };
        if last_unit.is_some_and(|last| unit <= last) {
            return Err(format!(
                "{text:?}: units must go from largest to smallest, each once (like 1h30m)"
            ));
        }
        last_unit = Some(unit);
        let too_long = || format!("{text:?} is too long");
        let n: u64 = number.parse().map_err(|_| too_long())?;
        let ms = n.checked_mul(UNITS[unit].1).ok_or_else(too_long)?;
        total = total.checked_add(ms).ok_or_else(too_long)?;
        rest = &after[UNITS[unit].0.len()..];
    }
    Ok(total)
}

/// The canonical spelling: one number in the largest unit that divides the
/// duration exactly (`0s`, `1500ms`, `5s`, `90s`, `2m`, `1h`).
pub(crate) fn format_ms(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_owned();
    }
    let (unit, size) = UNITS
        .into_iter()
        .find(|(_, size)| ms.checked_rem(*size) == Some(0))
        .unwrap_or(("ms", 1));
    format!("{}{unit}", ms / size)
}

/// For `#[serde(serialize_with)]` on `*_ms` fields: written as the manifest
/// writes them, so canonical JSON parses back to the same manifest.
pub(crate) fn serialize<S: serde::Serializer>(ms: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format_ms(*ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_combinations() {
        let cases = [
            ("0s", 0),
            ("500ms", 500),
            ("5s", 5_000),
            ("2m", 120_000),
            ("1h", 3_600_000),
            ("1m30s", 90_000),
            ("1h1m1s1ms", 3_661_001),
            ("90s", 90_000),
        ];
        for (text, want) in cases {
            assert_eq!(parse_ms(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_whole_duration_with_units() {
        for text in [
            "",
            "5",
            "s",
            "5 s",
            "1.5s",
            "5sec",
            "-5s",
            "5S",
            "1s1m",
            "1s1s",
            "5ms5",
            " 5s",
            "99999999999999999999h",
        ] {
            assert!(parse_ms(text).is_err(), "{text:?} should be rejected");
        }
    }

    #[test]
    fn formats_canonically_and_round_trips() {
        for (ms, text) in [
            (0, "0s"),
            (1_500, "1500ms"),
            (60_000, "1m"),
            (90_000, "90s"),
            (5_400_000, "90m"),
            (7_200_000, "2h"),
        ] {
            assert_eq!(format_ms(ms), text);
            assert_eq!(parse_ms(text), Ok(ms));
        }
    }
}
