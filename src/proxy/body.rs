//! The response body type of the data plane: an upstream body streamed through untouched (and
//! carrying the request's in-flight count and its upstream connection until it ends), or a
//! small body of wakegate's own.
//!
//! An upstream body that once had to wait for its upstream is a stream of its target's: its
//! frames count as activity, and when its instance is about to stop it ends early, at a frame
//! boundary (a gRPC response at a message boundary, with `grpc-status` UNAVAILABLE).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::error;
use super::h1;
use super::multiplex::Stream;
use super::track::Watched;
use super::{InFlight, RequestBody};
use crate::target::streams::Close;

/// A client's request body: hyper's, or none for a request that wakegate's own HTTP/1 server
/// read (it takes only requests without a body; see [`super::h1_server`]).
#[derive(Debug)]
pub enum ClientBody {
    Hyper(Incoming),
    Empty,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Hyper(body) => Pin::new(body).poll_frame(cx),
            ClientBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(body) => body.is_end_stream(),
            ClientBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(body) => body.size_hint(),
            ClientBody::Empty => SizeHint::with_exact(0),
        }
    }
}

#[derive(Debug)]
pub enum ProxyBody {
    Upstream(UpstreamBody),
    Full(Option<Bytes>),
    /// A body whose request is written to the access log when it ends.
    Logged(Box<super::access_log::Logged>),
}

/// What a body's frames may fail with: the upstream's connection, or the client's request body
/// it was still writing.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
pub struct UpstreamBody {
    body: Upstream,
    /// Released when the body is finished or dropped.
    in_flight: Option<InFlight>,
    /// Boxed, and only once needed (a gRPC response, or a body that waited for its
    /// upstream): most responses never need it, and every one in flight would carry it.
    stream: Option<Box<StreamState>>,
}

/// What an upstream body keeps as a stream.
#[derive(Debug, Default)]
struct StreamState {
    /// Set once the body first waited for its upstream: from then on it is a stream.
    watched: Option<Watched>,
    /// A gRPC response's message boundaries, to end it between two messages.
    grpc: Option<GrpcMessages>,
    ending: Ending,
}

/// Whether the body was asked to end early.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Ending {
    #[default]
    No,
    /// At the next boundary.
    Asked(Close),
    /// A gRPC response's closing trailers went out; nothing follows.
    Done,
}

/// An upstream's response body, as its protocol reads it.
#[derive(Debug)]
pub enum Upstream {
    /// Read from its HTTP/1.1 connection, which goes back to the pool once the body has been
    /// read to the end (closed if dropped before).
    /// Boxed: it is most of a response body's size, and the server keeps one per response.
    Http1(Box<h1::Body<RequestBody>>),
    /// An HTTP/2 stream's: its connection counts the stream until the body is dropped.
    Http2(Incoming, Stream),
}

type Polled = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

impl Upstream {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Polled {
        match self {
            Upstream::Http1(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
            Upstream::Http2(body, _) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Upstream::Http1(body) => body.is_end_stream(),
            Upstream::Http2(body, _) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Upstream::Http1(body) => body.size_hint(),
            Upstream::Http2(body, _) => body.size_hint(),
        }
    }
}

impl ProxyBody {
    /// `grpc`: the response is a gRPC call's, ended with a gRPC status when closed early.
    pub fn upstream(body: Upstream, in_flight: InFlight, grpc: bool) -> Self {
        ProxyBody::Upstream(UpstreamBody {
            body,
            in_flight: Some(in_flight),
            stream: grpc.then(|| {
                Box::new(StreamState {
                    grpc: Some(GrpcMessages::default()),
                    ..StreamState::default()
                })
            }),
        })
    }

    pub fn text(text: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(text.into()))
    }

