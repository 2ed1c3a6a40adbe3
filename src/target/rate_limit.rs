//! Per-client rate limits of one target: GCRA state in a fixed-size table of atomic cells,
//! keyed by a hash of the client's address, shared by every worker of the process.
//!
//! Why this and not pingora-limits' `Rate`: `Rate` estimates how many events a key had in the
//! last interval (a count-min sketch per interval); a limit with a burst needs the time at
//! which a client's budget is full again, which the GCRA keeps exactly in one `u64` per cell
//! and which also gives `Retry-After` without guessing. The table is direct-mapped rather than
//! count-min: one cell per client makes the update one compare-and-swap, exact even when two
//! workers serve the same client at once. Clients whose addresses hash to the same cell share
//! its budget, so a collision can only make a limit stricter, never looser; and a cell only
//! limits while it is busy (its time is ahead of now), so many quiet clients in one cell cost
//! nothing. The hash is seeded at random per table, so nobody can aim a collision at a chosen
//! client.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::RateLimit;

/// The cells of every table: 64 Ki cells of 8 bytes, 512 KiB per rate-limited target whatever
/// the number of clients.
pub const CELLS: usize = 1 << 16;

/// The state of one target's limit.
pub struct RateLimiter {
    /// Per cell, the GCRA's theoretical arrival time: nanoseconds since `epoch` at which the
    /// cell's clients have used up nothing; 0 (the past) for a cell nobody used.
    cells: Box<[AtomicU64]>,
    /// Nanoseconds between two requests at the sustained rate (the emission interval).
    interval: u64,
    /// How far the theoretical arrival time may run ahead of now: `burst - 1` intervals.
    tolerance: u64,
    epoch: Instant,
    hasher: foldhash::fast::RandomState,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("cells", &self.cells.len())
            .field("interval", &Duration::from_nanos(self.interval))
            .field("tolerance", &Duration::from_nanos(self.tolerance))
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    pub fn new(limit: &RateLimit) -> Self {
        Self::with_cells(limit, CELLS)
    }

