//! What the relay holds and owes, without any I/O: the rows in flight (each
//! with whatever the driver awaits for it), acked ids still to mark, failures
//! still to record, rows suspected of closing the channel, per-key order, the
//! claim cursor, and what the broker side needs after a fault.

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
    time::SystemTime,
};

use tokio::time::Instant;

use crate::{
    backoff::retry_delay,
    metrics::{FailureReason, Metrics},
    ordering::{Admit, KeyOrder},
    publisher::{since, BrokerFault, Verdict},
    rows::{Failure, OutboxRow},
    store::HeldWindow,
};

/// Culprits remembered at most (each is parked after max-attempts anyway).
const MAX_CULPRITS: usize = 10_000;

/// What the broker side needs before anything more is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Trouble {
    /// The publishing channel is closed or cannot be trusted: a new one.
    Channel,
    /// The connection is lost, stalled or cannot be trusted: a new one.
    Connection,
}

/// Why a claimed row was not sent.
#[derive(Debug)]
pub enum NotSent {
    /// Its lease lapsed since the claim: another relay may own it now. It
    /// stays pending, uncharged.
    LeaseLost,
    /// The broker side broke before it went: it stays pending, uncharged.
    Deferred,
    /// It cannot go as it is: charged (or parked at once) with the reason.
    Refused {
        error: String,
        reason: FailureReason,
        park: bool,
    },
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
    suspects: HashSet<i64>,
    /// Rows that closed the channel when sent alone: they always go alone.
    culprits: HashSet<i64>,
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
            suspects: HashSet::new(),
            culprits: HashSet::new(),
            order: KeyOrder::default(),
            cursor: 0,
            trouble: None,
        }
    }

    // -- claiming ---------------------------------------------------------

    /// A claim starts: failures are recorded by now, so the claim query
    /// itself holds their keys' later rows.
    pub fn new_claim(&mut self) {
        self.order.new_claim();
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

    /// Payload bytes held in rows waiting for their key.
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
    pub fn goes_alone(&self, id: i64) -> bool {
        self.suspects.contains(&id) || self.culprits.contains(&id)
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
            NotSent::LeaseLost => {
                self.metrics.failure(FailureReason::LeaseLost);
                self.order.failed(row.partition_key.as_deref());
            }
            NotSent::Deferred => self.order.failed(row.partition_key.as_deref()),
            NotSent::Refused {
                error,
                reason,
                park,
            } => {
                self.metrics.failure(reason);
                if park {
                    tracing::warn!(id = row.id, reason = %error, "parking outbox row as a dead letter");
                    self.order.parked(row.partition_key.as_deref());
                } else {
                    self.order.failed(row.partition_key.as_deref());
                }
                self.failures.push(Failure {
                    id: row.id,
                    error,
                    retry_in: retry_delay(row.attempts),
                    park_now: park,
                });
            }
        }
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
            Err(BrokerFault::ChannelClosed { reason }) => {
                // Alone on a channel of a connection that stands: this row
                // closed it. Charged, and from now on always sent alone.
                self.suspects.remove(&row.id);
                if self.culprits.len() >= MAX_CULPRITS {
                    self.culprits.clear();
                }
                self.culprits.insert(row.id);
                let error = format!(
                    "the broker closed the channel when outbox row {} was published alone: {reason}",
                    row.id
                );
                self.not_sent(
                    row,
                    NotSent::Refused {
                        error,
                        reason: FailureReason::ChannelClosed,
                        park: false,
                    },
                );
                self.note_trouble(Trouble::Channel);
            }
            Err(BrokerFault::ConnectionLost { reason }) => {
                // Says nothing about the row (a lost or stalled connection, a
                // timeout, a long broker alarm): not charged, still a suspect.
                tracing::warn!(id = row.id, reason = %reason, "connection trouble while a suspect row was published alone; it stays pending");
                self.metrics.failure(FailureReason::ConnectionLost);
                self.reset(FailureReason::ConnectionLost);
                self.note_trouble(Trouble::Connection);
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
        match fault {
            BrokerFault::ChannelClosed { .. } => {
                self.suspects.extend(culprit_hint);
                self.reset(FailureReason::ChannelClosed);
                self.note_trouble(Trouble::Channel);
            }
            BrokerFault::ConnectionLost { .. } => {
                self.reset(FailureReason::ConnectionLost);
                self.note_trouble(Trouble::Connection);
            }
        }
    }

    /// The broker side needs a new channel or connection (the exchange check
    /// failed, a publish could not be handed over).
    pub fn note_trouble(&mut self, trouble: Trouble) {
        self.trouble = self.trouble.max(Some(trouble));
    }

    /// What the broker side needs, once: the driver acts on it.
    pub fn take_trouble(&mut self) -> Option<Trouble> {
        self.trouble.take()
    }

    /// Everything in flight or waiting goes back to pending and the key
    /// bookkeeping starts over: the publisher (or its channel) is replaced.
    pub fn reset(&mut self, label: FailureReason) {
        for f in self.in_flight.drain(..) {
            self.metrics.failure(label);
            if label == FailureReason::ChannelClosed {
                self.suspects.insert(f.sent.id);
            }
        }
        self.order.clear();
    }

    /// Books an answer that speaks about its own row.
    fn book(&mut self, sent: Sent, verdict: Verdict) {
        let (reason, error) = match verdict {
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
                FailureReason::Unroutable,
                format!(
                    "unroutable: the broker returned outbox row {} ({reply}): no queue is bound for its exchange and routing key; bind one, or set allow-unroutable",
                    sent.id
                ),
            ),
            Verdict::Nacked => (
                FailureReason::Nack,
                format!("the broker nacked outbox row {} (it could not store it)", sent.id),
            ),
        };
        self.metrics.failure(reason);
        self.order.failed(sent.partition_key.as_deref());
        self.failures.push(Failure {
            id: sent.id,
            error,
            retry_in: retry_delay(sent.attempts),
            park_now: false,
        });
    }

    // -- writing ----------------------------------------------------------

    /// Acked ids not yet marked.
    pub fn marks(&self) -> &[i64] {
        &self.acked
    }

    /// The marks were written (or the rows deleted, with retention 0).
    pub fn marks_written(&mut self, deleted: bool) {
        let n = self.acked.len() as u64;
        self.metrics.published.inc_by(n);
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
mod tests {
    use super::*;

    fn row(id: i64, key: Option<&str>) -> OutboxRow {
        let mut row = OutboxRow::defective(id, 0, key.map(str::to_string), String::new());
        row.defect = None;
        row.routing_key = "q".into();
        row
    }

    fn ledger() -> Ledger<()> {
        Ledger::new(Arc::new(Metrics::new()))
    }

    fn send(l: &mut Ledger<()>, r: OutboxRow) {
        let r = l.admit(r).unwrap_or_else(|| panic!("row should go now"));
        l.sent(&r, ());
    }

    #[test]
    fn acks_in_publish_order_become_marks() {
        let mut l = ledger();
        send(&mut l, row(1, Some("a")));
        send(&mut l, row(2, None));
        l.settle_front(Ok(Verdict::Delivered));
        l.settle_front(Ok(Verdict::Delivered));
        assert_eq!(l.marks(), &[1, 2]);
        assert!(l.holds_nothing());
        l.marks_written(false);
        assert!(l.marks().is_empty());
    }

    #[test]
    fn a_nack_charges_its_row_and_holds_its_key() {
        let mut l = ledger();
        send(&mut l, row(1, Some("a")));
        l.settle_front(Ok(Verdict::Nacked));
        assert_eq!(l.failures().len(), 1);
        assert!(!l.failures()[0].park_now);
        assert!(
            l.admit(row(2, Some("a"))).is_none(),
            "row 2 must wait behind row 1's retry"
        );
        l.failures_recorded(&[]);
        l.new_claim();
        assert!(l.admit(row(2, Some("a"))).is_some());
    }

    #[test]
    fn a_closed_channel_charges_nobody_and_makes_suspects() {
        let mut l = ledger();
        send(&mut l, row(1, Some("a")));
        send(&mut l, row(2, Some("b")));
        l.settle_front(Err(BrokerFault::ChannelClosed {
            reason: "406".into(),
        }));
        assert!(l.failures().is_empty(), "nobody is charged");
        assert_eq!(l.in_flight(), 0);
        assert!(l.holds_nothing());
        assert!(l.goes_alone(1) && l.goes_alone(2));
        assert_eq!(l.take_trouble(), Some(Trouble::Channel));
        assert_eq!(l.take_trouble(), None);
    }

    #[test]
    fn a_lost_connection_charges_nobody_and_makes_no_suspects() {
        let mut l = ledger();
        send(&mut l, row(1, Some("a")));
        l.broker_fault(
            &BrokerFault::ConnectionLost {
                reason: "reset".into(),
            },
            None,
        );
        assert!(l.failures().is_empty());
        assert!(!l.goes_alone(1));
        assert_eq!(l.take_trouble(), Some(Trouble::Connection));
        // The key's bookkeeping starts over: its next row goes at once.
        assert!(l.admit(row(1, Some("a"))).is_some());
    }

    #[test]
    fn a_row_that_closes_the_channel_alone_is_charged_and_always_goes_alone() {
        let mut l = ledger();
        send(&mut l, row(7, Some("a")));
        l.broker_fault(&BrokerFault::ChannelClosed { reason: "x".into() }, None);
        let _ = l.take_trouble();
        let suspect = l
            .admit(row(7, Some("a")))
            .unwrap_or_else(|| panic!("admitted"));
        assert!(l.goes_alone(7));
        l.settle_alone(
            &suspect,
            Err(BrokerFault::ChannelClosed {
                reason: "406 PRECONDITION_FAILED".into(),
            }),
        );
        assert_eq!(l.failures().len(), 1);
        assert!(l.failures()[0].error.contains("published alone"));
        assert_eq!(l.take_trouble(), Some(Trouble::Channel));
        assert!(l.goes_alone(7), "a culprit always goes alone");
    }

    #[test]
    fn a_suspect_alone_on_a_lost_connection_is_not_charged() {
        let mut l = ledger();
        send(&mut l, row(7, None));
        l.broker_fault(&BrokerFault::ChannelClosed { reason: "x".into() }, None);
        let suspect = l.admit(row(7, None)).unwrap_or_else(|| panic!("admitted"));
        l.settle_alone(
            &suspect,
            Err(BrokerFault::ConnectionLost {
                reason: "no confirm within 30s".into(),
            }),
        );
        assert!(
            l.failures().is_empty(),
            "a timeout says nothing about the row"
        );
        assert!(l.goes_alone(7), "still a suspect");
        assert_eq!(l.take_trouble(), Some(Trouble::Connection));
    }

    #[test]
    fn parked_rows_let_their_key_go_on() {
        let mut l = ledger();
        let bad = l
            .admit(row(1, Some("a")))
            .unwrap_or_else(|| panic!("admitted"));
        l.not_sent(
            &bad,
            NotSent::Refused {
                error: "headers".into(),
                reason: FailureReason::InvalidRow,
                park: true,
            },
        );
        assert!(l.failures()[0].park_now);
        assert!(l.admit(row(2, Some("a"))).is_some());
    }

    #[test]
    fn the_held_window_spans_what_is_in_flight_and_waiting() {
        let mut l = ledger();
        assert_eq!(l.held_window().highest, 0);
        send(&mut l, row(5, Some("a")));
        send(&mut l, row(9, None));
        l.claimed(HeldWindow::default(), 9);
        let w = l.held_window();
        assert_eq!((w.lowest, w.highest), (5, 9));
        l.settle_front(Ok(Verdict::Delivered));
        assert_eq!(l.held_window().lowest, 9);
    }

    #[tokio::test(start_paused = true)]
    async fn the_front_remembers_when_it_was_sent() {
        let mut l = ledger();
        send(&mut l, row(1, None));
        let sent = l.front_sent_at().unwrap_or_else(|| panic!("in flight"));
        tokio::time::advance(std::time::Duration::from_secs(31)).await;
        assert!(sent.elapsed() >= std::time::Duration::from_secs(31));
    }
}