    pub fn empty() -> Self {
        ProxyBody::Full(None)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        match self.get_mut() {
            ProxyBody::Upstream(upstream) => upstream.poll(cx),
            ProxyBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Logged(logged) => Pin::new(&mut **logged).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(upstream) => {
                upstream
                    .stream
                    .as_ref()
                    .is_some_and(|s| s.ending == Ending::Done)
                    || upstream.body.is_end_stream()
            }
            ProxyBody::Full(data) => data.is_none(),
            ProxyBody::Logged(logged) => logged.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(upstream) => upstream.body.size_hint(),
            ProxyBody::Full(Some(data)) => SizeHint::with_exact(data.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            ProxyBody::Logged(logged) => logged.size_hint(),
        }
    }
}

impl UpstreamBody {
    fn poll(&mut self, cx: &mut Context<'_>) -> Polled {
        if let Some(end) = self.end_if_asked() {
            return Poll::Ready(end);
        }
        let polled = self.body.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(stream) = &mut self.stream {
                    if let Some(watched) = &stream.watched {
                        watched.activity.active();
                    }
                    if let (Some(grpc), Some(data)) = (&mut stream.grpc, frame.data_ref()) {
                        grpc.read(data);
                    }
                }
            }
            Poll::Ready(None) => {
                self.in_flight.take();
            }
            Poll::Ready(Some(Err(_))) => {}
            Poll::Pending => {
                let Some(in_flight) = &mut self.in_flight else {
                    return polled;
                };
                let stream = self.stream.get_or_insert_with(Box::default);
                let watched = stream.watched.get_or_insert_with(|| in_flight.watch());
                if stream.ending == Ending::No
                    && let Poll::Ready(why) = watched.closing.as_mut().poll(cx)
                {
                    in_flight.target().streams.closed(why);
                    stream.ending = Ending::Asked(why);
                    // A gRPC response in the middle of a message waits for its end.
                    if let Some(end) = self.end_if_asked() {
                        return Poll::Ready(end);
                    }
                }
            }
        }
        polled
    }

    /// Once asked to end and at a boundary: the end (a gRPC response's status first).
    fn end_if_asked(&mut self) -> Option<Option<Result<Frame<Bytes>, BoxError>>> {
        let stream = self.stream.as_mut()?;
        match stream.ending {
            Ending::No => None,
            Ending::Done => Some(None),
            Ending::Asked(why) => {
                match &stream.grpc {
                    Some(grpc) if !grpc.at_boundary() => None,
                    grpc => {
                        let grpc = grpc.is_some();
                        stream.ending = Ending::Done;
                        // The upstream's side of the stream is dropped with it: its HTTP/1.1
                        // connection closed, its HTTP/2 stream reset.
                        self.in_flight.take();
                        Some(grpc.then(|| {
                            Ok(Frame::trailers(error::grpc_closed_trailers(why.message())))
                        }))
                    }
                }
            }
        }
    }
}

/// Where a gRPC response body is in its length-prefixed messages (a flag byte, a 4-byte
/// big-endian length, then the message).
#[derive(Debug, Default)]
struct GrpcMessages {
    /// Prefix bytes read of the next message.
    prefix: [u8; 5],
    have: usize,
    /// Bytes of the current message still to come (a message's length is 32 bits).
    remaining: u32,
}

impl GrpcMessages {
    fn read(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = data.len().min(self.remaining as usize);
                self.remaining -= n as u32;
                data = &data[n..];
                continue;
            }
            let n = data.len().min(5 - self.have);
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                let length = &self.prefix[1..];
                self.remaining = u32::from_be_bytes([length[0], length[1], length[2], length[3]]);
                self.have = 0;
            }
        }
    }

    fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_message_boundaries_are_found_whatever_the_frames() {
        let mut messages = GrpcMessages::default();
        let one = [0, 0, 0, 0, 3, b'a', b'b', b'c'];
        let empty = [0, 0, 0, 0, 0];
        let stream: Vec<u8> = one.iter().chain(&empty).chain(&one).copied().collect();
        for split in 0..stream.len() {
            let (a, b) = stream.split_at(split);
            messages.read(a);
            let between = [0, 8, 13].contains(&split);
            assert_eq!(messages.at_boundary(), between, "after {split} bytes");
            messages.read(b);
            assert!(messages.at_boundary(), "at the end");
        }
    }
}
