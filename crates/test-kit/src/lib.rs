//! The test kit of outbox-relay: every integration test in `tests/` (and
//! later the benchmark) uses it, and nothing else, to set up and drive a relay.
//!
//! - [`TestEnv`]: one test's own PostgreSQL schema, queues and exchanges, so
//!   tests run in parallel against one PostgreSQL and one RabbitMQ.
//! - [`Launch`]: the one way to start a relay, the real binary in a child
//!   process: `Launch::new().args(..).start(&env)` waits until it is healthy,
//!   `.spawn(&env)` does not wait. Its output goes to a file that is printed
//!   when a test fails.
//! - [`wait_until`]: the one way to wait for a condition. Nothing here sleeps
//!   a fixed time to wait for something that can be observed: `wait_until`
//!   polls a condition with a bound.
//!
//! Addresses come from `OUTBOX_TEST_DATABASE_URL` and `OUTBOX_TEST_AMQP_URL`;
//! the relay binary from `OUTBOX_TEST_RELAY_BIN` (see [`relay_bin`]).

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Transaction};
use uuid::Uuid;

/// The relay binary the tests run: `OUTBOX_TEST_RELAY_BIN` when set, else
/// `outbox-relay` in the cargo profile directory of the running test binary
/// (`target/debug/deps/<test>` -> `target/debug/outbox-relay`), which cargo
/// builds before it runs any integration test of the root package.
pub fn relay_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("OUTBOX_TEST_RELAY_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("the path of the running test binary");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap_or_else(|| panic!("{} has no profile directory", exe.display()));
    let bin = profile_dir.join(format!("outbox-relay{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "no relay binary at {}: run the tests with cargo from the workspace, or set \
         OUTBOX_TEST_RELAY_BIN to the outbox-relay binary",
        bin.display()
    );
    bin
}

/// The repository's root (the workspace), for its scripts and files.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// Where tests keep their logs and other diagnostics: `OUTBOX_TEST_DIR` when
/// set, else `tmp/outbox-relay-tests` in cargo's target directory (beside
/// the profile directory of the running test binary).
pub fn tests_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("OUTBOX_TEST_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the path of the running test binary");
    exe.ancestors()
        .nth(3)
        .map(|target| target.join("tmp"))
        .unwrap_or_else(std::env::temp_dir)
        .join("outbox-relay-tests")
}

pub fn database_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

