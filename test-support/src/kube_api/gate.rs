//! What a request passes before it is served: injected faults (see `faults`), then, in RBAC
//! mode, authentication (401) and authorization (403), in that order as on the real server.

use std::sync::Mutex;

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use super::auth::{Attributes, authenticate};
use super::faults::{Faults, status};
use super::rbac::{Decision, Rbac, Usage, forbidden_message};
use super::rest::{Body, Query};

struct Enforced {
    rbac: Rbac,
    usage: Usage,
}

#[derive(Default)]
pub(super) struct Gate {
    pub(super) faults: Faults,
    rbac: Mutex<Option<Enforced>>,
}

impl Gate {
    fn enforced(&self) -> std::sync::MutexGuard<'_, Option<Enforced>> {
        self.rbac.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn enforce(&self, rbac: Rbac) {
        *self.enforced() = Some(Enforced {
            rbac,
            usage: Usage::default(),
        });
    }

    pub(super) fn rbac_enabled(&self) -> bool {
        self.enforced().is_some()
    }

    pub(super) fn report(&self) -> Option<super::RbacReport> {
        self.enforced()
            .as_ref()
            .map(|enforced| enforced.usage.report(&enforced.rbac))
    }

    /// The answer to a request that does not get through, if any.
    pub(super) fn check(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
    ) -> Option<Response<Body>> {
        let attrs = Attributes::of(method, path, &Query::parse(query));
        if let Some((code, headers, body)) = self.faults.answer(method, path, attrs.verb == "watch")
        {
            return Some(respond(code, &headers, &body));
        }
        let mut enforced = self.enforced();
        let enforced = enforced.as_mut()?;
        let Some(user) = authenticate(headers) else {
            return Some(respond(
                StatusCode::UNAUTHORIZED,
                &[],
                &status(401, "Unauthorized", "Unauthorized"),
            ));
        };
        if user.is_privileged() {
            return None;
        }
        match enforced.rbac.authorize(&user, &attrs) {
            Decision::Allowed(grant) => {
                enforced.usage.allowed(&attrs, grant);
                None
            }
            Decision::Bootstrap => None,
            Decision::Denied(reason) => {
                let message = forbidden_message(&user, &attrs, &reason);
                enforced.usage.denied(&user, &attrs, &message);
                let mut body = status(403, "Forbidden", &message);
                let mut details = serde_json::Map::new();
                if !attrs.name.is_empty() {
                    details.insert("name".into(), attrs.name.clone().into());
                }
                if !attrs.api_group.is_empty() {
                    details.insert("group".into(), attrs.api_group.clone().into());
                }
                if !attrs.resource.is_empty() {
                    details.insert("kind".into(), attrs.resource.clone().into());
                }
                body["details"] = Value::Object(details);
                Some(respond(
                    StatusCode::FORBIDDEN,
                    &[("x-content-type-options", "nosniff".into())],
                    &body,
                ))
            }
        }
    }
}

fn respond(code: StatusCode, headers: &[(&'static str, String)], body: &Value) -> Response<Body> {
    let mut response = Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private");
    for (name, value) in headers {
        response = response.header(*name, value);
    }
    response
        .body(
            Full::new(Bytes::from(json!(body).to_string()))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("a valid response")
}
