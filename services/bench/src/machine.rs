//! The machine a figure was taken on, and the memory of a process, read from `/proc`.

use serde::{Deserialize, Serialize};

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
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            model,
            memory_mb: memory_kb / 1024,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }
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
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(peak_rss_mb(pid).is_some_and(|mb| mb > 0.0));
        assert!(rss_mb(pid).is_some_and(|mb| mb > 0.0));
        assert!(Machine::read().cores > 0);
    }
}
