//! HTTP/1.1 from clients, wakegate's own server connection on `httparse`, for the requests
//! that make up nearly all traffic: a complete head and no body. A connection holds no buffer
//! while it waits for a request or for its answer: bytes are read into the worker's one
//! scratch buffer and a request's head copied out of it into an allocation of its own size,
//! which the request's URI and header values share. hyper's HTTP/1 connection keeps an 8 KiB
//! read buffer and an 8 KiB write buffer per connection for its whole life, and allocates each
//! connection's request future apart from its task.
//!
//! Anything else — a request with a body, `Transfer-Encoding`, `Expect`, `Upgrade`, `TE`, a
//! version other than 1.1, CONNECT, a head hyper would refuse or wakegate cannot tell from
//! one it would, one beyond the limits — hands the connection, with every byte read and not
//! yet answered, to hyper's HTTP/1 connection for the rest of its life, which answers exactly
//! as it always has (the conformance suite runs over both). A connection switches only between
//! requests, so no answer is ever written by both.
//!
//! Responses are framed as hyper frames them (RFC 9112 §6): a known length as
//! `Content-Length`, an unknown one chunked, none after HEAD, 204 or 304; `Date` from a clock
//! read once a second; `Connection: close` when the client asked for it or the drain began,
//! and the connection closed after. A client that closes its connection while its request is
//! held or forwarded has its request dropped (what hyper does), unless it sent more first.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::Connection;
use super::body::{ClientBody, ProxyBody};
use super::forward::{has_token, is_usual_connection, lists_token};
use super::h1::{Outgoing, Rewind, encoded, ends_chunked, poll_read_into, put_field};

/// The most header fields parsed here; a head with more goes to hyper (which applies
/// `limits.max_headers`).
const MAX_HEADERS: usize = 100;
/// The longest request target hyper takes (beyond it, 414).
const MAX_TARGET: usize = 65_534;

thread_local! {
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
}

/// What bounds a connection's heads: `[limits]`.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

impl Settings {
    pub fn of(limits: &crate::config::Limits) -> Self {
        Self {
            header_read_timeout: limits.header_read_timeout,
            max_header_bytes: limits.max_header_bytes as usize,
            max_headers: limits.max_headers as usize,
        }
    }
}

/// How a connection ended short of closing cleanly.
#[derive(Debug, thiserror::Error)]
pub enum Ended {
    /// hyper served it after a handover, and ended with this error.
    #[error(transparent)]
    Hyper(hyper::Error),
    #[error("no request head within the header read timeout")]
    HeaderTimeout,
    /// Writing failed.
    #[error(transparent)]
    Io(io::Error),
    /// A response body broke off.
    #[error(transparent)]
    Response(super::h1::Error),
}

