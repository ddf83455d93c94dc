//! Every SQL statement the relay runs against the outbox lives here (the
//! operator commands' statements are in `store/admin.rs`).

pub mod admin;

use std::time::{Duration, SystemTime};

use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use crate::{
    config::{redact_url, Connections},
    tls,
};

/// A statement on a stalled connection (a network that drops packets without
/// closing) would otherwise wait forever.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The server cancels a statement a little before [`STATEMENT_TIMEOUT`]:
/// otherwise a query the relay gave up on keeps running (and holding its
/// snapshot) on the server until it tries to send its result.
pub fn server_statement_timeout() -> String {
    let ms = STATEMENT_TIMEOUT.as_millis() * 5 / 6;
    format!("SET statement_timeout = {ms}")
}

/// Bounds a statement by [`STATEMENT_TIMEOUT`].
async fn bounded<T>(
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(STATEMENT_TIMEOUT, fut).await {
        Ok(result) => result.map_err(StoreError::query(what)),
        Err(_) => Err(StoreError::Timeout { what }),
    }
}

/// One pending outbox row, as claimed for publishing.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub message_id: Uuid,
    pub exchange: String,
    pub routing_key: String,
    pub partition: i16,
    pub partition_key: Option<String>,
    pub payload: Vec<u8>,
    pub content_type: Option<String>,
    pub message_type: Option<String>,
    pub correlation_id: Option<String>,
    pub headers: serde_json::Value,
    pub created_at: SystemTime,
    pub attempts: i32,
}

/// A failed publish attempt of one row, to be recorded.
#[derive(Debug, Clone)]
pub struct Failure {
    pub id: i64,
    pub error: String,
    /// When to try again, if attempts are left.
    pub retry_in: Duration,
    /// Park at once: the row can never be published as it is.
    pub park_now: bool,
}

/// What the relay's heartbeat learns: its leases, the next due row, the backlog.
#[derive(Debug, Clone, Default)]
pub struct Heartbeat {
    pub partitions: Vec<i16>,
    /// Seconds until the next pending row of our partitions is due (<= 0: now).
    pub next_due_in: Option<f64>,
    pub stats: Option<BacklogStats>,
}

#[derive(Debug, Clone, Default)]
pub struct BacklogStats {
    pub pending: i64,
    pub oldest_pending_created_at: Option<SystemTime>,
    pub dead_lettered: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to PostgreSQL at {url}: {}; check the database URL, that the server is up and accepts connections", cause(source))]
    Connect {
        url: String,
        #[source]
        source: tokio_postgres::Error,
    },
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
    fn query(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
        move |source| StoreError::Query { what, source }
    }

    /// The connection is gone: reconnect rather than retry on this one.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            StoreError::Query { source, .. } | StoreError::Prepare { source, .. } => {
                source.is_closed() || source.as_db_error().is_none()
            }
            StoreError::Connect { .. } | StoreError::Tls(_) | StoreError::Timeout { .. } => true,
        }
    }
}

/// Opens one connection; the returned task drives it and ends when it breaks.
pub async fn connect(
    database_url: &str,
    application_name: &str,
) -> Result<(Client, tokio::task::JoinHandle<()>), StoreError> {
    let (client, connection) = connect_raw(database_url, application_name).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "database connection closed");
        }
    });
    Ok((client, task))
}

/// Opens one connection and leaves driving it to the caller (LISTEN needs that).
pub async fn connect_raw(
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
    let (url, mode, root) = tls::split_tls_params(database_url)?;
    let mut config: tokio_postgres::Config = url.parse().map_err(|source| StoreError::Connect {
        url: redact_url(database_url),
        source,
    })?;
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    config.connect_timeout(Duration::from_secs(10));
    config.keepalives_idle(Duration::from_secs(10));
    let connector = tls::connector(mode, root.as_deref())?;
    config
        .connect(connector)
        .await
        .map_err(|source| StoreError::Connect {
            url: redact_url(database_url),
            source,
        })
}

/// The relay's hot path: claim, mark, record failures. One connection.
pub struct Store {
    client: Client,
    task: tokio::task::JoinHandle<()>,
    /// Becomes true when the connection task ends.
    closed: tokio::sync::watch::Receiver<bool>,
    claim: Statement,
    mark: Statement,
    delete: Statement,
    fail: Statement,
}

