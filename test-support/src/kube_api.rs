//! A Kubernetes API server test double that the real `kube` client talks to over HTTP: the
//! REST and watch protocol (JSON only) for Services, EndpointSlices, Deployments and their
//! `/scale`, Leases and Events, and a simulated kubelet that runs a Deployment's pods as local
//! demo backends on loopback addresses and publishes them in EndpointSlices.
//!
//! One global resourceVersion orders every change. Each kind keeps a bounded history of its
//! changes, which watches replay from; a watch from before the history gets `410 Expired`,
//! which is what makes a real client relist.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Changes kept per kind for watches to resume from.
const HISTORY_LIMIT: usize = 1000;
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// A watch without `timeoutSeconds` ends after this long (the real server picks 30–60 min).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// How often the kubelet polls pods for readiness (and the API for changes it missed).
const KUBELET_TICK: Duration = Duration::from_millis(20);
/// SIGTERM, then SIGKILL after this long.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// `endpointslice.kubernetes.io/managed-by` of the slices the simulated kubelet maintains.
const SLICE_MANAGER: &str = "kubelet-sim.wakegate.test";

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// A running fake API server. Dropping it stops the server, cuts its watches and kills the
/// simulated pods.
pub struct FakeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
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
}

impl FakeApi {
    /// Starts serving on `127.0.0.1:0`.
    pub async fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared::default());
        let server = tokio::spawn(serve(listener, shared.clone()));
        FakeApi {
            addr,
            shared,
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

    /// A `kube::Client` for this server (default namespace `default`).
    pub fn client(&self) -> kube::Client {
        let url = self.url().parse().expect("a valid URL");
        kube::Client::try_from(kube::Config::new(url)).expect("a kube client")
    }

    /// Writes `dir/kubeconfig`: this server, one context, a user without credentials, and
    /// namespace `default`; returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
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
  user: {{}}
",
            url = self.url()
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Creates or replaces an object of a served kind (a Namespace is accepted and ignored),
    /// as a client's create or update would: watches see ADDED or MODIFIED. The namespace
    /// defaults to `default`, a Deployment's `spec.replicas` to 1, and a Deployment applied
    /// without `status` keeps the one it had. Returns the stored object.
    pub fn apply(&self, object: Value) -> Value {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind_name = object["kind"].as_str().unwrap_or_default();
        if kind_name == "Namespace" {
            return object;
        }
        let kind = Kind::from_type(api_version, kind_name).unwrap_or_else(|| {
            panic!("the fake API server does not serve {api_version} {kind_name}")
        });
        let mut object = object;
        if object["metadata"]["namespace"].as_str().is_none() {
            object["metadata"]["namespace"] = "default".into();
        }
        assert!(
            object["metadata"]["name"].is_string(),
            "apply needs metadata.name: {object}"
        );
        self.shared.mutate(|state| state.write(kind, object))
    }

    /// Deletes an object (watches see DELETED); false if there was none.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        self.shared.mutate(|state| {
            Kind::named(kind)
                .iter()
                .any(|&kind| state.remove(kind, namespace, name).is_some())
        })
    }

    /// The stored object, `kind` being e.g. `"Service"` or `"Lease"` (`"Event"` finds both
    /// events.k8s.io and core events).
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let state = self.shared.state();
        Kind::named(kind)
            .iter()
            .find_map(|&kind| state.get(kind, namespace, name).cloned())
    }

    /// A Deployment's `spec.replicas`.
    pub fn deployment_replicas(&self, namespace: &str, name: &str) -> Option<i32> {
        let object = self.get("Deployment", namespace, name)?;
        object["spec"]["replicas"]
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
    }

    /// Every write to a Deployment's `/scale` (PATCH or PUT) that named a replica count, in
    /// order: (field manager, replicas). The manager is `""` when the request named none.
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

    /// Starts the simulated kubelet (once): for each Deployment it keeps `spec.replicas` pods
    /// running as `demo-backend` processes on 127.0.0.2, 127.0.0.3, … and one free port per
    /// Deployment, publishes them in an EndpointSlice `{service}-sim` for every Service whose
    /// selector matches the pod template, and keeps the Deployment's status up to date.
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

    /// The simulated pods of a Deployment, by pod index.
    pub fn pods(&self, namespace: &str, deployment: &str) -> Vec<SimPod> {
        let kubelet = self.shared.kubelet();
        let key = (namespace.to_owned(), deployment.to_owned());
        let Some(sim) = kubelet.deployments.get(&key) else {
            return Vec::new();
        };
        sim.pods
            .iter()
            .map(|(&index, pod)| SimPod {
                name: pod_name(deployment, index),
                addr: SocketAddr::new(pod_ip(index).into(), sim.port),
                pid: pod.pid,
                ready: pod.ready,
            })
            .collect()
    }
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
        let pods = std::mem::take(&mut kubelet.deployments)
            .into_values()
            .flat_map(|sim| sim.pods.into_values())
            .map(|pod| pod.child);
        let stopping = std::mem::take(&mut kubelet.stopping)
            .into_iter()
            .map(|(child, _)| child);
        for mut child in pods.chain(stopping) {
            let _ = child.start_kill();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Kinds and stored state

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Service,
    EndpointSlice,
    Deployment,
    Lease,
    /// events.k8s.io/v1
    Event,
    /// core v1 Event
    CoreEvent,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Deployment,
        Kind::Lease,
        Kind::Event,
        Kind::CoreEvent,
    ];

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::CoreEvent => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Deployment => "apps/v1",
            Kind::Lease => "coordination.k8s.io/v1",
            Kind::Event => "events.k8s.io/v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Deployment => "Deployment",
            Kind::Lease => "Lease",
            Kind::Event | Kind::CoreEvent => "Event",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Deployment => "deployments",
            Kind::Lease => "leases",
            Kind::Event | Kind::CoreEvent => "events",
        }
    }

    /// `leases.coordination.k8s.io`, as the real server names a resource in its messages.
    fn qualified(self) -> String {
        match self.api_version().split_once('/') {
            Some((group, _)) => format!("{}.{group}", self.plural()),
            None => self.plural().to_owned(),
        }
    }

    fn from_resource(api_version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.plural() == plural)
    }

    fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.name() == kind)
    }

    /// The kinds a test means by a kind name or plural, case-insensitively.
    fn named(name: &str) -> Vec<Kind> {
        let kinds: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| k.name().eq_ignore_ascii_case(name) || k.plural() == name)
            .collect();
        assert!(!kinds.is_empty(), "the fake API server has no kind {name}");
        kinds
    }
}

