//! Access logs: one line per request, with what a user reads them for, in JSON and logfmt, to
//! a file that logrotate may move away (reopened on SIGHUP).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use wakegate_test_support::{DemoBackend, Wakegate, demo_target, within};

/// A fresh path for a log file in the temp dir.
fn log_path(name: &str) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("wakegate-access-{name}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// Waits until the file at `path` has at least `n` lines, and returns them all.
async fn lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} has {} line(s), not {n}:\n{text}",
            path.display(),
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

fn post(body: &'static str) -> http::Request<Full<Bytes>> {
    http::Request::post("/echo?token=secret")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

#[tokio::test]
async fn each_request_gets_one_json_line_saying_who_answered_and_what_it_cost() {
    let path = log_path("json");
    let backend = DemoBackend::start().await;
    let targets = format!(
        r#"
[[target]]
name = "fixed"
hosts = ["fixed.localhost"]
upstream = "{}"
{}"#,
        backend.addr,
        demo_target("cold", "cold.localhost", "300ms"),
    );
    let wg = Wakegate::start(
        &format!("[access_log]\npath = {:?}\n", path.display().to_string()),
        &targets,
    )
    .await;

    let r = within(
        10,
        "POST",
        wg.send(wg.proxy, "fixed.localhost", post("twelve bytes")),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "twelve bytes");
    let line = json(&lines(&path, 1).await[0]);
    assert_eq!(line["target"], "fixed", "{line}");
    assert_eq!(line["method"], "POST", "{line}");
    assert_eq!(line["path"], "/echo", "no query unless asked for: {line}");
    assert_eq!(line["protocol"], "HTTP/1.1", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["by"], "upstream", "{line}");
    assert_eq!(line["upstream"], backend.addr.to_string(), "{line}");
    assert_eq!(line["bytes_in"], 12, "{line}");
    assert_eq!(line["bytes_out"], 12, "{line}");
    assert_eq!(line["client"], "127.0.0.1", "{line}");
    assert!(
        line["held_ms"].is_null(),
        "a warm request is not held: {line}"
    );
    assert!(
        line["duration_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{line}"
    );
    assert!(
        line["time"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.contains('T')),
        "RFC 3339: {line}"
    );

    // A cold start: held while the instance starts (300 ms at least).
    let r = within(20, "cold request", wg.get("cold.localhost", "/")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let line = json(&lines(&path, 2).await[1]);
    assert_eq!(line["target"], "cold", "{line}");
    assert_eq!(line["by"], "upstream", "{line}");
    let held = line["held_ms"].as_f64().expect("held_ms");
    assert!(held >= 300.0, "held through the 300 ms start: {line}");
    assert!(line["duration_ms"].as_f64().unwrap() >= held, "{line}");

    // wakegate's own answer: its request id, as the client got it.
    let r = within(10, "unrouted", wg.get("nowhere.localhost", "/x")).await;
    assert_eq!(r.status, 404);
    let line = json(&lines(&path, 3).await[2]);
    assert_eq!(line["status"], 404, "{line}");
    assert_eq!(line["by"], "wakegate", "{line}");
    assert!(line["target"].is_null(), "{line}");
    assert!(line["upstream"].is_null(), "{line}");
    assert_eq!(
        line["request_id"],
        r.headers["x-request-id"].to_str().unwrap(),
        "{line}"
    );
    assert_eq!(line["bytes_out"], r.body.len(), "{line}");
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn logfmt_lines_with_the_query_and_a_reopen_on_sighup_for_logrotate() {
    let path = log_path("logfmt");
    let rotated = path.with_extension("log.1");
    let _ = std::fs::remove_file(&rotated);
    let backend = DemoBackend::start().await;
    let targets = format!(
        "[[target]]\nname = \"fixed\"\nhosts = [\"fixed.localhost\"]\nupstream = \"{}\"\n",
        backend.addr
    );
    let wg = Wakegate::start(
        &format!(
            "[access_log]\npath = {:?}\nformat = \"logfmt\"\nquery = true\n",
            path.display().to_string()
        ),
        &targets,
    )
    .await;

    let r = within(
        10,
        "POST",
        wg.send(wg.proxy, "fixed.localhost", post("a b")),
    )
    .await;
    assert_eq!(r.status, 200);
    let line = lines(&path, 1).await.remove(0);
    for field in [
        "target=fixed",
        "method=POST",
        "path=\"/echo?token=secret\"",
        "protocol=HTTP/1.1",
        "status=200",
        "bytes_in=3",
        "bytes_out=3",
        "client=127.0.0.1",
        "by=upstream",
        &format!("upstream={}", backend.addr),
    ] {
        assert!(
            line.split(' ').any(|pair| pair == field),
            "{field} in {line}"
        );
    }

    // logrotate moves the file away, then signals: the next line goes to a new file.
    std::fs::rename(&path, &rotated).unwrap();
    wg.signal(libc::SIGHUP);
    wg.wait_for_log("configuration reloaded", Duration::from_secs(10), |l| {
        l["message"] == "configuration reloaded"
    })
    .await;
    let r = within(10, "GET", wg.get("fixed.localhost", "/after")).await;
    assert_eq!(r.status, 404, "the demo backend has no /after");
    let line = lines(&path, 1).await.remove(0);
    assert!(line.contains(" path=/after "), "{line}");
    assert!(line.contains(" status=404 "), "{line}");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert_eq!(
        old.lines().count(),
        1,
        "the old file keeps its line only: {old}"
    );
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&rotated);
}
