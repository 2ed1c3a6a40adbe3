//! The data plane: route → track → hold (cold start) → balance → forward. It reads immutable
//! snapshots published by the control plane and never takes a lock on the request path.
//!
//! Why the stages are not tower layers (measured with `cargo bench --bench layers`, 2-core
//! KVM, 2026-11-29; a warm request costs wakegate about 17 µs of CPU):
//! - The response timeout is one `tokio::time::timeout` around the upstream send, with the
//!   target's own duration. tower's `Timeout` is the same tokio sleep behind a `Service`
//!   (71 ns against 73 ns per request): it would add a service wrapper and a boxed error and
//!   gain nothing.
//! - The hold's bound (`max_pending`) is `CountGuard::below`, one atomic that is also the
//!   `wakegate_pending_requests` gauge and part of the autoscaler's demand. tower's
//!   `LoadShed<ConcurrencyLimit<_>>` fails fast the same way but costs 78 ns against 22 ns and
//!   keeps its count in a semaphore's permits, a second count to keep in step; and it only
//!   bounds admission, while the hold's work is waiting for readiness, timeouts, failed
//!   starts and moves to a replaced target.
//! - Retries of unsent or idempotent requests do not exist yet; they come with HTTP/2
//!   upstreams (`GOAWAY`), where tower's `Retry` is to be weighed against a request body that
//!   streams and cannot be cloned.
//!
//! - Per-client rate limits are one compare-and-swap in the target's table
//!   ([`crate::target::rate_limit`], which says why not `pingora-limits`), checked right after
//!   routing so that a limited request is never counted as demand nor wakes a target.

pub mod access_log;
pub mod balance;
pub mod body;
pub mod edge;
pub mod error;
pub mod forward;
pub mod grpc;
pub mod h1;
pub mod h1_server;
mod head;
pub mod hold;
pub mod multiplex;
pub mod pool;
pub mod replay;
pub mod route;
pub mod server;
pub mod tls;
pub mod track;
pub mod tunnel;
mod wake_page;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::{HeaderValue, Request, Response, Version, header};
use hyper::body::Incoming;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::Limits;
use crate::target::Target;
use crate::target::stats::{Reject, method_index};
use balance::Pick;
use body::{ClientBody, ProxyBody};
use edge::{Refusal, Unrouted};
use error::{ProxyError, RequestId};
use forward::{Client, Downstream, Forwarder, Tunnels};
use hold::Held;
use route::RouteTable;
use track::{Demand, InFlight};

static COLD_START_HEADER: http::HeaderName = http::HeaderName::from_static("x-wakegate-cold-start");

/// What the data plane routes with; replaced whole on reload.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub routes: RouteTable<Arc<Target>>,
    pub targets: Vec<Arc<Target>>,
}

/// What every worker's proxy shares: built once by the wiring, then one [`Proxy`] per worker.
#[derive(Debug)]
pub struct Shared {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Set when the drain begins: new requests get 503.
    pub draining: AtomicBool,
    pub unrouted: Unrouted,
    /// Every worker's upgraded connections, so that a drain sees them all.
    pub tunnels: Tunnels,
    /// The HTTPS listener's certificates and handshake counts, when there is one.
    pub tls: Option<Arc<tls::Tls>>,
    /// How long a drain may take; a reload may change it.
    pub drain_timeout: watch::Receiver<Duration>,
    /// `[limits]`; a reload may change them for the connections accepted after it.
    pub limits: watch::Receiver<Limits>,
    pub clients: server::ClientStats,
    /// The access log, when one is on; a reload replaces (and so reopens) it.
    pub access_log: ArcSwapOption<access_log::AccessLog>,
    /// Access log lines dropped because its writer fell behind.
    pub access_log_dropped: Arc<AtomicU64>,
    /// All targets' held requests, against `[limits]`.
    pub holds: hold::Holds,
    /// Resident memory against `[limits]` `memory_budget`.
    pub memory: Arc<crate::memory::Memory>,
}

impl Shared {
    pub fn new(
        snapshot: Arc<ArcSwap<Snapshot>>,
        drain_timeout: watch::Receiver<Duration>,
        tls: Option<Arc<tls::Tls>>,
        limits: watch::Receiver<Limits>,
    ) -> Self {
        Self {
            snapshot,
            draining: AtomicBool::new(false),
            unrouted: Unrouted::default(),
            tunnels: Tunnels::default(),
            tls,
            drain_timeout,
            limits,
            clients: server::ClientStats::default(),
            access_log: ArcSwapOption::empty(),
            access_log_dropped: Arc::default(),
            holds: hold::Holds::default(),
            memory: Arc::default(),
        }
    }
}

