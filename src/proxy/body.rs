//! The response body type of the data plane: an upstream body streamed through untouched (and
//! carrying the request's in-flight count and its upstream connection until it ends), or a
//! small body of wakegate's own.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::InFlight;
use super::multiplex::Stream;
use super::pool::Pooled;

#[derive(Debug)]
pub enum ProxyBody {
    Upstream(UpstreamBody),
    Full(Option<Bytes>),
    /// A body whose request is written to the access log when it ends.
    Logged(Box<super::access_log::Logged>),
}

#[derive(Debug)]
pub struct UpstreamBody {
    body: Incoming,
    /// Released when the body is finished or dropped.
    in_flight: Option<InFlight>,
    connection: Option<Upstream>,
}

/// What a response was read from.
#[derive(Debug)]
pub enum Upstream {
    /// An HTTP/1.1 connection: back to the pool if the body was read to the end, else closed.
    Http1(Pooled),
    /// An HTTP/2 stream: its connection counts it until the body ends.
    Http2(Stream),
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(Upstream::Http1(connection)) = self.connection.take()
            && self.body.is_end_stream()
        {
            connection.release();
        }
    }
}

impl ProxyBody {
    pub fn upstream(body: Incoming, in_flight: InFlight, connection: Upstream) -> Self {
        ProxyBody::Upstream(UpstreamBody {
            body,
            in_flight: Some(in_flight),
            connection: Some(connection),
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
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream(upstream) => {
                let polled = Pin::new(&mut upstream.body).poll_frame(cx);
                if let Poll::Ready(None) = polled {
                    upstream.in_flight.take();
                }
                polled
            }
            ProxyBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Logged(logged) => Pin::new(&mut **logged).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(upstream) => upstream.body.is_end_stream(),
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
