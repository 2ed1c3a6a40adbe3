//! The Kubernetes API test double (`wakegate_test_support::kube_api`) driven by the real kube
//! client: watcher + reflector through changes, outages and expired history; `/scale`; Leases;
//! Events; the simulated kubelet running Deployments as demo backends; RBAC mode with
//! deploy/base's RBAC objects (401, 403, the report of used and unused grants); and injected
//! faults (429, 500, 503, 401).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use wakegate_test_support::kube_api::{
    FakeApi, Fault, Grant, KubeletOptions, Rbac, SERVICE_ACCOUNT_TOKEN,
};
use wakegate_test_support::{bin, process_alive, raw_exchange, raw_status, within};

fn service(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    })
}

fn deployment(name: &str, replicas: i32) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "demo"}]},
            },
        },
    })
}

/// A reflector over `api` with the default backoff, running until the handle is dropped.
struct Reflector<K: Resource + Clone + 'static>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    store: Store<K>,
    /// The watcher's errors (each one retried after a backoff).
    errors: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl<K: Resource + Clone + 'static> Drop for Reflector<K>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn reflect<K>(api: Api<K>, config: watcher::Config) -> Reflector<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, config).default_backoff().reflect(writer);
    let errors = Arc::new(Mutex::new(Vec::new()));
    let sink = errors.clone();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(error) = event {
                sink.lock().unwrap().push(error.to_string());
            }
        }
    });
    within(5, "the reflector's first list", store.wait_until_ready())
        .await
        .expect("reflector ready");
    Reflector {
        store,
        errors,
        task,
    }
}

fn names<K: Resource + Clone>(store: &Store<K>) -> Vec<String>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    let mut names: Vec<String> = store.state().iter().map(|o| o.name_any()).collect();
    names.sort();
    names
}

/// Polls `check` every 20 ms until it holds; fails the test after `secs`.
async fn eventually(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    within(secs, what, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Lists (not watches) of services the client made.
fn service_lists(api: &FakeApi) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/services") && !r.contains("watch="))
        .count()
}

fn status_code(error: kube::Error) -> (u16, String) {
    match error {
        kube::Error::Api(status) => (status.code, status.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn api_status(error: kube::Error) -> kube::core::Status {
    match error {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn reflector_from_kubeconfig_sees_applied_and_deleted_services() {
    let api = FakeApi::start().await;
    api.apply(service("a", json!({})));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(api.write_kubeconfig(dir.path())).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    assert_eq!(config.cluster_url.to_string(), format!("{}/", api.url()));
    assert_eq!(config.default_namespace, "default");
    let client = Client::try_from(config).unwrap();

    let services = reflect(Api::<Service>::all(client), watcher::Config::default()).await;
    assert_eq!(names(&services.store), ["a"]);

    let b = api.apply(service("b", json!({})));
    eventually(5, "b appears", || names(&services.store) == ["a", "b"]).await;
    let seen = services.store.state();
    let seen_b = seen.iter().find(|s| s.name_any() == "b").unwrap();
    assert_eq!(
        seen_b.resource_version().as_deref(),
        b["metadata"]["resourceVersion"].as_str()
    );
    assert!(seen_b.uid().is_some());
    assert!(seen_b.creation_timestamp().is_some());

    assert!(api.delete("Service", "default", "a"));
    eventually(5, "a disappears", || names(&services.store) == ["b"]).await;
    let watches: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("GET /api/v1/services?") && r.contains("watch=true"))
        .collect();
    assert!(
        watches
            .iter()
            .all(|w| w.contains("allowWatchBookmarks=true")),
        "{watches:?}"
    );
    assert_eq!(service_lists(&api), 1);
    assert_eq!(*services.errors.lock().unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn label_selector_filters_lists_and_watches() {
    let api = FakeApi::start().await;
    api.apply(service("x", json!({"tier": "web"})));
    api.apply(service("y", json!({"tier": "db"})));
    api.apply(service("z", json!({})));
    let client = api.client();
    let web = reflect(
        Api::<Service>::namespaced(client.clone(), "default"),
        watcher::Config::default().labels("tier=web"),
    )
    .await;
    let tiered = reflect(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().labels("tier,tier notin (cache)"),
    )
    .await;
    assert_eq!(names(&web.store), ["x"]);
    assert_eq!(names(&tiered.store), ["x", "y"]);

    // An object that starts or stops matching is added to or deleted from the watch.
    api.apply(service("y", json!({"tier": "web"})));
    api.apply(service("x", json!({"tier": "cache"})));
    eventually(5, "x leaves and y joins", || {
        names(&web.store) == ["y"] && names(&tiered.store) == ["y"]
    })
    .await;

    let named: Vec<Service> = Api::<Service>::all(client)
        .list(&kube::api::ListParams::default().fields("metadata.name=z"))
        .await
        .unwrap()
        .items;
    assert_eq!(named.len(), 1);
    assert_eq!(named[0].name_any(), "z");
}

#[tokio::test]
async fn watch_cut_by_an_outage_resumes_and_sees_later_changes() {
    let api = FakeApi::start().await;
    api.apply(service("a", json!({})));
    let client = api.client();
    let services = reflect(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .await;

    api.set_down(true);
    let during = Api::<Service>::namespaced(client.clone(), "default")
        .list(&Default::default())
        .await;
    assert!(during.is_err(), "a request during the outage fails");
    api.apply(service("missed", json!({})));
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.set_down(false);

    eventually(10, "the change made during the outage arrives", || {
        names(&services.store) == ["a", "missed"]
    })
    .await;
    api.apply(service("later", json!({})));
    eventually(5, "a later change arrives", || {
        names(&services.store) == ["a", "later", "missed"]
    })
    .await;
    // It resumed the watch from its resourceVersion instead of listing again.
    assert_eq!(service_lists(&api), 1, "{:#?}", api.requests());
    assert!(
        !services.errors.lock().unwrap().is_empty(),
        "the outage was seen"
    );
}

#[tokio::test]
async fn watches_time_out_with_a_bookmark_and_resume_from_it_without_relisting() {
    let api = FakeApi::start().await;
    api.apply(service("a", json!({})));
    let client = api.client();
    let services = reflect(
        Api::<Service>::all(client),
        watcher::Config::default().timeout(1),
    )
    .await;
    // Changes to other kinds move the version on; the bookmark carries it to the watcher.
    let other = api.apply(deployment("web", 1));
    let version = other["metadata"]["resourceVersion"].as_str().unwrap();
    let resumed = format!("resourceVersion={version}");
    eventually(5, "a watch resumed from the bookmark's version", || {
        api.requests()
            .iter()
            .any(|r| r.contains("watch=true") && r.ends_with(&resumed))
    })
    .await;
    api.apply(service("b", json!({})));
    eventually(5, "b appears", || names(&services.store) == ["a", "b"]).await;
    assert_eq!(service_lists(&api), 1);
    assert_eq!(*services.errors.lock().unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn expired_watch_history_makes_the_watcher_relist_and_the_store_stays_right() {
    let api = FakeApi::start().await;
    api.apply(service("a", json!({})));
    api.apply(service("b", json!({})));
    let client = api.client();
    let services = reflect(Api::<Service>::all(client), watcher::Config::default()).await;
    assert_eq!(service_lists(&api), 1);

    // An open watch is told 410 Expired.
    api.expire_watch_history();
    eventually(5, "a relist after the open watch expired", || {
        service_lists(&api) == 2
    })
    .await;
    api.apply(service("c", json!({})));
    eventually(5, "c appears", || names(&services.store) == ["a", "b", "c"]).await;

    // A watch resuming after an outage from a forgotten version is told 410 too, and the
    // relist drops what was deleted meanwhile.
    api.set_down(true);
    api.delete("Service", "default", "a");
    api.apply(service("d", json!({})));
    api.expire_watch_history();
    tokio::time::sleep(Duration::from_millis(200)).await;
    api.set_down(false);
    eventually(10, "the store matches after the relist", || {
        names(&services.store) == ["b", "c", "d"]
    })
    .await;
    assert_eq!(service_lists(&api), 3);
    api.apply(service("e", json!({})));
    eventually(5, "watching again after the relist", || {
        names(&services.store) == ["b", "c", "d", "e"]
    })
    .await;
}

#[tokio::test]
async fn patch_scale_with_server_side_apply_sets_replicas_and_records_the_manager() {
    let api = FakeApi::start().await;
    api.apply(deployment("web", 0));
    let client = api.client();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let watched = reflect(deployments.clone(), watcher::Config::default()).await;

    let scale = deployments.get_scale("web").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(0));

    let scale = deployments
        .patch_scale(
            "web",
            &PatchParams::apply("wakegate").force(),
            &Patch::Apply(json!({
                "apiVersion": "autoscaling/v1",
                "kind": "Scale",
                "spec": {"replicas": 3},
            })),
        )
        .await
        .unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(3));
    assert_eq!(scale.status.unwrap().selector.as_deref(), Some("app=web"));
    assert_eq!(api.deployment_replicas("default", "web"), Some(3));
    assert_eq!(
        api.scale_patches("default", "web"),
        [("wakegate".into(), 3)]
    );
    let patch = api
        .requests()
        .into_iter()
        .find(|r| r.starts_with("PATCH /apis/apps/v1/namespaces/default/deployments/web/scale?"))
        .expect("a scale PATCH");
    assert!(patch.contains("fieldManager=wakegate") && patch.contains("force=true"));

    eventually(5, "the watch sees the new replicas", || {
        watched.store.state().iter().any(|d| {
            d.spec.as_ref().and_then(|s| s.replicas) == Some(3) && d.metadata.generation == Some(2)
        })
    })
    .await;

    let scale = deployments
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(1));
    assert_eq!(
        api.scale_patches("default", "web"),
        [("wakegate".into(), 3), (String::new(), 1)]
    );

    let missing = deployments.get_scale("nope").await.unwrap_err();
    assert_eq!(status_code(missing), (404, "NotFound".into()));
}

#[tokio::test]
async fn lease_create_twice_or_replace_from_a_stale_version_is_a_409() {
    let api = FakeApi::start().await;
    let leases: Api<Lease> = Api::namespaced(api.client(), "default");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "wakegate-leader"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15},
    }))
    .unwrap();

    let first = leases.create(&PostParams::default(), &lease).await.unwrap();
    assert!(first.resource_version().is_some());
    let again = leases
        .create(&PostParams::default(), &lease)
        .await
        .unwrap_err();
    assert_eq!(status_code(again), (409, "AlreadyExists".into()));

    let mut taken = first.clone();
    taken.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let second = leases
        .replace("wakegate-leader", &PostParams::default(), &taken)
        .await
        .unwrap();
    assert_ne!(second.resource_version(), first.resource_version());

    let mut stale = first.clone();
    stale.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let conflict = leases
        .replace("wakegate-leader", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert_eq!(status_code(conflict), (409, "Conflict".into()));

    let now = leases.get("wakegate-leader").await.unwrap();
    assert_eq!(now.spec.unwrap().holder_identity.as_deref(), Some("b"));
    assert_eq!(
        leases.list(&Default::default()).await.unwrap().items.len(),
        1
    );
}

#[tokio::test]
async fn recorder_events_are_stored_and_repeats_become_a_series() {
    let api = FakeApi::start().await;
    let client = api.client();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "wakegate".into(),
            instance: Some("wakegate-0".into()),
        },
    );
    let web = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        namespace: Some("default".into()),
        name: Some("web".into()),
        ..Default::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "InvalidAnnotation".into(),
        note: Some("wakegate.io/min-replicas: \"x\" is not a number".into()),
        action: "Skip".into(),
        secondary: None,
    };

    recorder.publish(&event, &web).await.unwrap();
    let events = api.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["apiVersion"], "events.k8s.io/v1");
    assert_eq!(events[0]["reason"], "InvalidAnnotation");
    assert_eq!(events[0]["type"], "Warning");
    assert_eq!(events[0]["regarding"]["name"], "web");
    assert_eq!(events[0]["reportingController"], "wakegate");

    // The same event again is a PATCH that counts it.
    recorder.publish(&event, &web).await.unwrap();
    let events = api.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["series"]["count"], 2);
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with("PATCH /apis/events.k8s.io/v1/namespaces/default/events/"))
    );

    // Core v1 events are stored too.
    let core: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client, "default");
    let legacy = serde_json::from_value(json!({
        "metadata": {"name": "web.legacy"},
        "involvedObject": {"kind": "Service", "name": "web", "namespace": "default"},
        "reason": "Woken",
    }))
    .unwrap();
    core.create(&PostParams::default(), &legacy).await.unwrap();
    let events = api.events();
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["apiVersion"], "v1");
    assert_eq!(events[1]["reason"], "Woken");
}