type Key = (Kind, String, String);

struct Stored {
    object: Value,
    /// The resourceVersion that created it, to list events in order.
    created: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ChangeType {
    Added,
    Modified,
    Deleted,
}

struct Change {
    rv: u64,
    change: ChangeType,
    object: Value,
    /// The object before a modification, so a filtered watch can tell an object that left
    /// (or entered) its selection.
    previous: Option<Value>,
}

#[derive(Default)]
struct History {
    /// Every change after this resourceVersion is in `changes`.
    start: u64,
    changes: VecDeque<Change>,
}

struct ScalePatch {
    namespace: String,
    name: String,
    manager: String,
    replicas: i32,
}

#[derive(Default)]
struct State {
    rv: u64,
    uids: u64,
    objects: BTreeMap<Key, Stored>,
    history: [History; Kind::ALL.len()],
    down: bool,
    closed: bool,
    requests: Vec<String>,
    scale_patches: Vec<ScalePatch>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Bumped after every mutation; watches and the kubelet wait on it.
    changed: watch::Sender<u64>,
    kubelet: Mutex<Kubelet>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kubelet(&self) -> MutexGuard<'_, Kubelet> {
        self.kubelet.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the state, then wakes every watch.
    fn mutate<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let result = f(&mut self.state());
        self.changed.send_modify(|n| *n += 1);
        result
    }
}

impl State {
    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(kind, namespace.to_owned(), name.to_owned()))
            .map(|s| &s.object)
    }

    /// Stores `object` (create or replace) with fresh server-set metadata, and records the
    /// change. The caller has checked preconditions.
    fn write(&mut self, kind: Kind, mut object: Value) -> Value {
        object["apiVersion"] = kind.api_version().into();
        object["kind"] = kind.name().into();
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let key = (
            kind,
            str_at(&object, "/metadata/namespace").to_owned(),
            str_at(&object, "/metadata/name").to_owned(),
        );
        let rv = self.bump();
        let (previous, created) = match self.objects.get(&key) {
            Some(stored) => (Some(stored.object.clone()), stored.created),
            None => (None, rv),
        };
        let tracks_generation = kind == Kind::Deployment;
        match &previous {
            Some(previous) => {
                for field in ["uid", "creationTimestamp"] {
                    object["metadata"][field] = previous["metadata"][field].clone();
                }
                if tracks_generation {
                    let generation = previous["metadata"]["generation"].as_i64().unwrap_or(1);
                    let spec_changed = previous["spec"] != object["spec"];
                    object["metadata"]["generation"] =
                        (generation + i64::from(spec_changed)).into();
                    if object["status"].is_null() && !previous["status"].is_null() {
                        object["status"] = previous["status"].clone();
                    }
                }
            }
            None => {
                self.uids += 1;
                object["metadata"]["uid"] =
                    format!("00000000-0000-4000-8000-{:012x}", self.uids).into();
                object["metadata"]["creationTimestamp"] = now_rfc3339().into();
                if tracks_generation {
                    object["metadata"]["generation"] = 1.into();
                }
            }
        }
        if kind == Kind::Deployment && object["spec"]["replicas"].is_null() {
            object["spec"]["replicas"] = 1.into();
        }
        object["metadata"]["resourceVersion"] = rv.to_string().into();
        let change = if previous.is_some() {
            ChangeType::Modified
        } else {
            ChangeType::Added
        };
        self.objects.insert(
            key,
            Stored {
                object: object.clone(),
                created,
            },
        );
        self.record(kind, rv, change, object.clone(), previous);
        object
    }

    /// `write`, unless the stored object already has this content; true if it wrote.
    fn write_if_changed(&mut self, kind: Kind, object: Value) -> bool {
        let namespace = str_at(&object, "/metadata/namespace");
        let name = str_at(&object, "/metadata/name");
        if let Some(stored) = self.get(kind, namespace, name)
            && without_server_fields(stored) == without_server_fields(&object)
        {
            return false;
        }
        self.write(kind, object);
        true
    }

    fn remove(&mut self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let stored = self
            .objects
            .remove(&(kind, namespace.to_owned(), name.to_owned()))?;
        let rv = self.bump();
        let mut object = stored.object;
        object["metadata"]["resourceVersion"] = rv.to_string().into();
        self.record(kind, rv, ChangeType::Deleted, object.clone(), None);
        Some(object)
    }

    fn record(
        &mut self,
        kind: Kind,
        rv: u64,
        change: ChangeType,
        object: Value,
        previous: Option<Value>,
    ) {
        let history = &mut self.history[kind as usize];
        history.changes.push_back(Change {
            rv,
            change,
            object,
            previous,
        });
        if history.changes.len() > HISTORY_LIMIT
            && let Some(dropped) = history.changes.pop_front()
        {
            history.start = dropped.rv;
        }
    }

    /// A compaction: the version moves on, and no watch can resume from before it.
    fn expire_history(&mut self) {
        let rv = self.bump();
        for history in &mut self.history {
            history.changes.clear();
            history.start = rv;
        }
    }

    fn list(&self, kind: Kind, filter: &Filter) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((k, _, _), stored)| *k == kind && filter.matches(&stored.object))
            .map(|(_, stored)| stored.object.clone())
            .collect()
    }
}

