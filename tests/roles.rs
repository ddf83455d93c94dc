//! Least privilege: `outbox-relay grants` gives an application role, a relay
//! role and an operator role what each needs, and nothing more.
//!
//! Every test makes its own roles (roles are cluster-wide: their names carry
//! the test's unique schema name) and drops them at the end. A non-superuser
//! owner role runs `migrate`, then the printed grants, exactly as a user would;
//! the relay, the operator commands and the application then log in as their
//! own roles.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::collections::HashSet;
use std::time::Duration;

use outbox_test_kit::*;
use serde_json::{json, Value};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, NoTls};

const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// Tests running at once change the database's privileges (GRANT CREATE ON
/// DATABASE, DROP OWNED): one at a time, or PostgreSQL says "tuple
/// concurrently updated".
const DATABASE_ACL_LOCK: i64 = 0x6f75_7462_6f78_0001;

/// The four roles of one test: the owner that migrates, and the three that
/// `grants` serves. Dropped (with everything they own or were granted) when
/// this drops.
struct Roles {
    owner: String,
    app: String,
    relay: String,
    operator: String,
    /// The superuser URL the test harness uses.
    admin_url: String,
}

impl Roles {
    /// Creates the roles (LOGIN, no superuser); the owner may create schemas.
    async fn create(env: &TestEnv) -> Roles {
        let roles = Roles {
            owner: format!("{}_owner", env.schema),
            app: format!("{}_app", env.schema),
            relay: format!("{}_relay", env.schema),
            operator: format!("{}_operator", env.schema),
            admin_url: env.db_url.clone(),
        };
        let pg = env.pg.lock().await;
        pg.batch_execute(&format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock({DATABASE_ACL_LOCK});
             CREATE ROLE {owner} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB;
             CREATE ROLE {app} LOGIN;
             CREATE ROLE {relay} LOGIN;
             CREATE ROLE {operator} LOGIN;
             DO $$ BEGIN
                 EXECUTE format('GRANT CREATE ON DATABASE %I TO {owner}', current_database());
             END $$;
             COMMIT;",
            owner = roles.owner,
            app = roles.app,
            relay = roles.relay,
            operator = roles.operator,
        ))
        .await
        .expect("create the test's roles");
        roles
    }

    /// The test database's URL, logging in as `role` (trust authentication).
    fn url(&self, role: &str) -> String {
        as_user(&self.admin_url, role)
    }

    /// `outbox-relay grants` for these roles, with no connection setting at all.
    async fn grants_sql(&self, schema: &str) -> String {
        let out = run_cli(
            &[
                "grants",
                "--schema",
                schema,
                "--app-role",
                &self.app,
                "--relay-role",
                &self.relay,
                "--operator-role",
                &self.operator,
            ],
            &[],
            CLI_TIMEOUT,
        )
        .await;
        assert_eq!(out.code(), Some(0), "grants failed\n{}", out.describe());
        out.stdout
    }

    /// Prints the grants and runs them as the owner, as the README says.
    async fn apply_grants(&self, schema: &str) {
        let sql = self.grants_sql(schema).await;
        let owner = connect_db(&self.url(&self.owner)).await;
        owner
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("the printed grants fail as the owner: {e:?}\n{sql}"));
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        let url = self.admin_url.clone();
        let all = [
            self.owner.clone(),
            self.app.clone(),
            self.relay.clone(),
            self.operator.clone(),
        ]
        .join(", ");
        // The schema goes to the superuser (TestEnv drops it, or keeps it
        // for inspection after a failure); the roles go whatever happened.
        let sql = format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock({DATABASE_ACL_LOCK});
             REASSIGN OWNED BY {owner} TO current_user;
             DROP OWNED BY {all};
             DROP ROLE {all};
             COMMIT;",
            owner = self.owner
        );
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let _ = tokio::time::timeout(Duration::from_secs(30), async {
                    if let Ok((client, conn)) = tokio_postgres::connect(&url, NoTls).await {
                        tokio::spawn(conn);
                        if let Err(e) = client.batch_execute(&sql).await {
                            eprintln!("dropping the test's roles failed: {e:?}");
                        }
                    }
                })
                .await;
            });
        });
        let _ = cleanup.join();
    }
}

/// `url` with its user replaced by `user` and no password.
fn as_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("URL with ://");
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{user}@{host}{tail}")
}

