//! HTTP/2 connections to upstream endpoints (h2c, prior knowledge), one set per proxy worker:
//! each request opens a stream on the least busy connection to its endpoint that has room
//! under the upstream's `SETTINGS_MAX_CONCURRENT_STREAMS`; another connection is opened when
//! all are full, up to [`Settings::max_connections`] per endpoint (then streams queue on the
//! least busy one, as h2 holds them until the upstream has room). Requests waiting for the
//! first connection to an endpoint share it instead of each opening one.
//!
//! A request the upstream did not process — its stream above the last one a `GOAWAY` names,
//! or reset with `REFUSED_STREAM` (RFC 9113 §8.7) — is sent again, body included (see
//! [`super::replay`]): after a `GOAWAY` on another connection, after a refused stream on the
//! least busy one, which may be the same. Nothing the upstream may have processed is sent
//! twice.
//! Keep-alive PINGs find a dead peer; connections idle for the idle timeout are closed.

use std::collections::HashMap;
use std::future::poll_fn;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::Notify;

use super::pool::{UpstreamError, connect_tcp, sweep_in_background};
use super::replay::Replayable;

/// Settings of a [`Multiplex`].
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Connections per endpoint at most; streams beyond what they all allow wait in h2.
    pub max_connections: usize,
    /// A connection without a stream this long is closed (at the latest after twice as long).
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// A PING this often, on busy and idle connections alike...
    pub keep_alive_interval: Duration,
    /// ...and a connection whose PING is not answered within this is closed.
    pub keep_alive_timeout: Duration,
    /// How many times a request the upstream did not process is sent again.
    pub retries: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_connections: 4,
            idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(20),
            keep_alive_timeout: Duration::from_secs(10),
            retries: 2,
        }
    }
}

/// The HTTP/2 upstream connections of one worker.
#[derive(Debug, Clone)]
pub struct Multiplex {
    inner: Arc<Inner>,
}

type ByAddress = HashMap<Box<str>, Arc<Endpoint>, foldhash::fast::RandomState>;

#[derive(Debug)]
struct Inner {
    settings: Settings,
    builder: http2::Builder<TokioExecutor>,
    /// Replaced whole (copy on write) when an address is seen first or swept away.
    endpoints: ArcSwap<ByAddress>,
    sweeping: AtomicBool,
    /// Sweeps so far: a connection's idle stamp.
    sweeps: AtomicU64,
}

/// The connections to one address.
#[derive(Debug, Default)]
struct Endpoint {
    connections: Mutex<Connections>,
    /// A connection was opened, or failed to open.
    changed: Notify,
}

#[derive(Debug, Default)]
struct Connections {
    open: Vec<Connection>,
    /// Connections being opened.
    connecting: usize,
}

#[derive(Debug, Clone)]
struct Connection {
    sender: SendRequest<Replayable>,
    streams: Arc<Streams>,
}

/// What a connection carries, shared by its task and its requests.
#[derive(Debug)]
struct Streams {
    active: AtomicUsize,
    /// The upstream's `SETTINGS_MAX_CONCURRENT_STREAMS`, as h2 last saw it.
    max: AtomicUsize,
    /// No new stream goes here: the upstream sent GOAWAY, or the connection ended.
    closing: AtomicBool,
    /// The sweep count when its last stream ended.
    idle_since: AtomicU64,
    sweeps: Weak<Inner>,
}

impl Streams {
    fn has_room(&self) -> bool {
        self.active.load(Ordering::Relaxed) < self.max.load(Ordering::Relaxed)
    }
}

/// One stream's claim on its connection, released when the response ends.
#[derive(Debug)]
pub struct Stream(Arc<Streams>);

impl Drop for Stream {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::Relaxed) == 1
            && let Some(inner) = self.0.sweeps.upgrade()
        {
            let now = inner.sweeps.load(Ordering::Relaxed);
            self.0.idle_since.store(now, Ordering::Relaxed);
        }
    }
}

/// The h2 error behind a hyper error, if any.
fn h2_error(error: &hyper::Error) -> Option<&h2::Error> {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        source = cause.source();
    }
    None
}