pub fn amqp_url() -> String {
    std::env::var("OUTBOX_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// Timeouts are generous because tests run in parallel on two shared cores, but
/// always bounded.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
pub const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// Polls `condition` every 50 ms until it holds (true) or `timeout` passes (false).
pub async fn wait_until<F>(timeout: Duration, mut condition: F) -> bool
where
    F: AsyncFnMut() -> bool,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// A command for the relay binary with no OUTBOX_* variable inherited from the
/// developer's shell, so a test sees only the settings it passes.
pub fn relay_command() -> Command {
    command_for(&relay_bin())
}

/// Like [`relay_command`] for another binary (an older release).
pub fn command_for(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OUTBOX_") {
            cmd.env_remove(&key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

#[derive(Debug)]
pub struct CliOutput {
    /// None when the process had to be killed at the timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    pub fn describe(&self) -> String {
        format!(
            "status: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    /// Asserts that the command exited with `code`; the message shows its
    /// whole output.
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &CliOutput {
        assert_eq!(self.code(), Some(code), "{}", self.describe());
        self
    }

    /// Asserts that stdout contains `text`; the message shows the whole output.
    #[track_caller]
    pub fn assert_stdout_has(&self, text: &str) -> &CliOutput {
        self.assert_has("stdout", &self.stdout, text)
    }

    /// Asserts that stderr contains `text`; the message shows the whole output.
    #[track_caller]
    pub fn assert_stderr_has(&self, text: &str) -> &CliOutput {
        self.assert_has("stderr", &self.stderr, text)
    }

    /// Asserts that neither stdout nor stderr contains `secret`; `what`
    /// names it in the message (never the secret itself).
    #[track_caller]
    pub fn assert_never_printed(&self, secret: &str, what: &str) -> &CliOutput {
        assert!(
            !self.stdout.contains(secret) && !self.stderr.contains(secret),
            "{what} leaked\n{}",
            self.describe()
        );
        self
    }

    #[track_caller]
    fn assert_has(&self, stream: &str, output: &str, text: &str) -> &CliOutput {
        assert!(
            output.contains(text),
            "{stream} lacks {text:?}\n{}",
            self.describe()
        );
        self
    }
}

/// Runs the binary to completion with `args` and extra environment variables,
/// killing it after `timeout` (then `status` is None).
pub async fn run_cli(args: &[&str], envs: &[(&str, &str)], timeout: Duration) -> CliOutput {
    let mut cmd = relay_command();
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", relay_bin().display()));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let mut status = None;
    let exited = wait_until(timeout, async || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    })
    .await;
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    CliOutput {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

/// Runs `outbox-relay <args> --database-url .. --schema ..`, plus
/// `--amqp-url ..` for the subcommands that talk to the broker.
async fn cli_for(
    args: &[&str],
    (db_url, amqp_url): (&str, &str),
    schema: &str,
    timeout: Duration,
) -> CliOutput {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--database-url", db_url, "--schema", schema]);
    if matches!(args.first(), Some(&("run" | "check" | "replay"))) {
        all.extend(["--amqp-url", amqp_url]);
    }
    run_cli(&all, &[], timeout).await
}

/// A port on 127.0.0.1 that refuses every connection for as long as this
/// lives: bound, so no other process can take it, but never listening.
pub struct ClosedPort {
    _socket: tokio::net::TcpSocket,
    pub port: u16,
}

impl Default for ClosedPort {
    fn default() -> ClosedPort {
        ClosedPort::new()
    }
}

impl ClosedPort {
    /// 127.0.0.1 and the port.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn new() -> ClosedPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("create a TCP socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind 127.0.0.1:0");
        let port = socket.local_addr().expect("bound address").port();
        ClosedPort {
            _socket: socket,
            port,
        }
    }
}

/// The metrics address the relay's start line names (`outbox relay started
/// ... metrics_addr=127.0.0.1:37625`, or the field `metrics_addr` of that
/// line as JSON). None until the relay logged it.
pub fn started_metrics_addr(logs: &str) -> Option<SocketAddr> {
    logs.lines()
        .filter(|line| line.contains("outbox relay started"))
        .find_map(|line| {
            let addr = if line.trim_start().starts_with('{') {
                let json: Value = serde_json::from_str(line).ok()?;
                let field = json
                    .pointer("/fields/metrics_addr")
                    .or_else(|| json.get("metrics_addr"))?;
                field.as_str()?.to_string()
            } else {
                line.split_whitespace()
                    .find_map(|word| word.strip_prefix("metrics_addr="))?
                    .to_string()
            };
            addr.parse().ok()
        })
}

// ---------------------------------------------------------------------------
// Test environment: one schema, its queues and exchanges
// ---------------------------------------------------------------------------

pub struct TestEnv {
    pub name: String,
    /// The outbox schema of this test (unique).
    pub schema: String,
    pub db_url: String,
    pub amqp_url: String,
    /// Where relay logs and other diagnostics of this test go.
    pub dir: PathBuf,
    pub pg: tokio::sync::Mutex<Client>,
    pub amqp: Connection,
    pub channel: Channel,
    queues: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
    extra_schemas: Mutex<Vec<String>>,
    relay_seq: AtomicUsize,
    name_seq: AtomicUsize,
}

impl TestEnv {
    /// A fresh schema `t_<name>_<random>`, migrated with `outbox-relay migrate`.
    pub async fn new(name: &str) -> TestEnv {
        let env = TestEnv::new_unmigrated(name).await;
        env.migrate().await;
        env
    }

    /// The opening of most delivery tests: `new(name)`, a queue `events`, and
    /// a collector on it.
    pub async fn with_events_queue(name: &str, ack: AckMode) -> (TestEnv, String, Collector) {
        let env = TestEnv::new(name).await;
        let queue = env.declare_queue("events").await;
        let collector = env.consume(&queue, ack).await;
        (env, queue, collector)
    }

    /// Like `new` but without running the migrations.
    pub async fn new_unmigrated(name: &str) -> TestEnv {
        let suffix: u32 = rand::random();
        let short: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let schema = format!("t_{short}_{suffix:08x}");
        let db_url = database_url();
        let amqp_url = amqp_url();
        let dir = tests_dir().join(&schema);
        fs::create_dir_all(&dir).expect("create test dir");

        let pg = connect_db(&db_url).await;
        let amqp = Connection::connect(&amqp_url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to RabbitMQ at {amqp_url}: {e}"));
        let channel = amqp.create_channel().await.expect("create AMQP channel");

        TestEnv {
            name: name.to_string(),
            schema,
            db_url,
            amqp_url,
            dir,
            pg: tokio::sync::Mutex::new(pg),
            amqp,
            channel,
            queues: Mutex::new(Vec::new()),
            exchanges: Mutex::new(Vec::new()),
            extra_schemas: Mutex::new(Vec::new()),
            relay_seq: AtomicUsize::new(0),
            name_seq: AtomicUsize::new(0),
        }
    }

    /// `outbox-relay migrate --schema <schema>`; panics unless it exits 0.
    pub async fn migrate(&self) -> CliOutput {
        let out = self.cli(&["migrate"], SETUP_TIMEOUT).await;
        assert_eq!(
            out.code(),
            Some(0),
            "`outbox-relay migrate --schema {}` failed\n{}",
            self.schema,
            out.describe()
        );
        out
    }

    /// Runs `outbox-relay <args> --database-url .. --schema ..`, plus
    /// `--amqp-url ..` for the subcommands that talk to the broker.
    pub async fn cli(&self, args: &[&str], timeout: Duration) -> CliOutput {
        self.cli_on_schema(args, &self.schema, timeout).await
    }

    /// Like `cli` for another schema name.
    pub async fn cli_on_schema(&self, args: &[&str], schema: &str, timeout: Duration) -> CliOutput {
        let urls = (self.db_url.as_str(), self.amqp_url.as_str());
        cli_for(args, urls, schema, timeout).await
    }

    /// Like `cli` with other database and broker URLs (a wrong password, a
    /// port nothing listens on).
    pub async fn cli_via(&self, args: &[&str], urls: (&str, &str), timeout: Duration) -> CliOutput {
        cli_for(args, urls, &self.schema, timeout).await
    }

    /// Registers another schema this test creates, dropped with the env.
    pub fn own_schema(&self, schema: &str) {
        self.extra_schemas.lock().unwrap().push(schema.to_string());
    }

    /// A unique name for a queue or exchange of this test.
    pub fn unique(&self, what: &str) -> String {
        let n = self.name_seq.fetch_add(1, Ordering::Relaxed);
        format!("{}.{what}.{n}", self.schema)
    }

    /// Declares a durable queue with a unique name (deleted when the env drops;
    /// `x-expires` removes it anyway if the test process dies).
    pub async fn declare_queue(&self, what: &str) -> String {
        let name = self.unique(what);
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongInt(15 * 60 * 1000));
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap_or_else(|e| panic!("declare queue {name}: {e}"));
        self.queues.lock().unwrap().push(name.clone());
        name
    }

    /// Declares an exchange with a unique name (deleted when the env drops).
    pub async fn declare_exchange(&self, what: &str, kind: ExchangeKind) -> String {
        let name = self.unique(what);
        self.declare_exchange_named(&name, kind).await;
        name
    }

    /// Declares an exchange under a name chosen before (e.g. one rows already
    /// point at); deleted when the env drops.
    pub async fn declare_exchange_named(&self, name: &str, kind: ExchangeKind) {
        self.channel
            .exchange_declare(
                name.into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("declare exchange {name}: {e}"));
        self.exchanges.lock().unwrap().push(name.to_string());
    }

    pub async fn bind(&self, queue: &str, exchange: &str, routing_key: &str) {
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("bind {queue} to {exchange} with {routing_key}: {e}"));
    }

    /// Messages ready in `queue` (passive declare).
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let channel = self.amqp.create_channel().await.expect("channel");
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("passive declare {queue}: {e}"));
        let _ = channel.close(200, "bye".into()).await;
        q.message_count()
    }

    /// Starts collecting deliveries from `queue`.
    pub async fn consume(&self, queue: &str, ack: AckMode) -> Collector {
        Collector::start(&self.amqp, queue, ack).await
    }

    /// A new database connection (for concurrent writers).
    pub async fn connect_db(&self) -> Client {
        connect_db(&self.db_url).await
    }

    /// Runs one statement on the test's connection; returns the rows it touched.
    pub async fn exec(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> u64 {
        let pg = self.pg.lock().await;
        pg.execute(sql, params)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// `UPDATE schema.messages SET <assignments> WHERE id = <id>` (backdating,
    /// parking or charging one row by hand).
    pub async fn update_row(&self, id: i64, assignments: &str) {
        let sql = format!("UPDATE {} SET {assignments} WHERE id = $1", self.table());
        let touched = self.exec(&sql, &[&id]).await;
        assert_eq!(touched, 1, "{sql} with id {id} touched {touched} rows");
    }

    /// `schema.messages`, quoted.
    pub fn table(&self) -> String {
        format!("\"{}\".messages", self.schema)
    }

    // -- writing rows ------------------------------------------------------

    /// Inserts `rows` with plain INSERTs in one transaction, then commits.
    pub async fn insert_committed(&self, rows: &[NewRow]) -> Vec<Inserted> {
        self.insert_tx(rows, TxEnd::Commit).await
    }

    /// Inserts `rows` in one transaction, then rolls it back. Returns what the
    /// rows were given inside the transaction, so a test can look for them.
    pub async fn insert_rolled_back(&self, rows: &[NewRow]) -> Vec<Inserted> {
        self.insert_tx(rows, TxEnd::Rollback).await
    }

    pub async fn insert_tx(&self, rows: &[NewRow], end: TxEnd) -> Vec<Inserted> {
        let mut pg = self.pg.lock().await;
        let tx = pg.transaction().await.expect("begin");
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(insert_row(&tx, &self.schema, row).await);
        }
        end.finish(tx).await;
        out
    }

    /// Calls `schema.enqueue(...)` for each message in one transaction.
    pub async fn enqueue_tx(&self, msgs: &[Enqueue], end: TxEnd) -> Vec<Inserted> {
        let mut pg = self.pg.lock().await;
        let tx = pg.transaction().await.expect("begin");
        let mut out = Vec::with_capacity(msgs.len());
        for msg in msgs {
            out.push(enqueue(&tx, &self.schema, msg).await);
        }
        end.finish(tx).await;
        out
    }

    /// Inserts `count` small rows server-side (fast), all to `routing_key` on
    /// the default exchange, payload = the row's ordinal as text, partition key
    /// `k<ordinal % keys>` when `keys > 0`.
    pub async fn insert_bulk(&self, routing_key: &str, count: i64, keys: i64) -> Vec<Inserted> {
        let pg = self.pg.lock().await;
        let sql = format!(
            "INSERT INTO {} (routing_key, payload, partition_key, content_type)
             SELECT $1, convert_to(g::text, 'UTF8'),
                    CASE WHEN $3::bigint > 0 THEN 'k' || (g % $3::bigint) END, 'text/plain'
             FROM generate_series(1, $2::bigint) g
             RETURNING id, message_id",
            self.table()
        );
        let rows = pg
            .query(&sql, &[&routing_key, &count, &keys])
            .await
            .expect("bulk insert");
        rows.iter()
            .map(|r| Inserted {
                id: r.get(0),
                message_id: r.get(1),
            })
            .collect()
    }

    // -- reading rows ------------------------------------------------------

    pub async fn rows(&self) -> Vec<RowState> {
        let pg = self.pg.lock().await;
        let sql = format!(
            "SELECT id, message_id, partition_key, created_at, available_at, published_at,
                    dead_lettered_at, attempts, last_error, routing_key, exchange
             FROM {} ORDER BY id",
            self.table()
        );
        pg.query(&sql, &[])
            .await
            .expect("read rows")
            .iter()
            .map(|r| RowState {
                id: r.get(0),
                message_id: r.get(1),
                partition_key: r.get(2),
                created_at: r.get(3),
                available_at: r.get(4),
                published_at: r.get(5),
                dead_lettered_at: r.get(6),
                attempts: r.get(7),
                last_error: r.get(8),
                routing_key: r.get(9),
                exchange: r.get(10),
            })
            .collect()
    }

    /// Waits until every row of `written` is marked published; panics with
    /// the rows still unmarked and `relay`'s log otherwise.
    pub async fn wait_published(&self, written: &[Inserted], relay: &Relay) {
        let wanted: HashSet<i64> = written.iter().map(|i| i.id).collect();
        let marked = wait_until(ARRIVAL_TIMEOUT, async || {
            let rows = self.rows().await;
            rows.iter()
                .filter(|r| wanted.contains(&r.id))
                .all(|r| r.published_at.is_some())
        })
        .await;
        assert!(
            marked,
            "rows not all marked published within {ARRIVAL_TIMEOUT:?}: {:?}\n{}",
            self.rows()
                .await
                .iter()
                .filter(|r| wanted.contains(&r.id) && r.published_at.is_none())
                .collect::<Vec<_>>(),
            relay.log_tail(100)
        );
    }

    /// Waits until row `id` is dead-lettered and returns it; panics with the
    /// row and `relay`'s log otherwise.
    pub async fn wait_parked(&self, id: i64, relay: &Relay) -> RowState {
        let parked = wait_until(ARRIVAL_TIMEOUT, async || {
            let rows = self.rows().await;
            rows.iter()
                .any(|r| r.id == id && r.dead_lettered_at.is_some())
        })
        .await;
        let row = self
            .rows()
            .await
            .into_iter()
            .find(|r| r.id == id)
            .expect("the row exists");
        assert!(
            parked,
            "row {id} not dead-lettered within {ARRIVAL_TIMEOUT:?}: {row:?}\n{}",
            relay.log_tail(100)
        );
        row
    }

    /// Rows with `published_at` set.
    pub async fn published_count(&self) -> i64 {
        self.scalar_i64(&format!(
            "SELECT count(*) FROM {} WHERE published_at IS NOT NULL",
            self.table()
        ))
        .await
    }

    /// The message ids of the rows marked published.
    pub async fn published_message_ids(&self) -> HashSet<String> {
        self.rows()
            .await
            .iter()
            .filter(|r| r.published_at.is_some())
            .map(|r| r.message_id.to_string())
            .collect()
    }

    pub async fn pending_count(&self) -> i64 {
        self.scalar_i64(&format!(
            "SELECT count(*) FROM {} WHERE published_at IS NULL AND dead_lettered_at IS NULL",
            self.table()
        ))
        .await
    }

    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        let pg = self.pg.lock().await;
        pg.query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// The database clock.
    pub async fn db_now(&self) -> SystemTime {
        let pg = self.pg.lock().await;
        pg.query_one("SELECT clock_timestamp()", &[])
            .await
            .expect("clock")
            .get(0)
    }

    /// Whether the schema exists.
    pub async fn schema_exists(&self, schema: &str) -> bool {
        let pg = self.pg.lock().await;
        pg.query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .await
        .expect("schema lookup")
        .get(0)
    }

    /// Everything migrate can create or change in `schema`: object identities
    /// (oids change if something is dropped and re-created) and a digest of
    /// every table's rows.
    pub async fn schema_snapshot(&self, schema: &str) -> Vec<String> {
        let pg = self.pg.lock().await;
        let mut out = Vec::new();
        let objects = pg
            .query(
                "SELECT 'rel ' || c.relkind::text || ' ' || c.relname || ' ' || c.oid::text
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1
                 UNION ALL
                 SELECT 'fn ' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ') ' || p.oid::text
                   FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                  WHERE n.nspname = $1
                 UNION ALL
                 SELECT 'trigger ' || t.tgname || ' ' || t.oid::text
                   FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND NOT t.tgisinternal
                 ORDER BY 1",
                &[&schema],
            )
            .await
            .expect("catalog snapshot");
        out.extend(objects.iter().map(|r| r.get::<_, String>(0)));
        let tables = pg
            .query(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') ORDER BY 1",
                &[&schema],
            )
            .await
            .expect("table list");
        for t in tables {
            let table: String = t.get(0);
            let sql = format!(
                "SELECT count(*)::text || ' ' || coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '-')
                   FROM \"{schema}\".\"{table}\" x"
            );
            let digest: String = pg.query_one(&sql, &[]).await.expect("table digest").get(0);
            out.push(format!("rows {table} {digest}"));
        }
        out
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        let queues = std::mem::take(&mut *self.queues.lock().unwrap());
        let exchanges = std::mem::take(&mut *self.exchanges.lock().unwrap());
        let schema = self.schema.clone();
        let mut schemas = std::mem::take(&mut *self.extra_schemas.lock().unwrap());
        schemas.push(schema.clone());
        let db_url = self.db_url.clone();
        let amqp_url = self.amqp_url.clone();
        if failed {
            eprintln!(
                "test failed: kept schema {schema} for inspection; diagnostics in {}",
                self.dir.display()
            );
        }
        // Drop cannot await: clean up on a thread with its own small runtime.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let Ok(rt) = rt else { return };
            rt.block_on(async move {
                let _ = tokio::time::timeout(Duration::from_secs(20), async {
                    if let Ok(conn) =
                        Connection::connect(&amqp_url, ConnectionProperties::default()).await
                    {
                        if let Ok(ch) = conn.create_channel().await {
                            for q in &queues {
                                let _ = ch
                                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                                    .await;
                            }
                            for x in &exchanges {
                                let _ = ch
                                    .exchange_delete(
                                        x.as_str().into(),
                                        ExchangeDeleteOptions::default(),
                                    )
                                    .await;
                            }
                        }
                        let _ = conn.close(200, "test done".into()).await;
                    }
                    if !failed {
                        if let Ok((client, conn)) = tokio_postgres::connect(&db_url, NoTls).await {
                            tokio::spawn(conn);
                            for s in &schemas {
                                let _ = client
                                    .batch_execute(&format!(
                                        "DROP SCHEMA IF EXISTS \"{s}\" CASCADE"
                                    ))
                                    .await;
                            }
                        }
                    }
                })
                .await;
            });
        });
        let _ = cleanup.join();
    }
}

pub async fn connect_db(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

// ---------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxEnd {
    Commit,
    Rollback,
}

impl TxEnd {
    pub async fn finish(self, tx: Transaction<'_>) {
        match self {
            TxEnd::Commit => tx.commit().await.expect("commit"),
            TxEnd::Rollback => tx.rollback().await.expect("rollback"),
        }
    }
}

/// What a written row got: its `id` and `message_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Inserted {
    pub id: i64,
    pub message_id: Uuid,
}

