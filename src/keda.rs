//! KEDA's external scaler (`externalscaler.ExternalScaler` over gRPC): tells a `ScaledObject`
//! whether a target should run and how loaded it is. `StreamIsActive` pushes `true` the moment
//! a request is held for a cold target, so KEDA never leaves a just-woken workload at zero.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::{Stream, StreamExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::config::Metric;
use crate::proxy::Snapshot;
use crate::target::{Signal, Successor, Target};

/// The generated messages, server and client (KEDA's `externalscaler` package).
pub mod pb {
    tonic::include_proto!("externalscaler");
}

use pb::external_scaler_server::{ExternalScaler, ExternalScalerServer};
use pb::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};

/// Serves the scaler on `listener` for the targets `snapshot` routes, until `stop`; open
/// `StreamIsActive` streams end then too.
pub async fn serve(
    listener: TcpListener,
    snapshot: Arc<ArcSwap<Snapshot>>,
    stats: Stats,
    stop: CancellationToken,
) {
    let scaler = Scaler {
        snapshot,
        stats,
        stop: stop.clone(),
    };
    // Without it, a push waits for the client's delayed ACK of the last one (Nagle): 40 ms.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    if let Err(error) = tonic::transport::Server::builder()
        .add_service(ExternalScalerServer::new(scaler))
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await
    {
        tracing::error!(%error, "KEDA external scaler stopped");
    }
}

/// The service: every answer is read from the targets as they are now.
pub struct Scaler {
    snapshot: Arc<ArcSwap<Snapshot>>,
    stats: Stats,
    stop: CancellationToken,
}

/// What KEDA asked of the scaler and was told, in `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// By method and gRPC status code.
    calls: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// `StreamIsActive` streams open.
    streams: Gauge,
    /// Answers pushed on those streams, by `active` (`true`, `false`).
    pushes: Family<Vec<(&'static str, &'static str)>, Counter>,
}

impl Stats {
    pub fn register(registry: &mut Registry) -> Stats {
        let stats = Stats::default();
        registry.register(
            "wakegate_external_scaler_calls",
            "Calls of KEDA's external-scaler service, by method and gRPC status code.",
            stats.calls.clone(),
        );
        registry.register(
            "wakegate_external_scaler_streams",
            "StreamIsActive streams open (one per ScaledObject that KEDA watches).",
            stats.streams.clone(),
        );
        registry.register(
            "wakegate_external_scaler_pushes",
            "Answers pushed on StreamIsActive streams, by active (true: KEDA scales from zero).",
            stats.pushes.clone(),
        );
        stats
    }

    fn call<T>(&self, method: &'static str, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => "ok",
            Err(status) => match status.code() {
                tonic::Code::NotFound => "not_found",
                tonic::Code::InvalidArgument => "invalid_argument",
                tonic::Code::Unimplemented => "unimplemented",
                tonic::Code::Unavailable => "unavailable",
                _ => "other",
            },
        };
        self.calls
            .get_or_create(&vec![("method", method), ("code", code)])
            .inc();
    }
}

/// Counts a stream as open until it is dropped.
struct OpenStream(Gauge);

