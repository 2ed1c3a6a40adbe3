//! HTTP/1.1 to upstream endpoints, wakegate's own client on `httparse`: the request's own task
//! writes the request and reads the response on the connection it took from the pool (see
//! [`super::pool`]) — no connection task, no channel in between — and a connection holds no
//! buffer while it waits: one is taken once its socket has bytes to read, and an idle
//! connection in the pool is its socket alone.
//!
//! A response is framed as RFC 9112 §6.3 says: none after HEAD, a 1xx, 204 or 304, or a 2xx to
//! CONNECT; then `Transfer-Encoding` ending in `chunked`, a valid `Content-Length`, or else the
//! connection's end. Interim responses (100, 103) are skipped; a 101 to a request that asked
//! for an upgrade hands the connection over ([`Body::upgrade`]). The request body goes on being
//! written while the response is read, so an upstream may answer before it has read it all.
//! A connection goes back to the pool only when both messages ended cleanly, nothing more
//! came, and the upstream did not ask to close it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

use super::forward::{is_usual_connection, lists_token};
use super::pool::Pooled;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The largest response head (or trailer section) read; more is an error.
const MAX_HEAD: usize = 64 * 1024;
/// The most header fields a response head may have.
const MAX_HEADERS: usize = 128;
/// The worker's scratch buffer, which a response head (and a client's request head, in
/// [`super::h1_server`]) is read into: one read fills at most this much.
const SCRATCH: usize = 16 * 1024;
/// A body read's first buffer, when the head came without all of it.
const FIRST_READ: usize = 4 * 1024;
/// The largest buffer one read fills.
const MAX_READ: usize = 64 * 1024;
/// The longest chunk extension read (they are skipped).
const MAX_EXTENSION: u16 = 4096;
/// Request body frames queued for one vectored write at most.
const MAX_QUEUED: usize = 16;

/// Why an exchange with an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the upstream closed the connection before responding")]
    ClosedBeforeResponse,
    #[error("the upstream closed the connection before the response body ended")]
    ClosedInBody,
    #[error("invalid response from the upstream: {0}")]
    Invalid(&'static str),
    #[error("invalid response from the upstream: {0}")]
    Parse(#[from] httparse::Error),
    #[error("the upstream's response head is larger than {} KiB", MAX_HEAD / 1024)]
    HeadTooLarge,
    #[error("connection to the upstream failed: {0}")]
    Io(#[from] io::Error),
    /// The request body (the client's) failed: nothing the upstream did.
    #[error("the request body failed: {0}")]
    RequestBody(#[source] BoxError),
}

/// Why a request got no response, and the request itself when it may be sent again.
#[derive(Debug)]
pub struct Failed<B> {
    pub error: Error,
    /// Given back when the upstream closed the connection (or reset it) before any byte of a
    /// response, and the request is one that may go again without harm: a `GET`, `HEAD`,
    /// `OPTIONS` or `TRACE` without a body (RFC 9110 §9.2.2). On a connection that waited idle
    /// in the pool, that is the upstream closing it as the request went out.
    pub again: Option<Request<B>>,
}

impl<B> From<Error> for Box<Failed<B>> {
    fn from(error: Error) -> Self {
        Box::new(Failed { error, again: None })
    }
}

/// Sends `req` (origin-form or authority-form, with its `Host`, hop-by-hop headers removed) on
/// `connection`; the response comes with its body still on the connection, and without its
/// `Connection` field when that says no more than `keep-alive` or `close` (unless it is a
/// 101): the connection's own business, which the forwarder would remove.
pub async fn send<B>(
    connection: Pooled,
    req: Request<B>,
) -> Result<Response<Body<B>>, Box<Failed<B>>>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    let upgrading = parts.headers.contains_key(header::UPGRADE);
    let (head, framed) = encode_head(&parts, &body);
    let sends_body = match framed {
        Framed::Nothing => false,
        Framed::AsIs => !body.is_end_stream(),
        Framed::Chunked => true,
    };
    // A body that does not go is kept until the response comes, to send the request again.
    let (body, kept) = if sends_body {
        (Some(body), None)
    } else {
        (None, Some(body))
    };
    let mut exchange = Body {
        connection: Some(connection),
        read: BytesMut::new(),
        want: FIRST_READ,
        out: Outgoing {
            body,
            chunked: framed == Framed::Chunked,
            trailers: true,
            head,
            queue: VecDeque::new(),
            failed: None,
        },
        framing: Framing::Done,
        keep_alive: false,
    };
    let head = match poll_fn(|cx| exchange.poll_head(cx)).await {
        Ok(head) => head,
        Err(error) => {
            let closed = match &error {
                Error::ClosedBeforeResponse => true,
                Error::Io(e) => matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                ),
                _ => false,
            };
            let may_go_again = closed
                && exchange.read.is_empty()
                && matches!(
                    parts.method,
                    Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
                );
            let again = kept
                .filter(|_| may_go_again)
                .map(|body| Request::from_parts(parts, body));
            return Err(Box::new(Failed { error, again }));
        }
    };
    drop(kept);
    let mut response = Response::new(());
    *response.status_mut() = head.status;
    // The upstream's version concerns its connection alone: a gateway answers in its own
    // (RFC 9110 §6.2), and an HTTP/1.0 one would cost the client its kept-alive connection.
    *response.version_mut() = Version::HTTP_11;
    *response.headers_mut() = head.headers;
    // An HTTP/1.0 message with Transfer-Encoding has faulty framing (RFC 9112 §6.1): it is
    // read as it says, and the connection closed after.
    let says = &head.says;
    exchange.keep_alive = says.keep_alive(head.version)
        && !(head.version == Version::HTTP_10 && says.transfer_encoding.is_some());
    exchange.framing = framing(&parts.method, upgrading, head.status, says)?;
    if exchange.framing == Framing::Close {
        exchange.keep_alive = false;
    }
    if says.transfer_encoding.is_some() {
        // It overrides a Content-Length (RFC 9112 §6.3), which must not reach the client: the
        // body says where it ends downstream.
        response.headers_mut().remove(header::CONTENT_LENGTH);
    }
    if exchange.framing == Framing::Length(0) {
        exchange.finish();
    }
    Ok(response.map(|()| exchange))
}

/// How a request's body goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framed {
    /// Not at all: a GET, HEAD or CONNECT whose body has no known length (an HTTP/2 client's
    /// stream may end with an empty DATA frame), as hyper's client does too. Sent chunked, an
    /// upstream that reads no body on these would take the last chunk for the next request.
    Nothing,
    /// As its bytes come: its `Content-Length` says where it ends.
    AsIs,
    Chunked,
}

