//! Access logs (`[access_log]`): one structured line per request, written when its response
//! has been sent (or the client went away).
//!
//! The worker that served a request writes its line into a buffer of its own (one uncontended
//! lock, no allocation); a thread of the log's own takes the buffers every [`WRITE_EVERY`] and
//! writes them out, so a slow disk never holds a request up and no request wakes a thread.
//! Lines that find their buffer full (the disk has fallen that far behind) are dropped and
//! counted.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderValue, Method, Uri, Version};
use http_body::{Body, Frame, SizeHint};

use super::body::ProxyBody;
use crate::config::{AccessLogConfig, AccessLogFormat};
use crate::target::Target;
use crate::target::streams::Stream;

/// How often the writer takes the buffered lines, writes and flushes them.
const WRITE_EVERY: Duration = Duration::from_millis(50);
/// Buffers, each used by the threads whose number falls on it (one per worker, usually).
const SHARDS: usize = 8;
/// Bytes one buffer holds at most; a line that finds it full is dropped.
const SHARD_BYTES: usize = 4 << 20;

/// An open access log: where lines go, and how they are written.
#[derive(Debug)]
pub struct AccessLog {
    shared: Arc<Buffers>,
    pub query: bool,
    format: AccessLogFormat,
    dropped: Arc<AtomicU64>,
    writer: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct Buffers {
    shards: [Mutex<String>; SHARDS],
    /// Set when the log is closed or replaced: the writer writes what is left and ends.
    closed: AtomicBool,
}

impl AccessLog {
    /// Opens the log `config` names (a file is created if needed, and appended to) and starts
    /// its writer; `dropped` counts the lines it had no room for.
    pub fn open(config: &AccessLogConfig, dropped: Arc<AtomicU64>) -> io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = if config.to_stdout() {
            Box::new(io::stdout())
        } else {
            Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&config.path)?,
            )
        };
        let shared = Arc::new(Buffers {
            shards: std::array::from_fn(|_| Mutex::new(String::new())),
            closed: AtomicBool::new(false),
        });
        let buffers = shared.clone();
        let writer = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_out(&buffers, out))?;
        Ok(AccessLog {
            shared,
            query: config.query,
            format: config.format,
            dropped,
            writer: Some(writer),
        })
    }

    /// Writes out what is buffered and closes the log.
    pub fn close(mut self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }

    fn write(&self, line: &Line) {
        let mut buffer = lock(&self.shared.shards[shard()]);
        if buffer.len() >= SHARD_BYTES {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        line.write(self.format, &mut buffer);
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // A replaced log's writer writes out the last lines, then ends.
        self.shared.closed.store(true, Ordering::Relaxed);
    }
}

fn lock(buffer: &Mutex<String>) -> std::sync::MutexGuard<'_, String> {
    buffer.lock().unwrap_or_else(PoisonError::into_inner)
}

/// This thread's buffer.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|shard| *shard)
}

/// Every [`WRITE_EVERY`], takes each buffer's lines and writes them, until the log is closed
/// (and then once more).
fn write_out(buffers: &Buffers, mut out: Box<dyn Write + Send>) {
    let mut taken = String::new();
    loop {
        let last = buffers.closed.load(Ordering::Relaxed);
        for shard in &buffers.shards {
            std::mem::swap(&mut *lock(shard), &mut taken);
            if !taken.is_empty() {
                // A full disk or a closed pipe loses the lines; the proxy goes on.
                let _ = out.write_all(taken.as_bytes());
                taken.clear();
            }
        }
        let _ = out.flush();
        if last {
            return;
        }
        std::thread::sleep(WRITE_EVERY);
    }
}

/// Who produced a response's status.
#[derive(Debug, Clone, Copy, Default)]
pub enum By {
    Upstream,
    #[default]
    Wakegate,
}

impl By {
    fn as_str(self) -> &'static str {
        match self {
            By::Upstream => "upstream",
            By::Wakegate => "wakegate",
        }
    }
}

/// One request, as its log line tells it.
#[derive(Debug)]
struct Line {
    time: SystemTime,
    target: Option<Arc<Target>>,
    method: Method,
    uri: Uri,
    query: bool,
    version: Version,
    status: u16,
    /// From the request's arrival to the end of its response.
    duration: Duration,
    upstream: Option<Authority>,
    /// How long it was held for a cold start.
    held: Option<Duration>,
    bytes_in: u64,
    bytes_out: u64,
    /// The client's IP address, as formatted once for its connection.
    client: HeaderValue,
    by: By,
    request_id: Option<String>,
    /// The response body did not end: the client went away, or the upstream broke off.
    incomplete: bool,
}

