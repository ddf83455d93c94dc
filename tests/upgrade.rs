//! Upgrades: a schema left at any earlier version, with rows in every state,
//! migrates to the latest version and loses nothing; the relay then
//! publishes every row that was pending.
//!
//! Each earlier version is made with the SQL `migrate --dry-run` prints for a
//! new schema, cut before the next migration: exactly what migrate runs.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use outbox_test_kit::*;

/// The migration files of `sql/`, in order: (version, file name).
fn migration_files() -> Vec<(i32, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sql");
    let mut files: Vec<(i32, String)> = std::fs::read_dir(&dir)
        .expect("read sql/")
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            let version = name.get(..4)?.parse().ok()?;
            name.ends_with(".sql").then_some((version, name))
        })
        .collect();
    files.sort();
    files
}

/// What must survive an upgrade of each row: ids, content and state.
async fn row_digest(env: &TestEnv, schema: &str) -> Vec<String> {
    let pg = env.pg.lock().await;
    pg.query(
        &format!(
            "SELECT concat_ws(' ', id, message_id, encode(payload, 'escape'), partition_key,
                              routing_key, headers::text, attempts,
                              published_at IS NOT NULL, dead_lettered_at IS NOT NULL)
               FROM \"{schema}\".messages ORDER BY id"
        ),
        &[],
    )
    .await
    .expect("read the rows")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_from_every_earlier_version_loses_no_pending_row() {
    let files = migration_files();
    let latest = files.last().expect("migrations").0;
    assert_eq!(
        files.iter().map(|f| f.0).collect::<Vec<_>>(),
        (1..=latest).collect::<Vec<_>>(),
        "migration files are not numbered 1..{latest}: {files:?}"
    );
    let env = TestEnv::new_unmigrated("upgrade").await;
    let queue = env.declare_queue("upgrade").await;
    let collector = env.consume(&queue, AckMode::Auto).await;

    for (from, _) in &files[..files.len() - 1] {
        let from = *from;
        let schema = format!("{}_v{from}", env.schema);
        env.own_schema(&schema);
        let dry = env
            .cli_on_schema(&["migrate", "--dry-run"], &schema, SETUP_TIMEOUT)
            .await;
        assert_eq!(dry.code(), Some(0), "{}", dry.describe());
        let next = &files[from as usize].1;
        let cut = dry
            .stdout
            .find(&format!("\n-- {next}\n"))
            .unwrap_or_else(|| panic!("no `-- {next}` in the dry run\n{}", dry.stdout));
        let sql = format!("{}\nCOMMIT;\n", &dry.stdout[..cut]);
        env.pg
            .lock()
            .await
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("migrations up to {from}: {e:?}"));
        let at = env
            .scalar_i64(&format!(
                "SELECT max(version)::bigint FROM \"{schema}\".schema_migrations"
            ))
            .await;
        assert_eq!(at, i64::from(from));

        // Rows in every state: pending with and without a key, scheduled a
        // moment ago, already published, dead-lettered.
        let pending: Vec<String> = {
            let pg = env.pg.lock().await;
            let rows = pg
                .query(
                    &format!(
                        "INSERT INTO \"{schema}\".messages (routing_key, payload, partition_key, headers, available_at)
                         VALUES ($1, 'a', 'k', '{{\"n\": 1}}', now()), ($1, 'b', 'k', '{{}}', now()),
                                ($1, 'c', NULL, '{{}}', now() - interval '1 minute')
                         RETURNING message_id::text"
                    ),
                    &[&queue],
                )
                .await
                .expect("pending rows");
            pg.batch_execute(&format!(
                "INSERT INTO \"{schema}\".messages (routing_key, payload, published_at)
                 VALUES ('{queue}', 'published', now());
                 INSERT INTO \"{schema}\".messages (routing_key, payload, dead_lettered_at, attempts, last_error)
                 VALUES ('{queue}', 'parked', now(), 10, 'test')"
            ))
            .await
            .expect("published and parked rows");
            rows.iter().map(|r| r.get(0)).collect()
        };
        if from >= 3 {
            // A relay killed while idle at that version: counted as waiting.
            env.pg
                .lock()
                .await
                .batch_execute(&format!(
                    "INSERT INTO \"{schema}\".relays (instance, heartbeat_at, idle)
                     VALUES ('killed', now() - interval '1 minute', true);
                     SELECT setval('\"{schema}\".relays_waiting', 1, true);"
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
        let at = env
            .scalar_i64(&format!(
                "SELECT max(version)::bigint FROM \"{schema}\".schema_migrations"
            ))
            .await;
        assert_eq!(at, i64::from(latest), "from version {from}");
        assert_eq!(
            row_digest(&env, &schema).await,
            before,
            "migrating from version {from} changed rows"
        );

        // Nobody alive waits: inserts do not notify (the trigger's WHEN is false).
        let notifies = env
            .scalar_i64(&format!(
                "SELECT (pg_sequence_last_value('\"{schema}\".relays_waiting')
                         > date_part('epoch', now()) * 1000)::int::bigint"
            ))
            .await;
        assert_eq!(
            notifies, 0,
            "from version {from}: inserts still notify for a dead relay"
        );

        // The relay of this version publishes every pending row.
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
                "SELECT count(*) FROM \"{schema}\".messages WHERE published_at IS NOT NULL"
            ))
            .await
                == 4
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
