//! A relay that cannot publish hands its work to one that can (README,
//! "Metrics and health" and "Guarantees"), and what a relay that lost a side
//! exports is true or absent.
//!
//! Faults are made with a TCP proxy in front of the shared broker or database
//! for one relay only (`common/proxy.rs`); the shared services are never
//! touched. The test that measures take-over times starts with `scale_` so
//! it runs in the scale-out group, alone.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::time::{Duration, Instant};

use outbox_test_kit::faults::*;
use outbox_test_kit::proxy::FaultProxy;
use outbox_test_kit::*;

const PARTITIONS: usize = 32;
/// README, "Metrics and health": a relay that lost its RabbitMQ connection
/// hands its partitions off within 10 s (5 s grace, then at most 3.5 s until
/// its last lease's fencing deadline, then a replica's next heartbeat, 1 s);
/// a row waits at most this long after a connection reset. 5 s of it are
/// slack for a loaded 2-core machine.
const TAKEOVER_BOUND: Duration = Duration::from_secs(15);
/// README: backlog gauges disappear within 20 s of the last reading when the
/// database goes silent while rows are pending (at once when its connection
/// is reset); 5 s more for polling /metrics on a loaded machine.
const STALE_GAUGE_BOUND: Duration = Duration::from_secs(25);
const WAIT: Duration = Duration::from_secs(90);
const BACKLOG: [&str; 3] = [
    "outbox_relay_pending_messages",
    "outbox_relay_oldest_pending_age_seconds",
    "outbox_relay_dead_lettered_messages",
];

/// Partitions whose lease `instance` holds now (database clock).
async fn owned_by(env: &TestEnv, instance: &str) -> usize {
    env.scalar_i64(&format!(
        "SELECT count(*) FROM \"{}\".leases WHERE owner = '{instance}' AND expires_at > clock_timestamp()",
        env.schema
    ))
    .await as usize
}

