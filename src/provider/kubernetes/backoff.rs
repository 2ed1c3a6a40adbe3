//! How the Kubernetes watches retry after an error or an API-server outage.

use std::time::Duration;

use kube::runtime::watcher::ExponentialBackoff;

/// The first retry waits between this and twice this.
const WATCH_RETRY_FIRST: Duration = Duration::from_millis(200);

/// The longest a watch waits between two attempts, so a change made once the API server is
/// back is seen at most this long (plus a list) later.
pub const WATCH_RETRY_MAX: Duration = Duration::from_secs(3);

/// Waits 200 ms after the first error and doubles, each wait stretched by up to as much again at
/// random so replicas do not retry in step, never longer than [`WATCH_RETRY_MAX`]; the watch
/// resets it on its next successful event.
///
/// Not kube-runtime's default (client-go's: 800 ms doubling to 30 s, each stretched likewise, so
/// up to 60 s): that spares an API server thousands of controllers, but wakegate is a few
/// replicas with three watches each, and with it a Service created right after a 30 s outage
/// was routed 46 s later.
pub fn watch_retry() -> ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(WATCH_RETRY_FIRST)
        .with_factor(2.0)
        // The jitter adds up to the wait again, so the wait itself stops at half the maximum.
        .with_max_delay(WATCH_RETRY_MAX / 2)
        .with_jitter()
        .without_max_times()
        .into()
}

#[cfg(test)]
mod tests {
    use kube::runtime::utils::Backoff;

    use super::*;

    #[test]
    fn watch_retries_start_short_grow_to_at_most_the_maximum_and_start_over_after_a_reset() {
        let mut retry = watch_retry();
        for _ in 0..10 {
            let first = retry.next().expect("retries forever");
            assert!(
                (WATCH_RETRY_FIRST..WATCH_RETRY_FIRST * 2).contains(&first),
                "{first:?}"
            );
            let waits: Vec<Duration> = (0..100)
                .map(|_| retry.next().expect("retries forever"))
                .collect();
            assert!(waits.iter().all(|w| *w <= WATCH_RETRY_MAX), "{waits:?}");
            assert!(
                waits[10..].iter().all(|w| *w >= WATCH_RETRY_MAX / 2),
                "{waits:?}"
            );
            retry.reset();
        }
    }
}
