//! Lists, paginated like the real server's: `limit` cuts a list into pages, each but the
//! last with an opaque `metadata.continue` token (and `remainingItemCount` when nothing but
//! the namespace selects). Every page shows the objects as they were at the first page's
//! resourceVersion, rebuilt from the kind's change history; once the history no longer
//! reaches back that far (it is bounded, and `expire_watch_history` forgets it, as an etcd
//! compaction would), the token gets `410 Expired`.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::StatusCode;
use serde_json::{Value, json};

use super::rest::{ApiError, Query};
use super::selector::Filter;
use super::store::{ChangeType, Kind, State, str_at};

const EXPIRED_CONTINUE: &str = "The provided continue parameter is too old to display a \
    consistent list result. You can start a new list without the continue parameter, or use \
    the continue token in this response to retrieve the remainder of the results. Continuing \
    with the provided token results in an inconsistent list - objects that were created, \
    modified, or deleted between the time the first chunk was returned and now may show up in \
    the list.";

/// Where a page starts: the snapshot's resourceVersion (-1: the latest) and the first key
/// (`name` in a namespace, `namespace/name` across namespaces).
struct Continue {
    rv: i64,
    start: String,
}

/// The token as the real server encodes it: its JSON, fields in this order, base64url.
fn encode_continue(rv: i64, start: &str) -> String {
    let token = format!(
        "{{\"v\":\"meta.k8s.io/v1\",\"rv\":{rv},\"start\":{}}}",
        Value::from(start)
    );
    URL_SAFE_NO_PAD.encode(token)
}

fn decode_continue(token: &str) -> Result<Continue, ApiError> {
    let invalid = |why: String| {
        ApiError::bad_request(format!(
            "invalid continue token: continue key is not valid: {why}"
        ))
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|e| invalid(e.to_string()))?;
    let token: Value = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    match token["v"].as_str() {
        Some("meta.k8s.io/v1") => {}
        other => {
            return Err(invalid(format!(
                "server does not recognize this encoded version {:?}",
                other.unwrap_or("")
            )));
        }
    }
    let rv = token["rv"].as_i64().unwrap_or(0);
    if rv == 0 {
        return Err(invalid(
            "incorrect encoded start resourceVersion (version meta.k8s.io/v1)".into(),
        ));
    }
    let start = token["start"].as_str().unwrap_or("");
    if start.is_empty() {
        return Err(invalid(
            "encoded start key empty (version meta.k8s.io/v1)".into(),
        ));
    }
    Ok(Continue {
        rv,
        start: start.to_owned(),
    })
}

/// The objects of `kind` as they were at `rv`, by `namespace/name`; `None` when the
/// history no longer reaches back to it.
fn snapshot(state: &State, kind: Kind, rv: u64) -> Option<BTreeMap<String, Value>> {
    let mut objects: BTreeMap<String, Value> = state
        .objects
        .iter()
        .filter(|((k, _, _), _)| *k == kind)
        .map(|((_, ns, name), stored)| (format!("{ns}/{name}"), stored.object.clone()))
        .collect();
    if rv >= state.rv {
        return Some(objects);
    }
    let history = &state.history[kind as usize];
    if rv < history.start {
        return None;
    }
    for change in history.changes.iter().rev().take_while(|c| c.rv > rv) {
        let key = format!(
            "{}/{}",
            str_at(&change.object, "/metadata/namespace"),
            str_at(&change.object, "/metadata/name")
        );
        match (change.change, &change.previous) {
            (ChangeType::Added, _) => {
                objects.remove(&key);
            }
            (ChangeType::Modified | ChangeType::Deleted, Some(previous)) => {
                objects.insert(key, previous.clone());
            }
            (ChangeType::Modified | ChangeType::Deleted, None) => return None,
        }
    }
    Some(objects)
}

/// `GET` of a collection: the `{Kind}List`, or a page of it.
pub(super) fn list(
    state: &State,
    kind: Kind,
    namespace: Option<&str>,
    filter: &Filter,
    query: &Query,
) -> Result<Value, ApiError> {
    let limit = match query.get("limit") {
        None | Some("") => None,
        Some(text) => {
            let limit: i64 = text
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {text:?}")))?;
            usize::try_from(limit).ok().filter(|n| *n > 0)
        }
    };
    let resource_version = query.get("resourceVersion").unwrap_or("");
    let token = match query.get("continue") {
        None | Some("") => None,
        Some(token) => {
            if !resource_version.is_empty() {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            Some(decode_continue(token)?)
        }
    };
    // resourceVersion=0 is served from the watch cache, which does not page.
    let limit = if resource_version == "0" { None } else { limit };
    let prefix = namespace.map(|ns| format!("{ns}/")).unwrap_or_default();
    let (rv, start) = match &token {
        Some(token) => (token.rv, format!("{prefix}{}", token.start)),
        None => (-1, prefix.clone()),
    };
    let snapshot_rv = u64::try_from(rv).unwrap_or(state.rv);
    let Some(objects) = snapshot(state, kind, snapshot_rv) else {
        let start = token.as_ref().map(|t| t.start.as_str()).unwrap_or("");
        return Err(ApiError::new(StatusCode::GONE, "Expired", EXPIRED_CONTINUE)
            .with_metadata(json!({"continue": encode_continue(-1, start)})));
    };
    let in_range: Vec<(&String, &Value)> = objects
        .range(start..)
        .take_while(|(key, _)| key.starts_with(&prefix))
        .collect();
    let matching: Vec<(&String, &Value)> = in_range
        .iter()
        .copied()
        .filter(|(_, object)| filter.matches(object))
        .collect();
    let mut metadata = json!({"resourceVersion": snapshot_rv.to_string()});
    let items: Vec<Value> = match limit {
        Some(limit) if matching.len() > limit => {
            let (last_key, _) = matching[limit - 1];
            let next = format!("{}\u{0}", &last_key[prefix.len()..]);
            let rv = i64::try_from(snapshot_rv).unwrap_or(i64::MAX);
            metadata["continue"] = encode_continue(rv, &next).into();
            if !filter.selects_beyond_namespace() {
                let returned = in_range.iter().take_while(|(k, _)| *k <= last_key).count();
                metadata["remainingItemCount"] = (in_range.len() - returned).into();
            }
            matching[..limit]
                .iter()
                .map(|(_, o)| (*o).clone())
                .collect()
        }
        _ => matching.iter().map(|(_, o)| (*o).clone()).collect(),
    };
    Ok(json!({
        "kind": format!("{}List", kind.name()),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": items,
    }))
}
