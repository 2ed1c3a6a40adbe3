//! What RFC 9110, 9112 and 9113 ask of a gateway, from the client's side on raw sockets: each
//! refused request gets its status (and, where wakegate answers, a short reason), the
//! connection closes where framing can no longer be trusted, the refusal is counted in
//! `wakegate_rejected_requests_total{reason}`, and nothing reaches the upstream, which records
//! every request it receives.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wakegate_test_support::h2_raw::*;
use wakegate_test_support::*;

/// The request head limits the edge runs with here.
const HEAD: &str = "[limits]\nmax_header_bytes = 100000\nmax_headers = 30\n";

/// wakegate in front of a recording upstream routed as `app.localhost`.
struct Edge {
    wg: Wakegate,
    upstream: RecordingUpstream,
}

impl Edge {
    async fn start() -> Edge {
        let upstream = RecordingUpstream::start().await;
        let target = format!(
            "[[target]]\nname = \"app\"\nhosts = [\"app.localhost\"]\nupstream = \"{}\"\n",
            upstream.addr
        );
        let wg = Wakegate::start(HEAD, &target).await;
        Edge { wg, upstream }
    }

    async fn rejected(&self, reason: &str) -> f64 {
        let metrics = self.wg.metrics().await;
        metric(
            &metrics,
            "wakegate_rejected_requests_total",
            &format!("service=\"\",reason=\"{reason}\""),
        )
        .unwrap_or_else(|| panic!("reason {reason} is exported: {metrics}"))
    }