/// (endpoints, ready endpoints) of an EndpointSlice.
fn counts(slice: &EndpointSlice) -> (usize, usize) {
    let ready = slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .count();
    (slice.endpoints.len(), ready)
}

#[tokio::test]
async fn kubelet_turns_replicas_into_ready_demo_backends_and_zero_into_none() {
    let api = FakeApi::start().await;
    api.apply(service("web", json!({})));
    api.apply(deployment("web", 0));
    api.start_kubelet(KubeletOptions {
        startup_delay: Duration::from_millis(300),
        program: bin().into(),
    });
    let client = api.client();
    let slices = reflect(
        Api::<EndpointSlice>::namespaced(client.clone(), "default"),
        watcher::Config::default().labels("kubernetes.io/service-name=web"),
    )
    .await;
    // Everything the watch showed, in order.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = {
        let seen = seen.clone();
        let store = slices.store.clone();
        tokio::spawn(async move {
            loop {
                if let Some(slice) = store.state().first() {
                    let now = counts(slice);
                    let mut seen = seen.lock().unwrap();
                    if seen.last() != Some(&now) {
                        seen.push(now);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    eventually(5, "an empty slice for web", || {
        api.get("EndpointSlice", "default", "web-sim").is_some()
    })
    .await;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let two = Patch::Apply(
        json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "spec": {"replicas": 2}}),
    );
    deployments
        .patch_scale("web", &PatchParams::apply("wakegate").force(), &two)
        .await
        .unwrap();
    eventually(10, "two ready endpoints", || {
        slices
            .store
            .state()
            .first()
            .is_some_and(|s| counts(s) == (2, 2))
    })
    .await;
    recorder.abort();
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|&(total, ready)| total > 0 && ready < total),
        "pods were published not ready before they were ready: {seen:?}"
    );

    let slice = slices.store.state().first().unwrap().as_ref().clone();
    assert_eq!(slice.address_type, "IPv4");
    let ports = slice.ports.unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].name.as_deref(), Some("http"));
    let port = u16::try_from(ports[0].port.unwrap()).unwrap();
    let mut addresses: Vec<String> = slice
        .endpoints
        .iter()
        .map(|e| e.addresses[0].clone())
        .collect();
    addresses.sort();
    assert_eq!(addresses, ["127.0.0.2", "127.0.0.3"]);
    for address in &addresses {
        let addr = SocketAddr::new(address.parse().unwrap(), port);
        let response = raw_exchange(addr, "GET / HTTP/1.0\r\n\r\n").await;
        assert_eq!(raw_status(&response), 200, "{response}");
        assert!(response.contains("hello from demo-backend"), "{response}");
    }
    let pods = api.pods("default", "web");
    assert_eq!(pods.len(), 2);
    assert!(pods.iter().all(|p| p.ready && p.addr.port() == port));

    let status = deployments.get_status("web").await.unwrap().status.unwrap();
    assert_eq!(status.ready_replicas, Some(2));
    assert_eq!(status.replicas, Some(2));
    let scale = deployments.get_scale("web").await.unwrap();
    assert_eq!(scale.status.unwrap().replicas, 2);

    let zero = Patch::Apply(
        json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "spec": {"replicas": 0}}),
    );
    deployments
        .patch_scale("web", &PatchParams::apply("wakegate").force(), &zero)
        .await
        .unwrap();
    eventually(5, "no endpoints", || {
        slices
            .store
            .state()
            .first()
            .is_some_and(|s| counts(s) == (0, 0))
    })
    .await;
    eventually(5, "the pods' processes are gone", || {
        pods.iter().all(|p| !process_alive(p.pid as i32))
    })
    .await;
    eventually(5, "the pods are reaped", || {
        api.pods("default", "web").is_empty()
    })
    .await;
    let status = deployments.get("web").await.unwrap().status.unwrap();
    assert_eq!(status.ready_replicas, None);
}

#[tokio::test]
async fn streaming_list_watcher_gets_the_initial_events_then_changes() {
    let api = FakeApi::start().await;
    api.apply(service("a", json!({})));
    let services = reflect(
        Api::<Service>::all(api.client()),
        watcher::Config::default().streaming_lists(),
    )
    .await;
    assert_eq!(names(&services.store), ["a"]);
    api.apply(service("b", json!({})));
    eventually(5, "b appears", || names(&services.store) == ["a", "b"]).await;
    assert_eq!(service_lists(&api), 0, "no list, only a watch");
    assert!(
        api.requests()
            .iter()
            .any(|r| r.contains("watch=true") && r.contains("sendInitialEvents=true"))
    );
}

#[tokio::test]
async fn dropping_the_fake_api_kills_its_pods() {
    let api = FakeApi::start().await;
    api.apply(service("web", json!({})));
    api.apply(deployment("web", 1));
    api.start_kubelet(KubeletOptions {
        startup_delay: Duration::ZERO,
        program: bin().into(),
    });
    eventually(10, "a ready pod", || {
        api.pods("default", "web").iter().any(|p| p.ready)
    })
    .await;
    let pid = api.pods("default", "web")[0].pid;
    drop(api);
    eventually(5, "the pod's process is gone", || {
        !process_alive(pid as i32)
    })
    .await;
}

// RBAC mode: deploy/base's RBAC objects enforced on wakegate's ServiceAccount.

/// wakegate's ServiceAccount, as the 403 messages name it.
const SA: &str = "system:serviceaccount:wakegate:wakegate";

/// A fake API server enforcing deploy/base's RBAC, with a Service and a Deployment `web` in
/// `demo`.
async fn rbac_api() -> FakeApi {
    let api = FakeApi::start().await;
    api.enforce_rbac(Rbac::from_deploy("deploy/base"));
    let mut web = service("web", json!({}));
    web["metadata"]["namespace"] = "demo".into();
    api.apply(web);
    for (api_version, kind) in [
        ("apps/v1", "Deployment"),
        ("apps/v1", "StatefulSet"),
        ("argoproj.io/v1alpha1", "Rollout"),
    ] {
        let mut web = deployment("web", 0);
        web["apiVersion"] = api_version.into();
        web["kind"] = kind.into();
        web["metadata"]["namespace"] = "demo".into();
        api.apply(web);
    }
    api
}

