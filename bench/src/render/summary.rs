//! The results table: one row per figure, with its target.

use super::{runs_note, verdict, Row};
use crate::{
    args::Args,
    results::{ClaimStats, DrainRun, HistQuantiles, Quantiles, Results, ScaleRun, SteadyRun},
    targets::{
        TARGET_CLAIM_P99_MS, TARGET_CPU_PER_10K, TARGET_DRAIN_RATIO, TARGET_GROWTH_RATIO,
        TARGET_IDLE_PER_S, TARGET_LAG_1000_P50_MS, TARGET_LAG_1000_P99_MS, TARGET_LAG_5000_P99_MS,
        TARGET_RSS_MIB,
    },
    util::{median, thousands},
};

/// The rows of the results table, in phase order.
pub(super) fn rows(args: &Args, r: &Results) -> Vec<Row> {
    let n = args.messages;
    let mut rows: Vec<Row> = Vec::new();
    let info = |figure: String, measured: String| Row {
        figure,
        measured,
        target: "–".into(),
        result: "".into(),
    };

    // 1 and 2: ceiling, drain, ratio.
    let ceilings: Vec<f64> = r
        .ceiling
        .iter()
        .flatten()
        .map(|c| n as f64 / c.consumed_s)
        .collect();
    let drains: Vec<&DrainRun> = r.drain.iter().flatten().collect();
    if !r.ceiling.is_empty() {
        rows.push(info(
            format!("1. Ceiling: bare lapin publisher, confirms, window {} (until the consumer saw all)", args.ceiling_window),
            median(ceilings.clone()).map_or("failed".into(), |m| {
                format!("{} msg/s{}", thousands(m), runs_note(&ceilings))
            }),
        ));
    }
    if !r.drain.is_empty() {
        let consumed: Vec<f64> = drains.iter().map(|d| d.consumed_rate()).collect();
        let db: Vec<f64> = drains.iter().map(|d| d.db_rate()).collect();
        rows.push(info(
            format!(
                "2. Drain {}: relay start → consumer saw all",
                thousands(n as f64)
            ),
            median(consumed.clone()).map_or("failed".into(), |m| {
                format!("{} msg/s{}", thousands(m), runs_note(&consumed))
            }),
        ));
        rows.push(info(
            format!(
                "2. Drain {}: relay start → database shows 0 pending",
                thousands(n as f64)
            ),
            median(db.clone()).map_or("failed".into(), |m| {
                format!("{} msg/s{}", thousands(m), runs_note(&db))
            }),
        ));
        // Ratios within one run: run i's drain over run i's ceiling.
        let ratios: Vec<f64> = r
            .ceiling
            .iter()
            .zip(&r.drain)
            .filter_map(|(c, d)| match (c, d) {
                (Ok(c), Ok(d)) => Some(d.consumed_rate() / (n as f64 / c.consumed_s)),
                _ => None,
            })
            .collect();
        if !r.ceiling.is_empty() {
            let m = median(ratios.clone());
            rows.push(Row {
                figure: "2. Drain / ceiling (same run, both until the consumer saw all)".into(),
                measured: m.map_or("no data".into(), |m| {
                    format!("{m:.2}{}", runs_note(&ratios))
                }),
                target: format!("≥ {TARGET_DRAIN_RATIO}"),
                result: verdict(m.map(|m| m >= TARGET_DRAIN_RATIO)),
            });
        }
    }

    // 3. steady state.
    for &rate in &args.steady_rates {
        let runs: Vec<&SteadyRun> = r
            .steady
            .iter()
            .filter(|(ra, _)| *ra == rate)
            .filter_map(|(_, s)| s.as_ref().ok())
            .collect();
        if r.steady.iter().all(|(ra, _)| *ra != rate) {
            continue;
        }
        let med = |f: &dyn Fn(&SteadyRun) -> f64| median(runs.iter().map(|s| f(s)).collect());
        let hist = |f: &dyn Fn(&HistQuantiles) -> f64| {
            median(
                runs.iter()
                    .filter_map(|s| s.hist_ms.as_ref().map(f))
                    .collect(),
            )
        };
        let note = runs_note(&runs.iter().map(|s| s.insert_rate).collect::<Vec<_>>());
        let achieved = med(&|s| s.insert_rate);
        rows.push(info(
            format!(
                "3. Steady {}/s for {:?}: application insert rate reached",
                thousands(rate as f64),
                args.steady_duration
            ),
            achieved.map_or("failed".into(), |a| {
                let short = if a < 0.95 * rate as f64 {
                    " (**below the asked rate**)"
                } else {
                    ""
                };
                format!("{} rows/s{short}{note}", thousands(a))
            }),
        ));
        let cell = |consumer: Option<f64>, histogram: Option<f64>, approx: &str| match consumer {
            Some(c) => format!(
                "{c:.1} ms (relay histogram {approx}{})",
                histogram.map_or("n/a".into(), |h| format!("{h:.1} ms"))
            ),
            None => "failed".into(),
        };
        let p50 = med(&|s| s.lag_ms.p50);
        let p99 = med(&|s| s.lag_ms.p99);
        let max = med(&|s| s.lag_ms.max);
        let (t50, t99) = match rate {
            1000 => (Some(TARGET_LAG_1000_P50_MS), Some(TARGET_LAG_1000_P99_MS)),
            5000 => (None, Some(TARGET_LAG_5000_P99_MS)),
            _ => (None, None),
        };
        for (label, value, hvalue, target, approx) in [
            ("p50", p50, hist(&|h| h.p50), t50, "≈ "),
            ("p99", p99, hist(&|h| h.p99), t99, "≈ "),
            ("max", max, hist(&|h| h.max_le), None, "≤ "),
        ] {
            rows.push(Row {
                figure: format!(
                    "3. Lag at {}/s from {} connections, created_at → consumer receipt, {label}",
                    thousands(rate as f64),
                    args.steady_connections_at(rate)
                ),
                measured: cell(value, hvalue, approx),
                target: target.map_or("–".into(), |t| format!("≤ {t} ms")),
                result: target.map_or(String::new(), |t| verdict(value.map(|v| v <= t))),
            });
        }
        let split =
            |f: &dyn Fn(&SteadyRun) -> Quantiles| match (med(&|s| f(s).p50), med(&|s| f(s).p99)) {
                (Some(p50), Some(p99)) => format!("p50 {p50:.1} ms, p99 {p99:.1} ms"),
                _ => "failed".into(),
            };
        rows.push(info(
            format!(
                "3. Lag at {}/s split at the application's commit: created_at → commit acked / commit acked → consumer",
                thousands(rate as f64)
            ),
            format!(
                "{} / {}",
                split(&|s| s.commit_ms),
                split(&|s| s.after_commit_ms)
            ),
        ));
        let claims: Vec<ClaimStats> = runs.iter().filter_map(|s| s.claims).collect();
        rows.push(claim_row(
            format!(
                "3. Claim statement duration at {}/s",
                thousands(rate as f64)
            ),
            &claims,
            !runs.is_empty(),
        ));
    }

    // 4. idle.
    if !r.idle.is_empty() {
        let v: Vec<f64> = r
            .idle
            .iter()
            .flatten()
            .map(|i| i.statements_per_s)
            .collect();
        let x: Vec<f64> = r.idle.iter().flatten().map(|i| i.xacts_per_s).collect();
        // Judged on the cumulative counter (transactions in a database only the
        // relay uses; each idle statement is its own transaction); the sampled
        // statement count is the cross-check.
        let m = median(x.clone());
        rows.push(Row {
            figure: format!(
                "4. Idle: SQL statements/s sent by the relay with nothing to do ({:?}): transactions in its own database",
                args.idle_duration
            ),
            measured: m.map_or("failed".into(), |m| {
                format!(
                    "{m:.2}/s{} (statements seen in pg_stat_activity: {}/s)",
                    runs_note(&x),
                    median(v.clone()).map_or("n/a".into(), |v| format!("{v:.2}"))
                )
            }),
            target: format!("≤ {TARGET_IDLE_PER_S}/s"),
            result: verdict(m.map(|m| m <= TARGET_IDLE_PER_S)),
        });
        let claims: Vec<ClaimStats> = r.idle.iter().flatten().filter_map(|i| i.claims).collect();
        rows.push(claim_row(
            "4. Claim statement duration over the idle window".into(),
            &claims,
            r.idle.iter().any(Result::is_ok),
        ));
    }

    // 5. footprint over the drains.
    if !r.drain.is_empty() {
        let rss: Vec<f64> = drains
            .iter()
            .map(|d| d.peak_rss_kib as f64 / 1024.0)
            .collect();
        let cpu: Vec<f64> = drains.iter().map(|d| d.cpu_per_10k()).collect();
        let m = median(rss.clone());
        rows.push(Row {
            figure: "5. Relay peak RSS (VmHWM) over a drain".into(),
            measured: m.map_or("failed".into(), |m| {
                format!("{m:.1} MiB{}", runs_note(&rss))
            }),
            target: format!("≤ {TARGET_RSS_MIB} MiB"),
            result: verdict(m.map(|m| m <= TARGET_RSS_MIB)),
        });
        let m = median(cpu.clone());
        rows.push(Row {
            figure: "5. Relay CPU (user+sys) per 10,000 messages over a drain".into(),
            measured: m.map_or("failed".into(), |m| {
                format!("{m:.3} CPU-s{}", runs_note(&cpu))
            }),
            target: format!("≤ {TARGET_CPU_PER_10K} CPU-s"),
            result: verdict(m.map(|m| m <= TARGET_CPU_PER_10K)),
        });
        let claims: Vec<ClaimStats> = drains.iter().filter_map(|d| d.claims).collect();
        rows.push(claim_row(
            "2. Claim statement duration over the drains (relay start → stop)".into(),
            &claims,
            !drains.is_empty(),
        ));
    }

    // 6. growth.
    if !r.growth.is_empty() {
        for &kept in &args.growth_kept {
            let v = rates_of(&r.growth, kept, DrainRun::consumed_rate);
            rows.push(info(
                format!(
                    "6. Drain {} with {} published rows kept (→ consumer saw all)",
                    thousands(n as f64),
                    thousands(kept as f64)
                ),
                median(v.clone()).map_or("failed".into(), |m| {
                    format!("{} msg/s{}", thousands(m), runs_note(&v))
                }),
            ));
        }
        if let (Some(&small), Some(&large)) = (args.growth_kept.first(), args.growth_kept.last()) {
            if small != large {
                let ratios = same_run_ratios(&r.growth, large, small, DrainRun::consumed_rate);
                let m = median(ratios.clone());
                rows.push(Row {
                    figure: format!(
                        "6. Rate with {} kept / rate with {} kept (same run)",
                        thousands(large as f64),
                        thousands(small as f64)
                    ),
                    measured: m.map_or("no data".into(), |m| {
                        format!("{m:.2}{}", runs_note(&ratios))
                    }),
                    target: format!("≥ {TARGET_GROWTH_RATIO}"),
                    result: verdict(m.map(|m| m >= TARGET_GROWTH_RATIO)),
                });
            }
        }
    }

    // 7. scale-out.
    let scale_relays: &[usize] = if r.scale.is_empty() {
        &[]
    } else {
        &args.scale_relays
    };
    for &relays in scale_relays {
        let v = rates_of(&r.scale, relays, ScaleRun::rate);
        rows.push(info(
            format!(
                "7. {} rows committed at once, {relays} relay(s): commit → consumer saw all",
                thousands(n as f64)
            ),
            median(v.clone()).map_or("failed".into(), |m| {
                format!("{} msg/s{}", thousands(m), runs_note(&v))
            }),
        ));
    }
    if let Some(&one) = scale_relays.first() {
        for &relays in scale_relays.iter().skip(1) {
            let ratios = same_run_ratios(&r.scale, relays, one, ScaleRun::rate);
            rows.push(info(
                format!("7. Rate with {relays} relays / rate with {one} (same run)"),
                median(ratios.clone()).map_or("no data".into(), |m| {
                    format!("{m:.2}{}", runs_note(&ratios))
                }),
            ));
        }
    }
    super::load::app_rows(args, r, &mut rows);
    super::load::keyed_rows(args, r, &mut rows);
    super::load::cold_rows(args, r, &mut rows);
    if let Some(run) = r.backlog.first() {
        super::load::backlog_rows(args, run, "11. Backlog", &mut rows);
    }
    if let Some(run) = r.backlog_private.first() {
        super::load::backlog_rows(
            args,
            run,
            "12. Backlog on a private PostgreSQL (initdb defaults, autovacuum on)",
            &mut rows,
        );
    }
    super::pooled::rows(args, r, &mut rows);
    rows
}

