//! Support for the fault suite (tests/faults.rs): an application that keeps
//! writing, a consumer that survives broker restarts and counts every
//! message_id, relays started with their own URLs and environment, and the
//! end-of-test verdict (nothing lost, nothing rolled back published, order
//! per partition key intact).

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use rand::Rng;
use tokio::sync::watch;
use tokio_postgres::NoTls;
use uuid::Uuid;

use crate::*;

// ---------------------------------------------------------------------------
// URLs
// ---------------------------------------------------------------------------

/// The host:port of a `scheme://user:pass@host:port/...` URL.
pub fn url_addr(url: &str, default_port: u16) -> SocketAddr {
    let (_, authority, _) = split_url(url);
    let host_port = authority.rsplit('@').next().unwrap();
    let with_port = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:{default_port}")
    };
    with_port
        .to_socket_addrs()
        .unwrap_or_else(|e| panic!("cannot resolve {with_port}: {e}"))
        .next()
        .expect("an address")
}

/// The same URL pointing at 127.0.0.1:`port` (a proxy).
pub fn url_via(url: &str, port: u16) -> String {
    let (scheme, authority, rest) = split_url(url);
    let userinfo = authority.rfind('@').map(|i| &authority[..=i]).unwrap_or("");
    format!("{scheme}://{userinfo}127.0.0.1:{port}{rest}")
}

fn split_url(url: &str) -> (&str, &str, &str) {
    let (scheme, after) = url.split_once("://").expect("URL with scheme://");
    let end = after.find(['/', '?']).unwrap_or(after.len());
    (scheme, &after[..end], &after[end..])
}

// ---------------------------------------------------------------------------
// Test environment on another database, relays with their own settings
// ---------------------------------------------------------------------------

impl TestEnv {
    /// Like `TestEnv::new` (fresh migrated schema, queues on the shared broker)
    /// but on the database at `db_url`, e.g. a private PostgreSQL instance.
    pub async fn new_on_database(name: &str, db_url: &str) -> TestEnv {
        let mut env = TestEnv::new_unmigrated(name).await;
        env.db_url = db_url.to_string();
        *env.pg.get_mut() = connect_db(db_url).await;
        env.migrate().await;
        env
    }

    /// Replaces the test's own database connection (after a database restart).
    pub async fn reconnect_db(&self) {
        let client = connect_db(&self.db_url).await;
        *self.pg.lock().await = client;
    }
}

impl Relay {
    /// Waits until `path` answers `status`; returns how long that took and the
    /// body, or None at the timeout.
    pub async fn wait_status(
        &mut self,
        path: &str,
        status: u16,
        timeout: Duration,
    ) -> Option<(Duration, String)> {
        let started = Instant::now();
        let mut body = String::new();
        let ok = wait_until(timeout, async || {
            if let Ok((s, b)) = self.get(path).await {
                body = b;
                s == status
            } else {
                false
            }
        })
        .await;
        ok.then(|| (started.elapsed(), body))
    }

    /// How many lines of the log contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.logs().lines().filter(|l| l.contains(needle)).count()
    }

    /// The log lines that contain any of `needles` (evidence for a report).
    pub fn log_lines_with(&self, needles: &[&str], max: usize) -> String {
        let logs = self.logs();
        let lines: Vec<&str> = logs
            .lines()
            .filter(|l| needles.iter().any(|n| l.contains(n)))
            .collect();
        lines[..lines.len().min(max)].join("\n")
    }
}

/// Watches `/readyz` every 50 ms in the background and records every answer
/// with its time, so a short outage is seen even while the test does other
/// things.
/// Each answer of /readyz with its time (None: no answer).
type Samples = Arc<Mutex<Vec<(Instant, Option<u16>)>>>;

pub struct ReadinessProbe {
    samples: Samples,
    task: tokio::task::JoinHandle<()>,
}

