//! Signals: SIGHUP reloads the configuration without disturbing traffic (and keeps the
//! running one when the new file is invalid); SIGTERM drains in-flight requests and exits.

mod support;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use support::*;

/// Fails the test instead of hanging when `fut` takes longer than `secs`.
async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("{what} took more than {secs}s"))
}

fn demo_target(name: &str, host: &str) -> String {
    format!(
        r#"
[[target]]
name = "{name}"
hosts = ["{host}"]
command = {}
ready = {{ http_get = "/healthz" }}
cold_start_timeout = "20s"
"#,
        demo_command("0s")
    )
}

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
    let wg = Arc::new(Wakegate::start("", &demo_target("a", "a.localhost")).await);
    assert_eq!(wg.get("a.localhost", "/").await.status, 200);
    assert_eq!(wg.get("b.localhost", "/").await.status, 404, "no route yet");

    let slow = slow_request_in_flight(&wg).await;
    wg.rewrite_config(
        "",
        &format!(
            "{}{}",
            demo_target("a", "a.localhost"),
            demo_target("b", "b.localhost")
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
    let wg = Wakegate::start("", &demo_target("a", "a.localhost")).await;
    let before = wg.get("a.localhost", "/").await;
    assert_eq!(before.status, 200);

    wg.rewrite_config(
        "",
        &format!(
            "{}{}max_pending = 0\n",
            demo_target("a", "a.localhost"),
            demo_target("b", "b.localhost")
        ),
    );
    wg.signal(libc::SIGHUP);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !wg.logs().contains("configuration reload rejected") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no log line about the rejected reload:\n{}",
            wg.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    let mut wg = Wakegate::start("", &demo_target("a", "a.localhost")).await;
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