/// A row for a plain INSERT into `schema.messages`.
#[derive(Clone, Debug)]
pub struct NewRow {
    /// None: the column default (a random uuid).
    pub message_id: Option<Uuid>,
    pub exchange: String,
    pub routing_key: String,
    pub partition_key: Option<String>,
    pub payload: Vec<u8>,
    pub content_type: Option<String>,
    pub message_type: Option<String>,
    pub correlation_id: Option<String>,
    pub headers: Value,
    /// `available_at = now() + this many seconds` (database clock); None: default.
    pub available_in_secs: Option<f64>,
}

impl NewRow {
    /// A row to `queue` through the default exchange.
    pub fn to_queue(queue: &str, payload: impl Into<Vec<u8>>) -> NewRow {
        NewRow {
            message_id: None,
            exchange: String::new(),
            routing_key: queue.to_string(),
            partition_key: None,
            payload: payload.into(),
            content_type: None,
            message_type: None,
            correlation_id: None,
            headers: Value::Object(Default::default()),
            available_in_secs: None,
        }
    }

    /// `n` rows to `queue` through the default exchange, payloads `m0`,
    /// `m1`, ... in that order.
    pub fn numbered(queue: &str, n: usize) -> Vec<NewRow> {
        (0..n)
            .map(|i| NewRow::to_queue(queue, format!("m{i}")))
            .collect()
    }

