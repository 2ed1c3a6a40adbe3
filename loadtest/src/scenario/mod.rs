//! The named scenarios. Each sets up what it measures on 127.0.0.1, runs the paths it compares
//! interleaved (A, B, C, A, B, C, ...) so that the machine's other load hits them alike, and
//! writes its report; every child process stops when the scenario ends, fails or is interrupted.

mod burst;
mod cold_start;
mod grpc;
mod inflight;
mod kube_scale;
mod latency;
mod routes;
mod tls;
mod warm;

use std::path::PathBuf;
use std::time::Duration;

use crate::Error;
pub use kube_scale::Options as KubeScale;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Name {
    /// Throughput, latency, CPU and memory: direct, through nginx, through wakegate.
    Warm,
    /// Open-loop latency at half the maximum rate: what each proxy adds to direct.
    Latency,
    /// Idle → first request on a local target: wakegate's overhead over the backend's start.
    ColdStart,
    /// 10,000 concurrent requests arriving at a cold target.
    Burst,
    /// 4,000 requests in flight to a slow upstream: each proxy's memory per request, wakegate
    /// vs nginx vs HAProxy.
    Inflight,
    /// Throughput and memory with 1, 1,000 and 10,000 targets.
    Routes,
    /// h2c on both sides: gRPC unary calls, then GETs forwarded over HTTP/1.1; direct, through
    /// nginx, through wakegate.
    Grpc,
    /// HTTPS: HTTP/1.1 and h2 over TLS, and a full handshake per request; direct (cleartext),
    /// through nginx, through wakegate, with the same certificate.
    Tls,
    /// Every scenario above, in turn.
    All,
    /// 5,000 annotated Services, 20,000 EndpointSlices, 100 endpoint changes a second: delay
    /// to the routing table, memory, CPU per change (not part of `all`).
    KubeScale,
}

/// How the `cold-start` scenario's local target is found ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ready {
    /// `ready = { tcp = true }`: wakegate polls the port.
    Tcp,
    /// `ready = { notify = true }`: the backend sends READY=1.
    Notify,
}

pub struct Settings {
    pub wakegate: PathBuf,
    pub out: PathBuf,
    pub rounds: usize,
    pub quick: bool,
    pub ready: Ready,
    pub kube: KubeScale,
}

impl Settings {
    /// `full` normally, `quick` with `--quick`.
    pub fn pick(&self, full: Duration, quick: Duration) -> Duration {
        if self.quick { quick } else { full }
    }

    pub fn count(&self, full: usize, quick: usize) -> usize {
        if self.quick { quick } else { full }
    }
}

pub async fn run(name: Name, settings: &Settings) -> Result<(), Error> {
    let names: &[Name] = match name {
        Name::All => &[
            Name::Warm,
            Name::Latency,
            Name::ColdStart,
            Name::Burst,
            Name::Inflight,
            Name::Routes,
            Name::Grpc,
            Name::Tls,
        ],
        _ => std::slice::from_ref(&name),
    };
    for name in names {
        let written = match name {
            Name::Warm => warm::run(settings).await?,
            Name::Latency => latency::run(settings).await?,
            Name::ColdStart => cold_start::run(settings).await?,
            Name::Burst => burst::run(settings).await?,
            Name::Inflight => inflight::run(settings).await?,
            Name::Routes => routes::run(settings).await?,
            Name::Grpc => grpc::run(settings).await?,
            Name::Tls => tls::run(settings).await?,
            Name::KubeScale => kube_scale::run(settings).await?,
            Name::All => unreachable!("expanded above"),
        };
        let text = std::fs::read_to_string(&written).unwrap_or_default();
        println!("{text}");
        eprintln!("loadtest: wrote {} (and .json, .svg)", written.display());
    }
    Ok(())
}

pub(crate) fn log(message: impl std::fmt::Display) {
    eprintln!(">> {message}");
}

/// A progress line: `\r`-updated on a terminal, one line each otherwise.
pub(crate) fn progress(line: String) {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprint!("\r{line}\x1b[K");
    } else {
        eprintln!("{line}");
    }
}

pub(crate) fn progress_end() {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
}

/// The path of wakegate with its access log on.
const LOGGED: &str = "wakegate+log";

/// The path of HAProxy.
const HAPROXY: &str = "HAProxy";

/// The path of a second wakegate, the same build with the same configuration: what the
/// machine alone makes of two identical proxies.
const TWIN: &str = "wakegate twin";

