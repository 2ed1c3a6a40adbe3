//! A target's long-lived streams: responses still streaming after they first had to wait for
//! their upstream, and upgraded connections (WebSocket). Each counts its own activity; the
//! autoscaler's tick sweeps them and marks those quiet for `stream_idle_timeout` idle, which
//! then no longer keep the target awake.
//!
//! Why a sweep: the data plane only bumps a counter of the stream's own (no clock read per
//! frame), and a stream that is quiet is never polled, so it cannot tell by itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_queue::SegQueue;

/// Why wakegate closed a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The target is scaling to zero.
    ScaledToZero,
    /// The instance the stream is on is stopped, others go on.
    ScaledDown,
}

impl Close {
    pub const ALL: [Close; 2] = [Close::ScaledToZero, Close::ScaledDown];

    pub fn label(self) -> &'static str {
        match self {
            Close::ScaledToZero => "scaled_to_zero",
            Close::ScaledDown => "scaled_down",
        }
    }

    /// What the client is told (a WebSocket close reason, a `grpc-message`): short, as a
    /// WebSocket close reason may be at most 123 bytes.
    pub fn message(self) -> &'static str {
        match self {
            Close::ScaledToZero => "the target is scaling to zero",
            Close::ScaledDown => "the instance is stopping: scaled down",
        }
    }
}

const OPEN: u8 = 0;
const IDLE: u8 = 1;
const ENDED: u8 = 2;
/// `quiet_since_us` of a stream no sweep has seen yet.
const UNSEEN: u64 = u64::MAX;

/// One stream's activity, shared by whatever carries its bytes and the sweep.
#[derive(Debug)]
pub struct Stream {
    /// Bumped whenever the stream carries something, in either direction.
    activity: AtomicU64,
    state: AtomicU8,
    /// Whether it is one of the target's streams (only its activity is kept before).
    registered: AtomicBool,
    /// The sweep's own memory: the activity it last saw, and since when it has not changed.
    seen: AtomicU64,
    quiet_since_us: AtomicU64,
}

impl Default for Stream {
    fn default() -> Self {
        Self {
            activity: AtomicU64::new(0),
            state: AtomicU8::new(OPEN),
            registered: AtomicBool::new(false),
            seen: AtomicU64::new(0),
            quiet_since_us: AtomicU64::new(UNSEEN),
        }
    }
}

impl Stream {
    /// The stream carried something.
    #[inline]
    pub fn active(&self) {
        self.activity.fetch_add(1, Ordering::Relaxed);
    }
}

/// The streams of one target, and their counts.
#[derive(Debug, Default)]
pub struct Streams {
    /// Every registered stream not yet seen ended by a sweep.
    registered: SegQueue<Arc<Stream>>,
    /// Registered streams that have not ended.
    open: AtomicI64,
    /// Streams marked idle that have neither ended nor carried anything since.
    idle: AtomicI64,
    closed: [AtomicU64; Close::ALL.len()],
}

impl Streams {
    /// From now on `stream` is swept; registering it again changes nothing.
    pub fn register(&self, stream: Arc<Stream>) {
        if !stream.registered.swap(true, Ordering::Relaxed) {
            self.open.fetch_add(1, Ordering::Relaxed);
            self.registered.push(stream);
        }
    }

    /// `stream` ended: it no longer counts, idle or not.
    pub fn end(&self, stream: &Stream) {
        match stream.state.swap(ENDED, Ordering::SeqCst) {
            ENDED => return,
            IDLE => {
                self.idle.fetch_sub(1, Ordering::SeqCst);
            }
            _ => {}
        }
        if stream.registered.load(Ordering::Relaxed) {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Autoscaler, once a tick at `now_us` (the target's clock): marks idle every stream whose
    /// activity has not changed for `quiet_for`, and active again any idle one that carried
    /// something; forgets ended ones.
    pub fn sweep(&self, now_us: u64, quiet_for: Duration) {
        let quiet_us = u64::try_from(quiet_for.as_micros()).unwrap_or(u64::MAX);
        // Those registered meanwhile wait for the next sweep.
        for _ in 0..self.registered.len() {
            let Some(stream) = self.registered.pop() else {
                break;
            };
            if stream.state.load(Ordering::SeqCst) == ENDED {
                continue;
            }
            let activity = stream.activity.load(Ordering::Relaxed);
            let since = stream.quiet_since_us.load(Ordering::Relaxed);
            if since == UNSEEN || activity != stream.seen.load(Ordering::Relaxed) {
                stream.seen.store(activity, Ordering::Relaxed);
                stream.quiet_since_us.store(now_us, Ordering::Relaxed);
                if stream
                    .state
                    .compare_exchange(IDLE, OPEN, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    self.idle.fetch_sub(1, Ordering::SeqCst);
                }
            } else if now_us.saturating_sub(since) >= quiet_us
                && stream
                    .state
                    .compare_exchange(OPEN, IDLE, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                self.idle.fetch_add(1, Ordering::SeqCst);
            }
            self.registered.push(stream);
        }
    }

    /// Streams open now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed).max(0) as u64
    }

    /// Streams idle now: open, and quiet for at least `stream_idle_timeout` at the last sweep.
    pub fn idle(&self) -> u64 {
        self.idle.load(Ordering::SeqCst).max(0) as u64
    }

    /// Wakegate closed a stream, for `why`.
    pub fn closed(&self, why: Close) {
        self.closed[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn closed_total(&self, why: Close) -> u64 {
        self.closed[why as usize].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000;

    #[test]
    fn a_stream_quiet_for_the_timeout_is_idle_until_it_carries_something_or_ends() {
        let streams = Streams::default();
        let (quiet, busy) = (Arc::new(Stream::default()), Arc::new(Stream::default()));
        streams.register(quiet.clone());
        streams.register(busy.clone());
        let timeout = Duration::from_secs(10);
        for second in 0..=10 {
            busy.active();
            streams.sweep(second * SECOND, timeout);
        }
        assert_eq!((streams.open(), streams.idle()), (2, 1), "10 s quiet");

        quiet.active();
        streams.sweep(11 * SECOND, timeout);
        assert_eq!(streams.idle(), 0, "it carried something");
        streams.sweep(21 * SECOND, timeout);
        assert_eq!(streams.idle(), 2, "both quiet since");

        streams.end(&quiet);
        assert_eq!(
            (streams.open(), streams.idle()),
            (1, 1),
            "an ended stream no longer counts"
        );
        streams.sweep(22 * SECOND, timeout);
        assert_eq!((streams.open(), streams.idle()), (1, 1));
        streams.end(&busy);
        streams.end(&busy);
        streams.sweep(23 * SECOND, timeout);
        assert_eq!((streams.open(), streams.idle()), (0, 0), "counted once");
        assert_eq!(streams.registered.len(), 0, "forgotten");
    }
}
