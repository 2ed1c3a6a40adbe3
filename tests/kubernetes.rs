//! The Kubernetes flow end to end: the real wakegate binary and the real kube client against
//! the API-server test double, whose simulated kubelet runs real demo-backend processes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use wakegate::provider::kubernetes::backoff::WATCH_RETRY_MAX;
use wakegate_test_support::kube_api::{FakeApi, KubeletOptions};
use wakegate_test_support::kube_fixtures::*;
use wakegate_test_support::*;

/// What a list or watch of the Services in `NS` asks the API server.
const SERVICES: &str = "GET /api/v1/namespaces/demo/services";

/// Room for wakegate to list, discover and route once a watch has retried, on a busy machine.
const MARGIN: Duration = Duration::from_secs(5);

/// Whether the Services were listed or watched since the `since`-th request to the API server.
fn service_requests_since(api: &FakeApi, since: usize) -> bool {
    api.requests()[since..]
        .iter()
        .any(|r| r.starts_with(SERVICES))
}

#[tokio::test]
async fn an_annotated_service_is_woken_on_the_first_request_and_scaled_to_zero_when_idle() {
    let api = api_with_kubelet().await;
    api.apply(deployment("hello", 0));
    api.apply(service(
        "hello",
        json!({
            "wakegate.io/enabled": "true",
            "wakegate.io/hosts": "hello.example.com",
            "wakegate.io/idle-timeout": "2s",
            "wakegate.io/scale-down-delay": "1s",
        }),
    ));
    let dir = tempfile::tempdir().unwrap();
    let wg = Wakegate::start(FAST, &kubernetes_section(&api, dir.path(), "")).await;
    wait_ready(&wg).await;
    wg.wait_for_target("hello", Duration::from_secs(10), |t| {
        t["kind"] == "kubernetes"
    })
    .await;

    let first = wg.get("hello.example.com", "/").await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.headers["x-wakegate-cold-start"], "true");
    assert!(first.body.starts_with("hello from demo-backend"));
    assert_eq!(
        api.scale_patches(NS, "hello").first(),
        Some(&("wakegate".to_owned(), 1))
    );
    assert_eq!(api.deployment_replicas(NS, "hello"), Some(1));

    let warm = wg.get("hello.example.com", "/").await;
    assert_eq!(warm.status, 200);
    assert!(warm.headers.get("x-wakegate-cold-start").is_none());

    // Idle: the leader (the only replica, no lease) scales the Deployment back to zero.
    eventually("scale to zero", Duration::from_secs(15), || {
        (api.deployment_replicas(NS, "hello") == Some(0)).then_some(())
    })
    .await;
    assert_eq!(
        api.scale_patches(NS, "hello").last(),
        Some(&("wakegate".to_owned(), 0))
    );
    wg.wait_for_target("hello", Duration::from_secs(10), |t| t["instances"] == 0)
        .await;
    let metrics = wg.metrics().await;
    assert_eq!(
        metric(&metrics, "wakegate_cold_starts_total", "service=\"hello\""),
        Some(1.0)
    );

    // And it wakes again.
    let again = wg.get("hello.example.com", "/").await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.headers["x-wakegate-cold-start"], "true");
}

#[tokio::test]
async fn bad_annotations_are_reported_as_events_and_crash_nothing() {
    let api = api_with_kubelet().await;
    api.apply(deployment("tuned", 0));
    api.apply(service(
        "tuned",
        json!({ "wakegate.io/enabled": "true", "wakegate.io/hosts": "tuned.example.com", "wakegate.io/max-replicas": "ten" }),
    ));
    api.apply(service(
        "unroutable",
        json!({ "wakegate.io/enabled": "true", "wakegate.io/hosts": "http://nope" }),
    ));
    let dir = tempfile::tempdir().unwrap();
    let wg = Wakegate::start(FAST, &kubernetes_section(&api, dir.path(), "")).await;
    wait_ready(&wg).await;

    let events = eventually(
        "two InvalidAnnotation events",
        Duration::from_secs(10),
        || {
            let events: Vec<_> = api
                .events()
                .into_iter()
                .filter(|e| e["reason"] == "InvalidAnnotation")
                .collect();
            (events.len() >= 2).then_some(events)
        },
    )
    .await;
    let text = serde_json::to_string(&events).unwrap();
    assert!(
        text.contains("wakegate.io/max-replicas") && text.contains("ten"),
        "{text}"
    );
    assert!(
        text.contains("wakegate.io/hosts") && text.contains("http://nope"),
        "{text}"
    );
    let metrics = wg.metrics().await;
    assert!(
        metric(&metrics, "wakegate_invalid_annotations_total", "").unwrap_or(0.0) >= 2.0,
        "{metrics}"
    );

    // The tuned Service runs on its defaults; the unroutable one was skipped.
    let tuned = wg.get("tuned.example.com", "/").await;
    assert_eq!(tuned.status, 200, "{}", tuned.body);
    assert_eq!(wg.get("nope", "/").await.status, 404);
    assert_eq!(wg.admin_get("/healthz").await.status, 200);
}

