//! Nothing PostgreSQL accepts may wedge the relay: every kind of bad row is
//! parked with its reason (or refused at INSERT) while the good rows around it,
//! on the same keys, flow on in order.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_test_kit::*;
use serde_json::{json, Value};

/// A JSON object nested `depth` levels deep (jsonb takes it; serde_json's
/// default recursion limit is 128).
fn nested(depth: usize) -> String {
    let mut s = String::from("1");
    for _ in 0..depth {
        s = format!("{{\"a\":{s}}}");
    }
    s
}

struct BadRow {
    what: &'static str,
    /// Text the row's `last_error` must contain.
    reason: &'static str,
    /// SQL expressions for (exchange, routing_key, headers, payload).
    exchange: String,
    routing_key: String,
    headers: String,
    payload_bytes: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_row_is_parked_and_good_rows_on_its_key_flow_on() {
    let (env, queue, collector) = TestEnv::with_events_queue("bad_rows", AckMode::Manual).await;
    let max_payload = 64 * 1024;

    let bad = [
        BadRow {
            what: "headers nested 300 levels deep",
            reason: "headers",
            exchange: String::new(),
            routing_key: queue.clone(),
            headers: nested(300),
            payload_bytes: 10,
        },
        BadRow {
            what: "a header number beyond a 64-bit float",
            reason: "headers",
            exchange: String::new(),
            routing_key: queue.clone(),
            headers: r#"{"big": 1e400}"#.into(),
            payload_bytes: 10,
        },
        BadRow {
            what: "a header integer beyond 64 bits",
            reason: "64-bit",
            exchange: String::new(),
            routing_key: queue.clone(),
            headers: r#"{"big": 18446744073709551616}"#.into(),
            payload_bytes: 10,
        },
        BadRow {
            what: "a header name over 255 bytes",
            reason: "255 bytes",
            exchange: String::new(),
            routing_key: queue.clone(),
            headers: format!(r#"{{"{}": 1}}"#, "h".repeat(300)),
            payload_bytes: 10,
        },
        BadRow {
            what: "headers that are not an object",
            reason: "JSON object",
            exchange: String::new(),
            routing_key: queue.clone(),
            headers: "[1, 2]".into(),
            payload_bytes: 10,
        },
        BadRow {
            what: "an exchange name over 255 bytes",
            reason: "exchange is 300 bytes",
            exchange: "x".repeat(300),
            routing_key: queue.clone(),
            headers: "{}".into(),
            payload_bytes: 10,
        },
        BadRow {
            what: "a routing key over 255 bytes",
            reason: "routing_key is 300 bytes",
            exchange: String::new(),
            routing_key: "r".repeat(300),
            headers: "{}".into(),
            payload_bytes: 10,
        },
        BadRow {
            what: "a payload over max-payload-bytes",
            reason: "over max-payload-bytes (65536)",
            exchange: String::new(),
            routing_key: queue.clone(),
            headers: "{}".into(),
            payload_bytes: max_payload + 1,
        },
    ];

    // Good rows on 5 keys, with one bad row of every kind between them, all
    // in one transaction: the claim that meets a bad row meets good ones too.
    let mut good = Vec::new();
    let mut bad_ids: HashMap<i64, &BadRow> = HashMap::new();
    {
        let mut pg = env.pg.lock().await;
        let tx = pg.transaction().await.expect("begin");
        let insert = format!(
            "INSERT INTO {} (exchange, routing_key, partition_key, headers, payload)
             VALUES ($1, $2, $3, $4::text::jsonb, $5) RETURNING id, message_id",
            env.table()
        );
        for i in 0..50 {
            let key = format!("k{}", i % 5);
            let r = tx
                .query_one(
                    &insert,
                    &[&"", &queue, &key, &"{}", &format!("good-{i}").into_bytes()],
                )
                .await
                .expect("insert good row");
            good.push((key.clone(), r.get::<_, i64>(0), r.get::<_, uuid::Uuid>(1)));
            // The j-th bad row goes after good row 5j + j%5: on key k(j%5).
            if let Some(b) = bad.get(i / 5).filter(|_| i % 5 == (i / 5) % 5) {
                let r = tx
                    .query_one(
                        &insert,
                        &[
                            &b.exchange,
                            &b.routing_key,
                            &key,
                            &b.headers,
                            &vec![b'x'; b.payload_bytes],
                        ],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("insert bad row ({}): {e}", b.what));
                bad_ids.insert(r.get(0), b);
            }
        }
        tx.commit().await.expect("commit");
    }
    assert_eq!(bad_ids.len(), bad.len());

    // Times PostgreSQL accepts but the relay could never schedule: refused at INSERT.
    for (column, value) in [
        ("available_at", "-infinity"),
        ("available_at", "infinity"),
        ("created_at", "infinity"),
    ] {
        let pg = env.pg.lock().await;
        let sql = format!(
            "INSERT INTO {} (routing_key, payload, {column}) VALUES ('{queue}', 'x', '{value}')",
            env.table()
        );
        let err = pg
            .execute(&sql, &[])
            .await
            .expect_err("an infinite time must be refused at INSERT");
        let text = format!("{err:?}");
        assert!(
            text.contains("messages_times_are_finite"),
            "{column} = {value}: {text}"
        );
    }

    let max = max_payload.to_string();
    let mut relay = Launch::new()
        .args(&["--max-payload-bytes", &max])
        .start(&env)
        .await;
    let wanted: HashSet<String> = good.iter().map(|g| g.2.to_string()).collect();
    collector
        .wait_for_ids(&wanted, Duration::from_secs(60))
        .await;

    // Every bad row parked at once (attempts 1) with a reason naming the problem.
    let parked = wait_until(Duration::from_secs(30), || async {
        env.rows()
            .await
            .iter()
            .filter(|r| bad_ids.contains_key(&r.id) && r.dead_lettered_at.is_some())
            .count()
            == bad_ids.len()
    })
    .await;
    let rows = env.rows().await;
    assert!(parked, "not every bad row was parked: {rows:#?}");
    for row in rows.iter().filter(|r| bad_ids.contains_key(&r.id)) {
        let b = bad_ids[&row.id];
        let error = row.last_error.as_deref().unwrap_or("");
        assert!(
            error.contains(b.reason) && error.contains(&row.id.to_string()),
            "{}: last_error {error:?} should say {:?} and name row {}",
            b.what,
            b.reason,
            row.id
        );
        assert!(row.published_at.is_none(), "{} was published", b.what);
        assert_eq!(row.attempts, 1, "{}: parked at once", b.what);
    }

    // Good rows: each delivered, per key in id order.
    let received = collector.snapshot();
    let position: HashMap<String, usize> = received
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.message_id.clone().map(|m| (m, i)))
        .collect();
    let mut last_by_key: HashMap<&str, usize> = HashMap::new();
    for (key, id, message_id) in &good {
        let at = position[&message_id.to_string()];
        if let Some(before) = last_by_key.insert(key, at) {
            assert!(
                before < at,
                "key {key}: row {id} arrived before an earlier row"
            );
        }
    }
    assert!(
        received
            .iter()
            .all(|r| !String::from_utf8_lossy(&r.body).starts_with('x')),
        "a bad row's payload reached the queue"
    );

    // Leases held all along, no reconnect loop, a clean stop.
    let metrics = relay.metrics().await;
    assert_eq!(
        metric_value(&metrics, "outbox_relay_partitions_owned"),
        Some(32.0),
        "{metrics}"
    );
    let logs = relay.logs();
    assert!(
        !logs.contains("reconnecting") && !logs.contains("lost the database connection"),
        "bad rows made the relay reconnect:\n{}",
        relay.log_tail(40)
    );
    let lines = logs.lines().count();
    assert!(lines < 200, "{lines} log lines for {} bad rows", bad.len());
    relay.terminate_cleanly(Duration::from_secs(20)).await;
    collector.stop().await;
}

/// A row that cannot be decoded is never mistaken for a lost connection, and a
/// good row with headers of every JSON kind arrives with the same headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_of_every_json_kind_arrive_as_written() {
    let (env, queue, collector) = TestEnv::with_events_queue("header_kinds", AckMode::Manual).await;
    let headers = json!({
        "s": "text", "i": -42, "f": 2.5, "t": true, "n": null,
        "a": [1, "two", [3.5]], "o": {"deep": {"deeper": "x"}},
        "deep": serde_json::from_str::<Value>(&nested(100)).expect("json"),
    });
    let mut row = NewRow::to_queue(&queue, "p");
    row.headers = headers.clone();
    let inserted = env.insert_committed(&[row]).await;
    let _relay = Launch::new().start(&env).await;
    collector
        .wait_for_ids(&ids_of(&inserted), Duration::from_secs(30))
        .await;
    let got = collector.snapshot()[0].headers_json();
    assert_eq!(got, Some(headers));
    collector.stop().await;
}

