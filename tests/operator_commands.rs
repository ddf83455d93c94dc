//! The operator commands (PRODUCT.md section 3): check, status, dead-letters,
//! replay. Each test runs the real binary against its own schema in a real
//! PostgreSQL (and RabbitMQ where the command or the relay needs it), sets rows
//! up by SQL, and checks output, exit code and the rows afterwards.

use std::collections::HashSet;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------
// harness: one schema per test, the binary as a child process
// ---------------------------------------------------------------------------

fn database_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

fn amqp_url() -> String {
    std::env::var("OUTBOX_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// The binary with no OUTBOX_* variable inherited from the developer's shell.
fn relay_command() -> Command {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OUTBOX_") {
            cmd.env_remove(&key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

#[derive(Debug)]
struct CliOutput {
    /// None when the process had to be killed at the timeout.
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

impl CliOutput {
    fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    fn describe(&self) -> String {
        format!(
            "status: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs the binary to completion, killing it after `timeout`.
async fn run_cli(args: &[&str], timeout: Duration) -> CliOutput {
    let mut child = relay_command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
    let read_all = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = read_all(Box::new(child.stdout.take().unwrap()));
    let err = read_all(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    CliOutput {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// A port on 127.0.0.1 that nothing listens on (bound, read, released).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap().port()
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes.
async fn wait_until<F: AsyncFnMut() -> bool>(timeout: Duration, mut condition: F) -> bool {
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Inserted {
    id: i64,
    message_id: Uuid,
}

#[derive(Clone, Debug)]
#[allow(dead_code)] // fields are read through Debug in failure messages
struct RowState {
    id: i64,
    available_at: SystemTime,
    published_at: Option<SystemTime>,
    dead_lettered_at: Option<SystemTime>,
    attempts: i32,
    last_error: Option<String>,
}

/// One test's schema `t_ops_<name>_<random>`, dropped at the end unless the
/// test failed (kept for inspection then).
struct TestEnv {
    schema: String,
    db_url: String,
    amqp_url: String,
    pg: Client,
    queues: Mutex<Vec<String>>,
}

impl TestEnv {
    /// A fresh schema, migrated with `outbox-relay migrate`.
    async fn new(name: &str) -> TestEnv {
        let env = TestEnv::new_unmigrated(name).await;
        let out = env.cli(&["migrate"]).await;
        assert_eq!(out.code(), Some(0), "migrate failed\n{}", out.describe());
        env
    }

    async fn new_unmigrated(name: &str) -> TestEnv {
        let schema = format!("t_ops_{name}_{:08x}", rand::random::<u32>());
        let db_url = database_url();
        let (pg, conn) = tokio_postgres::connect(&db_url, NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {db_url}: {e}"));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        TestEnv {
            schema,
            db_url,
            amqp_url: amqp_url(),
            pg,
            queues: Mutex::new(Vec::new()),
        }
    }

    /// `outbox-relay <args> --database-url .. --schema ..` (+ `--amqp-url` for check).
    async fn cli(&self, args: &[&str]) -> CliOutput {
        let mut all = args.to_vec();
        all.extend(["--database-url", &self.db_url, "--schema", &self.schema]);
        if args.first() == Some(&"check") {
            all.extend(["--amqp-url", &self.amqp_url]);
        }
        run_cli(&all, CLI_TIMEOUT).await
    }

    fn table(&self) -> String {
        format!("{}.messages", self.schema)
    }

    async fn exec(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> u64 {
        self.pg
            .execute(sql, params)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    async fn scalar_i64(&self, sql: &str) -> i64 {
        self.pg
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// One row per payload, to `queue` on the default exchange.
    async fn insert(&self, queue: &str, key: Option<&str>, payloads: &[&str]) -> Vec<Inserted> {
        let mut out = Vec::new();
        for p in payloads {
            let r = self
                .pg
                .query_one(
                    &format!(
                        "INSERT INTO {} (routing_key, partition_key, payload)
                         VALUES ($1, $2, $3) RETURNING id, message_id",
                        self.table()
                    ),
                    &[&queue, &key, &p.as_bytes()],
                )
                .await
                .expect("insert row");
            out.push(Inserted {
                id: r.get(0),
                message_id: r.get(1),
            });
        }
        out
    }

    async fn rows(&self) -> Vec<RowState> {
        self.pg
            .query(
                &format!(
                    "SELECT id, available_at, published_at, dead_lettered_at, attempts, last_error
                       FROM {} ORDER BY id",
                    self.table()
                ),
                &[],
            )
            .await
            .expect("read rows")
            .iter()
            .map(|r| RowState {
                id: r.get(0),
                available_at: r.get(1),
                published_at: r.get(2),
                dead_lettered_at: r.get(3),
                attempts: r.get(4),
                last_error: r.get(5),
            })
            .collect()
    }

    async fn pending_count(&self) -> i64 {
        self.scalar_i64(&format!(
            "SELECT count(*) FROM {} WHERE published_at IS NULL AND dead_lettered_at IS NULL",
            self.table()
        ))
        .await
    }

    async fn db_now(&self) -> SystemTime {
        self.pg
            .query_one("SELECT clock_timestamp()", &[])
            .await
            .expect("clock")
            .get(0)
    }

    async fn schema_exists(&self) -> bool {
        self.pg
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                &[&self.schema],
            )
            .await
            .expect("schema lookup")
            .get(0)
    }

    /// A queue of this test (expires on its own if the test dies).
    async fn declare_queue(&self, what: &str) -> String {
        let name = format!("{}.{what}", self.schema);
        let conn = Connection::connect(&self.amqp_url, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = conn.create_channel().await.expect("channel");
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongInt(15 * 60 * 1000));
        channel
            .queue_declare(name.as_str().into(), QueueDeclareOptions::default(), args)
            .await
            .unwrap_or_else(|e| panic!("declare queue {name}: {e}"));
        let _ = conn.close(200, "declared".into()).await;
        self.queues.lock().unwrap().push(name.clone());
        name
    }

    /// Starts `outbox-relay run` on this schema, logging to a file.
    fn start_relay(&self) -> RelayProcess {
        let log =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-relay.log", self.schema));
        let file = std::fs::File::create(&log).expect("relay log");
        let child = relay_command()
            .arg("run")
            .args(["--database-url", &self.db_url, "--amqp-url", &self.amqp_url])
            .args(["--schema", &self.schema, "--metrics-addr", "127.0.0.1:0"])
            .args(["--poll-interval", "200ms"])
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN} run: {e}"));
        RelayProcess { child, log }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        let schema = self.schema.clone();
        if failed {
            eprintln!("test failed: kept schema {schema} for inspection");
        }
        let queues = std::mem::take(&mut *self.queues.lock().unwrap());
        let (db_url, amqp_url) = (self.db_url.clone(), self.amqp_url.clone());
        // Drop cannot await: clean up on a thread with its own small runtime.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let _ = tokio::time::timeout(Duration::from_secs(20), async {
                    if !queues.is_empty() {
                        if let Ok(conn) =
                            Connection::connect(&amqp_url, ConnectionProperties::default()).await
                        {
                            if let Ok(ch) = conn.create_channel().await {
                                for q in &queues {
                                    let _ = ch
                                        .queue_delete(
                                            q.as_str().into(),
                                            QueueDeleteOptions::default(),
                                        )
                                        .await;
                                }
                            }
                            let _ = conn.close(200, "test done".into()).await;
                        }
                    }
                    if !failed {
                        if let Ok((client, conn)) = tokio_postgres::connect(&db_url, NoTls).await {
                            tokio::spawn(conn);
                            let _ = client
                                .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                                .await;
                        }
                    }
                })
                .await;
            });
        });
        let _ = cleanup.join();
    }
}

/// A running relay; killed when dropped.
struct RelayProcess {
    child: Child,
    log: PathBuf,
}

impl RelayProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Message ids of every delivery on a queue, in arrival order.
struct Collector {
    ids: Arc<Mutex<Vec<String>>>,
    conn: Connection,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start(amqp_url: &str, queue: &str) -> Collector {
        let conn = Connection::connect(amqp_url, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = conn.create_channel().await.expect("channel");
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "operator-commands-test".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("consume {queue}: {e}"));
        let ids = Arc::new(Mutex::new(Vec::new()));
        let seen = ids.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let id = d.properties.message_id().as_ref().map(|s| s.to_string());
                seen.lock().unwrap().push(id.unwrap_or_default());
                let _ = d.acker.ack(BasicAckOptions::default()).await;
            }
        });
        Collector { ids, conn, task }
    }

    fn ids(&self) -> Vec<String> {
        self.ids.lock().unwrap().clone()
    }

    async fn stop(self) -> Vec<String> {
        let _ = self.conn.close(200, "done".into()).await;
        self.task.abort();
        self.ids()
    }
}

fn message_ids(rows: &[Inserted]) -> HashSet<String> {
    rows.iter().map(|r| r.message_id.to_string()).collect()
}

/// Waits until `wanted` arrived and nothing is pending any more, then stops
/// the relay; panics with the relay's log otherwise.
async fn publish_until_done(env: &TestEnv, collector: &Collector, wanted: &HashSet<String>) {
    let relay = env.start_relay();
    let arrived = wait_until(ARRIVAL_TIMEOUT, async || {
        let got: HashSet<String> = collector.ids().into_iter().collect();
        wanted.is_subset(&got) && env.pending_count().await == 0
    })
    .await;
    assert!(
        arrived,
        "expected {wanted:?}, got {:?}\n--- relay log ---\n{}",
        collector.ids(),
        relay.log()
    );
    drop(relay);
}

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

async fn mark_published(env: &TestEnv, ids: &[i64], ago_secs: f64) {
    env.exec(
        &format!(
            "UPDATE {} SET published_at = now() - make_interval(secs => $2::float8)
              WHERE id = ANY($1)",
            env.table()
        ),
        &[&ids, &ago_secs],
    )
    .await;
}

async fn mark_dead_lettered(env: &TestEnv, ids: &[i64], last_error: &str) {
    env.exec(
        &format!(
            "UPDATE {} SET dead_lettered_at = now(), attempts = 10, last_error = $2,
                           available_at = now() + interval '5 minutes'
              WHERE id = ANY($1)",
            env.table()
        ),
        &[&ids, &last_error],
    )
    .await;
}

async fn row(env: &TestEnv, id: i64) -> Option<RowState> {
    env.rows().await.into_iter().find(|r| r.id == id)
}

fn json_of(out: &CliOutput) -> Value {
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e})\n{}", out.describe()))
}

fn ids(inserted: &[Inserted]) -> Vec<i64> {
    inserted.iter().map(|i| i.id).collect()
}

/// `url` with its password replaced (user kept, `guest` if it had none).
fn with_password(url: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("URL with ://");
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let (user, host) = match authority.rsplit_once('@') {
        Some((userinfo, host)) => (userinfo.split(':').next().unwrap_or("guest"), host),
        None => ("guest", authority),
    };
    format!("{scheme}://{user}:{password}@{host}{tail}")
}

/// `url` logging in as `user` without a password.
fn as_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("URL with ://");
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{user}@{host}{tail}")
}

/// The dead-letter table's row for `id` (first column the id, second a uuid).
fn table_row(text: &str, id: i64) -> Option<&str> {
    text.lines().find(|l| {
        let mut cells = l.split_whitespace();
        cells.next() == Some(id.to_string().as_str())
            && cells
                .next()
                .is_some_and(|m| uuid::Uuid::parse_str(m).is_ok())
    })
}

fn line_starting<'a>(text: &'a str, verdict: &str, what: &str) -> Option<&'a str> {
    text.lines().find(|l| {
        let mut words = l.split_whitespace();
        words.next() == Some(verdict) && words.next() == Some(what)
    })
}

