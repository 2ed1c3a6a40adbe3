//! Kubernetes: targets come from Services annotated `wakegate.io/enabled: "true"`, traffic
//! goes straight to the ready pod IPs of their EndpointSlices, and scaling patches the
//! Deployment's `/scale` subresource (server-side apply, field manager `wakegate`).
//!
//! Watches resume with backoff after errors and API-server outages; the data plane keeps the
//! last published endpoints meanwhile.

pub mod backoff;
pub mod lease;
pub mod peers;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Desired, Managed, Provider, Scale};
use crate::config::annotations::{self, Outcome};
use crate::config::{AutoscalerMode, KubeTarget, KubernetesConfig, Problem, TargetConfig};
use crate::target::{Endpoint, Phase, Target};

pub const FIELD_MANAGER: &str = "wakegate";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

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

/// The Kubernetes provider: watches, the lease, the peers' signal; cheap to clone.
#[derive(Clone)]
pub struct KubernetesProvider {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    config: KubernetesConfig,
    services: Vec<Store<Service>>,
    slices: Vec<Store<EndpointSlice>>,
    deployments: Vec<Store<Deployment>>,
    /// By (namespace, Service name). Control plane only.
    routed: Mutex<HashMap<(String, String), Routed>>,
    /// Wakes the recompute loop after any watched change.
    changed: Arc<Notify>,
    /// True until this replica loses (or never wins) the lease; always true without one.
    leader: Arc<AtomicBool>,
    invalid_annotations: Arc<AtomicU64>,
    recorder: Recorder,
    peer_signal: Arc<peers::PeerSignal>,
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
    /// The discovered targets, on every change; `None` until every watch has listed once.
    pub targets: watch::Receiver<Option<Vec<TargetConfig>>>,
    /// End after `stop` is cancelled.
    pub tasks: Vec<JoinHandle<()>>,
}

impl KubernetesProvider {
    /// Starts the watches, the lease and the peer scraping, and registers the provider's own
    /// metrics in `registry`.
    pub fn start(
        client: Client,
        config: KubernetesConfig,
        registry: &mut Registry,
        stop: CancellationToken,
    ) -> Started {
        let scopes: Vec<Option<String>> = if config.namespaces.is_empty() {
            vec![None]
        } else {
            config.namespaces.iter().cloned().map(Some).collect()
        };
        let changed = Arc::new(Notify::new());
        let mut watches = Watches {
            client: &client,
            changed: changed.clone(),
            stop: &stop,
            tasks: Vec::new(),
            readiness: Vec::new(),
        };
        let mut services = Vec::new();
        let mut slices = Vec::new();
        let mut deployments = Vec::new();
        for scope in &scopes {
            services.push(watches.watch(scope.as_deref()));
            slices.push(watches.watch(scope.as_deref()));
            deployments.push(watches.watch(scope.as_deref()));
        }
        let Watches {
            mut tasks,
            readiness,
            ..
        } = watches;
        let identity = identity();
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "wakegate".into(),
                instance: Some(identity.clone()),
            },
        );
        let leader = Arc::new(AtomicBool::new(config.lease.is_none()));
        let invalid_annotations = Arc::new(AtomicU64::new(0));
        registry.register_collector(Box::new(Collector {
            leader: leader.clone(),
            invalid_annotations: invalid_annotations.clone(),
        }));
        let peer_signal = Arc::new(peers::PeerSignal::default());
        let provider = Arc::new(Inner {
            client: client.clone(),
            config: config.clone(),
            services,
            slices,
            deployments,
            routed: Mutex::new(HashMap::new()),
            changed,
            leader: leader.clone(),
            invalid_annotations,
            recorder,
            peer_signal: peer_signal.clone(),
        });
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
                provider.leader.clone(),
                peer_signal,
                stop.clone(),
            )));
        }

        let (targets_tx, targets_rx) = watch::channel(None);
        let looping = provider.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => return,
                () = async { for ready in readiness { let _ = ready.await; } } => {}
            }
            tracing::info!("Kubernetes watches synced");
            let mut reported: HashSet<(String, String, String)> = HashSet::new();
            loop {
                let discovered = looping.discover(&mut reported).await;
                targets_tx.send_if_modified(|current| {
                    let changed = current.as_ref() != Some(&discovered);
                    *current = Some(discovered);
                    changed
                });
                looping.publish_endpoints();
                tokio::select! {
                    () = looping.changed.notified() => {}
                    () = stop.cancelled() => return,
                }
            }
        }));
        Started {
            provider: KubernetesProvider { inner: provider },
            targets: targets_rx,
            tasks,
        }
    }
}