impl ReadinessProbe {
    pub fn start(relay: &Relay) -> ReadinessProbe {
        let addr = relay.metrics_addr();
        let samples: Samples = Arc::new(Mutex::new(Vec::new()));
        let s = samples.clone();
        let task = tokio::spawn(async move {
            loop {
                let status = http_get(addr, "/readyz").await.ok().map(|(code, _)| code);
                s.lock().unwrap().push((Instant::now(), status));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        ReadinessProbe { samples, task }
    }

    /// The first time in [from, to) at which /readyz answered `status`.
    pub fn first(&self, status: u16, from: Instant) -> Option<Instant> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .find(|(at, s)| *at >= from && *s == Some(status))
            .map(|(at, _)| *at)
    }

    /// Counts of each answer seen in [from, to).
    pub fn summary(&self, from: Instant, to: Instant) -> String {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for (at, s) in self.samples.lock().unwrap().iter() {
            if *at >= from && *at < to {
                let key = s.map_or("no answer".to_string(), |c| c.to_string());
                *counts.entry(key).or_default() += 1;
            }
        }
        let mut v: Vec<String> = counts
            .into_iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        v.sort();
        v.join(", ")
    }
}

impl Drop for ReadinessProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// The application: keeps writing committed and rolled-back transactions
// ---------------------------------------------------------------------------

/// The partition keys the application writes (plus rows without a key).
pub const APP_KEYS: usize = 6;

#[derive(Clone, Debug)]
pub struct Written {
    pub message_id: Uuid,
    pub key: Option<String>,
    /// When the commit returned (rows of a transaction share it).
    pub committed_at: Instant,
}

#[derive(Clone, Debug, Default)]
pub struct WriteLog {
    /// Rows whose transaction committed (the commit returned Ok).
    pub committed: Vec<Written>,
    /// Rows whose transaction was rolled back (or never reached its commit).
    pub rolled_back: Vec<Uuid>,
    /// Rows whose commit failed with a lost connection: committed or not, the
    /// table says which.
    pub uncertain: Vec<Uuid>,
    /// Database errors the application met (an outage of its own database).
    pub errors: Vec<String>,
}

pub struct Workload {
    log: Arc<Mutex<WriteLog>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Workload {
    /// Starts writing to `schema.messages` at `db_url`: transactions of 1 to 5
    /// rows to `queue`, about one in six rolled back, keys `k0..k5` and some
    /// rows without a key, a header `seq` counting rows in write order.
    /// Reconnects on its own when its database goes away.
    pub fn start(db_url: &str, schema: &str, queue: &str) -> Workload {
        let (db_url, schema, queue) = (db_url.to_string(), schema.to_string(), queue.to_string());
        Workload::spawn(|log, stop| write_loop(db_url, schema, queue, log, stop))
    }

    /// Runs `write_loop` as the application: it records what it wrote in the
    /// log it is given and returns once the receiver says stop. For
    /// applications that write rows of another shape (tests/common/cluster.rs).
    pub fn spawn<F>(
        write_loop: impl FnOnce(Arc<Mutex<WriteLog>>, watch::Receiver<bool>) -> F,
    ) -> Workload
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let log = Arc::new(Mutex::new(WriteLog::default()));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(write_loop(log.clone(), stop_rx));
        Workload { log, stop, task }
    }

    pub fn committed_count(&self) -> usize {
        self.log.lock().unwrap().committed.len()
    }

    /// Rows committed before `t`.
    pub fn committed_before(&self, t: Instant) -> HashSet<String> {
        self.log
            .lock()
            .unwrap()
            .committed
            .iter()
            .filter(|w| w.committed_at < t)
            .map(|w| w.message_id.to_string())
            .collect()
    }

    /// Rows committed in [from, to).
    pub fn committed_between(&self, from: Instant, to: Instant) -> HashSet<String> {
        self.written_between(from, to)
            .iter()
            .map(|w| w.message_id.to_string())
            .collect()
    }

    /// The rows committed in [from, to), with their commit times.
    pub fn written_between(&self, from: Instant, to: Instant) -> Vec<Written> {
        self.log
            .lock()
            .unwrap()
            .committed
            .iter()
            .filter(|w| w.committed_at >= from && w.committed_at < to)
            .cloned()
            .collect()
    }

    /// Waits until `n` more rows are committed (bounded).
    pub async fn wait_more(&self, n: usize, timeout: Duration) {
        let target = self.committed_count() + n;
        let ok = wait_until(timeout, async || self.committed_count() >= target).await;
        assert!(
            ok,
            "the application did not commit {n} more rows within {timeout:?}: {:?}",
            self.log.lock().unwrap().errors.last()
        );
    }

    pub async fn stop(self) -> WriteLog {
        self.stop.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
        let log = self.log.lock().unwrap().clone();
        log
    }
}

/// The application's connection, (re)connected when it is gone: None (after
/// logging why and a short pause) while the database cannot be reached.
pub async fn app_connection<'a>(
    db_url: &str,
    client: &'a mut Option<tokio_postgres::Client>,
    log: &Mutex<WriteLog>,
) -> Option<&'a mut tokio_postgres::Client> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        match tokio_postgres::connect(db_url, NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                *client = Some(c);
            }
            Err(e) => {
                log.lock().unwrap().errors.push(format!("connect: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                return None;
            }
        }
    }
    client.as_mut()
}

