//! For Rust applications: write an outbox row in your own transaction.

use std::time::SystemTime;

use tokio_postgres::{types::Type, GenericClient};
use uuid::Uuid;

use crate::schema_name::{self, InvalidSchemaName};

/// Why [`enqueue`] wrote no row.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// Nothing was sent to the database: pass the schema `outbox-relay
    /// migrate --schema` created.
    #[error("invalid outbox schema name: {0}")]
    InvalidSchema(#[from] InvalidSchemaName),
    /// The INSERT failed; the transaction is aborted and must be rolled back.
    #[error("inserting into {schema}.messages failed: {source}")]
    Database {
        schema: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// One message to write; `payload` is delivered byte for byte.
#[derive(Debug, Clone, Default)]
pub struct NewMessage {
    pub exchange: String,
    pub routing_key: String,
    pub payload: Vec<u8>,
    pub partition_key: Option<String>,
    pub content_type: Option<String>,
    pub message_type: Option<String>,
    pub correlation_id: Option<String>,
    /// A JSON object; `None` means no headers.
    pub headers: Option<serde_json::Value>,
    /// Not published before this time; `None` means now.
    pub available_at: Option<SystemTime>,
}

impl NewMessage {
    /// A JSON message (content-type application/json).
    pub fn json(exchange: &str, routing_key: &str, body: &serde_json::Value) -> Self {
        Self {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            payload: body.to_string().into_bytes(),
            content_type: Some("application/json".to_string()),
            ..Self::default()
        }
    }
}

/// Inserts the message into `<schema>.messages` through `client`, which should
/// be the application's own `Transaction`: the row commits or rolls back with
/// the business change. Returns the AMQP message-id.
///
/// `schema` must be a plain lower-case identifier, as the relay requires: it
/// is written into the statement unquoted, as in every other statement.
pub async fn enqueue<C: GenericClient>(
    client: &C,
    schema: &str,
    message: &NewMessage,
) -> Result<Uuid, EnqueueError> {
    schema_name::validate(schema)?;
    let headers = message
        .headers
        .clone()
        .unwrap_or_else(|| serde_json::json!({}));
    let sql = format!(
        "INSERT INTO {schema}.messages (exchange, routing_key, payload, partition_key, content_type,
                                         message_type, correlation_id, headers, available_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, coalesce($9, now()))
         RETURNING message_id"
    );
    let row = client
        // Unnamed, with the types given: works through a transaction-mode pooler
        // even outside a transaction (nothing is prepared on a server connection).
        .query_typed_one(
            &sql,
            &[
                (&message.exchange, Type::TEXT),
                (&message.routing_key, Type::TEXT),
                (&message.payload, Type::BYTEA),
                (&message.partition_key, Type::TEXT),
                (&message.content_type, Type::TEXT),
                (&message.message_type, Type::TEXT),
                (&message.correlation_id, Type::TEXT),
                (&headers, Type::JSONB),
                (&message.available_at, Type::TIMESTAMPTZ),
            ],
        )
        .await
        .map_err(|source| EnqueueError::Database {
            schema: schema.to_string(),
            source,
        })?;
    Ok(row.get(0))
}
