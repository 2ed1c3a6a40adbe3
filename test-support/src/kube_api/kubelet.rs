//! The simulated kubelet: runs each Deployment's pods as demo backends on loopback addresses,
//! publishes them in EndpointSlices and keeps the Deployments' status up to date.

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
use super::store::{Kind, Shared, State, str_at};

/// How often the kubelet polls pods for readiness (and the API for changes it missed).
const KUBELET_TICK: Duration = Duration::from_millis(20);
/// SIGTERM, then SIGKILL after this long.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// `endpointslice.kubernetes.io/managed-by` of the slices the simulated kubelet maintains.
const SLICE_MANAGER: &str = "kubelet-sim.wakegate.test";

#[derive(Default)]
pub(super) struct Kubelet {
    pub(super) deployments: BTreeMap<(String, String), SimDeployment>,
    /// Sent SIGTERM, not reaped yet.
    pub(super) stopping: Vec<(Child, Instant)>,
}

pub(super) struct SimDeployment {
    /// Every pod of the Deployment listens on this port, each on its own loopback address.
    pub(super) port: u16,
    pub(super) pods: BTreeMap<u8, SimProcess>,
}

pub(super) struct SimProcess {
    pub(super) child: Child,
    pub(super) pid: u32,
    pub(super) ready: bool,
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

pub(super) fn pod_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, index + 2)
}

pub(super) fn pod_name(deployment: &str, index: u8) -> String {
    format!("{deployment}-sim-{index}")
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
