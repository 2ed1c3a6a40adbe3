//! The cluster-wide signal: the leader scrapes every other replica's `/metrics` (found from
//! the EndpointSlices of wakegate's headless Service) and adds what their counters grew by to
//! its own. A peer that does not answer within the scrape timeout is skipped for that round;
//! a peer that goes away just stops contributing, so no history is lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;

use crate::config::PeersConfig;
use crate::provider::{Remote, RemoteSignal};
use crate::target::Target;

const SCRAPE_EVERY: Duration = Duration::from_secs(1);

type Key = (String, String);

/// One peer's counters for one target, as last scraped.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    pub concurrency_seconds: f64,
    pub requests: f64,
    /// In flight plus held right now, but for idle streams.
    pub demand: f64,
}

/// What the other replicas added since the autoscaler last looked.
#[derive(Debug, Default)]
pub struct PeerSignal {
    pending: Mutex<HashMap<Key, Remote>>,
    demand: Mutex<HashMap<Key, u64>>,
}

impl RemoteSignal for PeerSignal {
    fn take(&self, target: &Target) -> Remote {
        let key = (target.namespace.clone(), target.name.clone());
        let mut remote = self
            .pending
            .lock()
            .expect("not poisoned")
            .remove(&key)
            .unwrap_or_default();
        remote.demand = self
            .demand
            .lock()
            .expect("not poisoned")
            .get(&key)
            .copied()
            .unwrap_or(0);
        remote
    }
}

impl PeerSignal {
    /// Adds the growth between two scrapes of one peer; a counter that went down (the peer
    /// restarted) counts from zero.
    pub fn add(&self, before: &HashMap<Key, Counters>, now: &HashMap<Key, Counters>) {
        let mut pending = self.pending.lock().expect("not poisoned");
        for (key, counters) in now {
            let old = before.get(key).copied().unwrap_or_default();
            let grew = |new: f64, old: f64| if new >= old { new - old } else { new };
            let entry = pending.entry(key.clone()).or_default();
            entry.integral += grew(counters.concurrency_seconds, old.concurrency_seconds);
            entry.requests += grew(counters.requests, old.requests).round() as u64;
        }
    }

    fn set_demand(&self, all: &[HashMap<Key, Counters>]) {
        let mut demand = HashMap::new();
        for peer in all {
            for (key, c) in peer {
                *demand.entry(key.clone()).or_insert(0) += c.demand.max(0.0) as u64;
            }
        }
        *self.demand.lock().expect("not poisoned") = demand;
    }

    fn clear(&self) {
        self.pending.lock().expect("not poisoned").clear();
        self.demand.lock().expect("not poisoned").clear();
    }
}

/// Per target, from a `/metrics` text: the counters the autoscaler sums.
pub fn parse_metrics(text: &str) -> HashMap<Key, Counters> {
    let mut out: HashMap<Key, Counters> = HashMap::new();
    for line in text.lines() {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        let field: fn(&mut Counters) -> &mut f64 = match name {
            "http_requests_total" => |c| &mut c.requests,
            "wakegate_concurrency_seconds_total" => |c| &mut c.concurrency_seconds,
            "http_requests_in_flight" | "wakegate_pending_requests" | "wakegate_idle_streams" => {
                |c| &mut c.demand
            }
            _ => continue,
        };
        // Idle streams are in flight, but no demand.
        let sign = if name == "wakegate_idle_streams" {
            -1.0
        } else {
            1.0
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let label = |key: &str| {
            labels
                .split(&format!("{key}=\""))
                .nth(1)
                .and_then(|v| v.split('"').next())
                .map(str::to_owned)
        };
        if let (Some(namespace), Some(service)) = (label("namespace"), label("service"))
            && !service.is_empty()
        {
            *field(out.entry((namespace, service)).or_default()) += sign * value;
        }
    }
    out
}

/// Scrapes the peers while this replica leads, or always when `always` (every replica then
/// knows the cluster-wide signal, as KEDA's external scaler, asked of any replica, answers it).
pub async fn run(
    client: kube::Client,
    config: PeersConfig,
    leader: Arc<AtomicBool>,
    always: bool,
    signal: Arc<PeerSignal>,
    stop: CancellationToken,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &config.namespace);
    let (store, writer) = reflector::store();
    let selector = format!("kubernetes.io/service-name={}", config.service);
    let stream = watcher(api, watcher::Config::default().labels(&selector))
        .default_backoff()
        .reflect(writer);
    let watching = {
        let stop = stop.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            let mut stream = std::pin::pin!(stream);
            loop {
                tokio::select! {
                    next = stream.next() => match next {
                        Some(Err(error)) => tracing::warn!(%error, "peer watch failed; retrying"),
                        Some(Ok(_)) => {}
                        None => return,
                    },
                    () = stop.cancelled() => return,
                }
            }
        })
    };
    let http: HttpClient<HttpConnector, Empty<Bytes>> =
        HttpClient::builder(TokioExecutor::new()).build_http();
    let me = super::identity();
    let mut last: HashMap<String, HashMap<Key, Counters>> = HashMap::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep(SCRAPE_EVERY) => {}
            () = stop.cancelled() => break,
        }
        if !always && !leader.load(Ordering::Relaxed) {
            last.clear();
            signal.clear();
            continue;
        }
        let peers = peer_addresses(&store, &config.port, &me);
        let scrapes = peers
            .iter()
            .map(|addr| scrape(&http, addr, config.scrape_timeout));
        let results = join_all(scrapes).await;
        let mut seen = HashMap::new();
        for (addr, result) in peers.into_iter().zip(results) {
            match result {
                Some(now) => {
                    // A new peer's counters so far are history, not this tick's traffic.
                    if let Some(before) = last.get(&addr) {
                        signal.add(before, &now);
                    }
                    seen.insert(addr, now);
                }
                None => {
                    tracing::debug!(peer = %addr, "peer did not answer /metrics in time; skipped");
                    if let Some(before) = last.remove(&addr) {
                        seen.insert(addr, before);
                    }
                }
            }
        }
        signal.set_demand(&seen.values().cloned().collect::<Vec<_>>());
        last = seen;
    }
    watching.abort();
}

