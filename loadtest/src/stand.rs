//! The test stand: the upstream (the built-in demo backend or a static nginx, whichever is
//! faster directly), nginx as a reverse proxy, and wakegate, each with a generated config on
//! 127.0.0.1; and a small client for wakegate's admin endpoints.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::Error;
use crate::load::{self, Outcome, Plan};
use crate::procs::{self, Proc, WorkDir};

/// Connections of the closed-loop runs (as `compare.sh`'s wrk).
pub const CONNECTIONS: usize = 64;

/// One thing requests can be sent to, and the processes behind it.
pub struct Server {
    pub name: String,
    pub addr: SocketAddr,
    pub procs: Vec<Proc>,
    /// nginx: memory is its workers'.
    pub workers_rss: bool,
}

impl Server {
    /// Starts `command` as the one process of a server named `name` that listens on
    /// `127.0.0.1:port`, and waits up to `limit` until the port accepts.
    fn spawn(
        work: &WorkDir,
        name: &str,
        command: Command,
        port: u16,
        limit: Duration,
        workers_rss: bool,
    ) -> Result<Server, Error> {
        let mut proc = Proc::spawn(name, command, &work.path)?;
        let addr = procs::local(port);
        proc.wait_listening(addr, limit)?;
        Ok(Server {
            name: name.into(),
            addr,
            procs: vec![proc],
            workers_rss,
        })
    }

    /// The pid whose CPU and memory count as this server's: the first process started.
    pub fn pid(&self) -> u32 {
        self.procs[0].pid()
    }

    /// The main process and, for nginx, its workers.
    pub fn pids(&self) -> Vec<u32> {
        let main = self.pid();
        let mut pids = vec![main];
        pids.extend(procs::children(main));
        pids
    }

    pub fn cpu_seconds(&self) -> f64 {
        self.pids().into_iter().map(procs::cpu_seconds).sum()
    }

    pub fn check_running(&mut self) -> Result<(), Error> {
        self.procs.iter_mut().try_for_each(Proc::check_running)
    }

    /// Peak resident memory (VmHWM) in MiB: nginx's workers' summed, else the process's own.
    pub fn peak_rss_mib(&self) -> f64 {
        self.rss_mib("VmHWM")
    }

    /// A memory field of /proc/PID/status (`VmRSS`, `VmHWM`) in MiB, counted as
    /// [`Server::peak_rss_mib`] counts.
    pub fn rss_mib(&self, field: &str) -> f64 {
        let pids = if self.workers_rss {
            procs::children(self.pid())
        } else {
            vec![self.pid()]
        };
        pids.into_iter()
            .map(|pid| procs::status_kb(pid, field))
            .sum::<u64>() as f64
            / 1024.0
    }
}

/// `nginx -v`'s version, or `None` when nginx is not installed.
pub fn nginx_version() -> Option<String> {
    let output = Command::new("nginx").arg("-v").output().ok()?;
    let text = String::from_utf8_lossy(&output.stderr);
    Some(
        text.trim()
            .strip_prefix("nginx version: ")
            .unwrap_or(text.trim())
            .to_owned(),
    )
}

/// The message scenarios print when they skip nginx.
pub const NO_NGINX: &str =
    "nginx is not installed (Debian: apt-get install -y nginx-light): the nginx path is skipped";

/// The threads wakegate's runtime has (one per core), which nginx gets as worker processes.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Starts an nginx with `server_blocks` inside its `http` block, in its own prefix directory.
pub fn start_nginx(
    work: &WorkDir,
    name: &str,
    port: u16,
    server_blocks: &str,
) -> Result<Server, Error> {
    let dir = work.sub(&name.replace(' ', "-"))?;
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
        // Workers drop to nobody; the prefix directory is world-readable for them.
        "user nobody nogroup;"
    } else {
        ""
    };
    let d = dir.display();
    let conf = format!(
        "{user}
worker_processes {workers};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    # The load keeps its connections for the whole run, as wakegate lets it.
    keepalive_requests 1000000;
    keepalive_timeout 60s;
{server_blocks}
}}
",
        workers = threads()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    let mut command = Command::new("nginx");
    command
        .arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&path);
    Server::spawn(work, name, command, port, Duration::from_secs(10), true)
}

/// A static nginx answering every request with a body the size of the demo backend's.
pub fn start_static_nginx(work: &WorkDir) -> Result<Server, Error> {
    let port = procs::free_port()?;
    start_nginx(
        work,
        "static nginx",
        port,
        &format!(
            "    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{
            default_type text/plain;
            return 200 'hello from the static nginx upstream (port {port})\\n';
        }}
    }}"
        ),
    )
}

/// nginx as a reverse proxy to `upstream`: keep-alive upstream connections, `reuseport`, no
/// access log, as `compare.sh` sets it up.
pub fn start_nginx_proxy(work: &WorkDir, upstream: SocketAddr) -> Result<Server, Error> {
    let port = procs::free_port()?;
    start_nginx(
        work,
        "nginx",
        port,
        &format!(
            "    upstream backend {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}"
        ),
    )
}

