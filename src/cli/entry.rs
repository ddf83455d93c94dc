//! The binary's entry: parse the command line, set up logging, dispatch.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::{
    filter::{filter_fn, FilterExt},
    layer::SubscriberExt,
    util::SubscriberInitExt,
    EnvFilter, Layer,
};

use super::{
    settings::{self, Cli, Command, LogFormat},
    usage,
};
use crate::service;

/// The `outbox-relay` binary: parse, set up logging, dispatch.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{}", usage_line(&e.render().to_string()));
            return ExitCode::from(super::EXIT_USAGE);
        }
    };
    init_logging(
        cli.common.log_format,
        matches!(cli.command, Command::Run(_)),
    );
    // A panic is a bug: crash the whole process so the supervisor restarts it,
    // rather than leave a task dead inside a process that looks alive.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    // Reads FAILPOINTS when built with the `failpoints` feature; a no-op otherwise.
    let _failpoints = fail::FailScenario::setup();
    // `grants` only prints SQL: it needs no connection, so no URL either.
    if let Command::Grants(args) = &cli.command {
        return super::grants(&cli.common.schema, args);
    }
    let conn = match cli.common.connections() {
        Ok(c) => c,
        Err(e) => return usage(&e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return super::problem(&format!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(async move {
        match &cli.command {
            Command::Run(args) => {
                let cfg = match args.resolve(conn) {
                    Ok(cfg) => cfg,
                    Err(e) => return usage(&e),
                };
                match service::run(cfg).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(service::RunError::Bind(e)) => usage(&e),
                    Err(e) => super::problem(&e),
                }
            }
            Command::Migrate { dry_run } => super::migrate(&conn, *dry_run).await,
            Command::Check { listen } => match settings::boolean("listen", listen) {
                Ok(listen) => super::check(&conn, listen).await,
                Err(e) => usage(&e),
            },
            Command::Status { json } => super::status(&conn, *json).await,
            Command::DeadLetters { action } => super::dead_letters(&conn, action).await,
            Command::Replay(args) => super::replay(&conn, args).await,
            // Answered above, before the connection settings are required.
            Command::Grants(args) => super::grants(&conn.schema, args),
        }
    })
}

/// clap's error in one line: its first paragraph (the error and what it
/// names, e.g. the missing `<--id <IDS>...|--all>` on the next line), then the
/// usage line. A missing subcommand, which clap answers with the whole help,
/// becomes an error naming the subcommands to choose from.
fn usage_line(rendered: &str) -> String {
    let paragraphs: Vec<&str> = rendered.split("\n\n").collect();
    let one_line = |p: &str| {
        p.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let first = paragraphs
        .first()
        .map(|p| one_line(p))
        .filter(|p| !p.is_empty());
    let commands: Vec<&str> = paragraphs
        .iter()
        .find_map(|p| p.trim_start().strip_prefix("Commands:"))
        .map(|list| {
            list.lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|name| *name != "help")
                .collect()
        })
        .unwrap_or_default();
    // With connection settings in the environment clap does not show the
    // help but says "'outbox-relay' requires a subcommand ... [subcommands:
    // run, migrate, ..., help]": the same error, worded the same way.
    let listed = first
        .as_deref()
        .filter(|e| e.contains("requires a subcommand"))
        .and_then(|e| e.split_once("[subcommands: "))
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| {
            list.split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty() && *name != "help")
                .collect::<Vec<_>>()
        })
        .filter(|names| !names.is_empty());
    let mut line = match first {
        _ if listed.is_some() => format!(
            "error: a subcommand is required, one of: {}",
            listed.unwrap_or_default().join(", ")
        ),
        Some(error) if error.starts_with("error:") => error,
        _ if !commands.is_empty() => format!(
            "error: a subcommand is required, one of: {}",
            commands.join(", ")
        ),
        Some(other) => other,
        None => "error: invalid usage".to_string(),
    };
    if let Some(usage) = paragraphs
        .iter()
        .find_map(|p| p.trim_start().strip_prefix("Usage: ").map(one_line))
    {
        line.push_str(&format!("; usage: {usage}; see --help"));
    }
    line
}

