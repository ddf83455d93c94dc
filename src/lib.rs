//! outbox-relay: publishes the rows of a PostgreSQL outbox table to RabbitMQ,
//! marking each published only after the broker confirmed it.
//!
//! For Rust applications the library gives [`enqueue`] and [`NewMessage`], to
//! write an outbox row inside their own transaction. Everything else is the
//! relay itself; the `outbox-relay` binary is [`main`].

mod backoff;
mod bounded;
mod cli;
mod config;
mod control;
mod fence;
mod housekeeping;
mod http;
mod leases;
mod metrics;
mod ordering;
mod publisher;
mod redact;
mod relay;
mod rows;
mod schema_name;
mod service;
mod store;
mod tls;
mod wakeup;

#[doc(hidden)]
pub use cli::main;
pub use schema_name::InvalidSchemaName;
pub use store::enqueue::{enqueue, EnqueueError, NewMessage};
