//! What a hostile or broken peer can cost the relay (README: "Security
//! guarantees"): slow HTTP clients, silent database and broker nodes, a log
//! level that would print a secret. Each costs a bounded amount of time and
//! no descriptor, thread or secret.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use outbox_test_kit::broker_user::BrokerUser;
use outbox_test_kit::proxy::FaultProxy;
use outbox_test_kit::{run_cli, wait_until, ClosedPort, Launch, Relay, TestEnv, SETUP_TIMEOUT};

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Threads of process `pid`.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `count` connections to `addr` that each send half a request header and
/// then wait (slowloris). A connection the server closes at once is kept too.
fn slow_clients(addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    (0..count)
        .filter_map(|_| {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: slow\r\nX-Wait: ");
            Some(s)
        })
        .collect()
}

/// The metrics server's connection cap (src/http.rs MAX_CONNECTIONS) plus
/// the relay's own descriptors, with room for reconnects.
const FD_BOUND_ABOVE_BASELINE: usize = 64 + 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_clients_neither_pile_up_nor_delay_shutdown() {
    let env = TestEnv::new("slow_http").await;
    let mut relay = Launch::new()
        .args(&["--shutdown-timeout", "1s"])
        .start(&env)
        .await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    let addr = relay.metrics_addr();
    let baseline = open_fds(relay.pid);

    let slow = tokio::task::spawn_blocking(move || slow_clients(addr, 400))
        .await
        .unwrap();
    assert!(
        slow.len() >= 300,
        "only {} slow clients connected",
        slow.len()
    );
    let during = open_fds(relay.pid);
    assert!(
        during <= baseline + FD_BOUND_ABOVE_BASELINE,
        "400 slow clients took the relay from {baseline} to {during} open descriptors"
    );

    // The header read timeout closes them; then a normal scrape is served.
    let scraped = wait_until(Duration::from_secs(60), async || {
        matches!(relay.get("/metrics").await, Ok((200, _)))
    })
    .await;
    assert!(
        scraped,
        "/metrics never answered with slow clients around\n{}",
        relay.log_tail(50)
    );
    let freed = wait_until(Duration::from_secs(60), async || {
        open_fds(relay.pid) <= baseline + 4
    })
    .await;
    assert!(
        freed,
        "slow clients' connections were not closed: {} open descriptors, {baseline} at start",
        open_fds(relay.pid)
    );
    drop(slow);

    // Slow clients hold every slot again at SIGTERM: the exit does not wait
    // for them beyond shutdown-timeout (1 s), the lease release (3 s at most)
    // and the metrics server's close grace (1 s).
    let _slow_again = tokio::task::spawn_blocking(move || slow_clients(addr, 400))
        .await
        .unwrap();
    let start = Instant::now();
    let status = relay.terminate(Duration::from_secs(15)).await;
    let took = start.elapsed();
    assert!(status.success(), "relay exited with {status:?}");
    assert!(
        took < Duration::from_secs(8),
        "SIGTERM took {took:?} with slow clients connected"
    );
}

/// A TCP listener that accepts every connection and never says a word (a
/// half-open load balancer, a firewall that holds connections).
async fn silent_peer() -> FaultProxy {
    let proxy = FaultProxy::start(ClosedPort::new().addr()).await;
    proxy.stall(true);
    proxy
}

/// `url` with its host and port replaced by 127.0.0.1:`port`.
fn at_port(url: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (user, host_and_tail) = match rest.rsplit_once('@') {
        Some((user, tail)) => (format!("{user}@"), tail),
        None => (String::new(), rest),
    };
    let end = host_and_tail
        .find(['/', '?'])
        .unwrap_or(host_and_tail.len());
    format!("{scheme}://{user}127.0.0.1:{port}{}", &host_and_tail[end..])
}

