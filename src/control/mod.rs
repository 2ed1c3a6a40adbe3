//! The reconciler: makes the running targets match the configured and discovered ones (each
//! with its provider's task and its autoscaler) and publishes the route table the data plane
//! reads. It alone owns each running target's handles. Which target routes a host when
//! several ask for it is decided in [`claims`].

mod claims;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::route::Route;
use crate::config::{Backend, Config, KubernetesConfig, TargetConfig};
use crate::provider::Provider;
use crate::provider::fixed::FixedProvider;
use crate::provider::kubernetes::KubernetesProvider;
use crate::provider::local::LocalProvider;
use crate::proxy::Snapshot;
use crate::proxy::route::RouteTable;
use crate::scaling::autoscaler;
use crate::target::{Successor, Target};

/// Where a target comes from, and its name there. File targets and discovered Services never
/// share a key, whatever their names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Key {
    /// A `[[target]]` of the configuration file, by name.
    File(String),
    /// A Service discovered in Kubernetes.
    Kubernetes { namespace: String, service: String },
}

impl Key {
    fn of_discovered(config: &TargetConfig) -> Key {
        Key::Kubernetes {
            namespace: config.namespace.clone(),
            service: config.name.clone(),
        }
    }
}

/// A target that runs, with everything that looks after it.
struct Running {
    target: Arc<Target>,
    /// The latest route: a reload may change it without touching the target.
    route: Route,
    stop: CancellationToken,
    /// The provider's task and the autoscaler; both end after `stop`.
    tasks: [JoinHandle<()>; 2],
}

/// The control plane's view of what runs; the data plane only sees the published snapshot.
pub struct Control {
    snapshot: Arc<ArcSwap<Snapshot>>,
    running: HashMap<Key, Running>,
    /// Replaced or removed targets whose tasks have not finished yet.
    retired: Vec<Running>,
    local: LocalProvider,
    fixed: FixedProvider,
    kube: Option<KubernetesProvider>,
    /// Every autoscaler's tick; a reload may change it.
    interval: watch::Sender<Duration>,
    from_file: Vec<TargetConfig>,
    /// Oldest Service first: the order in which they claim hosts.
    discovered: Arc<Vec<TargetConfig>>,
    /// Discovered targets already reported as clashing with a file target.
    clashes: HashSet<Key>,
    /// Who may claim which hosts (`[kubernetes]`).
    policy: Option<KubernetesConfig>,
}

impl Control {
    /// Nothing runs until the first `apply_file`.
    pub fn new(snapshot: Arc<ArcSwap<Snapshot>>, kube: Option<KubernetesProvider>) -> Self {
        Self {
            snapshot,
            running: HashMap::new(),
            retired: Vec::new(),
            local: LocalProvider,
            fixed: FixedProvider,
            kube,
            interval: watch::Sender::new(Duration::from_secs(1)),
            from_file: Vec::new(),
            discovered: Arc::default(),
            clashes: HashSet::new(),
            policy: None,
        }
    }

    /// The targets and autoscaler settings of the configuration file (at start-up and on
    /// every reload).
    pub fn apply_file(&mut self, config: &Config) {
        self.interval.send_if_modified(|interval| {
            let changed = *interval != config.autoscaler.interval;
            *interval = config.autoscaler.interval;
            changed
        });
        self.from_file = config.targets.clone();
        self.policy = config.kubernetes.clone();
        self.apply();
    }

    /// The targets discovered in Kubernetes, whenever they change.
    pub fn apply_discovered(&mut self, targets: Arc<Vec<TargetConfig>>) {
        self.discovered = targets;
        self.apply();
    }

