//! The relay's core guarantees (README: "Writing outbox rows", "Running it",
//! "Metrics and health", "Guarantees and how they are kept"), each tested
//! against the real binary, a real PostgreSQL and a real RabbitMQ. Every test
//! has its own schema and queues, so the tests run in parallel.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lapin::ExchangeKind;
use outbox_test_kit::*;
use rand::Rng;
use serde_json::{json, Value};
use uuid::Uuid;

// ---------------------------------------------------------------------------
// Guarantee 1: committed rows are published, rolled-back rows never are
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_rows_are_never_published() {
    let (env, queue, collector) = TestEnv::with_events_queue("rolled_back", AckMode::Manual).await;
    let mut relay = Launch::new()
        .args(&["--poll-interval", "200ms"])
        .start(&env)
        .await;

    // A transaction that stays open, rows inserted, while the relay works
    // through everything else; it is rolled back at the very end.
    let mut open_client = env.connect_db().await;
    let open_tx = open_client.transaction().await.expect("begin");
    let mut open_rows = Vec::new();
    for i in 0..10 {
        open_rows.push(
            insert_row(
                &open_tx,
                &env.schema,
                &NewRow::to_queue(&queue, format!("open-{i}")),
            )
            .await,
        );
    }

    // Two writers interleave committed and rolled-back transactions, plain
    // INSERTs and enqueue() calls.
    let mut writers = Vec::new();
    for w in 0..2 {
        let schema = env.schema.clone();
        let queue = queue.clone();
        let mut client = env.connect_db().await;
        writers.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            let mut rolled_back = Vec::new();
            for round in 0..40 {
                let (n, commit, use_enqueue) = {
                    let mut rng = rand::rng();
                    // Rounds 0 and 1 force one of each outcome.
                    let commit = match round {
                        0 => true,
                        1 => false,
                        _ => rng.random_bool(0.5),
                    };
                    (rng.random_range(1..=5), commit, rng.random_bool(0.3))
                };
                let tx = client.transaction().await.expect("begin");
                let mut ids = Vec::new();
                for i in 0..n {
                    let body = format!("w{w}-r{round}-{i}");
                    if use_enqueue {
                        let msg = Enqueue::to_queue(&queue, EnqueuePayload::Text(body));
                        ids.push(enqueue(&tx, &schema, &msg).await);
                    } else {
                        ids.push(insert_row(&tx, &schema, &NewRow::to_queue(&queue, body)).await);
                    }
                }
                if commit {
                    tx.commit().await.expect("commit");
                    committed.extend(ids);
                } else {
                    tx.rollback().await.expect("rollback");
                    rolled_back.extend(ids);
                }
            }
            (committed, rolled_back)
        }));
    }
    let mut committed = HashSet::new();
    let mut rolled_back = HashSet::new();
    for w in writers {
        let (c, r) = w.await.expect("writer task");
        committed.extend(ids_of(&c));
        rolled_back.extend(ids_of(&r));
    }

    // A committed transaction with a rolled-back savepoint in the middle.
    {
        let mut pg = env.pg.lock().await;
        let tx = pg.transaction().await.expect("begin");
        let kept1 = insert_row(&tx, &env.schema, &NewRow::to_queue(&queue, "kept-1")).await;
        tx.batch_execute("SAVEPOINT s1").await.expect("savepoint");
        let undone = insert_row(&tx, &env.schema, &NewRow::to_queue(&queue, "undone")).await;
        tx.batch_execute("ROLLBACK TO SAVEPOINT s1")
            .await
            .expect("rollback to savepoint");
        let kept2 = insert_row(&tx, &env.schema, &NewRow::to_queue(&queue, "kept-2")).await;
        tx.commit().await.expect("commit");
        committed.extend(ids_of(&[kept1, kept2]));
        rolled_back.insert(undone.message_id.to_string());
    }

    collector.wait_for_ids(&committed, ARRIVAL_TIMEOUT).await;
    relay.assert_running();

    // The relay has been polling (every 200 ms) and woken by notifications the
    // whole time the open transaction held its rows: roll it back now.
    open_tx
        .rollback()
        .await
        .expect("rollback the open transaction");
    rolled_back.extend(ids_of(&open_rows));

    // A last committed row after everything: once it is in, the relay has
    // looked at the table after every rollback.
    let marker = env
        .insert_committed(&[NewRow::to_queue(&queue, "marker")])
        .await;
    committed.extend(ids_of(&marker));
    collector.wait_for_ids(&committed, ARRIVAL_TIMEOUT).await;
    // Absence cannot be awaited: give the relay ten more poll rounds to
    // publish something it should not.
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.assert_running();

    let received = collector.distinct_ids();
    let leaked: Vec<&String> = received.intersection(&rolled_back).collect();
    assert!(
        leaked.is_empty(),
        "{} rolled-back rows were published (of {} rolled back): {:?}",
        leaked.len(),
        rolled_back.len(),
        leaked
    );
    let unknown: Vec<&String> = received.difference(&committed).collect();
    assert!(
        unknown.is_empty(),
        "deliveries with unknown message ids: {unknown:?}"
    );
    assert_eq!(
        received.len(),
        committed.len(),
        "every committed row arrives"
    );

    let in_table: HashSet<String> = env
        .rows()
        .await
        .iter()
        .map(|r| r.message_id.to_string())
        .collect();
    assert_eq!(
        in_table, committed,
        "the table holds exactly the committed rows"
    );
}

// ---------------------------------------------------------------------------
// Guarantee 3: order per partition key
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_rows_all_arrive_in_id_order_per_partition_key() {
    const WRITERS: usize = 4;
    const ROWS_PER_WRITER: usize = 500;
    const KEYS: usize = 20;

    let (env, queue, collector) = TestEnv::with_events_queue("order", AckMode::Manual).await;
    let mut relay = Launch::new().start(&env).await;

    // Several writers share the keys. Like an application that locks the
    // aggregate it writes for, each transaction takes a per-key lock first, so
    // per key, ids are in commit order. (Without that, a lower id can commit
    // after a higher one, and no relay could publish them in id order.)
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let schema = env.schema.clone();
        let queue = queue.clone();
        let mut client = env.connect_db().await;
        writers.push(tokio::spawn(async move {
            let mut written: Vec<(Inserted, String)> = Vec::new();
            while written.len() < ROWS_PER_WRITER {
                let keys: Vec<String> = {
                    let mut rng = rand::rng();
                    let n = rng.random_range(1..=8).min(ROWS_PER_WRITER - written.len());
                    (0..n)
                        .map(|_| format!("key-{:02}", rng.random_range(0..KEYS)))
                        .collect()
                };
                let mut lock_order: Vec<&String> = keys.iter().collect();
                lock_order.sort();
                lock_order.dedup();
                let tx = client.transaction().await.expect("begin");
                for key in lock_order {
                    tx.execute(
                        "SELECT pg_advisory_xact_lock(hashtext($1))",
                        &[&format!("{schema}/{key}")],
                    )
                    .await
                    .expect("per-key lock");
                }
                let mut batch = Vec::new();
                for key in keys {
                    let body = format!("w{w}-{}", written.len() + batch.len());
                    let row = NewRow::to_queue(&queue, body).key(&key);
                    batch.push((insert_row(&tx, &schema, &row).await, key));
                }
                tx.commit().await.expect("commit");
                written.extend(batch);
            }
            written
        }));
    }
    let mut rows: HashMap<String, (Option<String>, i64)> = HashMap::new();
    for w in writers {
        for (ins, key) in w.await.expect("writer task") {
            rows.insert(ins.message_id.to_string(), (Some(key), ins.id));
        }
    }
    assert_eq!(rows.len(), WRITERS * ROWS_PER_WRITER);

    let wanted: HashSet<String> = rows.keys().cloned().collect();
    collector.wait_for_ids(&wanted, ARRIVAL_TIMEOUT).await;
    relay.assert_running();

    let arrivals = collector.snapshot();
    let unknown: Vec<&Received> = arrivals
        .iter()
        .filter(|r| !rows.contains_key(r.message_id.as_deref().unwrap_or("")))
        .collect();
    assert!(
        unknown.is_empty(),
        "{} deliveries with unknown message ids",
        unknown.len()
    );
    let repeats = arrivals.len() - wanted.len();
    if repeats > 0 {
        eprintln!("note: {repeats} repeated deliveries (allowed: at least once)");
    }
    let violations = order_violations(arrivals.iter().map(|r| r.message_id.as_deref()), &rows);
    assert!(
        violations.is_empty(),
        "{} order violations per partition key; first ones: {:#?}",
        violations.len(),
        &violations[..violations.len().min(10)]
    );
}