/// The object without what the server sets, to compare content.
fn without_server_fields(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(meta) = object["metadata"].as_object_mut() {
        for field in ["resourceVersion", "uid", "creationTimestamp", "generation"] {
            meta.remove(field);
        }
    }
    if let Some(object) = object.as_object_mut() {
        object.remove("apiVersion");
        object.remove("kind");
    }
    object
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

// ---------------------------------------------------------------------------------------
// Selectors

/// What a list or watch selects: a namespace, labels and fields.
#[derive(Clone, Default)]
struct Filter {
    namespace: Option<String>,
    labels: Vec<LabelRequirement>,
    fields: Vec<(String, bool, String)>,
}

#[derive(Clone)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Filter {
    fn from_query(namespace: Option<&str>, query: &Query) -> Result<Filter, ApiError> {
        let labels = match query.get("labelSelector") {
            Some(selector) => parse_label_selector(selector).map_err(ApiError::bad_request)?,
            None => Vec::new(),
        };
        let mut fields = Vec::new();
        for term in query
            .get("fieldSelector")
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: {term}"
                )));
            };
            if !matches!(field.trim(), "metadata.name" | "metadata.namespace") {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {}",
                    field.trim()
                )));
            }
            fields.push((field.trim().to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Filter {
            namespace: namespace.map(str::to_owned),
            labels,
            fields,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        let namespace = str_at(object, "/metadata/namespace");
        if self.namespace.as_deref().is_some_and(|ns| ns != namespace) {
            return false;
        }
        let fields_match = self.fields.iter().all(|(field, equal, value)| {
            let actual = match field.as_str() {
                "metadata.name" => str_at(object, "/metadata/name"),
                _ => namespace,
            };
            (actual == value) == *equal
        });
        let labels = &object["metadata"]["labels"];
        let label = |key: &str| labels[key].as_str();
        fields_match
            && self.labels.iter().all(|requirement| match requirement {
                LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
                LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
                LabelRequirement::Exists(k) => label(k).is_some(),
                LabelRequirement::NotExists(k) => label(k).is_none(),
                LabelRequirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
                LabelRequirement::NotIn(k, vs) => {
                    !label(k).is_some_and(|l| vs.iter().any(|v| v == l))
                }
            })
    }
}

/// `a=b,c!=d,e,!f,g in (h,i),j notin (k)`.
fn parse_label_selector(selector: &str) -> Result<Vec<LabelRequirement>, String> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    let owned = |s: &str| s.trim().to_owned();
    let mut requirements = Vec::new();
    for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
        let requirement = if let Some((head, values)) = term.split_once('(') {
            let values: Vec<String> = values
                .trim_end()
                .strip_suffix(')')
                .ok_or_else(|| format!("unclosed set in label selector: {term}"))?
                .split(',')
                .map(owned)
                .collect();
            match head.split_whitespace().collect::<Vec<_>>().as_slice() {
                [key, "in"] => LabelRequirement::In(owned(key), values),
                [key, "notin"] => LabelRequirement::NotIn(owned(key), values),
                _ => return Err(format!("invalid label selector term: {term}")),
            }
        } else if let Some((k, v)) = term.split_once("!=") {
            LabelRequirement::NotEquals(owned(k), owned(v))
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            LabelRequirement::Equals(owned(k), owned(v))
        } else if let Some(k) = term.strip_prefix('!') {
            LabelRequirement::NotExists(owned(k))
        } else {
            LabelRequirement::Exists(owned(term))
        };
        requirements.push(requirement);
    }
    Ok(requirements)
}

