//! Every AMQP call: connect, confirm-mode channel, exchange checks, publish.
//! What a row becomes as a message is in `message`, what a confirm means in
//! `confirm`; no lapin type leaves this module.

mod confirm;
mod message;
mod tls;
mod url;

use confirm::fault;
pub use confirm::{since, BrokerFault, Confirm, Verdict};
pub use message::{header_frame_bytes, prepare, Prepared};
pub use tls::{node_name, tls_config, TlsFileError};
use url::amqp_uri;
pub use url::{broker_tls_warning, check_amqp_nodes_agree, check_amqp_url};

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::time::Instant;

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions},
    types::{FieldTable, LongString, ShortString},
    Channel, Connection, ConnectionProperties, ExchangeKind, PublisherConfirm,
};

use async_rs::{util::RuntimeParts, Runtime, Tokio};
use lapin::tcp::AMQPUriTcpExt;

use crate::{
    bounded::ExpiringMap,
    config::AmqpTlsFiles,
    fence::{FencedReactor, WriteFence},
    redact::redact_url,
    rows::OutboxRow,
};

/// How long a positive exchange check is trusted before asking the broker again.
const EXCHANGE_CHECK_TTL: Duration = Duration::from_secs(30);
/// Checked exchanges remembered at most (rows name any exchange they like).
const MAX_CHECKED_EXCHANGES: usize = 10_000;
/// Bound on any single broker operation: a stalled network must end in a
/// reconnect, not a wait forever.
pub const AMQP_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for one connection attempt as a whole: TCP connect, TLS and the
/// AMQP handshake (up to the open connection). An abandoned attempt ends its
/// socket and lapin's I/O thread (see `fence`): a silent peer costs one
/// bounded attempt and nothing more.
pub const AMQP_HANDSHAKE_TIMEOUT: Duration = AMQP_TIMEOUT;
/// Publishes handed to lapin together (one wake-up of its I/O thread each).
const PUBLISH_CHUNK: usize = 100;

async fn bounded<T>(
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, PublishError> {
    match tokio::time::timeout(AMQP_TIMEOUT, fut).await {
        Ok(result) => result.map_err(PublishError::Channel),
        Err(_) => Err(PublishError::Timeout { what }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot connect to RabbitMQ at {url}: {source}; check the AMQP URL, credentials and that the broker is up")]
    Connect {
        url: String,
        #[source]
        source: lapin::Error,
    },
    #[error("cannot open a confirm-mode channel on RabbitMQ: {0}")]
    Channel(#[source] lapin::Error),
    #[error("RabbitMQ connection lost: {0}")]
    ConnectionLost(#[source] lapin::Error),
    #[error("RabbitMQ did not answer {what} within {}s; reconnecting", AMQP_TIMEOUT.as_secs())]
    Timeout { what: &'static str },
    #[error("RabbitMQ at {url} accepted the connection but did not complete the handshake (TLS, AMQP) within {}s; check that the address is RabbitMQ's AMQP port and not a proxy or firewall that holds connections", AMQP_HANDSHAKE_TIMEOUT.as_secs())]
    HandshakeTimeout { url: String },
    #[error(transparent)]
    TlsFiles(#[from] TlsFileError),
    /// A TLS handshake that failed for a reason the user can fix (CA, host
    /// name, plain-text port, client certificate), in words that say how.
    #[error("cannot connect to RabbitMQ at {url}: {why}")]
    TlsHandshake { url: String, why: String },
}

/// Abandons the connection attempt whose fence it holds, unless told that
/// the attempt was established.
struct AbandonOnDrop(Option<Arc<WriteFence>>);

impl AbandonOnDrop {
    fn established(mut self) {
        if let Some(fence) = self.0.take() {
            fence.established();
        }
    }
}

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if let Some(fence) = self.0.take() {
            fence.abandon();
        }
    }
}

/// One AMQP connection with a confirm-mode publishing channel, and a second
/// channel for passive exchange checks (a failed check closes its channel).
pub struct Publisher {
    connection: Connection,
    /// Refuses socket writes of a publish whose lease could have lapsed.
    fence: Arc<WriteFence>,
    channel: Channel,
    /// The channel answered in a way it should not: replace it.
    channel_suspect: Arc<AtomicBool>,
    probe: Option<Channel>,
    exchanges: ExpiringMap<String>,
    allow_unroutable: bool,
    vhost: String,
    node: String,
    /// A permit each time lapin reports an error on the connection (reset,
    /// closed by the broker): an idle relay wakes to replace it at once.
    trouble: Arc<tokio::sync::Notify>,
    /// Dropped with the publisher: ends the task that feeds `trouble`.
    _watching: tokio::sync::oneshot::Sender<()>,
}

/// Gives `trouble` a permit for each error lapin reports on `connection`,
/// until the connection's events end or `gone` resolves (the publisher was
/// dropped).
fn watch_connection(
    connection: &Connection,
    trouble: Arc<tokio::sync::Notify>,
    mut gone: tokio::sync::oneshot::Receiver<()>,
) {
    use futures_util::StreamExt;
    let mut events = connection.events_listener();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(lapin::Event::Error(_)) => trouble.notify_one(),
                    Some(_) => {}
                    None => return,
                },
                _ = &mut gone => return,
            }
        }
    });
}

