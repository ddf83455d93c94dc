//! Per-key order, exactly as the README states it: id order for transactions
//! the application serializes (here, as usual, by updating the aggregate the
//! event belongs to), and for transactions on one key that nothing serializes,
//! the order in which they became visible, with nothing lost or held back.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_test_kit::*;
use rand::Rng;

/// Writers that update their aggregate's row in the same transaction as the
/// outbox insert: per key, ids are in commit order, and consumers get id order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_serialized_transactions_arrive_in_id_order_per_key() {
    const WRITERS: usize = 8;
    const TX_PER_WRITER: usize = 60;
    const AGGREGATES: i64 = 30;
    let (env, queue, collector) =
        TestEnv::with_events_queue("serialized_order", AckMode::Manual).await;
    {
        let pg = env.pg.lock().await;
        pg.batch_execute(&format!(
            "CREATE TABLE \"{0}\".orders (id bigint PRIMARY KEY, version int NOT NULL);
             INSERT INTO \"{0}\".orders SELECT g, 0 FROM generate_series(1, {AGGREGATES}) g;",
            env.schema
        ))
        .await
        .expect("aggregate table");
    }
    let _relay = Launch::new().start(&env).await;

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let schema = env.schema.clone();
        let queue = queue.clone();
        let mut client = env.connect_db().await;
        writers.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for t in 0..TX_PER_WRITER {
                let (order, rows) = {
                    let mut rng = rand::rng();
                    (rng.random_range(1..=AGGREGATES), rng.random_range(1..=3))
                };
                let key = format!("order-{order}");
                let tx = client.transaction().await.expect("begin");
                // The business change: the aggregate's row (this serializes
                // the transactions of one order, as any update of it would).
                tx.execute(
                    &format!("UPDATE \"{schema}\".orders SET version = version + 1 WHERE id = $1"),
                    &[&order],
                )
                .await
                .expect("update aggregate");
                for r in 0..rows {
                    let row = NewRow::to_queue(&queue, format!("w{w}-t{t}-r{r}")).key(&key);
                    written.push((insert_row(&tx, &schema, &row).await, key.clone()));
                }
                tx.commit().await.expect("commit");
            }
            written
        }));
    }
    let mut rows: HashMap<String, (String, i64)> = HashMap::new();
    for w in writers {
        for (ins, key) in w.await.expect("writer") {
            rows.insert(ins.message_id.to_string(), (key, ins.id));
        }
    }
    let wanted: HashSet<String> = rows.keys().cloned().collect();
    collector
        .wait_for_ids(&wanted, Duration::from_secs(120))
        .await;

    // First delivery of each message, per key, must be in id order.
    let mut seen = HashSet::new();
    let mut last: HashMap<&str, i64> = HashMap::new();
    for r in collector.snapshot() {
        let Some(id) = r.message_id.clone() else {
            continue;
        };
        if !seen.insert(id.clone()) {
            continue;
        }
        let (key, row_id) = &rows[&id];
        if let Some(prev) = last.insert(key.as_str(), *row_id) {
            assert!(
                prev < *row_id,
                "key {key}: row {row_id} arrived after row {prev}"
            );
        }
    }
    collector.stop().await;
}

/// Two transactions on one key that nothing serializes: the one that commits
/// first is delivered first even though its id is higher, and the late one
/// (lower id) is delivered right after it commits, not held back or lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unserialized_transactions_on_one_key_arrive_in_visibility_order() {
    let (env, queue, collector) =
        TestEnv::with_events_queue("unserialized_order", AckMode::Manual).await;
    let _relay = Launch::new().start(&env).await;

    let mut early_client = env.connect_db().await;
    let early = early_client.transaction().await.expect("begin");
    let low = insert_row(
        &early,
        &env.schema,
        &NewRow::to_queue(&queue, "lower id, committed last").key("k"),
    )
    .await;
    let high = env
        .insert_committed(&[NewRow::to_queue(&queue, "higher id, committed first").key("k")])
        .await;
    assert!(low.id < high[0].id);
    collector
        .wait_for_ids(&ids_of(&high), Duration::from_secs(30))
        .await;
    early.commit().await.expect("commit");
    collector
        .wait_for_ids(&ids_of(&[low]), Duration::from_secs(30))
        .await;
    let order: Vec<String> = collector
        .snapshot()
        .iter()
        .filter_map(|r| r.message_id.clone())
        .collect();
    assert_eq!(
        order,
        vec![high[0].message_id.to_string(), low.message_id.to_string()]
    );
    collector.stop().await;
}
