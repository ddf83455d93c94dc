//! The relay's Prometheus metrics (prefix `outbox_relay_`) and its health state.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicI64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use tokio::time::Instant;

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
    pub partitions_owned: Gauge,
    /// 1 while the relay cannot publish and leaves every partition to others.
    pub partitions_handed_off: Gauge,
    pub broker_connected: Gauge,
    pub database_connected: Gauge,
    pub broker_blocked: Gauge,
    broker_node_connected: Family<NodeLabel, Gauge>,
    broker_connections: Family<NodeLabel, Counter>,
    current_node: Mutex<Option<String>>,
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
        let delivery_lag = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        registry.register(
            "delivery_lag_seconds",
            "From a row's created_at to the broker's confirm",
            delivery_lag.clone(),
        );
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 15));
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
            "One claim statement (with the marks sent in the same round trip)",
            claim_duration.clone(),
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
            partitions_owned,
            partitions_handed_off,
            broker_connected,
            database_connected,
            broker_blocked,
            broker_node_connected,
            broker_connections,
            current_node: Mutex::new(None),
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

    /// Prometheus text; the oldest pending age is computed at scrape time.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        to_prometheus_text(&out)
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