    pub fn key(mut self, partition_key: &str) -> NewRow {
        self.partition_key = Some(partition_key.to_string());
        self
    }
}

pub async fn insert_row(tx: &Transaction<'_>, schema: &str, row: &NewRow) -> Inserted {
    let sql = format!(
        "INSERT INTO \"{schema}\".messages
            (message_id, exchange, routing_key, partition_key, payload, content_type,
             message_type, correlation_id, headers, available_at)
         VALUES (coalesce($1, gen_random_uuid()), $2, $3, $4, $5, $6, $7, $8, $9,
                 CASE WHEN $10::float8 IS NULL THEN now()
                      ELSE now() + make_interval(secs => $10::float8) END)
         RETURNING id, message_id"
    );
    let r = tx
        .query_one(
            &sql,
            &[
                &row.message_id,
                &row.exchange,
                &row.routing_key,
                &row.partition_key,
                &row.payload,
                &row.content_type,
                &row.message_type,
                &row.correlation_id,
                &row.headers,
                &row.available_in_secs,
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("insert into {schema}.messages: {e}"));
    Inserted {
        id: r.get(0),
        message_id: r.get(1),
    }
}

/// The payload argument of `schema.enqueue`, which has one overload per type.
#[derive(Clone, Debug)]
pub enum EnqueuePayload {
    Json(Value),
    Text(String),
    Bytes(Vec<u8>),
}

/// A call of `schema.enqueue(exchange, routing_key, payload, headers,
/// partition_key, message_type, available_at)` (the contract's positional
/// arguments), plus `correlation_id => ..` when set.
#[derive(Clone, Debug)]
pub struct Enqueue {
    pub exchange: String,
    pub routing_key: String,
    pub payload: EnqueuePayload,
    pub headers: Value,
    pub partition_key: Option<String>,
    pub message_type: Option<String>,
    pub available_in_secs: Option<f64>,
    pub correlation_id: Option<String>,
}

impl Enqueue {
    pub fn to_queue(queue: &str, payload: EnqueuePayload) -> Enqueue {
        Enqueue {
            exchange: String::new(),
            routing_key: queue.to_string(),
            payload,
            headers: Value::Object(Default::default()),
            partition_key: None,
            message_type: None,
            available_in_secs: None,
            correlation_id: None,
        }
    }
}

pub async fn enqueue(tx: &Transaction<'_>, schema: &str, msg: &Enqueue) -> Inserted {
    let cast = match msg.payload {
        EnqueuePayload::Json(_) => "jsonb",
        EnqueuePayload::Text(_) => "text",
        EnqueuePayload::Bytes(_) => "bytea",
    };
    let correlation = if msg.correlation_id.is_some() {
        ", correlation_id => $8"
    } else {
        ""
    };
    let sql = format!(
        "SELECT \"{schema}\".enqueue($1, $2, $3::{cast}, $4::jsonb, $5::text, $6::text,
             now() + make_interval(secs => coalesce($7::float8, 0)){correlation})"
    );
    let secs = msg.available_in_secs;
    let json;
    let text;
    let bytes;
    let payload: &(dyn tokio_postgres::types::ToSql + Sync) = match &msg.payload {
        EnqueuePayload::Json(v) => {
            json = v.clone();
            &json
        }
        EnqueuePayload::Text(s) => {
            text = s.clone();
            &text
        }
        EnqueuePayload::Bytes(b) => {
            bytes = b.clone();
            &bytes
        }
    };
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
        &msg.exchange,
        &msg.routing_key,
        payload,
        &msg.headers,
        &msg.partition_key,
        &msg.message_type,
        &secs,
    ];
    if let Some(c) = &msg.correlation_id {
        params.push(c);
    }
    let message_id: Uuid = tx
        .query_one(&sql, &params)
        .await
        .unwrap_or_else(|e| panic!("{schema}.enqueue: {e}"))
        .get(0);
    let id: i64 = tx
        .query_one(
            &format!("SELECT id FROM \"{schema}\".messages WHERE message_id = $1"),
            &[&message_id],
        )
        .await
        .expect("read back enqueued row")
        .get(0);
    Inserted { id, message_id }
}

