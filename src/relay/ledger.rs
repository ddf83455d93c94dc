//! What the relay holds and owes, without any I/O: the rows in flight (each
//! with whatever the driver awaits for it), acked ids still to mark, failures
//! still to record, rows suspected of closing the channel, per-key order, the
//! claim cursor, and what the broker side needs after a fault.

use std::{collections::VecDeque, sync::Arc, time::SystemTime};

use tokio::time::Instant;

use super::action::{action, Action, Fault, Trouble};
use crate::{
    backoff::retry_delay,
    bounded::{BoundedSet, ExpiringMap},
    metrics::{FailureReason, Metrics},
    ordering::{Admit, KeyOrder},
    publisher::{since, BrokerFault, Verdict},
    rows::{Failure, OutboxRow},
    store::HeldWindow,
};

/// Culprits remembered at most (each is parked after max-attempts anyway).
const MAX_CULPRITS: usize = 10_000;
/// Suspects remembered at most: a suspect that another relay published, or
/// that was parked, is never settled here; the oldest are forgotten.
const MAX_SUSPECTS: usize = 10_000;
/// Refused exchanges remembered at most (rows name any exchange they like).
const MAX_REFUSED_EXCHANGES: usize = 1_000;
/// AMQP reply code: the user may not do this (here: write to the exchange).
const ACCESS_REFUSED: u16 = 403;
/// How long rows to an exchange the broker refused go out alone.
const REFUSED_EXCHANGE_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Why a claimed row was not sent.
#[derive(Debug)]
pub enum NotSent {
    /// Its lease lapsed since the claim: another relay may own it now. It
    /// stays pending, uncharged.
    LeaseLost,
    /// The broker side broke before it went: it stays pending, uncharged.
    Deferred,
    /// It cannot go as it is: charged, or parked at once, as the table says
    /// for `fault`.
    Refused { error: String, fault: Fault },
}

/// The ids the relay holds when a claim starts, for the claim to go around.
pub struct HeldAround {
    pub window: HeldWindow,
    /// Key -> last id held.
    pub held_ids: serde_json::Value,
}

