//! Phase 8, application cost: what writing to the outbox costs the
//! application. pgbench inserts into `<schema>.messages` (the relay running,
//! publishing to the topic exchange, a consumer on the queue) and into
//! `<schema>.messages_copy` (same columns, defaults and indexes, none of the
//! relay's triggers), side by side in the same run with the relay running.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use super::{
    pgbench::{transaction, Keys, Load},
    Bench,
};
use crate::{
    consumer::Consumer,
    metrics::claim_stats,
    relay::RelayProc,
    results::{AppCompare, AppKind, AppSide, ClaimStats},
};

const SCHEMA: &str = "bench_app";
/// The relay catching up after the outbox side must finish before the copy
/// side starts, or it would compete with it.
const CATCH_UP: Duration = Duration::from_secs(120);

type AppResults = (
    Vec<(AppKind, Result<AppCompare, String>)>,
    Option<ClaimStats>,
    Vec<String>,
);

impl Bench {
    pub(crate) async fn app_phase(&self) -> AppResults {
        let stopped = [
            AppKind::SingleRowRelayStopped,
            AppKind::MultiRowRelayStopped,
        ];
        let kinds = [AppKind::SingleRow, AppKind::MultiRow, AppKind::Paced];
        let mut notes = Vec::new();
        let set_up = async {
            self.fresh_schema(&self.db, &self.args.database_url, SCHEMA)
                .await?;
            self.db
                .batch_execute(&format!(
                    "CREATE TABLE {SCHEMA}.messages_copy (LIKE {SCHEMA}.messages INCLUDING ALL)"
                ))
                .await
                .map_err(|e| anyhow!("creating {SCHEMA}.messages_copy: {e}"))?;
            self.purge().await
        }
        .await;
        if let Err(e) = set_up {
            let e = format!("setting up the application-cost phase: {e:#}");
            self.drop_schema(SCHEMA).await;
            return (
                kinds.iter().map(|&k| (k, Err(e.clone()))).collect(),
                None,
                notes,
            );
        }
        let consumer = match Consumer::start(&self.args.amqp_url, &self.args.queue, u64::MAX).await
        {
            Ok(c) => c,
            Err(e) => {
                let e = format!("starting the consumer: {e:#}");
                self.drop_schema(SCHEMA).await;
                return (
                    kinds.iter().map(|&k| (k, Err(e.clone()))).collect(),
                    None,
                    notes,
                );
            }
        };
        let mut out = Vec::new();
        // First with the relay stopped: the objects' own cost. The relay,
        // started next, publishes what these sides wrote before the others run.
        for (i, kind) in stopped.into_iter().enumerate() {
            let r = self
                .app_compare(None, kind, i % 2 == 0)
                .await
                .map_err(|e| format!("{e:#}"));
            match &r {
                Ok(c) => progress!("app {kind:?}: {c:?}"),
                Err(e) => progress!("app {kind:?} FAILED: {e}"),
            }
            out.push((kind, r));
        }
        let mut claims = None;
        match self.relay.spawn(&self.args.database_url, SCHEMA, "app") {
            Err(e) => {
                let e = format!("{e:#}");
                out.extend(kinds.iter().map(|&k| (k, Err(e.clone()))));
            }
            Ok(mut relay) => {
                let ready = async {
                    let partitions = Self::partitions_total(&self.db, SCHEMA).await?;
                    relay
                        .wait_ready(partitions, Duration::from_secs(30))
                        .await?;
                    self.wait_no_pending(SCHEMA, CATCH_UP).await?;
                    relay.scrape().await
                }
                .await;
                match ready {
                    Err(e) => {
                        let e = format!("{e:#}");
                        out.extend(kinds.iter().map(|&k| (k, Err(e.clone()))));
                    }
                    Ok(scrape_start) => {
                        // Alternating which side goes first: neither always
                        // meets the larger tables and the WAL of the other.
                        for (i, kind) in kinds.into_iter().enumerate() {
                            let r = self.app_compare(Some(&mut relay), kind, i % 2 == 0).await;
                            let r = match r {
                                Ok(c) => Ok(c),
                                Err(e) => Err(format!(
                                    "{e:#}\n{}",
                                    self.evidence(SCHEMA, &mut relay, Some(&consumer)).await
                                )),
                            };
                            match &r {
                                Ok(c) => progress!("app {kind:?}: {c:?}"),
                                Err(e) => progress!("app {kind:?} FAILED: {e}"),
                            }
                            out.push((kind, r));
                        }
                        if let Ok(end) = relay.scrape().await {
                            claims = claim_stats(&scrape_start, &end);
                        }
                        // Every outbox row reached the consumer.
                        let delivered = async {
                            let rows: i64 = self
                                .db
                                .query_one(&format!("SELECT count(*) FROM {SCHEMA}.messages"), &[])
                                .await?
                                .get(0);
                            consumer
                                .wait_all(
                                    rows as u64,
                                    self.args.stall_timeout,
                                    Some(&mut relay),
                                    "app",
                                )
                                .await?;
                            let (deliveries, distinct) = consumer.counts();
                            if deliveries != distinct {
                                bail!(
                                    "{} duplicate deliveries of {distinct} messages",
                                    deliveries - distinct
                                );
                            }
                            Ok(())
                        }
                        .await;
                        if let Err(e) = delivered {
                            notes.push(format!(
                                "not every outbox row was delivered once: {e:#}\n{}",
                                self.evidence(SCHEMA, &mut relay, Some(&consumer)).await
                            ));
                        }
                    }
                }
                if let Some(note) = relay.stop().await {
                    notes.push(note);
                }
            }
        }
        consumer.close().await;
        self.drop_schema(SCHEMA).await;
        (out, claims, notes)
    }

