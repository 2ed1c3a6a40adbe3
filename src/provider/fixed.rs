//! A fixed upstream (`upstream = "host:port"`): always on, proxied and counted, never started,
//! stopped or scaled. Its requests mark it unhealthy (see [`crate::target::health`]); with an
//! active check (`health.check`) the check also does, and only the check brings it back.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::probe::probe;
use super::{Managed, Provider, Scale};
use crate::config::{Fixed, ReadyCheck};
use crate::target::{Endpoint, Phase, Target};

#[derive(Debug, Default)]
pub struct FixedProvider;

impl Provider for FixedProvider {
    type Backend = Fixed;

    fn manage(&self, target: Arc<Target>, fixed: &Fixed, stop: CancellationToken) -> Managed {
        let endpoint = Endpoint::new(fixed.upstream.clone());
        target.publish(vec![endpoint.clone()], Phase::Ready);
        // Asks are ignored: there is nothing to start or stop.
        let (scale, _) = Scale::channel();
        let check = fixed.check.clone();
        let task = tokio::spawn(async move {
            if let Some(check) = check {
                tokio::select! {
                    () = watch(&target, &endpoint, &check) => {}
                    () = stop.cancelled() => {}
                }
            }
            stop.cancelled().await;
            target.publish(Vec::new(), Phase::Cold);
        });
        Managed {
            scale,
            task,
            remote: None,
        }
    }
}

/// Runs the active check every `health.interval`: `health.failures` failed checks in a row
/// mark the upstream unhealthy, and one that passes marks it healthy.
async fn watch(target: &Target, endpoint: &Endpoint, check: &ReadyCheck) {
    let policy = target.serving.health;
    let mut ticks = tokio::time::interval(policy.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0;
    loop {
        ticks.tick().await;
        match probe(check, target.serving.protocol, &endpoint.authority).await {
            Ok(()) => {
                failures = 0;
                if endpoint.health.mark_healthy() {
                    tracing::info!(target = %target.name(), upstream = %endpoint.authority, "upstream healthy again: its check passed");
                }
            }
            Err(saw) => {
                failures += 1;
                if failures >= policy.failures
                    && endpoint.health.mark_unhealthy(&saw, policy.interval)
                {
                    tracing::warn!(target = %target.name(), upstream = %endpoint.authority, error = %saw, failures, "upstream unhealthy: its check failed in a row");
                }
            }
        }
    }
}
