//! Backlog statistics, retention and the claim floor's sweep, on a connection
//! of their own: none may ever delay a lease renewal or a claim.

use std::{sync::Arc, time::Duration};

use tokio::{sync::watch, time::Instant};

use crate::{
    backoff,
    config::RelayConfig,
    metrics::{Metrics, Peer},
    store::{self, floor::SWEEP_EVERY, Housekeeping, Session, SharedFloor},
    wakeup::Wakeup,
};

/// Backlog statistics are refreshed this often while rows are pending or
/// flowing, and this seldom when the outbox is empty and nothing happens (an
/// idle relay costs the database next to nothing).
const STATS_EVERY: Duration = Duration::from_secs(5);
const STATS_IDLE_EVERY: Duration = Duration::from_secs(60);
/// Statistics take at most about this share of the time: they count pending
/// rows through the pending index, and while a snapshot held elsewhere keeps
/// every relayed row's dead entry there, one reading can take a second. Then
/// they are refreshed less often (the gauges' freshness follows).
const STATS_SHARE: u32 = 10;

/// The interval `every`, stretched so that work taking `took` fills at most
/// `1 / STATS_SHARE` of the time.
fn spaced(every: Duration, took: Duration) -> Duration {
    every.max(took * STATS_SHARE)
}
/// A reading is exported until its next refresh is this late, then it is
/// dropped: a silent database (no reset, no answer) must not leave a stale
/// backlog, or an age growing from a stale `created_at`, on /metrics.
const STATS_SLACK: Duration = Duration::from_secs(15);
/// Retention deletes at most this many rows per statement.
const RETENTION_BATCH: i64 = 1000;
/// Time one retention pass may take before statistics get their turn.
const RETENTION_BUDGET: Duration = Duration::from_secs(2);
/// Retention runs this often while rows are being published (at once after a
/// full batch), and at least this seldom when idle, for rows that age out later.
const RETENTION_BUSY_EVERY: Duration = Duration::from_secs(10);
const RETENTION_IDLE_EVERY: Duration = Duration::from_secs(600);

pub struct HousekeepingTask {
    pub cfg: RelayConfig,
    pub metrics: Arc<Metrics>,
    pub stop: watch::Receiver<bool>,
    /// The relay loop's claim floor: the sweep looks below it.
    pub floor: Arc<SharedFloor>,
    /// Wakes the relay loop for a row the sweep found below its floor.
    pub wakeup: Arc<Wakeup>,
}

