//! A Kubernetes API server test double that the real `kube` client talks to over HTTP: the
//! REST and watch protocol (JSON only) for Services, EndpointSlices, Deployments,
//! StatefulSets and Argo Rollouts (`argoproj.io/v1alpha1`) and their `/scale`, Leases and
//! Events, and a simulated kubelet that runs the workloads' pods as local demo backends on
//! loopback addresses and publishes them in EndpointSlices.
//!
//! One global resourceVersion orders every change. Each kind keeps a bounded history of its
//! changes, which watches replay from and paginated lists rebuild their snapshot from; a
//! watch or a continue token from before the history gets `410 Expired`, which is what makes
//! a real client relist.
//!
//! Every write through the REST API records field ownership in `metadata.managedFields`
//! (an Update for a create, replace or merge patch, an Apply for a server-side apply), and a
//! server-side apply that would change another manager's field is refused with the real
//! `409 Conflict` unless forced. Writes to `/scale` are recorded on the workload with
//! `subresource: "scale"`, as servers since 1.22 do (see below).
//! [`FakeApi::apply`] writes as an Update by [`TEST_MANAGER`]; the simulated controllers
//! write as `kube-controller-manager` (a Rollout's status as `rollouts-controller`, both
//! with `subresource: "status"`).
//!
//! The modules, by concern: `store` keeps the objects and their resourceVersions, `rest`
//! parses and answers requests (routing, create, replace, patch and apply, `/scale`),
//! `managed` keeps field ownership and does server-side apply, `list` pages lists, `events`
//! validates Events, `watch` streams watches (bookmarks, `410 Expired`), `selector` holds
//! label and field selectors, and `kubelet` runs the simulated pods.
//!
//! In front of them, `gate` answers injected faults (`faults`: 429, 500, 503, 401) and, in
//! RBAC mode, authenticates bearer tokens (`auth`: 401) and authorizes each request against
//! the rendered manifests' RBAC objects (`rbac`: 403), recording which grant each request
//! used. The in-process helpers ([`FakeApi::apply`], [`FakeApi::get`], ...) and the kubelet
//! bypass all of it.
//!
//! # Checked against a real kube-apiserver
//!
//! These shapes were compared with a real kube-apiserver 1.20.2 (with etcd) through curl and
//! kubectl:
//!
//! - Matching: the apply conflict Status (`409`, reason `Conflict`, the message for one
//!   conflict and the one grouped by manager for several, `conflict with "m" using apps/v1`
//!   for an Update owner and `conflict with "m"` for an Apply owner, `details.causes` of
//!   `{reason: FieldManagerConflict, message, field}`); shared ownership when an apply keeps
//!   a value; `force` taking fields over; an Update owning only what it changed and taking
//!   it from others; a no-op write moving no resourceVersion and no entry time; managers
//!   losing fields and leaving the list when they own none; pruning of applied-then-omitted
//!   fields nobody else owns (a map left empty goes too); the entry order (Apply first, then
//!   by time and manager); the default manager (the User-Agent up to `/`, `unknown` without
//!   one); a create owning what defaulting set (the double defaults only a workload's
//!   `spec.replicas`); status left alone by writes to the main resource;
//!   `before-first-apply` and untracked updates for objects without managedFields; the 422s
//!   for an apply without `fieldManager` and for `force` on another patch; the apply 400s
//!   for a wrong apiVersion or name; the Event 422s (`Event "NAME" is invalid: message:
//!   Invalid value: "": can have at most 1024 characters` for both APIs, lengths in bytes,
//!   the required reporting fields, the qualified-name errors of `reportingController`, the
//!   namespace check of `regarding` named `involvedObject.namespace`, `eventTime` required,
//!   core v1's legacy checks); and paging: the continue token's encoding, one snapshot
//!   across pages, `remainingItemCount` only without selectors, no paging at
//!   `resourceVersion=0`, `400` for a continue with a resourceVersion, and after a
//!   compaction `410 Expired` with the real message and an inconsistent-continue token
//!   (`rv: -1`) that goes on at the latest version.
//! - Different on purpose: 1.20 records no managedFields for writes to `/scale` (an apply to
//!   `/scale` there conflicts with `before-first-apply` using autoscaling/v1); the double
//!   follows 1.22 and later, where the writer owns the workload's `.spec.replicas` with
//!   `subresource: scale` (that conflict wording, `"m" with subresource "scale" using
//!   apps/v1`, is taken from Kubernetes' source, not from a live server). 1.20 does not
//!   validate Event updates strictly; the double refuses changes to what describes an
//!   occurrence (note, reason, type, action, reporting fields) and invalid series, as later
//!   servers do.
//! - Simplified: field sets hold leaves only. Lists are owned whole (the real server owns
//!   `containers` item by item, `k:{"name":...}`), atomic structs such as `spec.selector`
//!   are owned leaf by leaf, and a map an Update adds gets no `.` entry of its own. Causes
//!   are sorted (the real order is random). An apply to `/scale` prunes nothing. A bad
//!   continue token gets other wording after `continue key is not valid:`. With a selector
//!   the last page carries no continue token, where the real server may hand out one that
//!   leads to an empty page. The simulated pods have no ReplicaSets, and their stop grace
//!   stands for a `preStop` hook.

