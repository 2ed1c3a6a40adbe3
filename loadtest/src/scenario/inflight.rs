//! `inflight`: N requests in flight at once through a proxy to an upstream that answers each
//! after 3 s, each on its own connection (all opened first, then every request released
//! together): each proxy's resident memory with the connections open, its peak while the
//! requests are in flight, and the difference per request. wakegate (a fixed upstream), nginx
//! and HAProxy (when installed), one after the other, against the same demo backend.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::json;
use wakegate::plot::Panel;

use super::{Settings, log};
use crate::Error;
use crate::load;
use crate::procs::{self, WorkDir};
use crate::report::{self, Machine, Table};
use crate::stand::{self, Server, Wakegate};

/// How long the upstream takes to answer each request.
const UPSTREAM_MS: u64 = 3_000;

struct Path {
    name: String,
    requests: usize,
    ok: u64,
    outcomes: BTreeMap<String, u64>,
    connect_errors: BTreeMap<String, u64>,
    rss_open_mib: f64,
    peak_rss_mib: f64,
    rss: Vec<(f64, f64)>,
}

impl Path {
    /// What one request in flight added to the memory of its open connection.
    fn kib_per_request(&self) -> f64 {
        (self.peak_rss_mib - self.rss_open_mib) * 1024.0 / self.requests as f64
    }
}

pub async fn run(settings: &Settings) -> Result<PathBuf, Error> {
    let machine = Machine::now(stand::nginx_version());
    let requests = settings.count(4_000, 500);
    // A descriptor per client connection here, and in the proxy one each way.
    // HAProxy asks for two per `maxconn` (9,000) and some.
    let nofile = procs::raise_nofile(((3 * requests).max(18_100) + 1_024) as u64);
    log(format!(
        "open files limit (inherited by the proxies): {nofile}"
    ));
    let work = WorkDir::new()?;
    let upstream = stand::start_demo(&work, &settings.wakegate, "upstream")?;
    let mut paths = Vec::new();

    let mut wakegate = Wakegate::start(
        &work,
        &settings.wakegate,
        "wakegate-inflight",
        "",
        &format!(
            "[[target]]\nname = \"inflight\"\nhosts = [\"*\"]\nupstream = \"{}\"\n",
            upstream.addr
        ),
    )?;
    paths.push(inflight("wakegate", &mut wakegate.server, requests).await?);
    drop(wakegate);
    match stand::nginx_version() {
        Some(_) => {
            let mut nginx = stand::start_nginx_proxy(&work, upstream.addr)?;
            paths.push(inflight("nginx", &mut nginx, requests).await?);
        }
        None => log(stand::NO_NGINX),
    }
    let haproxy_version = stand::haproxy_version();
    match &haproxy_version {
        Some(_) => {
            let mut haproxy = stand::start_haproxy_proxy(&work, upstream.addr)?;
            paths.push(inflight("HAProxy", &mut haproxy, requests).await?);
        }
        None => log(stand::NO_HAPROXY),
    }

    let mut table = Table::new(&[
        "proxy",
        "requests",
        "200",
        "other answers / errors",
        "RSS, connections open",
        "peak RSS, requests in flight",
        "per request in flight",
    ]);
    for p in &paths {
        let mut others = p.outcomes.clone();
        others.remove("200");
        for (kind, n) in &p.connect_errors {
            *others.entry(format!("{kind} (connecting)")).or_default() += n;
        }
        table.row(vec![
            p.name.clone(),
            p.requests.to_string(),
            p.ok.to_string(),
            load::summarize(&others),
            format!("{:.1} MiB", p.rss_open_mib),
            format!("{:.1} MiB", p.peak_rss_mib),
            format!("{:.1} KiB", p.kib_per_request()),
        ]);
    }
    let md = format!(
        "# inflight: {requests} requests in flight through each proxy\n\n{}\n\
         HAProxy: {}\n\n{}\n\n\
         The upstream is the demo backend answering `GET /sleep?ms={UPSTREAM_MS}`. \
         {requests} HTTP/1.1 connections are opened to the proxy first ({connecting} at a \
         time), then every connection sends its request at the same instant; each proxy opens \
         its own upstream connections. RSS is the proxy's (nginx: its workers' summed) \
         `VmRSS` with the connections open before the release, and its peak `VmHWM`; per \
         request = (peak − open) / requests. wakegate forwards to a fixed `upstream`; nginx \
         and HAProxy as `loadtest` configures them for `warm`.\n",
        machine.markdown(),
        haproxy_version.as_deref().unwrap_or("not installed"),
        table.markdown(),
        connecting = load::CONNECTING
    );
    let data = json!({
        "scenario": "inflight",
        "machine": machine.json(),
        "haproxy": haproxy_version,
        "settings": { "requests": requests, "upstream_ms": UPSTREAM_MS, "nofile": nofile },
        "paths": paths.iter().map(|p| json!({
            "proxy": p.name,
            "requests": p.requests,
            "ok": p.ok,
            "outcomes": p.outcomes,
            "connect_errors": p.connect_errors,
            "rss_open_mib": p.rss_open_mib,
            "peak_rss_mib": p.peak_rss_mib,
            "kib_per_request": p.kib_per_request(),
        })).collect::<Vec<_>>(),
    });
    let memory = paths
        .iter()
        .enumerate()
        .map(|(i, p)| report::series(p.name.clone(), i, p.rss.clone()))
        .collect();
    report::write(
        &settings.out,
        "inflight",
        &md,
        data,
        &format!("inflight: {requests} requests in flight through each proxy"),
        "ms since the requests were released",
        &[Panel {
            y_label: "proxy RSS (MiB)",
            series: memory,
        }],
    )
}

async fn inflight(name: &str, server: &mut Server, requests: usize) -> Result<Path, Error> {
    log(format!("{name}: {requests} requests in flight"));
    let pids = if server.workers_rss {
        procs::children(server.pid())
    } else {
        vec![server.pid()]
    };
    let released = load::all_at_once(
        server.addr,
        "inflight.loadtest",
        &format!("/sleep?ms={UPSTREAM_MS}"),
        requests,
        move || pids.iter().map(|&pid| procs::status_kb(pid, "VmRSS")).sum(),
    )
    .await;
    server.check_running()?;
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    for (_, outcome) in &released.finished {
        *outcomes.entry(outcome.clone()).or_default() += 1;
    }
    let ok = outcomes.get("200").copied().unwrap_or(0);
    log(format!("{name}: {ok} × 200 of {requests}"));
    Ok(Path {
        name: name.to_owned(),
        requests,
        ok,
        outcomes,
        connect_errors: released.connect_errors,
        rss_open_mib: released.rss_before_kib as f64 / 1024.0,
        peak_rss_mib: server.peak_rss_mib(),
        rss: released.rss,
    })
}
