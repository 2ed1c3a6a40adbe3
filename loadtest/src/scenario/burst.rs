//! `burst`: 10,000 requests arriving at once at a cold target, each on its own connection
//! (all opened first, then every request released together): how many get 200, what the others
//! get, how long until the last is answered, and wakegate's peak memory meanwhile. Once with a
//! hold queue large enough for all of them, once with the default `max_pending` of 1,000.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use wakegate::plot::Panel;

use super::{Settings, log};
use crate::Error;
use crate::load;
use crate::procs::{self, WorkDir};
use crate::report::{self, Machine, Table};
use crate::stand::{self, Wakegate};

const STARTUP_DELAY: &str = "200ms";

struct Variant {
    name: String,
    max_pending: usize,
    requests: usize,
    connect_errors: BTreeMap<String, u64>,
    /// Status code or error kind → count.
    outcomes: BTreeMap<String, u64>,
    ok: u64,
    first_ok: Option<Duration>,
    drained: Duration,
    p50_ms: f64,
    p99_ms: f64,
    rss_before_mib: f64,
    peak_rss_mib: f64,
    instances: serde_json::Value,
    cold_starts: serde_json::Value,
    /// (ms since release, responses so far: 200, other)
    completions: Vec<(f64, u64, u64)>,
    /// (ms since release, wakegate RSS MiB)
    rss: Vec<(f64, f64)>,
}

pub async fn run(settings: &Settings) -> Result<PathBuf, Error> {
    let machine = Machine::now(stand::nginx_version());
    let requests = settings.count(10_000, 1_000);
    // Each connection is a file descriptor here and one in wakegate (which inherits the
    // limit), where it may also open an upstream connection per request.
    let wanted = (2 * requests + 1_024) as u64;
    let nofile = procs::raise_nofile(wanted);
    log(format!(
        "open files limit (RLIMIT_NOFILE, inherited by wakegate): {nofile}{}",
        if nofile < (requests + 1_024) as u64 {
            " — too low for one descriptor per connection; expect `too many open files` errors"
        } else {
            ""
        }
    ));
    let work = WorkDir::new()?;
    let mut variants = Vec::new();
    for max_pending in [requests, requests / 10] {
        variants.push(burst(settings, &work, requests, max_pending).await?);
    }

    let mut table = Table::new(&[
        "max_pending",
        "requests",
        "200",
        "other answers / errors",
        "first 200 after",
        "p50 of 200s",
        "p99 of 200s",
        "last answer after",
        "wakegate peak RSS",
        "instances after",
    ]);
    for v in &variants {
        let mut others: BTreeMap<String, u64> = v.outcomes.clone();
        others.remove("200");
        for (kind, n) in &v.connect_errors {
            *others.entry(format!("{kind} (connecting)")).or_default() += n;
        }
        table.row(vec![
            v.name.clone(),
            v.requests.to_string(),
            v.ok.to_string(),
            load::summarize(&others),
            v.first_ok
                .map_or("—".into(), |d| report::ms(d.as_secs_f64() * 1000.0)),
            report::ms(v.p50_ms),
            report::ms(v.p99_ms),
            report::ms(v.drained.as_secs_f64() * 1000.0),
            format!("{:.1} MiB (idle {:.1})", v.peak_rss_mib, v.rss_before_mib),
            v.instances.to_string(),
        ]);
    }
    let md = format!(
        "# burst: {requests} concurrent requests at a cold target\n\n{}\n\n\
         A local target running the demo backend (`--startup-delay {STARTUP_DELAY}`, ready \
         check `tcp`, default scaling). {requests} HTTP/1.1 connections are opened to wakegate \
         first ({connecting} at a time), then every connection sends its `GET /` at the same \
         instant; times are from that instant. The requests are sent at once but wakegate \
         reads them one connection at a time: those it reads after the instance is ready are \
         forwarded without being held, so with a queue smaller than the burst more than \
         `max_pending` can succeed. Open files limit: {nofile} (raised with `setrlimit` \
         towards {wanted}, up to the hard limit; wakegate inherits it). Peak RSS is \
         wakegate's `VmHWM` (its instances not included), idle = `VmRSS` with the \
         connections open, before the burst.\n\n{}",
        machine.markdown(),
        table.markdown(),
        connecting = load::CONNECTING
    );
    let data = json!({
        "scenario": "burst",
        "machine": machine.json(),
        "settings": { "requests": requests, "startup_delay": STARTUP_DELAY, "nofile": nofile },
        "variants": variants.iter().map(|v| json!({
            "max_pending": v.max_pending,
            "requests": v.requests,
            "ok": v.ok,
            "outcomes": v.outcomes,
            "connect_errors": v.connect_errors,
            "first_ok_ms": v.first_ok.map(|d| d.as_secs_f64() * 1000.0),
            "drained_ms": v.drained.as_secs_f64() * 1000.0,
            "p50_ms": v.p50_ms,
            "p99_ms": v.p99_ms,
            "rss_before_mib": v.rss_before_mib,
            "peak_rss_mib": v.peak_rss_mib,
            "instances_after": v.instances,
            "cold_starts": v.cold_starts,
        })).collect::<Vec<_>>(),
    });
    let mut answered = Vec::new();
    let mut memory = Vec::new();
    for (i, v) in variants.iter().enumerate() {
        answered.push(report::series(
            format!("200, cap {}", v.max_pending),
            2 * i,
            v.completions.iter().map(|c| (c.0, c.1 as f64)).collect(),
        ));
        answered.push(report::series(
            format!("other, cap {}", v.max_pending),
            2 * i + 1,
            v.completions.iter().map(|c| (c.0, c.2 as f64)).collect(),
        ));
        memory.push(report::series(
            format!("cap {}", v.max_pending),
            2 * i,
            v.rss.clone(),
        ));
    }
    let panels = [
        Panel {
            y_label: "responses so far",
            series: answered,
        },
        Panel {
            y_label: "wakegate RSS (MiB)",
            series: memory,
        },
    ];
    report::write(
        &settings.out,
        "burst",
        &md,
        data,
        &format!(
            "burst: {requests} requests released at once at a cold target (cap = max_pending)"
        ),
        "ms since the requests were released",
        &panels,
    )
}

