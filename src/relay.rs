//! The driver that joins store and publisher: claim -> publish -> confirm -> mark.
//!
//! It owns the connections, the leases it was handed, wake-ups and backoff,
//! and turns the loop; what is held and owed lives in the I/O-free
//! [`ledger::Ledger`]. Publishes are pipelined: up to `max_in_flight`
//! unconfirmed messages on one confirm-mode channel; rows of one partition key
//! only while they share a route (see `ordering`). Confirms are taken in
//! publish order; acked ids are marked in one statement sent together with
//! the next claim. Nothing is marked before its confirm; anything unconfirmed
//! when a fault hits simply stays pending in the database and is claimed again.

use std::{sync::Arc, time::Duration};

use tokio::{sync::watch, time::Instant};

use crate::{
    backoff::{next_delay, next_statement_delay},
    config::RelayConfig,
    leases::LeaseState,
    metrics::{FailureReason, Metrics, Peer},
    publisher::{Confirm, Publisher},
    store::{ClaimFloor, Store, StoreError},
    wakeup::{IdlePolicy, Next, Wakeup},
};

mod ledger;
mod log_limit;
mod send;

use ledger::{Ledger, Trouble};

/// A confirm that takes longer than this, with the broker not blocking us,
/// means the channel is wedged: drop it and publish again.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// At least this often the relay lets the pipeline drain and claims from the
/// start of the pending index (for rows inside the held window it skipped,
/// e.g. of a partition just leased).
const RESCAN_EVERY: Duration = Duration::from_secs(1);
/// Longest idle wait without a wakeup (the loop's liveness beat for /healthz).
const IDLE_BEAT: Duration = Duration::from_secs(10);
/// After a failed update of the idle flag, the relay waits this long before
/// the next attempt (the heartbeat's poll period: no row waits longer).
const FLAG_RETRY: Duration = Duration::from_secs(1);
/// Payload bytes the relay holds at most in claimed and queued rows (one
/// larger row still goes, alone): memory follows bytes, not row counts.
const PAYLOAD_BUDGET: usize = 8 * 1024 * 1024;

pub struct Relay {
    cfg: RelayConfig,
    metrics: Arc<Metrics>,
    leases: watch::Receiver<LeaseState>,
    wakeup: Arc<Wakeup>,
    stop: watch::Receiver<bool>,
    store: Option<Store>,
    publisher: Option<Publisher>,
    ledger: Ledger<Confirm>,
    idle: IdlePolicy,
    /// The last claim came back full (or a wakeup arrived): claim again at once.
    more: bool,
    /// When the next claim must start from the beginning of the pending index.
    rescan_at: Instant,
    /// Where claims start in the pending index: past the rows already relayed.
    floor: ClaimFloor,
    db_backoff: Option<backon::ExponentialBackoff>,
    amqp_backoff: Option<backon::ExponentialBackoff>,
    /// Grows while statements of the loop keep failing; reset by a claim.
    statement_backoff: Option<backon::ExponentialBackoff>,
    /// Set by a failed statement: the loop waits this long before its next turn.
    statement_pause: Option<Duration>,
    /// Keeps a repeating database error to a few log lines a minute.
    log_limit: log_limit::LogLimit,
    /// The configured node to try next (an index into `cfg.conn.amqp_urls`).
    next_node: usize,
    /// The broker node last written to the relay's row, for `status`
    /// (outer None: nothing written yet).
    noted_node: Option<Option<String>>,
    /// Tells the control task whether a RabbitMQ connection is up: without
    /// one the relay hands its partitions to relays that can publish.
    can_publish: watch::Sender<bool>,
}

