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
    /// A stream (a response still streaming, an upgraded connection) that carried nothing in
    /// either direction for this long no longer keeps the target awake.
    pub stream_idle_timeout: Duration,
    /// The longest a request is held while the target wakes.
    pub cold_start_timeout: Duration,
    /// Requests held at once while the target wakes (or waits for a free instance); more
    /// get 503.
    pub max_pending: u32,
    /// Bytes the requests held at once may pin (heads, and HTTP/2 bodies not yet forwarded);
    /// more get 503.
    pub max_pending_bytes: u64,
    /// Requests one instance takes at once; beyond it requests wait in wakegate. 0: no limit.
    pub instance_concurrency: u32,
    /// Longest wait for an upstream's response headers; none by default.
    pub response_timeout: Option<Duration>,
    /// Browsers (`Accept: text/html`) get a self-refreshing "waking up" page instead of waiting.
    pub wake_page: bool,
    /// How wakegate speaks to the target's instances.
    pub protocol: Protocol,
    /// Requests per second per client address; none by default.
    pub rate_limit: Option<RateLimit>,
    /// When an endpoint counts as unhealthy, and when it is tried again.
    pub health: HealthPolicy,
}

/// Passive health: an endpoint that fails `failures` times in a row (a connect, or a request
/// that got no response) is unhealthy and gets no requests but a trial, or the active check
/// of a fixed upstream, every `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    pub failures: u32,
    /// How often an unhealthy endpoint is tried again, and how often an active check runs.
    pub interval: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            failures: defaults::health_failures(),
            interval: defaults::health_interval(),
        }
    }
}

/// A per-client rate limit: a client (a TCP peer address) may send `burst` requests at once,
/// then `per_second` on average; beyond that it gets 429.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

impl RateLimit {
    /// The most a limit may allow: a million requests per second per client.
    pub const MAX_PER_SECOND: f64 = 1e6;
    /// What `per_second` must be, for problems.
    pub const EXPECTED_PER_SECOND: &'static str =
        "a number of requests per second above zero and at most 1000000";

    pub fn valid_per_second(per_second: f64) -> bool {
        per_second.is_finite() && per_second > 0.0 && per_second <= Self::MAX_PER_SECOND
    }

    /// `per_second` with its default burst.
    pub fn new(per_second: f64) -> Self {
        Self {
            per_second,
            burst: Self::default_burst(per_second),
        }
    }

    /// The burst when none is given: one second's worth of requests, at least 1.
    pub fn default_burst(per_second: f64) -> u32 {
        (per_second.ceil() as u32).max(1)
    }
}

/// The protocol of a target's instances, as the user declares it: never guessed from requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", expecting = "\"http1\" or \"h2c\"")]
pub enum Protocol {
    /// HTTP/1.1, pooled keep-alive connections.
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (RFC 9113 §3.3): what gRPC servers speak.
    H2c,
}

impl Protocol {
    /// What the configuration file and `wakegate.io/protocol` call it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2c => "h2c",
        }
    }

    /// The protocol a Service port's `appProtocol` names: `kubernetes.io/h2c`, and the
    /// spellings in common use for HTTP/2 (`h2c`, `http2`, `grpc`); anything else is HTTP/1.1.
    pub fn from_app_protocol(app_protocol: &str) -> Protocol {
        let p = app_protocol.trim().to_ascii_lowercase();
        match p.as_str() {
            "kubernetes.io/h2c" | "h2c" | "http2" | "grpc" => Protocol::H2c,
            _ => Protocol::Http1,
        }
    }
}

impl Default for Serving {
    fn default() -> Self {
        Self {
            idle_timeout: defaults::idle_timeout(),
            stream_idle_timeout: defaults::idle_timeout(),
            cold_start_timeout: defaults::cold_start_timeout(),
            max_pending: defaults::max_pending(),
            max_pending_bytes: defaults::max_pending_bytes(),
            instance_concurrency: 0,
            response_timeout: None,
            wake_page: false,
            protocol: Protocol::default(),
            rate_limit: None,
            health: HealthPolicy::default(),
        }
    }
}

/// What serves a target's requests.
#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    /// Processes that wakegate starts and stops.
    Local(Local),
    /// An always-on `host:port`: proxied and counted, never started, stopped or scaled.
    Fixed(Fixed),
    /// A Service's ready pods; its workload is scaled through the API server.
    Kubernetes(KubeTarget),
}

impl Backend {
    /// What `/targets` calls this kind of backend.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Local(_) => "local",
            Backend::Fixed(_) => "upstream",
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
    /// The first crash back-off (doubled with each failure in a row, see README); zero: none.
    pub start_backoff: Duration,
}

/// An always-on upstream that wakegate fronts.
#[derive(Debug, Clone, PartialEq)]
pub struct Fixed {
    pub upstream: Authority,
    /// The active health check, run every `health.interval`; none by default.
    pub check: Option<ReadyCheck>,
}