/// nginx taking h2c (HTTP/2 with prior knowledge) and forwarding to `upstream` the demo
/// backend's gRPC calls with `grpc_pass` (HTTP/2) and everything else with `proxy_pass`
/// (HTTP/1.1); keep-alive upstream connections for each, `reuseport`, no access log.
pub fn start_nginx_h2c_proxy(work: &WorkDir, upstream: SocketAddr) -> Result<Server, Error> {
    let port = procs::free_port()?;
    start_nginx(
        work,
        "nginx",
        port,
        &format!(
            "    # One pool each: HTTP/2 connections for grpc_pass, HTTP/1.1 ones for proxy_pass.
    upstream grpc_backend {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    upstream http_backend {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        # `http2` on a plain listener: h2c with prior knowledge (nginx 1.25.1 and later prefer
        # `http2 on;`, and still take this).
        listen 127.0.0.1:{port} http2 reuseport;
        location /wakegate.demo.v1.Echo/ {{
            grpc_pass grpc://grpc_backend;
        }}
        location / {{
            proxy_pass http://http_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}"
        ),
    )
}

/// nginx terminating TLS with `cert` and `key` (HTTP/2 or HTTP/1.1 by ALPN, TLS 1.2 and 1.3,
/// session cache and tickets as nginx's defaults) and forwarding to `upstream` over HTTP/1.1
/// keep-alive connections, `reuseport`, no access log.
pub fn start_nginx_tls_proxy(
    work: &WorkDir,
    upstream: SocketAddr,
    cert: &Path,
    key: &Path,
) -> Result<Server, Error> {
    let port = procs::free_port()?;
    start_nginx(
        work,
        "nginx",
        port,
        &format!(
            "    upstream backend {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        # `ssl http2` on the listener: nginx 1.22's spelling (1.25.1 and later prefer
        # `http2 on;`, and still take this). h2 and http/1.1 by ALPN.
        listen 127.0.0.1:{port} ssl http2 reuseport;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}",
            cert = cert.display(),
            key = key.display(),
        ),
    )
}

/// `haproxy -v`'s version, or `None` when HAProxy is not installed.
pub fn haproxy_version() -> Option<String> {
    let out = Command::new("haproxy").arg("-v").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next()?;
    Some(first.trim().to_owned())
}

/// The message scenarios print when they skip HAProxy.
pub const NO_HAPROXY: &str =
    "HAProxy is not installed (Debian: apt-get install -y haproxy): the HAProxy path is skipped";

/// HAProxy as a reverse proxy to `upstream` in HTTP mode, one thread per core (as wakegate's
/// workers), idle upstream connections kept and reused (`http-reuse always`), no log.
pub fn start_haproxy_proxy(work: &WorkDir, upstream: SocketAddr) -> Result<Server, Error> {
    let port = procs::free_port()?;
    let dir = work.sub("haproxy")?;
    let conf = format!(
        "global
    nbthread {threads}
    maxconn 9000
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 60s
    http-reuse always
frontend proxy
    bind 127.0.0.1:{port}
    default_backend upstream
backend upstream
    server upstream {upstream}
",
        threads = threads()
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, conf).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    let mut command = Command::new("haproxy");
    // -db: in the foreground, not as a daemon.
    command.arg("-db").arg("-f").arg(&path);
    Server::spawn(
        work,
        "haproxy",
        command,
        port,
        Duration::from_secs(10),
        false,
    )
}

/// The built-in demo backend, `wakegate demo-backend`, on a free port.
pub fn start_demo(work: &WorkDir, wakegate: &Path, name: &str) -> Result<Server, Error> {
    let port = procs::free_port()?;
    let mut command = Command::new(wakegate);
    command.args(["demo-backend", "--port", &port.to_string()]);
    Server::spawn(work, name, command, port, Duration::from_secs(10), false)
}

/// A running wakegate and its admin address.
pub struct Wakegate {
    pub server: Server,
    pub admin: SocketAddr,
    /// The HTTPS port, when started with TLS.
    pub https: Option<SocketAddr>,
    /// From starting the process to its proxy port accepting connections.
    pub started_in: Duration,
}

impl Wakegate {
    /// Starts wakegate with `targets` (TOML `[[target]]` tables) and `head` (top-level keys
    /// and tables before them), listening on free ports; waits until its proxy port accepts.
    pub fn start(
        work: &WorkDir,
        wakegate: &Path,
        name: &str,
        head: &str,
        targets: &str,
    ) -> Result<Wakegate, Error> {
        Wakegate::start_with(work, wakegate, name, head, targets, None)
    }

    /// As [`Wakegate::start`], and with `tls` = (certificate, key) also an HTTPS listener
    /// serving that certificate; waits until both ports accept.
    pub fn start_with(
        work: &WorkDir,
        wakegate: &Path,
        name: &str,
        head: &str,
        targets: &str,
        tls: Option<(&Path, &Path)>,
    ) -> Result<Wakegate, Error> {
        // Chosen together: a port just released may be handed out again at once.
        let [port, admin, https] = procs::free_ports()?;
        let tls_table = match tls {
            Some((cert, key)) => format!(
                "[tls]\nlisten = \"127.0.0.1:{https}\"\n[[tls.certificate]]\ncert = {:?}\nkey = {:?}\n",
                cert.display().to_string(),
                key.display().to_string()
            ),
            None => String::new(),
        };
        let text = format!(
            "# Generated by the load test.
drain_timeout = \"2s\"
{head}
{tls_table}
[listen]
proxy = \"127.0.0.1:{port}\"
admin = \"127.0.0.1:{admin}\"

{targets}"
        );
        let config = work.write(&format!("{name}.toml"), &text)?;
        let mut command = Command::new(wakegate);
        command.args(["run", "--config"]).arg(&config).env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or("warn".into()),
        );
        let started = std::time::Instant::now();
        let mut server = Server::spawn(work, name, command, port, Duration::from_secs(60), false)?;
        let started_in = started.elapsed();
        let https = tls.map(|_| procs::local(https));
        if let Some(addr) = https {
            server.procs[0].wait_listening(addr, Duration::from_secs(10))?;
        }
        Ok(Wakegate {
            server,
            admin: procs::local(admin),
            https,
            started_in,
        })
    }

    /// wakegate's `/targets` entry of `name`.
    pub async fn target(&self, name: &str) -> Result<serde_json::Value, Error> {
        let body = get(self.admin, "/targets").await?;
        let all: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| Error::Harness(format!("/targets is not JSON ({e}): {body}")))?;
        all["targets"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["name"] == name))
            .cloned()
            .ok_or_else(|| Error::Harness(format!("no target {name} in /targets: {body}")))
    }

    /// Polls `/targets` until target `name` is in `state` (`cold`, `ready`, ...).
    pub async fn wait_state(
        &mut self,
        name: &str,
        state: &str,
        limit: Duration,
    ) -> Result<(), Error> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let t = self.target(name).await?;
            if t["state"] == state {
                return Ok(());
            }
            self.server.check_running()?;
            if std::time::Instant::now() > deadline {
                return Err(Error::Harness(format!(
                    "target {name} not {state} within {limit:?}: {t}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One GET over a fresh HTTP/1.1 connection; the body of a 2xx answer.
pub async fn get(addr: SocketAddr, path: &str) -> Result<String, Error> {
    let failed = |why: String| Error::Harness(format!("GET http://{addr}{path}: {why}"));
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| failed(load::io_kind(&e)))?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(load::kind_of(&e)))?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(header::HOST, "loadtest")
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| failed(load::kind_of(&e)))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| failed(load::kind_of(&e)))?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        return Err(failed(format!("status {status}: {body}")));
    }
    Ok(body)
}

