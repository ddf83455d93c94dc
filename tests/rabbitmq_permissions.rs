//! Least privilege on the RabbitMQ side: the relay needs a user with no tags
//! and, on its vhost, configure `^$`, read `^$` and write on the exchanges it
//! publishes to (`amq.default` for rows with an empty exchange), nothing more.
//!
//! Every test creates its own RabbitMQ user with `rabbitmqctl` (unique name,
//! random password with characters a URL must escape), runs the relay or
//! `check` as that user, and deletes the user at the end whatever happened.
//! Users are managed on the local node only: a test prints `SKIPPED` and
//! returns when `rabbitmqctl` cannot be used or the broker is not local.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use outbox_test_kit::broker_user::*;
use outbox_test_kit::*;

const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// Relay settings for these tests: quick polls, and a refused row parked at
/// its second attempt.
fn launch(user: &BrokerUser) -> Launch {
    Launch::new()
        .amqp_url(&user.url())
        .args(&["--max-attempts", "2", "--poll-interval", "200ms"])
}

/// A queue `exchange` routes the routing key "orders" to.
async fn queue_bound_for_orders(env: &TestEnv, what: &str, exchange: &str) -> String {
    let queue = env.declare_queue(what).await;
    env.bind(&queue, exchange, "orders").await;
    queue
}

/// `outbox-relay check` logging in to the broker as `user`.
async fn check_as(env: &TestEnv, user: &BrokerUser) -> CliOutput {
    let user_url = user.url();
    run_cli(
        &[
            "check",
            "--database-url",
            &env.db_url,
            "--amqp-url",
            &user_url,
            "--schema",
            &env.schema,
        ],
        &[],
        CLI_TIMEOUT,
    )
    .await
}

/// The line of `check`'s output about the broker.
fn broker_line(out: &CliOutput) -> &str {
    out.stdout
        .lines()
        .find(|l| l.contains("broker"))
        .unwrap_or_else(|| panic!("no broker line\n{}", out.describe()))
}

/// Asserts that a row's last_error names each of `needles`.
fn assert_says_all(err: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            err.contains(needle),
            "last_error does not say {needle:?}: {err:?}"
        );
    }
}

