use std::time::Duration;

use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use tokio::time::{Instant, advance};

use super::Observed;

const ME: &str = "wakegate-b";
const DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews, and this replica looks.
const RENEW: Duration = Duration::from_secs(2);

/// The lease as `holder` last wrote it, its `renewTime` read off the holder's own wall clock.
fn held_by(holder: &str, renewed: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(holder.to_owned()),
        lease_duration_seconds: Some(15),
        acquire_time: Some(MicroTime(renewed)),
        renew_time: Some(MicroTime(renewed)),
        lease_transitions: Some(0),
        ..Default::default()
    }
}

/// A holder whose wall clock is `skew` away from this replica's.
fn skewed_clock(skew: SignedDuration) -> Timestamp {
    Timestamp::now() + skew
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_keeps_renewing_is_never_replaced_even_when_its_clock_is_an_hour_behind() {
    let mut observed = Observed::default();
    let mut renewed = skewed_clock(SignedDuration::from_hours(-1));
    for _ in 0..60 {
        let lease = held_by("wakegate-a", renewed);
        assert!(
            !observed.may_hold(&lease, ME, DURATION, Instant::now()),
            "taken from a live holder"
        );
        advance(RENEW).await;
        renewed += RENEW;
    }
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_stops_renewing_is_replaced_one_lease_duration_after_its_last_renewal_was_seen()
 {
    for skew in [-3600, 0, 3600] {
        let mut observed = Observed::default();
        let mut renewed = skewed_clock(SignedDuration::from_secs(skew));
        for _ in 0..10 {
            let lease = held_by("wakegate-a", renewed);
            assert!(!observed.may_hold(&lease, ME, DURATION, Instant::now()));
            advance(RENEW).await;
            renewed += RENEW;
        }
        // The holder died right after its last renewal, seen one look ago.
        let last = held_by("wakegate-a", renewed - RENEW);
        let last_seen = Instant::now() - RENEW;
        while Instant::now() <= last_seen + DURATION {
            assert!(
                !observed.may_hold(&last, ME, DURATION, Instant::now()),
                "taken {:?} after the last renewal (skew {skew}s)",
                Instant::now() - last_seen
            );
            advance(Duration::from_millis(500)).await;
        }
        assert!(
            observed.may_hold(&last, ME, DURATION, Instant::now()),
            "not taken {:?} after the last renewal (skew {skew}s)",
            Instant::now() - last_seen
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_just_started_waits_a_whole_lease_duration_before_taking_a_held_lease() {
    let mut observed = Observed::default();
    // Not renewed for a day by the holder's clock: to a fresh replica, that proves nothing.
    let lease = held_by("wakegate-a", skewed_clock(SignedDuration::from_hours(-24)));
    let started = Instant::now();
    assert!(!observed.may_hold(&lease, ME, DURATION, started));
    advance(DURATION).await;
    assert!(!observed.may_hold(&lease, ME, DURATION, Instant::now()));
    advance(Duration::from_millis(1)).await;
    assert!(observed.may_hold(&lease, ME, DURATION, Instant::now()));
}

#[tokio::test(start_paused = true)]
async fn a_released_lease_is_taken_at_once_and_this_replicas_own_is_renewed() {
    let released = LeaseSpec {
        holder_identity: None,
        renew_time: None,
        ..held_by("wakegate-a", Timestamp::now())
    };
    assert!(Observed::default().may_hold(&released, ME, DURATION, Instant::now()));
    let emptied = held_by("", Timestamp::now());
    assert!(Observed::default().may_hold(&emptied, ME, DURATION, Instant::now()));
    let mine = held_by(ME, Timestamp::now());
    assert!(Observed::default().may_hold(&mine, ME, DURATION, Instant::now()));
}

#[tokio::test(start_paused = true)]
async fn the_holders_own_lease_duration_decides_when_it_expires() {
    let mut observed = Observed::default();
    let lease = LeaseSpec {
        lease_duration_seconds: Some(60),
        ..held_by("wakegate-a", Timestamp::now())
    };
    assert!(!observed.may_hold(&lease, ME, DURATION, Instant::now()));
    advance(Duration::from_secs(30)).await;
    assert!(!observed.may_hold(&lease, ME, DURATION, Instant::now()));
    advance(Duration::from_secs(31)).await;
    assert!(observed.may_hold(&lease, ME, DURATION, Instant::now()));
}
