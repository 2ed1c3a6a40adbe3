//! A request body that can be sent again from its start: what lets a request that an HTTP/2
//! upstream refused unprocessed (`GOAWAY` above its stream, `REFUSED_STREAM`) go out again on
//! another connection, although the client's body streams and cannot be cloned. The frames
//! read from the client are kept, up to [`KEEP_LIMIT`] bytes, until the upstream answers (then
//! no retry can happen and nothing more is kept); a body that outgrew the limit cannot be sent
//! twice, and its request fails as it would have without the retry.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use super::RequestBody;
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

/// The most request body bytes kept for a retry; Envoy's default retry buffer is 64 KiB too.
pub const KEEP_LIMIT: usize = 64 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One attempt at sending a request body (the client's, `B`).
#[derive(Debug)]
pub struct Replayable<B = RequestBody> {
    shared: Arc<Mutex<Shared<B>>>,
    attempt: u32,
}

#[derive(Debug)]
struct Shared<B> {
    body: B,
    /// The attempt that may read; an earlier one gets an error instead.
    attempt: u32,
    /// The index of the next frame the current attempt sends, counted from the body's start.
    next: usize,
    /// Whether the current attempt sent the trailers already.
    sent_trailers: bool,
    /// Data frames kept, from frame index `base` on.
    kept: VecDeque<Bytes>,
    base: usize,
    kept_bytes: usize,
    trailers: Option<HeaderMap>,
    /// Still keeping what is read: no response yet, and under the limit.
    keeping: bool,
    /// Frames read from the client so far.
    read: usize,
    ended: bool,
}

impl<B> Replayable<B> {
    pub fn new(body: B) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                body,
                attempt: 0,
                next: 0,
                sent_trailers: false,
                kept: VecDeque::new(),
                base: 0,
                kept_bytes: 0,
                trailers: None,
                keeping: true,
                read: 0,
                ended: false,
            })),
            attempt: 0,
        }
    }

    /// A handle that can start the body over later ([`Restart::again`]).
    pub fn restart(&self) -> Restart<B> {
        Restart(self.shared.clone())
    }
}

/// Starts a body over, if everything read of it so far was kept.
#[derive(Debug)]
pub struct Restart<B = RequestBody>(Arc<Mutex<Shared<B>>>);

impl<B> Restart<B> {
    /// The body from its start, for a new attempt; `None` if what was read of it is gone.
    pub fn again(&self) -> Option<Replayable<B>> {
        let mut shared = lock(&self.0);
        if !shared.keeping || shared.base != 0 {
            return None;
        }
        shared.attempt += 1;
        shared.next = 0;
        shared.sent_trailers = false;
        Some(Replayable {
            shared: self.0.clone(),
            attempt: shared.attempt,
        })
    }

    /// The upstream answered: no retry will come, so nothing more is kept, and what the
    /// current attempt has sent already is let go (the rest as it is sent).
    pub fn answered(&self) {
        let mut shared = lock(&self.0);
        shared.keeping = false;
        let sent = shared
            .next
            .saturating_sub(shared.base)
            .min(shared.kept.len());
        shared.kept.drain(..sent);
        shared.base += sent;
        if shared.sent_trailers {
            shared.trailers = None;
        }
    }
}

fn lock<B>(shared: &Mutex<Shared<B>>) -> MutexGuard<'_, Shared<B>> {
    // A panic while holding the lock leaves nothing half-done that matters here.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, thiserror::Error)]
#[error("the request body was taken over by a retry")]
struct Superseded;