/// Peak resident memory of a process, from the kernel's own high-water mark.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmHWM in /proc/<pid>/status")
}

/// Prints the relay's peak RSS after `what` and asserts it stayed under the
/// manifest's memory limit.
fn assert_peak_rss_within_manifest(relay: &Relay, what: &str) {
    let peak = peak_rss_bytes(relay.pid);
    println!("relay peak RSS with {what}: {} KiB", peak / 1024);
    let limit = manifest_memory_limit();
    assert!(
        peak < limit,
        "peak RSS {} MiB is over the manifest's {} MiB limit",
        peak / 1024 / 1024,
        limit / 1024 / 1024
    );
}

/// The memory limit the shipped Kubernetes manifest gives the relay.
fn manifest_memory_limit() -> u64 {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/deployment.yaml"
    );
    let text = std::fs::read_to_string(path).expect("read the deployment manifest");
    let limit = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("limits: {memory: "))
        .and_then(|v| v.trim_end_matches('}').trim().strip_suffix("Mi"))
        .and_then(|mi| mi.parse::<u64>().ok())
        .expect("a `limits: {memory: NNMi}` line in deployment.yaml");
    limit * 1024 * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_rows_stay_within_the_manifest_memory_limit() {
    let (env, queue, collector) = TestEnv::with_events_queue("large_rows", AckMode::Auto).await;
    let (mut good, mut oversized) = (Vec::new(), Vec::new());
    {
        let mut pg = env.pg.lock().await;
        let tx = pg.transaction().await.expect("begin");
        let sql = format!(
            "INSERT INTO {} (routing_key, partition_key, payload)
             VALUES ($1, $2, convert_to(repeat('x', $3), 'UTF8')) RETURNING id, message_id",
            env.table()
        );
        // 6 MiB rows (under the 8 MiB default) and 24 MiB rows (over it),
        // between small rows, on a few keys.
        for i in 0..40i32 {
            let key = format!("k{}", i % 4);
            let size: i32 = match i % 10 {
                3 | 6 => 6 * 1024 * 1024,
                9 => 24 * 1024 * 1024,
                _ => 200,
            };
            let r = tx
                .query_one(&sql, &[&queue, &key, &size])
                .await
                .expect("insert");
            let ins = Inserted {
                id: r.get(0),
                message_id: r.get(1),
            };
            if i % 10 == 9 {
                oversized.push(ins);
            } else {
                good.push(ins);
            }
        }
        tx.commit().await.expect("commit");
    }
    let mut relay = Launch::new().start(&env).await;
    collector
        .wait_for_ids(&ids_of(&good), Duration::from_secs(120))
        .await;
    let parked = wait_until(Duration::from_secs(30), || async {
        let rows = env.rows().await;
        oversized.iter().all(|o| {
            rows.iter()
                .any(|r| r.id == o.id && r.dead_lettered_at.is_some())
        })
    })
    .await;
    assert!(parked, "rows over max-payload-bytes were not parked");
    assert_peak_rss_within_manifest(&relay, "6 MiB and 24 MiB rows");
    relay.terminate_cleanly(Duration::from_secs(20)).await;
    collector.stop().await;
}

