//! Results: what each phase's run measured. Plain data: nothing here reaches
//! into the phases or the report.

use crate::util::quantile;

/// A phase's result that keeps how its relay stopped (see `Bench::conclude`).
pub(crate) trait StopNoted {
    fn set_stop_note(&mut self, note: Option<String>);
}

macro_rules! stop_noted {
    ($($run:ty),*) => {$(
        impl StopNoted for $run {
            fn set_stop_note(&mut self, note: Option<String>) {
                self.stop_note = note;
            }
        }
    )*};
}
stop_noted!(DrainRun, SteadyRun, KeyedRun, ColdDrain, BacklogRun);

/// What pgbench (the application's load) reported.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoadRun {
    pub(crate) transactions: u64,
    pub(crate) failed: u64,
    /// Committed transactions per second, without connection time.
    pub(crate) tps: f64,
    /// Average transaction latency; with -R, measured from the scheduled start,
    /// so it includes the schedule lag.
    pub(crate) latency_ms: f64,
    /// With -R: the average wait between the scheduled and the actual start.
    pub(crate) schedule_lag_ms: Option<f64>,
}

#[derive(Debug, Clone)]
pub(crate) struct CeilingRun {
    pub(crate) confirmed_s: f64,
    pub(crate) consumed_s: f64,
    pub(crate) not_acked: u64,
    pub(crate) cpu: CpuUse,
}

#[derive(Debug, Clone)]
pub(crate) struct DrainRun {
    pub(crate) messages: u64,
    pub(crate) first_s: f64,
    pub(crate) consumed_s: f64,
    pub(crate) db_zero_s: f64,
    pub(crate) relay_user_s: f64,
    pub(crate) relay_sys_s: f64,
    pub(crate) peak_rss_kib: u64,
    pub(crate) duplicates: u64,
    pub(crate) cpu: CpuUse,
    pub(crate) claims: Option<ClaimStats>,
    pub(crate) stop_note: Option<String>,
}

/// Phase 7: one drain shared by several relays.
#[derive(Debug, Clone)]
pub(crate) struct ScaleRun {
    pub(crate) messages: u64,
    /// Relays started → partitions fairly split.
    pub(crate) split_s: f64,
    /// Rows committed → consumer saw all.
    pub(crate) drain_s: f64,
    /// Each relay's messages_published_total.
    pub(crate) per_relay: Vec<u64>,
    pub(crate) duplicates: u64,
}

impl ScaleRun {
    pub(crate) fn rate(&self) -> f64 {
        self.messages as f64 / self.drain_s
    }
}

#[derive(Debug, Clone)]
pub(crate) struct SteadyRun {
    pub(crate) inserted: u64,
    pub(crate) insert_rate: f64,
    pub(crate) lag_ms: Quantiles,
    /// created_at → the application's commit acknowledged.
    pub(crate) commit_ms: Quantiles,
    /// The application's commit acknowledged → consumer receipt.
    pub(crate) after_commit_ms: Quantiles,
    pub(crate) hist_ms: Option<HistQuantiles>,
    pub(crate) confirm_ms: Option<HistQuantiles>,
    pub(crate) connections: usize,
    pub(crate) claims: Option<ClaimStats>,
    pub(crate) mean_batch: f64,
    pub(crate) relay_cpu_pct: f64,
    pub(crate) duplicates: u64,
    pub(crate) stop_note: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct IdleRun {
    pub(crate) method: String,
    /// Statements the relay's connections started, per second (pg_stat_activity sampled).
    pub(crate) statements_per_s: f64,
    /// Transactions counted in pg_stat_database for the database, minus the baseline.
    pub(crate) xacts_per_s: f64,
    pub(crate) baseline_per_s: f64,
    pub(crate) window_s: f64,
    /// Rows drained just before the window (the window starts `QUIET_BEFORE_S` after).
    pub(crate) drained: u64,
    pub(crate) claims: Option<ClaimStats>,
    /// Through a pooler: what its `SHOW STATS` counted over the window.
    pub(crate) pooler: Option<PoolerRates>,
    pub(crate) stop_note: Option<String>,
}

/// Transactions and queries per second a pooler passed on for one database.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolerRates {
    pub(crate) xacts_per_s: f64,
    pub(crate) queries_per_s: f64,
}