// ---------------------------------------------------------------------------------------
// HTTP

struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn not_found(kind: Kind, name: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} \"{name}\" not found", kind.qualified()),
        )
    }

    fn conflict(kind: Kind, name: &str) -> ApiError {
        ApiError::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                kind.qualified()
            ),
        )
    }

    fn status(&self) -> Value {
        status_json(self.code.as_u16(), self.reason, &self.message)
    }
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "reason": reason,
        "code": code,
        "message": message,
    })
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let body = Full::new(Bytes::from(value.to_string()))
        .map_err(|never| match never {})
        .boxed_unsync();
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("a valid response")
}

/// Query parameters, percent-decoded.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: &str) -> Query {
        Query(
            query
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    {
        let mut state = shared.state();
        let line = if query.is_empty() {
            format!("{method} {path}")
        } else {
            format!("{method} {path}?{query}")
        };
        state.requests.push(line);
        if state.down || state.closed {
            // Failing the service closes the connection without a response.
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the fake API server is down",
            ));
        }
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let request = ApiRequest {
        method,
        query: Query::parse(&query),
        content_type,
        body,
    };
    Ok(match route(&shared, &path, &request) {
        Ok(response) => response,
        Err(error) => json_response(error.code, &error.status()),
    })
}

struct ApiRequest {
    method: Method,
    query: Query,
    content_type: String,
    body: Bytes,
}

impl ApiRequest {
    fn json(&self) -> Result<Value, ApiError> {
        let value: Value = serde_json::from_slice(&self.body)
            .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
        if value.is_object() {
            Ok(value)
        } else {
            Err(ApiError::bad_request("the body is not a JSON object"))
        }
    }
}

fn route(shared: &Arc<Shared>, path: &str, req: &ApiRequest) -> Result<Response<Body>, ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        )
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if segments == ["version"] && req.method == Method::GET {
        return Ok(json_response(StatusCode::OK, &version()));
    }
    let (api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return Err(not_found()),
    };
    let (namespace, rest) = match rest {
        ["namespaces", namespace, rest @ ..] if !rest.is_empty() => (Some(*namespace), rest),
        _ => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return Err(not_found()),
    };
    let kind = Kind::from_resource(&api_version, plural).ok_or_else(not_found)?;
    let method_not_allowed = || {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{} is not supported here", req.method),
        )
    };
    match (namespace, name, subresource) {
        (_, None, None) => match req.method {
            Method::GET => {
                let filter = Filter::from_query(namespace, &req.query)?;
                if req.query.flag("watch") {
                    start_watch(shared, kind, filter, &req.query)
                } else {
                    let state = shared.state();
                    let items = state.list(kind, &filter);
                    Ok(json_response(
                        StatusCode::OK,
                        &json!({
                            "kind": format!("{}List", kind.name()),
                            "apiVersion": kind.api_version(),
                            "metadata": {"resourceVersion": state.rv.to_string()},
                            "items": items,
                        }),
                    ))
                }
            }
            Method::POST => {
                let namespace = namespace.ok_or_else(method_not_allowed)?;
                let created = shared.mutate(|s| create(s, kind, namespace, req.json()?))?;
                Ok(json_response(StatusCode::CREATED, &created))
            }
            _ => Err(method_not_allowed()),
        },
        (Some(namespace), Some(name), None) => {
            let object = match req.method {
                Method::GET => shared
                    .state()
                    .get(kind, namespace, name)
                    .cloned()
                    .ok_or_else(|| ApiError::not_found(kind, name))?,
                Method::PUT => shared.mutate(|s| replace(s, kind, namespace, name, req.json()?))?,
                Method::PATCH => shared.mutate(|s| patch(s, kind, namespace, name, req))?,
                Method::DELETE => {
                    shared
                        .mutate(|s| s.remove(kind, namespace, name))
                        .ok_or_else(|| ApiError::not_found(kind, name))?;
                    json!({
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Success",
                        "details": {"name": name, "kind": kind.plural()},
                    })
                }
                _ => return Err(method_not_allowed()),
            };
            Ok(json_response(StatusCode::OK, &object))
        }
        (Some(namespace), Some(name), Some("status")) if req.method == Method::GET => {
            let state = shared.state();
            let object = state
                .get(kind, namespace, name)
                .ok_or_else(|| ApiError::not_found(kind, name))?;
            Ok(json_response(StatusCode::OK, object))
        }
        (Some(namespace), Some(name), Some("scale")) if kind == Kind::Deployment => {
            let scale = match req.method {
                Method::GET => {
                    let state = shared.state();
                    let deployment = state
                        .get(kind, namespace, name)
                        .ok_or_else(|| ApiError::not_found(kind, name))?;
                    scale_of(deployment)
                }
                Method::PATCH | Method::PUT => {
                    shared.mutate(|s| write_scale(s, namespace, name, req))?
                }
                _ => return Err(method_not_allowed()),
            };
            Ok(json_response(StatusCode::OK, &scale))
        }
        _ => Err(not_found()),
    }
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-wakegate-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn create(
    state: &mut State,
    kind: Kind,
    namespace: &str,
    mut object: Value,
) -> Result<Value, ApiError> {
    match object["metadata"]["namespace"].as_str() {
        Some(ns) if ns != namespace => {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        _ => object["metadata"]["namespace"] = namespace.into(),
    }
    if object["metadata"]["name"]
        .as_str()
        .is_none_or(str::is_empty)
    {
        let Some(prefix) = object["metadata"]["generateName"].as_str() else {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.name or metadata.generateName is required",
            ));
        };
        let name = format!("{prefix}{:05x}", state.rv + 1);
        object["metadata"]["name"] = name.into();
    }
    let name = str_at(&object, "/metadata/name").to_owned();
    if state.get(kind, namespace, &name).is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", kind.qualified()),
        ));
    }
    Ok(state.write(kind, object))
}