    /// Makes the running targets and routes match the configured and discovered ones.
    /// Targets that run the same way keep their instances and counters, whatever their route;
    /// the others are replaced: requests held for the old one move to the new one, and the old
    /// one stops once its in-flight requests are done.
    fn apply(&mut self) {
        // A discovered Service may not take a file target's metric labels.
        let labels: HashSet<(&str, &str)> = self
            .from_file
            .iter()
            .map(|t| (t.namespace.as_str(), t.name.as_str()))
            .collect();
        let mut wanted: Vec<(Key, TargetConfig)> = self
            .from_file
            .iter()
            .map(|t| (Key::File(t.name.clone()), t.clone()))
            .collect();
        let mut clashes = HashSet::new();
        for t in self.discovered.iter() {
            let key = Key::of_discovered(t);
            if labels.contains(&(t.namespace.as_str(), t.name.as_str())) {
                if !self.clashes.contains(&key) {
                    tracing::warn!(namespace = %t.namespace, service = %t.name, "Kubernetes Service skipped: a target of the configuration file has the same namespace and name");
                }
                clashes.insert(key);
                continue;
            }
            wanted.push((key, t.clone()));
        }
        self.clashes = clashes;

        let mut next = HashMap::with_capacity(wanted.len());
        for (key, config) in wanted {
            let running = match self.running.remove(&key) {
                Some(old) if old.target.runs(&config) => Running {
                    route: config.route.clone(),
                    ..old
                },
                old => {
                    let Some(new) = self.start(&config) else {
                        if let Some(old) = old {
                            self.retire(old, Successor::Removed);
                        }
                        continue;
                    };
                    if let Some(old) = old {
                        self.retire(old, Successor::Replaced(new.target.clone()));
                    }
                    new
                }
            };
            if let Some(duplicate) = next.insert(key, running) {
                self.retire(duplicate, Successor::Removed);
            }
        }
        let gone: Vec<Running> = self.running.drain().map(|(_, r)| r).collect();
        for old in gone {
            self.retire(old, Successor::Removed);
        }
        self.retired
            .retain(|r| !r.tasks.iter().all(|task| task.is_finished()));
        self.running = next;
        self.publish();
    }

    /// Takes a target out of service: held requests go to `successor`, its tasks stop.
    fn retire(&mut self, old: Running, successor: Successor) {
        old.target.retire(successor);
        old.stop.cancel();
        self.retired.push(old);
    }

    /// Starts a target on the provider of its backend.
    fn start(&self, config: &TargetConfig) -> Option<Running> {
        let target = Target::new(config.clone());
        let stop = CancellationToken::new();
        let managed = match &config.backend {
            Backend::Local(local) => self.local.manage(target.clone(), local, stop.clone()),
            Backend::Fixed(fixed) => self.fixed.manage(target.clone(), fixed, stop.clone()),
            Backend::Kubernetes(workload) => match &self.kube {
                Some(kube) => kube.manage(target.clone(), workload, stop.clone()),
                None => {
                    tracing::error!(target = %config.name, "a Kubernetes target without [kubernetes] configured; not started");
                    return None;
                }
            },
        };
        let scaler = tokio::spawn(autoscaler::run(
            target.clone(),
            managed.scale,
            self.interval.subscribe(),
            managed.remote,
            stop.clone(),
        ));
        Some(Running {
            target,
            route: config.route.clone(),
            stop,
            tasks: [managed.task, scaler],
        })
    }

    /// Publishes the route table: every target's claims, resolved in priority order (file
    /// targets, then discovered Services oldest first), and what each was refused.
    fn publish(&self) {
        let keys = self
            .from_file
            .iter()
            .map(|t| Key::File(t.name.clone()))
            .chain(self.discovered.iter().map(Key::of_discovered));
        let mut seen = HashSet::new();
        let ordered: Vec<(&Key, &Running)> = keys
            .filter_map(|key| self.running.get_key_value(&key))
            .filter(|(key, _)| seen.insert(*key))
            .collect();
        let claimants = ordered.iter().map(|(key, r)| {
            let origin = match key {
                Key::File(name) => claims::Origin::File { name },
                Key::Kubernetes { namespace, service } => claims::Origin::Service {
                    namespace,
                    name: service,
                },
            };
            (origin, &r.route)
        });
        let outcomes = claims::resolve(claimants, self.policy.as_ref());
        let mut routes = RouteTable::default();
        let mut refused = Vec::new();
        for ((key, r), outcome) in ordered.iter().zip(outcomes) {
            for (host, prefix) in &outcome.granted {
                routes.insert(host, prefix, r.target.clone());
            }
            if let Key::Kubernetes { .. } = key
                && !outcome.refused.is_empty()
            {
                refused.push((r.target.clone(), outcome.refused.clone()));
            }
            r.target.set_refused(outcome.refused);
        }
        if let Some(kube) = &self.kube {
            kube.report_refusals(&refused);
        }
        let targets = ordered.iter().map(|(_, r)| r.target.clone()).collect();
        self.snapshot.store(Arc::new(Snapshot { routes, targets }));
    }

    /// Stops every target and waits until their processes are gone.
    pub async fn shutdown(mut self) {
        let all: Vec<Running> = self
            .running
            .drain()
            .map(|(_, r)| r)
            .chain(self.retired.drain(..))
            .collect();
        for r in &all {
            r.stop.cancel();
        }
        for r in all {
            for task in r.tasks {
                let _ = task.await;
            }
        }
    }
}
