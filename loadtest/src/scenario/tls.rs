//! `tls`: HTTPS through nginx and through wakegate, each terminating TLS with the same
//! certificate in front of the same upstream: keep-alive HTTP/1.1, HTTP/2 by ALPN, and a new
//! connection (a full handshake) for every request; direct cleartext to the upstream for
//! reference. Interleaved rounds: throughput, latency, CPU time per 100k requests of each path's
//! server, of the upstream and of the load generator, wakegate's ratios to nginx.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::json;
use wakegate::plot::Panel;

use super::{Settings, log};
use crate::Error;
use crate::load::{self, Plan, Protocol};
use crate::procs::{self, WorkDir};
use crate::report::{self, Machine, Table, median_where};
use crate::stand::{self, Server};
use crate::tls;

/// The committed example certificate (self-signed, ECDSA P-256), written into the scenario's
/// directory: both proxies serve exactly these bytes, whatever directory `loadtest` runs in.
const CERT: &str = include_str!("../../../examples/tls/hello.localhost.crt");
const KEY: &str = include_str!("../../../examples/tls/hello.localhost.key");
/// A name the certificate holds: every request's `Host` and SNI.
const HOST: &str = "hello.localhost";

/// HTTP/2 connections of a run, and requests in flight on each: 64 at once, as the 64
/// HTTP/1.1 connections (`stand::CONNECTIONS`) of the other two kinds.
const H2_CONNECTIONS: usize = 16;
const H2_STREAMS: usize = 4;

/// What the requests of a run are; each has a table of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// HTTP/1.1 on keep-alive connections.
    Http1,
    /// HTTP/2, chosen by ALPN (h2c to the upstream directly).
    Http2,
    /// HTTP/1.1, every request on a new connection: with TLS a full handshake each.
    Handshake,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Http1, Kind::Http2, Kind::Handshake];

    fn key(self) -> &'static str {
        match self {
            Kind::Http1 => "h1",
            Kind::Http2 => "h2",
            Kind::Handshake => "handshake",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Kind::Http1 => "HTTPS, HTTP/1.1 keep-alive",
            Kind::Http2 => "HTTPS, HTTP/2 (ALPN h2)",
            Kind::Handshake => "A new TLS connection per request (full handshakes), HTTP/1.1",
        }
    }

    fn plan(self, path: &Path, duration: Duration, label: String) -> Plan {
        let mut plan = Plan::new(path.addr, HOST, stand::CONNECTIONS, duration);
        match self {
            Kind::Http1 => {}
            Kind::Http2 => {
                plan.connections = H2_CONNECTIONS;
                plan.protocol = Protocol::Http2;
                plan.streams = H2_STREAMS;
            }
            Kind::Handshake => plan.keep_alive = false,
        }
        plan.tls = path.tls;
        plan.label = label;
        plan
    }
}

/// One path requests take: where they go, whether over TLS, whose CPU counts.
struct Path<'a> {
    name: &'static str,
    addr: SocketAddr,
    tls: bool,
    server: &'a Server,
}

struct Round {
    round: usize,
    kind: Kind,
    path: &'static str,
    rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    errors: BTreeMap<String, u64>,
    /// CPU seconds of the path's server per 100,000 successful requests.
    cpu_per_100k: f64,
    /// The same for the upstream, and for the load generator itself.
    upstream_cpu_per_100k: f64,
    client_cpu_per_100k: f64,
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
    let cert = work.write("hello.localhost.crt", CERT)?;
    let key = work.write("hello.localhost.key", KEY)?;
    // The demo backend is the upstream: it speaks h2c too, so direct has every kind.
    let upstream = stand::start_demo(&work, &settings.wakegate, "demo backend")?;
    let addr = upstream.addr;
    let nginx_proxy = match nginx {
        Some(_) => Some(stand::start_nginx_tls_proxy(&work, addr, &cert, &key)?),
        None => None,
    };
    let mut wakegate = stand::Wakegate::start_with(
        &work,
        &settings.wakegate,
        "wakegate",
        "",
        &format!("[[target]]\nname = \"upstream\"\nhosts = [\"*\"]\nupstream = \"{addr}\"\n"),
        Some((&cert, &key)),
    )?;
    let https = wakegate.https.expect("started with TLS");
    let mut upstream = upstream;
    let mut nginx_proxy = nginx_proxy;

