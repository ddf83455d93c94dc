//! Every SQL statement the relay runs against the outbox lives here (the
//! operator commands' statements are in `store/admin.rs`, the schema's in
//! `store/migrations.rs`, the applications' insert in `store/enqueue.rs`), and
//! every tokio-postgres type stays in this module and its children: callers
//! hold a [`Store`] (the hot path) or a [`Session`] (any other connection).

pub mod admin;
mod control;
pub mod enqueue;
pub mod floor;
mod housekeeping;
pub mod migrations;
pub mod predicates;
mod session;
mod tls;
mod url;

pub use control::Control;
pub use floor::{ClaimFloor, FloorPlan, Probe, SharedFloor};
pub use housekeeping::Housekeeping;
pub use migrations::MigrateError;
pub use session::Session;
pub use url::{check_database_url, database_tls_warning};

use std::time::{Duration, SystemTime};

use futures_util::TryStreamExt;
use tokio_postgres::{
    types::{ToSql, Type},
    Client, Row, Statement,
};

use crate::{
    config::Connections,
    redact::redact_url,
    rows::{Failure, OutboxRow},
};

/// A statement on a stalled connection (a network that drops packets without
/// closing) would otherwise wait forever.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The server cancels a statement a little before [`STATEMENT_TIMEOUT`]:
/// otherwise a query the relay gave up on keeps running (and holding its
/// snapshot) on the server until it tries to send its result.
fn server_statement_timeout_ms() -> u128 {
    STATEMENT_TIMEOUT.as_millis() * 5 / 6
}

/// The settings a relay statement runs with. They are set per transaction
/// (`SET LOCAL`), never on the session: through a transaction-mode pooler the
/// next transaction may run on another server connection, and a session
/// setting would stay behind on a server connection other clients then use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settings {
    /// The server-side statement timeout.
    Bounded,
    /// Also asynchronous commit (a mark lost in a database crash only means
    /// the row is published again, same message_id: at-least-once holds
    /// without waiting for the WAL flush).
    HotPath,
}

impl Settings {
    /// The settings as SET commands: `scope` is "LOCAL " for one
    /// transaction, "" for the whole session.
    fn assignments(self, scope: &str) -> String {
        let ms = server_statement_timeout_ms();
        let sync = match self {
            Settings::Bounded => String::new(),
            Settings::HotPath => format!("; SET {scope}synchronous_commit TO off"),
        };
        format!("SET {scope}statement_timeout = {ms}{sync}")
    }

    fn begin(self) -> String {
        format!("BEGIN; {}", self.assignments("LOCAL "))
    }
}

/// One SQL statement with its parameter types. It runs as the unnamed
/// statement (Parse, Bind, Execute, Sync in one round trip), so no prepared
/// statement outlives it: a pooler may hand the next one to another server
/// connection, and poolers in transaction mode (PgBouncer, RDS Proxy,
/// Supavisor, pgcat) mostly support no named prepared statements.
///
/// On a direct connection the hot path's statements are prepared once
/// instead ([`Sql::prepared`]): planning the claim costs more than running it.
#[derive(Debug, Clone)]
pub(crate) struct Sql {
    text: String,
    types: Vec<Type>,
    /// Set on a direct connection only: a named statement lives on one
    /// server session, which a transaction-mode pooler does not keep.
    prepared: Option<Statement>,
}

impl Sql {
    pub(crate) fn new(text: impl Into<String>, types: &[Type]) -> Self {
        Self {
            text: text.into(),
            types: types.to_vec(),
            prepared: None,
        }
    }

    /// The same statement, prepared (named) on `client`'s session.
    pub(crate) async fn prepared(mut self, client: &Client) -> Result<Self, tokio_postgres::Error> {
        self.prepared = Some(client.prepare_typed(&self.text, &self.types).await?);
        Ok(self)
    }

