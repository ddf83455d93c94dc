//! The alert rules of `deploy/prometheus/alerts.yml` in a real Prometheus
//! (Debian's `prometheus` package, which `make services` installs), scraping
//! live relays, each situation its alerts exist for on its own schema and
//! under its own `job` label: each alert fires in its situation, only there,
//! and resolves once it is over. The rules are loaded as shipped, except that
//! every `for:` is shortened to 5 s. The same Prometheus evaluates every query
//! of the Grafana dashboard (and of its variables): none may error or be empty.
//!
//! Each situation prints one line per alert (`ALERT ...`: when it fired and
//! when it resolved), also written to `prometheus-alerts.txt` beside the test
//! logs.

// The shared harness times real processes and services with the real clock.
#![allow(clippy::disallowed_types)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use outbox_test_kit::faults::{url_addr, url_via};
use outbox_test_kit::proxy::FaultProxy;
use outbox_test_kit::Launch;
use outbox_test_kit::*;
use serde_json::{json, Value};

/// What every rule's `for:` becomes here.
const SHORT_FOR: &str = "5s";
/// Bound on one alert firing or resolving (rules evaluate every second; the
/// relays refresh backlog gauges every 5 s while rows are pending).
const ALERT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long an alert that must not fire is watched after its situation began.
const QUIET_FOR: Duration = Duration::from_secs(15);
/// The job under which the test's Prometheus scrapes itself.
const SELF_JOB: &str = "prometheus";

// ---------------------------------------------------------------------------
// A private Prometheus
// ---------------------------------------------------------------------------

struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    targets_file: PathBuf,
    /// job -> scrape addresses, written to the file_sd file on each change.
    targets: Mutex<Vec<(String, Vec<SocketAddr>)>>,
    started: Instant,
    report: Mutex<Vec<String>>,
}

