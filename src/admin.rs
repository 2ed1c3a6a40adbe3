//! The admin listener: `/metrics`, `/healthz`, `/readyz` (503 while draining), `/targets`
//! (JSON state of every target) and `/targets/{namespace}/{name}` (one target's state and its
//! endpoint addresses); and, from the other replicas only, `POST /peers/held/{namespace}/{name}`
//! (a request is held there for that target).

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{self, Metrics};
use crate::provider::kubernetes::peers::{PeerSignal, Refused};
use crate::proxy::Shared;
use crate::target::Target;

#[derive(Debug)]
pub struct Admin {
    pub metrics: Metrics,
    /// The data plane's state: targets and the drain flag.
    pub proxy: Arc<Shared>,
    /// False until the targets of the first Kubernetes sync are routed (always true without
    /// Kubernetes).
    pub routed: tokio::sync::watch::Receiver<bool>,
    /// The other replicas, on Kubernetes.
    pub peers: Option<Arc<PeerSignal>>,
}

impl Admin {
    fn respond(&self, req: &Request<Incoming>, from: IpAddr) -> Response<Full<Bytes>> {
        if let Some(rest) = req.uri().path().strip_prefix("/peers/held/") {
            return self.held_on_peer(req.method(), rest, from);
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        }
        match req.uri().path() {
            "/metrics" => {
                let mut response = Response::new(Full::new(Bytes::from(self.metrics.encode())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(metrics::CONTENT_TYPE),
                );
                response
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" if self.proxy.draining.load(Ordering::Relaxed) => {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            }
            "/readyz" if !*self.routed.borrow() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "waiting for the first Kubernetes sync\n",
            ),
            "/readyz" => text(StatusCode::OK, "ready\n"),
            "/targets" => json(self.targets_json()),
            path if path.starts_with("/targets/") => self.target(&path["/targets/".len()..]),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /metrics, /healthz, /readyz, /targets or /targets/{namespace}/{name}\n",
            ),
        }
    }

    /// `POST /peers/held/{namespace}/{name}`: another replica holds a request for that target.
    fn held_on_peer(&self, method: &Method, rest: &str, from: IpAddr) -> Response<Full<Bytes>> {
        if method != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only POST\n");
        }
        let Some((namespace, name)) = split_key(rest) else {
            return text(
                StatusCode::NOT_FOUND,
                "not found; expected /peers/held/{namespace}/{name}\n",
            );
        };
        let snapshot = self.proxy.snapshot.load();
        let found = snapshot
            .targets
            .iter()
            .find(|t| t.namespace == namespace && t.name == name);
        let answer = match &self.peers {
            Some(peers) => peers.held_on_peer(from, found.map(|t| &**t)),
            None => Err(Refused::NotTaken),
        };
        match answer {
            Ok(()) => text(StatusCode::NO_CONTENT, ""),
            Err(Refused::NotTaken) => text(
                StatusCode::NOT_FOUND,
                "not found: notices from peers are taken only on Kubernetes with `kubernetes.peers` and `listen.external_scaler`\n",
            ),
            Err(Refused::NotAPeer) => text(
                StatusCode::FORBIDDEN,
                format!("{from} is not a ready endpoint of the peers Service\n"),
            ),
            Err(Refused::UnknownTarget) => text(
                StatusCode::NOT_FOUND,
                format!("no target {namespace}/{name}\n"),
            ),
        }
    }

    fn targets_json(&self) -> String {
        let snapshot = self.proxy.snapshot.load();
        let clock = (Instant::now(), SystemTime::now());
        let targets: Vec<serde_json::Value> = snapshot
            .targets
            .iter()
            .map(|t| target_json(t, clock))
            .collect();
        pretty(&serde_json::json!({ "targets": targets }))
    }

    /// `/targets/{namespace}/{name}`: the target's `/targets` entry plus the addresses of its
    /// ready endpoints, as the data plane sees them right now.
    fn target(&self, rest: &str) -> Response<Full<Bytes>> {
        let Some((namespace, name)) = split_key(rest) else {
            return text(
                StatusCode::NOT_FOUND,
                "not found; expected /targets/{namespace}/{name}\n",
            );
        };
        let snapshot = self.proxy.snapshot.load();
        let Some(target) = snapshot
            .targets
            .iter()
            .find(|t| t.namespace == namespace && t.name == name)
        else {
            return text(
                StatusCode::NOT_FOUND,
                format!("no target {namespace}/{name}\n"),
            );
        };
        let mut body = target_json(target, (Instant::now(), SystemTime::now()));
        let endpoints: Vec<String> = target
            .endpoints()
            .iter()
            .map(|e| e.authority.to_string())
            .collect();
        body["endpoints"] = endpoints.into();
        json(pretty(&body))
    }
}

/// `{namespace}/{name}`, both non-empty.
fn split_key(rest: &str) -> Option<(&str, &str)> {
    rest.split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
}

/// One target's entry in `/targets`; `clock` is now, monotonic and wall, read once per answer.
fn target_json(t: &Target, (now, wall): (Instant, SystemTime)) -> serde_json::Value {
    let status = t.status();
    let rfc3339 =
        |at| humantime::format_rfc3339_millis(wall - now.saturating_duration_since(at)).to_string();
    let last_request = t.last_request_at().map(rfc3339);
    // Ready endpoints that all failed take no requests: the target is not ready, whatever
    // its provider published.
    let state = if t.unhealthy() {
        "unhealthy"
    } else {
        status.phase.as_str()
    };
    let unhealthy: Vec<serde_json::Value> = t
        .endpoints()
        .iter()
        .filter_map(|e| {
            let unhealthy = e.health.unhealthy()?;
            Some(serde_json::json!({
                "address": e.authority.as_str(),
                "since": rfc3339(unhealthy.since),
                "last_error": unhealthy.last_error.as_str(),
            }))
        })
        .collect();
    serde_json::json!({
        "name": t.name,
        "namespace": t.namespace,
        "kind": t.backend.kind(),
        "state": state,
        "unhealthy_endpoints": unhealthy,
        "instances": t.endpoints().len(),
        "desired": t.desired(),
        "in_flight": t.stats.in_flight(),
        "pending": t.stats.pending(),
        "open_streams": t.streams.open(),
        "idle_streams": t.streams.idle(),
        "instance_concurrency": t.slots.as_ref().map(|s| s.limit()),
        "queued": t.slots.as_ref().map_or(0, |s| s.waiting()),
        "requests": t.stats.requests.total(),
        "cold_starts": t.stats.cold_starts.load(Ordering::Relaxed),
        "last_request": last_request,
        "last_start_failure": status.last_failure.as_deref(),
        "backoff": status.backoff.and_then(|b| {
            let retry_in = b.remaining(Instant::now())?;
            Some(serde_json::json!({
                "failures": b.failures,
                "retry_in_ms": retry_in.as_millis() as u64,
            }))
        }),
        "replicas": t.observed_replicas(),
        "refused_routes": t.refused().iter().map(|r| serde_json::json!({
            "host": r.host.to_string(),
            "path_prefix": r.path_prefix,
            "reason": r.reason.label(),
            "detail": r.reason.to_string(),
        })).collect::<Vec<_>>(),
    })
}

fn pretty(value: &serde_json::Value) -> String {
    let mut body = serde_json::to_string_pretty(value).expect("JSON values serialise");
    body.push('\n');
    body
}

fn json(body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Serves the admin endpoints until `shutdown`.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: CancellationToken) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, from) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let admin = admin.clone();
        let service = hyper::service::service_fn(move |req| {
            let response = admin.respond(&req, from.ip());
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
}