fn replace(
    state: &mut State,
    kind: Kind,
    namespace: &str,
    name: &str,
    mut object: Value,
) -> Result<Value, ApiError> {
    if str_at(&object, "/metadata/name") != name {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    let current = state
        .get(kind, namespace, name)
        .ok_or_else(|| ApiError::not_found(kind, name))?;
    let wanted = str_at(&object, "/metadata/resourceVersion");
    if !wanted.is_empty() && wanted != str_at(current, "/metadata/resourceVersion") {
        return Err(ApiError::conflict(kind, name));
    }
    object["metadata"]["namespace"] = namespace.into();
    Ok(state.write(kind, object))
}

/// The patch content types: merge, strategic merge (applied as a merge patch: lists are
/// replaced, not merged by key) and server-side apply (applied as a merge patch too, without
/// field ownership).
#[derive(PartialEq)]
enum PatchType {
    Merge,
    Apply,
}

fn patch_type(req: &ApiRequest) -> Result<PatchType, ApiError> {
    match req.content_type.as_str() {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            Ok(PatchType::Merge)
        }
        "application/apply-patch+yaml" => {
            if req.query.get("fieldManager").is_none_or(str::is_empty) {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "PATCH requests with apply must set fieldManager",
                ));
            }
            Ok(PatchType::Apply)
        }
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the fake API server does not support patches of type {other:?}"),
        )),
    }
}

fn patch(
    state: &mut State,
    kind: Kind,
    namespace: &str,
    name: &str,
    req: &ApiRequest,
) -> Result<Value, ApiError> {
    let patch_type = patch_type(req)?;
    let patch = req.json()?;
    let current = match state.get(kind, namespace, name) {
        Some(current) => current.clone(),
        // Server-side apply creates what does not exist yet.
        None if patch_type == PatchType::Apply => json!({
            "metadata": {"name": name, "namespace": namespace},
        }),
        None => return Err(ApiError::not_found(kind, name)),
    };
    let wanted = str_at(&patch, "/metadata/resourceVersion");
    if !wanted.is_empty() && wanted != str_at(&current, "/metadata/resourceVersion") {
        return Err(ApiError::conflict(kind, name));
    }
    let mut merged = current.clone();
    merge_patch(&mut merged, &patch);
    for field in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "resourceVersion",
    ] {
        merged["metadata"][field] = current["metadata"][field].clone();
    }
    if state.get(kind, namespace, name).is_some() && merged == current {
        // A no-op write changes nothing, not even the resourceVersion.
        return Ok(current);
    }
    Ok(state.write(kind, merged))
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("an object");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// A PATCH or PUT of a Deployment's `/scale`: sets `spec.replicas` and records who asked.
fn write_scale(
    state: &mut State,
    namespace: &str,
    name: &str,
    req: &ApiRequest,
) -> Result<Value, ApiError> {
    let kind = Kind::Deployment;
    if req.method == Method::PATCH {
        patch_type(req)?;
    }
    let body = req.json()?;
    let current = state
        .get(kind, namespace, name)
        .ok_or_else(|| ApiError::not_found(kind, name))?
        .clone();
    let wanted = str_at(&body, "/metadata/resourceVersion");
    if !wanted.is_empty() && wanted != str_at(&current, "/metadata/resourceVersion") {
        return Err(ApiError::conflict(kind, name));
    }
    let replicas = match body.pointer("/spec/replicas") {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            value
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        format!("spec.replicas: Invalid value: {value}"),
                    )
                })?,
        ),
    };
    let Some(replicas) = replicas else {
        return Ok(scale_of(&current));
    };
    state.scale_patches.push(ScalePatch {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        manager: req.query.get("fieldManager").unwrap_or("").to_owned(),
        replicas,
    });
    if current["spec"]["replicas"].as_i64() == Some(i64::from(replicas)) {
        return Ok(scale_of(&current));
    }
    let mut deployment = current;
    deployment["spec"]["replicas"] = replicas.into();
    Ok(scale_of(&state.write(kind, deployment)))
}

