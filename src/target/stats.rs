//! Per-target counters: in-flight, held, requests by method and status, latency histograms,
//! cold starts and scale events. Atomics only (no lock, no allocation per request); the metrics
//! collector and the autoscaler read the very same values.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use http::Method;

/// Method label values; the last one stands for every other method.
pub const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "_OTHER",
];

pub fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::CONNECT => 5,
        Method::OPTIONS => 6,
        Method::TRACE => 7,
        Method::PATCH => 8,
        _ => 9,
    }
}

/// Why a request was answered by wakegate itself instead of a target instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    QueueFull,
    ColdStartTimeout,
    StartFailed,
    Upstream,
    UpstreamTimeout,
    ShuttingDown,
    TargetRemoved,
    /// A gRPC request's own deadline (`grpc-timeout`) passed while it was held.
    Deadline,
    /// The client's request body was malformed (a bad chunk) or broke off while forwarded.
    BadBody,
    /// The target's crash back-off was in force: no start was tried.
    StartBackoff,
    /// Its client was over the target's per-client rate limit.
    RateLimited,
    /// Every endpoint of the target was unhealthy: none was tried.
    UpstreamUnhealthy,
    /// The target's held requests pinned `max_pending_bytes` already.
    QueueBytes,
    /// All targets' held requests together reached `[limits]` `max_held_requests` or
    /// `max_held_bytes`.
    HoldLimit,
    /// wakegate's resident memory was over `[limits]` `memory_budget`.
    MemoryBudget,
    /// Every instance stayed at the target's instance concurrency for as long as a hold may
    /// last.
    ConcurrencyTimeout,
}

impl Reject {
    pub const ALL: [Reject; 16] = [
        Reject::QueueFull,
        Reject::ColdStartTimeout,
        Reject::StartFailed,
        Reject::Upstream,
        Reject::UpstreamTimeout,
        Reject::ShuttingDown,
        Reject::TargetRemoved,
        Reject::Deadline,
        Reject::BadBody,
        Reject::StartBackoff,
        Reject::RateLimited,
        Reject::UpstreamUnhealthy,
        Reject::QueueBytes,
        Reject::HoldLimit,
        Reject::MemoryBudget,
        Reject::ConcurrencyTimeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reject::QueueFull => "queue_full",
            Reject::ColdStartTimeout => "cold_start_timeout",
            Reject::StartFailed => "start_failed",
            Reject::Upstream => "upstream_error",
            Reject::UpstreamTimeout => "upstream_timeout",
            Reject::ShuttingDown => "shutting_down",
            Reject::TargetRemoved => "target_removed",
            Reject::Deadline => "deadline_exceeded",
            Reject::BadBody => "bad_body",
            Reject::StartBackoff => "start_backoff",
            Reject::RateLimited => "rate_limited",
            Reject::UpstreamUnhealthy => "upstream_unhealthy",
            Reject::QueueBytes => "queue_bytes",
            Reject::HoldLimit => "hold_limit",
            Reject::MemoryBudget => "memory_budget",
            Reject::ConcurrencyTimeout => "concurrency_timeout",
        }
    }
}

/// Request counts keyed by (method, status code): a small lock-free open-addressing table.
/// A target sees few distinct pairs; should more than `SLOTS` appear, the rest are counted
/// under method `_OTHER`, code `_OTHER`.
#[derive(Debug)]
pub struct RequestCounts {
    keys: [AtomicU32; Self::SLOTS],
    counts: [AtomicU64; Self::SLOTS],
    overflow: AtomicU64,
}

impl Default for RequestCounts {
    fn default() -> Self {
        Self {
            keys: std::array::from_fn(|_| AtomicU32::new(0)),
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            overflow: AtomicU64::new(0),
        }
    }
}

impl RequestCounts {
    const SLOTS: usize = 32;

    pub fn add(&self, method: usize, code: u16) {
        let key = ((method as u32 + 1) << 16) | code as u32;
        let start = (key.wrapping_mul(2_654_435_761) >> 27) as usize;
        for probe in 0..Self::SLOTS {
            let i = (start + probe) % Self::SLOTS;
            let have = self.keys[i].load(Ordering::Acquire);
            let owned = have == key
                || (have == 0
                    && match self.keys[i].compare_exchange(
                        0,
                        key,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => true,
                        Err(now) => now == key,
                    });
            if owned {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        self.overflow.fetch_add(1, Ordering::Relaxed);
    }

    /// Every (method label, code, count) seen so far.
    pub fn each(&self, mut f: impl FnMut(&'static str, Option<u16>, u64)) {
        for (key, count) in self.keys.iter().zip(&self.counts) {
            let key = key.load(Ordering::Acquire);
            if key != 0 {
                let method = METHODS[((key >> 16) - 1) as usize];
                f(
                    method,
                    Some((key & 0xffff) as u16),
                    count.load(Ordering::Relaxed),
                );
            }
        }
        let overflow = self.overflow.load(Ordering::Relaxed);
        if overflow > 0 {
            f("_OTHER", None, overflow);
        }
    }

    pub fn total(&self) -> u64 {
        let mut total = 0;
        self.each(|_, _, n| total += n);
        total
    }
}

/// A fixed-bucket histogram of durations with atomic buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One per bound, plus +Inf; not cumulative.
    counts: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

pub const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
pub const COLD_START_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.partition_point(|b| *b < secs);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts with +Inf last) as the encoder wants them.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, count, buckets)
    }
}

