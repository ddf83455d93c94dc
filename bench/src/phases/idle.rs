//! Phase 4, idle: statements per second the relay sends with nothing to do,
//! from `QUIET_BEFORE_S` after it drained a backlog (as a relay lives: bursts,
//! then quiet).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{anyhow, bail, Context, Result};
use tokio_postgres::Client;

/// Seconds from the end of the drain to the start of the idle window. A
/// backend that went quiet reports the transactions of its last second to the
/// statistics up to 10 s later (PostgreSQL's idle statistics flush), so a
/// window that starts sooner counts some of the drain's transactions as idle
/// ones.
pub(crate) const QUIET_BEFORE_S: u64 = 12;

use super::{pg_connect, pooled::Route, Bench};
use crate::{
    metrics::claim_stats,
    results::{IdleRun, PoolerRates},
    util::with_database,
};

impl Bench {
    pub(crate) async fn idle_once(&self, run: usize) -> Result<IdleRun> {
        self.idle_via(
            &format!("bench_idle_{run}"),
            &format!("idle-{run}"),
            Route::Direct,
        )
        .await
    }

    /// The same, the relay connected by `route` (the bench's setup, drain
    /// rows and counters go direct).
    pub(super) async fn idle_via(
        &self,
        schema: &str,
        label: &str,
        route: Route<'_>,
    ) -> Result<IdleRun> {
        // A database of its own: its pg_stat_database counters see the relay and
        // nothing else (the bench reads them from its main connection).
        let own = format!("{}_bench_idle", self.database);
        let _ = self
            .db
            .batch_execute(&format!("DROP DATABASE IF EXISTS {own} WITH (FORCE)"))
            .await;
        let dedicated = match self
            .db
            .batch_execute(&format!("CREATE DATABASE {own} TEMPLATE template0"))
            .await
        {
            Ok(()) => true,
            Err(e) => {
                progress!("note: cannot create database {own} ({e}); measuring with and without the relay in {}", self.database);
                false
            }
        };
        let (database, url) = if dedicated {
            (own.clone(), with_database(&self.args.database_url, &own)?)
        } else {
            (self.database.clone(), self.args.database_url.clone())
        };
        let r = async {
            let partitions = {
                let client = pg_connect(&url, "outbox-bench setup").await?;
                self.fresh_schema(&client, &url, schema).await?;
                Self::partitions_total(&client, schema).await?
            };
            let at = IdleAt {
                database: &database,
                url: &url,
                schema,
                dedicated,
            };
            self.idle_measure(at, partitions, label, route).await
        }
        .await;
        if dedicated {
            if let Err(e) = self
                .db
                .batch_execute(&format!("DROP DATABASE IF EXISTS {own} WITH (FORCE)"))
                .await
            {
                progress!("warning: could not drop database {own}: {e}");
            }
        } else {
            self.drop_schema(schema).await;
        }
        r
    }

    async fn idle_measure(
        &self,
        at: IdleAt<'_>,
        partitions: f64,
        label: &str,
        route: Route<'_>,
    ) -> Result<IdleRun> {
        let IdleAt {
            database,
            url,
            schema,
            dedicated,
        } = at;
        let window = self.args.idle_duration;
        // Let the setup connection's statistics reach pg_stat_database, then the baseline.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let baseline_window = if dedicated {
            Duration::from_secs(5)
        } else {
            window
        };
        let (b0, bt0) = (self.transactions(database).await?, Instant::now());
        tokio::time::sleep(baseline_window).await;
        let (b1, bt1) = (self.transactions(database).await?, Instant::now());
        let baseline_per_s = (b1 - b0) as f64 / (bt1 - bt0).as_secs_f64();

