//! `kube-scale`: the Kubernetes provider at scale. An in-process Kubernetes API double
//! (`wakegate_test_support::kube_api::FakeApi`) holds N Services annotated
//! `wakegate.io/enabled: "true"` with M EndpointSlices each; the release wakegate watches it.
//! Once every Service is routed with all its endpoints, endpoint changes are made at a fixed
//! rate (each adds or removes one ready address in one slice of a random Service), and the
//! delay from each change to wakegate's routing table showing it is measured by polling
//! `/targets/{namespace}/{name}` about every millisecond. Also reported: the time to the initial
//! sync, wakegate's memory, and its CPU time per change.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use wakegate::plot::Panel;
use wakegate_test_support::kube_api::FakeApi;

use super::{Settings, log, progress, progress_end};
use crate::Error;
use crate::load;
use crate::procs::{self, WorkDir};
use crate::report::{self, Machine, Table};
use crate::stand::Wakegate;

/// The Services are spread over this many namespaces, `kube-scale-0` … .
const NAMESPACES: usize = 5;
/// Ready addresses in each slice at the start; a change never leaves a slice with fewer than
/// one or more than `MAX_PER_SLICE`.
const INITIAL_PER_SLICE: usize = 3;
const MAX_PER_SLICE: usize = 6;
/// The slices' port `http`. Nothing ever connects to the addresses.
const PORT: u16 = 8080;
/// Changes measured at once, each on its own keep-alive admin connection; a change made
/// while all are busy is applied but not measured. Enough for every change at 100 a second
/// with delays up to 2.5 s: a pollers-free sample would favour the changes made right after
/// wakegate published a batch, which wait longest.
const POLLERS: usize = 256;
/// Polled every millisecond for this long after a change, then every 5% of the time elapsed
/// (at most every 250 ms), so that slow changes do not flood the admin listener.
const FAST_POLLING: Duration = Duration::from_millis(50);
/// Pollers of the calibration (polls without changes, to know what polling itself costs).
const CALIBRATION_POLLERS: usize = 8;

/// The `kube-scale` flags; `None`: the default, which `--quick` makes smaller.
#[derive(Debug, Clone)]
pub struct Options {
    pub services: Option<usize>,
    pub slices_per_service: usize,
    pub changes_per_second: f64,
    pub duration: Option<Duration>,
    pub sync_timeout: Option<Duration>,
}

/// The settings of one run, defaults resolved.
struct Plan {
    services: usize,
    per_service: usize,
    rate: f64,
    duration: Duration,
    sync_timeout: Duration,
    /// A change not seen within this long counts as not observed.
    observe_limit: Duration,
    idle_window: Duration,
    calibration: Duration,
}

impl Plan {
    fn new(settings: &Settings) -> Result<Plan, Error> {
        let o = &settings.kube;
        let plan = Plan {
            services: o.services.unwrap_or(settings.count(5_000, 100)),
            per_service: o.slices_per_service,
            rate: o.changes_per_second,
            duration: o
                .duration
                .unwrap_or(settings.pick(Duration::from_secs(30), Duration::from_secs(5))),
            sync_timeout: o
                .sync_timeout
                .unwrap_or(settings.pick(Duration::from_secs(600), Duration::from_secs(60))),
            observe_limit: settings.pick(Duration::from_secs(60), Duration::from_secs(15)),
            idle_window: settings.pick(Duration::from_secs(5), Duration::from_secs(1)),
            calibration: settings.pick(Duration::from_secs(3), Duration::from_secs(1)),
        };
        if plan.services == 0
            || plan.per_service == 0
            || !(plan.rate > 0.0 && plan.rate.is_finite())
            || plan.duration.is_zero()
        {
            return Err(Error::Harness(
                "kube-scale: --services, --slices-per-service, --changes-per-second and \
                 --duration must be above zero"
                    .into(),
            ));
        }
        Ok(plan)
    }

    fn slices(&self) -> usize {
        self.services * self.per_service
    }
}

/// A small deterministic generator (SplitMix64): the same run makes the same changes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn namespace(service: usize) -> String {
    format!("kube-scale-{}", service % NAMESPACES)
}

fn service_name(service: usize) -> String {
    format!("svc-{service}")
}

