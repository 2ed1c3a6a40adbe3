//! The load generator: HTTP/1.1 or HTTP/2 over hyper's client, in cleartext or TLS, either
//! closed loop (every connection sends its next request as soon as the previous one is
//! answered) or open loop (requests fall due at a fixed rate and their latency counts from when
//! they fell due, so a slow server cannot hide its queueing: no coordinated omission). Requests
//! are GETs, or gRPC unary calls over HTTP/2. Latencies go into HDR histograms, one per
//! connection, merged at the end.

use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::tls;

/// Latencies are recorded in microseconds, from 1 µs to this, at 3 significant digits.
const HISTOGRAM_MAX_US: u64 = 120_000_000;

/// A histogram of latencies in microseconds.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).expect("static bounds are valid")
}

/// Records a latency, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, latency: Duration) {
    let us = (latency.as_micros() as u64).clamp(1, HISTOGRAM_MAX_US);
    h.record(us).expect("clamped into range");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// HTTP/2: with prior knowledge over cleartext (h2c), chosen by ALPN over TLS.
    Http2,
}

/// What every request of a plan is.
#[derive(Debug, Clone)]
pub enum Call {
    /// `GET path`; a success is a 2xx or 3xx answer.
    Get,
    /// A gRPC unary call: `POST path` with `content-type: application/grpc`, `te: trailers`
    /// and this body (one length-prefixed message); a success is status 200 with
    /// `grpc-status: 0`, any other gRPC status an error such as `grpc-status 14`. HTTP/2 only.
    GrpcUnary(Bytes),
}

/// The demo backend's unary gRPC method (`wakegate demo-backend`).
pub const ECHO_UNARY: &str = "/wakegate.demo.v1.Echo/Unary";

/// What to send, where, and how hard.
#[derive(Debug, Clone)]
pub struct Plan {
    pub addr: SocketAddr,
    /// `Host` (HTTP/2: `:authority`) values; each connection cycles through them. With TLS,
    /// a connection's first one is its SNI.
    pub hosts: Arc<[String]>,
    /// Path and query of every request.
    pub path: String,
    pub call: Call,
    pub protocol: Protocol,
    /// TLS (rustls, see `tls.rs`): ALPN `h2` or `http/1.1` by protocol, every handshake a
    /// full one, the server's certificate not checked.
    pub tls: bool,
    /// `false`: every request on a new connection of its own (HTTP/1.1 with `Connection:
    /// close`), its latency counted from the connect; with `tls`, a full handshake each.
    pub keep_alive: bool,
    pub connections: usize,
    /// HTTP/2: requests in flight at once on each connection (HTTP/1.1: always 1).
    pub streams: usize,
    pub duration: Duration,
    /// Open loop at this many requests per second; closed loop when `None`.
    pub rate: Option<f64>,
    /// A request unanswered after this long counts as a `timeout` error.
    pub timeout: Duration,
    /// Shown in front of the progress line.
    pub label: String,
}

/// Host names as a plan takes them.
pub fn hosts(names: impl IntoIterator<Item = String>) -> Arc<[String]> {
    names.into_iter().collect::<Vec<_>>().into()
}

impl Plan {
    pub fn new(addr: SocketAddr, host: &str, connections: usize, duration: Duration) -> Self {
        Self {
            addr,
            hosts: Arc::from(vec![host.to_owned()]),
            path: "/".into(),
            call: Call::Get,
            protocol: Protocol::Http1,
            tls: false,
            keep_alive: true,
            connections,
            streams: 1,
            duration,
            rate: None,
            timeout: Duration::from_secs(10),
            label: String::new(),
        }
    }

    /// Makes every request a unary call of the demo backend's `wakegate.demo.v1.Echo` with a
    /// small message, over HTTP/2.
    pub fn grpc_echo(&mut self) {
        use wakegate::demo::grpc::pb::EchoRequest;
        let request = EchoRequest {
            message: "loadtest".into(),
            ..EchoRequest::default()
        };
        self.path = ECHO_UNARY.into();
        self.call = Call::GrpcUnary(grpc_message(&request));
        self.protocol = Protocol::Http2;
    }

