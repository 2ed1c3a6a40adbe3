//! Keep-alive HTTP/1.1 connections to upstream endpoints, one pool per proxy worker: a request
//! takes an idle connection to its endpoint or opens a new one, and its response body (see
//! [`super::h1`]) puts the connection back once the response has been read to the end. An idle
//! connection is its socket alone. Lock-free: a bounded queue of idle connections per endpoint
//! address, found through a snapshot of the address map.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use http::uri::Authority;
use http::{Request, Response};
use tokio::net::TcpStream;

use super::h1;

/// Why no response came from an upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {authority}: {source}")]
    Connect {
        authority: Authority,
        source: std::io::Error,
    },
    #[error("connecting to {authority} timed out after {}", humantime::format_duration(*.after))]
    ConnectTimeout {
        authority: Authority,
        after: Duration,
    },
    #[error(transparent)]
    Http1(#[from] h1::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// Settings of a [`Pool`].
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Idle connections kept per endpoint; more are closed as their responses end.
    pub max_idle: usize,
    /// An idle connection unused this long is closed (at the latest after twice as long).
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_idle: 256,
            idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// The upstream connections of one worker.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

type ByAddress = HashMap<Box<str>, Arc<Idle>, foldhash::fast::RandomState>;

#[derive(Debug)]
struct Inner {
    settings: Settings,
    /// Replaced whole (copy on write) when an endpoint address is seen first or swept away.
    idle: ArcSwap<ByAddress>,
    sweeping: AtomicBool,
}

/// The idle connections to one address.
#[derive(Debug)]
pub struct Idle {
    queue: ArrayQueue<IdleConnection>,
    /// Sweeps so far: idle connections are stamped with it rather than with the time, which
    /// would take two clock reads per request.
    sweeps: AtomicU64,
}

#[derive(Debug)]
struct IdleConnection {
    stream: TcpStream,
    /// The sweep count when it became idle.
    since: u64,
}

/// A connection a request was sent on. Dropped, it is closed; [released](Pooled::release) once
/// its response has ended, it waits in the pool for the next request.
#[derive(Debug)]
pub struct Pooled {
    stream: TcpStream,
    home: Arc<Idle>,
}

impl Pooled {
    /// Puts the connection back: its response was read to the end and the upstream keeps it
    /// open.
    pub fn release(self) {
        // A full queue drops (closes) the connection.
        let since = self.home.sweeps.load(Ordering::Relaxed);
        let _ = self.home.queue.push(IdleConnection {
            stream: self.stream,
            since,
        });
    }

    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    pub fn into_stream(self) -> TcpStream {
        self.stream
    }
}

/// Whether an idle connection is still open: nothing came on it since its last response (the
/// upstream's close would have). A system call (a `recv` that would block) only when the
/// socket is still marked readable: a response read to the end leaves it marked only when its
/// last read filled the buffer (see `h1::Body::poll_fill`).
fn still_open(stream: &TcpStream) -> bool {
    match stream.poll_read_ready(&mut Context::from_waker(Waker::noop())) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            matches!(stream.try_read(&mut [0; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
    }
}

impl Pool {
    pub fn new(settings: Settings) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                idle: ArcSwap::default(),
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `req` (origin-form, with its `Host`) to `authority` on an idle connection, or on a
    /// new one if none is left or an idle one turns out closed before the request went out.
    pub async fn send<B>(
        &self,
        authority: &Authority,
        req: Request<B>,
    ) -> Result<Response<h1::Body<B>>, UpstreamError>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let home = self.idle(authority);
        let mut stream = None;
        while let Some(idle) = home.queue.pop() {
            if still_open(&idle.stream) {
                stream = Some(idle.stream);
                break;
            }
        }
        let reused = stream.is_some();
        let stream = match stream {
            Some(stream) => stream,
            // Boxed: connecting is rare next to reusing, and its future would otherwise make
            // every request's future larger.
            None => Box::pin(self.connect(authority)).await?,
        };
        let failed = match h1::send(Pooled { stream, home }, req).await {
            Ok(response) => return Ok(response),
            Err(failed) => *failed,
        };
        match failed.again {
            // An idle connection the upstream closed just as the request went out (an
            // upstream's keep-alive timeout shorter than the pool's): once more, on a new one.
            Some(req) if reused => {
                tracing::debug!(upstream = %authority, error = %failed.error, "idle upstream connection closed under a request: sending it again on a new one");
                Box::pin(self.send_on_new(authority, req)).await
            }
            _ => Err(failed.error.into()),
        }
    }

    async fn send_on_new<B>(
        &self,
        authority: &Authority,
        req: Request<B>,
    ) -> Result<Response<h1::Body<B>>, UpstreamError>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = self.connect(authority).await?;
        let home = self.idle(authority);
        h1::send(Pooled { stream, home }, req)
            .await
            .map_err(|failed| failed.error.into())
    }

    fn idle(&self, authority: &Authority) -> Arc<Idle> {
        if let Some(idle) = self.inner.idle.load().get(authority.as_str()) {
            return idle.clone();
        }
        let max_idle = self.inner.settings.max_idle.max(1);
        let mut added = None;
        self.inner.idle.rcu(|map| {
            let mut map = ByAddress::clone(map);
            let idle = map.entry(authority.as_str().into()).or_insert_with(|| {
                Arc::new(Idle {
                    queue: ArrayQueue::new(max_idle),
                    sweeps: AtomicU64::new(0),
                })
            });
            added = Some(idle.clone());
            map
        });
        added.expect("rcu ran at least once")
    }

    async fn connect(&self, authority: &Authority) -> Result<TcpStream, UpstreamError> {
        let stream = connect_tcp(authority, self.inner.settings.connect_timeout).await?;
        self.sweep_in_background();
        Ok(stream)
    }

    /// Once per pool, a task that closes the connections idle since before the previous sweep
    /// and forgets addresses with none left (see [`sweep_in_background`]).
    fn sweep_in_background(&self) {
        let every = self.inner.settings.idle_timeout;
        sweep_in_background(&self.inner.sweeping, &self.inner, every, Inner::sweep);
    }
}

/// Once per pool (`sweeping` says whether it runs already), a task on the current runtime
/// that calls `sweep` on the pool every `every`, until the pool is dropped.
pub(super) fn sweep_in_background<P: Send + Sync + 'static>(
    sweeping: &AtomicBool,
    pool: &Arc<P>,
    every: Duration,
    sweep: fn(&P),
) {
    if sweeping.swap(true, Ordering::Relaxed) {
        return;
    }
    let pool = Arc::downgrade(pool);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            match Weak::upgrade(&pool) {
                Some(pool) => sweep(&pool),
                None => return,
            }
        }
    });
}

