//! The command line: `wakegate check` validates a file without running anything, and says
//! exactly what is wrong; `--version` prints the version; `demo-backend` notifies readiness.

use std::process::Output;
use std::time::{Duration, Instant};

use wakegate_test_support::bin;

/// Runs the binary with `args` and waits at most 20 s for it.
fn wakegate(args: &[&str]) -> Output {
    let mut child = std::process::Command::new(bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn wakegate");
    let began = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if began.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("wakegate {args:?} did not exit within 20s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

/// `wakegate check --config FILE` on a file holding `text`.
fn check(text: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("wakegate.toml");
    std::fs::write(&path, text).expect("write config");
    let out = wakegate(&["check", "--config", path.to_str().unwrap()]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_a_valid_file() {
    let (code, stdout, stderr) = check(
        r#"
[listen]
proxy = "127.0.0.1:8080"
admin = "127.0.0.1:9090"

[[target]]
name = "hello"
hosts = ["hello.localhost"]
command = ["wakegate", "demo-backend", "--port", "{port}"]
ready = { http_get = "/healthz" }
idle_timeout = "30s"
scaling = { min = 0, max = 1 }

[[target]]
name = "static-api"
hosts = ["api.localhost"]
upstream = "127.0.0.1:9000"
"#,
    );
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(stdout.contains("valid (2 targets)"), "{stdout}");
}

#[test]
fn check_reports_every_problem_with_field_value_and_expectation() {
    let (code, _, stderr) = check(
        r#"
[[target]]
name = "nohosts"
upstream = "127.0.0.1:9000"

[[target]]
name = "badup"
hosts = ["badup.localhost"]
upstream = "http://127.0.0.1:9000/x"

[[target]]
name = "queue"
hosts = ["queue.localhost"]
upstream = "127.0.0.1:9001"
max_pending = 0

[[target]]
name = "bounds"
hosts = ["bounds.localhost"]
upstream = "127.0.0.1:9002"
scaling = { min = 3, max = 2 }
"#,
    );
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert!(stderr.contains("4 problem(s)"), "{stderr}");
    for expected in [
        "target[0] (nohosts).hosts: got [], expected at least one host",
        "target[1] (badup).upstream: got \"http://127.0.0.1:9000/x\", expected a host:port",
        "target[2] (queue).max_pending: got 0, expected at least 1",
        "target[3] (bounds).scaling.min: got 3, expected at most scaling.max (2)",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn check_rejects_an_unknown_field_by_name() {
    let (code, _, stderr) = check(
        r#"
[[target]]
name = "hello"
hosts = ["hello.localhost"]
upstream = "127.0.0.1:9000"
idle_timout = "30s"
"#,
    );
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("unknown field `idle_timout`"),
        "names the field: {stderr}"
    );
    assert!(
        stderr.contains("idle_timeout"),
        "lists the known ones: {stderr}"
    );
}

#[test]
fn check_rejects_a_bad_duration_naming_the_value_and_the_expected_form() {
    let (code, _, stderr) = check(
        r#"
[[target]]
name = "hello"
hosts = ["hello.localhost"]
upstream = "127.0.0.1:9000"
idle_timeout = "soon"
"#,
    );
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert!(stderr.contains("\"soon\""), "names the value: {stderr}");
    assert!(
        stderr.contains("expected a duration such as \"500ms\", \"30s\" or \"5m\""),
        "says the expected form: {stderr}"
    );
    assert!(
        stderr.contains("idle_timeout"),
        "points at the field: {stderr}"
    );
}

#[test]
fn check_of_a_missing_file_fails_saying_it_cannot_read_it() {
    let out = wakegate(&["check", "--config", "/nonexistent/wakegate.toml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot read config file /nonexistent/wakegate.toml"),
        "{stderr}"
    );
}

#[test]
fn version_flag_prints_the_version() {
    let out = wakegate(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("wakegate {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn demo_backend_sends_ready_to_its_notify_socket_once_it_listens() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket_path = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let began = Instant::now();
    let mut backend = std::process::Command::new(bin())
        .args(["demo-backend", "--port", &addr.port().to_string()])
        .args(["--startup-delay", "200ms"])
        .env("NOTIFY_SOCKET", &socket_path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn demo-backend");

    let mut buf = [0u8; 64];
    let received = socket.recv(&mut buf);
    let listening = std::net::TcpStream::connect(addr).is_ok();
    let _ = backend.kill();
    let _ = backend.wait();
    let len = received.expect("a notification within 10s");
    assert_eq!(&buf[..len], b"READY=1");
    assert!(
        began.elapsed() >= Duration::from_millis(200),
        "after its start-up delay"
    );
    assert!(listening, "it listens by the time it says so");
}

#[test]
fn check_finds_what_would_fail_at_run_time_programs_directories_and_kubeconfig() {
    let dir = tempfile::tempdir().expect("temp dir");
    let not_executable = dir.path().join("server.sh");
    std::fs::write(&not_executable, "#!/bin/sh\n").unwrap();
    let text = format!(
        r#"
[kubernetes]
kubeconfig = "{dir}/no-such-kubeconfig"

[access_log]
path = "{dir}/no-such-directory/access.log"

[[target]]
name = "missing"
hosts = ["missing.localhost"]
command = ["no-such-program-anywhere", "--port", "{{port}}"]

[[target]]
name = "relative"
hosts = ["relative.localhost"]
command = ["./server.sh", "{{port}}"]
cwd = "{dir}"

[[target]]
name = "nowhere"
hosts = ["nowhere.localhost"]
command = ["sh", "-c", "exec server --port $PORT"]
cwd = "{dir}/no-such-directory"

[[target]]
name = "fine"
hosts = ["fine.localhost"]
command = ["sh", "-c", "exec server --listen 127.0.0.1:8000"]
"#,
        dir = dir.path().display()
    );
    let (code, stdout, stderr) = check(&text);
    assert_eq!(code, Some(2), "stdout: {stdout}\nstderr: {stderr}");
    for expected in [
        "5 problem(s)",
        "target[0] (missing).command[0]: got \"no-such-program-anywhere\", expected a program on PATH",
        "target[1] (relative).command[0]: got \"./server.sh\", expected an executable program (not executable: chmod +x",
        "target[2] (nowhere).cwd: got",
        "expected an existing directory",
        "kubernetes.kubeconfig: got",
        "expected a readable kubeconfig file",
        "access_log.path: got",
        "expected a file wakegate can create or append to, or \"-\" (no directory",
        // Valid, but each instance must listen where wakegate says: a warning, not a problem.
        "warning: target[3] (fine).command: neither `{port}` nor `PORT` appears in it",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(
        !stderr.contains("(nowhere).command"),
        "$PORT is a use of the port:\n{stderr}"
    );
    assert!(
        !stderr.contains("(fine).command[0]"),
        "sh is on PATH:\n{stderr}"
    );

    // Made executable, the relative program is found from `cwd`.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&not_executable, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_, _, stderr) = check(&text);
    assert!(stderr.contains("4 problem(s)"), "{stderr}");
    assert!(!stderr.contains("(relative)"), "{stderr}");
}
