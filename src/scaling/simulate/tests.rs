//! Property tests of the policy on the shipped traces (`examples/traces/`).

use super::*;
use crate::config::Scaling;

fn trace(name: &str) -> Vec<Load> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/traces/{name}.csv"));
    read_trace(&path, Duration::from_millis(100)).expect("shipped trace parses")
}

fn settings(idle_timeout: Duration) -> Settings {
    Settings::new(&Scaling::default(), idle_timeout)
}

const MODEL: Model = Model {
    startup: Duration::from_secs(2),
    capacity: None,
};

fn run(name: &str) -> (Vec<Load>, Vec<Row>) {
    let loads = trace(name);
    let rows = simulate(&loads, &settings(Duration::from_secs(300)), &MODEL);
    (loads, rows)
}

/// Maximal runs of seconds with the same load, as index ranges.
fn steps(loads: &[Load]) -> Vec<std::ops::Range<usize>> {
    let mut steps = Vec::new();
    let mut start = 0;
    for i in 1..=loads.len() {
        if i == loads.len() || loads[i] != loads[start] {
            steps.push(start..i);
            start = i;
        }
    }
    steps
}

fn ideal(load: &Load, target: f64) -> i64 {
    (load.concurrency() / target).ceil() as i64
}

#[test]
fn no_flapping_within_any_load_step() {
    for name in ["step-up", "step-down", "spike", "sparse"] {
        let (loads, rows) = run(name);
        for step in steps(&loads) {
            let changes = direction_changes(&rows[step.clone()]);
            assert!(
                changes <= 1,
                "{name}: {changes} direction changes in seconds {step:?}"
            );
        }
    }
}

#[test]
fn smooth_load_causes_no_more_turns_than_the_load_itself() {
    // The ramp only rises; the diurnal curve turns three times (peak, trough, peak). One
    // more turn is allowed for the cold start's backlog.
    for (name, load_turns) in [("ramp", 0), ("diurnal", 3)] {
        let (_, rows) = run(name);
        let changes = direction_changes(&rows);
        assert!(
            changes <= load_turns + 1,
            "{name}: {changes} direction changes"
        );
    }
}

#[test]
fn reacts_within_two_seconds_of_a_step_in_panic() {
    for (name, at) in [("step-up", 120), ("spike", 120)] {
        let (_, rows) = run(name);
        let before = rows[at - 1].desired;
        let reacted = rows[at..at + 2]
            .iter()
            .any(|r| r.desired > before && r.panicking);
        assert!(reacted, "{name}: {:?}", &rows[at - 1..at + 3]);
    }
}

#[test]
fn sparse_traffic_never_scales_to_zero_with_an_idle_timeout_above_a_minute() {
    let loads = trace("sparse");
    for idle in [61, 120, 300] {
        let rows = simulate(&loads, &settings(Duration::from_secs(idle)), &MODEL);
        assert!(
            rows.iter().skip(1).all(|r| r.desired >= 1),
            "idle timeout {idle}s: scaled to zero at {:?}",
            rows.iter().find(|r| r.second > 0 && r.desired == 0)
        );
    }
}

#[test]
fn sparse_traffic_does_scale_to_zero_with_a_shorter_idle_timeout() {
    let rows = simulate(&trace("sparse"), &settings(Duration::from_secs(30)), &MODEL);
    assert!(rows.iter().any(|r| r.desired == 0 && r.second > 0));
    assert!(
        rows.iter().all(|r| r.queued == 0 || r.desired >= 1),
        "a held request always has an instance coming"
    );
}

#[test]
fn settles_within_one_of_ceil_load_over_target_after_the_stable_window() {
    let target = settings(Duration::from_secs(300)).target;
    for name in ["step-up", "step-down", "spike"] {
        let (loads, rows) = run(name);
        for step in steps(&loads).into_iter().filter(|s| s.len() >= 120) {
            let last = step.end - 1;
            let want = ideal(&loads[last], target);
            let got = i64::from(rows[last].desired);
            assert!(
                (got - want).abs() <= 1,
                "{name} at {last}s: desired {got}, ideal {want}"
            );
        }
    }
    for name in ["ramp", "diurnal"] {
        let (loads, rows) = run(name);
        for (load, row) in loads.iter().zip(&rows).skip(90) {
            let want = ideal(load, target);
            let got = i64::from(row.desired);
            assert!(
                (got - want).abs() <= 1,
                "{name} at {}s: desired {got}, ideal {want}",
                row.second
            );
        }
    }
}