/// (code, reason, message) of an API error.
fn api_error(error: kube::Error) -> (u16, String, String) {
    match error {
        kube::Error::Api(status) => (status.code, status.reason.clone(), status.message.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// A client that does not retry 429 and 503 itself (kube's default client does, up to 15
/// times, waiting for `Retry-After`).
fn client_without_retries(api: &FakeApi) -> Client {
    let mut config = api.config();
    config.default_retry = false;
    Client::try_from(config).unwrap()
}

/// (verb, API group, resource) of each grant, sorted.
fn grant_keys(grants: &[Grant]) -> Vec<(String, String, String)> {
    let mut keys: Vec<_> = grants
        .iter()
        .map(|g| (g.verb.clone(), g.api_group.clone(), g.resource.clone()))
        .collect();
    keys.sort();
    keys
}

fn keys(list: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    let mut keys: Vec<_> = list
        .iter()
        .map(|(v, g, r)| ((*v).to_owned(), (*g).to_owned(), (*r).to_owned()))
        .collect();
    keys.sort();
    keys
}

/// Every grant deploy/base gives wakegate's ServiceAccount.
const DEPLOY_BASE_GRANTS: [(&str, &str, &str); 19] = [
    ("list", "", "services"),
    ("watch", "", "services"),
    ("list", "discovery.k8s.io", "endpointslices"),
    ("watch", "discovery.k8s.io", "endpointslices"),
    ("get", "apps", "deployments"),
    ("list", "apps", "deployments"),
    ("watch", "apps", "deployments"),
    ("get", "apps", "statefulsets"),
    ("get", "argoproj.io", "rollouts"),
    ("get", "apps", "deployments/scale"),
    ("patch", "apps", "deployments/scale"),
    ("get", "apps", "statefulsets/scale"),
    ("patch", "apps", "statefulsets/scale"),
    ("get", "argoproj.io", "rollouts/scale"),
    ("patch", "argoproj.io", "rollouts/scale"),
    ("create", "events.k8s.io", "events"),
    ("get", "coordination.k8s.io", "leases"),
    ("create", "coordination.k8s.io", "leases"),
    ("update", "coordination.k8s.io", "leases"),
];

#[tokio::test]
async fn rbac_the_service_account_can_do_all_that_deploy_base_grants_and_uses_every_grant() {
    let api = rbac_api().await;
    // As wakegate gets it: the kubeconfig carries the ServiceAccount's token.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(api.write_kubeconfig(dir.path())).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let client = Client::try_from(config).unwrap();

    let services = reflect(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .await;
    assert_eq!(names(&services.store), ["web"]);
    let _slices = reflect(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
    )
    .await;
    let _deployments = reflect(
        Api::<Deployment>::all(client.clone()),
        watcher::Config::default(),
    )
    .await;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "demo");
    assert_eq!(
        deployments
            .get_scale("web")
            .await
            .unwrap()
            .spec
            .unwrap()
            .replicas,
        Some(0)
    );
    let one = Patch::Apply(
        json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "spec": {"replicas": 1}}),
    );
    deployments
        .patch_scale("web", &PatchParams::apply("wakegate").force(), &one)
        .await
        .unwrap();
    assert_eq!(api.deployment_replicas("demo", "web"), Some(1));
    deployments.get("web").await.unwrap();
    // Any workload's /scale, and the workload itself (to read its managedFields).
    for (group, version, kind) in [
        ("apps", "v1", "StatefulSet"),
        ("argoproj.io", "v1alpha1", "Rollout"),
    ] {
        let resource = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            group, version, kind,
        ));
        let workloads: Api<DynamicObject> = Api::namespaced_with(client.clone(), "demo", &resource);
        workloads.get("web").await.unwrap();
        workloads.get_scale("web").await.unwrap();
        workloads
            .patch_scale("web", &PatchParams::apply("wakegate").force(), &one)
            .await
            .unwrap();
    }

    // An event.
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "wakegate".into(),
            instance: Some("wakegate-0".into()),
        },
    );
    let web = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        namespace: Some("demo".into()),
        name: Some("web".into()),
        ..Default::default()
    };
    let event = Event {
        type_: EventType::Normal,
        reason: "Woken".into(),
        note: Some("a request arrived".into()),
        action: "Scale".into(),
        secondary: None,
    };
    recorder.publish(&event, &web).await.unwrap();
    assert_eq!(api.events().len(), 1);

    // Leader election in wakegate's namespace.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "wakegate");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "wakegate-leader"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15},
    }))
    .unwrap();
    leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut held = leases.get("wakegate-leader").await.unwrap();
    held.spec.as_mut().unwrap().holder_identity = Some("b".into());
    leases
        .replace("wakegate-leader", &PostParams::default(), &held)
        .await
        .unwrap();

    // The reflectors' watches follow their lists.
    eventually(5, "every grant used", || {
        api.rbac_report().unused.is_empty()
    })
    .await;
    let report = api.rbac_report();
    println!("{report}");
    assert_eq!(report.denied, []);
    let used = |verb: &str, group: &str, resource: &str, namespace: Option<&str>| {
        report
            .used
            .iter()
            .find(|u| {
                u.verb == verb
                    && u.api_group == group
                    && u.resource == resource
                    && u.namespace.as_deref() == namespace
            })
            .unwrap_or_else(|| panic!("{verb} {resource} {namespace:?} in\n{report}"))
    };
    let list = used("list", "", "services", None);
    assert_eq!(list.requests, 1);
    assert_eq!(list.granted_by.role, "ClusterRole wakegate");
    assert_eq!(list.granted_by.binding, "ClusterRoleBinding wakegate");
    assert_eq!(list.granted_by.namespace, None);
    used("watch", "", "services", None);
    used("watch", "discovery.k8s.io", "endpointslices", None);
    used("watch", "apps", "deployments", None);
    let scale = used("patch", "apps", "deployments/scale", Some("demo"));
    assert_eq!(scale.granted_by.resource, "deployments/scale");
    used("get", "apps", "deployments/scale", Some("demo"));
    used("create", "events.k8s.io", "events", Some("demo"));
    let update = used("update", "coordination.k8s.io", "leases", Some("wakegate"));
    assert_eq!(
        update.granted_by.role,
        "Role wakegate/wakegate-leader-election"
    );
    assert_eq!(
        update.granted_by.binding,
        "RoleBinding wakegate/wakegate-leader-election"
    );
    assert_eq!(update.granted_by.namespace.as_deref(), Some("wakegate"));
    used("create", "coordination.k8s.io", "leases", Some("wakegate"));
    used("get", "coordination.k8s.io", "leases", Some("wakegate"));
    assert_eq!(
        grant_keys(
            &report
                .used
                .iter()
                .map(|u| u.granted_by.clone())
                .collect::<Vec<_>>()
        )
        .into_iter()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>(),
        keys(&DEPLOY_BASE_GRANTS)
    );
}

