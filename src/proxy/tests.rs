use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::route::{HostPattern, Route};
use crate::config::{Backend, Fixed, Scaling, Serving, TargetConfig};

fn fixed_target(name: &str) -> Arc<Target> {
    Target::new(TargetConfig {
        name: name.to_owned(),
        namespace: "local".to_owned(),
        route: Route {
            hosts: vec![HostPattern::parse(name).unwrap()],
            path_prefixes: vec!["/".to_owned()],
        },
        serving: Serving::default(),
        scaling: Scaling::default(),
        // Nothing listens there: no request may get that far.
        backend: Backend::Fixed(Fixed {
            upstream: "127.0.0.1:9".parse().unwrap(),
            check: None,
        }),
    })
}

/// One request over a fresh connection; the whole response as text.
async fn exchange(addr: std::net::SocketAddr, host: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .expect("answered in time")
        .unwrap();
    response
}

#[tokio::test]
async fn requests_refused_while_draining_are_counted_as_shutting_down() {
    let target = fixed_target("a");
    let mut routes = RouteTable::default();
    routes.insert(&HostPattern::parse("a").unwrap(), "/", target.clone());
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot {
        routes,
        targets: vec![target.clone()],
    }));
    let (_, drain_timeout) = watch::channel(Duration::from_secs(1));
    let shared = Arc::new(Shared::new(
        snapshot,
        drain_timeout,
        None,
        watch::channel(crate::config::Limits::default()).1,
    ));
    // Draining, as between the drain's start and a connection's end.
    shared.draining.store(true, Ordering::Relaxed);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(server::serve(
        server::Listeners {
            plain: listener,
            tls: None,
        },
        Proxy::for_worker(shared.clone()),
        stop.clone(),
    ));

    for host in ["a", "unknown"] {
        let response = exchange(addr, host).await;
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
        assert!(response.contains("wakegate is shutting down"), "{response}");
    }
    assert_eq!(target.stats.rejected(Reject::ShuttingDown), 1);
    let metrics = crate::metrics::Metrics::new(Default::default(), shared.clone()).encode();
    for (service, line) in [
        (
            "a",
            "namespace=\"local\",service=\"a\",reason=\"shutting_down\"} 1",
        ),
        (
            "unrouted",
            "namespace=\"\",service=\"\",reason=\"shutting_down\"} 1",
        ),
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("wakegate_rejected_requests_total{") && l.ends_with(line)),
            "{service}: {metrics}"
        );
    }
    stop.cancel();
    server.await.unwrap();
}

#[tokio::test]
async fn serve_io_answers_requests_from_bytes_in_memory_as_the_listener_does() {
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let (_, drain_timeout) = watch::channel(Duration::from_secs(1));
    let proxy = Proxy::for_worker(Arc::new(Shared::new(
        snapshot,
        drain_timeout,
        None,
        watch::channel(crate::config::Limits::default()).1,
    )));
    let (mut client, io) = tokio::io::duplex(4096);
    let peer = "192.0.2.1:1234".parse().unwrap();
    let served = tokio::spawn(async move { server::serve_io(io, &proxy, peer, false).await });
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: nowhere\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    client.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    assert!(
        response.contains("no route for this host and path"),
        "{response}"
    );
    served.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_balancer_steers_around_an_unhealthy_endpoint_and_fails_fast_once_none_is_left() {
    use crate::target::{Endpoint, Phase};
    let target = fixed_target("a");
    let sick = Endpoint::new("127.0.0.1:1".parse().unwrap());
    let well = Endpoint::new("127.0.0.1:2".parse().unwrap());
    target.publish(vec![sick.clone(), well.clone()], Phase::Ready);
    let interval = target.serving.health.interval;
    sick.health.mark_unhealthy("refused", interval);
    for _ in 0..100 {
        let lease = balance::pick(&target).unwrap().expect("a lease");
        assert_eq!(lease.endpoint().authority, well.authority);
    }
    assert!(!target.unhealthy(), "one endpoint is healthy");

    well.health.mark_unhealthy("reset", interval);
    assert!(target.unhealthy());
    let error = balance::pick(&target).expect_err("none is healthy");
    assert_eq!(error.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error.reject(), Some(Reject::UpstreamUnhealthy));
    assert!(
        error.chain().ends_with("retry in 5s: reset")
            || error.chain().ends_with("retry in 5s: refused")
    );

    // An interval later each gets one trial request, and then none until the next.
    tokio::time::advance(interval).await;
    let mut tried: Vec<_> = (0..2)
        .map(|_| {
            balance::pick(&target)
                .unwrap()
                .expect("a trial")
                .endpoint()
                .authority
                .to_string()
        })
        .collect();
    tried.sort();
    assert_eq!(tried, ["127.0.0.1:1", "127.0.0.1:2"]);
    assert!(balance::pick(&target).is_err());
}