fn init_logging(format: LogFormat, relay: bool) {
    // Operator commands report every error themselves; library logs would repeat them.
    let default = if relay {
        // lapin logs a returned message in full (payload and headers) at warn:
        // the relay reports returns itself, without the body.
        "info,lapin=error,tokio_postgres=warn"
    } else {
        "warn,lapin=off,tokio_postgres=off"
    };
    let filter = EnvFilter::try_from_env("OUTBOX_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Whatever OUTBOX_LOG says: never the wire log of the AMQP client.
    let filter = filter.and(filter_fn(|meta| {
        !prints_amqp_frames(meta.target(), *meta.level())
    }));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let registry = tracing_subscriber::registry();
    match format {
        LogFormat::Json => registry.with(layer.json().with_filter(filter)).init(),
        LogFormat::Text => registry.with(layer.with_filter(filter)).init(),
    }
}

/// lapin's `trace` level prints AMQP frames whole, the handshake's SASL
/// PLAIN response (user and password, as decimal bytes) among them, and its
/// internal state (which holds the connection's credentials). No
/// `OUTBOX_LOG` may turn that on: those targets stop at `debug`.
fn prints_amqp_frames(target: &str, level: tracing::Level) -> bool {
    const AMQP_CLIENT: &[&str] = &[
        "lapin",
        "amq_protocol",
        "amq_protocol_tcp",
        "amq_protocol_types",
        "amq_protocol_uri",
        "tcp_stream",
    ];
    let crate_name = target.split("::").next().unwrap_or(target);
    level == tracing::Level::TRACE && AMQP_CLIENT.contains(&crate_name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn the_amqp_clients_wire_log_is_never_printed() {
        for target in [
            "lapin",
            "lapin::io_loop",
            "lapin::frames",
            "amq_protocol_tcp",
        ] {
            assert!(
                prints_amqp_frames(target, Level::TRACE),
                "{target} at trace must be dropped"
            );
            assert!(
                !prints_amqp_frames(target, Level::DEBUG),
                "{target} at debug"
            );
        }
        assert!(!prints_amqp_frames("outbox_relay::relay", Level::TRACE));
        assert!(!prints_amqp_frames("lapinous", Level::TRACE));
    }

    #[test]
    fn a_usage_error_names_what_is_missing_in_one_line() {
        let e = Cli::try_parse_from(["outbox-relay", "dead-letters", "retry"]).unwrap_err();
        let line = usage_line(&e.render().to_string());
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.starts_with("error: the following required arguments were not provided: ")
                && line.contains("--id")
                && line.contains("--all"),
            "{line}"
        );
        assert!(
            line.contains("usage: outbox-relay dead-letters retry"),
            "{line}"
        );
    }

    #[test]
    fn a_missing_subcommand_reads_the_same_whether_clap_shows_help_or_an_error() {
        // What clap renders when connection settings come from the
        // environment (OUTBOX_DATABASE_URL set, as `make test` does).
        let rendered = "error: 'outbox-relay' requires a subcommand but one was not provided\n  \
             [subcommands: run, migrate, check, status, dead-letters, replay, grants, help]\n\n\
             Usage: outbox-relay [OPTIONS] <COMMAND>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_line(rendered),
            "error: a subcommand is required, one of: run, migrate, check, status, \
             dead-letters, replay, grants; usage: outbox-relay [OPTIONS] <COMMAND>; see --help"
        );
    }

    #[test]
    fn a_missing_subcommand_is_named_with_the_ones_to_choose_from() {
        for (args, names) in [
            (
                &["outbox-relay"][..],
                &[
                    "migrate",
                    "run",
                    "check",
                    "status",
                    "dead-letters",
                    "replay",
                    "grants",
                ][..],
            ),
            (
                &["outbox-relay", "dead-letters"][..],
                &["list", "retry", "discard"][..],
            ),
        ] {
            let e = Cli::try_parse_from(args).unwrap_err();
            let line = usage_line(&e.render().to_string());
            assert!(!line.contains('\n'), "{line}");
            assert!(
                line.starts_with("error: a subcommand is required, one of: "),
                "{args:?}: {line}"
            );
            for name in names {
                assert!(line.contains(name), "{args:?}: {name} not in {line}");
            }
            assert!(!line.contains("help,"), "{line}");
            assert!(line.contains("; usage: outbox-relay"), "{line}");
        }
    }

    #[test]
    fn every_subcommand_has_help_text() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(format!("{path}: no about"));
                }
                for arg in sub.get_arguments().filter(|a| !a.is_global_set()) {
                    let name = arg.get_id().as_str();
                    if arg.get_help().is_none() && !["help", "version"].contains(&name) {
                        missing.push(format!("{path} --{name}: no help"));
                    }
                }
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "outbox-relay", &mut missing);
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }
}