#[tokio::test]
async fn warm_traffic_is_served_while_the_api_server_is_down() {
    let api = api_with_kubelet().await;
    api.apply(deployment("steady", 1));
    api.apply(service(
        "steady",
        json!({ "wakegate.io/enabled": "true", "wakegate.io/hosts": "steady.example.com", "wakegate.io/min-replicas": "1" }),
    ));
    let dir = tempfile::tempdir().unwrap();
    let wg = Wakegate::start(FAST, &kubernetes_section(&api, dir.path(), "")).await;
    wait_ready(&wg).await;
    wg.wait_for_target("steady", Duration::from_secs(15), |t| t["instances"] == 1)
        .await;

    api.set_down(true);
    let outage = Instant::now();
    let mut served = 0;
    while outage.elapsed() < Duration::from_secs(30) {
        let r = wg.get("steady.example.com", "/").await;
        assert_eq!(r.status, 200, "during the outage: {}", r.body);
        served += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(served >= 50);
    // The server comes back compacted, as after a restart: every watch gets 410 and relists.
    api.expire_watch_history();
    api.set_down(false);
    let returned = Instant::now();
    let back = api.requests().len();
    // Watches resume: a Service and Deployment created after the outage become a target, which
    // wakes. The watches retry at most WATCH_RETRY_MAX apart, so the Service watch asks again
    // within that of the API server's return, and the target follows from what it hears.
    api.apply(deployment("later", 0));
    api.apply(service(
        "later",
        json!({ "wakegate.io/enabled": "true", "wakegate.io/hosts": "later.example.com" }),
    ));
    eventually(
        "the Service watch to retry after the outage",
        WATCH_RETRY_MAX + MARGIN,
        || service_requests_since(&api, back).then_some(()),
    )
    .await;
    // The watch retried: the new Service becomes a target, within 10 s of the server's return.
    wg.wait_until_listed("later", MARGIN).await;
    assert!(
        returned.elapsed() < Duration::from_secs(10),
        "visible {:?} after the API server returned",
        returned.elapsed()
    );
    let later = wg.get("later.example.com", "/").await;
    assert_eq!(later.status, 200, "{}", later.body);
    assert_eq!(later.headers["x-wakegate-cold-start"], "true");
    assert_eq!(wg.get("steady.example.com", "/").await.status, 200);
}

#[tokio::test]
async fn readiness_waits_for_the_first_sync() {
    let api = cluster().await;
    api.set_down(true);
    let dir = tempfile::tempdir().unwrap();
    let wg = Wakegate::start(FAST, &kubernetes_section(&api, dir.path(), "")).await;
    // Not ready while the first list of the Services fails.
    eventually(
        "a refused list of the Services",
        Duration::from_secs(10),
        || service_requests_since(&api, 0).then_some(()),
    )
    .await;
    let r = wg.admin_get("/readyz").await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("Kubernetes"), "{}", r.body);
    api.set_down(false);
    let deadline = Instant::now() + WATCH_RETRY_MAX + MARGIN;
    while wg.admin_get("/readyz").await.status != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready {:?} after the API server came back; log:\n{}",
            WATCH_RETRY_MAX + MARGIN,
            wg.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_one_leader_which_scales_from_the_summed_signal_and_hands_over() {
    let api = api_with_kubelet().await;
    api.apply(deployment("busy", 0));
    api.apply(service(
        "busy",
        json!({
            "wakegate.io/enabled": "true",
            "wakegate.io/hosts": "busy.example.com",
            "wakegate.io/target": "2",
            "wakegate.io/max-replicas": "3",
        }),
    ));
    let dir = tempfile::tempdir().unwrap();
    let section = kubernetes_section(&api, dir.path(), LEASE_AND_PEERS);
    let (a, b) = two_replicas(&api, FAST, &section, "busy").await;

    let (leader, follower) = leader_and_follower(&a, &b).await;

    // A Service with a bad annotation: both replicas log it, only the leader records the Event.
    api.apply(service(
        "typo",
        json!({ "wakegate.io/enabled": "true", "wakegate.io/min-replicas": "lots" }),
    ));
    for replica in [&leader, &follower] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !replica.logs().contains("invalid annotation") {
            assert!(
                Instant::now() < deadline,
                "logged by each replica:\n{}",
                replica.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let events = eventually(
        "the InvalidAnnotation Event",
        Duration::from_secs(10),
        || {
            let found = events_about(&api, "Service", "typo", "InvalidAnnotation");
            (!found.is_empty()).then_some(found)
        },
    )
    .await;
    let leader_name = if Arc::ptr_eq(&leader, &a) {
        "wakegate-a"
    } else {
        "wakegate-b"
    };
    assert_eq!(events.len(), 1, "one copy, not one per replica: {events:?}");
    assert_eq!(events[0]["reportingInstance"], leader_name);

    // Load goes only through the follower: the leader scales up from what the follower
    // counted (concurrency 8, target 2 per replica, max 3).
    let load = Load::start(&follower, 8, "busy.example.com", "/sleep?ms=200");
    eventually("the leader to scale to 3", Duration::from_secs(20), || {
        api.scale_patches(NS, "busy")
            .iter()
            .any(|(_, n)| *n == 3)
            .then_some(())
    })
    .await;
    load.stop().await;
    assert!(metric(&follower.metrics().await, "wakegate_leader", "") == Some(0.0));
    let by_leader = |logs: String| {
        logs.lines().any(|l| {
            l.contains("\"scaled\"")
                && l.contains("\"workload\":\"deployment/busy\"")
                && l.contains("\"to\":3")
                && l.contains("\"waking\":false")
        })
    };
    assert!(
        by_leader(leader.logs()),
        "the leader made the 1 → 3 decision:\n{}",
        leader.logs()
    );
    assert!(!by_leader(follower.logs()), "the follower did not");

    // The leader dies without releasing its lease; the follower takes over once it expires.
    leader.signal(libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric(&follower.metrics().await, "wakegate_leader", "") != Some(1.0) {
        assert!(Instant::now() < deadline, "the follower never took over");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lease = api
        .get("Lease", "wakegate", "wakegate")
        .expect("the lease exists");
    let follower_name = if Arc::ptr_eq(&follower, &a) {
        "wakegate-a"
    } else {
        "wakegate-b"
    };
    assert_eq!(lease["spec"]["holderIdentity"], follower_name);
}

#[tokio::test]
async fn a_held_request_wakes_the_target_again_when_something_else_scales_it_back_to_zero() {
    // As with KEDA (autoscaler = "external") scaling to zero right after a wake, before its
    // metrics show the demand: the held request must not wait for its timeout.
    let api = cluster().await;
    api.start_kubelet(KubeletOptions {
        startup_delay: Duration::from_secs(2),
        program: bin().into(),
    });
    api.apply(deployment("keda", 0));
    api.apply(service(
        "keda",
        json!({ "wakegate.io/enabled": "true", "wakegate.io/hosts": "keda.example.com" }),
    ));
    let dir = tempfile::tempdir().unwrap();
    let wg = Arc::new(
        Wakegate::start(
            FAST,
            &kubernetes_section(&api, dir.path(), "autoscaler = \"external\""),
        )
        .await,
    );
    wait_ready(&wg).await;
    wg.wait_for_target("keda", Duration::from_secs(10), |t| {
        t["kind"] == "kubernetes"
    })
    .await;

    let held = {
        let wg = wg.clone();
        tokio::spawn(async move { wg.get("keda.example.com", "/").await })
    };
    eventually("the wake", Duration::from_secs(10), || {
        (api.deployment_replicas(NS, "keda") == Some(1)).then_some(())
    })
    .await;
    // Someone else scales it back to zero while the pod is still starting.
    api.apply(deployment("keda", 0));

    let response = held.await.unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.headers["x-wakegate-cold-start"], "true");
    let wakes: Vec<i32> = api
        .scale_patches(NS, "keda")
        .iter()
        .map(|(_, n)| *n)
        .collect();
    assert_eq!(wakes, vec![1, 1], "woken, scaled away, woken again");
}

#[tokio::test]
async fn a_service_with_the_namespace_and_name_of_a_file_target_never_displaces_it() {
    let api = api_with_kubelet().await;
    api.apply(deployment("hello", 0));
    api.apply(service(
        "hello",
        json!({ "wakegate.io/enabled": "true", "wakegate.io/hosts": "kube-hello.example.com" }),
    ));
    let dir = tempfile::tempdir().unwrap();
    // The file target has the Service's metric labels: namespace "demo", name "hello".
    let file_target = format!(
        "{}namespace = \"{NS}\"\n",
        demo_target("hello", "file-hello.example.com", "0s")
    );
    let wg = Wakegate::start(
        FAST,
        &format!(
            "{file_target}\n{}",
            kubernetes_section(&api, dir.path(), "")
        ),
    )
    .await;
    wait_ready(&wg).await;

    let first = wg.get("file-hello.example.com", "/").await;
    assert_eq!(first.status, 200, "{}", first.body);
    let pid = pid_in(&first.body);

    // More watch events: every one of them reconciles the targets again.
    for name in ["other", "another"] {
        api.apply(deployment(name, 0));
        api.apply(service(
            name,
            json!({ "wakegate.io/enabled": "true", "wakegate.io/hosts": format!("{name}.example.com") }),
        ));
        wg.wait_until_listed(name, Duration::from_secs(15)).await;
    }

    let again = wg.get("file-hello.example.com", "/").await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(pid_in(&again.body), pid, "the same instance serves");
    assert_eq!(wg.started_pids(), [pid], "nothing else was started");
    let targets: serde_json::Value =
        serde_json::from_str(&wg.admin_get("/targets").await.body).unwrap();
    let hellos: Vec<&serde_json::Value> = targets["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"] == "hello")
        .collect();
    assert_eq!(hellos.len(), 1, "{targets}");
    assert_eq!(hellos[0]["kind"], "local", "{targets}");
    assert_eq!(wg.get("kube-hello.example.com", "/").await.status, 404);
    let skipped = wg
        .logs()
        .lines()
        .filter(|l| l.contains("Kubernetes Service skipped"))
        .count();
    assert_eq!(skipped, 1, "said once, not on every event:\n{}", wg.logs());
}

/// An EndpointSlice of Service `service` in `NS`: port `http` 8080, one ready endpoint per
/// address (nothing is ever connected to them).
fn slice(name: &str, service: &str, addresses: &[&str]) -> serde_json::Value {
    let endpoints: Vec<serde_json::Value> = addresses
        .iter()
        .map(|a| json!({ "addresses": [a], "conditions": { "ready": true } }))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": { "kubernetes.io/service-name": service }
        },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": endpoints
    })
}

