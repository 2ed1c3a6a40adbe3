//! A request's accounting on its target: counted as demand from its arrival until its
//! response finishes (holding included), and in flight with an endpoint lease once forwarded.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use crate::target::{Endpoint, Lease, Target};

/// A request from its arrival until its response finished (or it failed), holding included:
/// what the autoscaler integrates into the target's concurrency.
#[derive(Debug)]
pub struct Demand {
    target: Arc<Target>,
    started_us: u64,
}

impl Demand {
    pub fn begin(target: Arc<Target>, at: Instant) -> Self {
        let started_us = target.micros(at);
        target.touch(at);
        target.stats.concurrency.begin(started_us);
        Self { target, started_us }
    }
}

impl Drop for Demand {
    fn drop(&mut self) {
        let now = self.target.micros(Instant::now());
        self.target.stats.concurrency.end(self.started_us, now);
    }
}

/// A request counted in flight on its target and holding its endpoint lease.
#[derive(Debug)]
pub struct InFlight {
    demand: Demand,
    lease: Lease,
}

impl InFlight {
    pub fn new(demand: Demand, lease: Lease) -> Self {
        demand.target.stats.in_flight.fetch_add(1, Ordering::SeqCst);
        Self { demand, lease }
    }

    pub fn target(&self) -> &Arc<Target> {
        &self.demand.target
    }

    pub fn endpoint(&self) -> &Endpoint {
        self.lease.endpoint()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.demand
            .target
            .stats
            .in_flight
            .fetch_sub(1, Ordering::SeqCst);
    }
}
