//! `outbox-relay grants`: prints the GRANT and REVOKE statements that give
//! the application, the relay and the operator each only what it needs on the
//! outbox schema. Nothing here connects anywhere: the schema owner runs the
//! printed SQL (e.g. through psql), which needs no superuser.
//!
//! The lease and helper functions are SECURITY INVOKER, so a role that calls
//! one also needs the privileges on the tables it touches; the table grants
//! below follow the functions' bodies as well as the relay's own statements
//! (`store`), the operator commands' (`store::admin`) and `enqueue`. Only
//! backlog() runs with its owner's rights; every function's search_path is
//! "<schema>, pg_temp" (migration 6), so no role's temporary objects stand in
//! for the schema's. The script also advises taking TEMP away where no role
//! needs it (comments only: it names the database, which `grants` does not know).

use std::process::ExitCode;

use clap::Args;

use super::usage;
use crate::{config::ConfigError, schema_name, store::migrations};

/// The roles `grants` gives privileges to (they must exist).
#[derive(Debug, Clone, Args)]
pub struct GrantsArgs {
    /// Role the applications write outbox rows as (INSERT, enqueue, backlog).
    #[arg(long, env = "OUTBOX_APP_ROLE", default_value = "outbox_app")]
    pub app_role: String,
    /// Role `outbox-relay run` and `check` log in as.
    #[arg(long, env = "OUTBOX_RELAY_ROLE", default_value = "outbox_relay")]
    pub relay_role: String,
    /// Role for `status`, `dead-letters` and `replay`.
    #[arg(long, env = "OUTBOX_OPERATOR_ROLE", default_value = "outbox_operator")]
    pub operator_role: String,
}

/// `outbox-relay grants`: the SQL on stdout, or one line on stderr and exit 2.
pub fn grants(schema: &str, args: &GrantsArgs) -> ExitCode {
    match grants_sql(schema, args) {
        Ok(sql) => {
            print!("{sql}");
            ExitCode::SUCCESS
        }
        Err(e) => usage(&e),
    }
}

