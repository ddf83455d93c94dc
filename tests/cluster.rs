//! The relay on a three-node RabbitMQ cluster (scripts/rabbitmq-cluster.sh):
//! fail-over between nodes with a quorum queue, and quorum vs classic queue
//! drain rate and delivery lag in the same run.
//!
//! The relay is given the nodes in the order 1, 2, 3 and the consumer reads
//! from node 3, which no test stops. Each test starts the cluster if needed
//! (the script is idempotent) and says `SKIPPED: <reason>` when the machine
//! cannot run it. A node a test stops is started again by a guard, even when
//! the test fails. The default broker (5672) is not touched: only the
//! environment's first connection goes there.
//!
//! nextest runs `cluster_` tests alone (test group `cluster` in
//! .config/nextest.toml): they stop nodes, and their figures should not
//! measure other tests. Figures go to stderr and to target/cluster-figures.txt.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use outbox_test_kit::cluster::*;
use outbox_test_kit::faults::*;
use outbox_test_kit::*;

/// The node the consumer reads from; never stopped.
const CONSUMER_NODE: u8 = 3;
/// The order the relay is given the nodes in.
const RELAY_NODES: [u8; 3] = [1, 2, 3];
/// How long the relay may take to be connected to another node after its
/// node went down, and to deliver again once the cluster can take messages.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the quorum queue stays without a majority: longer than the
/// relay's 30 s confirm timeout, so the relay's reaction to confirms that do
/// not come is part of the test.
const MAJORITY_LOSS: Duration = Duration::from_secs(40);

async fn cluster_or_skip(test: &str) -> Option<Cluster> {
    match Cluster::ensure().await {
        Ok(cluster) => Some(cluster),
        Err(reason) => {
            cannot_run(
                &format!("cluster::{test}"),
                &format!("this machine cannot run the RabbitMQ cluster: {reason}"),
            );
            None
        }
    }
}

async fn start_relay(env: &TestEnv) -> Relay {
    let mut relay = Launch::new()
        .amqp_url(&Cluster::urls(&RELAY_NODES))
        .start(env)
        .await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    relay
}

/// Waits until the relay's metrics say it is connected to a node other than
/// `left` (None: any node); returns that node and how long it took.
async fn wait_connected_elsewhere(relay: &Relay, left: Option<u8>) -> (u8, Duration) {
    let started = Instant::now();
    let mut node = None;
    let mut last = String::new();
    let ok = wait_until(RECOVERY_TIMEOUT, async || {
        if let Ok((200, m)) = relay.get("/metrics").await {
            node = connected_node(&m).filter(|n| Some(*n) != left);
            last = m;
        }
        node.is_some()
    })
    .await;
    assert!(
        ok,
        "the relay was not connected to a node other than {left:?} within {RECOVERY_TIMEOUT:?}; \
         node metrics:\n{}\n{}",
        last.lines()
            .filter(|l| l.contains("node=\""))
            .collect::<Vec<_>>()
            .join("\n"),
        relay.log_tail(60)
    );
    (node.unwrap(), started.elapsed())
}

/// Waits until the probe saw the relay on `node` and then its published count
/// rise there (after `from`); returns both moments.
async fn wait_publishing_on(
    probe: &NodeProbe,
    node: u8,
    from: Instant,
    relay: &Relay,
) -> (Instant, Instant) {
    let ok = wait_until(RECOVERY_TIMEOUT, async || {
        probe.first_publish_on(node, from).is_some()
    })
    .await;
    assert!(
        ok,
        "the relay did not publish on node {node} within {RECOVERY_TIMEOUT:?}\n{}",
        relay.log_tail(60)
    );
    (
        probe.first_on(node, from).expect("seen on the node"),
        probe
            .first_publish_on(node, from)
            .expect("published on the node"),
    )
}

/// Waits until a row committed at or after `since` has arrived; returns when
/// the first such row arrived.
async fn wait_fresh_arrival(
    work: &KeyedWorkload,
    tally: &Tally,
    since: Instant,
    relay: &Relay,
) -> Instant {
    let mut first = None;
    let ok = wait_until(RECOVERY_TIMEOUT, async || {
        first = work
            .written_between(since, Instant::now())
            .iter()
            .filter_map(|w| tally.first_arrival(&w.message_id.to_string()))
            .min();
        first.is_some()
    })
    .await;
    assert!(
        ok,
        "no row committed after the outage began arrived within {RECOVERY_TIMEOUT:?} \
         (consumer errors {:?})\n{}",
        tally.errors(),
        relay.log_tail(60)
    );
    first.unwrap()
}