impl Store {
    pub async fn connect(conn: &Connections) -> Result<Self, StoreError> {
        let (client, connection) = connect_raw(&conn.database_url, "outbox-relay").await?;
        let (closed_tx, closed) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "database connection closed");
            }
            let _ = closed_tx.send(true);
        });
        // A mark lost in a database crash only means the row is published again
        // (same message_id): at-least-once holds without waiting for the WAL flush.
        client
            .batch_execute(&format!(
                "SET synchronous_commit TO off; {}",
                server_statement_timeout()
            ))
            .await
            .map_err(StoreError::query("setting up the session"))?;
        let s = &conn.schema;
        let prepare = |sql: String| {
            let client = &client;
            async move {
                client
                    .prepare(&sql)
                    .await
                    .map_err(|source| StoreError::Prepare {
                        schema: s.clone(),
                        source,
                    })
            }
        };
        // Rows of a partition key wait behind an earlier row of that key that is
        // not due yet (scheduled, or backing off after a failure): order first.
        // MATERIALIZED and without GROUP BY: computed once per claim from the
        // small available_at index, whatever the planner's statistics say (a
        // fresh table has none, and the per-row plan it then picks takes seconds).
        let claim = prepare(format!(
            "WITH waiting AS MATERIALIZED (
                SELECT partition_key, id FROM {s}.messages
                 WHERE published_at IS NULL AND dead_lettered_at IS NULL
                   AND available_at > now() AND partition_key IS NOT NULL)
             SELECT id, message_id, exchange, routing_key, partition, partition_key, payload,
                    content_type, message_type, correlation_id, headers, created_at, attempts
               FROM {s}.messages m
              WHERE published_at IS NULL AND dead_lettered_at IS NULL
                AND available_at <= now()
                AND partition = ANY($1::smallint[])
                AND id > $2
                AND NOT EXISTS (SELECT 1 FROM waiting w
                                 WHERE w.partition_key = m.partition_key AND w.id < m.id)
                -- Claiming after a cursor ($2 > 0) skips rows below it that
                -- committed late. A row may only follow such a row of its key if
                -- the relay holds it: $4 maps key -> last id the relay holds.
                AND ($2 = 0 OR m.partition_key IS NULL OR NOT EXISTS (
                     SELECT 1 FROM {s}.messages p
                      WHERE p.partition_key = m.partition_key
                        AND p.id > coalesce(($4::jsonb ->> m.partition_key)::bigint, 0)
                        AND p.id <= $2 AND p.id < m.id
                        AND p.published_at IS NULL AND p.dead_lettered_at IS NULL))
              ORDER BY id
              LIMIT $3"
        ))
        .await?;
        let mark = prepare(format!(
            "UPDATE {s}.messages SET published_at = now()
              WHERE id = ANY($1::bigint[]) AND published_at IS NULL"
        ))
        .await?;
        let delete = prepare(format!(
            "DELETE FROM {s}.messages WHERE id = ANY($1::bigint[])"
        ))
        .await?;
        let fail = prepare(format!(
            "UPDATE {s}.messages m
                SET attempts = m.attempts + 1,
                    last_error = f.error,
                    available_at = now() + f.delay_ms * interval '1 millisecond',
                    dead_lettered_at = CASE WHEN f.park OR m.attempts + 1 >= $5 THEN now() END
               FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bool[])
                    AS f(id, error, delay_ms, park)
              WHERE m.id = f.id AND m.published_at IS NULL AND m.dead_lettered_at IS NULL
          RETURNING m.id, m.dead_lettered_at IS NOT NULL, m.attempts"
        ))
        .await?;
        Ok(Self {
            client,
            task,
            closed,
            claim,
            mark,
            delete,
            fail,
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

    /// Due pending rows of the given partitions in id order, with ids above
    /// `after` (0: from the start). `held` maps each partition key the relay
    /// holds rows of (in flight or queued) to the last such id.
    pub async fn claim_batch(
        &self,
        partitions: &[i16],
        after: i64,
        held: &serde_json::Value,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let limit = limit as i64;
        let rows = bounded(
            "claiming pending outbox rows",
            self.client
                .query(&self.claim, &[&partitions, &after, &limit, held]),
        )
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxRow {
                    id: r.try_get(0)?,
                    message_id: r.try_get(1)?,
                    exchange: r.try_get(2)?,
                    routing_key: r.try_get(3)?,
                    partition: r.try_get(4)?,
                    partition_key: r.try_get(5)?,
                    payload: r.try_get(6)?,
                    content_type: r.try_get(7)?,
                    message_type: r.try_get(8)?,
                    correlation_id: r.try_get(9)?,
                    headers: r.try_get(10)?,
                    created_at: r.try_get(11)?,
                    attempts: r.try_get(12)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(StoreError::query("reading claimed outbox rows"))
    }

    /// Marks confirmed rows published, or deletes them when nothing is kept.
    pub async fn mark_published(&self, ids: &[i64], keep: bool) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        fail::fail_point!("before_mark_published");
        let statement = if keep { &self.mark } else { &self.delete };
        bounded(
            "marking confirmed rows published",
            self.client.execute(statement, &[&ids]),
        )
        .await
    }

    /// Records failed attempts; returns the ids that were dead-lettered now.
    pub async fn record_failures(
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
            "recording failed publish attempts",
            self.client
                .query(&self.fail, &[&ids, &errors, &delays, &park, &max_attempts]),
        )
        .await?;
        Ok(rows
            .iter()
            .filter(|r| r.get::<_, bool>(1))
            .map(|r| (r.get(0), r.get(2)))
            .collect())
    }

    /// Runs mark and claim back to back on the one connection (pipelined: one
    /// round trip); the claim sees the marks.
    pub async fn mark_then_claim(
        &self,
        published: &[i64],
        keep: bool,
        partitions: &[i16],
        after: i64,
        held: &serde_json::Value,
        limit: usize,
    ) -> Result<(u64, Vec<OutboxRow>), StoreError> {
        let mark = self.mark_published(published, keep);
        let claim = self.claim_batch(partitions, after, held, limit);
        tokio::try_join!(mark, claim)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The control connection's statements: heartbeat and lease release.
pub struct Control {
    heartbeat: Statement,
    release: Statement,
    retention: Statement,
}

impl Control {
    pub async fn prepare(client: &Client, schema: &str) -> Result<Self, StoreError> {
        let prepare = |sql: String| async move {
            client
                .prepare(&sql)
                .await
                .map_err(|source| StoreError::Prepare {
                    schema: schema.to_string(),
                    source,
                })
        };
        Ok(Self {
            heartbeat: prepare(format!(
                "SELECT partitions, next_due_in, pending, oldest_pending_created_at, dead_lettered
                   FROM {schema}.relay_heartbeat($1, make_interval(secs => $2::float8), $3)"
            ))
            .await?,
            release: prepare(format!("SELECT {schema}.relay_release($1)")).await?,
            // Oldest first through the published_at index, a bounded batch per
            // statement: short row locks, never a lock on the table.
            retention: prepare(format!(
                "DELETE FROM {schema}.messages WHERE id IN (
                     SELECT id FROM {schema}.messages
                      WHERE published_at < now() - make_interval(secs => $1::float8)
                      ORDER BY published_at LIMIT $2)"
            ))
            .await?,
        })
    }

    pub async fn heartbeat(
        &self,
        client: &Client,
        instance: &str,
        ttl: Duration,
        with_stats: bool,
    ) -> Result<Heartbeat, StoreError> {
        // Bounded by the lease ttl: a heartbeat later than that is worthless.
        let row = match tokio::time::timeout(
            ttl,
            client.query_one(
                &self.heartbeat,
                &[&instance, &ttl.as_secs_f64(), &with_stats],
            ),
        )
        .await
        {
            Ok(row) => row.map_err(StoreError::query("relay heartbeat (leases)"))?,
            Err(_) => {
                return Err(StoreError::Timeout {
                    what: "relay heartbeat (leases)",
                })
            }
        };
        let stats = if with_stats {
            Some(BacklogStats {
                pending: row.get::<_, Option<i64>>(2).unwrap_or(0),
                oldest_pending_created_at: row.get(3),
                dead_lettered: row.get::<_, Option<i64>>(4).unwrap_or(0),
            })
        } else {
            None
        };
        Ok(Heartbeat {
            partitions: row.get(0),
            next_due_in: row.get(1),
            stats,
        })
    }

    pub async fn release(&self, client: &Client, instance: &str) -> Result<(), StoreError> {
        client
            .execute(&self.release, &[&instance])
            .await
            .map(|_| ())
            .map_err(StoreError::query("releasing leases"))
    }

    /// Deletes at most `limit` rows published longer than `retention` ago.
    pub async fn delete_expired(
        &self,
        client: &Client,
        retention: Duration,
        limit: i64,
    ) -> Result<u64, StoreError> {
        bounded(
            "deleting published rows past retention",
            client.execute(&self.retention, &[&retention.as_secs_f64(), &limit]),
        )
        .await
    }
}
