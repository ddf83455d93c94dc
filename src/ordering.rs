//! Per-partition-key order in a pipelined publisher.
//!
//! Rows of one partition key go out in id order. Several may be unconfirmed at
//! once only while they share one route (exchange and routing key): the broker
//! then treats them alike, so if one is returned as unroutable the later ones
//! are too, and all are retried in order. A row with another route waits in
//! memory until every earlier row of its key is confirmed. A retried row is
//! the last of its key in flight: what made it fail (a classic queue's node
//! down) can end between its publish and the next one, which would then be
//! routed while it is returned again. If a row fails, the
//! key's waiting rows go back to pending and the claim query holds them behind
//! it. Rows without a partition key are not ordered and never wait.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::rows::OutboxRow;

/// What to do with a claimed row now.
// Returned and matched at once for every row: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Admit {
    /// Publish it now.
    Publish(OutboxRow),
    /// It waits for earlier rows of its key to be confirmed.
    Queued,
    /// An earlier row of its key failed since the last claim: it stays pending.
    Held,
}

/// One partition key's rows held by the relay.
#[derive(Default)]
struct KeyState {
    /// Rows sent (or released to send) and not yet confirmed.
    unconfirmed: usize,
    /// Their common route.
    route: (String, String),
    /// Rows waiting for all of those to be confirmed, in id order.
    queued: VecDeque<OutboxRow>,
    /// Highest id held for this key.
    last_id: i64,
    /// A retried row is unconfirmed: nothing later of the key goes before its
    /// answer.
    retry_unconfirmed: bool,
}

fn route(row: &OutboxRow) -> (&str, &str) {
    (&row.exchange, &row.routing_key)
}

#[derive(Default)]
pub struct KeyOrder {
    keys: HashMap<String, KeyState>,
    queued_rows: usize,
    /// Payload and header bytes of queued and ready rows.
    queued_bytes: usize,
    /// Keys with a failed row since the last claim.
    held: HashSet<String>,
    /// Rows released by their predecessors' confirms: publish these next.
    ready: VecDeque<OutboxRow>,
}

impl KeyOrder {
    pub fn admit(&mut self, row: OutboxRow) -> Admit {
        let Some(key) = row.partition_key.as_deref() else {
            return Admit::Publish(row);
        };
        if self.held.contains(key) {
            return Admit::Held;
        }
        let state = self.keys.entry(key.to_string()).or_default();
        state.last_id = state.last_id.max(row.id);
        let same_route = state.unconfirmed == 0
            || (state.route.0 == row.exchange && state.route.1 == row.routing_key);
        if state.queued.is_empty() && same_route && !state.retry_unconfirmed {
            if state.unconfirmed == 0 {
                state.route = (row.exchange.clone(), row.routing_key.clone());
            }
            state.unconfirmed += 1;
            state.retry_unconfirmed = row.attempts > 0;
            Admit::Publish(row)
        } else {
            self.queued_bytes += row.held_bytes();
            state.queued.push_back(row);
            self.queued_rows += 1;
            Admit::Queued
        }
    }

    /// One unconfirmed row of the key was acked.
    pub fn acked(&mut self, key: Option<&str>) {
        self.settled(key);
    }

    /// A row of the key was parked as a dead letter without being sent: it no
    /// longer holds anything back.
    pub fn parked(&mut self, key: Option<&str>) {
        self.settled(key);
    }

    /// A row of the key failed (or could not be sent): its waiting rows stay
    /// pending behind it, in the database, until its retry.
    pub fn failed(&mut self, key: Option<&str>) {
        let Some(key) = key else { return };
        self.held.insert(key.to_string());
        if let Some(state) = self.keys.get_mut(key) {
            state.unconfirmed = state.unconfirmed.saturating_sub(1);
            self.queued_rows -= state.queued.len();
            self.queued_bytes -= state
                .queued
                .iter()
                .map(OutboxRow::held_bytes)
                .sum::<usize>();
            state.queued.clear();
            if state.unconfirmed == 0 {
                self.keys.remove(key);
            }
        }
    }

