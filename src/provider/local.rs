//! Local processes: a target's `command` is started on a free loopback port when it is scaled
//! up, held back from traffic until its readiness check passes, and stopped (SIGTERM, then
//! SIGKILL after `stop_grace`) when scaled to zero. Children never outlive wakegate.

mod notify;
mod output;

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::uri::Authority;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use self::notify::NotifySocket;
use self::output::OutputTail;
use super::probe::probe;
use super::{Desired, Managed, Provider, Scale};
use crate::config::{Local, Protocol, ReadyCheck};
use crate::target::streams::Close;
use crate::target::{Backoff, Endpoint, Phase, Target};

/// How often a starting instance's `tcp` readiness is checked, from its spawn on. A refused
/// loopback connect costs about 15 µs of CPU, so this adds about a millisecond at most to a cold
/// start for under 2 % of a core while the instance starts.
const TCP_POLL: Duration = Duration::from_millis(1);
/// As [`TCP_POLL`] for `http_get`. Until the port listens a probe is the same refused connect;
/// after that each probe is a request the booting server must answer (about 60 µs of
/// wakegate's CPU, and the server's own), so at most one every 2 ms, one at a time.
const HTTP_POLL: Duration = Duration::from_millis(2);

/// Starts and stops local processes. Each target's instances are its own task's alone.
#[derive(Debug, Default)]
pub struct LocalProvider;

impl Provider for LocalProvider {
    type Backend = Local;

    fn manage(&self, target: Arc<Target>, local: &Local, stop: CancellationToken) -> Managed {
        let (scale, desired) = Scale::channel();
        let task = tokio::spawn(supervise(target, Arc::new(local.clone()), desired, stop));
        Managed {
            scale,
            task,
            remote: None,
        }
    }
}

struct Instance {
    child: Child,
    pid: u32,
    endpoint: Arc<Endpoint>,
    /// When it became ready: one that exits soon after crashed.
    ready_at: Instant,
    /// The socket it notified its readiness on, until the instance is published.
    notify: Option<NotifySocket>,
    output: Arc<OutputTail>,
}

/// Converges the target's instances to what is desired, until `stop`.
async fn supervise(
    target: Arc<Target>,
    local: Arc<Local>,
    mut desired: watch::Receiver<Desired>,
    stop: CancellationToken,
) {
    let mut ready: Vec<Instance> = Vec::new();
    let mut starting: JoinSet<Result<Instance, String>> = JoinSet::new();
    let mut stopping: JoinSet<()> = JoinSet::new();
    // After a failed start (or a crash) nothing is started again until scale() asks again,
    // and not before the crash back-off ends: failed starts and early crashes in a row.
    let mut failed_at: Option<u64> = None;
    let mut failures: u32 = 0;
    let mut retry_at: Option<Instant> = None;
    let mut published = (Vec::new(), Phase::Cold);
    while !stop.is_cancelled() {
        let want = *desired.borrow_and_update();
        let wanted = want.replicas as usize;
        let backing_off = retry_at.is_some_and(|at| at > Instant::now());
        if wanted > ready.len() + starting.len() && failed_at != Some(want.asked) && !backing_off {
            for _ in ready.len() + starting.len()..wanted {
                // A span for the start, for traces and `RUST_LOG=debug` logs.
                let span = tracing::debug_span!("wake", target = %target.name());
                starting.spawn(start(target.clone(), local.clone(), stop.clone()).instrument(span));
            }
        }
        while ready.len() > wanted {
            // The least busy instance goes; it is out of rotation before it drains.
            let (at, _) = ready
                .iter()
                .enumerate()
                .min_by_key(|(_, i)| i.endpoint.in_flight())
                .expect("more instances than wanted");
            let leaving = ready.swap_remove(at);
            publish(&target, &ready, &starting, &stopping, &mut published);
            // Its streams close gracefully while it drains.
            leaving.endpoint.close_streams(if ready.is_empty() {
                Close::ScaledToZero
            } else {
                Close::ScaledDown
            });
            stopping.spawn(stop_instance(
                target.clone(),
                local.stop_grace,
                leaving,
                "scaled down",
            ));
        }
        publish(&target, &ready, &starting, &stopping, &mut published);

        tokio::select! {
            changed = desired.changed() => if changed.is_err() { break },
            Some(started) = starting.join_next(), if !starting.is_empty() => match started {
                Ok(Ok(mut instance)) => {
                    let notify = instance.notify.take();
                    ready.push(instance);
                    failed_at = None;
                    retry_at = None;
                    target.backoff_cleared();
                    // Removing the socket's file and directory can take milliseconds on a
                    // busy disk: not before the held requests have their instance.
                    publish(&target, &ready, &starting, &stopping, &mut published);
                    drop(notify);
                }
                Ok(Err(reason)) => {
                    let backoff = next_backoff(&mut failures, &ready, local.start_backoff);
                    retry_at = Some(backoff.until);
                    tracing::warn!(
                        target = %target.name(),
                        %reason,
                        failures,
                        retry_in_ms = backoff.until.saturating_duration_since(Instant::now()).as_millis() as u64,
                        "start failed"
                    );
                    target.start_failed(reason, Some(backoff));
                    failed_at = Some(want.asked);
                }
                Err(error) => tracing::error!(target = %target.name(), %error, "start task failed"),
            },
            (at, status) = exited(&mut ready) => {
                let gone = ready.swap_remove(at);
                let ran = gone.ready_at.elapsed();
                tracing::warn!(target = %target.name(), pid = gone.pid, %status, ran_ms = ran.as_millis() as u64, "instance exited by itself");
                if ran < Backoff::HEALTHY_RUN {
                    let backoff = next_backoff(&mut failures, &ready, local.start_backoff);
                    retry_at = Some(backoff.until);
                    let reason = format!(
                        "an instance exited ({status}) {} after it became ready",
                        humantime::format_duration(Duration::from_millis(ran.as_millis() as u64))
                    );
                    target.crashed(gone.output.explain(reason).await, backoff);
                } else {
                    failures = 0;
                }
                // Started again on the next request (or the autoscaler's next ask).
                failed_at = Some(want.asked);
            }
            Some(_) = stopping.join_next(), if !stopping.is_empty() => {}
            () = stop.cancelled() => {}
        }
    }
    // Shutdown: starts in progress see `stop` and give up; the running instances stop together.
    while let Some(started) = starting.join_next().await {
        if let Ok(Ok(instance)) = started {
            ready.push(instance);
        }
    }
    for instance in ready.drain(..) {
        stopping.spawn(stop_instance(
            target.clone(),
            local.stop_grace,
            instance,
            "shutdown",
        ));
    }
    publish(&target, &ready, &starting, &stopping, &mut published);
    while stopping.join_next().await.is_some() {}
    target.publish(Vec::new(), Phase::Cold);
}