mod auth;
mod events;
mod faults;
mod gate;
mod kubelet;
mod list;
mod managed;
mod rbac;
mod rest;
mod selector;
mod store;
mod watch;

pub use auth::{ADMIN_TOKEN, SERVICE_ACCOUNT_GROUPS, SERVICE_ACCOUNT_TOKEN, SERVICE_ACCOUNT_USER};
pub use faults::{Fault, FaultAnswer, InjectedFault};
pub use rbac::{Denied, Grant, Rbac, RbacReport, Use, rendered as render_kustomization};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use gate::Gate;
use kubelet::{pod_ip, pod_name, run_kubelet};
use managed::Writer;
use rest::{scale_of, scale_update, serve, server_side_apply};
use store::{Kind, Shared, State, Stored, default_fields};

/// The field manager of [`FakeApi::apply`]'s writes.
pub const TEST_MANAGER: &str = "test";

/// A running fake API server. Dropping it stops the server, cuts its watches and kills the
/// simulated pods.
pub struct FakeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    gate: Arc<Gate>,
    server: JoinHandle<()>,
    kubelet: Mutex<Option<JoinHandle<()>>>,
}

/// What the simulated kubelet runs as a pod.
#[derive(Clone, Debug)]
pub struct KubeletOptions {
    /// The demo backend's `--startup-delay`: how long a pod takes to become ready.
    pub startup_delay: Duration,
    /// The wakegate binary ([`crate::bin`]), run as `demo-backend`.
    pub program: PathBuf,
}

/// One simulated pod, as a test sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimPod {
    pub name: String,
    pub addr: SocketAddr,
    pub pid: u32,
    pub ready: bool,
    /// Stopped (scaled away): terminating in its EndpointSlice until its process has exited.
    pub terminating: bool,
}

/// One `metadata.managedFields` entry, as a test sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagedFields {
    pub manager: String,
    /// `"Apply"` or `"Update"`.
    pub operation: String,
    pub api_version: String,
    /// `Some("scale")` for a write through `/scale`, `Some("status")` through `/status`.
    pub subresource: Option<String>,
    /// The owned fields, as `.spec.replicas` (lists are owned whole, as one field).
    pub fields: Vec<String>,
}

