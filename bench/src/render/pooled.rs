//! Phase 13, pooled: the summary rows (direct figures held against their
//! targets, pooled ones reported beside them) and the side-by-side details.

use std::fmt::Write as _;

use super::{summary::claim_row, verdict, Row};
use crate::{
    args::Args,
    phases::QUIET_BEFORE_S,
    results::{CeilingRun, ClaimStats, DrainRun, IdleRun, PooledRun, Results, SteadyRun},
    targets::{
        TARGET_DRAIN_RATIO, TARGET_IDLE_PER_S, TARGET_LAG_1000_P50_MS, TARGET_LAG_1000_P99_MS,
    },
    util::thousands,
};

/// The scenario every row of the phase names.
fn pooler_of(p: &PooledRun) -> String {
    format!(
        "PgBouncer in transaction mode, {} server connections, relay `--listen false --poll-interval {}`",
        p.pool_size,
        humantime::format_duration(p.poll_interval)
    )
}

fn ceiling_rate(n: u64, c: &Result<CeilingRun, String>) -> Option<f64> {
    c.as_ref().ok().map(|c| n as f64 / c.consumed_s)
}

/// 13. The summary rows of the first pooled run.
pub(super) fn rows(args: &Args, r: &Results, rows: &mut Vec<Row>) {
    let Some(run) = r.pooled.first() else {
        return;
    };
    let p = match run {
        Ok(p) => p,
        Err(_) => {
            rows.push(Row {
                figure: "13. Pooled: the relay through a private PgBouncer (transaction mode)"
                    .into(),
                measured: "failed: see notes".into(),
                target: "–".into(),
                result: String::new(),
            });
            return;
        }
    };
    let n = args.messages;
    let reported = |figure: String, measured: String| Row {
        figure,
        measured,
        target: "reported".into(),
        result: "–".into(),
    };
    let ceiling = ceiling_rate(n, &p.ceiling);
    rows.push(Row {
        figure: format!(
            "13. Pooled phase: ceiling, bare lapin publisher, confirms, window {} (until the consumer saw all; same run as the drains below)",
            args.ceiling_window
        ),
        measured: ceiling.map_or("failed".into(), |c| format!("{} msg/s", thousands(c))),
        target: "–".into(),
        result: String::new(),
    });
    let drain = |d: &Result<DrainRun, String>| {
        d.as_ref().ok().map(|d| {
            let of = ceiling.map_or(String::new(), |c| {
                format!("; {:.2} of the ceiling", d.consumed_rate() / c)
            });
            (
                d.consumed_rate(),
                format!(
                    "{} msg/s (→ 0 pending: {} msg/s){of}",
                    thousands(d.consumed_rate()),
                    thousands(d.db_rate())
                ),
            )
        })
    };
    let direct_ratio = match (&p.drain_direct, ceiling) {
        (Ok(d), Some(c)) => Some(d.consumed_rate() / c),
        _ => None,
    };
    let head = format!(
        "13. Drain of {} unkeyed pending rows (default exchange), relay start → consumer saw all",
        thousands(n as f64)
    );
    rows.push(Row {
        figure: format!("{head}, direct / ceiling"),
        measured: drain(&p.drain_direct).map_or("failed".into(), |(_, s)| s),
        target: format!("≥ {TARGET_DRAIN_RATIO}"),
        result: verdict(direct_ratio.map(|r| r >= TARGET_DRAIN_RATIO)),
    });
    let direct_rate = drain(&p.drain_direct).map(|(r, _)| r);
    rows.push(reported(
        format!("{head}, through {} / ceiling", pooler_of(p)),
        drain(&p.drain_pooled).map_or("failed".into(), |(rate, s)| {
            let of = direct_rate.map_or(String::new(), |d| format!("; {:.2} of direct", rate / d));
            format!("{s}{of}")
        }),
    ));

    let rate = thousands(p.rate as f64);
    let lag = |s: &Result<SteadyRun, String>| {
        s.as_ref().ok().map(|s| {
            (
                s.lag_ms.p50,
                s.lag_ms.p99,
                format!(
                    "p50 {:.1} ms, p99 {:.1} ms (max {:.1} ms; {} rows at {} rows/s)",
                    s.lag_ms.p50,
                    s.lag_ms.p99,
                    s.lag_ms.max,
                    thousands(s.inserted as f64),
                    thousands(s.insert_rate)
                ),
            )
        })
    };
    let head = format!(
        "13. Lag at {rate}/s ({} application connections, direct), created_at → consumer receipt",
        args.steady_connections_at(p.rate)
    );
    let targets = (p.rate == 1000).then_some((TARGET_LAG_1000_P50_MS, TARGET_LAG_1000_P99_MS));
    let direct = lag(&p.lag_direct);
    rows.push(Row {
        figure: format!("{head}, relay direct"),
        measured: direct
            .as_ref()
            .map_or("failed".into(), |(_, _, s)| s.clone()),
        target: targets.map_or("–".into(), |(t50, t99)| {
            format!("p50 ≤ {t50} ms, p99 ≤ {t99} ms")
        }),
        result: targets.map_or(String::new(), |(t50, t99)| {
            verdict(
                direct
                    .as_ref()
                    .map(|(p50, p99, _)| *p50 <= t50 && *p99 <= t99),
            )
        }),
    });
    rows.push(reported(
        format!("{head}, relay through {}", pooler_of(p)),
        lag(&p.lag_pooled).map_or("failed".into(), |(_, _, s)| s),
    ));

    let idle = |i: &Result<IdleRun, String>| {
        i.as_ref().ok().map(|i| {
            let pooler = i.pooler.map_or(String::new(), |s| {
                format!(
                    "; PgBouncer SHOW STATS: {:.2} transactions/s, {:.2} queries/s",
                    s.xacts_per_s, s.queries_per_s
                )
            });
            (
                i.xacts_per_s,
                format!(
                    "{:.2} transactions/s in its own database, {:.2} statements/s seen at the server{pooler}",
                    i.xacts_per_s, i.statements_per_s
                ),
            )
        })
    };
    let head = format!(
        "13. Idle relay with nothing to do ({:?}, from {QUIET_BEFORE_S} s after draining {} rows)",
        args.idle_duration,
        thousands(args.idle_drain_rows as f64)
    );
    let direct = idle(&p.idle_direct);
    rows.push(Row {
        figure: format!("{head}, direct"),
        measured: direct.as_ref().map_or("failed".into(), |(_, s)| s.clone()),
        target: format!("≤ {TARGET_IDLE_PER_S}/s"),
        result: verdict(direct.as_ref().map(|(x, _)| *x <= TARGET_IDLE_PER_S)),
    });
    rows.push(reported(
        format!("{head}, through {}", pooler_of(p)),
        idle(&p.idle_pooled).map_or("failed".into(), |(_, s)| s),
    ));
    let claims: Vec<ClaimStats> = [
        p.drain_pooled.as_ref().ok().and_then(|d| d.claims),
        p.lag_pooled.as_ref().ok().and_then(|s| s.claims),
    ]
    .into_iter()
    .flatten()
    .collect();
    rows.push(claim_row(
        format!("13. Claim statement duration through the pooler (drain and lag at {rate}/s)"),
        &claims,
        p.drain_pooled.is_ok() || p.lag_pooled.is_ok(),
    ));
}

