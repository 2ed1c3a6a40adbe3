//! The REST protocol: requests parsed and routed; get, list (paged, see `list`), create,
//! replace, patch (merge, strategic merge, server-side apply), delete and the workloads'
//! `/scale`, recording field ownership (see `managed`), with the real server's validation
//! and errors.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::events::validate;
use super::gate::Gate;
use super::list::list;
use super::managed::{self, Writer};
use super::selector::Filter;
use super::store::{
    Kind, ScalePatch, Shared, State, default_fields, str_at, without_server_fields,
};
use super::watch::start_watch;

pub(super) type Body = UnsyncBoxBody<Bytes, std::io::Error>;

pub(super) struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
    details: Option<Value>,
    metadata: Option<Value>,
}

impl ApiError {
    pub(super) fn new(
        code: StatusCode,
        reason: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
            metadata: None,
        }
    }

    /// With the Status's `details` (causes, or the object's kind and name).
    pub(super) fn with_details(mut self, details: Value) -> ApiError {
        self.details = Some(details);
        self
    }

    /// With the Status's `metadata` (a fresh `continue` token).
    pub(super) fn with_metadata(mut self, metadata: Value) -> ApiError {
        self.metadata = Some(metadata);
        self
    }

    pub(super) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn not_found(kind: Kind, name: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} \"{name}\" not found", kind.qualified()),
        )
    }

    fn conflict(kind: Kind, name: &str) -> ApiError {
        ApiError::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                kind.qualified()
            ),
        )
    }

    pub(super) fn code(&self) -> u16 {
        self.code.as_u16()
    }

    pub(super) fn status(&self) -> Value {
        let mut status = status_json(self.code.as_u16(), self.reason, &self.message);
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        if let Some(metadata) = &self.metadata {
            status["metadata"] = metadata.clone();
        }
        status
    }
}

pub(super) fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "reason": reason,
        "code": code,
        "message": message,
    })
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let body = Full::new(Bytes::from(value.to_string()))
        .map_err(|never| match never {})
        .boxed_unsync();
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("a valid response")
}

/// Query parameters, percent-decoded.
pub(super) struct Query(Vec<(String, String)>);

impl Query {
    pub(super) fn parse(query: &str) -> Query {
        Query(
            query
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, gate: Arc<Gate>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // As the real server (Go sets it on every TCP connection): without it, a watch event
        // written while the previous one is unacknowledged waits for the client's delayed ACK,
        // up to 40 ms.
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let gate = gate.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req| handle(shared.clone(), gate.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    shared: Arc<Shared>,
    gate: Arc<Gate>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    {
        let mut state = shared.state();
        let line = if query.is_empty() {
            format!("{method} {path}")
        } else {
            format!("{method} {path}?{query}")
        };
        state.requests.push(line);
        if state.down || state.closed {
            // Failing the service closes the connection without a response.
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the fake API server is down",
            ));
        }
    }
    // Injected faults, then authentication and RBAC when enforced (see `gate`).
    if let Some(response) = gate.check(&method, &path, &query, req.headers()) {
        return Ok(response);
    }
    let header_text = |name: header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let content_type = header_text(header::CONTENT_TYPE)
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    let user_agent = header_text(header::USER_AGENT);
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let request = ApiRequest {
        method,
        query: Query::parse(&query),
        content_type,
        user_agent,
        body,
    };
    Ok(match route(&shared, &path, &request) {
        Ok(response) => response,
        Err(error) => json_response(error.code, &error.status()),
    })
}

struct ApiRequest {
    method: Method,
    query: Query,
    content_type: String,
    user_agent: String,
    body: Bytes,
}

impl ApiRequest {
    fn json(&self) -> Result<Value, ApiError> {
        let value: Value = serde_json::from_slice(&self.body)
            .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
        if value.is_object() {
            Ok(value)
        } else {
            Err(ApiError::bad_request("the body is not a JSON object"))
        }
    }

    /// The field manager of a write: `fieldManager`, else the User-Agent up to its first
    /// `/`, else `unknown`, as the real server defaults it (the kube client sends no
    /// User-Agent).
    fn manager(&self) -> String {
        if let Some(manager) = self.query.get("fieldManager").filter(|m| !m.is_empty()) {
            return manager.to_owned();
        }
        let prefix: String = self
            .user_agent
            .split('/')
            .next()
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_control())
            .take(128)
            .collect();
        if prefix.is_empty() {
            "unknown".to_owned()
        } else {
            prefix
        }
    }
}

