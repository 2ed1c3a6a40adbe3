//! A scenario's report: `NAME.md` (a Markdown table with the date and the machine),
//! `NAME.json` (every number) and `NAME.svg` (a chart), written into the output directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use hdrhistogram::Histogram;
use serde_json::json;
use wakegate::plot::{Panel, Series};

use crate::Error;

/// Line colours, one per path or variant, in order.
pub const COLORS: [&str; 5] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];

/// Where and on what a run happened.
pub struct Machine {
    pub date: String,
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    pub load_before: String,
    pub revision: String,
    pub nginx: Option<String>,
    pub haproxy: Option<String>,
}

impl Machine {
    pub fn now(nginx: Option<String>) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
            .map_or("?".into(), |(_, v)| v.trim().to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or("?".into(), |s| s.trim().to_owned());
        let load_before = std::fs::read_to_string("/proc/loadavg").map_or("?".into(), |s| {
            s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        });
        let revision = Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map_or("?".into(), |o| {
                String::from_utf8_lossy(&o.stdout).trim().to_owned()
            });
        Machine {
            date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            cores: crate::stand::threads(),
            cpu,
            kernel,
            load_before,
            revision,
            nginx,
            haproxy: crate::stand::haproxy_version(),
        }
    }

    pub fn markdown(&self) -> String {
        format!(
            "{}, {} cores ({}), Linux {}, {}, {}, wakegate at `{}`; load average before: {}",
            self.date,
            self.cores,
            self.cpu,
            self.kernel,
            self.nginx.as_deref().unwrap_or("no nginx"),
            self.haproxy.as_deref().unwrap_or("no HAProxy"),
            self.revision,
            self.load_before
        )
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "date": self.date,
            "cores": self.cores,
            "cpu": self.cpu,
            "kernel": self.kernel,
            "load_before": self.load_before,
            "revision": self.revision,
            "nginx": self.nginx,
            "haproxy": self.haproxy,
        })
    }
}

/// How a target came out: `met` or `not met`.
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "not met" }
}

/// A Markdown table; every column but the first is right-aligned.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn markdown(&self) -> String {
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        let mut out = line(&self.header);
        let align: Vec<String> = (0..self.header.len())
            .map(|i| if i == 0 { "---" } else { "---:" }.to_owned())
            .collect();
        out.push_str(&line(&align));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

/// The median of `value` over the rows that `keep`.
pub fn median_where<R>(rows: &[R], keep: impl Fn(&R) -> bool, value: impl Fn(&R) -> f64) -> f64 {
    median(
        &rows
            .iter()
            .filter(|r| keep(r))
            .map(value)
            .collect::<Vec<_>>(),
    )
}

pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The value at rank ⌈q·n⌉ of sorted `values` (exact, for a few thousand values at most).
pub fn rank(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// `12.345` style milliseconds, `—` when there is no value.
pub fn ms(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3} ms")
    } else {
        "—".into()
    }
}

pub fn ratio(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "—".into()
    }
}

pub fn int(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.0}")
    } else {
        "—".into()
    }
}

/// Milliseconds at `quantile` of a histogram in microseconds.
pub fn quantile_ms(h: &Histogram<u64>, quantile: f64) -> f64 {
    if h.is_empty() {
        return f64::NAN;
    }
    h.value_at_quantile(quantile) as f64 / 1000.0
}

/// The latency by percentile, x in "nines" (0 = p0, 1 = p90, 2 = p99, 3 = p99.9), y in ms.
pub fn latency_curve(h: &Histogram<u64>, max_nines: f64) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    (0..=(max_nines * 20.0) as usize)
        .map(|i| {
            let nines = i as f64 / 20.0;
            let quantile = 1.0 - 10f64.powf(-nines);
            (nines, quantile_ms(h, quantile))
        })
        .collect()
}

pub fn series(name: impl Into<String>, index: usize, points: Vec<(f64, f64)>) -> Series {
    Series {
        name: name.into(),
        color: COLORS[index % COLORS.len()],
        points,
    }
}

/// Writes `NAME.md`, `NAME.json` and `NAME.svg` into `out`; returns the Markdown path.
pub fn write(
    out: &Path,
    name: &str,
    markdown: &str,
    data: serde_json::Value,
    chart_title: &str,
    x_label: &str,
    panels: &[Panel],
) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(format!("create {}", out.display()), e))?;
    let write = |file: String, text: String| {
        let path = out.join(file);
        std::fs::write(&path, text)
            .map_err(|e| Error::io(format!("write {}", path.display()), e))
            .map(|()| path)
    };
    let md = write(format!("{name}.md"), markdown.to_owned())?;
    let mut json = serde_json::to_string_pretty(&data).expect("JSON values serialise");
    json.push('\n');
    write(format!("{name}.json"), json)?;
    write(
        format!("{name}.svg"),
        wakegate::plot::svg(chart_title, x_label, panels),
    )?;
    Ok(md)
}
