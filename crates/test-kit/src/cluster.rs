//! Support for the cluster suite (tests/cluster.rs): the local three-node
//! RabbitMQ cluster of `scripts/rabbitmq-cluster.sh`, node outages that always
//! end (a guard starts the node again), queues and exchanges on the cluster, an
//! application that numbers rows per partition key, and the figures file.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use rand::Rng;
use tokio::sync::watch;
use uuid::Uuid;

use crate::faults::{app_connection, Workload, WriteLog, Written};
use crate::*;

/// Exit status of the script when this machine cannot run the cluster.
const EXIT_CANNOT: i32 = 3;

pub const NODES: [u8; 3] = [1, 2, 3];

fn script() -> PathBuf {
    workspace_root().join("scripts/rabbitmq-cluster.sh")
}

/// Runs the script with `args`; its status code and its output (stdout and
/// stderr).
fn run_script(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script().display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text.trim().to_string())
}

fn run_script_ok(args: &[&str]) -> String {
    let (code, text) = run_script(args);
    assert_eq!(
        code,
        Some(0),
        "scripts/rabbitmq-cluster.sh {} failed:\n{text}",
        args.join(" ")
    );
    text
}

/// How a node goes down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outage {
    /// `rabbitmqctl stop`: the whole VM stops; clients get connection.close.
    Stop,
    /// SIGKILL of the VM: a crash; clients see their TCP connections end.
    Kill,
    /// SIGSTOP of the VM: a hung node; connections stay open and silent.
    /// Undone (SIGCONT) within about 45 s, or its peers see a partition.
    Freeze,
}

/// Held by the test that uses the cluster. nextest runs cluster tests one at
/// a time anyway (group `cluster`); `cargo test` runs a binary's tests on
/// parallel threads, and two tests stopping nodes under each other would fail.
static ONE_TEST_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The running cluster: three nodes on 127.0.0.1:5681..5683, for the test
/// that holds this.
pub struct Cluster {
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl Cluster {
    /// `scripts/rabbitmq-cluster.sh start` (idempotent). Err(reason) when this
    /// machine cannot run the cluster (the test then says SKIPPED); panics
    /// when the script fails for another reason.
    pub async fn ensure() -> Result<Cluster, String> {
        let serial = ONE_TEST_AT_A_TIME.lock().await;
        let (code, text) = tokio::task::spawn_blocking(|| run_script(&["start"]))
            .await
            .expect("script task");
        match code {
            Some(0) => {
                eprintln!("{text}");
                Ok(Cluster { _serial: serial })
            }
            Some(EXIT_CANNOT) => Err(text),
            _ => panic!("scripts/rabbitmq-cluster.sh start failed ({code:?}):\n{text}"),
        }
    }

    /// `start` again for the test that holds the cluster: whether it is (or
    /// was made) healthy.
    pub async fn heal(&self) -> bool {
        let (code, text) = tokio::task::spawn_blocking(|| run_script(&["start"]))
            .await
            .expect("script task");
        eprintln!("{text}");
        code == Some(0)
    }

    pub fn port(node: u8) -> u16 {
        5680 + node as u16
    }

    /// How the relay names a node in its metrics and `status`.
    pub fn addr(node: u8) -> String {
        format!("127.0.0.1:{}", Cluster::port(node))
    }

    pub fn url(node: u8) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", Cluster::port(node))
    }

