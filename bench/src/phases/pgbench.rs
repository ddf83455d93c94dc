//! The application as another process: `pgbench` running custom SQL scripts
//! against the bench's database, so the application's transactions are real
//! SQL over real connections, not the bench's own client.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use std::process::Command;

use super::Bench;
use crate::results::LoadRun;

/// Partition keys and routing keys the application rows spread over.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Keys {
    pub(crate) partition_keys: u32,
    pub(crate) routing_keys: u32,
}

/// One pgbench run.
pub(crate) struct Load<'a> {
    /// Name of the script file (in the bench's log directory) and of the run.
    pub(crate) name: &'a str,
    pub(crate) script: String,
    pub(crate) clients: usize,
    pub(crate) duration: Duration,
    /// Transactions per client (-t) instead of the duration, when given.
    pub(crate) transactions: Option<u64>,
    /// Transactions per second (-R), or as fast as PostgreSQL accepts them.
    pub(crate) rate: Option<u64>,
}

/// The script's INSERT of one row: a key out of `keys.partition_keys`, a
/// routing key out of `keys.routing_keys` and a 200-byte payload, all random.
pub(crate) fn insert_one(table: &str, exchange: &str, keys: Keys) -> String {
    format!(
        "\\set k random(1, {pk})\n\\set r random(1, {rk})\n\
         INSERT INTO {table} (exchange, routing_key, partition_key, payload) \
         VALUES ('{exchange}', 'rk.' || :r, 'key-' || :k, \
         convert_to(rpad(md5(random()::text), 200, md5(random()::text)), 'UTF8'));\n",
        pk = keys.partition_keys,
        rk = keys.routing_keys,
    )
}

/// A transaction of `rows` separate INSERTs (how an application that enqueues
/// one message per domain event writes them), or a bare autocommit INSERT
/// when `rows` is 1.
pub(crate) fn transaction(table: &str, exchange: &str, keys: Keys, rows: usize) -> String {
    if rows <= 1 {
        return insert_one(table, exchange, keys);
    }
    let mut s = String::from("BEGIN;\n");
    for _ in 0..rows {
        s.push_str(&insert_one(table, exchange, keys));
    }
    s.push_str("COMMIT;\n");
    s
}

impl Bench {
    /// Runs pgbench with a custom script; an error carries its output.
    pub(crate) async fn pgbench(&self, load: &Load<'_>) -> Result<LoadRun> {
        let script = self.log_dir.join(format!("{}.sql", load.name));
        std::fs::write(&script, &load.script)
            .with_context(|| format!("writing {}", script.display()))?;
        let mut cmd = Command::new("pgbench");
        cmd.args(["--no-vacuum", "--protocol=prepared"])
            .arg(format!("--client={}", load.clients))
            .arg(format!("--jobs={}", load.clients.clamp(1, 2)))
            .arg(match load.transactions {
                Some(t) => format!("--transactions={}", t.max(1)),
                None => format!("--time={}", load.duration.as_secs().max(1)),
            })
            .arg(format!("--file={}", script.display()));
        if let Some(rate) = load.rate {
            cmd.arg(format!("--rate={rate}"));
        }
        // pgbench takes a connection URI where it takes a database name.
        cmd.arg(&self.args.database_url)
            .env("PGAPPNAME", "outbox-bench pgbench")
            .stdin(std::process::Stdio::null());
        // Blocking: the runtime keeps sampling while pgbench runs.
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .context("pgbench task")?
            .context("running pgbench (it must be on PATH: apt-get install postgresql-client)")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let log = self.log_dir.join(format!("{}.pgbench.log", load.name));
        let _ = std::fs::write(&log, format!("{stdout}\n--- stderr ---\n{stderr}"));
        if !out.status.success() {
            bail!(
                "pgbench {} failed ({}); script {}; output:\n{}\n{}",
                load.name,
                out.status,
                script.display(),
                last_lines(&stdout, 12),
                last_lines(&stderr, 12)
            );
        }
        parse(&stdout).with_context(|| {
            format!(
                "reading pgbench {}'s output ({}):\n{}",
                load.name,
                log.display(),
                last_lines(&stdout, 12)
            )
        })
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn parse(out: &str) -> Result<LoadRun> {
    let after = |prefix: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            // With -t the count reads "processed/asked".
            .and_then(|v| v.split('/').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let Some(transactions) = after("number of transactions actually processed:") else {
        bail!("no 'number of transactions actually processed' line");
    };
    let Some(tps) = after("tps =") else {
        bail!("no 'tps =' line");
    };
    let Some(latency_ms) = after("latency average =") else {
        bail!("no 'latency average =' line");
    };
    Ok(LoadRun {
        transactions: transactions as u64,
        failed: after("number of failed transactions:").unwrap_or(0.0) as u64,
        tps,
        latency_ms,
        schedule_lag_ms: after("rate limit schedule lag: avg"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_output_is_parsed() {
        let out = "transaction type: x.sql\nnumber of transactions actually processed: 15012\n\
                   number of failed transactions: 0 (0.000%)\nlatency average = 1.234 ms\n\
                   rate limit schedule lag: avg 0.210 (max 12.000) ms\n\
                   initial connection time = 40.1 ms\ntps = 1000.512 (without initial connection time)\n";
        let r = parse(out).unwrap();
        assert_eq!(r.transactions, 15012);
        assert_eq!(r.failed, 0);
        assert!((r.tps - 1000.512).abs() < 1e-9);
        assert!((r.latency_ms - 1.234).abs() < 1e-9);
        assert_eq!(r.schedule_lag_ms, Some(0.21));
        let counted = "number of transactions actually processed: 2504/2504\n\
                       latency average = 20.324 ms\ntps = 393.62 (without initial connection time)\n";
        assert_eq!(parse(counted).unwrap().transactions, 2504);
    }

    #[test]
    fn transactions_of_several_rows_are_one_transaction() {
        let keys = Keys {
            partition_keys: 10,
            routing_keys: 5,
        };
        let s = transaction("s.messages", "x", keys, 8);
        assert!(s.starts_with("BEGIN;\n") && s.ends_with("COMMIT;\n"));
        assert_eq!(s.matches("INSERT INTO s.messages").count(), 8);
        assert!(!transaction("s.messages", "x", keys, 1).contains("BEGIN"));
    }
}
