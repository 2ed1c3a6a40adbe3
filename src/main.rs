//! The `wakegate` command line: parse, load config, set up logging, run.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use wakegate::config::{Config, ConfigError, Problem};
use wakegate::proxy::tls::Certificates;
use wakegate::scaling::simulate::{SimulateError, Simulation};
use wakegate::telemetry::{self, LogFormat};

#[derive(Parser, Debug)]
#[command(name = "wakegate", version, about = "An HTTP scale-to-zero proxy")]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "pretty",
        env = "WAKEGATE_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy.
    Run {
        /// The TOML configuration file (re-read on SIGHUP).
        #[arg(long, short, env = "WAKEGATE_CONFIG")]
        config: PathBuf,
        /// Overrides `listen.proxy`.
        #[arg(long, env = "WAKEGATE_LISTEN_PROXY")]
        listen_proxy: Option<SocketAddr>,
        /// Overrides `listen.admin`.
        #[arg(long, env = "WAKEGATE_LISTEN_ADMIN")]
        listen_admin: Option<SocketAddr>,
    },
    /// Validate a configuration file and print every problem found (exit code 2 if invalid).
    Check {
        #[arg(long, short, env = "WAKEGATE_CONFIG")]
        config: PathBuf,
    },
    /// Replay a load trace through the scaling policy and write per-second CSV and an SVG plot.
    Simulate {
        /// CSV with `second,arrivals,service_ms` rows or a `second,http_requests_total` series.
        #[arg(long)]
        trace: PathBuf,
        /// Take the scaling settings from this configuration (default: the defaults).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Which target of `--config` (default: the first one).
        #[arg(long)]
        target: Option<String>,
        /// Modelled time from asking for an instance to its readiness.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        startup_delay: Duration,
        /// Service time of each request in an `http_requests_total` trace.
        #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
        service_time: Duration,
        /// Requests one instance serves at once; more wait in wakegate, as a limit on the
        /// instance would make them (default: no limit).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        capacity: Option<u32>,
        /// Where `<trace name>.csv` and `<trace name>.svg` are written.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
    /// A small HTTP server for examples and tests: /, /healthz, /echo, /sleep?ms=N, /headers, /ws.
    /// Once it listens it sends READY=1 to $NOTIFY_SOCKET, if set.
    DemoBackend {
        #[arg(long, env = "PORT")]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
        /// How long to wait before listening, like a slow application starting up.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        startup_delay: Duration,
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
            eprintln!("wakegate: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Spans are exported by the proxy only, not by its tools nor the demo backends it starts
    // (which inherit its environment).
    let export = matches!(cli.command, Command::Run { .. });
    let telemetry = {
        let _runtime = runtime.enter();
        telemetry::init(cli.log_format, export)
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Run {
                config,
                listen_proxy,
                listen_admin,
            } => run(config, listen_proxy, listen_admin).await,
            Command::Check { config } => check(&config),
            Command::Simulate {
                trace,
                config,
                target,
                startup_delay,
                service_time,
                capacity,
                out_dir,
            } => simulate(Simulation {
                trace,
                config,
                target,
                startup_delay,
                service_time,
                capacity,
                out_dir,
            }),
            Command::DemoBackend {
                port,
                host,
                startup_delay,
            } => {
                let addr = SocketAddr::new(host, port);
                match wakegate::demo::run(addr, startup_delay, terminated()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("demo-backend: cannot serve on {addr}: {error}");
                        ExitCode::FAILURE
                    }
                }
            }
        }
    });
    // While the runtime still runs the exporter's connection.
    telemetry.shutdown();
    code
}

async fn run(path: PathBuf, proxy: Option<SocketAddr>, admin: Option<SocketAddr>) -> ExitCode {
    let mut config = match Config::load(&path) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!("{error}");
            return config_exit_code(&error);
        }
    };
    config.listen.proxy = proxy.unwrap_or(config.listen.proxy);
    config.listen.admin = admin.unwrap_or(config.listen.admin);
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        terminated().await;
        trigger.cancel();
    });
    match wakegate::app::run(config, Some(path), shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return config_exit_code(&error);
        }
    };
    // What the file cannot say by itself: the machine's programs, directories and files, and
    // the certificates as the proxy would read them at start.
    let (mut problems, warnings) = config.environment_problems();
    if let Some(tls) = &config.tls
        && let Err(errors) = Certificates::load(&tls.certificates)
    {
        problems.extend(errors.0.into_iter().map(|e| Problem {
            field: "tls.certificate".into(),
            value: format!("{:?}", e.path.display().to_string()),
            expected: format!("a usable file: {}", e.problem),
        }));
    }
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    if !problems.is_empty() {
        let error = ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        };
        eprintln!("{error}");
        return config_exit_code(&error);
    }
    println!(
        "{}: valid ({} target{})",
        path.display(),
        config.targets.len(),
        if config.targets.len() == 1 { "" } else { "s" }
    );
    ExitCode::SUCCESS
}

fn simulate(simulation: Simulation) -> ExitCode {
    match simulation.run() {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            match &error {
                SimulateError::Config(error) => config_exit_code(error),
                SimulateError::Trace(_) | SimulateError::NoSuchTarget { .. } => ExitCode::from(2),
                SimulateError::Write { .. } => ExitCode::FAILURE,
            }
        }
    }
}

fn config_exit_code(error: &ConfigError) -> ExitCode {
    match error {
        ConfigError::Read { .. } => ExitCode::FAILURE,
        ConfigError::Parse { .. } | ConfigError::Invalid { .. } => ExitCode::from(2),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
