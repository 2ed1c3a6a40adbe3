//! What wakegate asks of the API server, against the double enforcing `deploy/base`'s RBAC on
//! wakegate's ServiceAccount: it uses every grant and needs no other (every end-to-end test
//! runs under the same RBAC and fails on a denial, see `kube_fixtures::Cluster`); a missing
//! grant is an error a user sees; and it rides out the API server's 429, 5xx and 401 answers.

use std::time::Duration;

use http::Method;
use serde_json::json;
use wakegate_test_support::kube_api::{FakeApi, Fault, Rbac, render_kustomization};
use wakegate_test_support::kube_fixtures::*;
use wakegate_test_support::*;

const LEASE: &str = "lease = { namespace = \"wakegate\", name = \"wakegate\", duration = \"3s\", renew = \"300ms\" }";

#[tokio::test]
async fn wakegate_uses_every_grant_of_deploy_base_and_needs_no_other() {
    let api = api_with_kubelet().await;
    api.apply(deployment("web", 0));
    api.apply(workload("apps/v1", "StatefulSet", "db", 0));
    api.apply(workload("argoproj.io/v1alpha1", "Rollout", "ro", 0));
    for (name, workload) in [
        ("web", "deployment/web"),
        ("db", "statefulset/db"),
        ("ro", "rollout/ro"),
    ] {
        api.apply(service(
            name,
            json!({
                "wakegate.io/enabled": "true",
                "wakegate.io/hosts": format!("{name}.example.com"),
                "wakegate.io/workload": workload,
                "wakegate.io/max-pending": "lots",
            }),
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let wg = Wakegate::start(FAST, &kubernetes_section(&api, dir.path(), LEASE)).await;
    wait_ready(&wg).await;
    for name in ["web", "db", "ro"] {
        wg.wait_until_listed(name, Duration::from_secs(10)).await;
        let r = wg.get(&format!("{name}.example.com"), "/").await;
        assert_eq!(r.status, 200, "{name}: {}", r.body);
    }
    // A Service whose Deployment is missing: read through /scale (not in the watch), 404.
    api.apply(service(
        "ghost",
        json!({ "wakegate.io/enabled": "true", "wakegate.io/hosts": "ghost.example.com" }),
    ));
    wg.wait_until_listed("ghost", Duration::from_secs(10)).await;
    assert_eq!(wg.get("ghost.example.com", "/").await.status, 502);
    // The lease is created, read and renewed; the bad annotations become Events.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !api.rbac_report().unused.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "grants of deploy/base wakegate never used:\n{}",
            api.rbac_report()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = api.rbac_report();
    assert!(report.denied.is_empty(), "{report}");
    println!("{report}");
}

#[tokio::test]
async fn a_grant_missing_from_the_manifests_fails_the_start_and_targets_says_which() {
    let api = FakeApi::start().await;
    // deploy/base without `patch` on deployments/scale.
    let mut objects = render_kustomization("deploy/base");
    for object in &mut objects {
        if object["kind"] == "ClusterRole" {
            for rule in object["rules"].as_array_mut().unwrap() {
                if rule["resources"]
                    .as_array()
                    .unwrap()
                    .contains(&json!("deployments/scale"))
                {
                    rule["verbs"] = json!(["get"]);
                }
            }
        }
    }
    api.enforce_rbac(Rbac::from_manifests(&objects));
    api.apply(deployment("web", 0));
    api.apply(service(
        "web",
        json!({ "wakegate.io/enabled": "true", "wakegate.io/hosts": "web.example.com" }),
    ));
    let dir = tempfile::tempdir().unwrap();
    let wg = Wakegate::start(FAST, &kubernetes_section(&api, dir.path(), "")).await;
    wait_ready(&wg).await;
    wg.wait_until_listed("web", Duration::from_secs(10)).await;
    let r = wg.get("web.example.com", "/").await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(
        r.body.starts_with("target web failed to start\n"),
        "{}",
        r.body
    );
    // Why is for the operator, not the client: in /targets (and the log).
    let target = wg
        .wait_for_target("web", Duration::from_secs(5), |t| {
            !t["last_start_failure"].is_null()
        })
        .await;
    let why = target["last_start_failure"].as_str().unwrap();
    assert!(
        why.contains("forbidden") && why.contains("deployments/scale"),
        "{why}"
    );
    assert!(!r.body.contains("forbidden"), "{}", r.body);
    let report = api.rbac_report();
    assert!(
        report
            .denied
            .iter()
            .any(|d| d.verb == "patch" && d.resource == "deployments/scale"),
        "{report}"
    );
    assert!(
        wg.logs().contains("cannot scale; backing off") && wg.logs().contains("forbidden"),
        "{}",
        wg.logs()
    );
}

#[tokio::test]
async fn a_wake_goes_through_a_throttled_and_failing_api_server() {
    let api = api_with_kubelet().await;
    api.apply(deployment("web", 0));
    api.apply(service(
        "web",
        json!({ "wakegate.io/enabled": "true", "wakegate.io/hosts": "web.example.com" }),
    ));
    // The first lists fail with 500, and 401 (an expired token) once.
    let failing_list = api.inject(
        Fault::internal_error()
            .on(Method::GET, "/api/v1/namespaces/demo/services")
            .watch(false)
            .times(2),
    );
    let unauthorized = api.inject(
        Fault::unauthorized()
            .on(
                Method::GET,
                "/apis/discovery.k8s.io/v1/namespaces/demo/endpointslices",
            )
            .times(1),
    );
    let dir = tempfile::tempdir().unwrap();
    let wg = Wakegate::start(FAST, &kubernetes_section(&api, dir.path(), "")).await;
    wait_ready(&wg).await;
    wg.wait_until_listed("web", Duration::from_secs(10)).await;
    assert_eq!(failing_list.answered(), 2);
    assert_eq!(unauthorized.answered(), 1);

    // The wake's write is throttled (429 with Retry-After: 1), then a 503: retried until done.
    let throttled = api.inject(
        Fault::too_many_requests(1)
            .on(
                Method::PATCH,
                "/apis/apps/v1/namespaces/demo/deployments/web/scale",
            )
            .times(1),
    );
    let unavailable = api.inject(
        Fault::service_unavailable()
            .on(
                Method::PATCH,
                "/apis/apps/v1/namespaces/demo/deployments/web/scale",
            )
            .times(1),
    );
    let r = wg.get("web.example.com", "/").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers["x-wakegate-cold-start"], "true");
    assert_eq!(throttled.answered(), 1);
    assert_eq!(unavailable.answered(), 1);
    assert_eq!(api.deployment_replicas(NS, "web"), Some(1));
}
