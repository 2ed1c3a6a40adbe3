//! Leader election with a `coordination.k8s.io/v1` Lease: the holder renews it every `renew`;
//! anyone may take it once it has not been renewed for `duration`. Conflicting writes are
//! settled by the API server's resourceVersion check, so at most one replica wins.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
    loop {
        let now_leader = match acquire_or_renew(&api, &config, &identity).await {
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

fn millis(time: &Option<MicroTime>) -> i64 {
    time.as_ref().map_or(0, |t| t.0.as_millisecond())
}

/// Returns whether this replica holds the lease after the attempt.
async fn acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
    me: &str,
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
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let held_for = i64::from(spec.lease_duration_seconds.unwrap_or(duration_seconds)) * 1000;
    let expired = millis(&spec.renew_time) + held_for < now.as_millisecond();
    let mine = holder.as_deref() == Some(me);
    if !mine && holder.is_some() && !expired {
        return Ok(false);
    }
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
