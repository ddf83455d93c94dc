//! TLS, proven against real servers: a private PostgreSQL with `ssl=on` (and
//! one plain-text only), and a private RabbitMQ node with TLS listeners
//! (`scripts/rabbitmq-tls-node.sh`: amqp 5690, amqps 5691 client certificate
//! optional, 5692 required, 5693 a certificate for another host name). The
//! test PKI is made by that script with openssl: `ca` signs the servers' and
//! the client's certificates, `other-ca` the "wrong CA" and a client
//! certificate no server trusts.
//!
//! A test that the machine cannot run (no openssl, no rabbitmq-server) prints
//! `SKIPPED` with the reason and passes; with OUTBOX_TEST_REQUIRE_ALL=1 it
//! fails instead. The node is stopped by the last test process that used it
//! (the script counts its users); each test's PostgreSQL stops with the test.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use outbox_test_kit::private_pg::{PgOptions, PgSsl, PrivatePostgres};
use outbox_test_kit::Launch;
use outbox_test_kit::*;

const NODE_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbitmq-tls-node.sh");
const RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// The node's plain listener: the tests' own connection, and the plain-text-only server.
const NODE_AMQP: &str = "amqp://guest:guest@127.0.0.1:5690/%2f";
const PORT_TLS: u16 = 5691;
const PORT_TLS_PEER_REQUIRED: u16 = 5692;
const PORT_TLS_WRONG_HOST: u16 = 5693;
const CHECK_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a relay may take to log a refused connection.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// What the machine can run
// ---------------------------------------------------------------------------

/// `outbox_test_kit::cannot_run`, with the test file's name.
fn cannot_run(test: &str, why: &str) -> bool {
    outbox_test_kit::cannot_run(&format!("tls::{test}"), why)
}

fn node_dir() -> PathBuf {
    std::env::var("OUTBOX_TLS_NODE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/tmp/outbox-rabbitmq-tls"))
}

fn run_script(args: &[&str]) -> Result<String, String> {
    let out = Command::new("bash")
        .arg(NODE_SCRIPT)
        .args(args)
        .env("OUTBOX_TLS_NODE_DIR", node_dir())
        .output()
        .map_err(|e| format!("cannot run {NODE_SCRIPT}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("`{NODE_SCRIPT} {}` failed: {text}", args.join(" ")))
    }
}

/// The test PKI (made once, kept in the node's directory).
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }
}

/// The PKI, or None when there is no openssl (the test says so and passes).
fn pki_or_skip(test: &str) -> Option<Pki> {
    if Command::new("openssl").arg("version").output().is_err() {
        cannot_run(
            test,
            "openssl is not installed (it makes the test certificates)",
        );
        return None;
    }
    let said = run_script(&["pki"]).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{said}");
    Some(Pki {
        dir: node_dir().join("pki"),
    })
}

/// Test processes of this binary using the node right now (under `cargo
/// test` they are threads of one process, which the script counts once).
static NODE_USERS: Mutex<usize> = Mutex::new(0);

/// The private TLS node, held while this lives; the last holder stops it.
struct TlsNode;

impl TlsNode {
    fn start_or_skip(test: &str) -> Option<TlsNode> {
        if !Path::new(RABBITMQ_SERVER).exists() {
            cannot_run(
                test,
                &format!("rabbitmq-server is not installed ({RABBITMQ_SERVER} missing)"),
            );
            return None;
        }
        let mut users = NODE_USERS.lock().unwrap_or_else(|e| e.into_inner());
        let pid = std::process::id().to_string();
        let said = run_script(&["start", "--user", &pid]).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{said}");
        *users += 1;
        Some(TlsNode)
    }

    fn amqps(port: u16, host: &str) -> String {
        format!("amqps://guest:guest@{host}:{port}/%2f")
    }

