//! The control connection's statements: the heartbeat (lease renewal and
//! fallback poll) and lease release.

use std::time::Duration;

use tokio_postgres::types::Type;

use super::{check_schema, Session, Settings, Sql, StoreError};

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
    heartbeat: Sql,
    release: Sql,
}

impl Control {
    pub async fn prepare(session: &Session, schema: &str) -> Result<Self, StoreError> {
        check_schema(&session.client, schema).await?;
        Ok(Self {
            heartbeat: Sql::new(
                format!(
                    "SELECT partitions, next_due_in
                       FROM {schema}.relay_heartbeat($1, make_interval(secs => $2::float8), $3)"
                ),
                &[Type::TEXT, Type::FLOAT8, Type::TEXT],
            ),
            release: Sql::new(format!("SELECT {schema}.relay_release($1)"), &[Type::TEXT]),
        })
    }

    pub async fn heartbeat(
        &self,
        session: &Session,
        instance: &str,
        ttl: Duration,
        metrics_addr: &str,
    ) -> Result<Heartbeat, StoreError> {
        // Bounded by the lease ttl: a heartbeat later than that is worthless.
        let row = match tokio::time::timeout(
            ttl,
            self.heartbeat.run_with(
                &session.client,
                Settings::Bounded,
                &[&instance, &ttl.as_secs_f64(), &metrics_addr],
            ),
        )
        .await
        {
            Ok(result) => {
                let (mut rows, _) =
                    result.map_err(StoreError::query("relay heartbeat (leases)"))?;
                rows.pop().ok_or(StoreError::NoRow {
                    what: "relay heartbeat (leases)",
                })?
            }
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

    pub async fn release(&self, session: &Session, instance: &str) -> Result<(), StoreError> {
        // Bounded: a relay handing off waits on it, and a silent database
        // must end in a reconnect, not a wait forever.
        self.release
            .run_with(&session.client, Settings::Bounded, &[&instance])
            .await
            .map(|_| ())
            .map_err(StoreError::query("releasing leases"))
    }
}
