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
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::PublisherConfirm;
use tokio::{
    sync::{watch, Notify},
    time::Instant,
};

use crate::{
    config::RelayConfig,
    leases::LeaseState,
    metrics::{FailureReason, Metrics},
    ordering::{Admit, KeyOrder},
    publisher::{self, Outcome, Publisher},
    store::{Failure, OutboxRow, Store},
};

mod confirms;
pub use confirms::retry_delay;

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

/// How the relay is woken: the control task sets `pending` and notifies.
#[derive(Default)]
pub struct Wakeup {
    pending: AtomicBool,
    notify: Notify,
}

impl Wakeup {
    pub fn wake(&self) {
        self.pending.store(true, Ordering::Release);
        self.notify.notify_one();
    }
    fn take(&self) -> bool {
        self.pending.swap(false, Ordering::AcqRel)
    }
}

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
    confirm: PublisherConfirm,
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
    /// Rows that were in flight when the broker closed the channel or the
    /// connection: one of them may be the cause, so each goes out alone once.
    suspects: HashSet<i64>,
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
            order: KeyOrder::default(),
            cursor: 0,
            force_reconnect: false,
            more: true,
            rescan_at: Instant::now(),
            db_backoff: None,
            amqp_backoff: None,
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
            {
                self.claim_and_publish(room.min(self.cfg.batch_size)).await;
            } else if !self.in_flight.is_empty() {
                self.await_front(blocked).await;
                if self.in_flight.is_empty() || self.acked.len() >= self.cfg.batch_size {
                    self.flush().await;
                }
            } else {
                self.flush().await;
                self.idle().await;
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
            _ = wake.notify.notified() => {}
            // Readiness must drop when the database goes, even while idle.
            _ = async { match store_closed { Some(c) => c.await, None => std::future::pending().await } } => {}
            // Only feeds /healthz: the heartbeat is the poll, so no claim here.
            _ = tokio::time::sleep(IDLE_BEAT) => return,
            _ = self.stop.changed() => {}
            _ = self.leases.changed() => {}
        }
        self.more = true;
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
                match p.reopen_channel().await {
                    Ok(()) => return true,
                    Err(e) => tracing::warn!(error = %e, "cannot reopen the publishing channel"),
                }
            }
            tracing::warn!("lost the RabbitMQ connection; reconnecting");
            self.drop_in_flight(FailureReason::ConnectionLost);
            if let Some(p) = self.publisher.take() {
                p.close().await;
            }
            self.force_reconnect = false;
        }
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
        let after = if self.holds_nothing() { 0 } else { self.cursor };
        if after == 0 {
            self.rescan_at = Instant::now() + RESCAN_EVERY;
        }
        let held = self.order.held_ids();
        let keep = !self.cfg.retention.is_zero();
        let result = store
            .mark_then_claim(&self.acked, keep, &lease.partitions, after, &held, limit)
            .await;
        let rows = match result {
            Ok((_, rows)) => {
                self.count_published();
                rows
            }
            Err(e) => {
                self.database_error(e);
                return;
            }
        };
        self.more = rows.len() == limit;
        let Some(last) = rows.last() else { return };
        self.cursor = after.max(last.id);
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
        if broken {
            // The broker side broke: what is not sent stays pending and comes back.
            for (row, _) in &batch {
                self.order.failed(row.partition_key.as_deref());
            }
            self.more = true;
        } else if !self.send_batch(batch, &lease).await {
            self.more = true;
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
                self.order.failed(row.partition_key.as_deref());
                return Checked::Broken;
            }
        }
        if self.suspects.contains(&row.id) {
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
            for (row, _) in &batch {
                self.order.failed(row.partition_key.as_deref());
            }
            return false;
        };
        let (rows, prepared): (Vec<OutboxRow>, Vec<publisher::Prepared>) =
            batch.into_iter().unzip();
        let results: Vec<Result<PublisherConfirm, Outcome>> = publisher
            .publish_batch(&rows, prepared, until)
            .await
            .into_iter()
            .map(|r| r.map_err(|e| publisher.outcome(Err(e))))
            .collect();
        for (row, result) in rows.iter().zip(results) {
            match result {
                Ok(confirm) => self.in_flight.push_back(InFlight {
                    sent: Sent::of(row),
                    confirm,
                }),
                Err(outcome) => {
                    // Later rows of the batch failed the same way; like the
                    // ones in flight, they stay pending and come back.
                    self.broker_fault(outcome, Some(row.id));
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
        self.suspects.remove(&row.id);
        let sent = Sent::of(&row);
        let result = match publisher.publish(&row, prepared, until).await {
            Ok(confirm) => tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
                .await
                .unwrap_or_else(|_| {
                    Err(lapin::Error::from(lapin::ErrorKind::MissingHeartbeatError))
                }),
            Err(e) => Err(e),
        };
        match publisher.outcome(result) {
            outcome @ (Outcome::ChannelClosed { .. } | Outcome::ConnectionLost { .. }) => {
                let (Outcome::ChannelClosed { reason } | Outcome::ConnectionLost { reason }) =
                    &outcome
                else {
                    return false;
                };
                let error = format!(
                    "the broker closed the channel when outbox row {} was published alone: {reason}",
                    row.id
                );
                // ensure_publisher reopens the channel, or the connection when
                // that is what failed (it may look open while stalled).
                self.force_reconnect = matches!(outcome, Outcome::ConnectionLost { .. });
                self.fail_row(&row, error, FailureReason::ChannelClosed, false);
                false
            }
            other => {
                self.settle(sent, other);
                true
            }
        }
    }
}

/// Reconnect backoff: 100ms doubling to 3s, with jitter, forever. Short enough
/// that a restarted broker or database is back in use within seconds; the
/// jitter keeps a fleet of relays from reconnecting in lockstep.
pub fn next_delay(state: &mut Option<backon::ExponentialBackoff>) -> Duration {
    state
        .get_or_insert_with(|| {
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(3))
                .with_jitter()
                .without_max_times()
                .build()
        })
        .next()
        .unwrap_or(Duration::from_secs(3))
}
