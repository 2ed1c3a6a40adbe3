//! Forwarding one request to a leased endpoint: hop-by-hop headers removed (RFC 9110 §7.6.1),
//! `X-Forwarded-*` set, bodies and trailers streamed both ways over pooled keep-alive HTTP/1.1
//! (see [`super::pool`]) or multiplexed HTTP/2 (see [`super::multiplex`]), as the target's
//! protocol says, and HTTP/1.1 upgrades (WebSocket) tunnelled in both directions.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::body::{ClientBody, ProxyBody, Upstream};
use super::error::{self, ProxyError};
use super::grpc;
use super::multiplex::{self, Multiplex};
use super::pool::{self, Pool, UpstreamError};
use super::replay::Replayable;
use super::tunnel;
use super::{InFlight, RequestBody};
use crate::config::Protocol;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The upstream side of one worker: its connection pool, and the tunnels shared by all.
#[derive(Clone, Debug)]
pub struct Forwarder {
    pool: Pool,
    multiplex: Multiplex,
    tunnels: Tunnels,
}

/// Upgraded connections (WebSocket) outlive the HTTP connection that opened them, so a drain
/// cannot see them through the server: it waits for them here, and cuts them when time is up.
#[derive(Clone, Debug)]
pub struct Tunnels {
    /// Each open tunnel holds a receiver; `closed()` resolves once none is left.
    open: watch::Sender<()>,
    cut: CancellationToken,
}

impl Default for Tunnels {
    fn default() -> Self {
        Self {
            open: watch::Sender::new(()),
            cut: CancellationToken::new(),
        }
    }
}

impl Tunnels {
    /// Resolves once no tunnel is open.
    pub async fn closed(&self) {
        self.open.closed().await
    }

    /// Closes every open tunnel (and any opened later).
    pub fn cut(&self) {
        self.cut.cancel()
    }
}

impl Forwarder {
    /// A forwarder with a pool of its own that records its upgraded connections in `tunnels`.
    pub fn new(tunnels: Tunnels) -> Self {
        Self {
            pool: Pool::new(pool::Settings::default()),
            multiplex: Multiplex::new(multiplex::Settings::default()),
            tunnels,
        }
    }
}

/// What the forwarder needs to know about the downstream side of a request.
pub struct Downstream<'a> {
    pub client: &'a Client,
    /// The Host (or :authority) the client asked for, port included.
    pub host: &'a HeaderValue,
}

/// One client connection, as the upstream is told of it.
#[derive(Debug)]
pub struct Client {
    /// The TCP peer's address: what per-client rate limits count.
    pub ip: IpAddr,
    /// The client's IP address as an `X-Forwarded-For` entry: formatted once per connection
    /// rather than once per request.
    pub forwarded_for: HeaderValue,
    /// Whether it came over TLS: `X-Forwarded-Proto: https`.
    pub tls: bool,
    /// The HTTP/2 body bytes its held requests may pin together, within the connection's
    /// flow-control window (see [`super::hold::admit`]).
    pub held_body: AtomicU64,
}

impl Client {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        Self {
            ip: peer.ip(),
            forwarded_for: forwarded_for(peer),
            tls,
            held_body: AtomicU64::new(0),
        }
    }
}

fn forwarded_for(peer: SocketAddr) -> HeaderValue {
    HeaderValue::try_from(peer.ip().to_string()).expect("an IP address is a valid header value")
}