    /// The rows, and the count of rows the statement changed.
    pub(crate) async fn run(
        &self,
        client: &Client,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(Vec<Row>, u64), tokio_postgres::Error> {
        debug_assert_eq!(params.len(), self.types.len(), "{}", self.text);
        let stream = match &self.prepared {
            Some(statement) => client.query_raw(statement, params.iter().copied()).await?,
            None => {
                let typed = params.iter().copied().zip(self.types.iter().cloned());
                client.query_typed_raw(&self.text, typed).await?
            }
        };
        futures_util::pin_mut!(stream);
        let mut rows = Vec::new();
        while let Some(row) = stream.try_next().await? {
            rows.push(row);
        }
        Ok((rows, stream.rows_affected().unwrap_or(0)))
    }

    /// Like `run`, in a transaction of its own that carries `settings`. The
    /// BEGIN, the statement and the COMMIT are pipelined: still one round
    /// trip. When the statement fails the COMMIT ends the failed transaction
    /// (as a ROLLBACK), so nothing is left open on the server connection.
    pub(crate) async fn run_with(
        &self,
        client: &Client,
        settings: Settings,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(Vec<Row>, u64), tokio_postgres::Error> {
        if self.prepared.is_some() {
            // A prepared statement means a session of our own, which took the
            // settings once at connect (`Store::connect`): no wrapper needed.
            return self.run(client, params).await;
        }
        let begin = settings.begin();
        // join (not try_join) polls all three even when one fails at once, so
        // BEGIN, statement and COMMIT go out together, in that order, and no
        // transaction is ever left open on the session.
        let (begun, result, committed) = tokio::join!(
            client.batch_execute(&begin),
            self.run(client, params),
            client.batch_execute("COMMIT"),
        );
        begun?;
        let result = result?;
        committed?;
        Ok(result)
    }
}

/// Bounds a statement by [`STATEMENT_TIMEOUT`].
pub(crate) async fn bounded<T>(
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(STATEMENT_TIMEOUT, fut).await {
        Ok(result) => result.map_err(StoreError::query(what)),
        Err(_) => Err(StoreError::Timeout { what }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to PostgreSQL at {url}: {}; check the database URL, that the server is up and accepts connections", cause(source))]
    Connect {
        url: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL at {url} accepted the connection but did not complete the handshake (TLS, startup, authentication) within {}s; check that the address is PostgreSQL and not a proxy or firewall that holds connections", DB_HANDSHAKE_TIMEOUT.as_secs())]
    HandshakeTimeout { url: String },
    #[error("database URL: {0}")]
    Tls(#[from] tls::TlsError),
    #[error(
        "schema '{schema}' is not ready: {}; run `outbox-relay migrate --schema {schema}`",
        cause(source)
    )]
    Prepare {
        schema: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{what} got no answer within {}s; the connection is treated as lost", STATEMENT_TIMEOUT.as_secs())]
    Timeout { what: &'static str },
    /// A value the server sent that the relay cannot read: the connection is fine.
    #[error("reading {what} failed: {}", cause(source))]
    Decode {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A statement that always returns one row returned none.
    #[error("{what} returned no row; the database answered unexpectedly (is it PostgreSQL?)")]
    NoRow { what: &'static str },
    #[error("{what} failed: {}", cause(source))]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// tokio-postgres prints "db error" or "error connecting to server" alone;
/// the server's message or the I/O error is its source. Both are said, so the
/// CLI's cause chain (`cli::with_causes`) finds nothing left to add.
fn cause(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(inner) => format!("{e}: {inner}"),
        None => e.to_string(),
    }
}

impl StoreError {
    pub(crate) fn query(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
        move |source| StoreError::Query { what, source }
    }

    pub(crate) fn decode(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
        move |source| StoreError::Decode { what, source }
    }

    /// The server refused a value (SQLSTATE class 22, data exception, or 23,
    /// integrity constraint violation): one row's value, not the connection
    /// or the statement, is at fault, so its neighbours must not share the blame.
    pub fn is_data_error(&self) -> bool {
        self.sqlstate()
            .is_some_and(|code| code.starts_with("22") || code.starts_with("23"))
    }

    /// The server's SQLSTATE, when the server answered with an error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            StoreError::Query { source, .. }
            | StoreError::Prepare { source, .. }
            | StoreError::Connect { source, .. } => source.code().map(|c| c.code()),
            StoreError::Decode { .. }
            | StoreError::HandshakeTimeout { .. }
            | StoreError::NoRow { .. }
            | StoreError::Tls(_)
            | StoreError::Timeout { .. } => None,
        }
    }

    /// Which hot-path statement failed, as a metric label (a closed set).
    pub fn statement(&self) -> &'static str {
        let what = match self {
            StoreError::Query { what, .. }
            | StoreError::Decode { what, .. }
            | StoreError::NoRow { what }
            | StoreError::Timeout { what } => *what,
            StoreError::Connect { .. }
            | StoreError::HandshakeTimeout { .. }
            | StoreError::Tls(_) => return "connect",
            StoreError::Prepare { .. } => return "prepare",
        };
        match what {
            CLAIM => "claim",
            MARK => "mark",
            FAIL | PARK => "fail",
            IDLE => "idle",
            NODE => "broker_node",
            _ => "other",
        }
    }

    /// The connection is gone: reconnect rather than retry on this one. A
    /// statement's error without a server error is the transport's (values
    /// are decoded apart, as `Decode`, which never means a lost connection).
    pub fn is_connection_lost(&self) -> bool {
        match self {
            StoreError::Query { source, .. } | StoreError::Prepare { source, .. } => {
                source.is_closed() || source.as_db_error().is_none()
            }
            StoreError::Decode { .. } | StoreError::NoRow { .. } => false,
            StoreError::Connect { .. }
            | StoreError::HandshakeTimeout { .. }
            | StoreError::Tls(_)
            | StoreError::Timeout { .. } => true,
        }
    }
}

/// Deadline for one connection attempt as a whole: TCP connect, TLS,
/// startup and authentication. tokio-postgres's `connect_timeout` bounds only
/// the TCP connect, so a peer that accepts and then says nothing (a half-open
/// load balancer, a firewall) would otherwise hold the attempt forever.
pub const DB_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens one connection and leaves driving it to the caller (a [`Store`] or
/// a [`Session`]).
async fn connect_raw(
    database_url: &str,
    application_name: &str,
) -> Result<
    (
        Client,
        tokio_postgres::Connection<
            tokio_postgres::Socket,
            <tokio_postgres_rustls::MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<
                tokio_postgres::Socket,
            >>::Stream,
        >,
    ),
    StoreError,
> {
    let (url, mode, files) = tls::split_tls_params(database_url)?;
    let mut config: tokio_postgres::Config = url.parse().map_err(|source| StoreError::Connect {
        url: redact_url(database_url),
        source,
    })?;
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    config.connect_timeout(Duration::from_secs(10));
    config.keepalives_idle(Duration::from_secs(10));
    let connector = tls::connector(mode, files.as_deref())?;
    // Dropping the attempt at the deadline closes its socket: nothing leaks.
    match tokio::time::timeout(DB_HANDSHAKE_TIMEOUT, config.connect(connector)).await {
        Ok(connected) => connected.map_err(|source| StoreError::Connect {
            url: redact_url(database_url),
            source,
        }),
        Err(_) => Err(StoreError::HandshakeTimeout {
            url: redact_url(database_url),
        }),
    }
}

// What each hot-path statement is, in its errors (and, via
// `StoreError::statement`, in the database-errors metric).
const CLAIM: &str = "claiming pending outbox rows";
const PROBE: &str = "probing the claim floor";
const MARK: &str = "marking confirmed rows published";
const FAIL: &str = "recording failed publish attempts";
const PARK: &str = "parking a row whose failure could not be recorded";
const IDLE: &str = "saying whether the relay waits for notifications";
const NODE: &str = "recording the RabbitMQ node";

/// The relay's hot path: claim, mark, record failures. One connection.
pub struct Store {
    client: Client,
    task: tokio::task::JoinHandle<()>,
    /// Becomes true when the connection task ends.
    closed: tokio::sync::watch::Receiver<bool>,
    claim: Sql,
    probe: Sql,
    mark: Sql,
    delete: Sql,
    fail: Sql,
    park: Sql,
    idle: Sql,
    node: Sql,
}

impl Store {
    /// `session_kept`: the connection is direct (or session-pooled), so the
    /// hot path's statements are prepared once and its settings set once on
    /// the session; otherwise (a transaction-mode pooler, `listen = false`)
    /// every statement runs unnamed in a transaction of its own.
    pub async fn connect(conn: &Connections, session_kept: bool) -> Result<Self, StoreError> {
        let (client, connection) = connect_raw(&conn.database_url, "outbox-relay").await?;
        let (closed_tx, closed) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "database connection closed");
            }
            let _ = closed_tx.send(true);
        });
        let s = &conn.schema;
        check_schema(&client, s).await?;
        let columns = "id, message_id, exchange, routing_key, partition, partition_key, \
                       payload, octet_length(payload) AS size, content_type, message_type, \
                       correlation_id, headers, octet_length(headers::text) AS header_size, \
                       created_at, attempts";
        let is_pending = predicates::pending("");
        let pending =
            format!("{is_pending} AND available_at <= now() AND partition = ANY($1::smallint[])");
        // A row waits behind an earlier row of its key that is not due
        // (scheduled, or backing off). The not-due rows are read once per
        // claim into a map key -> first id, looked up per row: the cost stays
        // flat however many keys wait, whatever plan the statistics suggest.
        let due_first = "NOT coalesce(((SELECT first_ids FROM waiting) ->> m.partition_key)::bigint
                                      < m.id, false)";
        // Above the held window a row also waits behind a pending row of its
        // key inside the window that the relay does not hold (it committed
        // late): $4 maps key -> last id held. (Below the window every earlier
        // row of its key is claimable itself, so it comes first in this claim.)
        // The bounds are row comparisons on (partition_key, id): the probe goes
        // through the (partition_key, id) index, starting past the key's last
        // held id and the claim floor $9 (not at the key's first dead entry),
        // and never an id range of the pending index, whatever the statistics
        // say.
        let late_first = format!(
            "($2 = 0 OR m.partition_key IS NULL OR NOT EXISTS (
                  SELECT 1 FROM {s}.messages p
                   WHERE p.partition_key = m.partition_key
                     AND (p.partition_key, p.id) > (m.partition_key,
                         greatest(coalesce(($4::jsonb ->> m.partition_key)::bigint, 0), $9 - 1))
                     AND (p.partition_key, p.id) < (m.partition_key, least($2 + 1, m.id))
                     AND {}))",
            predicates::pending("p")
        );
        let claim = Sql::new(
            format!(
                "WITH waiting AS MATERIALIZED (
                SELECT coalesce(jsonb_object_agg(partition_key, first_id), '{{}}') AS first_ids
                  FROM (SELECT partition_key, min(id) AS first_id FROM {s}.messages
                         WHERE {is_pending}
                           AND available_at > now() AND partition_key IS NOT NULL
                           AND partition = ANY($1::smallint[])
                         GROUP BY partition_key) k),
             -- Two id-range scans of the pending index, below and above the
             -- window of ids the relay holds ($7..$2): a late commit below the
             -- window, or any row above it, is found without waiting. Ranges
             -- (not an OR) keep the scans on the id index whatever the planner's
             -- statistics say (a table never ANALYZEd has none). Both start at
             -- the claim floor $9 (store/floor.rs): below it lie only the dead
             -- entries of rows already relayed.
             claimed AS (
                SELECT * FROM (
                    (SELECT {columns} FROM {s}.messages m
                      WHERE {pending} AND id > greatest($2, $9 - 1) AND {due_first}
                        AND {late_first}
                      ORDER BY id LIMIT $3)
                    UNION ALL
                    (SELECT {columns} FROM {s}.messages m
                      WHERE {pending} AND id >= $9 AND id < $7 AND {due_first}
                      ORDER BY id LIMIT $3)) both_sides
                 ORDER BY id
                 LIMIT $3),
             -- Payload and header bytes loaded by this claim stay within $6
             -- (the first row always goes); a payload over $5 is never loaded
             -- (octet_length reads the stored size, not the value), nor are
             -- headers over $8 (as JSON text): such a row is parked.
             sized AS (
                SELECT c.*, (size <= $5::int) AS fits, (header_size <= $8::int) AS headers_fit,
                       sum(CASE WHEN size <= $5::int THEN size ELSE 0 END
                           + CASE WHEN header_size <= $8::int THEN header_size ELSE 0 END)
                           OVER (ORDER BY id) AS upto,
                       count(*) OVER () AS claimed,
                       row_number() OVER (ORDER BY id) AS nth
                  FROM claimed c)
             SELECT id, message_id, exchange, routing_key, partition, partition_key,
                    CASE WHEN fits THEN payload END, size, content_type, message_type,
                    correlation_id, CASE WHEN headers_fit THEN headers::text END, created_at,
                    attempts, claimed, header_size
               FROM sized
              WHERE upto <= $6::bigint OR nth = 1
              ORDER BY id"
            ),
            &[
                Type::INT2_ARRAY,
                Type::INT8,
                Type::INT8,
                Type::JSONB,
                Type::INT4,
                Type::INT8,
                Type::INT8,
                Type::INT4,
                Type::INT8,
            ],
        );
        // The claim floor's probe (store/floor.rs), in one statement: the
        // snapshot first, then the lock table. The first pending id from the
        // floor $2 up to $3 (due or not: a row backing off or scheduled
        // holds the floor), the transactions that may write the table (any
        // lock but a reader's, other than this session's; prepared
        // transactions have no pid), and whether the id sequence caches ids.
        let probe = Sql::new(
            format!(
                "SELECT (SELECT id FROM {s}.messages
                          WHERE published_at IS NULL AND dead_lettered_at IS NULL
                            AND id >= $2 AND id < $3 AND partition = ANY($1::smallint[])
                          ORDER BY id LIMIT 1),
                        (SELECT coalesce(array_agg(DISTINCT l.virtualtransaction), '{{}}')
                           FROM pg_catalog.pg_locks l
                          WHERE l.locktype = 'relation'
                            AND l.database = (SELECT oid FROM pg_catalog.pg_database
                                               WHERE datname = current_database())
                            AND l.relation = '{s}.messages'::regclass
                            AND l.mode <> 'AccessShareLock'
                            AND l.pid IS DISTINCT FROM pg_backend_pid()),
                        coalesce((SELECT q.seqcache > 1 FROM pg_catalog.pg_sequence q
                                   WHERE q.seqrelid = pg_get_serial_sequence('{s}.messages', 'id')::regclass),
                                 false)"
            ),
            &[Type::INT2_ARRAY, Type::INT8, Type::INT8],
        );
        let mark = Sql::new(
            format!(
                "UPDATE {s}.messages SET published_at = now()
              WHERE id = ANY($1::bigint[]) AND published_at IS NULL"
            ),
            &[Type::INT8_ARRAY],
        );
        let delete = Sql::new(
            format!("DELETE FROM {s}.messages WHERE id = ANY($1::bigint[])"),
            &[Type::INT8_ARRAY],
        );
        let fail = Sql::new(
            format!(
                "UPDATE {s}.messages m
                SET attempts = least(m.attempts, 2147483646) + 1,
                    last_error = f.error,
                    available_at = now() + f.delay_ms * interval '1 millisecond',
                    dead_lettered_at = CASE WHEN f.park OR least(m.attempts, 2147483646) + 1 >= $5
                                            THEN now() END
               FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bool[])
                    AS f(id, error, delay_ms, park)
              WHERE m.id = f.id AND {}
          RETURNING m.id, m.dead_lettered_at IS NOT NULL, m.attempts",
                predicates::pending("m")
            ),
            &[
                Type::INT8_ARRAY,
                Type::TEXT_ARRAY,
                Type::INT8_ARRAY,
                Type::BOOL_ARRAY,
                Type::INT4,
            ],
        );
        // For a row whose failure the statement above cannot record: it sets
        // nothing but the park and the reason, so the row's own values cannot
        // make it fail too.
        let park = Sql::new(
            format!(
                "UPDATE {s}.messages SET dead_lettered_at = now(), last_error = $2
              WHERE id = $1 AND {is_pending}
          RETURNING id, attempts"
            ),
            &[Type::INT8, Type::TEXT],
        );
        // Whether this relay waits for a NOTIFY (see migration 3): the
        // applications' insert trigger notifies only while a relay does.
        let idle = Sql::new(
            format!("SELECT {s}.relay_set_idle($1, $2)"),
            &[Type::TEXT, Type::BOOL],
        );
        let node = Sql::new(
            format!("SELECT {s}.relay_set_broker_node($1, $2)"),
            &[Type::TEXT, Type::TEXT],
        );
        let (claim, probe, mark, delete, fail, park, idle, node) = if session_kept {
            // Prepared statements still plan every execution: a generic plan
            // is made once, from the table as it is then. Made on an empty
            // outbox (a relay started before the first rows), the claim's
            // per-key probe scanned every pending row per candidate, and once
            // a backlog grew each claim ran into the statement timeout (the
            // bench's keyed phase: 40 rows/s). Planning costs about 1 ms.
            client
                .batch_execute(&format!(
                    "{}; SET plan_cache_mode TO force_custom_plan",
                    Settings::HotPath.assignments("")
                ))
                .await
                .map_err(StoreError::query("setting up the session"))?;
            let prepare = |sql: Sql| {
                let client = &client;
                async move {
                    sql.prepared(client)
                        .await
                        .map_err(|source| StoreError::Prepare {
                            schema: s.to_string(),
                            source,
                        })
                }
            };
            // Pipelined: one round trip at every (re)connect, not eight.
            tokio::try_join!(
                prepare(claim),
                prepare(probe),
                prepare(mark),
                prepare(delete),
                prepare(fail),
                prepare(park),
                prepare(idle),
                prepare(node),
            )?
        } else {
            (claim, probe, mark, delete, fail, park, idle, node)
        };
        Ok(Self {
            client,
            task,
            closed,
            claim,
            probe,
            mark,
            delete,
            fail,
            park,
            idle,
            node,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed() || self.task.is_finished()
    }

    /// Resolves when the connection has ended.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut closed = self.closed.clone();
        async move {
            let _ = closed.wait_for(|c| *c).await;
        }
    }

    /// Due pending rows of the given partitions in id order, outside the
    /// window of ids the relay holds, from id `from` (the claim floor; 0:
    /// all). `held` maps each partition key the relay holds rows of (in
    /// flight or queued) to the last such id.
    pub async fn claim_batch(
        &self,
        partitions: &[i16],
        window: HeldWindow,
        held: &serde_json::Value,
        limits: ClaimLimits,
        from: i64,
    ) -> Result<Claim, StoreError> {
        let limit = limits.rows as i64;
        let max_payload = i32::try_from(limits.max_payload_bytes).unwrap_or(i32::MAX);
        let max_headers = i32::try_from(limits.max_header_bytes).unwrap_or(i32::MAX);
        let budget = i64::try_from(limits.payload_budget).unwrap_or(i64::MAX);
        let rows = bounded(
            CLAIM,
            self.claim.run_with(
                &self.client,
                Settings::Bounded,
                &[
                    &partitions,
                    &window.highest,
                    &limit,
                    held,
                    &max_payload,
                    &budget,
                    &window.lowest,
                    &max_headers,
                    &from,
                ],
            ),
        )
        .await?
        .0;
        let claimed: i64 = match rows.first() {
            Some(r) => r.try_get(14).map_err(StoreError::decode("claim size"))?,
            None => 0,
        };
        let rows = rows
            .iter()
            .map(|r| decode_row(r, limits))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Claim {
            more: claimed >= limit || (rows.len() as i64) < claimed,
            rows,
        })
    }

    /// Marks confirmed rows published, or deletes them when nothing is kept.
    pub async fn mark_published(&self, ids: &[i64], keep: bool) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        fail::fail_point!("before_mark_published");
        let statement = if keep { &self.mark } else { &self.delete };
        bounded(
            MARK,
            statement.run_with(&self.client, Settings::HotPath, &[&ids]),
        )
        .await
        .map(|(_, changed)| changed)
    }

    /// Records failed attempts; returns the ids that were dead-lettered now.
    /// When the server refuses a value of one row (a data error), each row is
    /// recorded on its own and the row that cannot be is parked with the
    /// server's reason: one row's value never holds back its neighbours.
    pub async fn record_failures(
        &self,
        failures: &[Failure],
        max_attempts: i32,
    ) -> Result<Vec<(i64, i32)>, StoreError> {
        match self.record_failures_together(failures, max_attempts).await {
            Err(e) if e.is_data_error() => {}
            recorded => return recorded,
        }
        let mut parked = Vec::new();
        for failure in failures {
            let one = std::slice::from_ref(failure);
            match self.record_failures_together(one, max_attempts).await {
                Ok(now) => parked.extend(now),
                Err(e) if e.is_data_error() => {
                    parked.extend(self.park_unrecordable(failure, &e).await?)
                }
                Err(e) => return Err(e),
            }
        }
        Ok(parked)
    }

    /// Parks a row whose failed attempt the server would not record.
    async fn park_unrecordable(
        &self,
        failure: &Failure,
        refused: &StoreError,
    ) -> Result<Option<(i64, i32)>, StoreError> {
        let id = failure.id;
        let reason = format!(
            "outbox row {id} was parked because recording its failed attempt failed ({refused}): \
             fix the value the database refused, then `outbox-relay dead-letters retry --id {id}`; \
             the attempt had failed with: {}",
            failure.error
        );
        let (rows, _) = bounded(
            PARK,
            self.park
                .run_with(&self.client, Settings::HotPath, &[&id, &reason]),
        )
        .await?;
        rows.first()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .transpose()
            .map_err(StoreError::decode("the parked row"))
    }

    async fn record_failures_together(
        &self,
        failures: &[Failure],
        max_attempts: i32,
    ) -> Result<Vec<(i64, i32)>, StoreError> {
        if failures.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = failures.iter().map(|f| f.id).collect();
        let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
        let delays: Vec<i64> = failures
            .iter()
            .map(|f| f.retry_in.as_millis().min(i64::MAX as u128) as i64)
            .collect();
        let park: Vec<bool> = failures.iter().map(|f| f.park_now).collect();
        let rows = bounded(
            FAIL,
            self.fail.run_with(
                &self.client,
                Settings::HotPath,
                &[&ids, &errors, &delays, &park, &max_attempts],
            ),
        )
        .await?
        .0;
        let parked = |r: &Row| -> Result<Option<(i64, i32)>, tokio_postgres::Error> {
            Ok(if r.try_get::<_, bool>(1)? {
                Some((r.try_get(0)?, r.try_get(2)?))
            } else {
                None
            })
        };
        rows.iter()
            .map(parked)
            .filter_map(Result::transpose)
            .collect::<Result<_, _>>()
            .map_err(StoreError::decode("recorded failures"))
    }

    /// Says whether this relay waits for a notification to find new rows.
    pub async fn set_idle(&self, instance: &str, idle: bool) -> Result<(), StoreError> {
        bounded(
            IDLE,
            self.idle
                .run_with(&self.client, Settings::HotPath, &[&instance, &idle]),
        )
        .await
        .map(|_| ())
    }

    /// Records the RabbitMQ node this relay publishes to (None: none), for `status`.
    pub async fn note_broker_node(
        &self,
        instance: &str,
        node: Option<&str>,
    ) -> Result<(), StoreError> {
        bounded(
            NODE,
            self.node
                .run_with(&self.client, Settings::HotPath, &[&instance, &node]),
        )
        .await
        .map(|_| ())
    }

    /// The claim floor's probe over `from..upto` (see `store/floor.rs`).
    pub async fn probe_floor(
        &self,
        partitions: &[i16],
        from: i64,
        upto: i64,
    ) -> Result<Probe, StoreError> {
        let (rows, _) = bounded(
            PROBE,
            self.probe.run_with(
                &self.client,
                Settings::Bounded,
                &[&partitions, &from, &upto],
            ),
        )
        .await?;
        let row = rows.first().ok_or(StoreError::NoRow { what: PROBE })?;
        let decode = || StoreError::decode("the claim floor's probe");
        Ok(Probe {
            from,
            upto,
            first_pending: row.try_get(0).map_err(decode())?,
            writers: row.try_get(1).map_err(decode())?,
            ids_cached: row.try_get(2).map_err(decode())?,
        })
    }

    /// Runs mark, claim and (when `floor` asks for one) the floor's probe
    /// back to back on the one connection (pipelined: one round trip); the
    /// claim sees the marks, and the probe runs after the claim. A failed
    /// probe fails nothing else: the floor just does not move.
    #[allow(clippy::too_many_arguments)]
    pub async fn mark_then_claim(
        &self,
        published: &[i64],
        keep: bool,
        partitions: &[i16],
        window: HeldWindow,
        held: &serde_json::Value,
        limits: ClaimLimits,
        floor: FloorPlan,
    ) -> Result<MarkedAndClaimed, StoreError> {
        let started = tokio::time::Instant::now();
        // Each answer's arrival: the answers come in order, so the claim took
        // from the marks' answer to its own.
        let mark = async {
            let r = self.mark_published(published, keep).await;
            (r, tokio::time::Instant::now())
        };
        let claim = async {
            let r = self
                .claim_batch(partitions, window, held, limits, floor.claim_from)
                .await;
            (r, tokio::time::Instant::now())
        };
        let probe = async {
            match floor.probe_from {
                Some(from) => Some(self.probe_floor(partitions, from, floor.probe_upto).await),
                None => None,
            }
        };
        // join, not try_join: all three go out together, in this order.
        let ((marked, marked_at), (claimed, claimed_at), probed) = tokio::join!(mark, claim, probe);
        marked?;
        Ok(MarkedAndClaimed {
            claim: claimed?,
            probe: probed,
            mark_took: marked_at.saturating_duration_since(started),
            claim_took: claimed_at.saturating_duration_since(marked_at.max(started)),
        })
    }
}

