//! One database connection outside the hot path (the control and
//! housekeeping connections, the operator commands): the store's statements
//! take a `Session`, so no caller holds a driver type. Dropping it ends the
//! task that drives the connection.

use futures_util::StreamExt;
use tokio::{sync::watch, task::JoinHandle};
use tokio_postgres::{AsyncMessage, Client};

use super::{
    connect_raw,
    migrations::{self, Applied, MigrateError},
    StoreError,
};

pub struct Session {
    pub(super) client: Client,
    task: JoinHandle<()>,
    /// Becomes true when the connection task ends.
    closed: watch::Receiver<bool>,
}

impl Session {
    /// Opens one connection; its task drives it and ends when it breaks.
    pub async fn connect(database_url: &str, application_name: &str) -> Result<Self, StoreError> {
        let (client, connection) = connect_raw(database_url, application_name).await?;
        let (closed_tx, closed) = watch::channel(false);
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "database connection closed");
            }
            let _ = closed_tx.send(true);
        });
        Ok(Self {
            client,
            task,
            closed,
        })
    }

    /// The control connection: each notification (see [`Session::listen`])
    /// calls `on_notification`; a connection error is logged and ends it.
    pub async fn connect_notified(
        database_url: &str,
        application_name: &str,
        on_notification: impl Fn() + Send + 'static,
    ) -> Result<Self, StoreError> {
        let (client, mut connection) = connect_raw(database_url, application_name).await?;
        let (closed_tx, closed) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => on_notification(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "control connection error");
                        break;
                    }
                }
            }
            let _ = closed_tx.send(true);
        });
        Ok(Self {
            client,
            task,
            closed,
        })
    }

    /// Whether the connection has closed (a statement would fail at once).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Changes to true when the connection ends.
    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.clone()
    }

    /// Asks the server for the notifications of the applications' insert trigger.
    pub async fn listen(&self, schema: &str) -> Result<(), StoreError> {
        self.client
            .batch_execute(&format!("LISTEN \"{schema}.messages\""))
            .await
            .map_err(StoreError::query("LISTEN for new outbox rows"))
    }

    /// The schema's version, or why this relay cannot use it.
    pub async fn verify_schema(&self, schema: &str) -> Result<i32, MigrateError> {
        migrations::verify(&self.client, schema).await
    }

    /// The SQL `migrate` would run, changing nothing.
    pub async fn pending_migrations_sql(&self, schema: &str) -> Result<String, MigrateError> {
        migrations::pending_sql(&self.client, schema).await
    }

    /// Applies the migrations the schema lacks, then the functions and
    /// triggers if their set changed; what was applied.
    pub async fn apply_migrations(&mut self, schema: &str) -> Result<Applied, MigrateError> {
        migrations::apply(&mut self.client, schema).await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}
