//! The per-target loop: wakes a cold target the moment a request asks for it, and on every
//! tick feeds the policy and executes its decision through the provider.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::policy::{self, Observation, Policy};
use crate::provider::Provider;
use crate::target::{Phase, Target};

pub async fn run(
    target: Arc<Target>,
    provider: Arc<dyn Provider>,
    interval: Duration,
    stop: CancellationToken,
) {
    let scaling = &target.config.scaling;
    let policy = Policy {
        min: scaling.min,
        max: scaling.max,
        idle_timeout: target.config.idle_timeout,
    };
    let mut desired = policy.min;
    target.set_desired(desired);
    if desired > 0 {
        provider.scale(&target, desired);
    }
    let mut last_busy: Option<Instant> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = target.wake_requested() => {
                if target.endpoints().is_empty() {
                    desired = desired.max(1);
                    target.set_desired(desired);
                    tracing::debug!(target = %target.name(), pending = target.stats.pending(), "wake requested");
                    provider.scale(&target, desired);
                }
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                let observed = Observation {
                    in_flight: target.stats.in_flight(),
                    pending: target.stats.pending(),
                    last_active: last_busy.max(target.last_request_at()),
                };
                if observed.in_flight + observed.pending > 0 {
                    last_busy = Some(now);
                }
                let next = policy::decide(desired, &observed, &policy, now);
                if next != desired {
                    tracing::info!(
                        target = %target.name(),
                        from = desired,
                        to = next,
                        in_flight = observed.in_flight,
                        pending = observed.pending,
                        idle_for_ms = observed.last_active.map(|at| now.saturating_duration_since(at).as_millis() as u64),
                        idle_timeout_ms = policy.idle_timeout.as_millis() as u64,
                        "scaling"
                    );
                    desired = next;
                    target.set_desired(desired);
                    provider.scale(&target, desired);
                } else if desired > 0 && policy.min > 0 && target.status().phase == Phase::Cold {
                    // An always-on instance exited or failed to start: ask again, once a tick.
                    provider.scale(&target, desired);
                }
            }
        }
    }
}
