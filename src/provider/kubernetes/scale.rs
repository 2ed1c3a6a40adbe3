//! Scaling one target's workload through its `/scale` subresource.
//!
//! Who owns the replica count:
//! - `autoscaler = "internal"`: wakegate does, like an HPA. The leader reads the workload's
//!   actual count (from the Deployment watch, or a `GET /scale` for other kinds) before it
//!   changes it, and logs the real `from`.
//! - `autoscaler = "external"`: KEDA or an HPA does. wakegate only wakes a workload that is at
//!   zero and never changes a count above zero.
//!
//! Every write is a server-side apply of `spec.replicas` with field manager `wakegate`,
//! without `force`. If another manager holds the field, the API server answers 409: a manager
//! that last *updated* it (`kubectl scale`, an HPA, KEDA) is taken over, since that is what
//! owning the count means, and the take-over is logged and counted; a manager that *applied*
//! it (a GitOps tool's manifest with `replicas`) is a declaration wakegate does not override:
//! it yields, logs the manager, counts it and records a Warning Event.
//!
//! A write that fails (workload missing, forbidden, throttled, API down) backs off per
//! target, doubling up to [`RETRY_MAX`], and is reported once per cause, not once per try.
//! A workload that is missing or forbidden also fails the requests held for it at once, with
//! the reason, instead of letting them wait out their cold-start timeout.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{FIELD_MANAGER, Inner};
use crate::config::{AutoscalerMode, KubeTarget};
use crate::provider::Desired;
use crate::target::Target;

/// The first retry after a failed write.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two tries.
pub const RETRY_MAX: Duration = Duration::from_secs(60);

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
enum ScaleError {
    #[error("{workload} not found in namespace {namespace}")]
    NotFound { workload: String, namespace: String },
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error(
        "spec.replicas of {workload} is declared by {managers} (server-side apply); wakegate does \
         not override it: leave replicas out of that manifest"
    )]
    Yielded { workload: String, managers: String },
    #[error("the API server asked to slow down: {message}")]
    Throttled {
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{0}")]
    Api(kube::Error),
}

impl ScaleError {
    /// The `reason` label of `wakegate_kubernetes_scale_failures_total`.
    fn label(&self) -> &'static str {
        match self {
            ScaleError::NotFound { .. } => "not_found",
            ScaleError::Forbidden(_) => "forbidden",
            ScaleError::Yielded { .. } => "conflict",
            ScaleError::Throttled { .. } => "throttled",
            ScaleError::Api(_) => "api",
        }
    }

    /// Whether trying again soon cannot help, so requests held for it should not wait.
    fn is_lasting(&self) -> bool {
        matches!(
            self,
            ScaleError::NotFound { .. } | ScaleError::Forbidden(_) | ScaleError::Yielded { .. }
        )
    }
}

/// A failure being backed off.
struct Failure {
    /// What was reported, to report a different cause again.
    reported: String,
    /// Trying again soon cannot help (missing, forbidden, declared by another manager).
    lasting: bool,
    label: &'static str,
    wait: Duration,
    retry_at: Instant,
}

pub(super) struct Scaler {
    inner: Arc<Inner>,
    target: Arc<Target>,
    kube: KubeTarget,
    api: Api<DynamicObject>,
    /// For kinds without a watch: when the count was last read or written.
    read_at: Option<Instant>,
    /// The ask last converged to.
    last_want: Option<u32>,
    /// The count wakegate last wrote, and when.
    wrote: Option<(u32, Instant)>,
    failure: Option<Failure>,
}

