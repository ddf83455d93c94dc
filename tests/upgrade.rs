//! Upgrades: a schema left at any earlier released version, with rows in
//! every state, migrates to the current one and loses nothing; its functions,
//! trigger and indexes are then exactly a new schema's, grants on functions
//! hold, and the relay publishes every row that was pending.
//!
//! Earlier versions are built from frozen copies of the released numbered
//! files (`tests/upgrade/released/`, as each release shipped them, function
//! bodies included), applied the way that release's `migrate` did: the files
//! of `sql/` have changed since (functions moved to their own files), so they
//! cannot rebuild an old schema.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use outbox_test_kit::*;

/// The released numbered files, in order: (version, file name, text).
fn released_files() -> Vec<(i32, String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/upgrade/released");
    let mut files: Vec<(i32, String, String)> = std::fs::read_dir(&dir)
        .expect("read tests/upgrade/released")
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path.file_name()?.to_string_lossy().into_owned();
            let version = name.get(..4)?.parse().ok()?;
            let text = std::fs::read_to_string(&path).ok()?;
            name.ends_with(".sql").then_some((version, name, text))
        })
        .collect();
    files.sort();
    files
}

/// The numbered files of `sql/` today: their versions.
fn current_versions() -> Vec<i32> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sql");
    let mut versions: Vec<i32> = std::fs::read_dir(&dir)
        .expect("read sql/")
        .filter_map(|e| e.ok()?.file_name().to_string_lossy().get(..4)?.parse().ok())
        .collect();
    versions.sort();
    versions
}

/// A schema at released version `upto`: what that release's `migrate` ran
/// (one transaction: the schema, `schema_migrations`, each file and its row).
async fn build_released(env: &TestEnv, schema: &str, upto: i32) {
    let mut sql = format!(
        "BEGIN;\n\
         CREATE SCHEMA IF NOT EXISTS {schema};\n\
         SET LOCAL search_path TO {schema};\n\
         CREATE TABLE IF NOT EXISTS schema_migrations (\n    \
             version int PRIMARY KEY,\n    \
             name text NOT NULL,\n    \
             applied_at timestamptz NOT NULL DEFAULT now()\n);\n"
    );
    for (version, name, text) in released_files().iter().filter(|f| f.0 <= upto) {
        sql.push_str(&format!(
            "\n-- {name}\n{text}\nINSERT INTO schema_migrations (version, name) VALUES ({version}, '{name}');\n"
        ));
    }
    sql.push_str("COMMIT;\n");
    env.pg
        .lock()
        .await
        .batch_execute(&sql)
        .await
        .unwrap_or_else(|e| panic!("released migrations up to {upto}: {e:?}"));
}

/// What must survive an upgrade of each row: ids, content and state.
async fn row_digest(env: &TestEnv, schema: &str) -> Vec<String> {
    let pg = env.pg.lock().await;
    pg.query(
        &format!(
            "SELECT concat_ws(' ', id, message_id, encode(payload, 'escape'), partition_key,
                              routing_key, headers::text, attempts,
                              published_at IS NOT NULL, dead_lettered_at IS NOT NULL)
               FROM {schema}.messages ORDER BY id"
        ),
        &[],
    )
    .await
    .expect("read the rows")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Every function (full definition: body, language, security, pinned path),