impl Forwarder {
    pub async fn forward(
        &self,
        mut req: Box<Request<ClientBody>>,
        downstream: Downstream<'_>,
        mut in_flight: InFlight,
        response_timeout: Option<Duration>,
        bytes_in: Option<Arc<AtomicU64>>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let protocol = in_flight.target().serving.protocol;
        // An HTTP/1.1 upgrade (WebSocket) needs an HTTP/1.1 upstream; HTTP/2 upstreams get
        // the request without it.
        let upgrade_to = match (req.version(), protocol) {
            (Version::HTTP_11, Protocol::Http1) => upgrade_protocol(req.headers()),
            _ => None,
        };
        let downstream_upgrade = upgrade_to.is_some().then(|| hyper::upgrade::on(&mut *req));
        // A request body that goes on streaming is the request's activity, should it turn out
        // a stream (a bidirectional gRPC call).
        let activity = (!http_body::Body::is_end_stream(req.body())).then(|| in_flight.activity());
        // A WebSocket's frames are followed through its tunnel (see `tunnel`).
        let websocket = upgrade_to
            .as_ref()
            .is_some_and(|protocol| protocol.as_bytes().eq_ignore_ascii_case(b"websocket"));
        let downstream_version = req.version();
        // Whether trailers are asked for matters only to HTTP/2 upstreams (see below).
        let trailers = protocol == Protocol::H2c && accepts_trailers(req.headers());

        let authority = &in_flight.endpoint().authority;
        let target = &in_flight.target().name;
        // An absolute-form request is for the host its target names, whatever its Host says
        // (RFC 9112 §3.2.2): the upstream gets that one (`downstream.host` is it).
        let absolute_form = req.uri().authority().is_some() && req.method() != Method::CONNECT;
        match protocol {
            // The request line an upstream expects: origin-form (`/path?query`), as a client
            // sends it to a server, so the usual origin-form request goes through untouched;
            // the endpoint's authority-form for CONNECT.
            Protocol::Http1 => {
                if req.method() == Method::CONNECT {
                    *req.uri_mut() = Uri::from(authority.clone());
                } else if req.uri().scheme().is_some() || req.uri().authority().is_some() {
                    *req.uri_mut() = origin_form(req.uri());
                }
                *req.version_mut() = Version::HTTP_11;
            }
            // HTTP/2 carries the scheme and authority as pseudo-headers: the URI is absolute,
            // its authority what the client asked for (RFC 9113 §8.3.1), without `Host`.
            Protocol::H2c => {
                if req.method() == Method::CONNECT {
                    return Err(ProxyError::NotForwarded {
                        target: target.clone(),
                        what: "CONNECT to an HTTP/2 upstream",
                    });
                }
                let host = Authority::try_from(downstream.host.as_bytes())
                    .unwrap_or_else(|_| authority.clone());
                let mut uri = origin_form(req.uri()).into_parts();
                uri.scheme = Some(Scheme::HTTP);
                uri.authority = Some(host);
                *req.uri_mut() = Uri::from_parts(uri).expect("scheme, authority and path");
                *req.version_mut() = Version::HTTP_2;
            }
        }

        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        if let Some(protocol) = upgrade_to {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, protocol);
        }
        if trailers {
            // The client takes trailers, so the upstream may send them: gRPC servers need to
            // be told (RFC 9113 §8.2.2 allows this one TE value).
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        match protocol {
            // One lookup each: `entry` rather than `contains_key` then `insert`.
            Protocol::Http1 if absolute_form => {
                headers.insert(header::HOST, downstream.host.clone());
            }
            Protocol::Http1 => {
                headers
                    .entry(header::HOST)
                    .or_insert_with(|| downstream.host.clone());
            }
            Protocol::H2c => {
                headers.remove(header::HOST);
            }
        }
        append_forwarded_for(headers, &downstream.client.forwarded_for);
        if downstream.client.tls {
            // wakegate terminated the TLS itself: what the client claims does not count.
            headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        } else {
            // Kept when a proxy in front of wakegate terminated it and says so.
            headers
                .entry(&X_FORWARDED_PROTO)
                .or_insert_with(|| HeaderValue::from_static("http"));
        }
        headers
            .entry(&X_FORWARDED_HOST)
            .or_insert_with(|| downstream.host.clone());

        let req = (*req).map(|body| RequestBody::new(body, bytes_in, activity));
        let sent = self.send(protocol, authority, req);
        let result = match response_timeout {
            Some(after) => tokio::time::timeout(after, sent).await.map_err(|_| {
                ProxyError::UpstreamTimeout {
                    target: target.clone(),
                    after,
                }
            })?,
            None => sent.await,
        };
        record_health(&in_flight, &result);
        let response = result.map_err(|source| {
            if client_body_failed(&source) {
                ProxyError::ClientBody {
                    target: target.clone(),
                }
            } else {
                ProxyError::Upstream {
                    target: target.clone(),
                    source,
                }
            }
        })?;
        tracing::debug!(status = response.status().as_u16(), "upstream answered");

        let (mut parts, mut body) = response.into_parts();
        if parts.status == StatusCode::SWITCHING_PROTOCOLS
            && let Some(downstream_upgrade) = downstream_upgrade
            && let Upstream::Http1(h1) = body
        {
            match h1.upgrade() {
                Ok(upstream_upgrade) => {
                    let open = self.tunnels.open.subscribe();
                    let cut = self.tunnels.cut.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            () = tunnel::run(downstream_upgrade, upstream_upgrade, in_flight, websocket) => {}
                            () = cut.cancelled() => tracing::debug!("upgraded connection cut: drain time is up"),
                        }
                        drop(open);
                    });
                    return Ok(Response::from_parts(parts, ProxyBody::empty()));
                }
                Err(h1) => body = Upstream::Http1(h1),
            }
        }

        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        if trailers
            && downstream_version < Version::HTTP_2
            && !headers.contains_key(header::TRAILER)
            && grpc::is_grpc(headers)
        {
            // An HTTP/1.1 response carries only the trailers it announces: announce gRPC's.
            headers.insert(header::TRAILER, HeaderValue::from_static(GRPC_TRAILERS));
        }
        let grpc = grpc::is_grpc(headers);
        Ok(Response::from_parts(
            parts,
            ProxyBody::upstream(body, in_flight, grpc),
        ))
    }

    /// Sends the request on an upstream connection of `protocol`.
    async fn send(
        &self,
        protocol: Protocol,
        authority: &Authority,
        req: Request<RequestBody>,
    ) -> Result<Response<Upstream>, UpstreamError> {
        match protocol {
            Protocol::Http1 => {
                let response = self.pool.send(authority, req).await?;
                Ok(response.map(|body| Upstream::Http1(Box::new(body))))
            }
            Protocol::H2c => {
                let req = req.map(Replayable::new);
                let (response, stream) = self.multiplex.send(authority, req).await?;
                Ok(response.map(|body| Upstream::Http2(body, stream)))
            }
        }
    }
}