fn peer_addresses(store: &Store<EndpointSlice>, port: &str, me: &str) -> Vec<String> {
    let mut out = Vec::new();
    for slice in store.state() {
        let Some(number) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| {
                p.name.as_deref() == Some(port) || p.port.is_some_and(|n| n.to_string() == port)
            })
            .and_then(|p| p.port)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false)
                || endpoint.target_ref.as_ref().and_then(|r| r.name.as_deref()) == Some(me)
            {
                continue;
            }
            if let Some(ip) = endpoint.addresses.first() {
                out.push(if ip.contains(':') {
                    format!("[{ip}]:{number}")
                } else {
                    format!("{ip}:{number}")
                });
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

async fn scrape(
    http: &HttpClient<HttpConnector, Empty<Bytes>>,
    addr: &str,
    timeout: Duration,
) -> Option<HashMap<Key, Counters>> {
    let uri: http::Uri = format!("http://{addr}/metrics").parse().ok()?;
    let fetch = async {
        let response = http.get(uri).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some(parse_metrics(&String::from_utf8_lossy(&body)))
    };
    tokio::time::timeout(timeout, fetch).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE http_requests counter
http_requests_total{namespace="demo",service="hello",method="GET",code="200"} 10
http_requests_total{namespace="demo",service="hello",method="GET",code="503"} 2
http_requests_in_flight{namespace="demo",service="hello"} 4
wakegate_pending_requests{namespace="demo",service="hello"} 1
wakegate_idle_streams{namespace="demo",service="hello"} 1
wakegate_concurrency_seconds_total{namespace="demo",service="hello"} 4.5
wakegate_rejected_requests_total{namespace="",service="",reason="no_route"} 7
"#;

    #[test]
    fn metrics_text_is_summed_per_target() {
        let parsed = parse_metrics(TEXT);
        assert_eq!(parsed.len(), 1);
        let c = parsed[&("demo".to_owned(), "hello".to_owned())];
        assert_eq!(
            c,
            Counters {
                concurrency_seconds: 4.5,
                requests: 12.0,
                demand: 4.0
            }
        );
    }

    #[test]
    fn growth_is_added_and_a_restarted_peer_counts_from_zero() {
        let signal = PeerSignal::default();
        let key = ("demo".to_owned(), "hello".to_owned());
        let at = |r: f64, s: f64| {
            HashMap::from([(
                key.clone(),
                Counters {
                    concurrency_seconds: s,
                    requests: r,
                    demand: 0.0,
                },
            )])
        };
        signal.add(&at(10.0, 1.0), &at(15.0, 3.0));
        signal.add(&at(100.0, 50.0), &at(4.0, 0.5)); // restarted
        let pending = signal.pending.lock().unwrap()[&key];
        assert_eq!(pending.requests, 9);
        assert!((pending.integral - 2.5).abs() < 1e-9);
    }
}
