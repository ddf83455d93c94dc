//! The fault suite: the README's "Guarantees and how they are kept" under
//! crashes and outages.
//!
//! Every `fault_` test keeps an application writing (committed and rolled-back
//! transactions, several partition keys) while something breaks, and ends with
//! the same verdict (`verify_delivery`): every committed row delivered at least
//! once and marked published, no rolled-back row delivered, first arrivals in
//! id order per partition key, no row charged or dead-lettered by the fault.
//! Each prints `published=N received=M duplicates=D lost=0` and how long the
//! relay took to recover.
//!
//! Outages are faked with a TCP proxy between the relay and the shared service
//! (other tests use the same RabbitMQ and PostgreSQL), except two real
//! restarts: a private PostgreSQL instance, and the shared broker exactly once
//! (`fault_rabbitmq_restart_...`). nextest runs `fault_` tests one at a time
//! (test group `serial-faults` in .config/nextest.toml).
//!
//! The tests without a `fault_` prefix check that bad rows are parked while the
//! rows around them flow; they break nothing shared and run in parallel.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use lapin::ExchangeKind;
use outbox_test_kit::faults::*;
use outbox_test_kit::private_pg::PrivatePostgres;
use outbox_test_kit::proxy::FaultProxy;
use outbox_test_kit::*;
use rand::Rng;
use serde_json::json;

/// How long an outage lasts.
const OUTAGE: Duration = Duration::from_secs(3);
/// How long the relay may take to notice an outage and report it on /readyz.
const NOTICE: Duration = Duration::from_secs(15);
/// How long the relay may take to be ready and caught up after a fault ends.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(90);

async fn wait_flowing(tally: &Tally, n: usize, relay: &Relay) {
    let ok = wait_until(RECOVERY_TIMEOUT, async || tally.distinct() >= n).await;
    assert!(
        ok,
        "only {} messages arrived before the fault\n{}",
        tally.distinct(),
        relay.log_tail(60)
    );
}

