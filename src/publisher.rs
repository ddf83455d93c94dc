//! Every AMQP call: connect, confirm-mode channel, exchange checks, publish,
//! and what a confirm means for the row.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions},
    types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString},
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    PublisherConfirm,
};

use async_rs::{util::RuntimeParts, Runtime, Tokio};
use lapin::{tcp::AMQPUriTcpExt, tcp::OwnedTLSConfig, uri::AMQPUri};

use crate::{
    config::redact_url,
    fence::{FencedReactor, WriteFence},
    rows::OutboxRow,
};

/// How long a positive exchange check is trusted before asking the broker again.
const EXCHANGE_CHECK_TTL: Duration = Duration::from_secs(30);
/// Bound on any single broker operation: a stalled network must end in a
/// reconnect, not a wait forever.
pub const AMQP_TIMEOUT: Duration = Duration::from_secs(10);
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
}

/// What the broker said about one publish, speaking about that message alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Acked and routed to at least one queue (or unroutable and that is allowed).
    Delivered,
    /// Acked but returned: no queue is bound for this exchange and routing key.
    Unroutable { reply: String },
    /// The broker refused to take responsibility for the message.
    Nacked,
}

/// Trouble that says nothing about the message itself: nobody is charged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerFault {
    /// The broker closed the channel. Every unconfirmed publish on it fails with
    /// the same error, so it does not say which row caused it.
    ChannelClosed { reason: String },
    /// The connection went away, stalled, or the channel answered in a way it
    /// should not (a return for another message, a confirm not requested):
    /// nothing is known about the message.
    ConnectionLost { reason: String },
}

impl BrokerFault {
    pub fn reason(&self) -> &str {
        match self {
            BrokerFault::ChannelClosed { reason } | BrokerFault::ConnectionLost { reason } => {
                reason
            }
        }
    }
}

/// The broker's answer to one publish, resolved in the publisher's terms.
pub struct Confirm {
    inner: PublisherConfirm,
    message_id: uuid::Uuid,
    allow_unroutable: bool,
    connection: lapin::ConnectionStatus,
    channel_suspect: Arc<AtomicBool>,
}

impl std::future::Future for Confirm {
    type Output = Result<Verdict, BrokerFault>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = &mut *self;
        std::pin::Pin::new(&mut this.inner)
            .poll(cx)
            .map(|result| this.interpret(result))
    }
}

impl Confirm {
    fn interpret(
        &self,
        result: Result<Confirmation, lapin::Error>,
    ) -> Result<Verdict, BrokerFault> {
        let (answer, channel_suspect) = judge(
            result,
            self.message_id,
            self.allow_unroutable,
            &self.connection,
        );
        if channel_suspect {
            self.channel_suspect.store(true, Ordering::Release);
        }
        answer
    }
}

/// What the broker's answer to the publish of `message_id` means, and whether
/// the channel answered in a way it should not (it is then replaced).
fn judge(
    result: Result<Confirmation, lapin::Error>,
    message_id: uuid::Uuid,
    allow_unroutable: bool,
    connection: &lapin::ConnectionStatus,
) -> (Result<Verdict, BrokerFault>, bool) {
    match result {
        Ok(Confirmation::Ack(None)) => (Ok(Verdict::Delivered), false),
        Ok(Confirmation::Ack(Some(returned))) => {
            let returned_id = returned
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_string());
            if returned_id.as_deref() != Some(message_id.to_string().as_str()) {
                // The broker's return and ack do not pair up: the channel's
                // bookkeeping cannot be trusted.
                let reason = format!(
                    "the broker returned message {} with the confirm of message {message_id}; reopening the channel",
                    returned_id.as_deref().unwrap_or("(no message-id)"),
                );
                return (Err(BrokerFault::ConnectionLost { reason }), true);
            }
            if allow_unroutable {
                (Ok(Verdict::Delivered), false)
            } else {
                let reply = format!("{} {}", returned.reply_code, returned.reply_text);
                (Ok(Verdict::Unroutable { reply }), false)
            }
        }
        Ok(Confirmation::Nack(_)) => (Ok(Verdict::Nacked), false),
        Ok(Confirmation::NotRequested) => {
            let reason = "the publishing channel is not in confirm mode; reopening it".into();
            (Err(BrokerFault::ConnectionLost { reason }), true)
        }
        Err(e) => (Err(fault(connection, e)), false),
    }
}

/// What a failed publish or confirm means: a closed channel while the
/// connection stands, or a lost connection.
fn fault(connection: &lapin::ConnectionStatus, e: lapin::Error) -> BrokerFault {
    if connection.connected() && !is_connection_error(&e) {
        BrokerFault::ChannelClosed {
            reason: e.to_string(),
        }
    } else {
        BrokerFault::ConnectionLost {
            reason: e.to_string(),
        }
    }
}

/// A row turned into an AMQP message, or the reason it can never be one.
pub struct Prepared {
    exchange: ShortString,
    routing_key: ShortString,
    properties: BasicProperties,
}

