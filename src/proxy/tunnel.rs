//! An upgraded connection (WebSocket, or any other HTTP/1.1 upgrade): bytes copied both ways
//! between client and upstream, counted as the stream's activity, and closed gracefully when
//! its instance is about to stop. A WebSocket's frames are followed in both directions
//! (RFC 6455 §5.2), so that only messages count as activity (pings and pongs are keep-alives)
//! and a close frame (1001, Going Away) goes in between two frames.

use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::InFlight;
use super::h1::Upgraded;
use crate::target::streams::{Close, Stream};

/// The longest a closing tunnel waits for a frame in progress to end, and then for the
/// client's own close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// WebSocket's close code for an endpoint going away (RFC 6455 §7.4.1).
const GOING_AWAY: u16 = 1001;

const COPY_BUFFER: usize = 16 * 1024;

/// Copies bytes both ways between an upgraded client and upstream connection until either
/// side closes, or the instance is about to stop; the request counts as in flight (and as a
/// stream of its target) until the tunnel closes.
pub async fn run(
    downstream: OnUpgrade,
    upstream: Upgraded,
    mut in_flight: InFlight,
    websocket: bool,
) {
    let target = in_flight.target().clone();
    let client = match downstream.await {
        Ok(client) => client,
        Err(error) => {
            tracing::warn!(target = %target.name, %error, "upgrade failed");
            return;
        }
    };
    let watched = in_flight.watch();
    let (mut client_read, mut client_write) = tokio::io::split(TokioIo::new(client));
    let (mut server_read, mut server_write) = tokio::io::split(upstream);
    let close = CancellationToken::new();
    let done = CancellationToken::new();
    let mut to_server = Direction::new(websocket);
    let mut to_client = Direction::new(websocket);
    let copies = async {
        let ends = tokio::join!(
            to_server.copy(
                &mut client_read,
                &mut server_write,
                &watched.activity,
                &close
            ),
            to_client.copy(
                &mut server_read,
                &mut client_write,
                &watched.activity,
                &close
            ),
        );
        done.cancel();
        ends
    };
    let asked = async {
        tokio::select! {
            why = watched.closing => {
                close.cancel();
                Some(why)
            }
            () = done.cancelled() => None,
        }
    };
    let ((up, down), asked) = tokio::join!(copies, asked);
    for end in [up, down] {
        if let Err(error) = end {
            tracing::debug!(target = %target.name, %error, "upgraded connection closed with an error");
        }
    }
    let Some(why) = asked else {
        return;
    };
    target.streams.closed(why);
    tracing::debug!(target = %target.name, reason = why.label(), "closing an upgraded connection");
    // Each side gets a close frame where its direction stopped between two frames; a
    // connection that is no WebSocket, or stopped mid-frame, just ends.
    if to_server.at_boundary() && websocket {
        let _ = server_write.write_all(&close_frame(why, true)).await;
    }
    let _ = server_write.shutdown().await;
    if to_client.at_boundary() && websocket {
        let _ = client_write.write_all(&close_frame(why, false)).await;
        let _ = client_write.flush().await;
        // The client answers with its own close frame; then (or on its end) the connection
        // closes, wakegate's side first as RFC 6455 §7.1.1 asks of a server.
        let _ = tokio::time::timeout(CLOSE_WAIT, to_server.until_close(&mut client_read)).await;
    }
    let _ = client_write.shutdown().await;
}

/// One direction of a tunnel.
struct Direction {
    /// A WebSocket's frames; `None` for other protocols.
    frames: Option<Frames>,
    /// Whether the copy stopped where a frame may be sent.
    stopped_at_boundary: bool,
}

/// How one direction's copy ended.
enum End {
    /// Its source closed (its destination was shut down after it).
    Eof,
    /// Asked to close, at a boundary or not.
    Closing,
}

impl Direction {
    fn new(websocket: bool) -> Self {
        Self {
            frames: websocket.then(Frames::default),
            stopped_at_boundary: false,
        }
    }

    fn at_boundary(&self) -> bool {
        self.stopped_at_boundary
    }

