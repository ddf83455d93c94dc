//! The relay and its operator commands through PgBouncer (README: "Behind a
//! connection pooler"). scripts/pgbouncer.sh starts a private PgBouncer in
//! transaction mode (127.0.0.1:6543, 3 server connections for all tests, no
//! prepared statement support) and one in session mode (6544) in front of the
//! test PostgreSQL, once for all tests, if they are not running. Every
//! statement of these tests' relays and commands goes through the pooler; the
//! tests' own reads go direct.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use lapin::ExchangeKind;
use outbox_test_kit::*;

const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// The database URL through the private PgBouncer in `mode`, started if need be.
/// None (the test is skipped, see `cannot_run`) when it cannot start here.
fn pooler_url(test: &str, mode: &str) -> Option<String> {
    let direct = database_url();
    if !direct.contains("@127.0.0.1:5432/") {
        cannot_run(
            test,
            &format!("the test pooler fronts 127.0.0.1:5432, the test database is {direct}"),
        );
        return None;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pgbouncer.sh");
    let out = Command::new("bash")
        .args([script, "start", mode])
        .output()
        .expect("run scripts/pgbouncer.sh");
    if !out.status.success() {
        cannot_run(
            test,
            &format!(
                "scripts/pgbouncer.sh start {mode} failed (run scripts/services.sh to install pgbouncer): {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        );
        return None;
    }
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // Same database name as the direct URL (the pooler maps every name through).
    let db = direct.rsplit('/').next().unwrap_or("test");
    Some(match url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => url,
    })
}

/// A PgBouncer of one test's own, in transaction mode with `pool` server
/// connections, with `round_robin` handed out round robin
/// (`server_round_robin`): a client's consecutive transactions land on
/// different server connections. Stopped when dropped.
struct PrivatePooler {
    mode: &'static str,
    base: String,
    port: u16,
    pool: usize,
    round_robin: bool,
    url: String,
}

impl PrivatePooler {
    fn script(&self, cmd: &str) -> std::process::Output {
        Command::new("bash")
            .args([
                concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pgbouncer.sh"),
                cmd,
                self.mode,
            ])
            .env("OUTBOX_PGBOUNCER_DIR", &self.base)
            .env("OUTBOX_PGBOUNCER_PORT", self.port.to_string())
            .env("OUTBOX_PGBOUNCER_POOL_SIZE", self.pool.to_string())
            .env(
                "OUTBOX_PGBOUNCER_ROUND_ROBIN",
                if self.round_robin { "1" } else { "0" },
            )
            .output()
            .expect("run scripts/pgbouncer.sh")
    }

    fn start(test: &str, pool: usize, round_robin: bool) -> Option<PrivatePooler> {
        PrivatePooler::start_in(test, "transaction", pool, round_robin)
    }

    fn start_in(
        test: &str,
        mode: &'static str,
        pool: usize,
        round_robin: bool,
    ) -> Option<PrivatePooler> {
        // Pooled URLs carry the direct URL's database; the admin console is `pgbouncer`.
        pooler_url(test, "transaction")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let db = database_url();
        let db = db.rsplit('/').next().unwrap_or("test").to_string();
        let pooler = PrivatePooler {
            mode,
            base: format!("/tmp/outbox-relay-pgbouncer-{port}"),
            port,
            pool,
            round_robin,
            url: format!("postgres://postgres@127.0.0.1:{port}/{db}"),
        };
        let out = pooler.script("start");
        assert!(
            out.status.success(),
            "private PgBouncer did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(pooler)
    }

    /// The backend pids of its server connections (admin console, SHOW SERVERS).
    async fn server_pids(&self) -> Vec<i32> {
        let admin = connect_db(&format!(
            "postgres://postgres@127.0.0.1:{}/pgbouncer",
            self.port
        ))
        .await;
        let mut pids = Vec::new();
        for m in admin
            .simple_query("SHOW SERVERS")
            .await
            .expect("SHOW SERVERS")
        {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                if let Some(pid) = r.get("remote_pid").and_then(|v| v.parse().ok()) {
                    pids.push(pid);
                }
            }
        }
        pids.sort_unstable();
        pids
    }
}

impl Drop for PrivatePooler {
    fn drop(&mut self) {
        let _ = self.script("stop");
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// A test environment whose relays and commands (`migrate` first) go through
/// the pooler in `mode`.
async fn pooled_env(test: &str, mode: &str) -> Option<TestEnv> {
    let url = pooler_url(test, mode)?;
    let mut env = TestEnv::new_unmigrated(test).await;
    env.db_url = url;
    env.migrate().await;
    Some(env)
}

/// Relay flags for a transaction pooler: no LISTEN, a short poll.
const POOLED: &[&str] = &["--listen", "false", "--poll-interval", "200ms"];

/// message id -> (partition key, id), for `order_violations`.
fn keyed(inserted: &[Inserted], keys: i64) -> HashMap<String, (Option<String>, i64)> {
    inserted
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let ordinal = i as i64 + 1;
            let key = (keys > 0).then(|| format!("k{}", ordinal % keys));
            (r.message_id.to_string(), (key, r.id))
        })
        .collect()
}

fn assert_in_key_order(collector: &Collector, rows: &HashMap<String, (Option<String>, i64)>) {
    let arrivals = collector.snapshot();
    let violations = order_violations(arrivals.iter().map(|r| r.message_id.as_deref()), rows);
    assert!(
        violations.is_empty(),
        "{} order violations per partition key; first ones: {:#?}",
        violations.len(),
        &violations[..violations.len().min(10)]
    );
}

/// Waits until every row is marked published (the failure: published,
/// never marked, so all of them went out again after a restart).
async fn wait_all_marked(env: &TestEnv, count: i64, relays: &[&Relay]) {
    let marked = wait_until(ARRIVAL_TIMEOUT, async || {
        env.published_count().await == count
    })
    .await;
    let logs: Vec<String> = relays.iter().map(|r| r.log_tail(100)).collect();
    assert!(
        marked,
        "{} of {count} rows marked published\n{}",
        env.published_count().await,
        logs.join("\n---\n")
    );
}

/// No statement failed the way it does through a transaction pooler when a
/// prepared statement or session state is assumed.
fn assert_no_pooler_errors(relay: &Relay) {
    let logs = relay.logs();
    for bad in ["prepared statement", "transaction blocks"] {
        assert!(
            !logs.contains(bad),
            "relay log says '{bad}':\n{}",
            relay.log_tail(100)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_relay_publishes_and_marks_every_row_in_key_order() {
    let test = "pooled_relay_publishes_and_marks_every_row_in_key_order";
    let Some(env) = pooled_env(test, "transaction").await else {
        return;
    };
    let queue = env.declare_queue("events").await;
    let collector = env.consume(&queue, AckMode::Manual).await;
    let relay = Launch::new().args(POOLED).start(&env).await;

    let inserted = env.insert_bulk(&queue, 2_000, 20).await;
    collector.wait_for_rows(&inserted).await;
    wait_all_marked(&env, inserted.len() as i64, &[&relay]).await;
    assert_in_key_order(&collector, &keyed(&inserted, 20));
    assert_no_pooler_errors(&relay);
}

/// The failure: the relay assumed its next transaction ran on the
/// server session of the last one. Through a pooler of two server
/// connections handed out round robin, every claim, publish and mark lands on
/// the other server connection than the one before; every row must still be
/// marked, in key order, and afterwards neither server session may hold
/// anything of the relay: no prepared statement, no session setting, no
/// LISTEN, no temporary table, no advisory lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_relay_keeps_no_session_state_across_server_connections() {
    let test = "pooled_relay_keeps_no_session_state_across_server_connections";
    let Some(pooler) = PrivatePooler::start(test, 2, true) else {
        return;
    };
    let mut env = TestEnv::new_unmigrated(test).await;
    env.db_url = pooler.url.clone();
    env.migrate().await;
    let queue = env.declare_queue("events").await;
    let collector = env.consume(&queue, AckMode::Manual).await;
    let mut relay = Launch::new().args(POOLED).start(&env).await;

    let inserted = env.insert_bulk(&queue, 2_000, 20).await;
    collector.wait_for_rows(&inserted).await;
    wait_all_marked(&env, inserted.len() as i64, &[&relay]).await;
    assert_in_key_order(&collector, &keyed(&inserted, 20));
    assert_no_pooler_errors(&relay);
    // An operator command through the same pool: it must leave nothing either.
    let status = env.cli(&["status", "--json"], CLI_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{}", status.describe());
    relay.terminate(Duration::from_secs(30)).await;

    let servers = pooler.server_pids().await;
    assert_eq!(servers.len(), 2, "server connections: {servers:?}");
    // What a fresh session has, read directly: the relay's SET LOCALs must not
    // have outlived their transactions.
    let direct = connect_db(&database_url()).await;
    let inspect = "SELECT pg_backend_pid()::text,
                          (SELECT count(*) FROM pg_prepared_statements)::text,
                          current_setting('synchronous_commit'),
                          current_setting('statement_timeout'),
                          (SELECT count(*) FROM pg_listening_channels())::text,
                          (pg_my_temp_schema() <> 0)::text";
    let row_of = |msgs: Vec<tokio_postgres::SimpleQueryMessage>| -> Vec<String> {
        msgs.into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("").to_string())
                        .collect(),
                ),
                _ => None,
            })
            .expect("a row")
    };
    let fresh = row_of(direct.simple_query(inspect).await.expect("inspect"));
    // Both server connections at once: each client holds one in a transaction.
    // Simple queries only, so the inspection itself prepares nothing.
    let a = connect_db(&pooler.url).await;
    let b = connect_db(&pooler.url).await;
    a.simple_query("BEGIN").await.expect("BEGIN");
    b.simple_query("BEGIN").await.expect("BEGIN");
    let mut seen = Vec::new();
    for client in [&a, &b] {
        let got = row_of(client.simple_query(inspect).await.expect("inspect"));
        assert_eq!(
            got[1..],
            [
                "0".to_string(),
                fresh[2].clone(),
                fresh[3].clone(),
                "0".into(),
                "false".into()
            ],
            "server session {} kept state of the relay (prepared statements, \
             synchronous_commit, statement_timeout, LISTEN channels, temp schema)",
            got[0]
        );
        seen.push(got[0].parse::<i32>().expect("pid"));
    }
    seen.sort_unstable();
    assert_eq!(seen, servers, "the inspection saw other server sessions");
    let locks = direct
        .simple_query(&format!(
            "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND pid IN ({}, {})",
            seen[0], seen[1]
        ))
        .await
        .expect("pg_locks");
    let locks = row_of(locks);
    assert_eq!(locks[0], "0", "advisory locks held on the server sessions");
    a.simple_query("COMMIT").await.expect("COMMIT");
    b.simple_query("COMMIT").await.expect("COMMIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_replica_takes_over_from_a_killed_relay_in_key_order() {
    let test = "pooled_replica_takes_over_from_a_killed_relay_in_key_order";
    let Some(env) = pooled_env(test, "transaction").await else {
        return;
    };
    let queue = env.declare_queue("events").await;
    let collector = env.consume(&queue, AckMode::Manual).await;
    let mut doomed = Launch::new().args(POOLED).start(&env).await;
    let survivor = Launch::new().args(POOLED).start(&env).await;

    let first = env.insert_bulk(&queue, 1_500, 30).await;
    // Kill -9 while it publishes: its leases lapse and the survivor takes them.
    let started = wait_until(ARRIVAL_TIMEOUT, async || collector.len() >= 100).await;
    assert!(started, "nothing arrived\n{}", doomed.log_tail(100));
    doomed.kill();
    let second = env.insert_bulk(&queue, 1_500, 30).await;

    let all: Vec<Inserted> = first.iter().chain(&second).copied().collect();
    collector.wait_for_rows(&all).await;
    wait_all_marked(&env, all.len() as i64, &[&survivor]).await;
    // Both batches used keys k0..k29 in id order.
    let mut rows = keyed(&first, 30);
    rows.extend(keyed(&second, 30));
    assert_in_key_order(&collector, &rows);
    assert_no_pooler_errors(&survivor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_failures_are_dead_lettered_listed_and_retried() {
    let test = "pooled_failures_are_dead_lettered_listed_and_retried";
    let Some(env) = pooled_env(test, "transaction").await else {
        return;
    };
    let queue = env.declare_queue("events").await;
    let collector = env.consume(&queue, AckMode::Manual).await;
    let mut args = POOLED.to_vec();
    args.extend(["--max-attempts", "2"]);
    let relay = Launch::new().args(&args).start(&env).await;

    // One row to an exchange that does not exist yet: retried once (about 1 s
    // later), parked at its second failure.
    let missing = env.unique("later");
    let mut bad = NewRow::to_queue(&queue, "to an exchange declared later");
    bad.exchange = missing.clone();
    let good = NewRow::to_queue(&queue, "fine");
    let inserted = env.insert_committed(&[bad, good]).await;
    let parked = inserted[0];
    collector.wait_for_rows(&inserted[1..]).await;
    let dead = wait_until(ARRIVAL_TIMEOUT, async || {
        env.scalar_i64(&format!(
            "SELECT count(*) FROM {} WHERE dead_lettered_at IS NOT NULL",
            env.table()
        ))
        .await
            == 1
    })
    .await;
    assert!(dead, "row not dead-lettered\n{}", relay.log_tail(100));
    let attempts = env
        .scalar_i64(&format!(
            "SELECT attempts::bigint FROM {} WHERE id = {}",
            env.table(),
            parked.id
        ))
        .await;
    assert_eq!(
        attempts, 2,
        "the failed row was not retried before it was parked"
    );

    let out = env
        .cli(&["dead-letters", "list", "--json"], CLI_TIMEOUT)
        .await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let j: serde_json::Value = serde_json::from_str(&out.stdout).expect("list --json");
    assert_eq!(j["total"], 1, "{j:#}");
    assert_eq!(j["rows"][0]["id"], parked.id, "{j:#}");

    env.declare_exchange_named(&missing, ExchangeKind::Fanout)
        .await;
    env.bind(&queue, &missing, "").await;
    let out = env
        .cli(&["dead-letters", "retry", "--all"], CLI_TIMEOUT)
        .await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    collector.wait_for_rows(&inserted[..1]).await;
    wait_all_marked(&env, 2, &[&relay]).await;
    assert_no_pooler_errors(&relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_operator_commands_status_replay_and_check_work() {
    let test = "pooled_operator_commands_status_replay_and_check_work";
    let Some(env) = pooled_env(test, "transaction").await else {
        return;
    };
    let queue = env.declare_queue("events").await;
    let collector = env.consume(&queue, AckMode::Manual).await;
    let relay = Launch::new().args(POOLED).start(&env).await;
    let inserted = env.insert_bulk(&queue, 50, 5).await;
    collector.wait_for_rows(&inserted).await;
    wait_all_marked(&env, 50, &[&relay]).await;

    let out = env.cli(&["status", "--json"], CLI_TIMEOUT).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let j: serde_json::Value = serde_json::from_str(&out.stdout).expect("status --json");
    assert_eq!(j["pending"], 0, "{j:#}");
    assert_eq!(j["published_kept"], 50, "{j:#}");

    // Replay publishes them again, with the same message ids.
    let from = inserted[0].id.to_string();
    let out = env.cli(&["replay", "--from-id", &from], CLI_TIMEOUT).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let again = wait_until(ARRIVAL_TIMEOUT, async || collector.len() >= 100).await;
    assert!(
        again,
        "{} deliveries, expected 100\n{}",
        collector.len(),
        relay.log_tail(100)
    );
    wait_all_marked(&env, 50, &[&relay]).await;
    assert_no_pooler_errors(&relay);

    // check says a transaction pooler is there, and whether listen fits it.
    let out = env.cli(&["check", "--listen", "false"], CLI_TIMEOUT).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains("transaction-mode pooler detected"),
        "{}",
        out.describe()
    );
    let out = env.cli(&["check"], CLI_TIMEOUT).await;
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stdout.contains("set listen=false"),
        "{}",
        out.describe()
    );
}

/// A statement-mode pooler runs no transaction of several statements, which
/// the relay needs: `check` says so and fails. (`migrate` runs through the
/// transaction pooler here; through this one it could not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_a_statement_mode_pooler_does_not_fit() {
    let test = "check_says_a_statement_mode_pooler_does_not_fit";
    let Some(pooler) = PrivatePooler::start_in(test, "statement", 3, false) else {
        return;
    };
    let Some(env) = pooled_env(test, "transaction").await else {
        return;
    };
    let out = env
        .cli_via(
            &["check", "--listen", "false"],
            (&pooler.url, &env.amqp_url),
            CLI_TIMEOUT,
        )
        .await;
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stdout.contains("statement-mode pooler detected")
            && out.stdout.contains("use transaction or session mode"),
        "{}",
        out.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_retention_deletes_published_rows() {
    let test = "pooled_retention_deletes_published_rows";
    let Some(env) = pooled_env(test, "transaction").await else {
        return;
    };
    let queue = env.declare_queue("events").await;
    let collector = env.consume(&queue, AckMode::Manual).await;
    let mut args = POOLED.to_vec();
    args.extend(["--retention", "1s"]);
    let relay = Launch::new().args(&args).start(&env).await;
    let inserted = env.insert_bulk(&queue, 200, 0).await;
    collector.wait_for_rows(&inserted).await;
    let table = env.table();
    let gone = wait_until(ARRIVAL_TIMEOUT, async || {
        env.scalar_i64(&format!("SELECT count(*) FROM {table}"))
            .await
            == 0
    })
    .await;
    assert!(
        gone,
        "published rows still kept after retention\n{}",
        relay.log_tail(100)
    );
    assert_no_pooler_errors(&relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pooled_relay_with_listen_publishes_every_row() {
    let test = "session_pooled_relay_with_listen_publishes_every_row";
    let Some(env) = pooled_env(test, "session").await else {
        return;
    };
    let queue = env.declare_queue("events").await;
    let collector = env.consume(&queue, AckMode::Manual).await;
    let relay = Launch::new().start(&env).await;
    let inserted = env.insert_bulk(&queue, 500, 10).await;
    collector.wait_for_rows(&inserted).await;
    wait_all_marked(&env, 500, &[&relay]).await;
    assert_in_key_order(&collector, &keyed(&inserted, 10));
    assert_no_pooler_errors(&relay);
    let out = env.cli(&["check"], CLI_TIMEOUT).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains("its own server session"),
        "{}",
        out.describe()
    );
}
