//! Durations written as humans write them (`"500ms"`, `"30s"`, `"5m"`), with an error that
//! names the value and the expected form.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

const EXPECTED: &str = "a duration such as \"500ms\", \"30s\" or \"5m\"";

fn parse<E: serde::de::Error>(text: &str) -> Result<Duration, E> {
    humantime::parse_duration(text)
        .map_err(|e| E::custom(format!("got {text:?} ({e}), expected {EXPECTED}")))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    parse(&String::deserialize(d)?)
}

pub mod option {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| parse(&text))
            .transpose()
    }
}
