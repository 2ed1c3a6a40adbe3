//! Who owns a workload's replica count, against the API-server test double: wakegate reads
//! the real count before changing it, never overrides a count above zero in external mode,
//! backs off from a workload it cannot scale without a storm of requests or Events, and does
//! not poll `/scale` while a pod starts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use wakegate_test_support::kube_api::{FakeApi, KubeletOptions};
use wakegate_test_support::kube_fixtures::*;
use wakegate_test_support::*;

fn scale_requests(api: &FakeApi, name: &str) -> Vec<String> {
    let path = format!("/namespaces/{NS}/deployments/{name}/scale");
    api.requests()
        .into_iter()
        .filter(|r| r.contains(&path))
        .collect()
}

#[tokio::test]
async fn a_count_set_with_kubectl_scale_is_where_wakegate_scales_down_from_when_idle() {
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
    wg.wait_until_listed("hello", Duration::from_secs(10)).await;
    assert_eq!(wg.get("hello.example.com", "/").await.status, 200);

    // An operator scales by hand; wakegate (internal mode) owns the count, like an HPA, and
    // its next decision starts from what the Deployment really has.
    api.apply(deployment("hello", 3));
    eventually("the scale to zero", Duration::from_secs(20), || {
        (api.deployment_replicas(NS, "hello") == Some(0)).then_some(())
    })
    .await;
    let logs = wg.logs();
    let first_down = logs
        .lines()
        .find(|l| l.contains("\"scaled\"") && l.contains("\"waking\":false"))
        .unwrap_or_else(|| panic!("a scale-down:\n{logs}"));
    assert!(
        first_down.contains("\"from\":3"),
        "the scale-down logs the Deployment's real count: {first_down}\n{logs}"
    );
    assert_eq!(
        api.scale_patches(NS, "hello").last(),
        Some(&("wakegate".to_owned(), 0))
    );
}

#[tokio::test]
async fn in_external_mode_wakegate_only_wakes_from_zero_and_never_changes_a_count_above_zero() {
    let api = api_with_kubelet().await;
    api.apply(deployment("ext", 2));
    api.apply(service(
        "ext",
        json!({
            "wakegate.io/enabled": "true",
            "wakegate.io/hosts": "ext.example.com",
            "wakegate.io/idle-timeout": "1s",
            "wakegate.io/scale-down-delay": "1s",
        }),
    ));
    let dir = tempfile::tempdir().unwrap();
    let wg = Wakegate::start(
        FAST,
        &kubernetes_section(&api, dir.path(), "autoscaler = \"external\""),
    )
    .await;
    wait_ready(&wg).await;
    wg.wait_for_target("ext", Duration::from_secs(15), |t| t["instances"] == 2)
        .await;
    assert_eq!(wg.get("ext.example.com", "/").await.status, 200);
    // Idle well past the idle timeout and the scale-down delay: the count is KEDA's.
    let idle_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < idle_until {
        assert_eq!(api.deployment_replicas(NS, "ext"), Some(2));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        api.scale_patches(NS, "ext").is_empty(),
        "{:?}",
        api.scale_patches(NS, "ext")
    );

    // KEDA scaled to zero; a request wakes it, and only that is wakegate's.
    api.apply(deployment("ext", 0));
    wg.wait_for_target("ext", Duration::from_secs(15), |t| t["instances"] == 0)
        .await;
    let woken = wg.get("ext.example.com", "/").await;
    assert_eq!(woken.status, 200, "{}", woken.body);
    assert_eq!(woken.headers["x-wakegate-cold-start"], "true");
    assert_eq!(api.scale_patches(NS, "ext"), [("wakegate".to_owned(), 1)]);
}

