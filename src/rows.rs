//! The plain values that travel between store, ordering, publisher and relay.

use std::time::{Duration, SystemTime};

use uuid::Uuid;

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
    /// Size of the headers as stored JSON text: with the payload, what the
    /// row costs in memory budgets.
    pub header_bytes: usize,
    pub created_at: SystemTime,
    pub attempts: i32,
    /// Why the row can never be published as it is (a column that cannot be
    /// decoded, a payload over max-payload-bytes): it is parked at once. It
    /// still goes through per-key ordering, so the rows behind it wait for the
    /// park and then go on.
    pub defect: Option<String>,
}

impl OutboxRow {
    /// A row known only by its id and key: every other column failed to load.
    pub fn defective(id: i64, partition: i16, partition_key: Option<String>, why: String) -> Self {
        Self {
            id,
            message_id: Uuid::nil(),
            exchange: String::new(),
            routing_key: String::new(),
            partition,
            partition_key,
            payload: Vec::new(),
            content_type: None,
            message_type: None,
            correlation_id: None,
            headers: serde_json::Value::Object(serde_json::Map::new()),
            header_bytes: 0,
            created_at: SystemTime::now(),
            attempts: 0,
            defect: Some(why),
        }
    }
}

impl OutboxRow {
    /// Bytes the row holds in memory, as the budgets count them.
    pub fn held_bytes(&self) -> usize {
        self.payload.len() + self.header_bytes
    }
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
