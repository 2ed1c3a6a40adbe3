//! The scaling decision as a pure function: no I/O, no clock of its own.

use std::time::Duration;

use tokio::time::Instant;

/// What the autoscaler observed of one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    pub in_flight: u64,
    pub pending: u64,
    /// The last moment the target had a request arriving, in flight or held.
    pub last_active: Option<Instant>,
}

/// The knobs the decision depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub min: u32,
    pub max: u32,
    pub idle_timeout: Duration,
}

/// The desired instance count, given the current one.
///
/// - any demand (in flight or held) keeps at least one instance;
/// - with no demand for `idle_timeout`, the target goes down to `min` (zero by default);
/// - otherwise the current count stays, within `[min, max]`.
pub fn decide(current: u32, observed: &Observation, policy: &Policy, now: Instant) -> u32 {
    let busy = observed.in_flight + observed.pending > 0;
    let wanted = if busy {
        current.max(1)
    } else if observed
        .last_active
        .is_none_or(|at| now.saturating_duration_since(at) >= policy.idle_timeout)
    {
        policy.min
    } else {
        current
    };
    wanted.clamp(policy.min, policy.max.max(policy.min))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        min: 0,
        max: 1,
        idle_timeout: Duration::from_secs(30),
    };

    fn observed(in_flight: u64, pending: u64, idle_for: Option<u64>, now: Instant) -> Observation {
        Observation {
            in_flight,
            pending,
            last_active: idle_for.map(|s| now - Duration::from_secs(s)),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn table() {
        let now = Instant::now() + Duration::from_secs(3600);
        let cases = [
            // (current, in_flight, pending, idle for, policy, expected, why)
            (
                0,
                0,
                1,
                Some(0),
                POLICY,
                1,
                "a held request wakes the target",
            ),
            (0, 0, 0, None, POLICY, 0, "never used stays at zero"),
            (1, 0, 0, Some(10), POLICY, 1, "recently active stays up"),
            (
                1,
                0,
                0,
                Some(30),
                POLICY,
                0,
                "idle for the timeout goes to zero",
            ),
            (
                1,
                2,
                0,
                Some(300),
                POLICY,
                1,
                "in flight never goes to zero",
            ),
            (1, 0, 3, Some(300), POLICY, 1, "held never goes to zero"),
            (
                0,
                0,
                0,
                None,
                Policy { min: 1, ..POLICY },
                1,
                "min keeps an instance",
            ),
            (
                1,
                0,
                0,
                Some(300),
                Policy { min: 1, ..POLICY },
                1,
                "min is never undercut",
            ),
        ];
        for (current, in_flight, pending, idle, policy, expected, why) in cases {
            let o = observed(in_flight, pending, idle, now);
            assert_eq!(decide(current, &o, &policy, now), expected, "{why}");
        }
    }
}
