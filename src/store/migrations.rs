//! The versioned SQL files of `sql/`, embedded in the binary, applied once each.

use tokio_postgres::{types::Type, Client};

use crate::{
    schema_name::{self, InvalidSchemaName},
    store::StoreError,
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

/// Applies what is missing, under a lock so concurrent runs queue up.
/// Returns the migrations applied (empty when up to date).
pub async fn apply(
    client: &mut Client,
    schema: &str,
) -> Result<Vec<&'static Migration>, MigrateError> {
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
    let done: Vec<i32> = tx
        .query_typed("SELECT version FROM schema_migrations", &[])
        .await
        .map_err(apply_err("(read versions)"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| !done.contains(&m.version)) {
        tx.batch_execute(m.sql).await.map_err(apply_err(m.name))?;
        tx.execute_typed(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[(&m.version, Type::INT4), (&m.name, Type::TEXT)],
        )
        .await
        .map_err(apply_err(m.name))?;
        applied.push(m);
    }
    tx.commit().await.map_err(apply_err("(commit)"))?;
    Ok(applied)
}

/// The SQL `apply` would run for the migrations not yet applied.
pub async fn pending_sql(client: &Client, schema: &str) -> Result<String, MigrateError> {
    let done = applied_versions(client, schema).await?;
    let mut out = String::from("BEGIN;\n");
    out.push_str(&preamble(schema, !done.is_empty()));
    for m in MIGRATIONS.iter().filter(|m| !done.contains(&m.version)) {
        out.push_str(&format!("\n-- {}\n{}\n", m.name, m.sql));
        out.push_str(&format!(
            "INSERT INTO schema_migrations (version, name) VALUES ({}, '{}');\n",
            m.version, m.name
        ));
    }
    out.push_str("COMMIT;\n");
    Ok(out)
}

async fn applied_versions(client: &Client, schema: &str) -> Result<Vec<i32>, MigrateError> {
    schema_name::validate(schema)?;
    let exists: bool = client
        .query_typed_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[(&format!("{schema}.schema_migrations"), Type::TEXT)],
        )
        .await
        .map_err(|source| MigrateError::Apply {
            name: "(read versions)",
            schema: schema.to_string(),
            source,
        })?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    Ok(client
        .query_typed(
            &format!("SELECT version FROM {schema}.schema_migrations"),
            &[],
        )
        .await
        .map_err(|source| MigrateError::Apply {
            name: "(read versions)",
            schema: schema.to_string(),
            source,
        })?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Fails unless the schema is exactly at the version this binary was built for.
pub async fn verify(client: &Client, schema: &str) -> Result<i32, MigrateError> {
    let versions = applied_versions(client, schema).await?;
    let Some(found) = versions.iter().copied().max() else {
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
        std::cmp::Ordering::Equal => Ok(found),
    }
}