impl FakeApi {
    /// Starts serving on `127.0.0.1:0`.
    pub async fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared::default());
        let gate = Arc::new(Gate::default());
        let server = tokio::spawn(serve(listener, shared.clone(), gate.clone()));
        FakeApi {
            addr,
            shared,
            gate,
            server,
            kubelet: Mutex::new(None),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, the cluster URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A `kube::Config` for this server (default namespace `default`): without credentials,
    /// or in RBAC mode with the ServiceAccount's token, like [`FakeApi::write_kubeconfig`].
    pub fn config(&self) -> kube::Config {
        let token = self.gate.rbac_enabled().then_some(SERVICE_ACCOUNT_TOKEN);
        self.config_with_token(token)
    }

    /// A `kube::Config` for this server that sends `token` as its bearer token, if any.
    pub fn config_with_token(&self, token: Option<&str>) -> kube::Config {
        let url = self.url().parse().expect("a valid URL");
        let mut config = kube::Config::new(url);
        if let Some(token) = token {
            config.auth_info = serde_json::from_value(serde_json::json!({"token": token}))
                .expect("an AuthInfo with a token");
        }
        config
    }

    /// A `kube::Client` for this server, from [`FakeApi::config`]: in RBAC mode it is
    /// wakegate's ServiceAccount.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config()).expect("a kube client")
    }

    /// A `kube::Client` as the admin (`system:masters`), whom RBAC does not restrict.
    pub fn admin_client(&self) -> kube::Client {
        kube::Client::try_from(self.config_with_token(Some(ADMIN_TOKEN))).expect("a kube client")
    }

    /// Writes `dir/kubeconfig`: this server, one context, namespace `default`, and a user
    /// without credentials or, in RBAC mode (turn it on first), with the bearer token of
    /// wakegate's ServiceAccount; returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let token = self.gate.rbac_enabled().then_some(SERVICE_ACCOUNT_TOKEN);
        self.write_kubeconfig_file(&dir.join("kubeconfig"), token)
    }

    /// Writes `dir/admin.kubeconfig`, like [`FakeApi::write_kubeconfig`] but with the admin's
    /// token; returns its path.
    pub fn write_admin_kubeconfig(&self, dir: &Path) -> PathBuf {
        self.write_kubeconfig_file(&dir.join("admin.kubeconfig"), Some(ADMIN_TOKEN))
    }

    fn write_kubeconfig_file(&self, path: &Path, token: Option<&str>) -> PathBuf {
        let user = match token {
            Some(token) => format!("{{token: {token}}}"),
            None => "{}".to_owned(),
        };
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {url}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: default
current-context: fake
users:
- name: fake
  user: {user}
",
            url = self.url()
        );
        std::fs::write(path, text).expect("write kubeconfig");
        path.to_owned()
    }

    /// RBAC mode: from now on a request needs a bearer token (else `401 Unauthorized`):
    /// wakegate's ServiceAccount's ([`SERVICE_ACCOUNT_TOKEN`], user
    /// [`SERVICE_ACCOUNT_USER`]), which `rbac` authorizes like the real RBAC authorizer
    /// (else `403 Forbidden` with the real message), or the admin's ([`ADMIN_TOKEN`]), which
    /// it does not restrict. Every request is recorded for [`FakeApi::rbac_report`]; calling
    /// it again starts a new record. E.g. `api.enforce_rbac(Rbac::from_deploy("deploy/base"))`.
    pub fn enforce_rbac(&self, rbac: Rbac) {
        self.gate.enforce(rbac);
    }

    /// What RBAC allowed, by grant, and denied since [`FakeApi::enforce_rbac`], and the
    /// ServiceAccount's grants no request used. Panics if RBAC mode is off.
    pub fn rbac_report(&self) -> RbacReport {
        self.gate
            .report()
            .expect("rbac_report needs RBAC mode: call enforce_rbac first")
    }

    /// Answers the requests that `fault` matches with its error, until it is used up or
    /// cleared; the handle counts them. Faults answer in the order injected.
    pub fn inject(&self, fault: Fault) -> InjectedFault {
        self.gate.faults.inject(fault)
    }

    /// Clears every injected fault.
    pub fn clear_faults(&self) {
        self.gate.faults.clear();
    }

    /// Creates or replaces an object of a served kind (a Namespace is accepted and ignored),
    /// as a client's create or update would: watches see ADDED or MODIFIED, and the fields it
    /// changes are owned by an Update of manager [`TEST_MANAGER`] (`"test"`). The namespace
    /// defaults to `default`, a workload's `spec.replicas` to 1, and a workload applied
    /// without `status` keeps the one it had. Returns the stored object.
    pub fn apply(&self, object: Value) -> Value {
        let (kind, mut object) = typed(object);
        if kind.is_none() {
            return object;
        }
        let kind = kind.expect("a kind");
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
        self.shared.mutate(|state| {
            let current = state.get(kind, &namespace, &name).cloned();
            default_fields(kind, &mut object);
            if object["status"].is_null()
                && let Some(current) = &current
                && !current["status"].is_null()
            {
                object["status"] = current["status"].clone();
            }
            let writer = Writer {
                manager: TEST_MANAGER,
                subresource: None,
            };
            managed::update(kind, current.as_ref(), &mut object, writer);
            state.write(kind, object)
        })
    }

    /// A server-side apply of `object` by `manager`, as `kubectl apply --server-side
    /// [--force-conflicts]` would make it: the stored object, or the error status the
    /// client would get (409 with the conflicts, unless `force`).
    pub fn server_side_apply(
        &self,
        manager: &str,
        object: Value,
        force: bool,
    ) -> Result<Value, (u16, Value)> {
        let (kind, object) = typed(object);
        let kind = kind.expect("server-side apply of a served kind");
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
        self.shared
            .mutate(|state| {
                server_side_apply(state, kind, &namespace, &name, &object, manager, force)
            })
            .map_err(|error| (error.code(), error.status()))
    }

    /// An Update of a workload's replicas through `/scale` by `manager`, as `kubectl scale`
    /// or an HPA makes it: `manager` owns `.spec.replicas` with subresource `scale`. `kind`
    /// is `"Deployment"`, `"StatefulSet"` or `"Rollout"`. Returns the Scale.
    pub fn scale_as(
        &self,
        manager: &str,
        kind: &str,
        namespace: &str,
        name: &str,
        replicas: i32,
    ) -> Value {
        let kind = workload_kind(kind);
        self.shared.mutate(|state| {
            let current = state
                .get(kind, namespace, name)
                .unwrap_or_else(|| panic!("no {} {namespace}/{name}", kind.name()))
                .clone();
            scale_of(
                kind,
                &scale_update(state, kind, &current, replicas, manager),
            )
        })
    }

    /// The `metadata.managedFields` of an object, in the server's order.
    pub fn managed_fields(&self, kind: &str, namespace: &str, name: &str) -> Vec<ManagedFields> {
        let Some(object) = self.get(kind, namespace, name) else {
            return Vec::new();
        };
        managed::entries(&object)
            .into_iter()
            .map(|entry| ManagedFields {
                fields: entry.field_names(),
                manager: entry.manager,
                operation: format!("{:?}", entry.operation),
                api_version: entry.api_version,
                subresource: entry.subresource,
            })
            .collect()
    }

    /// (manager, operation, subresource) of each managedFields entry of an object.
    pub fn managers(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Vec<(String, String, Option<String>)> {
        self.managed_fields(kind, namespace, name)
            .into_iter()
            .map(|m| (m.manager, m.operation, m.subresource))
            .collect()
    }

    /// The managers owning `field` (as `.spec.replicas`) of an object.
    pub fn owners(&self, kind: &str, namespace: &str, name: &str, field: &str) -> Vec<String> {
        let Some(object) = self.get(kind, namespace, name) else {
            return Vec::new();
        };
        managed::entries(&object)
            .into_iter()
            .filter(|entry| entry.owns(field))
            .map(|entry| entry.manager)
            .collect()
    }

    /// Deletes an object (watches see DELETED); false if there was none.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        self.shared.mutate(|state| {
            Kind::named(kind)
                .iter()
                .any(|&kind| state.remove(kind, namespace, name).is_some())
        })
    }

    /// The stored object, `kind` being e.g. `"Service"`, `"StatefulSet"` or `"Lease"`
    /// (`"Event"` finds both events.k8s.io and core events).
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let state = self.shared.state();
        Kind::named(kind)
            .iter()
            .find_map(|&kind| state.get(kind, namespace, name).cloned())
    }

    /// A Deployment's `spec.replicas`.
    pub fn deployment_replicas(&self, namespace: &str, name: &str) -> Option<i32> {
        self.replicas("Deployment", namespace, name)
    }

    /// A workload's `spec.replicas` (`kind`: `"Deployment"`, `"StatefulSet"`, `"Rollout"`).
    pub fn replicas(&self, kind: &str, namespace: &str, name: &str) -> Option<i32> {
        let object = self.get(kind, namespace, name)?;
        object["spec"]["replicas"]
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
    }

    /// Every accepted write through the API to a workload's `/scale` (PATCH or PUT) that
    /// named a replica count, in order: (field manager, replicas). The manager is `""` when the
    /// request named none.
    pub fn scale_patches(&self, namespace: &str, name: &str) -> Vec<(String, i32)> {
        self.shared
            .state()
            .scale_patches
            .iter()
            .filter(|p| p.namespace == namespace && p.name == name)
            .map(|p| (p.manager.clone(), p.replicas))
            .collect()
    }

    /// Every stored Event (events.k8s.io/v1 and core v1), oldest first.
    pub fn events(&self) -> Vec<Value> {
        let state = self.shared.state();
        let mut events: Vec<&Stored> = state
            .objects
            .iter()
            .filter(|((kind, _, _), _)| matches!(kind, Kind::Event | Kind::CoreEvent))
            .map(|(_, stored)| stored)
            .collect();
        events.sort_by_key(|stored| stored.created);
        events.into_iter().map(|s| s.object.clone()).collect()
    }

    /// `METHOD /path?query` of every request received so far, outages included.
    pub fn requests(&self) -> Vec<String> {
        self.shared.state().requests.clone()
    }

    /// An outage: while down, every request gets its connection closed without an answer and
    /// every open watch is cut. Back up, clients resume (the history is kept).
    pub fn set_down(&self, down: bool) {
        self.shared.mutate(|state| state.down = down);
    }

    /// Forgets every kind's change history, as a compaction would: open watches get
    /// `410 Expired` and end, and so does any watch resuming from before now, so clients
    /// relist.
    pub fn expire_watch_history(&self) {
        self.shared.mutate(State::expire_history);
    }

    /// Starts the simulated kubelet (once): for each workload (Deployment, StatefulSet or
    /// Rollout) it keeps `spec.replicas` pods running as `demo-backend` processes on
    /// 127.0.0.2, 127.0.0.3, … and one free port per workload, publishes them in an
    /// EndpointSlice `{service}-sim` for every Service whose selector matches the pod
    /// template, and keeps the workload's status up to date. A pod scaled away stays in the
    /// slice as terminating (`ready: false, serving: true, terminating: true`) for the stop
    /// grace ([`FakeApi::set_stop_grace`]) and until its process has exited after SIGTERM.
    pub fn start_kubelet(&self, options: KubeletOptions) {
        assert!(
            options.program.exists(),
            "kubelet program {} exists",
            options.program.display()
        );
        let mut kubelet = self.kubelet.lock().unwrap_or_else(|e| e.into_inner());
        assert!(kubelet.is_none(), "the kubelet is already running");
        *kubelet = Some(tokio::spawn(run_kubelet(self.shared.clone(), options)));
    }

    /// How long a pod scaled away keeps running (terminating in its EndpointSlice) before it
    /// gets SIGTERM, like a `preStop` hook; 200 ms unless set. (A setter, not a
    /// [`KubeletOptions`] field, so existing option literals stay valid.)
    pub fn set_stop_grace(&self, grace: Duration) {
        self.shared.kubelet().stop_grace = grace;
    }

    /// The simulated pods of the workload `name` (of any kind), by pod index, those being
    /// stopped included (`terminating`) until their process has exited.
    pub fn pods(&self, namespace: &str, name: &str) -> Vec<SimPod> {
        let kubelet = self.shared.kubelet();
        let mut pods: Vec<(u8, SimPod)> = Vec::new();
        for ((kind, ns, workload), sim) in &kubelet.workloads {
            if ns != namespace || workload != name {
                continue;
            }
            pods.extend(sim.pods.iter().map(|(&index, pod)| {
                let pod = SimPod {
                    name: pod_name(*kind, workload, index),
                    addr: SocketAddr::new(pod_ip(index).into(), sim.port),
                    pid: pod.pid,
                    ready: pod.ready,
                    terminating: false,
                };
                (index, pod)
            }));
        }
        for stopping in &kubelet.stopping {
            let (kind, ns, workload) = &stopping.workload;
            if ns != namespace || workload != name {
                continue;
            }
            let pod = SimPod {
                name: pod_name(*kind, workload, stopping.index),
                addr: SocketAddr::new(pod_ip(stopping.index).into(), stopping.port),
                pid: stopping.process.pid,
                ready: stopping.process.ready,
                terminating: true,
            };
            pods.push((stopping.index, pod));
        }
        pods.sort_by_key(|(index, _)| *index);
        pods.into_iter().map(|(_, pod)| pod).collect()
    }
}

