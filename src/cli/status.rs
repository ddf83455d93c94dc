//! `outbox-relay status`: backlog, dead letters, retention and leases.

use std::{fmt::Write as _, process::ExitCode};

use serde_json::{json, Value};

use super::{open_outbox, rfc3339, rfc3339_seconds, Out, Table};
use crate::{config::Connections, leases::LEASE_TTL, redact::redact_url, store::admin};

/// `outbox-relay status [--json]`: backlog, dead letters, retention and
/// leases; exit 1, with one `problem:` line each on stderr, when something
/// needs a person (see [`needs_a_person`]).
pub async fn status(conn: &Connections, as_json: bool) -> ExitCode {
    let out = Out::new(conn);
    let mut db = match open_outbox(conn, "outbox-relay status", &out).await {
        Ok(db) => db,
        Err(code) => return code,
    };
    let status = match admin::status(&mut db, &conn.schema).await {
        Ok(s) => s,
        Err(e) => return out.fail(&e),
    };
    if as_json {
        out.print(&format!("{:#}\n", status_json(&conn.schema, &status)));
    } else {
        out.print(&trim_lines(&status_text(
            &conn.schema,
            &redact_url(&conn.database_url),
            &status,
        )));
    }
    let problems = needs_a_person(&status);
    for problem in &problems {
        out.error(&format!("problem: {problem}"));
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_PROBLEM)
    }
}

/// What needs a person, each with what to do: no live relay at all, due rows
/// no live relay owns, rows parked as dead letters, and relays that stopped
/// renewing their leases without a clean stop (a clean stop removes the
/// relay's row): they lost their database, or died.
fn needs_a_person(s: &admin::Status) -> Vec<String> {
    let mut problems = Vec::new();
    let live = s.relays.iter().filter(|r| is_live(r)).count();
    if live == 0 {
        problems.push(
            "no live relay: nothing publishes this outbox; start `outbox-relay run` or find why the relays cannot reach the database".to_string(),
        );
    }
    if s.due_unowned > 0 {
        problems.push(format!(
            "{} due row{} in partition{} with no live owner ({}): nobody publishes them; check that the relays reach the database and RabbitMQ",
            s.due_unowned,
            super::plural(s.due_unowned),
            super::plural(s.unowned.len()),
            compact_ranges(&s.unowned)
        ));
    }
    if s.backlog.dead_lettered > 0 {
        problems.push(format!(
            "{} row{} parked as dead letters: see why with `outbox-relay dead-letters list`, then retry or discard them",
            s.backlog.dead_lettered,
            super::plural(s.backlog.dead_lettered)
        ));
    }
    for r in s.relays.iter().filter(|r| !is_live(r)) {
        if let Some(age) = r.heartbeat_age_secs {
            problems.push(format!(
                "relay {} has not renewed its leases for {}: it lost its database or died without a clean stop; check its log and its /readyz",
                r.instance,
                format_age(age)
            ));
        }
    }
    problems
}

fn is_live(relay: &admin::RelayInstance) -> bool {
    relay
        .heartbeat_age_secs
        .is_some_and(|age| age < LEASE_TTL.as_secs_f64())
        || !relay.partitions.is_empty()
}

fn status_json(schema: &str, s: &admin::Status) -> Value {
    let b = &s.backlog;
    json!({
        "schema": schema,
        "pending": b.pending,
        "due_now": b.due_now,
        "scheduled": b.scheduled,
        "retrying": b.retrying,
        "oldest_pending_created_at": b.oldest_pending_created_at.map(rfc3339),
        "oldest_pending_age_seconds": b.oldest_pending_age_secs,
        "next_scheduled_in_seconds": b.next_scheduled_in_secs,
        "dead_lettered": b.dead_lettered,
        "published_kept": b.published_kept,
        "oldest_published_at": b.oldest_published_at.map(rfc3339),
        "partitions_total": s.partitions_total,
        "unowned_partitions": s.unowned,
        "due_unowned": s.due_unowned,
        "problems": needs_a_person(s),
        "relays": s.relays.iter().map(|r| json!({
            "instance": r.instance,
            "live": is_live(r),
            "started_at": r.started_at.map(rfc3339),
            "heartbeat_age_seconds": r.heartbeat_age_secs,
            "partitions": r.partitions,
            "lease_expires_in_seconds": r.lease_expires_in_secs,
            "metrics_addr": r.metrics_addr,
            "broker_node": r.broker_node,
        })).collect::<Vec<_>>(),
    })
}

