//! The health of one endpoint: failures in a row mark it unhealthy, a success marks it healthy
//! again. Atomics only; a request to a healthy endpoint reads two of them and writes none.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::time::Instant;

use crate::config::HealthPolicy;

/// Whether an endpoint takes requests, as its requests (and an active check) found it.
#[derive(Debug)]
pub struct Health {
    /// Requests in a row that got no response (connects included), since the last one that did.
    failures: AtomicU32,
    /// Microseconds since `epoch`, plus one, at which it was marked unhealthy; 0 while healthy.
    down_since: AtomicU64,
    /// While unhealthy: microseconds since `epoch` from which the next trial request may go.
    next_trial: AtomicU64,
    /// Why it is unhealthy: the last failure, in full (for logs and `/targets`, not clients).
    last_error: ArcSwapOption<String>,
    epoch: Instant,
}

/// An unhealthy endpoint, as `/targets` and error messages show it.
#[derive(Debug, Clone)]
pub struct Unhealthy {
    pub since: Instant,
    pub last_error: Arc<String>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            failures: AtomicU32::new(0),
            down_since: AtomicU64::new(0),
            next_trial: AtomicU64::new(0),
            last_error: ArcSwapOption::empty(),
            epoch: Instant::now(),
        }
    }
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        self.down_since.load(Ordering::Relaxed) == 0
    }

    /// Whether a request may go to this endpoint now: it is healthy, or `trials` says how often
    /// an unhealthy one gets a trial request and this request is the one (at most one per
    /// interval, whichever worker asks first).
    pub fn admits(&self, trials: Option<Duration>) -> bool {
        if self.is_healthy() {
            return true;
        }
        let Some(every) = trials else {
            return false;
        };
        let now = self.micros(Instant::now());
        let next = self.next_trial.load(Ordering::Relaxed);
        now >= next
            && self
                .next_trial
                .compare_exchange(
                    next,
                    now + every.as_micros() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// A request got a response. Returns true when that marked the endpoint healthy again
    /// (`recover`: requests may bring it back, as they do unless an active check decides).
    pub fn succeeded(&self, recover: bool) -> bool {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        recover && !self.is_healthy() && self.mark_healthy()
    }

    /// A request got no response (`error`, in full). Returns true when that marked the endpoint
    /// unhealthy: the `policy.failures`th such request in a row.
    pub fn failed(&self, error: &str, policy: &HealthPolicy) -> bool {
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures < policy.failures {
            return false;
        }
        self.mark_unhealthy(error, policy.interval)
    }

    /// Marks the endpoint unhealthy for `error`; no trial request before `interval` passes.
    /// Returns true when it was healthy until now.
    pub fn mark_unhealthy(&self, error: &str, interval: Duration) -> bool {
        self.last_error.store(Some(Arc::new(error.to_owned())));
        let now = self.micros(Instant::now());
        self.next_trial
            .store(now + interval.as_micros() as u64, Ordering::Relaxed);
        self.down_since
            .compare_exchange(0, now + 1, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Marks the endpoint healthy. Returns true when it was unhealthy until now.
    pub fn mark_healthy(&self) -> bool {
        let was_unhealthy = self.down_since.swap(0, Ordering::Relaxed) != 0;
        if was_unhealthy {
            self.failures.store(0, Ordering::Relaxed);
        }
        was_unhealthy
    }

    /// Since when and why the endpoint is unhealthy, if it is.
    pub fn unhealthy(&self) -> Option<Unhealthy> {
        let since = self.down_since.load(Ordering::Relaxed).checked_sub(1)?;
        Some(Unhealthy {
            since: self.epoch + Duration::from_micros(since),
            last_error: self.last_error.load_full().unwrap_or_default(),
        })
    }

    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: HealthPolicy = HealthPolicy {
        failures: 3,
        interval: Duration::from_secs(5),
    };

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_mark_an_endpoint_unhealthy_and_a_success_between_them_resets_the_count()
     {
        let health = Health::default();
        assert!(!health.failed("refused", &POLICY));
        assert!(!health.failed("refused", &POLICY));
        assert!(
            !health.succeeded(true),
            "it was healthy: nothing to recover"
        );
        assert!(!health.failed("refused", &POLICY));
        assert!(!health.failed("refused", &POLICY));
        assert!(health.is_healthy());
        assert!(health.failed("reset", &POLICY), "the third in a row");
        assert!(!health.is_healthy());
        assert!(!health.failed("refused", &POLICY), "already unhealthy");
        assert_eq!(
            *health.unhealthy().expect("unhealthy").last_error,
            "refused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unhealthy_endpoint_admits_one_trial_request_per_interval() {
        let health = Health::default();
        let trials = Some(POLICY.interval);
        for _ in 0..3 {
            health.failed("refused", &POLICY);
        }
        assert!(!health.admits(trials));
        tokio::time::advance(Duration::from_millis(4999)).await;
        assert!(!health.admits(trials));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(health.admits(trials), "the trial");
        assert!(!health.admits(trials), "one trial only");
        assert!(
            !health.admits(None),
            "no trials while an active check decides"
        );
        // The trial failed: the next one an interval later.
        health.failed("refused", &POLICY);
        tokio::time::advance(Duration::from_millis(4999)).await;
        assert!(!health.admits(trials));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(health.admits(trials));
        // It got a response: healthy, every request admitted.
        assert!(!health.succeeded(false), "only an active check recovers it");
        assert!(health.succeeded(true));
        assert!(health.unhealthy().is_none());
        assert!(health.admits(None) && health.admits(None));
    }
}
