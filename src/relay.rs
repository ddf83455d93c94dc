//! The loop that joins store and publisher: claim -> publish -> confirm -> mark.
//!
//! Publishes are pipelined: up to `max_in_flight` unconfirmed messages on one
//! confirm-mode channel, in id order; rows of one partition key only while
//! they share a route (see `ordering`). Confirms are taken in publish order;
//! acked ids are marked in one statement sent together with the next claim. Nothing is marked before its
//! confirm; anything unconfirmed when a fault hits simply stays pending in the
//! database and is claimed again.

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use tokio::{sync::watch, time::Instant};

use crate::{
    backoff::next_delay,
    config::RelayConfig,
    leases::LeaseState,
    metrics::{FailureReason, Metrics},
    ordering::{Admit, KeyOrder},
    publisher::{self, BrokerFault, Confirm, Publisher},
    rows::{Failure, OutboxRow},
    store::{ClaimLimits, HeldWindow, Store},
    wakeup::Wakeup,
};

mod confirms;

/// A confirm that takes longer than this, with the broker not blocking us,
/// means the channel is wedged: drop it and publish again.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// While publishing without pause, claims continue after the last id in
/// flight; this often the relay lets the pipeline drain and claims from the
/// start again, so rows committed late with a lower id, or of a partition just
/// leased, wait at most about this long.
const RESCAN_EVERY: Duration = Duration::from_secs(1);
/// Longest idle wait without a wakeup (the loop's liveness beat for /healthz).
const IDLE_BEAT: Duration = Duration::from_secs(10);
/// Payload bytes the relay holds at most in claimed and queued rows (one
/// larger row still goes, alone): memory follows bytes, not row counts.
const PAYLOAD_BUDGET: usize = 8 * 1024 * 1024;
/// Culprits remembered at most (each is parked after max-attempts anyway).
const MAX_CULPRITS: usize = 10_000;
/// A relay woken this soon after it began to wait is under steady load: it
/// stops asking for notifications (each makes an application's commit take
/// PostgreSQL's database-wide notify lock) and polls instead.
const HOT_GAP: Duration = Duration::from_millis(10);
/// Polling finds nothing for this long: the relay asks for notifications again.
const LINGER: Duration = Duration::from_millis(50);
/// Gaps between polls: short while rows keep coming, doubling while none do.
const MIN_POLL_GAP: Duration = Duration::from_millis(1);
const MAX_POLL_GAP: Duration = Duration::from_millis(8);

/// What the relay remembers of a published row until its confirm is booked.
struct Sent {
    id: i64,
    partition_key: Option<String>,
    created_at: std::time::SystemTime,
    attempts: i32,
    sent_at: Instant,
}

impl Sent {
    fn of(row: &OutboxRow) -> Self {
        Self {
            id: row.id,
            partition_key: row.partition_key.clone(),
            created_at: row.created_at,
            attempts: row.attempts,
            sent_at: Instant::now(),
        }
    }
}

/// What the checks say about a claimed row.
enum Checked {
    Send(OutboxRow, publisher::Prepared),
    /// A suspect from a broken channel: published with nothing else in flight.
    Alone(OutboxRow, publisher::Prepared),
    /// Charged, parked or given up for now; the next row may go.
    Skip,
    /// The broker side is broken: stop publishing.
    Broken,
}

struct InFlight {
    sent: Sent,
    confirm: Confirm,
}

pub struct Relay {
    cfg: RelayConfig,
    metrics: Arc<Metrics>,
    leases: watch::Receiver<LeaseState>,
    wakeup: Arc<Wakeup>,
    stop: watch::Receiver<bool>,
    store: Option<Store>,
    publisher: Option<Publisher>,
    in_flight: VecDeque<InFlight>,
    acked: Vec<i64>,
    failures: Vec<Failure>,
    /// Rows that were in flight when the broker closed the channel: one of
    /// them may be the cause, so each goes out alone once.
    suspects: HashSet<i64>,
    /// Rows that closed the channel when sent alone: they always go alone.
    culprits: HashSet<i64>,
    /// One unconfirmed publish per partition key; followers wait here.
    order: KeyOrder,
    /// Highest id claimed while anything is held; the next claim continues after it.
    cursor: i64,
    /// The connection looks open but stopped answering: replace it.
    force_reconnect: bool,
    /// The last claim came back full (or a wakeup arrived): claim again at once.
    more: bool,
    /// When the next claim must start from the beginning of the pending index.
    rescan_at: Instant,
    db_backoff: Option<backon::ExponentialBackoff>,
    amqp_backoff: Option<backon::ExponentialBackoff>,
    /// What the database was last told: does this relay wait for a NOTIFY?
    /// (None: unknown, e.g. after a reconnect.)
    flagged_idle: Option<bool>,
    /// How long the last wait for a notification lasted.
    woken_after: Option<Duration>,
    /// Polling without finding anything since then.
    quiet_since: Option<Instant>,
    poll_gap: Duration,
}

