//! Results: what each phase's run measured.

use crate::util::quantile;

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
    pub(crate) stop_note: Option<String>,
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
