//! A private PostgreSQL server for one phase: a fresh cluster made with
//! `initdb` from `pg_config --bindir`, the distribution's default settings
//! (autovacuum on), on a free port of 127.0.0.1; stopped and removed when
//! dropped.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{bail, Context, Result};

pub(crate) struct PrivatePostgres {
    bindir: PathBuf,
    dir: PathBuf,
    port: u16,
    /// PostgreSQL refuses to run as root: then its tools run as this user.
    run_as: Option<&'static str>,
}

impl PrivatePostgres {
    /// initdb in `dir` (created; removed on drop), then pg_ctl start.
    pub(crate) fn start(dir: &Path) -> Result<Self> {
        let bindir = pg_bindir()?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port for the private PostgreSQL")?
            .port();
        let run_as = is_root().then_some("postgres");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let pg = Self {
            bindir,
            dir: dir.to_path_buf(),
            port,
            run_as,
        };
        if let Some(user) = run_as {
            run(Command::new("chown").args(["-R", user]).arg(dir))?;
        }
        let data = pg.data();
        pg.tool(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
            ],
        )?;
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {}",
            pg.dir.display()
        );
        let log = pg.dir.join("server.log");
        pg.tool(
            "pg_ctl",
            &[
                "-D",
                &data,
                "-l",
                &log.display().to_string(),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        Ok(pg)
    }

    pub(crate) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn tool(&self, name: &str, args: &[&str]) -> Result<Output> {
        let program = self.bindir.join(name);
        let mut cmd = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        cmd.args(args).current_dir(&self.dir);
        run(&mut cmd)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data();
        if let Err(e) = self.tool("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]) {
            progress!("warning: stopping the private PostgreSQL: {e:#}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn pg_bindir() -> Result<PathBuf> {
    let out = run(Command::new("pg_config").arg("--bindir"))
        .context("pg_config --bindir (install the PostgreSQL server package)")?;
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
