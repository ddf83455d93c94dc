//! The database URL, read once at start as the relay will read it (libpq's
//! sslmode handling, then tokio-postgres), and the warning for a connection
//! that works but is not verified off this machine (`check` prints it, `run`
//! logs it at start, in the same words).

use super::tls::{connector, split_tls_params, SslMode};
use crate::{
    config::ConfigError,
    redact::{self, redact_url, scrub, url_secrets},
    tls::is_loopback,
};

/// Parses the database URL as the relay will (libpq's sslmode handling, then
/// tokio-postgres), so that a URL that cannot work stops the command at start.
pub fn check_database_url(url: &str) -> Result<(), ConfigError> {
    const SETTING: &str = "database-url";
    let bad = |problem: String| ConfigError::new(SETTING, scrub(&problem, &url_secrets(url)));
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(ConfigError::new(
            SETTING,
            "not a postgres:// or postgresql:// URL (key=value connection strings are not supported)",
        ));
    }
    let shown = redact_url(url);
    // tokio-postgres ends the user info at the first '@', `redact_url` at the
    // last: with one '@' at most both read the same password.
    if url.matches('@').count() > 1 {
        return Err(bad(format!(
            "'{shown}' holds more than one '@': percent-encode '@' in the password as %40"
        )));
    }
    if redact::password_params(url)
        .into_iter()
        .any(|r| url[r].contains('@'))
    {
        return Err(bad(format!(
            "'{shown}': tokio-postgres would end the user info at the '@' of the password parameter: percent-encode it as %40"
        )));
    }
    let (pg_url, mode, files) =
        split_tls_params(url).map_err(|e| bad(format!("'{shown}': {e}")))?;
    let config: tokio_postgres::Config = pg_url
        .parse()
        .map_err(|e| {
            bad(format!(
                "'{shown}' cannot be read: {}; expected postgres://user:password@host:port/dbname?sslmode=...",
                with_sources(&e)
            ))
        })?;
    if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
        return Err(bad(format!(
            "'{shown}' names no host: use e.g. postgres://user@db.example:5432/app"
        )));
    }
    // Files named in the URL (sslrootcert, sslcert, sslkey) are read now, so a
    // wrong path stops the command here instead of failing every reconnect.
    if mode != SslMode::Disable
        && (files.is_some() || matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull))
    {
        connector(mode, files.as_deref()).map_err(|e| bad(format!("'{shown}': {e}")))?;
    }
    Ok(())
}

