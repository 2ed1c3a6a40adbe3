//! Targets from Kubernetes Services: the `wakegate.io/*` annotations, their defaults, and a
//! problem (field, value, expected) for every annotation that could not be used. A bad value
//! falls back to its default; a bad route (hosts, path prefixes, port) skips the Service.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;

use super::limits::MIN_HELD_BYTES;
use super::route::{HostPattern, Route, is_valid_prefix};
use super::target::{
    Backend, HealthPolicy, KubeTarget, Metric, PrometheusSource, Protocol, RateLimit, Scaling,
    Serving, TargetConfig, Workload, is_object_name,
};
use super::{MAX_DURATION, Problem, defaults, size};

pub const PREFIX: &str = "wakegate.io/";

/// Every annotation wakegate reads; anything else under the prefix is reported as unknown.
pub const KNOWN: &[&str] = &[
    "enabled",
    "deployment",
    "workload",
    "hosts",
    "path-prefixes",
    "port",
    "min-replicas",
    "max-replicas",
    "metric",
    "target",
    "scale-down-delay",
    "idle-timeout",
    "stream-idle-timeout",
    "cold-start-timeout",
    "max-pending",
    "max-pending-bytes",
    "instance-concurrency",
    "wake-page",
    "protocol",
    "rate-limit",
    "rate-limit-burst",
    "prometheus-url",
    "prometheus-query",
    "prometheus-interval",
];

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// No `wakegate.io/enabled: "true"`.
    NotEnabled,
    /// Opted in, but it cannot be routed safely; the problems say why.
    Skipped(Vec<Problem>),
    /// A target, and the annotations whose defaults were used instead of their values.
    Target(Box<TargetConfig>, Vec<Problem>),
}

