//! Per-instance concurrency (`instance_concurrency`): how many requests one endpoint takes at
//! once, and the queue of requests waiting for a free slot, where each freed slot wakes the
//! request that has waited longest.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::Semaphore;

/// A target's per-endpoint limit and its queue. Only a target with a limit has one, so a
/// target without pays nothing for it.
#[derive(Debug)]
pub struct Slots {
    limit: i64,
    /// Requests in the queue: the `wakegate_queued_requests` gauge.
    waiting: AtomicI64,
    /// One permit for each slot freed while requests wait. Tokio's semaphore is fair: a permit
    /// goes to the waiter that asked first, so one freed slot wakes one request, in order.
    freed: Semaphore,
}

impl Slots {
    pub fn new(limit: NonZeroU32) -> Self {
        Self {
            limit: i64::from(limit.get()),
            waiting: AtomicI64::new(0),
            freed: Semaphore::new(0),
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit as u32
    }

    /// Takes a slot of an endpoint that has `in_flight` requests, unless it has none free:
    /// a compare-and-swap, so that no race lets one more through.
    pub(super) fn take(&self, in_flight: &AtomicI64) -> bool {
        in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// A slot was given back (its count already lowered): the longest waiting request, if
    /// any, may take it.
    pub(super) fn freed(&self) {
        // Read after the count was lowered, as a new waiter counts itself before it looks for a
        // slot: either it sees this slot free, or this sees it waiting.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.freed.add_permits(1);
        }
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::SeqCst).max(0) as u64
    }

    /// Whether requests wait for a slot: a newcomer queues behind them rather than take the
    /// next freed slot ahead of them.
    pub fn queued(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }

    /// Resolves when a slot was freed for a request in the queue: the longest waiting request
    /// is woken first, one per slot. Cancel-safe: a request that leaves passes its turn on.
    pub async fn turn(&self) {
        match self.freed.acquire().await {
            Ok(permit) => permit.forget(),
            // The semaphore is never closed.
            Err(_) => std::future::pending().await,
        }
    }

    /// Joins the queue; the request leaves it when the place is dropped.
    pub fn join(&self) -> Place<'_> {
        let ahead = self.waiting.fetch_add(1, Ordering::SeqCst);
        Place {
            slots: self,
            first: ahead <= 0,
        }
    }
}

/// A request's place in a target's queue for a slot.
#[derive(Debug)]
pub struct Place<'a> {
    slots: &'a Slots,
    first: bool,
}

impl Place<'_> {
    /// Whether nobody was waiting when this request joined: only then may it look for a slot
    /// at once, as any slot freed meanwhile belongs to those ahead of it.
    pub fn first(&self) -> bool {
        self.first
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.slots.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    use crate::target::Endpoint;

    fn slots(limit: u32) -> Arc<Slots> {
        Arc::new(Slots::new(NonZeroU32::new(limit).unwrap()))
    }

    #[test]
    fn an_endpoint_never_lends_more_slots_than_the_limit_even_under_contention() {
        let slots = slots(3);
        let endpoint = Endpoint::new("127.0.0.1:1".parse().unwrap());
        let granted = std::sync::atomic::AtomicU32::new(0);
        let most = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..20_000 {
                        if let Ok(lease) = endpoint.lease_within(&slots) {
                            granted.fetch_add(1, Ordering::Relaxed);
                            most.fetch_max(endpoint.in_flight(), Ordering::Relaxed);
                            drop(lease);
                        }
                    }
                });
            }
        });
        assert!(granted.load(Ordering::Relaxed) > 0);
        assert!(most.load(Ordering::Relaxed) <= 3, "{most:?}");
        assert_eq!(endpoint.in_flight(), 0, "every slot came back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_freed_slot_wakes_the_longest_waiting_request_and_only_it() {
        let slots = slots(1);
        let endpoint = Endpoint::new("127.0.0.1:1".parse().unwrap());
        let held = endpoint.lease_within(&slots).expect("a free slot");
        assert!(endpoint.lease_within(&slots).is_err(), "full at the limit");
        let (woke, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for i in 0..3 {
            let (slots, woke) = (slots.clone(), woke.clone());
            waiters.push(tokio::spawn(async move {
                let place = slots.join();
                assert_eq!(place.first(), i == 0);
                slots.turn().await;
                woke.send(i).unwrap();
            }));
            // Each joins before the next.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(slots.waiting(), 3);
        drop(held);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(order.try_recv(), Ok(0), "the first to wait");
        assert!(order.try_recv().is_err(), "no other woke: no herd");

        // A waiter that leaves does not keep a turn from the one behind it.
        waiters[1].abort();
        tokio::time::sleep(Duration::from_millis(1)).await;
        slots.freed();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(order.try_recv(), Ok(2));
        assert_eq!(slots.waiting(), 0);
    }
}