/// The longest pause between first arrivals of new messages in [from, to]
/// (from `from` to the first arrival counts too).
fn longest_pause(tally: &Tally, from: Instant, to: Instant) -> Duration {
    let mut seen = HashSet::new();
    let mut times = vec![from];
    for a in tally.snapshot() {
        if seen.insert(a.message_id.clone()) && a.at >= from && a.at <= to {
            times.push(a.at);
        }
    }
    times.push(to);
    times
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
        .unwrap_or_default()
}

async fn wait_flowing(tally: &Tally, n: usize, relay: &Relay) {
    let target = tally.distinct() + n;
    let ok = wait_until(RECOVERY_TIMEOUT, async || tally.distinct() >= target).await;
    assert!(
        ok,
        "only {} messages arrived ({target} expected)\n{}",
        tally.distinct(),
        relay.log_tail(60)
    );
}

/// A queue of `kind` bound to a fresh exchange in `env` and a consumer
/// reading it through the consumer node: (exchange, routing key, consumer).
async fn bound_queue_read_on_consumer_node(
    env: &TestEnv,
    what: &str,
    kind: QueueKind,
) -> (String, String, Tally) {
    let (exchange, routing_key, queue) = env.declare_bound_queue(what, kind).await;
    let tally = Tally::start(&Cluster::url(CONSUMER_NODE), &queue).await;
    (exchange, routing_key, tally)
}

/// The application at its usual pace: a transaction every 4 ms.
fn start_application(env: &TestEnv, exchange: &str, routing_key: &str) -> KeyedWorkload {
    KeyedWorkload::start(
        &env.db_url,
        &env.schema,
        exchange,
        routing_key,
        Duration::from_millis(4),
    )
}

/// Lets the application commit 300 more rows, stops it and asserts that its
/// own database writes never failed; returns its write log and per-key numbers.
async fn stop_application_after_300_more(
    work: KeyedWorkload,
) -> (WriteLog, HashMap<String, (String, u64)>) {
    work.wait_more(300, RECOVERY_TIMEOUT).await;
    let (log, seqs) = work.stop().await;
    assert!(
        log.errors.is_empty() && log.uncertain.is_empty(),
        "the application's database writes failed: {:?}",
        log.errors
    );
    (log, seqs)
}

/// Asserts that the first arrivals of each key carry its numbers 1, 2, 3, ...
/// in order, none missing.
fn assert_per_key_order(tally: &Tally, seqs: &HashMap<String, (String, u64)>) {
    let arrivals = tally.snapshot();
    let violations = key_sequence_violations(arrivals.iter().map(|a| a.message_id.as_str()), seqs);
    assert!(
        violations.is_empty(),
        "per-key numbers out of order or missing among first arrivals: {:#?}",
        &violations[..violations.len().min(10)]
    );
}

fn message_ids(rows: &[Written]) -> HashSet<String> {
    rows.iter().map(|w| w.message_id.to_string()).collect()
}

