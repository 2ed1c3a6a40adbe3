//! The edge's own checks of a request head, beyond what hyper's parser refuses, and the
//! reasons a request that never reached a target is counted under.
//!
//! hyper refuses malformed HTTP/1 heads itself (400, 414 or 431, then it closes the
//! connection) without calling wakegate: [`Refusal::of_connection_error`] counts those from
//! the connection's error. What hyper accepts but a gateway must not pass on is checked here.

use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderMap};
use http::{Request, Version};

use super::error::ProxyError;

/// Why a request that belongs to no target was answered by wakegate (or hyper) itself: the
/// `reason` of `wakegate_rejected_requests_total` with empty `namespace` and `service`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NoRoute,
    /// Malformed: hyper's parser refused it, or its Host is missing, repeated or invalid.
    BadRequest,
    /// Its head is larger than `limits.max_header_bytes` or has more than `limits.max_headers`.
    HeaderTooLarge,
    UriTooLong,
    /// Its message framing is ambiguous (conflicting Content-Length, a Transfer-Encoding
    /// that is not chunked in the end or on HTTP/1.0, chunked twice).
    Smuggling,
    /// A transfer coding other than chunked (501).
    TransferCoding,
    /// Refused during a drain before a route was looked up.
    ShuttingDown,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::NoRoute,
        Refusal::BadRequest,
        Refusal::HeaderTooLarge,
        Refusal::UriTooLong,
        Refusal::Smuggling,
        Refusal::TransferCoding,
        Refusal::ShuttingDown,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::NoRoute => "no_route",
            Refusal::BadRequest => "bad_request",
            Refusal::HeaderTooLarge => "header_too_large",
            Refusal::UriTooLong => "uri_too_long",
            Refusal::Smuggling => "smuggling",
            Refusal::TransferCoding => "transfer_coding",
            Refusal::ShuttingDown => "shutting_down",
        }
    }

    /// The refusal hyper answered for when a client connection ends with `error`: hyper's
    /// HTTP/1 server answers a head it cannot parse itself (431, 414 or 400) and closes, and
    /// never calls wakegate for it. `None` for errors that are no refused request (the client
    /// went away, a timeout, an HTTP/2 protocol error).
    pub fn of_connection_error(error: &hyper::Error) -> Option<Refusal> {
        if !error.is_parse() {
            return None;
        }
        // hyper tells these apart only in its message (its `Parse` kind is private); the
        // conformance tests notice should the wording change.
        let message = error.to_string();
        Some(if error.is_parse_too_large() {
            if message.contains("URI") {
                Refusal::UriTooLong
            } else {
                Refusal::HeaderTooLarge
            }
        } else if message.contains("content-length") || message.contains("transfer-encoding") {
            Refusal::Smuggling
        } else {
            Refusal::BadRequest
        })
    }
}

/// Requests that never reached a target, by [`Refusal`].
#[derive(Debug, Default)]
pub struct Unrouted {
    counts: [AtomicU64; Refusal::ALL.len()],
}

impl Unrouted {
    pub fn count(&self, why: Refusal) {
        self.counts[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, why: Refusal) -> u64 {
        self.counts[why as usize].load(Ordering::Relaxed)
    }
}

/// Checks what hyper's parser lets through and a gateway must still refuse: an HTTP/1 request
/// without exactly one valid Host (RFC 9112 §3.2), and a transfer coding wakegate would have
/// to forward but cannot (RFC 9112 §6.1). Clean requests cost a few header lookups.
pub fn check<B>(req: &Request<B>) -> Result<(), (Refusal, ProxyError)> {
    let headers = req.headers();
    if req.version() < Version::HTTP_2 {
        check_host(req.version(), headers)?;
        if headers.contains_key(header::TRANSFER_ENCODING) {
            check_transfer_encoding(headers)?;
        }
    }
    Ok(())
}

fn bad(why: &'static str) -> (Refusal, ProxyError) {
    (Refusal::BadRequest, ProxyError::BadRequest(why))
}

fn check_host(version: Version, headers: &HeaderMap) -> Result<(), (Refusal, ProxyError)> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let Some(host) = hosts.next() else {
        // HTTP/1.0 may omit it, but then wakegate has nothing to route by (answered below).
        return if version == Version::HTTP_11 {
            Err(bad("missing Host header"))
        } else {
            Ok(())
        };
    };
    if hosts.next().is_some() {
        return Err(bad("more than one Host header"));
    }
    if is_host(host.as_bytes()) {
        Ok(())
    } else {
        Err(bad("invalid Host header"))
    }
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2, RFC 3986 §3.2.2), no user information; checked in
/// place rather than parsed into an `http::uri::Authority`, which would copy it on every
/// request.
fn is_host(host: &[u8]) -> bool {
    let (name_ok, port) = match host.strip_prefix(b"[") {
        // IP-literal: an IPv6 address (or IPvFuture) in brackets.
        Some(rest) => {
            let Some(end) = rest.iter().position(|&b| b == b']') else {
                return false;
            };
            let literal = &rest[..end];
            let ok = !literal.is_empty()
                && literal
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || b":.v".contains(&b));
            (ok, &rest[end + 1..])
        }
        // reg-name (IPv4 addresses are among them): unreserved, pct-encoded and sub-delims.
        None => {
            let (name, port) = match host.iter().rposition(|&b| b == b':') {
                Some(colon) => host.split_at(colon),
                None => (host, &b""[..]),
            };
            let ok = !name.is_empty()
                && name
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b));
            (ok, port)
        }
    };
    let port_ok = match port.strip_prefix(b":") {
        Some(digits) => {
            (1..=5).contains(&digits.len())
                && digits.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(digits).is_ok_and(|d| d.parse::<u16>().is_ok())
        }
        None => port.is_empty(),
    };
    name_ok && port_ok
}

