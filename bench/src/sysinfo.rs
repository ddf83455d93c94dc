//! /proc: CPU time, sockets, load average, clock ticks.

use std::{process::Command, time::Instant};

use crate::results::CpuUse;

/// Local ports of a process's TCP connections to `remote_port` (IPv4 and IPv6).
pub(crate) fn tcp_ports_to(pid: u32, remote_port: i32) -> Vec<i32> {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in dir.flatten() {
            if let Ok(target) = std::fs::read_link(entry.path()) {
                let target = target.to_string_lossy();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|r| r.strip_suffix(']'))
                {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let port = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| i32::from_str_radix(p, 16).ok())
    };
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && inodes.contains(f[9]) && port(f[2]) == Some(remote_port) {
                ports.extend(port(f[1]));
            }
        }
    }
    ports
}

/// CPU seconds a set of processes used since they started.
pub(crate) fn cpu_seconds(pids: &[i32], clk_tck: f64) -> f64 {
    pids.iter()
        .filter_map(|p| proc_stat(&p.to_string()))
        .map(|(_, u, s)| (u + s) as f64)
        .sum::<f64>()
        / clk_tck
}

/// (comm, utime, stime) of a process, in clock ticks.
pub(crate) fn proc_stat(pid: &str) -> Option<(String, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let fields: Vec<&str> = s[close + 1..].split_whitespace().collect();
    // Fields after the command name start at field 3 (state); utime is 14, stime 15.
    Some((
        comm,
        fields.get(11)?.parse().ok()?,
        fields.get(12)?.parse().ok()?,
    ))
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSnapshot {
    rabbitmq: u64,
    bench: u64,
    busy: u64,
}

impl CpuSnapshot {
    /// `bench_backend`: the pid of the PostgreSQL backend of the bench's connection.
    pub(crate) fn take(bench_backend: i32) -> Self {
        let mut rabbitmq = 0;
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let name = entry.file_name();
                let Some(pid) = name
                    .to_str()
                    .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                else {
                    continue;
                };
                if let Some((comm, u, s)) = proc_stat(pid) {
                    if comm == "beam.smp" {
                        rabbitmq += u + s;
                    }
                }
            }
        }
        let bench = proc_stat("self").map_or(0, |(_, u, s)| u + s)
            + proc_stat(&bench_backend.to_string()).map_or(0, |(_, u, s)| u + s);
        // First line of /proc/stat: user nice system idle iowait irq softirq steal ...
        let busy = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?.to_string();
                let v: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                let all: u64 = v.iter().take(8).sum();
                Some(all - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0))
            })
            .unwrap_or(0);
        Self {
            rabbitmq,
            bench,
            busy,
        }
    }

    pub(crate) fn until(&self, after: &Self, t0: Instant, clk_tck: f64) -> CpuUse {
        let s = |a: u64, b: u64| a.saturating_sub(b) as f64 / clk_tck;
        CpuUse {
            wall_s: t0.elapsed().as_secs_f64(),
            relay_pg_s: 0.0,
            rabbitmq_s: s(after.rabbitmq, self.rabbitmq),
            bench_s: s(after.bench, self.bench),
            total_s: s(after.busy, self.busy),
        }
    }
}

pub(crate) fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
