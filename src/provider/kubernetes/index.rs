//! What the watches have seen, kept small and indexed the way wakegate reads it: Services by
//! key (parsed into a target once per version), EndpointSlices by the Service they belong to,
//! and Deployments' replica counts by key. Every watch event marks what it touched, so the
//! provider recomputes that and nothing else: a change to one EndpointSlice costs the
//! endpoints of one Service, whatever the size of the cluster.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Resource;
use tokio::time::Instant;

use crate::config::annotations::{self, Outcome};

/// (namespace, name).
pub type Key = (String, String);

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// An annotated Service, parsed.
#[derive(Debug, Clone)]
pub struct ServiceEntry {
    pub outcome: Outcome,
    /// `metadata.creationTimestamp`: the older Service keeps a contested host.
    pub created: Option<k8s_openapi::jiff::Timestamp>,
    pub resource_version: String,
}

/// One endpoint of an EndpointSlice: its addresses, and whether it may take new requests.
#[derive(Debug, Clone, PartialEq)]
struct SliceEndpoint {
    addresses: Vec<String>,
    /// Ready and not terminating. A pod that is shutting down gets no new request, even while
    /// it is still `serving` the ones it has.
    routable: bool,
}

/// An EndpointSlice, reduced to what routing reads.
#[derive(Debug, Clone, PartialEq)]
struct Slice {
    /// (port name, port number).
    ports: Vec<(String, i32)>,
    endpoints: Vec<SliceEndpoint>,
}

/// What changed since the provider last looked.
#[derive(Debug, Default)]
pub struct Dirty {
    /// Some Service changed: the targets are derived again.
    pub services: bool,
    /// Services whose EndpointSlices changed.
    pub endpoints: HashSet<Key>,
    /// Deployments whose replica count changed.
    pub deployments: HashSet<Key>,
}

#[derive(Debug, Default)]
pub struct Index {
    services: HashMap<Key, ServiceEntry>,
    /// By Service, then slice name.
    slices: HashMap<Key, BTreeMap<String, Slice>>,
    /// (namespace, slice name) → the Service it belongs to.
    slice_owner: HashMap<Key, String>,
    /// Deployments' `spec.replicas`, and when the watch last changed it.
    deployments: HashMap<Key, (u32, Instant)>,
    pub dirty: Dirty,
}

/// A kind the index keeps, and how it reduces one object.
pub trait Indexed: Resource<DynamicType = ()> + Sized {
    fn upsert(index: &mut Index, object: &Self);
    fn remove(index: &mut Index, object: &Self);
    /// The keys of every object of this kind in `namespace` (all when `None`).
    fn keys(index: &Index, namespace: Option<&str>) -> Vec<Key>;
    fn remove_key(index: &mut Index, key: &Key);
}

fn key_of<K: Resource>(object: &K) -> Option<Key> {
    Some((
        object.meta().namespace.clone()?,
        object.meta().name.clone()?,
    ))
}

impl Index {
    /// Every opted-in Service, parsed.
    pub fn services(&self) -> impl Iterator<Item = (&Key, &ServiceEntry)> {
        self.services.iter()
    }

    /// The addresses (`ip:port`) a Service's EndpointSlices offer on `port_name` for new
    /// requests, sorted and without duplicates.
    pub fn routable(&self, service: &Key, port_name: &str) -> Vec<String> {
        let mut ready = Vec::new();
        for slice in self
            .slices
            .get(service)
            .into_iter()
            .flat_map(|s| s.values())
        {
            let Some(port) = slice
                .ports
                .iter()
                .find(|(name, _)| name == port_name)
                .map(|(_, port)| *port)
            else {
                continue;
            };
            for endpoint in slice.endpoints.iter().filter(|e| e.routable) {
                for ip in &endpoint.addresses {
                    ready.push(if ip.contains(':') {
                        format!("[{ip}]:{port}")
                    } else {
                        format!("{ip}:{port}")
                    });
                }
            }
        }
        ready.sort();
        ready.dedup();
        ready
    }

