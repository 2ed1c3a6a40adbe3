//! Micro-benchmark of balancing: one `pick` (P2C over the ready endpoints, a lease taken and
//! returned) for a target with one and with four endpoints, with no instance concurrency limit
//! (the warm path most targets take) and with one.
//!
//! `cargo bench --bench balance`
//!
//! Measured when `instance_concurrency` came (2-core KVM, 2026-11-30, bench profile without
//! LTO for build time, the same for both runs): without a limit, 59 / 58 ns (1 / 4 endpoints)
//! before it and 55 / 53 ns after, no cost; with one, 69 / 72 ns (the slot's compare-and-swap,
//! the queue's reference in the lease, and a look at the queue when the lease is returned).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wakegate::config::Config;
use wakegate::proxy::balance;
use wakegate::target::{Endpoint, Phase, Target};

fn target(endpoints: usize, extra: &str) -> std::sync::Arc<Target> {
    let text = format!(
        "[[target]]\nname = \"api\"\nhosts = [\"api.localhost\"]\nupstream = \"127.0.0.1:9000\"\n{extra}\n"
    );
    let config = Config::first_target(&text);
    let target = Target::new(config);
    let ready = (0..endpoints)
        .map(|i| Endpoint::new(format!("127.0.0.1:{}", 9000 + i).parse().unwrap()))
        .collect();
    target.publish(ready, Phase::Ready);
    target
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    group.throughput(Throughput::Elements(1));
    for (name, extra) in [
        ("unlimited", ""),
        ("instance_concurrency", "instance_concurrency = 100"),
    ] {
        for n in [1, 4] {
            let target = target(n, extra);
            group.bench_function(format!("{name}/{n}_endpoints"), |b| {
                b.iter(|| drop(black_box(balance::pick(black_box(&target)))))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, pick);
criterion_main!(benches);
