//! An upstream that records every request it receives in full, so a test can assert what
//! reached it (and that a refused request never did).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// One request as the upstream received it, body and trailers read to their end.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The request target as sent (origin-form normally).
    pub uri: String,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

/// An HTTP/1.1 upstream on a loopback port recording what it receives. It answers
/// `/status/NNN` with that status (no body for 1xx, 204 and 304) and anything else with 200
/// and the body `ok`. Stops with the test (dropped).
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingUpstream {
    pub async fn start() -> RecordingUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sink = sink.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let sink = sink.clone();
                        async move { Ok::<_, std::convert::Infallible>(record(req, &sink).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        RecordingUpstream {
            addr,
            received,
            task,
        }
    }

    /// Every request received in full so far, in order.
    pub fn received(&self) -> Vec<Recorded> {
        self.received.lock().unwrap().clone()
    }

    /// The request targets received so far.
    pub fn uris(&self) -> Vec<String> {
        self.received().into_iter().map(|r| r.uri).collect()
    }

    /// Forgets what was received (between the cases of one test).
    pub fn clear(&self) {
        self.received.lock().unwrap().clear();
    }
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(req: Request<Incoming>, sink: &Mutex<Vec<Recorded>>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    // A body that fails (the client side broke off) is no request received.
    let Ok(collected) = body.collect().await else {
        return Response::new(Full::default());
    };
    let trailers = collected.trailers().cloned();
    let path = parts.uri.path().to_owned();
    sink.lock().unwrap().push(Recorded {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        version: parts.version,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    });
    let status = path
        .strip_prefix("/status/")
        .and_then(|code| code.parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::OK);
    let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
    *response.status_mut() = status;
    if matches!(status.as_u16(), 204 | 304) {
        *response.body_mut() = Full::default();
    } else {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
    }
    response
}