impl Relay {
    pub fn new(
        cfg: RelayConfig,
        metrics: Arc<Metrics>,
        leases: watch::Receiver<LeaseState>,
        wakeup: Arc<Wakeup>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            cfg,
            metrics,
            leases,
            wakeup,
            stop,
            store: None,
            publisher: None,
            in_flight: VecDeque::new(),
            acked: Vec::new(),
            failures: Vec::new(),
            suspects: HashSet::new(),
            culprits: HashSet::new(),
            order: KeyOrder::default(),
            cursor: 0,
            force_reconnect: false,
            more: true,
            rescan_at: Instant::now(),
            db_backoff: None,
            amqp_backoff: None,
            flagged_idle: None,
            woken_after: None,
            quiet_since: None,
            poll_gap: MIN_POLL_GAP,
        }
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Nothing in flight, queued behind its key, or ready to go.
    fn holds_nothing(&self) -> bool {
        self.in_flight.is_empty() && self.order.is_idle()
    }

    /// Publishes the rows whose predecessor of the same key was just acked.
    async fn publish_ready(&mut self) {
        if self.stopping() {
            // No new publishes once stopping: they stay pending.
            self.order.abandon_waiting();
            return;
        }
        let lease = self.leases.borrow().clone();
        while let Some(row) = self.order.pop_ready() {
            if !self.publish_row(row, &lease).await {
                break;
            }
        }
    }

