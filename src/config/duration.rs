//! Durations written as humans write them (`"500ms"`, `"30s"`, `"5m"`), with an error that
//! names the value and the expected form.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer};

const EXPECTED: &str = "a duration such as \"500ms\", \"30s\" or \"5m\"";

fn parse<E: de::Error>(text: &str) -> Result<Duration, E> {
    humantime::parse_duration(text)
        .map_err(|e| E::custom(format!("got {text:?} ({e}), expected {EXPECTED}")))
}

/// A duration as written; a bare number is refused with the unit it lacks.
struct Written(Duration);

impl<'de> Deserialize<'de> for Written {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl Visitor<'_> for Text {
            type Value = Written;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Written, E> {
                parse(text).map(Written)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Written, E> {
                Err(E::custom(format!(
                    "got {n}, expected a duration with its unit, such as \"{n}s\" or \"{n}ms\""
                )))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Written, E> {
                self.visit_i64(n as i64)
            }
        }
        d.deserialize_any(Text)
    }
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    Written::deserialize(d).map(|w| w.0)
}

pub mod option {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<Written>::deserialize(d)?.map(|w| w.0))
    }
}
