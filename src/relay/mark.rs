//! Marks and failures: acked ids marked published (or deleted), failures
//! recorded (retried later or parked). The marks usually ride with the next
//! claim (`claim.rs`); these write them when no claim follows.

use super::Relay;

impl Relay {
    /// Records the failures owed, if any. Returns false when they could not
    /// be written.
    pub(super) async fn record_failures(&mut self) -> bool {
        if self.ledger.failures().is_empty() {
            return true;
        }
        let Some(store) = &self.store else {
            return false;
        };
        match store
            .record_failures(self.ledger.failures(), self.cfg.max_attempts)
            .await
        {
            Ok(parked) => {
                self.ledger.failures_recorded(&parked);
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
        if self.ledger.nothing_to_write() {
            return true;
        }
        if !self.record_failures().await {
            return false;
        }
        let Some(store) = &self.store else {
            return false;
        };
        let keep = !self.cfg.retention.is_zero();
        match store.mark_published(self.ledger.marks(), keep).await {
            Ok(_) => {
                self.ledger.marks_written(!keep);
                true
            }
            Err(e) => {
                self.database_error(e);
                false
            }
        }
    }
}