async fn write_loop(
    db_url: String,
    schema: String,
    queue: String,
    log: Arc<Mutex<WriteLog>>,
    stop: watch::Receiver<bool>,
) {
    let sql = format!(
        "INSERT INTO \"{schema}\".messages (message_id, routing_key, partition_key, payload,
                                            headers, content_type)
         VALUES ($1, $2, $3, $4, $5, 'text/plain')"
    );
    let mut client: Option<tokio_postgres::Client> = None;
    let mut seq: i64 = 0;
    while !*stop.borrow() {
        let Some(c) = app_connection(&db_url, &mut client, &log).await else {
            continue;
        };
        let (rows, commit) = {
            let mut rng = rand::rng();
            let n = rng.random_range(1..=5);
            let rows: Vec<(Uuid, Option<String>)> = (0..n)
                .map(|_| {
                    let k = rng.random_range(0..=APP_KEYS);
                    (Uuid::new_v4(), (k < APP_KEYS).then(|| format!("k{k}")))
                })
                .collect();
            (rows, rng.random_bool(0.83))
        };
        let mut reached_commit = false;
        let result: Result<(), tokio_postgres::Error> = async {
            let tx = c.transaction().await?;
            for (mid, key) in &rows {
                seq += 1;
                let headers = serde_json::json!({ "seq": seq });
                let body = format!("row {seq}").into_bytes();
                tx.execute(&sql, &[mid, &queue, key, &body, &headers])
                    .await?;
            }
            if commit {
                reached_commit = true;
                tx.commit().await
            } else {
                tx.rollback().await
            }
        }
        .await;
        let now = Instant::now();
        let lost_connection = {
            let mut l = log.lock().unwrap();
            match result {
                Ok(()) if commit => {
                    l.committed.extend(rows.iter().map(|(mid, key)| Written {
                        message_id: *mid,
                        key: key.clone(),
                        committed_at: now,
                    }));
                    false
                }
                Ok(()) => {
                    l.rolled_back.extend(rows.iter().map(|(mid, _)| *mid));
                    false
                }
                Err(e) => {
                    l.errors.push(e.to_string());
                    if reached_commit {
                        l.uncertain.extend(rows.iter().map(|(mid, _)| *mid));
                    } else {
                        l.rolled_back.extend(rows.iter().map(|(mid, _)| *mid));
                    }
                    true
                }
            }
        };
        if lost_connection {
            client = None;
        }
        // An application's pace, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
}

// ---------------------------------------------------------------------------
// The consumer: counts every delivery, reconnects when the broker goes away
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Arrival {
    pub message_id: String,
    pub redelivered: bool,
    pub at: Instant,
    pub at_wall: std::time::SystemTime,
    pub body: Vec<u8>,
}

