//! Property test of the row -> AMQP message conversion, through the real relay
//! and broker: for arbitrary headers, bodies, names and properties, every row
//! either arrives exactly as written or is parked at once with a reason, and a
//! row that AMQP can carry is never parked.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::collections::HashMap;
use std::time::Duration;

use lapin::ExchangeKind;
use outbox_test_kit::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRng, TestRunner};
use serde_json::Value;

/// Text PostgreSQL stores (no NUL), sometimes longer than AMQP's 255 bytes.
fn text(max_chars: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::collection::vec(any::<char>().prop_filter("no NUL", |c| *c != '\0'), 0..16)
            .prop_map(|c| c.into_iter().collect::<String>()),
        1 => proptest::collection::vec(any::<char>().prop_filter("no NUL", |c| *c != '\0'), 0..max_chars)
            .prop_map(|c| c.into_iter().collect::<String>()),
    ]
}

/// JSON values of every kind: integers inside and outside 64 bits, fractional
/// floats (jsonb keeps no int/float distinction, so whole floats are ints).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (i64::MAX as u64 + 1..=u64::MAX).prop_map(Value::from),
        (-1e12f64..1e12f64)
            .prop_filter("fractional", |f| f.fract() != 0.0)
            .prop_map(Value::from),
        text(300).prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((text(300), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

#[derive(Debug, Clone)]
struct Case {
    headers: Value,
    routing_key: String,
    content_type: Option<String>,
    message_type: Option<String>,
    correlation_id: Option<String>,
    payload: Vec<u8>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec((text(300), json_value()), 0..5)
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        text(300),
        proptest::option::of(text(300)),
        proptest::option::of(text(300)),
        proptest::option::of(text(300)),
        proptest::collection::vec(any::<u8>(), 0..2000),
    )
        .prop_map(
            |(headers, routing_key, content_type, message_type, correlation_id, payload)| Case {
                headers,
                routing_key,
                content_type,
                message_type,
                correlation_id,
                payload,
            },
        )
}

/// Whether AMQP 0-9-1 can carry the value as a header value.
fn carriable(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_i64() || n.is_f64(),
        Value::Array(items) => items.iter().all(carriable),
        Value::Object(map) => map.iter().all(|(k, v)| k.len() <= 255 && carriable(v)),
        _ => true,
    }
}

/// Independent of the relay's code: what a correct conversion must deliver.
fn deliverable(c: &Case) -> bool {
    let short = |s: &Option<String>| s.as_ref().is_none_or(|s| s.len() <= 255);
    carriable(&c.headers)
        && c.routing_key.len() <= 255
        && short(&c.content_type)
        && short(&c.message_type)
        && short(&c.correlation_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_rows_arrive_as_written_or_are_parked_with_a_reason() {
    let env = TestEnv::new("conversion_props").await;
    let queue = env.declare_queue("events").await;
    // A fanout exchange routes any routing key to the queue.
    let exchange = env.declare_exchange("all", ExchangeKind::Fanout).await;
    env.bind(&queue, &exchange, "").await;
    let collector = env.consume(&queue, AckMode::Manual).await;

    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    let strategy = case();
    let cases: Vec<Case> = (0..150)
        .map(|_| {
            strategy
                .new_tree(&mut runner)
                .expect("generate a case")
                .current()
        })
        .collect();

    let mut by_id: HashMap<i64, (uuid::Uuid, Case)> = HashMap::new();
    {
        let mut pg = env.pg.lock().await;
        let tx = pg.transaction().await.expect("begin");
        let sql = format!(
            "INSERT INTO {} (exchange, routing_key, headers, payload, content_type,
                             message_type, correlation_id)
             VALUES ($1, $2, $3::text::jsonb, $4, $5, $6, $7) RETURNING id, message_id",
            env.table()
        );
        for c in &cases {
            let r = tx
                .query_one(
                    &sql,
                    &[
                        &exchange,
                        &c.routing_key,
                        &c.headers.to_string(),
                        &c.payload,
                        &c.content_type,
                        &c.message_type,
                        &c.correlation_id,
                    ],
                )
                .await
                .unwrap_or_else(|e| panic!("insert {c:?}: {e}"));
            by_id.insert(r.get(0), (r.get(1), c.clone()));
        }
        tx.commit().await.expect("commit");
    }
    let expected_delivered = cases.iter().filter(|c| deliverable(c)).count();
    assert!(
        expected_delivered > 20 && expected_delivered < cases.len(),
        "the generator should produce both kinds: {expected_delivered} of {}",
        cases.len()
    );

    let mut relay = Launch::new().start(&env).await;
    relay
        .wait_for(Duration::from_secs(60), "rows still pending:", || async {
            env.pending_count().await == 0
        })
        .await;
    let wanted = env
        .rows()
        .await
        .iter()
        .filter(|r| r.published_at.is_some())
        .map(|r| r.message_id.to_string())
        .collect();
    collector
        .wait_for_ids(&wanted, Duration::from_secs(30))
        .await;
    let received: HashMap<String, Received> = collector
        .snapshot()
        .into_iter()
        .filter_map(|r| r.message_id.clone().map(|m| (m, r)))
        .collect();

    for row in env.rows().await {
        let (message_id, case) = &by_id[&row.id];
        if deliverable(case) {
            assert!(
                row.dead_lettered_at.is_none(),
                "row {} could be sent but was parked ({:?}): {case:?}",
                row.id,
                row.last_error
            );
            let got = received
                .get(&message_id.to_string())
                .unwrap_or_else(|| panic!("row {} was not delivered: {case:?}", row.id));
            assert_eq!(got.body, case.payload, "row {} body", row.id);
            assert_eq!(
                got.routing_key, case.routing_key,
                "row {} routing key",
                row.id
            );
            assert_eq!(
                got.headers_json()
                    .unwrap_or(Value::Object(Default::default())),
                case.headers,
                "row {} headers",
                row.id
            );
            let prop = |p: &Option<lapin::types::ShortString>| p.as_ref().map(|s| s.to_string());
            assert_eq!(prop(got.properties.content_type()), case.content_type);
            assert_eq!(prop(got.properties.kind()), case.message_type);
            assert_eq!(prop(got.properties.correlation_id()), case.correlation_id);
        } else {
            assert!(
                row.dead_lettered_at.is_some() && row.attempts == 1,
                "row {} cannot be carried by AMQP and must be parked at once: {row:?} {case:?}",
                row.id
            );
            let error = row.last_error.unwrap_or_default();
            assert!(
                error.contains(&row.id.to_string()) && error.len() > 20,
                "row {}: reason {error:?}",
                row.id
            );
            assert!(!received.contains_key(&message_id.to_string()));
        }
    }
    assert!(
        relay.try_exit_status().is_none(),
        "the relay died:\n{}",
        relay.log_tail(30)
    );
    collector.stop().await;
}
