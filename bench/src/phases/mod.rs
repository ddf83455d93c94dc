//! The phases: what they share (connections, schema set-up, the evidence when
//! a phase fails) here; each phase is an `impl Bench` block in its own file.

use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lapin::{
    options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions, QueuePurgeOptions,
    },
    types::{FieldTable, LongString, ShortString},
    Channel, Connection, ConnectionProperties, ExchangeKind,
};
use tokio_postgres::{Client, NoTls};

use crate::{
    args::Args,
    consumer::Consumer,
    metrics::{claim_stats, metric},
    relay::{RelayBinary, RelayProc},
    results::StopNoted,
    sysinfo::{clock_ticks, tcp_ports_to},
    util::redact,
};
use pooled::Route;

mod app;
mod backlog;
mod ceiling;
mod cold;
mod drain;
mod growth;
mod idle;
mod keyed;
pub(crate) mod machine;
mod pgbench;
mod pooled;
mod scale;
mod steady;

pub(crate) use idle::QUIET_BEFORE_S;

pub(crate) struct Bench {
    pub(crate) args: Args,
    /// The relay under test; every relay of every phase starts from it.
    pub(crate) relay: RelayBinary,
    pub(crate) log_dir: PathBuf,
    db: Arc<Client>,
    /// The PostgreSQL backend serving `db`.
    backend_pid: i32,
    /// The PostgreSQL server's TCP port, to find the relay's connections.
    server_port: i32,
    database: String,
    /// The admin connection and channel (purges, queue depth), reopened when
    /// the broker closed them.
    admin: tokio::sync::Mutex<(Connection, Channel)>,
    clk_tck: f64,
}