/// How the upstream said that it did not process a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Its GOAWAY named a lower stream, or came before the stream was opened.
    GoingAway,
    /// It reset the stream with REFUSED_STREAM.
    Stream,
}

/// Whether, and how, the upstream says it did not process the request: a stream above the
/// last one its GOAWAY names (or opened after it), or reset with REFUSED_STREAM.
fn unprocessed(error: &hyper::Error) -> Option<Refusal> {
    let h2 = h2_error(error).filter(|h2| h2.is_remote())?;
    if h2.is_go_away() {
        Some(Refusal::GoingAway)
    } else if h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
        Some(Refusal::Stream)
    } else {
        None
    }
}

impl Multiplex {
    pub fn new(settings: Settings) -> Self {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(settings.keep_alive_interval)
            .keep_alive_timeout(settings.keep_alive_timeout)
            .keep_alive_while_idle(true);
        Self {
            inner: Arc::new(Inner {
                settings,
                builder,
                endpoints: ArcSwap::default(),
                sweeping: AtomicBool::new(false),
                sweeps: AtomicU64::new(0),
            }),
        }
    }

    /// Sends `req` (absolute-form URI) to `authority`; a request the upstream did not process
    /// goes out again on another connection, as long as its body can be sent again.
    pub async fn send(
        &self,
        authority: &Authority,
        mut req: Request<Replayable>,
    ) -> Result<(Response<Incoming>, Stream), UpstreamError> {
        let endpoint = self.endpoint(authority);
        let restart = req.body().restart();
        let mut retries = self.inner.settings.retries;
        loop {
            // What a retry needs of the request: everything but its body, which restarts.
            let head = (retries > 0).then(|| {
                let mut head = Request::new(());
                *head.method_mut() = req.method().clone();
                *head.uri_mut() = req.uri().clone();
                *head.version_mut() = req.version();
                *head.headers_mut() = req.headers().clone();
                head
            });
            let (mut connection, stream) = self.checkout(&endpoint, authority).await?;
            let error = match connection.sender.try_send_request(req).await {
                Ok(response) => {
                    restart.answered();
                    return Ok((response, stream));
                }
                Err(mut error) => match error.take_message() {
                    // Never handed to the connection: it closed meanwhile.
                    Some(unsent) => {
                        connection.streams.closing.store(true, Ordering::Relaxed);
                        req = unsent;
                        continue;
                    }
                    None => error.into_error(),
                },
            };
            let Some(refusal) = unprocessed(&error) else {
                return Err(error.into());
            };
            if refusal == Refusal::GoingAway {
                // No new stream goes to this connection. (A stream refused alone leaves its
                // connection in use: an upstream may refuse what is over its limit.)
                connection.streams.closing.store(true, Ordering::Relaxed);
            }
            let again = head.zip(restart.again());
            let Some((head, body)) = again else {
                return Err(error.into());
            };
            tracing::debug!(upstream = %authority, %error, "upstream did not process the request; sending it again");
            retries -= 1;
            req = head.map(|()| body);
        }
    }

    fn endpoint(&self, authority: &Authority) -> Arc<Endpoint> {
        if let Some(endpoint) = self.inner.endpoints.load().get(authority.as_str()) {
            return endpoint.clone();
        }
        let mut added = None;
        self.inner.endpoints.rcu(|map| {
            let mut map = ByAddress::clone(map);
            let endpoint = map.entry(authority.as_str().into()).or_default();
            added = Some(endpoint.clone());
            map
        });
        added.expect("rcu ran at least once")
    }

