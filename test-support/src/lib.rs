//! wakegate's test harness: runs the real `wakegate` binary on port 0 with a generated
//! config, finds its addresses from its JSON log, and talks to it over real sockets; and
//! [`kube_api`], a Kubernetes API server test double.
//!
//! The harness runs the `wakegate` binary that cargo builds for wakegate's integration tests
//! (see [`bin`]), so it is meant for those tests, as a dev-dependency of wakegate.

pub mod h2_raw;
pub mod kube_api;
pub mod kube_fixtures;
mod recording;

pub use recording::{Recorded, RecordingUpstream};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The path of the `wakegate` binary under test.
///
/// `env!("CARGO_BIN_EXE_wakegate")` is set only when compiling wakegate's own integration
/// tests, not this crate, so the path is found when a test runs: from `CARGO_BIN_EXE_wakegate`
/// in the environment (recent cargo sets it for a test it runs too), or else next to the test
/// executable, as cargo lays them out: `target/PROFILE/deps/TEST-HASH` and
/// `target/PROFILE/wakegate`. Panics, saying so, when there is no binary there.
pub fn bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let path = match std::env::var_os("CARGO_BIN_EXE_wakegate") {
            Some(path) => PathBuf::from(path),
            None => {
                let test = std::env::current_exe().expect("the test executable's path");
                let mut dir = test.parent().expect("the test executable's directory");
                if dir.ends_with("deps") {
                    dir = dir.parent().expect("the directory above deps/");
                }
                dir.join(format!("wakegate{}", std::env::consts::EXE_SUFFIX))
            }
        };
        assert!(
            path.is_file(),
            "the wakegate binary is not at {}: cargo builds it for wakegate's own integration \
             tests (`cargo test --workspace`), which this harness is for; elsewhere set \
             CARGO_BIN_EXE_wakegate to its path",
            path.display()
        );
        path.into_os_string()
            .into_string()
            .unwrap_or_else(|path| panic!("the wakegate binary's path is not UTF-8: {path:?}"))
    })
}

/// A `command = [...]` TOML value running the built-in demo backend.
pub fn demo_command(startup_delay: &str) -> String {
    let bin = bin();
    format!(
        r#"["{bin}", "demo-backend", "--port", "{{port}}", "--startup-delay", "{startup_delay}"]"#
    )
}

/// One `[[target]]` running the demo backend, named `name`, on `host`, with an HTTP readiness
/// check.
pub fn demo_target(name: &str, host: &str, startup_delay: &str) -> String {
    format!(
        r#"
[[target]]
name = "{name}"
hosts = ["{host}"]
command = {}
ready = {{ http_get = "/healthz" }}
cold_start_timeout = "20s"
"#,
        demo_command(startup_delay)
    )
}

pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