/// The kind of a manifest, and the manifest with its namespace defaulted; no kind for a
/// Namespace.
fn typed(object: Value) -> (Option<Kind>, Value) {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind_name = object["kind"].as_str().unwrap_or_default();
    if kind_name == "Namespace" {
        return (None, object);
    }
    let kind = Kind::from_type(api_version, kind_name)
        .unwrap_or_else(|| panic!("the fake API server does not serve {api_version} {kind_name}"));
    let mut object = object;
    if object["metadata"]["namespace"].as_str().is_none() {
        object["metadata"]["namespace"] = "default".into();
    }
    assert!(
        object["metadata"]["name"].is_string(),
        "a manifest needs metadata.name: {object}"
    );
    (Some(kind), object)
}

fn workload_kind(name: &str) -> Kind {
    Kind::named(name)
        .into_iter()
        .find(|k| k.is_workload())
        .unwrap_or_else(|| panic!("{name} is not a workload kind"))
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.shared.mutate(|state| state.closed = true);
        self.server.abort();
        if let Some(kubelet) = self
            .kubelet
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            kubelet.abort();
        }
        let mut kubelet = self.shared.kubelet();
        let pods = std::mem::take(&mut kubelet.workloads)
            .into_values()
            .flat_map(|sim| sim.pods.into_values());
        let stopping = std::mem::take(&mut kubelet.stopping)
            .into_iter()
            .map(|pod| pod.process);
        for mut pod in pods.chain(stopping) {
            let _ = pod.child.start_kill();
        }
    }
}
