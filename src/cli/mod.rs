//! The subcommands other than `run`: what each prints and its exit code
//! (0 ok, 1 problem found, 2 bad usage). Results go to stdout, problems to
//! stderr; `--json` output is one JSON document on stdout. Nothing printed
//! here carries a password: URLs go through `redact_url`, and every line is
//! scrubbed of the configured passwords in case a library error echoes one.

use std::{
    fmt::Write as _,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use crate::{
    config::Connections,
    redact::{redact_url, scrub, url_secrets},
    store::{migrations, Session},
};

mod check;
mod dead_letters;
mod entry;
mod grants;
/// docs/INTERFACE.md's command-line reference, checked by its test.
#[cfg(test)]
mod reference;
mod replay;
mod settings;
mod status;

pub use check::check;
pub use dead_letters::dead_letters;
pub use entry::main;
pub use grants::{grants, GrantsArgs};
pub use replay::replay;
pub use status::status;

/// A problem was found (or a side could not be reached).
pub const EXIT_PROBLEM: u8 = 1;
/// Bad usage: a flag value that cannot work.
pub const EXIT_USAGE: u8 = 2;

/// How long any command waits for the database connection.
const DB_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

pub async fn migrate(conn: &Connections, dry_run: bool) -> ExitCode {
    let mut session = match Session::connect(&conn.database_url, "outbox-relay migrate").await {
        Ok(s) => s,
        Err(e) => return problem(&with_causes(&e)),
    };
    if dry_run {
        match session.pending_migrations_sql(&conn.schema).await {
            Ok(sql) => {
                print!("{sql}");
                ExitCode::SUCCESS
            }
            Err(e) => problem(&with_causes(&e)),
        }
    } else {
        match session.apply_migrations(&conn.schema).await {
            Ok(applied) if applied.is_empty() => {
                println!(
                    "schema '{}' is up to date (version {})",
                    conn.schema,
                    migrations::latest_version()
                );
                ExitCode::SUCCESS
            }
            Ok(applied) => {
                for m in &applied.migrations {
                    println!("applied {} to schema '{}'", m.name, conn.schema);
                }
                if applied.repeatables {
                    println!(
                        "applied the functions and triggers of sql/ ({} files) to schema '{}'",
                        migrations::REPEATABLES.len(),
                        conn.schema
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => problem(&with_causes(&e)),
        }
    }
}

// ---------------------------------------------------------------------------
// shared plumbing
// ---------------------------------------------------------------------------

async fn connect_db(conn: &Connections, application_name: &str) -> Result<Session, String> {
    match tokio::time::timeout(
        DB_CONNECT_TIMEOUT,
        Session::connect(&conn.database_url, application_name),
    )
    .await
    {
        Ok(Ok(session)) => Ok(session),
        Ok(Err(e)) => Err(with_causes(&e)),
        Err(_) => Err(format!(
            "no answer from PostgreSQL at {} within {}s: check the host, port and firewall",
            redact_url(&conn.database_url),
            DB_CONNECT_TIMEOUT.as_secs()
        )),
    }
}

/// Connects and checks the schema version, or says why not (exit 1).
async fn open_outbox(
    conn: &Connections,
    application_name: &str,
    out: &Out,
) -> Result<Session, ExitCode> {
    let db = connect_db(conn, application_name)
        .await
        .map_err(|e| out.problem(&e))?;
    db.verify_schema(&conn.schema)
        .await
        .map_err(|e| out.fail(&e))?;
    Ok(db)
}

/// Prints, with the configured passwords scrubbed from every line.
struct Out {
    secrets: Vec<String>,
}

impl Out {
    fn new(conn: &Connections) -> Self {
        let mut secrets: Vec<String> = url_passwords(&conn.database_url);
        for url in &conn.amqp_urls {
            secrets.extend(url_passwords(url));
        }
        // Longest first, so a password that contains another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Self { secrets }
    }

    fn scrub(&self, text: &str) -> String {
        scrub(text, &self.secrets)
    }

    fn print(&self, text: &str) {
        print!("{}", self.scrub(text));
    }

    fn line(&self, text: &str) {
        println!("{}", self.scrub(text));
    }

    fn error(&self, text: &str) {
        eprintln!("{}", self.scrub(text));
    }

    fn problem(&self, e: &dyn std::fmt::Display) -> ExitCode {
        self.error(&format!("error: {e}"));
        ExitCode::from(EXIT_PROBLEM)
    }

    fn fail(&self, e: &dyn std::error::Error) -> ExitCode {
        self.problem(&with_causes(e))
    }
}

/// Passwords shorter than this are not scrubbed from free text: replacing
/// every "pw" would garble output, and the URLs themselves are redacted anyway.
const MIN_SCRUBBED_SECRET: usize = 3;

/// The passwords of a URL (see `redact::url_secrets`) long enough to scrub.
fn url_passwords(url: &str) -> Vec<String> {
    let mut found = url_secrets(url);
    found.retain(|s| s.len() >= MIN_SCRUBBED_SECRET);
    found
}

/// The error's message, then any cause it does not already spell out
/// (tokio-postgres says "error connecting to server" and keeps the why below).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut causes: Vec<String> = Vec::new();
    let mut source = e.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !said.is_empty() && !text.contains(&said) && !causes.iter().any(|c| c.contains(&said)) {
            causes.push(said);
        }
        source = cause.source();
    }
    if !causes.is_empty() {
        let _ = write!(text, " (cause: {})", causes.join(": "));
    }
    text
}

fn plural<N: PartialEq + From<u8>>(n: N) -> &'static str {
    if n == N::from(1) {
        ""
    } else {
        "s"
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

fn rfc3339_seconds(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A plain text table: left-aligned columns two spaces apart, no trailing blanks.
struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                let pad = w - cell.chars().count();
                line.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Bad usage: one line on stderr, exit 2.
fn usage(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("{e}");
    ExitCode::from(EXIT_USAGE)
}

pub fn problem(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_PROBLEM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_without_trailing_blanks() {
        let mut t = Table::new(&["ID", "NAME", "NOTE"]);
        t.row(vec!["1".into(), "alpha".into(), "".into()]);
        t.row(vec!["1000".into(), "b".into(), "x".into()]);
        assert_eq!(
            t.render(),
            "ID    NAME   NOTE\n1     alpha\n1000  b      x\n"
        );
    }

    #[test]
    fn passwords_are_scrubbed_raw_and_decoded() {
        let pw = url_passwords("postgres://app:p%40ss-word@db:5432/x?sslmode=require");
        assert!(pw.contains(&"p%40ss-word".to_string()));
        assert!(pw.contains(&"p@ss-word".to_string()));
        let text = "auth failed for p@ss-word and p%40ss-word";
        assert_eq!(scrub(text, &pw), "auth failed for *** and ***");
        let q = url_passwords("postgres://db/x?user=a&password=topsecret");
        assert_eq!(q, vec!["topsecret".to_string()]);
        let raw = url_passwords("postgres://u:Se/cr3t@127.0.0.1/test");
        assert_eq!(raw, vec!["Se/cr3t".to_string()]);
        assert!(url_passwords("amqp://guest@host/%2f").is_empty());
        // Too short to scrub from free text without garbling it.
        assert!(url_passwords("amqp://u:pw@host").is_empty());
    }

    #[test]
    fn errors_name_their_hidden_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        #[derive(Debug, thiserror::Error)]
        #[error("error connecting to server")]
        struct Inner(#[source] std::io::Error);
        #[derive(Debug, thiserror::Error)]
        #[error("cannot connect to PostgreSQL at x: {0}; check the URL")]
        struct Outer(#[source] Inner);
        assert_eq!(
            with_causes(&Outer(Inner(io))),
            "cannot connect to PostgreSQL at x: error connecting to server; check the URL (cause: Connection refused)"
        );
    }
}