/// One ready address of a slice.
struct Address {
    ip: String,
    /// Known to be in wakegate's routing table (listed at the sync, or seen after its
    /// change): only these are removed by a measured change, whose delay would otherwise be
    /// the time until it was never there.
    confirmed: bool,
}

/// The API double's Services and slices as the harness made them.
struct Cluster {
    per_service: usize,
    /// Slice `s * per_service + j` is slice `j` of Service `s`.
    slices: Vec<Vec<Address>>,
    next_ip: u32,
}

impl Cluster {
    fn new(services: usize, per_service: usize) -> Cluster {
        let mut cluster = Cluster {
            per_service,
            slices: Vec::with_capacity(services * per_service),
            next_ip: 0,
        };
        for _ in 0..services * per_service {
            let slice = (0..INITIAL_PER_SLICE)
                .map(|_| Address {
                    ip: cluster.fresh_ip(),
                    confirmed: true,
                })
                .collect();
            cluster.slices.push(slice);
        }
        cluster
    }

    /// A new address, never used before: 10.0.0.1, 10.0.0.2, …
    fn fresh_ip(&mut self) -> String {
        self.next_ip += 1;
        let n = self.next_ip;
        format!("10.{}.{}.{}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff)
    }

    fn service_json(service: usize) -> Value {
        let name = service_name(service);
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": namespace(service),
                "annotations": { "wakegate.io/enabled": "true" },
            },
            "spec": {
                "selector": { "app": name },
                "ports": [{ "name": "http", "port": 80, "targetPort": PORT, "protocol": "TCP" }],
            },
        })
    }

    fn slice_json(&self, index: usize) -> Value {
        let service = index / self.per_service;
        let endpoints: Vec<Value> = self.slices[index]
            .iter()
            .map(|a| json!({ "addresses": [a.ip], "conditions": { "ready": true } }))
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{}-{}", service_name(service), index % self.per_service),
                "namespace": namespace(service),
                "labels": { "kubernetes.io/service-name": service_name(service) },
            },
            "addressType": "IPv4",
            "ports": [{ "name": "http", "port": PORT, "protocol": "TCP" }],
            "endpoints": endpoints,
        })
    }
}

/// One change made to a slice.
struct Change {
    service: usize,
    slice: usize,
    ip: String,
    added: bool,
}

/// Makes one change to a random slice: adds a fresh address, or removes a confirmed one
/// (`measured`) or any (otherwise). Addresses are never reused, so other changes under way
/// cannot make a measured one look done.
fn change(cluster: &mut Cluster, rng: &mut Rng, api: &FakeApi, measured: bool) -> Change {
    let slice = rng.below(cluster.slices.len());
    let service = slice / cluster.per_service;
    let addresses = &cluster.slices[slice];
    let removable: Vec<usize> = (0..addresses.len())
        .filter(|&i| addresses[i].confirmed || !measured)
        .collect();
    let remove = addresses.len() > 1
        && !removable.is_empty()
        && (addresses.len() >= MAX_PER_SLICE || rng.below(2) == 0);
    let (ip, added) = if remove {
        let at = removable[rng.below(removable.len())];
        (cluster.slices[slice].remove(at).ip, false)
    } else {
        let ip = cluster.fresh_ip();
        cluster.slices[slice].push(Address {
            ip: ip.clone(),
            confirmed: false,
        });
        (ip, true)
    };
    api.apply(cluster.slice_json(slice));
    Change {
        service,
        slice,
        ip,
        added,
    }
}

/// A keep-alive HTTP/1.1 connection to wakegate's admin listener, reopened after an error.
struct AdminConn {
    addr: SocketAddr,
    sender: Option<http1::SendRequest<Empty<Bytes>>>,
}

impl AdminConn {
    fn new(addr: SocketAddr) -> AdminConn {
        AdminConn { addr, sender: None }
    }

    async fn get(&mut self, path: &str) -> Result<(StatusCode, String), Error> {
        let failed = |why: String| Error::Harness(format!("GET http://{}{path}: {why}", self.addr));
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = tokio::net::TcpStream::connect(self.addr)
                .await
                .map_err(|e| failed(load::io_kind(&e)))?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| failed(load::kind_of(&e)))?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("connected above");
        let result = async {
            sender.ready().await?;
            let req = Request::get(path)
                .header(header::HOST, "loadtest")
                .body(Empty::<Bytes>::new())
                .expect("a valid request");
            let response = sender.send_request(req).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, String::from_utf8_lossy(&body).into_owned()))
        }
        .await;
        result.map_err(|e| {
            self.sender = None;
            failed(load::kind_of(&e))
        })
    }
}

