//! The data plane: route → track → hold (cold start) → balance → forward. It reads immutable
//! snapshots published by the control plane and never takes a lock on the request path.

pub mod body;
pub mod error;
pub mod forward;
pub mod hold;
pub mod pool;
pub mod route;
pub mod server;
pub mod track;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response, Version, header};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::target::{Endpoint, Lease, Target};
use body::ProxyBody;
use error::ProxyError;
use forward::{Downstream, Forwarder};
use route::RouteTable;

static COLD_START_HEADER: http::HeaderName = http::HeaderName::from_static("x-wakegate-cold-start");

/// What the data plane routes with; replaced whole on reload.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub routes: RouteTable<Arc<Target>>,
    pub targets: Vec<Arc<Target>>,
}

/// Requests that never reached a target.
#[derive(Debug, Default)]
pub struct Unrouted {
    pub no_route: AtomicU64,
    pub bad_request: AtomicU64,
}

/// A request from its arrival until its response finished (or it failed), holding included:
/// what the autoscaler integrates into the target's concurrency.
#[derive(Debug)]
pub struct Demand {
    target: Arc<Target>,
    started_us: u64,
}

impl Demand {
    pub fn begin(target: Arc<Target>, at: Instant) -> Self {
        let started_us = target.micros(at);
        target.touch(at);
        target.stats.concurrency.begin(started_us);
        Self { target, started_us }
    }
}

impl Drop for Demand {
    fn drop(&mut self) {
        let now = self.target.micros(Instant::now());
        self.target.stats.concurrency.end(self.started_us, now);
    }
}

/// A request counted in flight on its target and holding its endpoint lease.
#[derive(Debug)]
pub struct InFlight {
    demand: Demand,
    lease: Lease,
}

impl InFlight {
    pub fn new(demand: Demand, lease: Lease) -> Self {
        demand.target.stats.in_flight.fetch_add(1, Ordering::SeqCst);
        Self { demand, lease }
    }

    pub fn target(&self) -> &Arc<Target> {
        &self.demand.target
    }

    pub fn endpoint(&self) -> &Endpoint {
        self.lease.endpoint()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.demand
            .target
            .stats
            .in_flight
            .fetch_sub(1, Ordering::SeqCst);
    }
}

/// The proxy service shared by every connection.
#[derive(Clone, Debug)]
pub struct Proxy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    snapshot: Arc<ArcSwap<Snapshot>>,
    forwarder: Forwarder,
    draining: Arc<AtomicBool>,
    unrouted: Arc<Unrouted>,
}