    fn depth(&self) -> usize {
        match self.protocol {
            Protocol::Http1 => 1,
            Protocol::Http2 if !self.keep_alive => 1,
            Protocol::Http2 => self.streams.max(1),
        }
    }

    /// The TLS client of a run's connections, when the plan has TLS.
    fn tls_client(&self) -> Option<tls::Client> {
        self.tls.then(|| {
            tls::Client::new(match self.protocol {
                Protocol::Http1 => tls::HTTP1,
                Protocol::Http2 => tls::H2,
            })
        })
    }
}

/// One gRPC message as a request body carries it: not compressed (0), its length as a
/// big-endian u32, the protobuf bytes.
pub fn grpc_message(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut body = Vec::with_capacity(5 + len);
    body.push(0);
    body.extend_from_slice(&u32::try_from(len).expect("a small message").to_be_bytes());
    message
        .encode(&mut body)
        .expect("a Vec grows to hold the message");
    body.into()
}

/// What a run measured.
#[derive(Debug)]
pub struct Outcome {
    /// Responses with a 2xx or 3xx status (gRPC: 200 and `grpc-status: 0`).
    pub ok: u64,
    /// Everything else, by kind: `status 503`, `grpc-status 14`, `timeout`,
    /// `connect: connection refused`, ...
    pub errors: BTreeMap<String, u64>,
    /// From the start to the last response.
    pub elapsed: Duration,
    /// Latency of the successful responses, in microseconds: from sending (closed loop) or
    /// from when the request fell due (open loop) to the end of the response body.
    pub latency: Histogram<u64>,
    /// (seconds since the start, responses per second) once per second.
    pub timeline: Vec<(f64, f64)>,
    /// Open loop: requests that fell due but were not sent before the end of the run.
    pub unsent: u64,
}

impl Outcome {
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The latency at `quantile` (0.5, 0.99, ...) in milliseconds.
    pub fn ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// The error kinds, most frequent first: `status 503 ×12, timeout ×1`.
    pub fn error_summary(&self) -> String {
        summarize(&self.errors)
    }
}

