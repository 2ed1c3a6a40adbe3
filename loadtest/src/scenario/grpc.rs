//! `grpc`: h2c on both sides of the proxy. The demo backend's gRPC `Echo/Unary`, closed loop,
//! reached directly, through nginx (`grpc_pass`) and through wakegate (a fixed upstream with
//! `protocol = "h2c"`); then GETs that arrive over h2c and go on over HTTP/1.1 (nginx's
//! `proxy_pass`, wakegate's `protocol = "http1"`). Interleaved rounds: throughput, latency,
//! CPU time per 100k requests of each path's server and of the upstream, wakegate's ratios to
//! nginx.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::json;
use wakegate::plot::Panel;

use super::{Settings, Stand, log};
use crate::Error;
use crate::load::{self, Call, Plan, Protocol};
use crate::procs::WorkDir;
use crate::report::{self, Machine, Table, median_where};
use crate::stand::{self, Server, Upstream};

/// h2c connections of each run, and requests in flight on each: 64 at once, as `warm`'s 64
/// HTTP/1.1 connections, multiplexed as gRPC clients multiplex their calls.
const CONNECTIONS: usize = 16;
const STREAMS: usize = 4;

/// What the requests of a run are; each has a table of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Requests {
    /// gRPC unary calls: HTTP/2 to the upstream on every path.
    Grpc,
    /// GETs: the proxies forward them over HTTP/1.1.
    Get,
}

impl Requests {
    const ALL: [Requests; 2] = [Requests::Grpc, Requests::Get];

    fn key(self) -> &'static str {
        match self {
            Requests::Grpc => "grpc",
            Requests::Get => "get",
        }
    }

    /// The `:authority` of every request: it picks wakegate's target.
    fn host(self) -> &'static str {
        match self {
            Requests::Grpc => "grpc.loadtest",
            Requests::Get => "get.loadtest",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Requests::Grpc => "gRPC unary: h2c in, h2c out",
            Requests::Get => "GET: h2c in, HTTP/1.1 out",
        }
    }

    fn plan(self, server: &Server, duration: Duration, label: String) -> Plan {
        let mut plan = Plan::new(server.addr, self.host(), CONNECTIONS, duration);
        plan.protocol = Protocol::Http2;
        plan.streams = STREAMS;
        if self == Requests::Grpc {
            plan.grpc_echo();
        }
        plan.label = label;
        plan
    }
}

struct Round {
    round: usize,
    requests: Requests,
    path: &'static str,
    rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    errors: BTreeMap<String, u64>,
    /// CPU seconds of the path's server per 100,000 successful requests.
    cpu_per_100k: f64,
    /// The same for the upstream: what the backend spends, which depends on how it is spoken to.
    upstream_cpu_per_100k: f64,
}

