//! A TCP proxy between the relay and one shared service (RabbitMQ or
//! PostgreSQL), to fake an outage of that service for one relay without
//! touching the service other tests use.
//!
//! It listens on 127.0.0.1:0 and forwards every connection to the upstream
//! address. A test can drop every open connection (with a TCP reset, as when a
//! broker or database dies), refuse new ones for a while (accepted and reset at
//! once: the client sees its connection fail), stall traffic (bytes are
//! neither read nor written, connections stay open: a hung peer or a network
//! partition), or blackhole only the connections open now (they hang for
//! good, new ones work: a half-dead connection the client must give up on).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct FaultProxy {
    pub addr: SocketAddr,
    pub upstream: SocketAddr,
    refuse: watch::Sender<bool>,
    stall: watch::Sender<bool>,
    /// Connections numbered below this hang for good.
    blackhole: watch::Sender<u64>,
    next_conn: Arc<AtomicU64>,
    /// Bumped by `drop_all`: every connection opened before it is reset.
    cut: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts forwarding 127.0.0.1:<random port> to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().unwrap();
        let (refuse, refuse_rx) = watch::channel(false);
        let (stall, stall_rx) = watch::channel(false);
        let (cut, cut_rx) = watch::channel(0u64);
        let (blackhole, blackhole_rx) = watch::channel(0u64);
        let next_conn = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let (acc, rej, next) = (accepted.clone(), refused.clone(), next_conn.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if *refuse_rx.borrow() {
                    rej.fetch_add(1, Ordering::Relaxed);
                    reset(client);
                    continue;
                }
                acc.fetch_add(1, Ordering::Relaxed);
                let generation = *cut_rx.borrow();
                let gate = Gate {
                    stall: stall_rx.clone(),
                    blackhole: blackhole_rx.clone(),
                    conn: next.fetch_add(1, Ordering::SeqCst),
                };
                tokio::spawn(forward(client, upstream, gate, cut_rx.clone(), generation));
            }
        });
        FaultProxy {
            addr,
            upstream,
            refuse,
            stall,
            blackhole,
            next_conn,
            cut,
            accepted,
            refused,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Resets every open connection (new ones are still accepted unless refused).
    pub fn drop_all(&self) {
        self.cut.send_modify(|g| *g += 1);
    }

    /// While true, new connections are accepted and reset at once.
    pub fn refuse(&self, on: bool) {
        self.refuse.send_replace(on);
    }

    /// While true, no byte moves in either direction on any connection.
    pub fn stall(&self, on: bool) {
        self.stall.send_replace(on);
    }

    /// Every connection open now hangs for good (no byte moves, nothing is
    /// closed); connections opened later work.
    pub fn blackhole_existing(&self) {
        self.blackhole
            .send_replace(self.next_conn.load(Ordering::SeqCst));
    }

    /// The outage in one call: reset everything and refuse new connections.
    pub fn go_down(&self) {
        self.refuse(true);
        self.drop_all();
    }

    pub fn come_back(&self) {
        self.refuse(false);
        self.stall(false);
    }

    /// Connections forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections reset at once because the proxy was refusing.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        // Open connections end too: their tasks see the cut.
        self.cut.send_modify(|g| *g += 1);
    }
}

/// Closes with RST instead of FIN: what a peer that died looks like.
// SO_LINGER 0 does not block on drop (it discards instead of flushing).
#[allow(deprecated)]
fn reset(stream: TcpStream) {
    let _ = stream.set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

/// When bytes may move on one connection.
#[derive(Clone)]
struct Gate {
    stall: watch::Receiver<bool>,
    blackhole: watch::Receiver<u64>,
    conn: u64,
}

impl Gate {
    /// Returns once traffic may flow (at once when it may); false if the proxy is gone.
    async fn open(&mut self) -> bool {
        loop {
            let stalled = *self.stall.borrow_and_update();
            let holed = self.conn < *self.blackhole.borrow_and_update();
            if !stalled && !holed {
                return true;
            }
            let changed = tokio::select! {
                r = self.stall.changed() => r.is_ok(),
                r = self.blackhole.changed() => r.is_ok(),
            };
            if !changed {
                return false;
            }
        }
    }
}

async fn forward(
    mut client: TcpStream,
    upstream: SocketAddr,
    gate: Gate,
    mut cut: watch::Receiver<u64>,
    generation: u64,
) {
    let _ = client.set_nodelay(true);
    let connect = async {
        // A stalled network does not complete handshakes either.
        let mut g = gate.clone();
        g.open().await;
        TcpStream::connect(upstream).await
    };
    let mut server = tokio::select! {
        r = connect => match r {
            Ok(s) => s,
            Err(_) => return reset(client),
        },
        _ = cut.wait_for(|g| *g != generation) => return reset(client),
    };
    let _ = server.set_nodelay(true);
    let done = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let up = pump(&mut cr, &mut sw, gate.clone());
        let down = pump(&mut sr, &mut cw, gate);
        tokio::select! {
            _ = async { tokio::join!(up, down) } => true,
            _ = cut.wait_for(|g| *g != generation) => false,
        }
    };
    if done {
        return;
    }
    reset(client);
    reset(server);
}

/// Copies one direction until EOF or an error, holding still while the gate is shut.
async fn pump<R, W>(from: &mut R, to: &mut W, mut gate: Gate)
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !gate.open().await {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        // Bytes read just before the gate shut are held back too.
        if !gate.open().await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
