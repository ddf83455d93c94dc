//! Replaying published rows.

use std::time::SystemTime;

use tokio_postgres::types::Type;

use super::{max_id, BATCH};
use crate::store::{Session, StoreError};

/// Reads `text` as a timestamptz the way PostgreSQL does (so `--since` takes
/// whatever a `psql` user would type). `Ok(Err(reason))` when it is not a time.
pub async fn parse_time(
    session: &Session,
    text: &str,
) -> Result<Result<String, String>, StoreError> {
    let client = &session.client;
    match client
        .query_typed_one("SELECT $1::text::timestamptz::text", &[(&text, Type::TEXT)])
        .await
    {
        Ok(row) => Ok(Ok(row.get(0))),
        // Class 22: data exception (bad syntax, field out of range).
        Err(e) if e.code().is_some_and(|c| c.code().starts_with("22")) => Ok(Err(e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_string()))),
        Err(e) => Err(StoreError::query("reading --since as a time")(e)),
    }
}

/// Which published rows to publish again.
#[derive(Debug, Clone)]
pub enum ReplayRange {
    /// Rows published at or after this time (text PostgreSQL reads as timestamptz).
    Since(String),
    /// Rows with `from <= id <= to`.
    Ids { from: i64, to: Option<i64> },
}

#[derive(Debug, Clone, Default)]
pub struct Replayed {
    pub rows: u64,
    pub first_id: Option<i64>,
    pub last_id: Option<i64>,
}

/// Marks published rows pending again, due now, with a fresh attempt budget, in
/// batches in id order: a running relay publishes them again with their
/// message_id, in id order per partition key.
pub async fn replay(
    session: &Session,
    schema: &str,
    range: &ReplayRange,
) -> Result<Replayed, StoreError> {
    let client = &session.client;
    let s = schema;
    let last = max_id(client, s).await?;
    let (mut after, last, since) = match range {
        ReplayRange::Since(t) => (0, last, Some(t.as_str())),
        ReplayRange::Ids { from, to } => (
            from.saturating_sub(1),
            to.map_or(last, |to| to.min(last)),
            None,
        ),
    };
    let statement = format!(
        "WITH batch AS (
                 SELECT id FROM {s}.messages
                  WHERE published_at IS NOT NULL AND id > $1 AND id <= $2
                    AND ($3::text IS NULL OR published_at >= $3::text::timestamptz)
                  ORDER BY id LIMIT $4),
             replayed AS (
                 UPDATE {s}.messages m
                    SET published_at = NULL, available_at = now(), attempts = 0
                   FROM batch
                  WHERE m.id = batch.id AND m.published_at IS NOT NULL
              RETURNING m.id)
             SELECT (SELECT max(id) FROM batch), (SELECT count(*) FROM replayed),
                    (SELECT min(id) FROM replayed), (SELECT max(id) FROM replayed)"
    );
    let mut replayed = Replayed::default();
    while after < last {
        let row = client
            .query_typed_one(
                &statement,
                &[
                    (&after, Type::INT8),
                    (&last, Type::INT8),
                    (&since, Type::TEXT),
                    (&BATCH, Type::INT8),
                ],
            )
            .await
            .map_err(StoreError::query("replaying a batch of published rows"))?;
        let Some(batch_end) = row.get::<_, Option<i64>>(0) else {
            break;
        };
        replayed.rows += row.get::<_, i64>(1) as u64;
        if replayed.first_id.is_none() {
            replayed.first_id = row.get(2);
        }
        if let Some(id) = row.get::<_, Option<i64>>(3) {
            replayed.last_id = Some(id);
        }
        after = batch_end;
    }
    Ok(replayed)
}

/// The published rows still kept: how many, the oldest publish time and the id range.
#[derive(Debug, Clone, Default)]
pub struct Kept {
    pub rows: i64,
    pub oldest_published_at: Option<SystemTime>,
    pub first_id: Option<i64>,
    pub last_id: Option<i64>,
}

pub async fn published_kept(session: &Session, schema: &str) -> Result<Kept, StoreError> {
    let client = &session.client;
    let row = client
        .query_typed_one(
            &format!(
                "SELECT count(*), min(published_at), min(id), max(id)
                   FROM {schema}.messages WHERE published_at IS NOT NULL"
            ),
            &[],
        )
        .await
        .map_err(StoreError::query("counting published rows"))?;
    Ok(Kept {
        rows: row.get(0),
        oldest_published_at: row.get(1),
        first_id: row.get(2),
        last_id: row.get(3),
    })
}
