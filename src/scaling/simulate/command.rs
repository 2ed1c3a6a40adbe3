//! `wakegate simulate`: replays a trace file with the scaling settings of a configuration
//! file (or the defaults) and writes a per-second CSV and an SVG plot.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Model, TraceError, direction_changes, read_trace, simulate, to_csv, to_svg};
use crate::config::{Config, ConfigError, Scaling, Serving};
use crate::scaling::policy::Settings;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Simulation {
    pub trace: PathBuf,
    /// Take the scaling settings from this configuration (default: the defaults).
    pub config: Option<PathBuf>,
    /// Which target of `config` (default: the first one).
    pub target: Option<String>,
    pub startup_delay: Duration,
    /// Service time of each request in an `http_requests_total` trace.
    pub service_time: Duration,
    /// Requests one instance serves at once (default: no limit).
    pub capacity: Option<u32>,
    pub out_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error("--target: got {got:?}, expected one of the targets in {config}")]
    NoSuchTarget { got: String, config: String },
    #[error("cannot write results to {dir}: {source}")]
    Write { dir: String, source: std::io::Error },
}

impl Simulation {
    /// Runs the simulation, writes `<trace name>.csv` and `.svg` to `out_dir`, and returns a
    /// one-line summary.
    pub fn run(&self) -> Result<String, SimulateError> {
        let settings = match &self.config {
            None => Settings::new(&Scaling::default(), Serving::default().idle_timeout),
            Some(path) => self.settings_from(path)?,
        };
        let loads = read_trace(&self.trace, self.service_time)?;
        let rows = simulate(
            &loads,
            &settings,
            &Model {
                startup: self.startup_delay,
                capacity: self.capacity,
            },
        );
        let name = self
            .trace
            .file_stem()
            .map_or("trace".into(), |s| s.to_string_lossy());
        let csv = self.out_dir.join(format!("{name}.csv"));
        let svg = self.out_dir.join(format!("{name}.svg"));
        let title = format!(
            "{name}: load and instances (target {} per instance, start-up {})",
            settings.target,
            humantime::format_duration(self.startup_delay)
        );
        std::fs::create_dir_all(&self.out_dir)
            .and_then(|()| std::fs::write(&csv, to_csv(&rows)))
            .and_then(|()| std::fs::write(&svg, to_svg(&title, &rows, &settings)))
            .map_err(|source| SimulateError::Write {
                dir: self.out_dir.display().to_string(),
                source,
            })?;
        let max = rows.iter().map(|r| r.desired).max().unwrap_or(0);
        let changes = direction_changes(&rows);
        let queued = rows.iter().map(|r| r.queued).max().unwrap_or(0);
        let capped: Vec<u32> = rows
            .iter()
            .filter(|r| r.wanted > settings.max)
            .map(|r| r.wanted)
            .collect();
        let note = match capped.iter().max() {
            Some(most) => format!(
                "; max ({}) capped the demand in {} second(s), which called for up to {most} instances",
                settings.max,
                capped.len()
            ),
            None => String::new(),
        };
        Ok(format!(
            "{} seconds: up to {max} instances, {changes} changes of direction, at most {queued} requests held{note}; wrote {} and {}",
            rows.len(),
            csv.display(),
            svg.display()
        ))
    }

    fn settings_from(&self, path: &Path) -> Result<Settings, SimulateError> {
        let config = Config::load(path)?;
        let chosen = match &self.target {
            Some(name) => config.targets.iter().find(|t| &t.name == name),
            None => config.targets.first(),
        };
        chosen
            .map(Settings::of)
            .ok_or_else(|| SimulateError::NoSuchTarget {
                got: self.target.clone().unwrap_or_default(),
                config: path.display().to_string(),
            })
    }
}