#[derive(Default)]
struct TallyState {
    arrivals: Vec<Arrival>,
    first: HashMap<String, Instant>,
    sessions: usize,
    errors: Vec<String>,
}

pub struct Tally {
    pub queue: String,
    state: Arc<Mutex<TallyState>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Tally {
    /// Consumes `queue` (manual ack after recording, prefetch 1000) on its own
    /// connection to `amqp_url`, reconnecting whenever it breaks. Returns once
    /// the first consumer is in place.
    pub async fn start(amqp_url: &str, queue: &str) -> Tally {
        let state = Arc::new(Mutex::new(TallyState::default()));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(consume_loop(
            amqp_url.to_string(),
            queue.to_string(),
            state.clone(),
            stop_rx,
        ));
        let tally = Tally {
            queue: queue.to_string(),
            state,
            stop,
            task,
        };
        let ok = wait_until(SETUP_TIMEOUT, async || {
            tally.state.lock().unwrap().sessions > 0
        })
        .await;
        assert!(
            ok,
            "consumer on {queue} did not start: {:?}",
            tally.errors()
        );
        tally
    }

    pub fn len(&self) -> usize {
        self.state.lock().unwrap().arrivals.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn distinct(&self) -> usize {
        self.state.lock().unwrap().first.len()
    }

    pub fn has_all(&self, wanted: &HashSet<String>) -> bool {
        let s = self.state.lock().unwrap();
        wanted.iter().all(|m| s.first.contains_key(m))
    }

    pub fn missing(&self, wanted: &HashSet<String>) -> Vec<String> {
        let s = self.state.lock().unwrap();
        wanted
            .iter()
            .filter(|m| !s.first.contains_key(*m))
            .cloned()
            .collect()
    }

    pub fn first_arrival(&self, message_id: &str) -> Option<Instant> {
        self.state.lock().unwrap().first.get(message_id).copied()
    }

    /// Consumer sessions so far (1 + reconnects).
    pub fn sessions(&self) -> usize {
        self.state.lock().unwrap().sessions
    }

    pub fn errors(&self) -> Vec<String> {
        self.state.lock().unwrap().errors.clone()
    }

    pub fn snapshot(&self) -> Vec<Arrival> {
        self.state.lock().unwrap().arrivals.clone()
    }

    /// Waits until every id in `wanted` arrived; returns how long that took.
    pub async fn wait_all(&self, wanted: &HashSet<String>, timeout: Duration) -> Option<Duration> {
        let started = Instant::now();
        wait_until(timeout, async || self.has_all(wanted))
            .await
            .then(|| started.elapsed())
    }

    /// How long after `t` every row of `wanted` had first arrived (zero when
    /// all were there before `t`); None if some never arrived.
    pub fn caught_up_after(&self, wanted: &HashSet<String>, t: Instant) -> Option<Duration> {
        let s = self.state.lock().unwrap();
        let mut worst = Duration::ZERO;
        for m in wanted {
            let at = *s.first.get(m)?;
            worst = worst.max(at.saturating_duration_since(t));
        }
        Some(worst)
    }

    /// The first delivery at or after `t` of a message not seen before `t`.
    pub fn first_new_after(&self, t: Instant) -> Option<Duration> {
        let s = self.state.lock().unwrap();
        s.arrivals
            .iter()
            .find(|a| a.at >= t && s.first.get(&a.message_id).is_some_and(|f| *f >= t))
            .map(|a| a.at - t)
    }

    /// The longest time from commit to first arrival among `rows` (None if
    /// one has not arrived).
    pub fn max_latency(&self, rows: &[Written]) -> Option<Duration> {
        let s = self.state.lock().unwrap();
        let mut worst = Duration::ZERO;
        for w in rows {
            let at = *s.first.get(&w.message_id.to_string())?;
            worst = worst.max(at.saturating_duration_since(w.committed_at));
        }
        Some(worst)
    }

    /// The first delivery that arrived at or after `t`.
    pub fn first_after(&self, t: Instant) -> Option<Duration> {
        let s = self.state.lock().unwrap();
        s.arrivals.iter().find(|a| a.at >= t).map(|a| a.at - t)
    }

    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn consume_loop(
    url: String,
    queue: String,
    state: Arc<Mutex<TallyState>>,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let session = async {
            let conn = tokio::time::timeout(
                Duration::from_secs(10),
                Connection::connect(&url, ConnectionProperties::default()),
            )
            .await
            .map_err(|_| "connect: timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
            let channel = conn
                .create_channel()
                .await
                .map_err(|e| format!("channel: {e}"))?;
            channel
                .basic_qos(1000, BasicQosOptions::default())
                .await
                .map_err(|e| format!("qos: {e}"))?;
            let tag = format!("tally-{:08x}", rand::random::<u32>());
            let mut consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("consume: {e}"))?;
            state.lock().unwrap().sessions += 1;
            loop {
                // lapin does not always end the delivery stream when the
                // connection dies (seen after a broker stop_app): watch the
                // connection too, or the tally waits on a dead one forever.
                let delivery = tokio::select! {
                    d = consumer.next() => d,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        if conn.status().connected() {
                            continue;
                        }
                        return Err("connection lost".to_string());
                    }
                };
                let Some(delivery) = delivery else { break };
                let d = delivery.map_err(|e| format!("delivery: {e}"))?;
                let message_id = d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                {
                    let mut s = state.lock().unwrap();
                    let at = Instant::now();
                    s.first.entry(message_id.clone()).or_insert(at);
                    s.arrivals.push(Arrival {
                        message_id,
                        redelivered: d.redelivered,
                        at,
                        at_wall: std::time::SystemTime::now(),
                        body: d.data.clone(),
                    });
                }
                d.acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| format!("ack: {e}"))?;
            }
            Err::<(), String>("consumer stream ended".to_string())
        };
        tokio::select! {
            r = session => {
                if let Err(e) = r {
                    state.lock().unwrap().errors.push(e);
                }
            }
            _ = stop.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.changed() => return,
        }
    }
}

