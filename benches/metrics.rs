//! Micro-benchmark of a `/metrics` scrape with 1,000 targets: `Metrics::encode()` over a
//! snapshot like the one `control` publishes, every target's counters holding data (several
//! method × status pairs, both histograms, rejections, scale events).
//!
//! `cargo bench --bench metrics`

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prometheus_client::registry::Registry;
use wakegate::config::File;
use wakegate::metrics::Metrics;
use wakegate::proxy::route::RouteTable;
use wakegate::proxy::{Shared, Snapshot};
use wakegate::target::Target;
use wakegate::target::stats::{Reject, method_index};

const TARGETS: usize = 1_000;

/// A snapshot of `n` targets, half local processes and half fixed upstreams, with traffic.
fn snapshot(n: usize) -> Snapshot {
    let mut text = String::new();
    for i in 0..n {
        let runs = if i % 2 == 0 {
            r#"command = ["wakegate", "demo-backend", "--port", "{port}"]"#.to_owned()
        } else {
            format!("upstream = \"127.0.0.1:{}\"", 10_000 + i)
        };
        text.push_str(&format!(
            "[[target]]\nname = \"svc-{i}\"\nnamespace = \"ns-{}\"\nhosts = [\"svc-{i}.example.com\"]\n{runs}\n\n",
            i % 20
        ));
    }
    let config = File::parse(&text)
        .ok()
        .and_then(|file| file.into_config().ok())
        .expect("a valid generated config");
    let mut routes = RouteTable::default();
    let mut targets = Vec::with_capacity(n);
    for t in config.targets {
        let hosts = t.route.hosts.clone();
        let target = Target::new(t);
        for host in &hosts {
            routes.insert(host, "/", target.clone());
        }
        fill(&target);
        targets.push(target);
    }
    Snapshot { routes, targets }
}

/// Counters as after some traffic: the usual method × status pairs, latencies spread over the
/// buckets, a cold start, a rejection, scale events and requests in flight.
fn fill(t: &Target) {
    let s = &t.stats;
    for (method, code, times) in [
        (http::Method::GET, 200, 50),
        (http::Method::GET, 404, 3),
        (http::Method::POST, 201, 10),
        (http::Method::POST, 500, 1),
        (http::Method::DELETE, 204, 2),
    ] {
        for _ in 0..times {
            s.requests.add(method_index(&method), code);
        }
    }
    for ms in [0.3, 0.8, 2.0, 7.0, 20.0, 80.0, 300.0, 1_200.0] {
        s.duration.observe(Duration::from_secs_f64(ms / 1000.0));
    }
    s.cold_starts.fetch_add(1, Ordering::Relaxed);
    s.cold_start_duration.observe(Duration::from_millis(450));
    s.reject(Reject::QueueFull);
    s.scaled_up.fetch_add(2, Ordering::Relaxed);
    s.scaled_down.fetch_add(1, Ordering::Relaxed);
    s.in_flight.fetch_add(3, Ordering::Relaxed);
    s.concurrency.begin(1_000);
    s.concurrency.end(1_000, 9_000);
    t.set_desired(1);
}

fn encode(c: &mut Criterion) {
    let snapshot = Arc::new(ArcSwap::from_pointee(snapshot(TARGETS)));
    let (_, drain_timeout) = tokio::sync::watch::channel(Duration::from_secs(30));
    let proxy = Arc::new(Shared::new(
        snapshot,
        drain_timeout,
        None,
        tokio::sync::watch::channel(wakegate::config::Limits::default()).1,
    ));
    for _ in 0..7 {
        proxy
            .unrouted
            .count(wakegate::proxy::edge::Refusal::NoRoute);
    }
    let metrics = Metrics::new(Registry::default(), proxy);
    let text = metrics.encode();
    assert!(
        text.contains("service=\"svc-999\""),
        "every target is encoded"
    );
    assert!(text.contains("code=\"500\""), "request counters have data");

    let mut group = c.benchmark_group("metrics");
    group.sample_size(30);
    // Bytes per scrape, so criterion also reports the encoding rate.
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function(format!("encode/{TARGETS}_targets"), |b| {
        b.iter(|| black_box(metrics.encode()))
    });
    group.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