#[tokio::test]
async fn the_admin_endpoint_of_one_target_shows_its_entry_and_its_ready_endpoints() {
    let api = FakeApi::start().await;
    api.apply(service("api", json!({ "wakegate.io/enabled": "true" })));
    api.apply(slice("api-a", "api", &["10.1.0.1", "10.1.0.2"]));
    api.apply(slice("api-b", "api", &["10.1.0.3"]));
    let dir = tempfile::tempdir().unwrap();
    let file_target = "[[target]]\nname = \"fixed\"\nhosts = [\"fixed.example.com\"]\nupstream = \"127.0.0.1:9\"\n";
    let wg = Wakegate::start(
        "",
        &format!(
            "{file_target}\n{}",
            kubernetes_section(&api, dir.path(), "")
        ),
    )
    .await;
    wait_ready(&wg).await;
    let one = |path: &'static str| {
        let wg = &wg;
        async move {
            let r = wg.admin_get(path).await;
            assert_eq!(r.status, 200, "{path}: {}", r.body);
            assert_eq!(r.headers["content-type"], "application/json");
            serde_json::from_str::<serde_json::Value>(&r.body).unwrap()
        }
    };
    let endpoints = |t: &serde_json::Value| t["endpoints"].clone();

    // The same object as its `/targets` entry, plus the endpoints.
    let mut api_target = one("/targets/demo/api").await;
    assert_eq!(
        endpoints(&api_target),
        json!(["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"]),
        "{api_target}"
    );
    assert_eq!(api_target["instances"], 3, "{api_target}");
    api_target.as_object_mut().unwrap().remove("endpoints");
    let listed = wg.target("api").await;
    let keys = |t: &serde_json::Value| t.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&api_target), keys(&listed), "{api_target} vs {listed}");
    for field in ["name", "namespace", "kind", "state", "instances"] {
        assert_eq!(api_target[field], listed[field], "{api_target} vs {listed}");
    }
    let fixed = one("/targets/local/fixed").await;
    assert_eq!(fixed["kind"], "upstream", "{fixed}");
    assert_eq!(endpoints(&fixed), json!(["127.0.0.1:9"]), "{fixed}");

    // A change to a slice shows up there.
    api.apply(slice("api-b", "api", &["10.1.0.3", "10.1.0.4"]));
    api.delete("EndpointSlice", NS, "api-a");
    let deadline = Instant::now() + MARGIN;
    loop {
        let now = endpoints(&one("/targets/demo/api").await);
        if now == json!(["10.1.0.3:8080", "10.1.0.4:8080"]) {
            break;
        }
        assert!(Instant::now() < deadline, "endpoints still {now}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Unknown targets and malformed paths: 404 with a short reason.
    for (path, reason) in [
        ("/targets/demo/nope", "no target demo/nope"),
        ("/targets/other/api", "no target other/api"),
        ("/targets/api", "expected /targets/{namespace}/{name}"),
        (
            "/targets/demo/api/more",
            "expected /targets/{namespace}/{name}",
        ),
    ] {
        let r = wg.admin_get(path).await;
        assert_eq!(r.status, 404, "{path}: {}", r.body);
        assert!(r.body.contains(reason), "{path}: {}", r.body);
    }
}