/// trigger and index of the schema, its name replaced by `S`.
async fn definitions(env: &TestEnv, schema: &str) -> Vec<String> {
    let pg = env.pg.lock().await;
    pg.query(
        "SELECT replace(d, $1::text, 'S') FROM (
             SELECT pg_get_functiondef(p.oid) AS d FROM pg_proc p
              WHERE p.pronamespace = $1::text::regnamespace
             UNION ALL
             SELECT pg_get_triggerdef(t.oid) FROM pg_trigger t
               JOIN pg_class c ON c.oid = t.tgrelid
              WHERE c.relnamespace = $1::text::regnamespace AND NOT t.tgisinternal
             UNION ALL
             SELECT indexdef FROM pg_indexes WHERE schemaname = $1::text) all_objects
          ORDER BY 1",
        &[&schema],
    )
    .await
    .expect("read the schema's definitions")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_from_every_earlier_version_loses_no_pending_row() {
    let released = released_files();
    let latest = *current_versions().last().expect("numbered files in sql/");
    assert_eq!(
        released.iter().map(|f| f.0).collect::<Vec<_>>(),
        (1..=released.len() as i32).collect::<Vec<_>>(),
        "released files are not numbered 1..: {:?}",
        released.iter().map(|f| &f.1).collect::<Vec<_>>()
    );
    let env = TestEnv::new_unmigrated("upgrade").await;
    let queue = env.declare_queue("upgrade").await;
    let collector = env.consume(&queue, AckMode::Auto).await;

    // What a new installation gets: every upgrade must end there.
    let fresh = format!("{}_new", env.schema);
    env.own_schema(&fresh);
    let out = env.cli_on_schema(&["migrate"], &fresh, SETUP_TIMEOUT).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let wanted_definitions = definitions(&env, &fresh).await;
    assert!(
        wanted_definitions.iter().any(|d| d.contains(
            "FUNCTION S.relay_heartbeat(p_instance text, p_ttl interval, p_metrics_addr text"
        )),
        "{wanted_definitions:#?}"
    );

    for from in released.iter().map(|f| f.0) {
        let schema = format!("{}_v{from}", env.schema);
        env.own_schema(&schema);
        build_released(&env, &schema, from).await;

        // Rows in every state, written as that version's applications did
        // (a plain INSERT, and enqueue()): pending with and without a key,
        // scheduled a moment ago, already published, dead-lettered.
        let pending: Vec<String> = {
            let pg = env.pg.lock().await;
            let mut ids: Vec<String> = pg
                .query(
                    &format!(
                        "INSERT INTO {schema}.messages (routing_key, payload, partition_key, headers, available_at)
                         VALUES ($1, 'a', 'k', '{{\"n\": 1}}', now()), ($1, 'b', 'k', '{{}}', now())
                         RETURNING message_id::text"
                    ),
                    &[&queue],
                )
                .await
                .expect("pending rows")
                .iter()
                .map(|r| r.get(0))
                .collect();
            for (payload, key) in [("c", None), ("d", Some("k"))] {
                let row = pg
                    .query_one(
                        &format!(
                            "SELECT {schema}.enqueue('', $1, $2::text, '{{}}', $3,
                                                     NULL, now() - interval '1 minute')::text"
                        ),
                        &[&queue, &payload, &key],
                    )
                    .await
                    .expect("enqueue()");
                ids.push(row.get(0));
            }
            pg.batch_execute(&format!(
                "INSERT INTO {schema}.messages (routing_key, payload, published_at)
                 VALUES ('{queue}', 'published', now());
                 INSERT INTO {schema}.messages (routing_key, payload, dead_lettered_at, attempts, last_error)
                 VALUES ('{queue}', 'parked', now(), 10, 'test')"
            ))
            .await
            .expect("published and parked rows");
            // As `grants` leaves it: PUBLIC may not call backlog(), one role may.
            pg.batch_execute(&format!(
                "REVOKE EXECUTE ON FUNCTION {schema}.backlog() FROM PUBLIC;
                 GRANT EXECUTE ON FUNCTION {schema}.backlog() TO pg_monitor;"
            ))
            .await
            .expect("grants on backlog()");
            ids
        };
        if from >= 3 {
            // A relay killed while idle at that version: counted as waiting.
            env.pg
                .lock()
                .await
                .batch_execute(&format!(
                    "INSERT INTO {schema}.relays (instance, heartbeat_at, idle)
                     VALUES ('killed', now() - interval '1 minute', true);
                     SELECT setval('{schema}.relays_waiting', 1, true);"
                ))
                .await
                .expect("an idle relay of the old version");
        }
        let before = row_digest(&env, &schema).await;

        let out = env
            .cli_on_schema(&["migrate"], &schema, SETUP_TIMEOUT)
            .await;
        assert_eq!(
            out.code(),
            Some(0),
            "migrate from version {from}\n{}",
            out.describe()
        );
        assert!(
            out.stdout.contains("applied the functions and triggers"),
            "from version {from}: {}",
            out.describe()
        );
        let at = env
            .scalar_i64(&format!(
                "SELECT max(version)::bigint FROM {schema}.schema_migrations"
            ))
            .await;
        assert_eq!(at, i64::from(latest), "from version {from}");
        assert_eq!(
            row_digest(&env, &schema).await,
            before,
            "migrating from version {from} changed rows"
        );
        assert_eq!(
            definitions(&env, &schema).await,
            wanted_definitions,
            "from version {from}: functions, trigger or indexes differ from a new schema's"
        );
        let grants_held = env
            .scalar_i64(&format!(
                "SELECT (has_function_privilege('pg_monitor', '{schema}.backlog()', 'EXECUTE')
                         AND NOT EXISTS (SELECT 1 FROM pg_proc p, aclexplode(p.proacl) a
                                          WHERE p.oid = '{schema}.backlog()'::regprocedure
                                            AND a.grantee = 0))::int::bigint"
            ))
            .await;
        assert_eq!(
            grants_held, 1,
            "from version {from}: re-creating backlog() changed who may call it"
        );
        let again = env
            .cli_on_schema(&["migrate"], &schema, SETUP_TIMEOUT)
            .await;
        assert!(
            again.code() == Some(0) && again.stdout.contains("is up to date"),
            "a second migrate from version {from} did something\n{}",
            again.describe()
        );

        // Nobody alive waits: inserts do not notify (the trigger's WHEN is false).
        let notifies = env
            .scalar_i64(&format!(
                "SELECT (pg_sequence_last_value('{schema}.relays_waiting')
                         > date_part('epoch', now()) * 1000)::int::bigint"
            ))
            .await;
        assert_eq!(
            notifies, 0,
            "from version {from}: inserts still notify for a dead relay"
        );

        // The current relay publishes every row that was pending.
        let instance = format!("{schema}-relay");
        let mut cmd = relay_command();
        cmd.arg("run")
            .args(["--database-url", &env.db_url])
            .args(["--amqp-url", &env.amqp_url])
            .args(["--schema", &schema])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--instance-id", &instance]);
        let mut relay =
            Relay::spawn_command(cmd, env.dir.join(format!("{instance}.log")), &instance);
        relay.wait_healthy().await;
        let wanted: HashSet<String> = pending.into_iter().collect();
        collector.wait_for_ids(&wanted, ARRIVAL_TIMEOUT).await;
        let published = wait_until(ARRIVAL_TIMEOUT, async || {
            env.scalar_i64(&format!(
                "SELECT count(*) FROM {schema}.messages WHERE published_at IS NOT NULL"
            ))
            .await
                == 5
        })
        .await;
        assert!(
            published,
            "from version {from}: rows not marked\n{}",
            relay.log_tail(100)
        );
        let status = relay.terminate(Duration::from_secs(60)).await;
        assert!(status.success(), "{status:?}\n{}", relay.log_tail(100));
    }
}

