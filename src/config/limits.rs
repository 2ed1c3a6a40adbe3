//! `[limits]`: what one client connection may cost on the proxy port, for HTTP/1.1 and
//! HTTP/2 alike: how long it may take to send a request head or stay idle, how large a head
//! may be, how many HTTP/2 streams and resets it may have, and how many connections one
//! worker serves at once; and what the whole process may take: how many requests and bytes
//! all targets together may hold, and the memory budget past which new requests are shed.

use std::time::Duration;

use serde::Deserialize;

/// `[limits]` as written, with safe defaults for a port that faces the internet.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, expecting = "a `[limits]` table")]
pub struct Limits {
    /// A new connection must send a complete request head (or, on HTTP/2, its first
    /// request's HEADERS) within this long; HTTP/1 also waits at most this long for the head
    /// of each next request.
    #[serde(default = "defaults::header_read_timeout", with = "super::duration")]
    pub header_read_timeout: Duration,
    /// A connection with no request in progress is closed (HTTP/2 with GOAWAY) after this long.
    #[serde(default = "defaults::idle_timeout", with = "super::duration")]
    pub idle_timeout: Duration,
    /// The largest request head: HTTP/1 request line and headers (431 or 414 beyond it), or
    /// an HTTP/2 header list as RFC 9113 §6.5.2 counts it (431 beyond it).
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: u32,
    /// The most header fields in an HTTP/1 request head (431 beyond it).
    #[serde(default = "defaults::max_headers")]
    pub max_headers: u32,
    /// The most streams one HTTP/2 client may have open at once (advertised in SETTINGS;
    /// a stream beyond it is refused with REFUSED_STREAM).
    #[serde(default = "defaults::max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// Rapid reset: the most streams an HTTP/2 client may open and reset before wakegate
    /// has answered them; beyond it the connection ends with GOAWAY (ENHANCE_YOUR_CALM).
    #[serde(default = "defaults::max_pending_reset_streams")]
    pub max_pending_reset_streams: u32,
    /// The most streams wakegate may have to reset for a client's protocol errors on one
    /// HTTP/2 connection; beyond it the connection ends with GOAWAY (ENHANCE_YOUR_CALM).
    #[serde(default = "defaults::max_local_reset_streams")]
    pub max_local_reset_streams: u32,
    /// The most client connections one worker serves at once; beyond it the worker stops
    /// accepting until one closes, and new connections wait in the kernel's listen queue.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: u32,
    /// The most requests all targets together may hold while they wake (each target's own
    /// bound is its `max_pending`); beyond it new ones get 503.
    #[serde(default = "defaults::max_held_requests")]
    pub max_held_requests: u32,
    /// The most bytes all held requests together may pin: their heads, and the HTTP/2 body
    /// bytes their clients may send before they are forwarded; beyond it new ones get 503.
    #[serde(default = "defaults::max_held_bytes", with = "super::size")]
    pub max_held_bytes: u64,
    /// Resident memory past which wakegate sheds new requests with 503 until it is below
    /// again; by default 90 % of the memory limit of its container (cgroup), or of the
    /// machine's memory where there is none.
    #[serde(default, with = "super::size::option")]
    pub memory_budget: Option<u64>,
}

/// hyper's HTTP/1 read buffer cannot be smaller (it asserts so).
pub const MIN_HEADER_BYTES: u32 = 8 * 1024;
/// Far more than any real client sends; more would let one connection hold that much memory.
pub const MAX_HEADER_BYTES: u32 = 16 * 1024 * 1024;

/// Less than one held request with an HTTP/2 body could pin.
pub const MIN_HELD_BYTES: u64 = 64 * 1024;
/// Below what wakegate itself takes at rest: every request would be shed.
pub const MIN_MEMORY_BUDGET: u64 = 4 << 20;

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: defaults::header_read_timeout(),
            idle_timeout: defaults::idle_timeout(),
            max_header_bytes: defaults::max_header_bytes(),
            max_headers: defaults::max_headers(),
            max_concurrent_streams: defaults::max_concurrent_streams(),
            max_pending_reset_streams: defaults::max_pending_reset_streams(),
            max_local_reset_streams: defaults::max_local_reset_streams(),
            max_connections: defaults::max_connections(),
            max_held_requests: defaults::max_held_requests(),
            max_held_bytes: defaults::max_held_bytes(),
            memory_budget: None,
        }
    }
}

mod defaults {
    use super::*;

    pub fn header_read_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn max_header_bytes() -> u32 {
        64 * 1024
    }
    /// hyper's own default.
    pub fn max_headers() -> u32 {
        100
    }
    /// hyper's own default.
    pub fn max_concurrent_streams() -> u32 {
        200
    }
    /// hyper's own default.
    pub fn max_pending_reset_streams() -> u32 {
        20
    }
    /// hyper's own default.
    pub fn max_local_reset_streams() -> u32 {
        1024
    }
    pub fn max_connections() -> u32 {
        10_000
    }
    /// Twice the README's burst of 10,000 requests into one cold target.
    pub fn max_held_requests() -> u32 {
        20_000
    }
    pub fn max_held_bytes() -> u64 {
        256 << 20
    }
}