impl Relay {
    pub fn new(
        cfg: RelayConfig,
        metrics: Arc<Metrics>,
        leases: watch::Receiver<LeaseState>,
        wakeup: Arc<Wakeup>,
        stop: watch::Receiver<bool>,
        can_publish: watch::Sender<bool>,
    ) -> Self {
        Self {
            can_publish,
            ledger: Ledger::new(metrics.clone()),
            cfg,
            metrics,
            leases,
            wakeup,
            stop,
            store: None,
            publisher: None,
            idle: IdlePolicy::default(),
            more: true,
            rescan_at: Instant::now(),
            floor: ClaimFloor::new(Instant::now()),
            db_backoff: None,
            amqp_backoff: None,
            statement_backoff: None,
            statement_pause: None,
            log_limit: log_limit::LogLimit::default(),
            next_node: 0,
            noted_node: None,
        }
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Runs until stop is signalled and everything in flight is confirmed and marked.
    pub async fn run(mut self) {
        loop {
            self.metrics.beat();
            // A failed statement: never retried in a tight loop.
            if let Some(delay) = self.statement_pause.take() {
                self.pause(delay).await;
            }
            if self.stopping() && self.ledger.in_flight() == 0 {
                if self.flush().await {
                    break;
                }
                // The marks could not be written; the database decides when we stop.
                if !self.ensure_store().await {
                    self.pause(Duration::from_millis(200)).await;
                }
                continue;
            }
            // Both sides every turn: a relay without its database still says
            // truly whether it reaches the broker (and may hand off or take
            // partitions again once the database is back).
            let store_ready = self.ensure_store().await;
            if !self.ensure_publisher().await || !store_ready {
                continue;
            }
            self.collect_ready();
            self.publish_ready().await;
            if self.wakeup.take() {
                self.more = true;
            }
            let blocked = self.publisher.as_ref().is_some_and(Publisher::is_blocked);
            self.metrics.broker_blocked.set(i64::from(blocked));
            let room = self
                .cfg
                .max_in_flight
                .saturating_sub(self.ledger.held_rows());
            let want = self.cfg.batch_size.min(self.cfg.max_in_flight);
            let rescan_waits = !self.ledger.holds_nothing() && Instant::now() >= self.rescan_at;
            if !self.stopping()
                && self.more
                && !blocked
                && !rescan_waits
                && room >= want.div_ceil(2)
                && self.ledger.queued_bytes() < PAYLOAD_BUDGET / 2
            {
                self.claim_and_publish(room.min(self.cfg.batch_size)).await;
            } else if self.ledger.in_flight() > 0 {
                self.await_front(blocked).await;
                if self.ledger.in_flight() == 0 || self.ledger.marks().len() >= self.cfg.batch_size
                {
                    self.flush().await;
                }
            } else {
                self.flush().await;
                self.wait_for_work(blocked).await;
            }
        }
        if let Some(p) = &self.publisher {
            p.close().await;
        }
    }

    // -- waiting ------------------------------------------------------------

    /// Nothing in flight and nothing claimed. Under steady load the relay polls
    /// (its flag says so, and applications' commits carry no NOTIFY); once
    /// polls find nothing for a while it flags itself idle, claims once more
    /// (for rows committed while the flag was changing) and waits.
    async fn wait_for_work(&mut self, blocked: bool) {
        if !self.cfg.listen {
            // Nobody listens: the heartbeat is the poll, notifications are waste.
            if self.idle.flagged() != Some(false) {
                self.flag_idle(false).await;
            }
            self.idle().await;
            return;
        }
        let next = if blocked || self.stopping() {
            Next::Wait
        } else {
            self.idle.nothing_to_do()
        };
        match next {
            Next::Wait => {
                let started = Instant::now();
                self.idle().await;
                self.idle.woken(started.elapsed());
            }
            Next::PollAfter(gap) => {
                let wake = self.wakeup.clone();
                tokio::select! {
                    _ = tokio::time::sleep(gap) => {}
                    _ = wake.notified() => {}
                    _ = self.stop.changed() => {}
                }
                self.more = true;
            }
            Next::FlagIdle => {
                self.flag_idle(true).await;
                self.more = true;
            }
        }
    }

    /// Waits for a wakeup (NOTIFY, or the control task's heartbeat finding due
    /// rows: that heartbeat is the poll), a lease change or stop. A timeout only
    /// turns the loop once, to keep /healthz fed.
    async fn idle(&mut self) {
        let wake = self.wakeup.clone();
        let store_closed = self.store.as_ref().map(Store::closed);
        tokio::select! {
            _ = wake.notified() => {}
            // Readiness must drop when the database goes, even while idle.
            _ = async { match store_closed { Some(c) => c.await, None => std::future::pending().await } } => {}
            // Only feeds /healthz: the heartbeat is the poll, so no claim here.
            _ = tokio::time::sleep(IDLE_BEAT) => return,
            _ = self.stop.changed() => {}
            // Leases moved: this relay may have been away past its ttl (frozen,
            // cut off) and its row removed and made anew, not waiting. Say
            // again whether it waits.
            _ = self.leases.changed() => self.idle.forget(),
        }
        self.more = true;
    }

    /// Tells the database whether this relay waits for notifications. Only
    /// what the database took is recorded: after a failure the flag is
    /// unknown and said again on a later turn, after a pause (the heartbeat
    /// still polls meanwhile, so no row waits for it; the loop never spins).
    async fn flag_idle(&mut self, idle: bool) {
        let Some(store) = &self.store else { return };
        match store.set_idle(&self.cfg.instance_id, idle).await {
            Ok(()) => self.idle.set_flagged(idle),
            Err(e) => {
                self.idle.forget();
                self.database_error(e);
                self.pause(FLAG_RETRY).await;
            }
        }
    }

    async fn pause(&mut self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.stop.changed() => {}
        }
    }