/// Which of the three roles a grant is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    App,
    Relay,
    Operator,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Object {
    Schema,
    Table(&'static str),
    Sequence(&'static str),
    /// Name and argument types, as `GRANT ... ON FUNCTION` needs them.
    Function(&'static str, &'static str),
}

/// One GRANT and, in a comment above it, why the role needs it.
#[derive(Debug, Clone)]
struct Grant {
    who: Who,
    privileges: String,
    object: Object,
    why: &'static str,
}

/// Functions no role is granted, and why.
const NOT_GRANTED: &[(&str, &str)] = &[(
    "notify_relay",
    "it is the insert trigger's function, and PostgreSQL runs a trigger without checking EXECUTE",
)];

/// Columns of `messages` the application may read: what `INSERT ... RETURNING
/// id, message_id` (and `enqueue`, which returns message_id) read. Nothing
/// else of another row (`backlog()` runs with its owner's rights, migration 5).
const APP_READS: &[&str] = &["id", "message_id"];

/// Columns of `messages` the operator commands read: ids, addressing, states
/// and errors, never payload or headers (which may hold personal data).
const OPERATOR_READS: &[&str] = &[
    "id",
    "message_id",
    "exchange",
    "routing_key",
    "partition_key",
    "created_at",
    "available_at",
    "attempts",
    "last_error",
    "published_at",
    "dead_lettered_at",
    // `status` counts due rows in partitions no live relay owns.
    "partition",
];

/// Columns the relay sets: `published_at` when a row is confirmed; attempts,
/// the error, the next try and the parking time when it is not (`store`).
/// Never what a row carries (payload, headers, addressing, ids).
const RELAY_WRITES: &[&str] = &[
    "published_at",
    "attempts",
    "last_error",
    "available_at",
    "dead_lettered_at",
];

/// Columns `dead-letters retry` and `replay` set.
const OPERATOR_WRITES: &[&str] = &[
    "available_at",
    "attempts",
    "published_at",
    "dead_lettered_at",
];

const ENQUEUE_BYTEA: Object = Object::Function(
    "enqueue",
    "text, text, bytea, jsonb, text, text, timestamptz, text, text",
);
const ENQUEUE_JSONB: Object = Object::Function(
    "enqueue",
    "text, text, jsonb, jsonb, text, text, timestamptz, text",
);
const ENQUEUE_TEXT: Object = Object::Function(
    "enqueue",
    "text, text, text, jsonb, text, text, timestamptz, text",
);

fn with_columns(privilege: &str, columns: &[&str]) -> String {
    let columns: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    format!("{privilege} ({})", columns.join(", "))
}

/// Every privilege of the three roles on the schema, as of the latest migration.
fn all_grants() -> Vec<Grant> {
    use Object::*;
    use Who::*;
    let g = |who, privileges: &str, object, why| Grant {
        who,
        privileges: privileges.to_string(),
        object,
        why,
    };
    vec![
        // -- the application
        g(App, "USAGE", Schema, "find the outbox's objects"),
        g(App, "INSERT", Table("messages"), "write outbox rows (plain INSERT, and enqueue() runs as its caller)"),
        Grant {
            who: App,
            privileges: with_columns("SELECT", APP_READS),
            object: Table("messages"),
            why: "INSERT ... RETURNING id, message_id and enqueue()'s RETURNING message_id",
        },
        g(App, "SELECT", Sequence("relays_waiting"), "the insert trigger's WHEN reads it (migration 3 also grants it to PUBLIC)"),
        g(App, "EXECUTE", ENQUEUE_BYTEA, "enqueue(), payload bytea (the other two overloads call this one)"),
        g(App, "EXECUTE", ENQUEUE_JSONB, "enqueue(), payload jsonb"),
        g(App, "EXECUTE", ENQUEUE_TEXT, "enqueue(), payload text"),
        g(App, "EXECUTE", Function("backlog", ""), "back pressure: pending count and oldest pending age"),
        // -- the relay
        g(Relay, "USAGE", Schema, "find the outbox's objects"),
        g(Relay, "SELECT", Table("schema_migrations"), "the relay checks the schema version at start"),
        g(Relay, "SELECT, DELETE", Table("messages"), "claim rows, delete them after retention"),
        Grant {
            who: Relay,
            privileges: with_columns("UPDATE", RELAY_WRITES),
            object: Table("messages"),
            why: "mark rows published, or record a failed attempt and park a row (never its payload, headers or route)",
        },
        g(Relay, "SELECT, INSERT, UPDATE, DELETE", Table("relays"), "the lease functions register relays, record their state and remove gone ones"),
        g(Relay, "SELECT, UPDATE", Table("leases"), "the lease functions take, renew and release partition leases"),
        g(Relay, "UPDATE", Sequence("relays_waiting"), "relay_set_idle() and the heartbeat keep the count of waiting relays (setval)"),
        g(Relay, "EXECUTE", Function("relay_heartbeat", "text, interval, text"), "renew and take leases, every second"),
        g(Relay, "EXECUTE", Function("relay_release", "text"), "hand leases back at shutdown"),
        g(Relay, "EXECUTE", Function("relay_set_idle", "text, boolean"), "say whether the relay waits for a NOTIFY"),
        g(Relay, "EXECUTE", Function("relay_set_broker_node", "text, text"), "record which RabbitMQ node the relay publishes to"),
        // -- the operator
        g(Operator, "USAGE", Schema, "find the outbox's objects"),
        g(Operator, "SELECT", Table("schema_migrations"), "every operator command checks the schema version first"),
        Grant {
            who: Operator,
            privileges: with_columns("SELECT", OPERATOR_READS),
            object: Table("messages"),
            why: "status counts, dead-letters list, and the rows retry, discard and replay choose (no payload, no headers)",
        },
        Grant {
            who: Operator,
            privileges: with_columns("UPDATE", OPERATOR_WRITES),
            object: Table("messages"),
            why: "dead-letters retry and replay make rows pending again",
        },
        g(Operator, "DELETE", Table("messages"), "dead-letters discard"),
        g(Operator, "SELECT", Table("relays"), "status shows the relay instances"),
        g(Operator, "SELECT", Table("leases"), "status shows who owns which partition"),
    ]
}

impl Object {
    fn render(self, schema: &str) -> String {
        let s = quote_ident(schema);
        match self {
            Object::Schema => format!("SCHEMA {s}"),
            Object::Table(name) => format!("TABLE {s}.{}", quote_ident(name)),
            Object::Sequence(name) => format!("SEQUENCE {s}.{}", quote_ident(name)),
            Object::Function(name, args) => format!("FUNCTION {s}.{}({args})", quote_ident(name)),
        }
    }
}

/// The three role names, checked and quoted.
struct Roles {
    app: String,
    relay: String,
    operator: String,
}

impl Roles {
    fn new(args: &GrantsArgs) -> Result<Roles, ConfigError> {
        let app = role_name("app-role", &args.app_role)?;
        let relay = role_name("relay-role", &args.relay_role)?;
        let operator = role_name("operator-role", &args.operator_role)?;
        for (setting, a, b) in [
            ("relay-role", &args.relay_role, &args.app_role),
            ("operator-role", &args.operator_role, &args.app_role),
            ("operator-role", &args.operator_role, &args.relay_role),
        ] {
            if a == b {
                return Err(ConfigError {
                    setting,
                    problem: format!(
                        "'{}' is also another of the three roles: give the application, the relay and the operator a role each, or the separation is lost",
                        a.escape_debug()
                    ),
                });
            }
        }
        Ok(Roles {
            app,
            relay,
            operator,
        })
    }

    fn of(&self, who: Who) -> &str {
        match who {
            Who::App => &self.app,
            Who::Relay => &self.relay,
            Who::Operator => &self.operator,
        }
    }
}

/// A role name, quoted for SQL. Names PostgreSQL gives a meaning of its own in
/// GRANT (`"public"` is PUBLIC, every role) or reserves are refused.
fn role_name(setting: &'static str, name: &str) -> Result<String, ConfigError> {
    let problem = |reason: &str| ConfigError {
        setting,
        problem: format!("'{}' {reason}", name.escape_debug()),
    };
    if name.is_empty() || name.len() > 63 {
        return Err(problem("must be 1 to 63 bytes long"));
    }
    if name.chars().any(char::is_control) {
        return Err(problem("holds a control character: use a plain role name"));
    }
    let lower = name.to_ascii_lowercase();
    if [
        "public",
        "none",
        "current_user",
        "current_role",
        "session_user",
    ]
    .contains(&lower.as_str())
    {
        return Err(problem(
            "means something else in GRANT (public would give the privileges to every role): choose another role name",
        ));
    }
    if lower.starts_with("pg_") {
        return Err(problem(
            "starts with pg_, which PostgreSQL reserves for its own roles",
        ));
    }
    Ok(quote_ident(name))
}

/// Any identifier, double-quoted: the name stays exactly as given.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Comment lines: none of the three roles needs TEMP on the database. The
/// schema's functions no longer let a temporary object stand in for theirs
/// (migration 6), but a role that cannot create any leaves nothing to try.
/// Advice only: PUBLIC holds TEMP by default (so revoking it from one role
/// changes nothing), and revoking it from PUBLIC reaches every role of the
/// database, which is for its administrator to decide.
fn temp_advice(roles: &Roles) -> String {
    format!(
        "--\n\
         -- Temporary objects: {app}, {relay} and {operator} need no TEMP\n\
         -- on the database, yet every role has it through PUBLIC by default. Unless\n\
         -- other software that logs in as one of them uses temporary tables, take it\n\
         -- away, as the database's owner (GRANT it back to the roles that need it):\n\
         --   REVOKE TEMPORARY ON DATABASE <database> FROM PUBLIC;\n\
         --   GRANT TEMPORARY ON DATABASE <database> TO <the roles that need it>;\n",
        app = roles.app,
        relay = roles.relay,
        operator = roles.operator,
    )
}

/// The whole script: header, revokes, then each role's grants, in one transaction.
fn grants_sql(schema: &str, args: &GrantsArgs) -> Result<String, ConfigError> {
    schema_name::validate(schema).map_err(|e| ConfigError {
        setting: "schema",
        problem: e.to_string(),
    })?;
    let roles = Roles::new(args)?;
    let s = quote_ident(schema);
    let all = format!("{}, {}, {}", roles.app, roles.relay, roles.operator);
    let latest = migrations::MIGRATIONS.last().map_or("(none)", |m| m.name);
    let mut out = format!(
        "-- outbox-relay {version} grants for schema {s} (migrations up to {latest}).\n\
         --\n\
         -- Run as the owner of the schema, the role that ran `outbox-relay migrate`\n\
         -- (no superuser: LOGIN and CREATE on the database, which `migrate` needs\n\
         -- for its CREATE SCHEMA IF NOT EXISTS), e.g.\n\
         --   outbox-relay grants | psql -v ON_ERROR_STOP=1 \"$OWNER_DATABASE_URL\"\n\
         -- Run it again after every upgrade that adds migrations: it sets every\n\
         -- privilege of the three roles on the schema, and revokes any other.\n\
         --\n\
         -- The roles must exist; create them first as a role with CREATEROLE, e.g.\n\
         --   CREATE ROLE {app} LOGIN PASSWORD '...';\n\
         --   CREATE ROLE {relay} LOGIN PASSWORD '...';\n\
         --   CREATE ROLE {operator} LOGIN PASSWORD '...';\n\
         \n\
         BEGIN;\n\
         \n\
         -- Start from nothing, so privileges an older version needed do not linger.\n\
         REVOKE ALL ON SCHEMA {s} FROM {all};\n\
         REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM {all};\n\
         REVOKE ALL ON ALL SEQUENCES IN SCHEMA {s} FROM {all};\n\
         REVOKE ALL ON ALL ROUTINES IN SCHEMA {s} FROM {all};\n\
         -- PostgreSQL lets PUBLIC execute every new function: only the roles below\n\
         -- may call the outbox's (the lease functions are the relay's alone).\n\
         REVOKE EXECUTE ON ALL ROUTINES IN SCHEMA {s} FROM PUBLIC;\n",
        version = env!("CARGO_PKG_VERSION"),
        app = roles.app,
        relay = roles.relay,
        operator = roles.operator,
    );
    for (name, why) in NOT_GRANTED {
        out.push_str(&format!("-- {name}() is granted to no role: {why}.\n"));
    }
    out.push_str(&temp_advice(&roles));
    for (who, title) in [
        (
            Who::App,
            "The application: writes rows and reads back their ids; cannot read\n\
             -- other rows' payloads, mark, change or delete rows, or touch leases.",
        ),
        (
            Who::Relay,
            "The relay (`outbox-relay run` and `check`): reads and marks rows,\n\
             -- deletes them after retention, holds the partition leases; inserts none.",
        ),
        (
            Who::Operator,
            "The operator (`status`, `dead-letters list|retry|discard`, `replay`):\n\
             -- reads row states (no payloads), makes rows pending again, discards dead letters.",
        ),
    ] {
        out.push_str(&format!("\n-- {title}\n"));
        for grant in all_grants().iter().filter(|g| g.who == who) {
            out.push_str(&format!(
                "-- {}\nGRANT {} ON {} TO {};\n",
                grant.why,
                grant.privileges,
                grant.object.render(schema),
                roles.of(who)
            ));
        }
    }
    out.push_str("\nCOMMIT;\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(app: &str, relay: &str, operator: &str) -> GrantsArgs {
        GrantsArgs {
            app_role: app.to_string(),
            relay_role: relay.to_string(),
            operator_role: operator.to_string(),
        }
    }

    fn defaults() -> GrantsArgs {
        args("outbox_app", "outbox_relay", "outbox_operator")
    }

    /// The names of the functions `migrate` creates, in order of first creation.
    fn created_functions() -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        let files = migrations::MIGRATIONS
            .iter()
            .map(|m| m.sql)
            .chain(migrations::REPEATABLES.iter().map(|r| r.sql));
        for sql in files {
            for line in sql.lines() {
                let line = line.trim_start();
                let rest = line
                    .strip_prefix("CREATE OR REPLACE FUNCTION ")
                    .or_else(|| line.strip_prefix("CREATE FUNCTION "));
                if let Some(rest) = rest {
                    let name = rest.split('(').next().unwrap_or(rest).trim().to_string();
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
        }
        names
    }

    #[test]
    fn every_function_a_migration_creates_is_granted_or_deliberately_not() {
        let granted: Vec<&str> = all_grants()
            .iter()
            .filter_map(|g| match g.object {
                Object::Function(name, _) => Some(name),
                _ => None,
            })
            .collect();
        let functions = created_functions();
        assert!(
            functions.contains(&"relay_heartbeat".to_string()),
            "{functions:?}"
        );
        for f in &functions {
            assert!(
                granted.contains(&f.as_str()) || NOT_GRANTED.iter().any(|(n, _)| n == f),
                "migrations create function {f} but `grants` gives it to no role: add it to all_grants() (or NOT_GRANTED, saying why)"
            );
        }
        for f in granted {
            assert!(
                functions.iter().any(|c| c == f),
                "{f} is granted but no migration creates it"
            );
        }
    }

    #[test]
    fn the_printed_sql_quotes_every_name_and_is_one_transaction() {
        let sql = grants_sql("outbox", &args("App", "relay\"x", "ops")).expect("valid");
        assert!(
            sql.contains("GRANT INSERT ON TABLE \"outbox\".\"messages\" TO \"App\";"),
            "{sql}"
        );
        assert!(sql.contains(
            "GRANT EXECUTE ON FUNCTION \"outbox\".\"relay_heartbeat\"(text, interval, text) TO \"relay\"\"x\";"
        ), "{sql}");
        assert!(
            sql.contains("REVOKE EXECUTE ON ALL ROUTINES IN SCHEMA \"outbox\" FROM PUBLIC;"),
            "{sql}"
        );
        assert!(sql.contains(
            "GRANT SELECT (\"id\", \"message_id\") ON TABLE \"outbox\".\"messages\" TO \"App\";"
        ), "{sql}");
        let statements: Vec<&str> = sql
            .lines()
            .filter(|l| !l.starts_with("--") && !l.trim().is_empty())
            .collect();
        assert_eq!(statements.first(), Some(&"BEGIN;"));
        assert_eq!(statements.last(), Some(&"COMMIT;"));
        assert!(statements.iter().all(|l| l.ends_with(';')), "{sql}");
    }

    #[test]
    fn the_application_gets_no_payload_and_no_change_of_rows() {
        let sql = grants_sql("outbox", &defaults()).expect("valid");
        let app_lines: Vec<&str> = sql
            .lines()
            .filter(|l| l.starts_with("GRANT") && l.ends_with("TO \"outbox_app\";"))
            .collect();
        assert!(!app_lines.is_empty());
        for line in &app_lines {
            assert!(
                !line.contains("UPDATE") && !line.contains("DELETE"),
                "{line}"
            );
            assert!(
                !line.contains("payload") && !line.contains("relay_"),
                "{line}"
            );
            assert!(
                !line.contains("leases") && !line.contains("\"relays\""),
                "{line}"
            );
            assert!(!line.starts_with("GRANT SELECT ON TABLE"), "{line}");
        }
        let operator_lines = sql
            .lines()
            .filter(|l| l.ends_with("TO \"outbox_operator\";"));
        for line in operator_lines {
            assert!(
                !line.contains("payload") && !line.contains("headers"),
                "{line}"
            );
            assert!(!line.contains("EXECUTE"), "{line}");
        }
    }

    #[test]
    fn the_relay_may_update_only_the_columns_it_marks() {
        let sql = grants_sql("outbox", &defaults()).expect("valid");
        let updates: Vec<&str> = sql
            .lines()
            .filter(|l| l.ends_with("TO \"outbox_relay\";") && l.contains("UPDATE"))
            .filter(|l| l.contains("\"messages\""))
            .collect();
        assert_eq!(
            updates,
            ["GRANT UPDATE (\"published_at\", \"attempts\", \"last_error\", \"available_at\", \"dead_lettered_at\") ON TABLE \"outbox\".\"messages\" TO \"outbox_relay\";"],
            "{sql}"
        );
        assert!(
            sql.contains(
                "GRANT SELECT, DELETE ON TABLE \"outbox\".\"messages\" TO \"outbox_relay\";"
            ),
            "{sql}"
        );
    }

    #[test]
    fn the_script_advises_taking_temp_away_without_doing_it() {
        let sql = grants_sql("outbox", &defaults()).expect("valid");
        assert!(
            sql.contains("--   REVOKE TEMPORARY ON DATABASE <database> FROM PUBLIC;"),
            "{sql}"
        );
        assert!(
            !sql.lines()
                .any(|l| !l.starts_with("--") && l.contains("TEMPORARY")),
            "TEMP is advice, never a statement\n{sql}"
        );
    }

    #[test]
    fn role_names_that_mean_something_else_are_refused() {
        for (bad, setting) in [
            (args("public", "r", "o"), "app-role"),
            (args("a", "PUBLIC", "o"), "relay-role"),
            (args("a", "r", "current_user"), "operator-role"),
            (args("pg_monitor", "r", "o"), "app-role"),
            (args("", "r", "o"), "app-role"),
            (args("a\nb", "r", "o"), "app-role"),
            (args(&"x".repeat(64), "r", "o"), "app-role"),
            (args("a", "a", "o"), "relay-role"),
            (args("a", "r", "r"), "operator-role"),
        ] {
            let e = grants_sql("outbox", &bad).expect_err(&format!("{bad:?} accepted"));
            assert_eq!(e.setting, setting, "{e}");
            assert_eq!(e.to_string().lines().count(), 1, "{e}");
        }
        let e = grants_sql("Outbox", &defaults()).expect_err("bad schema accepted");
        assert_eq!(e.setting, "schema");
    }
}
