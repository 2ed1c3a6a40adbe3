//! The built-in demo backend (`wakegate demo-backend`): a small HTTP server with a
//! configurable start-up delay, used by the examples, tests and load tests. Once it listens it
//! says so with `READY=1` to `$NOTIFY_SOCKET`, when that is set (systemd's `sd_notify`).
//!
//! `/` says hello with its pid and port, `/healthz` answers `ok`, `/echo` streams the request
//! body back, `/sleep?ms=N` answers after N milliseconds, `/headers` returns the request
//! headers as JSON, `/trailers` answers with the request's trailers as response trailers,
//! `/events` is a server-sent event stream (one event at once, then one every `?every=`
//! duration, or none more without it), `/concurrency` tells how many requests it is handling and the most it ever handled at once
//! (`{"in_flight": 1, "max": 3}`; neither counts `/healthz` nor `/concurrency`), and
//! `/ws` is a WebSocket echo. Requests with a gRPC content type go to its gRPC services
//! ([`grpc`]): `wakegate.demo.v1.Echo` and `grpc.health.v1.Health`.

pub mod grpc;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

type Body = UnsyncBoxBody<Bytes, BoxError>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Waits `startup_delay` (a slow application booting), then notifies readiness and serves on
/// `addr` until `shutdown` resolves.
pub async fn run(
    addr: SocketAddr,
    startup_delay: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::time::sleep(startup_delay).await;
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    println!(
        "demo-backend listening on {local} (pid {})",
        std::process::id()
    );
    if let Err(e) = notify_ready() {
        eprintln!("demo-backend: cannot send READY=1 to $NOTIFY_SOCKET: {e}");
    }
    let builder = auto::Builder::new(TokioExecutor::new());
    let grpc = grpc::routes(local.port()).await;
    let load = Arc::new(Load::default());
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = &mut shutdown => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let port = local.port();
        let grpc = grpc.clone();
        let load = load.clone();
        let service = hyper::service::service_fn(move |req| {
            let mut grpc = grpc.clone();
            let load = load.clone();
            async move {
                if grpc::is_grpc(&req) {
                    use tonic::codegen::Service;
                    std::future::poll_fn(|cx| {
                        Service::<Request<Incoming>>::poll_ready(&mut grpc, cx)
                    })
                    .await?;
                    let response = grpc.call(req).await?;
                    return Ok(response.map(|body| body.map_err(BoxError::from).boxed_unsync()));
                }
                let path = req.uri().path();
                if path == "/concurrency" {
                    return Ok(load.report());
                }
                let _counted = (path != "/healthz").then(|| load.begin());
                handle(req, port).await
            }
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}

/// Sends `READY=1` to `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace), if set.
fn notify_ready() -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    let Some(address) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let to = match address.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(&address)?,
    };
    UnixDatagram::unbound()?.send_to_addr(b"READY=1", &to)?;
    Ok(())
}

/// Requests being handled (until their response head), and the most there ever were at once.
#[derive(Debug, Default)]
struct Load {
    in_flight: AtomicU64,
    max: AtomicU64,
}

impl Load {
    fn begin(&self) -> Handling<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        Handling(self)
    }

    fn report(&self) -> Response<Body> {
        let body = serde_json::json!({
            "in_flight": self.in_flight.load(Ordering::SeqCst),
            "max": self.max.load(Ordering::SeqCst),
        });
        full(StatusCode::OK, format!("{body}\n"))
    }
}

/// One request counted in [`Load`] until dropped.
struct Handling<'a>(&'a Load);

impl Drop for Handling<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(
        Full::new(body.into())
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response
}

async fn handle(mut req: Request<Incoming>, port: u16) -> Result<Response<Body>, Infallible> {
    let response = match req.uri().path() {
        "/" => full(
            StatusCode::OK,
            format!(
                "hello from demo-backend (pid {}, port {port})\n",
                std::process::id()
            ),
        ),
        "/healthz" => full(StatusCode::OK, "ok\n"),
        "/echo" => Response::new(req.into_body().map_err(BoxError::from).boxed_unsync()),
        "/trailers" => {
            // The body is read whole, then sent back with the request's trailers (if any)
            // as response trailers, and one of its own.
            let collected = match req.into_body().collect().await {
                Ok(collected) => collected,
                Err(error) => return Ok(full(StatusCode::BAD_REQUEST, error.to_string())),
            };
            let mut trailers = collected.trailers().cloned().unwrap_or_default();
            trailers.insert("x-demo-trailer", header::HeaderValue::from_static("done"));
            let names: Vec<&str> = trailers.keys().map(|k| k.as_str()).collect();
            let announced = header::HeaderValue::from_str(&names.join(", "))
                .expect("header names are a valid header value");
            let body = http_body_util::StreamBody::new(futures_util::stream::iter([
                Ok::<_, BoxError>(hyper::body::Frame::data(collected.to_bytes())),
                Ok(hyper::body::Frame::trailers(trailers)),
            ]));
            let mut response = Response::new(BodyExt::boxed_unsync(body));
            response.headers_mut().insert(header::TRAILER, announced);
            response
        }
        "/sleep" => {
            let ms = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
                .and_then(|v| v.parse::<u64>().ok());
            match ms {
                Some(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    full(StatusCode::OK, format!("slept {ms} ms\n"))
                }
                None => full(StatusCode::BAD_REQUEST, "expected ?ms=N\n"),
            }
        }
        "/headers" => {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                .collect();
            full(
                StatusCode::OK,
                serde_json::Value::Object(headers).to_string(),
            )
        }
        "/events" => events(req.uri().query()),
        "/ws" => websocket(&mut req),
        _ => full(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(response)
}

/// Server-sent events: `data: 1` at once, then the next one every `?every=` (a duration such
/// as `500ms`), or nothing more (a stream that stays open and silent) without it.
fn events(query: Option<&str>) -> Response<Body> {
    let every = query
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("every=")))
        .map(humantime::parse_duration);
    let every = match every {
        None => None,
        Some(Ok(every)) if !every.is_zero() => Some(every),
        Some(_) => return full(StatusCode::BAD_REQUEST, "expected ?every=DURATION\n"),
    };
    let events = futures_util::stream::unfold(1u64, move |n| async move {
        if n > 1 {
            match every {
                Some(every) => tokio::time::sleep(every).await,
                None => std::future::pending::<()>().await,
            }
        }
        let event = Bytes::from(format!("data: {n}\n\n"));
        Some((Ok::<_, BoxError>(hyper::body::Frame::data(event)), n + 1))
    });
    let mut response = Response::new(BodyExt::boxed_unsync(http_body_util::StreamBody::new(
        events,
    )));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    response
}

/// Accepts a WebSocket upgrade and echoes every message back.
fn websocket(req: &mut Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key") else {
        return full(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade\n");
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() {
                break;
            }
            if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut response = full(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    let headers = response.headers_mut();
    headers.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    headers.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    headers.insert(
        "sec-websocket-accept",
        header::HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    response
}
