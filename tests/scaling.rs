//! Autoscaling a local target from its own traffic.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use wakegate_test_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_load_scales_a_local_target_from_zero_to_three_and_back_with_every_request_answered() {
    let targets = format!(
        r#"
[[target]]
name = "busy"
hosts = ["busy.localhost"]
command = {}
ready = {{ http_get = "/healthz" }}
idle_timeout = "2s"
scaling = {{ min = 0, max = 3, target = 2, stable_window = "4s", panic_window = "2s", scale_down_delay = "1s" }}
"#,
        demo_command("200ms")
    );
    let wg = Arc::new(Wakegate::start("[autoscaler]\ninterval = \"200ms\"", &targets).await);
    assert_eq!(wg.target("busy").await["instances"], 0);

    // Eight clients in a loop on a 200 ms endpoint: concurrency 8, target 2 per instance.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (wg, stop, answered) = (wg.clone(), stop.clone(), answered.clone());
            tokio::spawn(async move {
                let mut pids = std::collections::HashSet::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = wg.get("busy.localhost", "/sleep?ms=200").await;
                    assert_eq!(r.status, 200, "{}", r.body);
                    answered.fetch_add(1, Ordering::Relaxed);
                    let who = wg.get("busy.localhost", "/").await;
                    assert_eq!(who.status, 200, "{}", who.body);
                    pids.insert(pid_in(&who.body));
                }
                pids
            })
        })
        .collect();

    let at_peak = wg
        .wait_for_target("busy", Duration::from_secs(20), |t| t["instances"] == 3)
        .await;
    assert_eq!(at_peak["desired"], 3, "never more than max");
    // Keep the load a moment so every instance serves.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut pids = std::collections::HashSet::new();
    for c in clients {
        pids.extend(c.await.expect("every request answered 200"));
    }
    assert!(pids.len() >= 2, "load was spread over instances: {pids:?}");
    assert!(answered.load(Ordering::Relaxed) > 20);

    wg.wait_for_target("busy", Duration::from_secs(20), |t| {
        t["instances"] == 0 && t["state"] == "cold"
    })
    .await;
    for pid in pids {
        assert!(!process_alive(pid), "instance {pid} stopped");
    }
    let metrics = wg.metrics().await;
    assert!(metric(&metrics, "wakegate_scale_events_total", "direction=\"up\"").unwrap() >= 1.0);
    assert!(
        metric(
            &metrics,
            "wakegate_scale_events_total",
            "direction=\"down\""
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(
        metric(&metrics, "wakegate_replicas_desired", "service=\"busy\""),
        Some(0.0)
    );
    assert!(
        metric(
            &metrics,
            "wakegate_concurrency_seconds_total",
            "service=\"busy\""
        )
        .unwrap()
            > 1.0
    );
    let not_ok: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("http_requests_total{") && !l.contains("code=\"200\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(not_ok, 0.0, "no request failed:\n{metrics}");
}