impl Inner {
    /// Every opted-in Service as a target; problems are logged, counted and sent as Events
    /// once per Service version.
    async fn discover(
        &self,
        reported: &mut HashSet<(String, String, String)>,
    ) -> Vec<TargetConfig> {
        let mut targets = Vec::new();
        let mut problems_to_report = Vec::new();
        for store in &self.services {
            for service in store.state() {
                let outcome = annotations::from_service(&service);
                let (problems, skipped) = match &outcome {
                    Outcome::NotEnabled => continue,
                    Outcome::Skipped(problems) => (problems.clone(), true),
                    Outcome::Target(target, problems) => {
                        targets.push((**target).clone());
                        (problems.clone(), false)
                    }
                };
                if problems.is_empty() {
                    continue;
                }
                let key = (
                    service.metadata.namespace.clone().unwrap_or_default(),
                    service.metadata.name.clone().unwrap_or_default(),
                    service
                        .metadata
                        .resource_version
                        .clone()
                        .unwrap_or_default(),
                );
                if reported.insert(key) {
                    problems_to_report.push((service.clone(), problems, skipped));
                }
            }
        }
        for (service, problems, skipped) in problems_to_report {
            self.report(&service, &problems, skipped).await;
        }
        targets.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        targets
    }

    async fn report(&self, service: &Service, problems: &[Problem], skipped: bool) {
        let name = format!(
            "{}/{}",
            service.metadata.namespace.as_deref().unwrap_or_default(),
            service.metadata.name.as_deref().unwrap_or_default()
        );
        let what = if skipped {
            "service skipped"
        } else {
            "default used"
        };
        for p in problems {
            self.invalid_annotations.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(service = %name, annotation = %p.field, value = %p.value, expected = %p.expected, "invalid annotation: {what}");
        }
        let note = problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        let event = Event {
            type_: EventType::Warning,
            reason: "InvalidAnnotation".into(),
            note: Some(format!("{note} ({what})")),
            action: if skipped { "Skip" } else { "UseDefault" }.into(),
            secondary: None,
        };
        if let Err(error) = self
            .recorder
            .publish(&event, &service.object_ref(&()))
            .await
        {
            tracing::warn!(service = %name, %error, "cannot record the Event");
        }
    }

    /// Publishes each routed target's ready endpoints and phase from the EndpointSlices.
    fn publish_endpoints(&self) {
        let mut routed = self.routed.lock().expect("not poisoned");
        for ((namespace, service), m) in routed.iter_mut() {
            let kube = &m.workload;
            let mut ready: Vec<String> = Vec::new();
            for store in &self.slices {
                for slice in store.state() {
                    if slice.metadata.namespace.as_deref() != Some(namespace)
                        || slice
                            .metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(SERVICE_NAME_LABEL))
                            != Some(service)
                    {
                        continue;
                    }
                    let Some(port) = slice
                        .ports
                        .iter()
                        .flatten()
                        .find(|p| p.name.as_deref().unwrap_or_default() == kube.port_name)
                        .and_then(|p| p.port)
                    else {
                        continue;
                    };
                    for endpoint in &slice.endpoints {
                        let conditions = endpoint.conditions.as_ref();
                        // Unset means ready, as the API defines it.
                        if conditions.and_then(|c| c.ready) == Some(false)
                            || conditions.and_then(|c| c.terminating) == Some(true)
                        {
                            continue;
                        }
                        for ip in &endpoint.addresses {
                            ready.push(if ip.contains(':') {
                                format!("[{ip}]:{port}")
                            } else {
                                format!("{ip}:{port}")
                            });
                        }
                    }
                }
            }
            ready.sort();
            ready.dedup();
            let same = ready.len() == m.endpoints.len()
                && ready.iter().all(|a| m.endpoints.contains_key(a));
            let replicas = self
                .deployment_replicas(namespace, &kube.deployment)
                .unwrap_or(0);
            let phase = if !ready.is_empty() {
                Phase::Ready
            } else if replicas > 0 {
                Phase::Starting
            } else {
                Phase::Cold
            };
            if !same {
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
            } else {
                m.target.set_phase(phase);
            }
        }
    }

    fn deployment_replicas(&self, namespace: &str, name: &str) -> Option<i32> {
        self.deployments.iter().find_map(|store| {
            store
                .state()
                .iter()
                .find(|d| {
                    d.metadata.namespace.as_deref() == Some(namespace)
                        && d.metadata.name.as_deref() == Some(name)
                })
                .and_then(|d| d.spec.as_ref()?.replicas)
        })
    }

    fn is_waking(&self, target: &Target) -> bool {
        target.endpoints().is_empty()
    }

    /// Applies `replicas` to the target's Deployment. A wake (no ready endpoint) only
    /// raises a Deployment that is at zero; other changes are the leader's, unless an
    /// external autoscaler owns them.
    async fn execute(
        &self,
        target: &Target,
        kube: &KubeTarget,
        replicas: u32,
    ) -> Result<(), kube::Error> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &kube.namespace);
        let waking = replicas > 0 && self.is_waking(target);
        if waking {
            let current = api
                .get_scale(&kube.deployment)
                .await?
                .spec
                .and_then(|s| s.replicas)
                .unwrap_or(0);
            if current > 0 {
                return Ok(());
            }
        } else if !self.leader.load(Ordering::Relaxed)
            || self.config.autoscaler == AutoscalerMode::External
        {
            return Ok(());
        }
        let patch = serde_json::json!({
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "spec": { "replicas": replicas },
        });
        api.patch_scale(
            &kube.deployment,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        tracing::info!(namespace = %kube.namespace, deployment = %kube.deployment, replicas, waking, "scaled deployment");
        if waking {
            // Counted here, not from the phase the watches show: a Deployment with replicas
            // and no ready pod may as well be scaling down.
            target.waking();
        }
        Ok(())
    }

    fn object_ref(kube: &KubeTarget) -> ObjectReference {
        ObjectReference {
            api_version: Some("apps/v1".into()),
            kind: Some("Deployment".into()),
            namespace: Some(kube.namespace.clone()),
            name: Some(kube.deployment.clone()),
            ..Default::default()
        }
    }
}