/// What the ledger remembers of a published row until its confirm is booked.
struct Sent {
    id: i64,
    partition_key: Option<String>,
    created_at: SystemTime,
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

struct InFlight<C> {
    sent: Sent,
    confirm: C,
}

pub struct Ledger<C> {
    metrics: Arc<Metrics>,
    /// In publish order, which is the order confirms are taken in.
    in_flight: VecDeque<InFlight<C>>,
    acked: Vec<i64>,
    failures: Vec<Failure>,
    /// Rows that were in flight when the broker closed the channel: one of
    /// them may be the cause, so each goes out alone once.
    suspects: BoundedSet<i64>,
    /// Rows that closed the channel when sent alone: they always go alone.
    culprits: BoundedSet<i64>,
    /// Exchanges the broker refused the relay's user (403), until when their
    /// rows go alone.
    refused_exchanges: ExpiringMap<String>,
    order: KeyOrder,
    /// Highest id claimed while anything is held.
    cursor: i64,
    trouble: Option<Trouble>,
}

impl<C> Ledger<C> {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            in_flight: VecDeque::new(),
            acked: Vec::new(),
            failures: Vec::new(),
            suspects: BoundedSet::new(MAX_SUSPECTS),
            culprits: BoundedSet::new(MAX_CULPRITS),
            refused_exchanges: ExpiringMap::new(MAX_REFUSED_EXCHANGES),
            order: KeyOrder::default(),
            cursor: 0,
            trouble: None,
        }
    }

    // -- claiming ---------------------------------------------------------

    /// A claim starts: failures are recorded by now, so the claim query
    /// itself holds their keys' later rows. Returns the ids the relay holds,
    /// for the claim to go around them.
    pub fn new_claim(&mut self) -> HeldAround {
        self.order.new_claim();
        HeldAround {
            window: self.held_window(),
            held_ids: self.held_ids(),
        }
    }

    /// The ids the relay holds, for the next claim to go around them.
    pub fn held_window(&self) -> HeldWindow {
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

    /// A claim with `window` returned rows up to `last_id`.
    pub fn claimed(&mut self, window: HeldWindow, last_id: i64) {
        self.cursor = window.highest.max(last_id);
    }

    /// Key -> last id held, for the claim query.
    pub fn held_ids(&self) -> serde_json::Value {
        self.order.held_ids()
    }

    /// Nothing in flight, queued behind its key, or ready to go.
    pub fn holds_nothing(&self) -> bool {
        self.in_flight.is_empty() && self.order.is_idle()
    }

    /// Rows in flight or waiting for their key (counted against max-in-flight).
    pub fn held_rows(&self) -> usize {
        self.in_flight.len() + self.order.waiting_rows()
    }

    /// Payload and header bytes held in rows waiting for their key.
    pub fn queued_bytes(&self) -> usize {
        self.order.queued_bytes()
    }

    /// The claimed row if it may go now; otherwise it waits for its key (or
    /// stays pending behind a failure of its key).
    pub fn admit(&mut self, row: OutboxRow) -> Option<OutboxRow> {
        match self.order.admit(row) {
            Admit::Publish(row) => Some(row),
            Admit::Queued | Admit::Held => None,
        }
    }

    /// The next row released by its key's confirms.
    pub fn pop_ready(&mut self) -> Option<OutboxRow> {
        self.order.pop_ready()
    }

    /// Stopping: rows waiting for their key stay pending.
    pub fn abandon_waiting(&mut self) {
        self.order.abandon_waiting();
    }

    /// The row must be published with nothing else in flight.
    pub fn goes_alone(&self, row: &OutboxRow) -> bool {
        self.suspects.contains(&row.id)
            || self.culprits.contains(&row.id)
            || (!self.refused_exchanges.is_empty() && self.refused_exchanges.is_live(&row.exchange))
    }

    // -- sending ----------------------------------------------------------

    pub fn sent(&mut self, row: &OutboxRow, confirm: C) {
        self.in_flight.push_back(InFlight {
            sent: Sent::of(row),
            confirm,
        });
    }

    /// An admitted row that was not sent.
    pub fn not_sent(&mut self, row: &OutboxRow, why: NotSent) {
        match why {
            NotSent::LeaseLost => self.leave_pending(row, Fault::LeaseLost),
            NotSent::Deferred => self.leave_pending(row, Fault::BrokerUnusable),
            NotSent::Refused { error, fault } => self.charge(
                row.id,
                row.partition_key.as_deref(),
                row.attempts,
                error,
                fault,
            ),
        }
    }

    /// A row that stays pending, uncharged, as the table says for `fault`;
    /// its key's later rows wait.
    fn leave_pending(&mut self, row: &OutboxRow, fault: Fault) {
        if let Some(reason) = fault.reason() {
            self.metrics.failure(reason);
        }
        self.order.failed(row.partition_key.as_deref());
    }

    /// Charges a row for `fault`: parked at once or retried later, as the
    /// table says; its key's later rows wait either way.
    fn charge(&mut self, id: i64, key: Option<&str>, attempts: i32, error: String, fault: Fault) {
        if let Some(reason) = fault.reason() {
            self.metrics.failure(reason);
        }
        let park = action(fault) == Action::Park;
        if park {
            tracing::warn!(id, reason = %error, "parking outbox row as a dead letter");
            self.order.parked(key);
        } else {
            self.order.failed(key);
        }
        self.failures.push(Failure {
            id,
            error,
            retry_in: retry_delay(attempts),
            park_now: park,
        });
    }

    // -- the broker's answers ---------------------------------------------

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// What the driver awaits for the oldest publish.
    pub fn front_mut(&mut self) -> Option<&mut C> {
        self.in_flight.front_mut().map(|f| &mut f.confirm)
    }

    /// When the oldest publish in flight was sent.
    pub fn front_sent_at(&self) -> Option<Instant> {
        self.in_flight.front().map(|f| f.sent.sent_at)
    }

    /// The oldest publish's answer.
    pub fn settle_front(&mut self, answer: Result<Verdict, BrokerFault>) {
        match answer {
            Err(fault) => self.broker_fault(&fault, None),
            Ok(verdict) => {
                if let Some(flight) = self.in_flight.pop_front() {
                    self.book(flight.sent, verdict);
                }
            }
        }
    }

    /// The answer to a row published alone (nothing else was in flight).
    pub fn settle_alone(&mut self, row: &OutboxRow, answer: Result<Verdict, BrokerFault>) {
        match answer {
            Ok(verdict) => {
                self.suspects.remove(&row.id);
                self.book(Sent::of(row), verdict);
            }
            Err(BrokerFault::ChannelClosed { reason, code }) => {
                // Alone on a channel of a connection that stands: this row
                // closed it. Charged, and from now on always sent alone.
                self.suspects.remove(&row.id);
                self.culprits.insert(row.id);
                let (error, fault) = if code == Some(ACCESS_REFUSED) {
                    // Other rows to this exchange would close the channel
                    // too, taking their neighbours with them: alone for a while.
                    self.refused_exchanges
                        .insert(row.exchange.clone(), Instant::now() + REFUSED_EXCHANGE_TTL);
                    // RabbitMQ checks the default exchange as 'amq.default'.
                    let exchange = match row.exchange.as_str() {
                        "" => "amq.default",
                        named => named,
                    };
                    (
                        format!(
                            "RabbitMQ refused outbox row {} ({reason}): grant the relay's user write access to exchange '{exchange}' (the write pattern of `rabbitmqctl set_permissions`), or fix the row's exchange",
                            row.id
                        ),
                        Fault::AccessRefusedAlone,
                    )
                } else {
                    (
                        format!(
                            "the broker closed the channel when outbox row {} was published alone: {reason}",
                            row.id
                        ),
                        Fault::ClosedChannelAlone,
                    )
                };
                self.not_sent(row, NotSent::Refused { error, fault });
                self.note_fault(fault);
            }
            Err(BrokerFault::ConnectionLost { reason }) => {
                // Says nothing about the row (a lost or stalled connection, a
                // timeout, a long broker alarm): not charged, still a suspect.
                tracing::warn!(id = row.id, reason = %reason, "connection trouble while a suspect row was published alone; it stays pending");
                self.metrics.failure(FailureReason::ConnectionLost);
                self.reset(Fault::ConnectionLost);
                self.note_fault(Fault::ConnectionLost);
            }
        }
    }

    /// The channel or the connection failed: nothing in flight is known to have
    /// been delivered and nothing is charged. After a closed channel every such
    /// row becomes a suspect (one of them may be the cause); after a lost
    /// connection they simply go back to the pipeline.
    pub fn broker_fault(&mut self, fault: &BrokerFault, culprit_hint: Option<i64>) {
        tracing::warn!(
            in_flight = self.in_flight.len(),
            reason = %fault.reason(),
            "broker closed the channel or connection; unconfirmed rows stay pending and are republished"
        );
        let fault = match fault {
            BrokerFault::ChannelClosed { .. } => Fault::ChannelClosed,
            BrokerFault::ConnectionLost { .. } => Fault::ConnectionLost,
        };
        if action(fault) == Action::NewChannel {
            self.suspects.extend(culprit_hint);
        }
        self.reset(fault);
        self.note_fault(fault);
    }

    /// The broker side needs what the table says for `fault` (a new channel
    /// or connection) before anything more is sent.
    pub fn note_fault(&mut self, fault: Fault) {
        self.trouble = self.trouble.max(action(fault).trouble());
    }

    /// What the broker side needs, without taking it.
    pub fn trouble(&self) -> Option<Trouble> {
        self.trouble
    }

    /// What the broker side needs, once: the driver acts on it.
    pub fn take_trouble(&mut self) -> Option<Trouble> {
        self.trouble.take()
    }

    /// Everything in flight or waiting goes back to pending and the key
    /// bookkeeping starts over: the publisher (or its channel) is replaced
    /// after `fault`. Rows in flight become suspects when the table says so.
    pub fn reset(&mut self, fault: Fault) {
        let suspect = action(fault) == Action::NewChannel;
        for f in self.in_flight.drain(..) {
            if let Some(label) = fault.reason() {
                self.metrics.failure(label);
            }
            if suspect {
                self.suspects.insert(f.sent.id);
            }
        }
        self.order.clear();
    }

    /// Books an answer that speaks about its own row.
    fn book(&mut self, sent: Sent, verdict: Verdict) {
        let (fault, error) = match verdict {
            Verdict::Delivered => {
                self.order.acked(sent.partition_key.as_deref());
                self.metrics
                    .confirm_duration
                    .observe(sent.sent_at.elapsed().as_secs_f64());
                self.metrics
                    .delivery_lag
                    .observe(since(sent.created_at).as_secs_f64());
                self.acked.push(sent.id);
                return;
            }
            Verdict::Unroutable { reply } => (
                Fault::Unroutable,
                format!(
                    "unroutable: the broker returned outbox row {} ({reply}): no queue took it: none is bound for its exchange and routing key, or the one bound is a classic queue on a node that is down; bind one (replicated: a quorum queue), or set allow-unroutable",
                    sent.id
                ),
            ),
            Verdict::Nacked => (
                Fault::Nacked,
                format!("the broker nacked outbox row {} (it could not store it)", sent.id),
            ),
        };
        self.charge(
            sent.id,
            sent.partition_key.as_deref(),
            sent.attempts,
            error,
            fault,
        );
    }

    // -- writing ----------------------------------------------------------

    /// No acked ids to mark and no failures to record.
    pub fn nothing_to_write(&self) -> bool {
        self.acked.is_empty() && self.failures.is_empty()
    }

    /// Acked ids not yet marked.
    pub fn marks(&self) -> &[i64] {
        &self.acked
    }

    /// The marks were written (or the rows deleted, with retention 0).
    pub fn marks_written(&mut self, deleted: bool) {
        let n = self.acked.len() as u64;
        self.metrics.rows_published(n);
        if deleted {
            self.metrics.deleted.inc_by(n);
        }
        self.acked.clear();
    }

    /// Failures not yet recorded.
    pub fn failures(&self) -> &[Failure] {
        &self.failures
    }

    /// The failures were recorded; `parked` are the (id, attempts) dead-lettered.
    pub fn failures_recorded(&mut self, parked: &[(i64, i32)]) {
        for (id, attempts) in parked {
            let error = self
                .failures
                .iter()
                .find(|f| f.id == *id)
                .map_or("", |f| f.error.as_str());
            tracing::warn!(id, attempts, reason = %error, "outbox row dead-lettered");
        }
        self.metrics.dead_lettered.inc_by(parked.len() as u64);
        self.failures.clear();
    }
}

#[cfg(test)]
mod tests;
