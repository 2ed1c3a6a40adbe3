//! The memory budget: wakegate reads its own resident memory every 100 ms and, at or above
//! `[limits]` `memory_budget`, sheds new requests with 503 until it is below again; requests
//! already held or in flight go on. Close to the budget (90 %) it first gives freed heap
//! pages back to the system (`malloc_trim`), so that memory a burst freed does not count.
//! Envoy's overload manager works the same way ("stop accepting requests", "shrink heap").

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::config::{Limits, size};

/// How often the resident memory is read.
const EVERY: Duration = Duration::from_millis(100);
/// The share of the container's (or machine's) memory that the default budget allows.
const DEFAULT_SHARE: f64 = 0.9;
/// The share of the budget at which freed heap pages are given back.
const TRIM_AT: f64 = 0.9;
/// The least time between two trims: a trim walks the whole heap.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// What the request path asks (one atomic load), and what metrics show.
#[derive(Debug, Default)]
pub struct Memory {
    over: AtomicBool,
    /// The budget in force, in bytes; 0 for none.
    pub budget: AtomicU64,
    /// Times freed heap pages were given back to the system.
    pub trims: AtomicU64,
}

impl Memory {
    /// Whether new requests are to be shed.
    pub fn over_budget(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Reads the resident memory against the budget of `limits` until `stop`.
    pub async fn watch(
        self: Arc<Self>,
        mut limits: watch::Receiver<Limits>,
        stop: CancellationToken,
    ) {
        let mut budget = budget_of(&limits.borrow_and_update());
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_trim: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                Ok(()) = limits.changed() => {
                    budget = budget_of(&limits.borrow_and_update());
                }
            }
            self.budget.store(budget.unwrap_or(0), Ordering::Relaxed);
            let Some(mut resident) = resident() else {
                continue;
            };
            if let Some(budget) = budget
                && resident as f64 >= budget as f64 * TRIM_AT
                && last_trim.is_none_or(|at| at.elapsed() >= TRIM_EVERY)
            {
                last_trim = Some(Instant::now());
                if tokio::task::spawn_blocking(trim).await.unwrap_or(false) {
                    self.trims.fetch_add(1, Ordering::Relaxed);
                }
                resident = self::resident().unwrap_or(resident);
            }
            let over = budget.is_some_and(|budget| resident >= budget);
            if self.over.swap(over, Ordering::Relaxed) != over {
                let budget = size::show(budget.unwrap_or(0));
                let resident = size::show(resident);
                if over {
                    tracing::warn!(%resident, %budget, "over the memory budget: new requests get 503 until wakegate is below it");
                } else {
                    tracing::info!(%resident, %budget, "below the memory budget again: new requests are served");
                }
            }
        }
    }
}

/// The budget `limits` set, or the default: a share of the container's memory limit, or of
/// the machine's memory.
pub fn budget_of(limits: &Limits) -> Option<u64> {
    limits.memory_budget.or_else(default_budget)
}

fn default_budget() -> Option<u64> {
    let machine = meminfo_total();
    let limit = match (cgroup_limit(), machine) {
        (Some(cgroup), Some(machine)) => cgroup.min(machine),
        (cgroup, machine) => cgroup.or(machine)?,
    };
    Some((limit as f64 * DEFAULT_SHARE) as u64)
}

/// Resident memory in bytes (`/proc/self/statm`, in pages).
pub fn resident() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// The memory limit of the cgroup wakegate runs in (v2 `memory.max`, v1
/// `memory.limit_in_bytes`), if it has one.
fn cgroup_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut files = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.is_empty() {
            files.push(format!("/sys/fs/cgroup{path}/memory.max"));
            files.push("/sys/fs/cgroup/memory.max".to_owned());
        } else if controllers.split(',').any(|c| c == "memory") {
            files.push(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"));
            files.push("/sys/fs/cgroup/memory/memory.limit_in_bytes".to_owned());
        }
    }
    files.iter().find_map(|file| {
        let text = std::fs::read_to_string(file.replace("//", "/")).ok()?;
        // "max" (v2) or a number near u64::MAX (v1) mean no limit.
        text.trim().parse::<u64>().ok().filter(|&n| n < 1 << 60)
    })
}

fn meminfo_total() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Gives freed heap pages back to the system; whether any were.
fn trim() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim only walks glibc's own heap under its locks.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_budget_is_below_the_machines_memory_and_the_process_reads_its_own() {
        let budget = default_budget().expect("a Linux machine says how much memory it has");
        assert!(budget < meminfo_total().unwrap(), "{budget}");
        let resident = resident().expect("/proc/self/statm");
        assert!(resident > 1 << 20 && resident < budget, "{resident}");
        let set = Limits {
            memory_budget: Some(64 << 20),
            ..Limits::default()
        };
        assert_eq!(budget_of(&set), Some(64 << 20));
    }
}
