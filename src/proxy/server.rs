//! Accepting client connections: HTTP/1.1 and h2c (prior knowledge) on one port, HTTP/1.1 and
//! HTTP/2 by ALPN on the HTTPS one, upgrades enabled, `[limits]` applied to both protocols, and
//! a graceful drain on shutdown; one single-threaded runtime per worker thread, each with its
//! own listening sockets, each of one `SO_REUSEPORT` group. HTTP/1.1 goes to wakegate's own
//! server ([`h1_server`]), which hands a connection to hyper's for what it does not take;
//! HTTP/2 is hyper's.

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::edge::Refusal;
use super::h1_server::{self, Ended};
use super::tls::{Negotiated, Tls};
use super::{Proxy, Shared};
use crate::config::Limits;

/// What a client that speaks HTTP/2 without an upgrade sends first (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// hyper's HTTP/1 defaults: its read buffer's bound (8 KiB + 100 × 4 KiB), and header count.
const HYPER_MAX_BUF_SIZE: usize = 8192 + 4096 * 100;
const HYPER_MAX_HEADERS: usize = 100;
/// How long a connection told to close (HTTP/2: GOAWAY) for a timeout may take to do so: h2's
/// graceful close waits for the client's PING acknowledgement, which a stalled client never
/// sends.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Client connections of every worker, for the metrics.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Open now.
    pub open: AtomicI64,
    /// Times a worker stopped accepting because it had `limits.max_connections` open.
    pub limited: AtomicU64,
    /// Closed because no request head came in time (`limits.header_read_timeout`).
    pub header_timeouts: AtomicU64,
    /// Closed after `limits.idle_timeout` without a request.
    pub idle_timeouts: AtomicU64,
    /// Each worker's share, when the proxy runs on [`Workers`].
    pub workers: OnceLock<Arc<[Arc<WorkerLoad>]>>,
    /// Accepted by one worker and handed to another that served fewer.
    pub handed: AtomicU64,
}

/// One worker's client connections: how many it serves now (those handed to it included), and
/// a wake-up for its accept loop when one closes.
#[derive(Debug, Default)]
pub struct WorkerLoad {
    pub open: AtomicUsize,
    closed: Notify,
}

/// The protocol a client connection speaks: told from its first bytes on the cleartext port,
/// or by ALPN after a TLS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// The body bytes an HTTP/2 client may send on one stream before wakegate reads them.
pub const H2_STREAM_WINDOW: u32 = 1024 * 1024;
/// The body bytes an HTTP/2 client may send on all streams of a connection before wakegate
/// reads them.
pub const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;

/// How client connections are served: the HTTP/1.1 and HTTP/2 settings and the limits of
/// `[limits]`, how many are open, and what a drain needs to reach every open connection.
/// Cleartext and TLS connections of a worker alike.
struct Connections {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// wakegate's own HTTP/1 server's share of `[limits]`, the header read timeout among them.
    h1_settings: h1_server::Settings,
    idle_timeout: Duration,
    max_connections: usize,
    /// Connections this worker serves now.
    load: Arc<WorkerLoad>,
    /// How far the drain has gone: each connection finishes its requests and closes once it
    /// begins, and what is still open is dropped when its time is up.
    drain: Arc<Drain>,
    /// Each open connection holds a receiver; `closed()` resolves once none is left.
    open: watch::Sender<()>,
}

impl Connections {
    fn new(limits: &Limits, load: Arc<WorkerLoad>) -> Self {
        let mut connections = Self {
            http1: http1::Builder::new(),
            http2: http2::Builder::new(TokioExecutor::new()),
            h1_settings: h1_server::Settings::of(limits),
            idle_timeout: limits.idle_timeout,
            max_connections: 1,
            load,
            drain: Arc::default(),
            open: watch::Sender::new(()),
        };
        connections.apply(limits);
        connections
    }