impl Line {
    fn client(&self) -> &str {
        self.client.to_str().unwrap_or_default()
    }

    fn path(&self) -> &str {
        match (self.query, self.uri.path_and_query()) {
            (true, Some(pq)) => pq.as_str(),
            _ => self.uri.path(),
        }
    }

    fn write(&self, format: AccessLogFormat, out: &mut String) {
        match format {
            AccessLogFormat::Json => self.json(out),
            AccessLogFormat::Logfmt => self.logfmt(out),
        }
        out.push('\n');
    }

    fn json(&self, out: &mut String) {
        out.push_str("{\"time\":\"");
        write_time(out, self.time);
        out.push_str("\",\"target\":");
        json_str_or_null(out, self.target.as_ref().map(|t| t.name()));
        out.push_str(",\"method\":");
        json_str(out, self.method.as_str());
        out.push_str(",\"path\":");
        json_str(out, self.path());
        out.push_str(",\"protocol\":\"");
        out.push_str(protocol(self.version));
        out.push_str("\",\"status\":");
        write_int(out, self.status);
        out.push_str(",\"duration_ms\":");
        write_millis(out, self.duration);
        out.push_str(",\"upstream\":");
        json_str_or_null(out, self.upstream.as_ref().map(Authority::as_str));
        out.push_str(",\"held_ms\":");
        match self.held {
            Some(held) => write_millis(out, held),
            None => out.push_str("null"),
        }
        out.push_str(",\"bytes_in\":");
        write_int(out, self.bytes_in);
        out.push_str(",\"bytes_out\":");
        write_int(out, self.bytes_out);
        // An IP address needs no escaping.
        out.push_str(",\"client\":\"");
        out.push_str(self.client());
        out.push_str("\",\"by\":\"");
        out.push_str(self.by.as_str());
        out.push_str("\",\"request_id\":");
        json_str_or_null(out, self.request_id.as_deref());
        if self.incomplete {
            out.push_str(",\"incomplete\":true");
        }
        out.push('}');
    }

    fn logfmt(&self, out: &mut String) {
        out.push_str("time=");
        write_time(out, self.time);
        logfmt_value(out, "target", self.target.as_ref().map_or("", |t| t.name()));
        logfmt_value(out, "method", self.method.as_str());
        logfmt_value(out, "path", self.path());
        let _ = write!(
            out,
            " protocol={} status={} duration_ms=",
            protocol(self.version),
            self.status
        );
        write_millis(out, self.duration);
        if let Some(upstream) = &self.upstream {
            logfmt_value(out, "upstream", upstream.as_str());
        }
        if let Some(held) = self.held {
            out.push_str(" held_ms=");
            write_millis(out, held);
        }
        let _ = write!(
            out,
            " bytes_in={} bytes_out={} client={} by={}",
            self.bytes_in,
            self.bytes_out,
            self.client(),
            self.by.as_str()
        );
        if let Some(id) = &self.request_id {
            logfmt_value(out, "request_id", id);
        }
        if self.incomplete {
            out.push_str(" incomplete=true");
        }
    }
}

/// `time` as RFC 3339 in UTC with milliseconds; the part up to the second is formatted once
/// per second and thread.
fn write_time(out: &mut String, time: SystemTime) {
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != since.as_secs() {
            let whole = UNIX_EPOCH + Duration::from_secs(since.as_secs());
            cached.0 = since.as_secs();
            cached.1 = humantime::format_rfc3339_seconds(whole).to_string();
            cached.1.pop(); // its `Z`
        }
        out.push_str(&cached.1);
    });
    out.push('.');
    write_thousandths(out, since.subsec_millis());
    out.push('Z');
}

/// Milliseconds with three decimals (microseconds), as a JSON or logfmt number.
fn write_millis(out: &mut String, d: Duration) {
    let micros = d.as_micros();
    write_int(out, micros / 1000);
    out.push('.');
    write_thousandths(out, (micros % 1000) as u32);
}

/// `n` (below 1,000) as three digits.
fn write_thousandths(out: &mut String, n: u32) {
    let digits = [
        b'0' + (n / 100 % 10) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ];
    out.push_str(std::str::from_utf8(&digits).expect("ASCII digits"));
}

