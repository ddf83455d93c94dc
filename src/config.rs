//! Every setting, parsed and checked in one place: CLI flags with an
//! environment variable of the same name (`--batch-size` / `OUTBOX_BATCH_SIZE`).

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// A setting that cannot work. The binary prints it on one line and exits 2.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {problem}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub problem: String,
}

impl ConfigError {
    fn new(setting: &'static str, problem: impl Into<String>) -> Self {
        Self {
            setting,
            problem: problem.into(),
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Relays a PostgreSQL outbox table to RabbitMQ with publisher confirms"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct CommonArgs {
    /// PostgreSQL URL (sslmode=require/verify-full honoured). Or OUTBOX_DATABASE_URL_FILE.
    #[arg(
        long,
        env = "OUTBOX_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// amqp:// or amqps:// URL. Or OUTBOX_AMQP_URL_FILE.
    #[arg(long, env = "OUTBOX_AMQP_URL", global = true, hide_env_values = true)]
    pub amqp_url: Option<String>,
    /// Schema that holds the outbox.
    #[arg(long, env = "OUTBOX_SCHEMA", global = true, default_value = "outbox")]
    pub schema: String,
    /// Log format.
    #[arg(long, env = "OUTBOX_LOG_FORMAT", global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay.
    Run(RunArgs),
    /// Apply the schema migrations (idempotent).
    Migrate {
        /// Print the SQL that would run, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Connect to both sides and verify schema and permissions.
    Check,
    /// Pending, oldest pending age, dead letters, lease owners.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// List, retry or discard dead-lettered rows.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Publish already-published rows again.
    Replay(ReplayArgs),
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterAction {
    List {
        #[arg(long)]
        json: bool,
        /// Show at most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    Retry(Selection),
    Discard(Selection),
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Selection {
    /// Row ids (repeatable).
    #[arg(long = "id", num_args = 1..)]
    pub ids: Vec<i64>,
    /// Every dead-lettered row.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false, id = "start")]
pub struct ReplayStart {
    /// Rows published at or after this time (e.g. 2026-11-23T10:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// Rows with id >= N.
    #[arg(long)]
    pub from_id: Option<i64>,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub start: ReplayStart,
    /// With --from-id: rows with id <= M.
    #[arg(long, requires = "from_id")]
    pub to_id: Option<i64>,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "OUTBOX_METRICS_ADDR", default_value = "0.0.0.0:9465")]
    pub metrics_addr: String,
    /// Rows claimed per round.
    #[arg(long, env = "OUTBOX_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: i64,
    /// Unconfirmed publishes at most.
    #[arg(long, env = "OUTBOX_MAX_IN_FLIGHT", default_value_t = 4000)]
    pub max_in_flight: i64,
    /// Fallback poll when no notification arrives.
    #[arg(long, env = "OUTBOX_POLL_INTERVAL", default_value = "1s")]
    pub poll_interval: String,
    /// Wake on LISTEN/NOTIFY; false behind a pooler in transaction mode.
    #[arg(long, env = "OUTBOX_LISTEN", default_value = "true", action = clap::ArgAction::Set)]
    pub listen: String,
    /// Failed attempts before a row is dead-lettered.
    #[arg(long, env = "OUTBOX_MAX_ATTEMPTS", default_value_t = 10)]
    pub max_attempts: i64,
    /// How long published rows are kept (0 = delete at once).
    #[arg(long, env = "OUTBOX_RETENTION", default_value = "24h")]
    pub retention: String,
    /// Accept publishes the broker could not route.
    #[arg(long, env = "OUTBOX_ALLOW_UNROUTABLE", default_value = "false", action = clap::ArgAction::Set)]
    pub allow_unroutable: String,
    /// Graceful drain limit on SIGTERM/SIGINT.
    #[arg(long, env = "OUTBOX_SHUTDOWN_TIMEOUT", default_value = "10s")]
    pub shutdown_timeout: String,
    /// Name of this relay in leases and status (default: hostname-pid).
    #[arg(long, env = "OUTBOX_INSTANCE_ID")]
    pub instance_id: Option<String>,
}

/// Connection settings shared by every command, secrets resolved.
#[derive(Clone)]
pub struct Connections {
    pub database_url: String,
    pub amqp_url: Option<String>,
    pub schema: String,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("database_url", &redact_url(&self.database_url))
            .field("amqp_url", &self.amqp_url.as_deref().map(redact_url))
            .field("schema", &self.schema)
            .finish()
    }
}

/// Everything `run` needs, checked.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub conn: Connections,
    pub amqp_url: String,
    pub metrics_addr: SocketAddr,
    pub batch_size: usize,
    pub max_in_flight: usize,
    pub poll_interval: Duration,
    pub listen: bool,
    pub max_attempts: i32,
    pub retention: Duration,
    pub allow_unroutable: bool,
    pub shutdown_timeout: Duration,
    pub instance_id: String,
}

impl CommonArgs {
    /// Resolves URLs (flag, env or `_FILE`) and checks the schema name.
    pub fn connections(&self) -> Result<Connections, ConfigError> {
        let database_url = secret(
            "database-url",
            self.database_url.clone(),
            "OUTBOX_DATABASE_URL_FILE",
        )?
        .ok_or_else(|| {
            ConfigError::new(
                "database-url",
                "missing: pass --database-url or set OUTBOX_DATABASE_URL (or OUTBOX_DATABASE_URL_FILE)",
            )
        })?;
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(ConfigError::new(
                "database-url",
                format!("'{}' is not a postgres:// URL", redact_url(&database_url)),
            ));
        }
        let amqp_url = secret("amqp-url", self.amqp_url.clone(), "OUTBOX_AMQP_URL_FILE")?;
        if let Some(url) = &amqp_url {
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                return Err(ConfigError::new(
                    "amqp-url",
                    format!("'{}' is not an amqp:// or amqps:// URL", redact_url(url)),
                ));
            }
        }
        validate_schema_name(&self.schema)?;
        Ok(Connections {
            database_url,
            amqp_url,
            schema: self.schema.clone(),
        })
    }

    pub fn amqp_url_required(conn: &Connections) -> Result<String, ConfigError> {
        conn.amqp_url.clone().ok_or_else(|| {
            ConfigError::new(
                "amqp-url",
                "missing: pass --amqp-url or set OUTBOX_AMQP_URL (or OUTBOX_AMQP_URL_FILE)",
            )
        })
    }
}

impl RunArgs {
    pub fn resolve(&self, conn: Connections) -> Result<RelayConfig, ConfigError> {
        let amqp_url = CommonArgs::amqp_url_required(&conn)?;
        let metrics_addr = self.metrics_addr.parse().map_err(|_| {
            ConfigError::new(
                "metrics-addr",
                format!(
                    "'{}' is not an address like 0.0.0.0:9465",
                    self.metrics_addr
                ),
            )
        })?;
        let batch_size = in_range("batch-size", self.batch_size, 1, 10_000)?;
        let max_in_flight = in_range("max-in-flight", self.max_in_flight, 1, 100_000)?;
        let max_attempts = in_range("max-attempts", self.max_attempts, 1, 1_000_000)?;
        let poll_interval = duration("poll-interval", &self.poll_interval)?;
        if poll_interval < Duration::from_millis(10) || poll_interval > Duration::from_secs(3600) {
            return Err(ConfigError::new(
                "poll-interval",
                format!("{} is out of range: use 10ms to 1h", self.poll_interval),
            ));
        }
        let shutdown_timeout = duration("shutdown-timeout", &self.shutdown_timeout)?;
        let instance_id = match &self.instance_id {
            Some(id) if id.trim().is_empty() || id.len() > 200 => {
                return Err(ConfigError::new(
                    "instance-id",
                    "must be 1 to 200 characters",
                ))
            }
            Some(id) => id.clone(),
            None => format!("{}-{}", hostname(), std::process::id()),
        };
        Ok(RelayConfig {
            conn,
            amqp_url,
            metrics_addr,
            batch_size: batch_size as usize,
            max_in_flight: max_in_flight as usize,
            poll_interval,
            listen: boolean("listen", &self.listen)?,
            max_attempts: max_attempts as i32,
            retention: duration("retention", &self.retention)?,
            allow_unroutable: boolean("allow-unroutable", &self.allow_unroutable)?,
            shutdown_timeout,
            instance_id,
        })
    }
}

fn secret(
    setting: &'static str,
    direct: Option<String>,
    file_var: &str,
) -> Result<Option<String>, ConfigError> {
    if let Some(v) = direct.filter(|v| !v.is_empty()) {
        return Ok(Some(v));
    }
    match std::env::var(file_var) {
        Ok(path) if !path.is_empty() => std::fs::read_to_string(&path)
            .map(|s| Some(s.trim().to_string()))
            .map_err(|e| ConfigError::new(setting, format!("cannot read {file_var}={path}: {e}"))),
        _ => Ok(None),
    }
}

fn in_range(setting: &'static str, v: i64, min: i64, max: i64) -> Result<i64, ConfigError> {
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError::new(
            setting,
            format!("{v} is out of range: use {min} to {max}"),
        ))
    }
}

