//! A PromQL signal source: runs a target's query against Prometheus's HTTP API every `every`
//! and publishes the latest reading to the autoscaler, which keeps its last decision (and so
//! never scales to zero) while there is no fresh value.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::policy::Sample;
use crate::config::PrometheusSource;
use crate::target::Target;
use crate::target::stats::QueryFailure;

/// The latest outcome of a target's query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reading {
    /// No query has finished yet.
    Pending,
    Value(f64),
    Failed(QueryFailure),
}

/// What one autoscaler tick decides from: the query's value as the sample (both metrics, so
/// the policy's choice of metric does not matter) and the demand it adds, one while the
/// value is above zero, so that a target at zero wakes on it. `None`: no fresh value, keep
/// the last decision.
pub fn signal(reading: Reading, at: Instant) -> Option<(Sample, u64)> {
    match reading {
        Reading::Value(value) => Some((
            Sample {
                at,
                concurrency: value,
                rps: value,
            },
            u64::from(value > 0.0),
        )),
        Reading::Pending | Reading::Failed(_) => None,
    }
}

/// Why a query gave no usable value, with what Prometheus said.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("cannot reach Prometheus: {0}")]
    Unreachable(String),
    #[error("Prometheus answered HTTP {0}")]
    HttpStatus(StatusCode),
    #[error("not an answer of Prometheus's query API: {0}")]
    BadResponse(String),
    #[error("Prometheus refused the query ({kind}): {message}")]
    Query { kind: String, message: String },
    #[error("the query matched no series")]
    Empty,
    #[error("the query's value is {0}")]
    NotFinite(f64),
}

impl QueryError {
    pub fn reason(&self) -> QueryFailure {
        match self {
            QueryError::Unreachable(_) => QueryFailure::Unreachable,
            QueryError::HttpStatus(_) => QueryFailure::HttpStatus,
            QueryError::BadResponse(_) => QueryFailure::BadResponse,
            QueryError::Query { .. } => QueryFailure::QueryError,
            QueryError::Empty => QueryFailure::Empty,
            QueryError::NotFinite(_) => QueryFailure::NotFinite,
        }
    }
}

/// The value of an answer of `GET /api/v1/query`: a scalar, or an instant vector whose
/// series are summed (the documented queries have one, from `sum(...)`).
pub fn parse_answer(status: StatusCode, body: &[u8]) -> Result<f64, QueryError> {
    let answer: serde_json::Value = match serde_json::from_slice(body) {
        Ok(answer) => answer,
        Err(_) if !status.is_success() => return Err(QueryError::HttpStatus(status)),
        Err(e) => return Err(QueryError::BadResponse(e.to_string())),
    };
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    match answer["status"].as_str() {
        Some("success") if status.is_success() => {}
        Some("error") => {
            return Err(QueryError::Query {
                kind: text(&answer["errorType"]),
                message: text(&answer["error"]),
            });
        }
        _ if !status.is_success() => return Err(QueryError::HttpStatus(status)),
        _ => {
            return Err(QueryError::BadResponse(
                "no \"status\": \"success\"".to_owned(),
            ));
        }
    }
    // A sample is `[unix time, "value"]`, the value a string so that NaN and ±Inf fit.
    let value_of = |sample: &serde_json::Value| -> Result<f64, QueryError> {
        sample[1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| QueryError::BadResponse(format!("a sample of {sample}")))
    };
    let data = &answer["data"];
    let value = match data["resultType"].as_str() {
        Some("scalar") => value_of(&data["result"])?,
        Some("vector") => {
            let series = data["result"]
                .as_array()
                .ok_or_else(|| QueryError::BadResponse("a vector without a result".into()))?;
            if series.is_empty() {
                return Err(QueryError::Empty);
            }
            let mut sum = 0.0;
            for s in series {
                sum += value_of(&s["value"])?;
            }
            sum
        }
        other => {
            return Err(QueryError::BadResponse(format!(
                "a result of type {}, expected a vector or a scalar",
                other.unwrap_or("none")
            )));
        }
    };
    if value.is_finite() {
        Ok(value)
    } else {
        Err(QueryError::NotFinite(value))
    }
}

/// `base` + `/api/v1/query?query=...`, the query percent-encoded.
pub fn query_uri(base: &str, query: &str) -> Result<http::Uri, http::uri::InvalidUri> {
    let mut uri = format!("{}/api/v1/query?query=", base.trim_end_matches('/'));
    for b in query.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            uri.push(char::from(b));
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri.parse()
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

async fn query(client: &HttpClient, uri: &http::Uri, limit: Duration) -> Result<f64, QueryError> {
    let exchange = async {
        let response = client
            .get(uri.clone())
            .await
            .map_err(|e| QueryError::Unreachable(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| QueryError::Unreachable(e.to_string()))?
            .to_bytes();
        parse_answer(status, &body)
    };
    tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(QueryError::Unreachable(format!(
                "no answer within {}",
                humantime::format_duration(limit)
            )))
        })
}

/// Runs `target`'s query every `source.every` until `stop`, publishing each reading on
/// `readings` and in the target's metrics. A failure is logged when it starts or changes
/// reason, and the recovery once, not every query.
pub async fn poll(
    target: Arc<Target>,
    source: PrometheusSource,
    readings: watch::Sender<Reading>,
    stop: CancellationToken,
) {
    let query_text = source.query_for(&target.namespace, &target.name);
    let uri = match query_uri(&source.url, &query_text) {
        Ok(uri) => uri,
        Err(e) => {
            // `check` validates the URL; this is a query no URI can carry.
            tracing::error!(target = %target.name(), url = %source.url, error = %e, "cannot build the Prometheus query URL; keeping the last decision");
            target.stats.query.fail(QueryFailure::BadResponse);
            readings.send_replace(Reading::Failed(QueryFailure::BadResponse));
            return;
        }
    };
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let limit = source
        .every
        .clamp(Duration::from_secs(1), Duration::from_secs(10));
    let mut ticker = tokio::time::interval(source.every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last: Option<Reading> = None;
    loop {
        let result = tokio::select! {
            () = stop.cancelled() => return,
            result = async {
                ticker.tick().await;
                query(&client, &uri, limit).await
            } => result,
        };
        let reading = match result {
            Ok(value) => {
                target.stats.query.set_value(value);
                if !matches!(last, Some(Reading::Value(_))) {
                    tracing::info!(target = %target.name(), query = %query_text, value, "the Prometheus query answers");
                }
                Reading::Value(value)
            }
            Err(e) => {
                let why = e.reason();
                target.stats.query.fail(why);
                if last != Some(Reading::Failed(why)) {
                    tracing::warn!(target = %target.name(), url = %source.url, query = %query_text, reason = why.label(), error = %e, "the Prometheus query failed; keeping the last scaling decision");
                }
                Reading::Failed(why)
            }
        };
        last = Some(reading);
        readings.send_replace(reading);
    }
}

#[cfg(test)]
mod tests;
