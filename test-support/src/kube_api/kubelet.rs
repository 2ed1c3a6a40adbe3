//! The simulated kubelet: runs each workload's pods (Deployments, StatefulSets and Rollouts
//! alike) as demo backends on loopback addresses, publishes them in EndpointSlices (a pod
//! being stopped stays there as terminating until its process has exited) and keeps the
//! workloads' status up to date.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::KubeletOptions;
use super::managed::{self, Writer};
use super::store::{Kind, Shared, State, str_at, without_server_fields};

/// How often the kubelet polls pods for readiness (and the API for changes it missed).
const KUBELET_TICK: Duration = Duration::from_millis(20);
/// A stopped pod keeps running this long before its SIGTERM unless a test says otherwise,
/// like a short `preStop` hook.
pub(super) const DEFAULT_STOP_GRACE: Duration = Duration::from_millis(200);
/// SIGTERM, then SIGKILL after this long (`terminationGracePeriodSeconds`).
const KILL_GRACE: Duration = Duration::from_secs(5);
/// `endpointslice.kubernetes.io/managed-by` of the slices the simulated kubelet maintains.
const SLICE_MANAGER: &str = "kubelet-sim.wakegate.test";
/// The field manager of what the controllers write: EndpointSlices and workload status.
const CONTROLLER_MANAGER: &str = "kube-controller-manager";
/// Argo Rollouts' controller, which writes a Rollout's status.
const ROLLOUTS_MANAGER: &str = "rollouts-controller";

/// A workload: its kind, namespace and name.
pub(super) type WorkloadKey = (Kind, String, String);

pub(super) struct Kubelet {
    pub(super) workloads: BTreeMap<WorkloadKey, SimWorkload>,
    /// Pods being stopped: terminating until their process has exited and been reaped.
    pub(super) stopping: Vec<StoppingPod>,
    /// How long a stopped pod keeps running before its SIGTERM.
    pub(super) stop_grace: Duration,
}

impl Default for Kubelet {
    fn default() -> Kubelet {
        Kubelet {
            workloads: BTreeMap::new(),
            stopping: Vec::new(),
            stop_grace: DEFAULT_STOP_GRACE,
        }
    }
}

pub(super) struct SimWorkload {
    /// Every pod of the workload listens on this port, each on its own loopback address.
    pub(super) port: u16,
    pub(super) pods: BTreeMap<u8, SimProcess>,
}

pub(super) struct SimProcess {
    pub(super) child: Child,
    pub(super) pid: u32,
    pub(super) ready: bool,
}

pub(super) struct StoppingPod {
    pub(super) workload: WorkloadKey,
    pub(super) index: u8,
    pub(super) port: u16,
    pub(super) process: SimProcess,
    since: Instant,
    /// When it got SIGTERM.
    signalled: Option<Instant>,
}

/// A workload as the kubelet needs it.
struct WorkloadView {
    key: WorkloadKey,
    replicas: usize,
    labels: Map<String, Value>,
}

struct ServiceView {
    namespace: String,
    name: String,
    selector: Map<String, Value>,
    port_names: Vec<String>,
}

/// A pod as the kubelet publishes it.
#[derive(Clone, Copy)]
struct PodState {
    index: u8,
    ready: bool,
    terminating: bool,
}

/// The pods of each workload, as published: (port, pods).
type PodStates = BTreeMap<WorkloadKey, (u16, Vec<PodState>)>;

pub(super) fn pod_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, index + 2)
}

/// A StatefulSet's pods are `{name}-{ordinal}`, like the real ones; others' `{name}-sim-{i}`.
pub(super) fn pod_name(kind: Kind, workload: &str, index: u8) -> String {
    match kind {
        Kind::StatefulSet => format!("{workload}-{index}"),
        _ => format!("{workload}-sim-{index}"),
    }
}