    fn settled(&mut self, key: Option<&str>) {
        let Some(key) = key else { return };
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        state.unconfirmed = state.unconfirmed.saturating_sub(1);
        if state.unconfirmed == 0 {
            state.retry_unconfirmed = false;
            // Release the next row and the ones behind it that share its route,
            // up to and including a retried row.
            while let Some(next) = state.queued.front() {
                let first = state.unconfirmed == 0;
                if !first && route(next) != (state.route.0.as_str(), state.route.1.as_str()) {
                    break;
                }
                let Some(next) = state.queued.pop_front() else {
                    break;
                };
                if first {
                    state.route = (next.exchange.clone(), next.routing_key.clone());
                }
                state.unconfirmed += 1;
                self.queued_rows -= 1;
                let retry = next.attempts > 0;
                self.ready.push_back(next);
                if retry {
                    state.retry_unconfirmed = true;
                    break;
                }
            }
            if state.unconfirmed == 0 && state.queued.is_empty() {
                self.keys.remove(key);
            }
        }
    }

    /// The next released row; it counts as unconfirmed until the caller
    /// reports `acked`, `failed` or `parked` for it.
    pub fn pop_ready(&mut self) -> Option<OutboxRow> {
        let row = self.ready.pop_front()?;
        self.queued_bytes -= row.held_bytes();
        Some(row)
    }

