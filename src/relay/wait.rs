//! Waiting when there is nothing to do: for a wakeup, a lease change or stop;
//! the idle flag that says whether the relay waits for notifications.

use std::time::Duration;

use tokio::time::Instant;

use super::Relay;
use crate::{publisher::Publisher, store::Store, wakeup::Next};

/// Longest idle wait without a wakeup (the loop's liveness beat for /healthz).
const IDLE_BEAT: Duration = Duration::from_secs(10);
/// After a failed update of the idle flag, the relay waits this long before
/// the next attempt (the heartbeat's poll period: no row waits longer).
const FLAG_RETRY: Duration = Duration::from_secs(1);

impl Relay {
    /// Nothing in flight and nothing claimed. Under steady load the relay polls
    /// (its flag says so, and applications' commits carry no NOTIFY); once
    /// polls find nothing for a while it flags itself idle, claims once more
    /// (for rows committed while the flag was changing) and waits.
    pub(super) async fn wait_for_work(&mut self, blocked: bool) {
        if !self.cfg.listen {
            // Nobody listens: the heartbeat is the poll, notifications are waste.
            if self.idle.flagged() != Some(false) {
                self.flag_idle(false).await;
            }
            self.idle().await;
            return;
        }
        let next = if blocked || self.stopping() {
            Next::Wait
        } else {
            self.idle.nothing_to_do()
        };
        match next {
            Next::Wait => {
                let started = Instant::now();
                self.idle().await;
                self.idle.woken(started.elapsed());
            }
            Next::PollAfter(gap) => {
                let wake = self.wakeup.clone();
                tokio::select! {
                    _ = tokio::time::sleep(gap) => {}
                    _ = wake.notified() => {}
                    _ = self.stop.changed() => {}
                }
                self.more = true;
            }
            Next::FlagIdle => {
                self.flag_idle(true).await;
                self.more = true;
            }
        }
    }

    /// Waits for a wakeup (NOTIFY, or the control task's heartbeat finding due
    /// rows: that heartbeat is the poll), a lease change or stop. A timeout only
    /// turns the loop once, to keep /healthz fed.
    async fn idle(&mut self) {
        let wake = self.wakeup.clone();
        let store_closed = self.store.as_ref().map(Store::closed);
        let broker_trouble = self.publisher.as_ref().map(Publisher::trouble);
        tokio::select! {
            _ = wake.notified() => {}
            // Readiness must drop when the database goes, even while idle.
            _ = async { match store_closed { Some(c) => c.await, None => std::future::pending().await } } => {}
            // And when the broker connection goes: the relay notices at once,
            // so the hand-off's clock starts with the loss, not the next beat.
            _ = async { match broker_trouble { Some(t) => t.await, None => std::future::pending().await } } => {}
            // Only feeds /healthz: the heartbeat is the poll, so no claim here.
            _ = tokio::time::sleep(IDLE_BEAT) => return,
            _ = self.stop.changed() => {}
            // Leases moved: this relay may have been away past its ttl (frozen,
            // cut off) and its row removed and made anew, not waiting. Say
            // again whether it waits.
            _ = self.leases.changed() => self.idle.forget(),
        }
        self.more = true;
    }

    /// Tells the database whether this relay waits for notifications. Only
    /// what the database took is recorded: after a failure the flag is
    /// unknown and said again on a later turn, after a pause (the heartbeat
    /// still polls meanwhile, so no row waits for it; the loop never spins).
    pub(super) async fn flag_idle(&mut self, idle: bool) {
        let Some(store) = &self.store else { return };
        match store.set_idle(&self.cfg.instance_id, idle).await {
            Ok(()) => self.idle.set_flagged(idle),
            Err(e) => {
                self.idle.forget();
                self.database_error(e);
                self.pause(FLAG_RETRY).await;
            }
        }
    }

    pub(super) async fn pause(&mut self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.stop.changed() => {}
        }
    }
}
