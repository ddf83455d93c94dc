//! The operator commands (README, "Running it"): check, status, dead-letters,
//! replay. Each test runs the real binary against its own schema in a real
//! PostgreSQL (and RabbitMQ where the command or the relay needs it), sets rows
//! up by SQL, and checks output, exit code and the rows afterwards.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::collections::HashSet;
use std::time::Duration;

use outbox_test_kit::*;
use serde_json::Value;

const CLI_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// rows set up by SQL
// ---------------------------------------------------------------------------

/// One committed row per payload, to `queue` on the default exchange.
async fn insert(env: &TestEnv, queue: &str, key: Option<&str>, payloads: &[&str]) -> Vec<Inserted> {
    let rows: Vec<NewRow> = payloads
        .iter()
        .map(|p| {
            let row = NewRow::to_queue(queue, p.as_bytes());
            match key {
                Some(key) => row.key(key),
                None => row,
            }
        })
        .collect();
    env.insert_committed(&rows).await
}

/// Waits until `wanted` arrived and nothing is pending any more, then stops
/// the relay; panics with the relay's log otherwise.
async fn publish_until_done(env: &TestEnv, collector: &Collector, wanted: &HashSet<String>) {
    let relay = Launch::new()
        .args(&["--poll-interval", "200ms"])
        .start(env)
        .await;
    let arrived = wait_until(ARRIVAL_TIMEOUT, async || {
        collector.has_all(wanted) && env.pending_count().await == 0
    })
    .await;
    assert!(
        arrived,
        "expected {wanted:?}, got {:?}\n{}",
        collector.message_ids(),
        relay.log_tail(200)
    );
    drop(relay);
}

