//! `make bench`: a benchmark of the relay that anyone can rerun on their machine.
//!
//! Runs against the local PostgreSQL (`OUTBOX_DATABASE_URL`) and RabbitMQ
//! (`OUTBOX_AMQP_URL`) with the release relay binary as a child process, prints a
//! results table on stdout (progress goes to stderr) and writes it, with the
//! machine's description, to `bench/RESULTS.md`.
//!
//! Phases (each uses a fresh schema `bench_<phase>_...`, dropped afterwards, and
//! a purged durable queue reached through the default exchange):
//! 1. ceiling: a bare lapin publisher with confirms and a large window, no database;
//! 2. drain: N pending rows, relay started, time until the consumer saw all and
//!    until the database shows none pending (ceiling and drain alternate per run,
//!    so each ratio is taken within one run);
//! 3. steady: paced single-row transactions from several connections, delivery lag;
//! 4. idle: statements per second the relay sends with nothing to do (measured in
//!    a database of its own, so nothing else is counted);
//! 5. footprint: peak RSS and CPU per 10,000 messages, taken over the drains;
//! 6. growth: drain rate with few and with many published rows kept.
//!
//! `cargo run --release --bin outbox-bench -- --help` lists the knobs.

use std::{
    collections::{hash_map::Entry, HashMap, VecDeque},
    fmt::Write as _,
    fs::File,
    io::{Read, Write},
    net::{TcpListener, TcpStream, ToSocketAddrs},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use lapin::{
    options::{
        BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
        QueueDeleteOptions, QueuePurgeOptions,
    },
    types::{FieldTable, LongString, ShortString},
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

// Targets from issue #5.
const TARGET_DRAIN_RATIO: f64 = 0.85;
const TARGET_LAG_1000_P50_MS: f64 = 5.0;
const TARGET_LAG_1000_P99_MS: f64 = 25.0;
const TARGET_LAG_5000_P99_MS: f64 = 50.0;
const TARGET_IDLE_PER_S: f64 = 1.0;
const TARGET_RSS_MIB: f64 = 30.0;
const TARGET_CPU_PER_10K: f64 = 0.3;
const TARGET_GROWTH_RATIO: f64 = 0.90;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Phase {
    Ceiling,
    Drain,
    Steady,
    Idle,
    Growth,
}

#[derive(Debug, Parser)]
#[command(
    name = "outbox-bench",
    about = "Benchmarks outbox-relay against the local PostgreSQL and RabbitMQ and writes bench/RESULTS.md"
)]
struct Args {
    /// PostgreSQL URL of the database to benchmark in (the bench creates and drops schemas there).
    #[arg(long, env = "OUTBOX_DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    database_url: String,
    /// RabbitMQ URL.
    #[arg(long, env = "OUTBOX_AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    amqp_url: String,
    /// Phases to run, comma separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ceiling,drain,steady,idle,growth"
    )]
    phases: Vec<Phase>,
    /// Messages per ceiling, drain and growth run.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Runs of the ceiling and drain phases (they alternate: ceiling then drain, per run).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Runs of the steady-state phase (each run covers every rate).
    #[arg(long, default_value_t = 1)]
    steady_runs: usize,
    /// Runs of the idle phase.
    #[arg(long, default_value_t = 1)]
    idle_runs: usize,
    /// Runs of the growth phase (each run covers every kept size).
    #[arg(long, default_value_t = 1)]
    growth_runs: usize,
    /// Unconfirmed publishes at most in the ceiling publisher.
    #[arg(long, default_value_t = 2000)]
    ceiling_window: usize,
    /// Steady-state insert rates (rows/s), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    steady_rates: Vec<u64>,
    /// How long each steady-state rate is held.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    steady_duration: Duration,
    /// Application connections inserting concurrently in the steady state
    /// (0 = one per 50 rows/s, at least 8 and at most 32).
    #[arg(long, default_value_t = 0)]
    steady_connections: usize,
    /// How long the idle relay is observed.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    idle_duration: Duration,
    /// Published rows kept in the table during the growth drains, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,1000000")]
    growth_kept: Vec<u64>,
    /// Durable queue the messages go to (through the default exchange).
    #[arg(long, default_value = "outbox_bench")]
    queue: String,
    /// A phase fails when no new message arrives for this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    stall_timeout: Duration,
    /// Relay binary to benchmark (default: target/release/outbox-relay, built first).
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Do not run `cargo build --release --bin outbox-relay` first.
    #[arg(long)]
    no_build: bool,
    /// Where to write the markdown results (default: bench/RESULTS.md in the repository).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Also write every steady-state message's timestamps to DIR/steady-<rate>-<run>.csv
    /// (unix microseconds: created_at, commit acknowledged, received), to study outliers.
    #[arg(long, value_name = "DIR")]
    steady_dump: Option<PathBuf>,
}

static START: OnceLock<Instant> = OnceLock::new();

macro_rules! progress {
    ($($arg:tt)*) => {{
        let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
        eprintln!("[{t:6.1}s] {}", format_args!($($arg)*));
    }};
}

fn main() -> ExitCode {
    START.get_or_init(Instant::now);
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outbox-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("outbox-bench: some phases failed; see the notes in the results");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("outbox-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the selected phases; Ok(false) when a phase failed (results still written).
async fn run(args: Args) -> Result<bool> {
    let relay_bin = relay_binary(&args)?;
    let bench = Bench::connect(args, relay_bin).await?;
    let machine = bench.describe_machine().await;
    progress!(
        "machine: {}; PostgreSQL {}; RabbitMQ {}",
        machine.cpu,
        machine.postgres,
        machine.rabbitmq
    );
    progress!("relay logs go to {}", bench.log_dir.display());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Some(load) = machine
        .load_start
        .split_whitespace()
        .next()
        .and_then(|l| l.parse::<f64>().ok())
        .filter(|&l| l > 0.5 * cores as f64)
    {
        progress!(
            "warning: load average {load} on {cores} cores before the bench starts: other work will skew the figures"
        );
    }
    let mut results = Results::default();
    let phases = bench.args.phases.clone();
    let has = |p: Phase| phases.contains(&p);

    if has(Phase::Ceiling) || has(Phase::Drain) {
        let runs = bench.args.runs.max(1);
        for run in 1..=runs {
            if has(Phase::Ceiling) {
                progress!(
                    "ceiling run {run}/{runs}: bare publisher, {} messages",
                    bench.args.messages
                );
                let r = bench.ceiling_once(run).await;
                report_run("ceiling", run, &r);
                results.ceiling.push(r.map_err(|e| format!("{e:#}")));
            }
            if has(Phase::Drain) {
                progress!(
                    "drain run {run}/{runs}: {} pending rows",
                    bench.args.messages
                );
                let r = bench.drain_phase(run).await;
                report_run("drain", run, &r);
                results.drain.push(r.map_err(|e| format!("{e:#}")));
            }
        }
    }
    if has(Phase::Steady) {
        let runs = bench.args.steady_runs.max(1);
        for run in 1..=runs {
            for &rate in &bench.args.steady_rates {
                progress!(
                    "steady run {run}/{runs}: {rate} rows/s for {:?}",
                    bench.args.steady_duration
                );
                let r = bench.steady_once(rate, run).await;
                report_run("steady", run, &r);
                results.steady.push((rate, r.map_err(|e| format!("{e:#}"))));
            }
        }
    }
    if has(Phase::Idle) {
        let runs = bench.args.idle_runs.max(1);
        for run in 1..=runs {
            progress!(
                "idle run {run}/{runs}: relay with nothing to do for {:?}",
                bench.args.idle_duration
            );
            let r = bench.idle_once(run).await;
            report_run("idle", run, &r);
            results.idle.push(r.map_err(|e| format!("{e:#}")));
        }
    }
    if has(Phase::Growth) {
        let runs = bench.args.growth_runs.max(1);
        for run in 1..=runs {
            let mut kept_runs = Vec::new();
            for &kept in &bench.args.growth_kept {
                progress!(
                    "growth run {run}/{runs}: {} pending rows behind {kept} published rows",
                    bench.args.messages
                );
                let r = bench.growth_once(kept, run).await;
                report_run("growth", run, &r);
                kept_runs.push((kept, r.map_err(|e| format!("{e:#}"))));
            }
            results.growth.push(kept_runs);
        }
    }
    bench.cleanup().await;

    let report = render(&bench, &machine, &results);
    println!("{report}");
    let output = bench.args.output.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("bench")
            .join("RESULTS.md")
    });
    if let Some(dir) = output.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&output, &report).with_context(|| format!("writing {}", output.display()))?;
    progress!("results written to {}", output.display());
    Ok(results.all_ok())
}

fn report_run<T: std::fmt::Debug>(phase: &str, run: usize, r: &Result<T>) {
    match r {
        Ok(v) => progress!("{phase} run {run}: {v:?}"),
        Err(e) => progress!("{phase} run {run} FAILED: {e:#}"),
    }
}