#[test]
fn counter_traces_are_turned_into_arrivals() {
    let loads = parse_trace(
        "second,http_requests_total\n0,100\n1,110\n2,130\n",
        Duration::from_millis(50),
    )
    .unwrap();
    let arrivals: Vec<f64> = loads.iter().map(|l| l.arrivals).collect();
    assert_eq!(arrivals, vec![0.0, 10.0, 20.0]);
    assert_eq!(loads[1].service, Duration::from_millis(50));
}

#[test]
fn bad_trace_lines_name_the_line_and_the_expected_form() {
    let error = parse_trace(
        "second,arrivals,service_ms\n0,5,100\n1,lots,100\n",
        Duration::ZERO,
    )
    .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("line 3") && text.contains("lots") && text.contains("expected"),
        "{text}"
    );
    let error = parse_trace("when,what\n", Duration::ZERO).unwrap_err();
    assert!(error.to_string().contains("header"), "{error}");
}

#[test]
fn every_request_is_eventually_served() {
    for name in ["step-up", "step-down", "spike", "ramp", "diurnal", "sparse"] {
        let (_, rows) = run(name);
        let last = rows.last().unwrap();
        assert_eq!(last.queued, 0, "{name}: requests still held at the end");
        assert!(
            rows.iter().all(|r| r.queued == 0 || r.desired > 0),
            "{name}: held with nothing coming"
        );
    }
}

#[test]
fn seconds_are_read_as_written_gaps_intervals_and_order() {
    // A missing second had no arrivals.
    let loads = parse_trace(
        "second,arrivals,service_ms\n0,5,100\n3,7,100\n",
        Duration::ZERO,
    )
    .unwrap();
    let arrivals: Vec<f64> = loads.iter().map(|l| l.arrivals).collect();
    assert_eq!(arrivals, vec![5.0, 0.0, 0.0, 7.0]);

    // A counter scraped every minute: each increase spread over its minute.
    let loads = parse_trace(
        "second,http_requests_total\n0,0\n60,600\n120,1800\n",
        Duration::from_millis(50),
    )
    .unwrap();
    assert_eq!(loads.len(), 121);
    assert_eq!(loads[0].arrivals, 0.0);
    assert!(loads[1..=60].iter().all(|l| l.arrivals == 10.0));
    assert!(loads[61..].iter().all(|l| l.arrivals == 20.0));

    // Out of order or twice: refused with the line.
    for (text, line) in [
        (
            "second,arrivals,service_ms\n0,1,10\n2,1,10\n1,1,10\n",
            "line 4",
        ),
        ("second,arrivals,service_ms\n0,1,10\n0,1,10\n", "line 3"),
        (
            "second,http_requests_total\n0,1\n# a comment\n-1,2\n",
            "line 4",
        ),
        ("second,arrivals,service_ms\n0.5,1,10\n", "line 2"),
    ] {
        let error = parse_trace(text, Duration::ZERO).unwrap_err().to_string();
        assert!(
            error.contains(line) && error.contains("`second`"),
            "{text:?}: {error}"
        );
    }
}

#[test]
fn a_capacity_per_instance_makes_requests_queue_and_max_caps_what_is_wanted() {
    // 200 requests a second of 100 ms each: 20 in flight, which calls for 2 instances at the
    // default target of 10 each, and more once requests queue. With max 2 and 5 requests per
    // instance at once, 10 are served at a time: the rest queue, and max caps the count.
    let mut settings = settings(Duration::from_secs(300));
    settings.max = 2;
    let loads = vec![
        Load {
            arrivals: 200.0,
            service: Duration::from_millis(100),
        };
        30
    ];
    let unlimited = simulate(&loads, &settings, &MODEL);
    assert!(
        unlimited[5..].iter().all(|r| r.queued == 0),
        "no capacity: nothing queues"
    );
    let limited = simulate(
        &loads,
        &settings,
        &Model {
            capacity: Some(5),
            ..MODEL
        },
    );
    assert!(limited[10..].iter().all(|r| r.ready == 2));
    assert!(
        limited[10..].iter().all(|r| r.queued > 0),
        "10 served at once, 20 arriving: {:?}",
        limited.iter().map(|r| r.queued).collect::<Vec<_>>()
    );
    assert!(
        limited[10..].iter().all(|r| r.wanted > settings.max),
        "max capped the demand"
    );
    assert!(unlimited[10..].iter().all(|r| r.wanted > 2));
}
