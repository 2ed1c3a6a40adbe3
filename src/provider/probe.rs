//! Probing an endpoint as a readiness or health check says (`{ tcp = true }`,
//! `{ http_get = "/path" }`, `{ grpc = true }`): one connection and at most one request, within
//! a second. Local instances are probed as they start, fixed upstreams by their active check.

use std::time::Duration;

use http::uri::Authority;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::config::{Protocol, ReadyCheck};

/// What a probe's requests say they are.
const USER_AGENT: &str = "wakegate-probe";

/// One probe, connect included, within a second; Err: what it saw, in a few words.
pub async fn probe(
    check: &ReadyCheck,
    protocol: Protocol,
    authority: &Authority,
) -> Result<(), String> {
    let probe = async {
        let stream = TcpStream::connect(authority.as_str())
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::ConnectionRefused => format!("nothing listens on {authority}"),
                _ => format!("cannot connect to {authority}: {e}"),
            })?;
        match check {
            ReadyCheck::HttpGet(path) => http_get(stream, protocol, authority, path).await,
            ReadyCheck::Grpc(service) => grpc_serving(stream, authority, service).await,
            ReadyCheck::Tcp | ReadyCheck::Notify => Ok(()),
        }
    };
    tokio::time::timeout(Duration::from_secs(1), probe)
        .await
        .unwrap_or_else(|_| Err("no answer within 1s".to_owned()))
}

/// `GET path` in the target's protocol answers 2xx or 3xx.
async fn http_get(
    stream: TcpStream,
    protocol: Protocol,
    authority: &Authority,
    path: &str,
) -> Result<(), String> {
    let failed = |e: hyper::Error| format!("GET {path} failed: {e}");
    let io = TokioIo::new(stream);
    let response = match protocol {
        Protocol::Http1 => {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(io)
                    .await
                    .map_err(failed)?;
            tokio::spawn(connection);
            let request = http::Request::get(path)
                .header(http::header::HOST, authority.as_str())
                .header(http::header::USER_AGENT, USER_AGENT)
                .body(Empty::new())
                .map_err(|e| format!("GET {path}: {e}"))?;
            sender.send_request(request).await.map_err(failed)?
        }
        Protocol::H2c => {
            let (mut sender, connection) = hyper::client::conn::http2::handshake::<
                _,
                _,
                Empty<bytes::Bytes>,
            >(TokioExecutor::new(), io)
            .await
            .map_err(failed)?;
            tokio::spawn(connection);
            let request = http::Request::get(format!("http://{authority}{path}"))
                .header(http::header::USER_AGENT, USER_AGENT)
                .body(Empty::new())
                .map_err(|e| format!("GET {path}: {e}"))?;
            sender.send_request(request).await.map_err(failed)?
        }
    };
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("GET {path} answered {status}"))
    }
}

/// The standard gRPC health service answers `SERVING` for `service` (`grpc.health.v1`).
async fn grpc_serving(
    stream: TcpStream,
    authority: &Authority,
    service: &str,
) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let failed = |e: &dyn std::fmt::Display| format!("gRPC health check failed: {e}");
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, tonic::body::Body>(TokioIo::new(stream))
        .await
        .map_err(|e| failed(&e))?;
    tokio::spawn(connection);
    let origin = format!("http://{authority}")
        .parse()
        .map_err(|e| failed(&e))?;
    let mut client = HealthClient::with_origin(Http2Service(sender), origin);
    let request = tonic::Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    let status = client
        .check(request)
        .await
        .map_err(|e| failed(&e))?
        .into_inner()
        .status;
    if status == ServingStatus::Serving as i32 {
        return Ok(());
    }
    let name = ServingStatus::try_from(status).map_or("an unknown status", |s| s.as_str_name());
    Err(format!("gRPC health answered {name}"))
}

/// One HTTP/2 connection as the service a tonic client calls.
struct Http2Service(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Http2Service {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, hyper::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}
