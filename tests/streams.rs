//! Long-lived streams (WebSocket, server-sent events, gRPC streams) keep a target awake while
//! they carry something, stop doing so once quiet for the target's `stream_idle_timeout`, and
//! are closed gracefully when the target scales to zero: what their clients see of it.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tonic::Code;
use tonic::transport::Endpoint;
use wakegate::demo::grpc::pb::EchoRequest;
use wakegate::demo::grpc::pb::echo_client::EchoClient;
use wakegate_test_support::*;

/// Autoscaler ticks often enough for second-long timeouts to be observed within 100ms.
const FAST_TICKS: &str = "[autoscaler]\ninterval = \"100ms\"";

/// A local demo target `name` on `name.localhost` that goes idle after 1s without requests,
/// and whose streams stop counting after 1s quiet.
fn target(name: &str, extra: &str) -> String {
    format!(
        "{}idle_timeout = \"1s\"\nstream_idle_timeout = \"1s\"\n{extra}\n",
        demo_target(name, &format!("{name}.localhost"), "0s")
    )
}

fn is_cold(t: &serde_json::Value) -> bool {
    t["state"] == "cold" && t["instances"] == 0
}

type WebSocket = tokio_tungstenite::WebSocketStream<TcpStream>;

/// A WebSocket to the demo backend's echo through wakegate, and the pid of the instance.
async fn open_websocket(wg: &Wakegate, host: &str) -> (WebSocket, i32) {
    let hello = within(20, "the first request", wg.get(host, "/")).await;
    assert_eq!(hello.status, 200, "{}", hello.body);
    let stream = TcpStream::connect(wg.proxy).await.unwrap();
    let (mut ws, _) = within(
        10,
        "the WebSocket handshake",
        tokio_tungstenite::client_async(format!("ws://{host}/ws"), stream),
    )
    .await
    .expect("WebSocket handshake through the proxy");
    echoes(&mut ws, [Message::text("hello")]).await;
    (ws, pid_in(&hello.body))
}

/// Reads until the close frame, and says what it carried.
async fn close_frame(ws: &mut WebSocket) -> (CloseCode, String) {
    loop {
        match within(20, "a close frame", ws.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (frame.code, frame.reason.to_string());
            }
            Some(Ok(Message::Close(None))) => panic!("a close frame without a code"),
            Some(Ok(_)) => continue,
            other => panic!("the connection ended without a close frame: {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_idle_websocket_does_not_keep_its_target_running_and_is_closed_with_going_away() {
    let wg = Wakegate::start(FAST_TICKS, &target("ws", "")).await;
    let (mut ws, pid) = open_websocket(&wg, "ws.localhost").await;
    let quiet_since = Instant::now();
    wg.wait_for_metrics(
        "the quiet WebSocket counted idle",
        Duration::from_secs(10),
        |m| metric(m, "wakegate_idle_streams", "service=\"ws\"") == Some(1.0),
    )
    .await;

    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!(code, CloseCode::Away, "1001, going away");
    assert!(reason.contains("scaling to zero"), "{reason}");
    let closed_after = quiet_since.elapsed();
    // Quiet 1s before it stops counting, then the idle timeout's 1s (less a tick).
    assert!(
        closed_after >= Duration::from_millis(1800),
        "closed only after the stream and idle timeouts, here after {closed_after:?}"
    );
    assert!(
        within(5, "the end of the connection", ws.next())
            .await
            .is_none_or(|end| end.is_err()),
        "nothing follows the close frame"
    );

    wg.wait_for_target("ws", Duration::from_secs(10), is_cold)
        .await;
    assert!(!process_alive(pid), "the instance (pid {pid}) stopped");
    let metrics = wg.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "wakegate_streams_closed_total",
            "reason=\"scaled_to_zero\""
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "wakegate_open_streams", "service=\"ws\""),
        Some(0.0)
    );
    assert_eq!(
        metric(&metrics, "wakegate_idle_streams", "service=\"ws\""),
        Some(0.0)
    );
}

