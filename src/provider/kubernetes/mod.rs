//! Kubernetes: targets come from Services annotated `wakegate.io/enabled: "true"`, traffic
//! goes straight to the ready pod IPs of their EndpointSlices, and scaling writes the
//! `/scale` subresource of each Service's workload (a Deployment unless the Service names
//! another kind; see [`scale`] for who owns the count).
//!
//! Watches feed an [`index`] that marks what each event touched; only that is recomputed.
//! They resume with a short, capped backoff after errors and API-server outages (and relist
//! after `410 Expired`); the data plane keeps the last published endpoints meanwhile.
//!
//! Needs Kubernetes 1.21 or later (EndpointSlice `discovery.k8s.io/v1`). API groups used:
//! core (Services), `discovery.k8s.io` (EndpointSlices), `apps` (Deployments and the workloads'
//! `/scale`), `events.k8s.io` (Events), `coordination.k8s.io` (the Lease), and the group of
//! any other workload kind a Service names.

pub mod backoff;
mod events;
mod index;
pub mod lease;
pub mod peers;
mod scale;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Managed, Provider, Scale};
use crate::config::annotations::Outcome;
use crate::config::route::Refusal;
use crate::config::{KubeTarget, KubernetesConfig, Problem, TargetConfig};
use crate::target::{Endpoint, Phase, Target};
use events::Events;
use index::{Index, Indexed, Key};

pub const FIELD_MANAGER: &str = "wakegate";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("cannot configure the Kubernetes client: {0}")]
    Config(String),
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Builds a client from `[kubernetes]`: the named kubeconfig, else in-cluster, else the usual
/// kubeconfig lookup.
pub async fn client(config: &KubernetesConfig) -> Result<Client, KubeError> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| KubeError::Config(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Config(e.to_string()))?,
    };
    Ok(Client::try_from(kube_config)?)
}

/// A discovered target this replica routes to.
struct Routed {
    target: Arc<Target>,
    workload: KubeTarget,
    /// Endpoints by authority, so an address that stays keeps its in-flight count.
    endpoints: BTreeMap<String, Arc<Endpoint>>,
}

/// The provider's state, behind one lock that only the control plane takes.
#[derive(Default)]
struct State {
    index: Index,
    /// By (namespace, Service name).
    routed: HashMap<Key, Routed>,
    /// Refused routes already reported, as (namespace, Service, refusal).
    refusals: HashSet<(String, String, String)>,
}

/// The Kubernetes provider: watches, the lease, the peers' signal; cheap to clone.
#[derive(Clone)]
pub struct KubernetesProvider {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    config: KubernetesConfig,
    state: Mutex<State>,
    /// Wakes the recompute loop after any watched change.
    changed: Arc<Notify>,
    /// True until this replica loses (or never wins) the lease; always true without one.
    leader: Arc<AtomicBool>,
    events: Events,
    counters: Counters,
    peer_signal: Arc<peers::PeerSignal>,
}

/// What the provider counts, in `/metrics`.
#[derive(Debug, Clone, Default)]
struct Counters {
    invalid_annotations: Arc<AtomicU64>,
    /// By the other field manager and what wakegate did: `overridden` or `yielded`.
    scale_conflicts: Family<Vec<(String, String)>, Counter>,
    /// By reason.
    scale_failures: Family<Vec<(String, String)>, Counter>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").finish_non_exhaustive()
    }
}

/// Replica identity for the lease and events: `POD_NAME`, else host name and pid.
pub fn identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        })
}

/// A running provider and what it reports.
pub struct Started {
    pub provider: KubernetesProvider,
    /// The discovered targets, oldest Service first, on every change; `None` until every
    /// watch has listed once.
    pub targets: watch::Receiver<Option<Arc<Vec<TargetConfig>>>>,
    /// End after `stop` is cancelled.
    pub tasks: Vec<JoinHandle<()>>,
}