/// The error's message and those of its sources: tokio-postgres keeps the
/// reason ("invalid value for option `port`") in the source.
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A warning when the database connection is not fully verified and leaves
/// this machine: `disable`, `prefer` and `require` (without sslrootcert)
/// verify nothing, `verify-ca` (and `require` with sslrootcert) not the host
/// name. Loopback hosts and Unix sockets never leave the machine.
pub fn database_tls_warning(url: &str) -> Option<String> {
    let (pg_url, mode, files) = split_tls_params(url).ok()?;
    let root_cert = files.as_ref().and_then(|f| f.root_cert.clone());
    let config: tokio_postgres::Config = pg_url.parse().ok()?;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .filter_map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) if !is_loopback(name) => Some(name.clone()),
            _ => None,
        })
        .chain(
            config
                .get_hostaddrs()
                .iter()
                .filter(|ip| !ip.is_loopback())
                .map(|ip| ip.to_string()),
        )
        .collect();
    if hosts.is_empty() {
        return None;
    }
    let hosts = hosts.join(", ");
    let fix = "use sslmode=verify-full with sslrootcert=<CA file> in the database URL";
    let said = match mode {
        SslMode::Disable => {
            format!("sslmode=disable: the connection to {hosts} is neither encrypted nor verified")
        }
        SslMode::Prefer => format!(
            "sslmode=prefer (the default): the connection to {hosts} is encrypted only if the server offers TLS, and the server is never verified"
        ),
        SslMode::Require => format!(
            "sslmode=require: the connection to {hosts} is encrypted but the server is not verified (anyone on the path can pose as it)"
        ),
        // Without sslrootcert the chain may end at any of the system's CAs:
        // anyone who can get a certificate from a public CA passes.
        SslMode::VerifyCa => match root_cert {
            None => format!(
                "sslmode=verify-ca without sslrootcert: the server at {hosts} may present a certificate from any of the system's CAs, for any host name (anyone with a certificate from a public CA can pose as it)"
            ),
            Some(ca) => format!(
                "sslmode=verify-ca (or require with sslrootcert): the server at {hosts} may present any certificate signed by sslrootcert '{ca}', whatever host it names"
            ),
        },
        SslMode::VerifyFull => return None,
    };
    Some(format!("{said}: {fix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_db(url: &str) -> Result<(), ConfigError> {
        check_database_url(url)
    }

    #[test]
    fn database_urls_are_read_as_tokio_postgres_reads_them() {
        for ok in [
            "postgres://postgres@127.0.0.1:5432/test",
            "postgresql://u:pw@db/app?sslmode=require&application_name=x",
            // tokio-postgres takes raw '/', '?' and '#' in a password.
            "postgres://u:Se/cr3t@127.0.0.1/test",
            "postgres://u:Se?cr3t@127.0.0.1/test?sslmode=disable",
            "postgres://u:Se#cr3t@127.0.0.1/test",
            "postgres://u:Se%40cr3t@127.0.0.1/test",
            "postgres://h1:5432,h2:5433/app",
            "postgres:///app?host=/var/run/postgresql",
        ] {
            assert!(check_db(ok).is_ok(), "{ok}: {:?}", check_db(ok));
        }
        for (bad, says) in [
            ("mysql://u@h/db", "not a postgres://"),
            ("host=h password=x", "not a postgres://"),
            ("postgres://u:pw@h:99999/db", "port"),
            ("postgres://u:pw@h:54x2/db", "port"),
            ("postgres://u:pw@h/db?sslmode=bogus", "sslmode 'bogus'"),
            ("postgres://u:pw@h/db?nonsense=1", "nonsense"),
            ("postgres://u:Se@cr3t@h/db", "%40"),
            ("postgres://h/db?user=u&password=Se@cr3t", "%40"),
            ("postgres:///db", "names no host"),
            (
                "postgres://u:pw@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
                "/nonexistent/ca.pem",
            ),
        ] {
            let e = check_db(bad).expect_err(bad);
            assert_eq!(e.setting, "database-url");
            let line = e.to_string();
            assert!(line.contains(says), "{bad}: {line}");
            assert_eq!(line.lines().count(), 1, "{line}");
            for secret in ["Se@cr3t", "cr3t"] {
                assert!(!line.contains(secret), "{line}");
            }
        }
    }

    #[test]
    fn unverified_database_connections_off_this_machine_are_warned_about() {
        let warn = |url: &str| database_tls_warning(url);
        let said = warn("postgres://relay@db.example/app?sslmode=require").unwrap();
        assert!(
            said.starts_with("sslmode=require: the connection to db.example is encrypted but the server is not verified"),
            "{said}"
        );
        assert!(said
            .ends_with("use sslmode=verify-full with sslrootcert=<CA file> in the database URL"));
        let said = warn("postgres://relay@db.example/app").unwrap();
        assert!(said.starts_with("sslmode=prefer (the default)"), "{said}");
        let said = warn("postgres://relay@10.0.0.5:5432,db2/app?sslmode=disable").unwrap();
        assert!(
            said.contains("to 10.0.0.5, db2 is neither encrypted"),
            "{said}"
        );
        // The chain only: any host name passes.
        let said = warn("postgres://relay@db.example/app?sslmode=verify-ca").unwrap();
        assert!(
            said.starts_with("sslmode=verify-ca without sslrootcert: the server at db.example may present a certificate from any of the system's CAs"),
            "{said}"
        );
        for private_ca in [
            "postgres://relay@db.example/app?sslmode=verify-ca&sslrootcert=/ca.pem",
            "postgres://relay@db.example/app?sslmode=require&sslrootcert=/ca.pem",
        ] {
            let said = warn(private_ca).unwrap();
            assert!(
                said.contains(
                    "any certificate signed by sslrootcert '/ca.pem', whatever host it names"
                ) && said.ends_with(
                    "use sslmode=verify-full with sslrootcert=<CA file> in the database URL"
                ),
                "{private_ca}: {said}"
            );
        }
        // Fully verified, or never leaving the machine: nothing to say.
        for quiet in [
            "postgres://relay@db.example/app?sslmode=verify-full",
            "postgres://relay@db.example/app?sslmode=verify-full&sslrootcert=/ca.pem",
            "postgres://relay@localhost/app?sslmode=verify-ca",
            "postgres://relay@127.0.0.1/app?sslmode=disable",
            "postgres://relay@localhost/app",
            "postgres://relay@[::1]/app?sslmode=require",
            "postgres:///app?host=/var/run/postgresql",
        ] {
            assert_eq!(warn(quiet), None, "{quiet}");
        }
    }
}