/// The pooled phase (issue 20): the same relay direct and through a private
/// PgBouncer in transaction mode (`--listen false`), in one run.
#[derive(Debug, Clone)]
pub(crate) struct PooledRun {
    pub(crate) pool_size: usize,
    /// The pooled relay's `--poll-interval`.
    pub(crate) poll_interval: std::time::Duration,
    /// The bare publisher, same run.
    pub(crate) ceiling: Result<CeilingRun, String>,
    pub(crate) drain_direct: Result<DrainRun, String>,
    pub(crate) drain_pooled: Result<DrainRun, String>,
    /// The steady state at the phase's rate (1,000 rows/s by default).
    pub(crate) rate: u64,
    pub(crate) lag_direct: Result<SteadyRun, String>,
    pub(crate) lag_pooled: Result<SteadyRun, String>,
    pub(crate) idle_direct: Result<IdleRun, String>,
    pub(crate) idle_pooled: Result<IdleRun, String>,
}

impl PooledRun {
    pub(crate) fn all_ok(&self) -> bool {
        self.ceiling.is_ok()
            && self.drain_direct.is_ok()
            && self.drain_pooled.is_ok()
            && self.lag_direct.is_ok()
            && self.lag_pooled.is_ok()
            && self.idle_direct.is_ok()
            && self.idle_pooled.is_ok()
    }
}

/// The relay's claim statement durations over a window, from its
/// `outbox_relay_claim_duration_seconds` histogram.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClaimStats {
    pub(crate) count: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    /// Upper bound of the highest bucket that received an observation (+Inf
    /// when a claim took longer than the last finite bucket).
    pub(crate) max_le_ms: f64,
    pub(crate) last_bucket_ms: f64,
    /// Claims longer than the last finite bucket: the ones that ran into the
    /// server's statement timeout are among them.
    pub(crate) beyond_last_bucket: u64,
}

/// Application cost: which comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AppKind {
    /// Single-row transactions, as fast as PostgreSQL accepts them.
    SingleRow,
    /// Transactions of several rows, as fast as PostgreSQL accepts them.
    MultiRow,
    /// Single-row transactions paced to a fixed rate: latency.
    Paced,
    /// Single-row transactions with the relay stopped: what the relay's
    /// objects (trigger, indexes) cost on their own.
    SingleRowRelayStopped,
    /// Transactions of several rows with the relay stopped.
    MultiRowRelayStopped,
}

/// One side of an application-cost comparison (the outbox table, or its copy).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AppSide {
    pub(crate) load: LoadRun,
    /// Pending rows when pgbench ended, and seconds until none were (outbox side).
    pub(crate) pending_at_end: i64,
    pub(crate) catch_up_s: f64,
    pub(crate) claims: Option<ClaimStats>,
    pub(crate) relay_cpu_pct: f64,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct AppCompare {
    pub(crate) messages: AppSide,
    pub(crate) copy: AppSide,
    /// The outbox side ran first.
    pub(crate) messages_first: bool,
}

impl AppCompare {
    pub(crate) fn tps_ratio(&self) -> f64 {
        self.messages.load.tps / self.copy.load.tps
    }
    pub(crate) fn latency_ratio(&self) -> f64 {
        self.messages.load.latency_ms / self.copy.load.latency_ms
    }
}

/// Sustained keyed load: one pgbench run with the oldest pending row's age sampled.
#[derive(Debug, Clone)]
pub(crate) struct KeyedLoad {
    pub(crate) load: LoadRun,
    pub(crate) rows_per_tx: usize,
    pub(crate) samples: usize,
    pub(crate) age_p50_ms: f64,
    pub(crate) age_p99_ms: f64,
    pub(crate) age_max_ms: f64,
    /// Pending rows 1 s after pgbench ended.
    pub(crate) pending_1s_after: i64,
    /// Seconds from pgbench's end until nothing was pending.
    pub(crate) zero_after_s: f64,
    pub(crate) claims: Option<ClaimStats>,
    pub(crate) relay_cpu_pct: f64,
}

impl KeyedLoad {
    pub(crate) fn rows_per_s(&self) -> f64 {
        self.load.tps * self.rows_per_tx as f64
    }
}

