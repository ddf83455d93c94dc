//! Applications notify exactly when some live relay waits (migrations 3 and
//! 6): not for a relay killed or frozen while it waited, again once a frozen
//! relay runs on; an update of the flag that failed is never taken as done;
//! the heartbeat and the flag's update take their locks in one order.
//!
//! Whether an insert notified is read without racing the database: after
//! the insert commits, the test sends its own NOTIFY (a fence) on the same
//! channel; notifications arrive in commit order, so everything the insert
//! sent arrived before the fence.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use outbox_test_kit::*;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

/// The relay's lease ttl (src/leases.rs): a relay whose heartbeat is older
/// is not alive.
const LEASE_TTL: &str = "5 seconds";

/// A LISTEN on the outbox's channel, collecting the payloads that arrive.
struct Listener {
    client: tokio_postgres::Client,
    channel: String,
    payloads: mpsc::UnboundedReceiver<String>,
    driver: tokio::task::JoinHandle<()>,
    fences: usize,
}

impl Listener {
    async fn start(env: &TestEnv) -> Listener {
        let (client, mut connection) = tokio_postgres::connect(&env.db_url, NoTls)
            .await
            .expect("listener connection");
        let (tx, payloads) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            while let Some(Ok(message)) =
                std::future::poll_fn(|cx| connection.poll_message(cx)).await
            {
                if let AsyncMessage::Notification(n) = message {
                    let _ = tx.send(n.payload().to_string());
                }
            }
        });
        let channel = format!("{}.messages", env.schema);
        client
            .batch_execute(&format!("LISTEN \"{channel}\""))
            .await
            .expect("LISTEN");
        Listener {
            client,
            channel,
            payloads,
            driver,
            fences: 0,
        }
    }

    /// Sends a fence and returns every payload that arrived before it: what
    /// transactions committed before now sent.
    async fn until_fence(&mut self) -> Vec<String> {
        self.fences += 1;
        let fence = format!("fence {}", self.fences);
        self.client
            .batch_execute(&format!("NOTIFY \"{}\", '{fence}'", self.channel))
            .await
            .expect("NOTIFY the fence");
        let mut before = Vec::new();
        loop {
            let payload = tokio::time::timeout(SETUP_TIMEOUT, self.payloads.recv())
                .await
                .expect("the fence's notification never arrived")
                .expect("listener ended");
            if payload == fence {
                return before;
            }
            before.push(payload);
        }
    }

    /// Whether an insert that committed before now sent a NOTIFY.
    async fn insert_notified(&mut self) -> bool {
        // The trigger sends an empty payload; fences say "fence N".
        self.until_fence().await.iter().any(|p| p.is_empty())
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// The relay's row says it waits for a NOTIFY, and its last heartbeat is at
/// most `fresh` old.
async fn waits_and_lives(env: &TestEnv, instance: &str, fresh: &str) -> bool {
    let pg = env.pg.lock().await;
    pg.query_opt(
        &format!(
            "SELECT idle AND heartbeat_at > now() - interval '{fresh}'
               FROM \"{}\".relays WHERE instance = $1",
            env.schema
        ),
        &[&instance],
    )
    .await
    .expect("the relay's row")
    .is_some_and(|r| r.get::<_, bool>(0))
}

/// No relay of the schema is alive: every heartbeat is older than the ttl
/// (the test the heartbeat itself uses for live relays and their leases).
async fn no_relay_lives(env: &TestEnv) -> bool {
    env.scalar_i64(&format!(
        "SELECT count(*) FROM \"{}\".relays WHERE heartbeat_at > now() - interval '{LEASE_TTL}'",
        env.schema
    ))
    .await
        == 0
}

/// A relay that drained its rows and waits for a NOTIFY, proven by an
/// insert that notified and was published.
async fn waiting_relay(env: &TestEnv, queue: &str, collector: &Collector) -> (Relay, Listener) {
    let mut relay = Launch::new().start(env).await;
    relay
        .wait_for(
            ARRIVAL_TIMEOUT,
            "the relay never flagged itself idle",
            async || waits_and_lives(env, &relay.instance, "3 seconds").await,
        )
        .await;
    let mut listener = Listener::start(env).await;
    let rows = env
        .insert_committed(&[NewRow::to_queue(queue, "while the relay waits")])
        .await;
    assert!(
        listener.insert_notified().await,
        "an insert while a live relay waits sent no NOTIFY\n{}",
        relay.log_tail(100)
    );
    collector.wait_for_rows(&rows).await;
    relay
        .wait_for(
            ARRIVAL_TIMEOUT,
            "the relay did not wait again",
            async || waits_and_lives(env, &relay.instance, "3 seconds").await,
        )
        .await;
    relay.assert_running();
    (relay, listener)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applications_stop_notifying_once_an_idle_relay_is_killed() {
    let env = TestEnv::new("idle_killed").await;
    let queue = env.declare_queue("idle").await;
    let collector = env.consume(&queue, AckMode::Auto).await;
    let (mut relay, mut listener) = waiting_relay(&env, &queue, &collector).await;

    relay.kill();
    // Its last heartbeat is older than the lease ttl (about 5 s after the kill).
    let gone = wait_until(ARRIVAL_TIMEOUT, async || no_relay_lives(&env).await).await;
    assert!(gone, "the killed relay's heartbeat stayed fresh");
    env.insert_committed(&[NewRow::to_queue(&queue, "nobody waits")])
        .await;
    assert!(
        !listener.insert_notified().await,
        "an insert sent a NOTIFY although the only relay was killed and its lease expired"
    );
    // Still so a while later (nothing cleans up, nothing needs to).
    env.insert_committed(&[NewRow::to_queue(&queue, "nobody waits, later")])
        .await;
    assert!(!listener.insert_notified().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_frozen_past_its_lease_is_not_notified_then_waits_again() {
    let env = TestEnv::new("idle_frozen").await;
    let queue = env.declare_queue("idle").await;
    let collector = env.consume(&queue, AckMode::Auto).await;
    let (mut relay, mut listener) = waiting_relay(&env, &queue, &collector).await;

    relay.signal("STOP");
    let lapsed = wait_until(ARRIVAL_TIMEOUT, async || no_relay_lives(&env).await).await;
    if !lapsed {
        relay.signal("CONT");
    }
    assert!(lapsed, "the frozen relay's heartbeat stayed fresh");
    let frozen = env
        .insert_committed(&[NewRow::to_queue(&queue, "while the relay is frozen")])
        .await;
    let notified = listener.insert_notified().await;
    relay.signal("CONT");
    assert!(
        !notified,
        "an insert sent a NOTIFY although the only relay was frozen past its lease"
    );

    // Running again: it publishes what came meanwhile, waits again, and is
    // woken again.
    collector.wait_for_rows(&frozen).await;
    relay
        .wait_for(
            ARRIVAL_TIMEOUT,
            "the relay did not wait again after it was continued",
            async || waits_and_lives(&env, &relay.instance, "2 seconds").await,
        )
        .await;
    let after = env
        .insert_committed(&[NewRow::to_queue(&queue, "after the freeze")])
        .await;
    assert!(
        listener.insert_notified().await,
        "the relay waits again but an insert sent no NOTIFY\n{}",
        relay.log_tail(100)
    );
    collector.wait_for_rows(&after).await;
    relay.assert_running();
}

/// relay_set_idle fails (here: replaced by one that raises) while the relay
/// goes idle. The relay must not take the flag as set: once the function
/// works again, the database says the relay waits, and inserts wake it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_idle_update_is_said_again_until_the_database_takes_it() {
    let env = TestEnv::new("idle_failed_update").await;
    let s = &env.schema;
    let queue = env.declare_queue("idle").await;
    let collector = env.consume(&queue, AckMode::Auto).await;
    let signature = format!("\"{s}\".relay_set_idle(text, boolean)");
    let definition: String = {
        let pg = env.pg.lock().await;
        pg.query_one(
            "SELECT pg_get_functiondef($1::text::regprocedure)",
            &[&signature],
        )
        .await
        .expect("relay_set_idle's definition")
        .get(0)
    };
    env.exec(
        &format!(
            "CREATE OR REPLACE FUNCTION \"{s}\".relay_set_idle(p_instance text, p_idle boolean)
             RETURNS void LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'relay_set_idle refused by the test'; END $$"
        ),
        &[],
    )
    .await;
    let mut relay = Launch::new().start(&env).await;
    relay
        .wait_for(
            ARRIVAL_TIMEOUT,
            "the relay never tried to flag itself idle",
            async || relay.logs().contains("relay_set_idle refused by the test"),
        )
        .await;
    env.exec(&definition, &[]).await;

    relay
        .wait_for(
            ARRIVAL_TIMEOUT,
            "relay_set_idle works again, but the relay never said again that it waits",
            async || waits_and_lives(&env, &relay.instance, "3 seconds").await,
        )
        .await;
    let mut listener = Listener::start(&env).await;
    let rows = env
        .insert_committed(&[NewRow::to_queue(&queue, "after the failure")])
        .await;
    assert!(listener.insert_notified().await, "{}", relay.log_tail(100));
    collector.wait_for_rows(&rows).await;
    relay.assert_running();
}

/// A heartbeat and a relay's idle update at the same moment: both take the
/// advisory lock before any row, so neither waits for the other while
/// holding what the other needs (migration 3's heartbeat took its own row
/// first, then the lock when it removed a relay gone for good: a deadlock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_and_idle_update_take_their_locks_in_one_order() {
    let env = TestEnv::new("idle_lock_order").await;
    let s = env.schema.clone();
    env.exec(
        &format!(
            "INSERT INTO \"{s}\".relays (instance, heartbeat_at, idle)
             VALUES ('gone', now() - interval '1 hour', true)"
        ),
        &[],
    )
    .await;
    let mut flagger = env.connect_db().await;
    let beater = env.connect_db().await;
    let beater_pid: i32 = beater
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);

    // Another relay's idle update holds the advisory lock until it commits.
    let tx = flagger.transaction().await.expect("begin");
    tx.execute(&format!("SELECT \"{s}\".relay_set_idle('b', true)"), &[])
        .await
        .expect("relay b flags itself idle");
    let beat_sql = format!("SELECT * FROM \"{s}\".relay_heartbeat('a', interval '5 s', NULL)");
    let beat = tokio::spawn(async move { beater.query(&beat_sql, &[]).await.map(|_| ()) });
    let blocked = wait_until(SETUP_TIMEOUT, async || {
        env.scalar_i64(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {beater_pid} AND wait_event_type = 'Lock'"
        ))
        .await
            == 1
    })
    .await;
    assert!(blocked, "the heartbeat did not wait for the advisory lock");
    // Relay a's own idle update, in the same transaction: the lock is held,
    // its row is what the heartbeat would have taken first.
    let own = tokio::time::timeout(
        SETUP_TIMEOUT,
        tx.execute(&format!("SELECT \"{s}\".relay_set_idle('a', true)"), &[]),
    )
    .await
    .expect("relay a's idle update waited past the bound");
    if let Err(e) = &own {
        panic!("relay a's idle update failed (a deadlock?): {e:?}");
    }
    tx.commit().await.expect("commit the idle updates");
    let beat = tokio::time::timeout(SETUP_TIMEOUT, beat)
        .await
        .expect("the heartbeat never finished")
        .expect("heartbeat task");
    assert!(beat.is_ok(), "the heartbeat failed (a deadlock?): {beat:?}");
    let idle = env
        .scalar_i64(&format!(
            "SELECT count(*) FROM \"{s}\".relays WHERE instance IN ('a', 'b') AND idle"
        ))
        .await;
    assert_eq!(idle, 2, "both idle updates stand");
}
