//! The runtime handle of one target, shared by the data plane (which reads its ready
//! endpoints and counts its requests) and the control plane (which publishes endpoints and
//! state, and listens for wake requests). The lowest runtime layer: it knows the
//! configuration and nothing above it.

pub mod health;
pub mod rate_limit;
pub mod slots;
pub mod stats;
pub mod streams;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::config::route::Refusal;
use crate::config::{Backend, Fixed, Scaling, Serving, TargetConfig};
use health::Health;
use rate_limit::RateLimiter;
use slots::Slots;
use stats::Stats;
use streams::{Close, Streams};

/// Lifecycle of a target as users see it in `/targets`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Cold,
    Starting,
    Ready,
    Stopping,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Cold => "cold",
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Stopping => "stopping",
        }
    }
}

/// What the control plane publishes about a target; held requests wait on changes to it.
#[derive(Debug, Clone)]
pub struct Status {
    pub phase: Phase,
    /// Incremented each time a start attempt fails; held requests that saw a lower value
    /// fail at once instead of waiting for their timeout.
    pub start_failures: u64,
    pub last_failure: Option<Arc<str>>,
    /// After starts that failed (or instances that crashed soon after starting), no start is
    /// tried before its end; requests meanwhile fail at once.
    pub backoff: Option<Backoff>,
    /// Set once the target is taken out of service; requests held for it go where it says.
    pub retired: Option<Successor>,
}

/// A crash back-off in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Failed starts and early crashes in a row.
    pub failures: u32,
    /// No start is tried before this.
    pub until: Instant,
}

impl Backoff {
    /// The longest wait (unless the first one is longer).
    pub const MAX: Duration = Duration::from_secs(60);
    /// An instance that stays up this long after becoming ready was a healthy run: the count
    /// of failures in a row starts again.
    pub const HEALTHY_RUN: Duration = Duration::from_secs(30);

    /// The back-off after `failures` in a row, from `now`: `first`, doubled with each further
    /// failure, at most [`Backoff::MAX`] (or `first`, if longer).
    pub fn after(failures: u32, first: Duration, now: Instant) -> Self {
        let doublings = failures.saturating_sub(1).min(16);
        let wait = first
            .saturating_mul(1 << doublings)
            .min(Self::MAX.max(first));
        Self {
            failures,
            until: now + wait,
        }
    }

    /// How long until the next start may be tried, if that is still ahead.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        Some(self.until.checked_duration_since(now)?).filter(|d| !d.is_zero())
    }
}

/// The scaling signal as the autoscaler last sampled it: cluster-wide where it adds what other
/// wakegate replicas counted (on the leader, or wherever peers are scraped).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Signal {
    /// Time-weighted average of the requests in flight or held, over the panic window.
    pub concurrency: f64,
    /// Requests answered per second, over the panic window.
    pub rps: f64,
    /// Requests in flight or held at the sample, other replicas' included.
    pub demand: u64,
    /// The last sample that saw any demand or request, if one did.
    pub last_active: Option<Instant>,
}

/// What became of a retired target.
#[derive(Debug, Clone)]
pub enum Successor {
    /// A reload changed how the target runs: this one serves its requests from now on.
    Replaced(Arc<Target>),
    /// The target is gone from the configuration (or from Kubernetes).
    Removed,
}

/// One instance address that can take requests.
#[derive(Debug)]
pub struct Endpoint {
    pub authority: Authority,
    /// As its requests (and a fixed upstream's active check) found it.
    pub health: Health,
    in_flight: AtomicI64,
    draining: AtomicBool,
    /// Asks the streams open on this endpoint to close.
    close_streams: watch::Sender<Option<Close>>,
}

impl Endpoint {
    pub fn new(authority: Authority) -> Arc<Self> {
        Arc::new(Self {
            authority,
            health: Health::default(),
            in_flight: AtomicI64::new(0),
            draining: AtomicBool::new(false),
            close_streams: watch::Sender::new(None),
        })
    }

    /// Asks every stream open on this endpoint now to close gracefully, for `why`; streams
    /// opened later are not asked.
    pub fn close_streams(&self, why: Close) {
        self.close_streams.send_replace(Some(why));
    }