#[derive(Debug, Clone)]
pub(crate) struct KeyedRun {
    pub(crate) paced: Result<KeyedLoad, String>,
    pub(crate) unpaced: Result<KeyedLoad, String>,
    /// Messages delivered to the consumer / rows written, over both loads.
    pub(crate) delivered: u64,
    pub(crate) rows: u64,
    pub(crate) duplicates: u64,
    pub(crate) stop_note: Option<String>,
}

/// Cold keyed backlog: the relay's drain of a just-filled table.
#[derive(Debug, Clone)]
pub(crate) struct ColdDrain {
    /// Seconds to fill the table (one INSERT ... SELECT) before the relay started.
    pub(crate) fill_s: f64,
    /// Relay start → the database shows 0 pending.
    pub(crate) db_zero_s: f64,
    /// Relay start → the consumer saw all (with a consumer).
    pub(crate) consumed_s: Option<f64>,
    /// Messages in the queue afterwards (without a consumer).
    pub(crate) queued: Option<u32>,
    pub(crate) claims: Option<ClaimStats>,
    pub(crate) stop_note: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct ColdRun {
    pub(crate) consumer: bool,
    pub(crate) bare: Result<CeilingRun, String>,
    pub(crate) drain: Result<ColdDrain, String>,
}

impl ColdRun {
    /// Relay rate (→ 0 pending) over the bare publisher's (→ all confirmed).
    pub(crate) fn ratio(&self) -> Option<f64> {
        match (&self.bare, &self.drain) {
            (Ok(b), Ok(d)) => Some(b.confirmed_s / d.db_zero_s),
            _ => None,
        }
    }
}

/// The application's own writes over a window: rows committed and the
/// average transaction latency, counted from each transaction's scheduled
/// start (so a writer that falls behind shows it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AppWindow {
    pub(crate) rows: u64,
    pub(crate) wall_s: f64,
    pub(crate) latency_ms: f64,
}

impl AppWindow {
    pub(crate) fn rate(&self) -> f64 {
        self.rows as f64 / self.wall_s
    }
}

/// WAL bytes per row (cluster-wide `pg_current_wal_lsn()` differences, so
/// other sessions' writes on the same server count too).
#[derive(Debug, Clone, Copy)]
pub(crate) struct WalPerRow {
    /// The backlog's INSERTs, per row.
    pub(crate) insert: f64,
    /// Everything written while the relay drained, less the application's
    /// inserts (at the insert's rate per row), per row published.
    pub(crate) relay: f64,
    /// The relay's retention pass (run with a short retention afterwards),
    /// per row deleted.
    pub(crate) retention: Option<f64>,
    pub(crate) retention_rows: u64,
}

impl WalPerRow {
    /// Insert to retention, everything included, over the insert's own WAL.
    pub(crate) fn ratio(&self) -> Option<f64> {
        Some((self.insert + self.relay + self.retention?) / self.insert)
    }
}

/// A backlog written while the relay was down, on a table with history,
/// a snapshot held open and the application still writing (issue 17).
#[derive(Debug, Clone)]
pub(crate) struct BacklogRun {
    /// Rows relayed before the outage (the table's history).
    pub(crate) history_rows: u64,
    /// Rows pending when the relay started again.
    pub(crate) backlog_rows: u64,
    /// The bare publisher's rate to the same exchange, same run.
    pub(crate) bare_rate: f64,
    /// Relay start → the application's new rows are current (oldest pending
    /// at most 2 s old).
    pub(crate) catch_up_s: f64,
    /// Messages the relay published from its start to that moment.
    pub(crate) published: u64,
    /// The application's asked rate (rows/s).
    pub(crate) app_rate: f64,
    pub(crate) app_stopped: AppWindow,
    pub(crate) app_draining: AppWindow,
    pub(crate) claims: Option<ClaimStats>,
    pub(crate) wal: WalPerRow,
    pub(crate) stop_note: Option<String>,
}