/// The request line and header section, and how the body goes.
fn encode_head<B: http_body::Body>(parts: &http::request::Parts, body: &B) -> (Bytes, Framed) {
    let target = if parts.method == Method::CONNECT {
        parts.uri.authority().map_or("", |a| a.as_str())
    } else {
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    };
    let mut framed = Framed::AsIs;
    let head = encoded(|head| {
        head.extend_from_slice(parts.method.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(target.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        put_fields(head, &parts.headers);
        if !parts.headers.contains_key(header::CONTENT_LENGTH) {
            match body.size_hint().exact() {
                // Methods without body semantics go without; others say there is none.
                Some(0) if !matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) => {}
                Some(length) => {
                    head.extend_from_slice(b"content-length: ");
                    head.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
                    head.extend_from_slice(b"\r\n");
                }
                None if matches!(parts.method, Method::GET | Method::HEAD | Method::CONNECT) => {
                    framed = Framed::Nothing;
                }
                None => {
                    head.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    framed = Framed::Chunked;
                }
            }
        }
        head.extend_from_slice(b"\r\n");
    });
    (head, framed)
}

/// Reads what the peer sent into `pending` through the worker's scratch buffer: `pending`
/// grows by what came, and holds no more room than that. A head is read this way, where a
/// buffer reserved for it would be a larger allocation, most of it never filled, kept for as
/// long as any of the head's values.
pub(super) fn poll_read_into<I: AsyncRead + Unpin>(
    io: &mut I,
    pending: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    thread_local! {
        static SCRATCH_BUFFER: RefCell<Box<[u8]>> =
            RefCell::new(vec![0; SCRATCH].into_boxed_slice());
    }
    SCRATCH_BUFFER.with_borrow_mut(|scratch| {
        let mut buf = ReadBuf::new(scratch);
        ready!(Pin::new(io).poll_read(cx, &mut buf))?;
        pending.extend_from_slice(buf.filled());
        Poll::Ready(Ok(buf.filled().len()))
    })
}

/// A message head written by `write` into the worker's scratch buffer, then copied out at its
/// size: one allocation, where a `Vec` grown to an estimate needs a second one to become
/// `Bytes` (and holds the estimate's slack as long as the head lives).
pub(super) fn encoded(write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    /// A scratch buffer grown past this by an outsized head is let go after it.
    const KEEP: usize = 16 * 1024;
    thread_local! {
        static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        write(scratch);
        let head = Bytes::copy_from_slice(scratch);
        if scratch.capacity() > KEEP {
            *scratch = Vec::new();
        }
        head
    })
}

/// Writes `fields` as HTTP/1.1 field lines, each ending in CRLF: a head's or a trailer section's.
fn put_fields(out: &mut Vec<u8>, fields: &HeaderMap) {
    for (name, value) in fields {
        put_field(out, name, value);
    }
}

