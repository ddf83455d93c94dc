//! A few log lines a minute per kind of error: a fault that repeats (a
//! revoked privilege, a broken row) must not flood the log, and the next line
//! that is written says how many like it were not.

use std::{collections::HashMap, time::Duration};

use tokio::time::Instant;

/// Lines of one kind written per window at most.
const LINES_PER_WINDOW: u32 = 3;
const WINDOW: Duration = Duration::from_secs(60);
/// Kinds remembered at most (a kind is a statement and a SQLSTATE: few).
const KINDS: usize = 64;

#[derive(Default)]
pub struct LogLimit {
    kinds: HashMap<String, Kind>,
}

struct Kind {
    window_start: Instant,
    written: u32,
    suppressed: u64,
}

impl LogLimit {
    /// `Some(n)` when a line of this kind may be written now, `n` being how
    /// many were suppressed since the last one written; `None`: suppress it.
    pub fn allow(&mut self, kind: &str) -> Option<u64> {
        let now = Instant::now();
        if self.kinds.len() >= KINDS && !self.kinds.contains_key(kind) {
            self.kinds
                .retain(|_, k| now.duration_since(k.window_start) < WINDOW);
        }
        let k = self.kinds.entry(kind.to_string()).or_insert(Kind {
            window_start: now,
            written: 0,
            suppressed: 0,
        });
        if now.duration_since(k.window_start) >= WINDOW {
            k.window_start = now;
            k.written = 0;
        }
        if k.written >= LINES_PER_WINDOW {
            k.suppressed += 1;
            return None;
        }
        k.written += 1;
        Some(std::mem::take(&mut k.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_repeating_error_is_written_a_few_times_a_minute_and_counted() {
        let mut limit = LogLimit::default();
        let written: Vec<_> = (0..1000)
            .filter_map(|_| limit.allow("claim:42501"))
            .collect();
        assert_eq!(written, vec![0, 0, 0]);
        // Another kind has its own allowance.
        assert_eq!(limit.allow("mark:22003"), Some(0));
        tokio::time::advance(WINDOW).await;
        assert_eq!(limit.allow("claim:42501"), Some(997));
        assert_eq!(limit.allow("claim:42501"), Some(0));
    }
}