/// Where a target discovered from a Kubernetes Service sends traffic and what it scales.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeTarget {
    pub namespace: String,
    pub service: String,
    /// What `/scale` wakes and scales, in the Service's namespace.
    pub workload: Workload,
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
    /// The standard gRPC health service (`grpc.health.v1.Health/Check`) answers `SERVING`
    /// for this service name ("" asks about the server as a whole).
    Grpc(String),
}

impl<'de> Deserialize<'de> for ReadyCheck {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(
            deny_unknown_fields,
            expecting = "a table such as `{ http_get = \"/healthz\" }`, `{ tcp = true }`, `{ notify = true }` or `{ grpc = true }`"
        )]
        struct Raw {
            tcp: Option<bool>,
            http_get: Option<String>,
            notify: Option<bool>,
            grpc: Option<GrpcService>,
        }
        /// `grpc = true` (the whole server) or `grpc = "package.Service"`.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum GrpcService {
            Server(bool),
            Named(String),
        }
        let raw = Raw::deserialize(d)?;
        match (raw.tcp, &raw.http_get, raw.notify, &raw.grpc) {
            (Some(true), None, None, None) => return Ok(ReadyCheck::Tcp),
            (None, Some(path), None, None) => return Ok(ReadyCheck::HttpGet(path.clone())),
            (None, None, Some(true), None) => return Ok(ReadyCheck::Notify),
            (None, None, None, Some(GrpcService::Server(true))) => {
                return Ok(ReadyCheck::Grpc(String::new()));
            }
            (None, None, None, Some(GrpcService::Named(service))) => {
                return Ok(ReadyCheck::Grpc(service.clone()));
            }
            _ => {}
        }
        let given: Vec<String> = [
            raw.tcp.map(|on| format!("tcp = {on}")),
            raw.http_get.map(|path| format!("http_get = {path:?}")),
            raw.notify.map(|on| format!("notify = {on}")),
            raw.grpc.map(|grpc| match grpc {
                GrpcService::Server(on) => format!("grpc = {on}"),
                GrpcService::Named(service) => format!("grpc = {service:?}"),
            }),
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
             `{{ http_get = \"/path\" }}`, `{{ notify = true }}`, `{{ grpc = true }}` or \
             `{{ grpc = \"package.Service\" }}`"
        )))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", expecting = "\"concurrency\" or \"rps\"")]
pub enum Metric {
    Concurrency,
    Rps,
}

impl Serving {
    /// The most `instance_concurrency` may be: a limit meant to protect an instance, not to
    /// stand for "no limit" (that is 0).
    pub const MAX_INSTANCE_CONCURRENCY: u32 = 10_000;
    /// What `instance_concurrency` must be, for problems.
    pub const EXPECTED_INSTANCE_CONCURRENCY: &'static str =
        "0 (no limit) or a whole number of requests up to 10000";

    /// The per-instance limit, when there is one.
    pub fn instance_limit(&self) -> Option<std::num::NonZeroU32> {
        std::num::NonZeroU32::new(self.instance_concurrency)
    }
}

/// How a target follows its load between `min` and `max` instances.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(
    deny_unknown_fields,
    expecting = "a table such as `{ min = 0, max = 3, metric = \"concurrency\", target = 10 }`"
)]
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
    /// Where the signal comes from instead of the in-process counters; none by default.
    #[serde(default)]
    pub source: Option<PrometheusSource>,
}

impl Scaling {
    /// The per-instance target of the metric (or of the query's value), as the user wrote it
    /// or its default.
    pub fn target_value(&self) -> f64 {
        self.target.unwrap_or(match (&self.source, self.metric) {
            (Some(_), _) => PrometheusSource::DEFAULT_TARGET,
            (None, Metric::Concurrency) => 10.0,
            (None, Metric::Rps) => 50.0,
        })
    }
}

/// A PromQL query whose value, per instance, is the target's signal: desired =
/// ceil(value / target). `query` absent: [`PrometheusSource::default_query`].
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(
    deny_unknown_fields,
    expecting = "a table such as `{ prometheus = \"http://prometheus:9090\", query = \"...\", every = \"15s\" }`"
)]
pub struct PrometheusSource {
    /// The server's base URL; `/api/v1/query` is appended.
    #[serde(rename = "prometheus")]
    pub url: String,
    pub query: Option<String>,
    /// How often the query runs.
    #[serde(default = "PrometheusSource::default_every", with = "super::duration")]
    pub every: Duration,
}

impl PrometheusSource {
    /// The per-instance target of the query's value when none is given.
    pub const DEFAULT_TARGET: f64 = 100.0;
    /// What `prometheus` and `wakegate.io/prometheus-url` accept, for problems.
    pub const EXPECTED_URL: &'static str =
        "an http:// URL of a Prometheus server such as \"http://prometheus.monitoring:9090\"";
    /// What `query` and `wakegate.io/prometheus-query` accept, for problems.
    pub const EXPECTED_QUERY: &'static str =
        "a non-empty PromQL expression such as \"sum(rate(http_requests_total[2m]))\"";

