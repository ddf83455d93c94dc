//! Listing, retrying and discarding dead-lettered rows.

use std::time::SystemTime;

use tokio_postgres::{types::Type, Client};
use uuid::Uuid;

use super::{max_id, BATCH};
use crate::store::{Session, StoreError};

#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: i64,
    pub message_id: Uuid,
    pub exchange: String,
    pub routing_key: String,
    pub partition_key: Option<String>,
    pub attempts: i32,
    pub dead_lettered_at: SystemTime,
    pub last_error: Option<String>,
}

/// The oldest `limit` dead-lettered rows (by id), and how many there are.
pub async fn list_dead_letters(
    session: &Session,
    schema: &str,
    limit: i64,
) -> Result<(i64, Vec<DeadLetter>), StoreError> {
    let client = &session.client;
    let s = schema;
    let total: i64 = client
        .query_typed_one(
            &format!("SELECT count(*) FROM {s}.messages WHERE dead_lettered_at IS NOT NULL"),
            &[],
        )
        .await
        .map_err(StoreError::query("counting dead-lettered rows"))?
        .get(0);
    let rows = client
        .query_typed(
            &format!(
                "SELECT id, message_id, exchange, routing_key, partition_key, attempts,
                        dead_lettered_at, last_error
                   FROM {s}.messages WHERE dead_lettered_at IS NOT NULL
                  ORDER BY id LIMIT $1"
            ),
            &[(&limit, Type::INT8)],
        )
        .await
        .map_err(StoreError::query("listing dead-lettered rows"))?;
    let rows = rows
        .iter()
        .map(|r| DeadLetter {
            id: r.get(0),
            message_id: r.get(1),
            exchange: r.get(2),
            routing_key: r.get(3),
            partition_key: r.get(4),
            attempts: r.get(5),
            dead_lettered_at: r.get(6),
            last_error: r.get(7),
        })
        .collect();
    Ok((total, rows))
}

/// Which dead-lettered rows an operator command acts on.
#[derive(Debug, Clone, Copy)]
pub enum Chosen<'a> {
    Ids(&'a [i64]),
    All,
}

/// What a row that was named but not acted on is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    Missing,
    Pending,
    Published,
}

impl RowKind {
    pub fn describe(self) -> &'static str {
        match self {
            RowKind::Missing => "no such row",
            RowKind::Pending => "pending, not dead-lettered",
            RowKind::Published => "published, not dead-lettered",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Changed {
    pub rows: u64,
    /// Named ids that were not dead-lettered, and what they are.
    pub skipped: Vec<(i64, RowKind)>,
}

/// Makes dead-lettered rows pending again, due now, with a fresh attempt
/// budget. last_error stays: it tells why the row was parked until the relay
/// records a newer one.
pub async fn retry_dead_letters(
    session: &Session,
    schema: &str,
    chosen: Chosen<'_>,
) -> Result<Changed, StoreError> {
    let client = &session.client;
    let set = "SET dead_lettered_at = NULL, attempts = 0, available_at = now()";
    change_dead_letters(
        client,
        schema,
        chosen,
        &format!("UPDATE {schema}.messages m {set}"),
    )
    .await
}

/// Deletes dead-lettered rows; rows in any other state are never touched.
pub async fn discard_dead_letters(
    session: &Session,
    schema: &str,
    chosen: Chosen<'_>,
) -> Result<Changed, StoreError> {
    let client = &session.client;
    change_dead_letters(
        client,
        schema,
        chosen,
        &format!("DELETE FROM {schema}.messages m"),
    )
    .await
}

/// `action` is `UPDATE .. m SET ..` or `DELETE FROM .. m`; this adds which rows.
async fn change_dead_letters(
    client: &Client,
    schema: &str,
    chosen: Chosen<'_>,
    action: &str,
) -> Result<Changed, StoreError> {
    let s = schema;
    let using = if action.starts_with("DELETE") {
        "USING"
    } else {
        "FROM"
    };
    match chosen {
        Chosen::Ids(ids) => {
            let mut ids = ids.to_vec();
            ids.sort_unstable();
            ids.dedup();
            let done: std::collections::HashSet<i64> = client
                .query_typed(
                    &format!(
                        "{action} WHERE m.id = ANY($1::bigint[]) AND m.dead_lettered_at IS NOT NULL
                         RETURNING m.id"
                    ),
                    &[(&ids, Type::INT8_ARRAY)],
                )
                .await
                .map_err(StoreError::query("changing dead-lettered rows"))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let rest: Vec<i64> = ids.into_iter().filter(|id| !done.contains(id)).collect();
            let skipped = if rest.is_empty() {
                Vec::new()
            } else {
                row_kinds(client, s, &rest).await?
            };
            Ok(Changed {
                rows: done.len() as u64,
                skipped,
            })
        }
        Chosen::All => {
            let last = max_id(client, s).await?;
            let statement = format!(
                "WITH batch AS (
                         SELECT id FROM {s}.messages
                          WHERE dead_lettered_at IS NOT NULL AND id > $1 AND id <= $2
                          ORDER BY id LIMIT $3),
                     changed AS (
                         {action} {using} batch
                          WHERE m.id = batch.id AND m.dead_lettered_at IS NOT NULL
                          RETURNING m.id)
                     SELECT (SELECT max(id) FROM batch), (SELECT count(*) FROM changed)"
            );
            let mut after = 0_i64;
            let mut changed = Changed::default();
            loop {
                let row = client
                    .query_typed_one(
                        &statement,
                        &[
                            (&after, Type::INT8),
                            (&last, Type::INT8),
                            (&BATCH, Type::INT8),
                        ],
                    )
                    .await
                    .map_err(StoreError::query("changing a batch of dead-lettered rows"))?;
                let Some(batch_end) = row.get::<_, Option<i64>>(0) else {
                    break;
                };
                changed.rows += row.get::<_, i64>(1) as u64;
                after = batch_end;
            }
            Ok(changed)
        }
    }
}

async fn row_kinds(
    client: &Client,
    schema: &str,
    ids: &[i64],
) -> Result<Vec<(i64, RowKind)>, StoreError> {
    let found: Vec<(i64, bool)> = client
        .query_typed(
            &format!(
                "SELECT id, published_at IS NOT NULL FROM {schema}.messages
                  WHERE id = ANY($1::bigint[])"
            ),
            &[(&ids, Type::INT8_ARRAY)],
        )
        .await
        .map_err(StoreError::query("looking up rows by id"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(ids
        .iter()
        .map(|id| {
            let kind = match found.iter().find(|(f, _)| f == id) {
                None => RowKind::Missing,
                Some((_, true)) => RowKind::Published,
                // Dead-lettered a moment ago counts as pending here: it was not
                // dead-lettered when the change ran.
                Some((_, false)) => RowKind::Pending,
            };
            (*id, kind)
        })
        .collect())
}
