//! gRPC through wakegate with a real gRPC stack (tonic) on both sides: the four call kinds and
//! their trailers through a cold local target and a fixed upstream, the call's own deadline
//! while it is held, the gRPC statuses wakegate answers with itself, many streams on few
//! upstream connections, GOAWAY under load, and large streamed messages.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};
use wakegate::demo::grpc::Echo;
use wakegate::demo::grpc::pb::echo_client::EchoClient;
use wakegate::demo::grpc::pb::echo_server::EchoServer;
use wakegate::demo::grpc::pb::{EchoReply, EchoRequest};
use wakegate_test_support::{DemoBackend, Wakegate, bin, metric, raw_exchange, raw_status, within};

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
    > + Clone
    + use<>,
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

/// The status a call through wakegate ends with, on a client without a timer of its own.
async fn status_of(wakegate: &Wakegate, host: &str) -> tonic::Status {
    let mut client = untimed_client(wakegate, host).await;
    within(20, "the call's status", client.unary(echo("hello")))
        .await
        .expect_err("wakegate answers with a gRPC error")
}

fn assert_status(status: &tonic::Status, code: Code, says: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(says),
        "{code:?}: {:?} should say {says:?}",
        status.message()
    );
}

#[tokio::test]
async fn wakegate_answers_grpc_calls_it_cannot_serve_with_grpc_statuses() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let targets = format!(
        r#"
{}
{}
[[target]]
name = "crashes"
hosts = ["crashes.localhost"]
command = ["sh", "-c", "exit 3"]
protocol = "h2c"

[[target]]
name = "refused"
hosts = ["refused.localhost"]
upstream = "{closed}"
protocol = "h2c"
"#,
        grpc_target("full", "full.localhost", "30s", "max_pending = 1"),
        grpc_target(
            "late",
            "late.localhost",
            "30s",
            "cold_start_timeout = \"300ms\""
        ),
    );
    let wakegate = Wakegate::start("", &targets).await;

    assert_status(
        &status_of(&wakegate, "nothing.localhost").await,
        Code::Unimplemented,
        "no route",
    );
    assert_status(
        &status_of(&wakegate, "late.localhost").await,
        Code::DeadlineExceeded,
        "did not become ready within 300ms",
    );
    assert_status(
        &status_of(&wakegate, "crashes.localhost").await,
        Code::Unavailable,
        "failed to start",
    );
    assert_status(
        &status_of(&wakegate, "refused.localhost").await,
        Code::Unavailable,
        "failed before responding",
    );

    // One call held (the hold takes one); the next is refused at once.
    let mut held = untimed_client(&wakegate, "full.localhost").await;
    let held = tokio::spawn(async move { held.unary(echo("first")).await });
    wakegate
        .wait_for_target("full", Duration::from_secs(10), |t| t["pending"] == 1)
        .await;
    assert_status(
        &status_of(&wakegate, "full.localhost").await,
        Code::ResourceExhausted,
        "already holds 1 waiting requests",
    );
    held.abort();
}

/// An in-process gRPC upstream (the demo's Echo service, served by hyper's HTTP/2 server)
/// that counts its connections and records the `x-call-id` of every call it processes; with
/// `goaway_after`, it ends each connection gracefully (GOAWAY) after that many calls, as
/// servers with a per-connection request limit do.
struct Upstream {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    calls: Arc<Mutex<Vec<String>>>,
}

async fn upstream(goaway_after: Option<usize>) -> Upstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = tonic::service::Routes::new(EchoServer::new(Echo::new(addr.port())));
    let connections = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let (accepted, recorded) = (connections.clone(), calls.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            let served = Arc::new(AtomicUsize::new(0));
            let enough = Arc::new(tokio::sync::Notify::new());
            let (routes, recorded, notify) = (routes.clone(), recorded.clone(), enough.clone());
            let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                if let Some(id) = req.headers().get("x-call-id") {
                    recorded
                        .lock()
                        .unwrap()
                        .push(id.to_str().unwrap().to_owned());
                }
                if Some(served.fetch_add(1, Ordering::SeqCst) + 1) == goaway_after {
                    notify.notify_one();
                }
                tower::ServiceExt::oneshot(routes.clone(), req)
            });
            tokio::spawn(async move {
                let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service);
                let mut connection = std::pin::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => {}
                    () = enough.notified() => {
                        connection.as_mut().graceful_shutdown();
                        let _ = connection.await;
                    }
                }
            });
        }
    });
    Upstream {
        addr,
        connections,
        calls,
    }
}

