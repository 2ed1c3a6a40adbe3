use std::time::Duration;

use super::*;
use crate::scaling::policy::{Decision, Now, Policy, Settings, Window};

fn ok(body: &str) -> Result<f64, QueryError> {
    parse_answer(StatusCode::OK, body.as_bytes())
}

#[test]
fn a_vector_answer_gives_its_value() {
    let body = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000.123,"123.4"]}]}}"#;
    assert_eq!(ok(body).unwrap(), 123.4);
}

#[test]
fn several_series_are_summed() {
    let body = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"a":"1"},"value":[1,"1.5"]},{"metric":{"a":"2"},"value":[1,"2"]}]}}"#;
    assert_eq!(ok(body).unwrap(), 3.5);
}

#[test]
fn a_scalar_answer_gives_its_value() {
    let body = r#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"42"]}}"#;
    assert_eq!(ok(body).unwrap(), 42.0);
}

#[test]
fn an_empty_vector_is_no_value() {
    let body = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
    let e = ok(body).unwrap_err();
    assert_eq!(e.reason(), QueryFailure::Empty);
}

#[test]
fn nan_and_infinities_are_no_value() {
    for v in ["NaN", "+Inf", "-Inf"] {
        let body = format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"value":[1,"{v}"]}}]}}}}"#
        );
        let e = ok(&body).unwrap_err();
        assert_eq!(e.reason(), QueryFailure::NotFinite, "{v}");
    }
}

#[test]
fn an_error_answer_says_what_prometheus_said() {
    let body = r#"{"status":"error","errorType":"bad_data","error":"parse error at char 5"}"#;
    let e = parse_answer(StatusCode::BAD_REQUEST, body.as_bytes()).unwrap_err();
    assert_eq!(e.reason(), QueryFailure::QueryError);
    assert_eq!(
        e.to_string(),
        "Prometheus refused the query (bad_data): parse error at char 5"
    );
}

#[test]
fn an_http_error_without_json_is_an_http_status_failure() {
    let e = parse_answer(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>").unwrap_err();
    assert_eq!(e.reason(), QueryFailure::HttpStatus);
}

#[test]
fn nonsense_is_a_bad_response() {
    for body in [
        "not json",
        r#"{"data":{}}"#,
        r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#,
        r#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,2]}]}}"#,
        r#"{"status":"success","data":{"resultType":"scalar","result":[1,"twelve"]}}"#,
    ] {
        assert_eq!(
            ok(body).unwrap_err().reason(),
            QueryFailure::BadResponse,
            "{body}"
        );
    }
}

#[test]
fn the_query_is_percent_encoded_after_the_base_url() {
    let uri = query_uri(
        "http://prometheus:9090/prom/",
        r#"sum(rate(http_requests_total{service="web"}[2m]))"#,
    )
    .unwrap();
    assert_eq!(
        uri.to_string(),
        "http://prometheus:9090/prom/api/v1/query?query=sum%28rate%28http_requests_total%7Bservice%3D%22web%22%7D%5B2m%5D%29%29"
    );
}

/// The autoscaler's rule on a paused clock: each second, a reading of the query, and the
/// decision (or `None` where the last decision stands).
struct Ticks {
    policy: Policy,
    window: Window,
    settings: Settings,
    now: Instant,
    current: u32,
    last_active: Option<Instant>,
}

impl Ticks {
    fn new(current: u32) -> Self {
        let mut scaling = crate::config::Scaling {
            min: 0,
            max: 5,
            stable_window: Duration::from_secs(2),
            panic_window: Duration::from_secs(1),
            scale_down_delay: Duration::ZERO,
            ..Default::default()
        };
        scaling.source = Some(PrometheusSource {
            url: "http://prometheus:9090".into(),
            query: None,
            every: Duration::from_secs(1),
        });
        let settings = Settings::new(&scaling, Duration::from_secs(3));
        assert_eq!(settings.target, 100.0, "the documented default threshold");
        Self {
            policy: Policy::default(),
            window: Window::default(),
            settings,
            now: Instant::now(),
            current,
            last_active: None,
        }
    }

    fn second(&mut self, reading: Reading) -> Option<Decision> {
        self.now += Duration::from_secs(1);
        let (sample, demand) = signal(reading, self.now)?;
        if demand > 0 {
            self.last_active = Some(self.now);
        }
        self.window.push(sample, self.settings.keep());
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
        Some(decision)
    }
}

#[tokio::test(start_paused = true)]
async fn desired_is_the_value_over_the_threshold_within_min_and_max() {
    let mut t = Ticks::new(1);
    for _ in 0..3 {
        t.second(Reading::Value(250.0));
    }
    assert_eq!(t.current, 3, "ceil(250 / 100)");
    for _ in 0..3 {
        t.second(Reading::Value(10_000.0));
    }
    assert_eq!(t.current, 5, "bounded by max");
}

#[tokio::test(start_paused = true)]
async fn a_value_above_zero_wakes_a_target_at_zero() {
    let mut t = Ticks::new(0);
    assert_eq!(t.second(Reading::Value(0.0)).unwrap().desired, 0);
    assert_eq!(t.second(Reading::Value(0.2)).unwrap().desired, 1);
}

#[tokio::test(start_paused = true)]
async fn missing_data_keeps_the_last_decision_and_never_reaches_zero() {
    let mut t = Ticks::new(1);
    for _ in 0..3 {
        t.second(Reading::Value(420.0));
    }
    assert_eq!(t.current, 5);
    // Far past the idle timeout and every window: no decision is taken without a value.
    for why in QueryFailure::ALL.into_iter().cycle().take(60) {
        assert_eq!(t.second(Reading::Failed(why)), None);
    }
    assert_eq!(t.second(Reading::Pending), None);
    assert_eq!(t.current, 5);
}

#[tokio::test(start_paused = true)]
async fn a_value_of_zero_scales_to_zero_after_the_idle_timeout() {
    let mut t = Ticks::new(1);
    t.second(Reading::Value(50.0));
    let mut seconds = 0;
    while t.second(Reading::Value(0.0)).unwrap().desired > 0 {
        seconds += 1;
        assert!(seconds < 10, "never went to zero");
    }
    assert!(seconds >= 2, "not before the idle timeout: {seconds}s");
}