fn route(shared: &Arc<Shared>, path: &str, req: &ApiRequest) -> Result<Response<Body>, ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        )
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if segments == ["version"] && req.method == Method::GET {
        return Ok(json_response(StatusCode::OK, &version()));
    }
    let (api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return Err(not_found()),
    };
    let (namespace, rest) = match rest {
        ["namespaces", namespace, rest @ ..] if !rest.is_empty() => (Some(*namespace), rest),
        _ => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return Err(not_found()),
    };
    let kind = Kind::from_resource(&api_version, plural).ok_or_else(not_found)?;
    let method_not_allowed = || {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{} is not supported here", req.method),
        )
    };
    match (namespace, name, subresource) {
        (_, None, None) => match req.method {
            Method::GET => {
                let filter = Filter::from_query(namespace, &req.query)?;
                if req.query.flag("watch") {
                    start_watch(shared, kind, filter, &req.query)
                } else {
                    let list = list(&shared.state(), kind, namespace, &filter, &req.query)?;
                    Ok(json_response(StatusCode::OK, &list))
                }
            }
            Method::POST => {
                let namespace = namespace.ok_or_else(method_not_allowed)?;
                let manager = req.manager();
                let created =
                    shared.mutate(|s| create(s, kind, namespace, req.json()?, &manager))?;
                Ok(json_response(StatusCode::CREATED, &created))
            }
            _ => Err(method_not_allowed()),
        },
        (Some(namespace), Some(name), None) => {
            let object = match req.method {
                Method::GET => shared
                    .state()
                    .get(kind, namespace, name)
                    .cloned()
                    .ok_or_else(|| ApiError::not_found(kind, name))?,
                Method::PUT => {
                    let manager = req.manager();
                    shared.mutate(|s| replace(s, kind, namespace, name, req.json()?, &manager))?
                }
                Method::PATCH => shared.mutate(|s| patch(s, kind, namespace, name, req))?,
                Method::DELETE => {
                    shared
                        .mutate(|s| s.remove(kind, namespace, name))
                        .ok_or_else(|| ApiError::not_found(kind, name))?;
                    json!({
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Success",
                        "details": {"name": name, "kind": kind.plural()},
                    })
                }
                _ => return Err(method_not_allowed()),
            };
            Ok(json_response(StatusCode::OK, &object))
        }
        (Some(namespace), Some(name), Some("status"))
            if req.method == Method::GET && kind.has_status_subresource() =>
        {
            let state = shared.state();
            let object = state
                .get(kind, namespace, name)
                .ok_or_else(|| ApiError::not_found(kind, name))?;
            Ok(json_response(StatusCode::OK, object))
        }
        (Some(namespace), Some(name), Some("scale")) if kind.is_workload() => {
            let scale = match req.method {
                Method::GET => {
                    let state = shared.state();
                    let workload = state
                        .get(kind, namespace, name)
                        .ok_or_else(|| ApiError::not_found(kind, name))?;
                    scale_of(kind, workload)
                }
                Method::PATCH | Method::PUT => {
                    shared.mutate(|s| write_scale(s, kind, namespace, name, req))?
                }
                _ => return Err(method_not_allowed()),
            };
            Ok(json_response(StatusCode::OK, &scale))
        }
        _ => Err(not_found()),
    }
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-wakegate-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// What the server resets in a write to the main resource of a kind with `/status`: a new
/// object gets none, an update keeps the stored one.
fn keep_status(kind: Kind, live: Option<&Value>, object: &mut Value) {
    if !kind.has_status_subresource() {
        return;
    }
    match live.map(|live| &live["status"]) {
        Some(status) if !status.is_null() => object["status"] = status.clone(),
        _ => {
            if let Some(object) = object.as_object_mut() {
                object.remove("status");
            }
        }
    }
}

fn create(
    state: &mut State,
    kind: Kind,
    namespace: &str,
    mut object: Value,
    manager: &str,
) -> Result<Value, ApiError> {
    match object["metadata"]["namespace"].as_str() {
        Some(ns) if ns != namespace => {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        _ => object["metadata"]["namespace"] = namespace.into(),
    }
    if object["metadata"]["name"]
        .as_str()
        .is_none_or(str::is_empty)
    {
        let Some(prefix) = object["metadata"]["generateName"].as_str() else {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.name or metadata.generateName is required",
            ));
        };
        let name = format!("{prefix}{:05x}", state.rv + 1);
        object["metadata"]["name"] = name.into();
    }
    let name = str_at(&object, "/metadata/name").to_owned();
    if state.get(kind, namespace, &name).is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", kind.qualified()),
        ));
    }
    validate(kind, &object, None)?;
    keep_status(kind, None, &mut object);
    default_fields(kind, &mut object);
    let writer = Writer {
        manager,
        subresource: None,
    };
    managed::update(kind, None, &mut object, writer);
    Ok(state.write(kind, object))
}

