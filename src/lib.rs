//! outbox-relay: publishes the rows of a PostgreSQL outbox table to RabbitMQ,
//! marking each published only after the broker confirmed it.
//!
//! The library also gives Rust applications [`enqueue`], to write an outbox
//! row inside their own transaction.

pub mod backoff;
pub mod cli;
pub mod config;
pub mod control;
pub mod fence;
pub mod housekeeping;
pub mod http;
pub mod leases;
pub mod metrics;
pub mod migrations;
pub mod ordering;
pub mod publisher;
pub mod relay;
pub mod rows;
pub mod service;
pub mod store;
pub mod tls;
pub mod wakeup;

mod enqueue;
mod schema_name;
pub use enqueue::{enqueue, EnqueueError, NewMessage};
pub use schema_name::InvalidSchemaName;
