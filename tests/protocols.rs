//! What clients see of the protocols wakegate proxies: streamed bodies, WebSocket, h2c,
//! forwarding headers, routing by path prefix, and a drain's answer on HTTP/1.1 and h2c.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use wakegate_test_support::*;

/// Peak and current resident memory of a process, in bytes (`VmHWM`, `VmRSS`).
fn memory(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
    };
    (kib("VmHWM:") * 1024, kib("VmRSS:") * 1024)
}

/// FNV-1a, fed chunk by chunk: the same bytes give the same sum however they are split.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

const CHUNK: usize = 64 * 1024;
const CHUNKS: usize = 800; // 50 MiB

/// Chunk `i` of the streamed body: different in every chunk, so a lost, repeated or
/// reordered chunk changes the checksum.
fn chunk(i: usize) -> Bytes {
    (0..CHUNK)
        .map(|j| (i.wrapping_mul(131) ^ j.wrapping_mul(7)) as u8)
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test]
async fn a_50_mib_body_streams_through_echo_unchanged_without_buffering_it() {
    let wg = Wakegate::start("", &demo_target("echo", "echo.localhost", "0s")).await;
    let warm = wg.get("echo.localhost", "/").await;
    assert_eq!(warm.status, 200, "{}", warm.body);
    let (peak_before, rss_before) = memory(wg.pid());

    let mut expected = Fnv::new();
    for i in 0..CHUNKS {
        expected.update(&chunk(i));
    }

    let stream = within(5, "connect", TcpStream::connect(wg.proxy))
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let body = StreamBody::new(futures_util::stream::iter(
        (0..CHUNKS).map(|i| Ok::<_, Infallible>(Frame::data(chunk(i)))),
    ));
    let request = Request::post("/echo")
        .header(header::HOST, "echo.localhost")
        .body(body)
        .unwrap();

    let (length, sum) = within(60, "the 50 MiB echo", async {
        // The response starts while the request body is still being sent: read it as it comes.
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let (mut length, mut sum) = (0usize, Fnv::new());
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("body frame").into_data() {
                length += data.len();
                sum.update(&data);
            }
        }
        (length, sum)
    })
    .await;

    assert_eq!(length, CHUNK * CHUNKS, "every byte came back");
    assert_eq!(
        sum.0, expected.0,
        "the bytes came back unchanged and in order"
    );
    let (peak_after, rss_after) = memory(wg.pid());
    const LIMIT: u64 = 20 * 1024 * 1024;
    assert!(
        peak_after.saturating_sub(peak_before) < LIMIT,
        "peak memory grew from {peak_before} to {peak_after} bytes"
    );
    assert!(
        rss_after.saturating_sub(rss_before) < LIMIT,
        "resident memory grew from {rss_before} to {rss_after} bytes"
    );
}

#[tokio::test]
async fn websocket_text_and_binary_messages_are_echoed_through_the_proxy() {
    let wg = Wakegate::start("", &demo_target("ws", "ws.localhost", "0s")).await;
    let stream = TcpStream::connect(wg.proxy).await.unwrap();
    let (mut ws, response) = within(
        20,
        "the WebSocket handshake",
        tokio_tungstenite::client_async("ws://ws.localhost/ws", stream),
    )
    .await
    .expect("WebSocket handshake through the proxy");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    // An open WebSocket is a request in flight: the target must not look idle.
    assert_eq!(wg.target("ws").await["in_flight"], 1);

    let binary: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    echoes(
        &mut ws,
        [
            Message::text("hello through wakegate"),
            Message::binary(binary),
            Message::text("and again"),
        ],
    )
    .await;
    ws.close(None).await.expect("closed cleanly");
    drop(ws);
    wg.wait_for_target("ws", Duration::from_secs(5), |t| t["in_flight"] == 0)
        .await;
}

#[tokio::test]
async fn h2c_prior_knowledge_requests_are_answered_over_http2() {
    let wg = Wakegate::start("", &demo_target("h2", "h2.localhost", "0s")).await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let request = Request::get(format!("http://{}/", wg.proxy))
        .header(header::HOST, "h2.localhost")
        .body(Full::default())
        .unwrap();
    let response = within(20, "the h2c request", client.request(request))
        .await
        .expect("h2c response");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.starts_with("hello from demo-backend"), "{body}");

    // A request body crosses from HTTP/2 downstream to the HTTP/1.1 upstream and back.
    let request = Request::post(format!("http://{}/echo", wg.proxy))
        .header(header::HOST, "h2.localhost")
        .body(Full::new(Bytes::from_static(b"sent over h2c")))
        .unwrap();
    let response = within(20, "the h2c echo", client.request(request))
        .await
        .expect("h2c response");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"sent over h2c");
}