fn replace(
    state: &mut State,
    kind: Kind,
    namespace: &str,
    name: &str,
    mut object: Value,
    manager: &str,
) -> Result<Value, ApiError> {
    if str_at(&object, "/metadata/name") != name {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    let current = state
        .get(kind, namespace, name)
        .ok_or_else(|| ApiError::not_found(kind, name))?
        .clone();
    let wanted = str_at(&object, "/metadata/resourceVersion");
    if !wanted.is_empty() && wanted != str_at(&current, "/metadata/resourceVersion") {
        return Err(ApiError::conflict(kind, name));
    }
    object["metadata"]["namespace"] = namespace.into();
    validate(kind, &object, Some(&current))?;
    keep_status(kind, Some(&current), &mut object);
    default_fields(kind, &mut object);
    let writer = Writer {
        manager,
        subresource: None,
    };
    managed::update(kind, Some(&current), &mut object, writer);
    finish_write(state, kind, &current, object)
}

/// Writes `object` over `current`, unless it changes nothing: then, as on the real server,
/// not even the resourceVersion moves.
fn finish_write(
    state: &mut State,
    kind: Kind,
    current: &Value,
    object: Value,
) -> Result<Value, ApiError> {
    if without_server_fields(current) == without_server_fields(&object)
        && current["metadata"]["managedFields"] == object["metadata"]["managedFields"]
    {
        return Ok(current.clone());
    }
    Ok(state.write(kind, object))
}

/// The patch content types: merge, strategic merge (applied as a merge patch: lists are
/// replaced, not merged by key) and server-side apply.
#[derive(PartialEq)]
enum PatchType {
    Merge,
    Apply,
}

/// The real server's 422 for invalid PatchOptions.
fn invalid_patch_options(field: &str, error: &str) -> ApiError {
    let reason = if error.starts_with("Required") {
        "FieldValueRequired"
    } else {
        "FieldValueForbidden"
    };
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        format!("PatchOptions.meta.k8s.io \"\" is invalid: {field}: {error}"),
    )
    .with_details(json!({
        "group": "meta.k8s.io",
        "kind": "PatchOptions",
        "causes": [{"reason": reason, "message": error, "field": field}],
    }))
}

fn patch_type(req: &ApiRequest) -> Result<PatchType, ApiError> {
    match req.content_type.as_str() {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            if req.query.get("force").is_some() {
                return Err(invalid_patch_options(
                    "force",
                    "Forbidden: may not be specified for non-apply patch",
                ));
            }
            Ok(PatchType::Merge)
        }
        "application/apply-patch+yaml" => {
            if req.query.get("fieldManager").is_none_or(str::is_empty) {
                return Err(invalid_patch_options(
                    "fieldManager",
                    "Required value: is required for apply patch",
                ));
            }
            Ok(PatchType::Apply)
        }
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the fake API server does not support patches of type {other:?}"),
        )),
    }
}

fn patch(
    state: &mut State,
    kind: Kind,
    namespace: &str,
    name: &str,
    req: &ApiRequest,
) -> Result<Value, ApiError> {
    let patch_type = patch_type(req)?;
    let patch = req.json()?;
    let manager = req.manager();
    if patch_type == PatchType::Apply {
        return server_side_apply(
            state,
            kind,
            namespace,
            name,
            &patch,
            &manager,
            req.query.flag("force"),
        );
    }
    let current = state
        .get(kind, namespace, name)
        .ok_or_else(|| ApiError::not_found(kind, name))?
        .clone();
    let wanted = str_at(&patch, "/metadata/resourceVersion");
    if !wanted.is_empty() && wanted != str_at(&current, "/metadata/resourceVersion") {
        return Err(ApiError::conflict(kind, name));
    }
    let mut merged = managed::patched(&current, &patch);
    validate(kind, &merged, Some(&current))?;
    keep_status(kind, Some(&current), &mut merged);
    default_fields(kind, &mut merged);
    let writer = Writer {
        manager: &manager,
        subresource: None,
    };
    managed::update(kind, Some(&current), &mut merged, writer);
    finish_write(state, kind, &current, merged)
}

