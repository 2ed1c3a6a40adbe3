//! What wakegate needs to know of gRPC on its request path: which requests are gRPC calls, and
//! their deadline (`grpc-timeout`, from the gRPC over HTTP/2 protocol).

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, header};

pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Whether a message's `Content-Type` is gRPC's (`application/grpc`, `application/grpc+proto`
/// and the like, gRPC-Web's included).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The call's `grpc-timeout`: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
/// `None` when absent or malformed (a malformed one is the server's to refuse).
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(&GRPC_TIMEOUT)?.as_bytes();
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `remaining` as a `grpc-timeout` value, in the finest unit that fits in 8 digits.
pub fn timeout_value(remaining: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = remaining.as_nanos();
    let (n, unit) = [
        (nanos, 'n'),
        (nanos / 1_000, 'u'),
        (nanos / 1_000_000, 'm'),
        (nanos / 1_000_000_000, 'S'),
        (nanos / 60_000_000_000, 'M'),
    ]
    .into_iter()
    .find(|(n, _)| *n <= MAX)
    .unwrap_or(((nanos / 3_600_000_000_000).min(MAX), 'H'));
    HeaderValue::try_from(format!("{n}{unit}")).expect("digits and a letter")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(&GRPC_TIMEOUT, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_malformed_ones_ignored() {
        for (value, expected) in [
            ("1H", Some(Duration::from_secs(3600))),
            ("2M", Some(Duration::from_secs(120))),
            ("3S", Some(Duration::from_secs(3))),
            ("250m", Some(Duration::from_millis(250))),
            ("7u", Some(Duration::from_micros(7))),
            ("99999999n", Some(Duration::from_nanos(99_999_999))),
            ("100000000m", None),
            ("m", None),
            ("10", None),
            ("10s", None),
            ("-1S", None),
            ("1.5S", None),
        ] {
            assert_eq!(timeout(&with_timeout(value)), expected, "{value}");
        }
        assert_eq!(timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn a_remaining_time_is_written_in_the_finest_unit_that_fits() {
        assert_eq!(timeout_value(Duration::from_nanos(1500)), "1500n");
        assert_eq!(timeout_value(Duration::from_millis(250)), "250000u");
        assert_eq!(timeout_value(Duration::from_secs(1)), "1000000u");
        assert_eq!(timeout_value(Duration::from_secs(200)), "200000m");
        assert_eq!(timeout_value(Duration::from_secs(500_000)), "500000S");
        for d in [1, 999, 123_456_789, 86_400_000_000] {
            let d = Duration::from_micros(d);
            let back = timeout(&with_timeout_value(timeout_value(d))).unwrap();
            assert!(
                back <= d && d - back < d / 1000 + Duration::from_micros(1),
                "{d:?} {back:?}"
            );
        }
    }

    fn with_timeout_value(value: HeaderValue) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(&GRPC_TIMEOUT, value);
        headers
    }
}
