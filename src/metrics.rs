//! The relay's Prometheus metrics (prefix `outbox_relay_`) and its health state.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    collector::Collector,
    encoding::{text, DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use tokio::time::Instant;

mod process;

/// Why a publish attempt failed. A closed set: labels never take row data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    Nack,
    Unroutable,
    ChannelClosed,
    AccessRefused,
    ExchangeNotFound,
    InvalidRow,
    ConnectionLost,
    LeaseLost,
}

impl FailureReason {
    const ALL: [FailureReason; 8] = [
        FailureReason::Nack,
        FailureReason::Unroutable,
        FailureReason::ChannelClosed,
        FailureReason::AccessRefused,
        FailureReason::ExchangeNotFound,
        FailureReason::InvalidRow,
        FailureReason::ConnectionLost,
        FailureReason::LeaseLost,
    ];

    fn as_str(self) -> &'static str {
        match self {
            FailureReason::Nack => "nack",
            FailureReason::Unroutable => "unroutable",
            FailureReason::ChannelClosed => "channel_closed",
            FailureReason::AccessRefused => "access_refused",
            FailureReason::ExchangeNotFound => "exchange_not_found",
            FailureReason::InvalidRow => "invalid_row",
            FailureReason::ConnectionLost => "connection_lost",
            FailureReason::LeaseLost => "lease_lost",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// A RabbitMQ node as `host:port`: only the configured nodes, never more.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

/// A hot-path statement: a closed set (`StoreError::statement`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StatementLabel {
    statement: &'static str,
}

/// The two sides the relay connects to, for connection attempts by outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Broker,
    Database,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

impl OutcomeLabel {
    const OK: OutcomeLabel = OutcomeLabel { outcome: "ok" };
    const FAILED: OutcomeLabel = OutcomeLabel { outcome: "failed" };
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub published: Counter,
    failures: Family<ReasonLabel, Counter>,
    pub dead_lettered: Counter,
    pub deleted: Counter,
    /// pending_messages, oldest_pending_age_seconds, dead_lettered_messages.
    backlog: Arc<Backlog>,
    pub delivery_lag: Histogram,
    pub batch_size: Histogram,
    pub confirm_duration: Histogram,
    pub claim_duration: Histogram,
    pub mark_duration: Histogram,
    pub partitions_owned: Gauge,
    /// 1 while the relay cannot publish and leaves every partition to others.
    pub partitions_handed_off: Gauge,
    pub broker_connected: Gauge,
    pub database_connected: Gauge,
    pub broker_blocked: Gauge,
    broker_node_connected: Family<NodeLabel, Gauge>,
    broker_connections: Family<NodeLabel, Counter>,
    current_node: Mutex<Option<String>>,
    database_errors: Family<StatementLabel, Counter>,
    broker_connection_attempts: Family<OutcomeLabel, Counter>,
    database_connection_attempts: Family<OutcomeLabel, Counter>,
    last_publish: Gauge<f64, AtomicU64>,
    last_heartbeat: Gauge<f64, AtomicU64>,
    /// `process_*`: not under the relay's prefix, as every exporter names them.
    process_registry: Registry,
    /// Unix milliseconds of the relay loop's last turn, for /healthz.
    loop_beat: AtomicI64,
    /// Set once shutdown starts: /readyz answers 503 from then on.
    stopping: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("outbox_relay");
        let published = Counter::default();
        registry.register(
            "messages_published",
            "Messages the broker confirmed and the relay marked published",
            published.clone(),
        );
        let failures = Family::<ReasonLabel, Counter>::default();
        // Every reason from the start at 0: rate() and alerts need a series
        // before the first failure.
        for reason in FailureReason::ALL {
            let _ = failures.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            });
        }
        registry.register(
            "publish_failures",
            "Failed publish attempts by reason",
            failures.clone(),
        );
        let dead_lettered = Counter::default();
        registry.register(
            "messages_dead_lettered",
            "Rows parked after max-attempts failures or as invalid",
            dead_lettered.clone(),
        );
        let deleted = Counter::default();
        registry.register(
            "messages_deleted",
            "Published rows removed by retention",
            deleted.clone(),
        );
        // Absent while the relay cannot read them (see `Backlog`).
        let backlog = Arc::new(Backlog::default());
        registry.register_collector(Box::new(backlog.clone()));
        // 1 ms .. 4194 s (2^22 ms): past the 900 s alert and over an hour.
        let delivery_lag = Histogram::new(exponential_buckets(0.001, 2.0, 23));
        registry.register(
            "delivery_lag_seconds",
            "From a row's created_at to the broker's confirm",
            delivery_lag.clone(),
        );
        let batch_size = Histogram::new(BATCH_SIZE_BUCKETS);
        registry.register("batch_size", "Rows per claimed batch", batch_size.clone());
        let confirm_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "confirm_duration_seconds",
            "From publish to the broker's confirm",
            confirm_duration.clone(),
        );
        let claim_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "claim_duration_seconds",
            "One claim statement (from the answer of the marks sent before it in the same round trip)",
            claim_duration.clone(),
        );
        let mark_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "mark_duration_seconds",
            "Marking confirmed rows published: the first statement of a claim's round trip",
            mark_duration.clone(),
        );
        let partitions_owned = Gauge::default();
        registry.register(
            "partitions_owned",
            "Partitions this relay holds a lease on",
            partitions_owned.clone(),
        );
        let partitions_handed_off = Gauge::default();
        registry.register(
            "partitions_handed_off",
            "1 while this relay cannot publish (no RabbitMQ connection for 5 s, or none yet) and so takes no partition: relays that can publish take them",
            partitions_handed_off.clone(),
        );
        let broker_connected = Gauge::default();
        registry.register(
            "broker_connected",
            "1 when connected to RabbitMQ",
            broker_connected.clone(),
        );
        let database_connected = Gauge::default();
        registry.register(
            "database_connected",
            "1 when connected to PostgreSQL",
            database_connected.clone(),
        );
        let broker_blocked = Gauge::default();
        registry.register(
            "broker_blocked",
            "1 while RabbitMQ blocks publishing (connection.blocked: memory or disk alarm)",
            broker_blocked.clone(),
        );
        let broker_node_connected = Family::<NodeLabel, Gauge>::default();
        registry.register(
            "broker_node_connected",
            "1 for the RabbitMQ node (of those configured) the relay is connected to",
            broker_node_connected.clone(),
        );
        let broker_connections = Family::<NodeLabel, Counter>::default();
        registry.register(
            "broker_connections",
            "RabbitMQ connections opened, by node (a rise on another node is a fail-over)",
            broker_connections.clone(),
        );
        let database_errors = Family::<StatementLabel, Counter>::default();
        for statement in ["claim", "mark", "fail"] {
            let _ = database_errors.get_or_create(&StatementLabel { statement });
        }
        registry.register(
            "database_errors",
            "Failed statements of the relay loop, by statement (the loop backs off after each)",
            database_errors.clone(),
        );
        let broker_connection_attempts = Family::<OutcomeLabel, Counter>::default();
        let database_connection_attempts = Family::<OutcomeLabel, Counter>::default();
        // Both outcomes from the start at 0, so a relay that never connects shows
        // its failures rising from 0 rather than no series.
        for family in [&broker_connection_attempts, &database_connection_attempts] {
            let _ = family.get_or_create(&OutcomeLabel::OK);
            let _ = family.get_or_create(&OutcomeLabel::FAILED);
        }
        registry.register(
            "broker_connection_attempts",
            "RabbitMQ connection attempts by outcome (ok, failed), every configured node",
            broker_connection_attempts.clone(),
        );
        registry.register(
            "database_connection_attempts",
            "PostgreSQL connection attempts by outcome (ok, failed), every connection the relay opens",
            database_connection_attempts.clone(),
        );
        let last_publish = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "last_publish_timestamp_seconds",
            "Unix time of the last rows the broker confirmed and the relay marked published (0: none since start)",
            last_publish.clone(),
        );
        let last_heartbeat = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "last_heartbeat_timestamp_seconds",
            "Unix time of the last heartbeat (lease renewal) the database answered (0: none since start)",
            last_heartbeat.clone(),
        );
        let mut process_registry = Registry::default();
        process_registry.register_collector(Box::new(process::ProcessCollector::new()));
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Relay version", build_info);
        Self {
            registry,
            published,
            failures,
            dead_lettered,
            deleted,
            backlog,
            delivery_lag,
            batch_size,
            confirm_duration,
            claim_duration,
            mark_duration,
            partitions_owned,
            partitions_handed_off,
            broker_connected,
            database_connected,
            broker_blocked,
            broker_node_connected,
            broker_connections,
            current_node: Mutex::new(None),
            database_errors,
            broker_connection_attempts,
            database_connection_attempts,
            last_publish,
            last_heartbeat,
            process_registry,
            loop_beat: AtomicI64::new(now_millis()),
            stopping: AtomicBool::new(false),
        }
    }

    pub fn failure(&self, reason: FailureReason) {
        self.failures
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn database_error(&self, statement: &'static str) {
        self.database_errors
            .get_or_create(&StatementLabel { statement })
            .inc();
    }

    /// One connection attempt to `peer` ended, connected (`ok`) or not.
    pub fn connection_attempt(&self, peer: Peer, ok: bool) {
        let family = match peer {
            Peer::Broker => &self.broker_connection_attempts,
            Peer::Database => &self.database_connection_attempts,
        };
        let label = if ok {
            OutcomeLabel::OK
        } else {
            OutcomeLabel::FAILED
        };
        family.get_or_create(&label).inc();
    }

    /// `n` rows were confirmed and marked published just now.
    pub fn rows_published(&self, n: u64) {
        self.published.inc_by(n);
        if n > 0 {
            self.last_publish.set(now_secs());
        }
    }

    /// The database answered a heartbeat just now.
    pub fn heartbeat_answered(&self) {
        self.last_heartbeat.set(now_secs());
    }

    /// Shows every configured node, connected to or not.
    pub fn broker_nodes(&self, nodes: &[String]) {
        for node in nodes {
            let label = NodeLabel { node: node.clone() };
            self.broker_node_connected.get_or_create(&label).set(0);
            let _ = self.broker_connections.get_or_create(&label);
        }
    }

    /// The node the relay is now connected to (None: none), after a connect
    /// (`opened`) or a loss.
    pub fn broker_node(&self, connected: Option<&str>, opened: bool) {
        self.broker_connected.set(i64::from(connected.is_some()));
        let Ok(mut current) = self.current_node.lock() else {
            return;
        };
        if let Some(old) = current.take() {
            self.broker_node_connected
                .get_or_create(&NodeLabel { node: old })
                .set(0);
        }
        if let Some(node) = connected {
            let label = NodeLabel {
                node: node.to_string(),
            };
            self.broker_node_connected.get_or_create(&label).set(1);
            if opened {
                self.broker_connections.get_or_create(&label).inc();
            }
            *current = Some(node.to_string());
        }
    }

    /// A fresh backlog reading, exported until `fresh_for` has passed without
    /// another (the reader's next refresh plus slack) or until cleared.
    pub fn set_backlog(
        &self,
        pending: i64,
        oldest_created_at: Option<SystemTime>,
        dead: i64,
        fresh_for: Duration,
    ) {
        self.backlog.set(Some(BacklogReading {
            pending,
            oldest_created_at,
            dead_lettered: dead,
            fresh_until: Instant::now() + fresh_for,
        }));
    }

    /// The database cannot be read: the backlog gauges disappear.
    pub fn clear_backlog(&self) {
        self.backlog.set(None);
    }

    pub fn beat(&self) {
        self.loop_beat.store(now_millis(), Ordering::Relaxed);
    }

    pub fn loop_alive(&self, within: Duration) -> bool {
        now_millis() - self.loop_beat.load(Ordering::Relaxed) <= within.as_millis() as i64
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Why the relay is not ready, or None when it is.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.stopping.load(Ordering::Relaxed) {
            Some("shutting down")
        } else if self.database_connected.get() != 1 {
            Some("not connected to PostgreSQL")
        } else if self.broker_connected.get() != 1 {
            Some("not connected to RabbitMQ; its partitions are left to relays that can publish")
        } else {
            None
        }
    }

    /// Prometheus text 0.0.4; the oldest pending age is computed at scrape time.
    pub fn encode(&self) -> String {
        to_prometheus_text(&self.encode_openmetrics())
    }

    /// OpenMetrics 1.0 text (ends with `# EOF`), for scrapers that ask for it.
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = text::encode_registry(&mut out, &self.registry);
        let _ = text::encode_registry(&mut out, &self.process_registry);
        let _ = text::encode_eof(&mut out);
        out
    }

    /// The body and content type for a scrape whose `Accept` header is `accept`:
    /// OpenMetrics when the scraper lists it (Prometheus does), else text 0.0.4.
    pub fn encode_for(&self, accept: Option<&str>) -> (String, &'static str) {
        if accept.is_some_and(accepts_openmetrics) {
            (self.encode_openmetrics(), OPENMETRICS_CONTENT_TYPE)
        } else {
            (self.encode(), CONTENT_TYPE)
        }
    }
}