/// The message ids of `received`, in arrival order.
fn ids_in_order(received: &[Received]) -> Vec<String> {
    received
        .iter()
        .map(|r| r.message_id.clone().unwrap_or_default())
        .collect()
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

/// Runs `status` until its output satisfies `settled` (bounded by
/// ARRIVAL_TIMEOUT): whether it did, and the last output.
async fn status_until(env: &TestEnv, settled: impl Fn(&CliOutput) -> bool) -> (bool, CliOutput) {
    let mut out = env.cli(&["status"], CLI_TIMEOUT).await;
    let done = wait_until(ARRIVAL_TIMEOUT, async || {
        out = env.cli(&["status"], CLI_TIMEOUT).await;
        settled(&out)
    })
    .await;
    (done, out)
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
    let out = env.cli(&["check"], CLI_TIMEOUT).await;
    out.assert_code(1);
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
        !env.schema_exists(&env.schema).await,
        "check must not create the schema"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_migrated_schema() {
    let env = TestEnv::new("ops_check_ok").await;
    let out = env.cli(&["check"], CLI_TIMEOUT).await;
    out.assert_code(0);
    for what in ["database", "schema", "privileges", "broker"] {
        assert!(
            line_starting(&out.stdout, "ok", what).is_some(),
            "no `ok {what}` line\n{}",
            out.describe()
        );
    }
    assert!(!out.stdout.contains("FAIL"), "{}", out.describe());
    out.assert_stdout_has("all checks passed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_missing_privileges_with_the_grant_that_fixes_them() {
    let env = TestEnv::new("ops_check_grants").await;
    let role = format!("{}_app", env.schema);
    let s = &env.schema;
    {
        let pg = env.pg.lock().await;
        pg.batch_execute(&format!(
            "CREATE ROLE {role} LOGIN;
             GRANT USAGE ON SCHEMA {s} TO {role};
             GRANT SELECT ON {s}.schema_migrations, {s}.messages TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON {s}.relays TO {role};
             GRANT SELECT, UPDATE ON {s}.leases TO {role};
             GRANT UPDATE ON {s}.relays_waiting TO {role};"
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
        &[],
        CLI_TIMEOUT,
    )
    .await;
    {
        let pg = env.pg.lock().await;
        let _ = pg
            .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
            .await;
    }
    out.assert_code(1);
    let fails: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("FAIL") && l.contains("privileges"))
        .collect();
    assert!(
        fails
            .iter()
            .any(|l| l.contains(&format!("GRANT DELETE ON {s}.messages TO {role}"))),
        "messages needs DELETE\n{}",
        out.describe()
    );
    // The relay sets states, never what a row carries: UPDATE of those columns only.
    assert!(
        fails.iter().any(|l| l.contains(&format!(
            "GRANT UPDATE (published_at, attempts, last_error, available_at, dead_lettered_at) ON {s}.messages TO {role}"
        ))),
        "messages needs UPDATE of the state columns\n{}",
        out.describe()
    );
    // EXECUTE on functions is granted to PUBLIC by default: not reported.
    assert_eq!(fails.len(), 2, "{}", out.describe());
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
    let closed = ClosedPort::new();
    let port = closed.port;
    let bad_db = format!("postgres://postgres:{pg_secret}@127.0.0.1:{port}/test");
    let out = env
        .cli_via(&["check"], (&bad_db, &env.amqp_url), CLI_TIMEOUT)
        .await;
    out.assert_code(1);
    let db_line = line_starting(&out.stdout, "FAIL", "database")
        .unwrap_or_else(|| panic!("no FAIL database line\n{}", out.describe()));
    assert!(db_line.contains(&format!("127.0.0.1:{port}")), "{db_line}");
    assert!(
        line_starting(&out.stdout, "ok", "broker").is_some(),
        "{}",
        out.describe()
    );
    out.assert_never_printed(pg_secret, "the database password");

    // The broker side: wrong password.
    let bad_amqp = with_password(&env.amqp_url, amqp_secret);
    let out = env
        .cli_via(&["check"], (&env.db_url, &bad_amqp), CLI_TIMEOUT)
        .await;
    out.assert_code(1);
    let broker = line_starting(&out.stdout, "FAIL", "broker")
        .unwrap_or_else(|| panic!("no FAIL broker line\n{}", out.describe()));
    assert!(broker.contains("RabbitMQ"), "{broker}");
    assert!(
        line_starting(&out.stdout, "ok", "database").is_some(),
        "{}",
        out.describe()
    );
    out.assert_never_printed(amqp_secret, "the broker password");
}

// ---------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_reports_backlog_and_leases() {
    let env = TestEnv::new("ops_status").await;
    let t = env.table();
    let s = &env.schema;
    let due = insert(&env, "q", None, &["due-1", "due-2"]).await;
    let scheduled = insert(&env, "q", None, &["later"]).await;
    env.exec(
        &format!("UPDATE {t} SET available_at = now() + interval '1 hour' WHERE id = $1"),
        &[&scheduled[0].id],
    )
    .await;
    let dead = insert(&env, "q", None, &["dead"]).await;
    let published = insert(&env, "q", None, &["p1", "p2", "p3"]).await;
    env.exec(
        &format!("UPDATE {t} SET created_at = now() - interval '2 minutes' WHERE id = $1"),
        &[&due[0].id],
    )
    .await;
    mark_dead_lettered(&env, &ids(&dead), "exchange 'x' does not exist").await;
    mark_published(&env, &ids(&published), 60.0).await;
    {
        let pg = env.pg.lock().await;
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

    let out = env.cli(&["status", "--json"], CLI_TIMEOUT).await;
    // A parked row and a relay gone quiet need a person: exit 1, each named.
    out.assert_code(1);
    for said in [
        "problem: 1 row parked as dead letters",
        "problem: relay relay-b has not renewed its leases",
    ] {
        out.assert_stderr_has(said);
    }
    let j = json_of(&out);
    assert_eq!(
        j["problems"].as_array().map(Vec::len),
        Some(
            out.stderr
                .lines()
                .filter(|l| l.starts_with("problem: "))
                .count()
        ),
        "{j:#}"
    );
    let due_ids = ids(&due);
    let due_unowned = env
        .scalar_i64(&format!(
            "SELECT count(*) FROM {t} WHERE id = ANY('{{{}}}'::bigint[]) AND partition >= 10",
            due_ids
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ))
        .await;
    assert_eq!(j["due_unowned"], due_unowned, "{j:#}");
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

    let text = env.cli(&["status"], CLI_TIMEOUT).await;
    text.assert_code(1);
    text.assert_stdout_has("no live owner: 10-31");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_exits_1_when_no_live_relay_publishes_due_rows() {
    let (env, queue, collector) =
        TestEnv::with_events_queue("ops_status_exit", AckMode::Auto).await;
    let mut relay = Launch::new()
        .args(&["--poll-interval", "200ms"])
        .start(&env)
        .await;
    let sent = insert(&env, &queue, None, &["a", "b", "c"]).await;
    collector.wait_for_rows(&sent).await;
    // Delivered, the relay live and owning every partition: nothing to do.
    let (settled, out) = status_until(&env, |out| out.code() == Some(0)).await;
    assert!(
        settled,
        "status never exited 0 with a healthy relay\n{}",
        out.describe()
    );
    assert!(!out.stderr.contains("problem:"), "{}", out.describe());

    // A clean stop hands every lease back and removes the relay's row: a due
    // row then waits with nobody to publish it.
    relay.terminate(SETUP_TIMEOUT).await;
    insert(&env, &queue, None, &["stranded"]).await;
    let out = env.cli(&["status"], CLI_TIMEOUT).await;
    out.assert_code(1);
    for said in [
        "problem: no live relay",
        "problem: 1 due row in partitions with no live owner (0-31)",
    ] {
        out.assert_stderr_has(said);
    }
    collector.stop().await;
}

/// A relay cut from its database (through a proxy) stops renewing its
/// leases: status exits 1 and names it, while the other relay is live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_exits_1_naming_a_relay_that_lost_its_database() {
    use outbox_test_kit::faults::{url_addr, url_via};
    use outbox_test_kit::proxy::FaultProxy;
    let env = TestEnv::new("ops_status_dbcut").await;
    let mut healthy = Launch::new().start(&env).await;
    let proxy = FaultProxy::start(url_addr(&env.db_url, 5432)).await;
    let mut cut = Launch::new()
        .db_url(&url_via(&env.db_url, proxy.port()))
        .start(&env)
        .await;
    healthy.wait_ready(CLI_TIMEOUT).await;
    cut.wait_ready(CLI_TIMEOUT).await;
    let (settled, out) = status_until(&env, |out| out.code() == Some(0)).await;
    assert!(
        settled,
        "status never exited 0 with two healthy relays\n{}",
        out.describe()
    );

    proxy.go_down();
    let said = format!("problem: relay {} has not renewed its leases", cut.instance);
    let (named, out) = status_until(&env, |out| {
        out.code() == Some(1) && out.stderr.contains(&said)
    })
    .await;
    assert!(
        named,
        "status does not name the relay cut from its database\n{}",
        out.describe()
    );
    assert!(!out.stderr.contains("no live relay"), "{}", out.describe());
    assert!(
        !out.stderr.contains(&format!("relay {} ", healthy.instance)),
        "{}",
        out.describe()
    );
    proxy.come_back();
    healthy.assert_running();
    cut.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_error_names_the_missing_options() {
    for action in ["retry", "discard"] {
        let out = run_cli(&["dead-letters", action], &[], CLI_TIMEOUT).await;
        out.assert_code(2);
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line\n{}", out.describe());
        assert!(
            lines[0].contains("required arguments were not provided: ")
                && lines[0].contains("--id")
                && lines[0].contains("--all"),
            "{}",
            out.describe()
        );
    }
    let help = run_cli(&["dead-letters", "--help"], &[], CLI_TIMEOUT).await;
    help.assert_code(0);
    for (name, about) in [
        ("list", "Show parked rows"),
        ("retry", "Make rows pending again"),
        ("discard", "Delete rows for good"),
    ] {
        assert!(
            help.stdout
                .lines()
                .any(|l| l.trim_start().starts_with(name) && l.contains(about)),
            "{name}: {about}\n{}",
            help.describe()
        );
    }
}

// ---------------------------------------------------------------------------
// dead letters
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_retry_makes_rows_pending_again() {
    let env = TestEnv::new("ops_dl_retry").await;
    let queue = env.declare_queue("retried").await;
    let dead = insert(&env, &queue, None, &["d1", "d2", "d3"]).await;
    let published = insert(&env, &queue, None, &["p1"]).await;
    let pending = insert(&env, &queue, None, &["pending"]).await;
    let long_error = format!(
        "broker refused the message:\nPRECONDITION_FAILED {}",
        "detail ".repeat(50)
    );
    mark_dead_lettered(&env, &ids(&dead), &long_error).await;
    mark_published(&env, &ids(&published), 60.0).await;
    let (d1, d2, d3, p1) = (dead[0].id, dead[1].id, dead[2].id, published[0].id);

    // list: full errors in JSON, one line each in the table.
    let out = env
        .cli(&["dead-letters", "list", "--json"], CLI_TIMEOUT)
        .await;
    out.assert_code(0);
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

    let out = env
        .cli(&["dead-letters", "list", "--limit", "2"], CLI_TIMEOUT)
        .await;
    out.assert_code(0);
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
    out.assert_stdout_has("2 of 3");

    // retry one id
    let out = env
        .cli(
            &["dead-letters", "retry", "--id", &d1.to_string()],
            CLI_TIMEOUT,
        )
        .await;
    out.assert_code(0);
    out.assert_stdout_has("retried 1 dead-lettered row");
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
        .cli(
            &[
                "dead-letters",
                "retry",
                "--id",
                &d2.to_string(),
                "--id",
                &p1.to_string(),
            ],
            CLI_TIMEOUT,
        )
        .await;
    out.assert_code(1);
    out.assert_stdout_has("retried 1 dead-lettered row");
    out.assert_stderr_has(&format!("row {p1} not retried: published"));
    assert!(row(&env, d2).await.expect("d2").dead_lettered_at.is_none());
    assert!(
        row(&env, p1).await.expect("p1").published_at.is_some(),
        "published row untouched"
    );

    // --all takes the rest, then finds nothing
    let out = env
        .cli(&["dead-letters", "retry", "--all"], CLI_TIMEOUT)
        .await;
    out.assert_code(0);
    out.assert_stdout_has("retried 1 dead-lettered row");
    let out = env
        .cli(&["dead-letters", "retry", "--all"], CLI_TIMEOUT)
        .await;
    out.assert_code(0);
    out.assert_stdout_has("nothing to retry");
    let j = json_of(
        &env.cli(&["dead-letters", "list", "--json"], CLI_TIMEOUT)
            .await,
    );
    assert_eq!(j["total"], 0, "{j:#}");

    // The relay publishes the retried rows (and the pending one), not the published one.
    let collector = env.consume(&queue, AckMode::Manual).await;
    let mut wanted = ids_of(&dead);
    wanted.extend(ids_of(&pending));
    publish_until_done(&env, &collector, &wanted).await;
    let got: HashSet<String> = ids_in_order(&collector.stop().await).into_iter().collect();
    assert_eq!(
        got, wanted,
        "exactly the retried and pending rows are published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_discard_only_touches_dead_letters() {
    let env = TestEnv::new("ops_dl_discard").await;
    let t = env.table();
    let dead = insert(&env, "q", None, &["d1", "d2"]).await;
    let published = insert(&env, "q", None, &["p1"]).await;
    let pending = insert(&env, "q", None, &["pending"]).await;
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
        .cli(
            &[
                "dead-letters",
                "discard",
                "--id",
                &d1.to_string(),
                &pen.to_string(),
                &nowhere.to_string(),
            ],
            CLI_TIMEOUT,
        )
        .await;
    out.assert_code(1);
    out.assert_stdout_has("discarded 1 dead-lettered row");
    out.assert_stderr_has(&format!("row {pen} not discarded: pending"));
    out.assert_stderr_has(&format!("row {nowhere} not discarded: no such row"));
    assert!(row(&env, d1).await.is_none(), "d1 deleted");
    assert!(row(&env, pen).await.is_some(), "pending row kept");

    let out = env
        .cli(
            &["dead-letters", "discard", "--id", &p1.to_string()],
            CLI_TIMEOUT,
        )
        .await;
    out.assert_code(1);
    out.assert_stdout_has("discarded 0 dead-lettered rows");
    assert!(row(&env, p1).await.is_some(), "published row kept");

    let out = env
        .cli(&["dead-letters", "discard", "--all"], CLI_TIMEOUT)
        .await;
    out.assert_code(0);
    out.assert_stdout_has(&format!("discarded {} dead-lettered rows", bulk + 1));
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
    let first = insert(&env, &queue, Some("order-1"), &["r1", "r2", "r3"]).await;
    let parked = insert(&env, &queue, Some("other"), &["parked"]).await;
    let last = insert(&env, &queue, Some("order-1"), &["r4", "r5"]).await;
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
    let out = env
        .cli(&["replay", "--from-id", &beyond], CLI_TIMEOUT)
        .await;
    out.assert_code(1);
    out.assert_stderr_has("retention");

    let out = env
        .cli(
            &[
                "replay",
                "--from-id",
                &from.to_string(),
                "--to-id",
                &to.to_string(),
            ],
            CLI_TIMEOUT,
        )
        .await;
    out.assert_code(0);
    out.assert_stdout_has(&format!("replayed 3 published rows (ids {from} to {to})"));
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
    let collector = env.consume(&queue, AckMode::Manual).await;
    publish_until_done(&env, &collector, &ids_of(&range)).await;
    let expected: Vec<String> = range.iter().map(|i| i.message_id.to_string()).collect();
    assert_eq!(
        ids_in_order(&collector.stop().await),
        expected,
        "the range again, in id order, nothing else"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_since_replays_rows_published_from_then_on() {
    let env = TestEnv::new("ops_replay_since").await;
    let old = insert(&env, "q", None, &["old"]).await;
    let recent = insert(&env, "q", None, &["recent-1", "recent-2"]).await;
    mark_published(&env, &ids(&old), 7200.0).await;
    mark_published(&env, &ids(&recent), 60.0).await;
    let since: String = {
        let pg = env.pg.lock().await;
        pg.query_one("SELECT (now() - interval '30 minutes')::text", &[])
            .await
            .expect("a time")
            .get(0)
    };
    let out = env.cli(&["replay", "--since", &since], CLI_TIMEOUT).await;
    out.assert_code(0);
    out.assert_stdout_has("replayed 2 published rows");
    assert!(row(&env, old[0].id).await.unwrap().published_at.is_some());
    for r in &recent {
        assert!(row(&env, r.id).await.unwrap().published_at.is_none());
    }

    // Later than every publish: nothing matches.
    let out = env
        .cli(&["replay", "--since", "tomorrow"], CLI_TIMEOUT)
        .await;
    out.assert_code(1);
    out.assert_stderr_has("only published rows still kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_since_bad_time_exits_2() {
    let env = TestEnv::new("ops_replay_bad_time").await;
    let published = insert(&env, "q", None, &["p"]).await;
    mark_published(&env, &ids(&published), 60.0).await;
    let out = env
        .cli(&["replay", "--since", "last tuesday-ish"], CLI_TIMEOUT)
        .await;
    out.assert_code(2);
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
        .cli(&["replay", "--from-id", "10", "--to-id", "5"], CLI_TIMEOUT)
        .await;
    out.assert_code(2);
    out.assert_stderr_has("--to-id");
}
