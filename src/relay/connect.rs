//! The connections: the database and the broker, connected and replaced
//! when lost (which broker node to try next), and what a failed statement
//! does to the loop.

use super::{
    action::{action, Action, Fault, Trouble},
    Relay,
};
use crate::{
    backoff::{next_delay, next_statement_delay},
    metrics::Peer,
    publisher::Publisher,
    store::{Store, StoreError},
};

impl Relay {
    pub(super) async fn ensure_store(&mut self) -> bool {
        if self.store.as_ref().is_some_and(|s| !s.is_closed()) {
            return true;
        }
        if self.store.take().is_some() {
            tracing::warn!("lost the database connection; reconnecting");
        }
        self.metrics.database_connected.set(0);
        // Behind a transaction-mode pooler (`listen = false`) nothing may live on
        // a server session; otherwise the hot path prepares its statements once.
        let connected = Store::connect(&self.cfg.conn, self.cfg.listen).await;
        self.metrics
            .connection_attempt(Peer::Database, connected.is_ok());
        match connected {
            Ok(store) => {
                tracing::info!("connected to PostgreSQL");
                self.store = Some(store);
                self.floor.reset();
                self.idle.forget();
                self.metrics.database_connected.set(1);
                self.db_backoff = None;
                self.more = true;
                self.noted_node = None;
                self.note_broker_node().await;
                true
            }
            Err(e) => {
                let delay = next_delay(&mut self.db_backoff);
                tracing::warn!(error = %e, retry_in = ?delay, "database unavailable");
                self.pause(delay).await;
                false
            }
        }
    }

    /// The one place that decides to replace the channel or the connection:
    /// from what the ledger learned of faults and what the connection says.
    pub(super) async fn ensure_publisher(&mut self) -> bool {
        let noted = self.ledger.take_trouble();
        let trouble = match &self.publisher {
            None => action(Fault::ConnectionLost).trouble(),
            Some(p) if !p.is_connected() => action(Fault::ConnectionLost).trouble(),
            Some(p) if !p.channel_usable() => noted.max(action(Fault::ChannelClosed).trouble()),
            Some(_) => noted,
        };
        match trouble {
            None => return true,
            Some(Trouble::Channel) => {
                // Nothing unconfirmed on the old channel can be confirmed now.
                self.ledger.reset(Fault::ChannelClosed);
                self.more = true;
                if let Some(p) = self.publisher.as_mut() {
                    match p.reopen_channel().await {
                        Ok(()) => return true,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot reopen the publishing channel")
                        }
                    }
                }
            }
            Some(Trouble::Connection) => {}
        }
        if let Some(p) = self.publisher.take() {
            tracing::warn!(
                node = p.node(),
                "lost the RabbitMQ connection; reconnecting"
            );
            // A hung node would hold the polite close for its whole timeout:
            // the next node is tried meanwhile.
            tokio::spawn(async move { p.close().await });
        }
        // Whatever was in flight or waiting on the old connection is pending
        // again, and the key bookkeeping starts over.
        self.ledger.reset(Fault::ConnectionLost);
        self.more = true;
        self.metrics.broker_node(None, false);
        self.can_publish
            .send_if_modified(|up| std::mem::replace(up, false));
        // Nodes in the order given, starting after the one just lost; a pause
        // (backoff) only once every node has refused.
        let urls = &self.cfg.conn.amqp_urls;
        let mut last_error = None;
        for _ in 0..urls.len() {
            let url = &urls[self.next_node % urls.len()];
            let node = &self.cfg.conn.amqp_nodes[self.next_node % urls.len()];
            self.next_node = (self.next_node + 1) % urls.len();
            let connected =
                Publisher::connect(url, &self.cfg.conn.amqp_tls, self.cfg.allow_unroutable).await;
            self.metrics
                .connection_attempt(Peer::Broker, connected.is_ok());
            match connected {
                Ok(p) => {
                    tracing::info!(node = p.node(), "connected to RabbitMQ");
                    self.metrics.broker_node(Some(p.node()), true);
                    self.publisher = Some(p);
                    self.can_publish
                        .send_if_modified(|up| !std::mem::replace(up, true));
                    // A hand-off while disconnected removed the relay's row
                    // (idle flag included): say it again when next idle.
                    self.idle.forget();
                    self.amqp_backoff = None;
                    self.note_broker_node().await;
                    return true;
                }
                Err(e) => {
                    if urls.len() > 1 {
                        tracing::warn!(node = %node, error = %e, "RabbitMQ node unavailable; trying the next");
                    }
                    last_error = Some(e);
                }
            }
            // Each node may take its whole connect timeout: the loop still turns.
            self.metrics.beat();
            if self.stopping() {
                break;
            }
        }
        let delay = next_delay(&mut self.amqp_backoff);
        if let Some(e) = last_error {
            tracing::warn!(error = %e, retry_in = ?delay, "broker unavailable");
        }
        self.note_broker_node().await;
        self.pause(delay).await;
        false
    }

    /// Records the connected node in the relay's row (for `status`) when it
    /// changed; retried on the next connect or database reconnect if it fails.
    async fn note_broker_node(&mut self) {
        let node = self.publisher.as_ref().map(|p| p.node().to_string());
        if self.noted_node.as_ref() == Some(&node) {
            return;
        }
        let Some(store) = &self.store else { return };
        match store
            .note_broker_node(&self.cfg.instance_id, node.as_deref())
            .await
        {
            Ok(()) => self.noted_node = Some(node),
            Err(e) => self.database_error(e),
        }
    }

    /// Counts and logs (a few lines a minute per kind) a failed statement, and
    /// makes the loop back off before its next turn.
    pub(super) fn database_error(&mut self, e: StoreError) {
        let statement = e.statement();
        self.metrics.database_error(statement);
        let kind = format!("{statement}:{}", e.sqlstate().unwrap_or("-"));
        let delay = next_statement_delay(&mut self.statement_backoff);
        match self.log_limit.allow(&kind) {
            Some(0) => tracing::warn!(
                error = %e,
                statement,
                retry_in = ?delay,
                "database statement failed; confirmed rows stay pending until marked"
            ),
            Some(suppressed) => tracing::warn!(
                error = %e,
                statement,
                retry_in = ?delay,
                suppressed,
                "database statement failed again ({suppressed} failures like it not logged since the last line); confirmed rows stay pending until marked"
            ),
            None => {}
        }
        self.statement_pause = Some(delay);
        let fault = if e.is_connection_lost() {
            Fault::DatabaseLost
        } else {
            Fault::StatementFailed
        };
        if action(fault) == Action::ReconnectDatabase {
            self.store = None;
            self.metrics.database_connected.set(0);
        }
    }
}
