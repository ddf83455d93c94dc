//! Lease fencing at the last step before the wire.
//!
//! The relay checks its partition lease before it hands a publish to lapin, but
//! a process paused between that check and the socket write (SIGSTOP, a long
//! GC-like stall, a frozen VM) would put the message on the wire after the
//! lease lapsed and a successor took the partition over. AMQP has no fencing
//! token the broker could check, so the check is repeated where the bytes
//! leave: every AMQP connection's socket is wrapped, and while publishes are
//! being handed over (armed until lapin reports them written) a write past
//! their lease deadline fails. The connection then breaks, every unconfirmed
//! row stays pending, and the new lease holder publishes it.
//!
//! The same socket wrapper ends an abandoned connection attempt: lapin runs
//! each connection on its own I/O thread, which would wait for a silent peer
//! forever after the relay gave up on the handshake. [`WriteFence::abandon`]
//! makes the socket fail (waking a read that waits), so that thread ends and
//! the descriptor is closed.
//!
//! The fence reads the real clock (std's `Instant`): the socket is written on
//! lapin's I/O thread, outside tokio's (pausable) clock, and a paused process
//! must see the time that passed while it was stopped.
#![allow(clippy::disallowed_types)]

use std::{
    fmt, io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use async_rs::{traits::Reactor, Tokio};
use futures_util::{
    io::{AsyncRead, AsyncWrite},
    Stream,
};

/// Shared between the relay (which arms it) and the socket (which obeys it).
pub struct WriteFence {
    base: Instant,
    /// Nanoseconds after `base` from which writes fail, plus one; 0 = open.
    deadline: AtomicU64,
    /// HANDSHAKING, ESTABLISHED or ABANDONED.
    attempt: AtomicU8,
    /// While handshaking: the waker of a read that waits for the peer.
    reader: Mutex<Option<Waker>>,
    /// Tells a TCP connect or TLS handshake in progress to give up.
    abandoned: tokio::sync::watch::Sender<bool>,
}

const HANDSHAKING: u8 = 0;
const ESTABLISHED: u8 = 1;
const ABANDONED: u8 = 2;

impl fmt::Debug for WriteFence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteFence")
            .field("armed", &(self.deadline.load(Ordering::Relaxed) != 0))
            .finish()
    }
}

impl Default for WriteFence {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            deadline: AtomicU64::new(0),
            attempt: AtomicU8::new(HANDSHAKING),
            reader: Mutex::new(None),
            abandoned: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl WriteFence {
    /// From now on, writes after `until` fail (until `open` is called).
    pub fn arm(&self, until: Instant) {
        let nanos = until.saturating_duration_since(self.base).as_nanos();
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX - 1);
        self.deadline.store(nanos + 1, Ordering::SeqCst);
    }

    /// The armed publishes are written: writes are free again.
    pub fn open(&self) {
        self.deadline.store(0, Ordering::SeqCst);
    }

    /// The handshake completed: the socket is the connection's from now on.
    pub fn established(&self) {
        let _ = self.attempt.compare_exchange(
            HANDSHAKING,
            ESTABLISHED,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        self.take_reader();
    }

    /// The connection attempt was given up before it completed: the socket
    /// fails from now on, a read waiting for the peer is woken to see it, and
    /// a TCP connect or TLS handshake in progress ends.
    pub fn abandon(&self) {
        if self
            .attempt
            .compare_exchange(HANDSHAKING, ABANDONED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.abandoned.send_replace(true);
            if let Some(waker) = self.take_reader() {
                waker.wake();
            }
        }
    }

    /// Resolves once the attempt is abandoned (never after it was established).
    pub async fn wait_abandoned(&self) {
        let mut abandoned = self.abandoned.subscribe();
        let _ = abandoned.wait_for(|a| *a).await;
    }

    fn take_reader(&self) -> Option<Waker> {
        self.reader.lock().map(|mut w| w.take()).unwrap_or(None)
    }

    fn check_abandoned(&self) -> io::Result<()> {
        if self.attempt.load(Ordering::SeqCst) == ABANDONED {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the connection attempt was abandoned at its handshake deadline",
            ));
        }
        Ok(())
    }

    fn check(&self) -> io::Result<()> {
        self.check_abandoned()?;
        let deadline = self.deadline.load(Ordering::SeqCst);
        if deadline == 0 {
            return Ok(());
        }
        let now = self.base.elapsed().as_nanos();
        if now + 1 >= u128::from(deadline) {
            let late = Duration::from_nanos(
                u64::try_from(now + 1 - u128::from(deadline)).unwrap_or(u64::MAX),
            );
            return Err(io::Error::other(format!(
                "a publish reached the socket {late:?} after its partition lease could have lapsed \
                 (the relay was paused or starved); dropping the connection so the lease's new holder publishes it"
            )));
        }
        Ok(())
    }
}