fn duration(setting: &'static str, v: &str) -> Result<Duration, ConfigError> {
    if v.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(v.trim()).map_err(|e| {
        ConfigError::new(
            setting,
            format!("'{v}' is not a duration like 1s, 250ms or 24h ({e})"),
        )
    })
}

fn boolean(setting: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::new(
            setting,
            format!("'{v}' is not true or false"),
        )),
    }
}

fn validate_schema_name(schema: &str) -> Result<(), ConfigError> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            "schema",
            format!(
                "'{schema}' is not a plain lower-case identifier (a-z, 0-9, _; at most 63 bytes)"
            ),
        ))
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".to_string())
}

/// The URL with any password replaced, for logs, errors and status output.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let tail = redact_query_password(tail);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None => format!("{scheme}://{authority}{tail}"),
    }
}

fn redact_query_password(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_string();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{path}?{}", query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_passwords_everywhere() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x?sslmode=require"),
            "postgres://app:***@db:5432/x?sslmode=require"
        );
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://db/x?user=a&password=pw"),
            "postgres://db/x?user=a&password=***"
        );
        assert!(!redact_url("postgres://u:p%40ss@h/x").contains("p%40ss"));
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(validate_schema_name("outbox").is_ok());
        assert!(validate_schema_name("t_run_42").is_ok());
        for bad in ["", "Outbox", "a-b", "1x", "a;drop", &"x".repeat(64)] {
            assert!(validate_schema_name(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn durations_and_booleans_name_the_setting() {
        assert_eq!(duration("retention", "0").ok(), Some(Duration::ZERO));
        assert_eq!(
            duration("poll-interval", "250ms").ok(),
            Some(Duration::from_millis(250))
        );
        let e = duration("poll-interval", "soon").unwrap_err();
        assert_eq!(e.setting, "poll-interval");
        assert!(boolean("listen", "maybe").is_err());
        assert_eq!(
            in_range("batch-size", 0, 1, 10).unwrap_err().setting,
            "batch-size"
        );
    }
}