impl BacklogRun {
    pub(crate) fn drain_rate(&self) -> f64 {
        self.published as f64 / self.catch_up_s
    }
    pub(crate) fn drain_ratio(&self) -> f64 {
        self.drain_rate() / self.bare_rate
    }
    /// 1.5 x backlog / (ceiling - application rate).
    pub(crate) fn catch_up_target_s(&self, factor: f64) -> f64 {
        factor * self.backlog_rows as f64 / (self.bare_rate - self.app_rate)
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Quantiles {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

impl Quantiles {
    pub(crate) fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        Self {
            p50: quantile(&values, 0.50),
            p99: quantile(&values, 0.99),
            max: values.last().copied().unwrap_or(f64::NAN),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct HistQuantiles {
    pub(crate) count: u64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    /// Upper bound of the highest bucket that received an observation.
    pub(crate) max_le: f64,
}

/// CPU seconds used by the parts of the system over a measured window.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuUse {
    pub(crate) wall_s: f64,
    /// The PostgreSQL backends serving the relay's connections.
    pub(crate) relay_pg_s: f64,
    pub(crate) rabbitmq_s: f64,
    /// The bench process and its own PostgreSQL backend.
    pub(crate) bench_s: f64,
    /// Busy CPU time of the whole machine.
    pub(crate) total_s: f64,
}

#[derive(Default)]
pub(crate) struct Results {
    pub(crate) ceiling: Vec<Result<CeilingRun, String>>,
    pub(crate) drain: Vec<Result<DrainRun, String>>,
    pub(crate) steady: Vec<(u64, Result<SteadyRun, String>)>,
    pub(crate) idle: Vec<Result<IdleRun, String>>,
    pub(crate) growth: Vec<Vec<(u64, Result<DrainRun, String>)>>,
    /// Per run: (relays, result) for each relay count.
    pub(crate) scale: Vec<Vec<(usize, Result<ScaleRun, String>)>>,
    pub(crate) app: Vec<(AppKind, Result<AppCompare, String>)>,
    /// Claims over the whole application-cost phase.
    pub(crate) app_claims: Option<ClaimStats>,
    /// Problems of the phase as a whole (setup, deliveries).
    pub(crate) app_notes: Vec<String>,
    pub(crate) keyed: Vec<Result<KeyedRun, String>>,
    pub(crate) cold: Vec<ColdRun>,
    pub(crate) backlog: Vec<Result<BacklogRun, String>>,
    /// The same on a private PostgreSQL with default settings.
    pub(crate) backlog_private: Vec<Result<BacklogRun, String>>,
    /// Direct and through a transaction pooler (Err: the pooler did not start).
    pub(crate) pooled: Vec<Result<PooledRun, String>>,
}

impl Results {
    pub(crate) fn all_ok(&self) -> bool {
        self.ceiling.iter().all(Result::is_ok)
            && self.drain.iter().all(Result::is_ok)
            && self.steady.iter().all(|(_, r)| r.is_ok())
            && self.idle.iter().all(Result::is_ok)
            && self
                .growth
                .iter()
                .all(|run| run.iter().all(|(_, r)| r.is_ok()))
            && self
                .scale
                .iter()
                .all(|run| run.iter().all(|(_, r)| r.is_ok()))
            && self.app.iter().all(|(_, r)| r.is_ok())
            && self.app_notes.is_empty()
            && self.keyed.iter().all(|k| {
                k.as_ref()
                    .is_ok_and(|k| k.paced.is_ok() && k.unpaced.is_ok())
            })
            && self.cold.iter().all(|c| c.bare.is_ok() && c.drain.is_ok())
            && self.backlog.iter().all(Result::is_ok)
            && self.backlog_private.iter().all(Result::is_ok)
            && self
                .pooled
                .iter()
                .all(|p| p.as_ref().is_ok_and(PooledRun::all_ok))
    }
}

impl DrainRun {
    pub(crate) fn consumed_rate(&self) -> f64 {
        self.messages as f64 / self.consumed_s
    }
    pub(crate) fn db_rate(&self) -> f64 {
        self.messages as f64 / self.db_zero_s
    }
    pub(crate) fn cpu_per_10k(&self) -> f64 {
        (self.relay_user_s + self.relay_sys_s) / (self.messages as f64 / 10_000.0)
    }
}

impl std::fmt::Display for Quantiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1} / {:.1} / {:.1}", self.p50, self.p99, self.max)
    }
}