impl Publisher {
    /// Connects to the one node `url` names, trusting and presenting what
    /// `tls_files` points at (read now, so a renewed certificate is used).
    pub async fn connect(
        url: &str,
        tls_files: &AmqpTlsFiles,
        allow_unroutable: bool,
    ) -> Result<Self, PublishError> {
        let props = ConnectionProperties::default().with_connection_name(LongString::from(
            format!("outbox-relay {}", std::process::id()),
        ));
        let uri = amqp_uri(url).map_err(|e| PublishError::Connect {
            url: redact_url(url),
            source: lapin::Error::from(std::io::Error::other(e)),
        })?;
        let fence = Arc::new(WriteFence::default());
        let runtime = Runtime::new(RuntimeParts::new(
            Tokio::current(),
            FencedReactor::new(fence.clone()),
        ));
        let tls = tls_config(tls_files)?;
        let node = tls::node_of(&uri);
        let host = uri.authority.host.clone();
        // What lapin's own connect does, over a fenced socket.
        let connect = Connection::connector(
            uri,
            runtime,
            async move |uri, runtime| {
                AMQPUriTcpExt::connect_with_config_async(&uri, tls.as_ref(), &runtime)
                    .await
                    .map_err(lapin::Error::from)
            },
            props,
        );
        // Until the handshake completes, dropping this (deadline, error or the
        // caller giving up) ends the attempt's socket and I/O thread.
        let attempt = AbandonOnDrop(Some(fence.clone()));
        let connection = match tokio::time::timeout(AMQP_HANDSHAKE_TIMEOUT, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(source)) => {
                let why = url
                    .starts_with("amqps://")
                    .then(|| tls::explain_amqp_tls_error(&source, &host, tls_files))
                    .flatten();
                return Err(match why {
                    Some(why) => PublishError::TlsHandshake {
                        url: redact_url(url),
                        why,
                    },
                    None => PublishError::Connect {
                        url: redact_url(url),
                        source,
                    },
                });
            }
            Err(_) => {
                return Err(PublishError::HandshakeTimeout {
                    url: redact_url(url),
                })
            }
        };
        attempt.established();
        let channel = confirm_channel(&connection).await?;
        let vhost = connection.status().vhost().to_string();
        let trouble = Arc::new(tokio::sync::Notify::new());
        let (watching, gone) = tokio::sync::oneshot::channel();
        watch_connection(&connection, trouble.clone(), gone);
        Ok(Self {
            connection,
            fence,
            channel,
            channel_suspect: Arc::default(),
            probe: None,
            exchanges: ExpiringMap::new(MAX_CHECKED_EXCHANGES),
            allow_unroutable,
            vhost,
            node,
            trouble,
            _watching: watching,
        })
    }

    /// Resolves at the next error lapin reports on the connection (one
    /// reported while nobody waited counts too); `is_connected` then says
    /// whether the connection is gone.
    pub fn trouble(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let trouble = self.trouble.clone();
        async move { trouble.notified().await }
    }

    /// `host:port` of the node this connection reached.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The virtual host the connection was opened on.
    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    pub fn is_blocked(&self) -> bool {
        self.connection.status().blocked()
    }

    /// After the broker closed the publishing channel: a fresh one.
    pub async fn reopen_channel(&mut self) -> Result<(), PublishError> {
        if !self.is_connected() {
            return Err(PublishError::ConnectionLost(lapin::Error::from(
                lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed),
            )));
        }
        self.exchanges.clear();
        if self.channel.status().connected() {
            let close = self.channel.close(200, ShortString::from("reopening"));
            let _ = tokio::time::timeout(AMQP_TIMEOUT, close).await;
        }
        self.channel = confirm_channel(&self.connection).await?;
        self.channel_suspect = Arc::default();
        Ok(())
    }

    pub fn channel_usable(&self) -> bool {
        self.channel.status().connected() && !self.channel_suspect.load(Ordering::Acquire)
    }

    /// Whether the message's properties fit the one content-header frame the
    /// broker negotiated (`frame_max`): a larger frame makes RabbitMQ close
    /// the whole connection without naming the message, so it never goes out.
    /// `Err(reason)` names the size, the limit and what to do.
    pub fn check_header_frame(&self, row: &OutboxRow, prepared: &Prepared) -> Result<(), String> {
        let frame_max = match self.connection.configuration().frame_max() {
            // 0: no limit was negotiated.
            0 => return Ok(()),
            n => n as usize,
        };
        let bytes = header_frame_bytes(prepared);
        if bytes <= frame_max {
            return Ok(());
        }
        Err(format!(
            "outbox row {}'s properties (headers included) encode to a {bytes}-byte AMQP \
             header frame, over the broker's frame_max ({frame_max} bytes): move large \
             header values into the payload (or raise RabbitMQ's frame_max), then \
             `outbox-relay dead-letters retry --id {}`",
            row.id, row.id
        ))
    }

    /// Asks the broker (passively, cached) whether the row's exchange exists.
    /// `Err(reason)` when it does not; connection trouble is not the row's fault.
    pub async fn check_exchange(
        &mut self,
        row: &OutboxRow,
    ) -> Result<Result<(), String>, PublishError> {
        if row.exchange.is_empty() {
            return Ok(Ok(()));
        }
        if self.exchanges.is_live(&row.exchange) {
            return Ok(Ok(()));
        }
        let probe = match &self.probe {
            Some(p) if p.status().connected() => p.clone(),
            _ => {
                let p = bounded("opening a channel", self.connection.create_channel()).await?;
                self.probe = Some(p.clone());
                p
            }
        };
        // prepare() has already refused names over 255 bytes.
        let Ok(name) = ShortString::try_new(row.exchange.as_str()) else {
            return Ok(Ok(()));
        };
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        let declare =
            probe.exchange_declare(name, ExchangeKind::Direct, passive, FieldTable::default());
        match tokio::time::timeout(AMQP_TIMEOUT, declare).await {
            Err(_) => Err(PublishError::Timeout {
                what: "an exchange check",
            }),
            Ok(Err(e)) if is_not_found(&e) => Ok(Err(format!(
                "exchange '{}' does not exist on vhost '{}': declare it or fix outbox row {}'s exchange",
                row.exchange, self.vhost, row.id
            ))),
            Ok(Err(e)) if !self.is_connected() => Err(PublishError::ConnectionLost(e)),
            // Any other answer (e.g. a permission the check needs but publishing
            // does not): the check only exists to catch 404 off the publishing
            // channel, so let the publish itself speak.
            Ok(_) => {
                self.exchanges
                    .insert(row.exchange.clone(), Instant::now() + EXCHANGE_CHECK_TTL);
                Ok(Ok(()))
            }
        }
    }

    /// Sends one message (mandatory, persistent); the confirm arrives later.
    /// `lease_until`: the message must not reach the socket after this instant.
    pub async fn publish(
        &self,
        row: &OutboxRow,
        prepared: Prepared,
        lease_until: tokio::time::Instant,
    ) -> Result<Confirm, BrokerFault> {
        let mut results = self
            .publish_batch(std::slice::from_ref(row), vec![prepared], lease_until)
            .await;
        results.pop().unwrap_or_else(|| {
            Err(BrokerFault::ConnectionLost {
                reason: "the publish was not handed to the connection".into(),
            })
        })
    }

    /// Sends several messages at once, in order (mandatory, persistent): lapin
    /// gets their frames before its I/O thread is woken, instead of a wake-up
    /// per message. One result per row, in row order; none of them may reach
    /// the socket after `lease_until`.
    pub async fn publish_batch(
        &self,
        rows: &[OutboxRow],
        prepared: Vec<Prepared>,
        lease_until: tokio::time::Instant,
    ) -> Vec<Result<Confirm, BrokerFault>> {
        self.fence.arm(lease_until.into_std());
        freeze_point();
        let mut results = Vec::with_capacity(rows.len());
        let mut prepared = prepared.into_iter();
        // Chunks bound the memory of the publishes in progress at once.
        for chunk in rows.chunks(PUBLISH_CHUNK) {
            let sends = chunk
                .iter()
                .zip(prepared.by_ref())
                .map(|(row, p)| self.send(row, p));
            let Ok(sent) =
                tokio::time::timeout(AMQP_TIMEOUT, futures_util::future::join_all(sends)).await
            else {
                // A stalled socket back-pressures the publishes; past the bound
                // it is reported as a lost connection (and the fence stays
                // armed: lapin may still hold some of these frames).
                results.resize_with(rows.len(), || {
                    Err(BrokerFault::ConnectionLost {
                        reason: format!(
                            "the socket took no publish for {}s",
                            AMQP_TIMEOUT.as_secs()
                        ),
                    })
                });
                return results;
            };
            let status = self.connection.status();
            results.extend(chunk.iter().zip(sent).map(|(row, sent)| {
                sent.map(|inner| Confirm {
                    inner,
                    message_id: row.message_id,
                    allow_unroutable: self.allow_unroutable,
                    connection: status.clone(),
                    channel_suspect: self.channel_suspect.clone(),
                })
                .map_err(|e| fault(status, e))
            }));
        }
        // lapin reports a publish done once its frames are written to the
        // socket (a TLS layer may still hold them while the socket is full), so
        // later writes, e.g. heartbeats while the relay waits on the database,
        // no longer depend on a lease.
        self.fence.open();
        results
    }

    async fn send(
        &self,
        row: &OutboxRow,
        prepared: Prepared,
    ) -> Result<PublisherConfirm, lapin::Error> {
        fail::fail_point!("before_publish", |_| Err(lapin::Error::from(
            lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "failpoint")
        )));
        self.channel
            .basic_publish(
                prepared.exchange,
                prepared.routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &row.payload,
                prepared.properties,
            )
            .await
    }

    pub async fn close(&self) {
        let close = self
            .connection
            .close(200, ShortString::from("relay stopping"));
        let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
    }
}

/// Fault tests: `FAILPOINTS=publish_after_lease_check=N*off->1*return` stops
/// the whole process (SIGSTOP to itself) after the lease check and before the
/// write, the moment a pause hurts fencing most. A no-op without the feature.
fn freeze_point() {
    fail::fail_point!("publish_after_lease_check", |_| {
        let _ = std::process::Command::new("kill")
            .args(["-STOP", &std::process::id().to_string()])
            .status();
    });
}

async fn confirm_channel(connection: &Connection) -> Result<Channel, PublishError> {
    let channel = bounded("opening a channel", connection.create_channel()).await?;
    bounded(
        "confirm.select",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    Ok(channel)
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}