/// Inserts, in one transaction and in order, one row per entry on queue
/// `queue`: (partition key, size of its one header's string value, 0 for no
/// header). Returns the rows in the same order.
async fn insert_with_header_sizes(
    env: &TestEnv,
    queue: &str,
    rows: &[(String, i32)],
) -> Vec<Inserted> {
    let mut pg = env.pg.lock().await;
    let tx = pg.transaction().await.expect("begin");
    let sql = format!(
        "INSERT INTO {} (routing_key, partition_key, headers, payload)
         VALUES ($1, $2, CASE WHEN $3::int > 0 THEN jsonb_build_object('big', repeat('h', $3))
                              ELSE '{{}}' END,
                 convert_to('row', 'UTF8'))
         RETURNING id, message_id",
        env.table()
    );
    let mut inserted = Vec::new();
    for (key, size) in rows {
        let r = tx
            .query_one(&sql, &[&queue, key, size])
            .await
            .expect("insert");
        inserted.push(Inserted {
            id: r.get(0),
            message_id: r.get(1),
        });
    }
    tx.commit().await.expect("commit");
    inserted
}

/// Waits until every row of `ids` is parked, and returns their states.
async fn wait_parked(env: &TestEnv, ids: &[i64], timeout: Duration) -> Vec<RowState> {
    let parked = wait_until(timeout, || async {
        let rows = env.rows().await;
        ids.iter().all(|id| {
            rows.iter()
                .any(|r| r.id == *id && r.dead_lettered_at.is_some())
        })
    })
    .await;
    let rows = env.rows().await;
    let ours: Vec<RowState> = rows.into_iter().filter(|r| ids.contains(&r.id)).collect();
    assert!(parked, "not every row was parked: {ours:#?}");
    ours
}