/// The backlog gauges. Every replica would export the same figures, so a
/// relay that cannot read them exports none rather than its last ones (which
/// would keep `max` over replicas, and the age, alive from a stale reading):
/// absent before the first reading, after housekeeping lost the database, and
/// once a reading outlived its refresh. A collector, because a registered
/// gauge cannot be taken out of the exposition again.
#[derive(Debug, Default)]
struct Backlog(Mutex<Option<BacklogReading>>);

#[derive(Debug, Clone, Copy)]
struct BacklogReading {
    pending: i64,
    oldest_created_at: Option<SystemTime>,
    dead_lettered: i64,
    /// Not exported after this: the refresh that should have come did not.
    fresh_until: Instant,
}

impl Backlog {
    fn set(&self, reading: Option<BacklogReading>) {
        if let Ok(mut last) = self.0.lock() {
            *last = reading;
        }
    }

    fn current(&self) -> Option<BacklogReading> {
        let last = *self.0.lock().ok()?;
        last.filter(|r| Instant::now() < r.fresh_until)
    }
}

impl Collector for Backlog {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(r) = self.current() else {
            return Ok(());
        };
        // The age grows between readings as it does in the database: computed now.
        let age = r.oldest_created_at.map_or(0.0, |t| {
            SystemTime::now()
                .duration_since(t)
                .map_or(0.0, |d| d.as_secs_f64())
        });
        let pending = ConstGauge::new(r.pending);
        pending.encode(encoder.encode_descriptor(
            "pending_messages",
            "Rows waiting to be published (absent while this relay cannot read the database)",
            None,
            pending.metric_type(),
        )?)?;
        let age = ConstGauge::new(age);
        age.encode(encoder.encode_descriptor(
            "oldest_pending_age_seconds",
            "Age of the oldest pending row (0 when none): the lag to alert on (absent while this relay cannot read the database)",
            None,
            age.metric_type(),
        )?)?;
        let dead = ConstGauge::new(r.dead_lettered);
        dead.encode(encoder.encode_descriptor(
            "dead_lettered_messages",
            "Rows currently parked as dead letters (absent while this relay cannot read the database)",
            None,
            dead.metric_type(),
        )?)?;
        Ok(())
    }
}