pub fn from_service(service: &Service) -> Outcome {
    let meta = &service.metadata;
    let empty = BTreeMap::new();
    let annotations = meta.annotations.as_ref().unwrap_or(&empty);
    let get = |key: &str| annotations.get(&format!("{PREFIX}{key}")).map(|v| v.trim());
    let (Some(namespace), Some(name)) = (meta.namespace.clone(), meta.name.clone()) else {
        return Outcome::NotEnabled;
    };
    let mut problems = Vec::new();
    let mut problem = |key: &str, value: &str, expected: &str| {
        problems.push(Problem {
            field: format!("{PREFIX}{key}"),
            value: format!("{value:?}"),
            expected: expected.to_owned(),
        })
    };

    match get("enabled") {
        Some("true") => {}
        None | Some("false") => return Outcome::NotEnabled,
        Some(other) => {
            problem("enabled", other, "\"true\" or \"false\"");
            return Outcome::Skipped(problems);
        }
    }
    for key in annotations.keys() {
        if let Some(short) = key.strip_prefix(PREFIX)
            && !KNOWN.contains(&short)
        {
            problem(
                short,
                &annotations[key],
                &format!("one of the wakegate.io annotations: {}", KNOWN.join(", ")),
            );
        }
    }

    // Routing: a bad value here skips the Service rather than guess where traffic goes.
    let mut skip = false;
    let list = |value: &str| -> Vec<String> {
        value
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect()
    };
    let hosts = match get("hosts") {
        None => [
            format!("{name}.{namespace}"),
            format!("{name}.{namespace}.svc"),
            format!("{name}.{namespace}.svc.cluster.local"),
        ]
        .iter()
        .map(|h| HostPattern::parse(h))
        .collect::<Result<_, _>>()
        .unwrap_or_default(),
        Some(value) => {
            let hosts: Result<Vec<HostPattern>, _> =
                list(value).iter().map(|h| HostPattern::parse(h)).collect();
            match hosts {
                Ok(hosts) if !hosts.is_empty() => hosts,
                _ => {
                    problem(
                        "hosts",
                        value,
                        "a comma-separated list of host names, \"*.suffix\" or \"*\"",
                    );
                    skip = true;
                    Vec::new()
                }
            }
        }
    };
    let path_prefixes = match get("path-prefixes") {
        None => defaults::path_prefixes(),
        Some(value) => {
            let prefixes = list(value);
            if prefixes.is_empty() || prefixes.iter().any(|p| !is_valid_prefix(p)) {
                problem(
                    "path-prefixes",
                    value,
                    "a comma-separated list of paths starting with '/'",
                );
                skip = true;
            }
            prefixes
        }
    };
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let port = match get("port") {
        None => match ports.first() {
            Some(p) => Some(p),
            None => {
                problem("port", "", "a Service with at least one port");
                skip = true;
                None
            }
        },
        Some(value) => {
            let found = ports.iter().find(|p| {
                p.name.as_deref() == Some(value) || value.parse::<i32>().is_ok_and(|n| n == p.port)
            });
            match found {
                Some(p) => Some(p),
                None => {
                    let names: Vec<String> = ports
                        .iter()
                        .map(|p| p.name.clone().unwrap_or_else(|| p.port.to_string()))
                        .collect();
                    problem(
                        "port",
                        value,
                        &format!(
                            "the name or number of one of the Service's ports ({})",
                            names.join(", ")
                        ),
                    );
                    skip = true;
                    None
                }
            }
        }
    };
    let port_name = port.and_then(|p| p.name.clone()).unwrap_or_default();
    // The port's appProtocol says how its pods speak; the annotation overrides it.
    let app_protocol = port.and_then(|p| p.app_protocol.as_deref());
    let port_protocol = app_protocol.map_or(Protocol::Http1, Protocol::from_app_protocol);
    let protocol = match get("protocol") {
        None => port_protocol,
        Some("http1") => Protocol::Http1,
        Some("h2c") => Protocol::H2c,
        Some(other) => {
            problem(
                "protocol",
                other,
                &format!(
                    "\"http1\" or \"h2c\"; using {:?} (from the port's appProtocol {:?})",
                    port_protocol.as_str(),
                    app_protocol.unwrap_or("")
                ),
            );
            port_protocol
        }
    };
    let workload = match (get("workload"), get("deployment")) {
        (None, None) => Workload::deployment(&name),
        (None, Some(value)) => {
            if !is_object_name(value) {
                problem(
                    "deployment",
                    value,
                    "the name of a Deployment in the Service's namespace",
                );
                skip = true;
            }
            Workload::deployment(value)
        }
        (Some(value), deployment) => {
            if deployment.is_some() {
                problem(
                    "deployment",
                    deployment.unwrap_or_default(),
                    "no wakegate.io/deployment beside wakegate.io/workload (use one)",
                );
                skip = true;
            }
            match Workload::parse(value) {
                Ok(workload) => workload,
                Err(expected) => {
                    problem("workload", value, expected);
                    skip = true;
                    Workload::deployment(&name)
                }
            }
        }
    };
    if skip {
        return Outcome::Skipped(problems);
    }

    // Tuning: a bad value falls back to its default.
    let mut number = |key: &str, default: u32, floor: u32| -> u32 {
        match get(key) {
            None => default,
            Some(v) => match v.parse::<u32>() {
                Ok(n) if n >= floor => n,
                _ => {
                    problem(
                        key,
                        v,
                        &format!("a whole number of at least {floor}; using {default}"),
                    );
                    default
                }
            },
        }
    };
    let mut min = number("min-replicas", 0, 0);
    let mut max = number("max-replicas", 10, 1);
    let max_pending = number("max-pending", defaults::max_pending(), 1);
    let max_pending_bytes = match get("max-pending-bytes") {
        None => defaults::max_pending_bytes(),
        Some(v) => match size::parse(v) {
            Ok(n) if n >= MIN_HELD_BYTES => n,
            _ => {
                let default = defaults::max_pending_bytes();
                problem(
                    "max-pending-bytes",
                    v,
                    &format!(
                        "a size of at least {} such as \"64MiB\"; using {}",
                        size::show(MIN_HELD_BYTES),
                        size::show(default)
                    ),
                );
                default
            }
        },
    };
    let instance_concurrency = match get("instance-concurrency") {
        None => 0,
        Some(v) => match v.parse::<u32>() {
            Ok(n) if n <= Serving::MAX_INSTANCE_CONCURRENCY => n,
            _ => {
                problem(
                    "instance-concurrency",
                    v,
                    &format!(
                        "{}; using 0 (no limit)",
                        Serving::EXPECTED_INSTANCE_CONCURRENCY
                    ),
                );
                0
            }
        },
    };
    if min > max {
        problem(
            "min-replicas",
            &min.to_string(),
            &format!("at most wakegate.io/max-replicas ({max}); using 0 and 10"),
        );
        (min, max) = (0, 10);
    }
    let metric = match get("metric") {
        None | Some("concurrency") => Metric::Concurrency,
        Some("rps") => Metric::Rps,
        Some(other) => {
            problem(
                "metric",
                other,
                "\"concurrency\" or \"rps\"; using concurrency",
            );
            Metric::Concurrency
        }
    };
    let target = match get("target") {
        None => None,
        Some(v) => match v.parse::<f64>() {
            Ok(t) if t.is_finite() && t > 0.0 => Some(t),
            _ => {
                problem(
                    "target",
                    v,
                    "a number above zero; using the metric's default",
                );
                None
            }
        },
    };
    let mut duration = |key: &str, default: Duration| -> Duration {
        match get(key) {
            None => default,
            Some(v) => match humantime::parse_duration(v) {
                Ok(d) if !d.is_zero() && d <= MAX_DURATION => d,
                _ => {
                    problem(
                        key,
                        v,
                        &format!(
                            "a duration such as \"30s\" or \"5m\", at most 365days; using {}",
                            humantime::format_duration(default)
                        ),
                    );
                    default
                }
            },
        }
    };
    let scale_down_delay = duration("scale-down-delay", defaults::scale_down_delay());
    let idle_timeout = duration("idle-timeout", defaults::idle_timeout());
    let stream_idle_timeout = duration("stream-idle-timeout", idle_timeout);
    let cold_start_timeout = duration("cold-start-timeout", defaults::cold_start_timeout());
    let every = duration("prometheus-interval", PrometheusSource::default_every());
    let wake_page = match get("wake-page") {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            problem("wake-page", other, "\"true\" or \"false\"; using false");
            false
        }
    };
    // A bad limit is reported and not applied, as every tuning value falls back to its
    // default (none); the Event and the log say so.
    let rate_limit = match get("rate-limit") {
        None => None,
        Some(v) => match v.parse::<f64>() {
            Ok(per_second) if RateLimit::valid_per_second(per_second) => {
                Some(RateLimit::new(per_second))
            }
            _ => {
                problem(
                    "rate-limit",
                    v,
                    &format!("{}; using no rate limit", RateLimit::EXPECTED_PER_SECOND),
                );
                None
            }
        },
    };
    let rate_limit = match (rate_limit, get("rate-limit-burst")) {
        (limit, None) => limit,
        (Some(limit), Some(v)) => match v.parse::<u32>() {
            Ok(burst) if burst >= 1 => Some(RateLimit { burst, ..limit }),
            _ => {
                problem(
                    "rate-limit-burst",
                    v,
                    &format!(
                        "a whole number of at least 1; using {} (one second's worth)",
                        limit.burst
                    ),
                );
                Some(limit)
            }
        },
        (None, Some(v)) => {
            problem(
                "rate-limit-burst",
                v,
                "a valid wakegate.io/rate-limit beside it (requests per second)",
            );
            None
        }
    };

    // A bad URL or query leaves the target on its in-process counters: scaling on a query
    // that cannot run would never decide anything.
    let source = match get("prometheus-url") {
        None => {
            for key in ["prometheus-query", "prometheus-interval"] {
                if let Some(v) = get(key) {
                    problem(
                        key,
                        v,
                        "a wakegate.io/prometheus-url beside it; scaling on in-process counters",
                    );
                }
            }
            None
        }
        Some(url) if !PrometheusSource::valid_url(url) => {
            problem(
                "prometheus-url",
                url,
                &format!(
                    "{}; scaling on in-process counters",
                    PrometheusSource::EXPECTED_URL
                ),
            );
            None
        }
        Some(url) => match get("prometheus-query") {
            Some("") => {
                problem(
                    "prometheus-query",
                    "",
                    &format!(
                        "{}; scaling on in-process counters",
                        PrometheusSource::EXPECTED_QUERY
                    ),
                );
                None
            }
            query => Some(PrometheusSource {
                url: url.to_owned(),
                query: query.map(str::to_owned),
                every,
            }),
        },
    };

    let target = TargetConfig {
        name: name.clone(),
        namespace: namespace.clone(),
        route: Route {
            hosts,
            path_prefixes,
        },
        serving: Serving {
            idle_timeout,
            stream_idle_timeout,
            cold_start_timeout,
            max_pending,
            max_pending_bytes,
            instance_concurrency,
            response_timeout: None,
            wake_page,
            protocol,
            rate_limit,
            health: HealthPolicy::default(),
        },
        scaling: Scaling {
            min,
            max,
            metric,
            target,
            scale_down_delay,
            source,
            ..Scaling::default()
        },
        backend: Backend::Kubernetes(KubeTarget {
            namespace,
            service: name,
            workload,
            port_name,
        }),
    };
    Outcome::Target(Box::new(target), problems)
}

#[cfg(test)]
mod tests;