impl KubernetesProvider {
    /// The other replicas' signal, and the notices of held requests taken from them.
    pub fn peer_signal(&self) -> Arc<peers::PeerSignal> {
        self.inner.peer_signal.clone()
    }

    /// Starts the watches, the lease and the peer scraping, and registers the provider's own
    /// metrics in `registry`. Peers are scraped by the leader only, or by every replica with
    /// `sum_on_every_replica`.
    pub fn start(
        client: Client,
        config: KubernetesConfig,
        registry: &mut Registry,
        sum_on_every_replica: bool,
        stop: CancellationToken,
    ) -> Started {
        let identity = identity();
        let leader = Arc::new(AtomicBool::new(config.lease.is_none()));
        let counters = Counters::default();
        registry.register(
            "wakegate_kubernetes_scale_conflicts",
            "Server-side applies of spec.replicas that met another field manager, by manager and what wakegate did (overridden: took over from an updater; yielded: left a declared count alone).",
            counters.scale_conflicts.clone(),
        );
        registry.register(
            "wakegate_kubernetes_scale_failures",
            "Failed attempts to read or write a workload's /scale, by reason (not_found, forbidden, conflict, throttled, api).",
            counters.scale_failures.clone(),
        );
        registry.register_collector(Box::new(Collector {
            leader: leader.clone(),
            invalid_annotations: counters.invalid_annotations.clone(),
        }));
        // A replica that KEDA may ask tells the others of its held requests at once.
        let (peer_signal, notices) =
            peers::PeerSignal::new(sum_on_every_replica && config.peers.is_some(), registry);
        let peer_signal = Arc::new(peer_signal);
        let inner = Arc::new(Inner {
            client: client.clone(),
            config: config.clone(),
            state: Mutex::new(State::default()),
            changed: Arc::new(Notify::new()),
            leader: leader.clone(),
            events: Events::new(client.clone(), identity.clone(), leader.clone()),
            counters,
            peer_signal: peer_signal.clone(),
        });

        let scopes: Vec<Option<String>> = if config.namespaces.is_empty() {
            vec![None]
        } else {
            config.namespaces.iter().cloned().map(Some).collect()
        };
        let mut tasks = Vec::new();
        let mut synced = Vec::new();
        for scope in &scopes {
            let scope = scope.as_deref();
            synced.push(inner.watch::<Service>(scope, &stop, &mut tasks));
            synced.push(inner.watch::<EndpointSlice>(scope, &stop, &mut tasks));
            synced.push(inner.watch::<Deployment>(scope, &stop, &mut tasks));
        }
        if let Some(lease) = config.lease.clone() {
            tasks.push(tokio::spawn(lease::run(
                client.clone(),
                lease,
                identity,
                leader,
                stop.clone(),
            )));
        }
        if let Some(peers) = config.peers.clone() {
            tasks.push(tokio::spawn(peers::run(
                client.clone(),
                peers,
                inner.leader.clone(),
                sum_on_every_replica,
                peer_signal,
                notices,
                stop.clone(),
            )));
        }

        let (targets_tx, targets_rx) = watch::channel(None);
        let looping = inner.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => return,
                () = async { for mut s in synced { let _ = s.wait_for(|done| *done).await; } } => {}
            }
            tracing::info!("Kubernetes watches synced");
            let mut reported: HashSet<(String, String, String)> = HashSet::new();
            let mut first = true;
            // A replica that becomes leader records the Events of what is still wrong.
            let mut was_leader = looping.leader.load(Ordering::Relaxed);
            let mut leadership = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                let dirty = std::mem::take(&mut looping.state().index.dirty);
                let leader = looping.leader.load(Ordering::Relaxed);
                let became_leader = leader && !was_leader;
                was_leader = leader;
                if became_leader {
                    let refusals = looping.state().refusals.clone();
                    looping.clone().record_refusals(refusals);
                }
                if dirty.services || first || became_leader {
                    first = false;
                    let discovered = looping.discover(&mut reported).await;
                    targets_tx.send_if_modified(|current| {
                        let changed = current.as_deref() != Some(&discovered);
                        if changed {
                            *current = Some(Arc::new(discovered));
                        }
                        changed
                    });
                }
                looping.publish(&dirty.endpoints, &dirty.deployments);
                tokio::select! {
                    () = looping.changed.notified() => {}
                    _ = leadership.tick(), if looping.config.lease.is_some() => {}
                    () = stop.cancelled() => return,
                }
            }
        }));
        Started {
            provider: KubernetesProvider { inner },
            targets: targets_rx,
            tasks,
        }
    }

    /// The routes discovered targets were refused (by an earlier claim or the host policy):
    /// each new one is logged and recorded as a Warning Event on its Service, once.
    pub fn report_refusals(&self, refused: &[(Arc<Target>, Vec<Refusal>)]) {
        let now: HashSet<(String, String, String)> = refused
            .iter()
            .flat_map(|(t, list)| {
                list.iter()
                    .map(|r| (t.namespace.clone(), t.name.clone(), r.to_string()))
            })
            .collect();
        let before = std::mem::replace(&mut self.inner.state().refusals, now.clone());
        for (namespace, service, refusal) in now.difference(&before) {
            tracing::warn!(%namespace, %service, route = %refusal, "route refused");
        }
        self.inner.clone().record_refusals(now);
    }
}

