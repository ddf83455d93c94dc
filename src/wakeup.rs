//! How the relay loop is woken (by a notification from the database, by the
//! control task's heartbeat finding due rows, or by a lease change), and when
//! it asks for notifications at all.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

/// A latch plus a notification: a wake-up that arrives while the loop is busy
/// is remembered and makes its next turn claim.
#[derive(Default)]
pub struct Wakeup {
    pending: AtomicBool,
    notify: Notify,
}

impl Wakeup {
    pub fn wake(&self) {
        self.pending.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// Whether a wake-up arrived since the last call.
    pub fn take(&self) -> bool {
        self.pending.swap(false, Ordering::AcqRel)
    }

    /// Resolves at the next wake-up (or at once for one not yet waited on).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

/// A relay woken this soon after it began to wait is under steady load: it
/// stops asking for notifications (each makes an application's commit take
/// PostgreSQL's database-wide notify lock) and polls instead.
const HOT_GAP: Duration = Duration::from_millis(10);
/// Polling finds nothing for this long: the relay asks for notifications again.
const LINGER: Duration = Duration::from_millis(50);
/// Gaps between polls: short while rows keep coming, doubling while none do.
const MIN_POLL_GAP: Duration = Duration::from_millis(1);
const MAX_POLL_GAP: Duration = Duration::from_millis(8);

/// What a relay with nothing to do does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Wait for a notification (its flag says it waits).
    Wait,
    /// Claim again after this gap (or at a wake-up, whichever is first).
    PollAfter(Duration),
    /// Flag itself idle, then claim once more (for rows whose transactions
    /// saw the flag clear) before waiting.
    FlagIdle,
}

/// When the relay asks applications to notify it, and when it polls instead.
/// Only decides; the driver tells the database and waits.
#[derive(Debug)]
pub struct IdlePolicy {
    /// What the database was last told (None: unknown, e.g. after a reconnect).
    flagged: Option<bool>,
    /// How long the last wait for a notification lasted.
    woken_after: Option<Duration>,
    /// Polling without finding anything since then.
    quiet_since: Option<Instant>,
    gap: Duration,
}

impl Default for IdlePolicy {
    fn default() -> Self {
        Self {
            flagged: None,
            woken_after: None,
            quiet_since: None,
            gap: MIN_POLL_GAP,
        }
    }
}

impl IdlePolicy {
    /// What the database was last told: does this relay wait for a NOTIFY?
    pub fn flagged(&self) -> Option<bool> {
        self.flagged
    }

    pub fn set_flagged(&mut self, idle: bool) {
        self.flagged = Some(idle);
        if idle {
            self.woken_after = None;
        }
    }

    /// What the row says is unknown: a new database session, an update that
    /// failed, or leases that moved (the row may have been made anew).
    pub fn forget(&mut self) {
        self.flagged = None;
    }

    /// Nothing in flight and the last claim found nothing.
    pub fn nothing_to_do(&mut self) -> Next {
        if self.flagged == Some(true) {
            return Next::Wait;
        }
        let quiet = *self.quiet_since.get_or_insert_with(Instant::now);
        if quiet.elapsed() < LINGER {
            let gap = self.gap;
            self.gap = (gap * 2).min(MAX_POLL_GAP);
            Next::PollAfter(gap)
        } else {
            Next::FlagIdle
        }
    }

    /// A wait for a notification ended after `waited`.
    pub fn woken(&mut self, waited: Duration) {
        self.woken_after = Some(waited);
    }

    /// A claim found rows. True when the relay should clear its flag: it was
    /// woken right after it began to wait, so rows come steadily.
    pub fn found_rows(&mut self) -> bool {
        self.quiet_since = None;
        self.gap = MIN_POLL_GAP;
        self.flagged != Some(false) && self.woken_after.take().is_none_or(|d| d < HOT_GAP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_busy_relay_polls_then_flags_itself_idle_after_the_linger() {
        let mut p = IdlePolicy::default();
        p.set_flagged(false);
        assert_eq!(p.nothing_to_do(), Next::PollAfter(MIN_POLL_GAP));
        assert_eq!(p.nothing_to_do(), Next::PollAfter(MIN_POLL_GAP * 2));
        for _ in 0..10 {
            assert!(matches!(p.nothing_to_do(), Next::PollAfter(g) if g <= MAX_POLL_GAP));
        }
        tokio::time::advance(LINGER).await;
        assert_eq!(p.nothing_to_do(), Next::FlagIdle);
        p.set_flagged(true);
        assert_eq!(p.nothing_to_do(), Next::Wait);
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_relay_woken_at_once_stops_asking_for_notifications() {
        let mut p = IdlePolicy::default();
        p.set_flagged(true);
        p.woken(Duration::from_millis(500));
        assert!(!p.found_rows(), "a quiet stream keeps its notifications");
        p.woken(Duration::from_millis(2));
        assert!(p.found_rows(), "rows at once after waiting: steady load");
        p.set_flagged(false);
        assert!(!p.found_rows(), "already polling");
    }

    #[tokio::test(start_paused = true)]
    async fn rows_found_while_polling_restart_the_linger() {
        let mut p = IdlePolicy::default();
        p.set_flagged(false);
        let _ = p.nothing_to_do();
        tokio::time::advance(LINGER).await;
        let _ = p.found_rows();
        assert_eq!(p.nothing_to_do(), Next::PollAfter(MIN_POLL_GAP));
    }
}
