//! The objects and waits the Kubernetes end-to-end tests share: a [`Cluster`] (the API double
//! enforcing `deploy/base`'s RBAC on wakegate's ServiceAccount), a Deployment and an annotated
//! Service in namespace [`NS`], hand-made EndpointSlices, the `[kubernetes]` section, and
//! waits for conditions.

use std::ops::Deref;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::kube_api::{FakeApi, KubeletOptions, Rbac};
use crate::{Wakegate, bin};

/// The API double as wakegate meets it in a cluster: every request wakegate makes is
/// authorized by the RBAC rendered from `deploy/base` for its ServiceAccount (the kubeconfig
/// [`kubernetes_section`] writes carries that account's token). When the test ends without
/// failing otherwise, it fails if any request was denied, and it prints the grants no
/// request used.
pub struct Cluster(FakeApi);

impl Deref for Cluster {
    type Target = FakeApi;
    fn deref(&self) -> &FakeApi {
        &self.0
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let report = self.0.rbac_report();
        if !report.unused.is_empty() {
            eprintln!("RBAC grants of deploy/base this test did not use:\n{report}");
        }
        assert!(
            report.denied.is_empty(),
            "deploy/base does not grant what wakegate did:\n{report}"
        );
    }
}

/// The API double, enforcing `deploy/base`'s RBAC.
pub async fn cluster() -> Cluster {
    let api = FakeApi::start().await;
    api.enforce_rbac(Rbac::from_deploy("deploy/base"));
    Cluster(api)
}

/// The namespace the tests' workloads live in.
pub const NS: &str = "demo";

/// The `[kubernetes]` lines of a replicated wakegate: a short Lease, and the peers Service
/// that [`two_replicas`] fills in.
pub const LEASE_AND_PEERS: &str = "lease = { namespace = \"wakegate\", name = \"wakegate\", \
    duration = \"3s\", renew = \"500ms\" }\n\
    peers = { namespace = \"wakegate\", service = \"wakegate-peers\" }";

/// An autoscaler tick short enough for tests.
pub const FAST: &str = "[autoscaler]\ninterval = \"200ms\"";

/// A Deployment in [`NS`] whose pods carry `app: NAME`.
pub fn deployment(name: &str, replicas: i32) -> Value {
    workload("apps/v1", "Deployment", name, replicas)
}

/// A workload of any kind with `spec.replicas`, a selector and a pod template, in [`NS`].
pub fn workload(api_version: &str, kind: &str, name: &str, replicas: i32) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": { "name": name, "namespace": NS },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": { "containers": [{ "name": "app", "image": "demo" }] }
            }
        }
    })
}

/// A Service in [`NS`] selecting `app: NAME`, port `http`.
pub fn service(name: &str, annotations: Value) -> Value {
    service_in(NS, name, annotations)
}

pub fn service_in(namespace: &str, name: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": namespace, "annotations": annotations },
        "spec": {
            "selector": { "app": name },
            "ports": [{ "name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP" }]
        }
    })
}

/// An EndpointSlice of `service` in `namespace` on port `http`, with these endpoints (each
/// `{"addresses": [...], "conditions": {...}}`).
pub fn endpoint_slice(namespace: &str, service: &str, port: u16, endpoints: Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-manual"),
            "namespace": namespace,
            "labels": { "kubernetes.io/service-name": service },
        },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": port, "protocol": "TCP" }],
        "endpoints": endpoints,
    })
}

/// [`cluster`] with its simulated kubelet (pods ready 300 ms after they start).
pub async fn api_with_kubelet() -> Cluster {
    let api = cluster().await;
    api.start_kubelet(KubeletOptions {
        startup_delay: Duration::from_millis(300),
        program: bin().into(),
    });
    api
}