    /// Waits until `reason` has been counted `count` times (hyper's refusals are counted
    /// once their connection has ended, a moment after the client sees it close).
    async fn wait_rejected(&self, reason: &str, count: f64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let now = self.rejected(reason).await;
            if now == count {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{reason} counted {now} times, expected {count}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `request` (which makes its own connection end) and asserts what the client sees
    /// of a refusal: `status`, the connection closed, the body saying `says` (when wakegate
    /// answers; hyper's answers have no body), the refusal counted as `reason`, and nothing
    /// received upstream.
    async fn assert_refused(
        &self,
        case: &str,
        request: &str,
        status: u16,
        reason: &str,
        says: &str,
    ) {
        let before = self.rejected(reason).await;
        // raw_exchange reads until the connection closes, and fails if it stays open.
        let response = raw_exchange(self.wg.proxy, request).await;
        assert_eq!(raw_status(&response), status, "{case}: {response}");
        assert!(
            response.to_ascii_lowercase().contains("connection: close"),
            "{case}: says it closes: {response}"
        );
        assert!(response.contains(says), "{case}: says {says:?}: {response}");
        self.wait_rejected(reason, before + 1.0).await;
        assert!(
            self.upstream.received().is_empty(),
            "{case}: reached the upstream: {:?}",
            self.upstream.uris()
        );
    }

    /// Sends `request` and returns everything read until the connection closes.
    async fn exchange(&self, request: &str) -> String {
        raw_exchange(self.wg.proxy, request).await
    }
}

/// A target's own count of a rejection reason.
fn target_rejected(metrics: &str, reason: &str) -> Option<f64> {
    metric(
        metrics,
        "wakegate_rejected_requests_total",
        &format!("service=\"app\",reason=\"{reason}\""),
    )
}

fn get(path: &str, headers: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: app.localhost\r\n{headers}Connection: close\r\n\r\n")
}

/// The statuses of the responses in a raw HTTP/1.1 stream, in order.
fn statuses(raw: &str) -> Vec<u16> {
    raw.split("HTTP/1.1 ")
        .skip(1)
        .map(|rest| rest[..3].parse().expect("a status code"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Message framing: request smuggling (RFC 9112 §6)

#[tokio::test]
async fn ambiguous_or_invalid_framing_is_refused_before_the_upstream() {
    let edge = Edge::start().await;
    let post = |headers: &str, body: &str| {
        format!("POST / HTTP/1.1\r\nHost: app.localhost\r\n{headers}\r\n{body}")
    };
    // hyper's parser refuses these with 400 and closes; counted from the connection's error.
    for (case, request) in [
        (
            "conflicting Content-Length",
            post("Content-Length: 3\r\nContent-Length: 4\r\n", "abcd"),
        ),
        (
            "Content-Length list",
            post("Content-Length: 3, 4\r\n", "abcd"),
        ),
        (
            "negative Content-Length",
            post("Content-Length: -1\r\n", ""),
        ),
        (
            "signed Content-Length",
            post("Content-Length: +3\r\n", "abc"),
        ),
        (
            "chunked not last",
            post("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"),
        ),
        (
            "xchunked",
            post("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"),
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            "POST / HTTP/1.0\r\nHost: app.localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                .to_owned(),
        ),
    ] {
        edge.assert_refused(case, &request, 400, "smuggling", "")
            .await;
    }
    // What hyper lets through and wakegate refuses, with a reason.
    edge.assert_refused(
        "chunked twice",
        &post(
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "0\r\n\r\n",
        ),
        400,
        "smuggling",
        "chunked applied more than once",
    )
    .await;
    edge.assert_refused(
        "a coding other than chunked",
        &post("Transfer-Encoding: gzip, chunked\r\n", "0\r\n\r\n"),
        501,
        "transfer_coding",
        "transfer codings other than chunked",
    )
    .await;
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_read_as_chunked_and_the_connection_closed() {
    let edge = Edge::start().await;
    // The classic CL.TE and TE.CL smuggling attempts: whatever follows the chunked body must
    // not become a request of its own (RFC 9112 §6.3: the chunked coding wins, then close).
    for (case, headers) in [
        (
            "CL then TE",
            "Content-Length: 35\r\nTransfer-Encoding: chunked\r\n",
        ),
        (
            "TE then CL",
            "Transfer-Encoding: chunked\r\nContent-Length: 35\r\n",
        ),
    ] {
        edge.upstream.clear();
        let request = format!(
            "POST /first HTTP/1.1\r\nHost: app.localhost\r\n{headers}\r\n3\r\nabc\r\n0\r\n\r\n\
             GET /smuggled HTTP/1.1\r\nHost: app.localhost\r\n\r\n"
        );
        let response = edge.exchange(&request).await;
        assert_eq!(
            statuses(&response),
            [200],
            "{case}: one answer, then closed: {response}"
        );
        let received = edge.upstream.received();
        assert_eq!(edge.upstream.uris(), ["/first"], "{case}");
        assert_eq!(&received[0].body[..], b"abc", "{case}");
        assert!(
            received[0]
                .headers
                .get("content-length")
                .is_none_or(|v| v == "3"),
            "{case}: no stale Content-Length: {:?}",
            received[0].headers
        );
    }
}

#[tokio::test]
async fn framing_that_is_valid_however_it_looks_reaches_the_upstream_once() {
    let edge = Edge::start().await;
    for (case, headers, body, expected) in [
        (
            "identical Content-Length twice",
            "Content-Length: 3\r\nContent-Length: 3\r\n",
            "abc",
            "abc",
        ),
        (
            "chunked with whitespace around it",
            "Transfer-Encoding:  chunked \r\n",
            "3\r\nabc\r\n0\r\n\r\n",
            "abc",
        ),
        (
            "chunk extensions",
            "Transfer-Encoding: chunked\r\n",
            "3;name=value\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\n",
            "abcde",
        ),
        (
            "upper-case chunk size",
            "Transfer-Encoding: chunked\r\n",
            "A\r\n0123456789\r\n0\r\n\r\n",
            "0123456789",
        ),
    ] {
        edge.upstream.clear();
        let request = format!(
            "POST /ok HTTP/1.1\r\nHost: app.localhost\r\nConnection: close\r\n{headers}\r\n{body}"
        );
        let response = edge.exchange(&request).await;
        assert_eq!(raw_status(&response), 200, "{case}: {response}");
        let received = edge.upstream.received();
        assert_eq!(received.len(), 1, "{case}");
        assert_eq!(&received[0].body[..], expected.as_bytes(), "{case}");
    }
}

#[tokio::test]
async fn a_malformed_chunked_body_never_reaches_the_upstream_as_a_request() {
    let edge = Edge::start().await;
    for (i, (case, body)) in [
        (
            "chunk size overflow",
            "fffffffffffffffff1\r\nabc\r\n0\r\n\r\n",
        ),
        ("negative chunk size", "-3\r\nabc\r\n0\r\n\r\n"),
        ("chunk size not hex", "3x\r\nabc\r\n0\r\n\r\n"),
        ("no CRLF after chunk data", "3\r\nabcX0\r\n\r\n"),
        ("bare LF after chunk data", "3\r\nabc\n0\r\n\r\n"),
    ]
    .into_iter()
    .enumerate()
    {
        edge.upstream.clear();
        let request = format!(
            "POST /chunks HTTP/1.1\r\nHost: app.localhost\r\nTransfer-Encoding: chunked\r\n\r\n{body}\
             GET /smuggled HTTP/1.1\r\nHost: app.localhost\r\n\r\n"
        );
        // The head was good, so the request was on its way to the upstream when the body
        // broke: wakegate answers 400 and closes, the upstream never gets a whole request.
        let response = edge.exchange(&request).await;
        assert_eq!(raw_status(&response), 400, "{case}: {response}");
        assert!(
            response.contains("malformed or incomplete"),
            "{case}: {response}"
        );
        assert!(
            !response.contains("HTTP/1.1 200"),
            "{case}: /smuggled answered"
        );
        assert_eq!(
            target_rejected(&edge.wg.metrics().await, "bad_body"),
            Some((i + 1) as f64),
            "{case}"
        );
        // What the upstream got of it is an aborted request; wait a moment for it to notice.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            edge.upstream.received().is_empty(),
            "{case}: the upstream received {:?}",
            edge.upstream.uris()
        );
    }
}

// ---------------------------------------------------------------------------------------
// Host and request target (RFC 9112 §3.2, RFC 9110 §7.2)

#[tokio::test]
async fn http11_requests_need_exactly_one_valid_host() {
    let edge = Edge::start().await;
    for (case, request, says) in [
        (
            "no Host",
            "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
            "missing Host header",
        ),
        (
            "two Hosts",
            "GET / HTTP/1.1\r\nHost: app.localhost\r\nHost: other.localhost\r\nConnection: close\r\n\r\n",
            "more than one Host header",
        ),
        (
            "user information",
            "GET / HTTP/1.1\r\nHost: user@app.localhost\r\nConnection: close\r\n\r\n",
            "invalid Host header",
        ),
        (
            "a port that is no number",
            "GET / HTTP/1.1\r\nHost: app.localhost:http\r\nConnection: close\r\n\r\n",
            "invalid Host header",
        ),
        (
            "a path in Host",
            "GET / HTTP/1.1\r\nHost: app.localhost/admin\r\nConnection: close\r\n\r\n",
            "invalid Host header",
        ),
        (
            "an empty Host",
            "GET / HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",
            "invalid Host header",
        ),
    ] {
        edge.assert_refused(case, request, 400, "bad_request", says)
            .await;
    }
}

#[tokio::test]
async fn absolute_form_is_routed_by_its_authority_which_the_upstream_gets_as_host() {
    let edge = Edge::start().await;
    // RFC 9112 §3.2.2: the authority of an absolute-form target wins over Host.
    let response = edge
        .exchange(
            "GET http://app.localhost/abs?q=1 HTTP/1.1\r\nHost: elsewhere.localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert_eq!(raw_status(&response), 200, "{response}");
    let received = edge.upstream.received();
    assert_eq!(edge.upstream.uris(), ["/abs?q=1"], "origin-form upstream");
    assert_eq!(received[0].headers["host"], "app.localhost");

    // CONNECT for a host wakegate does not route opens no tunnel anywhere.
    let before = edge.rejected("no_route").await;
    let response = edge
        .exchange("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(raw_status(&response), 404, "{response}");
    edge.wait_rejected("no_route", before + 1.0).await;

    // asterisk-form goes to the Host's target as it is.
    edge.upstream.clear();
    let response = edge
        .exchange("OPTIONS * HTTP/1.1\r\nHost: app.localhost\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(raw_status(&response), 200, "{response}");
    assert_eq!(edge.upstream.uris(), ["*"]);
}

// ---------------------------------------------------------------------------------------
// Size limits, characters and line endings (RFC 9112 §2, §3, §5)

#[tokio::test]
async fn oversized_heads_get_431_or_414_from_hyper_and_are_counted() {
    let edge = Edge::start().await;
    let big = "x".repeat(100_000);
    edge.assert_refused(
        "a header beyond max_header_bytes",
        &get("/", &format!("X-Big: {big}\r\n")),
        431,
        "header_too_large",
        "",
    )
    .await;
    let many: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    edge.assert_refused(
        "more than max_headers",
        &get("/", &many),
        431,
        "header_too_large",
        "",
    )
    .await;
    // hyper refuses a request line beyond 65,534 bytes with 414 when the head fits.
    let long = format!("/{}", "u".repeat(70_000));
    edge.assert_refused("a URI too long", &get(&long, ""), 414, "uri_too_long", "")
        .await;
}

#[tokio::test]
async fn malformed_heads_get_400_from_hyper_and_are_counted() {
    let edge = Edge::start().await;
    for (case, request) in [
        (
            "whitespace before the colon",
            "GET / HTTP/1.1\r\nHost : app.localhost\r\nConnection: close\r\n\r\n",
        ),
        (
            "obs-fold",
            "GET / HTTP/1.1\r\nHost: app.localhost\r\nX-A: 1\r\n 2\r\nConnection: close\r\n\r\n",
        ),
        (
            "NUL in a value",
            "GET / HTTP/1.1\r\nHost: app.localhost\r\nX-A: a\0b\r\nConnection: close\r\n\r\n",
        ),
        (
            "a separator in a name",
            "GET / HTTP/1.1\r\nHost: app.localhost\r\nX(A): 1\r\nConnection: close\r\n\r\n",
        ),
        (
            "bare CR",
            "GET / HTTP/1.1\rHost: app.localhost\r\nConnection: close\r\n\r\n",
        ),
        (
            "a control character in the target",
            "GET /a\x7fb HTTP/1.1\r\nHost: app.localhost\r\nConnection: close\r\n\r\n",
        ),
        (
            "a space in the target",
            "GET /a b HTTP/1.1\r\nHost: app.localhost\r\nConnection: close\r\n\r\n",
        ),
        (
            "a lower-case version",
            "GET / http/1.1\r\nHost: app.localhost\r\nConnection: close\r\n\r\n",
        ),
        (
            "an unknown version",
            "GET / HTTP/1.2\r\nHost: app.localhost\r\nConnection: close\r\n\r\n",
        ),
    ] {
        edge.assert_refused(case, request, 400, "bad_request", "")
            .await;
    }
}

#[tokio::test]
async fn bare_lf_line_endings_are_accepted_as_rfc_9112_allows() {
    let edge = Edge::start().await;
    let response = edge
        .exchange("GET /lf HTTP/1.1\nHost: app.localhost\nConnection: close\n\n")
        .await;
    assert_eq!(raw_status(&response), 200, "{response}");
    assert_eq!(edge.upstream.uris(), ["/lf"]);
}

// ---------------------------------------------------------------------------------------
// Headers for one hop or for a proxy (RFC 9110 §7.6.1, §11.7.4)

#[tokio::test]
async fn hop_by_hop_and_proxy_headers_never_reach_the_upstream() {
    let edge = Edge::start().await;
    let response = edge
        .exchange(&get(
            "/",
            "Connection: X-Secret, X-Other\r\nX-Secret: 1\r\nX-Other: 2\r\nKeep-Alive: timeout=5\r\n\
             Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\n\
             TE: gzip, trailers\r\nUpgrade: something\r\nX-End-To-End: kept\r\n",
        ))
        .await;
    assert_eq!(raw_status(&response), 200, "{response}");
    let received = edge.upstream.received();
    let headers = &received[0].headers;
    for name in [
        "x-secret",
        "x-other",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(
            headers.get(name).is_none(),
            "{name} reached the upstream: {headers:?}"
        );
    }
    assert_eq!(headers["x-end-to-end"], "kept");
}

// ---------------------------------------------------------------------------------------
// Messages without bodies, trailers, pipelining, keep-alive (RFC 9110 §9.3.2, §15; 9112 §9)

#[tokio::test]
async fn head_204_and_304_answers_have_no_body_and_the_connection_stays_in_step() {
    let edge = Edge::start().await;
    // Pipelined on one connection: a body wrongly sent with any of them would be read as the
    // start of the next response.
    let request = "HEAD /head HTTP/1.1\r\nHost: app.localhost\r\n\r\n\
                   GET /status/204 HTTP/1.1\r\nHost: app.localhost\r\n\r\n\
                   GET /status/304 HTTP/1.1\r\nHost: app.localhost\r\n\r\n\
                   GET /last HTTP/1.1\r\nHost: app.localhost\r\nConnection: close\r\n\r\n";
    let response = edge.exchange(request).await;
    assert_eq!(statuses(&response), [200, 204, 304, 200], "{response}");
    assert!(
        response.ends_with("\r\n\r\nok"),
        "only the last one has a body: {response}"
    );
    assert_eq!(response.matches("ok").count(), 1, "{response}");
    assert_eq!(
        edge.upstream.uris(),
        ["/head", "/status/204", "/status/304", "/last"],
        "pipelined requests reach the upstream in order"
    );
}

#[tokio::test]
async fn request_trailers_and_bodies_of_pipelined_requests_are_passed_on() {
    let edge = Edge::start().await;
    let request = "POST /one HTTP/1.1\r\nHost: app.localhost\r\nTransfer-Encoding: chunked\r\n\
                   Trailer: X-Checksum\r\n\r\n3\r\nabc\r\n0\r\nX-Checksum: 42\r\n\r\n\
                   POST /two HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 2\r\n\
                   Connection: close\r\n\r\nde";
    let response = edge.exchange(request).await;
    assert_eq!(statuses(&response), [200, 200], "{response}");
    let received = edge.upstream.received();
    assert_eq!(edge.upstream.uris(), ["/one", "/two"]);
    assert_eq!(&received[0].body[..], b"abc");
    assert_eq!(&received[1].body[..], b"de");
    assert_eq!(
        received[0]
            .trailers
            .as_ref()
            .map(|t| t["x-checksum"].clone()),
        Some(http::HeaderValue::from_static("42")),
        "the announced trailer reaches the upstream"
    );
}

#[tokio::test]
async fn pipelined_requests_with_and_without_bodies_are_answered_in_order_on_one_connection() {
    // Requests without a body are served by wakegate's own HTTP/1 server, which hands the
    // connection to hyper at the first with one: across the switch nothing is lost, repeated
    // or answered out of order.
    let edge = Edge::start().await;
    let request = "GET /one HTTP/1.1\r\nHost: app.localhost\r\n\r\n\
                   HEAD /two HTTP/1.1\r\nHost: app.localhost\r\n\r\n\
                   POST /three HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 3\r\n\r\nxyz\
                   GET /four HTTP/1.1\r\nHost: app.localhost\r\nConnection: close\r\n\r\n";
    let response = edge.exchange(request).await;
    assert_eq!(statuses(&response), [200, 200, 200, 200], "{response}");
    assert_eq!(edge.upstream.uris(), ["/one", "/two", "/three", "/four"]);
    assert_eq!(&edge.upstream.received()[2].body[..], b"xyz");
    // Each answer carries its date, from either server.
    assert_eq!(response.matches("\r\ndate: ").count(), 4, "{response}");
}

#[tokio::test]
async fn http10_connections_close_unless_the_client_asks_to_keep_them_alive() {
    let edge = Edge::start().await;
    // Without keep-alive: one answer, then closed (raw_exchange waits for the close).
    let response = edge
        .exchange("GET /a HTTP/1.0\r\nHost: app.localhost\r\n\r\n")
        .await;
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );

    // With it: the connection serves a second request.
    let mut stream = TcpStream::connect(edge.wg.proxy).await.unwrap();
    let keep_alive = "GET /b HTTP/1.0\r\nHost: app.localhost\r\nConnection: keep-alive\r\n\r\n";
    stream.write_all(keep_alive.as_bytes()).await.unwrap();
    let first = read_response(&mut stream).await;
    assert!(first.contains(" 200 "), "{first}");
    assert!(
        first
            .to_ascii_lowercase()
            .contains("connection: keep-alive"),
        "{first}"
    );
    stream
        .write_all(b"GET /c HTTP/1.0\r\nHost: app.localhost\r\n\r\n")
        .await
        .unwrap();
    let mut rest = String::new();
    within(
        5,
        "the second answer, then the close",
        stream.read_to_string(&mut rest),
    )
    .await
    .unwrap();
    assert!(rest.contains(" 200 "), "{rest}");
    assert_eq!(edge.upstream.uris(), ["/a", "/b", "/c"]);
}

/// Reads one response with a `Content-Length` body from `stream`.
async fn read_response(stream: &mut TcpStream) -> String {
    within(5, "a response", async {
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&raw).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if raw.len() >= end + 4 + length {
                    return text;
                }
            }
        }
    })
    .await
}

#[tokio::test]
async fn upgrades_the_upstream_declines_or_http10_asks_for_are_plain_requests() {
    let edge = Edge::start().await;
    // An h2c upgrade (removed by RFC 9113) and a WebSocket upgrade on HTTP/1.0 (upgrades
    // need HTTP/1.1): answered as ordinary requests, the connection stays HTTP/1.
    for (case, request) in [
        (
            "h2c",
            "GET /h2c HTTP/1.1\r\nHost: app.localhost\r\nConnection: Upgrade, HTTP2-Settings\r\n\
             Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
        ),
        (
            "websocket on HTTP/1.0",
            "GET /ws10 HTTP/1.0\r\nHost: app.localhost\r\nConnection: keep-alive, Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n",
        ),
    ] {
        edge.upstream.clear();
        let mut stream = TcpStream::connect(edge.wg.proxy).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let response = read_response(&mut stream).await;
        assert!(response.contains(" 200 "), "{case}: {response}");
        assert!(!response.contains(" 101 "), "{case}: {response}");
        let received = edge.upstream.received();
        assert_eq!(received.len(), 1, "{case}");
        assert!(
            received[0].headers.get("http2-settings").is_none(),
            "{case}: named by Connection"
        );
        if case == "websocket on HTTP/1.0" {
            assert!(received[0].headers.get("upgrade").is_none(), "{case}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Interim responses (RFC 9110 §10.1.1, §15.2)

#[tokio::test]
async fn expect_100_continue_is_answered_only_once_a_held_request_goes_to_its_target() {
    let target = demo_target("cold", "cold.localhost", "1s");
    let wg = Wakegate::start("", &target).await;
    let mut stream = TcpStream::connect(wg.proxy).await.unwrap();
    let began = tokio::time::Instant::now();
    stream
        .write_all(
            b"POST /echo HTTP/1.1\r\nHost: cold.localhost\r\nExpect: 100-continue\r\n\
              Content-Length: 5\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    // The client waits for 100 before sending its body: it comes once the target is ready
    // and the request is forwarded, not while it is held (nothing would read the body then).
    let mut buf = [0u8; 256];
    let n = within(15, "100 Continue", stream.read(&mut buf))
        .await
        .unwrap();
    let interim = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    assert!(
        began.elapsed() >= Duration::from_millis(900),
        "100 came during the hold, after {:?}",
        began.elapsed()
    );
    stream.write_all(b"hello").await.unwrap();
    let mut rest = String::new();
    within(10, "the answer", stream.read_to_string(&mut rest))
        .await
        .unwrap();
    let whole = format!("{interim}{rest}");
    assert!(whole.contains("HTTP/1.1 200 OK"), "{whole}");
    assert!(
        whole.ends_with("hello"),
        "the body reached the target: {whole}"
    );
}

#[tokio::test]
async fn an_http_1_0_upstream_is_answered_for_in_http_1_1_and_the_client_keeps_its_connection() {
    // Python's http.server, for one, answers in HTTP/1.0 and closes.
    let addr = raw_upstream(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let target =
        format!("[[target]]\nname = \"old\"\nhosts = [\"old.localhost\"]\nupstream = \"{addr}\"\n");
    let wg = Wakegate::start("", &target).await;
    let response = raw_exchange(
        wg.proxy,
        "GET / HTTP/1.1\r\nHost: old.localhost\r\n\r\n\
         GET / HTTP/1.1\r\nHost: old.localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        response.matches("HTTP/1.1 200 OK\r\n").count(),
        2,
        "both answered on the one connection: {response}"
    );
    assert!(!response.contains("HTTP/1.0"), "{response}");
}

#[tokio::test]
async fn hop_by_hop_fields_of_an_upstreams_response_never_reach_the_client() {
    // An upstream that keeps its connection, and one that closes it after each response; both
    // also name a field of their own in `Connection`.
    for (answer, closes) in [
        (
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\
               Connection: X-Up\r\nX-Up: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\n\r\nok"[..],
            false,
        ),
        (
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\
               X-Kept: yes\r\n\r\nok"[..],
            true,
        ),
    ] {
        let addr = raw_upstream(answer).await;
        let target = format!(
            "[[target]]\nname = \"up\"\nhosts = [\"up.localhost\"]\nupstream = \"{addr}\"\n"
        );
        let wg = Wakegate::start("", &target).await;
        let response = raw_exchange(
            wg.proxy,
            "GET /a HTTP/1.1\r\nHost: up.localhost\r\n\r\n\
             GET /b HTTP/1.1\r\nHost: up.localhost\r\nConnection: close\r\n\r\n",
        )
        .await
        .to_ascii_lowercase();
        assert_eq!(
            response.matches("http/1.1 200 ok\r\n").count(),
            2,
            "both answered on the client's one connection (upstream closes: {closes}): {response}"
        );
        assert_eq!(response.matches("x-kept: yes\r\n").count(), 2, "{response}");
        for hop_by_hop in ["x-up:", "keep-alive", "connection: close\r\n"] {
            assert_eq!(
                response.matches(hop_by_hop).count(),
                // The client's own `Connection: close` is answered with one.
                usize::from(hop_by_hop.starts_with("connection")),
                "{hop_by_hop} (upstream closes: {closes}): {response}"
            );
        }
    }
}

#[tokio::test]
async fn an_upstreams_103_early_hints_does_not_disturb_its_final_response() {
    // A raw upstream: 103, then the final 200.
    let addr = raw_upstream(
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n\
          HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal",
    )
    .await;
    let target = format!(
        "[[target]]\nname = \"hints\"\nhosts = [\"hints.localhost\"]\nupstream = \"{addr}\"\n"
    );
    let wg = Wakegate::start("", &target).await;
    let response = raw_exchange(
        wg.proxy,
        "GET / HTTP/1.1\r\nHost: hints.localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    // wakegate's upstream client reads past interim answers and hyper's server cannot send
    // them on: the
    // client gets the final answer whole (RFC 9110 §15.2 would forward the 103).
    assert_eq!(statuses(&response), [200], "{response}");
    assert!(response.ends_with("final"), "{response}");
}

// ---------------------------------------------------------------------------------------
// HTTP/2 with prior knowledge (RFC 9113 §8.2, §8.3)

const GET: [(&str, &str); 4] = [
    (":method", "GET"),
    (":scheme", "http"),
    (":authority", "app.localhost"),
    (":path", "/h2"),
];

#[tokio::test]
async fn malformed_http2_requests_are_reset_and_never_reach_the_upstream() {
    let edge = Edge::start().await;
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut fields = GET.to_vec();
        fields.extend_from_slice(extra);
        fields
    };
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("Connection", with(&[("connection", "keep-alive")])),
        ("Keep-Alive", with(&[("keep-alive", "timeout=5")])),
        (
            "Transfer-Encoding",
            with(&[("transfer-encoding", "chunked")]),
        ),
        ("TE other than trailers", with(&[("te", "gzip")])),
        ("Upgrade", with(&[("upgrade", "websocket")])),
        ("an unknown pseudo-header", with(&[(":foo", "bar")])),
        ("a pseudo-header after a field", {
            let mut f = with(&[("x-a", "1")]);
            f.push((":status", "200"));
            f
        }),
        ("an upper-case name", with(&[("X-Upper", "1")])),
        ("no :path", GET[..3].to_vec()),
        ("no :method", GET[1..].to_vec()),
    ];
    for (case, fields) in cases {
        let mut stream = TcpStream::connect(edge.wg.proxy).await.unwrap();
        stream.write_all(&h2_request(&fields)).await.unwrap();
        let (kind, payload) = h2_first_of(&mut stream, &[HEADERS, RST_STREAM, GOAWAY]).await;
        assert_ne!(kind, HEADERS, "{case}: answered");
        assert_eq!(error_code(kind, &payload), 1, "{case}: PROTOCOL_ERROR");
    }
    // A well-formed one on the same terms is answered, so the cases above were refused for
    // what they added.
    let mut stream = TcpStream::connect(edge.wg.proxy).await.unwrap();
    stream
        .write_all(&h2_request(&with(&[("te", "trailers")])))
        .await
        .unwrap();
    let (kind, _) = h2_first_of(&mut stream, &[HEADERS, RST_STREAM, GOAWAY]).await;
    assert_eq!(kind, HEADERS, "the well-formed request is answered");
    assert_eq!(
        edge.upstream.uris(),
        ["/h2"],
        "only the well-formed one arrived"
    );
}
