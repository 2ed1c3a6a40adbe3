//! gRPC through wakegate with a real gRPC stack (tonic) on both sides: the four call kinds and
//! their trailers through a cold local target and a fixed upstream, the call's own deadline
//! while it is held, the gRPC statuses wakegate answers with itself, many streams on few
//! upstream connections, GOAWAY under load, and large streamed messages.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};
use wakegate::demo::grpc::pb::echo_client::EchoClient;
use wakegate::demo::grpc::pb::{EchoReply, EchoRequest};
use wakegate_test_support::{DemoBackend, Wakegate, bin, metric, within};

/// A gRPC channel to wakegate's proxy that asks for `host` (its `:authority`).
async fn channel(wakegate: &Wakegate, host: &str) -> Channel {
    Endpoint::from_shared(format!("http://{}", wakegate.proxy))
        .unwrap()
        .origin(format!("http://{host}").parse().unwrap())
        .connect()
        .await
        .expect("connect to wakegate")
}

fn echo(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_owned(),
        ..EchoRequest::default()
    }
}

/// A local gRPC target running the demo backend (h2c, gRPC readiness).
fn grpc_target(name: &str, host: &str, startup_delay: &str, extra: &str) -> String {
    let bin = bin();
    format!(
        r#"
[[target]]
name = "{name}"
hosts = ["{host}"]
command = ["{bin}", "demo-backend", "--port", "{{port}}", "--startup-delay", "{startup_delay}"]
protocol = "h2c"
ready = {{ grpc = "wakegate.demo.v1.Echo" }}
cold_start_timeout = "20s"
{extra}
"#
    )
}

/// Every call kind on `client`, with what a user checks of each: replies, their order, and the
/// status, message and custom metadata a failing stream ends with (its trailers).
async fn all_four_call_kinds(client: &mut EchoClient<Channel>) {
    let reply = client.unary(echo("one")).await.expect("unary");
    assert!(
        reply.metadata().contains_key("x-demo-pid"),
        "{:?}",
        reply.metadata()
    );
    let reply = reply.into_inner();
    assert_eq!(reply.message, "one");
    assert!(reply.pid > 0);

    let request = EchoRequest {
        count: 5,
        ..echo("down")
    };
    let replies: Vec<EchoReply> = client
        .server_stream(request)
        .await
        .expect("server stream")
        .into_inner()
        .map(|r| r.expect("a reply"))
        .collect()
        .await;
    let messages: Vec<&str> = replies.iter().map(|r| r.message.as_str()).collect();
    assert_eq!(messages, ["down 1", "down 2", "down 3", "down 4", "down 5"]);

    let upload = futures_util::stream::iter((0..7).map(|i| EchoRequest {
        payload: vec![i; 1000],
        ..echo("up")
    }));
    let summary = client
        .client_stream(upload)
        .await
        .expect("client stream")
        .into_inner();
    assert_eq!((summary.requests, summary.bytes), (7, 7000));

    let (to_server, requests) = tokio::sync::mpsc::channel(1);
    let mut replies = client
        .bidi(tokio_stream_from(requests))
        .await
        .expect("bidi")
        .into_inner();
    for i in 1..=3u32 {
        to_server.send(echo(&format!("ping {i}"))).await.unwrap();
        let reply = replies
            .message()
            .await
            .expect("a reply")
            .expect("not ended");
        assert_eq!(
            (reply.message.as_str(), reply.requests),
            (&*format!("ping {i}"), i)
        );
    }
    drop(to_server);
    assert!(replies.message().await.expect("a clean end").is_none());

    // A stream that ends with an error after its replies: the status, its message and the
    // custom metadata arrive as trailers.
    let failing = EchoRequest {
        count: 2,
        fail_with: Code::FailedPrecondition as u32,
        ..echo("asked to fail")
    };
    let mut replies = client
        .server_stream(failing)
        .await
        .expect("server stream")
        .into_inner();
    assert!(replies.message().await.unwrap().is_some());
    assert!(replies.message().await.unwrap().is_some());
    let status = replies.message().await.expect_err("the stream's status");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(status.message(), "asked to fail");
    assert_eq!(status.metadata().get("x-demo-failed").unwrap(), "9");
}

