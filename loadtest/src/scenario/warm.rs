//! `warm`: the same upstream reached directly, through nginx, HAProxy and wakegate, closed loop,
//! interleaved rounds: throughput, latency, each proxy's CPU time per 100k requests and peak
//! memory, and wakegate's ratios to nginx and HAProxy.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::json;
use wakegate::plot::Panel;

use super::{LOGGED, Second, Settings, Stand, log};
use crate::Error;
use crate::load::{self, Plan};
use crate::procs::WorkDir;
use crate::report::{self, Machine, Table, median_where};
use crate::stand::{self, CONNECTIONS};

struct Round {
    round: usize,
    path: &'static str,
    rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    errors: u64,
    error_kinds: BTreeMap<String, u64>,
    /// CPU seconds of the path's server per 100,000 successful requests.
    cpu_per_100k: f64,
}

/// One figure of a round.
type Field = fn(&Round) -> f64;

/// (name, value of a round, how to show it, which way is better)
type Metric = (
    &'static str,
    fn(&Round) -> f64,
    fn(f64) -> String,
    &'static str,
);

pub async fn run(settings: &Settings) -> Result<PathBuf, Error> {
    let nginx = stand::nginx_version();
    let machine = Machine::now(nginx.clone());
    if nginx.is_none() {
        log(stand::NO_NGINX);
    }
    if machine.haproxy.is_none() {
        log(stand::NO_HAPROXY);
    }
    let duration = settings.pick(Duration::from_secs(10), Duration::from_secs(2));
    let warmup = settings.pick(Duration::from_secs(2), Duration::from_millis(500));
    let probe = settings.pick(Duration::from_secs(3), Duration::from_secs(1));
    let work = WorkDir::new()?;
    let mut stand = Stand::start(
        &work,
        settings,
        nginx.is_some(),
        machine.haproxy.is_some(),
        Second::AccessLog,
        probe,
    )
    .await?;

    for (name, server) in stand.paths() {
        let mut plan = Plan::new(server.addr, "loadtest", CONNECTIONS, warmup);
        plan.label = format!("warm-up {name:<9}");
        load::run(&plan).await;
    }
    let mut rounds = Vec::new();
    let mut latency: BTreeMap<&str, Histogram<u64>> = BTreeMap::new();
    for round in 1..=settings.rounds {
        for (name, server) in stand.paths_of_round(round) {
            let mut plan = Plan::new(server.addr, "loadtest", CONNECTIONS, duration);
            plan.label = format!("round {round}/{} {name:<9}", settings.rounds);
            let cpu_before = server.cpu_seconds();
            let outcome = load::run(&plan).await;
            let cpu = server.cpu_seconds() - cpu_before;
            stand::require_responses(name, &outcome)?;
            latency
                .entry(name)
                .or_insert_with(load::histogram)
                .add(&outcome.latency)
                .expect("same bounds");
            let row = Round {
                round,
                path: name,
                rps: outcome.rps(),
                p50: outcome.ms(0.5),
                p99: outcome.ms(0.99),
                p999: outcome.ms(0.999),
                errors: outcome.error_count(),
                error_kinds: outcome.errors.clone(),
                cpu_per_100k: cpu / outcome.ok as f64 * 100_000.0,
            };
            log(format!(
                "{name}: {:.0} req/s, p50 {}, p99 {}, errors: {}, CPU {:.3} s per 100k",
                row.rps,
                report::ms(row.p50),
                report::ms(row.p99),
                outcome.error_summary(),
                row.cpu_per_100k
            ));
            rounds.push(row);
        }
        stand.check_running()?;
    }

    let paths: Vec<(&'static str, f64)> = stand
        .paths()
        .into_iter()
        .map(|(name, server)| (name, server.peak_rss_mib()))
        .collect();
    let med = |path: &str, f: fn(&Round) -> f64| median_where(&rounds, |r| r.path == path, f);
    let peers = stand.peers();
    let mut header = vec![
        "path",
        "req/s",
        "p50",
        "p99",
        "p99.9",
        "errors",
        "CPU s per 100k req",
        "peak RSS",
    ];
    let versus: Vec<String> = peers.iter().map(|p| format!("req/s vs {p}")).collect();
    header.extend(versus.iter().map(String::as_str));
    let mut table = Table::new(&header);
    let mut medians = serde_json::Map::new();
    for (path, rss) in &paths {
        let errors: u64 = rounds
            .iter()
            .filter(|r| r.path == *path)
            .map(|r| r.errors)
            .sum();
        let m = json!({
            "rps": med(path, |r| r.rps),
            "p50_ms": med(path, |r| r.p50),
            "p99_ms": med(path, |r| r.p99),
            "p99_9_ms": med(path, |r| r.p999),
            "errors": errors,
            "cpu_s_per_100k": med(path, |r| r.cpu_per_100k),
            "peak_rss_mib": rss,
        });
        let mut row = vec![
            (*path).into(),
            report::int(med(path, |r| r.rps)),
            report::ms(med(path, |r| r.p50)),
            report::ms(med(path, |r| r.p99)),
            report::ms(med(path, |r| r.p999)),
            errors.to_string(),
            format!("{:.3}", med(path, |r| r.cpu_per_100k)),
            format!("{rss:.1} MiB"),
        ];
        row.extend(
            peers
                .iter()
                .map(|peer| report::ratio(med(path, |r| r.rps) / med(peer, |r| r.rps))),
        );
        table.row(row);
        medians.insert((*path).into(), m);
    }

    let rss = |path: &str| {
        paths
            .iter()
            .find(|(p, _)| *p == path)
            .map_or(f64::NAN, |(_, r)| *r)
    };
    let metrics: [Metric; 5] = [
        ("req/s", |r| r.rps, report::int, "higher is better"),
        ("p50 latency", |r| r.p50, report::ms, "lower is better"),
        ("p99 latency", |r| r.p99, report::ms, "lower is better"),
        ("p99.9 latency", |r| r.p999, report::ms, "lower is better"),
        (
            "CPU s per 100k requests",
            |r| r.cpu_per_100k,
            |v| format!("{v:.3} s"),
            "lower is better",
        ),
    ];
    // wakegate against each peer: the medians side by side, then the ratios.
    let mut header = vec!["metric".to_owned(), "wakegate".to_owned()];
    header.extend(peers.iter().map(|p| (*p).to_owned()));
    header.extend(peers.iter().map(|p| format!("wakegate / {p}")));
    header.push("better".into());
    let mut ratios = Table::new(&header.iter().map(String::as_str).collect::<Vec<_>>());
    let mut ratio_json: BTreeMap<&str, serde_json::Map<String, serde_json::Value>> =
        BTreeMap::new();
    let mut compare = |metric: &str, value: &dyn Fn(&str) -> f64, show: &dyn Fn(f64) -> String| {
        let w = value("wakegate");
        let mut row = vec![metric.to_owned(), show(w)];
        row.extend(peers.iter().map(|p| show(value(p))));
        for peer in &peers {
            row.push(report::ratio(w / value(peer)));
            ratio_json
                .entry(peer)
                .or_default()
                .insert(metric.into(), json!(w / value(peer)));
        }
        row
    };
    for (metric, f, show, better) in metrics {
        let mut row = compare(metric, &|path| med(path, f), &show);
        row.push(better.into());
        ratios.row(row);
    }
    let mut row = compare("peak RSS", &rss, &|v| format!("{v:.1} MiB"));
    row.push("lower is better".into());
    ratios.row(row);
    let targets = targets(&peers, &med);

    let mut per_round = Table::new(&[
        "round",
        "path",
        "req/s",
        "p50",
        "p99",
        "p99.9",
        "errors",
        "CPU s per 100k req",
    ]);
    for r in &rounds {
        per_round.row(vec![
            r.round.to_string(),
            r.path.into(),
            report::int(r.rps),
            report::ms(r.p50),
            report::ms(r.p99),
            report::ms(r.p999),
            r.errors.to_string(),
            format!("{:.3}", r.cpu_per_100k),
        ]);
    }

    let order = paths.iter().map(|(p, _)| *p).collect::<Vec<_>>().join(", ");
    let mut md = format!(
        "# warm: direct, through nginx, through wakegate\n\n{}\n\n{}\n\n\
         Load: {CONNECTIONS} connections, HTTP/1.1, closed loop, {} s per run after a {} s \
         warm-up of each path; {} round(s), interleaved ({order}; the last two swap places \
         every other round); medians over the rounds. \
         nginx: {threads} workers, keep-alive upstream, `reuseport`, no access log; HAProxy: \
         `nbthread {threads}`, `http-reuse always`, no log; wakegate: one `upstream` target, \
         `hosts = [\"*\"]`, `RUST_LOG=warn`, {threads} workers. CPU: user + system time from \
         /proc/PID/stat of the path's server (nginx: master and workers; direct: the upstream) \
         over each run, per 100,000 successful responses. Peak RSS: `VmHWM` (nginx: summed \
         over its workers; direct: the upstream's) at the end.\n\n{}",
        machine.markdown(),
        stand.upstream.describe(),
        duration.as_secs_f64(),
        warmup.as_secs_f64(),
        settings.rounds,
        table.markdown(),
        threads = stand::threads(),
    );
    if peers.is_empty() {
        md.push_str(&format!("\n{}.\n{}.\n", stand::NO_NGINX, stand::NO_HAPROXY));
    } else {
        md.push_str(&format!(
            "\nwakegate against {} (medians):\n\n{}\n{}",
            peers.join(" and "),
            ratios.markdown(),
            targets.0
        ));
    }
    let access_log = access_log_cost(&stand, &rounds)?;
    md.push_str(&access_log.0);
    md.push_str(&format!("\nEach round:\n\n{}", per_round.markdown()));

    let data = json!({
        "scenario": "warm",
        "machine": machine.json(),
        "settings": {
            "connections": CONNECTIONS,
            "duration_s": duration.as_secs_f64(),
            "warmup_s": warmup.as_secs_f64(),
            "rounds": settings.rounds,
            "nginx_workers": stand::threads(),
            "haproxy_threads": stand::threads(),
        },
        "upstream": {
            "chosen": stand.upstream.server.name,
            "probes_rps": stand.upstream.probes.iter().cloned().collect::<BTreeMap<_, _>>(),
        },
        "medians": medians,
        "wakegate_vs_nginx": ratio_json.get("nginx"),
        "wakegate_vs_haproxy": ratio_json.get(super::HAPROXY),
        "targets": targets.1,
        "access_log": access_log.1,
        "rounds": rounds.iter().map(|r| json!({
            "round": r.round,
            "path": r.path,
            "rps": r.rps,
            "p50_ms": r.p50,
            "p99_ms": r.p99,
            "p99_9_ms": r.p999,
            "errors": r.error_kinds,
            "cpu_s_per_100k": r.cpu_per_100k,
        })).collect::<Vec<_>>(),
    });
    let panels = [Panel {
        y_label: "latency (ms)",
        series: latency
            .iter()
            .enumerate()
            .map(|(i, (path, h))| report::series(*path, i, report::latency_curve(h, 3.0)))
            .collect(),
    }];
    report::write(
        &settings.out,
        "warm",
        &md,
        data,
        "warm: latency by percentile, every round merged (closed loop)",
        "percentile (0 = p0, 1 = p90, 2 = p99, 3 = p99.9)",
        &panels,
    )
}

/// The warm path's targets, from the medians: req/s at least the better of the peers', CPU per
/// request at most nginx's; as markdown and JSON.
fn targets(peers: &[&str], med: &dyn Fn(&str, Field) -> f64) -> (String, serde_json::Value) {
    let rps = |path: &str| med(path, |r| r.rps);
    let cpu = |path: &str| med(path, |r| r.cpu_per_100k);
    let mut lines = String::new();
    let mut json = serde_json::Map::new();
    if let Some(best) = peers
        .iter()
        .copied()
        .max_by(|a, b| rps(a).total_cmp(&rps(b)))
    {
        let met = rps("wakegate") >= rps(best);
        lines.push_str(&format!(
            "- req/s at least the better peer's ({best}, {}): wakegate {}, {}: **{}**\n",
            report::int(rps(best)),
            report::int(rps("wakegate")),
            report::ratio(rps("wakegate") / rps(best)),
            report::verdict(met)
        ));
        json.insert("rps_at_least_best_peer".into(), json!(met));
    }
    if peers.contains(&"nginx") {
        let met = cpu("wakegate") <= cpu("nginx");
        lines.push_str(&format!(
            "- CPU per request at most nginx's ({:.3} s per 100k): wakegate {:.3}, {}: **{}**\n",
            cpu("nginx"),
            cpu("wakegate"),
            report::ratio(cpu("wakegate") / cpu("nginx")),
            report::verdict(met)
        ));
        json.insert("cpu_at_most_nginx".into(), json!(met));
    }
    (
        format!("\nTargets, on the medians:\n\n{lines}"),
        serde_json::Value::Object(json),
    )
}

/// What the access log costs: wakegate with it against wakegate without, round by round (each
/// pair ran back to back), as markdown and JSON. Fails if the log stayed empty.
fn access_log_cost(stand: &Stand, rounds: &[Round]) -> Result<(String, serde_json::Value), Error> {
    let Some(path) = &stand.access_log else {
        return Ok((String::new(), serde_json::Value::Null));
    };
    let lines = count_lines(path)?;
    if lines == 0 {
        return Err(Error::Harness(format!(
            "the access log {} has {lines} lines after the runs with it on",
            path.display()
        )));
    }
    let bytes = std::fs::metadata(path).map_or(0, |m| m.len());
    let pairs: Vec<(f64, f64)> = rounds
        .iter()
        .filter(|r| r.path == LOGGED)
        .filter_map(|logged| {
            let plain = rounds
                .iter()
                .find(|r| r.path == "wakegate" && r.round == logged.round)?;
            Some((
                logged.rps / plain.rps,
                logged.cpu_per_100k / plain.cpu_per_100k,
            ))
        })
        .collect();
    let (rps, cpu) = (
        report::median_where(&pairs, |_| true, |p| p.0),
        report::median_where(&pairs, |_| true, |p| p.1),
    );
    let md = format!(
        "\nThe access log's cost: wakegate with `[access_log]` (JSON lines to a file) against \
         wakegate without, the two run back to back in each round; medians of the rounds' \
         ratios. req/s with it: {} of without ({:+.1} %); CPU per 100k requests: {} ({:+.1} %). \
         The log got {lines} lines, {:.0} bytes each.\n",
        report::ratio(rps),
        (rps - 1.0) * 100.0,
        report::ratio(cpu),
        (cpu - 1.0) * 100.0,
        bytes as f64 / lines as f64,
    );
    let json = json!({
        "rps_ratio": rps,
        "cpu_per_100k_ratio": cpu,
        "lines": lines,
        "bytes": bytes,
        "rounds": pairs.iter().map(|(r, c)| json!({"rps_ratio": r, "cpu_ratio": c})).collect::<Vec<_>>(),
    });
    Ok((md, json))
}

/// Lines in the file at `path`, read in blocks.
fn count_lines(path: &std::path::Path) -> Result<u64, Error> {
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let mut block = vec![0; 1 << 20];
    let mut lines = 0;
    loop {
        let n = file
            .read(&mut block)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        if n == 0 {
            return Ok(lines);
        }
        lines += block[..n].iter().filter(|b| **b == b'\n').count() as u64;
    }
}