impl Scaler {
    pub(super) fn new(inner: Arc<Inner>, target: Arc<Target>, kube: KubeTarget) -> Self {
        let w = &kube.workload;
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(&w.group, &w.version, &w.kind),
            &w.plural,
        );
        let api = Api::namespaced_with(inner.client.clone(), &kube.namespace, &resource);
        Self {
            inner,
            target,
            kube,
            api,
            read_at: None,
            last_want: None,
            wrote: None,
            failure: None,
        }
    }

    /// Converges to every ask until `stop`.
    pub(super) async fn run(mut self, mut rx: watch::Receiver<Desired>, stop: CancellationToken) {
        loop {
            let retry_at = self.failure.as_ref().map(|f| f.retry_at);
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                () = sleep_until(retry_at) => {}
                () = stop.cancelled() => return,
            }
            if retry_at.is_some_and(|at| Instant::now() < at) && !self.workload_appeared() {
                // Asks during a back-off wait for it; the latest is taken then. Requests
                // held meanwhile for a workload that cannot be scaled fail now, not at their
                // cold-start timeout.
                if let Some(failure) = self.failure.as_ref().filter(|f| f.lasting)
                    && self.target.endpoints().is_empty()
                    && self.target.stats.pending() > 0
                {
                    self.target.start_failed(failure.reported.clone(), None);
                }
                continue;
            }
            let want = rx.borrow_and_update().replicas;
            // Boxed: the API calls' futures are large, and thousands of targets mostly wait
            // here; unboxed, every waiting task would carry their size.
            match Box::pin(self.converge(want)).await {
                Ok(()) => self.recovered(),
                Err(error) => Box::pin(self.failed(error)).await,
            }
        }
    }

    async fn converge(&mut self, want: u32) -> Result<(), ScaleError> {
        let waking = want > 0 && self.target.endpoints().is_empty();
        if !waking
            && (!self.inner.leader.load(Ordering::Relaxed)
                || self.inner.config.autoscaler == AutoscalerMode::External)
        {
            return Ok(());
        }
        let current = self.current(want).await?;
        self.last_want = Some(want);
        if waking && current > 0 {
            // On its way up: the EndpointSlice watch says when a pod is ready.
            return Ok(());
        }
        if !waking && current == want {
            return Ok(());
        }
        self.write(current, want, waking).await
    }

    /// The workload's replica count: from the Deployment watch, else read when it may have
    /// changed since wakegate last read or wrote it.
    async fn current(&mut self, want: u32) -> Result<u32, ScaleError> {
        if self.kube.workload.is_deployment()
            && let Some((n, changed_at)) =
                self.inner.deployment_replicas_since(&self.workload_key())
        {
            // Until the watch brings wakegate's own last write, it shows an older count.
            return Ok(match self.wrote {
                Some((wrote, at)) if at > changed_at => wrote,
                _ => n,
            });
        }
        let fresh = self
            .read_at
            .is_some_and(|at| at.elapsed() < self.target.serving.cold_start_timeout)
            && self.last_want == Some(want);
        if fresh && let Some(n) = self.target.observed_replicas() {
            return Ok(n);
        }
        let scale = self
            .api
            .get_scale(&self.kube.workload.name)
            .await
            .map_err(|e| self.classify(e))?;
        let n = scale.spec.and_then(|s| s.replicas).unwrap_or(0).max(0) as u32;
        self.observed(n);
        Ok(n)
    }

    /// Whether a Deployment reported missing has appeared in the watch since: then trying
    /// again cannot wait.
    fn workload_appeared(&self) -> bool {
        self.failure
            .as_ref()
            .is_some_and(|f| f.label == "not_found")
            && self.kube.workload.is_deployment()
            && self
                .inner
                .deployment_replicas_since(&self.workload_key())
                .is_some()
    }

    /// The workload's (namespace, name).
    fn workload_key(&self) -> (String, String) {
        (self.kube.namespace.clone(), self.kube.workload.name.clone())
    }

    fn observed(&mut self, n: u32) {
        self.read_at = Some(Instant::now());
        self.inner.observed(&self.target, &self.kube, n);
    }

    async fn write(&mut self, from: u32, to: u32, waking: bool) -> Result<(), ScaleError> {
        let patch = serde_json::json!({
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "spec": { "replicas": to },
        });
        let name = &self.kube.workload.name;
        let apply = PatchParams::apply(FIELD_MANAGER);
        match self
            .api
            .patch_scale(name, &apply, &Patch::Apply(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let managers = conflicting_managers(&status.message);
                let declared = self.declared_by(&managers).await?;
                if !declared.is_empty() {
                    for manager in &declared {
                        self.inner.count_conflict(manager, "yielded");
                    }
                    return Err(ScaleError::Yielded {
                        workload: self.kube.workload.to_string(),
                        managers: declared.join(", "),
                    });
                }
                for manager in &managers {
                    self.inner.count_conflict(manager, "overridden");
                }
                tracing::info!(
                    namespace = %self.kube.namespace,
                    workload = %self.kube.workload,
                    managers = %managers.join(", "),
                    "taking spec.replicas over from its last updater"
                );
                self.api
                    .patch_scale(name, &apply.clone().force(), &Patch::Apply(&patch))
                    .await
                    .map_err(|e| self.classify(e))?;
            }
            Err(error) => return Err(self.classify(error)),
        }
        tracing::info!(
            namespace = %self.kube.namespace,
            service = %self.kube.service,
            workload = %self.kube.workload,
            from,
            to,
            waking,
            "scaled"
        );
        self.observed(to);
        self.wrote = Some((to, Instant::now()));
        if waking {
            // Counted here, not from the phase the watches show: a workload with replicas
            // and no ready pod may as well be scaling down.
            self.target.waking();
        }
        Ok(())
    }

    /// Of `managers`, those that hold `spec.replicas` by server-side apply (not by update).
    async fn declared_by(&self, managers: &[String]) -> Result<Vec<String>, ScaleError> {
        let object = self
            .api
            .get(&self.kube.workload.name)
            .await
            .map_err(|e| self.classify(e))?;
        let mut declared: Vec<String> = object
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter(|entry| {
                entry.operation.as_deref() == Some("Apply")
                    && entry.manager.as_ref().is_some_and(|m| managers.contains(m))
                    && entry
                        .fields_v1
                        .as_ref()
                        .is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some())
            })
            .filter_map(|entry| entry.manager.clone())
            .collect();
        declared.sort();
        declared.dedup();
        Ok(declared)
    }

    fn classify(&self, error: kube::Error) -> ScaleError {
        match error {
            kube::Error::Api(status) if status.code == 404 => ScaleError::NotFound {
                workload: self.kube.workload.to_string(),
                namespace: self.kube.namespace.clone(),
            },
            kube::Error::Api(status) if status.code == 403 => ScaleError::Forbidden(status.message),
            kube::Error::Api(status) if status.code == 429 => ScaleError::Throttled {
                retry_after: status
                    .details
                    .as_ref()
                    .map(|d| d.retry_after_seconds)
                    .filter(|s| *s > 0)
                    .map(|s| Duration::from_secs(s.into())),
                message: status.message,
            },
            other => ScaleError::Api(other),
        }
    }

    async fn failed(&mut self, error: ScaleError) {
        let text = error.to_string();
        let wait = match &self.failure {
            Some(f) => (f.wait * 2).min(RETRY_MAX),
            None => RETRY_FIRST,
        };
        let wait = match &error {
            ScaleError::Throttled {
                retry_after: Some(after),
                ..
            } => wait.max(*after),
            _ => wait,
        };
        let new_cause = self.failure.as_ref().is_none_or(|f| f.reported != text);
        self.inner.count_failure(error.label());
        if new_cause {
            tracing::warn!(
                namespace = %self.kube.namespace,
                service = %self.kube.service,
                workload = %self.kube.workload,
                error = %text,
                retry_in = ?wait,
                "cannot scale; backing off"
            );
            self.inner
                .events
                .warn(
                    &self.workload_ref(),
                    if matches!(error, ScaleError::Yielded { .. }) {
                        "ScaleConflict"
                    } else {
                        "ScaleFailed"
                    },
                    "Scale",
                    &format!("wakegate could not scale {}: {text}", self.kube.workload),
                )
                .await;
        } else {
            tracing::debug!(workload = %self.kube.workload, error = %text, retry_in = ?wait, "cannot scale; backing off");
        }
        if error.is_lasting()
            && self.target.endpoints().is_empty()
            && self.target.stats.pending() > 0
        {
            self.target.start_failed(text.clone(), None);
        }
        self.failure = Some(Failure {
            lasting: error.is_lasting(),
            label: error.label(),
            reported: text,
            wait,
            retry_at: Instant::now() + wait,
        });
    }

    fn recovered(&mut self) {
        if let Some(failure) = self.failure.take() {
            tracing::info!(
                namespace = %self.kube.namespace,
                workload = %self.kube.workload,
                after = %failure.reported,
                "scaling works again"
            );
        }
    }

    fn workload_ref(&self) -> ObjectReference {
        let w = &self.kube.workload;
        ObjectReference {
            api_version: Some(w.api_version()),
            kind: Some(w.kind.clone()),
            namespace: Some(self.kube.namespace.clone()),
            name: Some(w.name.clone()),
            ..Default::default()
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The managers named in a 409 from server-side apply:
/// `Apply failed with 1 conflict: conflict with "kubectl" with subresource "scale" using apps/v1: .spec.replicas`.
fn conflicting_managers(message: &str) -> Vec<String> {
    let mut managers: Vec<String> = message
        .split("conflict with \"")
        .skip(1)
        .filter_map(|rest| rest.split_once('"').map(|(name, _)| name.to_owned()))
        .collect();
    managers.sort();
    managers.dedup();
    managers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managers_are_read_from_every_conflict_of_the_message() {
        assert_eq!(
            conflicting_managers(
                "Apply failed with 2 conflicts: conflict with \"kubectl\" with subresource \
                 \"scale\" using apps/v1: .spec.replicas\nconflict with \"argocd-controller\" \
                 using apps/v1: .spec.replicas"
            ),
            ["argocd-controller", "kubectl"]
        );
        assert!(conflicting_managers("the object has been modified").is_empty());
    }
}
