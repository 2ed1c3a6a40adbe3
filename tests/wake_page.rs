//! The "waking up" page browsers get for a cold target with `wake_page = true`.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use wakegate_test_support::*;

#[tokio::test]
async fn browsers_get_a_self_refreshing_page_while_other_clients_wait() {
    let targets = format!(
        r#"
[[target]]
name = "app"
hosts = ["app.localhost"]
command = {}
wake_page = true
"#,
        demo_command("500ms")
    );
    let wg = Wakegate::start("", &targets).await;
    let browser = || {
        Request::get("/")
            .header(http::header::ACCEPT, "text/html,application/xhtml+xml")
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let page = wg.send(wg.proxy, "app.localhost", browser()).await;
    assert_eq!(page.status, 503);
    assert_eq!(page.headers["retry-after"], "2");
    assert!(
        page.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(
        page.body.contains("http-equiv=\"refresh\"") && page.body.contains("Waking up app"),
        "{}",
        page.body
    );

    // The page asked for the wake: the target becomes ready without any client waiting.
    wg.wait_for_target("app", Duration::from_secs(10), |t| t["state"] == "ready")
        .await;
    let page = wg.send(wg.proxy, "app.localhost", browser()).await;
    assert_eq!(page.status, 200, "the refresh lands on the app");
    assert!(page.body.starts_with("hello from demo-backend"));

    // A non-browser client of a cold target waits instead (covered in cold_start.rs); here,
    // warm, it is simply served.
    let api = wg.get("app.localhost", "/").await;
    assert_eq!(api.status, 200);
}