/// The proxy service of one worker, shared by every connection that worker serves.
#[derive(Clone, Debug)]
pub struct Proxy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    /// This worker's own upstream connections: pooled connections belong to the runtime
    /// that drives them.
    forwarder: Forwarder,
}

impl Proxy {
    /// The proxy of one worker runtime.
    pub fn for_worker(shared: Arc<Shared>) -> Self {
        let forwarder = Forwarder::new(shared.tunnels.clone());
        Self {
            inner: Arc::new(Inner { shared, forwarder }),
        }
    }

    pub fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// The proxy bound to one client connection, which answers each of its requests. Each
    /// request is marked in `activity` (the connection's timeouts) until its response head is
    /// ready.
    pub fn connection(
        &self,
        peer: SocketAddr,
        tls: bool,
        activity: Option<Arc<server::Activity>>,
    ) -> Arc<Connection> {
        Arc::new(Connection {
            proxy: self.clone(),
            client: Client::new(peer, tls),
            activity,
        })
    }

    /// Answers one request of `client`'s connection, in a `request` span when spans are
    /// exported (or logged at `debug`).
    pub async fn handle(
        &self,
        req: Box<Request<ClientBody>>,
        client: &Client,
    ) -> Response<ProxyBody> {
        // The parent of a request's hold and forward spans. Without export and at the default
        // `info` level the span is disabled at its callsite: its fields are never evaluated.
        let span = tracing::debug_span!(
            "request",
            method = %req.method(),
            host = request_host(&req).as_ref().and_then(|h| h.to_str().ok()),
            path = req.uri().path(),
            status = tracing::field::Empty,
        );
        if span.is_disabled() {
            return self.logged(req, client).await;
        }
        // The client's trace goes on in wakegate's spans; its `traceparent` still goes to the
        // upstream unchanged.
        crate::telemetry::continue_trace(&span, req.headers());
        let response = self.logged(req, client).instrument(span.clone()).await;
        span.record("status", response.status().as_u16());
        response
    }

    /// Answers one request, and logs it when an access log is on.
    async fn logged(&self, req: Box<Request<ClientBody>>, client: &Client) -> Response<ProxyBody> {
        let Some(log) = self.inner.shared.access_log.load_full() else {
            return self.respond(req, client, None).await;
        };
        let arrived = access_log::Arrived::of(&req, &client.forwarded_for);
        let mut noted = access_log::Noted::default();
        let response = self.respond(req, client, Some(&mut noted)).await;
        let status = response.status().as_u16();
        response.map(|body| {
            ProxyBody::Logged(Box::new(access_log::Logged::new(
                body, log, arrived, status, noted,
            )))
        })
    }

