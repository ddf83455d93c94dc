//! The sending half of the driver: claim a batch (with the marks in the same
//! round trip), check each row, hand the batch to the broker, and send
//! suspects alone.

use tokio::time::Instant;

use super::{
    ledger::{NotSent, Trouble},
    Relay, CONFIRM_TIMEOUT, PAYLOAD_BUDGET, RESCAN_EVERY,
};
use crate::{
    leases::LeaseState,
    metrics::FailureReason,
    publisher::{self, BrokerFault},
    rows::OutboxRow,
    store::ClaimLimits,
};

/// What the checks say about an admitted row.
enum Checked {
    Send(OutboxRow, publisher::Prepared),
    /// A suspect or culprit: published with nothing else in flight.
    Alone(OutboxRow, publisher::Prepared),
    /// Charged, parked or given up for now; the next row may go.
    Skip,
    /// The broker side is broken: stop publishing.
    Broken,
}

impl Relay {
    /// Publishes the rows whose predecessor of the same key was just acked.
    pub(super) async fn publish_ready(&mut self) {
        if self.stopping() {
            // No new publishes once stopping: they stay pending.
            self.ledger.abandon_waiting();
            return;
        }
        let lease = self.leases.borrow().clone();
        while let Some(row) = self.ledger.pop_ready() {
            let sent = match self.check_row(row, &lease).await {
                Checked::Send(row, prepared) => {
                    self.send_batch(vec![(row, prepared)], &lease).await
                }
                Checked::Alone(row, prepared) => self.publish_alone(row, prepared, &lease).await,
                Checked::Skip => true,
                Checked::Broken => false,
            };
            if !sent {
                break;
            }
        }
    }

    /// Writes acked marks and failures, claims the next batch in the same round
    /// trip, and publishes it.
    pub(super) async fn claim_and_publish(&mut self, limit: usize) {
        let lease = self.leases.borrow().clone();
        if lease.partitions.is_empty() || !lease.is_current() {
            self.more = false;
            return;
        }
        if !self.ledger.failures().is_empty() && !self.record_failures().await {
            return;
        }
        self.ledger.new_claim();
        let Some(store) = &self.store else { return };
        let window = self.ledger.held_window();
        if window.highest == 0 {
            self.rescan_at = Instant::now() + RESCAN_EVERY;
        }
        let keep = !self.cfg.retention.is_zero();
        let limits = ClaimLimits {
            rows: limit,
            max_payload_bytes: self.cfg.max_payload_bytes,
            max_header_bytes: self.cfg.max_header_bytes,
            payload_budget: PAYLOAD_BUDGET.saturating_sub(self.ledger.queued_bytes()),
        };
        let started = Instant::now();
        let floor = self.floor.plan(&lease.partitions, started);
        let result = store
            .mark_then_claim(
                self.ledger.marks(),
                keep,
                &lease.partitions,
                window,
                &self.ledger.held_ids(),
                limits,
                floor,
            )
            .await;
        self.metrics
            .claim_duration
            .observe(started.elapsed().as_secs_f64());
        let (rows, probe) = match result {
            Ok((_, claim, probe)) => {
                self.statement_backoff = None;
                self.ledger.marks_written(!keep);
                self.more = claim.more;
                (claim.rows, probe)
            }
            Err(e) => {
                self.database_error(e);
                return;
            }
        };
        // The claim's rows first: the probe ran after the claim.
        let was = self.floor.floor();
        if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
            self.floor.claimed(floor, first.id, last.id);
        }
        match probe {
            Some(Ok(probe)) => self.floor.probed(probe),
            // The floor just stays where it is; a lost connection shows in
            // the next statement.
            Some(Err(e)) => tracing::debug!(error = %e, "the claim floor's probe failed"),
            None => {}
        }
        if self.floor.floor() != was {
            tracing::debug!(floor = self.floor.floor(), was, "claim floor moved");
        }
        let Some(last) = rows.last() else { return };
        self.ledger.claimed(window, last.id);
        let steady = self.idle.found_rows();
        self.metrics.batch_size.observe(rows.len() as f64);
        // Checked rows are handed to the broker together: one wake-up of the
        // connection's I/O thread per batch instead of one per message.
        let mut batch = Vec::with_capacity(rows.len());
        let mut broken = false;
        for row in rows {
            let Some(row) = self.ledger.admit(row) else {
                continue;
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
            self.more = true;
        }
        // Rows came at once after the relay began to wait: stop asking for
        // notifications (after this batch is on its way).
        if steady && self.cfg.listen {
            self.flag_idle(false).await;
        }
    }