/// Writes one HTTP/1.1 field line, ending in CRLF.
pub(super) fn put_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Whether a `Transfer-Encoding` value's last coding is `chunked`.
pub(super) fn ends_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// What a response head's fields say of its connection and its framing: noted as the head is
/// parsed, so that none of them is looked up again.
#[derive(Debug)]
struct Says {
    /// `Connection` lists `close`.
    close: bool,
    /// `Connection` lists `keep-alive`.
    keep_alive: bool,
    /// `Transfer-Encoding`: whether its last coding is `chunked`.
    transfer_encoding: Option<bool>,
    /// `Content-Length`, all of its values agreeing; or why not.
    content_length: Result<Option<u64>, &'static str>,
}

impl Default for Says {
    fn default() -> Self {
        Self {
            close: false,
            keep_alive: false,
            transfer_encoding: None,
            content_length: Ok(None),
        }
    }
}

impl Says {
    /// Notes what field `name` says with `value`.
    fn note(&mut self, name: &HeaderName, value: &[u8]) {
        if *name == header::CONNECTION {
            self.close |= lists_token(value, "close");
            self.keep_alive |= lists_token(value, "keep-alive");
        } else if *name == header::TRANSFER_ENCODING {
            self.transfer_encoding = Some(ends_chunked(value));
        } else if *name == header::CONTENT_LENGTH
            && let Ok(length) = &mut self.content_length
        {
            for part in value.split(|&b| b == b',') {
                let part = part.trim_ascii();
                let n =
                    (!part.is_empty() && part.len() <= 19 && part.iter().all(u8::is_ascii_digit))
                        .then(|| part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')));
                match n {
                    None => {
                        self.content_length = Err("malformed Content-Length");
                        return;
                    }
                    Some(n) if length.is_some_and(|l| l != n) => {
                        self.content_length = Err("conflicting Content-Length values");
                        return;
                    }
                    Some(n) => *length = Some(n),
                }
            }
        }
    }

    /// Whether the upstream keeps the connection open after this response (RFC 9112 §9.3).
    fn keep_alive(&self, version: Version) -> bool {
        if version == Version::HTTP_11 {
            !self.close
        } else {
            self.keep_alive && !self.close
        }
    }
}

/// How the response body is delimited.
fn framing(
    method: &Method,
    upgrading: bool,
    status: StatusCode,
    says: &Says,
) -> Result<Framing, Error> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return if upgrading {
            Ok(Framing::Upgrade)
        } else {
            Err(Error::Invalid(
                "101 Switching Protocols to a request that asked for none",
            ))
        };
    }
    if *method == Method::CONNECT && status.is_success() {
        return Ok(Framing::Upgrade);
    }
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Length(0));
    }
    match says.transfer_encoding {
        Some(true) => return Ok(Framing::Chunked(Chunked::default())),
        Some(false) => return Ok(Framing::Close),
        None => {}
    }
    let length = says.content_length.map_err(Error::Invalid)?;
    Ok(length.map_or(Framing::Close, Framing::Length))
}

/// A parsed response head.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    says: Says,
}

/// Where the response body ends.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// So many bytes still to come.
    Length(u64),
    Chunked(Chunked),
    /// At the connection's end.
    Close,
    /// The connection now carries another protocol (or a CONNECT tunnel).
    Upgrade,
    /// The body has ended.
    Done,
}

/// A message body as it is being written (a request's upstream, a response's to the client
/// in [`super::h1_server`]), after its head.
#[derive(Debug)]
pub(super) struct Outgoing<B> {
    /// Until it has ended.
    pub(super) body: Option<B>,
    pub(super) chunked: bool,
    /// Whether the body's trailers go too (chunked only).
    pub(super) trailers: bool,
    /// The message's head, until written: apart from the queue, so that a message without a
    /// body needs no queue at all.
    pub(super) head: Bytes,
    /// Body bytes encoded, not yet written.
    pub(super) queue: VecDeque<Bytes>,
    /// Writing failed: the peer stopped reading (an upstream may still answer).
    pub(super) failed: Option<io::Error>,
}