/// The second wakegate that runs beside the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Second {
    /// The same wakegate with its access log on.
    AccessLog,
    /// The same wakegate again ([`TWIN`]).
    Twin,
}

/// The upstream, and nginx, HAProxy (each when installed and asked for) and wakegate proxying
/// to it: the paths `warm`, `latency` and `grpc` compare.
struct Stand {
    upstream: crate::stand::Upstream,
    nginx: Option<crate::stand::Server>,
    haproxy: Option<crate::stand::Server>,
    wakegate: crate::stand::Wakegate,
    /// The second wakegate and its path's name ([`LOGGED`] or [`TWIN`]), when asked for.
    second: Option<(&'static str, crate::stand::Wakegate)>,
    /// The file the [`LOGGED`] wakegate writes its access log to.
    access_log: Option<std::path::PathBuf>,
}

impl Stand {
    async fn start(
        work: &crate::procs::WorkDir,
        settings: &Settings,
        nginx: bool,
        haproxy: bool,
        second: Second,
        probe: Duration,
    ) -> Result<Stand, Error> {
        use crate::stand;
        log(format!(
            "choosing the upstream: the demo backend{} measured directly for {probe:?} each",
            if nginx { " and a static nginx" } else { "" }
        ));
        let upstream = stand::choose_upstream(work, &settings.wakegate, nginx, probe).await?;
        log(upstream.describe());
        let nginx = if nginx {
            Some(stand::start_nginx_proxy(work, upstream.server.addr)?)
        } else {
            None
        };
        let haproxy = if haproxy {
            Some(stand::start_haproxy_proxy(work, upstream.server.addr)?)
        } else {
            None
        };
        let target = format!(
            "[[target]]\nname = \"upstream\"\nhosts = [\"*\"]\nupstream = \"{}\"\n",
            upstream.server.addr
        );
        let wakegate = stand::Wakegate::start(work, &settings.wakegate, "wakegate", "", &target)?;
        let (path_name, name, head, access_log) = match second {
            Second::AccessLog => {
                let path = work.path.join("access.log");
                let head = format!("[access_log]\npath = {:?}\n", path.display().to_string());
                (LOGGED, "wakegate-log", head, Some(path))
            }
            Second::Twin => (TWIN, "wakegate-twin", String::new(), None),
        };
        let second = stand::Wakegate::start(work, &settings.wakegate, name, &head, &target)?;
        Ok(Stand {
            upstream,
            nginx,
            haproxy,
            wakegate,
            second: Some((path_name, second)),
            access_log,
        })
    }

    /// (name, server) of each path, in the order they run: direct, nginx, HAProxy, wakegate,
    /// and wakegate with its access log or its twin.
    fn paths(&self) -> Vec<(&'static str, &crate::stand::Server)> {
        let mut paths = vec![("direct", &self.upstream.server)];
        if let Some(nginx) = &self.nginx {
            paths.push(("nginx", nginx));
        }
        if let Some(haproxy) = &self.haproxy {
            paths.push((HAPROXY, haproxy));
        }
        paths.push(("wakegate", &self.wakegate.server));
        if let Some((name, second)) = &self.second {
            paths.push((name, &second.server));
        }
        paths
    }

    /// The paths of round `round`: as [`Stand::paths`], but wakegate and the second wakegate
    /// (with its access log, or its twin) swap places every other round, so that a drift of
    /// the machine's speed within a round favours neither.
    fn paths_of_round(&self, round: usize) -> Vec<(&'static str, &crate::stand::Server)> {
        let mut paths = self.paths();
        if round.is_multiple_of(2) && self.second.is_some() {
            let n = paths.len();
            paths.swap(n - 2, n - 1);
        }
        paths
    }

    /// The proxies wakegate is compared with, of those running: nginx, HAProxy.
    fn peers(&self) -> Vec<&'static str> {
        let mut peers = Vec::new();
        if self.nginx.is_some() {
            peers.push("nginx");
        }
        if self.haproxy.is_some() {
            peers.push(HAPROXY);
        }
        peers
    }

    fn check_running(&mut self) -> Result<(), Error> {
        self.upstream.server.check_running()?;
        if let Some(nginx) = &mut self.nginx {
            nginx.check_running()?;
        }
        if let Some(haproxy) = &mut self.haproxy {
            haproxy.check_running()?;
        }
        if let Some((_, second)) = &mut self.second {
            second.server.check_running()?;
        }
        self.wakegate.server.check_running()
    }
}
