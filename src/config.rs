//! Configuration as plain data: what every command connects to, and what
//! `run` needs, each value parsed and checked once at the binary's edge
//! (`cli::settings`). Nothing here parses; nobody below the edge parses a
//! setting again.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::redact::redact_url;

/// A setting that cannot work. The binary prints it on one line and exits 2.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {problem}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub problem: String,
}

impl ConfigError {
    pub fn new(setting: &'static str, problem: impl Into<String>) -> Self {
        Self {
            setting,
            problem: problem.into(),
        }
    }
}

/// Connection settings shared by every command, secrets resolved.
#[derive(Clone)]
pub struct Connections {
    pub database_url: String,
    /// One URL per RabbitMQ node, in the order given (empty: none set).
    pub amqp_urls: Vec<String>,
    /// `host:port` of each node of `amqp_urls`, in the same order: the
    /// node's name in metrics and logs.
    pub amqp_nodes: Vec<String>,
    pub amqp_tls: AmqpTlsFiles,
    pub schema: String,
    /// Settings that work but expose a connection, worded once at start.
    pub exposure: Exposure,
}

/// Settings that work but leave a connection unverified off this machine:
/// `check` prints them as warnings, `run` logs them at start.
#[derive(Debug, Clone, Default)]
pub struct Exposure {
    /// The database connection is not verified and leaves this machine.
    pub database: Option<String>,
    /// Plain `amqp://` off this machine, or a client certificate unused; in
    /// the order of `amqp_urls`.
    pub brokers: Vec<String>,
}

/// Where the TLS material for amqps:// lives. The files are read at every
/// connect (a renewed certificate is picked up without a restart) and once at
/// start, so a missing or unreadable file stops the relay there.
#[derive(Debug, Clone, Default)]
pub struct AmqpTlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("database_url", &redact_url(&self.database_url))
            .field(
                "amqp_urls",
                &self
                    .amqp_urls
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("amqp_nodes", &self.amqp_nodes)
            .field("amqp_tls", &self.amqp_tls)
            .field("schema", &self.schema)
            .field("exposure", &self.exposure)
            .finish()
    }
}

/// Everything `run` needs, checked.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub conn: Connections,
    pub metrics_addr: SocketAddr,
    pub batch_size: usize,
    pub max_in_flight: usize,
    pub poll_interval: Duration,
    pub listen: bool,
    pub max_attempts: i32,
    pub retention: Duration,
    pub allow_unroutable: bool,
    pub shutdown_timeout: Duration,
    pub max_payload_bytes: usize,
    pub max_header_bytes: usize,
    pub instance_id: String,
}
