//! Typed configuration: the TOML file, its defaults, and `validate()`, which reports every
//! problem with its field, its value and what was expected.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use route::{HostPattern, RefusalReason};

mod address;
pub mod annotations;
mod duration;
pub mod environment;
pub mod file;
pub mod limits;
pub mod route;
pub mod size;
pub mod target;

pub use file::File;
pub use limits::Limits;
pub use target::{
    Backend, Fixed, HealthPolicy, KubeTarget, Local, Metric, PrometheusSource, Protocol, RateLimit,
    ReadyCheck, Scaling, Serving, TargetConfig, Workload,
};

/// The longest any duration setting may be: longer is surely a mistake, and a deadline that far
/// ahead could not be represented on the clock.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
const MAX_DURATION_EXPECTED: &str = "a duration of at most 365days";

/// The checked configuration wakegate runs with (see [`File`] for the file as written).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: Listen,
    /// On SIGTERM/SIGINT, how long in-flight and held requests may take to finish.
    pub drain_timeout: Duration,
    pub autoscaler: Autoscaler,
    /// What one client connection may cost.
    pub limits: Limits,
    pub targets: Vec<TargetConfig>,
    /// Discover targets from annotated Services and scale their Deployments.
    pub kubernetes: Option<KubernetesConfig>,
    /// An HTTPS listener beside the cleartext one.
    pub tls: Option<TlsConfig>,
    /// One line per request, off when absent.
    pub access_log: Option<AccessLogConfig>,
}

/// `[access_log]`: one structured line per request, to standard output or a file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(
    deny_unknown_fields,
    expecting = "an `[access_log]` table such as `{ path = \"-\", format = \"json\" }`"
)]
pub struct AccessLogConfig {
    /// `-` for standard output (the default), else a file, appended to and reopened on SIGHUP
    /// (for logrotate).
    #[serde(default = "defaults::access_log_path")]
    pub path: PathBuf,
    #[serde(default)]
    pub format: AccessLogFormat,
    /// Whether the path is logged with its query string, which may carry tokens.
    #[serde(default)]
    pub query: bool,
}

impl AccessLogConfig {
    /// Standard output rather than a file.
    pub fn to_stdout(&self) -> bool {
        self.path.as_os_str() == "-"
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", expecting = "\"json\" or \"logfmt\"")]
pub enum AccessLogFormat {
    #[default]
    Json,
    Logfmt,
}

/// `[tls]`: where HTTPS clients connect and the certificates they are given.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(
    deny_unknown_fields,
    expecting = "a `[tls]` table with `listen` and `[[tls.certificate]]` entries"
)]
pub struct TlsConfig {
    /// HTTP/1.1 and HTTP/2, chosen by ALPN.
    #[serde(default = "defaults::tls_addr", with = "address")]
    pub listen: SocketAddr,
    /// `[[tls.certificate]]`: each serves the DNS names of its certificate's subjectAltName,
    /// chosen by SNI (exact names before `*.` wildcards); the first also serves clients that
    /// name no host, or one no certificate names.
    #[serde(default, rename = "certificate")]
    pub certificates: Vec<CertificateFiles>,
}

/// A certificate chain and its private key, PEM files (relative paths: to wakegate's working
/// directory).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(
    deny_unknown_fields,
    expecting = "a `[[tls.certificate]]` table such as `{ cert = \"tls.crt\", key = \"tls.key\" }`"
)]
pub struct CertificateFiles {
    /// The server's certificate first, then its intermediates.
    pub cert: PathBuf,
    /// PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key: PathBuf,
}

/// `[kubernetes]`: where to find the API server and what to watch.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, expecting = "a `[kubernetes]` table")]
pub struct KubernetesConfig {
    /// Watch these namespaces; empty means all.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Default: in-cluster configuration, else `KUBECONFIG` or `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    #[serde(default)]
    pub autoscaler: AutoscalerMode,
    /// Leader election for N→M decisions; without it this replica decides alone.
    pub lease: Option<LeaseConfig>,
    /// The headless Service listing every wakegate replica, whose `/metrics` the leader sums.
    pub peers: Option<PeersConfig>,
    /// Namespaces whose Services may claim wildcard (`*.example.com`) and catch-all (`*`)
    /// hosts; none by default.
    #[serde(default)]
    pub wildcard_namespaces: Vec<String>,
    /// Per namespace, the domains its Services may claim hosts in (a domain and every name
    /// under it). A namespace not listed may claim any exact host nobody holds yet.
    #[serde(default)]
    pub host_domains: BTreeMap<String, Vec<String>>,
}

