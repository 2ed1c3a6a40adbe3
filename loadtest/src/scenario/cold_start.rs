//! `cold-start`: cycles of idle → first request on a wakegate local target running the demo
//! backend with a known start-up delay, ready by a `tcp` check or by notification (`--ready`).
//! In each cycle the backend's own start-to-ready time is measured directly too (spawn → its
//! READY=1, sent once it listens), interleaved with the cycles through wakegate; wakegate's
//! overhead is the first byte through wakegate minus the backend's median start-to-ready time.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::json;
use wakegate::plot::Panel;

use super::{Ready, Settings};
use crate::Error;
use crate::procs::{self, Proc, WorkDir};
use crate::report::{self, Machine, Table};
use crate::stand::{self, Wakegate};

/// The demo backend's start-up delay, a slow application booting.
const STARTUP_DELAY: &str = "200ms";
const IDLE_TIMEOUT: &str = "1s";

struct Cycle {
    /// The backend started directly: spawn → its READY=1.
    own: Duration,
    /// The same start: spawn → first successful TCP connect, polled every millisecond.
    polled: Duration,
    /// Through wakegate from idle: request sent → response headers.
    first_byte: Duration,
    cold: bool,
}

pub async fn run(settings: &Settings) -> Result<PathBuf, Error> {
    let machine = Machine::now(stand::nginx_version());
    let cycles = settings.count(20, 3);
    let work = WorkDir::new()?;
    let (check, report) = match settings.ready {
        Ready::Tcp => ("tcp", "cold-start"),
        Ready::Notify => ("notify", "cold-start-notify"),
    };
    let notify_path = work.path.join("notify");
    let notify = tokio::net::UnixDatagram::bind(&notify_path)
        .map_err(|e| Error::io(format!("bind {}", notify_path.display()), e))?;
    let command = format!(
        "[{:?}, \"demo-backend\", \"--port\", \"{{port}}\", \"--startup-delay\", \"{STARTUP_DELAY}\"]",
        settings.wakegate.display().to_string()
    );
    let mut wakegate = Wakegate::start(
        &work,
        &settings.wakegate,
        "wakegate",
        // Idle stops are decided on the autoscaler's tick.
        "[autoscaler]\ninterval = \"100ms\"",
        &format!(
            "[[target]]
name = \"cold\"
hosts = [\"*\"]
command = {command}
ready = {{ {check} = true }}
idle_timeout = \"{IDLE_TIMEOUT}\"
cold_start_timeout = \"20s\"
stop_grace = \"2s\"
"
        ),
    )?;

    let mut results = Vec::new();
    for cycle in 1..=cycles {
        let (own, polled) = backend_own_start(&work, settings, &notify, &notify_path).await?;
        wakegate
            .wait_state("cold", "cold", Duration::from_secs(30))
            .await?;
        let (first_byte, cold) = first_request(wakegate.server.addr).await?;
        super::progress(format!(
            "cycle {cycle}/{cycles}: backend alone {:.1} ms, first byte through wakegate {:.1} ms",
            ms(own),
            ms(first_byte)
        ));
        results.push(Cycle {
            own,
            polled,
            first_byte,
            cold,
        });
    }
    super::progress_end();
    let cold_starts = wakegate.target("cold").await?["cold_starts"].clone();

    let own: Vec<f64> = results.iter().map(|c| ms(c.own)).collect();
    let polled: Vec<f64> = results.iter().map(|c| ms(c.polled)).collect();
    let first: Vec<f64> = results.iter().map(|c| ms(c.first_byte)).collect();
    // Against the median rather than the same cycle's own time: one start slowed down by the
    // machine's other load would otherwise show as a negative overhead in its cycle.
    let own_p50 = report::median(&own);
    let overhead: Vec<f64> = first.iter().map(|f| f - own_p50).collect();
    let cold = results.iter().filter(|c| c.cold).count();

    let mut table = Table::new(&["measured", "p50", "p99", "max", "min"]);
    let mut stats = serde_json::Map::new();
    for (name, key, values) in [
        ("backend alone: spawn → READY=1", "backend_ms", &own),
        (
            "backend alone: spawn → first connect, polled every 1 ms",
            "backend_polled_ms",
            &polled,
        ),
        (
            "through wakegate: idle → first byte",
            "first_byte_ms",
            &first,
        ),
        (
            "**wakegate's overhead** (first byte − p50 of backend alone to READY=1)",
            "overhead_ms",
            &overhead,
        ),
    ] {
        let (p50, p99, max, min) = summary(values);
        table.row(vec![
            name.into(),
            report::ms(p50),
            report::ms(p99),
            report::ms(max),
            report::ms(min),
        ]);
        stats.insert(
            key.into(),
            json!({ "p50": p50, "p99": p99, "max": max, "min": min, "all": values }),
        );
    }
    let md = format!(
        "# {report}: wakegate's overhead on a first request after idle, ready check \
         `{check}`\n\n{}\n\n\
         {cycles} cycles. Each cycle: (1) the demo backend started directly \
         (`wakegate demo-backend --startup-delay {STARTUP_DELAY}`), timed from spawn to the \
         `READY=1` it sends to `$NOTIFY_SOCKET` right after it starts listening, and, in the \
         same start, to its first accepted TCP connection polled every 1 ms, then stopped; \
         (2) once wakegate's `/targets` shows the local target `cold` \
         (`idle_timeout = \"{IDLE_TIMEOUT}\"`, `ready = {{ {check} = true }}`, the same \
         backend command), one request on an open connection, timed to its response headers. \
         Overhead = (2) − the median of (1) to READY=1, so that a start slowed by other load \
         on the machine shows in the backend's row, not as a negative overhead. With fewer \
         than 100 cycles, p99 is the largest value.\n\n{}\n\
         {cold} of {cycles} first requests carried `X-Wakegate-Cold-Start: true`; wakegate \
         counted {cold_starts} cold starts.\n",
        machine.markdown(),
        table.markdown()
    );
    let data = json!({
        "scenario": "cold-start",
        "ready": check,
        "machine": machine.json(),
        "settings": {
            "cycles": cycles,
            "startup_delay": STARTUP_DELAY,
            "idle_timeout": IDLE_TIMEOUT,
        },
        "stats": stats,
        "cold_responses": cold,
        "cold_starts": cold_starts,
    });
    let x = |i: usize| (i + 1) as f64;
    let points = |v: &[f64]| v.iter().enumerate().map(|(i, y)| (x(i), *y)).collect();
    let panels = [
        Panel {
            y_label: "time (ms)",
            series: vec![
                report::series("first byte through wakegate", 0, points(&first)),
                report::series("backend alone, spawn → READY=1", 2, points(&own)),
            ],
        },
        Panel {
            y_label: "overhead (ms)",
            series: vec![report::series("wakegate's overhead", 1, points(&overhead))],
        },
    ];
    report::write(
        &settings.out,
        report,
        &md,
        data,
        &format!(
            "{report}: demo backend with a {STARTUP_DELAY} start-up delay, ready check {check}"
        ),
        "cycle",
        &panels,
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (p50, p99, max, min) of a few values: p99 is the value at rank ⌈0.99 n⌉.
fn summary(values: &[f64]) -> (f64, f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN, f64::NAN);
    }
    (
        report::median(&v),
        report::rank(&v, 0.99),
        v[v.len() - 1],
        v[0],
    )
}

/// Starts the demo backend directly with `NOTIFY_SOCKET` = `notify_path`, and times spawn →
/// its READY=1 on `notify`, and spawn → the first successful TCP connect polled every 1 ms.
async fn backend_own_start(
    work: &WorkDir,
    settings: &Settings,
    notify: &tokio::net::UnixDatagram,
    notify_path: &std::path::Path,
) -> Result<(Duration, Duration), Error> {
    let limit = Duration::from_secs(20);
    let port = procs::free_port()?;
    let addr = procs::local(port);
    let mut command = std::process::Command::new(&settings.wakegate);
    command
        .args([
            "demo-backend",
            "--port",
            &port.to_string(),
            "--startup-delay",
            STARTUP_DELAY,
        ])
        .env("NOTIFY_SOCKET", notify_path);
    let started = Instant::now();
    let mut proc = Proc::spawn("backend-alone", command, &work.path)?;
    let ready = async {
        let mut buf = [0u8; 512];
        loop {
            let len = notify
                .recv(&mut buf)
                .await
                .map_err(|e| Error::io("receive on the notify socket", e))?;
            if buf[..len].split(|&b| b == b'\n').any(|l| l == b"READY=1") {
                return Ok::<_, Error>(started.elapsed());
            }
        }
    };
    let ready = async {
        tokio::time::timeout(limit, ready)
            .await
            .map_err(|_| Error::Harness("the demo backend sent no READY=1 within 20 s".into()))?
    };
    let connected = async {
        let mut ticks = tokio::time::interval(Duration::from_millis(1));
        loop {
            ticks.tick().await;
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(started.elapsed());
            }
            proc.check_running()?;
            if started.elapsed() > limit {
                return Err(Error::Harness(format!(
                    "the demo backend did not listen within 20 s:\n{}",
                    proc.log_tail()
                )));
            }
        }
    };
    tokio::try_join!(ready, connected)
}

/// One request on a connection opened beforehand; (time to response headers, cold-start header).
async fn first_request(addr: std::net::SocketAddr) -> Result<(Duration, bool), Error> {
    let failed = |why: String| Error::Harness(format!("first request through wakegate: {why}"));
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| failed(crate::load::io_kind(&e)))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(crate::load::kind_of(&e)))?;
    tokio::spawn(conn);
    let req = Request::get("/")
        .header(header::HOST, "cold.loadtest")
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .map_err(|_| failed("no answer within 30 s".into()))?
        .map_err(|e| failed(crate::load::kind_of(&e)))?;
    let first_byte = started.elapsed();
    let status = response.status();
    let cold = response
        .headers()
        .get("x-wakegate-cold-start")
        .is_some_and(|v| v == "true");
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| failed(crate::load::kind_of(&e)))?
        .to_bytes();
    if !status.is_success() {
        return Err(failed(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    Ok((first_byte, cold))
}