#[tokio::test]
async fn rbac_denies_what_deploy_base_does_not_grant_with_the_real_403() {
    let api = rbac_api().await;
    let client = api.client();
    let services: Api<Service> = Api::namespaced(client.clone(), "demo");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "demo");

    let forbidden = |error: kube::Error, message: String| {
        assert_eq!(api_error(error), (403, "Forbidden".into(), message));
    };
    forbidden(
        services
            .delete("web", &Default::default())
            .await
            .unwrap_err(),
        format!(
            "services \"web\" is forbidden: User \"{SA}\" cannot delete resource \"services\" \
             in API group \"\" in the namespace \"demo\""
        ),
    );
    forbidden(
        services.get("web").await.unwrap_err(),
        format!(
            "services \"web\" is forbidden: User \"{SA}\" cannot get resource \"services\" in \
             API group \"\" in the namespace \"demo\""
        ),
    );
    // The Deployment itself, not its /scale.
    forbidden(
        deployments
            .patch(
                "web",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 2}})),
            )
            .await
            .unwrap_err(),
        format!(
            "deployments.apps \"web\" is forbidden: User \"{SA}\" cannot patch resource \
             \"deployments\" in API group \"apps\" in the namespace \"demo\""
        ),
    );
    // /scale may be patched, not replaced.
    let scale = deployments.get_scale("web").await.unwrap();
    forbidden(
        deployments
            .replace_scale("web", &PostParams::default(), &scale)
            .await
            .unwrap_err(),
        format!(
            "deployments.apps \"web\" is forbidden: User \"{SA}\" cannot update resource \
             \"deployments/scale\" in API group \"apps\" in the namespace \"demo\""
        ),
    );
    // Leases only in wakegate's namespace: a create has no name yet.
    let lease: Lease =
        serde_json::from_value(json!({"metadata": {"name": "elsewhere"}, "spec": {}})).unwrap();
    forbidden(
        Api::<Lease>::namespaced(client.clone(), "demo")
            .create(&PostParams::default(), &lease)
            .await
            .unwrap_err(),
        format!(
            "leases.coordination.k8s.io is forbidden: User \"{SA}\" cannot create resource \
             \"leases\" in API group \"coordination.k8s.io\" in the namespace \"demo\""
        ),
    );
    forbidden(
        Api::<Lease>::all(client.clone())
            .list(&Default::default())
            .await
            .unwrap_err(),
        format!(
            "leases.coordination.k8s.io is forbidden: User \"{SA}\" cannot list resource \
             \"leases\" in API group \"coordination.k8s.io\" at the cluster scope"
        ),
    );
    // A list narrowed to one name by a field selector is authorized as that object.
    let (code, _, message) = api_error(
        Api::<Lease>::namespaced(client.clone(), "demo")
            .list(&kube::api::ListParams::default().fields("metadata.name=x"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 403);
    assert!(
        message.starts_with("leases.coordination.k8s.io \"x\" is forbidden:"),
        "{message}"
    );

    // The Status body: what a client can read besides the message.
    let response = raw_exchange(
        api.addr(),
        &format!(
            "DELETE /api/v1/namespaces/demo/services/web HTTP/1.0\r\n\
             Authorization: Bearer {SERVICE_ACCOUNT_TOKEN}\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(raw_status(&response), 403, "{response}");
    let body: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["status"], "Failure");
    assert_eq!(body["reason"], "Forbidden");
    assert_eq!(body["code"], 403);
    assert_eq!(body["details"], json!({"name": "web", "kind": "services"}));

    // Nothing was changed, and the admin may do all of it.
    assert_eq!(api.deployment_replicas("demo", "web"), Some(0));
    Api::<Service>::namespaced(api.admin_client(), "demo")
        .delete("web", &Default::default())
        .await
        .unwrap();
    assert!(api.get("Service", "demo", "web").is_none());

    let report = api.rbac_report();
    let denied: Vec<(String, String, Option<String>, Option<String>)> = report
        .denied
        .iter()
        .map(|d| {
            (
                d.verb.clone(),
                d.resource.clone(),
                d.namespace.clone(),
                d.name.clone(),
            )
        })
        .collect();
    let demo = || Some("demo".to_owned());
    assert_eq!(
        denied,
        [
            (
                "delete".into(),
                "services".into(),
                demo(),
                Some("web".into())
            ),
            ("get".into(), "services".into(), demo(), Some("web".into())),
            (
                "patch".into(),
                "deployments".into(),
                demo(),
                Some("web".into())
            ),
            (
                "update".into(),
                "deployments/scale".into(),
                demo(),
                Some("web".into())
            ),
            ("create".into(), "leases".into(), demo(), None),
            ("list".into(), "leases".into(), None, None),
            ("list".into(), "leases".into(), demo(), Some("x".into())),
            (
                "delete".into(),
                "services".into(),
                demo(),
                Some("web".into())
            ),
        ]
    );
    assert!(report.denied.iter().all(|d| d.user == SA));
    // Only get on /scale was used; admin requests are not in the report.
    assert_eq!(report.used.len(), 1, "{report}");
    assert_eq!(report.used[0].verb, "get");
}

#[tokio::test]
async fn rbac_mode_answers_401_without_a_token_or_with_an_unknown_one() {
    let api = rbac_api().await;
    for token in [None, Some("not-a-token")] {
        let client = Client::try_from(api.config_with_token(token)).unwrap();
        let error = Api::<Service>::all(client)
            .list(&Default::default())
            .await
            .unwrap_err();
        assert_eq!(
            api_error(error),
            (401, "Unauthorized".into(), "Unauthorized".into()),
            "{token:?}"
        );
    }
    let response = raw_exchange(api.addr(), "GET /api/v1/services HTTP/1.0\r\n\r\n").await;
    assert_eq!(raw_status(&response), 401, "{response}");
    let body: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(
        body,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "Unauthorized", "reason": "Unauthorized", "code": 401,
        })
    );
    // Authenticated, discovery is allowed; unauthenticated requests are in no report.
    let version = raw_exchange(
        api.addr(),
        &format!("GET /version HTTP/1.0\r\nAuthorization: Bearer {SERVICE_ACCOUNT_TOKEN}\r\n\r\n"),
    )
    .await;
    assert_eq!(raw_status(&version), 200, "{version}");
    let report = api.rbac_report();
    assert_eq!((report.used.len(), report.denied.len()), (0, 0), "{report}");
    assert_eq!(grant_keys(&report.unused), keys(&DEPLOY_BASE_GRANTS));
}

#[tokio::test]
async fn rbac_report_lists_the_grants_left_unused() {
    let api = rbac_api().await;
    let client = api.client();
    let services = Api::<Service>::all(client.clone());
    services.list(&Default::default()).await.unwrap();
    services.list(&Default::default()).await.unwrap();
    let leases: Api<Lease> = Api::namespaced(client, "wakegate");
    assert_eq!(
        api_error(leases.get("none").await.unwrap_err()).0,
        404,
        "allowed, and not found"
    );

    let report = api.rbac_report();
    assert_eq!(report.denied, []);
    let used: Vec<(String, Option<String>, usize)> = report
        .used
        .iter()
        .map(|u| {
            (
                format!("{} {}", u.verb, u.resource),
                u.namespace.clone(),
                u.requests,
            )
        })
        .collect();
    assert_eq!(
        used,
        [
            ("get leases".to_owned(), Some("wakegate".to_owned()), 1),
            ("list services".to_owned(), None, 2),
        ]
    );
    let unused: Vec<_> = DEPLOY_BASE_GRANTS
        .into_iter()
        .filter(|g| {
            *g != ("list", "", "services") && *g != ("get", "coordination.k8s.io", "leases")
        })
        .collect();
    assert_eq!(grant_keys(&report.unused), keys(&unused));
    let text = report.to_string();
    assert!(
        text.contains(
            "patch deployments/scale in API group \"apps\" cluster-wide (ClusterRole wakegate \
             via ClusterRoleBinding wakegate)"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "update leases in API group \"coordination.k8s.io\" in namespace \"wakegate\" (Role \
             wakegate/wakegate-leader-election via RoleBinding wakegate/wakegate-leader-election)"
        ),
        "{text}"
    );
}

// Injected faults.

#[tokio::test]
async fn fault_429_reaches_a_client_that_does_not_retry_and_a_retrying_one_waits_it_out() {
    let api = FakeApi::start().await;
    api.apply(service("a", json!({})));
    let fault = api.inject(
        Fault::too_many_requests(1)
            .on(http::Method::GET, "/api/v1/namespaces/default/services")
            .times(1),
    );
    let services = Api::<Service>::namespaced(client_without_retries(&api), "default");
    let error = services.list(&Default::default()).await.unwrap_err();
    let kube::Error::Api(status) = error else {
        panic!("expected an API error, got {error:?}")
    };
    assert_eq!(
        (status.code, status.reason.as_str()),
        (429, "TooManyRequests")
    );
    assert_eq!(status.details.unwrap().retry_after_seconds, 1);
    assert_eq!(fault.answered(), 1);
    assert!(!fault.is_active());
    assert_eq!(
        services
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    // kube's default client waits Retry-After and tries again.
    let fault = api.inject(
        Fault::too_many_requests(1)
            .on(http::Method::GET, "/api/v1/namespaces/default/services")
            .times(2),
    );
    let started = std::time::Instant::now();
    let listed = Api::<Service>::namespaced(api.client(), "default")
        .list(&Default::default())
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(fault.answered(), 2);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // On the wire: the header and the Status.
    let fault = api.inject(Fault::too_many_requests(7));
    let response = raw_exchange(api.addr(), "GET /api/v1/services HTTP/1.0\r\n\r\n").await;
    assert_eq!(raw_status(&response), 429, "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("\r\nretry-after: 7\r\n"),
        "{response}"
    );
    let body: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["details"], json!({"retryAfterSeconds": 7}));
    assert_eq!(body["reason"], "TooManyRequests");
    assert_eq!(body["kind"], "Status");
    fault.clear();
    assert!(!fault.is_active());
    let response = raw_exchange(api.addr(), "GET /api/v1/services HTTP/1.0\r\n\r\n").await;
    assert_eq!(raw_status(&response), 200, "{response}");
    assert_eq!(fault.answered(), 1);
}

#[tokio::test]
async fn fault_500_on_the_list_the_watcher_retries_until_it_recovers() {
    let api = FakeApi::start().await;
    api.apply(service("a", json!({})));
    let fault = api.inject(
        Fault::internal_error()
            .on(http::Method::GET, "/api/v1/services")
            .watch(false)
            .times(3),
    );
    let (store, writer) = reflector::store::<Service>();
    let stream = watcher(
        Api::<Service>::all(api.client()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer);
    let errors = Arc::new(Mutex::new(Vec::new()));
    let sink = errors.clone();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(watcher::Error::InitialListFailed(kube::Error::Api(status))) = event {
                sink.lock().unwrap().push((
                    status.code,
                    status.reason.clone(),
                    status.message.clone(),
                ));
            }
        }
    });
    within(
        30,
        "the watcher's list after three 500s",
        store.wait_until_ready(),
    )
    .await
    .unwrap();
    assert_eq!(names(&store), ["a"]);
    assert_eq!(fault.answered(), 3);
    let expected = (
        500,
        "InternalError".to_owned(),
        "Internal error occurred: a fault injected by the test".to_owned(),
    );
    assert_eq!(*errors.lock().unwrap(), vec![expected; 3]);
    // Its watch was not touched, and follows changes.
    api.apply(service("b", json!({})));
    eventually(5, "b appears", || names(&store) == ["a", "b"]).await;
    task.abort();
}

