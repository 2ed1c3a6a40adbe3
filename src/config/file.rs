//! The configuration file as written: flat `[[target]]` tables, every field documented and
//! unknown ones rejected. [`File::into_config`] checks it and builds the typed [`Config`],
//! reporting every problem with its field, its value and what was expected.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::de::{DeArray, DeTable, DeValue};

use super::limits::{MAX_HEADER_BYTES, MIN_HEADER_BYTES, MIN_HELD_BYTES, MIN_MEMORY_BUDGET};
use super::route::{HostPattern, Route, is_valid_prefix, normalize_prefix};
use super::size;
use super::target::{
    Backend, Fixed, HealthPolicy, Local, PrometheusSource, Protocol, RateLimit, ReadyCheck,
    Scaling, Serving, TargetConfig, is_object_name,
};
use super::{
    AccessLogConfig, Autoscaler, Config, KubernetesConfig, Limits, Listen, MAX_DURATION, Problem,
    TlsConfig, defaults,
};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub listen: Listen,
    /// On SIGTERM/SIGINT, how long in-flight and held requests may take to finish.
    #[serde(default = "defaults::drain_timeout", with = "super::duration")]
    pub drain_timeout: Duration,
    #[serde(default)]
    pub autoscaler: Autoscaler,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, rename = "target")]
    pub targets: Vec<FileTarget>,
    /// Discover targets from annotated Services and scale their Deployments.
    pub kubernetes: Option<KubernetesConfig>,
    /// An HTTPS listener beside the cleartext one.
    pub tls: Option<TlsConfig>,
    /// One line per request, off when absent.
    pub access_log: Option<AccessLogConfig>,
}

/// One `[[target]]` as written: where its traffic comes from (hosts, path prefixes), what
/// serves it (a local `command` that wakegate starts and stops, or a fixed `upstream`) and how.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(
    deny_unknown_fields,
    expecting = "a `[[target]]` table with `name`, `hosts` and a `command` or an `upstream`"
)]
pub struct FileTarget {
    pub name: String,
    #[serde(default = "defaults::namespace")]
    pub namespace: String,
    /// Exact host names, `*.suffix` wildcards, or `*` for every host.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default = "defaults::path_prefixes")]
    pub path_prefixes: Vec<String>,
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    pub upstream: Option<String>,
    #[serde(default)]
    pub ready: ReadyCheck,
    #[serde(default = "defaults::idle_timeout", with = "super::duration")]
    pub idle_timeout: Duration,
    /// A stream quiet this long stops keeping the target awake; `idle_timeout` by default.
    #[serde(default, with = "super::duration::option")]
    pub stream_idle_timeout: Option<Duration>,
    #[serde(default = "defaults::cold_start_timeout", with = "super::duration")]
    pub cold_start_timeout: Duration,
    #[serde(default = "defaults::max_pending")]
    pub max_pending: u32,
    #[serde(default = "defaults::max_pending_bytes", with = "super::size")]
    pub max_pending_bytes: u64,
    /// Requests one instance takes at once (Knative's `containerConcurrency`); 0, the
    /// default: no limit.
    #[serde(default)]
    pub instance_concurrency: u32,
    #[serde(default = "defaults::stop_grace", with = "super::duration")]
    pub stop_grace: Duration,
    /// After a failed start (or an instance that crashed soon after it became ready), no
    /// start for this long, doubling with each failure in a row; `0s`: none.
    #[serde(default = "defaults::start_backoff", with = "super::duration")]
    pub start_backoff: Duration,
    #[serde(default, with = "super::duration::option")]
    pub response_timeout: Option<Duration>,
    #[serde(default)]
    pub scaling: Scaling,
    #[serde(default)]
    pub wake_page: bool,
    /// `http1` (the default) or `h2c`: HTTP/2 with prior knowledge, as gRPC servers speak it.
    #[serde(default)]
    pub protocol: Protocol,
    /// Requests per second per client address, with a burst; none by default.
    pub rate_limit: Option<FileRateLimit>,
    /// When an endpoint is unhealthy, and an upstream's active check.
    #[serde(default)]
    pub health: FileHealth,
}

/// `health = { failures = 3, interval = "5s", check = { http_get = "/healthz" } }`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileHealth {
    #[serde(default = "defaults::health_failures")]
    pub failures: u32,
    #[serde(default = "defaults::health_interval", with = "super::duration")]
    pub interval: Duration,
    /// An `upstream`'s active check, in the forms of `ready`; none by default.
    pub check: Option<ReadyCheck>,
}

