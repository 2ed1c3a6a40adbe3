//! Scaling a local target on a PromQL query, against a real Prometheus server (Debian's
//! `prometheus` package) that scrapes wakegate's own `/metrics`.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::process::{Child, Command};
use wakegate_test_support::*;

/// A Prometheus server on a free port, scraping `admin` every second as job `wakegate`.
fn start_prometheus(dir: &Path, port: u16, admin: std::net::SocketAddr) -> Child {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: wakegate\n    static_configs:\n      - targets: ['{admin}']\n"
        ),
    )
    .expect("write prometheus.yml");
    Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `prometheus` ({e}): these tests need a real Prometheus server; \
                 install it (Debian: `apt-get install prometheus`; .ci/run does)"
            )
        })
}

/// A port nothing listens on now, for a server that cannot be told to use port 0 and report it.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind port 0")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_scales_on_a_prometheus_query_and_keeps_its_count_when_prometheus_goes_away() {
    wakegate_test_support::needs_tool!("prometheus", "Debian: apt-get install prometheus");
    let port = free_port();
    // Request rate over the last 5 s, as Prometheus scraped it from this wakegate: 5 per
    // second per instance.
    let targets = format!(
        r#"
[[target]]
name = "busy"
hosts = ["busy.localhost"]
command = {}
ready = {{ http_get = "/healthz" }}
idle_timeout = "1s"
scaling = {{ min = 0, max = 3, target = 5, stable_window = "2s", panic_window = "1s", scale_down_delay = "1s", source = {{ prometheus = "http://127.0.0.1:{port}", query = 'sum(rate(http_requests_total{{job="wakegate",service="busy"}}[5s]))', every = "300ms" }} }}
"#,
        demo_command("100ms")
    );
    let wg = Arc::new(Wakegate::start("[autoscaler]\ninterval = \"200ms\"", &targets).await);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut prometheus = start_prometheus(dir.path(), port, wg.admin);

    // Four clients in a loop: far more than 15 requests a second.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (wg, stop) = (wg.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = wg.get("busy.localhost", "/").await;
                    assert_eq!(r.status, 200, "{}", r.body);
                }
            })
        })
        .collect();

    wg.wait_for_metrics(
        "the query's value above 3 × 5 requests a second",
        Duration::from_secs(60),
        |m| metric(m, "wakegate_prometheus_query_value", "service=\"busy\"").unwrap_or(0.0) > 15.0,
    )
    .await;
    wg.wait_for_target("busy", Duration::from_secs(30), |t| t["desired"] == 3)
        .await;
    assert_eq!(
        metric(
            &wg.metrics().await,
            "wakegate_replicas_desired",
            "service=\"busy\""
        ),
        Some(3.0)
    );

    // Load stops and Prometheus goes away at once: its last value still asks for 3.
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("every request answered 200");
    }
    let logged_before_kill = wg.logs().lines().count();
    prometheus.kill().await.expect("stop prometheus");
    let failures = |m: &str| {
        metric(
            m,
            "wakegate_prometheus_query_failures_total",
            "reason=\"unreachable\"",
        )
        .unwrap_or(0.0)
    };
    let before = failures(&wg.metrics().await);
    // Ten failed queries at 300 ms: three times the idle timeout and more than every window.
    wg.wait_for_metrics(
        "queries counted as failed while Prometheus is down",
        Duration::from_secs(30),
        |m| failures(m) >= before + 10.0,
    )
    .await;
    let t = wg.target("busy").await;
    assert_ne!(t["desired"], 0, "scaled to zero on missing data: {t}");
    assert_ne!(t["instances"], 0, "instances stopped on missing data: {t}");
    let failed = |l: &serde_json::Value| {
        l["message"] == "the Prometheus query failed; keeping the last scaling decision"
            && l["reason"] == "unreachable"
    };
    wg.wait_for_log("saying the query failed", Duration::from_secs(5), failed)
        .await;
    let warnings = wg
        .logs()
        .lines()
        .skip(logged_before_kill)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| failed(l))
        .count();
    assert_eq!(
        warnings,
        1,
        "logged once per change of state:\n{}",
        wg.logs()
    );
}
