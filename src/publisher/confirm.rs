//! What the broker's answer to one publish means, in the relay's terms.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use lapin::{Confirmation, PublisherConfirm};

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
    /// the same error, so it does not say which row caused it. `code` is the
    /// AMQP reply code when the broker gave one (403 access refused, 404 ...).
    ChannelClosed { reason: String, code: Option<u16> },
    /// The connection went away, stalled, or the channel answered in a way it
    /// should not (a return for another message, a confirm not requested):
    /// nothing is known about the message.
    ConnectionLost { reason: String },
}

impl BrokerFault {
    pub fn reason(&self) -> &str {
        match self {
            BrokerFault::ChannelClosed { reason, .. } | BrokerFault::ConnectionLost { reason } => {
                reason
            }
        }
    }
}

/// The broker's answer to one publish, resolved in the publisher's terms.
pub struct Confirm {
    pub(super) inner: PublisherConfirm,
    pub(super) message_id: uuid::Uuid,
    pub(super) allow_unroutable: bool,
    pub(super) connection: lapin::ConnectionStatus,
    pub(super) channel_suspect: Arc<AtomicBool>,
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
pub(super) fn fault(connection: &lapin::ConnectionStatus, e: lapin::Error) -> BrokerFault {
    if connection.connected() && !is_connection_error(&e) {
        let code = match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
            _ => None,
        };
        BrokerFault::ChannelClosed {
            reason: e.to_string(),
            code,
        }
    } else {
        BrokerFault::ConnectionLost {
            reason: e.to_string(),
        }
    }
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
    use lapin::BasicProperties;

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
}
