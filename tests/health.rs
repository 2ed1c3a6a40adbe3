//! Upstream health as a user meets it: a fixed upstream whose requests fail is shown unhealthy
//! in `/targets` and the metrics, its requests fail fast with a short reason, and it comes back
//! after a trial request or by its active check.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Response as HttpResponse, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use wakegate_test_support::*;

const LIMIT: Duration = Duration::from_secs(10);

/// A port of 127.0.0.1 that nothing listens on, and that no other process can take meanwhile:
/// a socket bound to it without listening (connections to it are refused).
fn reserved_port() -> socket2::Socket {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket
}

fn addr_of(socket: &socket2::Socket) -> SocketAddr {
    socket.local_addr().unwrap().as_socket().unwrap()
}

/// An upstream on `socket`, from now on: `/healthz` answers 200 while `healthy` holds (503
/// otherwise), anything else 200 `ok`, counted in `served`.
struct Upstream {
    healthy: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    fn listen(socket: socket2::Socket) -> Upstream {
        socket.listen(128).unwrap();
        socket.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(socket.into()).unwrap();
        let healthy = Arc::new(AtomicBool::new(true));
        let served = Arc::new(AtomicUsize::new(0));
        let (up, count) = (healthy.clone(), served.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (up, count) = (up.clone(), count.clone());
                let service = hyper::service::service_fn(move |req: http::Request<_>| {
                    let status = if req.uri().path() != "/healthz" {
                        count.fetch_add(1, Ordering::SeqCst);
                        StatusCode::OK
                    } else if up.load(Ordering::SeqCst) {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    let mut response = HttpResponse::new(Full::new(Bytes::from("ok")));
                    *response.status_mut() = status;
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Upstream {
            healthy,
            served,
            task,
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn api(upstream: SocketAddr, health: &str) -> String {
    format!(
        "[[target]]\nname = \"api\"\nhosts = [\"api.localhost\"]\nupstream = \"{upstream}\"\nhealth = {health}\n"
    )
}

fn sample(metrics: &str, name: &str, labels: &str) -> Option<f64> {
    metric(metrics, name, &format!("service=\"api\"{labels}"))
}

fn rejected(metrics: &str, reason: &str) -> Option<f64> {
    sample(
        metrics,
        "wakegate_rejected_requests_total",
        &format!(",reason=\"{reason}\""),
    )
}

/// Asserts that `r` is the fast answer for an unhealthy upstream: 503, `Retry-After`, and a
/// short reason naming the target and nothing local.
fn assert_unhealthy_answer(r: &Response, upstream: SocketAddr, retry_after: &str) {
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.headers[http::header::RETRY_AFTER], retry_after);
    let body = r.body.trim_end();
    assert!(
        body.starts_with("upstream of target api has been unhealthy for ")
            && body.contains("; retry in "),
        "{body}"
    );
    for local in [
        upstream.to_string().as_str(),
        "refused",
        "os error",
        "cannot connect",
    ] {
        assert!(!body.to_lowercase().contains(local), "{local} in {body}");
    }
}

#[tokio::test]
async fn a_refused_fixed_upstream_turns_unhealthy_and_its_requests_fail_fast_with_503() {
    let socket = reserved_port();
    let upstream = addr_of(&socket);
    // An hour between trials: every request after the third failure is answered at once.
    let wg = Wakegate::start("", &api(upstream, "{ interval = \"1h\" }")).await;
    let t = wg.target("api").await;
    assert_eq!(t["state"], "ready", "healthy until a request fails: {t}");

    for _ in 0..3 {
        let r = within(10, "request", wg.get("api.localhost", "/")).await;
        assert_eq!(r.status, 502, "{}", r.body);
    }
    let t = wg.target("api").await;
    assert_eq!(t["state"], "unhealthy", "{t}");
    let unhealthy = &t["unhealthy_endpoints"][0];
    assert_eq!(unhealthy["address"], upstream.to_string(), "{t}");
    assert!(
        unhealthy["last_error"].as_str().is_some_and(
            |e| e.contains(&upstream.to_string()) && e.to_lowercase().contains("refused")
        ),
        "the cause in full: {t}"
    );
    assert!(
        unhealthy["since"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z')),
        "{t}"
    );

    for _ in 0..5 {
        let began = Instant::now();
        let r = within(5, "request", wg.get("api.localhost", "/")).await;
        assert_unhealthy_answer(&r, upstream, "3600");
        assert!(began.elapsed() < Duration::from_secs(2), "at once");
    }
    let metrics = wg.metrics().await;
    assert_eq!(rejected(&metrics, "upstream_error"), Some(3.0));
    assert_eq!(rejected(&metrics, "upstream_unhealthy"), Some(5.0));
    assert_eq!(
        sample(&metrics, "wakegate_unhealthy_endpoints", ""),
        Some(1.0)
    );
    let logs = wg.logs();
    assert!(
        logs.contains("upstream unhealthy") && logs.contains("refused"),
        "the warning with its cause: {logs}"
    );
}

#[tokio::test]
async fn an_unhealthy_fixed_upstream_recovers_when_a_trial_request_gets_an_answer() {
    let socket = reserved_port();
    let upstream = addr_of(&socket);
    let wg = Wakegate::start("", &api(upstream, "{ failures = 2, interval = \"100ms\" }")).await;
    for _ in 0..2 {
        let r = within(10, "request", wg.get("api.localhost", "/")).await;
        assert_eq!(r.status, 502, "{}", r.body);
    }
    // Trials keep failing while nothing listens: it stays unhealthy.
    assert_eq!(wg.target("api").await["state"], "unhealthy");

    let listening = Upstream::listen(socket);
    let deadline = Instant::now() + LIMIT;
    loop {
        let r = within(10, "request", wg.get("api.localhost", "/")).await;
        if r.status == 200 {
            break;
        }
        assert_unhealthy_answer(&r, upstream, "1");
        assert!(Instant::now() < deadline, "never recovered: {}", wg.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = wg.target("api").await;
    assert_eq!(t["state"], "ready", "{t}");
    assert_eq!(t["unhealthy_endpoints"], serde_json::json!([]), "{t}");
    let r = wg.get("api.localhost", "/").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(listening.served.load(Ordering::SeqCst), 2);
    let metrics = wg.metrics().await;
    assert_eq!(
        sample(&metrics, "wakegate_unhealthy_endpoints", ""),
        Some(0.0)
    );
    assert!(wg.logs().contains("upstream healthy again"));
}

#[tokio::test]
async fn an_active_check_marks_a_failing_upstream_unhealthy_and_healthy_again() {
    let socket = reserved_port();
    let upstream = addr_of(&socket);
    let listening = Upstream::listen(socket);
    let wg = Wakegate::start(
        "",
        &api(
            upstream,
            "{ failures = 2, interval = \"50ms\", check = { http_get = \"/healthz\" } }",
        ),
    )
    .await;
    let r = wg.get("api.localhost", "/").await;
    assert_eq!(r.status, 200, "{}", r.body);

    listening.healthy.store(false, Ordering::SeqCst);
    let t = wg
        .wait_for_target("api", LIMIT, |t| t["state"] == "unhealthy")
        .await;
    // What the check saw (on a machine too busy for this test's upstream to answer in time,
    // that it did not answer).
    let saw = t["unhealthy_endpoints"][0]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        [
            "GET /healthz answered 503 Service Unavailable",
            "no answer within 1s"
        ]
        .contains(&saw),
        "{t}"
    );
    // Requests still work, but the check decides: none reaches the upstream.
    let r = wg.get("api.localhost", "/").await;
    assert_unhealthy_answer(&r, upstream, "1");
    assert_eq!(listening.served.load(Ordering::SeqCst), 1);
    assert_eq!(
        rejected(&wg.metrics().await, "upstream_unhealthy"),
        Some(1.0)
    );

    listening.healthy.store(true, Ordering::SeqCst);
    wg.wait_for_target("api", LIMIT, |t| t["state"] == "ready")
        .await;
    let r = wg.get("api.localhost", "/").await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn an_active_check_finds_a_refused_upstream_before_any_request_and_its_recovery() {
    let socket = reserved_port();
    let upstream = addr_of(&socket);
    let wg = Wakegate::start(
        "",
        &api(upstream, "{ interval = \"50ms\", check = { tcp = true } }"),
    )
    .await;
    let t = wg
        .wait_for_target("api", LIMIT, |t| t["state"] == "unhealthy")
        .await;
    assert_eq!(
        t["unhealthy_endpoints"][0]["last_error"],
        format!("nothing listens on {upstream}"),
        "{t}"
    );
    wg.wait_for_metrics("the unhealthy gauge", LIMIT, |m| {
        sample(m, "wakegate_unhealthy_endpoints", "") == Some(1.0)
    })
    .await;
    assert_eq!(
        sample(&wg.metrics().await, "http_requests_total", ""),
        None,
        "no request was needed"
    );

    let _listening = Upstream::listen(socket);
    wg.wait_for_target("api", LIMIT, |t| t["state"] == "ready")
        .await;
    let r = wg.get("api.localhost", "/").await;
    assert_eq!(r.status, 200, "{}", r.body);
}