/// A server-side apply of `config` to the main resource by `manager`: creates the object
/// if there is none; `409 Conflict` when it would change another manager's fields, unless
/// `force`.
pub(super) fn server_side_apply(
    state: &mut State,
    kind: Kind,
    namespace: &str,
    name: &str,
    config: &Value,
    manager: &str,
    force: bool,
) -> Result<Value, ApiError> {
    let api_version = config["apiVersion"].as_str().unwrap_or("");
    if api_version != kind.api_version() {
        return Err(ApiError::bad_request(format!(
            "Incorrect version specified in apply patch. Specified patch version: \
             {api_version}, expected: {}",
            kind.api_version()
        )));
    }
    // (The real server fails such a merge with a 500.)
    let config_kind = config["kind"].as_str().unwrap_or("");
    if config_kind != kind.name() {
        return Err(ApiError::bad_request(format!(
            "the kind in the apply patch ({config_kind}) does not match the expected kind ({})",
            kind.name()
        )));
    }
    for (field, expected) in [("name", name), ("namespace", namespace)] {
        match config["metadata"][field].as_str() {
            Some(given) if given != expected => {
                return Err(ApiError::bad_request(format!(
                    "the {field} of the object ({given}) does not match the {field} on the \
                     URL ({expected})"
                )));
            }
            _ => {}
        }
    }
    if !config["metadata"]["managedFields"].is_null() {
        return Err(ApiError::bad_request("metadata.managedFields must be nil"));
    }
    let current = state.get(kind, namespace, name).cloned();
    if let Some(current) = &current {
        let wanted = str_at(config, "/metadata/resourceVersion");
        if !wanted.is_empty() && wanted != str_at(current, "/metadata/resourceVersion") {
            return Err(ApiError::conflict(kind, name));
        }
    }
    let base = json!({"metadata": {"name": name, "namespace": namespace}});
    let writer = Writer {
        manager,
        subresource: None,
    };
    let object = managed::apply(kind, current.as_ref(), base, config, writer, force)?;
    validate(kind, &object, current.as_ref())?;
    match &current {
        Some(current) => finish_write(state, kind, current, object),
        None => Ok(state.write(kind, object)),
    }
}

/// A PATCH or PUT of a workload's `/scale`: sets `spec.replicas`, owned by the writer with
/// subresource `scale`, and records who asked (when it succeeds).
fn write_scale(
    state: &mut State,
    kind: Kind,
    namespace: &str,
    name: &str,
    req: &ApiRequest,
) -> Result<Value, ApiError> {
    let patch_type = match req.method {
        Method::PATCH => Some(patch_type(req)?),
        _ => None,
    };
    let body = req.json()?;
    let current = state
        .get(kind, namespace, name)
        .ok_or_else(|| ApiError::not_found(kind, name))?
        .clone();
    let wanted = str_at(&body, "/metadata/resourceVersion");
    if !wanted.is_empty() && wanted != str_at(&current, "/metadata/resourceVersion") {
        return Err(ApiError::conflict(kind, name));
    }
    let replicas = match body.pointer("/spec/replicas") {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            value
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        format!("spec.replicas: Invalid value: {value}"),
                    )
                })?,
        ),
    };
    let manager = req.manager();
    let workload = match patch_type {
        Some(PatchType::Apply) => {
            let config = match replicas {
                Some(replicas) => json!({"spec": {"replicas": replicas}}),
                None => json!({}),
            };
            let writer = Writer {
                manager: &manager,
                subresource: Some("scale"),
            };
            let base = json!({});
            let object = managed::apply(
                kind,
                Some(&current),
                base,
                &config,
                writer,
                req.query.flag("force"),
            )?;
            finish_write(state, kind, &current, object)?
        }
        _ => match replicas {
            Some(replicas) => scale_update(state, kind, &current, replicas, &manager),
            None => current,
        },
    };
    if let Some(replicas) = replicas {
        state.scale_patches.push(ScalePatch {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            manager: req.query.get("fieldManager").unwrap_or("").to_owned(),
            replicas,
        });
    }
    Ok(scale_of(kind, &workload))
}

/// An Update of `spec.replicas` through `/scale` by `manager`; returns the workload.
pub(super) fn scale_update(
    state: &mut State,
    kind: Kind,
    current: &Value,
    replicas: i32,
    manager: &str,
) -> Value {
    let mut workload = current.clone();
    workload["spec"]["replicas"] = replicas.into();
    let writer = Writer {
        manager,
        subresource: Some("scale"),
    };
    managed::update(kind, Some(current), &mut workload, writer);
    finish_write(state, kind, current, workload).unwrap_or_else(|_| current.clone())
}

/// The autoscaling/v1 Scale of a workload, as the real server makes it: `status.replicas`
/// from the workload's `status.replicas` (a Rollout's `status.HPAReplicas`), the selector
/// from its `spec.selector` (a Rollout's `status.selector`).
pub(super) fn scale_of(kind: Kind, workload: &Value) -> Value {
    let meta = &workload["metadata"];
    let selector = match kind {
        Kind::Rollout => workload["status"]["selector"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        _ => workload["spec"]["selector"]["matchLabels"]
            .as_object()
            .map(|labels| {
                labels
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
    };
    let status_replicas = match kind {
        Kind::Rollout => &workload["status"]["HPAReplicas"],
        _ => &workload["status"]["replicas"],
    };
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"],
            "creationTimestamp": meta["creationTimestamp"],
        },
        "spec": {"replicas": workload["spec"]["replicas"].as_i64().unwrap_or(0)},
        "status": {
            "replicas": status_replicas.as_i64().unwrap_or(0),
            "selector": selector,
        },
    })
}