    /// Answers one request; `noted` gathers what its access log line tells.
    async fn respond(
        &self,
        req: Box<Request<ClientBody>>,
        client: &Client,
        mut noted: Option<&mut access_log::Noted>,
    ) -> Response<ProxyBody> {
        let shared = &*self.inner.shared;
        let answer = Answer {
            version: req.version(),
            grpc: grpc::is_grpc(req.headers()),
            client_id: req.headers().get(&error::X_REQUEST_ID).cloned(),
        };
        if let Err((why, error)) = edge::check(&req) {
            shared.unrouted.count(why);
            return answer.refused(error, noted);
        }
        let host = request_host(&req);
        let target = host.as_ref().and_then(|host| {
            host.to_str().ok().and_then(|h| {
                shared
                    .snapshot
                    .load()
                    .routes
                    .lookup(&route::host_of(h), req.uri().path())
                    .cloned()
            })
        });
        if shared.draining.load(Ordering::Relaxed) {
            match &target {
                Some(target) => target.stats.reject(Reject::ShuttingDown),
                None => shared.unrouted.count(Refusal::ShuttingDown),
            }
            return answer.refused(ProxyError::ShuttingDown, noted);
        }
        let Some(host) = host else {
            shared.unrouted.count(Refusal::BadRequest);
            return answer.refused(ProxyError::BadRequest("missing Host header"), noted);
        };
        let Some(mut target) = target else {
            shared.unrouted.count(Refusal::NoRoute);
            return answer.refused(ProxyError::NoRoute, noted);
        };
        // Before the request is counted anywhere: a limited request is no demand, and never
        // wakes a cold target. The client is the TCP peer; `X-Forwarded-For` is not trusted,
        // as anyone can write it.
        if let Some(limiter) = &target.rate_limiter
            && let Err(retry_after) = limiter.check(client.ip)
        {
            target.stats.reject(Reject::RateLimited);
            if let Some(noted) = noted.as_deref_mut() {
                noted.target = Some(target.clone());
            }
            return answer.refused(
                ProxyError::RateLimited {
                    target: target.name().to_owned(),
                    retry_after,
                },
                noted,
            );
        }
        // Over the memory budget, nothing new is taken on; what is held or in flight goes on.
        if shared.memory.over_budget() {
            target.stats.reject(Reject::MemoryBudget);
            if let Some(noted) = noted.as_deref_mut() {
                noted.target = Some(target.clone());
            }
            return answer.refused(ProxyError::MemoryBudget, noted);
        }

        let started = Instant::now();
        let method = method_index(req.method());
        // A gRPC call's own deadline: it is not held past it.
        let deadline = if answer.grpc {
            grpc::timeout(req.headers()).map(|after| Deadline {
                at: started + after,
                after,
            })
        } else {
            None
        };
        let mut req = req;
        let response = loop {
            let demand = Demand::begin(target.clone(), started);
            let request = Arrival {
                req,
                client,
                host: &host,
                deadline,
            };
            if let Some(noted) = noted.as_deref_mut() {
                noted.target = Some(target.clone());
            }
            match self
                .serve(&target, demand, request, noted.as_deref_mut())
                .await
            {
                Ok(Served::Response(response)) => break response,
                // A reload replaced the target while the request was held: it waits for the
                // new one instead, counted there.
                Ok(Served::Moved(next, unsent)) => (target, req) = (next, unsent),
                Err(error) => {
                    if let Some(why) = error.reject() {
                        target.stats.reject(why);
                    }
                    break answer.failed(error, target.name(), noted);
                }
            }
        };
        target
            .stats
            .requests
            .add(method, response.status().as_u16());
        target.stats.duration.observe(started.elapsed());
        response
    }

    /// Serves the request on `target`, holding it while the target wakes.
    async fn serve(
        &self,
        target: &Arc<Target>,
        demand: Demand,
        request: Arrival<'_>,
        mut noted: Option<&mut access_log::Noted>,
    ) -> Result<Served, ProxyError> {
        let Arrival {
            mut req,
            client,
            host,
            deadline,
        } = request;
        let picked = match &target.slots {
            // Requests wait for a slot: this one queues behind them.
            Some(slots) if slots.queued() => Pick::Full,
            _ => balance::pick(target)?,
        };
        let (in_flight, held) = match picked {
            Pick::Leased(lease) => (InFlight::new(demand, lease), false),
            Pick::NotReady if target.serving.wake_page && wake_page::accepts_html(&req) => {
                target.request_wake();
                return Ok(Served::Response(wake_page::response(target)));
            }
            Pick::NotReady | Pick::Full => {
                let why = match picked {
                    Pick::Full => hold::Wait::Full,
                    _ => hold::Wait::Cold,
                };
                let waiting_since = noted.is_some().then(Instant::now);
                let admitted = hold::admit(
                    target,
                    &self.inner.shared.holds,
                    &self.inner.shared.limits.borrow(),
                    &req,
                    client,
                )?;
                let held = hold::wait_ready(target, why, deadline, admitted)
                    .instrument(tracing::debug_span!("hold", target = %target.name()))
                    .await;
                if let (Some(noted), Some(since)) = (noted.as_deref_mut(), waiting_since) {
                    // Across a move to a replacing target too.
                    noted.held = Some(noted.held.unwrap_or_default() + since.elapsed());
                }
                match held? {
                    Held::Ready(lease, pending) => {
                        let in_flight = InFlight::new(demand, lease);
                        drop(pending);
                        if let Some(deadline) = deadline {
                            // The upstream gets what is left of the call's time.
                            let left = deadline.at.saturating_duration_since(Instant::now());
                            req.headers_mut()
                                .insert(grpc::GRPC_TIMEOUT.clone(), grpc::timeout_value(left));
                        }
                        // A wait for a free slot is no cold start.
                        (in_flight, why == hold::Wait::Cold)
                    }
                    Held::Moved(next) => return Ok(Served::Moved(next, req)),
                }
            }
        };
        let downstream = Downstream { client, host };
        let has_body = !hyper::body::Body::is_end_stream(req.body());
        let bytes_in = noted.as_mut().and_then(|noted| {
            noted.upstream = Some(in_flight.endpoint().authority.clone());
            // Counted only where there is something to count.
            has_body.then(|| noted.bytes_in.get_or_insert_default().clone())
        });
        let span = tracing::debug_span!(
            "forward",
            target = %target.name(),
            upstream = %in_flight.endpoint().authority
        );
        let mut response = self
            .inner
            .forwarder
            .forward(
                req,
                downstream,
                in_flight,
                target.serving.response_timeout,
                bytes_in,
            )
            .instrument(span)
            .await?;
        if let Some(noted) = noted {
            noted.by = access_log::By::Upstream;
        }
        if held {
            response
                .headers_mut()
                .insert(COLD_START_HEADER.clone(), HeaderValue::from_static("true"));
        }
        Ok(Served::Response(response))
    }
}

