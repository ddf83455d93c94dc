//! The machine description written with the results.

use super::Bench;
use crate::{
    sysinfo::load_average,
    util::{rabbitmq_version, relay_defaults},
};

pub(crate) struct Machine {
    pub(crate) cpu: String,
    pub(crate) memory: String,
    pub(crate) kernel: String,
    pub(crate) postgres: String,
    pub(crate) postgres_settings: String,
    pub(crate) rabbitmq: String,
    pub(crate) relay_defaults: String,
    pub(crate) load_start: String,
}

impl Bench {
    pub(crate) async fn describe_machine(&self) -> Machine {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map_or("unknown".into(), |kb| {
                format!("{:.1} GiB", kb / 1024.0 / 1024.0)
            });
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or("unknown".into(), |s| s.trim().to_string());
        let postgres = match self.db.query_one("SHOW server_version", &[]).await {
            Ok(r) => r.get::<_, String>(0),
            Err(_) => "unknown".into(),
        };
        let mut settings = Vec::new();
        for name in [
            "shared_buffers",
            "synchronous_commit",
            "fsync",
            "wal_level",
            "max_wal_size",
            "autovacuum",
        ] {
            if let Ok(r) = self.db.query_one(&format!("SHOW {name}"), &[]).await {
                settings.push(format!("{name}={}", r.get::<_, String>(0)));
            }
        }
        let rabbitmq = rabbitmq_version(&self.args.amqp_url).unwrap_or_else(|| "unknown".into());
        Machine {
            cpu: format!("{cores} cores ({model})"),
            memory,
            kernel,
            postgres,
            postgres_settings: settings.join(", "),
            rabbitmq,
            relay_defaults: relay_defaults(&self.relay.path),
            load_start: load_average(),
        }
    }
}