/// hyper accepts a request whose last transfer coding is chunked and decodes only that one.
fn check_transfer_encoding(headers: &HeaderMap) -> Result<(), (Refusal, ProxyError)> {
    let mut chunked = 0;
    let mut other = false;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let Ok(value) = value.to_str() else {
            return Err((
                Refusal::Smuggling,
                ProxyError::Ambiguous("invalid Transfer-Encoding"),
            ));
        };
        for coding in value.split(',').map(str::trim) {
            if coding.eq_ignore_ascii_case("chunked") {
                chunked += 1;
            } else {
                other = true;
            }
        }
    }
    if chunked > 1 {
        return Err((
            Refusal::Smuggling,
            ProxyError::Ambiguous("chunked applied more than once"),
        ));
    }
    if other {
        // Forwarded without the coding, the body would lose its meaning.
        return Err((Refusal::TransferCoding, ProxyError::UnsupportedCoding));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::post("/").version(version);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn refusal(version: Version, headers: &[(&str, &str)]) -> Option<Refusal> {
        check(&request(version, headers)).err().map(|(why, _)| why)
    }

    #[test]
    fn a_single_valid_host_passes_and_anything_else_is_a_bad_request() {
        const HTTP_10: Version = Version::HTTP_10;
        const HTTP_11: Version = Version::HTTP_11;
        assert_eq!(refusal(HTTP_11, &[("host", "a.example:8080")]), None);
        assert_eq!(refusal(HTTP_11, &[("host", "[::1]:80")]), None);
        assert_eq!(refusal(HTTP_11, &[("host", "[::1]")]), None);
        assert_eq!(refusal(HTTP_11, &[("host", "10.0.0.1:8080")]), None);
        assert_eq!(refusal(HTTP_11, &[("host", "xn--bcher-kva.example")]), None);
        assert_eq!(refusal(HTTP_10, &[]), None);
        assert_eq!(refusal(Version::HTTP_2, &[]), None);
        for hosts in [
            &[][..],
            &[("host", "a.example"), ("host", "a.example")],
            &[("host", "")],
            &[("host", "user@a.example")],
            &[("host", "a.example/path")],
            &[("host", "a example")],
            &[("host", "a.example:port")],
            &[("host", "a.example:")],
            &[("host", "a.example:99999")],
            &[("host", "[::1")],
            &[("host", "[zz]:80")],
            &[("host", "a.example#x")],
        ] {
            assert_eq!(
                refusal(HTTP_11, hosts),
                Some(Refusal::BadRequest),
                "{hosts:?}"
            );
        }
    }

    #[test]
    fn only_a_single_chunked_transfer_coding_passes() {
        let with = |te: &[&str]| {
            let mut headers = vec![("host", "a.example")];
            headers.extend(te.iter().map(|te| ("transfer-encoding", *te)));
            refusal(Version::HTTP_11, &headers)
        };
        assert_eq!(with(&["chunked"]), None);
        assert_eq!(with(&["Chunked"]), None);
        assert_eq!(with(&["chunked, chunked"]), Some(Refusal::Smuggling));
        assert_eq!(with(&["chunked", "chunked"]), Some(Refusal::Smuggling));
        assert_eq!(with(&["gzip, chunked"]), Some(Refusal::TransferCoding));
        assert_eq!(with(&["gzip", "chunked"]), Some(Refusal::TransferCoding));
    }
}