/// Rows neither published nor dead-lettered, rows charged an attempt, rows
/// dead-lettered, and rows published among `ids`.
async fn row_counts(env: &TestEnv, ids: &HashSet<String>) -> (usize, usize, usize, usize) {
    let rows = env.rows().await;
    let pending = rows
        .iter()
        .filter(|r| r.published_at.is_none() && r.dead_lettered_at.is_none())
        .count();
    let charged = rows.iter().filter(|r| r.attempts > 0).count();
    let dead = rows.iter().filter(|r| r.dead_lettered_at.is_some()).count();
    let published_of_ids = rows
        .iter()
        .filter(|r| r.published_at.is_some() && ids.contains(&r.message_id.to_string()))
        .count();
    (pending, charged, dead, published_of_ids)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

// ---------------------------------------------------------------------------
// Fail-over
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_quorum_queue_survives_node_stops_and_majority_loss() {
    const TEST: &str = "cluster_quorum_failover";
    let Some(cluster) = cluster_or_skip(TEST).await else {
        return;
    };
    let env = TestEnv::on_cluster(TEST, CONSUMER_NODE).await;
    let (exchange, routing_key, tally) =
        bound_queue_read_on_consumer_node(&env, "events", QueueKind::Quorum).await;
    let relay = start_relay(&env).await;
    let instance = relay.instance.clone();

    // Nodes are tried in the order given: the first one while it is up.
    let (first_node, _) = wait_connected_elsewhere(&relay, None).await;
    assert_eq!(
        first_node, RELAY_NODES[0],
        "the relay did not connect to the first node given"
    );

    let work = start_application(&env, &exchange, &routing_key);
    wait_flowing(&tally, 300, &relay).await;

    // -- 1. The node the relay publishes to stops (whole VM) -----------------
    let probe = NodeProbe::start(&relay);
    let stop_at = Instant::now();
    let down = cluster.take_down(first_node, Outage::Stop).await;
    let stopped_at = Instant::now();
    let (second_node, _) = wait_connected_elsewhere(&relay, Some(first_node)).await;
    assert_eq!(
        second_node, RELAY_NODES[1],
        "after losing node {first_node} the relay should move to the next node given"
    );
    let (moved_at, published_at) = wait_publishing_on(&probe, second_node, stop_at, &relay).await;
    let resumed_at = wait_fresh_arrival(&work, &tally, moved_at, &relay).await;
    let pause1 = longest_pause(&tally, stop_at, resumed_at);
    let (_, charged, dead, _) = row_counts(&env, &HashSet::new()).await;
    assert_eq!(
        (charged, dead),
        (0, 0),
        "rows were charged or dead-lettered after node {first_node} stopped\n{}",
        relay.log_tail(60)
    );
    let restart_at = Instant::now();
    down.start().await;
    let restarted_in = restart_at.elapsed();
    wait_flowing(&tally, 300, &relay).await;

    // -- 2. Two nodes down: the quorum queue has no majority -----------------
    let m = relay.metrics().await;
    let relay_node =
        connected_node(&m).unwrap_or_else(|| panic!("not connected to one node:\n{m}"));
    assert_ne!(
        relay_node, CONSUMER_NODE,
        "the relay should still be on node {second_node}"
    );
    let other_node = *RELAY_NODES
        .iter()
        .find(|n| **n != relay_node && **n != CONSUMER_NODE)
        .unwrap();
    let loss_at = Instant::now();
    let down_other = cluster.take_down(other_node, Outage::Kill).await;
    let down_relay = cluster.take_down(relay_node, Outage::Kill).await;
    let lost_at = Instant::now();
    let (third_node, _) = wait_connected_elsewhere(&relay, Some(relay_node)).await;
    assert_eq!(third_node, CONSUMER_NODE, "only node {CONSUMER_NODE} is up");
    let moved2_at = probe
        .first_on(third_node, loss_at)
        .unwrap_or_else(Instant::now);
    // The outage lasts this long whatever happens meanwhile (not a wait for a condition).
    tokio::time::sleep_until((lost_at + MAJORITY_LOSS).into()).await;
    let during = work.committed_between(lost_at, Instant::now());
    let (pending_during, charged, dead, confirmed_during) = row_counts(&env, &during).await;
    let arrived_during = during
        .iter()
        .filter(|m| tally.first_arrival(m).is_some())
        .count();
    let m = relay.metrics().await;
    let ready_during = relay.get("/readyz").await.map(|(s, _)| s).ok();
    assert!(
        matches!(relay.get("/healthz").await, Ok((200, _))),
        "/healthz not 200 while the queue has no majority"
    );
    assert_eq!(
        (charged, dead),
        (0, 0),
        "rows were charged or dead-lettered while the quorum queue had no majority\n{}",
        relay.log_tail(80)
    );
    assert_eq!(
        confirmed_during,
        0,
        "{confirmed_during} of {} rows committed while the queue had no majority were marked \
         published: nothing can have confirmed them\n{}",
        during.len(),
        relay.log_tail(80)
    );
    assert!(
        pending_during >= during.len(),
        "pending {pending_during} < {} rows written during the majority loss",
        during.len()
    );
    let confirm_timeouts = relay.log_count("no confirm");
    let publish_failures = metric_value(&m, "outbox_relay_publish_failures_total").unwrap_or(0.0);

    let restore_at = Instant::now();
    down_other.start().await;
    let majority_at = Instant::now();
    let now_on = connected_node(&relay.metrics().await).unwrap_or(third_node);
    let (_, published2_at) = wait_publishing_on(&probe, now_on, restore_at, &relay).await;
    let resumed2_at = wait_fresh_arrival(&work, &tally, lost_at, &relay).await;
    down_relay.start().await;
    let caught_up = tally.wait_all(&during, RECOVERY_TIMEOUT).await.map(|_| {
        tally
            .caught_up_after(&during, majority_at)
            .unwrap_or_default()
    });

    // -- The verdict ------------------------------------------------------------
    let (log, seqs) = stop_application_after_300_more(work).await;
    let figures = verify_delivery(&env, &tally, &log, &relay).await;
    assert_per_key_order(&tally, &seqs);
    let m = relay.metrics().await;
    let connections: Vec<String> = NODES
        .iter()
        .map(|n| {
            format!(
                "node {n}: {}",
                node_metric(&m, "broker_connections_total", *n).unwrap_or(0.0)
            )
        })
        .collect();
    for n in [second_node, third_node] {
        assert!(
            node_metric(&m, "broker_connections_total", n).unwrap_or(0.0) > 0.0,
            "no connection to node {n} counted: {connections:?}"
        );
    }
    let status = env.cli(&["status", "--json"], SETUP_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{}", status.describe());
    let status: serde_json::Value = serde_json::from_str(&status.stdout).expect("status JSON");
    let shown = status["relays"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["instance"] == instance.as_str()))
        .and_then(|r| r["broker_node"].as_str())
        .map(str::to_string);
    let now_on = connected_node(&m);
    assert_eq!(
        shown,
        now_on.map(Cluster::addr),
        "`status` shows another node than the metrics"
    );

    report_figures(
        TEST,
        &[
            format!("quorum queue, relay given nodes 1,2,3, consumer on node {CONSUMER_NODE}"),
            format!(
                "stop 1 (node {first_node}, whole VM; rabbitmqctl stop took {}): relay on node \
                 {second_node} {} after the stop began, publishing there (confirmed) {} after; \
                 first row written after the switch delivered {} after the stop began; longest \
                 pause between new deliveries {}; node {first_node} back in {}",
                secs(stopped_at - stop_at),
                secs(moved_at.saturating_duration_since(stop_at)),
                secs(published_at.saturating_duration_since(stop_at)),
                secs(resumed_at.saturating_duration_since(stop_at)),
                secs(pause1),
                secs(restarted_in),
            ),
            format!(
                "stop 2 (nodes {other_node} and {relay_node} killed, the queue without a majority \
                 for {}): relay connected to node {third_node} {} after the kills; rows written \
                 meanwhile: {} (pending {pending_during}, confirmed {confirmed_during}, \
                 delivered {arrived_during}, charged 0, dead-lettered 0); /readyz {:?}; \
                 'no confirm' log lines {confirm_timeouts}; publish_failures_total {publish_failures}",
                secs(MAJORITY_LOSS),
                secs(moved2_at.saturating_duration_since(loss_at)),
                during.len(),
                ready_during,
            ),
            format!(
                "stop 2 resume: node {other_node} back (majority again) {} after its start began; \
                 publishing confirmed again {} after the start began; first row written during the \
                 loss delivered {} after the start began; all {} of them {} after the majority was back",
                secs(majority_at - restore_at),
                secs(published2_at.saturating_duration_since(restore_at)),
                secs(resumed2_at.saturating_duration_since(restore_at)),
                during.len(),
                caught_up.map_or("never".to_string(), secs),
            ),
            format!(
                "lost={} duplicates={} (of received={}, committed={}, broker redeliveries={}) \
                 charged={} dead-lettered=0; connections by node: {}",
                figures.lost,
                figures.duplicates,
                figures.received,
                figures.committed,
                figures.broker_redeliveries,
                figures.charged,
                connections.join(", ")
            ),
        ],
    );
}

// ---------------------------------------------------------------------------
// Quorum vs classic: drain rate and delivery lag, same run
// ---------------------------------------------------------------------------

/// Rows of the backlog each round drains.
const BACKLOG: i64 = 20_000;
/// Rows of the steady phase of each round (the application's own pace).
const STEADY_ROWS: usize = 3_000;
/// The rounds, each on a fresh queue of its kind; the order cancels drift.
const ROUNDS: [QueueKind; 4] = [
    QueueKind::Quorum,
    QueueKind::Classic,
    QueueKind::Classic,
    QueueKind::Quorum,
];

/// Delivery lags (created_at to first arrival) of `ids`, in seconds.
fn lags(ids: &HashSet<String>, created: &HashMap<String, SystemTime>, tally: &Tally) -> Vec<f64> {
    let mut first: HashMap<String, SystemTime> = HashMap::new();
    for a in tally.snapshot() {
        first.entry(a.message_id.clone()).or_insert(a.at_wall);
    }
    ids.iter()
        .filter_map(|m| {
            let at = first.get(m)?;
            let c = created.get(m)?;
            Some(at.duration_since(*c).unwrap_or_default().as_secs_f64())
        })
        .collect()
}

/// p50 and p99 of `values`.
fn p50_p99(values: &[f64]) -> (f64, f64) {
    let mut v = values.to_vec();
    (
        quantile(&mut v, 0.50).unwrap_or(f64::NAN),
        quantile(&mut v, 0.99).unwrap_or(f64::NAN),
    )
}

/// What the rounds of one queue kind measured.
#[derive(Default)]
struct KindFigures {
    drain_rates: Vec<f64>,
    backlog_lags: Vec<f64>,
    steady_lags: Vec<f64>,
    duplicates: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_quorum_vs_classic_drain_rate_and_lag() {
    const TEST: &str = "cluster_quorum_vs_classic";
    let Some(_cluster) = cluster_or_skip(TEST).await else {
        return;
    };
    let env = TestEnv::on_cluster(TEST, CONSUMER_NODE).await;
    let relay = start_relay(&env).await;
    let mut lines = vec![format!(
        "{} build of the relay, on node {} (given 1,2,3); queues declared and consumed on node {CONSUMER_NODE}; \
         per round a backlog of {BACKLOG} rows, then {STEADY_ROWS} rows at the application's \
         pace; rounds {:?}",
        // The relay binary is built with the test's profile.
        if cfg!(debug_assertions) { "debug (unoptimized)" } else { "release" },
        wait_connected_elsewhere(&relay, None).await.0,
        ROUNDS.map(QueueKind::name)
    )];
    let mut by_kind: HashMap<&str, KindFigures> = HashMap::new();
    for kind in ROUNDS {
        let (exchange, routing_key, tally) =
            bound_queue_read_on_consumer_node(&env, kind.name(), kind).await;

        // Drain: a backlog committed at once, published as fast as it goes.
        let sql = format!(
            "INSERT INTO {} (exchange, routing_key, partition_key, payload, content_type)
             SELECT $1, $2, 'k' || (g % 8), convert_to(repeat('x', 200) || g::text, 'UTF8'),
                    'text/plain'
             FROM generate_series(1, $3::bigint) g
             RETURNING message_id",
            env.table()
        );
        let backlog: HashSet<String> = {
            let pg = env.pg.lock().await;
            pg.query(&sql, &[&exchange, &routing_key, &BACKLOG])
                .await
                .expect("insert the backlog")
                .iter()
                .map(|r| r.get::<_, uuid::Uuid>(0).to_string())
                .collect()
        };
        let drained = tally
            .wait_all(&backlog, Duration::from_secs(150))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "{} of {BACKLOG} backlog rows did not reach the {} queue\n{}",
                    tally.missing(&backlog).len(),
                    kind.name(),
                    relay.log_tail(60)
                )
            });
        let drain_rate = BACKLOG as f64 / drained.as_secs_f64();

        // Steady: the application's pace, lag per row.
        let work = start_application(&env, &exchange, &routing_key);
        work.wait_more(STEADY_ROWS, RECOVERY_TIMEOUT).await;
        let (log, _) = work.stop().await;
        let steady = message_ids(&log.committed);
        tally
            .wait_all(&steady, RECOVERY_TIMEOUT)
            .await
            .unwrap_or_else(|| {
                panic!(
                    "{} of {} steady rows did not reach the {} queue\n{}",
                    tally.missing(&steady).len(),
                    steady.len(),
                    kind.name(),
                    relay.log_tail(60)
                )
            });
        let steady_secs = {
            let first = log.committed.first().map(|w| w.committed_at);
            let last = log.committed.last().map(|w| w.committed_at);
            match (first, last) {
                (Some(a), Some(b)) => (b - a).as_secs_f64(),
                _ => f64::NAN,
            }
        };

        let created: HashMap<String, SystemTime> = env
            .rows()
            .await
            .into_iter()
            .map(|r| (r.message_id.to_string(), r.created_at))
            .collect();
        let backlog_lags = lags(&backlog, &created, &tally);
        let steady_lags = lags(&steady, &created, &tally);
        let (b50, b99) = p50_p99(&backlog_lags);
        let (s50, s99) = p50_p99(&steady_lags);
        let duplicates = tally.len() - tally.distinct();
        lines.push(format!(
            "round, {:7} queue: drained {BACKLOG} rows in {} = {drain_rate:.0} msg/s (backlog \
             lag p50 {b50:.2} s, p99 {b99:.2} s); steady {} rows over {steady_secs:.1} s: lag \
             p50 {:.0} ms, p99 {:.0} ms; duplicates {duplicates}",
            kind.name(),
            secs(drained),
            steady.len(),
            s50 * 1000.0,
            s99 * 1000.0,
        ));
        let k = by_kind.entry(kind.name()).or_default();
        k.drain_rates.push(drain_rate);
        k.backlog_lags.extend(backlog_lags);
        k.steady_lags.extend(steady_lags);
        k.duplicates += duplicates;
        tally.stop().await;
    }
    for kind in [QueueKind::Quorum, QueueKind::Classic] {
        let k = &by_kind[kind.name()];
        let mean = k.drain_rates.iter().sum::<f64>() / k.drain_rates.len() as f64;
        let (b50, b99) = p50_p99(&k.backlog_lags);
        let (s50, s99) = p50_p99(&k.steady_lags);
        lines.push(format!(
            "SUMMARY {:7} queue: drain rate {mean:.0} msg/s (rounds: {}); delivery lag at the \
             application's pace p50 {:.0} ms, p99 {:.0} ms; backlog lag p50 {b50:.2} s, p99 \
             {b99:.2} s; duplicates {}",
            kind.name(),
            k.drain_rates
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            s50 * 1000.0,
            s99 * 1000.0,
            k.duplicates
        ));
    }
    let (pending, charged, dead, _) = row_counts(&env, &HashSet::new()).await;
    assert_eq!((charged, dead), (0, 0), "rows charged or dead-lettered");
    let marked = wait_until(RECOVERY_TIMEOUT, async || env.pending_count().await == 0).await;
    assert!(
        marked,
        "{pending} rows still pending after every one arrived"
    );
    report_figures(TEST, &lines);
}

