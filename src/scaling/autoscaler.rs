//! The per-target loop that owns the clock: wakes a cold target the moment a request asks for
//! it, and on every tick samples the signal, feeds the policy and executes its decision
//! through the provider.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::policy::{Now, Policy, Sample, Settings, Window};
use crate::provider::Provider;
use crate::target::Target;

/// What other wakegate replicas saw of a target since the last tick.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Remote {
    /// Request-seconds in flight or held.
    pub integral: f64,
    pub requests: u64,
    /// In flight or held right now.
    pub demand: u64,
}

/// The rest of the cluster's signal, added to this replica's own counters.
pub trait RemoteSignal: Send + Sync {
    fn take(&self, target: &Target) -> Remote;
}

/// Turns the target's counters into one [`Sample`] per tick.
#[derive(Debug)]
pub struct Sampler {
    at: Instant,
    integral: f64,
    requests: u64,
}

impl Sampler {
    pub fn new(target: &Target, at: Instant) -> Self {
        Self {
            at,
            integral: target.stats.concurrency.integral(target.micros(at)),
            requests: target.stats.requests.total(),
        }
    }

    /// The time-weighted average concurrency and the request rate since the last call, with
    /// what `remote` replicas added meanwhile.
    pub fn sample(&mut self, target: &Target, at: Instant, remote: Remote) -> Sample {
        let integral = target.stats.concurrency.integral(target.micros(at));
        let requests = target.stats.requests.total();
        let seconds = at.saturating_duration_since(self.at).as_secs_f64();
        let sample = if seconds > 0.0 {
            Sample {
                at,
                concurrency: ((integral - self.integral + remote.integral) / seconds).max(0.0),
                rps: (requests.saturating_sub(self.requests) + remote.requests) as f64 / seconds,
            }
        } else {
            Sample {
                at,
                concurrency: 0.0,
                rps: 0.0,
            }
        };
        *self = Self {
            at,
            integral,
            requests,
        };
        sample
    }
}

pub async fn run(
    target: Arc<Target>,
    provider: Arc<dyn Provider>,
    interval: Duration,
    remote: Option<Arc<dyn RemoteSignal>>,
    stop: CancellationToken,
) {
    let settings = Settings::of(&target.config);
    let mut policy = Policy::default();
    let mut window = Window::default();
    let mut desired = settings.min;
    target.set_desired(desired);
    if desired > 0 {
        provider.scale(&target, desired);
    }
    let mut sampler = Sampler::new(&target, Instant::now());
    // The idle timeout counts from start-up too: instances found running are not stopped at once.
    let mut last_active: Option<Instant> = Some(Instant::now());
    // Instances this loop did not ask for (a Deployment already running when wakegate
    // started) are adopted as the current count, until the loop asks for something itself.
    let mut asked = desired > 0;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = target.wake_requested() => {
                if target.endpoints().is_empty() {
                    asked = true;
                    if desired == 0 {
                        desired = 1;
                        target.set_desired(desired);
                        target.stats.scaled_up.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(target = %target.name(), from = 0, to = 1, pending = target.stats.pending(), "waking");
                    }
                    provider.scale(&target, desired);
                }
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                let remote = remote.as_ref().map(|r| r.take(&target)).unwrap_or_default();
                let sample = sampler.sample(&target, now, remote);
                window.push(sample, settings.keep());
                let demand = target.stats.in_flight() + target.stats.pending() + remote.demand;
                if demand > 0 || sample.rps > 0.0 {
                    last_active = Some(now);
                }
                let ready = target.endpoints().len() as u32;
                if !asked && ready > desired {
                    desired = ready;
                    target.set_desired(desired);
                }
                let decision = policy.decide(&window, &settings, desired, Now {
                    at: now,
                    ready,
                    demand,
                    last_active: last_active.max(target.last_request_at()),
                });
                if decision.desired != desired {
                    let up = decision.desired > desired;
                    let counter = if up { &target.stats.scaled_up } else { &target.stats.scaled_down };
                    counter.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        target = %target.name(),
                        from = desired,
                        to = decision.desired,
                        ready,
                        stable = decision.stable,
                        panic = decision.panic,
                        panicking = decision.panicking,
                        idle = decision.idle,
                        metric = ?settings.metric,
                        per_instance_target = settings.target,
                        demand,
                        "scaling"
                    );
                    desired = decision.desired;
                    asked = true;
                    target.set_desired(desired);
                    provider.scale(&target, desired);
                } else if ready < desired && (demand > 0 || settings.min > 0) {
                    // An instance crashed or failed to start while it is still needed: ask
                    // again, at most once a tick.
                    provider.scale(&target, desired);
                }
            }
        }
    }
}