#[tokio::test]
async fn fault_503_is_retried_by_the_default_client_and_seen_without_retries() {
    let api = FakeApi::start().await;
    api.apply(deployment("web", 0));
    let path = "/apis/apps/v1/namespaces/default/deployments/web/scale";
    let fault = api.inject(Fault::service_unavailable().on(http::Method::PATCH, path));
    let two = Patch::Merge(json!({"spec": {"replicas": 2}}));
    let error = Api::<Deployment>::namespaced(client_without_retries(&api), "default")
        .patch_scale("web", &PatchParams::default(), &two)
        .await
        .unwrap_err();
    assert_eq!(
        api_error(error),
        (
            503,
            "ServiceUnavailable".into(),
            "the server is currently unable to handle the request".into()
        )
    );
    assert_eq!(fault.answered(), 1);
    fault.clear();

    let fault = api.inject(
        Fault::service_unavailable()
            .on(http::Method::PATCH, path)
            .times(2),
    );
    Api::<Deployment>::namespaced(api.client(), "default")
        .patch_scale("web", &PatchParams::default(), &two)
        .await
        .unwrap();
    assert_eq!(fault.answered(), 2);
    assert_eq!(api.deployment_replicas("default", "web"), Some(2));
    // GETs were never matched.
    assert_eq!(
        Api::<Deployment>::namespaced(client_without_retries(&api), "default")
            .get_scale("web")
            .await
            .unwrap()
            .spec
            .unwrap()
            .replicas,
        Some(2)
    );
}

