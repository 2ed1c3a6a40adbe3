//! The stored objects: kinds, one global resourceVersion, and each kind's bounded history of
//! changes that watches replay from.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use serde_json::{Value, json};
use tokio::sync::watch;

use super::kubelet::Kubelet;
use super::selector::Filter;

/// Changes kept per kind for watches to resume from.
const HISTORY_LIMIT: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Kind {
    Service,
    EndpointSlice,
    Deployment,
    StatefulSet,
    /// Argo Rollouts' `argoproj.io/v1alpha1` Rollout, a custom resource with `/scale`.
    Rollout,
    Lease,
    /// events.k8s.io/v1
    Event,
    /// core v1 Event
    CoreEvent,
}

impl Kind {
    const ALL: [Kind; 8] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Deployment,
        Kind::StatefulSet,
        Kind::Rollout,
        Kind::Lease,
        Kind::Event,
        Kind::CoreEvent,
    ];

    pub(super) fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::CoreEvent => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Deployment | Kind::StatefulSet => "apps/v1",
            Kind::Rollout => "argoproj.io/v1alpha1",
            Kind::Lease => "coordination.k8s.io/v1",
            Kind::Event => "events.k8s.io/v1",
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Deployment => "Deployment",
            Kind::StatefulSet => "StatefulSet",
            Kind::Rollout => "Rollout",
            Kind::Lease => "Lease",
            Kind::Event | Kind::CoreEvent => "Event",
        }
    }

    pub(super) fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Deployment => "deployments",
            Kind::StatefulSet => "statefulsets",
            Kind::Rollout => "rollouts",
            Kind::Lease => "leases",
            Kind::Event | Kind::CoreEvent => "events",
        }
    }

    /// A workload: it has `spec.replicas`, a `/scale` subresource and pods the simulated
    /// kubelet runs.
    pub(super) fn is_workload(self) -> bool {
        matches!(self, Kind::Deployment | Kind::StatefulSet | Kind::Rollout)
    }

    /// Served with a `/status` subresource: writes to the main resource leave `status`
    /// alone, as the real server's strategies do.
    pub(super) fn has_status_subresource(self) -> bool {
        self == Kind::Service || self.is_workload()
    }

    /// `leases.coordination.k8s.io`, as the real server names a resource in its messages.
    pub(super) fn qualified(self) -> String {
        match self.api_version().split_once('/') {
            Some((group, _)) => format!("{}.{group}", self.plural()),
            None => self.plural().to_owned(),
        }
    }

    pub(super) fn from_resource(api_version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.plural() == plural)
    }

    pub(super) fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.name() == kind)
    }

    /// The kinds a test means by a kind name or plural, case-insensitively.
    pub(super) fn named(name: &str) -> Vec<Kind> {
        let kinds: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| k.name().eq_ignore_ascii_case(name) || k.plural() == name)
            .collect();
        assert!(!kinds.is_empty(), "the fake API server has no kind {name}");
        kinds
    }
}

type Key = (Kind, String, String);

pub(super) struct Stored {
    pub(super) object: Value,
    /// The resourceVersion that created it, to list events in order.
    pub(super) created: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

pub(super) struct Change {
    pub(super) rv: u64,
    pub(super) change: ChangeType,
    pub(super) object: Value,
    /// The object before a modification, so a filtered watch can tell an object that left
    /// (or entered) its selection, or before a deletion, so a paginated list can rebuild an
    /// earlier version.
    pub(super) previous: Option<Value>,
}

#[derive(Default)]
pub(super) struct History {
    /// Every change after this resourceVersion is in `changes`.
    pub(super) start: u64,
    pub(super) changes: VecDeque<Change>,
}

pub(super) struct ScalePatch {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) manager: String,
    pub(super) replicas: i32,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) rv: u64,
    uids: u64,
    pub(super) objects: BTreeMap<Key, Stored>,
    pub(super) history: [History; Kind::ALL.len()],
    pub(super) down: bool,
    pub(super) closed: bool,
    pub(super) requests: Vec<String>,
    pub(super) scale_patches: Vec<ScalePatch>,
}

#[derive(Default)]
pub(super) struct Shared {
    state: Mutex<State>,
    /// Bumped after every mutation; watches and the kubelet wait on it.
    pub(super) changed: watch::Sender<u64>,
    kubelet: Mutex<Kubelet>,
}

impl Shared {
    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn kubelet(&self) -> MutexGuard<'_, Kubelet> {
        self.kubelet.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the state, then wakes every watch.
    pub(super) fn mutate<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
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

    pub(super) fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(kind, namespace.to_owned(), name.to_owned()))
            .map(|s| &s.object)
    }

    /// Stores `object` (create or replace) with fresh server-set metadata, and records the
    /// change. The caller has checked preconditions.
    pub(super) fn write(&mut self, kind: Kind, mut object: Value) -> Value {
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
        let tracks_generation = kind.is_workload();
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
                // A test may stage history by giving the creation time; the API sets it.
                if !object["metadata"]["creationTimestamp"].is_string() {
                    object["metadata"]["creationTimestamp"] = now_rfc3339().into();
                }
                if tracks_generation {
                    object["metadata"]["generation"] = 1.into();
                }
            }
        }
        default_fields(kind, &mut object);
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

    pub(super) fn remove(&mut self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let stored = self
            .objects
            .remove(&(kind, namespace.to_owned(), name.to_owned()))?;
        let rv = self.bump();
        let mut object = stored.object.clone();
        object["metadata"]["resourceVersion"] = rv.to_string().into();
        self.record(
            kind,
            rv,
            ChangeType::Deleted,
            object.clone(),
            Some(stored.object),
        );
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
    pub(super) fn expire_history(&mut self) {
        let rv = self.bump();
        for history in &mut self.history {
            history.changes.clear();
            history.start = rv;
        }
    }

    pub(super) fn list(&self, kind: Kind, filter: &Filter) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((k, _, _), stored)| *k == kind && filter.matches(&stored.object))
            .map(|(_, stored)| stored.object.clone())
            .collect()
    }
}

/// What the server defaults in an object of `kind`: a workload's `spec.replicas` is 1.
pub(super) fn default_fields(kind: Kind, object: &mut Value) {
    if kind.is_workload() && object["spec"]["replicas"].is_null() {
        object["spec"]["replicas"] = 1.into();
    }
}

/// The object without what the server sets, to compare content.
pub(super) fn without_server_fields(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(meta) = object["metadata"].as_object_mut() {
        for field in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "generation",
            "managedFields",
        ] {
            meta.remove(field);
        }
    }
    if let Some(object) = object.as_object_mut() {
        object.remove("apiVersion");
        object.remove("kind");
    }
    object
}

pub(super) fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

pub(super) fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}