    /// Resolves when [`Endpoint::close_streams`] is called after this call.
    pub fn streams_closing(&self) -> impl Future<Output = Close> + Send + Sync + 'static {
        let mut asked = self.close_streams.subscribe();
        async move {
            loop {
                if asked.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if let Some(why) = *asked.borrow_and_update() {
                    return why;
                }
            }
        }
    }

    /// Takes a lease for one request, unless the endpoint is draining.
    pub fn lease(self: &Arc<Self>) -> Option<Lease> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        // Checked after counting: a stopper that set `draining` and then read zero in-flight
        // is guaranteed that this request sees `draining` and backs off.
        if self.draining.load(Ordering::SeqCst) {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Lease {
            endpoint: self.clone(),
            slots: None,
        })
    }

    /// Takes a lease for one request within a target's instance concurrency: refused when
    /// the endpoint is draining or has no free slot.
    pub fn lease_within(self: &Arc<Self>, slots: &Arc<Slots>) -> Result<Lease, Refused> {
        if !slots.take(&self.in_flight) {
            return Err(Refused::Full);
        }
        // As in `lease`: checked after counting.
        if self.draining.load(Ordering::SeqCst) {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            slots.freed();
            return Err(Refused::Draining);
        }
        Ok(Lease {
            endpoint: self.clone(),
            slots: Some(slots.clone()),
        })
    }

    /// Stops new leases; returns once every lease is gone or `limit` passed.
    pub async fn drain(&self, limit: Duration) -> bool {
        self.draining.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + limit;
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst).max(0) as u64
    }
}

/// Why an endpoint lent no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// It is taken out of rotation.
    Draining,
    /// It has as many requests as the target's instance concurrency.
    Full,
}

/// One request's claim on an endpoint (and on one of its slots, under an instance
/// concurrency); released on drop.
#[derive(Debug)]
pub struct Lease {
    endpoint: Arc<Endpoint>,
    slots: Option<Arc<Slots>>,
}

impl Lease {
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(slots) = &self.slots {
            slots.freed();
        }
    }
}

/// One target at run time: everything of its configuration but its route, which the control
/// plane keeps (a reload may change the route of a running target).
#[derive(Debug)]
pub struct Target {
    pub name: String,
    pub namespace: String,
    pub serving: Serving,
    pub scaling: Scaling,
    pub backend: Backend,
    pub stats: Stats,
    /// Its long-lived streams, which stop keeping it awake once quiet.
    pub streams: Streams,
    /// The state of `serving.rate_limit`, one table for every worker: the limit holds per
    /// process, whichever worker a client's connections land on.
    pub rate_limiter: Option<RateLimiter>,
    /// The state of `serving.instance_concurrency`, when the target has one.
    pub slots: Option<Arc<Slots>>,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    status: watch::Sender<Status>,
    wake: Notify,
    epoch: Instant,
    /// The instance count the autoscaler last asked for.
    desired: AtomicU32,
    /// Microseconds since `epoch`, plus one, at which the wake from zero under way began
    /// (0: none is).
    waking_since: AtomicU64,
    /// The workload's replica count as its provider last saw it; -1 while unknown (and for
    /// providers that do not report one).
    observed: AtomicI64,
    /// The routes this target asked for and did not get, as last published.
    refused: ArcSwap<Vec<Refusal>>,
    /// Bumped by every request held for want of a ready instance, for those who must know at
    /// once (the KEDA scaler's stream), not at the next sample.
    held: watch::Sender<u64>,
    /// Microseconds since `epoch`, plus one, at which another replica last said it holds a
    /// request for this target (0: none did).
    held_on_peer: AtomicU64,
    signal: watch::Sender<Signal>,
}