#[tokio::test]
async fn fault_401_answers_until_cleared_and_only_watches_when_asked() {
    let api = FakeApi::start().await;
    api.apply(service("a", json!({})));
    let services = Api::<Service>::namespaced(api.client(), "default");
    let fault = api.inject(Fault::unauthorized().on(http::Method::GET, "/api/v1/"));
    for _ in 0..3 {
        let error = services.list(&Default::default()).await.unwrap_err();
        assert_eq!(
            api_error(error),
            (401, "Unauthorized".into(), "Unauthorized".into())
        );
    }
    assert_eq!(fault.answered(), 3);
    api.clear_faults();
    assert!(!fault.is_active());
    assert_eq!(
        services
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    // Only watches, in both spellings; lists pass.
    let fault = api.inject(
        Fault::internal_error()
            .message("etcdserver: request timed out")
            .watch(true),
    );
    for (request, code) in [
        ("GET /api/v1/services?watch=true", 500),
        ("GET /api/v1/watch/services", 500),
        ("GET /api/v1/services", 200),
        ("GET /api/v1/services?watch=false", 200),
    ] {
        let response = raw_exchange(api.addr(), &format!("{request} HTTP/1.0\r\n\r\n")).await;
        assert_eq!(raw_status(&response), code, "{request}: {response}");
        if code == 500 {
            let body: Value =
                serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            assert_eq!(
                body["message"],
                "Internal error occurred: etcdserver: request timed out"
            );
            assert_eq!(
                body["details"],
                json!({"causes": [{"message": "etcdserver: request timed out"}]})
            );
        }
    }
    assert_eq!(fault.answered(), 2);
}

#[tokio::test]
async fn rbac_from_manifests_names_bindings_to_missing_roles_in_the_403() {
    let api = FakeApi::start().await;
    let binding = |kind: &str, namespace: Option<&str>, role_kind: &str, role: &str| {
        let mut object = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": kind,
            "metadata": {"name": "dangling"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
            "subjects": [{"kind": "Group", "name": "system:serviceaccounts:wakegate"}],
        });
        if let Some(namespace) = namespace {
            object["metadata"]["namespace"] = namespace.into();
        }
        object
    };
    api.enforce_rbac(Rbac::from_manifests(&[
        binding("ClusterRoleBinding", None, "ClusterRole", "gone2"),
        binding("RoleBinding", Some("demo"), "Role", "gone"),
    ]));
    let client = api.client();
    let (code, _, message) = api_error(
        Api::<Service>::namespaced(client.clone(), "demo")
            .list(&Default::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 403);
    assert_eq!(
        message,
        format!(
            "services is forbidden: User \"{SA}\" cannot list resource \"services\" in API \
             group \"\" in the namespace \"demo\": RBAC: [clusterrole.rbac.authorization.k8s.io \
             \"gone2\" not found, role.rbac.authorization.k8s.io \"gone\" not found]"
        )
    );
    let (_, _, message) = api_error(
        Api::<Service>::all(client)
            .list(&Default::default())
            .await
            .unwrap_err(),
    );
    assert!(
        message.ends_with(
            "at the cluster scope: RBAC: clusterrole.rbac.authorization.k8s.io \"gone2\" not found"
        ),
        "{message}"
    );
    let report = api.rbac_report();
    assert_eq!(report.denied.len(), 2);
    assert_eq!(report.unused, []);
}

// ---- Paginated lists -----------------------------------------------------------------------

fn item_names(list: &kube::api::ObjectList<Service>) -> Vec<String> {
    list.items.iter().map(|s| s.name_any()).collect()
}

#[tokio::test]
async fn lists_page_with_limit_and_continue_from_one_snapshot_and_expire_like_etcd() {
    let api = FakeApi::start().await;
    for i in 0..1201 {
        api.apply(service(&format!("s{i:04}"), json!({"tier": "web"})));
    }
    let client = api.client();

    // The watcher lists 500 at a time, as client-go does.
    let services = reflect(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .await;
    assert_eq!(services.store.state().len(), 1201);
    let lists: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("GET /api/v1/services?") && !r.contains("watch="))
        .collect();
    assert_eq!(lists.len(), 3, "{lists:?}");
    assert!(lists.iter().all(|r| r.contains("limit=500")), "{lists:?}");
    assert!(!lists[0].contains("continue=") && lists[1..].iter().all(|r| r.contains("continue=")));

    let namespaced: Api<Service> = Api::namespaced(client.clone(), "default");
    let first = namespaced
        .list(&ListParams::default().limit(2))
        .await
        .unwrap();
    assert_eq!(item_names(&first), ["s0000", "s0001"]);
    assert_eq!(first.metadata.remaining_item_count, Some(1199));
    let token = first.metadata.continue_.clone().unwrap();
    let version = first.metadata.resource_version.clone().unwrap();

    // Changes after the first page do not show in the next ones.
    api.delete("Service", "default", "s0002");
    api.apply(service("s0001a", json!({})));
    let second = namespaced
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(item_names(&second), ["s0002", "s0003"]);
    assert_eq!(
        second.metadata.resource_version.as_deref(),
        Some(version.as_str())
    );
    assert_eq!(second.metadata.remaining_item_count, Some(1197));

    // A selector leaves remainingItemCount out; resourceVersion=0 is not paged.
    let selected = namespaced
        .list(&ListParams::default().labels("tier=web").limit(2))
        .await
        .unwrap();
    assert_eq!(item_names(&selected), ["s0000", "s0001"]);
    assert!(selected.metadata.continue_.is_some());
    assert_eq!(selected.metadata.remaining_item_count, None);
    // (kube leaves resourceVersion=0 out when it sends a limit; a raw request does not.)
    let cached = raw_exchange(
        api.addr(),
        "GET /api/v1/namespaces/default/services?limit=2&resourceVersion=0 HTTP/1.0\r\n\r\n",
    )
    .await;
    let (_, body) = cached.split_once("\r\n\r\n").unwrap();
    let cached: Value = serde_json::from_str(body).unwrap();
    assert_eq!(cached["items"].as_array().unwrap().len(), 1201);
    assert_eq!(cached["metadata"].get("continue"), None);

    // A continue token from before a compaction: 410, with a token to go on inconsistently.
    api.expire_watch_history();
    let next = second.metadata.continue_.clone().unwrap();
    let status = api_status(
        namespaced
            .list(&ListParams::default().limit(2).continue_token(&next))
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
    assert_eq!(
        status.message,
        "The provided continue parameter is too old to display a consistent list result. You \
         can start a new list without the continue parameter, or use the continue token in \
         this response to retrieve the remainder of the results. Continuing with the provided \
         token results in an inconsistent list - objects that were created, modified, or \
         deleted between the time the first chunk was returned and now may show up in the \
         list."
    );
    let inconsistent = status.metadata.unwrap().continue_.unwrap();
    let rest = namespaced
        .list(&ListParams::default().limit(2).continue_token(&inconsistent))
        .await
        .unwrap();
    assert_eq!(item_names(&rest), ["s0004", "s0005"]);
    assert_ne!(
        rest.metadata.resource_version.as_deref(),
        Some(version.as_str())
    );

    let status = api_status(
        namespaced
            .list(
                &ListParams::default()
                    .limit(2)
                    .continue_token("bm90IGEgdG9rZW4"),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 400);
    assert!(
        status
            .message
            .starts_with("invalid continue token: continue key is not valid")
    );
}

// ---- Events validation ---------------------------------------------------------------------

fn events_api(client: &Client, namespace: &str) -> Api<DynamicObject> {
    let resource = kube::api::ApiResource::erase::<k8s_openapi::api::events::v1::Event>(&());
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// An events.k8s.io/v1 Event in `default` that passes, with `extra` merged in (null: left
/// out).
fn event_v1(name: &str, extra: Value) -> DynamicObject {
    let mut event = json!({
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": name},
        "eventTime": "2025-01-01T00:00:00.000000Z",
        "reportingController": "wakegate",
        "reportingInstance": "wakegate-0",
        "action": "Scale",
        "reason": "Woken",
        "type": "Normal",
        "regarding": {"kind": "Service", "name": "web", "namespace": "default"},
        "note": "woken by a request",
    });
    for (key, value) in extra.as_object().unwrap() {
        if value.is_null() {
            event.as_object_mut().unwrap().remove(key);
        } else {
            event[key] = value.clone();
        }
    }
    serde_json::from_value(event).unwrap()
}

const QUALIFIED_NAME: &str = "name part must consist of alphanumeric characters, '-', '_' or \
    '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  \
    or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";

#[tokio::test]
async fn events_are_validated_like_the_real_server() {
    let api = FakeApi::start().await;
    let client = api.client();
    let events = events_api(&client, "default");
    let post = PostParams::default();
    let refused = |result: Result<DynamicObject, kube::Error>| {
        let status = api_status(result.unwrap_err());
        assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
        status
    };

    // The note may have 1024 bytes, not more: the message names the internal field.
    events
        .create(&post, &event_v1("fits", json!({"note": "x".repeat(1024)})))
        .await
        .unwrap();
    let status = refused(
        events
            .create(&post, &event_v1("long", json!({"note": "x".repeat(1025)})))
            .await,
    );
    assert_eq!(
        status.message,
        "Event \"long\" is invalid: message: Invalid value: \"\": can have at most 1024 characters"
    );
    let details = status.details.unwrap();
    assert_eq!(
        (details.name.as_str(), details.kind.as_str()),
        ("long", "Event")
    );
    assert_eq!(details.causes.len(), 1);
    assert_eq!(details.causes[0].reason, "FieldValueInvalid");
    assert_eq!(details.causes[0].field, "message");
    assert_eq!(
        details.causes[0].message,
        "Invalid value: \"\": can have at most 1024 characters"
    );
    // Bytes, not characters.
    let status = refused(
        events
            .create(&post, &event_v1("wide", json!({"note": "é".repeat(600)})))
            .await,
    );
    assert!(status.message.ends_with("can have at most 1024 characters"));

    let status = refused(
        events
            .create(&post, &event_v1("r", json!({"reason": "r".repeat(129)})))
            .await,
    );
    assert_eq!(
        status.message,
        "Event \"r\" is invalid: reason: Invalid value: \"\": can have at most 128 characters"
    );

    // What the reporting fields and regarding's namespace need, all at once.
    let bare = event_v1(
        "bare",
        json!({"reportingController": null, "reportingInstance": null, "action": null,
               "regarding": {"kind": "Service", "name": "web"}}),
    );
    let status = refused(events_api(&client, "demo").create(&post, &bare).await);
    assert_eq!(
        status.message,
        format!(
            "Event \"bare\" is invalid: [involvedObject.namespace: Invalid value: \"\": does not \
             match event.namespace, reportingController: Required value, reportingController: \
             Invalid value: \"\": name part must be non-empty, reportingController: Invalid \
             value: \"\": {QUALIFIED_NAME}, reportingInstance: Required value, action: Required \
             value]"
        )
    );
    assert_eq!(status.details.unwrap().causes.len(), 6);

    let status = refused(
        events
            .create(&post, &event_v1("untimed", json!({"eventTime": null})))
            .await,
    );
    assert_eq!(
        status.message,
        "Event \"untimed\" is invalid: eventTime: Required value"
    );
    let status = refused(
        events
            .create(&post, &event_v1("typed", json!({"type": "Info"})))
            .await,
    );
    assert_eq!(
        status.message,
        "Event \"typed\" is invalid: type: Invalid value: \"\": has invalid value: Info"
    );

    // What describes the occurrence cannot change (as on servers since 1.22).
    let status = refused(
        events
            .patch(
                "fits",
                &PatchParams::default(),
                &Patch::Merge(json!({"note": "changed"})),
            )
            .await,
    );
    assert_eq!(
        status.message,
        "Event \"fits\" is invalid: message: Invalid value: \"changed\": field is immutable"
    );

    // Core v1 events get the legacy checks.
    let core: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client, "default");
    let elsewhere = serde_json::from_value(json!({
        "metadata": {"name": "elsewhere"},
        "involvedObject": {"kind": "Service", "name": "web", "namespace": "other"},
        "reason": "Woken",
    }))
    .unwrap();
    let status = api_status(core.create(&post, &elsewhere).await.unwrap_err());
    assert_eq!(status.code, 422);
    assert_eq!(
        status.message,
        "Event \"elsewhere\" is invalid: involvedObject.namespace: Invalid value: \"other\": \
         does not match event.namespace"
    );
    assert_eq!(api.events().len(), 1, "only the valid event was stored");
}

// ---- Field ownership and server-side apply -----------------------------------------------

/// (manager, operation, subresource) of each managedFields entry, as a client reads them.
fn entries(meta: &kube::api::ObjectMeta) -> Vec<(String, String, Option<String>)> {
    meta.managed_fields
        .iter()
        .flatten()
        .map(|e| {
            (
                e.manager.clone().unwrap_or_default(),
                e.operation.clone().unwrap_or_default(),
                e.subresource.clone(),
            )
        })
        .collect()
}

/// The fieldsV1 of `manager`'s entry.
fn fields_of(meta: &kube::api::ObjectMeta, manager: &str) -> Value {
    meta.managed_fields
        .iter()
        .flatten()
        .find(|e| e.manager.as_deref() == Some(manager))
        .and_then(|e| e.fields_v1.as_ref())
        .map(|f| f.0.clone())
        .unwrap_or(Value::Null)
}

fn owners(api: &FakeApi, field: &str) -> Vec<String> {
    let mut owners = api.owners("Deployment", "default", "web", field);
    owners.sort();
    owners
}

fn applied(name: &str, spec: Value) -> Patch<Value> {
    Patch::Apply(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": spec,
    }))
}

#[tokio::test]
async fn apply_conflicts_on_another_managers_field_unless_forced_or_unchanged() {
    let api = FakeApi::start().await;
    api.apply(deployment("web", 1));
    assert_eq!(
        api.managers("Deployment", "default", "web"),
        [("test".into(), "Update".into(), None)]
    );
    assert_eq!(owners(&api, ".spec.replicas"), ["test"]);
    let deployments: Api<Deployment> = Api::namespaced(api.client(), "default");

    // Another value for a field "test" owns: 409, the real server's message and causes.
    let error = deployments
        .patch(
            "web",
            &PatchParams::apply("argo"),
            &applied("web", json!({"replicas": 3})),
        )
        .await
        .unwrap_err();
    let status = api_status(error);
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        status.message,
        "Apply failed with 1 conflict: conflict with \"test\" using apps/v1: .spec.replicas"
    );
    let causes = status.details.unwrap().causes;
    assert_eq!(causes.len(), 1);
    assert_eq!(causes[0].reason, "FieldManagerConflict");
    assert_eq!(causes[0].field, ".spec.replicas");
    assert_eq!(causes[0].message, "conflict with \"test\" using apps/v1");
    assert_eq!(api.deployment_replicas("default", "web"), Some(1));

    // The same value: no conflict, shared ownership.
    let shared = deployments
        .patch(
            "web",
            &PatchParams::apply("argo"),
            &applied("web", json!({"replicas": 1})),
        )
        .await
        .unwrap();
    assert_eq!(owners(&api, ".spec.replicas"), ["argo", "test"]);
    assert_eq!(
        fields_of(&shared.metadata, "argo"),
        json!({"f:spec": {"f:replicas": {}}})
    );
    let entry = shared
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .find(|e| e.manager.as_deref() == Some("argo"))
        .unwrap();
    assert_eq!(entry.operation.as_deref(), Some("Apply"));
    assert_eq!(entry.api_version.as_deref(), Some("apps/v1"));
    assert_eq!(entry.fields_type.as_deref(), Some("FieldsV1"));
    assert!(entry.time.is_some() && entry.subresource.is_none());

    // Forced: argo takes the field over; test keeps the rest of what it set.
    let forced = deployments
        .patch(
            "web",
            &PatchParams::apply("argo").force(),
            &applied("web", json!({"replicas": 3})),
        )
        .await
        .unwrap();
    assert_eq!(forced.spec.unwrap().replicas, Some(3));
    assert_eq!(owners(&api, ".spec.replicas"), ["argo"]);
    assert_eq!(owners(&api, ".spec.template.metadata.labels.app"), ["test"]);
    // Apply entries come first, as on the real server.
    assert_eq!(
        entries(&forced.metadata),
        [
            ("argo".into(), "Apply".into(), None),
            ("test".into(), "Update".into(), None)
        ]
    );

    // An Apply owner is named without an apiVersion; several conflicts are grouped by
    // manager, sorted.
    let error = deployments
        .patch(
            "web",
            &PatchParams::apply("other"),
            &applied(
                "web",
                json!({"replicas": 5, "template": {"metadata": {"labels": {"app": "web2"}}}}),
            ),
        )
        .await
        .unwrap_err();
    let status = api_status(error);
    assert_eq!(
        status.message,
        "Apply failed with 2 conflicts: conflicts with \"argo\":\n- .spec.replicas\n\
         conflicts with \"test\" using apps/v1:\n- .spec.template.metadata.labels.app"
    );
    let mut fields: Vec<(String, String)> = status
        .details
        .unwrap()
        .causes
        .into_iter()
        .map(|c| (c.field, c.message))
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            (".spec.replicas".into(), "conflict with \"argo\"".into()),
            (
                ".spec.template.metadata.labels.app".into(),
                "conflict with \"test\" using apps/v1".into()
            ),
        ]
    );

    // The field manager is required for an apply.
    let error = deployments
        .patch(
            "web",
            &PatchParams::default(),
            &applied("web", json!({"replicas": 1})),
        )
        .await;
    // kube refuses an apply without a field manager before sending it.
    assert!(error.is_err());
}

