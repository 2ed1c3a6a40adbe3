//! The errors a client can get from wakegate itself: each with its status, a short plain-text
//! reason, quickly, and counted in `wakegate_rejected_requests_total`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wakegate_test_support::*;

/// One local target `hello` on `hello.localhost`; `extra` adds or overrides fields.
fn hello(command: &str, extra: &str) -> String {
    format!(
        r#"
[[target]]
name = "hello"
hosts = ["hello.localhost"]
command = {command}
{extra}
"#
    )
}

/// Asserts that `r` is one of wakegate's own short plain-text answers, and returns its body.
fn plain_reason(r: &Response) -> &str {
    assert!(
        r.headers[http::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "{:?}",
        r.headers
    );
    let id = r.headers["x-request-id"].to_str().unwrap();
    let (reason, rest) = r
        .body
        .split_once('\n')
        .unwrap_or_else(|| panic!("a reason, then the request id: {:?}", r.body));
    assert_eq!(rest, format!("request id: {id}\n"), "{:?}", r.body);
    assert!(
        !reason.is_empty() && reason.len() < 200,
        "a short one-line reason: {reason:?}"
    );
    reason
}

fn rejected(metrics: &str, reason: &str) -> Option<f64> {
    metric(
        metrics,
        "wakegate_rejected_requests_total",
        &format!("reason=\"{reason}\""),
    )
}

#[tokio::test]
async fn requests_beyond_max_pending_get_503_with_retry_after_at_once() {
    let extra =
        "ready = { http_get = \"/healthz\" }\nmax_pending = 2\ncold_start_timeout = \"20s\"";
    let wg = Arc::new(Wakegate::start("", &hello(&demo_command("3s"), extra)).await);
    let requests: Vec<_> = (0..5)
        .map(|_| {
            let wg = wg.clone();
            tokio::spawn(async move {
                let began = Instant::now();
                let r = wg.get("hello.localhost", "/").await;
                (r, began.elapsed())
            })
        })
        .collect();
    let (mut held, mut turned_away) = (0, 0);
    for request in requests {
        let (r, took) = within(15, "request", request).await.unwrap();
        match r.status.as_u16() {
            200 => {
                held += 1;
                assert_eq!(r.headers["x-wakegate-cold-start"], "true");
                assert!(
                    took >= Duration::from_secs(3),
                    "held for the start: {took:?}"
                );
            }
            503 => {
                turned_away += 1;
                assert!(took < Duration::from_secs(1), "rejected at once: {took:?}");
                let retry_after: u64 = r.headers[http::header::RETRY_AFTER]
                    .to_str()
                    .unwrap()
                    .parse()
                    .expect("Retry-After in seconds");
                assert!(retry_after >= 1);
                let reason = plain_reason(&r);
                assert!(reason.contains("hello"), "{reason}");
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert_eq!((held, turned_away), (2, 3), "max_pending = 2 are held");
    let metrics = wg.metrics().await;
    assert_eq!(rejected(&metrics, "queue_full"), Some(3.0));
    assert_eq!(
        metric(&metrics, "wakegate_pending_requests", "service=\"hello\""),
        Some(0.0)
    );
}

/// A 504 for a target that never became ready, near its 1s cold-start timeout; returns the
/// running wakegate.
async fn assert_cold_start_times_out(target: &str) -> Wakegate {
    let wg = Wakegate::start("", target).await;
    let began = Instant::now();
    let r = within(10, "request", wg.get("hello.localhost", "/")).await;
    let took = began.elapsed();
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_millis(2500),
        "answered near the timeout: {took:?}"
    );
    let reason = plain_reason(&r);
    assert!(
        reason.contains("hello") && reason.contains("1s"),
        "{reason}"
    );
    assert_eq!(
        rejected(&wg.metrics().await, "cold_start_timeout"),
        Some(1.0)
    );
    wg
}

#[tokio::test]
async fn a_target_slower_than_its_cold_start_timeout_gets_504() {
    let extra = "ready = { http_get = \"/healthz\" }\ncold_start_timeout = \"1s\"";
    assert_cold_start_times_out(&hello(&demo_command("10s"), extra)).await;
}

#[tokio::test]
async fn a_target_whose_readiness_check_never_passes_gets_504() {
    let extra = "ready = { http_get = \"/nope\" }\ncold_start_timeout = \"1s\"";
    assert_cold_start_times_out(&hello(&demo_command("0s"), extra)).await;
}

#[tokio::test]
async fn a_notify_target_that_never_sends_ready_gets_504_and_its_process_is_stopped() {
    // Listening, so a `tcp` check would pass, but never told where to notify.
    let bin = bin();
    let command = format!(
        r#"["sh", "-c", "unset NOTIFY_SOCKET; exec '{bin}' demo-backend --port {{port}}"]"#
    );
    let extra = "ready = { notify = true }\ncold_start_timeout = \"1s\"";
    let wg = assert_cold_start_times_out(&hello(&command, extra)).await;

    let pid = wg.started_pids()[0];
    let target = wg
        .wait_for_target("hello", Duration::from_secs(5), |t| {
            t["state"] == "cold" && !t["last_start_failure"].is_null()
        })
        .await;
    assert!(
        target["last_start_failure"]
            .as_str()
            .is_some_and(|why| why.contains("not ready within 1s")),
        "{target}"
    );
    assert!(!process_alive(pid), "the instance (pid {pid}) was stopped");
    assert!(
        wg.notify_sockets_removed(Duration::from_secs(2)).await,
        "the notify socket is removed with the failed start"
    );
}

/// A target whose program exits at once, with a back-off after its first failure of `first`.
fn failing(name: &str, first: &str) -> String {
    format!(
        r#"
[[target]]
name = "{name}"
hosts = ["{name}.localhost"]
command = ["sh", "-c", "echo starting {name}; echo 'fatal: no such file: app.conf' >&2; sleep 0.2; exit 3"]
cold_start_timeout = "20s"
start_backoff = "{first}"
"#
    )
}

#[tokio::test]
async fn a_target_that_keeps_failing_to_start_is_backed_off_and_requests_meanwhile_get_503_at_once()
{
    let wg = Wakegate::start(
        "",
        &format!("{}{}", failing("hello", "1m"), failing("quick", "300ms")),
    )
    .await;
    let starts = |metrics: &str, name: &str| {
        metric(
            metrics,
            "wakegate_cold_starts_total",
            &format!("service=\"{name}\""),
        )
    };

    // The first request tries a start, and gets its failure at once.
    let began = Instant::now();
    let r = within(10, "request", wg.get("hello.localhost", "/")).await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "not held until the timeout"
    );
    // The client gets a short reason and a request id; the cause is in the log, under that id.
    assert_eq!(plain_reason(&r), "target hello failed to start");
    let id = r.headers["x-request-id"].to_str().unwrap();
    let logged = wg
        .wait_for_log(
            &format!("with request id {id}"),
            Duration::from_secs(5),
            |line| line["request_id"] == id,
        )
        .await;
    assert_eq!(logged["message"], "request failed", "{logged}");
    assert_eq!(logged["status"], 502, "{logged}");
    assert!(
        logged["error"].as_str().is_some_and(
            |e| e.starts_with("target hello failed to start: ") && e.contains("exit status: 3")
        ),
        "{logged}"
    );

    // Then no start for a minute: twenty requests get 503 at once, saying so.
    for _ in 0..20 {
        let r = within(
            5,
            "request during the back-off",
            wg.get("hello.localhost", "/"),
        )
        .await;
        assert_eq!(r.status, 503, "{}", r.body);
        let retry_after: u64 = r.headers[http::header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (50..=60).contains(&retry_after),
            "Retry-After: {retry_after}"
        );
        let reason = plain_reason(&r);
        assert!(
            reason.contains("failed to start 1 time(s) in a row")
                && reason.contains("next start is tried in"),
            "{reason}"
        );
    }
    let metrics = wg.metrics().await;
    assert_eq!(
        starts(&metrics, "hello"),
        Some(1.0),
        "one start, not one per request"
    );
    assert_eq!(rejected(&metrics, "start_failed"), Some(1.0));
    assert_eq!(rejected(&metrics, "start_backoff"), Some(20.0));
    let waiting = metric(
        &metrics,
        "wakegate_start_backoff_seconds",
        "service=\"hello\"",
    );
    assert!(
        waiting.is_some_and(|s| (50.0..=60.0).contains(&s)),
        "{waiting:?}"
    );
    let target = wg.target("hello").await;
    // The instance's last output lines say why it exited.
    let why = target["last_start_failure"].as_str().unwrap();
    assert!(
        why.contains("exit status: 3")
            && why.contains("\"starting hello\"")
            && why.contains("\"fatal: no such file: app.conf\""),
        "{target}"
    );
    assert_eq!(target["backoff"]["failures"], 1, "{target}");

    // Once a back-off is over, the next request tries again (the doubling is unit-tested).
    for attempt in 1..=2 {
        let r = within(10, "request", wg.get("quick.localhost", "/")).await;
        assert_eq!(r.status, 502, "{}", r.body);
        assert_eq!(
            starts(&wg.metrics().await, "quick"),
            Some(f64::from(attempt))
        );
        wg.wait_for_target("quick", Duration::from_secs(5), |t| t["backoff"].is_null())
            .await;
    }
}

#[tokio::test]
async fn an_instance_that_crashes_soon_after_it_became_ready_starts_the_back_off_too() {
    let bin = bin();
    let command = format!(
        r#"["sh", "-c", "{bin} demo-backend --port {{port}} & b=$!; sleep 1; kill $b; exit 1"]"#
    );
    let extra = "ready = { http_get = \"/healthz\" }\nstart_backoff = \"1m\"";
    let wg = Wakegate::start("", &hello(&command, extra)).await;
    assert_eq!(wg.get("hello.localhost", "/").await.status, 200);

    wg.wait_for_target("hello", Duration::from_secs(10), |t| {
        t["backoff"]["failures"] == 1
    })
    .await;
    let target = wg.target("hello").await;
    let why = target["last_start_failure"].as_str().unwrap_or_default();
    assert!(
        why.contains("exited (exit status: 1)") && why.contains("after it became ready"),
        "{target}"
    );
    let r = within(
        5,
        "request during the back-off",
        wg.get("hello.localhost", "/"),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        plain_reason(&r).contains("next start is tried in"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn a_start_that_is_never_ready_says_what_the_readiness_probe_saw() {
    // A readiness path that answers 404, and an app that ignores its port.
    let bin = bin();
    let targets = format!(
        r#"
[[target]]
name = "wrong-path"
hosts = ["wrong-path.localhost"]
command = {}
ready = {{ http_get = "/missing" }}
cold_start_timeout = "1s"

[[target]]
name = "wrong-port"
hosts = ["wrong-port.localhost"]
command = ["{bin}", "demo-backend", "--port", "0"]
cold_start_timeout = "1s"
"#,
        demo_command("0s")
    );
    let wg = Wakegate::start("", &targets).await;
    for (name, saw) in [
        ("wrong-path", "GET /missing answered 404 Not Found"),
        ("wrong-port", "the instance listens on port"),
    ] {
        let r = within(10, "request", wg.get(&format!("{name}.localhost"), "/")).await;
        assert_eq!(r.status, 504, "{name}: {}", r.body);
        wg.wait_for_target(name, Duration::from_secs(5), |t| {
            !t["last_start_failure"].is_null()
        })
        .await;
        let target = wg.target(name).await;
        let why = target["last_start_failure"].as_str().unwrap_or_default();
        assert!(
            why.contains("not ready within 1s") && why.contains(saw),
            "{name}: {why}"
        );
        // And what the instance wrote, which names the address it listens on.
        assert!(
            why.contains("its last output: \"demo-backend listening on 127.0.0.1:"),
            "{name}: {why}"
        );
    }
    let why = wg.target("wrong-port").await["last_start_failure"].clone();
    assert!(
        why.as_str()
            .is_some_and(|w| w.contains("the last readiness probe: nothing listens on 127.0.0.1:")),
        "{why}"
    );
}

#[tokio::test]
async fn unrouted_hosts_get_404_requests_without_host_get_400_and_nothing_is_proxied_elsewhere() {
    let extra = "ready = { http_get = \"/healthz\" }";
    let wg = Wakegate::start("", &hello(&demo_command("0s"), extra)).await;

    let r = within(5, "unknown host", wg.get("nowhere.localhost", "/")).await;
    assert_eq!(r.status, 404);
    let reason = plain_reason(&r);
    assert!(reason.contains("no route"), "{reason}");

    let r = raw_exchange(wg.proxy, "GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(raw_status(&r), 400, "{r}");
    assert!(r.contains("Host"), "says why: {r}");

    let r = raw_exchange(
        wg.proxy,
        "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&r), 404, "{r}");

    // An absolute-form request for a loopback server wakegate does not route must not reach it.
    let bystander = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = bystander.local_addr().unwrap();
    let r = raw_exchange(
        wg.proxy,
        &format!("GET http://{at}/ HTTP/1.1\r\nHost: {at}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(raw_status(&r), 404, "{r}");
    let reached = tokio::time::timeout(Duration::from_millis(200), bystander.accept()).await;
    assert!(
        reached.is_err(),
        "wakegate connected to {at}: an open proxy"
    );

    let metrics = wg.metrics().await;
    assert_eq!(rejected(&metrics, "no_route"), Some(3.0));
    assert_eq!(rejected(&metrics, "bad_request"), Some(1.0));
    assert_eq!(
        metric(&metrics, "wakegate_cold_starts_total", "service=\"hello\""),
        Some(0.0),
        "no target was woken"
    );
}

#[tokio::test]
async fn a_missing_program_or_working_directory_is_named_as_such_and_not_sent_to_the_client() {
    let missing_dir =
        std::env::temp_dir().join(format!("wakegate-no-such-dir-{}", std::process::id()));
    let targets = format!(
        r#"
[[target]]
name = "noprogram"
hosts = ["noprogram.localhost"]
command = ["wakegate-no-such-program", "{{port}}"]

[[target]]
name = "nocwd"
hosts = ["nocwd.localhost"]
command = ["sh", "-c", "exec sleep 60"]
cwd = "{}"
"#,
        missing_dir.display()
    );
    let wg = Wakegate::start("", &targets).await;
    for (name, why) in [
        (
            "noprogram",
            "cannot run wakegate-no-such-program: No such file or directory".to_owned(),
        ),
        (
            "nocwd",
            format!(
                "cannot start in {}: the target's cwd is not an existing directory",
                missing_dir.display()
            ),
        ),
    ] {
        let r = within(10, "request", wg.get(&format!("{name}.localhost"), "/")).await;
        assert_eq!(r.status, 502, "{name}: {}", r.body);
        assert_eq!(plain_reason(&r), format!("target {name} failed to start"));
        let target = wg
            .wait_for_target(name, Duration::from_secs(5), |t| {
                !t["last_start_failure"].is_null()
            })
            .await;
        let failure = target["last_start_failure"].as_str().unwrap();
        assert!(failure.starts_with(&why), "{name}: {failure}");
    }
}

#[tokio::test]
async fn an_upstream_s_malformed_response_gets_502_and_the_log_says_what_was_wrong() {
    // An upstream whose every answer has two different lengths: which one frames the body
    // cannot be told, so nothing of it may reach the client (RFC 9112 §6.3).
    let at =
        raw_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 5\r\n\r\nsmuggled")
            .await;
    let targets =
        format!("[[target]]\nname = \"bad\"\nhosts = [\"bad.localhost\"]\nupstream = \"{at}\"\n");
    let wg = Wakegate::start("", &targets).await;
    let r = within(5, "the answer", wg.get("bad.localhost", "/")).await;
    assert_eq!(r.status, 502);
    let reason = plain_reason(&r);
    assert!(reason.contains("failed before responding"), "{reason}");
    assert!(!r.body.contains("smuggled"), "{:?}", r.body);
    wg.wait_for_log("naming the fault", Duration::from_secs(5), |line| {
        line.to_string()
            .contains("conflicting Content-Length values")
    })
    .await;
    let metrics = wg.metrics().await;
    assert_eq!(rejected(&metrics, "upstream_error"), Some(1.0));
}