/// The details: direct and pooled side by side, then the failures.
pub(super) fn write(out: &mut String, args: &Args, r: &Results, notes: &mut Vec<String>) {
    for (i, run) in r.pooled.iter().enumerate() {
        let p = match run {
            Ok(p) => p,
            Err(e) => {
                notes.push(format!(
                    "- pooled run {} failed: {}",
                    i + 1,
                    e.replace('\n', "\n  ")
                ));
                continue;
            }
        };
        let _ = writeln!(out, "\n### Pooled, direct and through {}\n", pooler_of(p));
        let _ = writeln!(
            out,
            "| figure | direct | through the pooler | pooled / direct |"
        );
        let _ = writeln!(out, "|---|---|---|---|");
        let mut row =
            |figure: &str, d: Option<f64>, q: Option<f64>, fmt: &dyn Fn(f64) -> String| {
                let cell = |v: Option<f64>| v.map_or("failed".into(), fmt);
                let ratio = match (d, q) {
                    (Some(d), Some(q)) if d != 0.0 => format!("{:.2}", q / d),
                    _ => "–".into(),
                };
                let _ = writeln!(out, "| {figure} | {} | {} | {ratio} |", cell(d), cell(q));
            };
        let n = args.messages;
        let ceiling = ceiling_rate(n, &p.ceiling);
        let rate = |f: fn(&DrainRun) -> f64| {
            (
                p.drain_direct.as_ref().ok().map(f),
                p.drain_pooled.as_ref().ok().map(f),
            )
        };
        let msg_s = |v: f64| format!("{} msg/s", thousands(v));
        let (d, q) = rate(DrainRun::consumed_rate);
        row(
            &format!(
                "drain {}: relay start → consumer saw all",
                thousands(n as f64)
            ),
            d,
            q,
            &msg_s,
        );
        if let Some(c) = ceiling {
            row(
                &format!("drain / ceiling ({} msg/s, same run)", thousands(c)),
                d.map(|d| d / c),
                q.map(|q| q / c),
                &|v| format!("{v:.2}"),
            );
        }
        let (d, q) = rate(DrainRun::db_rate);
        row("drain: relay start → 0 pending", d, q, &msg_s);
        let (d, q) = rate(|d| d.first_s);
        row("drain: first message after", d, q, &|v| format!("{v:.2} s"));
        let (d, q) = rate(DrainRun::cpu_per_10k);
        row("drain: relay CPU s per 10,000", d, q, &|v| {
            format!("{v:.3}")
        });
        let (d, q) = rate(|d| d.cpu.relay_pg_s);
        row(
            "drain: CPU s of the PostgreSQL backends serving the relay (through the pooler: its server connections)",
            d,
            q,
            &|v| format!("{v:.2}"),
        );
        let lag = |f: fn(&SteadyRun) -> f64| {
            (
                p.lag_direct.as_ref().ok().map(f),
                p.lag_pooled.as_ref().ok().map(f),
            )
        };
        let ms = |v: f64| format!("{v:.1} ms");
        let at = thousands(p.rate as f64);
        for (what, f) in [
            (
                "p50",
                (|s: &SteadyRun| s.lag_ms.p50) as fn(&SteadyRun) -> f64,
            ),
            ("p99", |s| s.lag_ms.p99),
            ("max", |s| s.lag_ms.max),
            ("commit acked → consumer p50", |s| s.after_commit_ms.p50),
            ("commit acked → consumer p99", |s| s.after_commit_ms.p99),
        ] {
            let (d, q) = lag(f);
            row(&format!("lag at {at}/s, {what}"), d, q, &ms);
        }
        let (d, q) = lag(|s| s.mean_batch);
        row(&format!("rows per claim at {at}/s (mean)"), d, q, &|v| {
            format!("{v:.1}")
        });
        let (d, q) = lag(|s| s.relay_cpu_pct);
        row(&format!("relay CPU at {at}/s"), d, q, &|v| {
            format!("{v:.1} %")
        });
        let idle = |f: fn(&IdleRun) -> f64| {
            (
                p.idle_direct.as_ref().ok().map(f),
                p.idle_pooled.as_ref().ok().map(f),
            )
        };
        let per_s = |v: f64| format!("{v:.2}/s");
        let (d, q) = idle(|i| i.xacts_per_s);
        row("idle: transactions in its own database", d, q, &per_s);
        let (d, q) = idle(|i| i.statements_per_s);
        row("idle: statements seen at the server", d, q, &per_s);
        if let Ok(s) = p.idle_pooled.as_ref().map(|i| i.pooler) {
            let cell = |v: Option<f64>| v.map_or("n/a".into(), per_s);
            let _ = writeln!(
                out,
                "| idle: PgBouncer SHOW STATS transactions / queries | – | {} / {} | – |",
                cell(s.map(|s| s.xacts_per_s)),
                cell(s.map(|s| s.queries_per_s))
            );
        }
        let mut note = |what: &str, e: &str| {
            notes.push(format!("- pooled {what}: {}", e.replace('\n', "\n  ")));
        };
        if let Err(e) = &p.ceiling {
            note("ceiling failed", e);
        }
        for (what, d) in [
            ("direct drain", &p.drain_direct),
            ("pooled drain", &p.drain_pooled),
        ] {
            match d {
                Err(e) => note(&format!("{what} failed"), e),
                Ok(d) => {
                    if let Some(s) = &d.stop_note {
                        note(what, s);
                    }
                }
            }
        }
        for (what, s) in [("direct lag", &p.lag_direct), ("pooled lag", &p.lag_pooled)] {
            if let Err(e) = s {
                note(&format!("{what} failed"), e);
            }
        }
        for (what, i) in [("direct", &p.idle_direct), ("pooled", &p.idle_pooled)] {
            match i {
                Err(e) => note(&format!("{what} idle failed"), e),
                Ok(i) => {
                    let _ = writeln!(out, "\n- idle, {what}: {}", i.method);
                }
            }
        }
    }
}
