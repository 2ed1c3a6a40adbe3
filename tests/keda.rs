//! KEDA's external scaler, with a tonic client playing KEDA: the push through a cold start and
//! an idle period, the metric values and specs, the statuses of questions about targets
//! wakegate does not have, and two wakegate replicas on Kubernetes (the API double) answering
//! with the same cluster-wide values.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use tempfile::TempDir;
use tonic::Code;
use tonic::transport::Channel;
use wakegate::keda::pb::external_scaler_client::ExternalScalerClient;
use wakegate::keda::pb::{GetMetricsRequest, IsActiveResponse, ScaledObjectRef};
use wakegate_test_support::kube_api::KubeletOptions;
use wakegate_test_support::kube_fixtures::{
    Cluster, FAST, LEASE_AND_PEERS, NS, api_with_kubelet, cluster, deployment, kubernetes_section,
    leader_and_follower, service, two_replicas,
};
use wakegate_test_support::{Load, Wakegate, bin, demo_target, metric, within};

/// Samples often, so the activity and metric values follow the load closely.
const HEAD: &str =
    "[autoscaler]\ninterval = \"100ms\"\n[listen]\nexternal_scaler = \"127.0.0.1:0\"\n";

async fn keda(wakegate: &Wakegate) -> ExternalScalerClient<Channel> {
    let addr = wakegate
        .external_scaler
        .expect("the scaler's address in the log");
    ExternalScalerClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the external scaler")
}

/// A ScaledObject in namespace `local` (file targets' namespace) whose trigger has `meta`.
fn scaled_object(meta: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "hello".into(),
        namespace: "local".into(),
        scaler_metadata: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn hello() -> ScaledObjectRef {
    scaled_object(&[("service", "hello")])
}

async fn metric_value(client: &mut ExternalScalerClient<Channel>, object: ScaledObjectRef) -> f64 {
    let values = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object),
            metric_name: String::new(),
        })
        .await
        .expect("GetMetrics")
        .into_inner()
        .metric_values;
    assert_eq!(values.len(), 1, "{values:?}");
    values[0].metric_value_float
}

/// Sends `GET path` for `hello.localhost` in a task of its own; the task ends with the raw
/// response.
fn spawn_get(wakegate: &Wakegate, path: &str) -> tokio::task::JoinHandle<String> {
    let (proxy, request) = (
        wakegate.proxy,
        format!("GET {path} HTTP/1.1\r\nHost: hello.localhost\r\nConnection: close\r\n\r\n"),
    );
    tokio::spawn(async move { wakegate_test_support::raw_exchange(proxy, &request).await })
}

