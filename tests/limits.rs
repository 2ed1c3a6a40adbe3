//! `[limits]` as a client meets them, on HTTP/1.1 and HTTP/2: connections that send their
//! head too slowly or stay idle are cut, heads beyond the size bound are refused, HTTP/2
//! streams and resets are bounded, and a worker with `max_connections` open stops accepting.
//! Short timeouts keep each test within a few seconds.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use wakegate_test_support::h2_raw::*;
use wakegate_test_support::*;

/// wakegate with `limits` (the body of a `[limits]` table) in front of a recording upstream
/// routed as `app.localhost`; `listen` adds to `[listen]`.
async fn start(listen: &str, limits: &str) -> (Wakegate, RecordingUpstream) {
    let upstream = RecordingUpstream::start().await;
    let target = format!(
        "[[target]]\nname = \"app\"\nhosts = [\"app.localhost\"]\nupstream = \"{}\"\n",
        upstream.addr
    );
    let head = format!("[listen]\n{listen}\n[limits]\n{limits}\n");
    (Wakegate::start(&head, &target).await, upstream)
}

/// Reads until the server closes the connection; how long that took.
async fn closed_after(stream: &mut TcpStream, began: Instant) -> Duration {
    within(5, "the connection closed", async {
        let mut buf = [0u8; 4096];
        // A reset counts as closed too.
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    began.elapsed()
}

async fn timeouts(wg: &Wakegate, kind: &str) -> f64 {
    let metrics = wg.metrics().await;
    metric(
        &metrics,
        "wakegate_client_connection_timeouts_total",
        &format!("reason=\"{kind}\""),
    )
    .unwrap_or_else(|| panic!("timeouts of kind {kind} exported: {metrics}"))
}

/// Polls the metrics until `check` holds on them, or fails after a few seconds.
async fn wait_metrics(wg: &Wakegate, what: &str, check: impl Fn(&str) -> bool) {
    wg.wait_for_metrics(what, Duration::from_secs(3), check)
        .await;
}

async fn wait_timeouts(wg: &Wakegate, kind: &str, count: f64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = timeouts(wg, kind).await;
        if now == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{kind} timeouts: {now}, expected {count}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_http1_head_not_sent_within_the_header_read_timeout_is_cut() {
    let (wg, upstream) = start("", "header_read_timeout = \"500ms\"").await;
    let mut stream = TcpStream::connect(wg.proxy).await.unwrap();
    let began = Instant::now();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: app.loc")
        .await
        .unwrap();
    let took = closed_after(&mut stream, began).await;
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "cut after {took:?}"
    );
    wait_timeouts(&wg, "header", 1.0).await;
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn an_http2_client_that_sends_the_preface_then_nothing_is_cut() {
    let (wg, _upstream) = start("", "header_read_timeout = \"500ms\"").await;
    let mut stream = TcpStream::connect(wg.proxy).await.unwrap();
    let began = Instant::now();
    stream.write_all(PREFACE).await.unwrap();
    stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    let took = closed_after(&mut stream, began).await;
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "cut after {took:?}"
    );
    wait_timeouts(&wg, "header", 1.0).await;
}

#[tokio::test]
async fn an_http2_client_that_sends_its_headers_a_byte_at_a_time_is_cut() {
    let (wg, upstream) = start("", "header_read_timeout = \"500ms\"").await;
    let stream = TcpStream::connect(wg.proxy).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let began = Instant::now();
    let request = h2_request(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "app.localhost"),
        (":path", "/slow"),
        ("x-padding", &"p".repeat(60)),
    ]);
    // The preface and SETTINGS at once, then the HEADERS frame a byte every 50 ms: it would
    // take about 5 s to arrive whole.
    let (at_once, slowly) = request.split_at(PREFACE.len() + 9);
    writer.write_all(at_once).await.unwrap();
    let slowly = slowly.to_vec();
    let trickle = tokio::spawn(async move {
        for byte in slowly {
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let took = within(5, "the connection closed", async {
        let mut buf = [0u8; 4096];
        while matches!(reader.read(&mut buf).await, Ok(n) if n > 0) {}
        began.elapsed()
    })
    .await;
    trickle.abort();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "cut after {took:?}"
    );
    wait_timeouts(&wg, "header", 1.0).await;
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn an_idle_http2_connection_gets_goaway_after_the_idle_timeout() {
    let (wg, _upstream) = start("", "idle_timeout = \"500ms\"").await;
    let mut stream = TcpStream::connect(wg.proxy).await.unwrap();
    stream
        .write_all(&h2_request(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "app.localhost"),
            (":path", "/"),
        ]))
        .await
        .unwrap();
    let (kind, _) = h2_first_of(&mut stream, &[HEADERS, RST_STREAM, GOAWAY]).await;
    assert_eq!(kind, HEADERS, "answered");
    let answered = Instant::now();
    let goaway = within(5, "GOAWAY", async {
        loop {
            match read_frame(&mut stream).await {
                Some(frame) if frame.kind == GOAWAY => return frame,
                Some(_) => {}
                None => panic!("closed without GOAWAY"),
            }
        }
    })
    .await;
    let took = answered.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(2),
        "GOAWAY after {took:?}"
    );
    assert_eq!(error_code(GOAWAY, &goaway.payload), 0, "NO_ERROR");
    closed_after(&mut stream, answered).await;
    wait_timeouts(&wg, "idle", 1.0).await;
}