fn fixed_h2c(name: &str, addr: std::net::SocketAddr) -> String {
    format!(
        "[[target]]\nname = \"{name}\"\nhosts = [\"{name}.localhost\"]\nupstream = \"{addr}\"\n\
         protocol = \"h2c\"\n"
    )
}

/// `calls` unary calls at once, spread over `channels` client connections to wakegate, each
/// with its own `x-call-id`; the replies' messages.
async fn concurrent_calls(
    wakegate: &Wakegate,
    host: &str,
    channels: usize,
    calls: std::ops::Range<usize>,
    delay_ms: u32,
) -> Vec<Result<String, tonic::Status>> {
    let mut clients = Vec::new();
    for _ in 0..channels {
        clients.push(EchoClient::new(channel(wakegate, host).await));
    }
    let calls = calls.map(|i| {
        let mut client = clients[i % channels].clone();
        async move {
            let mut request = Request::new(EchoRequest {
                delay_ms,
                ..echo(&format!("call {i}"))
            });
            request
                .metadata_mut()
                .insert("x-call-id", i.to_string().parse().unwrap());
            client.unary(request).await.map(|r| r.into_inner().message)
        }
    });
    futures_util::future::join_all(calls).await
}

#[tokio::test]
async fn a_thousand_concurrent_streams_share_a_few_upstream_connections() {
    let upstream = upstream(None).await;
    let wakegate = Wakegate::start("", &fixed_h2c("many", upstream.addr)).await;
    // hyper's server (as tonic's) allows 200 streams per connection: 1,000 at once need 5.
    let results = within(
        60,
        "1,000 concurrent calls",
        concurrent_calls(&wakegate, "many.localhost", 10, 0..1000, 500),
    )
    .await;
    for (i, result) in results.iter().enumerate() {
        assert_eq!(
            result.as_deref().ok(),
            Some(&*format!("call {i}")),
            "{result:?}"
        );
    }
    let connections = upstream.connections.load(Ordering::SeqCst);
    // Each proxy worker has its own connections, at most 4 per endpoint; more than one was
    // opened because one connection's streams ran out.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        (2..=4 * workers).contains(&connections),
        "{connections} upstream connections for 1,000 streams ({workers} workers)"
    );
}

#[tokio::test]
async fn an_upstream_that_sends_goaway_under_load_loses_no_call_and_processes_none_twice() {
    let upstream = upstream(Some(25)).await;
    let wakegate = Wakegate::start("", &fixed_h2c("leaving", upstream.addr)).await;
    // Waves of 20 calls at once: each connection ends after 25 calls while later waves keep
    // coming, so calls meet connections that are going away.
    let mut results = Vec::new();
    for wave in 0..25 {
        let ids = wave * 20..(wave + 1) * 20;
        let wave = concurrent_calls(&wakegate, "leaving.localhost", 2, ids, 5);
        results.extend(within(20, "a wave of calls across GOAWAYs", wave).await);
    }
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    let mut calls = upstream.calls.lock().unwrap().clone();
    calls.sort_by_key(|id| id.parse::<usize>().unwrap());
    let expected: Vec<String> = (0..500).map(|i| i.to_string()).collect();
    assert_eq!(calls, expected, "every call processed exactly once");
    // Without GOAWAY, the calls would have needed at most 4 connections per worker.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let connections = upstream.connections.load(Ordering::SeqCst);
    assert!(
        connections > 4 * workers,
        "only {connections} connections: no GOAWAY?"
    );
}

