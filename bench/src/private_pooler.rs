//! A private PgBouncer for the pooled phase: scripts/pgbouncer.sh in
//! transaction mode on a free port of 127.0.0.1, in front of the local
//! PostgreSQL (127.0.0.1:5432), with a pool of the bench's size; stopped and
//! removed when dropped. Its own, so that its `SHOW STATS` counts the bench's
//! relays and nothing else.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use tokio_postgres::{NoTls, SimpleQueryMessage};

pub(crate) struct PrivatePooler {
    script: PathBuf,
    dir: PathBuf,
    port: u16,
    pub(crate) pool_size: usize,
}

/// Cumulative counters of one database in the pooler's `SHOW STATS`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PoolerCounts {
    pub(crate) transactions: i64,
    pub(crate) queries: i64,
}

impl PrivatePooler {
    /// Starts it in `dir` (created; removed on drop); fails when the bench's
    /// database is not the one the script fronts.
    pub(crate) fn start(dir: &Path, pool_size: usize, server_port: i32) -> Result<Self> {
        if server_port != 5432 {
            bail!(
                "the pooled phase's PgBouncer (scripts/pgbouncer.sh) fronts 127.0.0.1:5432, the bench's PostgreSQL listens on port {server_port}: run the bench against 127.0.0.1:5432 or leave out the pooled phase"
            );
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("locating the workspace root")?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port for the private PgBouncer")?
            .port();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let pooler = Self {
            script: root.join("scripts/pgbouncer.sh"),
            dir: dir.to_path_buf(),
            port,
            pool_size,
        };
        pooler.run("start")?;
        Ok(pooler)
    }

    fn run(&self, cmd: &str) -> Result<()> {
        let out = Command::new("bash")
            .arg(&self.script)
            .args([cmd, "transaction"])
            .env("OUTBOX_PGBOUNCER_DIR", &self.dir)
            .env("OUTBOX_PGBOUNCER_PORT", self.port.to_string())
            .env("OUTBOX_PGBOUNCER_POOL_SIZE", self.pool_size.to_string())
            .env("OUTBOX_PGBOUNCER_ROUND_ROBIN", "0")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} {cmd}", self.script.display()))?;
        if !out.status.success() {
            bail!(
                "scripts/pgbouncer.sh {cmd} transaction failed ({}): {} (scripts/services.sh installs pgbouncer)",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The URL of `database` through the pooler (user postgres, as the
    /// script's auth file has it).
    pub(crate) fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// PgBouncer's process id, to find its server connections.
    pub(crate) fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("transaction/pgbouncer.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `SHOW STATS` on the admin console: `database`'s transactions and
    /// queries pooled so far.
    pub(crate) async fn counts(&self, database: &str) -> Result<PoolerCounts> {
        let (client, connection) = tokio_postgres::connect(&self.url("pgbouncer"), NoTls)
            .await
            .context("connecting to the private PgBouncer's admin console")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut counts = PoolerCounts::default();
        for m in client
            .simple_query("SHOW STATS")
            .await
            .context("SHOW STATS")?
        {
            if let SimpleQueryMessage::Row(r) = m {
                if r.get("database") == Some(database) {
                    let n = |c: &str| r.get(c).and_then(|v| v.parse().ok()).unwrap_or(0);
                    counts = PoolerCounts {
                        transactions: n("total_xact_count"),
                        queries: n("total_query_count"),
                    };
                }
            }
        }
        Ok(counts)
    }
}

impl Drop for PrivatePooler {
    fn drop(&mut self) {
        if let Err(e) = self.run("stop") {
            progress!("warning: stopping the private PgBouncer: {e:#}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