/// The autoscaling/v1 Scale of a Deployment; `status.replicas` counts its ready pods.
fn scale_of(deployment: &Value) -> Value {
    let meta = &deployment["metadata"];
    let selector = deployment["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"],
            "creationTimestamp": meta["creationTimestamp"],
        },
        "spec": {"replicas": deployment["spec"]["replicas"].as_i64().unwrap_or(0)},
        "status": {
            "replicas": deployment["status"]["readyReplicas"].as_i64().unwrap_or(0),
            "selector": selector,
        },
    })
}

// ---------------------------------------------------------------------------------------
// Watch

type Frames = mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;

struct WatchSpec {
    kind: Kind,
    filter: Filter,
    /// Replay changes after this version; `None`: start with the current objects.
    from: Option<u64>,
    initial_events_end: bool,
    bookmarks: bool,
    timeout: Duration,
}

fn start_watch(
    shared: &Arc<Shared>,
    kind: Kind,
    filter: Filter,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let send_initial_events = query.flag("sendInitialEvents");
    let from = match query.get("resourceVersion").unwrap_or("") {
        "" | "0" => None,
        _ if send_initial_events => None,
        rv => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
        ),
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let spec = WatchSpec {
        kind,
        filter,
        from,
        initial_events_end: send_initial_events,
        bookmarks: query.flag("allowWatchBookmarks"),
        timeout,
    };
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(run_watch(shared.clone(), spec, tx));
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|frame| (frame, rx))
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(StreamBody::new(frames).boxed_unsync())
        .expect("a valid response"))
}

/// What a watch sends next.
enum Step {
    Lines(Vec<Value>),
    /// An outage or shutdown: the connection is cut.
    Cut,
    /// The history no longer reaches back to where the watch is: `410`, then the end.
    Expired(u64, u64),
}

async fn run_watch(shared: Arc<Shared>, spec: WatchSpec, tx: Frames) {
    let mut changes = shared.changed.subscribe();
    let deadline = Instant::now() + spec.timeout;
    let mut next_bookmark = Instant::now() + BOOKMARK_INTERVAL;
    let (mut last, initial) = {
        let state = shared.state();
        match spec.from {
            Some(from) => (from, Vec::new()),
            None => {
                let mut lines: Vec<Value> = state
                    .list(spec.kind, &spec.filter)
                    .into_iter()
                    .map(|object| json!({"type": "ADDED", "object": object}))
                    .collect();
                if spec.initial_events_end {
                    lines.push(bookmark(spec.kind, state.rv, true));
                }
                (state.rv, lines)
            }
        }
    };
    if !send_lines(&tx, initial).await {
        return;
    }
    loop {
        // Like the real server, a watch that times out sends a last bookmark first.
        let ending = Instant::now() >= deadline;
        let step = {
            let state = shared.state();
            let history = &state.history[spec.kind as usize];
            if state.down || state.closed {
                Step::Cut
            } else if last < history.start {
                Step::Expired(last, history.start)
            } else {
                let mut lines: Vec<Value> = history
                    .changes
                    .iter()
                    .filter(|change| change.rv > last)
                    .filter_map(|change| visible(change, &spec.filter))
                    .collect();
                last = state.rv;
                if spec.bookmarks && (ending || Instant::now() >= next_bookmark) {
                    lines.push(bookmark(spec.kind, state.rv, false));
                    next_bookmark = Instant::now() + BOOKMARK_INTERVAL;
                }
                Step::Lines(lines)
            }
        };
        match step {
            Step::Lines(lines) => {
                if !send_lines(&tx, lines).await {
                    return;
                }
            }
            Step::Cut => {
                let cut = std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "the fake API server went down",
                );
                let _ = tx.send(Err(cut)).await;
                return;
            }
            Step::Expired(from, start) => {
                let message = format!("too old resource version: {from} ({start})");
                let error =
                    json!({"type": "ERROR", "object": status_json(410, "Expired", &message)});
                send_lines(&tx, vec![error]).await;
                return;
            }
        }
        if ending {
            return;
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep_until(next_bookmark), if spec.bookmarks => {}
            () = tokio::time::sleep_until(deadline) => {}
            () = tx.closed() => return,
        }
    }
}

/// A change as a watch with `filter` sees it: an object that starts (or stops) matching is
/// ADDED (or DELETED) for it, like the real server does.
fn visible(change: &Change, filter: &Filter) -> Option<Value> {
    let now = filter.matches(&change.object);
    let before = change.previous.as_ref().is_some_and(|p| filter.matches(p));
    let event = match change.change {
        ChangeType::Added if now => "ADDED",
        ChangeType::Deleted if now => "DELETED",
        ChangeType::Modified if now && before => "MODIFIED",
        ChangeType::Modified if now => "ADDED",
        ChangeType::Modified if before => "DELETED",
        _ => return None,
    };
    Some(json!({"type": event, "object": change.object}))
}

fn bookmark(kind: Kind, rv: u64, initial_events_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({
        "type": "BOOKMARK",
        "object": {"kind": kind.name(), "apiVersion": kind.api_version(), "metadata": metadata},
    })
}

/// False once the client has gone.
async fn send_lines(tx: &Frames, lines: Vec<Value>) -> bool {
    for line in lines {
        let frame = Frame::data(Bytes::from(format!("{line}\n")));
        if tx.send(Ok(frame)).await.is_err() {
            return false;
        }
    }
    true
}