/// A row as the relay left it.
#[derive(Clone, Debug)]
pub struct RowState {
    pub id: i64,
    pub message_id: Uuid,
    pub partition_key: Option<String>,
    pub created_at: SystemTime,
    pub available_at: SystemTime,
    pub published_at: Option<SystemTime>,
    pub dead_lettered_at: Option<SystemTime>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub routing_key: String,
    pub exchange: String,
}

pub fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// The relay under test
// ---------------------------------------------------------------------------

/// How a [`Launch`] passes the connection settings (database, broker,
/// schema, metrics address 127.0.0.1:0, instance id).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Settings {
    /// As flags of `outbox-relay run`.
    #[default]
    Flags,
    /// OUTBOX_* variables only; `Launch::env` may add or override (e.g. *_FILE).
    Environment,
    /// None: the relay gets only `--metrics-addr 127.0.0.1:0` and what
    /// `Launch::args` and `Launch::env` give (a test of the settings themselves).
    Given,
}

/// The one way to start a relay under test: `outbox-relay run` as a child
/// process, for a [`TestEnv`]'s schema, with the env's URLs unless others are
/// given, extra flags and extra environment variables (FAILPOINTS, ...).
///
/// `start` waits until the relay logged its metrics address and `/healthz`
/// answers 200; `spawn` returns at once. `OUTBOX_TEST_RELAY_LOG=debug` in the
/// developer's shell sets every relay's OUTBOX_LOG unless the test sets it.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    pub db_url: Option<String>,
    pub amqp_url: Option<String>,
    pub args: Vec<String>,
    pub envs: Vec<(String, String)>,
    pub settings: Settings,
    /// Another binary than [`relay_bin`] (an older release, for figures).
    pub binary: Option<PathBuf>,
    /// The log file; default `relay-<n>.log` in the env's directory.
    pub log: Option<PathBuf>,
}

impl Launch {
    pub fn new() -> Launch {
        Launch::default()
    }
    pub fn db_url(mut self, url: &str) -> Launch {
        self.db_url = Some(url.to_string());
        self
    }
    pub fn amqp_url(mut self, url: &str) -> Launch {
        self.amqp_url = Some(url.to_string());
        self
    }
    pub fn args(mut self, args: &[&str]) -> Launch {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }
    pub fn env(mut self, key: &str, value: &str) -> Launch {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }
    pub fn envs(mut self, envs: &[(&str, &str)]) -> Launch {
        for (key, value) in envs {
            self = self.env(key, value);
        }
        self
    }
    pub fn settings(mut self, settings: Settings) -> Launch {
        self.settings = settings;
        self
    }
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Launch {
        self.binary = Some(path.into());
        self
    }
    pub fn log(mut self, path: impl Into<PathBuf>) -> Launch {
        self.log = Some(path.into());
        self
    }

    /// Starts the relay and waits until it logged the metrics address it
    /// bound and `/healthz` answers 200 (panics, with its log, otherwise).
    pub async fn start(&self, env: &TestEnv) -> Relay {
        let mut relay = self.spawn(env);
        relay.wait_healthy().await;
        relay
    }

    /// Starts the relay without waiting for anything.
    pub fn spawn(&self, env: &TestEnv) -> Relay {
        let db_url = self.db_url.as_deref().unwrap_or(&env.db_url);
        let amqp_url = self.amqp_url.as_deref().unwrap_or(&env.amqp_url);
        let n = env.relay_seq.fetch_add(1, Ordering::Relaxed);
        let log = self
            .log
            .clone()
            .unwrap_or_else(|| env.dir.join(format!("relay-{n}.log")));
        let instance = format!("{}-relay-{n}", env.schema);
        // Port 0: the relay binds any free port and logs which.
        let addr = "127.0.0.1:0";
        let mut cmd = match &self.binary {
            Some(binary) => command_for(binary),
            None => relay_command(),
        };
        cmd.arg("run");
        match self.settings {
            Settings::Flags => {
                cmd.args(["--database-url", db_url])
                    .args(["--amqp-url", amqp_url])
                    .args(["--schema", &env.schema])
                    .args(["--metrics-addr", addr])
                    .args(["--instance-id", &instance]);
            }
            Settings::Environment => {
                cmd.env("OUTBOX_DATABASE_URL", db_url)
                    .env("OUTBOX_AMQP_URL", amqp_url)
                    .env("OUTBOX_SCHEMA", &env.schema)
                    .env("OUTBOX_METRICS_ADDR", addr)
                    .env("OUTBOX_INSTANCE_ID", &instance);
            }
            Settings::Given => {
                cmd.args(["--metrics-addr", addr]);
            }
        }
        // Keep the developer's log level if set (OUTBOX_LOG=debug to dig).
        if let Ok(level) = std::env::var("OUTBOX_TEST_RELAY_LOG") {
            cmd.env("OUTBOX_LOG", level);
        }
        for (key, value) in &self.envs {
            // A secret file replaces the plain variable: never pass both.
            if let Some(plain) = key.strip_suffix("_FILE") {
                cmd.env_remove(plain);
            }
            cmd.env(key, value);
        }
        cmd.args(&self.args);
        Relay::spawn_command(cmd, log, &instance)
    }
}