/// Passive health: a response, whatever its status, is a success; a request that got none
/// (a connect included) is a failure, unless the client's own body broke it off.
fn record_health<T>(in_flight: &InFlight, result: &Result<T, UpstreamError>) {
    let (target, endpoint) = (in_flight.target(), in_flight.endpoint());
    match result {
        Ok(_) => {
            if endpoint.health.succeeded(target.trials().is_some()) {
                tracing::info!(target = %target.name, upstream = %endpoint.authority, "upstream healthy again: a trial request got a response");
            }
        }
        Err(error) if !client_body_failed(error) => {
            let policy = &target.serving.health;
            let error = error::chain(error);
            if endpoint.health.failed(&error, policy) {
                tracing::warn!(
                    target = %target.name,
                    upstream = %endpoint.authority,
                    %error,
                    failures = policy.failures,
                    "upstream unhealthy: requests in a row got no response"
                );
            }
        }
        Err(_) => {}
    }
}

/// Whether sending failed because the client's request body did (a malformed chunk, or the
/// client broke off): hyper reports the body it was given failing as a user error whose cause
/// is the client connection's own error.
fn client_body_failed(error: &UpstreamError) -> bool {
    match error {
        UpstreamError::Http1(error) => matches!(error, super::h1::Error::RequestBody(_)),
        UpstreamError::Http(error) => {
            error.is_user()
                && std::error::Error::source(error).is_some_and(|cause| cause.is::<hyper::Error>())
        }
        _ => false,
    }
}