/// Headers too big for one AMQP frame would make RabbitMQ close the whole
/// connection (501 FRAME_ERROR) without naming the message: the relay checks
/// the encoded size against the negotiated frame_max before sending, parks
/// the row with the sizes, and every other row (later rows of its key too)
/// is published exactly once, on the one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_too_big_for_a_frame_park_their_row_and_the_others_flow_once() {
    let (env, queue, collector) =
        TestEnv::with_events_queue("frame_headers", AckMode::Manual).await;
    // Four keys of ten rows; on k0 a 200 KiB header (over the 128 KiB frame,
    // under max-header-bytes here), on k1 one of 5 MiB (over max-header-bytes).
    let mut plan = Vec::new();
    for i in 0..40 {
        let key = format!("k{}", i % 4);
        let size = match i {
            12 => 200 * 1024,
            13 => 5 * 1024 * 1024,
            _ if i % 7 == 0 => 1000,
            _ => 0,
        };
        plan.push((key, size));
    }
    let inserted = insert_with_header_sizes(&env, &queue, &plan).await;
    let (frame_row, huge_row) = (inserted[12].id, inserted[13].id);
    let good: Vec<Inserted> = inserted
        .iter()
        .filter(|r| r.id != frame_row && r.id != huge_row)
        .cloned()
        .collect();

    let mut relay = Launch::new()
        .args(&["--max-header-bytes", "1048576"])
        .start(&env)
        .await;
    collector
        .wait_for_ids(&ids_of(&good), Duration::from_secs(90))
        .await;
    let parked = wait_parked(&env, &[frame_row, huge_row], Duration::from_secs(30)).await;
    for row in &parked {
        let error = row.last_error.as_deref().unwrap_or("");
        let wanted: &[&str] = if row.id == frame_row {
            &[
                "frame_max (131072 bytes)",
                "encode to a 204881-byte",
                "into the payload",
            ]
        } else {
            &["over max-header-bytes (1048576)", "5242891 bytes"]
        };
        for w in wanted {
            assert!(
                error.contains(w) && error.contains(&row.id.to_string()),
                "row {}: last_error {error:?} should say {w:?}",
                row.id
            );
        }
        assert_eq!(row.attempts, 1, "row {} parked at once", row.id);
        assert!(row.published_at.is_none());
    }

    // Later rows keep flowing, on the bad rows' keys too.
    let later = insert_with_header_sizes(
        &env,
        &queue,
        &[("k0".into(), 10), ("k1".into(), 0), ("k2".into(), 0)],
    )
    .await;
    collector
        .wait_for_ids(&ids_of(&later), Duration::from_secs(60))
        .await;
    // Exactly once: no reconnect republished anything.
    let received = collector.message_ids();
    assert_eq!(
        received.len(),
        good.len() + later.len(),
        "duplicates or strays: {} deliveries for {} rows",
        received.len(),
        good.len() + later.len()
    );
    let metrics = relay.metrics().await;
    assert_eq!(
        metric_value(&metrics, "outbox_relay_broker_connections_total"),
        Some(1.0),
        "the relay reconnected to RabbitMQ:\n{}",
        relay.log_tail(40)
    );
    assert!(
        !relay.logs().contains("reconnecting"),
        "{}",
        relay.log_tail(40)
    );
    relay.terminate_cleanly(Duration::from_secs(20)).await;
    collector.stop().await;
}

