//! The HTTP edge: raw bytes from a client, as one connection into wakegate's proxy service
//! (HTTP/2 when they begin with the preface, HTTP/1.1 otherwise), routed to targets whose
//! upstream is wakegate's demo backend in this process: HTTP/1.1 and h2c upstreams, a cold
//! target (hold, wake page, cold-start timeout) and a rate-limited one. Whatever the bytes, the
//! proxy must answer or close without panicking, and every response it writes must parse.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wakegate::config::route::{HostPattern, Route};
use wakegate::config::{Backend, Fixed, Protocol, RateLimit, Scaling, Serving, TargetConfig};
use wakegate::proxy::route::RouteTable;
use wakegate::proxy::server::{H2_PREFACE, serve_io};
use wakegate::proxy::{Proxy, Shared, Snapshot};
use wakegate::target::{Endpoint, Phase, Target};

struct Edge {
    runtime: tokio::runtime::Runtime,
    proxy: Proxy,
    _drain_timeout: tokio::sync::watch::Sender<Duration>,
}

fn target(name: &str, upstream: SocketAddr, serving: Serving) -> Arc<Target> {
    Target::new(TargetConfig {
        name: name.to_owned(),
        namespace: "fuzz".to_owned(),
        route: Route {
            hosts: Vec::new(),
            path_prefixes: Vec::new(),
        },
        serving,
        scaling: Scaling::default(),
        backend: Backend::Fixed(Fixed {
            upstream: upstream.to_string().parse().unwrap(),
            check: None,
        }),
    })
}

fn edge() -> &'static Edge {
    static EDGE: OnceLock<Edge> = OnceLock::new();
    EDGE.get_or_init(|| {
        // As wakegate's own main does (Rust's runtime does it before `main`; libFuzzer's main is
        // C): a write to a connection the upstream closed must be an error, not a signal.
        // SAFETY: setting a signal's disposition to ignore, before any thread of ours runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let upstream = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        // The demo backend, driven by this runtime whenever an input is.
        runtime.spawn(wakegate::demo::run(
            upstream,
            Duration::ZERO,
            std::future::pending(),
        ));
        let serving = Serving {
            response_timeout: Some(Duration::from_millis(200)),
            cold_start_timeout: Duration::from_millis(5),
            ..Serving::default()
        };
        let http1 = target("http1", upstream, serving.clone());
        let h2c = target(
            "h2c",
            upstream,
            Serving {
                protocol: Protocol::H2c,
                ..serving.clone()
            },
        );
        let limited = target(
            "limited",
            upstream,
            Serving {
                rate_limit: Some(RateLimit {
                    per_second: 1000.0,
                    burst: 5,
                }),
                // Requests beyond two at once wait for a slot.
                instance_concurrency: 2,
                ..serving.clone()
            },
        );
        // Never published ready: requests are held until the cold-start timeout.
        let cold = target(
            "cold",
            upstream,
            Serving {
                wake_page: true,
                ..serving
            },
        );
        let ready = |t: &Arc<Target>| {
            let endpoint = Endpoint::new(upstream.to_string().parse().unwrap());
            t.publish(vec![endpoint], Phase::Ready);
        };
        ready(&http1);
        ready(&h2c);
        ready(&limited);
        let mut routes = RouteTable::default();
        for (host, prefix, t) in [
            ("http1.test", "/", &http1),
            ("*.wild.test", "/", &http1),
            ("h2c.test", "/", &h2c),
            ("http1.test", "/grpc", &h2c),
            ("limited.test", "/", &limited),
            ("cold.test", "/", &cold),
        ] {
            routes.insert(&HostPattern::parse(host).unwrap(), prefix, t.clone());
        }
        let snapshot = Snapshot {
            routes,
            targets: vec![http1, h2c, limited, cold],
        };
        let (drain_sender, drain_timeout) = tokio::sync::watch::channel(Duration::from_secs(1));
        let shared = Arc::new(Shared::new(
            Arc::new(ArcSwap::from_pointee(snapshot)),
            drain_timeout,
            None,
            tokio::sync::watch::channel(wakegate::config::Limits::default()).1,
        ));
        let proxy = runtime.block_on(async {
            // Until the demo backend listens.
            while tokio::net::TcpStream::connect(upstream).await.is_err() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Proxy::for_worker(shared)
        });
        Edge {
            runtime,
            proxy,
            _drain_timeout: drain_sender,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let edge = edge();
    let http2 = data.starts_with(H2_PREFACE);
    let peer: SocketAddr = "192.0.2.7:40000".parse().unwrap();
    edge.runtime.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let served = serve_io(server, &edge.proxy, peer, http2);
        let (mut from_proxy, mut to_proxy) = tokio::io::split(client);
        let answered = tokio::sync::Notify::new();
        // The client writes everything, and closes its side once an answer begins (or after a
        // moment): hyper ends an HTTP/1 connection whose client half-closes before its request
        // is answered, and an early close would hide everything past the parser.
        let write = async {
            let _ = to_proxy.write_all(data).await;
            let _ = tokio::time::timeout(Duration::from_millis(50), answered.notified()).await;
            let _ = to_proxy.shutdown().await;
        };
        let read = async {
            let mut response = Vec::new();
            let mut chunk = [0u8; 8192];
            while let Ok(n) = from_proxy.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                if response.is_empty() {
                    answered.notify_one();
                }
                response.extend_from_slice(&chunk[..n]);
            }
            response
        };
        let run = async {
            let (_, (), response) = tokio::join!(served, write, read);
            response
        };
        if let Ok(response) = tokio::time::timeout(Duration::from_secs(1), run).await
            && !http2
            && !response.is_empty()
        {
            assert!(
                response.starts_with(b"HTTP/1."),
                "not an HTTP/1 response: {:?}",
                String::from_utf8_lossy(&response[..response.len().min(200)])
            );
        }
    });
});
