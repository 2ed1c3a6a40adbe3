//! Accepting client connections: HTTP/1.1 and h2c (prior knowledge) on one port, upgrades
//! enabled, and a graceful drain on shutdown; one single-threaded runtime per worker thread,
//! each with its own listening socket of one `SO_REUSEPORT` group.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::Proxy;

/// Serves `listener` until `shutdown`, then stops accepting and lets open connections (and
/// the upgraded ones, such as WebSockets) finish their requests for at most `drain`; whatever
/// is still open then is closed.
pub async fn serve(
    listener: TcpListener,
    proxy: Proxy,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let graceful = GracefulShutdown::new();
    let force_close = CancellationToken::new();
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
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), proxy.connection(peer))
                    .into_owned();
                let connection = graceful.watch(connection);
                let force_close = force_close.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        result = connection => if let Err(error) = result {
                            tracing::debug!(%peer, %error, "client connection ended with an error");
                        },
                        // Dropping the connection drops its requests, and with them their
                        // in-flight counts and endpoint leases.
                        () = force_close.cancelled() => {}
                    }
                });
            }
            () = shutdown.cancelled() => break,
        }
    }
    drop(listener);
    let tunnels = proxy.tunnels();
    let drained = async {
        graceful.shutdown().await;
        tunnels.closed().await;
    };
    tokio::select! {
        () = drained => tracing::debug!("all client connections closed"),
        () = tokio::time::sleep(drain) => {
            tracing::warn!(after = ?drain, "drain timeout: closing remaining client connections");
            force_close.cancel();
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
    /// `shutdown`, then drains as [`serve`] does. Each worker has its own upstream connection
    /// pool, so a request never leaves the thread that accepted its connection.
    pub fn spawn(
        listeners: Vec<std::net::TcpListener>,
        proxy: &Proxy,
        shutdown: &CancellationToken,
        drain: Duration,
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
                    let proxy = proxy.for_worker();
                    let stop = stop.clone();
                    std::thread::Builder::new()
                        .name(format!("wakegate-proxy-{i}"))
                        .spawn(move || {
                            runtime.block_on(async move {
                                match TcpListener::from_std(listener) {
                                    Ok(listener) => serve(listener, proxy, stop, drain).await,
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
