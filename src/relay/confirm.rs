//! Confirms: taken in publish order, each settled in the ledger; a confirm
//! that never comes means the channel is wedged.

use std::time::Duration;

use super::Relay;

/// A confirm that takes longer than this, with the broker not blocking us,
/// means the channel is wedged: drop it and publish again.
pub(super) const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

impl Relay {
    /// Takes every confirm that has already arrived, without waiting.
    pub(super) fn collect_ready(&mut self) {
        use futures_util::FutureExt;
        while let Some(confirm) = self.ledger.front_mut() {
            match confirm.now_or_never() {
                Some(answer) => self.ledger.settle_front(answer),
                None => break,
            }
        }
    }

    /// Waits (bounded) for the oldest in-flight confirm.
    pub(super) async fn await_front(&mut self, blocked: bool) {
        let Some(confirm) = self.ledger.front_mut() else {
            return;
        };
        match tokio::time::timeout(Duration::from_millis(500), confirm).await {
            Ok(answer) => {
                self.ledger.settle_front(answer);
                self.collect_ready();
            }
            Err(_)
                if !blocked
                    && self
                        .ledger
                        .front_sent_at()
                        .is_some_and(|t| t.elapsed() > CONFIRM_TIMEOUT) =>
            {
                tracing::warn!("no confirm for {CONFIRM_TIMEOUT:?}; reopening the connection");
                self.ledger.broker_fault(
                    &crate::publisher::BrokerFault::ConnectionLost {
                        reason: "confirm timed out".into(),
                    },
                    None,
                );
            }
            Err(_) => {}
        }
    }
}