#[tokio::test]
async fn a_websocket_that_keeps_sending_keeps_its_target_running() {
    let wg = Wakegate::start(FAST_TICKS, &target("chat", "")).await;
    let (mut ws, pid) = open_websocket(&wg, "chat.localhost").await;
    // Four times the stream and idle timeouts together, a message every 200ms.
    let until = Instant::now() + Duration::from_secs(8);
    let mut sent = 0;
    while Instant::now() < until {
        echoes(&mut ws, [Message::text(format!("message {sent}"))]).await;
        sent += 1;
        let t = wg.target("chat").await;
        assert_eq!(t["state"], "ready", "after {sent} messages: {t}");
        assert_eq!(t["idle_streams"], 0, "after {sent} messages: {t}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(process_alive(pid), "the same instance (pid {pid}) serves");
    assert_eq!(
        metric(
            &wg.metrics().await,
            "wakegate_open_streams",
            "service=\"chat\""
        ),
        Some(1.0)
    );

    // Quiet from now on: it no longer keeps the target up.
    let (code, _) = close_frame(&mut ws).await;
    assert_eq!(code, CloseCode::Away);
    wg.wait_for_target("chat", Duration::from_secs(10), is_cold)
        .await;
}

#[tokio::test]
async fn a_silent_event_stream_stops_pinning_its_target_and_its_response_ends() {
    let wg = Wakegate::start(FAST_TICKS, &target("sse", "")).await;
    let hello = within(20, "the first request", wg.get("sse.localhost", "/")).await;
    let pid = pid_in(&hello.body);
    // One event, then silence: the whole body arrives once wakegate ends the response.
    let events = within(
        20,
        "the event stream's end",
        wg.get("sse.localhost", "/events"),
    )
    .await;
    assert_eq!(events.status, 200);
    assert_eq!(events.headers["content-type"], "text/event-stream");
    assert_eq!(events.body, "data: 1\n\n", "the events sent, whole");

    wg.wait_for_target("sse", Duration::from_secs(10), is_cold)
        .await;
    assert!(!process_alive(pid), "the instance (pid {pid}) stopped");
    assert_eq!(
        metric(
            &wg.metrics().await,
            "wakegate_streams_closed_total",
            "reason=\"scaled_to_zero\""
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_quiet_grpc_stream_ends_with_unavailable_when_its_target_scales_to_zero() {
    let bin = bin();
    let targets = format!(
        r#"
[[target]]
name = "rpc"
hosts = ["rpc.localhost"]
command = ["{bin}", "demo-backend", "--port", "{{port}}", "--startup-delay", "0s"]
protocol = "h2c"
ready = {{ grpc = "wakegate.demo.v1.Echo" }}
idle_timeout = "1s"
stream_idle_timeout = "1s"
"#
    );
    let wg = Wakegate::start(FAST_TICKS, &targets).await;
    let channel = Endpoint::from_shared(format!("http://{}", wg.proxy))
        .unwrap()
        .origin("http://rpc.localhost".parse().unwrap())
        .connect()
        .await
        .expect("connect to wakegate");
    let mut client = EchoClient::new(channel);
    let (send, receive) = tokio::sync::mpsc::channel(1);
    let requests = futures_util::stream::unfold(receive, |mut receive| async move {
        receive.recv().await.map(|request| (request, receive))
    });
    send.send(EchoRequest {
        message: "one".to_owned(),
        ..EchoRequest::default()
    })
    .await
    .unwrap();
    let mut replies = within(20, "the bidi call", client.bidi(requests))
        .await
        .expect("the call begins")
        .into_inner();
    let first = within(10, "the first reply", replies.message()).await;
    assert_eq!(first.expect("a reply").expect("a reply").message, "one");

    // Its request stream stays open and silent, as do the replies.
    let status = within(20, "the end of the call", replies.message())
        .await
        .expect_err("the call ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("scaling to zero"), "{status:?}");
    wg.wait_for_target("rpc", Duration::from_secs(10), is_cold)
        .await;
    drop(send);
}
