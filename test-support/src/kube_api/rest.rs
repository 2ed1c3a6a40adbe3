//! The REST protocol: requests parsed and routed; get, list, create, replace, patch
//! (merge, strategic merge, server-side apply), delete and `/scale`, with the real server's
//! validation and errors.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

use super::selector::Filter;
use super::store::{Kind, ScalePatch, Shared, State, str_at};
use super::watch::start_watch;

pub(super) type Body = UnsyncBoxBody<Bytes, std::io::Error>;

pub(super) struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
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

    fn status(&self) -> Value {
        status_json(self.code.as_u16(), self.reason, &self.message)
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
    fn parse(query: &str) -> Query {
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

pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // As the real server (Go sets it on every TCP connection): without it, a watch event
        // written while the previous one is unacknowledged waits for the client's delayed ACK,
        // up to 40 ms.
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    shared: Arc<Shared>,
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
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
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
                    let state = shared.state();
                    let items = state.list(kind, &filter);
                    Ok(json_response(
                        StatusCode::OK,
                        &json!({
                            "kind": format!("{}List", kind.name()),
                            "apiVersion": kind.api_version(),
                            "metadata": {"resourceVersion": state.rv.to_string()},
                            "items": items,
                        }),
                    ))
                }
            }
            Method::POST => {
                let namespace = namespace.ok_or_else(method_not_allowed)?;
                let created = shared.mutate(|s| create(s, kind, namespace, req.json()?))?;
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
                Method::PUT => shared.mutate(|s| replace(s, kind, namespace, name, req.json()?))?,
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
        (Some(namespace), Some(name), Some("status")) if req.method == Method::GET => {
            let state = shared.state();
            let object = state
                .get(kind, namespace, name)
                .ok_or_else(|| ApiError::not_found(kind, name))?;
            Ok(json_response(StatusCode::OK, object))
        }
        (Some(namespace), Some(name), Some("scale")) if kind == Kind::Deployment => {
            let scale = match req.method {
                Method::GET => {
                    let state = shared.state();
                    let deployment = state
                        .get(kind, namespace, name)
                        .ok_or_else(|| ApiError::not_found(kind, name))?;
                    scale_of(deployment)
                }
                Method::PATCH | Method::PUT => {
                    shared.mutate(|s| write_scale(s, namespace, name, req))?
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

fn create(
    state: &mut State,
    kind: Kind,
    namespace: &str,
    mut object: Value,
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
    Ok(state.write(kind, object))
}

fn replace(
    state: &mut State,
    kind: Kind,
    namespace: &str,
    name: &str,
    mut object: Value,
) -> Result<Value, ApiError> {
    if str_at(&object, "/metadata/name") != name {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    let current = state
        .get(kind, namespace, name)
        .ok_or_else(|| ApiError::not_found(kind, name))?;
    let wanted = str_at(&object, "/metadata/resourceVersion");
    if !wanted.is_empty() && wanted != str_at(current, "/metadata/resourceVersion") {
        return Err(ApiError::conflict(kind, name));
    }
    object["metadata"]["namespace"] = namespace.into();
    Ok(state.write(kind, object))
}

/// The patch content types: merge, strategic merge (applied as a merge patch: lists are
/// replaced, not merged by key) and server-side apply (applied as a merge patch too, without
/// field ownership).
#[derive(PartialEq)]
enum PatchType {
    Merge,
    Apply,
}

fn patch_type(req: &ApiRequest) -> Result<PatchType, ApiError> {
    match req.content_type.as_str() {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            Ok(PatchType::Merge)
        }
        "application/apply-patch+yaml" => {
            if req.query.get("fieldManager").is_none_or(str::is_empty) {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "PATCH requests with apply must set fieldManager",
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
    let current = match state.get(kind, namespace, name) {
        Some(current) => current.clone(),
        // Server-side apply creates what does not exist yet.
        None if patch_type == PatchType::Apply => json!({
            "metadata": {"name": name, "namespace": namespace},
        }),
        None => return Err(ApiError::not_found(kind, name)),
    };
    let wanted = str_at(&patch, "/metadata/resourceVersion");
    if !wanted.is_empty() && wanted != str_at(&current, "/metadata/resourceVersion") {
        return Err(ApiError::conflict(kind, name));
    }
    let mut merged = current.clone();
    merge_patch(&mut merged, &patch);
    for field in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "resourceVersion",
    ] {
        merged["metadata"][field] = current["metadata"][field].clone();
    }
    if state.get(kind, namespace, name).is_some() && merged == current {
        // A no-op write changes nothing, not even the resourceVersion.
        return Ok(current);
    }
    Ok(state.write(kind, merged))
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
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

/// A PATCH or PUT of a Deployment's `/scale`: sets `spec.replicas` and records who asked.
fn write_scale(
    state: &mut State,
    namespace: &str,
    name: &str,
    req: &ApiRequest,
) -> Result<Value, ApiError> {
    let kind = Kind::Deployment;
    if req.method == Method::PATCH {
        patch_type(req)?;
    }
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
    let Some(replicas) = replicas else {
        return Ok(scale_of(&current));
    };
    state.scale_patches.push(ScalePatch {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        manager: req.query.get("fieldManager").unwrap_or("").to_owned(),
        replicas,
    });
    if current["spec"]["replicas"].as_i64() == Some(i64::from(replicas)) {
        return Ok(scale_of(&current));
    }
    let mut deployment = current;
    deployment["spec"]["replicas"] = replicas.into();
    Ok(scale_of(&state.write(kind, deployment)))
}

/// The autoscaling/v1 Scale of a Deployment; `status.replicas` counts its ready pods.
fn scale_of(deployment: &Value) -> Value {
    let meta = &deployment["metadata"];
    let selector = deployment["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
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
        "spec": {"replicas": deployment["spec"]["replicas"].as_i64().unwrap_or(0)},
        "status": {
            "replicas": deployment["status"]["readyReplicas"].as_i64().unwrap_or(0),
            "selector": selector,
        },
    })
}
