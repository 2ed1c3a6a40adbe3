//! `latency`: open loop at half the maximum rate, the same rate on every path, latency counted
//! from when each request fell due; what nginx, HAProxy and wakegate add to the direct path,
//! and round by round whether wakegate's added p99 stayed at or below each peer's — and at or
//! below its twin's, a second wakegate of the same build and configuration, whose rounds show
//! how much of a round's verdict is the machine's.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::json;
use wakegate::plot::Panel;

use super::{Second, Settings, Stand, TWIN, log};
use crate::Error;
use crate::load::{self, Plan};
use crate::procs::{ThreadSched, WorkDir};
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
    /// The path's server's threads over the run: where its CPU went, and how long they waited
    /// for one.
    threads: Vec<ThreadSched>,
    /// The same for the load generator (this process).
    generator: Vec<ThreadSched>,
    answered: u64,
}

impl Round {
    /// Microseconds the server's threads spent runnable but not running, per answered request.
    fn wait_per_request_us(&self) -> f64 {
        wait_us(&self.threads) / self.answered.max(1) as f64
    }

    /// The same for the load generator's threads.
    fn generator_wait_per_request_us(&self) -> f64 {
        wait_us(&self.generator) / self.answered.max(1) as f64
    }

    /// How the server's CPU time split across its threads, busiest first: `name share`, for
    /// the threads with at least 1 % of it.
    fn split(&self) -> String {
        let total: u64 = self.threads.iter().map(|t| t.run_ns).sum();
        let mut threads: Vec<&ThreadSched> = self
            .threads
            .iter()
            .filter(|t| t.run_ns * 100 >= total.max(1))
            .collect();
        threads.sort_by_key(|t| std::cmp::Reverse(t.run_ns));
        threads
            .iter()
            .map(|t| format!("{} {:.0} %", t.name, t.run_ns as f64 * 100.0 / total as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn wait_us(threads: &[ThreadSched]) -> f64 {
    threads.iter().map(|t| t.wait_ns).sum::<u64>() as f64 / 1_000.0
}

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
    let probe = settings.pick(Duration::from_secs(3), Duration::from_secs(1));
    let work = WorkDir::new()?;
    let mut stand = Stand::start(
        &work,
        settings,
        nginx.is_some(),
        machine.haproxy.is_some(),
        Second::Twin,
        probe,
    )
    .await?;

    // The maximum, measured here (closed loop, which also warms each path up); the twin's
    // only warms it up.
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
        .filter(|(name, _)| *name != "direct" && *name != TWIN)
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
        for (name, server) in stand.paths_of_round(round) {
            let mut plan = Plan::new(server.addr, "loadtest", CONNECTIONS, duration);
            plan.rate = Some(rate);
            plan.label = format!("round {round}/{} {name:<9}", settings.rounds);
            let pids = server.pids();
            let me = [std::process::id()];
            let (before, generator_before) = (ThreadSched::of(&pids), ThreadSched::of(&me));
            let outcome = load::run(&plan).await;
            let threads = ThreadSched::since(&ThreadSched::of(&pids), &before);
            let generator = ThreadSched::since(&ThreadSched::of(&me), &generator_before);
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
                threads,
                generator,
                answered: outcome.ok,
            };
            log(format!(
                "{name}: {:.0} req/s answered, p50 {}, p99 {}, errors: {}, not sent: {}; \
                 run-queue wait {:.1} µs per request, CPU by thread: {}",
                row.sent_rps,
                report::ms(row.p50),
                report::ms(row.p99),
                outcome.error_summary(),
                row.unsent,
                row.wait_per_request_us(),
                row.split()
            ));
            rounds.push(row);
        }
        stand.check_running()?;
    }

    // What a path adds to direct in one round (same round, same machine load), and the
    // median over rounds.
    let added_in = |round: usize, path: &str, f: fn(&Round) -> f64| {
        let at = |p: &str| rounds.iter().find(|r| r.round == round && r.path == p);
        Some(f(at(path)?) - f(at("direct")?))
    };
    let added = |path: &str, f: fn(&Round) -> f64| {
        let diffs: Vec<f64> = (1..=settings.rounds)
            .filter_map(|round| added_in(round, path, f))
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
        "run-queue wait per req",
        "load generator's wait per req",
        "CPU by thread",
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
            format!("{:.1} µs", r.wait_per_request_us()),
            format!("{:.1} µs", r.generator_wait_per_request_us()),
            r.split(),
        ]);
    }
    // The tail target, round by round: wakegate's added p99 at or below each peer's; and at
    // or below its twin's, which tells how often the machine alone decides a round.
    let peers = stand.peers();
    let twin = matches!(stand.second, Some((TWIN, _))).then_some(TWIN);
    let against: Vec<&str> = peers.iter().copied().chain(twin).collect();
    let mut header = vec!["round".to_owned()];
    header.extend(
        peers
            .iter()
            .chain(["wakegate"].iter())
            .chain(twin.iter())
            .map(|p| format!("{p} added p99")),
    );
    header.extend(against.iter().map(|p| format!("wakegate ≤ {p}")));
    let mut tail = Table::new(&header.iter().map(String::as_str).collect::<Vec<_>>());
    let mut at_or_below: BTreeMap<&str, usize> = against.iter().map(|p| (*p, 0)).collect();
    let mut tail_json = Vec::new();
    for round in 1..=settings.rounds {
        let p99 = |path: &str| added_in(round, path, |r| r.p99).unwrap_or(f64::NAN);
        let w = p99("wakegate");
        let mut row = vec![round.to_string()];
        row.extend(peers.iter().map(|p| report::ms(p99(p))));
        row.push(report::ms(w));
        row.extend(twin.map(|t| report::ms(p99(t))));
        let mut this = serde_json::Map::new();
        this.insert("round".into(), json!(round));
        this.insert("wakegate".into(), json!(w));
        for other in &against {
            let ok = w <= p99(other);
            *at_or_below.get_mut(other).expect("every path compared") += usize::from(ok);
            row.push(if ok { "yes" } else { "no" }.into());
            this.insert((*other).into(), json!(p99(other)));
        }
        tail.row(row);
        tail_json.push(serde_json::Value::Object(this));
    }
    let mut verdicts: Vec<String> = peers
        .iter()
        .map(|peer| {
            let n = at_or_below[peer];
            format!(
                "at or below {peer}'s in {n} of {} rounds ({})",
                settings.rounds,
                report::verdict(n == settings.rounds)
            )
        })
        .collect();
    if let Some(n) = at_or_below.get(TWIN) {
        verdicts.push(format!(
            "at or below its twin's (the same build and configuration in a second process) in \
             {n} of {} rounds: between identical proxies, the machine alone decides a round",
            settings.rounds
        ));
    }
    let tail_summary = verdicts.join("; ");

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
         could not keep up. Per round, from each thread's `/proc/PID/task/TID/schedstat`: the \
         time the path's server's threads were runnable but waited for a CPU (\"run-queue \
         wait\"), and the load generator's, per answered request; and how the server's CPU time \
         split across its threads.\n\n{}",
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
    if stand.haproxy.is_none() {
        md.push_str(&format!("\n{}.\n", stand::NO_HAPROXY));
    }
    if !against.is_empty() {
        md.push_str(&format!(
            "\nThe added p99, round by round; wakegate's was {tail_summary}:\n\n{}",
            tail.markdown()
        ));
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
        "added_p99_by_round": tail_json,
        "wakegate_added_p99_at_or_below": at_or_below,
        "rounds": rounds.iter().map(|r| json!({
            "round": r.round, "path": r.path, "answered_rps": r.sent_rps,
            "p50_ms": r.p50, "p90_ms": r.p90, "p99_ms": r.p99, "p99_9_ms": r.p999,
            "errors": r.errors, "unsent": r.unsent,
            "run_queue_wait_us_per_request": r.wait_per_request_us(),
            "generator_run_queue_wait_us_per_request": r.generator_wait_per_request_us(),
            "threads": r.threads.iter().map(|t| json!({
                "name": t.name, "run_ms": t.run_ns as f64 / 1e6, "wait_ms": t.wait_ns as f64 / 1e6,
            })).collect::<Vec<_>>(),
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