#[tokio::test]
async fn an_idle_http1_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let (wg, _upstream) = start("", "idle_timeout = \"500ms\"").await;
    let mut stream = TcpStream::connect(wg.proxy).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = within(5, "the answer", stream.read(&mut buf))
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let answered = Instant::now();
    let took = closed_after(&mut stream, answered).await;
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(2),
        "closed after {took:?}"
    );
    wait_timeouts(&wg, "idle", 1.0).await;
}

#[tokio::test]
async fn http2_settings_advertise_the_stream_and_header_list_bounds_and_oversized_headers_go_nowhere()
 {
    let (wg, upstream) = start("", "max_concurrent_streams = 7\nmax_header_bytes = 8192").await;
    let mut stream = TcpStream::connect(wg.proxy).await.unwrap();
    let big = "b".repeat(9000);
    stream
        .write_all(&h2_request(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "app.localhost"),
            (":path", "/big"),
            ("x-big", &big),
        ]))
        .await
        .unwrap();
    let settings = within(5, "the server's SETTINGS", async {
        loop {
            let frame = read_frame(&mut stream).await.expect("SETTINGS");
            if frame.kind == SETTINGS && frame.flags & 0x1 == 0 {
                return frame.payload;
            }
        }
    })
    .await;
    let values: Vec<(u16, u32)> = settings
        .chunks(6)
        .map(|s| {
            (
                u16::from_be_bytes([s[0], s[1]]),
                u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
            )
        })
        .collect();
    assert!(
        values.contains(&(0x3, 7)),
        "MAX_CONCURRENT_STREAMS: {values:?}"
    );
    assert!(
        values.contains(&(0x6, 8192)),
        "MAX_HEADER_LIST_SIZE: {values:?}"
    );
    // h2 answers a header list beyond it itself (431) or resets the stream.
    let (kind, _) = h2_first_of(&mut stream, &[HEADERS, RST_STREAM, GOAWAY]).await;
    assert!(kind == HEADERS || kind == RST_STREAM, "{kind}");
    assert!(upstream.received().is_empty(), "{:?}", upstream.uris());
}

#[tokio::test]
async fn rapid_reset_beyond_the_bound_ends_the_connection_with_enhance_your_calm() {
    let (wg, _upstream) = start("", "max_pending_reset_streams = 5").await;
    let mut stream = TcpStream::connect(wg.proxy).await.unwrap();
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    let block = header_block(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "app.localhost"),
        (":path", "/"),
    ]);
    // CVE-2023-44487: open a stream and cancel it at once, over and over, in one write.
    for i in 0..100u32 {
        let id = 2 * i + 1;
        bytes.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &block));
        bytes.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    stream.write_all(&bytes).await.unwrap();
    let goaway = within(5, "GOAWAY", async {
        loop {
            match read_frame(&mut stream).await {
                Some(frame) if frame.kind == GOAWAY => return frame,
                Some(_) => {}
                None => panic!("closed without GOAWAY"),
            }
        }
    })
    .await;
    assert_eq!(
        error_code(GOAWAY, &goaway.payload),
        0xb,
        "ENHANCE_YOUR_CALM"
    );
    drop(wg);
}