    /// The URLs of `nodes`, comma-separated, in that order.
    pub fn urls(nodes: &[u8]) -> String {
        nodes
            .iter()
            .map(|n| Cluster::url(*n))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Takes `node` down; the returned guard starts it again (on `start` or,
    /// always, on drop).
    pub async fn take_down(&self, node: u8, how: Outage) -> NodeDown {
        let verb = match how {
            Outage::Stop => "stop-node",
            Outage::Kill => "kill-node",
            Outage::Freeze => "freeze-node",
        };
        // The guard first: the node comes back even if the stop itself fails.
        let guard = NodeDown {
            node,
            how,
            started: false,
        };
        let arg = node.to_string();
        tokio::task::spawn_blocking(move || run_script_ok(&[verb, &arg]))
            .await
            .expect("script task");
        guard
    }

    /// `status` of the script (one line per node).
    pub async fn status(&self) -> String {
        tokio::task::spawn_blocking(|| run_script(&["status"]).1)
            .await
            .expect("script task")
    }
}

/// A node that is down until `start` or drop.
pub struct NodeDown {
    pub node: u8,
    how: Outage,
    started: bool,
}

impl NodeDown {
    fn undo_verb(&self) -> &'static str {
        match self.how {
            Outage::Freeze => "thaw-node",
            Outage::Stop | Outage::Kill => "start-node",
        }
    }

    /// `start-node N`, which returns once the node is back in the cluster
    /// (`thaw-node N` for a frozen node).
    pub async fn start(mut self) {
        let (verb, arg) = (self.undo_verb(), self.node.to_string());
        tokio::task::spawn_blocking(move || run_script_ok(&[verb, &arg]))
            .await
            .expect("script task");
        self.started = true;
    }
}

impl Drop for NodeDown {
    fn drop(&mut self) {
        if !self.started {
            let verb = self.undo_verb();
            let (code, text) = run_script(&[verb, &self.node.to_string()]);
            eprintln!("(guard) {verb} {}: {code:?} {text}", self.node);
        }
    }
}

// ---------------------------------------------------------------------------
// A test environment whose broker side is the cluster
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueKind {
    Quorum,
    Classic,
}

impl QueueKind {
    pub fn name(self) -> &'static str {
        match self {
            QueueKind::Quorum => "quorum",
            QueueKind::Classic => "classic",
        }
    }
}

impl TestEnv {
    /// A fresh migrated schema whose AMQP side (the env's own connection,
    /// declarations, clean-up) is cluster node `node`, which the test keeps up.
    pub async fn on_cluster(name: &str, node: u8) -> TestEnv {
        let mut env = TestEnv::new(name).await;
        let url = Cluster::url(node);
        let amqp = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to cluster node {url}: {e}"));
        env.channel = amqp.create_channel().await.expect("channel on the cluster");
        let default_broker = std::mem::replace(&mut env.amqp, amqp);
        let _ = default_broker
            .close(200, "the test uses the cluster".into())
            .await;
        env.amqp_url = url;
        env
    }

    /// A durable queue of `kind` bound to a new direct exchange with a routing
    /// key; all three unique to this test. Returns (exchange, routing key,
    /// queue). Deleted when the env drops (and expire after 15 minutes).
    pub async fn declare_bound_queue(
        &self,
        what: &str,
        kind: QueueKind,
    ) -> (String, String, String) {
        let queue = self.unique(what);
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongInt(15 * 60 * 1000));
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(kind.name().into()),
        );
        self.channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap_or_else(|e| panic!("declare {} queue {queue}: {e}", kind.name()));
        self.queues.lock().unwrap().push(queue.clone());
        let exchange = self.unique(&format!("{what}-x"));
        self.channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("declare exchange {exchange}: {e}"));
        self.exchanges.lock().unwrap().push(exchange.clone());
        let routing_key = format!("{what}.created");
        self.channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("bind {queue} to {exchange}: {e}"));
        (exchange, routing_key, queue)
    }
}

// ---------------------------------------------------------------------------
// Metrics by node
// ---------------------------------------------------------------------------

