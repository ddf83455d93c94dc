//! What the broker's answers mean for the rows: confirms taken in publish
//! order, failures charged (or not) to their rows, marks and failures written.

use std::time::Duration;

use futures_util::FutureExt;

use super::{Relay, Sent, CONFIRM_TIMEOUT};
use crate::{
    backoff::retry_delay,
    metrics::FailureReason,
    publisher::{self, BrokerFault, Verdict},
    rows::{Failure, OutboxRow},
};

impl Relay {
    /// Takes every confirm that has already arrived, without waiting.
    pub(super) fn collect_ready(&mut self) {
        while let Some(front) = self.in_flight.front_mut() {
            match (&mut front.confirm).now_or_never() {
                Some(result) => self.take_front(result),
                None => break,
            }
        }
    }

    /// Waits (bounded) for the oldest in-flight confirm.
    pub(super) async fn await_front(&mut self, blocked: bool) {
        let Some(front) = self.in_flight.front_mut() else {
            return;
        };
        match tokio::time::timeout(Duration::from_millis(500), &mut front.confirm).await {
            Ok(result) => {
                self.take_front(result);
                self.collect_ready();
            }
            Err(_) if !blocked && front.sent.sent_at.elapsed() > CONFIRM_TIMEOUT => {
                tracing::warn!("no confirm for {CONFIRM_TIMEOUT:?}; reopening the connection");
                self.broker_fault(
                    BrokerFault::ConnectionLost {
                        reason: "confirm timed out".into(),
                    },
                    None,
                );
                if let Some(p) = self.publisher.take() {
                    p.close().await;
                }
            }
            Err(_) => {}
        }
    }

    pub(super) fn take_front(&mut self, result: Result<Verdict, BrokerFault>) {
        match result {
            Err(fault) => self.broker_fault(fault, None),
            Ok(verdict) => {
                if let Some(flight) = self.in_flight.pop_front() {
                    self.settle(flight.sent, verdict);
                }
            }
        }
    }

    /// Books a confirm that speaks about its own row.
    pub(super) fn settle(&mut self, flight: Sent, verdict: Verdict) {
        let (reason, error) = match verdict {
            Verdict::Delivered => {
                self.order.acked(flight.partition_key.as_deref());
                self.metrics
                    .confirm_duration
                    .observe(flight.sent_at.elapsed().as_secs_f64());
                self.metrics
                    .delivery_lag
                    .observe(publisher::since(flight.created_at).as_secs_f64());
                self.acked.push(flight.id);
                return;
            }
            Verdict::Unroutable { reply } => (
                FailureReason::Unroutable,
                format!(
                    "unroutable: the broker returned outbox row {} ({reply}): no queue is bound for its exchange and routing key; bind one, or set allow-unroutable",
                    flight.id
                ),
            ),
            Verdict::Nacked => (
                FailureReason::Nack,
                format!("the broker nacked outbox row {} (it could not store it)", flight.id),
            ),
        };
        self.metrics.failure(reason);
        self.order.failed(flight.partition_key.as_deref());
        self.failures.push(Failure {
            id: flight.id,
            error,
            retry_in: retry_delay(flight.attempts),
            park_now: false,
        });
    }

    pub(super) fn fail_row(
        &mut self,
        row: &OutboxRow,
        error: String,
        reason: FailureReason,
        park_now: bool,
    ) {
        self.metrics.failure(reason);
        if park_now {
            tracing::warn!(id = row.id, reason = %error, "parking outbox row as a dead letter");
            self.order.parked(row.partition_key.as_deref());
        } else {
            self.order.failed(row.partition_key.as_deref());
        }
        self.failures.push(Failure {
            id: row.id,
            error,
            retry_in: retry_delay(row.attempts),
            park_now,
        });
    }

    /// The channel or the connection failed: nothing in flight is known to have
    /// been delivered and nothing is charged. After a closed channel every such
    /// row becomes a suspect (one of them may be the cause); after a lost
    /// connection they simply go back to the pipeline.
    pub(super) fn broker_fault(&mut self, fault: BrokerFault, culprit_hint: Option<i64>) {
        tracing::warn!(
            in_flight = self.in_flight.len(),
            reason = %fault.reason(),
            "broker closed the channel or connection; unconfirmed rows stay pending and are republished"
        );
        let label = match fault {
            BrokerFault::ChannelClosed { .. } => {
                self.suspects.extend(culprit_hint);
                FailureReason::ChannelClosed
            }
            BrokerFault::ConnectionLost { .. } => {
                self.force_reconnect = true;
                FailureReason::ConnectionLost
            }
        };
        self.drop_in_flight(label);
    }

    /// Everything in flight or waiting goes back to pending; the key
    /// bookkeeping starts over.
    pub(super) fn drop_in_flight(&mut self, label: FailureReason) {
        for f in self.in_flight.drain(..) {
            self.metrics.failure(label);
            if label == FailureReason::ChannelClosed {
                self.suspects.insert(f.sent.id);
            }
        }
        self.order.clear();
        self.more = true;
    }

    pub(super) async fn record_failures(&mut self) -> bool {
        let Some(store) = &self.store else {
            return false;
        };
        match store
            .record_failures(&self.failures, self.cfg.max_attempts)
            .await
        {
            Ok(parked) => {
                for (id, attempts) in &parked {
                    let error = self
                        .failures
                        .iter()
                        .find(|f| f.id == *id)
                        .map_or("", |f| f.error.as_str());
                    tracing::warn!(id, attempts, reason = %error, "outbox row dead-lettered");
                }
                self.metrics.dead_lettered.inc_by(parked.len() as u64);
                self.failures.clear();
                true
            }
            Err(e) => {
                self.database_error(e);
                false
            }
        }
    }

    /// Writes acked marks and failures. Returns true when nothing is left to write.
    pub(super) async fn flush(&mut self) -> bool {
        if self.acked.is_empty() && self.failures.is_empty() {
            return true;
        }
        if !self.failures.is_empty() && !self.record_failures().await {
            return false;
        }
        let Some(store) = &self.store else {
            return false;
        };
        let keep = !self.cfg.retention.is_zero();
        match store.mark_published(&self.acked, keep).await {
            Ok(_) => {
                self.count_published();
                true
            }
            Err(e) => {
                self.database_error(e);
                false
            }
        }
    }

    pub(super) fn count_published(&mut self) {
        let n = self.acked.len() as u64;
        self.metrics.published.inc_by(n);
        if self.cfg.retention.is_zero() {
            // retention 0: marking a row is deleting it.
            self.metrics.deleted.inc_by(n);
        }
        self.acked.clear();
    }

    pub(super) fn database_error(&mut self, e: crate::store::StoreError) {
        tracing::warn!(error = %e, "database statement failed; confirmed rows stay pending until marked");
        if e.is_connection_lost() {
            self.store = None;
            self.metrics.database_connected.set(0);
        }
    }
}
