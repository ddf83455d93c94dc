//! Every setting, parsed and checked in one place: CLI flags with an
//! environment variable of the same name (`--batch-size` / `OUTBOX_BATCH_SIZE`).
//! What comes out is `config`'s plain data; URLs are checked here with the
//! drivers' own parsers (`store::check_database_url`, `publisher::check_amqp_url`).

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::GrantsArgs;
use crate::{
    config::{AmqpTlsFiles, ConfigError, Connections, Exposure, RelayConfig},
    publisher::{self, broker_tls_warning, check_amqp_nodes_agree, check_amqp_url},
    schema_name,
    store::{check_database_url, database_tls_warning},
};

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
    /// amqp:// or amqps:// URL; several, comma-separated, for the nodes of
    /// one cluster (tried in the order given). Or OUTBOX_AMQP_URL_FILE.
    #[arg(long, env = "OUTBOX_AMQP_URL", global = true, hide_env_values = true)]
    pub amqp_url: Option<String>,
    /// PEM file of the CA certificate(s) trusted for amqps:// (beside the system's).
    #[arg(long, env = "OUTBOX_AMQP_CA_FILE", global = true)]
    pub amqp_ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for amqps://, with --amqp-key-file.
    #[arg(long, env = "OUTBOX_AMQP_CERT_FILE", global = true)]
    pub amqp_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(long, env = "OUTBOX_AMQP_KEY_FILE", global = true)]
    pub amqp_key_file: Option<PathBuf>,
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
    Check {
        /// The `listen` setting `run` will use (checked against a pooler).
        #[arg(long, env = "OUTBOX_LISTEN", default_value = "true", action = clap::ArgAction::Set)]
        listen: String,
    },
    /// Pending, oldest pending age, dead letters, lease owners; exits 1 when
    /// something needs a person (and says what).
    Status {
        /// One JSON document on stdout instead of the table.
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
    /// Print the SQL that grants an application, a relay and an operator
    /// role only what each needs (run it as the schema owner).
    Grants(GrantsArgs),
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterAction {
    /// Show parked rows, oldest first, with why each failed.
    List {
        /// One JSON document on stdout instead of the table.
        #[arg(long)]
        json: bool,
        /// Show at most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Make rows pending again (attempts reset), once the cause is fixed.
    Retry(Selection),
    /// Delete rows for good.
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
    /// Wake on LISTEN/NOTIFY and prepare the hot statements once; false behind
    /// a pooler in transaction mode (poll only, every statement unnamed).
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
    /// Largest payload published, in bytes (RabbitMQ's own max_message_size
    /// defaults to 128 MiB); larger rows are parked with their size.
    #[arg(long, env = "OUTBOX_MAX_PAYLOAD_BYTES", default_value_t = DEFAULT_MAX_PAYLOAD_BYTES)]
    pub max_payload_bytes: i64,
    /// Largest headers published, in bytes of their JSON text; larger rows are
    /// parked with their size (headers travel in one AMQP frame, 128 KiB by
    /// default, whatever this says).
    #[arg(long, env = "OUTBOX_MAX_HEADER_BYTES", default_value_t = DEFAULT_MAX_HEADER_BYTES)]
    pub max_header_bytes: i64,
    /// Name of this relay in leases and status (default: hostname-pid).
    #[arg(long, env = "OUTBOX_INSTANCE_ID")]
    pub instance_id: Option<String>,
}

/// 8 MiB: well below RabbitMQ's `max_message_size` (128 MiB by default), and
/// a size at which a message broker is still the right tool.
pub const DEFAULT_MAX_PAYLOAD_BYTES: i64 = 8 * 1024 * 1024;
/// RabbitMQ refuses anything larger than 512 MiB whatever its configuration.
const MAX_PAYLOAD_BYTES_LIMIT: i64 = 512 * 1024 * 1024;
/// 64 KiB: half of RabbitMQ's default `frame_max` (131,072 bytes), which
/// also carries the other properties; far above what tracing headers need.
pub const DEFAULT_MAX_HEADER_BYTES: i64 = 64 * 1024;
/// Headers travel in one frame, and no broker is run with frames that large:
/// more than 16 MiB can only be a typo.
const MAX_HEADER_BYTES_LIMIT: i64 = 16 * 1024 * 1024;
/// Ten years: beyond that "keep" means "never delete", which is not retention.
const MAX_RETENTION: Duration = Duration::from_secs(3650 * 24 * 3600);

impl CommonArgs {
    /// Resolves URLs (flag, env or `_FILE`), parses them with the drivers' own
    /// parsers, and checks the schema name: a bad value stops every command.
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
        check_database_url(&database_url)?;
        let amqp_urls = match secret("amqp-url", self.amqp_url.clone(), "OUTBOX_AMQP_URL_FILE")? {
            Some(list) => split_amqp_urls(&list)?,
            None => Vec::new(),
        };
        let amqp_tls = AmqpTlsFiles {
            ca: self.amqp_ca_file.clone(),
            cert: self.amqp_cert_file.clone(),
            key: self.amqp_key_file.clone(),
        };
        publisher::tls_config(&amqp_tls).map_err(|e| ConfigError::new(e.setting, e.problem))?;
        schema_name::validate(&self.schema)
            .map_err(|e| ConfigError::new("schema", e.to_string()))?;
        let amqp_nodes = amqp_urls.iter().map(|u| publisher::node_name(u)).collect();
        let exposure = Exposure {
            database: database_tls_warning(&database_url),
            brokers: amqp_urls
                .iter()
                .filter_map(|url| broker_tls_warning(url, &amqp_tls))
                .collect(),
        };
        Ok(Connections {
            database_url,
            amqp_urls,
            amqp_nodes,
            amqp_tls,
            schema: self.schema.clone(),
            exposure,
        })
    }

    /// The broker URLs, or the error every command that needs them gives.
    pub fn amqp_urls_required(conn: &Connections) -> Result<Vec<String>, ConfigError> {
        if conn.amqp_urls.is_empty() {
            return Err(ConfigError::new(
                "amqp-url",
                "missing: pass --amqp-url or set OUTBOX_AMQP_URL (or OUTBOX_AMQP_URL_FILE)",
            ));
        }
        Ok(conn.amqp_urls.clone())
    }
}

/// `amqp-url` as a list: one URL per node, each checked. URLs are cut only
/// before a comma that starts the next URL, so a password may hold a comma.
fn split_amqp_urls(list: &str) -> Result<Vec<String>, ConfigError> {
    let mut urls = Vec::new();
    let mut rest = list.trim();
    while !rest.is_empty() {
        let next = rest
            .match_indices(',')
            .map(|(i, _)| i)
            .find(|&i| {
                let after = rest[i + 1..].trim_start();
                after.starts_with("amqp://") || after.starts_with("amqps://")
            })
            .unwrap_or(rest.len());
        urls.push(rest[..next].trim().to_string());
        rest = rest[next..].trim_start_matches(',').trim_start();
    }
    urls.retain(|u| !u.is_empty());
    if urls.is_empty() {
        return Err(ConfigError::new("amqp-url", "holds no URL"));
    }
    for url in &urls {
        check_amqp_url(url)?;
    }
    let mut nodes: Vec<String> = urls.iter().map(|u| publisher::node_name(u)).collect();
    nodes.sort();
    if let Some(twice) = nodes.windows(2).find(|w| w[0] == w[1]) {
        return Err(ConfigError::new(
            "amqp-url",
            format!("node {} is listed twice: list each node once", twice[0]),
        ));
    }
    check_amqp_nodes_agree(&urls)?;
    Ok(urls)
}

impl RunArgs {
    pub fn resolve(&self, conn: Connections) -> Result<RelayConfig, ConfigError> {
        CommonArgs::amqp_urls_required(&conn)?;
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
        let poll_interval = duration_within(
            "poll-interval",
            &self.poll_interval,
            Duration::from_millis(10)..=Duration::from_secs(3600),
            "10ms to 1h",
        )?;
        let retention = if duration("retention", &self.retention)?.is_zero() {
            Duration::ZERO
        } else {
            duration_within(
                "retention",
                &self.retention,
                Duration::from_secs(1)..=MAX_RETENTION,
                "0 (delete at once) or 1s to 3650d",
            )?
        };
        let shutdown_timeout = duration_within(
            "shutdown-timeout",
            &self.shutdown_timeout,
            Duration::ZERO..=Duration::from_secs(3600),
            "0 to 1h",
        )?;
        let max_payload_bytes = in_range(
            "max-payload-bytes",
            self.max_payload_bytes,
            1,
            MAX_PAYLOAD_BYTES_LIMIT,
        )?;
        let max_header_bytes = in_range(
            "max-header-bytes",
            self.max_header_bytes,
            2,
            MAX_HEADER_BYTES_LIMIT,
        )?;
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
            metrics_addr,
            batch_size: batch_size as usize,
            max_in_flight: max_in_flight as usize,
            poll_interval,
            listen: boolean("listen", &self.listen)?,
            max_attempts: max_attempts as i32,
            retention,
            allow_unroutable: boolean("allow-unroutable", &self.allow_unroutable)?,
            shutdown_timeout,
            max_payload_bytes: max_payload_bytes as usize,
            max_header_bytes: max_header_bytes as usize,
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
    // humantime reports a number too large for a Duration as an error.
    humantime::parse_duration(v.trim()).map_err(|e| {
        ConfigError::new(
            setting,
            format!("'{v}' is not a duration like 1s, 250ms or 24h ({e})"),
        )
    })
}

fn duration_within(
    setting: &'static str,
    v: &str,
    range: std::ops::RangeInclusive<Duration>,
    allowed: &str,
) -> Result<Duration, ConfigError> {
    let d = duration(setting, v)?;
    if range.contains(&d) {
        Ok(d)
    } else {
        Err(ConfigError::new(
            setting,
            format!("'{v}' is out of range: use {allowed}"),
        ))
    }
}

pub fn boolean(setting: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::new(
            setting,
            format!("'{v}' is not true or false"),
        )),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn durations_too_large_for_humantime_are_errors() {
        for v in [
            "18446744073709551616s",
            "99999999999999999999999y",
            "584942417356y",
            "18446744073709551615s 1s",
        ] {
            let e = duration("retention", v).expect_err(v);
            assert_eq!(e.setting, "retention");
        }
    }

    fn run_args(changes: &[(&str, &str)]) -> RunArgs {
        let mut argv = vec!["outbox-relay".to_string(), "run".to_string()];
        for (flag, value) in changes {
            argv.push(format!("--{flag}={value}"));
        }
        let cli = Cli::try_parse_from(argv).expect("parse");
        match cli.command {
            Command::Run(args) => args,
            _ => unreachable!(),
        }
    }

    fn resolve(changes: &[(&str, &str)]) -> Result<RelayConfig, ConfigError> {
        let conn = Connections {
            database_url: "postgres://postgres@127.0.0.1/test".to_string(),
            amqp_urls: vec!["amqp://guest:guest@127.0.0.1:5672/%2f".to_string()],
            amqp_nodes: vec!["127.0.0.1:5672".to_string()],
            amqp_tls: AmqpTlsFiles::default(),
            schema: "outbox".to_string(),
            exposure: Exposure::default(),
        };
        run_args(changes).resolve(conn)
    }

    #[test]
    fn durations_have_bounds() {
        let cfg = resolve(&[]).expect("defaults resolve");
        assert_eq!(cfg.retention, Duration::from_secs(24 * 3600));
        for (setting, value, wanted) in [
            ("retention", "0", Duration::ZERO),
            ("retention", "0s", Duration::ZERO),
            ("retention", "1s", Duration::from_secs(1)),
            ("retention", "3650d", MAX_RETENTION),
            ("shutdown-timeout", "0", Duration::ZERO),
            ("shutdown-timeout", "1h", Duration::from_secs(3600)),
            ("poll-interval", "10ms", Duration::from_millis(10)),
        ] {
            let cfg =
                resolve(&[(setting, value)]).unwrap_or_else(|e| panic!("{setting}={value}: {e}"));
            let got = match setting {
                "retention" => cfg.retention,
                "shutdown-timeout" => cfg.shutdown_timeout,
                _ => cfg.poll_interval,
            };
            assert_eq!(got, wanted, "{setting}={value}");
        }
        for (setting, value) in [
            ("retention", "500ms"),
            ("retention", "3651d"),
            ("retention", "99999999999999999999y"),
            ("shutdown-timeout", "1h 1s"),
            ("shutdown-timeout", "584942417356y"),
            ("poll-interval", "1ms"),
            ("poll-interval", "2h"),
        ] {
            let e = resolve(&[(setting, value)]).expect_err(value);
            assert_eq!(e.setting, setting, "{e}");
        }
    }

    #[test]
    fn several_amqp_urls_are_the_nodes_of_one_cluster() {
        let urls = split_amqp_urls(
            "amqps://u:p,w@10.0.0.1:5671/%2f, amqps://u:pw@rabbit-2/%2f,amqps://rabbit-3:5673",
        )
        .expect("three nodes");
        assert_eq!(
            urls,
            [
                "amqps://u:p,w@10.0.0.1:5671/%2f",
                "amqps://u:pw@rabbit-2/%2f",
                "amqps://rabbit-3:5673"
            ]
        );
        let e = split_amqp_urls("amqp://a:5672/%2f,amqp://u@a:5672/other").unwrap_err();
        assert!(e.to_string().contains("a:5672 is listed twice"), "{e}");
        let e = split_amqp_urls("amqp://a/%2f,amqp://b:99999/%2f").unwrap_err();
        assert_eq!(e.setting, "amqp-url");
        assert!(split_amqp_urls(" , ").is_err());
    }
}
