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
