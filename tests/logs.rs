//! wakegate's own log as a log collector reads it: JSON lines with each key once (`target` is
//! the wakegate target), an instance's output without its terminal escape sequences, and
//! numbers in scaling lines rounded.

use std::time::Duration;

use wakegate_test_support::*;

#[tokio::test]
async fn json_lines_have_each_key_once_and_instance_output_has_no_escape_codes() {
    let bin = bin();
    let targets = format!(
        r#"
[[target]]
name = "colourful"
hosts = ["colourful.localhost"]
command = ["sh", "-c", "printf '\\033[1;31mred alert\\033[0m \\033]0;title\\007done\\n'; exec {bin} demo-backend --port {{port}}"]
ready = {{ http_get = "/healthz" }}
"#
    );
    let wg = Wakegate::start("", &targets).await;
    assert_eq!(wg.get("colourful.localhost", "/").await.status, 200);

    let lines = within(10, "the instance's output logged", async {
        loop {
            let logs = wg.logs();
            if logs.contains("red alert") {
                return logs;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for line in lines.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        // serde_json keeps the last of two equal keys: count them in the text.
        let keys = value.as_object().expect("an object").keys().count();
        let written = line.matches("\":").count();
        assert!(
            written == keys,
            "a key written twice ({written} keys written, {keys} distinct): {line}"
        );
        assert!(!line.contains("\\u001b"), "an escape code: {line}");
    }
    let output = lines
        .lines()
        .find(|l| l.contains("red alert"))
        .expect("the output line");
    let value: serde_json::Value = serde_json::from_str(output).unwrap();
    assert_eq!(value["message"], "red alert done");
    assert_eq!(value["target"], "colourful");
    assert_eq!(value["stream"], "stdout");
}

#[tokio::test]
async fn with_debug_logs_a_cold_request_shows_its_hold_wake_and_forward_spans() {
    let wg = Wakegate::start_with_env(
        "",
        &demo_target("hello", "hello.localhost", "100ms"),
        &[("RUST_LOG", "info,wakegate=debug")],
    )
    .await;
    let r = within(20, "cold request", wg.get("hello.localhost", "/")).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Each stage's lines carry its span, named, with the target's name.
    let in_span = |message: &'static str, span: &'static str| {
        move |line: &serde_json::Value| {
            line["message"] == message
                && line["span"]["name"] == span
                && line["span"]["target"] == "hello"
        }
    };
    let limit = Duration::from_secs(10);
    wg.wait_for_log(
        "held in a hold span",
        limit,
        in_span("held for a cold start", "hold"),
    )
    .await;
    wg.wait_for_log(
        "ready in a wake span",
        limit,
        in_span("instance ready", "wake"),
    )
    .await;
    let answered = wg
        .wait_for_log(
            "answered in a forward span",
            limit,
            in_span("upstream answered", "forward"),
        )
        .await;
    assert_eq!(answered["status"], 200, "{answered}");
    assert!(
        answered["span"]["upstream"]
            .as_str()
            .is_some_and(|u| u.starts_with("127.0.0.1:")),
        "{answered}"
    );
}