pub(super) async fn run_kubelet(shared: Arc<Shared>, options: KubeletOptions) {
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
    let (workloads, services) = {
        let state = shared.state();
        if state.closed {
            return;
        }
        (workload_views(&state), service_views(&state))
    };

    // Start and stop processes to match the replica counts.
    let mut probe = Vec::new();
    {
        let mut kubelet = shared.kubelet();
        let kubelet = &mut *kubelet;
        let mut stopped = Vec::new();
        kubelet.workloads.retain(|key, sim| {
            let keep = workloads.iter().any(|w| &w.key == key);
            if !keep {
                let pods = std::mem::take(&mut sim.pods);
                stopped.extend(
                    pods.into_iter()
                        .map(|(i, pod)| (key.clone(), i, sim.port, pod)),
                );
            }
            keep
        });
        for w in &workloads {
            let sim = kubelet
                .workloads
                .entry(w.key.clone())
                .or_insert_with(|| SimWorkload {
                    port: free_port(),
                    pods: BTreeMap::new(),
                });
            // A pod whose process exited is replaced, like a restarted container.
            sim.pods
                .retain(|_, pod| matches!(pod.child.try_wait(), Ok(None)));
            while sim.pods.len() > w.replicas {
                if let Some((index, pod)) = sim.pods.pop_last() {
                    stopped.push((w.key.clone(), index, sim.port, pod));
                }
            }
            // A terminating pod still holds its address.
            let taken: BTreeSet<u8> = kubelet
                .stopping
                .iter()
                .filter(|p| p.workload == w.key)
                .map(|p| p.index)
                .chain(stopped.iter().filter(|s| s.0 == w.key).map(|s| s.1))
                .collect();
            while sim.pods.len() < w.replicas {
                let free =
                    (0..=u8::MAX - 2).find(|i| !sim.pods.contains_key(i) && !taken.contains(i));
                let Some(index) = free else {
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
                    probe.push((w.key.clone(), index, addr));
                }
            }
        }
        let now = Instant::now();
        kubelet
            .stopping
            .extend(
                stopped
                    .into_iter()
                    .map(|(workload, index, port, process)| StoppingPod {
                        workload,
                        index,
                        port,
                        process,
                        since: now,
                        signalled: None,
                    }),
            );
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
                .workloads
                .get_mut(&key)
                .and_then(|sim| sim.pods.get_mut(&index))
            {
                pod.ready = true;
            }
        }
        // A stopping pod is reaped once its process has exited; it is gone from the slice
        // in the same pass.
        kubelet
            .stopping
            .retain_mut(|pod| matches!(pod.process.child.try_wait(), Ok(None)));
        let mut pods: PodStates = kubelet
            .workloads
            .iter()
            .map(|(key, sim)| {
                let pods = sim
                    .pods
                    .iter()
                    .map(|(&index, pod)| PodState {
                        index,
                        ready: pod.ready,
                        terminating: false,
                    })
                    .collect();
                (key.clone(), (sim.port, pods))
            })
            .collect();
        for pod in &kubelet.stopping {
            let (_, list) = pods
                .entry(pod.workload.clone())
                .or_insert_with(|| (pod.port, Vec::new()));
            list.push(PodState {
                index: pod.index,
                ready: pod.process.ready,
                terminating: true,
            });
        }
        for (_, list) in pods.values_mut() {
            list.sort_by_key(|p| p.index);
        }
        pods
    };

    // Publish, then signal: a pod is terminating in its EndpointSlice before it gets
    // SIGTERM, and leaves it once its process has exited.
    let changed = {
        let mut state = shared.state();
        publish(&mut state, &workloads, &services, &pods)
    };
    if changed {
        shared.changed.send_modify(|n| *n += 1);
    }
    let mut kubelet = shared.kubelet();
    let grace = kubelet.stop_grace;
    for pod in &mut kubelet.stopping {
        match pod.signalled {
            None if pod.since.elapsed() >= grace => {
                // SAFETY: signalling a child process this kubelet started and has not reaped.
                unsafe { libc::kill(pod.process.pid as i32, libc::SIGTERM) };
                pod.signalled = Some(Instant::now());
            }
            Some(at) if at.elapsed() > KILL_GRACE => {
                let _ = pod.process.child.start_kill();
            }
            _ => {}
        }
    }
}

