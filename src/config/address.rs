//! Listening addresses as written (`"0.0.0.0:8080"`), with an error that shows the right form.

use std::fmt;
use std::net::SocketAddr;

use serde::Deserializer;
use serde::de::{self, Visitor};

const EXPECTED: &str = "an address and port such as \"0.0.0.0:8080\" (every interface), \
                        \"127.0.0.1:8080\" or \"[::]:8080\"";

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    struct Text;
    impl Visitor<'_> for Text {
        type Value = SocketAddr;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(EXPECTED)
        }
        fn visit_str<E: de::Error>(self, text: &str) -> Result<SocketAddr, E> {
            text.parse().map_err(|_| {
                let hint = match text.strip_prefix(':') {
                    Some(port) => format!("; for every interface write \"0.0.0.0:{port}\""),
                    None => String::new(),
                };
                E::custom(format!("got {text:?}, expected {EXPECTED}{hint}"))
            })
        }
        fn visit_i64<E: de::Error>(self, port: i64) -> Result<SocketAddr, E> {
            Err(E::custom(format!(
                "got {port}, expected {EXPECTED}; for every interface write \"0.0.0.0:{port}\""
            )))
        }
        fn visit_u64<E: de::Error>(self, port: u64) -> Result<SocketAddr, E> {
            self.visit_i64(port as i64)
        }
    }
    d.deserialize_any(Text)
}

/// An address that may be left out (the listener is then off).
pub mod optional {
    use std::net::SocketAddr;

    use serde::Deserializer;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        super::deserialize(d).map(Some)
    }
}
