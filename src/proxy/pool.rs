//! Keep-alive HTTP/1.1 connections to upstream endpoints, one pool per proxy worker: a request
//! takes an idle connection to its endpoint or opens a new one, and its response body puts the
//! connection back once the response has been read to the end. Lock-free: a bounded queue of
//! idle connections per endpoint address, found through a snapshot of the address map.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::{Body, Incoming};

use super::RequestBody;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

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

/// The upstream connections of one worker, for requests with bodies of type `B`.
#[derive(Debug)]
pub struct Pool<B = RequestBody> {
    inner: Arc<Inner<B>>,
}

impl<B> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

type ByAddress<B> = HashMap<Box<str>, Arc<Idle<B>>, foldhash::fast::RandomState>;

#[derive(Debug)]
struct Inner<B> {
    settings: Settings,
    /// Replaced whole (copy on write) when an endpoint address is seen first or swept away.
    idle: ArcSwap<ByAddress<B>>,
    sweeping: AtomicBool,
}

/// The idle connections to one address.
#[derive(Debug)]
struct Idle<B> {
    queue: ArrayQueue<IdleConnection<B>>,
    /// Sweeps so far: idle connections are stamped with it rather than with the time, which
    /// would take two clock reads per request.
    sweeps: AtomicU64,
}

#[derive(Debug)]
struct IdleConnection<B> {
    sender: SendRequest<B>,
    /// The sweep count when it became idle.
    since: u64,
}

/// A connection a request was sent on. Dropped, it is closed; [released](Pooled::release) once
/// its response has ended, it waits in the pool for the next request.
#[derive(Debug)]
pub struct Pooled<B = RequestBody> {
    sender: SendRequest<B>,
    home: Arc<Idle<B>>,
}

impl<B> Pooled<B> {
    /// Puts the connection back, if it can take another request now (its response was read to
    /// the end and the upstream did not close it).
    pub fn release(self) {
        if self.sender.is_ready() {
            // A full queue drops (closes) the connection.
            let since = self.home.sweeps.load(Ordering::Relaxed);
            let _ = self.home.queue.push(IdleConnection {
                sender: self.sender,
                since,
            });
        }
    }
}

impl<B> Pool<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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
    pub async fn send(
        &self,
        authority: &Authority,
        mut req: Request<B>,
    ) -> Result<(Response<Incoming>, Pooled<B>), UpstreamError> {
        let home = self.idle(authority);
        while let Some(IdleConnection { mut sender, .. }) = home.queue.pop() {
            if !sender.is_ready() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(response) => return Ok((response, Pooled { sender, home })),
                Err(mut error) => match error.take_message() {
                    // Not sent: the upstream closed the connection meanwhile; try another.
                    Some(unsent) => req = unsent,
                    None => return Err(error.into_error().into()),
                },
            }
        }
        // Boxed: connecting is rare next to reusing, and its future would otherwise make
        // every request's future larger.
        let mut sender = Box::pin(self.connect(authority)).await?;
        let response = sender.send_request(req).await?;
        Ok((response, Pooled { sender, home }))
    }

    fn idle(&self, authority: &Authority) -> Arc<Idle<B>> {
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

    async fn connect(&self, authority: &Authority) -> Result<SendRequest<B>, UpstreamError> {
        let stream = connect_tcp(authority, self.inner.settings.connect_timeout).await?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let target = authority.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(upstream = %target, %error, "upstream connection ended with an error");
            }
        });
        self.sweep_in_background();
        Ok(sender)
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

impl<B> Inner<B> {
    fn sweep(&self) {
        let mut emptied = Vec::new();
        for (authority, idle) in self.idle.load().iter() {
            // Stamped before the previous sweep: idle for at least one idle timeout.
            let previous = idle.sweeps.fetch_add(1, Ordering::Relaxed);
            for _ in 0..idle.queue.len() {
                match idle.queue.pop() {
                    Some(c) if c.sender.is_ready() && c.since >= previous => {
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

    /// One GET whose response is read to the end; the connection is returned with it.
    async fn get(pool: &Pool<Empty<Bytes>>, authority: &Authority) -> Pooled<Empty<Bytes>> {
        let req = Request::get("/")
            .header(http::header::HOST, authority.as_str())
            .body(Empty::new())
            .unwrap();
        let (response, connection) = pool.send(authority, req).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        connection
    }

    fn idle_count(pool: &Pool<Empty<Bytes>>, authority: &Authority) -> Option<usize> {
        let idle = pool.inner.idle.load();
        idle.get(authority.as_str()).map(|idle| idle.queue.len())
    }

    #[tokio::test]
    async fn a_released_connection_serves_the_next_request() {
        let (authority, accepted) = upstream().await;
        let pool = Pool::new(Settings::default());
        for _ in 0..3 {
            get(&pool, &authority).await.release();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(idle_count(&pool, &authority), Some(1));
    }

    #[tokio::test]
    async fn a_connection_dropped_instead_of_released_is_not_reused() {
        let (authority, accepted) = upstream().await;
        let pool = Pool::new(Settings::default());
        drop(get(&pool, &authority).await);
        get(&pool, &authority).await.release();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_at_the_second_sweep_then_its_address_forgotten() {
        let (authority, _) = upstream().await;
        let pool = Pool::new(Settings::default());
        get(&pool, &authority).await.release();
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
        let pool = Pool::<Empty<Bytes>>::new(Settings::default());
        let authority: Authority = addr.to_string().parse().unwrap();
        let error = pool.connect(&authority).await.unwrap_err();
        assert!(error.to_string().contains(&addr.to_string()), "{error}");
    }
}
