use super::*;

fn settings() -> Settings {
    Settings {
        min: 0,
        max: 100,
        metric: Metric::Concurrency,
        target: 10.0,
        stable_window: Duration::from_secs(60),
        panic_window: Duration::from_secs(6),
        panic_threshold: 2.0,
        max_scale_up_rate: 1000.0,
        max_scale_down_rate: 2.0,
        scale_down_delay: Duration::ZERO,
        idle_timeout: Duration::from_secs(300),
    }
}

/// A target fed one sample a second, deciding each second, on a paused clock.
struct Sim {
    policy: Policy,
    window: Window,
    settings: Settings,
    now: Instant,
    current: u32,
    last_active: Option<Instant>,
}

impl Sim {
    fn new(settings: Settings, current: u32) -> Self {
        Self {
            policy: Policy::default(),
            window: Window::default(),
            settings,
            now: Instant::now(),
            current,
            last_active: None,
        }
    }

    /// One second of `concurrency` (and as many rps); returns the decision. Ready instances
    /// follow desired at once.
    fn second(&mut self, concurrency: f64, demand: u64) -> Decision {
        self.now += Duration::from_secs(1);
        if concurrency > 0.0 || demand > 0 {
            self.last_active = Some(self.now);
        }
        let keep = self.settings.stable_window.max(self.settings.panic_window);
        self.window.push(
            Sample {
                at: self.now,
                concurrency,
                rps: concurrency,
            },
            keep,
        );
        let decision = self.policy.decide(
            &self.window,
            &self.settings,
            self.current,
            Now {
                at: self.now,
                ready: self.current,
                demand,
                last_active: self.last_active,
            },
        );
        self.current = decision.desired;
        decision
    }

