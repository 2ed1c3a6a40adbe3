//! Keep-alive HTTP/1.1 connections to upstream endpoints, one pool per proxy worker: a request
//! takes an idle connection to its endpoint or opens a new one, and its response body puts the
//! connection back once the response has been read to the end. Lock-free: a bounded queue of
//! idle connections per endpoint address, found through a snapshot of the address map.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

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
    /// An idle connection unused this long is closed.
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
#[derive(Debug, Clone, Default)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    settings: Settings,
    /// Replaced whole (copy on write) when an endpoint address is seen first or swept away.
    idle: ArcSwap<HashMap<Box<str>, Arc<Idle>>>,
    sweeping: AtomicBool,
}

#[derive(Debug)]
struct Idle(ArrayQueue<IdleConnection>);

#[derive(Debug)]
struct IdleConnection {
    sender: SendRequest<Incoming>,
    since: Instant,
}

/// A connection a request was sent on. Dropped, it is closed; [released](Pooled::release) once
/// its response has ended, it waits in the pool for the next request.
#[derive(Debug)]
pub struct Pooled {
    sender: SendRequest<Incoming>,
    home: Arc<Idle>,
}

impl Pooled {
    /// Puts the connection back, if it can take another request now (its response was read to
    /// the end and the upstream did not close it).
    pub fn release(self) {
        if self.sender.is_ready() {
            // A full queue drops (closes) the connection.
            let _ = self.home.0.push(IdleConnection {
                sender: self.sender,
                since: Instant::now(),
            });
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
    pub async fn send(
        &self,
        authority: &Authority,
        mut req: Request<Incoming>,
    ) -> Result<(Response<Incoming>, Pooled), UpstreamError> {
        let home = self.idle(authority);
        let timeout = self.inner.settings.idle_timeout;
        while let Some(IdleConnection { mut sender, since }) = home.0.pop() {
            if !sender.is_ready() || since.elapsed() >= timeout {
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
        let mut sender = self.connect(authority).await?;
        let response = sender.send_request(req).await?;
        Ok((response, Pooled { sender, home }))
    }

    fn idle(&self, authority: &Authority) -> Arc<Idle> {
        if let Some(idle) = self.inner.idle.load().get(authority.as_str()) {
            return idle.clone();
        }
        let max_idle = self.inner.settings.max_idle.max(1);
        let mut added = None;
        self.inner.idle.rcu(|map| {
            let mut map = HashMap::clone(map);
            let idle = map
                .entry(authority.as_str().into())
                .or_insert_with(|| Arc::new(Idle(ArrayQueue::new(max_idle))));
            added = Some(idle.clone());
            map
        });
        added.expect("rcu ran at least once")
    }

    async fn connect(&self, authority: &Authority) -> Result<SendRequest<Incoming>, UpstreamError> {
        let after = self.inner.settings.connect_timeout;
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
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        let target = authority.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(upstream = %target, %error, "upstream connection ended with an error");
            }
        });
        self.sweep_in_background();
        Ok(sender)
    }

    /// Once per pool, a task on the current runtime that closes connections idle for longer
    /// than the idle timeout and forgets addresses with none left, until the pool is dropped.
    fn sweep_in_background(&self) {
        if self.inner.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(&self.inner);
        let every = self.inner.settings.idle_timeout / 2;
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                match Weak::upgrade(&pool) {
                    Some(pool) => pool.sweep(),
                    None => return,
                }
            }
        });
    }
}

impl Inner {
    fn sweep(&self) {
        let timeout = self.settings.idle_timeout;
        let mut emptied = Vec::new();
        for (authority, idle) in self.idle.load().iter() {
            for _ in 0..idle.0.len() {
                match idle.0.pop() {
                    Some(c) if c.sender.is_ready() && c.since.elapsed() < timeout => {
                        let _ = idle.0.push(c);
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            if idle.0.is_empty() {
                emptied.push(authority.clone());
            }
        }
        if !emptied.is_empty() {
            self.idle.rcu(|map| {
                let mut map = HashMap::clone(map);
                // A request may have put a connection back meanwhile: keep those.
                map.retain(|a, idle| !(idle.0.is_empty() && emptied.contains(a)));
                map
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