/// Serves one client connection until it closes, `stop` is set (between requests; a request
/// in progress is answered first, with `Connection: close`), or it is handed to hyper
/// (`http1`), which then serves it to its end. Whoever sets `stop` polls the connection
/// after: it is looked at on each poll, with no waker of its own.
pub async fn serve<I>(
    mut io: I,
    connection: Arc<Connection>,
    settings: Settings,
    http1: &http1::Builder,
    stop: &AtomicBool,
) -> Result<(), Ended>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Read and not yet parsed: nothing, except for a pipelining client or a head that came
    // in pieces.
    let mut pending = BytesMut::new();
    let mut timer = pin!(tokio::time::sleep(Duration::ZERO));
    loop {
        // A complete head, or a reason to hand the connection over.
        let (mut tried, mut armed) = (false, false);
        let (req, mut keep_alive) = loop {
            if !pending.is_empty() {
                let read = std::mem::take(&mut pending).freeze();
                match parse(&read, settings) {
                    Parse::Simple(req, keep_alive, len) => {
                        if len < read.len() {
                            // The next request's beginning (pipelining): copied, not to keep
                            // this one's bytes for as long as the next one waits.
                            pending.extend_from_slice(&read[len..]);
                        }
                        break (req, keep_alive);
                    }
                    Parse::Partial => {
                        pending = read
                            .try_into_mut()
                            .unwrap_or_else(|read| BytesMut::from(&read[..]));
                    }
                    Parse::Other => {
                        return hand_over(io, read, connection, http1, stop).await;
                    }
                }
            }
            if !tried {
                tried = true;
                // A first read without a timer, for bytes that are there already.
                if let Poll::Ready(read) =
                    poll_fn(|cx| Poll::Ready(poll_read_into(&mut io, &mut pending, cx))).await
                {
                    match read {
                        Ok(0) | Err(_) => return Ok(()),
                        Ok(_) => continue,
                    }
                }
            }
            if !armed {
                armed = true;
                timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + settings.header_read_timeout);
            }
            // A head that has begun to arrive is read and answered through a drain, as hyper
            // does; a connection between requests closes at once.
            let idle = pending.is_empty();
            tokio::select! {
                biased;
                read = poll_fn(|cx| poll_read_into(&mut io, &mut pending, cx)) => match read {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => {}
                },
                () = stopped(stop), if idle => return Ok(()),
                () = timer.as_mut() => return Err(Ended::HeaderTimeout),
            }
        };
        let is_head = req.method() == Method::HEAD;
        // The request, watching the connection meanwhile: a client that closes it before its
        // answer has given up on it (hyper's `mid_message_detect_eof`), one that sends more
        // is pipelining, and its bytes wait. Its future is boxed, and freed once the response
        // head is ready: inline, it (about 5 KiB) would be part of every connection's task for
        // the connection's whole life, written as the task is spawned, idle or not.
        let mut answer = Box::pin(connection.answer(Box::new(req)));
        let response = {
            let io = &mut io;
            let pending = &mut pending;
            poll_fn(|cx| {
                if let Poll::Ready(response) = answer.as_mut().poll(cx) {
                    return Poll::Ready(Some(response));
                }
                if pending.is_empty() {
                    match poll_read_into(io, pending, cx) {
                        Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(None),
                        Poll::Ready(Ok(_)) | Poll::Pending => {}
                    }
                }
                Poll::Pending
            })
            .await
        };
        drop(answer);
        let Some(response) = response else {
            return Ok(());
        };
        keep_alive &= !stop.load(Ordering::Relaxed);
        write_response(&mut io, response, is_head, &mut keep_alive).await?;
        if !keep_alive {
            let _ = io.shutdown().await;
            return Ok(());
        }
    }
}

/// Hands the connection to hyper with the bytes read from it and not yet answered, and serves
/// it there to its end (boxed: hyper's connection is large, and would otherwise size every
/// connection's task).
async fn hand_over<I>(
    io: I,
    read: Bytes,
    connection: Arc<Connection>,
    http1: &http1::Builder,
    stop: &AtomicBool,
) -> Result<(), Ended>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = Rewind::new(read, io);
    let mut hyper = Box::pin(
        http1
            .serve_connection(TokioIo::new(io), connection.service())
            .with_upgrades(),
    );
    let served = tokio::select! {
        served = hyper.as_mut() => served,
        () = stopped(stop) => {
            hyper.as_mut().graceful_shutdown();
            hyper.await
        }
    };
    served.map_err(Ended::Hyper)
}

/// Resolves once `stop` is set, seen when the connection is next polled.
fn stopped(stop: &AtomicBool) -> impl Future<Output = ()> + '_ {
    seen(|| stop.load(Ordering::Relaxed))
}