    /// Until when the row may reach the broker, or None (and the row is given
    /// up for now) when its lease lapsed since the claim: another relay may own
    /// its partition now.
    fn lease_until(&mut self, row: &OutboxRow, lease: &LeaseState) -> Option<Instant> {
        let until = lease.valid_until.filter(|_| lease.holds(row.partition));
        if until.is_none() {
            self.ledger.not_sent(row, NotSent::LeaseLost);
        }
        until
    }

    /// Everything a row must pass before it may be sent: its lease, its shape,
    /// its exchange. Rows that fail are charged or given up here.
    async fn check_row(&mut self, row: OutboxRow, lease: &LeaseState) -> Checked {
        if self.lease_until(&row, lease).is_none() {
            return Checked::Skip;
        }
        let prepared = match publisher::prepare(&row) {
            Ok(p) => p,
            Err(error) => {
                let why = NotSent::Refused {
                    error,
                    reason: FailureReason::InvalidRow,
                    park: true,
                };
                self.ledger.not_sent(&row, why);
                return Checked::Skip;
            }
        };
        let Some(publisher) = self.publisher.as_mut() else {
            return Checked::Broken;
        };
        if let Err(error) = publisher.check_header_frame(&row, &prepared) {
            let why = NotSent::Refused {
                error,
                reason: FailureReason::InvalidRow,
                park: true,
            };
            self.ledger.not_sent(&row, why);
            return Checked::Skip;
        }
        match publisher.check_exchange(&row).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                let why = NotSent::Refused {
                    error,
                    reason: FailureReason::ExchangeNotFound,
                    park: false,
                };
                self.ledger.not_sent(&row, why);
                return Checked::Skip;
            }
            Err(e) => {
                tracing::warn!(error = %e, "exchange check failed; reconnecting to the broker");
                self.ledger.note_trouble(Trouble::Connection);
                return Checked::Broken;
            }
        }
        if self.ledger.goes_alone(&row) {
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
                self.ledger.not_sent(row, NotSent::LeaseLost);
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
                Ok(confirm) => self.ledger.sent(row, confirm),
                Err(fault) => {
                    // Later rows of the batch failed the same way; like the
                    // ones in flight, they stay pending and come back.
                    self.ledger.broker_fault(&fault, Some(row.id));
                    return false;
                }
            }
        }
        true
    }

    /// A suspect (in flight when the broker closed the channel) or a culprit:
    /// sent with nothing else in flight, so if it closes the channel it is the
    /// cause. Returns false when the broker side is broken.
    async fn publish_alone(
        &mut self,
        row: OutboxRow,
        prepared: publisher::Prepared,
        lease: &LeaseState,
    ) -> bool {
        while self.ledger.in_flight() > 0 {
            self.await_front(false).await;
        }
        let Some(until) = self.lease_until(&row, lease) else {
            return true;
        };
        // Another row may have broken the channel meanwhile: then this one is
        // no wiser than before and must not be charged for it.
        let trouble = self.ledger.take_trouble();
        let usable = self
            .publisher
            .as_ref()
            .filter(|p| trouble.is_none() && p.is_connected() && p.channel_usable());
        let Some(publisher) = usable else {
            if let Some(t) = trouble {
                self.ledger.note_trouble(t);
            }
            self.ledger.not_sent(&row, NotSent::Deferred);
            return false;
        };
        let answer = match publisher.publish(&row, prepared, until).await {
            Ok(confirm) => tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
                .await
                .unwrap_or_else(|_| {
                    Err(BrokerFault::ConnectionLost {
                        reason: format!("no confirm within {}s", CONFIRM_TIMEOUT.as_secs()),
                    })
                }),
            Err(fault) => Err(fault),
        };
        let delivered_or_charged = answer.is_ok();
        self.ledger.settle_alone(&row, answer);
        delivered_or_charged
    }
}