/// A fresh schema migrated by a non-superuser owner, and the printed grants
/// applied by that owner.
async fn least_privilege(name: &str) -> (TestEnv, Roles) {
    let env = TestEnv::new_unmigrated(name).await;
    let roles = Roles::create(&env).await;
    let out = cli_as(&env, &roles.url(&roles.owner), &["migrate"]).await;
    assert_eq!(
        out.code(),
        Some(0),
        "migrate as a non-superuser owner failed\n{}",
        out.describe()
    );
    roles.apply_grants(&env.schema).await;
    (env, roles)
}

/// Runs `sql` and expects PostgreSQL to refuse it for lack of privilege.
async fn assert_refused(client: &Client, role: &str, sql: &str) {
    match client.batch_execute(sql).await {
        Ok(()) => panic!("role {role} may run `{sql}`; it must be refused"),
        Err(e) => assert_eq!(
            e.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "role {role}: `{sql}` failed, but not with permission denied (42501): {e:?}"
        ),
    }
}

/// A command as the role `url` logs in as, e.g. `["dead-letters", "list"]`.
async fn cli_as(env: &TestEnv, url: &str, args: &[&str]) -> CliOutput {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--database-url", url, "--schema", &env.schema]);
    run_cli(&all, &[], CLI_TIMEOUT).await
}

/// `cli_as`, asserting that the command exits 0.
async fn cli_as_succeeds(env: &TestEnv, url: &str, args: &[&str]) -> CliOutput {
    let out = cli_as(env, url, args).await;
    out.assert_code(0);
    out
}

