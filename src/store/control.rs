//! The control connection's statements: the heartbeat (lease renewal and
//! fallback poll) and lease release.

use std::time::Duration;

use tokio_postgres::types::Type;

use super::{check_schema, predicates, Session, Settings, Sql, StoreError};

/// What the relay's heartbeat learns: its leases and its partitions' due rows.
#[derive(Debug, Clone, Default)]
pub struct Heartbeat {
    pub partitions: Vec<i16>,
    /// Seconds until the next pending row of our partitions that is not yet
    /// due becomes due.
    pub next_due_in: Option<f64>,
    /// The first pending row of our partitions that is due now, from the
    /// `from` id the heartbeat was given (see [`Control::heartbeat`]).
    pub first_due: Option<i64>,
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
            // The first due row from $4 (the claim floor, when the leases
            // are still the partitions $5 it is for; else from the start):
            // through the pending index in id order, so it walks the dead
            // entries of relayed rows only while the floor is 0 (just after
            // a start or a lease change). Rows below the floor are the
            // housekeeping connection's sweep.
            heartbeat: Sql::new(
                format!(
                    "SELECT h.partitions, h.next_due_in, ({first_due})
                       FROM {schema}.relay_heartbeat($1, make_interval(secs => $2::float8), $3) h",
                    first_due = predicates::first_due(
                        schema,
                        "h.partitions",
                        Some("CASE WHEN h.partitions = $5::smallint[] THEN $4::int8 ELSE 0 END"),
                    ),
                ),
                &[
                    Type::TEXT,
                    Type::FLOAT8,
                    Type::TEXT,
                    Type::INT8,
                    Type::INT2_ARRAY,
                ],
            ),
            release: Sql::new(format!("SELECT {schema}.relay_release($1)"), &[Type::TEXT]),
        })
    }

    /// Renews the leases and looks for due rows of the partitions held from
    /// id `from` when they are still `floor_partitions` (else from the start).
    pub async fn heartbeat(
        &self,
        session: &Session,
        instance: &str,
        ttl: Duration,
        metrics_addr: &str,
        (floor_partitions, from): (&[i16], i64),
    ) -> Result<Heartbeat, StoreError> {
        // Bounded by the lease ttl: a heartbeat later than that is worthless.
        let row = match tokio::time::timeout(
            ttl,
            self.heartbeat.run_with(
                &session.client,
                Settings::Bounded,
                &[
                    &instance,
                    &ttl.as_secs_f64(),
                    &metrics_addr,
                    &from,
                    &floor_partitions,
                ],
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
            first_due: row.try_get(2).map_err(decode())?,
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
