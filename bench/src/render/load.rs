//! The results table's rows of phases 8 to 12: what the outbox costs the
//! application, sustained keyed load, a cold keyed backlog, and a backlog
//! after an outage.

use super::{runs_note, summary::claim_row, verdict, Row};
use crate::{
    args::Args,
    results::{AppCompare, AppKind, BacklogRun, ClaimStats, KeyedLoad, Results},
    targets::{
        AIM_BACKLOG_WAL_RATIO, TARGET_APP_LATENCY_RATIO, TARGET_APP_TPS_RATIO,
        TARGET_BACKLOG_APP_LATENCY_RATIO, TARGET_BACKLOG_APP_RATE_HELD,
        TARGET_BACKLOG_CATCH_UP_FACTOR, TARGET_BACKLOG_RATIO, TARGET_COLD_RATIO,
        TARGET_KEYED_AGE_MAX_MS, TARGET_KEYED_AGE_P99_MS, TARGET_KEYED_UNPACED_AGE_P99_MS,
    },
    util::{median, thousands},
};

/// 11 and 12. A backlog after an outage (one run).
pub(super) fn backlog_rows(
    args: &Args,
    run: &Result<BacklogRun, String>,
    title: &str,
    rows: &mut Vec<Row>,
) {
    let head = format!(
        "{title} after an outage ({} rows in {}-row transactions over {} keys, on {} relayed rows, a snapshot held open, the application writing {} rows/s)",
        thousands(args.backlog_rows as f64),
        args.backlog_rows_per_tx,
        thousands(f64::from(args.backlog_partition_keys)),
        thousands(args.backlog_history_rows as f64),
        thousands(args.backlog_app_rate as f64)
    );
    let b = match run {
        Ok(b) => b,
        Err(_) => {
            rows.push(Row {
                figure: head,
                measured: "failed (see notes)".into(),
                target: "–".into(),
                result: verdict(None),
            });
            return;
        }
    };
    rows.push(Row {
        figure: format!("{head}: drain rate / bare publisher to the same exchange (same run)"),
        measured: format!(
            "{:.2} ({} vs {} msg/s; {} pending at relay start, {} relayed before)",
            b.drain_ratio(),
            thousands(b.drain_rate()),
            thousands(b.bare_rate),
            thousands(b.backlog_rows as f64),
            thousands(b.history_rows as f64)
        ),
        target: format!("≥ {TARGET_BACKLOG_RATIO}"),
        result: verdict(Some(b.drain_ratio() >= TARGET_BACKLOG_RATIO)),
    });
    let bound = b.catch_up_target_s(TARGET_BACKLOG_CATCH_UP_FACTOR);
    rows.push(Row {
        figure: format!("{title}: relay start → the application's new rows current again (oldest pending ≤ 2 s)"),
        measured: format!("{:.1} s", b.catch_up_s),
        target: format!(
            "≤ {TARGET_BACKLOG_CATCH_UP_FACTOR} × backlog / (ceiling − application rate) = {}",
            if bound.is_finite() && bound > 0.0 {
                format!("{bound:.1} s")
            } else {
                "unbounded (ceiling ≤ application rate)".into()
            }
        ),
        result: verdict(Some(bound > 0.0 && b.catch_up_s <= bound)),
    });
    let rate_held = b.app_draining.rate() / b.app_stopped.rate();
    rows.push(Row {
        figure: format!("{title}: the application's rate while the relay drains / with it stopped"),
        measured: format!(
            "{rate_held:.2} ({:.0} vs {:.0} rows/s; asked {:.0})",
            b.app_draining.rate(),
            b.app_stopped.rate(),
            b.app_rate
        ),
        target: format!("≥ {TARGET_BACKLOG_APP_RATE_HELD} (held)"),
        result: verdict(Some(rate_held >= TARGET_BACKLOG_APP_RATE_HELD)),
    });
    let latency = b.app_draining.latency_ms / b.app_stopped.latency_ms;
    rows.push(Row {
        figure: format!("{title}: the application's average transaction latency while the relay drains / with it stopped"),
        measured: format!(
            "{latency:.2}x ({:.2} vs {:.2} ms)",
            b.app_draining.latency_ms, b.app_stopped.latency_ms
        ),
        target: format!("≤ {TARGET_BACKLOG_APP_LATENCY_RATIO}x"),
        result: verdict(Some(latency <= TARGET_BACKLOG_APP_LATENCY_RATIO)),
    });
    rows.push(claim_row(
        format!("{title}: claim statement duration, relay start → current again"),
        b.claims.as_slice(),
        true,
    ));
    let w = &b.wal;
    rows.push(Row {
        figure: format!("{title}: WAL bytes per row, insert to retention (relay and retention included) / the insert's own"),
        measured: match (w.ratio(), w.retention) {
            (Some(ratio), Some(retention)) => format!(
                "{ratio:.2}x (insert {:.0} B, relay {:.0} B, retention {:.0} B over {} rows; cluster-wide WAL)",
                w.insert,
                w.relay,
                retention,
                thousands(w.retention_rows as f64)
            ),
            _ => format!(
                "insert {:.0} B, relay {:.0} B; the retention pass did not finish",
                w.insert, w.relay
            ),
        },
        target: format!("aim ≤ {AIM_BACKLOG_WAL_RATIO}x (reported)"),
        result: verdict(w.ratio().map(|r| r <= AIM_BACKLOG_WAL_RATIO)),
    });
}