    /// Copies `from` to `to` until `from` ends, or `close` asks: then as far as the end of the
    /// frame in progress (for at most [`CLOSE_WAIT`]).
    async fn copy(
        &mut self,
        from: &mut (impl AsyncRead + Unpin),
        to: &mut (impl AsyncWrite + Unpin),
        activity: &Stream,
        close: &CancellationToken,
    ) -> std::io::Result<End> {
        let mut buffer = vec![0; COPY_BUFFER];
        loop {
            let n = tokio::select! {
                biased;
                () = close.cancelled() => return self.finish_frame(from, to, &mut buffer).await,
                n = from.read(&mut buffer) => n?,
            };
            if n == 0 {
                to.shutdown().await?;
                return Ok(End::Eof);
            }
            let read = &buffer[..n];
            let carried = match &mut self.frames {
                Some(frames) => frames.read(read, false).1,
                None => true,
            };
            if carried {
                activity.active();
            }
            to.write_all(read).await?;
        }
    }

    /// Once asked to close: copies what is left of the frame in progress.
    async fn finish_frame(
        &mut self,
        from: &mut (impl AsyncRead + Unpin),
        to: &mut (impl AsyncWrite + Unpin),
        buffer: &mut [u8],
    ) -> std::io::Result<End> {
        let Some(frames) = &mut self.frames else {
            self.stopped_at_boundary = true;
            return Ok(End::Closing);
        };
        let finished = async {
            while !frames.at_boundary() {
                let n = from.read(buffer).await?;
                if n == 0 {
                    return Ok(false);
                }
                // What follows the frame's end is dropped: no more goes through.
                let (upto, _) = frames.read(&buffer[..n], true);
                to.write_all(&buffer[..upto]).await?;
            }
            Ok::<_, std::io::Error>(true)
        };
        self.stopped_at_boundary = matches!(
            tokio::time::timeout(CLOSE_WAIT, finished).await,
            Ok(Ok(true))
        );
        Ok(End::Closing)
    }

    /// Reads (and drops) what `from` sends until a close frame has come, or it ends.
    async fn until_close(&mut self, from: &mut (impl AsyncRead + Unpin)) {
        let Some(frames) = &mut self.frames else {
            return;
        };
        let mut buffer = vec![0; 1024];
        while !frames.closed {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    frames.read(&buffer[..n], false);
                }
            }
        }
    }
}

/// Where one direction of a WebSocket connection is in its frames.
#[derive(Debug, Default)]
struct Frames {
    /// Header bytes read of the next frame.
    header: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to come.
    payload: u64,
    /// Whether the current frame is a data frame (text, binary, continuation).
    data: bool,
    /// Whether the current frame is a close frame.
    close: bool,
    /// Whether a whole close frame went by.
    closed: bool,
}

impl Frames {
    /// Reads `bytes` through, or (with `stop`) as far as the next boundary between frames.
    /// Returns how many bytes were read, and whether any belonged to a data frame.
    fn read(&mut self, bytes: &[u8], stop: bool) -> (usize, bool) {
        let mut at = 0;
        let mut data = false;
        loop {
            if stop && self.at_boundary() {
                break;
            }
            if at == bytes.len() {
                break;
            }
            if self.payload > 0 {
                let n = (bytes.len() - at).min(usize::try_from(self.payload).unwrap_or(usize::MAX));
                at += n;
                self.payload -= n as u64;
                data |= self.data;
                self.frame_read();
                continue;
            }
            self.header[self.have] = bytes[at];
            self.have += 1;
            at += 1;
            if let Some(length) = self.header_length()
                && self.have == length
            {
                let opcode = self.header[0] & 0x0f;
                self.data = opcode < 0x8;
                self.close = opcode == 0x8;
                data |= self.data;
                self.payload = self.payload_length();
                self.have = 0;
                self.frame_read();
            }
        }
        (at, data)
    }

    /// Notes a close frame read to its end.
    fn frame_read(&mut self) {
        if self.payload == 0 && self.have == 0 && self.close {
            self.closed = true;
        }
    }

    fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload == 0
    }

    /// The length of the header being read, once its first two bytes tell.
    fn header_length(&self) -> Option<usize> {
        if self.have < 2 {
            return None;
        }
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        Some(2 + extended + mask)
    }

    fn payload_length(&self) -> u64 {
        match self.header[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => u64::from_be_bytes(self.header[2..10].try_into().expect("8 bytes")),
            n => u64::from(n),
        }
    }
}