/// The time from a change to the routing table showing it, if it showed within the limit.
#[derive(Clone, Copy)]
enum Seen {
    After(Duration),
    NotWithin,
}

struct Observation {
    /// When the change was made, since the change phase began.
    at: Duration,
    added: bool,
    seen: Seen,
}

/// Polls `/targets/{namespace}/{name}` until `ip:PORT` is listed (`added`) or gone, from
/// `at` on; returns the delay to the answer that showed it, and the polls made.
async fn observe(
    conn: &mut AdminConn,
    path: &str,
    ip: &str,
    added: bool,
    at: Instant,
    limit: Duration,
) -> Result<(Seen, u64), Error> {
    let needle = format!("\"{ip}:{PORT}\"");
    let mut polls = 0;
    loop {
        let (status, body) = conn.get(path).await?;
        polls += 1;
        let elapsed = at.elapsed();
        if status != StatusCode::OK {
            return Err(Error::Harness(format!(
                "GET {path}: status {status}: {body}"
            )));
        }
        if body.contains(&needle) == added {
            return Ok((Seen::After(elapsed), polls));
        }
        if elapsed >= limit {
            return Ok((Seen::NotWithin, polls));
        }
        let pause = if elapsed < FAST_POLLING {
            Duration::from_millis(1)
        } else {
            (elapsed / 20).min(Duration::from_millis(250))
        };
        tokio::time::sleep(pause).await;
    }
}

/// wakegate's CPU seconds and resident memory, sampled during the change phase.
struct Sample {
    at: Duration,
    cpu_s: f64,
    rss_mib: f64,
}

/// What the run found; `None` where it did not get that far.
#[derive(Default)]
struct Results {
    listening: Option<Duration>,
    ready: Option<Duration>,
    synced: Option<Duration>,
    /// At the end of the sync wait: (targets listed, with all their endpoints).
    listed: (usize, usize),
    sync_cpu_s: f64,
    rss_synced_mib: f64,
    idle_cpu_per_s: Option<f64>,
    cpu_per_poll_ms: Option<f64>,
    phase: Option<Phase>,
    peak_rss_mib: f64,
    rss_end_mib: f64,
}

struct Phase {
    applied: u64,
    added: u64,
    removed: u64,
    driving: Duration,
    /// From the first change to the last measurement's end.
    window: Duration,
    cpu_s: f64,
    polls: u64,
    observations: Vec<Observation>,
    samples: Vec<Sample>,
}

impl Phase {
    fn measured(&self) -> usize {
        self.observations.len()
    }

    fn not_seen(&self) -> usize {
        self.observations
            .iter()
            .filter(|o| matches!(o.seen, Seen::NotWithin))
            .count()
    }

    /// The delays in ms, sorted; a change never seen counts as infinitely late.
    fn sorted_ms(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .observations
            .iter()
            .map(|o| match o.seen {
                Seen::After(d) => d.as_secs_f64() * 1000.0,
                Seen::NotWithin => f64::INFINITY,
            })
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }
}

