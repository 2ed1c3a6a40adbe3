//! Per-instance concurrency (`instance_concurrency`): an instance never gets more requests at
//! once than its target declares; the rest wait in wakegate, in order, bounded like a hold,
//! and count as demand, so that the target scales up.

use std::sync::Arc;
use std::time::Duration;

use wakegate_test_support::*;

/// A local demo target `name` on `name.localhost` whose instances take `limit` requests at
/// once, and that holds a request at most `hold` (its `cold_start_timeout`), with `extra` TOML
/// lines.
fn limited(name: &str, limit: u32, hold: &str, extra: &str) -> String {
    format!(
        r#"
[[target]]
name = "{name}"
hosts = ["{name}.localhost"]
command = {}
ready = {{ http_get = "/healthz" }}
cold_start_timeout = "{hold}"
instance_concurrency = {limit}
{extra}
"#,
        demo_command("0s")
    )
}

/// The demo backend's own count of the requests it handled at once, at most.
async fn most_at_once(wg: &Wakegate, host: &str) -> u64 {
    let r = wg.get(host, "/concurrency").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let load: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    load["max"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_never_gets_more_than_its_instance_concurrency_and_every_request_is_answered() {
    let targets = limited("slow", 2, "20s", "scaling = { max = 1 }");
    let wg = Arc::new(Wakegate::start("", &targets).await);
    assert_eq!(wg.target("slow").await["instance_concurrency"], 2);

    let requests: Vec<_> = (0..5)
        .map(|_| {
            let wg = wg.clone();
            tokio::spawn(async move { wg.get("slow.localhost", "/sleep?ms=1500").await })
        })
        .collect();
    // Two at the instance, three waiting in wakegate for a slot, held and counted.
    wg.wait_for_metrics("three requests queued", Duration::from_secs(20), |m| {
        metric(m, "wakegate_queued_requests", "service=\"slow\"") == Some(3.0)
    })
    .await;
    let metrics = wg.metrics().await;
    assert_eq!(
        metric(&metrics, "wakegate_pending_requests", "service=\"slow\""),
        Some(3.0),
        "queued requests are held"
    );
    assert_eq!(
        metric(&metrics, "http_requests_in_flight", "service=\"slow\""),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "wakegate_instance_concurrency",
            "service=\"slow\""
        ),
        Some(2.0)
    );
    for request in requests {
        let r = request.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body, "slept 1500 ms\n");
    }
    assert_eq!(most_at_once(&wg, "slow.localhost").await, 2);
    let t = wg.target("slow").await;
    assert_eq!(
        (t["instances"].as_u64(), t["queued"].as_u64()),
        (Some(1), Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_finds_every_instance_busy_longer_than_the_hold_bound_gets_503() {
    let targets = limited("busy", 1, "1s", "scaling = { min = 1, max = 1 }");
    let wg = Arc::new(Wakegate::start("", &targets).await);
    wg.wait_for_target("busy", Duration::from_secs(20), |t| t["instances"] == 1)
        .await;

    let slow = {
        let wg = wg.clone();
        tokio::spawn(async move { wg.get("busy.localhost", "/sleep?ms=4000").await })
    };
    wg.wait_for_target("busy", Duration::from_secs(10), |t| t["in_flight"] == 1)
        .await;
    let r = wg.get("busy.localhost", "/").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.headers["retry-after"], "1");
    assert!(
        r.body
            .contains("every instance of target busy was busy (1 requests each at once) for 1s"),
        "{}",
        r.body
    );
    let metrics = wg.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "wakegate_rejected_requests_total",
            "reason=\"concurrency_timeout\""
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "wakegate_queued_requests", "service=\"busy\""),
        Some(0.0)
    );
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "the instance's own request is unharmed");
    assert_eq!(most_at_once(&wg, "busy.localhost").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_a_slot_are_demand_and_scale_the_target_up() {
    // The concurrency target (10 by default) is capped at the instance concurrency: four
    // requests at once want four instances, three at most.
    let targets = limited(
        "grow",
        1,
        "20s",
        "idle_timeout = \"30s\"\nscaling = { min = 0, max = 3, stable_window = \"4s\", panic_window = \"2s\" }",
    );
    let wg = Arc::new(Wakegate::start("[autoscaler]\ninterval = \"200ms\"", &targets).await);
    let requests: Vec<_> = (0..4)
        .map(|_| {
            let wg = wg.clone();
            tokio::spawn(async move { wg.get("grow.localhost", "/sleep?ms=3000").await })
        })
        .collect();
    wg.wait_for_metrics("requests queued for a slot", Duration::from_secs(20), |m| {
        metric(m, "wakegate_queued_requests", "service=\"grow\"").unwrap_or(0.0) >= 1.0
    })
    .await;
    let grown = wg
        .wait_for_target("grow", Duration::from_secs(20), |t| {
            t["instances"].as_u64() >= Some(2)
        })
        .await;
    assert!(grown["desired"].as_u64() >= Some(2), "{grown}");
    for request in requests {
        let r = request.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let metrics = wg.metrics().await;
    assert!(
        metric(&metrics, "wakegate_scale_events_total", "direction=\"up\"").unwrap() >= 1.0,
        "{metrics}"
    );
}