pub struct Relay {
    child: Option<Child>,
    pub pid: u32,
    /// Where the relay said it bound its metrics server (it is started on
    /// port 0); read from its start line once that is logged.
    metrics_addr: OnceLock<SocketAddr>,
    pub log: PathBuf,
    pub instance: String,
    exit: Option<ExitStatus>,
}

impl Relay {
    /// Starts `cmd`, an `outbox-relay run` the caller set up (with
    /// `relay_command`), its stdout and stderr going to `log`. [`Launch`] is
    /// the way to start a relay; this is what it runs underneath.
    pub fn spawn_command(mut cmd: Command, log: PathBuf, instance: &str) -> Relay {
        let file = File::create(&log).expect("create relay log");
        cmd.stdout(file.try_clone().expect("clone log file"))
            .stderr(file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
        Relay {
            pid: child.id(),
            child: Some(child),
            metrics_addr: OnceLock::new(),
            log,
            instance: instance.to_string(),
            exit: None,
        }
    }

    /// Waits until the relay logged the metrics address it bound, then until
    /// `/healthz` answers 200. Panics, with the log, if it exits meanwhile.
    pub async fn wait_healthy(&mut self) {
        self.wait_started(SETUP_TIMEOUT).await;
        let healthy = wait_until(SETUP_TIMEOUT, async || {
            self.has_exited() || matches!(self.get("/healthz").await, Ok((200, _)))
        })
        .await;
        if self.has_exited() {
            panic!(
                "relay exited at start with {:?}\n{}",
                self.exit,
                self.log_tail(200)
            );
        }
        assert!(
            healthy,
            "relay /healthz not 200 within {SETUP_TIMEOUT:?}\n{}",
            self.log_tail(200)
        );
    }

    /// Waits until the relay logged its start line; returns the metrics
    /// address it names. Panics, with the log, if the relay exits first or
    /// says nothing within `timeout`.
    pub async fn wait_started(&mut self, timeout: Duration) -> SocketAddr {
        wait_until(timeout, async || {
            self.bound_metrics_addr().is_some() || self.has_exited()
        })
        .await;
        if let Some(addr) = self.bound_metrics_addr() {
            return addr;
        }
        if self.has_exited() {
            panic!(
                "relay exited at start with {:?}\n{}",
                self.exit,
                self.log_tail(200)
            );
        }
        panic!(
            "relay logged no start line with its metrics_addr within {timeout:?}\n{}",
            self.log_tail(200)
        );
    }

    /// The metrics address from the start line; None until it is logged.
    pub fn bound_metrics_addr(&self) -> Option<SocketAddr> {
        if let Some(addr) = self.metrics_addr.get() {
            return Some(*addr);
        }
        let addr = started_metrics_addr(&self.logs())?;
        Some(*self.metrics_addr.get_or_init(|| addr))
    }

    /// The metrics address; panics if the relay has not logged it yet (wait
    /// with `wait_started` first when the relay was only spawned).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.bound_metrics_addr().unwrap_or_else(|| {
            panic!(
                "relay has not logged its metrics_addr yet\n{}",
                self.log_tail(100)
            )
        })
    }

    pub fn has_exited(&mut self) -> bool {
        self.try_exit_status().is_some()
    }

    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.exit = Some(status);
                }
            }
        }
        self.exit
    }

    /// Panics, with the relay's log, if it is no longer running.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_exit_status() {
            panic!(
                "relay exited unexpectedly with {status:?}\n{}",
                self.log_tail(200)
            );
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit. Panics, with the
    /// relay's log, if it does not exit in time (it is then killed).
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(timeout, "SIGTERM").await
    }

    /// [`wait_until`] `condition` holds; panics otherwise, saying `what`
    /// did not happen within `timeout`, with the relay's log.
    pub async fn wait_for<F>(&self, timeout: Duration, what: &str, condition: F)
    where
        F: AsyncFnMut() -> bool,
    {
        let held = wait_until(timeout, condition).await;
        assert!(held, "{what} (waited {timeout:?})\n{}", self.log_tail(100));
    }

    /// `terminate`, then asserts the relay exited 0 (the message shows its log).
    pub async fn terminate_cleanly(&mut self, timeout: Duration) {
        let status = self.terminate(timeout).await;
        assert!(
            status.success(),
            "relay exited with {status:?} after SIGTERM\n{}",
            self.log_tail(100)
        );
    }

    /// Sends SIGINT and waits like `terminate`.
    pub async fn interrupt(&mut self, timeout: Duration) -> ExitStatus {
        self.signal("INT");
        self.wait_exit(timeout, "SIGINT").await
    }

    /// SIGKILL: the crash case.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        let child = self.child.as_mut().expect("relay child");
        let _ = child.kill();
        let status = child.wait().expect("wait after kill");
        self.exit = Some(status);
        status
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", self.pid);
    }

    async fn wait_exit(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        let exited = wait_until(timeout, async || self.has_exited()).await;
        if !exited {
            let status = self.kill();
            panic!(
                "relay did not exit within {timeout:?} after {what} (killed: {status:?})\n{}",
                self.log_tail(200)
            );
        }
        self.exit.unwrap()
    }

    /// The relay's whole output so far.
    pub fn logs(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let logs = self.logs();
        let all: Vec<&str> = logs.lines().collect();
        let start = all.len().saturating_sub(lines);
        format!(
            "--- relay {} log ({}), last {} of {} lines ---\n{}\n--- end of relay log ---",
            self.instance,
            self.log.display(),
            all.len() - start,
            all.len(),
            all[start..].join("\n")
        )
    }

    /// HTTP GET on the relay's metrics address.
    pub async fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.metrics_addr(), path).await
    }

    /// `/metrics`, which must answer 200.
    pub async fn metrics(&self) -> String {
        match self.get("/metrics").await {
            Ok((200, body)) => body,
            other => panic!("GET /metrics: {other:?}\n{}", self.log_tail(100)),
        }
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let mut last = None;
        let ready = wait_until(timeout, async || {
            if self.has_exited() {
                return true;
            }
            let r = self.get("/readyz").await;
            let ok = matches!(r, Ok((200, _)));
            last = Some(r);
            ok
        })
        .await;
        self.assert_running();
        assert!(
            ready,
            "relay not ready within {timeout:?}; last /readyz: {last:?}\n{}",
            self.log_tail(100)
        );
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(300));
        }
        if self.exit.is_none() {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// A plain HTTP/1.1 GET with `Connection: close`; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || http_get_blocking(addr, &path))
        .await
        .expect("http task")
}

