//! What `check` asks the database: the server, the role and its privileges.

use tokio_postgres::{types::Type, Client};

use crate::store::StoreError;

/// The server and the role the relay logs in as.
#[derive(Debug, Clone)]
pub struct Server {
    pub version: String,
    pub role: String,
}

pub async fn server(client: &Client) -> Result<Server, StoreError> {
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
    Function,
}

/// Privileges `run` needs on one object of the outbox schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub kind: ObjectKind,
    /// The object's name inside the schema (the schema's own name for `Schema`).
    pub name: &'static str,
    /// Argument types of a function, as `oidvectortypes` prints them.
    pub args: &'static str,
    pub privileges: &'static [&'static str],
}

impl Requirement {
    /// How GRANT and humans name the object.
    pub fn object(&self, schema: &str) -> String {
        match self.kind {
            ObjectKind::Schema => format!("SCHEMA {schema}"),
            ObjectKind::Table => format!("{schema}.{}", self.name),
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
        privileges: &["SELECT", "UPDATE", "DELETE"],
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
pub async fn privileges(client: &Client, schema: &str) -> Result<Vec<Granted>, StoreError> {
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