/// `outbox_relay_<family>{node="127.0.0.1:568N"}`.
pub fn node_metric(metrics: &str, family: &str, node: u8) -> Option<f64> {
    let prefix = format!("outbox_relay_{family}{{node=\"{}\"}} ", Cluster::addr(node));
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// The node whose `broker_node_connected` gauge reads 1, if exactly one does.
pub fn connected_node(metrics: &str) -> Option<u8> {
    let up: Vec<u8> = NODES
        .iter()
        .copied()
        .filter(|n| node_metric(metrics, "broker_node_connected", *n) == Some(1.0))
        .collect();
    (up.len() == 1).then(|| up[0])
}

// ---------------------------------------------------------------------------
// The application: rows numbered per partition key, through an exchange
// ---------------------------------------------------------------------------

/// Partition keys of the keyed workload.
pub const KEYS: usize = 8;

/// The application's `Workload` (tests/common/faults.rs), writing rows
/// numbered per partition key; its queries are the `Workload`'s.
pub struct KeyedWorkload {
    rows: Workload,
    /// message id -> (key, per-key sequence number) of committed rows.
    seqs: Arc<Mutex<HashMap<String, (String, u64)>>>,
}

impl std::ops::Deref for KeyedWorkload {
    type Target = Workload;

    fn deref(&self) -> &Workload {
        &self.rows
    }
}

impl KeyedWorkload {
    /// Writes to `schema.messages` at `db_url`: transactions of 1 to 5 rows to
    /// `exchange`/`routing_key`, about one in six rolled back, keys `k0..k7`,
    /// each committed row numbered 1, 2, 3, ... within its key (a rolled-back
    /// number is reused, so the committed numbers of a key have no gaps). The
    /// body is `<key> <n>`. `pause` is the pace between transactions.
    pub fn start(
        db_url: &str,
        schema: &str,
        exchange: &str,
        routing_key: &str,
        pause: Duration,
    ) -> KeyedWorkload {
        let seqs = Arc::new(Mutex::new(HashMap::new()));
        let target = KeyedTarget {
            db_url: db_url.to_string(),
            schema: schema.to_string(),
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            pause,
        };
        let rows =
            Workload::spawn(|log, stop_rx| keyed_write_loop(target, log, seqs.clone(), stop_rx));
        KeyedWorkload { rows, seqs }
    }

    /// Stops writing; the write log and each committed row's (key, number).
    pub async fn stop(self) -> (WriteLog, HashMap<String, (String, u64)>) {
        let log = self.rows.stop().await;
        let seqs = self.seqs.lock().unwrap().clone();
        (log, seqs)
    }
}

struct KeyedTarget {
    db_url: String,
    schema: String,
    exchange: String,
    routing_key: String,
    pause: Duration,
}

async fn keyed_write_loop(
    target: KeyedTarget,
    log: Arc<Mutex<WriteLog>>,
    seqs: Arc<Mutex<HashMap<String, (String, u64)>>>,
    stop: watch::Receiver<bool>,
) {
    let sql = format!(
        "INSERT INTO \"{}\".messages (message_id, exchange, routing_key, partition_key, payload,
                                      headers, content_type)
         VALUES ($1, $2, $3, $4, $5, $6, 'text/plain')",
        target.schema
    );
    let mut next: HashMap<String, u64> = HashMap::new();
    let mut client: Option<tokio_postgres::Client> = None;
    while !*stop.borrow() {
        let Some(c) = app_connection(&target.db_url, &mut client, &log).await else {
            continue;
        };
        let (keys, commit) = {
            let mut rng = rand::rng();
            let n = rng.random_range(1..=5);
            let keys: Vec<String> = (0..n)
                .map(|_| format!("k{}", rng.random_range(0..KEYS)))
                .collect();
            (keys, rng.random_bool(0.83))
        };
        // Numbers for this transaction's rows, taken back if it does not commit.
        let before = next.clone();
        let rows: Vec<(Uuid, String, u64)> = keys
            .into_iter()
            .map(|key| {
                let n = next.entry(key.clone()).or_insert(0);
                *n += 1;
                (Uuid::new_v4(), key, *n)
            })
            .collect();
        let result: Result<(), tokio_postgres::Error> = async {
            let tx = c.transaction().await?;
            for (mid, key, n) in &rows {
                let headers = serde_json::json!({ "key_seq": n });
                let body = format!("{key} {n}").into_bytes();
                tx.execute(
                    &sql,
                    &[
                        mid,
                        &target.exchange,
                        &target.routing_key,
                        key,
                        &body,
                        &headers,
                    ],
                )
                .await?;
            }
            if commit {
                tx.commit().await
            } else {
                tx.rollback().await
            }
        }
        .await;
        let now = Instant::now();
        {
            let mut l = log.lock().unwrap();
            match result {
                Ok(()) if commit => {
                    let mut s = seqs.lock().unwrap();
                    for (mid, key, n) in &rows {
                        l.committed.push(Written {
                            message_id: *mid,
                            key: Some(key.clone()),
                            committed_at: now,
                        });
                        s.insert(mid.to_string(), (key.clone(), *n));
                    }
                }
                Ok(()) => {
                    l.rolled_back.extend(rows.iter().map(|(mid, _, _)| *mid));
                    next = before;
                }
                Err(e) => {
                    // The database is not under test here: an error is a
                    // failure of the run, reported by `uncertain`.
                    l.errors.push(e.to_string());
                    l.uncertain.extend(rows.iter().map(|(mid, _, _)| *mid));
                    client = None;
                }
            }
        }
        tokio::time::sleep(target.pause).await;
    }
}

