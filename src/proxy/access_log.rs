//! Access logs (`[access_log]`): one structured line per request, written when its response
//! has been sent (or the client went away), by a thread of its own so that a slow disk never
//! holds a request up. Lines that find the writer's queue full are dropped and counted.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::uri::Authority;
use http::{Method, Version};
use http_body::{Body, Frame, SizeHint};
use serde::Serialize;

use super::body::ProxyBody;
use crate::config::{AccessLogConfig, AccessLogFormat};
use crate::target::Target;

/// Lines waiting for the writer at most; beyond, new ones are dropped (and counted).
const QUEUE: usize = 64 * 1024;
/// How long written lines may sit in the writer's buffer while no new line comes.
const FLUSH_AFTER: Duration = Duration::from_millis(200);

/// An open access log: where lines go, and how they are written.
#[derive(Debug)]
pub struct AccessLog {
    lines: SyncSender<Line>,
    pub query: bool,
    dropped: Arc<AtomicU64>,
    writer: std::thread::JoinHandle<()>,
}

impl AccessLog {
    /// Opens the log `config` names (a file is created if needed, and appended to) and starts
    /// its writer; `dropped` counts the lines it had no room for.
    pub fn open(config: &AccessLogConfig, dropped: Arc<AtomicU64>) -> io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = if config.to_stdout() {
            Box::new(io::stdout())
        } else {
            Box::new(open_file(&config.path)?)
        };
        let (lines, queue) = std::sync::mpsc::sync_channel(QUEUE);
        let format = config.format;
        let writer = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(queue, BufWriter::new(out), format))?;
        Ok(AccessLog {
            lines,
            query: config.query,
            dropped,
            writer,
        })
    }

    /// Writes out what is queued and closes the log.
    pub fn close(self) {
        drop(self.lines);
        let _ = self.writer.join();
    }

    fn send(&self, line: Line) {
        match self.lines.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn open_file(path: &std::path::Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Writes lines until every sender is gone (a reload reopened the log, or wakegate stops),
/// flushing whenever the queue is empty for a moment.
fn write_lines(
    queue: Receiver<Line>,
    mut out: BufWriter<Box<dyn Write + Send>>,
    format: AccessLogFormat,
) {
    let mut text = String::with_capacity(512);
    loop {
        let line = match queue.recv_timeout(FLUSH_AFTER) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                let _ = out.flush();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        text.clear();
        line.write(format, &mut text);
        if out.write_all(text.as_bytes()).is_err() {
            // A full disk or a closed pipe: the line is lost, the proxy goes on.
            continue;
        }
    }
    let _ = out.flush();
}

/// Who produced a response's status.
#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum By {
    Upstream,
    #[default]
    Wakegate,
}

/// One request, as its log line tells it.
#[derive(Debug, Serialize)]
struct Line {
    #[serde(serialize_with = "rfc3339")]
    time: SystemTime,
    #[serde(serialize_with = "target_name")]
    target: Option<Arc<Target>>,
    method: Method2,
    path: String,
    protocol: &'static str,
    status: u16,
    /// From the request's arrival to the end of its response, in milliseconds.
    duration_ms: f64,
    upstream: Option<String>,
    /// How long it was held for a cold start, in milliseconds.
    held_ms: Option<f64>,
    bytes_in: u64,
    bytes_out: u64,
    client: IpAddr,
    by: By,
    request_id: Option<String>,
    /// The response body did not end: the client went away, or the upstream broke off.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    incomplete: bool,
}

/// A method as its name.
#[derive(Debug)]
struct Method2(Method);

impl Serialize for Method2 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

fn target_name<S: serde::Serializer>(
    target: &Option<Arc<Target>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match target {
        Some(target) => s.serialize_str(target.name()),
        None => s.serialize_none(),
    }
}

fn rfc3339<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*time))
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Line {
    fn write(&self, format: AccessLogFormat, out: &mut String) {
        match format {
            AccessLogFormat::Json => {
                // Serializing plain fields into a String cannot fail.
                let json = serde_json::to_string(self).unwrap_or_default();
                out.push_str(&json);
            }
            AccessLogFormat::Logfmt => self.logfmt(out),
        }
        out.push('\n');
    }

    fn logfmt(&self, out: &mut String) {
        let _ = write!(out, "time={}", humantime::format_rfc3339_millis(self.time));
        logfmt_value(out, "target", self.target.as_ref().map_or("", |t| t.name()));
        logfmt_value(out, "method", self.method.0.as_str());
        logfmt_value(out, "path", &self.path);
        let _ = write!(
            out,
            " protocol={} status={} duration_ms={}",
            self.protocol, self.status, self.duration_ms
        );
        if let Some(upstream) = &self.upstream {
            logfmt_value(out, "upstream", upstream);
        }
        if let Some(held) = self.held_ms {
            let _ = write!(out, " held_ms={held}");
        }
        let by = match self.by {
            By::Upstream => "upstream",
            By::Wakegate => "wakegate",
        };
        let _ = write!(
            out,
            " bytes_in={} bytes_out={} client={} by={by}",
            self.bytes_in, self.bytes_out, self.client
        );
        if let Some(id) = &self.request_id {
            logfmt_value(out, "request_id", id);
        }
        if self.incomplete {
            out.push_str(" incomplete=true");
        }
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
    pub time: SystemTime,
    pub method: Method,
    pub path: String,
    pub version: Version,
    pub client: IpAddr,
}

impl Arrived {
    pub fn of<B>(req: &http::Request<B>, client: IpAddr, query: bool) -> Self {
        let uri = req.uri();
        let path = match (query, uri.path_and_query()) {
            (true, Some(pq)) => pq.as_str().to_owned(),
            _ => uri.path().to_owned(),
        };
        Arrived {
            time: SystemTime::now(),
            method: req.method().clone(),
            path,
            version: req.version(),
            client,
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
    /// The request body's bytes sent upstream so far.
    pub bytes_in: Arc<AtomicU64>,
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
    started: tokio::time::Instant,
    bytes_in: Arc<AtomicU64>,
}

impl Logged {
    pub fn new(
        body: ProxyBody,
        log: Arc<AccessLog>,
        arrived: Arrived,
        started: tokio::time::Instant,
        status: u16,
        noted: Noted,
    ) -> Self {
        let line = Line {
            time: arrived.time,
            target: noted.target,
            method: Method2(arrived.method),
            path: arrived.path,
            protocol: protocol(arrived.version),
            status,
            duration_ms: 0.0,
            upstream: noted.upstream.map(|a| a.to_string()),
            held_ms: noted.held.map(millis),
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
            started,
            bytes_in: noted.bytes_in,
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(mut line) = self.line.take() {
            line.duration_ms = millis(self.started.elapsed());
            line.bytes_in = self.bytes_in.load(Ordering::Relaxed);
            line.incomplete = !complete;
            self.log.send(line);
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
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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

/// A request body that counts the bytes it passes on, for the access log.
#[derive(Debug)]
pub struct Counted<B> {
    body: B,
    count: Option<Arc<AtomicU64>>,
}

impl<B> Counted<B> {
    pub fn new(body: B, count: Option<Arc<AtomicU64>>) -> Self {
        Counted { body, count }
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
        if let (Some(count), Poll::Ready(Some(Ok(frame)))) = (&this.count, &polled)
            && let Some(data) = frame.data_ref()
        {
            count.fetch_add(data.len() as u64, Ordering::Relaxed);
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
