//! Leader election with a `coordination.k8s.io/v1` Lease: the holder renews it every `renew`;
//! anyone may take it once it has not been renewed for `duration`. Conflicting writes are
//! settled by the API server's resourceVersion check, so at most one replica wins.
//!
//! Whether the lease went unrenewed is judged by this replica's own monotonic clock, from when
//! it last saw the lease change, never by comparing the holder's `renewTime` with the local
//! wall clock: the two replicas' wall clocks may disagree, and then both would lead.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::LeaseConfig;

pub async fn run(
    client: kube::Client,
    config: LeaseConfig,
    identity: String,
    leader: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut last_renewed: Option<Instant> = None;
    let mut observed = Observed::default();
    loop {
        let now_leader = match acquire_or_renew(&api, &config, &identity, &mut observed).await {
            Ok(won) => {
                if won {
                    last_renewed = Some(Instant::now());
                }
                won
            }
            Err(error) => {
                tracing::warn!(lease = %config.name, %error, "cannot reach the lease");
                // Keep leading only while the lease we hold cannot have expired yet.
                leader.load(Ordering::Relaxed)
                    && last_renewed.is_some_and(|at| at.elapsed() < config.duration)
            }
        };
        if leader.swap(now_leader, Ordering::Relaxed) != now_leader {
            tracing::info!(lease = %config.name, %identity, leader = now_leader, "leadership changed");
        }
        tokio::select! {
            () = tokio::time::sleep(config.renew) => {}
            () = stop.cancelled() => break,
        }
    }
    if leader.swap(false, Ordering::Relaxed) {
        release(&api, &config, &identity).await;
    }
}

/// The lease as this replica last saw it, and when by its own clock: what tells a holder that
/// keeps renewing from one that stopped, whatever either wall clock says (as client-go's
/// leader election judges it).
#[derive(Debug, Default)]
struct Observed {
    last: Option<(LeaseSpec, Instant)>,
}

impl Observed {
    /// Notes `spec`, read at `now`, and returns whether `me` may write itself in as the holder:
    /// the lease is free (released), already `me`'s, or unchanged for a whole lease duration
    /// since this replica first saw it so. A replica that has only just started has seen no
    /// renewal yet, so it waits a whole duration before taking a held lease.
    fn may_hold(&mut self, spec: &LeaseSpec, me: &str, fallback: Duration, now: Instant) -> bool {
        let seen_at = match &self.last {
            Some((seen, at)) if seen == spec => *at,
            _ => {
                self.last = Some((spec.clone(), now));
                now
            }
        };
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .filter(|&s| s > 0)
            .map_or(fallback, Duration::from_secs);
        match holder {
            None => true,
            Some(holder) if holder == me => true,
            Some(_) => seen_at + duration < now,
        }
    }
}

/// Returns whether this replica holds the lease after the attempt.
async fn acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
    me: &str,
    observed: &mut Observed,
) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let duration_seconds = config.duration.as_secs().max(1) as i32;
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                namespace: Some(config.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.to_owned()),
                lease_duration_seconds: Some(duration_seconds),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    if !observed.may_hold(spec, me, config.duration, Instant::now()) {
        return Ok(false);
    }
    let mine = spec.holder_identity.as_deref() == Some(me);
    if !mine {
        spec.holder_identity = Some(me.to_owned());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(duration_seconds);
    spec.renew_time = Some(MicroTime(now));
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the lease up on a clean shutdown, so another replica takes over at once.
async fn release(api: &Api<Lease>, config: &LeaseConfig, me: &str) {
    let Ok(Some(mut lease)) = api.get_opt(&config.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(me) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => tracing::info!(lease = %config.name, "lease released"),
        Err(error) => tracing::warn!(lease = %config.name, %error, "cannot release the lease"),
    }
}

#[cfg(test)]
mod tests;
