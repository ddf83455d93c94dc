//! Several relays on one outbox (README, "Design": partition leases and
//! fencing), retention (README, "Design": retention) and
//! throughput with one, two and three relays, against the real binary, a real
//! PostgreSQL and a real RabbitMQ.
//!
//! Who published what, and when, is seen from outside the relays: each relay
//! under watch reaches the broker through an [`AmqpTap`]
//! (`common/frame_tap.rs`), a TCP forwarder in the test that timestamps every `basic.publish` leaving the relay and reads
//! its message-id. A trigger on `<schema>.leases` records every lease change
//! and renewal with the database clock (same machine, same clock). Together
//! they answer "was this relay the lease holder when it published that row?"
//! for every single publish.
//!
//! Test names start with `scale_` so nextest can run them as one group: they
//! start several relays each and their timings suffer when run beside each
//! other.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use outbox_test_kit::frame_tap::AmqpTap;
use outbox_test_kit::*;
use uuid::Uuid;

const PARTITIONS: usize = 32;
/// `leases::LEASE_TTL` of the relay.
const LEASE_TTL: Duration = Duration::from_secs(5);
const PUBLISHED_TOTAL: &str = "outbox_relay_messages_published_total";

// ---------------------------------------------------------------------------
// Leases as the database sees them
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Lease {
    partition: i16,
    owner: Option<String>,
    /// expires_at is still in the future (database clock).
    valid: bool,
}

async fn leases(env: &TestEnv) -> Vec<Lease> {
    let pg = env.pg.lock().await;
    let sql = format!(
        "SELECT partition, owner, expires_at > clock_timestamp() FROM \"{}\".leases ORDER BY partition",
        env.schema
    );
    pg.query(&sql, &[])
        .await
        .expect("read leases")
        .iter()
        .map(|r| Lease {
            partition: r.get(0),
            owner: r.get(1),
            valid: r.get(2),
        })
        .collect()
}

/// Valid leases held by `instance`.
fn held_by(leases: &[Lease], instance: &str) -> usize {
    leases
        .iter()
        .filter(|l| l.valid && l.owner.as_deref() == Some(instance))
        .count()
}

/// Every partition has a valid lease held by one of `live`.
fn all_held_by(leases: &[Lease], live: &[&str]) -> bool {
    leases.len() == PARTITIONS
        && leases
            .iter()
            .all(|l| l.valid && l.owner.as_deref().is_some_and(|o| live.contains(&o)))
}

/// Every partition is held by one of `live`, and each holds a fair share
/// (floor or ceil of 32 / live).
fn fairly_split(leases: &[Lease], live: &[&str]) -> bool {
    let low = PARTITIONS / live.len();
    let high = PARTITIONS.div_ceil(live.len());
    all_held_by(leases, live)
        && live
            .iter()
            .all(|r| (low..=high).contains(&held_by(leases, r)))
}

