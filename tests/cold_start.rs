//! Waking a cold target: held requests, the cold-start header, and starting exactly once.

mod support;

use std::time::{Duration, Instant};

use support::*;

fn hello(delay: &str) -> String {
    demo_target("hello", "hello.localhost", delay)
}

#[tokio::test]
async fn cold_request_waits_until_ready_then_succeeds_with_cold_start_header() {
    let wg = Wakegate::start("", &hello("300ms")).await;
    assert_eq!(wg.target("hello").await["state"], "cold");

    let began = Instant::now();
    let first = wg.get("hello.localhost", "/").await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert!(
        began.elapsed() >= Duration::from_millis(300),
        "waited for the start-up delay"
    );
    assert_eq!(first.headers["x-wakegate-cold-start"], "true");
    assert!(first.body.starts_with("hello from demo-backend"));

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