/// Checks and converts a row without touching the broker.
pub fn prepare(row: &OutboxRow) -> Result<Prepared, String> {
    if let Some(defect) = &row.defect {
        return Err(defect.clone());
    }
    let short = |what: &str, v: &str| {
        ShortString::try_new(v).map_err(|_| {
            format!(
                "{what} is {} bytes, AMQP allows at most 255: shorten outbox row {}'s {what}",
                v.len(),
                row.id
            )
        })
    };
    let exchange = short("exchange", &row.exchange)?;
    let routing_key = short("routing_key", &row.routing_key)?;
    let timestamp = row
        .created_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut properties = BasicProperties::default()
        .with_message_id(ShortString::from(row.message_id.to_string()))
        .with_delivery_mode(2)
        .with_timestamp(timestamp)
        .with_headers(headers_table(&row.headers).map_err(|e| {
            format!(
                "headers of outbox row {} cannot be sent as AMQP headers: {e}",
                row.id
            )
        })?);
    if let Some(v) = &row.content_type {
        properties = properties.with_content_type(short("content_type", v)?);
    }
    if let Some(v) = &row.message_type {
        properties = properties.with_type(short("message_type", v)?);
    }
    if let Some(v) = &row.correlation_id {
        properties = properties.with_correlation_id(short("correlation_id", v)?);
    }
    Ok(Prepared {
        exchange,
        routing_key,
        properties,
    })
}

/// JSON object -> AMQP field table. Numbers keep their kind (integer or float).
pub fn headers_table(headers: &serde_json::Value) -> Result<FieldTable, String> {
    let serde_json::Value::Object(map) = headers else {
        return Err(format!(
            "headers must be a JSON object, found {}",
            json_kind(headers)
        ));
    };
    let mut table = FieldTable::default();
    for (k, v) in map {
        let key = ShortString::try_new(k.as_str())
            .map_err(|_| format!("header name '{}...' is over 255 bytes", truncate(k, 40)))?;
        table.insert(
            key,
            amqp_value(v).map_err(|e| format!("header '{k}': {e}"))?,
        );
    }
    Ok(table)
}

fn amqp_value(v: &serde_json::Value) -> Result<AMQPValue, String> {
    use serde_json::Value as J;
    Ok(match v {
        J::Null => AMQPValue::Void,
        J::Bool(b) => AMQPValue::Boolean(*b),
        J::Number(n) => {
            // jsonb keeps no int/float distinction and prints every value of
            // 2^63 or more as an integer: those cannot be carried exactly.
            if let Some(i) = n.as_i64() {
                AMQPValue::LongLongInt(i)
            } else if let Some(f) = n.as_f64().filter(|f| n.is_f64() && f.abs() < 2f64.powi(63)) {
                AMQPValue::Double(f)
            } else {
                return Err(format!(
                    "{n} does not fit a signed 64-bit integer: send it as a string"
                ));
            }
        }
        J::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        J::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items
                .iter()
                .map(amqp_value)
                .collect::<Result<Vec<_>, _>>()?,
        )),
        J::Object(_) => AMQPValue::FieldTable(headers_table(v)?),
    })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
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
    exchanges: HashMap<String, Instant>,
    allow_unroutable: bool,
    vhost: String,
}

impl Publisher {
    pub async fn connect(url: &str, allow_unroutable: bool) -> Result<Self, PublishError> {
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
        let tls = OwnedTLSConfig::default();
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
        let connection = match tokio::time::timeout(AMQP_TIMEOUT, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(source)) => {
                return Err(PublishError::Connect {
                    url: redact_url(url),
                    source,
                })
            }
            Err(_) => {
                return Err(PublishError::Timeout {
                    what: "the connection handshake",
                })
            }
        };
        let channel = confirm_channel(&connection).await?;
        let vhost = connection.status().vhost().to_string();
        Ok(Self {
            connection,
            fence,
            channel,
            channel_suspect: Arc::default(),
            probe: None,
            exchanges: HashMap::new(),
            allow_unroutable,
            vhost,
        })
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