impl Inner {
    /// Records a Warning Event for each refused route (once; the leader only).
    fn record_refusals(self: Arc<Self>, refusals: HashSet<(String, String, String)>) {
        if refusals.is_empty() || !self.leader.load(Ordering::Relaxed) {
            return;
        }
        tokio::spawn(async move {
            for (namespace, service, refusal) in refusals {
                let note = format!("wakegate does not route {refusal}");
                self.events
                    .warn(
                        &service_ref(&namespace, &service),
                        "RouteRefused",
                        "Route",
                        &note,
                    )
                    .await;
            }
        });
    }
}

fn service_ref(namespace: &str, name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("not poisoned")
    }

    /// Watches every `K` in `namespace` (all namespaces when `None`) into the index; the
    /// receiver turns true once it has listed.
    fn watch<K>(
        self: &Arc<Self>,
        namespace: Option<&str>,
        stop: &CancellationToken,
        tasks: &mut Vec<JoinHandle<()>>,
    ) -> watch::Receiver<bool>
    where
        K: Indexed
            + kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let api: Api<K> = match namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let (synced_tx, synced) = watch::channel(false);
        let stream = watcher(api, watcher::Config::default()).backoff(backoff::watch_retry());
        let inner = self.clone();
        let stop = stop.clone();
        let scope = namespace.map(str::to_owned);
        let kind = K::kind(&());
        tasks.push(tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            // Keys seen since the current (re)list began; what is not among them at its end
            // was deleted meanwhile.
            let mut listing: Option<HashSet<Key>> = None;
            loop {
                let event = tokio::select! {
                    next = stream.next() => match next {
                        Some(Ok(event)) => event,
                        Some(Err(error)) => {
                            tracing::warn!(%kind, %error, "watch failed; retrying with backoff");
                            continue;
                        }
                        None => return,
                    },
                    () = stop.cancelled() => return,
                };
                {
                    let mut state = inner.state();
                    let index = &mut state.index;
                    match event {
                        watcher::Event::Init => listing = Some(HashSet::new()),
                        watcher::Event::InitApply(object) => {
                            K::upsert(index, &object);
                            if let (Some(seen), Some(ns), Some(name)) = (
                                &mut listing,
                                object.meta().namespace.clone(),
                                object.meta().name.clone(),
                            ) {
                                seen.insert((ns, name));
                            }
                        }
                        watcher::Event::InitDone => {
                            let seen = listing.take().unwrap_or_default();
                            for key in K::keys(index, scope.as_deref()) {
                                if !seen.contains(&key) {
                                    K::remove_key(index, &key);
                                }
                            }
                            synced_tx.send_replace(true);
                        }
                        watcher::Event::Apply(object) => K::upsert(index, &object),
                        watcher::Event::Delete(object) => K::remove(index, &object),
                    }
                }
                inner.changed.notify_one();
            }
        }));
        synced
    }

    /// Every opted-in Service as a target, oldest first (then by namespace and name): the
    /// order in which they claim hosts. Problems are logged, counted and sent as Events once
    /// per Service version.
    async fn discover(
        &self,
        reported: &mut HashSet<(String, String, String)>,
    ) -> Vec<TargetConfig> {
        let mut targets = Vec::new();
        let mut problems_to_report = Vec::new();
        {
            let state = self.state();
            for ((namespace, name), entry) in state.index.services() {
                let (problems, skipped) = match &entry.outcome {
                    Outcome::NotEnabled => continue,
                    Outcome::Skipped(problems) => (problems, true),
                    Outcome::Target(target, problems) => {
                        targets.push((entry.created, (**target).clone()));
                        (problems, false)
                    }
                };
                if problems.is_empty() {
                    continue;
                }
                let key = (
                    namespace.clone(),
                    name.clone(),
                    entry.resource_version.clone(),
                );
                let new = reported.insert(key);
                problems_to_report.push((
                    service_ref(namespace, name),
                    problems.clone(),
                    skipped,
                    new,
                ));
            }
        }
        for (reference, problems, skipped, new) in problems_to_report {
            self.report(&reference, &problems, skipped, new).await;
        }
        targets.sort_by(|(a_created, a), (b_created, b)| {
            (a_created, &a.namespace, &a.name).cmp(&(b_created, &b.namespace, &b.name))
        });
        targets.into_iter().map(|(_, t)| t).collect()
    }

    /// Logs and counts the problems of a Service version the first time (`new`), and has the
    /// leader record them as an Event.
    async fn report(
        &self,
        service: &ObjectReference,
        problems: &[Problem],
        skipped: bool,
        new: bool,
    ) {
        let name = format!(
            "{}/{}",
            service.namespace.as_deref().unwrap_or_default(),
            service.name.as_deref().unwrap_or_default()
        );
        let what = if skipped {
            "service skipped"
        } else {
            "default used"
        };
        for p in problems.iter().filter(|_| new) {
            self.counters
                .invalid_annotations
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(service = %name, annotation = %p.field, value = %p.value, expected = %p.expected, "invalid annotation: {what}");
        }
        let note = problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        let action = if skipped { "Skip" } else { "UseDefault" };
        self.events
            .warn(
                service,
                "InvalidAnnotation",
                action,
                &format!("{note} ({what})"),
            )
            .await;
    }

    /// Publishes the ready endpoints and phase of the routed Services whose EndpointSlices or
    /// Deployment changed.
    fn publish(&self, services: &HashSet<Key>, deployments: &HashSet<Key>) {
        if services.is_empty() && deployments.is_empty() {
            return;
        }
        let mut state = self.state();
        let State { index, routed, .. } = &mut *state;
        for key in services {
            if let Some(m) = routed.get_mut(key) {
                publish_one(index, key, m);
            }
        }
        if deployments.is_empty() {
            return;
        }
        // Rare (a scale), so a scan of the routed targets rather than another index.
        for (key, m) in routed.iter_mut() {
            let w = &m.workload.workload;
            if w.is_deployment() && deployments.contains(&(key.0.clone(), w.name.clone())) {
                publish_one(index, key, m);
            }
        }
    }

    /// The replica count of a Deployment, and when the watch last changed it.
    fn deployment_replicas_since(&self, key: &Key) -> Option<(u32, tokio::time::Instant)> {
        self.state().index.deployment_replicas_since(key)
    }

    /// A `/scale` read or write saw the workload of `kube` at `replicas`.
    fn observed(&self, target: &Arc<Target>, kube: &KubeTarget, replicas: u32) {
        target.observe_replicas(replicas);
        let key = (kube.namespace.clone(), kube.service.clone());
        let mut state = self.state();
        let State { index, routed, .. } = &mut *state;
        if let Some(m) = routed.get_mut(&key)
            && Arc::ptr_eq(&m.target, target)
        {
            publish_one(index, &key, m);
        }
    }

    fn count_conflict(&self, manager: &str, resolution: &str) {
        self.counters
            .scale_conflicts
            .get_or_create(&vec![
                ("manager".to_owned(), manager.to_owned()),
                ("resolution".to_owned(), resolution.to_owned()),
            ])
            .inc();
    }

    fn count_failure(&self, reason: &str) {
        self.counters
            .scale_failures
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }
}