// ---------------------------------------------------------------------------
// What a consumer receives (README: "Writing outbox rows")
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_properties_and_headers_arrive_exactly_as_written() {
    let (env, queue, collector) = TestEnv::with_events_queue("fidelity", AckMode::Manual).await;

    let headers = json!({
        "s": "text",
        "unicode": "grüße 🦀",
        "i": 42,
        "neg": -7,
        "big": 9007199254740993i64,
        "zero": 0,
        "t": true,
        "f": false,
        "float": 1.5,
        "tenth": 0.1,
        "obj": {"k": "v", "n": 1, "deep": {"x": [1, 2]}},
        "arr": [1, "two", false, null, {"a": 1}],
        "empty_obj": {},
        "empty_arr": [],
        "nul": null
    });
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let text = "grüße, 日本語, עברית, e\u{301}, emoji 🦀🎉, tab\tnewline\n";
    let doc =
        json!({"order_id": 17, "lines": [{"sku": "ü-1", "qty": 2}], "note": null, "ok": true});

    let binary = NewRow {
        content_type: Some("application/octet-stream".into()),
        message_type: Some("binary.thing".into()),
        correlation_id: Some("corr-binary-1".into()),
        headers: headers.clone(),
        ..NewRow::to_queue(&queue, all_bytes.clone())
    };
    let bare = NewRow::to_queue(&queue, Vec::new()); // empty body, no properties
    let inserted = env.insert_committed(&[binary, bare]).await;
    let (binary_id, bare_id) = (inserted[0].message_id, inserted[1].message_id);

    let json_msg = Enqueue {
        message_type: Some("order.created".into()),
        correlation_id: Some("corr-json-1".into()),
        partition_key: Some("order-17".into()),
        headers: json!({"tenant": "acme", "version": 3}),
        ..Enqueue::to_queue(&queue, EnqueuePayload::Json(doc.clone()))
    };
    let text_msg = Enqueue {
        message_type: Some("note.written".into()),
        ..Enqueue::to_queue(&queue, EnqueuePayload::Text(text.into()))
    };
    let bytes_msg = Enqueue {
        headers: headers.clone(),
        ..Enqueue::to_queue(&queue, EnqueuePayload::Bytes(all_bytes.clone()))
    };
    let enq = env
        .enqueue_tx(&[json_msg, text_msg, bytes_msg], TxEnd::Commit)
        .await;
    let (json_id, text_id, bytes_id) = (enq[0].message_id, enq[1].message_id, enq[2].message_id);

    let _relay = Launch::new().start(&env).await;
    let wanted = ids_of(&[inserted.clone(), enq.clone()].concat());
    collector.wait_for_ids(&wanted, ARRIVAL_TIMEOUT).await;

    let by_id: HashMap<Uuid, Received> = collector
        .snapshot()
        .into_iter()
        .map(|r| (r.uuid(), r))
        .collect();

    // Every delivery against its row, column by column.
    let pg = env.pg.lock().await;
    let rows = pg
        .query(
            &format!(
                "SELECT message_id, payload, content_type, message_type, correlation_id, headers,
                        extract(epoch FROM created_at)::float8
                 FROM {} ORDER BY id",
                env.table()
            ),
            &[],
        )
        .await
        .expect("read rows");
    drop(pg);
    assert_eq!(rows.len(), 5);
    for row in &rows {
        let mid: Uuid = row.get(0);
        let payload: Vec<u8> = row.get(1);
        let content_type: Option<String> = row.get(2);
        let message_type: Option<String> = row.get(3);
        let correlation_id: Option<String> = row.get(4);
        let row_headers: Value = row.get(5);
        let created_at: f64 = row.get(6);
        let d = &by_id[&mid];
        let p = &d.properties;
        assert_eq!(d.body, payload, "row {mid}: body differs from payload");
        assert_eq!(d.routing_key, queue, "row {mid}: routing key");
        assert_eq!(d.exchange, "", "row {mid}: exchange");
        assert_eq!(
            d.message_id.as_deref(),
            Some(mid.to_string().as_str()),
            "row {mid}: message-id"
        );
        assert_eq!(
            p.content_type().as_ref().map(|s| s.to_string()),
            content_type,
            "row {mid}: content-type"
        );
        assert_eq!(
            p.kind().as_ref().map(|s| s.to_string()),
            message_type,
            "row {mid}: type"
        );
        assert_eq!(
            p.correlation_id().as_ref().map(|s| s.to_string()),
            correlation_id,
            "row {mid}: correlation-id"
        );
        let delivered_headers = d.headers_json().unwrap_or_else(|| json!({}));
        assert_eq!(delivered_headers, row_headers, "row {mid}: headers");
        assert_eq!(
            *p.delivery_mode(),
            Some(2),
            "row {mid}: delivery mode must be persistent (2)"
        );
        let ts = (*p.timestamp()).unwrap_or_else(|| panic!("row {mid}: no timestamp property"));
        assert!(
            (ts as f64 - created_at).abs() <= 1.0,
            "row {mid}: timestamp {ts} is not created_at {created_at} (unix seconds)"
        );
    }

    // And against what the test wrote, so a wrong column cannot hide a loss.
    assert_eq!(
        by_id[&binary_id].body, all_bytes,
        "all 256 byte values, in order"
    );
    assert_eq!(by_id[&bytes_id].body, all_bytes, "enqueue(bytea) body");
    assert_eq!(
        by_id[&binary_id].headers_json(),
        Some(headers.clone()),
        "headers of every JSON type"
    );
    assert_eq!(
        by_id[&bytes_id].headers_json(),
        Some(headers.clone()),
        "enqueue headers"
    );
    assert_eq!(
        by_id[&binary_id]
            .properties
            .kind()
            .as_ref()
            .map(|s| s.as_str()),
        Some("binary.thing")
    );
    assert_eq!(
        by_id[&binary_id]
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("corr-binary-1")
    );
    assert!(by_id[&bare_id].body.is_empty(), "empty payload stays empty");
    assert_eq!(
        by_id[&bare_id].properties.content_type(),
        &None,
        "NULL content_type: no content-type"
    );
    assert_eq!(
        by_id[&bare_id].properties.kind(),
        &None,
        "NULL message_type: no type"
    );

    let j = &by_id[&json_id];
    assert_eq!(
        j.properties.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json"),
        "enqueue(jsonb) sets content-type application/json"
    );
    let body: Value = serde_json::from_slice(&j.body).expect("JSON body parses");
    assert_eq!(body, doc, "JSON body");
    assert_eq!(
        j.properties.kind().as_ref().map(|s| s.as_str()),
        Some("order.created")
    );
    assert_eq!(
        j.properties.correlation_id().as_ref().map(|s| s.as_str()),
        Some("corr-json-1")
    );
    assert_eq!(
        j.headers_json(),
        Some(json!({"tenant": "acme", "version": 3}))
    );

    let t = &by_id[&text_id];
    assert_eq!(
        std::str::from_utf8(&t.body).expect("UTF-8 body"),
        text,
        "text body"
    );
    assert_eq!(
        t.properties.kind().as_ref().map(|s| s.as_str()),
        Some("note.written")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_id_is_the_amqp_message_id() {
    let env = TestEnv::new("message_id").await;
    let queue = env.declare_queue("events").await;
    let exchange = env.declare_exchange("orders", ExchangeKind::Direct).await;
    env.bind(&queue, &exchange, "order.created").await;
    let collector = env.consume(&queue, AckMode::Manual).await;
    let _relay = Launch::new().start(&env).await;

    // Ids the application chose, ids from the column default, ids from enqueue().
    let chosen: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    let mut rows: Vec<NewRow> = chosen
        .iter()
        .map(|id| NewRow {
            message_id: Some(*id),
            exchange: exchange.clone(),
            routing_key: "order.created".into(),
            ..NewRow::to_queue("", format!("chosen {id}"))
        })
        .collect();
    rows.extend((0..5).map(|i| NewRow {
        exchange: exchange.clone(),
        routing_key: "order.created".into(),
        ..NewRow::to_queue("", format!("default {i}"))
    }));
    let mut written = env.insert_committed(&rows).await;
    let enq: Vec<Enqueue> = (0..5)
        .map(|i| Enqueue {
            exchange: exchange.clone(),
            routing_key: "order.created".into(),
            ..Enqueue::to_queue("", EnqueuePayload::Json(json!({"n": i})))
        })
        .collect();
    written.extend(env.enqueue_tx(&enq, TxEnd::Commit).await);
    for (w, id) in written.iter().zip(&chosen) {
        assert_eq!(
            w.message_id, *id,
            "the table keeps the application's message_id"
        );
    }

    collector.wait_for_rows(&written).await;
    let table: HashMap<Uuid, i64> = env
        .rows()
        .await
        .iter()
        .map(|r| (r.message_id, r.id))
        .collect();
    for d in collector.snapshot() {
        let mid = d.uuid();
        assert!(
            table.contains_key(&mid),
            "delivery message-id {mid} is no row's message_id"
        );
        assert_eq!(
            d.exchange, exchange,
            "message {mid} came through the wrong exchange"
        );
        // The body says which row it was: the message id must be that row's.
        if let Some(id) = String::from_utf8_lossy(&d.body).strip_prefix("chosen ") {
            assert_eq!(
                id,
                mid.to_string(),
                "chosen message_id reached the broker unchanged"
            );
        }
    }
    assert_eq!(collector.distinct_ids(), ids_of(&written));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_rows_keep_their_message_id() {
    let (env, queue, collector) = TestEnv::with_events_queue("replay", AckMode::Manual).await;
    let _relay = Launch::new().start(&env).await;

    let rows = NewRow::numbered(&queue, 10);
    let written = env.insert_committed(&rows).await;
    collector.wait_for_rows(&written).await;
    let published_all =
        wait_until(ARRIVAL_TIMEOUT, async || env.published_count().await == 10).await;
    assert!(published_all, "rows not all marked published");

    let from = written.iter().map(|w| w.id).min().unwrap().to_string();
    let to = written.iter().map(|w| w.id).max().unwrap().to_string();
    let out = env
        .cli(
            &["replay", "--from-id", &from, "--to-id", &to],
            SETUP_TIMEOUT,
        )
        .await;
    assert_eq!(out.code(), Some(0), "replay failed\n{}", out.describe());

    let twice = wait_until(ARRIVAL_TIMEOUT, async || collector.len() >= 20).await;
    assert!(
        twice,
        "replay: only {} of 20 deliveries arrived",
        collector.len()
    );
    let mut count: HashMap<String, (usize, Vec<u8>)> = HashMap::new();
    for d in collector.snapshot() {
        let e = count
            .entry(d.uuid().to_string())
            .or_insert((0, d.body.clone()));
        e.0 += 1;
        assert_eq!(
            e.1, d.body,
            "a republished message has another body under the same id"
        );
    }
    assert_eq!(
        count.keys().cloned().collect::<HashSet<_>>(),
        ids_of(&written),
        "same message ids"
    );
    assert!(
        count.values().all(|(n, _)| *n == 2),
        "each row twice: {count:?}"
    );
}

// ---------------------------------------------------------------------------
// Guarantee 2: marked published only after the broker took it
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_marked_published_only_after_delivery() {
    let (env, queue, collector) =
        TestEnv::with_events_queue("mark_after_delivery", AckMode::Manual).await;
    // Many attempts: unroutable rows must stay pending, not get parked, here.
    let mut relay = Launch::new()
        .args(&["--max-attempts", "1000"])
        .start(&env)
        .await;

    // Unroutable: the default exchange, a routing key no queue has.
    let nowhere = env.unique("no-such-queue");
    let unroutable: Vec<NewRow> = (0..5)
        .map(|i| NewRow::to_queue(&nowhere, format!("lost {i}")))
        .collect();
    let unroutable = env.insert_committed(&unroutable).await;
    let routed = NewRow::numbered(&queue, 50);
    let routed = env.insert_committed(&routed).await;

    collector.wait_for_rows(&routed).await;
    let bad_ids: HashSet<i64> = unroutable.iter().map(|r| r.id).collect();
    env.wait_published(&routed, &relay).await;

    // The relay tried the unroutable rows and counted the failures.
    let tried = wait_until(ARRIVAL_TIMEOUT, async || {
        env.rows()
            .await
            .iter()
            .filter(|r| bad_ids.contains(&r.id))
            .all(|r| r.attempts >= 1)
    })
    .await;
    let rows = env.rows().await;
    assert!(
        tried,
        "unroutable rows were not charged a failed attempt: {:?}",
        rows.iter()
            .filter(|r| bad_ids.contains(&r.id))
            .collect::<Vec<_>>()
    );

    // It goes on publishing other rows meanwhile.
    let more: Vec<NewRow> = (0..20)
        .map(|i| NewRow::to_queue(&queue, format!("later {i}")))
        .collect();
    let more = env.insert_committed(&more).await;
    collector.wait_for_rows(&more).await;
    // Arrival comes before the confirm reaches the relay, and the mark after it.
    env.wait_published(&more, &relay).await;
    relay.assert_running();

    let rows = env.rows().await;
    for r in &rows {
        if bad_ids.contains(&r.id) {
            assert!(
                r.published_at.is_none(),
                "unroutable row {} (routing key {}) was marked published: {r:?}",
                r.id,
                r.routing_key
            );
            assert!(
                r.dead_lettered_at.is_none(),
                "row {} parked despite max-attempts 1000",
                r.id
            );
            // The reason must say what went wrong: the broker could not route it.
            assert!(
                r.last_error
                    .as_deref()
                    .is_some_and(|e| e.to_lowercase().contains("rout")),
                "unroutable row {} has no last_error saying it was unroutable: {:?}",
                r.id,
                r.last_error
            );
        } else {
            let published = r
                .published_at
                .unwrap_or_else(|| panic!("row {} not marked: {r:?}", r.id));
            assert!(
                published >= r.created_at,
                "row {}: published_at before created_at: {r:?}",
                r.id
            );
        }
    }
    let received = collector.distinct_ids();
    for u in &unroutable {
        assert!(
            !received.contains(&u.message_id.to_string()),
            "unroutable row {} arrived?",
            u.id
        );
    }
}

// ---------------------------------------------------------------------------
// Guarantee 6: scheduled rows
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_rows_wait_for_available_at() {
    let (env, queue, collector) = TestEnv::with_events_queue("scheduled", AckMode::Manual).await;
    let mut relay = Launch::new().start(&env).await; // default poll interval

    // Same transaction: one row now, one 3 s later (database clock), one via
    // enqueue(available_at => ..).
    let now_row = NewRow::to_queue(&queue, "now");
    let later_row = NewRow {
        available_in_secs: Some(3.0),
        ..NewRow::to_queue(&queue, "later")
    };
    let inserted = env.insert_committed(&[now_row, later_row]).await;
    let enq = Enqueue {
        available_in_secs: Some(3.0),
        ..Enqueue::to_queue(&queue, EnqueuePayload::Text("later via enqueue".into()))
    };
    let enq = env.enqueue_tx(&[enq], TxEnd::Commit).await;
    let immediate = inserted[0].message_id.to_string();
    let scheduled: HashSet<String> = ids_of(&[inserted[1], enq[0]]);

    collector
        .wait_for_ids(&HashSet::from([immediate.clone()]), ARRIVAL_TIMEOUT)
        .await;
    collector.wait_for_ids(&scheduled, ARRIVAL_TIMEOUT).await;
    relay.assert_running();
    // A delivery can reach the consumer before the relay marks its row
    // (it marks after the broker's confirm): wait for the marks.
    env.wait_published(&[inserted[1], enq[0]], &relay).await;

    let rows: HashMap<String, RowState> = env
        .rows()
        .await
        .into_iter()
        .map(|r| (r.message_id.to_string(), r))
        .collect();
    let arrivals = collector.snapshot();
    let imm = arrivals
        .iter()
        .find(|d| d.message_id.as_deref() == Some(&immediate))
        .unwrap();
    for d in arrivals
        .iter()
        .filter(|d| scheduled.contains(d.message_id.as_deref().unwrap_or("")))
    {
        let row = &rows[d.message_id.as_deref().unwrap()];
        let due = unix_secs(row.available_at);
        let at = unix_secs(d.at);
        // The database and this test share the machine's clock.
        assert!(
            at >= due - 0.001,
            "scheduled row {} arrived {:.3} s before its available_at",
            row.id,
            due - at
        );
        assert!(
            at - due <= 1.5,
            "scheduled row {} arrived {:.3} s after its available_at (allowed: 1.5 s)",
            row.id,
            at - due
        );
        let published = row.published_at.expect("scheduled row marked published");
        assert!(
            published >= row.available_at,
            "row {}: published_at before available_at (DB clock)",
            row.id
        );
        assert!(
            imm.at < d.at,
            "the immediate row came after the scheduled one"
        );
    }
    let imm_row = &rows[&immediate];
    assert!(
        unix_secs(imm.at) < unix_secs(imm_row.available_at) + 2.0,
        "the immediate row took {:.3} s: the relay was not working, so the wait proves nothing",
        unix_secs(imm.at) - unix_secs(imm_row.available_at)
    );
}

/// The lag SREs are paged on ignores rows scheduled for later: a row due in an
/// hour is pending, but not late. A row that is due and stuck still counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_scheduled_for_later_are_pending_but_not_lag() {
    let env = TestEnv::new("scheduled_lag").await;
    let queue = env.declare_queue("events").await;
    let later = NewRow {
        available_in_secs: Some(3600.0),
        ..NewRow::to_queue(&queue, "in an hour")
    };
    let written = env.insert_committed(&[later]).await;
    // Backdated, as if it had been written long ago for this hour.
    env.update_row(written[0].id, "created_at = now() - interval '10 minutes'")
        .await;
    // Started after the insert: its first statistics see the row.
    let mut relay = Launch::new().start(&env).await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    let mut last = String::new();
    let seen = wait_until(ARRIVAL_TIMEOUT, async || {
        last = relay.metrics().await;
        metric_value(&last, "outbox_relay_pending_messages") == Some(1.0)
    })
    .await;
    assert!(seen, "the scheduled row never showed as pending:\n{last}");
    assert_eq!(
        metric_value(&last, "outbox_relay_oldest_pending_age_seconds"),
        Some(0.0),
        "a row scheduled for later counts as lag:\n{last}"
    );
    let out = env
        .cli(&["status", "--json"], Duration::from_secs(60))
        .await;
    out.assert_code(0);
    let j: serde_json::Value = serde_json::from_str(&out.stdout).expect("status JSON");
    assert_eq!(j["pending"], 1, "{j:#}");
    assert!(j["oldest_pending_age_seconds"].is_null(), "{j:#}");

    // Once due and stuck (the relay stopped), it is late from its created_at.
    relay.terminate(Duration::from_secs(60)).await;
    env.update_row(written[0].id, "available_at = now() - interval '1 second'")
        .await;
    let out = env
        .cli(&["status", "--json"], Duration::from_secs(60))
        .await;
    let j: serde_json::Value = serde_json::from_str(&out.stdout).expect("status JSON");
    let age = j["oldest_pending_age_seconds"].as_f64().unwrap_or(0.0);
    assert!((590.0..3600.0).contains(&age), "due row's age {age}: {j:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_behind_a_scheduled_row_of_their_key_wait_for_it() {
    let (env, queue, collector) =
        TestEnv::with_events_queue("scheduled_order", AckMode::Manual).await;
    let _relay = Launch::new().start(&env).await;

    let first = NewRow {
        available_in_secs: Some(2.0),
        ..NewRow::to_queue(&queue, "first").key("acct-1")
    };
    let second = NewRow::to_queue(&queue, "second").key("acct-1");
    let other = NewRow::to_queue(&queue, "other key").key("acct-2");
    let w = env.insert_committed(&[first, second, other]).await;

    collector.wait_for_rows(&w).await;
    let order: Vec<String> = collector.message_ids();
    let pos = |i: usize| {
        order
            .iter()
            .position(|m| *m == w[i].message_id.to_string())
            .unwrap()
    };
    assert!(
        pos(0) < pos(1),
        "row {} of key acct-1 overtook the earlier scheduled row {} (arrival order {:?})",
        w[1].id,
        w[0].id,
        order
    );
    assert!(
        pos(2) < pos(0),
        "a row of another key waited for the scheduled row"
    );
}

// ---------------------------------------------------------------------------
// Guarantee 8: graceful shutdown
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_loses_nothing_and_exits_zero() {
    const BACKLOG: i64 = 20_000;
    const KEYS: i64 = 50;
    let (env, queue, collector) =
        TestEnv::with_events_queue("graceful_shutdown", AckMode::Manual).await;
    let written = env.insert_bulk(&queue, BACKLOG, KEYS).await;
    let all = ids_of(&written);
    let rows_by_mid: HashMap<String, (Option<String>, i64)> = env
        .rows()
        .await
        .into_iter()
        .map(|r| (r.message_id.to_string(), (r.partition_key, r.id)))
        .collect();

    let mut relay = Launch::new()
        .args(&["--shutdown-timeout", "10s"])
        .start(&env)
        .await;
    let started = wait_until(ARRIVAL_TIMEOUT, async || collector.len() >= 1000).await;
    assert!(
        started,
        "relay did not start draining: {} deliveries",
        collector.len()
    );

    let sent = Instant::now();
    let at_signal = collector.len();
    let status = relay.terminate(Duration::from_secs(30)).await;
    let took = sent.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status:?}\n{}",
        relay.log_tail(100)
    );
    assert!(
        took <= Duration::from_secs(12),
        "relay took {took:?} to exit after SIGTERM with --shutdown-timeout 10s"
    );

    // Every row marked published was really received: the broker has it, so
    // the consumer gets it.
    let marked: HashSet<String> = env.published_message_ids().await;
    let pending = env.pending_count().await;
    eprintln!(
        "SIGTERM after {at_signal} deliveries; exit after {took:?}; {} rows marked published, {pending} pending",
        marked.len()
    );
    if pending == 0 {
        eprintln!("note: the relay drained the whole backlog before stopping; the mid-drain path was not exercised");
    }
    let ok = wait_until(ARRIVAL_TIMEOUT, async || collector.has_all(&marked)).await;
    if !ok {
        let got = collector.distinct_ids();
        let missing: Vec<&String> = marked.iter().filter(|m| !got.contains(*m)).collect();
        panic!(
            "{} rows were marked published but never delivered; first: {:?}\n{}",
            missing.len(),
            &missing[..missing.len().min(10)],
            relay.log_tail(100)
        );
    }

    // A new relay finishes the job.
    let mut relay2 = Launch::new()
        .args(&["--shutdown-timeout", "10s"])
        .start(&env)
        .await;
    collector.wait_for_ids(&all, ARRIVAL_TIMEOUT).await;
    let done = wait_until(ARRIVAL_TIMEOUT, async || env.pending_count().await == 0).await;
    assert!(
        done,
        "{} rows still pending after every message arrived",
        env.pending_count().await
    );
    let status = relay2.terminate(Duration::from_secs(30)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "second relay's exit status: {status:?}"
    );

    let arrivals = collector.snapshot();
    assert!(
        arrivals
            .iter()
            .all(|d| all.contains(d.message_id.as_deref().unwrap_or(""))),
        "deliveries with unknown message ids"
    );
    let violations = order_violations(
        arrivals.iter().map(|r| r.message_id.as_deref()),
        &rows_by_mid,
    );
    assert!(
        violations.is_empty(),
        "order per partition key broken across the graceful restart; first: {:#?}",
        &violations[..violations.len().min(10)]
    );
}

// ---------------------------------------------------------------------------
// Configuration errors (README: "Running it", "Configuration")
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_settings_exit_2_with_one_line_naming_the_setting() {
    let db = database_url();
    let amqp = amqp_url();
    let base = [
        "run",
        "--schema",
        "t_invalid_settings_unused",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    let with_urls = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        v.extend([
            "--database-url".into(),
            db.clone(),
            "--amqp-url".into(),
            amqp.clone(),
        ]);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let without = |drop: &str| -> Vec<String> {
        let mut v: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        if drop != "database-url" {
            v.extend(["--database-url".into(), db.clone()]);
        }
        if drop != "amqp-url" {
            v.extend(["--amqp-url".into(), amqp.clone()]);
        }
        v
    };
    // (setting named in the error, args, environment)
    type Case<'a> = (&'a str, Vec<String>, Vec<(&'a str, &'a str)>);
    let cases: Vec<Case> = vec![
        ("batch-size", with_urls(&["--batch-size", "0"]), vec![]),
        ("batch-size", with_urls(&["--batch-size", "many"]), vec![]),
        (
            "batch-size",
            with_urls(&[]),
            vec![("OUTBOX_BATCH_SIZE", "0")],
        ),
        (
            "poll-interval",
            with_urls(&["--poll-interval", "nonsense"]),
            vec![],
        ),
        (
            "max-in-flight",
            with_urls(&["--max-in-flight", "0"]),
            vec![],
        ),
        ("log-format", with_urls(&["--log-format", "xml"]), vec![]),
        (
            "log-format",
            with_urls(&[]),
            vec![("OUTBOX_LOG_FORMAT", "xml")],
        ),
        ("listen", with_urls(&["--listen", "maybe"]), vec![]),
        (
            "metrics-addr",
            with_urls(&["--metrics-addr", "not-an-address"]),
            vec![],
        ),
        (
            "shutdown-timeout",
            with_urls(&["--shutdown-timeout", "soon"]),
            vec![],
        ),
        ("database-url", without("database-url"), vec![]),
        ("amqp-url", without("amqp-url"), vec![]),
        (
            "database-url",
            without("database-url"),
            vec![("OUTBOX_DATABASE_URL_FILE", "/nonexistent/outbox-db-url")],
        ),
    ];
    let mut failures = Vec::new();
    for (setting, args, envs) in &cases {
        let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let out = run_cli(&argv, envs, Duration::from_secs(30)).await;
        let stderr = out.stderr.trim_end();
        let normalized = stderr.to_lowercase().replace('_', "-");
        let mut problems = Vec::new();
        if out.status.is_none() {
            problems.push("did not exit within 30 s (killed)".to_string());
        } else if out.code() != Some(2) {
            problems.push(format!("exit code {:?}, want 2", out.code()));
        }
        if stderr.is_empty() {
            problems.push("nothing on stderr".into());
        } else if stderr.lines().count() != 1 {
            problems.push(format!(
                "{} lines on stderr, want 1",
                stderr.lines().count()
            ));
        }
        if !normalized.contains(setting) {
            problems.push(format!("stderr does not name `{setting}`"));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "outbox-relay {} (env {envs:?}): {}\n  stderr: {stderr:?}",
                argv.join(" "),
                problems.join("; ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Metrics and health (README: "Metrics and health")
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_passes_promtool() {
    let (env, queue, collector) = TestEnv::with_events_queue("metrics", AckMode::Manual).await;
    // Many attempts: the unroutable row stays pending, visible in the gauges.
    let mut relay = Launch::new()
        .args(&["--max-attempts", "1000"])
        .start(&env)
        .await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    let health = relay.get("/healthz").await.expect("GET /healthz");
    assert_eq!(health.0, 200, "/healthz: {health:?}");
    let ready = relay.get("/readyz").await.expect("GET /readyz");
    assert_eq!(ready.0, 200, "/readyz once connected: {ready:?}");

    let mut rows: Vec<NewRow> = (0..25)
        .map(|i| NewRow::to_queue(&queue, format!("m{i}")).key(&format!("k{}", i % 5)))
        .collect();
    let nowhere = env.unique("no-such-queue");
    rows.push(NewRow::to_queue(&nowhere, "unroutable"));
    let written = env.insert_committed(&rows).await;
    let delivered = &written[..25];
    collector.wait_for_rows(delivered).await;

    let mut last = String::new();
    let settled = wait_until(ARRIVAL_TIMEOUT, async || {
        last = relay.metrics().await;
        metric_value(&last, "outbox_relay_messages_published_total").is_some_and(|v| v >= 25.0)
            && metric_value(&last, "outbox_relay_publish_failures_total").is_some_and(|v| v >= 1.0)
            && metric_value(&last, "outbox_relay_pending_messages") == Some(1.0)
            && metric_value(&last, "outbox_relay_oldest_pending_age_seconds")
                .is_some_and(|v| v > 0.0)
    })
    .await;
    save(&env.dir.join("metrics.txt"), &last);
    assert!(
        settled,
        "/metrics never showed 25 published, >= 1 publish failure, 1 pending row and an \
         oldest pending age > 0 (one unroutable row is pending); last /metrics:\n{last}"
    );
    let text = last;

    // The names the README promises ("Metrics and health").
    let required = [
        "outbox_relay_messages_published_total",
        "outbox_relay_publish_failures_total",
        "outbox_relay_messages_dead_lettered_total",
        "outbox_relay_messages_deleted_total",
        "outbox_relay_pending_messages",
        "outbox_relay_oldest_pending_age_seconds",
        "outbox_relay_delivery_lag_seconds",
        "outbox_relay_batch_size",
        "outbox_relay_confirm_duration_seconds",
        "outbox_relay_partitions_owned",
        "outbox_relay_broker_connected",
        "outbox_relay_database_connected",
        "outbox_relay_broker_blocked",
        "outbox_relay_build_info",
    ];
    let missing: Vec<&&str> = required.iter().filter(|m| !has_metric(&text, m)).collect();
    assert!(
        missing.is_empty(),
        "metrics missing from /metrics: {missing:?}\n{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("outbox_relay_publish_failures_total{") && l.contains("reason=")),
        "publish_failures_total has no reason label:\n{text}"
    );
    assert_eq!(
        metric_value(&text, "outbox_relay_broker_connected"),
        Some(1.0),
        "broker_connected"
    );
    assert_eq!(
        metric_value(&text, "outbox_relay_database_connected"),
        Some(1.0),
        "database_connected"
    );
    assert_eq!(
        metric_value(&text, "outbox_relay_broker_blocked"),
        Some(0.0),
        "broker_blocked"
    );
    let lag_count = metric_value(&text, "outbox_relay_delivery_lag_seconds_count");
    assert!(
        lag_count.is_some_and(|c| c >= 25.0),
        "delivery_lag_seconds_count {lag_count:?}, want >= 25"
    );
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    assert!(
        text.lines()
            .any(|l| l.starts_with("outbox_relay_build_info") && l.contains(&version)),
        "build_info has no {version} label"
    );
    // No unbounded label values: no routing key, no message id in /metrics.
    assert!(!text.contains(&queue), "a routing key appears in /metrics");
    assert!(
        !text.contains(&nowhere),
        "a routing key appears in /metrics"
    );
    for w in &written {
        assert!(
            !text.contains(&w.message_id.to_string()),
            "a message id appears in /metrics"
        );
    }

    match Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Err(_) => {
            eprintln!("skipped: promtool not installed (the metric names were still checked)")
        }
        Ok(_) => {
            let mut child = Command::new("promtool")
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start promtool");
            {
                use std::io::Write;
                let mut stdin = child.stdin.take().unwrap();
                stdin.write_all(text.as_bytes()).expect("write to promtool");
            }
            let out = child.wait_with_output().expect("promtool output");
            assert!(
                out.status.success(),
                "promtool check metrics failed ({:?}):\n{}{}\n--- /metrics ---\n{text}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_appear_in_logs_metrics_or_status() {
    // PostgreSQL here trusts local connections, so a password in the URL is
    // accepted and ignored: enough to see where the relay repeats it.
    let secret = format!("pw-{:016x}", rand::random::<u64>());
    let mut env = TestEnv::new("credentials").await;
    let db = env.db_url.clone();
    let with_secret = match db.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((user, host)) => format!(
                "{scheme}://{}:{secret}@{host}",
                user.split(':').next().unwrap()
            ),
            None => panic!("OUTBOX_TEST_DATABASE_URL has no user: {db}"),
        },
        None => panic!("bad OUTBOX_TEST_DATABASE_URL {db}"),
    };
    env.db_url = with_secret.clone();
    let queue = env.declare_queue("events").await;
    let collector = env.consume(&queue, AckMode::Manual).await;
    let mut relay = Launch::new()
        .args(&["--log-format", "json"])
        .start(&env)
        .await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    let written = env.insert_committed(&[NewRow::to_queue(&queue, "x")]).await;
    collector.wait_for_rows(&written).await;

    let metrics = relay.metrics().await;
    let ready = relay.get("/readyz").await.expect("readyz");
    let status = env.cli(&["status", "--json"], SETUP_TIMEOUT).await;
    // A database that is not there: the error must not repeat the password.
    let unreachable = with_secret.replace("127.0.0.1:5432", "127.0.0.1:1");
    let check = run_cli(
        &[
            "check",
            "--database-url",
            &unreachable,
            "--amqp-url",
            &env.amqp_url,
            "--schema",
            &env.schema,
        ],
        &[],
        SETUP_TIMEOUT,
    )
    .await;
    assert_ne!(
        check.code(),
        Some(0),
        "check passed against a database that is not there\n{}",
        check.describe()
    );
    relay.terminate(Duration::from_secs(30)).await;
    let logs = relay.logs();

    for (what, text) in [
        ("relay log", logs.as_str()),
        ("/metrics", metrics.as_str()),
        ("/readyz", ready.1.as_str()),
        ("status stdout", status.stdout.as_str()),
        ("status stderr", status.stderr.as_str()),
        ("check stdout", check.stdout.as_str()),
        ("check stderr", check.stderr.as_str()),
    ] {
        assert!(
            !text.contains(&secret),
            "the database password appears in the {what}:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------
// Migrations (README: "Quickstart", "Running it")
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent() {
    let env = TestEnv::new("migrate").await; // migrated once
    let queue = env.unique("q");
    env.insert_committed(&[NewRow::to_queue(&queue, "kept across migrate")])
        .await;
    let before = env.schema_snapshot(&env.schema).await;
    assert!(
        before.iter().any(|l| l.starts_with("rel r messages ")),
        "no messages table: {before:?}"
    );

    let again = env.migrate().await;
    let after = env.schema_snapshot(&env.schema).await;
    assert_eq!(
        before,
        after,
        "a second migrate changed the schema\n{}",
        again.describe()
    );

    let dry = env.cli(&["migrate", "--dry-run"], SETUP_TIMEOUT).await;
    assert_eq!(
        dry.code(),
        Some(0),
        "migrate --dry-run on a migrated schema\n{}",
        dry.describe()
    );
    assert_eq!(
        before,
        env.schema_snapshot(&env.schema).await,
        "--dry-run changed a migrated schema"
    );

    // On a schema that does not exist yet, --dry-run prints the SQL for it and
    // creates nothing; the SQL applies cleanly with another tool.
    let fresh = format!("{}_fresh", env.schema);
    env.own_schema(&fresh);
    let dry = env
        .cli_on_schema(&["migrate", "--dry-run"], &fresh, SETUP_TIMEOUT)
        .await;
    assert_eq!(
        dry.code(),
        Some(0),
        "migrate --dry-run on a new schema\n{}",
        dry.describe()
    );
    assert!(
        dry.stdout.contains("CREATE TABLE") && dry.stdout.contains(&fresh),
        "--dry-run did not print the SQL for schema {fresh}:\n{}",
        dry.describe()
    );
    assert!(
        !env.schema_exists(&fresh).await,
        "--dry-run created schema {fresh}"
    );

    let client = env.connect_db().await;
    client
        .batch_execute(&dry.stdout)
        .await
        .unwrap_or_else(|e| panic!("the --dry-run SQL does not apply: {e}\n{}", dry.stdout));
    let id: uuid::Uuid = client
        .query_one(
            &format!("SELECT \"{fresh}\".enqueue('', 'q', '{{}}'::jsonb)"),
            &[],
        )
        .await
        .expect("enqueue() in the schema made from --dry-run SQL")
        .get(0);
    assert!(!id.is_nil());
}

// ---------------------------------------------------------------------------
// Guarantee 4: failed publishes are retried, then parked; others go on
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_row_is_dead_lettered_after_max_attempts_and_its_key_goes_on() {
    let (env, queue, collector) = TestEnv::with_events_queue("dead_letter", AckMode::Manual).await;
    let _relay = Launch::new()
        .args(&["--max-attempts", "2"])
        .start(&env)
        .await;

    let nowhere = env.unique("no-such-queue");
    let bad = NewRow::to_queue(&nowhere, "unroutable").key("acct-1");
    let behind = NewRow::to_queue(&queue, "behind the bad row").key("acct-1");
    let other = NewRow::to_queue(&queue, "another key").key("acct-2");
    let w = env.insert_committed(&[bad, behind, other]).await;
    let (bad, behind, other) = (w[0], w[1], w[2]);

    collector
        .wait_for_ids(&ids_of(&[other, behind]), ARRIVAL_TIMEOUT)
        .await;
    let rows: HashMap<i64, RowState> = env.rows().await.into_iter().map(|r| (r.id, r)).collect();
    let parked = &rows[&bad.id];
    assert!(
        parked.published_at.is_none(),
        "the unroutable row was marked published: {parked:?}"
    );
    let parked_at = parked.dead_lettered_at.unwrap_or_else(|| {
        panic!(
            "row {} of key acct-1 arrived but the bad row before it is not parked: {parked:?}",
            behind.id
        )
    });
    assert_eq!(
        parked.attempts, 2,
        "attempts of the parked row with --max-attempts 2: {parked:?}"
    );
    assert!(
        parked
            .last_error
            .as_deref()
            .is_some_and(|e| !e.trim().is_empty()),
        "parked row without last_error: {parked:?}"
    );
    let arrivals = collector.snapshot();
    let at = |id: Uuid| arrivals.iter().find(|d| d.uuid() == id).unwrap().at;
    assert!(
        at(behind.message_id) >= parked_at,
        "row {} overtook the failing row {} of the same key before it was parked",
        behind.id,
        bad.id
    );
    assert!(
        at(other.message_id) < parked_at,
        "a row of another key waited for the failing row (one bad row must not stop the others)"
    );
    assert!(
        !collector
            .distinct_ids()
            .contains(&bad.message_id.to_string()),
        "the unroutable row arrived?"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_exchange_fails_only_its_own_row() {
    let (env, queue, collector) =
        TestEnv::with_events_queue("missing_exchange", AckMode::Manual).await;
    let missing = env.unique("no-such-exchange");
    // The bad row sits in the middle of good ones published in the same
    // batches: the channel error it causes must not be charged to them.
    let mut rows = NewRow::numbered(&queue, 100);
    rows.insert(
        50,
        NewRow {
            exchange: missing.clone(),
            ..NewRow::to_queue("rk", "to nowhere")
        },
    );
    let w = env.insert_committed(&rows).await;
    let bad = w[50];
    let good: Vec<Inserted> = w.iter().copied().filter(|i| i.id != bad.id).collect();

    let mut relay = Launch::new()
        .args(&["--max-attempts", "1000"])
        .start(&env)
        .await;
    collector.wait_for_rows(&good).await;
    let tried = wait_until(ARRIVAL_TIMEOUT, async || {
        env.rows()
            .await
            .iter()
            .any(|r| r.id == bad.id && r.attempts >= 1)
    })
    .await;
    relay.assert_running();
    let rows = env.rows().await;
    let bad_row = rows.iter().find(|r| r.id == bad.id).unwrap();
    assert!(
        tried,
        "the row to a missing exchange was never charged an attempt: {bad_row:?}"
    );
    assert!(
        bad_row.published_at.is_none(),
        "row to a missing exchange marked published: {bad_row:?}"
    );
    assert!(
        bad_row
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains(&missing)),
        "last_error does not name the missing exchange {missing}: {:?}",
        bad_row.last_error
    );
    let charged: Vec<String> = rows
        .iter()
        .filter(|r| r.id != bad.id && r.attempts > 0)
        .map(|r| format!("row {} attempts {} ({:?})", r.id, r.attempts, r.last_error))
        .collect();
    assert!(
        charged.is_empty(),
        "{} good rows were charged a failed attempt for the bad row's channel error: {:?}",
        charged.len(),
        &charged[..charged.len().min(5)]
    );
    let unmarked = rows
        .iter()
        .filter(|r| r.id != bad.id && r.published_at.is_none())
        .count();
    assert_eq!(unmarked, 0, "delivered good rows not marked published");
}

// ---------------------------------------------------------------------------
// Guarantee 9: retention
// ---------------------------------------------------------------------------

/// The start of both retention tests: a relay with `--retention <retention>`,
/// one row that stays pending (its queue does not exist) and 200 rows that
/// all arrived. Returns the env, the collector, the relay and the pending row.
async fn retention_run(name: &str, retention: &str) -> (TestEnv, Collector, Relay, Vec<Inserted>) {
    let (env, queue, collector) = TestEnv::with_events_queue(name, AckMode::Manual).await;
    let relay = Launch::new()
        .args(&["--retention", retention, "--max-attempts", "1000"])
        .start(&env)
        .await;

    let pending = env
        .insert_committed(&[NewRow::to_queue(&env.unique("no-such-queue"), "stays")])
        .await;
    let w = env.insert_committed(&NewRow::numbered(&queue, 200)).await;
    collector.wait_for_rows(&w).await;
    (env, collector, relay, pending)
}

/// The end of both retention tests: the 200 deleted rows are counted in
/// `messages_deleted_total`, and the relay still runs.
async fn assert_deleted_counted(mut relay: Relay, context: &str) {
    let counted = wait_until(Duration::from_secs(30), async || {
        metric_value(
            &relay.metrics().await,
            "outbox_relay_messages_deleted_total",
        )
        .is_some_and(|v| v >= 200.0)
    })
    .await;
    assert!(
        counted,
        "{context} messages_deleted_total did not reach 200:\n{}",
        relay.metrics().await
    );
    relay.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_rows_are_deleted_at_once_with_retention_zero() {
    let (env, _collector, relay, pending) = retention_run("retention_zero", "0s").await;
    let emptied = wait_until(ARRIVAL_TIMEOUT, async || env.rows().await.len() == 1).await;
    let left = env.rows().await;
    assert!(
        emptied,
        "with --retention 0s, {} rows are left (want only the pending one)",
        left.len()
    );
    assert_eq!(left[0].id, pending[0].id, "retention deleted a pending row");
    assert_deleted_counted(relay, "200 published rows were deleted but").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_rows_are_deleted_after_retention() {
    const RETENTION_SECS: f64 = 2.0;
    let (env, _collector, relay, pending) = retention_run("retention", "2s").await;

    // Watch the rows go: none may go before published_at + retention.
    let mut known: HashMap<i64, Option<std::time::SystemTime>> = HashMap::new();
    let mut early = Vec::new();
    let gone = wait_until(ARRIVAL_TIMEOUT, async || {
        let now = env.db_now().await;
        let rows = env.rows().await;
        let present: HashSet<i64> = rows.iter().map(|r| r.id).collect();
        for (id, published_at) in &known {
            if !present.contains(id) {
                match published_at {
                    Some(p) if unix_secs(now) < unix_secs(*p) + RETENTION_SECS => {
                        early.push(format!(
                            "row {id}: gone {:.3} s after published_at",
                            unix_secs(now) - unix_secs(*p)
                        ))
                    }
                    None => early.push(format!("row {id}: deleted while pending")),
                    _ => {}
                }
            }
        }
        known = rows.iter().map(|r| (r.id, r.published_at)).collect();
        rows.len() == 1
    })
    .await;
    assert!(
        early.is_empty(),
        "rows deleted before their retention of 2 s: {early:?}"
    );
    assert!(
        gone,
        "published rows still kept long after --retention 2s: {} rows left",
        env.rows().await.len()
    );
    assert_eq!(
        env.rows().await[0].id,
        pending[0].id,
        "retention deleted a pending row"
    );
    assert_deleted_counted(relay, "").await;
}

// ---------------------------------------------------------------------------
// Settings from the environment, polling without LISTEN (README: "Configuration")
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_environment_and_secret_files() {
    let (env, queue, collector) = TestEnv::with_events_queue("env_settings", AckMode::Manual).await;
    // Secret files as mounted by Kubernetes or Docker: one line with a newline.
    let db_file = env.dir.join("database-url");
    let amqp_file = env.dir.join("amqp-url");
    save(&db_file, &format!("{}\n", env.db_url));
    save(&amqp_file, &format!("{}\n", env.amqp_url));
    let (db_file, amqp_file) = (
        db_file.display().to_string(),
        amqp_file.display().to_string(),
    );
    let mut relay = Launch::new()
        .envs(&[
            ("OUTBOX_DATABASE_URL_FILE", &db_file),
            ("OUTBOX_AMQP_URL_FILE", &amqp_file),
            ("OUTBOX_BATCH_SIZE", "7"),
            ("OUTBOX_LOG_FORMAT", "json"),
        ])
        .settings(Settings::Environment)
        .start(&env)
        .await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    let w = env.insert_committed(&NewRow::numbered(&queue, 30)).await;
    collector.wait_for_rows(&w).await;

    // OUTBOX_BATCH_SIZE=7 took effect: no batch larger than 7.
    let metrics = relay.metrics().await;
    let over_seven = metrics
        .lines()
        .find(|l| l.starts_with("outbox_relay_batch_size_bucket{le=\"8"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok());
    let count = metric_value(&metrics, "outbox_relay_batch_size_count");
    assert!(
        over_seven.is_some() && over_seven == count,
        "OUTBOX_BATCH_SIZE=7 ignored? batches <= 8: {over_seven:?} of {count:?}\n{metrics}"
    );
    // OUTBOX_LOG_FORMAT=json took effect: every log line is a JSON object.
    relay.terminate(Duration::from_secs(30)).await;
    let logs = relay.logs();
    let not_json: Vec<&str> = logs
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).is_err())
        .collect();
    assert!(!logs.trim().is_empty(), "the relay logged nothing");
    assert!(
        not_json.is_empty(),
        "OUTBOX_LOG_FORMAT=json but these lines are not JSON: {not_json:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_false_still_publishes_by_polling() {
    let (env, queue, collector) = TestEnv::with_events_queue("poll_only", AckMode::Manual).await;
    let mut relay = Launch::new()
        .args(&["--listen", "false", "--poll-interval", "300ms"])
        .start(&env)
        .await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    for round in 0..3 {
        let w = env
            .insert_committed(&[NewRow::to_queue(&queue, format!("r{round}"))])
            .await;
        let start = Instant::now();
        collector.wait_for_rows(&w).await;
        // A poll every 300 ms: well under 3 s even on a busy machine.
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "round {round}: took {:?} with --poll-interval 300ms",
            start.elapsed()
        );
    }
    relay.assert_running();
}

// ---------------------------------------------------------------------------
// Hand-off: an idle relay cut from RabbitMQ
// ---------------------------------------------------------------------------

/// README "Partition hand-off": a relay that loses its RabbitMQ connection
/// owns nothing within 10 s. An idle relay too: with nothing to publish only
/// the reset tells it, so it must notice the reset at once (broker_connected
/// 0, /readyz 503), not at its next idle beat (10 s), which would start the
/// hand-off's clock that much later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_cut_from_rabbitmq_notices_at_once_and_owns_nothing_within_10s() {
    use outbox_test_kit::faults::{url_addr, url_via};
    use outbox_test_kit::proxy::FaultProxy;
    /// Noticing a reset: scrape period of the poll below plus a loaded machine.
    const NOTICE_BOUND: Duration = Duration::from_secs(3);
    /// README's 10 s, with 2 s of slack for a loaded 2-core machine.
    const HANDOFF_BOUND: Duration = Duration::from_secs(12);
    let env = TestEnv::new("idle_broker_cut").await;
    let proxy = FaultProxy::start(url_addr(&env.amqp_url, 5672)).await;
    let mut relay = Launch::new()
        .amqp_url(&url_via(&env.amqp_url, proxy.port()))
        .start(&env)
        .await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    let held = async || {
        env.scalar_i64(&format!(
            "SELECT count(*) FROM \"{}\".leases WHERE owner = '{}' AND expires_at > clock_timestamp()",
            env.schema, relay.instance
        ))
        .await
    };
    assert!(
        wait_until(SETUP_TIMEOUT, async || held().await == 32).await,
        "the only relay never held all 32 partitions\n{}",
        relay.log_tail(30)
    );
    // Idle: nothing pending, it says it waits for a wakeup (relays.idle).
    let idle = wait_until(SETUP_TIMEOUT, async || {
        env.scalar_i64(&format!(
            "SELECT count(*) FROM \"{}\".relays WHERE instance = '{}' AND idle",
            env.schema, relay.instance
        ))
        .await
            == 1
    })
    .await;
    assert!(
        idle,
        "the relay never flagged itself idle\n{}",
        relay.log_tail(30)
    );

    let cut_at = Instant::now();
    proxy.go_down();
    let noticed = wait_until(HANDOFF_BOUND, async || {
        metric_value(&relay.metrics().await, "outbox_relay_broker_connected") == Some(0.0)
    })
    .await;
    let noticed_after = cut_at.elapsed();
    assert!(noticed, "broker_connected still 1\n{}", relay.log_tail(30));
    assert!(
        noticed_after <= NOTICE_BOUND,
        "an idle relay noticed the reset of its RabbitMQ connection only after {noticed_after:?}\n{}",
        relay.log_tail(30)
    );
    let (code, body) = relay.get("/readyz").await.expect("/readyz");
    assert!(
        code == 503 && body.contains("RabbitMQ"),
        "/readyz {code} {body}"
    );
    let released = wait_until(HANDOFF_BOUND, async || held().await == 0).await;
    let released_after = cut_at.elapsed();
    assert!(
        released && released_after <= HANDOFF_BOUND,
        "the idle relay cut from RabbitMQ still held {} partitions {released_after:?} after the cut\n{}",
        held().await,
        relay.log_tail(30)
    );
    assert_eq!(
        metric_value(&relay.metrics().await, "outbox_relay_partitions_owned"),
        Some(0.0)
    );
    proxy.come_back();
    relay.assert_running();
    println!(
        "an idle relay cut from RabbitMQ: broker_connected 0 after {:.1}s, every lease released after {:.1}s",
        noticed_after.as_secs_f64(),
        released_after.as_secs_f64()
    );
}

/// README "Partition hand-off": a relay none of whose RabbitMQ nodes answers
/// (every node of `amqp-url` down) cannot publish: it takes no partition,
/// is alive and not ready, and says so in its gauges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_every_rabbitmq_node_is_down_takes_no_partitions() {
    use outbox_test_kit::faults::url_via;
    let env = TestEnv::new("every_node_down").await;
    let (a, b) = (ClosedPort::new(), ClosedPort::new());
    let nodes = format!(
        "{},{}",
        url_via(&env.amqp_url, a.port),
        url_via(&env.amqp_url, b.port)
    );
    let mut relay = Launch::new().amqp_url(&nodes).start(&env).await;
    let held = async || {
        env.scalar_i64(&format!(
            "SELECT count(*) FROM \"{}\".leases WHERE owner = '{}' AND expires_at > clock_timestamp()",
            env.schema, relay.instance
        ))
        .await
    };
    // Alone, a heartbeat would take all 32 within a second: watched for 8 s.
    let watch_until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < watch_until {
        assert_eq!(held().await, 0, "{}", relay.log_tail(30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = relay.metrics().await;
    for (name, value) in [
        ("outbox_relay_partitions_owned", 0.0),
        ("outbox_relay_partitions_handed_off", 1.0),
        ("outbox_relay_broker_connected", 0.0),
    ] {
        assert_eq!(metric_value(&m, name), Some(value), "{name}\n{m}");
    }
    let (code, body) = relay.get("/readyz").await.expect("/readyz");
    assert!(
        code == 503 && body.contains("RabbitMQ"),
        "/readyz {code} {body}"
    );
    assert_eq!(relay.get("/healthz").await.expect("/healthz").0, 200);
    relay.assert_running();
}