// ---------------------------------------------------------------------------
// The relay process dies
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_relay_kill9_at_random_moments_loses_nothing() {
    let env = TestEnv::new("fault_kill9").await;
    let queue = env.declare_queue("events").await;
    let tally = Tally::start(&env.amqp_url, &queue).await;
    // A backlog first, so the first kill lands while batches are large and
    // many confirms are in flight.
    env.insert_bulk(&queue, 10_000, APP_KEYS as i64).await;
    let work = Workload::start(&env.db_url, &env.schema, &queue);
    let launch = Launch::new();
    let mut relay = launch.start(&env).await;

    let kills = rand::rng().random_range(3..=5);
    let mut restarts: Vec<Instant> = Vec::new();
    let mut kill_notes = Vec::new();
    for k in 0..kills {
        // Let this instance publish (it first waits for the dead one's leases
        // to lapse), then kill it at a random moment.
        let seen = tally.len();
        let ok = wait_until(RECOVERY_TIMEOUT, async || tally.len() > seen + 50).await;
        assert!(
            ok,
            "relay #{k} published nothing within {RECOVERY_TIMEOUT:?}\n{}",
            relay.log_tail(60)
        );
        let delay = Duration::from_millis(rand::rng().random_range(0..1500));
        tokio::time::sleep(delay).await;
        relay.assert_running();
        let status = relay.kill();
        let marked = env.published_count().await;
        kill_notes.push(format!(
            "kill {k}: {} after it published, status {status:?}, {} received, {marked} marked",
            ms(delay),
            tally.len()
        ));
        restarts.push(Instant::now());
        relay = launch.start(&env).await;
    }
    work.wait_more(300, RECOVERY_TIMEOUT).await;
    let log = work.stop().await;
    let figures = verify_delivery(&env, &tally, &log, &relay).await;
    relay.assert_running();

    for (k, r) in restarts.iter().enumerate() {
        let before = log
            .committed
            .iter()
            .filter(|w| w.committed_at < *r)
            .map(|w| w.message_id.to_string())
            .collect::<HashSet<_>>();
        println!(
            "{}; restart {k}: first new message {} after, rows committed before it all delivered {} after",
            kill_notes[k],
            tally.first_new_after(*r).map_or("-".into(), ms),
            tally.caught_up_after(&before, *r).map_or("-".into(), ms),
        );
    }
    println!("fault_relay_kill9: {kills} kills; {}", figures.line());
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_crash_between_confirm_and_mark() {
    let env = TestEnv::new("fault_confirm_mark").await;
    let queue = env.declare_queue("events").await;
    let tally = Tally::start(&env.amqp_url, &queue).await;
    env.insert_bulk(&queue, 3000, APP_KEYS as i64).await;
    let work = Workload::start(&env.db_url, &env.schema, &queue);

    // The fourth non-empty mark panics: the broker has confirmed those rows,
    // the database never hears of it. The panic aborts the process. (The
    // application keeps writing, so marks keep coming however they are batched.)
    let crashing = Launch::new().env("FAILPOINTS", "before_mark_published=3*off->panic");
    let mut relay = crashing.spawn(&env);
    let died = wait_until(RECOVERY_TIMEOUT, async || relay.has_exited()).await;
    assert!(
        died,
        "the failpoint did not stop the relay within {RECOVERY_TIMEOUT:?}"
    );
    let status = relay.try_exit_status().unwrap();
    assert!(!status.success(), "relay exited cleanly: {status:?}");
    assert!(
        relay
            .logs()
            .contains("failpoint before_mark_published panic"),
        "the relay died, but not at the failpoint"
    );
    let marked_at_crash: HashSet<String> = env.published_message_ids().await;
    let received_at_crash = tally.distinct();

    let restart = Instant::now();
    let relay2 = Launch::new().start(&env).await;
    let backlog = work.committed_before(restart);
    tally.wait_all(&backlog, RECOVERY_TIMEOUT).await;
    let caught_up = tally.caught_up_after(&backlog, restart);
    work.wait_more(300, RECOVERY_TIMEOUT).await;
    let log = work.stop().await;
    let figures = verify_delivery(&env, &tally, &log, &relay2).await;

    assert!(
        figures.duplicates > 0,
        "no message arrived twice: the crash did not fall between a confirm and its mark"
    );
    let wrongly_repeated: Vec<&String> = figures
        .repeated_ids
        .iter()
        .filter(|m| marked_at_crash.contains(*m))
        .collect();
    assert!(
        wrongly_repeated.is_empty(),
        "{} rows marked published before the crash were published again, e.g. {:?}",
        wrongly_repeated.len(),
        &wrongly_repeated[..wrongly_repeated.len().min(5)]
    );
    println!(
        "fault_crash_between_confirm_and_mark: died with {status:?}; at the crash {} rows marked, {} received; \
         rows written before the restart all delivered {} after it; {}",
        marked_at_crash.len(),
        received_at_crash,
        caught_up.map_or("-".into(), ms),
        figures.line()
    );
}

// ---------------------------------------------------------------------------
// The broker goes away
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_broker_connection_cut_and_refused_loses_nothing() {
    let env = TestEnv::new("fault_broker_cut").await;
    let queue = env.declare_queue("events").await;
    let tally = Tally::start(&env.amqp_url, &queue).await;
    let proxy = FaultProxy::start(url_addr(&env.amqp_url, 5672)).await;
    let launch = Launch::new().amqp_url(&url_via(&env.amqp_url, proxy.port()));
    let mut relay = launch.start(&env).await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    let work = Workload::start(&env.db_url, &env.schema, &queue);
    wait_flowing(&tally, 300, &relay).await;

    let cut_at = Instant::now();
    proxy.go_down();
    let (noticed, body) = relay
        .wait_status("/readyz", 503, NOTICE)
        .await
        .unwrap_or_else(|| {
            panic!(
                "/readyz still not 503 {NOTICE:?} after the broker went away\n{}",
                relay.log_tail(40)
            )
        });
    assert!(
        body.contains("RabbitMQ"),
        "/readyz 503 body does not name the broker: {body:?}"
    );
    tokio::time::sleep_until((cut_at + OUTAGE).into()).await;
    relay.assert_running();
    assert!(
        matches!(relay.get("/healthz").await, Ok((200, _))),
        "/healthz not 200 during the outage"
    );
    let refused = proxy.refused();
    assert!(
        refused > 0,
        "the relay did not try to reconnect during the outage\n{}",
        relay.log_tail(40)
    );

    let back_at = Instant::now();
    proxy.come_back();
    let (ready_after, _) = relay
        .wait_status("/readyz", 200, RECOVERY_TIMEOUT)
        .await
        .unwrap_or_else(|| {
            panic!(
                "not ready {RECOVERY_TIMEOUT:?} after the broker came back\n{}",
                relay.log_tail(60)
            )
        });
    let backlog = work.committed_before(back_at);
    tally.wait_all(&backlog, RECOVERY_TIMEOUT).await;
    let caught_up = tally.caught_up_after(&backlog, back_at);
    work.wait_more(300, RECOVERY_TIMEOUT).await;
    let log = work.stop().await;
    let figures = verify_delivery(&env, &tally, &log, &relay).await;
    relay.assert_running();
    println!(
        "fault_broker_connection_cut_and_refused: /readyz 503 {} after the cut ({}), {refused} reconnects refused; \
         ready {} after the broker came back, backlog delivered {} after; {}",
        ms(noticed),
        body.trim(),
        ms(ready_after),
        caught_up.map_or("-".into(), ms),
        figures.line()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_broker_stalled_then_resumed() {
    const STALL: Duration = Duration::from_secs(5);
    let env = TestEnv::new("fault_broker_stall").await;
    let queue = env.declare_queue("events").await;
    let tally = Tally::start(&env.amqp_url, &queue).await;
    let proxy = FaultProxy::start(url_addr(&env.amqp_url, 5672)).await;
    let launch = Launch::new().amqp_url(&url_via(&env.amqp_url, proxy.port()));
    let mut relay = launch.start(&env).await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    let work = Workload::start(&env.db_url, &env.schema, &queue);
    wait_flowing(&tally, 300, &relay).await;
    let probe = ReadinessProbe::start(&relay);
    let connections = proxy.accepted();

    let stall_at = Instant::now();
    proxy.stall(true);
    // Nothing the relay sent after this can have been confirmed; what arrives
    // now was already in the broker.
    tokio::time::sleep_until((stall_at + STALL).into()).await;
    relay.assert_running();
    assert!(
        matches!(relay.get("/healthz").await, Ok((200, _))),
        "/healthz not 200 during the stall"
    );
    let during = tally.distinct();

    let back_at = Instant::now();
    proxy.stall(false);
    let backlog = work.committed_before(back_at);
    tally.wait_all(&backlog, RECOVERY_TIMEOUT).await;
    let caught_up = tally.caught_up_after(&backlog, back_at);
    work.wait_more(300, RECOVERY_TIMEOUT).await;
    let log = work.stop().await;
    let figures = verify_delivery(&env, &tally, &log, &relay).await;
    relay.assert_running();
    println!(
        "fault_broker_stalled_then_resumed: stalled {}; /readyz during the stall: {}; {} delivered by the end of the stall; \
         relay opened {} new broker connections; backlog delivered {} after the stall ended; {}",
        ms(STALL),
        probe.summary(stall_at, back_at),
        during,
        proxy.accepted() - connections,
        caught_up.map_or("-".into(), ms),
        figures.line()
    );
}

/// The relay's broker connection hangs for good (no byte moves, nothing is
/// closed: a half-dead TCP connection) while new connections work: the relay
/// must give up on it (confirm timeout) and publish on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_broker_connection_blackholed_is_replaced() {
    let env = TestEnv::new("fault_broker_blackhole").await;
    let queue = env.declare_queue("events").await;
    let tally = Tally::start(&env.amqp_url, &queue).await;
    let proxy = FaultProxy::start(url_addr(&env.amqp_url, 5672)).await;
    let launch = Launch::new().amqp_url(&url_via(&env.amqp_url, proxy.port()));
    let mut relay = launch.start(&env).await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    let work = Workload::start(&env.db_url, &env.schema, &queue);
    wait_flowing(&tally, 300, &relay).await;
    let probe = ReadinessProbe::start(&relay);

    let hole_at = Instant::now();
    let connections = proxy.accepted();
    proxy.blackhole_existing();
    let replaced = wait_until(RECOVERY_TIMEOUT, async || proxy.accepted() > connections).await;
    assert!(
        replaced,
        "the relay kept waiting on a hung broker connection for {RECOVERY_TIMEOUT:?}"
    );
    let replaced_after = hole_at.elapsed();
    let backlog = work.committed_before(Instant::now());
    let delivered = tally.wait_all(&backlog, RECOVERY_TIMEOUT).await;
    assert!(
        delivered.is_some(),
        "rows written before the new connection did not arrive within {RECOVERY_TIMEOUT:?} of it"
    );
    relay.assert_running();
    let caught_up = tally.caught_up_after(&backlog, hole_at);
    let healthz_during = probe.summary(hole_at, hole_at + replaced_after);
    work.wait_more(300, RECOVERY_TIMEOUT).await;
    let log = work.stop().await;
    let figures = verify_delivery(&env, &tally, &log, &relay).await;
    relay.assert_running();
    println!(
        "fault_broker_connection_blackholed: new broker connection {} after the old one hung; /readyz meanwhile: {}; \
         rows written until then delivered {} after the hang began; {}",
        ms(replaced_after),
        healthz_during,
        caught_up.map_or("-".into(), ms),
        figures.line()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_rabbitmq_restart_stop_app_start_app() {
    let env = TestEnv::new("fault_rabbitmq_restart").await;
    let queue = env.declare_queue("events").await;
    let tally = Tally::start(&env.amqp_url, &queue).await;
    let mut relay = Launch::new().start(&env).await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    let work = Workload::start(&env.db_url, &env.schema, &queue);
    wait_flowing(&tally, 300, &relay).await;

    let stop_at = Instant::now();
    let mut broker =
        tokio::task::block_in_place(|| BrokerStopped::stop_app(Duration::from_secs(120)));
    let stopped_in = stop_at.elapsed();
    let (noticed, body) = relay
        .wait_status("/readyz", 503, NOTICE)
        .await
        .unwrap_or_else(|| {
            panic!(
                "/readyz still not 503 {NOTICE:?} after stop_app\n{}",
                relay.log_tail(40)
            )
        });
    tokio::time::sleep_until((stop_at + stopped_in + OUTAGE).into()).await;
    relay.assert_running();
    assert!(
        matches!(relay.get("/healthz").await, Ok((200, _))),
        "/healthz not 200 while the broker is down"
    );

    let probe = ReadinessProbe::start(&relay);
    let start_at = Instant::now();
    tokio::task::block_in_place(|| broker.start());
    let back_at = Instant::now();
    relay
        .wait_status("/readyz", 200, RECOVERY_TIMEOUT)
        .await
        .unwrap_or_else(|| {
            panic!(
                "not ready {RECOVERY_TIMEOUT:?} after start_app\n{}",
                relay.log_tail(60)
            )
        });
    let ready_at = probe.first(200, start_at).unwrap_or_else(Instant::now);
    let backlog = work.committed_before(start_at);
    tally.wait_all(&backlog, RECOVERY_TIMEOUT).await;
    let caught_up = tally.caught_up_after(&backlog, start_at);
    work.wait_more(300, RECOVERY_TIMEOUT).await;
    let log = work.stop().await;
    let figures = verify_delivery(&env, &tally, &log, &relay).await;
    relay.assert_running();
    assert!(
        tally.sessions() > 1,
        "the consumer never reconnected: was the broker really stopped?"
    );
    println!(
        "fault_rabbitmq_restart: stop_app took {}, /readyz 503 {} after ({}); start_app+await_startup took {}; \
         relay ready {} after start_app began, rows written before it delivered {} after it began; {}",
        ms(stopped_in),
        ms(noticed),
        body.trim(),
        ms(back_at - start_at),
        ms(ready_at.saturating_duration_since(start_at)),
        caught_up.map_or("-".into(), ms),
        figures.line()
    );
}

// ---------------------------------------------------------------------------
// The database goes away
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_database_connection_cut_loses_nothing() {
    // A long poll interval: rows written during the outage must not wait for it.
    const POLL: &str = "30s";
    let env = TestEnv::new("fault_db_cut").await;
    let queue = env.declare_queue("events").await;
    let tally = Tally::start(&env.amqp_url, &queue).await;
    let proxy = FaultProxy::start(url_addr(&env.db_url, 5432)).await;
    let launch = Launch::new()
        .db_url(&url_via(&env.db_url, proxy.port()))
        .args(&["--poll-interval", POLL]);
    let mut relay = launch.start(&env).await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    // The application writes to the database directly: only the relay's
    // connections go through the proxy.
    let work = Workload::start(&env.db_url, &env.schema, &queue);
    wait_flowing(&tally, 300, &relay).await;

    let cut_at = Instant::now();
    proxy.go_down();
    let (noticed, body) = relay
        .wait_status("/readyz", 503, NOTICE)
        .await
        .unwrap_or_else(|| {
            panic!(
                "/readyz still not 503 {NOTICE:?} after the database went away\n{}",
                relay.log_tail(40)
            )
        });
    assert!(
        body.contains("PostgreSQL"),
        "/readyz 503 body does not name the database: {body:?}"
    );
    tokio::time::sleep_until((cut_at + OUTAGE).into()).await;
    relay.assert_running();
    assert!(
        matches!(relay.get("/healthz").await, Ok((200, _))),
        "/healthz not 200 during the outage"
    );
    let refused = proxy.refused();

    let back_at = Instant::now();
    proxy.come_back();
    let (ready_after, _) = relay
        .wait_status("/readyz", 200, RECOVERY_TIMEOUT)
        .await
        .unwrap_or_else(|| {
            panic!(
                "not ready {RECOVERY_TIMEOUT:?} after the database came back\n{}",
                relay.log_tail(60)
            )
        });
    let during_outage = work.committed_between(cut_at, back_at);
    assert!(
        !during_outage.is_empty(),
        "the application wrote nothing during the outage"
    );
    tally.wait_all(&during_outage, RECOVERY_TIMEOUT).await;
    let outage_rows_after = tally.caught_up_after(&during_outage, back_at);
    let backlog = work.committed_before(back_at);
    let caught_up = tally.caught_up_after(&backlog, back_at);
    work.wait_more(300, RECOVERY_TIMEOUT).await;
    let log = work.stop().await;
    let figures = verify_delivery(&env, &tally, &log, &relay).await;
    relay.assert_running();
    println!(
        "fault_database_connection_cut: /readyz 503 {} after the cut ({}), {refused} reconnects refused; \
         ready {} after the database came back; the {} rows written during the outage delivered {} after, \
         whole backlog {} after; {}",
        ms(noticed),
        body.trim(),
        ms(ready_after),
        during_outage.len(),
        outage_rows_after.map_or("-".into(), ms),
        caught_up.map_or("-".into(), ms),
        figures.line()
    );
    // Promptly: well before the next fallback poll (30 s). Reconnecting takes
    // the relay's backoff (at most about twice the outage here) plus a beat.
    let outage_rows_after = outage_rows_after.unwrap();
    assert!(
        outage_rows_after <= ready_after + Duration::from_secs(8),
        "rows written during the outage arrived {} after the database came back (ready after {}): \
         they waited for a poll, not for the reconnect\n{}",
        ms(outage_rows_after),
        ms(ready_after),
        relay.log_tail(40)
    );
}

/// The relay's database connections hang for good (nothing answers, nothing
/// is closed) while new connections work: the relay must give up on them
/// (statement and heartbeat timeouts) and go on with new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_database_connection_blackholed_is_replaced() {
    let env = TestEnv::new("fault_db_blackhole").await;
    let queue = env.declare_queue("events").await;
    let tally = Tally::start(&env.amqp_url, &queue).await;
    let proxy = FaultProxy::start(url_addr(&env.db_url, 5432)).await;
    let launch = Launch::new().db_url(&url_via(&env.db_url, proxy.port()));
    let mut relay = launch.start(&env).await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    let work = Workload::start(&env.db_url, &env.schema, &queue);
    wait_flowing(&tally, 300, &relay).await;
    let probe = ReadinessProbe::start(&relay);

    let hole_at = Instant::now();
    proxy.blackhole_existing();
    // Rows written after the hang began arrive only through new connections.
    work.wait_more(50, RECOVERY_TIMEOUT).await;
    let after_hole = work.committed_between(hole_at, Instant::now());
    let delivered = tally
        .wait_all(&after_hole, RECOVERY_TIMEOUT + Duration::from_secs(30))
        .await;
    assert!(
        delivered.is_some(),
        "rows written after the database connections hung did not arrive within {:?} \
         ({} new database connections)",
        RECOVERY_TIMEOUT + Duration::from_secs(30),
        proxy.accepted()
    );
    relay.assert_running();
    let recovered_after = tally.caught_up_after(&after_hole, hole_at).unwrap();
    let backlog = work.committed_before(hole_at + recovered_after);
    tally.wait_all(&backlog, RECOVERY_TIMEOUT).await;
    let readiness = probe.summary(hole_at, hole_at + recovered_after);
    work.wait_more(300, RECOVERY_TIMEOUT).await;
    let log = work.stop().await;
    let figures = verify_delivery(&env, &tally, &log, &relay).await;
    relay.assert_running();
    println!(
        "fault_database_connection_blackholed: rows written after the hang delivered {} after it began; \
         /readyz meanwhile: {readiness}; {}",
        ms(recovered_after),
        figures.line()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_database_restart_private_instance() {
    let pg = tokio::task::block_in_place(PrivatePostgres::start);
    let env = TestEnv::new_on_database("fault_db_restart", &pg.url()).await;
    let queue = env.declare_queue("events").await;
    let tally = Tally::start(&env.amqp_url, &queue).await;
    let mut relay = Launch::new().start(&env).await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    let work = Workload::start(&env.db_url, &env.schema, &queue);
    wait_flowing(&tally, 300, &relay).await;
    let probe = ReadinessProbe::start(&relay);

    let mut notes = Vec::new();
    for mode in ["fast", "immediate"] {
        let restart_at = Instant::now();
        tokio::task::block_in_place(|| pg.restart(mode));
        let up_at = Instant::now();
        let (ready_after, _) = relay
            .wait_status("/readyz", 200, RECOVERY_TIMEOUT)
            .await
            .unwrap_or_else(|| {
                panic!(
                    "not ready {RECOVERY_TIMEOUT:?} after restart -m {mode}\n{}",
                    relay.log_tail(60)
                )
            });
        let backlog = work.committed_before(up_at);
        tally.wait_all(&backlog, RECOVERY_TIMEOUT).await;
        relay.assert_running();
        work.wait_more(300, RECOVERY_TIMEOUT).await;
        // Rows the application wrote in the first seconds after the database
        // was back: how long they waited for the relay.
        let early = work.written_between(up_at, up_at + Duration::from_secs(3));
        tally
            .wait_all(
                &early.iter().map(|w| w.message_id.to_string()).collect(),
                RECOVERY_TIMEOUT,
            )
            .await;
        let not_ready_seen = probe.first(503, restart_at).filter(|t| *t <= up_at);
        notes.push(format!(
            "restart -m {mode}: database down {}; /readyz during it: {} ({}); ready {} after the database was up; \
             backlog delivered {} after; rows written in the first 3 s after it waited at most {}",
            ms(up_at - restart_at),
            probe.summary(restart_at, up_at),
            not_ready_seen.map_or("never 503".to_string(), |t| format!("503 {} after the restart began", ms(t - restart_at))),
            ms(ready_after),
            tally.caught_up_after(&backlog, up_at).map_or("-".into(), ms),
            tally.max_latency(&early).map_or("-".into(), ms),
        ));
        println!(
            "fault_database_restart_private_instance: {}",
            notes.last().unwrap()
        );
        if mode == "immediate" {
            assert!(
                not_ready_seen.is_some(),
                "/readyz never answered 503 while the database was down for {} (restart -m immediate): {}\n{}",
                ms(up_at - restart_at),
                probe.summary(restart_at, up_at),
                relay.log_tail(30)
            );
        }
    }
    let log = work.stop().await;
    env.reconnect_db().await;
    let figures = verify_delivery(&env, &tally, &log, &relay).await;
    relay.assert_running();
    println!(
        "fault_database_restart_private_instance: {}; application: {} errors, {} rows of uncertain commit; {}",
        notes.join("; "),
        log.errors.len(),
        log.uncertain.len(),
        figures.line()
    );
    drop(relay);
    drop(env);
    drop(pg);
}

// ---------------------------------------------------------------------------
// Bad rows are parked; the rows around them flow (no service fault)
// ---------------------------------------------------------------------------

/// One row of a bad-row scenario, written in a single transaction in order.
async fn write_in_order(env: &TestEnv, rows: &[NewRow]) -> Vec<Inserted> {
    env.insert_committed(rows).await
}

fn row_of(rows: &[RowState], ins: &Inserted) -> RowState {
    rows.iter()
        .find(|r| r.id == ins.id)
        .cloned()
        .expect("row still in the table")
}

async fn wait_parked(env: &TestEnv, ins: &Inserted, timeout: Duration, relay: &Relay) -> RowState {
    let ok = wait_until(timeout, async || {
        row_of(&env.rows().await, ins).dead_lettered_at.is_some()
    })
    .await;
    let row = row_of(&env.rows().await, ins);
    assert!(
        ok,
        "row {} not dead-lettered within {timeout:?}: {row:?}\n{}",
        ins.id,
        relay.log_tail(60)
    );
    row
}

/// Waits until no row is pending any more (each published or dead-lettered):
/// marks are written lazily, after the consumer may already have the message.
async fn wait_settled(env: &TestEnv, relay: &Relay) {
    let ok = wait_until(ARRIVAL_TIMEOUT, async || env.pending_count().await == 0).await;
    assert!(
        ok,
        "{} rows still pending after {ARRIVAL_TIMEOUT:?}\n{}",
        env.pending_count().await,
        relay.log_tail(40)
    );
}

fn first_arrival(arrivals: &[Received], ins: &Inserted) -> Option<SystemTime> {
    let mid = ins.message_id.to_string();
    arrivals
        .iter()
        .find(|r| r.message_id.as_deref() == Some(mid.as_str()))
        .map(|r| r.at)
}

fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
    unix_secs(b) - unix_secs(a)
}

/// The rows behind a parked row in its partition key arrived only after it
/// was parked; rows of other keys did not wait for it.
fn assert_key_waited(
    what: &str,
    arrivals: &[Received],
    parked: &RowState,
    same_key_behind: &[Inserted],
    other_keys: &[Inserted],
    relay: &Relay,
) {
    let parked_at = parked.dead_lettered_at.unwrap();
    let early: Vec<String> = same_key_behind
        .iter()
        .filter_map(|i| {
            let at = first_arrival(arrivals, i).expect("arrived");
            (at < parked_at).then(|| {
                format!(
                    "id {} arrived {:.3}s before row {} was parked",
                    i.id,
                    secs_between(at, parked_at),
                    parked.id
                )
            })
        })
        .collect();
    assert!(
        early.is_empty(),
        "{what}: rows behind the bad row in its partition key did not wait for it: {early:?}\n\
         (the bad row: {parked:?})\n{}",
        relay.log_lines_with(&["WARN", "dead-letter", "parking"], 20)
    );
    let waited: Vec<u64> = other_keys
        .iter()
        .filter(|i| first_arrival(arrivals, i).expect("arrived") > parked_at)
        .map(|i| i.id as u64)
        .collect();
    assert!(
        waited.is_empty(),
        "{what}: rows of other keys waited for the bad row: ids {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_exchange_row_is_dead_lettered_with_its_reason_others_flow() {
    let (env, queue, collector) =
        TestEnv::with_events_queue("missing_exchange", AckMode::Manual).await;
    let missing = env.unique("no-such-exchange");
    let mut bad = NewRow::to_queue(&queue, "to nowhere").key("A");
    bad.exchange = missing.clone();
    let mut rows = vec![NewRow::to_queue(&queue, "a1").key("A"), bad];
    rows.extend((3..=4).map(|i| NewRow::to_queue(&queue, format!("a{i}")).key("A")));
    rows.extend((1..=5).map(|i| NewRow::to_queue(&queue, format!("b{i}")).key("B")));
    rows.extend((1..=3).map(|i| NewRow::to_queue(&queue, format!("n{i}"))));
    let ins = write_in_order(&env, &rows).await;
    let (bad, behind, others) = (ins[1], &ins[2..4], &ins[4..]);
    let mut good = vec![ins[0]];
    good.extend_from_slice(&ins[2..]);

    let relay = Launch::new()
        .args(&["--max-attempts", "2", "--poll-interval", "200ms"])
        .start(&env)
        .await;
    collector.wait_for_rows(&good).await;
    let parked = wait_parked(&env, &bad, ARRIVAL_TIMEOUT, &relay).await;

    assert_eq!(parked.attempts, 2, "attempts of the parked row: {parked:?}");
    let err = parked.last_error.clone().unwrap_or_default();
    assert!(
        err.contains(&missing),
        "last_error does not name the exchange {missing}: {err:?}"
    );
    assert!(
        parked.published_at.is_none(),
        "a row to a missing exchange was marked published"
    );
    wait_settled(&env, &relay).await;
    let all = env.rows().await;
    for g in &good {
        let r = row_of(&all, g);
        assert!(
            r.published_at.is_some() && r.attempts == 0,
            "good row charged or unpublished: {r:?}"
        );
    }
    let arrivals = collector.snapshot();
    assert!(
        first_arrival(&arrivals, &bad).is_none(),
        "the row to a missing exchange arrived"
    );
    assert_key_waited(
        "missing exchange",
        &arrivals,
        &parked,
        behind,
        others,
        &relay,
    );
    println!(
        "missing exchange: parked after {} attempts: {err}",
        parked.attempts
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_row_is_retried_then_dead_lettered() {
    let (env, queue, collector) = TestEnv::with_events_queue("unroutable", AckMode::Manual).await;
    let unbound = env.declare_exchange("unbound", ExchangeKind::Direct).await;
    let mut bad = NewRow::to_queue("nowhere", "unroutable").key("C");
    bad.exchange = unbound.clone();
    let mut rows = vec![NewRow::to_queue(&queue, "c1").key("C"), bad];
    rows.extend((3..=4).map(|i| NewRow::to_queue(&queue, format!("c{i}")).key("C")));
    rows.extend((1..=5).map(|i| NewRow::to_queue(&queue, format!("d{i}")).key("D")));
    rows.extend((1..=3).map(|i| NewRow::to_queue(&queue, format!("n{i}"))));
    let ins = write_in_order(&env, &rows).await;
    let (bad, behind, others) = (ins[1], &ins[2..4], &ins[4..]);
    let mut good = vec![ins[0]];
    good.extend_from_slice(&ins[2..]);

    let relay = Launch::new()
        .args(&["--max-attempts", "3", "--poll-interval", "200ms"])
        .start(&env)
        .await;
    collector.wait_for_rows(&good).await;
    let parked = wait_parked(&env, &bad, ARRIVAL_TIMEOUT, &relay).await;

    assert_eq!(parked.attempts, 3, "attempts of the parked row: {parked:?}");
    let err = parked.last_error.clone().unwrap_or_default();
    assert!(
        err.to_lowercase().contains("unroutable"),
        "last_error does not say unroutable: {err:?}"
    );
    // Retried with backoff (1 s, then 2 s, each with jitter), not three times at once.
    let took = secs_between(parked.created_at, parked.dead_lettered_at.unwrap());
    assert!(
        took >= 2.5,
        "three attempts within {took:.2}s: no backoff between retries"
    );
    wait_settled(&env, &relay).await;
    let all = env.rows().await;
    for g in &good {
        let r = row_of(&all, g);
        assert!(
            r.published_at.is_some() && r.attempts == 0,
            "good row charged or unpublished: {r:?}"
        );
    }
    let arrivals = collector.snapshot();
    assert!(
        first_arrival(&arrivals, &bad).is_none(),
        "the unroutable row reached the queue"
    );
    assert_key_waited("unroutable", &arrivals, &parked, behind, others, &relay);
    println!(
        "unroutable: parked after {} attempts in {took:.2}s: {err}",
        parked.attempts
    );
}

/// The sharp end of "rows behind a failed row wait for it": an unroutable
/// row that becomes routable on a retry (someone binds the queue) must still
/// reach the consumer before the rows written after it in its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_row_routed_on_a_retry_keeps_its_place_in_key_order() {
    let (env, queue, collector) =
        TestEnv::with_events_queue("unroutable_then_routed", AckMode::Manual).await;
    let exchange = env
        .declare_exchange("bound-later", ExchangeKind::Direct)
        .await;
    let mut bad = NewRow::to_queue("later", "bound later").key("K");
    bad.exchange = exchange.clone();
    let rows = vec![
        NewRow::to_queue(&queue, "k1").key("K"),
        bad,
        NewRow::to_queue(&queue, "k3").key("K"),
        NewRow::to_queue(&queue, "k4").key("K"),
    ];
    let ins = write_in_order(&env, &rows).await;
    let relay = Launch::new()
        .args(&["--poll-interval", "200ms"])
        .start(&env)
        .await;
    let failed = wait_until(ARRIVAL_TIMEOUT, async || {
        row_of(&env.rows().await, &ins[1]).attempts >= 1
    })
    .await;
    assert!(
        failed,
        "the unroutable row was never attempted\n{}",
        relay.log_tail(40)
    );
    env.bind(&queue, &exchange, "later").await;
    collector
        .wait_for_ids(&ids_of(&ins), Duration::from_secs(120))
        .await;
    let arrivals = collector.snapshot();
    let order: Vec<String> = ins
        .iter()
        .map(|i| {
            let at = first_arrival(&arrivals, i).unwrap();
            format!(
                "id {} at +{:.3}s",
                i.id,
                secs_between(first_arrival(&arrivals, &ins[0]).unwrap(), at)
            )
        })
        .collect();
    let mut sorted = ins.clone();
    sorted.sort_by_key(|i| first_arrival(&arrivals, i).unwrap());
    assert_eq!(
        sorted.iter().map(|i| i.id).collect::<Vec<_>>(),
        ins.iter().map(|i| i.id).collect::<Vec<_>>(),
        "key K reached the consumer out of id order: {order:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_key_over_255_bytes_and_headers_not_an_object_are_parked_at_once() {
    let (env, queue, collector) = TestEnv::with_events_queue("invalid_rows", AckMode::Manual).await;
    let long_key = NewRow::to_queue(&"r".repeat(300), "long routing key").key("E");
    let mut not_object = NewRow::to_queue(&queue, "headers are an array").key("F");
    not_object.headers = json!([1, 2]);
    let rows = vec![
        NewRow::to_queue(&queue, "e0").key("E"),
        long_key,
        NewRow::to_queue(&queue, "e2").key("E"),
        NewRow::to_queue(&queue, "f0").key("F"),
        not_object,
        NewRow::to_queue(&queue, "f2").key("F"),
        NewRow::to_queue(&queue, "g1").key("G"),
        NewRow::to_queue(&queue, "n1"),
    ];
    let ins = write_in_order(&env, &rows).await;
    let (long_key, not_object) = (ins[1], ins[4]);
    let good: Vec<Inserted> = ins
        .iter()
        .copied()
        .filter(|i| *i != long_key && *i != not_object)
        .collect();

    // Default max-attempts (10): parked at the first attempt or not at all.
    let relay = Launch::new()
        .args(&["--poll-interval", "200ms"])
        .start(&env)
        .await;
    collector.wait_for_rows(&good).await;
    let a = wait_parked(&env, &long_key, ARRIVAL_TIMEOUT, &relay).await;
    let b = wait_parked(&env, &not_object, ARRIVAL_TIMEOUT, &relay).await;
    for (row, needle) in [(&a, "255"), (&b, "JSON object")] {
        assert_eq!(
            row.attempts, 1,
            "an invalid row was retried before it was parked: {row:?}"
        );
        let err = row.last_error.clone().unwrap_or_default();
        assert!(
            err.contains(needle),
            "last_error of row {} does not say why ({needle}): {err:?}",
            row.id
        );
        assert!(row.published_at.is_none());
    }
    wait_settled(&env, &relay).await;
    let all = env.rows().await;
    for g in &good {
        let r = row_of(&all, g);
        assert!(
            r.published_at.is_some() && r.attempts == 0,
            "good row charged or unpublished: {r:?}"
        );
    }
    let arrivals = collector.snapshot();
    assert!(
        first_arrival(&arrivals, &long_key).is_none()
            && first_arrival(&arrivals, &not_object).is_none()
    );
    println!(
        "invalid rows parked at once: {:?} / {:?}",
        a.last_error.as_deref().unwrap_or(""),
        b.last_error.as_deref().unwrap_or("")
    );
}

/// RabbitMQ's max_message_size is 128 MiB by default and cannot be lowered for
/// one test on a shared broker, so the body is 128 MiB + 1 KiB, built by the
/// database (the test never holds it). The broker closes the channel; the relay
/// must find the culprit and charge only it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_closes_the_channel_but_only_that_row_is_charged() {
    const BIG: i32 = 128 * 1024 * 1024 + 1024;
    let (env, queue, collector) = TestEnv::with_events_queue("oversized", AckMode::Manual).await;
    let mut ins = Vec::new();
    {
        let mut pg = env.pg.lock().await;
        let tx = pg.transaction().await.expect("begin");
        ins.push(insert_row(&tx, &env.schema, &NewRow::to_queue(&queue, "h0").key("H")).await);
        let big = tx
            .query_one(
                &format!(
                    "INSERT INTO {} (routing_key, partition_key, payload)
                     VALUES ($1, 'H', convert_to(repeat('x', $2), 'UTF8')) RETURNING id, message_id",
                    env.table()
                ),
                &[&queue, &BIG],
            )
            .await
            .expect("insert the oversized row");
        ins.push(Inserted {
            id: big.get(0),
            message_id: big.get(1),
        });
        for row in [
            NewRow::to_queue(&queue, "h2").key("H"),
            NewRow::to_queue(&queue, "h3").key("H"),
        ]
        .into_iter()
        .chain((1..=10).map(|i| NewRow::to_queue(&queue, format!("i{i}")).key("I")))
        .chain((1..=3).map(|i| NewRow::to_queue(&queue, format!("n{i}"))))
        {
            ins.push(insert_row(&tx, &env.schema, &row).await);
        }
        tx.commit().await.expect("commit");
    }
    let (big, behind, others) = (ins[1], &ins[2..4], &ins[4..]);
    let mut good = vec![ins[0]];
    good.extend_from_slice(&ins[2..]);

    // max-payload-bytes above the broker's own limit: the broker refuses the
    // row by closing the channel (below it, the relay parks it unread).
    let relay = Launch::new()
        .args(&[
            "--max-attempts",
            "2",
            "--poll-interval",
            "200ms",
            "--max-payload-bytes",
            "268435456",
        ])
        .start(&env)
        .await;
    collector.wait_for_rows(&good).await;
    let parked = wait_parked(&env, &big, Duration::from_secs(180), &relay).await;
    assert_eq!(
        parked.attempts, 2,
        "attempts of the oversized row: {parked:?}"
    );
    let err = parked.last_error.clone().unwrap_or_default();
    assert!(
        err.contains("size"),
        "last_error does not say the body is too large: {err:?}"
    );
    wait_settled(&env, &relay).await;
    let all = env.rows().await;
    let charged: Vec<RowState> = good
        .iter()
        .map(|g| row_of(&all, g))
        .filter(|r| r.attempts > 0 || r.published_at.is_none())
        .collect();
    assert!(
        charged.is_empty(),
        "rows sharing the channel with the oversized one were charged or left unpublished: {charged:#?}"
    );
    let arrivals = collector.snapshot();
    assert!(
        first_arrival(&arrivals, &big).is_none(),
        "the oversized row reached the queue"
    );
    assert_key_waited("oversized body", &arrivals, &parked, behind, others, &relay);
    println!(
        "oversized body: parked after {} attempts: {err}",
        parked.attempts
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_row_does_not_stop_other_keys() {
    let (env, queue, collector) = TestEnv::with_events_queue("one_bad_row", AckMode::Manual).await;
    // The row's exchange appears only later: until then each attempt fails
    // (default max-attempts 10, so it stays pending with growing backoff).
    let late_exchange = env.unique("late-exchange");
    let mut bad = NewRow::to_queue(&queue, "stuck").key("stuck");
    bad.exchange = late_exchange.clone();
    let bad = env.insert_committed(&[bad]).await[0];
    let relay = Launch::new()
        .args(&["--poll-interval", "200ms"])
        .start(&env)
        .await;
    let failed = wait_until(ARRIVAL_TIMEOUT, async || {
        row_of(&env.rows().await, &bad).attempts >= 1
    })
    .await;
    assert!(
        failed,
        "the bad row was never attempted\n{}",
        relay.log_tail(40)
    );

    // Rows behind it in its key, and a stream of rows of ten other keys.
    let followers = env
        .insert_committed(
            &(1..=3)
                .map(|i| NewRow::to_queue(&queue, format!("s{i}")).key("stuck"))
                .collect::<Vec<_>>(),
        )
        .await;
    let mut others = Vec::new();
    for round in 0..10 {
        let batch: Vec<NewRow> = (0..30)
            .map(|i| {
                NewRow::to_queue(&queue, format!("o{round}-{i}")).key(&format!("other{}", i % 10))
            })
            .collect();
        others.extend(env.insert_committed(&batch).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    collector.wait_for_rows(&others).await;
    let state = row_of(&env.rows().await, &bad);
    assert!(
        state.published_at.is_none() && state.dead_lettered_at.is_none() && state.attempts >= 1,
        "the bad row should still be pending and retrying: {state:?}"
    );
    let arrivals = collector.snapshot();
    let jumped: Vec<i64> = followers
        .iter()
        .filter(|f| first_arrival(&arrivals, f).is_some())
        .map(|f| f.id)
        .collect();
    assert!(
        jumped.is_empty(),
        "rows behind the pending bad row in its key were published: {jumped:?}"
    );

    // The exchange appears: the bad row goes at its next retry, then its followers.
    env.declare_exchange_named(&late_exchange, ExchangeKind::Direct)
        .await;
    env.bind(&queue, &late_exchange, &queue).await;
    let mut rest = vec![bad];
    rest.extend_from_slice(&followers);
    collector
        .wait_for_ids(&ids_of(&rest), Duration::from_secs(120))
        .await;
    let arrivals = collector.snapshot();
    let bad_at = first_arrival(&arrivals, &bad).unwrap();
    for f in &followers {
        assert!(
            first_arrival(&arrivals, f).unwrap() > bad_at,
            "follower {} overtook the bad row",
            f.id
        );
    }
    let final_state = row_of(&env.rows().await, &bad);
    println!(
        "one bad row: {} rows of 10 other keys delivered while it retried; it went after {} failed attempts",
        others.len(),
        final_state.attempts
    );
}
