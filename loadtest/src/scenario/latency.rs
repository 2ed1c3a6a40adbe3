//! `latency`: open loop at half the maximum rate, the same rate on every path, latency counted
//! from when each request fell due; what nginx and wakegate add to the direct path.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::json;
use wakegate::plot::Panel;

use super::{Settings, Stand, log};
use crate::Error;
use crate::load::{self, Plan};
use crate::procs::WorkDir;
use crate::report::{self, Machine, Table, median, median_where};
use crate::stand::{self, CONNECTIONS};

/// The open-loop rate, as a share of the slowest proxy's closed-loop maximum.
const LOAD: f64 = 0.5;

struct Round {
    round: usize,
    path: &'static str,
    sent_rps: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    errors: u64,
    unsent: u64,
}

pub async fn run(settings: &Settings) -> Result<PathBuf, Error> {
    let nginx = stand::nginx_version();
    let machine = Machine::now(nginx.clone());
    if nginx.is_none() {
        log(stand::NO_NGINX);
    }
    let duration = settings.pick(Duration::from_secs(10), Duration::from_secs(2));
    let probe = settings.pick(Duration::from_secs(3), Duration::from_secs(1));
    let work = WorkDir::new()?;
    let mut stand = Stand::start(&work, settings, nginx.is_some(), false, probe).await?;

    // The maximum, measured here (closed loop, which also warms each path up).
    let mut max = Vec::new();
    for (name, server) in stand.paths() {
        let mut plan = Plan::new(server.addr, "loadtest", CONNECTIONS, probe);
        plan.label = format!("max rate {name:<9}");
        let outcome = load::run(&plan).await;
        stand::require_responses(name, &outcome)?;
        log(format!("{name}: at most {:.0} req/s", outcome.rps()));
        max.push((name, outcome.rps()));
    }
    let (slowest, slowest_rps) = max
        .iter()
        .filter(|(name, _)| *name != "direct")
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .copied()
        .expect("wakegate is always measured");
    let rate = (slowest_rps * LOAD).round().max(1.0);
    log(format!(
        "open loop at {rate:.0} req/s on every path ({:.0} % of {slowest}'s maximum)",
        LOAD * 100.0
    ));

    let mut rounds = Vec::new();
    let mut latency: BTreeMap<&str, Histogram<u64>> = BTreeMap::new();
    for round in 1..=settings.rounds {
        for (name, server) in stand.paths() {
            let mut plan = Plan::new(server.addr, "loadtest", CONNECTIONS, duration);
            plan.rate = Some(rate);
            plan.label = format!("round {round}/{} {name:<9}", settings.rounds);
            let outcome = load::run(&plan).await;
            stand::require_responses(name, &outcome)?;
            latency
                .entry(name)
                .or_insert_with(load::histogram)
                .add(&outcome.latency)
                .expect("same bounds");
            let row = Round {
                round,
                path: name,
                sent_rps: outcome.rps(),
                p50: outcome.ms(0.5),
                p90: outcome.ms(0.9),
                p99: outcome.ms(0.99),
                p999: outcome.ms(0.999),
                errors: outcome.error_count(),
                unsent: outcome.unsent,
            };
            log(format!(
                "{name}: {:.0} req/s answered, p50 {}, p99 {}, errors: {}, not sent: {}",
                row.sent_rps,
                report::ms(row.p50),
                report::ms(row.p99),
                outcome.error_summary(),
                row.unsent
            ));
            rounds.push(row);
        }
        stand.check_running()?;
    }

    // What a path adds to direct, round by round (same round, same machine load), then the
    // median over rounds.
    let added = |path: &str, f: fn(&Round) -> f64| {
        let diffs: Vec<f64> = (1..=settings.rounds)
            .filter_map(|round| {
                let at = |p: &str| rounds.iter().find(|r| r.round == round && r.path == p);
                Some(f(at(path)?) - f(at("direct")?))
            })
            .collect();
        median(&diffs)
    };
    let med = |path: &str, f: fn(&Round) -> f64| median_where(&rounds, |r| r.path == path, f);
    let mut table = Table::new(&[
        "path",
        "answered req/s",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "added p50 vs direct",
        "added p99 vs direct",
        "errors",
        "due, not sent",
    ]);
    let mut medians = serde_json::Map::new();
    for (path, _) in stand.paths() {
        let errors: u64 = rounds
            .iter()
            .filter(|r| r.path == path)
            .map(|r| r.errors)
            .sum();
        let unsent: u64 = rounds
            .iter()
            .filter(|r| r.path == path)
            .map(|r| r.unsent)
            .sum();
        let (add50, add99) = if path == "direct" {
            (f64::NAN, f64::NAN)
        } else {
            (added(path, |r| r.p50), added(path, |r| r.p99))
        };
        table.row(vec![
            path.into(),
            report::int(med(path, |r| r.sent_rps)),
            report::ms(med(path, |r| r.p50)),
            report::ms(med(path, |r| r.p90)),
            report::ms(med(path, |r| r.p99)),
            report::ms(med(path, |r| r.p999)),
            report::ms(add50),
            report::ms(add99),
            errors.to_string(),
            unsent.to_string(),
        ]);
        medians.insert(
            path.into(),
            json!({
                "answered_rps": med(path, |r| r.sent_rps),
                "p50_ms": med(path, |r| r.p50),
                "p90_ms": med(path, |r| r.p90),
                "p99_ms": med(path, |r| r.p99),
                "p99_9_ms": med(path, |r| r.p999),
                "added_p50_ms": add50,
                "added_p99_ms": add99,
                "errors": errors,
                "unsent": unsent,
            }),
        );
    }
    let mut per_round = Table::new(&[
        "round",
        "path",
        "answered req/s",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "errors",
        "due, not sent",
    ]);
    for r in &rounds {
        per_round.row(vec![
            r.round.to_string(),
            r.path.into(),
            report::int(r.sent_rps),
            report::ms(r.p50),
            report::ms(r.p90),
            report::ms(r.p99),
            report::ms(r.p999),
            r.errors.to_string(),
            r.unsent.to_string(),
        ]);
    }
    let maxima = max
        .iter()
        .map(|(name, rps)| format!("{name} {rps:.0} req/s"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut md = format!(
        "# latency: what each proxy adds, open loop at {:.0} % of the maximum\n\n{}\n\n{}\n\n\
         Maximum rates measured first (closed loop, {CONNECTIONS} connections, {} s each): \
         {maxima}. Open loop at **{rate:.0} req/s** on every path ({:.0} % of {slowest}'s \
         maximum), {CONNECTIONS} HTTP/1.1 connections, {} s per run, {} round(s) interleaved; \
         latency from when each request fell due (no coordinated omission), medians over the \
         rounds; \"added\" is the path's percentile minus direct's in the same round, median \
         over the rounds. \"due, not sent\": requests that fell due but were not sent before \
         the run ended; a handful are the last milliseconds' requests, more mean the path \
         could not keep up.\n\n{}",
        LOAD * 100.0,
        machine.markdown(),
        stand.upstream.describe(),
        probe.as_secs_f64(),
        LOAD * 100.0,
        duration.as_secs_f64(),
        settings.rounds,
        table.markdown()
    );
    if stand.nginx.is_none() {
        md.push_str(&format!("\n{}.\n", stand::NO_NGINX));
    }
    md.push_str(&format!("\nEach round:\n\n{}", per_round.markdown()));
    let data = json!({
        "scenario": "latency",
        "machine": machine.json(),
        "settings": {
            "connections": CONNECTIONS,
            "duration_s": duration.as_secs_f64(),
            "rounds": settings.rounds,
            "rate": rate,
            "load_share": LOAD,
            "rate_of": slowest,
        },
        "max_rps": max.iter().map(|(n, r)| (n.to_string(), json!(r))).collect::<serde_json::Map<_, _>>(),
        "upstream": stand.upstream.server.name,
        "medians": medians,
        "rounds": rounds.iter().map(|r| json!({
            "round": r.round, "path": r.path, "answered_rps": r.sent_rps,
            "p50_ms": r.p50, "p90_ms": r.p90, "p99_ms": r.p99, "p99_9_ms": r.p999,
            "errors": r.errors, "unsent": r.unsent,
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
        "latency",
        &md,
        data,
        &format!("latency: open loop at {rate:.0} req/s, by percentile, every round merged"),
        "percentile (0 = p0, 1 = p90, 2 = p99, 3 = p99.9)",
        &panels,
    )
}