/// The proxy bound to one client connection: see [`Proxy::connection`].
pub struct Connection {
    proxy: Proxy,
    client: Client,
    activity: Option<Arc<server::Activity>>,
}

impl Connection {
    /// Answers one request of this connection.
    pub async fn answer(&self, req: Box<Request<ClientBody>>) -> Response<ProxyBody> {
        let _busy = self.activity.as_deref().map(server::Busy::new);
        self.proxy.handle(req, &self.client).await
    }

    /// What hyper calls for each request of this connection.
    pub fn service(
        self: Arc<Self>,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<ProxyBody>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static {
        // A closure, not a tower service: hyper keeps the request's future in place rather
        // than in a new box per request.
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let mut req = req.map(ClientBody::Hyper);
            // Now, before hyper reads the connection again (see `head`).
            head::compact(&mut req);
            let connection = self.clone();
            // Boxed: every layer of the request's future keeps its own copy of what it is
            // given, so a request passed down by value would be stored five times over in
            // each held or in-flight request's future (a pointer is stored instead).
            let req = Box::new(req);
            async move { Ok(connection.answer(req).await) }
        })
    }
}

/// How wakegate answers a request it does not forward: in the request's protocol (gRPC or
/// plain HTTP), under a request id that the log line carries too.
struct Answer {
    version: Version,
    grpc: bool,
    client_id: Option<HeaderValue>,
}

impl Answer {
    /// A request refused before it reached a target's hold or upstream (malformed, no route,
    /// rate-limited, shutting down): expected traffic, so logged at debug level only.
    fn refused(
        &self,
        error: ProxyError,
        noted: Option<&mut access_log::Noted>,
    ) -> Response<ProxyBody> {
        let id = RequestId::new(self.client_id.as_ref());
        if let Some(noted) = noted {
            noted.request_id = Some(id.to_string());
        }
        tracing::debug!(request_id = %id, status = error.status().as_u16(), error = %error, "request refused");
        error.into_response(self.version, self.grpc, &id)
    }

    /// A request that failed on its way through `target`: the log gets the whole cause.
    fn failed(
        &self,
        error: ProxyError,
        target: &str,
        noted: Option<&mut access_log::Noted>,
    ) -> Response<ProxyBody> {
        let id = RequestId::new(self.client_id.as_ref());
        if let Some(noted) = noted {
            noted.request_id = Some(id.to_string());
            // The upstream may have been tried, but the status is wakegate's.
            noted.by = access_log::By::Wakegate;
        }
        tracing::warn!(target = %target, request_id = %id, status = error.status().as_u16(), error = %error.chain(), "request failed");
        error.into_response(self.version, self.grpc, &id)
    }
}

/// A client's request body as it goes upstream: counted for the access log when one is on.
pub type RequestBody = access_log::Counted<ClientBody>;

/// A request on its way to a target, with what the client connection says of it.
struct Arrival<'a> {
    req: Box<Request<ClientBody>>,
    client: &'a Client,
    host: &'a HeaderValue,
    deadline: Option<Deadline>,
}

/// A gRPC call's deadline, from its `grpc-timeout`.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub at: Instant,
    /// The `grpc-timeout` it was given.
    pub after: Duration,
}

/// How [`Proxy::serve`] ended.
// A value returned once per request and matched at once, never stored: boxing the common
// variant would cost an allocation per request to save bytes that are never kept.
#[allow(clippy::large_enum_variant)]
enum Served {
    Response(Response<ProxyBody>),
    /// The target was replaced while the request was held; here is the request, unsent.
    Moved(Arc<Target>, Box<Request<ClientBody>>),
}

/// The host a request is for. The authority of an HTTP/1 absolute-form request target takes
/// precedence over `Host` (RFC 9112 §3.2.2); an HTTP/2 request's `Host`, when a client sends
/// one, is taken over its `:authority`, which well-behaved clients keep equal to it.
fn request_host<B>(req: &Request<B>) -> Option<HeaderValue> {
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

#[cfg(test)]
mod tests;
