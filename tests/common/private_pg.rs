//! A private PostgreSQL instance for one test, so the test may restart or
//! crash the database without touching the one other tests share.
//!
//! initdb into a temporary directory as user `postgres`, listening on
//! 127.0.0.1:<free port> with its socket in that directory. Dropping the guard
//! stops the server (immediate) and removes the directory, also when the test
//! fails. An instance left behind by a test process that was killed is stopped
//! by the next one that starts.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const DIR_PREFIX: &str = "outbox-fault-pg-";

pub struct PrivatePostgres {
    pub dir: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    stopped: bool,
}

impl PrivatePostgres {
    /// initdb + start; panics with the server log if that fails.
    pub fn start() -> PrivatePostgres {
        reap_orphans();
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("create private pg dir");
        std::fs::write(dir.join("owner.pid"), std::process::id().to_string()).expect("owner.pid");
        let data = dir.join("data");
        let pg = PrivatePostgres {
            dir: dir.clone(),
            data,
            port: unused_port(),
            stopped: false,
        };
        must(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .output(),
            "chown the private pg dir",
        );
        pg.as_postgres(&format!(
            "{PG_BIN}/initdb -D {} -A trust -U postgres --no-sync -E UTF8",
            pg.data.display()
        ));
        pg.pg_ctl(&format!(
            "-o \"-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=50\" start",
            pg.port,
            pg.dir.display()
        ));
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl restart -m <mode>` (`fast`: clean shutdown; `immediate`: crash
    /// and recovery). Returns when the server accepts connections again.
    pub fn restart(&self, mode: &str) {
        self.pg_ctl(&format!("-m {mode} restart"));
    }

    pub fn stop(&mut self, mode: &str) {
        if !self.stopped {
            self.pg_ctl(&format!("-m {mode} stop"));
            self.stopped = true;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn pg_ctl(&self, what: &str) {
        self.as_postgres(&format!(
            "{PG_BIN}/pg_ctl -D {} -l {} -w -t 60 {what}",
            self.data.display(),
            self.dir.join("server.log").display()
        ));
    }

    fn as_postgres(&self, cmd: &str) {
        let out = Command::new("su").args(["postgres", "-c", cmd]).output();
        let out = must(out, cmd);
        if !out.status.success() {
            panic!(
                "`{cmd}` failed: {:?}\n{}{}\n--- server log ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- private PostgreSQL log, last 60 lines ---\n{}",
                lines[lines.len().saturating_sub(60)..].join("\n")
            );
        }
        stop_and_remove(&self.dir, self.stopped);
    }
}

/// A port nothing listens on now (bound on port 0, read, released). The one
/// place the tests still pick a port: PostgreSQL cannot be asked for port 0
/// (its `port` setting starts at 1), and the test needs the number before
/// the server starts, to build its URL.
fn unused_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("bound address").port()
}

fn must(out: std::io::Result<Output>, what: &str) -> Output {
    out.unwrap_or_else(|e| panic!("cannot run `{what}`: {e}"))
}

fn stop_and_remove(dir: &Path, stopped: bool) {
    let data = dir.join("data");
    if !stopped && data.join("postmaster.pid").exists() {
        let _ = Command::new("su")
            .args([
                "postgres",
                "-c",
                &format!(
                    "{PG_BIN}/pg_ctl -D {} -m immediate -w -t 30 stop",
                    data.display()
                ),
            ])
            .output();
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Stops instances whose test process is gone (it was killed before its Drop ran).
fn reap_orphans() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(DIR_PREFIX) {
            continue;
        }
        let dir = entry.path();
        let owner = std::fs::read_to_string(dir.join("owner.pid")).unwrap_or_default();
        let alive = owner
            .trim()
            .parse::<u32>()
            .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            stop_and_remove(&dir, false);
        }
    }
}
