//! Phase 10, cold keyed backlog: a table just filled with keyed rows (no
//! ANALYZE, no CHECKPOINT: what a user's table looks like after a burst or an
//! outage), the relay started, timed until nothing is pending; against the
//! bare publisher sending the same routing keys to the same topic exchange,
//! in the same run, with and without a consumer on the queue.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lapin::types::ShortString;

use super::Bench;
use crate::{
    consumer::Consumer,
    metrics::claim_stats,
    relay::RelayProc,
    results::{ColdDrain, ColdRun},
};

/// Row i's routing key and partition key: the same spread for the table and
/// for the bare publisher (multipliers coprime with the key counts' usual
/// values, so consecutive rows hop between keys).
const ROUTING_MULT: u64 = 6151;
const PARTITION_MULT: u64 = 7919;

fn routing_key(i: u64, keys: u64) -> String {
    format!("rk.{}", i * ROUTING_MULT % keys.max(1))
}

impl Bench {
    pub(crate) async fn cold_once(&self, with_consumer: bool) -> ColdRun {
        let n = self.args.cold_rows;
        let keys = self.args.cold_routing_keys;
        let bare = async {
            let run = self
                .bare_publish(
                    n,
                    &self.args.exchange,
                    &|i| ShortString::from(routing_key(i, keys)),
                    with_consumer,
                )
                .await?;
            if !with_consumer {
                let queued = self.queue_depth().await?;
                if u64::from(queued) != n {
                    bail!("the bare publisher's {n} confirmed messages left {queued} in the queue");
                }
            }
            Ok(run)
        }
        .await
        .map_err(|e: anyhow::Error| format!("bare publisher: {e:#}"));
        let schema = format!(
            "bench_cold_{}",
            if with_consumer {
                "consumer"
            } else {
                "no_consumer"
            }
        );
        let drain = async {
            self.fresh_schema(&self.db, &self.args.database_url, &schema)
                .await?;
            self.cold_drain(&schema, with_consumer).await
        }
        .await
        .map_err(|e| format!("{e:#}"));
        self.drop_schema(&schema).await;
        // Without a consumer the messages piled up: gone before the next phase.
        if let Err(e) = self.purge().await {
            progress!("warning: {e:#}");
        }
        ColdRun {
            consumer: with_consumer,
            bare,
            drain,
        }
    }

    async fn cold_drain(&self, schema: &str, with_consumer: bool) -> Result<ColdDrain> {
        let n = self.args.cold_rows;
        self.purge().await?;
        let t = Instant::now();
        let payload_bytes = i32::try_from(self.args.payload_bytes).context("payload size")?;
        self.db
            .execute(
                &format!(
                    "INSERT INTO {schema}.messages (exchange, routing_key, partition_key, payload)
                     SELECT $1, 'rk.' || (i * $2 % $3), 'key-' || (i * $4 % $5),
                            convert_to(rpad(i::text, $6, '.'), 'UTF8')
                       FROM generate_series(1, $7::bigint) i"
                ),
                &[
                    &self.args.exchange,
                    &(ROUTING_MULT as i64),
                    &(self.args.cold_routing_keys.max(1) as i64),
                    &(PARTITION_MULT as i64),
                    &(self.args.cold_partition_keys.max(1) as i64),
                    &payload_bytes,
                    &(n as i64),
                ],
            )
            .await
            .with_context(|| format!("filling {schema}.messages with {n} keyed rows"))?;
        let fill_s = t.elapsed().as_secs_f64();
        let consumer = if with_consumer {
            Some(Consumer::start(&self.args.amqp_url, &self.args.queue, n).await?)
        } else {
            None
        };
        let label = format!("cold-{schema}");
        let t0 = Instant::now();
        let mut relay = self.relay.spawn(&self.args.database_url, schema, &label)?;
        let measured = async {
            let zero_at = self.watch_drain(schema, &mut relay, n, &label).await?;
            let consumed_s = match &consumer {
                Some(c) => Some(
                    (c.wait_all(n, self.args.stall_timeout, Some(&mut relay), &label)
                        .await?
                        - t0)
                        .as_secs_f64(),
                ),
                None => None,
            };
            let claims = relay
                .scrape()
                .await
                .ok()
                .and_then(|m| claim_stats("", &m));
            let counts = self.outbox_counts(schema).await?;
            if counts.published as u64 != n || counts.dead_lettered != 0 {
                bail!(
                    "{label}: after the drain {schema}.messages has {} published of {n}, {} dead-lettered",
                    counts.published,
                    counts.dead_lettered
                );
            }
            let queued = if with_consumer {
                None
            } else {
                let q = self.queue_depth().await?;
                if u64::from(q) < n {
                    bail!("{label}: {n} rows published but only {q} messages in the queue");
                }
                Some(q)
            };
            Ok(ColdDrain {
                fill_s,
                db_zero_s: (zero_at - t0).as_secs_f64(),
                consumed_s,
                queued,
                claims,
                stop_note: None,
            })
        }
        .await;
        self.conclude(schema, relay, consumer, measured).await
    }

    /// Polls (EXISTS every 20 ms) until no row is pending; fails when the
    /// pending count has not moved for the stall timeout or the relay exits.
    async fn watch_drain(
        &self,
        schema: &str,
        relay: &mut RelayProc,
        n: u64,
        label: &str,
    ) -> Result<Instant> {
        let exists = format!(
            "SELECT EXISTS (SELECT 1 FROM {schema}.messages
                             WHERE published_at IS NULL AND dead_lettered_at IS NULL)"
        );
        let mut last_pending = n as i64;
        let started = Instant::now();
        let mut last_change = started;
        let mut last_count = started;
        loop {
            let asked = Instant::now();
            let any: bool = self.db.query_one(&exists, &[]).await?.get(0);
            if !any {
                return Ok(asked);
            }
            if let Some(status) = relay.exited() {
                bail!("{label}: the relay exited ({status})");
            }
            if last_count.elapsed() >= Duration::from_secs(5) {
                last_count = Instant::now();
                let pending = self.pending(schema).await?;
                progress!("{label}: {pending} of {n} pending");
                if pending < last_pending {
                    last_pending = pending;
                    last_change = Instant::now();
                }
                if started.elapsed() > self.args.cold_timeout {
                    let done = n as i64 - pending;
                    bail!(
                        "{label}: {pending} of {n} rows still pending after {:?} (--cold-timeout): {done} published, {:.0} rows/s",
                        self.args.cold_timeout,
                        done as f64 / started.elapsed().as_secs_f64()
                    );
                }
                if pending >= last_pending && last_change.elapsed() > self.args.stall_timeout {
                    bail!(
                        "{label}: stalled: {pending} of {n} rows still pending, none published in the last {:?}",
                        self.args.stall_timeout
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
