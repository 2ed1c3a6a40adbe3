//! `routes`: wakegate's throughput and memory with 1, 1,000 and 10,000 configured targets (all
//! `upstream` targets to the same upstream, one host each), requests spread over every host;
//! the three run side by side and are measured in interleaved rounds.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use wakegate::plot::Panel;

use super::{Settings, log};
use crate::Error;
use crate::load::{self, Plan};
use crate::procs::WorkDir;
use crate::report::{self, Machine, Table, median_where};
use crate::stand::{self, CONNECTIONS, Wakegate};

const SIZES: [usize; 3] = [1, 1_000, 10_000];

struct Round {
    round: usize,
    targets: usize,
    rps: f64,
    p50: f64,
    p99: f64,
    errors: u64,
}

fn config(targets: usize, upstream: std::net::SocketAddr) -> String {
    let mut text = String::with_capacity(targets * 80);
    for i in 0..targets {
        text.push_str(&format!(
            "[[target]]\nname = \"t{i}\"\nhosts = [\"t{i}.loadtest\"]\nupstream = \"{upstream}\"\n\n"
        ));
    }
    text
}

pub async fn run(settings: &Settings) -> Result<PathBuf, Error> {
    let nginx = stand::nginx_version();
    let machine = Machine::now(nginx.clone());
    let duration = settings.pick(Duration::from_secs(10), Duration::from_secs(2));
    let warmup = settings.pick(Duration::from_secs(2), Duration::from_millis(500));
    let probe = settings.pick(Duration::from_secs(3), Duration::from_secs(1));
    let work = WorkDir::new()?;
    let upstream =
        stand::choose_upstream(&work, &settings.wakegate, nginx.is_some(), probe).await?;
    log(upstream.describe());

    let mut wakegates = Vec::new();
    for n in SIZES {
        let wakegate = Wakegate::start(
            &work,
            &settings.wakegate,
            &format!("wakegate-{n}"),
            "",
            &config(n, upstream.server.addr),
        )?;
        let idle = wakegate.server.rss_mib("VmRSS");
        log(format!(
            "wakegate with {n} target(s): listening after {:.0} ms, {idle:.1} MiB resident",
            wakegate.started_in.as_secs_f64() * 1000.0
        ));
        wakegates.push((n, wakegate, idle));
    }
    let plan = |n: usize, wakegate: &Wakegate, duration: Duration| {
        let mut plan = Plan::new(wakegate.server.addr, "", CONNECTIONS, duration);
        plan.hosts = load::hosts((0..n).map(|i| format!("t{i}.loadtest")));
        plan
    };
    for (n, wakegate, _) in &wakegates {
        let mut plan = plan(*n, wakegate, warmup);
        plan.label = format!("warm-up {n:>5} targets");
        load::run(&plan).await;
    }
    let mut rounds = Vec::new();
    for round in 1..=settings.rounds {
        for (n, wakegate, _) in &mut wakegates {
            let mut plan = plan(*n, wakegate, duration);
            plan.label = format!("round {round}/{} {n:>5} targets", settings.rounds);
            let outcome = load::run(&plan).await;
            stand::require_responses(&format!("wakegate with {n} targets"), &outcome)?;
            log(format!(
                "{n} targets: {:.0} req/s, p99 {}, errors: {}",
                outcome.rps(),
                report::ms(outcome.ms(0.99)),
                outcome.error_summary()
            ));
            rounds.push(Round {
                round,
                targets: *n,
                rps: outcome.rps(),
                p50: outcome.ms(0.5),
                p99: outcome.ms(0.99),
                errors: outcome.error_count(),
            });
            wakegate.server.check_running()?;
        }
    }

    let med = |n: usize, f: fn(&Round) -> f64| median_where(&rounds, |r| r.targets == n, f);
    let peak = |n: usize| {
        wakegates
            .iter()
            .find(|(m, ..)| *m == n)
            .map_or(f64::NAN, |(_, w, _)| w.server.peak_rss_mib())
    };
    let mut table = Table::new(&[
        "targets",
        "req/s",
        "p50",
        "p99",
        "errors",
        "start-up",
        "RSS idle",
        "peak RSS",
        "req/s vs 1 target",
        "peak RSS vs 1 target",
    ]);
    let mut rows = Vec::new();
    for (n, wakegate, idle) in &wakegates {
        let errors: u64 = rounds
            .iter()
            .filter(|r| r.targets == *n)
            .map(|r| r.errors)
            .sum();
        table.row(vec![
            n.to_string(),
            report::int(med(*n, |r| r.rps)),
            report::ms(med(*n, |r| r.p50)),
            report::ms(med(*n, |r| r.p99)),
            errors.to_string(),
            report::ms(wakegate.started_in.as_secs_f64() * 1000.0),
            format!("{idle:.1} MiB"),
            format!("{:.1} MiB", peak(*n)),
            report::ratio(med(*n, |r| r.rps) / med(1, |r| r.rps)),
            report::ratio(peak(*n) / peak(1)),
        ]);
        rows.push(json!({
            "targets": n,
            "rps": med(*n, |r| r.rps),
            "p50_ms": med(*n, |r| r.p50),
            "p99_ms": med(*n, |r| r.p99),
            "errors": errors,
            "startup_ms": wakegate.started_in.as_secs_f64() * 1000.0,
            "idle_rss_mib": idle,
            "peak_rss_mib": peak(*n),
        }));
    }
    let md = format!(
        "# routes: wakegate with 1, 1,000 and 10,000 targets\n\n{}\n\n{}\n\n\
         Each wakegate has N `upstream` targets `t0` … `tN-1`, each on its own host \
         `tI.loadtest`, all to the same upstream; the three run side by side. Load: \
         {CONNECTIONS} HTTP/1.1 connections, closed loop, each connection cycling through all \
         N hosts, {} s per run after a {} s warm-up, {} round(s) interleaved (1, 1,000, \
         10,000); medians over the rounds. Start-up: from spawn to the proxy port accepting. \
         RSS idle: `VmRSS` once listening; peak RSS: `VmHWM` at the end.\n\n{}",
        machine.markdown(),
        upstream.describe(),
        duration.as_secs_f64(),
        warmup.as_secs_f64(),
        settings.rounds,
        table.markdown()
    );
    let data = json!({
        "scenario": "routes",
        "machine": machine.json(),
        "settings": {
            "connections": CONNECTIONS,
            "duration_s": duration.as_secs_f64(),
            "warmup_s": warmup.as_secs_f64(),
            "rounds": settings.rounds,
        },
        "upstream": upstream.server.name,
        "medians": rows,
        "rounds": rounds.iter().map(|r| json!({
            "round": r.round, "targets": r.targets, "rps": r.rps,
            "p50_ms": r.p50, "p99_ms": r.p99, "errors": r.errors,
        })).collect::<Vec<_>>(),
    });
    let points = |f: &dyn Fn(usize) -> f64| SIZES.iter().map(|n| (*n as f64, f(*n))).collect();
    let panels = [
        Panel {
            y_label: "req/s",
            series: vec![report::series(
                "req/s (median)",
                0,
                points(&|n| med(n, |r| r.rps)),
            )],
        },
        Panel {
            y_label: "peak RSS (MiB)",
            series: vec![report::series("wakegate peak RSS", 1, points(&peak))],
        },
    ];
    report::write(
        &settings.out,
        "routes",
        &md,
        data,
        "routes: wakegate's throughput and memory by number of targets",
        "configured targets",
        &panels,
    )
}
