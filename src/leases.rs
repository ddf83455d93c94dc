//! What this relay may publish right now: its partitions and until when.

use std::time::Duration;

use tokio::time::Instant;

/// A lease not renewed within this long is free for another relay.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// Renewal period: several renewals fit in one ttl, so one slow call loses nothing.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// Stop publishing this long before the lease could lapse on the server, so a
/// successor never overlaps with us even with a slow clock or a late renewal.
pub const FENCING_MARGIN: Duration = Duration::from_millis(1500);
/// A relay without a RabbitMQ connection this long hands its partitions to
/// relays that can publish (a relay that holds none takes none meanwhile).
/// Long enough to ride out a reconnect or a move to the next node, which take
/// well under a second, without moving partitions.
pub const HANDOFF_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseState {
    /// Sorted partition numbers.
    pub partitions: Vec<i16>,
    /// Publishing these partitions is safe until then (renewal start + ttl - margin).
    pub valid_until: Option<Instant>,
}

impl LeaseState {
    pub fn renewed(mut partitions: Vec<i16>, renewal_started: Instant) -> Self {
        partitions.sort_unstable();
        Self {
            partitions,
            valid_until: Some(renewal_started + LEASE_TTL - FENCING_MARGIN),
        }
    }

    pub fn is_current(&self) -> bool {
        self.valid_until.is_some_and(|t| Instant::now() < t)
    }

    pub fn holds(&self, partition: i16) -> bool {
        self.is_current() && self.partitions.binary_search(&partition).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_only_held_until_its_fencing_deadline() {
        let lease = LeaseState::renewed(vec![3, 1, 2], Instant::now());
        assert!(lease.holds(1) && lease.holds(3));
        assert!(!lease.holds(4));
        tokio::time::advance(LEASE_TTL - FENCING_MARGIN - Duration::from_millis(10)).await;
        assert!(lease.holds(2));
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(
            !lease.holds(2),
            "must stop publishing before the server-side lease lapses"
        );
        assert!(!LeaseState::default().holds(0));
    }
}
