//! `outbox-relay check`: can `run` start with these settings?

use std::{process::ExitCode, time::Duration};

use super::{connect_db, plural, settings::CommonArgs, usage, with_causes, Out, EXIT_PROBLEM};
use crate::{
    config::{AmqpTlsFiles, Connections},
    publisher::{PublishError, Publisher, AMQP_TIMEOUT},
    redact::redact_url,
    store::{admin, Session},
};

/// How long `check` waits for the broker in all (connect, then open a channel;
/// each step is bounded by the publisher's own timeout too).
const BROKER_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// `outbox-relay check`: every condition `run` needs, one line each; exit 0
/// only when all hold.
pub async fn check(conn: &Connections, listen: bool) -> ExitCode {
    let amqp_urls = match CommonArgs::amqp_urls_required(conn) {
        Ok(urls) => urls,
        Err(e) => return usage(&e),
    };
    let out = Out::new(conn);
    let mut failed = 0;
    let mut warned = 0;
    let mut report = |verdict: Verdict, what: &str, text: &str| {
        match verdict {
            Verdict::Fail => failed += 1,
            Verdict::Warn => warned += 1,
            Verdict::Ok | Verdict::Skip => {}
        }
        out.line(&check_line(verdict, what, text));
    };

    let db_url = redact_url(&conn.database_url);
    match connect_db(conn, "outbox-relay check").await {
        Err(e) => {
            report(Verdict::Fail, "database", &e);
            report(
                Verdict::Skip,
                "schema",
                "not checked: no database connection",
            );
            report(
                Verdict::Skip,
                "privileges",
                "not checked: no database connection",
            );
        }
        Ok(db) => match admin::server(&db).await {
            Ok(server) => {
                report(
                    Verdict::Ok,
                    "database",
                    &format!(
                        "connected to {db_url} as role '{}' (PostgreSQL {})",
                        server.role, server.version
                    ),
                );
                match db.verify_schema(&conn.schema).await {
                    Ok(version) => report(
                        Verdict::Ok,
                        "schema",
                        &format!(
                            "'{}' is at version {version}, as this relay needs",
                            conn.schema
                        ),
                    ),
                    Err(e) => report(Verdict::Fail, "schema", &with_causes(&e)),
                }
                match admin::privileges(&db, &conn.schema).await {
                    Ok(granted) => {
                        for (verdict, text) in privilege_lines(&granted, &conn.schema, &server.role)
                        {
                            report(verdict, "privileges", &text);
                        }
                    }
                    Err(e) => report(Verdict::Fail, "privileges", &with_causes(&e)),
                }
                let (verdict, text) = pooler_check(conn, &db, listen).await;
                report(verdict, "pooler", &text);
            }
            Err(e) => report(Verdict::Fail, "database", &with_causes(&e)),
        },
    }
    if let Some(warning) = &conn.exposure.database {
        report(Verdict::Warn, "database", warning);
    }

    // Every node is tried; `run` needs one, so an unreachable node of several
    // is a warning, and only none reachable fails.
    let mut reached = 0;
    let mut refused = Vec::new();
    for url in &amqp_urls {
        match broker_check(url, &conn.amqp_tls).await {
            Ok(text) => {
                reached += 1;
                report(Verdict::Ok, "broker", &text);
            }
            Err(text) => refused.push(text),
        }
    }
    let verdict = if reached == 0 {
        Verdict::Fail
    } else {
        Verdict::Warn
    };
    for text in refused {
        report(verdict, "broker", &text);
    }
    for text in &conn.exposure.brokers {
        report(Verdict::Warn, "broker", text);
    }

    if failed == 0 {
        out.line(&match warned {
            0 => "all checks passed: `outbox-relay run` can start with these settings".to_string(),
            n => format!(
                "all checks passed: `outbox-relay run` can start with these settings (read the {n} warning{} above)",
                plural(n)
            ),
        });
        ExitCode::SUCCESS
    } else {
        out.line(&format!(
            "{failed} check{} failed: fix {}, then run `outbox-relay check` again",
            plural(failed),
            if failed == 1 { "it" } else { "them" }
        ));
        ExitCode::from(EXIT_PROBLEM)
    }
}