/// The integral over time of the requests a target is serving or holding, kept so that a
/// reader can derive the time-weighted average concurrency of any interval: short requests
/// between two readings are never missed. Times are microseconds since the target's epoch.
#[derive(Debug, Default)]
pub struct Concurrency {
    active: AtomicI64,
    /// Sum of the start times of the active requests.
    active_starts: AtomicU64,
    /// Sum of the durations of finished requests.
    finished: AtomicU64,
}

impl Concurrency {
    pub fn begin(&self, at_us: u64) {
        self.active_starts.fetch_add(at_us, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    pub fn end(&self, started_us: u64, at_us: u64) {
        self.finished
            .fetch_add(at_us.saturating_sub(started_us), Ordering::Relaxed);
        self.active_starts.fetch_sub(started_us, Ordering::Relaxed);
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    /// Request-seconds accumulated up to `at_us` (the epoch is zero).
    pub fn integral(&self, at_us: u64) -> f64 {
        self.integral_us(at_us) as f64 / 1e6
    }

    /// Request-microseconds accumulated up to `at_us`: exact, for differences.
    pub fn integral_us(&self, at_us: u64) -> u64 {
        let active = self.active.load(Ordering::Relaxed).max(0) as u64;
        let starts = self.active_starts.load(Ordering::Relaxed);
        let finished = self.finished.load(Ordering::Relaxed);
        let open = (active * at_us).saturating_sub(starts);
        finished + open
    }
}

/// Everything counted for one target.
#[derive(Debug)]
pub struct Stats {
    /// Requests forwarded to an instance whose response has not finished yet.
    pub in_flight: AtomicI64,
    /// Requests held while no instance is ready, or while every one is at the target's
    /// instance concurrency.
    pub pending: AtomicI64,
    /// What the held requests pin (see `proxy::hold::admit`).
    pub pending_bytes: AtomicU64,
    pub requests: RequestCounts,
    pub duration: Histogram,
    pub cold_starts: AtomicU64,
    pub cold_start_duration: Histogram,
    rejected: [AtomicU64; Reject::ALL.len()],
    /// Requests arriving → response finished, holding included: the autoscaler's signal.
    pub concurrency: Concurrency,
    pub scaled_up: AtomicU64,
    pub scaled_down: AtomicU64,
    /// Milliseconds since the target's epoch at the last request's arrival, plus one (0 = never).
    last_request: AtomicU64,
    /// The Prometheus query of a target that scales on one.
    pub query: QueryStats,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            in_flight: AtomicI64::new(0),
            pending: AtomicI64::new(0),
            pending_bytes: AtomicU64::new(0),
            requests: RequestCounts::default(),
            duration: Histogram::new(REQUEST_BUCKETS),
            cold_starts: AtomicU64::new(0),
            cold_start_duration: Histogram::new(COLD_START_BUCKETS),
            rejected: std::array::from_fn(|_| AtomicU64::new(0)),
            concurrency: Concurrency::default(),
            scaled_up: AtomicU64::new(0),
            scaled_down: AtomicU64::new(0),
            last_request: AtomicU64::new(0),
            query: QueryStats::default(),
        }
    }
}

impl Stats {
    pub fn reject(&self, why: Reject) {
        self.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected(&self, why: Reject) -> u64 {
        self.rejected[why as usize].load(Ordering::Relaxed)
    }

    pub fn touch(&self, since_epoch: Duration) {
        self.last_request
            .store(since_epoch.as_millis() as u64 + 1, Ordering::Relaxed);
    }

    /// Time since the target's epoch of the last request's arrival, if any.
    pub fn last_request(&self) -> Option<Duration> {
        match self.last_request.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms - 1)),
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst).max(0) as u64
    }

    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::SeqCst).max(0) as u64
    }
}

/// Decrements a counter when dropped, so every exit path (error, cancel, client gone) counts.
#[derive(Debug)]
pub struct CountGuard<'a>(&'a AtomicI64);

impl<'a> CountGuard<'a> {
    pub fn new(counter: &'a AtomicI64) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        CountGuard(counter)
    }

    /// Counts one more only while the counter is below `limit`.
    pub fn below(counter: &'a AtomicI64, limit: i64) -> Option<Self> {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| CountGuard(counter))
    }
}

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An amount added to a counter while the sum stays within a limit, taken off when dropped.
#[derive(Debug)]
pub struct Reserved<'a> {
    counter: &'a AtomicU64,
    amount: u64,
}