    /// Takes `limits` for the connections accepted from now on (open ones keep theirs; the
    /// connection bound applies at once).
    fn apply(&mut self, limits: &Limits) {
        let mut http1 = http1::Builder::new();
        // hyper's header read timeout also runs while a keep-alive connection waits for its
        // next request. `max_header_size` bounds the head exactly (431; 414 for a request
        // line beyond 65,534 bytes); the read buffer (`max_buf_size`) must hold it.
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_header_size(limits.max_header_bytes as usize)
            .max_buf_size((limits.max_header_bytes as usize).max(HYPER_MAX_BUF_SIZE));
        if limits.max_headers as usize != HYPER_MAX_HEADERS {
            // Set only when it differs from hyper's own: hyper then parses every head into a
            // header array on the heap instead of the stack (a few per cent, says hyper).
            http1.max_headers(limits.max_headers as usize);
        }
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        // CONTINUATION floods: h2 bounds the CONTINUATION frames of a header block by
        // `max_header_list_size` (then GOAWAY) and answers a larger block 431 without keeping
        // it. SETTINGS and PING floods: h2 acknowledges each before reading the next frame.
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(limits.max_header_bytes)
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_pending_accept_reset_streams(limits.max_pending_reset_streams as usize)
            .max_local_error_reset_streams(limits.max_local_reset_streams as usize)
            // hyper's own defaults, set here because a held request's accounting
            // (`hold::body_allowance`) counts what they let a client send before it is forwarded.
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW);
        self.http1 = http1;
        self.http2 = http2;
        self.h1_settings = h1_server::Settings::of(limits);
        self.idle_timeout = limits.idle_timeout;
        self.max_connections = limits.max_connections as usize;
    }

    /// Waits until this worker serves fewer than `limits.max_connections`: beyond it the
    /// worker stops accepting, and new connections wait in the kernel's listen queue
    /// (HAProxy's `maxconn`) rather than being accepted and dropped.
    async fn room(&self, stats: &ClientStats) {
        let mut counted = false;
        loop {
            let notified = self.load.closed.notified();
            if self.load.open.load(Ordering::Relaxed) < self.max_connections {
                return;
            }
            if !counted {
                counted = true;
                stats.limited.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    max = self.max_connections,
                    "connection limit reached: not accepting"
                );
            }
            notified.await;
        }
    }

    /// Asks every open connection to finish its requests and close, and waits for them and
    /// the upgraded ones for at most the drain timeout in force; closes what is left then.
    async fn drain(&self, proxy: &Proxy) {
        self.drain.advance(Stage::Closing);
        let drain = *proxy.shared().drain_timeout.borrow();
        let tunnels = &proxy.shared().tunnels;
        let drained = async {
            self.open.closed().await;
            tunnels.closed().await;
        };
        tokio::select! {
            () = drained => tracing::debug!("all client connections closed"),
            () = tokio::time::sleep(drain) => {
                tracing::warn!(after = ?drain, "drain timeout: closing remaining client connections");
                self.drain.advance(Stage::Closed);
                tunnels.cut();
            }
        }
    }

    /// Serves one TCP client connection: on the cleartext port HTTP/1.1 or HTTP/2 with prior
    /// knowledge as its first bytes say; on the HTTPS one (`tls`) as ALPN says, once its
    /// handshake is done within the header read timeout. `open` counts it in its worker.
    fn spawn_tcp(
        &self,
        stream: TcpStream,
        proxy: &Proxy,
        peer: SocketAddr,
        tls: Option<Arc<Tls>>,
        open: OpenGuard,
    ) {
        let drain = self.drain.clone();
        let header_read_timeout = self.h1_settings.header_read_timeout;
        if let Some(tls) = tls {
            self.spawn(proxy, peer, true, open, async move {
                let accepted = tokio::select! {
                    accepted = tls.accept(stream, peer, header_read_timeout) => accepted,
                    () = drain.reached(Stage::Closing) => None,
                };
                accepted.map(|(stream, negotiated)| {
                    let protocol = match negotiated {
                        Negotiated::Http2 => Protocol::Http2,
                        Negotiated::Http1 => Protocol::Http1,
                    };
                    (stream, protocol)
                })
            });
            return;
        }
        let shared = proxy.inner.shared.clone();
        self.spawn(proxy, peer, false, open, async move {
            let protocol = tokio::select! {
                protocol = tokio::time::timeout(header_read_timeout, protocol(&stream)) => {
                    protocol.unwrap_or_else(|_| {
                        // Not a byte in time: the header read timeout too.
                        shared.clients.header_timeouts.fetch_add(1, Ordering::Relaxed);
                        None
                    })
                }
                () = drain.reached(Stage::Closing) => None,
            };
            protocol.map(|protocol| (stream, protocol))
        });
    }

    /// Serves the connection `accepted` gives (`None`: nothing to serve) until it closes, a
    /// timeout cuts it, the drain asks it to finish, or the drain time is up. `accepted`
    /// finishes accepting it (peeking at its first bytes, a TLS handshake) in the
    /// connection's own task, counted among the open connections; `tls`: it came to the
    /// HTTPS listener.
    fn spawn<I>(
        &self,
        proxy: &Proxy,
        peer: SocketAddr,
        tls: bool,
        open_here: OpenGuard,
        accepted: impl Future<Output = Option<(I, Protocol)>> + Send + 'static,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let connection = proxy.connection(peer, tls, Some(activity.clone()));
        let http1 = self.http1.clone();
        let http2 = self.http2.clone();
        let settings = self.h1_settings;
        let timeouts = Timeouts {
            header: settings.header_read_timeout,
            idle: self.idle_timeout,
        };
        let drain = self.drain.clone();
        let open = self.open.subscribe();
        // Boxed, as the HTTP/2 connection below: a future the task holds stays part of its
        // size for the connection's whole life, though it is done with once accepted.
        let accepted = Box::pin(accepted);
        tokio::spawn(async move {
            let served = async {
                let Some((io, protocol)) = accepted.await else {
                    return Ok(());
                };
                let watch = Watch {
                    drain: &drain,
                    activity: &activity,
                    timeouts,
                    stats: &open_here.stats,
                };
                match protocol {
                    Protocol::Http2 => {
                        // Boxed: an HTTP/2 connection's state is several times an HTTP/1 one's,
                        // and unboxed it would size every connection's task, HTTP/1 too.
                        let mut connection = Box::pin(
                            http2.serve_connection(TokioIo::new(io), connection.service()),
                        );
                        watch
                            .serve(connection.as_mut(), |c| c.graceful_shutdown())
                            .await
                            .map_err(Ended::Hyper)
                    }
                    Protocol::Http1 => {
                        let stop = AtomicBool::new(false);
                        let served =
                            pin!(h1_server::serve(io, connection, settings, &http1, &stop));
                        watch
                            .serve(served, |_| stop.store(true, Ordering::Relaxed))
                            .await
                    }
                }
            };
            // Once the drain time is up, the connection is dropped, and with it its requests,
            // their in-flight counts and endpoint leases.
            if let Some(Err(error)) = drain.run(served).await {
                count_error(&error, &open_here.stats);
                tracing::debug!(%peer, %error, "client connection ended with an error");
            }
            drop(open);
            drop(open_here);
        });
    }
}