/// An integer in decimal, without the formatting machinery.
fn write_int(out: &mut String, n: impl itoa::Integer) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// The wall-clock time of `at`: read from the system clock once a second per thread, and
/// from the monotonic clock in between.
fn wall_time(at: Instant) -> SystemTime {
    thread_local! {
        static ANCHOR: RefCell<Option<(Instant, SystemTime)>> = const { RefCell::new(None) };
    }
    ANCHOR.with(|anchor| {
        let mut anchor = anchor.borrow_mut();
        // Within a second either side: a line written after a later one (a longer request)
        // does not read the system clock again.
        let fresh = |(mono, _): &(Instant, SystemTime)| {
            let apart = at
                .checked_duration_since(*mono)
                .unwrap_or_else(|| mono.duration_since(at));
            apart < Duration::from_secs(1)
        };
        let (mono, wall) = match *anchor {
            Some(a) if fresh(&a) => a,
            _ => *anchor.insert((Instant::now(), SystemTime::now())),
        };
        match at.checked_duration_since(mono) {
            Some(after) => wall + after,
            None => wall - mono.duration_since(at),
        }
    })
}

/// A JSON string: quoted, with `"`, `\` and control characters escaped.
fn json_str(out: &mut String, value: &str) {
    out.push('"');
    if value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push_str(value);
    } else {
        for c in value.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c => out.push(c),
            }
        }
    }
    out.push('"');
}

fn json_str_or_null(out: &mut String, value: Option<&str>) {
    match value {
        Some(value) => json_str(out, value),
        None => out.push_str("null"),
    }
}

/// ` key=value`, the value quoted (with `"` and `\` escaped, control characters as `\u{..}`)
/// when it is empty or holds a space, `=`, `"` or anything but printable ASCII.
fn logfmt_value(out: &mut String, key: &str, value: &str) {
    let plain = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'=' && b != b'\\');
    if plain {
        let _ = write!(out, " {key}={value}");
    } else {
        let _ = write!(out, " {key}={value:?}");
    }
}

/// What is known of a request when it arrives.
#[derive(Debug)]
pub struct Arrived {
    at: Instant,
    method: Method,
    /// Shares the request's own bytes: no copy.
    uri: Uri,
    version: Version,
    client: HeaderValue,
}