/// Headers count in the claim's memory budget like payloads: a claim of many
/// rows with large headers is split, and memory stays within the manifest's
/// limit (the rows are parked: their frames are over frame_max).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_headers_count_in_the_claim_memory_budget() {
    let (env, queue, collector) = TestEnv::with_events_queue("header_budget", AckMode::Auto).await;
    let plan: Vec<(String, i32)> = (0..24)
        .map(|i| (format!("k{i}"), 3 * 1024 * 1024))
        .collect();
    let inserted = insert_with_header_sizes(&env, &queue, &plan).await;
    let ids: Vec<i64> = inserted.iter().map(|r| r.id).collect();
    let mut relay = Launch::new()
        .args(&["--max-header-bytes", "4194304"])
        .start(&env)
        .await;
    let parked = wait_parked(&env, &ids, Duration::from_secs(120)).await;
    assert!(parked
        .iter()
        .all(|r| r.last_error.as_deref().unwrap_or("").contains("frame_max")));
    // 8 MiB per claim: two or three 3 MiB rows each, never all 24 at once.
    let metrics = relay.metrics().await;
    let claims = metric_value(&metrics, "outbox_relay_batch_size_count").unwrap_or(0.0);
    assert!(
        claims >= 8.0,
        "{claims} claims loaded 24 rows of 3 MiB headers:\n{metrics}"
    );
    assert_peak_rss_within_manifest(
        &relay,
        &format!("24 rows of 3 MiB headers in {claims} claims"),
    );
    relay.terminate_cleanly(Duration::from_secs(20)).await;
    collector.stop().await;
}

