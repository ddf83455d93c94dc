//! What a hostile or broken peer can cost the relay (README: "Security
//! guarantees"): slow HTTP clients, silent database and broker nodes, a log
//! level that would print a secret. Each costs a bounded amount of time and
//! no descriptor, thread or secret.

// Tests time real processes and services: the real clock is what they need.
#![allow(clippy::disallowed_types)]

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{wait_until, Relay, TestEnv, SETUP_TIMEOUT};

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
    let mut relay = Relay::start(&env, &["--shutdown-timeout", "1s"]).await;
    relay.wait_ready(SETUP_TIMEOUT).await;
    let addr = relay.metrics_addr();
    let baseline = open_fds(relay.pid);

    let slow = tokio::task::spawn_blocking(move || slow_clients(addr, 400))
        .await
        .unwrap();
    assert!(slow.len() >= 300, "only {} slow clients connected", slow.len());
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