// ---------------------------------------------------------------------------------------
// Simulated kubelet

#[derive(Default)]
struct Kubelet {
    deployments: BTreeMap<(String, String), SimDeployment>,
    /// Sent SIGTERM, not reaped yet.
    stopping: Vec<(Child, Instant)>,
}

struct SimDeployment {
    /// Every pod of the Deployment listens on this port, each on its own loopback address.
    port: u16,
    pods: BTreeMap<u8, SimProcess>,
}

struct SimProcess {
    child: Child,
    pid: u32,
    ready: bool,
}

/// A Deployment as the kubelet needs it.
struct DeploymentView {
    key: (String, String),
    replicas: usize,
    labels: Map<String, Value>,
}

struct ServiceView {
    namespace: String,
    name: String,
    selector: Map<String, Value>,
    port_names: Vec<String>,
}

/// Pod `index` of a Deployment, as the kubelet publishes it: (index, ready).
type PodStates = BTreeMap<(String, String), (u16, Vec<(u8, bool)>)>;

fn pod_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, index + 2)
}

fn pod_name(deployment: &str, index: u8) -> String {
    format!("{deployment}-sim-{index}")
}

async fn run_kubelet(shared: Arc<Shared>, options: KubeletOptions) {
    let mut changes = shared.changed.subscribe();
    loop {
        reconcile(&shared, &options).await;
        tokio::select! {
            _ = changes.changed() => {}
            () = tokio::time::sleep(KUBELET_TICK) => {}
        }
    }
}

async fn reconcile(shared: &Shared, options: &KubeletOptions) {
    let (deployments, services) = {
        let state = shared.state();
        if state.closed {
            return;
        }
        (deployment_views(&state), service_views(&state))
    };

    // Start and stop processes to match the replica counts.
    let mut stop = Vec::new();
    let mut probe = Vec::new();
    {
        let mut kubelet = shared.kubelet();
        kubelet.deployments.retain(|key, sim| {
            let keep = deployments.iter().any(|d| &d.key == key);
            if !keep {
                stop.extend(std::mem::take(&mut sim.pods).into_values());
            }
            keep
        });
        for d in &deployments {
            let sim = kubelet
                .deployments
                .entry(d.key.clone())
                .or_insert_with(|| SimDeployment {
                    port: free_port(),
                    pods: BTreeMap::new(),
                });
            // A pod whose process exited is replaced, like a restarted container.
            sim.pods
                .retain(|_, pod| matches!(pod.child.try_wait(), Ok(None)));
            while sim.pods.len() > d.replicas {
                if let Some((_, pod)) = sim.pods.pop_last() {
                    stop.push(pod);
                }
            }
            while sim.pods.len() < d.replicas {
                let Some(index) = (0..=u8::MAX - 2).find(|i| !sim.pods.contains_key(i)) else {
                    break;
                };
                match spawn_pod(options, pod_ip(index), sim.port) {
                    Ok(pod) => {
                        sim.pods.insert(index, pod);
                    }
                    Err(error) => {
                        eprintln!("kubelet-sim: cannot start a pod: {error}");
                        break;
                    }
                }
            }
            for (&index, pod) in &sim.pods {
                if !pod.ready {
                    let addr = SocketAddr::new(pod_ip(index).into(), sim.port);
                    probe.push((d.key.clone(), index, addr));
                }
            }
        }
    }

    // Readiness: the pod accepts a TCP connection.
    let mut ready = Vec::new();
    for (key, index, addr) in probe {
        let connect = tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr));
        if let Ok(Ok(_)) = connect.await {
            ready.push((key, index));
        }
    }
    let pods: PodStates = {
        let mut kubelet = shared.kubelet();
        for (key, index) in ready {
            if let Some(pod) = kubelet
                .deployments
                .get_mut(&key)
                .and_then(|sim| sim.pods.get_mut(&index))
            {
                pod.ready = true;
            }
        }
        kubelet
            .deployments
            .iter()
            .map(|(key, sim)| {
                let pods = sim.pods.iter().map(|(&i, pod)| (i, pod.ready)).collect();
                (key.clone(), (sim.port, pods))
            })
            .collect()
    };

    // Publish, then stop: a pod leaves its EndpointSlice before it gets SIGTERM.
    let changed = {
        let mut state = shared.state();
        publish(&mut state, &deployments, &services, &pods)
    };
    if changed {
        shared.changed.send_modify(|n| *n += 1);
    }
    let mut kubelet = shared.kubelet();
    for pod in stop {
        // SAFETY: signalling a child process this kubelet started and has not reaped.
        unsafe { libc::kill(pod.pid as i32, libc::SIGTERM) };
        kubelet.stopping.push((pod.child, Instant::now()));
    }
    kubelet
        .stopping
        .retain_mut(|(child, since)| match child.try_wait() {
            Ok(None) => {
                if since.elapsed() > STOP_GRACE {
                    let _ = child.start_kill();
                }
                true
            }
            _ => false,
        });
}