/// Per key, the numbers of first arrivals must be exactly 1, 2, 3, ... (every
/// committed row, in order; repeats dropped). `arrived`: message ids in
/// arrival order; `seqs`: message id -> (key, number). Returns the
/// violations, described.
pub fn key_sequence_violations<'a>(
    arrived: impl IntoIterator<Item = &'a str>,
    seqs: &HashMap<String, (String, u64)>,
) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut last: HashMap<&str, u64> = HashMap::new();
    let mut out = Vec::new();
    for (pos, mid) in arrived.into_iter().enumerate() {
        if !seen.insert(mid) {
            continue;
        }
        let Some((key, n)) = seqs.get(mid) else {
            continue;
        };
        let prev = last.insert(key.as_str(), *n).unwrap_or(0);
        if *n != prev + 1 {
            out.push(format!(
                "key {key}: number {n} arrived (delivery #{pos}) right after {prev}"
            ));
        }
    }
    let mut max: HashMap<&str, u64> = HashMap::new();
    for (key, n) in seqs.values() {
        let m = max.entry(key.as_str()).or_insert(0);
        *m = (*m).max(*n);
    }
    for (key, m) in max {
        let got = last.get(key).copied().unwrap_or(0);
        if got != m {
            out.push(format!(
                "key {key}: last number to arrive {got}, committed up to {m}"
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------

/// p-quantile (0..=1) of `values` (sorted here); None when empty.
pub fn quantile(values: &mut [f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((values.len() - 1) as f64 * p).round() as usize;
    Some(values[i])
}

/// Prints each line (eprintln, so `--no-capture` shows it) and keeps them in
/// `target/cluster-figures.txt`, replacing what `test` wrote there before.
pub fn report_figures(test: &str, lines: &[String]) {
    let tag = format!("[{test}]");
    for l in lines {
        eprintln!("{tag} {l}");
    }
    let path = figures_path();
    let old = fs::read_to_string(&path).unwrap_or_default();
    let mut text: String = old
        .lines()
        .filter(|l| !l.starts_with(&tag))
        .map(|l| format!("{l}\n"))
        .collect();
    let when = humantime_now();
    let _ = writeln!(text, "{tag} run at {when}");
    for l in lines {
        let _ = writeln!(text, "{tag} {l}");
    }
    save(&path, &text);
    eprintln!("{tag} figures written to {}", path.display());
}

/// `target/cluster-figures.txt` (beside `target/tmp`).
pub fn figures_path() -> PathBuf {
    let tests = tests_dir();
    let tmp = tests.parent().unwrap_or(&tests);
    tmp.parent().unwrap_or(tmp).join("cluster-figures.txt")
}

fn humantime_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

// ---------------------------------------------------------------------------
// What the relay says, sampled in the background
// ---------------------------------------------------------------------------

/// One reading of the relay's /metrics.
#[derive(Clone, Copy, Debug)]
pub struct NodeSample {
    pub at: Instant,
    /// The node whose broker_node_connected reads 1 (None: none, or no answer).
    pub node: Option<u8>,
    /// messages_published_total (None: no answer).
    pub published: Option<f64>,
}

/// Reads the relay's /metrics every 50 ms and keeps the connected node and
/// the published count, so the moment of a switch or a resumption is seen
/// while the test is busy stopping nodes.
pub struct NodeProbe {
    samples: Arc<Mutex<Vec<NodeSample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl NodeProbe {
    pub fn start(relay: &Relay) -> NodeProbe {
        let addr = relay.metrics_addr();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let s = samples.clone();
        let task = tokio::spawn(async move {
            loop {
                let sample = match http_get(addr, "/metrics").await {
                    Ok((200, m)) => NodeSample {
                        at: Instant::now(),
                        node: connected_node(&m),
                        published: metric_value(&m, "outbox_relay_messages_published_total"),
                    },
                    _ => NodeSample {
                        at: Instant::now(),
                        node: None,
                        published: None,
                    },
                };
                s.lock().unwrap().push(sample);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        NodeProbe { samples, task }
    }

    /// The first sample at or after `from` that shows the relay on `node`.
    pub fn first_on(&self, node: u8, from: Instant) -> Option<Instant> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.at >= from && s.node == Some(node))
            .map(|s| s.at)
    }

    /// When publishing went on on `node` after `from`: the first sample on
    /// `node` whose published count is above the last count read before the
    /// relay was seen on `node` (nothing is confirmed on a lost connection).
    pub fn first_publish_on(&self, node: u8, from: Instant) -> Option<Instant> {
        let samples = self.samples.lock().unwrap();
        let mut before = None;
        for s in samples.iter().filter(|s| s.at >= from) {
            if s.node != Some(node) {
                before = s.published.or(before);
                continue;
            }
            match (s.published, before) {
                (Some(p), Some(b)) if p > b => return Some(s.at),
                (Some(p), None) => before = Some(p),
                _ => {}
            }
        }
        None
    }
}

impl Drop for NodeProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}