impl<'a> Reserved<'a> {
    /// Adds `amount` if the counter then stays within `limit`, or if the counter is zero:
    /// one request larger than a limit alone is still let through when nothing else is.
    pub fn within(counter: &'a AtomicU64, amount: u64, limit: u64) -> Option<Self> {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n == 0 || n.saturating_add(amount) <= limit).then_some(n.saturating_add(amount))
            })
            .ok()
            .map(|_| Reserved { counter, amount })
    }

    /// Adds up to `amount`, as much as keeps the counter within `limit`: what is left of a
    /// shared allowance.
    pub fn up_to(counter: &'a AtomicU64, amount: u64, limit: u64) -> Self {
        let mut taken = 0;
        let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            taken = amount.min(limit.saturating_sub(n));
            Some(n + taken)
        });
        Reserved {
            counter,
            amount: taken,
        }
    }

    pub fn amount(&self) -> u64 {
        self.amount
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.amount, Ordering::SeqCst);
    }
}

/// Why a Prometheus query gave no usable value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryFailure {
    /// No connection, or no complete answer within the query's time limit.
    Unreachable,
    /// An HTTP status other than 2xx, without a Prometheus error in the body.
    HttpStatus,
    /// Not the JSON of Prometheus's query API.
    BadResponse,
    /// Prometheus answered `"status": "error"` (a bad query, a timeout on its side).
    QueryError,
    /// An empty vector: no series matched.
    Empty,
    /// NaN or ±Inf.
    NotFinite,
}

impl QueryFailure {
    pub const ALL: [QueryFailure; 6] = [
        QueryFailure::Unreachable,
        QueryFailure::HttpStatus,
        QueryFailure::BadResponse,
        QueryFailure::QueryError,
        QueryFailure::Empty,
        QueryFailure::NotFinite,
    ];

    pub fn label(self) -> &'static str {
        match self {
            QueryFailure::Unreachable => "unreachable",
            QueryFailure::HttpStatus => "http_status",
            QueryFailure::BadResponse => "bad_response",
            QueryFailure::QueryError => "query_error",
            QueryFailure::Empty => "empty_result",
            QueryFailure::NotFinite => "not_finite",
        }
    }
}

/// The last value of a target's Prometheus query and its failures, by reason.
#[derive(Debug)]
pub struct QueryStats {
    /// The bits of the last good value; NaN until there is one.
    value: AtomicU64,
    failures: [AtomicU64; QueryFailure::ALL.len()],
}

impl Default for QueryStats {
    fn default() -> Self {
        Self {
            value: AtomicU64::new(f64::NAN.to_bits()),
            failures: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl QueryStats {
    pub fn set_value(&self, value: f64) {
        self.value.store(value.to_bits(), Ordering::Relaxed);
    }

    /// The last good value, if a query has given one.
    pub fn value(&self) -> Option<f64> {
        Some(f64::from_bits(self.value.load(Ordering::Relaxed))).filter(|v| !v.is_nan())
    }

    pub fn fail(&self, why: QueryFailure) {
        self.failures[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn failures(&self, why: QueryFailure) -> u64 {
        self.failures[why as usize].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_counts_keep_each_method_and_code_apart() {
        let c = RequestCounts::default();
        for _ in 0..3 {
            c.add(0, 200);
        }
        c.add(2, 503);
        let mut seen = Vec::new();
        c.each(|m, code, n| seen.push((m, code, n)));
        seen.sort();
        assert_eq!(seen, vec![("GET", Some(200), 3), ("POST", Some(503), 1)]);
        assert_eq!(c.total(), 4);
    }

    #[test]
    fn request_counts_overflow_is_still_counted() {
        let c = RequestCounts::default();
        for code in 100..200 {
            c.add(0, code);
        }
        assert_eq!(c.total(), 100);
    }

    #[test]
    fn concurrency_integral_counts_finished_and_open_requests() {
        let c = Concurrency::default();
        c.begin(0);
        c.begin(1_000_000);
        c.end(0, 2_000_000); // 2 s
        // At 3 s: 2 s finished + 2 s of the open one.
        assert!((c.integral(3_000_000) - 4.0).abs() < 1e-9);
        c.end(1_000_000, 3_000_000);
        assert!(
            (c.integral(10_000_000) - 4.0).abs() < 1e-9,
            "nothing open any more"
        );
    }

    #[test]
    fn count_guard_below_never_passes_its_limit() {
        let counter = AtomicI64::new(0);
        let a = CountGuard::below(&counter, 2).expect("room");
        let _b = CountGuard::below(&counter, 2).expect("room");
        assert!(CountGuard::below(&counter, 2).is_none(), "full");
        drop(a);
        assert!(CountGuard::below(&counter, 2).is_some(), "room again");
        assert_eq!(counter.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn histogram_places_observations_in_their_bucket() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(5));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 5.55).abs() < 1e-9);
        assert_eq!(buckets, vec![(0.1, 1), (1.0, 1), (f64::INFINITY, 1)]);
    }
}