// ---------------------------------------------------------------------------
// A classic queue whose node stops
// ---------------------------------------------------------------------------

/// How long the classic queue's node stays down.
const QUEUE_NODE_OUTAGE: Duration = Duration::from_secs(15);

/// A classic queue lives on one node. While that node is down RabbitMQ
/// returns every publish to it as unroutable (312 NO_ROUTE), which the relay
/// cannot tell from a missing binding: it charges the rows an attempt and
/// retries them with backoff (after max-attempts, 10 by default, about 9 to
/// 17 minutes, it would dead-letter them). Nothing is lost and order holds;
/// the charged rows are reported, not asserted (README, "RabbitMQ cluster").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_classic_queue_node_down_loses_nothing() {
    const TEST: &str = "cluster_classic_queue_node_down";
    const QUEUE_NODE: u8 = 2;
    let Some(cluster) = cluster_or_skip(TEST).await else {
        return;
    };
    // The queue lives on node 2 (declared there); the relay publishes to
    // node 1; the consumer reads through node 3.
    let env = TestEnv::on_cluster(TEST, QUEUE_NODE).await;
    let (exchange, routing_key, tally) =
        bound_queue_read_on_consumer_node(&env, "events", QueueKind::Classic).await;
    let relay = start_relay(&env).await;
    let (relay_node, _) = wait_connected_elsewhere(&relay, None).await;
    assert_ne!(relay_node, QUEUE_NODE);
    let work = start_application(&env, &exchange, &routing_key);
    wait_flowing(&tally, 300, &relay).await;

    let stop_at = Instant::now();
    let down = cluster.take_down(QUEUE_NODE, Outage::Stop).await;
    let stopped_at = Instant::now();
    // The outage lasts this long (not a wait for a condition).
    tokio::time::sleep_until((stopped_at + QUEUE_NODE_OUTAGE).into()).await;
    let during = work.committed_between(stopped_at, Instant::now());
    let (pending_during, charged_during, dead, published_during) = row_counts(&env, &during).await;
    assert_eq!(
        dead, 0,
        "rows dead-lettered during a {QUEUE_NODE_OUTAGE:?} outage"
    );
    assert_eq!(
        published_during, 0,
        "rows written while the queue's node was down were marked published"
    );
    let reasons: HashSet<String> = env
        .rows()
        .await
        .iter()
        .filter_map(|r| r.last_error.as_deref())
        .map(|e| match e.split_once("outbox row ") {
            Some((a, b)) => format!(
                "{a}outbox row N{}",
                b.trim_start_matches(|c: char| c.is_ascii_digit())
            ),
            None => e.to_string(),
        })
        .collect();

    let restart_at = Instant::now();
    down.start().await;
    let resumed_at = wait_fresh_arrival(&work, &tally, stopped_at, &relay).await;
    let (log, seqs) = stop_application_after_300_more(work).await;
    let committed = message_ids(&log.committed);
    // Charged rows wait out their backoff (seconds to about a minute here).
    let all_in = tally.wait_all(&committed, Duration::from_secs(150)).await;
    assert!(
        all_in.is_some(),
        "LOST: {} of {} committed rows never arrived\n{}",
        tally.missing(&committed).len(),
        committed.len(),
        relay.log_tail(60)
    );
    let marked = wait_until(RECOVERY_TIMEOUT, async || env.pending_count().await == 0).await;
    assert!(marked, "rows still pending after all arrived");
    let rows = env.rows().await;
    let keyed: HashMap<String, (Option<String>, i64)> = rows
        .iter()
        .map(|r| (r.message_id.to_string(), (r.partition_key.clone(), r.id)))
        .collect();
    let arrivals = tally.snapshot();
    let violations = order_violations(arrivals.iter().map(|a| Some(a.message_id.as_str())), &keyed);
    assert!(violations.is_empty(), "ORDER: {violations:#?}");
    assert_per_key_order(&tally, &seqs);
    let dead = rows.iter().filter(|r| r.dead_lettered_at.is_some()).count();
    assert_eq!(dead, 0, "rows dead-lettered");
    let charged = rows.iter().filter(|r| r.attempts > 0).count();
    let max_attempts = rows.iter().map(|r| r.attempts).max().unwrap_or(0);
    let duplicates = tally.len() - tally.distinct();

    report_figures(
        TEST,
        &[
            format!(
                "classic queue on node {QUEUE_NODE}, relay on node {relay_node}, node {QUEUE_NODE} \
                 stopped for {} (rabbitmqctl stop took {})",
                secs(QUEUE_NODE_OUTAGE),
                secs(stopped_at - stop_at)
            ),
            format!(
                "during the outage: {} rows written, pending {pending_during}, charged \
                 {charged_during} (returned as unroutable: {reasons:?})",
                during.len()
            ),
            format!(
                "first row written during the outage delivered {} after the node's start began",
                secs(resumed_at.saturating_duration_since(restart_at))
            ),
            format!(
                "lost=0 duplicates={duplicates} committed={} charged={charged} (max attempts \
                 {max_attempts}) dead-lettered=0",
                committed.len()
            ),
        ],
    );
}