/// 8. What the outbox costs the application.
pub(super) fn app_rows(args: &Args, r: &Results, rows: &mut Vec<Row>) {
    if r.app.is_empty() {
        return;
    }
    let get = |kind: AppKind| -> Option<&AppCompare> {
        r.app
            .iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, c)| c.as_ref().ok())
    };
    let secs = args.app_duration.as_secs();
    let single = "single-row transactions (one INSERT, autocommit)".to_string();
    let multi = format!(
        "{}-row transactions ({} INSERTs between BEGIN and COMMIT)",
        args.app_rows, args.app_rows
    );
    // With the relay stopped: what its objects cost (target). With it
    // draining: reported beside its CPU share (on 2 cores the relay, the
    // broker and the consumer compete with PostgreSQL for the same CPUs).
    for (kind, what, stopped) in [
        (AppKind::SingleRowRelayStopped, &single, true),
        (AppKind::MultiRowRelayStopped, &multi, true),
        (AppKind::SingleRow, &single, false),
        (AppKind::MultiRow, &multi, false),
    ] {
        let c = get(kind);
        let ratio = c.map(AppCompare::tps_ratio);
        let relay = if stopped {
            "the relay stopped (its trigger and indexes only)"
        } else {
            "the relay running and draining what they write"
        };
        rows.push(Row {
            figure: format!(
                "8. Application commit rate, outbox / copy without the relay's objects, {relay}: {} clients, {what}, as fast as PostgreSQL accepts, {secs} s each (pgbench, same run)",
                args.app_clients
            ),
            measured: match c {
                Some(c) if stopped => format!(
                    "{:.2} (outbox {} tx/s, copy {} tx/s)",
                    c.tps_ratio(),
                    thousands(c.messages.load.tps),
                    thousands(c.copy.load.tps)
                ),
                Some(c) => format!(
                    "{:.2} (outbox {} tx/s, copy {} tx/s; relay CPU {:.0}% of a core)",
                    c.tps_ratio(),
                    thousands(c.messages.load.tps),
                    thousands(c.copy.load.tps),
                    c.messages.relay_cpu_pct
                ),
                None => "failed".into(),
            },
            target: if stopped {
                format!("≥ {TARGET_APP_TPS_RATIO}")
            } else {
                "reported".into()
            },
            result: if stopped {
                verdict(ratio.map(|v| v >= TARGET_APP_TPS_RATIO))
            } else {
                String::new()
            },
        });
    }
    let c = get(AppKind::Paced);
    rows.push(Row {
        figure: format!(
            "8. Application transaction latency (pgbench average) at {} single-row tx/s from {} clients, outbox / copy (same run)",
            thousands(args.app_rate as f64),
            args.app_clients
        ),
        measured: match c {
            Some(c) => format!(
                "{:.2}x (outbox {:.2} ms, copy {:.2} ms)",
                c.latency_ratio(),
                c.messages.load.latency_ms,
                c.copy.load.latency_ms
            ),
            None => "failed".into(),
        },
        target: format!("≤ {TARGET_APP_LATENCY_RATIO}x"),
        result: verdict(c.map(|c| c.latency_ratio() <= TARGET_APP_LATENCY_RATIO)),
    });
    let claims: Vec<ClaimStats> = r.app_claims.into_iter().collect();
    rows.push(claim_row(
        "8. Claim statement duration over the application-cost phase".into(),
        &claims,
        r.app.iter().any(|(_, c)| c.is_ok()),
    ));
}

