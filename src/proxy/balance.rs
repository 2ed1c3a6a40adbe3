//! Balancing: which ready endpoint of a target takes the next request.

use std::sync::Arc;

use tokio::time::Instant;

use super::error::{Cause, ProxyError};
use crate::target::{Endpoint, Lease, Refused, Target};

/// What balancing found for a request.
#[derive(Debug)]
pub enum Pick {
    Leased(Lease),
    /// No endpoint is ready (or every one is draining): the request waits for one.
    NotReady,
    /// Every endpoint that may take a request is at the target's instance concurrency: the
    /// request waits for a free slot.
    Full,
}

/// Leases a ready endpoint: of two picked at random the one with a free slot (under an
/// instance concurrency), then the healthy one, then the one with fewer requests in flight
/// (power of two choices); failing that, any endpoint that is not draining, has a free slot,
/// and is healthy or due a trial. An error when every ready endpoint is unhealthy and none is
/// due a trial.
pub fn pick(target: &Target) -> Result<Pick, ProxyError> {
    let endpoints = target.endpoints();
    let trials = target.trials();
    let slots = target.slots.as_ref();
    let lease = |e: &Arc<Endpoint>| match slots {
        None => e.lease().ok_or(Refused::Draining),
        Some(slots) => e.lease_within(slots),
    };
    let n = endpoints.len();
    let chosen = match n {
        0 => return Ok(Pick::NotReady),
        1 => &endpoints[0],
        n => {
            let r = random();
            let a = (r % n as u64) as usize;
            let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
            let (a, b) = (&endpoints[a], &endpoints[b]);
            let full = |e: &Endpoint| slots.is_some_and(|s| e.in_flight() >= u64::from(s.limit()));
            let rank = |e: &Endpoint| (full(e), !e.health.is_healthy(), e.in_flight());
            if rank(b) < rank(a) { b } else { a }
        }
    };
    let mut full = false;
    if chosen.health.admits(trials) {
        match lease(chosen) {
            Ok(lease) => return Ok(Pick::Leased(lease)),
            Err(refused) => full = refused == Refused::Full,
        }
    }
    // From a random place, so that the endpoints after an unhealthy one share its load.
    let start = if n > 1 { random() as usize % n } else { 0 };
    let mut unhealthy = None;
    for endpoint in endpoints.iter().cycle().skip(start).take(n) {
        if !endpoint.health.admits(trials) {
            unhealthy = Some(endpoint);
        } else {
            match lease(endpoint) {
                Ok(lease) => return Ok(Pick::Leased(lease)),
                Err(Refused::Full) => full = true,
                Err(Refused::Draining) => {}
            }
        }
    }
    if full {
        return Ok(Pick::Full);
    }
    match unhealthy.and_then(|e| e.health.unhealthy()) {
        // Only draining endpoints: as good as none ready.
        None => Ok(Pick::NotReady),
        Some(unhealthy) => Err(ProxyError::Unhealthy {
            target: target.name.clone(),
            unhealthy_for: Instant::now().saturating_duration_since(unhealthy.since),
            retry_in: target.serving.health.interval,
            last: Cause(unhealthy.last_error.to_string()),
        }),
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