    // -- connections ----------------------------------------------------------

    async fn ensure_store(&mut self) -> bool {
        if self.store.as_ref().is_some_and(|s| !s.is_closed()) {
            return true;
        }
        if self.store.take().is_some() {
            tracing::warn!("lost the database connection; reconnecting");
        }
        self.metrics.database_connected.set(0);
        // Behind a transaction-mode pooler (`listen = false`) nothing may live on
        // a server session; otherwise the hot path prepares its statements once.
        let connected = Store::connect(&self.cfg.conn, self.cfg.listen).await;
        self.metrics
            .connection_attempt(Peer::Database, connected.is_ok());
        match connected {
            Ok(store) => {
                tracing::info!("connected to PostgreSQL");
                self.store = Some(store);
                self.floor.reset();
                self.idle.forget();
                self.metrics.database_connected.set(1);
                self.db_backoff = None;
                self.more = true;
                self.noted_node = None;
                self.note_broker_node().await;
                true
            }
            Err(e) => {
                let delay = next_delay(&mut self.db_backoff);
                tracing::warn!(error = %e, retry_in = ?delay, "database unavailable");
                self.pause(delay).await;
                false
            }
        }
    }

    /// The one place that decides to replace the channel or the connection:
    /// from what the ledger learned of faults and what the connection says.
    async fn ensure_publisher(&mut self) -> bool {
        let noted = self.ledger.take_trouble();
        let trouble = match &self.publisher {
            None => Some(Trouble::Connection),
            Some(p) if !p.is_connected() => Some(Trouble::Connection),
            Some(p) if !p.channel_usable() => noted.max(Some(Trouble::Channel)),
            Some(_) => noted,
        };
        match trouble {
            None => return true,
            Some(Trouble::Channel) => {
                // Nothing unconfirmed on the old channel can be confirmed now.
                self.ledger.reset(FailureReason::ChannelClosed);
                self.more = true;
                if let Some(p) = self.publisher.as_mut() {
                    match p.reopen_channel().await {
                        Ok(()) => return true,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot reopen the publishing channel")
                        }
                    }
                }
            }
            Some(Trouble::Connection) => {}
        }
        if let Some(p) = self.publisher.take() {
            tracing::warn!(
                node = p.node(),
                "lost the RabbitMQ connection; reconnecting"
            );
            // A hung node would hold the polite close for its whole timeout:
            // the next node is tried meanwhile.
            tokio::spawn(async move { p.close().await });
        }
        // Whatever was in flight or waiting on the old connection is pending
        // again, and the key bookkeeping starts over.
        self.ledger.reset(FailureReason::ConnectionLost);
        self.more = true;
        self.metrics.broker_node(None, false);
        self.can_publish
            .send_if_modified(|up| std::mem::replace(up, false));
        // Nodes in the order given, starting after the one just lost; a pause
        // (backoff) only once every node has refused.
        let urls = &self.cfg.conn.amqp_urls;
        let mut last_error = None;
        for _ in 0..urls.len() {
            let url = &urls[self.next_node % urls.len()];
            let node = &self.cfg.conn.amqp_nodes[self.next_node % urls.len()];
            self.next_node = (self.next_node + 1) % urls.len();
            let connected =
                Publisher::connect(url, &self.cfg.conn.amqp_tls, self.cfg.allow_unroutable).await;
            self.metrics
                .connection_attempt(Peer::Broker, connected.is_ok());
            match connected {
                Ok(p) => {
                    tracing::info!(node = p.node(), "connected to RabbitMQ");
                    self.metrics.broker_node(Some(p.node()), true);
                    self.publisher = Some(p);
                    self.can_publish
                        .send_if_modified(|up| !std::mem::replace(up, true));
                    // A hand-off while disconnected removed the relay's row
                    // (idle flag included): say it again when next idle.
                    self.idle.forget();
                    self.amqp_backoff = None;
                    self.note_broker_node().await;
                    return true;
                }
                Err(e) => {
                    if urls.len() > 1 {
                        tracing::warn!(node = %node, error = %e, "RabbitMQ node unavailable; trying the next");
                    }
                    last_error = Some(e);
                }
            }
            // Each node may take its whole connect timeout: the loop still turns.
            self.metrics.beat();
            if self.stopping() {
                break;
            }
        }
        let delay = next_delay(&mut self.amqp_backoff);
        if let Some(e) = last_error {
            tracing::warn!(error = %e, retry_in = ?delay, "broker unavailable");
        }
        self.note_broker_node().await;
        self.pause(delay).await;
        false
    }

    /// Records the connected node in the relay's row (for `status`) when it
    /// changed; retried on the next connect or database reconnect if it fails.
    async fn note_broker_node(&mut self) {
        let node = self.publisher.as_ref().map(|p| p.node().to_string());
        if self.noted_node.as_ref() == Some(&node) {
            return;
        }
        let Some(store) = &self.store else { return };
        match store
            .note_broker_node(&self.cfg.instance_id, node.as_deref())
            .await
        {
            Ok(()) => self.noted_node = Some(node),
            Err(e) => self.database_error(e),
        }
    }

    // -- confirms -------------------------------------------------------------

    /// Takes every confirm that has already arrived, without waiting.
    fn collect_ready(&mut self) {
        use futures_util::FutureExt;
        while let Some(confirm) = self.ledger.front_mut() {
            match confirm.now_or_never() {
                Some(answer) => self.ledger.settle_front(answer),
                None => break,
            }
        }
    }

    /// Waits (bounded) for the oldest in-flight confirm.
    async fn await_front(&mut self, blocked: bool) {
        let Some(confirm) = self.ledger.front_mut() else {
            return;
        };
        match tokio::time::timeout(Duration::from_millis(500), confirm).await {
            Ok(answer) => {
                self.ledger.settle_front(answer);
                self.collect_ready();
            }
            Err(_)
                if !blocked
                    && self
                        .ledger
                        .front_sent_at()
                        .is_some_and(|t| t.elapsed() > CONFIRM_TIMEOUT) =>
            {
                tracing::warn!("no confirm for {CONFIRM_TIMEOUT:?}; reopening the connection");
                self.ledger.broker_fault(
                    &crate::publisher::BrokerFault::ConnectionLost {
                        reason: "confirm timed out".into(),
                    },
                    None,
                );
            }
            Err(_) => {}
        }
    }

    // -- writing --------------------------------------------------------------

    async fn record_failures(&mut self) -> bool {
        let Some(store) = &self.store else {
            return false;
        };
        match store
            .record_failures(self.ledger.failures(), self.cfg.max_attempts)
            .await
        {
            Ok(parked) => {
                self.ledger.failures_recorded(&parked);
                true
            }
            Err(e) => {
                self.database_error(e);
                false
            }
        }
    }

    /// Writes acked marks and failures. Returns true when nothing is left to write.
    async fn flush(&mut self) -> bool {
        if self.ledger.marks().is_empty() && self.ledger.failures().is_empty() {
            return true;
        }
        if !self.ledger.failures().is_empty() && !self.record_failures().await {
            return false;
        }
        let Some(store) = &self.store else {
            return false;
        };
        let keep = !self.cfg.retention.is_zero();
        match store.mark_published(self.ledger.marks(), keep).await {
            Ok(_) => {
                self.ledger.marks_written(!keep);
                true
            }
            Err(e) => {
                self.database_error(e);
                false
            }
        }
    }

    /// Counts and logs (a few lines a minute per kind) a failed statement, and
    /// makes the loop back off before its next turn.
    fn database_error(&mut self, e: StoreError) {
        let statement = e.statement();
        self.metrics.database_error(statement);
        let kind = format!("{statement}:{}", e.sqlstate().unwrap_or("-"));
        let delay = next_statement_delay(&mut self.statement_backoff);
        match self.log_limit.allow(&kind) {
            Some(0) => tracing::warn!(
                error = %e,
                statement,
                retry_in = ?delay,
                "database statement failed; confirmed rows stay pending until marked"
            ),
            Some(suppressed) => tracing::warn!(
                error = %e,
                statement,
                retry_in = ?delay,
                suppressed,
                "database statement failed again ({suppressed} failures like it not logged since the last line); confirmed rows stay pending until marked"
            ),
            None => {}
        }
        self.statement_pause = Some(delay);
        if e.is_connection_lost() {
            self.store = None;
            self.metrics.database_connected.set(0);
        }
    }
}