impl Proxy {
    pub fn new(
        snapshot: Arc<ArcSwap<Snapshot>>,
        draining: Arc<AtomicBool>,
        unrouted: Arc<Unrouted>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                snapshot,
                forwarder: Forwarder::default(),
                draining,
                unrouted,
            }),
        }
    }

    /// The same proxy with its own upstream connection pool, for one worker runtime: pooled
    /// connections belong to the runtime that drives them. Tunnels stay shared, so a drain sees
    /// every worker's.
    pub fn for_worker(&self) -> Self {
        let inner = &self.inner;
        Self {
            inner: Arc::new(Inner {
                snapshot: inner.snapshot.clone(),
                forwarder: Forwarder::new(inner.forwarder.tunnels().clone()),
                draining: inner.draining.clone(),
                unrouted: inner.unrouted.clone(),
            }),
        }
    }

    /// The upgraded connections this proxy opened.
    pub fn tunnels(&self) -> &forward::Tunnels {
        self.inner.forwarder.tunnels()
    }

    /// The proxy bound to one client connection: what hyper calls for each of its requests.
    pub fn connection(
        &self,
        peer: SocketAddr,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<ProxyBody>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static {
        let connection = Arc::new((self.clone(), forward::forwarded_for(peer)));
        // A closure, not a tower service: hyper keeps the request's future in place rather
        // than in a new box per request.
        hyper::service::service_fn(move |req| {
            let connection = connection.clone();
            // Boxed: every layer of the request's future keeps its own copy of what it is
            // given, so a request passed down by value would be stored five times over in
            // each held or in-flight request's future (a pointer is stored instead).
            let req = Box::new(req);
            async move {
                let (proxy, forwarded_for) = &*connection;
                Ok(proxy.handle(req, forwarded_for).await)
            }
        })
    }

    /// Answers one request; `forwarded_for` is the client's address (see
    /// [`forward::forwarded_for`]).
    pub async fn handle(
        &self,
        req: Box<Request<Incoming>>,
        forwarded_for: &HeaderValue,
    ) -> Response<ProxyBody> {
        let inner = &self.inner;
        let version = req.version();
        if inner.draining.load(Ordering::Relaxed) {
            return ProxyError::ShuttingDown.into_response(version);
        }
        let Some(host) = request_host(&req) else {
            inner.unrouted.bad_request.fetch_add(1, Ordering::Relaxed);
            return ProxyError::BadRequest("missing Host header").into_response(version);
        };
        let Some(target) = host.to_str().ok().and_then(|h| {
            inner
                .snapshot
                .load()
                .routes
                .lookup(&route::host_of(h), req.uri().path())
                .cloned()
        }) else {
            inner.unrouted.no_route.fetch_add(1, Ordering::Relaxed);
            return ProxyError::NoRoute.into_response(version);
        };

        let started = Instant::now();
        let demand = Demand::begin(target.clone(), started);
        let method = track::method_index(req.method());
        let response = match self.serve(&target, demand, req, forwarded_for, &host).await {
            Ok(response) => response,
            Err(error) => {
                if let Some(why) = error.reject() {
                    target.stats.reject(why);
                }
                tracing::warn!(target = %target.name(), status = error.status().as_u16(), error = %error.chain(), "request failed");
                error.into_response(version)
            }
        };
        target
            .stats
            .requests
            .add(method, response.status().as_u16());
        target.stats.duration.observe(started.elapsed());
        response
    }

    async fn serve(
        &self,
        target: &Arc<Target>,
        demand: Demand,
        req: Box<Request<Incoming>>,
        forwarded_for: &HeaderValue,
        host: &HeaderValue,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (in_flight, held) = match target.pick() {
            Some(lease) => (InFlight::new(demand, lease), false),
            None if target.config.wake_page && accepts_html(&req) => {
                target.request_wake();
                return Ok(wake_page(target));
            }
            None => {
                let (lease, pending) = hold::wait_ready(target).await?;
                let in_flight = InFlight::new(demand, lease);
                drop(pending);
                (in_flight, true)
            }
        };
        let downstream = Downstream {
            forwarded_for,
            host,
        };
        let mut response = self
            .inner
            .forwarder
            .forward(req, downstream, in_flight, target.config.response_timeout)
            .await?;
        if held {
            response
                .headers_mut()
                .insert(COLD_START_HEADER.clone(), HeaderValue::from_static("true"));
        }
        Ok(response)
    }
}

/// The host a request is for. The authority of an HTTP/1 absolute-form request target takes
/// precedence over `Host` (RFC 9112 §3.2.2); an HTTP/2 request's `Host`, when a client sends
/// one, is taken over its `:authority`, which well-behaved clients keep equal to it.
fn request_host(req: &Request<Incoming>) -> Option<HeaderValue> {
    let authority = || {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    };
    if req.version() < Version::HTTP_2
        && let Some(authority) = authority()
    {
        return Some(authority);
    }
    req.headers().get(header::HOST).cloned().or_else(authority)
}

fn accepts_html(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("text/html")))
}

/// What a browser gets instead of waiting for a cold start: a page that reloads itself.
fn wake_page(target: &Target) -> Response<ProxyBody> {
    let name = &target.config.name;
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"2\">\
         <title>Waking up {name}</title></head><body style=\"font-family:sans-serif;margin:4em\">\
         <h1>Waking up {name}…</h1><p>This page reloads by itself in a moment.</p></body></html>\n"
    );
    let mut response = Response::new(ProxyBody::text(html));
    *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
