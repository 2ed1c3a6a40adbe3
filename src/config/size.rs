//! Sizes in bytes written as humans write them (`"64MiB"`, `"512 KiB"`, `"1GB"`), or as a
//! whole number of bytes, with an error that names the value and the expected form.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer};

const EXPECTED: &str = "a size such as \"64MiB\", \"512KiB\" or \"1GiB\", or a number of bytes";

/// The units a size may carry, by the factor they stand for.
const UNITS: [(&str, u64); 7] = [
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
];

/// Parses `"64MiB"`, `"64 MiB"`, `"1.5GiB"` or `"4096"`; units are case-insensitive.
pub fn parse(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let unit = unit.trim();
    let factor = if unit.is_empty() {
        1
    } else {
        match UNITS.iter().find(|(u, _)| u.eq_ignore_ascii_case(unit)) {
            Some((_, factor)) => *factor,
            None => {
                return Err(format!(
                    "got {text:?} (unknown unit {unit:?}), expected {EXPECTED}"
                ));
            }
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("got {text:?}, expected {EXPECTED}"))?;
    let bytes = value * factor as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(format!("got {text:?} (too large), expected {EXPECTED}"));
    }
    Ok(bytes.round() as u64)
}

/// `bytes` as a person reads it: `64 MiB`, `1.5 GiB`, `300 B`.
pub fn show(bytes: u64) -> String {
    for (unit, factor) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= factor {
            let value = bytes as f64 / factor as f64;
            return if bytes.is_multiple_of(factor) {
                format!("{} {unit}", bytes / factor)
            } else {
                format!("{value:.1} {unit}")
            };
        }
    }
    format!("{bytes} B")
}

/// A size as written.
struct Written(u64);

impl<'de> Deserialize<'de> for Written {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl Visitor<'_> for Text {
            type Value = Written;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Written, E> {
                parse(text).map(Written).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Written, E> {
                u64::try_from(n)
                    .map(Written)
                    .map_err(|_| E::custom(format!("got {n}, expected {EXPECTED}")))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Written, E> {
                Ok(Written(n))
            }
        }
        d.deserialize_any(Text)
    }
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Written::deserialize(d).map(|w| w.0)
}

pub mod option {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Ok(Option::<Written>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_written() {
        assert_eq!(parse("64MiB"), Ok(64 << 20));
        assert_eq!(parse("64 mib"), Ok(64 << 20));
        assert_eq!(parse("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse("512KB"), Ok(512_000));
        assert_eq!(parse("4096"), Ok(4096));
        assert_eq!(parse("10 B"), Ok(10));
        let unknown = parse("64M").unwrap_err();
        assert!(unknown.contains("unknown unit \"M\""), "{unknown}");
        assert!(parse("MiB").unwrap_err().starts_with("got \"MiB\""));
        assert_eq!(show(64 << 20), "64 MiB");
        assert_eq!(show(3 << 29), "1.5 GiB");
        assert_eq!(show(300), "300 B");
    }
}