    /// A connection to `authority` with a stream reserved on it: the least busy one with room,
    /// else the one being opened, else a new one if fewer than the maximum are open, else the
    /// least busy.
    async fn checkout(
        &self,
        endpoint: &Endpoint,
        authority: &Authority,
    ) -> Result<(Connection, Stream), UpstreamError> {
        loop {
            let mut changed = pin!(endpoint.changed.notified());
            let connect = {
                let mut connections = lock(&endpoint.connections);
                connections.open.retain(|c| {
                    !c.streams.closing.load(Ordering::Relaxed) && !c.sender.is_closed()
                });
                let least_busy = |with_room: bool| {
                    connections
                        .open
                        .iter()
                        .filter(|c| !with_room || c.streams.has_room())
                        .min_by_key(|c| c.streams.active.load(Ordering::Relaxed))
                        .map(reserve)
                };
                if let Some(reserved) = least_busy(true) {
                    return Ok(reserved);
                }
                if connections.connecting > 0 {
                    // One is being opened: wait for it rather than open more at once
                    // (registered while the lock is held, so its notification is not missed).
                    changed.as_mut().enable();
                    false
                } else if connections.open.len() >= self.inner.settings.max_connections.max(1)
                    && let Some(reserved) = least_busy(false)
                {
                    return Ok(reserved);
                } else {
                    connections.connecting += 1;
                    true
                }
            };
            if !connect {
                changed.await;
                continue;
            }
            // Boxed: connecting is rare next to reusing.
            let opened = Box::pin(self.connect(authority)).await;
            let mut connections = lock(&endpoint.connections);
            connections.connecting -= 1;
            endpoint.changed.notify_waiters();
            let connection = opened?;
            connections.open.push(connection.clone());
            return Ok(reserve(&connection));
        }
    }

    async fn connect(&self, authority: &Authority) -> Result<Connection, UpstreamError> {
        let stream = connect_tcp(authority, self.inner.settings.connect_timeout).await?;
        let (sender, connection) = self
            .inner
            .builder
            .handshake::<_, Replayable>(TokioIo::new(stream))
            .await?;
        let streams = Arc::new(Streams {
            active: AtomicUsize::new(0),
            // h2's assumption until the upstream's SETTINGS arrive.
            max: AtomicUsize::new(100),
            closing: AtomicBool::new(false),
            idle_since: AtomicU64::new(self.inner.sweeps.load(Ordering::Relaxed)),
            sweeps: Arc::downgrade(&self.inner),
        });
        let watched = streams.clone();
        let upstream = authority.clone();
        tokio::spawn(async move {
            let mut connection = pin!(connection);
            let ended = poll_fn(|cx| {
                let polled = connection.as_mut().poll(cx);
                let max = connection.current_max_send_streams();
                watched.max.store(max, Ordering::Relaxed);
                polled
            })
            .await;
            watched.closing.store(true, Ordering::Relaxed);
            if let Err(error) = ended {
                tracing::debug!(%upstream, %error, "upstream HTTP/2 connection ended with an error");
            }
        });
        self.sweep_in_background();
        Ok(Connection { sender, streams })
    }

    /// Once per pool, a task that closes, every idle timeout, the connections without a
    /// stream since before the previous sweep, and forgets addresses with none left.
    fn sweep_in_background(&self) {
        let every = self.inner.settings.idle_timeout;
        sweep_in_background(&self.inner.sweeping, &self.inner, every, Inner::sweep);
    }
}

fn reserve(connection: &Connection) -> (Connection, Stream) {
    connection.streams.active.fetch_add(1, Ordering::Relaxed);
    (connection.clone(), Stream(connection.streams.clone()))
}

fn lock(connections: &Mutex<Connections>) -> MutexGuard<'_, Connections> {
    connections.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn sweep(&self) {
        let previous = self.sweeps.fetch_add(1, Ordering::Relaxed);
        let mut emptied = Vec::new();
        for (authority, endpoint) in self.endpoints.load().iter() {
            let mut connections = lock(&endpoint.connections);
            // Dropping a connection's last sender closes it.
            connections.open.retain(|c| {
                let idle = c.streams.active.load(Ordering::Relaxed) == 0
                    && c.streams.idle_since.load(Ordering::Relaxed) < previous;
                !idle && !c.streams.closing.load(Ordering::Relaxed)
            });
            if connections.open.is_empty() && connections.connecting == 0 {
                emptied.push(authority.clone());
            }
        }
        if !emptied.is_empty() {
            self.endpoints.rcu(|map| {
                let mut map = ByAddress::clone(map);
                map.retain(|a, e| {
                    let c = lock(&e.connections);
                    !(c.open.is_empty() && c.connecting == 0 && emptied.contains(a))
                });
                map
            });
        }
    }
}
