//! The claim floor: an id below which none of this relay's rows can still
//! become claimable, so the claim's index scans start past the rows already
//! relayed. Marking a row leaves a dead entry in the pending index until
//! VACUUM removes it, and a snapshot held anywhere in the cluster stops VACUUM
//! (and the index's own kill hints): without a floor every claim walks them all.
//!
//! Ids come from a sequence and a transaction that took a low id may commit
//! after a higher one, so the floor only moves in two steps:
//!
//! 1. A probe (one statement: one snapshot, then the lock table) reads the
//!    first pending id of this relay's partitions from the floor up to one
//!    past the highest id claimed so far (every lower id was drawn before
//!    that claim's snapshot), and the transactions that hold a write lock on
//!    the outbox table. That id (or, with none, the bound) becomes a
//!    candidate, waiting for those transactions.
//! 2. Once a probe no longer sees any of them, every id below the candidate
//!    belongs to a transaction that has ended (the lock is taken before the
//!    id is drawn and kept to the transaction's end), so the next probe's
//!    snapshot sees all of them: the floor becomes the least of the candidate
//!    and that probe's first pending id.
//!
//! Transaction ids would not do: an INSERT draws its id before it is given a
//! transaction id, so a transaction can hold a low id unseen by a snapshot
//! that still counts it as not started.
//!
//! Rows can become pending again below the floor (`replay`, `dead-letters
//! retry`, an operator's UPDATE): the housekeeping connection looks for the
//! first due row from the start of the table (a sweep) every [`SWEEP_EVERY`];
//! one below the floor lowers it ([`SharedFloor`]). The sweep's walk over the
//! dead entries of relayed rows thus runs on the connection for slow work,
//! never in a claim nor in a lease renewal. The control task's heartbeat (the
//! fallback poll) looks for due rows from the floor.
//! The floor is reset whenever the relay's partitions change and on reconnect.
//! Pure logic; the statements are in `store.rs` and `store/control.rs`.

use std::sync::Mutex;

use tokio::time::{Duration, Instant};

/// At most this often a claim carries a probe.
pub const PROBE_EVERY: Duration = Duration::from_millis(200);
/// At least this often the housekeeping connection looks for due rows from
/// the start of the table (below the floor too), for rows made pending again
/// below it.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// What one probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The floor the probe searched from.
    pub from: i64,
    /// Where it stopped: one past the highest id claimed so far.
    pub upto: i64,
    /// The first pending id (due or not) of the relay's partitions in
    /// `from..upto`, in the probe's snapshot.
    pub first_pending: Option<i64>,
    /// Transactions (virtual ids) holding a write lock on the outbox table,
    /// read after the snapshot was taken.
    pub writers: Vec<String>,
    /// The id sequence hands out ids from per-session caches: ids are then
    /// not drawn in time order and no floor is safe.
    pub ids_cached: bool,
}

/// What the next claim does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloorPlan {
    /// The lowest id the claim looks at (0: everything).
    pub claim_from: i64,
    /// Run a probe from this floor beside the claim.
    pub probe_from: Option<i64>,
    /// The probe stops here: every lower id was drawn before a claim's
    /// snapshot, and the walk stays short when the relay's partitions have
    /// nothing pending among many other rows.
    pub probe_upto: i64,
}

#[derive(Debug)]
struct Candidate {
    id: i64,
    /// Writers seen by the candidate's probe and still seen since.
    waits_for: Vec<String>,
    /// A probe after the candidate's saw none of them.
    cleared: bool,
}

#[derive(Debug)]
pub struct ClaimFloor {
    floor: i64,
    partitions: Vec<i16>,
    /// Highest id any claim returned: every lower id was drawn before that
    /// claim's snapshot.
    max_seen: i64,
    candidate: Option<Candidate>,
    next_probe: Instant,
    /// The sequence caches ids: the floor stays 0.
    disabled: bool,
}

impl ClaimFloor {
    pub fn new(now: Instant) -> Self {
        Self {
            floor: 0,
            partitions: Vec::new(),
            max_seen: 0,
            candidate: None,
            next_probe: now,
            disabled: false,
        }
    }

    /// The floor now: no pending row of the relay's partitions lies below it
    /// except rows made pending again by hand.
    pub fn floor(&self) -> i64 {
        self.floor
    }

    /// Forgets the floor (a new connection): the next probes find it again.
    pub fn reset(&mut self) {
        self.floor = 0;
        self.candidate = None;
    }

    /// The plan for a claim of `partitions` starting now.
    pub fn plan(&mut self, partitions: &[i16], now: Instant) -> FloorPlan {
        if self.partitions != partitions {
            // Rows of a partition just taken were another relay's: its floor
            // says nothing about them.
            self.partitions = partitions.to_vec();
            self.reset();
        }
        let probe_from = (!self.disabled && now >= self.next_probe).then(|| {
            self.next_probe = now + PROBE_EVERY;
            self.floor
        });
        FloorPlan {
            claim_from: self.floor,
            probe_from,
            probe_upto: self.max_seen + 1,
        }
    }

