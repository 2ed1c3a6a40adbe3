use super::*;

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

#[tokio::test(start_paused = true)]
async fn a_value_is_the_sample_and_above_zero_it_is_demand() {
    let at = Instant::now();
    let (sample, demand) = signal(Reading::Value(250.0), at).unwrap();
    assert_eq!(
        (sample.concurrency, sample.rps, sample.at),
        (250.0, 250.0, at)
    );
    assert_eq!(demand, 1, "a value above zero wakes a target at zero");
    assert_eq!(signal(Reading::Value(0.0), at).unwrap().1, 0);
}

#[tokio::test(start_paused = true)]
async fn without_a_fresh_value_there_is_nothing_to_decide_from() {
    let at = Instant::now();
    assert_eq!(signal(Reading::Pending, at), None);
    for why in QueryFailure::ALL {
        assert_eq!(signal(Reading::Failed(why), at), None, "{why:?}");
    }
}