pub async fn run(settings: &Settings) -> Result<PathBuf, Error> {
    let plan = Plan::new(settings)?;
    let machine = Machine::now(None);
    let work = WorkDir::new()?;
    let mut results = Results::default();

    log(format!(
        "the API double: {} Services in {NAMESPACES} namespaces, {} EndpointSlices ({} per \
         Service, {INITIAL_PER_SLICE} ready addresses each)",
        plan.services,
        plan.slices(),
        plan.per_service
    ));
    let api = FakeApi::start().await;
    let cluster = Cluster::new(plan.services, plan.per_service);
    let loading = Instant::now();
    for service in 0..plan.services {
        api.apply(Cluster::service_json(service));
    }
    for slice in 0..plan.slices() {
        api.apply(cluster.slice_json(slice));
    }
    log(format!(
        "loaded in {:.1} s; starting wakegate",
        loading.elapsed().as_secs_f64()
    ));
    let kubeconfig = api.write_kubeconfig(&work.path);
    // External autoscaling: no Deployment exists, so wakegate's own scale-downs of idle
    // targets would only be refused (and retried, and reported as Events).
    let head = format!(
        "[kubernetes]\nkubeconfig = \"{}\"\nautoscaler = \"external\"\n",
        kubeconfig.display()
    );
    let spawned = Instant::now();
    let mut wakegate = Wakegate::start(&work, &settings.wakegate, "wakegate", &head, "")?;
    results.listening = Some(wakegate.started_in);
    let pid = wakegate.server.pid();

    let synced = wait_for_sync(&plan, &mut wakegate, spawned, &mut results).await?;
    results.sync_cpu_s = procs::cpu_seconds(pid);
    results.rss_synced_mib = wakegate.server.rss_mib("VmRSS");
    if synced {
        log(format!(
            "synced: all {} targets with all their endpoints after {:.2} s (/readyz after \
             {:.2} s), {:.1} CPU s, {:.1} MiB resident",
            plan.services,
            results.synced.unwrap_or_default().as_secs_f64(),
            results.ready.unwrap_or_default().as_secs_f64(),
            results.sync_cpu_s,
            results.rss_synced_mib
        ));
        calibrate(&plan, &wakegate, &mut results).await?;
        wakegate.server.check_running()?;
        results.phase = Some(changes(&plan, &api, cluster, &mut wakegate).await?);
    }
    wakegate.server.check_running()?;
    results.peak_rss_mib = wakegate.server.peak_rss_mib();
    results.rss_end_mib = wakegate.server.rss_mib("VmRSS");
    let written = write_report(&plan, &machine, &results, settings)?;
    if !synced {
        let text = std::fs::read_to_string(&written).unwrap_or_default();
        println!("{text}");
        return Err(Error::Harness(format!(
            "wakegate did not sync within {:?} ({} of {} targets listed, {} with all their \
             endpoints); the partial report is in {}",
            plan.sync_timeout,
            results.listed.0,
            plan.services,
            results.listed.1,
            written.display()
        )));
    }
    Ok(written)
}