pub struct Wakegate {
    pub child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// The HTTPS listener, when the configuration has `[tls]`.
    pub https: Option<SocketAddr>,
    /// KEDA's external scaler, when the configuration has `listen.external_scaler`.
    pub external_scaler: Option<SocketAddr>,
    pub config_path: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Wakegate {
    /// Starts wakegate with `targets` (TOML `[[target]]` tables) and whatever extra top-level
    /// keys `head` holds (they go before the tables).
    pub async fn start(head: &str, targets: &str) -> Wakegate {
        Wakegate::start_with_env(head, targets, &[]).await
    }

    /// As [`Wakegate::start`], with extra environment variables for the process.
    pub async fn start_with_env(head: &str, targets: &str, env: &[(&str, &str)]) -> Wakegate {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("wakegate.toml");
        std::fs::write(&config_path, config_text(head, targets)).expect("write config");
        let mut child = Command::new(bin())
            .args(["--log-format", "json", "run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn wakegate");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = logs.clone();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["message"] == "listening"
                    && let Some(tx) = tx.take()
                {
                    let proxy = v["proxy"].as_str().unwrap_or_default().parse().ok();
                    let admin = v["admin"].as_str().unwrap_or_default().parse().ok();
                    let https = v["https"].as_str().unwrap_or_default().parse().ok();
                    let scaler = v["external_scaler"]
                        .as_str()
                        .unwrap_or_default()
                        .parse()
                        .ok();
                    let _ = tx.send((proxy, admin, https, scaler));
                }
                sink.lock().unwrap().push(line);
            }
        });
        let (proxy, admin, https, external_scaler) =
            tokio::time::timeout(Duration::from_secs(20), rx)
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "wakegate did not start; log:\n{}",
                        logs.lock().unwrap().join("\n")
                    )
                })
                .unwrap_or_else(|_| {
                    panic!("wakegate exited; log:\n{}", logs.lock().unwrap().join("\n"))
                });
        Wakegate {
            child,
            proxy: proxy.expect("proxy address in log"),
            admin: admin.expect("admin address in log"),
            https,
            external_scaler,
            config_path,
            logs,
            _dir: dir,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Replaces the configuration file (for a SIGHUP reload).
    pub fn rewrite_config(&self, head: &str, targets: &str) {
        std::fs::write(&self.config_path, config_text(head, targets)).expect("write config");
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits up to `limit` for a JSON log line that passes `check`, and returns it; panics with
    /// the log, saying `what` was missing, when none comes.
    pub async fn wait_for_log(
        &self,
        what: &str,
        limit: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let found = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .find(&check);
            if let Some(line) = found {
                return line;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no log line {what} within {limit:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The pids of the instances wakegate started, in order, from its `starting instance` log.
    pub fn started_pids(&self) -> Vec<i32> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|v| v["message"] == "starting instance")
            .filter_map(|v| v["pid"].as_i64())
            .map(|pid| pid as i32)
            .collect()
    }

    /// Waits up to `limit` until no readiness-notification socket directory of this wakegate
    /// is left in the temp dir, and says whether none is.
    pub async fn notify_sockets_removed(&self, limit: Duration) -> bool {
        let prefix = format!("wakegate-notify-{}-", self.pid());
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = std::fs::read_dir(std::env::temp_dir())
                .expect("read the temp dir")
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with(&prefix));
            if !left {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("running") as i32
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0, "signal sent");
    }

    /// Waits for wakegate to exit and returns its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("wakegate exits in time")
            .expect("wait");
        status.code()
    }

    /// A request to the proxy port with the given Host.
    pub async fn get(&self, host: &str, path: &str) -> Response {
        self.send(
            self.proxy,
            host,
            Request::get(path).body(Full::default()).unwrap(),
        )
        .await
    }

    pub async fn send(
        &self,
        addr: SocketAddr,
        host: &str,
        mut req: Request<Full<Bytes>>,
    ) -> Response {
        let uri = format!(
            "http://{addr}{}",
            req.uri().path_and_query().map_or("/", |p| p.as_str())
        );
        *req.uri_mut() = uri.parse().unwrap();
        req.headers_mut()
            .insert(http::header::HOST, host.parse().unwrap());
        let response = self.client.request(req).await.expect("request sent");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body read").to_bytes();
        Response {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    pub async fn admin_get(&self, path: &str) -> Response {
        self.send(
            self.admin,
            "admin",
            Request::get(path).body(Full::default()).unwrap(),
        )
        .await
    }

    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.body
    }

    /// Polls `/metrics` until `check` holds on its text, or fails after `limit` naming `what`
    /// and showing the last text.
    pub async fn wait_for_metrics(
        &self,
        what: &str,
        limit: Duration,
        check: impl Fn(&str) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let metrics = self.metrics().await;
            if check(&metrics) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{what}: {metrics}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `/targets` entry of one target.
    pub async fn target(&self, name: &str) -> serde_json::Value {
        let all: serde_json::Value =
            serde_json::from_str(&self.admin_get("/targets").await.body).unwrap();
        all["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("target {name} in /targets"))
    }

    /// Polls `/targets` until it lists a target named `name`, or panics after `limit`.
    pub async fn wait_until_listed(&self, name: &str, limit: Duration) {
        let listed = format!("\"{name}\"");
        let deadline = tokio::time::Instant::now() + limit;
        while !self.admin_get("/targets").await.body.contains(&listed) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "target {name} never appeared in /targets; log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `/targets` until `check` holds for the target, or panics after `limit`.
    pub async fn wait_for_target(
        &self,
        name: &str,
        limit: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let t = self.target(name).await;
            if check(&t) {
                return t;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "target {name} never reached the expected state; last: {t}\nlog:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Stops wakegate the way an operator would (SIGTERM), so it stops every process it started
/// (grandchildren included) before the test ends; SIGKILL only if it does not exit in time.
/// A test that failed gets wakegate's log printed with its failure.
impl Drop for Wakegate {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("wakegate's log up to the failure:\n{}", self.logs());
        }
        let Some(pid) = self.child.id() else { return };
        // SAFETY: signalling and reaping our own child process.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        for _ in 0..300 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.start_kill();
    }
}

fn config_text(head: &str, targets: &str) -> String {
    // `head` may set its own drain_timeout; TOML forbids a second one.
    let drain = if head.contains("drain_timeout") {
        ""
    } else {
        "drain_timeout = \"10s\"\n"
    };
    let addresses = "proxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n";
    // `head` may have a `[listen]` table of its own (`workers = 1`): the addresses go in it.
    match head.split_once("[listen]\n") {
        Some((before, after)) => {
            format!("{drain}{before}[listen]\n{addresses}{after}\n\n{targets}\n")
        }
        None => format!("{drain}{head}\n[listen]\n{addresses}\n{targets}\n"),
    }
}

/// The value of one sample in metrics text, e.g. `metric(&text, "wakegate_cold_starts_total", "service=\"hello\"")`.
pub fn metric(text: &str, name: &str, label_fragment: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| l.contains(label_fragment))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Checks in metrics text that `open` client connections are open over `workers` proxy
/// workers (`wakegate_worker_client_connections`), no worker with more than one more than another.
pub fn assert_evenly_spread(metrics: &str, workers: usize, open: u32) {
    let on: Vec<f64> = (0..workers)
        .map(|worker| {
            let label = format!("worker=\"{worker}\"");
            metric(metrics, "wakegate_worker_client_connections", &label)
                .unwrap_or_else(|| panic!("worker {worker}'s connections exported: {metrics}"))
        })
        .collect();
    assert_eq!(on.iter().sum::<f64>(), f64::from(open), "{metrics}");
    let (fewest, most) = on
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), n| (lo.min(*n), hi.max(*n)));
    assert!(
        most - fewest <= 1.0,
        "{open} connections spread as {on:?} over the workers"
    );
}

/// The pid reported by the demo backend's `/` body.
pub fn pid_in(body: &str) -> i32 {
    body.split("pid ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("a pid in {body:?}"))
}

/// True while a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .split(") ")
            .nth(1)
            .is_some_and(|rest| rest.starts_with('Z')),
        Err(_) => false,
    }
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}

/// Whether a program other than wakegate that a test runs (a real Prometheus server, kubectl,
/// curl, openssl) is on `PATH`. The tests run with only the Rust toolchain: where the program
/// is missing, the test that needs it is skipped, saying so on stderr — unless
/// `WAKEGATE_TEST_TOOLS=required` (as `.ci/run` sets, after installing them all), where a
/// missing program fails the test with `install`, the way to get it. See [`needs_tool!`].
pub fn tool_on_path(tool: &str, install: &str) -> bool {
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(dir.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    });
    if found {
        return true;
    }
    if std::env::var("WAKEGATE_TEST_TOOLS").as_deref() == Ok("required") {
        panic!("`{tool}` is not on PATH and WAKEGATE_TEST_TOOLS=required; {install}");
    }
    eprintln!(
        "skipped: `{tool}` is not on PATH ({install}); with WAKEGATE_TEST_TOOLS=required this fails"
    );
    false
}

/// Returns from the calling test, skipping it, when `tool` is not on `PATH` and the tests were
/// not told that every tool is there: see [`tool_on_path`].
#[macro_export]
macro_rules! needs_tool {
    ($tool:expr, $install:expr) => {
        if !$crate::tool_on_path($tool, $install) {
            return;
        }
    };
}

/// Fails the test instead of hanging when `fut` takes longer than `secs`.
pub async fn within<T>(secs: u64, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("{what} took more than {secs}s"))
}

