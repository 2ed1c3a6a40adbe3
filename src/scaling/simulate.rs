//! The policy simulator: replays a load trace through the real [`Policy`] on a simulated
//! clock, with a model of instance start-up time, and reports what each second looked like.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use super::policy::{Now, Policy, Sample, Settings, Window};

mod command;
pub use command::{SimulateError, Simulation};

/// One second of a trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    /// Requests arriving during this second.
    pub arrivals: f64,
    /// How long each of them takes to serve.
    pub service: Duration,
}

impl Load {
    /// The concurrency this load causes in steady state (Little's law).
    pub fn concurrency(&self) -> f64 {
        self.arrivals * self.service.as_secs_f64()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read trace {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("trace line {line}: got {got:?}, expected {expected}")]
    Line {
        line: usize,
        got: String,
        expected: &'static str,
    },
}

const HEADER_ARRIVALS: &str = "second,arrivals,service_ms";
const HEADER_COUNTER: &str = "second,http_requests_total";

/// Parses a trace: either `second,arrivals,service_ms` rows, or a recorded cumulative
/// `second,http_requests_total` series (whose requests then take `default_service`). Seconds
/// are read as written: they must increase; a second missing from an arrivals trace had no
/// arrivals, and a counter's increase between two samples further apart than a second is
/// spread evenly over the seconds between them.
pub fn parse_trace(text: &str, default_service: Duration) -> Result<Vec<Load>, TraceError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'));
    let expected_header = "a header `second,arrivals,service_ms` or `second,http_requests_total`";
    let Some((n, header)) = lines.next() else {
        return Err(TraceError::Line {
            line: 1,
            got: String::new(),
            expected: expected_header,
        });
    };
    let counter = match header.replace(' ', "").as_str() {
        HEADER_ARRIVALS => false,
        HEADER_COUNTER => true,
        other => {
            return Err(TraceError::Line {
                line: n + 1,
                got: other.to_owned(),
                expected: expected_header,
            });
        }
    };
    let mut loads = Vec::new();
    // The last (second, cumulative total) read; totals only in counter traces.
    let mut previous: Option<(u64, f64)> = None;
    for (n, line) in lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let error = |expected: &'static str| TraceError::Line {
            line: n + 1,
            got: line.to_owned(),
            expected,
        };
        let number = |i: usize, expected: &'static str| -> Result<f64, TraceError> {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| error(expected))
        };
        let second: u64 = fields
            .first()
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| error("a whole, non-negative `second` first"))?;
        let gap = match previous {
            Some((before, _)) if second <= before => {
                return Err(error(
                    "a `second` after the one on the line before (seconds in order, each once)",
                ));
            }
            Some((before, _)) => second - before,
            None => 1,
        };
        if counter {
            let total = number(1, "`second,http_requests_total` with a non-negative total")?;
            // The first sample only sets the counter's base; a reset counts from zero.
            if let Some((_, before)) = previous {
                let increase = if total >= before {
                    total - before
                } else {
                    total
                };
                let per_second = increase / gap as f64;
                loads.extend((0..gap).map(|_| Load {
                    arrivals: per_second,
                    service: default_service,
                }));
            } else {
                loads.push(Load {
                    arrivals: 0.0,
                    service: default_service,
                });
            }
            previous = Some((second, total));
        } else {
            let arrivals = number(1, "`second,arrivals,service_ms` with non-negative numbers")?;
            let service_ms = number(2, "`second,arrivals,service_ms` with non-negative numbers")?;
            let service = Duration::from_secs_f64(service_ms / 1000.0);
            // The seconds not written had no arrivals.
            loads.extend((1..gap).map(|_| Load {
                arrivals: 0.0,
                service,
            }));
            loads.push(Load { arrivals, service });
            previous = Some((second, 0.0));
        }
    }
    Ok(loads)
}

pub fn read_trace(path: &Path, default_service: Duration) -> Result<Vec<Load>, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_trace(&text, default_service)
}

/// What the simulation saw in one second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Row {
    pub second: u32,
    /// Requests that arrived.
    pub load: f64,
    /// Time-weighted average of requests in flight or held.
    pub in_flight: f64,
    pub desired: u32,
    pub ready: u32,
    /// Requests held (no ready instance, or every one at its capacity) at the end of the
    /// second.
    pub queued: u32,
    pub panicking: bool,
    /// Instances the averaged demand called for, before `min` and `max`.
    pub wanted: u32,
}

/// How instances behave in the simulation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Model {
    /// From being asked for to ready.
    pub startup: Duration,
    /// Requests one instance serves at once; more wait (as held requests do). `None`: no
    /// limit, nothing ever queues behind a ready instance.
    pub capacity: Option<u32>,
}

const STEPS_PER_SECOND: u32 = 100;

