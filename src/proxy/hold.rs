//! Holding a request while its target has no ready instance: a bounded per-target queue that
//! asks for a wake at once and releases every held request the moment an endpoint is ready.
//! A request held for a target that a reload replaces moves to the replacement.

use std::sync::Arc;

use tokio::time::Instant;

use crate::target::stats::CountGuard;
use crate::target::{Lease, Phase, Successor, Target};

use super::Deadline;
use super::balance;
use super::error::{Cause, ProxyError};

/// How a hold ended, short of an error.
pub enum Held<'a> {
    /// An endpoint is ready. The guard keeps the request counted as held; drop it only once
    /// the request is counted in flight, so the target never looks idle in between.
    Ready(Lease, CountGuard<'a>),
    /// The target was replaced: hold the request for this one instead.
    Moved(Arc<Target>),
}

/// Waits for a ready endpoint of `target`, at most its cold-start timeout, and not past the
/// request's own `deadline` if it has one.
pub async fn wait_ready(
    target: &Arc<Target>,
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
        if let Some(backoff) = now.backoff
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
    target.request_wake();
    tracing::debug!("held for a cold start");

    // Ok(lease), or Err(the successor).
    let wait = async {
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
            if let Some(lease) = balance::pick(target)? {
                return Ok(Ok(lease));
            }
            if status.changed().await.is_err() {
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
            if now.start_failures > failures_seen {
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
    match tokio::time::timeout_at(until, wait).await {
        Ok(Ok(Ok(lease))) => Ok(Held::Ready(lease, held)),
        Ok(Ok(Err(next))) => Ok(Held::Moved(next)),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(match own {
            Some(deadline) => ProxyError::Deadline {
                target: target.name.clone(),
                after: deadline.after,
            },
            None => timed_out(),
        }),
    }
}
