//! The per-request path end to end, as a regression guard: a kept-alive HTTP/1.1 client sends
//! GETs over loopback through wakegate's own accept loop (`proxy::server::serve`: peek, parse,
//! route, count, balance, forward over the worker's pooled upstream connection, write back) to
//! an upstream in the same process, and, as the baseline, straight to that upstream. The
//! difference between the two is what wakegate adds per request. Everything runs on one
//! current-thread runtime, as one worker of the proxy does.
//!
//! `cargo bench --bench proxy`
//!
//! The bench checks what it measured: every request answered 200 with the upstream's body, and
//! the target's `http_requests_total` grew by the requests sent through wakegate.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wakegate::config::{Config, Limits};
use wakegate::proxy::route::RouteTable;
use wakegate::proxy::{Proxy, Shared, Snapshot, server};
use wakegate::target::{Endpoint, Phase, Target};

const HOST: &str = "api.localhost";
const BODY: &[u8] = b"hello";

/// An HTTP/1.1 upstream answering every request with 200 and [`BODY`], on this runtime.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                TokioIo::new(stream),
                hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(BODY))))
                }),
            ));
        }
    });
    addr
}

/// wakegate with one ready `upstream` target for [`HOST`], serving on a loopback port of this
/// runtime, as one worker serves; its address and the target.
async fn wakegate(upstream: SocketAddr) -> (SocketAddr, Arc<Target>, CancellationToken) {
    let config = Config::first_target(&format!(
        "[[target]]\nname = \"api\"\nhosts = [\"{HOST}\"]\nupstream = \"{upstream}\"\n"
    ));
    let hosts = config.route.hosts.clone();
    let target = Target::new(config);
    let endpoint = Endpoint::new(upstream.to_string().parse().unwrap());
    target.publish(vec![endpoint], Phase::Ready);
    let mut routes = RouteTable::default();
    for host in &hosts {
        routes.insert(host, "/", target.clone());
    }
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot {
        routes,
        targets: vec![target.clone()],
    }));
    let shared = Arc::new(Shared::new(
        snapshot,
        watch::channel(Duration::from_secs(1)).1,
        None,
        watch::channel(Limits::default()).1,
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(server::serve(
        server::Listeners {
            plain: listener,
            tls: None,
        },
        Proxy::for_worker(shared),
        stop.clone(),
    ));
    (addr, target, stop)
}

/// A kept-alive HTTP/1.1 client connection to `addr`.
async fn client(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

/// One GET, answered 200 with [`BODY`] (checked).
async fn get(sender: &mut SendRequest<Empty<Bytes>>) {
    let request = Request::get("/")
        .header(header::HOST, HOST)
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], BODY);
}

fn request(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (direct, proxied, target, stop) = runtime.block_on(async {
        let upstream = upstream().await;
        let (addr, target, stop) = wakegate(upstream).await;
        (client(upstream).await, client(addr).await, target, stop)
    });
    let mut group = c.benchmark_group("request");
    group.throughput(Throughput::Elements(1));
    let mut sent = 0;
    for (name, mut sender, through_wakegate) in [
        ("direct", direct, false),
        ("through_wakegate", proxied, true),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                if through_wakegate {
                    sent += iters;
                }
                runtime.block_on(async {
                    let began = Instant::now();
                    for _ in 0..iters {
                        get(black_box(&mut sender)).await;
                    }
                    began.elapsed()
                })
            })
        });
    }
    group.finish();
    let counted = target.stats.requests.total();
    assert_eq!(counted, sent, "every request through wakegate is counted");
    stop.cancel();
}

criterion_group!(benches, request);
criterion_main!(benches);
