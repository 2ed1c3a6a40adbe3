//! Which Service routes a host, against the API-server test double: the oldest claim wins
//! whatever the names and the order of events, the host policy of `[kubernetes]`, and
//! EndpointSlice conditions (a terminating pod never gets a new request).

use std::time::Duration;

use serde_json::{Value, json};
use wakegate_test_support::kube_api::FakeApi;
use wakegate_test_support::kube_fixtures::*;
use wakegate_test_support::*;

const LONG_IDLE: &str = "1h";

/// A Service claiming `hosts`, created at `created`, whose one ready pod is `backend`, and
/// its Deployment at one replica (nothing runs pods here: the test plays the kubelet).
fn serve(
    api: &FakeApi,
    namespace: &str,
    name: &str,
    hosts: &str,
    created: &str,
    backend: &DemoBackend,
) {
    let mut d = deployment(name, 1);
    d["metadata"]["namespace"] = namespace.into();
    api.apply(d);
    let mut s = service_in(
        namespace,
        name,
        json!({
            "wakegate.io/enabled": "true",
            "wakegate.io/hosts": hosts,
            "wakegate.io/idle-timeout": LONG_IDLE,
        }),
    );
    s["metadata"]["creationTimestamp"] = created.into();
    api.apply(s);
    api.apply(endpoint_slice(
        namespace,
        name,
        backend.addr.port(),
        json!([{ "addresses": [backend.addr.ip().to_string()], "conditions": { "ready": true } }]),
    ));
}

async fn pid_behind(wg: &Wakegate, host: &str) -> i32 {
    let r = wg.get(host, "/").await;
    assert_eq!(r.status, 200, "{host}: {}", r.body);
    pid_in(&r.body)
}

