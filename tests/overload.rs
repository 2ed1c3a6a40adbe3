//! What held requests may take: per target by count and by bytes, across all targets by
//! `[limits]`, and the memory budget past which wakegate sheds new requests. Each limit
//! tripped is a 503 with `Retry-After`, a short reason and a `wakegate_rejected_requests_total`
//! reason; what was held before it is answered once the target is ready.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Version, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;
use wakegate_test_support::*;

/// A local target whose instance starts only once `gate` exists: requests stay held for as
/// long as a test needs, whatever the machine's speed.
fn gated_target(name: &str, gate: &Path, extra: &str) -> String {
    let bin = bin();
    let gate = gate.display();
    format!(
        r#"
[[target]]
name = "{name}"
hosts = ["{name}.localhost"]
command = ["sh", "-c", "while [ ! -e '{gate}' ]; do sleep 0.02; done; exec '{bin}' demo-backend --port \"$0\"", "{{port}}"]
cold_start_timeout = "60s"
{extra}
"#
    )
}

struct Gate {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Gate {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("open");
        Gate { _dir: dir, path }
    }

    fn open(&self) {
        std::fs::write(&self.path, b"").expect("open the gate");
    }
}

fn rejected(metrics: &str, service: &str, reason: &str) -> Option<f64> {
    metric(
        metrics,
        "wakegate_rejected_requests_total",
        &format!("service=\"{service}\",reason=\"{reason}\""),
    )
}

fn get_with(wg: &Arc<Wakegate>, host: &str, pad: usize) -> JoinHandle<Response> {
    let (wg, host) = (wg.clone(), host.to_owned());
    tokio::spawn(async move {
        let mut req = Request::get("/").body(Full::default()).unwrap();
        if pad > 0 {
            req.headers_mut()
                .insert("x-pad", "a".repeat(pad).parse().unwrap());
        }
        wg.send(wg.proxy, &host, req).await
    })
}

/// Waits until `service` holds `n` requests.
async fn wait_held(wg: &Wakegate, service: &str, n: usize) {
    let label = format!("service=\"{service}\"");
    wg.wait_for_metrics(
        &format!("{n} requests held for {service}"),
        Duration::from_secs(20),
        |m| metric(m, "wakegate_pending_requests", &label) == Some(n as f64),
    )
    .await;
}

/// Asserts a 503 shed at once: `Retry-After`, and a reason that says `says`.
fn assert_shed(r: &Response, says: &str) {
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.headers[header::RETRY_AFTER], "1");
    let reason = r.body.lines().next().unwrap_or_default();
    assert!(reason.contains(says), "{reason:?} should say {says:?}");
}

#[tokio::test]
async fn held_requests_are_bounded_by_the_bytes_they_pin_and_all_held_are_answered() {
    let gate = Gate::new();
    let wg = Arc::new(
        Wakegate::start(
            "",
            &gated_target("big", &gate.path, "max_pending_bytes = \"64KiB\""),
        )
        .await,
    );
    // Three heads of about 20 KiB fit in 64 KiB; a fourth does not.
    let held: Vec<_> = (0..3)
        .map(|_| get_with(&wg, "big.localhost", 20_000))
        .collect();
    wait_held(&wg, "big", 3).await;
    let metrics = wg.metrics().await;
    let pinned = metric(&metrics, "wakegate_pending_bytes", "service=\"big\"").unwrap();
    assert!((60_000.0..65_536.0).contains(&pinned), "{pinned}");
    assert_eq!(metric(&metrics, "wakegate_held_bytes", ""), Some(pinned));

    let r = within(
        5,
        "a fourth large request",
        get_with(&wg, "big.localhost", 20_000),
    )
    .await
    .unwrap();
    assert_shed(&r, "target big already holds 64 KiB of waiting requests");
    // The bound is in bytes: a small request still fits.
    let small = get_with(&wg, "big.localhost", 0);
    wait_held(&wg, "big", 4).await;

    gate.open();
    for request in held.into_iter().chain([small]) {
        let r = within(30, "a held request", request).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.headers["x-wakegate-cold-start"], "true");
    }
    let metrics = wg.metrics().await;
    assert_eq!(rejected(&metrics, "big", "queue_bytes"), Some(1.0));
    assert_eq!(
        metric(&metrics, "wakegate_pending_bytes", "service=\"big\""),
        Some(0.0)
    );
    assert_eq!(metric(&metrics, "wakegate_held_bytes", ""), Some(0.0));
}

