//! Phase 11, backlog after an outage (issue 17): on a table that already
//! relayed its history, a backlog written while the relay is down, another
//! session holding a snapshot open throughout (VACUUM can remove nothing),
//! and the application writing on the same keys at a steady rate before,
//! during and after. Measured in one run: the relay's drain rate against
//! the bare publisher to the same exchange, the time until the application's
//! new rows are current again, the application's own rate and latency with
//! the relay stopped and while it drains, the claim statement's duration,
//! and WAL bytes per row from insert to retention.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lapin::types::ShortString;
use tokio_postgres::Client;

use super::{
    pg_connect,
    pgbench::{transaction, Keys, Load},
    Bench, OldestPending,
};
use crate::{
    consumer::Consumer,
    metrics::{claim_stats, metric},
    relay::RelayProc,
    results::{AppWindow, BacklogRun, WalPerRow},
};

const SCHEMA: &str = "bench_backlog";
/// "Current again": the oldest pending row is at most this old.
const CURRENT_WITHIN_S: f64 = 2.0;
const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// Application writers (connections) sharing the application's schedule.
const APP_WRITERS: usize = 4;

/// One application transaction: when it finished, its rows, and its latency
/// from its scheduled start.
type Commit = (Instant, u64, f64);

impl Bench {
    pub(crate) async fn backlog_once(&self) -> Result<BacklogRun> {
        let n = self.args.backlog_rows;
        let keys = u64::from(self.args.keyed_routing_keys.max(1));
        progress!(
            "backlog: bare publisher, {n} messages to {}",
            self.args.exchange
        );
        let bare = self
            .bare_publish(
                n,
                &self.args.exchange,
                &|i| ShortString::from(format!("rk.{}", i % keys + 1)),
                true,
            )
            .await
            .context("the bare publisher")?;
        let bare_rate = n as f64 / bare.confirmed_s;
        progress!("backlog: bare publisher {bare_rate:.0} msg/s (to the last confirm)");
        self.fresh_schema(&self.db, &self.args.database_url, SCHEMA)
            .await?;
        let r = self.backlog_measure(bare_rate).await;
        self.drop_schema(SCHEMA).await;
        r
    }