fn refused(target: &Value) -> Vec<(String, String, String)> {
    target["refused_routes"]
        .as_array()
        .expect("refused_routes in /targets")
        .iter()
        .map(|r| {
            (
                r["host"].as_str().unwrap().to_owned(),
                r["reason"].as_str().unwrap().to_owned(),
                r["detail"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn the_oldest_service_keeps_a_contested_host_whatever_the_names_and_the_loser_is_told() {
    let api = cluster().await;
    let (first, second) = (DemoBackend::start().await, DemoBackend::start().await);
    // Namespaces and names sort the other way round from creation: only the creation time
    // decides.
    serve(
        &api,
        "team-z",
        "zz-first",
        "shop.example.com",
        "2026-01-01T00:00:00Z",
        &first,
    );
    serve(
        &api,
        "team-a",
        "aa-second",
        "shop.example.com,b.example.com",
        "2026-01-02T00:00:00Z",
        &second,
    );
    let dir = tempfile::tempdir().unwrap();
    let section = kubernetes_section_for(&api, dir.path(), &["team-a", "team-z"], "");
    let wg = Wakegate::start(FAST, &section).await;
    wait_ready(&wg).await;
    let loser = wg
        .wait_for_target("aa-second", Duration::from_secs(10), |t| {
            t["instances"] == 1 && !refused(t).is_empty()
        })
        .await;
    let first_pid = first.child.id().unwrap() as i32;
    let second_pid = second.child.id().unwrap() as i32;

    assert_eq!(pid_behind(&wg, "shop.example.com").await, first_pid);
    assert_eq!(
        pid_behind(&wg, "b.example.com").await,
        second_pid,
        "the rest of its claim stands"
    );
    assert_eq!(
        refused(&loser),
        [(
            "shop.example.com".to_owned(),
            "claimed".to_owned(),
            "already claimed by Service team-z/zz-first".to_owned()
        )]
    );
    let metrics = wg.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "wakegate_refused_routes",
            "namespace=\"team-a\",service=\"aa-second\",reason=\"claimed\""
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "wakegate_refused_routes", "service=\"zz-first\""),
        None
    );
    let events = eventually("the RouteRefused Event", Duration::from_secs(10), || {
        let found = events_about(&api, "Service", "aa-second", "RouteRefused");
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "Warning");
    assert!(
        events[0]["note"]
            .as_str()
            .unwrap()
            .contains("shop.example.com/: already claimed by Service team-z/zz-first"),
        "{}",
        events[0]["note"]
    );

    // A change to the loser (a newer version, events in another order) changes nothing.
    let mut touched = service_in(
        "team-a",
        "aa-second",
        json!({
            "wakegate.io/enabled": "true",
            "wakegate.io/hosts": "shop.example.com,b.example.com",
            "wakegate.io/idle-timeout": LONG_IDLE,
            "wakegate.io/max-pending": "50",
        }),
    );
    touched["metadata"]["creationTimestamp"] = "2026-01-02T00:00:00Z".into();
    api.apply(touched);
    wg.wait_for_target("aa-second", Duration::from_secs(10), |t| {
        t["instances"] == 1
    })
    .await;
    assert_eq!(pid_behind(&wg, "shop.example.com").await, first_pid);

    // The owner goes away: the host passes to the next claimant.
    api.delete("Service", "team-z", "zz-first");
    wg.wait_for_target("aa-second", Duration::from_secs(10), |t| {
        refused(t).is_empty()
    })
    .await;
    assert_eq!(pid_behind(&wg, "shop.example.com").await, second_pid);
    assert_eq!(
        metric(
            &wg.metrics().await,
            "wakegate_refused_routes",
            "service=\"aa-second\""
        ),
        None
    );
}

#[tokio::test]
async fn wildcards_only_from_listed_namespaces_and_exact_hosts_only_inside_a_namespaces_domains() {
    let api = cluster().await;
    let (edge, web, greedy) = (
        DemoBackend::start().await,
        DemoBackend::start().await,
        DemoBackend::start().await,
    );
    let t0 = "2026-01-01T00:00:00Z";
    // The oldest claim of "*" comes from a namespace that may not claim wildcards.
    serve(&api, "team-a", "greedy", "*", t0, &greedy);
    serve(
        &api,
        "edge",
        "catch-all",
        "*",
        "2026-01-02T00:00:00Z",
        &edge,
    );
    serve(
        &api,
        "team-a",
        "web",
        "web.a.example.com,www.b.example.com",
        t0,
        &web,
    );
    let dir = tempfile::tempdir().unwrap();
    let section = kubernetes_section_for(
        &api,
        dir.path(),
        &["team-a", "edge"],
        "wildcard_namespaces = [\"edge\"]\nhost_domains = { team-a = [\"a.example.com\"] }",
    );
    let wg = Wakegate::start(FAST, &section).await;
    wait_ready(&wg).await;
    for name in ["greedy", "catch-all", "web"] {
        wg.wait_for_target(name, Duration::from_secs(10), |t| t["instances"] == 1)
            .await;
    }
    let greedy_t = wg.target("greedy").await;
    assert_eq!(refused(&greedy_t).len(), 1, "{greedy_t}");
    assert_eq!(refused(&greedy_t)[0].1, "wildcard");
    let web_t = wg.target("web").await;
    assert_eq!(
        refused(&web_t)
            .iter()
            .map(|(h, r, _)| (h.as_str(), r.as_str()))
            .collect::<Vec<_>>(),
        [("www.b.example.com", "domain")]
    );

    let edge_pid = edge.child.id().unwrap() as i32;
    assert_eq!(
        pid_behind(&wg, "web.a.example.com").await,
        web.child.id().unwrap() as i32
    );
    assert_eq!(
        pid_behind(&wg, "www.b.example.com").await,
        edge_pid,
        "refused to team-a"
    );
    assert_eq!(pid_behind(&wg, "anything.example.org").await, edge_pid);
    let metrics = wg.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "wakegate_refused_routes",
            "service=\"greedy\",reason=\"wildcard\""
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "wakegate_refused_routes",
            "service=\"web\",reason=\"domain\""
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn requests_never_reach_a_terminating_pod_and_wake_the_target_when_every_pod_is_terminating()
{
    let api = cluster().await;
    let (old, new) = (DemoBackend::start().await, DemoBackend::start().await);
    // Scaled to zero a moment ago: its last pod is still shutting down.
    api.apply(deployment("web", 0));
    api.apply(service(
        "web",
        json!({ "wakegate.io/enabled": "true", "wakegate.io/hosts": "web.example.com" }),
    ));
    let terminating = |backend: &DemoBackend| {
        json!({
            "addresses": [backend.addr.ip().to_string()],
            "conditions": { "ready": false, "serving": true, "terminating": true },
        })
    };
    api.apply(endpoint_slice(
        NS,
        "web",
        old.addr.port(),
        json!([terminating(&old)]),
    ));
    let dir = tempfile::tempdir().unwrap();
    let wg =
        std::sync::Arc::new(Wakegate::start(FAST, &kubernetes_section(&api, dir.path(), "")).await);
    wait_ready(&wg).await;
    let t = wg
        .wait_for_target("web", Duration::from_secs(10), |t| {
            t["kind"] == "kubernetes"
        })
        .await;
    assert_eq!(t["instances"], 0, "a terminating pod is no instance: {t}");

    // The request is held, and wakes the Deployment.
    let held = {
        let wg = wg.clone();
        tokio::spawn(async move { wg.get("web.example.com", "/").await })
    };
    eventually("the wake", Duration::from_secs(10), || {
        (api.deployment_replicas(NS, "web") == Some(1)).then_some(())
    })
    .await;
    assert!(!held.is_finished(), "held until a pod is ready");
    // The kubelet's part: a new pod is ready beside the terminating one (on another port, as
    // the slice has one port for all, the new pod gets a slice of its own).
    let mut fresh = endpoint_slice(
        NS,
        "web",
        new.addr.port(),
        json!([{ "addresses": [new.addr.ip().to_string()], "conditions": { "ready": true } }]),
    );
    fresh["metadata"]["name"] = "web-new".into();
    api.apply(fresh);
    let answer = within(10, "the held request", held).await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.headers["x-wakegate-cold-start"], "true");
    assert_eq!(pid_in(&answer.body), new.child.id().unwrap() as i32);
    for _ in 0..20 {
        assert_eq!(
            pid_behind(&wg, "web.example.com").await,
            new.child.id().unwrap() as i32
        );
    }
}
