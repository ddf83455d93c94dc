//! Claiming: the next batch of pending rows of the relay's partitions, around
//! the rows it holds and from the claim floor, with the acked marks written
//! in the same round trip.

use std::time::Duration;

use tokio::time::Instant;

use super::{Relay, PAYLOAD_BUDGET};
use crate::{leases::LeaseState, rows::OutboxRow, store::ClaimLimits};

/// At least this often the relay lets the pipeline drain and claims from the
/// start of the pending index (for rows inside the held window it skipped,
/// e.g. of a partition just leased).
pub(super) const RESCAN_EVERY: Duration = Duration::from_secs(1);

impl Relay {
    /// Writes failures, then acked marks and the claim of the next batch in
    /// one round trip. Returns the rows claimed; None when none came (no
    /// lease, a failed statement, nothing pending).
    pub(super) async fn claim(
        &mut self,
        limit: usize,
        lease: &LeaseState,
    ) -> Option<Vec<OutboxRow>> {
        if lease.partitions.is_empty() || !lease.is_current() {
            self.more = false;
            return None;
        }
        if !self.record_failures().await {
            return None;
        }
        let held = self.ledger.new_claim();
        let Some(store) = &self.store else {
            return None;
        };
        let window = held.window;
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
        if let Some(id) = self.shared_floor.take_lower(&lease.partitions) {
            self.floor.lower_to(id);
        }
        let floor = self.floor.plan(&lease.partitions, started);
        let result = store
            .mark_then_claim(
                self.ledger.marks(),
                keep,
                &lease.partitions,
                window,
                &held.held_ids,
                limits,
                floor,
            )
            .await;
        let (rows, probe) = match result {
            Ok(done) => {
                self.metrics
                    .claim_duration
                    .observe(done.claim_took.as_secs_f64());
                self.metrics
                    .mark_duration
                    .observe(done.mark_took.as_secs_f64());
                self.statement_backoff = None;
                self.ledger.marks_written(!keep);
                self.more = done.claim.more;
                (done.claim.rows, done.probe)
            }
            Err(e) => {
                self.database_error(e);
                return None;
            }
        };
        // The claim's rows first: the probe ran after the claim.
        let was = self.floor.floor();
        if let Some(last) = rows.last() {
            self.floor.claimed(last.id);
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
        self.shared_floor
            .publish(&lease.partitions, self.floor.floor());
        let last = rows.last()?;
        self.ledger.claimed(window, last.id);
        Some(rows)
    }
}
