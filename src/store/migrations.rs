//! The SQL files of `sql/`, embedded in the binary. Numbered files (tables,
//! indexes, grants, data changes) are applied once each, in order; then the
//! repeatable files (one per function or trigger) re-create every such object,
//! in the order of `REPEATABLES`, whenever the set differs from the one the
//! schema records (a row of version 0 in `schema_migrations`).

use tokio_postgres::{types::Type, Client};

use crate::{
    schema_name::{self, InvalidSchemaName},
    store::{predicates, StoreError},
};

pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_outbox.sql",
        sql: include_str!("../../sql/0001_outbox.sql"),
    },
    Migration {
        version: 2,
        name: "0002_guards.sql",
        sql: include_str!("../../sql/0002_guards.sql"),
    },
    Migration {
        version: 3,
        name: "0003_quiet_commits.sql",
        sql: include_str!("../../sql/0003_quiet_commits.sql"),
    },
    Migration {
        version: 4,
        name: "0004_broker_node.sql",
        sql: include_str!("../../sql/0004_broker_node.sql"),
    },
    Migration {
        version: 5,
        name: "0005_backlog_definer.sql",
        sql: include_str!("../../sql/0005_backlog_definer.sql"),
    },
    Migration {
        version: 6,
        name: "0006_pinned_paths_live_waiters.sql",
        sql: include_str!("../../sql/0006_pinned_paths_live_waiters.sql"),
    },
];

/// A file re-applied whenever the set changes: it must be idempotent
/// (`CREATE OR REPLACE FUNCTION`, which keeps the function's grants; a
/// trigger dropped and created again).
pub struct Repeatable {
    pub name: &'static str,
    pub sql: &'static str,
}

macro_rules! repeatable {
    ($path:literal) => {
        Repeatable {
            name: $path,
            sql: include_str!(concat!("../../sql/", $path)),
        }
    };
}

/// Applied after the numbered files, in this order: functions (a trigger
/// needs its function), triggers, then the checks of the result.
pub const REPEATABLES: &[Repeatable] = &[
    repeatable!("functions/backlog.sql"),
    repeatable!("functions/enqueue.sql"),
    repeatable!("functions/notify_relay.sql"),
    repeatable!("functions/relay_heartbeat.sql"),
    repeatable!("functions/relay_release.sql"),
    repeatable!("functions/relay_set_broker_node.sql"),
    repeatable!("functions/relay_set_idle.sql"),
    repeatable!("triggers/messages_notify_relay.sql"),
    repeatable!("checks/functions_pin_search_path.sql"),
];

/// The `schema_migrations` row that records the repeatable set (versions of
/// numbered files start at 1; a binary that predates the set ignores it).
const REPEATABLE_VERSION: i32 = 0;

/// The text a file is applied as: placeholders filled in.
fn expanded(sql: &str) -> String {
    predicates::expand(sql)
}