async fn gauge(relay: &Relay, name: &str) -> Option<f64> {
    metric_value(&relay.metrics().await, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_a_relay_cut_from_rabbitmq_hands_its_partitions_to_one_that_can() {
    let env = TestEnv::new("handoff_cut").await;
    let queue = env.declare_queue("events").await;
    let tally = Tally::start(&env.amqp_url, &queue).await;
    let proxy = FaultProxy::start(url_addr(&env.amqp_url, 5672)).await;
    let cut_url = url_via(&env.amqp_url, proxy.port());
    let mut a = Launch::new().amqp_url(&cut_url).start(&env).await;
    let mut b = Launch::new().start(&env).await;
    a.wait_ready(WAIT).await;
    b.wait_ready(WAIT).await;
    let shared = wait_until(WAIT, async || {
        owned_by(&env, &a.instance).await == PARTITIONS / 2
            && owned_by(&env, &b.instance).await == PARTITIONS / 2
    })
    .await;
    assert!(shared, "the two relays never split the partitions");
    let work = Workload::start(&env.db_url, &env.schema, &queue);
    work.wait_more(100, WAIT).await;

    // A's broker dies for A alone: connections reset, new ones refused.
    let cut_at = Instant::now();
    proxy.go_down();
    let mut handed_off_after = None;
    let taken = wait_until(WAIT, async || {
        if handed_off_after.is_none() && owned_by(&env, &a.instance).await == 0 {
            handed_off_after = Some(cut_at.elapsed());
        }
        owned_by(&env, &b.instance).await == PARTITIONS
    })
    .await;
    let taken_after = cut_at.elapsed();
    assert!(
        taken,
        "B never took every partition; A holds {}\n{}",
        owned_by(&env, &a.instance).await,
        a.log_tail(40)
    );
    assert!(
        taken_after <= TAKEOVER_BOUND,
        "B held every partition only {taken_after:?} after A's broker connection was cut"
    );

    // While cut, A holds nothing and says so; it is alive and not ready.
    let watch_until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < watch_until {
        assert_eq!(
            owned_by(&env, &a.instance).await,
            0,
            "A took partitions back while cut"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = a.metrics().await;
    assert_eq!(
        metric_value(&m, "outbox_relay_partitions_owned"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "outbox_relay_partitions_handed_off"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "outbox_relay_broker_connected"),
        Some(0.0),
        "{m}"
    );
    let (code, body) = a.get("/readyz").await.expect("/readyz");
    assert!(
        code == 503 && body.contains("RabbitMQ"),
        "/readyz {code} {body}"
    );
    let (code, _) = a.get("/healthz").await.expect("/healthz");
    assert_eq!(code, 200, "a relay cut from the broker is alive");
    work.wait_more(100, WAIT).await;

    // The broker is back for A: it takes its share again.
    let restored_at = Instant::now();
    proxy.come_back();
    let rebalanced = wait_until(WAIT, async || {
        owned_by(&env, &a.instance).await == PARTITIONS / 2
            && owned_by(&env, &b.instance).await == PARTITIONS / 2
    })
    .await;
    let rebalanced_after = restored_at.elapsed();
    assert!(
        rebalanced,
        "A did not take its share back after the broker returned (A {}, B {})\n{}",
        owned_by(&env, &a.instance).await,
        owned_by(&env, &b.instance).await,
        a.log_tail(40)
    );
    assert_eq!(
        gauge(&a, "outbox_relay_partitions_handed_off").await,
        Some(0.0)
    );
    work.wait_more(100, WAIT).await;
    let log = work.stop().await;

    // Every row delivered; none written while A was cut waited past the bound.
    let figures = verify_delivery(&env, &tally, &log, &b).await;
    let during_cut: Vec<Written> = log
        .committed
        .iter()
        .filter(|w| w.committed_at >= cut_at && w.committed_at < restored_at)
        .cloned()
        .collect();
    assert!(
        !during_cut.is_empty(),
        "nothing was written while A was cut"
    );
    let worst = tally.max_latency(&during_cut).expect("every row arrived");
    assert!(
        worst <= TAKEOVER_BOUND,
        "a row written while A was cut waited {worst:?} (bound {TAKEOVER_BOUND:?})"
    );
    a.assert_running();
    b.assert_running();
    println!(
        "scale_a_relay_cut_from_rabbitmq_hands_its_partitions_to_one_that_can: A held 0 partitions {} \
         after the cut, B all 32 {}; worst wait of the {} rows written during the cut {}; \
         split 16/16 again {} after the broker returned; {}",
        handed_off_after.map_or("-".into(), ms),
        ms(taken_after),
        during_cut.len(),
        ms(worst),
        ms(rebalanced_after),
        figures.line()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_cannot_reach_rabbitmq_takes_no_partitions_and_its_rows_wait_for_one_that_can()
{
    let env = TestEnv::new("handoff_never").await;
    let queue = env.declare_queue("events").await;
    let dead = ClosedPort::new();
    let mut a = Launch::new()
        .amqp_url(&url_via(&env.amqp_url, dead.port))
        .start(&env)
        .await;
    let rows = env
        .insert_committed(&[NewRow::to_queue(&queue, "waits").key("k")])
        .await;

    // Alone and unable to publish, it holds nothing (a heartbeat would have
    // taken all 32 within a second), stays alive and says why it is not ready.
    let watch_until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < watch_until {
        assert_eq!(owned_by(&env, &a.instance).await, 0, "{}", a.log_tail(30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = a.metrics().await;
    assert_eq!(
        metric_value(&m, "outbox_relay_partitions_owned"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "outbox_relay_partitions_handed_off"),
        Some(1.0),
        "{m}"
    );
    let (code, body) = a.get("/readyz").await.expect("/readyz");
    assert!(
        code == 503 && body.contains("RabbitMQ"),
        "/readyz {code} {body}"
    );
    assert_eq!(a.get("/healthz").await.expect("/healthz").0, 200);
    assert_eq!(env.pending_count().await, 1, "the row waits");

    // A relay that can publish comes: it takes every partition and the row goes.
    let got = env.consume(&queue, AckMode::Auto).await;
    let mut b = Launch::new().start(&env).await;
    b.wait_ready(WAIT).await;
    got.wait_for_ids(&ids_of(&rows), WAIT).await;
    let all = wait_until(WAIT, async || {
        owned_by(&env, &b.instance).await == PARTITIONS
    })
    .await;
    assert!(
        all,
        "B does not hold every partition; A holds {}",
        owned_by(&env, &a.instance).await
    );
    a.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_lost_its_database_exports_no_backlog_and_owns_no_partitions() {
    let env = TestEnv::new("handoff_db_cut").await;
    let queue = env.declare_queue("events").await;
    let proxy = FaultProxy::start(url_addr(&env.db_url, 5432)).await;
    let db_url = url_via(&env.db_url, proxy.port());
    // Pending all along (due in an hour), so the backlog is read every 5 s.
    let mut later = NewRow::to_queue(&queue, "later");
    later.available_in_secs = Some(3600.0);
    env.insert_committed(&[later]).await;
    let mut relay = Launch::new().db_url(&db_url).start(&env).await;
    relay.wait_ready(WAIT).await;

    let exported = async |relay: &Relay| {
        let m = relay.metrics().await;
        let backlog = BACKLOG.map(|name| has_metric(&m, name));
        (
            backlog,
            metric_value(&m, "outbox_relay_partitions_owned"),
            m,
        )
    };
    let full = async |relay: &Relay| {
        let (backlog, owned, _) = exported(relay).await;
        backlog == [true; 3]
            && owned == Some(PARTITIONS as f64)
            && metric_value(&relay.metrics().await, "outbox_relay_pending_messages") == Some(1.0)
    };
    assert!(
        wait_until(WAIT, async || full(&relay).await).await,
        "{}",
        exported(&relay).await.2
    );

    let mut seen = Vec::new();
    for (fault, label) in [(true, "reset and refused"), (false, "silent (stalled)")] {
        let cut_at = Instant::now();
        if fault {
            proxy.go_down();
        } else {
            proxy.stall(true);
        }
        let gone = wait_until(WAIT, async || {
            let (backlog, owned, _) = exported(&relay).await;
            backlog == [false; 3] && owned == Some(0.0)
        })
        .await;
        let after = cut_at.elapsed();
        assert!(
            gone,
            "{label}: still exported\n{}",
            exported(&relay).await.2
        );
        assert!(
            after <= STALE_GAUGE_BOUND,
            "{label}: the backlog gauges went only {after:?} after the database was lost"
        );
        assert_eq!(relay.get("/healthz").await.expect("/healthz").0, 200);
        if fault {
            let (code, body) = relay.get("/readyz").await.expect("/readyz");
            assert!(
                code == 503 && body.contains("PostgreSQL"),
                "/readyz {code} {body}"
            );
        }
        let restored_at = Instant::now();
        proxy.come_back();
        let back = wait_until(WAIT, async || full(&relay).await).await;
        assert!(
            back,
            "{label}: not exported again\n{}",
            exported(&relay).await.2
        );
        seen.push(format!(
            "{label}: gone {} after the cut, back {} after the database returned",
            ms(after),
            ms(restored_at.elapsed())
        ));
    }
    relay.assert_running();
    println!(
        "a_relay_that_lost_its_database_exports_no_backlog: {}",
        seen.join("; ")
    );
}