impl<B> Outgoing<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn done(&self) -> bool {
        self.body.is_none() && self.head.is_empty() && self.queue.is_empty()
    }

    /// Writes what it can of the message; ready once all of it is written (or writing failed).
    pub(super) fn poll<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Error>> {
        loop {
            while self.queue.len() < MAX_QUEUED
                && let Some(body) = &mut self.body
            {
                let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) else {
                    break;
                };
                match frame {
                    None => self.end(None),
                    Some(Err(error)) => return Poll::Ready(Err(Error::RequestBody(error.into()))),
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            if !data.is_empty() {
                                if self.chunked {
                                    self.queue
                                        .push_back(Bytes::from(format!("{:x}\r\n", data.len())));
                                    self.queue.push_back(data);
                                    self.queue.push_back(Bytes::from_static(b"\r\n"));
                                } else {
                                    self.queue.push_back(data);
                                }
                            }
                            if body.is_end_stream() {
                                self.end(None);
                            }
                        }
                        Err(frame) => self.end(frame.into_trailers().ok()),
                    },
                }
            }
            if self.head.is_empty() && self.queue.is_empty() {
                return if self.body.is_none() {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            let mut slices = [IoSlice::new(&[]); MAX_QUEUED + 1];
            let unwritten = std::iter::once(&self.head)
                .filter(|head| !head.is_empty())
                .chain(&self.queue);
            let mut n = 0;
            for (slice, bytes) in slices.iter_mut().zip(unwritten) {
                *slice = IoSlice::new(bytes);
                n += 1;
            }
            let written = match ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n])) {
                Ok(0) => Err(io::Error::from(io::ErrorKind::WriteZero)),
                result => result,
            };
            match written {
                Ok(mut written) => {
                    let n = written.min(self.head.len());
                    if n == self.head.len() {
                        // Let go of its allocation now: a request's outlives it.
                        self.head = Bytes::new();
                    } else {
                        self.head.advance(n);
                    }
                    written -= n;
                    while written > 0 {
                        let front = self.queue.front_mut().expect("written from the queue");
                        let n = written.min(front.len());
                        front.advance(n);
                        written -= n;
                        if front.is_empty() {
                            self.queue.pop_front();
                        }
                    }
                }
                Err(error) => {
                    self.body = None;
                    self.head.clear();
                    self.queue.clear();
                    self.failed = Some(error);
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }

    /// The body ended, with these trailers: the last chunk is queued.
    fn end(&mut self, trailers: Option<HeaderMap>) {
        self.body = None;
        if !self.chunked {
            return;
        }
        let trailers = trailers.filter(|_| self.trailers);
        self.queue.push_back(encoded(|last| {
            last.extend_from_slice(b"0\r\n");
            if let Some(trailers) = &trailers {
                put_fields(last, trailers);
            }
            last.extend_from_slice(b"\r\n");
        }));
    }
}

/// An upstream response's body, read from its connection as it is polled, which also goes on
/// writing the request. It puts the connection back in the pool when it ends cleanly; dropped
/// before, it closes it.
#[derive(Debug)]
pub struct Body<B> {
    /// Until the body has ended.
    connection: Option<Pooled>,
    /// Read and not yet taken; no buffer until the socket has bytes.
    read: BytesMut,
    /// How much the next read reserves.
    want: usize,
    out: Outgoing<B>,
    framing: Framing,
    keep_alive: bool,
}

impl<B> Body<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// The upgraded connection, with what the upstream sent after its 101; the body back
    /// unless the response switched protocols (or accepted a CONNECT).
    pub fn upgrade(mut self: Box<Self>) -> Result<Upgraded, Box<Self>> {
        if self.framing != Framing::Upgrade {
            return Err(self);
        }
        let Some(connection) = self.connection.take() else {
            return Err(self);
        };
        Ok(Rewind::new(
            std::mem::take(&mut self.read).freeze(),
            connection.into_stream(),
        ))
    }

    /// Writes the request and reads until a final response head has come.
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Head, Error>> {
        loop {
            self.poll_out(cx)?;
            if !self.read.is_empty() {
                if let Some(head) = parse_head(&mut self.read)? {
                    if head.status.is_informational()
                        && head.status != StatusCode::SWITCHING_PROTOCOLS
                    {
                        // 100 Continue, 103 Early Hints: the final response follows.
                        continue;
                    }
                    return Poll::Ready(Ok(head));
                }
                if self.read.len() >= MAX_HEAD {
                    return Poll::Ready(Err(Error::HeadTooLarge));
                }
            }
            if ready!(self.poll_fill_head(cx))? == 0 {
                return Poll::Ready(Err(match self.out.failed.take() {
                    Some(error) => Error::Io(error),
                    None if self.read.is_empty() => Error::ClosedBeforeResponse,
                    None => Error::Invalid("the connection ended within the response head"),
                }));
            }
        }
    }

    /// Writes what it can of the request; an error only if the request body failed.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        if self.out.done() {
            return Ok(());
        }
        let Some(connection) = &mut self.connection else {
            return Ok(());
        };
        match self.out.poll(connection.stream_mut(), cx) {
            Poll::Ready(Err(error)) => Err(error),
            _ => Ok(()),
        }
    }

    /// Reads more of the response head into `read`: the number of bytes, 0 at the connection's
    /// end. A small response comes whole in the first read, body and all.
    fn poll_fill_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, Error>> {
        let io = reading(&mut self.connection);
        Poll::Ready(Ok(ready!(poll_read_into(io, &mut self.read, cx))?))
    }

    /// Reads more of the response body into `read`: the number of bytes, 0 at the connection's
    /// end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, Error>> {
        let io = reading(&mut self.connection);
        ready!(io.poll_read_ready(cx))?;
        // Only now a buffer: a response that is slow to come costs none.
        if self.read.capacity() - self.read.len() < (self.want / 2).max(1) {
            self.read.reserve(self.want);
        }
        let room = self.read.capacity() - self.read.len();
        // Read as `AsyncRead` reads: one that leaves room tells tokio the socket is drained, so
        // that nothing asks it again (a `recv` that would block, as the pool's check of an
        // idle connection would) before the kernel says more came.
        let n = ready!(poll_read_buf(Pin::new(io), cx, &mut self.read))?;
        if n == room {
            self.want = (self.want * 2).min(MAX_READ);
        }
        Poll::Ready(Ok(n))
    }

    /// The body has ended: the connection goes back to the pool if it can carry another
    /// request, or is closed.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        let connection = self.connection.take();
        if let Some(connection) = connection
            && self.keep_alive
            && self.out.done()
            && self.out.failed.is_none()
            && self.read.is_empty()
        {
            connection.release();
        }
        self.read = BytesMut::new();
    }
}