    /// Ids of the rows waiting for confirms or ready to go.
    pub fn waiting_ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.keys
            .values()
            .flat_map(|s| s.queued.iter())
            .chain(self.ready.iter())
            .map(|r| r.id)
    }

    /// Payload and header bytes held in rows waiting for confirms or ready to go.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// A new claim starts: failures are recorded by now, so the claim query
    /// itself holds their keys back.
    pub fn new_claim(&mut self) {
        self.held.clear();
    }

    /// Rows waiting for confirms or ready to go (counted against max-in-flight).
    pub fn waiting_rows(&self) -> usize {
        self.queued_rows + self.ready.len()
    }

    /// Nothing queued or ready (what is in flight is the caller's to know).
    pub fn is_idle(&self) -> bool {
        self.waiting_rows() == 0
    }

    /// Forget queued and ready rows: they stay pending and are claimed again.
    /// Keys keep counting what is really in flight.
    pub fn abandon_waiting(&mut self) {
        for row in self.ready.drain(..) {
            if let Some(state) = row
                .partition_key
                .as_deref()
                .and_then(|k| self.keys.get_mut(k))
            {
                state.unconfirmed = state.unconfirmed.saturating_sub(1);
            }
        }
        for state in self.keys.values_mut() {
            state.queued.clear();
        }
        self.keys.retain(|_, s| s.unconfirmed > 0);
        self.queued_rows = 0;
        self.queued_bytes = 0;
    }

    /// The channel or connection failed: nothing is in flight any more.
    pub fn clear(&mut self) {
        self.keys.clear();
        self.ready.clear();
        self.queued_rows = 0;
        self.queued_bytes = 0;
    }

    /// Key -> last id the relay holds (in flight, queued or ready), for the
    /// claim query: rows of such a key below the claim cursor that the relay
    /// does not hold must not be overtaken.
    pub fn held_ids(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.keys
                .iter()
                .map(|(k, s)| (k.clone(), s.last_id.into()))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, key: Option<&str>) -> OutboxRow {
        OutboxRow {
            id,
            message_id: uuid::Uuid::new_v4(),
            exchange: String::new(),
            routing_key: "q".into(),
            partition: 0,
            partition_key: key.map(str::to_string),
            payload: Vec::new(),
            content_type: None,
            message_type: None,
            correlation_id: None,
            headers: serde_json::json!({}),
            header_bytes: 2,
            created_at: std::time::SystemTime::now(),
            attempts: 0,
            defect: None,
        }
    }

    fn publish(order: &mut KeyOrder, r: OutboxRow) -> i64 {
        match order.admit(r) {
            Admit::Publish(r) => r.id,
            other => panic!("expected Publish, got {other:?}"),
        }
    }

    fn routed(id: i64, key: &str, routing_key: &str) -> OutboxRow {
        OutboxRow {
            routing_key: routing_key.into(),
            ..row(id, Some(key))
        }
    }

    #[test]
    fn rows_of_a_key_with_one_route_are_pipelined() {
        let mut order = KeyOrder::default();
        publish(&mut order, row(1, Some("a")));
        publish(&mut order, row(2, Some("a")));
        publish(&mut order, row(3, None));
        assert_eq!(order.waiting_rows(), 0);
        assert_eq!(order.held_ids(), serde_json::json!({"a": 2}));
    }

    #[test]
    fn a_row_with_another_route_waits_for_every_earlier_confirm() {
        let mut order = KeyOrder::default();
        publish(&mut order, routed(1, "a", "created"));
        publish(&mut order, routed(2, "a", "created"));
        assert!(matches!(order.admit(routed(3, "a", "paid")), Admit::Queued));
        // Same route as the in-flight rows, but behind a queued row: waits too.
        assert!(matches!(
            order.admit(routed(4, "a", "created")),
            Admit::Queued
        ));
        order.acked(Some("a"));
        assert!(order.pop_ready().is_none(), "row 2 is still unconfirmed");
        order.acked(Some("a"));
        assert_eq!(order.pop_ready().map(|r| r.id), Some(3));
        assert!(
            order.pop_ready().is_none(),
            "row 4 has another route than row 3"
        );
        assert!(matches!(order.admit(routed(5, "a", "paid")), Admit::Queued));
        order.acked(Some("a"));
        assert_eq!(order.pop_ready().map(|r| r.id), Some(4));
        assert!(order.pop_ready().is_none());
        order.acked(Some("a"));
        assert_eq!(order.pop_ready().map(|r| r.id), Some(5));
    }

    #[test]
    fn a_failed_row_sends_its_followers_back_to_pending_until_the_next_claim() {
        let mut order = KeyOrder::default();
        publish(&mut order, routed(1, "a", "created"));
        assert!(matches!(order.admit(routed(2, "a", "paid")), Admit::Queued));
        order.failed(Some("a"));
        assert!(
            order.pop_ready().is_none(),
            "row 2 must not overtake row 1's retry"
        );
        assert_eq!(order.waiting_rows(), 0);
        assert!(matches!(order.admit(routed(3, "a", "paid")), Admit::Held));
        order.new_claim();
        assert!(matches!(
            order.admit(routed(3, "a", "paid")),
            Admit::Publish(_)
        ));
    }

    #[test]
    fn a_released_row_keeps_its_key_busy_until_it_is_settled() {
        let mut order = KeyOrder::default();
        publish(&mut order, routed(1, "a", "created"));
        assert!(matches!(order.admit(routed(2, "a", "paid")), Admit::Queued));
        order.acked(Some("a"));
        // Row 2 waits in `ready`; a later row of another route must not jump ahead.
        assert!(matches!(
            order.admit(routed(3, "a", "shipped")),
            Admit::Queued
        ));
        let two = order
            .pop_ready()
            .unwrap_or_else(|| panic!("row 2 released"));
        assert_eq!(two.id, 2);
        assert!(matches!(
            order.admit(routed(4, "a", "shipped")),
            Admit::Queued
        ));
        order.acked(Some("a"));
        assert_eq!(order.pop_ready().map(|r| r.id), Some(3));
        assert_eq!(
            order.pop_ready().map(|r| r.id),
            Some(4),
            "same route as 3: goes with it"
        );
    }

    fn retried(id: i64, key: &str) -> OutboxRow {
        OutboxRow {
            attempts: 1,
            ..row(id, Some(key))
        }
    }

    #[test]
    fn a_retried_row_is_the_last_of_its_key_in_flight() {
        let mut order = KeyOrder::default();
        publish(&mut order, row(1, Some("a")));
        publish(&mut order, retried(2, "a"));
        // Same route, but row 2 may be returned again while a later row is
        // routed (its queue came back in between): row 3 waits for row 2.
        assert!(matches!(order.admit(row(3, Some("a"))), Admit::Queued));
        assert!(matches!(order.admit(row(4, Some("a"))), Admit::Queued));
        publish(&mut order, row(5, Some("b")));
        order.acked(Some("a"));
        assert!(order.pop_ready().is_none(), "row 2 is unconfirmed");
        order.acked(Some("a"));
        assert_eq!(order.pop_ready().map(|r| r.id), Some(3));
        assert_eq!(order.pop_ready().map(|r| r.id), Some(4));
        // A retried row may follow earlier rows in flight: it is the last.
        publish(&mut order, retried(6, "a"));
        assert!(matches!(order.admit(row(7, Some("a"))), Admit::Queued));
        order.acked(Some("a"));
        order.acked(Some("a"));
        assert!(order.pop_ready().is_none(), "row 7 waits for row 6");
        order.acked(Some("a"));
        assert_eq!(order.pop_ready().map(|r| r.id), Some(7));
        // A retried row released by a confirm holds back what follows it too.
        publish(&mut order, routed(10, "c", "x"));
        let eleven = OutboxRow {
            attempts: 3,
            ..routed(11, "c", "y")
        };
        assert!(matches!(order.admit(eleven), Admit::Queued));
        assert!(matches!(order.admit(routed(12, "c", "y")), Admit::Queued));
        order.acked(Some("c"));
        assert_eq!(order.pop_ready().map(|r| r.id), Some(11));
        assert!(order.pop_ready().is_none(), "row 12 waits for row 11");
        order.acked(Some("c"));
        assert_eq!(order.pop_ready().map(|r| r.id), Some(12));
    }

    #[test]
    fn a_retried_row_that_fails_again_holds_its_followers_pending() {
        let mut order = KeyOrder::default();
        publish(&mut order, retried(1, "a"));
        assert!(matches!(order.admit(row(2, Some("a"))), Admit::Queued));
        order.failed(Some("a"));
        assert!(order.pop_ready().is_none());
        assert_eq!(order.waiting_rows(), 0, "row 2 went back to pending unsent");
    }

    #[test]
    fn a_parked_row_lets_its_key_go_on() {
        let mut order = KeyOrder::default();
        publish(&mut order, routed(1, "a", "created"));
        assert!(matches!(order.admit(routed(2, "a", "paid")), Admit::Queued));
        assert!(matches!(
            order.admit(routed(3, "a", "shipped")),
            Admit::Queued
        ));
        order.acked(Some("a"));
        let two = order
            .pop_ready()
            .unwrap_or_else(|| panic!("row 2 released"));
        order.parked(two.partition_key.as_deref());
        assert_eq!(order.pop_ready().map(|r| r.id), Some(3));
    }

    #[test]
    fn abandoning_waiting_rows_keeps_what_is_in_flight() {
        let mut order = KeyOrder::default();
        publish(&mut order, routed(1, "a", "created"));
        assert!(matches!(order.admit(routed(2, "a", "paid")), Admit::Queued));
        order.abandon_waiting();
        assert!(order.is_idle());
        // Row 1 is still unconfirmed: another route must still wait for it.
        assert!(matches!(order.admit(routed(3, "a", "paid")), Admit::Queued));
    }

    #[test]
    fn clear_forgets_everything_in_flight_and_waiting() {
        let mut order = KeyOrder::default();
        publish(&mut order, routed(1, "a", "created"));
        assert!(matches!(order.admit(routed(2, "a", "paid")), Admit::Queued));
        order.clear();
        assert!(order.is_idle());
        assert_eq!(order.held_ids(), serde_json::json!({}));
        publish(&mut order, routed(2, "a", "paid"));
    }
}
