//! The scaling decision: a deterministic function of the signal window, the target's settings
//! and `now` (no I/O, no clock of its own), in the manner of Knative's KPA but without its
//! flapping:
//!
//! - desired = ceil(signal / target) over the stable window, clamped to `[min, max]`;
//! - panic when the panic window wants at least `panic_threshold` × the ready instances; in
//!   panic the panic window decides and the count never goes down; panic ends once a whole
//!   stable window passed without the condition;
//! - at most `max_scale_up_rate` × / at least 1/`max_scale_down_rate` × the current count per
//!   decision;
//! - a scale-down delay: the highest recommendation of the last `scale_down_delay` wins;
//! - zero only after `idle_timeout` with nothing in flight or held.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Metric;

/// Everything the decision depends on, with the user's values (no hidden factors).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub min: u32,
    pub max: u32,
    pub metric: Metric,
    /// Per-instance target of `metric`.
    pub target: f64,
    pub stable_window: Duration,
    pub panic_window: Duration,
    pub panic_threshold: f64,
    pub max_scale_up_rate: f64,
    pub max_scale_down_rate: f64,
    pub scale_down_delay: Duration,
    pub idle_timeout: Duration,
}

impl Settings {
    pub fn of(target: &crate::config::TargetConfig) -> Self {
        Self::serving(&target.scaling, &target.serving)
    }

    /// The settings of a target served as `serving` says: a concurrency target is at most its
    /// `instance_concurrency`, as Knative caps its target at `containerConcurrency`. Above
    /// it, every instance would be full, and requests queued in wakegate, before the signal
    /// asked for one more.
    pub fn serving(s: &crate::config::Scaling, serving: &crate::config::Serving) -> Self {
        let mut settings = Self::new(s, serving.idle_timeout);
        if let Some(limit) = serving.instance_limit()
            && settings.metric == Metric::Concurrency
            && s.source.is_none()
        {
            settings.target = settings.target.min(f64::from(limit.get()));
        }
        settings
    }

    pub fn new(s: &crate::config::Scaling, idle_timeout: Duration) -> Self {
        Self {
            min: s.min,
            max: s.max,
            metric: s.metric,
            target: s.target_value(),
            stable_window: s.stable_window,
            panic_window: s.panic_window,
            panic_threshold: s.panic_threshold,
            max_scale_up_rate: s.max_scale_up_rate,
            max_scale_down_rate: s.max_scale_down_rate,
            scale_down_delay: s.scale_down_delay,
            idle_timeout,
        }
    }

    /// ceil(signal / target): the instances a signal asks for. Computed a hair below each
    /// integer, so that float noise in an average of exactly N × target asks for N, not N + 1.
    pub fn instances_for(&self, signal: f64) -> u32 {
        (signal / self.target - 1e-9)
            .ceil()
            .clamp(0.0, f64::from(u32::MAX)) as u32
    }

    /// How much history decisions need.
    pub fn keep(&self) -> Duration {
        self.stable_window.max(self.panic_window)
    }
}

/// One tick's worth of signal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// The end of the interval this sample covers.
    pub at: Instant,
    /// Time-weighted average of requests in flight or held over the interval.
    pub concurrency: f64,
    /// Requests per second answered over the interval.
    pub rps: f64,
}

/// The recent samples of one target, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Window {
    samples: VecDeque<Sample>,
}

impl Window {
    /// Adds a sample and forgets those older than `keep`.
    pub fn push(&mut self, sample: Sample, keep: Duration) {
        self.samples.push_back(sample);
        while let Some(first) = self.samples.front() {
            if sample.at.saturating_duration_since(first.at) >= keep {
                self.samples.pop_front();
            } else {
                break;
            }
        }
    }

    /// Mean of `metric` over the samples of the last `span` before `now`; 0 with none.
    pub fn average(&self, metric: Metric, span: Duration, now: Instant) -> f64 {
        let (sum, n) = self
            .samples
            .iter()
            .rev()
            .take_while(|s| now.saturating_duration_since(s.at) < span)
            .fold((0.0, 0u32), |(sum, n), s| {
                let v = match metric {
                    Metric::Concurrency => s.concurrency,
                    Metric::Rps => s.rps,
                };
                (sum + v, n + 1)
            });
        if n == 0 { 0.0 } else { sum / f64::from(n) }
    }
}

/// What is true right now, beyond the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub at: Instant,
    /// Instances ready to take requests.
    pub ready: u32,
    /// Requests in flight or held at this moment.
    pub demand: u64,
    /// The last moment a request arrived or was in flight or held.
    pub last_active: Option<Instant>,
}

/// A decision and the numbers that caused it (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub desired: u32,
    pub stable: f64,
    pub panic: f64,
    pub panicking: bool,
    pub idle: bool,
}

/// The memory a decision needs from earlier ones: when panic began, recent recommendations.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    panic_since: Option<Instant>,
    recommendations: VecDeque<(Instant, u32)>,
}

impl Policy {
    pub fn decide(&mut self, window: &Window, s: &Settings, current: u32, now: Now) -> Decision {
        let stable = window.average(s.metric, s.stable_window, now.at);
        let panic = window.average(s.metric, s.panic_window, now.at);
        let (want_stable, want_panic) = (s.instances_for(stable), s.instances_for(panic));

        let base = now.ready.max(1);
        if f64::from(want_panic) >= s.panic_threshold * f64::from(base) && want_panic > now.ready {
            if self.panic_since.is_none() {
                tracing::debug!(want_panic, ready = now.ready, "entering panic mode");
            }
            self.panic_since = Some(now.at);
        } else if self
            .panic_since
            .is_some_and(|since| now.at.saturating_duration_since(since) >= s.stable_window)
        {
            self.panic_since = None;
        }
        let panicking = self.panic_since.is_some();

        let mut desired = if panicking {
            want_panic.max(current)
        } else {
            want_stable
        };

        // Rate limits, relative to what runs (or is asked for) now.
        let up_limit = (f64::from(now.ready.max(current).max(1)) * s.max_scale_up_rate).ceil();
        desired = desired.min(up_limit.min(f64::from(u32::MAX)) as u32);
        let down_limit = (f64::from(current) / s.max_scale_down_rate).floor() as u32;
        desired = desired.max(down_limit);

        // Scale-down delay: the highest recommendation of the last `scale_down_delay`.
        self.recommendations.push_back((now.at, desired));
        while let Some(&(at, _)) = self.recommendations.front() {
            if now.at.saturating_duration_since(at) > s.scale_down_delay {
                self.recommendations.pop_front();
            } else {
                break;
            }
        }
        desired = self
            .recommendations
            .iter()
            .map(|&(_, n)| n)
            .max()
            .unwrap_or(desired);

        // Zero only when idle, and then at once: the idle timeout, not the scale-down delay,
        // governs the last instance. Any demand keeps (or wakes) one; a sleeping target with
        // no demand stays asleep (waking is the first request's job).
        let idle = now.demand == 0
            && now
                .last_active
                .is_none_or(|at| now.at.saturating_duration_since(at) >= s.idle_timeout);
        if idle || (current == 0 && now.demand == 0) {
            desired = 0;
            self.recommendations.clear();
            self.panic_since = None;
        } else if desired == 0 {
            desired = 1;
        }

        Decision {
            desired: desired.clamp(s.min, s.max.max(s.min)),
            stable,
            panic,
            panicking,
            idle,
        }
    }
}

#[cfg(test)]
mod tests;