/// The most memory the process has held (`VmHWM`), in KiB.
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[tokio::test]
async fn fifty_mebibytes_stream_both_ways_without_wakegate_holding_them() {
    const MIB: usize = 1024 * 1024;
    let backend = DemoBackend::start().await;
    let wakegate = Wakegate::start("", &fixed_h2c("big", backend.addr)).await;
    let mut client = EchoClient::new(channel(&wakegate, "big.localhost").await);
    client.unary(echo("warm up")).await.expect("a first call");
    let before = peak_rss_kib(wakegate.pid());

    let upload = futures_util::stream::iter((0..50).map(|_| EchoRequest {
        payload: vec![7; MIB],
        ..echo("up")
    }));
    let summary = within(60, "a 50 MiB upload", client.client_stream(upload))
        .await
        .expect("client stream")
        .into_inner();
    assert_eq!((summary.requests, summary.bytes), (50, 50 * MIB as u64));

    // A slow reader: the upstream sends 50 MiB, the client takes a message every 20 ms.
    let request = EchoRequest {
        count: 50,
        payload: vec![9; MIB],
        ..echo("down")
    };
    let mut replies = client
        .server_stream(request)
        .await
        .expect("server stream")
        .into_inner();
    let mut received = 0;
    while let Some(reply) = within(20, "the next reply", replies.message())
        .await
        .expect("a reply")
    {
        received += reply.payload.len();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(received, 50 * MIB);

    let grew = peak_rss_kib(wakegate.pid()).saturating_sub(before);
    assert!(
        grew < 25 * 1024,
        "wakegate's peak memory grew by {} MiB while 100 MiB went through",
        grew / 1024
    );
}

/// How [`refusing_upstream`] refuses the second half of its first `batch` requests.
#[derive(Clone, Copy, PartialEq)]
enum Refuse {
    /// GOAWAY naming the last stream it answered; nothing more is answered on that connection.
    GoAway,
    /// RST_STREAM with REFUSED_STREAM on each; the connection goes on answering.
    Streams,
}

/// An HTTP/2 upstream written frame by frame, to say exactly what it refuses: on its first
/// connection it waits for `batch` requests, answers the first half and refuses the rest
/// (`how`); later requests are answered at once. Records how many requests it answered and
/// how many connections it accepted.
async fn refusing_upstream(
    batch: usize,
    how: Refuse,
) -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    // HEADERS with END_STREAM | END_HEADERS: `:status: 200` (HPACK static index 8).
    let ok = |stream: u32| frame(1, 0x5, stream, &[0x88]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let (count, accepted) = (answered.clone(), connections.clone());
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut stream, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            let (count, mut refuse) = (count.clone(), std::mem::take(&mut first));
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                stream.read_exact(&mut preface).await?;
                stream.write_all(&frame(4, 0, 0, &[])).await?;
                let mut opened = Vec::new();
                loop {
                    let mut head = [0u8; 9];
                    stream.read_exact(&mut head).await?;
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let (kind, flags) = (head[3], head[4]);
                    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    let mut payload = vec![0u8; len];
                    stream.read_exact(&mut payload).await?;
                    match kind {
                        4 if flags & 1 == 0 => stream.write_all(&frame(4, 1, 0, &[])).await?,
                        6 if flags & 1 == 0 => stream.write_all(&frame(6, 1, 0, &payload)).await?,
                        1 if !refuse => {
                            stream.write_all(&ok(id)).await?;
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        1 => {
                            opened.push(id);
                            if opened.len() == batch {
                                let processed = &opened[..batch / 2];
                                for &id in processed {
                                    stream.write_all(&ok(id)).await?;
                                    count.fetch_add(1, Ordering::SeqCst);
                                }
                                if how == Refuse::GoAway {
                                    let last = processed[processed.len() - 1];
                                    let mut goaway = last.to_be_bytes().to_vec();
                                    goaway.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR
                                    stream.write_all(&frame(7, 0, 0, &goaway)).await?;
                                } else {
                                    for &id in &opened[batch / 2..] {
                                        // RST_STREAM, REFUSED_STREAM (0x7).
                                        let refused = frame(3, 0, id, &7u32.to_be_bytes());
                                        stream.write_all(&refused).await?;
                                    }
                                    refuse = false;
                                }
                            }
                        }
                        _ => {}
                    }
                }
                #[allow(unreachable_code)]
                Ok::<_, std::io::Error>(())
            });
        }
    });
    (addr, answered, connections)
}

