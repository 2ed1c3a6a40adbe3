//! One target as wakegate runs it: its route, how it is served, how it scales, and exactly one
//! backend, so that a target with both a command and an upstream cannot be represented.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use http::uri::Authority;
use serde::{Deserialize, Deserializer};

use super::defaults;
use super::route::Route;

#[derive(Debug, Clone, PartialEq)]
pub struct TargetConfig {
    pub name: String,
    /// The `namespace` label of this target's metrics.
    pub namespace: String,
    pub route: Route,
    pub serving: Serving,
    pub scaling: Scaling,
    pub backend: Backend,
}

/// How wakegate serves a target's requests, whatever its backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Serving {
    /// No request for this long: the target may scale to zero.
    pub idle_timeout: Duration,
    /// The longest a request is held while the target wakes.
    pub cold_start_timeout: Duration,
    /// Requests held at once while the target wakes; more get 503.
    pub max_pending: u32,
    /// Longest wait for an upstream's response headers; none by default.
    pub response_timeout: Option<Duration>,
    /// Browsers (`Accept: text/html`) get a self-refreshing "waking up" page instead of waiting.
    pub wake_page: bool,
}

impl Default for Serving {
    fn default() -> Self {
        Self {
            idle_timeout: defaults::idle_timeout(),
            cold_start_timeout: defaults::cold_start_timeout(),
            max_pending: defaults::max_pending(),
            response_timeout: None,
            wake_page: false,
        }
    }
}

/// What serves a target's requests.
#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    /// Processes that wakegate starts and stops.
    Local(Local),
    /// An always-on `host:port`: proxied and counted, never started, stopped or scaled.
    Fixed { upstream: Authority },
    /// A Service's ready pods; its workload is scaled through the API server.
    Kubernetes(KubeTarget),
}

impl Backend {
    /// What `/targets` calls this kind of backend.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Local(_) => "local",
            Backend::Fixed { .. } => "upstream",
            Backend::Kubernetes(_) => "kubernetes",
        }
    }
}

/// A local process per instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Local {
    /// Program and arguments; `{port}` is replaced by the port the instance must listen on.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    pub ready: ReadyCheck,
    /// Between SIGTERM and SIGKILL when an instance is stopped, and the longest its
    /// in-flight requests may take to finish before that.
    pub stop_grace: Duration,
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
    #[serde(default = "defaults::stable_window", with = "super::duration")]
    pub stable_window: Duration,
    /// The short window that detects spikes.
    #[serde(default = "defaults::panic_window", with = "super::duration")]
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
    #[serde(default = "defaults::scale_down_delay", with = "super::duration")]
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