fn to_exchange(exchange: &str, routing_key: &str, payload: &str) -> NewRow {
    let mut row = NewRow::to_queue(routing_key, payload.as_bytes().to_vec());
    row.exchange = exchange.to_string();
    row
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_as_a_publish_only_user() {
    let env = TestEnv::new("amqp_perm_check").await;
    let exchange = env.declare_exchange("allowed", ExchangeKind::Direct).await;
    let test = "check_passes_as_a_publish_only_user";
    let Some(user) = BrokerUser::publish_only(&env, test, &["amq.default", &exchange]) else {
        return;
    };
    let out = check_as(&env, &user).await;
    assert_eq!(
        out.code(),
        Some(0),
        "check as the publish-only user {}\n{}",
        user.name,
        out.describe()
    );
    let broker_line = broker_line(&out);
    assert!(
        broker_line.starts_with("ok"),
        "broker line: {broker_line}\n{}",
        out.describe()
    );
    out.assert_never_printed(&user.password, "the broker user's password");
    println!("check as {}: {broker_line}", user.name);
}

/// A test env with a direct exchange `allowed`, a queue bound to it for
/// `orders` and a queue `direct` reached through the default exchange:
/// (env, exchange, bound queue, direct queue).
async fn allowed_exchange_and_queues(name: &str) -> (TestEnv, String, String, String) {
    let env = TestEnv::new(name).await;
    let exchange = env.declare_exchange("allowed", ExchangeKind::Direct).await;
    let queue = queue_bound_for_orders(&env, "events", &exchange).await;
    let direct_queue = env.declare_queue("direct").await;
    (env, exchange, queue, direct_queue)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_only_user_publishes_rows_to_the_exchanges_it_may_write() {
    let (env, exchange, queue, direct_queue) =
        allowed_exchange_and_queues("amqp_perm_publish").await;
    let test = "publish_only_user_publishes_rows_to_the_exchanges_it_may_write";
    let Some(user) = BrokerUser::publish_only(&env, test, &["amq.default", &exchange]) else {
        return;
    };

    // The relay's exchange check (a passive exchange.declare) needs no
    // permission: the user gets true answers, 404 included.
    let conn = Connection::connect(&user.url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("connect as {}: {e}", user.name));
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let channel = conn.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Direct,
            passive,
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("passive declare of {exchange} as {}: {e}", user.name));
    let missing = env.unique("missing");
    let answer = conn
        .create_channel()
        .await
        .expect("channel")
        .exchange_declare(
            missing.as_str().into(),
            ExchangeKind::Direct,
            passive,
            FieldTable::default(),
        )
        .await;
    let answer = format!("{answer:?}");
    assert!(
        answer.contains("NOT_FOUND") || answer.contains("404"),
        "passive declare of a missing exchange as {}: {answer}",
        user.name
    );
    let _ = conn.close(200, "done".into()).await;

    let collector = env.consume(&queue, AckMode::Manual).await;
    let direct = env.consume(&direct_queue, AckMode::Manual).await;
    let mut rows: Vec<NewRow> = (1..=5)
        .map(|i| to_exchange(&exchange, "orders", &format!("x{i}")))
        .collect();
    rows.extend((1..=3).map(|i| NewRow::to_queue(&direct_queue, format!("d{i}"))));
    let ins = env.insert_committed(&rows).await;
    let relay = launch(&user).start(&env).await;

    collector.wait_for_rows(&ins[..5]).await;
    direct.wait_for_rows(&ins[5..]).await;
    env.wait_published(&ins, &relay).await;
    for row in env.rows().await {
        assert_eq!(row.attempts, 0, "a row was charged: {row:?}");
    }
    let logs = relay.logs();
    assert!(
        !logs.contains("ACCESS_REFUSED") && !logs.contains("access to"),
        "the relay was refused something\n{}",
        relay.log_tail(100)
    );
    assert!(
        !logs.contains(&user.password),
        "the relay logged the password"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_to_an_exchange_the_user_may_not_write_is_charged_and_parked_others_flow() {
    let env = TestEnv::new("amqp_perm_refused").await;
    let allowed = env.declare_exchange("allowed", ExchangeKind::Direct).await;
    let refused = env.declare_exchange("refused", ExchangeKind::Direct).await;
    let queue = queue_bound_for_orders(&env, "events", &allowed).await;
    // Routable if it were written: only the permission stops it.
    let refused_queue = queue_bound_for_orders(&env, "refused", &refused).await;
    let direct_queue = env.declare_queue("direct").await;
    let test = "row_to_an_exchange_the_user_may_not_write_is_charged_and_parked_others_flow";
    let Some(user) = BrokerUser::publish_only(&env, test, &["amq.default", &allowed]) else {
        return;
    };

    let collector = env.consume(&queue, AckMode::Manual).await;
    let direct = env.consume(&direct_queue, AckMode::Manual).await;
    let mut rows = vec![
        to_exchange(&allowed, "orders", "x1"),
        to_exchange(&refused, "orders", "refused"),
    ];
    rows.extend((2..=5).map(|i| to_exchange(&allowed, "orders", &format!("x{i}"))));
    rows.extend((1..=3).map(|i| NewRow::to_queue(&direct_queue, format!("d{i}"))));
    let ins = env.insert_committed(&rows).await;
    let bad = ins[1];
    let good: Vec<Inserted> = ins.iter().copied().filter(|i| *i != bad).collect();
    let relay = launch(&user).start(&env).await;

    let to_allowed: Vec<Inserted> = good[..5].to_vec();
    collector.wait_for_rows(&to_allowed).await;
    direct.wait_for_rows(&good[5..]).await;
    env.wait_published(&good, &relay).await;
    let parked = env.wait_parked(bad.id, &relay).await;

    assert!(
        parked.published_at.is_none(),
        "the refused row was marked published: {parked:?}"
    );
    assert_eq!(
        parked.attempts, 2,
        "attempts of the refused row: {parked:?}"
    );
    let err = parked.last_error.clone().unwrap_or_default();
    assert_says_all(
        &err,
        &["ACCESS_REFUSED", refused.as_str(), user.name.as_str()],
    );
    assert!(
        !err.contains(&user.password),
        "last_error holds the password"
    );
    for row in env.rows().await.iter().filter(|r| r.id != bad.id) {
        assert!(
            row.published_at.is_some() && row.attempts == 0,
            "a row beside the refused one was charged or not marked: {row:?}"
        );
    }
    assert_eq!(
        env.queue_depth(&refused_queue).await,
        0,
        "the refused row reached the exchange it may not write"
    );
    let arrived = collector.distinct_ids();
    assert!(
        !arrived.contains(&bad.message_id.to_string()),
        "the refused row arrived"
    );
    println!("refused row {} parked after 2 attempts: {err}", bad.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_to_the_default_exchange_need_write_on_amq_default() {
    let (env, allowed, queue, direct_queue) =
        allowed_exchange_and_queues("amqp_perm_default").await;
    // No amq.default: rows with an empty exchange are refused.
    let test = "rows_to_the_default_exchange_need_write_on_amq_default";
    let Some(user) = BrokerUser::publish_only(&env, test, &[&allowed]) else {
        return;
    };

    let collector = env.consume(&queue, AckMode::Manual).await;
    let rows = vec![
        NewRow::to_queue(&direct_queue, "direct"),
        to_exchange(&allowed, "orders", "x1"),
        to_exchange(&allowed, "orders", "x2"),
    ];
    let ins = env.insert_committed(&rows).await;
    let relay = launch(&user).start(&env).await;

    collector.wait_for_rows(&ins[1..]).await;
    env.wait_published(&ins[1..], &relay).await;
    let parked = env.wait_parked(ins[0].id, &relay).await;
    assert!(parked.published_at.is_none(), "{parked:?}");
    let err = parked.last_error.clone().unwrap_or_default();
    assert_says_all(&err, &["ACCESS_REFUSED", "amq.default"]);
    assert_eq!(env.queue_depth(&direct_queue).await, 0);
    println!("default-exchange row without write on amq.default: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_a_user_without_access_to_the_vhost() {
    let env = TestEnv::new("amqp_perm_vhost").await;
    let test = "check_names_a_user_without_access_to_the_vhost";
    let Some(user) = BrokerUser::create(&env, test, "^$", "^$", "^$") else {
        return;
    };
    // No permissions at all on the vhost, not even empty ones.
    rabbitmqctl(&["clear_permissions", "-p", &user.vhost, &user.name])
        .unwrap_or_else(|e| panic!("clear permissions of {}: {e}", user.name));
    let out = check_as(&env, &user).await;
    out.assert_code(1);
    let broker_line = broker_line(&out);
    for needle in ["FAIL", "access to vhost", &user.name] {
        assert!(
            broker_line.contains(needle),
            "broker line does not say {needle:?}: {broker_line}"
        );
    }
    assert!(!out.stdout.contains(&user.password), "{}", out.describe());
    println!("check as a user without vhost access: {broker_line}");
}

/// Rows to a refused exchange spread through a backlog: each closes the
/// publishing channel, so the rows in flight with it go again alone (a
/// repeat is possible, as after any closed channel: at least once), and only
/// the refused rows are charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_rows_spread_through_a_backlog_are_each_parked_and_the_rest_flow() {
    let env = TestEnv::new("amqp_perm_backlog").await;
    let allowed = env.declare_exchange("allowed", ExchangeKind::Direct).await;
    let refused = env.declare_exchange("refused", ExchangeKind::Direct).await;
    let queue = queue_bound_for_orders(&env, "events", &allowed).await;
    let refused_queue = queue_bound_for_orders(&env, "refused", &refused).await;
    let test = "refused_rows_spread_through_a_backlog_are_each_parked_and_the_rest_flow";
    let Some(user) = BrokerUser::publish_only(&env, test, &["amq.default", &allowed]) else {
        return;
    };
    let collector = env.consume(&queue, AckMode::Manual).await;
    // One row in 40 refused, spread over three partition keys (a refused
    // row holds its key until it is parked, like any charged row); one row
    // in 5 has no key and owes nothing to the refused rows.
    let is_refused = |i: usize| i % 40 == 7;
    let unkeyed = |i: usize| i.is_multiple_of(5);
    let rows: Vec<NewRow> = (0..400)
        .map(|i| {
            let row = if is_refused(i) {
                to_exchange(&refused, "orders", &format!("r{i}"))
            } else {
                to_exchange(&allowed, "orders", &format!("x{i}"))
            };
            if unkeyed(i) {
                row
            } else {
                row.key(&format!("k{}", i % 3))
            }
        })
        .collect();
    let ins = env.insert_committed(&rows).await;
    type Numbered = Vec<(usize, Inserted)>;
    let (bad, good): (Numbered, Numbered) = ins
        .iter()
        .copied()
        .enumerate()
        .partition(|(i, _)| is_refused(*i));
    let free: HashSet<String> = good
        .iter()
        .filter(|(i, _)| unkeyed(*i))
        .map(|(_, r)| r.message_id.to_string())
        .collect();
    let bad: Vec<Inserted> = bad.into_iter().map(|(_, r)| r).collect();
    let good: Vec<Inserted> = good.into_iter().map(|(_, r)| r).collect();
    let started = Instant::now();
    let relay = launch(&user).start(&env).await;

    collector.wait_for_rows(&good).await;
    env.wait_published(&good, &relay).await;
    let good_done = started.elapsed();
    for b in &bad {
        env.wait_parked(b.id, &relay).await;
    }
    let all_parked = started.elapsed();

    let rows = env.rows().await;
    let bad_ids: HashSet<i64> = bad.iter().map(|b| b.id).collect();
    for row in &rows {
        if bad_ids.contains(&row.id) {
            let err = row.last_error.as_deref().unwrap_or("");
            assert!(
                row.published_at.is_none() && row.attempts == 2 && err.contains("ACCESS_REFUSED"),
                "refused row not parked as refused: {row:?}"
            );
        } else {
            assert!(
                row.published_at.is_some() && row.attempts == 0,
                "a row beside the refused ones was charged or not marked: {row:?}"
            );
        }
    }
    assert_eq!(env.queue_depth(&refused_queue).await, 0);
    let arrived = collector.snapshot();
    let bad_messages = ids_of(&bad);
    assert!(
        arrived
            .iter()
            .all(|r| !bad_messages.contains(r.message_id.as_deref().unwrap_or(""))),
        "a refused row arrived"
    );
    let by_message: std::collections::HashMap<String, (Option<String>, i64)> = rows
        .iter()
        .map(|r| (r.message_id.to_string(), (r.partition_key.clone(), r.id)))
        .collect();
    let violations = order_violations(arrived.iter().map(|r| r.message_id.as_deref()), &by_message);
    assert!(
        violations.is_empty(),
        "order per key broken: {violations:?}"
    );
    let last_parked = rows
        .iter()
        .filter_map(|r| r.dead_lettered_at)
        .max()
        .expect("parked rows");
    let late: Vec<&Received> = arrived
        .iter()
        .filter(|r| free.contains(r.message_id.as_deref().unwrap_or("")) && r.at > last_parked)
        .collect();
    assert!(
        late.is_empty(),
        "{} rows without a key waited for the refused rows to be parked",
        late.len()
    );
    let duplicates = arrived.len() - collector.distinct_ids().len();
    println!(
        "{} good rows published and marked in {good_done:?} (repeats {duplicates}), \
         {} refused rows parked after 2 attempts by {all_parked:?}",
        good.len(),
        bad.len()
    );
}

/// Partitions whose lease `instance` holds now (database clock).
async fn partitions_held_by(env: &TestEnv, instance: &str) -> i64 {
    env.scalar_i64(&format!(
        "SELECT count(*) FROM \"{}\".leases WHERE owner = '{instance}' AND expires_at > clock_timestamp()",
        env.schema
    ))
    .await
}

/// README "Partition hand-off": a relay that cannot publish because RabbitMQ
/// refuses it (ACCESS_REFUSED at connection.open: its user has no access to
/// the vhost) takes no partition, stays alive and not ready, and its rows
/// wait for a relay that can publish, which takes every partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_refused_by_rabbitmq_takes_no_partitions_and_one_that_can_publishes_its_rows() {
    let env = TestEnv::new("amqp_perm_handoff").await;
    let test =
        "a_relay_refused_by_rabbitmq_takes_no_partitions_and_one_that_can_publishes_its_rows";
    let Some(user) = BrokerUser::create(&env, test, "^$", "^$", "^$") else {
        return;
    };
    rabbitmqctl(&["clear_permissions", "-p", &user.vhost, &user.name])
        .unwrap_or_else(|e| panic!("clear permissions of {}: {e}", user.name));
    let queue = env.declare_queue("events").await;
    let mut refused = launch(&user).start(&env).await;
    let rows = env
        .insert_committed(&[NewRow::to_queue(&queue, "waits").key("k")])
        .await;

    // Alone and refused, it holds nothing (a heartbeat would have taken all
    // 32 within a second): watched for 8 s.
    let watch_until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < watch_until {
        assert_eq!(
            partitions_held_by(&env, &refused.instance).await,
            0,
            "a refused relay took partitions\n{}",
            refused.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = refused.metrics().await;
    for (name, value) in [
        ("outbox_relay_partitions_owned", 0.0),
        ("outbox_relay_partitions_handed_off", 1.0),
        ("outbox_relay_broker_connected", 0.0),
    ] {
        assert_eq!(metric_value(&m, name), Some(value), "{name}\n{m}");
    }
    let failed_attempts = m
        .lines()
        .find_map(|l| {
            l.strip_prefix("outbox_relay_broker_connection_attempts_total{outcome=\"failed\"} ")
        })
        .and_then(|v| v.parse::<f64>().ok());
    assert!(
        failed_attempts.is_some_and(|v| v >= 1.0),
        "refused connection attempts not counted as failed\n{m}"
    );
    let (code, body) = refused.get("/readyz").await.expect("/readyz");
    assert!(
        code == 503 && body.contains("RabbitMQ"),
        "/readyz {code} {body}"
    );
    assert_eq!(refused.get("/healthz").await.expect("/healthz").0, 200);
    assert_eq!(env.pending_count().await, 1, "the row waits");

    // A relay that can publish takes every partition and publishes the row.
    let got = env.consume(&queue, AckMode::Auto).await;
    let mut able = Launch::new().start(&env).await;
    able.wait_ready(CLI_TIMEOUT).await;
    got.wait_for_ids(&ids_of(&rows), CLI_TIMEOUT).await;
    let all = wait_until(CLI_TIMEOUT, async || {
        partitions_held_by(&env, &able.instance).await == 32
    })
    .await;
    assert!(
        all,
        "the relay that can publish does not hold every partition; the refused one holds {}",
        partitions_held_by(&env, &refused.instance).await
    );
    assert_eq!(partitions_held_by(&env, &refused.instance).await, 0);
    refused.assert_running();
    println!("{test}: the refused relay held 0 partitions for 8 s; the one that can publish took all 32 and delivered the row");
}