    pub fn default_every() -> Duration {
        Duration::from_secs(15)
    }

    /// The request rate of the target through wakegate, as Prometheus scraped it from every
    /// wakegate replica under the job deploy/monitoring sets (another application's series of
    /// the same name are not wakegate's).
    pub fn default_query(namespace: &str, service: &str) -> String {
        format!(
            "sum(rate(http_requests_total{{job=\"wakegate\",namespace={namespace:?},service={service:?}}}[2m]))"
        )
    }

    /// The query to run for the target `namespace`/`service`.
    pub fn query_for(&self, namespace: &str, service: &str) -> String {
        match &self.query {
            Some(query) => query.clone(),
            None => Self::default_query(namespace, service),
        }
    }

    /// An `http://host[:port][/path]` URL without query or fragment: wakegate speaks plain
    /// HTTP to Prometheus (a TLS-terminating sidecar or the in-cluster Service covers HTTPS).
    pub fn valid_url(url: &str) -> bool {
        match url.parse::<http::Uri>() {
            Ok(uri) => {
                uri.scheme_str() == Some("http")
                    && uri.authority().is_some_and(|a| !a.host().is_empty())
                    && uri.query().is_none()
                    && !url.contains('#')
            }
            Err(_) => false,
        }
    }
}

impl Default for Scaling {
    fn default() -> Self {
        toml::from_str("").expect("every scaling field has a default")
    }
}

/// A workload with a `/scale` subresource: a Deployment (the default), a StatefulSet, an Argo
/// Rollout, or any kind named by its group, version and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub group: String,
    pub version: String,
    pub kind: String,
    /// The resource name in API paths (`deployments`).
    pub plural: String,
    pub name: String,
}

impl Workload {
    /// What `wakegate.io/workload` accepts, for error messages.
    pub const EXPECTED: &'static str = "KIND/NAME with KIND one of deployment, statefulset, \
         rollout (argoproj.io), or Kind.version.group (e.g. \
         \"Rollout.v1alpha1.argoproj.io/web\")";

    pub fn deployment(name: &str) -> Workload {
        Workload::known("apps", "v1", "Deployment", "deployments", name)
    }

    fn known(group: &str, version: &str, kind: &str, plural: &str, name: &str) -> Workload {
        Workload {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            name: name.into(),
        }
    }

    /// `KIND/NAME`, as `kubectl` names objects: `statefulset/db`, `deploy/web`,
    /// `Rollout.v1alpha1.argoproj.io/web`.
    pub fn parse(text: &str) -> Result<Workload, &'static str> {
        let (kind, name) = text.split_once('/').ok_or(Self::EXPECTED)?;
        if !is_object_name(name) {
            return Err(Self::EXPECTED);
        }
        let known =
            |group, version, kind, plural| Ok(Workload::known(group, version, kind, plural, name));
        match kind.to_ascii_lowercase().as_str() {
            "deployment" | "deployments" | "deploy" => {
                known("apps", "v1", "Deployment", "deployments")
            }
            "statefulset" | "statefulsets" | "sts" => {
                known("apps", "v1", "StatefulSet", "statefulsets")
            }
            "rollout" | "rollouts" | "ro" => {
                known("argoproj.io", "v1alpha1", "Rollout", "rollouts")
            }
            _ => {
                let mut parts = kind.splitn(3, '.');
                let (Some(kind), Some(version), Some(group)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(Self::EXPECTED);
                };
                let word = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphanumeric());
                let dns = |g: &str| {
                    g.split('.').all(|l| {
                        !l.is_empty()
                            && l.bytes()
                                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    })
                };
                if !word(kind)
                    || !kind.starts_with(|c: char| c.is_ascii_uppercase())
                    || !word(version)
                    || !dns(group)
                {
                    return Err(Self::EXPECTED);
                }
                // The plural as Kubernetes derives it from the kind, as kubectl guesses it.
                // kube-core's guess underflows on a one-letter kind ending in 'y' (found by
                // fuzzing): a one-letter kind just takes an 's'.
                let plural = if kind.len() < 2 {
                    format!("{}s", kind.to_ascii_lowercase())
                } else {
                    let gvk = kube::core::GroupVersionKind::gvk(group, version, kind);
                    kube::core::ApiResource::from_gvk(&gvk).plural
                };
                Ok(Workload::known(group, version, kind, &plural, name))
            }
        }
    }

    /// An `apps` Deployment: the kind wakegate also watches for its replica count.
    pub fn is_deployment(&self) -> bool {
        self.group == "apps" && self.kind == "Deployment"
    }

    /// `apps/v1`, or `v1` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// `deployment/web`, as logs and Events name it.
impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind.to_ascii_lowercase(), self.name)
    }
}

/// A DNS subdomain name, as Kubernetes names most objects.
pub fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
}
