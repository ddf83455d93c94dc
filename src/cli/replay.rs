//! `outbox-relay replay`: published rows become pending again.

use std::process::ExitCode;

use super::{open_outbox, plural, rfc3339_seconds, settings::ReplayArgs, usage, Out, EXIT_PROBLEM};
use crate::{
    config::Connections,
    store::admin::{self, ReplayRange},
};

/// `outbox-relay replay`: published rows become pending again.
pub async fn replay(conn: &Connections, args: &ReplayArgs) -> ExitCode {
    let out = Out::new(conn);
    if let (Some(from), Some(to)) = (args.start.from_id, args.to_id) {
        if to < from {
            return usage(&format!(
                "invalid --to-id {to}: it is below --from-id {from}"
            ));
        }
    }
    let db = match open_outbox(conn, "outbox-relay replay", &out).await {
        Ok(db) => db,
        Err(code) => return code,
    };
    let schema = &conn.schema;
    let (range, asked) = match (&args.start.since, args.start.from_id) {
        (Some(since), _) => match admin::parse_time(&db, since).await {
            Ok(Ok(at)) => (ReplayRange::Since(since.clone()), format!("--since {since} ({at})")),
            Ok(Err(reason)) => {
                return usage(&out.scrub(&format!(
                    "invalid --since '{since}': not a time PostgreSQL can read ({reason}); use e.g. 2026-11-23T10:00:00Z"
                )))
            }
            Err(e) => return out.fail(&e),
        },
        (None, Some(from)) => (
            ReplayRange::Ids { from, to: args.to_id },
            match args.to_id {
                Some(to) => format!("--from-id {from} --to-id {to}"),
                None => format!("--from-id {from}"),
            },
        ),
        // clap's group makes one of them required.
        (None, None) => return usage(&"replay needs --since TIME or --from-id N"),
    };
    let replayed = match admin::replay(&db, schema, &range).await {
        Ok(r) => r,
        Err(e) => return out.fail(&e),
    };
    if replayed.rows == 0 {
        let kept = match admin::published_kept(&db, schema).await {
            Ok(k) => k,
            Err(e) => return out.fail(&e),
        };
        out.error(&format!(
            "error: no published row in schema '{schema}' matches {asked}: only published rows still kept can be replayed (published rows are deleted after --retention); {}",
            describe_kept(&kept)
        ));
        return ExitCode::from(EXIT_PROBLEM);
    }
    let ids = match (replayed.first_id, replayed.last_id) {
        (Some(a), Some(b)) if a != b => format!(" (ids {a} to {b})"),
        (Some(a), _) => format!(" (id {a})"),
        _ => String::new(),
    };
    let effect = if replayed.rows == 1 {
        "the relay publishes it again with its original message_id"
    } else {
        "the relay publishes them again with their original message_id, in id order"
    };
    out.line(&format!(
        "replayed {} published row{}{ids} in schema '{schema}' matching {asked}: pending again and due now; {effect}",
        replayed.rows,
        plural(replayed.rows),
    ));
    ExitCode::SUCCESS
}

fn describe_kept(kept: &admin::Kept) -> String {
    match (kept.first_id, kept.last_id, kept.oldest_published_at) {
        (Some(first), Some(last), Some(at)) => format!(
            "kept now: {} published row{}, ids {first} to {last}, oldest published {}",
            kept.rows,
            plural(kept.rows),
            rfc3339_seconds(at)
        ),
        _ => "no published rows are kept now".to_string(),
    }
}