/// What one round trip of marks, claim and probe brought back.
#[derive(Debug)]
pub struct MarkedAndClaimed {
    pub claim: Claim,
    /// Only when the plan asked for a probe; its failure fails nothing else.
    pub probe: Option<Result<Probe, StoreError>>,
    /// From sending to the marks' answer.
    pub mark_took: std::time::Duration,
    /// The claim statement alone: from the marks' answer to its own.
    pub claim_took: std::time::Duration,
}

/// The ids the relay holds lie in `lowest..=highest` (both 0 when it holds
/// nothing): a claim skips that range and takes rows below and above it.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeldWindow {
    pub lowest: i64,
    pub highest: i64,
}

/// How much one claim may take.
#[derive(Debug, Clone, Copy)]
pub struct ClaimLimits {
    pub rows: usize,
    /// Rows with a larger payload are returned without it, as defective.
    pub max_payload_bytes: usize,
    /// Rows whose headers, as JSON text, are larger are returned without
    /// them, as defective.
    pub max_header_bytes: usize,
    /// Payload and header bytes one claim loads at most (the first row always comes).
    pub payload_budget: usize,
}

/// The rows of one claim, in id order.
#[derive(Debug)]
pub struct Claim {
    pub rows: Vec<OutboxRow>,
    /// Limited by rows or bytes: more are probably due.
    pub more: bool,
}