// ---------------------------------------------------------------------------
// The verdict
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
pub struct Figures {
    /// Rows marked published in the table at the end.
    pub published: usize,
    /// Deliveries the consumer saw, repeats included.
    pub received: usize,
    /// Deliveries beyond the first of each message_id.
    pub duplicates: usize,
    /// Of those, redeliveries by the broker to the consumer (redelivered flag).
    pub broker_redeliveries: usize,
    /// Committed rows never delivered.
    pub lost: usize,
    pub committed: usize,
    pub rolled_back: usize,
    /// Rows with attempts > 0 (a fault must not charge rows).
    pub charged: usize,
    /// Message ids delivered more than once (the republished ones).
    pub repeated_ids: HashSet<String>,
}

impl Figures {
    pub fn line(&self) -> String {
        format!(
            "published={} received={} duplicates={} lost={} (committed={} rolled_back={} \
             broker_redeliveries={} charged={})",
            self.published,
            self.received,
            self.duplicates,
            self.lost,
            self.committed,
            self.rolled_back,
            self.broker_redeliveries,
            self.charged
        )
    }
}

/// Checks the guarantees once the application has stopped writing: every row
/// in the table (= every committed row) arrives and is marked published, no
/// rolled-back row arrives, no delivery is unknown, first arrivals per
/// partition key come in id order, no row was charged or dead-lettered.
/// Panics with the evidence otherwise.
pub async fn verify_delivery(
    env: &TestEnv,
    tally: &Tally,
    log: &WriteLog,
    relay: &Relay,
) -> Figures {
    let rows = env.rows().await;
    let in_table: HashMap<String, &RowState> =
        rows.iter().map(|r| (r.message_id.to_string(), r)).collect();

    let vanished: Vec<String> = log
        .committed
        .iter()
        .map(|w| w.message_id.to_string())
        .filter(|m| !in_table.contains_key(m))
        .collect();
    assert!(
        vanished.is_empty(),
        "{} committed rows are not in the table: {:?}",
        vanished.len(),
        &vanished[..vanished.len().min(5)]
    );
    let rolled_back: HashSet<String> = log.rolled_back.iter().map(|m| m.to_string()).collect();
    let resurrected: Vec<&String> = rolled_back
        .iter()
        .filter(|m| in_table.contains_key(*m))
        .collect();
    assert!(
        resurrected.is_empty(),
        "rolled-back rows are in the table: {resurrected:?}"
    );

    let wanted: HashSet<String> = in_table.keys().cloned().collect();
    if tally.wait_all(&wanted, ARRIVAL_TIMEOUT).await.is_none() {
        let missing = tally.missing(&wanted);
        let states: Vec<String> = missing
            .iter()
            .take(10)
            .map(|m| {
                let r = in_table[m];
                format!(
                    "id {} key {:?} attempts {} published {} dead {} last_error {:?}",
                    r.id,
                    r.partition_key,
                    r.attempts,
                    r.published_at.is_some(),
                    r.dead_lettered_at.is_some(),
                    r.last_error
                )
            })
            .collect();
        panic!(
            "LOST: {} of {} committed rows never arrived within {ARRIVAL_TIMEOUT:?} \
             (consumer errors {:?}); first:\n{}\n{}",
            missing.len(),
            wanted.len(),
            tally.errors(),
            states.join("\n"),
            relay.log_tail(60)
        );
    }
    let marked = wait_until(Duration::from_secs(60), async || {
        env.pending_count().await == 0
    })
    .await;
    assert!(
        marked,
        "every row arrived but {} rows are still pending (not marked published)\n{}",
        env.pending_count().await,
        relay.log_tail(60)
    );

    // Re-read: marks may have landed after the first read.
    let rows = env.rows().await;
    let arrivals = tally.snapshot();
    let unknown: Vec<&Arrival> = arrivals
        .iter()
        .filter(|a| !in_table.contains_key(&a.message_id))
        .collect();
    let published_rolled_back: Vec<&&Arrival> = unknown
        .iter()
        .filter(|a| rolled_back.contains(&a.message_id))
        .collect();
    assert!(
        published_rolled_back.is_empty(),
        "{} rolled-back rows were published: {:?}",
        published_rolled_back.len(),
        published_rolled_back
            .iter()
            .take(5)
            .map(|a| &a.message_id)
            .collect::<Vec<_>>()
    );
    assert!(
        unknown.is_empty(),
        "{} deliveries with unknown message ids: {:?}",
        unknown.len(),
        unknown
            .iter()
            .take(5)
            .map(|a| &a.message_id)
            .collect::<Vec<_>>()
    );

    let keyed: HashMap<String, (Option<String>, i64)> = rows
        .iter()
        .map(|r| (r.message_id.to_string(), (r.partition_key.clone(), r.id)))
        .collect();
    let violations = order_violations(arrivals.iter().map(|a| Some(a.message_id.as_str())), &keyed);
    if !violations.is_empty() {
        // Evidence: every delivery with its row id, key and time.
        let t0 = arrivals.first().map(|a| a.at);
        let lines: Vec<String> = arrivals
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let (key, id) = keyed.get(&a.message_id).cloned().unwrap_or((None, -1));
                format!(
                    "#{i} +{:.3}s id {id} key {} redelivered {}",
                    t0.map_or(0.0, |t| (a.at - t).as_secs_f64()),
                    key.unwrap_or_default(),
                    a.redelivered
                )
            })
            .collect();
        let path = env.dir.join("arrivals.txt");
        save(&path, &lines.join("\n"));
        eprintln!("every delivery, in arrival order: {}", path.display());
    }
    assert!(
        violations.is_empty(),
        "ORDER: {} violations of id order per partition key among first arrivals; first: {:#?}",
        violations.len(),
        &violations[..violations.len().min(10)]
    );

    // A repeat carries the same message id; it must carry the same body too.
    let mut bodies: HashMap<&str, &[u8]> = HashMap::new();
    for a in &arrivals {
        let first = *bodies
            .entry(a.message_id.as_str())
            .or_insert(a.body.as_slice());
        assert_eq!(
            first,
            a.body.as_slice(),
            "message {} arrived with two bodies",
            a.message_id
        );
    }

    let dead: Vec<&RowState> = rows
        .iter()
        .filter(|r| r.dead_lettered_at.is_some())
        .collect();
    assert!(
        dead.is_empty(),
        "a fault dead-lettered {} good rows, e.g. id {} ({:?})",
        dead.len(),
        dead[0].id,
        dead[0].last_error
    );
    let charged: Vec<&RowState> = rows.iter().filter(|r| r.attempts > 0).collect();
    assert!(
        charged.is_empty(),
        "a fault charged {} good rows an attempt; e.g. id {} attempts {} last_error {:?}",
        charged.len(),
        charged[0].id,
        charged[0].attempts,
        charged[0].last_error
    );

    let mut counts: HashMap<&str, usize> = HashMap::new();
    for a in &arrivals {
        *counts.entry(a.message_id.as_str()).or_default() += 1;
    }
    Figures {
        published: rows.iter().filter(|r| r.published_at.is_some()).count(),
        received: arrivals.len(),
        duplicates: arrivals.len() - counts.len(),
        broker_redeliveries: arrivals.iter().filter(|a| a.redelivered).count(),
        lost: wanted
            .iter()
            .filter(|m| !counts.contains_key(m.as_str()))
            .count(),
        committed: wanted.len(),
        rolled_back: rolled_back.len(),
        charged: charged.len(),
        repeated_ids: counts
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(m, _)| m.to_string())
            .collect(),
    }
}

