//! Balancing: which ready endpoint of a target takes the next request.

use crate::target::{Lease, Target};

/// Leases a ready endpoint: of two picked at random, the one with fewer requests in
/// flight (power of two choices), falling back to any endpoint that is not draining.
pub fn pick(target: &Target) -> Option<Lease> {
    let endpoints = target.endpoints();
    let chosen = match endpoints.len() {
        0 => return None,
        1 => &endpoints[0],
        n => {
            let r = random();
            let a = (r % n as u64) as usize;
            let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
            let (a, b) = (&endpoints[a], &endpoints[b]);
            if b.in_flight() < a.in_flight() { b } else { a }
        }
    };
    chosen
        .lease()
        .or_else(|| endpoints.iter().find_map(|e| e.lease()))
}

/// A fast, non-cryptographic random number for load balancing choices.
fn random() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let seed = std::collections::hash_map::RandomState::new();
            std::hash::BuildHasher::hash_one(&seed, 0u64) | 1
        });
    }
    STATE.with(|state| {
        // xorshift64*
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}