// ---------------------------------------------------------------------------
// A hung node: connections stay open, nothing answers
// ---------------------------------------------------------------------------

/// How long a node may stay frozen: its peers declare a network partition
/// after 45 to 75 s of silence (net_ticktime 60 s), which this cluster
/// (partition handling `ignore`) would not heal by itself.
const FREEZE_LIMIT: Duration = Duration::from_secs(42);

/// The relay's node hangs (SIGSTOP: no FIN, no RST, no answer). The relay
/// leaves it once confirms stop coming (its 30 s confirm timeout) for the
/// next node given, and nothing is lost or charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_hung_node_is_left_for_the_next_one() {
    const TEST: &str = "cluster_hung_node";
    let Some(cluster) = cluster_or_skip(TEST).await else {
        return;
    };
    let env = TestEnv::on_cluster(TEST, CONSUMER_NODE).await;
    let (exchange, routing_key, tally) =
        bound_queue_read_on_consumer_node(&env, "events", QueueKind::Quorum).await;
    let relay = start_relay(&env).await;
    let (first_node, _) = wait_connected_elsewhere(&relay, None).await;
    assert_eq!(first_node, RELAY_NODES[0]);
    let work = start_application(&env, &exchange, &routing_key);
    wait_flowing(&tally, 300, &relay).await;

    let probe = NodeProbe::start(&relay);
    let freeze_at = Instant::now();
    let frozen = cluster.take_down(first_node, Outage::Freeze).await;
    let next = RELAY_NODES[1];
    // Thawed at the limit whether or not the relay has moved by then.
    let left = wait_until(
        FREEZE_LIMIT.saturating_sub(freeze_at.elapsed()),
        async || probe.first_on(next, freeze_at).is_some(),
    )
    .await;
    let thaw_at = Instant::now();
    frozen.start().await;
    assert!(
        left,
        "the relay was still not on node {next} {} after node {first_node} froze\n{}",
        secs(thaw_at - freeze_at),
        relay.log_tail(40)
    );
    let (moved_at, published_at) = wait_publishing_on(&probe, next, freeze_at, &relay).await;
    let resumed_at = wait_fresh_arrival(&work, &tally, moved_at, &relay).await;
    let pause = longest_pause(&tally, freeze_at, resumed_at);
    let (log, seqs) = stop_application_after_300_more(work).await;
    let figures = verify_delivery(&env, &tally, &log, &relay).await;
    assert_per_key_order(&tally, &seqs);
    let why = relay.log_lines_with(&["no confirm", "took no publish", "lost the RabbitMQ"], 4);
    // The frozen node is a member again (or the next test's start heals it).
    let healthy = cluster.heal().await;

    report_figures(
        TEST,
        &[
            format!(
                "node {first_node} (the relay's) frozen with SIGSTOP for {}: relay on node {next} \
                 {} after the freeze, publishing there (confirmed) {} after; first row written \
                 after the switch delivered {} after the freeze; longest pause between new \
                 deliveries {}; cluster healthy after the thaw: {healthy}",
                secs(thaw_at - freeze_at),
                secs(moved_at.saturating_duration_since(freeze_at)),
                secs(published_at.saturating_duration_since(freeze_at)),
                secs(resumed_at.saturating_duration_since(freeze_at)),
                secs(pause),
            ),
            format!("why the relay left: {}", why.replace('\n', " | ")),
            format!(
                "lost={} duplicates={} (of received={}, committed={}) charged={} dead-lettered=0",
                figures.lost,
                figures.duplicates,
                figures.received,
                figures.committed,
                figures.charged
            ),
        ],
    );
}

