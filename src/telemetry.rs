//! Logging: human-readable by default, JSON lines with `--log-format json`; `RUST_LOG`
//! filters as usual (default `info`). Colours only when stderr is a terminal; in JSON, each key
//! once: `target` is the wakegate target an event is about, not tracing's module path.
//! With the `otlp` feature, spans are also exported over OTLP when an endpoint is configured.

use tracing_subscriber::EnvFilter;

#[cfg(feature = "otlp")]
mod otlp;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// What has to outlive the program's work: the span exporter, flushed by [`Telemetry::shutdown`].
#[derive(Debug, Default)]
#[must_use = "spans not yet exported are lost unless shutdown() is called"]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    exporter: Option<otlp::Exporter>,
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter. Call it outside the runtime's
    /// tasks (it blocks) but while the runtime still runs: the export is one of its tasks.
    pub fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Some(exporter) = self.exporter {
            exporter.shutdown();
        }
    }
}

/// Sets up logging; with `export`, and an OTLP endpoint in the environment, span export too.
/// Call it inside the tokio runtime: the exporter's connection is one of its tasks.
pub fn init(format: LogFormat, export: bool) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    #[cfg(feature = "otlp")]
    if export && let Some(endpoint) = otlp::configured() {
        let exporter = otlp::init(format, filter, &endpoint);
        return Telemetry {
            exporter: Some(exporter),
        };
    }
    #[cfg(not(feature = "otlp"))]
    let _ = export;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.with_ansi(ansi()).init(),
        // Events name the target they are about `target`, which a flattened event would also
        // use for tracing's module path: JSON parsers keep only one of the two.
        LogFormat::Json => builder.json().flatten_event(true).with_target(false).init(),
    }
    Telemetry::default()
}

fn ansi() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// Makes `span` (a request's) a child of the trace that `headers` continue (W3C
/// `traceparent`), when spans are exported; a no-op otherwise.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    #[cfg(feature = "otlp")]
    otlp::continue_trace(span, headers);
    #[cfg(not(feature = "otlp"))]
    let _ = (span, headers);
}
