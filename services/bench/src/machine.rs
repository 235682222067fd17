//! The machine a figure was taken on, the memory of a process, and who spent the machine's CPU
//! time, read from `/proc`.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The machine: enough to tell whether two figures are comparable.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    pub cores: usize,
    pub model: String,
    pub memory_mb: u64,
    pub kernel: String,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_string())
            })
            .unwrap_or_default();
        let memory_kb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| kb_field(&text, "MemTotal"))
            .unwrap_or(0);
        Self {
            cores: cores(),
            model,
            memory_mb: memory_kb / 1024,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }
}

/// The cores this process may run on (0 when that cannot be told).
fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, usize::from)
}

/// The load average (`/proc/loadavg`): other work on the machine while a scenario ran.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Load {
    pub avg_1m: f64,
    pub avg_5m: f64,
}

impl Load {
    pub fn read() -> Self {
        let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let mut fields = text.split_whitespace().map(|f| f.parse().unwrap_or(0.0));
        Self {
            avg_1m: fields.next().unwrap_or(0.0),
            avg_5m: fields.next().unwrap_or(0.0),
        }
    }
}

/// The CPU time spent so far by the machine and by each of its processes.
#[derive(Debug, Clone)]
pub struct CpuTimes {
    at: Instant,
    /// Every core's busy time (`/proc/stat`: all but idle and I/O wait), in seconds.
    busy: f64,
    /// Each process's user and system time, with its command name (a pid reused by another
    /// command within a window is another process).
    processes: HashMap<u32, (String, f64)>,
}

/// The named processes a window's CPU time is split among, besides the servers found by name.
pub struct Spenders<'a> {
    pub coordinators: &'a [u32],
    pub workers: &'a [u32],
}

impl CpuTimes {
    pub fn read() -> Self {
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        let busy = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| machine_busy_ticks(&text))
            .unwrap_or(0) as f64
            / ticks;
        let processes = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(|entry| {
                let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let (name, spent) = process_ticks(&stat)?;
                Some((pid, (name, spent as f64 / ticks)))
            })
            .collect();
        Self {
            at: Instant::now(),
            busy,
            processes,
        }
    }

    /// What the machine spent since `start`: the share of its cores that were busy, and the
    /// seconds and milliseconds per unit of work (`n` units done in the window) spent by the
    /// coordinators, the workers, Postgres, RabbitMQ, the bench itself, and everything else
    /// (the kernel's threads, other processes, and processes that ended within the window).
    pub fn since(&self, start: &CpuTimes, spenders: &Spenders<'_>, n: usize) -> Value {
        let window = self.at.duration_since(start.at).as_secs_f64();
        let cores = cores().max(1) as f64;
        let bench = std::process::id();
        let mut seconds: BTreeMap<&str, f64> = BTreeMap::new();
        for (pid, (name, spent)) in &self.processes {
            let before = match start.processes.get(pid) {
                Some((was, before)) if was == name => *before,
                _ => 0.0,
            };
            let who = if spenders.coordinators.contains(pid) {
                "coordinator"
            } else if spenders.workers.contains(pid) {
                "workers"
            } else if *pid == bench {
                "bench"
            } else if name == "postgres" {
                "postgres"
            } else if name.starts_with("beam") {
                "rabbitmq"
            } else {
                continue;
            };
            *seconds.entry(who).or_default() += spent - before;
        }
        let busy = self.busy - start.busy;
        let named: f64 = seconds.values().sum();
        seconds.insert("other", (busy - named).max(0.0));
        let per_unit: BTreeMap<&str, f64> = seconds
            .iter()
            .map(|(who, s)| (*who, s * 1000.0 / n.max(1) as f64))
            .collect();
        json!({
            "window_s": window,
            "busy_share": if window > 0.0 { busy / (cores * window) } else { 0.0 },
            "seconds": seconds,
            "ms_per_unit": per_unit,
        })
    }
}

/// The busy ticks of every core together, from `/proc/stat`'s first line (`cpu  user nice
/// system idle iowait irq softirq steal …`; guest time is counted in user time already).
fn machine_busy_ticks(stat: &str) -> Option<u64> {
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, _idle, _iowait, irq, softirq, steal] = fields[..] else {
        return None;
    };
    Some(user + nice + system + irq + softirq + steal)
}

/// A process's command name and user plus system ticks, from `/proc/<pid>/stat` (whose name,
/// in parentheses, may hold spaces and parentheses itself).
fn process_ticks(stat: &str) -> Option<(String, u64)> {
    let name = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?;
    let mut rest = stat.get(stat.rfind(')')? + 2..)?.split_whitespace();
    // After the name: state, then utime and stime are the 12th and 13th fields.
    let utime: u64 = rest.nth(11)?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some((name.to_string(), utime + stime))
}

/// The peak resident memory of process `pid` (`VmHWM`) in MiB; `None` when it is gone.
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    status_field_mb(pid, "VmHWM")
}

/// The current resident memory of process `pid` (`VmRSS`) in MiB; `None` when it is gone.
pub fn rss_mb(pid: u32) -> Option<f64> {
    status_field_mb(pid, "VmRSS")
}

fn status_field_mb(pid: u32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kb_field(&text, field).map(|kb| kb as f64 / 1024.0)
}

/// The value of a `Name:   1234 kB` line.
fn kb_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        if key != name {
            return None;
        }
        value.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kb_fields() {
        let status = "Name:\tbench\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(kb_field(status, "VmHWM"), Some(20480));
        assert_eq!(kb_field(status, "VmRSS"), Some(10240));
        assert_eq!(kb_field(status, "VmSwap"), None);
    }

    #[test]
    fn reads_cpu_ticks() {
        let stat = "cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\n";
        assert_eq!(machine_busy_ticks(stat), Some(161));
        let process = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 10 0 0 0 \
                       70 30 0 0 20 0 8 0 100 0 0";
        assert_eq!(process_ticks(process), Some(("tokio (rt) x".into(), 100)));
        assert_eq!(process_ticks("4242 (short) S 1"), None);
    }

    #[test]
    fn cpu_spent_in_a_window_is_this_process_s() {
        let ticks = rustix::param::clock_ticks_per_second();
        let own = || {
            let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
            process_ticks(&stat).unwrap().1
        };
        let start = CpuTimes::read();
        // Spin until the kernel has counted a fifth of a second of this process's time.
        let from = own();
        let mut spin = 0u64;
        while own() < from + ticks / 5 {
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        let spent = CpuTimes::read().since(
            &start,
            &Spenders {
                coordinators: &[],
                workers: &[],
            },
            3,
        );
        let bench = spent["seconds"]["bench"].as_f64().unwrap();
        let window = spent["window_s"].as_f64().unwrap();
        // One thread spun: at least what it waited for, and no more than the window's length.
        assert!(bench >= 0.19 && bench <= window + 0.02, "{spent}");
        let per_unit = spent["ms_per_unit"]["bench"].as_f64().unwrap();
        assert!((per_unit - bench * 1000.0 / 3.0).abs() < 1e-9);
        let busy = spent["busy_share"].as_f64().unwrap();
        assert!(busy > 0.0 && busy <= 1.01, "{spent}");
    }

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(peak_rss_mb(pid).is_some_and(|mb| mb > 0.0));
        assert!(rss_mb(pid).is_some_and(|mb| mb > 0.0));
        assert!(Machine::read().cores > 0);
    }
}