/// How far a worker's drain has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Stage {
    Serving,
    /// Each connection finishes the requests it has and closes.
    Closing,
    /// The drain time is up: what is still open is dropped.
    Closed,
}

/// A worker's drain as its connections see it. Each connection's task looks at the stage
/// with one load whenever it is polled, and the drain wakes each task itself when the stage
/// moves on: the `CancellationToken` futures this replaces took two locks on every poll of
/// every connection (the token's and its `Notify`'s), and one was made and dropped, each
/// with a lock, for every request.
#[derive(Debug, Default)]
struct Drain {
    stage: AtomicU8,
    /// The task of each open connection.
    tasks: Mutex<slab::Slab<Waker>>,
}

impl Drain {
    fn stage(&self) -> Stage {
        match self.stage.load(Ordering::Acquire) {
            0 => Stage::Serving,
            1 => Stage::Closing,
            _ => Stage::Closed,
        }
    }

    /// Moves the drain on to `stage`, and wakes every connection to see it.
    fn advance(&self, stage: Stage) {
        self.stage.store(stage as u8, Ordering::Release);
        let tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        for (_, task) in tasks.iter() {
            task.wake_by_ref();
        }
    }

    /// Runs `connection` as a connection of this worker, its task woken when the drain moves
    /// on; `None` once the drain time is up (the connection dropped then).
    async fn run<F: Future>(&self, connection: F) -> Option<F::Output> {
        let mut connection = pin!(connection);
        let mut task = Task {
            drain: self,
            key: None,
        };
        poll_fn(|cx| {
            if task.register(cx) == Stage::Closed {
                return Poll::Ready(None);
            }
            connection.as_mut().poll(cx).map(Some)
        })
        .await
    }