fn status_text(schema: &str, db_url: &str, s: &admin::Status) -> String {
    let b = &s.backlog;
    let mut t = String::new();
    let _ = writeln!(t, "outbox schema '{schema}' on {db_url}");
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "pending         {:<8} {} due now, {} scheduled or backing off, {} failed before",
        b.pending, b.due_now, b.scheduled, b.retrying
    );
    match (b.oldest_pending_age_secs, b.oldest_pending_created_at) {
        (Some(age), Some(at)) => {
            let _ = writeln!(
                t,
                "oldest pending  {:<8} created {}",
                format_age(age),
                rfc3339_seconds(at)
            );
        }
        _ => {
            let _ = writeln!(t, "oldest pending  -");
        }
    }
    if let Some(next) = b.next_scheduled_in_secs {
        let _ = writeln!(t, "next scheduled  in {}", format_age(next));
    }
    let hint = if b.dead_lettered > 0 {
        "see `outbox-relay dead-letters list`"
    } else {
        ""
    };
    let _ = writeln!(t, "dead-lettered   {:<8} {hint}", b.dead_lettered);
    let oldest = b.oldest_published_at.map_or_else(String::new, |at| {
        format!("oldest published {}", rfc3339_seconds(at))
    });
    let _ = writeln!(t, "published kept  {:<8} {oldest}", b.published_kept);
    let _ = writeln!(t);

    let leased = s.partitions_total - s.unowned.len() as i64;
    let _ = write!(
        t,
        "partitions      {leased} of {} leased",
        s.partitions_total
    );
    if s.unowned.is_empty() {
        let _ = writeln!(t);
    } else {
        let _ = writeln!(t, "; no live owner: {}", compact_ranges(&s.unowned));
    }
    if s.relays.is_empty() {
        let _ = writeln!(
            t,
            "relays          none registered: nothing publishes this outbox; start `outbox-relay run`"
        );
        return t;
    }
    let _ = writeln!(t);
    let mut table = Table::new(&[
        "INSTANCE",
        "STATE",
        "HEARTBEAT",
        "STARTED",
        "PARTITIONS",
        "LEASES EXPIRE IN",
        "METRICS",
        "BROKER NODE",
    ]);
    for r in &s.relays {
        table.row(vec![
            r.instance.clone(),
            if is_live(r) { "live" } else { "stale" }.to_string(),
            r.heartbeat_age_secs
                .map_or_else(|| "-".to_string(), |a| format!("{} ago", format_age(a))),
            r.started_at
                .map_or_else(|| "-".to_string(), rfc3339_seconds),
            compact_ranges(&r.partitions),
            r.lease_expires_in_secs
                .map_or_else(|| "-".to_string(), format_age),
            r.metrics_addr.clone().unwrap_or_else(|| "-".to_string()),
            r.broker_node.clone().unwrap_or_else(|| "-".to_string()),
        ]);
    }
    t.push_str(&table.render());
    t
}