async fn burst(
    settings: &Settings,
    work: &WorkDir,
    requests: usize,
    max_pending: usize,
) -> Result<Variant, Error> {
    let name = format!("{max_pending}");
    log(format!(
        "burst of {requests} requests, max_pending = {max_pending}"
    ));
    let command = format!(
        "[{:?}, \"demo-backend\", \"--port\", \"{{port}}\", \"--startup-delay\", \"{STARTUP_DELAY}\"]",
        settings.wakegate.display().to_string()
    );
    let mut wakegate = Wakegate::start(
        work,
        &settings.wakegate,
        &format!("wakegate-burst-{max_pending}"),
        "",
        &format!(
            "[[target]]
name = \"burst\"
hosts = [\"*\"]
command = {command}
idle_timeout = \"5m\"
cold_start_timeout = \"30s\"
max_pending = {max_pending}
stop_grace = \"2s\"
"
        ),
    )?;
    wakegate
        .wait_state("burst", "cold", Duration::from_secs(5))
        .await?;
    let pid = wakegate.server.pid();

    let released = load::all_at_once(
        wakegate.server.addr,
        "burst.loadtest",
        "/",
        requests,
        move || procs::status_kb(pid, "VmRSS"),
    )
    .await;
    let (connect_errors, mut finished, rss) =
        (released.connect_errors, released.finished, released.rss);
    let rss_before_mib = released.rss_before_kib as f64 / 1024.0;
    wakegate.server.check_running()?;
    let peak_rss_mib = wakegate.server.peak_rss_mib();
    let target = wakegate.target("burst").await?;

    finished.sort_by_key(|(at, _)| *at);
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut latency = Vec::new();
    let mut completions = Vec::new();
    let (mut ok, mut other) = (0u64, 0u64);
    // A few hundred points are enough for the chart.
    let step = (finished.len() / 400).max(1);
    for (i, (at, outcome)) in finished.iter().enumerate() {
        if outcome == "200" {
            ok += 1;
            latency.push(at.as_secs_f64() * 1000.0);
        } else {
            other += 1;
        }
        *outcomes.entry(outcome.clone()).or_default() += 1;
        if i % step == 0 || i + 1 == finished.len() {
            completions.push((at.as_secs_f64() * 1000.0, ok, other));
        }
    }
    log(format!(
        "max_pending = {max_pending}: {ok} × 200; others: {}",
        load::summarize(
            &outcomes
                .iter()
                .filter(|(k, _)| *k != "200")
                .map(|(k, v)| (k.clone(), *v))
                .collect()
        )
    ));
    if ok == 0 {
        return Err(Error::Harness(format!(
            "burst with max_pending = {max_pending}: not one 200 ({})",
            load::summarize(&outcomes)
        )));
    }
    Ok(Variant {
        name,
        max_pending,
        requests,
        connect_errors,
        first_ok: finished.iter().find(|(_, o)| o == "200").map(|(at, _)| *at),
        drained: finished.last().map_or(Duration::ZERO, |(at, _)| *at),
        p50_ms: report::rank(&latency, 0.5),
        p99_ms: report::rank(&latency, 0.99),
        outcomes,
        ok,
        rss_before_mib,
        peak_rss_mib,
        instances: target["instances"].clone(),
        cold_starts: target["cold_starts"].clone(),
        completions,
        rss,
    })
}