fn deployment_views(state: &State) -> Vec<DeploymentView> {
    state
        .objects
        .iter()
        .filter(|((kind, _, _), _)| *kind == Kind::Deployment)
        .map(|((_, namespace, name), stored)| {
            let object = &stored.object;
            let replicas = object["spec"]["replicas"].as_u64().unwrap_or(1);
            DeploymentView {
                key: (namespace.clone(), name.clone()),
                replicas: usize::try_from(replicas).unwrap_or(usize::MAX).min(250),
                labels: object["spec"]["template"]["metadata"]["labels"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            }
        })
        .collect()
}

fn service_views(state: &State) -> Vec<ServiceView> {
    state
        .objects
        .iter()
        .filter(|((kind, _, _), _)| *kind == Kind::Service)
        .map(|((_, namespace, name), stored)| {
            let spec = &stored.object["spec"];
            ServiceView {
                namespace: namespace.clone(),
                name: name.clone(),
                selector: spec["selector"].as_object().cloned().unwrap_or_default(),
                port_names: spec["ports"]
                    .as_array()
                    .map(|ports| {
                        ports
                            .iter()
                            .map(|p| p["name"].as_str().unwrap_or("").to_owned())
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// Writes the EndpointSlices and Deployment statuses that `pods` implies; true if anything
/// changed.
fn publish(
    state: &mut State,
    deployments: &[DeploymentView],
    services: &[ServiceView],
    pods: &PodStates,
) -> bool {
    let mut changed = false;
    let mut slices = BTreeSet::new();
    for service in services {
        let selects = |d: &&DeploymentView| {
            d.key.0 == service.namespace
                && !service.selector.is_empty()
                && service
                    .selector
                    .iter()
                    .all(|(k, v)| d.labels.get(k) == Some(v))
        };
        let Some(deployment) = deployments.iter().find(selects) else {
            continue;
        };
        let Some((port, deployment_pods)) = pods.get(&deployment.key) else {
            continue;
        };
        let name = format!("{}-sim", service.name);
        let endpoints: Vec<Value> = deployment_pods
            .iter()
            .map(|&(index, ready)| {
                json!({
                    "addresses": [pod_ip(index).to_string()],
                    "conditions": {"ready": ready, "serving": ready, "terminating": false},
                    "targetRef": {
                        "kind": "Pod",
                        "namespace": service.namespace,
                        "name": pod_name(&deployment.key.1, index),
                    },
                })
            })
            .collect();
        let ports: Vec<Value> = service
            .port_names
            .iter()
            .map(|port_name| json!({"name": port_name, "port": port, "protocol": "TCP"}))
            .collect();
        let slice = json!({
            "metadata": {
                "name": name,
                "namespace": service.namespace,
                "labels": {
                    "kubernetes.io/service-name": service.name,
                    "endpointslice.kubernetes.io/managed-by": SLICE_MANAGER,
                },
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        });
        changed |= state.write_if_changed(Kind::EndpointSlice, slice);
        slices.insert((service.namespace.clone(), name));
    }
    let stale: Vec<(String, String)> = state
        .objects
        .iter()
        .filter(|((kind, ns, name), stored)| {
            *kind == Kind::EndpointSlice
                && str_at(
                    &stored.object,
                    "/metadata/labels/endpointslice.kubernetes.io~1managed-by",
                ) == SLICE_MANAGER
                && !slices.contains(&(ns.clone(), name.clone()))
        })
        .map(|((_, ns, name), _)| (ns.clone(), name.clone()))
        .collect();
    for (namespace, name) in stale {
        changed |= state
            .remove(Kind::EndpointSlice, &namespace, &name)
            .is_some();
    }
    for deployment in deployments {
        let Some((_, deployment_pods)) = pods.get(&deployment.key) else {
            continue;
        };
        let (namespace, name) = &deployment.key;
        let Some(current) = state.get(Kind::Deployment, namespace, name) else {
            continue;
        };
        let total = deployment_pods.len();
        let ready = deployment_pods.iter().filter(|(_, ready)| *ready).count();
        // Zero counts are left out, as the real server's `omitempty` does.
        let mut status = Map::new();
        status.insert(
            "observedGeneration".into(),
            current["metadata"]["generation"].clone(),
        );
        for (field, count) in [
            ("replicas", total),
            ("updatedReplicas", total),
            ("readyReplicas", ready),
            ("availableReplicas", ready),
        ] {
            if count > 0 {
                status.insert(field.into(), count.into());
            }
        }
        let status = Value::Object(status);
        if current["status"] != status {
            let mut updated = current.clone();
            updated["status"] = status;
            state.write(Kind::Deployment, updated);
            changed = true;
        }
    }
    changed
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

fn spawn_pod(options: &KubeletOptions, ip: Ipv4Addr, port: u16) -> std::io::Result<SimProcess> {
    let child = Command::new(&options.program)
        .arg("demo-backend")
        .args(["--host", &IpAddr::from(ip).to_string()])
        .args(["--port", &port.to_string()])
        .args([
            "--startup-delay",
            &format!("{}ms", options.startup_delay.as_millis()),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().unwrap_or_default();
    Ok(SimProcess {
        child,
        pid,
        ready: false,
    })
}
