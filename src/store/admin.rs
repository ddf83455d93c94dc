//! Statements of the operator commands (status, dead letters, replay, check).
//!
//! Bulk changes run in bounded batches, each statement its own transaction, so
//! they never hold many row locks for long next to a running relay and the
//! application's inserts. Every loop walks ids upwards and stops at the highest
//! id that existed when it started: rows written or parked meanwhile are left
//! alone, and the loop always ends.
//!
//! Unlike the relay's statements these are not cut off after
//! `STATEMENT_TIMEOUT`: an operator command may rightly take long on a big
//! table (status counts the published rows kept), it runs where Ctrl-C ends it,
//! and TCP keepalives end a connection whose peer is gone.

use tokio_postgres::Client;

use crate::store::StoreError;

mod check;
mod dead_letters;
mod replay;
mod status;

pub use check::{pooling, privileges, server, Granted, ObjectKind, Pooling};
pub use dead_letters::{
    discard_dead_letters, list_dead_letters, retry_dead_letters, Changed, Chosen, DeadLetter,
};
pub use replay::{parse_time, published_kept, replay, Kept, ReplayRange};
pub use status::{status, RelayInstance, Status};
#[cfg(test)]
pub use {check::REQUIREMENTS, status::Backlog};

/// Rows changed per statement by the bulk commands.
pub const BATCH: i64 = 10_000;

/// Where the bulk loops of dead letters and replay stop (see above).
async fn max_id(client: &Client, schema: &str) -> Result<i64, StoreError> {
    Ok(client
        .query_typed_one(
            &format!("SELECT coalesce(max(id), 0) FROM {schema}.messages"),
            &[],
        )
        .await
        .map_err(StoreError::query("reading the highest row id"))?
        .get(0))
}
