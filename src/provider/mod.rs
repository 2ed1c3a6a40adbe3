//! Providers run what serves a target and carry out scale decisions: `local` starts and stops
//! processes, `fixed` fronts an always-on upstream, `kubernetes` scales a workload and routes
//! to its ready pods. The data plane never calls them; it only reads the endpoints they
//! publish on the [`Target`].

pub mod fixed;
pub mod kubernetes;
pub mod local;
pub mod probe;

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::target::Target;

/// Runs the targets of one kind of backend.
pub trait Provider: Send + Sync + 'static {
    /// The configuration of what this provider runs: the target's [`crate::config::Backend`]
    /// variant, so that a provider is never handed a target it cannot run.
    type Backend;

    /// Starts looking after `target`, which `backend` serves, and returns the handle the
    /// autoscaler scales it with.
    ///
    /// Must not block: the work happens in the returned task, which publishes the target's
    /// endpoints and phase as they change and ends once `stop` is cancelled and everything the
    /// target ran has stopped (or, for an external workload, once this replica let go of it).
    fn manage(
        &self,
        target: Arc<Target>,
        backend: &Self::Backend,
        stop: CancellationToken,
    ) -> Managed;
}

/// A target under a provider's care.
pub struct Managed {
    /// What the autoscaler asks for.
    pub scale: Scale,
    /// The provider's work for this target; ends after `stop`.
    pub task: JoinHandle<()>,
    /// What other wakegate replicas see of this target, where the provider knows them.
    pub remote: Option<Arc<dyn RemoteSignal>>,
}

/// The autoscaler's end of a managed target: asks for a number of ready instances.
#[derive(Debug)]
pub struct Scale(watch::Sender<Desired>);

/// What a provider's task for one target is asked to converge to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Desired {
    pub replicas: u32,
    /// Bumped by every ask, so that asking again for the same number after a failed start
    /// makes the provider try again.
    pub asked: u64,
}

impl Scale {
    /// A handle, and the receiver the provider's task converges from.
    pub fn channel() -> (Scale, watch::Receiver<Desired>) {
        let (tx, rx) = watch::channel(Desired::default());
        (Scale(tx), rx)
    }

    /// Asks for `replicas` ready instances; 0 stops them all. Never blocks, and asking twice
    /// is harmless: the provider converges to the latest ask.
    pub fn to(&self, replicas: u32) {
        self.0.send_modify(|d| {
            d.replicas = replicas;
            d.asked += 1;
        });
    }
}

/// What other wakegate replicas saw of a target since the last look.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Remote {
    /// Request-seconds in flight or held.
    pub integral: f64,
    pub requests: u64,
    /// In flight or held right now.
    pub demand: u64,
}

/// The rest of the cluster's signal for a target, added to this replica's own counters.
pub trait RemoteSignal: Send + Sync {
    fn take(&self, target: &Target) -> Remote;

    /// A request is held here for `target`, which has no ready instance: the other replicas
    /// may want to know before they next look.
    fn held_here(&self, _target: &Target) {}
}
