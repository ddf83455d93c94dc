//! The targets each figure of the report is held against (issue #5 and later).

pub(crate) const TARGET_DRAIN_RATIO: f64 = 0.85;
pub(crate) const TARGET_LAG_1000_P50_MS: f64 = 5.0;
pub(crate) const TARGET_LAG_1000_P99_MS: f64 = 25.0;
pub(crate) const TARGET_LAG_5000_P99_MS: f64 = 50.0;
pub(crate) const TARGET_IDLE_PER_S: f64 = 1.0;
pub(crate) const TARGET_RSS_MIB: f64 = 30.0;
pub(crate) const TARGET_CPU_PER_10K: f64 = 0.3;
pub(crate) const TARGET_GROWTH_RATIO: f64 = 0.90;
pub(crate) const TARGET_APP_TPS_RATIO: f64 = 0.90;
pub(crate) const TARGET_APP_LATENCY_RATIO: f64 = 1.5;
pub(crate) const TARGET_KEYED_AGE_P99_MS: f64 = 250.0;
pub(crate) const TARGET_KEYED_AGE_MAX_MS: f64 = 1000.0;
pub(crate) const TARGET_KEYED_UNPACED_AGE_P99_MS: f64 = 1000.0;
pub(crate) const TARGET_COLD_RATIO: f64 = 0.85;
pub(crate) const TARGET_CLAIM_P99_MS: f64 = 50.0;
// Issue 17: a backlog after an outage.
pub(crate) const TARGET_BACKLOG_RATIO: f64 = 0.85;
/// Catch-up within this many times backlog / (ceiling - application rate).
pub(crate) const TARGET_BACKLOG_CATCH_UP_FACTOR: f64 = 1.5;
/// The application's rate while the relay drains, over its rate with the relay stopped.
pub(crate) const TARGET_BACKLOG_APP_RATE_HELD: f64 = 0.95;
pub(crate) const TARGET_BACKLOG_APP_LATENCY_RATIO: f64 = 2.0;
/// An aim, reported: WAL from insert to retention over the insert's own.
pub(crate) const AIM_BACKLOG_WAL_RATIO: f64 = 1.5;
