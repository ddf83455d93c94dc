//! Delays: reconnecting to a side that is down, and retrying a failed row.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Reconnect backoff: 100ms doubling to 3s, with jitter, forever. Short enough
/// that a restarted broker or database is back in use within seconds; the
/// jitter keeps a fleet of relays from reconnecting in lockstep.
pub fn next_delay(state: &mut Option<backon::ExponentialBackoff>) -> Duration {
    state
        .get_or_insert_with(|| {
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(3))
                .with_jitter()
                .without_max_times()
                .build()
        })
        .next()
        .unwrap_or(Duration::from_secs(3))
}

/// After a statement of the relay loop failed (a revoked privilege, a value
/// the server refuses): 200ms doubling to 10s, with jitter, so a statement
/// that keeps failing runs a few times a minute instead of in a tight loop.
pub fn next_statement_delay(state: &mut Option<backon::ExponentialBackoff>) -> Duration {
    state
        .get_or_insert_with(|| {
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(10))
                .with_jitter()
                .without_max_times()
                .build()
        })
        .next()
        .unwrap_or(Duration::from_secs(10))
}

/// Delay before a failed row's next attempt: exponential from 1s, capped at
/// 5 minutes, with jitter so a burst of failures does not retry in lockstep.
pub fn retry_delay(attempts_before: i32) -> Duration {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(300))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(attempts_before.clamp(0, 30) as usize)
        .unwrap_or(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_and_stay_bounded() {
        let first = retry_delay(0);
        assert!(
            first >= Duration::from_secs(1) && first <= Duration::from_secs(2),
            "{first:?}"
        );
        let fifth = retry_delay(4);
        assert!(fifth >= Duration::from_secs(16), "{fifth:?}");
        let late = retry_delay(1000);
        assert!(late <= Duration::from_secs(600), "{late:?}");
    }

    /// A failing hot-path statement never spins: its retries start at 200 ms,
    /// double to 10 s (jitter adds up to as much again), and two relays
    /// failing together do not retry in lockstep.
    #[test]
    fn failing_statements_back_off_with_jitter_up_to_ten_seconds() {
        let runs: Vec<Vec<Duration>> = (0..8)
            .map(|_| {
                let mut state = None;
                (0..12).map(|_| next_statement_delay(&mut state)).collect()
            })
            .collect();
        for run in &runs {
            assert!(
                run[0] >= Duration::from_millis(200) && run[0] < Duration::from_millis(400),
                "{run:?}"
            );
            assert!(run[11] >= Duration::from_secs(10), "{run:?}");
            assert!(run.iter().all(|d| *d < Duration::from_secs(20)), "{run:?}");
        }
        assert!(
            runs.windows(2).any(|w| w[0] != w[1]),
            "eight runs drew the very same delays: no jitter"
        );
    }

    #[test]
    fn reconnect_delays_stay_within_three_seconds() {
        let mut state = None;
        for _ in 0..50 {
            assert!(next_delay(&mut state) <= Duration::from_secs(6));
        }
    }
}