impl Arrived {
    /// `client`: the client's IP address as formatted for its connection.
    pub fn of<B>(req: &http::Request<B>, client: &HeaderValue) -> Self {
        Arrived {
            at: Instant::now(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            client: client.clone(),
        }
    }
}

/// What the proxy notes of a request for its log line while it handles it.
#[derive(Debug, Default)]
pub struct Noted {
    pub target: Option<Arc<Target>>,
    /// The endpoint it was sent to.
    pub upstream: Option<Authority>,
    /// How long it was held for a cold start.
    pub held: Option<Duration>,
    /// The request body's bytes sent upstream so far, when it has a body.
    pub bytes_in: Option<Arc<AtomicU64>>,
    /// The id of an answer of wakegate's own.
    pub request_id: Option<String>,
    pub by: By,
}

/// The response body of a logged request: counts the bytes sent and writes the line when the
/// body ends or is dropped.
#[derive(Debug)]
pub struct Logged {
    body: ProxyBody,
    log: Arc<AccessLog>,
    line: Option<Line>,
    arrived: Instant,
    bytes_in: Option<Arc<AtomicU64>>,
}

impl Logged {
    pub fn new(
        body: ProxyBody,
        log: Arc<AccessLog>,
        arrived: Arrived,
        status: u16,
        noted: Noted,
    ) -> Self {
        let line = Line {
            // Known once the line is written.
            time: UNIX_EPOCH,
            target: noted.target,
            method: arrived.method,
            uri: arrived.uri,
            query: log.query,
            version: arrived.version,
            status,
            duration: Duration::ZERO,
            upstream: noted.upstream,
            held: noted.held,
            bytes_in: 0,
            bytes_out: 0,
            client: arrived.client,
            by: noted.by,
            request_id: noted.request_id,
            incomplete: true,
        };
        Logged {
            body,
            log,
            line: Some(line),
            arrived: arrived.at,
            bytes_in: noted.bytes_in,
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(mut line) = self.line.take() {
            line.time = wall_time(self.arrived);
            line.duration = self.arrived.elapsed();
            line.bytes_in = self
                .bytes_in
                .as_ref()
                .map_or(0, |n| n.load(Ordering::Relaxed));
            line.incomplete = !complete;
            self.log.write(&line);
        }
    }
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP",
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl Body for Logged {
    type Data = Bytes;
    type Error = super::body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(line)) = (frame.data_ref(), this.line.as_mut()) {
                    line.bytes_out += data.len() as u64;
                }
                if this.body.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that counts the bytes it passes on, for the access log, and marks its
/// request's stream active with each frame (see [`crate::target::streams`]).
#[derive(Debug)]
pub struct Counted<B> {
    body: B,
    count: Option<Arc<AtomicU64>>,
    activity: Option<Arc<Stream>>,
}

impl<B> Counted<B> {
    pub fn new(body: B, count: Option<Arc<AtomicU64>>, activity: Option<Arc<Stream>>) -> Self {
        Counted {
            body,
            count,
            activity,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(activity) = &this.activity {
                activity.active();
            }
            if let (Some(count), Some(data)) = (&this.count, frame.data_ref()) {
                count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(uri: &str) -> Line {
        Line {
            // 2026-11-30T03:43:21.629Z
            time: UNIX_EPOCH + Duration::from_millis(1_796_010_201_629),
            target: None,
            method: Method::POST,
            uri: uri.parse().unwrap(),
            query: false,
            version: Version::HTTP_2,
            status: 502,
            duration: Duration::from_micros(1_430),
            upstream: Some("127.0.0.1:8081".parse().unwrap()),
            held: Some(Duration::from_micros(250_004)),
            bytes_in: 10,
            bytes_out: 61,
            client: HeaderValue::from_static("::1"),
            by: By::Wakegate,
            request_id: Some("abc".into()),
            incomplete: true,
        }
    }

    #[test]
    fn a_json_line_is_one_object_with_every_field() {
        let mut text = String::new();
        line("/a%22b?token=x").write(AccessLogFormat::Json, &mut text);
        assert!(
            text.ends_with("}\n") && text.matches('\n').count() == 1,
            "{text}"
        );
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "time": "2026-11-30T03:43:21.629Z",
                "target": null,
                "method": "POST",
                "path": "/a%22b",
                "protocol": "HTTP/2",
                "status": 502,
                "duration_ms": 1.43,
                "upstream": "127.0.0.1:8081",
                "held_ms": 250.004,
                "bytes_in": 10,
                "bytes_out": 61,
                "client": "::1",
                "by": "wakegate",
                "request_id": "abc",
                "incomplete": true,
            })
        );
    }

    #[test]
    fn a_line_s_time_is_the_wall_clock_of_its_arrival() {
        let now = Instant::now();
        let off = |a: SystemTime, b: SystemTime| {
            a.duration_since(b)
                .unwrap_or_else(|e| e.duration())
                .as_secs_f64()
        };
        assert!(off(wall_time(now), SystemTime::now()) < 0.05);
        // Either side of the anchor, and past the second it is kept for.
        for (a, b) in [(0, 900), (900, 0), (0, 3_000), (3_000, 10)] {
            let at = |ms| now + Duration::from_millis(ms);
            let apart = off(wall_time(at(a)), wall_time(at(b)));
            let expected = a.abs_diff(b) as f64 / 1000.0;
            assert!((apart - expected).abs() < 0.05, "{a} {b}: {apart}");
        }
        let mut text = String::new();
        write_millis(&mut text, Duration::from_micros(12_003_045));
        write_thousandths(&mut text, 7);
        assert_eq!(text, "12003.045007");
    }

    #[test]
    fn strings_are_escaped_in_json_and_quoted_in_logfmt() {
        let mut text = String::new();
        json_str(&mut text, "a\"b\\c\u{1}d é");
        assert_eq!(text, r#""a\"b\\c\u0001d é""#);
        let parsed: String = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, "a\"b\\c\u{1}d é");

        let mut text = String::new();
        logfmt_value(&mut text, "path", "/plain");
        logfmt_value(&mut text, "path", "/a b=c");
        logfmt_value(&mut text, "target", "");
        assert_eq!(text, r#" path=/plain path="/a b=c" target="""#);
    }

    #[test]
    fn a_logfmt_line_has_the_query_when_asked_for() {
        let mut line = line("/search?q=1");
        line.query = true;
        let mut text = String::new();
        line.write(AccessLogFormat::Logfmt, &mut text);
        assert_eq!(
            text,
            "time=2026-11-30T03:43:21.629Z target=\"\" method=POST path=\"/search?q=1\" \
             protocol=HTTP/2 status=502 duration_ms=1.430 upstream=127.0.0.1:8081 \
             held_ms=250.004 bytes_in=10 bytes_out=61 client=::1 by=wakegate request_id=abc \
             incomplete=true\n"
        );
    }
}
