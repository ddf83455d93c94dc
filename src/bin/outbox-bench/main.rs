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
//! 7. scale: drain rate with one, two and three relays sharing the partitions.
//! 8. app: what the outbox costs the application: pgbench inserting into the
//!    outbox table and into a copy without the relay's objects, same run;
//! 9. keyed: sustained keyed load (pgbench, 8-row transactions, topic exchange),
//!    age of the oldest pending row sampled every 100 ms;
//! 10. cold: a just-filled keyed backlog drained, against the bare publisher
//!     with the same routing keys, with and without a consumer.
//!
//! `cargo run --release --bin outbox-bench -- --help` lists the knobs.

// The bench times real processes: the real clock is what it needs.
#![allow(clippy::disallowed_types)]

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

use bench::Bench;
use render::render;
use results::Results;

static START: OnceLock<Instant> = OnceLock::new();

/// Progress on stderr, stamped with the seconds since the bench started.
macro_rules! progress {
    ($($arg:tt)*) => {{
        let t = $crate::START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs_f64();
        eprintln!("[{t:6.1}s] {}", format_args!($($arg)*));
    }};
}

// After the macro, so that the modules can use it.
mod bench;
mod consumer;
mod relay_proc;
mod render;
mod results;
mod sysinfo;
mod util;

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
const TARGET_APP_TPS_RATIO: f64 = 0.90;
const TARGET_APP_LATENCY_RATIO: f64 = 1.5;
const TARGET_KEYED_AGE_P99_MS: f64 = 250.0;
const TARGET_KEYED_AGE_MAX_MS: f64 = 1000.0;
const TARGET_KEYED_UNPACED_AGE_P99_MS: f64 = 1000.0;
const TARGET_COLD_RATIO: f64 = 0.85;
const TARGET_CLAIM_P99_MS: f64 = 50.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Phase {
    Ceiling,
    Drain,
    Steady,
    Idle,
    Growth,
    Scale,
    App,
    Keyed,
    Cold,
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
        default_value = "ceiling,drain,steady,idle,growth,scale,app,keyed,cold"
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
    /// Relay counts of the scale-out phase, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    scale_relays: Vec<usize>,
    /// Runs of the scale-out phase (each run covers every relay count).
    #[arg(long, default_value_t = 1)]
    scale_runs: usize,
    /// Unconfirmed publishes at most in the ceiling publisher.
    #[arg(long, default_value_t = 2000)]
    ceiling_window: usize,
    /// Steady-state insert rates (rows/s), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    steady_rates: Vec<u64>,
    /// How long each steady-state rate is held.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    steady_duration: Duration,
    /// Application connections inserting concurrently in the steady state, one
    /// per steady rate in order (0 = one per 50 rows/s, at least 8 and at most 32).
    #[arg(long, value_delimiter = ',', default_value = "4,32")]
    steady_connections: Vec<usize>,
    /// How long the idle relay is observed (from 5 s after it drained a backlog).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    idle_duration: Duration,
    /// Rows the relay drains just before the idle window.
    #[arg(long, default_value_t = 10_000)]
    idle_drain_rows: u64,
    /// Published rows kept in the table during the growth drains, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,1000000")]
    growth_kept: Vec<u64>,
    /// Durable queue the messages go to (through the default exchange).
    #[arg(long, default_value = "outbox_bench")]
    queue: String,
    /// Topic exchange of the app, keyed and cold phases (declared by the bench,
    /// bound to the queue with '#').
    #[arg(long, default_value = "outbox_bench_topic")]
    exchange: String,
    /// pgbench clients of the application-cost phase.
    #[arg(long, default_value_t = 20)]
    app_clients: usize,
    /// How long each side of each application-cost comparison runs.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    app_duration: Duration,
    /// Rows per transaction of the application-cost multi-row comparison.
    #[arg(long, default_value_t = 8)]
    app_rows: usize,
    /// Single-row transactions/s of the application-cost latency comparison.
    #[arg(long, default_value_t = 1000)]
    app_rate: u64,
    /// pgbench clients of the keyed phase.
    #[arg(long, default_value_t = 16)]
    keyed_clients: usize,
    /// Rows per transaction of the keyed phase.
    #[arg(long, default_value_t = 8)]
    keyed_rows: usize,
    /// Transactions/s of the keyed phase's paced load.
    #[arg(long, default_value_t = 200)]
    keyed_rate: u64,
    #[arg(long, default_value = "45s", value_parser = humantime::parse_duration)]
    keyed_paced_duration: Duration,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    keyed_unpaced_duration: Duration,
    /// Partition keys and routing keys of the app and keyed phases' rows.
    #[arg(long, default_value_t = 10_000)]
    keyed_partition_keys: u32,
    #[arg(long, default_value_t = 100)]
    keyed_routing_keys: u32,
    /// Rows of the cold backlog, and its partition keys and routing keys.
    #[arg(long, default_value_t = 100_000)]
    cold_rows: u64,
    #[arg(long, default_value_t = 1000)]
    cold_partition_keys: u64,
    #[arg(long, default_value_t = 1000)]
    cold_routing_keys: u64,
    /// A cold drain still pending after this long fails (with the rate so far).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    cold_timeout: Duration,
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
    if has(Phase::Scale) {
        let runs = bench.args.scale_runs.max(1);
        for run in 1..=runs {
            let mut counts = Vec::new();
            for &relays in &bench.args.scale_relays {
                progress!(
                    "scale run {run}/{runs}: {} rows drained by {relays} relay(s)",
                    bench.args.messages
                );
                let r = bench.scale_once(relays, run).await;
                report_run("scale", run, &r);
                counts.push((relays, r.map_err(|e| format!("{e:#}"))));
            }
            results.scale.push(counts);
        }
    }
    if has(Phase::App) {
        progress!(
            "app: pgbench {} clients into the outbox and into a copy, {:?} per side",
            bench.args.app_clients,
            bench.args.app_duration
        );
        let (app, claims, notes) = bench.app_phase().await;
        results.app = app;
        results.app_claims = claims;
        results.app_notes = notes;
    }
    if has(Phase::Keyed) {
        progress!(
            "keyed: pgbench {} clients, {}-row transactions, {}/s for {:?} then unpaced for {:?}",
            bench.args.keyed_clients,
            bench.args.keyed_rows,
            bench.args.keyed_rate,
            bench.args.keyed_paced_duration,
            bench.args.keyed_unpaced_duration
        );
        let r = bench.keyed_once(1).await;
        report_run("keyed", 1, &r);
        results.keyed.push(r.map_err(|e| format!("{e:#}")));
    }
    if has(Phase::Cold) {
        for with_consumer in [true, false] {
            progress!(
                "cold: {} keyed rows, bare publisher then relay, {}",
                bench.args.cold_rows,
                if with_consumer {
                    "with a consumer"
                } else {
                    "no consumer"
                }
            );
            let r = bench.cold_once(with_consumer).await;
            progress!("cold: {r:?}");
            results.cold.push(r);
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

impl Args {
    /// Application connections of the steady state at `rate`.
    fn steady_connections_at(&self, rate: u64) -> usize {
        let asked = self
            .steady_rates
            .iter()
            .position(|&r| r == rate)
            .and_then(|i| self.steady_connections.get(i).copied());
        util::steady_connections(asked, rate)
    }
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
