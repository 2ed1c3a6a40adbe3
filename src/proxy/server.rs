//! Accepting client connections: HTTP/1.1 and h2c (prior knowledge) on one port, upgrades
//! enabled, and a graceful drain on shutdown; one single-threaded runtime per worker thread,
//! each with its own listening socket of one `SO_REUSEPORT` group.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{Proxy, Shared};

/// What a client that speaks HTTP/2 without an upgrade sends first (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest a new connection may take to send its request head (or HTTP/2 preface).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How client connections are served: the HTTP/1.1 and HTTP/2 settings, and what a drain
/// needs to reach every open connection.
struct Connections {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// Cancelled when the drain begins: each connection then finishes its requests and closes.
    closing: CancellationToken,
    /// Cancelled when the drain time is up: what is still open is dropped.
    force_close: CancellationToken,
    /// Each open connection holds a receiver; `closed()` resolves once none is left.
    open: watch::Sender<()>,
}

impl Connections {
    fn new() -> Self {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new());
        Self {
            http1,
            http2,
            closing: CancellationToken::new(),
            force_close: CancellationToken::new(),
            open: watch::Sender::new(()),
        }
    }

    /// Serves one client connection until it closes, the drain asks it to finish, or the
    /// drain time is up.
    fn spawn(&self, stream: TcpStream, proxy: &Proxy, peer: SocketAddr) {
        let service = proxy.connection(peer);
        let http1 = self.http1.clone();
        let http2 = self.http2.clone();
        let closing = self.closing.clone();
        let force_close = self.force_close.clone();
        let open = self.open.subscribe();
        tokio::spawn(async move {
            let served = async {
                // hyper's own connections rather than hyper-util's auto-detecting one: that
                // one reads the first bytes itself and hands them back through a wrapper, so
                // hyper's first read sees a few bytes, and its second read then doubles the
                // 8 KiB read buffer of every connection (16 KiB each).
                let result = match protocol(&stream, &closing).await {
                    Some(Protocol::Http2) => {
                        let connection = http2.serve_connection(TokioIo::new(stream), service);
                        until_closed(connection, &closing, http2::Connection::graceful_shutdown)
                            .await
                    }
                    Some(Protocol::Http1) => {
                        let connection = http1
                            .serve_connection(TokioIo::new(stream), service)
                            .with_upgrades();
                        until_closed(
                            connection,
                            &closing,
                            http1::UpgradeableConnection::graceful_shutdown,
                        )
                        .await
                    }
                    None => Ok(()),
                };
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "client connection ended with an error");
                }
            };
            tokio::select! {
                () = served => {}
                // Dropping the connection drops its requests, and with them their in-flight
                // counts and endpoint leases.
                () = force_close.cancelled() => {}
            }
            drop(open);
        });
    }
}

/// Serves `connection` to its end; once `closing` is cancelled, asks it to finish the requests
/// it has and close (`graceful_shutdown`), and serves it until then.
async fn until_closed<C>(
    connection: C,
    closing: &CancellationToken,
    graceful_shutdown: fn(Pin<&mut C>),
) -> hyper::Result<()>
where
    C: Future<Output = hyper::Result<()>>,
{
    let mut connection = pin!(connection);
    tokio::select! {
        result = connection.as_mut() => result,
        () = closing.cancelled() => {
            graceful_shutdown(connection.as_mut());
            connection.await
        }
    }
}

enum Protocol {
    Http1,
    Http2,
}

/// Serves one client connection on any byte stream with the listener's HTTP/1.1 and HTTP/2
/// settings, as if `peer` had connected: HTTP/2 when the stream begins with the HTTP/2 preface
/// (`http2`), HTTP/1.1 otherwise. There is no drain: it ends when the connection does. For
/// driving the proxy from bytes in memory (the fuzzer of the HTTP edge, tests), where no
/// socket is there to peek at.
pub async fn serve_io<I>(io: I, proxy: &Proxy, peer: SocketAddr, http2: bool) -> hyper::Result<()>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let connections = Connections::new();
    let service = proxy.connection(peer);
    if http2 {
        connections
            .http2
            .serve_connection(TokioIo::new(io), service)
            .await
    } else {
        connections
            .http1
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
            .await
    }
}

/// Tells HTTP/2 with prior knowledge from HTTP/1 by peeking at the first bytes, which stay in
/// the socket for hyper to read. `None`: the client closed, sent nothing in time, or the drain
/// began before it sent anything.
async fn protocol(stream: &TcpStream, closing: &CancellationToken) -> Option<Protocol> {
    let decide = async {
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
    };
    tokio::select! {
        protocol = tokio::time::timeout(HEADER_READ_TIMEOUT, decide) => protocol.ok().flatten(),
        () = closing.cancelled() => None,
    }
}

/// Serves `listener` until `shutdown`, then stops accepting and lets open connections (and
/// the upgraded ones, such as WebSockets) finish their requests for at most the drain timeout
/// in force then; whatever is still open after it is closed.
pub async fn serve(listener: TcpListener, proxy: Proxy, shutdown: CancellationToken) {
    let connections = Connections::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
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
                connections.spawn(stream, &proxy, peer);
            }
            () = shutdown.cancelled() => break,
        }
    }
    drop(listener);
    connections.closing.cancel();
    let drain = *proxy.shared().drain_timeout.borrow();
    let tunnels = &proxy.shared().tunnels;
    let drained = async {
        connections.open.closed().await;
        tunnels.closed().await;
    };
    tokio::select! {
        () = drained => tracing::debug!("all client connections closed"),
        () = tokio::time::sleep(drain) => {
            tracing::warn!(after = ?drain, "drain timeout: closing remaining client connections");
            connections.force_close.cancel();
            tunnels.cut();
        }
    }
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
        listeners: Vec<std::net::TcpListener>,
        shared: &Arc<Shared>,
        shutdown: &CancellationToken,
    ) -> io::Result<Self> {
        // Should a later worker fail to start, the ones already running stop at once.
        let stop = shutdown.child_token();
        let mut done = Vec::with_capacity(listeners.len());
        for (i, listener) in listeners.into_iter().enumerate() {
            let spawned = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|runtime| {
                    let (finished, finished_rx) = oneshot::channel();
                    let proxy = Proxy::for_worker(shared.clone());
                    let stop = stop.clone();
                    std::thread::Builder::new()
                        .name(format!("wakegate-proxy-{i}"))
                        .spawn(move || {
                            runtime.block_on(async move {
                                match TcpListener::from_std(listener) {
                                    Ok(listener) => serve(listener, proxy, stop).await,
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
