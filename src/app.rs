//! Wires it all together: listeners, the targets and their providers and autoscalers, the
//! admin endpoints; reloads routes on SIGHUP and drains on shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Admin};
use crate::config::{Config, TargetConfig};
use crate::metrics::Metrics;
use crate::provider::Provider;
use crate::provider::fixed::FixedProvider;
use crate::provider::kubernetes::{self, KubeError, KubernetesProvider};
use crate::provider::local::LocalProvider;
use crate::proxy::route::{HostPattern, RouteTable};
use crate::proxy::{self, Proxy, Snapshot, Unrouted};
use crate::scaling::autoscaler::{self, RemoteSignal};
use crate::target::Target;

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
}

/// A target together with the tasks that look after it.
struct Managed {
    /// The latest configuration; its routing fields may be newer than `target.config`'s.
    config: TargetConfig,
    target: Arc<Target>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// The control plane's view of what runs; the data plane only sees the published snapshot.
struct Control {
    snapshot: Arc<ArcSwap<Snapshot>>,
    /// By "namespace/name".
    managed: HashMap<String, Managed>,
    retired: Vec<Managed>,
    local: Arc<LocalProvider>,
    fixed: Arc<FixedProvider>,
    kube: Option<Arc<KubernetesProvider>>,
    interval: Duration,
    /// Targets from the configuration file, and those discovered in Kubernetes.
    from_file: Vec<TargetConfig>,
    discovered: Vec<TargetConfig>,
}

fn key(t: &TargetConfig) -> String {
    format!("{}/{}", t.namespace, t.name)
}

impl Control {
    fn apply_file(&mut self, config: &Config) {
        self.from_file = config.targets.clone();
        self.apply();
    }

    fn apply_discovered(&mut self, targets: Vec<TargetConfig>) {
        self.discovered = targets;
        self.apply();
    }

    /// Makes the running targets and routes match the configured and discovered ones.
    /// Targets whose runtime settings are unchanged keep their instances and counters; the
    /// others are replaced, and the old ones stop once their in-flight requests are done.
    fn apply(&mut self) {
        let mut next = HashMap::new();
        let wanted: Vec<TargetConfig> = self
            .from_file
            .iter()
            .chain(&self.discovered)
            .cloned()
            .collect();
        for tc in &wanted {
            let managed = match self.managed.remove(&key(tc)) {
                Some(old) if old.target.config.same_runtime(tc) => Managed {
                    config: tc.clone(),
                    ..old
                },
                old => {
                    if let Some(old) = old {
                        self.retire(old);
                    }
                    self.start(tc.clone())
                }
            };
            next.insert(key(tc), managed);
        }
        for (_, old) in self.managed.drain() {
            self.retired.push(old);
        }
        for old in &self.retired {
            old.stop.cancel();
        }
        self.retired
            .retain(|m| !m.tasks.iter().all(|task| task.is_finished()));
        self.managed = next;
        self.publish();
    }

    fn retire(&mut self, old: Managed) {
        old.stop.cancel();
        self.retired.push(old);
    }

    fn start(&self, config: TargetConfig) -> Managed {
        let target = Target::new(config.clone());
        let stop = CancellationToken::new();
        let mut remote: Option<Arc<dyn RemoteSignal>> = None;
        let provider: Arc<dyn Provider> = match (&target.config.kubernetes, &self.kube) {
            (Some(_), Some(kube)) => {
                remote = Some(kube.peer_signal());
                Arc::new(kube.clone())
            }
            _ if target.config.upstream.is_some() => self.fixed.clone(),
            _ => self.local.clone(),
        };
        let supervisor = provider.manage(target.clone(), stop.clone());
        let scaler = tokio::spawn(autoscaler::run(
            target.clone(),
            provider,
            self.interval,
            remote,
            stop.clone(),
        ));
        Managed {
            config,
            target,
            stop,
            tasks: vec![supervisor, scaler],
        }
    }