    pub fn deployment_replicas(&self, key: &Key) -> Option<u32> {
        self.deployments.get(key).map(|(n, _)| *n)
    }

    /// A Deployment's `spec.replicas` and when the watch last changed it.
    pub fn deployment_replicas_since(&self, key: &Key) -> Option<(u32, Instant)> {
        self.deployments.get(key).copied()
    }
}

impl Indexed for Service {
    fn upsert(index: &mut Index, service: &Service) {
        let Some(key) = key_of(service) else { return };
        let outcome = annotations::from_service(service);
        if outcome == Outcome::NotEnabled {
            if index.services.remove(&key).is_some() {
                index.dirty.services = true;
            }
            return;
        }
        let meta = &service.metadata;
        let resource_version = meta.resource_version.clone().unwrap_or_default();
        if index
            .services
            .get(&key)
            .is_some_and(|e| e.resource_version == resource_version && !resource_version.is_empty())
        {
            return;
        }
        let created = meta.creation_timestamp.as_ref().map(|t| t.0);
        index.services.insert(
            key,
            ServiceEntry {
                outcome,
                created,
                resource_version,
            },
        );
        index.dirty.services = true;
    }

    fn remove(index: &mut Index, service: &Service) {
        if let Some(key) = key_of(service) {
            Self::remove_key(index, &key);
        }
    }

    fn keys(index: &Index, namespace: Option<&str>) -> Vec<Key> {
        in_namespace(index.services.keys(), namespace)
    }

    fn remove_key(index: &mut Index, key: &Key) {
        if index.services.remove(key).is_some() {
            index.dirty.services = true;
        }
    }
}

impl Indexed for EndpointSlice {
    fn upsert(index: &mut Index, slice: &EndpointSlice) {
        let Some((namespace, name)) = key_of(slice) else {
            return;
        };
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned();
        let slice_key = (namespace.clone(), name.clone());
        // A slice whose label changed leaves its old Service.
        if index.slice_owner.get(&slice_key) != service.as_ref() {
            Self::remove_key(index, &slice_key);
        }
        let Some(service) = service else { return };
        let reduced = Slice {
            ports: slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| Some((p.name.clone().unwrap_or_default(), p.port?)))
                .collect(),
            endpoints: slice
                .endpoints
                .iter()
                .map(|e| {
                    let conditions = e.conditions.as_ref();
                    // Unset `ready` means ready, as the API defines it; a terminating
                    // endpoint takes no new requests whatever it says.
                    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
                    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
                    SliceEndpoint {
                        addresses: e.addresses.clone(),
                        routable: ready && !terminating,
                    }
                })
                .collect(),
        };
        let service_key = (namespace, service.clone());
        let slices = index.slices.entry(service_key.clone()).or_default();
        if slices.get(&name) == Some(&reduced) {
            return;
        }
        slices.insert(name, reduced);
        index.slice_owner.insert(slice_key, service);
        index.dirty.endpoints.insert(service_key);
    }

    fn remove(index: &mut Index, slice: &EndpointSlice) {
        if let Some(key) = key_of(slice) {
            Self::remove_key(index, &key);
        }
    }

    fn keys(index: &Index, namespace: Option<&str>) -> Vec<Key> {
        in_namespace(index.slice_owner.keys(), namespace)
    }

    fn remove_key(index: &mut Index, slice_key: &Key) {
        let Some(service) = index.slice_owner.remove(slice_key) else {
            return;
        };
        let service_key = (slice_key.0.clone(), service);
        if let Some(slices) = index.slices.get_mut(&service_key) {
            slices.remove(&slice_key.1);
            if slices.is_empty() {
                index.slices.remove(&service_key);
            }
        }
        index.dirty.endpoints.insert(service_key);
    }
}