/// A client on one plain HTTP/2 connection to wakegate's proxy, asking for `host`.
async fn untimed_client(
    wakegate: &Wakegate,
    host: &str,
) -> EchoClient<
    impl tonic::client::GrpcService<
        tonic::body::Body,
        ResponseBody = hyper::body::Incoming,
        Error = hyper::Error,
        Future: Send,
    > + Clone,
> {
    let stream = tokio::net::TcpStream::connect(wakegate.proxy)
        .await
        .unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let service = tower::service_fn(move |req| {
        let mut sender: hyper::client::conn::http2::SendRequest<tonic::body::Body> = sender.clone();
        async move { sender.send_request(req).await }
    });
    EchoClient::with_origin(service, format!("http://{host}").parse().unwrap())
}

/// A receiver as the stream of requests a streaming call sends.
fn tokio_stream_from(
    mut requests: tokio::sync::mpsc::Receiver<EchoRequest>,
) -> impl futures_util::Stream<Item = EchoRequest> {
    futures_util::stream::poll_fn(move |cx| requests.poll_recv(cx))
}

#[tokio::test]
async fn all_four_call_kinds_pass_through_a_cold_local_target_with_their_trailers() {
    let wakegate = Wakegate::start("", &grpc_target("echo", "echo.localhost", "200ms", "")).await;
    let channel = channel(&wakegate, "echo.localhost").await;
    let mut client = EchoClient::new(channel);
    // The first call is held while the instance starts.
    let first = within(20, "the first call", client.unary(echo("wake"))).await;
    let first = first.unwrap_or_else(|s| panic!("{s:?}\n{}", wakegate.logs()));
    assert_eq!(
        first.metadata().get("x-wakegate-cold-start").unwrap(),
        "true"
    );
    within(20, "every call kind", all_four_call_kinds(&mut client)).await;
    let metrics = wakegate.metrics().await;
    assert_eq!(
        metric(&metrics, "wakegate_cold_starts_total", "service=\"echo\""),
        Some(1.0)
    );
}

#[tokio::test]
async fn all_four_call_kinds_pass_through_a_fixed_h2c_upstream() {
    let backend = DemoBackend::start().await;
    let target = format!(
        r#"
[[target]]
name = "fixed"
hosts = ["fixed.localhost"]
upstream = "{}"
protocol = "h2c"
"#,
        backend.addr
    );
    let wakegate = Wakegate::start("", &target).await;
    let mut client = EchoClient::new(channel(&wakegate, "fixed.localhost").await);
    within(20, "every call kind", all_four_call_kinds(&mut client)).await;
}

#[tokio::test]
async fn a_call_held_past_its_own_deadline_ends_with_deadline_exceeded_at_that_deadline() {
    let wakegate = Wakegate::start("", &grpc_target("slow", "slow.localhost", "10s", "")).await;
    // The deadline as the call's `grpc-timeout` alone, on a client without a timer of its own:
    // tonic's channel would end the call itself at the same moment, hiding wakegate's answer.
    let mut client = untimed_client(&wakegate, "slow.localhost").await;
    let mut request = Request::new(echo("in a hurry"));
    request
        .metadata_mut()
        .insert("grpc-timeout", "300m".parse().unwrap());
    let started = Instant::now();
    let status = client.unary(request).await.expect_err("deadline");
    let took = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("deadline"),
        "{:?}",
        status.message()
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let metrics = wakegate.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "wakegate_rejected_requests_total",
            "reason=\"deadline_exceeded\""
        ),
        Some(1.0),
        "{metrics}"
    );
}
