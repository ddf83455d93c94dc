//! Settings and secrets (README: "Configuration"): a setting that cannot work
//! stops every command at start with one line naming it (exit 2), and a
//! password, whatever URL syntax it holds, never appears in what the binary
//! prints, logs or serves on `/metrics`.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::time::Duration;

use outbox_test_kit::{
    database_url, http_get, run_cli, wait_until, CliOutput, ClosedPort, Launch, Settings, TestEnv,
};

const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// Fragments of the test passwords: none may appear anywhere in the output,
/// raw or percent-encoded (they are alphanumeric, so encoding keeps them).
const PG_FRAGMENTS: &[&str] = &["pgQz7", "pgWx4", "pgRt2", "pgYu6"];
const MQ_FRAGMENTS: &[&str] = &["mqKj5", "mqHv8", "mqLp3"];

fn assert_no_secret(output: &str, what: &str) {
    for fragment in PG_FRAGMENTS.iter().chain(MQ_FRAGMENTS) {
        assert!(
            !output.contains(fragment),
            "{what}: password fragment {fragment} leaked\n{output}"
        );
    }
}

/// `url` with its user info replaced by `user:password` (the password as given,
/// not encoded), and its host's port replaced by `port` when given.
fn with_credentials(url: &str, user: &str, password: &str, port: Option<u16>) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (host, tail) = rest.split_at(end);
    let host = match port {
        Some(port) => format!("{}:{port}", host.split(':').next().unwrap_or(host)),
        None => host.to_string(),
    };
    format!("{scheme}://{user}:{password}@{host}{tail}")
}

/// Runs `outbox-relay run` for `for_how_long`, then kills it; returns what it
/// printed and what `/metrics` served meanwhile (if it served).
async fn run_relay_for(
    env: &TestEnv,
    args: &[&str],
    envs: &[(&str, &str)],
    log: &std::path::Path,
    for_how_long: Duration,
) -> (String, Option<String>) {
    let mut relay = Launch::new()
        .settings(Settings::Given)
        .args(args)
        .envs(envs)
        .log(log)
        .spawn(env);
    let mut metrics = None;
    wait_until(for_how_long, async || {
        if let Some(addr) = relay.bound_metrics_addr() {
            if let Ok((200, body)) = http_get(addr, "/metrics").await {
                metrics = Some(body);
            }
        }
        metrics.is_some()
    })
    .await;
    // Let it log its retries for the rest of the time.
    tokio::time::sleep(for_how_long).await;
    if let Some(addr) = relay.bound_metrics_addr() {
        if let Ok((200, body)) = http_get(addr, "/metrics").await {
            metrics = Some(body);
        }
    }
    let still_running = !relay.has_exited();
    relay.kill();
    let output = std::fs::read_to_string(log).expect("read relay log");
    assert!(
        still_running,
        "the relay exited instead of retrying\n{output}"
    );
    (output, metrics)
}

