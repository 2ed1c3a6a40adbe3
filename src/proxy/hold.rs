//! Holding a request while its target has no instance to take it: a bounded per-target queue
//! that asks for a wake at once and releases every held request the moment an endpoint is
//! ready; or, under an instance concurrency, while every ready instance is full, until a slot
//! is freed (one request per freed slot, the longest waiting first). A request held for a
//! target that a reload replaces moves to the replacement.
//!
//! What held requests may take is bounded per target (`max_pending` requests and
//! `max_pending_bytes`) and across all targets (`[limits]` `max_held_requests` and
//! `max_held_bytes`); a request beyond a bound gets 503 at once. What one pins is its head
//! and the body bytes its client may send before it is forwarded ([`head_size`],
//! [`body_allowance`]).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use http::{Request, Version};
use http_body::Body;
use tokio::time::Instant;

use crate::config::{Limits, size};
use crate::target::stats::{CountGuard, Reserved};
use crate::target::{Lease, Phase, Successor, Target};

use super::Deadline;
use super::balance::{self, Pick};
use super::error::{Cause, ProxyError};
use super::forward::Client;
use super::server::{H2_CONNECTION_WINDOW, H2_STREAM_WINDOW};

/// All targets' held requests together, bounded by `[limits]`.
#[derive(Debug, Default)]
pub struct Holds {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
}

/// A request counted as held, on its target and in [`Holds`], until dropped.
#[derive(Debug)]
pub struct Admitted<'a> {
    _pending: CountGuard<'a>,
    _bytes: Reserved<'a>,
    _all: Reserved<'a>,
    _all_bytes: Reserved<'a>,
    _body: Reserved<'a>,
}

/// Counts `req` as held on `target` if every bound lets it in: the target's `max_pending`
/// and `max_pending_bytes`, then all targets' `max_held_requests` and `max_held_bytes`.
pub fn admit<'a, B: Body>(
    target: &'a Target,
    holds: &'a Holds,
    limits: &Limits,
    req: &Request<B>,
    client: &'a Client,
) -> Result<Admitted<'a>, ProxyError> {
    let serving = &target.serving;
    let Some(pending) = CountGuard::below(&target.stats.pending, i64::from(serving.max_pending))
    else {
        return Err(ProxyError::QueueFull {
            target: target.name.clone(),
            max: serving.max_pending,
        });
    };
    // HTTP/2 body bytes wait in h2's buffers within the stream's window, and all streams of
    // a connection within its window: the connection's share is what is left of that.
    let body = Reserved::up_to(
        &client.held_body,
        body_allowance(req),
        H2_CONNECTION_WINDOW.into(),
    );
    let cost = head_size(req) + body.amount();
    let Some(bytes) =
        Reserved::within(&target.stats.pending_bytes, cost, serving.max_pending_bytes)
    else {
        return Err(ProxyError::QueueBytes {
            target: target.name.clone(),
            max: serving.max_pending_bytes,
        });
    };
    let Some(all) = Reserved::within(&holds.requests, 1, limits.max_held_requests.into()) else {
        return Err(ProxyError::HoldLimit(limits.max_held_requests.to_string()));
    };
    let Some(all_bytes) = Reserved::within(&holds.bytes, cost, limits.max_held_bytes) else {
        return Err(ProxyError::HoldLimit(format!(
            "{} of",
            size::show(limits.max_held_bytes)
        )));
    };
    Ok(Admitted {
        _pending: pending,
        _bytes: bytes,
        _all: all,
        _all_bytes: all_bytes,
        _body: body,
    })
}

/// What holding `req` pins in wakegate's memory, its body aside: its request line and
/// headers, each header counted as HTTP/2 counts a header list (name, value and 32 bytes,
/// RFC 9113 §6.5.2), about what a header map entry takes.
pub fn head_size<B>(req: &Request<B>) -> u64 {
    let line = req.method().as_str().len() + req.uri().to_string().len();
    let headers: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum();
    (line + headers) as u64
}

/// The body bytes a held request's client may send before wakegate forwards it: on HTTP/1
/// none (they wait in the client's socket until wakegate reads them), on HTTP/2 up to the
/// stream's flow-control window, or its length if that is less.
pub fn body_allowance<B: Body>(req: &Request<B>) -> u64 {
    let body = req.body();
    if req.version() < Version::HTTP_2 || body.is_end_stream() {
        return 0;
    }
    let window = u64::from(H2_STREAM_WINDOW);
    body.size_hint()
        .exact()
        .map_or(window, |length| length.min(window))
}

/// How a hold ended, short of an error.
pub enum Held<'a> {
    /// An endpoint is ready. The admission keeps the request counted as held; drop it only
    /// once the request is counted in flight, so the target never looks idle in between.
    Ready(Lease, Admitted<'a>),
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
/// and not past the request's own `deadline` if it has one; `held` counts the request
/// meanwhile.
pub async fn wait_ready<'a>(
    target: &'a Arc<Target>,
    why: Wait,
    deadline: Option<Deadline>,
    held: Admitted<'a>,
) -> Result<Held<'a>, ProxyError> {
    let serving = &target.serving;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_requests_head_counts_its_line_and_each_field_with_its_overhead() {
        let req = Request::get("http://abc.example.com/a/b?c=d")
            .header("host", "abc.example.com")
            .header("x-one", "1")
            .header("x-one", "2")
            .header("authorization", "secret")
            .body(())
            .unwrap();
        assert_eq!(
            head_size(&req),
            3 + 30 + (4 + 15 + 32) + 2 * (5 + 1 + 32) + (13 + 6 + 32)
        );
    }
}