/// `kind ×count` pairs, most frequent first, or `none`.
pub fn summarize(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "none".into();
    }
    let mut kinds: Vec<_> = errors.iter().collect();
    kinds.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    kinds
        .iter()
        .map(|(kind, n)| format!("{kind} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Counters every connection adds to, read by the progress line.
#[derive(Default)]
struct Live {
    done: AtomicU64,
    errors: AtomicU64,
}

/// What one connection measured.
struct Tally {
    ok: u64,
    errors: BTreeMap<String, u64>,
    latency: Histogram<u64>,
    unsent: u64,
}

impl Tally {
    fn new() -> Self {
        Self {
            ok: 0,
            errors: BTreeMap::new(),
            latency: histogram(),
            unsent: 0,
        }
    }

    fn error(&mut self, live: &Live, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
        live.done.fetch_add(1, Ordering::Relaxed);
        live.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs `plan` and returns what it measured; prints a progress line on stderr meanwhile.
pub async fn run(plan: &Plan) -> Outcome {
    let live = Arc::new(Live::default());
    let start = Instant::now();
    let deadline = start + plan.duration;
    let mut dues: Vec<Option<mpsc::UnboundedReceiver<Instant>>> = Vec::new();
    let mut dispatcher = None;
    if let Some(rate) = plan.rate {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..plan.connections)
            .map(|_| mpsc::unbounded_channel())
            .unzip();
        dues = receivers.into_iter().map(Some).collect();
        dispatcher = Some(std::thread::spawn(move || {
            dispatch(senders, rate, start, deadline)
        }));
    } else {
        dues.resize_with(plan.connections, || None);
    }
    let progress = Progress::start(plan.label.clone(), live.clone(), start);
    let tls = plan.tls_client();
    let plan = Arc::new(plan.clone());
    // One single-threaded runtime per core, each with its share of the connections (as wrk's
    // threads): a request's wake-ups between hyper's connection task and the sender stay on
    // one thread, which at least doubles what one client machine can send.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut shares: Vec<Vec<_>> = (0..threads).map(|_| Vec::new()).collect();
    for (id, due) in dues.into_iter().enumerate() {
        shares[id % threads].push((id, due));
    }
    let mut results = Vec::new();
    for share in shares.into_iter().filter(|s| !s.is_empty()) {
        let plan = plan.clone();
        let live = live.clone();
        let tls = tls.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        results.push(rx);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime starts");
            let tallies = runtime.block_on(async {
                let tasks: Vec<_> = share
                    .into_iter()
                    .map(|(id, due)| {
                        let plan = plan.clone();
                        let live = live.clone();
                        let tls = tls.clone();
                        tokio::spawn(async move {
                            connection(&plan, tls, id, due, deadline, &live).await
                        })
                    })
                    .collect();
                let mut tallies = Vec::new();
                for task in tasks {
                    tallies.push(task.await.expect("a connection task does not panic"));
                }
                tallies
            });
            let _ = tx.send(tallies);
        });
    }
    let mut outcome = Outcome {
        ok: 0,
        errors: BTreeMap::new(),
        elapsed: Duration::ZERO,
        latency: histogram(),
        timeline: Vec::new(),
        unsent: 0,
    };
    for result in results {
        for tally in result.await.expect("a load thread does not panic") {
            outcome.ok += tally.ok;
            outcome.unsent += tally.unsent;
            outcome
                .latency
                .add(&tally.latency)
                .expect("histograms with the same bounds");
            for (kind, n) in tally.errors {
                *outcome.errors.entry(kind).or_default() += n;
            }
        }
    }
    outcome.elapsed = start.elapsed();
    if let Some(dispatcher) = dispatcher {
        let _ = dispatcher.join();
    }
    outcome.timeline = progress.finish().await;
    outcome
}

/// Open loop: hands out due times, `rate` per second from `start`, round-robin to the
/// connections, until `deadline`. A thread of its own with a 1 ns timer slack, so a due time is
/// handed out within microseconds rather than at tokio's millisecond timer granularity.
fn dispatch(
    connections: Vec<mpsc::UnboundedSender<Instant>>,
    rate: f64,
    start: Instant,
    deadline: Instant,
) {
    // SAFETY: PR_SET_TIMERSLACK changes only this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    let mut i: u64 = 0;
    loop {
        let due = start + interval.mul_f64(i as f64);
        if due >= deadline {
            return;
        }
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
            continue;
        }
        let n = connections.len() as u64;
        // A connection whose receiver is gone has stopped; the others carry on.
        let _ = connections[(i % n) as usize].send(due);
        i += 1;
    }
}

/// The sending half of one connection.
enum Sender {
    Http1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// How one exchange ended.
enum Ended {
    /// A successful answer: 2xx or 3xx (gRPC: 200 with `grpc-status: 0`).
    Ok,
    /// An answer that is not a success, by kind: `status 503`, `grpc-status 14`.
    Refused(String),
    /// No answer, by kind (`timeout`, `io: connection reset`, ...): the connection's state is
    /// unknown.
    Failed(String),
}

/// One request and its whole response: (latency counted from, how it ended).
type Exchange = Pin<Box<dyn Future<Output = (Instant, Ended)> + Send>>;

/// A connection's TLS: the run's client and the connection's SNI.
type Tls = (tls::Client, rustls::pki_types::ServerName<'static>);

impl Sender {
    async fn connect(
        addr: SocketAddr,
        protocol: Protocol,
        tls: Option<&Tls>,
    ) -> Result<Sender, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {}", io_kind(&e)))?;
        let _ = stream.set_nodelay(true);
        match tls {
            None => Sender::handshake(TokioIo::new(stream), protocol).await,
            Some((client, name)) => {
                let stream = client.connect(name.clone(), stream).await?;
                Sender::handshake(TokioIo::new(stream), protocol).await
            }
        }
    }

    /// HTTP's own handshake on a connected stream; its connection task is spawned.
    async fn handshake<T>(io: T, protocol: Protocol) -> Result<Sender, String>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        match protocol {
            Protocol::Http1 => {
                let (sender, conn) = http1::handshake(io).await.map_err(|e| kind_of(&e))?;
                tokio::spawn(conn);
                Ok(Sender::Http1(sender))
            }
            Protocol::Http2 => {
                let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| kind_of(&e))?;
                tokio::spawn(conn);
                Ok(Sender::H2(sender))
            }
        }
    }

    async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Sender::Http1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Sender::Http1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Sends one request and reads the whole response, or gives up after `timeout`; `grpc`:
    /// the answer is a gRPC call's, judged by its `grpc-status`.
    fn send(
        &mut self,
        req: Request<Full<Bytes>>,
        grpc: bool,
        from: Instant,
        timeout: Duration,
    ) -> Exchange {
        let response = match self {
            Sender::Http1(s) => {
                Box::pin(s.send_request(req)) as Pin<Box<dyn Future<Output = _> + Send>>
            }
            Sender::H2(s) => Box::pin(s.send_request(req)),
        };
        let exchange = async move {
            let response = response.await.map_err(|e| kind_of(&e))?;
            let (head, mut body) = response.into_parts();
            let mut trailers = None;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| kind_of(&e))?;
                if grpc && let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
            Ok(if grpc {
                grpc_ended(head.status, &head.headers, trailers.as_ref())
            } else if head.status.is_success() || head.status.is_redirection() {
                Ended::Ok
            } else {
                Ended::Refused(format!("status {}", head.status.as_u16()))
            })
        };
        Box::pin(async move {
            let ended = tokio::time::timeout(timeout, exchange)
                .await
                .unwrap_or_else(|_| Err("timeout".into()))
                .unwrap_or_else(Ended::Failed);
            (from, ended)
        })
    }
}