/// Rows whose failure recording once overflowed `attempts` (`integer out of
/// range` failed the whole batch, retried at once: 400,000 log lines in 90 s):
/// attempts now saturate, such rows are parked when they fail, and the rows
/// beside them are published or charged as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_at_the_integer_limit_park_their_row_without_stopping_the_others() {
    let (env, queue, collector) =
        TestEnv::with_events_queue("attempts_limit", AckMode::Manual).await;
    let missing = env.unique("no_such_exchange");
    let mut rows = Vec::new();
    for i in 0..30 {
        let mut row = NewRow::to_queue(&queue, format!("good-{i}")).key(&format!("k{}", i % 3));
        if i % 10 == 4 {
            // Fails at the broker: its failure must be recorded.
            row.exchange = missing.clone();
        }
        rows.push(row);
    }
    let inserted = env.insert_committed(&rows).await;
    let failing: Vec<i64> = inserted
        .iter()
        .zip(&rows)
        .filter(|(_, r)| !r.exchange.is_empty())
        .map(|(i, _)| i.id)
        .collect();
    let limits = [i32::MAX, i32::MAX - 1, i32::MAX - 5];
    for (id, attempts) in failing.iter().zip(limits) {
        env.exec(
            &format!("UPDATE {} SET attempts = $1 WHERE id = $2", env.table()),
            &[&attempts, id],
        )
        .await;
    }
    // A row at the limit that can be published simply is.
    env.update_row(inserted[0].id, "attempts = 2147483647")
        .await;
    let good: Vec<Inserted> = inserted
        .iter()
        .filter(|r| !failing.contains(&r.id))
        .copied()
        .collect();

    let mut relay = Launch::new().start(&env).await;
    collector
        .wait_for_ids(&ids_of(&good), Duration::from_secs(60))
        .await;
    let parked = wait_parked(&env, &failing, Duration::from_secs(30)).await;
    for row in &parked {
        let error = row.last_error.as_deref().unwrap_or("");
        assert!(
            error.contains(&missing) && error.contains("does not exist"),
            "row {}: {error:?}",
            row.id
        );
        assert!(
            row.attempts >= i32::MAX - 4,
            "row {}: {}",
            row.id,
            row.attempts
        );
    }
    let metrics = relay.metrics().await;
    assert_eq!(
        metric_value(&metrics, "outbox_relay_database_errors_total"),
        Some(0.0),
        "{}",
        relay.log_tail(40)
    );
    let lines = relay.logs().lines().count();
    assert!(lines < 100, "{lines} log lines:\n{}", relay.log_tail(40));
    relay.terminate_cleanly(Duration::from_secs(20)).await;
    collector.stop().await;
}

/// A value the database refuses while a batch of failures is recorded (here a
/// trigger of the application's, raising a data error for one row) fails that
/// row alone: it is parked with the server's reason, its neighbours in the
/// same batch are charged their attempt as usual, and the good rows flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_whose_failure_cannot_be_recorded_is_isolated_and_parked() {
    let (env, queue, collector) =
        TestEnv::with_events_queue("refused_failure", AckMode::Manual).await;
    let missing = env.unique("no_such_exchange");
    let s = &env.schema;
    env.exec(
        &format!(
            "CREATE FUNCTION \"{s}\".refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.attempts <> OLD.attempts AND NEW.routing_key = 'poison' THEN
                 RAISE EXCEPTION 'poison rows may not fail' USING ERRCODE = '22023';
               END IF;
               RETURN NEW;
             END $$"
        ),
        &[],
    )
    .await;
    env.exec(
        &format!(
            "CREATE TRIGGER refuse_poison BEFORE UPDATE ON \"{s}\".messages
               FOR EACH ROW EXECUTE FUNCTION \"{s}\".refuse_poison()"
        ),
        &[],
    )
    .await;
    let mut rows = Vec::new();
    for i in 0..20 {
        rows.push(NewRow::to_queue(&queue, format!("good-{i}")).key(&format!("k{}", i % 4)));
    }
    let mut poison = NewRow::to_queue("poison", "p").key("k0");
    poison.exchange = missing.clone();
    // On a key of its own: the rows behind a row that is retried wait for it.
    let mut neighbour = NewRow::to_queue("other", "n").key("alone");
    neighbour.exchange = missing.clone();
    rows.insert(5, poison);
    rows.insert(6, neighbour);
    let inserted = env.insert_committed(&rows).await;
    let (poison_id, neighbour_id) = (inserted[5].id, inserted[6].id);
    let good: Vec<Inserted> = inserted
        .iter()
        .filter(|r| r.id != poison_id && r.id != neighbour_id)
        .copied()
        .collect();

    let mut relay = Launch::new().start(&env).await;
    collector
        .wait_for_ids(&ids_of(&good), Duration::from_secs(60))
        .await;
    let parked = wait_parked(&env, &[poison_id], Duration::from_secs(30)).await;
    let error = parked[0].last_error.as_deref().unwrap_or("");
    assert!(
        error.contains("poison rows may not fail")
            && error.contains("dead-letters retry --id")
            && error.contains(&missing),
        "{error:?}"
    );
    let charged = wait_until(Duration::from_secs(30), || async {
        env.rows()
            .await
            .iter()
            .any(|r| r.id == neighbour_id && r.attempts >= 1)
    })
    .await;
    let rows = env.rows().await;
    let n = rows
        .iter()
        .find(|r| r.id == neighbour_id)
        .expect("neighbour");
    assert!(charged && n.dead_lettered_at.is_none(), "{n:#?}");
    relay.terminate_cleanly(Duration::from_secs(20)).await;
    collector.stop().await;
}