/// The connection a response is read from: there until the body has ended (a field apart,
/// so that the rest of the exchange stays free to borrow).
fn reading(connection: &mut Option<Pooled>) -> &mut TcpStream {
    connection
        .as_mut()
        .expect("read only while the body goes on")
        .stream_mut()
}

impl<B> http_body::Body for Body<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        if this.framing == Framing::Done || this.framing == Framing::Upgrade {
            return Poll::Ready(None);
        }
        if let Err(error) = this.poll_out(cx) {
            this.connection = None;
            this.framing = Framing::Done;
            return Poll::Ready(Some(Err(error)));
        }
        loop {
            match &mut this.framing {
                Framing::Done | Framing::Upgrade => return Poll::Ready(None),
                Framing::Length(remaining) => {
                    if !this.read.is_empty() {
                        let n = this
                            .read
                            .len()
                            .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                        let data = this.read.split_to(n).freeze();
                        *remaining -= n as u64;
                        if *remaining == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    // Reserves no more than the body's rest (a read may still fill what the
                    // buffer has room for: bytes beyond the body keep the connection out of
                    // the pool).
                    this.want = this
                        .want
                        .min(usize::try_from(*remaining).unwrap_or(MAX_READ))
                        .max(1);
                }
                Framing::Chunked(chunked) => match chunked.decode(&mut this.read) {
                    Err(error) => {
                        this.connection = None;
                        this.framing = Framing::Done;
                        return Poll::Ready(Some(Err(error)));
                    }
                    Ok(Some(Decoded::Data(data))) => {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(Some(Decoded::Trailers(trailers))) => {
                        this.finish();
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(Some(Decoded::End)) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(None) => {}
                },
                Framing::Close => {
                    if !this.read.is_empty() {
                        let data = this.read.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            match ready!(this.poll_fill(cx)) {
                Ok(0) if this.framing == Framing::Close => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.connection = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(Error::ClosedInBody)));
                }
                Ok(_) => {}
                Err(error) => {
                    this.connection = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(error)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done | Framing::Upgrade)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done | Framing::Upgrade => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Parses a response head off the front of `read`, if all of it is there.
fn parse_head(read: &mut BytesMut) -> Result<Option<Head>, Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    let length = match response.parse(read) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::Invalid("more than 128 header fields"));
        }
        Err(error) => return Err(error.into()),
    };
    let version = match response.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(Error::Invalid("status code out of range"))?;
    // Where each field is within the head: its values are shared from it, not copied.
    let base = read.as_ptr() as usize;
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let count = response.headers.len();
    for (span, field) in spans.iter_mut().zip(response.headers.iter()) {
        let name = field.name.as_ptr() as usize - base;
        let value = field.value.as_ptr() as usize - base;
        *span = (
            name as u32,
            field.name.len() as u32,
            value as u32,
            field.value.len() as u32,
        );
    }
    let head = read.split_to(length).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    let mut says = Says::default();
    for &(name, name_len, value, value_len) in &spans[..count] {
        let name = &head[name as usize..(name + name_len) as usize];
        let name = HeaderName::from_bytes(name).map_err(|_| Error::Invalid("header name"))?;
        let range = value as usize..(value + value_len) as usize;
        says.note(&name, &head[range.clone()]);
        if name == header::CONNECTION
            && status != StatusCode::SWITCHING_PROTOCOLS
            && is_usual_connection(&head[range.clone()])
        {
            // It concerns this connection alone and names no other field: noted, and not
            // kept for the forwarder to remove (a 101's goes to its client).
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(range))
            .map_err(|_| Error::Invalid("header value"))?;
        headers.append(name, value);
    }
    Ok(Some(Head {
        status,
        version,
        headers,
        says,
    }))
}

/// A chunked body's decoder (RFC 9112 §7.1).
#[derive(Debug, Default, PartialEq, Eq)]
struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
enum ChunkState {
    /// Within a chunk size: its value so far, and how many hex digits.
    #[default]
    Size,
    SizeDigits(u64, u8),
    /// After the size: whitespace or an extension, up to the CR; and its length so far.
    Extension(u64, u16),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk: the trailer section.
    Trailers,
}

enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
}

