//! Events validation, after the real server's (`pkg/apis/core/validation/events.go`): the
//! legacy checks every Event gets, plus the strict ones for `events.k8s.io/v1`. Errors name
//! the fields as the server's internal Event type does (`message` for the `note`,
//! `involvedObject` for `regarding`, `reportingController` for core's `reportingComponent`),
//! and the message is the real `422 Invalid` one: `Event "NAME" is invalid: ...` for both
//! APIs, lengths counted in bytes.

use http::StatusCode;
use serde_json::{Value, json};

use super::rest::ApiError;
use super::store::{Kind, str_at};

const REPORTING_INSTANCE_LENGTH_LIMIT: usize = 128;
const ACTION_LENGTH_LIMIT: usize = 128;
const REASON_LENGTH_LIMIT: usize = 128;
const NOTE_LENGTH_LIMIT: usize = 1024;

/// One field error, as `field.Error` prints it.
struct FieldError {
    field: String,
    kind: ErrorKind,
}

enum ErrorKind {
    Required,
    Invalid { value: String, detail: String },
}

impl FieldError {
    fn required(field: &str) -> FieldError {
        FieldError {
            field: field.to_owned(),
            kind: ErrorKind::Required,
        }
    }

    fn invalid(field: &str, value: &str, detail: impl Into<String>) -> FieldError {
        FieldError {
            field: field.to_owned(),
            kind: ErrorKind::Invalid {
                value: value.to_owned(),
                detail: detail.into(),
            },
        }
    }

    fn reason(&self) -> &'static str {
        match self.kind {
            ErrorKind::Required => "FieldValueRequired",
            ErrorKind::Invalid { .. } => "FieldValueInvalid",
        }
    }

    fn body(&self) -> String {
        match &self.kind {
            ErrorKind::Required => "Required value".to_owned(),
            ErrorKind::Invalid { value, detail } => {
                format!("Invalid value: {}: {detail}", go_quote(value))
            }
        }
    }
}

/// Go's `%q` of a string, near enough: JSON's escaping.
fn go_quote(text: &str) -> String {
    Value::from(text).to_string()
}

/// The event's fields under the names of both APIs.
struct EventView<'a> {
    object: &'a Value,
    v1: bool,
}

impl EventView<'_> {
    fn text(&self, v1_name: &str, core_name: &str) -> &str {
        let name = if self.v1 { v1_name } else { core_name };
        self.object[name].as_str().unwrap_or("")
    }

    fn reporting_controller(&self) -> &str {
        self.text("reportingController", "reportingComponent")
    }

    fn reporting_instance(&self) -> &str {
        self.text("reportingInstance", "reportingInstance")
    }

    fn action(&self) -> &str {
        self.text("action", "action")
    }

    fn reason(&self) -> &str {
        self.text("reason", "reason")
    }

    fn note(&self) -> &str {
        self.text("note", "message")
    }

    fn event_type(&self) -> &str {
        self.text("type", "type")
    }

    fn event_time_set(&self) -> bool {
        self.object["eventTime"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    }

    fn regarding_namespace(&self) -> &str {
        let name = if self.v1 {
            "/regarding/namespace"
        } else {
            "/involvedObject/namespace"
        };
        str_at(self.object, name)
    }

    fn namespace(&self) -> &str {
        str_at(self.object, "/metadata/namespace")
    }
}

/// Validates an Event written through `kind`'s API (`old`: the stored one, for an update);
/// other kinds pass.
pub(super) fn validate(kind: Kind, object: &Value, old: Option<&Value>) -> Result<(), ApiError> {
    let v1 = match kind {
        Kind::Event => true,
        Kind::CoreEvent => false,
        _ => return Ok(()),
    };
    let event = EventView { object, v1 };
    let mut errors = legacy(&event);
    if v1 {
        match old {
            None => errors.extend(strict_create(&event)),
            Some(old) => {
                let old = EventView { object: old, v1 };
                errors.extend(strict_update(&event, &old));
            }
        }
    }
    if errors.is_empty() {
        return Ok(());
    }
    // Like `errors.ToAggregate()`: one message, or `[a, b]`, duplicates dropped.
    let mut messages: Vec<String> = Vec::new();
    for error in &errors {
        let message = format!("{}: {}", error.field, error.body());
        if !messages.contains(&message) {
            messages.push(message);
        }
    }
    let aggregate = match messages.as_slice() {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    let name = str_at(object, "/metadata/name");
    let causes: Vec<Value> = errors
        .iter()
        .map(|e| json!({"reason": e.reason(), "message": e.body(), "field": e.field}))
        .collect();
    // Both APIs store the core Event, so the kind is named without a group.
    let details = json!({"name": name, "kind": "Event", "causes": causes});
    Err(ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        format!("Event {} is invalid: {aggregate}", go_quote(name)),
    )
    .with_details(details))
}