/// The upstream both proxies forward to, and how the candidates measured.
pub struct Upstream {
    pub server: Server,
    /// (candidate, req/s directly) for each candidate probed.
    pub probes: Vec<(String, f64)>,
}

impl Upstream {
    pub fn describe(&self) -> String {
        let probes = self
            .probes
            .iter()
            .map(|(name, rps)| format!("{name} {rps:.0} req/s"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "upstream: the {} on {} (each candidate measured directly: {probes})",
            self.server.name, self.server.addr
        )
    }
}

/// Starts the demo backend and, with nginx, a static nginx; measures each directly for
/// `probe` and keeps the faster, so that the upstream limits the proxies as little as it can.
pub async fn choose_upstream(
    work: &WorkDir,
    wakegate: &Path,
    nginx: bool,
    probe: Duration,
) -> Result<Upstream, Error> {
    let mut candidates = vec![start_demo(work, wakegate, "demo backend")?];
    if nginx {
        candidates.push(start_static_nginx(work)?);
    }
    let mut probes = Vec::new();
    for candidate in &candidates {
        let mut plan = Plan::new(candidate.addr, "upstream", CONNECTIONS, probe);
        plan.label = format!("probe {:<14}", candidate.name);
        let outcome = load::run(&plan).await;
        require_responses(&candidate.name, &outcome)?;
        probes.push((candidate.name.clone(), outcome.rps()));
    }
    let best = (0..candidates.len())
        .max_by(|a, b| probes[*a].1.total_cmp(&probes[*b].1))
        .expect("one candidate at least");
    let server = candidates.swap_remove(best);
    Ok(Upstream { server, probes })
}

/// The harness is broken (not merely slow) when a run got no successful response at all.
pub fn require_responses(what: &str, outcome: &Outcome) -> Result<(), Error> {
    if outcome.ok == 0 {
        return Err(Error::Harness(format!(
            "no successful response from {what} (errors: {}): the harness or the set-up is broken",
            outcome.error_summary()
        )));
    }
    Ok(())
}