/// The `[kubernetes]` section (watching `namespaces`) and its kubeconfig, written next to the
/// API double.
pub fn kubernetes_section_for(
    api: &FakeApi,
    dir: &Path,
    namespaces: &[&str],
    extra: &str,
) -> String {
    let kubeconfig = api.write_kubeconfig(dir);
    let namespaces: Vec<String> = namespaces.iter().map(|n| format!("{n:?}")).collect();
    format!(
        "[kubernetes]\nkubeconfig = \"{}\"\nnamespaces = [{}]\n{extra}\n",
        kubeconfig.display(),
        namespaces.join(", ")
    )
}

/// The `[kubernetes]` section watching [`NS`].
pub fn kubernetes_section(api: &FakeApi, dir: &Path, extra: &str) -> String {
    kubernetes_section_for(api, dir, &[NS], extra)
}

/// Waits for `/readyz` (the first Kubernetes sync).
pub async fn wait_ready(wg: &Wakegate) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while wg.admin_get("/readyz").await.status != 200 {
        assert!(
            Instant::now() < deadline,
            "never became ready; log:\n{}",
            wg.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` until it returns a value; panics naming `what` after `limit`.
pub async fn eventually<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The Events recorded about `kind` `namespace/name` with this reason.
pub fn events_about(api: &FakeApi, kind: &str, name: &str, reason: &str) -> Vec<Value> {
    api.events()
        .into_iter()
        .filter(|e| {
            e["regarding"]["kind"] == kind
                && e["regarding"]["name"] == name
                && e["reason"] == reason
        })
        .collect()
}

/// The peers Service's EndpointSlice for one wakegate replica.
fn peer_slice(replica: &str, admin: std::net::SocketAddr) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("wakegate-peers-{replica}"),
            "namespace": "wakegate",
            "labels": { "kubernetes.io/service-name": "wakegate-peers" }
        },
        "addressType": "IPv4",
        "ports": [{ "name": "admin", "port": admin.port(), "protocol": "TCP" }],
        "endpoints": [{
            "addresses": [admin.ip().to_string()],
            "conditions": { "ready": true },
            "targetRef": { "kind": "Pod", "namespace": "wakegate", "name": replica }
        }]
    })
}

/// Two wakegate replicas, `wakegate-a` and `wakegate-b` (their `POD_NAME`), each listed in the
/// peers Service, ready, and routing the Service `service` of [`NS`].
pub async fn two_replicas(
    api: &FakeApi,
    head: &str,
    section: &str,
    service: &str,
) -> (std::sync::Arc<Wakegate>, std::sync::Arc<Wakegate>) {
    let mut replicas = Vec::new();
    for name in ["wakegate-a", "wakegate-b"] {
        let replica = Wakegate::start_with_env(head, section, &[("POD_NAME", name)]).await;
        api.apply(peer_slice(name, replica.admin));
        replicas.push(std::sync::Arc::new(replica));
    }
    for replica in &replicas {
        wait_ready(replica).await;
        replica
            .wait_for_target(service, Duration::from_secs(10), |t| {
                t["kind"] == "kubernetes"
            })
            .await;
    }
    let b = replicas.pop().expect("two");
    (replicas.pop().expect("two"), b)
}

/// Of two replicas, (the leader, the follower), once exactly one says it leads
/// (`wakegate_leader`); panics after 10 s.
pub async fn leader_and_follower(
    a: &std::sync::Arc<Wakegate>,
    b: &std::sync::Arc<Wakegate>,
) -> (std::sync::Arc<Wakegate>, std::sync::Arc<Wakegate>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let la = crate::metric(&a.metrics().await, "wakegate_leader", "").unwrap_or(0.0);
        let lb = crate::metric(&b.metrics().await, "wakegate_leader", "").unwrap_or(0.0);
        match (la, lb) {
            (1.0, 0.0) => return (a.clone(), b.clone()),
            (0.0, 1.0) => return (b.clone(), a.clone()),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "exactly one leader: {la} {lb}; log of a:\n{}",
            a.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
