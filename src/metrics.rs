//! Prometheus / OpenMetrics export. Per-target values are read at scrape time from the same
//! atomics the data plane updates and the autoscaler reads; nothing is global.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::proxy::Shared;
use crate::proxy::edge::Refusal;
use crate::proxy::tls::{HandshakeFailure, Tls};
use crate::target::Target;
use crate::target::stats::{Histogram, QueryFailure, Reject};
use crate::target::streams::Close;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// Every target's metrics, read from the data plane's `proxy` state, added to what
    /// `registry` already holds (the providers register their own).
    pub fn new(mut registry: Registry, proxy: Arc<Shared>) -> Self {
        registry.register_collector(Box::new(TargetCollector { proxy }));
        Self { registry }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[derive(Debug)]
struct TargetCollector {
    proxy: Arc<Shared>,
}

type Result = std::result::Result<(), std::fmt::Error>;

fn labels(t: &Target) -> [(&'static str, &str); 2] {
    [
        ("namespace", t.namespace.as_str()),
        ("service", t.name.as_str()),
    ]
}

impl TargetCollector {
    fn counter<V: EncodeCounterValue>(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        targets: &[Arc<Target>],
        value: impl Fn(&Target) -> V,
    ) -> Result {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for t in targets {
            family
                .encode_family(&labels(t))?
                .encode_counter::<NoLabelSet, _, f64>(&value(t), None)?;
        }
        Ok(())
    }

    /// A counter per target and per value of one more label: `value(target, i)` for the
    /// `i`th of `values`.
    fn counter_by(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        targets: &[Arc<Target>],
        (label, values): (&'static str, &[&str]),
        value: impl Fn(&Target, usize) -> u64,
    ) -> Result {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for t in targets {
            for (i, v) in values.iter().enumerate() {
                let labels = [
                    ("namespace", t.namespace.as_str()),
                    ("service", t.name.as_str()),
                    (label, v),
                ];
                family
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, f64>(&value(t, i), None)?;
            }
        }
        Ok(())
    }

    fn gauge(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        targets: &[Arc<Target>],
        value: impl Fn(&Target) -> i64,
    ) -> Result {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for t in targets {
            family.encode_family(&labels(t))?.encode_gauge(&value(t))?;
        }
        Ok(())
    }

    fn histogram(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        targets: &[Arc<Target>],
        value: impl Fn(&Target) -> &Histogram,
    ) -> Result {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
        for t in targets {
            let (sum, count, buckets) = value(t).snapshot();
            family
                .encode_family(&labels(t))?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

impl prometheus_client::collector::Collector for TargetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result {
        let snapshot = self.proxy.snapshot.load();
        let targets = &snapshot.targets;

        let mut family = encoder.encode_descriptor(
            "http_requests",
            "Requests answered, by target, method and status code.",
            None,
            MetricType::Counter,
        )?;
        for t in targets.iter() {
            let mut failed = Ok(());
            t.stats.requests.each(|method, code, count| {
                if failed.is_err() {
                    return;
                }
                let code = code.map_or_else(|| "_OTHER".to_owned(), |c| c.to_string());
                let labels = [
                    ("namespace", t.namespace.as_str()),
                    ("service", t.name.as_str()),
                    ("method", method),
                    ("code", code.as_str()),
                ];
                failed = family
                    .encode_family(&labels)
                    .and_then(|mut m| m.encode_counter::<NoLabelSet, _, f64>(&count, None));
            });
            failed?;
        }

        Self::histogram(
            &mut encoder,
            "http_request_duration_seconds",
            "Time from a request's arrival to its response headers, holding included.",
            targets,
            |t| &t.stats.duration,
        )?;
        Self::gauge(
            &mut encoder,
            "http_requests_in_flight",
            "Requests forwarded to an instance whose response has not finished.",
            targets,
            |t| t.stats.in_flight() as i64,
        )?;
        Self::gauge(
            &mut encoder,
            "wakegate_open_streams",
            "Streams open: responses still streaming after they first waited for their \
             upstream, and upgraded connections such as WebSocket.",
            targets,
            |t| t.streams.open() as i64,
        )?;
        Self::gauge(
            &mut encoder,
            "wakegate_idle_streams",
            "Open streams that carried nothing for the target's stream_idle_timeout: still \
             served, but no longer keeping the target awake.",
            targets,
            |t| t.streams.idle() as i64,
        )?;
        let reasons = Close::ALL.map(|why| why.label());
        Self::counter_by(
            &mut encoder,
            "wakegate_streams_closed",
            "Streams wakegate closed gracefully because their instance was about to stop, by \
             reason (scaled_to_zero, scaled_down).",
            targets,
            ("reason", &reasons),
            |t, i| t.streams.closed_total(Close::ALL[i]),
        )?;
        Self::gauge(
            &mut encoder,
            "wakegate_pending_requests",
            "Requests held while the target has no ready instance, or while every instance is \
             at its instance concurrency.",
            targets,
            |t| t.stats.pending() as i64,
        )?;
        Self::gauge(
            &mut encoder,
            "wakegate_pending_bytes",
            "What the held requests pin: their heads, and the HTTP/2 body bytes their clients \
             may send before they are forwarded (bounded by max_pending_bytes).",
            targets,
            |t| t.stats.pending_bytes.load(Ordering::Relaxed) as i64,
        )?;
        Self::gauge(
            &mut encoder,
            "wakegate_queued_requests",
            "Held requests waiting for a free slot: every ready instance is at the target's \
             instance concurrency (part of wakegate_pending_requests).",
            targets,
            |t| t.slots.as_ref().map_or(0, |s| s.waiting() as i64),
        )?;
        Self::gauge(
            &mut encoder,
            "wakegate_instance_concurrency",
            "Requests one instance of the target takes at once; 0: no limit.",
            targets,
            |t| i64::from(t.serving.instance_concurrency),
        )?;
        Self::counter(
            &mut encoder,
            "wakegate_cold_starts",
            "Wakes from zero: times the target went from no ready instance to starting one.",
            targets,
            |t| t.stats.cold_starts.load(Ordering::Relaxed),
        )?;
        Self::histogram(
            &mut encoder,
            "wakegate_cold_start_duration_seconds",
            "Time from a wake from zero to the target's first ready instance.",
            targets,
            |t| &t.stats.cold_start_duration,
        )?;
        let now = Instant::now();
        Self::gauge(
            &mut encoder,
            "wakegate_start_backoff_seconds",
            "Seconds until the next start may be tried after failed starts or early crashes in \
             a row (0: none is waited for); requests meanwhile get 503 at once.",
            targets,
            |t| {
                let remaining = t.status().backoff.and_then(|b| b.remaining(now));
                remaining.map_or(0, |d| d.as_secs_f64().ceil() as i64)
            },
        )?;
        Self::gauge(
            &mut encoder,
            "wakegate_unhealthy_endpoints",
            "Ready endpoints marked unhealthy by failed requests or their active check; they get \
             no requests until they recover, but a trial per health.interval without an active check.",
            targets,
            |t| {
                let endpoints = t.endpoints();
                endpoints.iter().filter(|e| !e.health.is_healthy()).count() as i64
            },
        )?;
        Self::gauge(
            &mut encoder,
            "wakegate_replicas_desired",
            "Instances the autoscaler asks for.",
            targets,
            |t| i64::from(t.desired()),
        )?;
        Self::gauge(
            &mut encoder,
            "wakegate_replicas_ready",
            "Instances ready to take requests.",
            targets,
            |t| t.endpoints().len() as i64,
        )?;

        // Only targets that scale on a Prometheus query have these.
        let queried: Vec<Arc<Target>> = targets
            .iter()
            .filter(|t| t.scaling.source.is_some())
            .cloned()
            .collect();
        let mut family = encoder.encode_descriptor(
            "wakegate_prometheus_query_value",
            "The last value the target's Prometheus query gave (none before the first).",
            None,
            MetricType::Gauge,
        )?;
        for t in &queried {
            if let Some(value) = t.stats.query.value() {
                family.encode_family(&labels(t))?.encode_gauge(&value)?;
            }
        }
        let reasons = QueryFailure::ALL.map(|why| why.label());
        Self::counter_by(
            &mut encoder,
            "wakegate_prometheus_query_failures",
            "Queries of the target's Prometheus source that gave no usable value, by reason; \
             the last scaling decision stands meanwhile.",
            &queried,
            ("reason", &reasons),
            |t, i| t.stats.query.failures(QueryFailure::ALL[i]),
        )?;

        Self::counter(
            &mut encoder,
            "wakegate_concurrency_seconds",
            "Request-seconds spent in flight or held; its rate is the time-weighted average concurrency.",
            targets,
            |t| t.stats.concurrency.integral(t.micros(Instant::now())),
        )?;
        Self::counter_by(
            &mut encoder,
            "wakegate_scale_events",
            "Changes of the desired instance count, by direction.",
            targets,
            ("direction", &["up", "down"]),
            |t, i| [&t.stats.scaled_up, &t.stats.scaled_down][i].load(Ordering::Relaxed),
        )?;

        let mut family = encoder.encode_descriptor(
            "wakegate_rejected_requests",
            "Requests answered by wakegate itself, by reason.",
            None,
            MetricType::Counter,
        )?;
        for t in targets.iter() {
            for why in Reject::ALL {
                let labels = [
                    ("namespace", t.namespace.as_str()),
                    ("service", t.name.as_str()),
                    ("reason", why.label()),
                ];
                family
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, f64>(&t.stats.rejected(why), None)?;
            }
        }
        for why in Refusal::ALL {
            let labels = [("namespace", ""), ("service", ""), ("reason", why.label())];
            family
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, f64>(&self.proxy.unrouted.get(why), None)?;
        }

        let clients = &self.proxy.clients;
        encoder
            .encode_descriptor(
                "wakegate_client_connections",
                "Client connections open on the proxy port.",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&clients.open.load(Ordering::Relaxed))?;
        if let Some(workers) = clients.workers.get() {
            let mut family = encoder.encode_descriptor(
                "wakegate_worker_client_connections",
                "Client connections each proxy worker serves now.",
                None,
                MetricType::Gauge,
            )?;
            for (i, load) in workers.iter().enumerate() {
                let worker = i.to_string();
                family
                    .encode_family(&[("worker", worker.as_str())])?
                    .encode_gauge(&load.open.load(Ordering::Relaxed))?;
            }
            encoder
                .encode_descriptor(
                    "wakegate_client_connections_handed",
                    "Client connections a proxy worker accepted and handed to one that served fewer.",
                    None,
                    MetricType::Counter,
                )?
                .encode_counter::<NoLabelSet, _, f64>(
                    &clients.handed.load(Ordering::Relaxed),
                    None,
                )?;
        }
        encoder
            .encode_descriptor(
                "wakegate_client_connections_limited",
                "Times a worker stopped accepting connections because it had limits.max_connections open.",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, f64>(&clients.limited.load(Ordering::Relaxed), None)?;
        let mut family = encoder.encode_descriptor(
            "wakegate_client_connection_timeouts",
            "Client connections closed for a timeout of [limits]: header (no complete request \
             head in time) or idle (no request for limits.idle_timeout), by reason.",
            None,
            MetricType::Counter,
        )?;
        for (reason, count) in [
            ("header", &clients.header_timeouts),
            ("idle", &clients.idle_timeouts),
        ] {
            family
                .encode_family(&[("reason", reason)])?
                .encode_counter::<NoLabelSet, _, f64>(&count.load(Ordering::Relaxed), None)?;
        }

        let holds = &self.proxy.holds;
        for (name, help, value) in [
            (
                "wakegate_held_requests",
                "Requests all targets hold together (bounded by limits.max_held_requests).",
                &holds.requests,
            ),
            (
                "wakegate_held_bytes",
                "What all held requests pin together (bounded by limits.max_held_bytes).",
                &holds.bytes,
            ),
            (
                "wakegate_memory_budget_bytes",
                "Resident memory at or above which new requests get 503 (limits.memory_budget; \
                 0: none).",
                &self.proxy.memory.budget,
            ),
        ] {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&(value.load(Ordering::Relaxed) as i64))?;
        }
        if let Some(resident) = crate::memory::resident() {
            // The name Prometheus client libraries give it.
            encoder
                .encode_descriptor(
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes.",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&(resident as i64))?;
        }
        encoder
            .encode_descriptor(
                "wakegate_memory_trims",
                "Times wakegate gave freed heap pages back to the system close to its memory budget.",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, f64>(
                &self.proxy.memory.trims.load(Ordering::Relaxed),
                None,
            )?;
        encoder
            .encode_descriptor(
                "wakegate_access_log_dropped",
                "Access log lines dropped because the log's writer fell behind (a slow disk).",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, f64>(
                &self.proxy.access_log_dropped.load(Ordering::Relaxed),
                None,
            )?;

        let mut family = encoder.encode_descriptor(
            "wakegate_refused_routes",
            "Host and path-prefix pairs a target asked for and does not route, by reason \
             (claimed: another target holds it; wildcard, domain, namespace: the host policy).",
            None,
            MetricType::Gauge,
        )?;
        for t in targets.iter() {
            let refused = t.refused();
            let mut by_reason: std::collections::BTreeMap<&str, i64> = Default::default();
            for r in refused.iter() {
                *by_reason.entry(r.reason.label()).or_default() += 1;
            }
            for (reason, count) in by_reason {
                let labels = [
                    ("namespace", t.namespace.as_str()),
                    ("service", t.name.as_str()),
                    ("reason", reason),
                ];
                family.encode_family(&labels)?.encode_gauge(&count)?;
            }
        }
        if let Some(tls) = &self.proxy.tls {
            encode_tls(tls, &mut encoder)?;
        }
        Ok(())
    }
}

/// The HTTPS listener's handshakes and certificates.
fn encode_tls(tls: &Tls, encoder: &mut DescriptorEncoder) -> Result {
    let stats = &tls.stats;
    encoder
        .encode_descriptor(
            "wakegate_tls_handshakes",
            "TLS handshakes completed on the HTTPS listener.",
            None,
            MetricType::Counter,
        )?
        .encode_counter::<NoLabelSet, _, f64>(&stats.handshakes.load(Ordering::Relaxed), None)?;
    let mut family = encoder.encode_descriptor(
        "wakegate_tls_handshake_failures",
        "TLS handshakes that failed, by reason (timeout, closed, alert_received, incompatible, \
         no_application_protocol, invalid_message, other).",
        None,
        MetricType::Counter,
    )?;
    for why in HandshakeFailure::ALL {
        family
            .encode_family(&[("reason", why.label())])?
            .encode_counter::<NoLabelSet, _, f64>(&stats.failures(why), None)?;
    }
    let mut family = encoder.encode_descriptor(
        "wakegate_tls_certificate_reloads",
        "Certificate reloads (SIGHUP or a changed file), by result; a failed one keeps the \
         certificates in use.",
        None,
        MetricType::Counter,
    )?;
    for (result, count) in [("ok", &stats.reloads), ("failed", &stats.failed_reloads)] {
        family
            .encode_family(&[("result", result)])?
            .encode_counter::<NoLabelSet, _, f64>(&count.load(Ordering::Relaxed), None)?;
    }
    let mut family = encoder.encode_descriptor(
        "wakegate_tls_certificate_expiry_timestamp_seconds",
        "When each certificate in use expires (its notAfter), by certificate file.",
        None,
        MetricType::Gauge,
    )?;
    for certificate in &tls.certificates().loaded {
        let cert = certificate.files.cert.to_string_lossy();
        family
            .encode_family(&[("cert", cert.as_ref())])?
            .encode_gauge(&certificate.not_after)?;
    }
    Ok(())
}
