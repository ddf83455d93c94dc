//! The relay as a child process: how it is started, its HTTP endpoints, how
//! it is stopped.

use std::{
    fs::File,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{metrics::metric, sysinfo::proc_stat};

/// The relay binary under test and what every relay the bench starts shares:
/// the broker, and the directory its logs go to.
pub(crate) struct RelayBinary {
    pub(crate) path: PathBuf,
    amqp_url: String,
    log_dir: PathBuf,
}

impl RelayBinary {
    pub(crate) fn new(path: PathBuf, amqp_url: &str, log_dir: PathBuf) -> Self {
        Self {
            path,
            amqp_url: amqp_url.to_string(),
            log_dir,
        }
    }

    /// A command for the relay binary that sees only the settings given here.
    pub(crate) fn command(&self, database_url: &str) -> Command {
        let mut cmd = Command::new(&self.path);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("OUTBOX_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("OUTBOX_DATABASE_URL", database_url)
            .env("OUTBOX_AMQP_URL", &self.amqp_url)
            // The relay's log level; BENCH_RELAY_LOG to look inside (e.g.
            // "warn,outbox_relay::relay::claim=debug" for the claim floor).
            .env(
                "OUTBOX_LOG",
                std::env::var("BENCH_RELAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null());
        cmd
    }

    /// `outbox-relay migrate --schema SCHEMA`.
    pub(crate) fn migrate(&self, database_url: &str, schema: &str) -> Result<()> {
        let out = self
            .command(database_url)
            .args(["migrate", "--schema", schema])
            .output()
            .context("running outbox-relay migrate")?;
        if !out.status.success() {
            bail!(
                "outbox-relay migrate --schema {schema} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// `outbox-relay run` on `schema`, its metrics on a free port, its log in
    /// the log directory as relay-LABEL.log.
    pub(crate) fn spawn(&self, database_url: &str, schema: &str, label: &str) -> Result<RelayProc> {
        RelayProc::spawn(self, database_url, schema, label, &[])
    }

    /// The same, with more `run` flags (e.g. `--retention 1s`).
    pub(crate) fn spawn_with(
        &self,
        database_url: &str,
        schema: &str,
        label: &str,
        flags: &[&str],
    ) -> Result<RelayProc> {
        RelayProc::spawn(self, database_url, schema, label, flags)
    }
}

pub(crate) struct RelayProc {
    child: Child,
    port: u16,
    pub(crate) log: PathBuf,
}

impl RelayProc {
    fn spawn(
        binary: &RelayBinary,
        database_url: &str,
        schema: &str,
        label: &str,
        flags: &[&str],
    ) -> Result<Self> {
        let port = free_port()?;
        let log = binary.log_dir.join(format!("relay-{label}.log"));
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = binary
            .command(database_url)
            .args([
                "run",
                "--schema",
                schema,
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
                "--instance-id",
                &format!("bench-{label}"),
            ])
            .args(flags)
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", binary.path.display()))?;
        Ok(Self { child, port, log })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// (utime, stime) in clock ticks.
    pub(crate) fn cpu(&self) -> Option<(u64, u64)> {
        proc_stat(&self.pid().to_string()).map(|(_, u, s)| (u, s))
    }

    pub(crate) fn peak_rss_kib(&self) -> Option<u64> {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()?
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    pub(crate) async fn get(&self, path: &str) -> Result<(u16, String)> {
        let port = self.port;
        let path = path.to_string();
        tokio::task::spawn_blocking(move || http_get(port, &path))
            .await?
            .map_err(Into::into)
    }

    /// Ready (both sides connected) and holding every partition.
    pub(crate) async fn wait_ready(&mut self, partitions: f64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                bail!(
                    "the relay exited at start ({status}); log:\n{}",
                    self.log_tail(15)
                );
            }
            if let Ok((200, _)) = self.get("/readyz").await {
                if let Ok((200, m)) = self.get("/metrics").await {
                    if metric(&m, "outbox_relay_partitions_owned").is_some_and(|p| p >= partitions)
                    {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the relay was not ready with all {partitions} partitions within {timeout:?}; log:\n{}",
                    self.log_tail(15)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn scrape(&self) -> Result<String> {
        let (code, text) = self.get("/metrics").await?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(text)
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        if tail.is_empty() {
            "(empty)".into()
        } else {
            tail
        }
    }

    /// SIGTERM, then wait; a note when the stop was not clean.
    pub(crate) async fn stop(mut self) -> Option<String> {
        if let Some(status) = self.exited() {
            return Some(format!("the relay had already exited ({status})"));
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.exited() {
                return (!status.success())
                    .then(|| format!("the relay exited with {status} after SIGTERM"));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Some("the relay did not exit within 20 s of SIGTERM; killed".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