    async fn backlog_measure(&self, bare_rate: f64) -> Result<BacklogRun> {
        let url = &self.args.database_url;
        self.purge().await?;
        let consumer = Consumer::start(&self.args.amqp_url, &self.args.queue, u64::MAX).await?;

        // The table's history: rows the relay published before the outage.
        let history = self.args.backlog_history_rows;
        self.db
            .execute(
                &format!(
                    "INSERT INTO {SCHEMA}.messages (exchange, routing_key, partition_key, payload)
                     SELECT $1, 'rk.' || (1 + i % $2), 'key-' || (1 + i * 7919 % $3),
                            convert_to(rpad(md5(i::text), 200, md5(i::text)), 'UTF8')
                       FROM generate_series(1, $4::bigint) i"
                ),
                &[
                    &self.args.exchange,
                    &i64::from(self.args.keyed_routing_keys.max(1)),
                    &i64::from(self.args.backlog_partition_keys.max(1)),
                    &(history as i64),
                ],
            )
            .await
            .with_context(|| format!("writing the {history} rows of the table's history"))?;
        progress!("backlog: the relay publishes the table's history ({history} rows)");
        let relay = self.relay.spawn(url, SCHEMA, "backlog-history")?;
        let relayed = self
            .wait_no_pending(SCHEMA, self.args.backlog_timeout)
            .await;
        let relayed = match relayed {
            Ok(_) => Ok(()),
            Err(e) => Err(e.context("relaying the table's history")),
        };
        let stop_note = relay.stop().await;
        relayed?;
        if let Some(note) = stop_note {
            progress!("backlog: history relay: {note}");
        }

        // Another session holds a snapshot open from here to the end.
        let holder = pg_connect(url, "outbox-bench snapshot holder").await?;
        holder
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM {SCHEMA}.messages"
            ))
            .await
            .context("opening the long snapshot")?;

        let r = self
            .backlog_with_snapshot(bare_rate, history, &consumer)
            .await;
        let _ = holder.batch_execute("ROLLBACK").await;
        consumer.close().await;
        r
    }

    async fn backlog_with_snapshot(
        &self,
        bare_rate: f64,
        history: u64,
        consumer: &Consumer,
    ) -> Result<BacklogRun> {
        let url = &self.args.database_url;
        let rows_per_tx = self.args.backlog_rows_per_tx.max(1);
        let writers = self.args.backlog_writers.max(1);
        let per_client = self
            .args
            .backlog_rows
            .div_ceil((rows_per_tx * writers) as u64);
        let keys = Keys {
            partition_keys: self.args.backlog_partition_keys,
            routing_keys: self.args.keyed_routing_keys,
        };
        progress!(
            "backlog: the outage: pgbench {writers} clients write {} rows in {rows_per_tx}-row transactions",
            per_client * (rows_per_tx * writers) as u64
        );
        let lsn0 = current_lsn(&self.db).await?;
        let load = self
            .pgbench(&Load {
                name: "backlog-outage",
                script: transaction(
                    &format!("{SCHEMA}.messages"),
                    &self.args.exchange,
                    keys,
                    rows_per_tx,
                ),
                clients: writers,
                duration: Duration::ZERO,
                rate: None,
                transactions: Some(per_client),
            })
            .await?;
        let lsn1 = current_lsn(&self.db).await?;
        let written = load.transactions * rows_per_tx as u64;
        if load.failed > 0 || written == 0 {
            bail!(
                "pgbench backlog-outage: {} transactions, {} failed",
                load.transactions,
                load.failed
            );
        }
        let insert_wal = wal_diff(&self.db, &lsn0, &lsn1).await? / written as f64;

        // The application writes from here to the end; first with the relay stopped.
        let app = AppWriter::start(
            url,
            &self.args.exchange,
            keys,
            rows_per_tx,
            self.args.backlog_app_rate,
        )
        .await?;
        let window = self.args.backlog_app_window;
        progress!(
            "backlog: the application writes {} rows/s; measured {window:?} with the relay stopped",
            self.args.backlog_app_rate
        );
        let stopped_from = Instant::now();
        tokio::time::sleep(window).await;
        let stopped_to = Instant::now();
        let backlog_rows = self.pending(SCHEMA).await? as u64;

        progress!("backlog: relay started on {backlog_rows} pending rows");
        let lsn2 = current_lsn(&self.db).await?;
        let t0 = Instant::now();
        let mut relay = self.relay.spawn(url, SCHEMA, "backlog")?;
        let measured = async {
            let caught_up = self.watch_current(&mut relay, t0).await?;
            let lsn3 = current_lsn(&self.db).await?;
            let scrape = relay.scrape().await?;
            let published =
                metric(&scrape, "outbox_relay_messages_published_total").unwrap_or(0.0) as u64;
            let claims = claim_stats("", &scrape);
            let app_stopped = app.window(stopped_from, stopped_to)?;
            let app_draining = app.window(t0, caught_up)?;
            // The relay's WAL less the application's inserts in the same window.
            let app_rows = app_draining.rows;
            let drain_wal = wal_diff(&self.db, &lsn2, &lsn3).await?;
            let relay_wal = (drain_wal - app_rows as f64 * insert_wal) / published.max(1) as f64;
            Ok::<_, anyhow::Error>((
                caught_up,
                published,
                claims,
                app_stopped,
                app_draining,
                relay_wal,
            ))
        }
        .await;
        app.stop().await;
        let (caught_up, published, claims, app_stopped, app_draining, relay_wal) = self
            .conclude_backlog(&mut relay, consumer, measured)
            .await?;
        // The application's last rows drained, then the relay stops.
        let settled = self
            .wait_no_pending(SCHEMA, self.args.backlog_timeout)
            .await;
        let stop_note = relay.stop().await;
        settled?;

        let (retention, retention_rows) = self.retention_wal().await?;
        Ok(BacklogRun {
            history_rows: history,
            backlog_rows,
            bare_rate,
            catch_up_s: (caught_up - t0).as_secs_f64(),
            published,
            app_rate: self.args.backlog_app_rate as f64,
            app_stopped,
            app_draining,
            claims,
            wal: WalPerRow {
                insert: insert_wal,
                relay: relay_wal,
                retention,
                retention_rows,
            },
            stop_note,
        })
    }

    /// A failure carries the evidence; the relay keeps running on success.
    async fn conclude_backlog<T>(
        &self,
        relay: &mut RelayProc,
        consumer: &Consumer,
        measured: Result<T>,
    ) -> Result<T> {
        match measured {
            Ok(m) => Ok(m),
            Err(e) => Err(anyhow::anyhow!(
                "{e:#}\n{}",
                self.evidence(SCHEMA, relay, Some(consumer)).await
            )),
        }
    }

    /// Samples the oldest pending row's age until it is at most 2 s: when the
    /// application's new rows are current again.
    async fn watch_current(&self, relay: &mut RelayProc, t0: Instant) -> Result<Instant> {
        let mut oldest = OldestPending::new(SCHEMA);
        let mut last_print = Instant::now();
        loop {
            let asked = Instant::now();
            let age = oldest.age(&self.db).await?;
            if age <= CURRENT_WITHIN_S {
                return Ok(asked);
            }
            if let Some(status) = relay.exited() {
                bail!("backlog: the relay exited ({status})");
            }
            if t0.elapsed() > self.args.backlog_timeout {
                bail!(
                    "backlog: the oldest pending row is still {age:.1} s old {:?} after the relay started (--backlog-timeout); {} pending",
                    self.args.backlog_timeout,
                    self.pending(SCHEMA).await?
                );
            }
            if last_print.elapsed() >= Duration::from_secs(5) {
                last_print = Instant::now();
                progress!(
                    "backlog: oldest pending {age:.1} s old, {} pending",
                    oldest.pending(&self.db, SCHEMA).await?
                );
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    }

    /// WAL of the relay's retention pass: a relay with `--retention 1s`
    /// deletes every published row; (bytes per row, rows deleted).
    async fn retention_wal(&self) -> Result<(Option<f64>, u64)> {
        let published: i64 = self
            .db
            .query_one(
                &format!("SELECT count(*) FROM {SCHEMA}.messages WHERE published_at IS NOT NULL"),
                &[],
            )
            .await?
            .get(0);
        // Every published row is older than the retention when the relay starts.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let lsn0 = current_lsn(&self.db).await?;
        let relay = self.relay.spawn_with(
            &self.args.database_url,
            SCHEMA,
            "backlog-retention",
            &["--retention", "1s"],
        )?;
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {SCHEMA}.messages WHERE published_at IS NOT NULL)"
        );
        let deadline = Instant::now() + self.args.backlog_timeout;
        let done = loop {
            let any: bool = self.db.query_one(&sql, &[]).await?.get(0);
            if !any {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let lsn1 = current_lsn(&self.db).await?;
        if let Some(note) = relay.stop().await {
            progress!("backlog: retention relay: {note}");
        }
        if !done {
            progress!(
                "backlog: the retention pass had not deleted every published row after {:?}",
                self.args.backlog_timeout
            );
            return Ok((None, published as u64));
        }
        let bytes = wal_diff(&self.db, &lsn0, &lsn1).await?;
        Ok((Some(bytes / published.max(1) as f64), published as u64))
    }
}

async fn current_lsn(db: &Client) -> Result<String> {
    Ok(db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .context("reading pg_current_wal_lsn()")?
        .get(0))
}

async fn wal_diff(db: &Client, from: &str, to: &str) -> Result<f64> {
    Ok(db
        .query_one(
            "SELECT pg_wal_lsn_diff($2::text::pg_lsn, $1::text::pg_lsn)::float8",
            &[&from, &to],
        )
        .await
        .context("pg_wal_lsn_diff")?
        .get(0))
}

/// The application: writers on a shared schedule, `rows_per_tx` INSERTs per
/// transaction on random keys, each commit recorded with its latency from
/// its scheduled start.
struct AppWriter {
    stop: Arc<AtomicBool>,
    commits: Arc<Mutex<Vec<Commit>>>,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
}

impl AppWriter {
    async fn start(
        url: &str,
        exchange: &str,
        keys: Keys,
        rows_per_tx: usize,
        rows_per_s: u64,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(Mutex::new(Vec::new()));
        // Each writer runs every `interval`, offset so the shared schedule is even.
        let tx_per_s = rows_per_s.max(1) as f64 / rows_per_tx as f64;
        let interval = Duration::from_secs_f64(APP_WRITERS as f64 / tx_per_s);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..APP_WRITERS {
            let client = pg_connect(url, "outbox-bench application").await?;
            let insert = client
                .prepare(&format!(
                    "INSERT INTO {SCHEMA}.messages (exchange, routing_key, partition_key, payload)
                     VALUES ($1, $2, $3, convert_to(rpad(md5(random()::text), 200, 'x'), 'UTF8'))"
                ))
                .await
                .context("preparing the application's INSERT")?;
            let exchange = exchange.to_string();
            let (stop, commits) = (stop.clone(), commits.clone());
            let mut next = start + interval.mul_f64(w as f64 / APP_WRITERS as f64);
            let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ (w as u64 + 1);
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep_until(next.into()).await;
                    let scheduled = next;
                    next += interval;
                    client.batch_execute("BEGIN").await?;
                    for _ in 0..rows_per_tx {
                        let k = 1 + xorshift(&mut seed) % u64::from(keys.partition_keys.max(1));
                        let r = 1 + xorshift(&mut seed) % u64::from(keys.routing_keys.max(1));
                        client
                            .execute(
                                &insert,
                                &[&exchange, &format!("rk.{r}"), &format!("key-{k}")],
                            )
                            .await?;
                    }
                    client.batch_execute("COMMIT").await?;
                    let done = Instant::now();
                    let latency_ms = (done - scheduled).as_secs_f64() * 1000.0;
                    commits.lock().unwrap_or_else(|e| e.into_inner()).push((
                        done,
                        rows_per_tx as u64,
                        latency_ms,
                    ));
                }
                Ok(())
            }));
        }
        Ok(Self {
            stop,
            commits,
            tasks,
        })
    }

    /// The commits that finished between `from` and `to`.
    fn window(&self, from: Instant, to: Instant) -> Result<AppWindow> {
        if self.tasks.iter().any(|t| t.is_finished()) {
            bail!("an application writer stopped early (its error follows when the phase ends)");
        }
        let commits = self.commits.lock().unwrap_or_else(|e| e.into_inner());
        let inside: Vec<&Commit> = commits
            .iter()
            .filter(|(at, _, _)| *at >= from && *at <= to)
            .collect();
        let rows = inside.iter().map(|c| c.1).sum();
        let latency_ms = inside.iter().map(|c| c.2).sum::<f64>() / inside.len().max(1) as f64;
        Ok(AppWindow {
            rows,
            wall_s: (to - from).as_secs_f64(),
            latency_ms,
        })
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => progress!("backlog: an application writer failed: {e:#}"),
                Err(e) => progress!("backlog: an application writer panicked: {e}"),
            }
        }
    }
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