    // What each proxy's handshake negotiates, once per ALPN protocol: a proxy that does not
    // offer h2 fails here rather than as errors in every run.
    let mut negotiated = Vec::new();
    {
        let mut proxies = Vec::new();
        if let Some(nginx) = &nginx_proxy {
            proxies.push(("nginx", nginx.addr));
        }
        proxies.push(("wakegate", https));
        for (name, at) in proxies {
            for alpn in [tls::HTTP1, tls::H2] {
                let what = tls::negotiated(&tls::Client::new(alpn), at, HOST)
                    .await
                    .map_err(|why| Error::Harness(format!("TLS handshake with {name}: {why}")))?;
                log(format!("{name}: {what}"));
                negotiated.push((name, what));
            }
        }
    }

    let mut rounds = Vec::new();
    let mut latency: BTreeMap<(&str, &str), Histogram<u64>> = BTreeMap::new();
    // wakegate's own count of completed handshakes over the measured handshake runs.
    let (mut wakegate_handshakes, mut wakegate_handshake_requests) = (0.0, 0u64);
    {
        let paths = paths(&upstream, nginx_proxy.as_ref(), &wakegate.server, https);
        for kind in Kind::ALL {
            for path in &paths {
                let label = format!("warm-up {:<9} {:<9}", kind.key(), path.name);
                load::run(&kind.plan(path, warmup, label)).await;
            }
        }
        for round in 1..=settings.rounds {
            for kind in Kind::ALL {
                for path in &paths {
                    let label = format!(
                        "round {round}/{} {:<9} {:<9}",
                        settings.rounds,
                        kind.key(),
                        path.name
                    );
                    let plan = kind.plan(path, duration, label);
                    let counted = kind == Kind::Handshake && path.name == "wakegate";
                    let handshakes_before = if counted {
                        handshakes(wakegate.admin).await?
                    } else {
                        0.0
                    };
                    let client = std::process::id();
                    let before = (
                        path.server.cpu_seconds(),
                        upstream.cpu_seconds(),
                        procs::cpu_seconds(client),
                    );
                    let outcome = load::run(&plan).await;
                    let cpu = path.server.cpu_seconds() - before.0;
                    let upstream_cpu = upstream.cpu_seconds() - before.1;
                    let client_cpu = procs::cpu_seconds(client) - before.2;
                    stand::require_responses(&format!("{} ({})", path.name, kind.key()), &outcome)?;
                    if counted {
                        wakegate_handshakes +=
                            handshakes(wakegate.admin).await? - handshakes_before;
                        wakegate_handshake_requests += outcome.ok + outcome.error_count();
                    }
                    latency
                        .entry((kind.key(), path.name))
                        .or_insert_with(load::histogram)
                        .add(&outcome.latency)
                        .expect("same bounds");
                    let per_100k = |seconds: f64| seconds / outcome.ok as f64 * 100_000.0;
                    let row = Round {
                        round,
                        kind,
                        path: path.name,
                        rps: outcome.rps(),
                        p50: outcome.ms(0.5),
                        p99: outcome.ms(0.99),
                        p999: outcome.ms(0.999),
                        errors: outcome.errors.clone(),
                        cpu_per_100k: per_100k(cpu),
                        upstream_cpu_per_100k: per_100k(upstream_cpu),
                        client_cpu_per_100k: per_100k(client_cpu),
                    };
                    log(format!(
                        "{} {}: {:.0} req/s, p50 {}, p99 {}, errors: {}, CPU {:.3} s per 100k \
                         (upstream {:.3} s, loadtest {:.3} s)",
                        kind.key(),
                        path.name,
                        row.rps,
                        report::ms(row.p50),
                        report::ms(row.p99),
                        outcome.error_summary(),
                        row.cpu_per_100k,
                        row.upstream_cpu_per_100k,
                        row.client_cpu_per_100k,
                    ));
                    rounds.push(row);
                }
            }
        }
    }
    upstream.check_running()?;
    if let Some(nginx) = &mut nginx_proxy {
        nginx.check_running()?;
    }
    wakegate.server.check_running()?;