#[tokio::test]
async fn an_http2_request_body_counts_what_its_client_may_send_while_it_is_held() {
    let gate = Gate::new();
    let wg = Wakegate::start(
        "",
        &gated_target("uploads", &gate.path, "max_pending_bytes = \"512KiB\""),
    )
    .await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let upload = |len: usize| {
        let request = Request::post(format!("http://{}/echo", wg.proxy))
            .header(header::HOST, "uploads.localhost")
            .body(Full::new(Bytes::from(vec![b'x'; len])))
            .unwrap();
        let client = client.clone();
        tokio::spawn(async move {
            let response = client.request(request).await.expect("h2c response");
            assert_eq!(response.version(), Version::HTTP_2);
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        })
    };
    let first = upload(300_000);
    wait_held(&wg, "uploads", 1).await;
    let pinned = metric(
        &wg.metrics().await,
        "wakegate_pending_bytes",
        "service=\"uploads\"",
    )
    .unwrap();
    assert!(pinned > 300_000.0 && pinned < 301_000.0, "{pinned}");

    let (status, body) = within(5, "a second upload", upload(300_000)).await.unwrap();
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(
        String::from_utf8_lossy(&body).starts_with("target uploads already holds 512 KiB"),
        "{}",
        String::from_utf8_lossy(&body)
    );

    gate.open();
    let (status, body) = within(30, "the held upload", first).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.len(), 300_000, "the whole body reached the instance");
    assert_eq!(
        rejected(&wg.metrics().await, "uploads", "queue_bytes"),
        Some(1.0)
    );
}

#[tokio::test]
async fn all_targets_together_hold_at_most_limits_max_held_requests() {
    let (gate_a, gate_b) = (Gate::new(), Gate::new());
    let targets = format!(
        "{}{}",
        gated_target("a", &gate_a.path, ""),
        gated_target("b", &gate_b.path, "")
    );
    let wg = Arc::new(Wakegate::start("[limits]\nmax_held_requests = 2\n", &targets).await);
    let on_a = get_with(&wg, "a.localhost", 0);
    wait_held(&wg, "a", 1).await;
    let on_b = get_with(&wg, "b.localhost", 0);
    wait_held(&wg, "b", 1).await;
    assert_eq!(
        metric(&wg.metrics().await, "wakegate_held_requests", ""),
        Some(2.0)
    );

    let r = within(5, "a third held request", get_with(&wg, "b.localhost", 0))
        .await
        .unwrap();
    assert_shed(&r, "wakegate already holds 2 waiting requests");
    assert_eq!(rejected(&wg.metrics().await, "b", "hold_limit"), Some(1.0));

    gate_a.open();
    gate_b.open();
    for request in [on_a, on_b] {
        let r = within(30, "a held request", request).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(
        metric(&wg.metrics().await, "wakegate_held_requests", ""),
        Some(0.0)
    );
}

#[tokio::test]
async fn over_its_memory_budget_wakegate_sheds_new_requests_until_a_reload_raises_it() {
    let backend = DemoBackend::start().await;
    let target = |_: ()| {
        format!(
            "[[target]]\nname = \"fixed\"\nhosts = [\"fixed.localhost\"]\nupstream = \"{}\"\n",
            backend.addr
        )
    };
    // Less than wakegate takes at rest.
    let wg = Wakegate::start("[limits]\nmemory_budget = \"4MiB\"\n", &target(())).await;
    let line = wg
        .wait_for_log("saying it is over budget", Duration::from_secs(10), |l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("over the memory budget"))
        })
        .await;
    assert_eq!(line["budget"], "4 MiB", "{line}");

    let r = within(5, "a request over budget", wg.get("fixed.localhost", "/")).await;
    assert_shed(&r, "wakegate is over its memory budget");
    let metrics = wg.metrics().await;
    assert_eq!(rejected(&metrics, "fixed", "memory_budget"), Some(1.0));
    assert_eq!(
        metric(&metrics, "wakegate_memory_budget_bytes", ""),
        Some(4.0 * 1024.0 * 1024.0)
    );
    let resident = metric(&metrics, "process_resident_memory_bytes", "").unwrap();
    assert!(resident > 4.0 * 1024.0 * 1024.0, "{resident}");

    wg.rewrite_config("[limits]\nmemory_budget = \"4GiB\"\n", &target(()));
    wg.signal(libc::SIGHUP);
    wg.wait_for_log("saying it is below budget", Duration::from_secs(10), |l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("below the memory budget again"))
    })
    .await;
    let r = within(5, "a request under budget", wg.get("fixed.localhost", "/")).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn a_held_request_whose_client_closes_its_connection_is_let_go() {
    use tokio::io::AsyncWriteExt;

    let gate = Gate::new();
    let wg = Wakegate::start("", &gated_target("gone", &gate.path, "")).await;
    // Two clients on raw connections: one keeps waiting, one gives up.
    let mut stays = tokio::net::TcpStream::connect(wg.proxy).await.unwrap();
    let mut leaves = tokio::net::TcpStream::connect(wg.proxy).await.unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: gone.localhost\r\n\r\n";
    stays.write_all(request).await.unwrap();
    leaves.write_all(request).await.unwrap();
    wait_held(&wg, "gone", 2).await;
    drop(leaves);
    // Its request no longer counts as held (nor as demand), the other's does.
    wait_held(&wg, "gone", 1).await;
    gate.open();
    let response = within(30, "the request that stayed", async {
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&raw).contains("\r\n\r\n") {
            let n = tokio::io::AsyncReadExt::read(&mut stays, &mut buf)
                .await
                .unwrap();
            assert!(n > 0, "closed before its answer");
            raw.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&raw).into_owned()
    })
    .await;
    assert_eq!(raw_status(&response), 200, "{response}");
    wait_held(&wg, "gone", 0).await;
}
