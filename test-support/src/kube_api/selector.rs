//! Label and field selectors: what a list or watch selects.

use serde_json::Value;

use super::rest::{ApiError, Query};
use super::store::str_at;

/// What a list or watch selects: a namespace, labels and fields.
#[derive(Clone, Default)]
pub(super) struct Filter {
    namespace: Option<String>,
    labels: Vec<LabelRequirement>,
    fields: Vec<(String, bool, String)>,
}

#[derive(Clone)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Filter {
    pub(super) fn from_query(namespace: Option<&str>, query: &Query) -> Result<Filter, ApiError> {
        let labels = match query.get("labelSelector") {
            Some(selector) => parse_label_selector(selector).map_err(ApiError::bad_request)?,
            None => Vec::new(),
        };
        let mut fields = Vec::new();
        for term in query
            .get("fieldSelector")
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: {term}"
                )));
            };
            if !matches!(field.trim(), "metadata.name" | "metadata.namespace") {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {}",
                    field.trim()
                )));
            }
            fields.push((field.trim().to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Filter {
            namespace: namespace.map(str::to_owned),
            labels,
            fields,
        })
    }

    /// Whether labels or fields select, beyond the namespace of the request's path.
    pub(super) fn selects_beyond_namespace(&self) -> bool {
        !self.labels.is_empty() || !self.fields.is_empty()
    }

    pub(super) fn matches(&self, object: &Value) -> bool {
        let namespace = str_at(object, "/metadata/namespace");
        if self.namespace.as_deref().is_some_and(|ns| ns != namespace) {
            return false;
        }
        let fields_match = self.fields.iter().all(|(field, equal, value)| {
            let actual = match field.as_str() {
                "metadata.name" => str_at(object, "/metadata/name"),
                _ => namespace,
            };
            (actual == value) == *equal
        });
        let labels = &object["metadata"]["labels"];
        let label = |key: &str| labels[key].as_str();
        fields_match
            && self.labels.iter().all(|requirement| match requirement {
                LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
                LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
                LabelRequirement::Exists(k) => label(k).is_some(),
                LabelRequirement::NotExists(k) => label(k).is_none(),
                LabelRequirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
                LabelRequirement::NotIn(k, vs) => {
                    !label(k).is_some_and(|l| vs.iter().any(|v| v == l))
                }
            })
    }
}

/// `a=b,c!=d,e,!f,g in (h,i),j notin (k)`.
fn parse_label_selector(selector: &str) -> Result<Vec<LabelRequirement>, String> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    let owned = |s: &str| s.trim().to_owned();
    let mut requirements = Vec::new();
    for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
        let requirement = if let Some((head, values)) = term.split_once('(') {
            let values: Vec<String> = values
                .trim_end()
                .strip_suffix(')')
                .ok_or_else(|| format!("unclosed set in label selector: {term}"))?
                .split(',')
                .map(owned)
                .collect();
            match head.split_whitespace().collect::<Vec<_>>().as_slice() {
                [key, "in"] => LabelRequirement::In(owned(key), values),
                [key, "notin"] => LabelRequirement::NotIn(owned(key), values),
                _ => return Err(format!("invalid label selector term: {term}")),
            }
        } else if let Some((k, v)) = term.split_once("!=") {
            LabelRequirement::NotEquals(owned(k), owned(v))
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            LabelRequirement::Equals(owned(k), owned(v))
        } else if let Some(k) = term.strip_prefix('!') {
            LabelRequirement::NotExists(owned(k))
        } else {
            LabelRequirement::Exists(owned(term))
        };
        requirements.push(requirement);
    }
    Ok(requirements)
}