impl Chunked {
    /// Decodes from the front of `read`: `None` if more bytes are needed.
    fn decode(&mut self, read: &mut BytesMut) -> Result<Option<Decoded>, Error> {
        const INVALID: Error = Error::Invalid("malformed chunked encoding");
        loop {
            if read.is_empty() {
                return Ok(None);
            }
            match self.state {
                ChunkState::Data(remaining) => {
                    let n = read
                        .len()
                        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    let data = read.split_to(n).freeze();
                    let remaining = remaining - n as u64;
                    self.state = if remaining == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(remaining)
                    };
                    return Ok(Some(Decoded::Data(data)));
                }
                ChunkState::Trailers => {
                    if read.starts_with(b"\r\n") {
                        read.advance(2);
                        return Ok(Some(Decoded::End));
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    return match httparse::parse_headers(read, &mut fields) {
                        Ok(httparse::Status::Complete((length, fields))) => {
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for field in fields.iter() {
                                let name = HeaderName::from_bytes(field.name.as_bytes())
                                    .map_err(|_| INVALID)?;
                                let value =
                                    HeaderValue::from_bytes(field.value).map_err(|_| INVALID)?;
                                trailers.append(name, value);
                            }
                            read.advance(length);
                            Ok(Some(Decoded::Trailers(trailers)))
                        }
                        Ok(httparse::Status::Partial) if read.len() < MAX_HEAD => Ok(None),
                        Ok(httparse::Status::Partial) => Err(Error::HeadTooLarge),
                        Err(_) => Err(INVALID),
                    };
                }
                state => {
                    let byte = read[0];
                    read.advance(1);
                    self.state = match (state, byte) {
                        (ChunkState::Size, b) => match hex(b) {
                            Some(d) => ChunkState::SizeDigits(d, 1),
                            None => return Err(INVALID),
                        },
                        (ChunkState::SizeDigits(n, digits), b) => match hex(b) {
                            // 16 hex digits fill 64 bits.
                            Some(_) if digits == 16 => return Err(INVALID),
                            Some(d) => ChunkState::SizeDigits(n << 4 | d, digits + 1),
                            None if b == b'\r' => ChunkState::SizeLf(n),
                            None if matches!(b, b';' | b' ' | b'\t') => ChunkState::Extension(n, 1),
                            None => return Err(INVALID),
                        },
                        (ChunkState::Extension(n, _), b'\r') => ChunkState::SizeLf(n),
                        (ChunkState::Extension(_, _), b'\n') => return Err(INVALID),
                        // Extensions mean nothing to wakegate: a few bytes are usual, more
                        // than this only costs time.
                        (ChunkState::Extension(_, MAX_EXTENSION..), _) => return Err(INVALID),
                        (ChunkState::Extension(n, length), _) => {
                            ChunkState::Extension(n, length + 1)
                        }
                        (ChunkState::SizeLf(0), b'\n') => ChunkState::Trailers,
                        (ChunkState::SizeLf(n), b'\n') => ChunkState::Data(n),
                        (ChunkState::DataCr, b'\r') => ChunkState::DataLf,
                        (ChunkState::DataLf, b'\n') => ChunkState::Size,
                        _ => return Err(INVALID),
                    };
                }
            }
        }
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

/// An upstream connection that switched protocols: what the upstream sent after its 101 comes
/// first, then the socket.
pub type Upgraded = Rewind<TcpStream>;

/// A stream with bytes already read from it, which come first: an upgraded upstream connection,
/// or a client connection that wakegate's HTTP/1 server hands to hyper.
#[derive(Debug)]
pub struct Rewind<I> {
    read: Bytes,
    io: I,
}

impl<I> Rewind<I> {
    pub fn new(read: Bytes, io: I) -> Self {
        Self { read, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read.split_to(n));
            if this.read.is_empty() {
                // Not to keep the buffer it was read into.
                this.read = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::uri::Authority;
    use http_body_util::{BodyExt, Empty, StreamBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::proxy::pool::{Pool, Settings, UpstreamError};

    /// An upstream that answers each request head it reads with the next of `answers`, raw,
    /// on whichever connection the request came; an empty answer closes the connection instead,
    /// and one that starts with `!` closes it after the rest is written.
    async fn scripted(answers: Vec<&'static str>) -> (Authority, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let answers = Arc::new(std::sync::Mutex::new(answers.into_iter()));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let answers = answers.clone();
                tokio::spawn(async move {
                    let mut read = Vec::new();
                    let mut buffer = [0; 4096];
                    loop {
                        while !read.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buffer).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => read.extend_from_slice(&buffer[..n]),
                            }
                        }
                        let end = read.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        read.drain(..end);
                        let answer = answers.lock().unwrap().next().unwrap_or_default();
                        let (answer, close) = match answer.strip_prefix('!') {
                            Some(answer) => (answer, true),
                            None => (answer, answer.is_empty()),
                        };
                        stream.write_all(answer.as_bytes()).await.unwrap();
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        (authority, accepted)
    }

    async fn send<B>(
        pool: &Pool,
        authority: &Authority,
        method: Method,
        body: B,
    ) -> Result<Response<Body<B>>, UpstreamError>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let req = Request::builder()
            .method(method)
            .uri("/")
            .header(header::HOST, authority.as_str())
            .body(body)
            .unwrap();
        pool.send(authority, req).await
    }

    async fn get(pool: &Pool, authority: &Authority) -> Response<Body<Empty<Bytes>>> {
        send(pool, authority, Method::GET, Empty::new())
            .await
            .unwrap()
    }

    /// The body's data and trailers.
    async fn read<B>(response: Response<Body<B>>) -> (String, Option<HeaderMap>)
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        let text = String::from_utf8(collected.to_bytes().to_vec()).unwrap();
        (text, trailers)
    }

    #[tokio::test]
    async fn interim_responses_are_skipped_and_the_connection_serves_the_next_request() {
        let (authority, accepted) = scripted(vec![
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-one: 1\r\n\r\nhello",
            "HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
        ])
        .await;
        let pool = Pool::new(Settings::default());
        let response = get(&pool, &authority).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-one"], "1");
        assert_eq!(read(response).await.0, "hello");
        let response = get(&pool, &authority).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(http_body::Body::is_end_stream(response.body()));
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_chunked_response_ends_with_its_trailers_and_loses_its_content_length() {
        let (authority, accepted) = scripted(vec![
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n5;ext=1\r\nhello\r\n1 \r\n!\r\n0\r\ngrpc-status: 0\r\nx-meta: a\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ])
        .await;
        let pool = Pool::new(Settings::default());
        let response = get(&pool, &authority).await;
        assert!(!response.headers().contains_key(header::CONTENT_LENGTH));
        let (text, trailers) = read(response).await;
        assert_eq!(text, "hello!");
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-meta"], "a");
        assert_eq!(
            read(get(&pool, &authority).await).await,
            ("ok".into(), None)
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_response_without_length_ends_with_its_connection_which_is_not_reused() {
        let (authority, accepted) = scripted(vec![
            "!HTTP/1.1 200 OK\r\n\r\nuntil the end",
            "!HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ncontent-length: 3\r\n\r\nuntil the end",
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ])
        .await;
        let pool = Pool::new(Settings::default());
        // The upstream closes the first connection after its answer: its end ends the body.
        assert_eq!(read(get(&pool, &authority).await).await.0, "until the end");
        // A coding other than chunked last: to the end as well, whatever Content-Length says,
        // which does not reach the client.
        let response = get(&pool, &authority).await;
        assert!(!response.headers().contains_key(header::CONTENT_LENGTH));
        assert_eq!(read(response).await.0, "until the end");
        // Asked to close, then HTTP/1.0 without keep-alive: neither connection is reused.
        assert_eq!(read(get(&pool, &authority).await).await.0, "ok");
        assert_eq!(read(get(&pool, &authority).await).await.0, "ok");
        assert_eq!(read(get(&pool, &authority).await).await.0, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn an_upstream_that_closes_or_misframes_is_an_error_saying_so() {
        let (authority, _) = scripted(vec![
            "",
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
            "!HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
        ])
        .await;
        let pool = Pool::new(Settings::default());
        let error = |r: Result<_, UpstreamError>| r.expect_err("an error").to_string();
        let e = error(send(&pool, &authority, Method::GET, Empty::<Bytes>::new()).await);
        assert_eq!(e, "the upstream closed the connection before responding");
        let e = error(send(&pool, &authority, Method::GET, Empty::<Bytes>::new()).await);
        assert_eq!(
            e,
            "invalid response from the upstream: conflicting Content-Length values"
        );
        let e = error(send(&pool, &authority, Method::GET, Empty::<Bytes>::new()).await);
        assert!(e.contains("101 Switching Protocols"), "{e}");
        let response = get(&pool, &authority).await;
        // The upstream closes the connection: the body ends short of its length.
        let error = response.into_body().collect().await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "the upstream closed the connection before the response body ended"
        );
    }

    #[tokio::test]
    async fn a_get_on_an_idle_connection_the_upstream_closes_goes_again_on_a_new_one() {
        let (authority, accepted) = scripted(vec![
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst",
            // The upstream takes the second request on the same connection and closes it, as
            // one whose keep-alive timeout ran out just then would.
            "",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nagain",
            "",
        ])
        .await;
        let pool = Pool::new(Settings::default());
        assert_eq!(read(get(&pool, &authority).await).await.0, "first");
        assert_eq!(read(get(&pool, &authority).await).await.0, "again");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // A POST is not sent twice: the upstream may have acted on it.
        let body = http_body_util::Full::new(Bytes::from("x"));
        let error = send(&pool, &authority, Method::POST, body)
            .await
            .expect_err("no second try");
        assert_eq!(
            error.to_string(),
            "the upstream closed the connection before responding"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_upstream_may_answer_before_the_request_body_has_ended() {
        let (authority, accepted) = scripted(vec![
            "HTTP/1.1 413 Content Too Large\r\ncontent-length: 3\r\n\r\nbig",
            "HTTP/1.1 204 No Content\r\n\r\n",
        ])
        .await;
        let pool = Pool::new(Settings::default());
        // A body that sends one chunk and then never ends.
        let (sender, frames) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        sender
            .send(Ok(Frame::data(Bytes::from("a"))))
            .await
            .unwrap();
        let body = StreamBody::new(tokio_stream_of(frames));
        let response = send(&pool, &authority, Method::POST, body).await.unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(read(response).await.0, "big");
        drop(sender);
        // The request never ended: its connection is not reused.
        get(&pool, &authority).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    fn tokio_stream_of<T: Send + 'static>(
        mut receiver: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Unpin {
        Box::pin(futures_util::stream::poll_fn(move |cx| {
            receiver.poll_recv(cx)
        }))
    }

    #[test]
    fn request_heads_are_framed_by_what_the_body_says() {
        let encode = |method: Method, body: http_body_util::Full<Bytes>, length: Option<&str>| {
            let mut req = Request::builder().method(method).uri("http://a/p?q=1");
            if let Some(length) = length {
                req = req.header(header::CONTENT_LENGTH, length);
            }
            let (parts, body) = req.body(body).unwrap().into_parts();
            let (head, framed) = encode_head(&parts, &body);
            (String::from_utf8(head.to_vec()).unwrap(), framed)
        };
        let empty = http_body_util::Full::new(Bytes::new());
        assert_eq!(
            encode(Method::GET, empty.clone(), None),
            ("GET /p?q=1 HTTP/1.1\r\n\r\n".into(), Framed::AsIs)
        );
        assert_eq!(
            encode(Method::POST, empty, None),
            (
                "POST /p?q=1 HTTP/1.1\r\ncontent-length: 0\r\n\r\n".into(),
                Framed::AsIs
            )
        );
        let some = http_body_util::Full::new(Bytes::from("abc"));
        assert_eq!(
            encode(Method::PUT, some, Some("3")),
            (
                "PUT /p?q=1 HTTP/1.1\r\ncontent-length: 3\r\n\r\n".into(),
                Framed::AsIs
            )
        );
        let unknown = http_body_util::StreamBody::new(futures_util::stream::iter(vec![Ok::<
            _,
            std::convert::Infallible,
        >(
            Frame::data(Bytes::from("x")),
        )]));
        let (parts, _) = Request::post("/").body(()).unwrap().into_parts();
        let (head, framed) = encode_head(&parts, &unknown);
        assert_eq!(framed, Framed::Chunked, "a body of unknown length");
        assert_eq!(
            &head[..],
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        // A GET's goes without: an upstream need not read one.
        let (parts, _) = Request::get("/").body(()).unwrap().into_parts();
        let (head, framed) = encode_head(&parts, &unknown);
        assert_eq!(framed, Framed::Nothing);
        assert_eq!(&head[..], b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads_and_refuse_what_is_malformed() {
        let body = b"3\r\nabc\r\nA;name=\"v\"\r\n0123456789\r\n0\r\nx-t: 1\r\n\r\n";
        for split in 0..body.len() {
            let mut chunked = Chunked::default();
            let mut read = BytesMut::new();
            let (mut data, mut trailers, mut ended) = (Vec::new(), None, false);
            for part in [&body[..split], &body[split..]] {
                read.extend_from_slice(part);
                while let Some(decoded) = chunked.decode(&mut read).unwrap() {
                    match decoded {
                        Decoded::Data(d) => data.extend_from_slice(&d),
                        Decoded::Trailers(t) => {
                            trailers = Some(t);
                            ended = true;
                            break;
                        }
                        Decoded::End => {
                            ended = true;
                            break;
                        }
                    }
                }
            }
            assert_eq!(data, b"abc0123456789", "split at {split}");
            assert_eq!(trailers.unwrap()["x-t"], "1", "split at {split}");
            assert!(ended && read.is_empty(), "split at {split}");
        }
        for malformed in [
            &b"g\r\n"[..],
            b"\r\n",
            b"3\nabc\r\n",
            b"3\r\nabcX\r\n",
            b"3;ext\nabc",
            b"11111111111111111\r\n",
            b"-1\r\n",
        ] {
            let mut read = BytesMut::from(malformed);
            let mut chunked = Chunked::default();
            let result = loop {
                match chunked.decode(&mut read) {
                    Ok(Some(Decoded::Data(_))) => continue,
                    other => break other,
                }
            };
            assert!(
                result.is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(malformed)
            );
        }
        let endless = format!("1;{}\r\nx\r\n", "e".repeat(5000));
        let mut read = BytesMut::from(endless.as_bytes());
        assert!(
            Chunked::default().decode(&mut read).is_err(),
            "an endless extension"
        );
    }
}