    /// A claim returned rows up to `last`.
    pub fn claimed(&mut self, last: i64) {
        self.max_seen = self.max_seen.max(last);
    }

    /// A sweep found a row pending again below the floor: claims start from
    /// it until the probes move the floor past it again.
    pub fn lower_to(&mut self, id: i64) {
        if id < self.floor {
            self.floor = id;
            self.candidate = None;
        }
    }

    /// A probe's answer (the claim sent before it has been recorded).
    pub fn probed(&mut self, probe: Probe) {
        if probe.ids_cached {
            self.disabled = true;
            self.reset();
            return;
        }
        if probe.from != self.floor {
            // Measured from a floor since lowered or reset: not the first
            // pending id above the floor in force.
            self.candidate = None;
            return;
        }
        if let Some(candidate) = &mut self.candidate {
            if candidate.cleared {
                // Every transaction that could hold an id below the candidate
                // ended before this probe's snapshot: its rows are seen here.
                let floor = probe
                    .first_pending
                    .map_or(candidate.id, |first| first.min(candidate.id));
                self.floor = self.floor.max(floor);
                self.candidate = None;
            } else {
                candidate.waits_for.retain(|w| probe.writers.contains(w));
                candidate.cleared = candidate.waits_for.is_empty();
                return;
            }
        }
        let id = probe.first_pending.unwrap_or(probe.upto);
        if id > self.floor {
            let cleared = probe.writers.is_empty();
            self.candidate = Some(Candidate {
                id,
                waits_for: probe.writers,
                cleared,
            });
        }
    }
}

/// The floor as the relay loop last saw it, for the heartbeat and the
/// housekeeping sweep (on connections of their own), and the sweep's answer
/// back: the first due row pending below it.
#[derive(Debug, Default)]
pub struct SharedFloor {
    inner: Mutex<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    /// The partitions the floor is for (it says nothing about others).
    partitions: Vec<i16>,
    floor: i64,
    lower_to: Option<i64>,
}

impl SharedFloor {
    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        // Plain data, valid at every step: a panic elsewhere cannot break it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The relay loop's floor for `partitions`, after each claim.
    pub fn publish(&self, partitions: &[i16], floor: i64) {
        let mut s = self.shared();
        if s.partitions != partitions {
            s.partitions = partitions.to_vec();
            s.lower_to = None;
        }
        s.floor = floor;
    }

    /// The floor and the partitions it is for.
    pub fn get(&self) -> (Vec<i16>, i64) {
        let s = self.shared();
        (s.partitions.clone(), s.floor)
    }

    /// A sweep over `partitions` found due row `id` pending: below the floor
    /// for the same partitions, the relay lowers its floor to it.
    /// Returns whether it asked the relay to lower its floor.
    pub fn found_due(&self, partitions: &[i16], id: i64) -> bool {
        let mut s = self.shared();
        let below = s.partitions == partitions && id < s.floor;
        if below {
            s.lower_to = Some(s.lower_to.map_or(id, |l| l.min(id)));
        }
        below
    }