    /// Resolves once the drain has reached `stage`. Only within [`Drain::run`], whose task
    /// is the one woken: it registers no waker of its own.
    fn reached(&self, stage: Stage) -> impl Future<Output = ()> + '_ {
        h1_server::seen(move || self.stage() >= stage)
    }
}

/// A connection's task as its worker's drain knows it: registered on its first poll, again
/// only if polled with a waker that would wake another task, and forgotten when it ends.
struct Task<'a> {
    drain: &'a Drain,
    key: Option<(usize, Waker)>,
}

impl Task<'_> {
    fn register(&mut self, cx: &Context<'_>) -> Stage {
        if !matches!(&self.key, Some((_, waker)) if waker.will_wake(cx.waker())) {
            let mut tasks = self.drain.tasks.lock().unwrap_or_else(|e| e.into_inner());
            let key = match self.key.take() {
                Some((key, _)) => {
                    tasks[key] = cx.waker().clone();
                    key
                }
                None => tasks.insert(cx.waker().clone()),
            };
            self.key = Some((key, cx.waker().clone()));
        }
        // After registering: a drain that moved on before it is seen here, one after it
        // wakes this task.
        self.drain.stage()
    }
}

impl Drop for Task<'_> {
    fn drop(&mut self) {
        if let Some((key, _)) = self.key.take() {
            let mut tasks = self.drain.tasks.lock().unwrap_or_else(|e| e.into_inner());
            tasks.remove(key);
        }
    }
}