/// Publishes one routed target's routable endpoints and its phase.
fn publish_one(index: &Index, key: &Key, m: &mut Routed) {
    let kube = &m.workload;
    let ready = index.routable(key, &kube.port_name);
    if kube.workload.is_deployment()
        && let Some(n) =
            index.deployment_replicas(&(kube.namespace.clone(), kube.workload.name.clone()))
    {
        m.target.observe_replicas(n);
    }
    let phase = if !ready.is_empty() {
        Phase::Ready
    } else if m.target.observed_replicas().unwrap_or(0) > 0 {
        Phase::Starting
    } else {
        Phase::Cold
    };
    let same =
        ready.len() == m.endpoints.len() && ready.iter().all(|a| m.endpoints.contains_key(a));
    if same {
        m.target.set_phase(phase);
        return;
    }
    let mut next = BTreeMap::new();
    for authority in ready {
        let endpoint = match m.endpoints.remove(&authority) {
            Some(e) => e,
            None => match authority.parse() {
                Ok(parsed) => Endpoint::new(parsed),
                Err(_) => continue,
            },
        };
        next.insert(authority, endpoint);
    }
    m.endpoints = next;
    m.target
        .publish(m.endpoints.values().cloned().collect(), phase);
}

impl Provider for KubernetesProvider {
    type Backend = KubeTarget;

