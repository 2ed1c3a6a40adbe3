//! HTTP/2 written and read frame by frame, for tests of what wakegate does with frames a
//! well-behaved client library would never send.

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::within;

/// One HTTP/2 frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A header block of HPACK literals without indexing, as written (no Huffman coding).
pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0x00);
        hpack_string(&mut block, name);
        hpack_string(&mut block, value);
    }
    block
}

/// An HPACK string literal: its length as a 7-bit-prefix integer (RFC 7541 §5.1), then it.
fn hpack_string(block: &mut Vec<u8>, text: &str) {
    let mut len = text.len();
    if len < 127 {
        block.push(len as u8);
    } else {
        block.push(127);
        len -= 127;
        while len >= 128 {
            block.push((len % 128 + 128) as u8);
            len /= 128;
        }
        block.push(len as u8);
    }
    block.extend_from_slice(text.as_bytes());
}

/// The preface, an empty SETTINGS and a GET of `fields` on stream 1.
pub fn h2_request(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    bytes.extend(frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &header_block(fields),
    ));
    bytes
}

/// One frame read: its type, flags, stream and payload.
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// Reads the next frame; `None` once the connection is closed (or reset).
pub async fn read_frame(stream: &mut TcpStream) -> Option<Frame> {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    })
}

/// Reads frames until one of `kinds` comes for stream 1 (or the connection, for GOAWAY);
/// returns its type and payload.
pub async fn h2_first_of(stream: &mut TcpStream, kinds: &[u8]) -> (u8, Vec<u8>) {
    within(5, "an HTTP/2 frame", async {
        loop {
            let frame = read_frame(stream).await.expect("a frame before the close");
            if kinds.contains(&frame.kind) && (frame.stream == 1 || frame.kind == GOAWAY) {
                return (frame.kind, frame.payload);
            }
        }
    })
    .await
}

/// The error code of a RST_STREAM or GOAWAY payload.
pub fn error_code(kind: u8, payload: &[u8]) -> u32 {
    let at = if kind == GOAWAY { 4 } else { 0 };
    u32::from_be_bytes(payload[at..at + 4].try_into().expect("an error code"))
}
