//! Phase 13, pooled (issue 20): the relay through a private PgBouncer in
//! transaction mode (`--listen false`, so new rows wait for the next poll)
//! beside the same relay direct, in one run: the drain of an unkeyed backlog
//! against the bare publisher, the lag at 1,000 rows/s, and what an idle relay
//! costs its database.

use anyhow::{Context, Result};

use super::Bench;
use crate::{
    private_pooler::PrivatePooler,
    relay::RelayProc,
    results::{DrainRun, IdleRun, PooledRun, SteadyRun},
    util::with_database,
};

/// How a relay reaches PostgreSQL: directly, or through the private pooler
/// with the flags a transaction pooler needs.
#[derive(Clone, Copy)]
pub(crate) enum Route<'a> {
    Direct,
    Pooled {
        pooler: &'a PrivatePooler,
        poll_interval: &'a str,
    },
}

impl Bench {
    /// `outbox-relay run` on `schema` of `database`, connected by `route`.
    pub(super) fn spawn_via(
        &self,
        route: Route<'_>,
        database: &str,
        schema: &str,
        label: &str,
    ) -> Result<RelayProc> {
        match route {
            Route::Direct if database == self.database => {
                self.relay.spawn(&self.args.database_url, schema, label)
            }
            Route::Direct => {
                let url = with_database(&self.args.database_url, database)?;
                self.relay.spawn(&url, schema, label)
            }
            Route::Pooled {
                pooler,
                poll_interval,
            } => self.relay.spawn_with(
                &pooler.url(database),
                schema,
                label,
                &["--listen", "false", "--poll-interval", poll_interval],
            ),
        }
    }

    pub(crate) async fn pooled_once(&self) -> Result<PooledRun> {
        let pooler = PrivatePooler::start(
            &self.log_dir.join("pgbouncer"),
            self.args.pooled_pool_size.max(1),
            self.server_port,
        )
        .context("starting the pooled phase's private PgBouncer")?;
        let poll = humantime::format_duration(self.args.pooled_poll_interval).to_string();
        let pooled = Route::Pooled {
            pooler: &pooler,
            poll_interval: &poll,
        };
        progress!("pooled: bare publisher, {} messages", self.args.messages);
        let ceiling = self.ceiling_once(1).await;
        report("ceiling", &ceiling);
        let drain_direct = self.pooled_drain("direct", Route::Direct).await;
        let drain_pooled = self.pooled_drain("pooled", pooled).await;
        let rate = self.args.pooled_rate;
        let lag_direct = self.pooled_lag("direct", rate, Route::Direct).await;
        let lag_pooled = self.pooled_lag("pooled", rate, pooled).await;
        let idle_direct = self.pooled_idle("direct", Route::Direct).await;
        let idle_pooled = self.pooled_idle("pooled", pooled).await;
        drop(pooler);
        Ok(PooledRun {
            pool_size: self.args.pooled_pool_size.max(1),
            poll_interval: self.args.pooled_poll_interval,
            ceiling: failure_text(ceiling),
            drain_direct: failure_text(drain_direct),
            drain_pooled: failure_text(drain_pooled),
            rate,
            lag_direct: failure_text(lag_direct),
            lag_pooled: failure_text(lag_pooled),
            idle_direct: failure_text(idle_direct),
            idle_pooled: failure_text(idle_pooled),
        })
    }

    /// The unkeyed backlog of the drain phase (`--messages` rows, default
    /// exchange), drained by a relay connected by `route`.
    async fn pooled_drain(&self, side: &str, route: Route<'_>) -> Result<DrainRun> {
        progress!(
            "pooled: drain of {} pending rows, {side}",
            self.args.messages
        );
        let schema = format!("bench_pooled_drain_{side}");
        let r = async {
            self.fresh_schema(&self.db, &self.args.database_url, &schema)
                .await?;
            self.insert_rows(&schema, self.args.messages, false).await?;
            self.settle_table(&schema).await?;
            self.drain_via(&schema, &format!("pooled-drain-{side}"), route)
                .await
        }
        .await;
        self.drop_schema(&schema).await;
        report(&format!("drain {side}"), &r);
        r
    }

    /// The steady phase at `rate` (application direct), the relay by `route`.
    async fn pooled_lag(&self, side: &str, rate: u64, route: Route<'_>) -> Result<SteadyRun> {
        progress!(
            "pooled: {rate} rows/s for {:?}, {side}",
            self.args.steady_duration
        );
        let r = self
            .steady_in(
                &format!("bench_pooled_steady_{side}"),
                rate,
                &format!("pooled-steady-{side}"),
                route,
            )
            .await;
        report(&format!("lag {side}"), &r);
        r
    }

    /// The idle phase (a database of its own), the relay by `route`.
    async fn pooled_idle(&self, side: &str, route: Route<'_>) -> Result<IdleRun> {
        progress!(
            "pooled: idle relay for {:?}, {side}",
            self.args.idle_duration
        );
        let r = self
            .idle_via(
                &format!("bench_pooled_idle_{side}"),
                &format!("pooled-idle-{side}"),
                route,
            )
            .await;
        report(&format!("idle {side}"), &r);
        r
    }
}

fn failure_text<T>(r: Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{e:#}"))
}

fn report<T: std::fmt::Debug>(what: &str, r: &Result<T>) {
    match r {
        Ok(v) => progress!("pooled {what}: {v:?}"),
        Err(e) => progress!("pooled {what} FAILED: {e:#}"),
    }
}
