//! The report: the markdown written to stdout and bench/RESULTS.md.

use std::fmt::Write as _;

use crate::{
    phases::{machine::Machine, Bench, QUIET_BEFORE_S},
    results::Results,
    sysinfo::load_average,
    util::{git_commit, thousands, utc_now},
};

mod details;
mod load;
mod pooled;
mod summary;

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

pub(crate) fn render(bench: &Bench, machine: &Machine, r: &Results) -> String {
    let args = &bench.args;
    let rows = summary::rows(args, r);

    let mut out = String::new();
    let _ = writeln!(out, "# outbox-relay benchmark results\n");
    let _ = writeln!(
        out,
        "Measured {} on commit {}. Rerun with `make bench` (one phase: `make bench PHASES=steady`; knobs: `cargo run --release -p outbox-bench -- --help`).\n",
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
        bench.relay.path.display(),
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
        ("scale", args.scale_runs, !r.scale.is_empty()),
        ("app", 1, !r.app.is_empty()),
        ("keyed", r.keyed.len(), !r.keyed.is_empty()),
        ("cold", r.cold.len() / 2, !r.cold.is_empty()),
        ("backlog", r.backlog.len(), !r.backlog.is_empty()),
        (
            "backlog-private",
            r.backlog_private.len(),
            !r.backlog_private.is_empty(),
        ),
        ("pooled", r.pooled.len(), !r.pooled.is_empty()),
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
            .map(|&r| format!("{} (at {}/s)", args.steady_connections_at(r), thousands(r as f64)))
            .collect::<Vec<_>>()
            .join(", "),
        args.steady_duration
    );
    if !r.idle.is_empty() {
        let _ = writeln!(
            out,
            "- Idle: the relay, in a database of its own, drains {} single-row pending rows (default exchange, no keys); \
             from {QUIET_BEFORE_S} s after the database shows none pending, its transactions are counted for {:?}.",
            thousands(args.idle_drain_rows as f64),
            args.idle_duration
        );
    }
    let keys = format!(
        "partition_key out of {} (`key-N`, random), routing_key out of {} (`rk.N`, random), a 200-byte payload, \
         exchange `{}` (topic, durable, bound to the queue with `#`)",
        thousands(f64::from(args.keyed_partition_keys)),
        args.keyed_routing_keys,
        args.exchange
    );
    if !r.app.is_empty() {
        let _ = writeln!(
            out,
            "- Application cost: `pgbench` (another process, `--protocol=prepared`, {} clients, 2 threads) runs custom scripts \
             inserting rows with {keys}. Each comparison runs {:?} into `messages` and {:?} into `messages_copy` \
             (`LIKE messages INCLUDING ALL`: same columns, defaults, constraints and indexes, none of the relay's triggers), \
             back to back in the same run, the first side alternating between comparisons; the release relay runs throughout \
             (publishing the outbox rows, a consumer on the queue) and the next side starts only once nothing is pending. \
             Comparisons: single-row transactions (one autocommit INSERT) as fast as PostgreSQL accepts them; {}-row \
             transactions ({} INSERT statements between BEGIN and COMMIT, one per event, as an application enqueuing per \
             event writes them) as fast as accepted; single-row transactions paced at {}/s (`-R`), where pgbench's latency \
             average counts from each transaction's scheduled start.",
            args.app_clients,
            args.app_duration,
            args.app_duration,
            args.app_rows,
            args.app_rows,
            thousands(args.app_rate as f64)
        );
    }
    if !r.keyed.is_empty() {
        let _ = writeln!(
            out,
            "- Keyed load: `pgbench` {} clients, transactions of {} INSERTs (BEGIN … COMMIT) with {keys}, consumer running; \
             paced at {} transactions/s ({} rows/s) for {:?}, then (once nothing is pending) unpaced for {:?}. A separate \
             connection samples every 100 ms the age of the first pending row by id (published_at and dead_lettered_at \
             NULL; 0 when none), searching from the one the last sample found (not through the dead entries of every row relayed); \"nothing pending 1 s after\" counts pending rows 1 s after pgbench exits.",
            args.keyed_clients,
            args.keyed_rows,
            args.keyed_rate,
            thousands((args.keyed_rate * args.keyed_rows as u64) as f64),
            args.keyed_paced_duration,
            args.keyed_unpaced_duration
        );
    }
    if !r.cold.is_empty() {
        let _ = writeln!(
            out,
            "- Cold keyed backlog: one INSERT … SELECT fills a fresh `messages` with {} rows over {} partition keys and {} routing \
             keys (row i: `key-(i·7919 mod {})`, `rk.(i·6151 mod {})`, {}-byte payload) to exchange `{}`; no ANALYZE, no \
             CHECKPOINT; the relay starts at once and the figure is relay start → the database shows 0 pending. The bare side \
             is the ceiling publisher (confirms, window {}) sending the same routing keys to the same exchange, timed to the \
             last confirm. Run once with a consumer on the queue and once without (messages pile up; the queue is purged \
             before each side).",
            thousands(args.cold_rows as f64),
            thousands(args.cold_partition_keys as f64),
            thousands(args.cold_routing_keys as f64),
            args.cold_partition_keys,
            args.cold_routing_keys,
            args.payload_bytes,
            args.exchange,
            args.ceiling_window
        );
    }
    if !r.backlog.is_empty() || !r.backlog_private.is_empty() {
        let _ = writeln!(
            out,
            "- Backlog after an outage: the bare publisher first sends {} messages to `{}` (routing keys `rk.1`…`rk.{}`, a consumer on \
             the queue). Then a fresh `messages` gets {} rows (one INSERT … SELECT) that a relay publishes (the table's history, \
             no VACUUM, no ANALYZE); the relay stops and another session opens a REPEATABLE READ transaction that runs one SELECT \
             and stays open to the end. `pgbench` ({} clients, unpaced) writes {} rows in {}-row transactions over {} partition keys \
             (the outage); the application (the bench's own {} connections on a shared schedule, {}-row transactions on random keys) \
             writes {} rows/s from then on, measured {:?} with the relay stopped. A relay starts on everything pending; \
             every 200 ms the age of the first pending row by id is sampled (searched from the one the last sample found, so the \
             sampler does not walk the dead entries of every relayed row), and \"current again\" is the first sample ≤ 2 s. \
             Drain rate: the relay's `messages_published_total` at that moment over the time since its start. The application's \
             latency counts from each transaction's scheduled start. WAL: `pg_current_wal_lsn()` differences (the whole server's \
             WAL): the outage's inserts per row; during the drain, less the application's rows at the insert's bytes, per message \
             published; then a relay with `--retention 1s` until no published row is left, per row deleted. `backlog-private` runs \
             the same on a PostgreSQL cluster the bench makes with `initdb` (from `pg_config --bindir`, default settings, \
             autovacuum on) on a free port of 127.0.0.1 and removes afterwards.",
            thousands(args.backlog_rows as f64),
            args.exchange,
            args.keyed_routing_keys,
            thousands(args.backlog_history_rows as f64),
            args.backlog_writers,
            thousands(args.backlog_rows as f64),
            args.backlog_rows_per_tx,
            thousands(f64::from(args.backlog_partition_keys)),
            4,
            args.backlog_rows_per_tx,
            args.backlog_app_rate,
            args.backlog_app_window
        );
    }
    if !r.pooled.is_empty() {
        let _ = writeln!(
            out,
            "- Pooled (issue 20): the bench starts a PgBouncer of its own (`scripts/pgbouncer.sh`, transaction mode, {} server \
             connections, no prepared statement support) on a free port in front of the same PostgreSQL, and runs in one go: the \
             bare publisher ({} messages); the drain of {} unkeyed pending rows (as the drain phase) by a relay connected directly, \
             then by one connected through the pooler with `--listen false --poll-interval {}`; the steady state at {} rows/s for \
             {:?} (the application always connects directly) with each relay; the idle relay (as the idle phase, in a database of \
             its own) with each. Through the pooler the idle figures also give PgBouncer's `SHOW STATS` for that database. The \
             bench's own reads and the migrations go direct.",
            args.pooled_pool_size,
            thousands(args.messages as f64),
            thousands(args.messages as f64),
            humantime::format_duration(args.pooled_poll_interval),
            thousands(args.pooled_rate as f64),
            args.steady_duration
        );
    }
    let _ = writeln!(
        out,
        "- Claim statement duration: the relay's `outbox_relay_claim_duration_seconds` histogram (the claim statement alone, \
         timed from the answer of the marks sent before it in the same round trip; buckets from 0.1 ms, doubling), \
         scraped before and after each measured window, p99 interpolated inside the buckets."
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

    details::write(&mut out, args, r);
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