impl Prometheus {
    /// Starts `prometheus` on a free port with the shipped rules (every `for:`
    /// shortened) and an empty file_sd target list; None if the binary is
    /// not installed.
    async fn start() -> Option<Prometheus> {
        let found = Command::new("prometheus")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return None;
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("outbox-relay-tests")
            .join(format!("prometheus-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("create prometheus dir");
        let rules = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml"))
            .expect("read deploy/prometheus/alerts.yml");
        let rules_file = dir.join("alerts.yml");
        save(&rules_file, &shorten_for(&rules));
        let targets_file = dir.join("targets.json");
        save(&targets_file, "[]");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // Prometheus also scrapes itself (job `prometheus`), as most do: a
        // target that is no relay, which relay panels must not count.
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: outbox-relay\n    file_sd_configs:\n      - files: ['{}']\n        refresh_interval: 1s\n\
             \x20 - job_name: {SELF_JOB}\n    static_configs:\n      - targets: ['{addr}']\n",
            rules_file.display(),
            targets_file.display()
        );
        let config_file = dir.join("prometheus.yml");
        save(&config_file, &config);
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("create log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let prom = Prometheus {
            child,
            addr,
            dir,
            targets_file,
            targets: Mutex::new(Vec::new()),
            started: Instant::now(),
            report: Mutex::new(Vec::new()),
        };
        let ready = wait_until(SETUP_TIMEOUT, async || {
            matches!(http_get(addr, "/-/ready").await, Ok((200, _)))
        })
        .await;
        assert!(ready, "prometheus not ready on {addr}\n{}", prom.log());
        Some(prom)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Scrapes `addrs` under `job` from now on (an empty list: none).
    fn set_targets(&self, job: &str, addrs: &[SocketAddr]) {
        let mut all = self.targets.lock().unwrap();
        all.retain(|(j, _)| j != job);
        all.push((job.to_string(), addrs.to_vec()));
        let doc: Vec<Value> = all
            .iter()
            .filter(|(_, a)| !a.is_empty())
            .map(|(job, addrs)| {
                json!({
                    "targets": addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                    "labels": {"job": job},
                })
            })
            .collect();
        // Written whole then renamed: Prometheus never reads half a file.
        let tmp = self.targets_file.with_extension("tmp");
        save(&tmp, &Value::Array(doc).to_string());
        std::fs::rename(&tmp, &self.targets_file).expect("replace targets file");
    }

    async fn api(&self, path_and_query: &str) -> Result<Value, String> {
        let (status, body) = http_get(self.addr, path_and_query)
            .await
            .map_err(|e| format!("GET {path_and_query}: {e}"))?;
        let json: Value = serde_json::from_str(&body)
            .map_err(|e| format!("GET {path_and_query}: {status} {e}: {body}"))?;
        if status != 200 || json["status"] != "success" {
            return Err(format!("GET {path_and_query}: {status} {body}"));
        }
        Ok(json["data"].clone())
    }

    /// An instant query's result vector.
    async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let q: String = url::form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let data = self.api(&format!("/api/v1/query?query={q}")).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until `promql` has a non-empty result.
    async fn wait_for(&self, promql: &str, what: &str) {
        let mut last = Err(String::new());
        let ok = wait_until(ALERT_TIMEOUT, async || {
            last = self.query(promql).await;
            last.as_ref().is_ok_and(|r| !r.is_empty())
        })
        .await;
        assert!(
            ok,
            "{what}: `{promql}` still empty after {ALERT_TIMEOUT:?}: {last:?}\n{}",
            self.log_tail()
        );
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "--- prometheus log, last lines ---\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    /// The state ("pending" or "firing") of alert `name` for `job` (and
    /// `instance` when given); None when it is not active.
    async fn alert_state(&self, name: &str, job: &str, instance: Option<&str>) -> Option<String> {
        let data = match self.api("/api/v1/alerts").await {
            Ok(d) => d,
            Err(e) => panic!("reading alerts: {e}"),
        };
        data["alerts"].as_array()?.iter().find_map(|a| {
            let l = &a["labels"];
            (l["alertname"] == name
                && l["job"] == job
                && instance.is_none_or(|i| l["instance"] == i))
            .then(|| a["state"].as_str().unwrap_or("").to_string())
        })
    }

    /// Waits until the alert fires; returns how long that took from `since`.
    async fn wait_firing(
        &self,
        name: &str,
        job: &str,
        instance: Option<&str>,
        since: Instant,
    ) -> Duration {
        let fired = wait_until(ALERT_TIMEOUT, async || {
            self.alert_state(name, job, instance).await.as_deref() == Some("firing")
        })
        .await;
        assert!(
            fired,
            "{name} (job {job}, instance {instance:?}) did not fire within {ALERT_TIMEOUT:?}; alerts now: {}",
            self.api("/api/v1/alerts").await.map(|d| d.to_string()).unwrap_or_default()
        );
        since.elapsed()
    }

    /// Waits until the alert is no longer active; returns how long that took
    /// from `since`.
    async fn wait_resolved(
        &self,
        name: &str,
        job: &str,
        instance: Option<&str>,
        since: Instant,
    ) -> Duration {
        let gone = wait_until(ALERT_TIMEOUT, async || {
            self.alert_state(name, job, instance).await.is_none()
        })
        .await;
        assert!(
            gone,
            "{name} (job {job}, instance {instance:?}) still active {ALERT_TIMEOUT:?} after its situation ended; alerts now: {}",
            self.api("/api/v1/alerts").await.map(|d| d.to_string()).unwrap_or_default()
        );
        since.elapsed()
    }

    /// Fails if any of `names` becomes active (pending or firing) for `job`
    /// (and `instance`) within `quiet`.
    async fn assert_quiet(
        &self,
        names: &[&str],
        job: &str,
        instance: Option<&str>,
        quiet: Duration,
    ) {
        let until = Instant::now() + quiet;
        while Instant::now() < until {
            for name in names {
                if let Some(state) = self.alert_state(name, job, instance).await {
                    panic!("{name} is {state} for job {job} (instance {instance:?}) although its situation does not hold");
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn note(&self, situation: &str, alert: &str, fired: Duration, resolved: Option<Duration>) {
        let line = format!(
            "ALERT {alert:<34} situation: {situation:<44} fired after {:>5.1}s{}",
            fired.as_secs_f64(),
            resolved.map_or_else(String::new, |r| format!(
                ", resolved {:.1}s after the situation ended",
                r.as_secs_f64()
            ))
        );
        println!("{line}");
        self.report.lock().unwrap().push(line);
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(self.dir.join("data"));
    }
}

/// Every `for: <duration>` of a rules file becomes `for: SHORT_FOR`.
fn shorten_for(rules: &str) -> String {
    rules
        .lines()
        .map(|line| {
            let indent = line.len() - line.trim_start().len();
            if line.trim_start().starts_with("for:") {
                format!("{}for: {SHORT_FOR}", &line[..indent])
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

// ---------------------------------------------------------------------------
// The dashboard's queries
// ---------------------------------------------------------------------------

/// Every PromQL query of the dashboard: panel `expr`s and the query
/// variables (Grafana's `label_values(m, l)` as `count by (l) (m)`), with
/// Grafana's variables replaced by concrete values for `job`.
fn dashboard_queries(job: &str) -> Vec<String> {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("deploy/grafana/outbox-relay.json"))
        .expect("read the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut raw = Vec::new();
    walk(&dashboard, &mut raw);
    raw.sort();
    raw.dedup();
    raw.into_iter()
        .map(|q| {
            let q = q
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "1m")
                .replace("$__range", "5m")
                .replace("$job", job)
                .replace("$instance", ".*");
            match q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .and_then(|r| r.rsplit_once(','))
            {
                Some((metric, label)) => format!("count by ({}) ({metric})", label.trim()),
                None => q,
            }
        })
        .collect()
}

/// The queries of the dashboard panel titled `title`, with `$job` as given
/// and every instance.
fn panel_queries(title: &str, job: &str) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("deploy/grafana/outbox-relay.json"))
        .expect("read the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard JSON");
    fn find<'a>(value: &'a Value, title: &str, out: &mut Vec<&'a Value>) {
        match value {
            Value::Object(map) => {
                if map.get("title").and_then(Value::as_str) == Some(title) {
                    out.push(value);
                }
                map.values().for_each(|v| find(v, title, out));
            }
            Value::Array(items) => items.iter().for_each(|v| find(v, title, out)),
            _ => {}
        }
    }
    let mut panels = Vec::new();
    find(&dashboard, title, &mut panels);
    assert_eq!(panels.len(), 1, "one panel titled {title:?}");
    panels[0]["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["expr"].as_str())
        .map(|q| q.replace("$job", job).replace("$instance", ".*"))
        .collect()
}

/// The live-relay panel counts relays, not scrape targets: for the job of
/// Prometheus's own target (up) it reads 0, so with the job variable at
/// "All" it counts exactly the relays.
async fn live_relay_panel_counts_relays_only(prom: &Prometheus) {
    prom.wait_for(
        &format!("up{{job=\"{SELF_JOB}\"}} == 1"),
        "Prometheus scrapes itself",
    )
    .await;
    let queries = panel_queries("Relays up", SELF_JOB);
    assert!(!queries.is_empty(), "the Relays up panel has no query");
    for q in queries {
        let result = prom.query(&q).await.unwrap_or_else(|e| panic!("{q}: {e}"));
        let values: Vec<&str> = result
            .iter()
            .filter_map(|r| r["value"][1].as_str())
            .collect();
        assert_eq!(
            values,
            ["0"],
            "`{q}` counts Prometheus's own target as a relay: {result:?}"
        );
    }
    println!(
        "PANEL Relays up reads 0 for job {SELF_JOB} (Prometheus's own target, up == 1): it counts relays only"
    );
}

/// Evaluates every dashboard query for `job`; returns the ones that erred or
/// came back empty.
async fn broken_dashboard_queries(prom: &Prometheus, job: &str) -> Vec<String> {
    let mut broken = Vec::new();
    for q in dashboard_queries(job) {
        match prom.query(&q).await {
            Ok(r) if r.is_empty() => broken.push(format!("empty: {q}")),
            Ok(_) => {}
            Err(e) => broken.push(format!("error: {q}: {e}")),
        }
    }
    broken
}

// ---------------------------------------------------------------------------
// Situations
// ---------------------------------------------------------------------------

/// Waits until Prometheus scrapes `relay` under `job`.
async fn wait_scraped(prom: &Prometheus, job: &str, relay: &Relay) {
    prom.wait_for(
        &format!(
            "outbox_relay_build_info{{job=\"{job}\",instance=\"{}\"}}",
            relay.metrics_addr()
        ),
        &format!("relay {} scraped under job {job}", relay.instance),
    )
    .await;
}

/// A row that failed once and backs off for an hour, created two hours ago:
/// late (LagHigh and LagCritical), and left alone by the relay.
async fn insert_late_row(env: &TestEnv, queue: &str) -> i64 {
    // Not due when written, so the relay never claims it.
    let mut late = NewRow::to_queue(queue, "late");
    late.available_in_secs = Some(3600.0);
    let row = env.insert_committed(&[late]).await.remove(0);
    env.exec(
        &format!(
            "UPDATE {} SET created_at = now() - interval '2 hours', attempts = 1 WHERE id = $1",
            env.table()
        ),
        &[&row.id],
    )
    .await;
    row.id
}

/// Publishes one row and waits for it: the relay refreshes its backlog
/// gauges within 5 s of publishing, where an idle relay takes up to 60 s
/// (README "Metrics and health").
async fn publish_one(env: &TestEnv, queue: &str, collector: &Collector) {
    let sent = env
        .insert_committed(&[NewRow::to_queue(queue, "nudge")])
        .await;
    collector.wait_for_rows(&sent).await;
}

/// Lag: a row two hours late while a healthy relay runs. Both lag alerts fire,
/// nothing else does, and both resolve once the row is gone. The dashboard is
/// evaluated here, once the relay has published.
async fn lag(prom: &Prometheus) {
    const JOB: &str = "lag";
    let (env, queue, collector) = TestEnv::with_events_queue("prom_lag", AckMode::Auto).await;
    let relay = Launch::new().start(&env).await;
    prom.set_targets(JOB, &[relay.metrics_addr()]);
    wait_scraped(prom, JOB, &relay).await;
    let sent = env
        .insert_committed(&[NewRow::to_queue(&queue, "on time")])
        .await;
    collector.wait_for_rows(&sent).await;
    // Every panel has data once a publish and a minute's rate window exist.
    prom.wait_for(
        &format!("outbox_relay_last_publish_timestamp_seconds{{job=\"{JOB}\"}} > 0"),
        "the relay's publish scraped",
    )
    .await;
    let mut broken = Vec::new();
    let evaluated = wait_until(ALERT_TIMEOUT, async || {
        broken = broken_dashboard_queries(prom, JOB).await;
        broken.is_empty()
    })
    .await;
    assert!(
        evaluated,
        "dashboard queries that err or are empty with a healthy relay that published:\n  {}",
        broken.join("\n  ")
    );
    println!(
        "DASHBOARD {} queries evaluated for job {JOB}: none erred or was empty",
        dashboard_queries(JOB).len()
    );

    let started = Instant::now();
    let late = insert_late_row(&env, &queue).await;
    publish_one(&env, &queue, &collector).await;
    let high = prom
        .wait_firing("OutboxRelayLagHigh", JOB, None, started)
        .await;
    let critical = prom
        .wait_firing("OutboxRelayLagCritical", JOB, None, started)
        .await;
    prom.assert_quiet(
        &[
            "OutboxRelayNoPartitionsOwned",
            "OutboxRelayBrokerDisconnected",
            "OutboxRelayDatabaseDisconnected",
            "OutboxRelayDeadLetters",
        ],
        JOB,
        None,
        Duration::from_secs(3),
    )
    .await;

    env.exec(
        &format!("DELETE FROM {} WHERE id = $1", env.table()),
        &[&late],
    )
    .await;
    let over = Instant::now();
    publish_one(&env, &queue, &collector).await;
    let high_gone = prom
        .wait_resolved("OutboxRelayLagHigh", JOB, None, over)
        .await;
    let critical_gone = prom
        .wait_resolved("OutboxRelayLagCritical", JOB, None, over)
        .await;
    let what = "lag (a due row 2 h late, relay running)";
    prom.note(what, "OutboxRelayLagHigh", high, Some(high_gone));
    prom.note(
        what,
        "OutboxRelayLagCritical",
        critical,
        Some(critical_gone),
    );
    collector.stop().await;
}

/// Rows parked and left: the dead-letter alert fires, stays while the row is
/// parked, and resolves once it is discarded.
async fn parked(prom: &Prometheus) {
    const JOB: &str = "parked";
    let (env, queue, collector) = TestEnv::with_events_queue("prom_parked", AckMode::Auto).await;
    let relay = Launch::new()
        .args(&["--max-attempts", "1"])
        .start(&env)
        .await;
    prom.set_targets(JOB, &[relay.metrics_addr()]);
    wait_scraped(prom, JOB, &relay).await;

    let started = Instant::now();
    let mut bad = NewRow::to_queue(&queue, "to nowhere");
    bad.exchange = env.unique("missing");
    let bad = env.insert_committed(&[bad]).await.remove(0);
    let parked = wait_until(ARRIVAL_TIMEOUT, async || {
        env.rows()
            .await
            .iter()
            .any(|r| r.id == bad.id && r.dead_lettered_at.is_some())
    })
    .await;
    assert!(parked, "the row to a missing exchange was not parked");
    publish_one(&env, &queue, &collector).await;
    let fired = prom
        .wait_firing("OutboxRelayDeadLetters", JOB, None, started)
        .await;
    // Left alone, it stays firing: nothing resolves it but the operator.
    let kept = wait_until(QUIET_FOR, async || {
        prom.alert_state("OutboxRelayDeadLetters", JOB, None)
            .await
            .as_deref()
            != Some("firing")
    })
    .await;
    assert!(
        !kept,
        "OutboxRelayDeadLetters resolved while the row stayed parked"
    );

    let out = env
        .cli(&["dead-letters", "discard", "--all"], SETUP_TIMEOUT)
        .await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let over = Instant::now();
    publish_one(&env, &queue, &collector).await;
    let resolved = prom
        .wait_resolved("OutboxRelayDeadLetters", JOB, None, over)
        .await;
    prom.note(
        "rows parked and left (1 dead letter, then discarded)",
        "OutboxRelayDeadLetters",
        fired,
        Some(resolved),
    );
    collector.stop().await;
}

/// Every relay gone: no series of the job is left, and the absent() branch
/// of the no-owner alert fires (with OutboxRelayDown for the dead target).
/// Both resolve once a relay runs again.
async fn every_relay_gone(prom: &Prometheus) {
    // The job the shipped rules name in absent() and OutboxRelayDown.
    const JOB: &str = "outbox-relay";
    let env = TestEnv::new("prom_gone").await;
    let mut relay = Launch::new().start(&env).await;
    prom.set_targets(JOB, &[relay.metrics_addr()]);
    wait_scraped(prom, JOB, &relay).await;
    // Pending since Prometheus started with no relay (absent()): it clears.
    prom.wait_resolved("OutboxRelayNoPartitionsOwned", JOB, None, Instant::now())
        .await;
    prom.assert_quiet(
        &["OutboxRelayNoPartitionsOwned"],
        JOB,
        None,
        Duration::from_secs(3),
    )
    .await;

    let started = Instant::now();
    relay.kill();
    let no_owner = prom
        .wait_firing("OutboxRelayNoPartitionsOwned", JOB, None, started)
        .await;
    let down = prom
        .wait_firing(
            "OutboxRelayDown",
            JOB,
            Some(&relay.metrics_addr().to_string()),
            started,
        )
        .await;

    let over = Instant::now();
    let back = Launch::new().start(&env).await;
    prom.set_targets(JOB, &[back.metrics_addr()]);
    let no_owner_gone = prom
        .wait_resolved("OutboxRelayNoPartitionsOwned", JOB, None, over)
        .await;
    let down_gone = prom.wait_resolved("OutboxRelayDown", JOB, None, over).await;
    let what = "every relay gone (the only relay killed)";
    prom.note(
        what,
        "OutboxRelayNoPartitionsOwned",
        no_owner,
        Some(no_owner_gone),
    );
    prom.note(what, "OutboxRelayDown", down, Some(down_gone));
}

/// The database cut for one relay (through a proxy), and one relay started
/// without any: the database alert fires for each, the broker alert for
/// neither (they never try the broker, or it is not their fault), no lag or
/// no-owner alert while a healthy relay publishes. Resolves when the
/// database is back.
async fn database_cut(prom: &Prometheus) {
    const JOB: &str = "dbcut";
    let env = TestEnv::new("prom_dbcut").await;
    let healthy = Launch::new().start(&env).await;
    let proxy = FaultProxy::start(url_addr(&env.db_url, 5432)).await;
    let cut = Launch::new()
        .db_url(&url_via(&env.db_url, proxy.port()))
        .start(&env)
        .await;
    let closed = ClosedPort::new();
    let mut without = Launch::new()
        .db_url(&url_via(&env.db_url, closed.port))
        .spawn(&env);
    without.wait_started(SETUP_TIMEOUT).await;
    prom.set_targets(
        JOB,
        &[
            healthy.metrics_addr(),
            cut.metrics_addr(),
            without.metrics_addr(),
        ],
    );
    for relay in [&healthy, &cut, &without] {
        wait_scraped(prom, JOB, relay).await;
    }
    prom.wait_for(
        &format!(
            "outbox_relay_database_connected{{job=\"{JOB}\",instance=\"{}\"}} == 1",
            cut.metrics_addr()
        ),
        "the proxied relay connected to its database",
    )
    .await;

    let started = Instant::now();
    proxy.go_down();
    let cut_instance = cut.metrics_addr().to_string();
    let without_instance = without.metrics_addr().to_string();
    let fired = prom
        .wait_firing(
            "OutboxRelayDatabaseDisconnected",
            JOB,
            Some(&cut_instance),
            started,
        )
        .await;
    let fired_without = prom
        .wait_firing(
            "OutboxRelayDatabaseDisconnected",
            JOB,
            Some(&without_instance),
            started,
        )
        .await;
    prom.assert_quiet(
        &[
            "OutboxRelayBrokerDisconnected",
            "OutboxRelayLagHigh",
            "OutboxRelayNoPartitionsOwned",
        ],
        JOB,
        None,
        QUIET_FOR,
    )
    .await;

    proxy.come_back();
    let over = Instant::now();
    let resolved = prom
        .wait_resolved(
            "OutboxRelayDatabaseDisconnected",
            JOB,
            Some(&cut_instance),
            over,
        )
        .await;
    prom.note(
        "database cut for one relay of three (proxy down)",
        "OutboxRelayDatabaseDisconnected",
        fired,
        Some(resolved),
    );
    prom.note(
        "a relay started without its database",
        "OutboxRelayDatabaseDisconnected",
        fired_without,
        None,
    );
    println!("ALERT OutboxRelayBrokerDisconnected did not fire for either relay without its database ({QUIET_FOR:?} watched)");
    drop(without);
}

/// RabbitMQ cut for one of two relays (through a proxy): the broker alert
/// fires for that one only, no database alert; it resolves when the broker
/// is back.
async fn broker_cut(prom: &Prometheus) {
    const JOB: &str = "brokercut";
    let env = TestEnv::new("prom_brokercut").await;
    let healthy = Launch::new().start(&env).await;
    let proxy = FaultProxy::start(url_addr(&env.amqp_url, 5672)).await;
    let mut cut = Launch::new()
        .amqp_url(&url_via(&env.amqp_url, proxy.port()))
        .start(&env)
        .await;
    cut.wait_ready(SETUP_TIMEOUT).await;
    prom.set_targets(JOB, &[healthy.metrics_addr(), cut.metrics_addr()]);
    wait_scraped(prom, JOB, &healthy).await;
    wait_scraped(prom, JOB, &cut).await;

    let started = Instant::now();
    proxy.go_down();
    let cut_instance = cut.metrics_addr().to_string();
    let fired = prom
        .wait_firing(
            "OutboxRelayBrokerDisconnected",
            JOB,
            Some(&cut_instance),
            started,
        )
        .await;
    prom.assert_quiet(
        &["OutboxRelayDatabaseDisconnected"],
        JOB,
        None,
        Duration::from_secs(3),
    )
    .await;
    prom.assert_quiet(
        &["OutboxRelayBrokerDisconnected"],
        JOB,
        Some(&healthy.metrics_addr().to_string()),
        Duration::from_secs(3),
    )
    .await;

    proxy.come_back();
    let over = Instant::now();
    let resolved = prom
        .wait_resolved(
            "OutboxRelayBrokerDisconnected",
            JOB,
            Some(&cut_instance),
            over,
        )
        .await;
    prom.note(
        "RabbitMQ cut for one relay of two (proxy down)",
        "OutboxRelayBrokerDisconnected",
        fired,
        Some(resolved),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_alert_fires_in_its_situation_only_and_resolves_after_it() {
    let Some(prom) = Prometheus::start().await else {
        cannot_run(
            "each_alert_fires_in_its_situation_only_and_resolves_after_it",
            "no `prometheus` binary (make services installs Debian's package)",
        );
        return;
    };
    live_relay_panel_counts_relays_only(&prom).await;
    tokio::join!(
        lag(&prom),
        parked(&prom),
        every_relay_gone(&prom),
        database_cut(&prom),
        broker_cut(&prom),
    );
    let mut report = prom.report.lock().unwrap().clone();
    report.sort();
    report.push(format!(
        "all situations done in {:.0}s",
        prom.started.elapsed().as_secs_f64()
    ));
    save(
        &PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("outbox-relay-tests")
            .join("prometheus-alerts.txt"),
        &(report.join("\n") + "\n"),
    );
}

/// RabbitMQ cut for one of two relays: it releases its partitions (its
/// `partitions_owned` reads 0, the healthy one owns all 32), every row
/// written meanwhile is delivered, and neither a lag nor a no-owner alert
/// fires. RabbitMQ cut for the only relay: a due row has no live owner and
/// OutboxRelayNoPartitionsOwned fires; it resolves when the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cut_from_rabbitmq_hands_its_partitions_over_and_no_lag_alert_fires() {
    let Some(prom) = Prometheus::start().await else {
        cannot_run(
            "a_relay_cut_from_rabbitmq_hands_its_partitions_over_and_no_lag_alert_fires",
            "no `prometheus` binary (make services installs Debian's package)",
        );
        return;
    };
    tokio::join!(handoff_with_a_healthy_replica(&prom), only_relay_cut(&prom));
}

async fn handoff_with_a_healthy_replica(prom: &Prometheus) {
    const JOB: &str = "handoff";
    let (env, queue, collector) = TestEnv::with_events_queue("prom_handoff", AckMode::Auto).await;
    let healthy = Launch::new().start(&env).await;
    let proxy = FaultProxy::start(url_addr(&env.amqp_url, 5672)).await;
    let mut cut = Launch::new()
        .amqp_url(&url_via(&env.amqp_url, proxy.port()))
        .start(&env)
        .await;
    cut.wait_ready(SETUP_TIMEOUT).await;
    prom.set_targets(JOB, &[healthy.metrics_addr(), cut.metrics_addr()]);
    wait_scraped(prom, JOB, &healthy).await;
    wait_scraped(prom, JOB, &cut).await;

    proxy.go_down();
    let cut_instance = cut.metrics_addr();
    prom.wait_for(
        &format!("outbox_relay_partitions_owned{{job=\"{JOB}\",instance=\"{cut_instance}\"}} == 0"),
        "the relay cut from RabbitMQ released its partitions",
    )
    .await;
    prom.wait_for(
        &format!("sum(outbox_relay_partitions_owned{{job=\"{JOB}\"}}) == 32"),
        "the healthy relay owns every partition",
    )
    .await;
    let rows: Vec<NewRow> = (0..100)
        .map(|i| NewRow::to_queue(&queue, format!("during-cut-{i}")).key(&format!("k{i}")))
        .collect();
    let sent = env.insert_committed(&rows).await;
    collector.wait_for_rows(&sent).await;
    prom.assert_quiet(
        &[
            "OutboxRelayLagHigh",
            "OutboxRelayNoPartitionsOwned",
            "OutboxRelayDatabaseDisconnected",
        ],
        JOB,
        None,
        QUIET_FOR,
    )
    .await;
    proxy.come_back();
    collector.stop().await;
}

async fn only_relay_cut(prom: &Prometheus) {
    const JOB: &str = "onlycut";
    let env = TestEnv::new("prom_onlycut").await;
    let queue = env.declare_queue("events").await;
    let proxy = FaultProxy::start(url_addr(&env.amqp_url, 5672)).await;
    let mut relay = Launch::new()
        .amqp_url(&url_via(&env.amqp_url, proxy.port()))
        .start(&env)
        .await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    prom.set_targets(JOB, &[relay.metrics_addr()]);
    wait_scraped(prom, JOB, &relay).await;

    let started = Instant::now();
    proxy.go_down();
    env.insert_committed(&[NewRow::to_queue(&queue, "stranded")])
        .await;
    let fired = prom
        .wait_firing("OutboxRelayNoPartitionsOwned", JOB, None, started)
        .await;
    proxy.come_back();
    let over = Instant::now();
    let resolved = prom
        .wait_resolved("OutboxRelayNoPartitionsOwned", JOB, None, over)
        .await;
    prom.note(
        "RabbitMQ cut for the only relay, a due row waiting",
        "OutboxRelayNoPartitionsOwned",
        fired,
        Some(resolved),
    );
}
