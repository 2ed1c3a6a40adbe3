//! The demo backend's gRPC side: `wakegate.demo.v1.Echo` (one method of each call kind, see
//! `proto/wakegate/demo/v1/echo.proto`) and the standard health service, served on the same
//! port as its HTTP routes to requests with a gRPC content type.

use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use futures_util::stream::{self, StreamExt};
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status, Streaming};

/// The generated messages, server and client.
pub mod pb {
    tonic::include_proto!("wakegate.demo.v1");
}

use pb::{EchoReply, EchoRequest};

/// The gRPC routes of a demo backend listening on `port`: Echo and grpc.health.v1 (which
/// answers `SERVING` for the server and for `wakegate.demo.v1.Echo`).
pub async fn routes(port: u16) -> tonic::service::Routes {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<pb::echo_server::EchoServer<Echo>>()
        .await;
    tonic::service::Routes::new(pb::echo_server::EchoServer::new(Echo { port })).add_service(health)
}

/// Whether `content-type` asks for gRPC.
pub fn is_grpc(req: &http::Request<hyper::body::Incoming>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// `wakegate.demo.v1.Echo`, answering as the instance on `port`.
pub struct Echo {
    port: u16,
}

impl Echo {
    pub fn new(port: u16) -> Self {
        Self { port }
    }
}

type Replies = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

impl Echo {
    fn reply(&self, req: &EchoRequest, requests: u32, bytes: u64, payload: Vec<u8>) -> EchoReply {
        EchoReply {
            message: req.message.clone(),
            pid: std::process::id(),
            port: u32::from(self.port),
            bytes,
            requests,
            payload,
        }
    }
}

/// The status `fail_with` asks for, with the request's message and a custom trailer.
fn failure(req: &EchoRequest) -> Option<Status> {
    if req.fail_with == 0 {
        return None;
    }
    let mut status = Status::new(Code::from(req.fail_with as i32), req.message.clone());
    status
        .metadata_mut()
        .insert("x-demo-failed", MetadataValue::from(req.fail_with));
    Some(status)
}

async fn delay(req: &EchoRequest) {
    if req.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(u64::from(req.delay_ms))).await;
    }
}

#[tonic::async_trait]
impl pb::echo_server::Echo for Echo {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let req = request.into_inner();
        delay(&req).await;
        if let Some(status) = failure(&req) {
            return Err(status);
        }
        let bytes = req.payload.len() as u64;
        let mut response = Response::new(self.reply(&req, 1, bytes, req.payload.clone()));
        response
            .metadata_mut()
            .insert("x-demo-pid", MetadataValue::from(std::process::id()));
        Ok(response)
    }

    type ServerStreamStream = Replies;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Replies>, Status> {
        let req = request.into_inner();
        let first = self.reply(&req, 1, req.payload.len() as u64, Vec::new());
        let replies = stream::unfold((req, first, 0u32), |(req, mut reply, sent)| async move {
            if sent < req.count {
                delay(&req).await;
                let mut next = reply.clone();
                next.message = format!("{} {}", req.message, sent + 1);
                next.payload = req.payload.clone();
                reply.requests = 1;
                return Some((Ok(next), (req, reply, sent + 1)));
            }
            // After the replies: the status asked for, once.
            let status = failure(&req)?;
            let done = EchoRequest {
                fail_with: 0,
                ..req
            };
            Some((Err(status), (done, reply, sent)))
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let mut requests = request.into_inner();
        let (mut count, mut bytes, mut last) = (0u32, 0u64, EchoRequest::default());
        while let Some(req) = requests.message().await? {
            count += 1;
            bytes += req.payload.len() as u64;
            last = EchoRequest {
                payload: Vec::new(),
                ..req
            };
        }
        delay(&last).await;
        if let Some(status) = failure(&last) {
            return Err(status);
        }
        Ok(Response::new(self.reply(&last, count, bytes, Vec::new())))
    }

    type BidiStream = Replies;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Replies>, Status> {
        let requests = request.into_inner();
        let (port, pid) = (u32::from(self.port), std::process::id());
        let replies = stream::unfold(
            (requests, 0u32, 0u64, false),
            move |(mut requests, count, bytes, ended)| async move {
                if ended {
                    return None;
                }
                match requests.message().await {
                    Ok(Some(req)) => {
                        delay(&req).await;
                        let (count, bytes) = (count + 1, bytes + req.payload.len() as u64);
                        if let Some(status) = failure(&req) {
                            return Some((Err(status), (requests, count, bytes, true)));
                        }
                        let reply = EchoReply {
                            message: req.message,
                            pid,
                            port,
                            bytes,
                            requests: count,
                            payload: req.payload,
                        };
                        Some((Ok(reply), (requests, count, bytes, false)))
                    }
                    Ok(None) => None,
                    Err(status) => Some((Err(status), (requests, count, bytes, true))),
                }
            },
        );
        Ok(Response::new(replies.boxed()))
    }
}
