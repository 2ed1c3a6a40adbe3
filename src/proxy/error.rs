//! Every way a request can fail inside wakegate, and the one place that turns such a failure
//! into the HTTP response a client sees.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, Version, header};

use super::body::ProxyBody;
use crate::target::stats::Reject;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("no route for this host and path")]
    NoRoute,
    #[error("target {target} already holds {max} waiting requests; retry shortly")]
    QueueFull { target: String, max: u32 },
    #[error("target {target} did not become ready within {}", humantime::format_duration(*.after))]
    ColdStartTimeout { target: String, after: Duration },
    #[error("target {target} failed to start: {reason}")]
    StartFailed { target: String, reason: String },
    #[error("upstream of target {target} failed before responding")]
    Upstream {
        target: String,
        #[source]
        source: super::pool::UpstreamError,
    },
    #[error("upstream of target {target} did not respond within {}", humantime::format_duration(*.after))]
    UpstreamTimeout { target: String, after: Duration },
    #[error("wakegate is shutting down")]
    ShuttingDown,
    #[error("target {target} was removed from the configuration")]
    TargetRemoved { target: String },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::QueueFull { .. }
            | ProxyError::ShuttingDown
            | ProxyError::TargetRemoved { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ColdStartTimeout { .. } | ProxyError::UpstreamTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::StartFailed { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The rejection reason counted in `wakegate_rejected_requests_total`, for failures that
    /// belong to a target.
    pub fn reject(&self) -> Option<Reject> {
        match self {
            ProxyError::BadRequest(_) | ProxyError::NoRoute => None,
            ProxyError::QueueFull { .. } => Some(Reject::QueueFull),
            ProxyError::ColdStartTimeout { .. } => Some(Reject::ColdStartTimeout),
            ProxyError::StartFailed { .. } => Some(Reject::StartFailed),
            ProxyError::Upstream { .. } => Some(Reject::Upstream),
            ProxyError::UpstreamTimeout { .. } => Some(Reject::UpstreamTimeout),
            ProxyError::ShuttingDown => Some(Reject::ShuttingDown),
            ProxyError::TargetRemoved { .. } => Some(Reject::TargetRemoved),
        }
    }

    /// The error chain in one line, for logs.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    /// The response for a request of `version`.
    pub fn into_response(self, version: Version) -> Response<ProxyBody> {
        let status = self.status();
        let mut response = Response::new(ProxyBody::text(format!("{self}\n")));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        match self {
            ProxyError::QueueFull { .. } | ProxyError::TargetRemoved { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutting_down_asks_http1_clients_to_close_the_connection_and_http2_clients_nothing() {
        for version in [Version::HTTP_10, Version::HTTP_11] {
            let response = ProxyError::ShuttingDown.into_response(version);
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(
                response.headers()[header::CONNECTION],
                "close",
                "{version:?}"
            );
            assert_eq!(response.headers()[header::RETRY_AFTER], "1", "{version:?}");
        }
        for version in [Version::HTTP_2, Version::HTTP_3] {
            let response = ProxyError::ShuttingDown.into_response(version);
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert!(
                !response.headers().contains_key(header::CONNECTION),
                "{version:?}: {:?}",
                response.headers()
            );
            assert_eq!(response.headers()[header::RETRY_AFTER], "1", "{version:?}");
        }
    }
}