/// A TCP connection to `authority` (no delay), within `after`.
pub(super) async fn connect_tcp(
    authority: &Authority,
    after: Duration,
) -> Result<TcpStream, UpstreamError> {
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let connect = TcpStream::connect((host, authority.port_u16().unwrap_or(80)));
    let stream = tokio::time::timeout(after, connect)
        .await
        .map_err(|_| UpstreamError::ConnectTimeout {
            authority: authority.clone(),
            after,
        })?
        .map_err(|source| UpstreamError::Connect {
            authority: authority.clone(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

impl Inner {
    fn sweep(&self) {
        let mut emptied = Vec::new();
        for (authority, idle) in self.idle.load().iter() {
            // Stamped before the previous sweep: idle for at least one idle timeout.
            let previous = idle.sweeps.fetch_add(1, Ordering::Relaxed);
            for _ in 0..idle.queue.len() {
                match idle.queue.pop() {
                    Some(c) if c.since >= previous && still_open(&c.stream) => {
                        let _ = idle.queue.push(c);
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            if idle.queue.is_empty() {
                emptied.push(authority.clone());
            }
        }
        if !emptied.is_empty() {
            self.idle.rcu(|map| {
                let mut map = ByAddress::clone(map);
                // A request may have put a connection back meanwhile: keep those.
                map.retain(|a, idle| !(idle.queue.is_empty() && emptied.contains(a)));
                map
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper_util::rt::TokioIo;

    use super::*;

    /// An upstream that counts the connections it accepts.
    async fn upstream() -> (Authority, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(|_| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (authority, accepted)
    }

    /// One GET, its response's head read.
    async fn get(pool: &Pool, authority: &Authority) -> h1::Body<Empty<Bytes>> {
        let req = Request::get("/")
            .header(http::header::HOST, authority.as_str())
            .body(Empty::new())
            .unwrap();
        pool.send(authority, req).await.unwrap().into_body()
    }

    /// One GET whose response is read to the end, which puts the connection back.
    async fn get_to_the_end(pool: &Pool, authority: &Authority) {
        let body = get(pool, authority)
            .await
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"ok");
    }

    fn idle_count(pool: &Pool, authority: &Authority) -> Option<usize> {
        let idle = pool.inner.idle.load();
        idle.get(authority.as_str()).map(|idle| idle.queue.len())
    }

    #[tokio::test]
    async fn a_released_connection_serves_the_next_request() {
        let (authority, accepted) = upstream().await;
        let pool = Pool::new(Settings::default());
        for _ in 0..3 {
            get_to_the_end(&pool, &authority).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(idle_count(&pool, &authority), Some(1));
    }

    #[tokio::test]
    async fn a_response_dropped_before_its_end_closes_its_connection() {
        let (authority, accepted) = upstream().await;
        let pool = Pool::new(Settings::default());
        drop(get(&pool, &authority).await);
        get_to_the_end(&pool, &authority).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_at_the_second_sweep_then_its_address_forgotten() {
        let (authority, _) = upstream().await;
        let pool = Pool::new(Settings::default());
        get_to_the_end(&pool, &authority).await;
        pool.inner.sweep();
        assert_eq!(
            idle_count(&pool, &authority),
            Some(1),
            "idle less than one sweep"
        );
        pool.inner.sweep();
        assert_eq!(
            idle_count(&pool, &authority),
            None,
            "closed, address forgotten"
        );
    }

    #[tokio::test]
    async fn a_connection_refused_is_an_error_naming_the_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let pool = Pool::new(Settings::default());
        let authority: Authority = addr.to_string().parse().unwrap();
        let error = pool.connect(&authority).await.unwrap_err();
        assert!(error.to_string().contains(&addr.to_string()), "{error}");
    }
}