/// Counts what a connection's end says of it: a head hyper refused (it answered 400, 414 or
/// 431 itself and never called wakegate), or a header read timeout.
fn count_error(error: &Ended, stats: &Stats) {
    match error {
        Ended::Hyper(error) => {
            if let Some(why) = Refusal::of_connection_error(error) {
                stats.unrouted.count(why);
            } else if error.is_timeout() {
                stats
                    .clients
                    .header_timeouts
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        Ended::HeaderTimeout => {
            stats
                .clients
                .header_timeouts
                .fetch_add(1, Ordering::Relaxed);
        }
        Ended::Io(_) | Ended::Response(_) => {}
    }
}

/// What a connection's task counts in.
type Stats = Arc<Shared>;

/// Counts a connection as open in its worker and in the gauge, until dropped.
struct OpenGuard {
    here: Arc<WorkerLoad>,
    stats: Stats,
}

impl OpenGuard {
    fn new(here: Arc<WorkerLoad>, stats: Stats) -> Self {
        here.open.fetch_add(1, Ordering::Relaxed);
        stats.clients.open.fetch_add(1, Ordering::Relaxed);
        Self { here, stats }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.here.open.fetch_sub(1, Ordering::Relaxed);
        self.here.closed.notify_one();
        self.stats.clients.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection accepted by one worker for another: the socket, taken off the accepting
/// worker's reactor, and already counted in the other's load (so that the next accept anywhere
/// sees it).
struct Handed {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    tls: bool,
    open: OpenGuard,
}

/// The workers' loads and inboxes, as one worker sees them: the kernel's `SO_REUSEPORT` hash
/// spreads connections unevenly (64 connections over two workers split 36/28 or worse about
/// one time in three), and a worker with more connections than another hands each new one it
/// accepts to the one with the fewest, as HAProxy gives a new connection to its least loaded
/// thread. A request still never leaves the thread that serves its connection.
struct Balance {
    me: usize,
    loads: Arc<[Arc<WorkerLoad>]>,
    inboxes: Arc<[mpsc::UnboundedSender<Handed>]>,
}

impl Balance {
    /// The worker to hand a new connection to: the one with the fewest, when it has fewer than
    /// this one and room below `max_connections`; `None`: keep it here.
    fn lighter(&self, max_connections: usize) -> Option<usize> {
        let open = |i: usize| self.loads[i].open.load(Ordering::Relaxed);
        let (least, fewest) = (0..self.loads.len())
            .map(|i| (i, open(i)))
            .min_by_key(|l| l.1)?;
        (fewest < open(self.me) && fewest < max_connections).then_some(least)
    }

    /// Hands `stream` to worker `to`; gives it back if that worker has stopped.
    fn hand(
        &self,
        to: usize,
        stream: TcpStream,
        peer: SocketAddr,
        tls: bool,
        shared: &Stats,
    ) -> io::Result<Option<TcpStream>> {
        let open = OpenGuard::new(self.loads[to].clone(), shared.clone());
        let handed = Handed {
            stream: stream.into_std()?,
            peer,
            tls,
            open,
        };
        match self.inboxes[to].send(handed) {
            Ok(()) => {
                shared.clients.handed.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            Err(mpsc::error::SendError(back)) => TcpStream::from_std(back.stream).map(Some),
        }
    }
}

#[derive(Clone, Copy)]
struct Timeouts {
    header: Duration,
    idle: Duration,
}

/// When a connection last had a request in progress: hyper has no idle timeout of its own
/// (and no header read timeout for HTTP/2), so each connection's requests are counted here
/// and [`Watch`] closes it once it has none for too long.
pub struct Activity {
    born: Instant,
    /// Requests between hyper's call and their response head.
    active: AtomicUsize,
    /// Microseconds after `born` a request last began or got its response head; `u64::MAX`
    /// before the first request.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            born: Instant::now(),
            active: AtomicUsize::new(0),
            last: AtomicU64::new(u64::MAX),
        }
    }

    fn touch(&self) {
        let micros = self.born.elapsed().as_micros() as u64;
        self.last.store(micros, Ordering::Relaxed);
    }

    /// When the connection times out if nothing happens meanwhile: `header` after it opened
    /// until its first request, then `idle` after its last request, never while one is in
    /// progress.
    fn deadline(&self, timeouts: Timeouts, now: Instant) -> (Instant, Timeout) {
        if self.active.load(Ordering::Relaxed) > 0 {
            return (now + timeouts.idle, Timeout::Idle);
        }
        match self.last.load(Ordering::Relaxed) {
            u64::MAX => (self.born + timeouts.header, Timeout::Header),
            last => (
                self.born + Duration::from_micros(last) + timeouts.idle,
                Timeout::Idle,
            ),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Timeout {
    Header,
    Idle,
}

/// Marks a request of the connection as in progress until its response head is ready. Only
/// its end reads the clock: while it is in progress the connection cannot time out anyway.
pub struct Busy<'a>(&'a Activity);

impl<'a> Busy<'a> {
    pub fn new(activity: &'a Activity) -> Self {
        activity.active.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What watches one connection while hyper serves it: the drain, and its timeouts.
struct Watch<'a> {
    drain: &'a Drain,
    activity: &'a Activity,
    timeouts: Timeouts,
    stats: &'a Stats,
}

impl Watch<'_> {
    /// Serves `connection` to its end. Once the drain begins, asks it to finish the
    /// requests it has and close (`graceful_shutdown`), and serves it until then. Once it
    /// times out, asks the same, and drops it if it has not closed [`CLOSE_GRACE`] later.
    /// The connection is pinned where the caller keeps it: taken by value, an async fn keeps
    /// its argument and the pinned copy both, each the connection's whole state.
    async fn serve<C, E>(
        self,
        mut connection: Pin<&mut C>,
        graceful_shutdown: impl Fn(Pin<&mut C>),
    ) -> Result<(), E>
    where
        C: Future<Output = Result<(), E>>,
    {
        // A deadline only moves later, except when the first request comes before the header
        // deadline and the idle one falls earlier: look again at the earlier of the two.
        let Timeouts { header, idle } = self.timeouts;
        let mut deadline = self.activity.born + header.min(idle);
        let kind = loop {
            tokio::select! {
                result = connection.as_mut() => return result,
                () = self.drain.reached(Stage::Closing) => {
                    graceful_shutdown(connection.as_mut());
                    return connection.await;
                }
                () = tokio::time::sleep_until(deadline) => {
                    let now = Instant::now();
                    let kind;
                    (deadline, kind) = self.activity.deadline(self.timeouts, now);
                    if deadline <= now {
                        break kind;
                    }
                }
            }
        };
        let counter = match kind {
            Timeout::Header => &self.stats.clients.header_timeouts,
            Timeout::Idle => &self.stats.clients.idle_timeouts,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(?kind, "client connection timed out: closing it");
        graceful_shutdown(connection.as_mut());
        // Its error now (hyper's own header timeout) would count the timeout twice.
        let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
        Ok(())
    }
}

/// Serves one client connection on any byte stream with the default limits' HTTP/1.1 and
/// HTTP/2 settings, as if `peer` had connected in cleartext: HTTP/2 when the stream begins with the HTTP/2 preface
/// (`http2`), HTTP/1.1 otherwise. There is no drain: it ends when the connection does. For
/// driving the proxy from bytes in memory (the fuzzer of the HTTP edge, tests), where no
/// socket is there to peek at.
pub async fn serve_io<I>(io: I, proxy: &Proxy, peer: SocketAddr, http2: bool) -> Result<(), Ended>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let connections = Connections::new(&Limits::default(), Arc::default());
    let connection = proxy.connection(peer, false, None);
    if http2 {
        connections
            .http2
            .serve_connection(TokioIo::new(io), connection.service())
            .await
            .map_err(Ended::Hyper)
    } else {
        let stop = AtomicBool::new(false);
        let settings = connections.h1_settings;
        h1_server::serve(io, connection, settings, &connections.http1, &stop).await
    }
}

/// Tells HTTP/2 with prior knowledge from HTTP/1 by peeking at the first bytes, which stay in
/// the socket for hyper to read. `None`: the client closed before sending anything.
async fn protocol(stream: &TcpStream) -> Option<Protocol> {
    let mut first = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut first).await.ok()?;
        if n == 0 {
            return None;
        }
        if first[..n] != H2_PREFACE[..n] {
            return Some(Protocol::Http1);
        }
        if n == H2_PREFACE.len() {
            return Some(Protocol::Http2);
        }
        // A prefix of the preface so far (clients send it whole, so this is rare): the
        // socket stays readable while the bytes sit unread, so wait a little, not for
        // readiness, before peeking again.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Serves the worker's listeners until `shutdown`, then stops accepting and lets open
/// connections (and the upgraded ones, such as WebSockets) finish their requests for at most
/// the drain timeout in force then; whatever is still open after it is closed. A reload's
/// `[limits]` apply to the connections accepted after it.
pub async fn serve(listeners: Listeners<TcpListener>, proxy: Proxy, shutdown: CancellationToken) {
    serve_worker(listeners, proxy, shutdown, Arc::default(), None).await;
}

/// [`serve`] as one of several workers: counting its connections in `load`, and with
/// `balance`, handing new connections to a worker that serves fewer and serving those handed
/// to it (`inbox`).
async fn serve_worker(
    listeners: Listeners<TcpListener>,
    proxy: Proxy,
    shutdown: CancellationToken,
    load: Arc<WorkerLoad>,
    balance: Option<(Balance, mpsc::UnboundedReceiver<Handed>)>,
) {
    let mut limits = proxy.shared().limits.clone();
    let mut connections = Connections::new(&limits.borrow_and_update(), load.clone());
    let shared = &proxy.inner.shared;
    let stats = &shared.clients;
    let Listeners { plain, tls } = listeners;
    let https = shared.tls.clone();
    let tls = tls.zip(https.clone());
    let (balance, mut inbox) = balance.unzip();
    loop {
        if limits.has_changed().unwrap_or(false) {
            connections.apply(&limits.borrow_and_update());
        }
        let (accepted, tls) = tokio::select! {
            // Handed over by another worker: counted in this one's load already.
            Some(handed) = async {
                match &mut inbox {
                    Some(inbox) => inbox.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let Handed { stream, peer, tls, open } = handed;
                match TcpStream::from_std(stream) {
                    Ok(stream) => {
                        let tls = https.clone().filter(|_| tls);
                        connections.spawn_tcp(stream, &proxy, peer, tls, open);
                    }
                    Err(error) => tracing::warn!(%error, "cannot take a connection handed over"),
                }
                continue;
            }
            (accepted, tls) = async {
                // Both listeners wait while the worker serves `max_connections`.
                connections.room(stats).await;
                tokio::select! {
                    accepted = plain.accept() => (accepted, None),
                    accepted = async {
                        match &tls {
                            Some((listener, _)) => listener.accept().await,
                            None => std::future::pending().await,
                        }
                    } => (accepted, tls.as_ref().map(|(_, tls)| tls.clone())),
                }
            } => (accepted, tls),
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let stream = match balance
            .as_ref()
            .and_then(|b| Some((b, b.lighter(connections.max_connections)?)))
        {
            Some((balance, to)) => match balance.hand(to, stream, peer, tls.is_some(), shared) {
                Ok(None) => continue,
                Ok(Some(stream)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "cannot hand a connection to another worker");
                    continue;
                }
            },
            None => stream,
        };
        let open = OpenGuard::new(load.clone(), shared.clone());
        connections.spawn_tcp(stream, &proxy, peer, tls, open);
    }
    drop(plain);
    drop(tls);
    connections.drain(&proxy).await;
}

/// Binds `count` listening sockets to `addr` as one `SO_REUSEPORT` group: the kernel spreads
/// new connections over them, so each worker accepts its own without sharing a queue.
pub fn bind(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    if addr.port() != 0 {
        // SO_REUSEPORT would also let another process of the same user that listens there
        // already share the port silently: a plain bind first fails if the port is taken, as a
        // single listener would. (Port 0 gives a port nobody uses.)
        socket(addr)?.bind(&addr.into())?;
    }
    let mut addr = addr;
    (0..count.max(1))
        .map(|_| {
            let socket = socket(addr)?;
            socket.set_reuse_port(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            // The others join the port the first one got.
            addr = socket.local_addr()?.as_socket().unwrap_or(addr);
            Ok(socket.into())
        })
        .collect()
}

fn socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// One worker's listening sockets: the cleartext one, and the HTTPS one when `[tls]` is set.
#[derive(Debug)]
pub struct Listeners<L> {
    pub plain: L,
    pub tls: Option<L>,
}

/// The worker threads serving the proxy listeners.
#[derive(Debug)]
pub struct Workers {
    done: Vec<oneshot::Receiver<()>>,
}

impl Workers {
    /// Serves each listener on a thread of its own with a current-thread runtime, until
    /// `shutdown`, then drains as [`serve`] does. Each worker has its own [`Proxy`] with its
    /// own upstream connection pool, so a request never leaves the thread that accepted its
    /// connection.
    pub fn spawn(
        listeners: Vec<Listeners<std::net::TcpListener>>,
        shared: &Arc<Shared>,
        shutdown: &CancellationToken,
    ) -> io::Result<Self> {
        // Should a later worker fail to start, the ones already running stop at once.
        let stop = shutdown.child_token();
        let mut done = Vec::with_capacity(listeners.len());
        let loads: Arc<[Arc<WorkerLoad>]> = (0..listeners.len()).map(|_| Arc::default()).collect();
        let (inboxes, receivers): (Vec<_>, Vec<_>) = (0..listeners.len())
            .map(|_| mpsc::unbounded_channel())
            .unzip();
        let inboxes: Arc<[_]> = inboxes.into();
        // The metrics read the same loads the workers balance on.
        let _ = shared.clients.workers.set(loads.clone());
        let several = listeners.len() > 1;
        for (i, (listener, inbox)) in listeners.into_iter().zip(receivers).enumerate() {
            let load = loads[i].clone();
            let balance = several.then(|| {
                let balance = Balance {
                    me: i,
                    loads: loads.clone(),
                    inboxes: inboxes.clone(),
                };
                (balance, inbox)
            });
            let spawned = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|runtime| {
                    let (finished, finished_rx) = oneshot::channel();
                    let proxy = Proxy::for_worker(shared.clone());
                    let stop = stop.clone();
                    std::thread::Builder::new()
                        // Within the 15 bytes Linux keeps of a thread's name (`top -H`, `perf`,
                        // /proc/PID/task/TID/comm), so that each worker is told apart.
                        .name(format!("proxy-worker-{i}"))
                        .spawn(move || {
                            runtime.block_on(async move {
                                let listeners =
                                    TcpListener::from_std(listener.plain).and_then(|plain| {
                                        Ok(Listeners {
                                            plain,
                                            tls: listener
                                                .tls
                                                .map(TcpListener::from_std)
                                                .transpose()?,
                                        })
                                    });
                                match listeners {
                                    Ok(listeners) => {
                                        serve_worker(listeners, proxy, stop, load, balance).await
                                    }
                                    Err(error) => {
                                        tracing::error!(%error, "proxy worker cannot listen")
                                    }
                                }
                            });
                            // Dropping the runtime drops what is left: idle upstream connections.
                            drop(runtime);
                            let _ = finished.send(());
                        })?;
                    Ok(finished_rx)
                });
            match spawned {
                Ok(finished) => done.push(finished),
                Err(error) => {
                    stop.cancel();
                    return Err(error);
                }
            }
        }
        Ok(Self { done })
    }

    /// Resolves once every worker has drained and stopped.
    pub async fn join(self) {
        for finished in self.done {
            // An error means the worker is gone too (it panicked).
            let _ = finished.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        header: Duration::from_secs(10),
        idle: Duration::from_secs(3),
    };

    #[tokio::test]
    async fn a_drain_wakes_each_waiting_connection_then_drops_what_is_left() {
        let drain = Arc::new(Drain::default());
        // Connections that wait for nothing but the drain: only its wake-up can end them.
        let finishing = |drain: Arc<Drain>| {
            tokio::spawn(async move {
                drain
                    .run(async {
                        drain.reached(Stage::Closing).await;
                        "finished"
                    })
                    .await
            })
        };
        let stuck = |drain: Arc<Drain>| {
            tokio::spawn(async move { drain.run(std::future::pending::<()>()).await })
        };
        let (a, b) = (finishing(drain.clone()), finishing(drain.clone()));
        let forever = stuck(drain.clone());
        // Every task polled once, and so registered.
        while drain.tasks.lock().unwrap().len() < 3 {
            tokio::task::yield_now().await;
        }

        // Without the drain's wake-up nothing would poll them again: bounded, not to hang.
        async fn woken<T>(task: tokio::task::JoinHandle<T>) -> T {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("woken by the drain")
                .unwrap()
        }
        drain.advance(Stage::Closing);
        assert_eq!(woken(a).await, Some("finished"));
        assert_eq!(woken(b).await, Some("finished"));
        assert_eq!(
            drain.tasks.lock().unwrap().len(),
            1,
            "an ended connection is forgotten"
        );
        assert!(!forever.is_finished());
        // One that comes after the drain began sees it at once.
        assert_eq!(finishing(drain.clone()).await.unwrap(), Some("finished"));

        drain.advance(Stage::Closed);
        assert_eq!(woken(forever).await, None, "dropped when time is up");
        assert!(drain.tasks.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_times_out_for_its_head_then_for_idleness_never_while_busy() {
        let activity = Arc::new(Activity::new());
        let born = activity.born;
        let (at, kind) = activity.deadline(TIMEOUTS, Instant::now());
        assert_eq!(at, born + TIMEOUTS.header);
        assert!(matches!(kind, Timeout::Header));

        tokio::time::advance(Duration::from_secs(2)).await;
        let busy = Busy::new(&activity);
        tokio::time::advance(Duration::from_secs(20)).await;
        let now = Instant::now();
        let (at, kind) = activity.deadline(TIMEOUTS, now);
        assert_eq!(
            at,
            now + TIMEOUTS.idle,
            "a request in progress keeps it open"
        );
        assert!(matches!(kind, Timeout::Idle));

        drop(busy);
        let ended = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        let (at, kind) = activity.deadline(TIMEOUTS, Instant::now());
        assert_eq!(at, ended + TIMEOUTS.idle, "idle from the request's end");
        assert!(matches!(kind, Timeout::Idle));
    }
}
