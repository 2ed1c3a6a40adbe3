//! Every way a request can fail inside wakegate, and the one place that turns such a failure
//! into the HTTP response a client sees.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Response, StatusCode, Version, header};

use super::body::ProxyBody;
use crate::target::stats::Reject;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request's framing could be read more than one way (request smuggling).
    #[error("ambiguous request framing: {0}")]
    Ambiguous(&'static str),
    #[error("transfer codings other than chunked are not supported")]
    UnsupportedCoding,
    #[error("no route for this host and path")]
    NoRoute,
    #[error("target {target} already holds {max} waiting requests; retry shortly")]
    QueueFull { target: String, max: u32 },
    #[error("target {target} already holds {} of waiting requests; retry shortly", crate::config::size::show(*.max))]
    QueueBytes { target: String, max: u64 },
    /// All targets' held requests together reached `[limits]`.
    #[error("wakegate already holds {0} waiting requests; retry shortly")]
    HoldLimit(String),
    #[error("wakegate is over its memory budget; retry shortly")]
    MemoryBudget,
    #[error("target {target} did not become ready within {}", humantime::format_duration(*.after))]
    ColdStartTimeout { target: String, after: Duration },
    /// Every instance stayed at its `instance_concurrency` for as long as a hold may last.
    #[error(
        "every instance of target {target} was busy ({limit} requests each at once) for {}; retry shortly",
        humantime::format_duration(*.after)
    )]
    NoFreeSlot {
        target: String,
        after: Duration,
        limit: u32,
    },
    #[error("the request's deadline ({} after it arrived) passed while target {target} was waking", humantime::format_duration(*.after))]
    Deadline { target: String, after: Duration },
    /// What the start met (a path, an OS error, the instance's output) is for the log only.
    #[error("target {target} failed to start")]
    StartFailed {
        target: String,
        #[source]
        reason: Cause,
    },
    /// The client's request body broke off or was malformed while it was being forwarded.
    #[error("the request body for target {target} is malformed or incomplete")]
    ClientBody { target: String },
    #[error(
        "target {target} failed to start {failures} time(s) in a row; the next start is tried in {}",
        humantime::format_duration(Duration::from_secs(retry_after_secs(*.retry_in)))
    )]
    BackingOff {
        target: String,
        failures: u32,
        retry_in: Duration,
    },
    #[error("upstream of target {target} failed before responding")]
    Upstream {
        target: String,
        #[source]
        source: super::pool::UpstreamError,
    },
    /// Every endpoint of the target is unhealthy: the request was not sent.
    #[error(
        "upstream of target {target} has been unhealthy for {}; retry in {}s",
        humantime::format_duration(Duration::from_secs(unhealthy_for.as_secs())),
        retry_after_secs(*.retry_in)
    )]
    Unhealthy {
        target: String,
        unhealthy_for: Duration,
        /// When an endpoint is tried (or checked) again.
        retry_in: Duration,
        #[source]
        last: Cause,
    },
    #[error("upstream of target {target} did not respond within {}", humantime::format_duration(*.after))]
    UpstreamTimeout { target: String, after: Duration },
    #[error("target {target} cannot take a {what}")]
    NotForwarded { target: String, what: &'static str },
    #[error("wakegate is shutting down")]
    ShuttingDown,
    #[error("target {target} was removed from the configuration")]
    TargetRemoved { target: String },
    #[error("too many requests from this client for target {target}; retry in {}s", retry_after_secs(*.retry_after))]
    RateLimited {
        target: String,
        retry_after: Duration,
    },
}

/// What a failure met, in full (a path, an OS error, an instance's output): the cause of
/// [`ProxyError::StartFailed`] and [`ProxyError::Unhealthy`], written to the log and never to
/// the client.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Cause(pub String);

/// The id a failure that wakegate answers itself is logged under, and that its client gets in
/// `X-Request-Id` and in the body: the client's own `X-Request-Id` when it is a plain token
/// (as a front proxy such as nginx or Envoy sets it), else one of wakegate's.
#[derive(Debug, Clone)]
pub struct RequestId(HeaderValue);

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

impl RequestId {
    /// The longest client id taken over.
    const MAX_LEN: usize = 128;

    pub fn new(from_client: Option<&HeaderValue>) -> Self {
        match from_client {
            Some(id) if Self::plain(id.as_bytes()) => RequestId(id.clone()),
            _ => RequestId::generate(),
        }
    }

