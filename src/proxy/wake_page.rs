//! What a browser gets instead of waiting for a cold start: a page that reloads itself
//! (`wake_page = true`), while the target wakes as it would for a held request.

use http::{HeaderValue, Request, Response, header};

use super::body::ProxyBody;
use crate::target::Target;

pub(super) fn accepts_html<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("text/html")))
}

/// What a browser gets instead of waiting for a cold start: a page that reloads itself.
pub(super) fn response(target: &Target) -> Response<ProxyBody> {
    let name = &target.name;
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"2\">\
         <title>Waking up {name}</title></head><body style=\"font-family:sans-serif;margin:4em\">\
         <h1>Waking up {name}…</h1><p>This page reloads by itself in a moment.</p></body></html>\n"
    );
    let mut response = Response::new(ProxyBody::text(html));
    *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
