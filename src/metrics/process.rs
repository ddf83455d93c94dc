//! `process_*` metrics, read from `/proc/self` at each scrape, under the names
//! every Prometheus client library uses (resident and virtual memory, CPU
//! seconds, open and maximum file descriptors, start time). Off Linux, or
//! when a file cannot be read, the metric is left out rather than made up.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

/// USER_HZ, the unit of the CPU times in /proc/<pid>/stat: fixed at 100 by
/// the kernel's user-space ABI on every architecture Linux ships for.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Default)]
pub struct ProcessCollector;

impl ProcessCollector {
    pub fn new() -> Self {
        Self
    }
}

/// What one scrape reads.
#[derive(Debug, Default, PartialEq)]
struct Sample {
    resident_bytes: Option<f64>,
    virtual_bytes: Option<f64>,
    cpu_seconds: Option<f64>,
    start_time_seconds: Option<f64>,
    open_fds: Option<f64>,
    max_fds: Option<f64>,
}

impl Sample {
    fn read() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let stat = read("/proc/self/stat").and_then(|s| parse_stat(&s));
        let boot_time = read("/proc/stat").and_then(|s| field_after(&s, "btime"));
        Sample {
            resident_bytes: read("/proc/self/status")
                .and_then(|s| field_after(&s, "VmRSS:"))
                .map(|kib| kib * 1024.0),
            virtual_bytes: stat.as_ref().map(|s| s.virtual_bytes),
            cpu_seconds: stat.as_ref().map(|s| s.cpu_ticks / TICKS_PER_SECOND),
            start_time_seconds: stat
                .as_ref()
                .zip(boot_time)
                .map(|(s, boot)| boot + s.start_ticks / TICKS_PER_SECOND),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|dir| dir.count() as f64),
            max_fds: read("/proc/self/limits").and_then(|s| parse_max_open_files(&s)),
        }
    }
}

struct Stat {
    cpu_ticks: f64,
    start_ticks: f64,
    virtual_bytes: f64,
}

/// `/proc/self/stat`: the command name (field 2) may hold spaces, so fields
/// are counted after its closing parenthesis (field 3 is the state).
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field n of proc(5) is fields[n - 3].
    let field = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
    Some(Stat {
        cpu_ticks: field(14)? + field(15)?,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
    })
}

/// The first number after `key` on the line that starts with it.
fn field_after(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The soft limit of "Max open files" in `/proc/self/limits`.
fn parse_max_open_files(text: &str) -> Option<f64> {
    let rest = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    match rest.split_whitespace().next()? {
        "unlimited" => None,
        n => n.parse().ok(),
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = Sample::read();
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_bytes,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                s.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                s.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                s.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let gauge = ConstGauge::new(v);
                let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
                gauge.encode(metric)?;
            }
        }
        if let Some(v) = s.cpu_seconds {
            let counter = ConstCounter::new(v);
            let metric = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                counter.metric_type(),
            )?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with spaces and a parenthesis, as proc(5) allows.
        let line = "4242 (outbox (relay) x) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    250 50 0 0 20 0 9 0 123456 987654321 2048 18446744073709551615";
        let stat = parse_stat(line).expect("parsed");
        assert_eq!(stat.cpu_ticks, 300.0);
        assert_eq!(stat.start_ticks, 123456.0);
        assert_eq!(stat.virtual_bytes, 987654321.0);
    }

    #[test]
    fn limits_give_the_soft_open_files_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max processes             63459                63459                processes\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_max_open_files(limits), Some(1024.0));
        assert_eq!(
            field_after("Name:\tx\nVmRSS:\t  2048 kB\n", "VmRSS:"),
            Some(2048.0)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_is_read_on_linux() {
        let s = Sample::read();
        assert!(s.resident_bytes.is_some_and(|b| b > 0.0), "{s:?}");
        assert!(s.virtual_bytes.is_some_and(|b| b > 0.0), "{s:?}");
        assert!(s.open_fds.is_some_and(|n| n >= 1.0), "{s:?}");
        assert!(s.max_fds.is_some_and(|n| n >= 1.0), "{s:?}");
        assert!(s.cpu_seconds.is_some(), "{s:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = s.start_time_seconds.expect("start time");
        assert!(
            start <= now + 1.0 && start > now - 86400.0 * 365.0,
            "{start}"
        );
    }
}