/// One claimed row, column by column: a column that cannot be decoded makes
/// the row defective (it is parked with the reason), never the claim failed.
/// Only the id and partition must decode; they are integers PostgreSQL wrote.
fn decode_row(r: &Row, limits: ClaimLimits) -> Result<OutboxRow, StoreError> {
    let ClaimLimits {
        max_payload_bytes,
        max_header_bytes,
        ..
    } = limits;
    let id: i64 = r.try_get(0).map_err(StoreError::decode("row id"))?;
    let partition: i16 = r.try_get(4).map_err(StoreError::decode("row partition"))?;
    let mut problems = Vec::new();
    macro_rules! column {
        ($i:expr, $name:expr, $t:ty) => {
            match r.try_get::<_, $t>($i) {
                Ok(v) => Some(v),
                Err(e) => {
                    problems.push(format!("column {} cannot be read: {}", $name, cause(&e)));
                    None
                }
            }
        };
    }
    let message_id = column!(1, "message_id", uuid::Uuid);
    let exchange = column!(2, "exchange", String);
    let routing_key = column!(3, "routing_key", String);
    let partition_key = column!(5, "partition_key", Option<String>).flatten();
    let payload = column!(6, "payload", Option<Vec<u8>>).flatten();
    let size = column!(7, "payload size", i32).unwrap_or(0);
    let content_type = column!(8, "content_type", Option<String>).flatten();
    let message_type = column!(9, "message_type", Option<String>).flatten();
    let correlation_id = column!(10, "correlation_id", Option<String>).flatten();
    let header_size = column!(15, "headers size", i32).unwrap_or(0);
    let headers = column!(11, "headers", Option<String>).flatten().and_then(|text| {
        serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| {
                problems.push(format!(
                    "headers are valid jsonb but not usable JSON here ({e}): use at most 128 levels of nesting and numbers that fit a 64-bit float"
                ))
            })
            .ok()
    });
    let created_at = column!(12, "created_at", SystemTime);
    let attempts = column!(13, "attempts", i32).unwrap_or(0);
    if usize::try_from(header_size).is_ok_and(|size| size > max_header_bytes) {
        problems.push(format!(
            "headers are {header_size} bytes as JSON text, over max-header-bytes ({max_header_bytes}): move large values into the payload (or a reference to them) or raise max-header-bytes"
        ));
    }
    if usize::try_from(size).is_ok_and(|size| size > max_payload_bytes) {
        problems.push(format!(
            "payload is {size} bytes, over max-payload-bytes ({max_payload_bytes}): send a smaller message (e.g. a reference to the data) or raise max-payload-bytes"
        ));
    }
    let (
        Some(message_id),
        Some(exchange),
        Some(routing_key),
        Some(payload),
        Some(headers),
        Some(created_at),
    ) = (
        message_id,
        exchange,
        routing_key,
        payload,
        headers,
        created_at,
    )
    else {
        let why = format!(
            "outbox row {id} cannot be published: {}",
            problems.join("; ")
        );
        return Ok(OutboxRow::defective(id, partition, partition_key, why));
    };
    Ok(OutboxRow {
        id,
        message_id,
        exchange,
        routing_key,
        partition,
        partition_key,
        payload,
        content_type,
        message_type,
        correlation_id,
        headers,
        header_bytes: usize::try_from(header_size).unwrap_or(0),
        created_at,
        attempts,
        defect: None,
    })
}

impl Drop for Store {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Fails with what to do when the schema has no outbox table (the statements
/// are not prepared ahead, so this is where a missing schema shows first).
pub(crate) async fn check_schema(client: &Client, schema: &str) -> Result<(), StoreError> {
    Sql::new(format!("SELECT 1 FROM {schema}.messages LIMIT 0"), &[])
        .run(client, &[])
        .await
        .map(|_| ())
        .map_err(|source| StoreError::Prepare {
            schema: schema.to_string(),
            source,
        })
}