/// Waits until `/targets` lists every Service with all its initial endpoints; false after
/// the sync timeout.
async fn wait_for_sync(
    plan: &Plan,
    wakegate: &mut Wakegate,
    spawned: Instant,
    results: &mut Results,
) -> Result<bool, Error> {
    let mut conn = AdminConn::new(wakegate.admin);
    let pid = wakegate.server.pid();
    let expected = plan.per_service * INITIAL_PER_SLICE;
    // A large /targets costs wakegate a few ms to write: fetched at most every 200 ms.
    let mut next_listing = Instant::now();
    let mut last_progress = Instant::now();
    loop {
        wakegate.server.check_running()?;
        let elapsed = spawned.elapsed();
        if results.ready.is_none() {
            let (status, _) = conn.get("/readyz").await?;
            if status == StatusCode::OK {
                results.ready = Some(spawned.elapsed());
            }
        }
        if results.ready.is_some() && Instant::now() >= next_listing {
            let (status, body) = conn.get("/targets").await?;
            if status != StatusCode::OK {
                return Err(Error::Harness(format!("/targets: status {status}: {body}")));
            }
            let all: Value = serde_json::from_str(&body)
                .map_err(|e| Error::Harness(format!("/targets is not JSON ({e})")))?;
            let kube: Vec<&Value> = all["targets"]
                .as_array()
                .map_or(&[][..], Vec::as_slice)
                .iter()
                .filter(|t| t["kind"] == "kubernetes")
                .collect();
            let complete = kube
                .iter()
                .filter(|t| t["instances"].as_u64() == Some(expected as u64))
                .count();
            results.listed = (kube.len(), complete);
            if complete == plan.services {
                progress_end();
                results.synced = Some(spawned.elapsed());
                return Ok(true);
            }
            next_listing = Instant::now() + Duration::from_millis(200);
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            progress(format!(
                "waiting for the sync: {:.0} s, {}, {} of {} targets listed ({} with all \
                 their endpoints), wakegate {:.1} CPU s, {:.1} MiB resident",
                elapsed.as_secs_f64(),
                if results.ready.is_some() {
                    "/readyz ok"
                } else {
                    "/readyz not yet"
                },
                results.listed.0,
                plan.services,
                results.listed.1,
                procs::cpu_seconds(pid),
                wakegate.server.rss_mib("VmRSS")
            ));
        }
        if elapsed >= plan.sync_timeout {
            progress_end();
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// wakegate's CPU rate when nothing changes, and what one poll of `/targets/{ns}/{name}`
/// costs it, so that both can be taken out of the CPU per change.
async fn calibrate(plan: &Plan, wakegate: &Wakegate, results: &mut Results) -> Result<(), Error> {
    let pid = wakegate.server.pid();
    let (cpu, began) = (procs::cpu_seconds(pid), Instant::now());
    tokio::time::sleep(plan.idle_window).await;
    let idle = (procs::cpu_seconds(pid) - cpu) / began.elapsed().as_secs_f64();
    results.idle_cpu_per_s = Some(idle);

    let (cpu, began) = (procs::cpu_seconds(pid), Instant::now());
    let until = began + plan.calibration;
    let mut pollers = tokio::task::JoinSet::new();
    for poller in 0..CALIBRATION_POLLERS {
        let addr = wakegate.admin;
        let service = poller * plan.services / CALIBRATION_POLLERS;
        let path = format!("/targets/{}/{}", namespace(service), service_name(service));
        pollers.spawn(async move {
            let mut conn = AdminConn::new(addr);
            let mut polls = 0u64;
            while Instant::now() < until {
                conn.get(&path).await?;
                polls += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok::<_, Error>(polls)
        });
    }
    let mut polls = 0;
    while let Some(joined) = pollers.join_next().await {
        polls += joined.map_err(|e| Error::Harness(format!("a calibration poller: {e}")))??;
    }
    let spent = procs::cpu_seconds(pid) - cpu - idle * began.elapsed().as_secs_f64();
    let per_poll_ms = (spent.max(0.0) / polls.max(1) as f64) * 1000.0;
    results.cpu_per_poll_ms = Some(per_poll_ms);
    log(format!(
        "wakegate idle: {:.1}% of a core; {polls} polls in {:.1} s cost it {:.3} ms CPU each",
        idle * 100.0,
        began.elapsed().as_secs_f64(),
        per_poll_ms
    ));
    Ok(())
}

/// Makes `plan.rate` changes a second for `plan.duration`, measuring each one a free poller
/// can take, then waits for the measurements under way.
async fn changes(
    plan: &Plan,
    api: &FakeApi,
    cluster: Cluster,
    wakegate: &mut Wakegate,
) -> Result<Phase, Error> {
    let pid = wakegate.server.pid();
    let cluster_shared = Arc::new(Mutex::new(cluster));
    let pool: Arc<Mutex<Vec<AdminConn>>> = Arc::new(Mutex::new(
        (0..POLLERS)
            .map(|_| AdminConn::new(wakegate.admin))
            .collect(),
    ));
    let observations: Arc<Mutex<Vec<Observation>>> = Arc::new(Mutex::new(Vec::new()));
    let polls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let mut rng = Rng(0x6b75_6265_2d73_6361);
    let interval = Duration::from_secs_f64(1.0 / plan.rate);
    let total = (plan.duration.as_secs_f64() * plan.rate).round() as u64;
    log(format!(
        "changes: {total} at {} a second for {:.0} s, each measured while a poller is free \
         ({POLLERS} pollers)",
        plan.rate,
        plan.duration.as_secs_f64()
    ));

    let cpu_before = procs::cpu_seconds(pid);
    let began = Instant::now();
    let mut samples = vec![Sample {
        at: Duration::ZERO,
        cpu_s: 0.0,
        rss_mib: wakegate.server.rss_mib("VmRSS"),
    }];
    let mut next_sample = began + Duration::from_secs(1);
    let (mut added, mut removed) = (0u64, 0u64);
    let mut applied = 0u64;
    for k in 0..total {
        let due = began + interval.mul_f64(k as f64);
        tokio::time::sleep_until(due.into()).await;
        let conn = pool.lock().expect("not poisoned").pop();
        let made = change(
            &mut cluster_shared.lock().expect("not poisoned"),
            &mut rng,
            api,
            conn.is_some(),
        );
        let at = Instant::now();
        applied += 1;
        if made.added {
            added += 1;
        } else {
            removed += 1;
        }
        if let Some(mut conn) = conn {
            let path = format!(
                "/targets/{}/{}",
                namespace(made.service),
                service_name(made.service)
            );
            let (pool, observations, cluster, polls) = (
                pool.clone(),
                observations.clone(),
                cluster_shared.clone(),
                polls.clone(),
            );
            let limit = plan.observe_limit;
            tasks.spawn(async move {
                let result = observe(&mut conn, &path, &made.ip, made.added, at, limit).await;
                pool.lock().expect("not poisoned").push(conn);
                let (seen, n) = result?;
                polls.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                let mut cluster = cluster.lock().expect("not poisoned");
                if made.added
                    && matches!(seen, Seen::After(_))
                    && let Some(a) = cluster.slices[made.slice]
                        .iter_mut()
                        .find(|a| a.ip == made.ip)
                {
                    a.confirmed = true;
                }
                observations
                    .lock()
                    .expect("not poisoned")
                    .push(Observation {
                        at: at - began,
                        added: made.added,
                        seen,
                    });
                Ok::<_, Error>(())
            });
        }
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(1);
            wakegate.server.check_running()?;
            samples.push(Sample {
                at: began.elapsed(),
                cpu_s: procs::cpu_seconds(pid) - cpu_before,
                rss_mib: wakegate.server.rss_mib("VmRSS"),
            });
            let seen = observations.lock().expect("not poisoned").len();
            progress(format!(
                "changes: {:.0} s, {applied} made, {seen} measured so far, wakegate {:.0}% CPU, \
                 {:.1} MiB",
                began.elapsed().as_secs_f64(),
                100.0 * (samples[samples.len() - 1].cpu_s - samples[samples.len() - 2].cpu_s)
                    / (samples[samples.len() - 1].at - samples[samples.len() - 2].at).as_secs_f64(),
                samples[samples.len() - 1].rss_mib,
            ));
        }
    }
    let driving = began.elapsed();
    progress_end();
    let under_way = POLLERS - pool.lock().expect("not poisoned").len();
    if under_way > 0 {
        log(format!(
            "waiting for the {under_way} measurement(s) under way (each at most {:?})",
            plan.observe_limit
        ));
    }
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(|e| Error::Harness(format!("a measurement: {e}")))??;
    }
    let window = began.elapsed();
    let cpu_s = procs::cpu_seconds(pid) - cpu_before;
    samples.push(Sample {
        at: window,
        cpu_s,
        rss_mib: wakegate.server.rss_mib("VmRSS"),
    });
    let mut observations = std::mem::take(&mut *observations.lock().expect("not poisoned"));
    observations.sort_by_key(|o| o.at);
    Ok(Phase {
        applied,
        added,
        removed,
        driving,
        window,
        cpu_s,
        polls: polls.load(std::sync::atomic::Ordering::Relaxed),
        observations,
        samples,
    })
}

fn write_report(
    plan: &Plan,
    machine: &Machine,
    r: &Results,
    settings: &Settings,
) -> Result<PathBuf, Error> {
    let secs =
        |d: Option<Duration>| d.map_or("—".into(), |d| format!("{:.2} s", d.as_secs_f64()));
    let mib = |v: f64| format!("{v:.1} MiB");
    let mut table = Table::new(&["figure", "value", "requirement"]);
    table.row(vec![
        "time to the initial sync (spawn → every target listed with all its endpoints)".into(),
        match r.synced {
            Some(d) => format!("{:.2} s", d.as_secs_f64()),
            None => format!(
                "not within {:.0} s: {} of {} targets listed, {} with all their endpoints",
                plan.sync_timeout.as_secs_f64(),
                r.listed.0,
                plan.services,
                r.listed.1
            ),
        },
        "—".into(),
    ]);
    table.row(vec![
        "… of which: proxy port listening; `/readyz` 200".into(),
        format!("{}; {}", secs(r.listening), secs(r.ready)),
        "—".into(),
    ]);
    table.row(vec![
        if r.synced.is_some() {
            "wakegate CPU until then"
        } else {
            "wakegate CPU until the sync wait gave up"
        }
        .into(),
        format!("{:.2} s", r.sync_cpu_s),
        "—".into(),
    ]);
    let delay_ms = |v: f64| {
        if v.is_finite() {
            report::ms(v)
        } else {
            format!("> {:.0} s (not seen)", plan.observe_limit.as_secs_f64())
        }
    };
    let mut delays = json!(null);
    let mut per_second = Vec::new();
    if let Some(p) = &r.phase {
        let sorted = p.sorted_ms();
        let q = |q: f64| report::rank(&sorted, q);
        table.row(vec![
            "change → routing table: p50 / p90 / p99 / max".into(),
            format!(
                "{} / {} / {} / {}",
                delay_ms(q(0.5)),
                delay_ms(q(0.9)),
                delay_ms(q(0.99)),
                delay_ms(q(1.0))
            ),
            format!(
                "p99 ≤ 50 ms: {}",
                if q(0.99) <= 50.0 { "met" } else { "not met" }
            ),
        ]);
        table.row(vec![
            "changes measured (of those made); not seen in time".into(),
            format!(
                "{} of {} ({:.0}%); {}",
                p.measured(),
                p.applied,
                100.0 * p.measured() as f64 / p.applied.max(1) as f64,
                p.not_seen()
            ),
            "—".into(),
        ]);
        table.row(vec![
            "changes made per second".into(),
            format!(
                "{:.1} ({} in {:.1} s: {} added, {} removed)",
                p.applied as f64 / p.driving.as_secs_f64(),
                p.applied,
                p.driving.as_secs_f64(),
                p.added,
                p.removed
            ),
            format!("{}", plan.rate),
        ]);
        let idle = r.idle_cpu_per_s.unwrap_or(0.0);
        let per_poll = r.cpu_per_poll_ms.unwrap_or(0.0) / 1000.0;
        let net = p.cpu_s - idle * p.window.as_secs_f64() - per_poll * p.polls as f64;
        table.row(vec![
            "wakegate CPU per change: all / net of idle and polling".into(),
            format!(
                "{:.2} ms / {:.2} ms ({:.2} CPU s in {:.1} s, {:.0}% of a core)",
                1000.0 * p.cpu_s / p.applied.max(1) as f64,
                1000.0 * net.max(0.0) / p.applied.max(1) as f64,
                p.cpu_s,
                p.window.as_secs_f64(),
                100.0 * p.cpu_s / p.window.as_secs_f64()
            ),
            "measured".into(),
        ]);
        table.row(vec![
            "… idle CPU; polls during the changes, CPU per poll".into(),
            format!(
                "{:.1}% of a core; {} polls, {:.3} ms each",
                idle * 100.0,
                p.polls,
                per_poll * 1000.0
            ),
            "—".into(),
        ]);
        delays = json!({
            "p50_ms": finite(q(0.5)),
            "p90_ms": finite(q(0.9)),
            "p99_ms": finite(q(0.99)),
            "max_ms": finite(q(1.0)),
            "measured": p.measured(),
            "not_seen": p.not_seen(),
            "changes": p.observations.iter().map(|o| json!({
                "at_s": o.at.as_secs_f64(),
                "added": o.added,
                "delay_ms": match o.seen { Seen::After(d) => Some(d.as_secs_f64() * 1000.0), Seen::NotWithin => None },
            })).collect::<Vec<_>>(),
        });
        let mut by_second: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
        for o in &p.observations {
            if let Seen::After(d) = o.seen {
                by_second
                    .entry(o.at.as_secs())
                    .or_default()
                    .push(d.as_secs_f64() * 1000.0);
            }
        }
        for (second, mut v) in by_second {
            v.sort_by(f64::total_cmp);
            per_second.push((second as f64 + 0.5, report::rank(&v, 0.5), v[v.len() - 1]));
        }
    }
    table.row(vec![
        "wakegate peak RSS (VmHWM)".into(),
        mib(r.peak_rss_mib),
        format!(
            "≤ 150 MiB: {}",
            if r.peak_rss_mib <= 150.0 {
                "met"
            } else {
                "not met"
            }
        ),
    ]);
    table.row(vec![
        if r.synced.is_some() {
            "wakegate RSS after the sync; at the end"
        } else {
            "wakegate RSS when the sync wait gave up; at the end"
        }
        .into(),
        format!("{}; {}", mib(r.rss_synced_mib), mib(r.rss_end_mib)),
        "—".into(),
    ]);

    let md = format!(
        "# kube-scale: {} Services, {} EndpointSlices, {} endpoint changes a second\n\n{}\n\n\
         An in-process Kubernetes API double holds {} Services annotated \
         `wakegate.io/enabled: \"true\"` (port `http`) in {NAMESPACES} namespaces, {} \
         EndpointSlices each with {INITIAL_PER_SLICE} ready addresses on 10.x (never \
         connected to), and no Deployments; the release wakegate watches every namespace \
         (`[kubernetes]`, `autoscaler = \"external\"` so that nothing scales the missing \
         Deployments). Once every target is listed in `/targets` with all its endpoints, \
         {} changes a second for {:.0} s, each adding a fresh ready address to one slice of \
         a random Service or removing one (1 to {MAX_PER_SLICE} per slice). A change is \
         measured when one of {POLLERS} pollers is free: it polls \
         `/targets/{{namespace}}/{{name}}` on a keep-alive connection every millisecond \
         (after {} ms, every 5% of the time elapsed) until the address appears or is gone; \
         the delay runs from the change to the answer that shows it. CPU is wakegate's user + \
         system time from the first change to the last measurement's end; net of its idle \
         rate and of the polls at the cost measured beforehand without changes. Everything \
         runs on loopback on the same machine.\n\n{}",
        plan.services,
        plan.slices(),
        plan.rate,
        machine.markdown(),
        plan.services,
        plan.per_service,
        plan.rate,
        plan.duration.as_secs_f64(),
        FAST_POLLING.as_millis(),
        table.markdown()
    );
    let phase = r.phase.as_ref();
    let data = json!({
        "scenario": "kube-scale",
        "machine": machine.json(),
        "settings": {
            "services": plan.services,
            "namespaces": NAMESPACES,
            "slices_per_service": plan.per_service,
            "addresses_per_slice": INITIAL_PER_SLICE,
            "changes_per_second": plan.rate,
            "duration_s": plan.duration.as_secs_f64(),
            "sync_timeout_s": plan.sync_timeout.as_secs_f64(),
            "pollers": POLLERS,
            "quick": settings.quick,
        },
        "sync": {
            "listening_s": r.listening.map(|d| d.as_secs_f64()),
            "readyz_s": r.ready.map(|d| d.as_secs_f64()),
            "synced_s": r.synced.map(|d| d.as_secs_f64()),
            "listed": r.listed.0,
            "complete": r.listed.1,
            "cpu_s": r.sync_cpu_s,
            "rss_mib": r.rss_synced_mib,
        },
        "idle_cpu_per_s": r.idle_cpu_per_s,
        "cpu_per_poll_ms": r.cpu_per_poll_ms,
        "changes": phase.map(|p| json!({
            "applied": p.applied,
            "added": p.added,
            "removed": p.removed,
            "driving_s": p.driving.as_secs_f64(),
            "per_second": p.applied as f64 / p.driving.as_secs_f64(),
            "window_s": p.window.as_secs_f64(),
            "cpu_s": p.cpu_s,
            "polls": p.polls,
            "samples": p.samples.iter().map(|s| json!({
                "at_s": s.at.as_secs_f64(), "cpu_s": s.cpu_s, "rss_mib": s.rss_mib,
            })).collect::<Vec<_>>(),
        })),
        "delays": delays,
        "peak_rss_mib": r.peak_rss_mib,
        "rss_end_mib": r.rss_end_mib,
    });
    let samples = phase.map_or(&[][..], |p| &p.samples[..]);
    let cpu_percent: Vec<(f64, f64)> = samples
        .windows(2)
        .map(|w| {
            let dt = (w[1].at - w[0].at).as_secs_f64().max(1e-3);
            (
                w[1].at.as_secs_f64(),
                100.0 * (w[1].cpu_s - w[0].cpu_s) / dt,
            )
        })
        .collect();
    let panels = [
        Panel {
            y_label: "delay (ms)",
            series: vec![
                report::series(
                    "median of the changes made that second",
                    0,
                    per_second.iter().map(|&(x, p50, _)| (x, p50)).collect(),
                ),
                report::series(
                    "max",
                    1,
                    per_second.iter().map(|&(x, _, max)| (x, max)).collect(),
                ),
            ],
        },
        Panel {
            y_label: "wakegate",
            series: vec![
                report::series("CPU (% of a core)", 2, cpu_percent),
                report::series(
                    "RSS (MiB)",
                    3,
                    samples
                        .iter()
                        .map(|s| (s.at.as_secs_f64(), s.rss_mib))
                        .collect(),
                ),
            ],
        },
    ];
    report::write(
        &settings.out,
        "kube-scale",
        &md,
        data,
        "kube-scale: delay from an endpoint change to wakegate's routing table",
        "seconds into the changes",
        &panels,
    )
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}
