//! Waking a cold target: held requests, the cold-start header, starting exactly once, and
//! instances that notify their own readiness.

use std::time::{Duration, Instant};

use wakegate_test_support::*;

fn hello(delay: &str) -> String {
    demo_target("hello", "hello.localhost", delay)
}

/// The target `hello` running `command` (a TOML array), ready when it notifies.
fn notifying(command: &str) -> String {
    format!(
        r#"
[[target]]
name = "hello"
hosts = ["hello.localhost"]
command = {command}
ready = {{ notify = true }}
cold_start_timeout = "20s"
"#
    )
}

/// The first request to the cold target `hello`: answered 200 by the demo backend, marked as a
/// cold start, and no sooner than the backend's start-up `delay`.
async fn first_request_waits_for_the_start(wg: &Wakegate, delay: Duration) -> Response {
    let began = Instant::now();
    let first = within(10, "first request", wg.get("hello.localhost", "/")).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert!(began.elapsed() >= delay, "waited for the start-up delay");
    assert_eq!(first.headers["x-wakegate-cold-start"], "true");
    assert!(first.body.starts_with("hello from demo-backend"));
    first
}

#[tokio::test]
async fn cold_request_waits_until_ready_then_succeeds_with_cold_start_header() {
    let wg = Wakegate::start("", &hello("300ms")).await;
    assert_eq!(wg.target("hello").await["state"], "cold");

    let first = first_request_waits_for_the_start(&wg, Duration::from_millis(300)).await;

    let warm = wg.get("hello.localhost", "/").await;
    assert_eq!(warm.status, 200);
    assert!(
        warm.headers.get("x-wakegate-cold-start").is_none(),
        "warm requests are not marked"
    );
    assert_eq!(pid_in(&warm.body), pid_in(&first.body), "same instance");
    assert_eq!(wg.target("hello").await["state"], "ready");
}

#[tokio::test]
async fn concurrent_requests_during_a_cold_start_all_succeed_and_start_one_process() {
    let wg = std::sync::Arc::new(Wakegate::start("", &hello("500ms")).await);
    let requests: Vec<_> = (0..200)
        .map(|_| {
            let wg = wg.clone();
            tokio::spawn(async move { wg.get("hello.localhost", "/").await })
        })
        .collect();
    let mut pids = std::collections::HashSet::new();
    for r in requests {
        let r = r.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        pids.insert(pid_in(&r.body));
    }
    assert_eq!(pids.len(), 1, "one process served every request");
    let metrics = wg.metrics().await;
    assert_eq!(
        metric(&metrics, "wakegate_cold_starts_total", "service=\"hello\""),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "http_requests_total",
            "service=\"hello\",method=\"GET\",code=\"200\""
        ),
        Some(200.0)
    );
}

#[tokio::test]
async fn a_notify_target_takes_its_first_request_once_the_instance_sends_ready() {
    let wg = Wakegate::start("", &notifying(&demo_command("300ms"))).await;

    first_request_waits_for_the_start(&wg, Duration::from_millis(300)).await;
    assert_eq!(wg.target("hello").await["state"], "ready");
    assert!(
        wg.notify_sockets_removed(Duration::from_secs(2)).await,
        "the notify socket is removed once the instance is ready"
    );
}

#[tokio::test]
async fn a_notification_from_a_process_the_instance_started_counts() {
    // The shell is the instance; the demo backend, its child, notifies.
    let bin = bin();
    let command = format!(
        r#"["sh", "-c", "'{bin}' demo-backend --port {{port}} --startup-delay 100ms & wait"]"#
    );
    let wg = Wakegate::start("", &notifying(&command)).await;

    let first = within(10, "first request", wg.get("hello.localhost", "/")).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.headers["x-wakegate-cold-start"], "true");
    let instance = wg.started_pids()[0];
    assert_ne!(pid_in(&first.body), instance, "served by the shell's child");
}

#[tokio::test]
async fn a_wake_that_starts_several_instances_is_one_cold_start() {
    let target = format!("{}scaling = {{ min = 2, max = 2 }}\n", hello("300ms"));
    let wg = Wakegate::start("", &target).await;
    wg.wait_for_target("hello", Duration::from_secs(15), |t| t["instances"] == 2)
        .await;
    // A start whose free port another process took first is tried again on a new port
    // (logged); on a busy machine that can happen.
    let port_retries = wg.logs().matches("port taken by another process").count();
    assert_eq!(
        wg.started_pids().len(),
        2 + port_retries,
        "two instances started:\n{}",
        wg.logs()
    );
    let metrics = wg.metrics().await;
    assert_eq!(
        metric(&metrics, "wakegate_cold_starts_total", "service=\"hello\""),
        Some(1.0),
        "one wake from zero, whatever the number of instances: {metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "wakegate_cold_start_duration_seconds_count",
            "service=\"hello\""
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_start_whose_port_another_process_took_meanwhile_is_retried_on_a_new_port() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("squatted");
    let script = dir.path().join("start.sh");
    // The first start finds its port taken by another process (one that never says it is
    // ready), as can happen between wakegate picking a free port and the instance binding it.
    std::fs::write(
        &script,
        format!(
            r#"port=$1
if [ ! -e "{marker}" ]; then
    touch "{marker}"
    env -u NOTIFY_SOCKET "{bin}" demo-backend --port "$port" &
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.01; done
fi
exec "{bin}" demo-backend --port "$port"
"#,
            marker = marker.display(),
            bin = bin(),
        ),
    )
    .unwrap();
    let wg = Wakegate::start(
        "",
        &notifying(&format!(r#"["bash", "{}", "{{port}}"]"#, script.display())),
    )
    .await;

    let first = within(15, "first request", wg.get("hello.localhost", "/")).await;
    assert_eq!(first.status, 200, "{}\n{}", first.body, wg.logs());
    assert_eq!(first.headers["x-wakegate-cold-start"], "true");
    let started = wg.started_pids();
    assert_eq!(started.len(), 2, "one start, retried once:\n{}", wg.logs());
    assert_eq!(
        pid_in(&first.body),
        started[1],
        "served by the second attempt"
    );
    assert!(
        wg.logs().contains("trying a new port"),
        "says why it retried:\n{}",
        wg.logs()
    );
    let target = wg.target("hello").await;
    assert_eq!(
        target["last_start_failure"],
        serde_json::Value::Null,
        "{target}"
    );
}