impl KubernetesConfig {
    /// Whether a Service in `namespace` may claim `host` at all (whoever holds it already).
    pub fn may_claim(&self, namespace: &str, host: &HostPattern) -> Result<(), RefusalReason> {
        if host.is_wildcard() && !self.wildcard_namespaces.iter().any(|n| n == namespace) {
            return Err(RefusalReason::Wildcard);
        }
        if let HostPattern::Exact(name) | HostPattern::Suffix(name) = host {
            // A cluster-internal name belongs to its own namespace only.
            let name = name.trim_start_matches('.');
            let own_short_name =
                name.matches('.').count() == 1 && name.ends_with(&format!(".{namespace}"));
            let internal = name
                .strip_suffix(".svc.cluster.local")
                .or_else(|| name.strip_suffix(".svc"))
                .or(own_short_name.then_some(name));
            if let Some(internal) = internal
                && internal.rsplit('.').next() != Some(namespace)
            {
                return Err(RefusalReason::Namespace);
            }
            if internal.is_none()
                && let Some(domains) = self.host_domains.get(namespace)
                && !domains.iter().any(|d| {
                    let d = d.to_ascii_lowercase();
                    name == d || name.ends_with(&format!(".{d}"))
                })
            {
                return Err(RefusalReason::Domain);
            }
        }
        Ok(())
    }
}

/// Who makes N→M decisions for Kubernetes targets. Waking from zero is always wakegate's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", expecting = "\"internal\" or \"external\"")]
pub enum AutoscalerMode {
    #[default]
    Internal,
    /// KEDA or an HPA scales from the exported metrics.
    External,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(
    deny_unknown_fields,
    expecting = "a table such as `{ namespace = \"wakegate\", name = \"wakegate\" }`"
)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// A leader that has not renewed for this long is replaced.
    #[serde(default = "defaults::lease_duration", with = "duration")]
    pub duration: Duration,
    /// How often the leader renews (and followers check).
    #[serde(default = "defaults::lease_renew", with = "duration")]
    pub renew: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(
    deny_unknown_fields,
    expecting = "a table such as `{ namespace = \"wakegate\", service = \"wakegate-peers\" }`"
)]
pub struct PeersConfig {
    pub namespace: String,
    pub service: String,
    /// The EndpointSlice port (by name or number) of each replica's admin listener.
    #[serde(default = "defaults::peers_port")]
    pub port: String,
    /// A peer that does not answer `/metrics` within this long is skipped for that tick.
    #[serde(default = "defaults::scrape_timeout", with = "duration")]
    pub scrape_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(
    deny_unknown_fields,
    expecting = "a `[listen]` table such as `{ proxy = \"0.0.0.0:8080\", admin = \"127.0.0.1:9090\" }`"
)]
pub struct Listen {
    /// Where clients connect (HTTP/1.1 and h2c on the same port).
    #[serde(default = "defaults::proxy_addr", with = "address")]
    pub proxy: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`, `/targets`.
    #[serde(default = "defaults::admin_addr", with = "address")]
    pub admin: SocketAddr,
    /// Proxy worker threads, each with its own runtime, listening socket and upstream
    /// connections; default: one per CPU the process may use.
    pub workers: Option<usize>,
    /// KEDA's external-scaler gRPC service; off when absent.
    #[serde(default, with = "address::optional")]
    pub external_scaler: Option<SocketAddr>,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            proxy: defaults::proxy_addr(),
            admin: defaults::admin_addr(),
            workers: None,
            external_scaler: None,
        }
    }
}

impl Listen {
    /// How many proxy workers to run.
    pub fn workers(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(
    deny_unknown_fields,
    expecting = "an `[autoscaler]` table such as `{ interval = \"1s\" }`"
)]
pub struct Autoscaler {
    /// How often each target's scaling decision is taken (waking from zero never waits for it).
    #[serde(default = "defaults::interval", with = "duration")]
    pub interval: Duration,
}