#[tokio::test]
async fn a_continuation_flood_ends_the_connection_with_enhance_your_calm() {
    let (wg, upstream) = start("", "").await;
    let mut stream = TcpStream::connect(wg.proxy).await.unwrap();
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    let block = header_block(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "app.localhost"),
        (":path", "/flood"),
        ("x-flood", &"f".repeat(200)),
    ]);
    // A header block that never ends: one byte per CONTINUATION frame (CVE-2024-27316 and
    // kin), far more frames than a block within max_header_bytes needs.
    const CONTINUATION: u8 = 0x9;
    bytes.extend(frame(HEADERS, END_STREAM, 1, &block[..1]));
    for byte in &block[1..] {
        bytes.extend(frame(CONTINUATION, 0, 1, &[*byte]));
    }
    // The connection may be gone before all of it is written.
    let _ = stream.write_all(&bytes).await;
    let goaway = within(5, "GOAWAY", async {
        loop {
            match read_frame(&mut stream).await {
                Some(frame) if frame.kind == GOAWAY => return frame,
                Some(_) => {}
                None => panic!("closed without GOAWAY"),
            }
        }
    })
    .await;
    assert_eq!(
        error_code(GOAWAY, &goaway.payload),
        0xb,
        "ENHANCE_YOUR_CALM"
    );
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn a_worker_with_max_connections_open_stops_accepting_until_one_closes() {
    let (wg, _upstream) = start("workers = 1", "max_connections = 2").await;
    let request = b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n";
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(wg.proxy).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = within(5, "an answer", stream.read(&mut buf)).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        open.push(stream);
    }
    wait_metrics(&wg, "two connections open", |m| {
        metric(m, "wakegate_client_connections", "") == Some(2.0)
    })
    .await;

    // The third connects (the kernel queues it) but is not served while two are open.
    let mut third = TcpStream::connect(wg.proxy).await.unwrap();
    third.write_all(request).await.unwrap();
    wait_metrics(&wg, "the limit reached", |m| {
        metric(m, "wakegate_client_connections_limited_total", "") == Some(1.0)
    })
    .await;
    let mut buf = [0u8; 1024];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buf)).await;
    assert!(early.is_err(), "answered beyond the limit");

    drop(open.pop());
    let n = within(5, "the answer once one closed", third.read(&mut buf))
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_reload_applies_new_limits_to_connections_accepted_after_it() {
    let (wg, upstream) = start("", "max_header_bytes = 65536").await;
    let header = format!("X-Big: {}\r\n", "v".repeat(20_000));
    let request =
        format!("GET / HTTP/1.1\r\nHost: app.localhost\r\n{header}Connection: close\r\n\r\n");
    assert_eq!(raw_status(&raw_exchange(wg.proxy, &request).await), 200);

    let target = format!(
        "[[target]]\nname = \"app\"\nhosts = [\"app.localhost\"]\nupstream = \"{}\"\n",
        upstream.addr
    );
    wg.rewrite_config("[limits]\nmax_header_bytes = 16384\n", &target);
    wg.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = raw_status(&raw_exchange(wg.proxy, &request).await);
        if status == 431 {
            break;
        }
        assert_eq!(status, 200);
        assert!(Instant::now() < deadline, "the new limit never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_cut_at_the_header_read_timeout() {
    let (wg, _upstream) = start("", "header_read_timeout = \"500ms\"").await;
    let mut stream = TcpStream::connect(wg.proxy).await.unwrap();
    let began = Instant::now();
    let took = closed_after(&mut stream, began).await;
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "cut after {took:?}"
    );
    wait_timeouts(&wg, "header", 1.0).await;
}

#[tokio::test]
async fn connections_stay_evenly_spread_over_the_workers_whatever_the_kernel_s_hash_does() {
    let (wg, _upstream) = start("workers = 2", "").await;
    let request = b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n";
    let mut open = Vec::new();
    // One at a time, each answered before the next connects: a connection is counted in its
    // worker before it is served, so every accept sees the counts of the ones before it, and
    // the split stays within one after each (left to the kernel's hash, the difference wanders
    // as a coin-toss walk: beyond one within a few connections).
    for n in 1..=40 {
        let mut stream = TcpStream::connect(wg.proxy).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut buf = [0u8; 1024];
        let read = within(5, "an answer", stream.read(&mut buf)).await.unwrap();
        let answer = String::from_utf8_lossy(&buf[..read]);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        open.push(stream);
        assert_evenly_spread(&wg.metrics().await, 2, n);
    }
    let metrics = wg.metrics().await;
    assert!(
        metric(&metrics, "wakegate_client_connections_handed_total", "").is_some(),
        "{metrics}"
    );

    // A handed connection keeps being served by the worker it was handed to.
    for stream in &mut open {
        stream.write_all(request).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = within(5, "an answer", stream.read(&mut buf)).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }
}