    /// `rabbitmqctl list_connections` on the node: what the broker saw.
    fn connections(&self) -> String {
        let cmd = "HOME=/var/lib/rabbitmq /usr/lib/rabbitmq/bin/rabbitmqctl -q -n outbox-tls@localhost list_connections port ssl peer_cert_subject peer_cert_issuer";
        let out = Command::new("su")
            .args(["rabbitmq", "-s", "/bin/sh", "-c", cmd])
            .output()
            .expect("run rabbitmqctl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TlsNode {
    fn drop(&mut self) {
        let mut users = NODE_USERS.lock().unwrap_or_else(|e| e.into_inner());
        *users -= 1;
        if *users == 0 {
            let pid = std::process::id().to_string();
            match run_script(&["stop", "--user", &pid]) {
                Ok(said) => eprintln!("{said}"),
                Err(e) => eprintln!("{e}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The PKI and the private TLS node, or None when the machine cannot run them
/// (the test says so and passes).
fn pki_and_node_or_skip(test: &str) -> Option<(Pki, TlsNode)> {
    let pki = pki_or_skip(test)?;
    let node = TlsNode::start_or_skip(test)?;
    Some((pki, node))
}

/// A private PostgreSQL with `ssl=on` and `cert` as its certificate (from `ca`).
fn tls_postgres(pki: &Pki, cert: &str, cert_auth_role: Option<&str>) -> PrivatePostgres {
    PrivatePostgres::start_with(&PgOptions {
        ssl: Some(PgSsl {
            cert: pki.dir.join(format!("{cert}.pem")),
            key: pki.dir.join(format!("{cert}.key")),
            ca: Some(pki.dir.join("ca.pem")),
            cert_auth_role: cert_auth_role.map(str::to_string),
        }),
    })
}

fn pg_url(pg: &PrivatePostgres, host: &str, user: &str, params: &str) -> String {
    format!("postgres://{user}@{host}:{}/postgres?{params}", pg.port)
}

/// A URL that logs in as `user` at `host` and verifies the server's
/// certificate and host name against `ca` (sslmode=verify-full).
fn pg_url_verified(pg: &PrivatePostgres, host: &str, user: &str, ca: &str) -> String {
    pg_url(
        pg,
        host,
        user,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    )
}

/// The relay with these URLs, trusting `ca` for the broker's certificate.
fn launch_trusting(db_url: &str, amqp_url: &str, ca: &str) -> Launch {
    Launch::new()
        .db_url(db_url)
        .amqp_url(amqp_url)
        .args(&["--amqp-ca-file", ca])
}

/// `outbox-relay check` with these URLs and extra flags.
async fn check(env: &TestEnv, db_url: &str, amqp_url: &str, extra: &[&str]) -> CliOutput {
    let mut args = vec![
        "check",
        "--database-url",
        db_url,
        "--amqp-url",
        amqp_url,
        "--schema",
        &env.schema,
    ];
    args.extend(extra);
    let out = run_cli(&args, &[], CHECK_TIMEOUT).await;
    save(
        &env.dir.join(format!("check-{}.txt", env.unique("out"))),
        &out.describe(),
    );
    out
}

/// The line of `check`'s output about `what` with `verdict` (e.g. "FAIL", "database").
fn check_line<'a>(out: &'a CliOutput, verdict: &str, what: &str) -> Option<&'a str> {
    out.stdout.lines().find(|l| {
        let mut words = l.split_whitespace();
        words.next() == Some(verdict) && words.next() == Some(what)
    })
}

fn assert_check_says(out: &CliOutput, verdict: &str, what: &str, says: &str) {
    let line = check_line(out, verdict, what)
        .unwrap_or_else(|| panic!("no `{verdict} {what}` line\n{}", out.describe()));
    assert!(
        line.contains(says),
        "`{verdict} {what}` line does not say {says:?}\n{}",
        out.describe()
    );
}

/// Asserts that `check` failed, its database line saying `database` and its
/// broker line saying `broker`.
fn assert_check_refuses(out: &CliOutput, database: &str, broker: &str) {
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert_check_says(out, "FAIL", "database", database);
    assert_check_says(out, "FAIL", "broker", broker);
}

/// A queue on the private node and a consumer on it (over plain 5690).
async fn node_queue(env: &TestEnv) -> (Connection, String, Collector) {
    let conn = Connection::connect(NODE_AMQP, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the TLS node at {NODE_AMQP}: {e}"));
    let channel = conn
        .create_channel()
        .await
        .expect("channel on the TLS node");
    let queue = env.unique("tls");
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(15 * 60 * 1000));
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap_or_else(|e| panic!("declare {queue} on the TLS node: {e}"));
    let collector = Collector::start(&conn, &queue, AckMode::Manual).await;
    (conn, queue, collector)
}

/// Runs the relay with `launch` until every row sent to `queue` arrived
/// through `collector` and is marked published; returns the relay.
async fn relay_delivers(
    env: &TestEnv,
    launch: &Launch,
    queue: &str,
    collector: &Collector,
    n: usize,
) -> Relay {
    let relay = launch.start(env).await;
    let rows: Vec<NewRow> = (0..n)
        .map(|i| NewRow::to_queue(queue, format!("tls-{i}").into_bytes()))
        .collect();
    let inserted = env.insert_committed(&rows).await;
    collector.wait_for_rows(&inserted).await;
    let marked = wait_until(ARRIVAL_TIMEOUT, async || {
        env.published_count().await == n as i64
    })
    .await;
    assert!(
        marked,
        "rows arrived but were not all marked published\n{}",
        relay.log_tail(80)
    );
    relay
}

/// Starts `run` with `launch` and waits until its log says `says`.
async fn run_is_refused(env: &TestEnv, launch: &Launch, says: &str) -> String {
    let relay = launch.spawn(env);
    let seen = wait_until(REFUSAL_TIMEOUT, async || relay.logs().contains(says)).await;
    assert!(
        seen,
        "`run` never logged {says:?} within {REFUSAL_TIMEOUT:?}\n{}",
        relay.log_tail(80)
    );
    relay.log_lines_with(&[says], 1)
}

/// How many of the relay's database sessions are encrypted, and how many not.
async fn relay_sessions_ssl(env: &TestEnv) -> (i64, i64) {
    let pg = env.pg.lock().await;
    let row = pg
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
               FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
              WHERE a.application_name LIKE 'outbox-relay%'",
            &[],
        )
        .await
        .expect("read pg_stat_ssl");
    (row.get(0), row.get(1))
}

// ---------------------------------------------------------------------------
// Verified TLS works
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_and_amqps_with_the_right_ca_carry_rows_end_to_end() {
    const TEST: &str = "verify_full_and_amqps_with_the_right_ca_carry_rows_end_to_end";
    let Some((pki, node)) = pki_and_node_or_skip(TEST) else {
        return;
    };
    let pg = tls_postgres(&pki, "server", None);
    let env = TestEnv::new_on_database("tls_verified", &pg.url()).await;
    let ca = pki.path("ca.pem");
    let db_url = pg_url_verified(&pg, "localhost", "postgres", &ca);
    let amqp_url = TlsNode::amqps(PORT_TLS, "localhost");

    let out = check(&env, &db_url, &amqp_url, &["--amqp-ca-file", &ca]).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_check_says(&out, "ok", "database", "connected to");
    assert_check_says(
        &out,
        "ok",
        "broker",
        &format!("TLS, server verified against amqp-ca-file '{ca}'"),
    );
    assert!(
        !out.stdout.contains("warn"),
        "verified connections need no warning\n{}",
        out.describe()
    );

    let (_conn, queue, collector) = node_queue(&env).await;
    let launch = launch_trusting(&db_url, &amqp_url, &ca);
    let _relay = relay_delivers(&env, &launch, &queue, &collector, 20).await;
    let (encrypted, plain) = relay_sessions_ssl(&env).await;
    assert!(
        encrypted >= 1 && plain == 0,
        "relay sessions: {encrypted} encrypted, {plain} plain"
    );
    let seen = node.connections();
    assert!(
        seen.lines()
            .any(|l| l.contains(&PORT_TLS.to_string()) && l.contains("true")),
        "the broker saw no TLS connection on {PORT_TLS}:\n{seen}"
    );
}

// ---------------------------------------------------------------------------
// Refusals name their case
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_an_untrusted_ca_is_refused_naming_the_ca() {
    const TEST: &str = "a_server_certificate_from_an_untrusted_ca_is_refused_naming_the_ca";
    let Some((pki, _node)) = pki_and_node_or_skip(TEST) else {
        return;
    };
    let pg = tls_postgres(&pki, "server", None);
    let env = TestEnv::new_on_database("tls_wrong_ca", &pg.url()).await;
    let other_ca = pki.path("other-ca.pem");
    let db_url = pg_url_verified(&pg, "localhost", "postgres", &other_ca);
    let amqp_url = TlsNode::amqps(PORT_TLS, "localhost");

    let out = check(&env, &db_url, &amqp_url, &["--amqp-ca-file", &other_ca]).await;
    assert_check_refuses(
        &out,
        &format!("the database server's certificate is not signed by a trusted CA: set sslrootcert to the CA certificate that signed it (trusted now: sslrootcert '{other_ca}')"),
        &format!("the broker's certificate is not signed by a trusted CA: set amqp-ca-file to the CA certificate that signed it (trusted now: amqp-ca-file '{other_ca}' and the system's CA certificates)"),
    );
    // verify-ca refuses it just the same: the chain is what is wrong.
    let verify_ca = pg_url(
        &pg,
        "localhost",
        "postgres",
        &format!("sslmode=verify-ca&sslrootcert={other_ca}"),
    );
    let out = check(&env, &verify_ca, NODE_AMQP, &[]).await;
    assert_check_says(&out, "FAIL", "database", "is not signed by a trusted CA");

    let launch = launch_trusting(&db_url, &amqp_url, &other_ca);
    let line = run_is_refused(
        &env,
        &launch,
        "certificate is not signed by a trusted CA: set sslrootcert",
    )
    .await;
    eprintln!("run logs: {line}");

    // The database right, the broker's CA wrong: `run` says so in the same words.
    let right_db = pg_url_verified(&pg, "localhost", "postgres", &pki.path("ca.pem"));
    let launch = launch_trusting(&right_db, &amqp_url, &other_ca);
    let line = run_is_refused(
        &env,
        &launch,
        "the broker's certificate is not signed by a trusted CA: set amqp-ca-file",
    )
    .await;
    eprintln!("run logs: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_for_another_host_is_refused_naming_the_host() {
    const TEST: &str = "a_server_certificate_for_another_host_is_refused_naming_the_host";
    let Some((pki, _node)) = pki_and_node_or_skip(TEST) else {
        return;
    };
    // Signed by the trusted CA, but for wrong-host.invalid.
    let pg = tls_postgres(&pki, "wrong-host", None);
    let env = TestEnv::new_on_database("tls_wrong_host", &pg.url()).await;
    let ca = pki.path("ca.pem");
    let db_url = pg_url_verified(&pg, "localhost", "postgres", &ca);
    let amqp_url = TlsNode::amqps(PORT_TLS_WRONG_HOST, "127.0.0.1");

    let out = check(&env, &db_url, &amqp_url, &["--amqp-ca-file", &ca]).await;
    assert_check_refuses(
        &out,
        "the database server's certificate is not valid for host name 'localhost' (it is for wrong-host.invalid): connect with a host name the certificate lists, or use sslmode=verify-ca to check the chain only",
        "the broker's certificate is not valid for host name '127.0.0.1'",
    );

    // libpq's meanings: verify-ca checks the chain only, require nothing.
    for params in [
        format!("sslmode=verify-ca&sslrootcert={ca}"),
        format!("sslmode=require&sslrootcert={ca}"),
        "sslmode=require".to_string(),
    ] {
        let url = pg_url(&pg, "localhost", "postgres", &params);
        let out = check(&env, &url, NODE_AMQP, &[]).await;
        assert_eq!(out.code(), Some(0), "{params}: {}", out.describe());
    }

    let launch = Launch::new().db_url(&db_url);
    run_is_refused(&env, &launch, "is not valid for host name 'localhost'").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_text_only_server_is_refused_when_tls_is_required() {
    const TEST: &str = "a_plain_text_only_server_is_refused_when_tls_is_required";
    let Some((pki, _node)) = pki_and_node_or_skip(TEST) else {
        return;
    };
    let pg = PrivatePostgres::start(); // ssl=off
    let env = TestEnv::new_on_database("tls_plain_only", &pg.url()).await;
    let ca = pki.path("ca.pem");
    // amqps:// to the node's plain-text port.
    let amqp_url = "amqps://guest:guest@127.0.0.1:5690/%2f";

    for params in [
        "sslmode=require".to_string(),
        format!("sslmode=verify-full&sslrootcert={ca}"),
    ] {
        let db_url = pg_url(&pg, "127.0.0.1", "postgres", &params);
        let out = check(&env, &db_url, amqp_url, &["--amqp-ca-file", &ca]).await;
        assert_check_refuses(
            &out,
            "server does not support TLS",
            "the server at '127.0.0.1' does not speak TLS on this port (it answered in plain text)",
        );
    }
    let db_url = pg_url(&pg, "127.0.0.1", "postgres", "sslmode=require");
    run_is_refused(
        &env,
        &Launch::new().db_url(&db_url),
        "server does not support TLS",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_prefer_falls_back_to_plain_text_and_encrypts_when_offered() {
    const TEST: &str = "sslmode_prefer_falls_back_to_plain_text_and_encrypts_when_offered";
    let Some(pki) = pki_or_skip(TEST) else { return };
    // Plain-text-only server: prefer works unencrypted.
    let plain = PrivatePostgres::start();
    let env = TestEnv::new_on_database("tls_prefer_plain", &plain.url()).await;
    let queue = env.declare_queue("prefer").await;
    let collector = env.consume(&queue, AckMode::Manual).await;
    let db_url = pg_url(&plain, "127.0.0.1", "postgres", "sslmode=prefer");
    let out = check(&env, &db_url, &env.amqp_url, &[]).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let relay = relay_delivers(&env, &Launch::new().db_url(&db_url), &queue, &collector, 10).await;
    let (encrypted, unencrypted) = relay_sessions_ssl(&env).await;
    assert!(
        encrypted == 0 && unencrypted >= 1,
        "prefer on a plain-only server: {encrypted} encrypted, {unencrypted} plain sessions"
    );
    drop(relay);
    drop(collector);
    drop(env);

    // A server that offers TLS: prefer encrypts (without verifying).
    let tls = tls_postgres(&pki, "wrong-host", None);
    let env = TestEnv::new_on_database("tls_prefer_tls", &tls.url()).await;
    let queue = env.declare_queue("prefer").await;
    let collector = env.consume(&queue, AckMode::Manual).await;
    let db_url = pg_url(&tls, "127.0.0.1", "postgres", "sslmode=prefer");
    let _relay = relay_delivers(&env, &Launch::new().db_url(&db_url), &queue, &collector, 10).await;
    let (encrypted, unencrypted) = relay_sessions_ssl(&env).await;
    assert!(
        encrypted >= 1 && unencrypted == 0,
        "prefer on a TLS server: {encrypted} encrypted, {unencrypted} plain sessions"
    );
}

// ---------------------------------------------------------------------------
// Client certificates
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_log_in_to_postgresql_and_rabbitmq() {
    const TEST: &str = "client_certificates_log_in_to_postgresql_and_rabbitmq";
    let Some((pki, node)) = pki_and_node_or_skip(TEST) else {
        return;
    };
    // Role outbox_relay may log in over TCP only with a certificate whose CN is its name.
    let pg = tls_postgres(&pki, "server", Some("outbox_relay"));
    let env = TestEnv::new_on_database("tls_client_cert", &pg.url()).await;
    let ca = pki.path("ca.pem");
    let with_cert = |cert: &str| {
        pg_url(
            &pg,
            "localhost",
            "outbox_relay",
            &format!(
                "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
                pki.path(&format!("{cert}.pem")),
                pki.path(&format!("{cert}.key"))
            ),
        )
    };
    let db_url = with_cert("client");
    let amqp_url = TlsNode::amqps(PORT_TLS_PEER_REQUIRED, "localhost");
    let client_flags = [
        "--amqp-ca-file",
        ca.as_str(),
        "--amqp-cert-file",
        &pki.path("client.pem"),
        "--amqp-key-file",
        &pki.path("client.key"),
    ]
    .map(str::to_string);
    let client_flags: Vec<&str> = client_flags.iter().map(String::as_str).collect();

    let out = check(&env, &db_url, &amqp_url, &client_flags).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_check_says(&out, "ok", "database", "as role 'outbox_relay'");
    assert_check_says(&out, "ok", "broker", "client certificate presented");

    // Without a certificate, or with one from a CA the servers do not trust: refused.
    let no_cert = pg_url_verified(&pg, "localhost", "outbox_relay", &ca);
    let out = check(&env, &no_cert, &amqp_url, &["--amqp-ca-file", &ca]).await;
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert_check_says(&out, "FAIL", "database", "certificate");
    // TLS 1.3: the broker's alert, or a reset that came before it was read.
    let line = check_line(&out, "FAIL", "broker").unwrap_or_default();
    let reset = "the broker reset the connection during the handshake (a broker that requires a client certificate may do so instead of sending its alert): set amqp-cert-file and amqp-key-file if it requires one";
    assert!(
        line.ends_with(
            "the broker requires a client certificate: set amqp-cert-file and amqp-key-file",
        ) || line.ends_with(reset),
        "{}",
        out.describe()
    );
    let out = check(
        &env,
        &with_cert("other-client"),
        &TlsNode::amqps(PORT_TLS, "localhost"),
        &[
            "--amqp-ca-file",
            &ca,
            "--amqp-cert-file",
            &pki.path("other-client.pem"),
            "--amqp-key-file",
            &pki.path("other-client.key"),
        ],
    )
    .await;
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    // TLS 1.3: the server's alert, or a reset that came before it was read.
    let line = check_line(&out, "FAIL", "database").unwrap_or_default();
    assert!(
        line.contains("received fatal alert: UnknownCA")
            || line.contains("Connection reset by peer"),
        "{}",
        out.describe()
    );
    let line = check_line(&out, "FAIL", "broker").unwrap_or_default();
    assert!(
        line.contains("the broker refused the client certificate (TLS alert UnknownCA)")
            || line.contains("the broker reset the connection during the handshake (a broker that refuses a client certificate may do so instead of sending its alert): check that amqp-cert-file"),
        "{}",
        out.describe()
    );

    // End to end with client certificates on both sides.
    let (_conn, queue, collector) = node_queue(&env).await;
    let launch = Launch::new()
        .db_url(&db_url)
        .amqp_url(&amqp_url)
        .args(&client_flags);
    let _relay = relay_delivers(&env, &launch, &queue, &collector, 20).await;
    let seen = node.connections();
    assert!(
        seen.lines().any(|l| l.contains(&PORT_TLS_PEER_REQUIRED.to_string())
            && l.contains("CN=outbox_relay")
            && l.contains("CN=outbox-relay test CA")),
        "the broker saw no connection with the client certificate on {PORT_TLS_PEER_REQUIRED}:\n{seen}"
    );
}

// ---------------------------------------------------------------------------
// check's warnings
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_about_connections_that_are_not_verified() {
    let env = TestEnv::new("tls_check_warnings").await;
    // Loopback, as the tests run: nothing leaves the machine, no warning.
    let out = check(&env, &env.db_url, &env.amqp_url, &[]).await;
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(!out.stdout.contains("warn "), "{}", out.describe());

    // Hosts off this machine (.invalid never resolves: the warnings are
    // about the settings, whatever the connection does).
    let out = check(
        &env,
        "postgres://relay@db.invalid:5432/app?sslmode=require",
        "amqp://relay:s3cret@rabbit.invalid:5672/%2f",
        &[],
    )
    .await;
    assert_check_says(
        &out,
        "warn",
        "database",
        "sslmode=require: the connection to db.invalid is encrypted but the server is not verified (anyone on the path can pose as it): use sslmode=verify-full with sslrootcert=<CA file> in the database URL",
    );
    assert_check_says(
        &out,
        "warn",
        "broker",
        "amqp://relay:***@rabbit.invalid:5672/%2f is plain amqp:// to rabbit.invalid: neither encrypted nor verified: use amqps://",
    );
    let warned_brokers = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("warn") && l.contains("plain amqp://"))
        .count();
    assert_eq!(warned_brokers, 1, "{}", out.describe());
    assert!(!out.stdout.contains("s3cret"), "{}", out.describe());
    // One amqp-url may not mix amqp:// and amqps:// (refused at start), so
    // amqps:// is checked on its own.
    let out = check(
        &env,
        &env.db_url,
        "amqps://relay:s3cret@rabbit2.invalid/%2f",
        &[],
    )
    .await;
    assert!(
        !out.stdout.contains("plain amqp://"),
        "amqps:// needs no warning\n{}",
        out.describe()
    );

    for (url, says) in [
        (
            "postgres://relay@db.invalid/app",
            "sslmode=prefer (the default): the connection to db.invalid is encrypted only if the server offers TLS, and the server is never verified",
        ),
        (
            "postgres://relay@db.invalid/app?sslmode=disable",
            "sslmode=disable: the connection to db.invalid is neither encrypted nor verified",
        ),
    ] {
        let out = check(&env, url, &env.amqp_url, &[]).await;
        assert_check_says(&out, "warn", "database", says);
    }
    let out = check(
        &env,
        "postgres://relay@db.invalid/app?sslmode=verify-full",
        &env.amqp_url,
        &[],
    )
    .await;
    assert!(
        check_line(&out, "warn", "database").is_none(),
        "verify-full needs no warning\n{}",
        out.describe()
    );
}
