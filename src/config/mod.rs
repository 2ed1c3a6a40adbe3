//! Typed configuration: the TOML file, its defaults, and `validate()`, which reports every
//! problem with its field, its value and what was expected.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub mod annotations;
mod duration;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listen: Listen,
    /// On SIGTERM/SIGINT, how long in-flight and held requests may take to finish.
    #[serde(default = "defaults::drain_timeout", with = "duration")]
    pub drain_timeout: Duration,
    #[serde(default)]
    pub autoscaler: Autoscaler,
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetConfig>,
    /// Discover targets from annotated Services and scale their Deployments.
    pub kubernetes: Option<KubernetesConfig>,
}

/// `[kubernetes]`: where to find the API server and what to watch.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
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
}

/// Who makes N→M decisions for Kubernetes targets. Waking from zero is always wakegate's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoscalerMode {
    #[default]
    Internal,
    /// KEDA or an HPA scales from the exported metrics.
    External,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
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

/// Where a target discovered from a Kubernetes Service sends traffic and what it scales.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeTarget {
    pub namespace: String,
    pub service: String,
    pub deployment: String,
    /// The name of the Service port to route to ("" for an unnamed port), as EndpointSlices
    /// name their ports.
    pub port_name: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Where clients connect (HTTP/1.1 and h2c on the same port).
    #[serde(default = "defaults::proxy_addr")]
    pub proxy: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`, `/targets`.
    #[serde(default = "defaults::admin_addr")]
    pub admin: SocketAddr,
    /// Proxy worker threads, each with its own runtime, listening socket and upstream
    /// connections; default: one per CPU the process may use.
    pub workers: Option<usize>,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            proxy: defaults::proxy_addr(),
            admin: defaults::admin_addr(),
            workers: None,
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
#[serde(deny_unknown_fields)]
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

/// One `[[target]]`: where its traffic comes from (hosts, path prefixes) and what serves it
/// (a local `command` that wakegate starts and stops, or a fixed `upstream`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    /// The `namespace` label of this target's metrics.
    #[serde(default = "defaults::namespace")]
    pub namespace: String,
    /// Exact host names, `*.suffix` wildcards, or `*` for every host.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default = "defaults::path_prefixes")]
    pub path_prefixes: Vec<String>,
    /// Program and arguments; `{port}` is replaced by the port the instance must listen on.
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    /// A fixed `host:port` that is always on: proxied and counted, never started or stopped.
    pub upstream: Option<String>,
    #[serde(default)]
    pub ready: ReadyCheck,
    #[serde(default = "defaults::idle_timeout", with = "duration")]
    pub idle_timeout: Duration,
    #[serde(default = "defaults::cold_start_timeout", with = "duration")]
    pub cold_start_timeout: Duration,
    #[serde(default = "defaults::max_pending")]
    pub max_pending: u32,
    /// Between SIGTERM and SIGKILL when an instance is stopped.
    #[serde(default = "defaults::stop_grace", with = "duration")]
    pub stop_grace: Duration,
    /// Longest wait for an upstream's response headers; none by default.
    #[serde(default, with = "duration::option")]
    pub response_timeout: Option<Duration>,
    #[serde(default)]
    pub scaling: Scaling,
    /// Browsers (`Accept: text/html`) get a self-refreshing "waking up" page instead of waiting.
    #[serde(default)]
    pub wake_page: bool,
    /// Set for targets discovered from Kubernetes (never read from the file).
    #[serde(skip)]
    pub kubernetes: Option<KubeTarget>,
}

/// How wakegate decides that a freshly started instance can take traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ReadyCheck {
    /// The port accepts a TCP connection.
    #[default]
    Tcp,
    /// `GET path` answers with a 2xx or 3xx status.
    HttpGet(String),
    /// The instance says so itself: it sends `READY=1` to the socket named in its
    /// `NOTIFY_SOCKET` (systemd's `sd_notify` protocol).
    Notify,
}

impl<'de> Deserialize<'de> for ReadyCheck {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            tcp: Option<bool>,
            http_get: Option<String>,
            notify: Option<bool>,
        }
        let raw = Raw::deserialize(d)?;
        match (raw.tcp, &raw.http_get, raw.notify) {
            (Some(true), None, None) => return Ok(ReadyCheck::Tcp),
            (None, Some(path), None) => return Ok(ReadyCheck::HttpGet(path.clone())),
            (None, None, Some(true)) => return Ok(ReadyCheck::Notify),
            _ => {}
        }
        let given: Vec<String> = [
            raw.tcp.map(|on| format!("tcp = {on}")),
            raw.http_get.map(|path| format!("http_get = {path:?}")),
            raw.notify.map(|on| format!("notify = {on}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        let given = if given.is_empty() {
            "{}".to_owned()
        } else {
            format!("{{ {} }}", given.join(", "))
        };
        Err(serde::de::Error::custom(format!(
            "got `{given}`, expected exactly one of `{{ tcp = true }}`, \
             `{{ http_get = \"/path\" }}` or `{{ notify = true }}`"
        )))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Concurrency,
    Rps,
}

