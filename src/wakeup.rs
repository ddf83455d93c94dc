//! How the relay loop is woken: by a notification from the database, by the
//! control task's heartbeat finding due rows, or by a lease change.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

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
