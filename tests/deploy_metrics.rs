//! The shipped dashboard and alert rules (README "Operations") read only
//! metrics the relay exports: every `outbox_relay_*` name in the PromQL of
//! `deploy/grafana/*.json` and `deploy/prometheus/alerts.yml` is on a live
//! relay's `/metrics`, once it has published. `make deploy-check` checks the
//! same names against the registrations in `src/`; this checks the binary.

// The shared harness times real processes and services with the real clock.
#![allow(clippy::disallowed_types)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use outbox_test_kit::*;
use serde_json::Value;

const PREFIX: &str = "outbox_relay_";

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The `outbox_relay_*` identifiers in one PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let mut names = Vec::new();
    let mut from = 0;
    while let Some(found) = expr[from..].find(PREFIX) {
        let start = from + found;
        let end = start + bytes[start..].iter().take_while(|b| is_ident(**b)).count();
        // Part of a longer identifier (e.g. `my_outbox_relay_x`): not a name.
        if start == 0 || !is_ident(bytes[start - 1]) {
            names.push(expr[start..end].to_string());
        }
        from = end;
    }
    names
}

/// Every query string of a Grafana dashboard: panel targets (`expr`) and
/// query variables (`query`, as a string or an object, and `definition`).
fn dashboard_queries(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

/// The `expr:` values of a Prometheus rules file: inline, or a block scalar
/// (`expr: |`) whose lines are indented deeper than the key.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let indent = line.len() - line.trim_start().len();
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            exprs.push(block.join("\n"));
        } else {
            exprs.push(value.trim_matches(|c| c == '\'' || c == '"').to_string());
        }
    }
    exprs
}

/// Metric name -> the files that use it.
fn used_metric_names() -> BTreeMap<String, Vec<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<(PathBuf, Vec<String>)> = Vec::new();
    let mut dashboards: Vec<PathBuf> = std::fs::read_dir(root.join("deploy/grafana"))
        .expect("read deploy/grafana")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    dashboards.sort();
    assert!(!dashboards.is_empty(), "no dashboard in deploy/grafana");
    for path in dashboards {
        let text = std::fs::read_to_string(&path).expect("read dashboard");
        let json: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
        let mut queries = Vec::new();
        dashboard_queries(&json, &mut queries);
        files.push((path, queries));
    }
    let alerts = root.join("deploy/prometheus/alerts.yml");
    let text = std::fs::read_to_string(&alerts).expect("read alerts.yml");
    files.push((alerts, rule_exprs(&text)));

    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (path, exprs) in files {
        let file = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .display()
            .to_string();
        let names: HashSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
        assert!(!names.is_empty(), "found no outbox_relay_ metric in {file}");
        for name in names {
            used.entry(name).or_default().push(file.clone());
        }
    }
    used
}

/// Whether `/metrics` has `name`: a sample of that name, a family described
/// by `# TYPE` (a labelled family may have no sample until its first label
/// set, e.g. broker_connections_total before a first connection), or a histogram's
/// `_bucket`/`_sum`/`_count` series.
fn exported(text: &str, name: &str) -> bool {
    let mut types: HashMap<&str, &str> = HashMap::new();
    let mut samples: HashSet<&str> = HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            if let (Some(family), Some(kind)) = (words.next(), words.next()) {
                types.insert(family, kind);
            }
        } else if !line.starts_with('#') {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(&line[..end]);
        }
    }
    samples.contains(name)
        || types.contains_key(name)
        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|family| types.get(family) == Some(&"histogram"))
        })
}

#[test]
fn names_are_read_from_promql_not_from_prose() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(outbox_relay_delivery_lag_seconds_bucket{job=~\"$job\"}[5m]))) / my_outbox_relay_x"
        ),
        vec!["outbox_relay_delivery_lag_seconds_bucket"]
    );
    let rules = "      - alert: A\n        expr: outbox_relay_broker_blocked == 1\n        for: 2m\n      - alert: B\n        expr: |\n          sum(outbox_relay_partitions_owned) == 0\n          and on (job)\n          max(outbox_relay_pending_messages) > 0\n        for: 2m\n        annotations:\n          summary: \"outbox_relay_not_a_query\"\n";
    assert_eq!(
        rule_exprs(rules),
        vec![
            "outbox_relay_broker_blocked == 1".to_string(),
            "sum(outbox_relay_partitions_owned) == 0\nand on (job)\nmax(outbox_relay_pending_messages) > 0"
                .to_string()
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_use_is_exported() {
    let used = used_metric_names();
    // The lag alerts and panels must be among them, or the extraction broke.
    for name in [
        "outbox_relay_oldest_pending_age_seconds",
        "outbox_relay_delivery_lag_seconds_bucket",
        "outbox_relay_broker_connected",
    ] {
        assert!(used.contains_key(name), "{name} not found in {used:?}");
    }

    let (env, queue, collector) = TestEnv::with_events_queue("deploy_metrics", AckMode::Auto).await;
    // One attempt: the row to a missing exchange is parked at its first failure.
    let relay = Launch::new()
        .args(&["--max-attempts", "1", "--poll-interval", "200ms"])
        .start(&env)
        .await;

    // Published rows fill the counters and histograms the panels read; one row
    // to an exchange that does not exist makes the failure and dead-letter
    // counters move (every failure reason is exported at 0 from the start).
    let mut rows: Vec<NewRow> = (0..20)
        .map(|i| {
            NewRow::to_queue(&queue, format!("deploy-metrics-{i}")).key(&format!("k{}", i % 4))
        })
        .collect();
    let mut bad = NewRow::to_queue(&queue, "to nowhere");
    bad.exchange = env.unique("missing");
    rows.push(bad);
    let inserted = env.insert_committed(&rows).await;
    let good = &inserted[..inserted.len() - 1];
    collector.wait_for_rows(good).await;
    // Rows are counted once marked, a moment after they arrive.
    let mut text = String::new();
    let counted = wait_until(ARRIVAL_TIMEOUT, async || {
        text = relay.metrics().await;
        let value = |name| metric_value(&text, name).unwrap_or(0.0);
        value("outbox_relay_messages_published_total") >= good.len() as f64
            && value("outbox_relay_messages_dead_lettered_total") >= 1.0
            && value("outbox_relay_publish_failures_total") >= 1.0
    })
    .await;
    assert!(
        counted,
        "not yet {} published, 1 dead-lettered and 1 failure in\n{text}",
        good.len()
    );

    let missing: Vec<String> = used
        .iter()
        .filter(|(name, _)| !exported(&text, name))
        .map(|(name, files)| format!("{name} (used in {})", files.join(", ")))
        .collect();
    assert!(
        missing.is_empty(),
        "the relay does not export {} metric(s) that deploy/ uses:\n  {}\n--- /metrics ---\n{text}",
        missing.len(),
        missing.join("\n  ")
    );
    collector.stop().await;
}

/// deploy/ is what users get: it may not send them to documents of this
/// project's own process (PRODUCT.md and its sections), only to the README.
#[test]
fn deploy_files_refer_to_nothing_users_do_not_have() {
    fn walk(dir: &std::path::Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read deploy/") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, found);
            } else if let Ok(text) = std::fs::read_to_string(&path) {
                for (n, line) in text.lines().enumerate() {
                    if line.contains("PRODUCT.md") {
                        found.push(format!("{}:{}: {line}", path.display(), n + 1));
                    }
                }
            }
        }
    }
    let mut found = Vec::new();
    walk(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy"),
        &mut found,
    );
    assert!(found.is_empty(), "{}", found.join("\n"));
}