/// A close frame with code 1001 and `why` as its reason; `masked` as a client's frames are
/// (RFC 6455 §5.3), for the upstream.
fn close_frame(why: Close, masked: bool) -> Vec<u8> {
    let reason = why.message().as_bytes();
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&GOING_AWAY.to_be_bytes());
    payload.extend_from_slice(reason);
    debug_assert!(payload.len() <= 125, "a control frame's payload");
    let mut frame = vec![0x88];
    if masked {
        frame.push(0x80 | payload.len() as u8);
        let key = mask_key();
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        frame.push(payload.len() as u8);
        frame.extend_from_slice(&payload);
    }
    frame
}

/// A masking key no one can predict (what RFC 6455 §5.3 asks): from the standard library's
/// randomly seeded hasher.
fn mask_key() -> [u8; 4] {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u8(0);
    (hasher.finish() as u32).to_ne_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a server sends it (unmasked), or a client (masked with `key`).
    fn frame(opcode: u8, payload: &[u8], key: Option<[u8; 4]>) -> Vec<u8> {
        let mut frame = vec![0x80 | opcode];
        let mask = if key.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => frame.push(mask | n as u8),
            n if n <= 0xffff => {
                frame.push(mask | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(mask | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if let Some(key) = key {
            frame.extend_from_slice(&key);
        }
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn frame_boundaries_are_found_whatever_the_reads() {
        let big = vec![7u8; 70_000];
        let frames = [
            frame(0x1, b"hello", None),
            frame(0x9, b"", None),
            frame(0x2, &big, None),
            frame(0x2, &[1; 300], Some([1, 2, 3, 4])),
        ];
        let bytes: Vec<u8> = frames.concat();
        let boundaries: Vec<usize> = frames
            .iter()
            .scan(0, |end, f| {
                *end += f.len();
                Some(*end)
            })
            .collect();
        for read in [1, 3, 100, 16 * 1024, bytes.len()] {
            let mut tracker = Frames::default();
            let mut at = 0;
            for chunk in bytes.chunks(read) {
                tracker.read(chunk, false);
                at += chunk.len();
                let between = at == 0 || boundaries.contains(&at);
                assert_eq!(tracker.at_boundary(), between, "{read}-byte reads, at {at}");
            }
        }
    }

    #[test]
    fn a_read_with_stop_ends_at_the_end_of_the_frame_in_progress() {
        let bytes = [frame(0x1, b"hello", None), frame(0x1, b"world", None)].concat();
        let mut tracker = Frames::default();
        tracker.read(&bytes[..3], false);
        let (upto, _) = tracker.read(&bytes[3..], true);
        assert_eq!(3 + upto, 7, "the rest of the first frame only");
        assert!(tracker.at_boundary());
        assert_eq!(
            tracker.read(&bytes[7..], true),
            (0, false),
            "nothing past it"
        );
    }

    #[test]
    fn only_messages_count_as_activity_and_a_close_frame_is_seen() {
        let mut tracker = Frames::default();
        assert!(!tracker.read(&frame(0x9, b"ping", None), false).1);
        assert!(!tracker.read(&frame(0xA, b"pong", None), false).1);
        assert!(tracker.read(&frame(0x1, b"text", None), false).1);
        assert!(!tracker.closed);
        tracker.read(&frame(0x8, &[0x03, 0xE8], Some([9, 9, 9, 9])), false);
        assert!(tracker.closed);
    }

    #[test]
    fn the_close_frames_say_going_away_and_why() {
        let frame = close_frame(Close::ScaledToZero, false);
        let reason = Close::ScaledToZero.message().as_bytes();
        assert_eq!(&frame[..4], &[0x88, 2 + reason.len() as u8, 0x03, 0xE9]);
        assert_eq!(&frame[4..], reason);

        let masked = close_frame(Close::ScaledToZero, true);
        assert_eq!(masked[1], 0x80 | (2 + reason.len() as u8));
        let key = &masked[2..6];
        let payload: Vec<u8> = masked[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        assert_eq!(&payload[..2], &GOING_AWAY.to_be_bytes());
        assert_eq!(&payload[2..], reason);
    }
}
