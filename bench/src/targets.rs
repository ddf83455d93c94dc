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