impl HousekeepingTask {
    pub async fn run(mut self) {
        let mut delays = None;
        while !*self.stop.borrow() {
            let started = Instant::now();
            if let Err(e) = self.session().await {
                // What this relay cannot read it does not export.
                self.metrics.clear_backlog();
                if started.elapsed() > STATS_EVERY {
                    delays = None;
                }
                let delay = backoff::next_delay(&mut delays);
                tracing::warn!(error = %e, retry_in = ?delay, "housekeeping connection failed");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.stop.changed() => {}
                }
            }
        }
    }

    /// One connection's life. Ok(()) when asked to stop.
    async fn session(&mut self) -> Result<(), store::StoreError> {
        let connected =
            Session::connect(&self.cfg.conn.database_url, "outbox-relay housekeeping").await;
        self.metrics
            .connection_attempt(Peer::Database, connected.is_ok());
        let session = connected?;
        self.converse(&session).await
    }

    async fn converse(&mut self, session: &Session) -> Result<(), store::StoreError> {
        let statements = Housekeeping::prepare(session, &self.cfg.conn.schema).await?;
        let mut retention = RetentionClock::default();
        // When, what had been published then, what was pending, how long
        // the reading took.
        let mut last_stats: Option<(Instant, u64, i64, Duration)> = None;
        let mut next_sweep = Instant::now();
        loop {
            if Instant::now() >= next_sweep {
                let started = Instant::now();
                self.sweep(session, &statements).await?;
                // Like the statistics: at most a tenth of the time.
                next_sweep = Instant::now() + spaced(SWEEP_EVERY, started.elapsed());
            }
            let published = self.metrics.published.get();
            // A closed connection is found by the next statement, at once.
            let stale = session.is_closed()
                || last_stats.is_none_or(|(at, seen, pending, took)| {
                    let since = at.elapsed();
                    since >= spaced(STATS_IDLE_EVERY, took)
                        || (since >= spaced(STATS_EVERY, took)
                            && (pending > 0 || seen != published))
                });
            if stale {
                let started = Instant::now();
                let stats = statements.backlog(session).await?;
                let took = started.elapsed();
                // Refreshed within STATS_EVERY while rows are pending or
                // flowing (unless a reading takes longer than its share).
                let next = spaced(
                    if stats.pending > 0 {
                        STATS_EVERY
                    } else {
                        STATS_IDLE_EVERY
                    },
                    took,
                );
                self.metrics.set_backlog(
                    stats.pending,
                    stats.oldest_pending_created_at,
                    stats.dead_lettered,
                    next + STATS_SLACK,
                );
                last_stats = Some((Instant::now(), published, stats.pending, took));
            }
            if !self.cfg.retention.is_zero() && retention.due(self.metrics.published.get()) {
                // Batch after batch (short locks each) until caught up or the
                // budget is spent, so deletion keeps pace with publishing.
                let budget = Instant::now() + RETENTION_BUDGET;
                let full = loop {
                    let deleted = statements
                        .delete_expired(session, self.cfg.retention, RETENTION_BATCH)
                        .await?;
                    self.metrics.deleted.inc_by(deleted);
                    let full = deleted as i64 == RETENTION_BATCH;
                    if !full || Instant::now() >= budget {
                        break full;
                    }
                };
                retention.ran(self.metrics.published.get(), full);
                if full {
                    continue;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(STATS_EVERY / 5) => {}
                _ = self.stop.changed() => return Ok(()),
            }
        }
    }

    /// Rows made pending again below the relay's claim floor (`replay`,
    /// `dead-letters retry`, an operator's UPDATE): the first due one lowers
    /// the floor, and the relay loop is woken for it.
    async fn sweep(
        &self,
        session: &Session,
        statements: &Housekeeping,
    ) -> Result<(), store::StoreError> {
        let (partitions, floor) = self.floor.get();
        if partitions.is_empty() || floor == 0 {
            // Nothing leased yet, or claims already start at the beginning.
            return Ok(());
        }
        if let Some(id) = statements.first_due(session, &partitions).await? {
            if self.floor.found_due(&partitions, id) {
                tracing::debug!(id, floor, "a due row lies below the claim floor");
                self.wakeup.wake();
            }
        }
        Ok(())
    }
}

/// When the next retention pass is worth a statement.
#[derive(Default)]
struct RetentionClock {
    last: Option<(Instant, u64)>,
    full_batch: bool,
}

impl RetentionClock {
    fn due(&self, published: u64) -> bool {
        match self.last {
            None => true,
            Some(_) if self.full_batch => true,
            Some((at, seen)) => {
                let since = at.elapsed();
                since >= RETENTION_IDLE_EVERY
                    || (seen != published && since >= RETENTION_BUSY_EVERY)
            }
        }
    }

    fn ran(&mut self, published: u64, full_batch: bool) {
        self.last = Some((Instant::now(), published));
        self.full_batch = full_batch;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retention_runs_when_rows_flow_and_rarely_when_idle() {
        let mut clock = RetentionClock::default();
        assert!(clock.due(0), "first pass at start");
        clock.ran(0, false);
        tokio::time::advance(RETENTION_BUSY_EVERY).await;
        assert!(!clock.due(0), "idle: nothing new published");
        assert!(clock.due(5), "rows were published since");
        clock.ran(5, true);
        assert!(clock.due(5), "a full batch means more to delete");
        clock.ran(5, false);
        tokio::time::advance(RETENTION_IDLE_EVERY).await;
        assert!(clock.due(5), "idle relays still expire old rows");
    }
}
