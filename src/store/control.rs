//! The control connection's statements: the heartbeat (lease renewal and
//! fallback poll) and lease release.

use std::time::Duration;

use tokio_postgres::{Client, Statement};

use super::{bounded, prepare_in, StoreError};

/// What the relay's heartbeat learns: its leases, the next due row, the backlog.
#[derive(Debug, Clone, Default)]
pub struct Heartbeat {
    pub partitions: Vec<i16>,
    /// Seconds until the next pending row of our partitions is due (<= 0: now).
    pub next_due_in: Option<f64>,
}

/// The control connection's statements: heartbeat and lease release. Nothing
/// else runs on that connection, so a renewal never waits behind slow work.
pub struct Control {
    heartbeat: Statement,
    release: Statement,
}

impl Control {
    pub async fn prepare(client: &Client, schema: &str) -> Result<Self, StoreError> {
        Ok(Self {
            heartbeat: prepare_in(
                client,
                schema,
                format!(
                    "SELECT partitions, next_due_in
                       FROM {schema}.relay_heartbeat($1, make_interval(secs => $2::float8), $3)"
                ),
            )
            .await?,
            release: prepare_in(client, schema, format!("SELECT {schema}.relay_release($1)"))
                .await?,
        })
    }

    pub async fn heartbeat(
        &self,
        client: &Client,
        instance: &str,
        ttl: Duration,
        metrics_addr: &str,
    ) -> Result<Heartbeat, StoreError> {
        // Bounded by the lease ttl: a heartbeat later than that is worthless.
        let row = match tokio::time::timeout(
            ttl,
            client.query_one(
                &self.heartbeat,
                &[&instance, &ttl.as_secs_f64(), &metrics_addr],
            ),
        )
        .await
        {
            Ok(row) => row.map_err(StoreError::query("relay heartbeat (leases)"))?,
            Err(_) => {
                return Err(StoreError::Timeout {
                    what: "relay heartbeat (leases)",
                })
            }
        };
        let decode = || StoreError::decode("relay heartbeat (leases)");
        Ok(Heartbeat {
            partitions: row.try_get(0).map_err(decode())?,
            next_due_in: row.try_get(1).map_err(decode())?,
        })
    }

    pub async fn release(&self, client: &Client, instance: &str) -> Result<(), StoreError> {
        // Bounded: a relay handing off waits on it, and a silent database
        // must end in a reconnect, not a wait forever.
        bounded(
            "releasing leases",
            client.execute(&self.release, &[&instance]),
        )
        .await
        .map(|_| ())
    }
}