// ---------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_missing_schema_and_exits_1() {
    let env = TestEnv::new_unmigrated("ops_check_missing").await;
    let out = env.cli(&["check"]).await;
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let schema = line_starting(&out.stdout, "FAIL", "schema")
        .unwrap_or_else(|| panic!("no FAIL schema line\n{}", out.describe()));
    assert!(
        schema.contains(&format!("outbox-relay migrate --schema {}", env.schema)),
        "the schema line must say to run migrate: {schema}"
    );
    assert!(
        line_starting(&out.stdout, "ok", "database").is_some(),
        "{}",
        out.describe()
    );
    assert!(
        line_starting(&out.stdout, "ok", "broker").is_some(),
        "{}",
        out.describe()
    );
    assert!(
        !env.schema_exists().await,
        "check must not create the schema"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_migrated_schema() {
    let env = TestEnv::new("ops_check_ok").await;
    let out = env.cli(&["check"]).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    for what in ["database", "schema", "privileges", "broker"] {
        assert!(
            line_starting(&out.stdout, "ok", what).is_some(),
            "no `ok {what}` line\n{}",
            out.describe()
        );
    }
    assert!(!out.stdout.contains("FAIL"), "{}", out.describe());
    assert!(
        out.stdout.contains("all checks passed"),
        "{}",
        out.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_missing_privileges_with_the_grant_that_fixes_them() {
    let env = TestEnv::new("ops_check_grants").await;
    let role = format!("{}_app", env.schema);
    let s = &env.schema;
    {
        let pg = &env.pg;
        pg.batch_execute(&format!(
            "CREATE ROLE {role} LOGIN;
             GRANT USAGE ON SCHEMA {s} TO {role};
             GRANT SELECT ON {s}.schema_migrations, {s}.messages TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON {s}.relays TO {role};
             GRANT SELECT, UPDATE ON {s}.leases TO {role};"
        ))
        .await
        .expect("create a role with some privileges");
    }
    let db_url = as_user(&env.db_url, &role);
    let out = run_cli(
        &[
            "check",
            "--database-url",
            &db_url,
            "--amqp-url",
            &env.amqp_url,
            "--schema",
            s,
        ],
        CLI_TIMEOUT,
    )
    .await;
    {
        let pg = &env.pg;
        let _ = pg
            .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
            .await;
    }
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let fails: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("FAIL") && l.contains("privileges"))
        .collect();
    assert!(
        fails
            .iter()
            .any(|l| l.contains(&format!("GRANT UPDATE, DELETE ON {s}.messages TO {role}"))),
        "messages needs UPDATE and DELETE\n{}",
        out.describe()
    );
    // EXECUTE on functions is granted to PUBLIC by default: not reported.
    assert_eq!(fails.len(), 1, "{}", out.describe());
    assert!(
        line_starting(&out.stdout, "ok", "schema").is_some(),
        "{}",
        out.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_unreachable_side_without_password() {
    let env = TestEnv::new("ops_check_unreachable").await;
    let pg_secret = "pg-S3cret-7d1e";
    let amqp_secret = "amqp-S3cret-4b2c";

    // The database side: nothing listens on that port.
    let port = free_port();
    let bad_db = format!("postgres://postgres:{pg_secret}@127.0.0.1:{port}/test");
    let out = run_cli(
        &[
            "check",
            "--database-url",
            &bad_db,
            "--amqp-url",
            &env.amqp_url,
            "--schema",
            &env.schema,
        ],
        CLI_TIMEOUT,
    )
    .await;
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let db_line = line_starting(&out.stdout, "FAIL", "database")
        .unwrap_or_else(|| panic!("no FAIL database line\n{}", out.describe()));
    assert!(db_line.contains(&format!("127.0.0.1:{port}")), "{db_line}");
    assert!(
        line_starting(&out.stdout, "ok", "broker").is_some(),
        "{}",
        out.describe()
    );
    assert!(
        !out.stdout.contains(pg_secret) && !out.stderr.contains(pg_secret),
        "the database password leaked\n{}",
        out.describe()
    );

    // The broker side: wrong password.
    let bad_amqp = with_password(&env.amqp_url, amqp_secret);
    let out = run_cli(
        &[
            "check",
            "--database-url",
            &env.db_url,
            "--amqp-url",
            &bad_amqp,
            "--schema",
            &env.schema,
        ],
        CLI_TIMEOUT,
    )
    .await;
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let broker = line_starting(&out.stdout, "FAIL", "broker")
        .unwrap_or_else(|| panic!("no FAIL broker line\n{}", out.describe()));
    assert!(broker.contains("RabbitMQ"), "{broker}");
    assert!(
        line_starting(&out.stdout, "ok", "database").is_some(),
        "{}",
        out.describe()
    );
    assert!(
        !out.stdout.contains(amqp_secret) && !out.stderr.contains(amqp_secret),
        "the broker password leaked\n{}",
        out.describe()
    );
}

// ---------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_reports_backlog_and_leases() {
    let env = TestEnv::new("ops_status").await;
    let t = env.table();
    let s = &env.schema;
    let due = env.insert("q", None, &["due-1", "due-2"]).await;
    let scheduled = env.insert("q", None, &["later"]).await;
    env.exec(
        &format!("UPDATE {t} SET available_at = now() + interval '1 hour' WHERE id = $1"),
        &[&scheduled[0].id],
    )
    .await;
    let dead = env.insert("q", None, &["dead"]).await;
    let published = env.insert("q", None, &["p1", "p2", "p3"]).await;
    env.exec(
        &format!("UPDATE {t} SET created_at = now() - interval '2 minutes' WHERE id = $1"),
        &[&due[0].id],
    )
    .await;
    mark_dead_lettered(&env, &ids(&dead), "exchange 'x' does not exist").await;
    mark_published(&env, &ids(&published), 60.0).await;
    {
        let pg = &env.pg;
        pg.batch_execute(&format!(
            "INSERT INTO {s}.relays (instance, started_at, heartbeat_at) VALUES
                 ('relay-a', now() - interval '1 hour', now()),
                 ('relay-b', now() - interval '2 hours', now() - interval '1 minute');
             UPDATE {s}.leases SET owner = 'relay-a', expires_at = now() + interval '30 seconds'
              WHERE partition < 10;
             UPDATE {s}.leases SET owner = 'relay-b', expires_at = now() - interval '50 seconds'
              WHERE partition IN (10, 11);"
        ))
        .await
        .expect("set up relays and leases");
    }

    let out = env.cli(&["status", "--json"]).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let j = json_of(&out);
    assert_eq!(j["schema"], s.as_str());
    assert_eq!(j["pending"], 3, "{j:#}");
    assert_eq!(j["due_now"], 2, "{j:#}");
    assert_eq!(j["scheduled"], 1, "{j:#}");
    assert_eq!(j["dead_lettered"], 1, "{j:#}");
    assert_eq!(j["published_kept"], 3, "{j:#}");
    let age = j["oldest_pending_age_seconds"]
        .as_f64()
        .expect("oldest age");
    assert!((119.0..600.0).contains(&age), "oldest pending age {age}");
    assert!(j["oldest_pending_created_at"].is_string(), "{j:#}");
    let next = j["next_scheduled_in_seconds"]
        .as_f64()
        .expect("next scheduled");
    assert!(
        (3000.0..=3600.0).contains(&next),
        "next scheduled in {next}"
    );
    assert_eq!(j["partitions_total"], 32);
    let unowned: Vec<i64> = (10..32).collect();
    assert_eq!(j["unowned_partitions"], serde_json::json!(unowned), "{j:#}");

    let relays = j["relays"].as_array().expect("relays array");
    assert_eq!(relays.len(), 2, "{j:#}");
    let a = &relays[0];
    assert_eq!(a["instance"], "relay-a");
    assert_eq!(a["live"], true);
    assert_eq!(
        a["partitions"],
        serde_json::json!((0..10).collect::<Vec<i64>>())
    );
    let expires = a["lease_expires_in_seconds"]
        .as_f64()
        .expect("lease expiry");
    assert!(
        expires > 0.0 && expires <= 30.0,
        "lease expires in {expires}"
    );
    assert!(a["heartbeat_age_seconds"].as_f64().expect("heartbeat age") < 30.0);
    let b = &relays[1];
    assert_eq!(b["instance"], "relay-b");
    assert_eq!(b["live"], false);
    assert_eq!(b["partitions"], serde_json::json!([]));
    assert!(b["heartbeat_age_seconds"].as_f64().expect("heartbeat age") >= 59.0);
    assert!(b["lease_expires_in_seconds"].is_null());

    let text = env.cli(&["status"]).await;
    assert_eq!(text.code(), Some(0), "{}", text.describe());
    assert!(
        text.stdout.contains("no live owner: 10-31"),
        "{}",
        text.describe()
    );
    let a_line = text
        .stdout
        .lines()
        .find(|l| l.starts_with("relay-a"))
        .unwrap_or_else(|| panic!("no relay-a row\n{}", text.describe()));
    assert!(
        a_line.contains("live") && a_line.contains("0-9"),
        "{a_line}"
    );
}

// ---------------------------------------------------------------------------
// dead letters
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_retry_makes_rows_pending_again() {
    let env = TestEnv::new("ops_dl_retry").await;
    let queue = env.declare_queue("retried").await;
    let dead = env.insert(&queue, None, &["d1", "d2", "d3"]).await;
    let published = env.insert(&queue, None, &["p1"]).await;
    let pending = env.insert(&queue, None, &["pending"]).await;
    let long_error = format!(
        "broker refused the message:\nPRECONDITION_FAILED {}",
        "detail ".repeat(50)
    );
    mark_dead_lettered(&env, &ids(&dead), &long_error).await;
    mark_published(&env, &ids(&published), 60.0).await;
    let (d1, d2, d3, p1) = (dead[0].id, dead[1].id, dead[2].id, published[0].id);

    // list: full errors in JSON, one line each in the table.
    let out = env.cli(&["dead-letters", "list", "--json"]).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let j = json_of(&out);
    assert_eq!(j["total"], 3, "{j:#}");
    let rows = j["rows"].as_array().expect("rows");
    let listed: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(listed, vec![d1, d2, d3]);
    assert_eq!(rows[0]["last_error"], long_error.as_str());
    assert_eq!(rows[0]["message_id"], dead[0].message_id.to_string());
    assert_eq!(rows[0]["routing_key"], queue.as_str());
    assert_eq!(rows[0]["attempts"], 10);
    assert!(rows[0]["dead_lettered_at"].is_string());

    let out = env.cli(&["dead-letters", "list", "--limit", "2"]).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let d1_line =
        table_row(&out.stdout, d1).unwrap_or_else(|| panic!("no row {d1}\n{}", out.describe()));
    assert!(
        d1_line.contains("broker refused the message: PRECONDITION_FAILED"),
        "{d1_line}"
    );
    assert!(
        d1_line.ends_with("...") && !d1_line.contains(&long_error),
        "{d1_line}"
    );
    assert!(table_row(&out.stdout, d2).is_some(), "{}", out.describe());
    assert!(
        table_row(&out.stdout, d3).is_none(),
        "--limit 2 shows two rows\n{}",
        out.describe()
    );
    assert!(out.stdout.contains("2 of 3"), "{}", out.describe());

    // retry one id
    let out = env
        .cli(&["dead-letters", "retry", "--id", &d1.to_string()])
        .await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains("retried 1 dead-lettered row"),
        "{}",
        out.describe()
    );
    let r = row(&env, d1).await.expect("row d1");
    assert!(
        r.dead_lettered_at.is_none() && r.published_at.is_none(),
        "{r:?}"
    );
    assert_eq!(r.attempts, 0);
    assert!(r.available_at <= env.db_now().await, "due now: {r:?}");
    assert_eq!(
        r.last_error.as_deref(),
        Some(long_error.as_str()),
        "last_error is kept"
    );

    // an id that is not dead-lettered is reported and makes the exit 1
    let out = env
        .cli(&[
            "dead-letters",
            "retry",
            "--id",
            &d2.to_string(),
            "--id",
            &p1.to_string(),
        ])
        .await;
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stdout.contains("retried 1 dead-lettered row"),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr
            .contains(&format!("row {p1} not retried: published")),
        "{}",
        out.describe()
    );
    assert!(row(&env, d2).await.expect("d2").dead_lettered_at.is_none());
    assert!(
        row(&env, p1).await.expect("p1").published_at.is_some(),
        "published row untouched"
    );

    // --all takes the rest, then finds nothing
    let out = env.cli(&["dead-letters", "retry", "--all"]).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains("retried 1 dead-lettered row"),
        "{}",
        out.describe()
    );
    let out = env.cli(&["dead-letters", "retry", "--all"]).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains("nothing to retry"),
        "{}",
        out.describe()
    );
    let j = json_of(&env.cli(&["dead-letters", "list", "--json"]).await);
    assert_eq!(j["total"], 0, "{j:#}");

    // The relay publishes the retried rows (and the pending one), not the published one.
    let collector = Collector::start(&env.amqp_url, &queue).await;
    let mut wanted = message_ids(&dead);
    wanted.extend(message_ids(&pending));
    publish_until_done(&env, &collector, &wanted).await;
    let got: HashSet<String> = collector.stop().await.into_iter().collect();
    assert_eq!(
        got, wanted,
        "exactly the retried and pending rows are published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_discard_only_touches_dead_letters() {
    let env = TestEnv::new("ops_dl_discard").await;
    let t = env.table();
    let dead = env.insert("q", None, &["d1", "d2"]).await;
    let published = env.insert("q", None, &["p1"]).await;
    let pending = env.insert("q", None, &["pending"]).await;
    mark_dead_lettered(&env, &ids(&dead), "nacked").await;
    mark_published(&env, &ids(&published), 60.0).await;
    // More than one batch of dead letters for --all.
    let bulk = env
        .exec(
            &format!(
                "INSERT INTO {t} (routing_key, payload, attempts, last_error, dead_lettered_at)
                 SELECT 'q', '\\x00', 10, 'nacked', now() FROM generate_series(1, 10005)"
            ),
            &[],
        )
        .await;
    let (d1, p1, pen) = (dead[0].id, published[0].id, pending[0].id);
    let nowhere = i64::MAX - 7;

    let out = env
        .cli(&[
            "dead-letters",
            "discard",
            "--id",
            &d1.to_string(),
            &pen.to_string(),
            &nowhere.to_string(),
        ])
        .await;
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stdout.contains("discarded 1 dead-lettered row"),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr
            .contains(&format!("row {pen} not discarded: pending")),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr
            .contains(&format!("row {nowhere} not discarded: no such row")),
        "{}",
        out.describe()
    );
    assert!(row(&env, d1).await.is_none(), "d1 deleted");
    assert!(row(&env, pen).await.is_some(), "pending row kept");

    let out = env
        .cli(&["dead-letters", "discard", "--id", &p1.to_string()])
        .await;
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stdout.contains("discarded 0 dead-lettered rows"),
        "{}",
        out.describe()
    );
    assert!(row(&env, p1).await.is_some(), "published row kept");

    let out = env.cli(&["dead-letters", "discard", "--all"]).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.stdout
            .contains(&format!("discarded {} dead-lettered rows", bulk + 1)),
        "{}",
        out.describe()
    );
    let left: Vec<i64> = env.rows().await.iter().map(|r| r.id).collect();
    assert_eq!(
        left,
        vec![p1, pen],
        "only the published and the pending row remain"
    );
    assert_eq!(
        env.scalar_i64(&format!(
            "SELECT count(*) FROM {t} WHERE dead_lettered_at IS NOT NULL"
        ))
        .await,
        0
    );
}

