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
        let lease = leased(&target);
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
        .map(|_| leased(&target).endpoint().authority.to_string())
        .collect();
    tried.sort();
    assert_eq!(tried, ["127.0.0.1:1", "127.0.0.1:2"]);
    assert!(balance::pick(&target).is_err());
}

/// A lease of `target`'s endpoints, which must give one.
fn leased(target: &crate::target::Target) -> crate::target::Lease {
    match balance::pick(target) {
        Ok(balance::Pick::Leased(lease)) => lease,
        other => panic!("no lease: {other:?}"),
    }
}

/// A fixed target whose instances each take `limit` requests at once, with `endpoints` ready.
fn limited_target(limit: u32, endpoints: u16) -> Arc<Target> {
    use crate::target::{Endpoint, Phase};
    let target = Target::new(TargetConfig {
        name: "busy".to_owned(),
        namespace: "local".to_owned(),
        route: Route {
            hosts: vec![HostPattern::parse("busy").unwrap()],
            path_prefixes: vec!["/".to_owned()],
        },
        serving: Serving {
            instance_concurrency: limit,
            ..Serving::default()
        },
        scaling: Scaling::default(),
        backend: Backend::Fixed(Fixed {
            upstream: "127.0.0.1:9".parse().unwrap(),
            check: None,
        }),
    });
    let ready = (0..endpoints)
        .map(|i| Endpoint::new(format!("127.0.0.1:{}", 10 + i).parse().unwrap()))
        .collect();
    target.publish(ready, Phase::Ready);
    target
}

#[test]
fn the_balancer_lends_only_free_slots_and_says_when_every_instance_is_full() {
    let target = limited_target(2, 2);
    let leases: Vec<_> = (0..4).map(|_| leased(&target)).collect();
    for endpoint in target.endpoints().iter() {
        assert_eq!(endpoint.in_flight(), 2, "both slots of each endpoint");
    }
    assert!(matches!(balance::pick(&target), Ok(balance::Pick::Full)));
    drop(leases);
    assert!(matches!(
        balance::pick(&target),
        Ok(balance::Pick::Leased(_))
    ));

    // Without a limit, the same endpoints take any number.
    let unlimited = limited_target(0, 1);
    let leases: Vec<_> = (0..50).map(|_| leased(&unlimited)).collect();
    assert_eq!(unlimited.endpoints()[0].in_flight(), 50);
    drop(leases);
}

/// Holds a request for a free slot of `target` as the proxy does (admitted, then waiting):
/// the lease it got.
async fn hold_for_slot(target: &Arc<Target>) -> Result<crate::target::Lease, ProxyError> {
    let holds = hold::Holds::default();
    let client = Client::new("127.0.0.1:1".parse().unwrap(), false);
    let req = Request::new(http_body_util::Empty::<bytes::Bytes>::new());
    let admitted = hold::admit(target, &holds, &Limits::default(), &req, &client)?;
    match hold::wait_ready(target, hold::Wait::Full, None, admitted).await? {
        hold::Held::Ready(lease, _) => Ok(lease),
        hold::Held::Moved(_) => panic!("moved"),
    }
}

#[tokio::test(start_paused = true)]
async fn requests_waiting_for_a_slot_get_freed_slots_one_each_in_arrival_order() {
    let target = limited_target(1, 1);
    let busy = leased(&target);
    let (tx, mut order) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..3 {
        let (target, tx) = (target.clone(), tx.clone());
        tokio::spawn(async move {
            match hold_for_slot(&target).await {
                Ok(lease) => {
                    tx.send(i).unwrap();
                    // Served for a while, then the slot goes to the next one.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    drop(lease);
                }
                Err(error) => panic!("{error}"),
            }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(target.stats.pending(), 3, "held, so counted as pending");
    assert_eq!(target.slots.as_ref().unwrap().waiting(), 3);
    assert!(order.try_recv().is_err(), "none while the slot is taken");
    drop(busy);
    for expected in 0..3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(order.try_recv(), Ok(expected), "arrival order");
        assert!(order.try_recv().is_err(), "one per freed slot");
        assert_eq!(
            target.endpoints()[0].in_flight(),
            1,
            "never above the limit"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(target.stats.pending(), 0);
    assert_eq!(target.slots.as_ref().unwrap().waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_finds_no_free_slot_within_the_hold_bound_gets_503_and_retry_after() {
    let target = limited_target(1, 1);
    let _busy = leased(&target);
    let started = tokio::time::Instant::now();
    let error = match hold_for_slot(&target).await {
        Err(error) => error,
        Ok(_) => panic!("no slot was freed"),
    };
    assert_eq!(started.elapsed(), target.serving.cold_start_timeout);
    assert_eq!(error.reject(), Some(Reject::ConcurrencyTimeout));
    assert_eq!(error.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    let response = error.into_response(http::Version::HTTP_11, false, &RequestId::new(None));
    assert_eq!(response.headers()[http::header::RETRY_AFTER], "1");
    assert_eq!(
        target.slots.as_ref().unwrap().waiting(),
        0,
        "left the queue"
    );
    assert_eq!(target.stats.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_waiting_for_a_slot_takes_one_on_a_new_instance() {
    use crate::target::{Endpoint, Phase};
    let target = limited_target(1, 1);
    let _busy = leased(&target);
    let waiter = {
        let target = target.clone();
        tokio::spawn(async move {
            match hold_for_slot(&target).await {
                Ok(lease) => lease.endpoint().authority.to_string(),
                Err(error) => panic!("a slot on the new instance: {error}"),
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    let mut endpoints = target.endpoints().to_vec();
    endpoints.push(Endpoint::new("127.0.0.1:99".parse().unwrap()));
    target.publish(endpoints, Phase::Ready);
    assert_eq!(waiter.await.unwrap(), "127.0.0.1:99");
}
