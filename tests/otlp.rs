//! Span export over OTLP (feature `otlp`): wakegate sends its request, hold, wake and forward
//! spans to the endpoint the standard environment variables name, continuing the client's trace.
#![cfg(feature = "otlp")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio::net::TcpListener;
use wakegate_test_support::{Wakegate, demo_target, within};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// One span as the receiver got it.
#[derive(Debug, Clone)]
struct Received {
    name: String,
    trace_id: String,
    service: Option<String>,
    target: Option<String>,
}

/// An OTLP/gRPC trace receiver on port 0 that keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| string_attribute(&r.attributes, "service.name"));
            for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Received {
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    service: service.clone(),
                    target: string_attribute(&span.attributes, "target"),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// Starts the receiver and returns its endpoint URL.
    async fn start(&self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        format!("http://{addr}")
    }

    /// Waits up to `limit` until spans named each of `names` have arrived, and returns all.
    async fn wait_for(&self, names: &[&str], limit: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let spans = self.spans.lock().unwrap().clone();
            if names.iter().all(|n| spans.iter().any(|s| s.name == *n)) {
                return spans;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "spans {names:?} not all exported within {limit:?}; got {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn string_attribute(
    attributes: &[opentelemetry_proto::tonic::common::v1::KeyValue],
    key: &str,
) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn with_an_otlp_endpoint_a_cold_request_exports_its_spans_in_the_clients_trace() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let wg = Wakegate::start_with_env(
        "",
        &demo_target("hello", "hello.localhost", "100ms"),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let request = Request::get("/headers")
        .header("traceparent", TRACEPARENT)
        .body(Full::<Bytes>::default())
        .unwrap();
    let r = within(
        20,
        "cold request",
        wg.send(wg.proxy, "hello.localhost", request),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The upstream still gets the client's own trace context, not wakegate's span.
    let seen: serde_json::Value = serde_json::from_str(&r.body).expect("JSON headers");
    assert_eq!(seen["traceparent"], TRACEPARENT, "{seen}");

    let spans = receiver
        .wait_for(
            &["request", "hold", "wake", "forward"],
            Duration::from_secs(20),
        )
        .await;
    for name in ["hold", "wake", "forward"] {
        let span = spans.iter().find(|s| s.name == name).unwrap();
        assert_eq!(span.target.as_deref(), Some("hello"), "{span:?}");
        assert_eq!(span.service.as_deref(), Some("wakegate"), "{span:?}");
    }
    // The request's own spans continue the client's trace; the wake is a trace of its own,
    // as one start can serve many held requests.
    for name in ["request", "hold", "forward"] {
        let span = spans.iter().find(|s| s.name == name).unwrap();
        assert_eq!(span.trace_id, TRACE_ID, "{span:?}");
    }
}

#[tokio::test]
async fn without_an_otlp_endpoint_nothing_is_exported_and_the_log_says_nothing_of_it() {
    let wg = Wakegate::start("", &demo_target("hello", "hello.localhost", "0s")).await;
    let r = within(20, "cold request", wg.get("hello.localhost", "/")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        !wg.logs().contains("OTLP"),
        "export is off without an endpoint:\n{}",
        wg.logs()
    );
}

#[tokio::test]
async fn spans_still_batched_at_shutdown_are_exported_before_wakegate_exits() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let mut wg = Wakegate::start_with_env(
        "",
        &demo_target("hello", "hello.localhost", "0s"),
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.as_str()),
            // Far longer than the test: only the flush at shutdown can send them.
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ],
    )
    .await;
    let r = within(20, "cold request", wg.get("hello.localhost", "/")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(receiver.spans.lock().unwrap().is_empty());

    wg.signal(libc::SIGTERM);
    assert_eq!(wg.wait_exit(Duration::from_secs(20)).await, Some(0));
    let spans = receiver.spans.lock().unwrap().clone();
    for name in ["request", "hold", "wake", "forward"] {
        assert!(
            spans.iter().any(|s| s.name == name),
            "no {name} span exported at shutdown: {spans:#?}"
        );
    }
}