/// A duration in seconds, short and readable: 850ms, 12.3s, 5m07s, 3h04m, 2d03h.
fn format_age(secs: f64) -> String {
    let secs = if secs.is_finite() { secs.max(0.0) } else { 0.0 };
    if secs < 1.0 {
        return format!("{}ms", (secs * 1000.0).round() as u64);
    }
    if secs < 60.0 {
        return format!("{:.1}s", (secs * 10.0).floor() / 10.0);
    }
    let s = secs as u64;
    match s {
        0..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Partition numbers as ranges: `0-9, 12, 14-15`; `-` for none.
fn compact_ranges(partitions: &[i16]) -> String {
    let mut sorted = partitions.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(", ")
    }
}

fn trim_lines(text: &str) -> String {
    text.lines()
        .map(|l| l.trim_end().to_string() + "\n")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn ages_read_at_a_glance() {
        assert_eq!(format_age(0.25), "250ms");
        assert_eq!(format_age(-3.0), "0ms");
        assert_eq!(format_age(12.34), "12.3s");
        assert_eq!(format_age(59.99), "59.9s");
        assert_eq!(format_age(307.0), "5m07s");
        assert_eq!(format_age(3.0 * 3600.0 + 240.0), "3h04m");
        assert_eq!(format_age(2.0 * 86400.0 + 3.0 * 3600.0 + 5.0), "2d03h");
        assert_eq!(format_age(f64::NAN), "0ms");
    }

    #[test]
    fn partitions_are_shown_as_ranges() {
        assert_eq!(compact_ranges(&[]), "-");
        assert_eq!(compact_ranges(&[3]), "3");
        assert_eq!(compact_ranges(&[0, 1, 2, 3, 5, 7, 8]), "0-3, 5, 7-8");
        assert_eq!(compact_ranges(&[9, 8, 8, 1]), "1, 8-9");
    }

    #[test]
    fn status_text_shows_owners_and_orphaned_partitions() {
        let status = admin::Status {
            backlog: admin::Backlog {
                pending: 3,
                due_now: 2,
                scheduled: 1,
                oldest_pending_age_secs: Some(61.0),
                oldest_pending_created_at: Some(SystemTime::UNIX_EPOCH),
                dead_lettered: 1,
                ..Default::default()
            },
            partitions_total: 32,
            unowned: (10..32).collect(),
            due_unowned: 2,
            relays: vec![
                admin::RelayInstance {
                    instance: "relay-a".into(),
                    started_at: None,
                    heartbeat_age_secs: Some(0.5),
                    partitions: (0..10).collect(),
                    lease_expires_in_secs: Some(4.5),
                    metrics_addr: Some("127.0.0.1:40123".into()),
                    broker_node: Some("rabbit-2:5672".into()),
                },
                admin::RelayInstance {
                    instance: "relay-b".into(),
                    started_at: None,
                    heartbeat_age_secs: Some(60.0),
                    partitions: vec![],
                    lease_expires_in_secs: None,
                    metrics_addr: None,
                    broker_node: None,
                },
            ],
        };
        let text = trim_lines(&status_text("outbox", "postgres://u:***@h/db", &status));
        assert!(
            text.contains("pending         3        2 due now, 1 scheduled"),
            "{text}"
        );
        assert!(text.contains("oldest pending  1m01s"), "{text}");
        assert!(
            text.contains("10 of 32 leased; no live owner: 10-31"),
            "{text}"
        );
        let a = text.lines().find(|l| l.starts_with("relay-a")).unwrap();
        assert!(
            a.contains("live")
                && a.contains("0-9")
                && a.contains("4.5s")
                && a.contains("127.0.0.1:40123")
                && a.contains("rabbit-2:5672"),
            "{a}"
        );
        let b = text.lines().find(|l| l.starts_with("relay-b")).unwrap();
        assert!(b.contains("stale") && b.contains("1m00s ago"), "{b}");
        assert!(text.lines().all(|l| l == l.trim_end()));
    }

    #[test]
    fn status_names_each_thing_that_needs_a_person() {
        let relay = |name: &str, heartbeat: f64, partitions: Vec<i16>| admin::RelayInstance {
            instance: name.into(),
            started_at: None,
            heartbeat_age_secs: Some(heartbeat),
            partitions,
            lease_expires_in_secs: None,
            metrics_addr: None,
            broker_node: None,
        };
        let healthy = admin::Status {
            backlog: admin::Backlog::default(),
            partitions_total: 32,
            unowned: vec![],
            due_unowned: 0,
            relays: vec![relay("a", 0.5, (0..32).collect())],
        };
        assert!(needs_a_person(&healthy).is_empty());

        let nobody = admin::Status {
            relays: vec![],
            unowned: (0..32).collect(),
            ..healthy.clone()
        };
        let problems = needs_a_person(&nobody);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("no live relay"), "{problems:?}");

        let troubled = admin::Status {
            backlog: admin::Backlog {
                dead_lettered: 2,
                ..Default::default()
            },
            unowned: vec![3, 4, 5],
            due_unowned: 7,
            relays: vec![relay("a", 0.5, (0..3).collect()), relay("b", 42.0, vec![])],
            ..healthy.clone()
        };
        let problems = needs_a_person(&troubled).join("\n");
        for said in [
            "7 due rows in partitions with no live owner (3-5)",
            "2 rows parked as dead letters",
            "relay b has not renewed its leases for 42.0s",
        ] {
            assert!(problems.contains(said), "{said} not in\n{problems}");
        }
        assert!(!problems.contains("no live relay"), "{problems}");
    }
}