/// How a target follows its load between `min` and `max` instances.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scaling {
    #[serde(default)]
    pub min: u32,
    #[serde(default = "defaults::max_instances")]
    pub max: u32,
    #[serde(default = "defaults::metric")]
    pub metric: Metric,
    /// Per-instance target of `metric`; defaults to 10 (concurrency) or 50 (rps).
    pub target: Option<f64>,
    /// The signal is averaged over this window for ordinary decisions.
    #[serde(default = "defaults::stable_window", with = "duration")]
    pub stable_window: Duration,
    /// The short window that detects spikes.
    #[serde(default = "defaults::panic_window", with = "duration")]
    pub panic_window: Duration,
    /// Panic when the panic window wants this many times the ready instances.
    #[serde(default = "defaults::panic_threshold")]
    pub panic_threshold: f64,
    /// At most this many times the current instances per decision.
    #[serde(default = "defaults::max_scale_up_rate")]
    pub max_scale_up_rate: f64,
    /// At least the current instances divided by this per decision.
    #[serde(default = "defaults::max_scale_down_rate")]
    pub max_scale_down_rate: f64,
    /// A lower count is applied only once every recommendation of this long agrees.
    #[serde(default = "defaults::scale_down_delay", with = "duration")]
    pub scale_down_delay: Duration,
}

impl Scaling {
    /// The per-instance target of the metric, as the user wrote it or its default.
    pub fn target_value(&self) -> f64 {
        self.target.unwrap_or(match self.metric {
            Metric::Concurrency => 10.0,
            Metric::Rps => 50.0,
        })
    }
}

impl Default for Scaling {
    fn default() -> Self {
        toml::from_str("").expect("every scaling field has a default")
    }
}

