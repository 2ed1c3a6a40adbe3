//! Kubernetes Events: written by the leader only, so N replicas do not record N copies of
//! every warning (each replica still logs it), once per condition, with notes cut to what the
//! API accepts. Callers report a condition every time they see it; a replica that becomes
//! leader records what is still true then.
//!
//! Not kube-runtime's `Recorder`: it folds every Event with the same object, reason and
//! action into one series, keeping the first note, so a Service's second, different problem
//! would show the first one's text. Here each distinct condition is its own Event, created
//! once (RBAC: `create` only).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};

/// The API server refuses an `events.k8s.io/v1` Event whose note is longer (in bytes).
pub const NOTE_LIMIT: usize = 1024;

pub struct Events {
    client: Client,
    /// `reportingInstance`: this replica.
    instance: String,
    leader: Arc<AtomicBool>,
    /// (namespace, name, reason, note) of every Warning recorded.
    recorded: Mutex<HashSet<(String, String, String, String)>>,
}

impl Events {
    pub fn new(client: Client, instance: String, leader: Arc<AtomicBool>) -> Self {
        Self {
            client,
            instance,
            leader,
            recorded: Mutex::default(),
        }
    }

    /// Records a Warning about `regarding` if this replica leads and has not recorded the
    /// same one yet. Failing to record it is logged, and tried again the next time.
    pub async fn warn(&self, regarding: &ObjectReference, reason: &str, action: &str, note: &str) {
        if !self.leader.load(Ordering::Relaxed) {
            return;
        }
        let key = (
            regarding.namespace.clone().unwrap_or_default(),
            regarding.name.clone().unwrap_or_default(),
            reason.to_owned(),
            note.to_owned(),
        );
        if !self
            .recorded
            .lock()
            .expect("not poisoned")
            .insert(key.clone())
        {
            return;
        }
        let now = Timestamp::now();
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or("wakegate"),
                    now.as_nanosecond()
                )),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some("Warning".into()),
            reason: Some(reason.into()),
            action: Some(action.into()),
            note: Some(truncate(note, NOTE_LIMIT)),
            regarding: Some(regarding.clone()),
            reporting_controller: Some("wakegate".into()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        let events: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        if let Err(error) = events.create(&PostParams::default(), &event).await {
            self.recorded.lock().expect("not poisoned").remove(&key);
            tracing::warn!(
                kind = regarding.kind.as_deref().unwrap_or_default(),
                namespace = regarding.namespace.as_deref().unwrap_or_default(),
                name = regarding.name.as_deref().unwrap_or_default(),
                %reason,
                %error,
                "cannot record the Event"
            );
        }
    }
}

/// `text` cut to at most `limit` bytes on a character boundary, ending in `…` when cut.
pub fn truncate(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    const MORE: &str = "…";
    let mut end = limit - MORE.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MORE}", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_within_the_limit_are_kept_and_longer_ones_cut_on_a_character_boundary() {
        assert_eq!(truncate("short", NOTE_LIMIT), "short");
        let exact = "a".repeat(NOTE_LIMIT);
        assert_eq!(truncate(&exact, NOTE_LIMIT), exact);

        let long = "é".repeat(NOTE_LIMIT);
        let cut = truncate(&long, NOTE_LIMIT);
        assert!(cut.len() <= NOTE_LIMIT, "{}", cut.len());
        assert!(cut.len() > NOTE_LIMIT - 8, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert!(cut.trim_end_matches('…').chars().all(|c| c == 'é'));
    }
}