    async fn app_compare(
        &self,
        mut relay: Option<&mut RelayProc>,
        kind: AppKind,
        messages_first: bool,
    ) -> Result<AppCompare> {
        let mut messages = None;
        let mut copy = None;
        let order = if messages_first {
            ["messages", "messages_copy"]
        } else {
            ["messages_copy", "messages"]
        };
        for table in order {
            let side = self.app_side(relay.as_deref_mut(), kind, table).await?;
            progress!("app {kind:?} {table}: {:?}", side.load);
            if table == "messages" {
                messages = Some(side);
            } else {
                copy = Some(side);
            }
            // A pause between the sides: the last commits' WAL flushed, the
            // relay (if running) idle again.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        match (messages, copy) {
            (Some(messages), Some(copy)) => Ok(AppCompare {
                messages,
                copy,
                messages_first,
            }),
            _ => bail!("a side of the {kind:?} comparison did not run"),
        }
    }

    async fn app_side(
        &self,
        mut relay: Option<&mut RelayProc>,
        kind: AppKind,
        table: &str,
    ) -> Result<AppSide> {
        let keys = Keys {
            partition_keys: self.args.keyed_partition_keys,
            routing_keys: self.args.keyed_routing_keys,
        };
        let (rows, rate) = match kind {
            AppKind::SingleRow | AppKind::SingleRowRelayStopped => (1, None),
            AppKind::MultiRow | AppKind::MultiRowRelayStopped => (self.args.app_rows, None),
            AppKind::Paced => (1, Some(self.args.app_rate)),
        };
        let name = format!(
            "app-{}-{table}",
            match kind {
                AppKind::SingleRow => "single",
                AppKind::MultiRow => "multi",
                AppKind::Paced => "paced",
                AppKind::SingleRowRelayStopped => "single-relay-stopped",
                AppKind::MultiRowRelayStopped => "multi-relay-stopped",
            }
        );
        let before = match relay.as_deref_mut() {
            Some(relay) => Some(relay.scrape().await?),
            None => None,
        };
        let cpu_before = relay
            .as_deref()
            .and_then(RelayProc::cpu)
            .unwrap_or_default();
        let t0 = Instant::now();
        let load = self
            .pgbench(&Load {
                name: &name,
                script: transaction(
                    &format!("{SCHEMA}.{table}"),
                    &self.args.exchange,
                    keys,
                    rows,
                ),
                clients: self.args.app_clients,
                duration: self.args.app_duration,
                rate,
                transactions: None,
            })
            .await?;
        let cpu_after = relay
            .as_deref()
            .and_then(RelayProc::cpu)
            .unwrap_or_default();
        let wall = t0.elapsed().as_secs_f64();
        if load.failed > 0 || load.transactions == 0 {
            bail!(
                "pgbench {name}: {} transactions, {} failed (see its log in {})",
                load.transactions,
                load.failed,
                self.log_dir.display()
            );
        }
        let ended = Instant::now();
        let pending_at_end = self.pending(SCHEMA).await?;
        let (catch_up_s, claims) = match (relay, before) {
            (Some(relay), Some(before)) => {
                let zero_at = self.wait_no_pending(SCHEMA, CATCH_UP).await?;
                if let Some(status) = relay.exited() {
                    bail!("the relay exited during {name}: {status}");
                }
                let after = relay.scrape().await?;
                (
                    zero_at.saturating_duration_since(ended).as_secs_f64(),
                    claim_stats(&before, &after),
                )
            }
            // The relay is stopped: the rows wait for it.
            _ => (0.0, None),
        };
        Ok(AppSide {
            load,
            pending_at_end,
            catch_up_s,
            claims,
            relay_cpu_pct: ((cpu_after.0 + cpu_after.1) - (cpu_before.0 + cpu_before.1)) as f64
                / self.clk_tck
                / wall
                * 100.0,
        })
    }
}
