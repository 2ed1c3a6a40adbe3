//! `loadtest`: wakegate's load generator and its named scenarios (see loadtest/README.md).
//!
//! `loadtest run` sends load to one URL; `loadtest scenario NAME` sets up wakegate, nginx and
//! an upstream on 127.0.0.1, measures them interleaved, and writes a report.

mod load;
mod procs;
mod report;
mod scenario;
mod stand;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Harness(String),
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "loadtest",
    about = "wakegate's load generator and load-test scenarios"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send load to one URL on this machine and print throughput, latency and errors.
    Run {
        /// `http://127.0.0.1:PORT/path` or `https://...` (loopback addresses only; the
        /// server's certificate is not checked).
        #[arg(long)]
        url: http::Uri,
        /// The `Host` header (HTTP/2: `:authority`; https: also the SNI); default: the URL's
        /// host and port.
        #[arg(long)]
        host: Option<String>,
        #[arg(long, short, default_value_t = 64)]
        connections: usize,
        #[arg(long, short, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Open loop: this many requests per second in total, latency counted from when each
        /// request fell due. Without it: closed loop, as fast as the connections go.
        #[arg(long)]
        rate: Option<f64>,
        /// HTTP/2 instead of HTTP/1.1: with prior knowledge (h2c) for http://, by ALPN for
        /// https://.
        #[arg(long, visible_alias = "h2")]
        h2c: bool,
        /// HTTP/2: requests in flight at once on each connection.
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// Every request on a new connection (HTTP/1.1: `Connection: close`); with https://,
        /// a full TLS handshake each. Latency then counts from the connect.
        #[arg(long)]
        no_keep_alive: bool,
        /// gRPC unary calls of the demo backend's `wakegate.demo.v1.Echo/Unary` with a small
        /// message instead of GETs; implies --h2c, the URL's path is not used. A success is
        /// status 200 with `grpc-status: 0`.
        #[arg(long)]
        grpc: bool,
        /// A request unanswered after this long counts as a timeout error.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a named scenario and write NAME.md, NAME.json and NAME.svg.
    Scenario {
        name: scenario::Name,
        /// Where the reports go.
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
        out: PathBuf,
        /// Interleaved rounds of the paths compared.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds instead of minutes: one round, short runs, fewer cycles (a smoke test).
        #[arg(long)]
        quick: bool,
        /// The wakegate binary (default: the one next to this program, which
        /// `cargo build --release --workspace --bins` builds with it).
        #[arg(long)]
        wakegate: Option<PathBuf>,
        /// cold-start: the local target's readiness check.
        #[arg(long, value_enum, default_value_t = scenario::Ready::Tcp)]
        ready: scenario::Ready,
        /// kube-scale: annotated Services in the API double [default: 5000; --quick: 100].
        #[arg(long)]
        services: Option<usize>,
        /// kube-scale: EndpointSlices per Service.
        #[arg(long, default_value_t = 4)]
        slices_per_service: usize,
        /// kube-scale: endpoint changes made per second.
        #[arg(long, default_value_t = 100.0)]
        changes_per_second: f64,
        /// kube-scale: how long changes are made [default: 30s; --quick: 5s].
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// kube-scale: the longest wait for wakegate's initial sync; past it the partial
        /// report is written and the scenario fails [default: 10m; --quick: 60s].
        #[arg(long, value_parser = humantime::parse_duration)]
        sync_timeout: Option<Duration>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("loadtest: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        // Dropping the command's future on a signal stops every child it started.
        tokio::select! {
            result = command(cli.command) => result,
            signal = terminated() => {
                eprintln!("\nloadtest: {signal}, stopping");
                Ok(ExitCode::from(130))
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("loadtest: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn command(command: Command) -> Result<ExitCode, Error> {
    match command {
        Command::Run {
            url,
            host,
            connections,
            duration,
            rate,
            h2c,
            streams,
            no_keep_alive,
            grpc,
            timeout,
            json,
        } => {
            run(
                url,
                host,
                connections,
                duration,
                rate,
                h2c || grpc,
                streams,
                !no_keep_alive,
                grpc,
                timeout,
                json,
            )
            .await
        }
        Command::Scenario {
            name,
            out,
            rounds,
            quick,
            wakegate,
            ready,
            services,
            slices_per_service,
            changes_per_second,
            duration,
            sync_timeout,
        } => {
            let settings = scenario::Settings {
                wakegate: wakegate_binary(wakegate)?,
                out,
                rounds: if quick { 1 } else { rounds.max(1) },
                quick,
                ready,
                kube: scenario::KubeScale {
                    services,
                    slices_per_service,
                    changes_per_second,
                    duration,
                    sync_timeout,
                },
            };
            scenario::run(name, &settings).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    url: http::Uri,
    host: Option<String>,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
    h2c: bool,
    streams: usize,
    keep_alive: bool,
    grpc: bool,
    timeout: Duration,
    json: bool,
) -> Result<ExitCode, Error> {
    let usage = |why: &str| Error::Harness(format!("--url {url}: {why}"));
    let https = match url.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(usage("expected an http:// or https:// URL")),
    };
    let authority = url.authority().ok_or_else(|| usage("expected a host"))?;
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addr: SocketAddr = tokio::net::lookup_host((authority.host(), port))
        .await
        .map_err(|e| usage(&format!("cannot resolve: {e}")))?
        .find(|a| a.ip().is_loopback())
        .ok_or_else(|| usage("load goes to loopback addresses only (127.0.0.0/8, [::1])"))?;
    if connections == 0 || rate.is_some_and(|r| r <= 0.0 || !r.is_finite()) {
        return Err(usage("--connections and --rate must be above zero"));
    }
    let host = host.as_deref().unwrap_or(authority.as_str());
    if https {
        tls::server_name(host).map_err(|why| usage(&why))?;
    }
    let mut plan = load::Plan::new(addr, host, connections, duration);
    plan.path = url.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    plan.rate = rate;
    plan.timeout = timeout;
    plan.streams = streams;
    plan.tls = https;
    plan.keep_alive = keep_alive;
    plan.protocol = if h2c {
        load::Protocol::Http2
    } else {
        load::Protocol::Http1
    };
    if grpc {
        plan.grpc_echo();
    }
    plan.label = "run".into();
    let outcome = load::run(&plan).await;
    let percentiles = [0.5, 0.9, 0.99, 0.999, 0.9999, 1.0];
    if json {
        let latency: serde_json::Map<_, _> = percentiles
            .iter()
            .map(|q| {
                (
                    format!("p{}", q * 100.0),
                    serde_json::json!(report::quantile_ms(&outcome.latency, *q)),
                )
            })
            .collect();
        let summary = serde_json::json!({
            "url": url.to_string(),
            "protocol": match (h2c, https) {
                (true, false) => "h2c",
                (true, true) => "h2",
                (false, _) => "http/1.1",
            },
            "tls": https,
            "keep_alive": keep_alive,
            "request": if grpc { load::ECHO_UNARY } else { "GET" },
            "connections": connections,
            "rate": rate,
            "elapsed_s": outcome.elapsed.as_secs_f64(),
            "ok": outcome.ok,
            "rps": outcome.rps(),
            "errors": outcome.errors,
            "unsent": outcome.unsent,
            "latency_ms": latency,
        });
        println!("{summary:#}");
    } else {
        let mode = match rate {
            Some(r) => format!("open loop at {r} req/s, latency from when each request fell due"),
            None => "closed loop".into(),
        };
        let http2 = if https { "h2" } else { "h2c" };
        println!(
            "{url} ({}{}), {connections} connections, {mode}, {:.1} s",
            match (grpc, h2c) {
                (true, _) => format!("gRPC {} over {http2}", load::ECHO_UNARY),
                (false, true) => http2.into(),
                (false, false) => "HTTP/1.1".into(),
            },
            if keep_alive {
                ""
            } else {
                ", a new connection per request"
            },
            outcome.elapsed.as_secs_f64()
        );
        println!(
            "{} ok responses, {:.0} req/s; errors: {}{}",
            outcome.ok,
            outcome.rps(),
            outcome.error_summary(),
            if outcome.unsent > 0 {
                format!("; {} due but not sent by the end", outcome.unsent)
            } else {
                String::new()
            }
        );
        let line: Vec<String> = percentiles
            .iter()
            .map(|q| {
                let name = if *q == 1.0 {
                    "max".into()
                } else {
                    format!("p{}", q * 100.0)
                };
                format!(
                    "{name} {}",
                    report::ms(report::quantile_ms(&outcome.latency, *q))
                )
            })
            .collect();
        println!("latency: {}", line.join(", "));
    }
    // Zero successes means the target or the harness is broken, never that it was slow.
    Ok(if outcome.ok == 0 {
        eprintln!("loadtest: no successful response");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The wakegate binary the scenarios run: the one given, or the one built next to this program
/// (`cargo build --release --workspace --bins` builds both). Not built from here: a cargo
/// started by `cargo run` sees that run's environment, and rebuilt the whole library with fat
/// LTO each time.
fn wakegate_binary(given: Option<PathBuf>) -> Result<PathBuf, Error> {
    if let Some(path) = given {
        return Ok(path);
    }
    let exe = std::env::current_exe().map_err(|e| Error::io("find this program's path", e))?;
    let dir = exe
        .parent()
        .ok_or_else(|| Error::Harness("this program has no directory".into()))?;
    let path = dir.join("wakegate");
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(wakegate), Some(this)) = (modified(&path), modified(&exe))
        && wakegate < this
    {
        eprintln!(
            "loadtest: warning: {} is older than this program; `cargo build --release --workspace --bins` builds both",
            path.display()
        );
    }
    if !path.exists() {
        return Err(Error::Harness(format!(
            "{} not found: build it first (cargo build --release --workspace --bins) or pass --wakegate",
            path.display()
        )));
    }
    if dir.file_name().is_some_and(|n| n == "debug") {
        eprintln!("loadtest: warning: a debug build measures nothing useful; use --release");
    }
    Ok(path)
}

/// Resolves on SIGINT or SIGTERM with the signal's name.
async fn terminated() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