#[tokio::test]
async fn fields_an_applier_leaves_out_are_removed_unless_someone_else_owns_them() {
    let api = FakeApi::start().await;
    api.apply(deployment("web", 1));
    let deployments: Api<Deployment> = Api::namespaced(api.client(), "default");
    let with_labels = |labels: Value| {
        Patch::Apply(json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "labels": labels},
        }))
    };
    deployments
        .patch(
            "web",
            &PatchParams::apply("a"),
            &with_labels(json!({"team": "x", "tier": "web"})),
        )
        .await
        .unwrap();
    // b applies the same tier: shared.
    deployments
        .patch(
            "web",
            &PatchParams::apply("b"),
            &with_labels(json!({"tier": "web"})),
        )
        .await
        .unwrap();
    // a leaves both out: team goes, tier stays (b owns it).
    let after = deployments
        .patch(
            "web",
            &PatchParams::apply("a"),
            &Patch::Apply(json!({"apiVersion": "apps/v1", "kind": "Deployment",
                                 "metadata": {"name": "web"}})),
        )
        .await
        .unwrap();
    let labels = after.metadata.labels.clone().unwrap();
    assert_eq!(labels.get("team"), None);
    assert_eq!(labels.get("tier").map(String::as_str), Some("web"));
    // a owns nothing any more: its entry is gone.
    assert_eq!(
        entries(&after.metadata),
        [
            ("b".into(), "Apply".into(), None),
            ("test".into(), "Update".into(), None)
        ]
    );
    // b leaves tier out too: the labels are gone.
    let after = deployments
        .patch(
            "web",
            &PatchParams::apply("b"),
            &Patch::Apply(json!({"apiVersion": "apps/v1", "kind": "Deployment",
                                 "metadata": {"name": "web"}})),
        )
        .await
        .unwrap();
    assert_eq!(after.metadata.labels, None);
}

#[tokio::test]
async fn updates_own_what_they_change_and_take_it_from_appliers() {
    let api = FakeApi::start().await;
    let client = api.client();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");

    // A create owns everything it sets, the defaulted replicas included.
    let mut manifest: Deployment = serde_json::from_value(deployment("web", 1)).unwrap();
    manifest.spec.as_mut().unwrap().replicas = None;
    let created = deployments
        .create(
            &PostParams {
                field_manager: Some("creator".into()),
                ..Default::default()
            },
            &manifest,
        )
        .await
        .unwrap();
    assert_eq!(created.spec.as_ref().unwrap().replicas, Some(1));
    assert_eq!(
        entries(&created.metadata),
        [("creator".into(), "Update".into(), None)]
    );
    assert_eq!(
        fields_of(&created.metadata, "creator")["f:spec"]["f:replicas"],
        json!({})
    );
    assert_eq!(created.status, None, "a create's status is dropped");

    deployments
        .patch(
            "web",
            &PatchParams::apply("wakegate").force(),
            &applied("web", json!({"replicas": 2})),
        )
        .await
        .unwrap();

    // A merge patch with the same value changes nothing: no entry, no new version.
    let before = deployments.get("web").await.unwrap();
    let editor = PatchParams {
        field_manager: Some("editor".into()),
        ..Default::default()
    };
    let same = deployments
        .patch(
            "web",
            &editor,
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .unwrap();
    assert_eq!(same.resource_version(), before.resource_version());
    assert_eq!(owners(&api, ".spec.replicas"), ["wakegate"]);

    // Another value: editor owns it now, the applier lost it (and its now empty entry).
    let changed = deployments
        .patch(
            "web",
            &editor,
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    assert_eq!(owners(&api, ".spec.replicas"), ["editor"]);
    assert_eq!(
        entries(&changed.metadata),
        [
            ("creator".into(), "Update".into(), None),
            ("editor".into(), "Update".into(), None)
        ]
    );

    // Without a field manager, the kube client (no User-Agent) is "unknown".
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "1"}}})),
        )
        .await
        .unwrap();
    assert_eq!(owners(&api, ".metadata.labels.x"), ["unknown"]);

    // A replace owns what it changes; the status it sends is ignored.
    let mut current = deployments.get("web").await.unwrap();
    current.spec.as_mut().unwrap().replicas = Some(6);
    current.status = Some(Default::default());
    current.status.as_mut().unwrap().replicas = Some(99);
    let replaced = deployments
        .replace(
            "web",
            &PostParams {
                field_manager: Some("putter".into()),
                ..Default::default()
            },
            &current,
        )
        .await
        .unwrap();
    assert_eq!(replaced.spec.unwrap().replicas, Some(6));
    assert_eq!(replaced.status, None);
    assert_eq!(owners(&api, ".spec.replicas"), ["putter"]);
}

// ---- /scale of every workload kind ---------------------------------------------------------

fn statefulset(name: &str, replicas: i32) -> Value {
    let mut object = deployment(name, replicas);
    object["kind"] = "StatefulSet".into();
    object["spec"]["serviceName"] = name.into();
    object
}

fn rollout(name: &str, replicas: i32) -> Value {
    let mut object = deployment(name, replicas);
    object["apiVersion"] = "argoproj.io/v1alpha1".into();
    object["kind"] = "Rollout".into();
    object["spec"]["strategy"] = json!({"canary": {}});
    object
}

fn rollouts_resource() -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: "argoproj.io".into(),
        version: "v1alpha1".into(),
        api_version: "argoproj.io/v1alpha1".into(),
        kind: "Rollout".into(),
        plural: "rollouts".into(),
    }
}

fn scale_to(replicas: i32) -> Patch<Value> {
    Patch::Apply(json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                        "spec": {"replicas": replicas}}))
}

/// What `/scale` does for a workload kind, through `api` (of that kind).
async fn scale_subresource_owns_replicas<K>(fake: &FakeApi, api: Api<K>, kind: &str, version: &str)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    // GET of the object itself.
    let object = api.get("web").await.unwrap();
    assert_eq!(object.meta().name.as_deref(), Some("web"));
    assert_eq!(
        api.get_scale("web").await.unwrap().spec.unwrap().replicas,
        Some(1)
    );

    // "test" owns replicas through the main resource: an apply to /scale conflicts.
    let error = api
        .patch_scale("web", &PatchParams::apply("wakegate"), &scale_to(2))
        .await
        .unwrap_err();
    let status = api_status(error);
    assert_eq!(status.code, 409);
    assert_eq!(
        status.message,
        format!(
            "Apply failed with 1 conflict: conflict with \"test\" using {version}: .spec.replicas"
        )
    );

    // Forced, wakegate owns it with subresource scale.
    let scale = api
        .patch_scale("web", &PatchParams::apply("wakegate").force(), &scale_to(2))
        .await
        .unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(2));
    assert_eq!(fake.replicas(kind, "default", "web"), Some(2));
    assert_eq!(
        fake.owners(kind, "default", "web", ".spec.replicas"),
        ["wakegate"]
    );
    let object = api.get("web").await.unwrap();
    let ours = object
        .meta()
        .managed_fields
        .iter()
        .flatten()
        .find(|e| e.manager.as_deref() == Some("wakegate"))
        .unwrap()
        .clone();
    assert_eq!(ours.operation.as_deref(), Some("Apply"));
    assert_eq!(ours.subresource.as_deref(), Some("scale"));
    assert_eq!(ours.api_version.as_deref(), Some(version));
    assert_eq!(
        ours.fields_v1.unwrap().0,
        json!({"f:spec": {"f:replicas": {}}})
    );

    // An Update through /scale (kubectl scale, an HPA) takes it over.
    let scale = fake.scale_as("hpa", kind, "default", "web", 4);
    assert_eq!(scale["spec"]["replicas"], 4);
    assert_eq!(
        fake.owners(kind, "default", "web", ".spec.replicas"),
        ["hpa"]
    );
    assert!(fake.managers(kind, "default", "web").contains(&(
        "hpa".into(),
        "Update".into(),
        Some("scale".into())
    )));
    let error = api
        .patch_scale("web", &PatchParams::apply("wakegate"), &scale_to(0))
        .await
        .unwrap_err();
    let status = api_status(error);
    assert_eq!(
        status.message,
        format!(
            "Apply failed with 1 conflict: conflict with \"hpa\" with subresource \"scale\" \
             using {version}: .spec.replicas"
        )
    );
    assert_eq!(
        status.details.unwrap().causes[0].message,
        format!("conflict with \"hpa\" with subresource \"scale\" using {version}")
    );

    // A merge patch of /scale by a named manager is an Update with subresource scale too.
    let merge = PatchParams {
        field_manager: Some("kubectl".into()),
        ..Default::default()
    };
    api.patch_scale(
        "web",
        &merge,
        &Patch::Merge(json!({"spec": {"replicas": 3}})),
    )
    .await
    .unwrap();
    assert_eq!(
        fake.owners(kind, "default", "web", ".spec.replicas"),
        ["kubectl"]
    );
    assert_eq!(
        fake.scale_patches("default", "web"),
        [("wakegate".into(), 2), ("kubectl".into(), 3)]
    );
}