    /// Where the relay must lower its floor for `partitions`, once.
    pub fn take_lower(&self, partitions: &[i16]) -> Option<i64> {
        let mut s = self.shared();
        if s.partitions == partitions {
            s.lower_to.take()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(from: i64, first_pending: Option<i64>, writers: &[&str]) -> Probe {
        Probe {
            from,
            upto: 1_000,
            first_pending,
            writers: writers.iter().map(|w| w.to_string()).collect(),
            ids_cached: false,
        }
    }

    fn floor_at(now: Instant) -> ClaimFloor {
        let mut f = ClaimFloor::new(now);
        f.plan(&[0, 1], now);
        f
    }

    #[test]
    fn the_floor_moves_only_after_the_writers_seen_have_ended() {
        let now = Instant::now();
        let mut f = floor_at(now);
        f.probed(probe(0, Some(100), &["3/7", "4/9"]));
        assert_eq!(f.floor(), 0);
        // One writer still there: nothing moves.
        f.probed(probe(0, Some(120), &["4/9", "5/1"]));
        assert_eq!(f.floor(), 0);
        // Both gone in this probe's lock table (read after its snapshot): the
        // next probe's snapshot sees whatever they committed.
        f.probed(probe(0, Some(130), &["5/1"]));
        assert_eq!(f.floor(), 0);
        f.probed(probe(0, Some(140), &["5/1"]));
        assert_eq!(f.floor(), 100);
    }

    #[test]
    fn a_late_commit_below_the_candidate_keeps_the_floor_at_it() {
        let now = Instant::now();
        let mut f = floor_at(now);
        f.probed(probe(0, Some(100), &["3/7"]));
        f.probed(probe(0, Some(100), &[]));
        // The writer committed row 50 meanwhile: the floor stops at it.
        f.probed(probe(0, Some(50), &[]));
        assert_eq!(f.floor(), 50);
    }

    #[test]
    fn with_nothing_pending_the_floor_follows_the_highest_id_claimed() {
        let now = Instant::now();
        let mut f = floor_at(now);
        f.claimed(500);
        let plan = f.plan(&[0, 1], now + PROBE_EVERY);
        assert_eq!(plan.probe_upto, 501);
        let upto = |p: Probe| Probe { upto: 501, ..p };
        f.probed(upto(probe(0, None, &[])));
        f.probed(upto(probe(0, None, &[])));
        assert_eq!(f.floor(), 501);
        // Never lower than it was.
        f.probed(probe(501, Some(700), &[]));
        f.probed(probe(501, Some(700), &[]));
        assert_eq!(f.floor(), 700);
    }

    #[test]
    fn a_probe_from_another_floor_is_ignored() {
        let now = Instant::now();
        let mut f = floor_at(now);
        f.probed(probe(0, Some(100), &[]));
        f.probed(probe(0, Some(100), &[]));
        assert_eq!(f.floor(), 100);
        f.probed(probe(0, Some(300), &[]));
        f.probed(probe(0, Some(300), &[]));
        assert_eq!(f.floor(), 100);
    }

    #[test]
    fn new_partitions_and_reconnects_start_from_zero() {
        let now = Instant::now();
        let mut f = floor_at(now);
        f.probed(probe(0, Some(100), &[]));
        f.probed(probe(0, Some(100), &[]));
        assert_eq!(f.floor(), 100);
        let plan = f.plan(&[0, 1, 2], now + PROBE_EVERY);
        assert_eq!(plan.claim_from, 0);
        assert_eq!(plan.probe_from, Some(0));
        assert_eq!(f.floor(), 0);
        f.probed(probe(0, Some(100), &[]));
        f.probed(probe(0, Some(100), &[]));
        f.reset();
        assert_eq!(f.floor(), 0);
        // A cleared candidate is forgotten too.
        f.probed(probe(0, Some(100), &[]));
        assert_eq!(f.floor(), 0);
    }

    #[test]
    fn probes_are_spaced_and_claims_start_at_the_floor() {
        let now = Instant::now();
        let mut f = floor_at(now);
        f.probed(probe(0, Some(100), &[]));
        f.probed(probe(0, Some(100), &[]));
        let later = now + Duration::from_millis(10);
        let plan = f.plan(&[0, 1], later);
        assert_eq!(plan.probe_from, None, "probed at `now` already");
        assert_eq!(plan.claim_from, 100);
        let plan = f.plan(&[0, 1], now + PROBE_EVERY);
        assert_eq!(plan.probe_from, Some(100));
        // No claim sweeps: that walk is the housekeeping connection's.
        let plan = f.plan(&[0, 1], now + SWEEP_EVERY * 3);
        assert_eq!(plan.claim_from, 100);
    }

    #[test]
    fn a_sweep_that_finds_a_row_below_the_floor_lowers_it() {
        let now = Instant::now();
        let mut f = floor_at(now);
        f.probed(probe(0, Some(100), &[]));
        f.probed(probe(0, Some(100), &[]));
        let shared = SharedFloor::default();
        shared.publish(&[0, 1], f.floor());
        // A sweep over other partitions, or finding a row above the floor,
        // changes nothing.
        assert!(!shared.found_due(&[0, 1, 2], 40));
        assert!(!shared.found_due(&[0, 1], 140));
        assert_eq!(shared.take_lower(&[0, 1]), None);
        assert!(shared.found_due(&[0, 1], 40));
        assert!(shared.found_due(&[0, 1], 60));
        assert_eq!(shared.take_lower(&[0, 2]), None, "for other partitions");
        let lower = shared.take_lower(&[0, 1]).expect("asked to lower");
        assert_eq!(lower, 40);
        assert_eq!(shared.take_lower(&[0, 1]), None, "once");
        f.lower_to(lower);
        assert_eq!(f.floor(), 40);
        f.lower_to(70);
        assert_eq!(f.floor(), 40, "never raised by a sweep");
        // The probes move it on again once the row is relayed.
        let plan = f.plan(&[0, 1], now + PROBE_EVERY);
        assert_eq!(plan.claim_from, 40);
        f.probed(probe(40, Some(120), &[]));
        f.probed(probe(40, Some(120), &[]));
        assert_eq!(f.floor(), 120);
    }

    #[test]
    fn new_partitions_forget_what_the_sweep_asked() {
        let shared = SharedFloor::default();
        shared.publish(&[0, 1], 100);
        assert!(shared.found_due(&[0, 1], 40));
        shared.publish(&[0, 1, 2], 0);
        assert_eq!(shared.take_lower(&[0, 1, 2]), None);
        assert_eq!(shared.get(), (vec![0, 1, 2], 0));
    }

    #[test]
    fn a_cached_sequence_turns_the_floor_off() {
        let now = Instant::now();
        let mut f = floor_at(now);
        f.probed(probe(0, Some(100), &[]));
        f.probed(Probe {
            ids_cached: true,
            ..probe(0, Some(100), &[])
        });
        assert_eq!(f.floor(), 0);
        let plan = f.plan(&[0, 1], now + SWEEP_EVERY * 2);
        assert_eq!(plan.probe_from, None);
        assert_eq!(plan.claim_from, 0);
    }
}
