//! Memory and CPU of a process, read from Linux `/proc`.
//!
//! Used for the gateway under test (`--gateway-pid`) and for the load client itself, so a
//! report always shows whether the client, rather than the server, was the bottleneck.

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// Memory figures from `/proc/PID/status`, KiB.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Memory {
    /// Resident set size.
    pub vm_rss_kib: u64,
    /// Peak resident set size.
    pub vm_hwm_kib: u64,
    /// Resident anonymous memory (heap, stacks): what connections cost.
    pub rss_anon_kib: u64,
    pub threads: u64,
}

/// Where a process is: `None` for this process.
fn proc_dir(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("/proc/{pid}"),
        None => "/proc/self".into(),
    }
}

/// Read the memory figures of `pid` (or of this process).
pub fn memory(pid: Option<u32>) -> anyhow::Result<Memory> {
    let path = format!("{}/status", proc_dir(pid));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path}: is the process running?"))?;
    let mut memory = Memory::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let number = || {
            value
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match key {
            "VmRSS" => memory.vm_rss_kib = number(),
            "VmHWM" => memory.vm_hwm_kib = number(),
            "RssAnon" => memory.rss_anon_kib = number(),
            "Threads" => memory.threads = number(),
            _ => {}
        }
    }
    if memory.vm_rss_kib == 0 {
        bail!("{path} has no VmRSS line");
    }
    Ok(memory)
}

/// Clock ticks per second of `/proc/*/stat` times (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// CPU time used so far, seconds.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct CpuTime {
    pub user_s: f64,
    pub system_s: f64,
}

impl CpuTime {
    pub fn total_s(&self) -> f64 {
        self.user_s + self.system_s
    }

    /// The sum of two CPU times.
    pub fn plus(&self, other: &CpuTime) -> CpuTime {
        CpuTime {
            user_s: self.user_s + other.user_s,
            system_s: self.system_s + other.system_s,
        }
    }

    /// CPU used between `earlier` and `self`.
    pub fn since(&self, earlier: &CpuTime) -> CpuTime {
        CpuTime {
            user_s: self.user_s - earlier.user_s,
            system_s: self.system_s - earlier.system_s,
        }
    }
}

/// `utime` + `stime` of `pid` (or of this process), all threads.
pub fn cpu_time(pid: Option<u32>) -> anyhow::Result<CpuTime> {
    let path = format!("{}/stat", proc_dir(pid));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path}: is the process running?"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count from the
    // last ')'. Field 3 (state) is then index 0, so utime (14) and stime (15) are 11 and 12.
    let after = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc stat format")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| -> anyhow::Result<f64> {
        let value: u64 = fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .context("unexpected /proc stat format")?;
        Ok(value as f64 / clock_ticks())
    };
    Ok(CpuTime {
        user_s: tick(11)?,
        system_s: tick(12)?,
    })
}

/// This thread's kernel id (`/proc/thread-self` → `PID/task/TID`).
pub fn thread_id() -> Option<u32> {
    std::fs::read_link("/proc/thread-self")
        .ok()?
        .file_name()?
        .to_str()?
        .parse()
        .ok()
}

/// CPU of one thread of this process (zero when it cannot be read).
pub fn thread_cpu(tid: Option<u32>) -> CpuTime {
    let Some(tid) = tid else {
        return CpuTime::default();
    };
    let Ok(text) = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) else {
        return CpuTime::default();
    };
    // As in `cpu_time`: count from the last ')'; utime and stime are 11 and 12.
    let fields: Vec<&str> = text
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0.0, |v| v as f64 / clock_ticks())
    };
    CpuTime {
        user_s: tick(11),
        system_s: tick(12),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let memory = memory(None).expect("own status");
        assert!(memory.vm_rss_kib > 0 && memory.threads >= 1);
        let cpu = cpu_time(None).expect("own stat");
        assert!(cpu.total_s() >= 0.0);
        assert!(memory_of_a_missing_process_fails());
    }

    fn memory_of_a_missing_process_fails() -> bool {
        memory(Some(u32::MAX)).is_err()
    }
}
