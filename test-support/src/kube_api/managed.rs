//! Field ownership (`metadata.managedFields`) and server-side apply, after the real server's
//! structured-merge-diff, simplified: a field set holds leaf paths only (scalars, lists and
//! empty maps; lists are atomic), so no `k:`/`v:`/`i:` list-item entries are made.
//!
//! An Update (create, replace, merge patch, a write to `/scale` or `/status`) gives its
//! manager the fields it changed or added; every other manager loses them, and everyone loses
//! what it removed. An Apply makes its manager own exactly the fields of its configuration; it
//! fails with `409 Conflict` when it would change a field another manager owns, unless forced
//! (then the others lose it); applying the same value makes shared ownership. Fields the
//! applier applied before and leaves out now are removed when no one else owns them.
//!
//! As on the real server, tracking starts when an object is created (or first applied to):
//! an update of an object without managedFields records none, and the first apply to such
//! an object finds its fields owned by `before-first-apply`.

use std::collections::{BTreeMap, BTreeSet};

use http::StatusCode;
use serde_json::{Map, Value, json};

use super::rest::ApiError;
use super::store::{Kind, default_fields, now_rfc3339};

/// A field path as FieldsV1 spells its steps: `["f:spec", "f:replicas"]`.
type Path = Vec<String>;
type FieldSet = BTreeSet<Path>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Operation {
    Apply,
    Update,
}

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Operation::Apply => "Apply",
            Operation::Update => "Update",
        }
    }
}

/// Who writes, and through which subresource (`None`: the main resource).
#[derive(Clone, Copy, Debug)]
pub(super) struct Writer<'a> {
    pub(super) manager: &'a str,
    pub(super) subresource: Option<&'a str>,
}

/// One `metadata.managedFields` entry.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub(super) manager: String,
    pub(super) operation: Operation,
    pub(super) api_version: String,
    pub(super) subresource: Option<String>,
    time: Option<String>,
    fields: FieldSet,
}

impl Entry {
    /// The real server's manager identifier: an Apply's does not name the apiVersion, so an
    /// applier keeps its fields across versions; an Update's does.
    fn identifier(&self) -> String {
        let quoted = |s: &str| Value::from(s).to_string();
        let mut id = format!(
            "{{\"manager\":{},\"operation\":\"{}\"",
            quoted(&self.manager),
            self.operation.name()
        );
        if self.operation == Operation::Update {
            id.push_str(&format!(",\"apiVersion\":{}", quoted(&self.api_version)));
        }
        if let Some(subresource) = &self.subresource {
            id.push_str(&format!(",\"subresource\":{}", quoted(subresource)));
        }
        id.push('}');
        id
    }

    /// How a conflict names this manager, as `printManager` does.
    fn describe(&self) -> String {
        let mut text = Value::from(self.manager.as_str()).to_string();
        if let Some(subresource) = &self.subresource {
            text.push_str(&format!(
                " with subresource {}",
                Value::from(subresource.as_str())
            ));
        }
        if self.operation == Operation::Update {
            text.push_str(&format!(" using {}", self.api_version));
        }
        text
    }

    pub(super) fn owns(&self, field: &str) -> bool {
        self.fields.contains(&parse_dotted(field))
    }

    /// The owned fields, as `.spec.replicas`.
    pub(super) fn field_names(&self) -> Vec<String> {
        self.fields.iter().map(|p| dotted(p)).collect()
    }

    fn to_json(&self) -> Value {
        let mut entry = json!({
            "manager": self.manager,
            "operation": self.operation.name(),
            "apiVersion": self.api_version,
            "fieldsType": "FieldsV1",
            "fieldsV1": encode_fields(&self.fields),
        });
        if let Some(time) = &self.time {
            entry["time"] = time.as_str().into();
        }
        if let Some(subresource) = &self.subresource {
            entry["subresource"] = subresource.as_str().into();
        }
        entry
    }