        let mut relay = self.spawn_via(route, database, schema, label)?;
        let measured = async {
            relay.wait_ready(partitions, Duration::from_secs(30)).await?;
            // A backlog drained first, then the window from QUIET_BEFORE_S
            // after the database showed none pending.
            let drained = self.args.idle_drain_rows;
            let app = pg_connect(url, "outbox-bench app").await?;
            app.execute(
                &format!(
                    "INSERT INTO {schema}.messages (routing_key, payload)
                     SELECT $1, convert_to(rpad(i::text, 200, '.'), 'UTF8')
                       FROM generate_series(1, $2::bigint) i"
                ),
                &[&self.args.queue, &(drained as i64)],
            )
            .await
            .with_context(|| format!("inserting {drained} rows to drain"))?;
            let pending = format!(
                "SELECT EXISTS (SELECT 1 FROM {schema}.messages
                                 WHERE published_at IS NULL AND dead_lettered_at IS NULL)"
            );
            let deadline = Instant::now() + self.args.stall_timeout;
            loop {
                let any: bool = app.query_one(&pending, &[]).await?.get(0);
                if !any {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "the relay did not drain {drained} rows within {:?}",
                        self.args.stall_timeout
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            drop(app);
            tokio::time::sleep(Duration::from_secs(QUIET_BEFORE_S)).await;
            let scrape_before = relay.scrape().await?;
            let pooler = match route {
                Route::Pooled { pooler, .. } => Some(pooler),
                Route::Direct => None,
            };
            let p0 = match pooler {
                Some(p) => Some(p.counts(database).await?),
                None => None,
            };
            let (c0, t0) = (self.transactions(database).await?, Instant::now());
            // Through the pooler its server connections run the relay's
            // statements (and the pooler's own): in a database of its own, all
            // of them count.
            let sampler = tokio::spawn(count_statements(
                self.db.clone(),
                database.to_string(),
                pooler.is_some() && dedicated,
                SystemTime::now(),
                t0 + window,
            ));
            tokio::time::sleep(window).await;
            let (c1, t1) = (self.transactions(database).await?, Instant::now());
            let p1 = match pooler {
                Some(p) => Some(p.counts(database).await?),
                None => None,
            };
            let statements = sampler
                .await
                .context("statement sampler")?
                .context("sampling pg_stat_activity")?;
            if let Some(status) = relay.exited() {
                bail!("the relay exited during the idle window: {status}");
            }
            let window_s = (t1 - t0).as_secs_f64();
            let total_per_s = (c1 - c0) as f64 / window_s;
            let claims = claim_stats(&scrape_before, &relay.scrape().await?);
            let pooler = match (p0, p1) {
                (Some(p0), Some(p1)) => Some(PoolerRates {
                    xacts_per_s: (p1.transactions - p0.transactions) as f64 / window_s,
                    queries_per_s: (p1.queries - p0.queries) as f64 / window_s,
                }),
                _ => None,
            };
            Ok(IdleRun {
                method: if dedicated && pooler.is_some() {
                    format!(
                        "statements: each new query_start of any backend in database {database} (the pooler's server \
                         connections, serving the relay alone) in pg_stat_activity, sampled every 10 ms; transactions: \
                         xact_commit+xact_rollback of {database} minus a 5 s baseline without the relay; the pooler's \
                         SHOW STATS (total_xact_count, total_query_count of {database}) over the same window"
                    )
                } else if dedicated {
                    format!(
                        "statements: each new query_start of the relay's backends in pg_stat_activity, sampled every 10 ms \
                         (idle statements are ~1 s apart, so none is missed); transactions: xact_commit+xact_rollback of \
                         database {database}, which only the relay uses, minus a 5 s baseline without the relay; \
                         the window starts {QUIET_BEFORE_S} s after the drain, past PostgreSQL's 10 s delay in reporting \
                         the transactions of a backend that went quiet"
                    )
                } else {
                    format!(
                        "statements: new query_start values of backends named outbox-relay* in {database}, sampled every 10 ms \
                         (other relays on this server would be counted too); transactions: xact_commit+xact_rollback of {database} \
                         with the relay minus the same without it (other clients add noise)"
                    )
                },
                statements_per_s: statements as f64 / window_s,
                xacts_per_s: total_per_s - baseline_per_s,
                baseline_per_s,
                window_s,
                drained,
                claims,
                pooler,
                stop_note: None,
            })
        }
        .await;
        let measured = match measured {
            Ok(m) => Ok(m),
            Err(e) => Err(anyhow!("{e:#}\nrelay log tail:\n{}", relay.log_tail(15))),
        };
        let stop_note = relay.stop().await;
        let mut run = measured?;
        run.stop_note = stop_note;
        Ok(run)
    }

    /// Transactions committed or rolled back in a database (cumulative).
    async fn transactions(&self, database: &str) -> Result<i64> {
        Ok(self
            .db
            .query_one(
                "SELECT coalesce(sum(xact_commit + xact_rollback), 0)::bigint
                   FROM pg_stat_database WHERE datname = $1",
                &[&database],
            )
            .await?
            .get(0))
    }
}

/// Where the idle relay is measured: its database (`url`, direct) and schema;
/// `dedicated` when only the relay uses that database.
#[derive(Clone, Copy)]
struct IdleAt<'a> {
    database: &'a str,
    url: &'a str,
    schema: &'a str,
    dedicated: bool,
}

/// Counts the statements the relay's backends start until `end`: every new
/// `query_start` seen in pg_stat_activity (sampled every 10 ms, from another
/// database, so the sampling itself is not counted).
async fn count_statements(
    db: Arc<Client>,
    database: String,
    all_backends: bool,
    since: SystemTime,
    end: Instant,
) -> Result<u64, tokio_postgres::Error> {
    let mut last: HashMap<i32, SystemTime> = HashMap::new();
    let mut started = 0u64;
    while Instant::now() < end {
        let rows = db
            .query(
                "SELECT pid, query_start FROM pg_stat_activity
                  WHERE datname = $1 AND ($2 OR application_name LIKE 'outbox-relay%')
                    AND backend_type = 'client backend' AND query_start IS NOT NULL",
                &[&database, &all_backends],
            )
            .await?;
        for row in rows {
            let pid: i32 = row.get(0);
            let query_start: SystemTime = row.get(1);
            match last.insert(pid, query_start) {
                Some(previous) if previous != query_start => started += 1,
                None if query_start >= since => started += 1,
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(started)
}