/// FNV-1a over every repeatable file's name and applied text, in order: any
/// change of a body, of the order or of a predicate gives another checksum.
fn repeatable_checksum() -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for r in REPEATABLES {
        for byte in r
            .name
            .bytes()
            .chain([0])
            .chain(expanded(r.sql).into_bytes())
            .chain([0])
        {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

/// What this binary records in the version-0 row: the set's checksum and who applied it.
fn repeatable_record() -> String {
    format!(
        "repeatable {} outbox-relay {}",
        repeatable_checksum(),
        env!("CARGO_PKG_VERSION")
    )
}

/// How the installed functions and triggers compare with this binary's.
#[derive(Debug, PartialEq, Eq)]
enum RepeatableState {
    Current,
    /// Not recorded, or recorded by this version or an older one with other text.
    Stale {
        found: String,
    },
    /// Recorded by a newer outbox-relay: re-applying would downgrade them.
    Newer {
        by: String,
    },
}

fn repeatable_state(recorded: Option<&str>) -> RepeatableState {
    let Some(recorded) = recorded else {
        return RepeatableState::Stale {
            found: "none recorded (installed by an outbox-relay before they had one home)"
                .to_string(),
        };
    };
    let words: Vec<&str> = recorded.split_whitespace().collect();
    let (checksum, by) = match words.as_slice() {
        ["repeatable", checksum, "outbox-relay", by] => (*checksum, *by),
        _ => {
            return RepeatableState::Stale {
                found: format!("an unreadable record '{recorded}'"),
            }
        }
    };
    if checksum == repeatable_checksum() {
        RepeatableState::Current
    } else if release(by) > release(env!("CARGO_PKG_VERSION")) {
        RepeatableState::Newer { by: by.to_string() }
    } else {
        RepeatableState::Stale {
            found: format!("set {checksum} (applied by outbox-relay {by})"),
        }
    }
}

/// major.minor.patch of a version string, pre-release ignored; unreadable is oldest.
fn release(version: &str) -> (u64, u64, u64) {
    let mut parts = version
        .split(['-', '+'])
        .next()
        .unwrap_or("")
        .split('.')
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let mut next = || parts.next().unwrap_or(0);
    (next(), next(), next())
}

pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid schema name: {0}")]
    InvalidSchema(#[from] InvalidSchemaName),
    #[error("applying migration {name} to schema '{schema}' failed: {source}")]
    Apply {
        name: &'static str,
        schema: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("schema '{schema}' has no outbox (no {schema}.schema_migrations): run `outbox-relay migrate --schema {schema}`")]
    Missing { schema: String },
    #[error("schema '{schema}' is at version {found}, this relay needs {wanted}: run `outbox-relay migrate --schema {schema}`")]
    Behind {
        schema: String,
        found: i32,
        wanted: i32,
    },
    #[error("schema '{schema}' is at version {found}, newer than this relay knows ({wanted}): upgrade outbox-relay")]
    Ahead {
        schema: String,
        found: i32,
        wanted: i32,
    },
    #[error("schema '{schema}' is at version {version} but its functions and triggers are not this relay's (installed: {found}; wanted: set {wanted}): run `outbox-relay migrate --schema {schema}`")]
    RepeatablesStale {
        schema: String,
        version: i32,
        found: String,
        wanted: String,
    },
    #[error("schema '{schema}' has functions and triggers installed by outbox-relay {by}, newer than this one ({mine}): upgrade outbox-relay")]
    RepeatablesNewer {
        schema: String,
        by: String,
        mine: &'static str,
    },
}

/// What `apply` did.
#[derive(Default)]
pub struct Applied {
    /// Numbered files, in order.
    pub migrations: Vec<&'static Migration>,
    /// Whether the repeatable files were applied (the set had changed).
    pub repeatables: bool,
}

impl Applied {
    pub fn is_empty(&self) -> bool {
        self.migrations.is_empty() && !self.repeatables
    }
}

/// The schema name goes into the SQL unquoted, as everywhere (see `schema_name`).
/// `CREATE SCHEMA IF NOT EXISTS` needs CREATE on the database even when the
/// schema exists, so it is left out then: an owner given only its schema can
/// migrate it.
fn preamble(schema: &str, exists: bool) -> String {
    let create = if exists {
        String::new()
    } else {
        format!("CREATE SCHEMA IF NOT EXISTS {schema};\n")
    };
    format!(
        "{create}SET LOCAL search_path TO {schema};\n\
         CREATE TABLE IF NOT EXISTS schema_migrations (\n    \
             version int PRIMARY KEY,\n    \
             name text NOT NULL,\n    \
             applied_at timestamptz NOT NULL DEFAULT now()\n);\n"
    )
}

/// The repeatable files run with the search_path their functions pin
/// (`SET search_path FROM CURRENT`): the schema, then pg_temp last, so no
/// caller's temporary object stands in for the schema's (see migration 6).
fn repeatable_sql(schema: &str) -> String {
    let mut out = format!("SET LOCAL search_path TO {schema}, pg_temp;\n");
    for r in REPEATABLES {
        out.push_str(&format!("\n-- {}\n{}\n", r.name, expanded(r.sql)));
    }
    out.push_str(&format!("SET LOCAL search_path TO {schema};\n"));
    out
}

/// Records the repeatable set just applied (the version-0 row).
const RECORD_REPEATABLES: &str = "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)
     ON CONFLICT (version) DO UPDATE SET name = EXCLUDED.name, applied_at = now()";

/// Applies what is missing, under a lock so concurrent runs queue up: the
/// numbered files not yet applied, then the repeatable set if it changed (or
/// if a numbered file ran), all in one transaction. A schema newer than this
/// binary keeps its functions; a repeatable set recorded by a newer
/// outbox-relay is an error (nothing is applied).
pub async fn apply(client: &mut Client, schema: &str) -> Result<Applied, MigrateError> {
    schema_name::validate(schema)?;
    let apply_err = |name: &'static str| {
        let schema = schema.to_string();
        move |source| MigrateError::Apply {
            name,
            schema,
            source,
        }
    };
    let tx = client.transaction().await.map_err(apply_err("(begin)"))?;
    // Every statement below runs unnamed, and the lock is the transaction's:
    // migrate works through a transaction-mode pooler too.
    tx.execute_typed(
        "SELECT pg_advisory_xact_lock(hashtext('outbox-relay migrate ' || $1::text))",
        &[(&schema, Type::TEXT)],
    )
    .await
    .map_err(apply_err("(lock)"))?;
    let exists: bool = tx
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[(&schema, Type::TEXT)],
        )
        .await
        .map_err(apply_err("(schema)"))?
        .get(0);
    tx.batch_execute(&preamble(schema, exists))
        .await
        .map_err(apply_err("(schema_migrations)"))?;
    let done: Vec<(i32, String)> = tx
        .query_typed("SELECT version, name FROM schema_migrations", &[])
        .await
        .map_err(apply_err("(read versions)"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut applied = Applied::default();
    for m in MIGRATIONS
        .iter()
        .filter(|m| !done.iter().any(|(v, _)| *v == m.version))
    {
        tx.batch_execute(&expanded(m.sql))
            .await
            .map_err(apply_err(m.name))?;
        tx.execute_typed(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[(&m.version, Type::INT4), (&m.name, Type::TEXT)],
        )
        .await
        .map_err(apply_err(m.name))?;
        applied.migrations.push(m);
    }
    if repeatables_due(schema, &done, !applied.migrations.is_empty())? {
        tx.batch_execute(&repeatable_sql(schema))
            .await
            .map_err(apply_err("(functions and triggers)"))?;
        tx.execute_typed(
            RECORD_REPEATABLES,
            &[
                (&REPEATABLE_VERSION, Type::INT4),
                (&repeatable_record(), Type::TEXT),
            ],
        )
        .await
        .map_err(apply_err("(functions and triggers)"))?;
        applied.repeatables = true;
    }
    tx.commit().await.map_err(apply_err("(commit)"))?;
    Ok(applied)
}

/// Whether the repeatable set must be applied: it changed, or a numbered file
/// ran. Never on a schema newer than this binary (its functions are newer
/// too); a set recorded by a newer outbox-relay is an error, not a downgrade.
fn repeatables_due(
    schema: &str,
    done: &[(i32, String)],
    numbered_applied: bool,
) -> Result<bool, MigrateError> {
    if done.iter().any(|(v, _)| *v > latest_version()) {
        return Ok(false);
    }
    match repeatable_state(recorded_repeatables(done)) {
        RepeatableState::Newer { by } => Err(MigrateError::RepeatablesNewer {
            schema: schema.to_string(),
            by,
            mine: env!("CARGO_PKG_VERSION"),
        }),
        RepeatableState::Stale { .. } => Ok(true),
        RepeatableState::Current => Ok(numbered_applied),
    }
}

fn recorded_repeatables(done: &[(i32, String)]) -> Option<&str> {
    done.iter()
        .find(|(v, _)| *v == REPEATABLE_VERSION)
        .map(|(_, name)| name.as_str())
}

/// The SQL `apply` would run: the numbered files not yet applied, then the
/// repeatable set if it changed.
pub async fn pending_sql(client: &Client, schema: &str) -> Result<String, MigrateError> {
    let done = applied_versions(client, schema).await?;
    let mut out = String::from("BEGIN;\n");
    out.push_str(&preamble(schema, !done.is_empty()));
    let mut numbered = false;
    for m in MIGRATIONS
        .iter()
        .filter(|m| !done.iter().any(|(v, _)| *v == m.version))
    {
        numbered = true;
        out.push_str(&format!("\n-- {}\n{}\n", m.name, expanded(m.sql)));
        out.push_str(&format!(
            "INSERT INTO schema_migrations (version, name) VALUES ({}, '{}');\n",
            m.version, m.name
        ));
    }
    if repeatables_due(schema, &done, numbered)? {
        out.push_str(&repeatable_sql(schema));
        out.push_str(&format!(
            "INSERT INTO schema_migrations (version, name) VALUES ({REPEATABLE_VERSION}, '{}')\n    \
             ON CONFLICT (version) DO UPDATE SET name = EXCLUDED.name, applied_at = now();\n",
            repeatable_record()
        ));
    }
    out.push_str("COMMIT;\n");
    Ok(out)
}

/// Every row of `schema_migrations` (none when the table does not exist).
async fn applied_versions(
    client: &Client,
    schema: &str,
) -> Result<Vec<(i32, String)>, MigrateError> {
    schema_name::validate(schema)?;
    let read_err = |source| MigrateError::Apply {
        name: "(read versions)",
        schema: schema.to_string(),
        source,
    };
    let exists: bool = client
        .query_typed_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[(&format!("{schema}.schema_migrations"), Type::TEXT)],
        )
        .await
        .map_err(read_err)?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    Ok(client
        .query_typed(
            &format!("SELECT version, name FROM {schema}.schema_migrations"),
            &[],
        )
        .await
        .map_err(read_err)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Fails unless the schema is exactly at the version this binary was built
/// for and its functions and triggers are this binary's set.
pub async fn verify(client: &Client, schema: &str) -> Result<i32, MigrateError> {
    let rows = applied_versions(client, schema).await?;
    let Some(found) = rows
        .iter()
        .map(|(v, _)| *v)
        .filter(|v| *v != REPEATABLE_VERSION)
        .max()
    else {
        return Err(MigrateError::Missing {
            schema: schema.to_string(),
        });
    };
    let wanted = latest_version();
    match found.cmp(&wanted) {
        std::cmp::Ordering::Less => Err(MigrateError::Behind {
            schema: schema.to_string(),
            found,
            wanted,
        }),
        std::cmp::Ordering::Greater => Err(MigrateError::Ahead {
            schema: schema.to_string(),
            found,
            wanted,
        }),
        std::cmp::Ordering::Equal => match repeatable_state(recorded_repeatables(&rows)) {
            RepeatableState::Current => Ok(found),
            RepeatableState::Stale { found: installed } => Err(MigrateError::RepeatablesStale {
                schema: schema.to_string(),
                version: found,
                found: installed,
                wanted: repeatable_checksum(),
            }),
            RepeatableState::Newer { by } => Err(MigrateError::RepeatablesNewer {
                schema: schema.to_string(),
                by,
                mine: env!("CARGO_PKG_VERSION"),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn sql_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("sql")
    }

    #[test]
    fn every_file_of_sql_is_embedded_once() {
        let mut on_disk = Vec::new();
        for dir in ["functions", "triggers", "checks"] {
            for entry in std::fs::read_dir(sql_dir().join(dir)).expect("read sql dir") {
                let name = entry.expect("dir entry").file_name();
                on_disk.push(format!("{dir}/{}", name.to_string_lossy()));
            }
        }
        on_disk.sort();
        let mut embedded: Vec<String> = REPEATABLES.iter().map(|r| r.name.to_string()).collect();
        embedded.sort();
        assert_eq!(
            on_disk, embedded,
            "add every repeatable file to REPEATABLES"
        );
        let numbered = std::fs::read_dir(sql_dir())
            .expect("read sql/")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".sql"))
            })
            .count();
        assert_eq!(
            numbered,
            MIGRATIONS.len(),
            "add every numbered file to MIGRATIONS"
        );
    }

    /// Functions and triggers have one home: their own file, never a numbered one.
    #[test]
    fn each_function_and_trigger_is_defined_in_one_file() {
        let mut defined: Vec<(String, &str)> = Vec::new();
        let files = MIGRATIONS
            .iter()
            .map(|m| (m.name, m.sql))
            .chain(REPEATABLES.iter().map(|r| (r.name, r.sql)));
        for (file, sql) in files {
            for line in sql.lines() {
                let line = line.trim_start();
                let rest = [
                    "CREATE OR REPLACE FUNCTION ",
                    "CREATE FUNCTION ",
                    "CREATE TRIGGER ",
                ]
                .iter()
                .find_map(|p| line.strip_prefix(p));
                if let Some(rest) = rest {
                    let object = rest.split(['(', ' ']).next().unwrap_or(rest).to_string();
                    assert!(
                        file.starts_with("functions/") || file.starts_with("triggers/"),
                        "{file} defines {object}: move it to sql/functions/ or sql/triggers/"
                    );
                    assert!(
                        file.ends_with(&format!("/{object}.sql")),
                        "{file} defines {object}: one file per object, named after it"
                    );
                    if !defined.iter().any(|(o, f)| *o == object && *f == file) {
                        defined.push((object, file));
                    }
                }
            }
        }
        assert!(defined.len() >= 8, "{defined:?}");
    }

    #[test]
    fn no_placeholder_is_left_unfilled() {
        let files = MIGRATIONS
            .iter()
            .map(|m| (m.name, m.sql))
            .chain(REPEATABLES.iter().map(|r| (r.name, r.sql)));
        for (file, sql) in files {
            let text = expanded(sql);
            assert!(!text.contains("{{"), "{file}: unknown placeholder\n{text}");
        }
        assert!(expanded(MIGRATIONS[0].sql).contains(&format!(
            "CREATE INDEX messages_pending ON messages (id)\n    WHERE {};",
            predicates::pending("")
        )));
    }

    #[test]
    fn the_recorded_set_says_current_stale_or_newer() {
        assert_eq!(
            repeatable_state(Some(&repeatable_record())),
            RepeatableState::Current
        );
        assert!(matches!(
            repeatable_state(None),
            RepeatableState::Stale { .. }
        ));
        assert!(matches!(
            repeatable_state(Some("repeatable 0123 outbox-relay 0.0.1")),
            RepeatableState::Stale { .. }
        ));
        assert!(matches!(
            repeatable_state(Some("garbage")),
            RepeatableState::Stale { .. }
        ));
        assert_eq!(
            repeatable_state(Some("repeatable 0123 outbox-relay 999.0.0")),
            RepeatableState::Newer {
                by: "999.0.0".to_string()
            }
        );
        assert!(release("1.10.0") > release("1.9.3"));
        assert_eq!(release("0.2.0-rc.1"), (0, 2, 0));
    }
}
