//! Kubernetes Events: written by the leader only, so N replicas do not record N copies of
//! every warning (each replica still logs it), once per condition, with notes cut to what the
//! API accepts. Callers report a condition every time they see it; a replica that becomes
//! leader records what is still true then.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

/// The API server refuses an `events.k8s.io/v1` Event whose note is longer (in bytes).
pub const NOTE_LIMIT: usize = 1024;

pub struct Events {
    recorder: Recorder,
    leader: Arc<AtomicBool>,
    /// (namespace, name, reason, note) of every Warning recorded.
    recorded: Mutex<HashSet<(String, String, String, String)>>,
}

impl Events {
    pub fn new(recorder: Recorder, leader: Arc<AtomicBool>) -> Self {
        Self {
            recorder,
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
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(truncate(note, NOTE_LIMIT)),
            action: action.into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, regarding).await {
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