/// A gRPC call succeeded when it was answered 200 and ended with `grpc-status: 0`: in the
/// trailers, or in the headers of a trailers-only answer (a call that fails before any
/// message).
fn grpc_ended(status: StatusCode, headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Ended {
    if status != StatusCode::OK {
        return Ended::Refused(format!("status {}", status.as_u16()));
    }
    let code = trailers
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"));
    match code {
        Some(code) if code == "0" => Ended::Ok,
        Some(code) => Ended::Refused(format!(
            "grpc-status {}",
            String::from_utf8_lossy(code.as_bytes())
        )),
        None => Ended::Refused("no grpc-status".into()),
    }
}

/// Builds requests for one connection, cycling through the plan's hosts.
struct Requests {
    /// (Host header, absolute URI for HTTP/2)
    targets: Vec<(HeaderValue, Uri)>,
    path: Uri,
    protocol: Protocol,
    call: Call,
    /// HTTP/1.1 without keep-alive: `Connection: close` on every request.
    close: bool,
    next: usize,
}

impl Requests {
    fn new(plan: &Plan, offset: usize) -> Self {
        let targets = plan
            .hosts
            .iter()
            .map(|host| {
                let value = HeaderValue::from_str(host).expect("a valid Host value");
                let scheme = if plan.tls { "https" } else { "http" };
                let uri = format!("{scheme}://{host}{}", plan.path)
                    .parse()
                    .expect("a valid URI");
                (value, uri)
            })
            .collect::<Vec<_>>();
        Self {
            targets,
            path: plan.path.parse().expect("a valid path"),
            protocol: plan.protocol,
            call: plan.call.clone(),
            close: !plan.keep_alive && plan.protocol == Protocol::Http1,
            next: offset % plan.hosts.len(),
        }
    }

    fn is_grpc(&self) -> bool {
        matches!(self.call, Call::GrpcUnary(_))
    }

    fn next(&mut self) -> Request<Full<Bytes>> {
        let (host, uri) = &self.targets[self.next];
        self.next = (self.next + 1) % self.targets.len();
        let mut req = match &self.call {
            Call::Get => Request::new(Full::new(Bytes::new())),
            Call::GrpcUnary(message) => {
                let mut req = Request::new(Full::new(message.clone()));
                *req.method_mut() = Method::POST;
                let headers = req.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
                headers.insert(header::TE, HeaderValue::from_static("trailers"));
                req
            }
        };
        match self.protocol {
            Protocol::Http1 => {
                *req.uri_mut() = self.path.clone();
                req.headers_mut().insert(header::HOST, host.clone());
                if self.close {
                    req.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
            }
            Protocol::Http2 => *req.uri_mut() = uri.clone(),
        }
        req
    }
}

/// One connection (reconnected after errors, and after every request without keep-alive) with
/// up to the plan's depth of requests in flight.
async fn connection(
    plan: &Plan,
    tls: Option<tls::Client>,
    id: usize,
    mut due: Option<mpsc::UnboundedReceiver<Instant>>,
    deadline: Instant,
    live: &Live,
) -> Tally {
    let open = due.is_some();
    let depth = plan.depth();
    let mut requests = Requests::new(plan, id);
    let mut tally = Tally::new();
    let tls: Option<Tls> = match tls {
        Some(client) => match tls::server_name(&plan.hosts[id % plan.hosts.len()]) {
            Ok(name) => Some((client, name)),
            Err(kind) => {
                tally.error(live, kind);
                return tally;
            }
        },
        None => None,
    };
    // Without keep-alive, a closed loop's latency counts from the connect.
    let mut connecting_since = Instant::now();
    // Open loop: due times not sent yet.
    let mut queue: VecDeque<Instant> = VecDeque::new();
    let mut in_flight: FuturesUnordered<Exchange> = FuturesUnordered::new();
    let mut sender: Option<Sender> = None;
    let deadline_t = tokio::time::Instant::from_std(deadline);
    let mut backoff_until: Option<tokio::time::Instant> = None;
    let end = tokio::time::sleep_until(deadline_t);
    tokio::pin!(end);
    loop {
        let now = Instant::now();
        let running = now < deadline;
        if !running {
            due = None;
            tally.unsent += queue.len() as u64;
            queue.clear();
        }
        let wants = in_flight.len() < depth && running && (!open || !queue.is_empty());
        if !running && in_flight.is_empty() {
            return tally;
        }
        if wants && sender.as_ref().is_none_or(|s| s.is_closed()) {
            // HTTP/1.1 waits for its failed request before reconnecting; HTTP/2's other streams
            // fail with the connection.
            if !in_flight.is_empty() {
                // fall through: wait for them
            } else if let Some(until) = backoff_until.filter(|u| *u > tokio::time::Instant::now()) {
                tokio::select! {
                    () = tokio::time::sleep_until(until) => {}
                    () = tokio::time::sleep_until(deadline_t) => {}
                    Some(at) = recv(&mut due) => queue.push_back(at),
                }
                continue;
            } else {
                connecting_since = Instant::now();
                let connect = Sender::connect(plan.addr, plan.protocol, tls.as_ref());
                let connected = tokio::time::timeout(plan.timeout, connect)
                    .await
                    .unwrap_or_else(|_| Err("connect: timeout".into()));
                match connected {
                    Ok(s) => {
                        sender = Some(s);
                        backoff_until = None;
                    }
                    Err(kind) => {
                        tally.error(live, kind);
                        // A refused connect fails in microseconds; do not spin on it.
                        backoff_until =
                            Some(tokio::time::Instant::now() + Duration::from_millis(10));
                        // Open loop: the request whose send failed is not retried.
                        queue.pop_front();
                    }
                }
                continue;
            }
        }
        let can_send = wants && sender.as_ref().is_some_and(|s| !s.is_closed());
        tokio::select! {
            biased;
            Some((sent_from, ended)) = in_flight.next(), if !in_flight.is_empty() => {
                if !plan.keep_alive {
                    sender = None;
                }
                match ended {
                    Ended::Ok => {
                        tally.ok += 1;
                        record(&mut tally.latency, sent_from.elapsed());
                        live.done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ended::Refused(kind) => tally.error(live, kind),
                    Ended::Failed(kind) => {
                        tally.error(live, kind);
                        // The connection's state is unknown after a failed exchange.
                        if plan.protocol == Protocol::Http1 {
                            sender = None;
                        }
                    }
                }
            }
            ready = ready(&mut sender), if can_send => {
                if ready.is_err() {
                    // Closed between requests (keep-alive ended): reconnect, no error.
                    sender = None;
                    continue;
                }
                let sent_from = if open {
                    queue.pop_front().expect("open loop sends only what is due")
                } else if plan.keep_alive {
                    Instant::now()
                } else {
                    connecting_since
                };
                let grpc = requests.is_grpc();
                let exchange = sender.as_mut().expect("ready").send(
                    requests.next(),
                    grpc,
                    sent_from,
                    plan.timeout,
                );
                in_flight.push(exchange);
            }
            Some(at) = recv(&mut due) => queue.push_back(at),
            () = &mut end, if running => {}
        }
    }
}

async fn ready(sender: &mut Option<Sender>) -> hyper::Result<()> {
    match sender {
        Some(s) => s.ready().await,
        None => std::future::pending().await,
    }
}

async fn recv(due: &mut Option<mpsc::UnboundedReceiver<Instant>>) -> Option<Instant> {
    match due {
        Some(rx) => match rx.recv().await {
            Some(at) => Some(at),
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// A short name for what went wrong with a request.
pub fn kind_of(error: &hyper::Error) -> String {
    if error.is_incomplete_message() {
        return "closed before the response".into();
    }
    if error.is_canceled() {
        return "canceled".into();
    }
    if error.is_timeout() {
        return "timeout".into();
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return format!("io: {}", io_kind(io));
        }
        source = cause.source();
    }
    if error.is_parse() {
        return "malformed response".into();
    }
    format!("http: {error}")
}

/// A stable, short name of an I/O error: its kind, or the OS's text for uncommon ones.
pub fn io_kind(error: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match error.kind() {
        ConnectionRefused => "connection refused".into(),
        ConnectionReset => "connection reset".into(),
        ConnectionAborted => "connection aborted".into(),
        BrokenPipe => "broken pipe".into(),
        TimedOut => "timed out".into(),
        AddrNotAvailable => "address not available".into(),
        UnexpectedEof => "unexpected end of stream".into(),
        _ => match error.raw_os_error() {
            Some(libc::EMFILE) => "too many open files".into(),
            _ => error.to_string(),
        },
    }
}

/// The `\r`-updated line on stderr while a run goes: elapsed, responses, current rate, errors;
/// it also samples the rate once per second for the reports' charts.
struct Progress {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(f64, f64)>>,
}

impl Progress {
    fn start(label: String, live: Arc<Live>, start: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let tty = std::io::stderr().is_terminal();
            let tick = Duration::from_millis(250);
            let mut timeline = Vec::new();
            let mut ticks = tokio::time::interval(tick);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut last_second, mut done_then) = (0u64, 0u64);
            let mut shown = false;
            let mut count = 0u64;
            loop {
                ticks.tick().await;
                count += 1;
                let elapsed = start.elapsed().as_secs_f64();
                let done = live.done.load(Ordering::Relaxed);
                let finished = stopped.load(Ordering::Relaxed);
                let second = elapsed as u64;
                if second > last_second {
                    let rate = (done - done_then) as f64 / (second - last_second) as f64;
                    timeline.push((second as f64, rate));
                    last_second = second;
                    done_then = done;
                }
                // Without a terminal (CI logs), one line per second instead of four.
                if tty || finished || count.is_multiple_of(4) {
                    let current = timeline.last().map_or(0.0, |t| t.1);
                    let line = format!(
                        "{label} {elapsed:6.1}s {done:>10} responses {current:>9.0} req/s {:>7} errors",
                        live.errors.load(Ordering::Relaxed)
                    );
                    if tty {
                        eprint!("\r{line}\x1b[K");
                    } else {
                        eprintln!("{line}");
                    }
                    shown = true;
                }
                if finished {
                    if tty && shown {
                        eprintln!();
                    }
                    return timeline;
                }
            }
        });
        Self { stop, task }
    }

    /// Ends the line and returns the per-second rates.
    async fn finish(self) -> Vec<(f64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// What [`all_at_once`] saw.
pub struct AllAtOnce {
    /// Connections that could not be opened, by error kind.
    pub connect_errors: BTreeMap<String, u64>,
    /// Each answered (or failed) request: time since the release, and its status code or
    /// error kind; in no particular order.
    pub finished: Vec<(Duration, String)>,
    /// `rss_kib()` before the release, with every connection open.
    pub rss_before_kib: u64,
    /// (ms since the release, `rss_kib()` in MiB), every 20 ms until the last answer.
    pub rss: Vec<(f64, f64)>,
}

/// Connections [`all_at_once`] opens at a time while it sets up, below the listen backlog.
pub const CONNECTING: usize = 256;
/// Every request of [`all_at_once`] is answered or given up on within this.
const REQUEST_LIMIT: Duration = Duration::from_secs(60);

/// Opens `requests` HTTP/1.1 connections to `addr` ([`CONNECTING`] at a time), then sends
/// `GET path` with `host` on every one at the same instant, each given up after a minute;
/// samples `rss_kib` (a proxy's memory) meanwhile.
pub async fn all_at_once(
    addr: SocketAddr,
    host: &str,
    path: &str,
    requests: usize,
    rss_kib: impl Fn() -> u64 + Send + Sync + 'static,
) -> AllAtOnce {
    use http_body_util::Empty;
    use tokio::sync::{Semaphore, watch};

    let (release_tx, release_rx) = watch::channel(false);
    let connecting = Arc::new(Semaphore::new(CONNECTING));
    let (opened_tx, mut opened_rx) = mpsc::channel::<Result<(), String>>(requests);
    let mut tasks = tokio::task::JoinSet::new();
    let uri: Uri = path.parse().expect("a valid path");
    let host = HeaderValue::from_str(host).expect("a valid host");
    for _ in 0..requests {
        let connecting = connecting.clone();
        let opened = opened_tx.clone();
        let mut release = release_rx.clone();
        let (uri, host) = (uri.clone(), host.clone());
        tasks.spawn(async move {
            let permit = connecting.acquire_owned().await.expect("never closed");
            let connected = async {
                let stream =
                    tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
                        .await
                        .map_err(|_| "connect: timeout".to_owned())?
                        .map_err(|e| format!("connect: {}", io_kind(&e)))?;
                let _ = stream.set_nodelay(true);
                let (sender, conn) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                    .await
                    .map_err(|e| kind_of(&e))?;
                tokio::spawn(conn);
                Ok::<_, String>(sender)
            }
            .await;
            drop(permit);
            let mut sender = match connected {
                Ok(sender) => {
                    let _ = opened.send(Ok(())).await;
                    sender
                }
                Err(kind) => {
                    let _ = opened.send(Err(kind)).await;
                    return None;
                }
            };
            drop(opened);
            let _ = release.wait_for(|go| *go).await;
            let req = Request::get(uri)
                .header(header::HOST, host)
                .body(Empty::new())
                .expect("a valid request");
            let exchange = async {
                let response = sender.send_request(req).await.map_err(|e| kind_of(&e))?;
                let status = response.status();
                response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| kind_of(&e))?;
                Ok::<_, String>(status.as_u16().to_string())
            };
            let outcome = tokio::time::timeout(REQUEST_LIMIT, exchange)
                .await
                .unwrap_or_else(|_| Err("timeout".into()))
                .unwrap_or_else(|kind| kind);
            Some((outcome, Instant::now()))
        });
    }
    drop(opened_tx);
    let mut connect_errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut opened = 0;
    while let Some(result) = opened_rx.recv().await {
        match result {
            Ok(()) => opened += 1,
            Err(kind) => *connect_errors.entry(kind).or_default() += 1,
        }
    }
    crate::scenario::log(format!(
        "{opened} connections open ({} failed); releasing every request",
        requests - opened
    ));
    let rss_kib = Arc::new(rss_kib);
    let rss_before_kib = rss_kib();

    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let mut samples = Vec::new();
            while sampling.load(Ordering::Relaxed) {
                samples.push((
                    start.elapsed().as_secs_f64() * 1000.0,
                    rss_kib() as f64 / 1024.0,
                ));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            samples
        })
    };
    let released = Instant::now();
    let _ = release_tx.send(true);
    let mut finished = Vec::with_capacity(requests);
    let mut done = 0usize;
    while let Some(joined) = tasks.join_next().await {
        done += 1;
        if done.is_multiple_of(500) || done == requests {
            crate::scenario::progress(format!("{done}/{requests} finished"));
        }
        if let Ok(Some((outcome, at))) = joined {
            finished.push((at.saturating_duration_since(released), outcome));
        }
    }
    crate::scenario::progress_end();
    sampling.store(false, Ordering::Relaxed);
    AllAtOnce {
        connect_errors,
        finished,
        rss_before_kib,
        rss: sampler.await.unwrap_or_default(),
    }
}