    fn with_cells(limit: &RateLimit, cells: usize) -> Self {
        // At least a nanosecond: validation bounds the rate, this keeps the arithmetic sound.
        let interval = ((1e9 / limit.per_second) as u64).max(1);
        Self {
            cells: (0..cells).map(|_| AtomicU64::new(0)).collect(),
            interval,
            tolerance: interval.saturating_mul(u64::from(limit.burst.max(1) - 1)),
            epoch: Instant::now(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Takes one request of `client` at the present time: `Ok` when it is within the limit,
    /// else `Err` with how long until the client may send one again.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        self.check_at(client, Instant::now())
    }

    fn check_at(&self, client: IpAddr, at: Instant) -> Result<(), Duration> {
        // Plus one so that a request at the epoch itself is after an unused cell's zero.
        let now = at.saturating_duration_since(self.epoch).as_nanos() as u64 + 1;
        let cell = &self.cells[self.index(client)];
        let mut tat = cell.load(Ordering::Acquire);
        loop {
            let allowed_from = tat.saturating_sub(self.tolerance);
            if allowed_from > now {
                return Err(Duration::from_nanos(allowed_from - now));
            }
            let next = tat.max(now) + self.interval;
            match cell.compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(now_there) => tat = now_there,
            }
        }
    }

    fn index(&self, client: IpAddr) -> usize {
        let hash = self.hasher.hash_one(Key::of(client));
        // The table's length is a power of two.
        (hash as usize) & (self.cells.len() - 1)
    }

    /// The bytes the table holds, whatever the number of clients.
    pub fn memory(&self) -> usize {
        std::mem::size_of_val(&*self.cells)
    }
}

/// What one client is, for a limit: an IPv4 address, or an IPv6 /64 (one subscriber's network:
/// a host that owns a /64 could otherwise take a fresh address per request).
#[derive(Hash)]
enum Key {
    V4(u32),
    V6(u64),
}

impl Key {
    fn of(client: IpAddr) -> Key {
        match client.to_canonical() {
            IpAddr::V4(v4) => Key::V4(v4.to_bits()),
            IpAddr::V6(v6) => Key::V6((v6.to_bits() >> 64) as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn limit(per_second: f64, burst: u32) -> RateLimit {
        RateLimit { per_second, burst }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    #[test]
    fn a_burst_is_allowed_then_the_sustained_rate() {
        let limiter = RateLimiter::new(&limit(10.0, 5));
        let t0 = limiter.epoch;
        for i in 0..5 {
            assert_eq!(
                limiter.check_at(ip(1), t0),
                Ok(()),
                "request {i} of the burst"
            );
        }
        let wait = limiter.check_at(ip(1), t0).unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && !wait.is_zero(),
            "{wait:?}"
        );
        // One interval later, one more request and no more.
        let later = t0 + Duration::from_millis(100);
        assert_eq!(limiter.check_at(ip(1), later), Ok(()));
        assert!(limiter.check_at(ip(1), later).is_err());
        // A full idle second refills the burst.
        let idle = later + Duration::from_secs(1);
        for _ in 0..5 {
            assert_eq!(limiter.check_at(ip(1), idle), Ok(()));
        }
        assert!(limiter.check_at(ip(1), idle).is_err());
    }

    #[test]
    fn retry_after_is_the_time_until_the_next_request_is_allowed() {
        let limiter = RateLimiter::new(&limit(0.5, 1));
        let t0 = limiter.epoch;
        assert_eq!(limiter.check_at(ip(1), t0), Ok(()));
        let wait = limiter
            .check_at(ip(1), t0 + Duration::from_millis(500))
            .unwrap_err();
        assert_eq!(wait, Duration::from_millis(1500));
        assert_eq!(limiter.check_at(ip(1), t0 + Duration::from_secs(2)), Ok(()));
    }

    #[test]
    fn clients_in_other_cells_keep_their_own_budget() {
        let limiter = RateLimiter::new(&limit(1.0, 1));
        let t0 = limiter.epoch;
        assert_eq!(limiter.check_at(ip(1), t0), Ok(()));
        assert!(limiter.check_at(ip(1), t0).is_err());
        let other = (2..=255)
            .map(ip)
            .find(|&c| limiter.index(c) != limiter.index(ip(1)))
            .unwrap();
        assert_eq!(limiter.check_at(other, t0), Ok(()));
    }

    #[test]
    fn ipv6_clients_are_limited_by_their_64_and_mapped_ipv4_as_ipv4() {
        let limiter = RateLimiter::new(&limit(1.0, 1));
        let t0 = limiter.epoch;
        let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(limiter.check_at(a.into(), t0), Ok(()));
        assert!(limiter.check_at(b.into(), t0).is_err());
        assert_eq!(limiter.check_at(ip(7), t0), Ok(()));
        let mapped = Ipv4Addr::new(10, 0, 0, 7).to_ipv6_mapped();
        assert!(limiter.check_at(mapped.into(), t0).is_err());
    }

    #[test]
    fn memory_is_the_fixed_table_whatever_the_number_of_clients() {
        let limiter = RateLimiter::new(&limit(1.0, 1));
        assert_eq!(limiter.memory(), CELLS * 8);
        let t0 = limiter.epoch;
        for n in 0..1_000_000u32 {
            let _ = limiter.check_at(IpAddr::V4(Ipv4Addr::from_bits(n)), t0);
        }
        assert_eq!(limiter.memory(), CELLS * 8);
        assert_eq!(limiter.cells.len(), CELLS);
    }

    #[test]
    fn a_collision_only_makes_the_limit_stricter() {
        // Two cells: many clients share each.
        let limiter = RateLimiter::with_cells(&limit(1.0, 3), 2);
        let t0 = limiter.epoch;
        let mut allowed = 0;
        for n in 0..100u8 {
            allowed += usize::from(limiter.check_at(ip(n), t0).is_ok());
        }
        // Never more than one burst per cell, however many clients fill it.
        assert!(allowed <= 2 * 3, "{allowed}");
        // Each client alone would have had its own burst of 3.
        assert!(allowed < 100);
    }
}
