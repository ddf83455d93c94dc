//! Phase 7, scale-out: drain rate with one, two and three relays sharing one
//! outbox through partition leases.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::Bench;
use crate::{consumer::Consumer, results::ScaleRun};

/// A relay alone takes every partition; the others get their share within a
/// few lease ttls (5 s each).
const SPLIT_TIMEOUT: Duration = Duration::from_secs(60);
const PARTITIONS: i64 = 32;

impl Bench {
    /// `relays` relays on an empty schema; once they split the partitions
    /// fairly, one statement commits `messages` rows, and the run measures
    /// from that commit until the consumer saw every row.
    pub(crate) async fn scale_once(&self, relays: usize, run: usize) -> Result<ScaleRun> {
        let schema = format!("bench_scale_{relays}_{run}");
        self.fresh_schema(&self.db, &self.args.database_url, &schema)
            .await?;
        let mut procs = Vec::new();
        let r = async {
            self.purge().await?;
            for i in 0..relays {
                procs.push(self.relay.spawn(
                    &self.args.database_url,
                    &schema,
                    &format!("scale-{relays}-{run}-{i}"),
                )?);
            }
            let split_s = self.wait_fair_split(&schema, relays).await?;
            let n = self.args.messages;
            let consumer = Consumer::start(&self.args.amqp_url, &self.args.queue, n).await?;
            self.insert_rows(&schema, n, false).await?;
            let committed = Instant::now();
            let first = procs.first_mut();
            let consumed_at = consumer
                .wait_all(
                    n,
                    self.args.stall_timeout,
                    first,
                    &format!("scale-{relays}"),
                )
                .await;
            let (deliveries, distinct) = consumer.counts();
            consumer.close().await;
            let consumed_at = consumed_at?;
            let mut per_relay = Vec::new();
            for p in &procs {
                let text = p.scrape().await.unwrap_or_default();
                per_relay.push(
                    crate::metrics::metric(&text, "outbox_relay_messages_published_total")
                        .unwrap_or(0.0) as u64,
                );
            }
            Ok(ScaleRun {
                messages: n,
                split_s,
                drain_s: (consumed_at - committed).as_secs_f64(),
                per_relay,
                duplicates: deliveries - distinct,
            })
        }
        .await;
        for p in procs {
            p.stop().await;
        }
        self.drop_schema(&schema).await;
        r
    }

    /// Seconds until every relay holds at least its fair share less one and
    /// all partitions are held.
    async fn wait_fair_split(&self, schema: &str, relays: usize) -> Result<f64> {
        let t0 = Instant::now();
        let sql = format!(
            "SELECT owner, count(*) FROM {schema}.leases
              WHERE owner IS NOT NULL AND expires_at > now() GROUP BY owner"
        );
        let floor = PARTITIONS / relays as i64;
        loop {
            let rows = self
                .db
                .query(&sql, &[])
                .await
                .with_context(|| format!("reading {schema}.leases"))?;
            let counts: Vec<i64> = rows.iter().map(|r| r.get(1)).collect();
            if counts.len() == relays
                && counts.iter().sum::<i64>() == PARTITIONS
                && counts.iter().all(|&c| c >= floor)
            {
                return Ok(t0.elapsed().as_secs_f64());
            }
            if t0.elapsed() > SPLIT_TIMEOUT {
                bail!("{relays} relays did not split the partitions within {SPLIT_TIMEOUT:?}: {counts:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
