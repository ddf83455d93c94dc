//! The housekeeping connection's statements: capped backlog statistics and
//! retention deletes.

use std::time::{Duration, SystemTime};

use tokio_postgres::types::Type;

use super::{bounded, check_schema, predicates, Session, Settings, Sql, StoreError};

#[derive(Debug, Clone, Default)]
pub struct BacklogStats {
    pub pending: i64,
    pub oldest_pending_created_at: Option<SystemTime>,
    pub dead_lettered: i64,
}

/// Backlog statistics and retention: slow-ish work, on a connection of its own.
pub struct Housekeeping {
    stats: Sql,
    retention: Sql,
    sweep: Sql,
}

/// Counts stop here, so a statistics query stays cheap on a huge backlog.
pub const COUNT_CAP: i64 = 1_000_000;
/// Pending rows (oldest first) searched for the oldest one that is late.
const OLDEST_LOOKAHEAD: i64 = 10_000;

impl Housekeeping {
    pub async fn prepare(session: &Session, schema: &str) -> Result<Self, StoreError> {
        check_schema(&session.client, schema).await?;
        let pending = predicates::pending("");
        Ok(Self {
            // Both counts walk partial indexes and stop at COUNT_CAP. The oldest
            // pending row is the first of the pending index that is due or has
            // failed: a row scheduled for later is not late (it would page
            // SREs for nothing); only the first OLDEST_LOOKAHEAD are looked at.
            stats: Sql::new(
                format!(
                    "SELECT (SELECT count(*) FROM (SELECT 1 FROM {schema}.messages
                              WHERE {pending}
                              LIMIT {COUNT_CAP}) p),
                            (SELECT created_at FROM (SELECT id, created_at, available_at, attempts
                                                       FROM {schema}.messages
                                                      WHERE {pending}
                                                      ORDER BY id LIMIT {OLDEST_LOOKAHEAD}) f
                              WHERE available_at <= now() OR attempts > 0
                              ORDER BY id LIMIT 1),
                            (SELECT count(*) FROM (SELECT 1 FROM {schema}.messages
                              WHERE dead_lettered_at IS NOT NULL LIMIT {COUNT_CAP}) d)"
                ),
                &[],
            ),
            // Oldest first through the published_at index, a bounded batch per
            // statement: short row locks, never a lock on the table.
            retention: Sql::new(
                format!(
                    "DELETE FROM {schema}.messages WHERE id IN (
                         SELECT id FROM {schema}.messages
                          WHERE published_at < now() - make_interval(secs => $1::float8)
                          ORDER BY published_at LIMIT $2)"
                ),
                &[Type::FLOAT8, Type::INT8],
            ),
            // The first due pending row of the relay's partitions from the
            // start of the table (store/floor.rs: rows made pending again
            // below the claim floor). It walks the dead entries of every row
            // relayed that VACUUM has not removed: slow work, kept here.
            sweep: Sql::new(
                predicates::first_due(schema, "$1::smallint[]", None),
                &[Type::INT2_ARRAY],
            ),
        })
    }

    /// The first due pending row of `partitions`, from the start of the table.
    pub async fn first_due(
        &self,
        session: &Session,
        partitions: &[i16],
    ) -> Result<Option<i64>, StoreError> {
        let what = "looking for rows made pending again below the claim floor";
        let (rows, _) = bounded(
            what,
            self.sweep
                .run_with(&session.client, Settings::Bounded, &[&partitions]),
        )
        .await?;
        rows.first()
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(StoreError::decode("the sweep's first due row"))
    }

    pub async fn backlog(&self, session: &Session) -> Result<BacklogStats, StoreError> {
        let what = "reading backlog statistics";
        let (mut rows, _) = bounded(
            what,
            self.stats.run_with(&session.client, Settings::Bounded, &[]),
        )
        .await?;
        let row = rows.pop().ok_or(StoreError::NoRow { what })?;
        let decode = || StoreError::decode("backlog statistics");
        Ok(BacklogStats {
            pending: row.try_get(0).map_err(decode())?,
            oldest_pending_created_at: row.try_get(1).map_err(decode())?,
            dead_lettered: row.try_get(2).map_err(decode())?,
        })
    }

    /// Deletes at most `limit` rows published longer than `retention` ago.
    pub async fn delete_expired(
        &self,
        session: &Session,
        retention: Duration,
        limit: i64,
    ) -> Result<u64, StoreError> {
        bounded(
            "deleting published rows past retention",
            self.retention.run_with(
                &session.client,
                Settings::Bounded,
                &[&retention.as_secs_f64(), &limit],
            ),
        )
        .await
        .map(|(_, deleted)| deleted)
    }
}