impl Default for FileHealth {
    fn default() -> Self {
        toml::from_str("").expect("every health field has a default")
    }
}

/// `rate_limit = { per_second = 50, burst = 100 }`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(
    deny_unknown_fields,
    expecting = "a table such as `{ per_second = 50, burst = 100 }`"
)]
pub struct FileRateLimit {
    pub per_second: f64,
    /// One second's worth of requests by default.
    pub burst: Option<u32>,
}

/// Collects problems.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, field: impl Into<String>, value: impl Into<String>, expected: &str) {
        self.0.push(Problem {
            field: field.into(),
            value: value.into(),
            expected: expected.to_owned(),
        });
    }

    /// A duration must lie in `min..=MAX_DURATION` (`min` is zero for "above zero").
    fn duration(&mut self, field: impl Into<String>, value: Duration, min: Duration) {
        let shown = quoted(value);
        if min.is_zero() && value.is_zero() {
            self.push(field, shown, "a duration above zero");
        } else if value < min {
            let expected = format!("a duration of at least {}", humantime::format_duration(min));
            self.push(field, shown, &expected);
        } else if value > MAX_DURATION {
            self.push(field, shown, super::MAX_DURATION_EXPECTED);
        }
    }
}

/// serde's names of Rust's number types, in the words of the file's reader.
fn in_user_terms(error: String) -> String {
    const NUMBERS: [(&str, &str); 7] = [
        ("expected u16", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected usize", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
    ];
    NUMBERS
        .iter()
        .fold(error, |text, (rust, words)| text.replace(rust, words))
}

/// Format errors reported at most, of one file.
const MAX_FORMAT_ERRORS: usize = 20;

/// Takes out of `table` the entry that `span` of the source points into, at the deepest level
/// that holds it: the field with a bad value or an unknown name, the item of an array, or the
/// `[[target]]` that lacks a field. False when nothing holds it. (A table written as a
/// `[header]` spans its header only, so every table is searched.)
fn leave_out(table: &mut DeTable<'_>, span: &Range<usize>) -> bool {
    let keys: Vec<_> = table.keys().cloned().collect();
    for key in keys {
        let value = table.get_mut(&key).expect("a key of this table");
        if !covers(key.span(), span) && leave_out_within(value.get_mut(), span) {
            return true;
        }
        if covers(key.span(), span) || covers(value.span(), span) {
            table.remove(&key);
            return true;
        }
    }
    false
}

/// As [`leave_out`], inside a table or an array.
fn leave_out_within(value: &mut DeValue<'_>, span: &Range<usize>) -> bool {
    match value {
        DeValue::Table(table) => leave_out(table, span),
        DeValue::Array(items) => {
            for at in 0..items.len() {
                let item = &mut items.as_mut()[at];
                if leave_out_within(item.get_mut(), span) {
                    return true;
                }
                if covers(item.span(), span) {
                    let kept = std::mem::replace(items, DeArray::new());
                    for (i, item) in kept.into_iter().enumerate() {
                        if i != at {
                            items.push(item);
                        }
                    }
                    return true;
                }
            }
            false
        }
        _ => false,
    }
}

fn covers(outer: Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

fn quoted(d: Duration) -> String {
    format!("{:?}", humantime::format_duration(d).to_string())
}

impl File {
    /// Parses TOML text without checking it. A value of the wrong type or an unknown field
    /// does not hide the next one: each is reported (with its line), then left out so that the
    /// rest of the file is read, up to [`MAX_FORMAT_ERRORS`].
    pub fn parse(text: &str) -> Result<File, String> {
        let mut root = DeTable::parse(text).map_err(|e| e.to_string())?;
        // (where in the text, what)
        let mut errors: Vec<(usize, String)> = Vec::new();
        while errors.len() < MAX_FORMAT_ERRORS {
            match File::deserialize(toml::de::Deserializer::from(root.clone())) {
                Ok(file) if errors.is_empty() => return Ok(file),
                Ok(_) => break,
                Err(mut error) => {
                    error.set_input(Some(text));
                    let span = error.span();
                    let at = span.as_ref().map_or(usize::MAX, |span| span.start);
                    errors.push((at, in_user_terms(error.to_string())));
                    if !span.is_some_and(|span| leave_out(root.get_mut(), &span)) {
                        break;
                    }
                }
            }
        }
        // In the order of the file, not of the fields' declarations.
        errors.sort_by_key(|(at, _)| *at);
        let errors: Vec<String> = errors.into_iter().map(|(_, error)| error).collect();
        Err(match errors.as_slice() {
            [one] => one.clone(),
            many => format!("{} problems:\n{}", many.len(), many.join("\n")),
        })
    }

    /// Every problem of this file; empty when it is valid.
    pub fn validate(&self) -> Vec<Problem> {
        self.build().1
    }

    /// The typed configuration, or every problem that stands in its way.
    pub fn into_config(self) -> Result<Config, Vec<Problem>> {
        match self.build() {
            (Some(config), problems) if problems.is_empty() => Ok(config),
            (_, problems) => Err(problems),
        }
    }

    fn build(&self) -> (Option<Config>, Vec<Problem>) {
        let mut problems = Problems::default();
        problems.duration("drain_timeout", self.drain_timeout, Duration::ZERO);
        if self.listen.workers == Some(0) {
            problems.push("listen.workers", "0", "at least 1");
        }
        problems.duration(
            "autoscaler.interval",
            self.autoscaler.interval,
            Duration::from_millis(10),
        );
        self.limits.check(&mut problems);
        if let Some(tls) = &self.tls {
            if tls.certificates.is_empty() {
                problems.push(
                    "tls.certificate",
                    "none",
                    "at least one [[tls.certificate]] with `cert` and `key` (PEM files)",
                );
            }
            for (field, addr) in [
                ("listen.proxy", self.listen.proxy),
                ("listen.admin", self.listen.admin),
            ] {
                // Port 0 (any free port) is a different port each time.
                if tls.listen == addr && addr.port() != 0 {
                    problems.push(
                        "tls.listen",
                        addr.to_string(),
                        &format!("an address other than {field}'s"),
                    );
                }
            }
        }
        let mut names = HashSet::new();
        let mut routes = HashMap::new();
        let mut targets = Vec::new();
        for (i, t) in self.targets.iter().enumerate() {
            if t.name.is_empty()
                || !t
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            {
                problems.push(
                    format!("target[{i}].name"),
                    format!("{:?}", t.name),
                    "a non-empty name of letters, digits, '-', '_' or '.'",
                );
            } else if !names.insert(t.name.as_str()) {
                problems.push(
                    format!("target[{i}].name"),
                    format!("{:?}", t.name),
                    "a name no other target uses",
                );
            }
            for host in &t.hosts {
                for prefix in &t.path_prefixes {
                    let key = (host.to_ascii_lowercase(), normalize_prefix(prefix));
                    if let Some(other) = routes.insert(key, t.name.as_str())
                        && other != t.name
                    {
                        problems.push(
                            format!("target[{i}] ({}).hosts", t.name),
                            format!("{host:?} with prefix {prefix:?}"),
                            &format!("a host and prefix not already routed to target {other:?}"),
                        );
                    }
                }
            }
            targets.extend(t.build(i, &mut problems));
        }
        if self.listen.proxy == self.listen.admin && self.listen.proxy.port() != 0 {
            problems.push(
                "listen.admin",
                self.listen.admin.to_string(),
                "an address other than listen.proxy",
            );
        }
        if let Some(scaler) = self.listen.external_scaler {
            let tls = self.tls.as_ref().map(|t| ("tls.listen", t.listen));
            let taken = [
                ("listen.proxy", self.listen.proxy),
                ("listen.admin", self.listen.admin),
            ]
            .into_iter()
            .chain(tls)
            .find(|(_, addr)| *addr == scaler && scaler.port() != 0);
            if let Some((field, _)) = taken {
                problems.push(
                    "listen.external_scaler",
                    scaler.to_string(),
                    &format!("an address other than {field}'s"),
                );
            }
        }
        if let Some(k) = &self.kubernetes {
            k.check(&mut problems);
        }
        let config = (targets.len() == self.targets.len()).then(|| Config {
            listen: self.listen.clone(),
            drain_timeout: self.drain_timeout,
            autoscaler: self.autoscaler.clone(),
            limits: self.limits.clone(),
            targets,
            kubernetes: self.kubernetes.clone(),
            tls: self.tls.clone(),
            access_log: self.access_log.clone(),
        });
        (config, problems.0)
    }
}

impl FileTarget {
    /// Checks this target (the `i`th of the file) and builds it; `None` when no typed target
    /// can be made of it (its problems are pushed either way).
    fn build(&self, i: usize, problems: &mut Problems) -> Option<TargetConfig> {
        let at = |field: &str| format!("target[{i}] ({}).{field}", self.name);
        let before = problems.0.len();
        if self.hosts.is_empty() {
            problems.push(
                at("hosts"),
                "[]",
                "at least one host (exact, \"*.suffix\" or \"*\")",
            );
        }
        let mut hosts = Vec::new();
        for (h, host) in self.hosts.iter().enumerate() {
            match HostPattern::parse(host) {
                Ok(pattern) => hosts.push(pattern),
                Err(why) => problems.push(at(&format!("hosts[{h}]")), format!("{host:?}"), why),
            }
        }
        if self.path_prefixes.is_empty() {
            problems.push(
                at("path_prefixes"),
                "[]",
                "at least one path prefix such as \"/\"",
            );
        }
        for (p, prefix) in self.path_prefixes.iter().enumerate() {
            if !is_valid_prefix(prefix) {
                problems.push(
                    at(&format!("path_prefixes[{p}]")),
                    format!("{prefix:?}"),
                    "a path starting with '/' without '?', '#' or spaces",
                );
            }
        }
        let backend = self.backend(&at, problems);
        check_probe(&self.ready, "ready", self.protocol, &at, problems);
        if let Some(check) = &self.health.check {
            check_probe(check, "health.check", self.protocol, &at, problems);
        }
        if self.health.failures == 0 {
            problems.push(at("health.failures"), "0", "at least 1");
        }
        problems.duration(
            at("health.interval"),
            self.health.interval,
            Duration::from_millis(10),
        );
        for (field, value) in [
            ("cold_start_timeout", Some(self.cold_start_timeout)),
            ("idle_timeout", Some(self.idle_timeout)),
            ("stream_idle_timeout", self.stream_idle_timeout),
            ("stop_grace", Some(self.stop_grace).filter(|d| !d.is_zero())),
            (
                "start_backoff",
                Some(self.start_backoff).filter(|d| !d.is_zero()),
            ),
            ("response_timeout", self.response_timeout),
        ] {
            if let Some(value) = value {
                problems.duration(at(field), value, Duration::ZERO);
            }
        }
        if self.max_pending == 0 {
            problems.push(at("max_pending"), "0", "at least 1");
        }
        if self.max_pending_bytes < MIN_HELD_BYTES {
            problems.push(
                at("max_pending_bytes"),
                size::show(self.max_pending_bytes),
                &format!("at least {}", size::show(MIN_HELD_BYTES)),
            );
        }
        if self.instance_concurrency > Serving::MAX_INSTANCE_CONCURRENCY {
            problems.push(
                at("instance_concurrency"),
                self.instance_concurrency.to_string(),
                Serving::EXPECTED_INSTANCE_CONCURRENCY,
            );
        }
        check_scaling(&self.scaling, &at, problems);
        let rate_limit = self.rate_limit.map(|limit| {
            if !RateLimit::valid_per_second(limit.per_second) {
                problems.push(
                    at("rate_limit.per_second"),
                    limit.per_second.to_string(),
                    RateLimit::EXPECTED_PER_SECOND,
                );
            }
            if limit.burst == Some(0) {
                problems.push(at("rate_limit.burst"), "0", "at least 1");
            }
            match limit.burst {
                Some(burst) => RateLimit {
                    per_second: limit.per_second,
                    burst,
                },
                None => RateLimit::new(limit.per_second),
            }
        });
        if problems.0.len() > before {
            return None;
        }
        Some(TargetConfig {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            route: Route {
                hosts,
                path_prefixes: self.path_prefixes.clone(),
            },
            serving: Serving {
                idle_timeout: self.idle_timeout,
                stream_idle_timeout: self.stream_idle_timeout.unwrap_or(self.idle_timeout),
                cold_start_timeout: self.cold_start_timeout,
                max_pending: self.max_pending,
                max_pending_bytes: self.max_pending_bytes,
                instance_concurrency: self.instance_concurrency,
                response_timeout: self.response_timeout,
                wake_page: self.wake_page,
                protocol: self.protocol,
                rate_limit,
                health: HealthPolicy {
                    failures: self.health.failures,
                    interval: self.health.interval,
                },
            },
            scaling: self.scaling.clone(),
            backend: backend?,
        })
    }

    /// Exactly one of `command` and `upstream`.
    fn backend(&self, at: &dyn Fn(&str) -> String, problems: &mut Problems) -> Option<Backend> {
        match (&self.command, &self.upstream) {
            (Some(_), Some(up)) => {
                problems.push(
                    at("upstream"),
                    format!("{up:?}"),
                    "either `command` or `upstream`, not both",
                );
                None
            }
            (None, None) => {
                problems.push(
                    at("command"),
                    "nothing",
                    "either `command` (a local process) or `upstream` (a fixed host:port)",
                );
                None
            }
            (Some(command), None) => {
                if command.is_empty() || command[0].is_empty() {
                    problems.push(
                        at("command"),
                        format!("{command:?}"),
                        "a program followed by its arguments",
                    );
                    return None;
                }
                if let Some(check) = &self.health.check {
                    problems.push(
                        at("health.check"),
                        describe_check(check),
                        "an `upstream` to check: a local instance is checked by `ready` as it \
                         starts, and by its requests",
                    );
                }
                Some(Backend::Local(Local {
                    command: command.clone(),
                    env: self.env.clone(),
                    cwd: self.cwd.clone(),
                    ready: self.ready.clone(),
                    stop_grace: self.stop_grace,
                    start_backoff: self.start_backoff,
                }))
            }
            (None, Some(up)) => {
                if self.ready != ReadyCheck::Tcp {
                    problems.push(
                        at("ready"),
                        describe_check(&self.ready),
                        "a local `command` to check as it starts: wakegate never starts an \
                         `upstream`; check one with `health.check`, e.g. \
                         health = { check = { http_get = \"/healthz\" } }",
                    );
                }
                if self.health.check == Some(ReadyCheck::Notify) {
                    problems.push(
                        at("health.check.notify"),
                        "true",
                        "`{ tcp = true }`, `{ http_get = \"/path\" }` or `{ grpc = true }`: an \
                         upstream wakegate does not start cannot notify",
                    );
                }
                match up.parse::<http::uri::Authority>() {
                    Ok(upstream) if upstream.port_u16().is_some() && !up.contains('/') => {
                        Some(Backend::Fixed(Fixed {
                            upstream,
                            check: self.health.check.clone(),
                        }))
                    }
                    _ => {
                        problems.push(
                            at("upstream"),
                            format!("{up:?}"),
                            "a host:port such as \"127.0.0.1:9000\"",
                        );
                        None
                    }
                }
            }
        }
    }
}

/// A readiness or health check (`field`: `ready` or `health.check`) that can run with the
/// target's protocol.
fn check_probe(
    check: &ReadyCheck,
    field: &str,
    protocol: Protocol,
    at: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) {
    match check {
        ReadyCheck::HttpGet(path) if !path.starts_with('/') => problems.push(
            at(&format!("{field}.http_get")),
            format!("{path:?}"),
            "a path starting with '/'",
        ),
        ReadyCheck::Grpc(service) if protocol != Protocol::H2c => problems.push(
            at(&format!("{field}.grpc")),
            format!("{service:?} with protocol = {:?}", protocol.as_str()),
            "protocol = \"h2c\" beside it: a gRPC server speaks HTTP/2",
        ),
        _ => {}
    }
}

/// A check as the file writes it.
fn describe_check(check: &ReadyCheck) -> String {
    match check {
        ReadyCheck::Tcp => "{ tcp = true }".to_owned(),
        ReadyCheck::HttpGet(path) => format!("{{ http_get = {path:?} }}"),
        ReadyCheck::Notify => "{ notify = true }".to_owned(),
        ReadyCheck::Grpc(service) if service.is_empty() => "{ grpc = true }".to_owned(),
        ReadyCheck::Grpc(service) => format!("{{ grpc = {service:?} }}"),
    }
}

fn check_scaling(s: &Scaling, at: &dyn Fn(&str) -> String, problems: &mut Problems) {
    if s.max == 0 {
        problems.push(at("scaling.max"), "0", "at least 1");
    }
    if s.min > s.max {
        problems.push(
            at("scaling.min"),
            s.min.to_string(),
            &format!("at most scaling.max ({})", s.max),
        );
    }
    for (field, value) in [
        ("stable_window", s.stable_window),
        ("panic_window", s.panic_window),
        ("scale_down_delay", s.scale_down_delay),
    ] {
        if field == "scale_down_delay" && value.is_zero() {
            continue;
        }
        problems.duration(at(&format!("scaling.{field}")), value, Duration::ZERO);
    }
    if s.panic_window > s.stable_window {
        problems.push(
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
            problems.push(
                at(&format!("scaling.{field}")),
                value.to_string(),
                "a number above 1",
            );
        }
    }
    if let Some(target) = s.target
        && !(target.is_finite() && target > 0.0)
    {
        problems.push(
            at("scaling.target"),
            target.to_string(),
            "a number above zero",
        );
    }
    if let Some(source) = &s.source {
        if !PrometheusSource::valid_url(&source.url) {
            problems.push(
                at("scaling.source.prometheus"),
                format!("{:?}", source.url),
                PrometheusSource::EXPECTED_URL,
            );
        }
        if let Some(query) = &source.query
            && query.trim().is_empty()
        {
            problems.push(
                at("scaling.source.query"),
                format!("{query:?}"),
                PrometheusSource::EXPECTED_QUERY,
            );
        }
        // Prometheus scrapes every few seconds at best: a faster query only loads it.
        problems.duration(
            at("scaling.source.every"),
            source.every,
            Duration::from_millis(100),
        );
    }
}

impl Limits {
    fn check(&self, problems: &mut Problems) {
        // A timeout under 100ms would cut clients on an ordinary slow network.
        let floor = Duration::from_millis(100);
        problems.duration(
            "limits.header_read_timeout",
            self.header_read_timeout,
            floor,
        );
        problems.duration("limits.idle_timeout", self.idle_timeout, floor);
        if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&self.max_header_bytes) {
            problems.push(
                "limits.max_header_bytes",
                self.max_header_bytes.to_string(),
                &format!("a size from {MIN_HEADER_BYTES} to {MAX_HEADER_BYTES} bytes"),
            );
        }
        for (field, value) in [
            ("max_headers", self.max_headers),
            ("max_concurrent_streams", self.max_concurrent_streams),
            ("max_pending_reset_streams", self.max_pending_reset_streams),
            ("max_local_reset_streams", self.max_local_reset_streams),
            ("max_connections", self.max_connections),
            ("max_held_requests", self.max_held_requests),
        ] {
            if value == 0 {
                problems.push(format!("limits.{field}"), "0", "at least 1");
            }
        }
        if self.max_held_bytes < MIN_HELD_BYTES {
            problems.push(
                "limits.max_held_bytes",
                size::show(self.max_held_bytes),
                &format!("at least {}", size::show(MIN_HELD_BYTES)),
            );
        }
        if let Some(budget) = self.memory_budget
            && budget < MIN_MEMORY_BUDGET
        {
            problems.push(
                "limits.memory_budget",
                size::show(budget),
                &format!(
                    "at least {}, above what wakegate takes at rest",
                    size::show(MIN_MEMORY_BUDGET)
                ),
            );
        }
    }
}

impl KubernetesConfig {
    fn check(&self, problems: &mut Problems) {
        for namespace in &self.wildcard_namespaces {
            if !is_object_name(namespace) {
                problems.push(
                    "kubernetes.wildcard_namespaces",
                    format!("{namespace:?}"),
                    "namespace names",
                );
            }
        }
        for (namespace, domains) in &self.host_domains {
            if !is_object_name(namespace) {
                problems.push(
                    format!("kubernetes.host_domains.{namespace}"),
                    format!("{namespace:?}"),
                    "a namespace name as the key",
                );
            }
            for domain in domains {
                if !matches!(HostPattern::parse(domain), Ok(HostPattern::Exact(_))) {
                    problems.push(
                        format!("kubernetes.host_domains.{namespace}"),
                        format!("{domain:?}"),
                        "domain names such as \"team-a.example.com\" (no \"*.\", scheme or port)",
                    );
                }
            }
        }
        if let Some(lease) = &self.lease {
            for (field, value) in [("namespace", &lease.namespace), ("name", &lease.name)] {
                if value.is_empty() {
                    problems.push(
                        format!("kubernetes.lease.{field}"),
                        "\"\"",
                        "a non-empty name",
                    );
                }
            }
            problems.duration("kubernetes.lease.duration", lease.duration, Duration::ZERO);
            if lease.renew.is_zero() || lease.renew >= lease.duration {
                problems.push(
                    "kubernetes.lease.renew",
                    humantime::format_duration(lease.renew).to_string(),
                    &format!(
                        "a duration above zero and below kubernetes.lease.duration ({})",
                        humantime::format_duration(lease.duration)
                    ),
                );
            }
        }
        if let Some(peers) = &self.peers {
            for (field, value) in [
                ("namespace", &peers.namespace),
                ("service", &peers.service),
                ("port", &peers.port),
            ] {
                if value.is_empty() {
                    problems.push(
                        format!("kubernetes.peers.{field}"),
                        "\"\"",
                        "a non-empty value",
                    );
                }
            }
            problems.duration(
                "kubernetes.peers.scrape_timeout",
                peers.scrape_timeout,
                Duration::ZERO,
            );
        }
    }
}
