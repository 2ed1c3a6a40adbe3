//! Wiring only: binds the listeners, starts the Kubernetes provider (if configured), the
//! reconciler, the proxy workers and the admin endpoints; applies reloads on SIGHUP and drains
//! on shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Admin};
use crate::config::{AccessLogConfig, Config};
use crate::control::Control;
use crate::keda;
use crate::metrics::Metrics;
use crate::provider::kubernetes::{self, KubeError, KubernetesProvider};
use crate::proxy::access_log::AccessLog;
use crate::proxy::server::Listeners;
use crate::proxy::tls::{CertificateErrors, Tls};
use crate::proxy::{self, Shared, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install the {0} signal handler: {1}")]
    Signal(&'static str, std::io::Error),
    #[error("cannot start the proxy worker threads: {0}")]
    Workers(std::io::Error),
    #[error(transparent)]
    Kubernetes(#[from] KubeError),
    #[error("TLS certificates cannot be used:\n{0}")]
    Tls(#[from] CertificateErrors),
    #[error("cannot open the access log {path}: {source}")]
    AccessLog {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Opens (or reopens) the access log `config` asks for, or none.
fn open_access_log(
    config: Option<&AccessLogConfig>,
    shared: &Shared,
) -> Result<Option<Arc<AccessLog>>, AppError> {
    config
        .map(|config| {
            AccessLog::open(config, shared.access_log_dropped.clone())
                .map(Arc::new)
                .map_err(|source| AppError::AccessLog {
                    path: config.path.clone(),
                    source,
                })
        })
        .transpose()
}

/// Runs wakegate until `shutdown` is cancelled, then drains and returns.
/// `config_path`, when given, is re-read on SIGHUP.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let listen = &config.listen;
    let proxy_listeners =
        proxy::server::bind(listen.proxy, listen.workers()).map_err(|source| AppError::Bind {
            what: "proxy traffic",
            addr: listen.proxy,
            source,
        })?;
    // Certificates first: a bad one stops the start, naming the file.
    let tls = match &config.tls {
        Some(tls) => Some(Arc::new(Tls::new(&tls.certificates)?)),
        None => None,
    };
    let tls_listeners: Vec<Option<std::net::TcpListener>> = match &config.tls {
        Some(tls) => proxy::server::bind(tls.listen, listen.workers())
            .map_err(|source| AppError::Bind {
                what: "HTTPS proxy traffic",
                addr: tls.listen,
                source,
            })?
            .into_iter()
            .map(Some)
            .collect(),
        None => proxy_listeners.iter().map(|_| None).collect(),
    };
    let tls_addr = tls_listeners
        .first()
        .and_then(|l| l.as_ref())
        .and_then(|l| l.local_addr().ok());
    let proxy_listeners: Vec<_> = proxy_listeners
        .into_iter()
        .zip(tls_listeners)
        .map(|(plain, tls)| Listeners { plain, tls })
        .collect();
    let admin_listener =
        TcpListener::bind(listen.admin)
            .await
            .map_err(|source| AppError::Bind {
                what: "admin",
                addr: listen.admin,
                source,
            })?;
    let scaler_listener = match listen.external_scaler {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| AppError::Bind {
                    what: "KEDA's external scaler",
                    addr,
                    source,
                })?,
        ),
        None => None,
    };
    let scaler_addr = scaler_listener.as_ref().and_then(|l| l.local_addr().ok());
    let proxy_addr = proxy_listeners
        .first()
        .and_then(|l| l.plain.local_addr().ok());
    let admin_addr = admin_listener.local_addr().ok();

    let mut registry = Registry::default();
    // Registered only with the scaler on: no KEDA series where there is no KEDA.
    let scaler_stats = match &scaler_listener {
        Some(_) => keda::Stats::register(&mut registry),
        None => keda::Stats::default(),
    };
    let kube_stop = CancellationToken::new();
    let (kube, mut discovered, kube_tasks) = match &config.kubernetes {
        Some(k) => {
            let client = kubernetes::client(k).await?;
            // KEDA may ask any replica for the cluster-wide signal.
            let sum_on_every_replica = listen.external_scaler.is_some();
            let started = KubernetesProvider::start(
                client,
                k.clone(),
                &mut registry,
                sum_on_every_replica,
                kube_stop.clone(),
            );
            (Some(started.provider), Some(started.targets), started.tasks)
        }
        None => (None, None, Vec::new()),
    };
    // Ready once the targets of the first Kubernetes sync are routed, not merely listed: a
    // request sent the moment `/readyz` says so finds its route.
    let (routed, routed_rx) = watch::channel(discovered.is_none());
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let peers = kube.as_ref().map(KubernetesProvider::peer_signal);
    let mut control = Control::new(snapshot.clone(), kube);
    control.apply_file(&config);

    let (drain_timeout, drain_timeout_rx) = watch::channel(config.drain_timeout);
    let (limits, limits_rx) = watch::channel(config.limits.clone());
    let shared = Arc::new(Shared::new(
        snapshot,
        drain_timeout_rx,
        tls.clone(),
        limits_rx,
    ));
    shared
        .access_log
        .store(open_access_log(config.access_log.as_ref(), &shared)?);
    let memory_stop = CancellationToken::new();
    let memory_task = tokio::spawn(
        shared
            .memory
            .clone()
            .watch(shared.limits.clone(), memory_stop.clone()),
    );
    let tls_stop = CancellationToken::new();
    let tls_watch = tls
        .clone()
        .map(|tls| tokio::spawn(tls.watch(tls_stop.clone())));
    let admin = Arc::new(Admin {
        metrics: Metrics::new(registry, shared.clone()),
        proxy: shared.clone(),
        routed: routed_rx,
        peers,
    });
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin, admin_stop.clone()));

    let scaler_stop = CancellationToken::new();
    let scaler_task = scaler_listener.map(|listener| {
        tokio::spawn(keda::serve(
            listener,
            shared.snapshot.clone(),
            scaler_stats.clone(),
            scaler_stop.clone(),
        ))
    });

    let accept_stop = CancellationToken::new();
    let proxy_workers = proxy::server::Workers::spawn(proxy_listeners, &shared, &accept_stop)
        .map_err(AppError::Workers)?;
    // Before saying so: a SIGHUP without a handler would end the process.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| AppError::Signal("SIGHUP", e))?;
    tracing::info!(
        proxy = %proxy_addr.map(|a| a.to_string()).unwrap_or_default(),
        https = %tls_addr.map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin_addr.map(|a| a.to_string()).unwrap_or_default(),
        external_scaler = %scaler_addr.map(|a| a.to_string()).unwrap_or_default(),
        targets = config.targets.len(),
        "listening"
    );

    let mut current = config;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Ok(()) = async { match discovered.as_mut() {
                Some(rx) => rx.changed().await,
                None => std::future::pending().await,
            } } => {
                let targets = discovered.as_mut().and_then(|rx| rx.borrow_and_update().clone());
                if let Some(targets) = targets {
                    tracing::info!(targets = targets.len(), "Kubernetes targets changed");
                    control.apply_discovered(targets);
                    routed.send_replace(true);
                }
            }
            _ = hangup.recv() => {
                let Some(path) = &config_path else {
                    tracing::warn!("SIGHUP ignored: no configuration file to reload");
                    continue;
                };
                match Config::load(path) {
                    Ok(mut next) => {
                        let fields = next.restart_needed(&current);
                        if !fields.is_empty() {
                            tracing::warn!(fields = %fields.join(", "), "these settings change only on a restart; keeping the running ones");
                            // What runs keeps running as it is.
                            next.listen = current.listen.clone();
                            next.kubernetes = current.kubernetes.clone();
                            if let (Some(next), Some(running)) = (&mut next.tls, &current.tls) {
                                next.listen = running.listen;
                            } else {
                                next.tls = current.tls.clone();
                            }
                        }
                        control.apply_file(&next);
                        drain_timeout.send_replace(next.drain_timeout);
                        limits.send_if_modified(|running| {
                            let changed = *running != next.limits;
                            *running = next.limits.clone();
                            changed
                        });
                        // Reopened even when unchanged, for logrotate; a log that cannot be
                        // opened leaves the running one.
                        match open_access_log(next.access_log.as_ref(), &shared) {
                            Ok(log) => shared.access_log.store(log),
                            Err(error) => tracing::error!(%error, "access log not reopened; keeping the running one"),
                        }
                        if let (Some(tls), Some(files)) = (&tls, &next.tls) {
                            // A failure is logged, and the certificates in use stay.
                            let _ = tls.reload(&files.certificates);
                        }
                        tracing::info!(targets = next.targets.len(), "configuration reloaded");
                        current = next;
                    }
                    Err(error) => tracing::error!(%error, "configuration reload rejected; keeping the running one"),
                }
            }
        }
    }

    let drain = *drain_timeout.borrow();
    tracing::info!(drain_timeout = %humantime::format_duration(drain), "shutting down: draining");
    shared.draining.store(true, Ordering::Relaxed);
    accept_stop.cancel();
    proxy_workers.join().await;
    // Every request is answered: what their log lines say is written out.
    if let Some(log) = shared.access_log.swap(None).and_then(Arc::into_inner) {
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
    }
    control.shutdown().await;
    kube_stop.cancel();
    tls_stop.cancel();
    memory_stop.cancel();
    let _ = memory_task.await;
    if let Some(task) = tls_watch {
        let _ = task.await;
    }
    for task in kube_tasks {
        let _ = task.await;
    }
    scaler_stop.cancel();
    if let Some(task) = scaler_task {
        let _ = task.await;
    }
    admin_stop.cancel();
    let _ = admin_task.await;
    tracing::info!("stopped");
    Ok(())
}