/// Waits until `peer` accepted `n` connections; then the relay's threads and
/// descriptors, with the attempt just begun among them.
async fn usage_at_attempt(relay: &mut Relay, peer: &FaultProxy, n: u64) -> (usize, usize) {
    let reached = wait_until(Duration::from_secs(120), async || {
        relay.has_exited() || peer.accepted() >= n
    })
    .await;
    relay.assert_running();
    assert!(
        reached,
        "the relay made {} connection attempts to the silent peer in 120 s, not {n}: an attempt never ended\n{}",
        peer.accepted(),
        relay.log_tail(50)
    );
    (threads(relay.pid), open_fds(relay.pid))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_broker_costs_one_bounded_attempt_and_no_thread_or_descriptor() {
    let env = TestEnv::new("silent_broker").await;
    let peer = silent_peer().await;
    let silent = at_port(&env.amqp_url, peer.port());

    // `check` gives up on the node within the handshake deadline (10 s).
    let start = Instant::now();
    let out = run_cli(
        &[
            "check",
            "--database-url",
            &env.db_url,
            "--schema",
            &env.schema,
            "--amqp-url",
            &silent,
        ],
        &[],
        Duration::from_secs(60),
    )
    .await;
    let took = start.elapsed();
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stdout.contains("did not complete the handshake"),
        "check does not say the broker never completed its handshake\n{}",
        out.describe()
    );
    assert!(took < Duration::from_secs(25), "check took {took:?}");

    // `run` keeps trying; every attempt ends, with its thread and socket.
    let mut relay = Launch::new().amqp_url(&silent).spawn(&env);
    relay.wait_started(SETUP_TIMEOUT).await;
    // From the second abandoned attempt on: the first one starts a helper
    // thread of lapin's runtime glue (with its epoll and event descriptors)
    // that stays for good.
    let (threads_early, fds_early) = usage_at_attempt(&mut relay, &peer, 3).await;
    let (threads_late, fds_late) = usage_at_attempt(&mut relay, &peer, 7).await;
    assert!(
        threads_late <= threads_early + 2 && fds_late <= fds_early + 2,
        "4 abandoned broker handshakes took the relay from {threads_early} to {threads_late} threads \
         and from {fds_early} to {fds_late} descriptors\n{}",
        relay.log_tail(50)
    );
    assert!(
        relay.logs().contains("did not complete the handshake"),
        "the relay's log does not say why the broker is unavailable\n{}",
        relay.log_tail(50)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_database_costs_one_bounded_attempt_and_no_descriptor() {
    let env = TestEnv::new("silent_database").await;
    let peer = silent_peer().await;
    let silent = at_port(&env.db_url, peer.port());

    let start = Instant::now();
    let out = run_cli(
        &[
            "check",
            "--database-url",
            &silent,
            "--schema",
            &env.schema,
            "--amqp-url",
            &env.amqp_url,
        ],
        &[],
        Duration::from_secs(60),
    )
    .await;
    let took = start.elapsed();
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stdout.contains("did not complete the handshake"),
        "check does not say the database never completed its handshake\n{}",
        out.describe()
    );
    assert!(took < Duration::from_secs(25), "check took {took:?}");

    // Three tasks connect to the database (hot path, control, housekeeping):
    // at most three attempts are in flight at any time.
    let mut relay = Launch::new().db_url(&silent).spawn(&env);
    relay.wait_started(SETUP_TIMEOUT).await;
    let (_, fds_early) = usage_at_attempt(&mut relay, &peer, 4).await;
    let (_, fds_late) = usage_at_attempt(&mut relay, &peer, 13).await;
    assert!(
        fds_late <= fds_early + 3,
        "9 abandoned database handshakes took the relay from {fds_early} to {fds_late} descriptors\n{}",
        relay.log_tail(50)
    );
    assert!(
        relay.logs().contains("did not complete the handshake"),
        "the relay's log does not say why the database is unavailable\n{}",
        relay.log_tail(50)
    );
}

/// Standard base64 with padding (how a SASL response is usually shown).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Every form in which `password` of `user` could show up in a log: as
/// written, percent-encoded as in the URL, its random tail alone, and the
/// SASL PLAIN response as decimal bytes and base64.
fn secret_forms(user: &BrokerUser) -> Vec<String> {
    let sasl: Vec<u8> = [b"\0", user.name.as_bytes(), b"\0", user.password.as_bytes()].concat();
    let decimal = |bytes: &[u8]| {
        bytes
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let url = user.url();
    let encoded = url
        .split_once("://")
        .and_then(|(_, rest)| rest.rsplit_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password.to_string())
        .expect("the user's URL holds a password");
    let tail = user
        .password
        .rsplit('?')
        .next()
        .unwrap_or_default()
        .to_string();
    vec![
        user.password.clone(),
        encoded,
        tail,
        decimal(user.password.as_bytes()),
        base64(&sasl),
        base64(user.password.as_bytes()),
    ]
}

fn assert_no_secret_form(text: &str, forms: &[String], what: &str) {
    for form in forms {
        assert!(
            !text.contains(form.as_str()),
            "{what} printed the broker password as {form:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_level_prints_the_broker_password() {
    let test = "no_log_level_prints_the_broker_password";
    let env = TestEnv::new("trace_secrets").await;
    let Some(user) = BrokerUser::publish_only(&env, test, &["amq.default"]) else {
        return;
    };
    let forms = secret_forms(&user);
    let url = user.url();
    assert_eq!(base64(b"\0guest\0guest"), "AGd1ZXN0AGd1ZXN0");

    let mut relay = Launch::new()
        .amqp_url(&url)
        .env("OUTBOX_LOG", "trace")
        .spawn(&env);
    relay.wait_started(SETUP_TIMEOUT).await;
    let connected = wait_until(SETUP_TIMEOUT, async || {
        relay.has_exited() || relay.logs().contains("connected to RabbitMQ")
    })
    .await;
    relay.assert_running();
    assert!(connected, "the relay did not connect as {}", user.name);
    relay.terminate(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert!(
        logs.contains("TRACE"),
        "OUTBOX_LOG=trace printed no trace line: the test would prove nothing"
    );
    assert_no_secret_form(&logs, &forms, "run with OUTBOX_LOG=trace");

    let out = run_cli(
        &[
            "check",
            "--database-url",
            &env.db_url,
            "--schema",
            &env.schema,
            "--amqp-url",
            &url,
        ],
        &[("OUTBOX_LOG", "trace,lapin::io_loop=trace")],
        Duration::from_secs(60),
    )
    .await;
    assert_no_secret_form(
        &format!("{}{}", out.stdout, out.stderr),
        &forms,
        "check with OUTBOX_LOG=trace",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_warns_about_unverified_connections_off_this_machine() {
    let env = TestEnv::new("insecure_warnings").await;
    // TEST-NET-1: off this machine, never answers. Only the start matters.
    let db = "postgres://postgres:pgSecret9@192.0.2.1:5432/test";
    let amqp = "amqp://guest:mqSecret9@192.0.2.1:5672/%2f";
    let mut relay = Launch::new()
        .db_url(db)
        .amqp_url(amqp)
        .args(&["--shutdown-timeout", "1s"])
        .spawn(&env);
    relay.wait_started(SETUP_TIMEOUT).await;
    let expected = [
        "insecure connection setting: sslmode=prefer (the default): the connection to 192.0.2.1 is encrypted only if the server offers TLS, and the server is never verified",
        "insecure connection setting: amqp://guest:***@192.0.2.1:5672/%2f is plain amqp:// to 192.0.2.1: neither encrypted nor verified",
    ];
    let logs = relay.logs();
    for line in expected {
        assert!(
            logs.lines().any(|l| l.contains("WARN") && l.contains(line)),
            "run did not warn: {line}\n{}",
            relay.log_tail(30)
        );
    }
    assert!(!logs.contains("pgSecret9") && !logs.contains("mqSecret9"));
    relay.terminate(Duration::from_secs(60)).await;

    // The chain verified, the host name not: below verify-full, said too.
    let ca = "/etc/ssl/certs/ca-certificates.crt";
    for (params, line) in [
        (
            "sslmode=verify-ca".to_string(),
            "insecure connection setting: sslmode=verify-ca without sslrootcert: the server at 192.0.2.1 may present a certificate from any of the system's CAs, for any host name".to_string(),
        ),
        (
            format!("sslmode=require&sslrootcert={ca}"),
            format!("insecure connection setting: sslmode=verify-ca (or require with sslrootcert): the server at 192.0.2.1 may present any certificate signed by sslrootcert '{ca}', whatever host it names"),
        ),
    ] {
        if params.contains(ca) && !std::path::Path::new(ca).exists() {
            continue;
        }
        let mut relay = Launch::new()
            .db_url(&format!("{db}?{params}"))
            .amqp_url(&env.amqp_url)
            .args(&["--shutdown-timeout", "1s"])
            .spawn(&env);
        relay.wait_started(SETUP_TIMEOUT).await;
        assert!(
            relay
                .logs()
                .lines()
                .any(|l| l.contains("WARN") && l.contains(&line)),
            "run did not warn about {params}: {line}\n{}",
            relay.log_tail(30)
        );
        relay.terminate(Duration::from_secs(60)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_list_survives_any_bytes_a_row_holds() {
    let env = TestEnv::new("hostile_dead_letters").await;
    let table = env.table();
    env.exec(
        &format!(
            "INSERT INTO {table} (exchange, routing_key, partition_key, payload, headers,
                                  attempts, last_error, dead_lettered_at)
             VALUES (E'evil\\x1b[2J', E'rk\\x07', E'key\\x1b]0;owned\\x07',
                     '\\xfffe00c328'::bytea, '{{\"h\": \"\\\\u0000\"}}', 3,
                     E'refused: \\x1b[31mred', now())"
        ),
        &[],
    )
    .await;
    for args in [
        &["dead-letters", "list"][..],
        &["dead-letters", "list", "--json"][..],
    ] {
        let out = env.cli(args, Duration::from_secs(60)).await;
        assert_eq!(out.code(), Some(0), "{args:?}\n{}", out.describe());
        assert!(
            !out.stdout.contains('\u{1b}') && !out.stdout.contains('\u{7}'),
            "{args:?} passed a row's terminal escapes through\n{}",
            out.describe()
        );
        assert!(!out.stderr.contains("panicked"), "{}", out.describe());
    }
}

/// Sends `request` to `addr` (stopping at the first write the server refuses)
/// and reads the answer until the server closes: the answer's status, if one
/// came, and how long the connection lasted.
fn send_raw(addr: SocketAddr, request: &[u8]) -> (Option<u16>, Duration) {
    use std::io::Read;
    let start = Instant::now();
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return (None, start.elapsed());
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    for chunk in request.chunks(4096) {
        if stream.write_all(chunk).is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let status = String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        .and_then(|s| s.parse().ok());
    (status, start.elapsed())
}

/// A request header over the metrics server's bounds (16 KiB, 64 fields) is
/// refused as soon as the bound is passed, never buffered whole nor held
/// until the header read timeout; scrapes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_headers_beyond_their_bounds_are_refused_and_scrapes_go_on() {
    let env = TestEnv::new("big_http_header").await;
    let mut relay = Launch::new().start(&env).await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    let addr = relay.metrics_addr();

    // Both within hyper's own defaults (about 400 KiB, 100 fields): only the
    // server's bounds refuse them. One header field of 100 KiB that never
    // ends: refused once 16 KiB are read, not held until the read timeout.
    let mut huge = b"GET /metrics HTTP/1.1\r\nHost: big\r\nX-Big: ".to_vec();
    huge.resize(huge.len() + 100 * 1024, b'a');
    // 80 short fields, 1.5 KiB in all: over the 64 fields a request may have.
    let mut many = b"GET /metrics HTTP/1.1\r\nHost: many\r\n".to_vec();
    for i in 0..80 {
        many.extend_from_slice(format!("X-Field-{i}: {i}\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    for (what, request, refusal) in [
        ("a 100 KiB header field", huge, None),
        ("81 header fields", many, Some(431)),
    ] {
        let (status, took) = tokio::task::spawn_blocking(move || send_raw(addr, &request))
            .await
            .unwrap();
        assert_ne!(status, Some(200), "{what} was served");
        if refusal.is_some() {
            assert_eq!(status, refusal, "{what}: answered {status:?}");
        }
        // Well before the 5 s header read timeout: the bound itself closed it.
        assert!(
            took < Duration::from_secs(4),
            "{what}: the connection lasted {took:?}"
        );
    }
    assert!(
        matches!(relay.get("/metrics").await, Ok((200, _))),
        "/metrics does not answer after oversized requests\n{}",
        relay.log_tail(30)
    );
    relay.assert_running();
    relay.terminate_cleanly(Duration::from_secs(20)).await;
}

/// A panic aborts the relay (so its supervisor restarts it) and prints its
/// message and place: at any log level, neither the database's nor the
/// broker's password. The panic is a failpoint at the first mark, with
/// `OUTBOX_LOG=trace` and passwords on both URLs (the database's trust
/// authentication never asks for it, so the relay runs as usual).
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_at_trace_level_prints_no_password() {
    use outbox_test_kit::{AckMode, NewRow};
    let test = "a_panic_at_trace_level_prints_no_password";
    let (env, queue, collector) = TestEnv::with_events_queue("panic_secrets", AckMode::Auto).await;
    let Some(user) = BrokerUser::publish_only(&env, test, &["amq.default"]) else {
        return;
    };
    let db_password = "pgPanic7Secret";
    let mut db_url = url::Url::parse(&env.db_url).expect("the test database URL parses");
    db_url
        .set_password(Some(db_password))
        .expect("set the database URL's password");
    let mut forms = secret_forms(&user);
    forms.push(db_password.to_string());

    let mut relay = Launch::new()
        .db_url(db_url.as_str())
        .amqp_url(&user.url())
        .env("OUTBOX_LOG", "trace")
        .env("RUST_BACKTRACE", "full")
        .env("FAILPOINTS", "before_mark_published=panic")
        .spawn(&env);
    relay.wait_started(SETUP_TIMEOUT).await;
    let rows = env
        .insert_committed(&[NewRow::to_queue(&queue, "marked by nobody")])
        .await;
    collector.wait_for_rows(&rows).await;
    let died = wait_until(SETUP_TIMEOUT, async || relay.has_exited()).await;
    assert!(
        died,
        "the failpoint did not stop the relay\n{}",
        relay.log_tail(30)
    );
    let logs = relay.logs();
    assert!(
        logs.contains("failpoint before_mark_published panic"),
        "the relay died, but not of the panic\n{}",
        relay.log_tail(30)
    );
    assert!(
        logs.contains("TRACE"),
        "no trace line: the test would prove nothing"
    );
    assert_no_secret_form(&logs, &forms, "a panic with OUTBOX_LOG=trace");
    collector.stop().await;
}

/// A client that keeps its connection busy (a request every 2 s, each within
/// the header read timeout) still loses it after the connection lifetime
/// (30 s, `CONNECTION_LIFETIME`), so no client holds one of the 64 slots for
/// good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_http_connection_is_closed_after_its_lifetime() {
    use std::io::{ErrorKind, Read};
    let env = TestEnv::new("http_lifetime").await;
    let mut relay = Launch::new().start(&env).await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    let addr = relay.metrics_addr();
    let (answered, lasted) = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        // Each read waits up to 2 s: for the answer, then as the pause
        // before the next request. 0 bytes or an error: the server closed.
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("read timeout");
        let mut answered = 0;
        let mut buf = [0u8; 4096];
        'conn: while start.elapsed() < Duration::from_secs(60) {
            if stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: busy\r\n\r\n")
                .is_err()
            {
                break;
            }
            for _ in 0..2 {
                match stream.read(&mut buf) {
                    Ok(0) => break 'conn,
                    Ok(n) => {
                        answered += String::from_utf8_lossy(&buf[..n])
                            .matches("HTTP/1.1 200")
                            .count();
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => break 'conn,
                }
            }
        }
        (answered, start.elapsed())
    })
    .await
    .unwrap();
    assert!(
        answered >= 10,
        "only {answered} answers on the busy connection"
    );
    assert!(
        lasted >= Duration::from_secs(28) && lasted < Duration::from_secs(40),
        "the busy connection lasted {lasted:?}, not its 30 s lifetime"
    );
    relay.assert_running();
    relay.terminate_cleanly(Duration::from_secs(20)).await;
}