    /// Letters, digits and `-_.:+/=` only: an id that cannot forge a log line or a field.
    fn plain(id: &[u8]) -> bool {
        (1..=Self::MAX_LEN).contains(&id.len())
            && id
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:+/=".contains(b))
    }

    /// Sixteen hex digits: a per-process random prefix and a counter, unique within a run
    /// and unlikely to repeat across restarts and replicas.
    fn generate() -> Self {
        use std::hash::BuildHasher;
        use std::sync::OnceLock;
        use std::sync::atomic::{AtomicU32, Ordering};
        static PREFIX: OnceLock<u32> = OnceLock::new();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = *PREFIX.get_or_init(|| {
            // std's hasher keys are random per process.
            std::collections::hash_map::RandomState::new().hash_one(std::process::id()) as u32
        });
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{prefix:08x}{n:08x}");
        RequestId(HeaderValue::try_from(id).expect("hex digits are a valid header value"))
    }

    pub fn as_str(&self) -> &str {
        self.0.to_str().expect("checked to be plain ASCII")
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `Retry-After` in whole seconds (RFC 9110 §10.2.3), rounded up so that a client that waits
/// that long is allowed; at least 1.
fn retry_after_secs(after: Duration) -> u64 {
    (after.as_secs() + u64::from(after.subsec_nanos() > 0)).max(1)
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::Ambiguous(_)
            | ProxyError::ClientBody { .. } => StatusCode::BAD_REQUEST,
            ProxyError::NotForwarded { .. } | ProxyError::UnsupportedCoding => {
                StatusCode::NOT_IMPLEMENTED
            }
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::QueueFull { .. }
            | ProxyError::QueueBytes { .. }
            | ProxyError::HoldLimit(_)
            | ProxyError::MemoryBudget
            | ProxyError::NoFreeSlot { .. }
            | ProxyError::BackingOff { .. }
            | ProxyError::Unhealthy { .. }
            | ProxyError::ShuttingDown
            | ProxyError::TargetRemoved { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ColdStartTimeout { .. }
            | ProxyError::Deadline { .. }
            | ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::StartFailed { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The rejection reason counted in `wakegate_rejected_requests_total`, for failures that
    /// belong to a target.
    pub fn reject(&self) -> Option<Reject> {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::Ambiguous(_)
            | ProxyError::UnsupportedCoding
            | ProxyError::NoRoute
            | ProxyError::NotForwarded { .. } => None,
            ProxyError::ClientBody { .. } => Some(Reject::BadBody),
            ProxyError::QueueFull { .. } => Some(Reject::QueueFull),
            ProxyError::QueueBytes { .. } => Some(Reject::QueueBytes),
            ProxyError::HoldLimit(_) => Some(Reject::HoldLimit),
            ProxyError::MemoryBudget => Some(Reject::MemoryBudget),
            ProxyError::ColdStartTimeout { .. } => Some(Reject::ColdStartTimeout),
            ProxyError::NoFreeSlot { .. } => Some(Reject::ConcurrencyTimeout),
            ProxyError::Deadline { .. } => Some(Reject::Deadline),
            ProxyError::StartFailed { .. } => Some(Reject::StartFailed),
            ProxyError::BackingOff { .. } => Some(Reject::StartBackoff),
            ProxyError::Upstream { .. } => Some(Reject::Upstream),
            ProxyError::Unhealthy { .. } => Some(Reject::UpstreamUnhealthy),
            ProxyError::UpstreamTimeout { .. } => Some(Reject::UpstreamTimeout),
            ProxyError::ShuttingDown => Some(Reject::ShuttingDown),
            ProxyError::TargetRemoved { .. } => Some(Reject::TargetRemoved),
            ProxyError::RateLimited { .. } => Some(Reject::RateLimited),
        }
    }

    /// The gRPC status code a gRPC client gets for this failure (see `grpc/doc/statuscodes.md`
    /// of the gRPC project): what is missing is UNIMPLEMENTED, a full hold RESOURCE_EXHAUSTED,
    /// a wait that ran out DEADLINE_EXCEEDED, a client over its rate limit RESOURCE_EXHAUSTED, an instance that is not there (yet) UNAVAILABLE,
    /// which gRPC clients may retry.
    pub fn grpc_status(&self) -> GrpcStatus {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::Ambiguous(_)
            | ProxyError::ClientBody { .. } => GrpcStatus::Internal,
            ProxyError::NoRoute
            | ProxyError::NotForwarded { .. }
            | ProxyError::UnsupportedCoding => GrpcStatus::Unimplemented,
            ProxyError::QueueFull { .. }
            | ProxyError::QueueBytes { .. }
            | ProxyError::HoldLimit(_)
            | ProxyError::MemoryBudget
            | ProxyError::RateLimited { .. } => GrpcStatus::ResourceExhausted,
            ProxyError::ColdStartTimeout { .. }
            | ProxyError::Deadline { .. }
            | ProxyError::UpstreamTimeout { .. } => GrpcStatus::DeadlineExceeded,
            ProxyError::StartFailed { .. }
            | ProxyError::NoFreeSlot { .. }
            | ProxyError::BackingOff { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::Unhealthy { .. }
            | ProxyError::ShuttingDown
            | ProxyError::TargetRemoved { .. } => GrpcStatus::Unavailable,
        }
    }

    /// The error chain in one line, for logs (see [`chain`]).
    pub fn chain(&self) -> String {
        chain(self)
    }

    /// The response for a request of `version`; `grpc` for a gRPC request, which gets a
    /// gRPC status (HTTP 200, no body, `grpc-status` and `grpc-message`) as gRPC clients
    /// expect of a server. It says why in a few words and carries `id`; causes (paths, OS
    /// errors) are the log's.
    pub fn into_response(
        self,
        version: Version,
        grpc: bool,
        id: &RequestId,
    ) -> Response<ProxyBody> {
        let mut response = if grpc {
            let mut response = Response::new(ProxyBody::empty());
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert(GRPC_STATUS.clone(), self.grpc_status().header_value());
            headers.insert(
                GRPC_MESSAGE.clone(),
                grpc_message(&format!("{self} (request id {id})")),
            );
            response
        } else {
            let mut response =
                Response::new(ProxyBody::text(format!("{self}\nrequest id: {id}\n")));
            *response.status_mut() = self.status();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            response
        };
        let headers = response.headers_mut();
        headers.insert(X_REQUEST_ID.clone(), id.0.clone());
        match self {
            ProxyError::RateLimited { retry_after, .. } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(retry_after)),
                );
            }
            ProxyError::QueueFull { .. }
            | ProxyError::QueueBytes { .. }
            | ProxyError::HoldLimit(_)
            | ProxyError::MemoryBudget
            | ProxyError::NoFreeSlot { .. }
            | ProxyError::TargetRemoved { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            // What follows the head cannot be trusted to end where the next request begins.
            ProxyError::Ambiguous(_)
            | ProxyError::UnsupportedCoding
            | ProxyError::ClientBody { .. }
                if version < Version::HTTP_2 =>
            {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            ProxyError::BackingOff { retry_in, .. } | ProxyError::Unhealthy { retry_in, .. } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(retry_in)),
                );
            }
            ProxyError::ShuttingDown => {
                // HTTP/2 has no such header (RFC 9113 §8.2.2): its connection ends with GOAWAY.
                if version < Version::HTTP_2 {
                    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// An error and its causes in one line, for logs. A cause that an error already quotes at its
/// end (as hyper's and io's errors often do) is not written twice.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The trailers that end a gRPC response wakegate closes before its upstream did (its instance
/// is stopping): UNAVAILABLE, which gRPC clients may retry, saying why.
pub fn grpc_closed_trailers(why: &str) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::with_capacity(2);
    trailers.insert(GRPC_STATUS.clone(), GrpcStatus::Unavailable.header_value());
    trailers.insert(GRPC_MESSAGE.clone(), grpc_message(why));
    trailers
}

static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// The gRPC status codes wakegate answers with itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcStatus {
    DeadlineExceeded = 4,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
}

impl GrpcStatus {
    fn header_value(self) -> HeaderValue {
        HeaderValue::from(self as u16)
    }
}

/// A `grpc-message`: the text percent-encoded as the gRPC HTTP/2 protocol asks (every byte
/// outside printable ASCII, and `%`).
fn grpc_message(text: &str) -> HeaderValue {
    use std::fmt::Write;
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            encoded.push(byte as char);
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    HeaderValue::try_from(encoded).expect("printable ASCII is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_quoted_is_not_repeated_in_the_chain() {
        let error = ProxyError::Upstream {
            target: "api".into(),
            source: super::super::pool::UpstreamError::Connect {
                authority: "127.0.0.1:9".parse().unwrap(),
                source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            },
        };
        let chain = error.chain();
        assert_eq!(chain.matches("connection refused").count(), 1, "{chain}");
        assert!(
            chain.ends_with("cannot connect to 127.0.0.1:9: connection refused"),
            "{chain}"
        );
    }

    #[tokio::test]
    async fn a_failed_start_tells_the_client_a_short_reason_and_the_log_its_cause() {
        let error = ProxyError::StartFailed {
            target: "api".into(),
            reason: Cause("cannot run /opt/api/bin/server: No such file".into()),
        };
        assert_eq!(
            error.chain(),
            "target api failed to start: cannot run /opt/api/bin/server: No such file"
        );
        let id = RequestId::new(None);
        let response = error.into_response(Version::HTTP_11, false, &id);
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()["x-request-id"], id.as_str());
        let body = body_text(response).await;
        assert_eq!(
            body,
            format!("target api failed to start\nrequest id: {id}\n")
        );
    }

    #[test]
    fn a_plain_client_request_id_is_kept_and_anything_else_replaced() {
        for kept in ["abc", "7f3e-11ef.a:b+c/d=", &"x".repeat(128)] {
            let id = RequestId::new(Some(&HeaderValue::from_str(kept).unwrap()));
            assert_eq!(id.as_str(), kept);
        }
        for replaced in ["", "a b", "a\"b", "caf\u{e9}", "x=1;y", &"x".repeat(129)] {
            let Ok(value) = HeaderValue::from_bytes(replaced.as_bytes()) else {
                continue;
            };
            let id = RequestId::new(Some(&value));
            assert_ne!(id.as_str(), replaced);
            assert_eq!(id.as_str().len(), 16, "{id}");
            assert!(id.as_str().bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        }
        let (a, b) = (RequestId::new(None), RequestId::new(None));
        assert_ne!(a.as_str(), b.as_str());
    }

    async fn body_text(response: Response<ProxyBody>) -> String {
        use http_body_util::BodyExt;
        let collected = response.into_body().collect().await;
        String::from_utf8(collected.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[test]
    fn shutting_down_asks_http1_clients_to_close_the_connection_and_http2_clients_nothing() {
        for version in [Version::HTTP_10, Version::HTTP_11] {
            let response =
                ProxyError::ShuttingDown.into_response(version, false, &RequestId::new(None));
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(
                response.headers()[header::CONNECTION],
                "close",
                "{version:?}"
            );
            assert_eq!(response.headers()[header::RETRY_AFTER], "1", "{version:?}");
        }
        for version in [Version::HTTP_2, Version::HTTP_3] {
            let response =
                ProxyError::ShuttingDown.into_response(version, false, &RequestId::new(None));
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert!(
                !response.headers().contains_key(header::CONNECTION),
                "{version:?}: {:?}",
                response.headers()
            );
            assert_eq!(response.headers()[header::RETRY_AFTER], "1", "{version:?}");
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_is_at_least_one() {
        for (after, secs) in [
            (Duration::ZERO, 1),
            (Duration::from_nanos(1), 1),
            (Duration::from_millis(999), 1),
            (Duration::from_secs(1), 1),
            (Duration::from_millis(1001), 2),
            (Duration::from_secs(30), 30),
        ] {
            assert_eq!(retry_after_secs(after), secs, "{after:?}");
        }
    }

    #[test]
    fn a_grpc_request_gets_a_grpc_status_with_the_reason_percent_encoded() {
        let error = ProxyError::QueueFull {
            target: "échos".into(),
            max: 3,
        };
        let id = RequestId::new(Some(&HeaderValue::from_static("req-1")));
        let response = error.into_response(Version::HTTP_2, true, &id);
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert_eq!(headers[header::CONTENT_TYPE], "application/grpc");
        assert_eq!(headers["grpc-status"], "8");
        assert_eq!(
            headers["grpc-message"],
            "target %C3%A9chos already holds 3 waiting requests; retry shortly (request id req-1)"
        );
        assert_eq!(headers["x-request-id"], "req-1");
        assert_eq!(headers[header::RETRY_AFTER], "1");
        assert!(http_body::Body::is_end_stream(response.body()));
    }
}
