//! Nothing PostgreSQL accepts may wedge the relay: every kind of bad row is
//! parked with its reason (or refused at INSERT) while the good rows around it,
//! on the same keys, flow on in order.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
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
    let env = TestEnv::new("bad_rows").await;
    let queue = env.declare_queue("events").await;
    let collector = env.consume(&queue, AckMode::Manual).await;
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
    let mut relay = Relay::start(&env, &["--max-payload-bytes", &max]).await;
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
    let status = relay.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status:?}");
    collector.stop().await;
}

/// A row that cannot be decoded is never mistaken for a lost connection, and a
/// good row with headers of every JSON kind arrives with the same headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_of_every_json_kind_arrive_as_written() {
    let env = TestEnv::new("header_kinds").await;
    let queue = env.declare_queue("events").await;
    let collector = env.consume(&queue, AckMode::Manual).await;
    let headers = json!({
        "s": "text", "i": -42, "f": 2.5, "t": true, "n": null,
        "a": [1, "two", [3.5]], "o": {"deep": {"deeper": "x"}},
        "deep": serde_json::from_str::<Value>(&nested(100)).expect("json"),
    });
    let mut row = NewRow::to_queue(&queue, "p");
    row.headers = headers.clone();
    let inserted = env.insert_committed(&[row]).await;
    let _relay = Relay::start(&env, &[]).await;
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
    let env = TestEnv::new("large_rows").await;
    let queue = env.declare_queue("events").await;
    let collector = env.consume(&queue, AckMode::Auto).await;
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
    let mut relay = Relay::start(&env, &[]).await;
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
    let peak = peak_rss_bytes(relay.pid);
    println!(
        "relay peak RSS with 6 MiB and 24 MiB rows: {} KiB",
        peak / 1024
    );
    let limit = manifest_memory_limit();
    assert!(
        peak < limit,
        "peak RSS {} MiB is over the manifest's {} MiB limit",
        peak / 1024 / 1024,
        limit / 1024 / 1024
    );
    let status = relay.terminate(Duration::from_secs(20)).await;
    assert!(status.success());
    collector.stop().await;
}
