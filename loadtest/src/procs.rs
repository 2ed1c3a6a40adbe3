//! Child processes (nginx, wakegate, backends) that never outlive the load test, a scratch
//! directory, free ports, and what /proc says about a process: CPU time and peak memory.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Error;

/// A child process in its own process group, stopped with the whole group when dropped
/// (SIGTERM, then SIGKILL after 5 s). It also gets SIGKILL should the load test itself die.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `command` with stdout and stderr in `dir/NAME.log`.
    pub fn spawn(name: &str, mut command: Command, dir: &Path) -> Result<Proc, Error> {
        let log = dir.join(format!("{}.log", name.replace(' ', "-")));
        let out =
            File::create(&log).map_err(|e| Error::io(format!("create {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::io("duplicate a log file handle", e))?;
        command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Ctrl-C in the terminal reaches only the load test, which stops children in order.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let program = command.get_program().to_string_lossy().into_owned();
        let child = command
            .spawn()
            .map_err(|e| Error::io(format!("start {name} ({program})"), e))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the end of the log if the process has exited.
    pub fn check_running(&mut self) -> Result<(), Error> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::Harness(format!(
                "{} exited ({status}); the end of {}:\n{}",
                self.name,
                self.log.display(),
                self.log_tail()
            ))),
            Err(e) => Err(Error::io(format!("wait for {}", self.name), e)),
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until `addr` accepts TCP connections.
    pub fn wait_listening(&mut self, addr: SocketAddr, limit: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + limit;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            self.check_running()?;
            if Instant::now() > deadline {
                return Err(Error::Harness(format!(
                    "{} did not listen on {addr} within {limit:?}; the end of its log:\n{}",
                    self.name,
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let group = -(self.child.id() as i32);
        // SAFETY: signals our own child's process group.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: as above; whatever is left of the group (nginx workers, say) goes too.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A scratch directory for configs and logs, removed when dropped.
pub struct WorkDir {
    pub path: PathBuf,
}

impl WorkDir {
    pub fn new() -> Result<WorkDir, Error> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "wakegate-loadtest-{}-{nanos:09}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)
            .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        // nginx workers run as nobody when we are root; they must reach their prefix.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755));
        Ok(WorkDir { path })
    }

    /// A subdirectory, created.
    pub fn sub(&self, name: &str) -> Result<PathBuf, Error> {
        let dir = self.path.join(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
        Ok(dir)
    }

    pub fn write(&self, name: &str, text: &str) -> Result<PathBuf, Error> {
        let path = self.path.join(name);
        std::fs::write(&path, text)
            .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
        Ok(path)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A port on 127.0.0.1 free right now (nginx cannot be asked to pick one and report it).
pub fn free_port() -> Result<u16, Error> {
    Ok(free_ports::<1>()?[0])
}

/// `N` different ports on 127.0.0.1 free right now: each stays bound until all are chosen, as
/// the kernel may hand a port just released out again at once.
pub fn free_ports<const N: usize>() -> Result<[u16; N], Error> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0; N];
    for port in &mut ports {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("bind a free port", e))?;
        *port = listener
            .local_addr()
            .map_err(|e| Error::io("read a bound port", e))?
            .port();
        listeners.push(listener);
    }
    Ok(ports)
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The fields after the command name in /proc/PID/stat (field 3, the state, is index 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// User plus system CPU seconds of a process, all its threads included.
pub fn cpu_seconds(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    stat_fields(pid).map_or(0.0, |f| {
        let utime: f64 = f[11].parse().unwrap_or(0.0);
        let stime: f64 = f[12].parse().unwrap_or(0.0);
        (utime + stime) / ticks
    })
}

/// What the scheduler says of one thread (`/proc/PID/task/TID/schedstat`): time on a CPU and
/// time runnable but waiting for one, in nanoseconds since it started.
#[derive(Debug, Clone)]
pub struct ThreadSched {
    /// `PID/TID`.
    pub id: String,
    /// The thread's name (`comm`): `proxy-worker-0`, `nginx`, `haproxy`, ...
    pub name: String,
    pub run_ns: u64,
    pub wait_ns: u64,
}

impl ThreadSched {
    /// Every thread of each of `pids`.
    pub fn of(pids: &[u32]) -> Vec<ThreadSched> {
        let mut threads = Vec::new();
        for pid in pids {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.filter_map(Result::ok) {
                let dir = task.path();
                let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
                let sched = read("schedstat");
                let mut fields = sched.split_whitespace().map(|f| f.parse().unwrap_or(0));
                threads.push(ThreadSched {
                    id: format!("{pid}/{}", task.file_name().to_string_lossy()),
                    name: read("comm").trim().to_owned(),
                    run_ns: fields.next().unwrap_or(0),
                    wait_ns: fields.next().unwrap_or(0),
                });
            }
        }
        threads
    }

    /// What each thread of `after` did since `before` (threads new since then count whole).
    pub fn since(after: &[ThreadSched], before: &[ThreadSched]) -> Vec<ThreadSched> {
        after
            .iter()
            .map(|a| {
                let b = before.iter().find(|b| b.id == a.id);
                ThreadSched {
                    run_ns: a.run_ns.saturating_sub(b.map_or(0, |b| b.run_ns)),
                    wait_ns: a.wait_ns.saturating_sub(b.map_or(0, |b| b.wait_ns)),
                    ..a.clone()
                }
            })
            .collect()
    }
}

/// The processes whose parent is `pid` (nginx's workers).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|candidate| {
            stat_fields(*candidate).is_some_and(|f| f[1].parse::<u32>().ok() == Some(pid))
        })
        .collect()
}

/// A `/proc/PID/status` value in kB (`VmHWM`: peak resident memory, `VmRSS`: resident now).
pub fn status_kb(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Raises this process's soft limit on open files to at least `wanted` if the hard limit
/// allows (children inherit it); returns the soft limit now in force.
pub fn raise_nofile(wanted: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < wanted {
            let raised = libc::rlimit {
                rlim_cur: wanted.min(limit.rlim_max),
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}