/// Inserts rows as `client` (the application role): a plain INSERT without
/// RETURNING, INSERT ... RETURNING id, message_id, the three enqueue()
/// overloads and the Rust library's enqueue, in one transaction. Returns the
/// message ids written.
async fn write_as_application(client: &mut Client, schema: &str, queue: &str) -> HashSet<String> {
    let tx = client.transaction().await.expect("begin as the app role");
    let mut ids = HashSet::new();
    let plain = tx
        .query_one(
            &format!(
                "WITH w AS (INSERT INTO \"{schema}\".messages (routing_key, payload)
                            VALUES ($1, 'plain insert') RETURNING message_id)
                 SELECT message_id FROM w"
            ),
            &[&queue],
        )
        .await
        .expect("INSERT ... RETURNING message_id as the app role");
    ids.insert(plain.get::<_, uuid::Uuid>(0).to_string());
    let chosen = uuid::Uuid::new_v4();
    let no_returning = tx
        .execute(
            &format!(
                "INSERT INTO \"{schema}\".messages (routing_key, payload, message_id)
                 VALUES ($1, 'no returning', $2)"
            ),
            &[&queue, &chosen],
        )
        .await
        .expect("plain INSERT as the app role");
    assert_eq!(no_returning, 1);
    ids.insert(chosen.to_string());
    let row = insert_row(&tx, schema, &NewRow::to_queue(queue, "insert returning id")).await;
    ids.insert(row.message_id.to_string());
    for payload in [
        EnqueuePayload::Json(json!({"order": 42})),
        EnqueuePayload::Text("text payload".to_string()),
        EnqueuePayload::Bytes(vec![0, 1, 2, 255]),
    ] {
        let row = enqueue(&tx, schema, &Enqueue::to_queue(queue, payload)).await;
        ids.insert(row.message_id.to_string());
    }
    let msg = outbox_relay::NewMessage::json("", queue, &json!({"from": "the library"}));
    let id = outbox_relay::enqueue(&tx, schema, &msg)
        .await
        .expect("the library's enqueue as the app role");
    ids.insert(id.to_string());
    tx.commit().await.expect("commit as the app role");
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_role_publishes_what_the_application_role_writes() {
    let (env, roles) = least_privilege("roles_relay").await;
    let relay_url = roles.url(&roles.relay);

    let check = cli_as(&env, &relay_url, &["check", "--amqp-url", &env.amqp_url]).await;
    assert_eq!(
        check.code(),
        Some(0),
        "check as the relay role\n{}",
        check.describe()
    );
    check.assert_stdout_has(&format!("as role '{}'", roles.relay));

    let queue = env.declare_queue("roles").await;
    let collector = env.consume(&queue, AckMode::Auto).await;
    let mut relay = Launch::new().db_url(&relay_url).start(&env).await;
    relay.wait_ready(SETUP_TIMEOUT).await;

    let mut app = connect_db(&roles.url(&roles.app)).await;
    let first = write_as_application(&mut app, &env.schema, &queue).await;
    collector.wait_for_ids(&first, ARRIVAL_TIMEOUT).await;
    let total = first.len() as i64;
    let marked = wait_until(ARRIVAL_TIMEOUT, async || {
        env.published_count().await == total
    })
    .await;
    assert!(
        marked,
        "{} of {total} rows marked published\n{}",
        env.published_count().await,
        relay.log_tail(100)
    );

    // The relay flags itself idle (relay_set_idle, setval on relays_waiting);
    // rows the application writes then wake it (the insert trigger).
    let waiting = format!(
        "SELECT (pg_sequence_last_value('\"{}\".relays_waiting') > date_part('epoch', now()) * 1000)::int::bigint",
        env.schema
    );
    relay
        .wait_for(
            ARRIVAL_TIMEOUT,
            "the relay never flagged itself idle",
            async || env.scalar_i64(&waiting).await > 0,
        )
        .await;
    let second = write_as_application(&mut app, &env.schema, &queue).await;
    collector.wait_for_ids(&second, ARRIVAL_TIMEOUT).await;
    let total = total + second.len() as i64;
    relay
        .wait_for(ARRIVAL_TIMEOUT, "second batch not marked", async || {
            env.published_count().await == total
        })
        .await;

    // backlog() as the application: nothing pending any more.
    let pending: i64 = app
        .query_one(
            &format!("SELECT pending FROM \"{}\".backlog()", env.schema),
            &[],
        )
        .await
        .expect("backlog() as the app role")
        .get(0);
    assert_eq!(pending, 0);

    relay.assert_running();
    assert!(
        !relay.logs().contains("permission denied"),
        "the relay met a missing privilege\n{}",
        relay.log_tail(200)
    );
    // A clean stop hands the leases back (relay_release as the relay role).
    relay.terminate_cleanly(Duration::from_secs(60)).await;
    let held = env
        .scalar_i64(&format!(
            "SELECT count(*) FROM \"{}\".leases WHERE owner IS NOT NULL",
            env.schema
        ))
        .await;
    assert_eq!(
        held,
        0,
        "leases still held after a clean stop\n{}",
        relay.log_tail(100)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_role_deletes_published_rows_when_nothing_is_kept() {
    let (env, roles) = least_privilege("roles_retention").await;
    let queue = env.declare_queue("roles").await;
    let collector = env.consume(&queue, AckMode::Auto).await;
    let launch = Launch::new()
        .db_url(&roles.url(&roles.relay))
        .args(&["--retention", "0"]);
    let mut relay = launch.start(&env).await;
    let mut app = connect_db(&roles.url(&roles.app)).await;
    let ids = write_as_application(&mut app, &env.schema, &queue).await;
    collector.wait_for_ids(&ids, ARRIVAL_TIMEOUT).await;
    relay
        .wait_for(ARRIVAL_TIMEOUT, "published rows not deleted", async || {
            env.scalar_i64(&format!("SELECT count(*) FROM {}", env.table()))
                .await
                == 0
        })
        .await;
    relay.assert_running();
    assert!(
        !relay.logs().contains("permission denied"),
        "{}",
        relay.log_tail(200)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_role_runs_status_dead_letters_and_replay() {
    let (env, roles) = least_privilege("roles_operator").await;
    let operator = roles.url(&roles.operator);
    // Rows in every state, set up by the superuser: 1-2 published, 3-6 dead letters.
    let rows = env
        .insert_committed(
            &(0..6)
                .map(|i| NewRow::to_queue("nowhere", format!("row {i}")))
                .collect::<Vec<_>>(),
        )
        .await;
    let id = |i: usize| rows[i].id;
    env.exec(
        &format!(
            "UPDATE {} SET published_at = now() WHERE id = ANY($1)",
            env.table()
        ),
        &[&vec![id(0), id(1)]],
    )
    .await;
    env.exec(
        &format!(
            "UPDATE {} SET dead_lettered_at = now(), attempts = 10, last_error = 'test'
              WHERE id = ANY($1)",
            env.table()
        ),
        &[&vec![id(2), id(3), id(4), id(5)]],
    )
    .await;
    let state = async |i: usize| -> (bool, bool) {
        let pg = env.pg.lock().await;
        let r = pg
            .query_opt(
                &format!(
                    "SELECT published_at IS NOT NULL, dead_lettered_at IS NOT NULL FROM {} WHERE id = $1",
                    env.table()
                ),
                &[&id(i)],
            )
            .await
            .expect("row state");
        r.map_or((false, false), |r| (r.get(0), r.get(1)))
    };
    let exists = async |i: usize| -> bool {
        env.scalar_i64(&format!(
            "SELECT count(*) FROM {} WHERE id = {}",
            env.table(),
            id(i)
        ))
        .await
            == 1
    };

    // Parked rows (and no relay running) need a person: exit 1, the rest as usual.
    let out = cli_as(&env, &operator, &["status", "--json"]).await;
    out.assert_code(1);
    out.assert_stderr_has("problem: 4 rows parked as dead letters");
    let status: Value = serde_json::from_str(&out.stdout).expect("status --json");
    assert_eq!(status["dead_lettered"], 4, "{status:#}");
    assert_eq!(status["published_kept"], 2, "{status:#}");
    assert_eq!(status["partitions_total"], 32, "{status:#}");
    let out = cli_as(&env, &operator, &["status"]).await;
    out.assert_code(1);

    let out = cli_as_succeeds(&env, &operator, &["dead-letters", "list", "--json"]).await;
    let list: Value = serde_json::from_str(&out.stdout).expect("dead-letters list --json");
    assert_eq!(list["total"], 4, "{list:#}");

    let retry_one = id(2).to_string();
    cli_as_succeeds(
        &env,
        &operator,
        &["dead-letters", "retry", "--id", &retry_one],
    )
    .await;
    assert_eq!(
        state(2).await,
        (false, false),
        "row {} is not pending again",
        id(2)
    );

    let discard_one = id(3).to_string();
    cli_as_succeeds(
        &env,
        &operator,
        &["dead-letters", "discard", "--id", &discard_one],
    )
    .await;
    assert!(!exists(3).await, "row {} not discarded", id(3));

    // A named row that is not dead-lettered: reported (it reads its state), exit 1.
    let published = id(0).to_string();
    let out = cli_as(
        &env,
        &operator,
        &["dead-letters", "retry", "--id", &published],
    )
    .await;
    out.assert_code(1);
    out.assert_stderr_has("published, not dead-lettered");

    cli_as_succeeds(&env, &operator, &["dead-letters", "retry", "--all"]).await;
    assert_eq!(state(4).await, (false, false));
    assert_eq!(state(5).await, (false, false));
    env.update_row(id(5), "dead_lettered_at = now()").await;
    cli_as_succeeds(&env, &operator, &["dead-letters", "discard", "--all"]).await;
    assert!(!exists(5).await, "row {} not discarded by --all", id(5));

    let from = id(0).to_string();
    let to = id(0).to_string();
    cli_as_succeeds(
        &env,
        &operator,
        &["replay", "--from-id", &from, "--to-id", &to],
    )
    .await;
    assert_eq!(state(0).await, (false, false), "row {} not replayed", id(0));
    cli_as_succeeds(
        &env,
        &operator,
        &["replay", "--since", "2000-01-01T00:00:00Z"],
    )
    .await;
    assert_eq!(state(1).await, (false, false), "row {} not replayed", id(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_role_writes_rows_and_is_refused_everything_else() {
    let (env, roles) = least_privilege("roles_app").await;
    let s = &env.schema;
    let mut app = connect_db(&roles.url(&roles.app)).await;
    let ids = write_as_application(&mut app, s, "nowhere").await;
    let backlog = app
        .query_one(
            &format!("SELECT pending, oldest_pending_age IS NOT NULL FROM \"{s}\".backlog()"),
            &[],
        )
        .await
        .expect("backlog() as the app role");
    assert_eq!(backlog.get::<_, i64>(0), ids.len() as i64);
    assert!(backlog.get::<_, bool>(1));

    let role = &roles.app;
    for sql in [
        format!("UPDATE \"{s}\".messages SET published_at = now()"),
        format!("UPDATE \"{s}\".messages SET payload = 'x'"),
        format!("DELETE FROM \"{s}\".messages"),
        format!("SELECT payload FROM \"{s}\".messages"),
        format!("SELECT * FROM \"{s}\".messages"),
        format!("SELECT headers, exchange, routing_key FROM \"{s}\".messages"),
        format!("SELECT created_at, published_at, dead_lettered_at FROM \"{s}\".messages"),
        format!("SELECT \"{s}\".relay_heartbeat('app', interval '10 s', NULL)"),
        format!("SELECT \"{s}\".relay_set_idle('app', true)"),
        format!("SELECT \"{s}\".relay_release('app')"),
        format!("SELECT \"{s}\".relay_set_broker_node('app', 'node')"),
        format!("SELECT * FROM \"{s}\".relays"),
        format!("INSERT INTO \"{s}\".relays (instance) VALUES ('app')"),
        format!("SELECT * FROM \"{s}\".leases"),
        format!("UPDATE \"{s}\".leases SET owner = 'app'"),
        format!("SELECT setval('\"{s}\".relays_waiting', 5)"),
        format!("SELECT * FROM \"{s}\".schema_migrations"),
    ] {
        assert_refused(&app, role, &sql).await;
    }
    let published = env.published_count().await;
    assert_eq!(published, 0, "a refused statement changed rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_inserts_wake_a_waiting_relay() {
    let (env, roles) = least_privilege("roles_notify").await;
    let s = &env.schema;
    // A live relay waits (until an hour from now, in milliseconds since the
    // epoch, see migration 6): the insert trigger's WHEN becomes true. Its
    // function runs as the application role, whose EXECUTE on it was revoked.
    env.exec(
        &format!(
            "SELECT setval('\"{s}\".relays_waiting',
                           (date_part('epoch', now() + interval '1 hour') * 1000)::bigint)"
        ),
        &[],
    )
    .await;
    let (listener, mut connection) = tokio_postgres::connect(&env.db_url, NoTls)
        .await
        .expect("listener connection");
    let (notified, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = message {
                let _ = notified.send(n.channel().to_string());
            }
        }
    });
    listener
        .batch_execute(&format!("LISTEN \"{s}.messages\""))
        .await
        .expect("LISTEN");
    let mut app = connect_db(&roles.url(&roles.app)).await;
    // The trigger's WHEN names the sequence by its oid (bound when the
    // trigger was made): a temporary one of the same name changes nothing.
    app.batch_execute("CREATE TEMPORARY SEQUENCE relays_waiting")
        .await
        .expect("the application's own temporary sequence");
    write_as_application(&mut app, s, "nowhere").await;
    let channel = tokio::time::timeout(SETUP_TIMEOUT, notifications.recv())
        .await
        .expect("no notification for the application's insert")
        .expect("listener ended");
    assert_eq!(channel, format!("{s}.messages"));
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_operator_roles_are_refused_what_they_do_not_need() {
    let (env, roles) = least_privilege("roles_refused").await;
    let s = &env.schema;
    env.insert_committed(&[NewRow::to_queue("nowhere", "x")])
        .await;
    let relay = connect_db(&roles.url(&roles.relay)).await;
    for sql in [
        format!("INSERT INTO \"{s}\".messages (routing_key, payload) VALUES ('q', 'x')"),
        format!("SELECT \"{s}\".enqueue('', 'q', 'x'::text)"),
        format!("INSERT INTO \"{s}\".schema_migrations (version, name) VALUES (99, 'x')"),
        // What a row carries is the application's: the relay sets states only.
        format!("UPDATE \"{s}\".messages SET payload = 'x'"),
        format!("UPDATE \"{s}\".messages SET headers = '{{}}'"),
        format!("UPDATE \"{s}\".messages SET exchange = 'x', routing_key = 'x'"),
        format!("UPDATE \"{s}\".messages SET partition_key = 'x'"),
        format!("UPDATE \"{s}\".messages SET message_id = gen_random_uuid()"),
        format!("UPDATE \"{s}\".messages SET created_at = now(), content_type = 'x'"),
    ] {
        assert_refused(&relay, &roles.relay, &sql).await;
    }
    // Every column the relay does set (marking, failed attempts, parking).
    relay
        .batch_execute(&format!(
            "UPDATE \"{s}\".messages
                SET attempts = attempts + 1, last_error = 'test', available_at = now(),
                    dead_lettered_at = now(), published_at = NULL"
        ))
        .await
        .expect("the relay role updates the columns it marks");
    let operator = connect_db(&roles.url(&roles.operator)).await;
    for sql in [
        format!("SELECT payload FROM \"{s}\".messages"),
        format!("SELECT headers FROM \"{s}\".messages"),
        format!("UPDATE \"{s}\".messages SET payload = 'x'"),
        format!("INSERT INTO \"{s}\".messages (routing_key, payload) VALUES ('q', 'x')"),
        format!("SELECT \"{s}\".enqueue('', 'q', 'x'::text)"),
        format!("SELECT \"{s}\".relay_heartbeat('ops', interval '10 s', NULL)"),
        format!("UPDATE \"{s}\".leases SET owner = 'ops'"),
        format!("DELETE FROM \"{s}\".relays"),
    ] {
        assert_refused(&operator, &roles.operator, &sql).await;
    }
}

/// Every function of the schema, and who may execute it after the grants:
/// a function a migration adds without `grants` knowing fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_function_is_executable_by_exactly_its_roles() {
    let (env, roles) = least_privilege("roles_functions").await;
    let rows = {
        let pg = env.pg.lock().await;
        pg.query(
            "SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
                    has_function_privilege($2, p.oid, 'EXECUTE'),
                    has_function_privilege($3, p.oid, 'EXECUTE'),
                    has_function_privilege($4, p.oid, 'EXECUTE'),
                    EXISTS (SELECT 1 FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                             WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')
               FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = $1
              ORDER BY 1",
            &[&env.schema, &roles.app, &roles.relay, &roles.operator],
        )
        .await
        .expect("function privileges")
    };
    let mut problems = Vec::new();
    for r in &rows {
        let function: String = r.get(0);
        let got: [bool; 4] = [r.get(1), r.get(2), r.get(3), r.get(4)];
        let name = function.split('(').next().unwrap_or_default();
        // [app, relay, operator, PUBLIC]
        let wanted = match name {
            "enqueue" | "backlog" => [true, false, false, false],
            "relay_heartbeat" | "relay_release" | "relay_set_idle" | "relay_set_broker_node" => {
                [false, true, false, false]
            }
            "notify_relay" => [false, false, false, false],
            _ => {
                problems.push(format!(
                    "{function}: unknown to this test; give it to the right role in src/cli/grants.rs and list it here"
                ));
                continue;
            }
        };
        if got != wanted {
            problems.push(format!(
                "{function}: executable by [app, relay, operator, PUBLIC] = {got:?}, wanted {wanted:?}"
            ));
        }
    }
    assert!(rows.len() >= 9, "{} functions found", rows.len());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerunning_grants_takes_back_privileges_it_does_not_give() {
    let (env, roles) = least_privilege("roles_rerun").await;
    let s = &env.schema;
    env.insert_committed(&[NewRow::to_queue("nowhere", "secret")])
        .await;
    let owner = connect_db(&roles.url(&roles.owner)).await;
    owner
        .batch_execute(&format!(
            "GRANT SELECT, UPDATE ON \"{s}\".messages TO {app};
             GRANT SELECT (payload) ON \"{s}\".messages TO {app};
             GRANT EXECUTE ON FUNCTION \"{s}\".relay_release(text) TO {app};",
            app = roles.app
        ))
        .await
        .expect("extra grants as the owner");
    let app = connect_db(&roles.url(&roles.app)).await;
    app.batch_execute(&format!("SELECT payload FROM \"{s}\".messages"))
        .await
        .expect("the extra grant works before the re-run");
    roles.apply_grants(s).await;
    for sql in [
        format!("SELECT payload FROM \"{s}\".messages"),
        format!("UPDATE \"{s}\".messages SET published_at = now()"),
        format!("SELECT \"{s}\".relay_release('app')"),
    ] {
        assert_refused(&app, &roles.app, &sql).await;
    }
    // And what the application needs still works.
    let mut app = app;
    write_as_application(&mut app, s, "nowhere").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_prints_sql_without_any_connection_setting() {
    let out = run_cli(
        &["grants"],
        &[
            ("OUTBOX_SCHEMA", "shop_outbox"),
            ("OUTBOX_APP_ROLE", "Shop App"),
            ("OUTBOX_RELAY_ROLE", "shop_relay"),
        ],
        CLI_TIMEOUT,
    )
    .await;
    out.assert_code(0);
    assert!(out.stderr.is_empty(), "{}", out.describe());
    assert!(
        out.stdout
            .contains("GRANT INSERT ON TABLE \"shop_outbox\".\"messages\" TO \"Shop App\";"),
        "{}",
        out.describe()
    );
    assert!(
        out.stdout.contains("TO \"shop_relay\";"),
        "{}",
        out.describe()
    );
    assert!(
        out.stdout.contains("TO \"outbox_operator\";"),
        "{}",
        out.describe()
    );

    let out = run_cli(&["grants", "--app-role", "public"], &[], CLI_TIMEOUT).await;
    out.assert_code(2);
    assert!(out.stdout.is_empty(), "{}", out.describe());
    out.assert_stderr_has("app-role");
}

/// The names of the schema's relations (tables, views, sequences) and their
/// columns with types, as the superuser reads them from the catalog.
async fn relations_with_columns(env: &TestEnv) -> Vec<(String, Vec<(String, String)>)> {
    let pg = env.pg.lock().await;
    let rows = pg
        .query(
            "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
              WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
              ORDER BY c.relname, a.attnum",
            &[&env.schema],
        )
        .await
        .expect("relations of the schema");
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for r in rows {
        let (rel, col, ty): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        match out.last_mut() {
            Some((name, cols)) if *name == rel => cols.push((col, ty)),
            _ => out.push((rel, vec![(col, ty)])),
        }
    }
    out
}

/// An attacker's session: a function that notes who runs it (a session
/// setting, which any role may write) and tries to grant the attacker every
/// table of the schema, and a temporary view in front of each of the
/// schema's relations that calls it. PUBLIC may read the views, so whoever
/// is misled into reading one runs the function as itself.
async fn plant_temporary_objects(
    client: &Client,
    schema: &str,
    attacker: &str,
    relations: &[(String, Vec<(String, String)>)],
) {
    client
        .batch_execute(&format!(
            "CREATE FUNCTION pg_temp.hijack() RETURNS boolean LANGUAGE plpgsql AS $f$
             BEGIN
                 PERFORM set_config('outbox_test.ran_as',
                     concat_ws(' ', nullif(current_setting('outbox_test.ran_as', true), ''), current_user), false);
                 BEGIN
                     EXECUTE format('GRANT ALL ON ALL TABLES IN SCHEMA %I TO %I', '{schema}', '{attacker}');
                 EXCEPTION WHEN others THEN NULL;
                 END;
                 RETURN true;
             END $f$;
             GRANT EXECUTE ON FUNCTION pg_temp.hijack() TO PUBLIC;"
        ))
        .await
        .expect("the attacker's function");
    for (relation, columns) in relations {
        let list: Vec<String> = columns
            .iter()
            .map(|(name, ty)| format!("NULL::{ty} AS \"{name}\""))
            .collect();
        client
            .batch_execute(&format!(
                "CREATE TEMPORARY VIEW \"{relation}\" AS
                     SELECT {} FROM (VALUES (1)) v WHERE pg_temp.hijack();
                 GRANT SELECT ON pg_temp.\"{relation}\" TO PUBLIC;",
                list.join(", ")
            ))
            .await
            .unwrap_or_else(|e| panic!("temporary view {relation}: {e:?}"));
    }
}

/// Every SECURITY DEFINER function of the schema (backlog() today), called
/// by every role that may call it, from a session that put a temporary view
/// in front of each of the schema's relations: the function reads the
/// schema's own relations, so the attacker's code never runs, let alone as
/// the owner, and the function's answer is the real one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_role_runs_code_with_the_owners_rights_through_a_temporary_object() {
    let (env, roles) = least_privilege("roles_temp_hijack").await;
    let s = &env.schema;
    env.insert_committed(&[
        NewRow::to_queue("nowhere", "pending 1"),
        NewRow::to_queue("nowhere", "pending 2"),
    ])
    .await;
    let definers: Vec<(String, String, String)> = {
        let pg = env.pg.lock().await;
        pg.query(
            "SELECT p.oid::regprocedure::text, p.proname::text,
                    coalesce((SELECT string_agg('NULL::' || format_type(t, NULL), ', ' ORDER BY o)
                                FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a(t, o)), '')
               FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = $1 AND p.prosecdef
              ORDER BY 1",
            &[s],
        )
        .await
        .expect("SECURITY DEFINER functions")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
    };
    assert!(
        definers.iter().any(|(_, name, _)| name == "backlog"),
        "backlog() is no longer SECURITY DEFINER? {definers:?}"
    );
    let relations = relations_with_columns(&env).await;
    assert!(
        relations.iter().any(|(r, _)| r == "messages"),
        "{relations:?}"
    );

    let mut problems = Vec::new();
    for (function, name, args) in &definers {
        let mut callers = 0;
        for role in [&roles.app, &roles.relay, &roles.operator] {
            let client = connect_db(&roles.url(role)).await;
            let may: bool = client
                .query_one(
                    "SELECT has_function_privilege($1::text::regprocedure, 'EXECUTE')",
                    &[&format!("\"{s}\".{name}({})", args.replace("NULL::", ""))],
                )
                .await
                .expect("may the role call it")
                .get(0);
            if !may {
                continue;
            }
            callers += 1;
            plant_temporary_objects(&client, s, role, &relations).await;
            let call = format!("SELECT * FROM \"{s}\".{name}({args})");
            let answer = client.query(&call, &[]).await;
            let ran_as: String = client
                .query_one(
                    "SELECT coalesce(current_setting('outbox_test.ran_as', true), '')",
                    &[],
                )
                .await
                .expect("read the note")
                .get(0);
            let owner_ran = ran_as.split(' ').any(|who| who == roles.owner);
            if owner_ran {
                problems.push(format!(
                    "{function} called by {role} ran the caller's temporary code as the owner {} (ran as: {ran_as})",
                    roles.owner
                ));
            } else if !ran_as.is_empty() {
                problems.push(format!(
                    "{function} called by {role} read the caller's temporary objects (ran as: {ran_as})"
                ));
            }
            match &answer {
                Err(e) => problems.push(format!("{function} called by {role}: {e:?}")),
                Ok(rows) if name == "backlog" => {
                    let pending: Option<i64> = rows.first().and_then(|r| r.get(0));
                    if pending != Some(2) {
                        problems.push(format!(
                            "backlog() called by {role} answered pending = {pending:?}, not the 2 rows of the outbox"
                        ));
                    }
                }
                Ok(_) => {}
            }
            let gained: bool = client
                .query_one(
                    &format!(
                        "SELECT has_table_privilege('\"{s}\".messages', 'SELECT')
                             OR has_column_privilege('\"{s}\".messages', 'payload', 'SELECT')
                             OR has_table_privilege('\"{s}\".leases', 'UPDATE')"
                    ),
                    &[],
                )
                .await
                .expect("the role's privileges")
                .get(0);
            if gained && role != &roles.relay {
                problems.push(format!(
                    "{role} gained privileges on the schema through {function}"
                ));
            }
            if role == &roles.relay {
                let payload_update: bool = client
                    .query_one(
                        &format!(
                            "SELECT has_column_privilege('\"{s}\".messages', 'payload', 'UPDATE')"
                        ),
                        &[],
                    )
                    .await
                    .expect("the relay role's privileges")
                    .get(0);
                if payload_update {
                    problems.push(format!(
                        "{role} gained UPDATE of payload through {function}"
                    ));
                }
            }
        }
        if callers == 0 {
            problems.push(format!(
                "{function}: no role may call it, so nothing was tried"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// enqueue() runs as its caller, so a temporary table could lend no rights;
/// but one an application happens to call `messages` must not take the rows
/// enqueue() writes (they would never be published).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_writes_to_the_outbox_whatever_temporary_tables_the_application_has() {
    let (env, roles) = least_privilege("roles_temp_enqueue").await;
    let s = &env.schema;
    let app = connect_db(&roles.url(&roles.app)).await;
    app.batch_execute(
        "CREATE TEMPORARY TABLE messages (
             message_id uuid DEFAULT gen_random_uuid(), exchange text, routing_key text,
             payload bytea, headers jsonb, partition_key text, message_type text,
             available_at timestamptz, content_type text, correlation_id text)",
    )
    .await
    .expect("the application's own temporary table");
    let id: uuid::Uuid = app
        .query_one(
            &format!("SELECT \"{s}\".enqueue('', 'nowhere', 'kept'::text)"),
            &[],
        )
        .await
        .expect("enqueue() as the app role")
        .get(0);
    let in_outbox = env
        .scalar_i64(&format!(
            "SELECT count(*) FROM \"{s}\".messages WHERE message_id = '{id}'"
        ))
        .await;
    assert_eq!(
        in_outbox, 1,
        "enqueue() wrote row {id} into the session's temporary table, not the outbox"
    );
}

/// Every function of the schema, whoever it runs as, searches the schema
/// first and the session's temporary objects last: a migration that adds a
/// function without it fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_function_pins_its_search_path_with_pg_temp_last() {
    let env = TestEnv::new("roles_pinned_paths").await;
    let rows = {
        let pg = env.pg.lock().await;
        pg.query(
            "SELECT p.oid::regprocedure::text, coalesce(p.proconfig, '{}')
               FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = $1 ORDER BY 1",
            &[&env.schema],
        )
        .await
        .expect("functions of the schema")
    };
    let wanted = format!("search_path={}, pg_temp", env.schema);
    let unpinned: Vec<String> = rows
        .iter()
        .filter(|r| !r.get::<_, Vec<String>>(1).contains(&wanted))
        .map(|r| format!("{} {:?}", r.get::<_, String>(0), r.get::<_, Vec<String>>(1)))
        .collect();
    assert!(rows.len() >= 9, "{} functions found", rows.len());
    assert!(
        unpinned.is_empty(),
        "functions without `{wanted}`:\n{}",
        unpinned.join("\n")
    );
}