pub async fn run(settings: &Settings) -> Result<PathBuf, Error> {
    let nginx = stand::nginx_version();
    let machine = Machine::now(nginx.clone());
    if nginx.is_none() {
        log(stand::NO_NGINX);
    }
    let duration = settings.pick(Duration::from_secs(10), Duration::from_secs(2));
    let warmup = settings.pick(Duration::from_secs(2), Duration::from_millis(500));
    let work = WorkDir::new()?;
    // The demo backend is the upstream: the static nginx of `warm` speaks no gRPC.
    let upstream = stand::start_demo(&work, &settings.wakegate, "demo backend")?;
    let addr = upstream.addr;
    let nginx_proxy = match nginx {
        Some(_) => Some(stand::start_nginx_h2c_proxy(&work, addr)?),
        None => None,
    };
    let wakegate = stand::Wakegate::start(
        &work,
        &settings.wakegate,
        "wakegate",
        "",
        &format!(
            "[[target]]\nname = \"grpc\"\nhosts = [\"{}\"]\nupstream = \"{addr}\"\nprotocol = \"h2c\"\n\n\
             [[target]]\nname = \"get\"\nhosts = [\"{}\"]\nupstream = \"{addr}\"\nprotocol = \"http1\"\n",
            Requests::Grpc.host(),
            Requests::Get.host(),
        ),
    )?;
    let mut stand = Stand {
        upstream: Upstream {
            server: upstream,
            probes: Vec::new(),
        },
        nginx: nginx_proxy,
        // HAProxy is compared on HTTP/1.1 (`warm`, `latency`, `inflight`), not here.
        haproxy: None,
        wakegate,
        second: None,
        access_log: None,
    };
    let message_bytes = match Requests::Grpc
        .plan(&stand.upstream.server, warmup, String::new())
        .call
    {
        Call::GrpcUnary(body) => body.len(),
        Call::Get => unreachable!("a gRPC plan"),
    };

    for requests in Requests::ALL {
        for (name, server) in stand.paths() {
            let label = format!("warm-up {:<4} {name:<9}", requests.key());
            load::run(&requests.plan(server, warmup, label)).await;
        }
    }
    let mut rounds = Vec::new();
    let mut latency: BTreeMap<(&str, &str), Histogram<u64>> = BTreeMap::new();
    for round in 1..=settings.rounds {
        for requests in Requests::ALL {
            for (name, server) in stand.paths() {
                let label = format!(
                    "round {round}/{} {:<4} {name:<9}",
                    settings.rounds,
                    requests.key()
                );
                let plan = requests.plan(server, duration, label);
                let upstream = &stand.upstream.server;
                let (cpu_before, upstream_before) = (server.cpu_seconds(), upstream.cpu_seconds());
                let outcome = load::run(&plan).await;
                let cpu = server.cpu_seconds() - cpu_before;
                let upstream_cpu = upstream.cpu_seconds() - upstream_before;
                stand::require_responses(&format!("{name} ({})", requests.key()), &outcome)?;
                latency
                    .entry((requests.key(), name))
                    .or_insert_with(load::histogram)
                    .add(&outcome.latency)
                    .expect("same bounds");
                let per_100k = |seconds: f64| seconds / outcome.ok as f64 * 100_000.0;
                let row = Round {
                    round,
                    requests,
                    path: name,
                    rps: outcome.rps(),
                    p50: outcome.ms(0.5),
                    p99: outcome.ms(0.99),
                    p999: outcome.ms(0.999),
                    errors: outcome.errors.clone(),
                    cpu_per_100k: per_100k(cpu),
                    upstream_cpu_per_100k: per_100k(upstream_cpu),
                };
                log(format!(
                    "{} {name}: {:.0} req/s, p50 {}, p99 {}, errors: {}, CPU {:.3} s per 100k \
                     (upstream {:.3} s)",
                    requests.key(),
                    row.rps,
                    report::ms(row.p50),
                    report::ms(row.p99),
                    outcome.error_summary(),
                    row.cpu_per_100k,
                    row.upstream_cpu_per_100k
                ));
                rounds.push(row);
            }
        }
        stand.check_running()?;
    }

    let paths: Vec<&'static str> = stand.paths().into_iter().map(|(name, _)| name).collect();
    let med = |requests: Requests, path: &str, f: fn(&Round) -> f64| {
        median_where(&rounds, |r| r.requests == requests && r.path == path, f)
    };
    let mut sections = String::new();
    let mut medians = serde_json::Map::new();
    let mut versus = serde_json::Map::new();
    for requests in Requests::ALL {
        let mut table = Table::new(&[
            "path",
            "req/s",
            "p50",
            "p99",
            "p99.9",
            "errors",
            "CPU s per 100k req",
            "upstream CPU s per 100k req",
            "req/s vs nginx",
            "CPU vs nginx",
        ]);
        let nginx_rps = med(requests, "nginx", |r| r.rps);
        let nginx_cpu = med(requests, "nginx", |r| r.cpu_per_100k);
        let mut by_path = serde_json::Map::new();
        for path in &paths {
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            for r in rounds
                .iter()
                .filter(|r| r.requests == requests && r.path == *path)
            {
                for (kind, n) in &r.errors {
                    *errors.entry(kind.clone()).or_default() += n;
                }
            }
            let m = |f: fn(&Round) -> f64| med(requests, path, f);
            table.row(vec![
                (*path).into(),
                report::int(m(|r| r.rps)),
                report::ms(m(|r| r.p50)),
                report::ms(m(|r| r.p99)),
                report::ms(m(|r| r.p999)),
                if errors.is_empty() {
                    "0".into()
                } else {
                    load::summarize(&errors)
                },
                format!("{:.3}", m(|r| r.cpu_per_100k)),
                format!("{:.3}", m(|r| r.upstream_cpu_per_100k)),
                report::ratio(m(|r| r.rps) / nginx_rps),
                report::ratio(m(|r| r.cpu_per_100k) / nginx_cpu),
            ]);
            by_path.insert(
                (*path).into(),
                json!({
                    "rps": m(|r| r.rps),
                    "p50_ms": m(|r| r.p50),
                    "p99_ms": m(|r| r.p99),
                    "p99_9_ms": m(|r| r.p999),
                    "errors": errors,
                    "cpu_s_per_100k": m(|r| r.cpu_per_100k),
                    "upstream_cpu_s_per_100k": m(|r| r.upstream_cpu_per_100k),
                }),
            );
        }
        medians.insert(requests.key().into(), by_path.into());

        let about = match requests {
            Requests::Grpc => format!(
                "Each request: `POST {}` with `content-type: application/grpc`, `te: trailers` and \
                 one `EchoRequest` ({message_bytes} bytes with its gRPC length prefix); a success \
                 is status 200 with `grpc-status: 0`, any other gRPC status counts as an error \
                 by its code (`grpc-status 14`). HTTP/2 to the upstream on every path: nginx's \
                 `grpc_pass`, wakegate's `protocol = \"h2c\"` target.",
                load::ECHO_UNARY
            ),
            Requests::Get => "Each request: `GET /` (the demo backend's hello) over h2c; the \
                              proxies forward it over HTTP/1.1 with keep-alive (nginx's \
                              `proxy_pass` with `proxy_http_version 1.1`, wakegate's \
                              `protocol = \"http1\"` target); direct is h2c to the backend."
                .into(),
        };
        sections.push_str(&format!(
            "\n## {}\n\n{about}\n\n{}",
            requests.title(),
            table.markdown()
        ));
        if stand.nginx.is_some() {
            let ratio =
                |f: fn(&Round) -> f64| med(requests, "wakegate", f) / med(requests, "nginx", f);
            sections.push_str(&format!(
                "\nwakegate / nginx: {}× the req/s, {}× the p50, {}× the p99, {}× the CPU per \
                 request.\n",
                report::ratio(ratio(|r| r.rps)),
                report::ratio(ratio(|r| r.p50)),
                report::ratio(ratio(|r| r.p99)),
                report::ratio(ratio(|r| r.cpu_per_100k)),
            ));
            versus.insert(
                requests.key().into(),
                json!({
                    "rps": ratio(|r| r.rps),
                    "p50": ratio(|r| r.p50),
                    "p99": ratio(|r| r.p99),
                    "cpu_per_request": ratio(|r| r.cpu_per_100k),
                }),
            );
        }
    }

    let mut per_round = Table::new(&[
        "round",
        "requests",
        "path",
        "req/s",
        "p50",
        "p99",
        "p99.9",
        "errors",
        "CPU s per 100k req",
        "upstream CPU s per 100k req",
    ]);
    for r in &rounds {
        per_round.row(vec![
            r.round.to_string(),
            r.requests.key().into(),
            r.path.into(),
            report::int(r.rps),
            report::ms(r.p50),
            report::ms(r.p99),
            report::ms(r.p999),
            load::summarize(&r.errors),
            format!("{:.3}", r.cpu_per_100k),
            format!("{:.3}", r.upstream_cpu_per_100k),
        ]);
    }

    let order = paths.join(", ");
    let mut md = format!(
        "# grpc: h2c through nginx and wakegate\n\n{}\n\n\
         upstream: the demo backend on {addr} (HTTP/1.1 and h2c on one port; gRPC by content \
         type).\n\n\
         Load: {CONNECTIONS} h2c connections with {STREAMS} requests in flight on each ({} at \
         once), closed loop, {} s per run after a {} s warm-up of each path and kind of \
         request; {} round(s), interleaved (gRPC: {order}; then GET: {order}); medians over \
         the rounds. nginx: {} workers, `listen ... http2` (h2c with prior knowledge), \
         `grpc_pass` and `proxy_pass` with 64 keep-alive upstream connections each, \
         `reuseport`, no access log; wakegate: two fixed `upstream` targets told apart by \
         `:authority`, `RUST_LOG=warn`. CPU: user + system time from /proc/PID/stat over each \
         run, per 100,000 successful responses, of the path's server (nginx: master and \
         workers; direct: the upstream) and of the upstream (what the backend spends depends \
         on how it is spoken to).\n{sections}",
        machine.markdown(),
        CONNECTIONS * STREAMS,
        duration.as_secs_f64(),
        warmup.as_secs_f64(),
        settings.rounds,
        stand::threads(),
    );
    if stand.nginx.is_none() {
        md.push_str(&format!("\n{}.\n", stand::NO_NGINX));
    }
    md.push_str(&format!("\nEach round:\n\n{}", per_round.markdown()));

    let data = json!({
        "scenario": "grpc",
        "machine": machine.json(),
        "settings": {
            "connections": CONNECTIONS,
            "streams": STREAMS,
            "duration_s": duration.as_secs_f64(),
            "warmup_s": warmup.as_secs_f64(),
            "rounds": settings.rounds,
            "nginx_workers": stand::threads(),
            "grpc_method": load::ECHO_UNARY,
            "grpc_body_bytes": message_bytes,
        },
        "upstream": stand.upstream.server.name,
        "medians": medians,
        "wakegate_vs_nginx": versus,
        "rounds": rounds.iter().map(|r| json!({
            "round": r.round,
            "requests": r.requests.key(),
            "path": r.path,
            "rps": r.rps,
            "p50_ms": r.p50,
            "p99_ms": r.p99,
            "p99_9_ms": r.p999,
            "errors": r.errors,
            "cpu_s_per_100k": r.cpu_per_100k,
            "upstream_cpu_s_per_100k": r.upstream_cpu_per_100k,
        })).collect::<Vec<_>>(),
    });
    let panel = |requests: Requests, y_label: &'static str| Panel {
        y_label,
        series: paths
            .iter()
            .enumerate()
            .filter_map(|(i, path)| {
                let h = latency.get(&(requests.key(), *path))?;
                Some(report::series(*path, i, report::latency_curve(h, 3.0)))
            })
            .collect(),
    };
    let panels = [
        panel(Requests::Grpc, "gRPC unary latency (ms)"),
        panel(Requests::Get, "GET h2c → HTTP/1.1 latency (ms)"),
    ];
    report::write(
        &settings.out,
        "grpc",
        &md,
        data,
        "grpc: latency by percentile, every round merged (closed loop)",
        "percentile (0 = p0, 1 = p90, 2 = p99, 3 = p99.9)",
        &panels,
    )
}