fn http_get_blocking(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Error, ErrorKind};
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| Error::new(ErrorKind::InvalidData, "no end of HTTP headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let status: u16 = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::new(ErrorKind::InvalidData, format!("bad status line: {head}")))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut data: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind};
    let bad = || Error::new(ErrorKind::InvalidData, "bad chunked encoding");
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").ok_or_else(bad)?;
        let size_line = std::str::from_utf8(&data[..eol]).map_err(|_| bad())?;
        let size_hex = size_line.split(';').next().unwrap().trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| bad())?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(bad());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Says why `test` cannot run on this machine and returns true (the test then
/// passes), or panics when OUTBOX_TEST_REQUIRE_ALL=1 says every test must run
/// here (CI on the machine kind the project is built for sets it).
pub fn cannot_run(test: &str, why: &str) -> bool {
    let line = format!("SKIPPED {test}: {why}");
    if std::env::var("OUTBOX_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("{line} (OUTBOX_TEST_REQUIRE_ALL=1: this machine must run it)");
    }
    eprintln!("{line}");
    println!("{line}");
    true
}

/// Sum of the samples of `name` (all label sets), from Prometheus text.
/// None when no sample has that exact name.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value_part = if rest.starts_with('{') {
            match rest.rfind('}') {
                Some(i) => &rest[i + 1..],
                None => continue,
            }
        } else {
            rest
        };
        if let Some(v) = value_part
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Whether the metric family `name` appears (a `# TYPE` line or any sample
/// whose name starts with it, e.g. `name_bucket`).
pub fn has_metric(text: &str, name: &str) -> bool {
    text.lines().any(|line| {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            rest.split_whitespace().next() == Some(name)
        } else {
            !line.starts_with('#') && line.starts_with(name)
        }
    })
}

// ---------------------------------------------------------------------------
// Consuming
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckMode {
    /// no-ack consumer: the broker forgets each message once sent.
    Auto,
    /// Each delivery is acked after it was recorded (prefetch 1000).
    Manual,
}

/// One delivery as the consumer saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub message_id: Option<String>,
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
    /// Local wall clock at receipt (same machine as the database).
    pub at: SystemTime,
}

impl Received {
    pub fn headers_json(&self) -> Option<Value> {
        self.properties.headers().as_ref().map(field_table_to_json)
    }

    /// The message id as a uuid; panics with the raw value if it is not one.
    pub fn uuid(&self) -> Uuid {
        let raw = self
            .message_id
            .as_deref()
            .unwrap_or_else(|| panic!("delivery without message-id: {:?}", self.properties));
        Uuid::parse_str(raw).unwrap_or_else(|e| panic!("message-id {raw:?} is not a uuid: {e}"))
    }
}

/// Collects every delivery of one queue into a Vec, in arrival order.
pub struct Collector {
    pub queue: String,
    received: Arc<Mutex<Vec<Received>>>,
    errors: Arc<Mutex<Vec<String>>>,
    channel: Channel,
    tag: String,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    pub async fn start(conn: &Connection, queue: &str, ack: AckMode) -> Collector {
        let channel = conn.create_channel().await.expect("consumer channel");
        if ack == AckMode::Manual {
            channel
                .basic_qos(1000, BasicQosOptions::default())
                .await
                .expect("basic.qos");
        }
        let tag = format!("collector-{queue}-{:08x}", rand::random::<u32>());
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions {
                    no_ack: ack == AckMode::Auto,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("basic.consume on {queue}: {e}"));
        let received = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (rx, ex) = (received.clone(), errors.clone());
        let task = tokio::spawn(async move {
            while let Some(delivery) = consumer.next().await {
                match delivery {
                    Ok(d) => {
                        let item = Received {
                            message_id: d.properties.message_id().as_ref().map(|s| s.to_string()),
                            exchange: d.exchange.to_string(),
                            routing_key: d.routing_key.to_string(),
                            redelivered: d.redelivered,
                            properties: d.properties.clone(),
                            body: d.data.clone(),
                            at: SystemTime::now(),
                        };
                        rx.lock().unwrap().push(item);
                        if ack == AckMode::Manual {
                            if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
                                ex.lock().unwrap().push(format!("ack: {e}"));
                            }
                        }
                    }
                    Err(e) => {
                        ex.lock().unwrap().push(format!("consume: {e}"));
                        break;
                    }
                }
            }
        });
        Collector {
            queue: queue.to_string(),
            received,
            errors,
            channel,
            tag,
            task,
        }
    }

    pub fn len(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn snapshot(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Message ids in arrival order (repeats included).
    pub fn message_ids(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.message_id.clone().unwrap_or_default())
            .collect()
    }

    pub fn distinct_ids(&self) -> HashSet<String> {
        self.message_ids().into_iter().collect()
    }

    /// Whether every id in `wanted` has arrived.
    pub fn has_all(&self, wanted: &HashSet<String>) -> bool {
        let got = self.distinct_ids();
        wanted.iter().all(|id| got.contains(id))
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    /// Waits until every id in `wanted` arrived; panics listing what is missing.
    pub async fn wait_for_ids(&self, wanted: &HashSet<String>, timeout: Duration) {
        let ok = wait_until(timeout, async || self.has_all(wanted)).await;
        if !ok {
            let got = self.distinct_ids();
            let missing: Vec<&String> = wanted.iter().filter(|id| !got.contains(*id)).collect();
            panic!(
                "{} of {} expected messages did not arrive on {} within {timeout:?} \
                 (received {} deliveries; consumer errors: {:?}); first missing: {:?}",
                missing.len(),
                wanted.len(),
                self.queue,
                self.len(),
                self.errors(),
                &missing[..missing.len().min(10)]
            );
        }
    }

    /// `wait_for_ids` for the rows `written`, within [`ARRIVAL_TIMEOUT`].
    pub async fn wait_for_rows(&self, written: &[Inserted]) {
        self.wait_for_ids(&ids_of(written), ARRIVAL_TIMEOUT).await;
    }

    pub async fn stop(self) -> Vec<Received> {
        let _ = self
            .channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await;
        let _ = self.channel.close(200, "collector done".into()).await;
        self.task.abort();
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Per partition key, first arrivals must come in strictly increasing `id`
/// order. `arrived`: each delivery's message id, in arrival order, repeats
/// included (at least once: only first arrivals must be ordered); `rows`:
/// message id -> (partition key, id). Returns the violations, described.
pub fn order_violations<'a>(
    arrived: impl IntoIterator<Item = Option<&'a str>>,
    rows: &HashMap<String, (Option<String>, i64)>,
) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut violations = Vec::new();
    for (pos, message_id) in arrived.into_iter().enumerate() {
        let Some(message_id) = message_id else {
            continue;
        };
        if !seen.insert(message_id) {
            continue;
        }
        let Some((Some(key), id)) = rows.get(message_id).cloned() else {
            continue;
        };
        if let Some(prev) = last.get(&key) {
            if id <= *prev {
                violations.push(format!(
                    "key {key}: id {id} arrived (delivery #{pos}) after id {prev}"
                ));
            }
        }
        last.insert(key, id);
    }
    violations
}

pub fn ids_of(inserted: &[Inserted]) -> HashSet<String> {
    inserted.iter().map(|i| i.message_id.to_string()).collect()
}

// ---------------------------------------------------------------------------
// AMQP values as JSON, to compare headers with what the row said
// ---------------------------------------------------------------------------

pub fn field_table_to_json(table: &FieldTable) -> Value {
    Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.to_string(), amqp_to_json(v)))
            .collect(),
    )
}