/// Resolves once `done` says so, looked at on each poll. It registers no waker: whoever makes
/// `done` true then polls the future, or wakes the task it runs in.
pub(super) fn seen(done: impl Fn() -> bool) -> impl Future<Output = ()> {
    poll_fn(move |_| {
        if done() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
}

/// What the bytes read so far hold.
// Returned once per request and matched at once, never stored.
#[allow(clippy::large_enum_variant)]
enum Parse {
    /// A request this server answers itself, whether the connection stays open after it, and
    /// the length of its head.
    Simple(Request<ClientBody>, bool, usize),
    /// The beginning of a head.
    Partial,
    /// Anything else: hyper takes the connection.
    Other,
}

/// Parses the head at the front of `read`; the request's URI and header values share its
/// bytes.
fn parse(read: &Bytes, settings: Settings) -> Parse {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut []);
    let len = match head.parse_with_uninit_headers(read, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if read.len() <= settings.max_header_bytes => {
            return Parse::Partial;
        }
        _ => return Parse::Other,
    };
    if len > settings.max_header_bytes
        || head.version != Some(1)
        || head.headers.len() > settings.max_headers
    {
        return Parse::Other;
    }
    let (Some(method), Some(target)) = (head.method, head.path) else {
        return Parse::Other;
    };
    let method = match method {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        "CONNECT" => return Parse::Other,
        other => match Method::from_bytes(other.as_bytes()) {
            Ok(method) => method,
            Err(_) => return Parse::Other,
        },
    };
    if target.len() > MAX_TARGET {
        return Parse::Other;
    }
    // What `http` refuses of a target or a field goes to hyper too, which answers it 400.
    let Ok(uri) = Uri::from_maybe_shared(read.slice_ref(target.as_bytes())) else {
        return Parse::Other;
    };
    // Room for what forwarding adds (`X-Forwarded-For`, `-Proto`, `-Host`, `TE`), so that the
    // map is not grown, each of its entries moved, on the way upstream.
    let mut headers = HeaderMap::with_capacity(head.headers.len() + 4);
    let mut close = false;
    for field in head.headers.iter() {
        let name = field.name.as_bytes();
        let simple = if name.eq_ignore_ascii_case(b"content-length") {
            // No body only.
            !field.value.is_empty() && field.value.iter().all(|&b| b == b'0')
        } else if name.eq_ignore_ascii_case(b"connection") {
            close |= lists_token(field.value, "close");
            if is_usual_connection(field.value) {
                // It concerns this connection alone and names no other field: noted, and not
                // kept for the forwarder to remove.
                continue;
            }
            true
        } else {
            !(name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(b"expect")
                || name.eq_ignore_ascii_case(b"upgrade")
                || name.eq_ignore_ascii_case(b"te"))
        };
        let (true, Ok(name), Ok(value)) = (
            simple,
            HeaderName::from_bytes(name),
            HeaderValue::from_maybe_shared(read.slice_ref(field.value)),
        ) else {
            return Parse::Other;
        };
        headers.append(name, value);
    }
    let mut req = Request::new(ClientBody::Empty);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Parse::Simple(req, !close, len)
}

/// Writes `response` to a request (a HEAD request: `is_head`) as hyper would, and says in
/// `keep_alive` whether the connection stays open.
async fn write_response<W: AsyncWrite + Unpin>(
    io: &mut W,
    response: Response<ProxyBody>,
    is_head: bool,
    keep_alive: &mut bool,
) -> Result<(), Ended> {
    let (parts, body) = response.into_parts();
    let (head, framing) = encode_head(&parts, &body, is_head, keep_alive);
    let mut out = Outgoing {
        body: (framing != Framing::None && !body.is_end_stream()).then_some(body),
        chunked: framing == Framing::Chunked,
        trailers: false,
        head,
        queue: VecDeque::new(),
        failed: None,
    };
    poll_fn(|cx| out.poll(io, cx))
        .await
        .map_err(Ended::Response)?;
    match out.failed {
        Some(error) => Err(Ended::Io(error)),
        None => Ok(()),
    }
}

/// How a response body goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// As its bytes come: its `Content-Length` says where it ends.
    Length,
    Chunked,
    /// Not at all (HEAD, 204, 304).
    None,
}