    fn manage(
        &self,
        target: Arc<Target>,
        workload: &KubeTarget,
        stop: CancellationToken,
    ) -> Managed {
        let inner = self.inner.clone();
        let key = (workload.namespace.clone(), workload.service.clone());
        {
            let mut state = inner.state();
            let State { index, routed, .. } = &mut *state;
            let mut m = Routed {
                target: target.clone(),
                workload: workload.clone(),
                endpoints: BTreeMap::new(),
            };
            publish_one(index, &key, &mut m);
            routed.insert(key.clone(), m);
        }
        let (scale, rx) = Scale::channel();
        let scaler = scale::Scaler::new(inner.clone(), target.clone(), workload.clone());
        let task = tokio::spawn(async move {
            scaler.run(rx, stop).await;
            // A replacement with the same name may already be registered; leave it be.
            let mut state = inner.state();
            if state
                .routed
                .get(&key)
                .is_some_and(|m| Arc::ptr_eq(&m.target, &target))
            {
                state.routed.remove(&key);
            }
        });
        Managed {
            scale,
            task,
            remote: Some(self.inner.peer_signal.clone()),
        }
    }
}

/// Kubernetes-mode state in `/metrics`: leadership and rejected annotations.
#[derive(Debug)]
struct Collector {
    leader: Arc<AtomicBool>,
    invalid_annotations: Arc<AtomicU64>,
}
impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let leader = i64::from(self.leader.load(Ordering::Relaxed));
        encoder
            .encode_descriptor(
                "wakegate_leader",
                "1 while this replica makes the N-to-M scaling decisions.",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&leader)?;
        encoder
            .encode_descriptor(
                "wakegate_invalid_annotations",
                "wakegate.io annotations that could not be used (the Service was skipped or a default used).",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, f64>(
                &self.invalid_annotations.load(Ordering::Relaxed),
                None,
            )?;
        Ok(())
    }
}
