//! The control connection: LISTEN for new rows, the heartbeat that renews
//! leases and doubles as the fallback poll, and due-time timers. Kept apart
//! from the hot path and from housekeeping, so nothing slow delays a renewal.

use std::{sync::Arc, time::Duration};

use tokio::{sync::watch, time::Instant};

use crate::{
    backoff,
    config::RelayConfig,
    leases::{LeaseState, HANDOFF_AFTER, LEASE_TTL, RENEW_EVERY},
    metrics::{Metrics, Peer},
    store::{self, Control, Session, SharedFloor},
    wakeup::Wakeup,
};

/// Why a control session ended; the task reconnects after each.
#[derive(Debug, thiserror::Error)]
enum ControlError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Schema(#[from] store::MigrateError),
    #[error("the control connection closed")]
    Closed,
}

pub struct ControlTask {
    pub cfg: RelayConfig,
    pub metrics: Arc<Metrics>,
    pub leases: watch::Sender<LeaseState>,
    pub wakeup: Arc<Wakeup>,
    pub stop: watch::Receiver<bool>,
    /// Where /metrics is served (as bound), recorded with each heartbeat.
    pub metrics_addr: std::net::SocketAddr,
    /// Whether the relay has a RabbitMQ connection it can publish on.
    pub can_publish: watch::Receiver<bool>,
    /// The relay loop's claim floor: the heartbeat looks for due rows from it
    /// (below it is the housekeeping connection's sweep).
    pub floor: Arc<SharedFloor>,
}

/// Whether this relay takes and renews partition leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stance {
    /// It can publish (or lost the broker less than HANDOFF_AFTER ago).
    Taking,
    /// It cannot publish: it holds no lease and sends no heartbeat (which
    /// would take partitions) until it can again.
    HandedOff,
}

impl ControlTask {
    pub async fn run(mut self) {
        let mut delays = None;
        while !*self.stop.borrow() {
            let started = Instant::now();
            match self.session().await {
                Ok(()) => return,
                Err(e) => {
                    // Unrenewed, the leases lapse: from now on the relay holds none.
                    self.leases.send_replace(LeaseState::default());
                    self.metrics.partitions_owned.set(0);
                    // A session that lasted a while earned a fresh, short backoff.
                    if started.elapsed() > LEASE_TTL {
                        delays = None;
                    }
                    let delay = backoff::next_delay(&mut delays);
                    tracing::warn!(error = %e, retry_in = ?delay, "control connection failed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.stop.changed() => {}
                    }
                }
            }
        }
    }

    /// One connection's life. Ok(()) when asked to stop.
    async fn session(&mut self) -> Result<(), ControlError> {
        let wakeup = self.wakeup.clone();
        let connected = Session::connect_notified(
            &self.cfg.conn.database_url,
            "outbox-relay control",
            move || wakeup.wake(),
        )
        .await;
        self.metrics
            .connection_attempt(Peer::Database, connected.is_ok());
        let session = connected?;
        let mut closed = session.closed();
        self.converse(&session, &mut closed).await
    }

    async fn converse(
        &mut self,
        session: &Session,
        closed: &mut watch::Receiver<bool>,
    ) -> Result<(), ControlError> {
        let schema = self.cfg.conn.schema.clone();
        session.verify_schema(&schema).await?;
        let statements = Control::prepare(session, &schema).await?;
        if self.cfg.listen {
            session.listen(&schema).await?;
        }
        // Anything inserted while we were away gets no notification: poll once.
        self.wakeup.wake();
        let tick = self.cfg.poll_interval.min(RENEW_EVERY);
        let metrics_addr = self.metrics_addr.to_string();
        let mut broker_lost_at = None;
        loop {
            let stance = self.stance(&mut broker_lost_at);
            self.metrics
                .partitions_handed_off
                .set(i64::from(stance == Stance::HandedOff));
            if stance == Stance::HandedOff {
                self.hand_off(session, &statements, closed).await?;
                if *self.stop.borrow() {
                    return Ok(());
                }
                continue;
            }
            let started = Instant::now();
            let (floor_partitions, from) = self.floor.get();
            let beat = statements
                .heartbeat(
                    session,
                    &self.cfg.instance_id,
                    LEASE_TTL,
                    &metrics_addr,
                    (&floor_partitions, from),
                )
                .await?;
            self.metrics.heartbeat_answered();
            if beat.first_due.is_some() {
                self.wakeup.wake();
            }
            self.metrics
                .partitions_owned
                .set(beat.partitions.len() as i64);
            let lease = LeaseState::renewed(beat.partitions, started);
            // Renewals only move the deadline; the relay is woken for new partitions.
            let partitions_changed = self.leases.send_if_modified(|current| {
                let changed = current.partitions != lease.partitions;
                *current = lease;
                changed
            });
            if partitions_changed {
                tracing::info!(partitions = ?self.leases.borrow().partitions, "partition leases changed");
                self.wakeup.wake();
            }
            let mut sleep_for = tick.saturating_sub(started.elapsed());
            // The database clamps it to +-1e9 s; a value Duration refuses is "now".
            let due_in = beat
                .next_due_in
                .map(|d| Duration::try_from_secs_f64(d).unwrap_or(Duration::ZERO));
            match due_in {
                Some(Duration::ZERO) => self.wakeup.wake(),
                Some(due) => sleep_for = sleep_for.min(due),
                None => {}
            }

            tokio::select! {
                _ = tokio::time::sleep(sleep_for) => {}
                _ = self.stop.changed() => return Ok(()),
                _ = closed.changed() => return Err(ControlError::Closed),
                _ = publishing_changed(&mut self.can_publish) => continue,
            }
            // A timer for a due row fired: wake the relay for it.
            if due_in.is_some_and(|d| !d.is_zero() && d <= sleep_for) {
                self.wakeup.wake();
            }
        }
    }
}