    fn publish(&self) {
        let mut routes = RouteTable::default();
        let mut managed: Vec<&Managed> = self.managed.values().collect();
        managed.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        for m in &managed {
            for host in &m.config.hosts {
                let pattern = HostPattern::parse(host).expect("validated host pattern");
                for prefix in &m.config.path_prefixes {
                    routes.insert(&pattern, prefix, m.target.clone());
                }
            }
        }
        let targets = managed.iter().map(|m| m.target.clone()).collect();
        self.snapshot.store(Arc::new(Snapshot { routes, targets }));
    }

    /// Stops every target and waits until their processes are gone.
    async fn shutdown(mut self) {
        let all: Vec<Managed> = self
            .managed
            .drain()
            .map(|(_, m)| m)
            .chain(self.retired.drain(..))
            .collect();
        for m in &all {
            m.stop.cancel();
        }
        for m in all {
            for task in m.tasks {
                let _ = task.await;
            }
        }
    }
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
    let admin_listener =
        TcpListener::bind(listen.admin)
            .await
            .map_err(|source| AppError::Bind {
                what: "admin",
                addr: listen.admin,
                source,
            })?;
    let proxy_addr = proxy_listeners.first().and_then(|l| l.local_addr().ok());
    let admin_addr = admin_listener.local_addr().ok();

    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let draining = Arc::new(AtomicBool::new(false));
    let unrouted = Arc::new(Unrouted::default());
    let kube_stop = CancellationToken::new();
    let (kube, mut discovered, kube_tasks) = match &config.kubernetes {
        Some(k) => {
            let client = kubernetes::client(k).await?;
            let started = KubernetesProvider::start(client, k.clone(), kube_stop.clone());
            (Some(started.provider), Some(started.targets), started.tasks)
        }
        None => (None, None, Vec::new()),
    };
    // Ready once the targets of the first Kubernetes sync are routed, not merely listed: a
    // request sent the moment `/readyz` says so finds its route.
    let (routed, routed_rx) = tokio::sync::watch::channel(discovered.is_none());
    let mut control = Control {
        snapshot: snapshot.clone(),
        managed: HashMap::new(),
        retired: Vec::new(),
        local: Arc::new(LocalProvider::default()),
        fixed: Arc::new(FixedProvider),
        kube: kube.clone(),
        interval: config.autoscaler.interval,
        from_file: Vec::new(),
        discovered: Vec::new(),
    };
    control.apply_file(&config);

    let admin = Arc::new(Admin {
        metrics: Metrics::new(snapshot.clone(), unrouted.clone(), kube.clone()),
        snapshot: snapshot.clone(),
        draining: draining.clone(),
        routed: routed_rx,
    });
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin, admin_stop.clone()));

    let proxy = Proxy::new(snapshot.clone(), draining.clone(), unrouted);
    let accept_stop = CancellationToken::new();
    let mut drain_timeout = config.drain_timeout;
    let proxy_workers =
        proxy::server::Workers::spawn(proxy_listeners, &proxy, &accept_stop, drain_timeout)
            .map_err(AppError::Workers)?;
    tracing::info!(
        proxy = %proxy_addr.map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin_addr.map(|a| a.to_string()).unwrap_or_default(),
        targets = config.targets.len(),
        "listening"
    );

    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| AppError::Signal("SIGHUP", e))?;
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
                    Ok(next) => {
                        if next.listen != current.listen || next.kubernetes != current.kubernetes {
                            tracing::warn!("listen addresses and [kubernetes] change only on restart; keeping the current ones");
                        }
                        control.apply_file(&next);
                        drain_timeout = next.drain_timeout;
                        tracing::info!(targets = next.targets.len(), "configuration reloaded");
                        current = next;
                    }
                    Err(error) => tracing::error!(%error, "configuration reload rejected; keeping the running one"),
                }
            }
        }
    }

    tracing::info!(drain_timeout = %humantime::format_duration(drain_timeout), "shutting down: draining");
    draining.store(true, std::sync::atomic::Ordering::Relaxed);
    accept_stop.cancel();
    proxy_workers.join().await;
    control.shutdown().await;
    kube_stop.cancel();
    for task in kube_tasks {
        let _ = task.await;
    }
    admin_stop.cancel();
    let _ = admin_task.await;
    tracing::info!("stopped");
    Ok(())
}