// ---------------------------------------------------------------------------
// Starting while the first node is down
// ---------------------------------------------------------------------------

/// A relay started while the first node given is down connects to the next
/// one, and stays there when the first comes back (no fail-back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_relay_started_while_the_first_node_is_down_uses_the_next() {
    const TEST: &str = "cluster_first_node_down_at_start";
    let Some(cluster) = cluster_or_skip(TEST).await else {
        return;
    };
    let env = TestEnv::on_cluster(TEST, CONSUMER_NODE).await;
    let (exchange, routing_key, tally) =
        bound_queue_read_on_consumer_node(&env, "events", QueueKind::Quorum).await;
    let first = RELAY_NODES[0];
    let down = cluster.take_down(first, Outage::Kill).await;

    let started_at = Instant::now();
    let relay = start_relay(&env).await;
    let (node, _) = wait_connected_elsewhere(&relay, None).await;
    let ready_in = started_at.elapsed();
    assert_eq!(
        node, RELAY_NODES[1],
        "node {first} is down: the next one given"
    );
    assert!(
        relay.log_count("trying the next") >= 1,
        "the relay did not say it skipped node {first}\n{}",
        relay.log_tail(20)
    );
    let work = start_application(&env, &exchange, &routing_key);
    wait_flowing(&tally, 300, &relay).await;

    down.start().await;
    // Rows keep flowing after node 1 is back, and through node 2 still.
    wait_flowing(&tally, 300, &relay).await;
    let m = relay.metrics().await;
    assert_eq!(
        connected_node(&m),
        Some(RELAY_NODES[1]),
        "the relay moved although its node stayed up"
    );
    let (log, seqs) = work.stop().await;
    let figures = verify_delivery(&env, &tally, &log, &relay).await;
    assert_per_key_order(&tally, &seqs);
    assert_eq!(
        node_metric(&m, "broker_connections_total", first),
        Some(0.0),
        "a connection to the node that was down is counted"
    );
    report_figures(
        TEST,
        &[
            format!(
                "node {first} down at start: relay ready on node {node} {} after it was started; \
                 still on node {node} after node {first} came back",
                secs(ready_in)
            ),
            figures.line(),
        ],
    );
}