/// A client connection whose first write stops after a few bytes and whose next write waits
/// a while: the HTTP/2 preface reaches wakegate in two pieces.
struct SlowStart {
    stream: TcpStream,
    written: usize,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl tokio::io::AsyncRead for SlowStart {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SlowStart {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.written == 0 {
            let n = buf.len().min(5);
            let result = std::pin::Pin::new(&mut this.stream).poll_write(cx, &buf[..n]);
            if let std::task::Poll::Ready(Ok(n)) = result {
                this.written = n;
                this.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
            }
            return result;
        }
        if let Some(pause) = &mut this.pause {
            std::task::ready!(pause.as_mut().poll(cx));
            this.pause = None;
        }
        std::pin::Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn an_http2_preface_that_arrives_in_pieces_is_still_recognised() {
    let wg = Wakegate::start("", &demo_target("h2", "h2.localhost", "0s")).await;
    let stream = SlowStart {
        stream: TcpStream::connect(wg.proxy).await.unwrap(),
        written: 0,
        pause: None,
    };
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    let request = Request::get("http://h2.localhost/")
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = within(20, "the h2c request", sender.send_request(request))
        .await
        .expect("h2c response");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).starts_with("hello from demo-backend"));
}

/// A client connection whose reads can be held back: while held, the client does not learn
/// what wakegate sends (a drain's GOAWAY), so it still sends requests on the connection.
struct HeldReads {
    stream: TcpStream,
    held: Arc<AtomicBool>,
    /// Notified on every write made while reads are held.
    wrote: Arc<tokio::sync::Notify>,
    recheck: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl tokio::io::AsyncRead for HeldReads {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        while this.held.load(Ordering::SeqCst) {
            let recheck = this
                .recheck
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(5))));
            std::task::ready!(recheck.as_mut().poll(cx));
            this.recheck = None;
        }
        std::pin::Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for HeldReads {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.stream).poll_write(cx, buf);
        if result.is_ready() && self.held.load(Ordering::SeqCst) {
            self.wrote.notify_one();
        }
        result
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn a_request_arriving_during_a_drain_gets_503_which_says_connection_close_on_http1_only() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // No target: a draining wakegate answers 503 whatever the route. The test's drain timeout
    // (10 s) keeps it up while the connections below stay open.
    let wg = Wakegate::start("", "").await;
    // HTTP/1.1: a connection whose request head has begun to arrive is kept through the drain
    // until that request is answered.
    let mut http1 = TcpStream::connect(wg.proxy).await.unwrap();
    http1.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    // h2c: a connection that is open, and that will not read the drain's GOAWAY in time.
    let held = Arc::new(AtomicBool::new(false));
    let wrote = Arc::new(tokio::sync::Notify::new());
    let stream = HeldReads {
        stream: TcpStream::connect(wg.proxy).await.unwrap(),
        held: held.clone(),
        wrote: wrote.clone(),
        recheck: None,
    };
    let (mut http2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    let request = || {
        Request::get("http://drain.localhost/")
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let before = within(20, "an h2c request", http2.send_request(request()))
        .await
        .expect("h2c response");
    assert_eq!(
        before.status(),
        StatusCode::NOT_FOUND,
        "no route, not draining yet"
    );
    // Time for wakegate to read the first bytes of the HTTP/1.1 head: until then, a drain
    // closes the connection as one that never sent anything.
    tokio::time::sleep(Duration::from_millis(200)).await;

    held.store(true, Ordering::SeqCst);
    wg.signal(libc::SIGTERM);
    within(5, "/readyz to say draining", async {
        while wg.admin_get("/readyz").await.status != 503 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    http1
        .write_all(b"Host: drain.localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    within(5, "the HTTP/1.1 answer", http1.read_to_end(&mut answer))
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert_eq!(raw_status(&answer), 503, "{answer}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    assert!(answer.contains("\r\nretry-after: 1\r\n"), "{answer}");
    // Counted, under no target since none was routed. (Asked while the h2c connection, which
    // has not read the GOAWAY, keeps the drain, and so the admin listener, going.)
    let metrics = wg.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "wakegate_rejected_requests_total",
            "service=\"\",reason=\"shutting_down\""
        ),
        Some(1.0),
        "{metrics}"
    );

    let during = tokio::spawn(http2.send_request(request()));
    within(5, "the h2c request to be sent", wrote.notified()).await;
    held.store(false, Ordering::SeqCst);
    let during = within(5, "the h2c answer", during)
        .await
        .unwrap()
        .expect("h2c response");
    assert_eq!(during.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(during.version(), Version::HTTP_2);
    assert_eq!(during.headers()[header::RETRY_AFTER], "1");
    assert!(
        !during.headers().contains_key(header::CONNECTION),
        "a connection-specific header on HTTP/2: {:?}",
        during.headers()
    );
    let id = during.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = during.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!("wakegate is shutting down\nrequest id: {id}\n")
    );
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACESTATE: &str = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";

#[tokio::test]
async fn backend_sees_forwarding_headers_and_original_host_but_no_hop_by_hop_headers() {
    let wg = Wakegate::start("", &demo_target("headers", "headers.localhost", "0s")).await;
    let request = Request::get("/headers")
        .header(header::CONNECTION, "x-custom")
        .header("x-custom", "1")
        .header("keep-alive", "timeout=5")
        .header(header::TE, "trailers")
        .header("x-end-to-end", "kept")
        .header("traceparent", TRACEPARENT)
        .header("tracestate", TRACESTATE)
        .body(Full::default())
        .unwrap();
    let response = within(
        20,
        "the /headers request",
        wg.send(wg.proxy, "headers.localhost", request),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.body);
    let seen: serde_json::Value = serde_json::from_str(&response.body).expect("JSON headers");

    assert_eq!(seen["host"], "headers.localhost", "Host preserved: {seen}");
    let forwarded_for = seen["x-forwarded-for"].as_str().unwrap_or_default();
    assert!(
        forwarded_for.contains("127.0.0.1"),
        "X-Forwarded-For names the client: {seen}"
    );
    assert_eq!(seen["x-forwarded-proto"], "http", "{seen}");
    assert_eq!(seen["x-forwarded-host"], "headers.localhost", "{seen}");
    assert_eq!(seen["x-end-to-end"], "kept", "{seen}");
    // W3C trace context passes through unchanged: the upstream continues the client's trace.
    assert_eq!(seen["traceparent"], TRACEPARENT, "{seen}");
    assert_eq!(seen["tracestate"], TRACESTATE, "{seen}");
    for hop_by_hop in ["connection", "x-custom", "keep-alive", "te"] {
        assert!(
            seen.get(hop_by_hop).is_none(),
            "{hop_by_hop} reached the backend: {seen}"
        );
    }
}

/// A fixed upstream that answers every request with the path it saw.
async fn path_echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let body = format!("upstream saw {}", req.uri().path());
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

#[tokio::test]
async fn requests_go_to_the_target_with_the_longest_matching_path_prefix() {
    let upstream = path_echo_upstream().await;
    let targets = format!(
        r#"
{}
[[target]]
name = "api"
hosts = ["site.localhost"]
path_prefixes = ["/api"]
upstream = "{upstream}"
"#,
        demo_target("site", "site.localhost", "0s")
    );
    let wg = Wakegate::start("", &targets).await;

    // The demo backend says hello on "/" and answers other paths with its own 404 body.
    for (path, status, body) in [
        ("/", 200, "hello from demo-backend"),
        ("/api", 200, "upstream saw /api"),
        ("/api/users/7", 200, "upstream saw /api/users/7"),
        ("/apiary", 404, "not found\n"),
        ("/about", 404, "not found\n"),
    ] {
        let r = within(20, path, wg.get("site.localhost", path)).await;
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert!(r.body.starts_with(body), "{path}: {:?}", r.body);
    }
    assert_eq!(wg.target("api").await["requests"], 2);
    assert_eq!(wg.target("site").await["requests"], 3);
}

/// A fixed upstream that counts the connections it accepts and, unless `keep_alive`, closes
/// each after one response.
async fn counting_upstream(keep_alive: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let service = hyper::service::service_fn(|_: Request<Incoming>| async move {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("counted"))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .keep_alive(keep_alive)
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (addr, accepted)
}

/// Sends `n` requests one after the other on a single client connection, each answered 200.
async fn sequential_requests(wg: &Wakegate, n: usize) {
    let stream = TcpStream::connect(wg.proxy).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    for i in 0..n {
        let request = Request::get("/")
            .header(header::HOST, "counted.localhost")
            .body(Full::<Bytes>::default())
            .unwrap();
        let response = within(5, "a request", sender.send_request(request))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "request {i}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"counted", "request {i}");
    }
}

fn counted_target(upstream: SocketAddr) -> String {
    format!(
        "[[target]]\nname = \"counted\"\nhosts = [\"counted.localhost\"]\nupstream = \"{upstream}\"\n"
    )
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused_from_one_request_to_the_next() {
    let (upstream, accepted) = counting_upstream(true).await;
    let wg = Wakegate::start("", &counted_target(upstream)).await;
    sequential_requests(&wg, 20).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one upstream connection"
    );
}

#[tokio::test]
async fn an_upstream_that_closes_each_connection_still_gets_every_request() {
    let (upstream, accepted) = counting_upstream(false).await;
    let wg = Wakegate::start("", &counted_target(upstream)).await;
    sequential_requests(&wg, 5).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        5,
        "a new connection each time"
    );
}