/// A socket whose writes obey a [`WriteFence`].
pub struct FencedStream<S> {
    inner: S,
    fence: Arc<WriteFence>,
}

impl<S: AsyncRead + Unpin> AsyncRead for FencedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.fence.attempt.load(Ordering::SeqCst) == ESTABLISHED {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        self.fence.check_abandoned()?;
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if read.is_pending() {
            if let Ok(mut reader) = self.fence.reader.lock() {
                *reader = Some(cx.waker().clone());
            }
            // abandon() may have run between the check and storing the waker.
            self.fence.check_abandoned()?;
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FencedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.fence.check()?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.fence.check()?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// lapin's tokio reactor, except that the TCP streams it opens are fenced.
#[derive(Clone, Debug)]
pub struct FencedReactor {
    inner: Tokio,
    fence: Arc<WriteFence>,
}

impl FencedReactor {
    pub fn new(fence: Arc<WriteFence>) -> Self {
        Self {
            inner: Tokio::current(),
            fence,
        }
    }
}

impl Reactor for FencedReactor {
    type TcpStream = FencedStream<<Tokio as Reactor>::TcpStream>;
    type Sleep = <Tokio as Reactor>::Sleep;

    // async-rs bounds this with a private trait that unix defines as AsFd + AsRawFd.
    fn register<H: io::Read + io::Write + AsFd + AsRawFd + Send + 'static>(
        &self,
        socket: H,
    ) -> io::Result<impl AsyncRead + AsyncWrite + Send + Unpin + 'static> {
        self.inner.register(socket)
    }

    fn sleep(&self, dur: Duration) -> Self::Sleep {
        self.inner.sleep(dur)
    }

    fn interval(&self, dur: Duration) -> impl Stream<Item = Instant> + Send + 'static {
        self.inner.interval(dur)
    }

    fn tcp_connect_addr(
        &self,
        addr: SocketAddr,
    ) -> impl std::future::Future<Output = io::Result<Self::TcpStream>> + Send + 'static {
        let fence = self.fence.clone();
        let connect = self.inner.tcp_connect_addr(addr);
        async move {
            let stream = tokio::select! {
                stream = connect => stream?,
                _ = fence.wait_abandoned() => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the connection attempt was abandoned at its handshake deadline",
                    ))
                }
            };
            Ok(FencedStream {
                inner: stream,
                fence,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_fence_lets_every_write_through() {
        let fence = WriteFence::default();
        assert!(fence.check().is_ok());
        fence.arm(Instant::now() - Duration::from_secs(1));
        fence.open();
        assert!(fence.check().is_ok());
    }

    #[test]
    fn an_armed_fence_refuses_writes_only_past_its_deadline() {
        let fence = WriteFence::default();
        fence.arm(Instant::now() + Duration::from_secs(60));
        assert!(fence.check().is_ok());
        fence.arm(Instant::now() - Duration::from_millis(1));
        let err = fence
            .check()
            .expect_err("a write past the lease deadline must fail");
        assert!(err.to_string().contains("lease"), "{err}");
    }

    #[tokio::test]
    async fn an_abandoned_attempt_fails_and_an_established_one_cannot_be_abandoned() {
        let fence = Arc::new(WriteFence::default());
        let waiting = tokio::spawn({
            let fence = fence.clone();
            async move { fence.wait_abandoned().await }
        });
        fence.abandon();
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("a connect in progress hears of the abandon")
            .unwrap();
        let err = fence
            .check()
            .expect_err("an abandoned socket refuses writes");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);

        let fence = WriteFence::default();
        fence.established();
        fence.abandon();
        assert!(
            fence.check().is_ok(),
            "an established connection is not cut"
        );
    }
}