/// Replays `trace` through the policy. Arrivals are spread evenly over each second; a request
/// with no ready instance is held until one is ready; waking from zero happens on the first
/// held request, as in the proxy.
pub fn simulate(trace: &[Load], settings: &Settings, model: &Model) -> Vec<Row> {
    let start = Instant::now();
    let step = Duration::from_secs(1) / STEPS_PER_SECOND;
    let mut policy = Policy::default();
    let mut window = Window::default();
    let mut desired = settings.min;
    // Ready times of the instances asked for, sorted: those in the past are ready.
    let mut instances: Vec<Instant> = vec![start; desired as usize];
    let mut active: Vec<Instant> = Vec::new(); // end times of requests being served
    let mut held: Vec<Duration> = Vec::new(); // service times of requests waiting
    let mut carry = 0.0;
    let mut last_active: Option<Instant> = None;
    let mut rows = Vec::with_capacity(trace.len());

    for (second, load) in trace.iter().enumerate() {
        let mut integral = 0.0;
        let mut answered = 0u32;
        for i in 0..STEPS_PER_SECOND {
            let now = start + Duration::from_secs(second as u64) + step * i;
            let ready = instances.iter().filter(|&&at| at <= now).count();
            // Requests the ready instances take at once.
            let room = model
                .capacity
                .map_or(usize::MAX, |c| ready.saturating_mul(c as usize));
            carry += load.arrivals / f64::from(STEPS_PER_SECOND);
            while carry >= 1.0 {
                carry -= 1.0;
                last_active = Some(now);
                if ready > 0 && held.is_empty() && active.len() < room {
                    active.push(now + load.service);
                } else {
                    held.push(load.service);
                    if desired == 0 {
                        desired = 1;
                        instances.push(now + model.startup);
                    }
                }
            }
            if ready > 0 {
                let admitted = room.saturating_sub(active.len()).min(held.len());
                active.extend(held.drain(..admitted).map(|service| now + service));
            }
            let before = active.len();
            active.retain(|&end| end > now);
            answered += (before - active.len()) as u32;
            if !active.is_empty() || !held.is_empty() {
                last_active = Some(now);
            }
            integral += (active.len() + held.len()) as f64 / f64::from(STEPS_PER_SECOND);
        }

        let now = start + Duration::from_secs(second as u64 + 1);
        window.push(
            Sample {
                at: now,
                concurrency: integral,
                rps: f64::from(answered),
            },
            settings.keep(),
        );
        let ready = instances.iter().filter(|&&at| at <= now).count() as u32;
        let decision = policy.decide(
            &window,
            settings,
            desired,
            Now {
                at: now,
                ready,
                demand: (active.len() + held.len()) as u64,
                last_active,
            },
        );
        let averaged = if decision.panicking {
            decision.stable.max(decision.panic)
        } else {
            decision.stable
        };
        let wanted = (averaged / settings.target).ceil().min(f64::from(u32::MAX)) as u32;
        if decision.desired > desired {
            instances.extend((desired..decision.desired).map(|_| now + model.startup));
        } else {
            // Instances still starting go first, then the oldest ready ones.
            instances.sort();
            instances.truncate(decision.desired as usize);
        }
        desired = decision.desired;
        rows.push(Row {
            second: second as u32,
            load: load.arrivals,
            in_flight: integral,
            desired,
            ready: instances.iter().filter(|&&at| at <= now).count() as u32,
            queued: held.len() as u32,
            panicking: decision.panicking,
            wanted,
        });
    }
    rows
}

/// How often the desired count turned from going up to going down or back.
pub fn direction_changes(rows: &[Row]) -> usize {
    let mut last = 0i64;
    let mut changes = 0;
    for pair in rows.windows(2) {
        let delta = i64::from(pair[1].desired) - i64::from(pair[0].desired);
        if delta != 0 {
            let direction = delta.signum();
            if last != 0 && direction != last {
                changes += 1;
            }
            last = direction;
        }
    }
    changes
}

/// The rows as CSV, one line a second.
pub fn to_csv(rows: &[Row]) -> String {
    let mut csv = String::from("second,load,in_flight,desired,ready,queued,panic,wanted\n");
    for r in rows {
        csv.push_str(&format!(
            "{},{},{:.3},{},{},{},{},{}\n",
            r.second,
            r.load,
            r.in_flight,
            r.desired,
            r.ready,
            r.queued,
            u8::from(r.panicking),
            r.wanted
        ));
    }
    csv
}

/// Load and instances over time, as an SVG chart.
pub fn to_svg(title: &str, rows: &[Row], settings: &Settings) -> String {
    use crate::plot::{Panel, Series};
    let points = |f: &dyn Fn(&Row) -> f64| -> Vec<(f64, f64)> {
        rows.iter().map(|r| (f64::from(r.second), f(r))).collect()
    };
    let wanted = settings.target;
    let panels = [
        Panel {
            y_label: "requests",
            series: vec![
                Series {
                    name: "arrivals per second".into(),
                    color: "#9aa5b1",
                    points: points(&|r| r.load),
                },
                Series {
                    name: "in flight + held (avg)".into(),
                    color: "#1f77b4",
                    points: points(&|r| r.in_flight),
                },
            ],
        },
        Panel {
            y_label: "instances",
            series: vec![
                Series {
                    name: format!("ideal: ceil(in flight / {wanted})"),
                    color: "#c7c7c7",
                    points: points(&|r| f64::from(settings.instances_for(r.in_flight))),
                },
                Series {
                    name: "desired".into(),
                    color: "#d62728",
                    points: points(&|r| f64::from(r.desired)),
                },
                Series {
                    name: "ready".into(),
                    color: "#2ca02c",
                    points: points(&|r| f64::from(r.ready)),
                },
            ],
        },
    ];
    crate::plot::svg(title, "seconds", &panels)
}

#[cfg(test)]
mod tests;
