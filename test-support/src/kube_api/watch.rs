//! Watches: the initial list or a replay from a resourceVersion, then changes as they come,
//! bookmarks, `410 Expired` when the history no longer reaches back, and cuts in an outage.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::rest::{ApiError, Body, Query, status_json};
use super::selector::Filter;
use super::store::{Change, ChangeType, Kind, Shared};

const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// A watch without `timeoutSeconds` ends after this long (the real server picks 30–60 min).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

type Frames = mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;

struct WatchSpec {
    kind: Kind,
    filter: Filter,
    /// Replay changes after this version; `None`: start with the current objects.
    from: Option<u64>,
    initial_events_end: bool,
    bookmarks: bool,
    timeout: Duration,
}

pub(super) fn start_watch(
    shared: &Arc<Shared>,
    kind: Kind,
    filter: Filter,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let send_initial_events = query.flag("sendInitialEvents");
    let from = match query.get("resourceVersion").unwrap_or("") {
        "" | "0" => None,
        _ if send_initial_events => None,
        rv => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
        ),
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let spec = WatchSpec {
        kind,
        filter,
        from,
        initial_events_end: send_initial_events,
        bookmarks: query.flag("allowWatchBookmarks"),
        timeout,
    };
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(run_watch(shared.clone(), spec, tx));
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|frame| (frame, rx))
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(StreamBody::new(frames).boxed_unsync())
        .expect("a valid response"))
}

/// What a watch sends next.
enum Step {
    Lines(Vec<Value>),
    /// An outage or shutdown: the connection is cut.
    Cut,
    /// The history no longer reaches back to where the watch is: `410`, then the end.
    Expired(u64, u64),
}

async fn run_watch(shared: Arc<Shared>, spec: WatchSpec, tx: Frames) {
    let mut changes = shared.changed.subscribe();
    let deadline = Instant::now() + spec.timeout;
    let mut next_bookmark = Instant::now() + BOOKMARK_INTERVAL;
    let (mut last, initial) = {
        let state = shared.state();
        match spec.from {
            Some(from) => (from, Vec::new()),
            None => {
                let mut lines: Vec<Value> = state
                    .list(spec.kind, &spec.filter)
                    .into_iter()
                    .map(|object| json!({"type": "ADDED", "object": object}))
                    .collect();
                if spec.initial_events_end {
                    lines.push(bookmark(spec.kind, state.rv, true));
                }
                (state.rv, lines)
            }
        }
    };
    if !send_lines(&tx, initial).await {
        return;
    }
    loop {
        // Like the real server, a watch that times out sends a last bookmark first.
        let ending = Instant::now() >= deadline;
        let step = {
            let state = shared.state();
            let history = &state.history[spec.kind as usize];
            if state.down || state.closed {
                Step::Cut
            } else if last < history.start {
                Step::Expired(last, history.start)
            } else {
                let mut lines: Vec<Value> = history
                    .changes
                    .iter()
                    .filter(|change| change.rv > last)
                    .filter_map(|change| visible(change, &spec.filter))
                    .collect();
                last = state.rv;
                if spec.bookmarks && (ending || Instant::now() >= next_bookmark) {
                    lines.push(bookmark(spec.kind, state.rv, false));
                    next_bookmark = Instant::now() + BOOKMARK_INTERVAL;
                }
                Step::Lines(lines)
            }
        };
        match step {
            Step::Lines(lines) => {
                if !send_lines(&tx, lines).await {
                    return;
                }
            }
            Step::Cut => {
                let cut = std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "the fake API server went down",
                );
                let _ = tx.send(Err(cut)).await;
                return;
            }
            Step::Expired(from, start) => {
                let message = format!("too old resource version: {from} ({start})");
                let error =
                    json!({"type": "ERROR", "object": status_json(410, "Expired", &message)});
                send_lines(&tx, vec![error]).await;
                return;
            }
        }
        if ending {
            return;
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep_until(next_bookmark), if spec.bookmarks => {}
            () = tokio::time::sleep_until(deadline) => {}
            () = tx.closed() => return,
        }
    }
}

/// A change as a watch with `filter` sees it: an object that starts (or stops) matching is
/// ADDED (or DELETED) for it, like the real server does.
fn visible(change: &Change, filter: &Filter) -> Option<Value> {
    let now = filter.matches(&change.object);
    let before = change.previous.as_ref().is_some_and(|p| filter.matches(p));
    let event = match change.change {
        ChangeType::Added if now => "ADDED",
        ChangeType::Deleted if now => "DELETED",
        ChangeType::Modified if now && before => "MODIFIED",
        ChangeType::Modified if now => "ADDED",
        ChangeType::Modified if before => "DELETED",
        _ => return None,
    };
    Some(json!({"type": event, "object": change.object}))
}

fn bookmark(kind: Kind, rv: u64, initial_events_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({
        "type": "BOOKMARK",
        "object": {"kind": kind.name(), "apiVersion": kind.api_version(), "metadata": metadata},
    })
}

/// False once the client has gone.
async fn send_lines(tx: &Frames, lines: Vec<Value>) -> bool {
    for line in lines {
        let frame = Frame::data(Bytes::from(format!("{line}\n")));
        if tx.send(Ok(frame)).await.is_err() {
            return false;
        }
    }
    true
}