impl<B> Body for Replayable<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut shared = lock(&this.shared);
        let shared = &mut *shared;
        if shared.attempt != this.attempt {
            return Poll::Ready(Some(Err(Superseded.into())));
        }
        // Replaying what an earlier attempt read.
        if shared.next < shared.read {
            let i = shared.next - shared.base;
            let data = if shared.keeping {
                shared.kept.get(i).cloned()
            } else {
                // Answered meanwhile: what is replayed now is not needed again.
                shared.base += 1;
                shared.kept.pop_front()
            };
            let Some(data) = data else {
                return Poll::Ready(Some(Err(Superseded.into())));
            };
            shared.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if shared.ended {
            if !shared.sent_trailers
                && let Some(trailers) = &shared.trailers
            {
                shared.sent_trailers = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers.clone()))));
            }
            return Poll::Ready(None);
        }
        match Pin::new(&mut shared.body).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        shared.read += 1;
                        shared.next += 1;
                        if shared.keeping {
                            shared.kept_bytes += data.len();
                            if shared.kept_bytes <= KEEP_LIMIT {
                                shared.kept.push_back(data.clone());
                            } else {
                                // Too much to keep: this body is sent once.
                                shared.keeping = false;
                                shared.base = shared.read;
                                shared.kept = VecDeque::new();
                            }
                        } else {
                            shared.base = shared.read;
                        }
                        Frame::data(data)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            shared.ended = true;
                            shared.sent_trailers = true;
                            if shared.keeping {
                                shared.trailers = Some(trailers.clone());
                            }
                            Frame::trailers(trailers)
                        }
                        Err(other) => other,
                    },
                };
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = lock(&self.shared);
        shared.next >= shared.read
            && (shared.trailers.is_none() || shared.sent_trailers)
            && (shared.ended || shared.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let shared = lock(&self.shared);
        if shared.read == 0 {
            shared.body.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use futures_util::stream;
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    type Frames = StreamBody<stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

    /// A client body of these data frames and one trailer.
    fn body(chunks: &[&'static str]) -> Replayable<Frames> {
        let mut frames: Vec<_> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "1".parse().unwrap());
        frames.push(Ok(Frame::trailers(trailers)));
        Replayable::new(StreamBody::new(stream::iter(frames)))
    }

    /// The next frame, as text: `data` or `trailers`.
    async fn next<B>(body: &mut Replayable<B>) -> Option<String>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let frame = body.frame().await?.expect("a frame");
        Some(match frame.into_data() {
            Ok(data) => String::from_utf8(data.to_vec()).unwrap(),
            Err(frame) => format!("trailers {:?}", frame.into_trailers().unwrap()["x-sum"]),
        })
    }

    #[tokio::test]
    async fn a_restarted_body_sends_what_was_read_again_then_the_rest() {
        let mut first = body(&["a", "b", "c"]);
        let restart = first.restart();
        assert_eq!(next(&mut first).await.as_deref(), Some("a"));
        assert_eq!(next(&mut first).await.as_deref(), Some("b"));
        let mut second = restart.again().expect("everything read was kept");
        // The attempt that was given up on cannot read on.
        assert!(first.frame().await.unwrap().is_err());
        let mut sent = Vec::new();
        while let Some(frame) = next(&mut second).await {
            sent.push(frame);
        }
        assert_eq!(sent, ["a", "b", "c", "trailers \"1\""]);
        assert!(second.is_end_stream());
        // Once read to its end, it still starts over whole.
        let mut third = restart.again().unwrap();
        let mut sent = Vec::new();
        while let Some(frame) = next(&mut third).await {
            sent.push(frame);
        }
        assert_eq!(sent, ["a", "b", "c", "trailers \"1\""]);
    }

    #[tokio::test]
    async fn a_body_beyond_the_limit_is_sent_once() {
        let big: &'static str = Box::leak("x".repeat(KEEP_LIMIT).into_boxed_str());
        let mut first = body(&[big, "y"]);
        let restart = first.restart();
        assert_eq!(next(&mut first).await.unwrap().len(), KEEP_LIMIT);
        assert!(restart.again().is_some(), "64 KiB are kept");
        let mut second = restart.again().unwrap();
        assert_eq!(next(&mut second).await.unwrap().len(), KEEP_LIMIT);
        assert_eq!(next(&mut second).await.as_deref(), Some("y"));
        assert!(restart.again().is_none(), "one byte more is not");
    }

    #[tokio::test]
    async fn an_answer_during_a_replay_keeps_what_the_attempt_has_still_to_send() {
        let mut first = body(&["a", "b"]);
        let restart = first.restart();
        while next(&mut first).await.is_some() {}
        let mut second = restart.again().unwrap();
        assert_eq!(next(&mut second).await.as_deref(), Some("a"));
        restart.answered();
        assert!(restart.again().is_none(), "no retry after an answer");
        assert_eq!(next(&mut second).await.as_deref(), Some("b"));
        assert_eq!(next(&mut second).await.as_deref(), Some("trailers \"1\""));
        assert_eq!(next(&mut second).await, None);
    }
}
