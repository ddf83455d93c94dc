//! Phase 3, steady state: paced single-row transactions from several
//! connections (4 at 1,000/s by default), delivery lag.

use std::{
    collections::HashMap,
    fmt::Write as _,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use uuid::Uuid;

use super::{pg_connect, pooled::Route, Bench};
use crate::{
    consumer::Consumer,
    metrics::{claim_stats, hist_quantiles, histogram_buckets, metric},
    results::{HistQuantiles, Quantiles, SteadyRun},
    util::fill_payload,
};

impl Bench {
    pub(crate) async fn steady_once(&self, rate: u64, run: usize) -> Result<SteadyRun> {
        let schema = format!("bench_steady_{rate}_{run}");
        self.steady_in(
            &schema,
            rate,
            &format!("steady-{rate}-{run}"),
            Route::Direct,
        )
        .await
    }

    /// The steady state on a fresh `schema` (dropped afterwards), the relay
    /// connected by `route`; the application always connects directly.
    pub(super) async fn steady_in(
        &self,
        schema: &str,
        rate: u64,
        label: &str,
        route: Route<'_>,
    ) -> Result<SteadyRun> {
        self.fresh_schema(&self.db, &self.args.database_url, schema)
            .await?;
        let r = self.steady_measure(schema, rate, label, route).await;
        self.drop_schema(schema).await;
        r
    }

    async fn steady_measure(
        &self,
        schema: &str,
        rate: u64,
        label: &str,
        route: Route<'_>,
    ) -> Result<SteadyRun> {
        self.purge().await?;
        let consumer = Consumer::start(&self.args.amqp_url, &self.args.queue, u64::MAX).await?;
        let label = label.to_string();
        let mut relay = self.spawn_via(route, &self.database, schema, &label)?;
        let partitions = Self::partitions_total(&self.db, schema).await?;
        let measured = async {
            relay
                .wait_ready(partitions, Duration::from_secs(30))
                .await?;
            let scrape_before = relay.scrape().await?;
            let cpu_before = relay.cpu().unwrap_or_default();
            let cpu_t0 = Instant::now();
            let (inserted, insert_rate, commits) = self.application(schema, rate).await?;
            progress!(
                "{label}: {inserted} rows inserted ({insert_rate:.0}/s); waiting for delivery"
            );
            consumer
                .wait_all(inserted, self.args.stall_timeout, Some(&mut relay), &label)
                .await?;
            let cpu_after = relay.cpu().unwrap_or_default();
            let cpu_wall = cpu_t0.elapsed().as_secs_f64();
            let scrape_after = relay.scrape().await?;
            let hist = |name: &str| {
                hist_quantiles(
                    &histogram_buckets(&scrape_before, name),
                    &histogram_buckets(&scrape_after, name),
                )
                .map(|h| HistQuantiles {
                    count: h.count,
                    p50: h.p50 * 1000.0,
                    p99: h.p99 * 1000.0,
                    max_le: h.max_le * 1000.0,
                })
            };
            let delta = |name: &str| {
                metric(&scrape_after, name).unwrap_or(f64::NAN)
                    - metric(&scrape_before, name).unwrap_or(0.0)
            };
            let created: HashMap<Uuid, SystemTime> = self
                .db
                .query(
                    &format!("SELECT message_id, created_at FROM {schema}.messages"),
                    &[],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let received = consumer.receipts();
            let mut lags: Vec<f64> = created
                .iter()
                .filter_map(|(id, at)| {
                    received.get(id).map(|got| {
                        got.duration_since(*at)
                            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
                    })
                })
                .collect();
            if (lags.len() as u64) < inserted {
                bail!(
                    "{label}: only {} of {inserted} inserted rows were received",
                    lags.len()
                );
            }
            lags.sort_by(f64::total_cmp);
            // The lag split at the application's commit: created_at → commit
            // acknowledged, and commit acknowledged → consumer receipt.
            let ms = |from: SystemTime, to: SystemTime| {
                to.duration_since(from)
                    .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
            };
            let mut to_commit = Vec::with_capacity(created.len());
            let mut after_commit = Vec::with_capacity(created.len());
            let mut dump = String::from("message_id,created_us,committed_us,received_us\n");
            for (id, at) in &created {
                if let (Some(done), Some(got)) = (commits.get(id), received.get(id)) {
                    to_commit.push(ms(*at, *done));
                    after_commit.push(ms(*done, *got));
                    if self.args.steady_dump.is_some() {
                        let us = |t: &SystemTime| {
                            t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros())
                        };
                        let _ = writeln!(dump, "{id},{},{},{}", us(at), us(done), us(got));
                    }
                }
            }
            if let Some(dir) = &self.args.steady_dump {
                let path = dir.join(format!("{label}.csv"));
                std::fs::create_dir_all(dir)
                    .and_then(|()| std::fs::write(&path, &dump))
                    .with_context(|| format!("writing {}", path.display()))?;
                progress!("{label}: per-message timestamps in {}", path.display());
            }
            let (deliveries, distinct) = consumer.counts();
            Ok(SteadyRun {
                inserted,
                insert_rate,
                lag_ms: Quantiles::of(lags),
                commit_ms: Quantiles::of(to_commit),
                after_commit_ms: Quantiles::of(after_commit),
                hist_ms: hist("outbox_relay_delivery_lag_seconds"),
                confirm_ms: hist("outbox_relay_confirm_duration_seconds"),
                connections: self.args.steady_connections_at(rate),
                claims: claim_stats(&scrape_before, &scrape_after),
                mean_batch: delta("outbox_relay_batch_size_sum")
                    / delta("outbox_relay_batch_size_count"),
                relay_cpu_pct: ((cpu_after.0 + cpu_after.1) - (cpu_before.0 + cpu_before.1)) as f64
                    / self.clk_tck
                    / cpu_wall
                    * 100.0,
                duplicates: deliveries - distinct,
                stop_note: None,
            })
        }
        .await;
        self.conclude(schema, relay, Some(consumer), measured).await
    }

    /// The application: one row per transaction from several connections, paced
    /// to `rate` rows/s on a shared schedule. Returns rows inserted and the rate reached.
    async fn application(
        &self,
        schema: &str,
        rate: u64,
    ) -> Result<(u64, f64, HashMap<Uuid, SystemTime>)> {
        let conns = self.args.steady_connections_at(rate);
        let duration = self.args.steady_duration;
        let mut clients = Vec::with_capacity(conns);
        for _ in 0..conns {
            clients.push(pg_connect(&self.args.database_url, "outbox-bench app").await?);
        }
        let payload: Vec<u8> = {
            let mut p = Vec::new();
            fill_payload(&mut p, 0, self.args.payload_bytes);
            p
        };
        let sql = format!(
            "INSERT INTO {schema}.messages (routing_key, payload) VALUES ($1, $2) RETURNING message_id"
        );
        let start = tokio::time::Instant::now() + Duration::from_millis(200);
        let end = start + duration;
        let mut tasks = Vec::with_capacity(conns);
        for (k, client) in clients.into_iter().enumerate() {
            let sql = sql.clone();
            let queue = self.args.queue.clone();
            let payload = payload.clone();
            tasks.push(tokio::spawn(async move {
                let statement = client.prepare(&sql).await?;
                let mut done = 0u64;
                let mut committed = Vec::new();
                let mut seq = k as u64;
                loop {
                    let due = start + Duration::from_nanos(seq * 1_000_000_000 / rate);
                    // Behind schedule the backlog goes out back to back, but never
                    // past the end of the window: the rate reached is reported.
                    if due >= end || tokio::time::Instant::now() >= end {
                        break;
                    }
                    tokio::time::sleep_until(due).await;
                    // Autocommit: when the answer is here, the row is committed.
                    let row = client.query_one(&statement, &[&queue, &payload]).await?;
                    committed.push((row.get::<_, Uuid>(0), SystemTime::now()));
                    done += 1;
                    seq += conns as u64;
                }
                Ok::<_, tokio_postgres::Error>((done, tokio::time::Instant::now(), committed))
            }));
        }
        let mut inserted = 0;
        let mut last = start;
        let mut commits = HashMap::new();
        for task in tasks {
            let (done, finished, committed) = task.await.context("application task")??;
            inserted += done;
            last = last.max(finished);
            commits.extend(committed);
        }
        let secs = (last - start).as_secs_f64().max(duration.as_secs_f64());
        Ok((inserted, inserted as f64 / secs, commits))
    }
}