// ---------------------------------------------------------------------------
// replay
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_id_range_republishes_only_that_range() {
    let env = TestEnv::new("ops_replay_ids").await;
    let t = env.table();
    let queue = env.declare_queue("replayed").await;
    let first = env
        .insert(&queue, Some("order-1"), &["r1", "r2", "r3"])
        .await;
    let parked = env.insert(&queue, Some("other"), &["parked"]).await;
    let last = env.insert(&queue, Some("order-1"), &["r4", "r5"]).await;
    let published: Vec<Inserted> = first.iter().chain(&last).copied().collect();
    mark_published(&env, &ids(&published), 60.0).await;
    mark_dead_lettered(&env, &ids(&parked), "nacked").await;
    env.exec(
        &format!("UPDATE {t} SET attempts = 2 WHERE id = $1"),
        &[&first[2].id],
    )
    .await;
    let (from, to) = (first[1].id, last[0].id);
    let range = [first[1], first[2], last[0]];

    // Nothing kept there: say so, exit 1.
    let beyond = (last[1].id + 1000).to_string();
    let out = env.cli(&["replay", "--from-id", &beyond]).await;
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains("retention"), "{}", out.describe());

    let out = env
        .cli(&[
            "replay",
            "--from-id",
            &from.to_string(),
            "--to-id",
            &to.to_string(),
        ])
        .await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.stdout
            .contains(&format!("replayed 3 published rows (ids {from} to {to})")),
        "{}",
        out.describe()
    );
    let now = env.db_now().await;
    for r in env.rows().await {
        let in_range = range.iter().any(|i| i.id == r.id);
        if in_range {
            assert!(r.published_at.is_none(), "replayed row is pending: {r:?}");
            assert_eq!(r.attempts, 0, "{r:?}");
            assert!(r.available_at <= now, "{r:?}");
        } else if r.id == parked[0].id {
            assert!(
                r.dead_lettered_at.is_some() && r.published_at.is_none(),
                "{r:?}"
            );
        } else {
            assert!(
                r.published_at.is_some(),
                "outside the range stays published: {r:?}"
            );
        }
    }

    // The relay publishes exactly that range again, same message ids, in id order.
    let collector = Collector::start(&env.amqp_url, &queue).await;
    publish_until_done(&env, &collector, &message_ids(&range)).await;
    let expected: Vec<String> = range.iter().map(|i| i.message_id.to_string()).collect();
    assert_eq!(
        collector.stop().await,
        expected,
        "the range again, in id order, nothing else"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_since_replays_rows_published_from_then_on() {
    let env = TestEnv::new("ops_replay_since").await;
    let old = env.insert("q", None, &["old"]).await;
    let recent = env.insert("q", None, &["recent-1", "recent-2"]).await;
    mark_published(&env, &ids(&old), 7200.0).await;
    mark_published(&env, &ids(&recent), 60.0).await;
    let since: String = {
        let pg = &env.pg;
        pg.query_one("SELECT (now() - interval '30 minutes')::text", &[])
            .await
            .expect("a time")
            .get(0)
    };
    let out = env.cli(&["replay", "--since", &since]).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains("replayed 2 published rows"),
        "{}",
        out.describe()
    );
    assert!(row(&env, old[0].id).await.unwrap().published_at.is_some());
    for r in &recent {
        assert!(row(&env, r.id).await.unwrap().published_at.is_none());
    }

    // Later than every publish: nothing matches.
    let out = env.cli(&["replay", "--since", "tomorrow"]).await;
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("only published rows still kept"),
        "{}",
        out.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_since_bad_time_exits_2() {
    let env = TestEnv::new("ops_replay_bad_time").await;
    let published = env.insert("q", None, &["p"]).await;
    mark_published(&env, &ids(&published), 60.0).await;
    let out = env.cli(&["replay", "--since", "last tuesday-ish"]).await;
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "one line\n{}", out.describe());
    assert!(lines[0].contains("--since"), "{}", lines[0]);
    assert!(
        row(&env, published[0].id)
            .await
            .unwrap()
            .published_at
            .is_some(),
        "nothing replayed"
    );

    let out = env
        .cli(&["replay", "--from-id", "10", "--to-id", "5"])
        .await;
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("--to-id"), "{}", out.describe());
}