/// The content type of [`Metrics::encode`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The content type of [`Metrics::encode_openmetrics`].
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Batch sizes are whole numbers: bounds at 2^k + 0.5 make each bucket hold
/// exactly the sizes up to 2^k, and histogram_quantile's interpolation inside
/// (0.5, 1.5] reads a run of 1-row batches as 1 (bounds at 1, 2, 4.. read 0.5).
const BATCH_SIZE_BUCKETS: [f64; 16] = [
    0.5, 1.5, 2.5, 4.5, 8.5, 16.5, 32.5, 64.5, 128.5, 256.5, 512.5, 1024.5, 2048.5, 4096.5, 8192.5,
    16384.5,
];

/// Whether an `Accept` header lists OpenMetrics text with a q above 0.
fn accepts_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|item| {
        let mut parts = item.split(';').map(str::trim);
        let media = parts.next().unwrap_or("");
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f64>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
    })
}

/// OpenMetrics -> Prometheus text 0.0.4, which every scraper and `promtool check
/// metrics` read: counters are described under their `_total` sample name, and
/// the OpenMetrics-only `# EOF` and `# UNIT` lines go.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let described = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(described.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_contract_names_and_no_row_data() {
        let m = Metrics::new();
        m.published.inc();
        m.failure(FailureReason::Unroutable);
        m.set_backlog(
            3,
            Some(SystemTime::now() - Duration::from_secs(5)),
            1,
            Duration::from_secs(60),
        );
        let text = m.encode();
        for name in [
            "outbox_relay_messages_published_total 1",
            "outbox_relay_publish_failures_total{reason=\"unroutable\"} 1",
            "outbox_relay_messages_dead_lettered_total",
            "outbox_relay_messages_deleted_total",
            "outbox_relay_pending_messages 3",
            "outbox_relay_oldest_pending_age_seconds",
            "outbox_relay_delivery_lag_seconds_bucket",
            "outbox_relay_batch_size_bucket",
            "outbox_relay_confirm_duration_seconds_bucket",
            "outbox_relay_claim_duration_seconds_bucket",
            "outbox_relay_mark_duration_seconds_bucket",
            "outbox_relay_partitions_owned",
            "outbox_relay_broker_connected",
            "outbox_relay_database_connected",
            "outbox_relay_broker_blocked",
            "outbox_relay_build_info{version=",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        let age: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("outbox_relay_oldest_pending_age_seconds "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0);
        assert!((4.9..60.0).contains(&age), "age {age}");
    }

    #[test]
    fn every_failure_reason_is_exported_at_0_before_the_first_failure() {
        let text = Metrics::new().encode();
        for reason in FailureReason::ALL {
            let line = format!(
                "outbox_relay_publish_failures_total{{reason=\"{}\"}} 0",
                reason.as_str()
            );
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }

    #[test]
    fn counters_are_described_under_their_total_name() {
        let text = Metrics::new().encode();
        assert!(
            text.contains("# TYPE outbox_relay_messages_published_total counter"),
            "{text}"
        );
        assert!(
            text.contains("# HELP outbox_relay_messages_published_total "),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        assert!(text.contains("# TYPE outbox_relay_partitions_owned gauge"));
    }

    #[test]
    fn openmetrics_is_served_to_scrapers_that_ask_for_it() {
        let m = Metrics::new();
        m.published.inc();
        // What Prometheus 2.42 sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let (body, content_type) = m.encode_for(Some(prometheus));
        assert_eq!(content_type, OPENMETRICS_CONTENT_TYPE);
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert!(
            body.contains("# TYPE outbox_relay_messages_published counter"),
            "{body}"
        );
        assert!(body.contains("outbox_relay_messages_published_total 1"));
        for accept in [
            None,
            Some("text/plain"),
            Some("*/*"),
            Some("application/openmetrics-text;q=0"),
        ] {
            let (body, content_type) = m.encode_for(accept);
            assert_eq!(content_type, CONTENT_TYPE, "{accept:?}");
            assert!(!body.contains("# EOF"), "{accept:?}");
        }
    }

    #[test]
    fn histograms_reach_the_ranges_alerts_and_panels_read() {
        let m = Metrics::new();
        m.delivery_lag.observe(480.0);
        for _ in 0..10 {
            m.batch_size.observe(1.0);
        }
        let text = m.encode();
        let bounds = |family: &str| -> Vec<f64> {
            text.lines()
                .filter_map(|l| l.strip_prefix(&format!("{family}_bucket{{le=\"")))
                .filter_map(|l| l.split('"').next()?.parse().ok())
                .collect()
        };
        let lag = bounds("outbox_relay_delivery_lag_seconds");
        assert!(
            lag.iter().any(|b| (3600.0..f64::INFINITY).contains(b)),
            "no finite delivery-lag bound at or past an hour: {lag:?}"
        );
        // A run of 1-row batches sits alone in (0.5, 1.5]: histogram_quantile
        // interpolates it to 1, not 0.5.
        let batch = bounds("outbox_relay_batch_size");
        assert_eq!(&batch[..3], &[0.5, 1.5, 2.5], "{batch:?}");
        assert!(text.contains("outbox_relay_batch_size_bucket{le=\"0.5\"} 0"));
        assert!(text.contains("outbox_relay_batch_size_bucket{le=\"1.5\"} 10"));
    }

    #[test]
    fn connection_attempts_count_both_outcomes_from_zero() {
        let m = Metrics::new();
        let text = m.encode();
        for peer in ["broker", "database"] {
            for outcome in ["ok", "failed"] {
                let line = format!(
                    "outbox_relay_{peer}_connection_attempts_total{{outcome=\"{outcome}\"}} 0"
                );
                assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
            }
        }
        m.connection_attempt(Peer::Broker, false);
        m.connection_attempt(Peer::Broker, false);
        m.connection_attempt(Peer::Database, true);
        let text = m.encode();
        for line in [
            "outbox_relay_broker_connection_attempts_total{outcome=\"failed\"} 2",
            "outbox_relay_database_connection_attempts_total{outcome=\"ok\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }

    #[test]
    fn last_publish_and_heartbeat_are_unix_times() {
        let m = Metrics::new();
        let read = |text: &str, name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse().ok())
                .unwrap_or(-1.0)
        };
        let text = m.encode();
        assert_eq!(
            read(&text, "outbox_relay_last_publish_timestamp_seconds"),
            0.0
        );
        assert_eq!(
            read(&text, "outbox_relay_last_heartbeat_timestamp_seconds"),
            0.0
        );
        m.rows_published(0);
        assert_eq!(
            read(&m.encode(), "outbox_relay_last_publish_timestamp_seconds"),
            0.0
        );
        m.rows_published(3);
        m.heartbeat_answered();
        let text = m.encode();
        let now = now_secs();
        for name in [
            "outbox_relay_last_publish_timestamp_seconds",
            "outbox_relay_last_heartbeat_timestamp_seconds",
        ] {
            let at = read(&text, name);
            assert!((now - 60.0..=now).contains(&at), "{name} {at} vs now {now}");
        }
        assert!(text.contains("outbox_relay_messages_published_total 3"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_are_exported_without_the_prefix() {
        let text = Metrics::new().encode();
        for name in [
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "{name} not in\n{text}"
            );
        }
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter"),
            "{text}"
        );
    }

    #[test]
    fn readiness_names_the_missing_side() {
        let m = Metrics::new();
        assert_eq!(m.not_ready_reason(), Some("not connected to PostgreSQL"));
        m.database_connected.set(1);
        assert!(m
            .not_ready_reason()
            .is_some_and(|r| r.starts_with("not connected to RabbitMQ")));
        m.broker_connected.set(1);
        assert_eq!(m.not_ready_reason(), None);
        m.set_stopping();
        assert_eq!(m.not_ready_reason(), Some("shutting down"));
    }

    #[test]
    fn the_connected_node_reads_1_and_the_others_0() {
        let m = Metrics::new();
        m.broker_nodes(&["a:5672".to_string(), "b:5672".to_string()]);
        m.broker_node(Some("a:5672"), true);
        m.broker_node(None, false);
        m.broker_node(Some("b:5672"), true);
        let text = m.encode();
        for line in [
            "outbox_relay_broker_node_connected{node=\"a:5672\"} 0",
            "outbox_relay_broker_node_connected{node=\"b:5672\"} 1",
            "outbox_relay_broker_connections_total{node=\"a:5672\"} 1",
            "outbox_relay_broker_connections_total{node=\"b:5672\"} 1",
            "outbox_relay_broker_connected 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backlog_gauges_are_absent_unless_fresh() {
        let backlog = [
            "outbox_relay_pending_messages",
            "outbox_relay_oldest_pending_age_seconds",
            "outbox_relay_dead_lettered_messages",
        ];
        let exported = |m: &Metrics| {
            let text = m.encode();
            backlog.map(|name| text.lines().any(|l| l.starts_with(name)))
        };
        let m = Metrics::new();
        assert_eq!(exported(&m), [false; 3], "nothing read yet");
        m.set_backlog(2, Some(SystemTime::now()), 0, Duration::from_secs(20));
        assert_eq!(exported(&m), [true; 3]);
        m.clear_backlog();
        assert_eq!(exported(&m), [false; 3], "the database was lost");
        m.set_backlog(2, Some(SystemTime::now()), 0, Duration::from_secs(20));
        tokio::time::advance(Duration::from_secs(21)).await;
        assert_eq!(exported(&m), [false; 3], "the refresh did not come");
    }
}
