//! The per-target loop that owns the clock: wakes a cold target the moment a request asks for
//! it, and on every tick samples the signal, feeds the policy and executes its decision
//! through the provider.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::policy::{Now, Policy, Sample, Settings, Window};
use super::prometheus::{self, Reading};
use crate::config::Metric;
use crate::provider::{Remote, RemoteSignal, Scale};
use crate::target::streams::Close;
use crate::target::{Signal, Target};

/// Turns the target's counters into one [`Sample`] per tick.
#[derive(Debug)]
pub struct Sampler {
    /// Microseconds since the target's epoch: the clock the concurrency integral is kept in,
    /// so that an interval's average can never exceed its largest concurrency.
    at_us: u64,
    /// Request-microseconds: differences of whole numbers divide without rounding up.
    integral_us: u64,
    requests: u64,
}

impl Sampler {
    pub fn new(target: &Target, at: Instant) -> Self {
        let at_us = target.micros(at);
        Self {
            at_us,
            integral_us: target.stats.concurrency.integral_us(at_us),
            requests: target.stats.requests.total(),
        }
    }

    /// The time-weighted average concurrency and the request rate since the last call, with
    /// what `remote` replicas added meanwhile.
    pub fn sample(&mut self, target: &Target, at: Instant, remote: Remote) -> Sample {
        let at_us = target.micros(at);
        let integral_us = target.stats.concurrency.integral_us(at_us);
        let requests = target.stats.requests.total();
        let micros = at_us.saturating_sub(self.at_us);
        let seconds = micros as f64 / 1e6;
        let sample = if seconds > 0.0 {
            Sample {
                at,
                concurrency: (integral_us.saturating_sub(self.integral_us) as f64 / micros as f64
                    + remote.integral / seconds)
                    .max(0.0),
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
            at_us,
            integral_us,
            requests,
        };
        sample
    }
}

/// Scales `target` through `scale` until `stop`: at once when a request asks for a wake, and
/// on every tick of `interval` (which a reload may change) from the signal, to which `remote`
/// adds the other replicas' share; or, for a target with a Prometheus source, from its query.
pub async fn run(
    target: Arc<Target>,
    scale: Scale,
    mut interval: watch::Receiver<Duration>,
    remote: Option<Arc<dyn RemoteSignal>>,
    stop: CancellationToken,
) {
    let settings = Settings::serving(&target.scaling, &target.serving);
    let mut policy = Policy::default();
    let mut window = Window::default();
    let mut desired = settings.min;
    target.set_desired(desired);
    if desired > 0 {
        scale.to(desired);
    }
    let mut sampler = Sampler::new(&target, Instant::now());
    // The idle timeout counts from start-up too: instances found running are not stopped at once.
    let mut last_active: Option<Instant> = Some(Instant::now());
    // Instances this loop did not ask for (a Deployment already running when wakegate
    // started) are adopted as the current count, until the loop asks for something itself.
    let mut asked = desired > 0;
    let mut last_observed: Option<u32> = None;
    let query = target.scaling.source.clone().map(|source| {
        let (readings, latest) = watch::channel(Reading::Pending);
        tokio::spawn(prometheus::poll(
            target.clone(),
            source,
            readings,
            stop.clone(),
        ));
        latest
    });
    // Unlike `last_active`, only what was seen: what outside scalers are told.
    let mut last_seen_active: Option<Instant> = None;
    let mut ticker = new_ticker(*interval.borrow_and_update());
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            Ok(()) = interval.changed() => {
                let every = *interval.borrow_and_update();
                ticker = new_ticker(every);
                // The first tick of a new interval is immediate: skip it, the last one was
                // just taken.
                ticker.reset();
            }
            () = target.wake_requested() => {
                if target.endpoints().is_empty() {
                    if let Some(remote) = &remote {
                        remote.held_here(&target);
                    }
                    asked = true;
                    if desired == 0 {
                        desired = 1;
                        target.set_desired(desired);
                        target.stats.scaled_up.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(target = %target.name(), from = 0, to = 1, pending = target.stats.pending(), "waking");
                    }
                    scale.to(desired);
                }
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                // Streams quiet for `stream_idle_timeout` stop counting as demand from here.
                target.streams.sweep(target.micros(now), target.serving.stream_idle_timeout);
                let remote = remote.as_ref().map(|r| r.take(&target)).unwrap_or_default();
                let mut demand = target.demand() + remote.demand;
                let sample = match &query {
                    None => sampler.sample(&target, now, remote),
                    Some(latest) => match prometheus::signal(*latest.borrow(), now) {
                        Some((sample, from_query)) => {
                            demand += from_query;
                            sample
                        }
                        // No fresh value: the last decision stands (a held request still
                        // wakes the target at once, above), lost instances included: with
                        // no signal there is no telling they are not needed.
                        None => {
                            if target.endpoints().len() < desired as usize {
                                scale.to(desired);
                            }
                            continue;
                        }
                    },
                };
                window.push(sample, settings.keep());
                if demand > 0 || sample.rps > 0.0 {
                    last_active = Some(now);
                    last_seen_active = Some(now);
                }
                // The panic window's average: it follows a burst within seconds, and smooths
                // the peers' share, which arrives once per scrape rather than every tick.
                let span = settings.panic_window;
                target.publish_signal(Signal {
                    concurrency: window.average(Metric::Concurrency, span, now),
                    rps: window.average(Metric::Rps, span, now),
                    demand,
                    last_active: last_seen_active,
                });
                let ready = target.endpoints().len() as u32;
                // Where the provider reads the workload's count (Kubernetes), a change made by
                // someone else (`kubectl scale`) becomes the count decisions start from.
                if let Some(observed) = target.observed_replicas()
                    && last_observed.replace(observed) != Some(observed)
                    && observed != desired
                {
                    tracing::debug!(target = %target.name(), from = desired, to = observed, "the workload's replica count changed");
                    desired = observed;
                    asked = true;
                    target.set_desired(desired);
                }
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
                        stable = rounded(decision.stable),
                        panic = rounded(decision.panic),
                        panicking = decision.panicking,
                        idle = decision.idle,
                        metric = ?settings.metric,
                        per_instance_target = settings.target,
                        demand,
                        "scaling"
                    );
                    if decision.desired == 0 {
                        // Before any instance stops: the streams still open on them (idle
                        // ones, or there would be demand) close gracefully.
                        target.close_streams(Close::ScaledToZero);
                    }
                    desired = decision.desired;
                    asked = true;
                    target.set_desired(desired);
                    scale.to(desired);
                } else if ready < desired && (demand > 0 || settings.min > 0) {
                    // An instance crashed or failed to start while it is still needed: ask
                    // again, at most once a tick.
                    scale.to(desired);
                }
            }
        }
    }
}

fn new_ticker(every: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

/// A metric average as a log line shows it: three decimals are plenty for a person.
fn rounded(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_never_averages_more_than_the_requests_open_whatever_the_clock_reads() {
        let config = crate::config::Config::first_target(
            "[[target]]\nname = \"hello\"\nhosts = [\"hello.localhost\"]\ncommand = [\"demo\"]\n",
        );
        let target = Target::new(config);
        let start = Instant::now();
        let mut sampler = Sampler::new(&target, start);
        let begun = target.micros(start);
        for _ in 0..4 {
            target.stats.concurrency.begin(begun);
        }
        // Intervals that end between two microseconds: the integral counts whole ones.
        for nanos in [1_999, 250_000_999, 500_000_001, 999_999_999] {
            let at = start + Duration::from_nanos(nanos);
            let sample = sampler.sample(&target, at, Remote::default());
            assert!(
                sample.concurrency <= 4.0,
                "{} at {nanos} ns",
                sample.concurrency
            );
            assert!(
                sample.concurrency > 3.99,
                "{} at {nanos} ns",
                sample.concurrency
            );
        }
    }
}