/// Counts one more failed start or early crash, and says how long no start is tried. An
/// instance still up a healthy run after it became ready means the earlier failures are over.
fn next_backoff(failures: &mut u32, ready: &[Instance], first: Duration) -> Backoff {
    if ready
        .iter()
        .any(|i| i.ready_at.elapsed() >= Backoff::HEALTHY_RUN)
    {
        *failures = 0;
    }
    *failures += 1;
    Backoff::after(*failures, first, Instant::now())
}

/// Publishes the ready endpoints and the phase, if they changed.
fn publish(
    target: &Target,
    ready: &[Instance],
    starting: &JoinSet<Result<Instance, String>>,
    stopping: &JoinSet<()>,
    published: &mut (Vec<Arc<Endpoint>>, Phase),
) {
    let endpoints: Vec<Arc<Endpoint>> = ready.iter().map(|i| i.endpoint.clone()).collect();
    let phase = if !ready.is_empty() {
        Phase::Ready
    } else if !starting.is_empty() {
        Phase::Starting
    } else if !stopping.is_empty() {
        Phase::Stopping
    } else {
        Phase::Cold
    };
    let same = phase == published.1
        && endpoints.len() == published.0.len()
        && endpoints
            .iter()
            .zip(&published.0)
            .all(|(a, b)| Arc::ptr_eq(a, b));
    if !same {
        if phase == Phase::Starting {
            // Nothing ready, something starting: a wake from zero.
            target.waking();
        }
        target.publish(endpoints.clone(), phase);
        *published = (endpoints, phase);
    }
}

/// Resolves with the index and exit status of the first instance that exits.
async fn exited(instances: &mut [Instance]) -> (usize, String) {
    if instances.is_empty() {
        return std::future::pending().await;
    }
    let waits = instances.iter_mut().map(|i| Box::pin(i.child.wait()));
    let (status, at, _) = futures_util::future::select_all(waits).await;
    (at, describe(status))
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("unknown status ({e})"),
    }
}

/// How many ports a start tries when the one it picked is taken before the instance binds it.
const PORT_ATTEMPTS: u32 = 3;

