//! What `check` asks the database: the server, the role and its privileges.

use tokio_postgres::{types::Type, Client};

use crate::store::{Session, StoreError};

/// The server and the role the relay logs in as.
#[derive(Debug, Clone)]
pub struct Server {
    pub version: String,
    pub role: String,
}

pub async fn server(session: &Session) -> Result<Server, StoreError> {
    let client = &session.client;
    let row = client
        .query_typed_one(
            "SELECT current_setting('server_version'), current_user::text",
            &[],
        )
        .await
        .map_err(StoreError::query("reading the server version and role"))?;
    Ok(Server {
        version: row.get(0),
        role: row.get(1),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Schema,
    Table,
    /// Some columns of a table (`args`: their names, comma-separated).
    Columns,
    Function,
}

/// Privileges `run` needs on one object of the outbox schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub kind: ObjectKind,
    /// The object's name inside the schema (the schema's own name for `Schema`).
    pub name: &'static str,
    /// Argument types of a function, as `oidvectortypes` prints them; the
    /// column names of `Columns`.
    pub args: &'static str,
    pub privileges: &'static [&'static str],
}

impl Requirement {
    /// How GRANT and humans name the object.
    pub fn object(&self, schema: &str) -> String {
        match self.kind {
            ObjectKind::Schema => format!("SCHEMA {schema}"),
            ObjectKind::Table | ObjectKind::Columns => format!("{schema}.{}", self.name),
            ObjectKind::Function => format!("FUNCTION {schema}.{}({})", self.name, self.args),
        }
    }
}

/// What `run` touches. The lease functions are not SECURITY DEFINER, so the
/// tables they write need the caller's privileges too.
pub const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        kind: ObjectKind::Schema,
        name: "",
        args: "",
        privileges: &["USAGE"],
    },
    Requirement {
        kind: ObjectKind::Table,
        name: "schema_migrations",
        args: "",
        privileges: &["SELECT"],
    },
    Requirement {
        kind: ObjectKind::Table,
        name: "messages",
        args: "",
        privileges: &["SELECT", "DELETE"],
    },
    // Marking and recording failures set these columns only (see `grants`).
    Requirement {
        kind: ObjectKind::Columns,
        name: "messages",
        args: "published_at, attempts, last_error, available_at, dead_lettered_at",
        privileges: &["UPDATE"],
    },
    Requirement {
        kind: ObjectKind::Table,
        name: "relays",
        args: "",
        privileges: &["SELECT", "INSERT", "UPDATE", "DELETE"],
    },
    Requirement {
        kind: ObjectKind::Table,
        name: "leases",
        args: "",
        privileges: &["SELECT", "UPDATE"],
    },
    Requirement {
        kind: ObjectKind::Function,
        name: "relay_heartbeat",
        args: "text, interval, text",
        privileges: &["EXECUTE"],
    },
    // The count of relays waiting for a NOTIFY (migration 3): a sequence,
    // whose privileges `has_table_privilege` and `GRANT ... ON` take as a table's.
    Requirement {
        kind: ObjectKind::Table,
        name: "relays_waiting",
        args: "",
        privileges: &["UPDATE"],
    },
    Requirement {
        kind: ObjectKind::Function,
        name: "relay_set_idle",
        args: "text, boolean",
        privileges: &["EXECUTE"],
    },
    Requirement {
        kind: ObjectKind::Function,
        name: "relay_set_broker_node",
        args: "text, text",
        privileges: &["EXECUTE"],
    },
    Requirement {
        kind: ObjectKind::Function,
        name: "relay_release",
        args: "text",
        privileges: &["EXECUTE"],
    },
];

/// One requirement as the database answered it.
#[derive(Debug, Clone)]
pub struct Granted {
    pub requirement: &'static Requirement,
    /// False when the object does not exist.
    pub exists: bool,
    pub missing: Vec<&'static str>,
}

/// The current role's privileges on everything `run` needs. Objects are looked
/// up in the catalogs, not by name resolution, so a schema the role cannot use
/// or an object that does not exist is an answer, not an error.
pub async fn privileges(session: &Session, schema: &str) -> Result<Vec<Granted>, StoreError> {
    let client = &session.client;
    let mut kinds = Vec::new();
    let mut names = Vec::new();
    let mut args = Vec::new();
    let mut privs = Vec::new();
    let mut owner = Vec::new();
    for (i, r) in REQUIREMENTS.iter().enumerate() {
        for p in r.privileges {
            kinds.push(match r.kind {
                ObjectKind::Schema => "schema",
                ObjectKind::Table => "table",
                ObjectKind::Columns => "columns",
                ObjectKind::Function => "function",
            });
            names.push(r.name);
            args.push(r.args);
            privs.push(*p);
            owner.push(i);
        }
    }
    let rows = client
        .query_typed(
            "SELECT CASE v.kind
                 WHEN 'schema' THEN
                   (SELECT has_schema_privilege(n.oid, v.privilege)
                      FROM pg_namespace n WHERE n.nspname = $1)
                 WHEN 'table' THEN
                   (SELECT has_table_privilege(c.oid, v.privilege)
                      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = $1 AND c.relname = v.name)
                 WHEN 'columns' THEN
                   (SELECT bool_and(has_column_privilege(c.oid, a.attnum, v.privilege))
                      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      JOIN pg_attribute a ON a.attrelid = c.oid AND NOT a.attisdropped
                     WHERE n.nspname = $1 AND c.relname = v.name
                       AND a.attname = ANY(string_to_array(replace(v.args, ' ', ''), ',')))
                 WHEN 'function' THEN
                   (SELECT bool_and(has_function_privilege(p.oid, v.privilege))
                      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                     WHERE n.nspname = $1 AND p.proname = v.name
                       AND oidvectortypes(p.proargtypes) = v.args)
               END
               FROM unnest($2::text[], $3::text[], $4::text[], $5::text[])
                    WITH ORDINALITY AS v(kind, name, args, privilege, ord)
              ORDER BY v.ord",
            &[
                (&schema, Type::TEXT),
                (&kinds, Type::TEXT_ARRAY),
                (&names, Type::TEXT_ARRAY),
                (&args, Type::TEXT_ARRAY),
                (&privs, Type::TEXT_ARRAY),
            ],
        )
        .await
        .map_err(StoreError::query("reading the role's privileges"))?;
    let mut out: Vec<Granted> = REQUIREMENTS
        .iter()
        .map(|requirement| Granted {
            requirement,
            exists: true,
            missing: Vec::new(),
        })
        .collect();
    for ((row, i), p) in rows.iter().zip(owner).zip(privs) {
        match row.get::<_, Option<bool>>(0) {
            None => out[i].exists = false,
            Some(false) => out[i].missing.push(p),
            Some(true) => {}
        }
    }
    Ok(out)
}