    /// Runs until stop is signalled and everything in flight is confirmed and marked.
    pub async fn run(mut self) {
        loop {
            self.metrics.beat();
            if self.stopping() && self.in_flight.is_empty() {
                if self.flush().await {
                    break;
                }
                // The marks could not be written; the database decides when we stop.
                if !self.ensure_store().await {
                    self.pause(Duration::from_millis(200)).await;
                }
                continue;
            }
            if !self.ensure_store().await || !self.ensure_publisher().await {
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
                .saturating_sub(self.in_flight.len() + self.order.waiting_rows());
            let want = self.cfg.batch_size.min(self.cfg.max_in_flight);
            let rescan_waits = !self.holds_nothing() && Instant::now() >= self.rescan_at;
            if !self.stopping()
                && self.more
                && !blocked
                && !rescan_waits
                && room >= want.div_ceil(2)
                && self.order.queued_bytes() < PAYLOAD_BUDGET / 2
            {
                self.claim_and_publish(room.min(self.cfg.batch_size)).await;
            } else if !self.in_flight.is_empty() {
                self.await_front(blocked).await;
                if self.in_flight.is_empty() || self.acked.len() >= self.cfg.batch_size {
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
            _ = self.leases.changed() => {}
        }
        self.more = true;
    }

    /// Nothing in flight and nothing claimed. Under steady load the relay polls
    /// (with its flag saying so, applications' commits carry no NOTIFY); once
    /// polls find nothing for `LINGER` it flags itself idle, claims once more
    /// (for rows committed while the flag was changing) and waits.
    async fn wait_for_work(&mut self, blocked: bool) {
        if !self.cfg.listen {
            // Nobody listens: the heartbeat is the poll, notifications are waste.
            if self.flagged_idle != Some(false) {
                self.flag_idle(false).await;
            }
            self.idle().await;
            return;
        }
        if self.flagged_idle == Some(true) || blocked || self.stopping() {
            let started = Instant::now();
            self.idle().await;
            self.woken_after = Some(started.elapsed());
            return;
        }
        let quiet = *self.quiet_since.get_or_insert_with(Instant::now);
        if quiet.elapsed() < LINGER {
            let gap = self.poll_gap;
            self.poll_gap = (gap * 2).min(MAX_POLL_GAP);
            let wake = self.wakeup.clone();
            tokio::select! {
                _ = tokio::time::sleep(gap) => {}
                _ = wake.notified() => {}
                _ = self.stop.changed() => {}
            }
        } else {
            self.flag_idle(true).await;
            self.woken_after = None;
        }
        self.more = true;
    }

    /// Tells the database whether this relay waits for notifications.
    async fn flag_idle(&mut self, idle: bool) {
        let Some(store) = &self.store else { return };
        if let Err(e) = store.set_idle(&self.cfg.instance_id, idle).await {
            self.database_error(e);
        }
        // Even when it failed: the flag only decides who notifies (a poll
        // still finds every row), so a failure must not make the loop spin.
        self.flagged_idle = Some(idle);
    }

    /// The ids the relay holds, for the claim to go around them.
    fn held_window(&self) -> HeldWindow {
        if self.holds_nothing() {
            return HeldWindow::default();
        }
        let lowest = self
            .in_flight
            .iter()
            .map(|f| f.sent.id)
            .chain(self.order.waiting_ids())
            .min()
            .unwrap_or(self.cursor);
        HeldWindow {
            lowest,
            highest: self.cursor,
        }
    }

    async fn pause(&mut self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.stop.changed() => {}
        }
    }

    async fn ensure_store(&mut self) -> bool {
        if self.store.as_ref().is_some_and(|s| !s.is_closed()) {
            return true;
        }
        if self.store.take().is_some() {
            tracing::warn!("lost the database connection; reconnecting");
        }
        self.metrics.database_connected.set(0);
        match Store::connect(&self.cfg.conn).await {
            Ok(store) => {
                tracing::info!("connected to PostgreSQL");
                self.store = Some(store);
                self.flagged_idle = None;
                self.metrics.database_connected.set(1);
                self.db_backoff = None;
                self.more = true;
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

    async fn ensure_publisher(&mut self) -> bool {
        if let Some(p) = &mut self.publisher {
            if p.is_connected() && !self.force_reconnect {
                if p.channel_usable() {
                    return true;
                }
                // Nothing unconfirmed on the old channel can be confirmed now.
                self.drop_in_flight(FailureReason::ChannelClosed);
                let Some(p) = self.publisher.as_mut() else {
                    return false;
                };
                match p.reopen_channel().await {
                    Ok(()) => return true,
                    Err(e) => tracing::warn!(error = %e, "cannot reopen the publishing channel"),
                }
            }
            tracing::warn!("lost the RabbitMQ connection; reconnecting");
            if let Some(p) = self.publisher.take() {
                p.close().await;
            }
        }
        // Whatever was in flight or waiting on the old connection is pending
        // again, and the key bookkeeping starts over (for every way the
        // publisher went: lost, timed out, replaced).
        self.drop_in_flight(FailureReason::ConnectionLost);
        self.force_reconnect = false;
        self.metrics.broker_connected.set(0);
        match Publisher::connect(&self.cfg.amqp_url, self.cfg.allow_unroutable).await {
            Ok(p) => {
                tracing::info!("connected to RabbitMQ");
                self.publisher = Some(p);
                self.metrics.broker_connected.set(1);
                self.amqp_backoff = None;
                self.more = true;
                true
            }
            Err(e) => {
                let delay = next_delay(&mut self.amqp_backoff);
                tracing::warn!(error = %e, retry_in = ?delay, "broker unavailable");
                self.pause(delay).await;
                false
            }
        }
    }

    /// Writes acked marks and failures, claims the next batch in the same round
    /// trip, and publishes it.
    async fn claim_and_publish(&mut self, limit: usize) {
        let lease = self.leases.borrow().clone();
        if lease.partitions.is_empty() || !lease.is_current() {
            self.more = false;
            return;
        }
        if !self.failures.is_empty() && !self.record_failures().await {
            return;
        }
        // Recorded failures now hold their keys' later rows in SQL.
        self.order.new_claim();
        let Some(store) = &self.store else { return };
        let window = self.held_window();
        if window.highest == 0 {
            self.rescan_at = Instant::now() + RESCAN_EVERY;
        }
        let held = self.order.held_ids();
        let keep = !self.cfg.retention.is_zero();
        let limits = ClaimLimits {
            rows: limit,
            max_payload_bytes: self.cfg.max_payload_bytes,
            payload_budget: PAYLOAD_BUDGET.saturating_sub(self.order.queued_bytes()),
        };
        let started = Instant::now();
        let result = store
            .mark_then_claim(&self.acked, keep, &lease.partitions, window, &held, limits)
            .await;
        self.metrics
            .claim_duration
            .observe(started.elapsed().as_secs_f64());
        let rows = match result {
            Ok((_, claim)) => {
                self.count_published();
                self.more = claim.more;
                claim.rows
            }
            Err(e) => {
                self.database_error(e);
                return;
            }
        };
        let Some(last) = rows.last() else { return };
        self.cursor = window.highest.max(last.id);
        self.quiet_since = None;
        self.poll_gap = MIN_POLL_GAP;
        // Woken at once after it began to wait: rows come steadily, stop
        // asking for notifications (after this batch is on its way).
        let hot =
            self.flagged_idle != Some(false) && self.woken_after.take().is_none_or(|d| d < HOT_GAP);
        self.metrics.batch_size.observe(rows.len() as f64);
        // Checked rows are handed to lapin together: one wake-up of its I/O
        // thread per batch instead of one per message.
        let mut batch = Vec::with_capacity(rows.len());
        let mut broken = false;
        for row in rows {
            let row = match self.order.admit(row) {
                Admit::Publish(row) => row,
                Admit::Queued | Admit::Held => continue,
            };
            match self.check_row(row, &lease).await {
                Checked::Send(row, prepared) => batch.push((row, prepared)),
                Checked::Skip => {}
                Checked::Alone(row, prepared) => {
                    if !self.send_batch(std::mem::take(&mut batch), &lease).await
                        || !self.publish_alone(row, prepared, &lease).await
                    {
                        broken = true;
                        break;
                    }
                }
                Checked::Broken => {
                    broken = true;
                    break;
                }
            }
        }
        if broken || !self.send_batch(batch, &lease).await {
            // The broker side broke: what is not sent stays pending and comes
            // back once the publisher is replaced (which resets the keys).
            self.force_reconnect |= self.publisher.as_ref().is_none_or(|p| !p.is_connected());
            self.more = true;
        }
        if hot && self.cfg.listen {
            self.flag_idle(false).await;
        }
    }

    /// Until when the row may reach the broker, or None (and the row is given
    /// up for now) when its lease lapsed since the claim: another relay may own
    /// its partition now.
    fn lease_until(&mut self, row: &OutboxRow, lease: &LeaseState) -> Option<Instant> {
        let until = lease.valid_until.filter(|_| lease.holds(row.partition));
        if until.is_none() {
            self.metrics.failure(FailureReason::LeaseLost);
            self.order.failed(row.partition_key.as_deref());
        }
        until
    }

    /// Publishes one row. Returns false when the broker side is broken.
    async fn publish_row(&mut self, row: OutboxRow, lease: &LeaseState) -> bool {
        match self.check_row(row, lease).await {
            Checked::Send(row, prepared) => self.send_batch(vec![(row, prepared)], lease).await,
            Checked::Alone(row, prepared) => self.publish_alone(row, prepared, lease).await,
            Checked::Skip => true,
            Checked::Broken => false,
        }
    }

    /// Everything a row must pass before it may be sent: its lease, its shape,
    /// its exchange. Rows that fail are charged or given up here.
    async fn check_row(&mut self, row: OutboxRow, lease: &LeaseState) -> Checked {
        if self.lease_until(&row, lease).is_none() {
            return Checked::Skip;
        }
        let prepared = match publisher::prepare(&row) {
            Ok(p) => p,
            Err(reason) => {
                self.fail_row(&row, reason, FailureReason::InvalidRow, true);
                return Checked::Skip;
            }
        };
        let Some(publisher) = self.publisher.as_mut() else {
            return Checked::Broken;
        };
        match publisher.check_exchange(&row).await {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => {
                self.fail_row(&row, reason, FailureReason::ExchangeNotFound, false);
                return Checked::Skip;
            }
            Err(e) => {
                tracing::warn!(error = %e, "exchange check failed; reconnecting to the broker");
                self.force_reconnect = true;
                return Checked::Broken;
            }
        }
        if self.suspects.contains(&row.id) || self.culprits.contains(&row.id) {
            return Checked::Alone(row, prepared);
        }
        Checked::Send(row, prepared)
    }

    /// Hands checked rows to the broker in one go; each becomes in flight.
    /// Returns false when the broker side is broken.
    async fn send_batch(
        &mut self,
        batch: Vec<(OutboxRow, publisher::Prepared)>,
        lease: &LeaseState,
    ) -> bool {
        if batch.is_empty() {
            return true;
        }
        // Exchange checks may have waited on the broker: the lease again (one
        // lease state for the whole batch, so it holds for all or for none).
        let Some(until) = lease.valid_until.filter(|_| lease.is_current()) else {
            for (row, _) in &batch {
                self.metrics.failure(FailureReason::LeaseLost);
                self.order.failed(row.partition_key.as_deref());
            }
            return true;
        };
        let Some(publisher) = self.publisher.as_ref() else {
            return false;
        };
        let (rows, prepared): (Vec<OutboxRow>, Vec<publisher::Prepared>) =
            batch.into_iter().unzip();
        let results = publisher.publish_batch(&rows, prepared, until).await;
        for (row, result) in rows.iter().zip(results) {
            match result {
                Ok(confirm) => self.in_flight.push_back(InFlight {
                    sent: Sent::of(row),
                    confirm,
                }),
                Err(fault) => {
                    // Later rows of the batch failed the same way; like the
                    // ones in flight, they stay pending and come back.
                    self.broker_fault(fault, Some(row.id));
                    return false;
                }
            }
        }
        true
    }

    /// A row that was in flight when a channel or connection died: sent with
    /// nothing else in flight, so if it kills the channel again it is the cause.
    async fn publish_alone(
        &mut self,
        row: OutboxRow,
        prepared: publisher::Prepared,
        lease: &LeaseState,
    ) -> bool {
        while !self.in_flight.is_empty() {
            self.await_front(false).await;
        }
        let Some(until) = self.lease_until(&row, lease) else {
            return true;
        };
        // Another row may have broken the channel meanwhile: then this one is
        // no wiser than before and must not be charged for it.
        let channel_ok = self
            .publisher
            .as_ref()
            .is_some_and(|p| p.is_connected() && p.channel_usable());
        let Some(publisher) = self
            .publisher
            .as_ref()
            .filter(|_| channel_ok && !self.force_reconnect)
        else {
            self.order.failed(row.partition_key.as_deref());
            return false;
        };
        let sent = Sent::of(&row);
        let result = match publisher.publish(&row, prepared, until).await {
            Ok(confirm) => tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
                .await
                .unwrap_or_else(|_| {
                    Err(BrokerFault::ConnectionLost {
                        reason: format!("no confirm within {}s", CONFIRM_TIMEOUT.as_secs()),
                    })
                }),
            Err(fault) => Err(fault),
        };
        match result {
            Ok(verdict) => {
                self.suspects.remove(&row.id);
                self.settle(sent, verdict);
                true
            }
            Err(BrokerFault::ChannelClosed { reason }) => {
                // Alone on a channel of a connection that stands: this row
                // closed it. Charged, and from now on always sent alone.
                let error = format!(
                    "the broker closed the channel when outbox row {} was published alone: {reason}",
                    row.id
                );
                self.suspects.remove(&row.id);
                if self.culprits.len() >= MAX_CULPRITS {
                    self.culprits.clear();
                }
                self.culprits.insert(row.id);
                self.fail_row(&row, error, FailureReason::ChannelClosed, false);
                false
            }
            Err(BrokerFault::ConnectionLost { reason }) => {
                // Says nothing about the row (a lost or stalled connection, a
                // timeout, a long broker alarm): not charged, still a suspect.
                tracing::warn!(id = row.id, reason = %reason, "connection trouble while a suspect row was published alone; it stays pending");
                self.metrics.failure(FailureReason::ConnectionLost);
                self.force_reconnect = true;
                false
            }
        }
    }
}