mod defaults {
    use super::*;

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
        TargetConfig::DEFAULT_IDLE_TIMEOUT
    }
    pub fn cold_start_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn max_pending() -> u32 {
        1000
    }
    pub fn stop_grace() -> Duration {
        Duration::from_secs(10)
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
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// Parses TOML text without validating it.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Every semantic problem of this configuration; empty when it is valid.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut push = |field: String, value: String, expected: &str| {
            problems.push(Problem {
                field,
                value,
                expected: expected.to_owned(),
            })
        };
        if self.drain_timeout.is_zero() {
            push(
                "drain_timeout".into(),
                "\"0s\"".into(),
                "a duration above zero",
            );
        }
        if self.listen.workers == Some(0) {
            push("listen.workers".into(), "0".into(), "at least 1");
        }
        if self.autoscaler.interval < Duration::from_millis(10) {
            push(
                "autoscaler.interval".into(),
                format!(
                    "{:?}",
                    humantime::format_duration(self.autoscaler.interval).to_string()
                ),
                "a duration of at least 10ms",
            );
        }
        let mut names = std::collections::HashSet::new();
        let mut routes = std::collections::HashMap::new();
        for (i, t) in self.targets.iter().enumerate() {
            let at = |field: &str| format!("target[{i}] ({}).{field}", t.name);
            if t.name.is_empty()
                || !t
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            {
                push(
                    format!("target[{i}].name"),
                    format!("{:?}", t.name),
                    "a non-empty name of letters, digits, '-', '_' or '.'",
                );
            } else if !names.insert(t.name.as_str()) {
                push(
                    format!("target[{i}].name"),
                    format!("{:?}", t.name),
                    "a name no other target uses",
                );
            }
            if t.hosts.is_empty() {
                push(
                    at("hosts"),
                    "[]".into(),
                    "at least one host (exact, \"*.suffix\" or \"*\")",
                );
            }
            for (h, host) in t.hosts.iter().enumerate() {
                if let Err(why) = crate::proxy::route::HostPattern::parse(host) {
                    push(at(&format!("hosts[{h}]")), format!("{host:?}"), why);
                }
            }
            if t.path_prefixes.is_empty() {
                push(
                    at("path_prefixes"),
                    "[]".into(),
                    "at least one path prefix such as \"/\"",
                );
            }
            for (p, prefix) in t.path_prefixes.iter().enumerate() {
                if !prefix.starts_with('/') || prefix.contains(['?', '#', ' ']) {
                    push(
                        at(&format!("path_prefixes[{p}]")),
                        format!("{prefix:?}"),
                        "a path starting with '/' without '?', '#' or spaces",
                    );
                }
            }
            for host in &t.hosts {
                for prefix in &t.path_prefixes {
                    let key = (
                        host.to_ascii_lowercase(),
                        crate::proxy::route::normalize_prefix(prefix),
                    );
                    if let Some(other) = routes.insert(key, t.name.as_str())
                        && other != t.name
                    {
                        push(
                            at("hosts"),
                            format!("{host:?} with prefix {prefix:?}"),
                            &format!("a host and prefix not already routed to target {other:?}"),
                        );
                    }
                }
            }
            match (&t.command, &t.upstream) {
                (Some(_), Some(_)) => push(
                    at("upstream"),
                    format!("{:?}", t.upstream.as_deref().unwrap_or_default()),
                    "either `command` or `upstream`, not both",
                ),
                (None, None) => push(
                    at("command"),
                    "nothing".into(),
                    "either `command` (a local process) or `upstream` (a fixed host:port)",
                ),
                (Some(cmd), None) => {
                    if cmd.is_empty() || cmd[0].is_empty() {
                        push(
                            at("command"),
                            format!("{cmd:?}"),
                            "a program followed by its arguments",
                        );
                    }
                }
                (None, Some(up)) => {
                    if up
                        .parse::<http::uri::Authority>()
                        .ok()
                        .and_then(|a| a.port_u16())
                        .is_none()
                        || up.contains('/')
                    {
                        push(
                            at("upstream"),
                            format!("{up:?}"),
                            "a host:port such as \"127.0.0.1:9000\"",
                        );
                    }
                }
            }
            if let ReadyCheck::HttpGet(path) = &t.ready
                && !path.starts_with('/')
            {
                push(
                    at("ready.http_get"),
                    format!("{path:?}"),
                    "a path starting with '/'",
                );
            }
            if t.ready == ReadyCheck::Notify && t.command.is_none() {
                push(
                    at("ready.notify"),
                    "true".into(),
                    "a local `command` to notify: wakegate never starts an `upstream`",
                );
            }
            if t.cold_start_timeout.is_zero() {
                push(
                    at("cold_start_timeout"),
                    "\"0s\"".into(),
                    "a duration above zero",
                );
            }
            if t.idle_timeout.is_zero() {
                push(at("idle_timeout"), "\"0s\"".into(), "a duration above zero");
            }
            if t.max_pending == 0 {
                push(at("max_pending"), "0".into(), "at least 1");
            }
            if t.response_timeout.is_some_and(|d| d.is_zero()) {
                push(
                    at("response_timeout"),
                    "\"0s\"".into(),
                    "a duration above zero, or no value",
                );
            }
            let s = &t.scaling;
            if s.max == 0 {
                push(at("scaling.max"), "0".into(), "at least 1");
            }
            if s.min > s.max {
                push(
                    at("scaling.min"),
                    s.min.to_string(),
                    &format!("at most scaling.max ({})", s.max),
                );
            }
            for (field, window) in [
                ("stable_window", s.stable_window),
                ("panic_window", s.panic_window),
            ] {
                if window.is_zero() {
                    push(
                        at(&format!("scaling.{field}")),
                        "\"0s\"".into(),
                        "a duration above zero",
                    );
                }
            }
            if s.panic_window > s.stable_window {
                push(
                    at("scaling.panic_window"),
                    humantime::format_duration(s.panic_window).to_string(),
                    &format!(
                        "at most scaling.stable_window ({})",
                        humantime::format_duration(s.stable_window)
                    ),
                );
            }
            for (field, value, floor) in [
                ("panic_threshold", s.panic_threshold, 1.0),
                ("max_scale_up_rate", s.max_scale_up_rate, 1.0),
                ("max_scale_down_rate", s.max_scale_down_rate, 1.0),
            ] {
                if !(value.is_finite() && value > floor) {
                    push(
                        at(&format!("scaling.{field}")),
                        value.to_string(),
                        "a number above 1",
                    );
                }
            }
            if let Some(target) = s.target
                && !(target.is_finite() && target > 0.0)
            {
                push(
                    at("scaling.target"),
                    target.to_string(),
                    "a number above zero",
                );
            }
        }
        if self.listen.proxy == self.listen.admin && self.listen.proxy.port() != 0 {
            push(
                "listen.admin".into(),
                self.listen.admin.to_string(),
                "an address other than listen.proxy",
            );
        }
        if let Some(k) = &self.kubernetes {
            if let Some(lease) = &k.lease {
                for (field, value) in [("namespace", &lease.namespace), ("name", &lease.name)] {
                    if value.is_empty() {
                        push(
                            format!("kubernetes.lease.{field}"),
                            "\"\"".into(),
                            "a non-empty name",
                        );
                    }
                }
                if lease.renew.is_zero() || lease.renew >= lease.duration {
                    push(
                        "kubernetes.lease.renew".into(),
                        humantime::format_duration(lease.renew).to_string(),
                        &format!(
                            "a duration above zero and below kubernetes.lease.duration ({})",
                            humantime::format_duration(lease.duration)
                        ),
                    );
                }
            }
            if let Some(peers) = &k.peers {
                for (field, value) in [
                    ("namespace", &peers.namespace),
                    ("service", &peers.service),
                    ("port", &peers.port),
                ] {
                    if value.is_empty() {
                        push(
                            format!("kubernetes.peers.{field}"),
                            "\"\"".into(),
                            "a non-empty value",
                        );
                    }
                }
            }
        }
        problems
    }
}

impl TargetConfig {
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

    /// True when `other` runs the same thing the same way, so a reload may keep its
    /// instances and counters; routing fields (hosts, path prefixes) may differ.
    pub fn same_runtime(&self, other: &TargetConfig) -> bool {
        let strip = |t: &TargetConfig| TargetConfig {
            hosts: Vec::new(),
            path_prefixes: Vec::new(),
            ..t.clone()
        };
        strip(self) == strip(other)
    }
}

#[cfg(test)]
mod tests;