/// Maps an AMQP value to the JSON value it stands for. Integer widths and
/// float widths are not distinguished (a JSON number is a number); a value that
/// has no JSON meaning is shown as a tagged string so a comparison fails.
pub fn amqp_to_json(v: &AMQPValue) -> Value {
    use serde_json::json;
    match v {
        AMQPValue::Boolean(b) => json!(*b),
        AMQPValue::ShortShortInt(i) => json!(*i),
        AMQPValue::ShortShortUInt(i) => json!(*i),
        AMQPValue::ShortInt(i) => json!(*i),
        AMQPValue::ShortUInt(i) => json!(*i),
        AMQPValue::LongInt(i) => json!(*i),
        AMQPValue::LongUInt(i) => json!(*i),
        AMQPValue::LongLongInt(i) => json!(*i),
        AMQPValue::Float(f) => json!(*f as f64),
        AMQPValue::Double(f) => json!(*f),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(s) => json!(s),
            Err(_) => json!(format!("<non-utf8 longstr {:?}>", s.as_bytes())),
        },
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_to_json).collect()),
        AMQPValue::FieldTable(t) => field_table_to_json(t),
        AMQPValue::Void => Value::Null,
        other => json!(format!("<amqp {other:?}>")),
    }
}

/// Writes `text` to `path` (for evidence files kept with the test's logs).
pub fn save(path: &Path, text: &str) {
    let _ = fs::write(path, text);
}

// ---------------------------------------------------------------------------
// One file per concern: the fault suite's support (faults, private_pg,
// proxy) and the AMQP frame tap of the scale-out tests (frame_tap)
// ---------------------------------------------------------------------------

pub mod broker_user;
pub mod cluster;
pub mod faults;
pub mod frame_tap;
pub mod private_pg;
pub mod proxy;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_address_is_read_from_the_text_or_json_start_line() {
        let text =
            "2026-12-03T10:00:00Z INFO outbox relay started schema=s metrics_addr=127.0.0.1:37625";
        assert_eq!(
            started_metrics_addr(text),
            Some(SocketAddr::from(([127, 0, 0, 1], 37625)))
        );
        let json = r#"{"fields":{"message":"outbox relay started","metrics_addr":"127.0.0.1:9"}}"#;
        assert_eq!(
            started_metrics_addr(json),
            Some(SocketAddr::from(([127, 0, 0, 1], 9)))
        );
        assert_eq!(started_metrics_addr("metrics_addr=127.0.0.1:1"), None);
    }

    #[test]
    fn metric_values_add_up_every_label_set_of_exactly_that_name() {
        let text = "# TYPE a counter\na{x=\"1\"} 2\na{x=\"2\"} 3.5\na_total 100\nab 7\n";
        assert_eq!(metric_value(text, "a"), Some(5.5));
        assert_eq!(metric_value(text, "a_total"), Some(100.0));
        assert_eq!(metric_value(text, "missing"), None);
        assert!(has_metric(text, "a"));
        assert!(!has_metric(text, "b"));
    }

    #[test]
    fn chunked_bodies_are_joined_and_bad_ones_refused() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
        assert!(dechunk(b"5\r\nabc\r\n").is_err());
        assert!(dechunk(b"zz\r\n").is_err());
    }

    #[test]
    fn only_first_arrivals_out_of_id_order_per_key_are_violations() {
        let rows: HashMap<String, (Option<String>, i64)> = [
            ("m1", Some("k"), 1),
            ("m2", Some("k"), 2),
            ("m3", None, 3),
            ("m4", Some("j"), 4),
        ]
        .into_iter()
        .map(|(m, k, id)| (m.to_string(), (k.map(str::to_string), id)))
        .collect();
        let in_order = [
            Some("m1"),
            Some("m3"),
            Some("m2"),
            Some("m1"),
            None,
            Some("m4"),
        ];
        assert!(order_violations(in_order, &rows).is_empty());
        let v = order_violations([Some("m2"), Some("m1"), Some("m4")], &rows);
        assert_eq!(
            v,
            vec!["key k: id 1 arrived (delivery #1) after id 2".to_string()]
        );
    }

    #[test]
    fn launch_collects_what_the_relay_is_started_with() {
        let launch = Launch::new()
            .args(&["--poll-interval", "200ms"])
            .envs(&[("A", "1"), ("B_FILE", "/f")])
            .env("C", "3")
            .settings(Settings::Environment)
            .amqp_url("amqp://x");
        assert_eq!(launch.args, ["--poll-interval", "200ms"]);
        assert_eq!(
            launch.envs,
            [("A", "1"), ("B_FILE", "/f"), ("C", "3")].map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert_eq!(launch.settings, Settings::Environment);
        assert_eq!(launch.amqp_url.as_deref(), Some("amqp://x"));
        assert_eq!(launch.db_url, None);
        assert_eq!(Launch::new().settings, Settings::Flags);
    }

    #[test]
    fn the_tests_dir_is_in_cargos_target_tmp_or_where_the_variable_says() {
        let dir = tests_dir();
        if std::env::var_os("OUTBOX_TEST_DIR").is_none() {
            assert!(dir.ends_with("tmp/outbox-relay-tests"), "{}", dir.display());
        }
        assert!(workspace_root().join("Cargo.toml").is_file());
        assert!(workspace_root()
            .join("crates/test-kit/Cargo.toml")
            .is_file());
    }
}
