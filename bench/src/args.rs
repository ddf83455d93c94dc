//! The command line: which phases run, and every knob of each.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

use crate::util;

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Phase {
    Ceiling,
    Drain,
    Steady,
    Idle,
    Growth,
    Scale,
    App,
    Keyed,
    Cold,
    Backlog,
    BacklogPrivate,
    Pooled,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "outbox-bench",
    about = "Benchmarks outbox-relay against the local PostgreSQL and RabbitMQ and writes bench/RESULTS.md"
)]
pub(crate) struct Args {
    /// PostgreSQL URL of the database to benchmark in (the bench creates and drops schemas there).
    #[arg(long, env = "OUTBOX_DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub(crate) database_url: String,
    /// RabbitMQ URL.
    #[arg(long, env = "OUTBOX_AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub(crate) amqp_url: String,
    /// Phases to run, comma separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ceiling,drain,steady,idle,growth,scale,app,keyed,cold,backlog,backlog-private,pooled"
    )]
    pub(crate) phases: Vec<Phase>,
    /// Messages per ceiling, drain and growth run.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    pub(crate) payload_bytes: usize,
    /// Runs of the ceiling and drain phases (they alternate: ceiling then drain, per run).
    #[arg(long, default_value_t = 3)]
    pub(crate) runs: usize,
    /// Runs of the steady-state phase (each run covers every rate).
    #[arg(long, default_value_t = 1)]
    pub(crate) steady_runs: usize,
    /// Runs of the idle phase.
    #[arg(long, default_value_t = 1)]
    pub(crate) idle_runs: usize,
    /// Runs of the growth phase (each run covers every kept size).
    #[arg(long, default_value_t = 1)]
    pub(crate) growth_runs: usize,
    /// Relay counts of the scale-out phase, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub(crate) scale_relays: Vec<usize>,
    /// Runs of the scale-out phase (each run covers every relay count).
    #[arg(long, default_value_t = 1)]
    pub(crate) scale_runs: usize,
    /// Unconfirmed publishes at most in the ceiling publisher.
    #[arg(long, default_value_t = 2000)]
    pub(crate) ceiling_window: usize,
    /// Steady-state insert rates (rows/s), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    pub(crate) steady_rates: Vec<u64>,
    /// How long each steady-state rate is held.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) steady_duration: Duration,
    /// Application connections inserting concurrently in the steady state, one
    /// per steady rate in order (0 = one per 50 rows/s, at least 8 and at most 32).
    #[arg(long, value_delimiter = ',', default_value = "4,32")]
    pub(crate) steady_connections: Vec<usize>,
    /// How long the idle relay is observed (from `QUIET_BEFORE_S` after it drained a backlog).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub(crate) idle_duration: Duration,
    /// Rows the relay drains just before the idle window.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) idle_drain_rows: u64,
    /// Published rows kept in the table during the growth drains, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,1000000")]
    pub(crate) growth_kept: Vec<u64>,
    /// Durable queue the messages go to (through the default exchange).
    #[arg(long, default_value = "outbox_bench")]
    pub(crate) queue: String,
    /// Topic exchange of the app, keyed and cold phases (declared by the bench,
    /// bound to the queue with '#').
    #[arg(long, default_value = "outbox_bench_topic")]
    pub(crate) exchange: String,
    /// pgbench clients of the application-cost phase.
    #[arg(long, default_value_t = 20)]
    pub(crate) app_clients: usize,
    /// How long each side of each application-cost comparison runs.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub(crate) app_duration: Duration,
    /// Rows per transaction of the application-cost multi-row comparison.
    #[arg(long, default_value_t = 8)]
    pub(crate) app_rows: usize,
    /// Single-row transactions/s of the application-cost latency comparison.
    #[arg(long, default_value_t = 1000)]
    pub(crate) app_rate: u64,
    /// pgbench clients of the keyed phase.
    #[arg(long, default_value_t = 16)]
    pub(crate) keyed_clients: usize,
    /// Rows per transaction of the keyed phase.
    #[arg(long, default_value_t = 8)]
    pub(crate) keyed_rows: usize,
    /// Transactions/s of the keyed phase's paced load.
    #[arg(long, default_value_t = 200)]
    pub(crate) keyed_rate: u64,
    #[arg(long, default_value = "45s", value_parser = humantime::parse_duration)]
    pub(crate) keyed_paced_duration: Duration,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) keyed_unpaced_duration: Duration,
    /// Partition keys and routing keys of the app and keyed phases' rows.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) keyed_partition_keys: u32,
    #[arg(long, default_value_t = 100)]
    pub(crate) keyed_routing_keys: u32,
    /// Rows of the cold backlog, and its partition keys and routing keys.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) cold_rows: u64,
    #[arg(long, default_value_t = 1000)]
    pub(crate) cold_partition_keys: u64,
    #[arg(long, default_value_t = 1000)]
    pub(crate) cold_routing_keys: u64,
    /// A cold drain still pending after this long fails (with the rate so far).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) cold_timeout: Duration,
    /// Rows of the backlog written while the relay is down (8-row transactions
    /// by default; the count is rounded up to whole transactions per writer).
    #[arg(long, default_value_t = 500_000)]
    pub(crate) backlog_rows: u64,
    /// Rows the relay published on the table before the outage (its history).
    #[arg(long, default_value_t = 200_000)]
    pub(crate) backlog_history_rows: u64,
    /// Partition keys of the backlog phase's rows (routing keys: --keyed-routing-keys).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) backlog_partition_keys: u32,
    /// Rows per transaction of the backlog and of the application's writes.
    #[arg(long, default_value_t = 8)]
    pub(crate) backlog_rows_per_tx: usize,
    /// pgbench clients writing the backlog.
    #[arg(long, default_value_t = 8)]
    pub(crate) backlog_writers: usize,
    /// Rows/s the application keeps writing during the backlog phase.
    #[arg(long, default_value_t = 500)]
    pub(crate) backlog_app_rate: u64,
    /// How long the application's writes are measured with the relay stopped.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub(crate) backlog_app_window: Duration,
    /// The backlog phase fails when the application's rows are not current this long after the relay started.
    #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
    pub(crate) backlog_timeout: Duration,
    /// Server connections of the pooled phase's private PgBouncer (transaction mode).
    #[arg(long, default_value_t = 3)]
    pub(crate) pooled_pool_size: usize,
    /// `--poll-interval` of the pooled phase's relay behind the pooler (`--listen false`).
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub(crate) pooled_poll_interval: Duration,
    /// Rows/s of the pooled phase's lag comparison (held for --steady-duration).
    #[arg(long, default_value_t = 1000)]
    pub(crate) pooled_rate: u64,
    /// A phase fails when no new message arrives for this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) stall_timeout: Duration,
    /// Relay binary to benchmark (default: target/release/outbox-relay, built first).
    #[arg(long)]
    pub(crate) relay_bin: Option<PathBuf>,
    /// Do not run `cargo build --release --bin outbox-relay` first.
    #[arg(long)]
    pub(crate) no_build: bool,
    /// Where to write the markdown results (default: bench/RESULTS.md in the repository).
    #[arg(long)]
    pub(crate) output: Option<PathBuf>,
    /// Also write every steady-state message's timestamps to DIR/steady-<rate>-<run>.csv
    /// (unix microseconds: created_at, commit acknowledged, received), to study outliers.
    #[arg(long, value_name = "DIR")]
    pub(crate) steady_dump: Option<PathBuf>,
}

impl Args {
    /// Application connections of the steady state at `rate`.
    pub(crate) fn steady_connections_at(&self, rate: u64) -> usize {
        let asked = self
            .steady_rates
            .iter()
            .position(|&r| r == rate)
            .and_then(|i| self.steady_connections.get(i).copied());
        util::steady_connections(asked, rate)
    }
}