/// The functions and triggers are checked like the numbered versions: a set
/// other than this binary's stops the relay's and the operator's commands with "run migrate"
/// (and migrate installs it), a set from a newer outbox-relay with "upgrade",
/// and migrate never downgrades it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_function_set_is_refused_like_a_pending_migration() {
    let env = TestEnv::new_unmigrated("upgrade_stale").await;
    let schema = env.schema.clone();
    let latest = released_files().last().expect("released files").0;
    build_released(&env, &schema, latest).await;

    // Released at the latest version, before functions had their own files.
    let out = env.cli(&["dead-letters", "list"], SETUP_TIMEOUT).await;
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr
            .contains(&format!("run `outbox-relay migrate --schema {schema}`")),
        "{}",
        out.describe()
    );
    let out = env.cli(&["migrate"], SETUP_TIMEOUT).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let out = env.cli(&["dead-letters", "list"], SETUP_TIMEOUT).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());

    // Recorded by a newer outbox-relay: refused, and migrate leaves it alone.
    let mark = |name: &str| {
        format!("UPDATE {schema}.schema_migrations SET name = '{name}' WHERE version = 0")
    };
    env.pg
        .lock()
        .await
        .batch_execute(&format!(
            "{}; COMMENT ON FUNCTION {schema}.backlog() IS 'newer';",
            mark("repeatable 0 outbox-relay 999.0.0")
        ))
        .await
        .expect("a newer set");
    for command in [&["dead-letters", "list"][..], &["migrate"]] {
        let out = env.cli(command, SETUP_TIMEOUT).await;
        assert_eq!(out.code(), Some(1), "{command:?}\n{}", out.describe());
        assert!(
            out.stderr.contains("outbox-relay 999.0.0")
                && out.stderr.contains("upgrade outbox-relay"),
            "{command:?}\n{}",
            out.describe()
        );
    }
    let comment = env
        .scalar_i64(&format!(
            "SELECT (obj_description('{schema}.backlog()'::regprocedure) = 'newer')::int::bigint"
        ))
        .await;
    assert_eq!(comment, 1, "migrate touched a newer set");

    // Recorded by an older one with other text: "run migrate", which re-applies.
    env.pg
        .lock()
        .await
        .batch_execute(&mark("repeatable 0 outbox-relay 0.0.1"))
        .await
        .expect("an older set");
    let out = env.cli(&["dead-letters", "list"], SETUP_TIMEOUT).await;
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("run `outbox-relay migrate"),
        "{}",
        out.describe()
    );
    let out = env.cli(&["migrate"], SETUP_TIMEOUT).await;
    assert!(
        out.code() == Some(0) && out.stdout.contains("applied the functions and triggers"),
        "{}",
        out.describe()
    );
    let out = env.cli(&["dead-letters", "list"], SETUP_TIMEOUT).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
}