#[tokio::test]
async fn a_service_whose_deployment_is_missing_fails_its_requests_at_once_and_backs_off_quietly() {
    let api = cluster().await;
    api.apply(service(
        "ghost",
        json!({
            "wakegate.io/enabled": "true",
            "wakegate.io/hosts": "ghost.example.com",
            "wakegate.io/cold-start-timeout": "20s",
        }),
    ));
    let dir = tempfile::tempdir().unwrap();
    let wg = Arc::new(Wakegate::start(FAST, &kubernetes_section(&api, dir.path(), "")).await);
    wait_ready(&wg).await;
    wg.wait_until_listed("ghost", Duration::from_secs(10)).await;

    let started = Instant::now();
    for _ in 0..10 {
        let r = wg.get("ghost.example.com", "/").await;
        assert_eq!(r.status, 502, "{}", r.body);
        assert!(
            r.body.starts_with("target ghost failed to start\n"),
            "{}",
            r.body
        );
        let why = wg.target("ghost").await["last_start_failure"].clone();
        assert!(
            why.as_str()
                .is_some_and(|why| why.contains("deployment/ghost not found in namespace demo")),
            "{why}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "answered at once, not at the cold-start timeout: {:?}",
        started.elapsed()
    );
    // Backing off: 1 s, 2 s, 4 s … apart, not once per request or per tick.
    let tries = scale_requests(&api, "ghost");
    assert!(
        (1..=5).contains(&tries.len()),
        "{} /scale requests in {:?}: {tries:?}",
        tries.len(),
        started.elapsed()
    );
    let events = eventually("the ScaleFailed Event", Duration::from_secs(5), || {
        let found = events_about(&api, "Deployment", "ghost", "ScaleFailed");
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert_eq!(events.len(), 1, "reported once: {events:?}");
    assert_eq!(
        wg.logs().matches("cannot scale; backing off").count(),
        1,
        "logged once:\n{}",
        wg.logs()
    );
    assert!(
        metric(
            &wg.metrics().await,
            "wakegate_kubernetes_scale_failures_total",
            "reason=\"not_found\""
        )
        .is_some_and(|n| n >= 1.0)
    );

    // The Deployment appears: the next request wakes it without waiting out the back-off.
    api.start_kubelet(KubeletOptions {
        startup_delay: Duration::from_millis(300),
        program: bin().into(),
    });
    api.apply(deployment("ghost", 0));
    eventually(
        "the Deployment in wakegate's watch",
        Duration::from_secs(10),
        || {
            api.requests()
                .iter()
                .any(|r| r.contains("deployments") && r.contains("watch"))
                .then_some(())
        },
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = wg.get("ghost.example.com", "/").await;
        if r.status == 200 {
            assert_eq!(r.headers["x-wakegate-cold-start"], "true");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never woke: {} {}",
            r.status,
            r.body
        );
    }
}

#[tokio::test]
async fn a_wake_writes_scale_once_and_polls_nothing_while_the_pod_starts() {
    let api = cluster().await;
    api.start_kubelet(KubeletOptions {
        startup_delay: Duration::from_secs(2),
        program: bin().into(),
    });
    api.apply(deployment("slow", 0));
    api.apply(service(
        "slow",
        json!({ "wakegate.io/enabled": "true", "wakegate.io/hosts": "slow.example.com" }),
    ));
    let dir = tempfile::tempdir().unwrap();
    let wg = Wakegate::start(FAST, &kubernetes_section(&api, dir.path(), "")).await;
    wait_ready(&wg).await;
    wg.wait_until_listed("slow", Duration::from_secs(10)).await;
    let before = scale_requests(&api, "slow").len();
    let r = wg.get("slow.example.com", "/").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let during: Vec<String> = scale_requests(&api, "slow").split_off(before);
    // The Deployment's manifest set replicas (an Update by the test's manager), so the first
    // apply meets it and takes the field over, forced, as an HPA would: at most two PATCHes,
    // and not one GET while the pod started.
    assert!(
        !during.is_empty() && during.len() <= 2 && during.iter().all(|r| r.starts_with("PATCH")),
        "{during:?}"
    );
    assert!(
        !during[0].contains("force=true"),
        "no force at first: {during:?}"
    );
    if during.len() == 2 {
        assert!(during[1].contains("force=true"), "{during:?}");
        assert_eq!(
            metric(
                &wg.metrics().await,
                "wakegate_kubernetes_scale_conflicts_total",
                "manager=\"test\",resolution=\"overridden\""
            ),
            Some(1.0)
        );
    }
}

#[tokio::test]
async fn a_replica_count_declared_by_another_managers_apply_is_never_overridden() {
    let api = api_with_kubelet().await;
    // A GitOps tool applies the Deployment server-side with replicas: 2.
    api.server_side_apply("gitops", deployment("pinned", 2), false)
        .expect("the first apply");
    api.apply(service(
        "pinned",
        json!({
            "wakegate.io/enabled": "true",
            "wakegate.io/hosts": "pinned.example.com",
            "wakegate.io/idle-timeout": "1s",
            "wakegate.io/scale-down-delay": "1s",
        }),
    ));
    let dir = tempfile::tempdir().unwrap();
    let wg = Wakegate::start(FAST, &kubernetes_section(&api, dir.path(), "")).await;
    wait_ready(&wg).await;
    wg.wait_for_target("pinned", Duration::from_secs(15), |t| t["instances"] == 2)
        .await;
    // Idle: wakegate would scale to zero, meets gitops' declaration, and yields.
    let events = eventually("the ScaleConflict Event", Duration::from_secs(20), || {
        let found = events_about(&api, "Deployment", "pinned", "ScaleConflict");
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert!(
        events[0]["note"].as_str().unwrap().contains("gitops"),
        "{}",
        events[0]["note"]
    );
    assert_eq!(api.deployment_replicas(NS, "pinned"), Some(2));
    assert_eq!(
        api.owners("Deployment", NS, "pinned", ".spec.replicas"),
        ["gitops"]
    );
    assert!(
        api.requests()
            .iter()
            .all(|r| !(r.contains("/pinned/scale") && r.contains("force=true"))),
        "never forced"
    );
    let yielded = metric(
        &wg.metrics().await,
        "wakegate_kubernetes_scale_conflicts_total",
        "manager=\"gitops\",resolution=\"yielded\"",
    );
    assert!(yielded.is_some_and(|n| n >= 1.0), "{yielded:?}");
    assert_eq!(
        events_about(&api, "Deployment", "pinned", "ScaleConflict").len(),
        1,
        "one Event however often it is tried again"
    );
    let logs = wg.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("cannot scale") && l.contains("gitops")),
        "logged with the manager's name:\n{logs}"
    );
}

#[tokio::test]
async fn a_statefulset_and_an_argo_rollout_are_woken_through_their_scale_subresource() {
    let api = api_with_kubelet().await;
    api.apply(workload("apps/v1", "StatefulSet", "db", 0));
    api.apply(workload("argoproj.io/v1alpha1", "Rollout", "web", 0));
    for (name, workload) in [("db", "statefulset/db"), ("web", "rollout/web")] {
        api.apply(service(
            name,
            json!({
                "wakegate.io/enabled": "true",
                "wakegate.io/hosts": format!("{name}.example.com"),
                "wakegate.io/workload": workload,
            }),
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let wg = Wakegate::start(FAST, &kubernetes_section(&api, dir.path(), "")).await;
    wait_ready(&wg).await;
    for (name, kind) in [("db", "StatefulSet"), ("web", "Rollout")] {
        wg.wait_until_listed(name, Duration::from_secs(10)).await;
        let r = wg.get(&format!("{name}.example.com"), "/").await;
        assert_eq!(r.status, 200, "{kind}: {}", r.body);
        assert_eq!(r.headers["x-wakegate-cold-start"], "true");
        assert_eq!(api.replicas(kind, NS, name), Some(1), "{kind}");
        assert!(
            api.owners(kind, NS, name, ".spec.replicas")
                .contains(&"wakegate".to_owned()),
            "{kind}: {:?}",
            api.managers(kind, NS, name)
        );
    }
}

#[tokio::test]
async fn an_event_note_over_the_api_limit_is_cut_to_fit() {
    let api = cluster().await;
    let long = format!("{}.example.com", "x".repeat(1500));
    api.apply(service(
        "long",
        json!({ "wakegate.io/enabled": "true", "wakegate.io/hosts": format!("http://{long}") }),
    ));
    let dir = tempfile::tempdir().unwrap();
    let wg = Wakegate::start(FAST, &kubernetes_section(&api, dir.path(), "")).await;
    wait_ready(&wg).await;
    let events = eventually(
        "the InvalidAnnotation Event",
        Duration::from_secs(10),
        || {
            let found = events_about(&api, "Service", "long", "InvalidAnnotation");
            (!found.is_empty()).then_some(found)
        },
    )
    .await;
    let note = events[0]["note"].as_str().unwrap();
    assert!(note.len() <= 1024, "{} bytes", note.len());
    assert!(note.starts_with("wakegate.io/hosts"), "{note}");
    assert!(note.ends_with('…'), "{note}");
    assert!(
        !wg.logs().contains("cannot record the Event"),
        "{}",
        wg.logs()
    );
}
