//! Logging: human-readable by default, JSON lines with `--log-format json`; `RUST_LOG`
//! filters as usual (default `info`). Colours only when stderr is a terminal; in JSON, each key
//! once: `target` is the wakegate target an event is about, not tracing's module path.

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // Events name the target they are about `target`, which a flattened event would also
        // use for tracing's module path: JSON parsers keep only one of the two.
        LogFormat::Json => builder.json().flatten_event(true).with_target(false).init(),
    }
}