fn cli_text(out: &CliOutput) -> String {
    format!("{}\n{}", out.stdout, out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_with_url_syntax_never_appear_in_check_status_run_or_metrics() {
    let env = TestEnv::new("settings_secrets").await;

    // Raw '/', '?' and '#' in the database password (tokio-postgres takes
    // them; trust authentication ignores the password), a raw '@' in the
    // broker password (the url crate takes it; the broker refuses it).
    let db = with_credentials(&env.db_url, "postgres", "pgQz7/pgWx4?pgRt2#pgYu6", None);
    let amqp = with_credentials(&env.amqp_url, "guest", "mqKj5@mqHv8", None);

    let check = env.cli_via(&["check"], (&db, &amqp), CLI_TIMEOUT).await;
    check.assert_code(1);
    assert!(
        check.stdout.contains("postgres:***@"),
        "check should name the redacted URL\n{}",
        check.describe()
    );
    assert_no_secret(&cli_text(&check), "check");

    let status = env.cli_via(&["status"], (&db, &amqp), CLI_TIMEOUT).await;
    // No relay runs on this schema: status says so and exits 1.
    status.assert_code(1);
    status.assert_stderr_has("problem: no live relay");
    status.assert_stdout_has("postgres:***@");
    assert_no_secret(&cli_text(&status), "status");

    let (output, metrics) = run_relay_for(
        &env,
        &[
            "--database-url",
            &db,
            "--amqp-url",
            &amqp,
            "--schema",
            &env.schema,
        ],
        &[("OUTBOX_LOG", "debug")],
        &env.dir.join("relay-wrong-broker-password.log"),
        Duration::from_secs(3),
    )
    .await;
    assert_no_secret(&output, "run (debug log)");
    let metrics = metrics
        .unwrap_or_else(|| panic!("/metrics never answered while the database was up\n{output}"));
    assert_no_secret(&metrics, "/metrics");

    // Percent-encoded passwords, both sides unreachable (a closed port), the
    // settings through environment variables and a secret file.
    let closed = ClosedPort::new();
    let db = with_credentials(
        &env.db_url,
        "postgres",
        "pgQz7%2FpgWx4%40pgRt2%3F",
        Some(closed.port),
    );
    let amqp = with_credentials(
        &env.amqp_url,
        "guest",
        "mqKj5%2FmqHv8%3FmqLp3%40",
        Some(closed.port),
    );
    let amqp_file = env.dir.join("amqp-url");
    std::fs::write(&amqp_file, format!("{amqp}\n")).expect("write secret file");
    let amqp_file = amqp_file.to_string_lossy().into_owned();
    let envs = [
        ("OUTBOX_DATABASE_URL", db.as_str()),
        ("OUTBOX_AMQP_URL_FILE", amqp_file.as_str()),
        ("OUTBOX_SCHEMA", env.schema.as_str()),
    ];

    let check = run_cli(&["check"], &envs, CLI_TIMEOUT).await;
    check.assert_code(1);
    assert_no_secret(&cli_text(&check), "check, nothing reachable");

    let status = run_cli(&["status"], &envs, CLI_TIMEOUT).await;
    status.assert_code(1);
    assert_no_secret(&cli_text(&status), "status, database unreachable");

    let (output, metrics) = run_relay_for(
        &env,
        &[],
        &envs,
        &env.dir.join("relay-unreachable.log"),
        Duration::from_secs(3),
    )
    .await;
    assert!(
        output.contains(":***@"),
        "the relay should log the redacted URL it retries\n{output}"
    );
    assert_no_secret(&output, "run, nothing reachable");
    if let Some(metrics) = metrics {
        assert_no_secret(&metrics, "/metrics, nothing reachable");
    }
}

/// One bad setting per case, the rest fine.
struct BadSetting {
    setting: &'static str,
    args: Vec<String>,
}

fn bad_settings() -> Vec<BadSetting> {
    let db = database_url();
    let amqp = "amqp://guest:guest@127.0.0.1:5672/%2f".to_string();
    let case = |setting: &'static str, db: &str, amqp: &str, extra: &[&str]| {
        let mut args: Vec<String> = vec![
            "--database-url".into(),
            db.into(),
            "--amqp-url".into(),
            amqp.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        BadSetting { setting, args }
    };
    let at_port = |port: &str| {
        with_credentials(&db, "postgres", "pgQz7", Some(5432)).replacen(
            ":5432",
            &format!(":{port}"),
            1,
        )
    };
    vec![
        case("database-url", &at_port("99999"), &amqp, &[]),
        case("database-url", &at_port("54x2"), &amqp, &[]),
        case(
            "database-url",
            &format!(
                "{}?sslmode=sometimes",
                with_credentials(&db, "postgres", "pgQz7", None)
            ),
            &amqp,
            &[],
        ),
        // A raw '@' in a database password: tokio-postgres would cut there.
        case(
            "database-url",
            &with_credentials(&db, "postgres", "pgQz7@pgWx4", None),
            &amqp,
            &[],
        ),
        case("database-url", "mysql://u:pgQz7@db/x", &amqp, &[]),
        case(
            "amqp-url",
            &db,
            "amqp://guest:mqKj5@127.0.0.1:99999/%2f",
            &[],
        ),
        // A raw '/' in a broker password: the url crate would cut there.
        case(
            "amqp-url",
            &db,
            "amqp://guest:mqKj5/mqHv8@127.0.0.1:5672/%2f",
            &[],
        ),
        // Fail-over must not downgrade to plain text, nor change vhost.
        case(
            "amqp-url",
            &db,
            "amqps://guest:mqKj5@127.0.0.1:5671/%2f,amqp://guest:mqKj5@127.0.0.1:5672/%2f",
            &[],
        ),
        case(
            "amqp-url",
            &db,
            "amqp://guest:mqLp3@127.0.0.1:5672/%2f,amqp://guest:mqLp3@localhost:5672/other",
            &[],
        ),
        case("schema", &db, &amqp, &["--schema", "Outbox"]),
        case("schema", &db, &amqp, &["--schema", "select"]),
    ]
}

fn assert_one_line_naming(out: &CliOutput, setting: &str, what: &str) {
    assert_eq!(out.code(), Some(2), "{what}\n{}", out.describe());
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: one line on stderr\n{}",
        out.describe()
    );
    assert!(
        lines[0].starts_with(&format!("invalid setting {setting}: ")),
        "{what}: the line names {setting}\n{}",
        out.describe()
    );
    assert!(out.stdout.is_empty(), "{what}\n{}", out.describe());
    assert_no_secret(&cli_text(out), what);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_url_or_schema_stops_every_command_with_one_line() {
    for bad in bad_settings() {
        for command in ["run", "check", "status", "migrate"] {
            let mut args = vec![command];
            args.extend(bad.args.iter().map(String::as_str));
            let out = run_cli(&args, &[], CLI_TIMEOUT).await;
            let what = format!("{command} {}", bad.args.join(" "));
            assert_one_line_naming(&out, bad.setting, &what);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_beyond_their_bounds_stop_run() {
    let db = database_url();
    for (setting, value) in [
        ("retention", "500ms"),
        ("retention", "3651d"),
        ("retention", "99999999999999999999999y"),
        ("shutdown-timeout", "2h"),
        ("shutdown-timeout", "584942417356y"),
        ("poll-interval", "1ms"),
        ("max-payload-bytes", "0"),
        ("max-header-bytes", "1"),
        ("max-header-bytes", "16777217"),
    ] {
        let flag = format!("--{setting}={value}");
        let out = run_cli(
            &[
                "run",
                "--database-url",
                &db,
                "--amqp-url",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                &flag,
            ],
            &[],
            CLI_TIMEOUT,
        )
        .await;
        assert_one_line_naming(&out, setting, &flag);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reserved_keyword_of_the_server_is_refused_as_schema_name() {
    let db = outbox_test_kit::connect_db(&database_url()).await;
    let words: Vec<String> = db
        .query(
            "SELECT word FROM pg_get_keywords() WHERE catcode IN ('R', 'T') ORDER BY word",
            &[],
        )
        .await
        .expect("read the server's keywords")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(words.len() > 50, "{words:?}");
    for word in &words {
        let out = run_cli(
            &[
                "migrate",
                "--database-url",
                &database_url(),
                "--schema",
                word,
            ],
            &[],
            CLI_TIMEOUT,
        )
        .await;
        assert_one_line_naming(&out, "schema", &format!("--schema {word}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_refuses_a_schema_name_the_relay_would_refuse_before_any_sql() {
    let env = TestEnv::new("settings_enqueue").await;
    let mut db = outbox_test_kit::connect_db(&env.db_url).await;
    let tx = db.transaction().await.expect("begin");
    let msg = outbox_relay::NewMessage::json("", "q", &serde_json::json!({"n": 1}));
    for bad in [
        "messages; DROP TABLE x; --",
        "Outbox",
        "user",
        "",
        "\"quoted\"",
    ] {
        match outbox_relay::enqueue(&tx, bad, &msg).await {
            Err(outbox_relay::EnqueueError::InvalidSchema(e)) => {
                assert_eq!(e.name, bad);
            }
            other => panic!("enqueue into {bad:?}: {other:?}"),
        }
    }
    // Nothing reached the server: the transaction is still usable.
    let id = outbox_relay::enqueue(&tx, &env.schema, &msg)
        .await
        .expect("enqueue into the real schema");
    tx.commit().await.expect("commit");
    let n: i64 = db
        .query_one(
            &format!(
                "SELECT count(*) FROM {}.messages WHERE message_id = $1",
                env.schema
            ),
            &[&id],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_password_with_a_raw_question_mark_keeps_its_sslmode() {
    // sslmode=verify-full against a server without TLS must fail as a TLS
    // failure: a '?' in the password must not hide the real query.
    let db = format!(
        "{}?sslmode=verify-full",
        with_credentials(&database_url(), "postgres", "pgQz7?pgWx4", None)
    );
    let out = run_cli(&["status", "--database-url", &db], &[], CLI_TIMEOUT).await;
    out.assert_code(1);
    let text = cli_text(&out).to_lowercase();
    assert!(
        text.contains("tls handshake") || text.contains("root certificates"),
        "expected a TLS failure\n{}",
        out.describe()
    );
    assert_no_secret(&cli_text(&out), "status with sslmode=verify-full");
}

#[test]
fn the_test_urls_are_built_as_intended() {
    assert_eq!(
        with_credentials("postgres://postgres@127.0.0.1:5432/test", "u", "a/b", None),
        "postgres://u:a/b@127.0.0.1:5432/test"
    );
    assert_eq!(
        with_credentials("amqp://guest:guest@127.0.0.1:5672/%2f", "g", "p", Some(1)),
        "amqp://g:p@127.0.0.1:1/%2f"
    );
}
