//! The command-line reference in `docs/INTERFACE.md`, rendered from clap's
//! definitions so it cannot drift: a unit test compares the committed file
//! with this rendering (`OUTBOX_UPDATE_DOCS=1 cargo test reference` rewrites it).

use clap::Command;

/// Where the generated part of docs/INTERFACE.md starts; everything above
/// the marker is written by hand.
pub const MARKER: &str = "<!-- Generated from the clap definitions: do not edit below this line. \
Regenerate with `OUTBOX_UPDATE_DOCS=1 cargo test --lib reference`. -->";

/// Markdown for every subcommand and flag of `cmd`, depth first.
pub fn render(cmd: &Command) -> String {
    let mut out = String::new();
    section(cmd, cmd.get_name(), &mut out);
    out
}

fn section(cmd: &Command, path: &str, out: &mut String) {
    out.push_str(&format!("\n### `{path}`\n\n"));
    if let Some(about) = cmd.get_long_about().or(cmd.get_about()) {
        out.push_str(&one_line(&about.to_string()));
        out.push_str("\n\n");
    }
    let args: Vec<_> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && !["help", "version"].contains(&a.get_id().as_str()))
        // Global flags are listed once, under the top command.
        .filter(|a| !a.is_global_set() || path == cmd.get_name())
        .collect();
    if !args.is_empty() {
        out.push_str("| flag | environment | default | meaning |\n|---|---|---|---|\n");
        for arg in args {
            let flag = match (arg.get_long(), arg.get_short()) {
                (Some(long), _) => format!("`--{long}`"),
                (None, Some(short)) => format!("`-{short}`"),
                (None, None) => format!("`<{}>`", arg.get_id().as_str().to_uppercase()),
            };
            let env = arg
                .get_env()
                .map(|e| format!("`{}`", e.to_string_lossy()))
                .unwrap_or_default();
            let default = arg
                .get_default_values()
                .iter()
                .map(|v| format!("`{}`", v.to_string_lossy()))
                .collect::<Vec<_>>()
                .join(", ");
            let help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|h| one_line(&h.to_string()))
                .unwrap_or_default();
            let required = if arg.is_required_set() {
                " (required)"
            } else {
                ""
            };
            out.push_str(&format!(
                "| {flag}{required} | {env} | {default} | {} |\n",
                help.replace('|', "\\|")
            ));
        }
        out.push('\n');
    }
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        section(sub, &format!("{path} {}", sub.get_name()), out);
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;
    use crate::cli::settings::Cli;

    #[test]
    fn docs_interface_lists_every_flag_of_the_command_line() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/INTERFACE.md");
        let committed = std::fs::read_to_string(path).expect("docs/INTERFACE.md");
        let (by_hand, _) = committed
            .split_once(MARKER)
            .expect("docs/INTERFACE.md keeps the generated-part marker");
        let expected = format!("{by_hand}{MARKER}\n{}", render(&Cli::command()));
        if committed != expected {
            if std::env::var("OUTBOX_UPDATE_DOCS").is_ok_and(|v| v == "1") {
                std::fs::write(path, &expected).expect("rewrite docs/INTERFACE.md");
            } else {
                panic!(
                    "docs/INTERFACE.md differs from the command line's definitions: \
                     run `OUTBOX_UPDATE_DOCS=1 cargo test --lib reference` and commit the file"
                );
            }
        }
    }

    #[test]
    fn the_reference_names_every_subcommand_and_a_new_flag_would_show() {
        let text = render(&Cli::command());
        for needle in [
            "### `outbox-relay run`",
            "### `outbox-relay grants`",
            "### `outbox-relay dead-letters retry`",
            "`--max-header-bytes`",
            "`OUTBOX_AMQP_CA_FILE`",
        ] {
            assert!(text.contains(needle), "{needle} missing");
        }
        let extended = Cli::command().arg(clap::Arg::new("brand-new").long("brand-new"));
        assert!(render(&extended).contains("`--brand-new`"));
    }
}