/// The release relay binary, built first unless told otherwise.
fn relay_binary(args: &Args) -> Result<PathBuf> {
    if let Some(bin) = &args.relay_bin {
        return Ok(bin.clone());
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let release_dir = match exe.parent() {
        Some(dir) if dir.file_name().is_some_and(|n| n == "release") => dir.to_path_buf(),
        _ => {
            progress!("warning: outbox-bench is not a release build; use cargo run --release");
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| manifest.join("target"))
                .join("release")
        }
    };
    if !args.no_build {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        progress!("building the relay: cargo build --release --bin outbox-relay");
        let status = Command::new(cargo)
            .args(["build", "--release", "--bin", "outbox-relay"])
            .current_dir(manifest)
            .stdin(Stdio::null())
            .status()
            .context("running cargo build (pass --no-build or --relay-bin to skip)")?;
        if !status.success() {
            bail!("cargo build --release --bin outbox-relay failed ({status})");
        }
    }
    let bin = release_dir.join("outbox-relay");
    if !bin.exists() {
        bail!(
            "{} does not exist: build it with cargo build --release",
            bin.display()
        );
    }
    Ok(bin)
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct CeilingRun {
    confirmed_s: f64,
    consumed_s: f64,
    not_acked: u64,
    cpu: CpuUse,
}

#[derive(Debug, Clone)]
struct DrainRun {
    messages: u64,
    first_s: f64,
    consumed_s: f64,
    db_zero_s: f64,
    relay_user_s: f64,
    relay_sys_s: f64,
    peak_rss_kib: u64,
    duplicates: u64,
    cpu: CpuUse,
    stop_note: Option<String>,
}

#[derive(Debug, Clone)]
struct SteadyRun {
    inserted: u64,
    insert_rate: f64,
    lag_ms: Quantiles,
    /// created_at → the application's commit acknowledged.
    commit_ms: Quantiles,
    /// The application's commit acknowledged → consumer receipt.
    after_commit_ms: Quantiles,
    hist_ms: Option<HistQuantiles>,
    confirm_ms: Option<HistQuantiles>,
    mean_batch: f64,
    relay_cpu_pct: f64,
    duplicates: u64,
    stop_note: Option<String>,
}

#[derive(Debug, Clone)]
struct IdleRun {
    method: String,
    /// Statements the relay's connections started, per second (pg_stat_activity sampled).
    statements_per_s: f64,
    /// Transactions counted in pg_stat_database for the database, minus the baseline.
    xacts_per_s: f64,
    baseline_per_s: f64,
    window_s: f64,
    stop_note: Option<String>,
}

#[derive(Debug, Clone, Copy)]
struct Quantiles {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Quantiles {
    fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        Self {
            p50: quantile(&values, 0.50),
            p99: quantile(&values, 0.99),
            max: values.last().copied().unwrap_or(f64::NAN),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct HistQuantiles {
    count: u64,
    p50: f64,
    p99: f64,
    /// Upper bound of the highest bucket that received an observation.
    max_le: f64,
}

/// CPU seconds used by the parts of the system over a measured window.
#[derive(Debug, Clone, Copy, Default)]
struct CpuUse {
    wall_s: f64,
    /// The PostgreSQL backends serving the relay's connections.
    relay_pg_s: f64,
    rabbitmq_s: f64,
    /// The bench process and its own PostgreSQL backend.
    bench_s: f64,
    /// Busy CPU time of the whole machine.
    total_s: f64,
}

#[derive(Default)]
struct Results {
    ceiling: Vec<Result<CeilingRun, String>>,
    drain: Vec<Result<DrainRun, String>>,
    steady: Vec<(u64, Result<SteadyRun, String>)>,
    idle: Vec<Result<IdleRun, String>>,
    growth: Vec<Vec<(u64, Result<DrainRun, String>)>>,
}

impl Results {
    fn all_ok(&self) -> bool {
        self.ceiling.iter().all(Result::is_ok)
            && self.drain.iter().all(Result::is_ok)
            && self.steady.iter().all(|(_, r)| r.is_ok())
            && self.idle.iter().all(Result::is_ok)
            && self
                .growth
                .iter()
                .all(|run| run.iter().all(|(_, r)| r.is_ok()))
    }
}

impl DrainRun {
    fn consumed_rate(&self) -> f64 {
        self.messages as f64 / self.consumed_s
    }
    fn db_rate(&self) -> f64 {
        self.messages as f64 / self.db_zero_s
    }
    fn cpu_per_10k(&self) -> f64 {
        (self.relay_user_s + self.relay_sys_s) / (self.messages as f64 / 10_000.0)
    }
}

// ---------------------------------------------------------------------------
// The bench: connections and phases
// ---------------------------------------------------------------------------

struct Bench {
    args: Args,
    relay_bin: PathBuf,
    log_dir: PathBuf,
    db: Arc<Client>,
    /// The PostgreSQL backend serving `db`.
    backend_pid: i32,
    /// The PostgreSQL server's TCP port, to find the relay's connections.
    server_port: i32,
    database: String,
    _amqp: Connection,
    admin: Channel,
    clk_tck: f64,
}

struct Machine {
    cpu: String,
    memory: String,
    kernel: String,
    postgres: String,
    postgres_settings: String,
    rabbitmq: String,
    relay_defaults: String,
    load_start: String,
}

impl Bench {
    async fn connect(args: Args, relay_bin: PathBuf) -> Result<Self> {
        let db = pg_connect(&args.database_url, "outbox-bench").await?;
        let row = db
            .query_one(
                "SELECT current_database(), pg_backend_pid(), inet_server_port()",
                &[],
            )
            .await?;
        let database: String = row.get(0);
        let backend_pid: i32 = row.get(1);
        let server_port: Option<i32> = row.get(2);
        let amqp = Connection::connect(
            &args.amqp_url,
            ConnectionProperties::default()
                .with_connection_name(LongString::from("outbox-bench admin")),
        )
        .await
        .with_context(|| format!("connecting to RabbitMQ at {}", redact(&args.amqp_url)))?;
        let admin = amqp.create_channel().await?;
        // A fresh durable classic queue: whatever an earlier run left is gone.
        admin
            .queue_delete(
                ShortString::from(args.queue.as_str()),
                QueueDeleteOptions::default(),
            )
            .await
            .context("deleting the bench queue")?;
        admin
            .queue_declare(
                ShortString::from(args.queue.as_str()),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("declaring the bench queue")?;
        let log_dir = std::env::temp_dir().join(format!("outbox-bench-{}", std::process::id()));
        std::fs::create_dir_all(&log_dir)?;
        Ok(Self {
            args,
            relay_bin,
            log_dir,
            db: Arc::new(db),
            backend_pid,
            server_port: server_port.unwrap_or(5432),
            database,
            _amqp: amqp,
            admin,
            clk_tck: clock_ticks(),
        })
    }

    async fn cleanup(&self) {
        let _ = self
            .admin
            .queue_delete(
                ShortString::from(self.args.queue.as_str()),
                QueueDeleteOptions::default(),
            )
            .await;
    }

    async fn purge(&self) -> Result<()> {
        self.admin
            .queue_purge(
                ShortString::from(self.args.queue.as_str()),
                QueuePurgeOptions::default(),
            )
            .await
            .context("purging the bench queue")?;
        Ok(())
    }

    /// A command for the relay binary that sees only the settings given here.
    fn relay_command(&self, database_url: &str) -> Command {
        let mut cmd = Command::new(&self.relay_bin);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("OUTBOX_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("OUTBOX_DATABASE_URL", database_url)
            .env("OUTBOX_AMQP_URL", &self.args.amqp_url)
            .env("OUTBOX_LOG", "warn")
            .stdin(Stdio::null());
        cmd
    }

    /// Drops the schema if an earlier run left it, and migrates it afresh.
    async fn fresh_schema(&self, db: &Client, database_url: &str, schema: &str) -> Result<()> {
        db.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await
            .with_context(|| format!("dropping schema {schema}"))?;
        let out = self
            .relay_command(database_url)
            .args(["migrate", "--schema", schema])
            .output()
            .context("running outbox-relay migrate")?;
        if !out.status.success() {
            bail!(
                "outbox-relay migrate --schema {schema} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    async fn drop_schema(&self, schema: &str) {
        if let Err(e) = self
            .db
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await
        {
            progress!("warning: could not drop schema {schema}: {e}");
        }
    }

    /// Bulk-inserts rows of `payload_bytes` each to the bench queue.
    async fn insert_rows(&self, schema: &str, n: u64, published: bool) -> Result<()> {
        let sql = format!(
            "INSERT INTO {schema}.messages (routing_key, payload, published_at)
             SELECT $1, convert_to(rpad(i::text, $2, '.'), 'UTF8'), CASE WHEN $3 THEN now() END
               FROM generate_series(1, $4::bigint) i"
        );
        let payload_bytes = i32::try_from(self.args.payload_bytes).context("payload size")?;
        self.db
            .execute(
                &sql,
                &[&self.args.queue, &payload_bytes, &published, &(n as i64)],
            )
            .await
            .with_context(|| format!("inserting {n} rows into {schema}.messages"))?;
        Ok(())
    }

    /// Statistics as autovacuum would have them, and no checkpoint debt from setup.
    async fn settle_table(&self, schema: &str) -> Result<()> {
        self.db
            .batch_execute(&format!("ANALYZE {schema}.messages"))
            .await?;
        if let Err(e) = self.db.batch_execute("CHECKPOINT").await {
            progress!(
                "note: CHECKPOINT not allowed ({e}); setup writes may overlap the measurement"
            );
        }
        Ok(())
    }

    async fn outbox_counts(&self, schema: &str) -> Result<OutboxCounts> {
        let row = self
            .db
            .query_one(
                &format!(
                    "SELECT count(*) FILTER (WHERE published_at IS NULL AND dead_lettered_at IS NULL),
                            count(*) FILTER (WHERE published_at IS NOT NULL),
                            count(*) FILTER (WHERE dead_lettered_at IS NOT NULL)
                       FROM {schema}.messages"
                ),
                &[],
            )
            .await?;
        Ok(OutboxCounts {
            pending: row.get(0),
            published: row.get(1),
            dead_lettered: row.get(2),
        })
    }

    /// PostgreSQL backends serving the relay: matched through the local ports of
    /// the relay's TCP connections to the server.
    async fn relay_backends(&self, relay: &RelayProc) -> Vec<i32> {
        let ports = tcp_ports_to(relay.pid(), self.server_port);
        if ports.is_empty() {
            return Vec::new();
        }
        self.db
            .query(
                "SELECT pid FROM pg_stat_activity WHERE client_port = ANY($1::int4[])",
                &[&ports],
            )
            .await
            .map(|rows| rows.iter().map(|r| r.get(0)).collect())
            .unwrap_or_default()
    }

    async fn partitions_total(db: &Client, schema: &str) -> Result<f64> {
        let n: i64 = db
            .query_one(&format!("SELECT count(*) FROM {schema}.leases"), &[])
            .await?
            .get(0);
        Ok(n as f64)
    }

    /// What went wrong, with the evidence: database state and the relay's log.
    async fn evidence(&self, schema: &str, relay: &mut RelayProc, consumer: &Consumer) -> String {
        let mut s = String::new();
        let (deliveries, distinct) = consumer.counts();
        let _ = write!(
            s,
            "consumer saw {distinct} distinct messages ({deliveries} deliveries); "
        );
        match self.outbox_counts(schema).await {
            Ok(c) => {
                let _ = write!(
                    s,
                    "{schema}.messages: {} pending, {} published, {} dead-lettered; ",
                    c.pending, c.published, c.dead_lettered
                );
            }
            Err(e) => {
                let _ = write!(s, "cannot count {schema}.messages: {e}; ");
            }
        }
        match relay.exited() {
            Some(status) => {
                let _ = write!(s, "relay exited: {status}; ");
            }
            None => {
                let _ = write!(s, "relay still running (pid {}); ", relay.pid());
                if let Ok((_, m)) = relay.get("/metrics").await {
                    for name in [
                        "outbox_relay_messages_published_total",
                        "outbox_relay_partitions_owned",
                        "outbox_relay_broker_connected",
                        "outbox_relay_database_connected",
                        "outbox_relay_broker_blocked",
                    ] {
                        if let Some(v) = metric(&m, name) {
                            let _ = write!(s, "{name} {v}; ");
                        }
                    }
                    for line in m.lines().filter(|l| {
                        l.starts_with("outbox_relay_publish_failures_total{") && !l.ends_with(" 0")
                    }) {
                        let _ = write!(s, "{line}; ");
                    }
                }
            }
        }
        let _ = write!(
            s,
            "relay log {}, last lines:\n{}",
            relay.log.display(),
            relay.log_tail(15)
        );
        s
    }

    // --- 1. ceiling -------------------------------------------------------

    async fn ceiling_once(&self, _run: usize) -> Result<CeilingRun> {
        let n = self.args.messages;
        self.purge().await?;
        let consumer = Consumer::start(&self.args.amqp_url, &self.args.queue, n).await?;
        let conn = Connection::connect(
            &self.args.amqp_url,
            ConnectionProperties::default()
                .with_connection_name(LongString::from("outbox-bench ceiling publisher")),
        )
        .await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let window = self.args.ceiling_window.max(1);
        let queue = ShortString::from(self.args.queue.as_str());
        let before = CpuSnapshot::take(self.backend_pid);
        let t0 = Instant::now();
        let mut in_flight = VecDeque::with_capacity(window);
        let mut not_acked = 0u64;
        let timestamp = unix_secs();
        let mut payload = Vec::with_capacity(self.args.payload_bytes);
        for i in 1..=n {
            fill_payload(&mut payload, i, self.args.payload_bytes);
            // The same properties the relay sets for a plain row.
            let properties = BasicProperties::default()
                .with_message_id(ShortString::from(Uuid::new_v4().to_string()))
                .with_delivery_mode(2)
                .with_timestamp(timestamp)
                .with_headers(FieldTable::default());
            let confirm = channel
                .basic_publish(
                    ShortString::from(""),
                    queue.clone(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &payload,
                    properties,
                )
                .await
                .context("basic.publish")?;
            in_flight.push_back(confirm);
            if in_flight.len() >= window {
                // Window full: take confirms in order until half of it is free,
                // then publish a burst again (as the relay does with its batches):
                // one wake-up per burst rather than per message.
                while in_flight.len() > window / 2 {
                    let Some(front) = in_flight.pop_front() else {
                        break;
                    };
                    if !matches!(front.await.context("confirm")?, Confirmation::Ack(None)) {
                        not_acked += 1;
                    }
                }
            }
        }
        while let Some(front) = in_flight.pop_front() {
            if !matches!(front.await.context("confirm")?, Confirmation::Ack(None)) {
                not_acked += 1;
            }
        }
        let confirmed_s = t0.elapsed().as_secs_f64();
        let consumed = consumer
            .wait_all(n, self.args.stall_timeout, None, "ceiling")
            .await;
        let after = CpuSnapshot::take(self.backend_pid);
        let _ = conn.close(200, ShortString::from("bench done")).await;
        consumer.close().await;
        let consumed_at = consumed?;
        Ok(CeilingRun {
            confirmed_s,
            consumed_s: (consumed_at - t0).as_secs_f64(),
            not_acked,
            cpu: before.until(&after, t0, self.clk_tck),
        })
    }

    // --- 2. drain (also 5. footprint) -------------------------------------

    async fn drain_phase(&self, run: usize) -> Result<DrainRun> {
        let schema = format!("bench_drain_{run}");
        self.fresh_schema(&self.db, &self.args.database_url, &schema)
            .await?;
        self.insert_rows(&schema, self.args.messages, false).await?;
        self.settle_table(&schema).await?;
        let r = self.drain_once(&schema, &format!("drain-{run}")).await;
        self.drop_schema(&schema).await;
        r
    }

    /// Starts a relay on a schema full of pending rows and measures it until
    /// every row is delivered and marked.
    async fn drain_once(&self, schema: &str, label: &str) -> Result<DrainRun> {
        let start_counts = self.outbox_counts(schema).await?;
        let n = start_counts.pending as u64;
        self.purge().await?;
        let consumer = Consumer::start(&self.args.amqp_url, &self.args.queue, n).await?;
        let before = CpuSnapshot::take(self.backend_pid);
        let t0 = Instant::now();
        let mut relay = RelayProc::spawn(self, &self.args.database_url, schema, label)?;
        // The database side: when does it show no pending row?
        let db = self.db.clone();
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {schema}.messages
                             WHERE published_at IS NULL AND dead_lettered_at IS NULL)"
        );
        let watcher = tokio::spawn(async move {
            loop {
                let asked = Instant::now();
                let any: bool = db.query_one(&sql, &[]).await?.get(0);
                if !any {
                    return Ok::<_, tokio_postgres::Error>(asked);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let measured = async {
            let consumed_at = consumer
                .wait_all(n, self.args.stall_timeout, Some(&mut relay), label)
                .await?;
            let db_zero_at = match tokio::time::timeout(self.args.stall_timeout, watcher).await {
                Ok(joined) => joined.context("watcher")?.context("polling pending rows")?,
                Err(_) => bail!(
                    "{label}: the consumer saw all {n} messages but the database still shows pending rows {:?} later",
                    self.args.stall_timeout
                ),
            };
            let relay_cpu = relay
                .cpu()
                .ok_or_else(|| anyhow!("cannot read /proc/{}/stat", relay.pid()))?;
            let peak_rss_kib = relay.peak_rss_kib().unwrap_or(0);
            // The relay's backends were started by this relay: their whole CPU
            // time falls in the window.
            let backends = self.relay_backends(&relay).await;
            let relay_pg_s = cpu_seconds(&backends, self.clk_tck);
            let after = CpuSnapshot::take(self.backend_pid);
            let counts = self.outbox_counts(schema).await?;
            let published = counts.published - start_counts.published;
            if published as u64 != n || counts.dead_lettered != 0 || counts.pending != 0 {
                bail!(
                    "{label}: after the drain {schema}.messages has {} newly published of {n}, {} pending, {} dead-lettered",
                    published,
                    counts.pending,
                    counts.dead_lettered
                );
            }
            let (deliveries, distinct) = consumer.counts();
            Ok(DrainRun {
                messages: n,
                first_s: consumer
                    .first_at()
                    .map_or(f64::NAN, |t| (t - t0).as_secs_f64()),
                consumed_s: (consumed_at - t0).as_secs_f64(),
                db_zero_s: (db_zero_at - t0).as_secs_f64(),
                relay_user_s: relay_cpu.0 as f64 / self.clk_tck,
                relay_sys_s: relay_cpu.1 as f64 / self.clk_tck,
                peak_rss_kib,
                duplicates: deliveries - distinct,
                cpu: CpuUse {
                    relay_pg_s,
                    ..before.until(&after, t0, self.clk_tck)
                },
                stop_note: None,
            })
        }
        .await;
        let measured = match measured {
            Ok(m) => Ok(m),
            Err(e) => Err(anyhow!(
                "{e:#}\n{}",
                self.evidence(schema, &mut relay, &consumer).await
            )),
        };
        let stop_note = relay.stop().await;
        consumer.close().await;
        let mut run = measured?;
        run.stop_note = stop_note;
        Ok(run)
    }

    // --- 3. steady state ---------------------------------------------------

    async fn steady_once(&self, rate: u64, run: usize) -> Result<SteadyRun> {
        let schema = format!("bench_steady_{rate}_{run}");
        self.fresh_schema(&self.db, &self.args.database_url, &schema)
            .await?;
        let r = self.steady_measure(&schema, rate, run).await;
        self.drop_schema(&schema).await;
        r
    }

    async fn steady_measure(&self, schema: &str, rate: u64, run: usize) -> Result<SteadyRun> {
        self.purge().await?;
        let consumer = Consumer::start(&self.args.amqp_url, &self.args.queue, u64::MAX).await?;
        let label = format!("steady-{rate}-{run}");
        let mut relay = RelayProc::spawn(self, &self.args.database_url, schema, &label)?;
        let partitions = Self::partitions_total(&self.db, schema).await?;
        let measured = async {
            relay
                .wait_ready(partitions, Duration::from_secs(30))
                .await?;
            let scrape_before = relay.scrape().await?;
            let cpu_before = relay.cpu().unwrap_or_default();
            let cpu_t0 = Instant::now();
            let (inserted, insert_rate, commits) = self.application(schema, rate).await?;
            progress!(
                "{label}: {inserted} rows inserted ({insert_rate:.0}/s); waiting for delivery"
            );
            consumer
                .wait_all(inserted, self.args.stall_timeout, Some(&mut relay), &label)
                .await?;
            let cpu_after = relay.cpu().unwrap_or_default();
            let cpu_wall = cpu_t0.elapsed().as_secs_f64();
            let scrape_after = relay.scrape().await?;
            let hist = |name: &str| {
                hist_quantiles(
                    &histogram_buckets(&scrape_before, name),
                    &histogram_buckets(&scrape_after, name),
                )
                .map(|h| HistQuantiles {
                    count: h.count,
                    p50: h.p50 * 1000.0,
                    p99: h.p99 * 1000.0,
                    max_le: h.max_le * 1000.0,
                })
            };
            let delta = |name: &str| {
                metric(&scrape_after, name).unwrap_or(f64::NAN)
                    - metric(&scrape_before, name).unwrap_or(0.0)
            };
            let created: HashMap<Uuid, SystemTime> = self
                .db
                .query(
                    &format!("SELECT message_id, created_at FROM {schema}.messages"),
                    &[],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let received = consumer.receipts();
            let mut lags: Vec<f64> = created
                .iter()
                .filter_map(|(id, at)| {
                    received.get(id).map(|got| {
                        got.duration_since(*at)
                            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
                    })
                })
                .collect();
            if (lags.len() as u64) < inserted {
                bail!(
                    "{label}: only {} of {inserted} inserted rows were received",
                    lags.len()
                );
            }
            lags.sort_by(f64::total_cmp);
            // The lag split at the application's commit: created_at → commit
            // acknowledged, and commit acknowledged → consumer receipt.
            let ms = |from: SystemTime, to: SystemTime| {
                to.duration_since(from)
                    .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
            };
            let mut to_commit = Vec::with_capacity(created.len());
            let mut after_commit = Vec::with_capacity(created.len());
            let mut dump = String::from("message_id,created_us,committed_us,received_us\n");
            for (id, at) in &created {
                if let (Some(done), Some(got)) = (commits.get(id), received.get(id)) {
                    to_commit.push(ms(*at, *done));
                    after_commit.push(ms(*done, *got));
                    if self.args.steady_dump.is_some() {
                        let us = |t: &SystemTime| {
                            t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros())
                        };
                        let _ = writeln!(dump, "{id},{},{},{}", us(at), us(done), us(got));
                    }
                }
            }
            if let Some(dir) = &self.args.steady_dump {
                let path = dir.join(format!("steady-{rate}-{run}.csv"));
                std::fs::create_dir_all(dir)
                    .and_then(|()| std::fs::write(&path, &dump))
                    .with_context(|| format!("writing {}", path.display()))?;
                progress!("{label}: per-message timestamps in {}", path.display());
            }
            let (deliveries, distinct) = consumer.counts();
            Ok(SteadyRun {
                inserted,
                insert_rate,
                lag_ms: Quantiles::of(lags),
                commit_ms: Quantiles::of(to_commit),
                after_commit_ms: Quantiles::of(after_commit),
                hist_ms: hist("outbox_relay_delivery_lag_seconds"),
                confirm_ms: hist("outbox_relay_confirm_duration_seconds"),
                mean_batch: delta("outbox_relay_batch_size_sum")
                    / delta("outbox_relay_batch_size_count"),
                relay_cpu_pct: ((cpu_after.0 + cpu_after.1) - (cpu_before.0 + cpu_before.1)) as f64
                    / self.clk_tck
                    / cpu_wall
                    * 100.0,
                duplicates: deliveries - distinct,
                stop_note: None,
            })
        }
        .await;
        let measured = match measured {
            Ok(m) => Ok(m),
            Err(e) => Err(anyhow!(
                "{e:#}\n{}",
                self.evidence(schema, &mut relay, &consumer).await
            )),
        };
        let stop_note = relay.stop().await;
        consumer.close().await;
        let mut run = measured?;
        run.stop_note = stop_note;
        Ok(run)
    }

    /// The application: one row per transaction from several connections, paced
    /// to `rate` rows/s on a shared schedule. Returns rows inserted and the rate reached.
    async fn application(
        &self,
        schema: &str,
        rate: u64,
    ) -> Result<(u64, f64, HashMap<Uuid, SystemTime>)> {
        let conns = steady_connections(self.args.steady_connections, rate);
        let duration = self.args.steady_duration;
        let mut clients = Vec::with_capacity(conns);
        for _ in 0..conns {
            clients.push(pg_connect(&self.args.database_url, "outbox-bench app").await?);
        }
        let payload: Vec<u8> = {
            let mut p = Vec::new();
            fill_payload(&mut p, 0, self.args.payload_bytes);
            p
        };
        let sql = format!(
            "INSERT INTO {schema}.messages (routing_key, payload) VALUES ($1, $2) RETURNING message_id"
        );
        let start = tokio::time::Instant::now() + Duration::from_millis(200);
        let end = start + duration;
        let mut tasks = Vec::with_capacity(conns);
        for (k, client) in clients.into_iter().enumerate() {
            let sql = sql.clone();
            let queue = self.args.queue.clone();
            let payload = payload.clone();
            tasks.push(tokio::spawn(async move {
                let statement = client.prepare(&sql).await?;
                let mut done = 0u64;
                let mut committed = Vec::new();
                let mut seq = k as u64;
                loop {
                    let due = start + Duration::from_nanos(seq * 1_000_000_000 / rate);
                    // Behind schedule the backlog goes out back to back, but never
                    // past the end of the window: the rate reached is reported.
                    if due >= end || tokio::time::Instant::now() >= end {
                        break;
                    }
                    tokio::time::sleep_until(due).await;
                    // Autocommit: when the answer is here, the row is committed.
                    let row = client.query_one(&statement, &[&queue, &payload]).await?;
                    committed.push((row.get::<_, Uuid>(0), SystemTime::now()));
                    done += 1;
                    seq += conns as u64;
                }
                Ok::<_, tokio_postgres::Error>((done, tokio::time::Instant::now(), committed))
            }));
        }
        let mut inserted = 0;
        let mut last = start;
        let mut commits = HashMap::new();
        for task in tasks {
            let (done, finished, committed) = task.await.context("application task")??;
            inserted += done;
            last = last.max(finished);
            commits.extend(committed);
        }
        let secs = (last - start).as_secs_f64().max(duration.as_secs_f64());
        Ok((inserted, inserted as f64 / secs, commits))
    }

    // --- 4. idle -------------------------------------------------------------

    async fn idle_once(&self, run: usize) -> Result<IdleRun> {
        let schema = format!("bench_idle_{run}");
        // A database of its own: its pg_stat_database counters see the relay and
        // nothing else (the bench reads them from its main connection).
        let own = format!("{}_bench_idle", self.database);
        let _ = self
            .db
            .batch_execute(&format!("DROP DATABASE IF EXISTS {own} WITH (FORCE)"))
            .await;
        let dedicated = match self
            .db
            .batch_execute(&format!("CREATE DATABASE {own} TEMPLATE template0"))
            .await
        {
            Ok(()) => true,
            Err(e) => {
                progress!("note: cannot create database {own} ({e}); measuring with and without the relay in {}", self.database);
                false
            }
        };
        let (database, url) = if dedicated {
            (own.clone(), with_database(&self.args.database_url, &own)?)
        } else {
            (self.database.clone(), self.args.database_url.clone())
        };
        let r = async {
            let partitions = {
                let client = pg_connect(&url, "outbox-bench setup").await?;
                self.fresh_schema(&client, &url, &schema).await?;
                Self::partitions_total(&client, &schema).await?
            };
            self.idle_measure(&database, &url, &schema, partitions, dedicated, run)
                .await
        }
        .await;
        if dedicated {
            if let Err(e) = self
                .db
                .batch_execute(&format!("DROP DATABASE IF EXISTS {own} WITH (FORCE)"))
                .await
            {
                progress!("warning: could not drop database {own}: {e}");
            }
        } else {
            self.drop_schema(&schema).await;
        }
        r
    }

    async fn idle_measure(
        &self,
        database: &str,
        url: &str,
        schema: &str,
        partitions: f64,
        dedicated: bool,
        run: usize,
    ) -> Result<IdleRun> {
        let window = self.args.idle_duration;
        // Let the setup connection's statistics reach pg_stat_database, then the baseline.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let baseline_window = if dedicated {
            Duration::from_secs(5)
        } else {
            window
        };
        let (b0, bt0) = (self.transactions(database).await?, Instant::now());
        tokio::time::sleep(baseline_window).await;
        let (b1, bt1) = (self.transactions(database).await?, Instant::now());
        let baseline_per_s = (b1 - b0) as f64 / (bt1 - bt0).as_secs_f64();

        let label = format!("idle-{run}");
        let mut relay = RelayProc::spawn(self, url, schema, &label)?;
        let measured = async {
            relay.wait_ready(partitions, Duration::from_secs(30)).await?;
            // Past start-up (first heartbeat, first retention pass, first claim),
            // and past PostgreSQL's statistics delay: a backend that went idle
            // right after start-up (the relay's claim connection, after preparing
            // its statements) reports its transactions up to 10 s later
            // (PGSTAT_IDLE_INTERVAL), which would land in the window.
            tokio::time::sleep(Duration::from_secs(12)).await;
            let (c0, t0) = (self.transactions(database).await?, Instant::now());
            let sampler = tokio::spawn(count_statements(
                self.db.clone(),
                database.to_string(),
                SystemTime::now(),
                t0 + window,
            ));
            tokio::time::sleep(window).await;
            let (c1, t1) = (self.transactions(database).await?, Instant::now());
            let statements = sampler
                .await
                .context("statement sampler")?
                .context("sampling pg_stat_activity")?;
            if let Some(status) = relay.exited() {
                bail!("the relay exited during the idle window: {status}");
            }
            let window_s = (t1 - t0).as_secs_f64();
            let total_per_s = (c1 - c0) as f64 / window_s;
            Ok(IdleRun {
                method: if dedicated {
                    format!(
                        "statements: each new query_start of the relay's backends in pg_stat_activity, sampled every 10 ms \
                         (idle statements are ~1 s apart, so none is missed); transactions: xact_commit+xact_rollback of \
                         database {database}, which only the relay uses, minus a 5 s baseline without the relay"
                    )
                } else {
                    format!(
                        "statements: new query_start values of backends named outbox-relay* in {database}, sampled every 10 ms \
                         (other relays on this server would be counted too); transactions: xact_commit+xact_rollback of {database} \
                         with the relay minus the same without it (other clients add noise)"
                    )
                },
                statements_per_s: statements as f64 / window_s,
                xacts_per_s: total_per_s - baseline_per_s,
                baseline_per_s,
                window_s,
                stop_note: None,
            })
        }
        .await;
        let measured = match measured {
            Ok(m) => Ok(m),
            Err(e) => Err(anyhow!("{e:#}\nrelay log tail:\n{}", relay.log_tail(15))),
        };
        let stop_note = relay.stop().await;
        let mut run = measured?;
        run.stop_note = stop_note;
        Ok(run)
    }

    /// Transactions committed or rolled back in a database (cumulative).
    async fn transactions(&self, database: &str) -> Result<i64> {
        Ok(self
            .db
            .query_one(
                "SELECT coalesce(sum(xact_commit + xact_rollback), 0)::bigint
                   FROM pg_stat_database WHERE datname = $1",
                &[&database],
            )
            .await?
            .get(0))
    }

    // --- 6. growth -------------------------------------------------------------

    async fn growth_once(&self, kept: u64, run: usize) -> Result<DrainRun> {
        let schema = format!("bench_growth_{kept}_{run}");
        self.fresh_schema(&self.db, &self.args.database_url, &schema)
            .await?;
        let r = async {
            let t = Instant::now();
            self.insert_rows(&schema, kept, true).await?;
            progress!(
                "growth: {kept} published rows inserted in {:.1}s",
                t.elapsed().as_secs_f64()
            );
            self.insert_rows(&schema, self.args.messages, false).await?;
            self.settle_table(&schema).await?;
            self.drain_once(&schema, &format!("growth-{kept}-{run}"))
                .await
        }
        .await;
        self.drop_schema(&schema).await;
        r
    }

    // --- machine description ---------------------------------------------------

    async fn describe_machine(&self) -> Machine {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map_or("unknown".into(), |kb| {
                format!("{:.1} GiB", kb / 1024.0 / 1024.0)
            });
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or("unknown".into(), |s| s.trim().to_string());
        let postgres = match self.db.query_one("SHOW server_version", &[]).await {
            Ok(r) => r.get::<_, String>(0),
            Err(_) => "unknown".into(),
        };
        let mut settings = Vec::new();
        for name in [
            "shared_buffers",
            "synchronous_commit",
            "fsync",
            "wal_level",
            "max_wal_size",
            "autovacuum",
        ] {
            if let Ok(r) = self.db.query_one(&format!("SHOW {name}"), &[]).await {
                settings.push(format!("{name}={}", r.get::<_, String>(0)));
            }
        }
        let rabbitmq = rabbitmq_version(&self.args.amqp_url).unwrap_or_else(|| "unknown".into());
        Machine {
            cpu: format!("{cores} cores ({model})"),
            memory,
            kernel,
            postgres,
            postgres_settings: settings.join(", "),
            rabbitmq,
            relay_defaults: relay_defaults(&self.relay_bin),
            load_start: load_average(),
        }
    }
}

struct OutboxCounts {
    pending: i64,
    published: i64,
    dead_lettered: i64,
}

async fn pg_connect(url: &str, application_name: &str) -> Result<Client> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .with_context(|| format!("parsing the database URL {}", redact(url)))?;
    config.application_name(application_name);
    let (client, connection) = config
        .connect(NoTls)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", redact(url)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Counts the statements the relay's backends start until `end`: every new
/// `query_start` seen in pg_stat_activity (sampled every 10 ms, from another
/// database, so the sampling itself is not counted).
async fn count_statements(
    db: Arc<Client>,
    database: String,
    since: SystemTime,
    end: Instant,
) -> Result<u64, tokio_postgres::Error> {
    let mut last: HashMap<i32, SystemTime> = HashMap::new();
    let mut started = 0u64;
    while Instant::now() < end {
        let rows = db
            .query(
                "SELECT pid, query_start FROM pg_stat_activity
                  WHERE datname = $1 AND application_name LIKE 'outbox-relay%'
                    AND query_start IS NOT NULL",
                &[&database],
            )
            .await?;
        for row in rows {
            let pid: i32 = row.get(0);
            let query_start: SystemTime = row.get(1);
            match last.insert(pid, query_start) {
                Some(previous) if previous != query_start => started += 1,
                None if query_start >= since => started += 1,
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(started)
}

// ---------------------------------------------------------------------------
// The consumer
// ---------------------------------------------------------------------------

struct Seen {
    first: HashMap<Uuid, SystemTime>,
    deliveries: u64,
    target: u64,
    first_at: Option<Instant>,
    done_at: Option<Instant>,
    error: Option<String>,
}

/// Counts and timestamps deliveries (auto-ack) by message id.
struct Consumer {
    conn: Connection,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Consumer {
    async fn start(url: &str, queue: &str, target: u64) -> Result<Self> {
        let conn = Connection::connect(
            url,
            ConnectionProperties::default()
                .with_connection_name(LongString::from("outbox-bench consumer")),
        )
        .await
        .context("consumer connection")?;
        let channel = conn.create_channel().await?;
        let mut stream = channel
            .basic_consume(
                ShortString::from(queue),
                ShortString::from(""),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("basic.consume")?;
        let seen = Arc::new(Mutex::new(Seen {
            first: HashMap::with_capacity(target.min(2_000_000) as usize),
            deliveries: 0,
            target,
            first_at: None,
            done_at: None,
            error: None,
        }));
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(delivery) = stream.next().await {
                let at = Instant::now();
                let wall = SystemTime::now();
                let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                match delivery {
                    Ok(d) => {
                        s.deliveries += 1;
                        s.first_at.get_or_insert(at);
                        let id = d
                            .properties
                            .message_id()
                            .as_ref()
                            .and_then(|m| Uuid::parse_str(m.as_str()).ok())
                            .unwrap_or_else(Uuid::new_v4);
                        if let Entry::Vacant(v) = s.first.entry(id) {
                            v.insert(wall);
                            if s.first.len() as u64 >= s.target && s.done_at.is_none() {
                                s.done_at = Some(at);
                            }
                        }
                    }
                    Err(e) => {
                        s.error = Some(e.to_string());
                        break;
                    }
                }
            }
        });
        Ok(Self { conn, seen, task })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (deliveries, distinct message ids)
    fn counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.deliveries, s.first.len() as u64)
    }

    fn first_at(&self) -> Option<Instant> {
        self.lock().first_at
    }

    fn receipts(&self) -> HashMap<Uuid, SystemTime> {
        self.lock().first.clone()
    }

    /// Waits until `target` distinct messages arrived; returns when the last one did.
    async fn wait_all(
        &self,
        target: u64,
        stall: Duration,
        mut relay: Option<&mut RelayProc>,
        what: &str,
    ) -> Result<Instant> {
        {
            let mut s = self.lock();
            s.target = target;
            if s.first.len() as u64 >= target && s.done_at.is_none() {
                s.done_at = Some(Instant::now());
            }
        }
        let mut last_count = 0;
        let mut last_change = Instant::now();
        let mut last_print = Instant::now();
        loop {
            let count = {
                let s = self.lock();
                if let Some(at) = s.done_at {
                    return Ok(at);
                }
                if let Some(e) = &s.error {
                    bail!("{what}: the consumer failed: {e}");
                }
                s.first.len() as u64
            };
            if count != last_count {
                last_count = count;
                last_change = Instant::now();
            } else if last_change.elapsed() > stall {
                bail!(
                    "{what}: stalled: {count} of {target} messages arrived, none in the last {stall:?}"
                );
            }
            if let Some(r) = relay.as_deref_mut() {
                if let Some(status) = r.exited() {
                    bail!("{what}: the relay exited ({status}) after {count} of {target} messages");
                }
            }
            if last_print.elapsed() >= Duration::from_secs(5) {
                progress!("{what}: {count}/{target} delivered");
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn close(self) {
        let _ = self.conn.close(200, ShortString::from("bench done")).await;
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// The relay as a child process
// ---------------------------------------------------------------------------

struct RelayProc {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl RelayProc {
    fn spawn(bench: &Bench, database_url: &str, schema: &str, label: &str) -> Result<Self> {
        let port = free_port()?;
        let log = bench.log_dir.join(format!("relay-{label}.log"));
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = bench
            .relay_command(database_url)
            .args([
                "run",
                "--schema",
                schema,
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
                "--instance-id",
                &format!("bench-{label}"),
            ])
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", bench.relay_bin.display()))?;
        Ok(Self { child, port, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// (utime, stime) in clock ticks.
    fn cpu(&self) -> Option<(u64, u64)> {
        proc_stat(&self.pid().to_string()).map(|(_, u, s)| (u, s))
    }

    fn peak_rss_kib(&self) -> Option<u64> {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()?
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    async fn get(&self, path: &str) -> Result<(u16, String)> {
        let port = self.port;
        let path = path.to_string();
        tokio::task::spawn_blocking(move || http_get(port, &path))
            .await?
            .map_err(Into::into)
    }

    /// Ready (both sides connected) and holding every partition.
    async fn wait_ready(&mut self, partitions: f64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                bail!(
                    "the relay exited at start ({status}); log:\n{}",
                    self.log_tail(15)
                );
            }
            if let Ok((200, _)) = self.get("/readyz").await {
                if let Ok((200, m)) = self.get("/metrics").await {
                    if metric(&m, "outbox_relay_partitions_owned").is_some_and(|p| p >= partitions)
                    {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the relay was not ready with all {partitions} partitions within {timeout:?}; log:\n{}",
                    self.log_tail(15)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn scrape(&self) -> Result<String> {
        let (code, text) = self.get("/metrics").await?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(text)
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        if tail.is_empty() {
            "(empty)".into()
        } else {
            tail
        }
    }

    /// SIGTERM, then wait; a note when the stop was not clean.
    async fn stop(mut self) -> Option<String> {
        if let Some(status) = self.exited() {
            return Some(format!("the relay had already exited ({status})"));
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.exited() {
                return (!status.success())
                    .then(|| format!("the relay exited with {status} after SIGTERM"));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Some("the relay did not exit within 20 s of SIGTERM; killed".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// A plain (unlabelled) sample's value.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// (le, cumulative count) of a histogram, in le order.
fn histogram_buckets(text: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, u64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, rest) = rest.split_once("\"}")?;
            let count = rest.split_whitespace().next()?.parse::<f64>().ok()?;
            Some((le.parse().ok()?, count as u64))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

struct HistQ {
    count: u64,
    p50: f64,
    p99: f64,
    max_le: f64,
}

/// Quantiles of the observations made between two scrapes, interpolated
/// linearly inside buckets (the way Prometheus' histogram_quantile does).
fn hist_quantiles(before: &[(f64, u64)], after: &[(f64, u64)]) -> Option<HistQ> {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .map(|&(le, c)| {
            let b = before.iter().find(|(l, _)| *l == le).map_or(0, |&(_, c)| c);
            (le, c.saturating_sub(b))
        })
        .collect();
    let total = delta.last()?.1;
    if total == 0 {
        return None;
    }
    let q = |q: f64| {
        let rank = q * total as f64;
        let mut prev_le = 0.0;
        let mut prev_c = 0u64;
        for &(le, c) in &delta {
            if c as f64 >= rank {
                if le.is_infinite() {
                    return prev_le;
                }
                let in_bucket = (c - prev_c) as f64;
                let frac = if in_bucket > 0.0 {
                    (rank - prev_c as f64) / in_bucket
                } else {
                    1.0
                };
                return prev_le + (le - prev_le) * frac;
            }
            prev_le = le;
            prev_c = c;
        }
        prev_le
    };
    let max_le = delta
        .iter()
        .find(|(_, c)| *c == total)
        .map_or(f64::INFINITY, |&(le, _)| le);
    Some(HistQ {
        count: total,
        p50: q(0.50),
        p99: q(0.99),
        max_le,
    })
}

// ---------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------

/// Local ports of a process's TCP connections to `remote_port` (IPv4 and IPv6).
fn tcp_ports_to(pid: u32, remote_port: i32) -> Vec<i32> {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in dir.flatten() {
            if let Ok(target) = std::fs::read_link(entry.path()) {
                let target = target.to_string_lossy();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|r| r.strip_suffix(']'))
                {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let port = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| i32::from_str_radix(p, 16).ok())
    };
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && inodes.contains(f[9]) && port(f[2]) == Some(remote_port) {
                ports.extend(port(f[1]));
            }
        }
    }
    ports
}

/// CPU seconds a set of processes used since they started.
fn cpu_seconds(pids: &[i32], clk_tck: f64) -> f64 {
    pids.iter()
        .filter_map(|p| proc_stat(&p.to_string()))
        .map(|(_, u, s)| (u + s) as f64)
        .sum::<f64>()
        / clk_tck
}

/// (comm, utime, stime) of a process, in clock ticks.
fn proc_stat(pid: &str) -> Option<(String, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let fields: Vec<&str> = s[close + 1..].split_whitespace().collect();
    // Fields after the command name start at field 3 (state); utime is 14, stime 15.
    Some((
        comm,
        fields.get(11)?.parse().ok()?,
        fields.get(12)?.parse().ok()?,
    ))
}

#[derive(Debug, Clone, Copy)]
struct CpuSnapshot {
    rabbitmq: u64,
    bench: u64,
    busy: u64,
}

impl CpuSnapshot {
    /// `bench_backend`: the pid of the PostgreSQL backend of the bench's connection.
    fn take(bench_backend: i32) -> Self {
        let mut rabbitmq = 0;
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let name = entry.file_name();
                let Some(pid) = name
                    .to_str()
                    .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                else {
                    continue;
                };
                if let Some((comm, u, s)) = proc_stat(pid) {
                    if comm == "beam.smp" {
                        rabbitmq += u + s;
                    }
                }
            }
        }
        let bench = proc_stat("self").map_or(0, |(_, u, s)| u + s)
            + proc_stat(&bench_backend.to_string()).map_or(0, |(_, u, s)| u + s);
        // First line of /proc/stat: user nice system idle iowait irq softirq steal ...
        let busy = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?.to_string();
                let v: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                let all: u64 = v.iter().take(8).sum();
                Some(all - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0))
            })
            .unwrap_or(0);
        Self {
            rabbitmq,
            bench,
            busy,
        }
    }

    fn until(&self, after: &Self, t0: Instant, clk_tck: f64) -> CpuUse {
        let s = |a: u64, b: u64| a.saturating_sub(b) as f64 / clk_tck;
        CpuUse {
            wall_s: t0.elapsed().as_secs_f64(),
            relay_pg_s: 0.0,
            rabbitmq_s: s(after.rabbitmq, self.rabbitmq),
            bench_s: s(after.bench, self.bench),
            total_s: s(after.busy, self.busy),
        }
    }
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

fn steady_connections(asked: usize, rate: u64) -> usize {
    if asked > 0 {
        asked
    } else {
        ((rate / 50) as usize).clamp(8, 32)
    }
}

impl std::fmt::Display for Quantiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1} / {:.1} / {:.1}", self.p50, self.p99, self.max)
    }
}

/// The payload the SQL setup writes too: the number, padded with dots.
fn fill_payload(buf: &mut Vec<u8>, i: u64, len: usize) {
    buf.clear();
    let _ = write!(buf, "{i}");
    buf.truncate(len);
    buf.resize(len, b'.');
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Nearest-rank quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_string(),
    }
}

/// The same URL pointing at another database.
fn with_database(url: &str, database: &str) -> Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| anyhow!("database URL is not a postgres:// URL"))?;
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = before_query.split('/').next().unwrap_or(before_query);
    Ok(format!("{scheme}://{authority}/{database}{query}"))
}

/// RabbitMQ's version from the server properties of connection.start.
fn rabbitmq_version(amqp_url: &str) -> Option<String> {
    if amqp_url.starts_with("amqps://") {
        return None;
    }
    let uri: lapin::uri::AMQPUri = amqp_url.parse().ok()?;
    let addr = (uri.authority.host.as_str(), uri.authority.port)
        .to_socket_addrs()
        .ok()?
        .next()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    stream.write_all(b"AMQP\x00\x00\x09\x01").ok()?;
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let key = b"\x07versionS";
    loop {
        let n = stream.read(&mut buf[len..]).ok()?;
        if n == 0 {
            return None;
        }
        len += n;
        if let Some(at) = buf[..len].windows(key.len()).position(|w| w == key) {
            let start = at + key.len();
            if len >= start + 4 {
                let size = u32::from_be_bytes(buf[start..start + 4].try_into().ok()?) as usize;
                if len >= start + 4 + size {
                    return Some(
                        String::from_utf8_lossy(&buf[start + 4..start + 4 + size]).into_owned(),
                    );
                }
            }
        }
        if len == buf.len() {
            return None;
        }
    }
}

/// The relay's tuning defaults, read from its --help.
fn relay_defaults(bin: &Path) -> String {
    let Ok(out) = Command::new(bin).args(["run", "--help"]).output() else {
        return "unknown".into();
    };
    let help = String::from_utf8_lossy(&out.stdout);
    let mut found = Vec::new();
    for flag in [
        "--batch-size",
        "--max-in-flight",
        "--poll-interval",
        "--retention",
    ] {
        let Some(at) = help.find(flag) else { continue };
        let rest = &help[at..];
        let end = rest[2..].find("\n  -").map_or(rest.len(), |e| e + 2);
        if let Some(d) = rest[..end].find("[default: ") {
            let value = &rest[..end][d + 10..];
            if let Some(close) = value.find(']') {
                found.push(format!("{} {}", &flag[2..], &value[..close]));
            }
        }
    }
    if found.is_empty() {
        "unknown".into()
    } else {
        found.join(", ")
    }
}

fn utc_now() -> String {
    let secs = unix_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn git_commit() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let head = Command::new("git")
        .args(["-C", dir, "rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let Some(head) = head else {
        return "unknown (not a git checkout)".into();
    };
    let dirty = Command::new("git")
        .args(["-C", dir, "status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    if dirty {
        format!("{head} (with uncommitted changes)")
    } else {
        head
    }
}

// ---------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------

fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let n = v.round() as i64;
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn runs_note(values: &[f64]) -> String {
    match values.len() {
        0 => String::new(),
        1 => " (1 run)".into(),
        n => format!(" (median of {n} runs)"),
    }
}

struct Row {
    figure: String,
    measured: String,
    target: String,
    result: String,
}

fn verdict(ok: Option<bool>) -> String {
    match ok {
        Some(true) => "met".into(),
        Some(false) => "**not met**".into(),
        None => "no data".into(),
    }
}

fn render(bench: &Bench, machine: &Machine, r: &Results) -> String {
    let args = &bench.args;
    let n = args.messages;
    let mut rows: Vec<Row> = Vec::new();
    let info = |figure: String, measured: String| Row {
        figure,
        measured,
        target: "–".into(),
        result: "".into(),
    };

    // 1 and 2: ceiling, drain, ratio.
    let ceilings: Vec<f64> = r
        .ceiling
        .iter()
        .flatten()
        .map(|c| n as f64 / c.consumed_s)
        .collect();
    let drains: Vec<&DrainRun> = r.drain.iter().flatten().collect();
    if !r.ceiling.is_empty() {
        rows.push(info(
            format!("1. Ceiling: bare lapin publisher, confirms, window {} (until the consumer saw all)", args.ceiling_window),
            median(ceilings.clone()).map_or("failed".into(), |m| {
                format!("{} msg/s{}", thousands(m), runs_note(&ceilings))
            }),
        ));
    }
    if !r.drain.is_empty() {
        let consumed: Vec<f64> = drains.iter().map(|d| d.consumed_rate()).collect();
        let db: Vec<f64> = drains.iter().map(|d| d.db_rate()).collect();
        rows.push(info(
            format!(
                "2. Drain {}: relay start → consumer saw all",
                thousands(n as f64)
            ),
            median(consumed.clone()).map_or("failed".into(), |m| {
                format!("{} msg/s{}", thousands(m), runs_note(&consumed))
            }),
        ));
        rows.push(info(
            format!(
                "2. Drain {}: relay start → database shows 0 pending",
                thousands(n as f64)
            ),
            median(db.clone()).map_or("failed".into(), |m| {
                format!("{} msg/s{}", thousands(m), runs_note(&db))
            }),
        ));
        // Ratios within one run: run i's drain over run i's ceiling.
        let ratios: Vec<f64> = r
            .ceiling
            .iter()
            .zip(&r.drain)
            .filter_map(|(c, d)| match (c, d) {
                (Ok(c), Ok(d)) => Some(d.consumed_rate() / (n as f64 / c.consumed_s)),
                _ => None,
            })
            .collect();
        if !r.ceiling.is_empty() {
            let m = median(ratios.clone());
            rows.push(Row {
                figure: "2. Drain / ceiling (same run, both until the consumer saw all)".into(),
                measured: m.map_or("no data".into(), |m| {
                    format!("{m:.2}{}", runs_note(&ratios))
                }),
                target: format!("≥ {TARGET_DRAIN_RATIO}"),
                result: verdict(m.map(|m| m >= TARGET_DRAIN_RATIO)),
            });
        }
    }

    // 3. steady state.
    for &rate in &args.steady_rates {
        let runs: Vec<&SteadyRun> = r
            .steady
            .iter()
            .filter(|(ra, _)| *ra == rate)
            .filter_map(|(_, s)| s.as_ref().ok())
            .collect();
        if r.steady.iter().all(|(ra, _)| *ra != rate) {
            continue;
        }
        let med = |f: &dyn Fn(&SteadyRun) -> f64| median(runs.iter().map(|s| f(s)).collect());
        let hist = |f: &dyn Fn(&HistQuantiles) -> f64| {
            median(
                runs.iter()
                    .filter_map(|s| s.hist_ms.as_ref().map(f))
                    .collect(),
            )
        };
        let note = runs_note(&runs.iter().map(|s| s.insert_rate).collect::<Vec<_>>());
        let achieved = med(&|s| s.insert_rate);
        rows.push(info(
            format!(
                "3. Steady {}/s for {:?}: application insert rate reached",
                thousands(rate as f64),
                args.steady_duration
            ),
            achieved.map_or("failed".into(), |a| {
                let short = if a < 0.95 * rate as f64 {
                    " (**below the asked rate**)"
                } else {
                    ""
                };
                format!("{} rows/s{short}{note}", thousands(a))
            }),
        ));
        let cell = |consumer: Option<f64>, histogram: Option<f64>, approx: &str| match consumer {
            Some(c) => format!(
                "{c:.1} ms (relay histogram {approx}{})",
                histogram.map_or("n/a".into(), |h| format!("{h:.1} ms"))
            ),
            None => "failed".into(),
        };
        let p50 = med(&|s| s.lag_ms.p50);
        let p99 = med(&|s| s.lag_ms.p99);
        let max = med(&|s| s.lag_ms.max);
        let (t50, t99) = match rate {
            1000 => (Some(TARGET_LAG_1000_P50_MS), Some(TARGET_LAG_1000_P99_MS)),
            5000 => (None, Some(TARGET_LAG_5000_P99_MS)),
            _ => (None, None),
        };
        for (label, value, hvalue, target, approx) in [
            ("p50", p50, hist(&|h| h.p50), t50, "≈ "),
            ("p99", p99, hist(&|h| h.p99), t99, "≈ "),
            ("max", max, hist(&|h| h.max_le), None, "≤ "),
        ] {
            rows.push(Row {
                figure: format!(
                    "3. Lag at {}/s, created_at → consumer receipt, {label}",
                    thousands(rate as f64)
                ),
                measured: cell(value, hvalue, approx),
                target: target.map_or("–".into(), |t| format!("≤ {t} ms")),
                result: target.map_or(String::new(), |t| verdict(value.map(|v| v <= t))),
            });
        }
        let split =
            |f: &dyn Fn(&SteadyRun) -> Quantiles| match (med(&|s| f(s).p50), med(&|s| f(s).p99)) {
                (Some(p50), Some(p99)) => format!("p50 {p50:.1} ms, p99 {p99:.1} ms"),
                _ => "failed".into(),
            };
        rows.push(info(
            format!(
                "3. Lag at {}/s split at the application's commit: created_at → commit acked / commit acked → consumer",
                thousands(rate as f64)
            ),
            format!(
                "{} / {}",
                split(&|s| s.commit_ms),
                split(&|s| s.after_commit_ms)
            ),
        ));
    }

    // 4. idle.
    if !r.idle.is_empty() {
        let v: Vec<f64> = r
            .idle
            .iter()
            .flatten()
            .map(|i| i.statements_per_s)
            .collect();
        let x: Vec<f64> = r.idle.iter().flatten().map(|i| i.xacts_per_s).collect();
        // Judged on the cumulative counter (transactions in a database only the
        // relay uses; each idle statement is its own transaction); the sampled
        // statement count is the cross-check.
        let m = median(x.clone());
        rows.push(Row {
            figure: format!(
                "4. Idle: SQL statements/s sent by the relay with nothing to do ({:?}): transactions in its own database",
                args.idle_duration
            ),
            measured: m.map_or("failed".into(), |m| {
                format!(
                    "{m:.2}/s{} (statements seen in pg_stat_activity: {}/s)",
                    runs_note(&x),
                    median(v.clone()).map_or("n/a".into(), |v| format!("{v:.2}"))
                )
            }),
            target: format!("≤ {TARGET_IDLE_PER_S}/s"),
            result: verdict(m.map(|m| m <= TARGET_IDLE_PER_S)),
        });
    }

    // 5. footprint over the drains.
    if !r.drain.is_empty() {
        let rss: Vec<f64> = drains
            .iter()
            .map(|d| d.peak_rss_kib as f64 / 1024.0)
            .collect();
        let cpu: Vec<f64> = drains.iter().map(|d| d.cpu_per_10k()).collect();
        let m = median(rss.clone());
        rows.push(Row {
            figure: "5. Relay peak RSS (VmHWM) over a drain".into(),
            measured: m.map_or("failed".into(), |m| {
                format!("{m:.1} MiB{}", runs_note(&rss))
            }),
            target: format!("≤ {TARGET_RSS_MIB} MiB"),
            result: verdict(m.map(|m| m <= TARGET_RSS_MIB)),
        });
        let m = median(cpu.clone());
        rows.push(Row {
            figure: "5. Relay CPU (user+sys) per 10,000 messages over a drain".into(),
            measured: m.map_or("failed".into(), |m| {
                format!("{m:.3} CPU-s{}", runs_note(&cpu))
            }),
            target: format!("≤ {TARGET_CPU_PER_10K} CPU-s"),
            result: verdict(m.map(|m| m <= TARGET_CPU_PER_10K)),
        });
    }

    // 6. growth.
    if !r.growth.is_empty() {
        for &kept in &args.growth_kept {
            let v: Vec<f64> = r
                .growth
                .iter()
                .flatten()
                .filter(|(k, _)| *k == kept)
                .filter_map(|(_, d)| d.as_ref().ok().map(DrainRun::consumed_rate))
                .collect();
            rows.push(info(
                format!(
                    "6. Drain {} with {} published rows kept (→ consumer saw all)",
                    thousands(n as f64),
                    thousands(kept as f64)
                ),
                median(v.clone()).map_or("failed".into(), |m| {
                    format!("{} msg/s{}", thousands(m), runs_note(&v))
                }),
            ));
        }
        if let (Some(&small), Some(&large)) = (args.growth_kept.first(), args.growth_kept.last()) {
            if small != large {
                let ratios: Vec<f64> = r
                    .growth
                    .iter()
                    .filter_map(|run| {
                        let rate = |k: u64| {
                            run.iter()
                                .find(|(kk, _)| *kk == k)
                                .and_then(|(_, d)| d.as_ref().ok())
                                .map(DrainRun::consumed_rate)
                        };
                        Some(rate(large)? / rate(small)?)
                    })
                    .collect();
                let m = median(ratios.clone());
                rows.push(Row {
                    figure: format!(
                        "6. Rate with {} kept / rate with {} kept (same run)",
                        thousands(large as f64),
                        thousands(small as f64)
                    ),
                    measured: m.map_or("no data".into(), |m| {
                        format!("{m:.2}{}", runs_note(&ratios))
                    }),
                    target: format!("≥ {TARGET_GROWTH_RATIO}"),
                    result: verdict(m.map(|m| m >= TARGET_GROWTH_RATIO)),
                });
            }
        }
    }

    let mut out = String::new();
    let _ = writeln!(out, "# outbox-relay benchmark results\n");
    let _ = writeln!(
        out,
        "Measured {} on commit {}. Rerun with `make bench` (knobs: `cargo run --release --bin outbox-bench -- --help`).\n",
        utc_now(),
        git_commit()
    );
    let _ = writeln!(out, "## Machine\n");
    let _ = writeln!(
        out,
        "- CPU: {}; memory {}; Linux {}",
        machine.cpu, machine.memory, machine.kernel
    );
    let _ = writeln!(
        out,
        "- PostgreSQL {} on the same host ({})",
        machine.postgres, machine.postgres_settings
    );
    let _ = writeln!(out, "- RabbitMQ {} on the same host", machine.rabbitmq);
    let _ = writeln!(
        out,
        "- Load average at start {}, at end {} (other work on the machine skews the figures; see \"other\" CPU below)",
        machine.load_start,
        load_average()
    );
    if let Some(share) = other_share(r) {
        let _ = writeln!(
            out,
            "- Other work during the ceiling, drain and growth windows: {:.0}% of the machine's CPU \
             (about 0% on a quiet machine; above ~10% the figures are pessimistic and vary from run to run)",
            share * 100.0
        );
    }
    let _ = writeln!(out, "\n## Workload\n");
    let _ = writeln!(
        out,
        "- Messages of {} bytes, persistent, mandatory, to the durable classic queue `{}` through the default exchange; \
         the bench consumes them (auto-ack) and purges the queue before each phase.",
        args.payload_bytes, args.queue
    );
    let _ = writeln!(
        out,
        "- Relay: `{}` as a child process with its defaults ({}), `OUTBOX_LOG=warn`, one fresh schema per phase \
         (`bench_<phase>_...`, dropped afterwards). Bulk-loaded tables are ANALYZEd and CHECKPOINTed before the relay starts.",
        bench.relay_bin.display(),
        machine.relay_defaults
    );
    let mut runs = Vec::new();
    if !r.ceiling.is_empty() || !r.drain.is_empty() {
        runs.push(format!(
            "ceiling and drain {} each (alternating; ratios within a run)",
            args.runs
        ));
    }
    for (phase, count, ran) in [
        ("steady", args.steady_runs, !r.steady.is_empty()),
        ("idle", args.idle_runs, !r.idle.is_empty()),
        ("growth", args.growth_runs, !r.growth.is_empty()),
    ] {
        if ran {
            runs.push(format!("{phase} {count}"));
        }
    }
    let _ = writeln!(
        out,
        "- Runs: {}. Figures are medians over runs.",
        runs.join(", ")
    );
    let _ = writeln!(
        out,
        "- Steady state: {} connections insert one row per transaction (plain INSERT, autocommit) on a shared schedule for {:?} per rate; \
         lag is created_at → consumer receipt (created_at from the database, matched by message id), and the relay's own \
         `outbox_relay_delivery_lag_seconds` (created_at → broker confirm) interpolated from its buckets over the same window.",
        args.steady_rates
            .iter()
            .map(|&r| format!("{} (at {}/s)", steady_connections(args.steady_connections, r), thousands(r as f64)))
            .collect::<Vec<_>>()
            .join(", "),
        args.steady_duration
    );
    let _ = writeln!(out, "\n## Results\n");
    let _ = writeln!(out, "| Figure | Measured | Target | Result |");
    let _ = writeln!(out, "|---|---|---|---|");
    for row in &rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            row.figure, row.measured, row.target, row.result
        );
    }

    // Details.
    let _ = writeln!(out, "\n## Details\n");
    if !r.ceiling.is_empty() || !r.drain.is_empty() {
        let _ = writeln!(out, "### Ceiling and drain, per run\n");
        let _ = writeln!(
            out,
            "CPU columns are CPU-seconds over the measured window (wall): the relay process, the PostgreSQL backends serving \
             the relay's connections, RabbitMQ (all of it), and the bench (its process and its own backend). \"other\" is the busy \
             CPU of the whole machine not in those columns: other PostgreSQL processes (WAL writer, checkpointer, other \
             clients), kernel threads, and anyone else using the machine.\n"
        );
        let _ = writeln!(
            out,
            "| run | phase | wall s | msg/s → consumer | msg/s → DB 0 pending | first msg s | relay user+sys s | per 10k | peak RSS MiB | relay's PG backends s | rabbitmq s | bench s | other s | notes |"
        );
        let _ = writeln!(
            out,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        let runs = r.ceiling.len().max(r.drain.len());
        for i in 0..runs {
            if let Some(c) = r.ceiling.get(i) {
                match c {
                    Ok(c) => {
                        let other = c.cpu.total_s - c.cpu.rabbitmq_s - c.cpu.bench_s;
                        let _ = writeln!(
                            out,
                            "| {} | ceiling | {:.2} | {} | (confirmed: {}) | | | | | | {:.2} | {:.2} | {:.2} | {} |",
                            i + 1,
                            c.consumed_s,
                            thousands(n as f64 / c.consumed_s),
                            thousands(n as f64 / c.confirmed_s),
                            c.cpu.rabbitmq_s,
                            c.cpu.bench_s,
                            other,
                            if c.not_acked > 0 { format!("{} not acked", c.not_acked) } else { String::new() }
                        );
                    }
                    Err(_) => {
                        let _ = writeln!(
                            out,
                            "| {} | ceiling | failed: see notes | | | | | | | | | | | |",
                            i + 1
                        );
                    }
                }
            }
            if let Some(d) = r.drain.get(i) {
                out.push_str(&drain_row(&format!("{}", i + 1), "drain", d));
            }
        }
    }
    if !r.steady.is_empty() {
        let _ = writeln!(out, "\n### Steady state, per run\n");
        let _ = writeln!(
            out,
            "| rate asked | connections | rows inserted | rate reached | lag p50 / p99 / max ms (created_at → consumer) | of which created_at → commit acked | commit acked → consumer | relay lag histogram p50 / p99 / max ≤ ms (count) | relay confirm_duration p50 / p99 ms | rows per claim (mean) | relay CPU % | duplicates | notes |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for (rate, s) in &r.steady {
            match s {
                Ok(s) => {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.0} | {} | {} |",
                        thousands(*rate as f64),
                        steady_connections(args.steady_connections, *rate),
                        thousands(s.inserted as f64),
                        thousands(s.insert_rate),
                        s.lag_ms,
                        s.commit_ms,
                        s.after_commit_ms,
                        s.hist_ms.map_or("n/a".into(), |h| format!(
                            "{:.1} / {:.1} / {} ({})",
                            h.p50,
                            h.p99,
                            if h.max_le.is_finite() {
                                format!("{:.0}", h.max_le)
                            } else {
                                "+Inf".into()
                            },
                            h.count
                        )),
                        s.confirm_ms
                            .map_or("n/a".into(), |h| format!("{:.1} / {:.1}", h.p50, h.p99)),
                        s.mean_batch,
                        s.relay_cpu_pct,
                        s.duplicates,
                        s.stop_note.clone().unwrap_or_default()
                    );
                }
                Err(_) => {
                    let _ = writeln!(
                        out,
                        "| {} | failed: see notes | | | | | | | | | | | |",
                        thousands(*rate as f64)
                    );
                }
            }
        }
    }
    if !r.idle.is_empty() {
        let _ = writeln!(out, "\n### Idle, per run\n");
        for (i, run) in r.idle.iter().enumerate() {
            match run {
                Ok(idle) => {
                    let _ = writeln!(
                        out,
                        "- run {}: {:.2} statements/s, {:.2} transactions/s over {:.1} s (transaction baseline {:.2}/s subtracted); method: {}{}",
                        i + 1,
                        idle.statements_per_s,
                        idle.xacts_per_s,
                        idle.window_s,
                        idle.baseline_per_s,
                        idle.method,
                        idle.stop_note.as_ref().map_or(String::new(), |n| format!("; {n}"))
                    );
                }
                Err(_) => {
                    let _ = writeln!(out, "- run {}: failed, see notes", i + 1);
                }
            }
        }
    }
    if !r.growth.is_empty() {
        let _ = writeln!(out, "\n### Growth, per run\n");
        let _ = writeln!(
            out,
            "| run | kept | wall s | msg/s → consumer | msg/s → DB 0 pending | first msg s | relay user+sys s | per 10k | peak RSS MiB | relay's PG backends s | rabbitmq s | bench s | other s | notes |"
        );
        let _ = writeln!(
            out,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for (i, run) in r.growth.iter().enumerate() {
            for (kept, d) in run {
                out.push_str(&drain_row(
                    &format!("{}", i + 1),
                    &thousands(*kept as f64),
                    d,
                ));
            }
        }
    }

    let mut notes = Vec::new();
    let mut note =
        |what: String, e: &String| notes.push(format!("- {what}: {}", e.replace('\n', "\n  ")));
    for (i, c) in r.ceiling.iter().enumerate() {
        if let Err(e) = c {
            note(format!("ceiling run {} failed", i + 1), e);
        }
    }
    for (i, d) in r.drain.iter().enumerate() {
        match d {
            Err(e) => note(format!("drain run {} failed", i + 1), e),
            Ok(d) => {
                if let Some(s) = &d.stop_note {
                    note(format!("drain run {}", i + 1), s);
                }
            }
        }
    }
    for (rate, s) in &r.steady {
        if let Err(e) = s {
            note(format!("steady {rate}/s failed"), e);
        }
    }
    for (i, s) in r.idle.iter().enumerate() {
        if let Err(e) = s {
            note(format!("idle run {} failed", i + 1), e);
        }
    }
    for (i, run) in r.growth.iter().enumerate() {
        for (kept, d) in run {
            if let Err(e) = d {
                note(format!("growth run {} with {kept} kept failed", i + 1), e);
            }
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(out, "\n### Failures and notes\n");
        for n in notes {
            let _ = writeln!(out, "{n}");
        }
    }
    out
}

/// Busy CPU of everything not measured (other users, kernel threads, other
/// PostgreSQL processes) over the ceiling, drain and growth windows, as a share
/// of the machine.
fn other_share(r: &Results) -> Option<f64> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let mut other = 0.0;
    let mut capacity = 0.0;
    for c in r.ceiling.iter().flatten() {
        other += c.cpu.total_s - c.cpu.rabbitmq_s - c.cpu.bench_s;
        capacity += c.cpu.wall_s * cores;
    }
    let growth = r
        .growth
        .iter()
        .flatten()
        .filter_map(|(_, d)| d.as_ref().ok());
    for d in r.drain.iter().flatten().chain(growth) {
        other += d.cpu.total_s
            - d.cpu.relay_pg_s
            - d.cpu.rabbitmq_s
            - d.cpu.bench_s
            - d.relay_user_s
            - d.relay_sys_s;
        capacity += d.cpu.wall_s * cores;
    }
    (capacity > 0.0).then(|| (other / capacity).max(0.0))
}

fn drain_row(run: &str, phase: &str, d: &Result<DrainRun, String>) -> String {
    match d {
        Ok(d) => {
            let other = d.cpu.total_s
                - d.cpu.relay_pg_s
                - d.cpu.rabbitmq_s
                - d.cpu.bench_s
                - d.relay_user_s
                - d.relay_sys_s;
            let mut notes = Vec::new();
            if d.duplicates > 0 {
                notes.push(format!("{} duplicate deliveries", d.duplicates));
            }
            if let Some(s) = &d.stop_note {
                notes.push(s.clone());
            }
            format!(
                "| {run} | {phase} | {:.2} | {} | {} | {:.2} | {:.2} + {:.2} | {:.3} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {} |\n",
                d.cpu.wall_s,
                thousands(d.consumed_rate()),
                thousands(d.db_rate()),
                d.first_s,
                d.relay_user_s,
                d.relay_sys_s,
                d.cpu_per_10k(),
                d.peak_rss_kib as f64 / 1024.0,
                d.cpu.relay_pg_s,
                d.cpu.rabbitmq_s,
                d.cpu.bench_s,
                other,
                notes.join("; ")
            )
        }
        Err(_) => format!("| {run} | {phase} | failed: see notes | | | | | | | | | | | |\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_interpolate_within_buckets() {
        let before = vec![(0.001, 0), (0.002, 0), (0.004, 0), (f64::INFINITY, 0)];
        let after = vec![(0.001, 50), (0.002, 90), (0.004, 100), (f64::INFINITY, 100)];
        let h = hist_quantiles(&before, &after).unwrap();
        assert_eq!(h.count, 100);
        assert!((h.p50 - 0.001).abs() < 1e-9, "{}", h.p50);
        assert!((h.p99 - 0.0038).abs() < 1e-9, "{}", h.p99);
        assert_eq!(h.max_le, 0.004);
    }

    #[test]
    fn metrics_text_is_parsed() {
        let text = "# TYPE x histogram\nx_bucket{le=\"0.001\"} 3\nx_bucket{le=\"+Inf\"} 4\nx_count 4\nouts 7\nout 2\n";
        assert_eq!(
            histogram_buckets(text, "x"),
            vec![(0.001, 3), (f64::INFINITY, 4)]
        );
        assert_eq!(metric(text, "out"), Some(2.0));
    }

    #[test]
    fn helpers() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        assert_eq!(
            with_database("postgres://u@h:5432/test?sslmode=disable", "x").unwrap(),
            "postgres://u@h:5432/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h", "x").unwrap(),
            "postgres://h/x"
        );
        let mut p = Vec::new();
        fill_payload(&mut p, 42, 6);
        assert_eq!(p, b"42....");
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