impl OpenStream {
    fn new(streams: &Gauge) -> Self {
        streams.inc();
        OpenStream(streams.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What a trigger asks about, from its `metadata`.
#[derive(Debug, Clone, PartialEq)]
struct Query {
    namespace: String,
    service: String,
    /// The trigger's choice; the target's own scaling metric otherwise.
    metric: Option<Metric>,
    /// Per replica; the target's own for its metric otherwise.
    target_value: Option<f64>,
}

impl Query {
    fn of(object: &ScaledObjectRef) -> Result<Self, Status> {
        let meta = &object.scaler_metadata;
        let invalid = |key: &str, value: &str, expected: &str| {
            Status::invalid_argument(format!(
                "ScaledObject {}/{}: metadata {key} = {value:?}; expected {expected}",
                object.namespace, object.name
            ))
        };
        let service = match meta.get("service").map(|s| s.trim()) {
            Some(service) if !service.is_empty() => service.to_owned(),
            _ => {
                return Err(invalid(
                    "service",
                    meta.get("service").map_or("", String::as_str),
                    "the name of the Service (the `service` label of wakegate's metrics)",
                ));
            }
        };
        let namespace = match meta.get("namespace").map(|s| s.trim()) {
            Some(namespace) if !namespace.is_empty() => namespace.to_owned(),
            _ => object.namespace.clone(),
        };
        let metric = match meta.get("metric").map(|s| s.trim()) {
            None | Some("") => None,
            Some("concurrency") => Some(Metric::Concurrency),
            Some("rps") => Some(Metric::Rps),
            Some(other) => return Err(invalid("metric", other, "\"concurrency\" or \"rps\"")),
        };
        let target_value = match meta.get("targetValue").map(|s| s.trim()) {
            None | Some("") => None,
            Some(text) => match text.parse::<f64>() {
                Ok(value) if value.is_finite() && value > 0.0 => Some(value),
                _ => return Err(invalid("targetValue", text, "a number above zero")),
            },
        };
        Ok(Self {
            namespace,
            service,
            metric,
            target_value,
        })
    }

    /// The metric and its per-replica target for `target`.
    fn metric(&self, target: &Target) -> (Metric, f64) {
        let metric = self.metric.unwrap_or(target.scaling.metric);
        let value = self
            .target_value
            .unwrap_or(if metric == target.scaling.metric {
                target.scaling.target_value()
            } else {
                match metric {
                    Metric::Concurrency => 10.0,
                    Metric::Rps => 50.0,
                }
            });
        (metric, value)
    }

    fn metric_name(&self, metric: Metric) -> String {
        let metric = match metric {
            Metric::Concurrency => "concurrency",
            Metric::Rps => "rps",
        };
        format!("wakegate-{}-{}-{metric}", self.namespace, self.service)
    }
}

impl Scaler {
    fn find(&self, query: &Query) -> Result<Arc<Target>, Status> {
        find(&self.snapshot.load(), query)
    }
}

fn find(snapshot: &Snapshot, query: &Query) -> Result<Arc<Target>, Status> {
    snapshot
        .targets
        .iter()
        .find(|t| t.namespace == query.namespace && t.name == query.service)
        .cloned()
        .ok_or_else(|| {
            Status::not_found(format!(
                "wakegate has no target for service {:?} in namespace {:?} (the trigger's \
                 metadata `service` and `namespace`; the namespace defaults to the \
                 ScaledObject's own)",
                query.service, query.namespace
            ))
        })
}

/// Whether `target` should run: requests held or in flight but for idle streams (here or, as
/// last sampled, on other replicas), or its last activity within its idle timeout.
fn active(target: &Target, signal: &Signal, now: Instant) -> bool {
    target.demand() > 0 || signal.demand > 0 || idle_at(target, signal).is_some_and(|at| now < at)
}

/// When the target goes idle if nothing more happens. A request another replica said it
/// holds counts as activity from then: that replica's next scrape shows it as demand.
fn idle_at(target: &Target, signal: &Signal) -> Option<Instant> {
    let last = target
        .last_request_at()
        .max(signal.last_active)
        .max(target.last_held_on_peer())?;
    Some(last + target.serving.idle_timeout)
}

/// One `StreamIsActive` stream: the answer again whenever it changes.
struct Activity {
    target: Arc<Target>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    query: Query,
    held: watch::Receiver<u64>,
    signal: watch::Receiver<Signal>,
    status: watch::Receiver<crate::target::Status>,
    sent: Option<bool>,
    stop: CancellationToken,
}

impl Activity {
    fn new(
        target: Arc<Target>,
        snapshot: Arc<ArcSwap<Snapshot>>,
        query: Query,
        stop: CancellationToken,
    ) -> Self {
        Self {
            held: target.watch_held(),
            signal: target.watch_signal(),
            status: target.subscribe(),
            target,
            snapshot,
            query,
            sent: None,
            stop,
        }
    }

    /// The next answer that differs from the last one sent; `None` ends the stream.
    async fn next(&mut self) -> Option<Result<IsActiveResponse, Status>> {
        loop {
            // Marked seen before reading the state, so a change after the reading wakes us.
            self.held.borrow_and_update();
            let signal = *self.signal.borrow_and_update();
            let retired = self.status.borrow_and_update().retired.clone();
            let successor = match retired {
                None => None,
                Some(Successor::Replaced(next)) => Some(next),
                // It may be back under a new handle (a Service changed kind of workload).
                Some(Successor::Removed) => match find(&self.snapshot.load(), &self.query) {
                    Ok(next) if !Arc::ptr_eq(&next, &self.target) => Some(next),
                    Ok(_) => {
                        // Retired just before the route table without it is published: look
                        // again in a moment (a target is seldom removed; nothing to watch).
                        tokio::select! {
                            () = self.stop.cancelled() => return None,
                            () = tokio::time::sleep(Duration::from_millis(10)) => continue,
                        }
                    }
                    Err(error) => return Some(Err(error)),
                },
            };
            if let Some(next) = successor {
                // What was sent stays sent: the new handle's answer goes out only if it differs.
                *self = Self {
                    sent: self.sent,
                    ..Self::new(
                        next,
                        self.snapshot.clone(),
                        self.query.clone(),
                        self.stop.clone(),
                    )
                };
                continue;
            }
            let now = Instant::now();
            let active = active(&self.target, &signal, now);
            if self.sent != Some(active) {
                self.sent = Some(active);
                return Some(Ok(IsActiveResponse { result: active }));
            }
            let idle_at = idle_at(&self.target, &signal).filter(|at| active && *at > now);
            tokio::select! {
                () = self.stop.cancelled() => return None,
                _ = self.held.changed() => {}
                _ = self.signal.changed() => {}
                _ = self.status.changed() => {}
                () = sleep_until(idle_at) => {}
            }
        }
    }
}

/// Until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

type Answers<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for Scaler {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let answer = (|| {
            let query = Query::of(request.get_ref())?;
            let target = self.find(&query)?;
            let signal = *target.watch_signal().borrow();
            Ok(Response::new(IsActiveResponse {
                result: active(&target, &signal, Instant::now()),
            }))
        })();
        self.stats.call("IsActive", &answer);
        answer
    }

    type StreamIsActiveStream = Answers<IsActiveResponse>;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let found = Query::of(request.get_ref()).and_then(|query| Ok((self.find(&query)?, query)));
        self.stats.call("StreamIsActive", &found);
        let (target, query) = found?;
        let activity = Activity::new(target, self.snapshot.clone(), query, self.stop.clone());
        let open = OpenStream::new(&self.stats.streams);
        let pushes = self.stats.pushes.clone();
        let answers = futures_util::stream::unfold(Some(activity), move |activity| {
            let pushes = pushes.clone();
            async move {
                let mut activity = activity?;
                let answer = activity.next().await?;
                if let Ok(pushed) = &answer {
                    let active = if pushed.result { "true" } else { "false" };
                    pushes.get_or_create(&vec![("active", active)]).inc();
                }
                // An error ends the stream after it is sent.
                let more = answer.is_ok().then_some(activity);
                Some((answer, more))
            }
        });
        // The count of open streams ends with the stream.
        let answers = answers.map(move |answer| {
            let _ = &open;
            answer
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let answer = (|| {
            let query = Query::of(request.get_ref())?;
            let target = self.find(&query)?;
            let (metric, value) = query.metric(&target);
            Ok(Response::new(GetMetricSpecResponse {
                metric_specs: vec![MetricSpec {
                    metric_name: query.metric_name(metric),
                    target_size: value.ceil() as i64,
                    target_size_float: value,
                }],
            }))
        })();
        self.stats.call("GetMetricSpec", &answer);
        answer
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let answer = self.metrics(request.into_inner());
        self.stats.call("GetMetrics", &answer);
        answer
    }

    type StreamMetricSpecStream = Answers<GetMetricSpecResponse>;

    async fn stream_metric_spec(
        &self,
        _request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamMetricSpecStream>, Status> {
        // Optional in KEDA's protocol: KEDA then asks GetMetricSpec, whose answer changes only
        // with the configuration.
        let answer = Err(Status::unimplemented(
            "wakegate does not push metric specs; ask GetMetricSpec",
        ));
        self.stats.call("StreamMetricSpec", &answer);
        answer
    }
}

impl Scaler {
    fn metrics(&self, request: GetMetricsRequest) -> Result<Response<GetMetricsResponse>, Status> {
        let object = request.scaled_object_ref.unwrap_or_default();
        let query = Query::of(&object)?;
        let target = self.find(&query)?;
        let (metric, _) = query.metric(&target);
        let signal = *target.watch_signal().borrow();
        let value = match metric {
            Metric::Concurrency => signal.concurrency,
            Metric::Rps => signal.rps,
        };
        let metric_name = if request.metric_name.is_empty() {
            query.metric_name(metric)
        } else {
            request.metric_name
        };
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name,
                metric_value: value.round() as i64,
                metric_value_float: value,
            }],
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn object(namespace: &str, meta: &[(&str, &str)]) -> ScaledObjectRef {
        ScaledObjectRef {
            name: "web".into(),
            namespace: namespace.into(),
            scaler_metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
        }
    }

    #[test]
    fn the_namespace_defaults_to_the_scaled_objects_own() {
        let query = Query::of(&object("demo", &[("service", "hello")])).unwrap();
        assert_eq!(
            (query.namespace.as_str(), query.service.as_str()),
            ("demo", "hello")
        );
        let query = Query::of(&object(
            "demo",
            &[("service", "hello"), ("namespace", "web")],
        ))
        .unwrap();
        assert_eq!(query.namespace, "web");
    }

    fn target_config() -> crate::config::TargetConfig {
        crate::config::Config::first_target(
            "[[target]]\nname = \"hello\"\nhosts = [\"h\"]\ncommand = [\"demo\"]\n\
             idle_timeout = \"30s\"\n",
        )
    }

    #[test]
    fn a_target_is_active_while_requests_are_held_or_open_or_within_its_idle_timeout() {
        use std::sync::atomic::Ordering::SeqCst;

        let target = Target::new(target_config());
        let (now, quiet) = (Instant::now(), Signal::default());
        let secs = Duration::from_secs;
        assert!(!active(&target, &quiet, now), "never used");
        for counter in [&target.stats.pending, &target.stats.in_flight] {
            counter.fetch_add(1, SeqCst);
            assert!(active(&target, &quiet, now + secs(3600)));
            counter.fetch_sub(1, SeqCst);
        }
        let elsewhere = Signal { demand: 2, ..quiet };
        assert!(
            active(&target, &elsewhere, now),
            "another replica's requests"
        );
        target.touch(now);
        assert!(active(&target, &quiet, now + secs(29)));
        assert!(
            !active(&target, &quiet, now + secs(30)),
            "idle from arrival"
        );
        let seen = Signal {
            last_active: Some(now + secs(40)),
            ..quiet
        };
        assert!(
            active(&target, &seen, now + secs(69)),
            "the last sample's activity"
        );
        assert!(!active(&target, &seen, now + secs(70)));

        // Held on another replica, as it says before its next scrape shows it.
        let held_elsewhere = Target::new(target_config());
        held_elsewhere.held_on_peer();
        let told = Instant::now();
        assert!(active(&held_elsewhere, &quiet, told), "held on a peer");
        assert!(active(&held_elsewhere, &quiet, told + secs(29)));
        assert!(!active(&held_elsewhere, &quiet, told + secs(31)));
    }

    #[test]
    fn bad_metadata_is_refused_naming_the_key_and_what_was_expected() {
        let refused = |meta: &[(&str, &str)]| {
            let status = Query::of(&object("demo", meta)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            status.message().to_owned()
        };
        assert!(refused(&[]).contains("metadata service"));
        let message = refused(&[("service", "a"), ("metric", "cpu")]);
        assert!(
            message.contains("\"cpu\"") && message.contains("\"rps\""),
            "{message}"
        );
        let message = refused(&[("service", "a"), ("targetValue", "0")]);
        assert!(message.contains("above zero"), "{message}");
    }
}
