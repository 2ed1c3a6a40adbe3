//! Signals: SIGHUP reloads the configuration without disturbing traffic (and keeps the
//! running one when the new file is invalid); SIGTERM drains in-flight requests and exits.

use std::sync::Arc;
use std::time::Duration;

use wakegate_test_support::*;

/// Starts a `/sleep?ms=1500` request to `a.localhost` and returns once wakegate counts it in
/// flight.
async fn slow_request_in_flight(wg: &Arc<Wakegate>) -> tokio::task::JoinHandle<Response> {
    let slow = {
        let wg = wg.clone();
        tokio::spawn(async move { wg.get("a.localhost", "/sleep?ms=1500").await })
    };
    wg.wait_for_target("a", Duration::from_secs(5), |t| t["in_flight"] == 1)
        .await;
    slow
}

/// Polls until `check` holds for a fresh GET, or panics after `limit`.
async fn poll_until(
    wg: &Wakegate,
    host: &str,
    path: &str,
    limit: Duration,
    check: impl Fn(&Response) -> bool,
) -> Response {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let r = wg.get(host, path).await;
        if check(&r) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{host}{path} never answered as expected; last: {} {}\nlog:\n{}",
            r.status,
            r.body,
            wg.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sighup_adds_a_route_without_failing_requests_in_flight() {
    let wg = Arc::new(Wakegate::start("", &demo_target("a", "a.localhost", "0s")).await);
    assert_eq!(wg.get("a.localhost", "/").await.status, 200);
    assert_eq!(wg.get("b.localhost", "/").await.status, 404, "no route yet");

    let slow = slow_request_in_flight(&wg).await;
    wg.rewrite_config(
        "",
        &format!(
            "{}{}",
            demo_target("a", "a.localhost", "0s"),
            demo_target("b", "b.localhost", "0s")
        ),
    );
    wg.signal(libc::SIGHUP);

    let b = poll_until(&wg, "b.localhost", "/", Duration::from_secs(10), |r| {
        r.status == 200
    })
    .await;
    assert!(b.body.starts_with("hello from demo-backend"), "{}", b.body);
    let slow = within(10, "the slow request", slow).await.unwrap();
    assert_eq!(slow.status, 200, "{}", slow.body);
    assert_eq!(slow.body, "slept 1500 ms\n");
    assert_eq!(
        wg.get("a.localhost", "/").await.status,
        200,
        "a still routes"
    );
}

#[tokio::test]
async fn sighup_with_an_invalid_config_is_rejected_and_old_routes_keep_working() {
    let wg = Wakegate::start("", &demo_target("a", "a.localhost", "0s")).await;
    let before = wg.get("a.localhost", "/").await;
    assert_eq!(before.status, 200);

    wg.rewrite_config(
        "",
        &format!(
            "{}{}max_pending = 0\n",
            demo_target("a", "a.localhost", "0s"),
            demo_target("b", "b.localhost", "0s")
        ),
    );
    wg.signal(libc::SIGHUP);

    logged(&wg, "configuration reload rejected").await;
    let rejected = wg
        .logs()
        .lines()
        .find(|l| l.contains("configuration reload rejected"))
        .unwrap()
        .to_owned();
    assert!(
        rejected.contains("target[1] (b).max_pending"),
        "the log line names the field: {rejected}"
    );

    let after = wg.get("a.localhost", "/").await;
    assert_eq!(after.status, 200, "{}", after.body);
    assert_eq!(pid_in(&after.body), pid_in(&before.body), "same instance");
    assert_eq!(
        wg.get("b.localhost", "/").await.status,
        404,
        "nothing of the rejected file applies"
    );
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_cleanly_and_stops_backends() {
    let mut wg = Wakegate::start("", &demo_target("a", "a.localhost", "0s")).await;
    let warm = wg.get("a.localhost", "/").await;
    assert_eq!(warm.status, 200);
    let backend = pid_in(&warm.body);
    assert!(process_alive(backend));
    assert_eq!(wg.admin_get("/readyz").await.status, 200);

    // `wait_exit` needs `&mut`, so the slow request shares only the address, not `wg`.
    let proxy = wg.proxy;
    let slow = tokio::spawn(async move {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<bytes::Bytes>>();
        let request = http::Request::get(format!("http://{proxy}/sleep?ms=1500"))
            .header(http::header::HOST, "a.localhost")
            .body(Default::default())
            .unwrap();
        let response = client.request(request).await.expect("response");
        let status = response.status();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .expect("whole body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    });
    wg.wait_for_target("a", Duration::from_secs(5), |t| t["in_flight"] == 1)
        .await;

    wg.signal(libc::SIGTERM);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        let ready = wg.admin_get("/readyz").await;
        if ready.status == 503 {
            assert_eq!(ready.body, "draining\n");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz still {} after SIGTERM",
            ready.status
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let (status, body) = within(10, "the in-flight request", slow).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "slept 1500 ms\n");
    assert_eq!(wg.wait_exit(Duration::from_secs(10)).await, Some(0));
    assert!(
        !process_alive(backend),
        "the demo backend {backend} is gone after wakegate exits"
    );
}

/// A target whose stop grace is far longer than the drain timeout, so only the drain can
/// explain a prompt exit.
fn patient_target(name: &str, host: &str) -> String {
    format!("{}stop_grace = \"30s\"\n", demo_target(name, host, "0s"))
}

/// Starts a 20 s request to `a.localhost`, sends SIGTERM, and checks that wakegate cuts it and
/// exits within a few seconds, as a 1 s drain timeout requires.
async fn sigterm_cuts_a_long_request_at_a_1s_drain(wg: &mut Wakegate) {
    let proxy = wg.proxy;
    let slow = tokio::spawn(async move {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<bytes::Bytes>>();
        let request = http::Request::get(format!("http://{proxy}/sleep?ms=20000"))
            .header(http::header::HOST, "a.localhost")
            .body(Default::default())
            .unwrap();
        client.request(request).await.map(|r| r.status())
    });
    wg.wait_for_target("a", Duration::from_secs(5), |t| t["in_flight"] == 1)
        .await;

    let began = std::time::Instant::now();
    wg.signal(libc::SIGTERM);
    assert_eq!(wg.wait_exit(Duration::from_secs(15)).await, Some(0));
    let took = began.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "exited {took:?} after SIGTERM with a 1s drain timeout"
    );
    let cut = within(5, "the cut request", slow).await.unwrap();
    assert!(
        cut.is_err(),
        "the request was closed, not answered: {cut:?}"
    );
}

#[tokio::test]
async fn sigterm_closes_requests_still_running_at_the_drain_timeout_and_exits_in_time() {
    let mut wg = Wakegate::start(
        "drain_timeout = \"1s\"",
        &patient_target("a", "a.localhost"),
    )
    .await;
    assert_eq!(wg.get("a.localhost", "/").await.status, 200);

    sigterm_cuts_a_long_request_at_a_1s_drain(&mut wg).await;
}

#[tokio::test]
async fn sigterm_lets_an_open_websocket_work_until_the_drain_timeout_then_closes_it() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let mut wg = Wakegate::start(
        "drain_timeout = \"1s\"",
        &patient_target("ws", "ws.localhost"),
    )
    .await;
    let stream = tokio::net::TcpStream::connect(wg.proxy).await.unwrap();
    let (mut ws, _) = within(
        20,
        "the WebSocket handshake",
        tokio_tungstenite::client_async("ws://ws.localhost/ws", stream),
    )
    .await
    .expect("WebSocket through the proxy");

    let began = std::time::Instant::now();
    wg.signal(libc::SIGTERM);
    ws.send(Message::text("still there?")).await.expect("sent");
    let echoed = within(1, "an echo while draining", ws.next()).await;
    assert_eq!(
        echoed.expect("a message").expect("valid"),
        Message::text("still there?")
    );

    // Then wakegate closes it: the stream ends (or errors) instead of staying open.
    let ended = within(5, "the WebSocket closing", ws.next()).await;
    assert!(
        !matches!(ended, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{ended:?}"
    );
    assert_eq!(wg.wait_exit(Duration::from_secs(15)).await, Some(0));
    let took = began.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "exited {took:?} after SIGTERM with a 1s drain timeout"
    );
}

/// Waits until wakegate logs `message` (its JSON `message` field contains it).
async fn logged(wg: &Wakegate, message: &str) {
    wg.wait_for_log(&format!("{message:?}"), Duration::from_secs(10), |line| {
        line["message"]
            .as_str()
            .is_some_and(|text| text.contains(message))
    })
    .await;
}

#[tokio::test]
async fn sighup_applies_a_new_drain_timeout_to_the_next_drain() {
    let mut wg = Wakegate::start(
        "drain_timeout = \"60s\"",
        &patient_target("a", "a.localhost"),
    )
    .await;
    assert_eq!(wg.get("a.localhost", "/").await.status, 200);
    wg.rewrite_config(
        "drain_timeout = \"1s\"",
        &patient_target("a", "a.localhost"),
    );
    wg.signal(libc::SIGHUP);
    logged(&wg, "configuration reloaded").await;

    sigterm_cuts_a_long_request_at_a_1s_drain(&mut wg).await;
}

#[tokio::test]
async fn sighup_applies_a_new_autoscaler_interval() {
    let target = format!(
        "{}idle_timeout = \"1s\"\n",
        demo_target("a", "a.localhost", "0s")
    );
    // Ticks an hour apart: the idle instance is never stopped until the reload.
    let wg = Wakegate::start("[autoscaler]\ninterval = \"1h\"", &target).await;
    assert_eq!(wg.get("a.localhost", "/").await.status, 200);
    wg.rewrite_config("[autoscaler]\ninterval = \"100ms\"", &target);
    wg.signal(libc::SIGHUP);
    logged(&wg, "configuration reloaded").await;
    wg.wait_for_target("a", Duration::from_secs(15), |t| {
        t["state"] == "cold" && t["instances"] == 0
    })
    .await;
}

#[tokio::test]
async fn sighup_names_each_setting_that_needs_a_restart_and_keeps_serving() {
    let wg = Wakegate::start("", &demo_target("a", "a.localhost", "0s")).await;
    assert_eq!(wg.get("a.localhost", "/").await.status, 200);
    wg.rewrite_config(
        "[kubernetes]\nnamespaces = [\"elsewhere\"]",
        &demo_target("a", "a.localhost", "0s"),
    );
    wg.signal(libc::SIGHUP);
    logged(&wg, "configuration reloaded").await;
    let line = wg
        .logs()
        .lines()
        .find(|l| l.contains("only on a restart"))
        .unwrap_or_else(|| panic!("no restart warning:\n{}", wg.logs()))
        .to_owned();
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["fields"], "kubernetes", "{line}");
    assert_eq!(wg.get("a.localhost", "/").await.status, 200);
}

/// Starts a request to `host` that is held while its target starts (2 s), and returns once
/// wakegate counts it held.
async fn held_request(
    wg: &Arc<Wakegate>,
    name: &str,
    host: &str,
) -> tokio::task::JoinHandle<Response> {
    let held = {
        let wg = wg.clone();
        let host = host.to_owned();
        tokio::spawn(async move { wg.get(&host, "/").await })
    };
    wg.wait_for_target(name, Duration::from_secs(5), |t| t["pending"] == 1)
        .await;
    held
}

#[tokio::test]
async fn sighup_that_replaces_a_target_moves_its_held_requests_to_the_new_one() {
    let slow = demo_target("a", "a.localhost", "2s");
    let wg = Arc::new(Wakegate::start("", &slow).await);
    let held = held_request(&wg, "a", "a.localhost").await;

    // A non-routing change: the target is replaced, its starting instance stopped.
    wg.rewrite_config("", &format!("{slow}max_pending = 500\n"));
    wg.signal(libc::SIGHUP);

    let response = within(15, "the held request", held)
        .await
        .unwrap_or_else(|e| panic!("the held request: {e}; log:\n{}", wg.logs()));
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(
        response.body.starts_with("hello from demo-backend"),
        "{}",
        response.body
    );
    assert_eq!(response.headers["x-wakegate-cold-start"], "true");
    let metrics = wg.metrics().await;
    assert_eq!(
        metric(&metrics, "wakegate_pending_requests", "service=\"a\""),
        Some(0.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn sighup_that_removes_a_target_answers_its_held_requests_503_at_once() {
    // The instance would take 30 s and the hold 20 s: a 503 "removed" within 15 s can only be
    // the removal's answer, however slow the machine is.
    let wg = Arc::new(Wakegate::start("", &demo_target("a", "a.localhost", "30s")).await);
    let held = held_request(&wg, "a", "a.localhost").await;

    wg.rewrite_config("", &demo_target("b", "b.localhost", "0s"));
    wg.signal(libc::SIGHUP);

    let response = tokio::time::timeout(Duration::from_secs(15), held)
        .await
        .unwrap_or_else(|_| panic!("the held request took over 15 s; log:\n{}", wg.logs()))
        .unwrap_or_else(|e| panic!("the held request: {e}; log:\n{}", wg.logs()));
    assert_eq!(response.status, 503, "{}", response.body);
    assert!(response.body.contains("removed"), "{}", response.body);
    assert_eq!(response.headers["retry-after"], "1");
}
