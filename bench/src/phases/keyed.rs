//! Phase 9, sustained keyed load: pgbench writes transactions of several rows
//! over many partition keys and routing keys to a topic exchange, paced and
//! then unpaced, while another connection samples the age of the oldest
//! pending row every 100 ms.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    pg_connect,
    pgbench::{transaction, Keys, Load},
    Bench, OldestPending,
};
use crate::{
    consumer::Consumer,
    metrics::claim_stats,
    relay::RelayProc,
    results::{KeyedLoad, KeyedRun, Quantiles},
};

const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// After the load stops, the relay has this long to publish what is left.
const CATCH_UP: Duration = Duration::from_secs(120);

impl Bench {
    pub(crate) async fn keyed_once(&self, run: usize) -> Result<KeyedRun> {
        let schema = format!("bench_keyed_{run}");
        self.fresh_schema(&self.db, &self.args.database_url, &schema)
            .await?;
        let r = self.keyed_measure(&schema, run).await;
        self.drop_schema(&schema).await;
        r
    }

    async fn keyed_measure(&self, schema: &str, run: usize) -> Result<KeyedRun> {
        self.purge().await?;
        let consumer = Consumer::start(&self.args.amqp_url, &self.args.queue, u64::MAX).await?;
        let label = format!("keyed-{run}");
        let mut relay = self.relay.spawn(&self.args.database_url, schema, &label)?;
        let measured = async {
            let partitions = Self::partitions_total(&self.db, schema).await?;
            relay
                .wait_ready(partitions, Duration::from_secs(30))
                .await?;
            let script = transaction(
                &format!("{schema}.messages"),
                &self.args.exchange,
                Keys {
                    partition_keys: self.args.keyed_partition_keys,
                    routing_keys: self.args.keyed_routing_keys,
                },
                self.args.keyed_rows,
            );
            let paced = self
                .keyed_load(
                    schema,
                    &mut relay,
                    &format!("{label}-paced"),
                    &script,
                    Some(self.args.keyed_rate),
                    self.args.keyed_paced_duration,
                )
                .await
                .map_err(|e| format!("{e:#}"));
            match &paced {
                Ok(p) => progress!("{label} paced: {p:?}"),
                Err(e) => progress!("{label} paced FAILED: {e}"),
            }
            // The unpaced load starts from an empty backlog.
            self.wait_no_pending(schema, CATCH_UP).await?;
            let unpaced = self
                .keyed_load(
                    schema,
                    &mut relay,
                    &format!("{label}-unpaced"),
                    &script,
                    None,
                    self.args.keyed_unpaced_duration,
                )
                .await
                .map_err(|e| format!("{e:#}"));
            match &unpaced {
                Ok(p) => progress!("{label} unpaced: {p:?}"),
                Err(e) => progress!("{label} unpaced FAILED: {e}"),
            }
            let rows: i64 = self
                .db
                .query_one(&format!("SELECT count(*) FROM {schema}.messages"), &[])
                .await?
                .get(0);
            consumer
                .wait_all(
                    rows as u64,
                    self.args.stall_timeout,
                    Some(&mut relay),
                    &label,
                )
                .await?;
            let (deliveries, distinct) = consumer.counts();
            Ok::<_, anyhow::Error>(KeyedRun {
                paced,
                unpaced,
                delivered: distinct,
                rows: rows as u64,
                duplicates: deliveries - distinct,
                stop_note: None,
            })
        }
        .await;
        self.conclude(schema, relay, Some(consumer), measured).await
    }

    async fn keyed_load(
        &self,
        schema: &str,
        relay: &mut RelayProc,
        name: &str,
        script: &str,
        rate: Option<u64>,
        duration: Duration,
    ) -> Result<KeyedLoad> {
        let sampler_db = pg_connect(&self.args.database_url, "outbox-bench sampler").await?;
        let mut oldest = OldestPending::new(schema);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let sampler = tokio::spawn(async move {
            let mut ages = Vec::new();
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stopped.load(Ordering::Relaxed) {
                tick.tick().await;
                let age = oldest.age(&sampler_db).await?;
                ages.push(age * 1000.0);
            }
            Ok::<_, tokio_postgres::Error>(ages)
        });
        let before = relay.scrape().await?;
        let cpu_before = relay.cpu().unwrap_or_default();
        let t0 = Instant::now();
        let load = self
            .pgbench(&Load {
                name,
                script: script.to_string(),
                clients: self.args.keyed_clients,
                duration,
                rate,
                transactions: None,
            })
            .await;
        let ended = Instant::now();
        stop.store(true, Ordering::Relaxed);
        let cpu_after = relay.cpu().unwrap_or_default();
        let ages = sampler
            .await
            .context("age sampler")?
            .context("sampling the oldest pending row's age");
        let load = load?;
        let ages = ages?;
        if load.failed > 0 || load.transactions == 0 {
            bail!(
                "pgbench {name}: {} transactions, {} failed (see its log in {})",
                load.transactions,
                load.failed,
                self.log_dir.display()
            );
        }
        // No row is added after pgbench ended: once none is pending, none will be.
        let one_s_after = ended + Duration::from_secs(1);
        let zero_at =
            tokio::time::timeout_at(one_s_after.into(), self.wait_no_pending(schema, CATCH_UP))
                .await;
        let (pending_1s_after, zero_at) = match zero_at {
            Ok(zero_at) => (0, zero_at?),
            Err(_) => (
                self.pending(schema).await?,
                self.wait_no_pending(schema, CATCH_UP).await?,
            ),
        };
        if let Some(status) = relay.exited() {
            bail!("the relay exited during {name}: {status}");
        }
        let after = relay.scrape().await?;
        let samples = ages.len();
        let q = Quantiles::of(ages);
        Ok(KeyedLoad {
            load,
            rows_per_tx: self.args.keyed_rows,
            samples,
            age_p50_ms: q.p50,
            age_p99_ms: q.p99,
            age_max_ms: q.max,
            pending_1s_after,
            zero_after_s: zero_at.saturating_duration_since(ended).as_secs_f64(),
            claims: claim_stats(&before, &after),
            relay_cpu_pct: ((cpu_after.0 + cpu_after.1) - (cpu_before.0 + cpu_before.1)) as f64
                / self.clk_tck
                / (ended - t0).as_secs_f64()
                * 100.0,
        })
    }
}
