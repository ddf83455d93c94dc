//! The details: per-run tables, and the failures and notes.

use std::fmt::Write as _;

use crate::{
    results::{DrainRun, Results},
    util::{steady_connections, thousands},
    Args,
};

/// Appends the details section (per-run tables, then failures and notes).
pub(super) fn write(out: &mut String, args: &Args, r: &Results) {
    let n = args.messages;
    // Details.
    let _ = writeln!(out, "\n## Details\n");
    if !r.ceiling.is_empty() || !r.drain.is_empty() {
        let _ = writeln!(out, "### Ceiling and drain, per run\n");
        let _ = writeln!(
            out,
            "CPU columns are CPU-seconds over the measured window (wall): the relay process, the PostgreSQL backends serving \
             the relay's connections, RabbitMQ (all of it), and the bench (its process and its own backend). \"other\" is the busy \
             CPU of the whole machine not in those columns: other PostgreSQL processes (WAL writer, checkpointer, other \
             clients), kernel threads, and anyone else using the machine.\n"
        );
        let _ = writeln!(
            out,
            "| run | phase | wall s | msg/s → consumer | msg/s → DB 0 pending | first msg s | relay user+sys s | per 10k | peak RSS MiB | relay's PG backends s | rabbitmq s | bench s | other s | notes |"
        );
        let _ = writeln!(
            out,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        let runs = r.ceiling.len().max(r.drain.len());
        for i in 0..runs {
            if let Some(c) = r.ceiling.get(i) {
                match c {
                    Ok(c) => {
                        let other = c.cpu.total_s - c.cpu.rabbitmq_s - c.cpu.bench_s;
                        let _ = writeln!(
                            out,
                            "| {} | ceiling | {:.2} | {} | (confirmed: {}) | | | | | | {:.2} | {:.2} | {:.2} | {} |",
                            i + 1,
                            c.consumed_s,
                            thousands(n as f64 / c.consumed_s),
                            thousands(n as f64 / c.confirmed_s),
                            c.cpu.rabbitmq_s,
                            c.cpu.bench_s,
                            other,
                            if c.not_acked > 0 { format!("{} not acked", c.not_acked) } else { String::new() }
                        );
                    }
                    Err(_) => {
                        let _ = writeln!(
                            out,
                            "| {} | ceiling | failed: see notes | | | | | | | | | | | |",
                            i + 1
                        );
                    }
                }
            }
            if let Some(d) = r.drain.get(i) {
                out.push_str(&drain_row(&format!("{}", i + 1), "drain", d));
            }
        }
    }
    if !r.steady.is_empty() {
        let _ = writeln!(out, "\n### Steady state, per run\n");
        let _ = writeln!(
            out,
            "| rate asked | connections | rows inserted | rate reached | lag p50 / p99 / max ms (created_at → consumer) | of which created_at → commit acked | commit acked → consumer | relay lag histogram p50 / p99 / max ≤ ms (count) | relay confirm_duration p50 / p99 ms | rows per claim (mean) | relay CPU % | duplicates | notes |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for (rate, s) in &r.steady {
            match s {
                Ok(s) => {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.0} | {} | {} |",
                        thousands(*rate as f64),
                        steady_connections(args.steady_connections, *rate),
                        thousands(s.inserted as f64),
                        thousands(s.insert_rate),
                        s.lag_ms,
                        s.commit_ms,
                        s.after_commit_ms,
                        s.hist_ms.map_or("n/a".into(), |h| format!(
                            "{:.1} / {:.1} / {} ({})",
                            h.p50,
                            h.p99,
                            if h.max_le.is_finite() {
                                format!("{:.0}", h.max_le)
                            } else {
                                "+Inf".into()
                            },
                            h.count
                        )),
                        s.confirm_ms
                            .map_or("n/a".into(), |h| format!("{:.1} / {:.1}", h.p50, h.p99)),
                        s.mean_batch,
                        s.relay_cpu_pct,
                        s.duplicates,
                        s.stop_note.clone().unwrap_or_default()
                    );
                }
                Err(_) => {
                    let _ = writeln!(
                        out,
                        "| {} | failed: see notes | | | | | | | | | | | |",
                        thousands(*rate as f64)
                    );
                }
            }
        }
    }
    if !r.idle.is_empty() {
        let _ = writeln!(out, "\n### Idle, per run\n");
        for (i, run) in r.idle.iter().enumerate() {
            match run {
                Ok(idle) => {
                    let _ = writeln!(
                        out,
                        "- run {}: {:.2} statements/s, {:.2} transactions/s over {:.1} s (transaction baseline {:.2}/s subtracted); method: {}{}",
                        i + 1,
                        idle.statements_per_s,
                        idle.xacts_per_s,
                        idle.window_s,
                        idle.baseline_per_s,
                        idle.method,
                        idle.stop_note.as_ref().map_or(String::new(), |n| format!("; {n}"))
                    );
                }
                Err(_) => {
                    let _ = writeln!(out, "- run {}: failed, see notes", i + 1);
                }
            }
        }
    }
    if !r.growth.is_empty() {
        let _ = writeln!(out, "\n### Growth, per run\n");
        let _ = writeln!(
            out,
            "| run | kept | wall s | msg/s → consumer | msg/s → DB 0 pending | first msg s | relay user+sys s | per 10k | peak RSS MiB | relay's PG backends s | rabbitmq s | bench s | other s | notes |"
        );
        let _ = writeln!(
            out,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for (i, run) in r.growth.iter().enumerate() {
            for (kept, d) in run {
                out.push_str(&drain_row(
                    &format!("{}", i + 1),
                    &thousands(*kept as f64),
                    d,
                ));
            }
        }
    }

    if !r.scale.is_empty() {
        let _ = writeln!(out, "\n### Scale-out, per run\n");
        let _ = writeln!(
            out,
            "| run | relays | fair split after s | commit → consumer saw all s | msg/s | published_total per relay then (last marks may lag) | duplicates |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        for (i, run) in r.scale.iter().enumerate() {
            for (relays, s) in run {
                match s {
                    Ok(s) => {
                        let _ = writeln!(
                            out,
                            "| {} | {relays} | {:.1} | {:.2} | {} | {:?} | {} |",
                            i + 1,
                            s.split_s,
                            s.drain_s,
                            thousands(s.rate()),
                            s.per_relay,
                            s.duplicates
                        );
                    }
                    Err(_) => {
                        let _ =
                            writeln!(out, "| {} | {relays} | failed, see notes | | | | |", i + 1);
                    }
                }
            }
        }
    }

    let mut notes = Vec::new();
    let mut note =
        |what: String, e: &String| notes.push(format!("- {what}: {}", e.replace('\n', "\n  ")));
    for (i, c) in r.ceiling.iter().enumerate() {
        if let Err(e) = c {
            note(format!("ceiling run {} failed", i + 1), e);
        }
    }
    for (i, d) in r.drain.iter().enumerate() {
        match d {
            Err(e) => note(format!("drain run {} failed", i + 1), e),
            Ok(d) => {
                if let Some(s) = &d.stop_note {
                    note(format!("drain run {}", i + 1), s);
                }
            }
        }
    }
    for (rate, s) in &r.steady {
        if let Err(e) = s {
            note(format!("steady {rate}/s failed"), e);
        }
    }
    for (i, s) in r.idle.iter().enumerate() {
        if let Err(e) = s {
            note(format!("idle run {} failed", i + 1), e);
        }
    }
    for (i, run) in r.growth.iter().enumerate() {
        for (kept, d) in run {
            if let Err(e) = d {
                note(format!("growth run {} with {kept} kept failed", i + 1), e);
            }
        }
    }
    for (i, run) in r.scale.iter().enumerate() {
        for (relays, s) in run {
            if let Err(e) = s {
                note(
                    format!("scale run {} with {relays} relays failed", i + 1),
                    e,
                );
            }
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(out, "\n### Failures and notes\n");
        for n in notes {
            let _ = writeln!(out, "{n}");
        }
    }
}

fn drain_row(run: &str, phase: &str, d: &Result<DrainRun, String>) -> String {
    match d {
        Ok(d) => {
            let other = d.cpu.total_s
                - d.cpu.relay_pg_s
                - d.cpu.rabbitmq_s
                - d.cpu.bench_s
                - d.relay_user_s
                - d.relay_sys_s;
            let mut notes = Vec::new();
            if d.duplicates > 0 {
                notes.push(format!("{} duplicate deliveries", d.duplicates));
            }
            if let Some(s) = &d.stop_note {
                notes.push(s.clone());
            }
            format!(
                "| {run} | {phase} | {:.2} | {} | {} | {:.2} | {:.2} + {:.2} | {:.3} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {} |\n",
                d.cpu.wall_s,
                thousands(d.consumed_rate()),
                thousands(d.db_rate()),
                d.first_s,
                d.relay_user_s,
                d.relay_sys_s,
                d.cpu_per_10k(),
                d.peak_rss_kib as f64 / 1024.0,
                d.cpu.relay_pg_s,
                d.cpu.rabbitmq_s,
                d.cpu.bench_s,
                other,
                notes.join("; ")
            )
        }
        Err(_) => format!("| {run} | {phase} | failed: see notes | | | | | | | | | | | |\n"),
    }
}
