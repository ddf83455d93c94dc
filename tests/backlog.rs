//! A backlog drains at the same cost whatever the table has been through
//! (README: "Performance"; docs/ARCHITECTURE.md: "The claim floor"). Marking a
//! row leaves a dead entry in the pending index until VACUUM removes it, and
//! a snapshot held anywhere stops VACUUM: the claim starts from a floor past
//! the rows already relayed instead of walking them. These tests hold such a
//! snapshot and show what the floor saves, and that it never skips a row: a
//! dead letter retried below it, a row whose transaction commits late, rows
//! replayed below it in order.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use outbox_test_kit::*;
use tokio_postgres::Client;

/// The relay logs each move of its floor at debug level: the tests read it.
const LOG: (&str, &str) = ("OUTBOX_LOG", "info,outbox_relay=debug");
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// The relay's housekeeping connection sweeps (looks for due rows from the
/// start of the table, below the floor too) this often; what it finds below
/// the floor arrives within a few of these.
const SWEEP: Duration = Duration::from_secs(5);

async fn start_relay(env: &TestEnv) -> Relay {
    Launch::new().env(LOG.0, LOG.1).start(env).await
}

/// The relay's claim floor as last logged (0 before it first moved).
fn logged_floor(relay: &Relay) -> i64 {
    relay
        .logs()
        .lines()
        .filter(|l| l.contains("claim floor moved"))
        .filter_map(|l| {
            let at = l.find(" floor=")? + " floor=".len();
            let digits: String = l[at..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .next_back()
        .unwrap_or(0)
}

/// A connection holding a REPEATABLE READ snapshot: VACUUM (and the index's
/// kill hints) can remove no dead entry for as long as it lives.
async fn hold_snapshot(env: &TestEnv) -> Client {
    let client = env.connect_db().await;
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .await
        .expect("hold a snapshot");
    client
}

/// Index entries read by scans of the pending index so far, once the
/// statistics every backend reports (asynchronously, about once a second
/// when idle) have settled: the idle relay's heartbeat still looks for due
/// rows from its floor every second (a few entries each), so settled means
/// fewer than QUIET_READS new entries over 2.5 s.
async fn settled_pending_reads(env: &TestEnv) -> i64 {
    const QUIET_READS: i64 = 1_000;
    let sql = format!(
        "SELECT coalesce(sum(idx_tup_read), 0)::bigint FROM pg_stat_user_indexes
          WHERE schemaname = '{}' AND indexrelname = 'messages_pending'",
        env.schema
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = env.scalar_i64(&sql).await;
    let mut stable_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = env.scalar_i64(&sql).await;
        if now - last >= QUIET_READS {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= Duration::from_millis(2500) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "index statistics never settled (last {last})"
        );
    }
}

/// Inserts `n` rows to `queue` in one transaction and waits until they arrived.
async fn relay_round(env: &TestEnv, collector: &Collector, queue: &str, n: usize, tag: &str) {
    let rows: Vec<NewRow> = (0..n)
        .map(|i| NewRow::to_queue(queue, format!("{tag}-{i}")))
        .collect();
    let inserted = env.insert_committed(&rows).await;
    collector
        .wait_for_ids(&ids_of(&inserted), ARRIVAL_TIMEOUT)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_skip_the_relayed_prefix_while_a_snapshot_is_held() {
    const PREFIX: i64 = 30_000;
    const ROUNDS: usize = 40;
    let env = TestEnv::new("backlog_prefix").await;
    let queue = env.declare_queue("events").await;
    let collector = env.consume(&queue, AckMode::Auto).await;
    let _snapshot = hold_snapshot(&env).await;
    let mut relay = start_relay(&env).await;

    let prefix = env.insert_bulk(&queue, PREFIX, 100).await;
    collector
        .wait_for_ids(&ids_of(&prefix), Duration::from_secs(300))
        .await;
    let last_of_prefix = prefix.iter().map(|r| r.id).max().unwrap_or(0);

    // A few rounds let the probes catch up with the end of the prefix.
    for round in 0..20 {
        if logged_floor(&relay) > last_of_prefix {
            break;
        }
        relay_round(&env, &collector, &queue, 10, &format!("warm{round}")).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Rounds of a few rows, each waited for: each needs at least one claim.
    let before = settled_pending_reads(&env).await;
    let started = Instant::now();
    for round in 0..ROUNDS {
        relay_round(&env, &collector, &queue, 10, &format!("r{round}")).await;
    }
    let elapsed = started.elapsed();
    let read = settled_pending_reads(&env).await - before;

    // Without a floor every claim walks the prefix: at least PREFIX entries
    // per round. With it a claim reads a few entries; what still walks the
    // prefix is periodic: the housekeeping connection's sweep and the backlog statistics (counted
    // entries and the oldest pending row), each at most every 5 s.
    let windows = elapsed.as_secs_f64() / 5.0;
    let periodic = ((windows.ceil() + 2.0) * 3.0 * PREFIX as f64) as i64;
    let budget = ROUNDS as i64 * PREFIX / 3 + periodic;
    eprintln!("{ROUNDS} rounds: {read} pending-index entries read in {elapsed:?}, budget {budget}");
    assert!(
        read <= budget,
        "{ROUNDS} rounds of 10 rows read {read} entries of the pending index in {elapsed:?} \
         (budget {budget}; {PREFIX} dead entries lie below the floor {})\n{}",
        logged_floor(&relay),
        relay.log_tail(30)
    );
    assert!(
        logged_floor(&relay) > last_of_prefix,
        "the floor ({}) never passed the relayed prefix (last id {last_of_prefix})\n{}",
        logged_floor(&relay),
        relay.log_tail(30)
    );
    relay.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_retried_below_the_floor_is_delivered() {
    let env = TestEnv::new("backlog_retry").await;
    let queue = env.declare_queue("events").await;
    let collector = env.consume(&queue, AckMode::Auto).await;
    let _snapshot = hold_snapshot(&env).await;

    // A row parked before the relay ever saw it, then many rows after it.
    let dead = env
        .insert_committed(&[NewRow::to_queue(&queue, "parked")])
        .await[0];
    env.exec(
        &format!(
            "UPDATE {} SET dead_lettered_at = now(), last_error = 'parked by the test' WHERE id = $1",
            env.table()
        ),
        &[&dead.id],
    )
    .await;
    let mut relay = start_relay(&env).await;
    let after = env.insert_bulk(&queue, 3_000, 0).await;
    collector
        .wait_for_ids(&ids_of(&after), ARRIVAL_TIMEOUT)
        .await;
    let moved = wait_until(Duration::from_secs(60), async || {
        relay_round(&env, &collector, &queue, 5, "nudge").await;
        logged_floor(&relay) > dead.id
    })
    .await;
    assert!(
        moved,
        "the floor never passed the parked row {}\n{}",
        dead.id,
        relay.log_tail(30)
    );
    assert!(
        !collector
            .distinct_ids()
            .contains(&dead.message_id.to_string()),
        "a parked row was published"
    );

    let out = env
        .cli(
            &["dead-letters", "retry", "--id", &dead.id.to_string()],
            CLI_TIMEOUT,
        )
        .await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    // Found by a sweep; nothing else needs to happen meanwhile.
    collector.wait_for_ids(&ids_of(&[dead]), SWEEP * 6).await;
    relay.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_id_committed_late_is_never_skipped() {
    let env = TestEnv::new("backlog_late").await;
    let queue = env.declare_queue("events").await;
    let collector = env.consume(&queue, AckMode::Auto).await;
    let _snapshot = hold_snapshot(&env).await;
    let mut relay = start_relay(&env).await;
    let moved = wait_until(Duration::from_secs(60), async || {
        relay_round(&env, &collector, &queue, 5, "before").await;
        logged_floor(&relay) > 0
    })
    .await;
    assert!(moved, "the floor never moved\n{}", relay.log_tail(30));

    // A transaction takes an id, then stays open while later rows are
    // relayed and the relay's probes run again and again.
    let mut open_client = env.connect_db().await;
    let open_tx = open_client.transaction().await.expect("begin");
    let late = insert_row(&open_tx, &env.schema, &NewRow::to_queue(&queue, "late")).await;
    let later = env.insert_bulk(&queue, 2_000, 0).await;
    collector
        .wait_for_ids(&ids_of(&later), ARRIVAL_TIMEOUT)
        .await;
    for round in 0..10 {
        relay_round(&env, &collector, &queue, 5, &format!("while-open{round}")).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let floor = logged_floor(&relay);
    assert!(
        floor <= late.id,
        "the floor ({floor}) passed row {} of a transaction still open\n{}",
        late.id,
        relay.log_tail(30)
    );

    open_tx.commit().await.expect("commit the late row");
    // Nothing else is written: the relay finds it by itself (notification,
    // heartbeat poll, or at the latest a sweep).
    collector.wait_for_ids(&ids_of(&[late]), SWEEP * 6).await;
    relay.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_replayed_below_the_floor_arrive_in_order_per_key() {
    let env = TestEnv::new("backlog_replay").await;
    let queue = env.declare_queue("events").await;
    let collector = env.consume(&queue, AckMode::Auto).await;
    let _snapshot = hold_snapshot(&env).await;
    let mut relay = start_relay(&env).await;

    // Rows of three keys, interleaved, in one transaction (consecutive ids).
    let keyed: Vec<NewRow> = (0..30)
        .map(|i| NewRow::to_queue(&queue, format!("keyed-{i}")).key(&format!("key-{}", i % 3)))
        .collect();
    let keyed = env.insert_committed(&keyed).await;
    collector
        .wait_for_ids(&ids_of(&keyed), ARRIVAL_TIMEOUT)
        .await;
    let after = env.insert_bulk(&queue, 3_000, 0).await;
    collector
        .wait_for_ids(&ids_of(&after), ARRIVAL_TIMEOUT)
        .await;
    let last_keyed = keyed.iter().map(|r| r.id).max().unwrap_or(0);
    let first_keyed = keyed.iter().map(|r| r.id).min().unwrap_or(0);
    let moved = wait_until(Duration::from_secs(60), async || {
        relay_round(&env, &collector, &queue, 5, "nudge").await;
        logged_floor(&relay) > last_keyed
    })
    .await;
    assert!(
        moved,
        "the floor never passed the keyed rows\n{}",
        relay.log_tail(30)
    );

    // Replayed while new rows of the same keys keep coming above the floor.
    let arrived_before = collector.len();
    let out = env
        .cli(
            &[
                "replay",
                "--from-id",
                &first_keyed.to_string(),
                "--to-id",
                &last_keyed.to_string(),
            ],
            CLI_TIMEOUT,
        )
        .await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let newer: Vec<NewRow> = (0..9)
        .map(|i| NewRow::to_queue(&queue, format!("newer-{i}")).key(&format!("key-{}", i % 3)))
        .collect();
    let newer = env.insert_committed(&newer).await;
    collector
        .wait_for_ids(&ids_of(&newer), ARRIVAL_TIMEOUT)
        .await;
    let replayed: HashSet<String> = ids_of(&keyed);
    let all_again = wait_until(SWEEP * 6, async || {
        let again: HashSet<String> = collector.snapshot()[arrived_before..]
            .iter()
            .filter_map(|r| r.message_id.clone())
            .filter(|id| replayed.contains(id))
            .collect();
        again.len() == replayed.len()
    })
    .await;
    assert!(all_again, "the replayed rows did not all arrive again");

    // Among themselves, the replayed rows arrive in id order per key.
    let rows: HashMap<String, (Option<String>, i64)> = keyed
        .iter()
        .enumerate()
        .map(|(i, r)| {
            (
                r.message_id.to_string(),
                (Some(format!("key-{}", i % 3)), r.id),
            )
        })
        .collect();
    let arrived = collector.snapshot();
    let violations = order_violations(
        arrived[arrived_before..]
            .iter()
            .map(|r| r.message_id.as_deref()),
        &rows,
    );
    assert!(violations.is_empty(), "{violations:#?}");
    relay.assert_running();
}