/// 9. Sustained keyed load.
pub(super) fn keyed_rows(args: &Args, r: &Results, rows: &mut Vec<Row>) {
    if r.keyed.is_empty() {
        return;
    }
    let paced: Vec<&KeyedLoad> = r
        .keyed
        .iter()
        .flatten()
        .filter_map(|k| k.paced.as_ref().ok())
        .collect();
    let unpaced: Vec<&KeyedLoad> = r
        .keyed
        .iter()
        .flatten()
        .filter_map(|k| k.unpaced.as_ref().ok())
        .collect();
    let med =
        |v: &[&KeyedLoad], f: &dyn Fn(&KeyedLoad) -> f64| median(v.iter().map(|k| f(k)).collect());
    let asked = args.keyed_rate * args.keyed_rows as u64;
    let head = format!(
        "9. Keyed load {} rows/s ({} clients, {}-row transactions at {}/s, {} partition keys, {} routing keys, topic exchange, {} s)",
        thousands(asked as f64),
        args.keyed_clients,
        args.keyed_rows,
        args.keyed_rate,
        thousands(f64::from(args.keyed_partition_keys)),
        args.keyed_routing_keys,
        args.keyed_paced_duration.as_secs()
    );
    rows.push(Row {
        figure: format!("{head}: rate reached"),
        measured: med(&paced, &|k| k.rows_per_s())
            .map_or("failed".into(), |v| format!("{} rows/s", thousands(v))),
        target: "–".into(),
        result: String::new(),
    });
    for (label, value, target) in [
        (
            "oldest pending row's age, p99 of 100 ms samples",
            med(&paced, &|k| k.age_p99_ms),
            TARGET_KEYED_AGE_P99_MS,
        ),
        (
            "oldest pending row's age, max",
            med(&paced, &|k| k.age_max_ms),
            TARGET_KEYED_AGE_MAX_MS,
        ),
    ] {
        rows.push(Row {
            figure: format!("{head}: {label}"),
            measured: value.map_or("failed".into(), |v| format!("{v:.0} ms")),
            target: format!("≤ {target:.0} ms"),
            result: verdict(value.map(|v| v <= target)),
        });
    }
    let first = paced.first();
    rows.push(Row {
        figure: format!("{head}: nothing pending 1 s after the load stops"),
        measured: first.map_or("failed".into(), |k| {
            if k.pending_1s_after == 0 {
                format!("yes (0 pending after {:.2} s)", k.zero_after_s)
            } else {
                format!(
                    "no ({} pending; none after {:.2} s)",
                    k.pending_1s_after, k.zero_after_s
                )
            }
        }),
        target: "yes".into(),
        result: verdict(first.map(|k| k.pending_1s_after == 0)),
    });
    let claims: Vec<ClaimStats> = paced.iter().filter_map(|k| k.claims).collect();
    rows.push(claim_row(
        format!("{head}: claim statement duration"),
        &claims,
        !paced.is_empty(),
    ));
    let head = format!(
        "9. Keyed load unpaced ({} clients, {}-row transactions, {} s)",
        args.keyed_clients,
        args.keyed_rows,
        args.keyed_unpaced_duration.as_secs()
    );
    rows.push(Row {
        figure: format!("{head}: rate PostgreSQL accepted"),
        measured: med(&unpaced, &|k| k.rows_per_s()).map_or("failed".into(), |v| {
            format!(
                "{} rows/s ({} tx/s)",
                thousands(v),
                thousands(v / args.keyed_rows as f64)
            )
        }),
        target: "–".into(),
        result: String::new(),
    });
    let p99 = med(&unpaced, &|k| k.age_p99_ms);
    rows.push(Row {
        figure: format!("{head}: oldest pending row's age, p99 of 100 ms samples"),
        measured: p99.map_or("failed".into(), |v| {
            format!(
                "{v:.0} ms (max {})",
                med(&unpaced, &|k| k.age_max_ms).map_or("n/a".into(), |m| format!("{m:.0} ms"))
            )
        }),
        target: format!("≤ {TARGET_KEYED_UNPACED_AGE_P99_MS:.0} ms"),
        result: verdict(p99.map(|v| v <= TARGET_KEYED_UNPACED_AGE_P99_MS)),
    });
    let claims: Vec<ClaimStats> = unpaced.iter().filter_map(|k| k.claims).collect();
    rows.push(claim_row(
        format!("{head}: claim statement duration"),
        &claims,
        !unpaced.is_empty(),
    ));
}