    fn from_json(value: &Value) -> Option<Entry> {
        let operation = match value["operation"].as_str()? {
            "Apply" => Operation::Apply,
            "Update" => Operation::Update,
            _ => return None,
        };
        let api_version = value["apiVersion"].as_str().filter(|v| !v.is_empty())?;
        if value["fieldsType"].as_str()? != "FieldsV1" {
            return None;
        }
        let mut fields = FieldSet::new();
        if let Some(tree) = value.get("fieldsV1") {
            decode_fields(tree, &mut Vec::new(), &mut fields)?;
        }
        Some(Entry {
            manager: value["manager"].as_str().unwrap_or("").to_owned(),
            operation,
            api_version: api_version.to_owned(),
            subresource: value["subresource"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            time: value["time"].as_str().map(str::to_owned),
            fields,
        })
    }
}

/// The managedFields entries of an object; an undecodable list counts as none.
pub(super) fn entries(object: &Value) -> Vec<Entry> {
    object["metadata"]["managedFields"]
        .as_array()
        .and_then(|list| list.iter().map(Entry::from_json).collect())
        .unwrap_or_default()
}

fn set_entries(object: &mut Value, mut entries: Vec<Entry>) {
    entries.retain(|e| !e.fields.is_empty());
    // The real server's order: Apply before Update, then by time, manager, apiVersion and
    // subresource.
    entries.sort_by(|a, b| {
        (
            a.operation.name(),
            &a.time,
            &a.manager,
            &a.api_version,
            &a.subresource,
        )
            .cmp(&(
                b.operation.name(),
                &b.time,
                &b.manager,
                &b.api_version,
                &b.subresource,
            ))
    });
    let Some(meta) = object["metadata"].as_object_mut() else {
        return;
    };
    if entries.is_empty() {
        meta.remove("managedFields");
    } else {
        let list = entries.iter().map(Entry::to_json).collect();
        meta.insert("managedFields".into(), Value::Array(list));
    }
}

/// Whether a write through `subresource` owns `path` of a `kind`: never the fields the server
/// sets; through the main resource not `status` where there is a `/status`; through `/status`
/// only `status`; through `/scale` only `spec.replicas`.
fn tracked(kind: Kind, subresource: Option<&str>, path: &[String]) -> bool {
    let steps: Vec<&str> = path.iter().map(String::as_str).collect();
    match steps.as_slice() {
        ["f:apiVersion"] | ["f:kind"] => return false,
        ["f:metadata", field, ..]
            if matches!(
                *field,
                "f:name"
                    | "f:namespace"
                    | "f:uid"
                    | "f:resourceVersion"
                    | "f:generation"
                    | "f:creationTimestamp"
                    | "f:selfLink"
                    | "f:clusterName"
                    | "f:managedFields"
            ) =>
        {
            return false;
        }
        _ => {}
    }
    match subresource {
        None => !(kind.has_status_subresource() && steps.first() == Some(&"f:status")),
        Some("status") => steps.first() == Some(&"f:status"),
        Some("scale") => steps == ["f:spec", "f:replicas"],
        Some(_) => false,
    }
}

/// The leaves of an object (scalars, lists, empty maps; nulls are no field) that a write
/// through `subresource` owns.
fn leaves(kind: Kind, subresource: Option<&str>, object: &Value) -> BTreeMap<Path, Value> {
    fn walk(value: &Value, path: &mut Path, out: &mut BTreeMap<Path, Value>) {
        match value {
            Value::Null => {}
            Value::Object(map) if !map.is_empty() => {
                for (key, child) in map {
                    path.push(format!("f:{key}"));
                    walk(child, path, out);
                    path.pop();
                }
            }
            leaf => {
                if !path.is_empty() {
                    out.insert(path.clone(), leaf.clone());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(object, &mut Vec::new(), &mut out);
    out.retain(|path, _| tracked(kind, subresource, path));
    out
}

/// (changed or added, removed) fields from `before` to `after`.
fn diff(before: &BTreeMap<Path, Value>, after: &BTreeMap<Path, Value>) -> (FieldSet, FieldSet) {
    let changed = after
        .iter()
        .filter(|(path, value)| before.get(*path) != Some(value))
        .map(|(path, _)| path.clone())
        .collect();
    let removed = before
        .keys()
        .filter(|path| !after.contains_key(*path))
        .cloned()
        .collect();
    (changed, removed)
}

/// Records an Update by `writer` that turns `live` (`None`: a create) into `new`, in
/// `new`'s managedFields. A write to the main resource may set managedFields itself (`[]`
/// resets them); otherwise, and through a subresource, the live object's are kept.
pub(super) fn update(kind: Kind, live: Option<&Value>, new: &mut Value, writer: Writer<'_>) {
    let sent = &new["metadata"]["managedFields"];
    let mut current = match sent.as_array() {
        Some(list) if writer.subresource.is_none() && list.is_empty() => Vec::new(),
        Some(_) if writer.subresource.is_none() && !entries(new).is_empty() => entries(new),
        _ => live.map(entries).unwrap_or_default(),
    };
    if current.is_empty() && live.is_some() {
        // Tracking starts at the create or at the first apply: an update of an object
        // without managedFields records none.
        set_entries(new, current);
        return;
    }
    let empty = json!({});
    let before = leaves(kind, writer.subresource, live.unwrap_or(&empty));
    let after = leaves(kind, writer.subresource, new);
    let (changed, removed) = diff(&before, &after);
    let me = Entry {
        manager: writer.manager.to_owned(),
        operation: Operation::Update,
        api_version: kind.api_version().to_owned(),
        subresource: writer.subresource.map(str::to_owned),
        time: None,
        fields: FieldSet::new(),
    };
    let id = me.identifier();
    for entry in &mut current {
        if entry.identifier() != id {
            entry.fields.retain(|p| !changed.contains(p));
        }
        entry.fields.retain(|p| !removed.contains(p));
    }
    if !changed.is_empty() {
        let index = match current.iter().position(|e| e.identifier() == id) {
            Some(index) => index,
            None => {
                current.push(me);
                current.len() - 1
            }
        };
        let mine = &mut current[index];
        mine.fields.extend(changed);
        mine.time = Some(now_rfc3339());
    }
    set_entries(new, current);
}

/// A server-side apply of `config` by `writer` to `live` (`None`: it creates the object,
/// `base` being its name and namespace): the object it makes, with its managedFields.
/// Pruning is skipped through `/scale`.
pub(super) fn apply(
    kind: Kind,
    live: Option<&Value>,
    base: Value,
    config: &Value,
    writer: Writer<'_>,
    force: bool,
) -> Result<Value, ApiError> {
    let live_object = live.cloned().unwrap_or(base);
    let mut current = entries(&live_object);
    if current.is_empty() && live.is_some() {
        // What an object without managedFields has is owned by `before-first-apply`.
        let fields: FieldSet = leaves(kind, writer.subresource, &live_object)
            .into_keys()
            .collect();
        current.push(Entry {
            manager: "before-first-apply".to_owned(),
            operation: Operation::Update,
            api_version: kind.api_version().to_owned(),
            subresource: writer.subresource.map(str::to_owned),
            time: Some(now_rfc3339()),
            fields,
        });
    }
    let applied: FieldSet = leaves(kind, writer.subresource, config)
        .into_keys()
        .collect();
    let me = Entry {
        manager: writer.manager.to_owned(),
        operation: Operation::Apply,
        api_version: kind.api_version().to_owned(),
        subresource: writer.subresource.map(str::to_owned),
        time: None,
        fields: applied.clone(),
    };
    let id = me.identifier();
    let previous = current.iter().position(|e| e.identifier() == id);
    let last = previous
        .map(|i| current[i].fields.clone())
        .unwrap_or_default();

    let mut merged = patched(&live_object, config);
    merged["metadata"]["managedFields"] = live_object["metadata"]["managedFields"].clone();
    if writer.subresource.is_none() && kind.has_status_subresource() {
        merged["status"] = live_object["status"].clone();
        if merged["status"].is_null()
            && let Some(object) = merged.as_object_mut()
        {
            object.remove("status");
        }
    }
    if writer.subresource != Some("scale") {
        for path in last.difference(&applied) {
            let owned_by_others = current
                .iter()
                .any(|e| e.identifier() != id && e.fields.contains(path));
            if !owned_by_others {
                remove_path(&mut merged, path);
            }
        }
    }
    default_fields(kind, &mut merged);

    let (changed, removed) = diff(
        &leaves(kind, writer.subresource, &live_object),
        &leaves(kind, writer.subresource, &merged),
    );
    let conflicts: Vec<(&Entry, Vec<&Path>)> = current
        .iter()
        .filter(|e| e.identifier() != id)
        .map(|e| (e, e.fields.intersection(&changed).collect::<Vec<_>>()))
        .filter(|(_, paths)| !paths.is_empty())
        .collect();
    if !force && !conflicts.is_empty() {
        return Err(conflict_error(conflicts));
    }
    for entry in &mut current {
        if entry.identifier() != id {
            entry
                .fields
                .retain(|p| !changed.contains(p) && !removed.contains(p));
        }
    }
    let object_changed = merged != live_object || live.is_none();
    match previous {
        Some(index) => {
            let mine = &mut current[index];
            if object_changed || mine.fields != applied || mine.time.is_none() {
                mine.time = Some(now_rfc3339());
            }
            mine.fields = applied;
            mine.api_version = me.api_version;
        }
        None => current.push(Entry {
            time: Some(now_rfc3339()),
            ..me
        }),
    }
    set_entries(&mut merged, current);
    Ok(merged)
}

/// `live` with `patch` merged in (RFC 7386), its identity kept: whatever the patch says of
/// its name, namespace, uid, creation time and resourceVersion, the server keeps its own.
pub(super) fn patched(live: &Value, patch: &Value) -> Value {
    let mut merged = live.clone();
    merge_patch(&mut merged, patch);
    for field in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "resourceVersion",
    ] {
        merged["metadata"][field] = live["metadata"][field].clone();
    }
    merged
}

/// RFC 7386 JSON merge patch, which is also how an applied configuration merges into the
/// object: maps merge, anything else (lists included) is replaced; a null removes the field.
pub(super) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("an object");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Removes a leaf, and the maps its removal leaves empty.
fn remove_path(object: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(key) = first.strip_prefix("f:") else {
        return;
    };
    let Some(map) = object.as_object_mut() else {
        return;
    };
    if rest.is_empty() {
        map.remove(key);
        return;
    }
    if let Some(child) = map.get_mut(key) {
        let was_empty = child.as_object().is_some_and(Map::is_empty);
        remove_path(child, rest);
        if !was_empty && child.as_object().is_some_and(Map::is_empty) {
            map.remove(key);
        }
    }
}

/// The real server's `409 Conflict` for an apply: one cause per conflicting field.
fn conflict_error(conflicts: Vec<(&Entry, Vec<&Path>)>) -> ApiError {
    let mut conflicts = conflicts;
    conflicts.sort_by_key(|(entry, _)| entry.identifier());
    let count: usize = conflicts.iter().map(|(_, paths)| paths.len()).sum();
    let causes: Vec<Value> = conflicts
        .iter()
        .flat_map(|(entry, paths)| {
            paths.iter().map(move |path| {
                json!({
                    "reason": "FieldManagerConflict",
                    "message": format!("conflict with {}", entry.describe()),
                    "field": dotted(path),
                })
            })
        })
        .collect();
    let message = if count == 1 {
        let (entry, paths) = &conflicts[0];
        format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            entry.describe(),
            dotted(paths[0])
        )
    } else {
        let lines: Vec<String> = conflicts
            .iter()
            .flat_map(|(entry, paths)| {
                std::iter::once(format!("conflicts with {}:", entry.describe()))
                    .chain(paths.iter().map(|p| format!("- {}", dotted(p))))
            })
            .collect();
        format!("Apply failed with {count} conflicts: {}", lines.join("\n"))
    };
    ApiError::new(StatusCode::CONFLICT, "Conflict", message)
        .with_details(json!({ "causes": causes }))
}

/// `.spec.replicas`, as the real server prints a field path.
fn dotted(path: &[String]) -> String {
    path.iter()
        .map(|step| match step.strip_prefix("f:") {
            Some(field) => format!(".{field}"),
            None => format!("[{step}]"),
        })
        .collect()
}

/// `.spec.replicas` back into a path (fields only).
fn parse_dotted(field: &str) -> Path {
    field
        .split('.')
        .filter(|s| !s.is_empty())
        .map(|s| format!("f:{s}"))
        .collect()
}

/// FieldsV1: nested maps of steps, `{}` for an owned leaf, `".": {}` for an owned field that
/// also has owned children.
fn encode_fields(fields: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in fields {
        let mut node = &mut root;
        for step in path {
            node = node
                .entry(step.clone())
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("a map");
        }
        if !node.is_empty() {
            node.insert(".".into(), json!({}));
        }
    }
    // A member that got children after it was inserted as a leaf gets its "." too.
    fn mark(node: &mut Map<String, Value>, fields: &FieldSet, path: &mut Path) {
        for (step, child) in node.iter_mut() {
            if step == "." {
                continue;
            }
            path.push(step.clone());
            let child = child.as_object_mut().expect("a map");
            if !child.is_empty() && fields.contains(path) {
                child.insert(".".into(), json!({}));
            }
            mark(child, fields, path);
            path.pop();
        }
    }
    mark(&mut root, fields, &mut Vec::new());
    Value::Object(root)
}

fn decode_fields(tree: &Value, path: &mut Path, out: &mut FieldSet) -> Option<()> {
    let map = tree.as_object()?;
    if map.is_empty() && !path.is_empty() {
        out.insert(path.clone());
    }
    for (step, child) in map {
        if step == "." {
            if !path.is_empty() {
                out.insert(path.clone());
            }
            continue;
        }
        path.push(step.clone());
        decode_fields(child, path, out)?;
        path.pop();
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_v1_round_trips_with_dot_for_owned_parents() {
        let mut fields = FieldSet::new();
        fields.insert(parse_dotted(".spec.replicas"));
        fields.insert(parse_dotted(".metadata.labels"));
        fields.insert(parse_dotted(".metadata.labels.app"));
        let encoded = encode_fields(&fields);
        assert_eq!(
            encoded,
            json!({
                "f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                "f:spec": {"f:replicas": {}},
            })
        );
        let mut decoded = FieldSet::new();
        decode_fields(&encoded, &mut Vec::new(), &mut decoded).unwrap();
        assert_eq!(decoded, fields);
    }

    #[test]
    fn conflict_messages_name_the_owner_like_the_real_server() {
        let owner = |manager: &str, operation, subresource: Option<&str>| Entry {
            manager: manager.into(),
            operation,
            api_version: "apps/v1".into(),
            subresource: subresource.map(str::to_owned),
            time: Some("2025-01-01T00:00:00Z".into()),
            fields: FieldSet::new(),
        };
        let replicas = parse_dotted(".spec.replicas");
        let hpa = owner("hpa", Operation::Update, Some("scale"));
        let error = conflict_error(vec![(&hpa, vec![&replicas])]);
        assert_eq!(
            error.status()["message"],
            "Apply failed with 1 conflict: conflict with \"hpa\" with subresource \"scale\" \
             using apps/v1: .spec.replicas"
        );
        let image = parse_dotted(".spec.image");
        let argo = owner("argo", Operation::Apply, None);
        let error = conflict_error(vec![
            (&hpa, vec![&replicas]),
            (&argo, vec![&image, &replicas]),
        ]);
        let status = error.status();
        assert_eq!(
            status["message"],
            "Apply failed with 3 conflicts: conflicts with \"argo\":\n- .spec.image\n\
             - .spec.replicas\nconflicts with \"hpa\" with subresource \"scale\" using apps/v1:\n\
             - .spec.replicas"
        );
        assert_eq!(status["details"]["causes"].as_array().unwrap().len(), 3);
        assert_eq!(
            status["details"]["causes"][0],
            json!({"reason": "FieldManagerConflict", "message": "conflict with \"argo\"",
                   "field": ".spec.image"})
        );
    }
}
