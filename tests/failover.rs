//! Several AMQP URLs: the relay moves between the nodes it was given.
//!
//! Two TCP proxies in front of the one local broker stand for two nodes, so
//! a node can die (connections cut, new ones refused) without touching the
//! broker other tests share. The real three-node cluster, with quorum queues,
//! is in tests/cluster.rs.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::time::{Duration, Instant};

use outbox_test_kit::faults::*;
use outbox_test_kit::proxy::FaultProxy;
use outbox_test_kit::*;

const RECOVERY_TIMEOUT: Duration = Duration::from_secs(90);

/// `outbox_relay_broker_node_connected{node="127.0.0.1:PORT"}` as a number.
fn node_gauge(metrics: &str, port: u16, family: &str) -> Option<f64> {
    let prefix = format!("outbox_relay_{family}{{node=\"127.0.0.1:{port}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

async fn status_json(env: &TestEnv) -> serde_json::Value {
    let out = env
        .cli(&["status", "--json"], Duration::from_secs(60))
        .await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    serde_json::from_str(&out.stdout).expect("status --json is JSON")
}

fn broker_node_of(status: &serde_json::Value, instance: &str) -> Option<String> {
    status["relays"]
        .as_array()?
        .iter()
        .find(|r| r["instance"] == instance)?["broker_node"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_moves_to_the_next_node_and_back_losing_nothing() {
    let env = TestEnv::new("failover_nodes").await;
    let queue = env.declare_queue("events").await;
    let tally = Tally::start(&env.amqp_url, &queue).await;
    let upstream = url_addr(&env.amqp_url, 5672);
    let first = FaultProxy::start(upstream).await;
    let second = FaultProxy::start(upstream).await;
    let urls = format!(
        "{},{}",
        url_via(&env.amqp_url, first.port()),
        url_via(&env.amqp_url, second.port())
    );
    let mut relay = Launch::new().amqp_url(&urls).start(&env).await;
    let instance = relay.instance.clone();
    relay.wait_ready(RECOVERY_TIMEOUT).await;

    // The first node given is the one used while it is up.
    let m = relay.metrics().await;
    assert_eq!(
        node_gauge(&m, first.port(), "broker_node_connected"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        node_gauge(&m, second.port(), "broker_node_connected"),
        Some(0.0),
        "{m}"
    );
    let work = Workload::start(&env.db_url, &env.schema, &queue);
    let flowing = wait_until(RECOVERY_TIMEOUT, async || tally.distinct() >= 300).await;
    assert!(flowing, "nothing flowed\n{}", relay.log_tail(60));
    let noted = wait_until(RECOVERY_TIMEOUT, async || {
        broker_node_of(&status_json(&env).await, &instance)
            == Some(format!("127.0.0.1:{}", first.port()))
    })
    .await;
    assert!(
        noted,
        "status does not show the first node\n{}",
        relay.log_tail(40)
    );

    // The first node dies: the relay moves to the second without a pause
    // for backoff, and charges nobody.
    let lost_at = Instant::now();
    first.go_down();
    let moved = wait_until(RECOVERY_TIMEOUT, async || {
        let m = relay.metrics().await;
        node_gauge(&m, second.port(), "broker_node_connected") == Some(1.0)
    })
    .await;
    assert!(
        moved,
        "never connected to the second node\n{}",
        relay.log_tail(60)
    );
    let resumed = tally.first_new_after(lost_at);
    let count = tally.distinct();
    let more = wait_until(RECOVERY_TIMEOUT, async || tally.distinct() >= count + 300).await;
    assert!(
        more,
        "nothing flowed through the second node\n{}",
        relay.log_tail(60)
    );
    let resumed = resumed.or_else(|| tally.first_new_after(lost_at));
    let noted = wait_until(RECOVERY_TIMEOUT, async || {
        broker_node_of(&status_json(&env).await, &instance)
            == Some(format!("127.0.0.1:{}", second.port()))
    })
    .await;
    assert!(
        noted,
        "status does not show the second node\n{}",
        relay.log_tail(40)
    );

    // The first node comes back and the second dies: back to the first.
    first.come_back();
    second.go_down();
    let back = wait_until(RECOVERY_TIMEOUT, async || {
        let m = relay.metrics().await;
        node_gauge(&m, first.port(), "broker_node_connected") == Some(1.0)
            && node_gauge(&m, first.port(), "broker_connections_total") == Some(2.0)
    })
    .await;
    assert!(
        back,
        "never went back to the first node\n{}",
        relay.log_tail(60)
    );
    second.come_back();
    work.wait_more(300, RECOVERY_TIMEOUT).await;
    let log = work.stop().await;
    // Every committed row once at least, in key order, none charged.
    let figures = verify_delivery(&env, &tally, &log, &relay).await;
    relay.assert_running();
    let m = relay.metrics().await;
    assert_eq!(
        node_gauge(&m, second.port(), "broker_connections_total"),
        Some(1.0),
        "{m}"
    );
    println!(
        "failover_moves_to_the_next_node_and_back: first message through the second node {} after the first died; {}",
        resumed.map_or("-".into(), ms),
        figures.line()
    );
}

/// `outbox-relay check` with this environment's database and these AMQP URLs.
async fn check_with(env: &TestEnv, amqp_urls: &str) -> CliOutput {
    let args = [
        "check",
        "--database-url",
        &env.db_url,
        "--schema",
        &env.schema,
        "--amqp-url",
        amqp_urls,
    ];
    run_cli(&args, &[], Duration::from_secs(120)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_starts_on_a_later_node_when_the_first_is_down() {
    let env = TestEnv::new("failover_first_down").await;
    let queue = env.declare_queue("events").await;
    let dead = ClosedPort::new();
    let urls = format!("{},{}", url_via(&env.amqp_url, dead.port), env.amqp_url);
    let mut relay = Launch::new().amqp_url(&urls).start(&env).await;
    relay.wait_ready(RECOVERY_TIMEOUT).await;
    let rows = env
        .insert_committed(&[NewRow::to_queue(&queue, "one").key("k")])
        .await;
    let got = env.consume(&queue, AckMode::Auto).await;
    let wanted = rows.iter().map(|r| r.message_id.to_string()).collect();
    got.wait_for_ids(&wanted, RECOVERY_TIMEOUT).await;

    // `check` names the dead node as a warning and passes: `run` works.
    let out = check_with(&env, &urls).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let dead_node = format!("127.0.0.1:{}", dead.port);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.contains("warn") && l.contains("broker") && l.contains(&dead_node)),
        "{}",
        out.describe()
    );

    // With no node reachable, `check` fails.
    let other = ClosedPort::new();
    let none = format!(
        "{},{}",
        url_via(&env.amqp_url, dead.port),
        url_via(&env.amqp_url, other.port)
    );
    let out = check_with(&env, &none).await;
    assert_eq!(out.code(), Some(1), "{}", out.describe());
}

/// The secret-file form takes several URLs too, one per line as a secret
/// manager might write them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_nodes_come_from_a_secret_file() {
    let env = TestEnv::new("failover_file").await;
    let queue = env.declare_queue("events").await;
    let dead = ClosedPort::new();
    let file = env.dir.join("amqp-urls");
    save(
        &file,
        &format!("{},\n{}\n", url_via(&env.amqp_url, dead.port), env.amqp_url),
    );
    let file = file.display().to_string();
    let mut relay = Launch::new()
        .envs(&[("OUTBOX_AMQP_URL_FILE", &file)])
        .settings(Settings::Environment)
        .start(&env)
        .await;
    relay.wait_ready(RECOVERY_TIMEOUT).await;
    let rows = env
        .insert_committed(&[NewRow::to_queue(&queue, "via the second node")])
        .await;
    let got = env.consume(&queue, AckMode::Auto).await;
    let wanted = rows.iter().map(|r| r.message_id.to_string()).collect();
    got.wait_for_ids(&wanted, RECOVERY_TIMEOUT).await;
    let m = relay.metrics().await;
    assert_eq!(
        node_gauge(&m, dead.port, "broker_node_connected"),
        Some(0.0),
        "{m}"
    );
    let real = url_addr(&env.amqp_url, 5672);
    let line = format!("outbox_relay_broker_node_connected{{node=\"{real}\"}} 1");
    assert!(m.lines().any(|l| l == line), "{line} not in\n{m}");
}