/// Starts one instance and waits until it is ready, it exits, `cold_start_timeout` passes or
/// wakegate stops. A free port is picked by binding and releasing it, so another process may
/// take it before the instance binds it: a start that fails that way is tried on a new port.
async fn start(
    target: Arc<Target>,
    local: Arc<Local>,
    stop: CancellationToken,
) -> Result<Instance, String> {
    let began = Instant::now();
    let mut attempt = 1;
    loop {
        let port = free_port().map_err(|e| format!("no free local port: {e}"))?;
        match start_on(&target, &local, port, &stop).await {
            Err(Failed::PortTaken(reason)) if attempt < PORT_ATTEMPTS => {
                tracing::warn!(target = %target.name(), port, %reason, "port taken by another process before the instance bound it; trying a new port");
                attempt += 1;
            }
            Err(Failed::PortTaken(reason) | Failed::Other(reason)) => return Err(reason),
            Ok(instance) => {
                let took = began.elapsed();
                tracing::info!(target = %target.name(), pid = instance.pid, port, took_ms = took.as_millis() as u64, "instance ready");
                return Ok(instance);
            }
        }
    }
}

enum Failed {
    /// The process exited during start-up and another process now listens on its port.
    PortTaken(String),
    Other(String),
}

impl From<String> for Failed {
    fn from(reason: String) -> Self {
        Failed::Other(reason)
    }
}

/// One start attempt on `port`, given `cold_start_timeout` from its spawn on.
async fn start_on(
    target: &Target,
    local: &Local,
    port: u16,
    stop: &CancellationToken,
) -> Result<Instance, Failed> {
    // Bound before the spawn, so that no notification comes too early.
    let notify = match local.ready {
        ReadyCheck::Notify => {
            Some(NotifySocket::bind().map_err(|e| format!("cannot create a notify socket: {e}"))?)
        }
        _ => None,
    };
    let mut child = spawn(local, port, notify.as_ref())?;
    let output = OutputTail::capture(&mut child, target.name());
    let pid = child.id().unwrap_or_default();
    tracing::info!(target = %target.name(), pid, port, "starting instance");
    let authority: Authority = format!("127.0.0.1:{port}")
        .parse()
        .expect("valid authority");

    let timeout = target.serving.cold_start_timeout;
    let last_probe = Mutex::new(None);
    let outcome = tokio::select! {
        ready = wait_ready(&local.ready, target.serving.protocol, &authority, notify.as_ref(), pid, &last_probe) => ready.map_err(Failed::Other),
        status = child.wait() => {
            let reason = format!("process exited during start-up ({})", describe(status));
            Err(if port_in_use(port) { Failed::PortTaken(reason) } else { Failed::Other(reason) })
        }
        () = tokio::time::sleep(timeout) => Err(Failed::Other(not_ready(timeout, &last_probe, pid, port))),
        () = stop.cancelled() => Err(Failed::Other("wakegate is shutting down".to_owned())),
    };
    if let Err(failed) = outcome {
        terminate(&mut child, pid, local.stop_grace).await;
        if stop.is_cancelled() {
            return Err(failed);
        }
        return Err(match failed {
            Failed::PortTaken(reason) => Failed::PortTaken(output.explain(reason).await),
            Failed::Other(reason) => Failed::Other(output.explain(reason).await),
        });
    }
    Ok(Instance {
        child,
        pid,
        endpoint: Endpoint::new(authority),
        ready_at: Instant::now(),
        notify,
        output,
    })
}

/// Why an instance was not ready in time: what the last readiness probe saw and, when nothing
/// listened on the port it was given, the ports its processes listen on instead.
fn not_ready(timeout: Duration, last_probe: &Mutex<Option<String>>, pid: u32, port: u16) -> String {
    let mut reason = format!("not ready within {}", humantime::format_duration(timeout));
    let last = last_probe
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some(saw) = last {
        reason.push_str("; the last readiness probe: ");
        reason.push_str(&saw);
    }
    let elsewhere: Vec<String> = listening_ports(pid)
        .into_iter()
        .filter(|p| *p != port)
        .map(|p| p.to_string())
        .collect();
    if !elsewhere.is_empty() {
        reason.push_str(&format!(
            "; the instance listens on port {} instead of {port}, the one in {{port}} and $PORT",
            elsewhere.join(", ")
        ));
    }
    reason
}

