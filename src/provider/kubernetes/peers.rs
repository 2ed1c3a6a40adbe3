//! The cluster-wide signal: the leader scrapes every other replica's `/metrics` (found from
//! the EndpointSlices of wakegate's headless Service) and adds what their counters grew by to
//! its own. A peer that does not answer within the scrape timeout is skipped for that round;
//! a peer that goes away just stops contributing, so no history is lost.
//!
//! With KEDA's external scaler on, every replica scrapes, and a replica that holds a request
//! for a target with no ready instance also tells the others at once (`POST
//! /peers/held/{namespace}/{name}` on their admin port): KEDA's stream may be open on any of
//! them, and a scrape comes only once a second.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

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
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::PeersConfig;
use crate::provider::{Remote, RemoteSignal};
use crate::target::Target;

const SCRAPE_EVERY: Duration = Duration::from_secs(1);

type Key = (String, String);

type Http = HttpClient<HttpConnector, Empty<Bytes>>;

/// One peer's counters for one target, as last scraped.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    pub concurrency_seconds: f64,
    pub requests: f64,
    /// In flight plus held right now, but for idle streams.
    pub demand: f64,
}

/// What the other replicas added since the autoscaler last looked, and the notices of held
/// requests exchanged with them.
#[derive(Debug, Default)]
pub struct PeerSignal {
    pending: Mutex<HashMap<Key, Remote>>,
    demand: Mutex<HashMap<Key, u64>>,
    /// Where notices of requests held here go, when this replica sends them.
    notices: Option<mpsc::UnboundedSender<Key>>,
    /// When each target's last notice went out: one a scrape interval is enough, the scrapes
    /// carry the rest.
    noticed: Mutex<HashMap<Key, Instant>>,
    /// The peers as the headless Service lists them, once the scraping runs.
    peers: OnceLock<Peers>,
    /// By direction (`sent`, `received`) and result.
    counted: Family<Vec<(&'static str, &'static str)>, Counter>,
}

/// Why a notice from a peer was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// This replica takes none: the external scaler is off, or there are no peers.
    NotTaken,
    /// It came from an address the peers Service does not list.
    NotAPeer,
    /// This replica routes no such target.
    UnknownTarget,
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

    fn held_here(&self, target: &Target) {
        let Some(notices) = &self.notices else {
            return;
        };
        let key = (target.namespace.clone(), target.name.clone());
        let now = Instant::now();
        {
            let mut noticed = self.noticed.lock().expect("not poisoned");
            if noticed
                .get(&key)
                .is_some_and(|at| now.duration_since(*at) < SCRAPE_EVERY)
            {
                return;
            }
            if noticed.len() >= 1024 {
                noticed.retain(|_, at| now.duration_since(*at) < SCRAPE_EVERY);
            }
            noticed.insert(key.clone(), now);
        }
        let _ = notices.send(key);
    }
}

