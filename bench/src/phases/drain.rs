//! Phase 2, drain (also phase 5, footprint): pending rows, relay started,
//! until all are delivered and marked.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::{pooled::Route, Bench};
use crate::{
    consumer::Consumer,
    metrics::claim_stats,
    results::{CpuUse, DrainRun},
    sysinfo::{cpu_seconds, CpuSnapshot},
};

impl Bench {
    pub(crate) async fn drain_phase(&self, run: usize) -> Result<DrainRun> {
        let schema = format!("bench_drain_{run}");
        self.fresh_schema(&self.db, &self.args.database_url, &schema)
            .await?;
        self.insert_rows(&schema, self.args.messages, false).await?;
        self.settle_table(&schema).await?;
        let r = self.drain_once(&schema, &format!("drain-{run}")).await;
        self.drop_schema(&schema).await;
        r
    }

    /// Starts a relay on a schema full of pending rows and measures it until
    /// every row is delivered and marked.
    pub(super) async fn drain_once(&self, schema: &str, label: &str) -> Result<DrainRun> {
        self.drain_via(schema, label, Route::Direct).await
    }

    /// The same, the relay connected by `route` (the bench's own reads go direct).
    pub(super) async fn drain_via(
        &self,
        schema: &str,
        label: &str,
        route: Route<'_>,
    ) -> Result<DrainRun> {
        let start_counts = self.outbox_counts(schema).await?;
        let n = start_counts.pending as u64;
        self.purge().await?;
        let consumer = Consumer::start(&self.args.amqp_url, &self.args.queue, n).await?;
        let before = CpuSnapshot::take(self.backend_pid);
        let t0 = Instant::now();
        let mut relay = self.spawn_via(route, &self.database, schema, label)?;
        // The database side: when does it show no pending row?
        let db = self.db.clone();
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {schema}.messages
                             WHERE published_at IS NULL AND dead_lettered_at IS NULL)"
        );
        let watcher = tokio::spawn(async move {
            loop {
                let asked = Instant::now();
                let any: bool = db.query_one(&sql, &[]).await?.get(0);
                if !any {
                    return Ok::<_, tokio_postgres::Error>(asked);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let measured = async {
            let consumed_at = consumer
                .wait_all(n, self.args.stall_timeout, Some(&mut relay), label)
                .await?;
            let db_zero_at = match tokio::time::timeout(self.args.stall_timeout, watcher).await {
                Ok(joined) => joined.context("watcher")?.context("polling pending rows")?,
                Err(_) => bail!(
                    "{label}: the consumer saw all {n} messages but the database still shows pending rows {:?} later",
                    self.args.stall_timeout
                ),
            };
            let relay_cpu = relay
                .cpu()
                .ok_or_else(|| anyhow!("cannot read /proc/{}/stat", relay.pid()))?;
            let peak_rss_kib = relay.peak_rss_kib().unwrap_or(0);
            let claims = relay
                .scrape()
                .await
                .ok()
                .and_then(|m| claim_stats("", &m));
            // The relay's backends were started by this relay: their whole CPU
            // time falls in the window.
            let backends = self.relay_backends(&relay, route).await;
            let relay_pg_s = cpu_seconds(&backends, self.clk_tck);
            let after = CpuSnapshot::take(self.backend_pid);
            let counts = self.outbox_counts(schema).await?;
            let published = counts.published - start_counts.published;
            if published as u64 != n || counts.dead_lettered != 0 || counts.pending != 0 {
                bail!(
                    "{label}: after the drain {schema}.messages has {} newly published of {n}, {} pending, {} dead-lettered",
                    published,
                    counts.pending,
                    counts.dead_lettered
                );
            }
            let (deliveries, distinct) = consumer.counts();
            Ok(DrainRun {
                messages: n,
                first_s: consumer
                    .first_at()
                    .map_or(f64::NAN, |t| (t - t0).as_secs_f64()),
                consumed_s: (consumed_at - t0).as_secs_f64(),
                db_zero_s: (db_zero_at - t0).as_secs_f64(),
                relay_user_s: relay_cpu.0 as f64 / self.clk_tck,
                relay_sys_s: relay_cpu.1 as f64 / self.clk_tck,
                peak_rss_kib,
                duplicates: deliveries - distinct,
                cpu: CpuUse {
                    relay_pg_s,
                    ..before.until(&after, t0, self.clk_tck)
                },
                claims,
                stop_note: None,
            })
        }
        .await;
        self.conclude(schema, relay, Some(consumer), measured).await
    }
}
