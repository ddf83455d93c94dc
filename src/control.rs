//! The control connection: LISTEN for new rows, the heartbeat that renews
//! leases and doubles as the fallback poll, due-time timers, and retention.
//! Kept apart from the hot path so a slow claim never delays a lease renewal.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use tokio::{sync::watch, time::Instant};
use tokio_postgres::{AsyncMessage, Client};

use crate::{
    config::RelayConfig,
    leases::{LeaseState, LEASE_TTL, RENEW_EVERY},
    metrics::Metrics,
    migrations,
    relay::{self, Wakeup},
    store::{self, Control},
};

/// Backlog statistics are refreshed every this many heartbeats.
const STATS_EVERY: u32 = 5;
/// Retention deletes at most this many rows per statement.
const RETENTION_BATCH: i64 = 1000;
/// Time retention may take per heartbeat tick (ticks are 1 s; leases last 5 s).
const RETENTION_BUDGET: Duration = Duration::from_millis(300);
/// Retention runs this often while rows are being published (at once after a
/// full batch), and at least this seldom when idle, for rows that age out later.
const RETENTION_BUSY_EVERY: Duration = Duration::from_secs(10);
const RETENTION_IDLE_EVERY: Duration = Duration::from_secs(600);

pub struct ControlTask {
    pub cfg: RelayConfig,
    pub metrics: Arc<Metrics>,
    pub leases: watch::Sender<LeaseState>,
    pub wakeup: Arc<Wakeup>,
    pub stop: watch::Receiver<bool>,
}

impl ControlTask {
    pub async fn run(mut self) {
        let mut backoff = None;
        while !*self.stop.borrow() {
            let started = Instant::now();
            match self.session().await {
                Ok(()) => return,
                Err(e) => {
                    // A session that lasted a while earned a fresh, short backoff.
                    if started.elapsed() > LEASE_TTL {
                        backoff = None;
                    }
                    let delay = relay::next_delay(&mut backoff);
                    tracing::warn!(error = %e, retry_in = ?delay, "control connection failed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.stop.changed() => {}
                    }
                }
            }
        }
    }

    /// One connection's life. Ok(()) when asked to stop.
    async fn session(&mut self) -> Result<(), String> {
        let (client, mut connection) =
            store::connect_raw(&self.cfg.conn.database_url, "outbox-relay control")
                .await
                .map_err(|e| e.to_string())?;
        let (closed_tx, mut closed_rx) = watch::channel(false);
        let wakeup = self.wakeup.clone();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => wakeup.wake(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "control connection error");
                        break;
                    }
                }
            }
            let _ = closed_tx.send(true);
        });
        let result = self.converse(&client, &mut closed_rx).await;
        driver.abort();
        result
    }

    async fn converse(
        &mut self,
        client: &Client,
        closed: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let schema = self.cfg.conn.schema.clone();
        client
            .batch_execute(&store::server_statement_timeout())
            .await
            .map_err(|e| format!("setting statement_timeout: {e}"))?;
        migrations::verify(client, &schema)
            .await
            .map_err(|e| e.to_string())?;
        let statements = Control::prepare(client, &schema)
            .await
            .map_err(|e| e.to_string())?;
        if self.cfg.listen {
            client
                .batch_execute(&format!("LISTEN \"{schema}.messages\""))
                .await
                .map_err(|e| format!("LISTEN failed: {e}"))?;
        }
        // Anything inserted while we were away gets no notification: poll once.
        self.wakeup.wake();
        let tick = self.cfg.poll_interval.min(RENEW_EVERY);
        let mut beats: u32 = 0;
        let mut retention = RetentionClock::default();
        loop {
            let started = Instant::now();
            let beat = statements
                .heartbeat(
                    client,
                    &self.cfg.instance_id,
                    LEASE_TTL,
                    beats.is_multiple_of(STATS_EVERY),
                )
                .await
                .map_err(|e| e.to_string())?;
            beats = beats.wrapping_add(1);
            self.metrics
                .partitions_owned
                .set(beat.partitions.len() as i64);
            let lease = LeaseState::renewed(beat.partitions, started);
            // Renewals only move the deadline; the relay is woken for new partitions.
            let partitions_changed = self.leases.send_if_modified(|current| {
                let changed = current.partitions != lease.partitions;
                *current = lease;
                changed
            });
            if partitions_changed {
                tracing::info!(partitions = ?self.leases.borrow().partitions, "partition leases changed");
                self.wakeup.wake();
            }
            if let Some(stats) = beat.stats {
                self.metrics.set_backlog(
                    stats.pending,
                    stats.oldest_pending_created_at,
                    stats.dead_lettered,
                );
            }
            let mut sleep_for = tick.saturating_sub(started.elapsed());
            match beat.next_due_in {
                Some(due) if due <= 0.0 => self.wakeup.wake(),
                Some(due) => sleep_for = sleep_for.min(Duration::from_secs_f64(due)),
                None => {}
            }

            if !self.cfg.retention.is_zero() && retention.due(self.metrics.published.get()) {
                // Batch after batch (short locks each) until caught up or the
                // budget is spent, so deletion keeps pace with publishing and
                // the next lease renewal is never late.
                let budget = Instant::now() + RETENTION_BUDGET;
                let full = loop {
                    let deleted = statements
                        .delete_expired(client, self.cfg.retention, RETENTION_BATCH)
                        .await
                        .map_err(|e| e.to_string())?;
                    self.metrics.deleted.inc_by(deleted);
                    let full = deleted as i64 == RETENTION_BATCH;
                    if !full || Instant::now() >= budget {
                        break full;
                    }
                };
                retention.ran(self.metrics.published.get(), full);
            }

            tokio::select! {
                _ = tokio::time::sleep(sleep_for) => {}
                _ = self.stop.changed() => return Ok(()),
                _ = closed.changed() => return Err("control connection closed".into()),
            }
            // A timer for a due row fired: wake the relay for it.
            if beat
                .next_due_in
                .is_some_and(|d| d > 0.0 && d <= sleep_for.as_secs_f64() + 0.001)
            {
                self.wakeup.wake();
            }
        }
    }
}

/// Hands this instance's leases back so successors need not wait for the ttl.
pub async fn release_leases(cfg: &RelayConfig) -> Result<(), store::StoreError> {
    let (client, task) = store::connect(&cfg.conn.database_url, "outbox-relay release").await?;
    let statements = Control::prepare(&client, &cfg.conn.schema).await?;
    let result = statements.release(&client, &cfg.instance_id).await;
    task.abort();
    result
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