impl Bench {
    pub(crate) async fn connect(args: Args, relay_bin: PathBuf) -> Result<Self> {
        let db = pg_connect(&args.database_url, "outbox-bench").await?;
        let row = db
            .query_one(
                "SELECT current_database(), pg_backend_pid(), inet_server_port()",
                &[],
            )
            .await?;
        let database: String = row.get(0);
        let backend_pid: i32 = row.get(1);
        let server_port: Option<i32> = row.get(2);
        let amqp = Connection::connect(
            &args.amqp_url,
            ConnectionProperties::default()
                .with_connection_name(LongString::from("outbox-bench admin")),
        )
        .await
        .with_context(|| format!("connecting to RabbitMQ at {}", redact(&args.amqp_url)))?;
        let admin = amqp.create_channel().await?;
        // A fresh durable classic queue: whatever an earlier run left is gone.
        admin
            .queue_delete(
                ShortString::from(args.queue.as_str()),
                QueueDeleteOptions::default(),
            )
            .await
            .context("deleting the bench queue")?;
        admin
            .queue_declare(
                ShortString::from(args.queue.as_str()),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("declaring the bench queue")?;
        // The keyed phases publish many routing keys: a topic exchange bound to
        // the bench queue with '#' takes them all.
        admin
            .exchange_delete(
                ShortString::from(args.exchange.as_str()),
                ExchangeDeleteOptions::default(),
            )
            .await
            .context("deleting the bench exchange")?;
        admin
            .exchange_declare(
                ShortString::from(args.exchange.as_str()),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("declaring the topic exchange {}", args.exchange))?;
        admin
            .queue_bind(
                ShortString::from(args.queue.as_str()),
                ShortString::from(args.exchange.as_str()),
                ShortString::from("#"),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| {
                format!(
                    "binding queue {} to exchange {} with '#'",
                    args.queue, args.exchange
                )
            })?;
        let log_dir = std::env::temp_dir().join(format!("outbox-bench-{}", std::process::id()));
        std::fs::create_dir_all(&log_dir)?;
        Ok(Self {
            relay: RelayBinary::new(relay_bin, &args.amqp_url, log_dir.clone()),
            args,
            log_dir,
            db: Arc::new(db),
            backend_pid,
            server_port: server_port.unwrap_or(5432),
            database,
            admin: tokio::sync::Mutex::new((amqp, admin)),
            clk_tck: clock_ticks(),
        })
    }

    /// The admin channel; a new one when the old was closed (a bench of
    /// several minutes on a loaded machine can lose it, e.g. to a missed
    /// heartbeat), so one broken channel does not fail every later phase.
    async fn admin(&self) -> Result<Channel> {
        let mut admin = self.admin.lock().await;
        if admin.1.status().connected() {
            return Ok(admin.1.clone());
        }
        progress!(
            "note: the bench's AMQP admin channel was closed (connection still connected: {}); reopening it",
            admin.0.status().connected()
        );
        let conn = Connection::connect(
            &self.args.amqp_url,
            ConnectionProperties::default()
                .with_connection_name(LongString::from("outbox-bench admin")),
        )
        .await
        .with_context(|| {
            format!(
                "reconnecting to RabbitMQ at {}",
                redact(&self.args.amqp_url)
            )
        })?;
        let channel = conn.create_channel().await?;
        *admin = (conn, channel.clone());
        Ok(channel)
    }

    pub(crate) async fn cleanup(&self) {
        let Ok(admin) = self.admin().await else {
            return;
        };
        let _ = admin
            .exchange_delete(
                ShortString::from(self.args.exchange.as_str()),
                ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = admin
            .queue_delete(
                ShortString::from(self.args.queue.as_str()),
                QueueDeleteOptions::default(),
            )
            .await;
    }

    async fn purge(&self) -> Result<()> {
        self.admin()
            .await?
            .queue_purge(
                ShortString::from(self.args.queue.as_str()),
                QueuePurgeOptions::default(),
            )
            .await
            .context("purging the bench queue")?;
        Ok(())
    }

    /// Drops the schema if an earlier run left it, and migrates it afresh.
    async fn fresh_schema(&self, db: &Client, database_url: &str, schema: &str) -> Result<()> {
        db.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await
            .with_context(|| format!("dropping schema {schema}"))?;
        self.relay.migrate(database_url, schema)
    }

    async fn drop_schema(&self, schema: &str) {
        if let Err(e) = self
            .db
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await
        {
            progress!("warning: could not drop schema {schema}: {e}");
        }
    }

    /// Bulk-inserts rows of `payload_bytes` each to the bench queue.
    async fn insert_rows(&self, schema: &str, n: u64, published: bool) -> Result<()> {
        let sql = format!(
            "INSERT INTO {schema}.messages (routing_key, payload, published_at)
             SELECT $1, convert_to(rpad(i::text, $2, '.'), 'UTF8'), CASE WHEN $3 THEN now() END
               FROM generate_series(1, $4::bigint) i"
        );
        let payload_bytes = i32::try_from(self.args.payload_bytes).context("payload size")?;
        self.db
            .execute(
                &sql,
                &[&self.args.queue, &payload_bytes, &published, &(n as i64)],
            )
            .await
            .with_context(|| format!("inserting {n} rows into {schema}.messages"))?;
        Ok(())
    }

    /// Statistics as autovacuum would have them, and no checkpoint debt from setup.
    async fn settle_table(&self, schema: &str) -> Result<()> {
        self.db
            .batch_execute(&format!("ANALYZE {schema}.messages"))
            .await?;
        if let Err(e) = self.db.batch_execute("CHECKPOINT").await {
            progress!(
                "note: CHECKPOINT not allowed ({e}); setup writes may overlap the measurement"
            );
        }
        Ok(())
    }

    /// Messages ready in the bench queue.
    async fn queue_depth(&self) -> Result<u32> {
        let q = self
            .admin()
            .await?
            .queue_declare(
                ShortString::from(self.args.queue.as_str()),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("reading the bench queue's depth")?;
        Ok(q.message_count())
    }

    async fn pending(&self, schema: &str) -> Result<i64> {
        Ok(self
            .db
            .query_one(
                &format!(
                    "SELECT count(*) FROM {schema}.messages
                      WHERE published_at IS NULL AND dead_lettered_at IS NULL"
                ),
                &[],
            )
            .await
            .with_context(|| format!("counting pending rows of {schema}.messages"))?
            .get(0))
    }

    /// Polls (a cheap EXISTS every 20 ms) until no row is pending; when it
    /// was first seen so.
    async fn wait_no_pending(&self, schema: &str, timeout: Duration) -> Result<Instant> {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {schema}.messages
                             WHERE published_at IS NULL AND dead_lettered_at IS NULL)"
        );
        let deadline = Instant::now() + timeout;
        loop {
            let asked = Instant::now();
            let any: bool = self
                .db
                .query_one(&sql, &[])
                .await
                .with_context(|| format!("polling pending rows of {schema}.messages"))?
                .get(0);
            if !any {
                return Ok(asked);
            }
            if asked > deadline {
                bail!(
                    "{} rows of {schema}.messages still pending after {timeout:?}",
                    self.pending(schema).await?
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn outbox_counts(&self, schema: &str) -> Result<OutboxCounts> {
        let row = self
            .db
            .query_one(
                &format!(
                    "SELECT count(*) FILTER (WHERE published_at IS NULL AND dead_lettered_at IS NULL),
                            count(*) FILTER (WHERE published_at IS NOT NULL),
                            count(*) FILTER (WHERE dead_lettered_at IS NOT NULL)
                       FROM {schema}.messages"
                ),
                &[],
            )
            .await?;
        Ok(OutboxCounts {
            pending: row.get(0),
            published: row.get(1),
            dead_lettered: row.get(2),
        })
    }

    /// PostgreSQL backends serving the relay: matched through the local ports of
    /// the relay's TCP connections to the server (through a pooler: of the
    /// pooler's, which serves that relay alone).
    async fn relay_backends(&self, relay: &RelayProc, route: Route<'_>) -> Vec<i32> {
        let pid = match route {
            Route::Direct => Some(relay.pid()),
            Route::Pooled { pooler, .. } => pooler.pid(),
        };
        let ports = pid.map_or_else(Vec::new, |pid| tcp_ports_to(pid, self.server_port));
        if ports.is_empty() {
            return Vec::new();
        }
        self.db
            .query(
                "SELECT pid FROM pg_stat_activity WHERE client_port = ANY($1::int4[])",
                &[&ports],
            )
            .await
            .map(|rows| rows.iter().map(|r| r.get(0)).collect())
            .unwrap_or_default()
    }

    async fn partitions_total(db: &Client, schema: &str) -> Result<f64> {
        let n: i64 = db
            .query_one(&format!("SELECT count(*) FROM {schema}.leases"), &[])
            .await?
            .get(0);
        Ok(n as f64)
    }

    /// Ends a measured phase: a failure carries the evidence (consumer,
    /// outbox, relay log); the relay is stopped and the consumer closed either
    /// way, and a result keeps how the relay stopped.
    async fn conclude<T: StopNoted>(
        &self,
        schema: &str,
        mut relay: RelayProc,
        consumer: Option<Consumer>,
        measured: Result<T>,
    ) -> Result<T> {
        let measured = match measured {
            Ok(m) => Ok(m),
            Err(e) => Err(anyhow::anyhow!(
                "{e:#}\n{}",
                self.evidence(schema, &mut relay, consumer.as_ref()).await
            )),
        };
        let stop_note = relay.stop().await;
        if let Some(c) = consumer {
            c.close().await;
        }
        let mut run = measured?;
        run.set_stop_note(stop_note);
        Ok(run)
    }

    /// What went wrong, with the evidence: database state and the relay's log.
    async fn evidence(
        &self,
        schema: &str,
        relay: &mut RelayProc,
        consumer: Option<&Consumer>,
    ) -> String {
        let mut s = String::new();
        match consumer {
            Some(consumer) => {
                let (deliveries, distinct) = consumer.counts();
                let _ = write!(
                    s,
                    "consumer saw {distinct} distinct messages ({deliveries} deliveries); "
                );
            }
            None => match self.queue_depth().await {
                Ok(n) => {
                    let _ = write!(s, "no consumer; {n} messages in the queue; ");
                }
                Err(e) => {
                    let _ = write!(s, "no consumer; {e:#}; ");
                }
            },
        }
        match self.outbox_counts(schema).await {
            Ok(c) => {
                let _ = write!(
                    s,
                    "{schema}.messages: {} pending, {} published, {} dead-lettered; ",
                    c.pending, c.published, c.dead_lettered
                );
            }
            Err(e) => {
                let _ = write!(s, "cannot count {schema}.messages: {e}; ");
            }
        }
        match relay.exited() {
            Some(status) => {
                let _ = write!(s, "relay exited: {status}; ");
            }
            None => {
                let _ = write!(s, "relay still running (pid {}); ", relay.pid());
                if let Ok((_, m)) = relay.get("/metrics").await {
                    for name in [
                        "outbox_relay_messages_published_total",
                        "outbox_relay_partitions_owned",
                        "outbox_relay_broker_connected",
                        "outbox_relay_database_connected",
                        "outbox_relay_broker_blocked",
                    ] {
                        if let Some(v) = metric(&m, name) {
                            let _ = write!(s, "{name} {v}; ");
                        }
                    }
                    if let Some(c) = claim_stats("", &m) {
                        let _ = write!(
                            s,
                            "claims since start: {}, p50 ≈ {:.1} ms, p99 ≈ {:.1} ms, slowest ≤ {:.1} ms (inf: beyond the last bucket), {} beyond {:.1} s; ",
                            c.count,
                            c.p50_ms,
                            c.p99_ms,
                            c.max_le_ms,
                            c.beyond_last_bucket,
                            c.last_bucket_ms / 1000.0
                        );
                    }
                    for line in m.lines().filter(|l| {
                        l.starts_with("outbox_relay_publish_failures_total{") && !l.ends_with(" 0")
                    }) {
                        let _ = write!(s, "{line}; ");
                    }
                }
            }
        }
        let _ = write!(
            s,
            "relay log {}, last lines:\n{}",
            relay.log.display(),
            relay.log_tail(15)
        );
        s
    }
}

struct OutboxCounts {
    pending: i64,
    published: i64,
    dead_lettered: i64,
}

async fn pg_connect(url: &str, application_name: &str) -> Result<Client> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .with_context(|| format!("parsing the database URL {}", redact(url)))?;
    config.application_name(application_name);
    let (client, connection) = config
        .connect(NoTls)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", redact(url)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The oldest pending row's age, sampled often while a relay drains: a walk
/// of the pending index from the first pending id the last sample found, not
/// from the start. From the start, each sample would walk the dead entries of
/// every row relayed so far (a held snapshot keeps them all), costing the
/// database as much as a claim without a floor, on the same 2 cores as the
/// relay it measures. The first pending row by id stands for the oldest: the
/// bench's rows get ids and `created_at` in the same order, up to concurrent
/// inserts a few milliseconds apart.
pub(crate) struct OldestPending {
    sql: String,
    from: i64,
}

impl OldestPending {
    pub(crate) fn new(schema: &str) -> Self {
        Self {
            sql: format!(
                "SELECT id, greatest(extract(epoch FROM now() - created_at), 0)::float8
                   FROM {schema}.messages
                  WHERE published_at IS NULL AND dead_lettered_at IS NULL AND id >= $1
                  ORDER BY id LIMIT 1"
            ),
            from: 0,
        }
    }

    /// Seconds (0 when nothing is pending).
    pub(crate) async fn age(&mut self, db: &Client) -> Result<f64, tokio_postgres::Error> {
        Ok(match db.query_opt(&self.sql, &[&self.from]).await? {
            Some(row) => {
                self.from = row.get(0);
                row.get(1)
            }
            None => 0.0,
        })
    }

    /// Pending rows from the first the last sample found (the rows below it
    /// were relayed): a count that walks the backlog, not the table's history.
    pub(crate) async fn pending(&self, db: &Client, schema: &str) -> Result<i64> {
        Ok(db
            .query_one(
                &format!(
                    "SELECT count(*) FROM {schema}.messages
                      WHERE published_at IS NULL AND dead_lettered_at IS NULL AND id >= $1"
                ),
                &[&self.from],
            )
            .await
            .with_context(|| format!("counting pending rows of {schema}.messages"))?
            .get(0))
    }
}