/// Asks GetMetrics until `ok` holds of the value (the signal is sampled every 100 ms).
async fn wait_for_metric(
    client: &mut ExternalScalerClient<Channel>,
    object: ScaledObjectRef,
    what: &str,
    ok: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let value = metric_value(client, object.clone()).await;
        if ok(value) {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: still {value}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn stream_is_active_pushes_true_while_a_cold_start_is_held_and_false_once_idle() {
    let target = format!(
        "{}idle_timeout = \"1s\"\n",
        demo_target("hello", "hello.localhost", "1500ms")
    );
    let wakegate = Wakegate::start(HEAD, &target).await;
    let mut client = keda(&wakegate).await;
    let mut stream = client
        .stream_is_active(hello())
        .await
        .expect("StreamIsActive")
        .into_inner();
    let mut next = async || -> IsActiveResponse {
        within(20, "the next push", stream.next())
            .await
            .expect("the stream stays open")
            .expect("no error")
    };
    assert!(
        !next().await.result,
        "a cold target with no request is inactive"
    );
    let unary = client.is_active(hello()).await.expect("IsActive");
    assert!(!unary.into_inner().result);

    let sent = Instant::now();
    let request = spawn_get(&wakegate, "/");
    let pushed = next().await;
    let latency = sent.elapsed();
    assert!(pushed.result, "the held request makes the target active");
    // The instance takes 1.5 s to start: the push comes while the request is held, long
    // before that (measured here 1-5 ms; the issue asks for at most 50 ms).
    eprintln!("StreamIsActive pushed true {latency:?} after the request was sent");
    assert!(
        !request.is_finished(),
        "pushed only after the cold start ended ({latency:?})"
    );
    assert!(latency < Duration::from_millis(1000), "{latency:?}");
    let unary = client.is_active(hello()).await.expect("IsActive");
    assert!(unary.into_inner().result);

    let response = within(20, "the held request", request).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let done = Instant::now();
    let idle = next().await;
    assert!(!idle.result, "the target went idle");
    eprintln!(
        "StreamIsActive pushed false {:?} after the last answer",
        done.elapsed()
    );
    let unary = client.is_active(hello()).await.expect("IsActive");
    assert!(!unary.into_inner().result);

    // What KEDA did shows in wakegate's metrics: its calls, the open stream, the pushes.
    let metrics = wakegate.metrics().await;
    let value = |name: &str, labels: &str| metric(&metrics, name, labels);
    assert_eq!(
        value(
            "wakegate_external_scaler_calls_total",
            r#"method="StreamIsActive",code="ok""#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        value(
            "wakegate_external_scaler_calls_total",
            r#"method="IsActive",code="ok""#
        ),
        Some(3.0)
    );
    assert_eq!(value("wakegate_external_scaler_streams", ""), Some(1.0));
    assert_eq!(
        value("wakegate_external_scaler_pushes_total", r#"active="true""#),
        Some(1.0)
    );
    assert_eq!(
        value("wakegate_external_scaler_pushes_total", r#"active="false""#),
        Some(2.0)
    );
}

#[tokio::test]
async fn a_stream_follows_its_target_through_a_reload_and_ends_with_not_found_once_it_is_gone() {
    let wakegate = Wakegate::start(HEAD, &demo_target("hello", "hello.localhost", "1500ms")).await;
    let mut client = keda(&wakegate).await;
    let mut stream = client
        .stream_is_active(hello())
        .await
        .expect("StreamIsActive")
        .into_inner();
    let first = within(10, "the first push", stream.next()).await.unwrap();
    assert!(!first.expect("no error").result);

    // A changed setting replaces the target's handle; the stream moves to the new one.
    let changed = format!(
        "{}idle_timeout = \"2m\"\n",
        demo_target("hello", "hello.localhost", "1500ms")
    );
    wakegate.rewrite_config(HEAD, &changed);
    wakegate.signal(libc::SIGHUP);
    wakegate
        .wait_for_log("of the reload", Duration::from_secs(10), |line| {
            line["message"] == "configuration reloaded"
        })
        .await;
    let request = spawn_get(&wakegate, "/");
    let pushed = within(10, "the push", stream.next()).await.unwrap();
    assert!(pushed.expect("no error").result, "held for the new handle");
    let response = within(20, "the held request", request).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // Gone from the file: the stream ends, saying so.
    wakegate.rewrite_config(HEAD, &demo_target("other", "other.localhost", "0ms"));
    wakegate.signal(libc::SIGHUP);
    let ended = within(10, "the end of the stream", stream.next()).await;
    let status = ended.expect("a last message").expect_err("NOT_FOUND");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().contains("\"hello\""),
        "{}",
        status.message()
    );
    assert!(
        within(10, "nothing after it", stream.next())
            .await
            .is_none(),
        "the stream is over"
    );
}

#[tokio::test]
async fn get_metrics_reports_the_concurrency_of_requests_in_flight_then_zero() {
    // GetMetrics answers the panic window's average: a short one follows the test's load.
    let target = format!(
        "{}scaling = {{ panic_window = \"1s\" }}\n",
        demo_target("hello", "hello.localhost", "0ms")
    );
    let wakegate = Wakegate::start(HEAD, &target).await;
    let mut client = keda(&wakegate).await;
    let specs = client
        .get_metric_spec(hello())
        .await
        .expect("GetMetricSpec")
        .into_inner()
        .metric_specs;
    assert_eq!(specs.len(), 1, "{specs:?}");
    assert_eq!(specs[0].metric_name, "wakegate-local-hello-concurrency");
    assert_eq!(specs[0].target_size_float, 10.0, "the target's own default");
    assert_eq!(specs[0].target_size, 10);
    assert_eq!(metric_value(&mut client, hello()).await, 0.0);

    let requests: Vec<_> = (0..4)
        .map(|_| spawn_get(&wakegate, "/sleep?ms=2500"))
        .collect();
    // Four requests held, then in flight, for 2.5 s: a whole panic window sees all four.
    let value = wait_for_metric(&mut client, hello(), "four requests open", |v| v > 3.9).await;
    assert!(value <= 4.0 + 1e-6, "{value}");
    let rps = scaled_object(&[("service", "hello"), ("metric", "rps")]);
    for request in requests {
        let response = within(20, "a slow request", request).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
    wait_for_metric(&mut client, rps.clone(), "four answers in a sample", |v| {
        v > 0.0
    })
    .await;
    wait_for_metric(&mut client, hello(), "nothing open", |v| v == 0.0).await;
    wait_for_metric(&mut client, rps, "no more answers", |v| v == 0.0).await;
}

#[tokio::test]
async fn a_trigger_may_choose_the_metric_and_its_target_value() {
    let wakegate = Wakegate::start(HEAD, &demo_target("hello", "hello.localhost", "0ms")).await;
    let mut client = keda(&wakegate).await;
    let object = scaled_object(&[
        ("service", "hello"),
        ("namespace", "local"),
        ("metric", "rps"),
        ("targetValue", "2.5"),
    ]);
    let specs = client
        .get_metric_spec(object.clone())
        .await
        .expect("GetMetricSpec")
        .into_inner()
        .metric_specs;
    assert_eq!(specs[0].metric_name, "wakegate-local-hello-rps");
    assert_eq!(specs[0].target_size_float, 2.5);
    assert_eq!(
        specs[0].target_size, 3,
        "rounded up for KEDA versions reading the integer"
    );
    let rps_default = scaled_object(&[("service", "hello"), ("metric", "rps")]);
    let specs = client
        .get_metric_spec(rps_default)
        .await
        .expect("GetMetricSpec")
        .into_inner()
        .metric_specs;
    assert_eq!(specs[0].target_size_float, 50.0, "rps's default target");

    let bad = client
        .get_metric_spec(scaled_object(&[("service", "hello"), ("metric", "cpu")]))
        .await
        .expect_err("an unknown metric");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().contains("metric = \"cpu\""),
        "{}",
        bad.message()
    );
    let pushed_specs = client
        .stream_metric_spec(hello())
        .await
        .expect_err("not pushed");
    assert_eq!(pushed_specs.code(), Code::Unimplemented);
}

#[tokio::test]
async fn questions_about_an_unknown_target_get_not_found_naming_it() {
    let wakegate = Wakegate::start(HEAD, &demo_target("hello", "hello.localhost", "0ms")).await;
    let mut client = keda(&wakegate).await;
    let elsewhere = ScaledObjectRef {
        namespace: "shop".into(),
        ..hello()
    };
    let missing = scaled_object(&[("service", "nope")]);
    let check = |status: tonic::Status, service: &str, namespace: &str| {
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let message = status.message();
        assert!(
            message.contains(&format!("service \"{service}\""))
                && message.contains(&format!("namespace \"{namespace}\"")),
            "{message}"
        );
    };
    check(
        client.is_active(missing.clone()).await.unwrap_err(),
        "nope",
        "local",
    );
    check(
        client.is_active(elsewhere.clone()).await.unwrap_err(),
        "hello",
        "shop",
    );
    check(
        client.stream_is_active(missing.clone()).await.unwrap_err(),
        "nope",
        "local",
    );
    check(
        client.get_metric_spec(elsewhere).await.unwrap_err(),
        "hello",
        "shop",
    );
    check(
        client
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(missing),
                metric_name: "s0-wakegate".into(),
            })
            .await
            .unwrap_err(),
        "nope",
        "local",
    );
    let unnamed = client
        .is_active(scaled_object(&[]))
        .await
        .expect_err("no service");
    assert_eq!(unnamed.code(), Code::InvalidArgument);
    assert!(
        unnamed.message().contains("metadata service"),
        "{}",
        unnamed.message()
    );
}

/// Two replicas with the external scaler on, routing the Service `name` (host
/// `{name}.example.com`) of a Deployment at zero, and the ScaledObject that names it; the
/// directory of their kubeconfig must outlive them.
async fn two_replicas_with_the_scaler(
    api: &Cluster,
    name: &str,
) -> (Arc<Wakegate>, Arc<Wakegate>, ScaledObjectRef, TempDir) {
    api.apply(deployment(name, 0));
    api.apply(service(
        name,
        json!({
            "wakegate.io/enabled": "true",
            "wakegate.io/hosts": format!("{name}.example.com"),
        }),
    ));
    let dir = tempfile::tempdir().unwrap();
    let section = kubernetes_section(
        api,
        dir.path(),
        &format!("autoscaler = \"external\"\n{LEASE_AND_PEERS}"),
    );
    let head = format!("{FAST}\n[listen]\nexternal_scaler = \"127.0.0.1:0\"\n");
    let (a, b) = two_replicas(api, &head, &section, name).await;
    let object = ScaledObjectRef {
        name: name.into(),
        namespace: NS.into(),
        scaler_metadata: [("service".to_owned(), name.to_owned())].into(),
    };
    (a, b, object, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_answer_keda_with_the_cluster_wide_signal_whichever_is_asked() {
    let api = api_with_kubelet().await;
    let (a, b, busy, _dir) = two_replicas_with_the_scaler(&api, "busy").await;
    // Whichever leads: the follower must answer as well as the leader.
    let (leader, follower) = leader_and_follower(&a, &b).await;
    let mut keda_on_leader = keda(&leader).await;
    let mut keda_on_follower = keda(&follower).await;
    for client in [&mut keda_on_leader, &mut keda_on_follower] {
        let active = client.is_active(busy.clone()).await.expect("IsActive");
        assert!(!active.into_inner().result, "busy sleeps at zero");
    }
    // KEDA's stream is open on the leader; the requests all go through the follower.
    let mut stream = keda_on_leader
        .stream_is_active(busy.clone())
        .await
        .expect("StreamIsActive")
        .into_inner();
    let first = within(10, "the first push", stream.next())
        .await
        .unwrap()
        .unwrap();
    assert!(!first.result);

    let load = Load::start(&follower, 4, "busy.example.com", "/sleep?ms=200");
    // The leader hears of it from its scrape of the follower, not from a request of its own.
    let pushed = within(20, "the leader's push", stream.next())
        .await
        .unwrap()
        .unwrap();
    assert!(pushed.result, "active from the follower's requests");
    // Four clients in a loop: a concurrency of about 4, summed the same on both replicas.
    for (who, client) in [
        ("leader", &mut keda_on_leader),
        ("follower", &mut keda_on_follower),
    ] {
        let value = wait_for_metric(client, busy.clone(), who, |v| v > 3.0).await;
        assert!(value < 6.0, "{who}: {value}");
        let active = client.is_active(busy.clone()).await.expect("IsActive");
        assert!(active.into_inner().result, "{who}");
    }
    load.stop().await;
    for (who, client) in [
        ("leader", &mut keda_on_leader),
        ("follower", &mut keda_on_follower),
    ] {
        wait_for_metric(client, busy.clone(), who, |v| v == 0.0).await;
    }
}

#[tokio::test]
async fn a_request_held_on_one_replica_makes_keda_s_stream_on_the_other_say_active_at_once() {
    // Pods take 3 s to start: the push must come while the request is still held.
    let api = cluster().await;
    api.start_kubelet(KubeletOptions {
        startup_delay: Duration::from_secs(3),
        program: bin().into(),
    });
    let (streamed, holding, slow, _dir) = two_replicas_with_the_scaler(&api, "slow").await;
    let mut stream = keda(&streamed)
        .await
        .stream_is_active(slow)
        .await
        .expect("StreamIsActive")
        .into_inner();
    let first = within(10, "the first push", stream.next()).await;
    assert!(!first.unwrap().unwrap().result, "slow sleeps at zero");

    let sent = Instant::now();
    let proxy = holding.proxy;
    let request = tokio::spawn(async move {
        wakegate_test_support::raw_exchange(
            proxy,
            "GET / HTTP/1.1\r\nHost: slow.example.com\r\nConnection: close\r\n\r\n",
        )
        .await
    });
    let pushed = within(20, "the push", stream.next())
        .await
        .unwrap()
        .unwrap();
    let latency = sent.elapsed();
    assert!(
        pushed.result,
        "active from the other replica's held request"
    );
    assert!(
        !request.is_finished(),
        "pushed only after the cold start ended ({latency:?})"
    );
    // The holding replica told the other one; it did not wait for that one's next scrape.
    eprintln!(
        "StreamIsActive on the other replica pushed true {latency:?} after the request was sent"
    );
    // The holding replica counts its notice once the other one answered it.
    holding
        .wait_for_metrics("the notice sent", Duration::from_secs(5), |m| {
            metric(
                m,
                "wakegate_peer_notices_total",
                r#"direction="sent",result="ok""#,
            ) == Some(1.0)
        })
        .await;
    let metrics = streamed.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "wakegate_peer_notices_total",
            r#"direction="received",result="taken""#
        ),
        Some(1.0),
        "{metrics}"
    );
    let response = within(20, "the held request", request).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}