/// Four requests at once through wakegate to `addr`, on one HTTP/2 client connection (so
/// that they share a worker and its upstream connection); their statuses.
async fn four_at_once(
    wakegate: &Wakegate,
    host: &str,
) -> Vec<Result<http::StatusCode, hyper::Error>> {
    let stream = tokio::net::TcpStream::connect(wakegate.proxy)
        .await
        .unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake::<_, _, String>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let requests = (0..4).map(|i| {
        let mut sender = sender.clone();
        let uri = format!("http://{host}/{i}");
        async move {
            let request = http::Request::post(uri).body(format!("body {i}")).unwrap();
            sender.send_request(request).await.map(|r| r.status())
        }
    });
    within(
        20,
        "four requests",
        futures_util::future::join_all(requests),
    )
    .await
}

#[tokio::test]
async fn requests_above_the_last_stream_a_goaway_names_are_sent_again_on_a_new_connection() {
    let (addr, answered, connections) = refusing_upstream(4, Refuse::GoAway).await;
    let wakegate = Wakegate::start("", &fixed_h2c("goaway", addr)).await;
    let statuses = four_at_once(&wakegate, "goaway.localhost").await;
    for status in &statuses {
        assert_eq!(
            status.as_ref().ok(),
            Some(&http::StatusCode::OK),
            "{statuses:?}\n{}",
            wakegate.logs()
        );
    }
    assert_eq!(answered.load(Ordering::SeqCst), 4, "each answered once");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        2,
        "a new one after GOAWAY"
    );
}

#[tokio::test]
async fn refused_streams_are_sent_again_and_their_connection_stays_in_use() {
    let (addr, answered, connections) = refusing_upstream(4, Refuse::Streams).await;
    let wakegate = Wakegate::start("", &fixed_h2c("refused", addr)).await;
    let statuses = four_at_once(&wakegate, "refused.localhost").await;
    for status in &statuses {
        assert_eq!(
            status.as_ref().ok(),
            Some(&http::StatusCode::OK),
            "{statuses:?}\n{}",
            wakegate.logs()
        );
    }
    assert_eq!(answered.load(Ordering::SeqCst), 4, "each answered once");
    assert_eq!(connections.load(Ordering::SeqCst), 1, "the same connection");
}

#[tokio::test]
async fn an_http1_client_s_trailers_cross_an_h2c_upstream_both_ways() {
    let backend = DemoBackend::start().await;
    let wakegate = Wakegate::start("", &fixed_h2c("trailers", backend.addr)).await;
    let request = "POST /trailers HTTP/1.1\r\nHost: trailers.localhost\r\nTE: trailers\r\n\
                   Trailer: x-client-trailer\r\nTransfer-Encoding: chunked\r\n\
                   Connection: close\r\n\r\n5\r\nhello\r\n0\r\nx-client-trailer: sent\r\n\r\n";
    let response = within(20, "the exchange", raw_exchange(wakegate.proxy, request)).await;
    assert_eq!(raw_status(&response), 200, "{response}");
    let lower = response.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked"), "{response}");
    // The body, then the trailers after the last chunk: the client's, echoed, and the
    // upstream's own.
    let (_, tail) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{response}"));
    assert!(tail.starts_with("5\r\nhello\r\n0\r\n"), "{tail:?}");
    assert!(tail.contains("x-client-trailer: sent\r\n"), "{tail:?}");
    assert!(tail.contains("x-demo-trailer: done\r\n"), "{tail:?}");
}