#[tokio::test]
async fn scale_of_deployments_statefulsets_and_rollouts_owns_replicas_as_subresource_scale() {
    let fake = FakeApi::start().await;
    let client = fake.client();
    fake.apply(deployment("web", 1));
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    scale_subresource_owns_replicas(&fake, deployments, "Deployment", "apps/v1").await;

    let fake = FakeApi::start().await;
    let client = fake.client();
    fake.apply(statefulset("web", 1));
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    scale_subresource_owns_replicas(&fake, statefulsets, "StatefulSet", "apps/v1").await;

    let fake = FakeApi::start().await;
    let client = fake.client();
    fake.apply(rollout("web", 1));
    let rollouts: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &rollouts_resource());
    scale_subresource_owns_replicas(&fake, rollouts, "Rollout", "argoproj.io/v1alpha1").await;
}

#[tokio::test]
async fn server_side_apply_helper_reports_conflicts_as_the_client_would_see_them() {
    let api = FakeApi::start().await;
    api.apply(statefulset("db", 2));
    let mut config = statefulset("db", 3);
    config["spec"] = json!({"replicas": 3});
    let (code, status) = api
        .server_side_apply("kubectl", config.clone(), false)
        .unwrap_err();
    assert_eq!(code, 409);
    assert_eq!(status["reason"], "Conflict");
    assert_eq!(status["details"]["causes"][0]["field"], ".spec.replicas");
    let applied = api.server_side_apply("kubectl", config, true).unwrap();
    assert_eq!(applied["spec"]["replicas"], 3);
    assert_eq!(
        api.owners("StatefulSet", "default", "db", ".spec.replicas"),
        ["kubectl"]
    );
    let managed = api.managed_fields("StatefulSet", "default", "db");
    assert_eq!(managed[0].manager, "kubectl");
    assert_eq!(managed[0].operation, "Apply");
    assert_eq!(managed[0].fields, [".spec.replicas"]);
    assert_eq!(managed[1].manager, "test");
    assert!(!managed[1].fields.contains(&".spec.replicas".to_owned()));

    // An apply that creates: the applier owns what it applied, nothing else.
    let created = api
        .server_side_apply("argo", rollout("canary", 2), false)
        .unwrap();
    assert_eq!(created["metadata"]["managedFields"][0]["manager"], "argo");
    assert_eq!(
        api.managers("Rollout", "default", "canary"),
        [("argo".into(), "Apply".into(), None)]
    );
}

// ---- The kubelet for every workload kind; terminating endpoints ----------------------------

/// (address, ready, serving, terminating) of each endpoint of a slice.
fn conditions(slice: &EndpointSlice) -> Vec<(String, bool, bool, bool)> {
    slice
        .endpoints
        .iter()
        .map(|e| {
            let c = e.conditions.clone().unwrap_or_default();
            (
                e.addresses[0].clone(),
                c.ready == Some(true),
                c.serving == Some(true),
                c.terminating == Some(true),
            )
        })
        .collect()
}

fn slice_of(store: &Store<EndpointSlice>, name: &str) -> Option<EndpointSlice> {
    store
        .state()
        .iter()
        .find(|s| s.name_any() == name)
        .map(|s| s.as_ref().clone())
}

#[tokio::test]
async fn kubelet_runs_statefulsets_and_rollouts_like_deployments() {
    let api = FakeApi::start().await;
    api.apply(service("db", json!({})));
    api.apply(statefulset("db", 0));
    api.apply(service("canary", json!({})));
    api.apply(rollout("canary", 0));
    api.start_kubelet(KubeletOptions {
        startup_delay: Duration::ZERO,
        program: bin().into(),
    });
    let client = api.client();
    let slices = reflect(
        Api::<EndpointSlice>::namespaced(client.clone(), "default"),
        watcher::Config::default(),
    )
    .await;
    let ready = |name: &str| {
        slice_of(&slices.store, name)
            .map(|s| conditions(&s).iter().filter(|c| c.1).count())
            .unwrap_or(0)
    };

    api.scale_as("hpa", "StatefulSet", "default", "db", 2);
    api.scale_as("hpa", "Rollout", "default", "canary", 1);
    eventually(10, "two ready db pods and one canary pod", || {
        ready("db-sim") == 2 && ready("canary-sim") == 1
    })
    .await;
    let names: Vec<String> = api
        .pods("default", "db")
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["db-0", "db-1"]);
    let slice = slice_of(&slices.store, "db-sim").unwrap();
    let target = slice.endpoints[0].target_ref.clone().unwrap();
    assert_eq!(target.name.as_deref(), Some("db-0"));

    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    eventually(5, "the StatefulSet's status", || {
        api.get("StatefulSet", "default", "db").unwrap()["status"]["readyReplicas"] == 2
    })
    .await;
    let status = statefulsets.get_status("db").await.unwrap().status.unwrap();
    assert_eq!((status.replicas, status.ready_replicas), (2, Some(2)));
    assert_eq!(
        statefulsets
            .get_scale("db")
            .await
            .unwrap()
            .status
            .unwrap()
            .replicas,
        2
    );

    let rollouts: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &rollouts_resource());
    eventually(5, "the Rollout's status", || {
        api.get("Rollout", "default", "canary").unwrap()["status"]["availableReplicas"] == 1
    })
    .await;
    let scale = rollouts.get_scale("canary").await.unwrap();
    let scale_status = scale.status.unwrap();
    assert_eq!(scale_status.replicas, 1);
    assert_eq!(scale_status.selector.as_deref(), Some("app=canary"));

    // The controllers' writes have managers too.
    assert!(api.managers("StatefulSet", "default", "db").contains(&(
        "kube-controller-manager".into(),
        "Update".into(),
        Some("status".into())
    )));
    assert!(api.managers("Rollout", "default", "canary").contains(&(
        "rollouts-controller".into(),
        "Update".into(),
        Some("status".into())
    )));
    assert_eq!(
        api.managers("EndpointSlice", "default", "db-sim"),
        [("kube-controller-manager".into(), "Update".into(), None)]
    );

    api.scale_as("hpa", "StatefulSet", "default", "db", 0);
    api.scale_as("hpa", "Rollout", "default", "canary", 0);
    eventually(10, "no endpoints left", || {
        slice_of(&slices.store, "db-sim").is_some_and(|s| s.endpoints.is_empty())
            && slice_of(&slices.store, "canary-sim").is_some_and(|s| s.endpoints.is_empty())
    })
    .await;
    eventually(5, "no pods left", || {
        api.pods("default", "db").is_empty() && api.pods("default", "canary").is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_stopped_pod_stays_terminating_in_its_slice_until_its_process_exits() {
    let api = FakeApi::start().await;
    api.apply(service("web", json!({})));
    api.apply(deployment("web", 2));
    // Long enough for a poll to see; the test waits for conditions, not for the time.
    api.set_stop_grace(Duration::from_secs(1));
    api.start_kubelet(KubeletOptions {
        startup_delay: Duration::ZERO,
        program: bin().into(),
    });
    let client = api.client();
    let slices = reflect(
        Api::<EndpointSlice>::namespaced(client.clone(), "default"),
        watcher::Config::default().labels("kubernetes.io/service-name=web"),
    )
    .await;
    eventually(10, "two ready endpoints", || {
        slice_of(&slices.store, "web-sim")
            .is_some_and(|s| conditions(&s).iter().filter(|c| c.1 && c.2 && !c.3).count() == 2)
    })
    .await;

    let deployments: Api<Deployment> = Api::namespaced(client, "default");
    deployments
        .patch_scale("web", &PatchParams::apply("wakegate").force(), &scale_to(1))
        .await
        .unwrap();
    eventually(5, "one ready and one terminating endpoint", || {
        slice_of(&slices.store, "web-sim").is_some_and(|s| {
            conditions(&s)
                == [
                    ("127.0.0.2".into(), true, true, false),
                    ("127.0.0.3".into(), false, true, true),
                ]
        })
    })
    .await;
    let pods = api.pods("default", "web");
    assert_eq!(pods.len(), 2);
    let stopping = pods.iter().find(|p| p.terminating).unwrap().clone();
    assert_eq!(stopping.addr.ip().to_string(), "127.0.0.3");
    assert!(
        process_alive(stopping.pid as i32),
        "it still runs while terminating"
    );

    eventually(10, "the terminating endpoint is gone", || {
        slice_of(&slices.store, "web-sim")
            .is_some_and(|s| conditions(&s) == [("127.0.0.2".into(), true, true, false)])
    })
    .await;
    assert!(
        !process_alive(stopping.pid as i32),
        "its process exited first"
    );
    assert_eq!(api.pods("default", "web").len(), 1);
}
