//! A request's accounting on its target: counted as demand from its arrival until its
//! response finishes (holding included), in flight with an endpoint lease once forwarded, and
//! a stream of the target's (see [`crate::target::streams`]) once its response or tunnel is
//! long-lived.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use crate::target::streams::{Close, Stream};
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
    /// Its activity, once something asked for it; registered with the target's streams once
    /// the request is a stream.
    stream: Option<Arc<Stream>>,
}

/// A request registered as a stream: what it counts its activity on, and the ask to close.
pub struct Watched {
    pub activity: Arc<Stream>,
    pub closing: Pin<Box<dyn Future<Output = Close> + Send + Sync>>,
}

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched").finish_non_exhaustive()
    }
}

impl InFlight {
    pub fn new(demand: Demand, lease: Lease) -> Self {
        demand.target.stats.in_flight.fetch_add(1, Ordering::SeqCst);
        Self {
            demand,
            lease,
            stream: None,
        }
    }

    pub fn target(&self) -> &Arc<Target> {
        &self.demand.target
    }

    pub fn endpoint(&self) -> &Endpoint {
        self.lease.endpoint()
    }

    /// What the request's bytes are counted on, before it is known to be a stream (a request
    /// body streams before the response begins).
    pub fn activity(&mut self) -> Arc<Stream> {
        self.stream.get_or_insert_with(Arc::default).clone()
    }

    /// Makes the request one of its target's streams: swept for idleness from now on, and
    /// closed when its endpoint asks. Once per request.
    pub fn watch(&mut self) -> Watched {
        let activity = self.activity();
        self.demand.target.streams.register(activity.clone());
        Watched {
            activity,
            closing: Box::pin(self.lease.endpoint().streams_closing()),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Before the in-flight count: a stream that was idle must never count as demand less.
        if let Some(stream) = &self.stream {
            self.demand.target.streams.end(stream);
        }
        self.demand
            .target
            .stats
            .in_flight
            .fetch_sub(1, Ordering::SeqCst);
    }
}