type Readiness = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Starts reflector-backed watches whose every change wakes `changed`.
struct Watches<'a> {
    client: &'a Client,
    changed: Arc<Notify>,
    stop: &'a CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Each resolves once its store has listed.
    readiness: Vec<Readiness>,
}

impl Watches<'_> {
    /// A store of every `K` in `namespace` (all namespaces when `None`).
    fn watch<K>(&mut self, namespace: Option<&str>) -> Store<K>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
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
        let (store, writer) = reflector::store();
        let stream = watcher(api, watcher::Config::default())
            .backoff(backoff::watch_retry())
            .reflect(writer);
        let changed = self.changed.clone();
        let stop = self.stop.clone();
        let kind = K::kind(&());
        self.tasks.push(tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                tokio::select! {
                    next = stream.next() => match next {
                        Some(Ok(_)) => changed.notify_one(),
                        Some(Err(error)) => tracing::warn!(%kind, %error, "watch failed; retrying with backoff"),
                        None => return,
                    },
                    () = stop.cancelled() => return,
                }
            }
        }));
        let ready = store.clone();
        self.readiness.push(Box::pin(async move {
            let _ = ready.wait_until_ready().await;
        }));
        store
    }
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
        inner.routed.lock().expect("not poisoned").insert(
            key.clone(),
            Routed {
                target: target.clone(),
                workload: workload.clone(),
                endpoints: BTreeMap::new(),
            },
        );
        inner.publish_endpoints();
        let (scale, mut rx) = Scale::channel();
        let workload = workload.clone();
        let worker = inner.clone();
        let task = tokio::spawn(async move {
            let inner = worker;
            loop {
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { break },
                    () = stop.cancelled() => break,
                }
                let want: Desired = *rx.borrow_and_update();
                let mut backoff = Duration::from_millis(200);
                while let Err(error) = inner.execute(&target, &workload, want.replicas).await {
                    tracing::warn!(target = %target.name(), replicas = want.replicas, %error, "cannot scale; retrying");
                    let event = Event {
                        type_: EventType::Warning,
                        reason: "ScaleFailed".into(),
                        note: Some(format!(
                            "wakegate could not scale to {}: {error}",
                            want.replicas
                        )),
                        action: "Scale".into(),
                        secondary: None,
                    };
                    let _ = inner
                        .recorder
                        .publish(&event, &Inner::object_ref(&workload))
                        .await;
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stop.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    if rx.has_changed().unwrap_or(false) {
                        break;
                    }
                }
            }
            // A replacement with the same name may already be registered; leave it be.
            let mut routed = inner.routed.lock().expect("not poisoned");
            if routed
                .get(&key)
                .is_some_and(|m| Arc::ptr_eq(&m.target, &target))
            {
                routed.remove(&key);
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
