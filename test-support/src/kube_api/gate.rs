//! What a request passes before it is served: injected faults (see `faults`).

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use super::faults::Faults;
use super::rest::{Body, Query};

#[derive(Default)]
pub(super) struct Gate {
    pub(super) faults: Faults,
}

impl Gate {
    /// The answer to a request that does not get through, if any.
    pub(super) fn check(&self, method: &Method, path: &str, query: &str) -> Option<Response<Body>> {
        let watch = is_watch(path, &Query::parse(query));
        let (code, headers, body) = self.faults.answer(method, path, watch)?;
        Some(respond(code, &headers, &body))
    }
}

/// A watch: `?watch=...` as the real server reads a boolean (anything but `0`, `f` or `false`),
/// or a `/watch/` path.
fn is_watch(path: &str, query: &Query) -> bool {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let watch_path = matches!(
        parts.as_slice(),
        ["api", _, "watch", ..] | ["apis", _, _, "watch", ..]
    );
    watch_path
        || query.get("watch").is_some_and(|v| {
            !(v == "0" || v.eq_ignore_ascii_case("f") || v.eq_ignore_ascii_case("false"))
        })
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
            Full::new(Bytes::from(body.to_string()))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("a valid response")
}
