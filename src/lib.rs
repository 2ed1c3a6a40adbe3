//! wakegate: an HTTP scale-to-zero proxy. It routes traffic to targets, holds requests for a
//! target with no running instance while it wakes one, counts everything it forwards, and
//! stops idle targets again.
//!
//! # Layers
//!
//! Modules depend one way, lowest first; a module names only modules of lower layers (checked
//! by `tests/layering.rs`). Where a lower one needs something from above, it defines the trait
//! and the higher one implements it.
//!
//! 1. helpers that know nothing of wakegate: [`plot`], [`telemetry`], [`demo`] (the demo
//!    backend);
//! 2. [`config`]: the file, its checks, and the typed targets (route, serving, scaling and
//!    exactly one backend) and Kubernetes annotations;
//! 3. [`target`]: a target's runtime handle: endpoints, phase, wake requests and counters;
//!    beside it [`memory`], the process's resident memory against its budget;
//! 4. the data plane, [`proxy`] (route, track, hold, balance, forward), and the providers,
//!    [`provider`] (local processes, fixed upstreams, Kubernetes), side by side;
//! 5. [`scaling`]: the pure policy, the per-target autoscaler loop, the simulator;
//! 6. [`metrics`], then [`admin`], which serves them, and [`keda`], KEDA's external scaler;
//! 7. [`control`]: the reconciler from configured and discovered targets to running ones and
//!    the route table;
//! 8. [`app`]: wiring only; `main.rs` only parses arguments.

pub mod admin;
pub mod app;
pub mod config;
pub mod control;
pub mod demo;
pub mod keda;
pub mod memory;
pub mod metrics;
pub mod plot;
pub mod provider;
pub mod proxy;
pub mod scaling;
pub mod target;
pub mod telemetry;