impl PeerSignal {
    /// A signal that, with `notify`, tells the peers of requests held here (the receiver
    /// is what [`run`] sends from), and registers its counts in `registry`.
    pub fn new(
        notify: bool,
        registry: &mut Registry,
    ) -> (Self, Option<mpsc::UnboundedReceiver<Key>>) {
        let (notices, receiver) = if notify {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let signal = Self {
            notices,
            ..Self::default()
        };
        if notify {
            registry.register(
                "wakegate_peer_notices",
                "Notices of a request held for a target with no ready instance, exchanged with the other replicas so that KEDA's stream on any of them says active at once: by direction (sent, received) and result (sent: ok, failed; received: taken, not_a_peer, unknown_target).",
                signal.counted.clone(),
            );
        }
        (signal, receiver)
    }

    /// A peer at `from` says it holds a request for the target `found` (`None`: not routed
    /// here): the target counts as active from now.
    pub fn held_on_peer(&self, from: IpAddr, found: Option<&Target>) -> Result<(), Refused> {
        let answer = match self.peers.get() {
            None => Err(Refused::NotTaken),
            Some(_) if self.notices.is_none() => Err(Refused::NotTaken),
            Some(peers) if !peers.addresses().iter().any(|a| a.ip() == from) => {
                Err(Refused::NotAPeer)
            }
            Some(_) => found
                .map(Target::held_on_peer)
                .ok_or(Refused::UnknownTarget),
        };
        let result = match answer {
            Ok(()) => "taken",
            Err(Refused::NotTaken) => return answer,
            Err(Refused::NotAPeer) => "not_a_peer",
            Err(Refused::UnknownTarget) => "unknown_target",
        };
        self.count("received", result);
        answer
    }

    fn count(&self, direction: &'static str, result: &'static str) {
        self.counted
            .get_or_create(&vec![("direction", direction), ("result", result)])
            .inc();
    }

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
/// knows the cluster-wide signal, as KEDA's external scaler, asked of any replica, answers it);
/// sends them the `notices` of requests held here.
pub async fn run(
    client: kube::Client,
    config: PeersConfig,
    leader: Arc<AtomicBool>,
    always: bool,
    signal: Arc<PeerSignal>,
    notices: Option<mpsc::UnboundedReceiver<Key>>,
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
    let peers = signal.peers.get_or_init(|| Peers {
        store,
        port: config.port.clone(),
        me: super::identity(),
    });
    let http: Http = HttpClient::builder(TokioExecutor::new()).build_http();
    // Apart from the scrapes, which may wait for a slow peer: a notice goes out at once.
    let noticing = notices.map(|mut notices| {
        let (http, peers, signal) = (http.clone(), peers.clone(), signal.clone());
        let timeout = config.scrape_timeout;
        tokio::spawn(async move {
            while let Some(key) = notices.recv().await {
                tokio::spawn(notify(
                    http.clone(),
                    peers.addresses(),
                    key,
                    timeout,
                    signal.clone(),
                ));
            }
        })
    });
    let mut last: HashMap<SocketAddr, HashMap<Key, Counters>> = HashMap::new();
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
        let addresses = peers.addresses();
        let scrapes = addresses
            .iter()
            .map(|addr| scrape(&http, *addr, config.scrape_timeout));
        let results = join_all(scrapes).await;
        let mut seen = HashMap::new();
        for (addr, result) in addresses.into_iter().zip(results) {
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
    if let Some(noticing) = noticing {
        noticing.abort();
    }
}

/// Tells every peer that a request for the target `key` is held here.
async fn notify(
    http: Http,
    peers: Vec<SocketAddr>,
    (namespace, name): Key,
    timeout: Duration,
    signal: Arc<PeerSignal>,
) {
    let sends = peers.iter().map(|addr| {
        let http = http.clone();
        let uri = format!("http://{addr}/peers/held/{namespace}/{name}");
        async move {
            let post = async {
                let request = http::Request::post(uri).body(Empty::new()).ok()?;
                let response = http.request(request).await.ok()?;
                response.status().is_success().then_some(())
            };
            tokio::time::timeout(timeout, post).await.ok().flatten()
        }
    });
    for (addr, sent) in peers.iter().zip(join_all(sends).await) {
        if sent.is_none() {
            tracing::debug!(peer = %addr, %namespace, %name, "peer did not take the notice of a held request in time");
        }
        signal.count("sent", if sent.is_some() { "ok" } else { "failed" });
    }
}

/// The other replicas: the ready endpoints of the peers Service but this one.
#[derive(Debug, Clone)]
struct Peers {
    store: Store<EndpointSlice>,
    /// The admin port's name or number.
    port: String,
    /// This replica's pod name.
    me: String,
}

impl Peers {
    fn addresses(&self) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        for slice in self.store.state() {
            let Some(number) = slice
                .ports
                .iter()
                .flatten()
                .find(|p| {
                    p.name.as_deref() == Some(&self.port)
                        || p.port.is_some_and(|n| n.to_string() == self.port)
                })
                .and_then(|p| p.port)
                .and_then(|n| u16::try_from(n).ok())
            else {
                continue;
            };
            for endpoint in &slice.endpoints {
                if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false)
                    || endpoint.target_ref.as_ref().and_then(|r| r.name.as_deref())
                        == Some(&self.me)
                {
                    continue;
                }
                if let Some(ip) = endpoint.addresses.first().and_then(|a| a.parse().ok()) {
                    out.push(SocketAddr::new(ip, number));
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

async fn scrape(
    http: &Http,
    addr: SocketAddr,
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
    fn a_notice_is_taken_from_a_ready_peer_only_and_for_a_routed_target() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "wakegate-peers-1", "namespace": "wakegate" },
            "addressType": "IPv4",
            "ports": [{ "name": "admin", "port": 9090 }],
            "endpoints": [
                { "addresses": ["10.0.0.2"], "conditions": { "ready": true },
                  "targetRef": { "kind": "Pod", "name": "wakegate-b" } },
                { "addresses": ["10.0.0.3"], "conditions": { "ready": false },
                  "targetRef": { "kind": "Pod", "name": "wakegate-c" } },
                { "addresses": ["10.0.0.1"], "conditions": { "ready": true },
                  "targetRef": { "kind": "Pod", "name": "wakegate-a" } }
            ]
        }))
        .unwrap();
        let (store, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Apply(slice));
        let peers = Peers {
            store,
            port: "admin".into(),
            me: "wakegate-a".into(),
        };
        assert_eq!(peers.addresses(), ["10.0.0.2:9090".parse().unwrap()]);

        let target = Target::new(crate::config::Config::first_target(
            "[[target]]\nname = \"hello\"\nhosts = [\"h\"]\ncommand = [\"demo\"]\n",
        ));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (off, _) = PeerSignal::new(false, &mut Registry::default());
        let _ = off.peers.set(peers.clone());
        assert_eq!(
            off.held_on_peer(ip("10.0.0.2"), Some(&target)),
            Err(Refused::NotTaken),
            "the external scaler is off"
        );
        let (on, _notices) = PeerSignal::new(true, &mut Registry::default());
        assert_eq!(
            on.held_on_peer(ip("10.0.0.2"), Some(&target)),
            Err(Refused::NotTaken),
            "before the peers are known"
        );
        let _ = on.peers.set(peers);
        for stranger in ["10.0.0.3", "10.0.0.1", "192.0.2.7"] {
            assert_eq!(
                on.held_on_peer(ip(stranger), Some(&target)),
                Err(Refused::NotAPeer),
                "{stranger}"
            );
        }
        assert_eq!(target.last_held_on_peer(), None);
        assert_eq!(
            on.held_on_peer(ip("10.0.0.2"), None),
            Err(Refused::UnknownTarget)
        );
        assert_eq!(on.held_on_peer(ip("10.0.0.2"), Some(&target)), Ok(()));
        assert!(target.last_held_on_peer().is_some());
    }

    #[tokio::test]
    async fn one_notice_per_target_per_scrape_interval() {
        let (signal, notices) = PeerSignal::new(true, &mut Registry::default());
        let mut notices = notices.unwrap();
        let target = |name: &str| {
            Target::new(crate::config::Config::first_target(&format!(
                "[[target]]\nname = \"{name}\"\nhosts = [\"{name}\"]\ncommand = [\"demo\"]\n"
            )))
        };
        let (hello, world) = (target("hello"), target("world"));
        for _ in 0..100 {
            signal.held_here(&hello);
        }
        signal.held_here(&world);
        let key = |name: &str| ("local".to_owned(), name.to_owned());
        assert_eq!(notices.recv().await, Some(key("hello")));
        assert_eq!(notices.recv().await, Some(key("world")));
        assert!(notices.try_recv().is_err(), "one notice each");
        let (silent, none) = PeerSignal::new(false, &mut Registry::default());
        assert!(none.is_none());
        silent.held_here(&hello);
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
