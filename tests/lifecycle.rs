//! A target's life as users see it: stopped when idle and woken again by the next request, no
//! request lost around a stop, counted per target, and never outliving wakegate.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use wakegate_test_support::*;

/// Autoscaler ticks often enough for a 1s idle timeout to be observed within 100ms.
const FAST_TICKS: &str = "[autoscaler]\ninterval = \"100ms\"";

/// One local target named `name` on `name.localhost`, running `command` (a TOML array).
fn local_target(name: &str, command: &str, idle_timeout: &str) -> String {
    format!(
        r#"
[[target]]
name = "{name}"
hosts = ["{name}.localhost"]
command = {command}
ready = {{ http_get = "/healthz" }}
idle_timeout = "{idle_timeout}"
cold_start_timeout = "20s"
"#
    )
}

fn is_cold(t: &serde_json::Value) -> bool {
    t["state"] == "cold" && t["instances"] == 0
}

#[tokio::test]
async fn idle_target_is_stopped_after_its_idle_timeout_and_the_next_request_starts_it_again() {
    let wg = Wakegate::start(
        FAST_TICKS,
        &local_target("hello", &demo_command("0s"), "1s"),
    )
    .await;

    let first = within(10, "first request", wg.get("hello.localhost", "/")).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let pid = pid_in(&first.body);
    assert!(process_alive(pid));
    let last_request = Instant::now();
    let warm = within(5, "warm request", wg.get("hello.localhost", "/")).await;
    assert_eq!(warm.status, 200);
    assert_eq!(pid_in(&warm.body), pid);

    wg.wait_for_target("hello", Duration::from_secs(5), is_cold)
        .await;
    assert!(
        last_request.elapsed() >= Duration::from_secs(1),
        "stopped only after the idle timeout, here after {:?}",
        last_request.elapsed()
    );
    assert!(!process_alive(pid), "the idle instance (pid {pid}) is gone");

    let again = within(10, "request after the stop", wg.get("hello.localhost", "/")).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.headers["x-wakegate-cold-start"], "true");
    assert_ne!(pid_in(&again.body), pid, "a new instance answers");
    assert_eq!(
        metric(
            &wg.metrics().await,
            "wakegate_cold_starts_total",
            "service=\"hello\""
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn requests_arriving_while_the_instance_stops_are_held_and_served_by_a_new_one() {
    // The wrapper shell lingers 1s after SIGTERM (its demo backend exits at once), which
    // keeps the target visibly "stopping" long enough to send requests into that window.
    let bin = bin();
    let command = format!(
        r#"["sh", "-c", "trap 'sleep 1; exit 0' TERM; '{bin}' demo-backend --port {{port}} & wait"]"#
    );
    let wg = Arc::new(Wakegate::start(FAST_TICKS, &local_target("hello", &command, "1s")).await);
    let first = within(10, "first request", wg.get("hello.localhost", "/")).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let old_pid = pid_in(&first.body);

    wg.wait_for_target("hello", Duration::from_secs(5), |t| {
        t["state"] == "stopping"
    })
    .await;
    let requests: Vec<_> = (0..10)
        .map(|_| {
            let wg = wg.clone();
            tokio::spawn(async move { wg.get("hello.localhost", "/").await })
        })
        .collect();
    let mut pids = HashSet::new();
    for r in requests {
        let r = within(10, "request sent while stopping", r).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.headers["x-wakegate-cold-start"], "true", "it was held");
        pids.insert(pid_in(&r.body));
    }
    assert_eq!(pids.len(), 1, "one new instance served them all: {pids:?}");
    assert!(!pids.contains(&old_pid), "not the stopped instance");
    assert!(!process_alive(old_pid));
    assert_eq!(
        metric(
            &wg.metrics().await,
            "wakegate_cold_starts_total",
            "service=\"hello\""
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn requests_spaced_around_the_idle_timeout_all_succeed() {
    // Gaps step across the 300ms idle timeout, so requests land just before, during and just
    // after each idle stop.
    let head = "[autoscaler]\ninterval = \"20ms\"";
    let wg = Wakegate::start(head, &local_target("hello", &demo_command("0s"), "300ms")).await;
    let (mut warm, mut cold) = (0, 0);
    for gap_ms in std::iter::once(0).chain((240..=460).step_by(20)) {
        tokio::time::sleep(Duration::from_millis(gap_ms)).await;
        let r = within(10, "request", wg.get("hello.localhost", "/")).await;
        assert_eq!(r.status, 200, "after a {gap_ms}ms gap: {}", r.body);
        if r.headers.contains_key("x-wakegate-cold-start") {
            cold += 1;
        } else {
            warm += 1;
        }
    }
    assert!(
        warm > 0 && cold > 1,
        "gaps crossed the idle timeout both ways: {warm} warm, {cold} cold"
    );
    let metrics = wg.metrics().await;
    assert_eq!(
        metric(&metrics, "wakegate_cold_starts_total", "service=\"hello\""),
        Some(f64::from(cold))
    );
    assert_eq!(
        metric(
            &metrics,
            "http_requests_total",
            "service=\"hello\",method=\"GET\",code=\"200\""
        ),
        Some(f64::from(warm + cold))
    );
}

#[tokio::test]
async fn metrics_count_each_target_by_method_and_code_without_host_or_path_labels() {
    let upstream = DemoBackend::start().await;
    let targets = format!(
        r#"{}
[[target]]
name = "api"
hosts = ["api.localhost"]
upstream = "{}"
"#,
        local_target("app", &demo_command("0s"), "5m"),
        upstream.addr
    );
    let wg = Wakegate::start("", &targets).await;

    for _ in 0..2 {
        let r = within(10, "GET app", wg.get("app.localhost", "/")).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let post = Request::post("/echo")
        .body(Full::new(Bytes::from_static(b"hi")))
        .unwrap();
    let r = within(5, "POST app", wg.send(wg.proxy, "app.localhost", post)).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "hi"));
    let r = within(5, "GET api", wg.get("api.localhost", "/")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = within(5, "GET api missing", wg.get("api.localhost", "/missing")).await;
    assert_eq!(r.status, 404, "the backend's own 404 is passed through");

    // In-flight counts end with the response body, a moment after the client has it.
    let deadline = Instant::now() + Duration::from_secs(2);
    let text = loop {
        let text = wg.metrics().await;
        let settled = ["app", "api"].iter().all(|s| {
            metric(
                &text,
                "http_requests_in_flight",
                &format!("service=\"{s}\""),
            ) == Some(0.0)
        });
        if settled || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let requests: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("http_requests_total{"))
        .collect();
    assert_eq!(
        requests.len(),
        4,
        "one sample per (service, method, code): {requests:#?}"
    );
    for (labels, value) in [
        ("service=\"app\",method=\"GET\",code=\"200\"", 2.0),
        ("service=\"app\",method=\"POST\",code=\"200\"", 1.0),
        ("service=\"api\",method=\"GET\",code=\"200\"", 1.0),
        ("service=\"api\",method=\"GET\",code=\"404\"", 1.0),
    ] {
        assert_eq!(
            metric(&text, "http_requests_total", labels),
            Some(value),
            "{labels}\n{text}"
        );
    }
    for (service, count) in [("app", 3.0), ("api", 2.0)] {
        let labels = format!("namespace=\"local\",service=\"{service}\"");
        assert_eq!(
            metric(&text, "http_request_duration_seconds_count", &labels),
            Some(count),
            "{labels}"
        );
        assert_eq!(
            metric(&text, "http_requests_in_flight", &labels),
            Some(0.0),
            "{labels}"
        );
        assert_eq!(
            metric(&text, "wakegate_pending_requests", &labels),
            Some(0.0),
            "{labels}"
        );
    }

    let allowed = [
        "namespace",
        "service",
        "method",
        "code",
        "reason",
        "direction",
        "le",
        // One value per proxy worker: bounded by the CPUs.
        "worker",
    ];
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((_, rest)) = line.split_once('{') else {
            continue;
        };
        let labels = rest.rsplit_once('}').map_or(rest, |(labels, _)| labels);
        for pair in labels.split(',') {
            let key = pair.split('=').next().unwrap_or_default();
            assert!(allowed.contains(&key), "label {key:?} in {line}");
        }
        for leak in [".localhost", "/missing", "/echo", "127.0.0.1"] {
            assert!(!line.contains(leak), "{leak:?} leaked into {line}");
        }
    }
}

#[tokio::test]
async fn an_instance_does_not_outlive_wakegate_killed_with_sigkill() {
    let mut wg = Wakegate::start("", &local_target("hello", &demo_command("0s"), "5m")).await;
    let r = within(10, "request", wg.get("hello.localhost", "/")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let pid = pid_in(&r.body);
    assert!(process_alive(pid));

    wg.signal(libc::SIGKILL);
    assert_eq!(wg.wait_exit(Duration::from_secs(5)).await, None, "killed");
    within(5, "the instance to die with wakegate", async {
        while process_alive(pid) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}