    let names: Vec<&'static str> = paths(&upstream, nginx_proxy.as_ref(), &wakegate.server, https)
        .iter()
        .map(|p| p.name)
        .collect();
    let med = |kind: Kind, path: &str, f: fn(&Round) -> f64| {
        median_where(&rounds, |r| r.kind == kind && r.path == path, f)
    };
    let mut sections = String::new();
    let mut medians = serde_json::Map::new();
    let mut versus = serde_json::Map::new();
    for kind in Kind::ALL {
        let rate = if kind == Kind::Handshake {
            "handshakes/s"
        } else {
            "req/s"
        };
        let mut table = Table::new(&[
            "path",
            rate,
            "p50",
            "p99",
            "p99.9",
            "errors",
            "CPU s per 100k req",
            "upstream CPU s per 100k req",
            "loadtest CPU s per 100k req",
            "req/s vs nginx",
            "CPU vs nginx",
        ]);
        let nginx_rps = med(kind, "nginx", |r| r.rps);
        let nginx_cpu = med(kind, "nginx", |r| r.cpu_per_100k);
        let mut by_path = serde_json::Map::new();
        for path in &names {
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            for r in rounds.iter().filter(|r| r.kind == kind && r.path == *path) {
                for (what, n) in &r.errors {
                    *errors.entry(what.clone()).or_default() += n;
                }
            }
            let m = |f: fn(&Round) -> f64| med(kind, path, f);
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
                format!("{:.3}", m(|r| r.client_cpu_per_100k)),
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
                    "loadtest_cpu_s_per_100k": m(|r| r.client_cpu_per_100k),
                }),
            );
        }
        medians.insert(kind.key().into(), by_path.into());

        let about = match kind {
            Kind::Http1 => format!(
                "{} HTTP/1.1 connections over TLS (ALPN `http/1.1`), kept alive for the whole \
                 run; direct is cleartext HTTP/1.1 to the upstream.",
                stand::CONNECTIONS
            ),
            Kind::Http2 => format!(
                "{H2_CONNECTIONS} HTTP/2 connections over TLS (ALPN `h2`) with {H2_STREAMS} \
                 requests in flight on each; both proxies forward over HTTP/1.1 keep-alive \
                 connections; direct is h2c to the upstream."
            ),
            Kind::Handshake => format!(
                "{} connections at a time, each carrying one request (`Connection: close`) and \
                 then closed: every request is a TCP connect, a full TLS handshake (the client \
                 never resumes a session) and one exchange, its latency counted from the \
                 connect. Requests per second are handshakes per second. Direct is the same \
                 over cleartext: what the connections cost without TLS.",
                stand::CONNECTIONS
            ),
        };
        sections.push_str(&format!(
            "\n## {}\n\n{about}\n\n{}",
            kind.title(),
            table.markdown()
        ));
        if kind == Kind::Handshake && wakegate_handshake_requests > 0 {
            sections.push_str(&format!(
                "\nwakegate counted {wakegate_handshakes:.0} completed TLS handshakes \
                 (`wakegate_tls_handshakes_total`) for {wakegate_handshake_requests} requests \
                 in these runs: {:.2} per request (connections whose handshake ends as a \
                 run ends send no request).\n",
                wakegate_handshakes / wakegate_handshake_requests as f64
            ));
        }
        if nginx_proxy.is_some() {
            let ratio = |f: fn(&Round) -> f64| med(kind, "wakegate", f) / med(kind, "nginx", f);
            sections.push_str(&format!(
                "\nwakegate / nginx: {}× the {rate}, {}× the p50, {}× the p99, {}× the CPU per \
                 request.\n",
                report::ratio(ratio(|r| r.rps)),
                report::ratio(ratio(|r| r.p50)),
                report::ratio(ratio(|r| r.p99)),
                report::ratio(ratio(|r| r.cpu_per_100k)),
            ));
            versus.insert(
                kind.key().into(),
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
        "loadtest CPU s per 100k req",
    ]);
    for r in &rounds {
        per_round.row(vec![
            r.round.to_string(),
            r.kind.key().into(),
            r.path.into(),
            report::int(r.rps),
            report::ms(r.p50),
            report::ms(r.p99),
            report::ms(r.p999),
            load::summarize(&r.errors),
            format!("{:.3}", r.cpu_per_100k),
            format!("{:.3}", r.upstream_cpu_per_100k),
            format!("{:.3}", r.client_cpu_per_100k),
        ]);
    }
    let handshakes_md = negotiated
        .iter()
        .map(|(name, what)| format!("- {name}: {what}"))
        .collect::<Vec<_>>()
        .join("\n");

    let order = names.join(", ");
    let mut md = format!(
        "# tls: HTTPS through nginx and wakegate\n\n{}\n\n\
         upstream: the demo backend on {addr} (HTTP/1.1 and h2c on one port). Certificate: \
         the example `{HOST}` (self-signed, ECDSA P-256), the same file for both proxies. \
         Client: rustls (ring), TLS 1.2 and 1.3 with its default preferences, SNI and `Host` \
         `{HOST}`, no session resumption, the certificate and handshake signature not \
         checked (the load generator authenticates nothing).\n\n\
         Closed loop, {} s per run after a {} s warm-up of each path and kind; {} round(s), \
         interleaved (for each kind: {order}); medians over the rounds. nginx: {} workers, \
         `listen ... ssl http2 reuseport`, `ssl_protocols TLSv1.2 TLSv1.3`, session cache \
         and tickets as nginx's defaults (no shared cache; tickets on), `proxy_pass` with \
         `proxy_http_version 1.1` and 64 keep-alive upstream connections, no access log. \
         wakegate: `[tls]` with the same certificate, one fixed `upstream` target, \
         `RUST_LOG=warn`. CPU: user + system time from /proc/PID/stat over each run, per \
         100,000 successful responses, of the path's server (nginx: master and workers; \
         direct: the upstream), of the upstream, and of `loadtest` itself (the client's \
         share of the same cores).\n\nEach proxy's handshake, one per ALPN protocol:\n\n\
         {handshakes_md}\n{sections}",
        machine.markdown(),
        duration.as_secs_f64(),
        warmup.as_secs_f64(),
        settings.rounds,
        stand::threads(),
    );
    if nginx_proxy.is_none() {
        md.push_str(&format!("\n{}.\n", stand::NO_NGINX));
    }
    md.push_str(&format!("\nEach round:\n\n{}", per_round.markdown()));

    let data = json!({
        "scenario": "tls",
        "machine": machine.json(),
        "settings": {
            "connections": stand::CONNECTIONS,
            "h2_connections": H2_CONNECTIONS,
            "h2_streams": H2_STREAMS,
            "duration_s": duration.as_secs_f64(),
            "warmup_s": warmup.as_secs_f64(),
            "rounds": settings.rounds,
            "nginx_workers": stand::threads(),
            "host": HOST,
        },
        "negotiated": negotiated.iter().map(|(name, what)| json!({"path": name, "handshake": what})).collect::<Vec<_>>(),
        "wakegate_handshakes_per_request": if wakegate_handshake_requests > 0 {
            json!(wakegate_handshakes / wakegate_handshake_requests as f64)
        } else {
            json!(null)
        },
        "medians": medians,
        "wakegate_vs_nginx": versus,
        "rounds": rounds.iter().map(|r| json!({
            "round": r.round,
            "requests": r.kind.key(),
            "path": r.path,
            "rps": r.rps,
            "p50_ms": r.p50,
            "p99_ms": r.p99,
            "p99_9_ms": r.p999,
            "errors": r.errors,
            "cpu_s_per_100k": r.cpu_per_100k,
            "upstream_cpu_s_per_100k": r.upstream_cpu_per_100k,
            "loadtest_cpu_s_per_100k": r.client_cpu_per_100k,
        })).collect::<Vec<_>>(),
    });
    let panel = |kind: Kind, y_label: &'static str| Panel {
        y_label,
        series: names
            .iter()
            .enumerate()
            .filter_map(|(i, path)| {
                let h = latency.get(&(kind.key(), *path))?;
                Some(report::series(*path, i, report::latency_curve(h, 3.0)))
            })
            .collect(),
    };
    let panels = [
        panel(Kind::Http1, "HTTPS HTTP/1.1 latency (ms)"),
        panel(Kind::Http2, "HTTPS h2 latency (ms)"),
        panel(Kind::Handshake, "connect + handshake + request (ms)"),
    ];
    report::write(
        &settings.out,
        "tls",
        &md,
        data,
        "tls: latency by percentile, every round merged (closed loop)",
        "percentile (0 = p0, 1 = p90, 2 = p99, 3 = p99.9)",
        &panels,
    )
}

/// The paths in the order they run: direct (cleartext), nginx and wakegate (HTTPS).
fn paths<'a>(
    upstream: &'a Server,
    nginx: Option<&'a Server>,
    wakegate: &'a Server,
    https: SocketAddr,
) -> Vec<Path<'a>> {
    let mut paths = vec![Path {
        name: "direct",
        addr: upstream.addr,
        tls: false,
        server: upstream,
    }];
    if let Some(nginx) = nginx {
        paths.push(Path {
            name: "nginx",
            addr: nginx.addr,
            tls: true,
            server: nginx,
        });
    }
    paths.push(Path {
        name: "wakegate",
        addr: https,
        tls: true,
        server: wakegate,
    });
    paths
}

/// wakegate's `wakegate_tls_handshakes_total`.
async fn handshakes(admin: SocketAddr) -> Result<f64, Error> {
    let text = stand::get(admin, "/metrics").await?;
    text.lines()
        .find_map(|line| line.strip_prefix("wakegate_tls_handshakes_total "))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| Error::Harness("no wakegate_tls_handshakes_total in /metrics".into()))
}
