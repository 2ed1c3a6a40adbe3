//! Span export over OTLP/gRPC, configured by the standard OpenTelemetry environment variables.
//! Exported are wakegate's own spans down to `debug` (request, hold, wake, forward), whatever
//! `RUST_LOG` lets the log show.

use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider;
use opentelemetry_otlp::SpanExporter;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use super::LogFormat;

/// How long the last spans may take to leave at shutdown.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Exporter(SdkTracerProvider);

impl Exporter {
    pub fn shutdown(self) {
        if let Err(error) = self.0.shutdown_with_timeout(FLUSH_TIMEOUT) {
            eprintln!("wakegate: could not export the last spans: {error}");
        }
    }
}

/// The OTLP endpoint the environment sets, if any: export is off without one.
pub fn configured() -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .filter_map(|name| std::env::var(name).ok())
    .find(|value| !value.is_empty())
}

/// Logging as without export, plus a layer that exports wakegate's spans to `endpoint`.
pub fn init(format: LogFormat, filter: EnvFilter, endpoint: &str) -> Exporter {
    // The exporter reads the endpoint (the traces one first), timeout and headers from the
    // environment itself; the batch its `OTEL_BSP_*` and the sampler `OTEL_TRACES_SAMPLER`.
    let exporter = SpanExporter::builder().with_tonic().build();
    let provider = SdkTracerProvider::builder()
        .with_resource(resource())
        .with_batch_exporter(match exporter {
            Ok(exporter) => exporter,
            Err(error) => {
                // Only a malformed endpoint gets here: logging is not set up yet.
                eprintln!("wakegate: OTLP endpoint {endpoint:?} unusable ({error}): spans are not exported");
                return logs_only(format, filter);
            }
        })
        .build();
    let tracer = provider.tracer("wakegate");
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // `target` is the wakegate target a span is about (a field of its own), not tracing's
        // module path, which `code.namespace` carries anyway.
        .with_target(false)
        .with_filter(Targets::new().with_target("wakegate", Level::DEBUG));
    let logs = fmt_layer(format).with_filter(filter);
    tracing_subscriber::registry().with(logs).with(spans).init();
    tracing::info!(endpoint, "exporting spans over OTLP");
    Exporter(provider)
}

fn logs_only(format: LogFormat, filter: EnvFilter) -> Exporter {
    tracing_subscriber::registry()
        .with(fmt_layer(format).with_filter(filter))
        .init();
    Exporter(SdkTracerProvider::builder().build())
}

/// The log layer that [`super::init`] builds, for a subscriber of several layers.
fn fmt_layer(format: LogFormat) -> Box<dyn Layer<Registry> + Send + Sync> {
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => layer.with_ansi(super::ansi()).boxed(),
        LogFormat::Json => layer.json().flatten_event(true).with_target(false).boxed(),
    }
}

/// `service.name` is `OTEL_SERVICE_NAME` (or from `OTEL_RESOURCE_ATTRIBUTES`), else "wakegate".
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    if named {
        detected
    } else {
        Resource::builder().with_service_name("wakegate").build()
    }
}

pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if headers.contains_key("traceparent") {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        // Fails only when no OpenTelemetry layer is there (export off): nothing to continue.
        let _ = span.set_parent(parent);
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}
