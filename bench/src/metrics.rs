//! The relay's metrics text (Prometheus exposition): plain samples and the
//! claim statement histogram.

use crate::results::ClaimStats;

/// The relay's histogram of claim statement durations.
pub(crate) const CLAIM_HISTOGRAM: &str = "outbox_relay_claim_duration_seconds";

/// A plain (unlabelled) sample's value.
pub(crate) fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// (le, cumulative count) of a histogram, in le order.
pub(crate) fn histogram_buckets(text: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, u64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, rest) = rest.split_once("\"}")?;
            let count = rest.split_whitespace().next()?.parse::<f64>().ok()?;
            Some((le.parse().ok()?, count as u64))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

pub(crate) struct HistQ {
    pub(crate) count: u64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max_le: f64,
}

/// Quantiles of the observations made between two scrapes, interpolated
/// linearly inside buckets (the way Prometheus' histogram_quantile does).
pub(crate) fn hist_quantiles(before: &[(f64, u64)], after: &[(f64, u64)]) -> Option<HistQ> {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .map(|&(le, c)| {
            let b = before.iter().find(|(l, _)| *l == le).map_or(0, |&(_, c)| c);
            (le, c.saturating_sub(b))
        })
        .collect();
    let total = delta.last()?.1;
    if total == 0 {
        return None;
    }
    let q = |q: f64| {
        let rank = q * total as f64;
        let mut prev_le = 0.0;
        let mut prev_c = 0u64;
        for &(le, c) in &delta {
            if c as f64 >= rank {
                if le.is_infinite() {
                    return prev_le;
                }
                let in_bucket = (c - prev_c) as f64;
                let frac = if in_bucket > 0.0 {
                    (rank - prev_c as f64) / in_bucket
                } else {
                    1.0
                };
                return prev_le + (le - prev_le) * frac;
            }
            prev_le = le;
            prev_c = c;
        }
        prev_le
    };
    let max_le = delta
        .iter()
        .find(|(_, c)| *c == total)
        .map_or(f64::INFINITY, |&(le, _)| le);
    Some(HistQ {
        count: total,
        p50: q(0.50),
        p99: q(0.99),
        max_le,
    })
}

/// The claim statements run between two scrapes (`before` may be empty: since
/// the relay started).
pub(crate) fn claim_stats(before: &str, after: &str) -> Option<ClaimStats> {
    let b = histogram_buckets(before, CLAIM_HISTOGRAM);
    let a = histogram_buckets(after, CLAIM_HISTOGRAM);
    let h = hist_quantiles(&b, &a)?;
    let delta = |le: f64| {
        let of = |v: &[(f64, u64)]| v.iter().find(|(l, _)| *l == le).map_or(0, |&(_, c)| c);
        of(&a).saturating_sub(of(&b))
    };
    let last_finite = a
        .iter()
        .rev()
        .find(|(le, _)| le.is_finite())
        .map_or(f64::NAN, |&(le, _)| le);
    Some(ClaimStats {
        count: h.count,
        p50_ms: h.p50 * 1000.0,
        p99_ms: h.p99 * 1000.0,
        max_le_ms: h.max_le * 1000.0,
        last_bucket_ms: last_finite * 1000.0,
        beyond_last_bucket: delta(f64::INFINITY).saturating_sub(delta(last_finite)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_interpolate_within_buckets() {
        let before = vec![(0.001, 0), (0.002, 0), (0.004, 0), (f64::INFINITY, 0)];
        let after = vec![(0.001, 50), (0.002, 90), (0.004, 100), (f64::INFINITY, 100)];
        let h = hist_quantiles(&before, &after).unwrap();
        assert_eq!(h.count, 100);
        assert!((h.p50 - 0.001).abs() < 1e-9, "{}", h.p50);
        assert!((h.p99 - 0.0038).abs() < 1e-9, "{}", h.p99);
        assert_eq!(h.max_le, 0.004);
    }

    #[test]
    fn claims_beyond_the_last_bucket_are_counted() {
        let before = "outbox_relay_claim_duration_seconds_bucket{le=\"0.0001\"} 1\n\
                      outbox_relay_claim_duration_seconds_bucket{le=\"13.1072\"} 2\n\
                      outbox_relay_claim_duration_seconds_bucket{le=\"+Inf\"} 2\n";
        let after = "outbox_relay_claim_duration_seconds_bucket{le=\"0.0001\"} 90\n\
                     outbox_relay_claim_duration_seconds_bucket{le=\"13.1072\"} 101\n\
                     outbox_relay_claim_duration_seconds_bucket{le=\"+Inf\"} 102\n";
        let c = claim_stats(before, after).unwrap();
        assert_eq!(c.count, 100);
        assert_eq!(c.beyond_last_bucket, 1);
        assert!(c.max_le_ms.is_infinite());
        assert!((c.last_bucket_ms - 13107.2).abs() < 1e-6);
        assert!(claim_stats(after, after).is_none());
    }

    #[test]
    fn metrics_text_is_parsed() {
        let text = "# TYPE x histogram\nx_bucket{le=\"0.001\"} 3\nx_bucket{le=\"+Inf\"} 4\nx_count 4\nouts 7\nout 2\n";
        assert_eq!(
            histogram_buckets(text, "x"),
            vec![(0.001, 3), (f64::INFINITY, 4)]
        );
        assert_eq!(metric(text, "out"), Some(2.0));
    }
}