/// The trailers a gRPC response ends with, announced to HTTP/1.1 clients.
const GRPC_TRAILERS: &str = "grpc-status, grpc-message, grpc-status-details-bin";

/// `/path?query` of a URI of any form.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(path) => Uri::from(path.clone()),
        None => Uri::from_static("/"),
    }
}

/// Whether the client's `TE` says it takes trailers.
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .any(|v| has_token(v, "trailers"))
}

/// The protocol an HTTP/1.1 request asks to upgrade to: its `Upgrade`, if its `Connection`
/// names it.
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let protocol = headers.get(header::UPGRADE)?;
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| has_token(v, "upgrade"))
        .then(|| protocol.clone())
}

/// Whether a comma-separated header value (`Connection`, `TE`, …) lists `token`, in any case;
/// read as bytes, so that a stray byte elsewhere in the value does not hide it.
pub(super) fn has_token(value: &HeaderValue, token: &str) -> bool {
    lists_token(value.as_bytes(), token)
}

/// Whether a comma-separated list of tokens holds `token`, in any case.
pub(super) fn lists_token(list: &[u8], token: &str) -> bool {
    list.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The headers that only concern one connection (RFC 9110 §7.6.1), `Connection` first; and
/// `Proxy-Authorization`, a client's credentials for a proxy it chose (RFC 9110 §11.7.4),
/// never for a server behind a gateway.
static HOP_BY_HOP: [&HeaderName; 7] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::TE,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
    &header::PROXY_AUTHORIZATION,
];

/// Removes the headers that only concern one connection (RFC 9110 §7.6.1), including every
/// header the `Connection` header names, and `Proxy-Authorization`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none, or only `Connection: keep-alive`: one pass over the names says
    // which to remove, cheaper than a lookup for each.
    let mut found = 0u8;
    for name in headers.keys() {
        let name = name.as_str();
        // The lengths of the hop-by-hop names: most other headers are told apart without a
        // string comparison.
        if matches!(name.len(), 2 | 7 | 10 | 16 | 17 | 19)
            && let Some(i) = HOP_BY_HOP.iter().position(|h| h.as_str() == name)
        {
            found |= 1 << i;
        }
    }
    if found == 0 {
        return;
    }
    if found & 1 != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter(|v| !is_usual_connection(v.as_bytes()))
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // Those are removed below if present; no need to look them up twice.
            .filter(|t| {
                !HOP_BY_HOP
                    .iter()
                    .any(|h| t.eq_ignore_ascii_case(h.as_str()))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if found & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
}

/// Whether a `Connection` value is one of the usual two, which name no other field.
pub(super) fn is_usual_connection(value: &[u8]) -> bool {
    value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close")
}

fn append_forwarded_for(headers: &mut HeaderMap, ip: &HeaderValue) {
    match headers.entry(&X_FORWARDED_FOR) {
        Entry::Vacant(entry) => {
            entry.insert(ip.clone());
        }
        Entry::Occupied(mut entry) => {
            let value = match entry.get().to_str() {
                Ok(before) if !before.is_empty() => {
                    let this = ip.to_str().unwrap_or_default();
                    HeaderValue::try_from(format!("{before}, {this}"))
                        .unwrap_or_else(|_| ip.clone())
                }
                _ => ip.clone(),
            };
            entry.insert(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic eDp5"),
        );
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-kept"], "yes");

        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("close"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("X-Other, Upgrade"),
        );
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h[header::CONTENT_LENGTH], "0");
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        append_forwarded_for(&mut h, &forwarded_for("127.0.0.1:5000".parse().unwrap()));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &forwarded_for("[::1]:5000".parse().unwrap()));
        assert_eq!(h["x-forwarded-for"], "::1");
    }

    #[test]
    fn upgrade_needs_both_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(upgrade_protocol(&h), None);
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(upgrade_protocol(&h).unwrap(), "websocket");
    }
}