impl ControlTask {
    /// Takes partitions while the relay can publish; after HANDOFF_AFTER
    /// without a broker connection (at once if it holds nothing, as at start)
    /// it hands them off.
    fn stance(&mut self, broker_lost_at: &mut Option<Instant>) -> Stance {
        if *self.can_publish.borrow_and_update() {
            *broker_lost_at = None;
            return Stance::Taking;
        }
        let lost_at = *broker_lost_at.get_or_insert_with(Instant::now);
        if self.leases.borrow().partitions.is_empty() || lost_at.elapsed() >= HANDOFF_AFTER {
            Stance::HandedOff
        } else {
            Stance::Taking
        }
    }

    /// Gives every partition up and waits, sending no heartbeat, until the
    /// relay can publish again (or stop, or the connection closes).
    async fn hand_off(
        &mut self,
        session: &Session,
        statements: &Control,
        closed: &mut watch::Receiver<bool>,
    ) -> Result<(), ControlError> {
        let held = self.leases.send_replace(LeaseState::default());
        self.metrics.partitions_owned.set(0);
        if !held.partitions.is_empty() {
            tracing::warn!(partitions = ?held.partitions, after = ?HANDOFF_AFTER,
                "cannot publish (no RabbitMQ connection): handing partitions to relays that can");
            self.wakeup.wake();
        }
        // The relay may still publish on the old lease until its fencing
        // deadline (a connection that just came back): the leases are freed
        // only after it, so a successor never overlaps with us.
        let fenced = held.valid_until.filter(|t| *t > Instant::now());
        let mut released = false;
        let result = loop {
            if *self.can_publish.borrow_and_update() {
                break Ok(());
            }
            if !released && fenced.is_none_or(|t| Instant::now() >= t) {
                // Also takes this relay out of the live count, so the others'
                // fair share is every partition.
                statements.release(session, &self.cfg.instance_id).await?;
                released = true;
                if !held.partitions.is_empty() {
                    tracing::info!("partition leases released");
                }
            }
            let until_fenced =
                fenced.map_or(LEASE_TTL, |t| t.saturating_duration_since(Instant::now()));
            tokio::select! {
                _ = tokio::time::sleep(until_fenced), if !released => {}
                _ = publishing_changed(&mut self.can_publish) => {}
                _ = self.stop.changed() => break Ok(()),
                _ = closed.changed() => break Err(ControlError::Closed),
            }
        };
        if result.is_ok() && !*self.stop.borrow() {
            tracing::info!("connected to RabbitMQ: taking partitions");
        }
        result
    }
}

/// Resolves when the relay's ability to publish changes (never once the relay is gone).
async fn publishing_changed(can_publish: &mut watch::Receiver<bool>) {
    if can_publish.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Hands this instance's leases back so successors need not wait for the ttl.
pub async fn release_leases(cfg: &RelayConfig) -> Result<(), store::StoreError> {
    let session = Session::connect(&cfg.conn.database_url, "outbox-relay release").await?;
    let statements = Control::prepare(&session, &cfg.conn.schema).await?;
    statements.release(&session, &cfg.instance_id).await
}