/// A hot-path statement that keeps failing on a live connection (here the
/// claim, after a column it reads was renamed) is retried with backoff, not in
/// a tight loop: a bounded number of attempts, a few log lines a minute, a
/// metric; once the column is back, the backlog drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_claim_backs_off_and_the_backlog_drains_after_the_fix() {
    let (env, queue, collector) = TestEnv::with_events_queue("claim_backoff", AckMode::Auto).await;
    let mut relay = Launch::new().start(&env).await;
    let first = env.insert_bulk(&queue, 10, 2).await;
    collector
        .wait_for_ids(&ids_of(&first), Duration::from_secs(60))
        .await;

    let table = env.table();
    env.exec(
        &format!("ALTER TABLE {table} RENAME COLUMN correlation_id TO correlation_id_gone"),
        &[],
    )
    .await;
    let backlog = env.insert_bulk(&queue, 200, 5).await;
    let failing = wait_until(Duration::from_secs(30), || async {
        relay.logs().contains("database statement failed")
    })
    .await;
    assert!(failing, "the claim did not fail:\n{}", relay.log_tail(20));
    let errors_before =
        metric_value(&relay.metrics().await, "outbox_relay_database_errors_total").unwrap_or(0.0);
    let window = Duration::from_secs(20);
    tokio::time::sleep(window).await;
    // Before the fix: over 10,000 lines in these 20 s.
    let claim_lines = relay
        .logs()
        .lines()
        .filter(|l| l.contains("database statement failed"))
        .count();
    assert!(
        claim_lines <= 6,
        "{claim_lines} log lines about the failing statement:\n{}",
        relay.log_tail(20)
    );
    let metrics = relay.metrics().await;
    let errors =
        metric_value(&metrics, "outbox_relay_database_errors_total").unwrap_or(0.0) - errors_before;
    println!("{errors} failed statements in {window:?}; {claim_lines} log lines in all");
    // Backoff 200 ms doubling to 10 s: a handful in 20 s, never hundreds.
    assert!(
        (1.0..=20.0).contains(&errors),
        "{errors} failed statements in {window:?}:\n{}",
        relay.log_tail(20)
    );
    assert!(
        metrics.contains("outbox_relay_database_errors_total{statement=\"claim\"}"),
        "{metrics}"
    );
    relay.assert_running();

    env.exec(
        &format!("ALTER TABLE {table} RENAME COLUMN correlation_id_gone TO correlation_id"),
        &[],
    )
    .await;
    collector
        .wait_for_ids(&ids_of(&backlog), Duration::from_secs(90))
        .await;
    relay.terminate_cleanly(Duration::from_secs(20)).await;
    collector.stop().await;
}