/// Whether a connection pooler sits in front of the database, and whether
/// the settings fit it (see README, "Behind a connection pooler").
async fn pooler_check(conn: &Connections, first: &Session, listen: bool) -> (Verdict, String) {
    let second = match connect_db(conn, "outbox-relay check").await {
        Ok(db) => db,
        Err(e) => {
            return (
                Verdict::Warn,
                format!("not checked: a second connection failed: {e}"),
            )
        }
    };
    match admin::pooling(first, &second).await {
        Err(e) => (
            Verdict::Warn,
            format!("not checked: {}", with_causes(&e)),
        ),
        Ok(admin::Pooling::Session) => (
            Verdict::Ok,
            "each connection keeps its own server session (a direct connection or a session-mode pooler): every setting works".to_string(),
        ),
        Ok(admin::Pooling::Transaction { evidence }) if listen => (
            Verdict::Fail,
            format!(
                "transaction-mode pooler detected ({evidence}) and listen=true: LISTEN needs a server session of its own, so notifications would be lost and the LISTEN left on a server session other clients get: set listen=false (the heartbeat then polls every poll-interval), or give the relay a direct or session-mode connection"
            ),
        ),
        Ok(admin::Pooling::Transaction { evidence }) => (
            Verdict::Ok,
            format!(
                "transaction-mode pooler detected ({evidence}); listen=false fits it: the relay keeps no state on a server session and runs no named prepared statement"
            ),
        ),
        Ok(admin::Pooling::Statement { error }) => (
            Verdict::Fail,
            format!(
                "statement-mode pooler detected (it refused a transaction: {error}): the relay needs transactions of several statements; use transaction or session mode"
            ),
        ),
        Ok(admin::Pooling::Unknown { why }) => (
            Verdict::Warn,
            format!("could not tell whether a pooler is in front of the database: {why}"),
        ),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    /// Works, but not as it should (e.g. one node of several unreachable).
    Warn,
    Fail,
    Skip,
}

/// Connects to one node and opens a confirm-mode channel: what `run` does.
async fn broker_check(url: &str, tls: &AmqpTlsFiles) -> Result<String, String> {
    let broker_url = redact_url(url);
    match tokio::time::timeout(BROKER_CHECK_TIMEOUT, Publisher::connect(url, tls, false)).await {
        Ok(Ok(publisher)) => {
            let text = format!(
                "connected to {broker_url} (vhost '{}', {}), confirm-mode channel open",
                publisher.vhost(),
                broker_security(url, tls)
            );
            publisher.close().await;
            Ok(text)
        }
        // The publisher's own wording says "reconnecting", which `check` does not do.
        Ok(Err(PublishError::Timeout { what })) => Err(format!(
            "RabbitMQ at {broker_url} did not answer {what} within {}s: check the host, port and firewall",
            AMQP_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(with_causes(&e)),
        Err(_) => Err(format!(
            "no answer from RabbitMQ at {broker_url} within {}s: check the host, port and firewall",
            BROKER_CHECK_TIMEOUT.as_secs()
        )),
    }
}

/// How a broker connection is secured, for its `ok` line.
fn broker_security(url: &str, tls: &AmqpTlsFiles) -> String {
    if !url.starts_with("amqps://") {
        return "plain text".to_string();
    }
    let roots = match &tls.ca {
        Some(ca) => format!("amqp-ca-file '{}'", ca.display()),
        None => "the system's CA certificates".to_string(),
    };
    let client = if tls.cert.is_some() {
        ", client certificate presented"
    } else {
        ""
    };
    format!("TLS, server verified against {roots}{client}")
}

fn check_line(verdict: Verdict, what: &str, text: &str) -> String {
    let verdict = match verdict {
        Verdict::Ok => "ok",
        Verdict::Warn => "warn",
        Verdict::Fail => "FAIL",
        Verdict::Skip => "skip",
    };
    format!("{verdict:<5} {what:<11} {text}")
}

/// One line when everything is granted, else one line per object at fault,
/// with the GRANT that fixes it.
fn privilege_lines(granted: &[admin::Granted], schema: &str, role: &str) -> Vec<(Verdict, String)> {
    let schema_missing = granted
        .iter()
        .any(|g| g.requirement.kind == admin::ObjectKind::Schema && !g.exists);
    if schema_missing {
        return vec![(
            Verdict::Skip,
            format!("not checked: schema '{schema}' does not exist"),
        )];
    }
    let role_sql = quote_ident(role);
    let mut lines = Vec::new();
    for g in granted {
        let object = g.requirement.object(schema);
        if !g.exists {
            lines.push((
                Verdict::Fail,
                format!("{object} does not exist: run `outbox-relay migrate --schema {schema}`"),
            ));
        } else if !g.missing.is_empty() {
            let privs = if g.requirement.kind == admin::ObjectKind::Columns {
                let columns = g.requirement.args;
                let each: Vec<String> = g
                    .missing
                    .iter()
                    .map(|p| format!("{p} ({columns})"))
                    .collect();
                each.join(", ")
            } else {
                g.missing.join(", ")
            };
            lines.push((
                Verdict::Fail,
                format!("role '{role}' lacks {privs} on {object}: GRANT {privs} ON {object} TO {role_sql}"),
            ));
        }
    }
    if lines.is_empty() {
        lines.push((
            Verdict::Ok,
            format!(
                "role '{role}' has what `run` needs on schema '{schema}' ({} objects)",
                granted.len()
            ),
        ));
    }
    lines
}

/// A role name as SQL needs it in a GRANT.
fn quote_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_privileges_come_with_the_grant_that_fixes_them() {
        let granted: Vec<admin::Granted> = admin::REQUIREMENTS
            .iter()
            .map(|requirement| admin::Granted {
                requirement,
                exists: true,
                missing: if requirement.name == "messages"
                    && requirement.kind == admin::ObjectKind::Table
                {
                    vec!["SELECT", "DELETE"]
                } else {
                    vec![]
                },
            })
            .collect();
        let lines = privilege_lines(&granted, "outbox", "App");
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].0, Verdict::Fail);
        assert_eq!(
            lines[0].1,
            "role 'App' lacks SELECT, DELETE on outbox.messages: GRANT SELECT, DELETE ON outbox.messages TO \"App\""
        );
        let columns: Vec<admin::Granted> = admin::REQUIREMENTS
            .iter()
            .map(|requirement| admin::Granted {
                requirement,
                exists: true,
                missing: if requirement.kind == admin::ObjectKind::Columns {
                    vec!["UPDATE"]
                } else {
                    vec![]
                },
            })
            .collect();
        let lines = privilege_lines(&columns, "outbox", "relay");
        assert_eq!(
            lines[0].1,
            "role 'relay' lacks UPDATE (published_at, attempts, last_error, available_at, dead_lettered_at) on outbox.messages: \
             GRANT UPDATE (published_at, attempts, last_error, available_at, dead_lettered_at) ON outbox.messages TO relay"
        );
        let fine: Vec<admin::Granted> = granted
            .into_iter()
            .map(|g| admin::Granted {
                missing: vec![],
                ..g
            })
            .collect();
        let lines = privilege_lines(&fine, "outbox", "app");
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].0, Verdict::Ok);
    }

    #[test]
    fn broker_lines_say_how_the_connection_is_secured() {
        let none = AmqpTlsFiles::default();
        assert_eq!(
            broker_security("amqps://rabbit.example/%2f", &none),
            "TLS, server verified against the system's CA certificates"
        );
        assert_eq!(broker_security("amqp://localhost/%2f", &none), "plain text");
    }

    #[test]
    fn check_lines_line_up() {
        assert_eq!(
            check_line(Verdict::Fail, "broker", "down"),
            "FAIL  broker      down"
        );
        assert_eq!(
            check_line(Verdict::Ok, "schema", "v1"),
            "ok    schema      v1"
        );
    }
}