fn workload_views(state: &State) -> Vec<WorkloadView> {
    state
        .objects
        .iter()
        .filter(|((kind, _, _), _)| kind.is_workload())
        .map(|((kind, namespace, name), stored)| {
            let object = &stored.object;
            let replicas = object["spec"]["replicas"].as_u64().unwrap_or(1);
            WorkloadView {
                key: (*kind, namespace.clone(), name.clone()),
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

/// Writes the EndpointSlices and workload statuses that `pods` implies; true if anything
/// changed.
fn publish(
    state: &mut State,
    workloads: &[WorkloadView],
    services: &[ServiceView],
    pods: &PodStates,
) -> bool {
    let mut changed = false;
    let mut slices = BTreeSet::new();
    for service in services {
        let selects = |w: &&WorkloadView| {
            w.key.1 == service.namespace
                && !service.selector.is_empty()
                && service
                    .selector
                    .iter()
                    .all(|(k, v)| w.labels.get(k) == Some(v))
        };
        let Some(workload) = workloads.iter().find(selects) else {
            continue;
        };
        let Some((port, workload_pods)) = pods.get(&workload.key) else {
            continue;
        };
        let name = format!("{}-sim", service.name);
        let endpoints: Vec<Value> = workload_pods
            .iter()
            .map(|pod| {
                json!({
                    "addresses": [pod_ip(pod.index).to_string()],
                    "conditions": {
                        "ready": pod.ready && !pod.terminating,
                        "serving": pod.ready,
                        "terminating": pod.terminating,
                    },
                    "targetRef": {
                        "kind": "Pod",
                        "namespace": service.namespace,
                        "name": pod_name(workload.key.0, &workload.key.2, pod.index),
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
            "apiVersion": Kind::EndpointSlice.api_version(),
            "kind": "EndpointSlice",
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
        changed |= write_as_controller(state, Kind::EndpointSlice, slice, None);
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
    for workload in workloads {
        let Some((_, workload_pods)) = pods.get(&workload.key) else {
            continue;
        };
        let (kind, namespace, name) = &workload.key;
        let Some(current) = state.get(*kind, namespace, name) else {
            continue;
        };
        let running: Vec<&PodState> = workload_pods.iter().filter(|p| !p.terminating).collect();
        let total = running.len();
        let ready = running.iter().filter(|p| p.ready).count();
        let status = workload_status(*kind, current, workload, total, ready);
        if current["status"] != status {
            let mut updated = current.clone();
            updated["status"] = status;
            changed |= write_as_controller(state, *kind, updated, Some("status"));
        }
    }
    changed
}

/// A workload's status for `total` pods, `ready` of them ready. Zero counts are left out, as
/// the real `omitempty` does (a StatefulSet's `replicas` and `availableReplicas` have none).
fn workload_status(
    kind: Kind,
    current: &Value,
    workload: &WorkloadView,
    total: usize,
    ready: usize,
) -> Value {
    let generation = current["metadata"]["generation"].clone();
    let mut status = Map::new();
    let counts: &[(&str, usize)] = match kind {
        Kind::Rollout => &[
            ("replicas", total),
            ("updatedReplicas", total),
            ("readyReplicas", ready),
            ("availableReplicas", ready),
            ("HPAReplicas", total),
        ],
        Kind::StatefulSet => &[
            ("replicas", total),
            ("readyReplicas", ready),
            ("currentReplicas", total),
            ("updatedReplicas", total),
            ("availableReplicas", ready),
        ],
        _ => &[
            ("replicas", total),
            ("updatedReplicas", total),
            ("readyReplicas", ready),
            ("availableReplicas", ready),
        ],
    };
    for &(field, count) in counts {
        let always = kind == Kind::StatefulSet && matches!(field, "replicas" | "availableReplicas");
        if count > 0 || always {
            status.insert(field.into(), count.into());
        }
    }
    match kind {
        Kind::Rollout => {
            // Argo writes the generation as a string, and the selector `/scale` reports.
            let generation = generation.as_i64().unwrap_or(1).to_string();
            status.insert("observedGeneration".into(), generation.into());
            let selector: Vec<String> = workload
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect();
            status.insert("selector".into(), selector.join(",").into());
        }
        _ => {
            status.insert("observedGeneration".into(), generation);
        }
    }
    Value::Object(status)
}

/// Writes `object` as the controllers do (an Update by their field manager, through
/// `subresource`), unless it changes nothing; true if it wrote.
fn write_as_controller(
    state: &mut State,
    kind: Kind,
    mut object: Value,
    subresource: Option<&str>,
) -> bool {
    let namespace = str_at(&object, "/metadata/namespace").to_owned();
    let name = str_at(&object, "/metadata/name").to_owned();
    let current = state.get(kind, &namespace, &name).cloned();
    if let Some(current) = &current {
        object["metadata"]["managedFields"] = current["metadata"]["managedFields"].clone();
        if without_server_fields(current) == without_server_fields(&object) {
            return false;
        }
    }
    let manager = if kind == Kind::Rollout {
        ROLLOUTS_MANAGER
    } else {
        CONTROLLER_MANAGER
    };
    let writer = Writer {
        manager,
        subresource,
    };
    managed::update(kind, current.as_ref(), &mut object, writer);
    state.write(kind, object);
    true
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