/// 10. Cold keyed backlog against the bare publisher.
pub(super) fn cold_rows(args: &Args, r: &Results, rows: &mut Vec<Row>) {
    let n = args.cold_rows as f64;
    for consumer in [true, false] {
        let runs: Vec<_> = r.cold.iter().filter(|c| c.consumer == consumer).collect();
        if runs.is_empty() {
            continue;
        }
        let with = if consumer {
            "with a consumer"
        } else {
            "no consumer"
        };
        let head = format!(
            "10. Cold keyed backlog {} rows ({} partition keys, {} routing keys, topic exchange, not analyzed), {with}",
            thousands(n),
            thousands(args.cold_partition_keys as f64),
            thousands(args.cold_routing_keys as f64)
        );
        let drain: Vec<f64> = runs
            .iter()
            .filter_map(|c| c.drain.as_ref().ok())
            .map(|d| n / d.db_zero_s)
            .collect();
        let bare: Vec<f64> = runs
            .iter()
            .filter_map(|c| c.bare.as_ref().ok())
            .map(|b| n / b.confirmed_s)
            .collect();
        rows.push(Row {
            figure: format!("{head}: relay start → database shows 0 pending"),
            measured: median(drain.clone()).map_or("failed".into(), |m| {
                format!("{} msg/s{}", thousands(m), runs_note(&drain))
            }),
            target: "–".into(),
            result: String::new(),
        });
        rows.push(Row {
            figure: format!(
                "{head}: bare publisher, same routing keys and exchange → all confirmed"
            ),
            measured: median(bare.clone()).map_or("failed".into(), |m| {
                format!("{} msg/s{}", thousands(m), runs_note(&bare))
            }),
            target: "–".into(),
            result: String::new(),
        });
        let ratios: Vec<f64> = runs.iter().filter_map(|c| c.ratio()).collect();
        let m = median(ratios.clone());
        rows.push(Row {
            figure: format!("{head}: relay / bare publisher (same run)"),
            measured: m.map_or("no data".into(), |m| {
                format!("{m:.2}{}", runs_note(&ratios))
            }),
            target: format!("≥ {TARGET_COLD_RATIO}"),
            result: verdict(m.map(|m| m >= TARGET_COLD_RATIO)),
        });
        let claims: Vec<ClaimStats> = runs
            .iter()
            .filter_map(|c| c.drain.as_ref().ok().and_then(|d| d.claims))
            .collect();
        rows.push(claim_row(
            format!("{head}: claim statement duration"),
            &claims,
            runs.iter().any(|c| c.drain.is_ok()),
        ));
    }
}