/// The claim statement's duration over a phase: p99 interpolated in the
/// relay's histogram buckets (median over runs), with the largest bucket
/// reached and the claims beyond the last finite bucket.
pub(super) fn claim_row(figure: String, claims: &[ClaimStats], ran: bool) -> Row {
    let p99 = median(claims.iter().map(|c| c.p99_ms).collect());
    let measured = match (p99, claims.first()) {
        (Some(p99), Some(first)) => {
            let count: u64 = claims.iter().map(|c| c.count).sum();
            let beyond: u64 = claims.iter().map(|c| c.beyond_last_bucket).sum();
            let max_le = claims.iter().map(|c| c.max_le_ms).fold(0.0, f64::max);
            let p50 = median(claims.iter().map(|c| c.p50_ms).collect()).unwrap_or(f64::NAN);
            format!(
                "p99 ≈ {p99:.1} ms (p50 ≈ {p50:.2} ms; {} claims; slowest ≤ {}; {beyond} beyond {:.1} s, where 25 s statement timeouts would land)",
                thousands(count as f64),
                if max_le.is_finite() {
                    format!("{max_le:.1} ms")
                } else {
                    "+Inf".into()
                },
                first.last_bucket_ms / 1000.0
            )
        }
        _ if ran => "no claims observed".into(),
        _ => "failed".into(),
    };
    Row {
        figure: format!("{figure} (relay's outbox_relay_claim_duration_seconds)"),
        measured,
        target: format!("p99 ≤ {TARGET_CLAIM_P99_MS:.0} ms"),
        result: if claims.is_empty() && ran {
            "–".into()
        } else {
            verdict(p99.map(|p| p <= TARGET_CLAIM_P99_MS))
        },
    }
}

/// Runs that each cover several settings (kept rows, relay count): one
/// setting's rate from every run that succeeded.
fn rates_of<K: PartialEq, T>(
    runs: &[Vec<(K, Result<T, String>)>],
    setting: K,
    rate: impl Fn(&T) -> f64,
) -> Vec<f64> {
    runs.iter()
        .flatten()
        .filter(|(k, _)| *k == setting)
        .filter_map(|(_, r)| r.as_ref().ok().map(&rate))
        .collect()
}

/// Rate of `top` over rate of `bottom`, within each run that has both.
fn same_run_ratios<K: PartialEq + Copy, T>(
    runs: &[Vec<(K, Result<T, String>)>],
    top: K,
    bottom: K,
    rate: impl Fn(&T) -> f64,
) -> Vec<f64> {
    runs.iter()
        .filter_map(|run| {
            let of = |k: K| {
                run.iter()
                    .find(|(kk, _)| *kk == k)
                    .and_then(|(_, r)| r.as_ref().ok())
                    .map(&rate)
            };
            Some(of(top)? / of(bottom)?)
        })
        .collect()
}