/// The TCP ports on which the processes of the process group `pid` leads listen (Linux:
/// from /proc; empty elsewhere or when it cannot be read).
fn listening_ports(pid: u32) -> Vec<u16> {
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut sockets = std::collections::HashSet::new();
    for process in processes.flatten() {
        let name = process.file_name();
        let Some(name) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // The process group is the fifth field of /proc/PID/stat, after the parenthesized name.
        let in_group = std::fs::read_to_string(format!("/proc/{name}/stat"))
            .ok()
            .and_then(|stat| {
                let after_name = &stat[stat.rfind(')')? + 1..];
                after_name.split_whitespace().nth(2)?.parse::<u32>().ok()
            })
            == Some(pid);
        if !in_group {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{name}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path())
                && let Some(inode) = link
                    .to_str()
                    .and_then(|l| l.strip_prefix("socket:["))
                    .and_then(|l| l.strip_suffix(']'))
            {
                sockets.insert(inode.to_owned());
            }
        }
    }
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 9
                && fields[3] == "0A"
                && sockets.contains(fields[9])
                && let Some(port) = fields[1]
                    .rsplit(':')
                    .next()
                    .and_then(|hex| u16::from_str_radix(hex, 16).ok())
            {
                ports.push(port);
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Whether some process listens on `port` of the loopback address.
fn port_in_use(port: u16) -> bool {
    matches!(
        std::net::TcpListener::bind(("127.0.0.1", port)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse
    )
}

fn spawn(config: &Local, port: u16, notify: Option<&NotifySocket>) -> Result<Child, String> {
    let argv: Vec<String> = config
        .command
        .iter()
        .map(|a| a.replace("{port}", &port.to_string()))
        .collect();
    let (program, args) = argv.split_first().ok_or("empty command")?;
    // `wakegate` names this very binary, so examples work without installing it.
    let program = if program == "wakegate" {
        std::env::current_exe().map_err(|e| format!("cannot find wakegate's own binary: {e}"))?
    } else {
        program.into()
    };
    let mut command = Command::new(&program);
    command
        .args(args)
        // Only the instance's own notify socket: one inherited from whatever supervises
        // wakegate would take the instance's notifications for wakegate's.
        .env_remove("NOTIFY_SOCKET")
        .envs(&config.env)
        .env("PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Own process group: a Ctrl-C on wakegate's terminal does not reach the instance
        // directly, and a stop reaches the whole group.
        .process_group(0);
    if let Some(notify) = notify {
        command.env("NOTIFY_SOCKET", notify.path());
    }
    if let Some(cwd) = &config.cwd {
        command.current_dir(cwd);
    }
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            // Killed with wakegate, even if wakegate itself is killed with SIGKILL.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().map_err(|e| match &config.cwd {
        // The OS reports a missing working directory as the program's own error.
        Some(cwd) if !cwd.is_dir() => format!(
            "cannot start in {}: the target's cwd is not an existing directory",
            cwd.display()
        ),
        _ => format!("cannot run {}: {e}", program.display()),
    })
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Resolves once the instance is ready, or with why it never will be.
async fn wait_ready(
    check: &ReadyCheck,
    protocol: Protocol,
    authority: &Authority,
    notify: Option<&NotifySocket>,
    pid: u32,
    last_probe: &Mutex<Option<String>>,
) -> Result<(), String> {
    if let Some(socket) = notify {
        return socket
            .ready(pid)
            .await
            .map_err(|e| format!("notify socket failed: {e}"));
    }
    let every = match check {
        ReadyCheck::HttpGet(_) | ReadyCheck::Grpc(_) => HTTP_POLL,
        _ => TCP_POLL,
    };
    // An interval rather than a sleep after each probe: tokio rounds a sleep up to its next
    // millisecond tick, so `sleep(1 ms)` waits about 2 ms. The first tick is immediate.
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match probe(check, protocol, authority).await {
            Ok(()) => return Ok(()),
            Err(saw) => *last_probe.lock().unwrap_or_else(PoisonError::into_inner) = Some(saw),
        }
    }
}

/// Lets an instance that is already out of rotation finish its in-flight requests, then stops it.
async fn stop_instance(
    target: Arc<Target>,
    grace: Duration,
    mut instance: Instance,
    why: &'static str,
) {
    if !instance.endpoint.drain(grace).await {
        tracing::warn!(target = %target.name(), pid = instance.pid, "stopping with requests still in flight");
    }
    tracing::info!(target = %target.name(), pid = instance.pid, reason = why, "stopping instance");
    terminate(&mut instance.child, instance.pid, grace).await;
}

/// SIGTERM to the instance's process group, SIGKILL after `grace`, then reap it.
async fn terminate(child: &mut Child, pid: u32, grace: Duration) {
    if pid == 0 {
        let _ = child.kill().await;
        return;
    }
    let group = -(pid as libc::pid_t);
    if let Ok(Some(_)) = child.try_wait() {
        // The instance itself is gone; what it started in its group may not be.
        // SAFETY: plain syscall on a process group wakegate created.
        unsafe { libc::kill(group, libc::SIGKILL) };
        return;
    }
    // SAFETY: plain syscall on a process group wakegate created.
    unsafe { libc::kill(group, libc::SIGTERM) };
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        tracing::warn!(pid, "instance ignored SIGTERM; sending SIGKILL");
        // SAFETY: as above.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = child.wait().await;
    }
}
