//! wakegate: an HTTP scale-to-zero proxy. It routes traffic to targets, holds requests for a
//! target with no running instance while it wakes one, counts everything it forwards, and
//! stops idle targets again.

pub mod admin;
pub mod app;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod plot;
pub mod provider;
pub mod proxy;
pub mod scaling;
pub mod target;
pub mod telemetry;