    fn run(&mut self, seconds: u32, concurrency: f64) -> Vec<u32> {
        let demand = concurrency.ceil() as u64;
        (0..seconds)
            .map(|_| self.second(concurrency, demand).desired)
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn steady_load_settles_on_ceil_of_signal_over_target() {
    let cases = [
        // (concurrency, target, expected)
        (25.0, 10.0, 3),
        (30.0, 10.0, 3),
        (31.0, 10.0, 4),
        (5.0, 10.0, 1),
        (100.0, 1.0, 100),
        (1000.0, 1.0, 100), // clamped to max
    ];
    for (load, target, expected) in cases {
        let mut sim = Sim::new(
            Settings {
                target,
                ..settings()
            },
            1,
        );
        let last = *sim.run(120, load).last().unwrap();
        assert_eq!(last, expected, "load {load} target {target}");
    }
}

#[tokio::test(start_paused = true)]
async fn rps_metric_uses_the_request_rate() {
    let mut sim = Sim::new(
        Settings {
            metric: Metric::Rps,
            target: 50.0,
            ..settings()
        },
        1,
    );
    assert_eq!(*sim.run(120, 120.0).last().unwrap(), 3);
}

#[tokio::test(start_paused = true)]
async fn min_and_max_bound_the_count() {
    let mut sim = Sim::new(
        Settings {
            min: 2,
            max: 4,
            ..settings()
        },
        2,
    );
    assert_eq!(
        *sim.run(120, 1.0).last().unwrap(),
        2,
        "min holds under little load"
    );
    assert_eq!(
        *sim.run(120, 500.0).last().unwrap(),
        4,
        "max holds under much load"
    );
}

#[tokio::test(start_paused = true)]
async fn panic_enters_on_a_spike_and_reacts_within_a_tick() {
    let mut sim = Sim::new(settings(), 1);
    sim.run(60, 10.0);
    let d = sim.second(100.0, 100);
    assert!(d.panicking, "a 10x spike panics: {d:?}");
    assert!(d.desired >= 2, "and scales up at once: {d:?}");
}

#[tokio::test(start_paused = true)]
async fn panic_never_scales_down_and_ends_after_a_stable_window_without_the_condition() {
    let mut sim = Sim::new(settings(), 1);
    sim.run(60, 10.0);
    // A 6-second spike, then the old load again for three minutes.
    let decisions: Vec<Decision> = (0..186)
        .map(|s| {
            if s < 6 {
                sim.second(100.0, 100)
            } else {
                sim.second(10.0, 10)
            }
        })
        .collect();
    let peak = decisions.iter().map(|d| d.desired).max().unwrap();
    assert!(peak >= 8, "panic follows the spike: {peak}");
    for pair in decisions.windows(2) {
        if pair[1].panicking {
            assert!(
                pair[1].desired >= pair[0].desired,
                "no scale-down in panic: {pair:?}"
            );
        }
    }
    let last_panic = decisions
        .iter()
        .rposition(|d| d.panicking)
        .expect("it panicked");
    let last_trigger = decisions.iter().position(|d| d.panicking).unwrap();
    assert!(
        last_panic >= last_trigger + 59,
        "panic lasts a stable window"
    );
    assert!(
        last_panic < 6 + 60,
        "and ends a stable window after the last trigger"
    );
    assert_eq!(
        decisions.last().unwrap().desired,
        1,
        "the count came back down"
    );
}

#[tokio::test(start_paused = true)]
async fn small_rise_does_not_panic() {
    let mut sim = Sim::new(settings(), 2);
    sim.run(60, 20.0);
    let d = sim.second(30.0, 30);
    assert!(!d.panicking, "{d:?}");
}

#[tokio::test(start_paused = true)]
async fn scale_down_rate_limits_each_step() {
    let mut sim = Sim::new(
        Settings {
            max_scale_down_rate: 2.0,
            stable_window: Duration::from_secs(6),
            ..settings()
        },
        16,
    );
    sim.run(6, 160.0);
    let steps = sim.run(30, 1.0);
    // 16 → 8 → 4 → 2 → 1: each step at most halves.
    let mut previous = 16;
    for n in steps {
        assert!(n >= previous / 2, "at most halved: {previous} → {n}");
        previous = n;
    }
    assert_eq!(previous, 1);
}

#[tokio::test(start_paused = true)]
async fn scale_up_rate_limits_each_step() {
    let mut sim = Sim::new(
        Settings {
            max_scale_up_rate: 2.0,
            ..settings()
        },
        1,
    );
    let first = sim.second(200.0, 200);
    assert_eq!(first.desired, 2, "at most doubled");
}

#[tokio::test(start_paused = true)]
async fn scale_down_delay_keeps_the_highest_recent_recommendation() {
    let mut sim = Sim::new(
        Settings {
            scale_down_delay: Duration::from_secs(30),
            stable_window: Duration::from_secs(6),
            ..settings()
        },
        1,
    );
    sim.run(10, 50.0);
    let held = sim.run(25, 10.0);
    assert!(
        held.iter().all(|&n| n == 5),
        "held at 5 during the delay: {held:?}"
    );
    // Down in steps (each at most halving), each step held for the delay.
    let later = sim.run(65, 10.0);
    assert_eq!(*later.last().unwrap(), 1, "down after the delay");
}

#[tokio::test(start_paused = true)]
async fn never_to_zero_while_anything_is_in_flight_or_held() {
    let mut sim = Sim::new(
        Settings {
            idle_timeout: Duration::from_secs(1),
            ..settings()
        },
        1,
    );
    // Tiny signal, but a request held right now.
    let d = sim.second(0.0, 1);
    assert_eq!(d.desired, 1);
    // Long-running request: signal present, demand present, way past the idle timeout.
    for _ in 0..100 {
        assert_eq!(sim.second(1.0, 1).desired, 1);
    }
}

#[tokio::test(start_paused = true)]
async fn to_zero_only_after_the_idle_timeout() {
    let mut sim = Sim::new(
        Settings {
            idle_timeout: Duration::from_secs(30),
            ..settings()
        },
        1,
    );
    sim.run(5, 1.0);
    let quiet = sim.run(29, 0.0);
    assert!(
        quiet.iter().all(|&n| n == 1),
        "up while not idle: {quiet:?}"
    );
    assert_eq!(
        sim.second(0.0, 0).desired,
        0,
        "zero once idle for the timeout"
    );
    assert_eq!(
        sim.second(0.0, 0).desired,
        0,
        "and stays asleep without demand"
    );
}

#[tokio::test(start_paused = true)]
async fn min_keeps_instances_through_idleness() {
    let mut sim = Sim::new(
        Settings {
            min: 1,
            idle_timeout: Duration::from_secs(1),
            ..settings()
        },
        1,
    );
    assert!(sim.run(10, 0.0).iter().all(|&n| n == 1));
}

#[tokio::test(start_paused = true)]
async fn demand_on_a_sleeping_target_asks_for_one() {
    let mut sim = Sim::new(settings(), 0);
    assert_eq!(sim.second(0.0, 0).desired, 0, "no demand, stays at zero");
    assert_eq!(sim.second(0.0, 3).desired, 1, "held requests wake it");
}

#[test]
fn window_average_covers_only_its_span() {
    let start = Instant::now();
    let mut w = Window::default();
    for (i, v) in [10.0, 20.0, 30.0].into_iter().enumerate() {
        w.push(
            Sample {
                at: start + Duration::from_secs(i as u64 + 1),
                concurrency: v,
                rps: 0.0,
            },
            Duration::from_secs(60),
        );
    }
    let now = start + Duration::from_secs(3);
    assert_eq!(
        w.average(Metric::Concurrency, Duration::from_secs(60), now),
        20.0
    );
    assert_eq!(
        w.average(Metric::Concurrency, Duration::from_secs(2), now),
        25.0
    );
    assert_eq!(w.average(Metric::Rps, Duration::from_secs(2), now), 0.0);
}

/// A target scaling on a Prometheus query: each second the query's value is the sample and,
/// above zero, demand (as `prometheus::signal` makes them); threshold and windows as a user
/// would set them.
fn on_a_query(current: u32) -> Sim {
    let scaling = crate::config::Scaling {
        max: 5,
        stable_window: Duration::from_secs(2),
        panic_window: Duration::from_secs(1),
        scale_down_delay: Duration::ZERO,
        source: Some(crate::config::PrometheusSource {
            url: "http://prometheus:9090".into(),
            query: None,
            every: Duration::from_secs(1),
        }),
        ..Default::default()
    };
    let settings = Settings::new(&scaling, Duration::from_secs(3));
    assert_eq!(settings.target, 100.0, "the documented default threshold");
    Sim::new(settings, current)
}

fn query_value(sim: &mut Sim, value: f64) -> u32 {
    sim.second(value, u64::from(value > 0.0)).desired
}

#[tokio::test(start_paused = true)]
async fn a_query_value_asks_for_ceil_of_value_over_threshold_within_min_and_max() {
    let mut sim = on_a_query(1);
    for _ in 0..3 {
        query_value(&mut sim, 250.0);
    }
    assert_eq!(sim.current, 3, "ceil(250 / 100)");
    for _ in 0..3 {
        query_value(&mut sim, 10_000.0);
    }
    assert_eq!(sim.current, 5, "bounded by max");
}

#[tokio::test(start_paused = true)]
async fn a_query_value_above_zero_wakes_a_target_at_zero() {
    let mut sim = on_a_query(0);
    assert_eq!(query_value(&mut sim, 0.0), 0);
    assert_eq!(query_value(&mut sim, 0.2), 1);
}

#[tokio::test(start_paused = true)]
async fn a_query_value_of_zero_scales_to_zero_after_the_idle_timeout() {
    let mut sim = on_a_query(1);
    query_value(&mut sim, 50.0);
    let mut seconds = 0;
    while query_value(&mut sim, 0.0) > 0 {
        seconds += 1;
        assert!(seconds < 10, "never went to zero");
    }
    assert!(seconds >= 2, "not before the idle timeout: {seconds}s");
}

#[test]
fn a_concurrency_target_is_at_most_the_instance_concurrency() {
    use crate::config::{Scaling, Serving};
    let limited = Serving {
        instance_concurrency: 4,
        ..Serving::default()
    };
    let scaling = Scaling::default();
    assert_eq!(
        Settings::serving(&scaling, &limited).target,
        4.0,
        "10 capped"
    );
    assert_eq!(
        Settings::serving(&scaling, &Serving::default()).target,
        10.0
    );
    let low = Scaling {
        target: Some(2.0),
        ..Scaling::default()
    };
    assert_eq!(
        Settings::serving(&low, &limited).target,
        2.0,
        "below the limit"
    );
    let rps = Scaling {
        metric: Metric::Rps,
        ..Scaling::default()
    };
    assert_eq!(
        Settings::serving(&rps, &limited).target,
        50.0,
        "rps is no concurrency"
    );
    // Eleven requests, four per instance at once: three instances.
    assert_eq!(Settings::serving(&scaling, &limited).instances_for(11.0), 3);
}
