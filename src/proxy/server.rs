//! Accepting client connections: HTTP/1.1 and h2c (prior knowledge) on one port, upgrades
//! enabled, and a graceful drain on shutdown.

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{ConnectionService, Proxy};

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
                let service = TowerToHyperService::new(ConnectionService { proxy: proxy.clone(), peer });
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
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
