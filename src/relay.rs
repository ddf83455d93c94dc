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
//!
//! One file per step of a message's life: `claim.rs` (claim, with the marks
//! in the same round trip), `send.rs` (check, publish in batches or alone),
//! `confirm.rs` (await and settle confirms), `mark.rs` (write marks and
//! failures); around them `connect.rs` (connect, reconnect, a failed
//! statement), `wait.rs` (idle waiting) and `action.rs`, the one table of what
//! is done about each kind of error.

use std::{sync::Arc, time::Duration};

use tokio::{sync::watch, time::Instant};

use crate::{
    config::RelayConfig,
    leases::LeaseState,
    metrics::Metrics,
    publisher::{Confirm, Publisher},
    store::{ClaimFloor, SharedFloor, Store},
    wakeup::{IdlePolicy, Wakeup},
};

mod action;
mod claim;
mod confirm;
mod connect;
mod ledger;
mod log_limit;
mod mark;
mod send;
mod wait;

use ledger::Ledger;

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
    /// The floor as the heartbeat and the housekeeping sweep see it, and the
    /// sweep's answer (rows pending again below the floor).
    shared_floor: Arc<SharedFloor>,
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
        shared_floor: Arc<SharedFloor>,
        stop: watch::Receiver<bool>,
        can_publish: watch::Sender<bool>,
    ) -> Self {
        Self {
            shared_floor,
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

    /// The steps of new rows: write what is owed and claim (one round trip),
    /// then check and send what came.
    async fn claim_and_publish(&mut self, limit: usize) {
        let lease = self.leases.borrow().clone();
        let Some(rows) = self.claim(limit, &lease).await else {
            return;
        };
        let steady = self.idle.found_rows();
        self.metrics.batch_size.observe(rows.len() as f64);
        self.send_claimed(rows, &lease).await;
        // Rows came at once after the relay began to wait: stop asking for
        // notifications (after this batch is on its way).
        if steady && self.cfg.listen {
            self.flag_idle(false).await;
        }
    }
}
