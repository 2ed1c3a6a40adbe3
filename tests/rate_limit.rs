//! Per-client rate limits: a client gets its burst, then 429 with `Retry-After` (gRPC calls
//! RESOURCE_EXHAUSTED) until the interval passes; other clients keep their own budget; a
//! limited request is counted as `rate_limited` and never wakes a cold target.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tonic::Code;
use tonic::transport::Endpoint;
use wakegate::demo::grpc::pb::EchoRequest;
use wakegate::demo::grpc::pb::echo_client::EchoClient;
use wakegate_test_support::*;

/// An `upstream` target `api` on `api.localhost` with `rate_limit = {limit}`.
fn api(upstream: SocketAddr, limit: &str, extra: &str) -> String {
    format!(
        r#"
[[target]]
name = "api"
hosts = ["api.localhost"]
upstream = "{upstream}"
rate_limit = {limit}
{extra}
"#
    )
}

/// A raw `GET /` for `host` from the local address `from`, on a connection of its own; returns
/// the whole response.
async fn get_from(from: &str, proxy: SocketAddr, host: &str) -> String {
    send_from(from, proxy, host, "").await
}

/// As [`get_from`], with `headers` (whole lines) added to the request.
async fn send_from(from: &str, proxy: SocketAddr, host: &str, headers: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within(10, "request", async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        let from: IpAddr = from.parse().unwrap();
        socket.bind(SocketAddr::new(from, 0)).expect("bind source");
        let mut stream = socket.connect(proxy).await.expect("connect");
        let request =
            format!("GET / HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        String::from_utf8_lossy(&response).into_owned()
    })
    .await
}

/// The value of a header of a raw response.
fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.split("\r\n\r\n").next()?.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn rate_limited(metrics: &str, service: &str) -> f64 {
    metric(
        metrics,
        "wakegate_rejected_requests_total",
        &format!("service=\"{service}\",reason=\"rate_limited\""),
    )
    .unwrap_or_else(|| panic!("a rate_limited sample for {service} in\n{metrics}"))
}

/// Every `http_requests_total` of a target, whatever its method and code.
fn requests_total(metrics: &str, service: &str) -> f64 {
    let service = format!("service=\"{service}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("http_requests_total{") && l.contains(&service))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_client_gets_its_burst_then_429_with_retry_after_until_the_interval_passes() {
    let backend = DemoBackend::start().await;
    let wg = Wakegate::start("", &api(backend.addr, "{ per_second = 2, burst = 3 }", "")).await;

    for i in 0..3 {
        let r = get_from("127.0.0.1", wg.proxy, "api.localhost").await;
        assert_eq!(raw_status(&r), 200, "request {i} of the burst: {r}");
    }
    let limited = get_from("127.0.0.1", wg.proxy, "api.localhost").await;
    assert_eq!(raw_status(&limited), 429, "{limited}");
    assert_eq!(header(&limited, "retry-after"), Some("1"), "{limited}");
    assert!(
        limited.contains("too many requests from this client for target api"),
        "{limited}"
    );

    // One interval (500ms) later the client may send one more.
    let began = Instant::now();
    let mut limited_count = 1.0;
    loop {
        let r = get_from("127.0.0.1", wg.proxy, "api.localhost").await;
        match raw_status(&r) {
            200 => break,
            429 => limited_count += 1.0,
            other => panic!("{other}: {r}"),
        }
        assert!(
            began.elapsed() < Duration::from_secs(3),
            "still limited after {:?}",
            began.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let metrics = wg.metrics().await;
    assert_eq!(rate_limited(&metrics, "api"), limited_count, "{metrics}");
    // A limited request is no demand: only the four served ones count.
    assert_eq!(requests_total(&metrics, "api"), 4.0, "{metrics}");
}

#[tokio::test]
async fn another_client_address_keeps_its_own_budget() {
    let backend = DemoBackend::start().await;
    let wg = Wakegate::start(
        "",
        &api(backend.addr, "{ per_second = 0.1, burst = 1 }", ""),
    )
    .await;

    let first = get_from("127.0.0.1", wg.proxy, "api.localhost").await;
    assert_eq!(raw_status(&first), 200, "{first}");
    let again = get_from("127.0.0.1", wg.proxy, "api.localhost").await;
    assert_eq!(raw_status(&again), 429, "{again}");
    // One request per 10 s: the client waits the whole interval, rounded up.
    assert_eq!(header(&again, "retry-after"), Some("10"), "{again}");

    let other = get_from("127.0.0.2", wg.proxy, "api.localhost").await;
    assert_eq!(raw_status(&other), 200, "127.0.0.2 is not limited: {other}");
    // The X-Forwarded-For a client writes changes nothing: the TCP peer is the client.
    let forged = send_from(
        "127.0.0.1",
        wg.proxy,
        "api.localhost",
        "X-Forwarded-For: 127.0.0.2\r\n",
    )
    .await;
    assert_eq!(raw_status(&forged), 429, "{forged}");
}

#[tokio::test]
async fn limited_requests_never_wake_a_cold_target() {
    let bin = bin();
    let targets = format!(
        r#"
[[target]]
name = "hello"
hosts = ["hello.localhost"]
command = ["{bin}", "demo-backend", "--port", "{{port}}"]
ready = {{ http_get = "/healthz" }}
idle_timeout = "1s"
rate_limit = {{ per_second = 0.05, burst = 1 }}
"#
    );
    let wg = Wakegate::start("[autoscaler]\ninterval = \"100ms\"", &targets).await;

    let first = get_from("127.0.0.1", wg.proxy, "hello.localhost").await;
    assert_eq!(raw_status(&first), 200, "{first}");
    wg.wait_for_target("hello", Duration::from_secs(10), |t| {
        t["state"] == "cold" && t["instances"] == 0
    })
    .await;

    for _ in 0..5 {
        let r = get_from("127.0.0.1", wg.proxy, "hello.localhost").await;
        assert_eq!(raw_status(&r), 429, "{r}");
    }
    // A wake would begin at once; give it time to show before asserting there was none.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = wg.target("hello").await;
    assert_eq!(t["state"], "cold", "{t}");
    let metrics = wg.metrics().await;
    assert_eq!(
        metric(&metrics, "wakegate_cold_starts_total", "service=\"hello\""),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(rate_limited(&metrics, "hello"), 5.0);
    assert_eq!(requests_total(&metrics, "hello"), 1.0, "{metrics}");
}

#[tokio::test]
async fn a_limited_grpc_call_gets_resource_exhausted() {
    let backend = DemoBackend::start().await;
    let wg = Wakegate::start(
        "",
        &api(
            backend.addr,
            "{ per_second = 0.1, burst = 1 }",
            "protocol = \"h2c\"",
        ),
    )
    .await;
    let channel = Endpoint::from_shared(format!("http://{}", wg.proxy))
        .unwrap()
        .origin("http://api.localhost".parse().unwrap())
        .connect()
        .await
        .expect("connect to wakegate");
    let mut client = EchoClient::new(channel);
    let echo = || EchoRequest {
        message: "hello".to_owned(),
        ..EchoRequest::default()
    };

    let reply = within(10, "first call", client.unary(echo())).await;
    assert_eq!(
        reply.expect("within the burst").into_inner().message,
        "hello"
    );
    let status = within(10, "second call", client.unary(echo()))
        .await
        .expect_err("over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("too many requests"), "{status:?}");
    assert_eq!(rate_limited(&wg.metrics().await, "api"), 1.0);
}