    /// Asks the broker (passively, cached) whether the row's exchange exists.
    /// `Err(reason)` when it does not; connection trouble is not the row's fault.
    pub async fn check_exchange(
        &mut self,
        row: &OutboxRow,
    ) -> Result<Result<(), String>, PublishError> {
        if row.exchange.is_empty() {
            return Ok(Ok(()));
        }
        if let Some(checked) = self.exchanges.get(&row.exchange) {
            if checked.elapsed() < EXCHANGE_CHECK_TTL {
                return Ok(Ok(()));
            }
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
                self.exchanges.insert(row.exchange.clone(), Instant::now());
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

/// The URL as lapin's parser reads it, with the host mended: it reads the
/// host with `Url::domain()`, which is empty for an IP address, and then falls
/// back to "localhost", so `amqp://10.0.0.5/` would reach the local broker.
pub fn amqp_uri(url: &str) -> Result<AMQPUri, String> {
    let mut uri: AMQPUri = url.parse()?;
    let parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
    if let Some(host) = parsed.host() {
        uri.authority.host = match host {
            url::Host::Domain(d) => d.to_string(),
            url::Host::Ipv4(ip) => ip.to_string(),
            url::Host::Ipv6(ip) => ip.to_string(),
        };
    }
    Ok(uri)
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

fn is_connection_error(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::IOError(_)
            | lapin::ErrorKind::InvalidConnectionState(_)
            | lapin::ErrorKind::MissingHeartbeatError
    ) || e.is_amqp_hard_error()
}

/// Unix time now, for the lag of a confirm.
pub fn since(created_at: SystemTime) -> Duration {
    SystemTime::now()
        .duration_since(created_at)
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn returned(message_id: Option<&str>) -> Confirmation {
        let mut delivery =
            lapin::message::Delivery::mock(1, "".into(), "q".into(), false, Vec::new());
        if let Some(id) = message_id {
            delivery.properties = BasicProperties::default().with_message_id(id.into());
        }
        Confirmation::Ack(Some(lapin::message::BasicReturnMessage {
            delivery,
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
        }))
    }

    #[test]
    fn a_return_counts_only_for_the_message_it_names() {
        let id = uuid::Uuid::new_v4();
        let status = lapin::ConnectionStatus::default();
        let (own, suspect) = judge(Ok(returned(Some(&id.to_string()))), id, false, &status);
        assert!(matches!(own, Ok(Verdict::Unroutable { .. })), "{own:?}");
        assert!(!suspect);
        let (allowed, _) = judge(Ok(returned(Some(&id.to_string()))), id, true, &status);
        assert_eq!(allowed, Ok(Verdict::Delivered));
        let other = uuid::Uuid::new_v4().to_string();
        for confirmation in [returned(Some(&other)), returned(None)] {
            let (answer, suspect) = judge(Ok(confirmation), id, false, &status);
            assert!(
                matches!(answer, Err(BrokerFault::ConnectionLost { .. })),
                "a return for another message charges nobody: {answer:?}"
            );
            assert!(suspect, "and the channel is replaced");
        }
    }

    #[test]
    fn a_confirm_that_was_not_requested_is_a_broker_fault() {
        let status = lapin::ConnectionStatus::default();
        let (answer, suspect) = judge(
            Ok(Confirmation::NotRequested),
            uuid::Uuid::new_v4(),
            false,
            &status,
        );
        assert!(matches!(answer, Err(BrokerFault::ConnectionLost { .. })));
        assert!(suspect);
        let (ack, _) = judge(
            Ok(Confirmation::Ack(None)),
            uuid::Uuid::new_v4(),
            false,
            &status,
        );
        assert_eq!(ack, Ok(Verdict::Delivered));
        let (nack, _) = judge(
            Ok(Confirmation::Nack(None)),
            uuid::Uuid::new_v4(),
            false,
            &status,
        );
        assert_eq!(nack, Ok(Verdict::Nacked));
    }

    #[test]
    fn amqp_urls_keep_an_ip_address_host() {
        let host = |u: &str| amqp_uri(u).map(|u| u.authority.host);
        assert_eq!(
            host("amqp://u:p@10.1.2.3:5673/%2f").as_deref(),
            Ok("10.1.2.3")
        );
        assert_eq!(host("amqps://[::1]:5671/").as_deref(), Ok("::1"));
        assert_eq!(
            host("amqp://rabbit.internal/").as_deref(),
            Ok("rabbit.internal")
        );
        assert_eq!(host("amqp://u:p@127.0.0.1/").as_deref(), Ok("127.0.0.1"));
    }

    #[test]
    fn headers_keep_their_json_kinds() {
        let t = headers_table(&json!({"s": "x", "i": -3, "f": 1.5, "b": true, "n": null,
                                      "a": [1, "two"], "o": {"k": "v"}}))
        .unwrap();
        let get = |k: &str| {
            t.inner()
                .get(&ShortString::from(k))
                .cloned()
                .unwrap_or_else(|| panic!("missing {k}"))
        };
        assert_eq!(get("i"), AMQPValue::LongLongInt(-3));
        assert_eq!(get("f"), AMQPValue::Double(1.5));
        assert_eq!(get("b"), AMQPValue::Boolean(true));
        assert_eq!(get("n"), AMQPValue::Void);
        assert!(matches!(get("a"), AMQPValue::FieldArray(_)));
        assert!(matches!(get("o"), AMQPValue::FieldTable(_)));
    }

    #[test]
    fn headers_that_amqp_cannot_carry_are_refused_with_a_reason() {
        let e = headers_table(&json!([1, 2])).unwrap_err();
        assert!(e.contains("JSON object"), "{e}");
        let e = headers_table(&json!({"big": 18446744073709551615u64})).unwrap_err();
        assert!(e.contains("64-bit"), "{e}");
        let long = "k".repeat(256);
        assert!(headers_table(&json!({ long: 1 })).is_err());
    }
}