impl Indexed for Deployment {
    fn upsert(index: &mut Index, deployment: &Deployment) {
        let Some(key) = key_of(deployment) else {
            return;
        };
        // The API defaults an unset count to 1.
        let replicas = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1)
            .max(0) as u32;
        if index.deployments.get(&key).map(|(n, _)| *n) != Some(replicas) {
            index
                .deployments
                .insert(key.clone(), (replicas, Instant::now()));
            index.dirty.deployments.insert(key);
        }
    }

    fn remove(index: &mut Index, deployment: &Deployment) {
        if let Some(key) = key_of(deployment) {
            Self::remove_key(index, &key);
        }
    }

    fn keys(index: &Index, namespace: Option<&str>) -> Vec<Key> {
        in_namespace(index.deployments.keys(), namespace)
    }

    fn remove_key(index: &mut Index, key: &Key) {
        if index.deployments.remove(key).is_some() {
            index.dirty.deployments.insert(key.clone());
        }
    }
}

fn in_namespace<'a>(keys: impl Iterator<Item = &'a Key>, namespace: Option<&str>) -> Vec<Key> {
    keys.filter(|(ns, _)| namespace.is_none_or(|n| n == ns))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn slice(name: &str, service: &str, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "namespace": "demo",
                "labels": { SERVICE_NAME_LABEL: service },
            },
            "addressType": "IPv4",
            "ports": [{ "name": "http", "port": 8080 }],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn key(name: &str) -> Key {
        ("demo".into(), name.into())
    }

    #[test]
    fn only_ready_endpoints_that_are_not_terminating_take_new_requests() {
        let mut index = Index::default();
        EndpointSlice::upsert(
            &mut index,
            &slice(
                "web-a",
                "web",
                json!([
                    { "addresses": ["10.0.0.1"], "conditions": { "ready": true } },
                    { "addresses": ["10.0.0.2"] },
                    { "addresses": ["10.0.0.3"], "conditions": { "ready": false } },
                    { "addresses": ["10.0.0.4"],
                      "conditions": { "ready": false, "serving": true, "terminating": true } },
                    { "addresses": ["10.0.0.5"], "conditions": { "ready": true, "terminating": true } },
                    { "addresses": ["fd00::6"] },
                ]),
            ),
        );
        assert_eq!(
            index.routable(&key("web"), "http"),
            ["10.0.0.1:8080", "10.0.0.2:8080", "[fd00::6]:8080"]
        );
        assert!(index.routable(&key("web"), "grpc").is_empty());
    }

    #[test]
    fn slices_are_indexed_by_service_and_follow_a_label_change() {
        let mut index = Index::default();
        let ready = json!([{ "addresses": ["10.0.0.1"] }]);
        EndpointSlice::upsert(&mut index, &slice("a-1", "a", ready.clone()));
        EndpointSlice::upsert(
            &mut index,
            &slice("b-1", "b", json!([{ "addresses": ["10.0.0.2"] }])),
        );
        assert_eq!(index.dirty.endpoints, [key("a"), key("b")].into());
        index.dirty = Dirty::default();

        // The same content again touches nothing.
        EndpointSlice::upsert(&mut index, &slice("a-1", "a", ready.clone()));
        assert!(index.dirty.endpoints.is_empty());

        // a-1 now belongs to b.
        EndpointSlice::upsert(&mut index, &slice("a-1", "b", ready));
        assert_eq!(index.dirty.endpoints, [key("a"), key("b")].into());
        assert!(index.routable(&key("a"), "http").is_empty());
        assert_eq!(
            index.routable(&key("b"), "http"),
            ["10.0.0.1:8080", "10.0.0.2:8080"]
        );

        EndpointSlice::remove_key(&mut index, &key("b-1"));
        assert_eq!(index.routable(&key("b"), "http"), ["10.0.0.1:8080"]);
        assert_eq!(EndpointSlice::keys(&index, Some("demo")), [key("a-1")]);
        assert!(EndpointSlice::keys(&index, Some("other")).is_empty());
    }
}
