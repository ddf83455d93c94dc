//! A private PostgreSQL instance for one test, so the test may restart or
//! crash the database without touching the one other tests share.
//!
//! initdb into a temporary directory as user `postgres`, listening on
//! 127.0.0.1:<free port> with its socket in that directory. Dropping the guard
//! stops the server (immediate) and removes the directory, also when the test
//! fails. An instance left behind by a test process that was killed is stopped
//! by the next one that starts.
//!
//! `start()` is plain-text only (`ssl=off`); `start_with` can turn TLS on with
//! given certificate files and make one role log in by client certificate only.

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

/// How a private instance starts. The default: plain text only.
#[derive(Clone, Debug, Default)]
pub struct PgOptions {
    /// `ssl=on` with these files; None: `ssl=off`.
    pub ssl: Option<PgSsl>,
}

#[derive(Clone, Debug)]
pub struct PgSsl {
    /// The server's certificate and key (PEM).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA that signs client certificates (`ssl_ca_file`); needed for `cert_auth_role`.
    pub ca: Option<PathBuf>,
    /// A superuser role that may log in over TCP only with a client certificate
    /// whose CN is its name (pg_hba `hostssl ... cert`; `host` rejected).
    pub cert_auth_role: Option<String>,
}

impl PrivatePostgres {
    /// initdb + start, plain text only; panics with the server log if that fails.
    pub fn start() -> PrivatePostgres {
        PrivatePostgres::start_with(&PgOptions::default())
    }

    /// initdb + start with `options`; panics with the server log if that fails.
    pub fn start_with(options: &PgOptions) -> PrivatePostgres {
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
        let ssl = match &options.ssl {
            None => "-c ssl=off".to_string(),
            Some(ssl) => pg.configure_ssl(ssl),
        };
        pg.pg_ctl(&format!(
            "-o \"-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=50 {ssl}\" start",
            pg.port,
            pg.dir.display()
        ));
        if let Some(role) = options.ssl.as_ref().and_then(|s| s.cert_auth_role.as_ref()) {
            pg.as_postgres(&format!(
                "{PG_BIN}/psql -h {} -p {} -U postgres -d postgres -v ON_ERROR_STOP=1 -c 'CREATE ROLE \"{role}\" LOGIN SUPERUSER'",
                pg.dir.display(),
                pg.port
            ));
        }
        pg
    }

    /// Copies the TLS files where the server (user postgres) may read them,
    /// writes pg_hba for client-certificate login, returns the server options.
    fn configure_ssl(&self, ssl: &PgSsl) -> String {
        let tls = self.dir.join("tls");
        std::fs::create_dir_all(&tls).expect("create private pg tls dir");
        let copy = |from: &Path, name: &str| -> PathBuf {
            let to = tls.join(name);
            std::fs::copy(from, &to)
                .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
            to
        };
        let cert = copy(&ssl.cert, "server.pem");
        let key = copy(&ssl.key, "server.key");
        let mut options = format!(
            "-c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
            cert.display(),
            key.display()
        );
        if let Some(ca) = &ssl.ca {
            let ca = copy(ca, "ca.pem");
            options.push_str(&format!(" -c ssl_ca_file={}", ca.display()));
        }
        if let Some(role) = &ssl.cert_auth_role {
            let hba = format!(
                "local all all trust\n\
                 hostssl all {role} 127.0.0.1/32 cert\n\
                 host all {role} 127.0.0.1/32 reject\n\
                 host all all 127.0.0.1/32 trust\n"
            );
            std::fs::write(self.data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        }
        must(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&self.dir)
                .output(),
            "chown the private pg dir",
        );
        // PostgreSQL refuses a key file others may read.
        must(
            Command::new("chmod").arg("0600").arg(&key).output(),
            "chmod the server key",
        );
        options
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
