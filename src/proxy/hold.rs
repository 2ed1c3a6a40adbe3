//! Holding a request while its target has no ready instance: a bounded per-target queue that
//! asks for a wake at once and releases every held request the moment an endpoint is ready.

use std::sync::Arc;

use crate::target::{Lease, Phase, Target};

use super::error::ProxyError;
use super::track::CountGuard;

/// Waits for a ready endpoint of `target`. The returned guard keeps the request counted as
/// held; drop it only once the request is counted in flight, so the target never looks idle
/// in between.
pub async fn wait_ready(target: &Arc<Target>) -> Result<(Lease, CountGuard<'_>), ProxyError> {
    let config = &target.config;
    let Some(held) = CountGuard::below(&target.stats.pending, i64::from(config.max_pending)) else {
        return Err(ProxyError::QueueFull {
            target: config.name.clone(),
            max: config.max_pending,
        });
    };
    // Subscribe before asking for the wake, so no failure of that start can be missed.
    let mut status = target.subscribe();
    let failures_seen = status.borrow_and_update().start_failures;
    target.request_wake();

    let wait = async {
        loop {
            if let Some(lease) = target.pick() {
                return Ok(lease);
            }
            if status.changed().await.is_err() {
                return Err(ProxyError::StartFailed {
                    target: config.name.clone(),
                    reason: "target was removed".into(),
                });
            }
            let now = status.borrow_and_update().clone();
            if now.start_failures > failures_seen {
                return Err(ProxyError::StartFailed {
                    target: config.name.clone(),
                    reason: now
                        .last_failure
                        .as_deref()
                        .unwrap_or("unknown reason")
                        .to_owned(),
                });
            }
            if now.phase == Phase::Cold {
                // An instance stopped while this request waited: ask again.
                target.request_wake();
            }
        }
    };
    match tokio::time::timeout(config.cold_start_timeout, wait).await {
        Ok(Ok(lease)) => Ok((lease, held)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ProxyError::ColdStartTimeout {
            target: config.name.clone(),
            after: config.cold_start_timeout,
        }),
    }
}
