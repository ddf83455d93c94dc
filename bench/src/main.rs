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
//! 11. backlog: a backlog written while the relay was down, on a table with
//!     history, a snapshot held open, the application still writing: drain
//!     rate, catch-up time, the application's rate and latency, claim p99, WAL
//!     per row (`make bench PHASES=backlog`; sizes: `--backlog-*`);
//!     backlog-private: the same on a private PostgreSQL the bench starts with
//!     initdb (default settings, autovacuum on).
//! 13. pooled: the relay through a private PgBouncer in transaction mode
//!     (`--listen false`) beside the same relay direct, in one run: drain of
//!     an unkeyed backlog vs the bare publisher, lag at 1,000 rows/s, idle
//!     statements and transactions per second (`make bench PHASES=pooled`).
//!
//! `cargo run --release -p outbox-bench -- --help` lists the knobs; `--phases`
//! (`make bench PHASES=steady,idle`) runs a selection.
//!
//! Layout, from the ground up; no module imports one above it:
//! `util`, `progress`, `targets`; `results` (plain data) and `args`;
//! `metrics` (the relay's metrics text) and `sysinfo` (/proc); `relay` (the
//! relay as a child process); `consumer`; `private_pg` and `private_pooler`
//! (a PostgreSQL and a PgBouncer a phase starts and removes); `phases/` (one
//! file per phase, each an `impl Bench` block); `render/` (the report, read
//! from `Results`); `main` (runs the selected phases and writes the report).

// The bench times real processes: the real clock is what it needs.
#![allow(clippy::disallowed_types)]

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use clap::Parser;

use args::{Args, Phase};
use phases::Bench;
use render::render;
use results::Results;

// First, so that every later module can use `progress!`.
#[macro_use]
mod progress;

mod args;
mod consumer;
mod metrics;
mod phases;
mod private_pg;
mod private_pooler;
mod relay;
mod render;
mod results;
mod sysinfo;
mod targets;
mod util;

fn main() -> ExitCode {
    progress::START.get_or_init(Instant::now);
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
    if has(Phase::Backlog) {
        progress!(
            "backlog: {} rows written while the relay is down, on {} relayed rows, a snapshot held open, the application writing {} rows/s",
            bench.args.backlog_rows,
            bench.args.backlog_history_rows,
            bench.args.backlog_app_rate
        );
        let r = bench.backlog_once().await;
        report_run("backlog", 1, &r);
        results.backlog.push(r.map_err(|e| format!("{e:#}")));
    }
    if has(Phase::BacklogPrivate) {
        progress!(
            "backlog-private: the backlog phase on a private PostgreSQL (initdb, default settings)"
        );
        let r = backlog_private(&bench).await;
        report_run("backlog-private", 1, &r);
        results
            .backlog_private
            .push(r.map_err(|e| format!("{e:#}")));
    }
    if has(Phase::Pooled) {
        progress!(
            "pooled: the relay direct and through a private PgBouncer (transaction mode, {} server connections, --listen false --poll-interval {:?}): drain vs ceiling, lag at {}/s, idle",
            bench.args.pooled_pool_size,
            bench.args.pooled_poll_interval,
            bench.args.pooled_rate
        );
        let r = bench.pooled_once().await;
        if let Err(e) = &r {
            progress!("pooled FAILED: {e:#}");
        }
        results.pooled.push(r.map_err(|e| format!("{e:#}")));
    }
    bench.cleanup().await;

    let report = render(&bench, &machine, &results);
    println!("{report}");
    let output = bench
        .args
        .output
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("RESULTS.md"));
    if let Some(dir) = output.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&output, &report).with_context(|| format!("writing {}", output.display()))?;
    progress!("results written to {}", output.display());
    Ok(results.all_ok())
}

/// The backlog phase on a private PostgreSQL the bench starts and removes.
async fn backlog_private(bench: &Bench) -> Result<results::BacklogRun> {
    let pg = private_pg::PrivatePostgres::start(&bench.log_dir.join("private-pg"))?;
    let args = Args {
        database_url: pg.url(),
        ..bench.args.clone()
    };
    let private = Bench::connect(args, bench.relay.path.clone()).await?;
    let r = private.backlog_once().await;
    drop(private);
    drop(pg);
    r
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
    // The workspace root: the bench's package is its `bench/` member.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("locating the workspace root")?;
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let release_dir = match exe.parent() {
        Some(dir) if dir.file_name().is_some_and(|n| n == "release") => dir.to_path_buf(),
        _ => {
            progress!("warning: outbox-bench is not a release build; use cargo run --release");
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"))
                .join("release")
        }
    };
    if !args.no_build {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        progress!("building the relay: cargo build --release -p outbox-relay --bin outbox-relay");
        let status = Command::new(cargo)
            .args([
                "build",
                "--release",
                "-p",
                "outbox-relay",
                "--bin",
                "outbox-relay",
            ])
            .current_dir(root)
            .stdin(Stdio::null())
            .status()
            .context("running cargo build (pass --no-build or --relay-bin to skip)")?;
        if !status.success() {
            bail!("cargo build --release -p outbox-relay --bin outbox-relay failed ({status})");
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