/// What sits between the relay and PostgreSQL, as two connections observe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pooling {
    /// Each connection keeps one server session: a direct connection or a
    /// pooler in session mode (both fine for everything, LISTEN included).
    Session,
    /// Consecutive transactions of one connection ran on different server
    /// sessions: a pooler in transaction mode. `evidence` says what was seen.
    Transaction { evidence: String },
    /// The server refused a transaction block: a pooler in statement mode.
    Statement { error: String },
    /// The probe could not tell (e.g. no second server connection in time).
    Unknown { why: String },
}

/// How long the probe waits for a server connection the pool may not have.
const POOLING_PROBE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Tells a transaction-mode pooler from a server session of our own with two
/// client connections: `first` runs a transaction, then `second` opens one and
/// holds it. Through a transaction pooler `second` may get the server session
/// `first` just left (same backend pid: two clients on one session), and
/// `first`'s next transaction must run elsewhere (or wait, with a pool of one).
/// Directly, or through a session pooler, `first` keeps its backend throughout.
pub async fn pooling(first: &Session, second: &Session) -> Result<Pooling, StoreError> {
    // Other clients of the pool may take the session `first` left, so one
    // round may see nothing: a few rounds, the first sign is proof (directly
    // or through a session pooler there is never one).
    for _ in 0..POOLING_PROBE_ROUNDS {
        let found = pooling_round(&first.client, &second.client).await?;
        if found != Pooling::Session {
            return Ok(found);
        }
    }
    Ok(Pooling::Session)
}

/// Rounds of [`pooling`] before it says no transaction pooler is there.
const POOLING_PROBE_ROUNDS: usize = 10;

async fn pooling_round(first: &Client, second: &Client) -> Result<Pooling, StoreError> {
    let pid = "SELECT pg_backend_pid()";
    let read = |rows: Vec<tokio_postgres::Row>| -> Result<i32, StoreError> {
        rows.first()
            .ok_or(StoreError::NoRow {
                what: "reading the backend pid",
            })?
            .try_get(0)
            .map_err(StoreError::decode("the backend pid"))
    };
    let before = read(
        first
            .query_typed(pid, &[])
            .await
            .map_err(StoreError::query("reading the backend pid"))?,
    )?;
    // A session pooler with no server session left for `second` makes it wait.
    let begin = tokio::time::timeout(POOLING_PROBE_WAIT, second.batch_execute("BEGIN"));
    match begin.await {
        Err(_) => {
            return Ok(Pooling::Unknown {
                why: format!(
                    "a second connection got no server session within {}s",
                    POOLING_PROBE_WAIT.as_secs()
                ),
            })
        }
        // PgBouncer in statement mode: "transaction blocks not allowed".
        Ok(Err(e)) => {
            return match e.as_db_error() {
                Some(db) if db.message().contains("transaction blocks") => Ok(Pooling::Statement {
                    error: db.message().to_string(),
                }),
                _ => Err(StoreError::query("opening a transaction")(e)),
            }
        }
        Ok(Ok(())) => {}
    }
    let result = async {
        let held = read(
            second
                .query_typed(pid, &[])
                .await
                .map_err(StoreError::query("reading the backend pid"))?,
        )?;
        if held == before {
            return Ok(Pooling::Transaction {
                evidence: format!(
                    "two connections ran on one server session (backend pid {held}) one after the other"
                ),
            });
        }
        match tokio::time::timeout(POOLING_PROBE_WAIT, first.query_typed(pid, &[])).await {
            Err(_) => Ok(Pooling::Transaction {
                evidence: format!(
                    "a connection's next transaction waited for the server session (pid {held}) another connection holds"
                ),
            }),
            Ok(rows) => {
                let after =
                    read(rows.map_err(StoreError::query("reading the backend pid"))?)?;
                Ok(if after == before {
                    Pooling::Session
                } else {
                    Pooling::Transaction {
                        evidence: format!(
                            "one connection's consecutive transactions ran on backend pids {before} and {after}"
                        ),
                    }
                })
            }
        }
    }
    .await;
    let _ = second.batch_execute("ROLLBACK").await;
    result
}
