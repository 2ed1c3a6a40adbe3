//! Micro-benchmarks of the per-request work wakegate does before and after forwarding:
//! the route lookup (host, path) → target at 10 / 1,000 / 10,000 routes, and the counting
//! path (in-flight guard, request counter, latency histogram).
//!
//! `cargo bench --bench routing`; `cargo bench --bench routing -- lookup/10000` for one group.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::Method;
use wakegate::config::route::HostPattern;
use wakegate::proxy::route::{RouteTable, host_of};
use wakegate::target::stats::{CountGuard, Stats, method_index};

const SIZES: [usize; 3] = [10, 1_000, 10_000];

/// A table shaped like a real deployment of `n` routes: 70 % exact hosts on `/`, 20 % exact
/// hosts split by path prefix, 10 % `*.suffix` wildcards, and one catch-all `*`.
fn table(n: usize) -> RouteTable<usize> {
    let mut table = RouteTable::default();
    for i in 0..n - 1 {
        let (host, prefix) = match i % 10 {
            0 => (format!("*.team{i}.example.org"), "/".to_owned()),
            1 | 2 => (format!("api{}.example.com", i / 10), format!("/v{i}/")),
            _ => (format!("svc{i}.ns{}.example.com", i % 50), "/".to_owned()),
        };
        table.insert(&HostPattern::parse(&host).unwrap(), &prefix, i);
    }
    table.insert(&HostPattern::Any, "/", n - 1);
    table
}

/// One lookup of each kind, for a table built by [`table`] with `n` routes.
fn queries(n: usize) -> [(&'static str, String, String); 4] {
    // The last route of each kind inserted, so nothing is found first by luck.
    let last = |kind: usize| (0..n - 1).rev().find(|i| i % 10 == kind).unwrap();
    let (wildcard, prefixed, exact) = (last(0), last(2), last(3));
    [
        (
            "exact",
            format!("svc{exact}.ns{}.example.com", exact % 50),
            "/users/42".to_owned(),
        ),
        (
            "prefix",
            format!("api{}.example.com", prefixed / 10),
            format!("/v{prefixed}/items"),
        ),
        (
            "wildcard",
            format!("www.team{wildcard}.example.org"),
            "/".to_owned(),
        ),
        // Unknown host: every wildcard is tried before the catch-all answers.
        (
            "catch_all",
            "unknown.example.net".to_owned(),
            "/".to_owned(),
        ),
    ]
}

fn lookup(c: &mut Criterion) {
    for n in SIZES {
        let routes = table(n);
        assert_eq!(routes.len(), n);
        let mut group = c.benchmark_group(format!("lookup/{n}"));
        group.throughput(Throughput::Elements(1));
        for (kind, host, path) in queries(n) {
            assert!(routes.lookup(&host, &path).is_some(), "{kind} misses");
            group.bench_function(kind, |b| {
                b.iter(|| routes.lookup(black_box(&host), black_box(&path)))
            });
        }
        // What the proxy does per request: strip the port from the Host header, then look up.
        let authority = format!("{}:8080", queries(n)[0].1);
        group.bench_function("host_of+exact", |b| {
            b.iter(|| {
                let host = host_of(black_box(&authority));
                routes.lookup(&host, black_box("/users/42")).copied()
            })
        });
        group.finish();
    }
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    group.sample_size(10);
    for n in SIZES {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| table(n))
        });
    }
    group.finish();
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("host_pattern_parse");
    for (kind, text) in [
        ("exact", "svc123.ns7.example.com"),
        ("wildcard", "*.team9.example.org"),
        ("any", "*"),
    ] {
        group.bench_function(kind, |b| b.iter(|| HostPattern::parse(black_box(text))));
    }
    group.finish();
}

/// The counting a proxied request does: touch, in-flight guard, request counter, histogram.
#[inline]
fn count_one(stats: &Stats, started: Instant, method: &Method) {
    stats.touch(started.elapsed());
    let guard = CountGuard::new(&stats.in_flight);
    drop(black_box(guard));
    stats.requests.add(method_index(method), 200);
    stats.duration.observe(started.elapsed());
}

fn counting(c: &mut Criterion) {
    let mut group = c.benchmark_group("count");
    group.throughput(Throughput::Elements(1));
    let stats = Stats::default();
    let method = Method::GET;
    group.bench_function("requests.add", |b| {
        b.iter(|| {
            stats
                .requests
                .add(method_index(black_box(&method)), black_box(200))
        })
    });
    group.bench_function("duration.observe", |b| {
        b.iter(|| {
            stats
                .duration
                .observe(black_box(Duration::from_micros(740)))
        })
    });
    group.bench_function("in_flight_guard", |b| {
        b.iter(|| drop(black_box(CountGuard::new(&stats.in_flight))))
    });
    let epoch = Instant::now();
    group.bench_function("request", |b| {
        b.iter(|| count_one(&stats, black_box(epoch), black_box(&method)))
    });
    // Two threads counting on the same target: the cost of sharing its cache lines.
    group.bench_function("request_2_threads_same_target", |b| {
        b.iter_custom(|iters| {
            let barrier = Barrier::new(2);
            std::thread::scope(|s| {
                let worker = || {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        count_one(&stats, black_box(epoch), black_box(&method));
                    }
                    start.elapsed()
                };
                let other = s.spawn(worker);
                let mine = worker();
                mine.max(other.join().unwrap())
            })
        })
    });
    group.finish();
    assert!(stats.requests.total() > 0);
}

criterion_group!(benches, lookup, build, parse, counting);
criterion_main!(benches);
