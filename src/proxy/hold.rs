//! Holding a request while its target has no instance to take it: a bounded per-target queue
//! that asks for a wake at once and releases every held request the moment an endpoint is
//! ready; or, under an instance concurrency, while every ready instance is full, until a slot
//! is freed (one request per freed slot, the longest waiting first). A request held for a
//! target that a reload replaces moves to the replacement.

use std::sync::Arc;

use tokio::time::Instant;

use crate::target::stats::CountGuard;
use crate::target::{Lease, Phase, Successor, Target};

use super::Deadline;
use super::balance::{self, Pick};
use super::error::{Cause, ProxyError};

/// How a hold ended, short of an error.
pub enum Held<'a> {
    /// An endpoint is ready. The guard keeps the request counted as held; drop it only once
    /// the request is counted in flight, so the target never looks idle in between.
    Ready(Lease, CountGuard<'a>),
    /// The target was replaced: hold the request for this one instead.
    Moved(Arc<Target>),
}

/// Why a request is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// No endpoint is ready: the target is asked to wake.
    Cold,
    /// Every ready endpoint is at the target's instance concurrency, or requests already wait
    /// for a slot: this one queues behind them.
    Full,
}

/// Waits for an endpoint of `target` that takes the request, at most its cold-start timeout,
/// and not past the request's own `deadline` if it has one.
pub async fn wait_ready(
    target: &Arc<Target>,
    why: Wait,
    deadline: Option<Deadline>,
) -> Result<Held<'_>, ProxyError> {
    let serving = &target.serving;
    let Some(held) = CountGuard::below(&target.stats.pending, i64::from(serving.max_pending))
    else {
        return Err(ProxyError::QueueFull {
            target: target.name.clone(),
            max: serving.max_pending,
        });
    };
    let held_at = Instant::now();
    let timed_out = || ProxyError::ColdStartTimeout {
        target: target.name.clone(),
        after: serving.cold_start_timeout,
    };
    // Subscribe before asking for the wake, so no failure of that start can be missed.
    let mut status = target.subscribe();
    let failures_seen = {
        let now = status.borrow_and_update();
        // Failed starts in a row: no new one until the back-off ends, and no waiting for it.
        if why == Wait::Cold
            && let Some(backoff) = now.backoff
            && let Some(retry_in) = backoff.remaining(Instant::now())
        {
            return Err(ProxyError::BackingOff {
                target: target.name.clone(),
                failures: backoff.failures,
                retry_in,
            });
        }
        now.start_failures
    };
    if why == Wait::Cold {
        target.request_wake();
        tracing::debug!("held for a cold start");
    } else {
        tracing::debug!("held for a free instance slot");
    }

    // The request's place in the queue for a slot, once it has one.
    let mut queued = None;
    // Ok(lease), or Err(the successor).
    let wait = async {
        let slots = target.slots.as_deref();
        // Joins the queue; true when nobody is ahead, so that the request looks for a slot
        // once more: one freed before it counted itself waiting woke nobody.
        let join = |queued: &mut Option<_>| match slots {
            Some(slots) if queued.is_none() => {
                let place = slots.join();
                let first = place.first();
                *queued = Some(place);
                first
            }
            _ => false,
        };
        // Whether to look for an endpoint now: not while others wait for a slot ahead of it.
        let mut look = match why {
            Wait::Cold => true,
            Wait::Full => join(&mut queued),
        };
        let mut turn = None;
        let mut now = status.borrow().clone();
        loop {
            match now.retired {
                Some(Successor::Replaced(next)) => return Ok(Err(next)),
                Some(Successor::Removed) => {
                    return Err(ProxyError::TargetRemoved {
                        target: target.name.clone(),
                    });
                }
                None => {}
            }
            if look {
                match balance::pick(target)? {
                    Pick::Leased(lease) => return Ok(Ok(lease)),
                    Pick::Full if queued.is_none() => {
                        if join(&mut queued) {
                            continue;
                        }
                    }
                    Pick::Full | Pick::NotReady => {}
                }
            }
            if let (Some(slots), Some(_), None) = (slots, &queued, &turn) {
                turn = Some(Box::pin(slots.turn()));
            }
            let my_turn = async {
                match turn.as_mut() {
                    Some(turn) => turn.await,
                    None => std::future::pending().await,
                }
            };
            // A freed slot wakes one request, the one whose turn it is; a change of the
            // target (instances come or go) wakes every one.
            let changed = tokio::select! {
                changed = status.changed() => Some(changed),
                () = my_turn => None,
            };
            look = true;
            let Some(changed) = changed else {
                turn = None;
                continue;
            };
            if changed.is_err() {
                return Err(ProxyError::TargetRemoved {
                    target: target.name.clone(),
                });
            }
            now = status.borrow_and_update().clone();
            if now.start_failures > failures_seen && held_at.elapsed() >= serving.cold_start_timeout
            {
                // The start gave up at the same moment as this request's own wait: what the
                // request met is its timeout.
                return Err(timed_out());
            }
            // A start that failed while this request waited for a slot: the instances that are up
            // still serve it.
            if now.start_failures > failures_seen && queued.is_none() {
                return Err(ProxyError::StartFailed {
                    target: target.name.clone(),
                    reason: Cause(
                        now.last_failure
                            .as_deref()
                            .unwrap_or("unknown reason")
                            .to_owned(),
                    ),
                });
            }
            if now.phase == Phase::Cold {
                // An instance stopped while this request waited: ask again.
                target.request_wake();
            }
        }
    };
    let cold_start_deadline = held_at + serving.cold_start_timeout;
    let own = deadline.filter(|d| d.at < cold_start_deadline);
    let until = own.map_or(cold_start_deadline, |d| d.at);
    let outcome = tokio::time::timeout_at(until, wait).await;
    match outcome {
        Ok(Ok(Ok(lease))) => Ok(Held::Ready(lease, held)),
        Ok(Ok(Err(next))) => Ok(Held::Moved(next)),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(match (own, &target.slots) {
            (Some(deadline), _) => ProxyError::Deadline {
                target: target.name.clone(),
                after: deadline.after,
            },
            // Waiting for a slot when the time ran out: the target is up, but full.
            (None, Some(slots)) if queued.is_some() => ProxyError::NoFreeSlot {
                target: target.name.clone(),
                after: serving.cold_start_timeout,
                limit: slots.limit(),
            },
            (None, _) => timed_out(),
        }),
    }
}