/// What every Event must satisfy (`legacyValidateEvent`).
fn legacy(event: &EventView<'_>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let namespace = event.namespace();
    let regarding_namespace = event.regarding_namespace();
    let mismatch = || {
        FieldError::invalid(
            "involvedObject.namespace",
            regarding_namespace,
            "does not match event.namespace",
        )
    };
    if !event.event_time_set() {
        if regarding_namespace.is_empty() {
            if !namespace.is_empty() && namespace != "default" {
                errors.push(mismatch());
            }
        } else if namespace != regarding_namespace {
            errors.push(mismatch());
        }
        return errors;
    }
    if regarding_namespace.is_empty() && namespace != "default" && namespace != "kube-system" {
        errors.push(mismatch());
    }
    let controller = event.reporting_controller();
    if controller.is_empty() {
        errors.push(FieldError::required("reportingController"));
    }
    for message in qualified_name_errors(controller) {
        errors.push(FieldError::invalid(
            "reportingController",
            controller,
            message,
        ));
    }
    for (field, value, limit) in [
        (
            "reportingInstance",
            event.reporting_instance(),
            REPORTING_INSTANCE_LENGTH_LIMIT,
        ),
        ("action", event.action(), ACTION_LENGTH_LIMIT),
        ("reason", event.reason(), REASON_LENGTH_LIMIT),
    ] {
        if value.is_empty() {
            errors.push(FieldError::required(field));
        }
        if value.len() > limit {
            errors.push(FieldError::invalid(
                field,
                "",
                format!("can have at most {limit} characters"),
            ));
        }
    }
    if event.note().len() > NOTE_LENGTH_LIMIT {
        errors.push(FieldError::invalid(
            "message",
            "",
            format!("can have at most {NOTE_LENGTH_LIMIT} characters"),
        ));
    }
    errors
}

fn series_errors(event: &EventView<'_>) -> Vec<FieldError> {
    let series = &event.object["series"];
    let mut errors = Vec::new();
    if series.is_object() {
        if series["count"].as_i64().unwrap_or(0) < 2 {
            errors.push(FieldError::invalid(
                "series.count",
                "",
                "should be at least 2",
            ));
        }
        if series["lastObservedTime"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            errors.push(FieldError::required("series.lastObservedTime"));
        }
    }
    errors
}

/// The strict checks of a create through events.k8s.io/v1.
fn strict_create(event: &EventView<'_>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let name = str_at(event.object, "/metadata/name");
    for message in dns_subdomain_errors(name) {
        errors.push(FieldError::invalid("metadata.name", name, message));
    }
    errors.extend(series_errors(event));
    if !event.event_time_set() {
        errors.push(FieldError::required("eventTime"));
    }
    let event_type = event.event_type();
    if event_type != "Normal" && event_type != "Warning" {
        errors.push(FieldError::invalid(
            "type",
            "",
            format!("has invalid value: {event_type}"),
        ));
    }
    for (v1_name, internal) in [
        ("deprecatedFirstTimestamp", "firstTimestamp"),
        ("deprecatedLastTimestamp", "lastTimestamp"),
    ] {
        if event.object[v1_name]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            errors.push(FieldError::invalid(internal, "", "needs to be unset"));
        }
    }
    if event.object["deprecatedCount"].as_i64().unwrap_or(0) != 0 {
        errors.push(FieldError::invalid("count", "", "needs to be unset"));
    }
    let source = &event.object["deprecatedSource"];
    if ["component", "host"]
        .iter()
        .any(|f| source[f].as_str().is_some_and(|s| !s.is_empty()))
    {
        errors.push(FieldError::invalid("source", "", "needs to be unset"));
    }
    errors
}

/// The strict checks of an update through events.k8s.io/v1: a changed series is valid, and
/// what describes the occurrence stays as it was.
fn strict_update(event: &EventView<'_>, old: &EventView<'_>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if event.object["series"] != old.object["series"] {
        errors.extend(series_errors(event));
    }
    let immutable = [
        ("reason", event.reason(), old.reason()),
        ("message", event.note(), old.note()),
        ("type", event.event_type(), old.event_type()),
        ("action", event.action(), old.action()),
        (
            "reportingController",
            event.reporting_controller(),
            old.reporting_controller(),
        ),
        (
            "reportingInstance",
            event.reporting_instance(),
            old.reporting_instance(),
        ),
    ];
    for (field, new, old) in immutable {
        if new != old {
            errors.push(FieldError::invalid(field, new, "field is immutable"));
        }
    }
    errors
}

const QUALIFIED_NAME_ERROR: &str = "must consist of alphanumeric characters, '-', '_' or '.', \
    and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or \
    '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";

const DNS_SUBDOMAIN_ERROR: &str = "a lowercase RFC 1123 subdomain must consist of lower case \
    alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character \
    (e.g. 'example.com', regex used for validation is \
    '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

/// `validation.IsQualifiedName`.
fn qualified_name_errors(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let parts: Vec<&str> = value.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errors.push("prefix part must be non-empty".to_owned());
            } else {
                errors.extend(
                    dns_subdomain_errors(prefix)
                        .into_iter()
                        .map(|e| format!("prefix part {e}")),
                );
            }
            *name
        }
        _ => {
            return vec![format!(
                "a qualified name {QUALIFIED_NAME_ERROR} with an optional DNS subdomain prefix \
                 and '/' (e.g. 'example.com/MyName')"
            )];
        }
    };
    if name.is_empty() {
        errors.push("name part must be non-empty".to_owned());
    } else if name.len() > 63 {
        errors.push("name part must be no more than 63 characters".to_owned());
    }
    let alnum = |c: char| c.is_ascii_alphanumeric();
    let well_formed = !name.is_empty()
        && name.starts_with(alnum)
        && name.ends_with(alnum)
        && name
            .chars()
            .all(|c| alnum(c) || matches!(c, '-' | '_' | '.'));
    if !well_formed {
        errors.push(format!("name part {QUALIFIED_NAME_ERROR}"));
    }
    errors
}

/// `validation.IsDNS1123Subdomain`.
fn dns_subdomain_errors(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if value.len() > 253 {
        errors.push("must be no more than 253 characters".to_owned());
    }
    let label_ok = |label: &str| {
        let lower = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        !label.is_empty()
            && label.starts_with(lower)
            && label.ends_with(lower)
            && label.chars().all(|c| lower(c) || c == '-')
    };
    if !value.split('.').all(label_ok) {
        errors.push(DNS_SUBDOMAIN_ERROR.to_owned());
    }
    errors
}