/// The status line and header section of a response, as hyper's server writes them.
fn encode_head(
    parts: &http::response::Parts,
    body: &ProxyBody,
    is_head: bool,
    keep_alive: &mut bool,
) -> (Bytes, Framing) {
    let status = parts.status;
    let no_length = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let can_have_body = !is_head && !no_length;
    // hyper's `BodyLength`: `None` for a body that has ended, else its exact length if known.
    let length = if body.is_end_stream() {
        None
    } else {
        Some(body.size_hint().exact())
    };
    let mut framing = Framing::Length;
    let head = encoded(|out| {
        if status == StatusCode::OK {
            out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        } else {
            out.extend_from_slice(b"HTTP/1.1 ");
            out.extend_from_slice(status.as_str().as_bytes());
            out.push(b' ');
            out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        let mut wrote_length = false;
        let mut wrote_date = false;
        let mut says_close = false;
        for (name, value) in &parts.headers {
            match *name {
                header::CONTENT_LENGTH => {
                    // Written once; without a body, only after HEAD (hyper writes its own `0`
                    // otherwise, below).
                    if wrote_length || (length.is_none() && !is_head) {
                        continue;
                    }
                    wrote_length = true;
                }
                header::TRANSFER_ENCODING | header::TRAILER if !can_have_body => continue,
                header::TRANSFER_ENCODING => {
                    wrote_length = true;
                    framing = Framing::Chunked;
                    if !ends_chunked(value.as_bytes()) {
                        out.extend_from_slice(b"transfer-encoding: ");
                        out.extend_from_slice(value.as_bytes());
                        out.extend_from_slice(b", chunked\r\n");
                        continue;
                    }
                }
                header::CONNECTION => says_close |= has_token(value, "close"),
                header::DATE => wrote_date = true,
                _ => {}
            }
            put_field(out, name, value);
        }
        if !wrote_length {
            match length {
                Some(None) if can_have_body => {
                    out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    framing = Framing::Chunked;
                }
                Some(Some(n)) if n > 0 && !no_length => {
                    out.extend_from_slice(b"content-length: ");
                    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                None | Some(Some(0)) if !no_length && !is_head => {
                    out.extend_from_slice(b"content-length: 0\r\n");
                }
                _ => {}
            }
        }
        if says_close {
            *keep_alive = false;
        } else if !*keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        }
        if !wrote_date {
            out.extend_from_slice(b"date: ");
            date(out);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    });
    if !can_have_body {
        framing = Framing::None;
    }
    (head, framing)
}

/// Appends the current time as an HTTP date, formatted once a second.
fn date(out: &mut Vec<u8>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(second, text)| {
        if *second != now {
            let formatted = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(now));
            text.copy_from_slice(&formatted.as_bytes()[..29]);
            *second = now;
        }
        out.extend_from_slice(&text[..]);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings::of(&crate::config::Limits::default())
    }

    fn parsed(raw: &str) -> Parse {
        parse(&Bytes::copy_from_slice(raw.as_bytes()), settings())
    }

    #[test]
    fn requests_without_a_body_are_taken_and_share_one_allocation_with_their_head() {
        let raw = Bytes::from_static(
            b"GET /a?b=c HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 0\r\n\
              Connection: keep-alive, close\r\n\r\nGET /next",
        );
        let Parse::Simple(req, keep_alive, len) = parse(&raw, settings()) else {
            panic!("a simple request");
        };
        assert_eq!(len, raw.len() - "GET /next".len());
        assert!(!keep_alive, "the client asked to close");
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri(), "/a?b=c");
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers()["host"], "app.localhost");
        assert_eq!(req.headers().len(), 3);
        let within = raw.as_ptr_range();
        assert!(within.contains(&req.headers()["host"].as_bytes().as_ptr()));

        let Parse::Simple(req, keep_alive, _) = parsed("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
        else {
            panic!("a simple request");
        };
        assert!(keep_alive);
        assert_eq!(req.uri(), "*");
    }

    #[test]
    fn everything_else_goes_to_hyper() {
        for raw in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            "GET /a\x7fb HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET http://[::1 HTTP/1.1\r\nHost: a\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert!(matches!(parsed(raw), Parse::Other), "{raw:?}");
        }
        // Beyond the limits: hyper answers 431.
        let many: String = (0..101).map(|i| format!("x-{i}: y\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
        assert!(matches!(parsed(&raw), Parse::Other));
        let long = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nx: {}\r\n\r\n",
            "y".repeat(70_000)
        );
        assert!(matches!(parsed(&long), Parse::Other));
    }

    #[test]
    fn a_head_that_has_not_all_come_is_waited_for_up_to_the_header_limit() {
        assert!(matches!(
            parsed("GET / HTTP/1.1\r\nHost: a"),
            Parse::Partial
        ));
        let long = format!("GET / HTTP/1.1\r\nx: {}", "y".repeat(70_000));
        assert!(matches!(parsed(&long), Parse::Other));
    }
}
