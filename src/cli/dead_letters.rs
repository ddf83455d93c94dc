//! `outbox-relay dead-letters list|retry|discard`.

use std::{fmt::Write as _, process::ExitCode};

use serde_json::{json, Value};

use super::{
    open_outbox, plural, rfc3339, rfc3339_seconds,
    settings::{DeadLetterAction, Selection},
    usage, Out, Table, EXIT_PROBLEM,
};
use crate::{
    config::Connections,
    store::{
        self,
        admin::{self, Chosen},
    },
};

/// last_error is cut to this many characters in the dead-letter table.
const LAST_ERROR_WIDTH: usize = 60;

pub async fn dead_letters(conn: &Connections, action: &DeadLetterAction) -> ExitCode {
    let out = Out::new(conn);
    if let DeadLetterAction::List { limit, .. } = action {
        if *limit < 1 {
            return usage(&format!("invalid --limit {limit}: use 1 or more"));
        }
    }
    let db = match open_outbox(conn, "outbox-relay dead-letters", &out).await {
        Ok(db) => db,
        Err(code) => return code,
    };
    let schema = &conn.schema;
    match action {
        DeadLetterAction::List { json, limit } => {
            let (total, rows) = match admin::list_dead_letters(&db, schema, *limit).await {
                Ok(r) => r,
                Err(e) => return out.fail(&e),
            };
            if *json {
                out.print(&format!("{:#}\n", dead_letters_json(schema, total, &rows)));
            } else {
                out.print(&dead_letters_text(schema, total, &rows));
            }
            ExitCode::SUCCESS
        }
        DeadLetterAction::Retry(selection) => {
            let result = admin::retry_dead_letters(&db, schema, chosen(selection)).await;
            report_changed(&out, schema, selection, result, "retried", "retry", |n| {
                if n == 1 {
                    "pending again and due now, attempts reset; the relay publishes it with its original message_id"
                } else {
                    "pending again and due now, attempts reset; the relay publishes them with their original message_id"
                }
            })
        }
        DeadLetterAction::Discard(selection) => {
            let result = admin::discard_dead_letters(&db, schema, chosen(selection)).await;
            report_changed(
                &out,
                schema,
                selection,
                result,
                "discarded",
                "discard",
                |n| {
                    if n == 1 {
                        "deleted, it will never be published"
                    } else {
                        "deleted, they will never be published"
                    }
                },
            )
        }
    }
}

fn chosen(selection: &Selection) -> Chosen<'_> {
    if selection.all {
        Chosen::All
    } else {
        Chosen::Ids(&selection.ids)
    }
}

fn report_changed(
    out: &Out,
    schema: &str,
    selection: &Selection,
    result: Result<admin::Changed, store::StoreError>,
    done: &str,
    verb: &str,
    effect: impl Fn(u64) -> &'static str,
) -> ExitCode {
    let changed = match result {
        Ok(c) => c,
        Err(e) => return out.fail(&e),
    };
    if changed.rows == 0 && selection.all {
        out.line(&format!(
            "no dead-lettered rows in schema '{schema}': nothing to {verb}"
        ));
    } else if changed.rows == 0 {
        out.line(&format!("{done} 0 dead-lettered rows in schema '{schema}'"));
    } else {
        out.line(&format!(
            "{done} {} dead-lettered row{} in schema '{schema}': {}",
            changed.rows,
            plural(changed.rows),
            effect(changed.rows)
        ));
    }
    for (id, kind) in &changed.skipped {
        out.error(&format!(
            "error: row {id} not {done}: {} (only dead-lettered rows can be {done})",
            kind.describe()
        ));
    }
    if changed.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PROBLEM)
    }
}

fn dead_letters_json(schema: &str, total: i64, rows: &[admin::DeadLetter]) -> Value {
    json!({
        "schema": schema,
        "total": total,
        "shown": rows.len(),
        "rows": rows.iter().map(|r| json!({
            "id": r.id,
            "message_id": r.message_id.to_string(),
            "exchange": r.exchange,
            "routing_key": r.routing_key,
            "partition_key": r.partition_key,
            "attempts": r.attempts,
            "dead_lettered_at": rfc3339(r.dead_lettered_at),
            "last_error": r.last_error,
        })).collect::<Vec<_>>(),
    })
}

fn dead_letters_text(schema: &str, total: i64, rows: &[admin::DeadLetter]) -> String {
    if total == 0 {
        return format!("no dead-lettered rows in schema '{schema}'\n");
    }
    let mut table = Table::new(&[
        "ID",
        "MESSAGE_ID",
        "EXCHANGE",
        "ROUTING_KEY",
        "PARTITION_KEY",
        "ATTEMPTS",
        "DEAD_LETTERED_AT",
        "LAST_ERROR",
    ]);
    for r in rows {
        table.row(vec![
            r.id.to_string(),
            r.message_id.to_string(),
            if r.exchange.is_empty() {
                "(default)".to_string()
            } else {
                one_line(&r.exchange, 40)
            },
            one_line(&r.routing_key, 40),
            r.partition_key
                .as_deref()
                .map_or_else(|| "-".to_string(), |k| one_line(k, 40)),
            r.attempts.to_string(),
            rfc3339_seconds(r.dead_lettered_at),
            r.last_error
                .as_deref()
                .map_or_else(|| "-".to_string(), |e| one_line(e, LAST_ERROR_WIDTH)),
        ]);
    }
    let mut t = table.render();
    let shown = rows.len() as i64;
    if shown < total {
        let _ = writeln!(
            t,
            "{shown} of {total} dead-lettered rows in schema '{schema}' (oldest first; --limit N shows more, --json the full errors)"
        );
    } else {
        let _ = writeln!(
            t,
            "{total} dead-lettered row{} in schema '{schema}' (--json shows the full errors)",
            plural(total)
        );
    }
    let _ = writeln!(
        t,
        "publish again: outbox-relay dead-letters retry --id N (or --all); delete: outbox-relay dead-letters discard --id N (or --all)"
    );
    t
}

/// Text on one line (runs of whitespace, newlines included, become one space),
/// cut to `max` characters with `...` at the end when longer. Other control
/// characters are shown escaped (`\u{1b}`): a row's text must not drive the
/// operator's terminal.
fn one_line(text: &str, max: usize) -> String {
    let flat: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .flat_map(|c| {
            let shown: Vec<char> = if c.is_control() {
                c.escape_unicode().collect()
            } else {
                vec![c]
            };
            shown
        })
        .collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let keep = max.saturating_sub(3);
    let mut cut: String = flat.chars().take(keep).collect();
    cut.push_str("...");
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_errors_are_cut_to_one_line() {
        assert_eq!(one_line("short", 10), "short");
        assert_eq!(one_line("line one\n  line two", 40), "line one line two");
        let cut = one_line(&"x".repeat(100), 20);
        assert_eq!(cut.chars().count(), 20);
        assert!(cut.ends_with("..."));
        // Multi-byte characters are never split.
        let cut = one_line(&"é".repeat(30), 10);
        assert_eq!(cut, format!("{}...", "é".repeat(7)));
        // Terminal escapes from a row are shown, not obeyed.
        assert_eq!(one_line("a\u{1b}[2Jb", 40), "a\\u{1b}[2Jb");
    }
}
