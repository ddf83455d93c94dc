//! The details: per-run tables, and the failures and notes.

use std::fmt::Write as _;

use crate::{
    args::Args,
    phases::QUIET_BEFORE_S,
    results::{DrainRun, Results},
    util::thousands,
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
                        s.connections,
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
                        "- run {}: from {QUIET_BEFORE_S} s after draining {} rows, {:.2} statements/s, {:.2} transactions/s over {:.1} s (transaction baseline {:.2}/s subtracted); method: {}{}",
                        i + 1,
                        thousands(idle.drained as f64),
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

    if !r.app.is_empty() {
        let _ = writeln!(out, "\n### Application cost, per side\n");
        let _ = writeln!(
            out,
            "pgbench's own figures (tps without connection time; latency average, which under -R counts from the scheduled \
             start). \"pending at end\": outbox rows not yet published when pgbench stopped, and how long until none were; the \
             next side starts after that. Relay CPU is its share of one core while pgbench ran.\n"
        );
        let _ = writeln!(
            out,
            "| comparison | table | transactions | failed | tx/s | latency avg ms | schedule lag avg ms | pending at end | then 0 pending after s | relay CPU % | claims (p99 ms) |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
        for (kind, c) in &r.app {
            match c {
                Ok(c) => {
                    let sides = if c.messages_first {
                        [("messages", &c.messages), ("messages_copy", &c.copy)]
                    } else {
                        [("messages_copy", &c.copy), ("messages", &c.messages)]
                    };
                    for (table, s) in sides {
                        let _ = writeln!(
                            out,
                            "| {kind:?} | {table} | {} | {} | {} | {:.2} | {} | {} | {:.2} | {:.0} | {} |",
                            thousands(s.load.transactions as f64),
                            s.load.failed,
                            thousands(s.load.tps),
                            s.load.latency_ms,
                            s.load
                                .schedule_lag_ms
                                .map_or("–".into(), |l| format!("{l:.2}")),
                            s.pending_at_end,
                            s.catch_up_s,
                            s.relay_cpu_pct,
                            s.claims.map_or("–".into(), |c| format!(
                                "{} ({:.1})",
                                c.count, c.p99_ms
                            ))
                        );
                    }
                }
                Err(_) => {
                    let _ = writeln!(out, "| {kind:?} | failed: see notes | | | | | | | | | |");
                }
            }
        }
    }
    if !r.keyed.is_empty() {
        let _ = writeln!(out, "\n### Keyed load, per run\n");
        let _ = writeln!(
            out,
            "| run | load | transactions | failed | rows/s | latency avg ms | age samples | age p50 / p99 / max ms | pending 1 s after | 0 pending after s | relay CPU % | claims | claim p50 / p99 ms, slowest ≤ ms |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for (i, k) in r.keyed.iter().enumerate() {
            match k {
                Ok(k) => {
                    for (what, l) in [("paced", &k.paced), ("unpaced", &k.unpaced)] {
                        match l {
                            Ok(l) => {
                                let _ = writeln!(
                                    out,
                                    "| {} | {what} | {} | {} | {} | {:.2} | {} | {:.0} / {:.0} / {:.0} | {} | {:.2} | {:.0} | {} | {} |",
                                    i + 1,
                                    thousands(l.load.transactions as f64),
                                    l.load.failed,
                                    thousands(l.rows_per_s()),
                                    l.load.latency_ms,
                                    l.samples,
                                    l.age_p50_ms,
                                    l.age_p99_ms,
                                    l.age_max_ms,
                                    l.pending_1s_after,
                                    l.zero_after_s,
                                    l.relay_cpu_pct,
                                    l.claims.map_or("–".into(), |c| c.count.to_string()),
                                    l.claims.map_or("–".into(), |c| format!(
                                        "{:.2} / {:.1}, {}",
                                        c.p50_ms,
                                        c.p99_ms,
                                        if c.max_le_ms.is_finite() {
                                            format!("{:.1}", c.max_le_ms)
                                        } else {
                                            "+Inf".into()
                                        }
                                    ))
                                );
                            }
                            Err(_) => {
                                let _ = writeln!(
                                    out,
                                    "| {} | {what} | failed: see notes | | | | | | | | | | |",
                                    i + 1
                                );
                            }
                        }
                    }
                    let _ = writeln!(
                        out,
                        "\nRun {}: {} rows written, {} distinct messages delivered, {} duplicate deliveries{}.",
                        i + 1,
                        thousands(k.rows as f64),
                        thousands(k.delivered as f64),
                        k.duplicates,
                        k.stop_note
                            .as_ref()
                            .map_or(String::new(), |n| format!("; {n}"))
                    );
                }
                Err(_) => {
                    let _ = writeln!(
                        out,
                        "| {} | failed: see notes | | | | | | | | | | | |",
                        i + 1
                    );
                }
            }
        }
    }
    if !r.cold.is_empty() {
        let _ = writeln!(out, "\n### Cold keyed backlog, per run\n");
        let _ = writeln!(
            out,
            "| consumer | side | fill s | s until done | msg/s | consumer saw all s | queued after | claims | claim p50 / p99 ms, slowest ≤ ms | notes |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
        let n = args.cold_rows as f64;
        for c in &r.cold {
            let with = if c.consumer { "yes" } else { "no" };
            match &c.bare {
                Ok(b) => {
                    let _ = writeln!(
                        out,
                        "| {with} | bare publisher → all confirmed | | {:.2} | {} | {} | | | | {} |",
                        b.confirmed_s,
                        thousands(n / b.confirmed_s),
                        if b.consumed_s.is_finite() {
                            format!("{:.2}", b.consumed_s)
                        } else {
                            "–".into()
                        },
                        if b.not_acked > 0 {
                            format!("{} not acked", b.not_acked)
                        } else {
                            String::new()
                        }
                    );
                }
                Err(_) => {
                    let _ = writeln!(
                        out,
                        "| {with} | bare publisher: failed, see notes | | | | | | | | |"
                    );
                }
            }
            match &c.drain {
                Ok(d) => {
                    let _ = writeln!(
                        out,
                        "| {with} | relay start → 0 pending | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} |",
                        d.fill_s,
                        d.db_zero_s,
                        thousands(n / d.db_zero_s),
                        d.consumed_s.map_or("–".into(), |s| format!("{s:.2}")),
                        d.queued.map_or("–".into(), |q| thousands(f64::from(q))),
                        d.claims.map_or("–".into(), |c| c.count.to_string()),
                        d.claims.map_or("–".into(), |c| format!(
                            "{:.2} / {:.1}, {}",
                            c.p50_ms,
                            c.p99_ms,
                            if c.max_le_ms.is_finite() {
                                format!("{:.1}", c.max_le_ms)
                            } else {
                                "+Inf".into()
                            }
                        )),
                        d.stop_note.clone().unwrap_or_default()
                    );
                }
                Err(_) => {
                    let _ = writeln!(out, "| {with} | relay: failed, see notes | | | | | | | | |");
                }
            }
        }
    }

    let mut notes = Vec::new();
    super::pooled::write(out, args, r, &mut notes);
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
    for (kind, c) in &r.app {
        if let Err(e) = c {
            note(format!("application cost {kind:?} failed"), e);
        }
    }
    for e in &r.app_notes {
        note("application-cost phase".into(), e);
    }
    for (i, k) in r.keyed.iter().enumerate() {
        match k {
            Err(e) => note(format!("keyed run {} failed", i + 1), e),
            Ok(k) => {
                for (what, l) in [("paced", &k.paced), ("unpaced", &k.unpaced)] {
                    if let Err(e) = l {
                        note(format!("keyed run {} {what} failed", i + 1), e);
                    }
                }
            }
        }
    }
    for c in &r.cold {
        let with = if c.consumer {
            "with a consumer"
        } else {
            "without a consumer"
        };
        if let Err(e) = &c.bare {
            note(format!("cold backlog {with}: bare publisher failed"), e);
        }
        if let Err(e) = &c.drain {
            note(format!("cold backlog {with}: relay drain failed"), e);
        }
    }
    for (phase, runs) in [
        ("backlog", &r.backlog),
        ("backlog-private", &r.backlog_private),
    ] {
        for (i, b) in runs.iter().enumerate() {
            match b {
                Err(e) => note(format!("{phase} run {} failed", i + 1), e),
                Ok(b) => {
                    if let Some(s) = &b.stop_note {
                        note(format!("{phase} run {}", i + 1), s);
                    }
                }
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