/// Writes `request` as is to `addr` and returns everything read until the server closes the
/// connection (so the request should be HTTP/1.0 or say `Connection: close`).
pub async fn raw_exchange(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within(5, "raw exchange", async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        String::from_utf8_lossy(&response).into_owned()
    })
    .await
}

/// An upstream that answers every request head it reads with `answer`, raw, on every
/// connection: for what a well-behaved test server would never send.
pub async fn raw_upstream(answer: &'static [u8]) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut read = Vec::new();
                let mut buffer = [0; 4096];
                loop {
                    while let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                        read.drain(..end + 4);
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => read.extend_from_slice(&buffer[..n]),
                    }
                }
            });
        }
    });
    addr
}

/// Sends each message over `ws` and asserts that the same message comes back.
pub async fn echoes<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    messages: impl IntoIterator<Item = tokio_tungstenite::tungstenite::Message>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    for message in messages {
        ws.send(message.clone()).await.expect("sent");
        let echoed = within(5, "an echo", ws.next())
            .await
            .expect("a message")
            .expect("a valid message");
        assert_eq!(echoed, message);
    }
}

/// The status code of a raw HTTP/1.x response.
pub fn raw_status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("a status line in {response:?}"))
}

/// The built-in demo backend run by the test itself on a loopback port of its own choosing (for
/// `upstream` targets); killed on drop.
pub struct DemoBackend {
    pub child: Child,
    pub addr: SocketAddr,
}

impl DemoBackend {
    /// Starts it on port 0 and takes its address from the line it prints once it listens. A
    /// port picked here and handed over would be free only until someone else took it, and a
    /// connect to it before the backend listens can meet itself (a loopback self-connect), so
    /// neither is waited for.
    pub async fn start() -> DemoBackend {
        let mut child = Command::new(bin())
            .args(["demo-backend", "--port", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn demo-backend");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        within(10, "demo-backend listening", stdout.read_line(&mut line))
            .await
            .expect("read demo-backend's stdout");
        let addr = line
            .strip_prefix("demo-backend listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("demo-backend's first line names its address: {line:?}"));
        // Nothing else is printed there; keep the pipe open and drained all the same, so that
        // a later line neither blocks the backend nor fails it.
        tokio::spawn(async move { tokio::io::copy(&mut stdout, &mut tokio::io::sink()).await });
        DemoBackend { child, addr }
    }
}

/// Clients that each send `GET path` for `host` to a wakegate, one request after another,
/// asserting a 200 each, until [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(wakegate: &Arc<Wakegate>, clients: usize, host: &str, path: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|_| {
                let (wakegate, stop) = (wakegate.clone(), stop.clone());
                let (host, path) = (host.to_owned(), path.to_owned());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let r = wakegate.get(&host, &path).await;
                        assert_eq!(r.status, 200, "{}", r.body);
                    }
                })
            })
            .collect();
        Load { stop, clients }
    }

    /// Stops the clients after their requests in progress, and waits for those.
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.await.expect("every request answered 200");
        }
    }
}
