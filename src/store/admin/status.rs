//! The snapshot `status` shows.

use std::time::SystemTime;

use tokio_postgres::IsolationLevel;

use crate::store::{predicates, Session, StoreError};

#[derive(Debug, Clone, Default)]
pub struct Backlog {
    pub pending: i64,
    /// Pending rows whose available_at has come.
    pub due_now: i64,
    /// Pending rows waiting for a later available_at (scheduled or backing off).
    pub scheduled: i64,
    /// Pending rows that failed at least once.
    pub retrying: i64,
    pub oldest_pending_created_at: Option<SystemTime>,
    /// On the database's clock.
    pub oldest_pending_age_secs: Option<f64>,
    pub next_scheduled_in_secs: Option<f64>,
    pub dead_lettered: i64,
    pub published_kept: i64,
    pub oldest_published_at: Option<SystemTime>,
}

/// A relay instance seen in `relays` or as the owner of a live lease.
#[derive(Debug, Clone)]
pub struct RelayInstance {
    pub instance: String,
    /// None when the instance holds a lease but has no `relays` row any more.
    pub started_at: Option<SystemTime>,
    pub heartbeat_age_secs: Option<f64>,
    /// Where it serves /metrics (the address it bound).
    pub metrics_addr: Option<String>,
    /// The RabbitMQ node (`host:port`) it publishes to; None when connected to none.
    pub broker_node: Option<String>,
    /// Partitions whose lease it holds right now.
    pub partitions: Vec<i16>,
    /// Seconds until the first of those leases runs out unless renewed.
    pub lease_expires_in_secs: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Status {
    pub backlog: Backlog,
    pub partitions_total: i64,
    /// Partitions with no owner or an expired lease: nobody publishes them.
    pub unowned: Vec<i16>,
    /// Due pending rows in those partitions: rows nobody is publishing now.
    pub due_unowned: i64,
    pub relays: Vec<RelayInstance>,
}

/// Everything `status` shows, read in one snapshot.
pub async fn status(session: &mut Session, schema: &str) -> Result<Status, StoreError> {
    let client = &mut session.client;
    let s = schema;
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(StoreError::query("starting the status snapshot"))?;
    // Pending and dead-lettered rows are counted through their partial indexes;
    // published rows are counted exactly (status is not on any hot path).
    let pending = predicates::pending("");
    let pending_m = predicates::pending("m");
    let row = tx
        .query_typed_one(
            &format!(
                "SELECT p.pending, p.due_now, p.retrying, p.oldest_created_at,
                        extract(epoch FROM now() - p.oldest_created_at)::float8,
                        extract(epoch FROM p.next_at - now())::float8,
                        d.dead_lettered, k.published, k.oldest_published_at
                   FROM (SELECT count(*) AS pending,
                                count(*) FILTER (WHERE available_at <= now()) AS due_now,
                                count(*) FILTER (WHERE attempts > 0) AS retrying,
                                -- Rows scheduled for later are not late.
                                min(created_at) FILTER (WHERE available_at <= now() OR attempts > 0)
                                    AS oldest_created_at,
                                min(available_at) FILTER (WHERE available_at > now()) AS next_at
                           FROM {s}.messages
                          WHERE {pending}) p,
                        (SELECT count(*) AS dead_lettered FROM {s}.messages
                          WHERE dead_lettered_at IS NOT NULL) d,
                        (SELECT count(*) AS published, min(published_at) AS oldest_published_at
                           FROM {s}.messages WHERE published_at IS NOT NULL) k"
            ),
            &[],
        )
        .await
        .map_err(StoreError::query("counting outbox rows"))?;
    let pending: i64 = row.get(0);
    let due_now: i64 = row.get(1);
    let backlog = Backlog {
        pending,
        due_now,
        scheduled: pending - due_now,
        retrying: row.get(2),
        oldest_pending_created_at: row.get(3),
        oldest_pending_age_secs: row.get(4),
        next_scheduled_in_secs: row.get(5),
        dead_lettered: row.get(6),
        published_kept: row.get(7),
        oldest_published_at: row.get(8),
    };
    let leases = tx
        .query_typed_one(
            &format!(
                "SELECT count(*),
                        coalesce(array_agg(partition ORDER BY partition)
                                 FILTER (WHERE owner IS NULL OR expires_at <= now()), '{{}}'),
                        (SELECT count(*) FROM {s}.messages m
                          WHERE {pending_m}
                            AND m.available_at <= now()
                            AND m.partition IN (SELECT k.partition FROM {s}.leases k
                                                 WHERE k.owner IS NULL OR k.expires_at <= now()))
                   FROM {s}.leases"
            ),
            &[],
        )
        .await
        .map_err(StoreError::query("reading partition leases"))?;
    let relays = tx
        .query_typed(
            &format!(
                "SELECT i.instance, r.started_at,
                        extract(epoch FROM now() - r.heartbeat_at)::float8,
                        coalesce(array_agg(l.partition ORDER BY l.partition)
                                 FILTER (WHERE l.partition IS NOT NULL), '{{}}'),
                        extract(epoch FROM min(l.expires_at) - now())::float8,
                        r.metrics_addr, r.broker_node
                   FROM (SELECT instance FROM {s}.relays
                         UNION
                         SELECT owner FROM {s}.leases
                          WHERE owner IS NOT NULL AND expires_at > now()) i
                   LEFT JOIN {s}.relays r ON r.instance = i.instance
                   LEFT JOIN {s}.leases l ON l.owner = i.instance AND l.expires_at > now()
                  GROUP BY i.instance, r.started_at, r.heartbeat_at, r.metrics_addr, r.broker_node
                  ORDER BY i.instance"
            ),
            &[],
        )
        .await
        .map_err(StoreError::query("reading relay instances"))?;
    tx.commit()
        .await
        .map_err(StoreError::query("ending the status snapshot"))?;
    Ok(Status {
        backlog,
        partitions_total: leases.get(0),
        unowned: leases.get(1),
        due_unowned: leases.get(2),
        relays: relays
            .iter()
            .map(|r| RelayInstance {
                instance: r.get(0),
                started_at: r.get(1),
                heartbeat_age_secs: r.get(2),
                partitions: r.get(3),
                lease_expires_in_secs: r.get(4),
                metrics_addr: r.get(5),
                broker_node: r.get(6),
            })
            .collect(),
    })
}