impl Default for Autoscaler {
    fn default() -> Self {
        Self {
            interval: defaults::interval(),
        }
    }
}

mod defaults {
    pub fn access_log_path() -> std::path::PathBuf {
        "-".into()
    }

    use super::*;
    use crate::config::target::Metric;

    pub fn lease_duration() -> Duration {
        Duration::from_secs(15)
    }
    pub fn lease_renew() -> Duration {
        Duration::from_secs(5)
    }
    pub fn peers_port() -> String {
        "admin".to_owned()
    }
    pub fn scrape_timeout() -> Duration {
        Duration::from_secs(1)
    }

    pub fn proxy_addr() -> SocketAddr {
        "127.0.0.1:8080".parse().expect("valid literal")
    }
    pub fn admin_addr() -> SocketAddr {
        "127.0.0.1:9090".parse().expect("valid literal")
    }
    pub fn tls_addr() -> SocketAddr {
        "127.0.0.1:8443".parse().expect("valid literal")
    }
    pub fn drain_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn namespace() -> String {
        "local".to_owned()
    }
    pub fn path_prefixes() -> Vec<String> {
        vec!["/".to_owned()]
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(300)
    }
    pub fn cold_start_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn max_pending() -> u32 {
        1000
    }
    /// A thousand held gRPC calls, each pinning its HTTP/2 stream window.
    pub fn max_pending_bytes() -> u64 {
        64 << 20
    }
    pub fn stop_grace() -> Duration {
        Duration::from_secs(10)
    }
    pub fn start_backoff() -> Duration {
        Duration::from_secs(1)
    }
    pub fn health_failures() -> u32 {
        3
    }
    pub fn health_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn max_instances() -> u32 {
        10
    }
    pub fn stable_window() -> Duration {
        Duration::from_secs(60)
    }
    pub fn panic_window() -> Duration {
        Duration::from_secs(6)
    }
    pub fn panic_threshold() -> f64 {
        2.0
    }
    pub fn max_scale_up_rate() -> f64 {
        1000.0
    }
    pub fn max_scale_down_rate() -> f64 {
        2.0
    }
    pub fn scale_down_delay() -> Duration {
        Duration::from_secs(30)
    }
    pub fn metric() -> Metric {
        Metric::Concurrency
    }
}

/// One problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub value: String,
    pub expected: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: got {}, expected {}",
            self.field, self.value, self.expected
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path} has {} problem(s):\n{}", problems.len(), list(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Reads, parses and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file = File::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        file.into_config().map_err(|problems| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    /// The first `[[target]]` of a configuration written in `toml`, for tests and benches;
    /// panics, with the problems, when the text does not read or check.
    #[doc(hidden)]
    pub fn first_target(toml: &str) -> TargetConfig {
        let file = File::parse(toml).unwrap_or_else(|e| panic!("{e}"));
        let mut config = file
            .into_config()
            .unwrap_or_else(|problems| panic!("{}", list(&problems)));
        config.targets.remove(0)
    }

    /// The settings that differ from `running`'s and take effect only on a restart, by field.
    pub fn restart_needed(&self, running: &Config) -> Vec<&'static str> {
        let (new, old) = (&self.listen, &running.listen);
        let mut fields = Vec::new();
        if new.proxy != old.proxy {
            fields.push("listen.proxy");
        }
        if new.admin != old.admin {
            fields.push("listen.admin");
        }
        if new.workers != old.workers {
            fields.push("listen.workers");
        }
        if new.external_scaler != old.external_scaler {
            fields.push("listen.external_scaler");
        }
        if self.kubernetes != running.kubernetes {
            fields.push("kubernetes");
        }
        if self.tls.as_ref().map(|t| t.listen) != running.tls.as_ref().map(|t| t.listen) {
            fields.push("tls.listen");
        }
        fields
    }
}

#[cfg(test)]
mod tests;
