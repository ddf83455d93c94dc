//! Sending: check each claimed row (lease, shape, exchange), hand the checked
//! rows to the broker in one batch, and send suspects and culprits alone.

use super::{action::Fault, confirm::CONFIRM_TIMEOUT, ledger::NotSent, Relay};
use crate::{
    leases::LeaseState,
    publisher::{self, BrokerFault},
    rows::OutboxRow,
};
use tokio::time::Instant;

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

/// Why a row did not pass its checks.
enum Failed {
    /// The row itself: charged or parked, as the table says for the fault.
    Row(Fault, String),
    /// The broker side is broken.
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

    /// Checks the claimed rows and publishes them.
    pub(super) async fn send_claimed(&mut self, rows: Vec<OutboxRow>, lease: &LeaseState) {
        // Checked rows are handed to the broker together: one wake-up of the
        // connection's I/O thread per batch instead of one per message.
        let mut batch = Vec::with_capacity(rows.len());
        let mut broken = false;
        for row in rows {
            let Some(row) = self.ledger.admit(row) else {
                continue;
            };
            match self.check_row(row, lease).await {
                Checked::Send(row, prepared) => batch.push((row, prepared)),
                Checked::Skip => {}
                Checked::Alone(row, prepared) => {
                    if !self.send_batch(std::mem::take(&mut batch), lease).await
                        || !self.publish_alone(row, prepared, lease).await
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
        if broken || !self.send_batch(batch, lease).await {
            // The broker side broke: what is not sent stays pending and comes
            // back once the publisher is replaced (which resets the keys).
            self.more = true;
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
        match self.check_shape_and_exchange(&row).await {
            Ok(prepared) if self.ledger.goes_alone(&row) => Checked::Alone(row, prepared),
            Ok(prepared) => Checked::Send(row, prepared),
            Err(Failed::Row(fault, error)) => {
                self.ledger
                    .not_sent(&row, NotSent::Refused { error, fault });
                Checked::Skip
            }
            Err(Failed::Broken) => Checked::Broken,
        }
    }

    /// The row's shape (its headers against the broker's frame too), then
    /// its exchange.
    async fn check_shape_and_exchange(
        &mut self,
        row: &OutboxRow,
    ) -> Result<publisher::Prepared, Failed> {
        let prepared =
            publisher::prepare(row).map_err(|error| Failed::Row(Fault::InvalidRow, error))?;
        let Some(publisher) = self.publisher.as_mut() else {
            return Err(Failed::Broken);
        };
        publisher
            .check_header_frame(row, &prepared)
            .map_err(|error| Failed::Row(Fault::InvalidRow, error))?;
        match publisher.check_exchange(row).await {
            Ok(Ok(())) => Ok(prepared),
            Ok(Err(error)) => Err(Failed::Row(Fault::ExchangeNotFound, error)),
            Err(e) => {
                tracing::warn!(error = %e, "exchange check failed; reconnecting to the broker");
                self.ledger.note_fault(Fault::ConnectionLost);
                Err(Failed::Broken)
            }
        }
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
        let trouble = self.ledger.trouble();
        let usable = self
            .publisher
            .as_ref()
            .filter(|p| trouble.is_none() && p.is_connected() && p.channel_usable());
        let Some(publisher) = usable else {
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