impl Target {
    pub fn new(config: TargetConfig) -> Arc<Self> {
        let (status, _) = watch::channel(Status {
            phase: Phase::Cold,
            start_failures: 0,
            last_failure: None,
            backoff: None,
            retired: None,
        });
        let TargetConfig {
            name,
            namespace,
            route: _,
            serving,
            scaling,
            backend,
        } = config;
        let rate_limiter = serving.rate_limit.as_ref().map(RateLimiter::new);
        let slots = serving
            .instance_limit()
            .map(|limit| Arc::new(Slots::new(limit)));
        Arc::new(Self {
            name,
            namespace,
            rate_limiter,
            slots,
            serving,
            scaling,
            backend,
            stats: Stats::default(),
            streams: Streams::default(),
            endpoints: ArcSwap::from_pointee(Vec::new()),
            status,
            wake: Notify::new(),
            epoch: Instant::now(),
            desired: AtomicU32::new(0),
            waking_since: AtomicU64::new(0),
            observed: AtomicI64::new(-1),
            refused: ArcSwap::from_pointee(Vec::new()),
            held: watch::channel(0).0,
            held_on_peer: AtomicU64::new(0),
            signal: watch::channel(Signal::default()).0,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this target runs `config` as it is configured now: then a reload keeps it,
    /// with its instances and counters, whatever the route.
    pub fn runs(&self, config: &TargetConfig) -> bool {
        self.name == config.name
            && self.namespace == config.namespace
            && self.serving == config.serving
            && self.scaling == config.scaling
            && self.backend == config.backend
    }

    /// How often an unhealthy endpoint gets a trial request: never when an active check
    /// decides whether it is healthy.
    pub fn trials(&self) -> Option<Duration> {
        match &self.backend {
            Backend::Fixed(Fixed { check: Some(_), .. }) => None,
            _ => Some(self.serving.health.interval),
        }
    }

    /// Whether the target has ready endpoints and every one of them is unhealthy: it takes
    /// no requests but trials.
    pub fn unhealthy(&self) -> bool {
        let endpoints = self.endpoints();
        !endpoints.is_empty() && endpoints.iter().all(|e| !e.health.is_healthy())
    }

    /// The ready endpoints, as last published (a cheap guard, not a copy).
    pub fn endpoints(&self) -> arc_swap::Guard<Arc<Vec<Arc<Endpoint>>>> {
        self.endpoints.load()
    }

    /// Control plane: publish the ready endpoints, then the phase (held requests wake on the
    /// phase change and find the endpoints already in place).
    pub fn publish(&self, endpoints: Vec<Arc<Endpoint>>, phase: Phase) {
        if !endpoints.is_empty() {
            self.woke();
        }
        self.endpoints.store(Arc::new(endpoints));
        self.status.send_modify(|s| s.phase = phase);
    }

    pub fn set_phase(&self, phase: Phase) {
        self.status.send_if_modified(|s| {
            let changed = s.phase != phase;
            s.phase = phase;
            changed
        });
    }

    /// Control plane: a wake from zero begins, the provider starting an instance of a target
    /// with none ready. Counted once as a cold start, however many instances it starts; it
    /// lasts until the first instance is ready, or the start fails.
    pub fn waking(&self) {
        let now = self.micros(Instant::now()) + 1;
        if self
            .waking_since
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.stats.cold_starts.fetch_add(1, Ordering::Relaxed);
        }
        self.set_phase(Phase::Starting);
    }

    /// An instance is ready: the wake under way, if any, took until now.
    fn woke(&self) {
        let since = self.waking_since.swap(0, Ordering::Relaxed);
        if since != 0 {
            let now = self.micros(Instant::now()) + 1;
            let took = Duration::from_micros(now.saturating_sub(since));
            self.stats.cold_start_duration.observe(took);
        }
    }

    /// Control plane: takes the target out of service. Requests held for it move to the
    /// successor, or fail at once if there is none.
    pub fn retire(&self, successor: Successor) {
        self.status.send_modify(|s| s.retired = Some(successor));
    }

    /// Control plane: a start attempt failed; every request held for it fails now, and those
    /// arriving before `backoff` (if any) ends fail at once.
    pub fn start_failed(&self, reason: String, backoff: Option<Backoff>) {
        // The wake ended; the next start is a new one.
        self.waking_since.store(0, Ordering::Relaxed);
        self.status.send_modify(|s| {
            s.start_failures += 1;
            s.last_failure = Some(reason.into());
            s.backoff = backoff;
        });
    }

    /// Control plane: an instance crashed soon after it started; no start before `backoff`
    /// ends.
    pub fn crashed(&self, reason: String, backoff: Backoff) {
        self.status.send_modify(|s| {
            s.last_failure = Some(reason.into());
            s.backoff = Some(backoff);
        });
    }

    /// Control plane: the back-off is over (a healthy run, or an instance is ready).
    pub fn backoff_cleared(&self) {
        self.status.send_if_modified(|s| s.backoff.take().is_some());
    }

    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Data plane: ask the control plane to start an instance. Cheap and idempotent.
    pub fn request_wake(&self) {
        self.wake.notify_one();
        // Only a held request gets here; with nobody watching, not even a lock is taken.
        if self.held.receiver_count() > 0 {
            self.held.send_modify(|n| *n += 1);
        }
    }

    /// Changes each time a request is held for want of a ready instance, here or (as
    /// another replica says) elsewhere.
    pub fn watch_held(&self) -> watch::Receiver<u64> {
        self.held.subscribe()
    }

    /// Another replica holds a request for this target: it counts as active from now, for
    /// those who must know before the next scrape of that replica (KEDA's stream).
    pub fn held_on_peer(&self) {
        self.held_on_peer
            .store(self.micros(Instant::now()) + 1, Ordering::Relaxed);
        if self.held.receiver_count() > 0 {
            self.held.send_modify(|n| *n += 1);
        }
    }

    /// When another replica last said it holds a request for this target, if one did.
    pub fn last_held_on_peer(&self) -> Option<Instant> {
        match self.held_on_peer.load(Ordering::Relaxed) {
            0 => None,
            at => Some(self.epoch + Duration::from_micros(at - 1)),
        }
    }

    /// Autoscaler: the signal it sampled.
    pub fn publish_signal(&self, signal: Signal) {
        self.signal.send_replace(signal);
    }

    /// The signal as last sampled, and its changes.
    pub fn watch_signal(&self) -> watch::Receiver<Signal> {
        self.signal.subscribe()
    }

    /// Control plane: resolves when a request asked for a wake.
    pub async fn wake_requested(&self) {
        self.wake.notified().await
    }

    pub fn set_desired(&self, replicas: u32) {
        self.desired.store(replicas, Ordering::Relaxed);
    }

    pub fn desired(&self) -> u32 {
        self.desired.load(Ordering::Relaxed)
    }

    /// Control plane: the provider saw the workload at `replicas` (whoever set them).
    pub fn observe_replicas(&self, replicas: u32) {
        self.observed.store(i64::from(replicas), Ordering::Relaxed);
    }

    /// The workload's replica count as the provider last saw it, if it reports one.
    pub fn observed_replicas(&self) -> Option<u32> {
        u32::try_from(self.observed.load(Ordering::Relaxed)).ok()
    }

    /// Control plane: the routes this target asked for and did not get.
    pub fn set_refused(&self, refused: Vec<Refusal>) {
        if **self.refused.load() != refused {
            self.refused.store(Arc::new(refused));
        }
    }

    pub fn refused(&self) -> Arc<Vec<Refusal>> {
        self.refused.load_full()
    }

    /// Microseconds from the target's epoch to `at`.
    pub fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// Data plane: a request arrived at `at`.
    pub fn touch(&self, at: Instant) {
        self.stats.touch(at.saturating_duration_since(self.epoch));
    }

    /// Requests in flight but for idle streams, and held ones: what keeps the target awake.
    pub fn demand(&self) -> u64 {
        // In flight first: an idle stream that ends stops counting as idle before it stops
        // counting in flight, so one ending meanwhile is counted once more, never once less.
        let busy = self.stats.in_flight() + self.stats.pending();
        busy.saturating_sub(self.streams.idle())
    }

    /// Asks the streams open on every ready endpoint to close, for `why`.
    pub fn close_streams(&self, why: Close) {
        for endpoint in self.endpoints().iter() {
            endpoint.close_streams(why);
        }
    }

    /// When the last request arrived, if one did.
    pub fn last_request_at(&self) -> Option<Instant> {
        self.stats.last_request().map(|d| self.epoch + d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::route::HostPattern;

    #[test]
    fn the_crash_backoff_doubles_with_each_failure_in_a_row_up_to_a_minute() {
        let now = Instant::now();
        let wait = |failures, first| Backoff::after(failures, first, now).until - now;
        let second = Duration::from_secs(1);
        let waits: Vec<u64> = (1..=9).map(|n| wait(n, second).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(wait(u32::MAX, second), Backoff::MAX, "no overflow");
        assert_eq!(wait(1, Duration::from_secs(90)), Duration::from_secs(90));
        assert_eq!(wait(3, Duration::from_secs(90)), Duration::from_secs(90));
        assert_eq!(wait(5, Duration::ZERO), Duration::ZERO, "0s: no back-off");
        let backoff = Backoff::after(1, second, now);
        assert_eq!(backoff.remaining(now), Some(second));
        assert_eq!(backoff.remaining(now + second), None);
    }

    #[test]
    fn a_target_runs_a_config_whatever_its_route() {
        let config = crate::config::Config::first_target(
            "[[target]]\nname = \"hello\"\nhosts = [\"hello.localhost\"]\ncommand = [\"demo\"]\n",
        );
        let target = Target::new(config.clone());
        let mut rerouted = config.clone();
        rerouted.route.hosts = vec![HostPattern::parse("other.localhost").unwrap()];
        rerouted.route.path_prefixes = vec!["/x".into()];
        assert!(target.runs(&rerouted));
        let mut changed = config;
        changed.serving.idle_timeout = Duration::from_secs(1);
        assert!(!target.runs(&changed));
    }
}
