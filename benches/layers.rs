//! What tower's layers would cost per request against what wakegate does without them, for
//! the two request-path stages tower offers: admission to a target's bounded hold queue
//! (`CountGuard::below` against tower's `LoadShed<ConcurrencyLimit<_>>`, which also fails fast
//! when full) and the upstream response timeout (`tokio::time::timeout` against tower's
//! `Timeout`). Each variant is driven as the proxy would drive it, one request at a time on a
//! current-thread runtime, around a service that answers at once.
//!
//! `cargo bench --bench layers`

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::atomic::AtomicI64;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tower::ServiceExt;
use tower::limit::ConcurrencyLimit;
use tower::load_shed::LoadShed;
use tower::service_fn;
use tower::timeout::Timeout;
use wakegate::target::stats::CountGuard;

const LIMIT: i64 = 1000;
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

async fn upstream(request: u64) -> Result<u64, Infallible> {
    Ok(black_box(request) + 1)
}

/// Times `iters` requests made by `one` inside a single runtime entry.
fn per_request<F, Fut>(runtime: &tokio::runtime::Runtime, iters: u64, one: F) -> Duration
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = u64>,
{
    runtime.block_on(async {
        let began = Instant::now();
        for i in 0..iters {
            black_box(one(i).await);
        }
        began.elapsed()
    })
}

fn layers(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("layers");

    let held = AtomicI64::new(0);
    group.bench_function("admission/count_guard", |b| {
        b.iter_custom(|iters| {
            per_request(&runtime, iters, |i| {
                let guard = CountGuard::below(&held, LIMIT);
                async move {
                    let answer = upstream(i).await.unwrap_or_default();
                    drop(guard);
                    answer
                }
            })
        })
    });
    let limited = LoadShed::new(ConcurrencyLimit::new(service_fn(upstream), LIMIT as usize));
    group.bench_function("admission/tower_load_shed_concurrency_limit", |b| {
        b.iter_custom(|iters| {
            per_request(&runtime, iters, |i| {
                let service = limited.clone();
                async move { service.oneshot(i).await.unwrap_or_default() }
            })
        })
    });

    group.bench_function("timeout/tokio", |b| {
        b.iter_custom(|iters| {
            per_request(&runtime, iters, |i| async move {
                tokio::time::timeout(RESPONSE_TIMEOUT, upstream(i))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default()
            })
        })
    });
    let timed = Timeout::new(service_fn(upstream), RESPONSE_TIMEOUT);
    group.bench_function("timeout/tower", |b| {
        b.iter_custom(|iters| {
            per_request(&runtime, iters, |i| {
                let service = timed.clone();
                async move { service.oneshot(i).await.unwrap_or_default() }
            })
        })
    });
    group.bench_function("baseline/no_stage", |b| {
        b.iter_custom(|iters| {
            per_request(&runtime, iters, |i| async move {
                upstream(i).await.unwrap_or_default()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, layers);
criterion_main!(benches);