// ---------------------------------------------------------------------------
// The one real broker restart
// ---------------------------------------------------------------------------

/// `rabbitmqctl stop_app` on the shared broker, undone by `start` or, always,
/// on drop. A detached watchdog runs `start_app` after a deadline even if this
/// test process is killed before its drop runs.
pub struct BrokerStopped {
    watchdog: Option<Child>,
    started: bool,
}

impl BrokerStopped {
    pub fn stop_app(watchdog_after: Duration) -> BrokerStopped {
        let watchdog = Command::new("setsid")
            .args([
                "sh",
                "-c",
                &format!("sleep {}; rabbitmqctl start_app", watchdog_after.as_secs()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the start_app watchdog");
        let guard = BrokerStopped {
            watchdog: Some(watchdog),
            started: false,
        };
        rabbitmqctl(&["stop_app"]);
        guard
    }

    /// `start_app`, then `await_startup`.
    pub fn start(&mut self) {
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup", "--timeout", "120"]);
        self.started = true;
    }
}

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        if !self.started {
            let _ = Command::new("rabbitmqctl").arg("start_app").status();
            let _ = Command::new("rabbitmqctl")
                .args(["await_startup", "--timeout", "120"])
                .status();
        }
        if let Some(mut w) = self.watchdog.take() {
            // The watchdog leads its own process group: end it and its sleep.
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", w.id())])
                .status();
            let _ = w.wait();
        }
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl {args:?}: {e}"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn ms(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_pointed_at_a_proxy_keeping_credentials_and_path() {
        assert_eq!(
            url_via("amqp://u:p%40ss@db.example:5672/%2f?heartbeat=5", 4000),
            "amqp://u:p%40ss@127.0.0.1:4000/%2f?heartbeat=5"
        );
        assert_eq!(
            url_via("postgres://h/test", 1),
            "postgres://127.0.0.1:1/test"
        );
        assert_eq!(
            url_addr("amqp://guest:guest@127.0.0.1:5673/%2f", 5672),
            SocketAddr::from(([127, 0, 0, 1], 5673))
        );
        assert_eq!(
            url_addr("postgres://postgres@127.0.0.1/test", 5432),
            SocketAddr::from(([127, 0, 0, 1], 5432))
        );
    }
}
