//! The runtime handle of one target, shared by the data plane (which reads its ready
//! endpoints and counts its requests) and the control plane (which publishes endpoints and
//! state, and listens for wake requests).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::config::TargetConfig;
use crate::proxy::track::Stats;

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
}

/// One instance address that can take requests.
#[derive(Debug)]
pub struct Endpoint {
    pub authority: Authority,
    in_flight: AtomicI64,
    draining: AtomicBool,
}

impl Endpoint {
    pub fn new(authority: Authority) -> Arc<Self> {
        Arc::new(Self {
            authority,
            in_flight: AtomicI64::new(0),
            draining: AtomicBool::new(false),
        })
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
        Some(Lease(self.clone()))
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

/// One request's claim on an endpoint; released on drop.
#[derive(Debug)]
pub struct Lease(Arc<Endpoint>);

impl Lease {
    pub fn endpoint(&self) -> &Endpoint {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug)]
pub struct Target {
    pub config: TargetConfig,
    pub stats: Stats,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    status: watch::Sender<Status>,
    wake: Notify,
    epoch: Instant,
    /// The instance count the autoscaler last asked for.
    desired: AtomicU32,
}

impl Target {
    pub fn new(config: TargetConfig) -> Arc<Self> {
        let (status, _) = watch::channel(Status {
            phase: Phase::Cold,
            start_failures: 0,
            last_failure: None,
        });
        Arc::new(Self {
            config,
            stats: Stats::default(),
            endpoints: ArcSwap::from_pointee(Vec::new()),
            status,
            wake: Notify::new(),
            epoch: Instant::now(),
            desired: AtomicU32::new(0),
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Leases a ready endpoint: of two picked at random, the one with fewer requests in
    /// flight (power of two choices), falling back to any endpoint that is not draining.
    pub fn pick(&self) -> Option<Lease> {
        let endpoints = self.endpoints.load();
        let chosen = match endpoints.len() {
            0 => return None,
            1 => &endpoints[0],
            n => {
                let r = random();
                let a = (r % n as u64) as usize;
                let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
                let (a, b) = (&endpoints[a], &endpoints[b]);
                if b.in_flight() < a.in_flight() { b } else { a }
            }
        };
        chosen
            .lease()
            .or_else(|| endpoints.iter().find_map(|e| e.lease()))
    }

    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// Control plane: publish the ready endpoints, then the phase (held requests wake on the
    /// phase change and find the endpoints already in place).
    pub fn publish(&self, endpoints: Vec<Arc<Endpoint>>, phase: Phase) {
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

    /// Control plane: a start attempt failed; every request held for it fails now.
    pub fn start_failed(&self, reason: String) {
        self.status.send_modify(|s| {
            s.start_failures += 1;
            s.last_failure = Some(reason.into());
        });
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

    /// Microseconds from the target's epoch to `at`.
    pub fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// Data plane: a request arrived at `at`.
    pub fn touch(&self, at: Instant) {
        self.stats.touch(at.saturating_duration_since(self.epoch));
    }

    /// When the last request arrived, if one did.
    pub fn last_request_at(&self) -> Option<Instant> {
        self.stats.last_request().map(|d| self.epoch + d)
    }
}

/// A fast, non-cryptographic random number for load balancing choices.
fn random() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let seed = std::collections::hash_map::RandomState::new();
            std::hash::BuildHasher::hash_one(&seed, 0u64) | 1
        });
    }
    STATE.with(|state| {
        // xorshift64*
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}