fn describe_leases(leases: &[Lease]) -> String {
    let mut by_owner: HashMap<String, Vec<i16>> = HashMap::new();
    for l in leases {
        let owner = match (&l.owner, l.valid) {
            (Some(o), true) => o.clone(),
            (Some(o), false) => format!("{o} (lapsed)"),
            (None, _) => "(free)".to_string(),
        };
        by_owner.entry(owner).or_default().push(l.partition);
    }
    let mut owners: Vec<_> = by_owner.into_iter().collect();
    owners.sort();
    owners
        .iter()
        .map(|(o, ps)| format!("{o}: {} {ps:?}", ps.len()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Records every change and renewal of a lease, with the database clock, in
/// `<schema>.lease_history` (a test-only table in the test's own schema).
async fn record_lease_history(env: &TestEnv) {
    let s = &env.schema;
    let pg = env.pg.lock().await;
    pg.batch_execute(&format!(
        "CREATE TABLE \"{s}\".lease_history (
             seq        bigserial PRIMARY KEY,
             partition  smallint NOT NULL,
             owner      text,
             expires_at timestamptz NOT NULL,
             at         timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE FUNCTION \"{s}\".record_lease() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO \"{s}\".lease_history (partition, owner, expires_at)
             VALUES (NEW.partition, NEW.owner, NEW.expires_at);
             RETURN NULL;
         END $$;
         CREATE TRIGGER record_lease AFTER UPDATE ON \"{s}\".leases
             FOR EACH ROW EXECUTE FUNCTION \"{s}\".record_lease();"
    ))
    .await
    .expect("install the lease history trigger");
}

/// One entry of the lease history: from `at` on, `owner` holds the partition
/// until `expires_at` (unix seconds, database clock).
#[derive(Clone, Debug)]
struct LeaseEvent {
    at: f64,
    owner: Option<String>,
    expires_at: f64,
}

struct LeaseHistory {
    by_partition: HashMap<i16, Vec<LeaseEvent>>,
}

impl LeaseHistory {
    async fn load(env: &TestEnv) -> LeaseHistory {
        let pg = env.pg.lock().await;
        let sql = format!(
            "SELECT partition, owner, extract(epoch FROM expires_at)::float8, extract(epoch FROM at)::float8
               FROM \"{}\".lease_history ORDER BY seq",
            env.schema
        );
        let mut by_partition: HashMap<i16, Vec<LeaseEvent>> = HashMap::new();
        for r in pg.query(&sql, &[]).await.expect("read lease history") {
            by_partition.entry(r.get(0)).or_default().push(LeaseEvent {
                owner: r.get(1),
                expires_at: r.get(2),
                at: r.get(3),
            });
        }
        // Updates of one lease row serialize on its row lock, so seq order is
        // time order per partition; sort anyway in case a clock step happened.
        for events in by_partition.values_mut() {
            events.sort_by(|a, b| a.at.total_cmp(&b.at));
        }
        LeaseHistory { by_partition }
    }

    /// The lease of `partition` as it stood at `t` (unix seconds).
    fn at(&self, partition: i16, t: f64) -> Option<&LeaseEvent> {
        self.by_partition
            .get(&partition)?
            .iter()
            .take_while(|e| e.at <= t)
            .last()
    }
}

/// `message_id -> partition` of every row still in the table.
async fn partitions_of_rows(env: &TestEnv) -> HashMap<String, i16> {
    let pg = env.pg.lock().await;
    let sql = format!("SELECT message_id::text, partition FROM {}", env.table());
    pg.query(&sql, &[])
        .await
        .expect("read row partitions")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// A publish that left `instance` while it did not hold the row's partition.
#[derive(Debug)]
struct OutOfLease {
    at: f64,
    message_id: String,
    partition: i16,
    holder_then: Option<String>,
    /// Seconds past the instance's own lease end (negative: another relay's lease).
    past_own_expiry: Option<f64>,
}

/// Checks every publish `tap` saw against the lease history.
fn publishes_out_of_lease(
    tap: &AmqpTap,
    instance: &str,
    partitions: &HashMap<String, i16>,
    history: &LeaseHistory,
) -> Vec<OutOfLease> {
    let mut out = Vec::new();
    for p in tap.publishes() {
        let mid = p.message_id.clone().unwrap_or_default();
        let Some(&partition) = partitions.get(&mid) else {
            out.push(OutOfLease {
                at: p.at_secs(),
                message_id: format!("{mid} (not an outbox row of this test)"),
                partition: -1,
                holder_then: None,
                past_own_expiry: None,
            });
            continue;
        };
        let t = p.at_secs();
        let lease = history.at(partition, t);
        let holds = lease.is_some_and(|l| l.owner.as_deref() == Some(instance) && t < l.expires_at);
        if !holds {
            let own_expiry = history
                .by_partition
                .get(&partition)
                .into_iter()
                .flatten()
                .rfind(|e| e.at <= t && e.owner.as_deref() == Some(instance))
                .map(|e| t - e.expires_at);
            out.push(OutOfLease {
                at: t,
                message_id: mid,
                partition,
                holder_then: lease.and_then(|l| l.owner.clone()),
                past_own_expiry: own_expiry,
            });
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The application: a steady insert load with a sequence number per key
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Written {
    id: i64,
    message_id: Uuid,
    key: String,
    seq: i64,
}

struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Written>>,
    written: Arc<Mutex<usize>>,
}

impl Load {
    /// Inserts `rows_per_sec` rows a second, in one statement every 100 ms,
    /// spread over `keys` partition keys; each row carries its key and its
    /// sequence number within the key in its headers.
    async fn start(env: &TestEnv, queue: &str, rows_per_sec: usize, keys: usize) -> Load {
        let per_tick = (rows_per_sec / 10).clamp(1, keys);
        let client = env.connect_db().await;
        let sql = keyed_insert_sql(env);
        let statement = client.prepare(&sql).await.expect("prepare load insert");
        let queue = queue.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(Mutex::new(0usize));
        let (stopping, count) = (stop.clone(), written.clone());
        let task = tokio::spawn(async move {
            let mut out = Vec::new();
            let mut next_seq = vec![0i64; keys];
            let mut next_key = 0usize;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stopping.load(Ordering::Acquire) {
                tick.tick().await;
                // Distinct keys per statement, so per key, id order = seq order.
                let mut ks = Vec::with_capacity(per_tick);
                let mut ns = Vec::with_capacity(per_tick);
                for _ in 0..per_tick {
                    let k = next_key % keys;
                    next_key += 1;
                    next_seq[k] += 1;
                    ks.push(format!("key-{k:03}"));
                    ns.push(next_seq[k]);
                }
                let rows = client
                    .query(&statement, &[&queue, &ks, &ns])
                    .await
                    .expect("application insert");
                out.extend(written_of(&rows));
                *count.lock().unwrap() = out.len();
            }
            out
        });
        Load {
            stop,
            task,
            written,
        }
    }

    fn written(&self) -> usize {
        *self.written.lock().unwrap()
    }

    async fn stop(self) -> Vec<Written> {
        self.stop.store(true, Ordering::Release);
        self.task.await.expect("load task")
    }
}

/// What the consumer saw against what the application committed.
struct DeliveryReport {
    committed: usize,
    deliveries: usize,
    distinct: usize,
    duplicates: usize,
    lost: Vec<String>,
    order_violations: Vec<String>,
    header_mismatches: Vec<String>,
}

impl DeliveryReport {
    fn of(written: &[Written], received: &[Received]) -> DeliveryReport {
        let rows: HashMap<String, &Written> = written
            .iter()
            .map(|w| (w.message_id.to_string(), w))
            .collect();
        let mut seen = HashSet::new();
        let mut last_seq: HashMap<String, (i64, i64)> = HashMap::new();
        let mut order_violations = Vec::new();
        let mut header_mismatches = Vec::new();
        for (pos, r) in received.iter().enumerate() {
            let mid = r.message_id.clone().unwrap_or_default();
            if !seen.insert(mid.clone()) {
                continue; // a repeat: at least once allows it, order is about first arrivals
            }
            let Some(w) = rows.get(&mid) else { continue };
            let headers = r.headers_json().unwrap_or_default();
            let (key, seq) = (headers["key"].as_str(), headers["seq"].as_i64());
            if key != Some(w.key.as_str()) || seq != Some(w.seq) {
                header_mismatches.push(format!("{mid}: headers {headers} but row {w:?}"));
            }
            if let Some(&(prev_seq, prev_id)) = last_seq.get(&w.key) {
                if w.seq <= prev_seq {
                    order_violations.push(format!(
                        "key {}: seq {} (id {}) first arrived (delivery #{pos}) after seq {prev_seq} (id {prev_id})",
                        w.key, w.seq, w.id
                    ));
                }
            }
            last_seq.insert(w.key.clone(), (w.seq, w.id));
        }
        let lost: Vec<String> = rows
            .keys()
            .filter(|m| !seen.contains(*m))
            .cloned()
            .collect();
        DeliveryReport {
            committed: written.len(),
            deliveries: received.len(),
            distinct: seen.len(),
            duplicates: received.len() - seen.len(),
            lost,
            order_violations,
            header_mismatches,
        }
    }

    fn print(&self, what: &str) {
        println!(
            "[{what}] committed {} | received {} deliveries, {} distinct | duplicates {} | lost {} | order violations {}",
            self.committed,
            self.deliveries,
            self.distinct,
            self.duplicates,
            self.lost.len(),
            self.order_violations.len()
        );
    }

    fn assert_ok(&self) {
        assert!(
            self.lost.is_empty(),
            "{} committed rows never arrived, e.g. {:?}",
            self.lost.len(),
            &self.lost[..self.lost.len().min(10)]
        );
        assert!(
            self.order_violations.is_empty(),
            "per-key order broken ({} violations): {:#?}",
            self.order_violations.len(),
            &self.order_violations[..self.order_violations.len().min(10)]
        );
        assert!(
            self.header_mismatches.is_empty(),
            "headers differ from the rows: {:#?}",
            &self.header_mismatches[..self.header_mismatches.len().min(10)]
        );
    }
}

/// One INSERT of rows `(key, seq)` to `$1`, in array order, each carrying its
/// key and sequence number in its headers.
fn keyed_insert_sql(env: &TestEnv) -> String {
    format!(
        "INSERT INTO {} (routing_key, partition_key, payload, headers, content_type)
         SELECT $1, u.k, convert_to(u.k || ':' || u.n, 'UTF8'),
                jsonb_build_object('key', u.k, 'seq', u.n), 'text/plain'
           FROM unnest($2::text[], $3::bigint[]) WITH ORDINALITY AS u(k, n, ord)
          ORDER BY u.ord
         RETURNING id, message_id, partition_key, (headers->>'seq')::bigint",
        env.table()
    )
}

fn written_of(rows: &[tokio_postgres::Row]) -> Vec<Written> {
    rows.iter()
        .map(|r| Written {
            id: r.get(0),
            message_id: r.get(1),
            key: r.get(2),
            seq: r.get(3),
        })
        .collect()
}

async fn insert_keyed(env: &TestEnv, queue: &str, keys: &[String], seqs: &[i64]) -> Vec<Written> {
    let pg = env.pg.lock().await;
    let rows = pg
        .query(&keyed_insert_sql(env), &[&queue, &keys, &seqs])
        .await
        .expect("insert keyed rows");
    written_of(&rows)
}

fn ids_of_written(written: &[Written]) -> HashSet<String> {
    written.iter().map(|w| w.message_id.to_string()).collect()
}

// ---------------------------------------------------------------------------
// Helpers around relays
// ---------------------------------------------------------------------------

/// A relay that reaches the broker through its own tap.
async fn start_tapped(env: &TestEnv, args: &[&str]) -> (Relay, AmqpTap) {
    start_tapped_with(env, args, &[]).await
}

/// [`start_tapped`] with extra environment variables (e.g. FAILPOINTS).
async fn start_tapped_with(
    env: &TestEnv,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (Relay, AmqpTap) {
    let tap = AmqpTap::start(&env.amqp_url);
    let mut all = vec![("OUTBOX_AMQP_URL", tap.url.as_str())];
    all.extend_from_slice(envs);
    let relay = Launch::new()
        .args(args)
        .envs(&all)
        .settings(Settings::Environment)
        .start(env)
        .await;
    (relay, tap)
}

/// The sample of `name` whose labels contain `label` (e.g. `reason="x"`); 0 when absent.
fn labelled_value(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn published_total(relay: &Relay) -> f64 {
    metric_value(&relay.metrics().await, PUBLISHED_TOTAL).unwrap_or(0.0)
}

async fn partitions_owned_gauge(relay: &Relay) -> f64 {
    metric_value(&relay.metrics().await, "outbox_relay_partitions_owned").unwrap_or(-1.0)
}

/// Waits until `condition` holds on the leases table; panics with the table.
async fn wait_for_leases<F>(
    env: &TestEnv,
    timeout: Duration,
    what: &str,
    mut condition: F,
) -> Duration
where
    F: FnMut(&[Lease]) -> bool,
{
    let start = Instant::now();
    let mut last = Vec::new();
    let ok = wait_until(timeout, async || {
        last = leases(env).await;
        condition(&last)
    })
    .await;
    assert!(
        ok,
        "leases: {what} not reached within {timeout:?}; last: {}",
        describe_leases(&last)
    );
    start.elapsed()
}

/// The taps saw every committed row go out: the lease checks are not vacuous.
fn assert_taps_saw_every_row<'a>(taps: impl IntoIterator<Item = &'a AmqpTap>, written: &[Written]) {
    let seen: HashSet<String> = taps
        .into_iter()
        .flat_map(|t| t.publishes())
        .filter_map(|p| p.message_id)
        .collect();
    let unseen = written
        .iter()
        .filter(|w| !seen.contains(&w.message_id.to_string()))
        .count();
    assert_eq!(
        unseen, 0,
        "{unseen} delivered rows were never seen leaving a relay through its tap"
    );
}

fn assert_no_out_of_lease(label: &str, violations: &[OutOfLease], checked: usize) {
    println!(
        "[{label}] {checked} publishes checked against the lease history: {} out of lease",
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "{label} published {} rows of partitions it did not hold at that moment \
         (more than one publisher per partition), e.g. {:#?}",
        violations.len(),
        &violations[..violations.len().min(10)]
    );
}

// ---------------------------------------------------------------------------
// Scale-out: sharing, take-over, hand-over, joining
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_three_relays_share_partitions_and_survive_kill_term_and_join() {
    let env = TestEnv::new("scale_share").await;
    record_lease_history(&env).await;
    let queue = env.declare_queue("events").await;
    let collector = env.consume(&queue, AckMode::Manual).await;

    let mut relays = Vec::new();
    for _ in 0..3 {
        relays.push(start_tapped(&env, &[]).await);
    }
    let load = Load::start(&env, &queue, 300, 240).await;

    // 1. The 32 partitions are split 11/11/10 and every relay knows it.
    let names: Vec<String> = relays.iter().map(|(r, _)| r.instance.clone()).collect();
    let live: Vec<&str> = names.iter().map(String::as_str).collect();
    let split_in = wait_for_leases(
        &env,
        Duration::from_secs(60),
        "fair split over 3 relays",
        |l| fairly_split(l, &live),
    )
    .await;
    println!(
        "split over 3 relays after {split_in:.1?}: {}",
        describe_leases(&leases(&env).await)
    );
    let gauges_agree = wait_until(Duration::from_secs(10), async || {
        let l = leases(&env).await;
        let mut ok = fairly_split(&l, &live);
        for (r, _) in &relays {
            ok &= partitions_owned_gauge(r).await as usize == held_by(&l, &r.instance);
        }
        ok
    })
    .await;
    assert!(
        gauges_agree,
        "outbox_relay_partitions_owned does not match the leases table"
    );
    // Every relay publishes its share.
    let all_publish = wait_until(Duration::from_secs(20), async || {
        let mut ok = true;
        for (r, _) in &relays {
            ok &= published_total(r).await > 0.0;
        }
        ok
    })
    .await;
    assert!(
        all_publish,
        "not every relay published while holding partitions"
    );

    // 2. kill -9 one: the others take its partitions over within seconds.
    let killed = relays[0].0.instance.clone();
    relays[0].0.kill();
    let survivors = [names[1].as_str(), names[2].as_str()];
    let take_over = wait_for_leases(
        &env,
        Duration::from_secs(30),
        "take-over after kill -9",
        |l| all_held_by(l, &survivors),
    )
    .await;
    println!(
        "TAKE-OVER after kill -9 of {killed}: {:.2} s (all 32 partitions held by the 2 survivors): {}",
        take_over.as_secs_f64(),
        describe_leases(&leases(&env).await)
    );
    assert!(
        take_over <= Duration::from_secs(10),
        "take-over took {take_over:?}, more than the lease ttl ({LEASE_TTL:?}) plus a few heartbeats"
    );

    // 3. SIGTERM another: it drains, exits 0 and hands its leases back at once.
    let terminated = names[1].clone();
    let term_at = Instant::now();
    let status = relays[1].0.terminate(Duration::from_secs(20)).await;
    let exited_in = term_at.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM must end in exit 0\n{}",
        relays[1].0.log_tail(50)
    );
    let after_exit = leases(&env).await;
    let still_owned: Vec<i16> = after_exit
        .iter()
        .filter(|l| l.owner.as_deref() == Some(terminated.as_str()))
        .map(|l| l.partition)
        .collect();
    assert!(
        still_owned.is_empty(),
        "{terminated} exited but still owns partitions {still_owned:?}: leases were not released\n{}",
        relays[1].0.log_tail(30)
    );
    assert!(
        relays[1].0.logs().contains("leases released"),
        "{}",
        relays[1].0.log_tail(30)
    );
    let last = [names[2].as_str()];
    let hand_over = wait_for_leases(
        &env,
        Duration::from_secs(20),
        "hand-over after SIGTERM",
        |l| all_held_by(l, &last),
    )
    .await;
    let since_signal = term_at.elapsed();
    println!(
        "HAND-OVER after SIGTERM of {terminated}: exited {:.2} s after the signal; the survivor held all 32 \
         {:.2} s after the exit ({:.2} s after the signal)",
        exited_in.as_secs_f64(),
        hand_over.as_secs_f64(),
        since_signal.as_secs_f64()
    );
    // Released leases are free at once; lapsed ones would take up to the ttl.
    assert!(
        hand_over < Duration::from_secs(3),
        "the survivor needed {hand_over:?} after the exit to hold everything: no faster than a lapse"
    );

    // 4. A new relay joins and gets its fair share.
    let joined = start_tapped(&env, &[]).await;
    let joined_name = joined.0.instance.clone();
    relays.push(joined);
    let pair = [names[2].as_str(), joined_name.as_str()];
    let join = wait_for_leases(
        &env,
        Duration::from_secs(30),
        "fair split after a join",
        |l| fairly_split(l, &pair),
    )
    .await;
    println!(
        "JOIN: {joined_name} holds its fair share after {:.2} s: {}",
        join.as_secs_f64(),
        describe_leases(&leases(&env).await)
    );
    let newcomer_publishes = wait_until(Duration::from_secs(20), async || {
        published_total(&relays[3].0).await > 0.0
    })
    .await;
    assert!(newcomer_publishes, "the joined relay never published");

    // 5. Everything committed arrived, in order per key.
    let before_stop = load.written();
    let wrote_more = wait_until(Duration::from_secs(10), async || {
        load.written() >= before_stop + 300
    })
    .await;
    assert!(wrote_more, "the application stopped writing");
    let written = load.stop().await;
    collector
        .wait_for_ids(&ids_of_written(&written), ARRIVAL_TIMEOUT)
        .await;
    let received = collector.stop().await;
    let report = DeliveryReport::of(&written, &received);
    report.print("3 relays, kill -9, SIGTERM, join");
    let published: f64 = {
        let mut sum = 0.0;
        for (r, _) in &relays[2..] {
            sum += published_total(r).await;
        }
        sum
    };
    println!("published_total of the two relays still running: {published}");
    report.assert_ok();

    // 6. No partition ever had two publishers: each publish, by each relay,
    // fell inside a lease that relay held.
    let history = LeaseHistory::load(&env).await;
    let partitions = partitions_of_rows(&env).await;
    assert_taps_saw_every_row(relays.iter().map(|(_, t)| t), &written);
    for (relay, tap) in &relays {
        let violations = publishes_out_of_lease(tap, &relay.instance, &partitions, &history);
        assert_no_out_of_lease(&relay.instance, &violations, tap.publishes().len());
    }
    for (r, _) in relays.iter_mut().skip(2) {
        r.assert_running();
        let status = r.terminate(Duration::from_secs(20)).await;
        assert_eq!(status.code(), Some(0));
    }
}

// ---------------------------------------------------------------------------
// Fencing: a frozen relay must not publish partitions it lost
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_frozen_relay_does_not_publish_lost_partitions() {
    let env = TestEnv::new("scale_frozen").await;
    record_lease_history(&env).await;
    let queue = env.declare_queue("events").await;
    let collector = env.consume(&queue, AckMode::Manual).await;

    let (mut a, tap_a) = start_tapped(&env, &[]).await;
    let a_only = [a.instance.as_str()];
    wait_for_leases(
        &env,
        Duration::from_secs(30),
        "relay A holds everything",
        |l| all_held_by(l, &a_only),
    )
    .await;
    let (mut b, tap_b) = start_tapped(&env, &[]).await;
    let both = [a.instance.as_str(), b.instance.as_str()];
    let split = wait_for_leases(
        &env,
        Duration::from_secs(40),
        "split between A and B",
        |l| fairly_split(l, &both),
    )
    .await;
    println!(
        "A and B split the partitions after {split:.1?}: {}",
        describe_leases(&leases(&env).await)
    );

    let load = Load::start(&env, &queue, 300, 240).await;
    // Freeze A while it is busy: a burst of rows, and SIGSTOP as soon as A
    // is seen publishing them, so A is likely frozen holding a claimed batch.
    // One statement: a quick commit (a long transaction here would test
    // something else, see scale_key_order_holds_when_a_long_transaction_...).
    let (keys, seqs): (Vec<String>, Vec<i64>) = (0..3000usize)
        .map(|i| (format!("burst-{:03}", i % 300), (i / 300 + 1) as i64))
        .unzip();
    let burst = insert_keyed(&env, &queue, &keys, &seqs).await;
    let burst_ids = ids_of_written(&burst);
    let deadline = Instant::now() + Duration::from_secs(20);
    while tap_a.count(|p| p.message_id.as_ref().is_some_and(|m| burst_ids.contains(m))) < 100 {
        assert!(
            Instant::now() < deadline,
            "A did not start publishing the burst"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let a_published_before = tap_a.publishes().len();
    let written_at_stop = load.written();
    a.signal("STOP");
    let stopped_at = Instant::now();
    let stopped_wall = SystemTime::now();
    println!(
        "SIGSTOP A ({}) after it sent {a_published_before} publishes",
        a.instance
    );

    // B takes everything once A's leases lapse; A stays frozen well past the ttl.
    let b_only = [b.instance.as_str()];
    let b_all = wait_for_leases(
        &env,
        Duration::from_secs(30),
        "B holds everything while A is frozen",
        |l| all_held_by(l, &b_only),
    )
    .await;
    println!(
        "B holds all 32 partitions {:.2} s after A froze",
        b_all.as_secs_f64()
    );
    let frozen_enough = wait_until(Duration::from_secs(30), async || {
        stopped_at.elapsed() >= LEASE_TTL + Duration::from_secs(2)
    })
    .await;
    assert!(frozen_enough);
    let written_while_frozen = load.written() - written_at_stop;
    assert!(
        written_while_frozen > 0,
        "the application wrote nothing while A was frozen"
    );
    let during_freeze = tap_a
        .publishes_after(stopped_wall + Duration::from_millis(50))
        .len();

    a.signal("CONT");
    let resumed_at = SystemTime::now();
    let resumed = Instant::now();
    println!(
        "SIGCONT A after {:.2} s frozen ({written_while_frozen} rows written meanwhile)",
        stopped_at.elapsed().as_secs_f64()
    );

    // Watch A for 5 s: its published counter and its leases, every 100 ms.
    let mut samples = Vec::new();
    while resumed.elapsed() < Duration::from_secs(5) {
        let counter = published_total(&a).await;
        let l = leases(&env).await;
        samples.push((
            resumed.elapsed(),
            counter,
            held_by(&l, &a.instance),
            tap_a.publishes_after(resumed_at).len(),
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A gets a fair share back, legitimately, after B lets the extras lapse.
    let back = wait_for_leases(&env, Duration::from_secs(30), "A and B split again", |l| {
        fairly_split(l, &both)
    })
    .await;
    println!(
        "A holds a fair share again {:.2} s after resume (split seen {:.2} s after the 5 s watch)",
        resumed.elapsed().as_secs_f64(),
        back.as_secs_f64()
    );
    let a_publishes_again = wait_until(Duration::from_secs(20), async || {
        !tap_a
            .publishes_after(resumed_at + Duration::from_secs(1))
            .is_empty()
    })
    .await;
    assert!(
        a_publishes_again,
        "A never published again after it got leases back"
    );

    let mut written = load.stop().await;
    written.extend(burst.iter().cloned());
    collector
        .wait_for_ids(&ids_of_written(&written), ARRIVAL_TIMEOUT)
        .await;
    let received = collector.stop().await;
    let report = DeliveryReport::of(&written, &received);
    report.print("frozen relay: application rows and burst");

    // What A sent after SIGCONT, against the leases it held at each moment.
    let history = LeaseHistory::load(&env).await;
    let partitions = partitions_of_rows(&env).await;
    assert_taps_saw_every_row([&tap_a, &tap_b], &written);
    let out_a = publishes_out_of_lease(&tap_a, &a.instance, &partitions, &history);
    let resumed_secs = unix_secs(resumed_at);
    let first_own_publish = tap_a
        .publishes_after(resumed_at)
        .first()
        .map(|p| p.at_secs() - resumed_secs);
    let lease_lost = labelled_value(
        &a.metrics().await,
        "outbox_relay_publish_failures_total",
        "reason=\"lease_lost\"",
    );
    println!(
        "A: {during_freeze} publishes seen while frozen; first publish after resume at {first_own_publish:?} s; \
         claimed rows A dropped for a lapsed lease (publish_failures_total{{reason=\"lease_lost\"}}): {lease_lost}"
    );
    println!("A after resume, every 100 ms: (since resume, published_total, leases held, publishes seen by tap)");
    for (t, counter, held, seen) in &samples {
        println!(
            "  {:>5.2}s  {counter:>6}  {held:>2}  {seen}",
            t.as_secs_f64()
        );
    }
    for v in &out_a {
        println!(
            "  A out of lease: {:+.3}s after resume, partition {}, held by {:?}, {:?} s past A's own lease end ({})",
            v.at - resumed_secs,
            v.partition,
            v.holder_then,
            v.past_own_expiry,
            v.message_id
        );
    }
    assert_eq!(during_freeze, 0, "a frozen process published");
    assert_no_out_of_lease("A (frozen, then resumed)", &out_a, tap_a.publishes().len());
    let out_b = publishes_out_of_lease(&tap_b, &b.instance, &partitions, &history);
    assert_no_out_of_lease("B", &out_b, tap_b.publishes().len());
    report.assert_ok();

    for r in [&mut a, &mut b] {
        r.assert_running();
        assert_eq!(r.terminate(Duration::from_secs(20)).await.code(), Some(0));
    }
}

/// A relay paused after it checked its lease and before the publish reached
/// the socket (the one gap a check in the relay cannot close) must still not
/// put that publish on the wire once its lease lapsed: the fence at the socket
/// refuses the write and the row goes to the partition's new holder.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_relay_paused_between_lease_check_and_write_does_not_publish() {
    let env = TestEnv::new("scale_paused").await;
    record_lease_history(&env).await;
    let queue = env.declare_queue("events").await;
    let collector = env.consume(&queue, AckMode::Manual).await;

    // A stops itself (SIGSTOP) in its second batch of publishes, after the lease check.
    let (mut a, tap_a) = start_tapped_with(
        &env,
        &[],
        &[(
            "FAILPOINTS",
            "publish_after_lease_check=1*off->1*return->off",
        )],
    )
    .await;
    let (mut b, tap_b) = start_tapped(&env, &[]).await;
    let both = [a.instance.as_str(), b.instance.as_str()];
    wait_for_leases(
        &env,
        Duration::from_secs(40),
        "split between A and B",
        |l| fairly_split(l, &both),
    )
    .await;

    let (keys, seqs): (Vec<String>, Vec<i64>) = (0..600usize)
        .map(|i| (format!("paused-{:02}", i % 60), (i / 60 + 1) as i64))
        .unzip();
    let half = keys.len() / 2;
    let mut written = insert_keyed(&env, &queue, &keys[..half], &seqs[..half]).await;
    let first_batch = wait_until(Duration::from_secs(30), async || {
        !tap_a.publishes().is_empty()
    })
    .await;
    assert!(first_batch, "A published nothing; log:\n{}", a.log_tail(20));
    written.extend(insert_keyed(&env, &queue, &keys[half..], &seqs[half..]).await);
    let stopped = wait_until(Duration::from_secs(30), async || {
        std::fs::read_to_string(format!("/proc/{}/stat", a.pid))
            .ok()
            .and_then(|s| {
                s.rsplit(')')
                    .next()
                    .map(|r| r.trim_start().starts_with('T'))
            })
            .unwrap_or(false)
    })
    .await;
    assert!(
        stopped,
        "A never reached its failpoint; log:\n{}",
        a.log_tail(20)
    );
    let stopped_at = Instant::now();
    let sent_before = tap_a.publishes().len();
    println!("A stopped itself between a lease check and the write, after {sent_before} publishes");

    let b_only = [b.instance.as_str()];
    let b_all = wait_for_leases(&env, Duration::from_secs(30), "B holds everything", |l| {
        all_held_by(l, &b_only)
    })
    .await;
    println!(
        "B holds all 32 partitions {:.2} s after A stopped",
        b_all.as_secs_f64()
    );
    wait_until(Duration::from_secs(30), async || {
        stopped_at.elapsed() >= LEASE_TTL + Duration::from_secs(1)
    })
    .await;
    written.extend(
        insert_keyed(
            &env,
            &queue,
            &keys,
            &seqs.iter().map(|s| s + 10).collect::<Vec<_>>(),
        )
        .await,
    );

    a.signal("CONT");
    let resumed_at = SystemTime::now();
    collector
        .wait_for_ids(&ids_of_written(&written), ARRIVAL_TIMEOUT)
        .await;
    // A's paused write ends one of two ways: refused at the socket (logged),
    // or sent (at its tap). On a loaded machine A may take a while to get
    // there after the resume, so wait for either, with a generous bound.
    let fence_text = "after its partition lease could have lapsed";
    let settled = wait_until(Duration::from_secs(60), async || {
        a.logs().contains(fence_text) || !tap_a.publishes_after(resumed_at).is_empty()
    })
    .await;
    println!(
        "A's paused write {} {:.2} s after the resume",
        if settled {
            "settled"
        } else {
            "had not settled"
        },
        resumed_at.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0)
    );
    let received = collector.stop().await;
    let report = DeliveryReport::of(&written, &received);
    report.print("paused between lease check and write");

    let history = LeaseHistory::load(&env).await;
    let partitions = partitions_of_rows(&env).await;
    let out_a = publishes_out_of_lease(&tap_a, &a.instance, &partitions, &history);
    let fenced = a.logs().contains(fence_text);
    println!(
        "A: {} publishes after resume, {} out of lease; fence refused the late write: {fenced}",
        tap_a.publishes_after(resumed_at).len(),
        out_a.len()
    );
    assert_no_out_of_lease("A (paused, then resumed)", &out_a, tap_a.publishes().len());
    assert!(
        fenced,
        "A's paused publish was neither sent in time nor refused by the fence; log:\n{}",
        a.log_tail(30)
    );
    let out_b = publishes_out_of_lease(&tap_b, &b.instance, &partitions, &history);
    assert_no_out_of_lease("B", &out_b, tap_b.publishes().len());
    report.assert_ok();

    for r in [&mut a, &mut b] {
        r.assert_running();
        assert_eq!(r.terminate(Duration::from_secs(20)).await.code(), Some(0));
    }
}

// ---------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------

/// Logs every deleted outbox row (id, its published_at and dead_lettered_at,
/// when it was deleted) in `<schema>.deleted_rows`.
async fn record_deletions(env: &TestEnv) {
    let s = &env.schema;
    let pg = env.pg.lock().await;
    pg.batch_execute(&format!(
        "CREATE TABLE \"{s}\".deleted_rows (
             id bigint, message_id uuid, published_at timestamptz, dead_lettered_at timestamptz,
             available_at timestamptz, deleted_at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE FUNCTION \"{s}\".record_deletion() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO \"{s}\".deleted_rows (id, message_id, published_at, dead_lettered_at, available_at)
             VALUES (OLD.id, OLD.message_id, OLD.published_at, OLD.dead_lettered_at, OLD.available_at);
             RETURN NULL;
         END $$;
         CREATE TRIGGER record_deletion AFTER DELETE ON \"{s}\".messages
             FOR EACH ROW EXECUTE FUNCTION \"{s}\".record_deletion();"
    ))
    .await
    .expect("install the deletion log trigger");
}

/// Rows that must survive retention: scheduled an hour ahead, and parked.
struct KeptRows {
    scheduled: Vec<Inserted>,
    parked: Vec<Inserted>,
}

async fn write_rows_retention_must_keep(env: &TestEnv, queue: &str) -> KeptRows {
    let scheduled_rows: Vec<NewRow> = (0..5)
        .map(|i| {
            let mut r = NewRow::to_queue(queue, format!("later-{i}"));
            r.available_in_secs = Some(3600.0);
            r
        })
        .collect();
    let scheduled = env.insert_committed(&scheduled_rows).await;
    let missing_exchange = env.unique("no-such-exchange");
    let parked_rows: Vec<NewRow> = (0..3)
        .map(|i| {
            let mut r = NewRow::to_queue(queue, format!("doomed-{i}"));
            r.exchange = missing_exchange.clone();
            r
        })
        .collect();
    let parked = env.insert_committed(&parked_rows).await;
    KeptRows { scheduled, parked }
}

async fn count_where(env: &TestEnv, ids: &[Inserted], condition: &str) -> i64 {
    let ids: Vec<i64> = ids.iter().map(|i| i.id).collect();
    let pg = env.pg.lock().await;
    let sql = format!(
        "SELECT count(*) FROM {} WHERE id = ANY($1) AND ({condition})",
        env.table()
    );
    pg.query_one(&sql, &[&ids])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

async fn assert_kept(env: &TestEnv, kept: &KeptRows) {
    assert_eq!(
        count_where(
            env,
            &kept.scheduled,
            "published_at IS NULL AND dead_lettered_at IS NULL"
        )
        .await,
        kept.scheduled.len() as i64,
        "scheduled (pending) rows must be kept"
    );
    assert_eq!(
        count_where(env, &kept.parked, "dead_lettered_at IS NOT NULL").await,
        kept.parked.len() as i64,
        "dead-lettered rows must be kept"
    );
}

async fn wait_parked(env: &TestEnv, kept: &KeptRows, relay: &Relay) {
    let parked = wait_until(Duration::from_secs(30), async || {
        count_where(env, &kept.parked, "dead_lettered_at IS NOT NULL").await
            == kept.parked.len() as i64
    })
    .await;
    assert!(
        parked,
        "rows to a missing exchange were not dead-lettered\n{}",
        relay.log_tail(40)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_retention_removes_old_published_rows_and_keeps_pending() {
    // --retention 2s: published rows go once older than 2 s, nothing else goes.
    {
        let env = TestEnv::new("scale_retention").await;
        record_deletions(&env).await;
        let queue = env.declare_queue("events").await;
        let collector = env.consume(&queue, AckMode::Auto).await;
        let mut relay = Launch::new()
            .args(&["--retention", "2s", "--max-attempts", "1"])
            .start(&env)
            .await;
        let kept = write_rows_retention_must_keep(&env, &queue).await;
        let started = Instant::now();
        let published = env.insert_bulk(&queue, 2500, 50).await;
        collector.wait_for_rows(&published).await;
        wait_parked(&env, &kept, &relay).await;
        let marked = wait_until(Duration::from_secs(10), async || {
            count_where(&env, &published, "published_at IS NOT NULL").await
                + env
                    .scalar_i64(&format!(
                        "SELECT count(*) FROM \"{}\".deleted_rows",
                        env.schema
                    ))
                    .await
                == published.len() as i64
        })
        .await;
        assert!(marked, "delivered rows were not marked published");

        let mut deleted_metric = 0.0;
        let gone = wait_until(Duration::from_secs(60), async || {
            if count_where(&env, &published, "true").await != 0 {
                return false;
            }
            deleted_metric = metric_value(
                &relay.metrics().await,
                "outbox_relay_messages_deleted_total",
            )
            .unwrap_or(0.0);
            deleted_metric >= published.len() as f64
        })
        .await;
        let left = count_where(&env, &published, "true").await;
        assert!(
            gone,
            "retention 2s: {left} of {} published rows still there, messages_deleted_total {deleted_metric}, {:.0?} after the insert\n{}",
            published.len(),
            started.elapsed(),
            relay.log_tail(40)
        );
        assert_eq!(
            env.published_count().await,
            0,
            "published rows left after retention"
        );
        assert_eq!(
            deleted_metric,
            published.len() as f64,
            "messages_deleted_total counts what was deleted"
        );
        assert_kept(&env, &kept).await;

        // Nothing was deleted before it was `retention` old, nothing pending was deleted.
        let pg = env.pg.lock().await;
        let row = pg
            .query_one(
                &format!(
                    "SELECT count(*), count(*) FILTER (WHERE published_at IS NULL),
                            min(extract(epoch FROM deleted_at - published_at))::float8,
                            max(extract(epoch FROM deleted_at - published_at))::float8
                       FROM \"{}\".deleted_rows",
                    env.schema
                ),
                &[],
            )
            .await
            .expect("deletion log");
        drop(pg);
        let (n, unpublished, min_age, max_age): (i64, i64, Option<f64>, Option<f64>) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        println!(
            "RETENTION 2s: {n} rows deleted ({:.1} s after the insert), age at deletion {:.2}..{:.2} s, messages_deleted_total {deleted_metric}",
            started.elapsed().as_secs_f64(),
            min_age.unwrap_or(-1.0),
            max_age.unwrap_or(-1.0)
        );
        assert_eq!(
            n,
            published.len() as i64,
            "deleted rows other than the published ones"
        );
        assert_eq!(unpublished, 0, "retention deleted unpublished rows");
        assert!(
            min_age.unwrap_or(0.0) >= 2.0,
            "a row was deleted {min_age:?} s after publish, before retention 2s"
        );
        assert_eq!(
            relay.terminate(Duration::from_secs(20)).await.code(),
            Some(0)
        );
    }

    // --retention 0: rows are deleted when their confirm is booked, never kept as published.
    {
        let env = TestEnv::new("scale_retention_zero").await;
        record_deletions(&env).await;
        let queue = env.declare_queue("events").await;
        let collector = env.consume(&queue, AckMode::Auto).await;
        let mut relay = Launch::new()
            .args(&["--retention", "0", "--max-attempts", "1"])
            .start(&env)
            .await;
        let kept = write_rows_retention_must_keep(&env, &queue).await;
        let published = env.insert_bulk(&queue, 2500, 50).await;
        collector.wait_for_rows(&published).await;
        let delivered_at = Instant::now();
        let gone = wait_until(Duration::from_secs(10), async || {
            count_where(&env, &published, "true").await == 0
        })
        .await;
        let gone_after = delivered_at.elapsed();
        let left = count_where(&env, &published, "true").await;
        assert!(
            gone,
            "retention 0: {left} delivered rows still in the table 10 s after delivery\n{}",
            relay.log_tail(40)
        );
        wait_parked(&env, &kept, &relay).await;
        assert_kept(&env, &kept).await;
        let pg = env.pg.lock().await;
        let row = pg
            .query_one(
                &format!(
                    "SELECT count(*), count(*) FILTER (WHERE published_at IS NOT NULL),
                            count(*) FILTER (WHERE dead_lettered_at IS NOT NULL OR available_at > now())
                       FROM \"{}\".deleted_rows",
                    env.schema
                ),
                &[],
            )
            .await
            .expect("deletion log");
        drop(pg);
        let (n, were_marked, pending_deleted): (i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2));
        let deleted_metric = metric_value(
            &relay.metrics().await,
            "outbox_relay_messages_deleted_total",
        )
        .unwrap_or(0.0);
        println!(
            "RETENTION 0: {n} rows deleted, {were_marked} of them marked published first; all gone {:.0?} after the last delivery; messages_deleted_total {deleted_metric}",
            gone_after
        );
        assert_eq!(
            env.published_count().await,
            0,
            "retention 0 keeps no published row"
        );
        assert_eq!(
            n,
            published.len() as i64,
            "deleted rows other than the delivered ones"
        );
        assert_eq!(pending_deleted, 0, "retention 0 deleted a pending row");
        assert_eq!(
            relay.terminate(Duration::from_secs(20)).await.code(),
            Some(0)
        );
    }
}

// ---------------------------------------------------------------------------
// Throughput with 1, 2 and 3 relays
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_throughput_with_one_two_three_relays() {
    const ROWS: i64 = 20_000;
    const KEYS: i64 = 500;
    let mut figures = Vec::new();
    for n in 1..=3usize {
        let env = TestEnv::new(&format!("scale_tp_{n}")).await;
        let queue = env.declare_queue("events").await;
        let collector = env.consume(&queue, AckMode::Auto).await;
        let mut relays = Vec::new();
        for _ in 0..n {
            relays.push(Launch::new().start(&env).await);
        }
        // Measure the steady state: wait for the split first (a relay alone at
        // first takes everything, the others get their share after the ttl).
        let names: Vec<&str> = relays.iter().map(|r| r.instance.as_str()).collect();
        wait_for_leases(&env, Duration::from_secs(60), "fair split", |l| {
            fairly_split(l, &names)
        })
        .await;

        let t0 = Instant::now();
        let inserted = env.insert_bulk(&queue, ROWS, KEYS).await;
        let committed = t0.elapsed();
        // Bounded, but generous: the rate is what is measured, and it varies
        // with the load of the shared machine.
        collector
            .wait_for_ids(&ids_of(&inserted), Duration::from_secs(150))
            .await;
        let drained = t0.elapsed() - committed;
        let received = collector.stop().await;

        // Per-key order, by id.
        let rows: HashMap<String, (String, i64)> = env
            .rows()
            .await
            .into_iter()
            .filter_map(|r| {
                r.partition_key
                    .map(|k| (r.message_id.to_string(), (k, r.id)))
            })
            .collect();
        let mut seen = HashSet::new();
        let mut last: HashMap<&str, i64> = HashMap::new();
        let mut violations = 0;
        for r in &received {
            let Some(mid) = &r.message_id else { continue };
            if !seen.insert(mid.clone()) {
                continue;
            }
            if let Some((k, id)) = rows.get(mid) {
                if last.get(k.as_str()).is_some_and(|prev| prev >= id) {
                    violations += 1;
                }
                last.insert(k.as_str(), *id);
            }
        }
        let per_relay: Vec<f64> = {
            let mut v = Vec::new();
            for r in &relays {
                v.push(published_total(r).await);
            }
            v
        };
        let rate = ROWS as f64 / drained.as_secs_f64();
        println!(
            "THROUGHPUT {n} relay(s) (debug build, {KEYS} keys): {ROWS} rows drained in {:.2} s after commit = {rate:.0} msg/s \
             (insert took {:.2} s; {} deliveries, {} duplicates; per relay published {per_relay:?})",
            drained.as_secs_f64(),
            committed.as_secs_f64(),
            received.len(),
            received.len() - seen.len()
        );
        figures.push((n, rate));
        assert_eq!(seen.len() as i64, ROWS, "every row arrives");
        assert_eq!(violations, 0, "per-key order broken with {n} relays");
        for r in &mut relays {
            assert_eq!(r.terminate(Duration::from_secs(20)).await.code(), Some(0));
        }
    }
    println!(
        "THROUGHPUT summary: {}",
        figures
            .iter()
            .map(|(n, r)| format!("{n} relay(s) {r:.0} msg/s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

// ---------------------------------------------------------------------------
// Per-key order when a transaction commits rows below the claim position
// ---------------------------------------------------------------------------

/// A transaction writes row 1 of a key, stays open while other writers commit
/// newer rows and the relay is busy publishing them, then writes row 2 of the
/// key and commits. Row 1 has a lower id than everything the relay is working
/// through; row 2 a higher one. Row 1 must still go out first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_key_order_holds_when_a_long_transaction_commits_below_the_claim_position() {
    const ROUNDS: usize = 8;
    let (env, queue, collector) = TestEnv::with_events_queue("scale_cursor", AckMode::Auto).await;
    let mut relay = Launch::new().start(&env).await;
    let me = [relay.instance.as_str()];
    wait_for_leases(
        &env,
        Duration::from_secs(30),
        "the relay holds everything",
        |l| all_held_by(l, &me),
    )
    .await;

    let mut slow = Vec::new();
    let mut wanted = HashSet::new();
    for round in 0..ROUNDS {
        let key = format!("slow-{round}");
        let row = |seq: i64| {
            let mut r = NewRow::to_queue(&queue, format!("{key}:{seq}")).key(&key);
            r.headers = serde_json::json!({ "key": key, "seq": seq });
            r
        };
        let mut client = env.connect_db().await;
        let tx = client.transaction().await.expect("begin");
        let first = insert_row(&tx, &env.schema, &row(1)).await;
        let before = collector.len();
        let others = env.insert_bulk(&queue, 2000, 100).await;
        wanted.extend(ids_of(&others));
        // The relay is publishing the newer rows: commit row 2 of the key now.
        let busy = wait_until(Duration::from_secs(20), async || {
            collector.len() >= before + 200
        })
        .await;
        assert!(busy, "the relay did not start on the newer rows");
        let second = insert_row(&tx, &env.schema, &row(2)).await;
        tx.commit().await.expect("commit");
        for (ins, seq) in [(first, 1), (second, 2)] {
            slow.push(Written {
                id: ins.id,
                message_id: ins.message_id,
                key: key.clone(),
                seq,
            });
        }
        // Rounds are independent trials: the next starts on an idle relay.
        wanted.extend(ids_of_written(&slow));
        collector.wait_for_ids(&wanted, ARRIVAL_TIMEOUT).await;
    }
    collector.wait_for_ids(&wanted, ARRIVAL_TIMEOUT).await;
    let received = collector.stop().await;
    let report = DeliveryReport::of(&slow, &received);
    report.print("long transactions below the claim position");
    let pg = env.pg.lock().await;
    for w in &slow {
        let r = pg
            .query_one(
                &format!(
                    "SELECT published_at::text FROM {} WHERE id = $1",
                    env.table()
                ),
                &[&w.id],
            )
            .await
            .expect("published_at");
        let published_at: Option<String> = r.get(0);
        let arrival = received
            .iter()
            .position(|d| d.message_id.as_deref() == Some(&w.message_id.to_string()));
        println!(
            "  {} seq {} id {:>6}: published_at {published_at:?}, first delivery #{arrival:?}",
            w.key, w.seq, w.id
        );
    }
    drop(pg);
    report.assert_ok();
    assert_eq!(
        relay.terminate(Duration::from_secs(20)).await.code(),
        Some(0)
    );
}
